"""summary.md and results.jsonl of one `make bench`: the tables, the further figures and the targets, met or not."""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench import bench_loop
from tests.bench.bench_loop import Scenario


@dataclass
class Target:
    name: str
    figure: str
    met: bool | None  # None: not measured in this run


@dataclass
class Summary:
    out: Path
    args: argparse.Namespace
    command: str
    date: str = ""
    elapsed: float = 0.0
    env: dict[str, str] = field(default_factory=dict)
    scenarios: Sequence[Scenario] = ()
    closed: list[dict[str, Any]] = field(default_factory=list)
    paced: list[dict[str, Any]] = field(default_factory=list)
    further: dict[str, list[str]] = field(default_factory=dict)  # section title -> markdown lines
    figures: dict[str, Any] = field(default_factory=dict)  # machine-readable further figures
    targets: list[Target] = field(default_factory=list)
    gateway_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def write(self) -> str:
        with open(self.out / "results.jsonl", "w") as f:
            for row in [*self.closed, *self.paced]:
                f.write(json.dumps(row) + "\n")
            f.write(json.dumps({"figures": self.figures, "gateway_metrics": self.gateway_metrics}) + "\n")
        (self.out / "env.json").write_text(json.dumps({"env": self.env, "args": vars(self.args)}, indent=2) + "\n")
        text = "\n".join(self._lines()) + "\n"
        (self.out / "summary.md").write_text(text)
        return text

    def _lines(self) -> list[str]:
        a = self.args
        lines = [
            f"# credgate benchmark, {self.date}",
            "",
            f"Command: `{self.command}` ({self.elapsed:.0f} s). Machine: {self.env.get('cpus', '?')} cores, "
            f"kernel {self.env.get('kernel', '?')}, load average at start {self.env.get('loadavg', '?')}; "
            f"{self.env.get('nginx', '')}, {self.env.get('wrk', '')}; {self.env.get('stores', '')}.",
            "",
        ]
        if self.closed:
            lines += [
                "## Closed loop",
                "",
                f"wrk -t{a.threads} -c{a.conns}, {a.runs} interleaved runs (A B A B ...) x {a.duration:g} s "
                f"(+{a.warmup:g} s warm-up). The SUT (every thread of its processes) is pinned to core {a.sut_cpu}; "
                f"wrk and the upstream nginx (which also serves the nginx auth service) run on core {a.aux_cpu}, "
                "except in the 2-worker row (see its note). Medians over runs; ratios are medians of same-run "
                "ratios. SUT CPU is the on-CPU time of the SUT's threads (schedstat) per completed request: "
                "the gateway's workers, not its idle supervisor. credgate runs with metrics and the access log "
                "(to a file) on. 'others on SUT core' is the SUT core's busy time not spent by the SUT (other "
                "users of this shared machine, interrupts), per run: high values mean a contaminated run. "
                "'x nginx-proxy by CPU' compares CPU per request instead of req/s (same run): what the "
                "throughput ratio would be if each SUT had its core to itself.",
                "",
                *bench_loop.closed_table(self.scenarios, self.closed),
                "",
                *self._closed_notes(),
                "",
            ]
        if self.paced:
            lines += [
                "## Paced",
                "",
                f"The same wrk with an exponential think time per connection (mean {a.conns * 1000 / a.rate:g} ms), "
                f"so about {a.rate} req/s arrive spread out; {a.paced_runs} interleaved run(s) x {a.duration:g} s. "
                "Added latency is the row minus direct in the same run.",
                "",
                *bench_loop.paced_table(self.scenarios, self.paced, a.rate),
                "",
            ]
        for title, section in self.further.items():
            lines += [f"## {title}", "", *section, ""]
        if self.targets:
            lines += ["## Targets (issue 7)", "", "| target | figure | met |", "|---|---|---|"]
            for t in self.targets:
                met = "not measured" if t.met is None else ("yes" if t.met else "**no**")
                lines.append(f"| {t.name} | {t.figure} | {met} |")
            lines.append("")
        if self.notes:
            lines += ["## Notes", "", *[f"- {n}" for n in self.notes], ""]
        return lines

    def _closed_notes(self) -> list[str]:
        by: dict[str, dict[int, dict[str, Any]]] = {}
        for row in self.closed:
            by.setdefault(row["scenario"], {})[row["run"]] = row
        out = []
        for name, ref, what in (
            ("credgate-bearer", "credgate-none", "cached bearer vs auth none, same gateway"),
            ("credgate-keypair", "credgate-none", "cached key pair vs auth none"),
            ("credgate-basic", "credgate-none", "cached Basic vs auth none"),
            ("credgate-bearer-2w", "credgate-bearer", "2 workers vs 1 worker (bearer)"),
        ):
            ratio = bench_loop.same_run_ratio(by, name, ref)
            if ratio is not None:
                out.append(f"- {name} / {ref}: {ratio:.2f} ({what})")
        others = [r["sut_core_others_pct"] for r in self.closed if r.get("sut_core_others_pct") is not None]
        if others and statistics.median(others) > 20:
            out.append(f"- **contaminated run**: other processes took a median {statistics.median(others):.0f} % of "
                       "the SUT core during the measurements (max "
                       f"{max(others):.0f} %); req/s and their ratios are unreliable, CPU per request less so. "
                       "Rerun on a quiet machine, or with --runs 5 and more.")
        steal = [r["steal_pct"] for r in self.closed]
        if steal:
            out.append(f"- steal time per run: median {statistics.median(steal):.1f} %, max {max(steal):.1f} %; "
                       "the machine is shared, so treat differences under ~15 % as noise")
        return out

    def evaluate_targets(self) -> None:
        """The issue's targets, each from figures of this run (None where this run did not measure it)."""
        by: dict[str, dict[int, dict[str, Any]]] = {}
        for row in self.closed:
            by.setdefault(row["scenario"], {})[row["run"]] = row
        ratio = bench_loop.same_run_ratio
        costs = {name: ratio(by, name, "credgate-none")
                 for name in ("credgate-bearer", "credgate-keypair", "credgate-basic")}
        known = [v for v in costs.values() if v is not None]
        self.targets.append(Target(
            "cached auth costs <= 5 % throughput vs auth none (same gateway)",
            ", ".join(f"{k.removeprefix('credgate-')} {v:.2f}x" for k, v in costs.items() if v is not None) or "-",
            min(known) >= 0.95 if known else None))
        vs_nginx = ratio(by, "credgate-bearer", bench_loop.REFERENCE)
        cpu = [r["sut_cpu_us_per_req"] for r in by.get("credgate-bearer", {}).values()]
        cpu_med = statistics.median(cpu) if cpu else None
        cpu_ratio = bench_loop.same_run_ratio(by, "credgate-bearer", bench_loop.REFERENCE, "sut_cpu_us_per_req")
        by_cpu = "" if not cpu_ratio else f" (by CPU per request {1 / cpu_ratio:.2f}x)"
        self.targets.append(Target(
            "1 worker, cached bearer, metrics + access log on: >= 0.5x nginx-proxy",
            "-" if vs_nginx is None else f"{vs_nginx:.2f}x{by_cpu}", None if vs_nginx is None else vs_nginx >= 0.5))
        self.targets.append(Target(
            "... at most about 50 µs CPU per request",
            "-" if cpu_med is None else f"{cpu_med:.0f} µs", None if cpu_med is None else cpu_med <= 55))
        limited = bench_loop.same_run_ratio(by, "credgate-bearer-limited", "credgate-bearer", "sut_cpu_us_per_req")
        self.targets.append(Target(
            "cached bearer with a 1,000,000/minute limit: <= 15 % more CPU per request than without",
            "-" if limited is None else f"{limited:.2f}x", None if limited is None else limited <= 1.15))
        signed = bench_loop.same_run_ratio(by, "credgate-bearer-signed", "credgate-bearer", "sut_cpu_us_per_req")
        self.targets.append(Target(
            "cached bearer with Credgate-Identity signed: <= 10 % more CPU per request than without",
            "-" if signed is None else f"{signed:.2f}x", None if signed is None else signed <= 1.10))
        forward = bench_loop.same_run_ratio(by, "nginx-authreq-credgate", "nginx-authreq", "sut_cpu_us_per_req")
        self.targets.append(Target(
            "nginx auth_request -> credgate forward-auth, CPU of nginx + credgate vs nginx's own auth service",
            "-" if forward is None else f"{forward:.2f}x the CPU per request", None))
        scale = ratio(by, "credgate-bearer-2w", "credgate-bearer")
        self.targets.append(Target(
            "2 workers on 2 cores >= 1.8x one worker (wrk shares the cores: 2 cores only)",
            "-" if scale is None else f"{scale:.2f}x", None if scale is None else scale >= 1.8))
        paced: dict[str, dict[int, dict[str, Any]]] = {}
        for row in self.paced:
            paced.setdefault(row["scenario"], {})[row["run"]] = row
        added = [r["p99_ms"] - paced[bench_loop.DIRECT][run]["p99_ms"]
                 for run, r in paced.get("credgate-bearer", {}).items() if run in paced.get(bench_loop.DIRECT, {})]
        added_med = statistics.median(added) if added else None
        self.targets.append(Target(
            f"paced ~{self.args.rate} req/s: credgate (bearer) adds <= 1 ms p99 over direct",
            "-" if added_med is None else f"{added_med:+.2f} ms", None if added_med is None else added_med <= 1.0))
        rev = self.figures.get("revocation")
        self.targets.append(Target(
            "revocation lag p99 <= 100 ms across 4 workers",
            "-" if not rev else f"p99 {rev['p99_ms']:.1f} ms ({rev['workers']} workers, {rev['timeouts']} timeouts)",
            None if not rev else rev["p99_ms"] <= 100 and rev["timeouts"] == 0))
        cold = self.figures.get("cold") or []
        if cold:
            parts = [f"{f['argon2_verifications']} verifications for {f['credentials_verified']} credentials "
                     f"({f['workers']}w, {f['repeat']}x each)" for f in cold]
            exact = all(f["argon2_verifications"] == f["credentials_verified"] for f in cold)
            self.targets.append(Target("exactly one argon2 verification per credential across workers (Redis up)",
                                       "; ".join(parts), exact))
        else:
            self.targets.append(Target("exactly one argon2 verification per credential across workers (Redis up)",
                                       "-", None))
