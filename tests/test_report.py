"""The weekly report: a synthetic DST week with exact expected figures, the HTML checked as a
page, the mail received by a real SMTP server, and the page rendered by headless Chromium."""

from __future__ import annotations

import csv
import email
import email.policy
import io
import os
import shutil
import smtplib
import socket
import subprocess
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from filterd import report
from filterd.errors import FilterdError
from filterd.identify import load_users
from filterd.record import Store
from filterd.verdict import Verdict, What, Who

LONDON = ZoneInfo("Europe/London")
WEEK = "2026-W13"  # Mon 23 March to Sun 29 March 2026; British Summer Time starts on the Sunday
FB = ("social_networks", "social_media")
CHAT = ("chat", "social_media")
YT = ("audio-video", "social_media")
GROUPS = {"social_media": ["social_networks", "chat", "audio-video"]}
HOSTILE = '<script>alert("x")</script>'


def at(text: str) -> datetime:
    """A local (Europe/London) time, as the timetable would see it."""
    return datetime.fromisoformat(text).replace(tzinfo=LONDON)


def v(when: datetime, user: str | None, role: str, host: str, cats: tuple[str, ...],
      window: str, action: str = "log", *, alert: bool = False, rule: str | None = None,
      url: str | None = None, kind: str = "request", detail: str | None = None,
      ip: str = "10.20.3.4") -> Verdict:
    return Verdict(time=when, who=Who(ip=ip, user=user, role=role),
                   what=What(host=host, url=url or f"http://{host}/", categories=cats),
                   window=window, action=action, alert=alert, rule=rule, kind=kind, detail=detail)


def synthetic_week() -> list[Verdict]:
    """Every request of the test week, with the figures the tests expect written beside them."""
    out: list[Verdict] = []
    # alice (pupil, 9/9B): facebook in lesson time, 3 requests over 2 minutes
    for t in ("2026-03-23T10:00:05", "2026-03-23T10:00:40", "2026-03-23T10:01:10"):
        out.append(v(at(t), "alice", "pupil", "www.facebook.com", FB, "contact"))
    # ... and chat in the same minute as facebook (1 minute), and 2 at lunch (1 minute)
    out.append(v(at("2026-03-23T10:00:50"), "alice", "pupil", "chat.example", CHAT, "contact"))
    out.append(v(at("2026-03-24T12:30:00"), "alice", "pupil", "chat.example", CHAT, "non_contact"))
    out.append(v(at("2026-03-24T12:30:30"), "alice", "pupil", "chat.example", CHAT, "non_contact"))
    # alice blocked once (not social)
    out.append(v(at("2026-03-25T11:00:00"), "alice", "pupil", "adult.example", ("adult",),
                 "contact", "block", rule="adult",
                 url="http://adult.example/a?q=1"))
    # bob (staff): facebook in contact time, 5 requests in 5 minutes -> flagged (6.9)
    for i in range(5):
        out.append(v(at("2026-03-26T09:10:00") + timedelta(minutes=i), "bob", "staff",
                     "www.facebook.com", FB, "contact"))
    # bob on Sunday night after the clocks went forward (BST): still this week
    out.append(v(at("2026-03-29T23:30:00"), "bob", "staff", "www.facebook.com", FB, "out_of_hours"))
    # the very first second of the week counts, the last second of the week before does not
    out.append(v(at("2026-03-23T00:00:00"), "bob", "staff", "www.facebook.com", FB, "out_of_hours"))
    out.append(v(at("2026-03-22T23:59:59"), "bob", "staff", "www.facebook.com", FB, "out_of_hours"))
    # Monday 00:30 BST of the next week = Sunday 23:30 UTC: a 168-hour week would wrongly include it
    out.append(v(at("2026-03-30T00:30:00"), "bob", "staff", "www.facebook.com", FB, "out_of_hours"))
    # carol (pupil, 10/10A): a terrorism-list visit, blocked, alert to ICT; a URL with markup
    out.append(v(at("2026-03-27T14:00:00"), "carol", "pupil", "bad.example", ("terrorism",),
                 "contact", "block", alert=True, rule="terrorism",
                 url=f"http://bad.example/p?x={HOSTILE}"))
    # carol tries a web proxy (logged) and DNS-over-HTTPS (seen by the sensor)
    out.append(v(at("2026-03-27T14:05:00"), "carol", "pupil", "proxy.example", ("bypass",),
                 "contact", "log"))
    out.append(v(at("2026-03-27T14:06:00"), "carol", "pupil", "dns.google", (), "contact", "log",
                 kind="bypass", detail="DoH to 8.8.8.8:443"))
    # an unidentified device on the pupil network: youtube out of hours, 2 minutes
    out.append(v(at("2026-03-28T20:00:00"), None, "pupil", "www.youtube.com", YT, "out_of_hours",
                 ip="10.20.9.9"))
    out.append(v(at("2026-03-28T20:01:00"), None, "pupil", "www.youtube.com", YT, "out_of_hours",
                 ip="10.20.9.9"))
    # ... and back to the first minute on another host: stored after 20:01, still 2 minutes
    out.append(v(at("2026-03-28T20:00:30"), None, "pupil", "m.youtube.com", YT, "out_of_hours",
                 ip="10.20.9.9"))
    # a hostile user name and host (escaping), social, non-contact
    out.append(v(at("2026-03-24T13:00:00"), HOSTILE, "pupil", "x.example", FB, "non_contact"))
    # the four weeks before: alice 4, 3, 2, 1 facebook requests (one a minute), newest first
    for k, n in enumerate((4, 3, 2, 1), start=1):  # k weeks before
        for i in range(n):
            out.append(v(at("2026-03-23T10:00:00") - timedelta(weeks=k) + timedelta(minutes=i),
                         "alice", "pupil", "www.facebook.com", FB, "contact"))
    return out


EXPECTED_CSV = {
    # (user, category, window): (role, requests, blocked, active_minutes, year, form)
    ("alice", "social_media", "contact"): ("pupil", 4, 0, 2, "9", "9B"),
    ("alice", "social_networks", "contact"): ("pupil", 3, 0, 2, "9", "9B"),
    ("alice", "chat", "contact"): ("pupil", 1, 0, 1, "9", "9B"),
    ("alice", "chat", "non_contact"): ("pupil", 2, 0, 1, "9", "9B"),
    ("alice", "social_media", "non_contact"): ("pupil", 2, 0, 1, "9", "9B"),
    ("alice", "all_social_media", "contact"): ("pupil", 4, 0, 2, "9", "9B"),
    ("alice", "all_social_media", "non_contact"): ("pupil", 2, 0, 1, "9", "9B"),
    ("bob", "social_media", "contact"): ("staff", 5, 0, 5, "", ""),
    ("bob", "social_networks", "contact"): ("staff", 5, 0, 5, "", ""),
    ("bob", "social_media", "out_of_hours"): ("staff", 2, 0, 2, "", ""),
    ("bob", "social_networks", "out_of_hours"): ("staff", 2, 0, 2, "", ""),
    ("bob", "all_social_media", "contact"): ("staff", 5, 0, 5, "", ""),
    ("bob", "all_social_media", "out_of_hours"): ("staff", 2, 0, 2, "", ""),
    ("(unidentified)", "social_media", "out_of_hours"): ("pupil", 3, 0, 2, "", ""),
    ("(unidentified)", "audio-video", "out_of_hours"): ("pupil", 3, 0, 2, "", ""),
    ("(unidentified)", "all_social_media", "out_of_hours"): ("pupil", 3, 0, 2, "", ""),
    (HOSTILE, "social_media", "non_contact"): ("pupil", 1, 0, 1, "", ""),
    (HOSTILE, "social_networks", "non_contact"): ("pupil", 1, 0, 1, "", ""),
    (HOSTILE, "all_social_media", "non_contact"): ("pupil", 1, 0, 1, "", ""),
}


@pytest.fixture(scope="module")
def week_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report") / "filterd.db"
    store = Store(path).open()
    try:
        store.record_batch(synthetic_week(), source="import")
    finally:
        store.close()
    return path


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("users") / "users.csv"
    path.write_text("username,role,email,year,form\n"
                    "alice,pupil,alice@school.example,9,9B\n"
                    "carol,pupil,carol@school.example,10,10A\n"
                    "bob,staff,bob@school.example,,\n", encoding="utf-8")
    return load_users(path)


@pytest.fixture(scope="module")
def weekly(week_db: Path, users) -> report.WeeklyReport:
    return report.build_weekly(week_db, WEEK, tz=LONDON, directory=users,
                               school="St Example's <School>", social_categories=["social_media"],
                               bypass_categories=["bypass"], groups=GROUPS,
                               now=datetime(2026, 3, 30, 7, 0, tzinfo=timezone.utc))


# --- weeks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("week,hours", [("2026-W13", 167), ("2026-W43", 169), ("2026-W44", 168),
                                        ("2026-W12", 168), ("2020-W53", 168)])
def test_week_length_follows_the_clocks(week: str, hours: int) -> None:
    start, end = report.week_bounds(week, LONDON)
    assert (start.weekday(), start.hour, end.weekday(), end.hour) == (0, 0, 0, 0)
    assert round((end.timestamp() - start.timestamp()) / 3600) == hours


@pytest.mark.parametrize("now,expected", [
    ("2026-03-30T07:00:00+01:00", "2026-W13"),  # Monday morning job
    ("2026-03-29T23:30:00+00:00", "2026-W13"),  # 00:30 BST on Monday already
    ("2026-03-29T22:30:00+00:00", "2026-W12"),  # 23:30 BST on Sunday: still in W13
    ("2027-01-04T06:00:00+00:00", "2026-W53"),
])
def test_previous_week(now: str, expected: str) -> None:
    assert report.previous_week(datetime.fromisoformat(now), LONDON) == expected


@pytest.mark.parametrize("bad", ["2026-13", "2026-W54", "2025-W53", "W13", "2026-W1", ""])
def test_bad_week_is_a_user_error(bad: str) -> None:
    with pytest.raises(FilterdError) as err:
        report.parse_week(bad)
    assert err.value.field == "--week"


# --- figures ----------------------------------------------------------------------------------

def test_csv_figures_are_exact(weekly: report.WeeklyReport, tmp_path: Path) -> None:
    paths = weekly.write(tmp_path)
    assert [p.name for p in paths] == [f"weekly-{WEEK}.html", f"weekly-{WEEK}.txt", f"weekly-{WEEK}.csv"]
    text = (tmp_path / f"weekly-{WEEK}.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert text.splitlines()[0] == "user,role,category,window,requests,blocked,active_minutes,year,form"
    got = {(r["user"], r["category"], r["window"]):
           (r["role"], int(r["requests"]), int(r["blocked"]), int(r["active_minutes"]), r["year"], r["form"])
           for r in rows}
    assert len(rows) == len(got)  # no duplicates
    assert got == EXPECTED_CSV


def test_summary_figures(weekly: report.WeeklyReport) -> None:
    assert weekly.hours == 167
    h = weekly.headline
    assert h == {"social_users": 4, "social_requests": 4 + 2 + 7 + 3 + 1,
                 "social_minutes": 3 + 7 + 2 + 1, "contact_minutes": 2 + 5, "staff_flags": 1,
                 "blocks": 2, "alerts": 1, "bypass": 2}
    assert [u.user for u in weekly.flagged] == ["bob"]
    assert [(i.user, i.url) for i in weekly.alerts] == [("carol", f"http://bad.example/p?x={HOSTILE}")]
    assert sorted(i.user for i in weekly.blocks) == ["alice", "carol"]
    assert [(i.user, i.host) for i in weekly.bypass] == [("carol", "proxy.example"), ("carol", "dns.google")]
    alice = next(u for u in weekly.users if u.user == "alice")
    assert alice.previous == [1, 2, 3, 4]  # oldest first
    assert [c.requests for c in weekly.trend[report.ALL_SOCIAL]] == [1, 2, 3, 5, 17]
    assert [c.active_minutes for c in weekly.trend["chat"]] == [0, 0, 0, 0, 2]
    # active minutes only for the reported week (older weeks: requests)
    assert [c.active_minutes for c in weekly.trend[report.ALL_SOCIAL]] == [0, 0, 0, 0, 13]
    assert weekly.top_categories[0] == ("social_media", 17, 0)
    assert weekly.top_hosts[0][:2] == ("www.facebook.com", 10)
    # grouping: pupils by year and form first, then staff
    assert [s.title for s in weekly.sections] == ["Pupil · Year 9 · form 9B", "Pupil · Year 10 · form 10A",
                                                  "Pupil", "Staff"]


def test_list_categories_without_a_group(week_db: Path) -> None:
    """No category-map group: each list category counted on its own, "all" is their union."""
    r = report.build_weekly(week_db, WEEK, tz=LONDON, social_categories=["chat", "social_networks"],
                            bypass_categories=[])
    got = {(row["user"], row["category"], row["window"]):
           (int(row["requests"]), int(row["active_minutes"])) for row in r.csv_rows()}
    assert got == {
        ("alice", "social_networks", "contact"): (3, 2), ("alice", "chat", "contact"): (1, 1),
        ("alice", "all_social_media", "contact"): (4, 2),
        ("alice", "chat", "non_contact"): (2, 1), ("alice", "all_social_media", "non_contact"): (2, 1),
        ("bob", "social_networks", "contact"): (5, 5), ("bob", "all_social_media", "contact"): (5, 5),
        ("bob", "social_networks", "out_of_hours"): (2, 2),
        ("bob", "all_social_media", "out_of_hours"): (2, 2),
        (HOSTILE, "social_networks", "non_contact"): (1, 1),
        (HOSTILE, "all_social_media", "non_contact"): (1, 1),
    }
    assert [c.requests for c in r.trend["social_networks"]] == [1, 2, 3, 5, 11]
    assert r.bypass == [i for i in r.bypass if i.kind == "bypass"] and len(r.bypass) == 1  # the sensor's


def _minute_way(db: Path, lo_hi: tuple[int, int]) -> str:
    """How the reported week's active minutes were counted (rowid, recount or ordered)."""
    conn = report.connect_ro(db)
    try:
        reader = report._Reader(conn, ["social_media", *GROUPS["social_media"]], ["bypass"])
        reader.reported_week(*lo_hi)
        return reader.way
    finally:
        conn.close()


def _figures(r: report.WeeklyReport) -> tuple:
    return (r.csv_text(), {c: [(x.requests, x.blocked, x.active_minutes) for x in cells]
                           for c, cells in r.trend.items()},
            [(u.user, u.role, u.previous) for u in r.users], r.top_categories, r.top_hosts)


@pytest.mark.parametrize("late", [True, False])
def test_active_minutes_whichever_way_they_are_counted(tmp_path: Path, late: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows in rowid order; users with a row stored late counted again; the week in minute
    order: the same figures. ``late``: the test week as it is (a row stored after a later
    minute of the same user); else without that row, stored in time order."""
    verdicts = sorted(synthetic_week(), key=lambda x: x.time)
    if not late:
        verdicts = [x for x in verdicts if x.what.host != "m.youtube.com"]
    else:  # the late row last, after everything (an import, a late write)
        verdicts = ([x for x in verdicts if x.what.host != "m.youtube.com"]
                    + [x for x in verdicts if x.what.host == "m.youtube.com"])
    db = tmp_path / "filterd.db"
    store = Store(db).open()
    try:
        store.record_batch(verdicts, source="import")
    finally:
        store.close()
    start, end = report.week_bounds(WEEK, LONDON)
    lo_hi = (int(start.timestamp()) // 60, int(end.timestamp()) // 60)

    def build() -> report.WeeklyReport:
        return report.build_weekly(db, WEEK, tz=LONDON, social_categories=["social_media"],
                                   bypass_categories=["bypass"], groups=GROUPS,
                                   now=datetime(2026, 3, 30, 7, 0, tzinfo=timezone.utc))

    fast = build()
    assert _minute_way(db, lo_hi) == ("recount" if late else "rowid")
    unidentified = next(u for u in fast.users if u.user == report.UNIDENTIFIED)
    assert unidentified.social_in("out_of_hours").active_minutes == 2
    assert unidentified.social_in("out_of_hours").requests == (3 if late else 2)
    monkeypatch.setattr(report, "_MAX_RECOUNT", 0)  # too many late users: all in minute order
    assert _minute_way(db, lo_hi) == ("ordered" if late else "rowid")
    assert _figures(build()) == _figures(fast)
    monkeypatch.setattr(report._Reader, "ordered", True)
    assert _minute_way(db, lo_hi) == "ordered"
    assert _figures(build()) == _figures(fast)


def test_week_span_is_exact(week_db: Path) -> None:
    """The rowid range of a week holds every row of it, however the rows were stored."""
    conn = report.connect_ro(week_db)
    try:
        reader = report._Reader(conn, ["social_media"], [])
        for k in range(-6, 2):
            start, end = report.week_bounds(report.shift_week(WEEK, k), LONDON)
            lo, hi = int(start.timestamp()) // 60, int(end.timestamp()) // 60
            a, b = conn.execute("SELECT min(rowid), max(rowid) FROM usage "
                                "WHERE minute >= ? AND minute < ?", (lo, hi)).fetchone()
            assert reader.span(lo, hi) == (None if a is None else (a, b))
    finally:
        conn.close()


def test_empty_week_renders(week_db: Path) -> None:
    r = report.build_weekly(week_db, "2025-W01", tz=LONDON, school="S")
    assert r.users == [] and r.csv_text() == ",".join(report.CSV_COLUMNS) + "\r\n"
    assert "None this week" in r.render("html") and "None this week" in r.render("txt")


def test_database_is_opened_read_only(week_db: Path) -> None:
    conn = report.connect_ro(week_db)
    try:
        with pytest.raises(Exception):
            conn.execute("DELETE FROM usage")
    finally:
        conn.close()
    with pytest.raises(FilterdError):
        report.connect_ro(week_db.parent / "missing.db")


# --- the page ---------------------------------------------------------------------------------

class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.title = ""
        self.text: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.extend(attrs)
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        self.text.append(data)


def test_html_page(weekly: report.WeeklyReport) -> None:
    html = weekly.render("html")
    page = Page()
    page.feed(html)
    text = " ".join(" ".join(page.text).split())
    assert page.title == "St Example's <School> · Internet use · week 2026-W13"
    assert "script" not in page.tags and "link" not in page.tags and "img" not in page.tags
    for name, value in page.attrs:
        assert not name.startswith("on"), name
        if name in ("src", "href"):
            pytest.fail(f"external reference {name}={value}")
    assert "url(" not in html and "@import" not in html
    # the hostile name and URL are text, not markup
    assert HOSTILE in text and "&lt;script&gt;" in html and "<script>" not in html
    assert "167 hours" in text
    assert "4 people used social media" in text
    assert "1 staff used social media in contact time (6.9)" in text
    assert "1 terrorism / extremism alerts (8.3)" in text
    assert "2 attempts to get round the filter" in text
    assert report.ACTIVE_MINUTES_DEFINITION in text
    # full URLs only for incidents: the social media use shows hosts/categories, never a path
    assert "http://www.facebook.com/" not in html and "http://adult.example/a?q=1" in html


def test_text_version(weekly: report.WeeklyReport) -> None:
    txt = weekly.render("txt")
    assert "<" not in txt.replace(HOSTILE, "").replace("St Example's <School>", "")
    assert "Staff social media in contact (6.9) . 1" in txt
    assert max(len(line) for line in txt.splitlines() if "http" not in line and HOSTILE not in line) <= 100
    assert "DoH to 8.8.8.8:443" in txt


def test_archive_listing(weekly: report.WeeklyReport, tmp_path: Path) -> None:
    weekly.write(tmp_path)
    (tmp_path / "weekly-2026-W12.csv").write_text("x")
    (tmp_path / "notes.txt").write_text("x")
    listed = report.list_reports(tmp_path)
    assert [a.week for a in listed] == ["2026-W13", "2026-W12"]
    assert [p.suffix for p in listed[0].files] == [".html", ".txt", ".csv"]
    assert report.list_reports(tmp_path / "none") == []
    assert report.last_sent(tmp_path) is None and listed[0].sent is None
    when = datetime(2026, 3, 30, 7, 0, 5, tzinfo=timezone.utc)
    report.mark_sent(tmp_path, "2026-W13", message_id="<m@x>", to=["pastoral@school.example"], at=when)
    report.mark_sent(tmp_path, "2026-W12", message_id="<n@x>", to=["p@x"], at=when)
    assert report.last_sent(tmp_path) == "2026-W13"
    assert (report.list_reports(tmp_path)[0].sent, report.list_reports(tmp_path)[0].sent_to) == \
        (when, ("pastoral@school.example",))


# --- the mail ---------------------------------------------------------------------------------

def test_email_received_by_smtp_server(weekly: report.WeeklyReport) -> None:
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Message

    received: list[email.message.Message] = []

    class Keep(Message):
        def handle_message(self, message: email.message.Message) -> None:
            received.append(message)

    with socket.socket() as probe:  # a free port on loopback
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(Keep(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        msg = weekly.email("filterd@school.example", ["pastoral@school.example"])
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.send_message(msg)
    finally:
        controller.stop()
    assert len(received) == 1
    got = email.message_from_bytes(received[0].as_bytes(), policy=email.policy.default)
    assert got["To"] == "pastoral@school.example"
    assert "2026-W13" in got["Subject"]
    assert got.get_content_type() == "multipart/mixed"
    plain = got.get_body(("plain",)).get_content()
    html = got.get_body(("html",)).get_content()
    assert "SUMMARY" in plain and "<!DOCTYPE html>" in html
    attachments = list(got.iter_attachments())
    assert [a.get_filename() for a in attachments] == ["weekly-2026-W13.csv"]
    data = attachments[0].get_content()
    data = data.decode() if isinstance(data, bytes) else data
    assert data.startswith("user,role,category,window,requests,blocked,active_minutes")


# --- rendered by a real browser -------------------------------------------------------------

@pytest.mark.slow
def test_chromium_screenshot_and_pdf(weekly: report.WeeklyReport, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Debian's chromium is needed (apt-get install -y chromium)")
    html = weekly.write(tmp_path / "out")[0]
    png, pdf = tmp_path / "weekly.png", tmp_path / "weekly.pdf"
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    for extra in ([f"--screenshot={png}", "--window-size=1200,2000"],
                  [f"--print-to-pdf={pdf}", "--no-pdf-header-footer"]):
        subprocess.run([*base, *extra, html.as_uri()], check=True, timeout=90,
                       capture_output=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 10_000
    keep = os.environ.get("FILTERD_KEEP_SCREENSHOTS")  # a folder to copy them to, to look at
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(keep) / "weekly.png")
        shutil.copy(pdf, Path(keep) / "weekly.pdf")


@pytest.mark.parametrize("value,expected", [
    ("=HYPERLINK(\"http://evil\")", "'=HYPERLINK(\"http://evil\")"), ("+1", "'+1"), ("-x", "'-x"),
    ("@sum", "'@sum"), ("alice", "alice"), (12, 12), ("", ""),
])
def test_csv_cells_cannot_become_formulas(value: object, expected: object) -> None:
    assert report._csv_safe(value) == expected


def test_cached_earlier_weeks_give_the_same_report_and_follow_imports(tmp_path: Path, users) -> None:
    """The trend cache: a second build reads the earlier weeks from it; an import into a past
    week moves the cache key, so the figures are read again, exactly."""
    db = tmp_path / "filterd.db"
    earlier = [v(at("2026-03-10T10:00:00"), "alice", "pupil", "www.facebook.com", FB, "contact"),
               v(at("2026-03-17T10:00:00"), "carol", "pupil", "chat.example", CHAT, "contact")]
    with Store(db).open() as store:
        store.record_batch([*synthetic_week(), *earlier], source="import")
    cache = tmp_path / "cache"

    def build(cache_dir):
        return report.build_weekly(db, WEEK, tz=LONDON, directory=users, social_categories=["social_media"],
                                   groups=GROUPS, cache_dir=cache_dir)

    plain = build(None)
    first = build(cache)
    assert sorted(p.name for p in cache.iterdir()) == [f"trend-2026-W{n:02d}.json" for n in (9, 10, 11, 12)]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in cache.iterdir())
    second = build(cache)
    assert plain.csv_text() == first.csv_text() == second.csv_text()
    assert plain.trend == first.trend == second.trend
    w11 = plain.trend["social_media"][2].requests

    with Store(db).open() as store:  # a backfill into W11
        store.record_batch([v(at("2026-03-11T10:00:00"), "alice", "pupil", "www.facebook.com", FB, "contact")],
                           source="import", import_source="x", import_path="x", import_offset=1, import_lines=1)
    after = build(cache)
    assert after.trend["social_media"][2].requests == w11 + 1
    assert after.trend == build(None).trend
    assert report.clear_cache(cache) == 4 and not list(cache.glob("trend-*.json"))
