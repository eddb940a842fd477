"""`make bench BENCH_ARGS="--lean-probe PATH"`: the issue's feasibility probe (`../shared/bench/lean_probe.py`, an
HTTP/1.1 proxy with an in-memory bearer check and nothing else) as a row of the same interleaved run, so that
credgate's CPU per request can be read against what uvloop, httptools and Python cost with no features at all.

The probe is not part of credgate and is not copied here: it is loaded from its path, pointed at this run's
upstream, and run with this tree's .venv (which has uvloop and httptools). It accepts "Bearer bench-token".
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from tests.bench import bench_servers
from tests.bench.bench_loop import Scenario
from tests.bench.bench_procs import Processes

TOKEN = "bench-token"  # the probe's own


def rows(procs: Processes, path: str, upstream_port: int, cpus: set[int]) -> list[Scenario]:
    """With --lean-probe PATH: start the probe on a free port, proxying to 127.0.0.1:upstream_port; its row."""
    if not path:
        return []
    probe = Path(path)
    if not probe.is_file():
        raise FileNotFoundError(f"--lean-probe: no file at {probe}")
    port = bench_servers.free_port()
    process = procs.start("lean-probe", [sys.executable, "-m", "tests.bench.bench_lean", str(probe.resolve()),
                                         str(upstream_port), str(port)], cpus=cpus,
                          cwd=Path(__file__).resolve().parents[2])
    if not bench_servers.wait_port(port):
        raise RuntimeError("the lean probe did not start (tests/bench/results/<run>/logs/lean-probe.log)")
    return [Scenario("lean-probe", f"http://127.0.0.1:{port}/", (("Authorization", f"Bearer {TOKEN}"),),
                     lambda: [process.pid], "the issue's lean_probe.py: in-memory bearer, no limits, timeouts, "
                     "metrics or log (not credgate)", must_reject=True)]


def main(probe: str, upstream_port: int, port: int) -> None:
    import uvloop

    # The probe reads UP_PORT when it connects: set after its definitions run, before its server starts.
    names = runpy.run_path(probe, run_name="lean_probe")
    names["main"].__globals__["UP_PORT"] = upstream_port
    uvloop.run(names["main"](port))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
