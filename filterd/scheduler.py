"""Every timed job of the daemon, declared in one place (:data:`JOBS`), on mitmproxy's loop.

APScheduler 3.x's ``AsyncIOScheduler`` runs on the already-running asyncio loop, but the jobs
themselves (SQLite, SMTP, HTTP downloads, report rendering) block, so they run on the
scheduler's own thread pool (:data:`WORKERS` threads): the loop only keeps time.

The job *callables* are passed in (:class:`JobCallables`): the daemon wires the store, the
alert dispatcher, the report builder and the list refresher; this module only knows when.

Misfires are handled on purpose:

- every job has ``coalesce=True`` (a backlog of missed runs becomes one run) and
  ``max_instances=1`` (a slow run is never overlapped by the next one);
- ``misfire_grace_time`` is set per job: a late alert dispatch still runs, a purge or refresh
  within hours, a weekly report within a day;
- a job missed while the daemon was *down* is not known to APScheduler (its job store is in
  memory), so :func:`weekly_due` checks at start-up whether last week's report has been sent
  (``last_weekly_sent() -> "YYYY-Www" | None``) and, if not, runs it once at once. Older weeks
  no longer matter and are not caught up. Alert dispatch needs no catch-up: it runs at start.

Times (``"mon 07:00"``, ``"02:30"``) are wall-clock times in the school's time zone; across a
DST change they stay at the same local time (07:00 GMT before, 07:00 BST after). A daily time
that does not exist on the spring-forward day (01:30 in London) runs an hour later that day;
one in the repeated autumn hour fires twice (APScheduler 3), so the digest keeps to once a
day itself; the purge is idempotent; the weekly report (Monday) is never on a DST day.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from filterd.errors import FilterdError

log = logging.getLogger("filterd.scheduler")

#: Threads for blocking jobs: dispatch must not wait behind a long report or refresh.
WORKERS = 4
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class ScheduleSettings:
    """The ``[schedule]`` section, parsed. Times are local to ``timezone``."""

    timezone: ZoneInfo = ZoneInfo("Europe/London")
    dispatch_seconds: float = 5
    weekly_report: str = "mon 07:00"  # "" disables the weekly report
    list_refresh_hours: float = 24  # 0 disables list refresh
    purge_time: str = "02:30"  # "" disables the retention purge
    daily_digest: str = ""  # "HH:MM" enables the daily digest

    def __post_init__(self) -> None:
        if self.dispatch_seconds <= 0:
            raise FilterdError("must be more than 0", field="schedule.dispatch_seconds")
        if self.weekly_report:
            parse_weekly(self.weekly_report)
        for key in ("purge_time", "daily_digest"):
            if getattr(self, key):
                parse_daily(getattr(self, key), field=f"schedule.{key}")

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any], tz: ZoneInfo) -> ScheduleSettings:
        """From the config's ``[schedule]`` dict (keys as in config/filterd.toml)."""
        known = {"dispatch_seconds", "weekly_report", "list_refresh_hours", "purge_time", "daily_digest"}
        return cls(timezone=tz, **{k: v for k, v in section.items() if k in known})


@dataclass(frozen=True)
class JobCallables:
    """What each job does. All are blocking and run in a worker thread; None disables a job.

    - ``dispatch_alerts()``: e.g. ``lambda: dispatcher.dispatch_once(time.time())``;
    - ``weekly_report(week)``: build, archive and send the report of ISO week ``"YYYY-Www"``;
    - ``last_weekly_sent()``: the last week whose report was sent, ``"YYYY-Www"`` or None;
    - ``refresh_lists()``: fetch, validate and swap the configured lists, then reload;
    - ``purge()``: delete what is older than the retention;
    - ``daily_digest(day)``: the digest of ``day`` (a date in the school's time zone).
    """

    dispatch_alerts: Callable[[], object]
    weekly_report: Callable[[str], object] | None = None
    last_weekly_sent: Callable[[], str | None] | None = None
    refresh_lists: Callable[[], object] | None = None
    purge: Callable[[], object] | None = None
    daily_digest: Callable[[date], object] | None = None


def parse_weekly(spec: str) -> tuple[str, int, int]:
    """``"mon 07:00"`` -> ``("mon", 7, 0)``; FilterdError naming the key otherwise."""
    m = re.fullmatch(r"\s*([a-zA-Z]{3})\s+(\d{1,2}):(\d{2})\s*", spec)
    if not m or m.group(1).lower() not in DAYS or int(m.group(2)) > 23 or int(m.group(3)) > 59:
        raise FilterdError(f'must look like "mon 07:00", not {spec!r}', field="schedule.weekly_report")
    return m.group(1).lower(), int(m.group(2)), int(m.group(3))


def parse_daily(spec: str, *, field: str = "schedule.purge_time") -> tuple[int, int]:
    """``"02:30"`` -> ``(2, 30)``."""
    m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*", spec)
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise FilterdError(f'must look like "02:30", not {spec!r}', field=field)
    return int(m.group(1)), int(m.group(2))


def iso_week(day: date) -> str:
    """``date(2026, 11, 23)`` -> ``"2026-W48"``."""
    year, week, _ = day.isocalendar()
    return f"{year}-W{week:02d}"


def weekly_due(settings: ScheduleSettings, now: datetime) -> str:
    """The week the most recent scheduled weekly run (at or before ``now``) was meant to report.

    With ``"mon 07:00"``: on Monday 08:00 that is last week; on Monday 06:00 it is the week
    before last (this Monday's run has not come yet).
    """
    day, hour, minute = parse_weekly(settings.weekly_report)
    local = now.astimezone(settings.timezone)
    monday = local.date() - timedelta(days=local.weekday())
    fire = datetime(monday.year, monday.month, monday.day, hour, minute, tzinfo=settings.timezone)
    fire += timedelta(days=DAYS.index(day))
    if fire > local:
        fire -= timedelta(days=7)
    return iso_week(fire.date() - timedelta(days=7))


# ---------------------------------------------------------------------------------------------
# The jobs, in one table


@dataclass(frozen=True)
class JobSpec:
    """One job: its id, when it runs, how late it may still run, and what it calls."""

    id: str
    name: str
    trigger: Callable[[ScheduleSettings], BaseTrigger | None]
    misfire_grace_time: int
    run: Callable[[JobCallables, ScheduleSettings, dict[str, Any]], object]  # (…, per-job state)


def _weekly_trigger(s: ScheduleSettings) -> BaseTrigger | None:
    if not s.weekly_report:
        return None
    day, hour, minute = parse_weekly(s.weekly_report)
    return CronTrigger(day_of_week=day, hour=hour, minute=minute, timezone=s.timezone)


def _daily_trigger(key: str) -> Callable[[ScheduleSettings], BaseTrigger | None]:
    def build(s: ScheduleSettings) -> BaseTrigger | None:
        spec = getattr(s, key)
        if not spec:
            return None
        hour, minute = parse_daily(spec, field=f"schedule.{key}")
        return CronTrigger(hour=hour, minute=minute, timezone=s.timezone)
    return build


def _refresh_trigger(s: ScheduleSettings) -> BaseTrigger | None:
    if s.list_refresh_hours <= 0:
        return None
    # Jitter: a thousand schools must not hit the list mirror in the same second.
    return IntervalTrigger(hours=s.list_refresh_hours, timezone=s.timezone, jitter=300)


def run_weekly(jobs: JobCallables, s: ScheduleSettings, week: str | None = None) -> str | None:
    """Run the weekly report for ``week`` (default: the one due now) unless already sent.

    Returns the week that was run, or None when there was nothing to do. Idempotent, so the
    start-up catch-up and a late cron run can never send the same week twice.
    """
    if jobs.weekly_report is None:
        return None
    week = week or weekly_due(s, datetime.now(s.timezone))
    done = jobs.last_weekly_sent() if jobs.last_weekly_sent else None
    if done is not None and done >= week:
        log.info("weekly report for %s already sent", week)
        return None
    log.info("weekly report for %s", week)
    jobs.weekly_report(week)
    return week


def run_digest(jobs: JobCallables, s: ScheduleSettings, state: dict[str, Any]) -> object:
    """The digest of today, once per day: APScheduler 3 fires a daily cron time twice on the
    autumn DST day when that time falls in the repeated hour (01:30 in London)."""
    if jobs.daily_digest is None:
        return None
    today = datetime.now(s.timezone).date()
    if state.get("last_day") == today:
        return None
    state["last_day"] = today
    return jobs.daily_digest(today)


JOBS: tuple[JobSpec, ...] = (
    JobSpec("dispatch_alerts", "send pending alerts to ICT",
            lambda s: IntervalTrigger(seconds=s.dispatch_seconds, timezone=s.timezone),
            misfire_grace_time=60,
            run=lambda j, s, st: j.dispatch_alerts()),
    JobSpec("weekly_report", "weekly usage report to pastoral staff", _weekly_trigger,
            misfire_grace_time=24 * 3600,
            run=lambda j, s, st: run_weekly(j, s)),
    JobSpec("refresh_lists", "refresh block lists from their sources", _refresh_trigger,
            misfire_grace_time=6 * 3600,
            run=lambda j, s, st: j.refresh_lists() if j.refresh_lists else None),
    JobSpec("purge", "delete records older than the retention", _daily_trigger("purge_time"),
            misfire_grace_time=12 * 3600,
            run=lambda j, s, st: j.purge() if j.purge else None),
    JobSpec("daily_digest", "daily digest of incidents", _daily_trigger("daily_digest"),
            misfire_grace_time=6 * 3600,
            run=run_digest),
)


def _guarded(spec: JobSpec, jobs: JobCallables, settings: ScheduleSettings) -> Callable[[], None]:
    """Run a job, log how long it took, and log (never raise) its failure."""
    state: dict[str, Any] = {}

    def job() -> None:
        started = time.monotonic()
        try:
            result = spec.run(jobs, settings, state)
        except Exception:
            log.exception("job %s failed", spec.id)
            return
        took = time.monotonic() - started
        level = logging.DEBUG if spec.id == "dispatch_alerts" else logging.INFO
        log.log(level, "job %s done in %.2f s: %s", spec.id, took, result)
    job.__name__ = job.__qualname__ = spec.id
    return job


def build_scheduler(jobs: JobCallables, settings: ScheduleSettings, *,
                    catch_up: bool = True, now: datetime | None = None) -> AsyncIOScheduler:
    """An AsyncIOScheduler with every enabled job of :data:`JOBS` added; not started yet.

    Call ``.start()`` from inside the running loop (mitmproxy's). Alert dispatch runs at once
    and then every ``dispatch_seconds``. With ``catch_up``, last week's report runs once at
    start when it is due and not yet sent (``last_weekly_sent``).
    """
    scheduler = AsyncIOScheduler(
        timezone=settings.timezone,
        executors={"default": ThreadPoolExecutor(WORKERS)},
        job_defaults={"coalesce": True, "max_instances": 1},
    )
    for spec in JOBS:
        if getattr(jobs, spec.id) is None:  # job ids are JobCallables' field names
            continue
        trigger = spec.trigger(settings)
        if trigger is None:
            continue
        extra: dict[str, Any] = {}
        if spec.id == "dispatch_alerts":
            extra["next_run_time"] = datetime.now(settings.timezone)  # deliver the backlog now
        scheduler.add_job(_guarded(spec, jobs, settings), trigger, id=spec.id, name=spec.name,
                          misfire_grace_time=spec.misfire_grace_time, coalesce=True,
                          max_instances=1, replace_existing=True, **extra)
    if catch_up and jobs.weekly_report is not None and settings.weekly_report:
        week = catch_up_week(jobs, settings, now or datetime.now(settings.timezone))
        if week is not None:
            log.warning("the weekly report for %s was not sent (daemon down?): running it now", week)
            scheduler.add_job(lambda: run_weekly(jobs, settings, week), DateTrigger(timezone=settings.timezone),
                              id="weekly_catch_up", name=f"catch-up weekly report {week}",
                              misfire_grace_time=3600, coalesce=True, max_instances=1)
    return scheduler


def catch_up_week(jobs: JobCallables, settings: ScheduleSettings, now: datetime) -> str | None:
    """The week to catch up at start-up (last week's, if due and unsent), else None."""
    if jobs.weekly_report is None or not settings.weekly_report:
        return None
    week = weekly_due(settings, now)
    done = jobs.last_weekly_sent() if jobs.last_weekly_sent else None
    if done is not None and done >= week:
        return None
    return week


def next_runs(scheduler: AsyncIOScheduler) -> list[tuple[str, str, datetime | None]]:
    """``(id, name, next run time)`` per job, soonest first: for logs and the CLI."""
    rows = [(job.id, job.name, getattr(job, "next_run_time", None)) for job in scheduler.get_jobs()]
    far = datetime.max.replace(tzinfo=ZoneInfo("UTC"))
    return sorted(rows, key=lambda r: r[2] or far)


def next_fire_times(settings: ScheduleSettings, job_id: str, after: datetime, count: int = 3) -> list[datetime]:
    """The next ``count`` times job ``job_id`` would fire after ``after`` (no scheduler needed).

    Used by tests (a controllable clock) and handy for ``filterd config check`` output.
    """
    spec = next(s for s in JOBS if s.id == job_id)
    trigger = spec.trigger(settings)
    if trigger is None:
        return []
    out: list[datetime] = []
    previous: datetime | None = None
    now = after
    for _ in range(count):
        fire = trigger.get_next_fire_time(previous, now)
        if fire is None:
            break
        out.append(fire)
        previous = fire
        now = fire.astimezone(UTC) + timedelta(microseconds=1)  # UTC: no wall-clock arithmetic
    return out
