"""The compiled index: every list entry in one memory-mapped file, looked up per request.

Why this shape (measured in bench/bench_classify.py):

- a marisa-trie (succinct, memory-mappable) holds every key: 5 million random domains make a
  file of about 70 MB (trie plus a 1-, 2- or 4-byte record id per key), against about 470 MB
  for a Python set of the same names, and a new process maps it in a fraction of a second
  (the time is mostly the sha256 check) instead of parsing lists for seconds; pages are
  shared between processes and only those that lookups touch become resident;
- a domain's key is its canonical name reversed character by character plus a dot
  (``example.com`` -> ``moc.elpmaxe.``): the keys of all entries that cover a host are then
  exactly the trie keys that are prefixes of the host's own key, found in one walk
  (``iter_prefixes_with_ids``), and the dot keeps matches on label boundaries (``badexample.com``
  -> ``moc.elpmaxedab.`` does not start with ``moc.elpmaxe.``);
- a URL entry adds two keys: its host key, flagged "has URL entries", and
  ``<host key> <path>``; a request whose host hits a flagged key looks up
  ``<that key> <request path>`` and keeps the prefixes that end on a segment boundary, then
  checks the entry's query parameters against the request's (a subset, in any order);
- each key id points (uint8, uint16 or uint32 array: the narrowest that fits) at an interned
  record, JSON, listing which lists hold the key and the entry as written when it differs
  from the canonical name. Most keys share the record "list N, written canonically", so
  records stay few.

Speed: a raw trie walk costs a few cache misses, so it is slower than one probe of a Python
set; what the proxy pays is smaller because a per-host cache (32,768 hosts, cleared when
full) answers the hosts a school visits again and again. The benchmark prints both. Measured
choices for the uncached walk: one trie level (``num_tries=1``: a third larger than marisa's
default of 3, walks about 1.5 times faster); a miss (most hosts) costs the walk and little
else; the common hit (one key, in one list, written canonically) is answered inline from a
decoded-record cache large enough for real lists (UT1 has about 24,000 distinct records). A
Bloom-style negative pre-check (a bit array of stable hashes of every host key, tested per
label) was measured slower than the walk it would skip: in Python, finding the labels and
hashing them costs more than marisa's early exit on a miss.

File layout (native byte order, recorded in the metadata): 64-byte header (magic, sha256
of everything after the digest, metadata offset and length), key-id -> record array,
record offsets, record blob, the trie, metadata JSON (the lists' statistics and skips, so a
cached start can still report them); the arrays and the trie start 8-byte aligned. The
digest is checked before the trie is mapped: a damaged file is rejected, never trusted (a
corrupt trie could crash the process).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import sys
import tempfile
from array import array
from collections.abc import Sequence
from pathlib import Path

import marisa_trie

from filterd.lists import Loaded

__all__ = ["INDEX_VERSION", "CorruptIndex", "Index", "compile_index", "write_atomic"]

INDEX_VERSION = 2
_MAGIC = b"FDINDEX\x01"
_HEADER = struct.Struct("<8s32sQQ8x")  # magic, sha256(file[40:]), meta offset, meta length
_TRIES = 1  # marisa levels: 1 is a larger trie than the default 3, but its walks are faster
_RECORD_CACHE = 1 << 16
_REF_TYPES = ("B", "H", "I")  # key id -> record id array: 1, 2 or 4 bytes per key


class CorruptIndex(Exception):
    """A compiled index file that cannot be trusted; the caller rebuilds it."""


def _pad8(data: bytearray) -> None:
    data.extend(b"\0" * (-len(data) % 8))


def compile_index(lists: Sequence[Loaded], meta: dict) -> bytearray:
    """Compile loaded lists (list number = position) into the bytes of an index file."""
    def keys():
        for loaded in lists:
            for host, _text in loaded.domains:
                yield host[::-1] + "."
            for entry in loaded.urls:
                key = entry.host[::-1] + "."
                yield key
                yield f"{key} {entry.path}"

    trie = marisa_trie.Trie(keys(), num_tries=_TRIES)
    count = len(trie)
    key_id = trie.key_id
    # masks[kid]: the lists that hold the key written canonically (bit n = list n); the
    # rare rest (other spellings, URL entries) goes to ``extra``.
    masks = [0] * count
    extra: dict[int, tuple[set, list, list]] = {}

    def more(kid: int) -> tuple[set, list, list]:
        found = extra.get(kid)
        if found is None:
            found = extra[kid] = (set(), [], [])
        return found

    for number, loaded in enumerate(lists):
        bit = 1 << number
        for host, text in loaded.domains:
            kid = key_id(host[::-1] + ".")
            if text is None:
                masks[kid] |= bit
            else:
                more(kid)[0].add((number, text))
        for entry in loaded.urls:
            key = entry.host[::-1] + "."
            more(key_id(key))[1].append(True)
            more(key_id(f"{key} {entry.path}"))[2].append((number, entry.text, entry.query))

    records: dict[tuple, int] = {}
    by_mask: dict[int, int] = {}
    refs = array("I", bytes(4 * count))
    for kid, mask in enumerate(masks):
        if kid not in extra:
            rid = by_mask.get(mask)
            if rid is None:
                domains = tuple((n, None) for n in range(len(lists)) if mask >> n & 1)
                rid = by_mask[mask] = records.setdefault((domains, False, ()), len(records))
        else:
            texts, flags, urls = extra[kid]
            domains = {(n, None) for n in range(len(lists)) if mask >> n & 1} | texts
            rid = records.setdefault(
                (tuple(sorted(domains, key=lambda p: (p[0], p[1] or ""))), bool(flags),
                 tuple(sorted((n, t, tuple(map(tuple, q))) for n, t, q in urls))),
                len(records))
        refs[kid] = rid
    if not records:
        records[((), False, ())] = 0

    blob = bytearray()
    offsets = array("I", [0])
    for domains, flag, urls in records:  # dicts keep insertion order: record id order
        blob += json.dumps([domains, int(flag), urls], separators=(",", ":"),
                           ensure_ascii=False).encode()
        offsets.append(len(blob))

    out = bytearray(_HEADER.size)
    refs_off = len(out)
    # the narrowest record id that fits: most lists have few distinct records (a synthetic
    # list has one, UT1 about 24,000), and the array is a quarter of a big index
    width = next(code for code in _REF_TYPES if len(records) <= 1 << 8 * array(code).itemsize)
    out += array(width, refs).tobytes()
    _pad8(out)
    offsets_off = len(out)
    out += offsets.tobytes()
    blob_off = len(out)
    out += blob
    _pad8(out)
    trie_off = len(out)
    out += trie.tobytes()
    _pad8(out)
    trie_len = len(out) - trie_off
    meta = dict(meta, version=INDEX_VERSION, byteorder=sys.byteorder, keys=count,
                records=len(records), refs=refs_off, ref_type=width, offsets=offsets_off,
                blob=blob_off, trie=trie_off, trie_len=trie_len)
    meta_bytes = json.dumps(meta, ensure_ascii=False).encode()
    meta_off = len(out)
    out += meta_bytes
    struct.pack_into("<QQ", out, 40, meta_off, len(meta_bytes))
    digest = hashlib.sha256(memoryview(out)[40:]).digest()
    _HEADER.pack_into(out, 0, _MAGIC, digest, meta_off, len(meta_bytes))
    return out


def write_atomic(path: Path, data: bytes | bytearray) -> None:
    """Write a file so that readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # other proxy processes map it read-only
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class Index:
    """A compiled index, mapped read-only; lookups never copy it into memory."""

    def __init__(self, buffer, *, host_cache: int = 32768) -> None:
        """Use ``Index.open`` (a file, checked) or ``Index.from_bytes``."""
        view = memoryview(buffer)
        magic, _digest, meta_off, meta_len = _HEADER.unpack_from(view, 0)
        if magic != _MAGIC:
            raise CorruptIndex("not a filterd index")
        try:
            meta = json.loads(bytes(view[meta_off:meta_off + meta_len]))
        except (ValueError, UnicodeDecodeError) as error:
            raise CorruptIndex(f"bad metadata: {error}") from None
        if meta.get("version") != INDEX_VERSION or meta.get("byteorder") != sys.byteorder:
            raise CorruptIndex("index from another filterd version or machine")
        self.meta: dict = meta
        self._buffer = buffer  # keeps the mapping alive as long as the trie uses it
        count = meta["keys"]
        width = meta.get("ref_type")
        if width not in _REF_TYPES:
            raise CorruptIndex("bad record id type")
        self._refs = view[meta["refs"]:meta["refs"] + array(width).itemsize * count].cast(width)
        self._offsets = view[meta["offsets"]:meta["offsets"] + 4 * (meta["records"] + 1)].cast("I")
        self._blob = view[meta["blob"]:meta["blob"] + self._offsets[-1]]
        self._trie = marisa_trie.Trie()
        self._trie.map(view[meta["trie"]:meta["trie"] + meta["trie_len"]])
        if len(self._trie) != count:
            raise CorruptIndex("trie does not match its metadata")
        self._records: dict[int, tuple] = {}
        self._hosts: dict[str, tuple] = {}
        self._host_cache = host_cache

    @classmethod
    def from_bytes(cls, data: bytes | bytearray, **kwargs) -> Index:
        """An index held in memory (no cache folder)."""
        return cls(data, **kwargs)

    @classmethod
    def open(cls, path: Path, **kwargs) -> Index:
        """Map a compiled file after checking its digest; CorruptIndex when it is damaged."""
        try:
            with path.open("rb") as handle:
                header = handle.read(_HEADER.size)
                if len(header) != _HEADER.size or header[:8] != _MAGIC:
                    raise CorruptIndex(f"{path}: not a filterd index")
                digest = hashlib.sha256(header[40:])
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
                if digest.digest() != header[8:40]:
                    raise CorruptIndex(f"{path}: checksum mismatch")
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as error:
            raise CorruptIndex(f"{path}: {error}") from None
        return cls(mapped, **kwargs)

    def __len__(self) -> int:
        return self.meta["keys"]

    def _record(self, rid: int) -> tuple:
        """Record ``rid`` decoded: (lists holding the key as written canonically, (list,
        entry as written) pairs, has URL entries, URL entries, "canonical domain entries only":
        the common case, answered inline by ``lookup``)."""
        record = self._records.get(rid)
        if record is None:
            start, end = self._offsets[rid], self._offsets[rid + 1]
            domains, flag, urls = json.loads(bytes(self._blob[start:end]))
            plain = tuple(number for number, text in domains if text is None)
            texts = tuple((number, text) for number, text in domains if text is not None)
            record = (
                plain, texts, bool(flag),
                tuple((number, text, tuple(map(tuple, query))) for number, text, query in urls),
                bool(plain) and not texts and not flag,
            )
            if len(self._records) >= _RECORD_CACHE:
                self._records.clear()
            self._records[rid] = record
        return record

    def _hits(self, matches: tuple[tuple[str, int], ...]) -> tuple:
        """(domain hits, keys with URL entries) of a host key's matching trie keys."""
        hits: list = []
        url_keys: tuple = ()
        refs = self._refs
        known = self._records.get
        for prefix, kid in matches:
            rid = refs[kid]
            plain, texts, has_urls, _, _ = known(rid) or self._record(rid)
            if plain:
                name = prefix[-2::-1]  # "moc.a." -> "a.com"
                for number in plain:
                    hits.append((number, name))
            if texts:
                hits += texts
            if has_urls:
                url_keys += (prefix,)
        return tuple(hits), url_keys

    def lookup(self, key: str, path: str | None = None,
               query: tuple[tuple[str, str], ...] = ()) -> list[tuple[int, str]] | tuple:
        """(list number, entry as written) of every entry matching a host key (and path).

        ``key`` is ``urls.reversed_key(canonical host)``; without ``path`` only domain
        entries are checked (a CONNECT or SNI decision knows no path).

        The host part is cached per host. One trie walk gives every matching key with its
        id (measured faster than ``prefixes()`` followed by ``key_id()`` for hits, and
        nearly as fast for misses); a miss (most hosts) never leaves this function.
        """
        found = self._hosts.get(key)
        if found is None:
            walk = self._trie.iter_prefixes_with_ids(key)
            for prefix, kid in walk:
                rid = self._refs[kid]
                record = self._records.get(rid) or self._record(rid)
                more = (*walk,)
                if more or not record[4]:
                    found = self._hits(((prefix, kid), *more))
                else:  # the common hit: one key, in one or more lists, written canonically
                    name = prefix[-2::-1]  # "moc.a." -> "a.com"
                    plain = record[0]
                    found = (((plain[0], name),) if len(plain) == 1
                             else tuple([(number, name) for number in plain]), ())
                break
            else:  # most hosts are in no list: keep this path short
                found = ((), ())
            if self._host_cache:
                if len(self._hosts) >= self._host_cache:
                    self._hosts.clear()
                self._hosts[key] = found
        hits, url_keys = found
        if not url_keys or path is None:
            return hits
        found = list(hits)
        have = None
        for host_key in url_keys:
            base = len(host_key) + 1
            for prefix in self._trie.prefixes(f"{host_key} {path}"):
                if len(prefix) <= base:
                    continue
                entry_path = prefix[base:]
                size = len(entry_path)
                if size != len(path) and entry_path[-1] != "/" and path[size] != "/":
                    continue  # /a/b must not match /a/bc
                for number, text, required in self._record(self._refs[self._trie.key_id(prefix)])[3]:
                    if required:
                        if have is None:
                            have = frozenset(query)
                        if not have.issuperset(required):
                            continue
                    found.append((number, text))
        return found
