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


class Pacer:
    """Before each slice it frames, a user awaits `turn()`. While nobody waits and the users
    have framed for less than `budget` seconds since the loop last went round, it returns at
    once; otherwise the user joins a queue. Each turn of the loop the user longest in the
    queue gets the turn and frames until the budget is spent (or its buffer is), then queues
    again behind the others.

    Waiting costs nothing: a queued user sleeps on a future of its own rather than waking
    every turn of the loop to look (200 drains doing that spent milliseconds of each turn).
    The clock is the process's, not the loop's: uvloop's `loop.time()` stands still within a
    turn of its loop, so it could not tell how long the framing took."""

    __slots__ = ("_budget", "_clock", "_holder", "_round_due", "_since", "_waiting")

    def __init__(self, budget: float = TURN, clock: Callable[[], float] = time.perf_counter):
        self._budget = budget
        self._clock = clock
        self._since = clock()
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._holder: asyncio.Task[Any] | None = None
        self._round_due = False

    async def turn(self) -> None:
        task = asyncio.current_task()
        if self._clock() - self._since <= self._budget and (
            not self._waiting or task is self._holder
        ):
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        self._next_round_soon()
        await waiter  # a cancelled user's future is skipped when its turn comes
        self._holder = task

    def _next_round_soon(self) -> None:
        if not self._round_due:
            self._round_due = True
            asyncio.get_running_loop().call_soon(self._next_round)

    def _next_round(self) -> None:
        self._round_due = False
        self._since = self._clock()
        self._holder = None
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break
        if self._waiting:
            # The user given this turn may not come back for more (its buffer ran dry).
            self._next_round_soon()
