"""The further figures of `make bench`: cold path, revocation lag, streaming, store lookup at scale and memory
per cached credential; each bounded in time, and a failure of one is reported without losing the others."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from tests.bench import (
    bench_bulk,
    bench_coldpath,
    bench_memory,
    bench_procs,
    bench_revocation,
    bench_scale,
    bench_servers,
    bench_streaming,
)
from tests.bench.bench_coldpath import ColdRun
from tests.bench.bench_procs import Processes
from tests.bench.bench_servers import BenchCredentials, Gateway, Stores, log
from tests.bench.bench_summary import Summary


@dataclass
class Running:
    """What the harness has running once the proxy comparison is set up."""

    args: argparse.Namespace
    summary: Summary
    procs: Processes
    stores: Stores
    env: dict[str, str]
    config: Path
    work: Path
    out: Path
    gw1: Gateway
    gw2: Gateway
    creds: BenchCredentials


def further_figures(r: Running) -> None:
    """Cold path, revocation lag, streaming, scale and memory, each bounded; a failure is reported, not fatal."""
    args, summary, procs, work, out, gw1, gw2 = r.args, r.summary, r.procs, r.work, r.out, r.gw1, r.gw2
    database_url, redis_url = r.stores.database_url, r.stores.redis_url
    sut, aux = {args.sut_cpu}, {args.aux_cpu}
    params = bench_bulk.argon2_params(bench_bulk.bench_settings(r.env, r.config))
    # the mix row's wrong secret left failures of 127.0.0.1 counted in Redis (for an hour): they would count
    # against the cold path's concurrent verifications from the same address
    cleared = bench_servers.clear_failure_counts(redis_url)
    if cleared:
        log(f"deleted {cleared} failure throttle counters from Redis (the mix row's wrong secret)")

    def cold() -> None:
        log(f"cold path: {args.cold_credentials} key pairs, {args.cold_secrets} distinct secrets to hash")
        pairs, hashing_seconds = bench_coldpath.prepare(database_url, params, args.cold_credentials,
                                                        args.cold_secrets, work)
        half = len(pairs) // 2
        runs = [
            (ColdRun(f"1 worker (core {args.sut_cpu}), each credential once", gw1, {0: sut}, str(args.aux_cpu), 1),
             pairs[:half]),
            (ColdRun("2 workers (one per core), each credential 4x in a row", gw2, {0: sut, 1: aux},
                     f"{args.sut_cpu},{args.aux_cpu}", 4), pairs[half:]),
        ]
        # argon2-bound: tens of req/s, seconds of queueing at 50 connections; 10 s keeps the edges small
        seconds = max(args.duration, 10.0)
        figures = [bench_coldpath.measure(run, chunk, conns=args.conns, seconds=seconds, work=work,
                                          aux_cpu=args.aux_cpu, raw_dir=out / "raw", redis_url=redis_url)
                   for run, chunk in runs]
        summary.figures["cold"] = figures
        summary.further["Cold path"] = bench_coldpath.section(
            figures, len(pairs), min(args.cold_secrets, len(pairs)), hashing_seconds, conns=args.conns,
            seconds=seconds)

    def revocation() -> None:
        log(f"revocation lag: {args.revocation_workers} workers, {args.revocations} revocations")
        gw = bench_servers.start_gateway(procs, f"gateway-{args.revocation_workers}w", r.env,
                                         workers=args.revocation_workers, cpus=None,
                                         access_log=work / "access-revocation.log",
                                         extra_env={"CREDGATE_DEBUG_WORKER_HEADER": "1",
                                                    "CREDGATE_GATEWAY_ACCESS_LOG": "off"})
        try:
            figure = bench_revocation.run(gw, database_url, params, args.revocations)
        finally:
            procs.stop(gw.process)
        summary.figures["revocation"] = figure
        summary.further["Revocation lag"] = bench_revocation.section(figure)

    def streaming() -> None:
        log(f"streaming: {args.stream_mb} MB up and down through one worker")
        figure = bench_streaming.run(gw1, r.creds.token, args.stream_mb, sut)
        bench_procs.pin(gw1.workers, aux)
        summary.figures["streaming"] = figure
        summary.further["Streaming"] = bench_streaming.section(figure, args.stream_mb)

    def scale() -> None:
        log(f"scale: loading {args.scale_credentials} credentials")
        figure = bench_scale.run(database_url, args.scale_credentials, args.scale_lookups)
        summary.figures["scale"] = figure
        summary.further["Scale: store lookup"] = bench_scale.section(figure)

    def memory() -> None:
        log(f"memory: {args.memory_credentials} cached credentials")
        figure = bench_memory.run(args.memory_credentials)
        summary.figures["memory"] = figure
        summary.further["Scale: memory per cached credential"] = bench_memory.section(figure)

    steps = [("cold", "Cold path", cold), ("revocation", "Revocation lag", revocation),
             ("streaming", "Streaming", streaming), ("scale", "Scale: store lookup", scale),
             ("memory", "Scale: memory per cached credential", memory)]
    for phase, title, step in steps:
        if phase not in args.phases:
            continue
        began = time.monotonic()
        try:
            step()
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # one failed figure must not lose the others
            log(f"{phase} failed: {exc.__class__.__name__}: {exc}")
            summary.further[title] = [f"failed: {exc.__class__.__name__}: {exc}"]
        summary.figures.setdefault("seconds", {})[phase] = round(time.monotonic() - began, 1)
