"""Fuzzing a real gateway (in front of the simulator) on loopback.

- schemathesis, run as its CLI against the OpenAPI document the gateway serves: no 5xx, and
  every response documented (status, content type, headers, body schema).
- hypothesis property tests: random bytes, random JSON and random header values never get a
  5xx, a 4xx always has the gateway's error shape, and the JSON verdict matches a plain-Python
  statement of the README's rules.

The gateway runs on the test's event loop; the synchronous clients (schemathesis's process,
httpx in a worker thread) leave that loop free to serve them.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import openapi as gateway_openapi
from gateway.app import create_app
from gateway.config import parse_config
from gateway.sessions import SessionScope
from gateway.state import CONFIG
from gateway.validation import MAX_DEPTH, MAX_INT_DIGITS, MAX_SESSION_ID
from tests.conftest import ACME, ACME_KEY, AiohttpClient, gateway_yaml
from tests.secret_watch import SecretWatch

Client = TestClient[web.Request, web.Application]
CHAT = "/v1/agents/ag_support/chat"
OPENAPI = "/openapi.json"
SCHEMATHESIS_CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)
# Fast enough for every run (well under 30 s), yet enough to find a shape mismatch.
SCHEMATHESIS_EXAMPLES = 100
PROPERTY_EXAMPLES = 150
PROPERTY_SETTINGS = settings(
    max_examples=PROPERTY_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@pytest.fixture
async def documented_gateway(aiohttp_client: AiohttpClient, simulator_url: str) -> Client:
    """The gateway with GET /openapi.json (added here until create_app has it)."""
    app = create_app(parse_config(gateway_yaml(simulator_url), "test.yaml"))
    if not any(resource.canonical == OPENAPI for resource in app.router.resources()):
        app.router.add_get(OPENAPI, gateway_openapi.openapi)
    return await aiohttp_client(app)


def base_url(gateway: Client) -> str:
    return str(gateway.make_url("")).rstrip("/")


# --- the document ------------------------------------------------------------------------


async def test_the_document_is_served_and_describes_the_caller_api(
    documented_gateway: Client,
) -> None:
    response = await documented_gateway.get(OPENAPI)
    assert response.status == 200
    assert response.content_type == "application/json"
    document = await response.json()
    assert document == gateway_openapi.openapi_document()
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) >= {"/v1/agents/{agent_id}/chat", "/v1/usage", "/healthz"}
    chat = document["paths"]["/v1/agents/{agent_id}/chat"]["post"]
    assert chat["security"] == [{"gatewayKey": []}]
    assert set(chat["responses"]) >= {"200", "400", "401", "404", "413", "429", "502", "504"}
    request = document["components"]["schemas"]["ChatRequest"]
    assert request["properties"]["session_id"]["maxLength"] == MAX_SESSION_ID


# --- schemathesis ----------------------------------------------------------------------------


async def test_schemathesis_finds_no_server_error_and_no_undocumented_response(
    documented_gateway: Client, tmp_path: Path
) -> None:
    command = [
        str(Path(sys.executable).with_name("st")),
        "run",
        base_url(documented_gateway) + OPENAPI,
        "--header",
        f"Authorization: Bearer {ACME_KEY}",
        "--checks",
        ",".join(SCHEMATHESIS_CHECKS),
        "--max-examples",
        str(SCHEMATHESIS_EXAMPLES),
        "--phases",
        "examples,coverage,fuzzing",
        "--request-timeout",
        "10",
        "--generation-database",
        "none",
        "--max-failures",
        "5",
        "--no-color",
    ]
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=tmp_path,  # schemathesis may write its reports and caches here, nowhere else
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=45)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert time.monotonic() - started < 30, text


# --- hypothesis ------------------------------------------------------------------------------


def run_in_thread(gateway: Client, test: Callable[[httpx.Client], None]) -> Any:
    """Run a synchronous hypothesis test with an httpx client, off the gateway's loop."""

    def run() -> None:
        with httpx.Client(base_url=base_url(gateway), timeout=10) as client:
            test(client)

    return asyncio.to_thread(run)


def assert_gateway_answer(response: httpx.Response, watch: SecretWatch) -> None:
    """Never a 5xx; a 4xx is the gateway's own error, with a request id."""
    watch.search(f"fuzzed response to {response.request.url.path}", response.content)
    watch.search("fuzzed response headers", repr(response.headers.multi_items()))
    assert response.status_code < 500, response.text
    assert response.headers.get("X-Request-ID")
    if response.status_code >= 400:
        assert response.headers["Content-Type"].startswith("application/json")
        body = response.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"code", "message"}, body
        assert all(isinstance(value, str) and value for value in body["error"].values())


HOSTILE_BODIES = st.sampled_from(
    [
        b"",
        b"{",
        b"[" * 5000,
        b'{"message": "hi", "message": "hi"}',
        b'{"message": NaN}',
        b'{"message": "hi", "x": 1e400}',
        b'\xef\xbb\xbf{"message": "hi"}',
        '{"message": "hi"}'.encode("utf-16"),
        b'{"message": "\\ud800"}',
        b'{"message": "hi", "session_id": "\\u0000"}',
    ]
)


async def test_random_bytes_as_a_body(
    documented_gateway: Client, secret_watch: SecretWatch
) -> None:
    @PROPERTY_SETTINGS
    @given(body=st.binary(max_size=512) | HOSTILE_BODIES)
    def check(client: httpx.Client, body: bytes) -> None:
        response = client.post(
            CHAT, content=body, headers={**ACME, "Content-Type": "application/json"}
        )
        assert_gateway_answer(response, secret_watch)
        assert response.status_code in {200, 400}

    await run_in_thread(documented_gateway, check)


# JSON values, deliberately including what JSON cannot say (NaN, Infinity: json.dumps writes
# them anyway) and what the gateway refuses (deep nesting, huge integers).
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**120), max_value=10**120)
    | st.floats()
    | st.text(max_size=20)
)
_JSON_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
_CHAT_BODIES = st.fixed_dictionaries(
    {"message": st.text(max_size=30) | _SCALARS},
    optional={
        "session_id": st.text(max_size=300) | st.text(min_size=250, max_size=260) | _SCALARS,
        "stream": st.booleans() | _SCALARS,
        "extra": _JSON_VALUES,
        "deep": st.integers(min_value=MAX_DEPTH - 3, max_value=MAX_DEPTH + 3).map(
            lambda depth: json.loads("[" * depth + "]" * depth)
        ),
    },
)


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _plain_numbers(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return len(str(abs(value))) <= MAX_INT_DIGITS
    if isinstance(value, dict):
        return all(map(_plain_numbers, value.values()))
    if isinstance(value, list):
        return all(map(_plain_numbers, value))
    return True


def acceptable(value: object, max_session_id: int) -> bool:
    """The README's rules for a chat body, stated plainly."""
    if not isinstance(value, dict) or _depth(value) > MAX_DEPTH or not _plain_numbers(value):
        return False
    message, session_id, stream = (value.get(k) for k in ("message", "session_id", "stream"))
    if not isinstance(message, str) or not message.strip():
        return False
    if session_id is not None and not (
        isinstance(session_id, str)
        and 0 < len(session_id) <= max_session_id
        and session_id.isprintable()
    ):
        return False
    return stream is None or isinstance(stream, bool)


async def test_random_json_as_a_body(documented_gateway: Client, secret_watch: SecretWatch) -> None:
    # With session isolation (the default) the tenant's prefix shortens the ids it may send.
    max_session_id = SessionScope.of(
        documented_gateway.app[CONFIG].tenants["acme"], "billing-service"
    ).max_caller_id

    @PROPERTY_SETTINGS
    @given(value=_CHAT_BODIES | _JSON_VALUES)
    def check(client: httpx.Client, value: object) -> None:
        body = json.dumps(value).encode()
        headers = {**ACME, "Content-Type": "application/json"}
        response = client.post(CHAT, content=body, headers=headers)
        assert_gateway_answer(response, secret_watch)
        assert response.status_code == (200 if acceptable(value, max_session_id) else 400), (
            value,
            response.text,
        )

    await run_in_thread(documented_gateway, check)


# Header values h11 will send: visible ASCII or Latin-1, inner spaces and tabs.
_LATIN1_VALUES = st.from_regex(
    rb"\A([\x21-\x7e\x80-\xff]([\x20\x09\x21-\x7e\x80-\xff]{0,40}[\x21-\x7e\x80-\xff])?)?\Z"
)
_AUTHORIZATION = (
    _LATIN1_VALUES
    | _LATIN1_VALUES.filter(bool).map(lambda token: b"Bearer " + token)
    | st.sampled_from(
        [
            f"Bearer {ACME_KEY}".encode(),
            f"bearer   {ACME_KEY}".encode(),
            f"Bearer {ACME_KEY}x".encode(),
            f"Bearer {ACME_KEY[:-1]}".encode(),
            f"Basic {ACME_KEY}".encode(),
            b"Bearer " + b"g" * 8000,  # under aiohttp's 8190-byte field limit
        ]
    )
)
_CONTENT_TYPE = _LATIN1_VALUES | st.sampled_from(
    [
        b"application/json",
        b"APPLICATION/JSON; charset=utf-8",
        b"application/problem+json",
        b"text/plain",
        b"application/x-www-form-urlencoded",
        b"multipart/form-data; boundary=x",
        b";",
    ]
)
_REQUEST_IDS = _LATIN1_VALUES | st.from_regex(r"\A[A-Za-z0-9._:-]{1,130}\Z").map(str.encode)


def _header(value: bytes) -> str:
    # What aiohttp's parser makes of a header value.
    return value.decode("utf-8", "surrogateescape").strip(" \t")


def expected_status(authorization: bytes | None, content_type: bytes | None) -> int:
    """The README's rules: a known key first (401), then a JSON Content-Type if any (400)."""
    scheme, _, token = _header(authorization or b"").partition(" ")
    if scheme.lower() != "bearer" or token.strip() != ACME_KEY:
        return 401
    if content_type is not None:
        mime = _header(content_type).partition(";")[0].strip().lower()
        if mime != "application/json" and not mime.endswith("+json"):
            return 400
    return 200


async def test_random_header_values(documented_gateway: Client, secret_watch: SecretWatch) -> None:
    @PROPERTY_SETTINGS
    @given(
        authorization=st.none() | _AUTHORIZATION,
        content_type=st.none() | _CONTENT_TYPE,
        request_id=st.none() | _REQUEST_IDS,
    )
    def check(
        client: httpx.Client,
        authorization: bytes | None,
        content_type: bytes | None,
        request_id: bytes | None,
    ) -> None:
        headers = {
            name: value
            for name, value in (
                (b"Authorization", authorization),
                (b"Content-Type", content_type),
                (b"X-Request-ID", request_id),
            )
            if value is not None
        }
        response = client.post(CHAT, content=b'{"message": "hi"}', headers=headers)
        assert_gateway_answer(response, secret_watch)
        assert response.status_code == expected_status(authorization, content_type)
        offered = None if request_id is None else request_id.decode("latin-1")
        sane = (
            offered is not None
            and _REQUEST_ID.fullmatch(offered) is not None
            and not offered.lower().startswith(("gw_", "ak_", "thns_"))
        )
        assert (response.headers["X-Request-ID"] == offered) == sane

    await run_in_thread(documented_gateway, check)


async def test_random_paths_and_methods(
    documented_gateway: Client, secret_watch: SecretWatch
) -> None:
    @PROPERTY_SETTINGS
    @given(
        method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
        path=st.sampled_from(["/v1/agents/", "/v1/", "/", "/v1/usage/", "/_sim/"])
        | st.text(
            st.characters(codec="utf-8", exclude_categories=["Cc"], exclude_characters="?#"),
            max_size=40,
        ),
        suffix=st.sampled_from(["", "/chat", "/chat/", "/../chat", "%2Fchat", "%00"]),
    )
    def check(client: httpx.Client, method: str, path: str, suffix: str) -> None:
        url = "/" + path.lstrip("/") + suffix
        response = client.request(method, url, content=b'{"message": "hi"}', headers=ACME)
        if method == "HEAD":
            assert response.status_code < 500
            return
        assert_gateway_answer(response, secret_watch)

    await run_in_thread(documented_gateway, check)
