"""The one pooled client to api.thinnest.ai: key choice, header allowlist, timeouts, retries.

Every library failure is wrapped here into UpstreamTimeout or UpstreamUnavailable, so the
proxy never sees an aiohttp exception from the request phase. Safe retries (gateway/retries.py)
happen inside `send`, before anything has reached the caller.
"""

from __future__ import annotations

import asyncio
import io
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import aiohttp
import structlog
from aiohttp import ClientResponse, ClientSession, StreamReader, hdrs
from multidict import CIMultiDict
from yarl import URL

from gateway import __version__
from gateway.circuits import Circuits
from gateway.config import Agent, Secret, Timeouts, Upstream
from gateway.errors import (
    UpstreamConnectTimeout,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnreached,
)
from gateway.outages import FailureLog
from gateway.retries import Retry, RetryPolicy
from gateway.tls import client_context

# Only these caller headers go upstream; Authorization, cookies, hop-by-hop and anything
# else a caller sends stay at the gateway. Accept is the gateway's own reading of the caller's
# (headers_for's `stream`): upstream must not stream what the gateway did not count as a stream.
# W3C `traceparent`/`tracestate` are gateway/tracing.py's (headers_for's `trace`): a caller's
# valid context as it came, the gateway's own span with tracing on, or nothing.
FORWARDED_HEADERS = ("Content-Type", "User-Agent")
USER_AGENT = f"thinnest-gateway/{__version__}"
LARGE_BODY = 2**20  # aiohttp's payload.TOO_LARGE_BYTES_BODY
_NO_TRACE: Mapping[str, str] = MappingProxyType({})

log = structlog.get_logger("gateway.upstream")


class Deadline:
    """One request's `upstream.timeouts.total`, in event-loop time, capping every wait."""

    __slots__ = ("_at", "_loop")

    def __init__(self, timeouts: Timeouts) -> None:
        self._loop = asyncio.get_running_loop()
        self._at = self._loop.time() + timeouts.total

    @property
    def at(self) -> float:
        """The loop time the request must be over by."""
        return self._at

    def within(self, seconds: float) -> float:
        """The loop time to stop waiting: `seconds` from now, or the deadline if sooner."""
        return min(self._loop.time() + seconds, self._at)


@dataclass(frozen=True, slots=True)
class UpstreamKeys:
    """Which upstream key each agent's requests go out with: its own, else the platform key."""

    platform: Secret | None
    by_agent: Mapping[str, Secret]

    @classmethod
    def of(cls, agents: Mapping[str, Agent], platform: Secret | None) -> UpstreamKeys:
        return cls(platform, {a.id: a.api_key for a in agents.values() if a.api_key is not None})

    def for_agent(self, agent_id: str) -> Secret | None:
        return self.by_agent.get(agent_id) or self.platform

    def can_reach(self, agent_id: str) -> bool:
        return agent_id in self.by_agent or self.platform is not None


class UpstreamClient:
    def __init__(
        self,
        config: Upstream,
        keys: Callable[[], UpstreamKeys],
        session: ClientSession,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        agents: Callable[[], frozenset[str]] = frozenset,
    ) -> None:
        """`keys` reads the upstream keys in force (a reload replaces them: the next request
        goes out with the new ones); `agents` the configured agent ids (each has a circuit of
        its own, the rest share one). `rng` is the retry jitter's source (a fresh one by
        default; tests may seed one)."""
        self.timeouts = config.timeouts
        self.retry_policy = RetryPolicy(config.retries, rng)
        self._peer = f"{config.base_url.host}:{config.base_url.port}"
        self._failures = FailureLog(log, "upstream connection failed", self._peer, clock=clock)
        # A circuit per (upstream key, agent), opened by consecutive failures (gateway/
        # circuits.py says which count): its callers then get an immediate 502 instead of each
        # waiting out a failing agent, and it gets room to recover; one probe per cooldown.
        self.circuits = Circuits(config.breaker, peer=self._peer, agents=agents, clock=clock)
        self._pause = str(math.ceil(config.breaker.cooldown))
        self._session = session
        self._prefix = str(config.base_url).rstrip("/") + "/v1/agents/"
        self._keys = keys

    @staticmethod
    def open_session(config: Upstream) -> ClientSession:
        proxy = config.proxy
        return ClientSession(
            # No pool cap: every upstream connection belongs to one caller connection,
            # and a cap would queue streams behind each other invisibly. Without a
            # `ca_file`, aiohttp's own default context (the system's trust store).
            connector=aiohttp.TCPConnector(
                limit=0,
                ttl_dns_cache=300,
                ssl=True if config.ca_file is None else client_context(config.ca_file),
            ),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.timeouts.connect),
            # aiohttp buffers up to twice this per response before it stops reading: what a
            # drain or a slow caller behind a fast upstream holds (64 KiB made 200 drains of
            # endless streams hold 1.3 MiB each; 16 KiB, 0.2 MiB).
            read_bufsize=2**14,
            # No skip_auto_headers: headers_for() always sets User-Agent, and a session-wide
            # skip list makes aiohttp rebuild a header dict on every request.
            # An egress proxy: CONNECT for an https upstream, absolute URIs for http; "env"
            # asks HTTPS_PROXY/HTTP_PROXY/NO_PROXY (and only then the environment).
            proxy=proxy.reveal() if isinstance(proxy, Secret) else None,
            trust_env=proxy == "env",
        )

    def can_reach(self, agent_id: str) -> bool:
        return self._keys().can_reach(agent_id)

    def headers_for(
        self,
        agent_id: str,
        caller_headers: Mapping[str, str],
        request_id: str,
        *,
        stream: bool,
        trace: Mapping[str, str] = _NO_TRACE,
    ) -> CIMultiDict[str]:
        key = self._keys().for_agent(agent_id)
        assert key is not None, "can_reach() is checked before forwarding"
        headers: CIMultiDict[str] = CIMultiDict()
        for name in FORWARDED_HEADERS:
            value = caller_headers.get(name)
            if value is not None:
                headers[name] = value
        headers.setdefault("Content-Type", "application/json")
        headers["Accept"] = "text/event-stream" if stream else "application/json"
        headers.setdefault("User-Agent", USER_AGENT)
        headers["Accept-Encoding"] = "identity"  # pass bytes through, never re-encode them
        headers["X-Request-ID"] = request_id
        if trace:
            headers.update(trace)
        headers["Authorization"] = f"Bearer {key.reveal()}"
        return headers

    async def send(
        self,
        agent_id: str,
        body: bytes,
        headers: CIMultiDict[str],
        deadline: Deadline,
        *,
        tenant: str,
    ) -> ClientResponse:
        """POST the chat request; returns once upstream's status and headers are in.

        A connection that could not be opened, or a 429/503 with a short Retry-After, is tried
        again within `upstream.retries` (see gateway/retries.py); otherwise the last try's
        response is returned, or its error raised.
        """
        url = URL(self._prefix + agent_id + "/chat", encoded=True)
        policy, loop = self.retry_policy, asyncio.get_running_loop()
        stop_at = min(loop.time() + policy.budget, deadline.at)
        circuit = self.circuits.for_agent(agent_id, self._keys().for_agent(agent_id))
        tries = 0
        while True:
            tries += 1
            retry: Retry | None
            if not circuit.allow():
                raise UpstreamUnreached(
                    "this agent's upstream is failing; the gateway is not sending to it for a "
                    "few seconds",
                    headers={hdrs.RETRY_AFTER: self._pause},
                )
            try:
                response = await self._post(url, body, headers, deadline)
            except UpstreamTimeout as error:
                if isinstance(error, UpstreamConnectTimeout):
                    self._failures.failed(error, agent=agent_id)
                    circuit.failure()
                else:
                    circuit.timed_out(tenant)  # counts only beside another tenant's
                raise
            except UpstreamUnavailable as error:
                self._failures.failed(error, agent=agent_id)
                circuit.failure()
                retry = policy.after_error(
                    error.__cause__, tries=tries, remaining=stop_at - loop.time()
                )
                if retry is None:
                    raise
            else:
                if response.status >= 500:
                    circuit.failure()
                else:
                    circuit.success()
                retry = policy.after_response(
                    response.status,
                    response.headers.get(hdrs.RETRY_AFTER),
                    tries=tries,
                    remaining=stop_at - loop.time(),
                    now=time.time(),
                )
                if retry is None:
                    return response
                response.release()  # unread: its connection goes back to the pool or closes
            log.info(
                "upstream retry",
                request_id=headers.get("X-Request-ID"),
                agent=agent_id,
                attempt=tries + 1,
                reason=retry.reason,
                wait_ms=round(retry.wait * 1000, 3),
            )
            await asyncio.sleep(retry.wait)

    async def _post(
        self, url: URL, body: bytes, headers: CIMultiDict[str], deadline: Deadline
    ) -> ClientResponse:
        """One try; `first_byte` runs afresh for each, all of them within the deadline."""
        try:
            async with asyncio.timeout_at(deadline.within(self.timeouts.first_byte)):
                # aiohttp sends a large bytes body in one blocking write (and warns): as a
                # stream it goes out piecewise, with the event loop free in between.
                data = body if len(body) < LARGE_BODY else io.BytesIO(body)
                return await self._session.post(url, data=data, headers=headers)
        except aiohttp.ClientConnectorError as exc:
            # Refused, unreachable, DNS, TLS: the request never left (see gateway/retries.py).
            raise UpstreamUnreached(
                f"the upstream API could not be reached ({type(exc).__name__})"
            ) from exc
        except aiohttp.ClientHttpProxyError as exc:
            # The egress proxy refused the tunnel (CONNECT), so nothing reached upstream. The
            # exception's str() holds the proxy URL with its credentials: never log it.
            raise UpstreamUnreached(
                f"the egress proxy refused the connection to the upstream API ({exc.status})"
            ) from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamConnectTimeout(
                "the upstream API did not accept a connection in time"
            ) from exc
        except TimeoutError as exc:
            raise UpstreamTimeout("the upstream API did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(
                f"the upstream API could not be reached ({type(exc).__name__})"
            ) from exc

    async def read_body(self, response: ClientResponse, deadline: Deadline, limit: int) -> bytes:
        try:
            if response.content.is_eof():
                return await read_whole(response, limit)  # all here already: no timer to arm
            async with asyncio.timeout_at(deadline.within(self.timeouts.idle)):
                return await read_whole(response, limit)
        except TimeoutError as exc:
            raise UpstreamTimeout("the upstream API stopped sending its response") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(
                f"the upstream API broke off its response ({type(exc).__name__})"
            ) from exc


async def read_whole(response: ClientResponse, limit: int) -> bytes:
    """A JSON answer's whole body, at most `limit` bytes (limits.max_answer_bytes) once
    decompressed: past it, UpstreamUnavailable, and the connection is closed, not pooled."""
    declared = response.content_length
    pieces: list[bytes] = []
    size = 0
    while declared is None or declared <= limit:
        chunk = await response.content.readany()
        if not chunk:
            return b"".join(pieces)
        size += len(chunk)
        if size > limit:
            break
        pieces.append(chunk)
    response.close()
    raise UpstreamUnavailable(
        f"the upstream API's answer was too large (over {limit} bytes, limits.max_answer_bytes)"
    )


async def next_chunk(content: StreamReader, size: int = -1) -> bytes:
    """`content.readany()` (with `size`, at most that many bytes: `content.read(size)`), except
    that bytes which arrived before the connection broke are handed over before the error:
    aiohttp raises a stored error ahead of buffered data, and those bytes were upstream's (the
    caller should see them; they count in an estimate)."""
    if content.exception() is not None and content._buffer:
        return content._read_nowait(size)
    return await (content.readany() if size < 0 else content.read(size))
