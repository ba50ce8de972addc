"""Tenant session isolation: namespaced upstream, translated back, through real servers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient

from gateway.auth import hash_key
from gateway.config import parse_config
from gateway.relay import EventRelay
from gateway.sessions import UPSTREAM_MAX_SESSION_ID, SessionScope
from gateway.sse import Event, Frame, SSEFramer
from tests.conftest import ACME, GLOBEX, SUPPORT_KEY, AiohttpClient, gateway_yaml, sse_events

Client = TestClient[web.Request, web.Application]
Sim = TestClient[Any, Any]
CHAT = "/v1/agents/ag_support/chat"


async def upstream_session_ids(simulator: Sim) -> list[str | None]:
    """The session_id of every chat request upstream received, oldest first."""
    recorded = await (await simulator.get("/_sim/requests")).json()
    return [json.loads(entry["body"]).get("session_id") for entry in recorded]


async def turn(gateway: Client, headers: dict[str, str], message: str, **body: Any) -> Any:
    """One chat turn; a stream's `done` event stands in for the JSON body's fields."""
    response = await gateway.post(CHAT, json={"message": message, **body}, headers=headers)
    assert response.status == 200, await response.text()
    if not body.get("stream"):
        return await response.json()
    events = sse_events(await response.read())
    text = "".join(event["content"] for event in events if event["type"] == "content")
    return {**events[-1], "response": text}


def without_isolation(yaml: str, tenant_agents: str) -> str:
    line = f"    agents: {tenant_agents}\n"
    return yaml.replace(line, f"{line}    session_isolation: false\n", 1)


# --- two tenants, one session id -------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_same_session_id_in_two_tenants_is_two_conversations(
    gateway: Client, simulator: Sim, stream: bool
) -> None:
    sid = "sess_shared_1"
    acme_1 = await turn(gateway, ACME, "acme asks about invoices", session_id=sid, stream=stream)
    globex_1 = await turn(
        gateway, GLOBEX, "globex asks about rockets", session_id=sid, stream=stream
    )
    acme_2 = await turn(gateway, ACME, "acme follows up", session_id=sid, stream=stream)
    globex_2 = await turn(gateway, GLOBEX, "globex follows up", session_id=sid, stream=stream)

    assert [t["session_id"] for t in (acme_1, globex_1, acme_2, globex_2)] == [sid] * 4
    assert "turn 1 " in globex_1["response"]  # globex did not continue acme's session
    assert "turn 2 " in acme_2["response"] and "turn 2 " in globex_2["response"]
    assert "acme asks about invoices" in acme_2["response"]
    assert "globex" not in acme_2["response"]
    assert "globex asks about rockets" in globex_2["response"]
    assert "acme" not in globex_2["response"]

    upstream = await upstream_session_ids(simulator)
    assert upstream == [f"gw:acme:{sid}", f"gw:globex:{sid}"] * 2


# --- two keys (services) of one tenant ----------------------------------------------------

SECOND_KEY = "gw_test_acme_reports_0003"
SECOND = {"Authorization": f"Bearer {SECOND_KEY}"}


async def two_services(make_gateway: Any, simulator_url: str, isolation: str) -> Client:
    """acme with a second key (its `reports` service), and `session_isolation` as given."""
    yaml = (
        gateway_yaml(simulator_url)
        .replace(
            "{name: billing-service, sha256: ",
            f"{{name: reports, sha256: {hash_key(SECOND_KEY)}}}, {{name: billing-service, sha256: ",
            1,
        )
        .replace(
            "    agents: [ag_support]\n",
            f"    agents: [ag_support]\n    session_isolation: {isolation}\n",
            1,
        )
    )
    gateway: Client = await make_gateway(config=parse_config(yaml))
    return gateway


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_with_isolation_per_key_two_services_of_one_tenant_hold_two_conversations(
    make_gateway: Any, simulator: Sim, simulator_url: str, stream: bool
) -> None:
    gateway = await two_services(make_gateway, simulator_url, "key")
    sid = "sess_team_1"
    billing_1 = await turn(
        gateway, ACME, "billing asks about invoices", session_id=sid, stream=stream
    )
    reports_1 = await turn(
        gateway, SECOND, "reports asks about charts", session_id=sid, stream=stream
    )
    billing_2 = await turn(gateway, ACME, "billing follows up", session_id=sid, stream=stream)
    assert [t["session_id"] for t in (billing_1, reports_1, billing_2)] == [sid] * 3
    assert "turn 1 " in reports_1["response"]  # not billing's conversation
    assert "turn 2 " in billing_2["response"]
    assert "reports" not in billing_2["response"]
    upstream = await upstream_session_ids(simulator)
    assert upstream == [
        f"gw:acme/billing-service:{sid}",
        f"gw:acme/reports:{sid}",
        f"gw:acme/billing-service:{sid}",
    ]


@pytest.mark.parametrize(
    ("setting", "shared"), [("tenant", True), ("true", True), ("off", None), ("false", None)]
)
async def test_isolation_per_tenant_lets_a_tenants_services_share_a_conversation(
    make_gateway: Any, simulator: Sim, simulator_url: str, setting: str, shared: bool | None
) -> None:
    gateway = await two_services(make_gateway, simulator_url, setting)
    await turn(gateway, ACME, "billing starts", session_id="sess_team_2")
    second = await turn(gateway, SECOND, "reports continues", session_id="sess_team_2")
    assert "turn 2 " in second["response"]
    expected = "gw:acme:sess_team_2" if shared else "sess_team_2"
    assert await upstream_session_ids(simulator) == [expected, expected]


async def test_the_upstream_body_keeps_every_other_field(gateway: Client, simulator: Sim) -> None:
    sent = {
        "context": {"order": [1, 2.5, None, True], "note": "naïve ☃"},
        "session_id": "s1",
        "message": "Hi",
        "stream": False,
    }
    response = await gateway.post(CHAT, json=sent, headers=ACME)
    assert response.status == 200
    assert (await response.json())["session_id"] == "s1"
    recorded = await (await simulator.get("/_sim/requests")).json()
    received = json.loads(recorded[-1]["body"])
    assert list(received) == list(sent)  # the caller's field order too
    assert received == {**sent, "session_id": "gw:acme:s1"}


# --- no session id ---------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_request_without_session_id_gets_one_that_continues(
    gateway: Client, simulator: Sim, stream: bool
) -> None:
    first = await turn(gateway, ACME, "Remember the word teapot", stream=stream)
    sid = first["session_id"]
    assert isinstance(sid, str) and sid and not sid.startswith("gw:")
    second = await turn(gateway, ACME, "What word was it?", session_id=sid, stream=stream)
    assert second["session_id"] == sid
    assert "turn 2 " in second["response"]
    assert "Remember the word teapot" in second["response"]
    assert await upstream_session_ids(simulator) == [f"gw:acme:{sid}"] * 2


# --- isolation off ---------------------------------------------------------------------


async def test_without_isolation_the_body_reaches_upstream_byte_for_byte(
    make_gateway: Any, simulator: Sim, simulator_url: str
) -> None:
    yaml = without_isolation(gateway_yaml(simulator_url), "[ag_support]")
    gateway: Client = await make_gateway(config=parse_config(yaml))
    raw = b'{ "session_id":"sess_raw",\n  "message" : "Hi \\u00e9", "extra": [1.50, 2e3] }'
    response = await gateway.post(
        CHAT, data=raw, headers={**ACME, "Content-Type": "application/json"}
    )
    assert response.status == 200
    assert (await response.json())["session_id"] == "sess_raw"
    recorded = await (await simulator.get("/_sim/requests")).json()
    assert recorded[-1]["body"] == raw.decode()
    # The other tenant still has its namespace.
    await turn(gateway, GLOBEX, "Hi", session_id="sess_raw")
    assert await upstream_session_ids(simulator) == ["sess_raw", "gw:globex:sess_raw"]


# --- forging ---------------------------------------------------------------------------


async def test_a_namespaced_looking_id_stays_in_the_callers_namespace(
    gateway: Client, simulator: Sim
) -> None:
    await turn(gateway, ACME, "acme secret plans", session_id="plans")
    for forged in ("gw:acme:plans", "gw:acme:plans".replace(":", "\u02d0"), "plans"):
        answer = await turn(gateway, GLOBEX, "what did acme say?", session_id=forged)
        assert answer["session_id"] == forged
        assert "acme secret plans" not in answer["response"]
        assert "turn 1 " in answer["response"]
    upstream = await upstream_session_ids(simulator)
    assert upstream[0] == "gw:acme:plans"
    assert all(sid.startswith("gw:globex:") for sid in upstream[1:] if sid is not None)


async def test_a_tenant_without_isolation_may_not_send_a_namespaced_id(
    make_gateway: Any, simulator: Sim, simulator_url: str
) -> None:
    yaml = without_isolation(gateway_yaml(simulator_url), '["*"]')
    gateway: Client = await make_gateway(config=parse_config(yaml))
    await turn(gateway, ACME, "acme secret plans", session_id="plans")
    # Case and Unicode compatibility forms (fullwidth letters, a fullwidth colon) are the
    # same prefix to anything that normalises ids: refused alike.
    for forged in (
        "gw:acme:plans",
        "GW:acme:plans",
        "Gw:acme:plans",
        "\uff47\uff57:acme:plans",
        "gw\uff1aacme:plans",
    ):
        response = await gateway.post(
            CHAT, json={"message": "Hi", "session_id": forged}, headers=GLOBEX
        )
        assert response.status == 400, forged
        assert (await response.json())["error"]["code"] == "invalid_request"
    assert await upstream_session_ids(simulator) == ["gw:acme:plans"]


@pytest.mark.parametrize("isolation", ["tenant", "off"])
async def test_a_field_that_only_looks_like_session_id_is_refused(
    make_gateway: Any, simulator: Sim, simulator_url: str, isolation: str
) -> None:
    """Field names are matched exactly: `Session_ID` or a fullwidth `\uff53ession_id` would pass
    upstream unnamespaced if upstream ever normalised field names, so they are refused."""
    yaml = gateway_yaml(simulator_url)
    if isolation == "off":
        yaml = without_isolation(yaml, '["*"]')
    gateway: Client = await make_gateway(config=parse_config(yaml))
    for variant in ("Session_ID", "SESSION_ID", "\uff53ession_id", "session_id "):
        response = await gateway.post(
            CHAT, json={"message": "Hi", variant: "gw:acme:plans"}, headers=GLOBEX
        )
        assert response.status == 400, variant
        message = (await response.json())["error"]["message"]
        assert "session_id" in message
    assert await upstream_session_ids(simulator) == []


async def test_the_caller_limit_leaves_room_for_the_namespace(
    gateway: Client, simulator: Sim
) -> None:
    room = UPSTREAM_MAX_SESSION_ID - len("gw:acme:")
    fits = await gateway.post(CHAT, json={"message": "Hi", "session_id": "s" * room}, headers=ACME)
    assert fits.status == 200
    assert (await fits.json())["session_id"] == "s" * room
    over = await gateway.post(
        CHAT, json={"message": "Hi", "session_id": "s" * (room + 1)}, headers=ACME
    )
    assert over.status == 400
    assert f"1 to {room} " in (await over.json())["error"]["message"]
    assert await upstream_session_ids(simulator) == ["gw:acme:" + "s" * room]


# --- the done event, split across chunks -----------------------------------------------


def splitting_upstream(simulator_url: str, piece: int) -> web.Application:
    """In front of the simulator: its answers re-sent `piece` bytes per write."""

    async def chat(request: web.Request) -> web.StreamResponse:
        forward = {
            name: request.headers[name]
            for name in ("Authorization", "Content-Type", "Accept")
            if name in request.headers
        }
        async with (
            ClientSession() as session,
            session.post(
                simulator_url + request.path, data=await request.read(), headers=forward
            ) as upstream,
        ):
            raw = await upstream.read()
            out = web.StreamResponse(
                status=upstream.status, headers={"Content-Type": upstream.headers["Content-Type"]}
            )
        await out.prepare(request)
        for start in range(0, len(raw), piece):
            await out.write(raw[start : start + piece])
            await asyncio.sleep(0.002)
        await out.write_eof()
        return out

    app = web.Application()
    app.router.add_post("/v1/agents/{agent_id}/chat", chat)
    return app


async def test_the_done_event_is_rewritten_when_split_across_chunks(
    aiohttp_client: AiohttpClient, make_gateway: Any, simulator: Sim, simulator_url: str
) -> None:
    splitter = await aiohttp_client(splitting_upstream(simulator_url, piece=7))
    gateway: Client = await make_gateway(
        config=parse_config(gateway_yaml(str(splitter.make_url("")).rstrip("/")))
    )
    body = {"message": "Tell me about your products", "stream": True}
    through = await gateway.post(CHAT, json={**body, "session_id": "sess_split"}, headers=ACME)
    assert through.status == 200
    received = await through.read()

    # The same turn straight from upstream, under the id the gateway sent.
    await simulator.post("/_sim/reset")
    direct = await simulator.post(
        CHAT,
        json={**body, "session_id": "gw:acme:sess_split"},
        headers={"Authorization": f"Bearer {SUPPORT_KEY}"},
    )
    expected = await direct.read()
    upstream_done = b'"session_id": "gw:acme:sess_split"'
    assert expected.count(upstream_done) == 1
    assert received == expected.replace(upstream_done, b'"session_id": "sess_split"')
    assert sse_events(received)[-1] == {
        **sse_events(expected)[-1],
        "session_id": "sess_split",
    }


# --- the pure logic --------------------------------------------------------------------


def test_namespacing_is_injective_and_inverted_exactly() -> None:
    tenants = ["a", "a.b", "a-b", "b", "gw", "a_b.c"]
    ids = ["x", "b.x", ":x", "b:x", "gw:a:x", "gw:a.b:x", ".", "a.b:x"]
    seen: dict[str, tuple[str, str]] = {}
    for tenant in tenants:
        scope = SessionScope(f"gw:{tenant}:")
        for sid in ids:
            upstream = scope.to_upstream(sid)
            assert upstream not in seen, (seen[upstream], (tenant, sid))
            seen[upstream] = (tenant, sid)
            assert scope.to_caller(upstream) == sid
    assert SessionScope("gw:a:").to_caller("sess_foreign") == "sess_foreign"
    assert SessionScope("gw:a:").to_caller("gw:a.b:x") == "gw:a.b:x"


def test_json_answers_are_translated_only_when_they_carry_our_id() -> None:
    scope = SessionScope("gw:acme:")
    body = b'{"response": "said \\"gw:acme:x\\"", "session_id": "gw:acme:x", "n": 1.50}'
    assert scope.caller_body(body) == body.replace(
        b'"session_id": "gw:acme:x"', b'"session_id": "x"'
    )
    compact = b'{"session_id":"gw:acme:x","response":"hi"}'
    assert scope.caller_body(compact) == b'{"session_id":"x","response":"hi"}'
    for unchanged in (
        b'{"session_id": "gw:globex:x"}',
        b'{"session_id": 7}',
        b'["gw:acme:x"]',
        b"not json",
        b'{"error": {"code": "internal_error"}}',
    ):
        assert scope.caller_body(unchanged) == unchanged
    assert SessionScope(None).caller_body(body) == body


STREAM = (
    b": comment\r\n"
    b'data: {"type": "content", "content": "session \\"gw:acme:s1\\""}\r\n\r\n'
    b'data: {"type": "content", "content": " more"}\r\r'
    b"id: 7\n"
    b'data: {"type": "done", "session_id": "gw:acme:s1", "tokens_used": 5}\n\n'
)


def test_the_done_event_is_rewritten_at_every_split_point() -> None:
    expected = STREAM.replace(b'"session_id": "gw:acme:s1"', b'"session_id": "s1"')
    scope = SessionScope("gw:acme:")
    for first in range(len(STREAM)):
        for second in range(first, len(STREAM), 5):
            relay = EventRelay(scope)
            out = [relay.feed(STREAM[:first]), relay.feed(STREAM[first:second])]
            out += [relay.feed(STREAM[second:]), relay.finish(close=False)]
            assert b"".join(out) == expected, (first, second)
            assert relay.tally.done and relay.tally.session_id == "gw:acme:s1"


def test_only_our_done_event_is_rewritten() -> None:
    scope = SessionScope("gw:acme:")
    done = b'data: {"type": "done", "session_id": "gw:acme:s1"}\n\n'
    (ours,) = SSEFramer().feed(done)
    assert scope.caller_event(ours) == b'data: {"type": "done", "session_id": "s1"}\n\n'
    assert SessionScope(None).caller_event(ours) is ours.raw
    for raw in (
        b'data: {"type": "done", "session_id": "gw:globex:s1"}\n\n',
        b'data: {"type": "content", "session_id": "gw:acme:s1"}\n\n',
        b'data: ["gw:acme:s1"]\n\n',
        b": done gw:acme:s1\n\n",
    ):
        (frame,) = SSEFramer().feed(raw)
        assert scope.caller_event(frame) is raw
    # The frame's parsed event is what is read, not its bytes again.
    assert scope.caller_event(Frame(done, Event('{"type": "content"}'))) is done


def test_complete_events_are_passed_on_at_once() -> None:
    relay = EventRelay(SessionScope("gw:acme:"))
    event = b'data: {"type": "content", "content": "Hi"}\n\n'
    assert relay.feed(event) is event  # untouched, not even copied
    assert relay.feed(event + event[:10]) == event  # only the incomplete event waits
    assert relay.feed(event[10:]) == event
    # A stream that breaks off: the held half is sent, closed, before the error event.
    assert relay.feed(b"data: {") == b""
    assert relay.finish(close=True) == b"data: {\n\n"


def test_a_done_event_in_an_unusual_form_is_rebuilt() -> None:
    relay = EventRelay(SessionScope("gw:acme:"))
    escaped = b'event: done\ndata: {"type":"done",\ndata: "session_id":"gw\\u003aacme:s1"}\n\n'
    out = relay.feed(escaped)
    events = [frame.event for frame in SSEFramer().feed(out) if frame.event is not None]
    assert [json.loads(e.data) for e in events] == [{"type": "done", "session_id": "s1"}]
    assert events[0].event == "done"
