"""The weekly usage report for pastoral staff (``filterd report weekly``, the Monday mail).

It reads what ``record`` wrote (never the live flow) through a read-only SQLite connection and
answers the questions the Social Media Policy asks of a week:

- who used social media (policy 2.3), how much, and when: contact time, non-contact time
  (breaks, lunch, a member of staff's free periods) or out of hours;
- which members of staff used it in contact time (6.9);
- what was blocked, which terrorism/extremism alerts went to ICT (8.3), and who tried to get
  round the filter;
- this week against the four before it; the school-wide top categories and hosts.

The week is the ISO week in the school's time zone: Monday 00:00 local time to the next Monday
00:00, so a week in which the clocks change has 167 or 169 hours.

**Active minutes**: a minute (hh:mm on the clock) in which that user made at least one request
in that category and window. The usage table stores requests per minute, so the count is exact;
a user active in two categories in the same minute counts that minute once in each, and once in
"all social media".

This module and ``record`` are the only ones with SQL; here it is read-only.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone, tzinfo
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import jinja2

from filterd import __version__
from filterd.errors import FilterdError
from filterd.resources import shipped
from filterd.verdict import WINDOWS

log = logging.getLogger("filterd.report")

#: Readable names of the windows, in the order the report shows them.
WINDOW_LABELS = {"contact": "Contact time", "non_contact": "Non-contact", "out_of_hours": "Out of hours"}
#: The pseudo-category of a user's social media use in all its categories together.
ALL_SOCIAL = "all_social_media"
#: The key of traffic no one is known for (no login, no lease, no directory entry).
UNIDENTIFIED = "(unidentified)"
ACTIVE_MINUTES_DEFINITION = (
    "Active minutes: the number of clock minutes in which the user made at least one request "
    "in that category and window (exact: filterd stores requests per minute). A minute with "
    "requests in two categories counts once in each, and once in 'all social media'."
)
CSV_COLUMNS = ("user", "role", "category", "window", "requests", "blocked", "active_minutes",
               "year", "form")
_WEEK_RE = re.compile(r"^(\d{4})-W(\d{2})$")
#: How many incidents (with full URLs) the HTML and text list; the rest are counted.
MAX_INCIDENTS_LISTED = 200
TOP_N = 12


# ---------------------------------------------------------------------------------------------
# Weeks


def parse_week(week: str) -> tuple[int, int]:
    """``"2026-W13"`` -> ``(2026, 13)``; FilterdError (field ``--week``) for anything else."""
    m = _WEEK_RE.match(week.strip())
    if not m:
        raise FilterdError(f"{week!r} is not an ISO week like 2026-W13", field="--week")
    year, number = int(m.group(1)), int(m.group(2))
    try:
        date.fromisocalendar(year, number, 1)
    except ValueError:
        raise FilterdError(f"{year} has no ISO week {number}", field="--week") from None
    return year, number


def week_bounds(week: str, tz: tzinfo) -> tuple[datetime, datetime]:
    """Monday 00:00 local and the next Monday 00:00 local (aware; subtract via timestamps)."""
    year, number = parse_week(week)
    monday = date.fromisocalendar(year, number, 1)
    nxt = monday + timedelta(days=7)
    return (datetime(monday.year, monday.month, monday.day, tzinfo=tz),
            datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz))


def week_of(moment: datetime, tz: tzinfo) -> str:
    """The ISO week (``YYYY-Www``) that ``moment`` falls in, in the school's time zone."""
    year, number, _ = moment.astimezone(tz).isocalendar()
    return f"{year}-W{number:02d}"


def shift_week(week: str, weeks: int) -> str:
    """The ISO week ``weeks`` weeks after (negative: before) ``week``."""
    year, number = parse_week(week)
    monday = date.fromisocalendar(year, number, 1) + timedelta(weeks=weeks)
    y, n, _ = monday.isocalendar()
    return f"{y}-W{n:02d}"


def previous_week(now: datetime, tz: tzinfo) -> str:
    """The last complete ISO week before ``now`` — what the Monday-morning job reports."""
    return shift_week(week_of(now, tz), -1)


# ---------------------------------------------------------------------------------------------
# The report's values


@dataclass(slots=True)
class Cell:
    """Requests, blocked requests and active minutes of one user/category/window."""

    requests: int = 0
    blocked: int = 0
    active_minutes: int = 0


@dataclass(slots=True)
class Incident:
    """A block, alert or bypass attempt, with its time (incidents may show full URLs)."""

    time: datetime
    kind: str  # block | alert | bypass
    user: str
    role: str
    ip: str
    host: str
    url: str | None
    categories: tuple[str, ...]
    window: str
    action: str
    rule: str | None
    alert: bool
    ref: str
    detail: str | None


@dataclass(slots=True)
class UserWeek:
    """One person's week: social media by category and window, incidents, the trend."""

    user: str
    role: str
    year: str | None = None
    form: str | None = None
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)  # (category, window)
    social: dict[str, Cell] = field(default_factory=dict)  # window -> all social media
    blocks: int = 0
    alerts: int = 0
    bypass: int = 0
    previous: list[int] = field(default_factory=list)  # social requests, 4 weeks before, oldest first
    flagged: bool = False  # staff social media in contact time (policy 6.9)

    @property
    def social_requests(self) -> int:
        return sum(c.requests for c in self.social.values())

    @property
    def social_minutes(self) -> int:
        return sum(c.active_minutes for c in self.social.values())

    def social_in(self, window: str) -> Cell:
        return self.social.get(window) or Cell()

    @property
    def previous_average(self) -> float:
        return sum(self.previous) / len(self.previous) if self.previous else 0.0

    @property
    def categories(self) -> list[tuple[str, int, int]]:
        """(category, requests, active minutes over all windows), busiest first."""
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for (category, _window), cell in self.cells.items():
            totals[category][0] += cell.requests
            totals[category][1] += cell.active_minutes
        return sorted(((c, r, m) for c, (r, m) in totals.items()), key=lambda t: (-t[1], t[0]))


@dataclass(slots=True)
class Section:
    """Users of one role, year and form (year/form None when users.csv has none)."""

    role: str
    year: str | None
    form: str | None
    users: list[UserWeek]

    @property
    def title(self) -> str:
        parts = [self.role.replace("_", " ").capitalize() if self.role else "Unknown role"]
        if self.year:
            parts.append(f"Year {self.year}" if self.year.isdigit() else self.year)
        if self.form:
            parts.append(f"form {self.form}")
        return " · ".join(parts)


@dataclass(slots=True)
class WeeklyReport:
    """Everything the HTML, text and CSV show; built by :func:`build_weekly`."""

    school: str
    week: str
    start: datetime
    end: datetime
    generated: datetime
    social_categories: tuple[str, ...]
    users: list[UserWeek]
    sections: list[Section]
    alerts: list[Incident]
    blocks: list[Incident]
    bypass: list[Incident]
    incident_total: int
    trend_weeks: list[str]  # the four weeks before, oldest first, then this week
    trend: dict[str, list[Cell]]  # category (and ALL_SOCIAL) -> one Cell per trend week
    top_categories: list[tuple[str, int, int]]  # (category, requests, blocked)
    top_hosts: list[tuple[str, int, int, int]]  # (host, requests, blocked, users)
    groups: tuple[str, ...] = ()  # social categories that are category-map groups (shown as totals)
    definition: str = ACTIVE_MINUTES_DEFINITION
    version: str = __version__

    def parts(self, user: UserWeek) -> list[tuple[str, int, int]]:
        """A user's social categories without the group totals (which repeat the parts)."""
        shown = [c for c in user.categories if c[0] not in self.groups]
        return shown or user.categories

    @property
    def trend_rows(self) -> list[tuple[str, list[Cell]]]:
        """Trend per category; a group total is left out (the "all social media" row has it)."""
        return [(c, cells) for c, cells in self.trend.items() if c not in self.groups]

    @property
    def hours(self) -> int:
        """Length of the week in hours: 168, or 167/169 when the clocks change."""
        return round((self.end.timestamp() - self.start.timestamp()) / 3600)

    @property
    def zone(self) -> str:
        """The time zone's name (``Europe/London``) for the footer."""
        return str(getattr(self.start.tzinfo, "key", None) or self.start.tzname())

    @property
    def last_day(self) -> datetime:
        return self.end - timedelta(days=1)

    @property
    def flagged(self) -> list[UserWeek]:
        return [u for u in self.users if u.flagged]

    @property
    def social_users(self) -> list[UserWeek]:
        return [u for u in self.users if u.social_requests]

    @property
    def headline(self) -> dict[str, int]:
        social = self.social_users
        return {
            "social_users": len(social),
            "social_requests": sum(u.social_requests for u in social),
            "social_minutes": sum(u.social_minutes for u in social),
            "contact_minutes": sum(u.social_in("contact").active_minutes for u in social),
            "staff_flags": len(self.flagged),
            "blocks": sum(u.blocks for u in self.users),
            "alerts": len(self.alerts),
            "bypass": len(self.bypass),
        }

    def csv_rows(self) -> list[dict[str, Any]]:
        """One row per user, social category and window with any requests (CSV_COLUMNS)."""
        rows = []
        for u in self.users:
            for category in (*self.social_categories, ALL_SOCIAL):
                for window in WINDOWS:
                    cell = u.social.get(window) if category == ALL_SOCIAL else u.cells.get((category, window))
                    if not cell or not (cell.requests or cell.blocked):
                        continue
                    rows.append({"user": u.user, "role": u.role, "category": category,
                                 "window": window, "requests": cell.requests,
                                 "blocked": cell.blocked, "active_minutes": cell.active_minutes,
                                 "year": u.year or "", "form": u.form or ""})
        return rows

    def csv_text(self) -> str:
        """The CSV file: a header, then :meth:`csv_rows` (formula-looking cells neutralised)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\r\n")
        writer.writeheader()
        for row in self.csv_rows():
            writer.writerow({k: _csv_safe(v) for k, v in row.items()})
        return buf.getvalue()

    def render(self, kind: str) -> str:
        """The ``html`` or ``txt`` page from ``reports/weekly.<kind>.j2``."""
        return _environment().get_template(f"weekly.{kind}.j2").render(r=self, WINDOWS=WINDOWS,
                                                                          WINDOW_LABELS=WINDOW_LABELS,
                                                                          ALL_SOCIAL=ALL_SOCIAL)

    @property
    def basename(self) -> str:
        return f"weekly-{self.week}"

    def write(self, out_dir: Path) -> list[Path]:
        """Write ``weekly-YYYY-Www.html``, ``.txt`` and ``.csv`` (atomically) into ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for ext, text in (("html", self.render("html")), ("txt", self.render("txt")),
                          ("csv", self.csv_text())):
            path = out_dir / f"{self.basename}.{ext}"
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text, encoding="utf-8", newline="")
            os.replace(tmp, path)
            written.append(path)
        return written

    def email(self, sender: str, to: Sequence[str]) -> EmailMessage:
        """The Monday mail: text as plain, the HTML page inline as its alternative, CSV attached."""
        msg = EmailMessage()
        msg["Subject"] = f"{self.school}: weekly internet use {self.week}"
        msg["From"] = sender
        msg["To"] = ", ".join(to)
        msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
        msg.set_content(self.render("txt"))
        msg.add_alternative(self.render("html"), subtype="html")
        msg.add_attachment(self.csv_text().encode("utf-8"), maintype="text", subtype="csv",
                           filename=f"{self.basename}.csv")
        return msg


def _csv_safe(value: Any) -> Any:
    """Keep spreadsheet programs from running a user name such as ``=HYPERLINK(...)``."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(shipped("reports"))),
        autoescape=lambda name: bool(name) and name.endswith((".html.j2", ".html")),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["pct"] = lambda value, top: 0 if not top else min(100, round(100 * value / top))
    env.filters["hm"] = _minutes_text
    env.filters["label"] = lambda name: str(name).replace("_", " ")
    return env


def _minutes_text(minutes: int) -> str:
    """``135`` -> ``2 h 15 min``: how pastoral staff read a time."""
    minutes = int(minutes)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


# ---------------------------------------------------------------------------------------------
# Reading the store (read-only)


def connect_ro(db_path: Path) -> sqlite3.Connection:
    """A read-only connection (``mode=ro``): the report can never change the evidence.

    Only its private in-memory TEMP tables are writable.
    """
    db_path = Path(db_path)
    if not db_path.is_file():
        raise FilterdError("no database here yet (has filterd recorded anything?)", file=db_path)
    conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True,
                           check_same_thread=False)
    conn.execute("PRAGMA temp_store = MEMORY")
    conn.execute("PRAGMA cache_size = -65536")
    return conn


def _like_any(column: str, categories: Sequence[str]) -> tuple[str, list[str]]:
    """An exact, fast test "the JSON list in ``column`` holds one of ``categories``".

    It looks for the quoted JSON string (``"chat"``) as a substring, which cannot match inside
    another element (``"chatroom"``, or an escaped quote in a name): cheaper than json_each
    over ten million rows, and case-sensitive, unlike LIKE.
    """
    if not categories:
        return "0", []
    clause = "(" + " OR ".join(f"instr({column}, ?) > 0" for _ in categories) + ")"
    return clause, [json.dumps(c) for c in categories]


_TEMP_TABLES = """
CREATE TEMP TABLE catmask (cats TEXT PRIMARY KEY, mask INTEGER) WITHOUT ROWID;
CREATE TEMP TABLE usercats (user TEXT, role TEXT, categories TEXT, requests INTEGER, blocked INTEGER,
    PRIMARY KEY (user, role, categories)) WITHOUT ROWID;
CREATE TEMP TABLE hostcats (host TEXT, categories TEXT, requests INTEGER, blocked INTEGER,
    PRIMARY KEY (host, categories)) WITHOUT ROWID;
"""

_UPSERT_COUNTS = """ON CONFLICT DO UPDATE SET requests = requests + excluded.requests,
    blocked = blocked + excluded.blocked"""
#: Threads (each with its own read-only connection) for the four earlier weeks of the trend.
_TREND_THREADS = 2
#: Above this many users with minutes out of rowid order, the week is read again in minute order.
_MAX_RECOUNT = 200


class _Reader:
    """The report's queries, over one read-only snapshot of the store.

    Why it is shaped like this (10 million usage rows in seconds): SQLite groups by sorting,
    and ``json_each``, ``instr``/``LIKE`` on every row and ``count(DISTINCT ...)`` per group are
    what cost at this size. Instead each figure is one pass that upserts into a small in-memory
    TEMP table:

    - per week, one pass over the week's rowid range (rows are appended in time order, so the
      range is tight; the ``minute`` test keeps it exact when it is not) totals the requests per
      categories JSON (and per host, for the reported week); each distinct categories JSON is
      then mapped once, in Python, to the social categories in it (``catmask``: one bit per
      social category);
    - social media cells: one row per user, role and window (``wcells``) holds "any social
      media" and, in columns, each social category; a cell's active minutes grow by one
      whenever a row's minute differs from the last minute it counted (see
      :meth:`_minute_pass`). Exact, with no sort and no set of minutes. One upsert per social
      row, and the key is short: the upserts are what cost.
    - earlier weeks: only their social rows (the quoted names, ``instr``: a third of the
      rows), upserted per user, role and categories JSON (``usercats``).

    The database itself is opened ``mode=ro``: only the TEMP tables are written.
    """

    #: True: count active minutes in minute order straight away (the tests compare the ways)
    ordered = False

    def __init__(self, conn: sqlite3.Connection, social: Sequence[str], bypass: Sequence[str]) -> None:
        self.conn = conn
        self.social = list(social)
        self.social_set = frozenset(social)
        self.bypass = list(bypass)
        self.known: set[str] = set()
        self.mapped: dict[str, list[str]] = {}  # categories JSON -> the social categories in it
        self.same_as_any: set[str] = set()
        self._spans: dict[tuple[int, int], tuple[int, int] | None] = {}
        self.way = ""  # how the last minute pass went: rowid, recount or ordered (tests)
        conn.executescript(_TEMP_TABLES)

    def span(self, lo: int, hi: int) -> tuple[int, int] | None:
        """The rowid range holding the minutes [lo, hi) (exact; from the ``usage_key`` index)."""
        if (lo, hi) not in self._spans:
            # the rows of the first and last minute (two index seeks), then the rows outside
            # that range (rows are appended roughly in time order: few). Exact, and an aggregate
            # only on those few: less than half the cost of min() and max() over the week.
            first = self.conn.execute("SELECT rowid FROM usage WHERE minute >= ? AND minute < ? "
                                      "ORDER BY minute LIMIT 1", (lo, hi)).fetchone()
            if first is None:
                self._spans[(lo, hi)] = None
                return None
            (last,) = self.conn.execute("SELECT rowid FROM usage WHERE minute >= ? AND minute < ? "
                                        "ORDER BY minute DESC LIMIT 1", (lo, hi)).fetchone()
            a, b = min(first[0], last), max(first[0], last)
            out_a, out_b = self.conn.execute(
                "SELECT min(rowid), max(rowid) FROM usage WHERE minute >= ? AND minute < ? "
                "AND rowid NOT BETWEEN ? AND ?", (lo, hi, a, b)).fetchone()
            self._spans[(lo, hi)] = (a if out_a is None else min(a, out_a),
                                     b if out_b is None else max(b, out_b))
        return self._spans[(lo, hi)]

    def _map(self, strings: Iterable[str]) -> None:
        """Note the social categories in each new categories JSON (``mapped``).

        A social category present in *every* social categories JSON (the category-map group,
        ``social_media``, which the classifier adds to each of its members) has exactly the
        cells of "any social media": it gets no columns of its own and is copied afterwards
        (``same_as_any``).
        """
        new = [c for c in dict.fromkeys(strings) if c not in self.known]
        self.known.update(new)
        for cats in new:
            mine = [c for c in dict.fromkeys(_categories(cats)) if c in self.social_set]
            if mine:
                self.mapped[cats] = mine
        everywhere = set(self.social)
        for mine in self.mapped.values():
            everywhere.intersection_update(mine)
        self.same_as_any = everywhere

    def _minute_pass(self, lo: int, hi: int, span: tuple[int, int], *,
                     ordered: bool = False) -> list[str]:
        """Fill ``wcells``: per user, role and window, any social media and each category.

        Returns the categories with columns (column ``i`` of ``wcells`` is the i-th). A cell's
        active minutes grow by one whenever a row's minute differs from the last one it
        counted, which is exact when the rows come in minute order. The fast way reads the
        week's rows in rowid order (a plain scan: rows are appended roughly in time order) and
        marks a (user, role, window) ``back`` when a row's minute is before its last one (a late
        write, an import); then only the users with such a row are counted again, their rows
        in minute order (``usage_user_minute`` index). ``ordered`` (or many such users) reads
        the whole week in minute order instead (``usage_key`` index: exact, slower).
        """
        cols = [c for c in self.social if c not in self.same_as_any]
        self.conn.execute("DELETE FROM temp.catmask")
        self.conn.executemany("INSERT INTO temp.catmask VALUES (?, ?)", [
            (cats, sum(1 << i for i, c in enumerate(cols) if c in mine))
            for cats, mine in self.mapped.items()])
        self.conn.execute("DROP TABLE IF EXISTS temp.wcells")
        self.conn.execute(
            "CREATE TEMP TABLE wcells (user TEXT, role TEXT, window TEXT, requests INTEGER, "
            "blocked INTEGER, minutes INTEGER, last INTEGER, back INTEGER"
            + "".join(f", r{i} INTEGER, b{i} INTEGER, m{i} INTEGER, l{i} INTEGER"
                      for i in range(len(cols)))
            + ", PRIMARY KEY (user, role, window)) WITHOUT ROWID")
        bit = "((m.mask >> {i}) & 1)"
        values = "".join(f", {bit}*u.requests, {bit}*u.blocked, {bit}, "
                         f"CASE WHEN {bit} THEN u.minute ELSE -1 END".format(i=i)
                         for i in range(len(cols)))
        update = "".join(f", r{i} = r{i} + excluded.r{i}, b{i} = b{i} + excluded.b{i}, "
                         f"m{i} = m{i} + (excluded.m{i} AND l{i} != excluded.l{i}), "
                         f"l{i} = CASE WHEN excluded.m{i} THEN excluded.l{i} ELSE l{i} END"
                         for i in range(len(cols)))
        select = ("""INSERT INTO temp.wcells
                    SELECT ifnull(u.user, ''), ifnull(u.role, ''), u.window,
                           u.requests, u.blocked, 1, u.minute, 0""" + values + """
                    FROM {source} JOIN temp.catmask AS m ON m.cats = u.categories
                    WHERE {where} u.minute >= ? AND u.minute < ? {order}
                    ON CONFLICT DO UPDATE SET requests = requests + excluded.requests,
                        blocked = blocked + excluded.blocked,
                        minutes = minutes + (last != excluded.last),
                        back = back | (excluded.last < last), last = excluded.last""" + update)
        if not ordered:
            self.conn.execute(select.format(source="usage AS u", where="u.rowid BETWEEN ? AND ? AND",
                                            order=""), (*span, lo, hi))
            late = [u for (u,) in self.conn.execute(
                "SELECT DISTINCT user FROM temp.wcells WHERE back ORDER BY user")]
            self.way = "rowid"
            if not late:
                return cols
            if len(late) <= _MAX_RECOUNT:
                by_user = "usage INDEXED BY usage_user_minute"
                for user in late:
                    self.conn.execute("DELETE FROM temp.wcells WHERE user = ?", (user,))
                    if user:
                        source, args = "usage AS u INDEXED BY usage_user_minute", (user, lo, hi)
                        where = "u.user = ? AND"
                    else:  # '' stands for both NULL and '' (as in every figure of the report)
                        source = (f"(SELECT * FROM {by_user} WHERE user IS NULL UNION ALL "
                                  f"SELECT * FROM {by_user} WHERE user = '') AS u")
                        where, args = "", (lo, hi)
                    self.conn.execute(select.format(source=source, where=where,
                                                    order="ORDER BY u.minute"), args)
                self.way = "recount"
                return cols
            self.conn.execute("DELETE FROM temp.wcells")
        self.conn.execute(select.format(source="usage AS u INDEXED BY usage_key", where="",
                                        order="ORDER BY u.minute"), (lo, hi))
        self.way = "ordered"
        return cols

    def reported_week(self, lo: int, hi: int) -> tuple[
            dict[tuple[str, str, str, str], Cell], dict[tuple[str, str, str], Cell],
            list[tuple[str, int, int]], list[tuple[str, int, int, int]]]:
        """Social cells per category and for all social media, top categories and top hosts."""
        per_category: dict[tuple[str, str, str, str], Cell] = {}
        overall: dict[tuple[str, str, str], Cell] = {}
        span = self.span(lo, hi)
        if span is None:
            return per_category, overall, [], []
        self.conn.execute("DELETE FROM temp.hostcats")
        self.conn.execute(
            f"""INSERT INTO temp.hostcats
                SELECT host, categories, requests, blocked FROM usage
                WHERE rowid BETWEEN ? AND ? AND minute >= ? AND minute < ?
                {_UPSERT_COUNTS}""", (*span, lo, hi))
        hostcats = self.conn.execute(
            "SELECT host, categories, requests, blocked FROM temp.hostcats").fetchall()
        self._map({cats for _, cats, _, _ in hostcats})
        cols = self._minute_pass(lo, hi, span, ordered=self.ordered)
        same_as_any = [c for c in self.social if c in self.same_as_any]
        for user, role, window, requests, blocked, minutes, *each in self.conn.execute(
                "SELECT user, role, window, requests, blocked, minutes"
                + "".join(f", r{i}, b{i}, m{i}" for i in range(len(cols))) + " FROM temp.wcells"):
            overall[(user, role, window)] = Cell(requests, blocked, minutes)
            for same in same_as_any:
                per_category[(user, role, same, window)] = Cell(requests, blocked, minutes)
            for i, category in enumerate(cols):
                if each[3 * i + 2]:  # some row of this category: its cell (as with "*")
                    per_category[(user, role, category, window)] = Cell(*each[3 * i:3 * i + 3])

        cats: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        hosts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for host, categories, requests, blocked in hostcats:
            for c in dict.fromkeys(_categories(categories)):
                cats[c][0] += requests
                cats[c][1] += blocked
            hosts[host][0] += requests
            hosts[host][1] += blocked
        top_c = sorted(((c, r, b) for c, (r, b) in cats.items()), key=lambda t: (-t[1], t[0]))[:TOP_N]
        top_h = sorted(hosts.items(), key=lambda kv: (-kv[1][0], kv[0]))[:TOP_N]
        marks = ",".join("?" for _ in top_h)
        people = dict(self.conn.execute(
            f"SELECT host, count(DISTINCT user) FROM usage WHERE rowid BETWEEN ? AND ? "
            f"AND minute >= ? AND minute < ? AND host IN ({marks}) GROUP BY host",
            [*span, lo, hi, *(h for h, _ in top_h)])) if top_h else {}
        return (per_category, overall, top_c,
                [(h, r, b, people.get(h, 0)) for h, (r, b) in top_h])

    def trend_week(self, lo: int, hi: int) -> tuple[dict[tuple[str, str], Cell], dict[str, Cell]]:
        """An earlier week: social media requests per (user, role) and per category.

        One pass in rowid order over the week's social rows only (the quoted names: a third of
        the rows; no minute order needed: older weeks show requests, not active minutes),
        upserting per (user, role, categories JSON), which is small.
        """
        users: dict[tuple[str, str], Cell] = {}
        per_category: dict[str, Cell] = {}
        span = self.span(lo, hi)
        if span is None or not self.social:
            return users, per_category
        like, args = _like_any("categories", self.social)
        self.conn.execute("DELETE FROM temp.usercats")
        self.conn.execute(
            f"""INSERT INTO temp.usercats
                SELECT ifnull(user, ''), ifnull(role, ''), categories, requests, blocked
                FROM usage WHERE rowid BETWEEN ? AND ? AND minute >= ? AND minute < ? AND {like}
                {_UPSERT_COUNTS}""", (*span, lo, hi, *args))
        rows = self.conn.execute(
            "SELECT user, role, categories, requests, blocked FROM temp.usercats").fetchall()
        self._map(cats for _, _, cats, _, _ in rows)
        for user, role, cats, requests, blocked in rows:
            mine = self.mapped.get(cats)
            if not mine:
                continue
            total = users.setdefault((user, role), Cell())
            total.requests += requests
            total.blocked += blocked
            for c in mine:
                cell = per_category.setdefault(c, Cell())
                cell.requests += requests
                cell.blocked += blocked
        return users, per_category

    def bypass_usage(self, lo: int, hi: int, tz: tzinfo) -> list[Incident]:
        """Passed (not blocked) requests to bypass-category hosts: one per user and host.

        Blocked ones are incidents already (events table); these got through.
        """
        span = self.span(lo, hi)
        if span is None or not self.bypass:
            return []
        like, args = _like_any("categories", self.bypass)
        wanted = set(self.bypass)
        out = []
        for user, role, host, first, requests, ip, cats, window, action in self.conn.execute(
            f"""SELECT user, role, host, min(minute), sum(requests), max(ip), max(categories),
                       max(window), max(action)
                FROM usage WHERE rowid BETWEEN ? AND ? AND minute >= ? AND minute < ?
                  AND {like} AND action != 'block'
                GROUP BY ifnull(user, ''), ifnull(role, ''), host""", [*span, lo, hi, *args]):
            categories = _categories(cats)
            shown = [c for c in categories if c in wanted]
            if not shown:
                continue
            out.append(_incident(first * 60, "bypass", user, role, ip, host, None, categories,
                                 window, action, None, False, "",
                                 f"{requests} request{'s' if requests != 1 else ''} to a "
                                 + "/".join(shown) + " site", tz))
        return out


def build_weekly(
    db_path: Path,
    week: str,
    *,
    tz: tzinfo,
    directory: Any | None = None,
    school: str = "",
    social_categories: Sequence[str] = ("social_media",),
    bypass_categories: Sequence[str] = ("bypass",),
    groups: Mapping[str, Sequence[str]] | None = None,
    staff_roles: Sequence[str] = ("staff",),
    now: datetime | None = None,
    cache_dir: Path | None = None,
) -> WeeklyReport:
    """Read the week ``week`` (``YYYY-Www``, local to ``tz``) from the store at ``db_path``.

    ``directory`` (``identify.Directory``) adds year and form; ``groups`` (the config's
    category map) expands a social group such as ``social_media`` into its list categories
    so the report shows both the group total and the parts. ``staff_roles`` are the roles
    that policy 6.9 applies to. With ``cache_dir``, the totals of the four earlier weeks are
    kept there and reused while the store's past is unchanged (see ``_earlier_weeks``), so a
    Monday report reads one week of rows, not five.
    """
    start, end = week_bounds(week, tz)
    social = list(dict.fromkeys(social_categories))
    for group in list(social):
        for member in (groups or {}).get(group, ()):
            if member not in social:
                social.append(member)
    trend_weeks = [shift_week(week, -k) for k in range(4, 0, -1)] + [week]
    lo, hi = int(start.timestamp()) // 60, int(end.timestamp()) // 60
    # The four earlier weeks are read on _TREND_THREADS more connections in as many threads
    # (SQLite releases the GIL while a statement runs, so the passes share the cores). Each
    # connection has its own snapshot; earlier weeks rarely change while a report is built
    # (only an import).
    with ThreadPoolExecutor(max_workers=_TREND_THREADS, thread_name_prefix="filterd-report") as pool:
        per = -(-4 // _TREND_THREADS)
        halves = [pool.submit(_earlier_weeks, db_path, trend_weeks[i:i + per], tz, social,
                              bypass_categories, cache_dir) for i in range(0, 4, per)]
        conn = connect_ro(db_path)
        try:
            reader = _Reader(conn, social, bypass_categories)
            with conn:
                conn.execute("BEGIN")  # one snapshot for every query of the reported week
                per_category, overall, top_categories, top_hosts = reader.reported_week(lo, hi)
                incidents = _incidents(conn, start, end, tz, bypass_categories)
                bypass_usage = reader.bypass_usage(lo, hi, tz)
        finally:
            conn.close()
        earlier_weeks = [w for half in halves for w in half.result()]

    # the trend: requests per social category and for all social media (active minutes only
    # for the reported week: they need the rows in minute order, which costs most)
    trend: dict[str, list[Cell]] = {c: [Cell() for _ in trend_weeks] for c in (*social, ALL_SOCIAL)}
    previous_user: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for i, (by_user, by_category) in enumerate(earlier_weeks):
        for (user, role), cell in by_user.items():
            previous_user[(user, role)][i] += cell.requests
            _add(trend[ALL_SOCIAL][i], cell)
        for category, cell in by_category.items():
            _add(trend[category][i], cell)
    for (_u, _r, category, _w), cell in per_category.items():
        _add(trend[category][-1], cell)
    for cell in overall.values():
        _add(trend[ALL_SOCIAL][-1], cell)

    users: dict[tuple[str, str], UserWeek] = {}

    def user_week(user: str, role: str) -> UserWeek:
        key = (user, role)
        if key not in users:
            found = directory.get(user) if (directory is not None and user) else None
            users[key] = UserWeek(user=user or UNIDENTIFIED, role=role or "unknown",
                                  year=getattr(found, "year", None) or None,
                                  form=getattr(found, "form", None) or None)
        return users[key]

    for (user, role, category, window), cell in per_category.items():
        user_week(user, role).cells[(category, window)] = cell
    for (user, role, window), cell in overall.items():
        user_week(user, role).social[window] = cell
    alerts, blocks, bypass = [], [], []
    for inc in incidents:
        uw = user_week("" if inc.user == UNIDENTIFIED else inc.user,
                       "" if inc.role == "unknown" else inc.role)
        if inc.kind == "bypass":
            uw.bypass += 1
            bypass.append(inc)
            continue
        if inc.alert:
            uw.alerts += 1
            alerts.append(inc)
        if inc.action == "block":
            uw.blocks += 1
            blocks.append(inc)
    for inc in bypass_usage:
        user_week("" if inc.user == UNIDENTIFIED else inc.user,
                  "" if inc.role == "unknown" else inc.role).bypass += 1
        bypass.append(inc)
    bypass.sort(key=lambda i: i.time)
    for (user, role), uw in users.items():
        uw.previous = previous_user.get((user, role), [0, 0, 0, 0])[:4]
        uw.flagged = uw.role in staff_roles and uw.social_in("contact").requests > 0

    ordered = sorted(users.values(), key=_user_order)
    sections: list[Section] = []
    for uw in ordered:
        if sections and (sections[-1].role, sections[-1].year, sections[-1].form) == (uw.role, uw.year, uw.form):
            sections[-1].users.append(uw)
        else:
            sections.append(Section(uw.role, uw.year, uw.form, [uw]))
    for s in sections:
        s.users.sort(key=lambda u: (-u.social_requests, u.user))

    return WeeklyReport(
        school=school,
        week=week,
        start=start,
        end=end,
        generated=(now or datetime.now(timezone.utc)).astimezone(tz),
        social_categories=tuple(social),
        users=ordered,
        sections=sections,
        alerts=alerts,
        blocks=blocks,
        bypass=bypass,
        incident_total=len(incidents),
        trend_weeks=trend_weeks,
        trend=trend,
        groups=tuple(g for g in social_categories if (groups or {}).get(g)),
        top_categories=top_categories,
        top_hosts=top_hosts,
    )


def _earlier_weeks(db_path: Path, weeks: Sequence[str], tz: tzinfo, social: Sequence[str],
                   bypass: Sequence[str], cache_dir: Path | None = None
                   ) -> list[tuple[dict[tuple[str, str], Cell], dict[str, Cell]]]:
    """Social media requests per (user, role) and per category for each of ``weeks``.

    A past week only changes through an import, a retention purge or a person's erasure;
    the cache key (``_past_marker``) moves with each of them, so a cached week is exact.
    """
    conn = connect_ro(db_path)
    try:
        reader = _Reader(conn, social, bypass)
        out = []
        with conn:
            conn.execute("BEGIN")
            marker = _past_marker(conn, social, tz) if cache_dir is not None else None
            for w in weeks:
                cached = _read_trend(cache_dir, w, marker) if cache_dir is not None else None
                if cached is None:
                    ws, we = week_bounds(w, tz)
                    cached = reader.trend_week(int(ws.timestamp()) // 60, int(we.timestamp()) // 60)
                    if cache_dir is not None:
                        _write_trend(cache_dir, w, marker, cached)
                out.append(cached)
        return out
    finally:
        conn.close()


def _past_marker(conn: sqlite3.Connection, social: Sequence[str], tz: tzinfo) -> list:
    """What a cached earlier week depends on: imports, the oldest and newest rows, the row
    count (an erasure removes rows), the social categories and the time zone."""
    imported = conn.execute("SELECT coalesce(max(updated), 0), count(*) FROM imports").fetchone()
    rows = conn.execute("SELECT min(rowid), max(rowid), count(*) FROM usage").fetchone()
    return [list(imported), list(rows), sorted(social), str(tz)]


def _read_trend(cache_dir: Path, week: str, marker: list
                ) -> tuple[dict[tuple[str, str], Cell], dict[str, Cell]] | None:
    try:
        data = json.loads((cache_dir / f"trend-{week}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("marker") != marker:
        return None
    users = {(u, r): Cell(req, blk, 0) for u, r, req, blk in data["users"]}
    categories = {c: Cell(req, blk, 0) for c, (req, blk) in data["categories"].items()}
    return users, categories


def _write_trend(cache_dir: Path, week: str, marker: list,
                 totals: tuple[dict[tuple[str, str], Cell], dict[str, Cell]]) -> None:
    """Keep a week's totals (user names and counts only), written atomically, mode 0600."""
    users, categories = totals
    data = {"week": week, "marker": marker,
            "users": [[u, r, c.requests, c.blocked] for (u, r), c in users.items()],
            "categories": {c: [cell.requests, cell.blocked] for c, cell in categories.items()}}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = cache_dir / f".trend-{week}.json.tmp"
        tmp.write_text(json.dumps(data), encoding="utf-8")
        tmp.chmod(0o600)
        os.replace(tmp, cache_dir / f"trend-{week}.json")
    except OSError as exc:  # a cache that cannot be written only costs time
        log.warning("report cache not written: %s", exc)


def clear_cache(cache_dir: Path) -> int:
    """Delete the cached trend totals (after erasing a person: they hold user names)."""
    removed = 0
    for path in Path(cache_dir).glob("trend-*.json"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def _add(total: Cell, cell: Cell) -> None:
    total.requests += cell.requests
    total.blocked += cell.blocked
    total.active_minutes += cell.active_minutes


_ROLE_ORDER = {"pupil": 0, "student": 0, "staff": 1}


def _natural(text: str | None) -> tuple[int, int, str]:
    """Year "7" before "10"; missing last."""
    if text is None:
        return (2, 0, "")
    return (0, int(text), "") if text.isdigit() else (1, 0, text.lower())


def _user_order(u: UserWeek) -> tuple[Any, ...]:
    return (_ROLE_ORDER.get(u.role, 2), u.role, _natural(u.year), _natural(u.form),
            u.user == UNIDENTIFIED, u.user.lower())


def _categories(raw: str | None) -> tuple[str, ...]:
    try:
        value = json.loads(raw or "[]")
    except ValueError:
        return ()
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def _incidents(conn: sqlite3.Connection, start: datetime, end: datetime, tz: tzinfo,
               bypass_categories: Sequence[str]) -> list[Incident]:
    """Blocks, alerts and bypass attempts of the week, oldest first (events table)."""
    out = []
    bypass_set = set(bypass_categories)
    for (ts, kind, user, role, ip, host, url, cats, window, action, rule, alert, ref,
         detail) in conn.execute(
        """SELECT ts, kind, user, role, ip, host, url, categories, window, action, rule, alert,
                  ref, detail
           FROM events WHERE ts >= ? AND ts < ? AND kind != 'usage' ORDER BY ts, id""",
        (start.timestamp(), end.timestamp()),
    ):
        categories = _categories(cats)
        if kind != "bypass" and bypass_set.intersection(categories):
            kind_shown = "bypass"
        else:
            kind_shown = kind
        if kind_shown == "bypass" and kind != "bypass" and action == "block":
            # a blocked visit to a proxy/VPN site: both a block and a bypass attempt
            out.append(_incident(ts, "block", user, role, ip, host, url, categories, window,
                                 action, rule, alert, ref, detail, tz))
        out.append(_incident(ts, kind_shown, user, role, ip, host, url, categories, window,
                             action, rule, alert if kind_shown != "bypass" or kind == "bypass" else False,
                             ref, detail, tz))
    return out


def _incident(ts: float, kind: str, user: str | None, role: str | None, ip: str | None,
              host: str, url: str | None, categories: tuple[str, ...], window: str, action: str,
              rule: str | None, alert: Any, ref: str, detail: str | None, tz: tzinfo) -> Incident:
    return Incident(time=datetime.fromtimestamp(ts, tz), kind=kind, user=user or UNIDENTIFIED,
                    role=role or "unknown", ip=ip or "", host=host, url=url,
                    categories=categories, window=window, action=action, rule=rule,
                    alert=bool(alert), ref=ref, detail=detail)


# ---------------------------------------------------------------------------------------------
# The archive


@dataclass(frozen=True, slots=True)
class ArchivedReport:
    """One week in the archive folder, the files written for it, and when it was mailed."""

    week: str
    files: tuple[Path, ...]
    modified: datetime
    sent: datetime | None = None  # from weekly-YYYY-Www.sent, written by mark_sent()
    sent_to: tuple[str, ...] = ()


_ARCHIVE_RE = re.compile(r"^weekly-(\d{4}-W\d{2})\.(html|txt|csv)$")
_SENT_RE = re.compile(r"^weekly-(\d{4}-W\d{2})\.sent$")


def mark_sent(archive_dir: Path, week: str, *, message_id: str, to: Sequence[str],
              at: datetime) -> Path:
    """Record that ``week``'s report was mailed (``weekly-YYYY-Www.sent``, JSON).

    The scheduler asks :func:`last_sent` at start-up, so a daemon that was down on Monday
    morning still sends last week's report once, and never twice.
    """
    parse_week(week)
    archive_dir = Path(archive_dir)
    archive_dir.mkdir(parents=True, exist_ok=True)
    path = archive_dir / f"weekly-{week}.sent"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"week": week, "sent": at.isoformat(), "message_id": message_id,
                               "to": list(to)}) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def last_sent(archive_dir: Path) -> str | None:
    """The latest week whose report was mailed (``"YYYY-Www"``), or None."""
    archive_dir = Path(archive_dir)
    if not archive_dir.is_dir():
        return None
    weeks = [m.group(1) for p in archive_dir.iterdir() if (m := _SENT_RE.match(p.name))]
    return max(weeks, default=None)


def list_reports(archive_dir: Path) -> list[ArchivedReport]:
    """The archived weekly reports, newest week first (``filterd report list``)."""
    archive_dir = Path(archive_dir)
    if not archive_dir.is_dir():
        return []
    weeks: dict[str, list[Path]] = defaultdict(list)
    sent: dict[str, tuple[datetime | None, tuple[str, ...]]] = {}
    for path in archive_dir.iterdir():
        if not path.is_file():
            continue
        if m := _ARCHIVE_RE.match(path.name):
            weeks[m.group(1)].append(path)
        elif m := _SENT_RE.match(path.name):
            try:
                info = json.loads(path.read_text(encoding="utf-8"))
                sent[m.group(1)] = (datetime.fromisoformat(info["sent"]), tuple(info.get("to", ())))
            except (OSError, ValueError, KeyError, TypeError):
                sent[m.group(1)] = (None, ())
    out = []
    for week, files in weeks.items():
        files.sort(key=lambda p: ("html", "txt", "csv").index(p.suffix[1:]))
        modified = max(p.stat().st_mtime for p in files)
        when, to = sent.get(week, (None, ()))
        out.append(ArchivedReport(week, tuple(files),
                                  datetime.fromtimestamp(modified, timezone.utc), when, to))
    return sorted(out, key=lambda a: a.week, reverse=True)
