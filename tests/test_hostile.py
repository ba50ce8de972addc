"""Hostile input against a real gateway on loopback: a clear 4xx (or a clean close) within a
bounded time, never a 5xx, never a hang, and the gateway serves normally afterwards.

Malformed HTTP is written byte by byte on a raw connection; everything else goes through the
watched test client. Every raw response is also handed to the secret watch.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway import validation
from gateway.app import create_app
from gateway.config import parse_config
from gateway.state import METRICS
from tests.conftest import ACME, ACME_KEY, AiohttpClient, gateway_yaml
from tests.secret_watch import SecretWatch

Client = TestClient[web.Request, web.Application]
Sim = TestClient[Any, Any]
CHAT = "/v1/agents/ag_support/chat"
# Every hostile case must be answered (or closed) well within this.
BOUND = 5.0
# aiohttp's own 400 for malformed HTTP quotes the raw request bytes back (and logs them), so
# malformed requests carry this stand-in, never a key in play.
FAKE_KEY = "gw_hostile_stand_in_0000"


@dataclass
class RawResponse:
    status: int | None  # None: the connection was closed without a response
    headers: dict[str, str]
    body: bytes
    seconds: float


async def raw_exchange(
    gateway: Client,
    watch: SecretWatch,
    *parts: bytes,
    interval: float = 0.0,
    half_close: bool = False,
) -> RawResponse:
    """Write `parts` (`interval` seconds apart) on a fresh connection and read one response."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        async with asyncio.timeout(BOUND):
            sender = asyncio.create_task(_send(writer, parts, interval, half_close))
            try:
                response = await _read_response(reader)
            finally:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
    finally:
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    watch.search("raw response", response.body + repr(response.headers).encode())
    response.seconds = time.monotonic() - started
    return response


async def _send(
    writer: asyncio.StreamWriter, parts: tuple[bytes, ...], interval: float, half_close: bool
) -> None:
    try:
        for index, part in enumerate(parts):
            if index and interval:
                await asyncio.sleep(interval)
            writer.write(part)
            await writer.drain()
        if half_close:
            writer.write_eof()
    except ConnectionError:
        pass  # the gateway answered and closed before we finished: that is allowed


async def _read_response(reader: asyncio.StreamReader) -> RawResponse:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return RawResponse(None, {}, b"", 0.0)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await reader.readexactly(length) if length else b""
    return RawResponse(int(status_line.split()[1]), headers, body, 0.0)


def request_head(
    *extra: str,
    target: str = CHAT,
    length: int | None = None,
    chunked: bool = False,
    key: str = ACME_KEY,
) -> bytes:
    lines = [
        f"POST {target} HTTP/1.1",
        "Host: gateway.test",
        f"Authorization: Bearer {key}",
        "Content-Type: application/json",
        "Connection: close",
        *extra,
    ]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def gateway_error(response: RawResponse) -> dict[str, str]:
    """The gateway's own error body (rendered by the app, not aiohttp's plain-text 400)."""
    assert response.headers.get("content-type", "").startswith("application/json")
    assert "x-request-id" in response.headers
    error: dict[str, str] = json.loads(response.body)["error"]
    assert set(error) == {"code", "message"}
    return error


async def still_serving(gateway: Client) -> None:
    response = await gateway.post(CHAT, json={"message": "still there?"}, headers=ACME)
    assert response.status == 200, await response.text()
    assert "still there?" in (await response.json())["response"]


@pytest.fixture
async def hostile(gateway: Client) -> AsyncIterator[Client]:
    """The gateway; afterwards, it still serves and has never answered a 5xx (the metrics
    count even answers nobody read, e.g. to a caller that left mid-body)."""
    yield gateway
    await still_serving(gateway)
    exposition = gateway.app[METRICS].exposition().decode()
    answered = [line for line in exposition.splitlines() if line.startswith("gateway_requests")]
    assert not [line for line in answered if 'code="5' in line], answered


# --- the HTTP layer (aiohttp's parser refuses these before the gateway sees them) ---------


def malformed(*extra: str, **options: Any) -> bytes:
    return request_head(*extra, key=FAKE_KEY, length=2, **options)


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("100 KiB header", malformed("X-Big: " + "a" * 100 * 1024)),
        ("500 headers", malformed(*(f"X-H{i}: {i}" for i in range(500)))),
        ("20 KiB request line", malformed(target=CHAT + "?" + "a" * 20 * 1024)),
        ("100 KiB header name", malformed("X" * 100 * 1024 + ": 1")),
        ("control character in a header", malformed("X-Evil: a\x01b")),
        ("bare LF line endings", malformed().replace(b"\r\n", b"\n")),
        ("Content-Length and chunked", malformed(chunked=True)),
        ("two Content-Lengths", malformed("Content-Length: 3")),
        ("negative Content-Length", malformed().replace(b"Length: 2", b"Length: -1")),
        ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 10),
    ],
)
async def test_malformed_http_is_refused_quickly(
    hostile: Client, secret_watch: SecretWatch, name: str, head: bytes
) -> None:
    response = await raw_exchange(hostile, secret_watch, head + b"{}")
    assert response.status is None or 400 <= response.status < 500, (name, response)
    assert response.seconds < 2, (name, response.seconds)


async def test_malformed_http_is_not_logged_with_its_key(
    hostile: Client, secret_watch: SecretWatch
) -> None:
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(logging.Formatter().format(record))

    keep, root = Keep(), logging.getLogger()
    root.addHandler(keep)
    try:
        await raw_exchange(hostile, secret_watch, malformed().replace(b"\r\n", b"\n") + b"{}")
        await raw_exchange(hostile, secret_watch, malformed(f"X-Key: {FAKE_KEY}\x01") + b"{}")
    finally:
        root.removeHandler(keep)
    assert seen
    assert not [line for line in seen if FAKE_KEY in line]


async def test_slow_headers_are_cut_off_by_the_keepalive_timeout(
    aiohttp_client: AiohttpClient, simulator_url: str, secret_watch: SecretWatch
) -> None:
    """aiohttp has no header-read timeout of its own: a connection whose request never
    completes is closed only by `keepalive_timeout` (aiohttp's default is 3630 s). This is the
    mechanism serve() relies on; the value is its own (see app.py)."""
    config = parse_config(gateway_yaml(simulator_url), "test.yaml")
    server = TestServer(create_app(config))
    # TestServer() drops runner options; start_server() passes them on.
    await server.start_server(keepalive_timeout=1)
    gateway = await aiohttp_client(server)
    head = malformed()
    parts = [head[i : i + 8] for i in range(0, len(head), 8)]  # 8 bytes every 0.4 s
    response = await raw_exchange(gateway, secret_watch, *parts, interval=0.4)
    assert response.status is None  # closed, no answer
    assert 1 <= response.seconds < 3
    await still_serving(gateway)


# --- bodies --------------------------------------------------------------------------------


async def test_a_body_trickled_a_byte_at_a_time_is_cut_off(
    hostile: Client, secret_watch: SecretWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Slow loris on the body: the whole body has BODY_READ_TIMEOUT (10 s; 1 s here) to arrive.
    monkeypatch.setattr(validation, "BODY_READ_TIMEOUT", 1.0)
    body = b'{"message": "Hello there"}'
    trickle = [body[i : i + 1] for i in range(len(body))]
    response = await raw_exchange(
        hostile, secret_watch, request_head(length=len(body)), *trickle, interval=1.0
    )
    assert response.status == 400
    assert "did not arrive within 1 s" in gateway_error(response)["message"]
    assert 1 <= response.seconds < 3


async def test_a_chunked_body_trickled_is_cut_off(
    hostile: Client, secret_watch: SecretWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(validation, "BODY_READ_TIMEOUT", 1.0)
    parts = [chunk(b"{"), *(chunk(b" ") for _ in range(10))]
    response = await raw_exchange(
        hostile, secret_watch, request_head(chunked=True), *parts, interval=0.5
    )
    assert response.status == 400
    assert gateway_error(response)["code"] == "invalid_request"
    assert response.seconds < 3


async def test_a_chunked_body_over_the_limit_is_413_without_content_length(
    hostile: Client, secret_watch: SecretWatch
) -> None:
    parts = [chunk(b" " * 8192) for _ in range(10)]  # 80 KiB > 64 KiB, no Content-Length
    response = await raw_exchange(hostile, secret_watch, request_head(chunked=True), *parts)
    assert response.status == 413
    assert gateway_error(response)["code"] == "request_too_large"


async def test_a_declared_length_over_the_limit_is_413_before_the_body_is_read(
    hostile: Client, secret_watch: SecretWatch
) -> None:
    response = await raw_exchange(hostile, secret_watch, request_head(length=10**12))
    assert response.status == 413
    assert "65536" in gateway_error(response)["message"]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_cut_short_is_a_4xx_or_a_close(
    hostile: Client, secret_watch: SecretWatch, framing: str
) -> None:
    if framing == "chunked":
        data = request_head(chunked=True) + b'5\r\n{"mes'
    else:
        data = request_head(length=100) + b'{"message": "hi"'
    response = await raw_exchange(hostile, secret_watch, data, half_close=True)
    assert response.status is None or response.status == 400, response


@pytest.mark.parametrize("interval", [0.0, 0.2])
async def test_broken_chunked_encoding_is_400(
    hostile: Client, secret_watch: SecretWatch, monkeypatch: pytest.MonkeyPatch, interval: float
) -> None:
    """Sent at once, aiohttp's parser refuses it with its own 400. Sent after the head, the
    handler is already reading the body when the broken chunk arrives, and aiohttp 3.14's C
    parser drops the body stream without failing it: only BODY_READ_TIMEOUT ends the wait."""
    monkeypatch.setattr(validation, "BODY_READ_TIMEOUT", 1.0)
    parts = (request_head(chunked=True), chunk(b"{"), b"zz\r\n{}\r\n0\r\n\r\n")
    response = await raw_exchange(hostile, secret_watch, *parts, interval=interval)
    assert response.status == 400
    assert response.seconds < 3


async def test_a_caller_that_leaves_mid_body_costs_nothing(hostile: Client) -> None:
    _reader, writer = await asyncio.open_connection(hostile.host, hostile.port)
    writer.write(request_head(length=1000) + b'{"message": ')
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.1)  # the fixture then checks: no 5xx counted, still serving


@pytest.mark.parametrize(
    ("name", "header"),
    [
        ("Authorization", b"Authorization: Bearer gw_\xff\xfe"),
        ("X-Request-ID", b"X-Request-ID: req-\xff"),
        ("User-Agent", b"User-Agent: agent/\xff\xfe"),
        ("Accept", b"Accept: application/json, text/\xff"),
        ("Content-Type", b"Content-Type: application/json; charset=\xff"),
        ("obs-fold", b"X-Folded: a\r\n b"),
    ],
)
async def test_header_values_that_are_not_utf8_are_never_a_5xx(
    gateway: Client, secret_watch: SecretWatch, name: str, header: bytes
) -> None:
    body = b'{"message": "hi"}'
    head = request_head(length=len(body))
    # Ours goes first: the first of two headers of one name is the one the gateway reads.
    head = head.replace(b"\r\n", b"\r\n" + header + b"\r\n", 1)
    response = await raw_exchange(gateway, secret_watch, head + body)
    assert response.status is not None
    assert response.status < 500, (name, response)
    await still_serving(gateway)


# --- JSON the gateway and upstream could read differently ---------------------------------


@pytest.mark.parametrize(
    ("body", "hint"),
    [
        (b'{"message": "hi \xc3"}', "must be UTF-8"),
        ('{"message": "hi"}'.encode("utf-16"), "must be UTF-8"),
        ('{"message": "hi"}'.encode("utf-32"), "must be UTF-8"),
        (b'{"message": "\xed\xa0\x80"}', "must be UTF-8"),  # an encoded surrogate
        # The body's own object is level 1: 32 arrays in it make 33 levels.
        (b'{"message": "hi", "x": ' + b"[" * 32 + b"]" * 32 + b"}", "nested too deeply"),
        (b"[" * 60_000, "nested too deeply"),
        (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "nested too deeply"),
        (b'{"message": "hi", "message": "bye"}', "key 'message' more than once"),
        (b'{"message": "hi", "stream": false, "stream": true}', "key 'stream' more than once"),
        (b'{"message": "hi", "x": {"k": 1, "k": 2}}', "key 'k' more than once"),
        (b'{"message": "hi", "gw_secretish": 1, "gw_secretish": 2}', "not shown"),
        (b'{"message": "hi", "x": NaN}', "NaN is not a JSON number"),
        (b'{"message": "hi", "x": Infinity}', "Infinity is not a JSON number"),
        (b'{"message": "hi", "x": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"message": "hi", "x": 1e999}', "too large"),
        (b'{"message": "hi", "x": -1e999}', "too large"),
        (b'{"message": "hi", "x": ' + b"9" * 5000 + b"}", "more than 100 digits"),
        (b'\xef\xbb\xbf{"message": "hi"}', "byte order mark"),
        (b'{"message": "hi", "session_id": "a\\u0000b"}', "printable"),
        (b'{"message": "hi", "session_id": "a\\nb"}', "printable"),
        (b'{"message": "hi", "session_id": "a\\u2028b"}', "printable"),
        (b'{"message": "hi", "session_id": ""}', "session_id"),
        (b'{"message": "hi", "session_id": "' + b"s" * 257 + b'"}', "session_id must be 1 to"),
        (b'{"message": "hi", "session_id": ["s"]}', "session_id must be a string"),
        (b'{"message": "hi", "session_id": {"$ne": null}}', "session_id must be a string"),
        (b'{"message": " \\t\\n "}', "must not be empty"),
    ],
)
async def test_ambiguous_or_hostile_json_is_400(
    hostile: Client, simulator: Sim, body: bytes, hint: str
) -> None:
    started = time.monotonic()
    response = await hostile.post(
        CHAT, data=body, headers={**ACME, "Content-Type": "application/json"}
    )
    assert response.status == 400, await response.text()
    error = (await response.json())["error"]
    assert error["code"] == "invalid_request"
    assert hint in error["message"]
    assert "secretish" not in error["message"]
    assert time.monotonic() - started < 1
    assert (await (await simulator.get("/_sim/requests")).json()) == []


@pytest.mark.parametrize(
    "body",
    [
        b'{"message": "hi", "x": ' + b"[" * 31 + b"]" * 31 + b"}",  # 32 levels, the limit
        b'{"message": "' + b"[{" * 1000 + b'\\"}]"}',  # brackets in strings do not count
        b'{"message": "hi", "x": 1e308, "y": -0.0, "z": ' + b"9" * 100 + b"}",
        b'{"message": "hi", "session_id": "caf\xc3\xa9 \xe2\x98\x95"}',
    ],
)
async def test_unusual_but_valid_json_passes(hostile: Client, body: bytes) -> None:
    response = await hostile.post(
        CHAT, data=body, headers={**ACME, "Content-Type": "application/json"}
    )
    assert response.status == 200, await response.text()


# --- compressed bodies (aiohttp inflates a request's Content-Encoding itself) --------------


@pytest.mark.parametrize(
    ("name", "encoding", "body", "status"),
    [
        ("gzip", "gzip", gzip.compress(b'{"message": "hi"}'), 200),
        ("broken gzip", "gzip", b"\x1f\x8b\x08\x00garbage", 400),
        ("broken deflate", "deflate", b"not deflate at all", 400),
        ("gzip bomb", "gzip", gzip.compress(b'{"message": "' + b"a" * 50_000_000 + b'"}'), 413),
        # Unknown codings are left alone: the bytes validated are the bytes forwarded.
        ("unknown encoding", "snappy", b'{"message": "hi"}', 200),
    ],
)
async def test_compressed_bodies(
    hostile: Client, secret_watch: SecretWatch, name: str, encoding: str, body: bytes, status: int
) -> None:
    head = request_head(f"Content-Encoding: {encoding}", length=len(body))
    response = await raw_exchange(hostile, secret_watch, head + body)
    assert response.status == status, (name, response)
    assert response.seconds < 2
    if status != 200:
        assert gateway_error(response)["code"] in {"invalid_request", "request_too_large"}
