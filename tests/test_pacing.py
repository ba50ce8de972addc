"""A Pacer: framing (a drain's, or a live stream's big chunk) takes a bounded share of each
turn of the event loop, and every user gets its turns. Time here is the pacer's injected clock,
moved by the framing itself, so what fits in a turn does not depend on how busy the machine
is. (Whole drains and live streams against a hostile upstream are in tests/test_memory.py;
their latency figures in the benchmark.)"""

from __future__ import annotations

import asyncio
from collections import Counter

from gateway.pacing import Pacer
from tests.conftest import FakeClock

BUDGET = 5.0
SLICE = 1.0  # time one slice takes to frame: a few fit in one turn's budget


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


async def user(
    pacer: Pacer, clock: FakeClock, slices: int, cost: float, rounds: Rounds, seen: list[int]
) -> None:
    """Frames `slices` slices of `cost` each, recording the turn of the loop of each."""
    for _ in range(slices):
        await pacer.turn()
        seen.append(rounds.count)
        clock.advance(cost)


async def test_users_together_frame_only_a_budget_per_round_and_all_finish() -> None:
    clock = FakeClock(0.0)
    pacer, rounds = Pacer(BUDGET, clock), Rounds()
    seen: list[int] = []
    async with asyncio.timeout(30):
        await asyncio.gather(*(user(pacer, clock, 10, SLICE, rounds, seen) for _ in range(50)))
    rounds.stop()
    assert len(seen) == 500  # every user got every slice it asked for
    # The budget's worth in any one round, plus the slice that spends it.
    assert max(Counter(seen).values()) <= BUDGET / SLICE + 1


async def test_many_users_with_little_each_are_served_many_per_round() -> None:
    clock = FakeClock(0.0)
    pacer, rounds = Pacer(BUDGET, clock), Rounds()
    clock.now = 100.0  # the pacer was last used long ago: every user starts by queueing
    seen: list[int] = []
    async with asyncio.timeout(30):
        # 500 drains of slow streams: a small slice each, next to no work.
        await asyncio.gather(*(user(pacer, clock, 1, 0.0, rounds, seen) for _ in range(500)))
    rounds.stop()
    assert len(seen) == 500
    # Not one per round (500 rounds): as many per round as fit, after a few rounds of finding
    # out how many that is.
    assert rounds.count < 60


async def test_a_lone_user_within_its_budget_never_waits() -> None:
    clock = FakeClock(0.0)
    pacer, rounds = Pacer(BUDGET, clock), Rounds()
    seen: list[int] = []
    await user(pacer, clock, 20, BUDGET / 40, rounds, seen)
    rounds.stop()
    assert seen == [seen[0]] * 20  # all in one round: no turn of the loop was given up
