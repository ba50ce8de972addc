"""The floor: the least an aiohttp proxy of the chat API can do, to measure the gateway against.

One shared ClientSession, one route, the body forwarded with the upstream key and the answer
streamed back as it arrives. No auth, validation, quotas, logging or metrics: whatever the
gateway costs beyond this is the price of its features.

    python -m bench.floor --port 8100 --upstream http://127.0.0.1:9000 --key thns_sk_...
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import web

from gateway.config import event_loop

uvloop = importlib.import_module("uvloop") if importlib.util.find_spec("uvloop") else None

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
AUTHORIZATION = web.AppKey("authorization", str)


async def _client(app: web.Application) -> AsyncIterator[None]:
    # Unlimited pool, as the gateway's: a cap would queue requests and measure the cap instead.
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await app[SESSION].close()


async def chat(request: web.Request) -> web.StreamResponse:
    app = request.app
    url = f"{app[UPSTREAM]}/v1/agents/{request.match_info['agent_id']}/chat"
    headers = {
        "Authorization": app[AUTHORIZATION],
        "Content-Type": request.headers.get("Content-Type", "application/json"),
    }
    body = await request.read()
    async with app[SESSION].post(url, data=body, headers=headers) as upstream:
        if upstream.content_type != "text/event-stream":
            return web.Response(
                status=upstream.status,
                body=await upstream.read(),
                content_type=upstream.content_type,
            )
        response = web.StreamResponse(
            status=upstream.status,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
        )
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def create_app(upstream: str, key: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app[AUTHORIZATION] = f"Bearer {key}"
    app.cleanup_ctx.append(_client)
    app.router.add_post("/v1/agents/{agent_id}/chat", chat)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000")
    parser.add_argument("--key", required=True, help="upstream API key sent on every request")
    args = parser.parse_args(argv)
    # The gateway's rule (gateway/app.py: THINNEST_GATEWAY_EVENT_LOOP, by default uvloop when
    # installed), so both run on the same loop.
    loop = uvloop.new_event_loop() if uvloop is not None and event_loop() != "asyncio" else None
    web.run_app(
        create_app(args.upstream, args.key),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        loop=loop,
    )


if __name__ == "__main__":
    main()
