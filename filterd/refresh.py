"""Refreshing a block list from its source: fetched, validated, then swapped in atomically.

The rule that matters: **a bad or failed download never replaces a good list.** The new
content is written to a temporary file in the destination's own folder (same file system, so
the final ``os.replace`` is atomic), checked by the caller's loader (``validate`` raises on a
list it cannot use), and only then renamed over the old one. A reader (the daemon's reload)
sees either the whole old file or the whole new one.

Sources: an ``http(s)://`` URL (urllib, in the calling thread -- the scheduler's worker, never
the event loop; ``ETag``/``Last-Modified`` are remembered in a small side file so an unchanged
list costs one 304), a ``file://`` URL or a plain path. A squidGuard tarball (UT1's
``blacklists.tar.gz``) can be narrowed to one category folder with ``category=``; members are
extracted by name only (no absolute paths, no ``..``, no links), so a hostile tarball cannot
write outside the destination.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from filterd.errors import FilterdError

log = logging.getLogger("filterd.refresh")

#: Larger than any real list (UT1 whole: ~25 MB compressed, ~200 MB unpacked).
MAX_BYTES = 512 * 1024 * 1024
#: The files of a squidGuard category folder that filterd reads.
CATEGORY_FILES = ("domains", "urls")
USER_AGENT = "filterd-list-refresh"


class RefreshError(FilterdError):
    """A refresh failed; the old list is untouched."""


def _is_url(source: str) -> bool:
    return urllib.parse.urlsplit(source).scheme in ("http", "https", "file")


def _meta_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.http.json"


def _read_meta(dest: Path) -> dict[str, str]:
    try:
        data = json.loads(_meta_path(dest).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: str(v) for k, v in data.items() if k in ("source", "etag", "last_modified")}


def _write_meta(dest: Path, meta: dict[str, str]) -> None:
    path = _meta_path(dest)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta), encoding="utf-8")
    os.replace(tmp, path)


def _copy_limited(src: BinaryIO, dst: BinaryIO, max_bytes: int, source: str) -> str:
    """Copy at most ``max_bytes``; returns the sha256 hex digest of what was copied."""
    digest = hashlib.sha256()
    total = 0
    while chunk := src.read(1 << 16):
        total += len(chunk)
        if total > max_bytes:
            raise RefreshError(f"larger than {max_bytes} bytes; refusing it", file=source)
        digest.update(chunk)
        dst.write(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 16):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _fetch(source: str, out: BinaryIO, *, dest: Path, timeout: float, max_bytes: int
           ) -> tuple[str | None, dict[str, str]]:
    """Download ``source`` into ``out``. Returns (sha256 or None for "not modified", new meta)."""
    if not _is_url(source):
        try:
            with open(source, "rb") as f:
                return _copy_limited(f, out, max_bytes, source), {}
        except OSError as exc:
            raise RefreshError(f"cannot read: {exc.strerror}", file=source) from None
    scheme = urllib.parse.urlsplit(source).scheme
    request = urllib.request.Request(source, headers={"User-Agent": USER_AGENT})
    meta = _read_meta(dest) if dest.exists() else {}
    if scheme != "file" and meta.get("source") == source:
        if meta.get("etag"):
            request.add_header("If-None-Match", meta["etag"])
        if meta.get("last_modified"):
            request.add_header("If-Modified-Since", meta["last_modified"])
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise RefreshError(f"larger than {max_bytes} bytes ({length}); refusing it", file=source)
            digest = _copy_limited(response, out, max_bytes, source)
            new_meta = {"source": source}
            if response.headers.get("ETag"):
                new_meta["etag"] = response.headers["ETag"]
            if response.headers.get("Last-Modified"):
                new_meta["last_modified"] = response.headers["Last-Modified"]
            return digest, new_meta
    except urllib.error.HTTPError as exc:
        if exc.code == 304:
            return None, meta
        raise RefreshError(f"HTTP {exc.code} {exc.reason}", file=source) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RefreshError(f"download failed: {reason}", file=source) from None


def refresh_list(
    source: str,
    dest: Path,
    validate: Callable[[Path], None],
    *,
    timeout: float = 60,
    max_bytes: int = MAX_BYTES,
    category: str | None = None,
) -> bool:
    """Fetch ``source`` into ``dest`` if it is good and new; True when ``dest`` changed.

    ``validate(path)`` gets the candidate (a file, or with ``category`` a folder) and raises
    on a list it cannot use; the exception is re-raised as :class:`RefreshError` (a
    FilterdError) and ``dest`` is left as it was. With ``category``, ``source`` is a
    squidGuard tarball and ``dest`` becomes that category's folder (``domains``, ``urls``).
    Blocking: run it in a worker thread.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest, meta = _fetch(source, out, dest=dest, timeout=timeout, max_bytes=max_bytes)
            out.flush()
            os.fsync(out.fileno())
        if digest is None:
            log.info("%s: not modified", source)
            return False
        if category is not None:
            return _install_category(source, tmp, dest, category, validate, meta)
        if digest == _sha256(dest):
            log.info("%s: unchanged", source)
            if meta:
                _write_meta(dest, meta)
            return False
        _validate(validate, tmp, source)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        if meta:
            _write_meta(dest, meta)
        log.info("%s: new list installed at %s", source, dest)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _validate(validate: Callable[[Path], None], candidate: Path, source: str) -> None:
    try:
        validate(candidate)
    except FilterdError as exc:
        raise RefreshError(f"rejected, keeping the old list: {exc}", file=source) from exc
    except Exception as exc:
        raise RefreshError(f"rejected, keeping the old list: {type(exc).__name__}: {exc}",
                           file=source) from exc


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a power cut must not bring the old name back)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# squidGuard tarballs


def extract_category(tarball: Path, category: str, into: Path, *, max_bytes: int = MAX_BYTES) -> list[str]:
    """Extract ``<any>/<category>/{domains,urls}`` from ``tarball`` into the folder ``into``.

    Only regular files with exactly those names are read, by content (never by extracting
    the member's path); members with absolute names or ``..``, symlinks and devices are
    ignored. Returns
    the file names written; RefreshError when the category is not in the tarball.
    """
    if not category or "/" in category or category in (".", ".."):
        raise RefreshError(f"bad category name {category!r}", field="lists.category")
    written: list[str] = []
    total = 0
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                parts = PurePosixPath(member.name).parts
                if member.name.startswith("/") or ".." in parts:
                    continue  # a hostile name: not even its content is trusted
                if len(parts) < 2 or parts[-2] != category or parts[-1] not in CATEGORY_FILES:
                    continue
                if parts[-1] in written:
                    continue
                total += member.size
                if total > max_bytes:
                    raise RefreshError(f"category {category} is larger than {max_bytes} bytes",
                                       file=str(tarball))
                src = tar.extractfile(member)
                if src is None:
                    continue
                with src, open(into / parts[-1], "wb") as out:
                    shutil.copyfileobj(src, out)
                written.append(parts[-1])
    except (tarfile.TarError, EOFError, OSError, io.UnsupportedOperation) as exc:
        raise RefreshError(f"not a readable tarball: {exc}", file=str(tarball)) from None
    if not written:
        raise RefreshError(f"no category {category!r} (domains/urls) in the tarball", file=str(tarball))
    return sorted(written)


def _install_category(source: str, tarball: Path, dest: Path, category: str,
                      validate: Callable[[Path], None], meta: dict[str, str]) -> bool:
    """Unpack one category next to ``dest``, validate it, then swap the folders.

    Two renames (old aside, new in): a reader may for a moment find no folder, never a
    half-written one; a failure puts the old folder back.
    """
    work = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".new"))
    try:
        extract_category(tarball, category, work)
        if dest.is_dir() and _same_tree(work, dest):
            if meta:
                _write_meta(dest, meta)
            return False
        _validate(validate, work, source)
        old = dest.parent / f".{dest.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            os.replace(dest, old)
        try:
            os.replace(work, dest)
        except OSError:
            if old.exists():
                os.replace(old, dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(dest.parent)
        if meta:
            _write_meta(dest, meta)
        return True
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _same_tree(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir() if p.name in CATEGORY_FILES):
        return False
    return all(_sha256(a / n) == _sha256(b / n) for n in names)
