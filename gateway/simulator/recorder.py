"""The last chat requests as received, so tests can check what the gateway sent upstream."""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from multidict import CIMultiDictProxy


class _Recorded(NamedTuple):
    method: str
    path: str
    query: str
    headers: CIMultiDictProxy[str]
    body: bytes


class RequestRecorder:
    """Bounded; recording keeps references only, and JSON is built when someone asks."""

    __slots__ = ("_entries",)

    def __init__(self, limit: int) -> None:
        self._entries: deque[_Recorded] = deque(maxlen=limit)

    def __len__(self) -> int:
        return len(self._entries)

    def record(
        self, method: str, path: str, query: str, headers: CIMultiDictProxy[str], body: bytes
    ) -> None:
        self._entries.append(_Recorded(method, path, query, headers, body))

    def to_json(self) -> list[dict[str, object]]:
        """Oldest first. A header sent twice shows its last value."""
        return [
            {
                "method": entry.method,
                "path": entry.path,
                "query": entry.query,
                "headers": dict(entry.headers.items()),
                "body": entry.body.decode("utf-8", errors="replace"),
            }
            for entry in self._entries
        ]

    def clear(self) -> None:
        self._entries.clear()
