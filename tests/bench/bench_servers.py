"""What the benchmark runs against: nginx and wrk (installed when missing), Postgres and Redis (the machine's
own when reachable, else embedded), the bench database, credentials made with the CLI, and credgate gateways."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from tests.bench import bench_procs
from tests.bench.bench_procs import Processes

CONF = Path(__file__).resolve().parent / "conf"
REPO = Path(__file__).resolve().parents[2]
BENCH_DB = "credgate_bench"
BENCH_REDIS_DB = 9
LOCAL_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
APT_PACKAGES = {"nginx": "nginx", "wrk": "wrk", "taskset": "util-linux"}
# The mix row's three protected routes (same backend). Prefixes of 5 characters, a length the table has already
# ("/open", "/sink"): the other rows' paths cost the route lookup exactly what they did without them.
MIX_ROUTES = ("/svc1", "/svc2", "/svc3")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


# --- tools ------------------------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    # /usr/sbin is not on every user's PATH, and nginx lives there
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def ensure_tools() -> dict[str, str]:
    """Paths of nginx, wrk and taskset; installs the missing ones with apt-get when root, else exits saying how."""
    missing = [tool for tool in APT_PACKAGES if find_tool(tool) is None]
    if missing:
        packages = sorted({APT_PACKAGES[tool] for tool in missing})
        command = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            sys.exit(f"bench: missing {', '.join(missing)}; install them with:\n"
                     f"  sudo apt-get update && sudo {' '.join(command)}")
        log(f"installing {' '.join(packages)} with apt-get")
        apt_install(command)
    paths = {tool: find_tool(tool) for tool in APT_PACKAGES}
    absent = [tool for tool, path in paths.items() if path is None]
    if absent:
        sys.exit(f"bench: {', '.join(absent)} still missing after apt-get")
    return {tool: path for tool, path in paths.items() if path is not None}


def apt_install(command: list[str]) -> None:
    # Debian's nginx postinst starts the system service on port 80: forbid that during the install.
    policy = Path("/usr/sbin/policy-rc.d")
    made = not policy.exists()
    if made:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(command, check=True, env=env)
    finally:
        if made:
            policy.unlink()


def nginx_has_auth_request(nginx: str) -> bool:
    out = subprocess.run([nginx, "-V"], capture_output=True, text=True, check=False)
    return "--with-http_auth_request_module" in out.stdout + out.stderr


def versions(tools: dict[str, str]) -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        text = (out.stdout + out.stderr).strip()
        return text.splitlines()[0] if text else "?"

    return {
        "kernel": os.uname().release,
        "cpus": str(os.cpu_count()),
        "python": sys.version.split()[0],
        "nginx": first_line([tools["nginx"], "-v"]),
        "wrk": first_line([tools["wrk"], "--version"]),
        "loadavg": Path("/proc/loadavg").read_text().strip(),
    }


# --- Postgres and Redis -----------------------------------------------------------------------------------


@dataclass
class Stores:
    """The database and Redis the gateways use, and how to undo what the harness did to them."""

    database_url: str
    admin_url: str  # the maintenance database on the same server (create/drop the bench database)
    redis_url: str
    description: str
    embedded: list[Any] = field(default_factory=list)  # EmbeddedPostgres / EmbeddedRedis to stop

    def close(self) -> None:
        with contextlib.suppress(Exception):
            _flush_redis(self.redis_url)
        with contextlib.suppress(Exception):
            asyncio.run(_drop_database(self.admin_url))
        for server in reversed(self.embedded):
            with contextlib.suppress(Exception):
                server.stop()
        self.embedded.clear()


def open_stores(work: Path, *, force_embedded: bool = False) -> Stores:
    """Local Postgres (trust, user postgres) and Redis (db 9) when reachable, else embedded ones."""
    embedded: list[Any] = []
    described = []
    if not force_embedded and asyncio.run(_reachable(LOCAL_PG)):
        admin_url = LOCAL_PG
        described.append("local PostgreSQL 127.0.0.1:5432")
    else:
        from admin.devenv.postgres_server import EmbeddedPostgres

        pg = EmbeddedPostgres(work / "pg")
        pg.start()
        embedded.append(pg)
        admin_url = pg.url
        described.append(f"embedded PostgreSQL 127.0.0.1:{pg.port}")
    if not force_embedded and _redis_ping(6379):
        redis_url = f"redis://127.0.0.1:6379/{BENCH_REDIS_DB}"
        described.append(f"local Redis 127.0.0.1:6379 db {BENCH_REDIS_DB}")
    else:
        from admin.devenv.redis_server import EmbeddedRedis

        rd = EmbeddedRedis(work / "redis")
        rd.start()
        embedded.append(rd)
        redis_url = rd.url
        described.append(f"embedded Redis 127.0.0.1:{rd.port}")
    stores = Stores(_with_database(admin_url, BENCH_DB), admin_url, redis_url, ", ".join(described), embedded)
    try:
        asyncio.run(_create_database(admin_url))
        _flush_redis(redis_url)
    except BaseException:
        stores.close()
        raise
    return stores


def _with_database(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name


async def _reachable(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


async def _create_database(admin_url: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {BENCH_DB}")
    finally:
        await conn.close()


async def _drop_database(admin_url: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
    finally:
        await conn.close()


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def clear_failure_counts(url: str) -> int:
    """Delete the failure throttle's counters (gateway.redis_tier fail:* keys) in the bench's Redis database;
    returns how many there were. The mix row's wrong secrets leave the address 127.0.0.1 with failures
    counted, which would otherwise count against the cold path's concurrent verifications."""
    import redis

    from gateway.redis_tier import REDIS_PREFIX

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{REDIS_PREFIX}fail:*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


def _flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.flushdb()  # only the bench's own database number
    finally:
        client.close()


# --- credgate configuration, CLI and gateways -------------------------------------------------------------


def write_config(path: Path, upstream_port: int, sink_port: int, *, signed: bool = True,
                 throttle_window: float | None = None) -> Path:
    """The bench gateway config: an auth="none" route and a protected one to the backend nginx, three more
    protected ones to it for the mix row (MIX_ROUTES), and a protected /sink route to the streaming figure's
    body sink. Metrics and the access log are on; each gateway gets its own metrics port and access log file
    through the environment. argon2 parameters are the defaults; so is the failure throttle, unless
    throttle_window (seconds) is given (the mix row's gateway)."""
    upstream = f"http://127.0.0.1:{upstream_port}"
    mix_routes = "".join(f'[[routes]]\nprefix = "{prefix}"\nupstream = "{upstream}"\nauth = "required"\n'
                         f'name = "{prefix.strip("/")}"\n' for prefix in MIX_ROUTES)
    path.write_text(
        "# written by tests/bench/run.py\n"
        "[gateway]\n"
        'access_log = "off"  # overridden per gateway (CREDGATE_GATEWAY_ACCESS_LOG)\n'
        "[gateway.limits]\n"
        "max_body_bytes = 0  # the streaming figure sends 200 MB\n"
        "[[routes]]\n"
        f'prefix = "/open"\nupstream = "{upstream}"\nauth = "none"\nname = "open"\n'
        "[[routes]]\n"
        f'prefix = "/"\nupstream = "{upstream}"\nauth = "required"\nname = "api"\n'
        "[[routes]]\n"
        f'prefix = "/sink"\nupstream = "http://127.0.0.1:{sink_port}"\nauth = "required"\nname = "sink"\n'
        + mix_routes
        + ("[[routes]]\n"
           f'prefix = "/signed"\nupstream = "{upstream}"\nname = "signed"\nidentity_assertion = true\n'
           "[identity]\n"
           f'key_files = ["{identity_key(path.parent)}"]\n' if signed else "")  # --compare: older trees lack it
        + ("" if throttle_window is None else f"[throttle]\nwindow_seconds = {throttle_window:g}\n")
    )
    return path


def identity_key(work: Path) -> Path:
    """The Ed25519 key the bench's /signed route signs Credgate-Identity with (made once per run)."""
    key = work / "identity.pem"
    if not key.exists():
        from gateway.identity import generate

        generate(key)
    return key


def credgate_env(stores: Stores, config: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "CREDGATE_CONFIG": str(config),
        "CREDGATE_DATABASE_URL": stores.database_url,
        "CREDGATE_REDIS_URL": stores.redis_url,
        "CREDGATE_SECRET_KEY": secrets.token_urlsafe(36),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def cli(env: dict[str, str], *args: str) -> Any:
    """`credgate ARGS --json`, its output parsed."""
    done = subprocess.run([sys.executable, "-m", "admin", *args, "--json"], env=env, capture_output=True,
                          text=True, timeout=120, check=False, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"credgate {args[0]} {args[1] if len(args) > 1 else ''} failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


@dataclass(frozen=True)
class BenchCredentials:
    token: str
    client_id: str
    secret: str
    limited_token: str  # a token with a 1,000,000/minute rate limit (issue 14's bench row)
    wrong_token: str  # well-formed, of a real credential of its own ("bench-stale"), with a wrong secret (mix row)


def make_credentials(env: dict[str, str]) -> BenchCredentials:
    cli(env, "migrate")
    cli(env, "users", "create", "bench-svc", "--service")
    token = cli(env, "credentials", "create", "--owner", "bench-svc", "--kind", "token", "--name", "bench-token")
    key = cli(env, "credentials", "create", "--owner", "bench-svc", "--kind", "key", "--name", "bench-key")
    limited = cli(env, "credentials", "create", "--owner", "bench-svc", "--kind", "token", "--name", "bench-limited",
                  "--rate-limit", "1000000/minute")
    stale = cli(env, "credentials", "create", "--owner", "bench-svc", "--kind", "token", "--name", "bench-stale")
    return BenchCredentials(token["token"], key["client_id"], key["secret"], limited["token"],
                            wrong_secret_token(stale["token"]))


def wrong_secret_token(token: str) -> str:
    """A well-formed token (prefix, alphabet, checksum) of the same credential, with another secret."""
    from gateway.core.formats import generate_token, parse_token

    presented = parse_token(token)
    if presented is None:
        raise RuntimeError("the CLI made a token gateway.core.formats does not parse")
    while True:
        wrong = generate_token(presented.public_id)
        if wrong != token:
            return wrong


@dataclass
class Gateway:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    workers: list[int]
    access_log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_gateway(
    procs: Processes,
    name: str,
    env: dict[str, str],
    *,
    workers: int,
    cpus: set[int] | None,
    access_log: Path,
    extra_env: dict[str, str] | None = None,
    timeout: float = 60.0,
    python: str = sys.executable,
) -> Gateway:
    """`credgate gateway` with N workers, started pinned to cpus; returns once every worker serves."""
    port, metrics_port = free_port(), free_port()
    run_env = dict(env)
    run_env.update({"CREDGATE_GATEWAY_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
                    "CREDGATE_GATEWAY_ACCESS_LOG": str(access_log)})
    run_env.update(extra_env or {})
    # `-m admin` imports from the working directory first: run another checkout's python from its own tree,
    # or it would measure this tree's code (what --compare once did)
    process = procs.start(name, [python, "-m", "admin", "gateway", "--listen", f"127.0.0.1:{port}",
                                 "--workers", str(workers)], env=run_env, cpus=cpus,
                          cwd=Path(python).absolute().parents[2] if python != sys.executable else None)
    log_path = procs.log_path(name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway {name} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        if "listening on" in log_path.read_text(errors="replace"):
            pids = bench_procs.children(process.pid)
            if len(pids) == workers:
                procs.remember(process.pid)
                return Gateway(name, process, port, metrics_port, sorted(pids), access_log)
        time.sleep(0.05)
    raise RuntimeError(f"gateway {name} did not start in {timeout:.0f}s:\n{log_path.read_text()[-3000:]}")


def scrape(metrics_port: int, name: str) -> float:
    """Sum of every sample of one metric on a gateway's metrics listener."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- nginx ------------------------------------------------------------------------------------------------


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    ports: dict[str, int]

    @property
    def pids(self) -> list[int]:
        return bench_procs.tree(self.process.pid)


def start_nginx(procs: Processes, nginx: str, run: Path, which: str, ports: dict[str, int],
                cpus: set[int], stream_mb: int = 0) -> Nginx:
    """Render conf/nginx-<which>.conf into run/ and start it in the foreground, pinned to cpus."""
    text = (CONF / f"nginx-{which}.conf").read_text().replace("@RUN@", str(run))
    text = text.replace("@STREAM_MB@", str(stream_mb))
    for key, port in ports.items():
        text = text.replace(f"@{key}@", str(port))
    conf = run / f"nginx-{which}.conf"
    conf.write_text(text)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (run / f"nginx-{which}-tmp" / sub).mkdir(parents=True, exist_ok=True)
    process = procs.start(f"nginx-{which}", [nginx, "-p", str(run), "-c", str(conf), "-e",
                                             str(run / f"nginx-{which}.startup.err"), "-g", "daemon off;"], cpus=cpus)
    if stream_mb:
        with open(run / "big.bin", "wb") as big:  # sparse: costs no disk
            big.truncate(stream_mb * 1024 * 1024)
    for key, port in ports.items():
        if f"listen 127.0.0.1:@{key}@" in (CONF / f"nginx-{which}.conf").read_text() and not wait_port(port):
            startup = procs.log_path(f"nginx-{which}").read_text()
            raise RuntimeError(f"nginx {which} did not listen on {port}: {startup}")
    deadline = time.monotonic() + 5
    while not bench_procs.children(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    procs.remember(process.pid)
    return Nginx(process, ports)
