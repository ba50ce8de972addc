"""A stand-in OpenTelemetry collector for the tracing benchmark: it takes OTLP/HTTP exports and
counts their spans, nothing more.

`POST /v1/traces` decodes the `ExportTraceServiceRequest` (protobuf), as a collector would,
and answers as one does; `GET /count` says how many export requests and spans came in. Its
own CPU is the collector's, not the gateway's: the benchmark reads it apart.

    python -m bench.otlp_sink --port 4318
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

PROTOBUF = "application/x-protobuf"


class Counts:
    __slots__ = ("posts", "spans")

    def __init__(self) -> None:
        self.posts = 0
        self.spans = 0


COUNTS = web.AppKey("counts", Counts)
_ANSWER = ExportTraceServiceResponse().SerializeToString()


async def traces(request: web.Request) -> web.Response:
    export = ExportTraceServiceRequest.FromString(await request.read())
    counts = request.app[COUNTS]
    counts.posts += 1
    counts.spans += sum(
        len(scope.spans) for resource in export.resource_spans for scope in resource.scope_spans
    )
    return web.Response(body=_ANSWER, content_type=PROTOBUF)


async def count(request: web.Request) -> web.Response:
    counts = request.app[COUNTS]
    return web.json_response({"posts": counts.posts, "spans": counts.spans})


def create_app() -> web.Application:
    # Export batches of 512 spans run to a few hundred KiB: aiohttp's 1 MiB default is enough,
    # but a collector takes more, so this does too.
    app = web.Application(client_max_size=16 * 2**20)
    app[COUNTS] = Counts()
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/count", count)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.otlp_sink", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    web.run_app(
        create_app(),
        host=args.host,
        port=args.port,
        access_log=None,
        print=lambda _: print(f"otlp sink listening on http://{args.host}:{args.port}", flush=True),
    )


if __name__ == "__main__":
    main()
