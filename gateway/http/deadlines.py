"""Every timeout of the data plane (request head, body, keep-alive idle, a client that stops reading, upstream
connect-to-response and between response reads, idle pooled connections) runs on one timer per event loop.

A connection keeps its own deadlines as plain floats and moves them freely: serving a request writes a float,
it schedules nothing. `Deadlines.arm(item, when)` files the item in the slot of `when` (slots are
`resolution` seconds wide) unless it is filed for an earlier slot already; when a slot's time comes, each item
filed there is asked `on_deadline(now)`, which acts on whatever has expired and returns its next deadline (0:
none), where the item is filed again. So a keep-alive connection that serves thousands of requests a second
is looked at once per idle period, and a timeout fires at most one slot (plus the loop's own lag) late, never
early.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from typing import Final, Protocol

logger = logging.getLogger(__name__)

# Slot width: timeouts fire this much late at most (besides the loop's lag). Fine enough for the shortest
# timeouts operators set (a tenth of a second), coarse enough that a busy loop wakes up rarely for them.
RESOLUTION: Final = 0.05


class Timed(Protocol):
    """Something with deadlines: a client or upstream connection, the upstream pool."""

    deadline_slot: int  # the slot it is filed in, 0 when none; only Deadlines writes it

    def on_deadline(self, now: float) -> float:
        """Act on what has expired by `now`; return the next deadline (loop time), or 0 for none."""


class Deadlines:
    """One timer for every deadline of the connections of one event loop."""

    __slots__ = ("_heap", "_loop", "_per_second", "_slots", "_ticking", "_timer", "_timer_slot")

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = RESOLUTION) -> None:
        self._loop = loop
        self._per_second = 1.0 / resolution
        self._slots: dict[int, list[Timed]] = {}  # slot -> items filed there
        self._heap: list[int] = []  # the slots in _slots, earliest first
        self._timer: asyncio.TimerHandle | None = None
        self._timer_slot = 0
        self._ticking = False  # a tick schedules the next one itself, once, at its end

    def arm(self, item: Timed, when: float) -> None:
        """Make sure `item` is asked at `when` (loop time) or a little later."""
        slot = int(when * self._per_second) + 1  # the first slot boundary at or after `when`
        filed = item.deadline_slot
        if filed and filed <= slot:
            return  # it is asked earlier, and will be filed again for its later deadline then
        item.deadline_slot = slot
        items = self._slots.get(slot)
        if items is not None:
            items.append(item)
            return
        self._slots[slot] = [item]
        heapq.heappush(self._heap, slot)
        if not self._ticking and (self._timer is None or slot < self._timer_slot):
            self._schedule(slot)

    def close(self) -> None:
        """Forget everything (server shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for items in self._slots.values():
            for item in items:
                item.deadline_slot = 0
        self._slots.clear()
        self._heap.clear()

    def __len__(self) -> int:
        """Items filed (an item filed twice, for a later and then an earlier slot, counts twice)."""
        return sum(len(items) for items in self._slots.values())

    def _schedule(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_slot = slot
        self._timer = self._loop.call_at(slot / self._per_second, self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self._loop.time()
        due = int(now * self._per_second + 1e-6)  # a timer at a slot's time sees that slot due
        heap = self._heap
        self._ticking = True
        try:
            self._run_due(due, now)
        finally:
            self._ticking = False
        if heap:
            self._schedule(heap[0])

    def _run_due(self, due: int, now: float) -> None:
        heap = self._heap
        while heap and heap[0] <= due:
            slot = heapq.heappop(heap)
            for item in self._slots.pop(slot):
                if item.deadline_slot != slot:
                    continue  # filed again for an earlier slot, and asked then
                item.deadline_slot = 0
                try:
                    when = item.on_deadline(now)
                except Exception:
                    logger.exception("deadline handler failed")
                    continue
                if when:
                    self.arm(item, when)
