"""filterd.mail against a real aiosmtpd server on 127.0.0.1: plain, STARTTLS, TLS, AUTH, errors."""

from __future__ import annotations

import base64
import email
import mailbox
import socket
import ssl
from email.policy import default as default_policy
from pathlib import Path

import pytest

from tests.net import free_port
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from filterd.errors import FilterdError
from filterd.mail import (
    MaildirTransport,
    PermanentMailError,
    SmtpTransport,
    TemporaryMailError,
    build_message,
    header_safe,
    mail_test,
    make_transport,
    read_password,
    sender_domain,
)

USER, PASSWORD = "filterd", "s3cret-Pa55word!"



class Recorder:
    """An aiosmtpd handler that keeps what it accepted and can be told to refuse."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.rcpt_reply: str | None = None
        self.data_reply: str | None = None

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply:
            return self.data_reply
        self.messages.append(email.message_from_bytes(envelope.original_content or envelope.content,
                                                      policy=default_policy))
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 Message accepted for delivery"


def authenticator(server, session, envelope, mechanism, auth_data):
    ok = (isinstance(auth_data, LoginPassword) and auth_data.login == USER.encode()
          and auth_data.password == PASSWORD.encode())
    return AuthResult(success=ok, handled=False)


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, path


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture
def smtpd(request):
    """Start a server: ``smtpd(**SMTP_parameters) -> (Recorder, port)``; stopped after the test."""
    controllers: list[Controller] = []

    def start(*, ssl_context=None, **params):
        handler = Recorder()
        port = free_port()
        controller = Controller(handler, hostname="127.0.0.1", port=port, ssl_context=ssl_context,
                                **params)
        controller.start()
        controllers.append(controller)
        return handler, port

    yield start
    for controller in controllers:
        controller.stop()


def message(mid: str = "<alert-ABC@school.example>"):
    return build_message(sender="filterd@school.example", to=["ict@school.example"],
                         subject="[filterd] hello", text="plain body\n",
                         html="<p>html body</p>\n", message_id=mid)


def test_plain_delivery_keeps_headers_and_both_parts(smtpd):
    handler, port = smtpd()
    SmtpTransport("127.0.0.1", port, "none", timeout=5).send(message())
    assert len(handler.messages) == 1
    got = handler.messages[0]
    assert got["Message-ID"] == "<alert-ABC@school.example>"
    assert got["Subject"] == "[filterd] hello"
    assert got["From"] == "filterd@school.example"
    assert handler.envelopes[0] == ("filterd@school.example", ["ict@school.example"])
    assert got.get_body(("plain",)).get_content().replace("\r\n", "\n") == "plain body\n"
    assert got.get_body(("html",)).get_content().replace("\r\n", "\n") == "<p>html body</p>\n"


def test_starttls_verifies_with_ca_file(smtpd, ca):
    authority, ca_file = ca
    handler, port = smtpd(tls_context=server_context(authority), require_starttls=True)
    SmtpTransport("127.0.0.1", port, "starttls", timeout=5, ca_file=ca_file).send(message())
    assert len(handler.messages) == 1
    # Without our CA the certificate is not trusted: a temporary error, nothing sent in clear.
    with pytest.raises(TemporaryMailError, match="not trusted"):
        SmtpTransport("127.0.0.1", port, "starttls", timeout=5).send(message())
    assert len(handler.messages) == 1


def test_starttls_refuses_to_downgrade(smtpd):
    handler, port = smtpd()  # no tls_context: the server offers no STARTTLS
    with pytest.raises(TemporaryMailError, match="does not offer STARTTLS"):
        SmtpTransport("127.0.0.1", port, "starttls", timeout=5).send(message())
    assert handler.messages == []


def test_implicit_tls(smtpd, ca):
    authority, ca_file = ca
    handler, port = smtpd(ssl_context=server_context(authority))
    transport = SmtpTransport("localhost", port, "tls", timeout=5, ca_file=ca_file)
    transport.send(message())
    assert [m["Message-ID"] for m in handler.messages] == ["<alert-ABC@school.example>"]
    transcript = mail_test(transport, "filterd@school.example", "ict@school.example")
    assert f"* connecting to localhost:{port}" in transcript and "* TLS TLSv1." in transcript
    assert transcript.rstrip().endswith(f"OK: accepted by localhost:{port}")


@pytest.mark.parametrize("exclude", [["LOGIN"], ["PLAIN"]], ids=["plain", "login"])
def test_auth_with_password_file_and_hidden_transcript(smtpd, ca, tmp_path, exclude):
    authority, ca_file = ca
    handler, port = smtpd(tls_context=server_context(authority), require_starttls=True,
                          authenticator=authenticator, auth_required=True,
                          auth_exclude_mechanism=exclude)
    pw = tmp_path / "smtp-password"
    pw.write_text(PASSWORD + "\n")
    transport = SmtpTransport("127.0.0.1", port, "starttls", username=USER, password_file=str(pw),
                              timeout=5, ca_file=ca_file)
    transcript = mail_test(transport, "filterd@school.example", ["ict@school.example"])
    assert len(handler.messages) == 1
    assert handler.messages[0]["Subject"] == "[filterd] test message"
    mechanism = "LOGIN" if exclude == ["PLAIN"] else "PLAIN"
    assert f"C: AUTH {mechanism} [credentials hidden]" in transcript
    assert "S: 235" in transcript
    assert "C: STARTTLS" in transcript and "C: <message," in transcript
    assert f"* connecting to 127.0.0.1:{port}" in transcript
    assert "* TLS TLSv1." in transcript and "certificate verified for 127.0.0.1" in transcript
    assert transcript.rstrip().splitlines()[-1].startswith("OK:")
    for secret in (PASSWORD, base64.b64encode(PASSWORD.encode()).decode(),
                   base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()):
        assert secret not in transcript


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_wrong_password_is_temporary_and_reported(smtpd, tmp_path):
    handler, port = smtpd(authenticator=authenticator, auth_required=True, auth_require_tls=False)
    pw = tmp_path / "pw"
    pw.write_text("wrong\n")
    transport = SmtpTransport("127.0.0.1", port, "none", username=USER, password_file=str(pw), timeout=5)
    with pytest.raises(TemporaryMailError, match="authentication failed: 535"):
        transport.send(message())
    transcript = mail_test(transport, "filterd@school.example", "ict@school.example")
    assert "FAILED: " in transcript and "535" in transcript and "wrong" not in transcript
    pw.unlink()  # a missing password file is a fixable setup problem, named in the error
    with pytest.raises(TemporaryMailError, match="cannot read the SMTP password"):
        transport.send(message())
    assert "FAILED: " in mail_test(transport, "filterd@school.example", "ict@school.example")
    assert handler.messages == []


def test_server_down_is_temporary():
    transport = SmtpTransport("127.0.0.1", free_port(), "none", timeout=5)
    with pytest.raises(TemporaryMailError, match="connection refused"):
        transport.send(message())
    assert "FAILED: " in mail_test(transport, "filterd@school.example", "ict@school.example")


@pytest.mark.parametrize("where, reply, error", [
    ("rcpt", "450 4.2.1 mailbox busy", TemporaryMailError),
    ("rcpt", "550 5.1.1 no such user", PermanentMailError),
    ("data", "451 4.3.0 try later", TemporaryMailError),
    ("data", "554 5.7.1 rejected as spam", PermanentMailError),
])
def test_smtp_replies_are_classified(smtpd, where, reply, error):
    handler, port = smtpd()
    setattr(handler, f"{where}_reply", reply)
    with pytest.raises(error, match=reply.split()[0]):
        SmtpTransport("127.0.0.1", port, "none", timeout=5).send(message())
    assert handler.messages == []


def test_maildir_outbox(tmp_path):
    outbox = tmp_path / "outbox"
    transport = MaildirTransport(outbox)
    transport.send(message("<alert-M1@school.example>"))
    box = mailbox.Maildir(outbox, create=False)
    assert [m["Message-ID"] for m in box] == ["<alert-M1@school.example>"]
    assert len(list((outbox / "new").iterdir())) == 1
    assert "OK: written to" in mail_test(transport, "filterd@school.example", "ict@school.example")
    assert len(box) == 2


def test_maildir_unwritable_is_temporary(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(TemporaryMailError):
        MaildirTransport(blocker / "outbox").send(message())


def test_read_password_file_and_credential(tmp_path):
    (tmp_path / "smtp-password").write_text("pw-from-systemd\nignored\n")
    assert read_password(str(tmp_path / "smtp-password")) == "pw-from-systemd"
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert read_password("credential:smtp-password", environ=env) == "pw-from-systemd"
    with pytest.raises(FilterdError, match="CREDENTIALS_DIRECTORY is not set"):
        read_password("credential:smtp-password", environ={})
    with pytest.raises(FilterdError, match="bad systemd credential name"):
        read_password("credential:../etc/shadow", environ=env)
    with pytest.raises(FilterdError, match="cannot read"):
        read_password(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("")
    with pytest.raises(FilterdError, match="empty"):
        read_password(str(tmp_path / "empty"))


@pytest.mark.parametrize("value, expected", [
    ("plain", "plain"),
    ("jdoe\r\nBcc: victim@example.com", "jdoe Bcc: victim@example.com"),
    ("a\nb\x00c\u2028d", "a b c d"),
    ("x" * 300, "x" * 199 + "\u2026"),
])
def test_header_safe(value, expected):
    assert header_safe(value) == expected


def test_build_message_cannot_be_injected():
    msg = build_message(sender="filterd@school.example", to=["ict@school.example"],
                        subject="hi\r\nBcc: evil@example.com", text="x", message_id="m1@x")
    raw = msg.as_bytes()
    assert b"\nBcc:" not in raw and msg["Bcc"] is None
    assert msg["Message-ID"] == "<m1@x>"


@pytest.mark.parametrize("sender, domain", [
    ("filterd@school.example", "school.example"),
    ("Filterd <filterd@School.Example>", "school.example"),
    ("nobody", "filterd.invalid"),
])
def test_sender_domain(sender, domain):
    assert sender_domain(sender) == domain


def test_make_transport_from_mail_keys(tmp_path):
    assert isinstance(make_transport(outbox=tmp_path / "outbox"), MaildirTransport)
    smtp = make_transport(outbox=tmp_path, smtp_host="mail.school.example", smtp_port=587,
                          security="starttls", username="filterd", password_file="credential:smtp",
                          timeout_seconds=10)
    assert isinstance(smtp, SmtpTransport)
    assert (smtp.port, smtp.security, smtp.password_file, smtp.timeout) == (587, "starttls", "credential:smtp", 10)
    with pytest.raises(FilterdError, match="mail.security"):
        make_transport(outbox=tmp_path, smtp_host="x", security="ssl")
