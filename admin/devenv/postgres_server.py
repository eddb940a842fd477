"""An embedded Postgres 16 from the pgserver wheel, and what running it as root takes (its own system user)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import subprocess
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from admin.devenv.child_server import ChildServer, EmbeddedServerError, package_dir
from admin.devenv.processes import accepts_tcp, child_environment, is_alive, process_name

logger = logging.getLogger(__name__)

# Postgres refuses to run as root; when we are root it runs as this unprivileged system account.
POSTGRES_SYSTEM_USER = "credgate-pg"

# Linux limits unix socket paths to 108 bytes including the terminator; keep a margin.
_MAX_SOCKET_PATH = 100


def postgres_bin_dir() -> Path:
    """Directory holding the Postgres binaries shipped by the pgserver wheel (initdb, postgres, psql...)."""
    return package_dir("pgserver") / "pginstall" / "bin"


class EmbeddedPostgres(ChildServer):
    """A Postgres 16 server from the pgserver wheel, on 127.0.0.1 with trust authentication.

    `data_dir` is the cluster directory itself (PGDATA); initdb runs once when it is empty.
    `durable=False` turns fsync, synchronous commit and full-page writes off: fast, and a crash of
    the host (not of Postgres) may lose or corrupt data, which suits tests and demos.
    """

    _name = "postgres"
    _log_name = "postgres.log"
    # SIGINT is Postgres's fast shutdown: it does not wait for clients to disconnect (SIGTERM does).
    _shutdown_signal = signal.SIGINT

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        durable: bool = False,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(data_dir, port)
        self.durable = durable
        self.settings = dict(settings or {})

    @property
    def url(self) -> str:
        return self.database_url("postgres")

    def database_url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{urllib.parse.quote(database, safe='')}"

    def create_database(self, name: str) -> str:
        """Create database `name` unless it exists; return its URL. The server must be running."""
        if not name or "\x00" in name or len(name.encode()) > 63:
            raise ValueError("a database name is 1 to 63 bytes without NUL")
        # psql quotes :'dbname' as a literal and format('%I') as an identifier, so any name is safe.
        script = (
            "SELECT format('CREATE DATABASE %I', :'dbname') "
            "WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'dbname') \\gexec\n"
        )
        command = [
            str(postgres_bin_dir() / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", f"dbname={name}",
            "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-f", "-",
        ]
        result = subprocess.run(
            command, input=script, capture_output=True, text=True, timeout=30, env=child_environment()
        )
        if result.returncode != 0:
            raise EmbeddedServerError(f"could not create database {name!r}: {result.stderr.strip()}")
        return self.database_url(name)

    def _run_as(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        uid, gid = _postgres_account()
        return {"user": uid, "group": gid, "extra_groups": []}

    def _prepare(self) -> None:
        bin_dir = postgres_bin_dir()
        if not (bin_dir / "postgres").is_file():
            raise EmbeddedServerError(f"no postgres binary in {bin_dir}; reinstall pgserver")
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self._prepare_for_unprivileged_user(bin_dir.parent)
        self._remove_stale_pid_file()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(bin_dir / "initdb")

    def _prepare_for_unprivileged_user(self, install_dir: Path) -> None:
        uid, gid = _postgres_account()
        _allow_traversal_to(self.data_dir)
        _allow_traversal_to(install_dir)
        _make_readable_by_others(install_dir)
        if self.data_dir.stat().st_uid != uid:
            logger.info("giving %s to system user %s", self.data_dir, POSTGRES_SYSTEM_USER)
            os.chown(self.data_dir, uid, gid)
            for root, dirs, files in os.walk(self.data_dir):
                for entry in dirs + files:
                    os.chown(os.path.join(root, entry), uid, gid, follow_symlinks=False)

    def _remove_stale_pid_file(self) -> None:
        pid_file = self.data_dir / "postmaster.pid"
        try:
            first_line = pid_file.read_text().split("\n", 1)[0]
        except FileNotFoundError:
            return
        with contextlib.suppress(ValueError):
            # A standalone backend writes its PID negated.
            pid = abs(int(first_line))
            if is_alive(pid) and process_name(pid) in ("postgres", None):
                raise EmbeddedServerError(
                    f"a postgres server (PID {pid}) is already running on {self.data_dir}; "
                    f"stop it first (kill -INT {pid})"
                )
        if first_line.strip() == str(self._killed_pid):
            logger.debug("removing %s of the server kill() ended", pid_file)
        else:
            logger.warning("removing stale %s left by a previous run", pid_file)
        pid_file.unlink(missing_ok=True)

    def _initdb(self, initdb: Path) -> None:
        if any(self.data_dir.iterdir()):
            raise EmbeddedServerError(
                f"{self.data_dir} is neither empty nor a Postgres data directory (no PG_VERSION)"
            )
        began = time.monotonic()
        command = [
            str(initdb), "-D", str(self.data_dir), "--auth=trust", "-U", "postgres", "--encoding=UTF8",
            # The C locale exists everywhere and sorts bytewise; lower()/upper() then touch ASCII only.
            "--locale=C",
        ]
        if not self.durable:
            command.append("--no-sync")
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=120, cwd=self.data_dir,
            env=child_environment(), **self._run_as(),
        )
        if result.returncode != 0:
            raise EmbeddedServerError(f"initdb failed for {self.data_dir}:\n{result.stdout}{result.stderr}")
        # initdb needs an empty directory, so its output is written only now.
        (self.data_dir / "initdb.log").write_text(result.stdout + result.stderr)
        logger.info("initdb %s took %.2fs", self.data_dir, time.monotonic() - began)

    def _command(self) -> list[str]:
        command = [
            str(postgres_bin_dir() / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
            "-k", self._socket_dir(), "-c", "listen_addresses=127.0.0.1",
        ]
        settings: dict[str, str] = {}
        if not self.durable:
            settings = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        settings.update(self.settings)
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        return command

    def _socket_dir(self) -> str:
        # A unix socket next to the data lets `psql -h DATA_DIR` work; a deep path cannot hold one,
        # and TCP alone is enough for us.
        if len(str(self.data_dir / f".s.PGSQL.{self.port}.lock")) > _MAX_SOCKET_PATH:
            return ""
        return str(self.data_dir)

    def _is_ready(self, process: subprocess.Popen[bytes]) -> bool:
        # pg_ctl's own test: the postmaster writes "ready" into postmaster.pid once it accepts connections.
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        if len(lines) < 8 or lines[0].strip() != str(process.pid) or lines[7].strip() != "ready":
            return False
        return accepts_tcp(self.port)


# -- running as root: an unprivileged account that can reach the binaries and the data --


def _postgres_account() -> tuple[int, int]:
    """(uid, gid) of the system user Postgres runs as when we are root, created if missing."""
    import pwd  # POSIX only, like running as root

    try:
        entry = pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        result = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--user-group", POSTGRES_SYSTEM_USER],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"Postgres cannot run as root and creating system user {POSTGRES_SYSTEM_USER} failed: "
                f"{result.stderr.strip()}"
            ) from None
        logger.info("created system user %s to run Postgres", POSTGRES_SYSTEM_USER)
        entry = pwd.getpwnam(POSTGRES_SYSTEM_USER)
    return entry.pw_uid, entry.pw_gid


def _allow_traversal_to(path: Path) -> None:
    """Let other users traverse (not list) every directory above `path` so Postgres can reach it."""
    for directory in path.parents:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            logger.info("allowing other users to traverse %s so that Postgres can reach %s", directory, path)
            directory.chmod(mode | stat.S_IXOTH)


def _make_readable_by_others(install_dir: Path) -> None:
    """Postgres's binaries, libraries and share files must be readable (and runnable) by its user."""
    for root, _subdirs, files in os.walk(install_dir):
        _add_mode(Path(root), stat.S_IROTH | stat.S_IXOTH)
        for name in files:
            path = Path(root, name)
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode):
                _add_mode(path, stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0))


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(mode | bits)
