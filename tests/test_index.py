"""The compiled index: label-boundary lookups, a file that round-trips, and damage detected."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filterd.index import CorruptIndex, Index, compile_index, write_atomic
from filterd.lists import Loaded, UrlEntry
from filterd.urls import reversed_key


def _index(domains=(), urls=(), lists: int = 1) -> Index:
    loaded = [Loaded() for _ in range(lists)]
    for number, host, text in domains:
        loaded[number].domains.append((host, text))
    for number, entry in urls:
        loaded[number].urls.append(entry)
    return Index.from_bytes(compile_index(loaded, {"lists": []}))


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("example.com", [(0, "example.com")]),
        ("a.example.com", [(0, "example.com")]),
        ("a.b.example.com", [(0, "example.com")]),
        ("badexample.com", []),
        ("example.co", []),
        ("com", []),
        ("xample.com", []),
        ("127.0.0.1", [(0, "127.0.0.1")]),
        ("[::1]", [(0, "::1 as written")]),
    ],
)
def test_label_boundaries(host: str, expected: list) -> None:
    index = _index([(0, "example.com", None), (0, "127.0.0.1", None), (0, "[::1]", "::1 as written")])
    assert sorted(index.lookup(reversed_key(host))) == expected


def test_several_lists_and_texts_on_one_key() -> None:
    index = _index([(0, "example.com", None), (1, "example.com", ".Example.com"), (1, "example.com", None),
                    (0, "example.com", None), (1, "a.example.com", None)], lists=2)
    assert sorted(index.lookup(reversed_key("a.example.com"))) == [
        (0, "example.com"), (1, ".Example.com"), (1, "a.example.com"), (1, "example.com")]


def test_url_entries_need_the_path() -> None:
    index = _index(urls=[(0, UrlEntry("example.com", "/a/b", (("x", "1"),), "example.com/a/b?x=1"))])
    key = reversed_key("www.example.com")
    assert index.lookup(key) == ()
    assert index.lookup(key, "/a/b/c", (("y", "2"), ("x", "1"))) == [(0, "example.com/a/b?x=1")]
    assert index.lookup(key, "/a/b/c", (("x", "2"),)) == []
    assert index.lookup(key, "/a/bc", (("x", "1"),)) == []


def test_file_round_trip_and_shared_mapping(tmp_path: Path) -> None:
    loaded = Loaded(domains=[("example.com", None)], entries=1)
    path = tmp_path / "x.idx"
    write_atomic(path, compile_index([loaded], {"lists": [], "note": "kept"}))
    index = Index.open(path)
    assert index.meta["note"] == "kept" and len(index) == 1
    assert index.lookup(reversed_key("a.example.com")) == ((0, "example.com"),)
    assert [p.name for p in tmp_path.iterdir()] == ["x.idx"]  # no temporary file left behind
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    code = ("import sys; from pathlib import Path; from filterd.index import Index; "
            "i = Index.open(Path(sys.argv[1])); print(i.lookup('moc.elpmaxe.b.'))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "((0, 'example.com'),)"


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty", "append"])
def test_damaged_file_is_rejected(tmp_path: Path, damage: str) -> None:
    data = bytearray(compile_index([Loaded(domains=[(f"d{i}.example", None) for i in range(500)])], {"lists": []}))
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    elif damage == "empty":
        data = bytearray()
    else:
        data += b"x"
    path = tmp_path / "x.idx"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptIndex):
        Index.open(path)


def test_empty_index() -> None:
    index = _index(lists=0)
    assert index.lookup(reversed_key("example.com"), "/") == ()


_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=6)


@settings(max_examples=100, deadline=None)
@given(st.lists(_label, min_size=1, max_size=3).map(".".join), st.text(alphabet="abcxyz0-_", min_size=1, max_size=4),
       st.lists(_label, max_size=2))
def test_a_domain_never_matches_a_name_that_only_ends_like_it(domain: str, extra: str, sub: list) -> None:
    """``extra + domain`` (no dot between) is another name; ``sub.domain`` is a subdomain."""
    index = _index([(0, domain, None)])
    assert index.lookup(reversed_key(extra + domain)) == ()
    assert index.lookup(reversed_key(".".join(sub + [domain]))) == ((0, domain),)


_entries = st.lists(
    st.tuples(st.integers(0, 2), st.lists(st.sampled_from(["a", "b", "c", "com"]), min_size=1, max_size=3).map(".".join),
              st.booleans()),
    max_size=12)


@settings(max_examples=150, deadline=None)
@given(_entries, st.lists(st.sampled_from(["a", "b", "c", "com", "x"]), min_size=1, max_size=4).map(".".join))
def test_lookup_equals_a_suffix_by_suffix_reference(entries: list, host: str) -> None:
    """Every path through lookup (no hit, the common one-list hit, several keys, lists and
    spellings) gives what checking each label suffix against the entries gives."""
    domains = [(number, name, f"As.Written.{name}" if written else None) for number, name, written in entries]
    index = _index(domains, lists=3)
    labels = host.split(".")
    suffixes = {".".join(labels[i:]) for i in range(len(labels))}
    expected = {(number, text or name) for number, name, text in domains if name in suffixes}
    found = index.lookup(reversed_key(host))
    assert sorted(found) == sorted(expected)
    assert index.lookup(reversed_key(host)) == found  # the cached answer is the same


def test_record_cache_overflow_keeps_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    import filterd.index

    monkeypatch.setattr(filterd.index, "_RECORD_CACHE", 2)
    index = _index([(n % 3, f"d{n}.example", f"D{n}.example" if n % 2 else None) for n in range(20)], lists=3)
    index._host_cache = 0
    for _ in range(2):
        for n in range(20):
            assert index.lookup(reversed_key(f"www.d{n}.example")) == (
                (n % 3, f"D{n}.example" if n % 2 else f"d{n}.example"),)
    assert len(index._records) <= 2


@pytest.mark.parametrize(("records", "ref_type"), [(1, "B"), (300, "H")])
def test_record_ids_take_the_narrowest_array(records: int, ref_type: str) -> None:
    """One record per distinct spelling: 300 spellings need 2-byte record ids, one needs 1 byte."""
    domains = [(0, f"d{n}.example", f"D{n}.example" if records > 1 else None) for n in range(300)]
    index = _index(domains)
    assert index.meta["ref_type"] == ref_type
    for n in (0, 150, 299):
        expected = f"D{n}.example" if records > 1 else f"d{n}.example"
        assert index.lookup(reversed_key(f"www.d{n}.example")) == ((0, expected),)
