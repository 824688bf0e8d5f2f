"""Replay a Squid native access.log through filterd's stages (``filterd import squid-log``).

A school can backfill history or trial filterd on the logs its current proxy already writes.
Each line goes through the same pipeline as a live request (identify, classify, window,
decide) *at the line's own time*, and is written with ``Store.record_batch`` in chunks
together with the import's progress row, so that:

- importing the same file twice counts nothing twice (the file is known by a hash of its first
  line, and the import resumes from the byte offset stored after the last committed chunk);
- a file that was appended to imports only the new lines;
- a rotated file (a different first line) is a new source, even under the same name, and a
  renamed file (``access.log`` -> ``access.log.1``) is still the same source;
- a crash mid-import never counts twice, because a chunk and its offset commit together.

Squid's native format (``logformat squid``)::

    time elapsed client code/status bytes method URL user hierarchy/peer type

    1732540800.123     45 10.20.3.4 TCP_MISS/200 5123 GET http://example.com/x - HIER_DIRECT/93.184.216.34 text/html
    1732540801.002    310 10.20.3.4 TCP_TUNNEL/200 4410 CONNECT example.com:443 jsmith HIER_DIRECT/93.184.216.34 -
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import sys
import time as _time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path
from operator import attrgetter
from typing import BinaryIO, NamedTuple, Protocol
from urllib.parse import unquote

from filterd.errors import FilterdError
from filterd.verdict import Match, Verdict, What, Who

#: How many bytes of the file's first line identify it (a longer first line is cut here).
HEAD_BYTES = 4096
#: Lines per ``record_batch`` transaction: big enough to be fast, small enough to resume.
CHUNK_LINES = 5000
#: How many skipped lines are kept with their reasons (all of them are counted).
MAX_SKIPS_KEPT = 1000

_METHOD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ_-")
_KNOWN_METHODS = frozenset({"GET", "POST", "CONNECT", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"})


class SquidLineError(ValueError):
    """Why one access.log line cannot be imported (its ``str()`` is the reason)."""


class SquidLine(NamedTuple):
    """The parts of one access.log line that filterd uses (no sizes, no peer: not needed).

    A NamedTuple rather than a frozen dataclass: it is made once per log line, and building
    a tuple costs a fraction of a frozen dataclass's ``__init__``.
    """

    time: float  # unix seconds, as Squid wrote them
    client: str  # the client's IP address
    code: str  # Squid result code, e.g. TCP_MISS, TCP_DENIED, TCP_TUNNEL
    status: int  # HTTP status sent to the client (0 when none)
    method: str
    url: str  # a full URL, or ``host:port`` for CONNECT
    user: str | None  # None when Squid wrote "-"
    host_only: bool  # True for CONNECT: only the host is known


_ip_cache: dict[str, str] = {}


def _client_ip(raw: str) -> str:
    """The client address in canonical form; cached because a log has few distinct clients."""
    ip = _ip_cache.get(raw)
    if ip is None:
        try:
            ip = str(ipaddress.ip_address(raw.split("%", 1)[0]))
        except ValueError:
            raise SquidLineError(f"client is not an IP address: {raw[:60]!r}") from None
        if len(_ip_cache) > 65536:
            _ip_cache.clear()
        _ip_cache[raw] = ip
    return ip


_code_cache: dict[str, tuple[str, int]] = {}
_new_line = tuple.__new__
_INF = math.inf


def _code_status(raw: str) -> tuple[str, int]:
    """``TCP_MISS/200`` -> ("TCP_MISS", 200); cached: a log has a few dozen distinct ones."""
    code, sep, status_raw = raw.partition("/")
    if not sep or not code:
        raise SquidLineError(f"result code is not CODE/STATUS: {raw[:60]!r}")
    if not status_raw.isdigit() or not status_raw.isascii():
        raise SquidLineError(f"HTTP status is not a number: {raw[:60]!r}")
    if len(_code_cache) > 4096:
        _code_cache.clear()
    found = _code_cache[raw] = (code, int(status_raw))
    return found


def parse_line(line: str) -> SquidLine:
    """Parse one native-format line; raise :class:`SquidLineError` naming what is wrong.

    Pure, so that every odd line a real Squid writes can be a parametrised test case.
    Fields after the tenth (``log_mime_hdrs``) are ignored; the user name is %-decoded the
    way Squid encodes it (``SCHOOL%5Cjsmith`` -> ``SCHOOL\\jsmith``).
    """
    parts = line.split(None, 10)
    if len(parts) < 10:
        raise SquidLineError(f"expected 10 fields, found {len(parts)}" if parts else "empty line")
    t_raw = parts[0]
    try:
        t = float(t_raw)
    except ValueError:
        raise SquidLineError(f"time is not a number: {t_raw[:40]!r}") from None
    if not 0 < t < _INF:  # also false for NaN
        raise SquidLineError(f"time out of range: {t_raw[:40]!r}")
    client = parts[2]
    client = _ip_cache.get(client) or _client_ip(client)
    code_status = parts[3]
    code, status = _code_cache.get(code_status) or _code_status(code_status)
    method = parts[5]
    if method not in _KNOWN_METHODS and (not method[0].isalpha() or not set(method) <= _METHOD_CHARS):
        raise SquidLineError(f"no request method: {method[:40]!r}")
    url = parts[6]
    host_only = method == "CONNECT"
    if host_only:
        if "/" in url or url.startswith(":"):
            raise SquidLineError(f"CONNECT target is not host:port: {url[:200]!r}")
    elif "://" not in url:
        raise SquidLineError(f"no URL: {url[:200]!r}")
    user = parts[7]
    if user == "-":
        user = None
    elif "%" in user:
        user = unquote(user)
    # tuple.__new__ rather than SquidLine(...): the same tuple without a Python-level __new__
    return _new_line(SquidLine, (t, client, code, status, method, url, user, host_only))


class ImportStore(Protocol):
    """What the importer needs of :class:`filterd.record.Store`."""

    def import_offset(self, source: str) -> int: ...

    def record_batch(self, verdicts: Iterable[Verdict], *, source: str = "import",
                     import_source: str | None = None, import_path: str | None = None,
                     import_offset: int | None = None, import_lines: int | None = None,
                     alert_after: datetime | None = None) -> None: ...


#: The pipeline's ``request`` (``filterd.pipeline.Pipeline.request``).
RequestFn = Callable[..., Verdict]


@dataclass(slots=True)
class ImportStats:
    """What one import run did; ``skips`` holds the first MAX_SKIPS_KEPT (line, reason)."""

    source: str  # the file's identity: "squid:" + hash of its first line
    path: str
    start_offset: int  # where this run started (0 = the whole file)
    start_line: int  # lines of the file already imported before this run
    lines: int = 0  # lines read in this run
    imported: int = 0
    skipped: int = 0
    skips: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0
    end_offset: int = 0

    @property
    def lines_per_second(self) -> float:
        """Throughput of this run (0 when nothing was read)."""
        return self.lines / self.seconds if self.seconds > 0 else 0.0

    def summary(self, max_skips: int = 10) -> str:
        """A few lines for the terminal: counts, throughput, and the first skipped lines."""
        out = [f"{self.path}: {self.lines} lines read, {self.imported} imported, "
               f"{self.skipped} skipped in {self.seconds:.1f} s ({self.lines_per_second:,.0f} lines/s)"]
        if self.start_offset:
            out.append(f"  resumed after line {self.start_line} (byte {self.start_offset}): "
                       "the earlier lines were imported before")
        for line_no, reason in self.skips[:max_skips]:
            out.append(f"  {self.path}:{line_no}: skipped: {reason}")
        if self.skipped > max_skips:
            out.append(f"  ... and {self.skipped - max_skips} more skipped lines")
        return "\n".join(out)


def file_source(path: Path) -> str:
    """The file's identity: a hash of its first line (at most HEAD_BYTES), not of its name.

    The name is left out on purpose: logrotate renames ``access.log`` to ``access.log.1``, and
    importing the renamed file must not count it again. A new file (rotated, different first
    line) gets a new identity even under the old name.
    """
    with path.open("rb") as fh:
        head = fh.read(HEAD_BYTES)
    newline = head.find(b"\n")
    if newline >= 0:
        head = head[: newline + 1]
    return "squid:" + hashlib.sha256(head).hexdigest()[:32]


def _count_lines(path: Path, upto: int) -> int:
    """Newlines in the first ``upto`` bytes, so resumed runs still report true line numbers."""
    count = 0
    with path.open("rb") as fh:
        left = upto
        while left > 0:
            block = fh.read(min(left, 1 << 20))
            if not block:
                break
            count += block.count(b"\n")
            left -= len(block)
    return count


class _Progress:
    """A one-line ``\\r`` progress counter on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool, total_bytes: int) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.total = max(total_bytes, 1)
        self.last = 0.0

    def update(self, offset: int, lines: int, started: float, force: bool = False) -> None:
        if not self.enabled:
            return
        now = _time.monotonic()
        if not force and now - self.last < 0.25:
            return
        self.last = now
        rate = lines / max(now - started, 1e-9)
        sys.stderr.write(f"\rimporting: {100 * offset / self.total:5.1f}%  {lines:,} lines  "
                         f"{rate:,.0f} lines/s ")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


# --- deciding lines (shared by the single-process path and the worker processes) ----------------

#: A file at least this big (bytes still to import) is decided by worker processes when the
#: caller gives a ``pipeline_factory`` (about 20,000 lines: smaller ones finish before the
#: workers would have started).
PARALLEL_MIN_BYTES = 2_000_000
#: How many chunks may be out at the workers at once, per worker (bounds memory on big files).
_IN_FLIGHT_PER_WORKER = 3
#: Whether the importing process decides chunks itself while every worker is busy (and while
#: the workers start, which takes a few tenths of a second) rather than wait.
_PARENT_HELPS = True


def _lines_of(data: bytes) -> tuple[list[str], list[int]]:
    """The chunk's lines as text (without their newlines) and the indexes of non-UTF-8 lines.

    One ``decode`` for the whole chunk: a UTF-8 newline byte is never part of another
    character, so splitting the text on "\\n" gives the same lines as splitting the bytes.
    A line that is not UTF-8 comes back as "" and is listed in the second value.
    """
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        lines, bad = [], []
        for i, raw in enumerate(data.split(b"\n")):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                lines.append("")
                bad.append(i)
        lines.pop()  # after the last newline
        return lines, bad
    lines.pop()
    return lines, []


def _decide(data: bytes, request: RequestFn, tz: tzinfo, keep: Callable[[Verdict], object],
            skips: list[tuple[int, str]], max_skips: int) -> tuple[int, int, int, list[Verdict]]:
    """Parse and judge every line of ``data`` (whole lines, each ending in a newline).

    Returns (lines, imported, skipped, the verdicts for which ``keep`` is true, in line
    order); the first ``max_skips`` skips are appended to ``skips`` as (line index from 1
    within the chunk, reason). An exception from ``request`` other than ValueError propagates.
    """
    lines, bad = _lines_of(data)
    bad_set = frozenset(bad)
    kept: list[Verdict] = []
    append = kept.append
    keep_all = keep is _keep_all
    parse = parse_line
    fromtimestamp = datetime.fromtimestamp
    skipped = 0
    imported = 0
    n = 0
    for text in lines:
        n += 1
        try:
            if bad_set and n - 1 in bad_set:
                raise SquidLineError("not UTF-8 text")
            rec = parse(text)
            verdict = request(rec[5], ip=rec[1], user=rec[6], at=fromtimestamp(rec[0], tz),
                              method=rec[4], host_only=rec[7])
        except SquidLineError as exc:
            reason = str(exc)
        except ValueError as exc:
            reason = f"bad URL: {exc}"[:300]
        else:
            imported += 1
            if keep_all or keep(verdict):
                append(verdict)
            continue
        skipped += 1
        if len(skips) < max_skips:
            skips.append((n, reason))
    return n, imported, skipped, kept


def _cpus() -> int:
    """The CPUs this process may run on (its affinity, not every CPU of the machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _keep_all(verdict: Verdict) -> bool:
    return True


def _keeper(store: object) -> Callable[[Verdict], object]:
    """Which verdicts can change what ``store.record_batch`` writes.

    ``Store.record_batch`` counts every incident, and every other request unless it is an
    allowed one with no category and the store does not record allowed requests; the
    parallel path leaves those out of what the workers send back (they are most of a log).
    A store without ``record_allowed`` gets everything.
    """
    return _keep_all if getattr(store, "record_allowed", True) is not False else _keep_recorded


def _keep_recorded(v: Verdict) -> object:
    return v.action != "allow" or v.what.categories or v.is_incident


# --- the verdicts' trip from a worker to the importing process ----------------------------------
# A Verdict is pickled field by field through Python code (frozen slots dataclasses): ~70 us
# a verdict there and back. As plain tuples it is a few microseconds.

_VERDICT_FIELDS = tuple(f.name for f in dataclass_fields(Verdict))
_WHO_FIELDS = tuple(f.name for f in dataclass_fields(Who))
_MATCH_FIELDS = tuple(f.name for f in dataclass_fields(Match))
_REST = tuple(n for n in _VERDICT_FIELDS if n not in ("time", "who", "what"))
assert _VERDICT_FIELDS[:3] == ("time", "who", "what"), _VERDICT_FIELDS
assert tuple(f.name for f in dataclass_fields(What)) == ("host", "url", "categories", "matches")
_get_rest = attrgetter(*_REST)
_get_who = attrgetter(*_WHO_FIELDS)
_get_match = attrgetter(*_MATCH_FIELDS)


def _pack(v: Verdict) -> tuple:
    w = v.what
    matches = tuple(map(_get_match, w.matches)) if w.matches else ()
    return (v.time, _get_who(v.who), (w.host, w.url, w.categories, matches), *_get_rest(v))


class _Unpacker:
    """Rebuilds verdicts from ``_pack`` tuples; equal Who/What parts share one object."""

    def __init__(self) -> None:
        self._who: dict[tuple, Who] = {}

    def __call__(self, packed: tuple) -> Verdict:
        t, who_t, (host, url, categories, matches), *rest = packed
        who = self._who.get(who_t)
        if who is None:
            if len(self._who) >= 65536:
                self._who.clear()
            who = self._who[who_t] = Who(*who_t)
        what = What(host, url, categories, tuple(Match(*m) for m in matches) if matches else ())
        return Verdict(t, who, what, *rest)


_worker_state: dict[str, object] = {}


def _worker_init(factory: Callable[[], RequestFn], tz: tzinfo, record_allowed: bool) -> None:
    """In each worker process: build the pipeline once.

    An error is kept and raised by the first chunk, so that the importer reports it as it
    is (a failing initializer would only break the pool, with no reason given).
    """
    try:
        _worker_state["request"] = factory()
    except BaseException as exc:  # noqa: BLE001 - re-raised in _worker_decide
        _worker_state["error"] = exc
    _worker_state["tz"] = tz
    _worker_state["keep"] = _keep_all if record_allowed else _keep_recorded


def _worker_decide(data: bytes) -> tuple[int, int, int, list[tuple[int, str]], list[tuple]]:
    """In a worker: one chunk's (lines, imported, skipped, first skips, packed verdicts)."""
    error = _worker_state.get("error")
    if error is not None:
        raise error  # type: ignore[misc]
    skips: list[tuple[int, str]] = []
    n, imported, skipped, kept = _decide(data, _worker_state["request"], _worker_state["tz"],  # type: ignore[arg-type]
                                         _worker_state["keep"], skips, MAX_SKIPS_KEPT)  # type: ignore[arg-type]
    return n, imported, skipped, skips, [_pack(v) for v in kept]


@dataclass(frozen=True)
class ConfigPipeline:
    """A ``pipeline_factory`` for worker processes: the pipeline ``filterd`` builds from a config.

    Picklable (it travels to the workers by name and path), and built the way the CLI builds
    its own: ``pipeline.build`` with the DHCP leases the store holds, unless ``leases`` is False.
    """

    config_path: str | None = None
    leases: bool = True

    def __call__(self) -> RequestFn:
        from filterd import config as config_mod
        from filterd import identify, pipeline

        cfg = config_mod.load(self.config_path)
        table = identify.LeaseTable()
        built = pipeline.build(cfg, leases=table)
        db = cfg.data_path("storage", "path")
        if self.leases and db.exists():
            from filterd.record import Store  # only here: sqlite_utils takes 0.15 s to import

            table.replace(identify.Lease(mac=r["mac"], ip=r["ip"], hostname=r["hostname"],
                                         user=r["user"], start=r["start"], expires=r["expires"])
                          for r in Store(db).leases())
        return built.request


def _chunks(fh: BinaryIO, chunk_lines: int, block: int = 1 << 22) -> Iterator[tuple[bytes, int]]:
    """Whole lines from ``fh`` in chunks of ``chunk_lines`` (fewer in the last): (data, lines).

    A last line without its newline (Squid still writing) is not returned.
    """
    buf = b""
    start = 0  # where the current chunk starts in buf
    pos = -1  # its last newline found so far
    n = 0  # and how many lines it has
    eof = False
    while True:
        nxt = buf.find(b"\n", pos + 1)
        if nxt >= 0:
            pos = nxt
            n += 1
            if n == chunk_lines:
                yield buf[start:pos + 1], n
                start, n = pos + 1, 0
            continue
        if eof:
            if n:
                yield buf[start:pos + 1], n
            return
        more = fh.read(block)
        if not more:
            eof = True
            continue
        buf = buf[start:] + more
        pos -= start
        start = 0


def import_log(
    path: Path,
    request: RequestFn,
    store: ImportStore,
    *,
    progress: bool = False,
    tz: tzinfo,
    chunk_lines: int = CHUNK_LINES,
    alert_window: timedelta = timedelta(hours=1),
    pipeline_factory: Callable[[], RequestFn] | None = None,
    workers: int | None = None,
) -> ImportStats:
    """Replay every new line of ``path`` through ``request`` and record the verdicts.

    Incidents older than ``alert_window`` are recorded (alert flag and all) but queue no
    mail to ICT: backfilling last term must not flood them, tailing a live log still alerts.

    ``request`` is ``Pipeline.request`` (called with the URL, or ``host:port`` and
    ``host_only=True`` for CONNECT, and ``ip=``, ``user=``, ``at=``, ``method=``); a
    ``ValueError`` from it (a URL the parser refuses) skips that line. Verdicts and the new
    byte offset are committed together every ``chunk_lines`` lines. Only complete lines are
    read: a last line without its newline (Squid still writing) waits for the next import.

    With ``pipeline_factory`` (a picklable callable returning a ``request`` equivalent to the
    one given, e.g. :class:`ConfigPipeline`), a big file (``PARALLEL_MIN_BYTES`` still to
    read) is decided by ``workers`` processes (default: one per CPU), each building its own
    pipeline once; this process keeps reading, numbering and committing in file order, so
    counts, line numbers, offsets and crash safety are those of the one-process path.
    ``workers`` given explicitly (>= 2) uses the workers whatever the size; 1 never does.
    """
    path = Path(path)
    started = _time.monotonic()
    alert_after = datetime.now(timezone.utc) - alert_window
    try:
        size = path.stat().st_size
        source = file_source(path)
    except OSError as exc:
        raise FilterdError(f"cannot read the log: {exc.strerror or exc}", file=path) from None
    offset = store.import_offset(source)
    if offset > size:
        raise FilterdError(f"the file is shorter ({size} bytes) than what was imported from it "
                           f"before ({offset} bytes); was it truncated in place?", file=path)
    start_line = _count_lines(path, offset) if offset else 0
    stats = ImportStats(source=source, path=str(path), start_offset=offset,
                        start_line=start_line, end_offset=offset)
    bar = _Progress(progress, size)
    resolved = str(path.resolve())
    chunk_lines = max(1, chunk_lines)
    if workers is None:
        workers = _cpus() if size - offset >= PARALLEL_MIN_BYTES else 1
    parallel = pipeline_factory is not None and workers >= 2

    line_no = start_line
    pos = offset
    kept = stats.skips

    def commit(verdicts: Iterable[Verdict], data: bytes, n: int, imported: int, skipped: int,
               skips: list[tuple[int, str]]) -> None:
        nonlocal line_no, pos
        for i, reason in skips:
            if len(kept) >= MAX_SKIPS_KEPT:
                break
            kept.append((line_no + i, reason))
        line_no += n
        pos += len(data)
        store.record_batch(verdicts, source="import", import_source=source,
                           import_path=resolved, import_offset=pos,
                           import_lines=line_no, alert_after=alert_after)
        stats.lines += n
        stats.imported += imported
        stats.skipped += skipped
        stats.end_offset = pos
        bar.update(pos, stats.lines, started)

    with path.open("rb") as fh:
        fh.seek(offset)
        chunks = _chunks(fh, chunk_lines)
        if parallel:
            _import_parallel(chunks, commit, pipeline_factory, request, tz,  # type: ignore[arg-type]
                             workers, _keeper(store), MAX_SKIPS_KEPT)
        else:
            for data, _n in chunks:
                skips: list[tuple[int, str]] = []
                n, imported, skipped, verdicts = _decide(data, request, tz, _keep_all, skips,
                                                         MAX_SKIPS_KEPT - len(kept))
                commit(verdicts, data, n, imported, skipped, skips)
    bar.update(pos, stats.lines, started, force=True)
    bar.done()
    stats.seconds = _time.monotonic() - started
    return stats


def _import_parallel(chunks: Iterator[tuple[bytes, int]], commit: Callable[..., None],
                     factory: Callable[[], RequestFn], request: RequestFn, tz: tzinfo,
                     workers: int, keep: Callable[[Verdict], object], max_skips: int) -> None:
    """Hand chunks to ``workers`` processes and commit their results in file order.

    While every worker is busy (and while they start: building a pipeline takes a few tenths
    of a second), this process decides the next chunk itself with ``request`` rather than wait.
    """
    import concurrent.futures
    import multiprocessing

    # forkserver: the workers do not inherit this process's threads (the store's writer)
    # or its open database connections, and start faster than with spawn.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # imported once by the fork server rather than by every worker (when it starts here)
        ctx.set_forkserver_preload(["__main__", "filterd.squidlog", "filterd.pipeline",
                                    "filterd.config"])
    else:
        ctx = multiprocessing.get_context("spawn")
    unpack = _Unpacker()
    # in file order: a Future of a worker's packed result, or a result decided here
    pending: deque[tuple[concurrent.futures.Future | None, tuple, bytes]] = deque()
    busy = workers * _IN_FLIGHT_PER_WORKER
    submitted = 0

    def commit_head() -> None:
        nonlocal submitted
        future, local, data = pending.popleft()
        if future is None:
            commit(*local)
            return
        submitted -= 1
        n, imported, skipped, skips, packed = future.result()
        commit(map(unpack, packed), data, n, imported, skipped, skips)

    with concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_worker_init,
            initargs=(factory, tz, keep is _keep_all)) as pool:
        try:
            for data, _n in chunks:
                while pending and (pending[0][0] is None or pending[0][0].done()):
                    commit_head()
                if submitted < busy:
                    pending.append((pool.submit(_worker_decide, data), (), data))
                    submitted += 1
                elif _PARENT_HELPS and len(pending) < 2 * busy:
                    skips: list[tuple[int, str]] = []
                    try:
                        n, imported, skipped, verdicts = _decide(data, request, tz, keep, skips,
                                                                 max_skips)
                    except BaseException:
                        while pending:  # the chunks before this one are committed first
                            commit_head()
                        raise
                    pending.append((None, (verdicts, data, n, imported, skipped, skips), data))
                else:
                    commit_head()
                    pending.append((pool.submit(_worker_decide, data), (), data))
                    submitted += 1
            while pending:
                commit_head()
        except BaseException:
            for future, _, _ in pending:
                if future is not None:
                    future.cancel()
            raise
