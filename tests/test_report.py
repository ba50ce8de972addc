"""Usage reports: the ledger summed per tenant, key, agent and day, the same from the CLI and
from the admin port, and equal to what upstream answered."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

import pytest
from multidict import MultiDict

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
