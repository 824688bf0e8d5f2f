"""The addon in-process (mitmproxy's taddons/tflow, as mitmproxy tests its own addons), with a
real pipeline and a real SQLite store: flows in, responses and rows out."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from mitmproxy import connection, tls
from mitmproxy.proxy import context
from mitmproxy.test import taddons, tflow, tutils

from filterd import addon, config, pipeline
from filterd.record import Store

CONFIG = """
[storage]
data_dir = "data"
flush_seconds = 0.05
[[lists]]
category = "terrorism"
path = "terror"
[[lists]]
category = "social_networks"
path = "social"
[[lists]]
category = "bank"
path = "bank"
[categories]
social_media = ["social_networks"]
[identity]
school_email_domains = ["school.example"]
[proxy]
ignore_categories = ["bank"]
ignore_hosts = ["pinned.example"]
[[rules]]
name = "terrorism"
categories = ["terrorism"]
action = "block"
alert = true
[[rules]]
name = "school-email-on-social-media"
categories = ["school_email"]
action = "block"
"""


@pytest.fixture
def rig(tmp_path: Path):
    (tmp_path / "terror").write_text("bad.example\n")
    (tmp_path / "social").write_text("facebook.com\n")
    (tmp_path / "bank").write_text("mybank.example\n")
    (tmp_path / "filterd.toml").write_text(CONFIG)
    cfg = config.load(tmp_path / "filterd.toml")
    store = Store(tmp_path / "data" / "filterd.db", flush_seconds=0.05).open()
    settings = addon.Settings(ignore_hosts=addon.canonical_domains(cfg.get("proxy", "ignore_hosts")))
    a = addon.FilterdAddon(pipeline.build(cfg), store, settings)
    yield a, store
    store.close()


def run(coro):
    return asyncio.run(coro)


def flow(url: str, **headers: str):
    f = tflow.tflow()
    f.request.url = url
    for k, v in headers.items():
        f.request.headers[k.replace("_", "-")] = v
    return f


def test_blocked_request_gets_403_and_a_committed_event(rig) -> None:
    a, store = rig
    with taddons.context(a):
        f = flow("http://www.bad.example/x", accept="text/html")
        run(a.request(f))
    assert f.response.status_code == 403
    assert f.response.headers["X-Filterd-Rule"] == "terrorism"
    ref = f.response.headers["X-Filterd-Ref"]
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT kind, host FROM events WHERE ref = ?", (ref,)).fetchall() == [("block", "www.bad.example")]
    assert db.execute("SELECT state FROM alerts WHERE event_ref = ?", (ref,)).fetchall() == [("pending",)]


def test_allowed_and_logged_requests_pass(rig) -> None:
    a, store = rig
    with taddons.context(a):
        ok, social = flow("http://example.org/"), flow("https://facebook.com/feed")
        run(a.request(ok))
        run(a.request(social))
    assert ok.response is None and social.response is None
    store.flush()
    rows = sqlite3.connect(store.path).execute("SELECT host, action, requests FROM usage").fetchall()
    assert rows == [("facebook.com", "log", 1)]


def test_proxyauth_user_is_used_and_password_dropped(rig) -> None:
    a, store = rig
    with taddons.context(a):
        f = flow("http://bad.example/")
        f.metadata["proxyauth"] = ("pupil7", "hunter2")
        run(a.request(f))
    ref = f.response.headers["X-Filterd-Ref"]
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT user FROM events WHERE ref = ?", (ref,)).fetchone() == ("pupil7",)
    assert b"hunter2" not in store.path.read_bytes() + Path(str(store.path) + "-wal").read_bytes()




def _hello(sni: str) -> bytes:
    """A real ClientHello (OpenSSL's), without the record and handshake headers, as mitmproxy wants it."""
    from tests.pcaps import client_hello

    return client_hello(sni)[9:]  # record header (5) and handshake header (4)


@pytest.mark.parametrize("sni, ignored", [("www.mybank.example", True), ("app.pinned.example", True),
                                          ("facebook.com", False), ("bad.example", False)])
def test_clienthello_passes_through_what_must_not_be_intercepted(rig, sni: str, ignored: bool) -> None:
    a, store = rig
    with taddons.context(a) as tctx:
        client = tflow.tclient_conn()
        data = tls.ClientHelloData(context.Context(client, tctx.options), tls.ClientHello(_hello(sni)))
        run(a.tls_clienthello(data))
    assert data.ignore_connection is ignored
    if sni == "bad.example":
        assert client.id in a._pending_block  # recorded at request time, or on a failed handshake


def test_store_failure_still_blocks(rig) -> None:
    a, store = rig
    store.close()  # the store is gone: commits fail

    class Broken:
        def commit_incident(self, verdict):
            import concurrent.futures

            fut = concurrent.futures.Future()
            fut.set_exception(sqlite3.OperationalError("database or disk is full"))
            return fut

        def add_usage(self, verdict):
            pass

    a.store = Broken()
    with taddons.context(a):
        blocked, fine = flow("http://bad.example/"), flow("http://example.org/")
        run(a.request(blocked))
        run(a.request(fine))
    assert blocked.response.status_code == 403 and b"could not be recorded" in blocked.response.content
    assert fine.response is None
    a.settings.on_store_failure = "deny"
    with taddons.context(a):
        fine = flow("http://example.org/")
        run(a.request(fine))
    assert fine.response.status_code == 403


@pytest.mark.parametrize("host, body, blocked", [
    ("facebook.com", b"email=j.smith%40school.example&pass=Secr3t", True),
    ("facebook.com", b"email=j.smith%40gmail.com&pass=Secr3t", False),
    ("example.org", b"email=j.smith%40school.example&pass=Secr3t", False),  # not social media
])
def test_policy_6_6_school_email_in_a_social_media_form(rig, host: str, body: bytes, blocked: bool) -> None:
    a, store = rig
    with taddons.context(a):
        f = flow(f"https://{host}/signup")
        f.request.method = "POST"
        f.request.content = body
        run(a.request(f))
    assert (f.response is not None and f.response.status_code == 403) is blocked
    store.flush()
    on_disk = store.path.read_bytes() + Path(str(store.path) + "-wal").read_bytes()
    assert b"j.smith" not in on_disk and b"Secr3t" not in on_disk
    if blocked:
        assert f.response.headers["X-Filterd-Rule"] == "school-email-on-social-media"
        row = sqlite3.connect(store.path).execute("SELECT detail, categories FROM events").fetchone()
        assert row[0] == "school email address (@school.example) sent in a form" and "school_email" in row[1]
