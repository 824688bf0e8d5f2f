"""The block page a person sees: what it says, what it escapes, and how it looks in Chromium."""

from __future__ import annotations

import shutil
import subprocess
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest

from filterd import blockpage
from filterd.verdict import Match, Verdict, What, Who


def verdict(url: str = "http://bad.example/page", user: str | None = "jdoe") -> Verdict:
    return Verdict(time=datetime(2026, 11, 25, 10, 15, tzinfo=timezone.utc),
                   who=Who(ip="10.20.1.2", user=user, role="pupil"),
                   what=What(host="bad.example", url=url, categories=("terrorism",),
                             matches=(Match("ho", "terrorism", "bad.example"),)),
                   window="contact", action="block", alert=True, rule="terrorism")


class Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append(tag)

    def handle_data(self, data) -> None:
        self.text.append(data)


def test_page_names_rule_category_time_and_reference() -> None:
    v = verdict()
    answer = blockpage.render(v, blockpage.Branding(school="Hill School", ict_contact="ICT, ext. 214"), page=True)
    assert answer.status == 403
    assert answer.headers["X-Filterd-Rule"] == "terrorism"
    assert "no-store" in answer.headers["Cache-Control"]
    parsed = Text()
    parsed.feed(answer.body.decode())
    text = " ".join(parsed.text)
    for words in ("Hill School", "terrorism", v.ref, "ICT, ext. 214", "http://bad.example/page",
                  "Wednesday 25 November 2026, 10:15:00 GMT"):
        assert words in text
    assert "script" not in parsed.tags


def test_hostile_values_are_escaped() -> None:
    answer = blockpage.render(verdict(url='http://bad.example/"><script>alert(1)</script>', user="<b>x</b>"),
                              blockpage.Branding(), page=True)
    body = answer.body.decode()
    assert "<script>" not in body and "&lt;script&gt;" in body and "<b>x</b>" not in body


@pytest.mark.parametrize("rule, header", [("terrorism", "terrorism"), ("a\r\nSet-Cookie: x", "a??Set-Cookie: x"),
                                          (None, "none")])
def test_rule_header_is_safe(rule, header) -> None:
    v = verdict()
    object.__setattr__(v, "rule", rule)
    assert blockpage.render(v, blockpage.Branding(), page=False).headers["X-Filterd-Rule"] == header


@pytest.mark.parametrize(
    "accept, dest, method, page",
    [("text/html,application/xhtml+xml", None, "GET", True), ("image/avif,image/webp,*/*", None, "GET", False),
     (None, "document", "GET", True), ("*/*", "script", "GET", False), ("application/json", None, "POST", False),
     (None, None, "GET", True), ("text/html", None, "OPTIONS", False), ("*/*", "iframe", "GET", True)],
)
def test_wants_page(accept, dest, method, page) -> None:
    assert blockpage.wants_page(accept, dest, method) is page


def test_short_403_for_subresources() -> None:
    answer = blockpage.render(verdict(), blockpage.Branding(), page=False)
    assert answer.headers["Content-Type"].startswith("text/plain") and len(answer.body) < 200


def test_logo_is_inlined(tmp_path: Path) -> None:
    logo = tmp_path / "logo.svg"
    logo.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    branding = blockpage.Branding.from_files("S", "ICT", logo, blockpage.Branding().tz)
    body = blockpage.render(verdict(), branding, page=True).body.decode()
    assert 'src="data:image/svg+xml;base64,' in body


def test_chromium_renders_it(tmp_path: Path) -> None:
    """A person's view: headless Chromium screenshots the page; it must not be blank."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is needed (make system-deps installs it)"
    page = tmp_path / "block.html"
    page.write_bytes(blockpage.render(verdict(), blockpage.Branding(school="Hill School"), page=True).body)
    shot = tmp_path / "block.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1000,800",
                    page.as_uri()], check=True, capture_output=True, timeout=60)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000  # a blank page compresses to ~3 KB
