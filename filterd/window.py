"""When a request happens, in school terms: the window stage.

``Timetable.window(at, user, role)`` says whether ``at`` is ``contact`` time (a lesson),
``non_contact`` time (breaks, lunch, a teacher's free period) or ``out_of_hours`` (holidays,
closed days, weekends, before the first period and after the last). Policy 6.9 lets staff use
social media for personal reasons only outside contact time, so this is what the rules and the
weekly report split by.

The timetable file (TOML; DESIGN.md, plus the optional keys marked *new*)::

    timezone = "Europe/London"          # IANA name; default Europe/London (daylight saving
                                        # is applied by zoneinfo: times are wall-clock times)
    terms = [["2026-09-01", "2026-10-23"], ...]   # inclusive [first, last] day pairs
    closed = ["2026-11-20"]             # INSET days, bank holidays inside a term
    days = ["mon", "tue", "wed", "thu", "fri"]    # mon tue wed thu fri sat sun
    periods = [{ name = "P1", start = "08:50", end = "09:50" }, ...]   # contact time
    breaks = [{ name = "break", start = "10:50", end = "11:10" }, ...] # new, optional

    weeks = ["A", "B"]                  # new, optional: a rotating timetable
    week_start = "2026-09-07"           # new: any day of a week that is weeks[0] ("A")
    week_restarts = { "2027-01-04" = "A" }   # new, optional: from the week holding this
                                        # date the rotation restarts at the given week

    [staff.jsmith]
    free = ["mon P2", "A wed P1"]       # non-contact periods; "A ..." only in week A
    duties = ["tue break", "B thu lunch"]   # new: breaks on duty (contact time)

Rules:

* Period start is inclusive and end exclusive (08:50:00 is in P1, 09:50:00 is not).
* Between the first period's start and the last period's end, time that is not in a period is
  ``non_contact``. ``breaks`` only *name* parts of that time, so that ``duties`` can refer to
  them and ``filterd timetable show`` can label them; a break must not overlap a period and
  must lie inside the school day. A member of staff on duty in a break is in contact time.
* ``free`` and ``duties`` apply to the user named by the table (case-insensitive), whatever
  their role; a user with no ``[staff.*]`` table is in contact time in every period.
* Week rotation counts calendar weeks (holidays included) from ``week_start``; schools that
  restart at week A after a holiday list that Monday in ``week_restarts``. Without ``weeks``,
  an entry with a week letter is an error.
* ``at`` must be timezone-aware (any zone; it is converted); a naive datetime is a ValueError,
  because guessing a zone is how daylight-saving bugs are made.

``import_staff_csv`` turns a timetable export (one row per member of staff, day and period
*taught*) into ``[staff.*]`` tables; see its docstring for the CSV columns.
"""

from __future__ import annotations

import bisect
import csv
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from filterd.errors import FilterdError, parse_toml, read_text

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_ALIASES = {name: i for i, name in enumerate(DAY_NAMES)}
_DAY_ALIASES.update({full: i for i, full in enumerate(
    ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"))})
_TOP_KEYS = ("timezone", "terms", "closed", "days", "periods", "breaks", "weeks",
             "week_start", "week_restarts", "staff")
_SLOT_KEYS = ("name", "start", "end")
_STAFF_KEYS = ("free", "duties")
_HHMM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")

CONTACT, NON_CONTACT, OUT_OF_HOURS = "contact", "non_contact", "out_of_hours"


@dataclass(frozen=True, slots=True)
class Slot:
    """A named stretch of the school day: a period (contact) or a break (named gap)."""

    name: str
    start: time
    end: time
    kind: str = "period"  # period | break

    def label(self) -> str:
        return f"{self.name} {self.start:%H:%M}-{self.end:%H:%M}"


# key of a staff entry: (week letter or None for every week, weekday 0..6, slot name)
Entry = tuple[str | None, int, str]


class Timetable:
    """A validated timetable. Build it with ``load_timetable`` (or ``parse_timetable``)."""

    def __init__(self, *, tz: ZoneInfo, terms: Iterable[tuple[date, date]],
                 closed: Iterable[date], days: Iterable[int], periods: Iterable[Slot],
                 breaks: Iterable[Slot] = (), weeks: Iterable[str] = (),
                 week_start: date | None = None,
                 week_restarts: Mapping[date, str] | None = None,
                 free: Mapping[str, Iterable[Entry]] | None = None,
                 duties: Mapping[str, Iterable[Entry]] | None = None,
                 path: Path | None = None) -> None:
        self.tz = tz
        self.terms = tuple(sorted(terms))
        self._term_starts = [t[0] for t in self.terms]
        self.closed = frozenset(closed)
        self.days = tuple(sorted(set(days)))
        self._days = frozenset(self.days)
        self.periods = tuple(sorted(periods, key=lambda s: s.start))
        self.breaks = tuple(sorted(breaks, key=lambda s: s.start))
        self.weeks = tuple(weeks)
        self.week_start = _monday(week_start) if week_start else None
        self.week_restarts = tuple(sorted((_monday(d), w) for d, w in (week_restarts or {}).items()))
        self._restart_mondays = [d for d, _ in self.week_restarts]
        free = free or {}
        duties = duties or {}
        self.staff: frozenset[str] = frozenset([*free, *duties])
        self._free = {u.lower(): frozenset(v) for u, v in free.items()}
        self._duties = {u.lower(): frozenset(v) for u, v in duties.items()}
        self.path = path
        self.day_start = self.periods[0].start if self.periods else None
        self.day_end = self.periods[-1].end if self.periods else None

    # -- calendar ---------------------------------------------------------------------------

    def in_term(self, d: date) -> bool:
        """True on a day inside a term (closed days and weekdays not checked)."""
        i = bisect.bisect_right(self._term_starts, d) - 1
        return i >= 0 and d <= self.terms[i][1]

    def is_school_day(self, d: date) -> bool:
        """In a term, on one of ``days``, and not closed."""
        return d.weekday() in self._days and d not in self.closed and self.in_term(d)

    def week_of(self, d: date) -> str | None:
        """The rotation week ("A", "B", ...) holding ``d``; None without ``weeks``."""
        if not self.weeks or self.week_start is None:
            return None
        monday = _monday(d)
        i = bisect.bisect_right(self._restart_mondays, monday) - 1
        if i >= 0:
            base, first = self.week_restarts[i]
            offset = self.weeks.index(first)
        else:
            base, offset = self.week_start, 0
        return self.weeks[(offset + (monday - base).days // 7) % len(self.weeks)]

    # -- the stage --------------------------------------------------------------------------

    def local(self, at: datetime) -> datetime:
        """``at`` in the timetable's zone. ValueError for a naive datetime."""
        if at.tzinfo is None or at.tzinfo.utcoffset(at) is None:
            raise ValueError(f"naive datetime {at.isoformat()}: give a timezone-aware time")
        return at.astimezone(self.tz)

    def slot_at(self, t: time) -> Slot | None:
        """The period or named break holding wall-clock time ``t`` (start in, end out)."""
        for s in self.periods:
            if s.start <= t < s.end:
                return s
        for s in self.breaks:
            if s.start <= t < s.end:
                return s
        return None

    def window(self, at: datetime, user: str | None = None, role: str | None = None) -> str:
        """contact | non_contact | out_of_hours for ``user`` at ``at`` (aware, any zone).

        ``role`` is accepted for the pipeline's uniform call; free periods and duties come
        from the user's ``[staff.*]`` table, whatever the role.
        """
        loc = self.local(at)
        d = loc.date()
        if not self.is_school_day(d) or self.day_start is None or self.day_end is None:
            return OUT_OF_HOURS
        t = loc.time()
        if t < self.day_start or t >= self.day_end:
            return OUT_OF_HOURS
        slot = self.slot_at(t)
        key = user.lower() if user else None
        if slot is None or slot.kind == "break":
            if slot is not None and key in self._duties and \
                    self._has(self._duties[key], d, slot.name):
                return CONTACT
            return NON_CONTACT
        if key in self._free and self._has(self._free[key], d, slot.name):
            return NON_CONTACT
        return CONTACT

    def _has(self, entries: frozenset[Entry], d: date, name: str) -> bool:
        wd = d.weekday()
        if (None, wd, name) in entries:
            return True
        return bool(self.weeks) and (self.week_of(d), wd, name) in entries

    def rows(self) -> list[tuple[str, time, time]]:
        """The school day cut at every period and break edge: (label, start, end)."""
        if not self.periods:
            return []
        cuts = sorted({t for s in (*self.periods, *self.breaks) for t in (s.start, s.end)})
        rows = []
        for a, b in zip(cuts, cuts[1:]):
            s = self.slot_at(a)
            rows.append((s.name if s else "-", a, b))
        return rows


def _monday(d: date) -> date:
    return d - timedelta(days=d.weekday())


# --------------------------------------------------------------------------------------------
# loading and validation


class _Where:
    """Finds the line of a field in the TOML text, so errors can point at it."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def line(self, *needles: str, after: int = 0) -> int | None:
        """The first line (1-based, > ``after``) containing every needle, else one containing
        the last needle, else None. Comments are ignored, so a commented-out line is never
        blamed (unless a needle itself contains ``#``)."""
        keep_comments = any("#" in n for n in needles)
        for group in (needles, needles[-1:]):
            for i, text in enumerate(self.lines[after:], start=after + 1):
                code = text if keep_comments else text.split("#", 1)[0]
                if all(n in code for n in group):
                    return i
        return None

    def error(self, field: str, message: str, *needles: str, after: int = 0) -> FilterdError:
        line = self.line(*needles, after=after) if needles else None
        return FilterdError(message, file=self.path, line=line, field=field)


def _q(value: object) -> str:
    """How a string value appears in the TOML text (for line search)."""
    return f'"{value}"' if isinstance(value, str) else str(value)


def _date(value: object, field: str, w: _Where) -> date:
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise w.error(field, f"bad date {value!r}: write YYYY-MM-DD", _q(value))


def _time(value: object, field: str, w: _Where, after: int = 0) -> time:
    if isinstance(value, time):
        return value
    if isinstance(value, str):
        m = _HHMM.match(value.strip())
        if m:
            return time(int(m.group(1)), int(m.group(2)))
    raise w.error(field, f"bad time {value!r}: write HH:MM (24-hour)", _q(value), after=after)


def _list(value: object, field: str, w: _Where, after: int = 0) -> list:
    if not isinstance(value, list):
        key = field.rsplit(".", 1)[-1]
        raise w.error(field, f"must be a list, not {type(value).__name__}", f"{key} =",
                      after=after)
    return value


def _slots(raw: object, key: str, kind: str, w: _Where) -> list[Slot]:
    out: list[Slot] = []
    base = (w.line(f"{key} =") or 1) - 1  # search from the list's own line
    for i, item in enumerate(_list(raw, key, w)):
        f = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise w.error(f, "must be a table { name = ..., start = \"HH:MM\", end = \"HH:MM\" }",
                          key)
        for k in item:
            if k not in _SLOT_KEYS:
                raise w.error(f"{f}.{k}", f"unknown key {k!r} (allowed: name, start, end)", k,
                              after=base)
        name = item.get("name")
        if not isinstance(name, str) or not name.strip() or " " in name.strip():
            raise w.error(f"{f}.name", f"a name without spaces is required (e.g. \"P{i + 1}\")",
                          *([_q(name)] if isinstance(name, str) else [key]), after=base)
        for k in ("start", "end"):
            if k not in item:
                raise w.error(f"{f}.{k}", f"missing {k} time", _q(name), after=base)
        start = _time(item["start"], f"{f}.start", w, base)
        end = _time(item["end"], f"{f}.end", w, base)
        if end <= start:
            raise w.error(f"{f}.end", f"{name}: end {end:%H:%M} is not after start {start:%H:%M}",
                          _q(name), _q(item["end"]), after=base)
        out.append(Slot(name.strip(), start, end, kind))
    return out


def _check_overlaps(slots: list[Slot], key: str, w: _Where) -> None:
    base = (w.line(f"{key} =") or 1) - 1
    ordered = sorted(enumerate(slots), key=lambda p: p[1].start)
    for (_, a), (j, b) in zip(ordered, ordered[1:]):
        if b.start < a.end:
            raise w.error(f"{key}[{j}]", f"{b.name} ({b.start:%H:%M}-{b.end:%H:%M}) overlaps "
                          f"{a.name} ({a.start:%H:%M}-{a.end:%H:%M})", _q(b.name), after=base)


def parse_timetable(text: str, path: Path | str = "<timetable>", *,
                    known_users: Iterable[str] | None = None) -> Timetable:
    """Parse and validate timetable TOML text; errors name ``path``, the line and the field."""
    path = Path(path)
    w = _Where(path, text)
    raw = parse_toml(text, path)

    for k in raw:
        if k not in _TOP_KEYS:
            import difflib
            near = difflib.get_close_matches(k, _TOP_KEYS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise w.error(k, f"unknown key {k!r}{hint}", k)

    tzname = raw.get("timezone", "Europe/London")
    try:
        if not isinstance(tzname, str) or not tzname:
            raise ValueError
        tz = ZoneInfo(tzname)
    except (ZoneInfoNotFoundError, ValueError):
        raise w.error("timezone", f"unknown time zone {tzname!r} (an IANA name such as "
                      "\"Europe/London\")", "timezone") from None

    terms: list[tuple[date, date]] = []
    if "terms" not in raw:
        raise w.error("terms", "missing: list the terms as [[\"YYYY-MM-DD\", \"YYYY-MM-DD\"], ...]")
    for i, pair in enumerate(_list(raw["terms"], "terms", w)):
        if not isinstance(pair, list) or len(pair) != 2:
            raise w.error(f"terms[{i}]", "a term is a pair [first day, last day]", "terms")
        first = _date(pair[0], f"terms[{i}][0]", w)
        last = _date(pair[1], f"terms[{i}][1]", w)
        if last < first:
            raise w.error(f"terms[{i}]", f"term ends ({last}) before it starts ({first})",
                          _q(pair[1]))
        terms.append((first, last))
    ordered = sorted(enumerate(terms), key=lambda p: p[1])
    for (_, a), (j, b) in zip(ordered, ordered[1:]):
        if b[0] <= a[1]:
            raise w.error(f"terms[{j}]", f"term {b[0]}..{b[1]} overlaps term {a[0]}..{a[1]}",
                          str(b[0]))

    closed = [_date(v, f"closed[{i}]", w) for i, v in enumerate(_list(raw.get("closed", []),
                                                                        "closed", w))]

    days: list[int] = []
    for i, d in enumerate(_list(raw.get("days", list(DAY_NAMES[:5])), "days", w)):
        if not isinstance(d, str) or d.strip().lower() not in DAY_NAMES:
            raise w.error(f"days[{i}]", f"unknown day {d!r} (use {' '.join(DAY_NAMES)})", _q(d))
        if DAY_NAMES.index(d.strip().lower()) in days:
            raise w.error(f"days[{i}]", f"{d!r} is listed twice", _q(d))
        days.append(DAY_NAMES.index(d.strip().lower()))

    if "periods" not in raw:
        raise w.error("periods", "missing: list the periods as { name, start, end } tables")
    periods = _slots(raw["periods"], "periods", "period", w)
    if not periods:
        raise w.error("periods", "at least one period is needed", "periods")
    breaks = _slots(raw.get("breaks", []), "breaks", "break", w)
    names: dict[str, int] = {}
    for key, slots in (("periods", periods), ("breaks", breaks)):
        base = (w.line(f"{key} =") or 1) - 1
        for i, s in enumerate(slots):
            if s.name.lower() in names:
                first = w.line(_q(s.name), after=base) or base
                raise w.error(f"{key}[{i}].name", f"name {s.name!r} is used twice", _q(s.name),
                              after=first if key == "periods" else base)
            names[s.name.lower()] = i
    _check_overlaps(periods, "periods", w)
    day_start, day_end = min(p.start for p in periods), max(p.end for p in periods)
    bbase = (w.line("breaks =") or 1) - 1
    for i, b in enumerate(breaks):
        if b.start < day_start or b.end > day_end:
            raise w.error(f"breaks[{i}]", f"{b.name} is outside the school day "
                          f"({day_start:%H:%M}-{day_end:%H:%M})", _q(b.name), after=bbase)
        for p in periods:
            if b.start < p.end and p.start < b.end:
                raise w.error(f"breaks[{i}]", f"{b.name} ({b.start:%H:%M}-{b.end:%H:%M}) overlaps "
                              f"period {p.name} ({p.start:%H:%M}-{p.end:%H:%M})", _q(b.name),
                              after=bbase)
    _check_overlaps(breaks, "breaks", w)

    weeks: list[str] = []
    week_start: date | None = None
    restarts: dict[date, str] = {}
    if "weeks" in raw:
        for i, v in enumerate(_list(raw["weeks"], "weeks", w)):
            if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9]+", v):
                raise w.error(f"weeks[{i}]", f"a week name is a letter or word, not {v!r}", "weeks")
            if v in weeks:
                raise w.error(f"weeks[{i}]", f"week {v!r} is listed twice", "weeks")
            weeks.append(v)
        if len(weeks) < 2:
            raise w.error("weeks", "a rotation needs at least two weeks, e.g. [\"A\", \"B\"]",
                          "weeks")
        if "week_start" not in raw:
            raise w.error("week_start", f"missing: a date in a week that is week {weeks[0]!r}",
                          "weeks")
        week_start = _date(raw["week_start"], "week_start", w)
        r = raw.get("week_restarts", {})
        if not isinstance(r, dict):
            raise w.error("week_restarts", "must be a table { \"YYYY-MM-DD\" = \"A\" }",
                          "week_restarts")
        for k, v in r.items():
            d = _date(k, f"week_restarts.{k}", w)
            if v not in weeks:
                raise w.error(f"week_restarts.{k}", f"unknown week {v!r} (weeks: {', '.join(weeks)})",
                              _q(k))
            restarts[d] = v
    else:
        for k in ("week_start", "week_restarts"):
            if k in raw:
                raise w.error(k, "needs weeks = [\"A\", \"B\"] (a rotating timetable)", k)

    period_names = {p.name.lower(): p.name for p in periods}
    break_names = {b.name.lower(): b.name for b in breaks}
    staff = raw.get("staff", {})
    if not isinstance(staff, dict):
        raise w.error("staff", "must be tables [staff.USERNAME]", "staff")
    known = {u.lower() for u in known_users} if known_users is not None else None
    free: dict[str, list[Entry]] = {}
    duties: dict[str, list[Entry]] = {}
    for user, table in staff.items():
        f = f"staff.{user}"
        header = w.line(f"[staff.{user}]") or w.line(f"staff.{user}") or 0
        if not isinstance(table, dict):
            raise w.error(f, "must be a table with free = [...] and/or duties = [...]", f)
        if known is not None and user.lower() not in known:
            raise w.error(f, f"unknown user {user!r}: not in the users file", f)
        for k in table:
            if k not in _STAFF_KEYS:
                raise w.error(f"{f}.{k}", f"unknown key {k!r} (allowed: free, duties)", k,
                              after=header)
        for k, target, what, pool in (("free", free, "period", period_names),
                                      ("duties", duties, "break", break_names)):
            entries = target.setdefault(user, [])
            for i, entry in enumerate(_list(table.get(k, []), f"{f}.{k}", w, header)):
                ef = f"{f}.{k}[{i}]"
                try:
                    entries.append(_entry(entry, days, weeks, pool, what))
                except ValueError as e:
                    raise w.error(ef, str(e), _q(entry), after=header) from None
    return Timetable(tz=tz, terms=terms, closed=closed, days=days, periods=periods,
                     breaks=breaks, weeks=weeks, week_start=week_start, week_restarts=restarts,
                     free=free, duties=duties, path=path)


def _entry(entry: object, days: list[int], weeks: list[str], pool: Mapping[str, str],
           what: str) -> Entry:
    """``"mon P2"`` or ``"A mon P2"`` -> (week, weekday, name); ValueError says what is wrong."""
    if not isinstance(entry, str):
        raise ValueError(f"must be text like \"mon P2\", not {entry!r}")
    parts = entry.split()
    week: str | None = None
    if len(parts) == 3:
        week = parts.pop(0)
        if not weeks:
            raise ValueError(f"{entry!r} names week {week!r} but the timetable has no weeks")
        if week not in weeks:
            raise ValueError(f"unknown week {week!r} in {entry!r} (weeks: {', '.join(weeks)})")
    if len(parts) != 2:
        raise ValueError(f"{entry!r}: write \"DAY {what.upper()}\" or \"WEEK DAY {what.upper()}\"")
    day, name = parts[0].lower(), parts[1]
    if day not in DAY_NAMES or DAY_NAMES.index(day) not in days:
        raise ValueError(f"unknown day {parts[0]!r} in {entry!r} (days: "
                         f"{' '.join(DAY_NAMES[d] for d in sorted(days))})")
    if name.lower() not in pool:
        raise ValueError(f"unknown {what} {name!r} in {entry!r} (known: "
                         f"{', '.join(pool.values()) or 'none'})")
    return (week, DAY_NAMES.index(day), pool[name.lower()])


def load_timetable(path: Path | str, *, known_users: Iterable[str] | None = None) -> Timetable:
    """Read and validate a timetable file (see the module docstring for the format).

    ``known_users`` (usernames from users.csv), when given, makes a ``[staff.NAME]`` table for
    someone not in the directory an error: a typo there would silently keep a teacher in
    contact time all week.
    """
    path = Path(path)
    text = read_text(path, "timetable")
    return parse_timetable(text, path, known_users=known_users)


# --------------------------------------------------------------------------------------------
# the week grid (filterd timetable show)


def week_grid(tt: Timetable, week: str, user: str | None = None) -> str:
    """A text grid of the windows of ISO week ``week`` ("2026-W47") for ``user``.

    Rows are the periods and the gaps between them (plus before/after school); columns are
    the school days; cells are contact / non_contact / out_of_hours, or ``closed`` on a closed
    day. Each cell is the window at the start of its row, computed through ``tt.window`` so the
    grid shows exactly what the filter will do. ValueError for a bad week.
    """
    m = re.fullmatch(r"(\d{4})-?W(\d{1,2})", week.strip())
    if not m:
        raise ValueError(f"bad week {week!r}: write YYYY-Www, e.g. 2026-W47")
    try:
        monday = date.fromisocalendar(int(m.group(1)), int(m.group(2)), 1)
    except ValueError as e:
        raise ValueError(f"bad week {week!r}: {e}") from None
    cols = sorted(set(range(5)) | set(tt.days))
    dates = [monday + timedelta(days=d) for d in cols]
    rows = tt.rows()
    if not rows:
        return ""
    first, last = rows[0][1], rows[-1][2]
    labelled = [(f"before {first:%H:%M}", time(0, 0), first)]
    labelled += [(f"{name} {a:%H:%M}-{b:%H:%M}", a, b) for name, a, b in rows]
    labelled.append((f"after {last:%H:%M}", last, time(23, 59)))

    def cell(d: date, t: time) -> str:
        if d in tt.closed and tt.in_term(d) and d.weekday() in tt.days:
            return "closed"
        at = datetime.combine(d, t, tzinfo=tt.tz)
        return tt.window(at, user)

    wk = tt.week_of(monday)
    title = f"{week}" + (f" (week {wk})" if wk else "") + f" — {user or 'no user (pupils and staff without a [staff.*] table)'}"
    tz = f"times {tt.tz.key}"
    width = max(len(label) for label, _, _ in labelled)
    cw = max(12, len(NON_CONTACT) + 1)
    head = " " * width + " | " + " | ".join(f"{DAY_NAMES[d]} {dt:%d %b}".ljust(cw)
                                            for d, dt in zip(cols, dates))
    lines = [title, tz, head, "-" * len(head)]
    for label, a, _ in labelled:
        cells = [cell(dt, a).ljust(cw) for dt in dates]
        lines.append(label.ljust(width) + " | " + " | ".join(cells))
    off = [f"{DAY_NAMES[d]} {dt:%d %b}" for d, dt in zip(cols, dates)
           if d in tt.days and not tt.in_term(dt)]
    if off:
        lines.append("not in a term: " + ", ".join(off))
    return "\n".join(line.rstrip() for line in lines) + "\n"


# --------------------------------------------------------------------------------------------
# timetable export import (filterd timetable import)

_STAFF_COLUMNS = ("staff", "teacher", "username", "user")


def import_staff_csv(path: Path | str, timetable: Timetable | None = None, *,
                     known_users: Iterable[str] | None = None) -> str:
    """Build ``[staff.*]`` tables (TOML text) from a timetable export CSV.

    CSV format (UTF-8, header row, column names case-insensitive, other columns ignored):

    * ``staff`` (or ``teacher``/``username``/``user``): the username as in users.csv;
    * ``day``: mon..sun or monday..sunday;
    * ``period``: a period name of the timetable (the member of staff **teaches** then), or a
      break name (the member of staff is **on duty** then);
    * ``week`` (optional): a week of the rotation ("A"); empty or absent = every week.

    One row per member of staff, day and period taught. ``free`` is then every period of
    every school day (and week) that the member of staff does not teach; ``duties`` are the
    break rows. Only staff with at least one row get a table. Errors name the file and line.

    With ``timetable`` the days, periods, breaks and weeks are validated against it; without
    it they are taken from the CSV itself (a period nobody teaches is then unknown), which the
    output says in its header comment.
    """
    path = Path(path)
    text = read_text(path, "timetable export", bom=True)
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise FilterdError("empty file: a header row staff,day,period[,week] is required",
                           file=path, line=1) from None
    staff_col = next((header.index(c) for c in _STAFF_COLUMNS if c in header), None)
    if staff_col is None:
        raise FilterdError("missing column 'staff'", file=path, line=1, field="staff")
    for c in ("day", "period"):
        if c not in header:
            raise FilterdError(f"missing column {c!r}", file=path, line=1, field=c)
    day_col, period_col = header.index("day"), header.index("period")
    week_col = header.index("week") if "week" in header else None

    if timetable is not None:
        days = list(timetable.days)
        periods = [p.name for p in timetable.periods]
        breaks = [b.name for b in timetable.breaks]
        weeks = list(timetable.weeks)
    known = {u.lower() for u in known_users} if known_users is not None else None

    taught: dict[str, set[Entry]] = {}
    on_duty: dict[str, set[Entry]] = {}
    seen_days: set[int] = set()
    seen_periods: list[str] = []
    seen_weeks: list[str] = []
    for row in reader:
        line = reader.line_num
        if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue

        def get(i: int | None) -> str:
            return row[i].strip() if i is not None and i < len(row) else ""

        def err(col: str, message: str) -> FilterdError:
            return FilterdError(message, file=path, line=line, field=col)

        user, day, period, week = get(staff_col), get(day_col).lower(), get(period_col), get(week_col)
        if not user:
            raise err("staff", "empty staff username")
        if known is not None and user.lower() not in known:
            raise err("staff", f"unknown user {user!r}: not in the users file")
        if day not in _DAY_ALIASES:
            raise err("day", f"unknown day {get(day_col)!r} (mon..sun)")
        wd = _DAY_ALIASES[day]
        if not period:
            raise err("period", "empty period")
        if timetable is not None:
            if wd not in days:
                raise err("day", f"{DAY_NAMES[wd]} is not a school day of the timetable")
            if week and not weeks:
                raise err("week", f"week {week!r} given but the timetable has no weeks")
            if week and week not in weeks:
                raise err("week", f"unknown week {week!r} (weeks: {', '.join(weeks)})")
            match = next((p for p in periods if p.lower() == period.lower()), None)
            duty = next((b for b in breaks if b.lower() == period.lower()), None)
            if match is None and duty is None:
                raise err("period", f"unknown period {period!r} (periods: {', '.join(periods)}"
                          + (f"; breaks: {', '.join(breaks)}" if breaks else "") + ")")
        else:
            match, duty = period, None
            seen_days.add(wd)
            if period not in seen_periods:
                seen_periods.append(period)
            if week and week not in seen_weeks:
                seen_weeks.append(week)
        target = on_duty if duty is not None else taught
        target.setdefault(user, set()).add((week or None, wd, duty or match or period))
        taught.setdefault(user, set())

    if timetable is None:
        days = sorted(seen_days)
        periods = sorted(seen_periods, key=_natural)
        weeks = sorted(seen_weeks)
        breaks = []

    def order(e: Entry) -> tuple:
        w, d, name = e
        pos = periods.index(name) if name in periods else (breaks.index(name) if name in breaks else 0)
        return (d, pos, weeks.index(w) if w in weeks else -1)

    def fmt(e: Entry) -> str:
        w, d, name = e
        return " ".join(x for x in (w, DAY_NAMES[d], name) if x)

    out = [f"# [staff.*] tables built by `filterd timetable import` from {path.name}:",
           "# free = every period not taught; duties = breaks on duty. Paste into timetable.toml."]
    if timetable is None:
        out.append("# WARNING: no timetable given: days and periods were taken from the CSV "
                   f"({', '.join(periods)}).")
    for user in sorted(taught, key=str.lower):
        t = taught[user]
        free: list[Entry] = []
        for d in days:
            for p in periods:
                if weeks:
                    free_in = [w for w in weeks if (None, d, p) not in t and (w, d, p) not in t]
                    if len(free_in) == len(weeks):
                        free.append((None, d, p))
                    else:
                        free.extend((w, d, p) for w in free_in)
                elif (None, d, p) not in t:
                    free.append((None, d, p))
        key = user if _BARE_KEY.match(user) else json.dumps(user)
        out.append("")
        out.append(f"[staff.{key}]")
        out.append("free = [" + ", ".join(json.dumps(fmt(e)) for e in sorted(free, key=order)) + "]")
        duty = on_duty.get(user)
        if duty:
            out.append("duties = [" + ", ".join(json.dumps(fmt(e)) for e in sorted(duty, key=order))
                       + "]")
    return "\n".join(out) + "\n"


def _natural(name: str) -> tuple:
    """P2 before P10."""
    return tuple(int(x) if x.isdigit() else x.lower() for x in re.split(r"(\d+)", name))
