"""Framing upstream's bytes takes turns with everything else on the event loop.

A fast upstream writing tiny events hands the gateway chunks of hundreds of KiB (whatever
piled up in the socket while the gateway was busy), and framing one in one go holds the loop
for tens or hundreds of ms: /healthz, /metrics and every other caller wait. So a chunk larger
than SLICE is framed SLICE bytes at a time, each slice after `await pacer.turn()`: a `Pacer`
lets its users together frame for at most TURN seconds of each turn of the event loop.

Two pacers, so that background work never slows a caller still reading: the live streams'
(gateway/proxy.py, through EventRelay.feed_paced) and the drains' (gateway/drains.py).
"""

from __future__ import annotations

import asyncio
import time

SLICE = 4 * 2**10  # how much is framed between two looks at the pacer
TURN = 0.005  # how long a pacer's users may frame in one turn of the event loop


class Pacer:
    """Before each slice it frames, a user awaits `turn()`, which returns at once while the
    pacer's users together have framed for less than TURN seconds since the loop last went
    round, and otherwise waits for the next round. (Yielding alone would not do: every ready
    user would still get a slice in each round.)"""

    __slots__ = ("_round_due", "_since")

    def __init__(self) -> None:
        # loop.time() is time.monotonic(); this way a pacer needs no loop until it waits.
        self._since = time.monotonic()
        self._round_due = False

    async def turn(self) -> None:
        while time.monotonic() - self._since > TURN:
            if not self._round_due:
                # Runs at the head of the next round, ahead of the users that wait for it.
                self._round_due = True
                asyncio.get_running_loop().call_soon(self._next_round)
            await asyncio.sleep(0)

    def _next_round(self) -> None:
        self._round_due = False
        self._since = time.monotonic()
