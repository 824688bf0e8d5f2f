"""The mitmproxy addon: thin glue from flows to the stages and back.

Each hook turns a flow into a ``Pipeline.request`` call (identify → classify → window →
decide), acts on the Verdict (pass, block page, not intercepting), and hands the Verdict to
the store. Incidents are awaited until committed before the block page goes out; routine
usage is queued write-behind, so the event loop never waits on SQLite.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone

from mitmproxy import connection, http, tls

from filterd import blockpage, formcheck, urls
from filterd.pipeline import Pipeline
from filterd.record import Store
from filterd.verdict import Verdict, What

log = logging.getLogger("filterd.proxy")


@dataclass
class Settings:
    """The parts of the config the addon acts on (given by the daemon, never read globally)."""

    branding: blockpage.Branding = field(default_factory=blockpage.Branding)
    on_store_failure: str = "enforce"  # enforce: blocks stay blocked, the rest passes; deny: refuse all
    ignore_hosts: tuple[str, ...] = ()  # canonical domains never intercepted (pinned apps)


class FilterdAddon:
    """Decides every request; the daemon swaps ``pipeline`` on reload."""

    def __init__(self, pipeline: Pipeline, store: Store, settings: Settings) -> None:
        self.pipeline = pipeline
        self.store = store
        self.settings = settings
        self.store_failing = False
        self._tunnel_user: dict[str, str] = {}  # client connection id -> proxy-auth user
        self._pending_block: dict[str, Verdict] = {}  # client connection id -> SNI block verdict

    # --- identity glue -------------------------------------------------------------------
    @staticmethod
    def _auth_user(flow: http.HTTPFlow) -> str | None:
        """The proxy-auth user name (mitmproxy's proxyauth sets it); the password is dropped."""
        auth = flow.metadata.get("proxyauth")
        return auth[0] if auth else None

    @staticmethod
    def _client_ip(client: connection.Client) -> str | None:
        return client.peername[0] if client.peername else None

    def http_connect(self, flow: http.HTTPFlow) -> None:
        """Remember the tunnel's user, so TLS inside the CONNECT keeps its identity."""
        user = self._auth_user(flow)
        if user:
            self._tunnel_user[flow.client_conn.id] = user

    def client_disconnected(self, client: connection.Client) -> None:
        self._tunnel_user.pop(client.id, None)
        self._pending_block.pop(client.id, None)

    # --- TLS: decide on SNI ----------------------------------------------------------------
    async def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        """Host-only decision at ClientHello: pass through what must not be intercepted."""
        client = data.context.client
        host = data.client_hello.sni or (data.context.server.address or ("", 0))[0]
        if not host:
            return
        try:
            verdict = self.pipeline.request(host, ip=self._client_ip(client),
                                            user=self._tunnel_user.get(client.id),
                                            at=datetime.now(timezone.utc), host_only=True)
        except ValueError:
            return
        if verdict.action == "block":
            # Intercept so the person sees the block page; if their app pins its certificate
            # the handshake fails and tls_failed_client records the attempt instead.
            self._pending_block[client.id] = verdict
            return
        if self._ignored(verdict.what):
            data.ignore_connection = True
            await self._record(verdict)

    def tls_failed_client(self, data: tls.TlsData) -> None:
        """A pinned app refused our certificate for a blocked host: still an attempt to record."""
        verdict = self._pending_block.pop(data.context.client.id, None)
        if verdict is not None:
            asyncio.ensure_future(self._record(verdict))

    def _ignored(self, what: What) -> bool:
        if not self.pipeline.intercept(what.host):
            return True
        return any(what.host == d or what.host.endswith("." + d) for d in self.settings.ignore_hosts)

    # --- HTTP: decide on the full URL ------------------------------------------------------
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        self._pending_block.pop(flow.client_conn.id, None)
        user = self._auth_user(flow) or self._tunnel_user.get(flow.client_conn.id)
        try:
            verdict = self.pipeline.request(flow.request.pretty_url, ip=self._client_ip(flow.client_conn),
                                            user=user, at=datetime.now(timezone.utc),
                                            method=flow.request.method, form=self._form(flow))
        except ValueError as exc:
            log.info("refused a request with an unusable URL from %s: %s",
                     self._client_ip(flow.client_conn), exc)
            flow.response = http.Response.make(400, b"Bad request\n", {"Content-Type": "text/plain"})
            return
        recorded = await self._record(verdict)
        if verdict.action == "block":
            self._block(flow, verdict, None if recorded else "This attempt could not be recorded.")
        elif not recorded and self.settings.on_store_failure == "deny" and verdict.is_incident:
            self._block(flow, verdict, "The filter cannot record right now, so it refuses all requests.")
        elif self.store_failing and self.settings.on_store_failure == "deny":
            self._block(flow, verdict, "The filter cannot record right now, so it refuses all requests.")

    @staticmethod
    def _form(flow: http.HTTPFlow) -> bytes | None:
        """A form body for the 6.6 check (held in memory only, never recorded)."""
        request = flow.request
        if request.method not in ("POST", "PUT", "PATCH") or not request.raw_content:
            return None
        if len(request.raw_content) > formcheck.MAX_BODY:
            return None
        return request.get_content(strict=False)

    def _block(self, flow: http.HTTPFlow, verdict: Verdict, note: str | None) -> None:
        headers = flow.request.headers
        page = blockpage.wants_page(headers.get("accept"), headers.get("sec-fetch-dest"),
                                    flow.request.method)
        answer = blockpage.render(verdict, self.settings.branding, page=page, note=note)
        flow.response = http.Response.make(answer.status, answer.body, answer.headers)

    async def _record(self, verdict: Verdict) -> bool:
        """Commit an incident (awaited, off the loop) or queue usage; False if the store failed."""
        if verdict.is_incident:
            try:
                await asyncio.wrap_future(self.store.commit_incident(verdict))
            except Exception as exc:  # disk full, locked for too long, ...: keep enforcing
                if not self.store_failing:
                    log.error("store failing, %s still enforced: %s",
                              "blocks" if self.settings.on_store_failure == "enforce" else "everything", exc)
                self.store_failing = True
                return False
            if self.store_failing:
                log.warning("store recovered")
            self.store_failing = False
            log.info("%s ref=%s user=%s ip=%s host=%s categories=%s rule=%s window=%s",
                     verdict.event_kind.upper(), verdict.ref, verdict.who.user or "-",
                     verdict.who.ip or "-", verdict.what.host, ",".join(verdict.what.categories) or "-",
                     verdict.rule or "-", verdict.window)
            return True
        self.store.add_usage(verdict)
        return True


def canonical_domains(hosts: list[str]) -> tuple[str, ...]:
    """``[proxy] ignore_hosts`` in canonical form; a bad entry is a config error upstream."""
    return tuple(urls.canonical_host(h.lstrip("*.").lstrip(".")) for h in hosts)
