"""Policy 6.6: a school email address sent in a form to a social-media site.

Staff must not use school email addresses to set up personal social media accounts. The
only place that shows on the network is the sign-up or log-in form itself, so the addon
hands the body of a form sent to a social-media host to ``school_email_in`` and then forgets
it: the body is read in memory, never stored or logged, and the event records only that a
school address (the domain, not the address) was sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: The pseudo-category a request gets when its form carries a school email address; rules
#: match it like any list category (the shipped policy blocks it).
SCHOOL_EMAIL = "school_email"

#: Forms larger than this are uploads, not sign-ups; they are not searched.
MAX_BODY = 1 << 20


def pattern(domains: Iterable[str]) -> re.Pattern[bytes] | None:
    """One regex for ``@domain`` in the plain, URL-encoded (%40) and JSON-escaped forms."""
    names = sorted({d.strip().lower().lstrip("@") for d in domains if d.strip()})
    if not names:
        return None
    alternatives = b"|".join(re.escape(n.encode("idna")) for n in names)
    return re.compile(rb"(?:@|%40|\\u0040)(?:" + alternatives + rb")(?![a-z0-9.-]*[a-z0-9-])", re.IGNORECASE)


def school_email_in(body: bytes, found: re.Pattern[bytes] | None) -> str | None:
    """The school domain a form body carries, or None; only the domain leaves this function."""
    if found is None or not body or len(body) > MAX_BODY:
        return None
    match = found.search(body)
    if match is None:
        return None
    return re.sub(rb"^(?:@|%40|\\u0040)", b"", match.group(0)).decode("ascii", "replace").lower()


def domains_from_directory(emails: Iterable[str | None]) -> list[str]:
    """The school's email domains as users.csv shows them (when the config names none)."""
    return sorted({e.rsplit("@", 1)[1].lower() for e in emails if e and "@" in e})
