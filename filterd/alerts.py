"""The alert mail worker: pending alert rows in the store -> mails to ICT (policy 8.3).

Delivery guarantee: **exactly once = at-least-once delivery + an idempotent Message-ID.**
An alert row is written in the same transaction as its incident (the store does that), so an
attempt that was committed is never lost. :meth:`AlertDispatcher.dispatch_once` marks a row
sent only *after* the SMTP server accepted the message (250 to DATA). If the daemon dies in
the few milliseconds between that 250 and the store's COMMIT, the row is still pending and
the alert is sent again after restart -- with the *same* ``Message-ID``
(``<alert-{first event ref}@{sender domain}>``), so the receiving mail system (or a person)
can recognise and drop the repeat. A crash at any other point (before or during the SMTP
conversation) leaves the row pending and the alert is delivered once after restart.

Grouping: attempts by the same user (or, without a user, the same IP) at the same host are
sent as one mail with a count. The first attempt is mailed at once; further attempts within
``group_seconds`` of that mail are held and sent together when the interval ends, so a pupil
retrying a page 40 times gives ICT at most one mail per interval, never 40 -- and never a
delay on the first one. Held rows are plain pending rows: a restart loses nothing.

Retries: a failed mail is retried with exponential backoff (30 s, doubling, at most 1 h);
after ``max_attempts`` tries, or at once when the server refused the message for good (5xx),
the rows are marked failed and logged at CRITICAL: ``filterd alerts`` lists them.

All of this is blocking (SQLite and SMTP): the scheduler runs it in a worker thread.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from email.message import EmailMessage
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import jinja2

from filterd.mail import (
    MailError,
    PermanentMailError,
    TemporaryMailError,
    Transport,
    build_message,
    header_safe,
    sender_domain,
)
from filterd.resources import templates

log = logging.getLogger("filterd.alerts")

#: How much of a URL a mail shows; the rest is cut (a 10 kB URL is an attack, not evidence).
URL_LIMIT = 500


class AlertStore(Protocol):
    """The part of :class:`filterd.record.Store` the dispatcher uses."""

    def pending_alerts(self, now: float) -> list[dict]: ...

    def mark_alerts_sent(self, event_refs: Sequence[str], *, message_id: str, sent: float,
                         group_ref: str | None = None) -> None: ...

    def mark_alert_failed(self, event_ref: str, *, error: str, next_attempt: float,
                          give_up: bool = False) -> None: ...


@dataclass
class DispatchResult:
    """What one :meth:`AlertDispatcher.dispatch_once` did, for logs and tests."""

    mails: int = 0  # mails the server accepted
    sent: int = 0  # alert rows marked sent (a grouped mail covers several)
    held: int = 0  # rows held back to be grouped into the next mail
    retry: int = 0  # rows that failed and will be tried again
    given_up: int = 0  # rows marked failed for good
    message_ids: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class AlertGroup:
    """Attempts by one person at one host, sent as one mail."""

    key: tuple[str, str]
    alerts: list[dict]

    @property
    def first(self) -> dict:
        return self.alerts[0]

    @property
    def refs(self) -> list[str]:
        return [event_ref(a) for a in self.alerts]


def event_ref(alert: dict) -> str:
    """The event reference of a pending-alert row (``event_ref``, or the event's ``ref``)."""
    return str(alert.get("event_ref") or alert.get("ref"))


def _ts(alert: dict) -> float:
    """The event's unix time; falls back to parsing ``time`` and then to the alert's ``created``."""
    if alert.get("ts") is not None:
        return float(alert["ts"])
    if alert.get("time"):
        return datetime.fromisoformat(str(alert["time"])).timestamp()
    return float(alert.get("created") or 0.0)


def _categories(alert: dict) -> list[str]:
    value = alert.get("categories")
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return [value]
    return [str(c) for c in value]


def group_key(alert: dict) -> tuple[str, str]:
    """Same person (user, else IP) at the same host."""
    who = alert.get("user") or f"ip:{alert.get('ip') or '?'}"
    return (str(who), str(alert.get("host") or ""))


def group_alerts(alerts: Iterable[dict], group_seconds: float) -> list[AlertGroup]:
    """Split alerts into groups: same key, each group spanning at most ``group_seconds``.

    Groups come out in the order of their first attempt, so the oldest alert goes first.
    """
    by_key: dict[tuple[str, str], list[AlertGroup]] = {}
    groups: list[AlertGroup] = []
    for alert in sorted(alerts, key=lambda a: (_ts(a), event_ref(a))):
        key = group_key(alert)
        chain = by_key.setdefault(key, [])
        if chain and group_seconds > 0 and _ts(alert) - _ts(chain[-1].first) <= group_seconds:
            chain[-1].alerts.append(alert)
            continue
        group = AlertGroup(key, [alert])
        chain.append(group)
        groups.append(group)
    return groups


def backoff_delay(attempts: int, base: float = 30.0, cap: float = 3600.0) -> float:
    """Seconds to wait after the ``attempts``-th failure (1 -> base, 2 -> 2*base, ... <= cap)."""
    return min(cap, base * (2 ** max(0, attempts - 1)))


def make_environment() -> jinja2.Environment:
    """Jinja2 for the alert templates: HTML autoescaped, undefined names are errors."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates())),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2"),
                                            default_for_string=False, default=False),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    return env


class AlertDispatcher:
    """Sends pending alerts as mails to ICT; one call of :meth:`dispatch_once` per tick.

    ``to`` is ``[mail] ict``; ``tz`` is the school's time zone for the times in the mail;
    ``school`` names the school in the mail. ``backoff`` is (base seconds, cap seconds).
    """

    def __init__(
        self,
        store: AlertStore,
        transport: Transport,
        *,
        sender: str,
        to: Sequence[str],
        tz: ZoneInfo,
        school: str,
        group_seconds: int = 600,
        max_attempts: int = 10,
        backoff: tuple[float, float] = (30.0, 3600.0),
    ) -> None:
        if not to:
            raise ValueError("alerts need at least one recipient ([mail] ict)")
        self.store = store
        self.transport = transport
        self.sender = sender
        self.to = list(to)
        self.tz = tz
        self.school = school
        self.group_seconds = group_seconds
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.domain = sender_domain(sender)
        self._env = make_environment()
        # key -> time the last mail for it was accepted: later attempts wait for the interval.
        self._last_mail: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()  # one dispatch at a time, even if called from two threads

    # -- rendering -----------------------------------------------------------------------------

    def message_id(self, group: AlertGroup) -> str:
        """Deterministic: the same first alert always gives the same Message-ID."""
        return f"<alert-{header_safe(group.refs[0], 64)}@{self.domain}>"

    def context(self, group: AlertGroup, *, follow_up: bool = False) -> dict[str, Any]:
        """Everything the templates may show. Raw values: the templates escape them."""
        first = {k: _line(v) if isinstance(v, str) else v for k, v in group.first.items()}
        times = [datetime.fromtimestamp(_ts(a), timezone.utc).astimezone(self.tz) for a in group.alerts]
        url = first.get("url")
        url_text = None
        url_cut = 0
        if url:
            url_text = str(url)
            if len(url_text) > URL_LIMIT:
                url_cut = len(url_text)
                url_text = url_text[:URL_LIMIT]
        categories = _categories(first)
        action = str(first.get("action") or "")
        return {
            "school": self.school,
            "count": len(group.alerts),
            "follow_up": follow_up,
            "group_minutes": max(1, round(self.group_seconds / 60)) if self.group_seconds else 0,
            "user": first.get("user"),
            "role": first.get("role"),
            "device": first.get("device"),
            "ip": first.get("ip"),
            "host": first.get("host") or "",
            "url": url_text,
            "url_length": url_cut,
            "categories": categories,
            "category": "/".join(categories[:3]) if categories else "listed",
            "rule": first.get("rule"),
            "action": action,
            "verb": ("Bypass" if first.get("kind") == "bypass" else
                     "Blocked" if action == "block" else "Alert"),
            "window": first.get("window"),
            "kind": first.get("kind"),
            "method": first.get("method"),
            "detail": first.get("detail"),
            "first_time": times[0],
            "last_time": times[-1],
            "tz": str(self.tz),
            "attempts": [
                {"time": t, "ref": _line(event_ref(a)), "url": _cut(a.get("url")),
                 "window": _line(a.get("window"))}
                for t, a in zip(times, group.alerts)
            ],
            "refs": [_line(r) for r in group.refs],
            "ref": _line(group.refs[0]),
        }

    def render(self, group: AlertGroup, *, follow_up: bool = False,
               date: datetime | None = None) -> EmailMessage:
        """Subject, plain text and HTML from the templates, as one message."""
        ctx = self.context(group, follow_up=follow_up)
        subject = self._env.get_template("alert_subject.txt.j2").render(ctx)
        text = self._env.get_template("alert.txt.j2").render(ctx)
        html = self._env.get_template("alert.html.j2").render(ctx)
        return build_message(
            sender=self.sender, to=self.to, subject=subject, text=text, html=html,
            message_id=self.message_id(group), date=date,
            headers={"X-Filterd-Ref": group.refs[0], "X-Filterd-Count": str(len(group.alerts))},
        )

    # -- dispatch ------------------------------------------------------------------------------

    def dispatch_once(self, now: float) -> DispatchResult:
        """Send what is due at unix time ``now``; BLOCKING (SQLite + SMTP), run it in a thread."""
        with self._lock:
            return self._dispatch(now)

    def _dispatch(self, now: float) -> DispatchResult:
        result = DispatchResult()
        pending = self.store.pending_alerts(now)
        if not pending:
            return result
        groups = group_alerts(pending, self.group_seconds)
        self._forget(now)
        down: MailError | None = None  # the server is unreachable: don't knock once per group
        for group in groups:
            last = self._last_mail.get(group.key)
            if last is not None and now - last < self.group_seconds:
                result.held += len(group.alerts)
                continue
            if down is not None:
                self._failed(group, down, now, result)
                continue
            msg = self.render(group, follow_up=last is not None,
                              date=datetime.fromtimestamp(now, timezone.utc))
            mid = str(msg["Message-ID"])
            try:
                self.transport.send(msg)
            except Exception as exc:
                error = exc if isinstance(exc, MailError) else TemporaryMailError(
                    f"{type(exc).__name__}: {exc}")  # a bug must not make a hot retry loop
                if not isinstance(exc, MailError):
                    log.exception("alert transport %r failed unexpectedly", self.transport)
                self._failed(group, error, now, result)
                if not isinstance(error, PermanentMailError):
                    down = error
                continue
            # Accepted by the server: from here to the COMMIT below is the only window in
            # which a crash makes a repeat (with this same Message-ID).
            self.store.mark_alerts_sent(group.refs, message_id=mid, sent=now,
                                        group_ref=group.refs[0] if len(group.refs) > 1 else None)
            self._last_mail[group.key] = now
            result.mails += 1
            result.sent += len(group.alerts)
            result.message_ids.append(mid)
            log.info("alert %s sent to %s (%d attempt%s by %s at %s)", mid, ", ".join(self.to),
                     len(group.alerts), "" if len(group.alerts) == 1 else "s", group.key[0], group.key[1])
        return result

    def _forget(self, now: float) -> None:
        """Drop grouping memory older than two intervals (a later mail is no follow-up), bounding it."""
        for key, when in list(self._last_mail.items()):
            if now - when >= 2 * self.group_seconds:
                del self._last_mail[key]

    def _failed(self, group: AlertGroup, exc: MailError, now: float, result: DispatchResult) -> None:
        error = str(exc)
        result.errors.append(error)
        permanent = isinstance(exc, PermanentMailError)
        for alert in group.alerts:
            attempts = int(alert.get("attempts") or 0) + 1
            give_up = permanent or attempts >= self.max_attempts
            delay = backoff_delay(attempts, *self.backoff)
            self.store.mark_alert_failed(event_ref(alert), error=error[:1000],
                                         next_attempt=now + delay, give_up=give_up)
            if give_up:
                result.given_up += 1
                log.critical("ALERT NOT DELIVERED, giving up after %d attempt%s: event %s "
                             "(%s at %s): %s", attempts, "" if attempts == 1 else "s",
                             event_ref(alert), group.key[0], group.key[1], error)
            else:
                result.retry += 1
                log.warning("alert for event %s not sent (attempt %d of %d, next in %.0f s): %s",
                            event_ref(alert), attempts, self.max_attempts, delay, error)


def _line(value: object) -> str | None:
    """One line, control characters removed: a CRLF in a user name cannot forge a line of the
    mail ("Rule: none") any more than a header; no length limit (URLs are cut separately)."""
    if value is None:
        return None
    return header_safe(value, limit=1 << 20)


def _cut(url: object) -> str | None:
    if url is None:
        return None
    text = _line(url) or ""
    return text if len(text) <= URL_LIMIT else text[:URL_LIMIT] + "\u2026"


def build_digest(store, day: date, *, tz: ZoneInfo, sender: str, to: Sequence[str], school: str):
    """ICT's daily digest: the day's blocks, alerts and bypass attempts in one plain mail.

    None when the day had no incidents (no empty mails). The Message-ID names the day, so a
    digest re-sent after a crash is recognisably the same message.
    """
    start = datetime.combine(day, datetime.min.time(), tzinfo=tz)
    end = datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=tz)
    rows = sorted((r for kind in ("block", "alert", "bypass") for r in store.events(since=start, until=end, kind=kind)),
                  key=lambda r: r["ts"])
    if not rows:
        return None
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    lines = [f"{school}: filterd incidents on {day:%A %-d %B %Y} ({summary})", ""]
    for r in rows:
        when = datetime.fromisoformat(r["time"]).astimezone(tz).strftime("%H:%M:%S")
        lines.append(f"{when}  {r['kind']:<6} {header_safe(r['user'] or '-', 40):<16} {r['ip'] or '-':<15} "
                     f"{header_safe(r['host'], 80)}  rule={r['rule'] or '-'} ref={r['ref']}")
    return build_message(sender=sender, to=list(to), subject=header_safe(f"[filterd] Daily digest {day}: {summary}"),
                         text="\n".join(lines) + "\n",
                         message_id=f"<digest-{day.isoformat()}@{sender_domain(sender)}>")
