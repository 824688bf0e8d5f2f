"""What the scheduler's jobs do, wired from the config to the stages.

``filterd.scheduler`` declares *when* each job runs; this module says *what* each one does
with the daemon's store, mailer and pipeline. Every callable here is blocking and runs in
the scheduler's worker threads, never on mitmproxy's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from filterd import alerts, lists, mail, refresh, report, scheduler
from filterd.config import Config
from filterd.errors import FilterdError

if TYPE_CHECKING:
    from filterd.daemon import Daemon

log = logging.getLogger("filterd.jobs")


def transport(config: Config) -> mail.Transport:
    """SMTP as ``[mail]`` says, or the maildir outbox of the embedded default."""
    m = config.sections["mail"]
    password = m["password_file"]
    if password and not password.startswith("credential:"):
        password = str(config.path("mail", "password_file"))
    return mail.make_transport(
        outbox=config.data_path("mail", "outbox"), smtp_host=m["smtp_host"], smtp_port=m["smtp_port"],
        security=m["security"], username=m["username"], password_file=password,
        ca_file=str(config.path("mail", "ca_file") or ""), timeout_seconds=m["timeout_seconds"])


def archive_dir(config: Config) -> Path:
    return config.data_path("report", "archive")


def trend_cache(config: Config) -> Path:
    """Where the weekly report keeps the totals of past weeks (names and counts)."""
    return archive_dir(config) / ".cache"


def weekly_report(config: Config, db: Path, directory, tz, week: str, *, send: bool = True,
                  out: Path | None = None) -> list[Path]:
    """Build a week's report, keep it in the archive (or ``out``) and, with ``send``, mail it
    to pastoral staff and mark it sent (the scheduler's catch-up looks for that mark)."""
    r = config.sections["report"]
    built = report.build_weekly(db, week, tz=tz, directory=directory, school=config.get("school", "name"),
                                social_categories=r["social_categories"], bypass_categories=r["bypass_categories"],
                                groups=config.categories, cache_dir=trend_cache(config))
    folder = out or archive_dir(config)
    paths = built.write(folder)
    if send:
        to = config.get("mail", "pastoral")
        msg = built.email(config.get("mail", "from"), to)
        transport(config).send(msg)
        report.mark_sent(folder, week, message_id=msg["Message-ID"], to=to, at=datetime.now(timezone.utc))
        log.info("weekly report %s sent to %s", week, ", ".join(to))
    return paths


def validate_list(fmt: str):
    """A downloaded list is used only if it loads and is mostly entries, not garbage."""

    def validate(path: Path) -> None:
        loaded = lists.load(path, fmt)
        if loaded.entries == 0 or loaded.skipped > loaded.entries:
            raise FilterdError(f"refusing a list with {loaded.entries} entries and {loaded.skipped} bad lines",
                               file=path)

    return validate


def refresh_lists(daemon: "Daemon") -> bool:
    """Fetch every list that has a ``url``; a changed one triggers a reload of the pipeline."""
    changed = False
    for spec in daemon.config.lists:
        if not spec.url:
            continue
        tarball = bool(re.search(r"\.(tar\.gz|tgz|tar)$", spec.url))
        try:
            changed |= refresh.refresh_list(spec.url, spec.path, validate_list(spec.format),
                                            category=spec.path.name if tarball else None)
        except FilterdError as exc:
            log.error("list %s not refreshed, keeping the current one: %s", spec.name, exc)
    if changed:
        asyncio.run_coroutine_threadsafe(daemon.reload("lists refreshed"), daemon.loop)
    return changed


def purge(daemon: "Daemon") -> dict[str, int]:
    days = daemon.config.get("storage", "retention_days")
    counts = daemon.store.purge_before(datetime.now(timezone.utc) - timedelta(days=days))
    log.info("retention purge (%d days): %s", days, counts)
    return counts


def start(daemon: "Daemon"):
    """Build and start the scheduler on the running loop with every job wired."""
    config, tz = daemon.config, daemon.tz
    dispatcher = alerts.AlertDispatcher(
        daemon.store, transport(config), sender=config.get("mail", "from"), to=config.get("mail", "ict"),
        tz=tz, school=config.get("school", "name"), group_seconds=60 * config.get("mail", "group_minutes"),
        max_attempts=config.get("mail", "max_attempts"))
    db = daemon.store.path

    def digest(day: date) -> None:
        msg = alerts.build_digest(daemon.store, day, tz=tz, sender=config.get("mail", "from"),
                                  to=config.get("mail", "ict"), school=config.get("school", "name"))
        if msg is not None:
            transport(config).send(msg)

    callables = scheduler.JobCallables(
        dispatch_alerts=lambda: dispatcher.dispatch_once(time.time()),
        weekly_report=lambda week: weekly_report(daemon.config, db, daemon.pipeline.identifier.directory, tz, week),
        last_weekly_sent=lambda: report.last_sent(archive_dir(daemon.config)),
        refresh_lists=lambda: refresh_lists(daemon) if any(l.url for l in daemon.config.lists) else False,
        purge=lambda: purge(daemon),
        daily_digest=digest,
    )
    sched = scheduler.build_scheduler(callables, scheduler.ScheduleSettings.from_mapping(config.sections["schedule"], tz))
    sched.start()
    for job_id, _, when in scheduler.next_runs(sched):
        log.info("job %s: next run %s", job_id, when.astimezone(tz).isoformat() if when else "-")
    return sched
