"""Reload as one snapshot, in process: a reload under traffic, exact to the request.

tests/test_lifecycle.py sends real SIGHUPs to a real `serve`; here the gateway runs in this
process with a clock that moves only when the test moves it (no bucket refills on its own), and
`reload_config` (what SIGHUP calls) runs on the same event loop as the traffic, so "before" and
"after" the swap are exact.
"""

from __future__ import annotations

import asyncio
import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from gateway.auth import hash_key
from gateway.config import load_config
from gateway.reload import reload_config
from gateway.state import METRICS, QUOTA, TENANCY, UPSTREAM
from gateway.usage import usage_from
from tests.conftest import ACME_KEY, GLOBEX_KEY, FakeClock, GatewayFactory

CHAT = "/v1/agents/ag_support/chat"
# Two services of one team: A (billing) and B (reports).
KEY_A, KEY_B = ACME_KEY, GLOBEX_KEY
A_LIMIT, A_LOWERED = 40, 10
SWAP_AFTER = 32  # A's admitted requests when the reload comes: > 40 - 10, see below
WORKERS = 6  # concurrent callers per key


def config_text(simulator_url: str, *, a_per_minute: int, with_b: bool = True) -> str:
    b = f"      - {{name: reports, sha256: {hash_key(KEY_B)}}}\n" if with_b else ""
    return f"""
upstream:
  base_url: {simulator_url}
  api_key: ${{TEST_PLATFORM_KEY}}
  timeouts: {{connect: 2, first_byte: 5, idle: 5, total: 30}}
agents:
  ag_support: {{api_key: "${{TEST_SUPPORT_KEY}}"}}
tenants:
  acme:
    agents: [ag_support]
    keys:
      - name: billing
        sha256: {hash_key(KEY_A)}
        limits: {{requests: {{per_minute: {a_per_minute}}}}}
{b}"""


@dataclass(frozen=True)
class Outcome:
    key: str  # "A" | "B"
    sent_after_reload: bool
    status: int
    limit: int | None  # X-RateLimit-Limit: the plan the request was reserved under
    remaining: int | None
    tokens: int  # what upstream reported, for an answered request


def reloads(gateway: TestClient[Any, Any], result: str) -> float:
    value = gateway.app[METRICS].registry.get_sample_value(
        "gateway_config_reloads_total", {"result": result}
    )
    return value or 0.0


async def ledger(gateway: TestClient[Any, Any]) -> dict[str, tuple[int, int]]:
    """Requests and tokens charged per key name, from the usage ledger."""
    today = datetime.datetime.now(datetime.UTC).date()
    first, last = today - datetime.timedelta(days=1), today + datetime.timedelta(days=1)
    rows = await gateway.app[QUOTA].ledger(first.isoformat(), last.isoformat())
    charged: dict[str, tuple[int, int]] = {}
    for row in rows:
        requests, tokens = charged.get(row.key, (0, 0))
        charged[row.key] = (requests + row.requests, tokens + row.tokens_total)
    return charged


async def chat(gateway: TestClient[Any, Any], key: str) -> tuple[int, dict[str, Any], Any]:
    async with gateway.post(
        CHAT, json={"message": "Hi"}, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        return response.status, await response.json(), response.headers


def header(headers: Any, name: str) -> int | None:
    value = headers.get(name)
    return None if value is None else int(value)


async def test_reload_changing_a_keys_limits_under_traffic(
    make_gateway: GatewayFactory, simulator_url: str, tmp_path: Path
) -> None:
    """Key A's requests per minute go from 40 to 10 and key B is removed while both keys'
    callers keep sending: A is held to what is left of its bucket under the new limit (levels
    carry over: not refilled by the reload), B gets 401 from its next request, and every
    request in flight finishes, charged once."""
    path = tmp_path / "gateway.yaml"
    path.write_text(config_text(simulator_url, a_per_minute=A_LIMIT))
    clock = FakeClock()
    gateway = await make_gateway(config=load_config(str(path)), clock=clock)
    outcomes: list[Outcome] = []
    reloaded = asyncio.Event()

    async def caller(name: str, key: str) -> None:
        while True:
            after = reloaded.is_set()
            status, body, headers = await chat(gateway, key)
            usage = usage_from(body) if status == 200 else None
            outcomes.append(
                Outcome(
                    name,
                    after,
                    status,
                    header(headers, "X-RateLimit-Limit"),
                    header(headers, "X-RateLimit-Remaining"),
                    usage.total if usage is not None else 0,
                )
            )
            admitted_a = sum(o.key == "A" and o.status == 200 for o in outcomes)
            if not reloaded.is_set() and admitted_a == SWAP_AFTER:
                # Lower A's limit, remove B: the same call SIGHUP makes, while the other
                # callers' requests are in flight.
                path.write_text(config_text(simulator_url, a_per_minute=A_LOWERED, with_b=False))
                assert reload_config(gateway.app)
                reloaded.set()
            if after and (name == "B" or status != 200):
                return  # B's first request after the reload, or A run dry under its new limit

    async with asyncio.timeout(30):
        await asyncio.gather(
            *(caller("A", KEY_A) for _ in range(WORKERS)),
            *(caller("B", KEY_B) for _ in range(WORKERS)),
        )

    a = [o for o in outcomes if o.key == "A"]
    b = [o for o in outcomes if o.key == "B"]
    # Nothing in flight failed: A is answered or refused by its limit, B answered or refused.
    assert {o.status for o in a} <= {200, 429}
    assert {o.status for o in b} <= {200, 401}
    # A: under the old plan until the swap, under the new one for every request after it.
    before = [o for o in a if o.status == 200 and o.limit == A_LIMIT]
    after = [o for o in a if o.status == 200 and o.limit == A_LOWERED]
    assert len(before) + len(after) == sum(o.status == 200 for o in a)
    assert all(o.limit == A_LOWERED for o in a if o.sent_after_reload)
    assert SWAP_AFTER <= len(before) < SWAP_AFTER + WORKERS
    # The bucket kept its level: what the old limit left (at most 40 - 32, fewer than the new
    # limit), not a fresh bucket of 10; each answer after the swap counts it down to 0.
    assert len(after) == A_LIMIT - len(before) < A_LOWERED
    assert sorted(o.remaining or 0 for o in after) == list(range(len(after)))
    assert not any(o.status == 429 for o in a if not o.sent_after_reload and o.limit == A_LIMIT)
    # B: refused from the first request sent after the reload; answered before it.
    assert all(o.status == 401 for o in b if o.sent_after_reload)
    assert any(o.status == 200 for o in b) and any(o.status == 401 for o in b)
    # Charged once: the ledger counts exactly the answered requests and upstream's tokens.
    charged = await ledger(gateway)
    for name, key_name in (("A", "billing"), ("B", "reports")):
        answered = [o for o in outcomes if o.key == name and o.status == 200]
        assert charged[key_name] == (len(answered), sum(o.tokens for o in answered))

    # A minute on, A's bucket refills to its new limit, not its old one.
    clock.advance(60)
    statuses = [(await chat(gateway, KEY_A))[0] for _ in range(A_LOWERED + 1)]
    assert statuses == [200] * A_LOWERED + [429]
    assert reloads(gateway, "ok") == 1


async def test_an_invalid_file_changes_nothing(
    make_gateway: GatewayFactory, simulator_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(config_text(simulator_url, a_per_minute=2))
    gateway = await make_gateway(config=load_config(str(path)), clock=FakeClock())
    running = gateway.app[TENANCY].current
    assert (await chat(gateway, KEY_A))[0] == 200

    # A bad value, beside a change that would be valid alone (B removed).
    bad = config_text(simulator_url, a_per_minute=A_LOWERED, with_b=False)
    path.write_text(bad.replace(f"per_minute: {A_LOWERED}", "per_minute: lots"))
    assert not reload_config(gateway.app)

    assert gateway.app[TENANCY].current is running
    assert (reloads(gateway, "invalid"), reloads(gateway, "ok")) == (1, 0)
    assert (await chat(gateway, KEY_B))[0] == 200  # B is still a key
    statuses = [(await chat(gateway, KEY_A))[0] for _ in range(2)]
    assert statuses == [200, 429]  # A is still held to 2, with one already used


async def test_a_reload_names_what_only_a_restart_applies(
    make_gateway: GatewayFactory, simulator_url: str, tmp_path: Path
) -> None:
    """upstream.rate_limits and the upstream keys are the tenancy's; the rest of upstream and
    the other start-up sections are reported, reload after reload, until a restart."""
    path = tmp_path / "gateway.yaml"
    text = config_text(simulator_url, a_per_minute=5)
    path.write_text(text)
    gateway = await make_gateway(config=load_config(str(path)), clock=FakeClock())
    assert gateway.app[TENANCY].current.upstream_limits.bucket_for("ag_support") is None

    changed = text.replace("  timeouts: {connect: 2,", "  timeouts: {connect: 3,")
    changed = changed.replace("  timeouts:", "  rate_limits: {per_minute: 100}\n  timeouts:", 1)
    path.write_text(changed + "limits: {max_body_bytes: 1024}\nstreams: {heartbeat: 5}\n")
    for _ in range(2):
        with capture_logs() as logs:
            assert reload_config(gateway.app)
        [line] = [entry for entry in logs if entry["event"] == "config reloaded"]
        assert line["restart_needed_for"] == ["upstream", "limits", "streams"]

    # upstream.rate_limits is in force; upstream.timeouts is still the start-up one.
    assert gateway.app[TENANCY].current.upstream_limits.bucket_for("ag_support") is not None
    assert gateway.app[UPSTREAM].timeouts.connect == 2


async def test_a_request_in_flight_finishes_when_its_tenant_is_removed(
    make_gateway: GatewayFactory,
    simulator: TestClient[Any, Any],
    simulator_url: str,
    tmp_path: Path,
) -> None:
    """An unlimited tenant's request reserves nothing; its settlement still finds its way
    (and its ledger row) after a reload has removed the tenant."""
    path = tmp_path / "gateway.yaml"
    acme = config_text(simulator_url, a_per_minute=5, with_b=False)
    globex = f"{{name: web, sha256: {hash_key(GLOBEX_KEY)}}}"
    path.write_text(acme + f'  globex:\n    agents: ["*"]\n    keys: [{globex}]\n')
    gateway = await make_gateway(config=load_config(str(path)), clock=FakeClock())
    await simulator.post("/_sim/faults", json={"kind": "hold_answer", "times": 1})
    pending = asyncio.create_task(chat(gateway, GLOBEX_KEY))
    response = await simulator.get("/_sim/held", params={"at_least": 1, "timeout": 10})
    assert (await response.json())["held"] == 1

    path.write_text(acme)  # globex is gone
    assert reload_config(gateway.app)
    assert (await chat(gateway, GLOBEX_KEY))[0] == 401

    await simulator.post("/_sim/release")
    status, body, _ = await pending
    assert status == 200
    usage = usage_from(body)
    assert usage is not None
    assert (await ledger(gateway))["web"] == (1, usage.total)


async def test_every_reload_logs_by_name_what_it_added_removed_and_changed(
    make_gateway: GatewayFactory, simulator_url: str, tmp_path: Path
) -> None:
    """An audit line: tenants and `tenant/key`s added, removed or changed, never a hash."""
    path = tmp_path / "gateway.yaml"
    text = config_text(simulator_url, a_per_minute=5)
    path.write_text(text)
    gateway = await make_gateway(config=load_config(str(path)), clock=FakeClock())
    rotated = "gw_test_acme_reports_rotated_0004"
    changed = (
        config_text(simulator_url, a_per_minute=7, with_b=False)
        + f"      - {{name: reports, sha256: {hash_key(rotated)}}}\n"
        + "  initech:\n    agents: [ag_support]\n"
        + f"    keys: [{{name: crm, sha256: {hash_key('gw_test_initech_crm_0005')}}}]\n"
    )
    path.write_text(changed)
    with capture_logs() as logs:
        assert reload_config(gateway.app)
    [line] = [entry for entry in logs if entry["event"] == "config reloaded"]
    assert {
        field: line.get(field) for field in line if field.endswith(("added", "removed", "changed"))
    } == {
        "tenants_added": ["initech"],
        "keys_added": ["initech/crm"],
        "keys_changed": ["acme/billing", "acme/reports"],  # new limits; a rotated hash
    }
    assert not any(hash_key(k) in str(line) for k in (rotated, KEY_A, KEY_B))

    path.write_text(config_text(simulator_url, a_per_minute=7, with_b=False))
    with capture_logs() as logs:
        assert reload_config(gateway.app)
    [line] = [entry for entry in logs if entry["event"] == "config reloaded"]
    assert line["tenants_removed"] == ["initech"]
    assert line["keys_removed"] == ["acme/reports", "initech/crm"]
    assert "keys_changed" not in line and "tenants_added" not in line
