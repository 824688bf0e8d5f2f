"""Benchmark: the weekly report over 10 million usage rows (target: < 10 s).

    python bench/bench_report.py                     # 10 M rows over 13 weeks (90 days' retention)
    python bench/bench_report.py --weeks 5           # 10 M rows in exactly the 5 weeks the report reads
    python bench/bench_report.py --weeks 1           # all 10 M rows in the reported week
    python bench/bench_report.py --db /tmp/b.db --reuse   # time again without regenerating

The database is created by ``filterd.record.Store`` (so it has exactly the production schema
and indexes) and then filled directly with ``executemany``: a synthetic school of 2,000 users
(10 % staff), 5,000 hosts, about a third of the requests social media, 1 % blocked, 0.1 % to
bypass sites, spread over the school day with a quieter night.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from filterd import report  # noqa: E402
from filterd.record import Store  # noqa: E402

TZ = ZoneInfo("Europe/London")
WEEK = "2026-W13"  # a DST week, on purpose
CATEGORIES = [
    (json.dumps(["social_networks", "social_media"]), 0.18),
    (json.dumps(["audio-video", "social_media"]), 0.10),
    (json.dumps(["chat", "social_media"]), 0.04),
    (json.dumps(["forums", "social_media"]), 0.02),
    (json.dumps(["search_engines"]), 0.30),
    (json.dumps(["news"]), 0.15),
    (json.dumps(["games"]), 0.10),
    (json.dumps(["education"]), 0.10),
    (json.dumps(["vpn", "bypass"]), 0.001),
]


def generate(db: Path, rows: int, weeks: list[str], seed: int = 7) -> float:
    """Fill ``db`` with ``rows`` usage rows spread over ``weeks``; return the seconds taken."""
    t0 = time.perf_counter()
    Store(db).open().close()  # schema and indexes exactly as filterd makes them
    rng = random.Random(seed)
    users = [(f"u{i:04d}", "staff" if i % 10 == 0 else "pupil", f"10.20.{i // 250}.{i % 250 + 1}")
             for i in range(2000)]
    cats = [c for c, _ in CATEGORIES]
    weights = [w for _, w in CATEGORIES]
    hosts_by_cat = {c: [f"h{j}.{k}.example" for j in range(600)] for k, c in enumerate(cats)}
    windows = ("contact", "non_contact", "out_of_hours")
    per_week = rows // len(weeks)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    sql = ("INSERT OR IGNORE INTO usage (minute, user, ip, host, window, action, rule, role, device,"
           " categories, source, requests, blocked) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)")
    done = 0
    for wi, week in enumerate(weeks):
        start, end = report.week_bounds(week, TZ)
        lo, hi = int(start.timestamp()) // 60, int(end.timestamp()) // 60
        minutes = hi - lo
        target = per_week if wi < len(weeks) - 1 else rows - done
        # busier in the school day: minute weight 5 from 08:00 to 16:00 local, else 1
        base = target / (minutes * (1 + 4 * 8 * 5 / (24 * 7)))
        batch = []
        written = 0
        for m in range(lo, hi):
            local = datetime.fromtimestamp(m * 60, TZ)
            busy = 5 if (local.weekday() < 5 and 8 <= local.hour < 16) else 1
            n = min(len(users), int(base * busy + rng.random()))
            if written + n > target:
                n = max(0, target - written)
            window = ("contact" if busy == 5 and local.minute < 50 else
                      "non_contact" if busy == 5 else "out_of_hours")
            for user, role, ip in rng.sample(users, n):
                cat = rng.choices(cats, weights)[0]
                host = rng.choice(hosts_by_cat[cat])
                blocked = 1 if rng.random() < 0.01 else 0
                requests = 1 + int(rng.expovariate(0.3))
                batch.append((m, user, ip, host, window, "block" if blocked else "log",
                              "rule" if blocked else None, role, None, cat, "proxy", requests,
                              requests if blocked else 0))
            written += n
            if len(batch) >= 200_000:
                conn.executemany(sql, batch)
                conn.commit()
                batch.clear()
        # the rounding above can leave a few rows short: top up in the busiest minute range
        m = lo + 600
        while written < target:
            for user, role, ip in rng.sample(users, min(len(users), target - written)):
                batch.append((m, user, ip, "topup.example", "contact", "log", None, role, None,
                              cats[0], "proxy", 1, 0))
                written += 1
            m += 1
        conn.executemany(sql, batch)
        conn.commit()
        done += written
    count = conn.execute("SELECT count(*) FROM usage").fetchone()[0]
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("ANALYZE")
    conn.commit()
    conn.close()
    print(f"generated {count:,} usage rows in {time.perf_counter() - t0:.1f} s")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--weeks", type=int, default=13,
                    help="weeks the rows are spread over, ending with the reported week "
                         "(13 = the default 90-day retention; the report reads the last 5)")
    ap.add_argument("--db", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="time an existing --db again")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    tmp = None
    if args.db is None:
        tmp = tempfile.TemporaryDirectory(prefix="filterd-bench-")
        args.db = Path(tmp.name) / "filterd.db"
    weeks = [report.shift_week(WEEK, -k) for k in range(args.weeks - 1, -1, -1)]
    if not (args.reuse and args.db.exists()):
        args.db.unlink(missing_ok=True)
        generate(args.db, args.rows, weeks)
    with sqlite3.connect(args.db) as conn:
        total = conn.execute("SELECT count(*) FROM usage").fetchone()[0]
        lo, hi = (int(t.timestamp()) // 60 for t in report.week_bounds(WEEK, TZ))
        in_week = conn.execute("SELECT count(*) FROM usage WHERE minute >= ? AND minute < ?",
                               (lo, hi)).fetchone()[0]
    groups = {"social_media": ["social_networks", "audio-video", "chat", "forums"]}
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs (wall time on a shared machine; CPU time is the steadier figure)")
    cache = Path(tempfile.mkdtemp(prefix="filterd-bench-cache-"))
    # no cache; then as the scheduler runs it on a Monday: the cache holds 3 of the 4 earlier
    # weeks (last Monday's report cached the weeks before last week); then all 4 cached
    runs = [("no cache", None)] * args.repeat + [("Monday, 3 of 4 earlier weeks cached", "3of4"),
                                                 ("4 of 4 earlier weeks cached", "4of4")]
    for i, (label, mode) in enumerate(runs):
        if mode == "3of4":
            report.build_weekly(args.db, report.shift_week(WEEK, -1), tz=TZ, social_categories=["social_media"],
                                groups=groups, cache_dir=cache)  # last Monday's report fills the cache
        t0, c0 = time.perf_counter(), time.process_time()
        r = report.build_weekly(args.db, WEEK, tz=TZ, directory=None, school="Bench School",
                                social_categories=["social_media"], bypass_categories=["bypass"],
                                groups=groups, cache_dir=cache if mode else None)
        built, cpu = time.perf_counter() - t0, time.process_time() - c0
        out = Path(tempfile.mkdtemp(prefix="filterd-bench-out-"))
        t1 = time.perf_counter()
        r.write(out)
        written = time.perf_counter() - t1
        print(f"run {i + 1} ({label}): build_weekly {built:.2f} s (CPU {cpu:.2f} s) + write {written:.2f} s = "
              f"{built + written:.2f} s  ({total:,} usage rows, {in_week:,} in {WEEK}; "
              f"{len(r.users):,} users, {len(r.csv_rows()):,} CSV rows)  target < 10 s: "
              f"{'OK' if built + written < 10 else 'MISSED'}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
