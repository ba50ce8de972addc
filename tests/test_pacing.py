"""A Pacer: framing (a drain's, or a live stream's big chunk) takes a bounded share of each
turn of the event loop, and every user gets its turns. (Whole drains and live streams against
a hostile upstream are in tests/test_memory.py; their latency figures in the benchmark.)"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from gateway.pacing import Pacer

BUDGET = 0.005
SLICE = 0.001  # seconds of work per slice: a few fit in one turn's budget


class Rounds:
    """Counts turns of the event loop: a callback that schedules itself again each round."""

    def __init__(self) -> None:
        self.count = 0
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.count += 1
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


def work(seconds: float) -> None:
    """Framing, as far as the event loop can tell: it holds the loop for `seconds`."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


async def drain(pacer: Pacer, slices: int, rounds: Rounds, seen: list[int]) -> None:
    for _ in range(slices):
        await pacer.turn()
        seen.append(rounds.count)
        work(SLICE)


async def test_drains_together_frame_only_a_budget_per_round_and_all_finish() -> None:
    pacer, rounds = Pacer(BUDGET), Rounds()
    seen: list[int] = []
    async with asyncio.timeout(30):
        await asyncio.gather(*(drain(pacer, 10, rounds, seen) for _ in range(50)))
    rounds.stop()
    assert len(seen) == 500  # every drain got every slice it asked for
    # At most the budget's worth, plus the slice that spends it, in any one round (a busy
    # machine makes slices longer, so fewer fit: the bound only gets looser there).
    assert max(Counter(seen).values()) <= BUDGET / SLICE + 1


async def test_a_lone_drain_within_its_budget_never_waits() -> None:
    pacer = Pacer(budget=10.0)
    rounds = Rounds()
    seen: list[int] = []
    await drain(pacer, 20, rounds, seen)
    rounds.stop()
    assert seen == [seen[0]] * 20  # all in one round: no turn of the loop was given up
