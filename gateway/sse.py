"""An incremental Server-Sent Events scanner (WHATWG HTML, "event stream interpretation").

It reads the bytes the proxy passes on, in whatever pieces they arrive: an event split over
chunks, CR, LF or CRLF line ends (a CR at a chunk's end may pair with the next chunk's LF),
comments, multi-line `data`, a leading BOM. It never changes or holds back the bytes
themselves; it only reports the events they complete.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE_END = re.compile(rb"\r\n?|\n")
_BOM = b"\xef\xbb\xbf"
# A line longer than this is not one we need to read (usage sits in a short `done` event);
# dropping it keeps a misbehaving upstream from growing our buffer without bound.
MAX_LINE = 1 << 20


@dataclass(frozen=True, slots=True)
class Event:
    data: str
    event: str = "message"
    id: str | None = None


class SSEScanner:
    __slots__ = ("_data", "_event", "_id", "_partial", "_skip_lf", "_started", "overflowed")

    def __init__(self) -> None:
        self._partial = b""
        self._skip_lf = False
        self._started = False
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self.overflowed = False

    @property
    def at_boundary(self) -> bool:
        """True when the bytes so far end exactly between events (nothing half-sent)."""
        return not (self.overflowed or self._partial or self._data or self._event)

    def feed(self, chunk: bytes) -> list[Event]:
        if self.overflowed:
            end = _LINE_END.search(chunk)
            if end is None:
                return []
            # The overlong line ends here; it is dropped whole, like a line we cannot parse.
            self.overflowed = False
            self._skip_lf = end.group() == b"\r" and end.end() == len(chunk)
            chunk = chunk[end.end() :]
        buf = self._partial + chunk if self._partial else chunk
        if self._skip_lf and buf[:1] == b"\n":
            buf = buf[1:]
        self._skip_lf = False
        if not self._started:
            if _BOM.startswith(buf):  # too short to tell yet
                self._partial = buf
                return []
            self._started = True
            if buf.startswith(_BOM):
                buf = buf[3:]
        events: list[Event] = []
        pos = 0
        for match in _LINE_END.finditer(buf):
            event = self._line(buf[pos : match.start()])
            if event is not None:
                events.append(event)
            pos = match.end()
            if match.group() == b"\r" and pos == len(buf):
                self._skip_lf = True
        self._partial = buf[pos:]
        if len(self._partial) > MAX_LINE:
            self._partial = b""
            self.overflowed = True
        return events

    def _line(self, raw: bytes) -> Event | None:
        if not raw:
            return self._dispatch()
        if raw[:1] == b":":
            return None
        line = raw.decode("utf-8", "replace")
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None

    def _dispatch(self) -> Event | None:
        if not self._data:
            self._event = ""
            return None
        event = Event(data="\n".join(self._data), event=self._event or "message", id=self._id)
        self._data = []
        self._event = ""
        return event
