"""Usage reports: the ledger summed per tenant, key, agent and day, the same from the CLI and
from the admin port, and equal to what upstream answered."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import MultiDict

from gateway.__main__ import main
from gateway.app import create_admin_app
from gateway.auth import hash_key
from gateway.quota import UsageRow
from gateway.report import (
    ANY,
    COLUMNS,
    Query,
    ReportError,
    params_query,
    render,
    summarise,
    today,
)
from tests.conftest import (
    ACME,
    ACME_KEY,
    ACME_REPORTS_KEY,
    GLOBEX,
    GLOBEX_KEY,
    PLATFORM_KEY,
    SUPPORT_KEY,
    AiohttpClient,
    GatewayFactory,
    gateway_yaml,
)
from tests.processes import Process, serving, start, stop, wait_healthy
from tests.redis_servers import RedisServer, free_port
from tests.secret_watch import SecretWatch

NOV_28 = date(2026, 11, 28)
ROWS = [
    UsageRow("2026-11-02", "acme", "billing-service", "ag_support", 3, 30, 60, 90, 0),
    UsageRow("2026-11-02", "acme", "billing-service", "ag_sales", 1, 10, 20, 30, 0),
    UsageRow("2026-11-03", "acme", "billing-service", "ag_support", 2, 20, 40, 65, 5),
    UsageRow("2026-11-03", "acme", "reports-service", "ag_support", 1, 5, 5, 10, 0),
    UsageRow("2026-11-02", "globex", "web-frontend", "ag_sales", 4, 40, 80, 120, 0),
    UsageRow("2026-10-31", "acme", "billing-service", "ag_support", 9, 9, 9, 18, 0),
]


def query(by: str | None = None, first: str | None = None, last: str | None = None) -> Query:
    return Query.parse(first, last, by, today=NOV_28)


# --- the range and the columns -----------------------------------------------------------


def test_the_default_range_is_this_month_so_far_and_the_default_split_is_all_four() -> None:
    default = query()
    assert (default.first, default.last) == (date(2026, 11, 1), NOV_28)
    assert default.by == ("tenant", "key", "agent", "day")


def test_to_alone_reports_its_month_up_to_it_and_from_alone_reports_up_to_today() -> None:
    assert query(last="2026-10-15").first == date(2026, 10, 1)
    assert query(first="2026-09-20").last == NOV_28


def test_today_is_the_date_in_quota_timezone() -> None:
    # 2026-11-28T23:30Z: already the 29th in Berlin, still the 28th in UTC and New York.
    wall = datetime(2026, 11, 28, 23, 30, tzinfo=UTC).timestamp()
    assert today("UTC", wall) == NOV_28
    assert today("Europe/Berlin", wall) == date(2026, 11, 29)
    assert today("America/New_York", wall) == NOV_28


@pytest.mark.parametrize(
    ("first", "last", "by", "message"),
    [
        ("2026-11-1", None, None, "from: expected a date as YYYY-MM-DD, got '2026-11-1'"),
        ("20261101", None, None, "from: expected a date as YYYY-MM-DD, got '20261101'"),
        (None, "2026-02-30", None, "to: 2026-02-30 is not a date"),
        ("2026-11-29", None, None, "from: 2026-11-29 is after to (2026-11-28)"),
        (None, None, "tenant,team", "by: unknown column 'team'; use any of tenant, key, agent"),
        (None, None, "tenant,,key", "by: unknown column ''"),
        (None, None, "key,tenant,key", "by: 'key' is named twice"),
        (None, None, "x" * 100, "by: unknown column '" + "x" * 40 + "…'"),
    ],
)
def test_bad_parameters_are_refused_naming_the_parameter(
    first: str | None, last: str | None, by: str | None, message: str
) -> None:
    with pytest.raises(ReportError) as refused:
        query(by, first, last)
    assert str(refused.value).startswith(message)


def test_spaces_around_column_names_are_ignored() -> None:
    assert query(" day , tenant ").by == ("day", "tenant")


# --- summing -----------------------------------------------------------------------------


def test_rows_are_summed_per_group_and_the_day_reads_as_the_range() -> None:
    report = summarise(ROWS, query("tenant,key"))
    assert report.rows == (
        UsageRow("2026-11-01..2026-11-28", "acme", "billing-service", ANY, 6, 60, 120, 185, 5),
        UsageRow("2026-11-01..2026-11-28", "acme", "reports-service", ANY, 1, 5, 5, 10, 0),
        UsageRow("2026-11-01..2026-11-28", "globex", "web-frontend", ANY, 4, 40, 80, 120, 0),
    )


def test_rows_are_sorted_by_the_columns_in_the_order_given() -> None:
    by_day = summarise(ROWS, query("day,tenant"))
    assert [(row.day, row.tenant) for row in by_day.rows] == [
        ("2026-11-02", "acme"),
        ("2026-11-02", "globex"),
        ("2026-11-03", "acme"),
    ]
    by_agent = summarise(ROWS, query("agent,day"))
    assert [(row.agent, row.day, row.tokens_total) for row in by_agent.rows] == [
        ("ag_sales", "2026-11-02", 150),
        ("ag_support", "2026-11-02", 90),
        ("ag_support", "2026-11-03", 75),
    ]


def test_by_default_the_rows_are_the_ledgers_own_and_days_outside_the_range_are_left_out() -> None:
    assert summarise(ROWS, query()).rows == (ROWS[1], ROWS[0], ROWS[2], ROWS[3], ROWS[4])
    assert summarise(ROWS, query("tenant", "2026-12-01", "2026-12-31")).rows == ()


# --- renderings --------------------------------------------------------------------------


def test_csv_has_a_header_and_every_column_of_every_row() -> None:
    text = render(summarise(ROWS, query("tenant")), "csv")
    assert text.splitlines() == [
        "day,tenant,key,agent,requests,tokens_input,tokens_output,tokens_total,tokens_estimated",
        "2026-11-01..2026-11-28,acme,*,*,7,65,125,195,5",
        "2026-11-01..2026-11-28,globex,*,*,4,40,80,120,0",
    ]


def test_json_is_from_to_and_rows_with_every_column() -> None:
    body = json.loads(render(summarise(ROWS, query("agent", "2026-11-03")), "json"))
    assert body == {
        "from": "2026-11-03",
        "to": "2026-11-28",
        "rows": [
            {
                "day": "2026-11-03..2026-11-28",
                "tenant": "*",
                "key": "*",
                "agent": "ag_support",
                "requests": 3,
                "tokens_input": 25,
                "tokens_output": 45,
                "tokens_total": 75,
                "tokens_estimated": 5,
            }
        ],
    }
    assert list(body["rows"][0]) == list(COLUMNS)


def test_the_table_shows_the_range_the_split_columns_aligned_counts_and_a_total() -> None:
    assert render(summarise(ROWS, query("tenant,key")), "table").splitlines() == [
        "usage 2026-11-01..2026-11-28 by tenant, key",
        "",
        "tenant  key              requests  tokens_input  tokens_output  tokens_total"
        "  tokens_estimated",
        "acme    billing-service         6            60            120           185"
        "                 5",
        "acme    reports-service         1             5              5            10"
        "                 0",
        "globex  web-frontend            4            40             80           120"
        "                 0",
        "------  ---------------  --------  ------------  -------------  ------------"
        "  ----------------",
        "total                          11           105            205           315"
        "                 5",
    ]
    assert render(summarise([], query("tenant")), "table") == (
        "usage 2026-11-01..2026-11-28 by tenant: nothing recorded\n"
    )


def test_large_counts_are_grouped_by_thousands_in_the_table_only() -> None:
    rows = [UsageRow("2026-11-02", "acme", "k", "a", 1, 0, 0, 12_345_678, 0)]
    report = summarise(rows, query("tenant"))
    assert "12,345,678" in render(report, "table")
    assert "12345678" in render(report, "csv") and "12345678" in render(report, "json")


# --- GET /usage's parameters -------------------------------------------------------------


def test_url_parameters_read_like_the_cli_with_json_by_default() -> None:
    parsed, fmt = params_query(MultiDict(by="tenant,key", to="2026-10-31"), today=NOV_28)
    assert (parsed, fmt) == (
        Query(date(2026, 10, 1), date(2026, 10, 31), ("tenant", "key")),
        "json",
    )
    assert params_query(MultiDict(format="csv"), today=NOV_28)[1] == "csv"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (MultiDict(form="2026-11-01"), "form: unknown parameter; use from, to, by, format"),
        (MultiDict([("by", "tenant"), ("by", "key")]), "by: given more than once"),
        (MultiDict(format="table"), "format: 'table': use json or csv"),
        (MultiDict({"from": "yesterday"}), "from: expected a date as YYYY-MM-DD"),
    ],
)
def test_bad_url_parameters_are_refused(params: MultiDict[str], message: str) -> None:
    with pytest.raises(ReportError) as refused:
        params_query(params, today=NOV_28)
    assert str(refused.value).startswith(message)


# --- the admin port, in process (memory backend) -----------------------------------------

Client = TestClient[web.Request, web.Application]


async def admin_of(aiohttp_client: AiohttpClient, gateway: Client) -> Client:
    return await aiohttp_client(create_admin_app(gateway.app))


async def test_get_usage_reports_what_the_gateway_settled_in_this_process(
    gateway: Client, aiohttp_client: AiohttpClient
) -> None:
    admin = await admin_of(aiohttp_client, gateway)
    answered: Counter[tuple[str, str]] = Counter()
    for headers, agent, tenant in [
        (ACME, "ag_support", "acme"),
        (ACME, "ag_support", "acme"),
        (GLOBEX, "ag_sales", "globex"),
    ]:
        response = await gateway.post(
            f"/v1/agents/{agent}/chat", json={"message": "What are your hours?"}, headers=headers
        )
        answered[(tenant, agent)] += (await response.json())["usage"]["total_tokens"]

    response = await admin.get("/usage", params={"by": "tenant,agent"})
    assert response.status == 200
    assert response.content_type == "application/json"
    body = await response.json()
    assert {(r["tenant"], r["agent"]): r["tokens_total"] for r in body["rows"]} == answered
    assert [r["requests"] for r in body["rows"]] == [2, 1]

    response = await admin.get("/usage", params={"by": "tenant", "format": "csv"})
    assert response.content_type == "text/csv"
    rows = list(csv.DictReader(io.StringIO(await response.text())))
    assert [(r["tenant"], int(r["tokens_total"])) for r in rows] == [
        ("acme", answered[("acme", "ag_support")]),
        ("globex", answered[("globex", "ag_sales")]),
    ]


async def test_get_usage_refuses_a_bad_query_with_400_in_the_error_shape(
    gateway: Client, aiohttp_client: AiohttpClient
) -> None:
    admin = await admin_of(aiohttp_client, gateway)
    response = await admin.get("/usage", params={"from": "2026-11-30", "to": "2026-11-01"})
    assert response.status == 400
    assert response.headers["X-Request-ID"]
    assert await response.json() == {
        "error": {"code": "invalid_request", "message": "from: 2026-11-30 is after to (2026-11-01)"}
    }


async def test_get_usage_is_503_while_redis_does_not_answer(
    make_gateway: GatewayFactory, aiohttp_client: AiohttpClient
) -> None:
    dead = f"redis://:hunter2secret@127.0.0.1:{free_port()}/0"
    gateway = await make_gateway(f"quota: {{backend: redis, redis_url: '{dead}'}}\n")
    admin = await admin_of(aiohttp_client, gateway)
    response = await admin.get("/usage")
    assert response.status == 503
    assert (await response.json())["error"]["code"] == "unavailable"


# --- the CLI, in process -----------------------------------------------------------------


def write_config(tmp_path: Path, quota: str) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(
        gateway_yaml("http://127.0.0.1:9") + "admin: {host: 127.0.0.1, port: 9191}\n" + quota
    )
    return path


def test_the_cli_on_the_memory_backend_points_to_the_admin_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "quota: {backend: memory}\n")
    assert main(["usage", "--config", str(config)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "quota.backend is memory" in captured.err
    assert "http://127.0.0.1:9191/usage" in captured.err


def test_the_cli_refuses_bad_parameters_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "quota: {backend: memory}\n")
    assert main(["usage", "--config", str(config), "--from", "2026-11-31"]) == 2
    assert "thinnest-gateway usage: --from: 2026-11-31 is not a date" in capsys.readouterr().err
    assert main(["usage", "--config", str(config), "--by", "tenant,day,team"]) == 2
    assert "--by: unknown column 'team'" in capsys.readouterr().err


async def usage_cli(config: Path, *args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """`thinnest-gateway usage --config CONFIG ARGS` as an operator runs it: its exit status,
    stdout and stderr. (In a process of its own: it configures logging, process-wide.)"""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "usage",
        "--config",
        str(config),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_cli_says_redis_did_not_answer_without_quoting_its_url(tmp_path: Path) -> None:
    url = f"redis://:hunter2secret@127.0.0.1:{free_port()}/0"
    config = write_config(tmp_path, f"quota: {{backend: redis, redis_url: '{url}'}}\n")
    status, out, err = await usage_cli(config, env=dict(os.environ))
    assert (status, out) == (1, "")
    assert "cannot read the usage ledger from Redis (quota.redis_url): ConnectionError" in err
    assert "hunter2secret" not in err and "127.0.0.1" not in err


# --- real processes on their own redis-server --------------------------------------------

SIMULATOR_YAML = f"""
agents:
  ag_support: {{name: Support, keys: [{SUPPORT_KEY}], usage_format: usage}}
  ag_sales: {{name: Sales, usage_format: usage}}
platform_keys: [{PLATFORM_KEY}]
rate_limit: {{per_minute: 100000, per_day: 1000000}}
chunk_interval: 0.02
"""

# Two tenants, three keys (services), two agents; session ids go upstream per key
# (`gw:<tenant>/<key>:<id>`), so upstream's record tells whose each request was.
CALLERS = [
    ("acme", "billing-service", ACME_KEY, ("ag_support", "ag_sales")),
    ("acme", "reports-service", ACME_REPORTS_KEY, ("ag_support",)),
    ("globex", "web-frontend", GLOBEX_KEY, ("ag_support", "ag_sales")),
]


def gateway_config(simulator: str, redis_url: str, port: int, admin: int) -> str:
    return f"""
upstream:
  base_url: {simulator}
  api_key: ${{TEST_PLATFORM_KEY}}
  timeouts: {{connect: 2, first_byte: 5, idle: 5, total: 30}}
agents:
  ag_support: {{api_key: "${{TEST_SUPPORT_KEY}}"}}
  ag_sales: {{}}
tenants:
  acme:
    keys:
      - {{name: billing-service, sha256: {hash_key(ACME_KEY)}}}
      - {{name: reports-service, sha256: {hash_key(ACME_REPORTS_KEY)}}}
    agents: [ag_support, ag_sales]
    session_isolation: key
  globex:
    keys: [{{name: web-frontend, sha256: {hash_key(GLOBEX_KEY)}}}]
    agents: ["*"]
    session_isolation: key
# A budget no busy machine overruns: a request settled on the local fallback would be in
# that process's memory, not in the Redis ledger.
quota: {{backend: redis, redis_url: "{redis_url}", timeout_ms: 2000, on_backend_error: closed,
        timezone: Europe/Berlin}}
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}}}
logging: {{level: warning}}
shutdown_grace: 5
"""


@dataclass
class Stack:
    """A simulator, a `serve` process (replaceable: `restart`) and a redis-server."""

    tmp_path: Path
    env: dict[str, str]
    config: Path
    url: str
    admin: str
    simulator: str
    gateway: asyncio.subprocess.Process
    starts: int = 1

    async def restart(self) -> None:
        assert await stop(self.gateway) == 0
        self.starts += 1
        log = self.tmp_path / f"gateway{self.starts}.log"
        self.gateway = await start("serve", "--config", str(self.config), env=self.env, log=log)
        await wait_healthy(f"{self.admin}/readyz", self.gateway, log)

    async def cli(self, *args: str) -> str:
        """`thinnest-gateway usage` on this stack's configuration: what it prints."""
        status, out, err = await usage_cli(self.config, *args, env=self.env)
        assert status == 0, err
        return out


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    env = {**os.environ, "TEST_PLATFORM_KEY": PLATFORM_KEY, "TEST_SUPPORT_KEY": SUPPORT_KEY}
    with RedisServer(tmp_path / "redis") as redis:
        (tmp_path / "simulator.yaml").write_text(SIMULATOR_YAML)
        sim_log, log = tmp_path / "simulator.log", tmp_path / "gateway1.log"

        async def simulate(ports: list[int]) -> Process:
            args = ["--port", str(ports[0]), "--config", str(tmp_path / "simulator.yaml")]
            return await start("simulate", *args, env=env, log=sim_log)

        simulator, (sim_port,) = await serving(
            simulate,
            ports=1,
            ready=lambda ports: f"http://127.0.0.1:{ports[0]}/healthz",
            log=sim_log,
        )
        config = tmp_path / "gw.yaml"
        sim_url = f"http://127.0.0.1:{sim_port}"

        async def serve(ports: list[int]) -> Process:
            config.write_text(gateway_config(sim_url, redis.url, *ports))
            return await start("serve", "--config", str(config), env=env, log=log)

        running: Stack | None = None
        try:
            gateway, (port, admin) = await serving(
                serve, ports=2, ready=lambda ports: f"http://127.0.0.1:{ports[1]}/readyz", log=log
            )
            running = Stack(
                tmp_path,
                env,
                config,
                f"http://127.0.0.1:{port}",
                f"http://127.0.0.1:{admin}",
                sim_url,
                gateway,
            )
            yield running
            assert await stop(running.gateway) == 0
        finally:
            for process in (simulator, running.gateway if running else None):
                if process is not None and process.returncode is None:
                    process.kill()
                    await process.wait()


def days_around_today() -> tuple[str, str]:
    """A range holding today in any time zone (the ledger's day is Berlin's)."""
    now = datetime.now(UTC).date()
    return (now - timedelta(days=1)).isoformat(), (now + timedelta(days=1)).isoformat()


async def chat_json(
    session: aiohttp.ClientSession, url: str, key: str, agent: str, message: str
) -> None:
    async with session.post(
        f"{url}/v1/agents/{agent}/chat",
        json={"message": message, "session_id": "conversation"},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        assert response.status == 200, await response.text()
        await response.read()


async def chat_stream(
    session: aiohttp.ClientSession, url: str, key: str, agent: str, message: str, *, leave: bool
) -> None:
    """A stream read to its end, or (`leave`) left after its first event."""
    async with session.post(
        f"{url}/v1/agents/{agent}/chat",
        json={"message": message, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        assert response.status == 200, await response.text()
        if leave:
            await response.content.readuntil(b"\n\n")
            response.close()
        else:
            await response.read()


async def admin_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def settled(session: aiohttp.ClientSession, admin: str, requests: int) -> None:
    """Until the ledger counts `requests` settled requests: abandoned streams settle when
    their drains have read them to the end, after their callers have gone."""
    for _ in range(400):
        body = await admin_json(session, f"{admin}/usage?by=tenant")
        counted = sum(row["requests"] for row in body["rows"])
        if counted == requests:
            return
        assert counted < requests, body
        await asyncio.sleep(0.05)  # drains finish at upstream's pace: the ledger is the event
    pytest.fail(f"the ledger counts {counted} requests, upstream answered {requests}")


def upstream_bill(recorded: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[int]]:
    """What upstream answered, per (tenant, key, agent): requests, input, output and total
    tokens, each request's owner read from its session id's namespace."""
    bill: dict[tuple[str, str, str], list[int]] = {}
    for entry in recorded:
        usage = entry["usage"]
        assert usage is not None, entry["path"]
        session_id = json.loads(entry["body"])["session_id"]
        owner = session_id.removeprefix("gw:").split(":")[0]
        tenant, key = owner.split("/")
        agent = entry["path"].split("/")[3]
        counts = bill.setdefault((tenant, key, agent), [0, 0, 0, 0])
        for i, amount in enumerate(
            (1, usage["input_tokens"], usage["output_tokens"], usage["total_tokens"])
        ):
            counts[i] += amount
    return bill


@pytest.mark.timeout(90)
async def test_the_ledger_equals_what_upstream_answered_and_survives_a_restart(
    stack: Stack, secret_watch: SecretWatch
) -> None:
    first, last = days_around_today()
    async with aiohttp.ClientSession(response_class=secret_watch.response_class()) as session:
        calls = []
        for tenant, key_name, key, agents in CALLERS:
            for agent in agents:
                words = f"{tenant} {key_name} asks {agent} something"
                for turn in range(2):  # one conversation: the second turn costs more
                    calls.append(chat_json(session, stack.url, key, agent, f"{words} {turn}"))
                calls.append(chat_stream(session, stack.url, key, agent, words, leave=False))
                for n in range(2):
                    text = f"{words} at length {'and more ' * n}"
                    calls.append(chat_stream(session, stack.url, key, agent, text, leave=True))
        await asyncio.gather(*calls)
        # Upstream's side (its record holds the upstream keys the gateway sent: not watched).
        async with (
            aiohttp.ClientSession() as upstream_side,
            upstream_side.get(f"{stack.simulator}/_sim/requests") as response,
        ):
            recorded = await response.json()
        assert len(recorded) == len(calls)
        await settled(session, stack.admin, len(recorded))
        async with session.get(f"{stack.admin}/metrics") as response:
            metrics = await response.text()

    # Callers did leave mid-stream, and their drains charged what upstream reported.
    left = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("gateway_client_disconnects_total{") and 'stage="streaming"' in line
    ]
    assert sum(left) >= 1, metrics

    report = json.loads(
        await stack.cli("--from", first, "--to", last, "--by", "tenant,key,agent", "--format=json")
    )
    ledger = {
        (row["tenant"], row["key"], row["agent"]): [
            row["requests"],
            row["tokens_input"],
            row["tokens_output"],
            row["tokens_total"],
        ]
        for row in report["rows"]
    }
    assert ledger == upstream_bill(recorded)
    assert {row["tokens_estimated"] for row in report["rows"]} == {0}

    # The ledger lives in Redis: the same with no gateway running, and after `serve` restarts.
    full = ("--from", first, "--to", last, "--format", "csv")
    before = await stack.cli(*full)
    assert await stop(stack.gateway) == 0
    assert await stack.cli(*full) == before
    await stack.restart()
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{stack.admin}/usage", params={"from": first, "to": last, "format": "csv"}
        ) as response,
    ):
        assert await response.text() == before


@pytest.mark.timeout(90)
async def test_the_cli_and_get_usage_agree_row_for_row_in_csv_and_json(
    stack: Stack, secret_watch: SecretWatch
) -> None:
    first, last = days_around_today()
    async with aiohttp.ClientSession(response_class=secret_watch.response_class()) as session:
        await asyncio.gather(
            *(
                chat_json(session, stack.url, key, agent, f"hello from {key_name}")
                for _, key_name, key, agents in CALLERS
                for agent in agents
            ),
            chat_stream(session, stack.url, GLOBEX_KEY, "ag_sales", "a story", leave=False),
        )
        served = {}
        for by in ("tenant,key,agent,day", "tenant,key"):
            for fmt in ("csv", "json"):
                params = {"from": first, "to": last, "by": by, "format": fmt}
                async with session.get(f"{stack.admin}/usage", params=params) as response:
                    assert response.status == 200
                    served[(by, fmt)] = await response.text()
    printed = await asyncio.gather(
        *(
            stack.cli("--from", first, "--to", last, "--by", by, "--format", fmt)
            for by, fmt in served
        )
    )
    assert dict(zip(served, printed, strict=True)) == served
    for by in ("tenant,key,agent,day", "tenant,key"):
        rows = json.loads(served[(by, "json")])["rows"]
        assert sum(row["requests"] for row in rows) == 6
        assert all(row["tokens_total"] > 0 for row in rows)
        table = list(csv.DictReader(io.StringIO(served[(by, "csv")])))
        assert [{k: str(v) for k, v in row.items()} for row in rows] == table
