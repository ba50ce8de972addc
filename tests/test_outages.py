"""Failing peers, as an operator reads about them: one line per kind of failure per interval,
naming the peer and the OS or TLS error, never a password, however many requests meet it."""

from __future__ import annotations

import ssl
from typing import Any

import structlog
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from gateway.config import parse_config
from gateway.outages import FailureLog, describe
from tests.conftest import ACME, FakeClock, gateway_yaml
from tests.redis_servers import free_port

CHAT = "/v1/agents/ag_support/chat"


def refused() -> ConnectionError:
    """A client's error with the OS's under it, as redis-py and aiohttp raise them."""
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as exc:
            raise ConnectionError("Error 111 connecting to :hunter2@10.0.0.1:6379") from exc
    except ConnectionError as error:
        return error


def test_an_error_is_described_by_its_classes_and_errno_never_its_text() -> None:
    assert describe(refused()) == {
        "error": "ConnectionError",
        "cause": "ConnectionRefusedError",
        "errno": "ECONNREFUSED",
    }
    untrusted = ssl.SSLCertVerificationError(1, "certificate verify failed")
    untrusted.verify_message = "unable to get local issuer certificate"
    assert describe(untrusted) == {
        "error": "SSLCertVerificationError",
        "tls": "unable to get local issuer certificate",
    }


def test_a_failure_is_logged_once_per_interval_with_a_count_of_the_rest() -> None:
    clock = FakeClock(0.0)
    failures = FailureLog(
        structlog.get_logger("test"), "redis failed", "10.0.0.1:6379", clock=clock
    )
    with capture_logs() as logs:
        for _ in range(500):
            failures.failed(refused())
            clock.advance(0.01)  # 5 s of an outage at 100 failures a second
        failures.failed(TimeoutError())  # another kind: a line of its own
        clock.advance(5.1)
        failures.failed(refused())
    assert [(line["error"], line.get("repeated")) for line in logs] == [
        ("ConnectionError", None),
        ("TimeoutError", None),
        ("ConnectionError", 499),
    ]
    assert all(line["peer"] == "10.0.0.1:6379" for line in logs)
    assert "hunter2" not in str(logs)


async def test_an_unreachable_upstream_is_logged_with_its_address_not_per_request(
    make_gateway: Any,
) -> None:
    port = free_port()
    text = gateway_yaml(f"http://127.0.0.1:{port}").replace(
        "  timeouts:",
        "  breaker: {failures: 100, cooldown: 1}\n  retries: {attempts: 0}\n  timeouts:",
        1,
    )
    gateway: TestClient[Any, Any] = await make_gateway(config=parse_config(text), clock=FakeClock())
    with capture_logs() as logs:
        statuses = [
            (await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)).status
            for _ in range(20)
        ]
    assert statuses == [502] * 20
    [line] = [entry for entry in logs if entry["event"] == "upstream connection failed"]
    assert line["peer"] == f"127.0.0.1:{port}"
    assert (line["cause"], line["errno"]) == ("ConnectionRefusedError", "ECONNREFUSED")
    assert line["agent"] == "ag_support"
