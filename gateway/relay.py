"""One event stream on its way to the caller, each chunk framed once.

The framer (gateway/sse.py) cuts the bytes into whole events; each event's JSON is parsed
once, for the usage tally (gateway/usage.py) and for the session scope, which translates the
`done` event's session id back (gateway/sessions.py). Every other byte passes as upstream
sent it, a complete event as soon as it ends (at its blank line, or its one-JSON-object data
line, given the blank line it lacks: sse.py): an SSE client acts on nothing before that.
While upstream is silent the gateway may put a keep-alive comment between those events
(`keep_alive`); it is the gateway's, so it is neither framed nor tallied.

A chunk larger than pacing.SLICE (a fast upstream's bytes piled up) is framed a slice at a
time with the loop given back between slices (`feed_paced`), so it cannot hold the event loop;
the usual small chunk is framed at once, with nothing awaited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from gateway.errors import UpstreamUnavailable
from gateway.pacing import SLICE
from gateway.sessions import SessionScope
from gateway.sse import DEFAULT_MAX_EVENT, Frame, SSEFramer
from gateway.usage import StreamTally, event_payload


class EventRelay:
    __slots__ = ("_framer", "_scope", "tally", "unread")

    def __init__(self, scope: SessionScope, max_event: int = DEFAULT_MAX_EVENT) -> None:
        self._framer = SSEFramer(max_event)
        self._scope = scope
        self.tally = StreamTally()
        # What `feed_paced` had not framed yet when its caller left: a drain reads it first.
        self.unread = b""

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send on now: every event `chunk` completes (maybe none)."""
        frames = self._framer.feed(chunk)
        if len(frames) == 1:  # the usual chunk, one event: sent on without a copy
            return self._caller_bytes(frames[0])
        return b"".join([self._caller_bytes(frame) for frame in frames])

    async def feed_paced(self, chunk: bytes, turn: Callable[[], Awaitable[None]]) -> bytes:
        """`feed(chunk)` for a chunk of any size: SLICE bytes at a time, each after
        `await turn()` (a Pacer's). Cancelled meanwhile (the caller left), the rest of the
        chunk stays in `unread`, so the drain that takes over tallies every byte in order."""
        passed = []
        for start in range(0, len(chunk), SLICE):
            try:
                await turn()
            except asyncio.CancelledError:
                self.unread = chunk[start:]
                raise
            passed.append(self.feed(chunk[start : start + SLICE]))
            if self._framer.overflowed:
                break
        return b"".join(passed)

    @property
    def overflow(self) -> UpstreamUnavailable | None:
        """What ends the stream once upstream sent an event over limits.max_event_bytes (the
        events before it have been passed on; nothing of it or after it is read)."""
        if not self._framer.overflowed:
            return None
        return UpstreamUnavailable(
            f"the upstream stream sent an event larger than {self._framer.max_event} bytes "
            "(limits.max_event_bytes)"
        )

    def keep_alive(self) -> bytes:
        """A heartbeat to send now (`: keep-alive`, a comment every SSE client skips), or b""
        while the caller is inside an event: one over the framer's MAX_EVENT goes out piece
        by piece. An event upstream has only half sent is held, so the heartbeat goes first."""
        return self._framer.comment(b"keep-alive")

    def drain(self, chunk: bytes) -> None:
        """Read `chunk` for the tally only: its caller has left."""
        for frame in self._framer.feed(chunk):
            if frame.event is not None:
                self.tally.observe(frame.event)

    def finish(self, close: bool) -> bytes:
        """The stream is over: the bytes still held. With `close`, a half-sent event is ended
        first by a blank line, so an error event of ours that follows is read as its own."""
        closed = b""
        if close and not self._framer.at_boundary:
            # The gateway's bytes, not upstream's: not tallied, but the id is still ours.
            closed = b"".join(
                [self._scope.caller_event(frame) for frame in self._framer.end_event()]
            )
        return closed + self._framer.finish()

    def _caller_bytes(self, frame: Frame) -> bytes:
        if frame.event is None:
            return frame.raw
        payload = event_payload(frame.event)
        if payload is None:
            return frame.raw
        self.tally.record(payload)
        return self._scope.caller_event(frame, payload)
