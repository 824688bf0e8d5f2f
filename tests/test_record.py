"""The event store on real SQLite files: durability, aggregation, failures, retention, privacy."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from filterd.errors import FilterdError
from filterd.identify import Lease
from filterd.migrations import SCHEMA_VERSION, SchemaTooNewError
from filterd.record import Store, StoreClosedError
from filterd.verdict import Verdict, What, Who

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 25, 10, 0, tzinfo=timezone.utc)


def verdict(*, at: datetime = T0, user: str | None = "amy", ip: str = "10.20.0.5",
            host: str = "social.example", action: str = "log", alert: bool = False,
            rule: str | None = None, kind: str = "request",
            categories: tuple[str, ...] = ("social",),
            url: str | None = None, window: str = "contact") -> Verdict:
    return Verdict(time=at, who=Who(ip=ip, user=user, role="pupil" if user else None),
                   what=What(host=host, url=url or f"https://{host}/page?id=1",
                             categories=categories),
                   window=window, action=action, alert=alert, rule=rule, kind=kind)


def plain(path: Path) -> sqlite3.Connection:
    """A connection of our own, to see what is really on disk."""
    return sqlite3.connect(path)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "filterd.db"


@pytest.fixture
def store(db: Path):
    with Store(db, flush_seconds=0.05) as s:
        yield s


# ------------------------------------------------------------------------------- migrations

def test_fresh_database_gets_every_table_and_reopening_changes_nothing(db: Path) -> None:
    with Store(db):
        pass
    conn = plain(db)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"migrations", "events", "usage", "alerts", "leases", "imports"} <= tables
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    schema = conn.execute("SELECT group_concat(sql, ';') FROM sqlite_master").fetchone()[0]
    conn.close()
    with Store(db):
        pass
    conn = plain(db)
    assert conn.execute("SELECT version FROM migrations").fetchall() == [(SCHEMA_VERSION,)]
    assert conn.execute("SELECT group_concat(sql, ';') FROM sqlite_master").fetchone()[0] == schema


def test_a_new_migration_upgrades_an_existing_database_once(db: Path, monkeypatch) -> None:
    from filterd import migrations

    with Store(db):
        pass
    calls = []

    def _v2_add_note(database) -> None:
        calls.append(1)
        database["events"].add_column("note", str)

    monkeypatch.setattr(migrations, "MIGRATIONS", (*migrations.MIGRATIONS, _v2_add_note))
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    for _ in range(2):
        with Store(db):
            pass
    assert calls == [1]
    conn = plain(db)
    assert [r[:2] for r in conn.execute("SELECT version, name FROM migrations")] == [
        (1, "v1_initial"), (2, "v2_add_note")]
    assert "note" in {r[1] for r in conn.execute("PRAGMA table_info(events)")}


def test_a_database_from_a_newer_filterd_is_refused_unchanged(db: Path) -> None:
    with Store(db):
        pass
    conn = plain(db)
    conn.execute("INSERT INTO migrations (version, name, applied) VALUES (?, 'future', 'x')",
                 (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(SchemaTooNewError) as err:
        Store(db).open()
    message = str(err.value)
    assert str(db) in message and f"version {SCHEMA_VERSION + 1}" in message
    assert "upgrade filterd" in message
    assert isinstance(err.value, FilterdError)  # the CLI prints it as one line
    conn = plain(db)
    assert conn.execute("SELECT max(version) FROM migrations").fetchone()[0] == SCHEMA_VERSION + 1


def test_an_unwritable_path_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(FilterdError, match="cannot open the database"):
        Store(tmp_path / "a-file" / "filterd.db").open()


# ------------------------------------------------------------------------------- incidents

def test_incident_is_on_disk_when_its_future_resolves(store: Store, db: Path) -> None:
    v = verdict(action="block", alert=True, rule="terrorism", url="https://bad.example/x?a=1")
    store.commit_incident(v).result(5)
    conn = plain(db)  # no flush, no close: what another process sees right now
    row = conn.execute("SELECT kind, user, host, url, categories, rule, alert, source FROM events"
                       " WHERE ref = ?", (v.ref,)).fetchone()
    assert row == ("block", "amy", "social.example", "https://bad.example/x?a=1", '["social"]',
                   "terrorism", 1, "proxy")
    assert conn.execute("SELECT state, attempts FROM alerts WHERE event_ref = ?",
                        (v.ref,)).fetchall() == [("pending", 0)]
    # an incident is also counted in usage (blocked), in the same transaction
    assert conn.execute("SELECT requests, blocked FROM usage").fetchall() == [(1, 1)]


def test_alert_row_is_in_the_same_transaction_as_its_event(store: Store, db: Path) -> None:
    conn = plain(db)
    conn.execute("CREATE TRIGGER no_alerts BEFORE INSERT ON alerts"
                 " BEGIN SELECT RAISE(ABORT, 'outbox refused'); END")
    conn.commit()
    v = verdict(action="log", alert=True, rule="watch")
    with pytest.raises(sqlite3.IntegrityError, match="outbox refused"):
        store.commit_incident(v).result(5)
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0  # rolled back together
    assert store.stats()["failed_incidents"] == 1
    conn.execute("DROP TRIGGER no_alerts")
    conn.commit()
    deadline = time.monotonic() + 5  # kept and retried in the background, never lost
    while conn.execute("SELECT count(*) FROM alerts").fetchone()[0] == 0:
        assert time.monotonic() < deadline, store.stats()
        time.sleep(0.05)
    assert conn.execute("SELECT kind FROM events WHERE ref = ?", (v.ref,)).fetchone() == ("alert",)


def test_the_addon_can_await_an_incident(store: Store, db: Path) -> None:
    v = verdict(action="block", rule="r")

    async def addon() -> int:
        await asyncio.wrap_future(store.commit_incident(v))
        return plain(db).execute("SELECT count(*) FROM events").fetchone()[0]

    assert asyncio.run(addon()) == 1


def test_incidents_do_not_wait_for_queued_usage(db: Path) -> None:
    with Store(db, flush_seconds=3600, batch_size=10**6) as s:
        for i in range(1000):
            s.add_usage(verdict(host=f"h{i}.example"))
        s.commit_incident(verdict(action="block", rule="r")).result(5)
        conn = plain(db)
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 1
        assert conn.execute("SELECT sum(requests) FROM usage").fetchone()[0] == 1
        s.flush()
        assert conn.execute("SELECT sum(requests) FROM usage").fetchone()[0] == 1001


def test_an_idle_writer_sleeps(db: Path) -> None:
    with Store(db, flush_seconds=0.02) as s:
        s.add_usage(verdict())
        s.flush()
        cpu = time.process_time()
        time.sleep(0.5)
        assert time.process_time() - cpu < 0.1  # no busy loop between flushes


def test_a_closed_store_fails_incidents_and_counts_dropped_usage(db: Path) -> None:
    s = Store(db).open()
    s.close()
    with pytest.raises(StoreClosedError):
        s.commit_incident(verdict(action="block")).result(1)
    s.add_usage(verdict())
    assert s.stats()["dropped"] == 1


# ------------------------------------------------------------------------------- usage

def test_usage_counts_are_exact_across_batches_and_minutes(db: Path) -> None:
    expected: Counter = Counter()
    blocked: Counter = Counter()
    with Store(db, batch_size=7, flush_seconds=0.01) as s:
        for round_ in range(3):
            for i in range(400):
                at = T0 + timedelta(seconds=(i * 7 + round_) % 180)  # three minutes
                user = [None, "amy", "bob"][i % 3]  # NULL users must aggregate too
                action = "block" if i % 11 == 0 else "log"
                v = verdict(at=at, user=user, host=f"h{i % 5}.example", action=action,
                            rule=None if i % 2 else "r")
                s.add_usage(v)
                key = (int(at.timestamp()) // 60, user, f"h{i % 5}.example", action, v.rule)
                expected[key] += 1
                blocked[key] += action == "block"
            s.flush()  # the same keys are upserted again in the next round
        assert s.stats()["batches"] > 3 * 400 // 7 // 5
    conn = plain(db)
    rows = conn.execute("SELECT minute, user, host, action, rule, requests, blocked"
                        " FROM usage").fetchall()
    assert {r[:5]: r[5] for r in rows} == dict(expected)
    assert {r[:5]: r[6] for r in rows} == {k: blocked[k] for k in expected}
    assert len(rows) == len(expected)  # one row per key: nothing double-inserted


def test_uncategorised_allowed_requests_are_kept_only_when_asked(tmp_path: Path) -> None:
    plain_allow = verdict(action="allow", categories=())
    categorised_allow = verdict(action="allow", categories=("education",))
    for record_allowed, want in ((False, 1), (True, 2)):
        path = tmp_path / f"{record_allowed}.db"
        with Store(path, record_allowed=record_allowed) as s:
            s.add_usage(plain_allow)
            s.add_usage(categorised_allow)
        assert plain(path).execute("SELECT sum(requests) FROM usage").fetchone()[0] == want


def test_a_full_queue_drops_the_oldest_usage_and_counts_it(db: Path) -> None:
    with Store(db, max_queue=10, flush_seconds=3600, batch_size=10**6) as s:
        for i in range(25):
            s.add_usage(verdict(host=f"h{i}.example"))
        assert s.stats()["dropped"] == 15
        s.flush()
    hosts = {r[0] for r in plain(db).execute("SELECT host FROM usage")}
    assert hosts == {f"h{i}.example" for i in range(15, 25)}


def test_usage_waiting_for_a_retry_is_bounded_too(db: Path) -> None:
    with Store(db, max_queue=20, busy_timeout=0.1, flush_seconds=0.01) as s:
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        for i in range(100):
            s.add_usage(verdict(host=f"h{i:03d}.example"))
            if i % 10 == 9:
                with pytest.raises(TimeoutError):
                    s.flush(0.15)  # the writer folds the queue, cannot write, keeps 20 keys
        assert s.stats()["dropped"] == 80 and s.stats()["queued"] == 20
        other.execute("ROLLBACK")
        other.close()
        s.flush(10)
    hosts = sorted(r[0] for r in plain(db).execute("SELECT host FROM usage"))
    assert hosts == [f"h{i:03d}.example" for i in range(80, 100)]  # the newest are kept


# ------------------------------------------------------------------------------- events()

def test_events_merges_incidents_and_usage_with_filters(db: Path) -> None:
    with Store(db, tz=ZoneInfo("Europe/London")) as s:
        bst = datetime(2026, 7, 1, 9, 0, 30, tzinfo=ZoneInfo("Europe/London"))
        s.commit_incident(verdict(at=T0, action="block", rule="r")).result(5)
        s.commit_incident(verdict(at=T0 + timedelta(minutes=5), user="bob", kind="bypass",
                                  action="log")).result(5)
        s.add_usage(verdict(at=T0 + timedelta(minutes=2, seconds=30)))
        s.add_usage(verdict(at=T0 + timedelta(minutes=2, seconds=40)))
        s.add_usage(verdict(at=bst, user="cat"))
        s.flush()

        everything = s.events()
        json.dumps(everything)  # JSON-able as it stands
        # July first; at one time an incident sorts before the usage minute that counts it
        assert [(e["kind"], e["user"]) for e in everything] == [
            ("usage", "cat"), ("block", "amy"), ("usage", "amy"), ("usage", "amy"),
            ("bypass", "bob"), ("usage", "bob")]
        for e in everything:
            assert datetime.fromisoformat(e["time"]).utcoffset() is not None
        minute = next(e for e in everything if e["kind"] == "usage" and e["requests"] == 2)
        assert minute["time"] == "2026-11-25T10:02:00+00:00"  # Europe/London in winter
        assert next(e for e in everything if e["user"] == "cat")["time"] == \
            "2026-07-01T09:00:00+01:00"
        block = next(e for e in everything if e["kind"] == "block")
        assert block["url"] and block["categories"] == ["social"] and block["alert"] is False
        assert block["requests"] == 1 and block["rule"] == "r"
        assert all(e["url"] is None for e in everything if e["kind"] == "usage")

        assert [e["kind"] for e in s.events(kind="block")] == ["block"]
        assert [e["user"] for e in s.events(user="bob")] == ["bob", "bob"]
        assert len(s.events(kind="usage")) == 4
        since = s.events(since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=5))
        assert [(e["kind"], e["requests"]) for e in since] == [("usage", 2)]
        assert len(s.events(limit=2)) == 2


# ---------------------------------------------------------------------- alerts, leases, imports

def test_alert_delivery_states(store: Store) -> None:
    a, b, c = (verdict(action="block", alert=True, rule="t") for _ in range(3))
    for v in (a, b, c):
        store.commit_incident(v).result(5)
    now = time.time()
    assert [r["event_ref"] for r in store.pending_alerts(now + 1)] == [a.ref, b.ref, c.ref]
    store.mark_alert_failed(c.ref, error="421 try later", next_attempt=now + 600)
    assert c.ref not in [r["event_ref"] for r in store.pending_alerts(now + 1)]
    assert c.ref in [r["event_ref"] for r in store.alerts(pending_only=True)]
    store.mark_alerts_sent([a.ref, b.ref], message_id="<m1@filterd>", sent=now, group_ref=a.ref)
    rows = {r["event_ref"]: r for r in store.alerts()}
    assert (rows[a.ref]["state"], rows[b.ref]["state"]) == ("sent", "grouped")
    assert rows[b.ref]["message_id"] == "<m1@filterd>" and rows[b.ref]["group_ref"] == a.ref
    assert rows[c.ref]["attempts"] == 1 and rows[c.ref]["last_error"] == "421 try later"
    assert rows[a.ref]["user"] == "amy" and rows[a.ref]["url"].startswith("https://")
    store.mark_alert_failed(c.ref, error="550 no", next_attempt=now, give_up=True)
    assert store.alerts(pending_only=True) == []


def test_leases_are_upserted_by_mac_and_ip(store: Store) -> None:
    store.upsert_lease(Lease(mac="aa:bb:cc:dd:ee:ff", ip="10.20.0.9", hostname="ipad-7",
                             start=100.0, expires=200.0), seen=150.0)
    store.upsert_lease(Lease(mac="aa:bb:cc:dd:ee:ff", ip="10.20.0.9", hostname="ipad-7b",
                             user="amy", start=100.0, expires=300.0), seen=250.0)
    store.upsert_lease(Lease(mac=None, ip="10.20.0.10"), seen=1.0)
    store.upsert_lease(Lease(mac=None, ip="10.20.0.10", hostname="printer"), seen=2.0)
    rows = {r["ip"]: r for r in store.leases()}
    assert len(rows) == 2
    assert rows["10.20.0.9"] == {"mac": "aa:bb:cc:dd:ee:ff", "ip": "10.20.0.9",
                                 "hostname": "ipad-7b", "user": "amy", "start": 100.0,
                                 "expires": 300.0, "seen": 250.0}
    assert rows["10.20.0.10"]["hostname"] == "printer" and rows["10.20.0.10"]["seen"] == 2.0


def test_record_batch_moves_the_import_offset_in_the_same_transaction(store: Store, db: Path
                                                                       ) -> None:
    assert store.import_offset("squid:abc") == 0
    batch = [verdict(), verdict(), verdict(action="block", alert=True, rule="t"),
             verdict(action="allow", categories=())]
    store.record_batch(batch, import_source="squid:abc", import_path="/var/log/a.log",
                       import_offset=1234, import_lines=4)
    assert store.import_offset("squid:abc") == 1234
    conn = plain(db)
    assert conn.execute("SELECT sum(requests), sum(blocked) FROM usage").fetchone() == (3, 1)
    assert conn.execute("SELECT kind, source FROM events").fetchall() == [("block", "import")]
    assert conn.execute("SELECT count(*) FROM alerts").fetchone()[0] == 1
    conn.execute("CREATE TRIGGER no_usage BEFORE INSERT ON usage"
                 " BEGIN SELECT RAISE(ABORT, 'disk trouble'); END")
    conn.commit()
    with pytest.raises(sqlite3.IntegrityError):
        store.record_batch([verdict(host="new.example")], import_source="squid:abc",
                           import_offset=9999, import_lines=5)
    assert store.import_offset("squid:abc") == 1234  # nothing half-done
    assert conn.execute("SELECT lines FROM imports").fetchone()[0] == 4


# ------------------------------------------------------------------------------- retention, privacy

def test_purge_before_keeps_recent_rows_and_undelivered_alerts(store: Store, db: Path) -> None:
    old, new = T0 - timedelta(days=100), T0
    sent_old = verdict(at=old, action="block", alert=True, rule="t")
    pending_old = verdict(at=old, action="block", alert=True, rule="t")
    for v in (sent_old, pending_old, verdict(at=old, action="block"), verdict(at=new,
                                                                               action="block")):
        store.commit_incident(v).result(5)
    store.mark_alerts_sent([sent_old.ref], message_id="<m>", sent=time.time())
    store.add_usage(verdict(at=old))
    store.add_usage(verdict(at=new))
    store.flush()
    store.upsert_lease(Lease(mac="aa:aa:aa:aa:aa:aa", ip="10.0.0.1", expires=old.timestamp()),
                       seen=old.timestamp())
    store.upsert_lease(Lease(mac="bb:bb:bb:bb:bb:bb", ip="10.0.0.2"), seen=new.timestamp())
    counts = store.purge_before(T0 - timedelta(days=90))
    # usage: the old minute has three keys: log, block by rule t, block without a rule
    assert counts == {"alerts": 1, "events": 2, "usage": 3, "leases": 1}
    conn = plain(db)
    assert {r[0] for r in conn.execute("SELECT ref FROM events")} >= {pending_old.ref}
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 2
    assert conn.execute("SELECT event_ref FROM alerts").fetchall() == [(pending_old.ref,)]


def test_export_and_purge_everything_about_one_person(store: Store, db: Path) -> None:
    store.commit_incident(verdict(user="amy", action="block", alert=True, rule="t")).result(5)
    store.commit_incident(verdict(user="bob", action="block", alert=True, rule="t")).result(5)
    store.add_usage(verdict(user="amy", host="other.example"))
    store.add_usage(verdict(user="bob"))
    store.flush()
    store.upsert_lease(Lease(mac="aa:aa:aa:aa:aa:aa", ip="10.0.0.1", user="amy"), seen=1.0)
    data = store.export_user("amy")
    json.dumps(data)
    assert {k: len(v) for k, v in data.items()} == {"events": 1, "usage": 2, "alerts": 1,
                                                    "leases": 1}
    assert all(r["user"] == "amy" for r in data["events"] + data["usage"] + data["leases"])
    assert data["usage"][0]["time"].endswith("+00:00")
    assert store.purge_user("amy") == {"alerts": 1, "events": 1, "usage": 2, "leases": 1}
    assert {k: len(v) for k, v in store.export_user("amy").items()} == {
        "events": 0, "usage": 0, "alerts": 0, "leases": 0}
    assert len(store.export_user("bob")["events"]) == 1


def test_backup_is_a_consistent_openable_copy(store: Store, tmp_path: Path) -> None:
    for _ in range(5):
        store.commit_incident(verdict(action="block")).result(5)
    dest = tmp_path / "backups" / "filterd-backup.db"
    store.backup(dest)
    conn = sqlite3.connect(dest)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 5
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()
    with Store(dest) as copy:  # and filterd itself can open it
        assert len(copy.events(kind="block")) == 5


# ------------------------------------------------------------------------------- failures

def test_a_locked_database_is_waited_for_and_then_written(db: Path) -> None:
    with Store(db, busy_timeout=5.0, flush_seconds=0.05) as s:
        other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN EXCLUSIVE")
        other.execute("INSERT INTO imports (source, \"offset\") VALUES ('lock', 1)")
        started = time.monotonic()
        s.add_usage(verdict())
        fut = s.commit_incident(verdict(action="block", rule="r"))
        threading.Timer(1.0, lambda: other.execute("COMMIT")).start()
        fut.result(10)
        assert time.monotonic() - started >= 0.9
        s.flush(10)
        assert s.stats()["locked_retries"] >= 1
        assert s.stats()["errors"] == 0
        conn = plain(db)
        assert conn.execute("SELECT sum(requests) FROM usage").fetchone()[0] == 2
        other.close()


def test_a_lock_longer_than_busy_timeout_fails_the_future_but_keeps_the_incident(db: Path
                                                                                  ) -> None:
    with Store(db, busy_timeout=0.3, flush_seconds=0.05) as s:
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        other.execute("INSERT INTO imports (source, \"offset\") VALUES ('lock', 1)")
        v = verdict(action="block", rule="r")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            s.commit_incident(v).result(10)
        other.execute("COMMIT")
        other.close()
        s.flush(10)  # retried once the lock is gone
        assert plain(db).execute("SELECT count(*) FROM events WHERE ref = ?",
                                 (v.ref,)).fetchone()[0] == 1
        assert s.stats()["failed_incidents"] == 1 and s.stats()["retried_incidents"] == 1


def test_a_full_disk_is_logged_once_counted_and_retried(db: Path, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="filterd.record")
    with Store(db, max_bytes=1, flush_seconds=0.02) as s:  # the file may not grow at all
        failures = 0
        for i in range(300):
            s.add_usage(verdict(host=f"u{i}.example"))
            try:
                s.commit_incident(verdict(action="block", rule="r", host=f"b{i}.example",
                                          url=f"https://b{i}.example/" + "x" * 500)).result(5)
            except sqlite3.OperationalError as exc:
                assert "full" in str(exc)
                failures += 1
        assert failures > 5  # the futures raise: the addon can fail closed
        with pytest.raises(TimeoutError):
            s.flush(0.5)
        stats = s.stats()
        assert stats["errors"] >= failures and "full" in stats["last_error"]
        assert stats["queued"] > 0 and stats["retry_incidents"] == failures
        full = [r for r in caplog.records if "full" in r.getMessage()]
        assert len(full) == 1  # once per distinct error, not per row or per attempt
        s.max_bytes = None  # space is found (the next connection has no cap)
        s.flush(10)
        assert s.stats()["queued"] == 0 and s.stats()["retry_incidents"] == 0
    conn = plain(db)
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 300
    assert conn.execute("SELECT count(*) FROM usage WHERE host LIKE 'u%'").fetchone()[0] == 300


CHILD = textwrap.dedent("""
    import sys, time
    from datetime import datetime, timezone
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from filterd.record import Store
    from filterd.verdict import Verdict, What, Who
    store = Store(Path(sys.argv[1]), flush_seconds=0.01).open()
    i = 0
    while True:
        who = Who(ip="10.0.0.9", user="child" + sys.argv[3])
        v = Verdict(time=datetime.now(timezone.utc), who=who,
                    what=What(host=f"h{i % 7}.example", categories=("social",)),
                    window="contact", action="block", alert=i % 3 == 0, rule="r")
        store.commit_incident(v).result(10)
        print("committed", v.ref, flush=True)
        for _ in range(50):
            store.add_usage(Verdict(time=v.time, who=who, what=v.what, window="contact",
                                    action="log"))
        i += 1
        if sys.argv[3] != "kill" and i == int(sys.argv[3]):
            store.close()
            print("done", flush=True)
            break
""")


def start_child(tmp_path: Path, db: Path, arg: str) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen([sys.executable, str(script), str(db), str(REPO), arg],
                            stdout=subprocess.PIPE, text=True)


def test_kill_9_loses_no_committed_incident(tmp_path: Path, db: Path) -> None:
    with Store(db):
        pass
    child = start_child(tmp_path, db, "kill")
    refs = []
    for line in child.stdout:
        refs.append(line.split()[1])
        if len(refs) == 40:
            break
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    conn = plain(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {r[0] for r in conn.execute("SELECT ref FROM events")}
    assert set(refs) <= stored
    alerts = {r[0] for r in conn.execute("SELECT event_ref FROM alerts")}
    assert set(refs[::3]) <= alerts
    with Store(db) as s:  # and the store opens again and writes
        s.commit_incident(verdict(action="block")).result(5)


def test_another_process_writes_the_same_file_at_the_same_time(tmp_path: Path, db: Path) -> None:
    with Store(db, flush_seconds=0.01) as s:
        child = start_child(tmp_path, db, "60")  # the sensor, say
        for i in range(60):
            s.commit_incident(verdict(action="block", rule="r")).result(10)
            for _ in range(50):
                s.add_usage(verdict(host=f"p{i % 3}.example"))
        out = child.communicate(timeout=60)[0]
        assert child.returncode == 0 and out.endswith("done\n")
        s.flush()
    conn = plain(db)
    assert conn.execute("SELECT user, count(*) FROM events GROUP BY user ORDER BY user"
                        ).fetchall() == [("amy", 60), ("child60", 60)]
    assert conn.execute("SELECT user, sum(requests) FROM usage GROUP BY user ORDER BY user"
                        ).fetchall() == [("amy", 60 * 51), ("child60", 60 * 51)]


def test_record_batch_queues_alert_mails_only_for_recent_incidents(store: Store, db: Path) -> None:
    old = verdict(at=T0, action="block", alert=True)
    new = verdict(at=T0 + timedelta(hours=2), action="block", alert=True)
    store.record_batch([old, new], alert_after=T0 + timedelta(hours=1))
    conn = plain(db)
    assert {r[0] for r in conn.execute("SELECT ref FROM events")} == {old.ref, new.ref}
    assert [r[0] for r in conn.execute("SELECT event_ref FROM alerts")] == [new.ref]
