"""Token usage as upstream reports it, in either documented shape.

JSON bodies and `done` events carry `usage: {input_tokens, output_tokens, total_tokens}`
(API reference) or a bare `tokens_used` total (deployment guide); we read whichever is present.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.sse import Event


@dataclass(frozen=True, slots=True)
class Usage:
    input: int | None
    output: int | None
    total: int


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def usage_from(body: Mapping[str, object]) -> Usage | None:
    usage = body.get("usage")
    if isinstance(usage, Mapping):
        inp, out = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
        total = _count(usage.get("total_tokens"))
        if total is None and inp is not None and out is not None:
            total = inp + out
        if total is not None:
            return Usage(inp, out, total)
    total = _count(body.get("tokens_used"))
    return Usage(None, None, total) if total is not None else None


def event_payload(event: Event) -> dict[str, object] | None:
    """An event's data as the JSON object upstream sends in each event, or None."""
    try:
        payload = json.loads(event.data)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return None
    return payload if isinstance(payload, dict) else None


class StreamTally:
    """What a passing SSE stream has told us: its `done` event, or failing that, its text."""

    __slots__ = ("content_chars", "done", "errored", "session_id", "usage")

    def __init__(self) -> None:
        self.done = False
        self.errored = False
        self.usage: Usage | None = None
        self.session_id: str | None = None
        self.content_chars = 0

    def observe(self, event: Event) -> None:
        payload = event_payload(event)
        if payload is not None:
            self.record(payload)

    def record(self, payload: Mapping[str, object]) -> None:
        """Take in one event's payload (`event_payload`), for a caller that has it parsed."""
        kind = payload.get("type")
        if kind == "content":
            content = payload.get("content")
            if isinstance(content, str):
                self.content_chars += len(content)
        elif kind == "done":
            self.done = True
            self.usage = usage_from(payload)
            session_id = payload.get("session_id")
            if isinstance(session_id, str):
                self.session_id = session_id
        elif kind == "error":
            self.errored = True
