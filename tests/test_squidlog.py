"""``filterd import squid-log``: the line parser, and imports that never count twice."""

from __future__ import annotations

import shutil
import sqlite3
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import pytest

from filterd import squidlog
from filterd.errors import FilterdError
from filterd.record import Store
from filterd.squidlog import SquidLine, SquidLineError, import_log, parse_line
from filterd.verdict import Verdict, What, Who

FIXTURE = Path(__file__).parent / "fixtures" / "squid" / "access.log"
LONDON = ZoneInfo("Europe/London")


# --- the parser ---------------------------------------------------------------------------

@pytest.mark.parametrize("line,expected", [
    ("1732540800.123    45 10.20.3.4 TCP_MISS/200 5123 GET http://example.com/x - "
     "HIER_DIRECT/93.184.216.34 text/html",
     SquidLine(1732540800.123, "10.20.3.4", "TCP_MISS", 200, "GET", "http://example.com/x", None, False)),
    ("1732540801.002    310 10.20.3.4 TCP_TUNNEL/200 4410 CONNECT example.com:443 jsmith "
     "HIER_DIRECT/93.184.216.34 -",
     SquidLine(1732540801.002, "10.20.3.4", "TCP_TUNNEL", 200, "CONNECT", "example.com:443", "jsmith", True)),
    ("  1732540802.000      0 10.20.3.5 TCP_DENIED/403 3950 GET http://bad.example/ - HIER_NONE/- text/html\n",
     SquidLine(1732540802.0, "10.20.3.5", "TCP_DENIED", 403, "GET", "http://bad.example/", None, False)),
    ("1732540803 12 2001:DB8:0:0::7 TCP_MISS/200 800 GET http://chat.example/?id=1 SCHOOL%5Cbob "
     "HIER_DIRECT/2001:db8::1 application/json",
     SquidLine(1732540803.0, "2001:db8::7", "TCP_MISS", 200, "GET", "http://chat.example/?id=1", "SCHOOL\\bob", False)),
    ("1732540804.5 1 10.0.0.1 TCP_MISS_ABORTED/000 0 GET http://a.example/ - HIER_DIRECT/1.1.1.1 - "
     "[Host: a.example\\r\\n] []",
     SquidLine(1732540804.5, "10.0.0.1", "TCP_MISS_ABORTED", 0, "GET", "http://a.example/", None, False)),
    ("1732540805.0 1 10.0.0.1 TCP_TUNNEL/200 10 CONNECT [2001:db8::1]:443 - HIER_DIRECT/2001:db8::1 -",
     SquidLine(1732540805.0, "10.0.0.1", "TCP_TUNNEL", 200, "CONNECT", "[2001:db8::1]:443", None, True)),
])
def test_parse_good_lines(line: str, expected: SquidLine) -> None:
    assert parse_line(line) == expected


@pytest.mark.parametrize("line,reason", [
    ("", "empty line"),
    ("   \n", "empty line"),
    ("this line is not a squid line", "expected 10 fields, found 7"),
    ("yesterday 45 10.20.3.4 TCP_MISS/200 5 GET http://e.com/ - HIER_DIRECT/1.2.3.4 text/html", "time is not a number"),
    ("nan 45 10.20.3.4 TCP_MISS/200 5 GET http://e.com/ - HIER_DIRECT/1.2.3.4 text/html", "time out of range"),
    ("-5 45 10.20.3.4 TCP_MISS/200 5 GET http://e.com/ - HIER_DIRECT/1.2.3.4 text/html", "time out of range"),
    ("1732540800.1 45 pc12.school TCP_MISS/200 5 GET http://e.com/ - HIER_DIRECT/1.2.3.4 text/html", "client is not an IP address"),
    ("1732540800.1 45 10.20.3.4 TCP_MISS 5 GET http://e.com/ - HIER_DIRECT/1.2.3.4 text/html", "result code is not CODE/STATUS"),
    ("1732540800.1 45 10.20.3.4 TCP_MISS/abc 5 GET http://e.com/ - HIER_DIRECT/1.2.3.4 text/html", "HTTP status is not a number"),
    ("1732540800.1 45 10.20.3.4 NONE/400 5 NONE error:invalid-request - HIER_NONE/- text/html", "no URL"),
    ("1732540800.1 45 10.20.3.4 NONE/000 0 - error:transaction-end-before-headers - HIER_NONE/- -", "no request method"),
    ("1732540800.1 45 10.20.3.4 TCP_TUNNEL/200 5 CONNECT http://e.com/x - HIER_DIRECT/1.2.3.4 -", "CONNECT target is not host:port"),
])
def test_parse_malformed_lines(line: str, reason: str) -> None:
    with pytest.raises(SquidLineError) as err:
        parse_line(line)
    assert str(err.value).startswith(reason)


# --- imports ------------------------------------------------------------------------------

class Recorder:
    """A deterministic stand-in for Pipeline.request that keeps every call it gets.

    The importer is what is tested here (reading, offsets, chunks); Pipeline's own judgement
    is tested with it in test_pipeline.py. Hosts with '..' are refused like a bad URL.
    """

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[dict] = []
        self.fail_at = fail_at

    def __call__(self, url_or_host: str, *, ip: str | None, user: str | None, at: datetime,
                 method: str | None = None, host_only: bool = False) -> Verdict:
        if self.fail_at is not None and len(self.calls) + 1 == self.fail_at:
            raise RuntimeError("simulated crash")
        host = url_or_host.rsplit(":", 1)[0] if host_only else urlsplit(url_or_host).hostname or ""
        if ".." in host:
            raise ValueError(f"invalid host {host!r}")
        self.calls.append(dict(url=url_or_host, ip=ip, user=user, at=at, method=method, host_only=host_only))
        return Verdict(time=at, who=Who(ip=ip, user=user, role="pupil"),
                       what=What(host=host, url=None if host_only else url_or_host,
                                 categories=("social_media",)),
                       window="contact", action="log", method=method)


def totals(db: Path) -> tuple[int, int]:
    with sqlite3.connect(db) as conn:
        requests, rows = conn.execute("SELECT ifnull(sum(requests), 0), count(*) FROM usage").fetchone()
    return requests, rows


@pytest.fixture()
def log(tmp_path: Path) -> Path:
    path = tmp_path / "access.log"
    shutil.copy(FIXTURE, path)
    return path


@pytest.fixture()
def store(tmp_path: Path):
    s = Store(tmp_path / "filterd.db").open()
    yield s
    s.close()


def test_import_counts_skips_with_line_numbers(log: Path, store: Store, capsys) -> None:
    rec = Recorder()
    stats = import_log(log, rec, store, progress=True, tz=LONDON)
    assert (stats.lines, stats.imported, stats.skipped) == (12, 7, 5)
    assert [n for n, _ in stats.skips] == [5, 6, 8, 9, 10]
    assert stats.skips[0] == (5, "expected 10 fields, found 7")
    assert stats.skips[4][1].startswith("bad URL: invalid host")
    assert stats.end_offset == log.stat().st_size and stats.start_offset == 0
    # each line at its own time, in the school's zone; CONNECT as host only; user decoded
    first, connect, _, ipv6 = rec.calls[:4]
    assert first["at"] == datetime(2026, 3, 23, 10, 0, 0, 123000, tzinfo=LONDON)
    assert first["at"].utcoffset().total_seconds() == 0
    assert (connect["url"], connect["host_only"], connect["user"], connect["method"]) == \
        ("www.instagram.com:443", True, "alice", "CONNECT")
    assert (ipv6["ip"], ipv6["user"]) == ("2001:db8::7", "SCHOOL\\bob")
    assert totals(store.path) == (7, 6)  # lines 1 and 7: same minute, user, ip and host: one row
    summary = stats.summary(max_skips=2)
    assert f"{log}:5: skipped: expected 10 fields" in summary and "and 3 more skipped lines" in summary
    assert capsys.readouterr().err == ""  # not a terminal: no progress line


def test_importing_twice_counts_nothing_twice(log: Path, store: Store) -> None:
    import_log(log, Recorder(), store, tz=LONDON)
    again = import_log(log, Recorder(), store, tz=LONDON)
    assert (again.lines, again.imported, again.start_line) == (0, 0, 12)
    assert totals(store.path) == (7, 6)
    # a renamed file (logrotate's access.log -> access.log.1) is the same source
    renamed = log.with_name("access.log.1")
    log.rename(renamed)
    assert import_log(renamed, Recorder(), store, tz=LONDON).lines == 0
    assert totals(store.path) == (7, 6)


def test_appended_file_imports_only_new_lines(log: Path, store: Store) -> None:
    import_log(log, Recorder(), store, tz=LONDON)
    with log.open("a") as fh:
        fh.write("1774260100.000 5 10.20.3.9 TCP_MISS/200 1 GET http://new.example/ - HIER_DIRECT/1.2.3.4 text/html\n")
        fh.write("garbage\n")
        fh.write("1774260101.000 5 10.20.3.9 TCP_MISS/200 1 GET http://new.example/b - HIER_DIRECT/1.2.3.4 text/html")
    rec = Recorder()
    stats = import_log(log, rec, store, tz=LONDON)
    # the unfinished last line (no newline yet) waits; line numbers continue from the file's start
    assert (stats.lines, stats.imported, stats.skips) == (2, 1, [(14, "expected 10 fields, found 1")])
    assert [c["url"] for c in rec.calls] == ["http://new.example/"]
    with log.open("a") as fh:
        fh.write("\n")
    stats = import_log(log, Recorder(), store, tz=LONDON)
    assert (stats.lines, stats.imported, stats.start_line) == (1, 1, 14)
    assert totals(store.path)[0] == 9


def test_rotated_file_is_a_new_source(log: Path, store: Store) -> None:
    first = import_log(log, Recorder(), store, tz=LONDON)
    log.write_text("1774864800.000 5 10.20.3.9 TCP_MISS/200 1 GET http://week2.example/ - HIER_DIRECT/1.2.3.4 text/html\n")
    second = import_log(log, Recorder(), store, tz=LONDON)
    assert second.source != first.source
    assert (second.lines, second.imported, second.start_offset) == (1, 1, 0)
    assert totals(store.path)[0] == 8


def test_crash_mid_import_resumes_without_double_counting(log: Path, store: Store) -> None:
    with pytest.raises(RuntimeError):
        import_log(log, Recorder(fail_at=6), store, tz=LONDON, chunk_lines=3)
    # chunks of 3 lines: lines 1-9 committed (5 imported) before the 6th import (line 11) failed
    assert totals(store.path)[0] == 5
    resumed = import_log(log, Recorder(), store, tz=LONDON, chunk_lines=3)
    assert (resumed.start_line, resumed.lines, resumed.imported) == (9, 3, 2)
    assert totals(store.path)[0] == 7


def test_truncated_file_is_refused(log: Path, store: Store) -> None:
    import_log(log, Recorder(), store, tz=LONDON)
    head = log.read_text().splitlines(keepends=True)[0]
    log.write_text(head)  # same first line, shorter than what was imported
    with pytest.raises(FilterdError, match="shorter"):
        import_log(log, Recorder(), store, tz=LONDON)
    with pytest.raises(FilterdError, match="cannot read"):
        import_log(log.with_name("missing.log"), Recorder(), store, tz=LONDON)


def test_source_identity_ignores_name_but_not_head(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a.write_bytes(b"line one\nline two\n")
    b.write_bytes(b"line one\nsomething else entirely\n")
    c.write_bytes(b"line 1\n")
    assert squidlog.file_source(a) == squidlog.file_source(b) != squidlog.file_source(c)


# --- the parallel path (worker processes) -------------------------------------------------

class Judge:
    """A picklable, deterministic stand-in for a pipeline, the same in every process.

    Hosts with '..' are a bad URL, with 'crash' an unexpected error; 'block' is a blocked
    incident, 'social' is logged with a category, the rest is allowed with none (what a
    store that does not record allowed requests drops, and the workers do not send back).
    """

    def __call__(self, url_or_host: str, *, ip: str | None, user: str | None, at: datetime,
                 method: str | None = None, host_only: bool = False) -> Verdict:
        host = url_or_host.rsplit(":", 1)[0] if host_only else urlsplit(url_or_host).hostname or ""
        if ".." in host:
            raise ValueError(f"invalid host {host!r}")
        if "crash" in host:
            raise RuntimeError("simulated crash")
        cats = ("social_media",) if "social" in host else ()
        action = "block" if "block" in host else ("log" if cats else "allow")
        return Verdict(time=at, who=Who(ip=ip, user=user, role="pupil", source="auth" if user else "none"),
                       what=What(host=host, url=None if host_only else url_or_host, categories=cats),
                       window="contact", action=action, alert=action == "block",
                       rule="no-bad" if action == "block" else None, method=method)


def judge_factory() -> Judge:
    return Judge()


def broken_factory() -> Judge:
    raise FilterdError("cannot build the pipeline in a worker")


def mixed_log(path: Path, lines: int, extra: bytes = b"") -> None:
    """Every kind of line the importer meets, in a repeatable mix (with a non-UTF-8 line)."""
    hosts = ["www.social.example", "block.example", "plain.example", "other.example", "bad..host"]
    out = []
    for i in range(lines):
        t = 1774260000 + i * 0.7
        host = hosts[i % len(hosts)] if i % 3 else hosts[(i // 3) % 4]
        user = "-" if i % 4 else f"u{i % 7}"
        if i % 101 == 50:
            out.append(b"garbage line\n")
        elif i % 257 == 100:
            out.append(b"1774260000.5 1 10.0.0.1 TCP_MISS/200 5 GET http://caf\xe9.example/ - HIER_DIRECT/1.1.1.1 -\n")
        elif i % 2:
            out.append(f"{t:.3f} 5 10.20.{i % 3}.{i % 11 + 1} TCP_TUNNEL/200 10 CONNECT {host}:443 {user} "
                       "HIER_DIRECT/1.2.3.4 -\n".encode())
        else:
            out.append(f"{t:.3f} 5 10.20.{i % 3}.{i % 11 + 1} TCP_MISS/200 10 GET http://{host}/p?{i} {user} "
                       "HIER_DIRECT/1.2.3.4 text/html\n".encode())
    path.write_bytes(b"".join(out) + extra)


def table(db: Path, name: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        cols = [r[1] for r in conn.execute(f"PRAGMA table_info({name})") if r[1] not in ("id", "ref", "updated")]
        return conn.execute(f"SELECT {', '.join(cols)} FROM {name} ORDER BY {', '.join(cols)}").fetchall()


def test_parallel_import_of_the_fixture_matches(log: Path, store: Store) -> None:
    stats = import_log(log, Recorder(), store, tz=LONDON, chunk_lines=3, workers=2,
                       pipeline_factory=judge_factory)
    assert (stats.lines, stats.imported, stats.skipped) == (12, 7, 5)
    assert [n for n, _ in stats.skips] == [5, 6, 8, 9, 10]
    assert stats.skips[0] == (5, "expected 10 fields, found 7")
    assert stats.skips[4][1].startswith("bad URL: invalid host")
    assert stats.end_offset == log.stat().st_size
    again = import_log(log, Recorder(), store, tz=LONDON, workers=2, pipeline_factory=judge_factory)
    assert (again.lines, again.imported, again.start_line) == (0, 0, 12)


@pytest.mark.parametrize("record_allowed", [False, True])
def test_parallel_import_writes_what_one_process_writes(tmp_path: Path, record_allowed: bool) -> None:
    path = tmp_path / "access.log"
    # the unfinished last line is left for the next import by both paths
    unfinished = b"1774262200.000 5 10.20.3.9 TCP_MISS/200 1 GET http://x.example/"
    mixed_log(path, 3000, extra=unfinished)
    results = {}
    for workers in (1, 2):
        db = tmp_path / f"w{workers}.db"
        with Store(db, record_allowed=record_allowed).open() as s:
            stats = import_log(path, Judge(), s, tz=LONDON, chunk_lines=97, workers=workers,
                               pipeline_factory=judge_factory)
            again = import_log(path, Judge(), s, tz=LONDON, workers=workers, pipeline_factory=judge_factory)
        assert again.lines == 0
        results[workers] = ((stats.lines, stats.imported, stats.skipped, stats.skips, stats.end_offset),
                            table(db, "usage"), table(db, "events"), table(db, "alerts"), table(db, "imports"))
    one, many = results[1], results[2]
    assert one[0][:3] == (3000, 2563, 437) and one[0][4] == path.stat().st_size - len(unfinished)
    assert {reason for _, reason in one[0][3]} == {"expected 10 fields, found 2", "not UTF-8 text",
                                                    "bad URL: invalid host 'bad..host'"}
    assert one[1] and one[2]  # usage rows and incidents were written
    assert many == one


def test_parallel_crash_resumes_without_double_counting(tmp_path: Path, store: Store) -> None:
    path = tmp_path / "access.log"
    mixed_log(path, 1000)
    lines = path.read_bytes().splitlines(keepends=True)
    line = b"1774262000.000 5 10.20.3.9 TCP_MISS/200 1 GET http://%s/ - HIER_DIRECT/1.2.3.4 text/html\n"
    lines[701] = line % b"crash.example"  # line 702: in the 8th chunk of 100 lines
    path.write_bytes(b"".join(lines))
    with pytest.raises(RuntimeError, match="simulated crash"):
        import_log(path, Judge(), store, tz=LONDON, chunk_lines=100, workers=2, pipeline_factory=judge_factory)
    assert store.import_offset(squidlog.file_source(path)) == len(b"".join(lines[:700]))
    done = totals(store.path)[0]
    lines[701] = line % b"plain.example"
    path.write_bytes(b"".join(lines))
    resumed = import_log(path, Judge(), store, tz=LONDON, chunk_lines=100, workers=2,
                         pipeline_factory=judge_factory)
    assert (resumed.start_line, resumed.lines) == (700, 300)
    assert all(n > 700 for n, _ in resumed.skips)
    with Store(tmp_path / "once.db").open() as once:
        import_log(path, Judge(), once, tz=LONDON, workers=1)
    assert totals(store.path)[0] == totals(once.path)[0] > done


def test_worker_pipeline_error_is_reported(tmp_path: Path, store: Store) -> None:
    path = tmp_path / "access.log"
    mixed_log(path, 50)
    with pytest.raises(FilterdError, match="cannot build the pipeline in a worker"):
        import_log(path, Judge(), store, tz=LONDON, chunk_lines=10, workers=2, pipeline_factory=broken_factory)
    assert totals(store.path) == (0, 0) and store.import_offset(squidlog.file_source(path)) == 0


def test_small_files_and_plain_callables_stay_in_process(log: Path, store: Store, monkeypatch) -> None:
    def no_pool(*args, **kwargs):
        raise AssertionError("worker processes started")

    monkeypatch.setattr(squidlog, "_import_parallel", no_pool)
    assert import_log(log, Recorder(), store, tz=LONDON, pipeline_factory=judge_factory).imported == 7
    assert import_log(log, Recorder(), store, tz=LONDON, workers=4).lines == 0  # no factory


def test_chunks_are_whole_lines_of_the_asked_size() -> None:
    import io
    import random

    rng = random.Random(3)
    for _ in range(300):
        lines = [b"x" * rng.randrange(0, 30) + b"\n" for _ in range(rng.randrange(0, 60))]
        unfinished = b"y" * rng.randrange(0, 5)
        size, block = rng.randrange(1, 10), rng.randrange(1, 50)
        got = list(squidlog._chunks(io.BytesIO(b"".join(lines) + unfinished), size, block))
        assert b"".join(data for data, _ in got) == b"".join(lines)
        assert [n for _, n in got] == [data.count(b"\n") for data, _ in got]
        assert all(n == size for _, n in got[:-1]) and (not got or 0 < got[-1][1] <= size)
