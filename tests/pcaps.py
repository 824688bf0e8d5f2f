"""Packets for the sensor's tests and benchmark, built with scapy (no captures in the repo).

The TLS ClientHello comes from Python's own ``ssl`` module (OpenSSL) and the QUIC Initial
from aioquic's client, so the parsers are tested on what real clients send, not on bytes
written to please them. ``dhcp_lease_pcap`` is for the end-to-end test of attribution.
"""

from __future__ import annotations

import os
import ssl
import struct
from pathlib import Path

from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw
from scapy.utils import wrpcap

T0 = 1_795_000_000.0  # Wednesday 2026-11-18 11:06:40 UTC (a school day), in unix seconds
GATEWAY_MAC = "02:00:00:00:00:01"
CLIENT_MAC = "02:00:00:00:00:2a"
SERVER_IP = "10.20.0.1"  # the gateway: DHCP server, resolver and proxy


def _eth(src: str = CLIENT_MAC, dst: str = GATEWAY_MAC, **kwargs: object) -> Ether:
    return Ether(src=src, dst=dst, **kwargs)


def client_hello(sni: str | None) -> bytes:
    """A real TLS ClientHello record (as OpenSSL sends it) naming ``sni``."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def quic_initial(sni: str) -> bytes:
    """The first datagram of a real QUIC v1 connection (aioquic client) to ``sni``."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    conn = QuicConnection(configuration=QuicConfiguration(is_client=True, server_name=sni))
    conn.connect(("192.0.2.1", 443), now=T0)
    return conn.datagrams_to_send(now=T0)[0][0]


def at(pkt: Packet, t: float) -> Packet:
    pkt.time = t
    return pkt


def dhcp_exchange(mac: str = CLIENT_MAC, ip: str = "10.20.3.7", hostname: str | None = "pupil-ipad-7",
                  lease_seconds: int | None = 3600, t: float = T0, xid: int = 0x1234ABCD,
                  hostname_in_ack: bool = False) -> list[Packet]:
    """DISCOVER, OFFER, REQUEST (with the hostname, option 12) and ACK (with the lease time)."""
    chaddr = bytes.fromhex(mac.replace(":", "")) + b"\x00" * 10
    name_opt = [("hostname", hostname.encode())] if hostname else []
    lease_opt = [("lease_time", lease_seconds)] if lease_seconds is not None else []

    def from_client(mtype: str) -> Packet:
        return (_eth(mac, "ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
                / UDP(sport=68, dport=67) / BOOTP(op=1, chaddr=chaddr, xid=xid)
                / DHCP(options=[("message-type", mtype), ("requested_addr", ip), *name_opt, "end"]))

    def from_server(mtype: str) -> Packet:
        ack_name = name_opt if hostname_in_ack else []
        return (_eth(GATEWAY_MAC, "ff:ff:ff:ff:ff:ff") / IP(src=SERVER_IP, dst="255.255.255.255")
                / UDP(sport=67, dport=68) / BOOTP(op=2, chaddr=chaddr, xid=xid, yiaddr=ip, siaddr=SERVER_IP)
                / DHCP(options=[("message-type", mtype), ("server_id", SERVER_IP), *lease_opt,
                                ("subnet_mask", "255.255.0.0"), *ack_name, "end"]))

    return [at(from_client("discover"), t), at(from_server("offer"), t + 0.01),
            at(from_client("request"), t + 0.02), at(from_server("ack"), t + 0.03)]


def dhcp_lease_pcap(path: Path, **kwargs: object) -> Path:
    """Write a pcap holding one complete DHCP exchange (see ``dhcp_exchange``)."""
    wrpcap(str(path), dhcp_exchange(**kwargs))  # type: ignore[arg-type]
    return path


def udp(src: str, dst: str, dport: int, payload: bytes, t: float = T0, sport: int = 50000) -> Packet:
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    return at(_eth() / ip / UDP(sport=sport, dport=dport) / Raw(payload), t)


def tcp(src: str, dst: str, dport: int, payload: bytes = b"", t: float = T0, sport: int = 50000,
        flags: str = "PA") -> Packet:
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    seg = TCP(sport=sport, dport=dport, flags=flags, seq=1000)
    return at(_eth() / ip / (seg / Raw(payload) if payload else seg), t)


def dns_query(src: str, dst: str, qname: str, t: float = T0, over_tcp: bool = False) -> Packet:
    msg = bytes(DNS(id=7, rd=1, qd=DNSQR(qname=qname)))
    if over_tcp:
        return tcp(src, dst, 53, struct.pack("!H", len(msg)) + msg, t)
    return udp(src, dst, 53, msg, t)


def wireguard_initiation() -> bytes:
    """A WireGuard handshake initiation: type 1, three reserved zeros, 144 more bytes."""
    return b"\x01\x00\x00\x00" + os.urandom(144)


def openvpn_hard_reset(tcp_framing: bool = False) -> bytes:
    """P_CONTROL_HARD_RESET_CLIENT_V2 (opcode 7, key id 0), session id, packet-id array."""
    msg = bytes([7 << 3]) + os.urandom(8) + b"\x00" + b"\x00\x00\x00\x00"
    return struct.pack("!H", len(msg)) + msg if tcp_framing else msg


def ike_sa_init(nat_t: bool = False) -> bytes:
    """An IKEv2 IKE_SA_INIT header (responder SPI zero); with ``nat_t`` the 4-byte marker."""
    header = os.urandom(8) + b"\x00" * 8 + bytes([33, 0x20, 34, 0x08]) + b"\x00" * 4 + struct.pack("!I", 28)
    return (b"\x00\x00\x00\x00" + header) if nat_t else header


def esp(src: str, dst: str, seq: int = 1, t: float = T0) -> Packet:
    return at(_eth() / IP(src=src, dst=dst, proto=50) / Raw(struct.pack("!II", 0xC0FFEE, seq) + os.urandom(64)), t)
