"""Calendar periods in `quota.timezone`: where budgets' days and months begin, and ledger days.

A budget's period is an index (the local date's ordinal for a day, year * 12 + month for a
month), so a stored budget knows which period it counts and rolls forward by index, however
long the gateway was away. Boundaries are local midnights computed by `zoneinfo`, so a day
across a DST change is 23 or 25 hours long and still ends at midnight.

The wall clock is injected; the current day's boundaries are computed once per day, so a
request pays for two subtractions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

Period = Literal["day", "month"]


@dataclass(frozen=True, slots=True)
class Moment:
    """One instant, as the budgets and the ledger see it."""

    day: int  # the local date's ordinal
    month: int  # year * 12 + month - 1
    day_ends_in: float  # seconds to the next local midnight
    month_ends_in: float  # seconds to the next 1st, 00:00 local
    date: str  # the local date, ISO (the ledger's day)
    wall: float
    calendar: Calendar

    def index(self, period: Period) -> int:
        return self.day if period == "day" else self.month

    def until(self, period: Period, periods: int = 1) -> float:
        """Seconds until the start of the `periods`-th period after this one's."""
        if periods <= 1:
            return self.day_ends_in if period == "day" else self.month_ends_in
        return self.calendar.starts(period, self.index(period) + periods) - self.wall


@dataclass(frozen=True, slots=True)
class _Today:
    day: int
    month: int
    date: str
    starts: float  # epoch seconds of this local midnight
    day_ends: float
    month_ends: float


class Calendar:
    def __init__(self, zone: str, wall_clock: Callable[[], float]) -> None:
        self._zone = ZoneInfo(zone)
        self._wall_clock = wall_clock
        self._today: _Today | None = None

    @property
    def zone(self) -> str:
        return self._zone.key

    def now(self) -> Moment:
        wall = self._wall_clock()
        today = self._today
        if today is None or not today.starts <= wall < today.day_ends:
            today = self._today = self._compute(wall)
        return Moment(
            today.day,
            today.month,
            today.day_ends - wall,
            today.month_ends - wall,
            today.date,
            wall,
            self,
        )

    def starts(self, period: Period, index: int) -> float:
        """Epoch seconds at which period `index` begins (local midnight)."""
        day = date.fromordinal(index) if period == "day" else date(index // 12, index % 12 + 1, 1)
        return self._midnight(day)

    def local_date(self, wall: float) -> date:
        return datetime.fromtimestamp(wall, self._zone).date()

    def _compute(self, wall: float) -> _Today:
        day = self.local_date(wall)
        month = day.year * 12 + day.month - 1
        return _Today(
            day=day.toordinal(),
            month=month,
            date=day.isoformat(),
            starts=self._midnight(day),
            day_ends=self._midnight(day + timedelta(days=1)),
            month_ends=self.starts("month", month + 1),
        )

    def _midnight(self, day: date) -> float:
        return datetime.combine(day, time(0), tzinfo=self._zone).timestamp()
