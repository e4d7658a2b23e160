"""Tests for relayaudit.schedule: cron parsing and next times, DST in Europe/Berlin, intervals, jitter."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta, timezone
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayaudit.config import ScheduleConfig, parse_config
from relayaudit.errors import ConfigError
from relayaudit.schedule import CronSpec, Schedule, parse_cron

BERLIN = ZoneInfo("Europe/Berlin")


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def berlin(text: str, *, fold: int = 0) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN, fold=fold)


# --- next times in UTC -------------------------------------------------------------------------
# 2024-01-01 is a Monday; 2024 is a leap year, 2100 is not.

NEXT_CASES = [
    ("* * * * *", "2024-01-01T00:00:00", "2024-01-01T00:01:00"),
    ("* * * * *", "2024-01-01T00:00:30", "2024-01-01T00:01:00"),
    ("* * * * *", "2024-01-01T00:00:59.999999", "2024-01-01T00:01:00"),
    ("*/5 * * * *", "2024-01-01T00:03:00", "2024-01-01T00:05:00"),
    ("*/5 * * * *", "2024-01-01T00:55:00", "2024-01-01T01:00:00"),
    ("0 * * * *", "2024-01-01T00:00:00", "2024-01-01T01:00:00"),
    ("30 2 * * *", "2024-01-01T02:29:59", "2024-01-01T02:30:00"),
    ("30 2 * * *", "2024-01-01T02:30:00", "2024-01-02T02:30:00"),
    ("0 0 1 * *", "2024-01-15T12:00:00", "2024-02-01T00:00:00"),
    ("0 0 31 * *", "2024-02-01T00:00:00", "2024-03-31T00:00:00"),
    ("0 0 31 * *", "2024-04-01T00:00:00", "2024-05-31T00:00:00"),
    ("0 0 29 2 *", "2024-03-01T00:00:00", "2028-02-29T00:00:00"),
    ("0 0 29 2 *", "2096-03-01T00:00:00", "2104-02-29T00:00:00"),
    ("59 23 31 12 *", "2024-12-31T23:59:00", "2025-12-31T23:59:00"),
    # weekdays, names, Sunday as 0 and 7
    ("15 10 * * 1-5", "2024-01-05T11:00:00", "2024-01-08T10:15:00"),
    ("0 8 * * MON-FRI", "2024-01-06T00:00:00", "2024-01-08T08:00:00"),
    ("0 9 * * sat,sun", "2024-01-01T00:00:00", "2024-01-06T09:00:00"),
    ("0 9 * * 0", "2024-01-01T00:00:00", "2024-01-07T09:00:00"),
    ("0 9 * * 7", "2024-01-01T00:00:00", "2024-01-07T09:00:00"),
    ("0 0 * * 5-7", "2024-01-01T00:00:00", "2024-01-05T00:00:00"),
    ("0 0 * * 5-7", "2024-01-07T00:00:00", "2024-01-12T00:00:00"),
    ("0 12 * jan,jul mon", "2024-02-01T00:00:00", "2024-07-01T12:00:00"),
    ("0 12 1 Feb *", "2024-02-01T12:00:00", "2025-02-01T12:00:00"),
    # Vixie: both day fields restricted means either matches (13th OR Friday)
    ("0 0 13 * 5", "2024-01-01T00:00:00", "2024-01-05T00:00:00"),
    ("0 0 13 * 5", "2024-01-12T00:00:00", "2024-01-13T00:00:00"),
    # ... so "days 1-7 and Monday" is not "first Monday" but "days 1-7 or any Monday"
    ("0 0 1-7 * 1", "2024-01-07T00:00:00", "2024-01-08T00:00:00"),
    ("0 0 1-7 * 1", "2024-01-08T00:00:00", "2024-01-15T00:00:00"),
    # a field starting with `*` counts as unrestricted: odd days AND Mondays
    ("0 0 */2 * 1", "2023-12-31T00:00:00", "2024-01-01T00:00:00"),
    ("0 0 */2 * 1", "2024-01-01T00:00:00", "2024-01-15T00:00:00"),
    # ranges with steps
    ("1-10/3 * * * *", "2024-01-01T00:04:00", "2024-01-01T00:07:00"),
    ("1-10/3 * * * *", "2024-01-01T00:10:00", "2024-01-01T01:01:00"),
    ("0 0-23/6 * * *", "2024-01-01T05:00:00", "2024-01-01T06:00:00"),
    ("0 0-23/6 * * *", "2024-01-01T18:00:00", "2024-01-02T00:00:00"),
    ("*/20 9-17/4 * * *", "2024-01-01T13:41:00", "2024-01-01T17:00:00"),
    ("5,10-12,50 * * * *", "2024-01-01T00:10:00", "2024-01-01T00:11:00"),
    ("5,10-12,50 * * * *", "2024-01-01T00:12:00", "2024-01-01T00:50:00"),
    ("0 0 * */3 *", "2024-02-10T00:00:00", "2024-04-01T00:00:00"),
    ("  0\t3 * * *  ", "2024-01-01T04:00:00", "2024-01-02T03:00:00"),
    # @ shortcuts
    ("@hourly", "2024-01-01T00:30:00", "2024-01-01T01:00:00"),
    ("@daily", "2024-01-01T00:30:00", "2024-01-02T00:00:00"),
    ("@midnight", "2024-01-01T00:30:00", "2024-01-02T00:00:00"),
    ("@weekly", "2024-01-01T00:00:00", "2024-01-07T00:00:00"),
    ("@monthly", "2024-01-01T00:00:00", "2024-02-01T00:00:00"),
    ("@yearly", "2024-01-01T00:00:00", "2025-01-01T00:00:00"),
    ("@annually", "2024-06-01T00:00:00", "2025-01-01T00:00:00"),
]


@pytest.mark.parametrize(("expr", "after", "expected"), NEXT_CASES)
def test_next_after_utc(expr: str, after: str, expected: str) -> None:
    got = parse_cron(expr).next_after(utc(after))
    assert got == utc(expected)
    assert got.tzinfo is UTC


def test_next_after_in_fixed_offset_zone_keeps_the_zone() -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    got = parse_cron("0 9 * * *").next_after(datetime(2024, 1, 1, 10, 0, tzinfo=india))
    assert got == datetime(2024, 1, 2, 9, 0, tzinfo=india)
    assert got.utcoffset() == timedelta(hours=5, minutes=30)


def test_next_after_rejects_naive_datetime() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        parse_cron("* * * * *").next_after(datetime(2024, 1, 1))


def test_parse_fields() -> None:
    spec = parse_cron("*/15 9-17 1,15 jan-mar,dec 1-5")
    assert spec.minutes == {0, 15, 30, 45}
    assert spec.hours == set(range(9, 18))
    assert spec.days == {1, 15}
    assert spec.months == {1, 2, 3, 12}
    assert spec.weekdays == {1, 2, 3, 4, 5}
    assert not spec.dom_star and not spec.dow_star
    star = parse_cron("* * * * */2")
    assert star.weekdays == {0, 2, 4, 6}  # `*` for weekdays is 0-6, so 7 does not double Sunday
    assert star.dom_star and star.dow_star
    assert parse_cron("0 0 * * 6-7").weekdays == {0, 6}


# --- bad expressions ---------------------------------------------------------------------------

FIELDS = "(minute hour day-of-month month day-of-week)"

BAD_CASES = [
    ("61 * * * *", "'61 * * * *': minute value 61 is outside 0-59"),
    ("* 24 * * *", "'* 24 * * *': hour value 24 is outside 0-23"),
    ("* * 0 * *", "'* * 0 * *': day-of-month value 0 is outside 1-31"),
    ("* * 32 * *", "'* * 32 * *': day-of-month value 32 is outside 1-31"),
    ("* * * 13 *", "'* * * 13 *': month value 13 is outside 1-12"),
    ("* * * * 8", "'* * * * 8': day-of-week value 8 is outside 0-7"),
    ("x * * * *", "'x * * * *': minute value 'x' is not a number"),
    ("* * * foo *", "'* * * foo *': month value 'foo' is not a number or month name"),
    ("* * * * funday", "'* * * * funday': day-of-week value 'funday' is not a number or day name"),
    (
        "* * * * mon-sun",
        "'* * * * mon-sun': day-of-week range 'mon-sun' is backwards (start exceeds end)",
    ),
    ("5-1 * * * *", "'5-1 * * * *': minute range '5-1' is backwards (start exceeds end)"),
    ("-1 * * * *", "'-1 * * * *': minute range '-1' is incomplete"),
    ("1,,2 * * * *", "'1,,2 * * * *': minute has an empty list item in '1,,2'"),
    ("*/0 * * * *", "'*/0 * * * *': minute step 0 must be at least 1"),
    ("*/x * * * *", "'*/x * * * *': minute step 'x' in '*/x' is not a number"),
    (
        "5/10 * * * *",
        "'5/10 * * * *': minute step needs a range or '*': '5/10' (write 5-59/10 or */10)",
    ),
    ("* * * *", f"'* * * *': expected 5 fields {FIELDS}, got 4"),
    ("* * * * * *", f"'* * * * * *': expected 5 fields {FIELDS}, got 6"),
    ("", f"'': expected 5 fields {FIELDS}, got 0"),
    ("0 0 31 2 *", "'0 0 31 2 *': day-of-month 31 never occurs in month 2"),
    ("0 0 30,31 feb *", "'0 0 30,31 feb *': day-of-month 30,31 never occurs in month feb"),
    (
        "@reboot",
        "'@reboot': only @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly "
        "are supported as @ shortcuts",
    ),
]


@pytest.mark.parametrize(("expr", "message"), BAD_CASES)
def test_bad_expressions(expr: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_cron(expr)
    assert str(info.value) == message


def test_impossible_day_is_fine_when_weekday_can_match() -> None:
    # both restricted: "31st of February OR any Monday in February" is possible
    got = parse_cron("0 0 31 2 1").next_after(utc("2024-01-01T00:00:00"))
    assert got == utc("2024-02-05T00:00:00")


def test_config_reports_bad_cron_with_key_path() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "scope": ["127.0.0.0/8"],
                "targets": ["127.0.0.1/32"],
                "schedule": {"cron": "61 * * * *"},
            }
        )
    assert "schedule.cron: '61 * * * *': minute value 61 is outside 0-59" in str(info.value)


# --- DST in Europe/Berlin ----------------------------------------------------------------------
# 2024-03-31: 02:00 CET jumps to 03:00 CEST. 2024-10-27: 03:00 CEST falls back to 02:00 CET.


def fires(spec: CronSpec, start: datetime, end: datetime) -> list[datetime]:
    out: list[datetime] = []
    t = start
    for _ in range(10_000):
        t = spec.next_after(t)
        if t >= end:
            return out
        out.append(t)
    raise AssertionError("too many firings")


def test_spring_forward_skipped_time_still_fires_once_shifted() -> None:
    spec = parse_cron("30 2 * * *")
    first = spec.next_after(berlin("2024-03-30T03:00"))
    assert first == berlin("2024-03-31T03:30")
    assert first.utcoffset() == timedelta(hours=2)
    assert first.astimezone(UTC) == utc("2024-03-31T01:30:00")
    assert spec.next_after(first) == berlin("2024-04-01T02:30")


def test_spring_forward_fixed_time_after_the_gap() -> None:
    got = parse_cron("0 3 * * *").next_after(berlin("2024-03-31T01:00"))
    assert got.astimezone(UTC) == utc("2024-03-31T01:00:00")  # one real hour later


def test_spring_forward_hourly_has_23_firings_without_duplicates() -> None:
    spec = parse_cron("0 * * * *")
    got = fires(spec, berlin("2024-03-30T23:59"), berlin("2024-04-01T00:00"))
    assert len(got) == 23
    assert len({t.astimezone(UTC) for t in got}) == 23
    assert [t.hour for t in got] == [0, 1, *range(3, 24)]
    assert spec.next_after(berlin("2024-03-31T01:30")) == berlin("2024-03-31T03:00")


def test_fall_back_fixed_time_fires_once() -> None:
    spec = parse_cron("30 2 * * *")
    first = spec.next_after(berlin("2024-10-27T00:00"))
    assert first.astimezone(UTC) == utc("2024-10-27T00:30:00")  # the first 02:30 (CEST)
    second = spec.next_after(first)
    assert second == berlin("2024-10-28T02:30")
    assert second.astimezone(UTC) == utc("2024-10-28T01:30:00")


def test_fall_back_hourly_fires_in_the_repeated_hour() -> None:
    spec = parse_cron("*/30 * * * *")
    t = berlin("2024-10-27T02:30")  # fold=0: the CEST one, 00:30 UTC
    instants = []
    for _ in range(4):
        t = spec.next_after(t)
        instants.append(t.astimezone(UTC))
    assert instants == [
        utc("2024-10-27T01:00:00"),  # 02:00 CET, the repeated hour
        utc("2024-10-27T01:30:00"),
        utc("2024-10-27T02:00:00"),  # 03:00 CET
        utc("2024-10-27T02:30:00"),
    ]
    day = fires(parse_cron("0 * * * *"), berlin("2024-10-26T23:59"), berlin("2024-10-28T00:00"))
    assert len(day) == 25
    assert len({t.astimezone(UTC) for t in day}) == 25


def test_fall_back_daily_at_two_counts_one_per_day() -> None:
    got = fires(parse_cron("0 2 * * *"), berlin("2024-10-26T00:00"), berlin("2024-10-29T00:00"))
    assert [t.day for t in got] == [26, 27, 28]


def test_dst_week_daily_times_are_wall_clock() -> None:
    got = fires(parse_cron("0 6 * * *"), berlin("2024-03-29T00:00"), berlin("2024-04-03T00:00"))
    assert [(t.day, t.hour, t.minute) for t in got] == [
        (29, 6, 0),
        (30, 6, 0),
        (31, 6, 0),
        (1, 6, 0),
        (2, 6, 0),
    ]
    real = [t.astimezone(UTC) for t in got]
    # the night of the change is one hour shorter in real time
    assert [(b - a) / timedelta(hours=1) for a, b in pairwise(real)] == [24.0, 23.0, 24.0, 24.0]


# --- against a slow oracle ---------------------------------------------------------------------


def oracle(spec: CronSpec, t: datetime) -> datetime:
    """Minute-by-minute in UTC, skipping whole days and hours that cannot match."""
    cur = t.replace(second=0, microsecond=0) + timedelta(minutes=1)
    for _ in range(2_000_000):
        if not spec.matches_day(cur.date()):
            cur = (cur + timedelta(days=1)).replace(hour=0, minute=0)
        elif cur.hour not in spec.hours:
            cur = (cur + timedelta(hours=1)).replace(minute=0)
        elif cur.minute not in spec.minutes:
            cur += timedelta(minutes=1)
        else:
            return cur
    raise AssertionError("oracle found nothing")


def field(low: int, high: int) -> st.SearchStrategy[str]:
    single = st.integers(low, high).map(str)
    rng = st.tuples(st.integers(low, high), st.integers(low, high)).map(
        lambda p: f"{min(p)}-{max(p)}"
    )
    stepped = st.tuples(rng, st.integers(1, 7)).map(lambda p: f"{p[0]}/{p[1]}")
    star = st.sampled_from(["*", "*/2", "*/3", "*/7"])
    item = st.one_of(single, rng, stepped)
    return st.one_of(star, st.lists(item, min_size=1, max_size=3).map(",".join))


@settings(max_examples=300, deadline=None)
@given(
    minute=field(0, 59),
    hour=field(0, 23),
    dom=field(1, 28),
    month=field(1, 12),
    dow=field(0, 7),
    when=st.datetimes(datetime(2000, 1, 1), datetime(2090, 1, 1)),
)
def test_next_after_matches_oracle(
    minute: str, hour: str, dom: str, month: str, dow: str, when: datetime
) -> None:
    spec = parse_cron(f"{minute} {hour} {dom} {month} {dow}")
    t = when.replace(tzinfo=UTC)
    got = spec.next_after(t)
    assert got == oracle(spec, t)
    assert spec.matches(got)


def test_pathological_but_valid_expression_is_fast_enough() -> None:
    # Feb 29 that is also a Sunday (`*/7` is a star field, so both must hold): decades apart
    spec = parse_cron("0 0 29 2 */7")
    got = spec.next_after(utc("2021-01-01T00:00:00"))
    assert got == utc("2032-02-29T00:00:00")
    assert got.isoweekday() == 7


# --- Schedule: interval, cron, jitter ----------------------------------------------------------


def test_interval_first_run_is_now_plus_jitter_bounds() -> None:
    schedule = Schedule(ScheduleConfig(interval=3600, jitter=60))
    now = utc("2024-01-01T12:00:00")
    rng = random.Random(1)
    offsets = [
        (schedule.next_run(now, last_started=None, rng=rng) - now).total_seconds()
        for _ in range(2000)
    ]
    assert all(0.0 <= o <= 60.0 for o in offsets)
    assert min(offsets) < 1.0 and max(offsets) > 59.0  # uniform over the whole range


def test_interval_counts_from_last_start() -> None:
    schedule = Schedule(ScheduleConfig.model_validate({"interval": "6h"}))
    now = utc("2024-01-01T12:00:00")
    started = utc("2024-01-01T10:00:00")
    assert schedule.next_run(now, last_started=started, rng=random.Random(0)) == utc(
        "2024-01-01T16:00:00"
    )


def test_interval_with_jitter_after_last_start() -> None:
    schedule = Schedule(ScheduleConfig.model_validate({"interval": "1h", "jitter": "5m"}))
    now = utc("2024-01-01T10:30:00")
    started = utc("2024-01-01T10:00:00")
    rng = random.Random(7)
    for _ in range(500):
        got = schedule.next_run(now, last_started=started, rng=rng)
        assert utc("2024-01-01T11:00:00") <= got <= utc("2024-01-01T11:05:00")


def test_interval_overdue_runs_now() -> None:
    schedule = Schedule(ScheduleConfig(interval=3600))
    now = utc("2024-01-01T12:00:00")
    # the last sweep took longer than the interval: start right away, no catch-up burst
    assert (
        schedule.next_run(now, last_started=utc("2024-01-01T09:00:00"), rng=random.Random()) == now
    )


def test_interval_is_real_time_across_dst() -> None:
    schedule = Schedule(ScheduleConfig.model_validate({"interval": "6h"}))
    started = berlin("2024-03-31T00:00")
    got = schedule.next_run(berlin("2024-03-31T00:30"), last_started=started, rng=random.Random())
    assert got.astimezone(UTC) - started.astimezone(UTC) == timedelta(hours=6)
    assert got == berlin("2024-03-31T07:00")
    assert got.tzinfo is BERLIN


def test_cron_mode_wins_over_default_interval_and_adds_jitter() -> None:
    schedule = Schedule(ScheduleConfig(cron="0 3 * * *", jitter=120))
    assert schedule.kind == "cron"
    now = utc("2024-01-01T12:00:00")
    rng = random.Random(3)
    for _ in range(200):
        got = schedule.next_run(now, last_started=utc("2024-01-01T03:00:00"), rng=rng)
        assert utc("2024-01-02T03:00:00") <= got <= utc("2024-01-02T03:02:00")


def test_cron_in_explicit_zone() -> None:
    schedule = Schedule(ScheduleConfig(cron="30 2 * * *"), tz=BERLIN)
    got = schedule.next_run(utc("2024-03-30T12:00:00"), last_started=None, rng=random.Random())
    assert got == berlin("2024-03-31T03:30")
    assert got.tzinfo is BERLIN


def test_schedule_needs_interval_or_cron() -> None:
    with pytest.raises(ConfigError, match=r"schedule\.interval"):
        Schedule(ScheduleConfig(interval=None))


def test_next_run_rejects_naive() -> None:
    schedule = Schedule(ScheduleConfig(interval=60))
    with pytest.raises(ValueError, match="timezone-aware"):
        schedule.next_run(datetime(2024, 1, 1), last_started=None, rng=random.Random())


@pytest.mark.parametrize(
    ("config", "gap"),
    [
        (ScheduleConfig(interval=3600, jitter=60), 3660.0),
        (ScheduleConfig(cron="0 3 * * *"), 86400.0),
        (ScheduleConfig(cron="0 3 * * *", jitter=600), 87000.0),
        (ScheduleConfig(cron="0 3 * * 1-5"), 3 * 86400.0),  # Friday to Monday
        (ScheduleConfig(cron="*/15 * * * *"), 900.0),
        (ScheduleConfig(cron="0 9,17 * * *"), 16 * 3600.0),
        (ScheduleConfig(cron="0 3 1 * *"), 29 * 86400.0),  # Feb 1 to Mar 1, 2024
        (ScheduleConfig(cron="* * * * *"), 60.0),
    ],
)
def test_expected_gap(config: ScheduleConfig, gap: float) -> None:
    assert Schedule(config).expected_gap(utc("2024-01-15T12:00:00")) == gap


def test_expected_gap_defaults_to_now() -> None:
    assert Schedule(ScheduleConfig(cron="0 3 * * 1-5")).expected_gap() == 3 * 86400.0


def test_max_gap_spans_the_horizon() -> None:
    # yearly: the only gap is the year itself, found past the one-week horizon
    assert parse_cron("@yearly").max_gap(date(2024, 6, 1)) == 365 * 86400.0
