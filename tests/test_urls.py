"""Canonical hosts and URLs: the WHATWG forms a browser sends, and the fast path agrees with ada."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filterd import urls
from filterd.urls import canonical_host, canonical_url, normalise_percent


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("example.com", "example.com"),
        ("EXAMPLE.Com", "example.com"),
        ("example.com.", "example.com"),
        ("example.com..", "example.com"),
        ("example.com:8080", "example.com"),
        ("Bücher.de", "xn--bcher-kva.de"),
        ("faß.de", "xn--fa-hia.de"),  # UTS-46 non-transitional, as browsers
        ("XN--BCHER-KVA.DE", "xn--bcher-kva.de"),
        ("ＥＸＡＭＰＬＥ．ｃｏｍ", "example.com"),  # fullwidth letters and dot
        ("a。b.com", "a.b.com"),  # ideographic full stop
        ("☃.net", "xn--n3h.net"),
        ("lynns_postcards.gaulin.com", "lynns_postcards.gaulin.com"),
        ("0x7f.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7F000001", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("[2001:DB8:0:0:0::1]", "[2001:db8::1]"),
        ("2001:db8:0::1", "[2001:db8::1]"),
        ("[::ffff:1.2.3.4]", "[::ffff:102:304]"),
        ("[2001:db8::1]:443", "[2001:db8::1]"),
    ],
)
def test_canonical_host(host: str, expected: str) -> None:
    assert canonical_host(host) == expected


@pytest.mark.parametrize(
    "host",
    ["", " ", "1.2.3.4.5", "256.1.1.1", "a.1", "a.1..", "ex ample.com", "a/b", "user@host", "[::1",
     "a?b", "a#b", "\u200d.com", "."],
)
def test_canonical_host_rejects(host: str) -> None:
    with pytest.raises(ValueError):
        canonical_host(host)


@pytest.mark.parametrize(
    ("url", "href", "host", "path", "pairs"),
    [
        ("http://example.com", "http://example.com/", "example.com", "/", ()),
        ("HTTP://Example.COM/A/./b/../C", "http://example.com/A/C", "example.com", "/A/C", ()),
        ("example.com/b?x=1&y", "http://example.com/b?x=1&y", "example.com", "/b", (("x", "1"), ("y", ""))),
        ("example.com:8080/x", "http://example.com:8080/x", "example.com", "/x", ()),
        ("http://u:secret@a.com:80/", "http://a.com/", "a.com", "/", ()),  # never keep credentials
        ("https://a.com:443/x#frag", "https://a.com/x", "a.com", "/x", ()),
        ("https://a.com:8443/x", "https://a.com:8443/x", "a.com", "/x", ()),
        ("ws://a.com:80/x", "ws://a.com/x", "a.com", "/x", ()),
        ("http://a.com/%7efoo/%c3%a9?%7E=%c3%a9", "http://a.com/~foo/%C3%A9?~=%C3%A9", "a.com", "/~foo/%C3%A9",
         (("~", "%C3%A9"),)),
        ("http://a.com/é x", "http://a.com/%C3%A9%20x", "a.com", "/%C3%A9%20x", ()),
        ("http://a.com/a%2fb", "http://a.com/a%2Fb", "a.com", "/a%2Fb", ()),
        ("http://a.com/%2e%2E/b", "http://a.com/b", "a.com", "/b", ()),
        ("http://a.com/b?", "http://a.com/b", "a.com", "/b", ()),
        ("http://a.com//x", "http://a.com//x", "a.com", "//x", ()),
        ("http://0x7f.1/x", "http://127.0.0.1/x", "127.0.0.1", "/x", ()),
        ("http://[2001:DB8::1]:81/x", "http://[2001:db8::1]:81/x", "[2001:db8::1]", "/x", ()),
        ("http://Bücher.de./Ä", "http://xn--bcher-kva.de/%C3%84", "xn--bcher-kva.de", "/%C3%84", ()),
        ("http://a.com/b\\c", "http://a.com/b/c", "a.com", "/b/c", ()),  # WHATWG: \ is / here
    ],
)
def test_canonical_url(url: str, href: str, host: str, path: str, pairs: tuple) -> None:
    assert canonical_url(url) == (href, host, path, pairs)


@pytest.mark.parametrize(
    "url", ["mailto:x@y.com", "javascript:alert(1)", "foo://x/", "http://", "http://a b/", "file:///etc/passwd",
            "data:text/html,hi", "http://1.2.3.4.5/"],
)
def test_canonical_url_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        canonical_url(url)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("%7e", "~"), ("%41%2D%5f%2e", "A-_."), ("%c3%a9", "%C3%A9"), ("%2f", "%2F"), ("%zz", "%zz"), ("a", "a")],
)
def test_normalise_percent(text: str, expected: str) -> None:
    assert normalise_percent(text) == expected


_label = st.text(alphabet=string.ascii_letters + string.digits + "-_ßüÄ。．ｃ\u00ad", min_size=1, max_size=8)
_hosts = st.lists(_label, min_size=1, max_size=4).map(".".join) | st.from_regex(
    r"\A(0x[0-9a-f]{1,3}|[0-9]{1,4})(\.(0x[0-9a-f]{1,2}|[0-9]{1,3})){0,3}\.?\Z")


@settings(max_examples=100, deadline=None)
@given(_hosts)
def test_canonical_host_is_idempotent(host: str) -> None:
    try:
        once = canonical_host(host)
    except ValueError:
        return
    assert canonical_host(once) == once


_path = st.text(alphabet=string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/%?#é \\", max_size=20)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["http://", "https://", "", "HTTP://"]), _hosts, _path)
def test_canonical_url_is_idempotent(scheme: str, host: str, path: str) -> None:
    try:
        once = canonical_url(f"{scheme}{host}/{path}")
    except ValueError:
        return
    assert canonical_url(once.href) == once


_fast_hosts = st.from_regex(r"\A[a-z0-9_-]{1,6}(\.[a-z0-9_-]{1,6}){0,3}\Z")
_fast_paths = st.from_regex(r"\A(/[A-Za-z0-9\-._~!$&'()*+,;=:@%]{0,6}){0,3}\Z")
_fast_queries = st.from_regex(r"\A(\?[A-Za-z0-9\-._~!$&()*+,;=:@/?%]{0,10})?\Z")


@settings(max_examples=120, deadline=None)
@given(_fast_hosts)
def test_fast_host_path_agrees_with_ada(host: str) -> None:
    try:
        fast = urls.canonical_host_uncached(host)
    except ValueError:
        fast = None
    try:
        slow = urls._from_ada(urls._parse_host(host))
    except ValueError:
        slow = None
    assert fast == slow


@settings(max_examples=120, deadline=None)
@given(st.sampled_from(["http", "https"]), _fast_hosts, _fast_paths, _fast_queries)
def test_fast_url_path_agrees_with_ada(scheme: str, host: str, path: str, query: str) -> None:
    url = f"{scheme}://{host}{path}{query}"
    saved = urls._FAST_URL
    try:
        fast = urls.canonical_url_uncached(url)
    except ValueError:
        fast = None
    urls._FAST_URL = re.compile(r"(?!)")  # force every URL through ada
    try:
        slow = urls.canonical_url_uncached(url)
    except ValueError:
        slow = None
    finally:
        urls._FAST_URL = saved
    assert fast == slow
