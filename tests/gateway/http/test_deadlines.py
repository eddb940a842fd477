"""The one deadline timer per event loop (gateway.http.deadlines), on a real asyncio loop and without sockets: items
are asked never early and at most about one slot (plus the loop's lag) late; moving a deadline later costs no
timer, moving it earlier files the item again; one timer is pending at a time, whatever the number of items.

Timers are counted through a thin wrapper of the running loop (`CountingLoop`: Deadlines only calls `time` and
`call_at`), so no private field is read."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import pytest

from gateway.http.deadlines import Deadlines

RESOLUTION = 0.01
# A callback may run this much before its time (asyncio runs timers up to the clock's resolution early, and the
# slot arithmetic is in floats): "never early" allows this much.
EPSILON = 1e-6
# How much more the deadline timer may lag than a plain loop timer for the same deadline, besides one slot.
SLACK = 0.02


class CountingLoop:
    """The running loop, with every call_at recorded and the timers still pending known."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls = 0
        self.live: set[asyncio.TimerHandle] = set()

    def time(self) -> float:
        return self.loop.time()

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> asyncio.TimerHandle:
        self.calls += 1

        def run() -> None:
            self.live.discard(handle)
            callback(*args)

        handle = self.loop.call_at(when, run)
        self.live.add(handle)
        return handle

    @property
    def pending(self) -> int:
        return sum(1 for handle in self.live if not handle.cancelled())


class Item:
    """A Timed thing with one deadline: fires once it has passed, asks to be called again before."""

    def __init__(self, loop: CountingLoop, deadline: float = 0.0) -> None:
        self.loop = loop
        self.deadline_slot = 0
        self.deadline = deadline
        self.asked: list[float] = []  # the `now` of every on_deadline call
        self.fired: list[float] = []

    def on_deadline(self, now: float) -> float:
        # `now` is the loop's time when the tick began (an item asked after a slow one sees it a little behind)
        assert 0 <= self.loop.time() - now < 0.5
        self.asked.append(now)
        if now >= self.deadline - EPSILON:
            self.fired.append(now)
            return 0.0
        return self.deadline


class Failing(Item):
    def on_deadline(self, now: float) -> float:
        self.asked.append(now)
        raise RuntimeError("boom")


def setup() -> tuple[CountingLoop, Deadlines]:
    counting = CountingLoop(asyncio.get_running_loop())
    return counting, Deadlines(cast(asyncio.AbstractEventLoop, counting), RESOLUTION)


async def until(condition: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.001)


async def test_a_deadline_fires_never_early_and_at_most_about_a_slot_late() -> None:
    counting, deadlines = setup()
    start = counting.time()
    items: list[Item] = []
    plain_late: list[float] = []  # how late a plain loop timer for the same deadline ran: the loop's own lag

    def plain(when: float) -> None:
        plain_late.append(counting.time() - when)

    for i in range(30):
        when = start + 0.003 + i * 0.0071  # deadlines anywhere within their slots
        item = Item(counting, when)
        items.append(item)
        deadlines.arm(item, when)
        counting.loop.call_at(when, plain, when)
    await until(lambda: all(item.fired for item in items) and len(plain_late) == len(items))
    lag = max(plain_late)
    for item in items:
        assert item.asked == item.fired  # asked once: at its deadline
        late = item.fired[0] - item.deadline
        assert late >= -EPSILON, f"fired {-late:.6f}s early"
        assert late <= RESOLUTION + lag + SLACK, (late, lag)
    assert len(deadlines) == 0 and counting.pending == 0


async def test_a_deadline_already_past_fires_on_the_next_tick() -> None:
    counting, deadlines = setup()
    item = Item(counting, counting.time() - 1.0)
    deadlines.arm(item, item.deadline)
    armed = counting.time()
    await until(lambda: bool(item.fired))
    assert item.fired[0] - armed <= RESOLUTION + SLACK


async def test_moving_a_deadline_later_costs_no_timer() -> None:
    counting, deadlines = setup()
    start = counting.time()
    old, new = start + 0.05, start + 0.15
    item = Item(counting, old)
    deadlines.arm(item, old)
    assert counting.calls == 1
    item.deadline = new  # what a keep-alive connection does on each request: it writes a float...
    deadlines.arm(item, new)  # ...and arming for later leaves the item where it is
    assert counting.calls == 1 and counting.pending == 1 and len(deadlines) == 1
    await until(lambda: bool(item.fired))
    # Asked once at the old slot, where it returned its new deadline and was filed again; then it fired.
    assert len(item.asked) == 2 and item.fired == item.asked[1:]
    assert old - EPSILON <= item.asked[0] < new
    assert item.fired[0] >= new - EPSILON
    assert len(deadlines) == 0 and counting.pending == 0


async def test_a_tick_that_files_an_item_again_schedules_one_timer() -> None:
    counting, deadlines = setup()
    start = counting.time()
    item = Item(counting, start + 0.15)
    deadlines.arm(item, start + 0.05)
    await until(lambda: bool(item.fired))
    assert counting.calls == 2  # the first slot's timer, then the re-filed slot's


async def test_moving_a_deadline_earlier_files_it_again_and_it_fires_once() -> None:
    counting, deadlines = setup()
    start = counting.time()
    late, early = start + 0.2, start + 0.05
    item = Item(counting, late)
    deadlines.arm(item, late)
    item.deadline = early
    deadlines.arm(item, early)
    assert counting.pending == 1  # the earlier timer replaced the later one
    assert len(deadlines) == 2  # filed in both slots; the later entry is stale
    await until(lambda: bool(item.fired))
    assert early - EPSILON <= item.fired[0] < late
    await asyncio.sleep(late - counting.time() + 3 * RESOLUTION)
    assert len(item.asked) == 1  # the stale entry at the later slot was skipped
    assert len(deadlines) == 0 and counting.pending == 0


async def test_arming_the_same_slot_again_files_it_once() -> None:
    counting, deadlines = setup()
    when = counting.time() + 0.03
    item = Item(counting, when)
    for _ in range(3):
        deadlines.arm(item, when)
    assert len(deadlines) == 1 and counting.calls == 1
    await until(lambda: bool(item.fired))
    await asyncio.sleep(3 * RESOLUTION)
    assert len(item.asked) == 1


async def test_an_item_is_asked_again_at_the_deadline_it_returns_until_it_returns_0() -> None:
    counting, deadlines = setup()
    asked: list[float] = []

    class Periodic:
        deadline_slot = 0

        def on_deadline(self, now: float) -> float:
            asked.append(now)
            return now + 0.02 if len(asked) < 4 else 0.0

    deadlines.arm(Periodic(), counting.time() + 0.02)
    await until(lambda: len(asked) == 4)
    assert all(later - earlier >= 0.02 - EPSILON for earlier, later in itertools.pairwise(asked))
    await asyncio.sleep(5 * RESOLUTION)
    assert len(asked) == 4
    assert len(deadlines) == 0 and counting.pending == 0


async def test_many_items_share_one_timer() -> None:
    counting, deadlines = setup()
    start = counting.time()
    together = [Item(counting, start + 0.05) for _ in range(100)]
    for item in together:
        deadlines.arm(item, item.deadline)
    assert counting.calls == 1 and counting.pending == 1 and len(deadlines) == 100
    # More items, each earlier than the last: every one moves the timer, and still one is pending.
    spread = [Item(counting, start + 0.2 - i * 0.0013) for i in range(100)]
    most_pending = 0
    for item in spread:
        deadlines.arm(item, item.deadline)
        most_pending = max(most_pending, counting.pending)
    assert most_pending == 1
    done = False

    async def watch() -> None:
        nonlocal most_pending
        while not done:
            most_pending = max(most_pending, counting.pending)
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    await until(lambda: all(item.fired for item in together + spread))
    done = True
    await watcher
    assert most_pending == 1
    assert len({item.fired[0] for item in together}) == 1  # one tick asked them all
    assert all(len(item.asked) == 1 for item in together + spread)
    assert len(deadlines) == 0 and counting.pending == 0


async def test_an_exception_is_logged_and_the_other_items_still_run(caplog: pytest.LogCaptureFixture) -> None:
    counting, deadlines = setup()
    start = counting.time()
    failing = Failing(counting, start + 0.03)
    same_slot = Item(counting, start + 0.03)
    later = Item(counting, start + 0.08)
    with caplog.at_level(logging.ERROR, logger="gateway.http.deadlines"):
        for item in (failing, same_slot, later):
            deadlines.arm(item, item.deadline)
        await until(lambda: bool(same_slot.fired and later.fired))
    assert len(failing.asked) == 1  # not filed again
    errors = [r for r in caplog.records if r.name == "gateway.http.deadlines" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None and errors[0].exc_info[0] is RuntimeError
    assert len(deadlines) == 0 and counting.pending == 0


async def test_close_forgets_everything() -> None:
    counting, deadlines = setup()
    start = counting.time()
    items = [Item(counting, start + 0.02 + i * 0.01) for i in range(5)]
    for item in items:
        deadlines.arm(item, item.deadline)
    deadlines.close()
    assert len(deadlines) == 0 and counting.pending == 0
    assert all(item.deadline_slot == 0 for item in items)
    await asyncio.sleep(0.1)
    assert not any(item.asked for item in items)
