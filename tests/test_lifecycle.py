"""A real `serve` process under signals: graceful shutdown on SIGTERM, reload on SIGHUP."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.auth import hash_key
from gateway.config import EventLoop
from tests.conftest import (
    ACME_KEY,
    GLOBEX_KEY,
    PLATFORM_KEY,
    ROTATED_PLATFORM_KEY,
    sse_events,
)
from tests.processes import Running, both_loops, gateway_and_simulator, stop
from tests.secret_watch import SecretWatch

CHAT = "/v1/agents/ag_support/chat"
ACME = {"Authorization": f"Bearer {ACME_KEY}"}


@pytest.fixture
async def running(
    tmp_path: Path, request: pytest.FixtureRequest, serve_loop: EventLoop | None
) -> AsyncIterator[Running]:
    """Simulator and gateway as real processes; `shutdown_grace` 5 s unless parametrized."""
    grace = getattr(request, "param", 5)
    async with gateway_and_simulator(tmp_path, grace=grace, event_loop=serve_loop) as running:
        yield running


async def until_status(session: aiohttp.ClientSession, url: str, status: int) -> None:
    """Polls a process that has been signalled: its reaction has no other observable event."""
    for _ in range(100):
        async with session.get(url) as response:
            if response.status == status:
                return
        await asyncio.sleep(0.02)
    pytest.fail(f"{url} never answered {status}")


@both_loops
async def test_sigterm_stops_taking_work_and_lets_a_stream_in_flight_finish(
    running: Running, secret_watch: SecretWatch
) -> None:
    async with aiohttp.ClientSession(response_class=secret_watch.response_class()) as session:
        await session.post(f"{running.simulator}/_sim/faults", json={"kind": "hold_stream"})
        async with session.post(
            f"{running.url}{CHAT}", json={"message": "a long answer", "stream": True}, headers=ACME
        ) as stream:
            first = await stream.content.readuntil(b"\n\n")
            running.gateway.send_signal(signal.SIGTERM)

            await until_status(session, f"{running.admin}/readyz", 503)
            # New work is refused: the caller port is closed (or answers 503 on a kept-alive
            # connection), while the stream in flight goes on.
            with pytest.raises(aiohttp.ClientConnectionError):
                async with aiohttp.ClientSession() as fresh:
                    await fresh.post(f"{running.url}{CHAT}", json={"message": "new"}, headers=ACME)
            assert running.gateway.returncode is None

            await session.post(f"{running.simulator}/_sim/release")
            events = sse_events(first + await stream.read())
        assert events[-1]["type"] == "done"
        assert "".join(e.get("content", "") for e in events)

    async with asyncio.timeout(5):
        assert await running.gateway.wait() == 0
    lines = running.log.read_text()
    assert '"status": 200' in lines and '"stream": true' in lines


@both_loops
async def test_a_stream_in_flight_after_sigterm_keeps_its_heartbeats_through_the_grace(
    tmp_path: Path, secret_watch: SecretWatch, serve_loop: EventLoop
) -> None:
    heartbeat = "streams: {heartbeat: 1}\n"
    async with (
        gateway_and_simulator(tmp_path, extra=heartbeat, event_loop=serve_loop) as running,
        aiohttp.ClientSession(response_class=secret_watch.response_class()) as session,
    ):
        await session.post(f"{running.simulator}/_sim/faults", json={"kind": "hold_stream"})
        async with session.post(
            f"{running.url}{CHAT}", json={"message": "think first", "stream": True}, headers=ACME
        ) as stream:
            first = await stream.content.readuntil(b"\n\n")
            # Signalled well within the first second of upstream's silence:
            running.gateway.send_signal(signal.SIGTERM)
            await until_status(session, f"{running.admin}/readyz", 503)
            # the load balancer in front still gets its heartbeat while the stream finishes.
            assert await stream.content.readuntil(b"\n\n") == b": keep-alive\n\n"
            await session.post(f"{running.simulator}/_sim/release")
            rest = await stream.read()
        assert sse_events(first + rest)[-1]["type"] == "done"
        async with asyncio.timeout(5):
            assert await running.gateway.wait() == 0


@pytest.mark.parametrize("running", [1], indirect=True, ids=["grace=1s"])
@both_loops
async def test_a_stream_longer_than_the_grace_is_cut_and_the_process_still_exits_0(
    running: Running, secret_watch: SecretWatch
) -> None:
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(response_class=secret_watch.response_class()) as session:
        await session.post(f"{running.simulator}/_sim/faults", json={"kind": "hold_stream"})
        async with session.post(
            f"{running.url}{CHAT}", json={"message": "never ends", "stream": True}, headers=ACME
        ) as stream:
            await stream.content.readuntil(b"\n\n")
            signalled = loop.time()
            running.gateway.send_signal(signal.SIGTERM)
            async with asyncio.timeout(5):
                assert await running.gateway.wait() == 0
            elapsed = loop.time() - signalled
            with pytest.raises(aiohttp.ClientPayloadError):
                await stream.read()
    assert 1 <= elapsed < 4, f"exited {elapsed:.2f} s after SIGTERM with a 1 s grace"


async def test_stop_helper_still_sees_a_clean_exit(running: Running) -> None:
    assert await stop(running.gateway) == 0


# --- hot reload (SIGHUP) ---------------------------------------------------------------------

NEW_KEY = "gw_test_initech_ops_0003"


async def reloads(session: aiohttp.ClientSession, running: Running, result: str) -> float:
    async with session.get(f"{running.admin}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(f'gateway_config_reloads_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


async def sighup(session: aiohttp.ClientSession, running: Running, result: str) -> None:
    """Send SIGHUP and wait until the reload's outcome shows in the metrics."""
    before = await reloads(session, running, result)
    running.gateway.send_signal(signal.SIGHUP)
    for _ in range(100):
        if await reloads(session, running, result) > before:
            return
        await asyncio.sleep(0.02)  # a signalled process: its metrics are the event
    pytest.fail(f"no {result} reload counted:\n{running.log.read_text()}")


async def chat_status(
    session: aiohttp.ClientSession, running: Running, key: str, agent: str = "ag_support"
) -> int:
    async with session.post(
        f"{running.url}/v1/agents/{agent}/chat",
        json={"message": "Hi"},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        await response.read()
        return response.status


@both_loops
async def test_sighup_swaps_keys_and_tenants_while_a_stream_goes_on(
    running: Running, secret_watch: SecretWatch
) -> None:
    async with aiohttp.ClientSession(response_class=secret_watch.response_class()) as session:
        assert await chat_status(session, running, ACME_KEY) == 200
        await session.post(
            f"{running.simulator}/_sim/faults", json={"kind": "hold_stream", "times": 1}
        )
        async with session.post(
            f"{running.url}{CHAT}", json={"message": "keep going", "stream": True}, headers=ACME
        ) as stream:
            first = await stream.content.readuntil(b"\n\n")

            # acme's key is revoked; a new tenant with its own key arrives.
            text = running.config.read_text()
            running.config.write_text(
                text.replace(f"sha256: {hash_key(ACME_KEY)}", f"sha256: {hash_key(NEW_KEY)}")
            )
            await sighup(session, running, "ok")
            assert await chat_status(session, running, ACME_KEY) == 401
            assert await chat_status(session, running, NEW_KEY) == 200

            # The stream admitted under the old key finishes untouched.
            await session.post(f"{running.simulator}/_sim/release")
            events = sse_events(first + await stream.read())
        assert events[-1]["type"] == "done"
    assert "config reloaded" in running.log.read_text()


async def test_an_invalid_file_on_sighup_keeps_the_running_configuration(
    running: Running, secret_watch: SecretWatch
) -> None:
    text = running.config.read_text()
    running.config.write_text(text.replace("agents: [ag_support]", "agents: [ag_nowhere]"))
    async with aiohttp.ClientSession(response_class=secret_watch.response_class()) as session:
        await sighup(session, running, "invalid")
        assert await reloads(session, running, "ok") == 0
        assert await chat_status(session, running, ACME_KEY) == 200
    refused = [line for line in running.log.read_text().splitlines() if "reload refused" in line]
    assert len(refused) == 1 and "tenants.acme.agents[0]" in refused[0]


@pytest.mark.parametrize(
    ("after", "added", "expected"),
    [
        pytest.param(
            "shutdown_grace: 5\n",  # the last line, 19
            "tenants:\n  globex:\n    keys: [{name: web-frontend, sha256: %s}]\n"
            "    agents: ['*']\n",
            ":20: tenants: defined twice, at lines 9 and 20",
            id="two tenants blocks",
        ),
        pytest.param(
            '    agents: ["*"]\n',  # globex's, the last line of tenants: 15
            "  acme:\n    keys: [{name: billing-service, sha256: %s}]\n    agents: [ag_support]\n",
            ":16: tenants.acme: defined twice, at lines 10 and 16",
            id="two entries for one tenant",
        ),
    ],
)
async def test_a_duplicated_key_on_sighup_is_refused_and_the_old_configuration_serves(
    running: Running, secret_watch: SecretWatch, after: str, added: str, expected: str
) -> None:
    # Taking the last one, as PyYAML alone does, would revoke acme's live key.
    text = running.config.read_text()
    assert text.count(after) == 1
    running.config.write_text(text.replace(after, after + added % hash_key(NEW_KEY)))
    async with aiohttp.ClientSession(response_class=secret_watch.response_class()) as session:
        await sighup(session, running, "invalid")
        assert await reloads(session, running, "ok") == 0
        assert await chat_status(session, running, ACME_KEY) == 200
        assert await chat_status(session, running, GLOBEX_KEY, "ag_sales") == 200
        assert await chat_status(session, running, NEW_KEY) == 401
    refused = [line for line in running.log.read_text().splitlines() if "reload refused" in line]
    assert len(refused) == 1 and f"{running.config}{expected}" in refused[0]


async def test_a_reload_keeps_the_tenants_bucket_levels(
    running: Running, secret_watch: SecretWatch
) -> None:
    limited = running.config.read_text().replace(
        "    agents: [ag_support]\n",
        "    agents: [ag_support]\n    limits: {requests: {per_day: 3}}\n",
        1,
    )
    running.config.write_text(limited)
    async with aiohttp.ClientSession(response_class=secret_watch.response_class()) as session:
        await sighup(session, running, "ok")
        assert [await chat_status(session, running, ACME_KEY) for _ in range(2)] == [200, 200]
        # Another reload (a new tenant): acme's bucket is not refilled by it.
        running.config.write_text(
            limited.replace(f"sha256: {hash_key(GLOBEX_KEY)}", f"sha256: {hash_key(NEW_KEY)}")
        )
        await sighup(session, running, "ok")
        assert [await chat_status(session, running, ACME_KEY) for _ in range(2)] == [200, 429]


async def test_sighup_rotates_the_upstream_platform_key_read_from_a_file(
    tmp_path: Path, secret_watch: SecretWatch
) -> None:
    old, new = PLATFORM_KEY, ROTATED_PLATFORM_KEY
    key_file = tmp_path / "platform-key"
    key_file.write_text(old)
    async with gateway_and_simulator(
        tmp_path,
        simulator_yaml=f"platform_keys: [{old}, {new}]\n",
    ) as running:
        text = running.config.read_text().replace("${TEST_PLATFORM_KEY}", f"${{file:{key_file}}}")
        running.config.write_text(text)
        async with aiohttp.ClientSession(response_class=secret_watch.response_class()) as session:
            await sighup(session, running, "ok")  # now reading the key from the file
            assert await chat_status(session, running, GLOBEX_KEY, "ag_sales") == 200
            key_file.write_text(new)  # the secret store rotates the mounted file
            await sighup(session, running, "ok")
            assert await chat_status(session, running, GLOBEX_KEY, "ag_sales") == 200
        async with (
            aiohttp.ClientSession() as upstream_side,  # the simulator reports keys: unwatched
            upstream_side.get(f"{running.simulator}/_sim/requests") as response,
        ):
            sent = [r["headers"]["Authorization"] for r in await response.json()]
        assert sent == [f"Bearer {old}", f"Bearer {new}"]
        assert "restart_needed_for" not in running.log.read_text()


@both_loops
async def test_sighup_under_traffic_lowers_a_keys_limit_and_removes_another(
    running: Running, secret_watch: SecretWatch
) -> None:
    """The real signal path of tests/test_reload.py's exact test: callers of two keys of one
    tenant keep sending while SIGHUP lowers key A's requests per minute (600 → 6) and removes
    key B. Nothing fails; every request sent once the reload is counted finds A under its new
    limit and B refused; A gets no more than the new limit (plus what its refill of 0.1/s
    adds) before it is refused."""
    one_key = f"keys: [{{name: billing-service, sha256: {hash_key(ACME_KEY)}}}]"
    text = running.config.read_text()

    def keys(a_per_minute: int, *, with_b: bool) -> str:
        a = f"{{name: billing-service, sha256: {hash_key(ACME_KEY)}, limits: "
        a += f"{{requests: {{per_minute: {a_per_minute}}}}}}}"
        b = f", {{name: reports, sha256: {hash_key(NEW_KEY)}}}" if with_b else ""
        return text.replace(one_key, f"keys: [{a}{b}]")

    running.config.write_text(keys(600, with_b=True))
    loop = asyncio.get_running_loop()
    warm, signalled, counted = asyncio.Event(), asyncio.Event(), asyncio.Event()
    outcomes: list[tuple[str, str, int, str | None]] = []  # key, sent, status, limit header

    async def caller(session: aiohttp.ClientSession, name: str, key: str) -> None:
        while True:
            sent = "after" if counted.is_set() else "during" if signalled.is_set() else "before"
            async with session.post(
                f"{running.url}{CHAT}",
                json={"message": "Hi"},
                headers={"Authorization": f"Bearer {key}"},
            ) as response:
                await response.read()
            outcomes.append(
                (name, sent, response.status, response.headers.get("X-RateLimit-Limit"))
            )
            if sum(when == "before" for _, when, _, _ in outcomes) == 40:
                warm.set()  # both keys' callers are under way
            if sent == "after" and (name == "B" or response.status != 200):
                return

    async with aiohttp.ClientSession(response_class=secret_watch.response_class()) as session:
        await sighup(session, running, "ok")  # B is a key now
        callers = [
            *(asyncio.create_task(caller(session, "A", ACME_KEY)) for _ in range(4)),
            *(asyncio.create_task(caller(session, "B", NEW_KEY)) for _ in range(4)),
        ]
        await warm.wait()
        running.config.write_text(keys(6, with_b=False))
        signalled.set()
        started = loop.time()
        await sighup(session, running, "ok")
        counted.set()
        async with asyncio.timeout(20):
            await asyncio.gather(*callers)
        elapsed = loop.time() - started

    assert {status for name, _, status, _ in outcomes if name == "A"} <= {200, 429}
    assert {status for name, _, status, _ in outcomes if name == "B"} <= {200, 401}
    assert all(s == 200 for name, sent, s, _ in outcomes if sent == "before")
    assert all(s == 401 for name, sent, s, _ in outcomes if name == "B" and sent == "after")
    assert all(lim == "6" for name, sent, _, lim in outcomes if name == "A" and sent == "after")
    under_new = [s for name, _, s, lim in outcomes if name == "A" and lim == "6" and s == 200]
    assert len(under_new) <= 6 + 1 + int(elapsed * 0.1)
