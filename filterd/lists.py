"""Loaders for the block-list formats schools get: squidGuard folders, hosts, domains, urls.

A loader turns a list into canonical entries (filterd.urls) and never stops at a bad line:
the line is skipped, counted and reported as a ``Skip`` with its file and line number, so
ICT can see what a list contained that filterd could not use.

Counting, so that "entries + skipped" can be checked against a file: a *content line* is a
line that is not blank and does not start with ``#`` (after leading white space). In
``domains`` and ``urls`` files (and squidGuard folders) every content line is exactly one
entry or one skip. In ``hosts`` files one line may name several hosts: each host name is
one entry or one skip, and the local names of a stock hosts file (``localhost``,
``broadcasthost``, ``ip6-*``, ...) are ignored without counting.

Decisions on the UT1 quirks (../shared/data/README.md):

- a bare IPv4 address in a ``domains`` file is an entry for that address (an IP host);
- a leading dot (``.afshin.ir``) or ``*.`` is dropped: the entry is the domain;
- punycode and underscores are valid host names (browsers accept both);
- ``urls`` lines have no scheme: they are read as ``http://`` + line, then canonicalised;
  ``#...`` in a URL line is a fragment (dropped, a proxy never sees it), not a comment;
- stray regular-expression escapes (``onionimp\\.cgi\\?ticker2\\.gif``): a backslash before
  punctuation is removed, because a list author who escapes ``.`` and ``?`` means the
  character itself; a backslash before a letter or digit (``\\d``, ``\\w``) is a real regular
  expression and the line is skipped;
- squidGuard ``expressions`` / ``very_restrictive_expression`` files: regular expressions are
  not supported (a school list must not be able to make every request slow); each of their
  content lines is reported as a skip; ``usage`` files are catalogue data and ignored;
- a byte-order mark is dropped; a line that is not UTF-8 is skipped (guessing latin-1
  would make names no browser sends);
- a squidGuard category that is an alias file (a file holding the name of a sibling folder,
  as symbolic links become when a mirror is copied without them) is followed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from filterd.errors import FilterdError
from filterd.urls import FAST_NAME, canonical_host_uncached, canonical_url_uncached

__all__ = ["FORMATS", "LOADER_VERSION", "Loaded", "Skip", "UrlEntry", "load", "source_files", "source_digest"]

#: The formats a [[lists]] table may name.
FORMATS = ("squidguard", "hosts", "domains", "urls")
#: Bumped whenever loading rules change, so compiled indexes are rebuilt.
LOADER_VERSION = 1
#: How many Skip records a list keeps (all skips are still counted).
MAX_SKIPS_KEPT = 1000

_SQUIDGUARD_FILES = ("domains", "urls")
_EXPRESSION_FILES = ("expressions", "very_restrictive_expression")
_LOCAL_NAMES = frozenset({
    "localhost", "localhost.localdomain", "local", "broadcasthost", "localhost4",
    "localhost4.localdomain4", "localhost6", "localhost6.localdomain6", "ip6-localhost",
    "ip6-loopback", "ip6-localnet", "ip6-mcastprefix", "ip6-allnodes", "ip6-allrouters",
    "ip6-allhosts", "0.0.0.0",
})
_ESCAPE = re.compile(r"\\([^A-Za-z0-9])")
_BOM = "\ufeff"


@dataclass(frozen=True, slots=True)
class Skip:
    """A line (or host name) that was not loaded, and why."""

    file: str
    line: int
    reason: str
    text: str


@dataclass(frozen=True, slots=True)
class UrlEntry:
    """A URL entry: host (and its subdomains), path prefix, required query pairs."""

    host: str
    path: str
    query: tuple[tuple[str, str], ...]
    text: str


@dataclass(slots=True)
class Loaded:
    """What one list gave: domain entries (host, text-as-written or None when the same),
    URL entries, and the counts."""

    domains: list[tuple[str, str | None]] = field(default_factory=list)
    urls: list[UrlEntry] = field(default_factory=list)
    entries: int = 0
    skipped: int = 0
    skips: list[Skip] = field(default_factory=list)

    def skip(self, file: Path, line: int, reason: str, text: str) -> None:
        self.skipped += 1
        if len(self.skips) < MAX_SKIPS_KEPT:
            self.skips.append(Skip(str(file), line, reason, text[:200]))


def _category_folder(path: Path) -> Path:
    """The folder of a squidGuard category, following an alias file."""
    if path.is_dir():
        return path
    if not path.exists():
        raise FilterdError("list folder not found", file=path)
    if path.is_file() and path.stat().st_size < 256:
        target = path.read_text("utf-8", "replace").strip()
        if target and "/" not in target and (path.parent / target).is_dir():
            return path.parent / target
    raise FilterdError("not a squidGuard category folder (expected domains and urls files)", file=path)


def source_files(path: Path, fmt: str) -> list[tuple[str, Path]]:
    """The files a list is read from, each with the role it plays (domains, urls, ...)."""
    if fmt not in FORMATS:
        raise FilterdError(f"unknown list format {fmt!r} (one of {', '.join(FORMATS)})", file=path)
    if fmt != "squidguard":
        if not path.is_file():
            raise FilterdError("list file not found" if not path.exists() else "not a file", file=path)
        return [(fmt, path)]
    folder = _category_folder(path)
    files = [(name, folder / name) for name in _SQUIDGUARD_FILES + _EXPRESSION_FILES
             if (folder / name).is_file()]
    if not any(role in _SQUIDGUARD_FILES for role, _ in files):
        raise FilterdError("squidGuard folder has neither a domains nor a urls file", file=path)
    return files


def source_digest(path: Path, fmt: str) -> list[tuple[str, str]]:
    """(role, sha256) of each source file, read in chunks: the index cache key."""
    digests = []
    for role, file in source_files(path, fmt):
        digest = hashlib.sha256()
        try:
            with file.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        except OSError as error:
            raise FilterdError(f"cannot read list: {error.strerror}", file=file) from None
        digests.append((role, digest.hexdigest()))
    return digests


def _lines(file: Path, loaded: Loaded):
    """(line number, stripped text) of each content line; undecodable lines are skipped."""
    try:
        data = file.read_bytes()
    except OSError as error:
        raise FilterdError(f"cannot read list: {error.strerror}", file=file) from None
    raw_rows: list[bytes] = []
    try:
        rows: list[str | None] = list(data.decode("utf-8").split("\n"))
    except UnicodeDecodeError:
        raw_rows = data.split(b"\n")
        rows = []
        for raw in raw_rows:
            try:
                rows.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                rows.append(None)
    for number, row in enumerate(rows, 1):
        if row is None:
            raw = raw_rows[number - 1].strip()
            if raw and not raw.startswith(b"#"):
                loaded.skip(file, number, "not UTF-8", raw.decode("utf-8", "replace"))
            continue
        if number == 1 and row.startswith(_BOM):
            row = row[1:]
        row = row.strip()
        if row and row[0] != "#":
            yield number, row


def _domain(file: Path, number: int, text: str, loaded: Loaded) -> None:
    """One domain or address: an entry or a skip."""
    name = text.split("#", 1)[0].strip() if "#" in text else text
    if name.startswith("*."):
        name = name[2:]
    elif name.startswith("."):
        name = name[1:]
    if not name or " " in name or "\t" in name or "/" in name:
        loaded.skip(file, number, "not a domain name", text)
        return
    try:
        host = canonical_host_uncached(name)
    except ValueError as error:
        loaded.skip(file, number, str(error), text)
        return
    loaded.domains.append((host, None if host == text else text))
    loaded.entries += 1


def _url(file: Path, number: int, text: str, loaded: Loaded) -> None:
    """One scheme-less URL: an entry or a skip."""
    url = text
    if "\\" in url:
        url = _ESCAPE.sub(r"\1", url)
        if "\\" in url:
            loaded.skip(file, number, "regular expression, not a URL", text)
            return
    if any(c.isspace() for c in url):
        loaded.skip(file, number, "white space inside a URL", text)
        return
    try:
        canon = canonical_url_uncached(url)
    except ValueError as error:
        loaded.skip(file, number, str(error), text)
        return
    loaded.urls.append(UrlEntry(canon.host, canon.path, canon.query_pairs, text))
    loaded.entries += 1


def _hosts_line(file: Path, number: int, text: str, loaded: Loaded) -> None:
    """``address host [host...]``: each host name is an entry or a skip."""
    fields = text.split("#", 1)[0].split()
    if len(fields) < 2:
        loaded.skip(file, number, "not a hosts line (address and host name expected)", text)
        return
    try:
        ipaddress.ip_address(fields[0].split("%", 1)[0])
    except ValueError:
        loaded.skip(file, number, "not a hosts line (first field is not an address)", text)
        return
    for name in fields[1:]:
        if name.lower() in _LOCAL_NAMES:
            continue
        _domain(file, number, name, loaded)


def load(path: Path, fmt: str) -> Loaded:
    """Read one list (a file, or a squidGuard folder) into canonical entries.

    Raises FilterdError naming the file when the list is missing or unreadable; bad lines
    never raise, they are reported in ``Loaded.skips``.
    """
    loaded = Loaded()
    for role, file in source_files(path, fmt):
        if role in _EXPRESSION_FILES:
            for number, text in _lines(file, loaded):
                loaded.skip(file, number, "regular expressions are not supported", text)
        elif role == "domains":
            _domains(file, loaded)
        elif role == "urls":
            for number, text in _lines(file, loaded):
                _url(file, number, text, loaded)
        else:
            for number, text in _lines(file, loaded):
                _hosts_line(file, number, text, loaded)
    return loaded


def _domains(file: Path, loaded: Loaded) -> None:
    """A domains file. Most lines are already canonical names: one regex proves it
    (filterd.urls.FAST_NAME, the same test canonical_host uses), the rest take the full path."""
    fast = FAST_NAME.fullmatch
    append = loaded.domains.append
    count = 0
    for number, text in _lines(file, loaded):
        if fast(text) and "xn--" not in text:
            append((text, None))
            count += 1
        else:
            _domain(file, number, text, loaded)
    loaded.entries += count
