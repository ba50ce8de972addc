"""The last chat requests as received, so tests can check what the gateway sent upstream, and
what each one ran upstream: the usage its answer reports, as upstream would bill it."""

from __future__ import annotations

from collections import deque

from multidict import CIMultiDictProxy


class Recorded:
    """One request as received; `usage` is set once its turn has run (None: refused, or a
    fault answered instead), whether or not the answer was then read to its end."""

    __slots__ = ("body", "headers", "method", "path", "query", "usage")

    def __init__(
        self, method: str, path: str, query: str, headers: CIMultiDictProxy[str], body: bytes
    ) -> None:
        self.method, self.path, self.query = method, path, query
        self.headers, self.body = headers, body
        self.usage: dict[str, int] | None = None


class RequestRecorder:
    """Bounded; recording keeps references only, and JSON is built when someone asks."""

    __slots__ = ("_entries",)

    def __init__(self, limit: int) -> None:
        self._entries: deque[Recorded] = deque(maxlen=limit)

    def __len__(self) -> int:
        return len(self._entries)

    def record(
        self, method: str, path: str, query: str, headers: CIMultiDictProxy[str], body: bytes
    ) -> Recorded:
        entry = Recorded(method, path, query, headers, body)
        self._entries.append(entry)
        return entry

    def to_json(self) -> list[dict[str, object]]:
        """Oldest first. A header sent twice shows its last value."""
        return [
            {
                "method": entry.method,
                "path": entry.path,
                "query": entry.query,
                "headers": dict(entry.headers.items()),
                "body": entry.body.decode("utf-8", errors="replace"),
                "usage": entry.usage,
            }
            for entry in self._entries
        ]

    def clear(self) -> None:
        self._entries.clear()
