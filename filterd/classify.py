"""classify: what a URL or host is, according to every configured list (the "what" stage).

``Classifier.build`` loads the lists once, compiles them into one index file in a cache
folder (filterd.index) and maps it; the next start, or another proxy process, maps the same
file in milliseconds. The file name is the sha256 of every source's bytes, format, name and
category and of the loader and index versions, so a changed list (or a new filterd) compiles a
new file and an unchanged one is never recompiled.

Category map ("groups"): a group name is added to the categories of anything in one of its
list categories (``social_media`` <- ``social_networks``, ``blog``, ...), so the policy can
speak of the school's categories while the lists keep their own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from filterd.errors import FilterdError
from filterd.index import CorruptIndex, Index, compile_index, write_atomic
from filterd.lists import FORMATS, LOADER_VERSION, Skip, load, source_digest
from filterd.urls import canonical_host, canonical_url
from filterd.verdict import Match, What

__all__ = ["Classifier", "ListSpec", "ListStats", "Skip"]

log = logging.getLogger("filterd.classify")


@dataclass(frozen=True, slots=True)
class ListSpec:
    """One [[lists]] table: a named list, its category, where it is and its format."""

    name: str
    category: str
    path: Path
    format: str


@dataclass(frozen=True, slots=True)
class ListStats:
    """What ``filterd lists`` shows for one list.

    ``skips`` holds at most the first 1000 skipped lines (``skipped`` counts them all);
    ``load_seconds`` is the loader's time when the index was compiled (a cached start
    does not load the lists at all).
    """

    name: str
    category: str
    source: str
    format: str
    entries: int
    skipped: int
    load_seconds: float
    skips: tuple[Skip, ...]


def _cache_key(specs: Sequence[ListSpec]) -> str:
    """sha256 over what a compiled index depends on: versions, specs and source bytes."""
    from filterd.index import INDEX_VERSION

    parts = [INDEX_VERSION, LOADER_VERSION]
    for spec in specs:
        parts.append([spec.name, spec.category, spec.format, source_digest(spec.path, spec.format)])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _config_key(specs: Sequence[ListSpec]) -> str:
    """A short hash of which lists (names, paths, formats) an index is for, so that a newer
    index for the same lists replaces the old file, while another config's files are kept."""
    identity = [[s.name, s.category, str(Path(s.path).resolve()), s.format] for s in specs]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:12]


def _remove_stale(current: Path) -> None:
    """Delete older indexes of the same lists. A process still mapping one keeps its pages
    (the file lives on until it is unmapped), so this is safe while proxies run."""
    prefix = current.name.rsplit("-", 1)[0] + "-"
    for old in current.parent.glob(prefix + "*.idx"):
        if old != current:
            try:
                old.unlink()
            except OSError:
                pass


def _stats_from_meta(meta: dict) -> list[ListStats]:
    return [
        ListStats(item["name"], item["category"], item["source"], item["format"], item["entries"],
                  item["skipped"], item["load_seconds"],
                  tuple(Skip(*skip) for skip in item["skips"]))
        for item in meta["lists"]
    ]


class Classifier:
    """Categories of URLs and hosts from compiled lists; safe to share between threads."""

    def __init__(self, index: Index, stats: list[ListStats], groups: Mapping[str, Sequence[str]],
                 *, index_path: Path | None = None, from_cache: bool = False) -> None:
        """Use ``Classifier.build``."""
        self._index = index
        self._stats = stats
        self._lists = [(s.name, s.category) for s in stats]
        self._groups: dict[str, tuple[str, ...]] = {}
        for group, members in groups.items():
            for category in members:
                self._groups.setdefault(category, ())
                if group not in self._groups[category]:
                    self._groups[category] += (group,)
        self._categories = frozenset([s.category for s in stats] + list(groups))
        self._cache: dict[tuple, tuple] = {}
        self._host_whats: dict[str, What] = {}  # classify_host: a log names a few thousand hosts
        self.index_path = index_path  #: the compiled file (None when built in memory)
        self.from_cache = from_cache  #: True when the index was mapped, not compiled

    @classmethod
    def build(cls, specs: Sequence[ListSpec], cache_dir: Path | None,
              groups: Mapping[str, Sequence[str]] = {}) -> Classifier:
        """Load and compile the lists, or map the compiled index when the sources are unchanged.

        A missing list is a FilterdError naming it; a damaged cache file is compiled again.
        """
        for number, spec in enumerate(specs):
            if spec.format not in FORMATS:
                raise FilterdError(f"unknown format {spec.format!r} (one of {', '.join(FORMATS)})",
                                   file=spec.path, field=f"lists[{number}].format")
        path = None
        if cache_dir is not None:
            path = Path(cache_dir) / f"filterd-index-{_config_key(specs)}-{_cache_key(specs)[:32]}.idx"
            if path.exists():
                try:
                    index = Index.open(path)
                    return cls(index, _stats_from_meta(index.meta), groups, index_path=path,
                               from_cache=True)
                except (CorruptIndex, KeyError, TypeError, ValueError) as error:
                    log.warning("rebuilding damaged list index %s: %s", path, error)
        loaded, stats = [], []
        for spec in specs:
            started = time.perf_counter()
            result = load(Path(spec.path), spec.format)
            elapsed = time.perf_counter() - started
            loaded.append(result)
            stats.append(ListStats(spec.name, spec.category, str(spec.path), spec.format,
                                   result.entries, result.skipped, round(elapsed, 6),
                                   tuple(result.skips)))
        meta = {"lists": [
            {"name": s.name, "category": s.category, "source": s.source, "format": s.format,
             "entries": s.entries, "skipped": s.skipped, "load_seconds": s.load_seconds,
             "skips": [[k.file, k.line, k.reason, k.text] for k in s.skips]}
            for s in stats]}
        data = compile_index(loaded, meta)
        del loaded
        if path is not None:
            try:
                write_atomic(path, data)
            except OSError as error:  # a read-only or full cache folder must not stop filtering
                log.warning("cannot write list index %s (%s); keeping it in memory", path, error)
            else:
                _remove_stale(path)
                return cls(Index.open(path), stats, groups, index_path=path)
        return cls(Index.from_bytes(data), stats, groups)

    @property
    def categories(self) -> frozenset[str]:
        """Every list category and every group name."""
        return self._categories

    @property
    def lists(self) -> list[ListStats]:
        """Per list: entries, skipped lines (with the first skips), category, source, load time."""
        return list(self._stats)

    def _parts(self, hits) -> tuple[tuple[str, ...], tuple[Match, ...]]:
        """Sorted categories (with group names) and matches of a set of index hits."""
        key = hits if type(hits) is tuple else tuple(hits)
        parts = self._cache.get(key)
        if parts is None:
            lists = self._lists
            matches = tuple(sorted({Match(lists[n][0], lists[n][1], text) for n, text in hits},
                                   key=lambda m: (m.list, m.category, m.entry)))
            categories = {m.category for m in matches}
            for category in list(categories):
                categories.update(self._groups.get(category, ()))
            parts = (tuple(sorted(categories)), matches)
            if len(self._cache) >= 16384:
                self._cache.clear()
            self._cache[key] = parts
        return parts

    def classify(self, url: str) -> What:
        """Categories of a URL (domain and URL entries); ValueError for a bad URL."""
        canon = canonical_url(url)
        hits = self._index.lookup(canon.host[::-1] + ".", canon.path, canon.query_pairs)
        if not hits:
            return What(canon.host, canon.href)
        return What(canon.host, canon.href, *self._parts(hits))

    def classify_host(self, host: str) -> What:
        """Categories of a host alone (CONNECT, TLS SNI): domain entries and URL entries that
        cover the whole host; ValueError for a bad host."""
        what = self._host_whats.get(host)
        if what is None:
            canon = canonical_host(host)
            # A URL entry for the whole host (path "/", no query) applies before any path is known.
            hits = self._index.lookup(canon[::-1] + ".", "/")
            what = What(canon, None, *self._parts(hits)) if hits else What(canon)
            if len(self._host_whats) >= 16384:
                self._host_whats.clear()
            self._host_whats[host] = what
        return what
