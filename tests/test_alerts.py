"""filterd.alerts end to end: a real Store, a real aiosmtpd server, real child processes for kill -9."""

from __future__ import annotations

import asyncio
import email
import logging
import mailbox
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timezone
from email.policy import default as default_policy
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from tests.net import free_port
from aiosmtpd.controller import Controller

from filterd.alerts import AlertDispatcher, AlertGroup, backoff_delay, group_alerts
from filterd.mail import MaildirTransport, SmtpTransport
from filterd.record import Store
from filterd.verdict import Match, Verdict, What, Who

LONDON = ZoneInfo("Europe/London")
SENDER = "filterd@school.example"
ICT = ["ict@school.example"]



class Recorder:
    """aiosmtpd handler: keeps accepted messages; can refuse, or hang before accepting."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.data_reply: str | None = None
        self.hang = False
        self.data_seen = threading.Event()
        self.release = threading.Event()

    async def handle_DATA(self, server, session, envelope):
        if self.hang:  # got the whole message but never says 250 (until released)
            self.data_seen.set()
            while not self.release.is_set():
                await asyncio.sleep(0.02)
            return "451 4.3.0 too late"
        if self.data_reply:
            return self.data_reply
        self.messages.append(email.message_from_bytes(envelope.original_content or envelope.content,
                                                      policy=default_policy))
        return "250 Message accepted for delivery"

    def ids(self) -> list[str]:
        return [m["Message-ID"] for m in self.messages]


@pytest.fixture
def smtpd():
    controllers: list[Controller] = []

    def start(port: int | None = None) -> tuple[Recorder, int]:
        handler = Recorder()
        port = port or free_port()
        controller = Controller(handler, hostname="127.0.0.1", port=port)
        controller.start()
        controllers.append(controller)
        return handler, port

    yield start
    for controller in controllers:
        controller.stop()


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "filterd.db").open() as s:
        yield s


def incident(*, user="jdoe", host="example.com", at: float | None = None, url=None, role="pupil",
             category="terrorism", action="block", device="aa:bb:cc:dd:ee:ff", ip="10.20.1.5") -> Verdict:
    when = datetime.fromtimestamp(at if at is not None else time.time(), timezone.utc).astimezone(LONDON)
    return Verdict(
        time=when, who=Who(ip=ip, user=user, role=role, device=device, source="auth"),
        what=What(host=host, url=url or f"http://{host}/page", categories=(category,),
                  matches=(Match("ut1", category, host),)),
        window="contact", action=action, alert=True, rule="terrorism")


def commit(store: Store, verdict: Verdict) -> Verdict:
    store.commit_incident(verdict).result(timeout=10)
    return verdict


def dispatcher(store, transport, **kw) -> AlertDispatcher:
    kw.setdefault("group_seconds", 600)
    return AlertDispatcher(store, transport, sender=SENDER, to=ICT, tz=LONDON,
                           school="Example Academy", **kw)


def states(store: Store) -> dict[str, tuple[str, int]]:
    return {a["event_ref"]: (a["state"], a["attempts"]) for a in store.alerts()}


def test_alert_mail_says_who_what_when_and_is_marked_sent(store, smtpd):
    handler, port = smtpd()
    v = commit(store, incident(at=time.time() - 5))
    d = dispatcher(store, SmtpTransport("127.0.0.1", port, timeout=5))
    result = d.dispatch_once(time.time())
    assert (result.mails, result.sent) == (1, 1)
    [msg] = handler.messages
    assert msg["Message-ID"] == f"<alert-{v.ref}@school.example>"
    assert msg["Subject"] == "[filterd] Blocked: pupil jdoe tried terrorism site example.com"
    assert msg["To"] == "ict@school.example" and msg["From"] == SENDER
    text = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    local = v.time.astimezone(LONDON).strftime("%H:%M:%S")
    for needle in ("jdoe", "pupil", "aa:bb:cc:dd:ee:ff", "10.20.1.5", "http://example.com/page",
                   "terrorism", "contact", v.ref, local, "Europe/London", "Example Academy"):
        assert needle in text, needle
        assert needle in html, needle
    assert states(store) == {v.ref: ("sent", 1)}
    assert store.alerts()[0]["message_id"] == msg["Message-ID"]
    assert d.dispatch_once(time.time() + 1).mails == 0  # nothing pending: no repeat
    assert len(handler.messages) == 1


def test_grouping_same_user_and_host_within_interval(store, smtpd):
    handler, port = smtpd()
    t0 = time.time() - 700
    same = [commit(store, incident(at=t0 + dt)) for dt in (0, 120, 500)]
    other_host = commit(store, incident(at=t0 + 130, host="other.example"))
    later = commit(store, incident(at=t0 + 650))  # more than 600 s after the first: a new group
    d = dispatcher(store, SmtpTransport("127.0.0.1", port, timeout=5))
    result = d.dispatch_once(time.time())
    assert result.mails == 2 and result.sent == 4 and result.held == 1
    by_id = {m["Message-ID"]: m for m in handler.messages}
    grouped = by_id[f"<alert-{same[0].ref}@school.example>"]
    assert grouped["Subject"] == "[filterd] Blocked x3: pupil jdoe tried terrorism site example.com"
    assert grouped["X-Filterd-Count"] == "3"
    body = grouped.get_body(("plain",)).get_content()
    assert "3 attempts" in body and all(v.ref in body for v in same)
    assert f"<alert-{other_host.ref}@school.example>" in by_id
    st = states(store)
    assert st[same[0].ref][0] == "sent" and {st[v.ref][0] for v in same[1:]} == {"grouped"}
    assert st[other_host.ref][0] == "sent"
    assert st[later.ref] == ("pending", 0)  # held: jdoe was mailed about example.com just now
    # once the interval has passed, the held attempt goes out as a follow-up
    result = d.dispatch_once(time.time() + 601)
    assert result.mails == 1
    follow = handler.messages[-1]
    assert follow["Message-ID"] == f"<alert-{later.ref}@school.example>"
    assert "Further attempts" in follow.get_body(("plain",)).get_content()


def test_group_alerts_is_pure_and_ordered():
    rows = [{"event_ref": r, "ts": ts, "user": u, "host": h}
            for r, ts, u, h in [("C", 30, "a", "x"), ("A", 10, "a", "x"), ("B", 20, None, "x"),
                                ("D", 700, "a", "x")]]
    groups = group_alerts(rows, 600)
    assert [g.refs for g in groups] == [["A", "C"], ["B"], ["D"]]
    assert [g.refs for g in group_alerts(rows, 0)] == [["A"], ["B"], ["C"], ["D"]]


@pytest.mark.parametrize("attempts, delay", [(1, 30), (2, 60), (3, 120), (8, 3600), (20, 3600)])
def test_backoff_doubles_and_is_capped(attempts, delay):
    assert backoff_delay(attempts) == delay


def test_server_down_then_up_retries_with_backoff(store, smtpd):
    port = free_port()  # nothing listens yet
    v = commit(store, incident())
    d = dispatcher(store, SmtpTransport("127.0.0.1", port, timeout=5))
    now = time.time()
    result = d.dispatch_once(now)
    assert (result.mails, result.retry) == (0, 1) and "connection refused" in result.errors[0]
    [row] = store.alerts()
    assert (row["state"], row["attempts"]) == ("pending", 1)
    assert row["next_attempt"] == pytest.approx(now + 30)
    assert store.pending_alerts(now + 29) == []
    handler, _ = smtpd(port)
    assert d.dispatch_once(now + 30).mails == 1
    assert handler.ids() == [f"<alert-{v.ref}@school.example>"]
    assert states(store) == {v.ref: ("sent", 2)}


def test_4xx_is_retried_then_given_up_after_max_attempts(store, smtpd, caplog):
    handler, port = smtpd()
    handler.data_reply = "451 4.3.0 try again later"
    v = commit(store, incident())
    d = dispatcher(store, SmtpTransport("127.0.0.1", port, timeout=5), max_attempts=3)
    now = time.time()
    assert d.dispatch_once(now).retry == 1
    assert store.alerts()[0]["next_attempt"] == pytest.approx(now + 30)
    assert d.dispatch_once(now + 30).retry == 1
    assert store.alerts()[0]["next_attempt"] == pytest.approx(now + 30 + 60)
    with caplog.at_level(logging.CRITICAL, logger="filterd.alerts"):
        assert d.dispatch_once(now + 90).given_up == 1
    assert states(store) == {v.ref: ("failed", 3)}
    assert "451" in store.alerts()[0]["last_error"]
    assert any("ALERT NOT DELIVERED" in r.getMessage() for r in caplog.records)
    assert d.dispatch_once(now + 10_000).mails == 0 and handler.messages == []


def test_5xx_is_given_up_at_once(store, smtpd, caplog):
    handler, port = smtpd()
    handler.data_reply = "554 5.7.1 message refused"
    v = commit(store, incident())
    ok = commit(store, incident(user="asmith", host="other.example"))
    d = dispatcher(store, SmtpTransport("127.0.0.1", port, timeout=5))
    with caplog.at_level(logging.CRITICAL, logger="filterd.alerts"):
        result = d.dispatch_once(time.time())
    assert result.given_up == 2  # a 5xx is about the message: the next group is still tried
    assert states(store) == {v.ref: ("failed", 1), ok.ref: ("failed", 1)}
    assert sum("ALERT NOT DELIVERED" in r.getMessage() for r in caplog.records) == 2


def test_hostile_values_are_escaped_and_cannot_inject_headers(store, tmp_path):
    long_url = "http://example.com/" + "a" * 10_000
    hostile = commit(store, incident(user="jdoe\r\nBcc: victim@evil.example", device="<b>dev</b>",
                                     url="http://example.com/<script>alert(1)</script>?q=\"'&x"))
    too_long = commit(store, incident(user="bob", url=long_url))
    outbox = tmp_path / "outbox"
    d = dispatcher(store, MaildirTransport(outbox))
    assert d.dispatch_once(time.time()).mails == 2
    box = mailbox.Maildir(outbox, create=False)
    msgs = {m["Message-ID"]: email.message_from_bytes(bytes(m), policy=default_policy) for m in box}
    msg = msgs[f"<alert-{hostile.ref}@school.example>"]
    raw = bytes(box.get_message(next(k for k, m in box.items()
                                     if m["Message-ID"] == msg["Message-ID"])))
    head, _, body = raw.partition(b"\n\n")
    assert msg["Bcc"] is None and b"Bcc:" not in head.replace(b"jdoe Bcc:", b"")
    assert b"\nBcc:" not in body  # not even a forged line in the body
    assert "\n" not in msg["Subject"] and "jdoe Bcc: victim@evil.example" in msg["Subject"]
    html = msg.get_body(("html",)).get_content()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>dev</b>" not in html and "&lt;b&gt;dev&lt;/b&gt;" in html
    assert "&#34;&#39;&amp;x" in html
    assert "<a " not in html  # the URL is never a link
    text = msg.get_body(("plain",)).get_content()
    assert "<script>alert(1)</script>" in text  # plain text shows it as it was
    cut = msgs[f"<alert-{too_long.ref}@school.example>"]
    body = cut.get_body(("plain",)).get_content()
    assert long_url not in body and long_url[:500] in body and "10019 characters" in body
    assert len(cut["Subject"]) < 200


def test_render_with_missing_values():
    d = AlertDispatcher(None, None, sender=SENDER, to=ICT, tz=LONDON, school="X")  # type: ignore[arg-type]
    row = {"event_ref": "R1", "ts": 0.0, "user": None, "role": None, "ip": "10.0.0.9", "device": None,
           "host": "example.com", "url": None, "categories": [], "window": "out_of_hours",
           "action": "log", "rule": None, "kind": "alert", "attempts": 0}
    msg = d.render(AlertGroup(("ip:10.0.0.9", "example.com"), [row]))
    assert msg["Subject"] == "[filterd] Alert: unknown role 10.0.0.9 tried listed site example.com"
    assert "(not logged in)" in msg.get_body(("plain",)).get_content()
    row |= {"categories": ["adult", "terrorism"], "kind": "bypass", "action": "block", "user": "jdoe",
            "role": "pupil"}
    msg = d.render(AlertGroup(("jdoe", "example.com"), [row]))
    assert msg["Subject"] == "[filterd] Bypass: pupil jdoe tried adult/terrorism site example.com"


# ---------------------------------------------------------------------------------------------
# kill -9: a child process dispatches and is killed; this process plays the restarted daemon.

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from zoneinfo import ZoneInfo
    from pathlib import Path
    from filterd.alerts import AlertDispatcher
    from filterd.mail import SmtpTransport
    from filterd.record import Store

    db, port, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    class KillAfterAccept:
        def __init__(self, inner):
            self.inner = inner
        def send(self, msg):
            if when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            self.inner.send(msg)  # "during": the server holds DATA; we are killed while waiting
            if when == "after":  # the server said 250; die before mark_alerts_sent commits
                os.kill(os.getpid(), signal.SIGKILL)

    store = Store(Path(db)).open()
    d = AlertDispatcher(store, KillAfterAccept(SmtpTransport("127.0.0.1", port, timeout=30)),
                        sender="filterd@school.example", to=["ict@school.example"],
                        tz=ZoneInfo("Europe/London"), school="X")
    d.dispatch_once(time.time())
    print("not killed", flush=True)
""")


def run_child(db: Path, port: int, when: str, *, wait: bool = True) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(db), str(port), when],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == -signal.SIGKILL, (out, err)
    return proc


@pytest.mark.parametrize("when", ["before", "during"])
def test_kill_before_acceptance_delivers_exactly_once_after_restart(tmp_path, smtpd, when):
    handler, port = smtpd()
    db = tmp_path / "filterd.db"
    with Store(db).open() as store:
        v = commit(store, incident())
    if when == "during":
        handler.hang = True
        proc = run_child(db, port, when, wait=False)
        assert handler.data_seen.wait(15), "the child never reached DATA"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        handler.hang = False
        handler.release.set()
    else:
        run_child(db, port, when)
    assert handler.messages == []
    with Store(db).open() as store:  # the restarted daemon
        d = dispatcher(store, SmtpTransport("127.0.0.1", port, timeout=5))
        assert d.dispatch_once(time.time()).mails == 1
        assert d.dispatch_once(time.time() + 1).mails == 0
        assert states(store) == {v.ref: ("sent", 1)}
    assert handler.ids() == [f"<alert-{v.ref}@school.example>"]


def test_kill_after_acceptance_repeats_with_the_same_message_id(tmp_path, smtpd):
    handler, port = smtpd()
    db = tmp_path / "filterd.db"
    with Store(db).open() as store:
        v = commit(store, incident())
    run_child(db, port, "after")
    assert handler.ids() == [f"<alert-{v.ref}@school.example>"]  # accepted, never marked
    with Store(db).open() as store:
        assert states(store) == {v.ref: ("pending", 0)}
        d = dispatcher(store, SmtpTransport("127.0.0.1", port, timeout=5))
        assert d.dispatch_once(time.time()).mails == 1
        assert d.dispatch_once(time.time() + 1).mails == 0
    # The repeat is detectable: same Message-ID twice, so the mail system can drop it.
    ids = handler.ids()
    assert len(ids) == 2 and ids[0] == ids[1] == f"<alert-{v.ref}@school.example>"


def test_committed_by_a_killed_daemon_is_delivered_once(tmp_path, smtpd):
    handler, port = smtpd()
    db = tmp_path / "filterd.db"
    code = textwrap.dedent("""
        import os, signal, sys, time
        from datetime import datetime, timezone
        from pathlib import Path
        from filterd.record import Store
        from filterd.verdict import Verdict, What, Who
        store = Store(Path(sys.argv[1])).open()
        v = Verdict(time=datetime.now(timezone.utc), who=Who(ip="10.20.1.5", user="jdoe", role="pupil"),
                    what=What(host="example.com", url="http://example.com/", categories=("terrorism",)),
                    window="contact", action="block", alert=True, rule="terrorism")
        store.commit_incident(v).result(timeout=10)
        print(v.ref, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(db)], capture_output=True, text=True, timeout=20)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ref = proc.stdout.strip()
    with Store(db).open() as store:
        d = dispatcher(store, SmtpTransport("127.0.0.1", port, timeout=5))
        assert d.dispatch_once(time.time()).mails == 1
        assert d.dispatch_once(time.time() + 1).mails == 0
    assert handler.ids() == [f"<alert-{ref}@school.example>"]


def test_alert_reaches_the_smtp_server_within_10s_at_the_default_interval(store, smtpd):
    """The issue's target, on a real AsyncIOScheduler: attempt committed -> 250 within 10 s."""
    from filterd.scheduler import JobCallables, ScheduleSettings, build_scheduler

    handler, port = smtpd()
    d = dispatcher(store, SmtpTransport("127.0.0.1", port, timeout=5))
    settings = ScheduleSettings()  # the default dispatch interval
    assert settings.dispatch_seconds == 5

    async def main() -> float:
        scheduler = build_scheduler(JobCallables(dispatch_alerts=lambda: d.dispatch_once(time.time())),
                                    settings)
        scheduler.start()
        await asyncio.sleep(0.3)  # the start-up run has happened: the worst case is a full interval
        loop = asyncio.get_running_loop()
        v = incident()
        await asyncio.wrap_future(store.commit_incident(v))  # as the addon does
        attempt = time.monotonic()
        while not handler.messages and time.monotonic() - attempt < 10:
            await asyncio.sleep(0.05)
        took = time.monotonic() - attempt
        scheduler.shutdown(wait=False)
        await loop.run_in_executor(None, time.sleep, 0.05)
        assert handler.ids() == [f"<alert-{v.ref}@school.example>"]
        return took

    took = asyncio.run(main())
    assert took < 10, took


def test_a_transport_bug_is_retried_with_backoff_not_in_a_hot_loop(store):
    class Broken:
        def send(self, msg):
            raise RuntimeError("bug in a transport")

    v = commit(store, incident())
    now = time.time()
    result = dispatcher(store, Broken()).dispatch_once(now)
    assert result.retry == 1 and "RuntimeError: bug in a transport" in result.errors[0]
    assert states(store) == {v.ref: ("pending", 1)} and store.pending_alerts(now + 1) == []
