"""List loaders: every format, every UT1 quirk, counts that add up, and the real UT1 folders.

"Content line" (the unit of the counts): a line that is not blank and does not start with
``#`` after leading white space. In domains/urls files and squidGuard folders, entries +
skipped == content lines.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from filterd.errors import FilterdError
from filterd.lists import MAX_SKIPS_KEPT, UrlEntry, load

FIXTURES = Path(__file__).parent / "fixtures" / "lists"


def _content_lines(path: Path) -> int:
    count = 0
    for raw in path.read_bytes().split(b"\n"):
        raw = raw.strip()
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:].strip()
        if raw and not raw.startswith(b"#"):
            count += 1
    return count


def _one(tmp_path: Path, fmt: str, line: str):
    path = tmp_path / "list"
    path.write_text(line + "\n", encoding="utf-8")
    return load(path, fmt)


@pytest.mark.parametrize(
    ("line", "host", "text"),
    [
        ("example.com", "example.com", None),
        ("Example.COM", "example.com", "Example.COM"),
        (".afshin.ir", "afshin.ir", ".afshin.ir"),  # leading dot: the domain
        ("*.wild.example", "wild.example", "*.wild.example"),
        ("xn--bcher-kva.de", "xn--bcher-kva.de", None),  # punycode kept
        ("Bücher.de", "xn--bcher-kva.de", "Bücher.de"),
        ("lynns_postcards.gaulin.com", "lynns_postcards.gaulin.com", None),  # underscores
        ("_video-bagarre.com", "_video-bagarre.com", None),
        ("46.4.37.201", "46.4.37.201", None),  # bare IPv4: an IP host entry
        ("0x7f.1", "127.0.0.1", "0x7f.1"),
        ("example.com.", "example.com", "example.com."),
        ("casino.example # comment", "casino.example", "casino.example # comment"),
        ("2001:db8::1", "[2001:db8::1]", "2001:db8::1"),
    ],
)
def test_domain_lines(tmp_path: Path, line: str, host: str, text: str | None) -> None:
    loaded = _one(tmp_path, "domains", line)
    assert (loaded.entries, loaded.skipped) == (1, 0)
    assert loaded.domains == [(host, text)]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("not a domain", "not a domain"),
        ("example.com/path", "not a domain"),
        ("256.1.1.1", "invalid host"),
        ("a.1", "invalid host"),
        ("exa<mple.com", "invalid host"),
        (".", "not a domain"),
    ],
)
def test_bad_domain_lines_are_skipped(tmp_path: Path, line: str, reason: str) -> None:
    loaded = _one(tmp_path, "domains", line)
    assert (loaded.entries, loaded.skipped) == (0, 1)
    skip = loaded.skips[0]
    assert (skip.file, skip.line, skip.text) == (str(tmp_path / "list"), 1, line)
    assert reason in skip.reason


@pytest.mark.parametrize(
    ("line", "entry"),
    [
        ("video.example/watch", UrlEntry("video.example", "/watch", (), "video.example/watch")),
        ("http://Video.Example/Watch", UrlEntry("video.example", "/Watch", (), "http://Video.Example/Watch")),
        ("s.example/r?q=bad&safe=off", UrlEntry("s.example", "/r", (("q", "bad"), ("safe", "off")),
                                                "s.example/r?q=bad&safe=off")),
        ("theonion.com/bin/onionimp\\.cgi\\?ticker2\\.gif",  # stray regex escapes: unescaped
         UrlEntry("theonion.com", "/bin/onionimp.cgi", (("ticker2.gif", ""),),
                  "theonion.com/bin/onionimp\\.cgi\\?ticker2\\.gif")),
        ("45.90.163.37//arm4", UrlEntry("45.90.163.37", "//arm4", (), "45.90.163.37//arm4")),
        ("danskporn.dk/#p2", UrlEntry("danskporn.dk", "/", (), "danskporn.dk/#p2")),  # fragment dropped
        ("gosexy.it/index.php?", UrlEntry("gosexy.it", "/index.php", (), "gosexy.it/index.php?")),
        ("dmoz.org/World/Espa%c3%b1ol/", UrlEntry("dmoz.org", "/World/Espa%C3%B1ol/", (),
                                                  "dmoz.org/World/Espa%c3%b1ol/")),
        ("host.example", UrlEntry("host.example", "/", (), "host.example")),
    ],
)
def test_url_lines(tmp_path: Path, line: str, entry: UrlEntry) -> None:
    loaded = _one(tmp_path, "urls", line)
    assert (loaded.entries, loaded.skipped) == (1, 0)
    assert loaded.urls == [entry]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("regex.example/a\\d+", "regular expression"),
        ("a.example/b c", "white space"),
        ("1.2.3.4.5/x", "invalid URL"),
        ("mailto:x@y.example", "not a web URL"),
    ],
)
def test_bad_url_lines_are_skipped(tmp_path: Path, line: str, reason: str) -> None:
    loaded = _one(tmp_path, "urls", line)
    assert (loaded.entries, loaded.skipped) == (0, 1)
    assert reason in loaded.skips[0].reason


def test_hosts_file() -> None:
    loaded = load(FIXTURES / "hosts.txt", "hosts")
    hosts = sorted(host for host, _ in loaded.domains)
    assert hosts == ["ads.example", "ads2.example", "tab.example", "tracker.example"]
    assert [(s.line, s.reason.split(" (")[0]) for s in loaded.skips] == [
        (8, "not a hosts line"), (9, "not a hosts line"), (10, "invalid host: '256.1.1.1'"), (10, "not a domain name")]
    assert (loaded.entries, loaded.skipped) == (4, 4)


def test_quirky_bytes(tmp_path: Path) -> None:
    """BOM, CRLF, blank lines, comments, a latin-1 line, trailing white space."""
    path = tmp_path / "domains"
    path.write_bytes(b"\xef\xbb\xbfbom.example\r\n\r\n# comment\r\n  \r\ncrlf.example  \r\ncaf\xe9.example\r\n"
                     b"\t# indented comment\nlast.example")
    loaded = load(path, "domains")
    assert [host for host, _ in loaded.domains] == ["bom.example", "crlf.example", "last.example"]
    assert [(s.line, s.reason) for s in loaded.skips] == [(6, "not UTF-8")]
    assert loaded.entries + loaded.skipped == _content_lines(path) == 4


def test_hosts_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_bytes(b"\xef\xbb\xbf127.0.0.1 localhost\r\n0.0.0.0 a.example b.example\r\n")
    loaded = load(path, "hosts")
    assert loaded.domains == [("a.example", None), ("b.example", None)]
    assert loaded.skipped == 0


def test_squidguard_folder() -> None:
    loaded = load(FIXTURES / "squidguard" / "social", "squidguard")
    hosts = {host for host, _ in loaded.domains}
    assert {"facebook.com", "dotted.example", "wild.example", "xn--bcher-kva.de", "upper.example.org",
            "10.9.8.7", "lynns_postcards.gaulin.com"} <= hosts
    reasons = sorted(s.reason.split(":")[0] for s in loaded.skips)
    assert reasons == ["not a domain name", "regular expression, not a URL", "regular expressions are not supported"]
    folder = FIXTURES / "squidguard" / "social"
    lines = sum(_content_lines(folder / name) for name in ("domains", "urls", "expressions"))
    assert loaded.entries + loaded.skipped == lines


def test_squidguard_alias_file_is_followed() -> None:
    alias = load(FIXTURES / "squidguard" / "chat", "squidguard")
    real = load(FIXTURES / "squidguard" / "social", "squidguard")
    assert (alias.domains, alias.urls) == (real.domains, real.urls)


@pytest.mark.parametrize(
    ("relative", "fmt", "message"),
    [
        ("missing-folder", "squidguard", "list folder not found"),
        ("missing.txt", "domains", "list file not found"),
        ("squidguard", "domains", "not a file"),
        ("domains.txt", "squidguard", "not a squidGuard category folder"),
        ("squidguard", "squidguard", "neither a domains nor a urls file"),
        ("domains.txt", "adblock", "unknown list format"),
    ],
)
def test_bad_sources_name_the_file(relative: str, fmt: str, message: str) -> None:
    with pytest.raises(FilterdError) as error:
        load(FIXTURES / relative, fmt)
    assert message in str(error.value)
    assert error.value.file == str(FIXTURES / relative)


def test_skips_are_counted_beyond_those_kept(tmp_path: Path) -> None:
    path = tmp_path / "domains"
    path.write_text("bad name\n" * (MAX_SKIPS_KEPT + 5) + "good.example\n")
    loaded = load(path, "domains")
    assert (loaded.entries, loaded.skipped, len(loaded.skips)) == (1, MAX_SKIPS_KEPT + 5, MAX_SKIPS_KEPT)


def _categories(ut1: Path) -> list[Path]:
    return sorted(p for p in ut1.iterdir() if p.is_dir())


def test_every_ut1_category_loads_and_counts_add_up(ut1: Path) -> None:
    folders = _categories(ut1)
    assert len(folders) > 60
    for folder in folders:
        loaded = load(folder, "squidguard")
        files = [folder / n for n in ("domains", "urls", "expressions", "very_restrictive_expression")
                 if (folder / n).is_file()]
        assert loaded.entries + loaded.skipped == sum(_content_lines(f) for f in files), folder.name
        assert len(loaded.skips) == loaded.skipped  # few enough to keep them all
        for skip in loaded.skips:  # every skip points at a real content line of its file
            raw = Path(skip.file).read_bytes().split(b"\n")[skip.line - 1].strip()
            assert raw and not raw.startswith(b"#")
        domains_only = [s for s in loaded.skips if Path(s.file).name in ("domains", "urls")]
        assert not domains_only, domains_only[:3]  # UT1's domains/urls all load


def test_ut1_quirks_load_as_entries(ut1: Path) -> None:
    redirector = load(ut1 / "redirector", "squidguard")
    ips = [host for host, _ in redirector.domains if host.replace(".", "").isdigit()]
    assert len(ips) == 22530
    dyn = load(ut1 / "dynamic-dns", "squidguard")
    assert ("afshin.ir", ".afshin.ir") in dyn.domains
