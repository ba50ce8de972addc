"""The chat proxy, end to end through real servers: gateway in front of the simulator."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.admission import estimate_tokens
from gateway.app import create_admin_app
from gateway.config import parse_config
from gateway.state import DRAINS
from tests.conftest import (
    ACME,
    ACME_KEY,
    GLOBEX,
    GLOBEX_KEY,
    PLATFORM_KEY,
    SUPPORT_KEY,
    AiohttpClient,
    gateway_yaml,
    sse_events,
)
from tests.redis_servers import free_port

Client = TestClient[web.Request, web.Application]
Sim = TestClient[Any, Any]
CHAT = "/v1/agents/ag_support/chat"


async def add_fault(simulator: Sim, kind: str, **params: object) -> None:
    response = await simulator.post("/_sim/faults", json={"kind": kind, **params})
    assert response.status == 201, await response.text()


async def upstream_requests(simulator: Sim) -> list[dict[str, Any]]:
    response = await simulator.get("/_sim/requests")
    requests: list[dict[str, Any]] = await response.json()
    return requests


# --- pass-through ----------------------------------------------------------------------


async def test_json_answer_passes_through_byte_for_byte(gateway: Client, simulator: Sim) -> None:
    body = {"message": "What are your business hours?", "session_id": "sess_a"}
    through = await gateway.post(CHAT, json=body, headers=ACME)
    direct = await simulator.post(
        CHAT,
        json={**body, "session_id": "gw:acme:sess_b"},
        headers={"Authorization": f"Bearer {SUPPORT_KEY}"},
    )
    assert through.status == direct.status == 200
    assert through.content_type == "application/json"
    expected = (await direct.read()).replace(b"gw:acme:sess_b", b"gw:acme:sess_a")
    assert (await through.read()) == expected.replace(
        b'"session_id": "gw:acme:sess_a"', b'"session_id": "sess_a"'
    )
    assert through.headers["X-Request-ID"]


async def test_stream_passes_through_byte_for_byte(gateway: Client, simulator: Sim) -> None:
    body = {"message": "Tell me about your products", "stream": True}
    through = await gateway.post(CHAT, json={**body, "session_id": "s_1"}, headers=ACME)
    direct = await simulator.post(
        CHAT,
        json={**body, "session_id": "gw:acme:s_2"},
        headers={"Authorization": f"Bearer {SUPPORT_KEY}"},
    )
    assert through.status == 200
    assert through.content_type == "text/event-stream"
    assert through.headers["Cache-Control"] == "no-cache"
    assert through.headers["X-Accel-Buffering"] == "no"
    assert "Content-Encoding" not in through.headers
    received = await through.read()
    expected = (await direct.read()).replace(b"gw:acme:s_2", b"gw:acme:s_1")
    assert received == expected.replace(b'"session_id": "gw:acme:s_1"', b'"session_id": "s_1"')
    kinds = [event["type"] for event in sse_events(received)]
    assert kinds[-1] == "done" and kinds.count("content") >= 3


async def test_accept_header_alone_asks_for_a_stream(gateway: Client) -> None:
    response = await gateway.post(
        CHAT, json={"message": "Hi"}, headers={**ACME, "Accept": "text/event-stream"}
    )
    assert response.content_type == "text/event-stream"
    assert sse_events(await response.read())[-1]["type"] == "done"


async def test_first_event_arrives_while_upstream_holds_the_rest(
    gateway: Client, simulator: Sim
) -> None:
    await add_fault(simulator, "hold_stream", after_events=1)
    response = await gateway.post(CHAT, json={"message": "Hi there", "stream": True}, headers=ACME)
    first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), timeout=5)
    assert sse_events(first)[0]["type"] == "content"
    held = await (await simulator.get("/_sim/held")).json()
    assert held["held"] == 1, "the simulator must still be holding the rest of the stream"
    await simulator.post("/_sim/release")
    rest = sse_events(await response.read())
    assert rest[-1]["type"] == "done"


async def test_sessions_continue_across_turns(gateway: Client) -> None:
    first = await gateway.post(
        CHAT,
        json={"message": "What is your return policy?", "session_id": "sess_001"},
        headers=ACME,
    )
    assert (await first.json())["session_id"] == "sess_001"
    second = await gateway.post(
        CHAT, json={"message": "How long does it take?", "session_id": "sess_001"}, headers=ACME
    )
    assert "What is your return policy?" in (await second.json())["response"]


# --- key swap and headers --------------------------------------------------------------


async def test_upstream_sees_only_the_upstream_key(gateway: Client, simulator: Sim) -> None:
    sneaky = {
        "Cookie": "session=caller-cookie",
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "hop",
        "Proxy-Authorization": "Basic Y2FsbGVyOnNlY3JldA==",
        "X-Forwarded-For": "10.0.0.1",
        "User-Agent": "billing-service/1.0",
        "X-Request-ID": "req-abc-123",
    }
    await gateway.post(CHAT, json={"message": "Hi"}, headers={**ACME, **sneaky})
    await gateway.post("/v1/agents/ag_sales/chat", json={"message": "Hi"}, headers=GLOBEX)
    support, sales = await upstream_requests(simulator)

    assert support["headers"]["Authorization"] == f"Bearer {SUPPORT_KEY}"
    assert sales["headers"]["Authorization"] == f"Bearer {PLATFORM_KEY}"
    sent = json.dumps([support, sales])
    assert ACME_KEY not in sent and GLOBEX_KEY not in sent
    for name in ("Cookie", "X-Secret-Hop", "Proxy-Authorization", "X-Forwarded-For"):
        assert name.lower() not in {h.lower() for h in support["headers"]}
    assert support["headers"]["User-Agent"] == "billing-service/1.0"
    assert support["headers"]["X-Request-ID"] == "req-abc-123"
    sent_body = json.loads(support["body"])
    assert sent_body.pop("session_id").startswith("gw:acme:")
    assert sent_body == {"message": "Hi"}


async def test_request_id_is_kept_when_sane_and_replaced_when_not(gateway: Client) -> None:
    kept = await gateway.post(
        CHAT, json={"message": "Hi"}, headers={**ACME, "X-Request-ID": "abc-1"}
    )
    assert kept.headers["X-Request-ID"] == "abc-1"
    replaced = await gateway.post(
        CHAT, json={"message": "Hi"}, headers={**ACME, "X-Request-ID": "bad id\twith<stuff>"}
    )
    assert replaced.headers["X-Request-ID"] not in ("", "bad id\twith<stuff>")


async def test_upstream_rate_limit_headers_are_not_leaked_to_callers(gateway: Client) -> None:
    response = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    # Upstream's X-RateLimit-* describe the shared upstream key, not this caller.
    assert "X-RateLimit-Limit" not in response.headers


# --- authentication and agents ---------------------------------------------------------


async def expect_error(response: aiohttp.ClientResponse, status: int, code: str) -> str:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    assert response.headers["X-Request-ID"]
    body = await response.json()
    assert body["error"]["code"] == code
    message: str = body["error"]["message"]
    assert message
    return message


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": ACME_KEY}, {"Authorization": "Bearer gw_unknown_key"}],
    ids=["missing", "malformed", "unknown"],
)
async def test_callers_without_a_valid_key_get_401(
    gateway: Client, simulator: Sim, headers: dict[str, str]
) -> None:
    response = await gateway.post(CHAT, json={"message": "Hi"}, headers=headers)
    await expect_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert await upstream_requests(simulator) == []


async def test_a_key_removed_from_config_is_revoked(make_gateway: Any, simulator_url: str) -> None:
    text = gateway_yaml(simulator_url)
    start = text.index("  acme:")
    end = text.index("  globex:")
    gateway = await make_gateway(config=parse_config(text[:start] + text[end:]))
    response = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    await expect_error(response, 401, "unauthorized")


async def test_forbidden_agent_looks_exactly_like_a_missing_one(gateway: Client) -> None:
    forbidden = await gateway.post("/v1/agents/ag_sales/chat", json={"message": "Hi"}, headers=ACME)
    missing = await gateway.post("/v1/agents/ag_nope/chat", json={"message": "Hi"}, headers=ACME)
    assert await expect_error(forbidden, 404, "agent_not_found") == await expect_error(
        missing, 404, "agent_not_found"
    )


async def test_unknown_agent_via_wildcard_tenant_gets_upstreams_404(gateway: Client) -> None:
    response = await gateway.post("/v1/agents/ag_nope/chat", json={"message": "Hi"}, headers=GLOBEX)
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "agent_not_found"


# --- bad requests ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code", "hint"),
    [
        (b"not json", "application/json", 400, "invalid_request", "not valid JSON"),
        (b'["message"]', "application/json", 400, "invalid_request", "must be a JSON object"),
        (b"{}", "application/json", 400, "invalid_request", "message is required"),
        (b'{"message": ""}', "application/json", 400, "invalid_request", "must not be empty"),
        (b'{"message": 42}', "application/json", 400, "invalid_request", "must be a string"),
        (
            b'{"message": "hi", "session_id": 7}',
            "application/json",
            400,
            "invalid_request",
            "session_id",
        ),
        (
            b'{"message": "hi", "session_id": "' + b"s" * 300 + b'"}',
            "application/json",
            400,
            "invalid_request",
            "session_id",
        ),
        (
            b'{"message": "hi", "stream": "yes"}',
            "application/json",
            400,
            "invalid_request",
            "stream",
        ),
        (b'{"message": "\xff"}', "application/json", 400, "invalid_request", "UTF-8"),
        (b"", "application/json", 400, "invalid_request", "empty"),
        (
            b"message=hi",
            "application/x-www-form-urlencoded",
            400,
            "invalid_request",
            "Content-Type",
        ),
        (
            b'{"message": "' + b"x" * 70_000 + b'"}',
            "application/json",
            413,
            "request_too_large",
            "65536",
        ),
    ],
)
async def test_bad_bodies_get_a_clear_4xx_and_never_reach_upstream(
    gateway: Client,
    simulator: Sim,
    body: bytes,
    content_type: str,
    status: int,
    code: str,
    hint: str,
) -> None:
    response = await gateway.post(CHAT, data=body, headers={**ACME, "Content-Type": content_type})
    assert hint in await expect_error(response, status, code)
    assert await upstream_requests(simulator) == []


async def test_chunked_body_over_the_limit_is_413(gateway: Client) -> None:
    async def chunks() -> Any:
        for _ in range(100):
            yield b"x" * 1000

    response = await gateway.post(
        CHAT, data=chunks(), headers={**ACME, "Content-Type": "application/json"}
    )
    await expect_error(response, 413, "request_too_large")


async def test_unknown_path_and_method(gateway: Client) -> None:
    await expect_error(await gateway.get("/v2/whatever"), 404, "not_found")
    await expect_error(await gateway.get(CHAT), 405, "method_not_allowed")


# --- upstream failures -----------------------------------------------------------------


@pytest.mark.parametrize("status", [402, 500])
async def test_upstream_errors_pass_through(gateway: Client, simulator: Sim, status: int) -> None:
    await add_fault(simulator, "error", status=status)
    response = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    assert response.status == status
    assert "error" in await response.json()


async def test_upstream_429_passes_through_with_retry_after(
    gateway: Client, simulator: Sim
) -> None:
    await add_fault(simulator, "rate_limited", retry_after=7)
    response = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    assert response.status == 429
    assert response.headers["Retry-After"] == "7"
    assert (await response.json())["error"]["code"] == "rate_limited"


async def test_upstream_429_without_retry_after_passes_back_untried(
    gateway: Client, simulator: Sim
) -> None:
    # The documents name only X-RateLimit-* headers on upstream's 429 (and advise exponential
    # backoff); a Retry-After is the simulator's addition. Without one, nothing says a retry
    # could succeed in time, so the 429 goes back as it came, with this caller's own limits.
    await add_fault(simulator, "error", status=429, times=1)
    response = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    assert response.status == 429
    assert (await response.json())["error"]["code"] == "rate_limited"
    assert "Retry-After" not in response.headers
    assert "X-RateLimit-Limit" not in response.headers  # upstream's, for the shared key
    assert len(await (await simulator.get("/_sim/requests")).json()) == 1


async def test_unreachable_upstream_is_502(make_gateway: Any) -> None:
    config = parse_config(gateway_yaml(f"http://127.0.0.1:{free_port()}"))
    gateway = await make_gateway(config=config)
    response = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    message = await expect_error(response, 502, "upstream_unavailable")
    assert PLATFORM_KEY not in message and SUPPORT_KEY not in message


async def test_upstream_that_never_answers_is_504(
    make_gateway: Any, simulator: Sim, simulator_url: str
) -> None:
    fast = parse_config(gateway_yaml(simulator_url).replace("first_byte: 5", "first_byte: 0.3"))
    gateway = await make_gateway(config=fast)
    await add_fault(simulator, "hang")
    response = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    await expect_error(response, 504, "upstream_timeout")


async def test_stream_broken_mid_way_ends_with_an_error_event(
    gateway: Client, simulator: Sim
) -> None:
    await add_fault(simulator, "drop_mid_stream", after_events=2)
    response = await gateway.post(
        CHAT, json={"message": "Tell me more", "stream": True}, headers=ACME
    )
    assert response.status == 200
    received = sse_events(await response.read())
    assert [e["type"] for e in received] == ["content", "content", "error"]
    assert received[-1]["code"] == "upstream_unavailable"


async def test_stream_that_goes_quiet_ends_with_a_timeout_event(
    make_gateway: Any, simulator: Sim, simulator_url: str
) -> None:
    gateway = await make_gateway(
        config=parse_config(gateway_yaml(simulator_url).replace("idle: 5", "idle: 0.3"))
    )
    await add_fault(simulator, "hold_stream", after_events=1)
    response = await gateway.post(CHAT, json={"message": "Hi", "stream": True}, headers=ACME)
    received = sse_events(await response.read())
    assert [e["type"] for e in received] == ["content", "error"]
    assert received[-1]["code"] == "upstream_timeout"
    await simulator.post("/_sim/release")


# --- heartbeats while upstream is silent -----------------------------------------------

HEARTBEAT = b": keep-alive\n\n"
STORY: dict[str, Any] = {"message": "Tell me about your products", "stream": True}


async def as_passed_on(simulator: Sim, session_id: str) -> bytes:
    """STORY's stream in acme's session `session_id` (3 characters) as the gateway passes it
    on, taken straight from upstream in a session of its own (the same turn, the same size)."""
    direct = await simulator.post(
        CHAT,
        json={**STORY, "session_id": "gw:acme:up_"},
        headers={"Authorization": f"Bearer {SUPPORT_KEY}"},
    )
    received = (await direct.read()).replace(b"gw:acme:up_", f"gw:acme:{session_id}".encode())
    return received.replace(b'"gw:acme:' + session_id.encode() + b'"', f'"{session_id}"'.encode())


def blocks_of(received: bytes) -> list[str]:
    """Each block up to a blank line: `beat` for a heartbeat, else the event's type. Every
    block is a whole event or a whole comment: nothing was written inside an event."""
    *blocks, rest = received.split(b"\n\n")
    assert rest == b""
    kinds = []
    for block in blocks:
        if block + b"\n\n" == HEARTBEAT:
            kinds.append("beat")
        else:
            assert block.startswith(b"data: ") and b"\n" not in block, block
            kinds.append(json.loads(block.removeprefix(b"data: "))["type"])
    return kinds


def log_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    err = capsys.readouterr().err
    return [json.loads(line) for line in err.splitlines() if line[:1] == "{"]


def access_line(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    [line] = [line for line in log_lines(capsys) if line.get("logger") == "gateway.access"]
    return line


async def test_a_paused_stream_gets_heartbeats_between_events_and_the_same_content(
    make_gateway: Any, simulator: Sim, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = await make_gateway("streams: {heartbeat: 1}")
    expected = await as_passed_on(simulator, "s_1")
    await add_fault(simulator, "pause_stream", after_events=2, delay=3, times=1)
    capsys.readouterr()
    response = await gateway.post(CHAT, json={**STORY, "session_id": "s_1"}, headers=ACME)
    received = await response.read()

    kinds = blocks_of(received)
    beats = kinds.count("beat")
    assert beats >= 2
    # All of them in the pause, after the two events before it.
    assert kinds[: 2 + beats] == ["content", "content"] + ["beat"] * beats
    assert kinds[-1] == "done"
    assert received.replace(HEARTBEAT, b"") == expected
    assert access_line(capsys)["heartbeats"] == beats


async def test_heartbeat_0_sends_none(
    make_gateway: Any, simulator: Sim, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = await make_gateway("streams: {heartbeat: 0}")
    expected = await as_passed_on(simulator, "s_1")
    await add_fault(simulator, "pause_stream", after_events=1, delay=0.5, times=1)
    capsys.readouterr()
    response = await gateway.post(CHAT, json={**STORY, "session_id": "s_1"}, headers=ACME)
    assert await response.read() == expected
    assert "heartbeats" not in access_line(capsys)


async def test_heartbeats_do_not_hold_off_the_idle_timeout(
    make_gateway: Any, simulator: Sim, simulator_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    yaml = gateway_yaml(simulator_url, "streams: {heartbeat: 0.2}").replace("idle: 5", "idle: 1")
    gateway = await make_gateway(config=parse_config(yaml))
    await add_fault(simulator, "hold_stream", after_events=1)
    capsys.readouterr()
    response = await gateway.post(CHAT, json=STORY, headers=ACME)
    async with asyncio.timeout(5):  # held for ever upstream: only the idle timeout ends it
        received = await response.read()
    kinds = blocks_of(received)
    assert kinds[0] == "content" and kinds[-1] == "error"
    assert set(kinds[1:-1]) == {"beat"}
    assert sse_events(received)[-1]["code"] == "upstream_timeout"
    line = access_line(capsys)
    assert line["upstream_error"] == "stream_timeout"
    assert line["heartbeats"] == len(kinds) - 2
    # Charged by estimate, from the message and the one event's text: heartbeats are not text.
    seen = sse_events(received)[0]["content"]
    assert line["tokens_charged"] == estimate_tokens(len(STORY["message"])) + estimate_tokens(
        len(seen)
    )
    await simulator.post("/_sim/release")


async def test_a_caller_gone_in_a_silence_gets_no_more_and_its_stream_is_drained(
    make_gateway: Any, simulator: Sim, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = await make_gateway("streams: {heartbeat: 0.05}")
    await add_fault(simulator, "pause_stream", after_events=1, delay=1, times=1)
    capsys.readouterr()
    response = await gateway.post(CHAT, json=STORY, headers=ACME)
    assert sse_events(await response.content.readuntil(b"\n\n"))[0]["type"] == "content"
    assert await response.content.readuntil(b"\n\n") == HEARTBEAT
    response.close()
    # The next heartbeat's write finds the caller gone (if aiohttp has not said so first):
    # its stream goes to a drain, which reads upstream's done event after the pause.
    async with asyncio.timeout(5):
        await gateway.app[DRAINS].wait_finished(1)
    lines = log_lines(capsys)
    [access] = [line for line in lines if line.get("logger") == "gateway.access"]
    [drained] = [line for line in lines if line.get("event") == "drain finished"]
    assert access["client_closed"] is True and access["heartbeats"] >= 1
    assert drained["complete"] is True


# --- upstream's line-per-event streams (the deployment guide's framing) ----------------


async def test_a_line_per_event_stream_reaches_the_caller_event_by_event_as_sse(
    make_gateway: Any, lines_simulator: Sim
) -> None:
    # The deployment guide prints a stream as one `data:` line per event, no blank line
    # between them, and its own client reads each line as an event.
    url = str(lines_simulator.make_url("")).rstrip("/")
    gateway = await make_gateway(config=parse_config(gateway_yaml(url)))
    upstream = await as_passed_on(lines_simulator, "s_1")
    assert b"\n\n" not in upstream
    await add_fault(lines_simulator, "hold_stream", after_events=1)
    response = await gateway.post(CHAT, json={**STORY, "session_id": "s_1"}, headers=ACME)
    async with asyncio.timeout(5):  # the first event, while upstream holds the rest
        first = await response.content.readuntil(b"\n\n")
    assert blocks_of(first) == ["content"]
    held = await (await lines_simulator.get("/_sim/held")).json()
    assert held["held"] == 1, "the simulator must still be holding the rest of the stream"
    await lines_simulator.post("/_sim/release")
    received = first + await response.read()
    # Each event as upstream sent it, with the blank line SSE needs after it; the done event's
    # session id translated back.
    assert received == upstream.replace(b"}\n", b"}\n\n")
    kinds = blocks_of(received)
    assert kinds[-1] == "done" and kinds.count("content") >= 3
    assert sse_events(received)[-1]["session_id"] == "s_1"


# --- health ----------------------------------------------------------------------------


async def test_health_endpoints(gateway: Client) -> None:
    assert (await gateway.get("/healthz")).status == 200
    ready = await gateway.get("/readyz")
    assert ready.status == 200
    # Ready or not, nothing more: the quota backend's state is the admin port's to tell.
    assert await ready.json() == {"status": "ready"}


async def test_no_response_names_the_software_versions(
    gateway: Client, aiohttp_client: AiohttpClient
) -> None:
    """aiohttp's default `Server: Python/3.11 aiohttp/3.x` on every response tells whoever
    looks for a known flaw exactly where to look: both ports name the gateway only."""
    admin = await aiohttp_client(create_admin_app(gateway.app))
    responses = [
        await gateway.get("/healthz"),
        await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME),
        await gateway.post(CHAT, json={"message": "Hi"}),  # 401
        await gateway.get("/no/such/path"),
        await admin.get("/metrics"),
        await admin.get("/readyz"),
    ]
    for response in responses:
        assert response.headers["Server"] == "thinnest-gateway", response.url
