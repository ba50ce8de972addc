"""The relay: one stream's bytes framed once, tallied, and passed on unchanged but for the
`done` event's session id."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.pacing import SLICE
from gateway.relay import EventRelay
from gateway.sessions import SessionScope
from gateway.usage import Usage

STREAM = (
    b": comment\r\n"
    b'data: {"type": "content", "content": "Our business"}\r\n\r\n'
    b'data: {"type": "content", "content": " hours"}\r\r'
    b"event: ping\n\n"
    b'data: {"type": "done", "session_id": "gw:acme:s1", "usage": '
    b'{"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}}\n\n'
)
TRANSLATED = STREAM.replace(b'"gw:acme:s1"', b'"s1"')


def relayed(relay: EventRelay, cuts: list[int], stream: bytes = STREAM) -> bytes:
    points = [0, *sorted(cuts), len(stream)]
    out = [relay.feed(stream[a:b]) for a, b in itertools.pairwise(points)]
    return b"".join(out) + relay.finish(close=False)


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=8))
def test_any_split_passes_the_same_bytes_and_tally(cuts: list[int]) -> None:
    plain, isolated = EventRelay(SessionScope(None)), EventRelay(SessionScope("gw:acme:"))
    assert relayed(plain, cuts) == STREAM
    assert relayed(isolated, cuts) == TRANSLATED
    for relay in (plain, isolated):
        tally = relay.tally
        assert tally.done and not tally.errored
        assert tally.usage == Usage(3, 4, 7)
        assert tally.session_id == "gw:acme:s1"  # as upstream knows it
        assert tally.content_chars == len("Our business hours")


def test_a_chunk_of_several_events_goes_out_in_one_piece() -> None:
    relay = EventRelay(SessionScope("gw:acme:"))
    assert relay.feed(STREAM[:-5]) == TRANSLATED[: TRANSLATED.index(b'data: {"type": "done"')]
    assert relay.feed(STREAM[-5:]) == TRANSLATED[TRANSLATED.index(b'data: {"type": "done"') :]


def test_finish_closes_a_half_sent_event_only_when_asked() -> None:
    relay = EventRelay(SessionScope(None))
    assert relay.feed(b'data: {"type": "content", "content": "Hi"}\n\ndata: {"ty') == (
        b'data: {"type": "content", "content": "Hi"}\n\n'
    )
    assert relay.finish(close=False) == b'data: {"ty'
    relay = EventRelay(SessionScope(None))
    relay.feed(b"data: x\n\n")
    assert relay.finish(close=True) == b""  # nothing half-sent: nothing to close
    relay = EventRelay(SessionScope(None))
    relay.feed(b"data: x\r")  # a CR, then the stream broke off
    assert relay.finish(close=True) == b"data: x\r\n\n"


def test_a_done_event_closed_by_the_gateway_is_translated_but_not_counted() -> None:
    relay = EventRelay(SessionScope("gw:acme:"))
    # Its data in two lines, neither a JSON object alone: the event waits for a blank line.
    assert relay.feed(b'data: {"type": "done",\ndata: "session_id": "gw:acme:s1"}\n') == b""
    # A blank line after the line end: one LF more than needed, a blank line that is nothing.
    assert relay.finish(close=True) == (b'data: {"type": "done",\ndata: "session_id": "s1"}\n\n\n')
    assert not relay.tally.done  # upstream never finished it


def test_a_drain_tallies_and_sends_nothing() -> None:
    relay = EventRelay(SessionScope("gw:acme:"))
    assert relay.feed(STREAM[:40]) == b""
    for at in range(40, len(STREAM), 9):
        relay.drain(STREAM[at : at + 9])
    assert relay.tally.done and relay.tally.usage == Usage(3, 4, 7)


def test_event_data_that_is_not_a_json_object_is_passed_and_not_counted() -> None:
    relay = EventRelay(SessionScope("gw:acme:"))
    odd = b'data: "gw:acme:s1"\n\ndata: [[[[' + b"[" * 100_000 + b"\n\ndata: not json\n\n"
    assert relay.feed(odd) == odd
    tally = relay.tally
    assert (tally.done, tally.errored, tally.content_chars) == (False, False, 0)


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=8))
def test_heartbeats_between_any_chunks_change_neither_the_events_nor_the_tally(
    cuts: list[int],
) -> None:
    relay = EventRelay(SessionScope("gw:acme:"))
    points = [0, *sorted(cuts), len(STREAM)]
    out = [relay.keep_alive()]
    for a, b in itertools.pairwise(points):
        out += [relay.feed(STREAM[a:b]), relay.keep_alive()]
    caller = b"".join(out) + relay.finish(close=False)
    assert caller.count(b": keep-alive\n\n") == len(points)
    assert caller.replace(b": keep-alive\n\n", b"") == TRANSLATED
    tally = relay.tally
    assert tally.done and tally.usage == Usage(3, 4, 7)
    assert tally.content_chars == len("Our business hours")


# The deployment guide's stream: one `data:` line per event, no blank line between them.
LINES = (
    b'data: {"type": "content", "content": "Our business"}\r\n'
    b'data: {"type": "content", "content": " hours"}\r\n'
    b'data: {"type": "done", "session_id": "gw:acme:s1", "tokens_used": 145}\r\n'
)


@given(st.lists(st.integers(min_value=0, max_value=len(LINES)), max_size=8))
def test_a_line_per_event_stream_passes_each_event_with_its_blank_line(cuts: list[int]) -> None:
    relay = EventRelay(SessionScope("gw:acme:"))
    expected = LINES.replace(b"}\r\n", b"}\r\n\r\n").replace(b'"gw:acme:s1"', b'"s1"')
    assert relayed(relay, cuts, LINES) == expected
    tally = relay.tally
    assert tally.done and tally.usage == Usage(None, None, 145)
    assert tally.content_chars == len("Our business hours")


def test_a_drain_of_a_line_per_event_stream_reads_its_done_event() -> None:
    relay = EventRelay(SessionScope("gw:acme:"))
    relay.drain(LINES)
    assert relay.tally.done and relay.tally.usage == Usage(None, None, 145)


# Hundreds of tiny events and the done event in one chunk, as a fast upstream's bytes pile up.
CONTENT = b'data: {"type": "content", "content": "hi"}\n\n'
PILED_UP = CONTENT * 1000 + STREAM


class Turns:
    """A pacer's `turn` that counts how often it was awaited; with `cancel_at`, that one
    is cancelled, as when the caller leaves while the stream waits for its turn."""

    def __init__(self, cancel_at: int | None = None) -> None:
        self.taken = 0
        self.cancel_at = cancel_at

    async def turn(self) -> None:
        self.taken += 1
        if self.taken == self.cancel_at:
            raise asyncio.CancelledError


async def test_a_big_chunk_is_framed_in_slices_with_the_same_bytes_and_tally() -> None:
    relay, turns = EventRelay(SessionScope("gw:acme:")), Turns()
    passed = await relay.feed_paced(PILED_UP, turns.turn)
    assert passed + relay.finish(close=False) == CONTENT * 1000 + TRANSLATED
    assert turns.taken == -(-len(PILED_UP) // SLICE)  # a turn before each slice
    tally = relay.tally
    assert tally.done and tally.usage == Usage(3, 4, 7)
    assert tally.content_chars == 2000 + len("Our business hours")


async def test_a_caller_leaving_between_slices_leaves_the_rest_for_the_drain() -> None:
    relay = EventRelay(SessionScope("gw:acme:"))
    with pytest.raises(asyncio.CancelledError):
        await relay.feed_paced(PILED_UP, Turns(cancel_at=3).turn)
    assert relay.unread == PILED_UP[2 * SLICE :]  # two slices were framed
    relay.drain(relay.unread)  # what the drain reads first (Admission.read_on)
    assert relay.tally.done and relay.tally.usage == Usage(3, 4, 7)
    assert relay.tally.content_chars == 2000 + len("Our business hours")
