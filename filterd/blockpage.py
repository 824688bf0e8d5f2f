"""The act stage's visible part: the 403 a blocked person sees.

A page for a person (a browser navigating to a document) names what was blocked, why, when,
and the event reference to quote to ICT; anything else (images, scripts, API calls) gets a
short plain 403 so that a page's stray resources do not each render a full page.
"""

from __future__ import annotations

import base64
import mimetypes
import re
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import jinja2

from filterd.resources import templates
from filterd.verdict import Verdict

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(templates())),
    autoescape=jinja2.select_autoescape(["html", "j2"]),
    undefined=jinja2.StrictUndefined,
)


@dataclass(frozen=True)
class Branding:
    """What the school puts on its block page (``[school]`` in the config)."""

    school: str = "Example School"
    ict_contact: str = "the ICT office"
    logo_data_uri: str | None = None
    tz: ZoneInfo = ZoneInfo("Europe/London")

    @classmethod
    def from_files(cls, school: str, ict_contact: str, logo: Path | None, tz: ZoneInfo) -> "Branding":
        """Inline the logo as a data: URI, so the page needs no request that could be blocked."""
        uri = None
        if logo is not None:
            mime = mimetypes.guess_type(logo.name)[0] or "image/png"
            uri = f"data:{mime};base64," + base64.b64encode(logo.read_bytes()).decode()
        return cls(school, ict_contact, uri, tz)


@dataclass(frozen=True)
class BlockResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def header_safe(value: str | None) -> str:
    """A rule name made safe for a header (config-controlled, but never trust a newline)."""
    return re.sub(r"[^\x20-\x7e]", "?", value or "none")[:200]


def wants_page(accept: str | None, fetch_dest: str | None, method: str | None = "GET") -> bool:
    """Whether the request is a person's page load rather than a sub-resource or API call."""
    if fetch_dest:
        return fetch_dest in ("document", "iframe", "frame")
    if method not in (None, "GET", "POST"):
        return False
    return accept is None or "text/html" in accept or accept.strip() in ("", "*/*")


def render(verdict: Verdict, branding: Branding, *, page: bool, note: str | None = None) -> BlockResponse:
    """The 403 for a blocked verdict: the branded page, or a short text for a sub-resource."""
    rule = header_safe(verdict.rule)
    headers = {
        "X-Filterd-Rule": rule,
        "X-Filterd-Ref": verdict.ref,
        "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0",
        "Pragma": "no-cache",
        "Expires": "0",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'",
        "Connection": "close" if not page else "keep-alive",
    }
    if not page:
        headers["Content-Type"] = "text/plain; charset=utf-8"
        body = f"Blocked by {branding.school}'s web filter (rule {rule}, ref {verdict.ref}).\n"
        return BlockResponse(403, headers, body.encode())
    headers["Content-Type"] = "text/html; charset=utf-8"
    local = verdict.time.astimezone(branding.tz)
    html = _ENV.get_template("blockpage.html.j2").render(
        v=verdict, school=branding.school, ict_contact=branding.ict_contact,
        logo=branding.logo_data_uri, when=local.strftime("%A %-d %B %Y, %H:%M:%S %Z"),
        categories=", ".join(verdict.what.categories) or "none", note=note,
        address=verdict.what.url or verdict.what.host,
    )
    return BlockResponse(403, headers, html.encode())
