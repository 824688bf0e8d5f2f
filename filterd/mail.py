"""Sending mail: SMTP (STARTTLS, implicit TLS, AUTH) or a maildir outbox a person can open.

Everything that sends mail (alerts, the weekly report, ``filterd mail test``) goes through one
small interface, :class:`Transport`, whose ``send`` either returns (the server accepted the
message: SMTP 250 after DATA, or the file is in the maildir) or raises one of two errors:

- :class:`TemporaryMailError`: try again later (4xx replies, connection refused or timed out,
  TLS or AUTH setup problems that a person can fix without losing the message);
- :class:`PermanentMailError`: this message will never be accepted (5xx to MAIL, RCPT or DATA).

Passwords are never in the config file: ``password_file`` is a path, or
``credential:NAME`` for a systemd credential (``LoadCredential=NAME:/etc/filterd/smtp-password``
puts it in ``$CREDENTIALS_DIRECTORY/NAME``). All of this is blocking I/O: call it from a worker
thread, never from mitmproxy's event loop.
"""

from __future__ import annotations

import ast
import base64
import logging
import mailbox
import os
import re
import smtplib
import socket
import ssl
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Literal, Protocol

from filterd.errors import FilterdError

log = logging.getLogger("filterd.mail")

Security = Literal["none", "starttls", "tls"]
SECURITIES: tuple[str, ...] = ("none", "starttls", "tls")
#: The prefix of a ``password_file`` value that names a systemd credential instead of a path.
CREDENTIAL_PREFIX = "credential:"


class MailError(Exception):
    """A message was not accepted; the subclass says whether trying again can help."""


class TemporaryMailError(MailError):
    """Try again later: 4xx, connection refused or timed out, TLS/AUTH setup problems."""


class PermanentMailError(MailError):
    """The server refused this message for good (5xx to MAIL FROM, RCPT TO or DATA)."""


class Transport(Protocol):
    """Anything that can deliver one message; returns only once it was accepted."""

    def send(self, msg: EmailMessage) -> None: ...


# ---------------------------------------------------------------------------------------------
# Messages


_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\x85]+")


def header_safe(value: object, limit: int = 200) -> str:
    """One line of text fit for a header: control characters (CR, LF, ...) become spaces.

    A user name or URL with CRLF in it must never start a header of its own (``Bcc:``);
    long values are cut so that a 10 kB URL cannot make a 10 kB subject.
    """
    text = " ".join(_CONTROL.sub(" ", str(value)).split())
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return text


def sender_domain(sender: str) -> str:
    """The domain of ``sender`` (``filterd@school.example`` -> ``school.example``), for Message-IDs."""
    if "@" not in sender:
        return "filterd.invalid"
    domain = sender.rpartition("@")[2].strip().strip(">").lower()
    if not domain or not re.fullmatch(r"[a-z0-9.-]+", domain):
        domain = "filterd.invalid"
    return domain


def build_message(
    *,
    sender: str,
    to: Sequence[str],
    subject: str,
    text: str,
    html: str | None = None,
    message_id: str,
    date: datetime | None = None,
    headers: Mapping[str, str] | None = None,
) -> EmailMessage:
    """A plain-text (+ optional HTML alternative) message with the Message-ID the caller chose.

    The Message-ID is passed in, never random, so that a repeat after a crash carries the same
    one and can be recognised (see :mod:`filterd.alerts`). Every header value goes through
    :func:`header_safe`.
    """
    if not to:
        raise ValueError("a message needs at least one recipient")
    msg = EmailMessage()
    msg["From"] = header_safe(sender)
    msg["To"] = ", ".join(header_safe(t) for t in to)
    msg["Subject"] = header_safe(subject, limit=250)
    msg["Date"] = format_datetime(date or datetime.now(timezone.utc))
    mid = header_safe(message_id)
    msg["Message-ID"] = mid if mid.startswith("<") else f"<{mid}>"
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to the daemon
    for name, value in (headers or {}).items():
        msg[header_safe(name, 60)] = header_safe(value)
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    return msg


# ---------------------------------------------------------------------------------------------
# Passwords


def read_password(spec: str, *, environ: Mapping[str, str] | None = None) -> str:
    """The password named by ``spec``: a file path, or ``credential:NAME`` (systemd).

    Only the first line counts (files usually end with a newline). Errors name the file but
    never show its content.
    """
    env = os.environ if environ is None else environ
    if spec.startswith(CREDENTIAL_PREFIX):
        name = spec[len(CREDENTIAL_PREFIX):]
        if not name or "/" in name or name in (".", ".."):
            raise FilterdError(f"bad systemd credential name {name!r}", field="mail.password_file")
        directory = env.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise FilterdError(
                f"password_file is {spec!r} but $CREDENTIALS_DIRECTORY is not set "
                "(use LoadCredential= in the systemd unit)", field="mail.password_file")
        path = Path(directory) / name
    else:
        path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FilterdError(f"cannot read the SMTP password: {exc.strerror}", file=path,
                           field="mail.password_file") from None
    lines = text.splitlines()
    password = lines[0] if lines else ""
    if not password:
        raise FilterdError("the SMTP password file is empty", file=path, field="mail.password_file")
    return password


# ---------------------------------------------------------------------------------------------
# SMTP


class _TranscriptMixin:
    """Collects smtplib's debug output as ``C:``/``S:`` lines, with credentials hidden.

    smtplib prints every command and reply through ``_print_debug`` when ``debuglevel`` > 0;
    we keep them in a list instead. After an ``AUTH`` command every client line is replaced
    until the server ends the exchange (any reply other than 334), so neither AUTH PLAIN's
    base64 nor AUTH LOGIN's user/password lines ever reach the transcript.
    """

    transcript: list[str]
    _in_auth: bool
    _in_data: bool

    def _init_transcript(self) -> None:
        self.transcript = []
        self._in_auth = False
        self._in_data = False

    def _print_debug(self, *args: object) -> None:
        if not hasattr(self, "transcript"):
            self._init_transcript()
        if not args:
            return
        what = str(args[0])
        rest = args[1:]
        if what == "send:" and rest:
            self._client(_unrepr(rest[0]))
        elif what == "reply:" and rest:
            line = _unrepr(rest[0]).rstrip("\r\n")
            self.transcript.append("S: " + line)
            code = line[:3]
            if self._in_auth and code != "334" and (len(line) < 4 or line[3] != "-"):
                self._in_auth = False
            if code == "354":
                self._in_data = True
        elif what.startswith("reply: retcode"):
            return  # the same reply again, parsed
        elif what in ("connect: to", "connect:") and rest and isinstance(rest[0], tuple):
            address = rest[0]
            if isinstance(address, tuple) and len(address) == 2:
                address = f"{address[0]}:{address[1]}"
            self.transcript.append(f"* connecting to {address}")
        elif what == "connect:":
            return  # the greeting again, already shown as "S: 220 ..."
        elif what == "data:":
            return  # smtplib repeats the DATA reply here
        else:
            self.transcript.append("* " + " ".join(str(a) for a in args))

    def _client(self, data: str) -> None:
        if self._in_data:
            self._in_data = False
            size = len(data.encode("utf-8", "replace"))
            self.transcript.append(f"C: <message, {size} bytes>")
            return
        for line in data.splitlines() or [""]:
            word = line.split(" ", 1)[0].upper()
            if word == "AUTH":
                mechanism = line.split(" ", 2)[1] if " " in line else ""
                self.transcript.append(f"C: AUTH {mechanism} [credentials hidden]")
                self._in_auth = True
            elif self._in_auth:
                self.transcript.append("C: [credentials hidden]")
            else:
                self.transcript.append("C: " + line)


def _unrepr(value: object) -> str:
    """smtplib passes ``repr(bytes)``; turn it back into text for a person to read."""
    text = str(value)
    try:
        obj = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    return str(obj)


class _SMTP(_TranscriptMixin, smtplib.SMTP):
    pass


class _SMTP_SSL(_TranscriptMixin, smtplib.SMTP_SSL):
    pass


class SmtpTransport:
    """Deliver through an SMTP server, with certificate-verified STARTTLS or implicit TLS.

    ``security``: ``none`` (port 25 on a trusted LAN relay), ``starttls`` (port 587; the
    connection is refused, never downgraded, if the server does not offer STARTTLS) or ``tls``
    (port 465). ``ca_file`` adds a CA to trust (a school's own CA; trustme in tests); the system
    store is used otherwise. ``username`` with ``password_file`` logs in (see :func:`read_password`).
    """

    def __init__(
        self,
        host: str,
        port: int = 25,
        security: Security = "none",
        username: str | None = None,
        password_file: str | None = None,
        timeout: float = 30,
        ca_file: str | Path | None = None,
        local_hostname: str | None = None,
    ) -> None:
        if security not in SECURITIES:
            raise FilterdError(f"must be one of {', '.join(SECURITIES)}, not {security!r}",
                               field="mail.security")
        if username and not password_file:
            raise FilterdError("username needs password_file", field="mail.password_file")
        self.host = host
        self.port = port
        self.security = security
        self.username = username
        self.password_file = password_file
        self.timeout = timeout
        self.ca_file = str(ca_file) if ca_file else None
        self.local_hostname = local_hostname

    def __repr__(self) -> str:
        auth = f" as {self.username}" if self.username else ""
        return f"SmtpTransport({self.host}:{self.port} {self.security}{auth})"

    def _context(self) -> ssl.SSLContext:
        """Verify the certificate and the host name, like a mail client would."""
        return ssl.create_default_context(cafile=self.ca_file)

    def _connect(self, debug: bool) -> smtplib.SMTP:
        """Connect, say EHLO, upgrade to TLS and log in; errors become MailError subclasses."""
        level = 1 if debug else 0
        smtp: smtplib.SMTP | None = None
        try:
            if self.security == "tls":
                smtp = _SMTP_SSL(local_hostname=self.local_hostname, timeout=self.timeout,
                                 context=self._context())
            else:
                smtp = _SMTP(local_hostname=self.local_hostname, timeout=self.timeout)
            smtp._host = self.host  # the name TLS verifies (smtplib sets it only in __init__)
            smtp._init_transcript()  # type: ignore[attr-defined]
            smtp.set_debuglevel(level)
            smtp.connect(self.host, self.port)
            smtp.ehlo()
            if self.security == "starttls":
                if not smtp.has_extn("starttls"):
                    raise TemporaryMailError(
                        f"{self.host}:{self.port} does not offer STARTTLS; refusing to send in "
                        "clear text (set security = \"none\" only for a trusted relay)")
                smtp.starttls(context=self._context())
                self._note_tls(smtp)
                smtp.ehlo()
            elif self.security == "tls":
                self._note_tls(smtp)
            if self.username:
                password = read_password(self.password_file or "")
                try:
                    smtp.login(self.username, password)
                finally:
                    del password
            return smtp
        except Exception as exc:
            error: Exception = exc
            if isinstance(exc, FilterdError):  # e.g. the password file is missing: fixable
                error = TemporaryMailError(str(exc))
            elif not isinstance(exc, MailError):
                error = _classify(exc, f"{self.host}:{self.port}")
            if smtp is not None:
                error.transcript = list(getattr(smtp, "transcript", []))  # type: ignore[attr-defined]
                _close(smtp)
            if error is exc:
                raise
            raise error from exc

    def _note_tls(self, smtp: smtplib.SMTP) -> None:
        sock = smtp.sock
        if isinstance(sock, ssl.SSLSocket) and hasattr(smtp, "transcript"):
            smtp.transcript.append(f"* TLS {sock.version()}, certificate verified for {self.host}")

    def send(self, msg: EmailMessage) -> None:
        """Deliver ``msg`` to its To/Cc recipients; returns once the server said 250 to DATA."""
        smtp = self._connect(debug=False)
        try:
            self._send(smtp, msg)
        finally:
            _close(smtp)

    def _send(self, smtp: smtplib.SMTP, msg: EmailMessage) -> None:
        try:
            refused = smtp.send_message(msg)
        except Exception as exc:
            raise _classify(exc, f"{self.host}:{self.port}") from exc
        if refused:
            # Accepted for some recipients: the message is delivered, so it must not be sent
            # again (that would duplicate it for the others); say loudly who did not get it.
            log.error("%s: message %s refused for %s", self, msg["Message-ID"],
                      ", ".join(f"{rcpt} ({code} {_text(text)})" for rcpt, (code, text) in refused.items()))

    def transcript_send(self, msg: EmailMessage) -> str:
        """Send ``msg`` and return the SMTP conversation (AUTH credentials hidden)."""
        try:
            smtp = self._connect(debug=True)
        except MailError as exc:
            lines = getattr(exc, "transcript", [])
            return self._finish(lines, f"FAILED: {exc}", ok=False)
        try:
            self._send(smtp, msg)
        except MailError as exc:
            _close(smtp)
            return self._finish(smtp.transcript, f"FAILED: {exc}", ok=False)  # type: ignore[attr-defined]
        _close(smtp)
        return self._finish(smtp.transcript, f"OK: accepted by {self.host}:{self.port}", ok=True)  # type: ignore[attr-defined]

    def _finish(self, lines: Sequence[str], verdict: str, *, ok: bool) -> str:
        head = f"# {self!r}"
        text = "\n".join([head, *lines, verdict]) + "\n"
        return self._scrub(text)

    def _scrub(self, text: str) -> str:
        """Belt and braces: the password (and its base64 forms) never appear in a transcript."""
        if not (self.username and self.password_file):
            return text
        try:
            password = read_password(self.password_file)
        except FilterdError:
            return text
        secrets = {password, base64.b64encode(password.encode()).decode(),
                   base64.b64encode(f"\0{self.username}\0{password}".encode()).decode()}
        for secret in secrets:
            if secret:
                text = text.replace(secret, "[hidden]")
        return text


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _close(smtp: smtplib.SMTP) -> None:
    """QUIT politely, but never let closing turn a success into a failure."""
    try:
        smtp.quit()
    except Exception:
        try:
            smtp.close()
        except Exception:
            pass


def _classify(exc: Exception, where: str) -> MailError:
    """Sort an smtplib/socket/ssl error into temporary or permanent."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        detail = "; ".join(f"{rcpt}: {code} {_text(text)}" for rcpt, (code, text) in exc.recipients.items())
        if codes and all(400 <= c < 500 for c in codes):
            return TemporaryMailError(f"{where}: recipients deferred: {detail}")
        return PermanentMailError(f"{where}: recipients refused: {detail}")
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        # A wrong password is fixed by a person, not by the message: keep it for later.
        return TemporaryMailError(f"{where}: authentication failed: {exc.smtp_code} {_text(exc.smtp_error)}")
    if isinstance(exc, smtplib.SMTPResponseException):
        code = exc.smtp_code
        text = f"{where}: {code} {_text(exc.smtp_error)}"
        if 500 <= code < 600:
            return PermanentMailError(text)
        return TemporaryMailError(text)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TemporaryMailError(f"{where}: TLS certificate not trusted: {exc.verify_message}")
    if isinstance(exc, ConnectionRefusedError):
        return TemporaryMailError(f"{where}: connection refused")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return TemporaryMailError(f"{where}: timed out")
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return TemporaryMailError(f"{where}: {exc}")
    if isinstance(exc, (OSError, smtplib.SMTPException)):
        return TemporaryMailError(f"{where}: {type(exc).__name__}: {exc}")
    return TemporaryMailError(f"{where}: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------
# Maildir


class MaildirTransport:
    """The embedded default: each message becomes a file in a maildir (``new/``).

    Any mail client (mutt -f, Thunderbird's maildir support) or ``ls outbox/new`` opens it.
    mailbox.Maildir writes to ``tmp/`` and renames into ``new/``, so a crash never leaves a
    half message where a reader looks.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"MaildirTransport({self.path})"

    def send(self, msg: EmailMessage) -> None:
        """Store ``msg``; an unwritable folder is temporary (a person can fix it)."""
        try:
            box = mailbox.Maildir(self.path, create=True)
            box.add(msg)
        except OSError as exc:
            raise TemporaryMailError(f"maildir {self.path}: {exc.strerror or exc}") from exc

    def transcript_send(self, msg: EmailMessage) -> str:
        try:
            box = mailbox.Maildir(self.path, create=True)
            key = box.add(msg)
        except OSError as exc:
            return f"# {self!r}\nFAILED: {exc.strerror or exc}\n"
        return f"# {self!r}\nOK: written to {self.path / 'new' / key}\n"


def make_transport(*, outbox: str | Path, smtp_host: str = "", smtp_port: int = 25,
                   security: str = "none", username: str = "", password_file: str = "",
                   ca_file: str | Path = "", timeout_seconds: float = 30.0) -> Transport:
    """The transport ``[mail]`` asks for: SMTP when ``smtp_host`` is set, else the maildir.

    Keyword names are the ``[mail]`` keys; paths must already be resolved against the config
    file's folder (``password_file`` may be ``credential:NAME``, which is not a path).
    """
    if not smtp_host:
        return MaildirTransport(outbox)
    return SmtpTransport(smtp_host, smtp_port, security, username=username or None,  # type: ignore[arg-type]
                         password_file=str(password_file) if password_file else None,
                         timeout=timeout_seconds, ca_file=ca_file or None)


# ---------------------------------------------------------------------------------------------
# filterd mail test


def test_message(sender: str, to: Sequence[str], *, now: datetime | None = None) -> EmailMessage:
    """The message ``filterd mail test`` sends."""
    now = now or datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%S")
    return build_message(
        sender=sender, to=to, subject="[filterd] test message",
        text=("This is a test message from filterd.\n\n"
              "If you can read it, alert and report mail will reach this address.\n"),
        message_id=f"<test-{stamp}-{os.getpid()}@{sender_domain(sender)}>", date=now)


def mail_test(transport: Transport, sender: str, to: Sequence[str] | str) -> str:
    """Send a test message and return a readable account of how it went.

    For SMTP that is the whole conversation (``C:`` client, ``S:`` server lines; the AUTH
    exchange is shown as ``[credentials hidden]``), ending with ``OK: ...`` or ``FAILED: ...``.
    """
    recipients = [to] if isinstance(to, str) else list(to)
    msg = test_message(sender, recipients)
    transcript = getattr(transport, "transcript_send", None)
    if transcript is not None:
        return transcript(msg)
    try:
        transport.send(msg)
    except MailError as exc:
        return f"# {transport!r}\nFAILED: {exc}\n"
    return f"# {transport!r}\nOK: accepted\n"


# Keep pytest from collecting test_message as a test when it is imported into a test module.
test_message.__test__ = False  # type: ignore[attr-defined]
