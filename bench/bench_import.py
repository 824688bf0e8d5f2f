"""Benchmark: ``filterd import squid-log`` throughput (target: >= 50,000 lines/s).

    python bench/bench_import.py                 # 500,000 lines
    python bench/bench_import.py --lines 2000000 -c config/filterd.toml

Three figures, each in lines/s, measured in the same run on the same synthetic log:
1. parse only (``squidlog.parse_line`` on every line);
2. import with a trivial ``request`` (parse + Verdict + ``Store.record_batch``): the importer's
   and the store's own cost;
3. import through the real pipeline built from the config (identify, classify, window,
   decide) in this one process;
4. the same with worker processes (``pipeline_factory``, one per CPU unless ``--workers``),
   as ``filterd import squid-log`` runs it: the figure the target is about.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from filterd import squidlog  # noqa: E402
from filterd.record import Store  # noqa: E402
from filterd.verdict import Verdict, What, Who  # noqa: E402

TZ = ZoneInfo("Europe/London")
HOSTS = (["www.facebook.com", "www.instagram.com", "www.youtube.com", "twitter.com", "discord.com",
          "www.reddit.com", "en.wikipedia.org", "www.bbc.co.uk", "www.google.com", "classroom.google.com",
          "login.microsoftonline.com", "www.tiktok.com", "nordvpn.com", "hidemyass.com"]
         + [f"site{i}.example.org" for i in range(2000)])


def make_log(path: Path, lines: int, seed: int = 1) -> None:
    """A Squid native log: a school day's mix of GET, CONNECT, denials and a few bad lines."""
    rng = random.Random(seed)
    t = 1774252800.0  # Mon 23 March 2026 08:00 UTC
    with path.open("w") as fh:
        for i in range(lines):
            t += rng.expovariate(1 / 0.05)
            ip = f"10.20.{rng.randrange(8)}.{rng.randrange(1, 250)}"
            host = rng.choice(HOSTS)
            user = rng.choice(["-", "-", "-", f"u{rng.randrange(2000):04d}"])
            if i % 997 == 0:
                fh.write("garbage line\n")
                continue
            if rng.random() < 0.6:
                fh.write(f"{t:.3f} {rng.randrange(5000):6d} {ip} TCP_TUNNEL/200 {rng.randrange(99999)} "
                         f"CONNECT {host}:443 {user} HIER_DIRECT/1.2.3.4 -\n")
            else:
                code = "TCP_DENIED/403" if rng.random() < 0.02 else "TCP_MISS/200"
                fh.write(f"{t:.3f} {rng.randrange(5000):6d} {ip} {code} {rng.randrange(99999)} GET "
                         f"http://{host}/p/{rng.randrange(10**6)}?q={i} {user} HIER_DIRECT/1.2.3.4 text/html\n")


def trivial_request(url_or_host: str, *, ip: str | None, user: str | None, at: datetime,
                    method: str | None = None, host_only: bool = False) -> Verdict:
    host = url_or_host.rsplit(":", 1)[0] if host_only else (urlsplit(url_or_host).hostname or "")
    return Verdict(time=at, who=Who(ip=ip, user=user, role="pupil"),
                   what=What(host=host, url=None if host_only else url_or_host,
                             categories=("social_networks", "social_media")),
                   window="contact", action="log", method=method)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=500_000)
    ap.add_argument("-w", "--workers", type=int, default=None,
                    help="worker processes for the last figure (default: one per CPU)")
    ap.add_argument("-c", "--config", default=None, help="config for the real pipeline (default: the embedded one)")
    args = ap.parse_args()
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="filterd-bench-import-") as tmp:
        log = Path(tmp) / "access.log"
        make_log(log, args.lines)
        size = log.stat().st_size
        print(f"log: {args.lines:,} lines, {size / 1e6:.1f} MB")

        t0 = time.perf_counter()
        bad = 0
        with log.open() as fh:
            for line in fh:
                try:
                    squidlog.parse_line(line)
                except squidlog.SquidLineError:
                    bad += 1
        dt = time.perf_counter() - t0
        print(f"parse only:              {args.lines / dt:12,.0f} lines/s  ({bad} malformed)")

        with Store(Path(tmp) / "trivial.db").open() as store:
            stats = squidlog.import_log(log, trivial_request, store, tz=TZ)
        print(f"import, trivial request: {stats.lines_per_second:12,.0f} lines/s  "
              f"({stats.imported:,} imported, {stats.skipped:,} skipped, {stats.seconds:.1f} s)")

        try:
            from filterd import config as config_mod
            from filterd import pipeline

            cfg = config_mod.load(args.config)
            t1 = time.perf_counter()
            pipe = pipeline.build(cfg)
            built = time.perf_counter() - t1
        except Exception as exc:  # the stages are still landing: say why, keep the other figures
            print(f"import, real pipeline:   not measured ({type(exc).__name__}: {exc})")
            return
        with Store(Path(tmp) / "real.db").open() as store:
            stats = squidlog.import_log(log, pipe.request, store, tz=TZ, workers=1)
        print(f"import, real, 1 process: {stats.lines_per_second:12,.0f} lines/s  "
              f"({stats.imported:,} imported, {stats.skipped:,} skipped, {stats.seconds:.1f} s; "
              f"pipeline built in {built:.1f} s)")
        workers = args.workers or os.cpu_count() or 1
        with Store(Path(tmp) / "real-parallel.db").open() as store:
            stats = squidlog.import_log(log, pipe.request, store, tz=TZ, workers=workers,
                                        pipeline_factory=squidlog.ConfigPipeline(args.config, leases=False))
        print(f"import, real pipeline:   {stats.lines_per_second:12,.0f} lines/s  "
              f"({stats.imported:,} imported, {stats.skipped:,} skipped, {stats.seconds:.1f} s; "
              f"{workers} worker processes, as `filterd import squid-log`)  target >= 50,000: "
              f"{'OK' if stats.lines_per_second >= 50_000 else 'MISSED'}")
        print(f"load average after:  {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
