"""wrk as the load generator: one bounded run, pinned with taskset, parsed from the RESULT line of report.lua
(and the STATUSES line of mix.lua, when it runs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CONF = Path(__file__).resolve().parent / "conf"
REPORT_LUA = CONF / "report.lua"
ROTATE_LUA = CONF / "rotate.lua"
MIX_LUA = CONF / "mix.lua"


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors + non-2xx/3xx answers
    raw: dict[str, float]
    statuses: dict[int, int]  # answers per status; only from a script that counts them (mix.lua), else empty

    @property
    def socket_errors(self) -> int:
        r = self.raw
        return int(r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"])


@dataclass(frozen=True, slots=True)
class Load:
    """How wrk drives a target: connections, threads, the core(s) it runs on, pacing."""

    conns: int
    threads: int
    cpus: str  # taskset list, e.g. "1" or "0,1"
    think_ms: float = 0.0  # > 0: paced (see report.lua)


def rotation_script(out_dir: Path) -> Path:
    """report.lua + rotate.lua in one file (wrk takes a single script)."""
    path = out_dir / "wrk-rotate.lua"
    path.write_text(REPORT_LUA.read_text() + "\n" + ROTATE_LUA.read_text())
    return path


def mix_script(out_dir: Path) -> Path:
    """report.lua + mix.lua in one file."""
    path = out_dir / "wrk-mix.lua"
    path.write_text(REPORT_LUA.read_text() + "\n" + MIX_LUA.read_text())
    return path


def run_wrk(
    url: str,
    load: Load,
    seconds: float,
    *,
    headers: Sequence[tuple[str, str]] = (),
    script: Path = REPORT_LUA,
    env: Mapping[str, str] | None = None,
    raw_out: Path | None = None,
) -> WrkResult | None:
    """One wrk run; None when it printed no result (its output is in raw_out)."""
    cmd = ["taskset", "-c", load.cpus, "wrk", "-t", str(load.threads), "-c", str(load.conns),
           "-d", f"{max(1, round(seconds))}s", "--timeout", "10s", "--latency", "-s", str(script)]
    for name, value in headers:
        cmd += ["-H", f"{name}: {value}"]
    cmd.append(url)
    run_env = dict(os.environ)
    run_env.update(env or {})
    run_env["WRK_THINK_MS"] = f"{load.think_ms:g}"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, env=run_env, check=False)
    text = done.stdout + done.stderr
    if raw_out is not None:
        # the command line carries credentials: keep the output only
        raw_out.write_text(text)
    return parse(text)


def parse(text: str) -> WrkResult | None:
    match = re.search(r"^RESULT (\{.*\})$", text, re.M)
    if match is None:
        return None
    r = json.loads(match.group(1))
    errors = r["err_connect"] + r["err_read"] + r["err_write"] + r["err_status"] + r["err_timeout"]
    counted = re.search(r"^STATUSES (\{.*\})$", text, re.M)
    statuses = {int(k): int(v) for k, v in json.loads(counted.group(1)).items()} if counted else {}
    return WrkResult(
        requests=int(r["requests"]),
        seconds=r["duration_us"] / 1e6,
        rps=float(r["rps"]),
        p50_ms=r["p50_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        errors=int(errors),
        raw=r,
        statuses=statuses,
    )
