"""What the gateway sensor sees in one packet: DHCP leases and attempts to get round the proxy.

Pure detection, no capture and no storage: ``Detector.feed(frame, ts)`` takes the raw bytes
of one captured frame and returns what it found in it, so every rule can be tested with a
packet built in a test and the sensor (``filterd.sensor``) only moves bytes in and findings
out.

Why raw bytes and not scapy's dissection: scapy builds a Python object per layer (about
100 µs a packet); the sensor must keep up with ≥ 20,000 packets/s on two cores, so the
headers are read with ``struct`` and only the payloads that matter are parsed:

* DHCP (UDP 67/68): a DHCPACK gives a ``Lease`` (client MAC ``chaddr``, ``yiaddr``, the
  hostname (option 12) from the ACK or from the client's DISCOVER/REQUEST with the same
  ``xid``, and the lease time (option 51) as start/expires);
* DNS (UDP/TCP 53) to a resolver that is not the school's, DNS over TLS (TCP 853), DoH to a
  known endpoint (a ClientHello whose SNI is a known DoH host), QUIC (UDP 443 long-header
  Initial packets, SNI decrypted from the Initial with mitmproxy's QUIC parser), a TLS
  ClientHello straight to port 443 past the proxy (SNI read by mitmproxy's ``ClientHello``),
  and VPNs: WireGuard handshake initiations (any UDP port), OpenVPN hard resets (UDP/TCP
  1194), IPsec (IKE on UDP 500/4500, ESP).

A packet that claims to be one of these but does not parse (truncated DHCP, garbage TLS,
bad DNS) gives nothing but a counted skip (``Detector.skips``): hostile or broken traffic
must never stop the sensor or invent an event.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from filterd.identify import Lease

log = logging.getLogger("filterd.detect")

#: Link types (pcap LINKTYPE_*) the detector reads.
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # raw IPv4/IPv6 (WireGuard and tun interfaces)
LINKTYPE_LINUX_SLL = 113
_RAW_LINKTYPES = {LINKTYPE_RAW, 12, 14, 228, 229}

#: The kinds of finding, in the order ``filterd sensor --stats`` lists them.
KINDS = ("dhcp", "dns", "dot", "doh", "quic", "tls", "wireguard", "openvpn", "ipsec")

#: Well-known DNS-over-HTTPS endpoints (a domain matches itself and its subdomains).
DEFAULT_DOH_HOSTS = (
    "dns.google",
    "dns.google.com",
    "cloudflare-dns.com",  # also mozilla.cloudflare-dns.com, chrome.cloudflare-dns.com
    "one.one.one.one",
    "1dot1dot1dot1.cloudflare-dns.com",
    "dns.quad9.net",
    "doh.opendns.com",
    "dns.adguard.com",
    "dns.adguard-dns.com",
    "dns.nextdns.io",
    "doh.cleanbrowsing.org",
    "doh.mullvad.net",
    "dns.controld.com",
)

_QUIC_VERSIONS = {0x00000001, 0x6B3343CF}  # v1, v2 (draft versions 0xff0000xx also accepted)
_OPENVPN_HARD_RESET_CLIENT = {1, 7, 10}  # P_CONTROL_HARD_RESET_CLIENT_V1/V2/V3


@dataclass(frozen=True, slots=True)
class Finding:
    """One bypass attempt: who (``client``), where to (``dst``:``port``), what (``host``)."""

    kind: str  # one of KINDS except "dhcp"
    client: str
    dst: str
    port: int | None  # None for ESP
    host: str | None  # SNI or DNS query name, when the packet names one
    detail: str  # for people: "DoT to 1.1.1.1:853 (SNI one.one.one.one)"
    time: float  # unix seconds, the packet's capture time

    @property
    def key(self) -> tuple[str, str, str, int | None, str | None]:
        """What makes two findings "the same" for de-duplication."""
        return (self.client, self.kind, self.dst, self.port, self.host)


@dataclass(frozen=True, slots=True)
class LeaseFinding:
    """A DHCPACK: the lease it grants, seen at ``time``."""

    lease: Lease
    time: float
    kind: str = "dhcp"


class Malformed(ValueError):
    """A packet on a port we parse whose payload does not parse; counted, never raised out."""


def _fmt(dst: str, port: int | None) -> str:
    if port is None:
        return dst
    return f"[{dst}]:{port}" if ":" in dst else f"{dst}:{port}"


def host_in(host: str, domains: frozenset[str]) -> bool:
    """Whether ``host`` is one of ``domains`` or a subdomain of one (label boundaries)."""
    h = host.lower().rstrip(".")
    while True:
        if h in domains:
            return True
        dot = h.find(".")
        if dot < 0:
            return False
        h = h[dot + 1:]


# ------------------------------------------------------------------------------------------
# payload parsers (pure functions; each raises Malformed)


def dns_qname(payload: bytes) -> str | None:
    """The first question's name of a DNS query; None for a response. Malformed if bad."""
    if len(payload) < 12:
        raise Malformed("bad dns: short header")
    flags, qdcount = struct.unpack_from("!HH", payload, 2)
    if flags & 0x8000:
        return None  # a response (QR set) sent to port 53: not a client's question
    if qdcount < 1:
        raise Malformed("bad dns: no question")
    labels: list[str] = []
    i = 12
    total = 0
    while True:
        if i >= len(payload):
            raise Malformed("bad dns: truncated name")
        n = payload[i]
        if n == 0:
            i += 1
            break
        if n & 0xC0:
            raise Malformed("bad dns: compressed or extended label in a question")
        label = payload[i + 1:i + 1 + n]
        if len(label) != n:
            raise Malformed("bad dns: truncated label")
        total += n + 1
        if total > 255:
            raise Malformed("bad dns: name too long")
        try:
            labels.append(label.decode("ascii").lower())
        except UnicodeDecodeError:
            raise Malformed("bad dns: non-ASCII label") from None
        i += 1 + n
    if len(payload) < i + 4:
        raise Malformed("bad dns: truncated question")
    return ".".join(labels) or "."


def _handshake_bytes(data: bytes) -> tuple[bytes, bool]:
    """Concatenate the handshake records at the start of ``data``.

    Returns (handshake bytes, whether the whole first handshake message is there). A
    ClientHello with a post-quantum key share is larger than one TCP segment: then only
    its start is here, and the SNI may or may not be in it.
    """
    out = bytearray()
    i = 0
    while i + 5 <= len(data):
        ctype, major, minor, length = data[i], data[i + 1], data[i + 2], (data[i + 3] << 8) | data[i + 4]
        if ctype != 0x16 or major != 3 or minor > 4 or length == 0 or length > 18432:
            if not out:
                raise Malformed("bad tls: not a handshake record")
            break
        out += data[i + 5:i + 5 + length]
        i += 5 + length
        if len(out) >= 4:
            need = 4 + ((out[1] << 16) | (out[2] << 8) | out[3])
            if len(out) >= need:
                return bytes(out[:need]), True
    if not out:
        raise Malformed("bad tls: truncated record header")
    return bytes(out), False


def _sni_partial(body: bytes) -> str | None:
    """The SNI from the start of a ClientHello body cut short by a segment boundary.

    Walks the same fields as a full parser but stops quietly when the bytes run out: used
    only when the message is incomplete, where mitmproxy's parser cannot run.
    """
    try:
        i = 2 + 32  # version, random
        i += 1 + body[i]  # session id
        i += 2 + int.from_bytes(body[i:i + 2], "big")  # cipher suites
        i += 1 + body[i]  # compression methods
        i += 2  # extensions length
        while i + 4 <= len(body):
            etype = int.from_bytes(body[i:i + 2], "big")
            elen = int.from_bytes(body[i + 2:i + 4], "big")
            ext = body[i + 4:i + 4 + elen]
            if etype == 0 and len(ext) == elen:
                # server_name_list: length(2), type(1) = 0 host_name, length(2), name
                if len(ext) >= 5 and ext[2] == 0:
                    n = int.from_bytes(ext[3:5], "big")
                    name = ext[5:5 + n]
                    if len(name) == n:
                        return name.decode("ascii").lower()
                return None
            i += 4 + elen
    except (IndexError, UnicodeDecodeError):
        return None
    return None


def tls_client_hello_sni(payload: bytes) -> tuple[str | None, bool]:
    """(SNI or None, complete) of the TLS ClientHello at the start of a TCP payload.

    A complete ClientHello is parsed by mitmproxy's ``ClientHello`` (the parser the proxy
    itself trusts; it takes the handshake message body, without the record header and the
    4-byte handshake header). Malformed when it is not a ClientHello or does not parse.
    """
    hs, complete = _handshake_bytes(payload)
    if hs[0] != 1:
        raise Malformed("bad tls: not a ClientHello")
    if not complete:
        return _sni_partial(hs[4:]), False
    from mitmproxy.tls import ClientHello

    try:
        sni = ClientHello(hs[4:]).sni
    except Exception as exc:  # kaitai raises EOFError, ValidationError, UnicodeError...
        raise Malformed(f"bad tls: {type(exc).__name__}") from None
    return (sni.lower().rstrip(".") if sni else None), True


def quic_initial(payload: bytes) -> tuple[int, bytes]:
    """(version, destination connection id) of a client's QUIC Initial; Malformed otherwise.

    Only long-header packets reach here (the BPF filter checks the high bit). An Initial
    is a long header of type Initial in a known version, padded to >= 1200 bytes by the
    client (RFC 9000 §14.1), which keeps random UDP/443 garbage out.
    """
    if len(payload) < 7 or not payload[0] & 0x80:
        raise Malformed("bad quic: short or not a long header")
    version = int.from_bytes(payload[1:5], "big")
    if version not in _QUIC_VERSIONS and version >> 8 != 0xFF0000:
        raise Malformed("bad quic: unknown version")
    ptype = (payload[0] & 0x30) >> 4
    initial_type = 1 if version == 0x6B3343CF else 0
    if ptype != initial_type:
        raise Malformed("bad quic: not an Initial")
    dcid_len = payload[5]
    if dcid_len > 20 or len(payload) < 6 + dcid_len:
        raise Malformed("bad quic: bad connection id")
    if len(payload) < 1200:
        raise Malformed("bad quic: Initial shorter than 1200 bytes")
    return version, payload[6:6 + dcid_len]


def quic_sni(datagram: bytes) -> str | None:
    """The SNI inside a QUIC Initial (decrypted with mitmproxy's aioquic-based parser).

    None when the ClientHello does not fit in this one datagram (large post-quantum key
    shares) or aioquic is missing; the finding is made all the same.
    """
    try:
        from mitmproxy.proxy.layers.quic import quic_parse_client_hello_from_datagrams
    except ImportError:  # pragma: no cover - aioquic is a mitmproxy dependency
        return None
    try:
        hello = quic_parse_client_hello_from_datagrams([datagram])
    except Exception:  # noqa: BLE001 - third-party crypto parser on hostile input
        return None
    if hello is None or not hello.sni:
        return None
    return hello.sni.lower().rstrip(".")


def _dhcp_options(data: bytes) -> dict[int, bytes]:
    if len(data) < 240 or data[236:240] != b"\x63\x82\x53\x63":
        raise Malformed("bad dhcp: truncated or no magic cookie")
    opts: dict[int, bytes] = {}
    i = 240
    while i < len(data):
        code = data[i]
        if code == 255:
            break
        if code == 0:
            i += 1
            continue
        if i + 1 >= len(data):
            raise Malformed("bad dhcp: truncated option")
        n = data[i + 1]
        value = data[i + 2:i + 2 + n]
        if len(value) != n:
            raise Malformed("bad dhcp: truncated option")
        opts[code] = opts.get(code, b"") + value  # RFC 3396: long options are split
        i += 2 + n
    if 53 not in opts or len(opts[53]) != 1:
        raise Malformed("bad dhcp: no message type")
    return opts


def _hostname(value: bytes | None) -> str | None:
    if not value:
        return None
    name = value.rstrip(b"\x00").decode("ascii", "replace").strip().lower()
    return name or None


# ------------------------------------------------------------------------------------------
# the detector


class Detector:
    """Turns frames into findings; keeps only the small state detection needs.

    State: recent DHCP client hostnames (by xid and MAC, bounded), recent QUIC flows (so the
    Initial of a flow is decrypted once, not for each retransmission) and the counters.
    """

    def __init__(
        self,
        *,
        resolvers: Iterable[str] = (),
        proxy_addresses: Iterable[str] = (),
        school_networks: Iterable[str] = (),
        intercepted_ports: Iterable[int] = (),
        doh_hosts: Iterable[str] = DEFAULT_DOH_HOSTS,
        is_doh: Callable[[str], bool] | None = None,
    ) -> None:
        self.resolvers = frozenset(_canon_ip(a) for a in resolvers)
        self.proxy_addresses = frozenset(_canon_ip(a) for a in proxy_addresses)
        self.school_networks = tuple(ipaddress.ip_network(n, strict=False) for n in school_networks)
        self.intercepted_ports = frozenset(int(p) for p in intercepted_ports)
        self.doh_hosts = frozenset(h.lower().rstrip(".") for h in doh_hosts)
        self.is_doh = is_doh
        self.packets = 0
        self.skips: Counter[str] = Counter()
        self.ignored = 0
        self._school_cache: dict[str, bool] = {}
        self._dhcp_names: OrderedDict[tuple[int, str], str] = OrderedDict()
        self._dhcp_mac_names: OrderedDict[str, str] = OrderedDict()
        self._quic_flows: OrderedDict[tuple[str, int, str, int], tuple[float, str | None]] = OrderedDict()

    # -- entry points ---------------------------------------------------------------------

    def feed(self, frame: bytes, ts: float, linktype: int = LINKTYPE_ETHERNET) -> list[Finding | LeaseFinding]:
        """Everything found in one captured frame; [] for uninteresting or malformed ones."""
        self.packets += 1
        try:
            return self._frame(frame, ts, linktype)
        except Malformed as exc:
            self.skips[str(exc).split(":", 1)[0]] += 1
            log.debug("skipped packet at %s: %s", ts, exc)
            return []
        except (IndexError, struct.error, ValueError) as exc:
            self.skips["bad packet"] += 1
            log.debug("skipped packet at %s: %r", ts, exc)
            return []

    def feed_packet(self, pkt: object) -> list[Finding | LeaseFinding]:
        """A scapy packet (``Ether``/``IP``/``IPv6``...): its bytes and capture time."""
        from scapy.layers.inet import IP
        from scapy.layers.inet6 import IPv6

        linktype = LINKTYPE_RAW if isinstance(pkt, (IP, IPv6)) else LINKTYPE_ETHERNET
        return self.feed(bytes(pkt), float(getattr(pkt, "time", 0.0)), linktype)  # type: ignore[arg-type]

    # -- layers ---------------------------------------------------------------------------

    def _frame(self, f: bytes, ts: float, linktype: int) -> list[Finding | LeaseFinding]:
        if linktype == LINKTYPE_ETHERNET:
            if len(f) < 14:
                raise Malformed("bad packet: short ethernet header")
            etype = (f[12] << 8) | f[13]
            off = 14
            while etype in (0x8100, 0x88A8) and len(f) >= off + 4:  # VLAN tags
                etype = (f[off + 2] << 8) | f[off + 3]
                off += 4
        elif linktype == LINKTYPE_LINUX_SLL:
            if len(f) < 16:
                raise Malformed("bad packet: short SLL header")
            etype, off = (f[14] << 8) | f[15], 16
        elif linktype in _RAW_LINKTYPES:
            if not f:
                raise Malformed("bad packet: empty")
            etype, off = (0x0800 if f[0] >> 4 == 4 else 0x86DD), 0
        else:
            self.ignored += 1
            return []
        if etype == 0x0800:
            return self._ipv4(f, off, ts)
        if etype == 0x86DD:
            return self._ipv6(f, off, ts)
        self.ignored += 1
        return []

    def _ipv4(self, f: bytes, off: int, ts: float) -> list[Finding | LeaseFinding]:
        if len(f) < off + 20 or f[off] >> 4 != 4:
            raise Malformed("bad packet: truncated IPv4 header")
        ihl = (f[off] & 0x0F) * 4
        total = (f[off + 2] << 8) | f[off + 3]
        if ihl < 20 or total < ihl:
            raise Malformed("bad packet: bad IPv4 header")
        if ((f[off + 6] & 0x1F) << 8) | f[off + 7]:  # a later fragment: no transport header
            self.ignored += 1
            return []
        proto = f[off + 9]
        src = socket.inet_ntop(socket.AF_INET, f[off + 12:off + 16])
        dst = socket.inet_ntop(socket.AF_INET, f[off + 16:off + 20])
        return self._transport(proto, src, dst, f[off + ihl:off + total], ts)

    def _ipv6(self, f: bytes, off: int, ts: float) -> list[Finding | LeaseFinding]:
        if len(f) < off + 40 or f[off] >> 4 != 6:
            raise Malformed("bad packet: truncated IPv6 header")
        plen = (f[off + 4] << 8) | f[off + 5]
        proto = f[off + 6]
        src = socket.inet_ntop(socket.AF_INET6, f[off + 8:off + 24])
        dst = socket.inet_ntop(socket.AF_INET6, f[off + 24:off + 40])
        return self._transport(proto, src, dst, f[off + 40:off + 40 + plen], ts)

    def _transport(self, proto: int, src: str, dst: str, seg: bytes, ts: float) -> list[Finding | LeaseFinding]:
        if proto == 17:
            if len(seg) < 8:
                raise Malformed("bad packet: truncated UDP header")
            sport, dport, ulen = struct.unpack_from("!HHH", seg)
            payload = seg[8:ulen] if 8 <= ulen <= len(seg) else seg[8:]
            if sport in (67, 68) and dport in (67, 68):
                return self._dhcp(payload, ts)
            if not self._from_client(src, dst):
                return []
            return self._udp(src, dst, dport, payload, ts)
        if proto == 6:
            if len(seg) < 20:
                raise Malformed("bad packet: truncated TCP header")
            dport = (seg[2] << 8) | seg[3]
            doff = (seg[12] >> 4) * 4
            if doff < 20 or len(seg) < doff:
                raise Malformed("bad packet: bad TCP header")
            payload = seg[doff:]
            if not payload:
                self.ignored += 1  # SYN, ACK: nothing to read yet
                return []
            if not self._from_client(src, dst):
                return []
            return self._tcp(src, dst, dport, payload, ts)
        if proto == 50:
            if not self._from_client(src, dst):
                return []
            if len(seg) < 8:
                raise Malformed("bad ipsec: truncated ESP header")
            spi = int.from_bytes(seg[:4], "big")
            return [Finding("ipsec", src, dst, None, None, f"IPsec ESP to {dst} (SPI {spi:#010x})", ts)]
        self.ignored += 1
        return []

    def _from_client(self, src: str, dst: str) -> bool:
        """A packet from a school device to somewhere else: the only direction that counts."""
        if src in self.proxy_addresses or dst in self.proxy_addresses:
            self.ignored += 1
            return False
        if not self.school_networks:
            return True
        inside = self._school_cache.get(src)
        if inside is None:
            addr = ipaddress.ip_address(src)
            inside = any(addr in n for n in self.school_networks)
            if len(self._school_cache) > 65536:
                self._school_cache.clear()
            self._school_cache[src] = inside
        if not inside:
            self.ignored += 1
        return inside

    def _school_resolver(self, dst: str) -> bool:
        """DNS to this address is the school's own: a configured resolver or, when none is
        configured, any private address (the school's resolvers are inside its network;
        an outside resolver such as 8.8.8.8 is the bypass to report)."""
        if self.resolvers:
            return dst in self.resolvers
        try:
            return ipaddress.ip_address(dst).is_private
        except ValueError:
            return False

    # -- UDP and TCP ----------------------------------------------------------------------

    def _udp(self, src: str, dst: str, dport: int, p: bytes, ts: float) -> list[Finding | LeaseFinding]:
        if dport == 53:
            if self._school_resolver(dst):
                self.ignored += 1
                return []
            name = dns_qname(p)
            if name is None:
                self.ignored += 1
                return []
            return [Finding("dns", src, dst, 53, name, f"DNS to {_fmt(dst, 53)} ({name})", ts)]
        if len(p) == 148 and p[0] == 1 and p[1:4] == b"\x00\x00\x00":
            return [Finding("wireguard", src, dst, dport, None,
                            f"WireGuard handshake to {_fmt(dst, dport)}", ts)]
        if dport == 443:  # QUIC is never intercepted: the proxy only receives TCP
            if not p or not p[0] & 0x80:
                self.ignored += 1  # short-header QUIC: the flow was reported at its Initial
                return []
            return self._quic(src, dst, dport, p, ts)
        if dport == 1194:
            if len(p) < 9:
                raise Malformed("bad openvpn: short packet")
            if p[0] >> 3 in _OPENVPN_HARD_RESET_CLIENT and p[0] & 7 == 0:
                return [Finding("openvpn", src, dst, dport, None,
                                f"OpenVPN (UDP) to {_fmt(dst, dport)}", ts)]
            self.ignored += 1
            return []
        if dport in (500, 4500):
            return self._ike(src, dst, dport, p, ts)
        self.ignored += 1
        return []

    def _quic(self, src: str, dst: str, dport: int, p: bytes, ts: float) -> list[Finding | LeaseFinding]:
        version, _dcid = quic_initial(p)
        flow = (src, 0, dst, dport)
        cached = self._quic_flows.get(flow)
        if cached is not None and ts - cached[0] < 30:
            host = cached[1]
        else:
            host = quic_sni(p)
            self._quic_flows[flow] = (ts, host)
            self._quic_flows.move_to_end(flow)
            while len(self._quic_flows) > 4096:
                self._quic_flows.popitem(last=False)
        kind = "doh" if host and self._doh(host) else "quic"
        what = "DoH over QUIC" if kind == "doh" else "QUIC"
        sni = f" (SNI {host})" if host else ""
        return [Finding(kind, src, dst, dport, host, f"{what} to {_fmt(dst, dport)}{sni}", ts)]

    def _ike(self, src: str, dst: str, dport: int, p: bytes, ts: float) -> list[Finding | LeaseFinding]:
        if dport == 4500:
            if p == b"\xff":
                self.ignored += 1  # NAT keepalive
                return []
            if len(p) >= 8 and p[:4] != b"\x00\x00\x00\x00":
                spi = int.from_bytes(p[:4], "big")
                return [Finding("ipsec", src, dst, dport, None,
                                f"IPsec ESP-in-UDP to {_fmt(dst, dport)} (SPI {spi:#010x})", ts)]
            p = p[4:]
        if len(p) < 28:
            raise Malformed("bad ike: short header")
        version, length = p[17], int.from_bytes(p[24:28], "big")
        if version not in (0x10, 0x20) or length < 28:
            raise Malformed("bad ike: not an IKE header")
        return [Finding("ipsec", src, dst, dport, None,
                        f"IPsec IKEv{version >> 4} to {_fmt(dst, dport)}", ts)]

    def _tcp(self, src: str, dst: str, dport: int, p: bytes, ts: float) -> list[Finding | LeaseFinding]:
        if dport == 53:
            if self._school_resolver(dst):
                self.ignored += 1
                return []
            if len(p) < 14:
                raise Malformed("bad dns: short TCP message")
            name = dns_qname(p[2:])
            if name is None:
                self.ignored += 1
                return []
            return [Finding("dns", src, dst, 53, name, f"DNS (TCP) to {_fmt(dst, 53)} ({name})", ts)]
        if dport == 853:
            host, _ = tls_client_hello_sni(p)
            sni = f" (SNI {host})" if host else ""
            return [Finding("dot", src, dst, 853, host, f"DoT to {_fmt(dst, 853)}{sni}", ts)]
        if dport == 443 and dport not in self.intercepted_ports:
            if p[0] != 0x16:
                self.ignored += 1  # a later segment of a flow already reported at its ClientHello
                return []
            host, complete = tls_client_hello_sni(p)
            if host and self._doh(host):
                return [Finding("doh", src, dst, 443, host, f"DoH to {host} ({_fmt(dst, 443)})", ts)]
            where = f"{host} ({_fmt(dst, 443)})" if host else _fmt(dst, 443)
            note = "" if host or complete else ", SNI not in the first segment"
            return [Finding("tls", src, dst, 443, host, f"TLS to {where} past the proxy{note}", ts)]
        if dport == 1194:
            if len(p) < 3:
                raise Malformed("bad openvpn: short packet")
            if p[2] >> 3 in _OPENVPN_HARD_RESET_CLIENT and p[2] & 7 == 0:
                return [Finding("openvpn", src, dst, dport, None, f"OpenVPN (TCP) to {_fmt(dst, dport)}", ts)]
        self.ignored += 1
        return []

    def _doh(self, host: str) -> bool:
        if host_in(host, self.doh_hosts):
            return True
        if self.is_doh is not None:
            try:
                return bool(self.is_doh(host))
            except ValueError:
                return False
        return False

    # -- DHCP -----------------------------------------------------------------------------

    def _dhcp(self, p: bytes, ts: float) -> list[Finding | LeaseFinding]:
        opts = _dhcp_options(p)
        op, htype, hlen = p[0], p[1], p[2]
        if htype != 1 or hlen != 6:
            raise Malformed("bad dhcp: not an Ethernet client address")
        xid = int.from_bytes(p[4:8], "big")
        mac = ":".join(f"{b:02x}" for b in p[28:34])
        mtype = opts[53][0]
        name = _hostname(opts.get(12))
        if op == 1:  # from the client: remember its hostname for the ACK to come
            if mtype in (1, 3) and name:  # DISCOVER, REQUEST
                _remember(self._dhcp_names, (xid, mac), name)
                _remember(self._dhcp_mac_names, mac, name)
            self.ignored += 1
            return []
        if mtype != 5:  # only a DHCPACK grants a lease
            self.ignored += 1
            return []
        yiaddr = socket.inet_ntop(socket.AF_INET, p[16:20])
        if yiaddr == "0.0.0.0":  # ACK to an INFORM: no lease
            self.ignored += 1
            return []
        name = name or self._dhcp_names.get((xid, mac)) or self._dhcp_mac_names.get(mac)
        expires = None
        lt = opts.get(51)
        if lt is not None:
            if len(lt) != 4:
                raise Malformed("bad dhcp: bad lease time")
            seconds = int.from_bytes(lt, "big")
            expires = None if seconds == 0xFFFFFFFF else ts + seconds
        return [LeaseFinding(Lease(mac=mac, ip=yiaddr, hostname=name, user=None, start=ts, expires=expires), ts)]


def _remember(d: OrderedDict, key: object, value: str, limit: int = 4096) -> None:  # type: ignore[type-arg]
    d[key] = value
    d.move_to_end(key)
    while len(d) > limit:
        d.popitem(last=False)


def _canon_ip(text: str) -> str:
    """The address as ``inet_ntop`` spells it, so set lookups match packet addresses."""
    return str(ipaddress.ip_address(text.strip().strip("[]")))
