"""The proxy comparison: interleaved wrk runs (A B A B ...) over scenarios, each SUT pinned and CPU-accounted,
closed loop (saturation) or paced (about N req/s), and the tables built from them."""

from __future__ import annotations

import statistics
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench import bench_procs, bench_profile
from tests.bench.bench_servers import log
from tests.bench.bench_wrk import REPORT_LUA, Load, WrkResult, run_wrk

REFERENCE = "nginx-proxy"
DIRECT = "direct"


@dataclass(frozen=True)
class Scenario:
    name: str
    url: str
    headers: tuple[tuple[str, str], ...]
    sut: Callable[[], list[int]]  # the processes under test (pinned, CPU-accounted)
    note: str
    must_reject: bool = False  # an auth scenario: a missing or malformed credential must get 401/403
    spread: bool = False  # two workers: one per core, wrk and the backend float over both cores
    script: Path = REPORT_LUA  # the wrk script; one that counts statuses (mix.lua) makes them part of the row
    env: tuple[tuple[str, str], ...] = ()  # for the script
    answers: frozenset[int] = frozenset()  # statuses >= 400 the scenario asks for: answers, not errors


@dataclass(frozen=True)
class Layout:
    sut_cpu: int
    aux_cpu: int
    backend: Callable[[], list[int]]  # backend nginx (upstream + nginx auth service): lives on the AUX core


def http_get(url: str, headers: Sequence[tuple[str, str]]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=dict(headers))  # noqa: S310 - http://127.0.0.1 only
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError as exc:
        return -1, repr(exc).encode()


def sanity_check(scenarios: Sequence[Scenario]) -> list[Scenario]:
    """Scenarios that answer 200 "ok" with their credential and, when they must, 401/403 without or with junk."""
    good = []
    for s in scenarios:
        status, body = http_get(s.url, s.headers)
        ok = status == 200 and body.strip() == b"ok"
        detail = f"credential={status}"
        if s.must_reject:
            none, _ = http_get(s.url, [])
            junk, _ = http_get(s.url, [("Authorization", "Bearer wrong")])
            ok = ok and none in (401, 403) and junk in (401, 403)
            detail += f" none={none} junk={junk}"
        log(f"check {s.name}: {detail} -> {'OK' if ok else 'FAIL (dropped)'}")
        if ok:
            good.append(s)
    return good


def _place(s: Scenario, layout: Layout, pids: list[int]) -> str:
    """Pin the SUT for a measurement; returns the cores wrk runs on."""
    if s.spread:
        for i, pid in enumerate(pids):
            bench_procs.pin([pid], {(layout.sut_cpu, layout.aux_cpu)[i % 2]})
        bench_procs.pin(layout.backend(), {layout.sut_cpu, layout.aux_cpu})
        return f"{layout.sut_cpu},{layout.aux_cpu}"
    bench_procs.pin(pids, {layout.sut_cpu})
    return str(layout.aux_cpu)


def _restore(s: Scenario, layout: Layout, pids: list[int]) -> None:
    bench_procs.pin(pids, {layout.aux_cpu})
    if s.spread:
        bench_procs.pin(layout.backend(), {layout.aux_cpu})


def measure(s: Scenario, layout: Layout, *, run: int, conns: int, threads: int, seconds: float, warmup: float,
            think_ms: float, raw_dir: Path, profile_to: Path | None = None) -> dict[str, Any] | None:
    """One measured wrk run of s (after a warm-up); profile_to: py-spy the first SUT process meanwhile."""
    pids = s.sut()
    wrk_cpus = _place(s, layout, pids)
    profiler = None
    try:
        time.sleep(0.2)
        load = Load(conns=conns, threads=threads, cpus=wrk_cpus, think_ms=think_ms)
        if warmup > 0:
            run_wrk(s.url, load, warmup, headers=s.headers, script=s.script, env=dict(s.env))
        if profile_to is not None:
            profiler = bench_profile.start(pids[0], seconds, profile_to, str(layout.aux_cpu))
        cores_before, cpu_before, wall_before = bench_procs.cpu_times(), bench_procs.cpu_ns(pids), time.monotonic()
        result = run_wrk(s.url, load, seconds, headers=s.headers, script=s.script, env=dict(s.env),
                         raw_out=raw_dir / f"{s.name}.{'paced' if think_ms else 'closed'}.run{run}.txt")
        cores_after, cpu_after, wall = bench_procs.cpu_times(), bench_procs.cpu_ns(pids), time.monotonic() - wall_before
    finally:
        if profiler is not None:
            try:
                profiler.wait(30)
            except subprocess.TimeoutExpired:
                profiler.kill()
                profiler.wait()
        _restore(s, layout, pids)
    if result is None:
        log(f"run{run} {s.name}: wrk printed no result (see raw/)")
        return None
    sut_busy, _ = bench_procs.core_usage(cores_before, cores_after, f"cpu{layout.sut_cpu}")
    aux_busy, _ = bench_procs.core_usage(cores_before, cores_after, f"cpu{layout.aux_cpu}")
    _, steal = bench_procs.core_usage(cores_before, cores_after, "cpu")
    # what else ran on the SUT core (other users of this shared machine): its busy time minus the SUT's own
    sut_share = 100.0 * (cpu_after - cpu_before) / 1e9 / wall / (2 if s.spread else 1)
    others = None if s.spread else round(max(0.0, sut_busy - sut_share), 1)
    row: dict[str, Any] = {
        "run": run, "scenario": s.name, "mode": "paced" if think_ms else "closed", "wrk_cpus": wrk_cpus,
        "requests": result.requests, "rps": result.rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
        "errors": _errors(s, result), "sut_pids": len(pids),
        "sut_cpu_us_per_req": (cpu_after - cpu_before) / 1000 / max(1, result.requests),
        "sut_core_busy": round(sut_busy, 1), "aux_core_busy": round(aux_busy, 1), "steal_pct": round(steal, 2),
        "sut_core_others_pct": others,
        "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
    }
    if result.statuses:
        row["statuses"] = {str(code): count for code, count in sorted(result.statuses.items())}
    log(f"run{run} {row['mode']} {s.name:24s} {result.rps:9.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
        f"p99 {result.p99_ms:6.2f} ms  cpu {row['sut_cpu_us_per_req']:6.1f} us/req  errors {row['errors']}  "
        f"core{layout.sut_cpu} {row['sut_core_busy']}% (others {_pct(others)}) "
        f"core{layout.aux_cpu} {row['aux_core_busy']}% steal {row['steal_pct']}%"
        + (f"  statuses {row['statuses']}" if "statuses" in row else ""))
    return row


def _errors(s: Scenario, result: WrkResult) -> int:
    """Socket errors and error statuses, except those the scenario asks for (when its script counts them)."""
    if not result.statuses:
        return result.errors
    return result.socket_errors + sum(n for code, n in result.statuses.items() if code >= 400 and code not in s.answers)


def interleaved(scenarios: Sequence[Scenario], layout: Layout, *, runs: int, conns: int, threads: int,
                seconds: float, warmup: float, think_ms: float, raw_dir: Path,
                profile: Sequence[str] = (), profile_dir: Path | None = None) -> list[dict[str, Any]]:
    """Run 1 of every scenario, then run 2, ...: drift on this shared machine hits every scenario alike.
    Scenarios named in profile are profiled with py-spy in run 1 (profile_dir/profile-<name>.txt)."""
    rows = []
    for run in range(1, runs + 1):
        for s in scenarios:
            profile_to = None
            if run == 1 and s.name in profile and profile_dir is not None:
                profile_to = profile_dir / f"profile-{s.name}{'-paced' if think_ms else ''}.txt"
            row = measure(s, layout, run=run, conns=conns, threads=threads, seconds=seconds, warmup=warmup,
                          think_ms=think_ms, raw_dir=raw_dir, profile_to=profile_to)
            if row is not None:
                rows.append(row)
    return rows


# --- tables -----------------------------------------------------------------------------------------------


def by_scenario(rows: Sequence[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        by.setdefault(row["scenario"], {})[row["run"]] = row
    return by


def same_run_ratio(by: dict[str, dict[int, dict[str, Any]]], name: str, ref: str, key: str = "rps") -> float | None:
    """Median over runs of name/ref measured in the same run."""
    ratios = [r[key] / by[ref][run][key] for run, r in by.get(name, {}).items()
              if run in by.get(ref, {}) and by[ref][run][key]]
    return statistics.median(ratios) if ratios else None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value}%"


def _others(rows: Sequence[dict[str, Any]]) -> str:
    values = [r["sut_core_others_pct"] for r in rows if r.get("sut_core_others_pct") is not None]
    return " / ".join(f"{v:.0f}" for v in values) if values else "-"


def _median(rows: Sequence[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def cpu_ratio(by: dict[str, dict[int, dict[str, Any]]], name: str, ref: str) -> float | None:
    """'x ref by CPU': median over runs of ref's CPU per request / name's (same run), the throughput ratio if
    each had its core to itself."""
    key = "sut_cpu_us_per_req"
    ratios = [by[ref][run][key] / r[key] for run, r in by.get(name, {}).items() if run in by.get(ref, {}) and r[key]]
    return statistics.median(ratios) if ratios else None


def cpu_cost(by: dict[str, dict[int, dict[str, Any]]], name: str, ref: str) -> float | None:
    """Median over runs of name's CPU per request / ref's (same run): 'x the CPU per request of ref'."""
    return same_run_ratio(by, name, ref, "sut_cpu_us_per_req")


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def closed_table(scenarios: Sequence[Scenario], rows: Sequence[dict[str, Any]]) -> list[str]:
    by = by_scenario(rows)
    lines = ["| scenario | req/s (median) | req/s per run | p50 ms | p99 ms | SUT CPU µs/req | x nginx-proxy | "
             "x direct | x nginx-proxy by CPU | others on SUT core % | errors | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in scenarios:
        runs = [by[s.name][k] for k in sorted(by.get(s.name, {}))]
        if not runs:
            continue
        per_run = " / ".join(f"{r['rps']:.0f}" for r in runs)
        lines.append(
            f"| {s.name} | {_median(runs, 'rps'):.0f} | {per_run} | {_median(runs, 'p50_ms'):.2f} | "
            f"{_median(runs, 'p99_ms'):.2f} | {_median(runs, 'sut_cpu_us_per_req'):.1f} | "
            f"{_fmt(same_run_ratio(by, s.name, REFERENCE))} | "
            f"{_fmt(same_run_ratio(by, s.name, DIRECT))} | {_fmt(cpu_ratio(by, s.name, REFERENCE))} | "
            f"{_others(runs)} | {sum(r['errors'] for r in runs)} | "
            f"{s.note} |")
    return lines


def paced_table(scenarios: Sequence[Scenario], rows: Sequence[dict[str, Any]], rate: int) -> list[str]:
    by = by_scenario(rows)
    lines = [f"| scenario (offered ~{rate} req/s) | req/s | p50 ms | p99 ms | added p50 ms over direct | "
             "added p99 ms over direct | SUT CPU µs/req | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for s in scenarios:
        runs = by.get(s.name, {})
        if not runs:
            continue
        values = list(runs.values())

        def added(key: str, runs: dict[int, dict[str, Any]] = runs) -> float | None:
            deltas = [r[key] - by[DIRECT][run][key] for run, r in runs.items() if run in by.get(DIRECT, {})]
            return statistics.median(deltas) if deltas else None

        lines.append(f"| {s.name} | {_median(values, 'rps'):.0f} | {_median(values, 'p50_ms'):.2f} | "
                     f"{_median(values, 'p99_ms'):.2f} | {_fmt(added('p50_ms'))} | {_fmt(added('p99_ms'))} | "
                     f"{_median(values, 'sut_cpu_us_per_req'):.1f} | "
                     f"{sum(r['errors'] for r in values)} |")
    return lines
