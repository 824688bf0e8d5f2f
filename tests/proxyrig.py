"""A real filterd daemon on 127.0.0.1 with local upstream HTTP and HTTPS servers.

Hosts are loopback addresses (127.0.0.1, .2, .3, ...) so nothing needs DNS, and the lists
name them as IP entries; names under ``.invalid`` never resolve and prove that a blocked
request opens no upstream connection.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import trustme

from tests.net import free_port



class Upstream(BaseHTTPRequestHandler):
    """Answers every request with 200 and counts what it saw (to prove blocks never arrive)."""

    seen: list[str] = []
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        Upstream.seen.append(f"{self.headers.get('Host')}{self.path}")
        body = f"upstream ok {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args) -> None:
        pass


def serve(server: ThreadingHTTPServer) -> ThreadingHTTPServer:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@dataclass
class Upstreams:
    http_port: int
    https_port: int
    ca: trustme.CA
    ca_file: Path
    servers: list = field(default_factory=list)

    @classmethod
    def start(cls, tmp: Path) -> "Upstreams":
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "localhost")
        ca_file = tmp / "upstream-ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        plain = serve(ThreadingHTTPServer(("0.0.0.0", 0), Upstream))
        tls_server = ThreadingHTTPServer(("0.0.0.0", 0), Upstream)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(ctx)
        tls_server.socket = ctx.wrap_socket(tls_server.socket, server_side=True)
        serve(tls_server)
        return cls(plain.server_address[1], tls_server.server_address[1], ca, ca_file, [plain, tls_server])

    def stop(self) -> None:
        for s in self.servers:
            s.shutdown()
            s.server_close()


CONFIG = """
[school]
name = "Rig School"
ict_contact = "ict@rig.example"
[proxy]
listen_host = "127.0.0.1"
listen_port = {port}
upstream_ca = "{ca}"
ignore_categories = ["bank"]
reload_check_seconds = 1
{proxy_extra}
[storage]
data_dir = "data"
flush_seconds = 0.2
[[lists]]
category = "terrorism"
path = "lists/terrorism"
[[lists]]
category = "social_networks"
path = "lists/social"
[[lists]]
category = "bank"
path = "lists/bank"
[categories]
social_media = ["social_networks"]
[identity]
users = "users.csv"
{networks}
[[rules]]
name = "terrorism"
categories = ["terrorism"]
action = "block"
alert = true
[[rules]]
name = "pupil-social"
categories = ["social_media"]
roles = ["pupil"]
action = "block"
[[rules]]
name = "social"
categories = ["social_media"]
action = "log"
"""


@dataclass
class Filterd:
    """One ``python -m filterd run`` process and the folder it lives in."""

    root: Path
    port: int
    proc: subprocess.Popen | None = None
    log: Path | None = None

    @classmethod
    def create(cls, root: Path, upstreams: Upstreams, *, auth: bool = False,
               networks: str = '[[identity.networks]]\ncidr = "127.0.0.0/8"\nrole = "pupil"\n') -> "Filterd":
        root.mkdir(parents=True, exist_ok=True)
        lists = root / "lists"
        lists.mkdir(exist_ok=True)
        (lists / "terrorism").write_text("terror.invalid\n127.0.0.3\n")
        (lists / "social").write_text("social.invalid\n127.0.0.2\n")
        (lists / "bank").write_text("127.0.0.4\n")
        (root / "users.csv").write_text("username,role,email\npupil1,pupil,p1@rig.example\n"
                                        "teacher1,staff,t1@rig.example\n")
        extra = ""
        if auth:
            # {SHA} is understood by mitmproxy 11 (passlib) and 12 (its own htpasswd reader).
            (root / "htpasswd").write_text("pupil1:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n"  # "password"
                                           "teacher1:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
            extra = 'auth = "@htpasswd"'
        port = free_port()
        (root / "filterd.toml").write_text(CONFIG.format(port=port, ca=upstreams.ca_file, proxy_extra=extra,
                                                         networks=networks))
        return cls(root, port)

    @property
    def config(self) -> Path:
        return self.root / "filterd.toml"

    @property
    def db(self) -> Path:
        return self.root / "data" / "filterd.db"

    @property
    def mitm_ca(self) -> Path:
        return self.root / "data" / "mitmproxy" / "mitmproxy-ca-cert.pem"

    def start(self, timeout: float = 30) -> "Filterd":
        self.log = self.root / f"stderr-{time.monotonic_ns()}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "filterd", "-c", str(self.config), "run"],
                                     stdout=subprocess.DEVNULL, stderr=self.log.open("wb"), env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"filterd exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                if self.mitm_ca.exists():
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"filterd did not start: {self.log.read_text()}")

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.log.read_text() if self.log else ""

    # --- clients -----------------------------------------------------------------------------
    def get(self, url: str, headers: dict | None = None, method: str = "GET", body: bytes | None = None,
            auth: str | None = None) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = dict(headers or {})
        if auth:
            import base64

            headers["Proxy-Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        conn.request(method, url, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def get_tls(self, host: str, port: int, path: str = "/", *, ca: Path | None = None,
                headers: dict | None = None, auth: str | None = None) -> tuple[int, dict, bytes, dict]:
        ctx = ssl.create_default_context(cafile=str(ca or self.mitm_ca))
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10, context=ctx)
        tunnel_headers = {}
        if auth:
            import base64

            tunnel_headers["Proxy-Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        conn.set_tunnel(host, port, headers=tunnel_headers)
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        issuer = dict(x[0] for x in conn.sock.getpeercert()["issuer"])
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, issuer

    def rows(self, sql: str, *args) -> list[sqlite3.Row]:
        db = sqlite3.connect(self.db, timeout=10)
        db.row_factory = sqlite3.Row
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()
