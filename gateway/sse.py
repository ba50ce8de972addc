"""An incremental Server-Sent Events framer (WHATWG HTML, "event stream interpretation").

Bytes go in, in whatever pieces they arrive; whole events come out, each as a `Frame`: its
bytes as upstream sent them (blank line, comments, BOM and line ends included) and what they
mean. It reads CR, LF or CRLF line ends (a CR at a chunk's end may pair with the next chunk's
LF), comments, multi-line `data`, a leading BOM. Every byte fed comes out once, in order: a
complete event as soon as it ends, the rest by `finish()`. The usage tally and the session-id
rewriter both read these frames, so each chunk is framed once.

An event ends at a blank line, as WHATWG says, or at the end of its first `data:` line when
that line's value is one JSON object (it starts with `{` and ends with `}`: a cheap test, not a
parse). Upstream's deployment guide prints its stream as one such line per event with no blank
line between, and its own client reads each line as an event; a standard SSE client would see
nothing, or one huge event. Such an event goes out with the blank line it lacks, in its data
line's own line end; when upstream's own blank line follows, it is that blank line, whole or in
pieces, the same bytes, and is not sent twice. So a well-formed upstream's bytes come out
exactly as sent (an event may only leave sooner), and the guide's stream comes out with a
blank line after each event. Lines after such a data line, before a blank line (upstream's
documents show none), begin the next event. Other data lines (a second one, or one that is not
`{…}`) wait for the blank line as ever. A data line ended by a CR that is a chunk's last byte
waits for the next byte, which says whether an LF belongs to it (in practice the rest of the
CRLF, already on its way). At the end of the stream, a last line without its line end (or
with a bare CR) is an event left unfinished, as WHATWG has it: `finish()` returns it unread.

What has gone out is whole events (a leading BOM goes on at once, alone), so the framer also
knows when the gateway may put in a comment of its own (`comment`, the stream's heartbeat):
anywhere but inside an event over MAX_EVENT, whose pieces go out as they come. The bytes of an
event still held follow the comment. A BOM that arrives after one no longer leads the stream,
so it is dropped (a reader would take it for part of the first field name): besides upstream's
blank line after a JSON data line (sent already), the only bytes fed that do not come out.

No event may grow past the framer's `max_event` (limits.max_event_bytes) though: an endless
one would otherwise hold a stream, and a drain reading it, for ever. Once one does, the framer
`overflowed`: the whole events before it come out, and nothing of it or after it is read. An
event over MAX_EVENT is passed on unread, so a JSON data line that long ends nothing: its event
waits for a blank line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE_END = re.compile(rb"\r\n?|\n")
_BOM = b"\xef\xbb\xbf"
# An event longer than this is not one we need to read (usage sits in a short `done` event);
# passing it on unread keeps a misbehaving upstream from growing our buffer without bound.
MAX_EVENT = 1 << 20
DEFAULT_MAX_EVENT = 4 << 20  # limits.max_event_bytes


@dataclass(frozen=True, slots=True)
class Event:
    data: str
    event: str = "message"
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Frame:
    """Bytes to pass on as one piece: a whole event and `event`, what it dispatches.

    `event` is None for bytes that dispatch nothing: a block of comments, an event without
    data, the leading BOM, the LF of a CRLF whose CR ended the event before it, or a piece of
    an event longer than MAX_EVENT (passed on unread).
    """

    raw: bytes
    event: Event | None


class SSEFramer:
    __slots__ = (
        "_cr_ended",
        "_data",
        "_event",
        "_held",
        "_id",
        "_line",
        "_owed",
        "_passed",
        "_passing",
        "_skip_lf",
        "_spoke_first",
        "_started",
        "max_event",
        "overflowed",
    )

    def __init__(self, max_event: int = DEFAULT_MAX_EVENT) -> None:
        self._held = b""  # the bytes of the event in progress
        self._line = 0  # where its unread line starts in _held (< 0: mid-line, _held empty)
        self._skip_lf = False  # the last chunk ended in a CR: a leading LF belongs to it
        # The blank line we put after a JSON data line at a chunk's end, for upstream's own
        # (the same bytes) to be taken as, if it comes next.
        self._owed = b""
        self._cr_ended = False  # the held event's JSON data line ends at its last byte, a CR
        self._started = False  # past a leading BOM, or sure there is none
        self._passing = False  # inside an event over MAX_EVENT: passed on unread, not held
        self._passed = 0  # how much of that event has gone on
        self.max_event = max_event  # limits.max_event_bytes
        self.overflowed = False  # an event grew past max_event: nothing more is read
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None  # WHATWG's "last event ID buffer": kept across events
        self._spoke_first = False  # a comment of ours went out before upstream's first byte

    @property
    def at_boundary(self) -> bool:
        """True when the bytes so far end exactly between events (nothing half-sent)."""
        return not (self._held or self._passing)

    def comment(self, text: bytes) -> bytes:
        """A comment line of the gateway's own (`: text` and the blank line that ends it) to
        send now, between the events passed on so far; b"" while one of them is half passed on
        (over MAX_EVENT). It is not fed: nothing reads it, and an event still held follows it.
        """
        if self._passing:
            return b""
        if not self._started:
            self._spoke_first = True
        return b": " + text + b"\n\n"

    def feed(self, chunk: bytes) -> list[Frame]:
        """The frames `chunk` completes; the bytes of an event still incomplete are held."""
        if not chunk or self.overflowed:
            return []
        held = self._held
        buf = held + chunk if held else chunk
        frames: list[Frame] = []
        start = 0  # where the event being read starts in buf
        scan = len(held)  # where the bytes not yet searched for line ends start
        line = self._line  # where the line being read starts
        # Where the line end of an event's JSON data line starts and ends, while the event
        # waits to see whether upstream's blank line follows; -1: no such event.
        eol = ended = -1
        if not self._started:
            if len(buf) < len(_BOM) and _BOM.startswith(buf):  # too short to tell yet
                self._held = buf
                return []
            self._started = True
            scan = line = 0
            if buf.startswith(_BOM):
                # It goes on at once and alone, so a comment of ours may follow it; after
                # one, it would no longer lead the stream: dropped.
                start = scan = line = 3
                if not self._spoke_first:
                    frames.append(Frame(_BOM, None))
        elif self._owed:
            # Upstream's blank line after a JSON data line: it went out already, ours.
            owed, self._owed = self._owed, b""
            same = 0
            while same < len(owed) and same < len(buf) and buf[same] == owed[same]:
                same += 1
            if same == len(buf) < len(owed):  # all of it so far: the rest may follow
                self._owed = owed[same:]
                return frames
            start = scan = line = same
        elif self._skip_lf:
            self._skip_lf = False
            lf = buf[scan] == 0x0A
            if self._cr_ended:  # a JSON data line's CR ended the last chunk: now we know
                self._cr_ended = False
                eol, ended = scan - 1, scan + 1 if lf else scan
            if lf:  # the LF of a CRLF
                scan = line = scan + 1
                if not held and not self._passing:
                    # Its CR ended an event already sent: the LF goes on by itself.
                    frames.append(Frame(b"\n", None))
                    start = scan
        passing = self._passing
        for match in _LINE_END.finditer(buf, scan):
            if match.start() == line:  # a blank line: the event [start, end) is whole
                end = match.end()
                if self._passed + end - start > self.max_event:
                    return self._overflow(frames)
                frames.append(Frame(buf[start:end], None if passing else self._dispatch()))
                start = end
                passing, self._passed, ended = False, 0, -1
            elif not passing:
                if ended >= 0:  # no blank line after its JSON data line: it ended there
                    if ended - start > self.max_event:
                        return self._overflow(frames)
                    frames.append(Frame(buf[start:ended] + buf[eol:ended], self._dispatch()))
                    start, ended = ended, -1
                if self._field(buf[line : match.start()]):
                    eol, ended = match.span()
            line = match.end()
        end = len(buf)
        if ended < 0:
            pass
        elif ended == end and buf[-1] == 0x0D:
            # The chunk ends at its CR: the next byte says whether an LF belongs to it.
            self._cr_ended = True
        else:  # it goes now, with the blank line it lacks
            if ended - start > self.max_event:
                return self._overflow(frames)
            owed = buf[eol:ended]
            frames.append(Frame(buf[start:ended] + owed, self._dispatch()))
            if ended == end:  # upstream's own blank line may come next: this was it
                self._owed = owed
            start = ended
        if self._passed + end - start > self.max_event:
            return self._overflow(frames)
        self._skip_lf = line == end and buf[-1] == 0x0D
        if not passing and end - start > MAX_EVENT:
            # Too long to be upstream's done event: stop holding it, pass it on unread.
            passing = True
            self._data, self._event, self._cr_ended = [], "", False
        self._passing = passing
        if passing:
            if start < end:
                frames.append(Frame(buf[start:], None))
                self._passed += end - start
            self._held, self._line = b"", line - end
        else:
            self._held, self._line = buf[start:], line - start
        return frames

    def end_event(self) -> list[Frame]:
        """Frames that end the event in progress with a blank line of the gateway's (a held
        one is read; a half-passed one is closed), so that bytes of ours can follow it."""
        if self.overflowed:
            closing = [Frame(b"\n\n", None)] if self._passing else []
            self._passing = False
            return closing
        return self.feed(b"\n\n")

    def _overflow(self, frames: list[Frame]) -> list[Frame]:
        """An event grew past max_event: the frames before it, and from now on nothing."""
        self.overflowed = True
        self._held, self._line, self._skip_lf, self._owed = b"", 0, False, b""
        self._cr_ended = False
        self._data, self._event = [], ""
        return frames

    def finish(self) -> bytes:
        """The stream is over: whatever is still held (an incomplete event, unread)."""
        rest = self._held
        self._held, self._line, self._passing, self._owed = b"", 0, False, b""
        self._cr_ended = False
        self._data, self._event = [], ""
        return rest

    def _field(self, raw: bytes) -> bool:
        """Read one field line; True for a data line that ends its event (the event's first
        data line, its value one JSON object: `{` … `}`)."""
        if raw[:1] == b":":  # a comment
            return False
        name, colon, value = raw.decode("utf-8", "replace").partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            first = not self._data
            self._data.append(value)
            return first and value[:1] == "{" and value[-1:] == "}"
        if name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return False

    def _dispatch(self) -> Event | None:
        if not self._data:
            self._event = ""
            return None
        event = Event(data="\n".join(self._data), event=self._event or "message", id=self._id)
        self._data = []
        self._event = ""
        return event


def with_data(raw: bytes, data: bytes) -> bytes:
    """One whole event's bytes with its data replaced by `data` (one line, no line end):
    every other line kept as sent, a BOM kept in front."""
    bom = _BOM if raw.startswith(_BOM) else b""
    kept, pos = [bom], len(bom)
    for match in _LINE_END.finditer(raw, pos):
        line = raw[pos : match.start()]
        if line and not (line.startswith(b"data") and line[4:5] in (b"", b":")):
            kept.append(raw[pos : match.end()])
        pos = match.end()
    return b"".join(kept) + b"data: " + data + b"\n\n"
