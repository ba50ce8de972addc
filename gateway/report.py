"""Usage reports: the ledger's daily rows over a range of days, summed by the columns asked
for, as a table for people or CSV and JSON for programs.

    Query.parse(from, to, by, today) ── validated; default: this month so far
    summarise(ledger rows, query) ───── Report: one row per group, sorted by the --by columns
    render(report, format) ──────────── table | csv | json
    read(config, query) ─────────────── the CLI's way in: open the backend, read, close

`thinnest-gateway usage` and the admin port's `GET /usage` go through the same Query, Report
and renderers, so they print the same rows. A column the report is not split by reads `*`
(never a tenant, key or agent name), and `day` then reads as the range, `FROM..TO`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

from multidict import MultiMapping

from gateway.config import Config
from gateway.quota import Owners, UsageRow, open_quota
from gateway.quota.service import BACKEND_ERRORS

DIMENSIONS = ("tenant", "key", "agent", "day")
"""What rows can be split by; all four (the ledger as it is kept) by default."""
COUNTS = ("requests", "tokens_input", "tokens_output", "tokens_total", "tokens_estimated")
COLUMNS = ("day", "tenant", "key", "agent", *COUNTS)
ANY = "*"
"""The value of a column the report is not split by."""
RANGE = ".."
FORMATS = ("table", "csv", "json")
HTTP_FORMATS = ("json", "csv")
CONTENT_TYPES = {"json": "application/json", "csv": "text/csv"}
PARAMETERS = ("from", "to", "by", "format")
REPORT_TIMEOUT_MS = 5000
"""Each Redis command of a report may take this long: a report is not the request path."""
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_SHOWN = 40  # characters of a bad value quoted back in an error


class ReportError(ValueError):
    """A parameter of a report is not usable; `param` is its name (from, to, by, format)."""

    def __init__(self, param: str, problem: str) -> None:
        super().__init__(f"{param}: {problem}")
        self.param = param
        self.problem = problem


class LedgerUnreadable(Exception):
    """The ledger cannot be read from here (the memory backend, or Redis not answering). The
    message quotes no part of a Redis URL: it may carry a password."""


@dataclass(frozen=True, slots=True)
class Query:
    """Days `first`..`last` (inclusive, in quota.timezone), summed per `by` group."""

    first: date
    last: date
    by: tuple[str, ...] = DIMENSIONS

    def __post_init__(self) -> None:
        if self.first > self.last:
            raise ReportError("from", f"{self.first} is after to ({self.last})")
        if not self.by:
            raise ReportError("by", f"name at least one of {', '.join(DIMENSIONS)}")
        for i, name in enumerate(self.by):
            if name not in DIMENSIONS:
                raise ReportError(
                    "by", f"unknown column {_shown(name)}; use any of {', '.join(DIMENSIONS)}"
                )
            if name in self.by[:i]:
                raise ReportError("by", f"{name!r} is named twice")

    @classmethod
    def parse(cls, first: str | None, last: str | None, by: str | None, *, today: date) -> Query:
        """From the CLI's or the URL's text. `to` defaults to `today`, `from` to the 1st of
        `to`'s month, `by` to all four columns."""
        end = _day("to", last) if last is not None else today
        start = _day("from", first) if first is not None else end.replace(day=1)
        columns = DIMENSIONS if by is None else tuple(name.strip() for name in by.split(","))
        return cls(start, end, columns)

    @property
    def range(self) -> str:
        return f"{self.first.isoformat()}{RANGE}{self.last.isoformat()}"


@dataclass(frozen=True, slots=True)
class Report:
    query: Query
    rows: tuple[UsageRow, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "from": self.query.first.isoformat(),
            "to": self.query.last.isoformat(),
            "rows": [{column: getattr(row, column) for column in COLUMNS} for row in self.rows],
        }


def today(zone: str, wall: float) -> date:
    """The date at epoch second `wall` in `zone` (quota.timezone): where ledger days begin."""
    return datetime.fromtimestamp(wall, ZoneInfo(zone)).date()


def params_query(params: MultiMapping[str], *, today: date) -> tuple[Query, str]:
    """A query and a format (json, the default, or csv) from `GET /usage`'s parameters."""
    for name in params:
        if name not in PARAMETERS:
            raise ReportError(name, f"unknown parameter; use {', '.join(PARAMETERS)}")
        if len(params.getall(name)) > 1:
            raise ReportError(name, "given more than once")
    fmt = params.get("format", "json")
    if fmt not in HTTP_FORMATS:
        raise ReportError("format", f"{_shown(fmt)}: use {' or '.join(HTTP_FORMATS)}")
    query = Query.parse(params.get("from"), params.get("to"), params.get("by"), today=today)
    return query, fmt


def summarise(rows: Iterable[UsageRow], query: Query) -> Report:
    """Rows of the query's days summed per group of its `by` columns, sorted by them in the
    order given."""
    first, last = query.first.isoformat(), query.last.isoformat()
    split = {name: name in query.by for name in DIMENSIONS}
    sums: dict[tuple[str, str, str, str], list[int]] = {}
    for row in rows:
        if not first <= row.day <= last:
            continue
        group = (
            row.day if split["day"] else query.range,
            row.tenant if split["tenant"] else ANY,
            row.key if split["key"] else ANY,
            row.agent if split["agent"] else ANY,
        )
        counts = sums.setdefault(group, [0] * len(COUNTS))
        for i, name in enumerate(COUNTS):
            counts[i] += getattr(row, name)
    summed = [UsageRow(*group, *counts) for group, counts in sums.items()]
    summed.sort(key=lambda row: tuple(getattr(row, name) for name in query.by))
    return Report(query, tuple(summed))


def render(report: Report, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report.to_json(), indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows([getattr(row, column) for column in COLUMNS] for row in report.rows)
        return out.getvalue()
    if fmt == "table":
        return _table(report)
    raise ReportError("format", f"{_shown(fmt)}: use {', '.join(FORMATS)}")


def _table(report: Report) -> str:
    """For people: the range in a title, the --by columns in their order, then the counts
    (thousands separated, right-aligned) and a total."""
    query = report.query
    title = f"usage {query.range} by {', '.join(query.by)}"
    if not report.rows:
        return f"{title}: nothing recorded\n"
    header = [*query.by, *COUNTS]
    lines = [[*(getattr(row, name) for name in query.by), *_counts(row)] for row in report.rows]
    total = [0] * len(COUNTS)
    for row in report.rows:
        for i, name in enumerate(COUNTS):
            total[i] += getattr(row, name)
    footer = ["total", *([""] * (len(query.by) - 1)), *(f"{n:,}" for n in total)]
    widths = [max(len(cells[i]) for cells in (header, *lines, footer)) for i in range(len(header))]
    texts = len(query.by)

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i < texts else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([title, "", line(header), *map(line, lines), rule, line(footer)]) + "\n"


def _counts(row: UsageRow) -> list[str]:
    return [f"{getattr(row, name):,}" for name in COUNTS]


def check_readable(config: Config) -> None:
    """LedgerUnreadable unless the ledger lives outside the serving process (Redis)."""
    if config.quota.backend == "memory":
        admin = config.admin
        raise LedgerUnreadable(
            "quota.backend is memory: the usage ledger lives inside the serving process, so "
            "nothing outside it can read it. Ask the running gateway on its admin port: "
            f"curl 'http://{admin.host}:{admin.port}/usage?format=csv'"
        )


async def read(config: Config, query: Query) -> Report:
    """The report from the backend `config` names, opened for this one read and closed."""
    check_readable(config)
    quota = config.quota
    # Redis or nothing: a report must not quietly read the empty in-process fallback.
    reader = dataclasses.replace(
        quota, timeout_ms=max(quota.timeout_ms, REPORT_TIMEOUT_MS), on_backend_error="closed"
    )
    try:
        # lease_ttl: a report holds no stream leases; the service requires one all the same.
        async with open_quota(reader, Owners(config.tenants), lease_ttl=30.0) as service:
            rows = await service.ledger(query.first.isoformat(), query.last.isoformat())
    except BACKEND_ERRORS as exc:
        # The error's type only: its text may name the server.
        raise LedgerUnreadable(
            f"cannot read the usage ledger from Redis (quota.redis_url): {type(exc).__name__}"
        ) from None
    return summarise(rows, query)


def _day(param: str, text: str) -> date:
    if not _DAY.fullmatch(text):
        raise ReportError(param, f"expected a date as YYYY-MM-DD, got {_shown(text)}")
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ReportError(param, f"{text} is not a date") from None


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "…")
