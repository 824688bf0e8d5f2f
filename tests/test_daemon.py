"""``filterd run`` for real: a daemon on 127.0.0.1, upstream servers, clients through it,
and what the client saw checked against what the database holds."""

from __future__ import annotations

import json
import signal
import socket
from datetime import datetime
import time
from pathlib import Path

import pytest

from tests.proxyrig import Filterd, Upstream, Upstreams


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory):
    ups = Upstreams.start(tmp_path_factory.mktemp("upstream"))
    yield ups
    ups.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, upstreams: Upstreams):
    f = Filterd.create(tmp_path_factory.mktemp("filterd"), upstreams,
                       networks='[[identity.networks]]\ncidr = "10.0.0.0/8"\nrole = "pupil"\n').start()
    yield f
    f.stop()


def wait_for(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    return check()


def test_allowed_request_passes_untouched(proxy: Filterd, upstreams: Upstreams) -> None:
    status, headers, body = proxy.get(f"http://127.0.0.1:{upstreams.http_port}/hello")
    assert status == 200 and body == b"upstream ok /hello"
    assert "x-filterd-rule" not in headers


def test_logged_request_passes_and_is_recorded_as_usage(proxy: Filterd, upstreams: Upstreams) -> None:
    for _ in range(3):
        status, _, body = proxy.get(f"http://127.0.0.2:{upstreams.http_port}/feed")
        assert status == 200 and body == b"upstream ok /feed"
    usage = "SELECT * FROM usage WHERE host = '127.0.0.2'"
    wait_for(lambda: sum(r["requests"] for r in proxy.rows(usage)) >= 3)
    rows = proxy.rows(usage)
    assert sum(r["requests"] for r in rows) == 3
    assert rows[0]["action"] == "log" and rows[0]["rule"] == "social"


def test_blocked_http_gets_block_page_and_event_is_committed_first(proxy: Filterd, upstreams: Upstreams) -> None:
    before = len(Upstream.seen)
    status, headers, body = proxy.get(f"http://127.0.0.3:{upstreams.http_port}/propaganda",
                                      headers={"Accept": "text/html"})
    assert status == 403
    assert headers["x-filterd-rule"] == "terrorism"
    assert "no-store" in headers["cache-control"]
    page = body.decode()
    assert "Rig School" in page and "terrorism" in page and "ict@rig.example" in page
    ref = headers["x-filterd-ref"]
    assert ref in page
    # committed before the page was returned: visible at once from another connection
    rows = proxy.rows("SELECT * FROM events WHERE ref = ?", ref)
    assert len(rows) == 1 and rows[0]["kind"] == "block" and rows[0]["rule"] == "terrorism"
    assert rows[0]["url"] == f"http://127.0.0.3:{upstreams.http_port}/propaganda"
    assert proxy.rows("SELECT * FROM alerts WHERE event_ref = ?", ref)
    assert len(Upstream.seen) == before  # never reached upstream


def test_blocked_host_that_does_not_resolve(proxy: Filterd) -> None:
    status, headers, body = proxy.get("http://terror.invalid/x", headers={"Accept": "text/html"})
    assert status == 403 and headers["x-filterd-rule"] == "terrorism" and b"<html" in body


def test_blocked_https_is_intercepted_and_gets_the_block_page(proxy: Filterd) -> None:
    status, headers, body, issuer = proxy.get_tls("terror.invalid", 443, "/page",
                                                  headers={"Accept": "text/html"})
    assert status == 403 and headers["x-filterd-rule"] == "terrorism"
    assert "mitmproxy" in issuer.get("organizationName", "") + issuer.get("commonName", "")
    rows = proxy.rows("SELECT * FROM events WHERE ref = ?", headers["x-filterd-ref"])
    assert rows and rows[0]["url"] == "https://terror.invalid/page"


def test_subresource_gets_a_short_403(proxy: Filterd) -> None:
    status, headers, body = proxy.get("http://terror.invalid/logo.png",
                                      headers={"Accept": "image/avif,image/webp", "Sec-Fetch-Dest": "image"})
    assert status == 403 and headers["content-type"].startswith("text/plain") and len(body) < 200


def test_allowed_https_is_intercepted(proxy: Filterd, upstreams: Upstreams) -> None:
    status, _, body, issuer = proxy.get_tls("127.0.0.1", upstreams.https_port, "/secure")
    assert status == 200 and body == b"upstream ok /secure"
    assert "mitmproxy" in str(issuer)


def test_not_intercepted_category_passes_through_and_is_recorded(proxy: Filterd, upstreams: Upstreams) -> None:
    status, _, body, issuer = proxy.get_tls("127.0.0.4", upstreams.https_port, "/account", ca=upstreams.ca_file)
    assert status == 200 and body == b"upstream ok /account"
    assert "mitmproxy" not in str(issuer)  # the upstream's own certificate reached the client
    rows = wait_for(lambda: proxy.rows("SELECT * FROM usage WHERE host = '127.0.0.4'"))
    assert rows and "bank" in rows[0]["categories"]


def test_secrets_are_never_written(proxy: Filterd, upstreams: Upstreams) -> None:
    secret = "S3cr3tT0ken-do-not-store"
    proxy.get(f"http://127.0.0.3:{upstreams.http_port}/login?x=1", method="POST",
              headers={"Cookie": f"session={secret}", "Authorization": f"Bearer {secret}"},
              body=f"password={secret}".encode())
    proxy.get(f"http://127.0.0.2:{upstreams.http_port}/feed", headers={"Cookie": f"id={secret}"},
              auth=f"someone:{secret}")
    time.sleep(0.5)
    for path in proxy.root.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"secret found in {path}"


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x01\x02garbage\r\n\r\n",
        b"GET http://127.0.0.1/ HTTP/1.1\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n",
        b"GET http://127.0.0.1/\x00nul HTTP/1.1\r\nHost: \x00\r\n\r\n",
        b"CONNECT 127.0.0.1:443 HTTP/1.1\r\n\r\n\x16\x03\x01\x00\x05hello",
        b"GET http://[::1 HTTP/1.1\r\n\r\n",
        b"GET /",  # half a request, then the socket stays open
    ],
)
def test_hostile_clients_do_not_take_it_down(proxy: Filterd, upstreams: Upstreams, payload: bytes) -> None:
    s = socket.create_connection(("127.0.0.1", proxy.port))
    s.sendall(payload)
    s.settimeout(0.3)
    try:
        s.recv(4096)
    except OSError:
        pass
    status, _, body = proxy.get(f"http://127.0.0.1:{upstreams.http_port}/after")
    s.close()
    assert status == 200 and body == b"upstream ok /after"
    assert proxy.proc.poll() is None


def test_network_identity_and_auth_identity_get_the_pupil_rules(tmp_path: Path, upstreams: Upstreams) -> None:
    """An unauthenticated address on the pupil network and an authenticated pupil: both pupils."""
    by_network = Filterd.create(tmp_path / "net", upstreams).start()
    try:
        status, headers, _ = by_network.get("http://social.invalid/")
        assert status == 403 and headers["x-filterd-rule"] == "pupil-social"
        row = by_network.rows("SELECT * FROM events WHERE ref = ?", headers["x-filterd-ref"])[0]
        assert (row["role"], row["user"]) == ("pupil", None)
    finally:
        by_network.stop()
    by_auth = Filterd.create(tmp_path / "auth", upstreams, auth=True, networks="").start()
    try:
        assert by_auth.get("http://social.invalid/")[0] == 407
        status, headers, _ = by_auth.get("http://social.invalid/", auth="pupil1:password")
        assert status == 403 and headers["x-filterd-rule"] == "pupil-social"
        status, headers, _, _ = by_auth.get_tls("social.invalid", 443, auth="pupil1:password")
        assert status == 403  # the CONNECT tunnel keeps its user
        rows = by_auth.rows("SELECT user, role FROM events WHERE kind = 'block'")
        assert {(r["user"], r["role"]) for r in rows} == {("pupil1", "pupil")}
        status, _, _ = by_auth.get(f"http://127.0.0.2:{upstreams.http_port}/", auth="teacher1:password")
        assert status == 200  # staff: logged, not blocked
        assert "password" not in by_auth.stderr()
    finally:
        by_auth.stop()


def test_sighup_with_a_broken_config_keeps_the_last_good_state(tmp_path: Path, upstreams: Upstreams) -> None:
    f = Filterd.create(tmp_path, upstreams).start()
    try:
        good = f.config.read_text()
        f.config.write_text(good + "\n[[rules]]\nname = 'x'\naction = 'explode'\n")
        f.send(signal.SIGHUP)
        assert wait_for(lambda: "keeping the last good state" in f.stderr())
        assert f.get("http://terror.invalid/")[0] == 403
        (f.root / "lists" / "terrorism").write_text("terror.invalid\nnewly-listed.invalid\n")
        f.config.write_text(good)
        f.send(signal.SIGHUP)
        assert wait_for(lambda: "reloaded" in f.stderr())
        assert f.get("http://newly-listed.invalid/")[0] == 403
        assert f.proc.poll() is None
    finally:
        f.stop()


def test_a_changed_list_file_is_reloaded(tmp_path: Path, upstreams: Upstreams) -> None:
    f = Filterd.create(tmp_path, upstreams).start()
    try:
        assert f.get(f"http://127.0.0.1:{upstreams.http_port}/")[0] == 200
        (f.root / "lists" / "terrorism").write_text("terror.invalid\n127.0.0.1\n")
        assert wait_for(lambda: f.get(f"http://127.0.0.1:{upstreams.http_port}/")[0] == 403, timeout=15)
    finally:
        f.stop()


def test_sigterm_flushes_and_kill9_loses_no_block(tmp_path: Path, upstreams: Upstreams) -> None:
    f = Filterd.create(tmp_path, upstreams, networks="").start()
    for _ in range(20):
        assert f.get(f"http://127.0.0.2:{upstreams.http_port}/")[0] == 200
    assert f.stop(signal.SIGTERM) == 0
    assert sum(r["requests"] for r in f.rows("SELECT requests FROM usage")) == 20
    f.start()
    refs = [f.get("http://terror.invalid/")[1]["x-filterd-ref"] for _ in range(5)]
    f.stop(signal.SIGKILL)
    kept = {r["ref"] for r in f.rows("SELECT ref FROM events")}
    assert set(refs) <= kept
    f.start()  # and it comes back on the same database
    try:
        assert f.get("http://terror.invalid/")[0] == 403
    finally:
        f.stop()


def test_a_lease_seen_by_the_sensor_attributes_requests_to_the_device_owner(tmp_path: Path, upstreams: Upstreams) -> None:
    """Sensor (replaying a DHCP capture) -> leases table -> the daemon's identify stage."""
    import subprocess
    import sys

    from tests.pcaps import dhcp_lease_pcap

    f = Filterd.create(tmp_path, upstreams, networks="")
    (f.root / "users.csv").write_text("username,role,email,devices\n"
                                      "pupil9,pupil,p9@rig.example,02:00:00:00:00:99\n")
    f.start()
    try:
        pcap = dhcp_lease_pcap(tmp_path / "dhcp.pcap", mac="02:00:00:00:00:99", ip="127.0.0.1",
                               hostname="pupil9-laptop", lease_seconds=10 * 365 * 86400, t=time.time() - 5)
        replay = subprocess.run([sys.executable, "-m", "filterd", "-c", str(f.config), "sensor", "--pcap", str(pcap)],
                                capture_output=True, text=True, timeout=60)
        assert replay.returncode == 0, replay.stderr
        leases = subprocess.run([sys.executable, "-m", "filterd", "-c", str(f.config), "leases", "--json"],
                                capture_output=True, text=True, timeout=60)
        lease = json.loads(leases.stdout.splitlines()[0])
        assert (lease["mac"], lease["ip"], lease["hostname"]) == ("02:00:00:00:00:99", "127.0.0.1", "pupil9-laptop")
        assert datetime.fromisoformat(lease["seen"]).tzinfo is not None

        def attributed():
            status, headers, _ = f.get("http://social.invalid/")
            return headers.get("x-filterd-rule") == "pupil-social" and headers
        headers = wait_for(attributed, timeout=15)  # the daemon refreshes leases every second here
        assert headers, f.stderr()
        row = f.rows("SELECT user, role, device FROM events WHERE ref = ?", headers["x-filterd-ref"])[0]
        assert (row["user"], row["role"], row["device"]) == ("pupil9", "pupil", "02:00:00:00:00:99")
    finally:
        f.stop()


def test_an_alert_reaches_the_smtp_server_within_10_seconds(tmp_path: Path, upstreams: Upstreams) -> None:
    """A blocked terrorism attempt through the real daemon -> alert outbox -> aiosmtpd."""
    from aiosmtpd.controller import Controller

    received: list = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802
            received.append((time.monotonic(), envelope.content.decode("utf-8", "replace")))
            return "250 OK"

    from tests.proxyrig import free_port

    smtp = Controller(Handler(), hostname="127.0.0.1", port=free_port())
    smtp.start()
    f = Filterd.create(tmp_path, upstreams)
    f.config.write_text(f.config.read_text() + f"\n[mail]\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {smtp.port}\n"
                        "ict = [\"ict@rig.example\"]\n")
    f.start()
    try:
        started = time.monotonic()
        status, headers, _ = f.get("http://terror.invalid/plans")
        assert status == 403
        ref = headers["x-filterd-ref"]
        alert = lambda: [(t, m) for t, m in received if ref in m]  # noqa: E731
        assert wait_for(alert, timeout=12), [m[:200] for _, m in received]
        arrived, message = alert()[0]
        assert arrived - started < 10 and "terror.invalid" in message
        # the start-up catch-up also sent last week's (empty) report to pastoral staff, once
        assert sum("weekly internet use" in m for _, m in received) == 1
        assert f"Message-ID: <alert-{headers['x-filterd-ref']}@" in message
        assert wait_for(lambda: f.rows("SELECT state FROM alerts")[0]["state"] == "sent")
    finally:
        f.stop()
        smtp.stop()


def test_a_port_in_use_is_one_clear_error(tmp_path: Path, upstreams: Upstreams) -> None:
    import subprocess
    import sys

    f = Filterd.create(tmp_path, upstreams)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", f.port))
        taken.listen()
        out = subprocess.run([sys.executable, "-m", "filterd", "-c", str(f.config), "run"],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "address already in use" in out.stderr and "Traceback" not in out.stderr
    assert "listening" not in out.stderr
