"""`make bench`: credgate against nginx in one interleaved run, then paced latency and the further figures.

Everything listens on 127.0.0.1; every process started here is stopped by PID on exit (also on Ctrl-C).
Results go to tests/bench/results/<timestamp>/ (summary.md, results.jsonl, raw wrk output, logs).
Run `make bench BENCH_ARGS="--help"` for the options; BENCH_ARGS="--runs 5 --duration 10" lengthens it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: `tests.bench` is importable

import argparse
import base64
import json
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType

from tests.bench import bench_lean, bench_loop, bench_mix, bench_profile, bench_servers
from tests.bench.bench_further import Running, further_figures
from tests.bench.bench_loop import Layout, Scenario
from tests.bench.bench_procs import Processes
from tests.bench.bench_servers import BenchCredentials, Gateway, Nginx, log
from tests.bench.bench_summary import Summary

HERE = Path(__file__).resolve().parent
PHASES = ("closed", "paced", "cold", "revocation", "streaming", "scale", "memory")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="make bench BENCH_ARGS=...", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measured wrk run (5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unrecorded seconds of load before each run (1)")
    ap.add_argument("--runs", type=int, default=3, help="interleaved closed-loop runs (3)")
    ap.add_argument("--paced-runs", type=int, default=1, help="interleaved paced runs (1)")
    ap.add_argument("--rate", type=int, default=1000, help="paced run: offered req/s (1000)")
    ap.add_argument("--conns", type=int, default=50, help="wrk connections (50)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    ap.add_argument("--sut-cpu", type=int, default=0, help="core of the system under test (0)")
    ap.add_argument("--aux-cpu", type=int, default=1, help="core of wrk and the backend nginx (1)")
    ap.add_argument("--only", default="", help=f"comma list of phases: {','.join(PHASES)}")
    ap.add_argument("--skip", default="", help="comma list of phases to leave out")
    ap.add_argument("--cold-credentials", type=int, default=10_000, help="never-seen key pairs (10000)")
    ap.add_argument("--cold-secrets", type=int, default=256,
                    help="distinct secrets (real argon2id hashes) among them, up to --cold-credentials (256)")
    ap.add_argument("--revocations", type=int, default=100, help="revocations timed (100)")
    ap.add_argument("--revocation-workers", type=int, default=4, help="gateway workers for the revocation lag (4)")
    ap.add_argument("--scale-credentials", type=int, default=1_000_000, help="rows for the store lookup (1000000)")
    ap.add_argument("--scale-lookups", type=int, default=5000, help="AUTH_LOOKUP queries timed (5000)")
    ap.add_argument("--memory-credentials", type=int, default=100_000, help="cached entries measured (100000)")
    ap.add_argument("--stream-mb", type=int, default=200, help="streamed body size in MB (200)")
    ap.add_argument("--profile", default="",
                    help="comma list of closed-loop scenarios to profile with py-spy in run 1 (needs py-spy)")
    ap.add_argument("--compare", default="",
                    help="another checkout with its own .venv: adds its cached-bearer row (credgate-bearer-base)")
    ap.add_argument("--lean-probe", default="",
                    help="path of the issue's lean_probe.py (../shared/bench/): adds its row, not credgate's")
    ap.add_argument("--embedded", action="store_true",
                    help="use embedded Postgres and Redis even when local ones answer on 5432/6379")
    ap.add_argument("--keep-access-log", action="store_true",
                    help="keep the whole gateway access logs (default: their last 1000 lines)")
    args = ap.parse_args()
    only = {p for p in args.only.split(",") if p}
    skip = {p for p in args.skip.split(",") if p}
    unknown = (only | skip) - set(PHASES)
    if unknown:
        ap.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    args.phases = [p for p in PHASES if (not only or p in only) and p not in skip]
    return args


def build_scenarios(backend: Nginx, sut_nginx: Nginx | None, gw1: Gateway, gw2: Gateway, gw_mix: Gateway,
                    creds: BenchCredentials, work: Path) -> list[Scenario]:
    bench_token = (("Authorization", "Bearer bench-token"),)
    bearer = (("Authorization", f"Bearer {creds.token}"),)
    pair = (("accessKey", creds.client_id), ("secretKey", creds.secret))
    basic = (("Authorization", "Basic " + base64.b64encode(f"{creds.client_id}:{creds.secret}".encode()).decode()),)

    def workers(gw: Gateway) -> list[int]:
        return list(gw.workers)

    def pids_of(nginx: Nginx) -> Callable[[], list[int]]:
        return lambda: nginx.pids

    scenarios = [
        Scenario("direct", f"http://127.0.0.1:{backend.ports['UPSTREAM_PORT']}/", bench_token, pids_of(backend),
                 "the upstream nginx itself"),
    ]
    if sut_nginx is not None:
        scenarios += [
            Scenario("nginx-proxy", f"http://127.0.0.1:{sut_nginx.ports['PROXY_PORT']}/", bench_token,
                     pids_of(sut_nginx), "nginx proxy_pass, upstream keep-alive"),
        ]
        if "FAUTH_PORT" in sut_nginx.ports:
            scenarios.append(Scenario(
                "nginx-authreq-credgate", f"http://127.0.0.1:{sut_nginx.ports['FAUTH_PORT']}/", bearer,
                lambda: [*sut_nginx.pids, *workers(gw1)],
                "nginx auth_request to credgate forward-auth (CPU of nginx + credgate)", must_reject=True))
        if "AUTHREQ_PORT" in sut_nginx.ports:
            scenarios.append(Scenario(
                "nginx-authreq", f"http://127.0.0.1:{sut_nginx.ports['AUTHREQ_PORT']}/", bench_token,
                pids_of(sut_nginx), "auth_request to an nginx auth service (AUX core, not counted)",
                must_reject=True))
    scenarios += [
        Scenario("credgate-none", f"{gw1.url}/open/", bearer, lambda: workers(gw1),
                 '1 worker, auth = "none" route (token sent, not checked)'),
        Scenario("credgate-bearer", f"{gw1.url}/", bearer, lambda: workers(gw1), "1 worker, cached bearer token",
                 must_reject=True),
        Scenario("credgate-bearer-limited", f"{gw1.url}/", (("Authorization", f"Bearer {creds.limited_token}"),),
                 lambda: workers(gw1), "1 worker, cached bearer token with a 1,000,000/minute limit",
                 must_reject=True),
        Scenario("credgate-bearer-signed", f"{gw1.url}/signed/", bearer, lambda: workers(gw1),
                 "1 worker, cached bearer token, Credgate-Identity signed (route identity_assertion)",
                 must_reject=True),
        Scenario("credgate-keypair", f"{gw1.url}/", pair, lambda: workers(gw1),
                 "1 worker, cached accessKey/secretKey", must_reject=True),
        Scenario("credgate-basic", f"{gw1.url}/", basic, lambda: workers(gw1), "1 worker, cached Basic key pair",
                 must_reject=True),
        bench_mix.scenario(gw_mix, creds, work),
        Scenario("credgate-bearer-2w", f"{gw2.url}/", bearer, lambda: workers(gw2),
                 "2 workers, one per core; wrk + upstream float over both cores", must_reject=True, spread=True),
    ]
    return scenarios


def compared(procs: Processes, env: dict[str, str], cpus: set[int], out: Path, tree: str,
             creds: BenchCredentials, gateways: list[Gateway], ports: tuple[int, int]) -> list[Scenario]:
    """With --compare TREE: the cached-bearer row for another checkout's code (its own .venv), interleaved
    with this tree's rows, so that a before/after comes from one run."""
    if not tree:
        return []
    python = str(Path(tree).resolve() / ".venv" / "bin" / "python")
    config = Path(env["CREDGATE_CONFIG"])
    older = bench_servers.write_config(config.with_name("credgate-base.toml"), *ports, signed=False)
    gw = bench_servers.start_gateway(procs, "gateway-base", {**env, "CREDGATE_CONFIG": str(older)}, workers=1,
                                     cpus=cpus, access_log=out / "access-base.log", python=python)
    gateways.append(gw)
    bearer = (("Authorization", f"Bearer {creds.token}"),)
    return [Scenario("credgate-bearer-base", f"{gw.url}/", bearer, lambda: list(gw.workers),
                     f"1 worker, cached bearer token, code of {tree}", must_reject=True)]


def main() -> int:
    args = parse_args()
    tools = bench_servers.ensure_tools()
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    out = HERE / "results" / stamp
    for sub in ("raw", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="credgate-bench-"))
    work.chmod(0o755)  # nginx workers and an embedded Postgres may run as other users
    procs = Processes(out / "logs")
    summary = Summary(out, args, " ".join(["make bench", *(["BENCH_ARGS=" + repr(" ".join(sys.argv[1:]))]
                                                        if sys.argv[1:] else [])]))

    def on_term(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # stop like Ctrl-C: everything ends, the partial summary is written

    signal.signal(signal.SIGTERM, on_term)
    # also when started in the background, where a shell may have set SIGINT to be ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    began = time.monotonic()
    stores = None
    gateways: list[Gateway] = []
    try:
        aux = {args.aux_cpu}
        summary.env = bench_servers.versions(tools)
        stores = bench_servers.open_stores(work, force_embedded=args.embedded)
        summary.env["stores"] = stores.description
        log(f"stores: {stores.description}")
        ports = {"UPSTREAM_PORT": bench_servers.free_port(), "AUTH_PORT": bench_servers.free_port()}
        backend = bench_servers.start_nginx(procs, tools["nginx"], work, "backend", ports, aux,
                                            stream_mb=args.stream_mb)
        sut_ports = dict(ports, PROXY_PORT=bench_servers.free_port())
        forward_auth_port = bench_servers.free_port()
        if bench_servers.nginx_has_auth_request(tools["nginx"]):
            sut_ports["AUTHREQ_PORT"] = bench_servers.free_port()
            sut_ports.update(FAUTH_PORT=bench_servers.free_port(), CREDGATE_FA_PORT=forward_auth_port)
        else:
            log("nginx lacks http_auth_request_module: the nginx-authreq row is left out")
        sut_nginx = bench_servers.start_nginx(procs, tools["nginx"], work, "sut", sut_ports, aux)
        sink_port = bench_servers.free_port()
        if "streaming" in args.phases:
            procs.start("sink", [sys.executable, "-m", "tests.bench.bench_sink", str(sink_port)], cpus=aux)
        config = bench_servers.write_config(work / "credgate.toml", ports["UPSTREAM_PORT"], sink_port)
        env = bench_servers.credgate_env(stores, config)
        creds = bench_servers.make_credentials(env)
        gw1 = bench_servers.start_gateway(procs, "gateway-1w", env, workers=1, cpus=aux,
                                          access_log=out / "access-1w.log",
                                          extra_env={"CREDGATE_FORWARD_AUTH_LISTEN": f"127.0.0.1:{forward_auth_port}"})
        gw2 = bench_servers.start_gateway(procs, "gateway-2w", env, workers=2, cpus=aux,
                                          access_log=out / "access-2w.log")
        gw_mix = bench_mix.start_gateway(procs, env, work, out, (ports["UPSTREAM_PORT"], sink_port), aux)
        gateways += [gw1, gw2, gw_mix]
        scenarios = build_scenarios(backend, sut_nginx, gw1, gw2, gw_mix, creds, work)
        scenarios += compared(procs, env, aux, out, args.compare, creds, gateways,
                              (ports["UPSTREAM_PORT"], sink_port))
        scenarios += bench_lean.rows(procs, args.lean_probe, ports["UPSTREAM_PORT"], aux)
        layout = Layout(args.sut_cpu, args.aux_cpu, lambda: backend.pids)
        scenarios = bench_loop.sanity_check(scenarios)
        scenarios = bench_mix.throttle_wrong_secret(scenarios, gw_mix, creds)
        summary.scenarios = scenarios
        profiled = [p for p in args.profile.split(",") if p]
        if profiled and bench_profile.py_spy() is None:
            log("--profile needs py-spy: .venv/bin/pip install py-spy")
            profiled = []
        if "closed" in args.phases:
            log(f"closed loop: {len(scenarios)} scenarios x {args.runs} interleaved runs x {args.duration:g} s")
            summary.closed = bench_loop.interleaved(
                scenarios, layout, runs=args.runs, conns=args.conns, threads=args.threads, seconds=args.duration,
                warmup=args.warmup, think_ms=0.0, raw_dir=out / "raw", profile=profiled, profile_dir=out)
            for name in profiled:
                raw = out / f"profile-{name}.txt"
                if raw.exists():
                    summary.further[f"Profile: {name} (py-spy, first worker, run 1)"] = [
                        f"Collapsed stacks: {raw.name}.", "", *bench_profile.summarize(raw)]
        if "paced" in args.phases:
            think = args.conns * 1000.0 / args.rate
            log(f"paced: ~{args.rate} req/s ({args.conns} connections, mean think time {think:g} ms)")
            summary.paced = bench_loop.interleaved(
                scenarios, layout, runs=args.paced_runs, conns=args.conns, threads=args.threads,
                seconds=args.duration, warmup=args.warmup, think_ms=think, raw_dir=out / "raw")
        further_figures(Running(args, summary, procs, stores, env, config, work, out, gw1, gw2, creds))
        summary.gateway_metrics = {gw.name: _metrics_digest(gw) for gw in gateways}
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        summary.notes.append("interrupted (Ctrl-C or SIGTERM): partial results")
        return_code = 130
    except Exception as exc:  # set-up or the proxy comparison failed: stop everything, keep what was measured
        traceback.print_exc()
        log(f"failed: {exc.__class__.__name__}; stopping everything")
        summary.notes.append(f"failed: {exc.__class__.__name__}: {str(exc)[:2000]}")
        return_code = 1
    else:
        return_code = 0
    finally:
        # a second Ctrl-C must not leave servers behind
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        if stores is not None:
            stores.close()
        shutil.rmtree(work, ignore_errors=True)
        for gw in gateways:
            _trim_access_log(gw.access_log, keep_all=args.keep_access_log)
    summary.evaluate_targets()
    summary.elapsed = time.monotonic() - began
    summary.date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = summary.write()
    print("\n" + text)
    log(f"results in {out}")
    return return_code


def _metrics_digest(gw: Gateway) -> dict[str, float]:
    names = ("credgate_requests_total", "credgate_argon2_verifications_total", "credgate_invalidations_total")
    digest = {}
    for name in names:
        try:
            digest[name] = bench_servers.scrape(gw.metrics_port, name)
        except OSError:
            continue
    return digest


def _trim_access_log(path: Path, keep_all: bool) -> None:
    """The access log is on for every measurement; keep its line count and last 1000 lines, not ~100 MB."""
    if keep_all or not path.exists():
        return
    lines = 0
    tail: list[bytes] = []
    with open(path, "rb") as f:
        for line in f:
            lines += 1
            tail.append(line)
            if len(tail) > 2000:
                del tail[:1000]
    path.with_suffix(".tail.log").write_bytes(b"".join(tail[-1000:]))
    path.with_suffix(".count").write_text(json.dumps({"lines": lines}) + "\n")
    path.unlink()


if __name__ == "__main__":
    sys.exit(main())
