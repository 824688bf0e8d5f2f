"""The window stage: timetable edges, daylight saving, week A/B, staff tables, validation."""

from __future__ import annotations

import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from filterd.errors import FilterdError
from filterd.resources import shipped
from filterd.window import import_staff_csv, load_timetable, parse_timetable, week_grid

FIX = Path(__file__).parent / "fixtures" / "timetables"
LONDON = ZoneInfo("Europe/London")
UTC = timezone.utc


@pytest.fixture(scope="module")
def dst():
    return load_timetable(FIX / "dst.toml")


@pytest.fixture(scope="module")
def ab():
    return load_timetable(FIX / "ab.toml")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def ldn(*args: int) -> datetime:
    return datetime(*args, tzinfo=LONDON)


# -- edges --------------------------------------------------------------------------------------

@pytest.mark.parametrize("at, expected", [
    (ldn(2026, 3, 10, 0, 59, 59), "out_of_hours"),       # before the first period (E1)
    (ldn(2026, 3, 10, 1, 0), "contact"),
    (ldn(2026, 3, 10, 8, 49, 59), "non_contact"),        # between E2 and P1
    (ldn(2026, 3, 10, 8, 50), "contact"),                # start inclusive
    (ldn(2026, 3, 10, 9, 49, 59, 999999), "contact"),
    (ldn(2026, 3, 10, 9, 50), "contact"),                # P1 end exclusive = P2 start
    (ldn(2026, 3, 10, 10, 50), "non_contact"),           # P2 end exclusive: the gap
    (ldn(2026, 3, 10, 11, 9, 59), "non_contact"),
    (ldn(2026, 3, 10, 11, 10), "contact"),
    (ldn(2026, 3, 10, 12, 9, 59), "contact"),
    (ldn(2026, 3, 10, 12, 10), "out_of_hours"),          # after the last period
    (ldn(2026, 3, 10, 1, 45), "non_contact"),            # between E1 and E2
    (ldn(2026, 3, 31, 9, 0), "out_of_hours"),            # closed day
    (ldn(2026, 3, 1, 9, 0), "out_of_hours"),             # the day before the term
    (ldn(2026, 3, 2, 9, 0), "contact"),                  # first day of term (inclusive)
    (ldn(2026, 4, 2, 9, 0), "contact"),                  # last day of term (inclusive)
    (ldn(2026, 4, 3, 9, 0), "out_of_hours"),             # the day after
    (ldn(2026, 7, 15, 9, 0), "out_of_hours"),            # summer holiday
])
def test_window_edges(dst, at, expected):
    assert dst.window(at, None, None) == expected


@pytest.mark.parametrize("at, expected", [
    # spring forward, Sun 29 March 2026: 01:00 GMT becomes 02:00 BST; 01:xx local never happens
    (utc(2026, 3, 29, 0, 30), "out_of_hours"),      # 00:30 GMT
    (utc(2026, 3, 29, 0, 59, 59), "out_of_hours"),  # 00:59:59 GMT: E1 (01:00) never starts
    (utc(2026, 3, 29, 1, 0), "contact"),            # 02:00 BST: E2 starts
    (utc(2026, 3, 29, 1, 59, 59), "contact"),       # 02:59:59 BST
    (utc(2026, 3, 29, 2, 0), "non_contact"),        # 03:00 BST: E2 ended
    (utc(2026, 3, 27, 8, 50), "contact"),           # Friday before: 08:50 GMT = 08:50 UTC
    (utc(2026, 3, 27, 8, 49), "non_contact"),
    (utc(2026, 3, 27, 12, 9, 59), "contact"),       # 12:09:59 GMT: end of P3
    (utc(2026, 3, 27, 12, 10), "out_of_hours"),
    (utc(2026, 3, 30, 7, 50), "contact"),           # Monday after: 08:50 BST = 07:50 UTC
    (utc(2026, 3, 30, 7, 49, 59), "non_contact"),
    (utc(2026, 3, 30, 11, 9, 59), "contact"),       # 12:09:59 BST
    (utc(2026, 3, 30, 11, 10), "out_of_hours"),     # 12:10 BST: after P3
    # fall back, Sun 25 October 2026: 02:00 BST becomes 01:00 GMT; 01:xx local happens twice
    (utc(2026, 10, 24, 23, 59), "out_of_hours"),    # 00:59 BST
    (utc(2026, 10, 25, 0, 0), "contact"),           # 01:00 BST: E1
    (utc(2026, 10, 25, 0, 30), "non_contact"),      # 01:30 BST: gap
    (utc(2026, 10, 25, 1, 0), "contact"),           # 01:00 GMT: E1 again
    (utc(2026, 10, 25, 1, 29, 59), "contact"),
    (utc(2026, 10, 25, 1, 30), "non_contact"),      # 01:30 GMT
    (utc(2026, 10, 25, 2, 0), "contact"),           # 02:00 GMT: E2
    (utc(2026, 10, 23, 7, 50), "contact"),          # Friday before: 08:50 BST
    (utc(2026, 10, 23, 11, 10), "out_of_hours"),    # 12:10 BST
    (utc(2026, 10, 26, 7, 50), "non_contact"),      # Monday after: 07:50 GMT
    (utc(2026, 10, 26, 8, 50), "contact"),          # 08:50 GMT
    (utc(2026, 10, 26, 12, 9, 59), "contact"),      # 12:09:59 GMT
    (utc(2026, 10, 26, 12, 10), "out_of_hours"),
])
def test_daylight_saving(dst, at, expected):
    assert dst.window(at) == expected


@pytest.mark.parametrize("at", [
    datetime.fromisoformat("2026-03-30T03:50:00-04:00"),   # New York (already on EDT)
    datetime.fromisoformat("2026-03-30T16:50:00+09:00"),   # Tokyo
    datetime(2026, 3, 30, 9, 50, tzinfo=ZoneInfo("Europe/Paris")),   # CEST
    datetime(2026, 3, 30, 7, 50, tzinfo=UTC),
])
def test_any_timezone_is_converted(dst, at):
    assert dst.window(at) == "contact"   # 08:50 BST: P1 starts
    assert dst.window(at - timedelta(seconds=1)) == "non_contact"
    assert dst.window(at + timedelta(hours=3, minutes=20)) == "out_of_hours"   # 12:10 BST


def test_naive_datetime_is_rejected(dst):
    with pytest.raises(ValueError, match="naive"):
        dst.window(datetime(2026, 3, 10, 9, 0))


def test_other_timetable_zone():
    tt = parse_timetable("""
timezone = "America/New_York"
terms = [["2026-03-02", "2026-03-20"]]
periods = [{ name = "P1", start = "08:00", end = "09:00" }]
""")
    # 8 March 2026: US clocks go forward; 9 March 08:00 EDT = 12:00 UTC
    assert tt.window(utc(2026, 3, 9, 12, 0)) == "contact"
    assert tt.window(utc(2026, 3, 9, 13, 0)) == "out_of_hours"
    assert tt.window(utc(2026, 3, 6, 13, 0)) == "contact"   # EST: 08:00 = 13:00 UTC


def test_default_days_and_timezone():
    tt = parse_timetable('terms = [["2026-09-01", "2026-12-18"]]\n'
                         'periods = [{ name = "P1", start = "09:00", end = "10:00" }]\n')
    assert tt.tz.key == "Europe/London"
    assert tt.window(ldn(2026, 9, 4, 9, 0)) == "contact"   # Friday
    assert tt.window(ldn(2026, 9, 5, 9, 0)) == "out_of_hours"   # Saturday


# -- week A/B, free periods, duties -------------------------------------------------------------

@pytest.mark.parametrize("day, week", [
    ("2026-09-07", "A"), ("2026-09-13", "A"), ("2026-09-14", "B"), ("2026-11-16", "A"),
    ("2026-12-14", "A"), ("2026-12-21", "B"), ("2026-12-28", "A"),   # holidays count
    ("2027-01-04", "A"), ("2027-01-11", "B"),                          # restart after Christmas
    ("2026-08-31", "B"),                                               # before week_start
])
def test_week_rotation(ab, day, week):
    from datetime import date
    assert ab.week_of(date.fromisoformat(day)) == week


@pytest.mark.parametrize("at, user, expected", [
    (ldn(2026, 11, 16, 10, 0), "jsmith", "non_contact"),    # mon P2 free every week
    (ldn(2026, 11, 23, 10, 0), "jsmith", "non_contact"),
    (ldn(2026, 11, 16, 10, 0), "apatel", "contact"),
    (ldn(2026, 11, 16, 10, 0), None, "contact"),
    (ldn(2026, 11, 18, 9, 0), "jsmith", "non_contact"),     # A wed P1 (W47 is week A)
    (ldn(2026, 11, 25, 9, 0), "jsmith", "contact"),         # W48 is week B
    (ldn(2026, 11, 25, 11, 10), "jsmith", "non_contact"),   # B wed P3
    (ldn(2026, 11, 18, 11, 10), "jsmith", "contact"),
    (ldn(2026, 11, 17, 10, 50), "jsmith", "contact"),       # tue break duty
    (ldn(2026, 11, 17, 11, 9, 59), "jsmith", "contact"),
    (ldn(2026, 11, 17, 11, 10), "jsmith", "contact"),       # P3 anyway
    (ldn(2026, 11, 17, 10, 50), "apatel", "non_contact"),   # no duty
    (ldn(2026, 11, 26, 13, 10), "jsmith", "contact"),       # B thu lunch duty
    (ldn(2026, 11, 19, 13, 10), "jsmith", "non_contact"),   # week A: no duty
    (ldn(2026, 11, 20, 15, 0), "apatel", "out_of_hours"),   # closed INSET day
    (ldn(2026, 11, 27, 15, 0), "apatel", "non_contact"),    # fri P6, table written APatel
    (ldn(2026, 11, 27, 15, 0), "APATEL", "non_contact"),
    (ldn(2026, 11, 27, 13, 55), "pupil1", "contact"),
])
def test_staff_free_and_duties(ab, at, user, expected):
    assert ab.window(at, user, "staff") == expected


def test_staff_set(ab):
    assert ab.staff == frozenset({"jsmith", "APatel"})


def test_week_grid(ab):
    grid = week_grid(ab, "2026-W47", "jsmith")
    lines = grid.splitlines()
    assert lines[0].startswith("2026-W47 (week A)")
    row = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")[1:]]
           for line in lines if "|" in line}
    assert row["P2 09:50-10:50"] == ["non_contact", "contact", "contact", "contact", "closed"]
    assert row["P1 08:50-09:50"][2] == "non_contact"
    assert row["break 10:50-11:10"][:2] == ["non_contact", "contact"]
    assert row["lunch 13:10-13:55"][3] == "non_contact"
    assert row["before 08:50"][0] == "out_of_hours"
    assert row["after 15:50"][0] == "out_of_hours"
    b = week_grid(ab, "2026-W48", "jsmith")
    assert "(week B)" in b and "lunch 13:10-13:55 | non_contact  | non_contact  | non_contact  | contact" in b
    holiday = week_grid(ab, "2026-W52", None)
    assert "not in a term: mon 21 Dec" in holiday and "contact " not in holiday


@pytest.mark.parametrize("week", ["2026-47", "2026-W54", "W47", ""])
def test_week_grid_bad_week(ab, week):
    with pytest.raises(ValueError, match="bad week"):
        week_grid(ab, week, None)


def test_shipped_timetable_and_users():
    from filterd.identify import load_users
    directory = load_users(shipped("config") / "users.csv")
    tt = load_timetable(shipped("config") / "timetable.toml", known_users=directory.usernames)
    assert tt.staff <= directory.usernames
    assert tt.weeks == ("A", "B")
    assert tt.window(ldn(2026, 11, 20, 10, 0), "jsmith") == "out_of_hours"    # INSET
    assert tt.window(ldn(2026, 10, 28, 10, 0), "jsmith") == "out_of_hours"    # half term
    assert tt.window(ldn(2026, 11, 16, 10, 0), "jsmith") == "non_contact"
    assert tt.window(ldn(2026, 11, 17, 10, 55), "jsmith") == "contact"        # duty


# -- validation ---------------------------------------------------------------------------------

BASE = [
    ("tz", 'timezone = "Europe/London"'),
    ("terms", 'terms = [["2026-09-01", "2026-12-18"]]'),
    ("closed", 'closed = ["2026-11-20"]'),
    ("days", 'days = ["mon", "tue", "wed", "thu", "fri"]'),
    ("periods", "periods = ["),
    ("p1", '  { name = "P1", start = "08:50", end = "09:50" },'),
    ("p2", '  { name = "P2", start = "09:50", end = "10:50" },'),
    ("p3", '  { name = "P3", start = "11:10", end = "12:10" },'),
    ("pend", "]"),
    ("breaks", 'breaks = [{ name = "break", start = "10:50", end = "11:10" }]'),
    ("weeks", ""),
    ("staff", "[staff.jsmith]"),
    ("free", 'free = ["mon P2"]'),
    ("duties", 'duties = ["tue break"]'),
]


def _text(key: str, new: str) -> tuple[str, int]:
    lines = [new if k == key else v for k, v in BASE]
    return "\n".join(lines) + "\n", [k for k, _ in BASE].index(key) + 1


def test_base_is_valid():
    tt = parse_timetable(_text("tz", 'timezone = "Europe/London"')[0], known_users=["jsmith"])
    assert tt.window(ldn(2026, 11, 16, 10, 0), "jsmith") == "non_contact"


@pytest.mark.parametrize("key, new, field, words", [
    ("p2", '  { name = "P2", start = "09:50", end = "09:40" },', "periods[1].end", "not after start"),
    ("p2", '  { name = "P2", start = "09:50", end = "09:50" },', "periods[1].end", "not after start"),
    ("p3", '  { name = "P3", start = "10:30", end = "11:00" },', "periods[2]", "overlaps"),
    ("p1", '  { name = "P1", start = "8.50", end = "09:50" },', "periods[0].start", "bad time"),
    ("p1", '  { name = "P1", start = "25:00", end = "26:00" },', "periods[0].start", "bad time"),
    ("p1", '  { name = "P2", start = "08:00", end = "08:30" },', "periods[1].name", "used twice"),
    ("p1", '  { name = "P1", start = "08:50", stop = "09:50" },', "periods[0].stop", "unknown key"),
    ("days", 'days = ["mon", "tues", "wed"]', "days[1]", "unknown day"),
    ("days", 'days = ["mon", "mon"]', "days[1]", "twice"),
    ("terms", 'terms = [["2026-09-01", "2026-13-18"]]', "terms[0][1]", "bad date"),
    ("terms", 'terms = [["2026-12-18", "2026-09-01"]]', "terms[0]", "before it starts"),
    ("terms", 'terms = [["2026-09-01", "2026-12-18"], ["2026-12-01", "2027-01-10"]]', "terms[1]",
     "overlaps"),
    ("closed", 'closed = ["20/11/2026"]', "closed[0]", "bad date"),
    ("tz", 'timezone = "Europe/Londres"', "timezone", "unknown time zone"),
    ("tz", 'timezone = "Europe/London"\nperods = []', "perods", "did you mean 'periods'"),
    ("breaks", 'breaks = [{ name = "break", start = "10:40", end = "11:10" }]', "breaks[0]",
     "overlaps period P2"),
    ("breaks", 'breaks = [{ name = "break", start = "12:10", end = "12:30" }]', "breaks[0]",
     "outside the school day"),
    ("breaks", 'breaks = [{ name = "P1", start = "10:50", end = "11:10" }]', "breaks[0].name",
     "used twice"),
    ("free", 'free = ["mon P2", "mon P9"]', "staff.jsmith.free[1]", "unknown period 'P9'"),
    ("free", 'free = ["sat P2"]', "staff.jsmith.free[0]", "unknown day"),
    ("free", 'free = ["monday"]', "staff.jsmith.free[0]", "write"),
    ("free", 'free = ["A mon P2"]', "staff.jsmith.free[0]", "no weeks"),
    ("free", 'free = "mon P2"', "staff.jsmith.free", "must be a list"),
    ("duties", 'duties = ["tue lunch"]', "staff.jsmith.duties[0]", "unknown break 'lunch'"),
    ("duties", 'duties = ["tue P1"]', "staff.jsmith.duties[0]", "unknown break"),
    ("duties", 'dutys = ["tue break"]', "staff.jsmith.dutys", "unknown key"),
    ("weeks", 'weeks = ["A", "B"]', "week_start", "missing"),
    ("weeks", 'weeks = ["A"]\nweek_start = "2026-09-07"', "weeks", "at least two"),
    ("weeks", 'weeks = ["A", "B"]\nweek_start = "2026-09-31"', "week_start", "bad date"),
    ("weeks", 'weeks = ["A", "B"]\nweek_start = "2026-09-07"\nweek_restarts = { "2027-01-04" = "C" }',
     "week_restarts.2027-01-04", "unknown week"),
    ("weeks", 'week_start = "2026-09-07"', "week_start", "needs weeks"),
    ("staff", "[staff.jsmith]\nfree = [\"mon P2\"]\n[staff.ghost]", "staff.ghost", "unknown user"),
])
def test_validation_errors(key, new, field, words):
    text, line = _text(key, new)
    with pytest.raises(FilterdError) as e:
        parse_timetable(text, "school/timetable.toml", known_users=["jsmith"])
    err = e.value
    assert err.field == field
    assert words in err.message
    assert err.file == "school/timetable.toml"
    assert err.line is not None and line <= err.line <= line + 3, (err.line, line)
    assert str(err).startswith(f"school/timetable.toml:{err.line}: {field}: ")


@pytest.mark.parametrize("text, field", [
    ('periods = [{ name = "P1", start = "08:50", end = "09:50" }]', "terms"),
    ('terms = [["2026-09-01", "2026-12-18"]]', "periods"),
    ('terms = [["2026-09-01", "2026-12-18"]]\nperiods = []', "periods"),
    ('terms = [["2026-09-01"]]\nperiods = [{ name = "P1", start = "08:50", end = "09:50" }]',
     "terms[0]"),
])
def test_missing_parts(text, field):
    with pytest.raises(FilterdError) as e:
        parse_timetable(text, "t.toml")
    assert e.value.field == field


def test_toml_syntax_error_has_line(tmp_path):
    p = tmp_path / "timetable.toml"
    p.write_text('timezone = "Europe/London"\nterms = [["2026-09-01", \n\n= 3\n')
    with pytest.raises(FilterdError) as e:
        load_timetable(p)
    assert e.value.file == str(p) and e.value.line is not None and "not valid TOML" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FilterdError, match="timetable not found"):
        load_timetable(tmp_path / "nope.toml")


def test_toml_dates_and_times_accepted():
    tt = parse_timetable('terms = [[2026-09-01, 2026-12-18]]\nclosed = [2026-11-20]\n'
                         'periods = [{ name = "P1", start = 08:50:00, end = 09:50:00 }]\n')
    assert tt.window(ldn(2026, 11, 19, 8, 50)) == "contact"
    assert tt.window(ldn(2026, 11, 20, 8, 50)) == "out_of_hours"


# -- timetable import ---------------------------------------------------------------------------

def test_import_staff_csv_round_trip():
    small = FIX / "export-small.toml"
    tt = load_timetable(small)
    toml = import_staff_csv(FIX / "export.csv", tt)
    staff = tomllib.loads(toml)["staff"]
    assert staff["jsmith"] == {
        "free": ["mon P2", "B tue P1", "A tue P2", "tue P3", "wed P1", "wed P2", "wed P3"],
        "duties": ["wed break"],
    }
    assert staff["apatel"]["free"] == ["mon P1", "mon P2", "mon P3", "tue P1", "tue P2", "tue P3",
                                       "wed P1", "wed P2"]
    merged = parse_timetable(small.read_text() + "\n" + toml, known_users=["jsmith", "apatel"])
    # 2026-09-08 is a Tuesday of week A (week_start 2026-09-07): jsmith teaches P1, free in P2
    assert merged.window(ldn(2026, 9, 8, 9, 0), "jsmith") == "contact"
    assert merged.window(ldn(2026, 9, 8, 10, 0), "jsmith") == "non_contact"
    assert merged.window(ldn(2026, 9, 15, 9, 0), "jsmith") == "non_contact"   # week B
    assert merged.window(ldn(2026, 9, 15, 10, 0), "jsmith") == "contact"
    assert merged.window(ldn(2026, 9, 9, 11, 0), "jsmith") == "contact"       # wed break duty


def test_import_without_timetable_warns():
    toml = import_staff_csv(FIX / "export.csv")
    assert "WARNING: no timetable given" in toml
    assert set(tomllib.loads(toml)["staff"]) == {"jsmith", "apatel"}


def test_import_quotes_odd_usernames(tmp_path):
    p = tmp_path / "e.csv"
    p.write_text("teacher,day,period\nj.smith@school,mon,P1\n")
    tt = parse_timetable('terms = [["2026-09-01", "2026-12-18"]]\ndays = ["mon"]\n'
                         'periods = [{ name = "P1", start = "09:00", end = "10:00" },'
                         ' { name = "P2", start = "10:00", end = "11:00" }]\n')
    assert tomllib.loads(import_staff_csv(p, tt))["staff"]["j.smith@school"]["free"] == ["mon P2"]


@pytest.mark.parametrize("rows, line, field, words", [
    ("day,period\nmon,P1\n", 1, "staff", "missing column 'staff'"),
    ("staff,period\njsmith,P1\n", 1, "day", "missing column 'day'"),
    ("staff,day,period\njsmith,mon,P1\njsmith,mon,P7\n", 3, "period", "unknown period 'P7'"),
    ("staff,day,period\njsmith,mon,P1\njsmith,fri,P1\n", 3, "day", "not a school day"),
    ("staff,day,period\njsmith,funday,P1\n", 2, "day", "unknown day"),
    ("staff,day,period\n,mon,P1\n", 2, "staff", "empty staff"),
    ("staff,day,period\njsmith,mon,\n", 2, "period", "empty period"),
    ("staff,day,period,week\njsmith,mon,P1,C\n", 2, "week", "unknown week 'C'"),
    ("staff,day,period\nghost,mon,P1\n", 2, "staff", "unknown user"),
    ("", 1, None, "empty file"),
])
def test_import_errors(tmp_path, rows, line, field, words):
    p = tmp_path / "export.csv"
    p.write_text(rows)
    tt = load_timetable(FIX / "export-small.toml")
    with pytest.raises(FilterdError) as e:
        import_staff_csv(p, tt, known_users=["jsmith"])
    assert (e.value.line, e.value.field) == (line, field)
    assert words in e.value.message and e.value.file == str(p)


def test_import_week_without_weeks(tmp_path):
    p = tmp_path / "export.csv"
    p.write_text("staff,day,period,week\njsmith,mon,P1,A\n")
    tt = parse_timetable('terms = [["2026-09-01", "2026-12-18"]]\n'
                         'periods = [{ name = "P1", start = "09:00", end = "10:00" }]\n')
    with pytest.raises(FilterdError, match="no weeks") as e:
        import_staff_csv(p, tt)
    assert e.value.line == 2
