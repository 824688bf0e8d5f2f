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
import sys
import time as _time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import NamedTuple, Protocol
from urllib.parse import unquote

from filterd.errors import FilterdError
from filterd.verdict import Verdict

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


def parse_line(line: str) -> SquidLine:
    """Parse one native-format line; raise :class:`SquidLineError` naming what is wrong.

    Pure, so that every odd line a real Squid writes can be a parametrised test case.
    Fields after the tenth (``log_mime_hdrs``) are ignored; the user name is %-decoded the
    way Squid encodes it (``SCHOOL%5Cjsmith`` -> ``SCHOOL\\jsmith``).
    """
    parts = line.split(None, 10)
    if not parts:
        raise SquidLineError("empty line")
    if len(parts) < 10:
        raise SquidLineError(f"expected 10 fields, found {len(parts)}")
    t_raw, _elapsed, client, code_status, _size, method, url, user = parts[:8]
    try:
        t = float(t_raw)
    except ValueError:
        raise SquidLineError(f"time is not a number: {t_raw[:40]!r}") from None
    if not math.isfinite(t) or t <= 0:
        raise SquidLineError(f"time out of range: {t_raw[:40]!r}")
    client = _client_ip(client)
    code, sep, status_raw = code_status.partition("/")
    if not sep or not code:
        raise SquidLineError(f"result code is not CODE/STATUS: {code_status[:60]!r}")
    if not status_raw.isdigit() or not status_raw.isascii():
        raise SquidLineError(f"HTTP status is not a number: {code_status[:60]!r}")
    if method not in _KNOWN_METHODS and (not method[0].isalpha() or not set(method) <= _METHOD_CHARS):
        raise SquidLineError(f"no request method: {method[:40]!r}")
    host_only = method == "CONNECT"
    if host_only:
        if "/" in url or not url or url.startswith(":"):
            raise SquidLineError(f"CONNECT target is not host:port: {url[:200]!r}")
    elif "://" not in url:
        raise SquidLineError(f"no URL: {url[:200]!r}")
    return SquidLine(
        time=t,
        client=client,
        code=code,
        status=int(status_raw),
        method=method,
        url=url,
        user=None if user == "-" else (unquote(user) if "%" in user else user),
        host_only=host_only,
    )


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


def import_log(
    path: Path,
    request: RequestFn,
    store: ImportStore,
    *,
    progress: bool = False,
    tz: tzinfo,
    chunk_lines: int = CHUNK_LINES,
    alert_window: timedelta = timedelta(hours=1),
) -> ImportStats:
    """Replay every new line of ``path`` through ``request`` and record the verdicts.

    Incidents older than ``alert_window`` are recorded (alert flag and all) but queue no
    mail to ICT: backfilling last term must not flood them, tailing a live log still alerts.

    ``request`` is ``Pipeline.request`` (called with the URL, or ``host:port`` and
    ``host_only=True`` for CONNECT, and ``ip=``, ``user=``, ``at=``, ``method=``); a
    ``ValueError`` from it (a URL the parser refuses) skips that line. Verdicts and the new
    byte offset are committed together every ``chunk_lines`` lines. Only complete lines are
    read: a last line without its newline (Squid still writing) waits for the next import.
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
    line_no = start_line
    pos = offset
    batch: list[Verdict] = []
    pending_lines = 0
    kept = stats.skips

    def skip(reason: str) -> None:
        stats.skipped += 1
        if len(kept) < MAX_SKIPS_KEPT:
            kept.append((line_no, reason))

    def commit() -> None:
        store.record_batch(batch, source="import", import_source=source,
                           import_path=str(path.resolve()), import_offset=pos,
                           import_lines=line_no, alert_after=alert_after)
        stats.end_offset = pos
        batch.clear()

    with path.open("rb") as fh:
        fh.seek(offset)
        for raw in fh:
            if not raw.endswith(b"\n"):
                break  # an unfinished last line: the next import picks it up
            pos += len(raw)
            line_no += 1
            stats.lines += 1
            pending_lines += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                skip("not UTF-8 text")
            else:
                try:
                    rec = parse_line(text)
                except SquidLineError as exc:
                    skip(str(exc))
                else:
                    try:
                        verdict = request(
                            rec.url,
                            ip=rec.client,
                            user=rec.user,
                            at=datetime.fromtimestamp(rec.time, tz),
                            method=rec.method,
                            host_only=rec.host_only,
                        )
                    except ValueError as exc:
                        skip(f"bad URL: {exc}"[:300])
                    else:
                        batch.append(verdict)
                        stats.imported += 1
            if pending_lines >= chunk_lines:
                commit()
                pending_lines = 0
                bar.update(pos, stats.lines, started)
    if pending_lines or batch:
        commit()
    bar.update(pos, stats.lines, started, force=True)
    bar.done()
    stats.seconds = _time.monotonic() - started
    return stats
