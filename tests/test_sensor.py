"""The gateway sensor: detection on generated packets, the BPF filter, dedupe, replay into a
real Store, attribution of a leased address, stats, and a live capture on loopback."""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from scapy.packet import Packet, Raw
from scapy.utils import wrpcap

from filterd import detect
from filterd.decide import Policy, Rule
from filterd.detect import Detector, Finding, LeaseFinding
from filterd.errors import FilterdError
from filterd.identify import Directory, Identifier, Lease, LeaseTable, Network, User
from filterd.record import Store
from filterd.sensor import BpfMatcher, Sensor, bpf_filter, format_stats, read_stats
from filterd.verdict import Verdict, What
import pcaps  # tests/pcaps.py: tests/ is on sys.path under pytest's default import mode
from pcaps import T0, at, dns_query, esp, tcp, udp

PUPIL = "10.20.3.7"
PUPIL6 = "fd00:20::7"
GATEWAY = pcaps.SERVER_IP
CONFIG = dict(resolvers=[GATEWAY], proxy_addresses=[GATEWAY], school_networks=["10.20.0.0/16", "fd00:20::/48"])


def detector() -> Detector:
    return Detector(**CONFIG)


def feed(d: Detector, pkt: Packet) -> list[Finding | LeaseFinding]:
    return d.feed_packet(pkt)


# ------------------------------------------------------------------------------------------
# detection: one packet, one finding


BYPASSES = [
    ("dns-udp", lambda: dns_query(PUPIL, "8.8.8.8", "example.com"),
     "dns", "8.8.8.8", 53, "example.com", "DNS to 8.8.8.8:53 (example.com)"),
    ("dns-tcp", lambda: dns_query(PUPIL, "9.9.9.9", "WWW.Example.org.", over_tcp=True),
     "dns", "9.9.9.9", 53, "www.example.org", "DNS (TCP) to 9.9.9.9:53 (www.example.org)"),
    ("dns-ipv6", lambda: dns_query(PUPIL6, "2001:4860:4860::8888", "example.com"),
     "dns", "2001:4860:4860::8888", 53, "example.com", "DNS to [2001:4860:4860::8888]:53 (example.com)"),
    ("dot", lambda: tcp(PUPIL, "1.1.1.1", 853, pcaps.client_hello("one.one.one.one")),
     "dot", "1.1.1.1", 853, "one.one.one.one", "DoT to 1.1.1.1:853 (SNI one.one.one.one)"),
    ("doh", lambda: tcp(PUPIL, "104.16.248.249", 443, pcaps.client_hello("mozilla.cloudflare-dns.com")),
     "doh", "104.16.248.249", 443, "mozilla.cloudflare-dns.com",
     "DoH to mozilla.cloudflare-dns.com (104.16.248.249:443)"),
    ("doh-google", lambda: tcp(PUPIL, "8.8.4.4", 443, pcaps.client_hello("dns.google")),
     "doh", "8.8.4.4", 443, "dns.google", "DoH to dns.google (8.8.4.4:443)"),
    ("tls-past-proxy", lambda: tcp(PUPIL, "203.0.113.9", 443, pcaps.client_hello("www.tiktok.com")),
     "tls", "203.0.113.9", 443, "www.tiktok.com", "TLS to www.tiktok.com (203.0.113.9:443) past the proxy"),
    ("tls-ipv6", lambda: tcp(PUPIL6, "2001:db8::9", 443, pcaps.client_hello("www.tiktok.com")),
     "tls", "2001:db8::9", 443, "www.tiktok.com", "TLS to www.tiktok.com ([2001:db8::9]:443) past the proxy"),
    ("quic", lambda: udp(PUPIL, "142.250.1.1", 443, pcaps.quic_initial("www.youtube.com")),
     "quic", "142.250.1.1", 443, "www.youtube.com", "QUIC to 142.250.1.1:443 (SNI www.youtube.com)"),
    ("doh-quic", lambda: udp(PUPIL, "8.8.8.8", 443, pcaps.quic_initial("dns.google")),
     "doh", "8.8.8.8", 443, "dns.google", "DoH over QUIC to 8.8.8.8:443 (SNI dns.google)"),
    ("wireguard", lambda: udp(PUPIL, "198.51.100.4", 51820, pcaps.wireguard_initiation()),
     "wireguard", "198.51.100.4", 51820, None, "WireGuard handshake to 198.51.100.4:51820"),
    ("wireguard-any-port", lambda: udp(PUPIL, "198.51.100.4", 4242, pcaps.wireguard_initiation()),
     "wireguard", "198.51.100.4", 4242, None, "WireGuard handshake to 198.51.100.4:4242"),
    ("openvpn-udp", lambda: udp(PUPIL, "198.51.100.5", 1194, pcaps.openvpn_hard_reset()),
     "openvpn", "198.51.100.5", 1194, None, "OpenVPN (UDP) to 198.51.100.5:1194"),
    ("openvpn-tcp", lambda: tcp(PUPIL, "198.51.100.5", 1194, pcaps.openvpn_hard_reset(tcp_framing=True)),
     "openvpn", "198.51.100.5", 1194, None, "OpenVPN (TCP) to 198.51.100.5:1194"),
    ("ike", lambda: udp(PUPIL, "198.51.100.6", 500, pcaps.ike_sa_init(), sport=500),
     "ipsec", "198.51.100.6", 500, None, "IPsec IKEv2 to 198.51.100.6:500"),
    ("ike-nat-t", lambda: udp(PUPIL, "198.51.100.6", 4500, pcaps.ike_sa_init(nat_t=True), sport=4500),
     "ipsec", "198.51.100.6", 4500, None, "IPsec IKEv2 to 198.51.100.6:4500"),
    ("esp", lambda: esp(PUPIL, "198.51.100.6"),
     "ipsec", "198.51.100.6", None, None, "IPsec ESP to 198.51.100.6 (SPI 0x00c0ffee)"),
]


@pytest.mark.parametrize(("make", "kind", "dst", "port", "host", "detail"),
                         [c[1:] for c in BYPASSES], ids=[c[0] for c in BYPASSES])
def test_each_bypass_is_found(make, kind, dst, port, host, detail) -> None:
    d = detector()
    found = feed(d, make())
    assert found == [Finding(kind, PUPIL6 if ":" in dst else PUPIL, dst, port, host, detail, T0)]
    assert not d.skips


NOT_BYPASSES = [
    ("dns-to-school-resolver", lambda: dns_query(PUPIL, GATEWAY, "example.com")),
    ("dns-response", lambda: udp(PUPIL, "8.8.8.8", 53, bytes.fromhex("00078180000100000000000000"))),
    ("from-outside-school", lambda: dns_query("192.0.2.50", "8.8.8.8", "example.com")),
    ("tls-to-proxy", lambda: tcp(PUPIL, GATEWAY, 443, pcaps.client_hello("www.tiktok.com"))),
    ("http-to-proxy-port", lambda: tcp(PUPIL, GATEWAY, 8080, b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")),
    ("tls-app-data", lambda: tcp(PUPIL, "203.0.113.9", 443, b"\x17\x03\x03\x00\x05hello")),
    ("tcp-syn", lambda: tcp(PUPIL, "203.0.113.9", 443, flags="S")),
    ("quic-short-header", lambda: udp(PUPIL, "142.250.1.1", 443, b"\x41" + os.urandom(60))),
    ("ipsec-keepalive", lambda: udp(PUPIL, "198.51.100.6", 4500, b"\xff", sport=4500)),
    ("openvpn-data", lambda: udp(PUPIL, "198.51.100.5", 1194, bytes([9 << 3]) + os.urandom(40))),
    ("plain-udp", lambda: udp(PUPIL, "198.51.100.7", 3478, os.urandom(100))),
    ("arp", lambda: at(pcaps._eth() / Raw(b""), T0)),
]


@pytest.mark.parametrize("make", [c[1] for c in NOT_BYPASSES], ids=[c[0] for c in NOT_BYPASSES])
def test_ordinary_traffic_is_not_a_bypass(make) -> None:
    d = detector()
    assert feed(d, make()) == []
    assert not d.skips


def test_transparent_mode_443_is_the_proxy_s_business() -> None:
    d = Detector(**CONFIG, intercepted_ports=[443])
    assert feed(d, tcp(PUPIL, "203.0.113.9", 443, pcaps.client_hello("www.tiktok.com"))) == []
    assert feed(d, udp(PUPIL, "142.250.1.1", 443, pcaps.quic_initial("a.example")))[0].kind == "quic"


def test_configured_doh_check_is_asked() -> None:
    d = Detector(**CONFIG, doh_hosts=(), is_doh=lambda h: h == "doh.school-lists.example")
    found = feed(d, tcp(PUPIL, "203.0.113.9", 443, pcaps.client_hello("doh.school-lists.example")))
    assert found[0].kind == "doh"
    assert feed(d, tcp(PUPIL, "203.0.113.9", 443, pcaps.client_hello("dns.google")))[0].kind == "tls"


def test_client_hello_split_across_segments() -> None:
    record = pcaps.client_hello("www.tiktok.com")
    # the SNI (OpenSSL sends it first) survives when the key shares are cut off...
    first = feed(detector(), tcp(PUPIL, "203.0.113.9", 443, record[:-120]))
    assert first[0].host == "www.tiktok.com"
    # ...and when it is cut off too, the attempt is still reported, without a host
    d = detector()
    cut = feed(d, tcp(PUPIL, "203.0.113.9", 443, record[:60]))
    assert cut[0].host is None
    assert cut[0].detail == "TLS to 203.0.113.9:443 past the proxy, SNI not in the first segment"


def test_mitmproxy_parser_agrees_with_the_tolerant_walker() -> None:
    record = pcaps.client_hello("a.b.example")
    assert detect.tls_client_hello_sni(record) == ("a.b.example", True)
    assert detect._sni_partial(record[9:]) == "a.b.example"


def test_quic_initial_is_decrypted_once_per_flow(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = detect.quic_sni
    monkeypatch.setattr(detect, "quic_sni", lambda p: calls.append(1) or real(p))
    d = detector()
    datagram = pcaps.quic_initial("www.youtube.com")
    hosts = [feed(d, udp(PUPIL, "142.250.1.1", 443, datagram, t=T0 + i))[0].host for i in range(5)]
    assert hosts == ["www.youtube.com"] * 5
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------
# malformed packets: nothing but a counted skip


def _dhcp_ack_payload() -> bytes:
    return bytes(pcaps.dhcp_exchange()[-1]["UDP"].payload)


MALFORMED = [
    ("truncated-dhcp", lambda: udp(GATEWAY, "255.255.255.255", 68, _dhcp_ack_payload()[:100], sport=67), "bad dhcp"),
    ("dhcp-no-cookie", lambda: udp(GATEWAY, "255.255.255.255", 68, b"\x02\x01\x06\x00" + bytes(300), sport=67),
     "bad dhcp"),
    ("dhcp-cut-option", lambda: udp(GATEWAY, "255.255.255.255", 68, _dhcp_ack_payload()[:245], sport=67),
     "bad dhcp"),
    ("garbage-tls-443", lambda: tcp(PUPIL, "203.0.113.9", 443, b"\x16\x03\x01\x00\x30" + os.urandom(48)), "bad tls"),
    ("tls-not-hello", lambda: tcp(PUPIL, "203.0.113.9", 443, b"\x16\x03\x03\x00\x04\x02\x00\x00\x00"), "bad tls"),
    ("garbage-853", lambda: tcp(PUPIL, "1.1.1.1", 853, b"hello, resolver"), "bad tls"),
    ("bad-dns-short", lambda: udp(PUPIL, "8.8.8.8", 53, b"\x00\x01\x01"), "bad dns"),
    ("bad-dns-label", lambda: udp(PUPIL, "8.8.8.8", 53, bytes.fromhex("000701000001000000000000") + b"\x3fab"),
     "bad dns"),
    ("bad-dns-tcp", lambda: tcp(PUPIL, "8.8.8.8", 53, b"\x00\x10\x00\x07"), "bad dns"),
    ("garbage-quic", lambda: udp(PUPIL, "142.250.1.1", 443, b"\xc3\x12\x34\x56\x78" + os.urandom(1300)), "bad quic"),
    ("short-quic", lambda: udp(PUPIL, "142.250.1.1", 443, b"\xc3\x00\x00\x00\x01\x08" + os.urandom(100)), "bad quic"),
    ("garbage-ike", lambda: udp(PUPIL, "198.51.100.6", 500, os.urandom(12), sport=500), "bad ike"),
    ("short-openvpn", lambda: udp(PUPIL, "198.51.100.5", 1194, b"\x38\x01"), "bad openvpn"),
    ("short-esp", lambda: at(pcaps._eth() / pcaps.IP(src=PUPIL, dst="198.51.100.6", proto=50) / Raw(b"\x01"), T0),
     "bad ipsec"),
    ("truncated-ip", lambda: at(pcaps._eth(type=0x0800) / Raw(b"\x45\x00\x00"), T0), "bad packet"),
    ("truncated-udp", lambda: at(pcaps._eth() / pcaps.IP(src=PUPIL, dst="8.8.8.8", proto=17) / Raw(b"\x00\x35"), T0),
     "bad packet"),
]


@pytest.mark.parametrize(("make", "reason"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_packets_are_counted_skips(make, reason) -> None:
    d = detector()
    assert feed(d, make()) == []
    assert d.skips == {reason: 1}


def test_truncated_capture_of_every_detection_never_raises() -> None:
    """Cut every detectable packet at every length: findings or skips, never an exception."""
    d = detector()
    for _, make, *_ in BYPASSES[:8]:
        frame = bytes(make())
        for n in range(0, len(frame), 7):
            d.feed(frame[:n], T0)
    assert d.packets > 100 and sum(d.skips.values()) > 0


# ------------------------------------------------------------------------------------------
# DHCP leases


def test_dhcp_ack_gives_a_lease_with_the_request_s_hostname() -> None:
    d = detector()
    found = [f for p in pcaps.dhcp_exchange(lease_seconds=3600) for f in feed(d, p)]
    assert found == [LeaseFinding(Lease(mac=pcaps.CLIENT_MAC, ip=PUPIL, hostname="pupil-ipad-7",
                                        start=T0 + 0.03, expires=T0 + 0.03 + 3600), T0 + 0.03)]


@pytest.mark.parametrize(("kwargs", "hostname", "expires"), [
    ({"hostname_in_ack": True}, "pupil-ipad-7", 3600),
    ({"hostname": None}, None, 3600),
    ({"lease_seconds": None}, "pupil-ipad-7", None),
    ({"lease_seconds": 0xFFFFFFFF}, "pupil-ipad-7", None),
])
def test_dhcp_lease_variants(kwargs, hostname, expires) -> None:
    d = detector()
    leases = [f.lease for p in pcaps.dhcp_exchange(**kwargs) for f in feed(d, p)]
    got = [(x.hostname, None if x.expires is None else round(x.expires - x.start)) for x in leases]
    assert got == [(hostname, expires)]


def test_ack_alone_still_gives_a_lease_and_remembers_hostname_by_mac() -> None:
    d = detector()
    ack = pcaps.dhcp_exchange()[-1]
    assert feed(d, ack)[0].lease.hostname is None
    feed(d, pcaps.dhcp_exchange(xid=1)[2])  # a REQUEST from the same MAC, another xid
    assert feed(d, ack)[0].lease.hostname == "pupil-ipad-7"


def test_nak_and_inform_ack_give_no_lease() -> None:
    d = detector()
    ack = pcaps.dhcp_exchange()[-1]
    nak = ack.copy()
    nak["DHCP"].options = [("message-type", "nak"), "end"]
    inform = ack.copy()
    inform["BOOTP"].yiaddr = "0.0.0.0"
    assert feed(d, nak) == [] and feed(d, inform) == []


# ------------------------------------------------------------------------------------------
# the BPF filter


@pytest.fixture(scope="module")
def bpf() -> BpfMatcher:
    try:
        return BpfMatcher(bpf_filter([GATEWAY]))
    except FilterdError as exc:  # libpcap0.8 missing: the live sensor cannot run either
        pytest.skip(str(exc))


@pytest.mark.parametrize("make", [c[1] for c in BYPASSES], ids=[c[0] for c in BYPASSES])
def test_filter_passes_every_detection(bpf: BpfMatcher, make) -> None:
    assert bpf(bytes(make()))


def test_filter_passes_dhcp(bpf: BpfMatcher) -> None:
    assert all(bpf(bytes(p)) for p in pcaps.dhcp_exchange())


BULK = [
    ("proxy-port-data", lambda: tcp(PUPIL, GATEWAY, 8080, os.urandom(1400))),
    ("dns-to-school-resolver", lambda: dns_query(PUPIL, GATEWAY, "example.com")),
    ("quic-short-header", lambda: udp(PUPIL, "142.250.1.1", 443, b"\x41" + os.urandom(1200))),
    ("tls-app-data", lambda: tcp(PUPIL, "203.0.113.9", 443, b"\x17\x03\x03\x05\x00" + os.urandom(1280))),
    ("esp-established", lambda: esp(PUPIL, "198.51.100.6", seq=1000)),
    ("esp-in-udp-established",
     lambda: udp(PUPIL, "198.51.100.6", 4500, b"\x00\xc0\xff\xee\x00\x00\x03\xe8" + bytes(64))),
    ("openvpn-data", lambda: udp(PUPIL, "198.51.100.5", 1194, bytes([9 << 3]) + os.urandom(400))),
    ("wireguard-data", lambda: udp(PUPIL, "198.51.100.4", 51820, b"\x04\x00\x00\x00" + os.urandom(400))),
    ("http-response", lambda: tcp(GATEWAY, PUPIL, 50000, b"HTTP/1.1 200 OK\r\n\r\n", sport=8080)),
]


@pytest.mark.parametrize("make", [c[1] for c in BULK], ids=[c[0] for c in BULK])
def test_filter_drops_bulk_traffic(bpf: BpfMatcher, make) -> None:
    assert not bpf(bytes(make()))


def test_bad_filter_is_a_filterd_error() -> None:
    with pytest.raises(FilterdError, match="bad BPF filter"):
        BpfMatcher("udp port banana")


# ------------------------------------------------------------------------------------------
# the Sensor: dedupe, replay into a real Store, attribution, stats


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "filterd.db").open() as s:
        yield s


def make_request(leases: LeaseTable, categories: dict[str, tuple[str, ...]] | None = None):
    """identify -> classify -> decide with the real stages; a dict stands in for the lists."""
    directory = Directory([User("alice", "pupil", "alice@school.example", devices=(pcaps.CLIENT_MAC,))])
    identifier = Identifier(directory, [Network("10.20.0.0/16", "pupil")], leases)
    policy = Policy([Rule(name="bypass", action="log", alert=True, categories=frozenset({"doh"}))])
    categories = categories or {"dns.google": ("doh",)}

    def request(host: str, *, ip: str | None, user: str | None, at: datetime, host_only: bool = False,
                kind: str = "request", detail: str | None = None) -> Verdict:
        who = identifier.identify(ip, user, at)
        what = What(host=host, categories=categories.get(host, ()))
        return policy.decide(who, what, "contact", at, kind=kind, detail=detail)

    return request


def test_replay_records_leases_and_deduped_bypass_events(tmp_path: Path, store: Store) -> None:
    table = LeaseTable()
    packets = pcaps.dhcp_exchange()
    datagram = pcaps.quic_initial("www.youtube.com")
    packets += [udp(PUPIL, "142.250.1.1", 443, datagram, t=T0 + 1 + i / 100) for i in range(50)]
    packets += [dns_query(PUPIL, "8.8.8.8", "dns.google", t=T0 + 2 + i) for i in range(3)]
    packets += [dns_query(PUPIL, "8.8.8.8", "dns.google", t=T0 + 70)]  # after dedupe_seconds
    packets += [tcp(PUPIL, GATEWAY, 8080, os.urandom(500), t=T0 + 3) for _ in range(100)]
    pcap = tmp_path / "gateway.pcap"
    wrpcap(str(pcap), packets)

    sensor = Sensor(make_request(table), store, **CONFIG, dedupe_seconds=60,
                    stats_path=tmp_path / "sensor-stats.json", on_lease=table.add)
    stats = sensor.replay(pcap)

    assert stats["packets"] == len(packets) - 100 and stats["filtered_out"] == 100
    assert stats["findings"]["quic"] == 50 and stats["findings"]["dns"] == 4
    assert stats["events"] == 3 and stats["deduped"] == 51 and stats["leases"] == 1

    events = store.events(kind="bypass")
    assert sorted((e["host"], e["detail"]) for e in events) == [
        ("dns.google", "DNS to 8.8.8.8:53 (dns.google)"),
        ("dns.google", "DNS to 8.8.8.8:53 (dns.google)"),
        ("www.youtube.com", "QUIC to 142.250.1.1:443 (SNI www.youtube.com)"),
    ]
    # the lease seen first attributes the later bypasses to the device and its owner
    assert {(e["user"], e["device"], e["ip"], e["source"]) for e in events} \
        == {("alice", pcaps.CLIENT_MAC, PUPIL, "sensor")}
    assert {e["host"]: e["alert"] for e in events} == {"dns.google": True, "www.youtube.com": False}
    assert [(r["mac"], r["ip"], r["hostname"]) for r in store.leases()] \
        == [(pcaps.CLIENT_MAC, PUPIL, "pupil-ipad-7")]
    assert read_stats(tmp_path / "sensor-stats.json")["events"] == 3


def test_lease_from_pcap_attributes_requests_through_the_store(tmp_path: Path, store: Store) -> None:
    """What the daemon does: a lease the sensor stored makes identify name the device and user."""
    pcap = pcaps.dhcp_lease_pcap(tmp_path / "dhcp.pcap", lease_seconds=7200)
    Sensor(make_request(LeaseTable()), store, **CONFIG).replay(pcap)
    store.flush()
    table = LeaseTable(Lease(**{k: row[k] for k in ("mac", "ip", "hostname", "user", "start", "expires")})
                       for row in store.leases())
    identifier = Identifier(Directory([User("alice", "pupil", "a@school.example", devices=("pupil-ipad-7",))]),
                            [Network("10.20.0.0/16", "pupil")], table)
    during = datetime.fromtimestamp(T0 + 600, timezone.utc)
    after = datetime.fromtimestamp(T0 + 7300, timezone.utc)
    who = identifier.identify(PUPIL, None, during)
    assert (who.user, who.device, who.source) == ("alice", pcaps.CLIENT_MAC, "lease")
    assert identifier.identify(PUPIL, None, after).user is None


def test_bad_host_falls_back_to_the_address(store: Store) -> None:
    seen = []
    inner = make_request(LeaseTable())

    def request(host: str, **kw: object) -> Verdict:
        seen.append(host)
        if not host[0].isdigit():
            raise ValueError("bad host")
        return inner(host, **kw)  # type: ignore[arg-type]

    sensor = Sensor(request, store, **CONFIG)
    sensor.handle(bytes(dns_query(PUPIL, "8.8.8.8", "bad_name.example")), T0)
    sensor.drain()
    assert seen == ["bad_name.example", "8.8.8.8"] and sensor.stats.events == 1


def test_store_failure_is_counted_not_raised(tmp_path: Path) -> None:
    store = Store(tmp_path / "x.db").open()
    store.close()  # commit_incident's future now fails
    sensor = Sensor(make_request(LeaseTable()), store, **CONFIG)
    sensor.handle(bytes(dns_query(PUPIL, "8.8.8.8", "example.com")), T0)
    sensor.handle(bytes(dns_query(PUPIL, "8.8.8.8", "example.org")), T0)
    sensor.drain()
    assert sensor.stats.errors == 2 and sensor.stats.events == 0


def test_replay_of_a_missing_or_bad_file(tmp_path: Path, store: Store) -> None:
    sensor = Sensor(make_request(LeaseTable()), store, **CONFIG)
    with pytest.raises(FilterdError, match="cannot read capture"):
        sensor.replay(tmp_path / "missing.pcap")
    (tmp_path / "bad.pcap").write_bytes(b"not a pcap at all")
    with pytest.raises(FilterdError, match="cannot read capture"):
        sensor.replay(tmp_path / "bad.pcap")


def test_stats_text(tmp_path: Path) -> None:
    with pytest.raises(FilterdError, match="no sensor stats yet"):
        read_stats(tmp_path / "none.json")
    sensor = Sensor(make_request(LeaseTable()), None, **CONFIG)  # type: ignore[arg-type]
    sensor.handle(bytes(udp(PUPIL, "8.8.8.8", 53, b"\x00")), T0)
    text = format_stats(sensor.stats_dict())
    assert "packets     1 in" in text and "skipped     bad dns 1" in text
    assert "findings    dhcp 0, dns 0, dot 0, doh 0, quic 0" in text


# ------------------------------------------------------------------------------------------
# live capture (needs CAP_NET_RAW and libpcap; on loopback only)


def test_live_sniff_on_loopback(tmp_path: Path, store: Store, bpf: BpfMatcher) -> None:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()
    except PermissionError:
        pytest.skip("needs CAP_NET_RAW")
    sensor = Sensor(make_request(LeaseTable()), store, resolvers=["10.20.0.1"], school_networks=["127.0.0.0/8"],
                    stats_path=tmp_path / "stats.json", stats_seconds=0.1)
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(sensor.sniff("lo", handle_signals=False)))
    thread.start()
    query = bytes(dns_query("127.0.0.1", "127.0.0.1", "live.example")["UDP"].payload)
    try:
        deadline = time.monotonic() + 10
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            while sensor.stats.events == 0 and time.monotonic() < deadline:
                s.sendto(query, ("127.0.0.1", 53))
                time.sleep(0.2)
    finally:
        sensor.stop(reload=True)
        thread.join(10)
    assert not thread.is_alive() and result == [True]  # a reload was asked: the CLI rebuilds
    assert [e["detail"] for e in store.events(kind="bypass")] == ["DNS to 127.0.0.1:53 (live.example)"]
    assert read_stats(tmp_path / "stats.json")["source"] == "interface lo"


# ------------------------------------------------------------------------------------------
# wiring from the config


def load_config(tmp_path: Path, sensor: str, mode: str = "regular"):
    from filterd import config

    path = tmp_path / "filterd.toml"
    path.write_text(f'[proxy]\nmode = "{mode}"\n[storage]\ndata_dir = "data"\n'
                    f'[[identity.networks]]\ncidr = "10.20.0.0/16"\nrole = "pupil"\n[sensor]\n{sensor}\n')
    return config.load(path)


def test_from_config_uses_the_school_networks_and_transparent_mode(tmp_path: Path) -> None:
    from filterd.sensor import from_config, stats_path

    cfg = load_config(tmp_path, 'resolvers = ["10.20.0.1"]\ndedupe_seconds = 30', mode="transparent")
    sensor = from_config(cfg, make_request(LeaseTable()), None)  # type: ignore[arg-type]
    nets = {n.with_prefixlen for n in sensor.detector.school_networks}
    assert {"10.20.0.0/16", "192.168.0.0/16", "fc00::/7"} <= nets  # identity networks + private ranges
    assert sensor.detector.intercepted_ports == {80, 443} and sensor.dedupe_seconds == 30
    assert "not dst host 10.20.0.1" in sensor.bpf and "tcp dst port 443" not in sensor.bpf
    assert sensor.stats_path == stats_path(cfg) == tmp_path / "data" / "sensor-stats.json"


def test_from_config_names_a_bad_resolver(tmp_path: Path) -> None:
    from filterd.sensor import from_config

    cfg = load_config(tmp_path, 'resolvers = ["10.20.0.1", "dns.school"]')
    with pytest.raises(FilterdError, match=r"filterd.toml:\d+: sensor.resolvers\[1\]: not an IP address"):
        from_config(cfg, make_request(LeaseTable()), None)  # type: ignore[arg-type]


def test_format_leases() -> None:
    from filterd.sensor import format_leases

    text = format_leases([{"mac": pcaps.CLIENT_MAC, "ip": PUPIL, "hostname": "pupil-ipad-7", "user": None,
                           "seen": T0, "expires": None}])
    assert text.splitlines()[1].split() == [pcaps.CLIENT_MAC, PUPIL, "pupil-ipad-7", "-",
                                            "2026-11-18T11:06:40+00:00", "-"]


def test_sensor_process_and_daemon_share_the_store(tmp_path: Path) -> None:
    """The sensor (another process) and the daemon write one SQLite file at the same time."""
    import subprocess
    import sys

    db = tmp_path / "filterd.db"
    packets = [dns_query(f"10.20.{i // 250 + 1}.{i % 250 + 1}", "8.8.8.8", "example.com", t=T0 + i / 100)
               for i in range(300)]
    wrpcap(str(tmp_path / "many.pcap"), packets)
    script = (
        "import sys; sys.path[:0] = [sys.argv[3], sys.argv[3] + '/tests'];"
        "from pathlib import Path; from filterd.record import Store; from filterd.sensor import Sensor;"
        "from filterd.identify import LeaseTable; from test_sensor import make_request, CONFIG;"
        "store = Store(Path(sys.argv[1])).open();"
        "stats = Sensor(make_request(LeaseTable()), store, **CONFIG).replay(sys.argv[2]); store.close();"
        "print(stats['events'], stats['errors'])"
    )
    with Store(db).open() as daemon:
        proc = subprocess.Popen([sys.executable, "-c", script, str(db), str(tmp_path / "many.pcap"),
                                 str(Path(__file__).resolve().parents[1])], stdout=subprocess.PIPE, text=True,
                                cwd=tmp_path)
        request = make_request(LeaseTable())
        futures = [daemon.commit_incident(request("dns.google", ip=PUPIL, user=None, kind="bypass",
                                                  at=datetime.fromtimestamp(T0 + i, timezone.utc)),
                                          source="proxy") for i in range(200)]
        for f in futures:
            f.result(timeout=30)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and out.split() == ["300", "0"]
        sources = [e["source"] for e in daemon.events(kind="bypass")]
    assert sources.count("sensor") == 300 and sources.count("proxy") == 200


def test_replay_without_libpcap_reads_everything(tmp_path: Path, store: Store,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import filterd.sensor

    monkeypatch.setattr(filterd.sensor, "libpcap_available", lambda: False)
    wrpcap(str(tmp_path / "x.pcap"), [tcp(PUPIL, GATEWAY, 8080, b"x" * 100),
                                      dns_query(PUPIL, "8.8.8.8", "example.com")])
    stats = Sensor(make_request(LeaseTable()), store, **CONFIG).replay(tmp_path / "x.pcap")
    assert (stats["packets"], stats["filtered_out"], stats["events"]) == (2, 0, 1)


def test_without_configured_resolvers_private_ones_are_the_schools(store: Store) -> None:
    sensor = Sensor(make_request(LeaseTable()), store, resolvers=[], school_networks=["10.20.0.0/16"])
    sensor.handle(bytes(dns_query(PUPIL, "10.20.0.1", "school.example")), T0)
    sensor.handle(bytes(dns_query(PUPIL, "8.8.8.8", "outside.example")), T0 + 1)
    store.flush()
    assert [e["detail"] for e in store.events(kind="bypass")] == ["DNS to 8.8.8.8:53 (outside.example)"]
