"""Benchmark of the event store (issue 4: >= 50,000 events/s through the write-behind path).

Run: python bench/bench_store.py [--minutes 420] [--users 1500] [--hosts 2000] [--dir DIR]

It measures, on a real SQLite file:
1. the cost of ``add_usage`` on the caller's thread (ns per call, the proxy's event loop);
2. events/s through the write-behind path: a school day's requests (1,500 users, 2,000
   categorised hosts with a Zipf-like popularity, 08:30-15:30) pushed through ``add_usage``
   and ``flush``ed, end to end, while the writer thread aggregates and upserts;
3. incident commits/s (one at a time, each awaited like the addon does; and 8 in flight);
4. the size of the file for that simulated day, and rows per table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from filterd.record import Store  # noqa: E402
from filterd.verdict import Verdict, What, Who  # noqa: E402

CATEGORIES = ["social_networks", "audio-video", "games", "shopping", "news", "chat", "blog",
              "forums", "webmail", "sports"]


def population(users: int, hosts: int, rng: random.Random) -> tuple[list[Who], list[What]]:
    whos = [Who(ip=f"10.20.{i // 250}.{i % 250 + 1}", user=f"pupil{i:04d}",
                role="staff" if i % 12 == 0 else "pupil", source="auth") for i in range(users)]
    whats = [What(host=f"host{j}.example", categories=(rng.choice(CATEGORIES),))
             for j in range(hosts)]
    return whos, whats


def day(whos: list[Who], whats: list[What], minutes: int, rng: random.Random,
        per_user_minute: float = 8.0, active: float = 0.6):
    """Yield (minute_index, verdicts of that minute), in time order.

    Each minute, a user is active with probability ``active``; an active user makes on
    average ``per_user_minute`` requests spread over 1-4 hosts drawn with a Zipf-like weight.
    """
    start = datetime(2026, 11, 25, 8, 30, tzinfo=timezone.utc)
    weights = [1.0 / (rank + 1) for rank in range(len(whats))]
    cum = []
    total = 0.0
    for w in weights:
        total += w
        cum.append(total)
    for m in range(minutes):
        t0 = start + timedelta(minutes=m)
        window = "contact" if (m % 60) < 50 else "non_contact"
        out: list[Verdict] = []
        for who in whos:
            if rng.random() > active:
                continue
            hosts = rng.choices(whats, cum_weights=cum, k=rng.randint(1, 4))
            n = max(1, int(rng.expovariate(1.0 / per_user_minute)))
            for k in range(n):
                what = hosts[k % len(hosts)]
                action = "block" if what.categories[0] == "games" and window == "contact" else "log"
                out.append(Verdict(time=t0 + timedelta(seconds=rng.random() * 59.9), who=who,
                                   what=what, window=window, action=action,
                                   rule="games-in-lessons" if action == "block" else None,
                                   ref=""))  # Verdict's random ref costs ~10 us; not ours
        yield m, out


def bench_add_usage_cost(folder: Path, verdicts: list[Verdict], *, idle_writer: bool) -> float:
    """ns per add_usage call on the caller's thread.

    ``idle_writer``: the writer thread sleeps during the loop (the call's own cost); otherwise
    it folds and writes at the same time, and since it shares the GIL the caller's wall time
    also carries the writer's Python work (the amortised cost per request of the whole store).
    """
    kwargs = {"batch_size": 10**9, "flush_seconds": 3600.0} if idle_writer else {}
    store = Store(folder / f"cost{int(idle_writer)}.db", max_queue=len(verdicts) + 1,
                  **kwargs).open()
    try:
        add = store.add_usage
        t0 = time.perf_counter_ns()
        for v in verdicts:
            add(v)
        ns = (time.perf_counter_ns() - t0) / len(verdicts)
        store.flush(120)
    finally:
        store.close()
    return ns


def bench_day(folder: Path, whos: list[Who], whats: list[What], minutes: int,
              rng: random.Random) -> dict:
    """Generate the day first (so generation is not timed), then push it all through."""
    minutes_data = [v for _, vs in day(whos, whats, minutes, rng) for v in vs]
    path = folder / "day.db"
    store = Store(path, max_queue=len(minutes_data) + 1).open()
    try:
        t0 = time.perf_counter()
        add = store.add_usage
        for v in minutes_data:
            add(v)
        t_added = time.perf_counter()
        store.flush(600)
        t1 = time.perf_counter()
        stats = store.stats()
    finally:
        store.close()
    import sqlite3

    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT count(*), sum(requests) FROM usage").fetchone()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return {
        "events": len(minutes_data),
        "seconds": t1 - t0,
        "add_seconds": t_added - t0,
        "usage_rows": rows[0],
        "requests_in_db": rows[1],
        "db_bytes": os.path.getsize(path),
        "stats": stats,
    }


def bench_incidents(folder: Path, whos: list[Who], whats: list[What], n: int,
                    inflight: int) -> float:
    store = Store(folder / f"incidents{inflight}.db").open()
    t = datetime(2026, 11, 25, 10, 0, tzinfo=timezone.utc)
    try:
        t0 = time.perf_counter()
        window: list[concurrent.futures.Future[None]] = []
        for i in range(n):
            v = Verdict(time=t, who=whos[i % len(whos)], what=whats[i % len(whats)],
                        window="contact", action="block", alert=(i % 10 == 0), rule="r")
            window.append(store.commit_incident(v))
            if len(window) >= inflight:
                window.pop(0).result(30)
        for f in window:
            f.result(30)
        return n / (time.perf_counter() - t0)
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=int, default=420, help="school-day minutes (08:30-15:30)")
    ap.add_argument("--users", type=int, default=1500)
    ap.add_argument("--hosts", type=int, default=2000)
    ap.add_argument("--incidents", type=int, default=2000)
    ap.add_argument("--dir", type=Path, default=None, help="where the bench files go (a tmp dir)")
    args = ap.parse_args()
    rng = random.Random(4)
    whos, whats = population(args.users, args.hosts, rng)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        print(f"python {sys.version.split()[0]}, sqlite {__import__('sqlite3').sqlite_version}, "
              f"{args.users} users, {args.hosts} hosts, {args.minutes} minutes, files in {folder}")

        sample = [v for _, vs in day(whos, whats, 30, random.Random(1)) for v in vs][:200_000]
        ns = bench_add_usage_cost(folder, sample, idle_writer=True)
        print(f"add_usage on the caller's thread: {ns:.0f} ns per call, writer idle "
              f"({len(sample):,} calls)")
        ns = bench_add_usage_cost(folder, sample, idle_writer=False)
        print(f"add_usage on the caller's thread: {ns:.0f} ns per call, writer busy at the same "
              f"time (shares the GIL: includes its folding work)")

        d = bench_day(folder, whos, whats, args.minutes, rng)
        rate = d["events"] / d["seconds"]
        print(f"write-behind, a simulated day: {d['events']:,} events in {d['seconds']:.2f} s "
              f"= {rate:,.0f} events/s end to end (add_usage loop {d['add_seconds']:.2f} s, "
              f"then flush)")
        print(f"  usage rows {d['usage_rows']:,} (requests in DB {d['requests_in_db']:,}, "
              f"{d['events'] / max(1, d['usage_rows']):.1f} requests per row), batches "
              f"{d['stats']['batches']}, dropped {d['stats']['dropped']}")
        print(f"  DB size for the day: {d['db_bytes'] / 1e6:.1f} MB "
              f"({d['db_bytes'] / max(1, d['usage_rows']):.0f} bytes per usage row)")
        assert d["requests_in_db"] == d["events"], "lost or double-counted requests"

        for inflight in (1, 8):
            r = bench_incidents(folder, whos, whats, args.incidents, inflight)
            print(f"incident commits (synchronous=FULL, {inflight} in flight): {r:,.0f}/s")


if __name__ == "__main__":
    main()
