"""The event store: one SQLite file (WAL) that every other part reads, written by one thread.

Why it is built this way:

- **Incidents first, and durable before they are answered.** ``commit_incident`` queues a block,
  alert or bypass ahead of any usage; the writer thread commits it (its ``events`` row, its
  ``alerts`` outbox row when it alerts, and its count in ``usage``) in one transaction and only
  then resolves the future the addon awaits before it returns the block page.
- **Usage is written behind.** ``add_usage`` only appends to a deque (no lock, no I/O: a few
  hundred nanoseconds on the proxy's event loop). The writer thread folds the queue into one
  counter per (minute, user, ip, host, window, action, rule) and upserts those counters in
  batches, so a 1,500-pupil day is some hundred thousand rows, not millions of requests
  (bench/bench_store.py: 2.9 M categorised requests -> 0.77 M rows, about 150 MB).
- **Readers never wait for the writer.** Every read opens its own connection; in WAL mode a
  reader sees the last commit and never blocks, nor is blocked by, a writer. Another process
  (the sensor) may write the same file: every writer has a busy timeout and retries with backoff.
- **Failure is visible, bounded and never silent.** A locked database is retried with backoff;
  a full disk or an I/O error is logged on ``filterd.record`` once per distinct error, counted
  in ``stats()``, and the data is kept for the next attempt. The usage queue is bounded (the
  oldest usage is dropped first, and counted); incidents are never dropped silently: their
  future raises, so the addon can fail closed, and the incident itself is retried later.

Durability (``synchronous``): transactions that hold an incident, and alert delivery state,
run with ``synchronous=FULL``: the WAL is fsync'ed at COMMIT, so they survive a power cut.
Usage batches run with ``synchronous=NORMAL``: in WAL mode a commit is written to the OS before
COMMIT returns, so it survives ``kill -9`` of the daemon, and only a power cut or kernel crash
can lose the last batches (never corrupting the file). A usage count is worth less than an
fsync per second; a block's evidence and an alert are not.

Times: ``events.time`` keeps the verdict's own ISO-8601 time with its offset (what the block
page showed); ``events.ts`` and the usage ``minute`` (unix time // 60) are for ordering and
ranges. ``events()`` renders a usage minute in the store's ``tz`` (UTC, "+00:00", unless given).

Privacy: only the tables' columns (``filterd/migrations.py``, the README) are stored; never a
body, cookie, header or password. ``url`` is stored for incidents only; usage rows hold the host.

``usage`` counts every recorded request, incidents included (``blocked`` counts the blocks), so
that reports can total requests from one table; ``events`` holds each incident's detail. Call
``commit_incident`` *or* ``add_usage`` for a request, not both.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone, tzinfo
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from filterd.errors import FilterdError
from filterd.migrations import LEASE_KEY, SCHEMA_VERSION, USAGE_KEY, migrate
from filterd.verdict import Verdict

log = logging.getLogger("filterd.record")

T = TypeVar("T")

#: A persisting error is logged again (with its count) only after this many seconds.
LOG_AGAIN = 600.0
#: Alert states after which an alert needs nothing more (retention may delete it).
ALERT_DONE = ("sent", "grouped", "failed")

_EVENT_COLUMNS = ("ref", "time", "ts", "kind", "user", "role", "ip", "device", "host", "url",
                  "categories", "window", "action", "rule", "alert", "method", "detail", "source")
_INSERT_EVENT = (f"INSERT OR IGNORE INTO events ({', '.join(_EVENT_COLUMNS)}) "
                 f"VALUES ({', '.join('?' * len(_EVENT_COLUMNS))})")
_INSERT_ALERT = ("INSERT OR IGNORE INTO alerts (event_ref, created, state, attempts, next_attempt) "
                 "VALUES (?, ?, 'pending', 0, ?)")
_UPSERT_USAGE = (
    "INSERT INTO usage (minute, user, ip, host, window, action, rule, role, device, categories,"
    " source, requests, blocked) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    f" ON CONFLICT ({USAGE_KEY}) DO UPDATE SET requests = requests + excluded.requests,"
    " blocked = blocked + excluded.blocked"
)
_UPSERT_LEASE = (
    "INSERT INTO leases (mac, ip, hostname, user, start, expires, seen)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
    f" ON CONFLICT ({LEASE_KEY}) DO UPDATE SET hostname = excluded.hostname,"
    " user = excluded.user, start = excluded.start, expires = excluded.expires,"
    " seen = excluded.seen"
)
_UPSERT_IMPORT = (
    'INSERT INTO imports (source, path, "offset", lines, updated) VALUES (?, ?, ?, ?, ?)'
    ' ON CONFLICT (source) DO UPDATE SET path = coalesce(excluded.path, path),'
    ' "offset" = excluded."offset", lines = coalesce(excluded.lines, lines),'
    " updated = excluded.updated"
)

#: (minute, user, ip, host, window, action, rule); the writer maps each to
#: [requests, blocked, role, device, categories, source].
UsageKey = tuple[int, str | None, str | None, str, str, str, str | None]


class StoreClosedError(RuntimeError):
    """The store is not open (never opened, or closed): nothing can be committed."""


def _is_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED: someone else holds the write lock; worth waiting for."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (5, 6)
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _describe(exc: BaseException) -> str:
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    return f"{name}: {exc}"


def _aware(t: datetime) -> datetime:
    """Verdict times are aware; a naive one is taken as local time rather than guessed as UTC."""
    return t if t.tzinfo is not None else t.astimezone()


def _epoch(value: float | datetime | None) -> float | None:
    if value is None or isinstance(value, (int, float)):
        return value
    return _aware(value).timestamp()


def _cats(categories: tuple[str, ...] | Sequence[str]) -> str:
    if type(categories) is tuple:
        return _cats_of_tuple(categories)
    return json.dumps(list(categories))


@functools.lru_cache(maxsize=4096)
def _cats_of_tuple(categories: tuple[str, ...]) -> str:
    """Verdicts carry a few dozen distinct category tuples: encode each once."""
    return json.dumps(list(categories))


def _event_row(v: Verdict, source: str) -> tuple[Any, ...]:
    t = _aware(v.time)
    w, q = v.who, v.what
    return (v.ref, t.isoformat(), t.timestamp(), v.event_kind, w.user, w.role, w.ip, w.device,
            q.host, q.url if v.is_incident else None, _cats(q.categories), v.window, v.action,
            v.rule, int(v.alert), v.method, v.detail, source)


def _usage_params(key: UsageKey, value: list[Any]) -> tuple[Any, ...]:
    requests, blocked, role, device, categories, source = value
    return (*key, role, device, _cats(categories), source, requests, blocked)


def _fold(pending: dict[UsageKey, list[Any]], v: Verdict, source: str) -> None:
    """Count one request into the per-minute counters (the hot loop of the writer thread).

    A naive time's ``timestamp()`` is local time, as ``_aware`` would make it.
    """
    w = v.who
    key = (int(v.time.timestamp() // 60), w.user, w.ip, v.what.host, v.window, v.action, v.rule)
    row = pending.get(key)
    if row is None:
        pending[key] = [1, 1 if v.action == "block" else 0, w.role, w.device, v.what.categories,
                        source]
    else:
        row[0] += 1
        if v.action == "block":
            row[1] += 1


class Store:
    """The SQLite event store (see the module docstring for why it works as it does).

    ``max_bytes`` caps the file (``PRAGMA max_page_count``) so that a runaway never fills the
    gateway's disk; at the cap, writes fail like a full disk. ``tz`` is the zone in which
    ``events()`` renders usage minutes. ``max_queue`` bounds the usage requests held in memory
    (queued or waiting for a retry); ``max_retry_incidents`` bounds incidents waiting for retry.
    """

    def __init__(self, path: Path, *, batch_size: int = 5000, flush_seconds: float = 1.0,
                 busy_timeout: float = 10.0, record_allowed: bool = False,
                 max_bytes: int | None = None, tz: tzinfo | None = None,
                 max_queue: int = 200_000, max_retry_incidents: int = 10_000) -> None:
        self.path = Path(path)
        self.batch_size = max(1, batch_size)
        self.flush_seconds = flush_seconds
        self.busy_timeout = busy_timeout
        self.record_allowed = record_allowed
        self.max_bytes = max_bytes
        self.tz = tz or timezone.utc
        self.max_queue = max_queue
        self.max_retry_incidents = max_retry_incidents
        # Producers -> writer thread: one deque of verdicts per source (no tuple per call: the
        # allocation, and the garbage collections it triggers, would cost more than the append).
        # deque.append/popleft are atomic under the GIL, so no lock on the hot path.
        self._queues: dict[str, deque[Verdict]] = {}
        self._incidents: deque[tuple[Verdict, str, concurrent.futures.Future[None], float]]
        self._incidents = deque()  # (verdict, source, future, queued at monotonic)
        # Writer thread only.
        self._pending: dict[UsageKey, list[Any]] = {}
        self._pending_requests = 0
        self._retry: deque[tuple[Verdict, str]] = deque()
        self._conn: sqlite3.Connection | None = None
        self._last_flush = time.monotonic()
        self._retry_at = 0.0
        self._backoff = 0.0
        # Shared.
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._flush_waiters: list[threading.Event] = []
        self._thread: threading.Thread | None = None
        self._dropped_raw = 0  # counted by the producers' threads, never by the writer
        self._stopping = False
        self._stop_deadline = 0.0
        self._open = False
        self._seen_errors: dict[str, float] = {}  # error text -> when it was last logged
        self._said_recovered = False
        self._stats: dict[str, Any] = {
            "committed": 0, "committed_incidents": 0, "committed_usage": 0, "usage_rows": 0,
            "batches": 0, "dropped": 0, "dropped_incidents": 0, "failed_incidents": 0,
            "retried_incidents": 0, "errors": 0, "locked_retries": 0, "last_error": None,
        }

    # ----------------------------------------------------------------------------- lifecycle

    def open(self) -> Store:
        """Create the folder and file, switch to WAL, migrate, and start the writer thread."""
        if self._open:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._connect(limit_size=False)
        except (OSError, sqlite3.Error) as exc:
            raise FilterdError(f"cannot open the database: {exc}", file=self.path) from None
        try:
            mode = self._retry_busy(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
            if str(mode).lower() != "wal":
                raise FilterdError(f"cannot switch the database to WAL mode (got {mode})",
                                   file=self.path)
            self._retry_busy(lambda: migrate(conn, self.path))
        except sqlite3.Error as exc:
            conn.close()
            raise FilterdError(f"cannot open the database: {exc}", file=self.path) from None
        except BaseException:
            conn.close()
            raise
        self._apply_size_limit(conn)
        self._conn = conn
        self._stopping = False
        self._open = True
        self._thread = threading.Thread(target=self._run, name="filterd-record", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Commit everything queued (waiting up to ``timeout``), then stop the writer thread."""
        if not self._open:
            return
        self._open = False  # refuse new work from now on
        with self._lock:
            self._stop_deadline = time.monotonic() + max(0.0, timeout - 0.2)
            self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("store writer did not finish within %.1fs; %d usage requests and %d "
                            "incidents still queued are lost", timeout, self._queued(),
                            len(self._incidents))
        self._thread = None

    def __enter__(self) -> Store:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------- writing

    def commit_incident(self, verdict: Verdict, *, source: str = "proxy"
                        ) -> concurrent.futures.Future[None]:
        """Queue an incident ahead of all usage; the future resolves once it is COMMITted.

        The future raises (sqlite3.Error, StoreClosedError) when it could not be committed,
        so the caller can fail closed; the incident is still retried in the background.
        """
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        fut.set_running_or_notify_cancel()
        if not self._open:
            fut.set_exception(StoreClosedError(f"the store {self.path} is not open"))
            return fut
        self._incidents.append((verdict, source, fut, time.monotonic()))
        self._wake.set()
        return fut

    def add_usage(self, verdict: Verdict, *, source: str = "proxy") -> None:
        """Count a request, written behind; never blocks (one deque append).

        Unless ``record_allowed``, an uncategorised ``allow`` is not recorded at all: routine
        traffic to the rest of the web is neither evidence nor needed by the reports.
        """
        if not self.record_allowed and verdict.action == "allow" and not verdict.what.categories:
            return
        queue = self._queues.get(source)
        if queue is None:
            queue = self._new_queue(source)
        if len(queue) >= self.max_queue or not self._open:
            self._dropped_raw += 1  # full: the append below pushes out the oldest
            if not self._open:
                return
        queue.append(verdict)
        if len(queue) == self.batch_size:
            self._wake.set()

    def _new_queue(self, source: str) -> deque[Verdict]:
        with self._lock:
            return self._queues.setdefault(source, deque(maxlen=self.max_queue))

    def record_batch(self, verdicts: Iterable[Verdict], *, source: str = "import",
                     import_source: str | None = None, import_path: str | None = None,
                     import_offset: int | None = None, import_lines: int | None = None,
                     alert_after: datetime | None = None) -> None:
        """Write verdicts and the import's progress in ONE transaction (synchronously).

        Incidents become events (+ alerts); everything is counted in usage; the imports row
        moves forward in the same transaction, so a crash mid-import never counts twice.
        With ``alert_after``, only incidents from that time on queue an alert mail: a backfill
        of last term's log must not send ICT hundreds of mails about old attempts.
        """
        pending: dict[UsageKey, list[Any]] = {}
        incidents: list[Verdict] = []
        for v in verdicts:
            if v.is_incident:
                incidents.append(v)
            elif self.record_allowed or v.action != "allow" or v.what.categories:
                _fold(pending, v, source)
        now = time.time()

        def write(conn: sqlite3.Connection) -> None:
            for v in incidents:
                self._insert_incident(conn, v, source, now, alert=alert_after is None or v.time >= alert_after)
            conn.executemany(_UPSERT_USAGE, [_usage_params(k, val) for k, val in pending.items()])
            if import_source is not None:
                conn.execute(_UPSERT_IMPORT, (import_source, import_path, import_offset or 0,
                                              import_lines, now))

        self._side_write(write, durable=bool(incidents))

    def import_offset(self, source: str) -> int:
        """How far (bytes) an import source has been committed; 0 when it is unknown."""
        with self._reader() as conn:
            row = conn.execute('SELECT "offset" FROM imports WHERE source = ?',
                               (source,)).fetchone()
        return int(row[0]) if row else 0

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued before this call is committed (TimeoutError if not)."""
        if self._thread is None or not self._thread.is_alive():
            raise StoreClosedError(f"the store {self.path} is not open")
        done = threading.Event()
        with self._lock:
            self._flush_waiters.append(done)
        self._retry_at = 0.0  # asked to commit now: do not sit out the rest of a backoff
        self._wake.set()
        if not done.wait(timeout):
            raise TimeoutError(f"the store could not commit its queue within {timeout:g}s "
                               f"(last error: {self._stats['last_error']})")

    # ----------------------------------------------------------------------------- reading

    def events(self, *, since: datetime | None = None, until: datetime | None = None,
               user: str | None = None, kind: str | None = None, limit: int | None = None
               ) -> list[dict[str, Any]]:
        """Incidents and usage minutes, oldest first; ``since`` inclusive, ``until`` exclusive.

        A usage row is one minute of one (user, ip, host, window, action, rule) with its
        ``requests`` count; its ``time`` is the minute's start in the store's ``tz``. Add-ons
        beyond DESIGN's keys: ``ts`` (unix seconds) and ``blocked``.
        """
        ev: list[tuple[str, Any]] = []  # (condition, argument) on events
        us: list[tuple[str, Any]] = []  # and on usage (whose rows start at minute * 60)
        if since is not None:
            s = _aware(since).timestamp()
            ev.append(("ts >= ?", s))
            us.append(("minute >= ?", math.ceil(s / 60)))
        if until is not None:
            u = _aware(until).timestamp()
            ev.append(("ts < ?", u))
            us.append(("minute < ?", math.ceil(u / 60)))
        if user is not None:
            ev.append(("user = ?", user))
            us.append(("user = ?", user))
        if kind is not None and kind != "usage":
            ev.append(("kind = ?", kind))
        ev_where = " AND ".join(["1"] + [c for c, _ in ev])
        us_where = " AND ".join(["1"] + [c for c, _ in us])
        parts, args = [], []
        if kind != "usage":
            parts.append(
                "SELECT ts, 0 AS part, id AS seq, time, kind, user, role, ip, device, host, url,"
                " categories, window, action, rule, alert, ref, method, detail, source,"
                " 1 AS requests, action = 'block' AS blocked"
                f" FROM events WHERE {ev_where}")
            args += [a for _, a in ev]
        if kind is None or kind == "usage":
            parts.append(
                "SELECT minute * 60.0 AS ts, 1 AS part, rowid AS seq, NULL AS time,"
                " 'usage' AS kind, user, role, ip, device, host, NULL AS url, categories, window,"
                " action, rule, 0 AS alert, NULL AS ref, NULL AS method, NULL AS detail, source,"
                f" requests, blocked FROM usage WHERE {us_where}")
            args += [a for _, a in us]
        sql = " UNION ALL ".join(parts) + " ORDER BY ts, part, seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        with self._reader() as conn:
            rows = list(sqlite_utils.Database(conn, execute_plugins=False).query(sql, args))
        for row in rows:
            del row["part"], row["seq"]
            if row["time"] is None:
                row["time"] = datetime.fromtimestamp(row["ts"], self.tz).isoformat()
            row["categories"] = json.loads(row["categories"])
            row["alert"] = bool(row["alert"])
        return rows

    def pending_alerts(self, now: float) -> list[dict[str, Any]]:
        """Alerts due for (re)delivery: state pending and next_attempt <= now, with their event."""
        return self._alert_rows("a.state = 'pending' AND a.next_attempt <= ?", [now])

    def alerts(self, *, pending_only: bool = False) -> list[dict[str, Any]]:
        """Every alert (or only the pending ones) with its event, oldest first."""
        return self._alert_rows("a.state = 'pending'" if pending_only else "1", [])

    def leases(self) -> list[dict[str, Any]]:
        """Every DHCP lease the sensor has seen: mac, ip, hostname, user, start, expires, seen."""
        with self._reader() as conn:
            db = sqlite_utils.Database(conn, execute_plugins=False)
            return list(db.query("SELECT mac, ip, hostname, user, start, expires, seen FROM leases"
                                 " ORDER BY ip, seen"))

    def stats(self) -> dict[str, Any]:
        """Counters for logs and ``/status``: queued, committed, dropped, errors, last_error."""
        with self._lock:
            s = dict(self._stats)
        s["dropped"] += self._dropped_raw
        s["queued"] = self._queued()
        s["queued_incidents"] = len(self._incidents)
        s["retry_incidents"] = len(self._retry)
        s["pending_rows"] = len(self._pending)
        s["schema_version"] = SCHEMA_VERSION
        return s

    # ----------------------------------------------------------------------------- alerts, leases

    def mark_alerts_sent(self, event_refs: Sequence[str], *, message_id: str, sent: float,
                         group_ref: str | None = None) -> None:
        """Record that the mail server accepted the mail carrying these alerts (durably).

        With ``group_ref``, the alert whose event is ``group_ref`` becomes ``sent`` and the
        others ``grouped`` (delivered as part of that mail); without it, all become ``sent``.
        """
        refs = list(event_refs)

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE alerts SET state = CASE WHEN :group IS NULL OR event_ref = :group"
                " THEN 'sent' ELSE 'grouped' END, message_id = :mid, sent = :sent,"
                " group_ref = :group, attempts = attempts + 1, last_error = NULL"
                " WHERE event_ref = :ref",
                [{"group": group_ref, "mid": message_id, "sent": sent, "ref": ref}
                 for ref in refs])

        self._side_write(write, durable=True)

    def mark_alert_failed(self, event_ref: str, *, error: str, next_attempt: float,
                          give_up: bool = False) -> None:
        """Count a failed delivery; retry at ``next_attempt``, or stop for good (``give_up``)."""
        self._side_write(lambda conn: conn.execute(
            "UPDATE alerts SET attempts = attempts + 1, last_error = ?, next_attempt = ?,"
            " state = ? WHERE event_ref = ?",
            (error, next_attempt, "failed" if give_up else "pending", event_ref)), durable=True)

    def upsert_lease(self, lease: Any, seen: float | datetime) -> None:
        """Insert or refresh a DHCP lease (an ``identify.Lease``), keyed by (mac, ip)."""
        params = (lease.mac, lease.ip, lease.hostname, lease.user, _epoch(lease.start),
                  _epoch(lease.expires), _epoch(seen))
        self._side_write(lambda conn: conn.execute(_UPSERT_LEASE, params), durable=False)

    # ----------------------------------------------------------------------- retention, privacy

    def purge_before(self, cutoff: datetime, *, chunk: int = 20_000) -> dict[str, int]:
        """Delete what is older than ``cutoff``: rows deleted per table.

        Events whose alert is still pending are kept (the outbox must not lose them). Deletes
        run in chunks of ``chunk`` rows, each its own transaction, so the writer thread and the
        sensor never wait long for the write lock.
        """
        cut = _aware(cutoff).timestamp()
        steps = {
            "alerts": ("SELECT a.rowid FROM alerts a JOIN events e ON e.ref = a.event_ref"
                       f" WHERE e.ts < :cut AND a.state IN {ALERT_DONE}", cut),
            "events": ("SELECT rowid FROM events WHERE ts < :cut AND NOT EXISTS"
                       " (SELECT 1 FROM alerts a WHERE a.event_ref = events.ref)", cut),
            "usage": ("SELECT rowid FROM usage WHERE minute < :cut", math.ceil(cut / 60)),
            "leases": ("SELECT rowid FROM leases WHERE seen < :cut AND"
                       " coalesce(expires, 0) < :cut", cut),
        }
        counts: dict[str, int] = {}
        for table, (select, arg) in steps.items():
            counts[table] = 0
            while True:
                n = self._side_write(lambda conn: conn.execute(
                    f"DELETE FROM {table} WHERE rowid IN ({select} LIMIT {int(chunk)})",
                    {"cut": arg}).rowcount, durable=False)
                counts[table] += n
                if n < chunk:
                    break
        return counts

    def export_user(self, user: str) -> dict[str, list[dict[str, Any]]]:
        """Everything held about ``user`` (a subject access request), rows as stored.

        events, usage (with an added ISO ``time`` per minute), the alerts of their events, and
        the leases naming them.
        """
        with self._reader() as conn:
            db = sqlite_utils.Database(conn, execute_plugins=False)
            out = {
                "events": list(db.query("SELECT * FROM events WHERE user = ? ORDER BY ts", [user])),
                "usage": list(db.query("SELECT * FROM usage WHERE user = ? ORDER BY minute",
                                       [user])),
                "alerts": list(db.query("SELECT a.* FROM alerts a JOIN events e ON e.ref ="
                                        " a.event_ref WHERE e.user = ? ORDER BY a.id", [user])),
                "leases": list(db.query("SELECT * FROM leases WHERE user = ? ORDER BY seen",
                                        [user])),
            }
        for row in out["usage"]:
            row["time"] = datetime.fromtimestamp(row["minute"] * 60, self.tz).isoformat()
        return out

    def purge_user(self, user: str) -> dict[str, int]:
        """Delete everything held about ``user`` in one transaction: rows deleted per table."""

        def write(conn: sqlite3.Connection) -> dict[str, int]:
            return {
                "alerts": conn.execute(
                    "DELETE FROM alerts WHERE event_ref IN (SELECT ref FROM events WHERE user = ?)",
                    (user,)).rowcount,
                "events": conn.execute("DELETE FROM events WHERE user = ?", (user,)).rowcount,
                "usage": conn.execute("DELETE FROM usage WHERE user = ?", (user,)).rowcount,
                "leases": conn.execute("DELETE FROM leases WHERE user = ?", (user,)).rowcount,
            }

        return self._side_write(write, durable=True)

    def backup(self, dest: Path) -> None:
        """A consistent copy through SQLite's online backup API, written next to ``dest`` and
        renamed into place, so a half-written backup never replaces a good one."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.unlink(missing_ok=True)
        src = self._connect(limit_size=False)
        try:
            dst = sqlite3.connect(tmp)
            try:
                src.backup(dst)
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            finally:
                dst.close()
        finally:
            src.close()
        os.replace(tmp, dest)

    # ----------------------------------------------------------------------------- connections

    def _connect(self, *, limit_size: bool = True) -> sqlite3.Connection:
        """A write-capable connection in autocommit mode (we issue BEGIN/COMMIT ourselves)."""
        conn = sqlite3.connect(self.path, timeout=min(self.busy_timeout, 0.5),
                               isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA journal_size_limit = 67108864")
        if limit_size:
            self._apply_size_limit(conn)
        return conn

    def _apply_size_limit(self, conn: sqlite3.Connection) -> None:
        if self.max_bytes is not None:
            page = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {max(1, self.max_bytes // page)}")

    class _Reader:
        def __init__(self, store: Store) -> None:
            self.conn = sqlite3.connect(store.path, timeout=store.busy_timeout,
                                        isolation_level=None, check_same_thread=False)

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("PRAGMA query_only = 1")
            return self.conn

        def __exit__(self, *exc: object) -> None:
            self.conn.close()

    def _reader(self) -> Store._Reader:
        if not self.path.exists():
            raise StoreClosedError(f"no database at {self.path}")
        return Store._Reader(self)

    def _retry_busy(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` until it is not refused for a lock, for up to ``busy_timeout`` seconds."""
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.01
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
                self._count("locked_retries")
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def _side_write(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool) -> T:
        """One transaction on a short-lived connection of the calling thread, retried on locks.

        Used by the synchronous writes (imports, alert state, leases, purges): they do not go
        through the writer thread, and SQLite's lock orders them with it.
        """
        def attempt() -> T:
            conn = self._connect()
            try:
                return self._transaction(conn, fn, durable=durable)
            finally:
                conn.close()

        try:
            return self._retry_busy(attempt)
        except sqlite3.Error as exc:
            self._note_error(exc)
            raise

    def _transaction(self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T],
                     *, durable: bool) -> T:
        conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
            return result
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    def _note_error(self, exc: BaseException) -> None:
        """Count every failure; log each distinct one once (again only every LOG_AGAIN s)."""
        text = _describe(exc)
        now = time.monotonic()
        with self._lock:
            self._stats["errors"] += 1
            self._stats["last_error"] = text
            last = self._seen_errors.get(text)
            if last is None or now - last >= LOG_AGAIN:
                self._seen_errors[text] = now
                self._said_recovered = False
            else:
                return
        log.error("store %s: %s (data is kept and retried; %d errors so far, see stats)",
                  self.path, text, self._stats["errors"])

    def _recovered(self) -> None:
        """Say once that writing works again, after errors were logged."""
        if self._seen_errors and not self._said_recovered:
            self._said_recovered = True
            log.warning("store %s: writing again after %d errors", self.path,
                        self._stats["errors"])

    def _alert_rows(self, where: str, args: list[Any]) -> list[dict[str, Any]]:
        sql = ("SELECT a.id AS alert_id, a.event_ref, a.created, a.state, a.attempts,"
               " a.next_attempt, a.last_error, a.message_id, a.sent, a.group_ref,"
               " e.time, e.ts, e.kind, e.user, e.role, e.ip, e.device, e.host, e.url,"
               " e.categories, e.window, e.action, e.rule, e.alert, e.ref, e.method, e.detail,"
               f" e.source FROM alerts a JOIN events e ON e.ref = a.event_ref WHERE {where}"
               " ORDER BY a.created, a.id")
        with self._reader() as conn:
            rows = list(sqlite_utils.Database(conn, execute_plugins=False).query(sql, args))
        for row in rows:
            row["categories"] = json.loads(row["categories"])
            row["alert"] = bool(row["alert"])
        return rows

    def _insert_incident(self, conn: sqlite3.Connection, v: Verdict, source: str,
                         now: float, alert: bool = True) -> bool:
        """events row, its alerts row, its usage count; False if this ref is already stored
        (a retry after a commit whose outcome was unknown), so nothing is counted twice."""
        if conn.execute(_INSERT_EVENT, _event_row(v, source)).rowcount == 0:
            return False
        if v.alert and alert:
            conn.execute(_INSERT_ALERT, (v.ref, now, now))
        one: dict[UsageKey, list[Any]] = {}
        _fold(one, v, source)
        conn.executemany(_UPSERT_USAGE, [_usage_params(k, val) for k, val in one.items()])
        return True

    # ----------------------------------------------------------------------------- writer thread

    def _raw_count(self) -> int:
        return sum(len(q) for q in list(self._queues.values()))

    def _queued(self) -> int:
        return self._raw_count() + self._pending_requests

    def _run(self) -> None:
        """The writer thread: incidents at once, usage every ``flush_seconds`` or batch."""
        while True:
            now = time.monotonic()
            if self._retry_at > now:
                wait = self._retry_at - now
            elif self._pending or self._raw_count():
                wait = self._last_flush + self.flush_seconds - now
            else:
                wait = self.flush_seconds  # idle: nothing to do until something arrives
            if not (self._incidents or self._raw_count() >= self.batch_size or self._stopping
                    or self._flush_waiters):
                self._wake.wait(max(0.0, wait))
            self._wake.clear()
            with self._lock:
                waiters, self._flush_waiters = self._flush_waiters, []
                stopping = self._stopping
            try:
                clean = self._cycle(force=bool(waiters) or stopping)
            except Exception as exc:  # never let the thread die: the daemon must keep going
                log.exception("store writer: unexpected error")
                self._note_error(exc)
                clean = False
                self._retry_at = time.monotonic() + 1.0
            if clean:
                for done in waiters:
                    done.set()
            else:
                with self._lock:
                    self._flush_waiters[:0] = waiters
                if waiters or stopping:  # do not spin while a retry is not yet due
                    time.sleep(min(0.05, max(0.0, self._retry_at - time.monotonic())))
            if stopping and (clean or time.monotonic() >= self._stop_deadline):
                break
        if not clean:
            log.error("store %s closed with %d usage requests and %d incidents not committed "
                      "(last error: %s)", self.path, self._queued(),
                      len(self._incidents) + len(self._retry), self._stats["last_error"])
        self._fail_incidents(StoreClosedError(f"the store {self.path} was closed"))
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _cycle(self, *, force: bool) -> bool:
        """One pass: incidents, then usage when due. True when nothing is left queued."""
        self._write_incidents()
        self._drain()
        if not (self._pending or self._raw_count() or self._incidents or self._retry):
            return True
        now = time.monotonic()
        due = (force or len(self._pending) >= self.batch_size
               or now - self._last_flush >= self.flush_seconds)
        if now < self._retry_at:
            return False
        if self._retry:
            if not self._write_retried_incidents():
                return False
        if due:
            self._last_flush = now
            while self._pending:
                self._write_incidents()
                if not self._write_usage_chunk():
                    return False
                self._drain()
        return not (self._pending or self._raw_count() or self._incidents or self._retry)

    def _writer_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _failed(self, exc: BaseException) -> None:
        """Back off before the next attempt; reconnect after anything but a lock."""
        if _is_busy(exc):
            self._count("locked_retries")
            self._backoff = min(max(self._backoff * 2, 0.02), 1.0)
        else:
            self._note_error(exc)
            self._backoff = min(max(self._backoff * 2, 0.1), 5.0)
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None
        self._retry_at = time.monotonic() + self._backoff

    def _succeeded(self) -> None:
        self._backoff = 0.0
        self._retry_at = 0.0
        self._recovered()

    def _write_incidents(self) -> None:
        """Group-commit every queued incident; resolve their futures after COMMIT.

        A lock is waited for (with backoff, draining usage meanwhile) until the oldest
        incident has waited ``busy_timeout``; then, and on any other error, the futures raise
        and the incidents move to the retry queue.
        """
        while self._incidents:
            batch = [self._incidents.popleft() for _ in range(min(len(self._incidents), 1000))]
            now = time.time()
            try:
                conn = self._writer_conn()
                written = self._transaction(
                    conn, lambda c: [self._insert_incident(c, v, s, now) for v, s, _, _ in batch],
                    durable=True)
            except sqlite3.Error as exc:
                self._failed(exc)
                oldest = min(queued for _, _, _, queued in batch)
                if _is_busy(exc) and time.monotonic() - oldest < self.busy_timeout:
                    self._incidents.extendleft(reversed(batch))  # keep their order, try again
                    self._drain()
                    time.sleep(max(0.0, self._retry_at - time.monotonic()))
                    continue
                if _is_busy(exc):
                    self._note_error(exc)
                self._stats["failed_incidents"] += len(batch)
                for v, s, fut, _ in batch:
                    self._keep_for_retry(v, s)
                    fut.set_exception(exc)
                continue
            self._succeeded()
            n = sum(written)
            self._stats["committed_incidents"] += n
            self._stats["committed"] += n
            for _, _, fut, _ in batch:
                fut.set_result(None)

    def _keep_for_retry(self, v: Verdict, source: str) -> None:
        if len(self._retry) >= self.max_retry_incidents:
            lost, _ = self._retry.popleft()
            self._stats["dropped_incidents"] += 1
            log.error("store %s: incident %s dropped after failed commits (retry queue full)",
                      self.path, lost.ref)
        self._retry.append((v, source))

    def _write_retried_incidents(self) -> bool:
        batch = list(self._retry)[:1000]
        now = time.time()
        try:
            written = self._transaction(
                self._writer_conn(),
                lambda c: [self._insert_incident(c, v, s, now) for v, s in batch], durable=True)
        except sqlite3.Error as exc:
            self._failed(exc)
            return False
        self._succeeded()
        for _ in batch:
            self._retry.popleft()
        n = sum(written)
        self._stats["retried_incidents"] += len(batch)
        self._stats["committed_incidents"] += n
        self._stats["committed"] += n
        return True

    def _drain(self, limit: int = 50_000) -> None:
        """Fold queued usage into the per-minute counters; bound them (oldest out first)."""
        pending = self._pending
        for source, queue in list(self._queues.items()):
            n = min(len(queue), limit)
            pop = queue.popleft
            for _ in range(n):
                _fold(pending, pop(), source)
            self._pending_requests += n
        excess = len(pending) - self.max_queue
        if excess > 0:  # in one go: popping one by one from a dict's front is quadratic
            lost = sum(pending.pop(key)[0] for key in list(islice(pending, excess)))
            self._pending_requests -= lost
            self._stats["dropped"] += lost

    def _write_usage_chunk(self) -> bool:
        """Upsert up to ``batch_size`` counters in one transaction (oldest first)."""
        keys = list(islice(self._pending, self.batch_size))
        params = [_usage_params(k, self._pending[k]) for k in keys]
        try:
            self._transaction(self._writer_conn(), lambda c: c.executemany(_UPSERT_USAGE, params),
                              durable=False)
        except sqlite3.Error as exc:
            self._failed(exc)
            return False
        self._succeeded()
        requests = 0
        for k in keys:
            requests += self._pending.pop(k)[0]
        self._pending_requests -= requests
        self._stats["committed_usage"] += requests
        self._stats["committed"] += requests
        self._stats["usage_rows"] += len(keys)
        self._stats["batches"] += 1
        return True

    def _fail_incidents(self, exc: BaseException) -> None:
        while self._incidents:
            v, s, fut, _ = self._incidents.popleft()
            self._stats["failed_incidents"] += 1
            fut.set_exception(exc)
