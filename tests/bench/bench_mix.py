"""The mix row (credgate-mix): the traffic operators run, in one closed-loop row like the others.

Per 20 requests (conf/mix.lua, a fixed cycle, so the shares are exact): 18 with the cached valid bearer token,
1 with a well-formed token of a real credential and a wrong secret, 1 with no credential; spread evenly over
three protected routes to the same backend (bench_servers.MIX_ROUTES).

The wrong secret meets the failure throttle (gateway/throttle.py). It counts argon2 runs per (credential id,
client address), per address and per id; past `max_failures` (10) in a window that address gets 429 for that id
only, with no argon2 run. Every wrk connection comes from 127.0.0.1, so a repeated wrong secret is, after 10
failures, a 429: the steady state of a client that kept a wrong or rotated secret. The valid token is answered
from memory and never reaches the throttle, so it is not blocked; the wrong secret is of its own credential
("bench-stale"), so the valid credential's counters stay at zero.

The row runs on a gateway of its own ("gateway-mix", 1 worker, the same config) whose only difference is a
throttle window of an hour: before the runs the harness sends the wrong secret until the throttle answers 429
(10 argon2 runs), and no window ends during a measurement (with the default 60 s one, a new window opening
within a 5 s run would add 10 argon2 runs, some 300 ms of CPU, to that run only). The other gateways do not
share its in-memory counts; the shared ones in Redis are deleted after the closed and paced phases
(bench_servers.clear_failure_counts), so the cold path's concurrent verifications are not held against them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.bench import bench_servers
from tests.bench.bench_coldpath import ARGON2_METRIC
from tests.bench.bench_loop import Scenario, http_get
from tests.bench.bench_procs import Processes
from tests.bench.bench_servers import MIX_ROUTES, BenchCredentials, Gateway, log
from tests.bench.bench_wrk import mix_script

NAME = "credgate-mix"
THROTTLE_WINDOW = 3600.0  # seconds: longer than any bench run
MAX_WRONG = 60  # attempts before giving up on seeing the throttle answer 429


def start_gateway(
    procs: Processes, env: dict[str, str], work: Path, out: Path, ports: tuple[int, int], cpus: set[int]
) -> Gateway:
    """The mix row's own 1-worker gateway: the bench config with an hour-long throttle window."""
    config = bench_servers.write_config(work / "credgate-mix.toml", *ports, throttle_window=THROTTLE_WINDOW)
    env = {**env, "CREDGATE_CONFIG": str(config)}
    return bench_servers.start_gateway(
        procs, "gateway-mix", env, workers=1, cpus=cpus, access_log=out / "access-mix.log"
    )


def scenario(gw: Gateway, creds: BenchCredentials, work: Path) -> Scenario:
    paths = ",".join(f"{prefix}/" for prefix in MIX_ROUTES)
    return Scenario(
        NAME,
        f"{gw.url}{MIX_ROUTES[0]}/",
        (("Authorization", f"Bearer {creds.token}"),),  # the sanity check's request; the script sets its own
        lambda: list(gw.workers),
        "1 worker (own gateway), every 20 requests: 18 cached bearer, 1 wrong secret (429 once throttled), "
        "1 no credential (401); 3 routes",
        must_reject=True,
        script=mix_script(work),
        env=(("WRK_MIX_TOKEN", creds.token), ("WRK_MIX_WRONG", creds.wrong_token), ("WRK_MIX_PATHS", paths)),
        answers=frozenset({401, 429}),
    )


def throttle_wrong_secret(scenarios: Sequence[Scenario], gw: Gateway, creds: BenchCredentials) -> list[Scenario]:
    """Send the wrong secret until the throttle answers 429, checking that each 401 before it ran argon2 (a
    well-formed token of a real credential, not one refused unread). The mix row is dropped when not."""
    if not any(s.name == NAME for s in scenarios):
        return list(scenarios)
    url = f"{gw.url}{MIX_ROUTES[0]}/"
    statuses: list[int] = []
    try:
        before = bench_servers.scrape(gw.metrics_port, ARGON2_METRIC)
        while len(statuses) < MAX_WRONG and 429 not in statuses:
            statuses.append(http_get(url, [("Authorization", f"Bearer {creds.wrong_token}")])[0])
        failures = statuses.count(401)
        verified = _settled(gw.metrics_port, before, failures)
    except OSError as exc:  # the metrics listener did not answer
        log(f"check {NAME} wrong secret: {exc.__class__.__name__}: {exc} -> FAIL (dropped)")
        return [s for s in scenarios if s.name != NAME]
    ok = statuses[-1] == 429 and failures == len(statuses) - 1 and verified == failures
    log(
        f"check {NAME} wrong secret: {failures} x 401 then {statuses[-1]}, {verified:.0f} argon2 verifications "
        f"-> {'OK' if ok else 'FAIL (dropped)'}"
    )
    return [s for s in scenarios if ok or s.name != NAME]


def _settled(metrics_port: int, before: float, expected: int, limit: float = 5.0) -> float:
    """The argon2 count since `before`, once it reached `expected` or stopped moving (metrics publish in batches)."""
    deadline = time.monotonic() + limit
    seen = bench_servers.scrape(metrics_port, ARGON2_METRIC) - before
    while seen < expected and time.monotonic() < deadline:
        time.sleep(0.25)
        seen = bench_servers.scrape(metrics_port, ARGON2_METRIC) - before
    return seen


def status_notes(rows: Sequence[dict[str, Any]], mode: str) -> list[str]:
    """Per run, the statuses the mix row's requests got, with their shares."""
    runs = sorted((r for r in rows if r["scenario"] == NAME and "statuses" in r), key=lambda r: int(r["run"]))
    if not runs:
        return []
    parts = []
    for r in runs:
        total = sum(r["statuses"].values()) or 1
        counts = ", ".join(f"{code} x {n} ({100 * n / total:.1f} %)" for code, n in r["statuses"].items())
        parts.append(f"run {r['run']}: {counts}")
    return [
        f"- {NAME} statuses ({mode}, counted by wrk): {'; '.join(parts)}. Expected: 90 % 200, 5 % 401 (no "
        "credential), 5 % 429 (the wrong secret, throttled since the harness's check before the runs)"
    ]
