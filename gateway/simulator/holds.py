"""Requests parked on purpose: streams held mid-way (hold_stream) and requests left hanging.

aiohttp does not cancel a handler when its client goes away (handler_cancellation is off by
default), so a parked handler would wait forever for a client that left: one leak per
abandoned request. One watcher task, alive only while something is parked, checks every
parked connection a few times a second and lets go of those whose client is gone; a single
timer for all of them keeps thousands of parked streams cheap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

POLL_INTERVAL = 0.05

IsGone = Callable[[], bool]


class HeldStreams:
    """Parked requests, `release()` for held streams, and ways to wait until some are held."""

    __slots__ = ("_changed", "_closed", "_held", "_hung", "_watcher")

    def __init__(self) -> None:
        # Each parked request awaits its future: True to carry on, False if its client left.
        self._held: dict[asyncio.Future[bool], IsGone] = {}
        self._hung: dict[asyncio.Future[bool], IsGone] = {}
        self._changed = asyncio.Event()
        self._closed = False
        self._watcher: asyncio.Task[None] | None = None

    @property
    def count(self) -> int:
        """Streams held now (hanging requests are not streams and are not counted)."""
        return len(self._held)

    @property
    def hanging(self) -> int:
        """Requests parked by the `hang` fault whose client has not been seen to leave."""
        return len(self._hung)

    async def hold(self, is_gone: IsGone) -> bool:
        """Wait for the next release; False if the client went away first."""
        return await self._park(self._held, is_gone)

    async def park(self, is_gone: IsGone) -> bool:
        """The `hang` fault: wait until the client leaves (False) or shutdown (True)."""
        return await self._park(self._hung, is_gone)

    def release(self) -> int:
        """Let every stream held now finish; streams held later wait for the next release."""
        released = _resolve_all(self._held, result=True)
        if released:
            self._notify()
        return released

    async def wait_for(self, at_least: int) -> int:
        """Return once at least `at_least` streams are held; wrap in asyncio.timeout."""
        return await self.wait_until(lambda held: held >= at_least)

    async def wait_until(self, condition: Callable[[int], bool]) -> int:
        """Return the number of held streams once `condition` holds for it."""
        while not condition(len(self._held)):
            await self._changed.wait()
        return len(self._held)

    def close(self) -> None:
        """On shutdown: finish held streams, end hanging requests, park nothing more."""
        self._closed = True
        _resolve_all(self._held, result=True)
        _resolve_all(self._hung, result=True)
        self._notify()
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def _park(self, parked: dict[asyncio.Future[bool], IsGone], is_gone: IsGone) -> bool:
        if self._closed:
            return True
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        parked[future] = is_gone
        self._notify()
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch())
        try:
            return await future
        finally:
            # Already gone if released or abandoned; still here if the handler was cancelled.
            if parked.pop(future, None) is not None:
                self._notify()

    async def _watch(self) -> None:
        while self._held or self._hung:
            await asyncio.sleep(POLL_INTERVAL)
            left = _resolve_gone(self._held) + _resolve_gone(self._hung)
            if left:
                self._notify()
        self._watcher = None

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


def _resolve_all(parked: dict[asyncio.Future[bool], IsGone], *, result: bool) -> int:
    futures = list(parked)
    parked.clear()
    for future in futures:
        if not future.done():
            future.set_result(result)
    return len(futures)


def _resolve_gone(parked: dict[asyncio.Future[bool], IsGone]) -> int:
    gone = [future for future, is_gone in parked.items() if is_gone()]
    for future in gone:
        del parked[future]
        if not future.done():
            future.set_result(False)
    return len(gone)
