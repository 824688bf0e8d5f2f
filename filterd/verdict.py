"""The values that travel from one stage to the next: who, what, and the Verdict.

A Verdict is made once by ``decide`` and then only read: ``act`` turns it into a block page
or a pass, ``record`` writes it, ``mail`` and ``report`` read what ``record`` wrote.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime

#: The three windows of the school day (DESIGN.md, "Windows").
WINDOWS = ("contact", "non_contact", "out_of_hours")
#: What a rule may do with a request.
ACTIONS = ("allow", "log", "block")


@dataclass(frozen=True, slots=True)
class Who:
    """The person and device behind a request, and how we know (``source``)."""

    ip: str | None = None
    user: str | None = None
    role: str | None = None
    device: str | None = None  # MAC address or DHCP hostname, when a lease names one
    location: str | None = None  # from [[identity.networks]]
    source: str = "none"  # auth | lease | network | none
    email: str | None = None
    year: str | None = None
    form: str | None = None


@dataclass(frozen=True, slots=True)
class Match:
    """One list entry that matched: which list, its category, and the entry as written."""

    list: str
    category: str
    entry: str


@dataclass(frozen=True, slots=True)
class What:
    """What a request is for, in canonical form, with every category any list gave it."""

    host: str
    url: str | None = None  # canonical URL; None when only the host is known (CONNECT, SNI)
    categories: tuple[str, ...] = ()
    matches: tuple[Match, ...] = ()


def new_ref() -> str:
    """A short event reference a person can read out to ICT over the phone.

    Ten of 32 letters and digits (no 0/O, 1/I; 50 random bits): each random byte modulo 32
    is unbiased. One urandom call and a C-level translate, because it runs for every request.
    """
    return os.urandom(10).translate(_BYTE_TO_LETTER).decode("ascii")


_ALPHABET = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
_BYTE_TO_LETTER = bytes(_ALPHABET[b % 32] for b in range(256))


@dataclass(frozen=True, slots=True)
class Verdict:
    """Who, what, when, which rule and which action: made by decide, read by the rest."""

    time: datetime  # timezone-aware
    who: Who
    what: What
    window: str  # one of WINDOWS
    action: str  # one of ACTIONS
    alert: bool = False
    rule: str | None = None
    kind: str = "request"  # request (from the proxy or an import) | bypass (from the sensor)
    method: str | None = None
    detail: str | None = None  # e.g. "DoT to 1.1.1.1:853" for a bypass
    ref: str = field(default_factory=new_ref)

    @property
    def is_incident(self) -> bool:
        """Blocks, alerts and bypass attempts are committed at once; the rest is usage."""
        return self.action == "block" or self.alert or self.kind == "bypass"

    @property
    def event_kind(self) -> str:
        """The ``kind`` column of the events table and of ``filterd events``."""
        if self.kind == "bypass":
            return "bypass"
        if self.action == "block":
            return "block"
        if self.alert:
            return "alert"
        return "usage"
