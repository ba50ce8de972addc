"""The upstream documents' own client examples work against the gateway unchanged but for
base URL and key; and an independent SSE client reads the gateway's streams."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient
from aiohttp_sse_client import client as sse_client

from gateway.config import parse_config
from tests.conftest import ACME_KEY, SUPPORT_KEY, GatewayFactory, gateway_yaml
from tests.secret_watch import SecretWatch

Client = TestClient[web.Request, web.Application]
EXAMPLES = Path(__file__).parent / "examples"


def python_example(base_url: str, api_key: str) -> str:
    # The "Integration Examples / Python" snippet, as documented.
    AGENT_ID = "ag_support"
    API_KEY = api_key
    client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"})
    with client:
        response = client.post(
            f"/v1/agents/{AGENT_ID}/chat", json={"message": "Hello!", "session_id": "sess_001"}
        )
        answer: str = response.json()["response"]
        return answer


def url_of(client: TestClient[Any, Any]) -> str:
    return str(client.make_url("")).rstrip("/")


async def test_python_example_gets_the_same_answer_through_the_gateway(
    gateway: Client, simulator: TestClient[Any, Any], secret_watch: SecretWatch
) -> None:
    through = await asyncio.to_thread(python_example, url_of(gateway), ACME_KEY)
    secret_watch.search("the Python example's answer", through)
    assert 'You said: "Hello!"' in through


async def run_node(
    script: str, base_url: str, key: str, env: Mapping[str, str] | None = None
) -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed; the Node.js examples need it")
    process = await asyncio.create_subprocess_exec(
        node,
        str(EXAMPLES / script),
        env={**os.environ, **(env or {}), "BASE_URL": base_url, "API_KEY": key},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_node_example_json(gateway: Client, secret_watch: SecretWatch) -> None:
    out = await run_node("chat.mjs", url_of(gateway), ACME_KEY)
    secret_watch.search("the Node example's output", out)
    assert 'You said: "Hello!"' in out


async def test_node_streaming_example_prints_the_whole_reply(
    gateway: Client, simulator: TestClient[Any, Any], secret_watch: SecretWatch
) -> None:
    through = await run_node("stream.mjs", url_of(gateway), ACME_KEY)
    secret_watch.search("the Node streaming example's output", through)
    direct = await run_node("stream.mjs", url_of(simulator), SUPPORT_KEY)
    # Equal but for the session id upstream generated for each.
    same = r"(gw:acme:)?sess_\w+"
    assert re.sub(same, "sess_X", through) == re.sub(same, "sess_X", direct)
    assert "Tell me about your products" in through


async def sse_client_events(
    gateway: Client,
    secret_watch: SecretWatch,
    on_event: Callable[[list[dict[str, Any]]], Awaitable[None]] | None = None,
) -> list[dict[str, Any]]:
    """A stream's events as aiohttp-sse-client reads them, to the done event; `on_event`
    is awaited with those so far after each."""
    received: list[dict[str, Any]] = []
    async with (
        ClientSession(response_class=secret_watch.response_class()) as session,
        sse_client.EventSource(
            f"{url_of(gateway)}/v1/agents/ag_support/chat",
            option={"method": "POST"},
            session=session,
            json={"message": "Stream please", "stream": True},
            headers={"Authorization": f"Bearer {ACME_KEY}"},
        ) as source,
    ):
        async for event in source:
            received.append(json.loads(event.data))
            if on_event is not None:
                await on_event(received)
            if received[-1]["type"] == "done":
                break
    return received


async def test_independent_sse_client_reads_the_stream(
    gateway: Client, secret_watch: SecretWatch
) -> None:
    received = await sse_client_events(gateway, secret_watch)
    assert received[0]["type"] == "content"
    assert received[-1]["tokens_used"] > 0
    text = "".join(e["content"] for e in received if e["type"] == "content")
    assert "Stream please" in text


async def test_independent_sse_client_reads_a_line_per_event_stream_event_by_event(
    make_gateway: GatewayFactory,
    lines_simulator: TestClient[Any, Any],
    gateway: Client,
    secret_watch: SecretWatch,
) -> None:
    # Upstream streaming as the deployment guide prints it (no blank line between events):
    # the client gets each event as its own, the first while upstream holds the rest, and
    # the same events as from an upstream that sends the blank lines itself.
    through_lines = await make_gateway(
        config=parse_config(gateway_yaml(url_of(lines_simulator)), "test.yaml")
    )
    fault = {"kind": "hold_stream", "after_events": 1, "times": 1}
    assert (await lines_simulator.post("/_sim/faults", json=fault)).status == 201

    async def release_once_the_first_event_is_read(received: list[dict[str, Any]]) -> None:
        if len(received) == 1:
            held = await (await lines_simulator.get("/_sim/held")).json()
            assert held["held"] == 1, "upstream must still hold the rest of the stream"
            await lines_simulator.post("/_sim/release")

    async with asyncio.timeout(10):
        from_lines = await sse_client_events(
            through_lines, secret_watch, on_event=release_once_the_first_event_is_read
        )
    from_blank_lines = await sse_client_events(gateway, secret_watch)
    assert [event["type"] for event in from_lines].count("content") >= 3
    same = r"sess_\w+"
    assert re.sub(same, "sess_X", json.dumps(from_lines)) == re.sub(
        same, "sess_X", json.dumps(from_blank_lines)
    )
    assert not from_lines[-1]["session_id"].startswith("gw:")


# --- heartbeats: comment lines every SSE client skips -------------------------------------


async def pause_next_stream(simulator: TestClient[Any, Any]) -> None:
    """Upstream's next stream goes silent for a second after two events."""
    fault = {"kind": "pause_stream", "after_events": 2, "delay": 1, "times": 1}
    assert (await simulator.post("/_sim/faults", json=fault)).status == 201


def heartbeats_sent(capsys: pytest.CaptureFixture[str]) -> int:
    """Heartbeats in the one stream served since the last call (its access line)."""
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line[:1] == "{"]
    [access] = [line for line in lines if line.get("logger") == "gateway.access"]
    beats: int = access.get("heartbeats", 0)
    return beats


async def test_node_streaming_example_prints_the_same_with_heartbeats(
    make_gateway: GatewayFactory,
    simulator: TestClient[Any, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    beating = await make_gateway("streams: {heartbeat: 0.2}")
    quiet = await make_gateway("streams: {heartbeat: 0}")
    await pause_next_stream(simulator)
    capsys.readouterr()
    with_heartbeats = await run_node("stream.mjs", url_of(beating), ACME_KEY)
    assert heartbeats_sent(capsys) >= 2
    without = await run_node("stream.mjs", url_of(quiet), ACME_KEY)
    same = r"gw:acme:sess_\w+"
    assert re.sub(same, "sess_X", with_heartbeats) == re.sub(same, "sess_X", without)
    assert "Tell me about your products" in with_heartbeats


async def test_independent_sse_client_reads_the_same_events_with_heartbeats(
    make_gateway: GatewayFactory,
    simulator: TestClient[Any, Any],
    secret_watch: SecretWatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    beating = await make_gateway("streams: {heartbeat: 0.2}")
    quiet = await make_gateway("streams: {heartbeat: 0}")
    await pause_next_stream(simulator)
    capsys.readouterr()
    with_heartbeats = await sse_client_events(beating, secret_watch)
    assert heartbeats_sent(capsys) >= 2
    without = await sse_client_events(quiet, secret_watch)
    same = r"(gw:acme:)?sess_\w+"
    assert re.sub(same, "sess_X", json.dumps(with_heartbeats)) == re.sub(
        same, "sess_X", json.dumps(without)
    )
    assert with_heartbeats[-1]["type"] == "done"
