"""filterd.scheduler: triggers on a controllable clock (DST included), catch-up, threads, the loop."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import date, datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from filterd.errors import FilterdError
from filterd.scheduler import (
    JOBS,
    JobCallables,
    ScheduleSettings,
    build_scheduler,
    catch_up_week,
    iso_week,
    next_fire_times,
    next_runs,
    parse_daily,
    parse_weekly,
    run_digest,
    run_weekly,
    weekly_due,
)

LONDON = ZoneInfo("Europe/London")
UTC = timezone.utc


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize("after, expected_utc", [
    (datetime(2027, 3, 20, 12, tzinfo=LONDON), utc(2027, 3, 22, 7, 0)),   # GMT: 07:00 = 07:00Z
    (datetime(2027, 3, 27, 12, tzinfo=LONDON), utc(2027, 3, 29, 6, 0)),   # after spring forward: BST
    (datetime(2027, 10, 30, 12, tzinfo=LONDON), utc(2027, 11, 1, 7, 0)),  # after fall back: GMT
])
def test_weekly_report_stays_at_local_time_across_dst(after, expected_utc):
    [fire] = next_fire_times(ScheduleSettings(), "weekly_report", after, count=1)
    assert fire == expected_utc
    assert fire.astimezone(LONDON).strftime("%a %H:%M") == "Mon 07:00"


def test_daily_purge_across_spring_forward():
    fires = next_fire_times(ScheduleSettings(), "purge", datetime(2027, 3, 27, 12, tzinfo=LONDON), 3)
    assert [f.astimezone(UTC) for f in fires] == [utc(2027, 3, 28, 1, 30), utc(2027, 3, 29, 1, 30),
                                                  utc(2027, 3, 30, 1, 30)]
    assert {f.astimezone(LONDON).strftime("%H:%M") for f in fires} == {"02:30"}


def test_digest_in_the_repeated_hour_runs_once_that_day():
    settings = ScheduleSettings(daily_digest="01:30")
    fires = next_fire_times(settings, "daily_digest", datetime(2027, 10, 30, 12, tzinfo=LONDON), 3)
    # APScheduler 3 fires twice in the repeated hour (01:30 BST, then 01:30 GMT) ...
    assert [f.astimezone(UTC) for f in fires[:2]] == [utc(2027, 10, 31, 0, 30), utc(2027, 10, 31, 1, 30)]
    # ... so run_digest keeps to one digest a day.
    days: list[date] = []
    jobs = JobCallables(dispatch_alerts=lambda: None, daily_digest=days.append)
    state: dict = {}
    run_digest(jobs, settings, state)
    run_digest(jobs, settings, state)
    assert days == [datetime.now(LONDON).date()]


def test_dispatch_interval_and_disabled_jobs():
    settings = ScheduleSettings(dispatch_seconds=5, list_refresh_hours=0, purge_time="", weekly_report="")
    start = datetime(2026, 11, 25, 10, tzinfo=UTC)
    fires = next_fire_times(settings, "dispatch_alerts", start, 3)
    assert [(b - a).total_seconds() for a, b in zip(fires, fires[1:])] == [5, 5]
    for job in ("refresh_lists", "purge", "weekly_report", "daily_digest"):
        assert next_fire_times(settings, job, start) == []


@pytest.mark.parametrize("now, week", [
    (datetime(2026, 11, 23, 8, 0, tzinfo=LONDON), "2026-W47"),   # Monday after 07:00: last week
    (datetime(2026, 11, 23, 6, 59, tzinfo=LONDON), "2026-W46"),  # Monday before 07:00: week before
    (datetime(2026, 11, 29, 23, 0, tzinfo=LONDON), "2026-W47"),  # Sunday
    (datetime(2027, 1, 4, 9, 0, tzinfo=LONDON), "2026-W53"),     # ISO year boundary
])
def test_weekly_due(now, week):
    assert weekly_due(ScheduleSettings(), now) == week


@pytest.mark.parametrize("spec, ok", [("mon 07:00", ("mon", 7, 0)), ("Fri 16:30", ("fri", 16, 30)),
                                      ("monday 07:00", None), ("mon 24:00", None), ("mon 7am", None)])
def test_parse_weekly(spec, ok):
    if ok is None:
        with pytest.raises(FilterdError, match="schedule.weekly_report"):
            parse_weekly(spec)
    else:
        assert parse_weekly(spec) == ok


@pytest.mark.parametrize("spec, ok", [("02:30", (2, 30)), ("2:30", (2, 30)), ("25:00", None), ("", None)])
def test_parse_daily(spec, ok):
    if ok is None:
        with pytest.raises(FilterdError, match="schedule.purge_time"):
            parse_daily(spec)
    else:
        assert parse_daily(spec) == ok


def test_settings_from_mapping_validates():
    s = ScheduleSettings.from_mapping({"dispatch_seconds": 2, "weekly_report": "tue 08:15",
                                       "list_refresh_hours": 6, "purge_time": "03:00", "daily_digest": ""},
                                      LONDON)
    assert (s.dispatch_seconds, s.weekly_report, s.timezone) == (2, "tue 08:15", LONDON)
    with pytest.raises(FilterdError, match="schedule.daily_digest"):
        ScheduleSettings(daily_digest="noon")
    with pytest.raises(FilterdError, match="schedule.dispatch_seconds"):
        ScheduleSettings(dispatch_seconds=0)


class Calls:
    """Job callables that record what they were asked, and from which thread."""

    def __init__(self, sent: str | None) -> None:
        self.sent = sent
        self.weeks: list[str] = []
        self.dispatches = 0
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def dispatch(self) -> None:
        with self.lock:
            self.dispatches += 1
            self.threads.add(threading.current_thread().name)
        time.sleep(0.3)  # blocking on purpose: the loop must keep running meanwhile

    def weekly(self, week: str) -> None:
        with self.lock:
            self.weeks.append(week)
            self.sent = week
            self.threads.add(threading.current_thread().name)

    def jobs(self) -> JobCallables:
        return JobCallables(dispatch_alerts=self.dispatch, weekly_report=self.weekly,
                            last_weekly_sent=lambda: self.sent, refresh_lists=lambda: None,
                            purge=lambda: None, daily_digest=lambda day: None)


def test_catch_up_week_only_when_unsent():
    monday = datetime(2026, 11, 23, 8, 0, tzinfo=LONDON)
    assert catch_up_week(Calls(None).jobs(), ScheduleSettings(), monday) == "2026-W47"
    assert catch_up_week(Calls("2026-W46").jobs(), ScheduleSettings(), monday) == "2026-W47"
    assert catch_up_week(Calls("2026-W47").jobs(), ScheduleSettings(), monday) is None
    assert catch_up_week(Calls(None).jobs(), ScheduleSettings(weekly_report=""), monday) is None


def test_run_weekly_is_idempotent():
    calls = Calls("2026-W46")
    assert run_weekly(calls.jobs(), ScheduleSettings(), "2026-W47") == "2026-W47"
    assert run_weekly(calls.jobs(), ScheduleSettings(), "2026-W47") is None
    assert calls.weeks == ["2026-W47"]


def test_jobs_table_builds_every_job_with_misfire_policy():
    scheduler = build_scheduler(Calls("2099-W01").jobs(), ScheduleSettings(daily_digest="16:00"))
    jobs = {job.id: job for job in scheduler.get_jobs()}
    assert set(jobs) == {spec.id for spec in JOBS}  # no catch-up: nothing is due
    for job in jobs.values():
        assert job.coalesce is True and job.max_instances == 1 and job.misfire_grace_time > 0
    only_dispatch = build_scheduler(JobCallables(dispatch_alerts=lambda: None), ScheduleSettings())
    assert [job.id for job in only_dispatch.get_jobs()] == ["dispatch_alerts"]


def test_on_a_running_loop_jobs_run_in_threads_and_catch_up_once():
    calls = Calls("2026-W40")  # last week's report was never sent (the daemon was down)
    now = datetime.now(LONDON)
    due = weekly_due(ScheduleSettings(), now)
    lags: list[float] = []

    async def main() -> list:
        scheduler = build_scheduler(calls.jobs(), ScheduleSettings(dispatch_seconds=1), now=now)
        scheduler.start()
        listing = next_runs(scheduler)
        loop_thread = threading.current_thread().name
        end = time.monotonic() + 2.5
        while time.monotonic() < end:  # the loop stays responsive while jobs block in threads
            t = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - t)
        scheduler.shutdown(wait=False)
        await asyncio.sleep(0.05)
        assert loop_thread not in calls.threads
        return listing

    listing = asyncio.run(main())
    assert calls.weeks == [due]  # caught up exactly once
    assert 2 <= calls.dispatches <= 4  # at start, then every second (each run takes 0.3 s)
    assert max(lags) < 0.2
    ids = [row[0] for row in listing]
    assert "dispatch_alerts" in ids and "weekly_catch_up" in ids and "weekly_report" in ids


def test_iso_week():
    assert iso_week(date(2026, 11, 23)) == "2026-W48"
    assert iso_week(date(2027, 1, 1)) == "2026-W53"
