"""One replica's link to the stores degraded through a fault relay (latency, stalls, resets); one stays clean."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
import pytest_asyncio

from gateway.core.formats import generate_token, new_public_id
from tests.deploy.fault_relay import FaultRelay, Mode
from tests.deploy.hosts import POSTGRES_PORT, REDIS_PORT, Deployment, Replica, deployment, scrape_metric

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

# The documented deadlines (config/credgate.example.toml, [cache]); the deployment keeps the defaults.
STORE_TIMEOUT = 1.5
REDIS_TIMEOUT = 0.5
# Scheduling on a loaded 2-core machine: what a bound may be exceeded by before it counts as broken.
SLACK = 0.4
DELAY_MS = 200
# What a cache miss may take over the slow link (the measured 1.8 s, with room for a loaded machine).
SLOW_MISS_BOUND = 3.0
INVALIDATIONS = "credgate_invalidations_total"


@dataclass
class Faulty:
    """The deployment, the replica behind the relays (`flaky`), the one on a clean link (`steady`)."""

    d: Deployment
    flaky: Replica
    steady: Replica
    relays: tuple[FaultRelay, FaultRelay]

    def set_mode(self, mode: Mode, delay_ms: float = 0) -> None:
        for relay in self.relays:
            relay.set_mode(mode, delay_ms)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def faulty() -> AsyncIterator[Faulty]:
    async with deployment(("steady", "flaky"), "netfaults") as d:
        edge, store_address = d.net.hosts["edge"], d.net.hosts["store"].address
        relays = (FaultRelay(edge.listener(), (store_address, POSTGRES_PORT), edge.tcp_socket),
                  FaultRelay(edge.listener(), (store_address, REDIS_PORT), edge.tcp_socket))
        for relay in relays:
            await relay.start()
        try:
            (pg_host, pg_port), (redis_host, redis_port) = relays[0].address, relays[1].address
            steady, flaky = await d.start_replicas(("steady", "flaky"), {"flaky": (
                f"postgresql://postgres@{pg_host}:{pg_port}/postgres", f"redis://{redis_host}:{redis_port}/0")})
            yield Faulty(d, flaky, steady, relays)
        finally:
            for relay in relays:
                await relay.close()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


async def ask(session: aiohttp.ClientSession, replica: Replica, token: str) -> Answer:
    started = time.monotonic()
    async with session.get(replica.url + "/x", headers={"Authorization": f"Bearer {token}"}) as resp:
        body = await resp.read()
        return Answer(resp.status, dict(resp.headers), body, time.monotonic() - started)


def unknown_token() -> str:
    """Well-formed, so it passes the format check and needs the store; no store knows its id."""
    return generate_token(new_public_id())


def assert_unavailable(answer: Answer) -> None:
    """The documented outage answer: 503 with Retry-After, never a 401 challenge."""
    assert answer.status == 503, (answer.status, answer.body)
    assert int(answer.headers["Retry-After"]) >= 1
    assert json.loads(answer.body)["error"] == "temporarily_unavailable"
    assert "WWW-Authenticate" not in answer.headers


# The product bug a reset link shows (see the report of issue 17): redis-py writes to a pooled connection whose
# peer reset it; uvloop has closed that transport and raises RuntimeError, which gateway.core.errors.REDIS_ERRORS
# does not list, so the request path answers 500 instead of skipping Redis.
CLOSED_TRANSPORT_BUG = "RuntimeError: unable to perform operation on <TCPTransport closed=True"


@dataclass
class KnownBug:
    """Counts the replica's 500s that are the closed-transport bug (its traceback in the log); any other 500,
    or any other unexpected answer, fails the test at once."""

    replica: Replica
    seen: int = 0

    def excuses(self, answer: Answer) -> bool:
        if answer.status != 500:
            return False
        log = self.replica.process.log() if self.replica.process is not None else ""
        assert log.count(CLOSED_TRANSPORT_BUG) > self.seen, (answer.body, self.replica.log_tail())
        self.seen += 1
        return True

    def report(self) -> None:
        """Called last, once every documented behaviour was checked: the bug is what remains."""
        if self.seen:
            pytest.xfail(f"{self.seen} answers were 500: {CLOSED_TRANSPORT_BUG}... (a Redis connection reset by "
                         "the peer); REDIS_ERRORS needs RuntimeError")


async def cached_latencies(f: Faulty, token: str, count: int = 40, bug: KnownBug | None = None) -> list[float]:
    """Sequential requests with a credential the flaky replica holds in memory: every one must be 200."""
    seconds = []
    for _ in range(count):
        answer = await ask(f.d.session, f.flaky, token)
        if bug is not None and bug.excuses(answer):
            continue
        assert answer.status == 200, (answer.status, answer.body)
        seconds.append(answer.seconds)
    return seconds


async def metric_is(f: Faulty, replica: Replica, name: str, wanted: float, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while await scrape_metric(f.d.session, replica.metrics_url, name) != wanted:
        assert time.monotonic() < deadline, f"{replica.host.name}: {name} never {wanted}"
        await asyncio.sleep(0.02)


async def new_credential(f: Faulty) -> dict[str, str]:
    """A token whose creation both replicas have heard of: the creation's notification evicts the id, and one
    arriving after a verification would take the just verified entry out of memory again."""
    heard = [await scrape_metric(f.d.session, r.metrics_url, INVALIDATIONS) for r in (f.flaky, f.steady)]
    created = await f.d.api.create_token("svc")
    for replica, before in zip((f.flaky, f.steady), heard, strict=True):
        await metric_is(f, replica, INVALIDATIONS, before + 1)
    return created


def summary(seconds: list[float]) -> str:
    return f"p50 {statistics.median(seconds) * 1000:.1f} ms, max {max(seconds) * 1000:.1f} ms"


async def recovered(f: Faulty, within: float = 10, bug: KnownBug | None = None) -> float:
    """After the link is healed: seconds until a credential the flaky replica never saw verifies there."""
    fresh = await f.d.api.create_token("svc")
    started = time.monotonic()
    while (answer := await ask(f.d.session, f.flaky, fresh["token"])).status != 200:
        if bug is None or not bug.excuses(answer):
            assert answer.status == 503, (answer.status, answer.body)  # never a 401 for a good credential
        assert time.monotonic() - started < within, "the flaky replica did not recover"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def baseline(f: Faulty) -> tuple[dict[str, str], list[float]]:
    """A credential verified by the flaky replica while its link is clean, and the usual cached latencies."""
    f.set_mode(Mode.PASS)
    cached = await new_credential(f)
    assert (await ask(f.d.session, f.flaky, cached["token"])).status == 200
    return cached, await cached_latencies(f, cached["token"])


def assert_usual(under_fault: list[float], usual: list[float]) -> None:
    """Cached answers do not touch the store: their latency stays what it was on a clean link."""
    assert statistics.median(under_fault) <= statistics.median(usual) + 0.02, (summary(under_fault), summary(usual))
    assert max(under_fault) <= max(max(usual) * 3, 0.1), (summary(under_fault), summary(usual))


@pytest.mark.timeout(150)  # includes the module's start-up
async def test_added_latency(faulty: Faulty) -> None:
    f = faulty
    cached, usual = await baseline(f)
    clean = await f.d.api.create_token("svc")
    clean_seconds = (await ask(f.d.session, f.flaky, clean["token"])).seconds
    f.set_mode(Mode.DELAY, DELAY_MS)
    try:
        under_delay = await cached_latencies(f, cached["token"])
        slow = await f.d.api.create_token("svc")
        sent = [relay.chunks_to_server for relay in f.relays]
        verification = await ask(f.d.session, f.flaky, slow["token"])
        trips = [relay.chunks_to_server - before for relay, before in zip(f.relays, sent, strict=True)]
        unknown = await ask(f.d.session, f.flaky, unknown_token())
    finally:
        f.set_mode(Mode.PASS)
    print(f"\n+{DELAY_MS} ms per round trip to the stores: cached {summary(under_delay)} (clean link: "
          f"{summary(usual)}); first verification {verification.seconds * 1000:.0f} ms (clean link: "
          f"{clean_seconds * 1000:.0f} ms; messages to Postgres, Redis meanwhile: {trips}); "
          f"unknown id {unknown.seconds * 1000:.0f} ms")
    assert_usual(under_delay, usual)
    # A miss pays the delay on each of its serial store round trips (about nine: 1.8 s measured), yet every call
    # stays within its own deadline: verified or refused as usual, never a 503.
    assert verification.status == 200, (verification.status, verification.body)
    assert DELAY_MS / 1000 <= verification.seconds <= SLOW_MISS_BOUND
    assert unknown.status == 401 and unknown.seconds <= SLOW_MISS_BOUND


async def test_stalled_connections(faulty: Faulty) -> None:
    f = faulty
    cached, usual = await baseline(f)
    never_seen = await f.d.api.create_token("svc")
    forwarded = len(f.d.upstream.credentials)
    f.set_mode(Mode.STALL)
    try:
        first = await ask(f.d.session, f.flaky, never_seen["token"])
        after = [await ask(f.d.session, f.flaky, unknown_token()) for _ in range(5)]
        under_stall = await cached_latencies(f, cached["token"])
        # The other replica's link is clean: it verifies the same credential meanwhile.
        elsewhere = await ask(f.d.session, f.steady, never_seen["token"])
        held = f.relays[0].accepted
    finally:
        f.set_mode(Mode.PASS)
    print(f"\nstalled link: first uncached request 503 after {first.seconds * 1000:.0f} ms (deadlines "
          f"{REDIS_TIMEOUT} s Redis + {STORE_TIMEOUT} s store); the next ones "
          f"{[round(a.seconds * 1000) for a in after]} ms; cached {summary(under_stall)} (clean: {summary(usual)})")
    assert_unavailable(first)
    assert first.seconds <= REDIS_TIMEOUT + STORE_TIMEOUT + SLACK
    for answer in after:  # the store counts as down for a second: 503 at once, not one deadline each
        assert_unavailable(answer)
        assert answer.seconds <= REDIS_TIMEOUT + SLACK, answer.seconds
    assert_usual(under_stall, usual)
    assert elsewhere.status == 200
    # Forwarded meanwhile: the cached credential's requests, and the steady replica's; never a 503'd one.
    assert f.d.upstream.credentials[forwarded:] == [cached["id"]] * len(under_stall) + [never_seen["id"]]
    assert held > 0
    print(f"flaky replica verifying again {await recovered(f):.2f} s after the stall ended")


async def test_resets(faulty: Faulty) -> None:
    f = faulty
    cached, usual = await baseline(f)
    never_seen = await new_credential(f)
    revoked_meanwhile = await new_credential(f)
    assert (await ask(f.d.session, f.flaky, revoked_meanwhile["token"])).status == 200
    # Redis counts as up again on the flaky replica (after the stall it is only probed on use): an unknown id
    # makes it ask Redis, so the reset meets pooled Redis connections in use, as it would in production.
    deadline = time.monotonic() + 10
    while await scrape_metric(f.d.session, f.flaky.metrics_url, "credgate_redis_up") != 1:
        assert (await ask(f.d.session, f.flaky, unknown_token())).status == 401
        assert time.monotonic() < deadline, "the flaky replica never used Redis again"
        await asyncio.sleep(0.1)
    forwarded = len(f.d.upstream.credentials)
    bug = KnownBug(f.flaky)
    f.set_mode(Mode.RESET)
    try:
        # Once the replica knows its link is gone (its LISTEN connection was reset), it answers as documented.
        await metric_is(f, f.flaky, "credgate_listen_connected", 0)
        # What it verified moments ago is served from memory: the first request after the reset also meets the
        # pooled Redis connections the reset killed.
        gap = [answer for answer in [await ask(f.d.session, f.flaky, revoked_meanwhile["token"])]
               if not bug.excuses(answer)]
        under_resets = await cached_latencies(f, cached["token"], bug=bug)
        refused = [answer for token in (never_seen["token"], unknown_token(), unknown_token())
                   if not bug.excuses(answer := await ask(f.d.session, f.flaky, token))]
        # A change made while the replica cannot hear it: the other replica enforces it at once ...
        await f.d.api.revoke(revoked_meanwhile["id"])
        assert (await ask(f.d.session, f.steady, revoked_meanwhile["token"])).status == 401
        # ... the cut-off one keeps serving what it verified (the bound during the gap is the gap).
        gap += [answer for answer in [await ask(f.d.session, f.flaky, revoked_meanwhile["token"])]
                if not bug.excuses(answer)]
        forwarded_in_outage = f.d.upstream.credentials[forwarded:]
    finally:
        f.set_mode(Mode.PASS)
    healed = time.monotonic()
    while (answer := await ask(f.d.session, f.flaky, revoked_meanwhile["token"])).status != 401:
        # Once reconnected, the replica knows its entry predates a change and must re-read it: until the store
        # answers again that is a 503, never the stale 200.
        assert bug.excuses(answer) or answer.status in (200, 503), (answer.status, answer.body, f.flaky.log_tail())
        assert time.monotonic() - healed < 8, "the revocation made during the outage was never enforced"
        await asyncio.sleep(0.05)
    enforced = time.monotonic() - healed
    back = await recovered(f, bug=bug)
    print(f"\nreset link: uncached and unknown answered 503 in {[round(a.seconds * 1000) for a in refused]} ms; "
          f"cached {summary(under_resets)} (clean: {summary(usual)}); a revocation made during the outage enforced "
          f"{enforced:.2f} s after the link healed; verifying again after {back:.2f} s; "
          f"500s (closed-transport bug): {bug.seen}")
    assert refused, "every uncached request met the bug"
    for answer in refused:
        assert_unavailable(answer)
        assert answer.seconds <= REDIS_TIMEOUT + STORE_TIMEOUT + SLACK
    assert len(under_resets) >= 30
    assert_usual(under_resets, usual)
    assert all(a.status == 200 for a in gap), [(a.status, a.body) for a in gap]
    served = [cached["id"]] * len(under_resets) + [revoked_meanwhile["id"]] * len(gap)
    assert sorted(forwarded_in_outage) == sorted(served)  # and nothing that was answered 503
    bug.report()
