"""Framing upstream's bytes takes turns with everything else on the event loop.

A fast upstream writing tiny events hands the gateway chunks of hundreds of KiB (whatever
piled up in the socket while the gateway was busy), and framing one in one go holds the loop
for tens or hundreds of ms: /healthz, /metrics and every other caller wait. So a chunk larger
than SLICE is framed SLICE bytes at a time, each slice after `await pacer.turn()`: a `Pacer`
lets its users frame for at most TURN seconds of each turn of the event loop.

Two pacers, so that background work never slows a caller still reading: the live streams'
(gateway/proxy.py, through EventRelay.feed_paced) and the drains' (gateway/drains.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

SLICE = 4 * 2**10  # how much is framed between two looks at the pacer
TURN = 0.002  # how long a pacer's users may frame in one turn of the event loop
MAX_BATCH = 32  # the most waiting users woken for one turn: what a burst can overshoot by


class Pacer:
    """Before each slice it frames, a user awaits `turn()`. While nobody waits and the users
    have framed for less than `budget` seconds since the loop last went round, it returns at
    once; otherwise the user joins a queue. Each turn of the loop the users longest in the
    queue are woken, as many as the last turn suggests will fit: one after a turn whose
    budget ran out, twice as many as before (up to MAX_BATCH) after one whose did not. A
    woken user frames until the budget is spent (or its buffer is), then queues again; one
    woken after the budget was spent goes back to the head of the queue.

    Waiting costs nothing: a queued user sleeps on a future of its own rather than waking
    every turn of the loop to look (200 drains doing that spent milliseconds of each turn),
    and many users with a little each are still served many per turn, not one. The clock is
    the process's, not the loop's: uvloop's `loop.time()` stands still within a turn of its
    loop, so it could not tell how long the framing took."""

    __slots__ = (
        "_batch",
        "_budget",
        "_clock",
        "_granted",
        "_round_due",
        "_since",
        "_spent",
        "_waiting",
    )

    def __init__(self, budget: float = TURN, clock: Callable[[], float] = time.perf_counter):
        self._budget = budget
        self._clock = clock
        self._since = clock()
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._granted: set[asyncio.Task[Any]] = set()  # woken for this turn of the loop
        self._batch = 1
        self._spent = False
        self._round_due = False

    async def turn(self) -> None:
        task = asyncio.current_task()
        while True:
            within = self._clock() - self._since <= self._budget
            granted = task in self._granted
            if within and (granted or not self._waiting):
                return
            self._spent |= not within
            waiter = asyncio.get_running_loop().create_future()
            if granted:  # its turn came, but those before it spent the budget
                self._waiting.appendleft(waiter)
            else:
                self._waiting.append(waiter)
            self._next_round_soon()
            await waiter  # a cancelled user's future is skipped when its turn comes
            if task is not None:
                self._granted.add(task)

    def _next_round_soon(self) -> None:
        if not self._round_due:
            self._round_due = True
            asyncio.get_running_loop().call_soon(self._next_round)

    def _next_round(self) -> None:
        self._round_due = False
        self._batch = 1 if self._spent else min(self._batch * 2, MAX_BATCH)
        self._spent = False
        self._since = self._clock()
        self._granted.clear()
        woken = 0
        while self._waiting and woken < self._batch:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                woken += 1
        if self._waiting:
            # Those woken may not come back for more (their buffers ran dry).
            self._next_round_soon()
