"""Canonical hosts and URLs, as a browser would send them (DESIGN.md, "Matching semantics").

Every host and URL that filterd compares, from a list or from a request, goes through this
module so that both sides are spelled the same way. Parsing is the WHATWG URL standard as
implemented by ``ada_url`` (which also does UTS-46 IDNA, non-transitional, the way browsers
do: ``faß.de`` -> ``xn--fa-hia.de``); nothing here parses URLs by hand.

What we add on top of WHATWG, and why:

- the trailing dot of a host is removed (``example.com.`` is the same site);
- the port, the credentials and the fragment are not part of the canonical URL (the port is
  kept only when it is not the scheme's default; credentials must never be recorded; a
  fragment never reaches a proxy);
- percent-escapes in path and query are normalised as RFC 3986 section 6.2.2 says: hex
  digits upper case, escaped unreserved characters (``A-Z a-z 0-9 - . _ ~``) decoded, so that
  a list written with ``%c3%b1`` matches a browser sending ``%C3%B1``;
- IPv6 hosts keep WHATWG's brackets (``[2001:db8::1]``), the form a URL and a Host header
  carry; IPv4 in any numeric spelling becomes dotted decimal (``0x7f.1`` -> ``127.0.0.1``).

Speed: the proxy canonicalises every request. Inputs that are provably already canonical
(lower-case ASCII letter-digit-hyphen-underscore names that cannot be numbers or punycode,
and paths made only of characters WHATWG never rewrites) skip the parser; everything else
goes through ada. ``tests/test_urls.py`` checks with hypothesis that both routes agree.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import ada_url

__all__ = ["CanonicalURL", "canonical_host", "canonical_url", "normalise_percent", "reversed_key"]

#: Schemes whose host is a real host (WHATWG "special" schemes, except file).
WEB_SCHEMES = frozenset({"http", "https", "ws", "wss", "ftp"})

# A host that WHATWG leaves as it is: lower-case LDH labels (underscores allowed, as browsers
# allow them), no empty label, no punycode (those need validating), and a last label that
# is not a number (those make the host an IPv4 address or invalid).
#: Exported for the list loaders' fast path; use with ``"xn--" not in name``.
FAST_NAME = re.compile(r"(?:[a-z0-9_-]+\.)*(?![0-9]+\Z)(?!0x[0-9a-f]*\Z)[a-z0-9_-]+")
_DOTTED_QUAD = re.compile(r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
                          r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])")
# A whole URL that needs no rewriting: http(s), a fast name, no port, a path and query made
# only of RFC 3986 characters that WHATWG never percent-encodes. Dot segments ("/." ...) and
# "%2e" are excluded below because WHATWG resolves them.
_FAST_URL = re.compile(
    r"(https?)://([a-z0-9_-]+(?:\.[a-z0-9_-]+)*)"
    r"(/[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*)?"
    r"(?:\?([A-Za-z0-9\-._~!$&()*+,;=:@/?%]*))?"
    r"(?:#[^\t\n\r]*)?"
)
_HAS_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_OTHER_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:(?![0-9])")  # mailto:, javascript:, data:
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_NOT_IN_HOST = re.compile(r"[/?#@\\\s]")
_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443", "ftp": "21"}


class CanonicalURL(NamedTuple):
    """A URL in canonical form; ``query_pairs`` keep the request's order and repeats."""

    href: str
    host: str
    path: str
    query_pairs: tuple[tuple[str, str], ...]


def _fast_name(host: str) -> bool:
    """True when WHATWG would return ``host`` unchanged (see FAST_NAME)."""
    return FAST_NAME.fullmatch(host) is not None and "xn--" not in host


def _from_ada(hostname: str) -> str:
    """Finish a hostname ada returned: drop trailing dots, and re-check what is left.

    ``a.1..`` is a name to WHATWG but ``a.1`` is an (invalid) IPv4 address, so a stripped
    name is parsed once more: canonical_host(canonical_host(x)) must equal canonical_host(x).
    """
    if not hostname:
        raise ValueError("empty host")
    if not hostname.endswith("."):
        return hostname
    stripped = hostname.rstrip(".")
    if not stripped:
        raise ValueError(f"invalid host: {hostname!r}")
    if _fast_name(stripped) or _DOTTED_QUAD.fullmatch(stripped):
        return stripped
    again = _parse_host(stripped)
    if again != stripped:
        raise ValueError(f"host changes when its trailing dot is removed: {hostname!r}")
    return again


def _parse_host(host: str) -> str:
    """WHATWG host parsing through ada (UTS-46, IPv4 numbers, IPv6 compression)."""
    try:
        parsed = ada_url.parse_url(f"http://{host}/", attributes=("hostname",))
    except ValueError:
        raise ValueError(f"invalid host: {host!r}") from None
    return parsed["hostname"]


def canonical_host_uncached(host: str) -> str:
    """canonical_host without the cache; the list loaders use it for millions of names."""
    if _fast_name(host) or _DOTTED_QUAD.fullmatch(host):
        return host
    host = host.strip()
    if not host or _NOT_IN_HOST.search(host):
        raise ValueError(f"invalid host: {host!r}")
    if host.count(":") > 1 and not host.startswith("["):
        host = f"[{host}]"  # a bare IPv6 address
    return _from_ada(_parse_host(host))


@functools.lru_cache(maxsize=32768)
def canonical_host(host: str) -> str:
    """The WHATWG canonical form of a host; raises ValueError when it is not a valid host.

    Lower case, UTS-46 to punycode, trailing dot and port removed, IPv4 in any numeric
    spelling as dotted decimal, IPv6 compressed inside brackets (``[2001:db8::1]``).
    Cached because the proxy sees the same few thousand hosts again and again.
    """
    return canonical_host_uncached(host)


def _percent(match: re.Match[str]) -> str:
    text = match.group(0)
    char = chr(int(text[1:], 16))
    return char if char in _UNRESERVED else text.upper()


def normalise_percent(text: str) -> str:
    """Upper-case percent-escapes and decode the unreserved ones (RFC 3986, 6.2.2)."""
    return _PERCENT.sub(_percent, text) if "%" in text else text


def _pairs(query: str) -> tuple[tuple[str, str], ...]:
    """Query parameters as (name, value) pairs; ``a`` alone is ("a", "")."""
    if not query:
        return ()
    pairs = []
    for part in query.split("&"):
        if part:
            name, _, value = part.partition("=")
            pairs.append((name, value))
    return tuple(pairs)


def _build(scheme: str, host: str, port: str, path: str, query: str) -> CanonicalURL:
    path = normalise_percent(path) or "/"
    query = normalise_percent(query)
    port_part = f":{port}" if port else ""
    href = f"{scheme}://{host}{port_part}{path}" + (f"?{query}" if query else "")
    return CanonicalURL(href, host, path, _pairs(query))


def canonical_url_uncached(url: str) -> CanonicalURL:
    """canonical_url without the cache; the list loaders use it."""
    fast = _FAST_URL.fullmatch(url)
    if fast:
        scheme, host, path, query = fast.groups()
        path = path or "/"
        if (_fast_name(host) and "/." not in path and "%2" not in path):
            return _build(scheme, host, "", path, query or "")
    if not _HAS_SCHEME.match(url):
        if _OTHER_SCHEME.match(url):
            raise ValueError(f"not a web URL: {url!r}")
        url = f"http://{url}"  # "example.com/x" or "host:8080/x": typed without a scheme
    try:
        parts = ada_url.parse_url(url, attributes=("protocol", "hostname", "port", "pathname", "search"))
    except ValueError:
        raise ValueError(f"invalid URL: {url!r}") from None
    scheme = parts["protocol"].rstrip(":")
    if scheme not in WEB_SCHEMES:
        raise ValueError(f"not a web URL (scheme {scheme!r}): {url!r}")
    host = _from_ada(parts["hostname"])
    port = parts["port"]
    if port == _DEFAULT_PORTS[scheme]:
        port = ""
    return _build(scheme, host, port, parts["pathname"], parts["search"][1:])


@functools.lru_cache(maxsize=8192)
def canonical_url(url: str) -> CanonicalURL:
    """A URL in canonical form; raises ValueError for anything that is not a web URL.

    Scheme-less input (``example.com/a?b``) is read as ``http://``. ``href`` is
    ``scheme://host[:port]path[?query]``: no credentials, no fragment, no default port.
    """
    return canonical_url_uncached(url)


def reversed_key(host: str) -> str:
    """The index key of a canonical host: its characters reversed, then a dot.

    ``www.example.com`` -> ``moc.elpmaxe.www.``; a domain entry's key is then a prefix of
    the key of every host it covers, and of no other (the dot marks the label boundary).
    """
    return host[::-1] + "."
