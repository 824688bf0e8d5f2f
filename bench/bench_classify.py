"""Benchmark: filterd's compiled index against the naive baseline, in the same run.

    python bench/bench_classify.py [--ut1 PATH] [--synthetic 5000000] [--lookups 200000]

For each data set (the full UT1 lists; a synthetic N-entry domain list) it prints compile
time, warm load time (a new process mapping the cached index), lookups/s and RSS, each next
to the naive baseline: a Python ``set`` of every domain, checking each suffix of the host.

Load time and RSS are measured for each side alone in a fresh process (RSS after running
all its lookups once, so the pages of the mapped index that lookups touch are counted).
Speed is measured with both sides in one process, alternating, best of 3 rounds, so that
load from other programs on the machine falls on both alike. Lookup rows:

- ``host``: a canonical host in, matches out. Neither side canonicalises; filterd's
  per-host cache is off, so every lookup walks the trie.
- ``url``: a URL string in, both sides canonicalise it with the same function
  (``filterd.urls.canonical_url_uncached``, no cache) and look its host up (filterd also
  checks URL entries).
- ``classify``: filterd's real per-request call, ``Classifier.classify(url)`` with its
  caches, returning a ``What``; the naive side canonicalises through an ``lru_cache``
  (8192) of the same function and returns a list. Workload: 10,000 distinct URLs, each
  20 times, shuffled (a school's working set of hosts is small).

The host workload: half are subdomains of listed domains (hits), half random names under
the same TLDs (misses); the same list for both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_UT1 = REPO.parent / "shared" / "data" / "ut1" / "blacklists"
TLDS = ["com", "net", "org", "de", "fr", "co.uk", "io", "ru", "info", "xyz"]


def rss_mb(field: str = "VmRSS") -> float:
    """Current resident set size of this process (or its RssFile / RssAnon part), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    """Peak RSS of this process image (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def specs_for(dataset: str, source: str) -> list:
    from filterd.classify import ListSpec

    if dataset == "ut1":
        root = Path(source)
        return [ListSpec(p.name, p.name, p, "squidguard") for p in sorted(root.iterdir()) if p.is_dir()]
    return [ListSpec("synthetic", "synthetic", Path(source), "domains")]


def naive_domains(dataset: str, source: str) -> list[str]:
    """What a naive loader would put in its set: every domains line, lower case, no leading dot."""
    files = ([p / "domains" for p in sorted(Path(source).iterdir()) if (p / "domains").is_file()]
             if dataset == "ut1" else [Path(source)])
    names = []
    for file in files:
        for line in file.read_text("utf-8", "replace").split("\n"):
            line = line.strip().lower()
            if line and not line.startswith("#"):
                names.append(line.lstrip("."))
    return names


def time_loop(function, items, rounds: int = 1) -> float:
    """Lookups per second of ``function`` over ``items``."""
    started = time.perf_counter()
    for _ in range(rounds):
        for item in items:
            function(item)
    return len(items) * rounds / (time.perf_counter() - started)


# --- child processes -------------------------------------------------------------------------


def child_compile(args) -> dict:
    from filterd.classify import Classifier

    base = rss_mb()
    started = time.perf_counter()
    built = Classifier.build(specs_for(args.dataset, args.source), Path(args.cache))
    seconds = time.perf_counter() - started
    return {"compile_s": seconds, "from_cache": built.from_cache, "entries": sum(s.entries for s in built.lists),
            "keys": len(built._index), "file_mb": built.index_path.stat().st_size / 1e6,
            "peak_mb": peak_mb(), "base_mb": base}


def workloads(path: str) -> tuple[list[str], list[str], list[str]]:
    """Hosts, one URL per host, and the "classify" stream: 10,000 URLs, each 20 times."""
    hosts = json.loads(Path(path).read_text())
    url_list = [f"https://{h}/index.html?x=1" for h in hosts]
    repeated = [u for u in url_list[:10000] for _ in range(20)]
    random.Random(7).shuffle(repeated)
    return hosts, url_list, repeated


def load_filterd(args):
    """The warm filterd side: Classifier.build mapping the cached index."""
    from filterd.classify import Classifier

    built = Classifier.build(specs_for(args.dataset, args.source), Path(args.cache))
    assert built.from_cache, "expected a warm cache"
    return built


def filterd_rows(built, raw=None):
    """The three timed operations of the filterd side (``raw``: an index without host cache)."""
    from filterd import urls

    lookup = (raw or built._index).lookup
    canon = urls.canonical_url_uncached

    def host(h: str):
        return lookup(h[::-1] + ".")

    def url(u: str):
        c = canon(u)
        return lookup(c.host[::-1] + ".", c.path, c.query_pairs)

    return host, url, built.classify


def load_naive(args) -> set[str]:
    return set(naive_domains(args.dataset, args.source))


def naive_rows(domains: set[str]):
    import functools

    from filterd import urls

    def lookup(host: str, s=domains):
        found = []
        if host in s:
            found.append(host)
        i = host.find(".")
        while i >= 0:
            host = host[i + 1:]
            if host in s:
                found.append(host)
            i = host.find(".")
        return found

    canon = urls.canonical_url_uncached
    cached = functools.lru_cache(maxsize=8192)(canon)
    return lookup, (lambda u: lookup(canon(u).host)), (lambda u: lookup(cached(u).host))


def child_memory(args) -> dict:
    """Load time and RSS of one side, alone in a fresh process, after running its lookups."""
    import filterd.classify  # noqa: F401  (imports are not the structure's memory)
    import filterd.urls  # noqa: F401

    hosts, url_list, repeated = workloads(args.workload)
    base = rss_mb()
    started = time.perf_counter()
    thing = load_filterd(args) if args.child == "filterd" else load_naive(args)
    load_s = time.perf_counter() - started
    loaded_mb = rss_mb()
    host, url, classify = filterd_rows(thing) if args.child == "filterd" else naive_rows(thing)
    if args.child == "filterd":
        thing._index._host_cache = 0  # as in the timed rows: every host walks the trie
    hits = sum(1 for h in hosts if host(h))
    for u in url_list:
        url(u)
    if args.child == "filterd":
        thing._index._host_cache = 32768
    for u in repeated:
        classify(u)
    return {"load_s": load_s, "hits": hits, "rss_mb": rss_mb(), "peak_mb": peak_mb(), "base_mb": base,
            "loaded_mb": loaded_mb, "file_mb": rss_mb("RssFile"), "anon_mb": rss_mb("RssAnon")}


def child_speed(args) -> dict:
    """Both sides in one process, timed in alternation (best of 3), so that the load other
    programs put on the machine hits both alike."""
    from filterd.index import Index

    hosts, url_list, repeated = workloads(args.workload)
    built = load_filterd(args)
    ours = filterd_rows(built, Index.open(built.index_path, host_cache=0))  # same file, no host cache
    naive = naive_rows(load_naive(args))
    best: dict[str, float] = {}
    for _ in range(3):
        for side, rows in (("filterd", ours), ("naive", naive)):
            for name, function, items in zip(("host", "url", "classify"), rows, (hosts, url_list, repeated)):
                rate = time_loop(function, items)
                best[f"{side}_{name}"] = max(best.get(f"{side}_{name}", 0.0), rate)
    return best


# --- the parent ------------------------------------------------------------------------------


def run_child(role: str, dataset: str, source: str, cache: Path, workload: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", role, "--dataset", dataset, "--source", source,
         "--cache", str(cache), "--workload", str(workload)],
        capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{role} child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def synthetic_list(path: Path, count: int) -> None:
    """``count`` distinct random domains (random 6-14 letter labels, some with a subdomain)."""
    rng = random.Random(42)
    alphabet = string.ascii_lowercase + string.digits
    seen = set()
    with path.open("w") as handle:
        while len(seen) < count:
            label = "".join(rng.choices(alphabet, k=rng.randint(6, 14)))
            name = f"{label}.{rng.choice(TLDS)}"
            if rng.random() < 0.2:
                name = f"{''.join(rng.choices(alphabet, k=rng.randint(2, 6)))}.{name}"
            if name not in seen:
                seen.add(name)
                handle.write(name + "\n")


def workload(dataset: str, source: str, path: Path, size: int) -> None:
    rng = random.Random(1)
    names = [n for n in naive_domains(dataset, source) if not n.replace(".", "").isdigit()]
    sample = rng.sample(names, min(size // 2, len(names)))
    hits = [f"{rng.choice(['www', 'cdn', 'm', 'a.b'])}.{n}" for n in sample]
    misses = [f"{''.join(rng.choices(string.ascii_lowercase, k=rng.randint(5, 12)))}.{rng.choice(TLDS)}"
              for _ in range(size - len(hits))]
    hosts = hits + misses
    rng.shuffle(hosts)
    path.write_text(json.dumps(hosts))


def report(title: str, compiled: dict, ours: dict, naive: dict) -> None:
    def row(name: str, a: float, b: float, unit: str, better: str) -> None:
        ratio = a / b if b else float("nan")
        print(f"  {name:44s} {a:14,.2f} {b:14,.2f}  {ratio:6.2f}x  {unit} ({better})")

    print(f"\n== {title}: {compiled['entries']:,} entries, {compiled['keys']:,} trie keys, "
          f"index file {compiled['file_mb']:.1f} MB")
    print(f"  compile (load lists + build index, cold): {compiled['compile_s']:.2f} s, "
          f"peak RSS {compiled['peak_mb']:.0f} MB")
    print(f"  {'':44s} {'filterd':>14s} {'naive set':>14s}  {'ratio':>7s}")
    row("load (warm, new process), s", ours["load_s"], naive["load_s"], "s",
        "lower is better; filterd: hash sources + check + map index")
    row("lookups/s: host, no canonicalisation", ours["host_rate"], naive["host_rate"], "/s", "higher is better")
    row("lookups/s: URL, both canonicalise", ours["url_rate"], naive["url_rate"], "/s", "higher is better")
    row("lookups/s: classify(url), caches on", ours["classify_rate"], naive["classify_rate"], "/s",
        "higher is better")
    row("RSS of the loaded structure, MB", ours["loaded_mb"] - ours["base_mb"],
        naive["loaded_mb"] - naive["base_mb"], "MB", "lower is better; RSS after load minus RSS before")
    row("RSS before load (python, imports, workload)", ours["base_mb"], naive["base_mb"], "MB",
        "the same on both sides")
    row("whole process RSS after all lookups, MB", ours["rss_mb"], naive["rss_mb"], "MB", "lower is better")
    row("  of which file-backed (shared, clean)", ours["file_mb"], naive["file_mb"], "MB",
        "mapped index pages, libraries")
    row("  of which private (anonymous)", ours["anon_mb"], naive["anon_mb"], "MB", "heap: caches, workload")
    row("peak RSS, MB", ours["peak_mb"], naive["peak_mb"], "MB", "lower is better")
    print(f"  workload hits: filterd {ours['hits']:,}, naive {naive['hits']:,} "
          "(filterd also canonicalises list entries and reads urls files)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ut1", default=str(DEFAULT_UT1), help="UT1 blacklists folder ('' to skip)")
    parser.add_argument("--synthetic", type=int, default=5_000_000, help="entries in the synthetic list (0 to skip)")
    parser.add_argument("--lookups", type=int, default=200_000, help="hosts in the lookup workload")
    parser.add_argument("--work", default="", help="folder for the synthetic list and caches (default: a temp dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = {"compile": child_compile, "filterd": child_memory, "naive": child_memory,
                  "speed": child_speed}[args.child](args)
        print(json.dumps(result))
        return

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="filterd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
          f"work folder {work}")
    datasets = []
    if args.ut1:
        datasets.append(("UT1 (all categories)", "ut1", args.ut1))
    if args.synthetic:
        source = work / f"synthetic-{args.synthetic}.txt"
        if not source.exists():
            started = time.perf_counter()
            synthetic_list(source, args.synthetic)
            print(f"generated {source} in {time.perf_counter() - started:.1f} s")
        datasets.append((f"synthetic {args.synthetic:,} domains", "synthetic", str(source)))
    for title, dataset, source in datasets:
        cache = work / f"cache-{dataset}"
        for old in cache.glob("*.idx") if cache.exists() else ():
            old.unlink()  # measure a cold compile
        load = work / f"workload-{dataset}.json"
        workload(dataset, source, load, args.lookups)
        compiled = run_child("compile", dataset, source, cache, load)
        ours = run_child("filterd", dataset, source, cache, load)
        naive = run_child("naive", dataset, source, cache, load)
        speed = run_child("speed", dataset, source, cache, load)
        for name in ("host", "url", "classify"):
            ours[f"{name}_rate"] = speed[f"filterd_{name}"]
            naive[f"{name}_rate"] = speed[f"naive_{name}"]
        report(title, compiled, ours, naive)


if __name__ == "__main__":
    main()
