"""Structured logs: one access line per request with what an operator needs, and no secrets.

The test session routes every log line to stderr as JSON (see conftest's `secret_watch`),
so `capsys` reads the lines a test's requests produced.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.config import Logging, parse_config
from gateway.logs import configure_logging
from tests.conftest import ACME, ACME_KEY, SUPPORT_KEY, gateway_yaml, sse_events
from tests.secret_watch import SecretWatch

Client = TestClient[web.Request, web.Application]
Sim = TestClient[Any, Any]
CHAT = "/v1/agents/ag_support/chat"


def access_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line[:1] == "{"]
    return [line for line in lines if line.get("logger") == "gateway.access"]


async def test_a_json_request_logs_one_line_with_who_what_and_tokens(
    gateway: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    message = "please keep this plan between us"
    response = await gateway.post(CHAT, json={"message": message}, headers=ACME)
    body = await response.json()

    [line] = access_lines(capsys)
    assert line["request_id"] == response.headers["X-Request-ID"]
    assert {k: line[k] for k in ("tenant", "key_name", "agent", "method", "path", "status")} == {
        "tenant": "acme",
        "key_name": "billing-service",
        "agent": "ag_support",
        "method": "POST",
        "path": CHAT,
        "status": 200,
    }
    assert line["stream"] is False and line["quota"] == "allowed"
    assert line["duration_ms"] >= line["upstream_ttfb_ms"] > 0
    usage = body["usage"]
    assert line["tokens"] == {
        "input": usage["input_tokens"],
        "output": usage["output_tokens"],
        "total": usage["total_tokens"],
    }
    assert line["level"] == "info" and line["event"] == "request" and "timestamp" in line
    # Neither the question nor the answer is ever logged.
    assert message not in json.dumps(line) and body["response"] not in json.dumps(line)


async def test_a_stream_logs_its_done_events_tokens(
    gateway: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    response = await gateway.post(CHAT, json={"message": "Hi", "stream": True}, headers=ACME)
    done = sse_events(await response.read())[-1]

    [line] = access_lines(capsys)
    assert line["stream"] is True and line["status"] == 200
    assert line["tokens"]["total"] == done.get(
        "tokens_used", done.get("usage", {}).get("total_tokens")
    )
    assert "usage_complete" not in line


async def test_a_stream_without_done_event_says_its_tokens_are_estimated(
    gateway: Client, simulator: Sim, capsys: pytest.CaptureFixture[str]
) -> None:
    await simulator.post("/_sim/faults", json={"kind": "drop_mid_stream", "times": 1})
    capsys.readouterr()
    await (await gateway.post(CHAT, json={"message": "Hi", "stream": True}, headers=ACME)).read()

    [line] = access_lines(capsys)
    assert line["usage_complete"] is False
    assert line["upstream_error"] == "stream_broken"
    assert line["tokens_estimated"] is True and line["tokens_charged"] > 0
    assert "tokens" not in line


async def test_a_refusal_logs_the_quota_decision_and_its_limit(
    make_gateway: Any, simulator_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = gateway_yaml(simulator_url).replace(
        "    agents: [ag_support]\n",
        "    agents: [ag_support]\n    limits: {requests: {per_day: 1}}\n",
        1,
    )
    gateway = await make_gateway(config=parse_config(text))
    for _ in range(2):
        await (await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)).read()

    first, second = access_lines(capsys)
    assert first["quota"] == "allowed" and first["status"] == 200
    assert second["quota"] == "rejected" and second["quota_limit"] == "requests per day"
    assert second["status"] == 429 and second["error"] == "rate_limited"
    assert "upstream_ttfb_ms" not in second


async def test_a_request_id_that_looks_like_a_key_is_replaced_not_logged(
    gateway: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    for offered in (ACME_KEY, SUPPORT_KEY):
        response = await gateway.post(
            CHAT, json={"message": "Hi"}, headers={**ACME, "X-Request-ID": offered}
        )
        await response.read()
        assert response.headers["X-Request-ID"] != offered
    kept = await gateway.post(
        CHAT, json={"message": "Hi"}, headers={**ACME, "X-Request-ID": "job-42"}
    )
    assert kept.headers["X-Request-ID"] == "job-42"
    err = capsys.readouterr().err
    assert ACME_KEY not in err and SUPPORT_KEY not in err and '"job-42"' in err


@pytest.fixture
def own_logging(secret_watch: SecretWatch) -> Iterator[io.StringIO]:
    """Logging configured to a buffer for one test, the session's restored afterwards."""
    buffer = io.StringIO()
    yield buffer
    configure_logging(Logging(level="debug", format="json"), stream=secret_watch.log_stream())


def test_standard_library_loggers_share_the_format_and_the_level(own_logging: io.StringIO) -> None:
    configure_logging(Logging(level="warning", format="json"), stream=own_logging)
    logging.getLogger("aiohttp.server").warning("something odd")
    logging.getLogger("redis").info("chatty detail")
    structlog.get_logger("gateway.test").info("below the level")
    structlog.get_logger("gateway.test").warning("at the level", tenant="acme")

    lines = [json.loads(line) for line in own_logging.getvalue().splitlines()]
    assert [(line["logger"], line["event"], line["level"]) for line in lines] == [
        ("aiohttp.server", "something odd", "warning"),
        ("gateway.test", "at the level", "warning"),
    ]
    assert lines[1]["tenant"] == "acme"


def test_console_format_is_for_humans(own_logging: io.StringIO) -> None:
    configure_logging(Logging(level="info", format="console"), stream=own_logging)
    structlog.get_logger("gateway.test").info("request", status=200, tenant="acme")

    [line] = own_logging.getvalue().splitlines()
    assert not line.startswith("{")
    assert "request" in line and "status=200" in line and "tenant=acme" in line


async def test_the_secret_watch_finds_a_key_split_across_chunks() -> None:
    """The watch over the whole run can fail: a key in two chunks of a body is found."""

    first_read = asyncio.Event()

    async def leaky(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"data: " + ACME_KEY[:9].encode())
        await first_read.wait()  # so the key's second half arrives as a chunk of its own
        await response.write(ACME_KEY[9:].encode() + b"\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", leaky)
    watch = SecretWatch([ACME_KEY, SUPPORT_KEY])
    chunks = []
    async with (
        TestServer(app) as server,
        aiohttp.ClientSession(response_class=watch.response_class()) as session,
        session.get(server.make_url("/")) as response,
    ):
        async for chunk in response.content.iter_any():
            chunks.append(chunk)
            first_read.set()
    assert len(chunks) == 2 and all(ACME_KEY.encode() not in chunk for chunk in chunks)
    [found] = watch.found
    assert found.endswith(f"({len(ACME_KEY)} chars) in response to GET /")
    watch.search("a log line", f"bearer {SUPPORT_KEY}")
    assert len(watch.found) == 2 and SUPPORT_KEY not in " ".join(watch.found)
