"""Trace context: W3C `traceparent`/`tracestate` passed upstream and on the access line, always;
with `tracing.otlp_endpoint`, spans exported over OTLP/HTTP to a receiver the test runs.

The receiver is what a collector is to the gateway: an HTTP server taking `POST /v1/traces`
with an `ExportTraceServiceRequest` in protobuf. Nothing waits on a clock: the gateway's
`flush()` returns once every span ended so far has been posted, and a drained exchange is
waited for by its drain.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as ProtoStatus
from yarl import URL

from gateway.__main__ import main
from gateway.config import Tracing, parse_config
from gateway.errors import ConfigError
from gateway.otel import OtelTracing
from gateway.state import DRAINS, TRACING
from tests.conftest import (
    ACME,
    ACME_KEY,
    PLATFORM_KEY,
    SUPPORT_KEY,
    AiohttpClient,
    gateway_yaml,
    sse_events,
)
from tests.processes import Process, serving, start, stop
from tests.redis_servers import free_port

Client = TestClient[web.Request, web.Application]
Sim = TestClient[Any, Any]
CHAT = "/v1/agents/ag_support/chat"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
MESSAGE = "what are your opening hours on the moon"


def access_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line[:1] == "{"]
    return [line for line in lines if line.get("logger") == "gateway.access"]


async def sent_upstream(simulator: Sim) -> list[dict[str, str]]:
    """The headers of each chat request upstream received, as the simulator recorded them."""
    recorded = await (await simulator.get("/_sim/requests")).json()
    return [{k.lower(): v for k, v in r["headers"].items()} for r in recorded]


# --- an OTLP/HTTP receiver -------------------------------------------------------------------


@dataclass
class ReceivedSpan:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, object]
    status: int
    service: str


def _value(pair: KeyValue) -> object:
    kind = pair.value.WhichOneof("value")
    return None if kind is None else getattr(pair.value, kind)


@dataclass
class Receiver:
    """Spans as a collector receives them; `posts` counts the export requests."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    posts: int = 0

    async def traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        export = ExportTraceServiceRequest.FromString(await request.read())
        self.posts += 1
        for resource in export.resource_spans:
            service = {p.key: _value(p) for p in resource.resource.attributes}["service.name"]
            for scope in resource.scope_spans:
                self.spans += [
                    ReceivedSpan(
                        name=span.name,
                        kind=span.kind,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(),
                        attributes={p.key: _value(p) for p in span.attributes},
                        status=span.status.code,
                        service=str(service),
                    )
                    for span in scope.spans
                ]
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def named(self, name: str) -> list[ReceivedSpan]:
        return [span for span in self.spans if span.name == name]

    def tree(self, request_span: ReceivedSpan) -> dict[str, ReceivedSpan]:
        """The request span's children, by name."""
        children = [s for s in self.spans if s.parent_id == request_span.span_id]
        assert len({s.name for s in children}) == len(children)
        return {s.name: s for s in children}


@pytest.fixture
async def receiver(aiohttp_client: AiohttpClient) -> tuple[Receiver, str]:
    collector = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", collector.traces)
    client = await aiohttp_client(app)
    return collector, str(client.make_url("")).rstrip("/")


async def traced_gateway(make_gateway: Any, endpoint: str, ratio: float = 1.0) -> Client:
    gateway: Client = await make_gateway(
        f"tracing: {{otlp_endpoint: {endpoint}, sample_ratio: {ratio}}}\n"
    )
    return gateway


REQUEST = "POST /v1/agents/{agent_id}/chat"
SERVER, CLIENT = ProtoSpan.SPAN_KIND_SERVER, ProtoSpan.SPAN_KIND_CLIENT
ERROR = ProtoStatus.STATUS_CODE_ERROR


# --- tracing off: W3C trace context passed on ---------------------------------------------


async def test_a_valid_traceparent_arrives_upstream_unchanged_with_its_tracestate(
    gateway: Client, simulator: Sim, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    headers = {**ACME, "traceparent": TRACEPARENT, "tracestate": "congo=t61rcWkgMzE,rojo=00f0"}
    response = await gateway.post(CHAT, json={"message": "Hi"}, headers=headers)
    assert response.status == 200

    [upstream] = await sent_upstream(simulator)
    assert upstream["traceparent"] == TRACEPARENT
    assert upstream["tracestate"] == "congo=t61rcWkgMzE,rojo=00f0"
    [line] = access_lines(capsys)
    assert line["trace_id"] == TRACE_ID


async def test_tracestate_in_several_headers_goes_up_as_one_list(
    gateway: Client, simulator: Sim
) -> None:
    headers = [
        *ACME.items(),
        ("traceparent", TRACEPARENT),
        ("tracestate", "congo=t61rcWkgMzE"),
        ("tracestate", "rojo=00f067aa0ba902b7"),
    ]
    await (await gateway.post(CHAT, json={"message": "Hi"}, headers=headers)).read()
    [upstream] = await sent_upstream(simulator)
    assert upstream["traceparent"] == TRACEPARENT
    assert upstream["tracestate"] == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


async def test_a_later_version_of_traceparent_goes_up_as_sent(
    gateway: Client, simulator: Sim
) -> None:
    """W3C: a version above 00 is parsed by its first four fields and may carry more."""
    future = f"cc-{TRACE_ID}-{PARENT_ID}-01-what-the-future-holds"
    await gateway.post(CHAT, json={"message": "Hi"}, headers={**ACME, "traceparent": future})
    [upstream] = await sent_upstream(simulator)
    assert upstream["traceparent"] == future


INVALID = {
    "upper-case hex": f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",
    "all-zero trace id": f"00-{'0' * 32}-{PARENT_ID}-01",
    "all-zero parent id": f"00-{TRACE_ID}-{'0' * 16}-01",
    "version ff": f"ff-{TRACE_ID}-{PARENT_ID}-01",
    "version 00 with more fields": f"00-{TRACE_ID}-{PARENT_ID}-01-extra",
    "short trace id": f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01",
    "no flags": f"00-{TRACE_ID}-{PARENT_ID}",
    "not hex": f"00-{TRACE_ID[:-1]}g-{PARENT_ID}-01",
    "garbage": "hello",
}


@pytest.mark.parametrize("traceparent", INVALID.values(), ids=INVALID.keys())
async def test_an_invalid_traceparent_is_not_forwarded(
    gateway: Client, simulator: Sim, capsys: pytest.CaptureFixture[str], traceparent: str
) -> None:
    capsys.readouterr()
    headers = {**ACME, "traceparent": traceparent, "tracestate": "congo=t61rcWkgMzE"}
    response = await gateway.post(CHAT, json={"message": "Hi"}, headers=headers)
    assert response.status == 200  # a bad trace context costs the caller nothing
    [upstream] = await sent_upstream(simulator)
    assert "traceparent" not in upstream and "tracestate" not in upstream
    [line] = access_lines(capsys)
    assert "trace_id" not in line


async def test_a_traceparent_sent_twice_is_not_forwarded(gateway: Client, simulator: Sim) -> None:
    other = f"00-{TRACE_ID}-{'1' * 16}-01"
    headers = [*ACME.items(), ("traceparent", TRACEPARENT), ("traceparent", other)]
    await (await gateway.post(CHAT, json={"message": "Hi"}, headers=headers)).read()
    [upstream] = await sent_upstream(simulator)
    assert "traceparent" not in upstream


@pytest.mark.parametrize(
    "tracestate", ["Upper=1", "a=1,a=2", "a=b=c", ",".join(f"k{i}=v" for i in range(33))]
)
async def test_an_invalid_tracestate_is_dropped_and_the_traceparent_still_goes(
    gateway: Client, simulator: Sim, tracestate: str
) -> None:
    headers = {**ACME, "traceparent": TRACEPARENT, "tracestate": tracestate}
    await (await gateway.post(CHAT, json={"message": "Hi"}, headers=headers)).read()
    [upstream] = await sent_upstream(simulator)
    assert upstream["traceparent"] == TRACEPARENT and "tracestate" not in upstream


async def test_without_a_traceparent_none_is_made_up(
    gateway: Client, simulator: Sim, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tracing off records nothing, so it names no parent span upstream and leaves upstream's
    own sampling decision alone."""
    capsys.readouterr()
    await (await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)).read()
    [upstream] = await sent_upstream(simulator)
    assert "traceparent" not in upstream and "tracestate" not in upstream
    assert "trace_id" not in access_lines(capsys)[0]


async def test_a_refused_request_still_logs_its_trace_id(
    gateway: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    response = await gateway.post(
        CHAT, json={"message": "Hi"}, headers={"traceparent": TRACEPARENT}
    )
    assert response.status == 401
    assert access_lines(capsys)[0]["trace_id"] == TRACE_ID


# --- tracing on: spans over OTLP/HTTP ---------------------------------------------------------


async def test_spans_arrive_with_the_callers_trace_their_structure_and_token_counts(
    make_gateway: Any,
    receiver: tuple[Receiver, str],
    simulator: Sim,
    capsys: pytest.CaptureFixture[str],
) -> None:
    collector, endpoint = receiver
    gateway = await traced_gateway(make_gateway, endpoint)
    capsys.readouterr()
    headers = {**ACME, "traceparent": TRACEPARENT, "tracestate": "congo=t61rcWkgMzE"}
    response = await gateway.post(CHAT, json={"message": MESSAGE}, headers=headers)
    usage = (await response.json())["usage"]
    await gateway.app[TRACING].flush()

    [request] = collector.named(REQUEST)
    assert (request.trace_id, request.parent_id, request.kind) == (TRACE_ID, PARENT_ID, SERVER)
    assert request.service == "thinnest-gateway"
    attributes = request.attributes
    assert {k: attributes.get(k) for k in ("gateway.tenant", "gateway.key_name")} == {
        "gateway.tenant": "acme",
        "gateway.key_name": "billing-service",
    }
    assert attributes["gen_ai.agent.id"] == "ag_support"
    assert attributes["http.response.status_code"] == 200
    assert attributes["gen_ai.operation.name"] == "invoke_agent"
    assert attributes["gen_ai.provider.name"] == "thinnestai"
    assert attributes["gen_ai.usage.input_tokens"] == usage["input_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == usage["output_tokens"]
    assert attributes["gateway.tokens_charged"] == usage["total_tokens"]
    assert attributes["gateway.request_id"] == response.headers["X-Request-ID"]

    children = collector.tree(request)
    assert set(children) == {"gateway.quota.reserve", "POST", "gateway.quota.settle"}
    assert {span.trace_id for span in collector.spans} == {TRACE_ID}
    assert children["gateway.quota.reserve"].attributes["gateway.quota.allowed"] is True
    assert (
        children["gateway.quota.settle"].attributes["gateway.tokens_charged"]
        == (usage["total_tokens"])
    )
    call = children["POST"]
    assert call.kind == CLIENT and call.attributes["http.response.status_code"] == 200
    assert str(call.attributes["url.full"]).endswith("/v1/agents/ag_support/chat")
    # Upstream's parent is the gateway's call span, in the caller's trace, tracestate kept.
    [upstream] = await sent_upstream(simulator)
    assert upstream["traceparent"] == f"00-{TRACE_ID}-{call.span_id}-01"
    assert upstream["tracestate"] == "congo=t61rcWkgMzE"
    assert access_lines(capsys)[0]["trace_id"] == TRACE_ID
    # Never a key, the message or the answer.
    everything = json.dumps([span.attributes for span in collector.spans])
    for secret in (ACME_KEY, PLATFORM_KEY, SUPPORT_KEY, MESSAGE):
        assert secret not in everything


async def test_a_streams_tokens_are_on_its_request_span(
    make_gateway: Any, receiver: tuple[Receiver, str]
) -> None:
    collector, endpoint = receiver
    gateway = await traced_gateway(make_gateway, endpoint)
    response = await gateway.post(CHAT, json={"message": MESSAGE, "stream": True}, headers=ACME)
    done = sse_events(await response.read())[-1]
    await gateway.app[TRACING].flush()

    [request] = collector.named(REQUEST)
    assert request.attributes["gateway.stream"] is True
    reported = done.get("tokens_used", done.get("usage", {}).get("total_tokens"))
    assert request.attributes["gateway.tokens_charged"] == reported
    assert request.attributes["gateway.tokens_estimated"] is False
    if "usage" in done:
        assert request.attributes["gen_ai.usage.output_tokens"] == done["usage"]["output_tokens"]
    assert set(collector.tree(request)) == {"gateway.quota.reserve", "POST", "gateway.quota.settle"}


async def test_a_stream_whose_caller_left_gets_its_tokens_once_the_drain_settles(
    make_gateway: Any, receiver: tuple[Receiver, str], simulator: Sim
) -> None:
    collector, endpoint = receiver
    gateway = await traced_gateway(make_gateway, endpoint)
    await simulator.post("/_sim/faults", json={"kind": "hold_stream", "after_events": 1})
    response = await gateway.post(CHAT, json={"message": MESSAGE, "stream": True}, headers=ACME)
    await response.content.readuntil(b"\n\n")
    response.close()  # gone before the done event
    await simulator.post("/_sim/release")
    async with asyncio.timeout(10):
        await gateway.app[DRAINS].wait_finished(1)
    await gateway.app[TRACING].flush()

    [recorded] = (await (await simulator.get("/_sim/requests")).json())[-1:]
    [request] = collector.named(REQUEST)
    assert request.attributes["gateway.client_closed"] is True
    assert request.attributes["gateway.tokens_charged"] == recorded["usage"]["total_tokens"]
    assert request.attributes["gateway.tokens_estimated"] is False
    assert set(collector.tree(request)) == {"gateway.quota.reserve", "POST", "gateway.quota.settle"}


async def test_without_a_caller_context_the_gateway_starts_the_trace(
    make_gateway: Any,
    receiver: tuple[Receiver, str],
    simulator: Sim,
    capsys: pytest.CaptureFixture[str],
) -> None:
    collector, endpoint = receiver
    gateway = await traced_gateway(make_gateway, endpoint)
    capsys.readouterr()
    await (await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)).read()
    await gateway.app[TRACING].flush()

    [request] = collector.named(REQUEST)
    assert request.parent_id == ""
    call = collector.tree(request)["POST"]
    [upstream] = await sent_upstream(simulator)
    version, trace_id, parent_id, flags = upstream["traceparent"].split("-")
    assert (version, trace_id, parent_id) == ("00", request.trace_id, call.span_id)
    # Sampled; the SDK also sets W3C level 2's "random trace id" flag (02) on traces it starts.
    assert int(flags, 16) & 1 == 1
    assert "tracestate" not in upstream
    assert access_lines(capsys)[0]["trace_id"] == request.trace_id


async def test_an_invalid_traceparent_restarts_the_trace(
    make_gateway: Any, receiver: tuple[Receiver, str], simulator: Sim
) -> None:
    collector, endpoint = receiver
    gateway = await traced_gateway(make_gateway, endpoint)
    invalid = INVALID["version 00 with more fields"]
    headers = {**ACME, "traceparent": invalid, "tracestate": "congo=t61rcWkgMzE"}
    await (await gateway.post(CHAT, json={"message": "Hi"}, headers=headers)).read()
    await gateway.app[TRACING].flush()

    [request] = collector.named(REQUEST)
    assert request.trace_id != TRACE_ID and request.parent_id == ""
    [upstream] = await sent_upstream(simulator)
    assert upstream["traceparent"] != invalid and TRACE_ID not in upstream["traceparent"]
    assert "tracestate" not in upstream


async def test_sample_ratio_0_sends_no_spans_and_tells_upstream_so(
    make_gateway: Any,
    receiver: tuple[Receiver, str],
    simulator: Sim,
    capsys: pytest.CaptureFixture[str],
) -> None:
    collector, endpoint = receiver
    gateway = await traced_gateway(make_gateway, endpoint, ratio=0)
    capsys.readouterr()
    for body in ({"message": "Hi"}, {"message": "Hi", "stream": True}):
        await (await gateway.post(CHAT, json=body, headers=ACME)).read()
    await gateway.app[TRACING].flush()
    assert collector.posts == 0 and collector.spans == []

    # Upstream learns the decision (not sampled) under the trace id on the access line.
    lines = access_lines(capsys)
    for upstream, line in zip(await sent_upstream(simulator), lines, strict=True):
        version, trace_id, _, flags = upstream["traceparent"].split("-")
        assert (version, trace_id, int(flags, 16) & 1) == ("00", line["trace_id"], 0)


async def test_a_callers_decision_outweighs_the_ratio(
    make_gateway: Any, receiver: tuple[Receiver, str], simulator: Sim
) -> None:
    """ParentBased: a caller's sampled flag is followed whatever the ratio, both ways."""
    collector, endpoint = receiver
    gateway = await traced_gateway(make_gateway, endpoint, ratio=0)
    await (
        await gateway.post(
            CHAT, json={"message": "Hi"}, headers={**ACME, "traceparent": TRACEPARENT}
        )
    ).read()
    await gateway.app[TRACING].flush()
    assert [span.trace_id for span in collector.named(REQUEST)] == [TRACE_ID]

    everything = await traced_gateway(make_gateway, endpoint, ratio=1)
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"
    headers = {**ACME, "traceparent": unsampled}
    await (await everything.post(CHAT, json={"message": "Hi"}, headers=headers)).read()
    await everything.app[TRACING].flush()
    assert len(collector.named(REQUEST)) == 1
    # Not recorded, so not a parent: the caller's context goes on as it came.
    assert (await sent_upstream(simulator))[-1]["traceparent"] == unsampled


async def test_a_refused_request_has_a_span_without_an_upstream_call(
    make_gateway: Any, receiver: tuple[Receiver, str], simulator: Sim
) -> None:
    collector, endpoint = receiver
    text = gateway_yaml(str(simulator.make_url("")).rstrip("/")).replace(
        "agents: [ag_support]", "agents: [ag_support]\n    limits: {requests: {per_minute: 1}}"
    )
    config = parse_config(text + f"tracing: {{otlp_endpoint: {endpoint}}}\n", "test.yaml")
    gateway = await make_gateway(config=config)
    statuses = [
        (await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)).status for _ in range(2)
    ]
    assert statuses == [200, 429]
    await gateway.app[TRACING].flush()

    refused = next(
        s for s in collector.named(REQUEST) if s.attributes["http.response.status_code"] == 429
    )
    assert refused.attributes["error.type"] == "rate_limited"
    [reserve] = collector.tree(refused).values()
    assert reserve.name == "gateway.quota.reserve"
    assert reserve.attributes["gateway.quota.allowed"] is False
    assert reserve.attributes["gateway.quota.limit"] == "requests per minute"
    assert "gen_ai.usage.input_tokens" not in refused.attributes


async def test_an_upstream_failure_marks_the_call_span(
    make_gateway: Any, receiver: tuple[Receiver, str], simulator: Sim
) -> None:
    collector, endpoint = receiver
    gateway = await traced_gateway(make_gateway, endpoint)
    await simulator.post("/_sim/faults", json={"kind": "error", "status": 500, "times": 1})
    response = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    assert response.status == 500
    await gateway.app[TRACING].flush()

    [request] = collector.named(REQUEST)
    call = collector.tree(request)["POST"]
    assert call.attributes["error.type"] == "500" and call.status == ERROR
    assert request.attributes["gateway.tokens_charged"] == 0


async def test_spans_still_queued_are_exported_when_the_gateway_stops(
    make_gateway: Any, receiver: tuple[Receiver, str]
) -> None:
    collector, endpoint = receiver
    gateway = await traced_gateway(make_gateway, endpoint)
    await (await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)).read()
    assert collector.spans == []  # batched: nothing is sent per request
    await gateway.close()  # the app's cleanup flushes
    assert len(collector.named(REQUEST)) == 1 and len(collector.spans) == 4


async def test_a_dead_collector_holds_up_the_exit_only_as_long_as_its_bound(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The exporter alone would retry a refused connection for ten seconds."""
    dead = URL(f"http://127.0.0.1:{free_port()}/v1/traces")
    tracing = OtelTracing(Tracing(otlp_endpoint=dead), URL("http://127.0.0.1:9"), close_timeout=0.2)
    tracing.tracer.start_span("lost").end()
    loop = asyncio.get_running_loop()
    began = loop.time()
    await tracing.close()
    assert loop.time() - began < 2
    assert "tracing: spans not exported at exit were dropped" in capsys.readouterr().err


async def test_spans_dropped_by_a_full_queue_are_logged_once_not_per_span(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A collector that does not answer: the SDK's queue (one span here) fills at once; the
    SDK says so once, not for each of the spans it then drops."""
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "1")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1")
    dead = URL(f"http://127.0.0.1:{free_port()}/v1/traces")
    tracing = OtelTracing(Tracing(otlp_endpoint=dead), URL("http://127.0.0.1:9"), close_timeout=0.2)
    capsys.readouterr()
    for _ in range(200):
        tracing.tracer.start_span("dropped").end()
    await tracing.close()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "Queue full" in line]
    assert len(warnings) == 1, warnings


# --- configuration and installation ---------------------------------------------------------


def test_tracing_config_defaults_and_endpoint_forms() -> None:
    base = gateway_yaml("http://127.0.0.1:9")
    assert parse_config(base).tracing == Tracing()
    assert Tracing().otlp_endpoint is None and Tracing().sample_ratio == 1.0
    for given, used in (
        ("http://otel-collector:4318", "http://otel-collector:4318/v1/traces"),
        ("http://otel-collector:4318/", "http://otel-collector:4318/v1/traces"),
        ("https://otlp.example.com/otlp/v1/traces", "https://otlp.example.com/otlp/v1/traces"),
    ):
        config = parse_config(base + f"tracing: {{otlp_endpoint: '{given}', sample_ratio: 0.1}}")
        assert str(config.tracing.otlp_endpoint) == used
        assert config.tracing.sample_ratio == 0.1


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        (
            "{otlp_endpoint: collector:4318}",
            "tracing.otlp_endpoint: expected an http:// or https://",
        ),
        (
            "{otlp_endpoint: 'grpc://c:4317'}",
            "tracing.otlp_endpoint: expected an http:// or https://",
        ),
        (
            "{otlp_endpoint: 'http://u:p@c:4318'}",
            "tracing.otlp_endpoint: credentials do not belong",
        ),
        ("{sample_ratio: 1.5}", "tracing.sample_ratio: expected a fraction from 0 to 1, got 1.5"),
        ("{sample_ratio: -0.1}", "tracing.sample_ratio: expected a fraction from 0 to 1"),
        ("{sample_ratio: yes}", "tracing.sample_ratio: expected a fraction from 0 to 1, got True"),
        ("{otlp_endpoint: http://c:4318, ratio: 1}", "tracing.ratio: unknown key"),
    ],
)
def test_a_bad_tracing_section_names_the_key(section: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(")):
        parse_config(gateway_yaml("http://127.0.0.1:9") + f"tracing: {section}\n", "gw.yaml")


def test_check_config_says_where_spans_go(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(gateway_yaml("http://127.0.0.1:9"))
    assert main(["check-config", "--config", str(path)]) == 0
    assert "tracing off (W3C trace context passed upstream)" in capsys.readouterr().out
    path.write_text(
        gateway_yaml("http://127.0.0.1:9")
        + "tracing: {otlp_endpoint: 'http://collector:4318', sample_ratio: 0.25}\n"
    )
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tracing to http://collector:4318/v1/traces (OTLP/HTTP), sample ratio 0.25" in out


@pytest.fixture
def without_opentelemetry(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An environment whose Python finds no `opentelemetry` package: a site hook that refuses
    the import, as an install without the `otel` extra does."""
    hook = tmp_path / "no_otel"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import sys\n"
        "class NoOtel:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'opentelemetry' or name.startswith('opentelemetry.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoOtel())\n"
    )
    yield {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
        "TEST_PLATFORM_KEY": PLATFORM_KEY,
        "TEST_SUPPORT_KEY": SUPPORT_KEY,
    }


async def test_tracing_off_runs_without_the_otel_extra_and_imports_none_of_it(
    tmp_path: Path, without_opentelemetry: dict[str, str], simulator: Sim
) -> None:
    config = tmp_path / "gw.yaml"
    log = tmp_path / "gateway.log"

    async def serve(ports: list[int]) -> Process:
        config.write_text(
            gateway_yaml(str(simulator.make_url("")).rstrip("/"))
            + f"listen: {{host: 127.0.0.1, port: {ports[0]}}}\n"
            + f"admin: {{host: 127.0.0.1, port: {ports[1]}}}\n"
        )
        return await start("serve", "--config", str(config), env=without_opentelemetry, log=log)

    process, (port, _) = await serving(
        serve, ports=2, ready=lambda ports: f"http://127.0.0.1:{ports[1]}/readyz", log=log
    )
    try:
        async with aiohttp.ClientSession() as session:
            headers = {**ACME, "traceparent": TRACEPARENT}
            async with session.post(
                f"http://127.0.0.1:{port}{CHAT}", json={"message": "Hi"}, headers=headers
            ) as response:
                assert response.status == 200, await response.text()
        [upstream] = await sent_upstream(simulator)
        assert upstream["traceparent"] == TRACEPARENT
    finally:
        assert await stop(process) == 0, log.read_text()


@pytest.mark.parametrize("command", ["check-config", "serve"])
async def test_an_endpoint_without_the_otel_extra_stops_start_up_saying_what_to_install(
    tmp_path: Path, without_opentelemetry: dict[str, str], command: str
) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(
        gateway_yaml("http://127.0.0.1:9")
        + f"listen: {{host: 127.0.0.1, port: {free_port()}}}\n"
        + f"admin: {{host: 127.0.0.1, port: {free_port()}}}\n"
        + "tracing: {otlp_endpoint: 'http://collector:4318'}\n"
    )
    log = tmp_path / f"{command}.log"
    process = await start(command, "--config", str(config), env=without_opentelemetry, log=log)
    assert await asyncio.wait_for(process.wait(), timeout=30) == 1
    said = log.read_text()
    assert (
        f"{config}: tracing.otlp_endpoint is set, but the OpenTelemetry SDK is not installed"
        in said
    )
    assert "pip install 'thinnest-gateway[otel]'" in said
