"""The SSE framer: every byte out once and unchanged, cut into whole events, which it reads
exactly as a browser would, however the bytes are cut; but for one rule: a `data:` line that is
its event's first and one JSON object ends its event, which goes out with a blank line after it
if upstream sent none (the deployment guide's one-line-per-event stream)."""

from __future__ import annotations

import itertools
import re

from hypothesis import example, given
from hypothesis import strategies as st

from gateway.sse import MAX_EVENT, Event, Frame, SSEFramer, with_data

_BOM = b"\xef\xbb\xbf"

STREAM = (
    b'data: {"type": "content", "content": "Our business"}\n\n'
    b": a comment line\n"
    b'data: {"type": "content",\ndata:  "content": " hours"}\n\n'
    b"event: ping\nid: 7\ndata\n\n"
    b": keep-alive\n\n"
    b"event: nothing\n\n"
    b'data: {"type": "done", "session_id": "sess_789", "tokens_used": 145}\n\n'
)
EXPECTED = [
    Event(data='{"type": "content", "content": "Our business"}'),
    Event(data='{"type": "content",\n "content": " hours"}'),
    Event(data="", event="ping", id="7"),
    Event(data='{"type": "done", "session_id": "sess_789", "tokens_used": 145}', id="7"),
]
FRAMES = [
    Frame(b'data: {"type": "content", "content": "Our business"}\n\n', EXPECTED[0]),
    Frame(
        b': a comment line\ndata: {"type": "content",\ndata:  "content": " hours"}\n\n', EXPECTED[1]
    ),
    Frame(b"event: ping\nid: 7\ndata\n\n", EXPECTED[2]),
    Frame(b": keep-alive\n\n", None),
    Frame(b"event: nothing\n\n", None),
    Frame(b'data: {"type": "done", "session_id": "sess_789", "tokens_used": 145}\n\n', EXPECTED[3]),
]


def frame(*chunks: bytes) -> list[Frame]:
    framer = SSEFramer()
    frames = [frame for chunk in chunks for frame in framer.feed(chunk)]
    assert framer.finish() == b""
    return frames


def scan(*chunks: bytes) -> list[Event]:
    return [f.event for f in frame(*chunks) if f.event is not None]


def cut(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(points)]


def crlf_rejoined(frames: list[Frame]) -> list[Frame]:
    """`frames` with the LF of a CRLF cut from its CR put back: the one split the framer
    cannot undo, since it passes an event on at its last CR without waiting for an LF."""
    out: list[Frame] = []
    for f in frames:
        if f.raw == b"\n" and out and out[-1].raw.endswith(b"\r"):
            out[-1] = Frame(out[-1].raw + b"\n", out[-1].event)
        else:
            out.append(f)
    return out


def reference_events(stream: bytes, json_lines: bool = False) -> list[Event]:
    """WHATWG's event stream interpretation, over a whole stream at once; with `json_lines`,
    the framer's rule too: an event's first data line, when it is `{…}`, dispatches it (but
    for one ended by a CR that is the stream's last byte: an LF might have followed)."""
    events, data, kind, last_id = [], list[str](), "", None
    text = stream.removeprefix(b"\xef\xbb\xbf")
    *lines, _incomplete = re.split(rb"\r\n|\r|\n", text)
    for index, raw in enumerate(lines):
        if not raw:
            if data:
                events.append(Event("\n".join(data), kind or "message", last_id))
            data, kind = [], ""
            continue
        name, colon, value = raw.decode("utf-8", "replace").partition(":")
        value = value[1:] if value.startswith(" ") else value
        if not name and colon:
            continue
        if name == "data":
            data.append(value)
            waits = index == len(lines) - 1 and text.endswith(b"\r")
            if json_lines and data == [value] and value[:1] + value[-1:] == "{}" and not waits:
                events.append(Event(value, kind or "message", last_id))
                data, kind = [], ""
        elif name == "event":
            kind = value
        elif name == "id" and "\0" not in value:
            last_id = value
    return events


# --- frames ----------------------------------------------------------------------------


def test_whole_stream_in_one_chunk() -> None:
    assert frame(STREAM) == FRAMES
    assert scan(STREAM) == EXPECTED


def test_one_byte_at_a_time() -> None:
    assert frame(*(STREAM[i : i + 1] for i in range(len(STREAM)))) == FRAMES


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_split_gives_the_same_frames(cuts: list[int]) -> None:
    assert frame(*cut(STREAM, cuts)) == FRAMES


@given(st.sampled_from([b"\r\n", b"\r", b"\n"]), st.integers(min_value=1, max_value=40))
def test_every_line_ending_with_cr_split_from_lf(newline: bytes, at: int) -> None:
    stream = STREAM.replace(b"\n", newline)
    frames = frame(stream[:at], stream[at:])
    assert b"".join(f.raw for f in frames) == stream
    assert [f.event for f in frames if f.event is not None] == EXPECTED
    assert crlf_rejoined(frames) == [Frame(f.raw.replace(b"\n", newline), f.event) for f in FRAMES]


_PIECES = [
    b"data: x",
    b"data: {}",
    b'data:{"a": 1}',
    b"data: {",
    b"data: }",
    # A JSON data line with its line end, as the deployment guide's stream is made of.
    b"\ndata: {}\n",
    b'\r\ndata: {"a": 1}\r\n',
    b"\rdata:{}\r",
    b"data:y",
    b"data",
    b"data: \xe2\x98\x83",
    b"event: e",
    b"id: 3",
    b"id: a\x00b",
    b": comment",
    b":",
    b"retry: 10",
    b"\xef\xbb\xbf",
    b"",
    b"\r",
    b"\n",
    b"\r\n",
]


def without_line_ends(stream: bytes) -> bytes:
    return stream.replace(b"\r", b"").replace(b"\n", b"")


@given(
    st.lists(st.sampled_from(_PIECES), max_size=30).map(b"".join),
    st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_any_stream_any_split_adds_only_blank_lines_and_reads_the_same_events(
    stream: bytes, cuts: list[int]
) -> None:
    framer = SSEFramer()
    whole = framer.feed(stream)
    whole_out = b"".join(f.raw for f in whole) + framer.finish()
    pieces = cut(stream, [c for c in cuts if c <= len(stream)])
    framer = SSEFramer()
    split = [f for piece in pieces for f in framer.feed(piece)]
    split_out = b"".join(f.raw for f in split) + framer.finish()

    events = reference_events(stream, json_lines=True)
    for frames, out in ((whole, whole_out), (split, split_out)):
        # Nothing but line ends added or taken (a blank line after a JSON data line upstream
        # left without one, upstream's own taken as that one when it follows split off),
        assert without_line_ends(out) == without_line_ends(stream)
        # and the framer and a browser reading what it passes on see the same events.
        assert [f.event for f in frames if f.event is not None] == events
        assert reference_events(out) == events
    if b"{" not in stream:  # no JSON data line: every byte once, unchanged, in order
        assert whole_out == split_out == stream
        assert crlf_rejoined(split) == crlf_rejoined(whole)


_LINES = [b"event: e", b"id: 3", b": comment", b"data: x", b"retry: 10", b"data"]
_JSON_LINES = [b"data: {}", b'data:{"a": 1}', b'data: {"type": "done"}']


@st.composite
def well_formed_streams(draw: st.DrawFn) -> bytes:
    """Events in one line-end style, a JSON data line only where a blank line follows it."""
    newline = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    events = draw(
        st.lists(
            st.tuples(
                st.lists(st.sampled_from(_LINES), max_size=3),
                st.lists(st.sampled_from(_JSON_LINES), max_size=1),
            ),
            max_size=8,
        )
    )
    return b"".join(newline.join([*fields, *json, b""]) + newline for fields, json in events)


@given(well_formed_streams(), st.lists(st.integers(min_value=0, max_value=300), max_size=8))
def test_a_well_formed_stream_goes_out_byte_for_byte_however_cut(
    stream: bytes, cuts: list[int]
) -> None:
    framer = SSEFramer()
    whole = framer.feed(stream)
    assert framer.finish() == b""
    framer = SSEFramer()
    split = [
        f
        for piece in cut(stream, [c for c in cuts if c <= len(stream)])
        for f in framer.feed(piece)
    ]
    assert framer.finish() == b""
    assert b"".join(f.raw for f in whole) == b"".join(f.raw for f in split) == stream
    assert crlf_rejoined(split) == crlf_rejoined(whole)
    assert [f.event for f in whole if f.event is not None] == reference_events(stream)


@given(
    st.sampled_from([b"\n", b"\r\n"]),
    st.lists(st.sampled_from(_JSON_LINES), min_size=1, max_size=6),
    st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_a_line_per_event_stream_gets_a_blank_line_after_each_event_however_cut(
    newline: bytes, lines: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(line + newline for line in lines)
    framer = SSEFramer()
    frames = [
        f
        for piece in cut(stream, [c for c in cuts if c <= len(stream)])
        for f in framer.feed(piece)
    ]
    assert framer.finish() == b""
    # One frame per line, each as soon as its line end is in (an LF split from its CR aside).
    assert crlf_rejoined(frames) == [
        Frame(line + newline * 2, Event(line.removeprefix(b"data:").strip().decode()))
        for line in lines
    ]


def test_a_frame_is_the_chunk_itself_when_the_chunk_is_one_event() -> None:
    event = b'data: {"type": "content", "content": "Hi"}\n\n'
    (only,) = SSEFramer().feed(event)
    assert only.raw is event  # not copied


def test_an_incomplete_event_is_held_until_its_blank_line() -> None:
    framer = SSEFramer()
    event = b'data: {"type": "content",\ndata:  "content": "Hi"}\n\n'
    read = Event('{"type": "content",\n "content": "Hi"}')
    assert framer.feed(event + event[:10]) == [Frame(event, read)]
    assert framer.feed(event[10:-1]) == []
    assert framer.feed(event[-1:]) == [Frame(event, read)]
    assert framer.feed(b"data: {") == []
    assert framer.finish() == b"data: {"


# --- reading ---------------------------------------------------------------------------


def test_crlf_split_between_cr_and_lf_is_one_line_end() -> None:
    assert scan(b"data: a\r", b"\ndata: b\r\n\r\n") == [Event(data="a\nb")]


def test_an_event_ending_in_cr_leaves_at_once_and_its_lf_after_it() -> None:
    framer = SSEFramer()
    assert framer.feed(b"data: a\r\r") == [Frame(b"data: a\r\r", Event("a"))]
    assert framer.at_boundary
    assert framer.feed(b"\ndata: b\r\n\r\n") == [
        Frame(b"\n", None),
        Frame(b"data: b\r\n\r\n", Event("b")),
    ]


def test_leading_bom_is_ignored_and_kept() -> None:
    # It goes on at once, alone: the caller is between events after it.
    assert frame(b"\xef\xbb", b"\xbfdata: x\n\n") == [
        Frame(_BOM, None),
        Frame(b"data: x\n\n", Event("x")),
    ]
    assert scan(b"\xef\xbb\xbf\n", b"data: x\n\n") == [Event(data="x")]
    # Only the stream's first: another is part of a field name.
    assert scan(b"\xef\xbb\xbfdata: x\n\n\xef\xbb\xbfdata: y\n\n") == [Event(data="x")]


def test_event_without_data_is_framed_not_dispatched() -> None:
    assert frame(b"event: only\n\n") == [Frame(b"event: only\n\n", None)]


def test_boundary_tracks_half_sent_events() -> None:
    framer = SSEFramer()
    assert framer.at_boundary
    framer.feed(b'data: {"type": "con')
    assert not framer.at_boundary
    framer.feed(b'tent"}\n')  # a JSON data line: its event is out, with a blank line
    assert framer.at_boundary
    framer.feed(b"\n")  # upstream's own
    assert framer.at_boundary
    framer.feed(b"data: x\n")
    assert not framer.at_boundary
    framer.feed(b"\n")
    assert framer.at_boundary
    framer.feed(b": comment\n")
    assert not framer.at_boundary
    framer.feed(b"\n")
    assert framer.at_boundary
    framer.feed(b"\xef")
    assert SSEFramer().at_boundary


def test_invalid_utf8_does_not_raise() -> None:
    assert scan(b"data: \xff\xfe\n\n") == [Event(data="\ufffd\ufffd")]


# --- upstream's one-line-per-event stream (the deployment guide's) ---------------------

GUIDE = (
    b'data: {"type": "content", "content": "Our business"}\n'
    b'data: {"type": "content", "content": " hours are Monday"}\n'
    b'data: {"type": "done", "session_id": "sess_789", "tokens_used": 145}\n'
)
GUIDE_FRAMES = [Frame(line + b"\n\n", Event(line[6:].decode())) for line in GUIDE.splitlines()]


def test_a_json_data_line_ends_its_event_and_gets_the_blank_line_it_lacks() -> None:
    assert frame(GUIDE) == GUIDE_FRAMES
    assert frame(*(GUIDE[i : i + 1] for i in range(len(GUIDE)))) == GUIDE_FRAMES
    framer = SSEFramer()
    # Out as soon as its line end is in, before anything of the next line.
    assert framer.feed(GUIDE[: GUIDE.index(b"\n") + 1]) == GUIDE_FRAMES[:1]
    assert framer.at_boundary


def test_upstreams_own_blank_line_after_it_goes_out_once() -> None:
    event = b'data: {"type": "content", "content": "Hi"}\r\n\r\n'
    read = Event('{"type": "content", "content": "Hi"}')
    for at in range(len(event) - 4, len(event) + 1):
        framer = SSEFramer()
        out = framer.feed(event[:at]) + framer.feed(event[at:])
        # However cut: upstream's bytes, once (an LF cut from its CR follows it alone).
        assert crlf_rejoined(out) == [Frame(event, read)], at
    # Only a blank line the same as the one it got is taken for it; another is passed on.
    framer = SSEFramer()
    assert framer.feed(b"data: {}\n") == [Frame(b"data: {}\n\n", Event("{}"))]
    assert framer.feed(b"\r\n") == [Frame(b"\r\n", None)]


def test_a_cr_at_a_chunks_end_waits_for_the_byte_after_it() -> None:
    framer = SSEFramer()
    assert framer.feed(b"data: {}\r") == []  # CR or CRLF: the next byte tells
    assert not framer.at_boundary
    assert framer.feed(b"\n") == [Frame(b"data: {}\r\n\r\n", Event("{}"))]
    assert framer.feed(b"\r\n") == []  # upstream's blank line: the one already sent
    # Bare CRs: the blank line it lacks is a CR.
    framer = SSEFramer()
    assert framer.feed(b"data: {}\r") == []
    assert framer.feed(b"data: {}\r") == [Frame(b"data: {}\r\r", Event("{}"))]
    assert framer.feed(b"\r") == [Frame(b"data: {}\r\r", Event("{}"))]  # upstream's own
    # A stream that ends there has not finished that event: passed on unread.
    assert framer.feed(b"data: {}\r") == []
    assert framer.finish() == b"data: {}\r"


def test_other_data_lines_keep_the_blank_line_rule() -> None:
    # Not the event's first data line, or not one JSON object: read as WHATWG says.
    for held in (b"data: x\ndata: {}\n", b"data: {\ndata: }\n", b'data: {"a": 1}x\n'):
        framer = SSEFramer()
        assert framer.feed(held) == [], held
        assert framer.feed(b"\n") == [Frame(held + b"\n", scan(held + b"\n")[0])]


def test_lines_after_a_json_data_line_begin_the_next_event() -> None:
    assert frame(b"event: first\ndata: {}\nevent: second\nid: 2\ndata: {}\n\n") == [
        Frame(b"event: first\ndata: {}\n\n", Event("{}", "first")),
        Frame(b"event: second\nid: 2\ndata: {}\n\n", Event("{}", "second", "2")),
    ]


def test_a_bom_and_comments_around_json_data_lines() -> None:
    assert frame(_BOM + b": hi\ndata: {}\n: there\ndata: {}\n") == [
        Frame(_BOM, None),
        Frame(b": hi\ndata: {}\n\n", Event("{}")),
        Frame(b": there\ndata: {}\n\n", Event("{}")),
    ]
    framer = SSEFramer()
    assert framer.feed(b"data: {}\n") == [Frame(b"data: {}\n\n", Event("{}"))]
    # Between its event and upstream's blank line: the caller is between events.
    assert framer.comment(b"keep-alive") == b": keep-alive\n\n"
    assert framer.feed(b"\ndata: {}\n\n") == [Frame(b"data: {}\n\n", Event("{}"))]


def test_a_last_json_data_line_without_its_line_end_is_not_an_event() -> None:
    # As WHATWG says of an unfinished line at the end of a stream: it may be cut short.
    framer = SSEFramer()
    assert framer.feed(b'data: {"type": "done"}') == []
    assert framer.finish() == b'data: {"type": "done"}'


def test_each_line_per_event_event_counts_alone_against_max_event() -> None:
    line = b'data: {"type": "content", "content": "' + b"x" * 40 + b'"}\n'
    framer = SSEFramer(max_event=len(line) + 1)
    frames = framer.feed(line * 100)
    assert len(frames) == 100 and not framer.overflowed
    assert len(framer.feed(b"data: {" + b"y" * len(line) + b"}\n")) == 0
    assert framer.overflowed


# --- an event too long to hold ----------------------------------------------------------


def test_an_overlong_event_passes_on_unread_and_unheld() -> None:
    framer = SSEFramer()
    start, piece = b"data: before\ndata: ", b"data: " + b"x" * 65536
    assert framer.feed(start) == []
    out = [f for _ in range(20) for f in framer.feed(piece)]
    # Once past MAX_EVENT its bytes went out, unread (`before` included), and nothing is held:
    assert b"".join(f.raw for f in out) == start + piece * 20
    assert all(f.event is None for f in out)
    # each further chunk of it goes on at once,
    assert framer.feed(piece) == [Frame(piece, None)]
    assert framer.feed(b"xx\r") == [Frame(b"xx\r", None)]
    assert not framer.at_boundary
    # up to its blank line (here the CRLF after a CR); reading starts again after it.
    assert framer.feed(b"\n\r\ndata: after\n\n") == [
        Frame(b"\n\r\n", None),
        Frame(b"data: after\n\n", Event("after")),
    ]
    assert framer.at_boundary


def test_an_overlong_event_loses_no_byte_however_cut() -> None:
    long = b"data: " + b"y" * (MAX_EVENT + 100_000) + b"\n\n"
    stream = b"data: a\n\n" + long + b"data: b\n\n"
    for size in (1000, 65536, len(stream)):
        framer = SSEFramer()
        frames = [
            f for at in range(0, len(stream), size) for f in framer.feed(stream[at : at + size])
        ]
        assert b"".join(f.raw for f in frames) + framer.finish() == stream
        events = [f.event for f in frames if f.event is not None]
        if size < len(stream):  # held past MAX_EVENT: passed on unread
            assert events == [Event("a"), Event("b")]
        else:  # whole in one chunk, never held: read like any other
            assert events == [Event("a"), Event(long[6:-2].decode()), Event("b")]


# --- a comment of the gateway's own (the stream's heartbeat) ---------------------------


def test_a_comment_goes_between_events_and_a_held_event_follows_it() -> None:
    framer = SSEFramer()
    event = b'data: {"type": "content", "content": "Hi"}\n\n'
    assert framer.feed(event + event[:10]) == [Frame(event, Event(event[6:-2].decode()))]
    # Half of the next event is held, not sent: the caller is between events.
    assert framer.comment(b"keep-alive") == b": keep-alive\n\n"
    assert framer.feed(event[10:]) == [Frame(event, Event(event[6:-2].decode()))]
    assert framer.finish() == b""


def test_no_comment_inside_an_event_passed_on_piece_by_piece() -> None:
    framer = SSEFramer()
    framer.feed(b"data: " + b"x" * MAX_EVENT)
    assert framer.comment(b"keep-alive") == b""  # its first piece has gone out
    framer.feed(b"xx\n")
    assert framer.comment(b"keep-alive") == b""
    framer.feed(b"\n")
    assert framer.comment(b"keep-alive") == b": keep-alive\n\n"


def test_a_bom_after_a_leading_comment_is_dropped() -> None:
    framer = SSEFramer()
    assert framer.comment(b"keep-alive") == b": keep-alive\n\n"
    assert framer.feed(b"\xef\xbb") == []
    assert framer.feed(b"\xbfdata: x\n\n") == [Frame(b"data: x\n\n", Event("x"))]
    # A BOM that came first went on at once: a comment follows it.
    later = SSEFramer()
    assert later.feed(_BOM + b"data: ") == [Frame(_BOM, None)]
    assert later.comment(b"keep-alive") == b": keep-alive\n\n"
    assert later.feed(b"x\n\n") == [Frame(b"data: x\n\n", Event("x"))]


@given(
    st.lists(st.sampled_from(_PIECES), max_size=30).map(b"".join),
    st.lists(st.integers(min_value=0, max_value=200), max_size=8),
    st.lists(st.booleans(), max_size=10),
)
@example(stream=_BOM, cuts=[], comment_after=[True])  # a BOM, then nothing: dropped still
def test_comments_wherever_allowed_leave_what_a_browser_reads_unchanged(
    stream: bytes, cuts: list[int], comment_after: list[bool]
) -> None:
    framer, fed, sent, bom_dropped = SSEFramer(), b"", list[bytes](), False
    pieces = [b"", *cut(stream, [c for c in cuts if c <= len(stream)])]
    for piece, comment in zip(pieces, comment_after + [False] * len(pieces), strict=False):
        sent += [f.raw for f in framer.feed(piece)]
        fed += piece
        if comment:
            sent.append(framer.comment(b"keep-alive"))
            # Before upstream's first byte (or within its BOM): that BOM would not lead.
            bom_dropped = bom_dropped or (len(fed) < len(_BOM) and _BOM.startswith(fed))
    caller = b"".join(sent) + framer.finish()
    assert reference_events(caller) == reference_events(stream, json_lines=True)
    # Without the comments: what the same cuts give without any (a BOM after one dropped).
    quiet = SSEFramer()
    if bom_dropped:
        quiet.comment(b"keep-alive")
    alone = b"".join(f.raw for piece in pieces for f in quiet.feed(piece)) + quiet.finish()
    assert caller.replace(b": keep-alive\n\n", b"") == alone


# --- a done event rebuilt --------------------------------------------------------------


def test_with_data_replaces_only_the_data_lines() -> None:
    raw = b'\xef\xbb\xbf: note\r\nevent: done\r\ndata: {"a":\r\nid: 4\r\ndata: 1}\r\n\r\n'
    assert with_data(raw, b'{"a": 2}') == (
        b'\xef\xbb\xbf: note\r\nevent: done\r\nid: 4\r\ndata: {"a": 2}\n\n'
    )
    assert scan(with_data(raw, b'{"a": 2}')) == [Event('{"a": 2}', "done", "4")]
