"""The scheduler's jobs as the daemon wires them: list refresh, weekly report, digest, purge."""

from __future__ import annotations

import asyncio
import threading
from datetime import date, datetime, timedelta, timezone
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest

from filterd import alerts, config, jobs
from filterd.record import Store
from filterd.verdict import Verdict, What, Who

LONDON = ZoneInfo("Europe/London")


@pytest.fixture
def served(tmp_path: Path):
    """A local HTTP server for list downloads (127.0.0.1 only)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def make_config(tmp_path: Path, url: str) -> config.Config:
    (tmp_path / "terror").write_text("old.invalid\n")
    (tmp_path / "filterd.toml").write_text(
        f'[storage]\ndata_dir = "data"\n[[lists]]\ncategory = "terrorism"\npath = "terror"\nurl = "{url}"\n'
        '[[rules]]\nname = "terrorism"\ncategories = ["terrorism"]\naction = "block"\nalert = true\n')
    return config.load(tmp_path / "filterd.toml")


def test_refresh_swaps_a_good_list_and_keeps_the_old_one_for_a_bad_download(tmp_path: Path, served) -> None:
    root, base = served
    cfg = make_config(tmp_path, f"{base}/terror.txt")
    reloads: list[str] = []
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def reload(why: str) -> bool:
        reloads.append(why)
        return True

    daemon = SimpleNamespace(config=cfg, reload=reload, loop=loop)
    (root / "terror.txt").write_text("new.invalid\nalso-new.invalid\n")
    assert jobs.refresh_lists(daemon) is True
    assert (tmp_path / "terror").read_text() == "new.invalid\nalso-new.invalid\n"
    for _ in range(50):
        if reloads:
            break
        threading.Event().wait(0.02)
    assert reloads == ["lists refreshed"]

    (root / "terror.txt").write_bytes(b"\xff\xfe garbage <html>\n" * 20)  # an error page, not a list
    assert jobs.refresh_lists(daemon) is False
    assert (tmp_path / "terror").read_text() == "new.invalid\nalso-new.invalid\n"
    (root / "terror.txt").unlink()  # 404
    assert jobs.refresh_lists(daemon) is False
    loop.call_soon_threadsafe(loop.stop)


def verdict(at: datetime, **kw) -> Verdict:
    return Verdict(time=at, who=Who(ip="10.20.1.2", user="jdoe", role="pupil"),
                   what=What(host="bad.example", url="http://bad.example/", categories=("terrorism",)),
                   window="contact", action="block", alert=True, rule="terrorism", **kw)


def test_digest_lists_the_days_incidents_and_nothing_on_a_quiet_day(tmp_path: Path) -> None:
    with Store(tmp_path / "f.db").open() as store:
        day = date(2026, 11, 25)
        store.commit_incident(verdict(datetime(2026, 11, 25, 10, 15, tzinfo=timezone.utc))).result()
        store.commit_incident(verdict(datetime(2026, 11, 26, 10, 15, tzinfo=timezone.utc))).result()
        msg = alerts.build_digest(store, day, tz=LONDON, sender="f@school.example", to=["ict@school.example"],
                                  school="Hill")
        assert msg is not None and "1 block" in msg["Subject"]
        assert msg["Message-ID"] == "<digest-2026-11-25@school.example>"
        assert "bad.example" in msg.get_content() and "10:15:00" in msg.get_content()
        assert alerts.build_digest(store, date(2026, 11, 24), tz=LONDON, sender="f@school.example",
                                   to=["ict@school.example"], school="Hill") is None


def test_weekly_report_job_writes_archives_and_marks_sent(tmp_path: Path, served) -> None:
    cfg = make_config(tmp_path, "")
    db = cfg.data_path("storage", "path")
    cfg.data_dir.mkdir(parents=True)
    with Store(db).open() as store:
        store.commit_incident(verdict(datetime(2026, 11, 18, 10, 0, tzinfo=timezone.utc))).result()
    paths = jobs.weekly_report(cfg, db, None, LONDON, "2026-W47", send=True)
    assert sorted(p.suffix for p in paths) == [".csv", ".html", ".txt"]
    from filterd import report

    assert report.last_sent(jobs.archive_dir(cfg)) == "2026-W47"
    outbox = cfg.data_path("mail", "outbox") / "new"
    assert len(list(outbox.iterdir())) == 1  # the embedded default's maildir


def test_purge_deletes_what_is_older_than_the_retention(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "")
    cfg.data_dir.mkdir(parents=True)
    with Store(cfg.data_path("storage", "path")).open() as store:
        now = datetime.now(timezone.utc)
        old, recent, unsent = (verdict(now - timedelta(days=91), ), verdict(now - timedelta(days=89)),
                               verdict(now - timedelta(days=95)))
        for v in (old, recent, unsent):
            store.commit_incident(v).result()
        store.mark_alerts_sent([old.ref, recent.ref], message_id="<m@x>", sent=now.timestamp())
        counts = jobs.purge(SimpleNamespace(config=cfg, store=store))
        assert counts["events"] == 1 and counts["alerts"] == 1
        # an alert not yet delivered keeps its event: the outbox never loses one
        assert {e["ref"] for e in store.events(kind="block")} == {recent.ref, unsent.ref}
