"""The ``filterd`` command line: a click group, one command per task, each with an example.

Bad input (config, files, arguments) ends with a one-line reason on stderr and exit status 1,
never a traceback: every command body runs inside ``errors_as_exit``.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator
from zoneinfo import ZoneInfo

import click

from filterd import __version__
from filterd import config as config_mod
from filterd.errors import FilterdError


class Context:
    """What every command shares: the ``-c`` path, loaded on first use."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._config: config_mod.Config | None = None

    @property
    def config(self) -> config_mod.Config:
        if self._config is None:
            self._config = config_mod.load(self.config_path)
        return self._config

    def pipeline(self):
        from filterd import identify, pipeline

        leases = identify.LeaseTable()
        built = pipeline.build(self.config, leases=leases)
        db = self.config.data_path("storage", "path")
        if db.exists():
            with self.store() as store:
                leases.replace(identify.Lease(mac=r["mac"], ip=r["ip"], hostname=r["hostname"],
                                              user=r["user"], start=r["start"], expires=r["expires"])
                               for r in store.leases())
        return built

    def tz(self) -> ZoneInfo:
        from filterd import window

        path = self.config.path("timetable", "path")
        return window.load_timetable(path).tz if path else ZoneInfo("Europe/London")

    @contextmanager
    def store(self):
        from filterd.pipeline import data_dir_ready
        from filterd.record import Store

        data_dir_ready(self.config.data_dir)
        store = Store(self.config.data_path("storage", "path"), tz=self.tz()).open()
        try:
            yield store
        finally:
            store.close()


pass_ctx = click.make_pass_decorator(Context)


@contextmanager
def errors_as_exit() -> Iterator[None]:
    """Turn bad input into one line on stderr and exit status 1."""
    try:
        yield
    except FilterdError as exc:
        click.echo(f"filterd: {exc}", err=True)
        sys.exit(1)
    except (OSError, ValueError) as exc:
        click.echo(f"filterd: {exc}", err=True)
        sys.exit(1)


def parse_time(value: str | None, tz: ZoneInfo, option: str) -> datetime | None:
    """ISO-8601 from the command line; a time without an offset is school-local time."""
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise FilterdError(f"not an ISO-8601 time: {value!r} (e.g. 2026-11-25T10:15)", field=option) from None
    return at if at.tzinfo else at.replace(tzinfo=tz)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="filterd")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), envvar="FILTERD_CONFIG",
              help="Config file (default: the embedded config/filterd.toml).")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """filterd: a web-filter monitoring daemon for a school's internet gateway.

    \b
    Example:
        filterd -c /etc/filterd/filterd.toml run
    """
    ctx.obj = Context(config_path)


@cli.command()
@pass_ctx
def run(ctx: Context) -> None:
    """Run the daemon: the proxy, the filterd addon and the scheduler.

    \b
    Example:
        filterd run                    # embedded default: proxy on 127.0.0.1:8080
        filterd -c /etc/filterd/filterd.toml run
    """
    with errors_as_exit():
        from filterd import daemon

        daemon.run(ctx.config_path)


@cli.command()
@click.argument("urls", nargs=-1, required=True)
@click.option("--user", help="Who is asking (a users.csv name, as if authenticated).")
@click.option("--ip", help="The client address (for networks and leases).")
@click.option("--at", "at", help="When (ISO-8601; without an offset: school time). Default: now.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line (JSON Lines).")
@pass_ctx
def check(ctx: Context, urls: tuple[str, ...], user: str | None, ip: str | None, at: str | None,
          as_json: bool) -> None:
    """What filterd would do with each URL, without sending it; '-' reads URLs from stdin.

    \b
    Example:
        filterd check https://www.facebook.com/ --user jsmith --at 2026-11-25T10:15
        cat urls.txt | filterd check - --json
    """
    with errors_as_exit():
        pipeline = ctx.pipeline()
        tz = pipeline.timetable.tz if pipeline.timetable else ZoneInfo("Europe/London")
        when = parse_time(at, tz, "--at") or datetime.now(timezone.utc)
        failed = 0
        for url in _each_url(urls):
            try:
                verdict = pipeline.request(url, ip=ip, user=user, at=when)
            except ValueError as exc:
                failed += 1
                if as_json:
                    click.echo(json.dumps({"url": url, "error": str(exc)}))
                else:
                    click.echo(f"filterd: {url}: {exc}", err=True)
                continue
            row = {
                "url": url, "canonical_url": verdict.what.url, "host": verdict.what.host,
                "categories": list(verdict.what.categories),
                "matches": [{"list": m.list, "category": m.category, "entry": m.entry}
                            for m in verdict.what.matches],
                "user": verdict.who.user, "role": verdict.who.role, "ip": verdict.who.ip,
                "device": verdict.who.device, "time": verdict.time.astimezone(tz).isoformat(),
                "window": verdict.window, "action": verdict.action, "alert": verdict.alert,
                "rule": verdict.rule,
            }
            if as_json:
                click.echo(json.dumps(row))
            else:
                cats = ",".join(row["categories"]) or "-"
                click.echo(f"{row['action']:<5} {'ALERT ' if row['alert'] else ''}{url}  host={row['host']} "
                           f"categories={cats} rule={row['rule'] or '-'} user={row['user'] or '-'} "
                           f"role={row['role'] or '-'} window={row['window']}")
        if failed:
            sys.exit(1)


def _each_url(urls: tuple[str, ...]) -> Iterator[str]:
    for url in urls:
        if url == "-":
            for line in sys.stdin:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield line
        else:
            yield url


@cli.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("check")
@pass_ctx
def config_check(ctx: Context) -> None:
    """Validate the config and everything it points at (lists, users, timetable, rules).

    \b
    Example:
        filterd -c /etc/filterd/filterd.toml config check
    """
    with errors_as_exit():
        config = ctx.config
        pipeline = ctx.pipeline()
        skipped = sum(l.skipped for l in pipeline.classifier.lists)
        entries = sum(l.entries for l in pipeline.classifier.lists)
        click.echo(f"{config.file}: OK")
        click.echo(f"  lists: {len(config.lists)} ({entries} entries, {skipped} lines skipped"
                   f"{' - see filterd lists' if skipped else ''})")
        click.echo(f"  rules: {len(config.rules)}; timetable: {config.path('timetable', 'path') or 'none'}; "
                   f"users: {config.path('identity', 'users') or 'none'}")
        click.echo(f"  data folder: {config.data_dir}")


@cli.command("lists")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines.")
@click.option("--skips", is_flag=True, help="Also print every skipped line with its file and line number.")
@pass_ctx
def lists_cmd(ctx: Context, as_json: bool, skips: bool) -> None:
    """Per list: entries, skipped lines, category, source and load time.

    \b
    Example:
        filterd lists --skips
    """
    with errors_as_exit():
        pipeline = ctx.pipeline()
        for st in pipeline.classifier.lists:
            if as_json:
                click.echo(json.dumps({"name": st.name, "category": st.category, "source": str(st.source),
                                       "format": st.format, "entries": st.entries, "skipped": st.skipped,
                                       "load_seconds": round(st.load_seconds, 4)}))
            else:
                click.echo(f"{st.name:<32} {st.category:<20} {st.entries:>9} entries {st.skipped:>6} skipped "
                           f"{st.load_seconds * 1000:8.1f} ms  {st.format:<10} {st.source}")
            if skips:
                for skip in st.skips:
                    click.echo(f"  {skip.file}:{skip.line}: {skip.reason}: {skip.text!r}", err=as_json)


@cli.command()
@click.option("--since", help="From this time (ISO-8601).")
@click.option("--until", help="Up to this time (ISO-8601).")
@click.option("--user", help="Only this user.")
@click.option("--kind", help="block, alert, usage or bypass.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many rows.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines.")
@pass_ctx
def events(ctx: Context, since: str | None, until: str | None, user: str | None, kind: str | None,
           limit: int | None, as_json: bool) -> None:
    """What was recorded: blocks, alerts, bypass attempts and usage minutes.

    \b
    Example:
        filterd events --since 2026-11-23 --kind block
        filterd events --user jsmith --json | jq .host
    """
    with errors_as_exit():
        tz = ctx.tz()
        if kind is not None and kind not in ("block", "alert", "usage", "bypass"):
            raise FilterdError(f"unknown kind {kind!r} (block, alert, usage, bypass)", field="--kind")
        with ctx.store() as store:
            rows = store.events(since=parse_time(since, tz, "--since"), until=parse_time(until, tz, "--until"),
                                user=user, kind=kind, limit=limit)
        for row in rows:
            if as_json:
                click.echo(json.dumps(row, default=str))
            else:
                cats = ",".join(row.get("categories") or []) or "-"
                count = f" x{row['requests']}" if row.get("requests") and row["requests"] > 1 else ""
                click.echo(f"{row['time']}  {row['kind']:<6} {row['user'] or '-':<12} {row['ip'] or '-':<15} "
                           f"{row['action']:<5} {row['host']}{count}  [{cats}] rule={row['rule'] or '-'} "
                           f"window={row['window']}" + (f" ref={row['ref']}" if row.get("ref") else ""))


def main() -> None:
    """Console script entry point."""
    cli(prog_name="filterd")


@cli.group()
def timetable() -> None:
    """Look at the timetable as filterd reads it, and build staff free periods."""


@timetable.command("show")
@click.option("--week", required=True, help="ISO week, e.g. 2026-W48.")
@click.option("--user", help="Show this member of staff's windows (their free periods).")
@pass_ctx
def timetable_show(ctx: Context, week: str, user: str | None) -> None:
    """Print the week's grid of windows (contact, non_contact, out_of_hours).

    Compare it with the school's real timetable before go-live.

    \b
    Example:
        filterd timetable show --week 2026-W48 --user jsmith
    """
    with errors_as_exit():
        from filterd import window

        path = ctx.config.path("timetable", "path")
        if path is None:
            raise FilterdError("no timetable configured", file=ctx.config.file, field="timetable.path")
        click.echo(window.week_grid(window.load_timetable(path), week, user), nl=False)


@timetable.command("import")
@click.argument("csv_file", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="Write the [staff.*] tables here (default: stdout).")
@pass_ctx
def timetable_import(ctx: Context, csv_file: str, out: str | None) -> None:
    """Build the staff free periods from a timetable export (one row per lesson taught).

    The CSV has a header with the columns staff, day, period (and optionally week); every
    period a member of staff does not teach becomes one of their free periods. Paste the
    output into the timetable file.

    \b
    Example:
        filterd timetable import sims-export.csv --out staff.toml
    """
    with errors_as_exit():
        from filterd import identify, window

        tt_path = ctx.config.path("timetable", "path")
        tt = window.load_timetable(tt_path) if tt_path else None
        users = ctx.config.path("identity", "users")
        known = identify.load_users(users).usernames if users else None
        text = window.import_staff_csv(csv_file, tt, known_users=known)
        if out:
            Path(out).write_text(text, encoding="utf-8")
            click.echo(f"wrote {text.count('[staff.')} staff tables to {out}", err=True)
        else:
            click.echo(text, nl=False)


@cli.command()
@click.option("--interface", "-i", help="Capture on this interface (default: [sensor] interface).")
@click.option("--pcap", type=click.Path(exists=True, dir_okay=False), help="Replay a capture file and exit.")
@click.option("--stats", "show_stats", is_flag=True, help="Show the running sensor's counters and rates.")
@pass_ctx
def sensor(ctx: Context, interface: str | None, pcap: str | None, show_stats: bool) -> None:
    """The passive gateway sensor: DHCP leases and filter-bypass attempts (needs CAP_NET_RAW).

    \b
    Example:
        filterd sensor --interface eth1
        filterd sensor --pcap capture.pcap
        filterd sensor --stats
    """
    with errors_as_exit():
        from filterd import sensor as sensor_mod

        if show_stats:
            click.echo(sensor_mod.format_stats(sensor_mod.read_stats(sensor_mod.stats_path(ctx.config))))
            return
        iface = interface or ctx.config.get("sensor", "interface")
        if not pcap and not iface:
            raise FilterdError("give --interface or --pcap, or set [sensor] interface", field="--interface")
        while True:
            pipeline = ctx.pipeline()
            with ctx.store() as store:
                sens = sensor_mod.from_config(
                    ctx.config, pipeline.request, store,
                    is_doh=lambda h: "doh" in pipeline.classify(h, host_only=True).categories,
                    on_lease=pipeline.identifier.leases.add if pipeline.identifier.leases else None)
                if pcap:
                    click.echo(sensor_mod.format_stats(sens.replay(pcap)))
                    return
                if not sens.sniff(iface):
                    return
            ctx._config = None  # SIGHUP: read the config again and capture on


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="JSON Lines.")
@pass_ctx
def leases(ctx: Context, as_json: bool) -> None:
    """The DHCP leases the sensor has seen (mac, ip, hostname, user, seen).

    \b
    Example:
        filterd leases --json
    """
    with errors_as_exit():
        from filterd import sensor as sensor_mod

        tz = ctx.tz()
        with ctx.store() as store:
            rows = store.leases()
        if as_json:
            for row in rows:
                times = {k: datetime.fromtimestamp(row[k], tz).isoformat() if row.get(k) is not None else None
                         for k in ("start", "expires", "seen")}
                click.echo(json.dumps({**row, **times}, default=str))
        else:
            click.echo(sensor_mod.format_leases(rows), nl=False)


@cli.command()
@click.argument("dest", type=click.Path(dir_okay=False))
@pass_ctx
def backup(ctx: Context, dest: str) -> None:
    """Copy the event store to DEST while the daemon runs (SQLite's online backup).

    \b
    Example:
        filterd backup /var/backups/filterd-$(date +%F).db
    """
    with errors_as_exit():
        with ctx.store() as store:
            store.backup(Path(dest))
        click.echo(f"backed up {ctx.config.data_path('storage', 'path')} to {dest}")


@cli.command()
@click.option("--user", required=True, help="The person (users.csv name) the request is about.")
@click.option("--out", type=click.Path(file_okay=False), help="Folder for the JSON and CSV files (default: .).")
@pass_ctx
def export(ctx: Context, user: str, out: str | None) -> None:
    """Everything held about one person, as JSON and CSV (a subject access request).

    \b
    Example:
        filterd export --user jsmith --out sar-jsmith/
    """
    with errors_as_exit():
        import csv

        with ctx.store() as store:
            data = store.export_user(user)
        folder = Path(out or ".")
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"filterd-export-{user}"
        (folder / f"{stem}.json").write_text(json.dumps({"user": user, **data}, indent=2, default=str))
        written = [folder / f"{stem}.json"]
        for table, rows in data.items():
            if not rows:
                continue
            path = folder / f"{stem}-{table}.csv"
            with path.open("w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                                  for k, v in row.items()} for row in rows)
            written.append(path)
        counts = ", ".join(f"{len(rows)} {table}" for table, rows in data.items())
        click.echo(f"{user}: {counts}; wrote " + ", ".join(str(p) for p in written))


@cli.command()
@click.option("--user", required=True, help="The person whose records are deleted.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def purge(ctx: Context, user: str, yes: bool) -> None:
    """Delete everything held about one person (events, usage, alerts, leases).

    \b
    Example:
        filterd purge --user jsmith --yes
    """
    with errors_as_exit():
        if not yes:
            click.confirm(f"Delete every record about {user}?", abort=True)
        from filterd import jobs, report

        with ctx.store() as store:
            counts = store.purge_user(user)
        report.clear_cache(jobs.trend_cache(ctx.config))  # past weeks' totals name people too
        click.echo(f"{user}: deleted " + ", ".join(f"{n} {table}" for table, n in counts.items()))


@cli.command("alerts")
@click.option("--pending", is_flag=True, help="Only alerts not yet delivered.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines.")
@pass_ctx
def alerts_cmd(ctx: Context, pending: bool, as_json: bool) -> None:
    """ICT alerts and their delivery state (pending, sent, grouped, failed).

    \b
    Example:
        filterd alerts --pending
    """
    with errors_as_exit():
        tz = ctx.tz()
        with ctx.store() as store:
            rows = store.alerts(pending_only=pending)
        for row in rows:
            if as_json:
                click.echo(json.dumps(row, default=str))
                continue
            created = datetime.fromtimestamp(row["created"], tz).isoformat(timespec="seconds") \
                if isinstance(row.get("created"), (int, float)) else row.get("created")
            click.echo(f"{created}  {row['state']:<8} attempts={row.get('attempts', 0)} ref={row['event_ref']} "
                       f"{row.get('user') or '-'} {row.get('host') or '-'} rule={row.get('rule') or '-'}"
                       + (f"  last error: {row['last_error']}" if row.get("last_error") else ""))


@cli.group("mail")
def mail_group() -> None:
    """Check the mail set-up."""


@mail_group.command("test")
@click.option("--to", multiple=True, help="Recipient (default: [mail] ict).")
@pass_ctx
def mail_test_cmd(ctx: Context, to: tuple[str, ...]) -> None:
    """Send a test message and show how the SMTP conversation went (credentials hidden).

    \b
    Example:
        filterd mail test --to ict@school.example
    """
    with errors_as_exit():
        from filterd import jobs, mail

        config = ctx.config
        transcript = mail.mail_test(jobs.transport(config), config.get("mail", "from"),
                                    list(to) or config.get("mail", "ict"))
        click.echo(transcript, nl=False)
        if transcript.rstrip().splitlines()[-1].startswith("FAILED"):
            sys.exit(1)


@cli.group("import")
def import_group() -> None:
    """Replay logs from another proxy through filterd's stages."""


@import_group.command("squid-log")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--workers", type=click.IntRange(min=1), help="Processes deciding lines (default: one per CPU; "
              "use 1 on a busy gateway).")
@pass_ctx
def import_squid_log(ctx: Context, file: str, workers: int | None) -> None:
    """Replay a Squid native access.log through identify, classify, window, decide and record.

    Each line is judged at its own time; malformed lines are skipped and counted with their
    line numbers; importing the same file again (or after it grew) counts nothing twice.

    \b
    Example:
        filterd import squid-log /var/log/squid/access.log
        nice filterd import squid-log --workers 1 access.log.1
    """
    with errors_as_exit():
        from filterd import squidlog

        pipeline = ctx.pipeline()
        with ctx.store() as store:
            stats = squidlog.import_log(Path(file), pipeline.request, store, progress=True, tz=ctx.tz(),
                                        pipeline_factory=squidlog.ConfigPipeline(ctx.config_path),
                                        workers=workers)
        click.echo(stats.summary())


@cli.group("report")
def report_group() -> None:
    """The weekly usage report for pastoral staff."""


@report_group.command("weekly")
@click.option("--week", help="ISO week, e.g. 2026-W47 (default: last week).")
@click.option("--out", type=click.Path(file_okay=False), help="Folder to write into (default: the archive).")
@click.option("--send", is_flag=True, help="Also mail it to [mail] pastoral.")
@pass_ctx
def report_weekly(ctx: Context, week: str | None, out: str | None, send: bool) -> None:
    """Write weekly-YYYY-Www.html, .txt and .csv (and with --send, mail them).

    \b
    Example:
        filterd report weekly --week 2026-W47 --out /tmp/reports
    """
    with errors_as_exit():
        from filterd import identify, jobs, report

        config, tz = ctx.config, ctx.tz()
        week = week or report.previous_week(datetime.now(tz), tz)
        report.parse_week(week)
        users = config.path("identity", "users")
        directory = identify.load_users(users) if users else None
        db = config.data_path("storage", "path")
        if not db.exists():
            with ctx.store():
                pass  # an empty store: the report says there was nothing
        for path in jobs.weekly_report(config, db, directory, tz, week, send=send,
                                       out=Path(out) if out else None):
            click.echo(str(path))


@report_group.command("list")
@pass_ctx
def report_list(ctx: Context) -> None:
    """The archived weekly reports, newest first, and when each was mailed.

    \b
    Example:
        filterd report list
    """
    with errors_as_exit():
        from filterd import jobs, report

        for item in report.list_reports(jobs.archive_dir(ctx.config)):
            sent = f"sent {item.sent:%Y-%m-%d %H:%M}" if getattr(item, "sent", None) else "not sent"
            click.echo(f"{item.week}  {sent:<22} " + " ".join(str(Path(f).name) for f in item.files))
