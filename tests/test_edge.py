"""Below the apps, against a real `serve`: a malformed request head gets the gateway's error
(never its own bytes back) on both ports, and past `listen.max_connections` new caller
connections are closed at once while the admin port answers."""

from __future__ import annotations

import asyncio
import errno
import json
import resource
from pathlib import Path

import aiohttp
from structlog.testing import capture_logs
from yarl import URL

from gateway.config import EventLoop
from gateway.edge import ACCEPT_OUT_OF_RESOURCES, log_accept_errors
from tests.conftest import ACME_KEY
from tests.processes import Running, both_loops, gateway_and_simulator

# The example: a header line without a colon, after the caller's key.
MALFORMED = f"GET / HTTP/1.1\r\nAuthorization: Bearer {ACME_KEY}\r\nBad Header\r\n\r\n".encode()


async def raw(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """`request` on a fresh connection; the status, headers and body of the answer."""
    where = URL(url)
    reader, writer = await asyncio.open_connection(where.host, where.port)
    try:
        writer.write(request)
        async with asyncio.timeout(5):
            answer = await reader.read()  # the gateway closes after an error
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


@both_loops
async def test_a_malformed_request_head_gets_our_error_and_never_its_bytes(
    tmp_path: Path, serve_loop: EventLoop
) -> None:
    async with gateway_and_simulator(tmp_path, event_loop=serve_loop) as running:
        for port in (running.url, running.admin):
            status, headers, body = await raw(port, MALFORMED)
            assert status == 400
            assert ACME_KEY.encode() not in body
            assert b"Bad Header" not in body
            assert headers["content-type"].startswith("application/json")
            assert len(headers["x-request-id"]) == 32
            assert headers["server"] == "thinnest-gateway"
            error = json.loads(body)["error"]
            assert error["code"] == "invalid_request"
            assert set(error) == {"code", "message"}
        # A request line over 8 KiB, a NUL in a header: the same shape.
        for request in (
            b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-A: a\x00b\r\n\r\n",
        ):
            status, headers, body = await raw(running.url, request)
            assert (status, json.loads(body)["error"]["code"]) == (400, "invalid_request")
    log = running.log.read_text()
    assert ACME_KEY not in log
    assert "malformed request refused" in log


LIMIT = 1024  # the descriptor limit
IDLE = 1100


def raise_own_descriptor_limit(at_least: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < at_least:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, at_least), hard))


async def admin_metric(running: Running, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(running.admin + "/metrics") as r:
        text = await r.text()
    [line] = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[-1])


@both_loops
async def test_idle_connections_past_the_cap_are_refused_and_the_admin_port_answers(
    tmp_path: Path, serve_loop: EventLoop
) -> None:
    """The finding: with a 1,024 descriptor limit, 1,100 idle connections made /healthz and
    chat time out, and the log filled with `accept() out of system resource` lines."""
    raise_own_descriptor_limit(IDLE + 200)
    async with gateway_and_simulator(tmp_path, descriptors=LIMIT, event_loop=serve_loop) as running:
        where = URL(running.url)
        held: list[asyncio.StreamWriter] = []
        try:
            for _ in range(IDLE):
                try:
                    _, writer = await asyncio.open_connection(where.host, where.port)
                except OSError:
                    continue  # the listen backlog is full: refused before it
                held.append(writer)
            await asyncio.sleep(0.5)  # the gateway accepts (and closes) what is past the cap
            async with (
                aiohttp.ClientSession() as session,
                asyncio.timeout(2),
                session.get(running.admin + "/healthz") as response,
            ):
                assert response.status == 200
            refused = await admin_metric(running, "gateway_connections_refused_total")
            assert refused >= IDLE - LIMIT // 2  # the default cap is under half the limit
        finally:
            for writer in held:
                writer.close()
        # Once they have gone, callers are served again.
        await asyncio.sleep(0.5)
        async with (
            aiohttp.ClientSession() as session,
            asyncio.timeout(5),
            session.get(running.url + "/healthz") as response,
        ):
            assert response.status == 200
    log = running.log.read_text().splitlines()
    refusals = [line for line in log if "max_connections reached" in line]
    assert 1 <= len(refusals) <= 3, refusals
    assert len(log) < 50, log[-20:]
    # The default: (1,024 - 128 reserved) / 2, as the started line says.
    assert '"max_connections": 448' in log[0]


async def test_accept_errors_are_logged_once_per_interval() -> None:
    """asyncio reports every failed accept() (EMFILE) with a traceback: here, one line."""
    loop = asyncio.get_running_loop()
    before = loop.get_exception_handler()
    log_accept_errors(loop, "127.0.0.1:8080")
    try:
        with capture_logs() as lines:
            for _ in range(100):
                loop.call_exception_handler(
                    {"message": ACCEPT_OUT_OF_RESOURCES, "exception": OSError(errno.EMFILE, "")}
                )
    finally:
        loop.set_exception_handler(before)
    assert [(line["event"], line["errno"]) for line in lines] == [("accept failed", "EMFILE")]
