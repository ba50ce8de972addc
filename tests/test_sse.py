"""The SSE scanner finds exactly the events a browser would, however the bytes are cut."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from gateway.sse import Event, SSEScanner

STREAM = (
    b'data: {"type": "content", "content": "Our business"}\n\n'
    b": a comment line\n"
    b'data: {"type": "content",\ndata:  "content": " hours"}\n\n'
    b"event: ping\nid: 7\ndata\n\n"
    b'data: {"type": "done", "session_id": "sess_789", "tokens_used": 145}\n\n'
)
EXPECTED = [
    Event(data='{"type": "content", "content": "Our business"}'),
    Event(data='{"type": "content",\n "content": " hours"}'),
    Event(data="", event="ping", id="7"),
    Event(data='{"type": "done", "session_id": "sess_789", "tokens_used": 145}', id="7"),
]


def scan(*chunks: bytes) -> list[Event]:
    scanner = SSEScanner()
    return [event for chunk in chunks for event in scanner.feed(chunk)]


def test_whole_stream_in_one_chunk() -> None:
    assert scan(STREAM) == EXPECTED


def test_one_byte_at_a_time() -> None:
    assert scan(*(STREAM[i : i + 1] for i in range(len(STREAM)))) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(STREAM)]
    assert scan(*(STREAM[a:b] for a, b in itertools.pairwise(points))) == EXPECTED


@given(st.sampled_from([b"\r\n", b"\r", b"\n"]), st.integers(min_value=1, max_value=40))
def test_every_line_ending_with_cr_split_from_lf(newline: bytes, cut: int) -> None:
    stream = STREAM.replace(b"\n", newline)
    assert scan(stream[:cut], stream[cut:]) == EXPECTED


def test_crlf_split_between_cr_and_lf_is_one_line_end() -> None:
    assert scan(b"data: a\r", b"\ndata: b\r\n\r\n") == [Event(data="a\nb")]


def test_leading_bom_is_ignored() -> None:
    assert scan(b"\xef\xbb", b"\xbfdata: x\n\n") == [Event(data="x")]


def test_event_without_data_is_not_dispatched() -> None:
    assert scan(b"event: only\n\n") == []


def test_boundary_tracks_half_sent_events() -> None:
    scanner = SSEScanner()
    assert scanner.at_boundary
    scanner.feed(b'data: {"type": "con')
    assert not scanner.at_boundary
    scanner.feed(b'tent"}\n')
    assert not scanner.at_boundary
    scanner.feed(b"\n")
    assert scanner.at_boundary


def test_invalid_utf8_does_not_raise() -> None:
    assert scan(b"data: \xff\xfe\n\n") == [Event(data="\ufffd\ufffd")]


def test_an_endless_line_is_dropped_instead_of_buffered() -> None:
    scanner = SSEScanner()
    scanner.feed(b"data: before\ndata: ")
    for _ in range(20):
        scanner.feed(b"data: " + b"x" * 65536)
    assert scanner.overflowed
    assert scanner.feed(b"xx\n\ndata: after\n\n") == [Event(data="before"), Event(data="after")]
