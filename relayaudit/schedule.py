"""When the daemon sweeps next: fixed intervals or 5-field cron expressions, with jitter; pure."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from itertools import pairwise
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from relayaudit.errors import ConfigError

if TYPE_CHECKING:
    # Type-only: config.py imports parse_cron from here at import time, so a runtime import
    # of config would be circular.
    from relayaudit.config import ScheduleConfig

__all__ = ["CronSpec", "Schedule", "local_zone", "parse_cron"]

_MONTH_NAMES = {
    name: i + 1
    for i, name in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
    )
}
_DOW_NAMES = {name: i for i, name in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}

_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

# Longest month length per month; February is 29 because leap years make the 29th reachable.
_MONTH_DAYS = {
    1: 31,
    2: 29,
    3: 31,
    4: 30,
    5: 31,
    6: 30,
    7: 31,
    8: 31,
    9: 30,
    10: 31,
    11: 30,
    12: 31,
}

# How far next_after looks before giving up. Day steps (with whole non-matching months skipped),
# never minute steps. The worst real case is "Feb 29 that is also a given weekday" with the
# 2100 non-leap year in between, which recurs after up to ~40 years.
_SEARCH_YEARS = 50

# A DST shift moves wall-clock order and instant order apart by at most this much (real zones
# shift by 30 min to 2 h); used to bound the search window around a transition.
_DST_SLOP = timedelta(hours=3)


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: Mapping[str, int]


_FIELDS = (
    _Field("minute", 0, 59, {}),
    _Field("hour", 0, 23, {}),
    _Field("day-of-month", 1, 31, {}),
    _Field("month", 1, 12, _MONTH_NAMES),
    _Field("day-of-week", 0, 7, _DOW_NAMES),
)


@dataclass(frozen=True)
class CronSpec:
    """A parsed 5-field cron expression; day-of-week uses 0 = Sunday (7 is folded into 0).

    `dom_star` / `dow_star` follow Vixie cron: a field that *starts* with `*` (including `*/2`)
    counts as unrestricted for the day rule, which is: when both day fields are restricted a day
    matches if either matches; otherwise both must match.
    """

    expr: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    dom_star: bool
    dow_star: bool

    def matches_day(self, day: date) -> bool:
        """Whether the cron fires on some minute of this calendar day."""
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.dom_star or self.dow_star:
            return dom and dow
        return dom or dow

    def matches(self, t: datetime) -> bool:
        """Whether the wall-clock minute of `t` is a firing time (seconds are ignored)."""
        return t.minute in self.minutes and t.hour in self.hours and self.matches_day(t.date())

    def next_after(self, t: datetime) -> datetime:
        """The first firing time strictly after `t`, in `t`'s timezone, at second 0.

        Cron fields are read as wall-clock time in `t`'s zone. Across DST changes: a wall time
        skipped by spring-forward still fires once, shifted by the gap (02:30 becomes 03:30 in
        Europe/Berlin), so a daily sweep is not lost; a wall time that occurs twice at fall-back
        fires only at its first occurrence, unless the hour field is every hour, in which case the
        repeated hour is a real hour of its own and fires too.
        """
        tz = t.tzinfo
        offset = t.utcoffset()
        if tz is None or offset is None:
            raise ValueError(f"next_after needs a timezone-aware datetime, got {t!r}")
        # A fixed-offset zone has no DST, so wall order equals instant order and no slop is needed.
        slop = timedelta(0) if isinstance(tz, timezone) else _DST_SLOP
        t_utc = t.astimezone(UTC)
        start = (t.replace(tzinfo=None) - slop).replace(second=0, microsecond=0)
        every_hour = len(self.hours) == 24
        t_naive = t_utc.replace(tzinfo=None)
        best: datetime | None = None
        for wall in self._walls_from(start):
            # Every instant from here on is at least this late, so the best one cannot improve.
            if best is not None and wall - offset - slop > best.replace(tzinfo=None):
                break
            if wall - offset + slop <= t_naive:
                continue  # happens at or before t whatever the offset; skip the zone lookups
            for instant in _instants(wall, tz, both_folds=every_hour):
                if instant > t_utc and (best is None or instant < best):
                    best = instant
        if best is None:
            raise ValueError(f"'{self.expr}' does not fire within {_SEARCH_YEARS} years after {t}")
        return best.astimezone(tz)

    def _walls_from(self, start: datetime) -> Iterator[datetime]:
        """Firing wall-clock times at or after `start` in wall order, for at most _SEARCH_YEARS."""
        hours = sorted(self.hours)
        minutes = sorted(self.minutes)
        for day in self._days_from(start.date()):
            for hour in hours:
                if day == start.date() and hour < start.hour:
                    continue
                for minute in minutes:
                    wall = datetime(day.year, day.month, day.day, hour, minute)
                    if wall >= start:
                        yield wall

    def _days_from(self, first: date) -> Iterator[date]:
        """Matching days from `first` on, bounded by _SEARCH_YEARS of calendar."""
        try:
            last = first + timedelta(days=366 * _SEARCH_YEARS)
        except OverflowError:
            last = date.max
        day = first
        # Each step advances at least one day, so this runs at most 366 * _SEARCH_YEARS times.
        for _ in range(366 * _SEARCH_YEARS + 1):
            if day > last:
                return
            if day.month not in self.months:
                # Skip the rest of a month that can never match in one step.
                next_month = date(day.year + day.month // 12, day.month % 12 + 1, 1)
                day = next_month
                continue
            if self.matches_day(day):
                yield day
            if day == date.max:
                return
            day += timedelta(days=1)

    def max_gap(self, start: date, horizon_days: int = 8) -> float:
        """Largest wall-clock gap in seconds between consecutive firings from `start` on.

        Looks at the matching days within `horizon_days` plus the first one after it, so the gap
        that straddles the horizon counts. DST is ignored (an approximation of at most an hour).
        """
        times = sorted(h * 60 + m for h in self.hours for m in self.minutes)
        gap = max((b - a for a, b in pairwise(times)), default=0)
        horizon = start + timedelta(days=horizon_days)
        previous: date | None = None
        for day in self._days_from(start):
            if previous is not None:
                gap = max(gap, (day - previous).days * 1440 - times[-1] + times[0])
                if day > horizon:
                    break
            previous = day
        return float(gap * 60)


def _instants(wall: datetime, tz: tzinfo, *, both_folds: bool) -> list[datetime]:
    """The UTC instants at which wall-clock time `wall` happens in `tz` (see next_after)."""
    first = wall.replace(tzinfo=tz).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) != wall:
        # Skipped by spring-forward: fold=0 reads it with the old offset, i.e. shifted by the gap.
        return [first]
    second = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    if both_folds and second != first:
        return [first, second]
    return [first]


def _parse_number(token: str, field: _Field, expr: str) -> int:
    if token.isascii() and token.isdigit():
        value = int(token)
    elif token.lower() in field.names:
        value = field.names[token.lower()]
    else:
        kind = {"month": "a number or month name", "day-of-week": "a number or day name"}.get(
            field.name, "a number"
        )
        raise ValueError(f"'{expr}': {field.name} value {token!r} is not {kind}")
    if not field.low <= value <= field.high:
        raise ValueError(
            f"'{expr}': {field.name} value {value} is outside {field.low}-{field.high}"
        )
    return value


def _parse_field(text: str, field: _Field, expr: str) -> frozenset[int]:
    values: set[int] = set()
    # The item count is bounded by the field text, and each range by the field's span.
    for item in text.split(","):
        if not item:
            raise ValueError(f"'{expr}': {field.name} has an empty list item in {text!r}")
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not (step_text.isascii() and step_text.isdigit()):
                raise ValueError(
                    f"'{expr}': {field.name} step {step_text!r} in {item!r} is not a number"
                )
            step = int(step_text)
            if step < 1:
                raise ValueError(f"'{expr}': {field.name} step {step} must be at least 1")
        if base == "*":
            # Day-of-week `*` is 0-6: including 7 would only repeat Sunday and skew steps.
            low, high = field.low, (6 if field.name == "day-of-week" else field.high)
        elif "-" in base:
            first, _, last = base.partition("-")
            if not first or not last:
                raise ValueError(f"'{expr}': {field.name} range {base!r} is incomplete")
            low = _parse_number(first, field, expr)
            high = _parse_number(last, field, expr)
            if low > high:
                raise ValueError(
                    f"'{expr}': {field.name} range {base!r} is backwards (start exceeds end)"
                )
        else:
            low = high = _parse_number(base, field, expr)
            if slash:
                # Vixie cron rejects `5/10`; cronie reads it as 5-max. Refuse rather than guess.
                raise ValueError(
                    f"'{expr}': {field.name} step needs a range or '*': {item!r} "
                    f"(write {base}-{field.high}/{step_text} or */{step_text})"
                )
        values.update(range(low, high + 1, step))
    if field.name == "day-of-week" and 7 in values:
        values.discard(7)
        values.add(0)
    return frozenset(values)


def parse_cron(expr: str) -> CronSpec:
    """Parse `minute hour day-of-month month day-of-week` (or an @daily-style macro).

    Raises ValueError whose message quotes the expression and names the bad field.
    """
    text = expr.strip()
    if text.startswith("@"):
        if text.lower() not in _MACROS:
            raise ValueError(f"'{text}': only {', '.join(_MACROS)} are supported as @ shortcuts")
        parts = _MACROS[text.lower()].split()
    else:
        parts = text.split()
    if len(parts) != 5:
        raise ValueError(
            f"'{text}': expected 5 fields (minute hour day-of-month month day-of-week), "
            f"got {len(parts)}"
        )
    minutes, hours, days, months, weekdays = (
        _parse_field(part, field, text) for part, field in zip(parts, _FIELDS, strict=True)
    )
    spec = CronSpec(
        expr=text,
        minutes=minutes,
        hours=hours,
        days=days,
        months=months,
        weekdays=weekdays,
        dom_star=parts[2].startswith("*"),
        dow_star=parts[4].startswith("*"),
    )
    # Unless both day fields are restricted (then any listed weekday will do), a day must satisfy
    # day-of-month and month together, and `31 2` never does. Any valid month/day pair falls on
    # every weekday somewhere in the calendar cycle, so the weekday cannot make it impossible.
    if (spec.dom_star or spec.dow_star) and not any(
        d <= _MONTH_DAYS[m] for m in months for d in days
    ):
        raise ValueError(f"'{text}': day-of-month {parts[2]} never occurs in month {parts[3]}")
    return spec


def local_zone() -> tzinfo:
    """The host's zone as a real DST-aware zone (TZ, else /etc/localtime, else a fixed offset).

    `datetime.now().astimezone()` only gives today's fixed offset, which would place cron times
    wrongly after the next DST change; the daemon should evaluate cron in this zone instead.
    """
    key = os.environ.get("TZ", "").lstrip(":")
    if key:
        try:
            return ZoneInfo(key)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    try:
        with open("/etc/localtime", "rb") as file:
            return ZoneInfo.from_file(file, key="localtime")
    except (OSError, ValueError):
        pass
    fallback = datetime.now().astimezone().tzinfo
    return fallback if fallback is not None else UTC


class Schedule:
    """Decides when the next sweep starts, from a ScheduleConfig.

    Cron wins when both `cron` and `interval` are set (`interval` has a default). Cron fields are
    read in `tz` when given, else in the zone of the `after` passed to next_run.
    """

    def __init__(self, config: ScheduleConfig, *, tz: tzinfo | None = None) -> None:
        self.config = config
        self.tz = tz
        self.cron: CronSpec | None = parse_cron(config.cron) if config.cron is not None else None
        self.interval: float | None = config.interval
        self.jitter: float = config.jitter or 0.0
        if self.cron is None and self.interval is None:
            raise ConfigError("schedule.interval: set an interval or a cron expression")

    @property
    def kind(self) -> str:
        return "cron" if self.cron is not None else "interval"

    def next_run(
        self, after: datetime, *, last_started: datetime | None, rng: random.Random
    ) -> datetime:
        """When the next sweep should start, at or after `after` (normally: now, sweep done).

        Interval mode: `last_started + interval`, or `after` when never run or already overdue
        (sweeps never overlap, and a long sweep is not followed by a burst of catch-up sweeps).
        Cron mode: the next cron time strictly after `after`. Both add uniform jitter in
        [0, jitter] so that shards and replicas do not hit the network in lockstep.
        """
        if after.tzinfo is None or after.utcoffset() is None:
            raise ValueError(f"next_run needs a timezone-aware datetime, got {after!r}")
        zone = self.tz or after.tzinfo
        if self.cron is not None:
            base = self.cron.next_after(after.astimezone(zone)).astimezone(UTC)
        else:
            assert self.interval is not None
            base = after.astimezone(UTC)
            if last_started is not None:
                # In UTC: aware arithmetic in a DST zone is wall-clock arithmetic, and 6 h across
                # a DST change must stay 6 real hours.
                due = last_started.astimezone(UTC) + timedelta(seconds=self.interval)
                base = max(due, base)
        if self.jitter > 0:
            base += timedelta(seconds=rng.uniform(0.0, self.jitter))
        return base.astimezone(zone)

    def expected_gap(self, now: datetime | None = None) -> float:
        """Seconds between sweep starts to expect, including jitter (for /healthz windows).

        Interval mode: interval + jitter. Cron mode: the cron's largest gap between firings over
        the ~week after `now` (default: the current time), plus jitter; DST is ignored.
        """
        if self.cron is None:
            assert self.interval is not None
            return self.interval + self.jitter
        if now is None:
            now = datetime.now(self.tz or UTC)
        elif self.tz is not None:
            now = now.astimezone(self.tz)
        return self.cron.max_gap(now.date()) + self.jitter
