"""Instructions per request of one gateway worker, counted by valgrind's callgrind: a figure that does not
depend on what else runs on the machine (the CPU columns of `make bench` do, a little), for comparing two
versions of the request path change by change.

    .venv/bin/python -m tests.bench.instructions [--requests 3000] [--tree OTHER_CHECKOUT]

One worker (`gateway.runtime.running_worker`, as `credgate gateway` runs it, gc set up the same way) runs under
callgrind with collection on only inside uvloop's stream-read callback: everything a request does, from the
client's bytes to the response written and the access log line queued, and nothing the worker does on its
timers (metrics and access-log flushes, probes), which valgrind's slowness would otherwise inflate per request.
A small asyncio upstream answers like the bench's nginx (5 headers, `ok`); the client keeps 10 connections
and sends one request on each in turn. Rows: `auth = "none"` and a cached bearer token, after a warm-up.
Counts user-space instructions only: the kernel's share (the four socket calls per request) is not in them.
Stores: the machine's Postgres and Redis when reachable, else embedded ones (tests/bench/bench_servers.py).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench import bench_servers
from tests.bench.bench_procs import Processes

HERE = Path(__file__).resolve().parent

_UPSTREAM = """
import asyncio, sys
RESP = (b"HTTP/1.1 200 OK\\r\\nServer: nginx/1.22.1\\r\\nDate: Thu, 03 Dec 2026 07:00:00 GMT\\r\\n"
        b"Content-Type: text/plain\\r\\nContent-Length: 2\\r\\nConnection: keep-alive\\r\\n\\r\\nok")
class Upstream(asyncio.Protocol):
    def connection_made(self, transport): self.transport = transport
    def data_received(self, data): self.transport.write(RESP * data.count(b"\\r\\n\\r\\n"))
async def main():
    server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
asyncio.run(main())
"""

_WORKER = """
import asyncio, gc, os, sys
sys.path.insert(0, os.getcwd())
import uvloop
from gateway.core.settings import load_settings
from gateway.runtime import running_worker
async def main():
    async with running_worker(load_settings(os.environ["CREDGATE_CONFIG"])):
        gc.collect(); gc.freeze(); gc.set_threshold(50_000, 20, 20)  # as gateway.server's workers
        open(sys.argv[1], "w").close()
        await asyncio.Event().wait()
uvloop.run(main())
"""


def drive(port: int, count: int, path: str, token: str | None, connections: int = 10) -> None:
    """`count` GETs over `connections` keep-alive connections, one request on each in turn; every answer 200."""
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    request = (head + "\r\n").encode()
    socks = [socket.create_connection(("127.0.0.1", port), timeout=120) for _ in range(connections)]
    try:
        for _ in range(count // connections):
            for s in socks:
                s.sendall(request)
            for s in socks:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += s.recv(65536)
                head_bytes, _, body = data.partition(b"\r\n\r\n")
                found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head_bytes)
                length = int(found.group(1)) if found else 0
                while len(body) < length:
                    body += s.recv(65536)
                if not head_bytes.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"{path}: {head_bytes[:200]!r}")
    finally:
        for s in socks:
            s.close()


def control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=60)


def write_config(path: Path, upstream_port: int) -> None:
    routes = (("/open", "none", "open"), ("/", "required", "api"))
    path.write_text(f'[gateway]\naccess_log = "{path.parent / "access.log"}"\n' + "".join(
        f'[[routes]]\nprefix = "{prefix}"\nupstream = "http://127.0.0.1:{upstream_port}"\nauth = "{auth}"\n'
        f'name = "{name}"\n' for prefix, auth, name in routes))


def measure(tree: Path, requests: int, work: Path, procs: Processes, env: dict[str, str], token: str) -> dict[str, int]:
    """Both rows for the checkout at `tree` (the worker runs that tree's code with that tree's .venv)."""
    port = bench_servers.free_port()
    ready = work / f"ready-{tree.name}"
    out = work / f"callgrind-{tree.name}.%p"
    run_env = dict(env, CREDGATE_GATEWAY_LISTEN=f"127.0.0.1:{port}", CREDGATE_GATEWAY_METRICS_LISTEN="")
    python = tree / ".venv" / "bin" / "python"
    worker = procs.start(f"instructions-{tree.name}", [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
        "--toggle-collect=*__uv_stream_on_read", f"--callgrind-out-file={out}",
        str(python), str(work / "worker.py"), str(ready)], env=run_env, cwd=tree)
    deadline = time.monotonic() + 300
    while not ready.exists():
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker under valgrind did not start ({tree})")
        time.sleep(0.2)
    pid = str(worker.pid)
    counts: dict[str, int] = {}
    for name, path, auth in (("auth none", "/open/x", None), ("cached bearer", "/x", token)):
        drive(port, 600, path, auth)  # warm: caches filled, connections pooled
        control("-z", pid)
        control("-i", "on", pid)
        drive(port, requests, path, auth)
        control("-i", "off", pid)
        before = set(work.glob(f"callgrind-{tree.name}.*"))
        control("-d", pid)
        time.sleep(1)
        dumped = sorted(set(work.glob(f"callgrind-{tree.name}.*")) - before, key=lambda p: p.stat().st_mtime)
        text = dumped[-1].read_text(errors="replace") if dumped else ""
        total = re.search(r"^totals: (\d+)", text, re.M)
        if total is None:
            raise RuntimeError(f"no callgrind totals for {name} ({tree})")
        counts[name] = int(total.group(1)) // requests
    worker.terminate()
    worker.wait(timeout=60)
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000, help="measured requests per row (3000)")
    ap.add_argument("--tree", default="", help="another checkout with its own .venv, measured the same way")
    args = ap.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="credgate-instructions-"))
    work.chmod(0o755)
    procs = Processes(work)
    stores = bench_servers.open_stores(work)
    rows: dict[str, dict[str, int]] = {}
    try:
        upstream_port = bench_servers.free_port()
        config = work / "instructions.toml"
        write_config(config, upstream_port)
        (work / "upstream.py").write_text(_UPSTREAM)
        (work / "worker.py").write_text(_WORKER)
        env = bench_servers.credgate_env(stores, config)
        bench_servers.cli(env, "migrate")
        bench_servers.cli(env, "users", "create", "bench-svc", "--service")
        token = bench_servers.cli(env, "credentials", "create", "--owner", "bench-svc", "--kind", "token")["token"]
        procs.start("instructions-upstream", [sys.executable, str(work / "upstream.py"), str(upstream_port)])
        for tree in [bench_servers.REPO] + ([Path(args.tree).resolve()] if args.tree else []):
            rows[str(tree)] = measure(tree, args.requests, work, procs, env, token)
    finally:
        procs.stop_all()
        stores.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ninstructions per request (callgrind, {args.requests} requests per row, user space only)\n")
    print("| tree | auth none | cached bearer | bearer / none |\n|---|---|---|---|")
    for checkout, counts in rows.items():
        none, bearer = counts["auth none"], counts["cached bearer"]
        print(f"| {checkout} | {none:,} | {bearer:,} | {bearer / none:.2f}x |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
