"""The gateway sensor: capture (live or from a pcap), detect, and record through the pipeline.

``filterd sensor`` runs this in its own process with only CAP_NET_RAW (see
``systemd/filterd-sensor.service``): it opens one AF_PACKET socket on the school-facing
interface with a BPF filter (``bpf_filter``) so that the kernel drops everything detection
does not need (the bulk: TCP data to and from the proxy), and hands the rest, as raw bytes,
to ``filterd.detect.Detector``.

What it records, through the same paths as the proxy:

* each DHCP lease with ``store.upsert_lease`` (and ``on_lease``, e.g. the in-process
  ``LeaseTable.add``), so identify attributes a client address to its device and user;
* each bypass attempt as ``request(host_or_ip, ip=client, kind="bypass", ...)`` — the
  pipeline identifies, classifies, windows and decides, so a listed host alerts like it would
  through the proxy — then ``store.commit_incident(verdict, source="sensor")``.

A QUIC flow or a stream of DNS queries to 8.8.8.8 is one event per ``dedupe_seconds``, not
thousands: findings with the same (client, kind, destination, port, host) are folded.

``SensorStats`` counts packets, findings per kind, skips and rates; the sensor writes them to
a small JSON file every few seconds that ``filterd sensor --stats`` reads (``read_stats`` and
``format_stats``), so the CLI never needs the capture privilege.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from filterd.detect import (
    DEFAULT_DOH_HOSTS,
    KINDS,
    LINKTYPE_ETHERNET,
    LINKTYPE_RAW,
    Detector,
    Finding,
    LeaseFinding,
)
from filterd.errors import FilterdError
from filterd.identify import Lease
from filterd.verdict import Verdict

log = logging.getLogger("filterd.sensor")


class SensorStore(Protocol):
    """The part of ``filterd.record.Store`` the sensor uses."""

    def commit_incident(self, verdict: Verdict, *, source: str = "proxy") -> Future[None]: ...

    def upsert_lease(self, lease: Lease, seen: float) -> None: ...


# ------------------------------------------------------------------------------------------
# the BPF filter


def _tcp_payload(byte: int = 0) -> str:
    return f"tcp[((tcp[12] & 0xf0) >> 2) + {byte}]"


def _ip6_tcp_payload(byte: int = 0) -> str:
    # IPv6 without extension headers: TCP header at 40, its data offset at 40 + 12
    return f"ip6[40 + ((ip6[52] & 0xf0) >> 2) + {byte}]"


def bpf_filter(resolvers: Iterable[str] = (), intercepted_ports: Iterable[int] = ()) -> str:
    """The capture filter: only the packets detection reads reach Python.

    Passed: DHCP; DNS to anything but the school's resolvers; the first bytes of TCP
    payloads that start a TLS handshake on 443/853; QUIC long-header packets (Initial and
    Handshake, a few per connection — the short-header data packets are dropped); WireGuard
    handshake initiations (any port: UDP payload of 148 bytes starting 01 00 00 00); OpenVPN
    hard resets on 1194; IKE and the first ESP packets of each SA (sequence number < 4).
    Everything else — in particular the TCP traffic to the proxy and the established
    tunnels — is dropped in the kernel.
    """
    not_resolvers = "".join(f" and not dst host {r}" for r in resolvers)
    intercepted = {int(p) for p in intercepted_ports}
    ovpn_udp = "(udp[8] & 0xf8 = 0x08 or udp[8] & 0xf8 = 0x38 or udp[8] & 0xf8 = 0x50)"
    opcode = _tcp_payload(2)  # after the 2-byte length prefix of OpenVPN over TCP
    ovpn_tcp = f"({opcode} & 0xf8 = 0x38 or {opcode} & 0xf8 = 0x08 or {opcode} & 0xf8 = 0x50)"
    v4 = [
        "udp and (port 67 or port 68)",
        f"udp dst port 53{not_resolvers}",
        f"tcp dst port 53{not_resolvers}",
        f"tcp dst port 853 and {_tcp_payload()} = 0x16",
        "udp dst port 443 and udp[8] & 0x80 != 0",
        "udp[4:2] = 156 and udp[8:4] = 0x01000000",
        f"udp dst port 1194 and {ovpn_udp}",
        f"tcp dst port 1194 and {ovpn_tcp}",
        "udp dst port 500",
        "udp dst port 4500 and (udp[8:4] = 0 or udp[12:4] < 4)",
        "ip proto 50 and ip[((ip[0] & 0x0f) << 2) + 4 : 4] < 4",
    ]
    if 443 not in intercepted:
        v4.append(f"tcp dst port 443 and {_tcp_payload()} = 0x16")
    v6 = [
        f"udp dst port 53{not_resolvers}",
        f"tcp dst port 53{not_resolvers}",
        f"ip6[6] = 6 and tcp dst port 853 and {_ip6_tcp_payload()} = 0x16",
        "ip6[6] = 17 and udp dst port 443 and ip6[48] & 0x80 != 0",
        "ip6[6] = 17 and ip6[44:2] = 156 and ip6[48:4] = 0x01000000",
        "dst port 1194",
        "udp dst port 500 or udp dst port 4500",
        "ip6[6] = 50 and ip6[44:4] < 4",
    ]
    if 443 not in intercepted:
        v6.append(f"ip6[6] = 6 and tcp dst port 443 and {_ip6_tcp_payload()} = 0x16")
    return f"(ip and (({') or ('.join(v4)}))) or (ip6 and (({') or ('.join(v6)})))"


def libpcap_available() -> bool:
    """Whether libpcap can be loaded (scapy compiles BPF filters with it)."""
    try:
        import scapy.libs.winpcapy  # noqa: F401 - loads libpcap.so through ctypes
    except (ImportError, OSError):
        return False
    return True


class BpfMatcher:
    """A compiled BPF filter run in user space by libpcap (``pcap_offline_filter``).

    ``--pcap`` replays through the same filter the live socket uses, so a replay sees what
    the live sensor would; tests use it to check the filter itself. Needs libpcap
    (Debian: libpcap0.8), which scapy also needs to attach the filter to a live socket.
    """

    def __init__(self, expression: str, linktype: int = LINKTYPE_ETHERNET) -> None:
        try:
            from scapy.arch.common import compile_filter
            from scapy.libs.winpcapy import _lib, pcap_pkthdr
        except (ImportError, OSError) as exc:
            raise FilterdError(f"libpcap is needed for the BPF filter: {exc}") from None
        try:
            self._program = compile_filter(expression, linktype=linktype)
        except Exception as exc:  # noqa: BLE001 - scapy raises Scapy_Exception/ImportError
            raise FilterdError(f"bad BPF filter: {exc}", field="sensor.bpf") from None
        self._filter = _lib.pcap_offline_filter
        self._filter.restype = ctypes.c_int
        self._filter.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p]
        self._hdr = pcap_pkthdr()
        self._prog_ref = ctypes.byref(self._program)
        self._hdr_ref = ctypes.byref(self._hdr)
        self.expression = expression

    def __call__(self, frame: bytes) -> bool:
        self._hdr.caplen = self._hdr.len = len(frame)
        return self._filter(self._prog_ref, self._hdr_ref, frame) != 0


# ------------------------------------------------------------------------------------------
# stats


@dataclass
class SensorStats:
    """What the sensor has done; ``as_dict`` is what ``filterd sensor --stats`` shows."""

    source: str = ""
    started: float = field(default_factory=time.time)
    packets: int = 0
    findings: Counter[str] = field(default_factory=Counter)  # per kind, before dedupe
    events: int = 0  # bypass events committed
    deduped: int = 0
    leases: int = 0
    errors: int = 0  # pipeline or store failures
    filtered_out: int = 0  # replay only: packets the BPF filter dropped
    cpu_started: float = field(default_factory=time.process_time)
    _last: tuple[float, int] = (0.0, 0)

    def as_dict(self, detector: Detector | None = None) -> dict[str, Any]:
        now = time.time()
        elapsed = max(now - self.started, 1e-9)
        last_t, last_n = self._last or (self.started, 0)
        recent = (self.packets - last_n) / max(now - last_t, 1e-9) if last_t else self.packets / elapsed
        self._last = (now, self.packets)
        return {
            "source": self.source,
            "pid": os.getpid(),
            "updated": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "elapsed_seconds": round(elapsed, 3),
            "cpu_seconds": round(time.process_time() - self.cpu_started, 3),
            "packets": self.packets,
            "filtered_out": self.filtered_out,
            "packets_per_second": round(self.packets / elapsed, 1),
            "recent_packets_per_second": round(recent, 1),
            "findings": {k: self.findings.get(k, 0) for k in KINDS},
            "events": self.events,
            "deduped": self.deduped,
            "leases": self.leases,
            "errors": self.errors,
            "skips": dict(detector.skips) if detector else {},
            "ignored": detector.ignored if detector else 0,
        }


def write_stats(path: Path, stats: dict[str, Any]) -> None:
    """Replace the stats file atomically, so a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_stats(path: Path) -> dict[str, Any]:
    """The last stats the sensor wrote; FilterdError when it has not written any."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FilterdError("no sensor stats yet: is `filterd sensor` running?", file=path) from None
    except (OSError, ValueError) as exc:
        raise FilterdError(f"cannot read sensor stats: {exc}", file=path) from None


def format_stats(stats: dict[str, Any]) -> str:
    """The stats as a few lines for people (``filterd sensor --stats``)."""
    lines = [
        f"source      {stats.get('source', '')} (pid {stats.get('pid')}, updated {stats.get('updated')})",
        f"packets     {stats.get('packets', 0)} in {stats.get('elapsed_seconds', 0)} s, "
        f"cpu {stats.get('cpu_seconds', 0)} s",
        f"rate        {stats.get('recent_packets_per_second', 0)} packets/s now, "
        f"{stats.get('packets_per_second', 0)} packets/s on average",
        f"events      {stats.get('events', 0)} bypass events, {stats.get('deduped', 0)} repeats folded, "
        f"{stats.get('leases', 0)} leases, {stats.get('errors', 0)} errors",
        "findings    " + ", ".join(f"{k} {v}" for k, v in stats.get("findings", {}).items()),
    ]
    skips = stats.get("skips") or {}
    lines.append("skipped     " + (", ".join(f"{k} {v}" for k, v in sorted(skips.items())) or "none"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# the sensor


class Sensor:
    """Capture → detect → dedupe → pipeline → store. One per ``filterd sensor`` process."""

    def __init__(
        self,
        request: Callable[..., Verdict],
        store: SensorStore,
        *,
        resolvers: Iterable[str] = (),
        proxy_addresses: Iterable[str] = (),
        school_networks: Iterable[str] = (),
        intercepted_ports: Iterable[int] = (),
        doh_hosts: Iterable[str] = DEFAULT_DOH_HOSTS,
        is_doh: Callable[[str], bool] | None = None,
        dedupe_seconds: float = 60,
        stats_path: Path | None = None,
        stats_seconds: float = 5.0,
        on_lease: Callable[[Lease], None] | None = None,
        bpf: str | None = None,
    ) -> None:
        self.request = request
        self.store = store
        self.resolvers = tuple(resolvers)
        self.intercepted_ports = tuple(intercepted_ports)
        self.detector = Detector(
            resolvers=self.resolvers, proxy_addresses=proxy_addresses, school_networks=school_networks,
            intercepted_ports=self.intercepted_ports, doh_hosts=doh_hosts, is_doh=is_doh,
        )
        self.bpf = bpf or bpf_filter(self.resolvers, self.intercepted_ports)
        self.dedupe_seconds = dedupe_seconds
        self.stats_path = Path(stats_path) if stats_path else None
        self.stats_seconds = stats_seconds
        self.on_lease = on_lease
        self.stats = SensorStats()
        self._seen: dict[tuple[Any, ...], float] = {}
        self._pending: set[Future[None]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_stats_write = 0.0
        self.reload_requested = False

    # -- one frame ------------------------------------------------------------------------

    def handle(self, frame: bytes, ts: float, linktype: int = LINKTYPE_ETHERNET) -> None:
        """Detect and record what one frame holds. Never raises for a bad packet."""
        self.stats.packets += 1
        for found in self.detector.feed(frame, ts, linktype):
            self.stats.findings[found.kind] += 1
            if isinstance(found, LeaseFinding):
                self._lease(found)
            else:
                self._bypass(found)
        self._maybe_write_stats()

    def _lease(self, found: LeaseFinding) -> None:
        try:
            self.store.upsert_lease(found.lease, found.time)
            if self.on_lease is not None:
                self.on_lease(found.lease)
            self.stats.leases += 1
        except Exception:  # noqa: BLE001 - a store failure must not stop the capture
            self.stats.errors += 1
            log.exception("could not record lease %s", found.lease)

    def _bypass(self, found: Finding) -> None:
        key = found.key
        last = self._seen.get(key)
        if last is not None and 0 <= found.time - last < self.dedupe_seconds:
            self.stats.deduped += 1
            return
        self._seen[key] = found.time
        if len(self._seen) > 100_000:
            cutoff = found.time - self.dedupe_seconds
            self._seen = {k: t for k, t in self._seen.items() if t >= cutoff}
        at = datetime.fromtimestamp(found.time, timezone.utc)
        try:
            verdict = self._decide(found, at)
            fut = self.store.commit_incident(verdict, source="sensor")
        except Exception:  # noqa: BLE001 - log, count, keep capturing
            self.stats.errors += 1
            log.exception("could not record bypass %s", found.detail)
            return
        with self._lock:
            self._pending.add(fut)
        fut.add_done_callback(self._committed)

    def _decide(self, found: Finding, at: datetime) -> Verdict:
        kwargs = dict(ip=found.client, user=None, at=at, host_only=True, kind="bypass", detail=found.detail)
        if found.host:
            try:
                return self.request(found.host, **kwargs)
            except ValueError:  # a name no browser would send: judge the address instead
                log.debug("bad host %r in %s", found.host, found.detail)
        return self.request(found.dst, **kwargs)

    def _committed(self, fut: Future[None]) -> None:
        with self._lock:
            self._pending.discard(fut)
        if fut.exception() is not None:
            self.stats.errors += 1
            log.error("could not commit bypass event: %s", fut.exception())
        else:
            self.stats.events += 1

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until every bypass event handed to the store is committed and counted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                pending = set(self._pending)
            if not pending:
                return
            # a future's waiters wake before its done-callbacks run: loop until they have
            wait_futures(pending, timeout=max(deadline - time.monotonic(), 0))
            time.sleep(0.001)

    # -- stats ----------------------------------------------------------------------------

    def stats_dict(self) -> dict[str, Any]:
        """The stats as ``filterd sensor --stats`` shows them."""
        return self.stats.as_dict(self.detector)

    def _maybe_write_stats(self, force: bool = False) -> None:
        if self.stats_path is None:
            return
        now = time.monotonic()
        if force or now - self._last_stats_write >= self.stats_seconds:
            self._last_stats_write = now
            try:
                write_stats(self.stats_path, self.stats_dict())
            except OSError as exc:
                log.warning("cannot write sensor stats to %s: %s", self.stats_path, exc)

    # -- sources --------------------------------------------------------------------------

    def replay(self, pcap_path: Path | str, *, apply_bpf: bool = True) -> dict[str, Any]:
        """Read a pcap/pcapng file to its end (streaming) and return the stats.

        With ``apply_bpf`` the packets go through the live capture filter first (libpcap in
        user space), so a replay records exactly what the live sensor would have. Without
        libpcap the replay goes on unfiltered (detection reads every packet correctly, only
        more slowly) and says so in the log.
        """
        from scapy.utils import RawPcapNgReader, RawPcapReader

        path = Path(pcap_path)
        self.stats.source = f"pcap {path}"
        try:
            reader = RawPcapReader(str(path))
        except (OSError, Exception) as exc:  # noqa: BLE001 - scapy raises Scapy_Exception for a bad file
            raise FilterdError(f"cannot read capture: {exc}", file=path) from None
        matchers: dict[int, BpfMatcher] = {}
        if apply_bpf and not libpcap_available():
            log.warning("libpcap is not installed: replaying %s without the BPF filter", path)
            apply_bpf = False
        try:
            for data, meta in reader:
                if isinstance(reader, RawPcapNgReader):
                    linktype = meta.linktype
                    ts = ((meta.tshigh << 32) + meta.tslow) / meta.tsresol
                else:
                    linktype = reader.linktype
                    ts = meta.sec + meta.usec / (1e9 if getattr(reader, "nano", False) else 1e6)
                if apply_bpf:
                    match = matchers.get(linktype)
                    if match is None:
                        match = matchers[linktype] = BpfMatcher(self.bpf, linktype)
                    if not match(data):
                        self.stats.filtered_out += 1
                        continue
                self.handle(data, ts, linktype)
        finally:
            reader.close()
        self.drain()
        self._maybe_write_stats(force=True)
        return self.stats_dict()

    def sniff(self, interface: str, bpf: str | None = None, *, handle_signals: bool = True) -> bool:
        """Capture on ``interface`` until ``stop()``, SIGTERM/SIGINT or SIGHUP; needs CAP_NET_RAW.

        Returns True when SIGHUP (``systemctl reload``) asked for a reload: the caller builds
        a new Sensor from the re-read configuration and calls ``sniff`` again. The scapy
        socket hands raw bytes (``conf.raw_layer``) to the detector: no per-packet
        dissection. Not promiscuous: on the gateway every packet worth seeing is addressed
        to it, forwarded by it, or broadcast (DHCP).
        """
        from scapy.config import conf
        from scapy.interfaces import resolve_iface
        from scapy.sendrecv import AsyncSniffer

        expression = bpf or self.bpf
        self.stats.source = f"interface {interface}"
        try:
            iface = resolve_iface(interface)
            sock = conf.L2listen(iface=iface, filter=expression, promisc=False)
        except PermissionError:
            raise FilterdError(f"capturing on {interface} needs CAP_NET_RAW "
                               "(run it as the filterd-sensor service)") from None
        except (OSError, ValueError, ImportError) as exc:
            raise FilterdError(f"cannot capture on {interface}: {exc}", field="sensor.interface") from None
        sock.LL = conf.raw_layer
        linktype = LINKTYPE_RAW if getattr(iface, "type", 1) == 65534 else LINKTYPE_ETHERNET  # ARPHRD_NONE: tun/wg

        def on_packet(pkt: Any) -> None:
            self.handle(bytes(pkt), float(pkt.time), linktype)

        sniffer = AsyncSniffer(opened_socket=sock, prn=on_packet, store=False)
        self._stop.clear()
        self.reload_requested = False
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
            signal.signal(signal.SIGHUP, lambda *_: self.stop(reload=True))
        sniffer.start()
        log.info("sensor capturing on %s with filter %s", interface, expression)
        try:
            while not self._stop.wait(min(self.stats_seconds, 1.0)):
                self._maybe_write_stats()
                if not sniffer.running:
                    raise FilterdError(f"capture on {interface} stopped: {getattr(sniffer, 'exception', None)}")
        finally:
            if sniffer.running:
                sniffer.stop(join=True)
            sock.close()
            self.drain()
            self._maybe_write_stats(force=True)
        return self.reload_requested

    def stop(self, *, reload: bool = False) -> None:
        """Ask ``sniff`` to return (from a signal handler or another thread)."""
        self.reload_requested = reload
        self._stop.set()


# ------------------------------------------------------------------------------------------
# wiring for the CLI

#: ``[sensor]`` keys this module reads, with their defaults (the config documents them).
SENSOR_DEFAULTS: dict[str, Any] = {
    "interface": "",
    "resolvers": [],
    "proxy_addresses": [],
    "school_networks": [],
    "intercepted_ports": [],
    "doh_hosts": list(DEFAULT_DOH_HOSTS),
    "dedupe_seconds": 60,
    "stats_file": "sensor-stats.json",
    "stats_seconds": 5.0,
    "bpf": "",
}


#: Where school devices are when ``[sensor] school_networks`` is empty.
PRIVATE_NETWORKS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")


def stats_path(config: Any) -> Path:
    """Where the sensor writes its stats (``[sensor] stats_file`` under the data folder)."""
    name = dict(config.sections.get("sensor", {})).get("stats_file") or SENSOR_DEFAULTS["stats_file"]
    return Path(config.data_dir) / name


def from_config(config: Any, request: Callable[..., Verdict], store: SensorStore, *,
                is_doh: Callable[[str], bool] | None = None,
                on_lease: Callable[[Lease], None] | None = None) -> Sensor:
    """A Sensor built from ``[sensor]`` (and ``[[identity.networks]]`` when
    ``school_networks`` is empty: the school's own networks are where its devices are).

    Transparent mode (``[proxy] mode`` starting with "transparent") makes TCP 80/443 the
    proxy's business unless ``intercepted_ports`` says otherwise.
    """
    section = {**SENSOR_DEFAULTS, **dict(config.sections.get("sensor", {}))}
    # Empty: the private ranges (what a school LAN uses) and any [[identity.networks]] beyond
    # them; a capture from an unexpected private subnet must not be silently ignored.
    networks = list(section["school_networks"]) or [*PRIVATE_NETWORKS, *(n["cidr"] for n in config.networks)]
    intercepted = list(section["intercepted_ports"])
    modes = dict(config.sections.get("proxy", {})).get("mode", "regular")
    modes = [modes] if isinstance(modes, str) else list(modes)
    if not intercepted and any(str(m).startswith("transparent") for m in modes):
        intercepted = [80, 443]
    for key in ("resolvers", "proxy_addresses", "school_networks"):
        values = networks if key == "school_networks" else section[key]
        for i, value in enumerate(values):
            try:
                if key == "school_networks":
                    ipaddress.ip_network(value, strict=False)
                else:
                    ipaddress.ip_address(str(value).strip("[]"))
            except ValueError:
                raise FilterdError(f"not an IP {'network' if key == 'school_networks' else 'address'}: {value!r}",
                                   file=config.file, line=config.line_of(f"sensor.{key}"),
                                   field=f"sensor.{key}[{i}]") from None
    return Sensor(
        request, store,
        resolvers=section["resolvers"], proxy_addresses=section["proxy_addresses"],
        school_networks=networks, intercepted_ports=intercepted, doh_hosts=section["doh_hosts"],
        is_doh=is_doh, dedupe_seconds=float(section["dedupe_seconds"]),
        stats_path=stats_path(config), stats_seconds=float(section["stats_seconds"]),
        on_lease=on_lease, bpf=section["bpf"] or None,
    )


def format_leases(rows: Iterable[dict[str, Any]]) -> str:
    """``filterd leases`` as a table for people (``--json`` prints the rows as JSON Lines)."""
    def when(t: float | None) -> str:
        return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds") if t else "-"

    lines = [f"{'mac':17}  {'ip':15}  {'hostname':20}  {'user':12}  {'seen':25}  expires"]
    for r in rows:
        lines.append(f"{r.get('mac') or '-':17}  {r['ip']:15}  {r.get('hostname') or '-':20}  "
                     f"{r.get('user') or '-':12}  {when(r.get('seen')):25}  {when(r.get('expires'))}")
    return "\n".join(lines)
