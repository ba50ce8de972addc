"""The api.thinnest.ai simulator, specified by its behaviour.

Upstream's contract (chat endpoint, key kinds, error bodies, SSE framing, sessions, rate-limit
headers) comes first; then the `/_sim/` fault-injection and inspection API the gateway's own
tests and benchmarks drive; then configuration loading.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import statistics
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import FrozenInstanceError, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from gateway.simulator import (
    HELD_STREAMS,
    AgentConfig,
    RateLimitConfig,
    SimulatorConfig,
    create_simulator_app,
    load_simulator_config,
    parse_simulator_config,
)
from gateway.simulator.replies import compose_reply, split_reply
from gateway.simulator.sessions import Turn
from tests.conftest import FakeClock

SimClient = TestClient[web.Request, web.Application]
MakeSim = Callable[[SimulatorConfig], Awaitable[SimClient]]

SUPPORT_KEY = "ak_support_1"
SALES_KEY = "ak_sales_1"
PLATFORM_KEY = "thns_sk_test_1"
OTHER_PLATFORM_KEY = "thns_sk_test_2"
START = 1_700_000_000.0  # 2023-11-14T22:13:20Z: 40 s before a minute boundary.

CONFIG = SimulatorConfig(
    agents={
        "ag_support": AgentConfig(name="Support", keys=(SUPPORT_KEY,)),
        "ag_sales": AgentConfig(name="Sales", keys=(SALES_KEY,)),
        "ag_usage": AgentConfig(name="Usage", usage_format="usage"),
        "ag_tokens": AgentConfig(name="Tokens", usage_format="tokens_used"),
    },
    platform_keys=(PLATFORM_KEY, OTHER_PLATFORM_KEY),
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def make_sim(aiohttp_client: AiohttpClient, clock: FakeClock) -> MakeSim:
    async def make(config: SimulatorConfig) -> SimClient:
        return await aiohttp_client(create_simulator_app(config, clock=clock))

    return make


@pytest.fixture
async def sim(make_sim: MakeSim) -> SimClient:
    return await make_sim(CONFIG)


async def chat(
    client: SimClient,
    body: object,
    *,
    agent: str = "ag_support",
    key: str | None = PLATFORM_KEY,
    headers: Mapping[str, str] | None = None,
    client_timeout: aiohttp.ClientTimeout | None = None,
) -> aiohttp.ClientResponse:
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent.setdefault("Content-Type", "application/json")
    path = f"/v1/agents/{agent}/chat"
    if client_timeout is None:
        return await client.post(path, data=data, headers=sent)
    return await client.post(path, data=data, headers=sent, timeout=client_timeout)


async def reply_json(client: SimClient, body: object, **kwargs: Any) -> dict[str, Any]:
    response = await chat(client, body, **kwargs)
    assert response.status == 200, await response.text()
    result: dict[str, Any] = await response.json()
    return result


async def error_of(response: aiohttp.ClientResponse) -> tuple[int, str, str]:
    """(status, code, message) of a documented error body, checking its exact shape."""
    body = await response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    return response.status, body["error"]["code"], body["error"]["message"]


def parse_sse(raw: bytes) -> list[dict[str, Any]]:
    text = raw.decode()
    assert text.endswith("\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        assert "\n" not in block
        events.append(json.loads(block.removeprefix("data: ")))
    return events


async def add_fault(client: SimClient, spec: Mapping[str, object]) -> dict[str, Any]:
    response = await client.post("/_sim/faults", json=spec)
    assert response.status == 201, await response.text()
    result: dict[str, Any] = await response.json()
    return result


async def read_event(response: aiohttp.ClientResponse) -> dict[str, Any]:
    [event] = parse_sse(await response.content.readuntil(b"\n\n"))
    return event


def content_of(events: list[dict[str, Any]]) -> str:
    return "".join(event["content"] for event in events if event["type"] == "content")


def tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


# --- Authentication: agent keys (one agent) and platform keys (every agent) ---------------


async def test_an_agent_key_works_for_its_own_agent(sim: SimClient) -> None:
    body = await reply_json(sim, {"message": "Hi"}, key=SUPPORT_KEY, agent="ag_support")
    assert body["response"].startswith("[ag_support] ")


@pytest.mark.parametrize("agent", ["ag_support", "ag_sales", "ag_usage"])
async def test_a_platform_key_works_for_every_agent(sim: SimClient, agent: str) -> None:
    body = await reply_json(sim, {"message": "Hi"}, key=PLATFORM_KEY, agent=agent)
    assert body["response"].startswith(f"[{agent}] ")


async def test_an_agent_key_is_refused_for_another_agent(sim: SimClient) -> None:
    response = await chat(sim, {"message": "Hi"}, key=SUPPORT_KEY, agent="ag_sales")
    assert (await error_of(response))[:2] == (401, "unauthorized")


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer ak_nope", "ak_support_1"],
)
async def test_a_missing_or_invalid_key_is_unauthorized(
    sim: SimClient, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await chat(sim, {"message": "Hi"}, key=None, headers=headers)
    assert (await error_of(response))[:2] == (401, "unauthorized")


@pytest.mark.parametrize(
    ("authorization", "agent"),
    [
        (None, "ag_support"),
        ("Basic dXNlcjpwYXNz", "ag_support"),
        ("Bearer ak_nope", "ag_support"),
        (f"Bearer {SUPPORT_KEY}", "ag_sales"),
    ],
    ids=["missing", "not-bearer", "unknown-key", "agent-key-for-another-agent"],
)
async def test_a_401_carries_rate_limit_headers_and_counts_against_no_key(
    sim: SimClient, authorization: str | None, agent: str
) -> None:
    # "Rate limit headers are included in every response" (deployment guide). Which window a
    # request without a usable key is counted in is not documented: the simulator counts none
    # and reports the presented key's window as it stands (a fresh one for a key it does not
    # know).
    await chat(sim, {"message": "Hi"}, key=SUPPORT_KEY)
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await chat(sim, {"message": "Hi"}, agent=agent, key=None, headers=headers)
    assert response.status == 401
    reset = str(int(START) // 60 * 60 + 60)
    assert response.headers["X-RateLimit-Limit"] == "60"
    assert response.headers["X-RateLimit-Reset"] == reset
    spent = 1 if agent == "ag_sales" else 0  # the agent key's own window, as it stands
    assert response.headers["X-RateLimit-Remaining"] == str(60 - spent)
    assert "Retry-After" not in response.headers
    after = await chat(sim, {"message": "Hi"}, key=SUPPORT_KEY)
    assert after.headers["X-RateLimit-Remaining"] == "58"


async def test_the_bearer_scheme_is_case_insensitive(sim: SimClient) -> None:
    headers = {"Authorization": f"bearer {PLATFORM_KEY}"}
    await reply_json(sim, {"message": "Hi"}, key=None, headers=headers)


async def test_an_unknown_agent_is_404_for_a_platform_key(sim: SimClient) -> None:
    response = await chat(sim, {"message": "Hi"}, agent="ag_nobody")
    status, code, message = await error_of(response)
    assert (status, code) == (404, "agent_not_found")
    assert "ag_nobody" in message


async def test_an_unknown_agent_is_401_for_an_agent_key(sim: SimClient) -> None:
    # An agent key proves nothing about other agents, not even that they do not exist.
    response = await chat(sim, {"message": "Hi"}, key=SUPPORT_KEY, agent="ag_nobody")
    assert (await error_of(response))[:2] == (401, "unauthorized")


# --- Request validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        (b"", "JSON"),
        (b"{not json", "JSON"),
        (b"\xff\xfe", "JSON"),
        (b"[" * 100_000, "JSON"),
        ([], "object"),
        ("What?", "object"),
        ({}, "message"),
        ({"message": None}, "message"),
        ({"message": 42}, "message"),
        ({"message": ""}, "message"),
        ({"message": "   "}, "message"),
        ({"message": "Hi", "session_id": 7}, "session_id"),
        ({"message": "Hi", "session_id": ""}, "session_id"),
        ({"message": "Hi", "session_id": "s" * 257}, "session_id"),
        ({"message": "Hi", "stream": "yes"}, "stream"),
        ({"message": "Hi", "stream": 1}, "stream"),
    ],
)
async def test_a_bad_body_is_invalid_request_with_a_message(
    sim: SimClient, body: object, mentions: str
) -> None:
    response = await chat(sim, body)
    status, code, message = await error_of(response)
    assert (status, code) == (400, "invalid_request")
    assert mentions in message
    assert response.headers["X-RateLimit-Limit"] == "60"


async def test_unknown_fields_are_ignored_and_nulls_mean_absent(sim: SimClient) -> None:
    body = {"message": "Hi", "temperature": 0.2, "session_id": None, "stream": None}
    reply = await reply_json(sim, body)
    assert reply["session_id"].startswith("sess_")


# --- Non-streaming replies ----------------------------------------------------------------


async def test_a_reply_has_the_documented_shape_and_deterministic_usage(sim: SimClient) -> None:
    message = "What is your return policy?"
    body = await reply_json(sim, {"message": message, "session_id": "sess_001"})
    assert body == {
        "response": f'[ag_support] You said: "{message}". This is turn 1 of session sess_001.',
        "session_id": "sess_001",
        "usage": {
            "input_tokens": tokens(message),
            "output_tokens": tokens(body["response"]),
            "total_tokens": tokens(message) + tokens(body["response"]),
        },
    }


async def test_without_a_session_id_each_request_starts_a_new_session(sim: SimClient) -> None:
    first = await reply_json(sim, {"message": "Hi"})
    second = await reply_json(sim, {"message": "Hi"})
    assert re.fullmatch(r"sess_[0-9a-f]{24}", first["session_id"])
    assert first["session_id"] != second["session_id"]
    assert "turn 1 of" in second["response"]


# --- Sessions -----------------------------------------------------------------------------


async def test_a_session_remembers_earlier_turns(sim: SimClient) -> None:
    turns = ["What is your return policy?", "How long does it take?", "And for refunds?"]
    replies = [await reply_json(sim, {"message": m, "session_id": "sess_001"}) for m in turns]
    assert replies[1]["response"] == (
        '[ag_support] You said: "How long does it take?". This is turn 2 of session sess_001; '
        'earlier you said: "What is your return policy?".'
    )
    assert replies[2]["response"].endswith(
        'earlier you said: "What is your return policy?", "How long does it take?".'
    )
    # The conversation so far costs input tokens on every later turn.
    assert replies[1]["usage"]["input_tokens"] == tokens(turns[1]) + 16
    assert replies[2]["usage"]["input_tokens"] == tokens(turns[2]) + 32


async def test_sessions_are_keyed_by_id_alone_across_keys_and_agents(sim: SimClient) -> None:
    # Upstream does not scope sessions: this is why the gateway must namespace them.
    await reply_json(sim, {"message": "secret plan", "session_id": "shared"}, key=SUPPORT_KEY)
    other = await reply_json(
        sim, {"message": "Hi", "session_id": "shared"}, key=SALES_KEY, agent="ag_sales"
    )
    assert 'turn 2 of session shared; earlier you said: "secret plan"' in other["response"]


async def test_only_the_three_latest_earlier_messages_are_quoted(sim: SimClient) -> None:
    for number in range(1, 6):
        body = await reply_json(sim, {"message": f"m{number}", "session_id": "s"})
    assert body["response"].endswith(
        'This is turn 5 of session s; earlier you said: "m2", "m3", "m4".'
    )


async def test_the_session_store_is_bounded_least_recently_used_first(
    make_sim: MakeSim,
) -> None:
    sim = await make_sim(replace(CONFIG, max_sessions=2))
    for session in ["a", "b", "a", "c"]:  # "b" is now the least recently used.
        await reply_json(sim, {"message": "Hi", "session_id": session})
    assert (
        "turn 3 of session a"
        in (await reply_json(sim, {"message": "x", "session_id": "a"}))["response"]
    )
    assert (
        "turn 1 of session b"
        in (await reply_json(sim, {"message": "x", "session_id": "b"}))["response"]
    )


# --- Streaming ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "accept"),
    [
        ({"message": "Hi", "session_id": "s1", "stream": True}, None),
        ({"message": "Hi", "session_id": "s1"}, "text/event-stream"),
        ({"message": "Hi", "session_id": "s1", "stream": False}, "text/event-stream, */*"),
    ],
    ids=["stream-flag", "accept-header", "accept-wins-over-false"],
)
async def test_a_stream_is_sse_content_pieces_then_done(
    sim: SimClient, body: dict[str, object], accept: str | None
) -> None:
    headers = {"Accept": accept} if accept else None
    response = await chat(sim, body, headers=headers)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-RateLimit-Remaining"] == "59"
    events = parse_sse(await response.read())
    *contents, done = events
    assert len(contents) >= 3
    assert all(set(e) == {"type", "content"} and e["type"] == "content" for e in contents)
    text = '[ag_support] You said: "Hi". This is turn 1 of session s1.'
    assert content_of(events) == text
    assert done == {"type": "done", "session_id": "s1", "tokens_used": tokens("Hi") + tokens(text)}


async def test_a_stream_without_session_id_announces_the_new_one(sim: SimClient) -> None:
    response = await chat(sim, {"message": "Hi", "stream": True})
    *contents, done = parse_sse(await response.read())
    assert done["session_id"].startswith("sess_")
    assert f"of session {done['session_id']}." in content_of(contents)


async def test_newlines_in_a_message_do_not_break_sse_framing(sim: SimClient) -> None:
    response = await chat(sim, {"message": "line one\n\ndata: fake\n", "stream": True})
    events = parse_sse(await response.read())
    assert "line one\n\ndata: fake\n" in content_of(events)


async def test_events_are_sent_separately_chunk_interval_apart(make_sim: MakeSim) -> None:
    sim = await make_sim(replace(CONFIG, chunk_interval=0.03))
    response = await chat(sim, {"message": "Hi", "stream": True})
    loop = asyncio.get_running_loop()
    arrivals = []
    while (await read_event(response))["type"] != "done":
        arrivals.append(loop.time())
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    # The median, so one late read on a busy machine cannot fail the test.
    assert len(gaps) >= 2 and statistics.median(gaps) >= 0.02


@given(message=st.text(min_size=1, max_size=300), turn=st.integers(1, 9))
@settings(max_examples=200, deadline=None)
def test_any_reply_splits_into_at_least_three_pieces_that_join_back(
    message: str, turn: int
) -> None:
    reply = compose_reply("ag_x", message, Turn("sess_1", turn, ("earlier",) * (turn > 1)))
    pieces = split_reply(reply.text)
    assert 3 <= len(pieces) <= 12
    assert all(pieces)
    assert "".join(pieces) == reply.text


# --- Per-agent usage formats --------------------------------------------------------------


@pytest.mark.parametrize(
    ("agent", "json_keys", "done_keys"),
    [
        ("ag_support", {"response", "session_id", "usage"}, {"type", "session_id", "tokens_used"}),
        ("ag_usage", {"response", "session_id", "usage"}, {"type", "session_id", "usage"}),
        (
            "ag_tokens",
            {"response", "session_id", "tokens_used"},
            {"type", "session_id", "tokens_used"},
        ),
    ],
    ids=["documented", "usage", "tokens_used"],
)
async def test_usage_format_decides_where_token_counts_go(
    sim: SimClient, agent: str, json_keys: set[str], done_keys: set[str]
) -> None:
    body = await reply_json(sim, {"message": "Hi", "session_id": "a"}, agent=agent)
    assert set(body) == json_keys
    response = await chat(sim, {"message": "Hi", "session_id": "b", "stream": True}, agent=agent)
    done = parse_sse(await response.read())[-1]
    assert set(done) == done_keys
    total = tokens("Hi") + tokens(body["response"])
    assert body.get("tokens_used", body.get("usage", {}).get("total_tokens")) == total
    assert done.get("tokens_used", done.get("usage", {}).get("total_tokens")) == total


# --- Per-agent stream framing ------------------------------------------------------------


async def test_stream_framing_lines_sends_the_guides_line_per_event_stream(
    make_sim: MakeSim,
) -> None:
    lines_agent = AgentConfig(name="Lines", stream_framing="lines")
    sim = await make_sim(replace(CONFIG, agents={**CONFIG.agents, "ag_lines": lines_agent}))
    body = {"message": "Tell me about your products", "session_id": "s", "stream": True}
    await add_fault(sim, {"kind": "hold_stream", "after_events": 1, "agent_id": "ag_lines"})
    response = await chat(sim, body, agent="ag_lines")
    # One line per event, as the deployment guide prints it: no blank line anywhere, and each
    # event reaches the socket on its own (the first while the rest is held).
    first = await asyncio.wait_for(response.content.readline(), timeout=5)
    assert first.startswith(b'data: {"type": "content"') and first.endswith(b"}\n")
    assert (await (await sim.get("/_sim/held")).json())["held"] == 1
    await sim.post("/_sim/release")
    lines = first + await response.read()
    assert b"\n\n" not in lines and lines.endswith(b"}\n")
    # Each line one event, as the guide's Node client reads them: the same events as ever.
    events = parse_sse(lines.replace(b"\n", b"\n\n"))
    kinds = [event["type"] for event in events]
    assert kinds == ["content"] * (len(kinds) - 1) + ["done"] and len(kinds) >= 4
    assert 'You said: "Tell me about your products"' in "".join(e["content"] for e in events[:-1])
    [sent] = await (await sim.get("/_sim/requests")).json()
    assert events[-1] == {
        "type": "done",
        "session_id": "s",
        "tokens_used": sent["usage"]["total_tokens"],
    }


# --- Upstream's own rate limit ------------------------------------------------------------


async def test_rate_limit_headers_count_down_per_key(sim: SimClient) -> None:
    reset = str(int(START) // 60 * 60 + 60)
    for remaining in (59, 58):
        response = await chat(sim, {"message": "Hi"})
        assert response.headers["X-RateLimit-Limit"] == "60"
        assert response.headers["X-RateLimit-Remaining"] == str(remaining)
        assert response.headers["X-RateLimit-Reset"] == reset
    other = await chat(sim, {"message": "Hi"}, key=OTHER_PLATFORM_KEY)
    assert other.headers["X-RateLimit-Remaining"] == "59"
    not_found = await chat(sim, {"message": "Hi"}, agent="ag_nobody")
    assert not_found.headers["X-RateLimit-Remaining"] == "57"


async def test_over_the_minute_limit_is_429_until_the_next_minute(
    make_sim: MakeSim, clock: FakeClock
) -> None:
    sim = await make_sim(replace(CONFIG, rate_limit=RateLimitConfig(per_minute=2, per_day=100)))
    for _ in range(2):
        assert (await chat(sim, {"message": "Hi"})).status == 200
    clock.advance(0.5)
    refused = await chat(sim, {"message": "Hi"})
    assert (await error_of(refused))[:2] == (429, "rate_limited")
    assert refused.headers["Retry-After"] == "40"  # START is 40 s before the minute ends.
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert (await chat(sim, {"message": "Hi"}, key=OTHER_PLATFORM_KEY)).status == 200
    clock.advance(39.5)
    assert (await chat(sim, {"message": "Hi"})).status == 200


async def test_over_the_day_limit_reports_the_day_window(
    make_sim: MakeSim, clock: FakeClock
) -> None:
    sim = await make_sim(replace(CONFIG, rate_limit=RateLimitConfig(per_minute=10, per_day=3)))
    for _ in range(3):
        assert (await chat(sim, {"message": "Hi"})).status == 200
    refused = await chat(sim, {"message": "Hi"})
    next_midnight = (int(START) // 86_400 + 1) * 86_400
    assert refused.status == 429
    assert refused.headers["X-RateLimit-Limit"] == "3"
    assert refused.headers["X-RateLimit-Reset"] == str(next_midnight)
    assert refused.headers["Retry-After"] == str(next_midnight - int(START))
    clock.advance(next_midnight - START)
    assert (await chat(sim, {"message": "Hi"})).status == 200


# --- Fault injection ----------------------------------------------------------------------


async def test_a_fault_is_registered_listed_and_cleared(sim: SimClient) -> None:
    created = await add_fault(sim, {"kind": "error", "status": 503, "agent_id": "ag_sales"})
    assert created == {
        "id": 1,
        "kind": "error",
        "agent_id": "ag_sales",
        "times": None,
        "status": 503,
        "code": "",
        "message": "",
    }
    assert (await (await sim.get("/_sim/faults")).json()) == {"faults": [created]}
    assert (await sim.delete("/_sim/faults")).status == 204
    assert (await (await sim.get("/_sim/faults")).json()) == {"faults": []}
    assert (await chat(sim, {"message": "Hi"}, agent="ag_sales")).status == 200


@pytest.mark.parametrize(
    ("spec", "mentions"),
    [
        (b"nope", "JSON"),
        ([], "JSON object"),
        ({}, "kind"),
        ({"kind": "explode"}, "kind"),
        ({"kind": "hang", "delay": 1}, "delay"),
        ({"kind": "slow_first_byte"}, "delay"),
        ({"kind": "slow_first_byte", "delay": -1}, "delay"),
        ({"kind": "slow_drip", "interval": "fast"}, "interval"),
        ({"kind": "drop_mid_stream", "after_events": 1.5}, "after_events"),
        ({"kind": "pause_stream", "after_events": 1}, "delay"),
        ({"kind": "pause_stream", "delay": float("inf")}, "delay"),
        ({"kind": "pause_stream", "delay": 1, "after_events": -1}, "after_events"),
        ({"kind": "endless_stream", "burst": 0}, "burst"),
        ({"kind": "error", "status": 200}, "status"),
        ({"kind": "error", "status": True}, "status"),
        ({"kind": "hang", "times": 0}, "times"),
        ({"kind": "hang", "agent_id": 5}, "agent_id"),
    ],
)
async def test_bad_fault_specs_are_400_with_a_message(
    sim: SimClient, spec: object, mentions: str
) -> None:
    data = spec if isinstance(spec, bytes) else json.dumps(spec).encode()
    response = await sim.post("/_sim/faults", data=data)
    status, _, message = await error_of(response)
    assert status == 400
    assert mentions in message


@pytest.mark.parametrize(
    ("status", "code"),
    [(500, "internal_error"), (402, "insufficient_balance"), (503, "service_unavailable")],
)
async def test_error_fault_answers_with_the_documented_body(
    sim: SimClient, status: int, code: str
) -> None:
    await add_fault(sim, {"kind": "error", "status": status})
    response = await chat(sim, {"message": "Hi"})
    assert (await error_of(response))[:2] == (status, code)
    assert "X-RateLimit-Remaining" in response.headers


async def test_error_fault_code_and_message_can_be_overridden(sim: SimClient) -> None:
    await add_fault(
        sim, {"kind": "error", "status": 500, "code": "model_overloaded", "message": "Busy."}
    )
    assert await error_of(await chat(sim, {"message": "Hi"})) == (500, "model_overloaded", "Busy.")


async def test_rate_limited_fault_sends_its_retry_after(sim: SimClient) -> None:
    await add_fault(sim, {"kind": "rate_limited", "retry_after": 7})
    response = await chat(sim, {"message": "Hi"})
    assert (await error_of(response))[:2] == (429, "rate_limited")
    assert response.headers["Retry-After"] == "7"


async def test_times_counts_down_and_the_newest_matching_fault_wins(sim: SimClient) -> None:
    await add_fault(sim, {"kind": "error", "status": 500})
    await add_fault(sim, {"kind": "error", "status": 503, "times": 2})
    await add_fault(sim, {"kind": "error", "status": 402, "agent_id": "ag_sales"})
    statuses = [(await chat(sim, {"message": "Hi"})).status for _ in range(3)]
    assert statuses == [503, 503, 500]
    assert (await chat(sim, {"message": "Hi"}, agent="ag_sales")).status == 402


async def test_faults_never_hide_caller_errors(sim: SimClient) -> None:
    await add_fault(sim, {"kind": "error", "status": 500, "times": 1})
    assert (await chat(sim, {"message": "Hi"}, key="ak_wrong")).status == 401
    assert (await chat(sim, {})).status == 400
    assert (await chat(sim, {"message": "Hi"})).status == 500


async def test_a_faulted_request_does_not_advance_its_session(sim: SimClient) -> None:
    await add_fault(sim, {"kind": "error", "status": 500, "times": 1})
    assert (await chat(sim, {"message": "lost", "session_id": "s"})).status == 500
    body = await reply_json(sim, {"message": "Hi", "session_id": "s"})
    assert "turn 1 of session s." in body["response"]


async def test_slow_first_byte_delays_the_status_line(sim: SimClient) -> None:
    await add_fault(sim, {"kind": "slow_first_byte", "delay": 0.2, "times": 1})
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await chat(sim, {"message": "Hi"})).status == 200
    assert loop.time() - started >= 0.19
    # Used up (times: 1): the next answer is not held. Told by the fault list, not a timing,
    # which a busy machine could make long either way.
    assert (await (await sim.get("/_sim/faults")).json()) == {"faults": []}


async def test_slow_drip_spaces_the_events_and_spares_json_requests(sim: SimClient) -> None:
    await add_fault(sim, {"kind": "slow_drip", "interval": 0.05, "times": 1})
    assert (await chat(sim, {"message": "Hi"})).status == 200  # Not a stream: not counted.
    loop = asyncio.get_running_loop()
    started = loop.time()
    events = parse_sse(await (await chat(sim, {"message": "Hi", "stream": True})).read())
    assert loop.time() - started >= 0.05 * (len(events) - 1) * 0.9
    assert (await (await sim.get("/_sim/faults")).json()) == {"faults": []}


@pytest.mark.parametrize("after_events", [0, 2, 100])
async def test_drop_mid_stream_breaks_the_connection_after_n_events(
    sim: SimClient, after_events: int
) -> None:
    await add_fault(sim, {"kind": "drop_mid_stream", "after_events": after_events})
    response = await chat(sim, {"message": "Hi", "session_id": "s", "stream": True})
    assert response.status == 200
    received: list[dict[str, Any]] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        while True:
            received.append(await read_event(response))
    assert all(event["type"] == "content" for event in received)
    pieces = split_reply('[ag_support] You said: "Hi". This is turn 1 of session s.')
    assert len(received) == min(after_events, len(pieces))
    assert (await chat(sim, {"message": "Hi"})).status == 200


async def test_hang_never_answers(sim: SimClient) -> None:
    await add_fault(sim, {"kind": "hang", "times": 1})
    with pytest.raises(asyncio.TimeoutError):
        await chat(sim, {"message": "Hi"}, client_timeout=aiohttp.ClientTimeout(total=0.2))
    assert (await chat(sim, {"message": "Hi"})).status == 200
    # The abandoned handler notices its client left instead of waiting forever.
    for _ in range(100):
        if not sim.app[HELD_STREAMS].hanging:
            break
        await asyncio.sleep(0.01)
    assert sim.app[HELD_STREAMS].hanging == 0


async def test_hold_stream_sends_n_events_then_waits_for_release(sim: SimClient) -> None:
    await add_fault(sim, {"kind": "hold_stream", "after_events": 2})
    response = await chat(sim, {"message": "Hi", "session_id": "s", "stream": True})
    first = [await read_event(response), await read_event(response)]
    held = await sim.get("/_sim/held", params={"at_least": "1", "timeout": "5"})
    assert await held.json() == {"held": 1}
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await response.content.readuntil(b"\n\n")
    released = await sim.post("/_sim/release")
    assert await released.json() == {"released": 1}
    events = first + parse_sse(await response.read())
    assert content_of(events) == '[ag_support] You said: "Hi". This is turn 1 of session s.'
    assert events[-1]["type"] == "done"
    assert await (await sim.get("/_sim/held")).json() == {"held": 0}


@pytest.mark.parametrize("after_events", [0, 2])
async def test_pause_stream_is_silent_for_its_delay_after_n_events_then_goes_on(
    sim: SimClient, after_events: int
) -> None:
    fault = {"kind": "pause_stream", "after_events": after_events, "delay": 0.3, "times": 1}
    await add_fault(sim, fault)
    assert (await chat(sim, {"message": "Hi"})).status == 200  # Not a stream: not counted.
    loop = asyncio.get_running_loop()
    response = await chat(sim, {"message": "Hi", "session_id": "s", "stream": True})
    assert response.status == 200  # the headers come before the pause
    before = [await read_event(response) for _ in range(after_events)]
    paused = loop.time()
    after = parse_sse(await response.read())
    assert loop.time() - paused >= 0.29
    events = before + after
    assert content_of(events) == '[ag_support] You said: "Hi". This is turn 1 of session s.'
    assert events[-1]["type"] == "done"
    assert (await (await sim.get("/_sim/faults")).json()) == {"faults": []}


async def test_endless_stream_sends_content_until_its_client_leaves(sim: SimClient) -> None:
    await add_fault(sim, {"kind": "endless_stream", "burst": 50, "times": 1})
    assert (await chat(sim, {"message": "Hi"})).status == 200  # Not a stream: not counted.
    response = await chat(sim, {"message": "Hi", "stream": True})
    assert response.status == 200
    # Far more events than any reply has pieces, and never `done`.
    events = [await read_event(response) for _ in range(2_000)]
    assert {event["type"] for event in events} == {"content"}
    response.close()
    # The endless writer takes turns: the simulator answers others meanwhile and after.
    async with asyncio.timeout(5):
        body = parse_sse(await (await chat(sim, {"message": "Hi", "stream": True})).read())
    assert body[-1]["type"] == "done"


async def test_held_streams_can_be_awaited_in_process(sim: SimClient) -> None:
    await add_fault(sim, {"kind": "hold_stream", "after_events": 0})
    responses = [await chat(sim, {"message": "Hi", "stream": True}) for _ in range(2)]
    async with asyncio.timeout(5):
        assert await sim.app[HELD_STREAMS].wait_for(2) == 2
    assert await (await sim.post("/_sim/release")).json() == {"released": 2}
    for response in responses:
        assert parse_sse(await response.read())[-1]["type"] == "done"


async def test_a_held_stream_ends_when_its_client_leaves(sim: SimClient) -> None:
    await add_fault(sim, {"kind": "hold_stream", "after_events": 1})
    response = await chat(sim, {"message": "Hi", "stream": True})
    await read_event(response)
    async with asyncio.timeout(5):
        await sim.app[HELD_STREAMS].wait_for(1)
        response.close()
        await sim.app[HELD_STREAMS].wait_until(lambda held: held == 0)
    assert await (await sim.post("/_sim/release")).json() == {"released": 0}


@pytest.mark.parametrize(
    "query", [{"at_least": "x"}, {"at_least": "-1"}, {"at_least": "1", "timeout": "99"}]
)
async def test_bad_held_queries_are_400(sim: SimClient, query: dict[str, str]) -> None:
    assert (await sim.get("/_sim/held", params=query)).status == 400


# --- Inspection ---------------------------------------------------------------------------


async def test_chat_requests_are_recorded_as_received(sim: SimClient) -> None:
    raw = b'{"message":  "Hi",\n "session_id": "s"}'
    await chat(sim, raw, key=SUPPORT_KEY, headers={"X-Trace": "t-1"})
    await chat(sim, {"message": "Hi"}, key="ak_wrong")
    await sim.get("/healthz")
    recorded = await (await sim.get("/_sim/requests")).json()
    assert len(recorded) == 2
    first, last = recorded
    assert first["method"] == "POST"
    assert first["path"] == "/v1/agents/ag_support/chat"
    assert first["headers"]["Authorization"] == f"Bearer {SUPPORT_KEY}"
    assert first["headers"]["X-Trace"] == "t-1"
    assert first["body"] == raw.decode()
    assert last["headers"]["Authorization"] == "Bearer ak_wrong"
    assert (await sim.delete("/_sim/requests")).status == 204
    assert await (await sim.get("/_sim/requests")).json() == []


async def test_each_recorded_request_carries_the_usage_its_turn_ran(sim: SimClient) -> None:
    """Upstream's side of the bill: what each turn cost, as its answer reports it, whether or
    not the answer was read to its end; nothing for a request refused or faulted before it."""
    answered = await reply_json(sim, {"message": "Hi"}, agent="ag_usage")
    streamed = await chat(sim, {"message": "Hi", "stream": True}, agent="ag_usage")
    done = parse_sse(await streamed.read())[-1]
    await chat(sim, {"message": "Hi"}, key="ak_wrong")
    await add_fault(sim, {"kind": "error", "status": 500})
    await chat(sim, {"message": "Hi"})
    recorded = await (await sim.get("/_sim/requests")).json()
    assert [entry["usage"] for entry in recorded] == [
        answered["usage"],
        done["usage"],
        None,
        None,
    ]


async def test_the_request_record_keeps_only_the_latest(make_sim: MakeSim) -> None:
    sim = await make_sim(replace(CONFIG, max_recorded_requests=3))
    for number in range(5):
        await chat(sim, {"message": f"m{number}"})
    recorded = await (await sim.get("/_sim/requests")).json()
    assert [json.loads(entry["body"])["message"] for entry in recorded] == ["m2", "m3", "m4"]


async def test_reset_forgets_faults_requests_sessions_and_rate_windows(sim: SimClient) -> None:
    await reply_json(sim, {"message": "Hi", "session_id": "s"})
    await add_fault(sim, {"kind": "error"})
    assert (await sim.post("/_sim/reset")).status == 204
    assert await (await sim.get("/_sim/requests")).json() == []
    response = await chat(sim, {"message": "Hi", "session_id": "s"})
    assert response.headers["X-RateLimit-Remaining"] == "59"
    assert "turn 1 of session s." in (await response.json())["response"]


async def test_healthz(sim: SimClient) -> None:
    response = await sim.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


# --- Configuration ------------------------------------------------------------------------


def test_the_built_in_demo_config() -> None:
    config = load_simulator_config(None)
    assert config.chunk_interval == 0.02
    assert config.rate_limit == RateLimitConfig(per_minute=600, per_day=100_000)
    assert config.platform_keys == ("thns_sk_demo_0001",)
    assert config.agents["ag_support"] == AgentConfig(
        name="Support", keys=("ak_demo_support_0001",), usage_format="documented"
    )
    assert config.agents["ag_sales"] == AgentConfig(name="Sales")


def test_test_defaults_are_the_demo_agents_with_pro_tier_limits() -> None:
    config = SimulatorConfig()
    assert config.agents == load_simulator_config(None).agents
    assert config.rate_limit == RateLimitConfig(per_minute=60, per_day=10_000)
    assert config.chunk_interval == 0.0


def test_config_is_frozen() -> None:
    config = SimulatorConfig()
    with pytest.raises(FrozenInstanceError):
        config.chunk_interval = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.agents["ag_new"] = AgentConfig(name="New")  # type: ignore[index]


def test_a_yaml_file_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text(
        "agents:\n"
        "  ag_support: {name: Support, keys: [ak_demo_support_0001], usage_format: usage}\n"
        "  ag_sales: {name: Sales}\n"
        "  ag_bare:\n"
        "  ag_lines: {stream_framing: lines}\n"
        "platform_keys: [thns_sk_demo_0001]\n"
        "rate_limit: {per_minute: 600}\n"
        "chunk_interval: 0\n"
    )
    config = load_simulator_config(str(path))
    assert config.agents["ag_support"].usage_format == "usage"
    assert config.agents["ag_bare"] == AgentConfig(name="ag_bare")
    assert config.agents["ag_bare"].stream_framing == "blank_lines"
    assert config.agents["ag_lines"].stream_framing == "lines"
    assert config.rate_limit == RateLimitConfig(per_minute=600, per_day=10_000)
    assert config.chunk_interval == 0.0


def test_an_empty_yaml_document_means_defaults() -> None:
    assert parse_simulator_config(None) == SimulatorConfig()


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ("agents: {ag_support: {keys: [123]}}", "agents.ag_support.keys[0]: expected a string"),
        ("agents: {ag_a: {keys: ak_1}}", "agents.ag_a.keys: expected a list of strings"),
        ("agents: {ag_a: {nmae: A}}", "agents.ag_a.nmae: unknown key"),
        ("agents: {ag_a: {name: 5}}", "agents.ag_a.name: expected a string"),
        ("agents: {ag_a: {usage_format: both}}", "agents.ag_a.usage_format: expected one of"),
        ("agents: {ag_a: {stream_framing: crlf}}", "agents.ag_a.stream_framing: expected one of"),
        ("agents: {ag_a: {keys: [thns_sk_1]}}", "agents.ag_a.keys[0]: expected a key starting"),
        (
            "agents: {ag_a: {keys: [ak_1]}, ag_b: {keys: [ak_1]}}",
            "agents.ag_b.keys[0]: this key already belongs to agent ag_a",
        ),
        ("agents: [ag_a]", "agents: expected a mapping"),
        ("platform_keys: [ak_1]", "platform_keys[0]: expected a key starting with 'thns_sk_'"),
        ("platform_keys: thns_sk_1", "platform_keys: expected a list"),
        ("rate_limits: {}", "rate_limits: unknown key"),
        ("rate_limit: {per_minute: '60'}", "rate_limit.per_minute: expected an integer"),
        ("rate_limit: {per_day: true}", "rate_limit.per_day: expected an integer"),
        ("rate_limit: {per_day: 0}", "rate_limit.per_day: expected an integer of at least 1"),
        ("chunk_interval: -1", "chunk_interval: expected a finite number"),
        ("chunk_interval: fast", "chunk_interval: expected a number"),
        ("max_sessions: 0", "max_sessions: expected an integer of at least 1"),
        ("- a\n- b", "<root>: expected a mapping"),
    ],
)
def test_config_errors_name_the_yaml_path(tmp_path: Path, document: str, error: str) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text(document)
    with pytest.raises(ValueError, match=re.escape(error)) as raised:
        load_simulator_config(str(path))
    assert str(path) in str(raised.value)


def test_invalid_yaml_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text("agents: {ag_a: [")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_simulator_config(str(path))
