"""Sensor throughput on a generated mixed gateway capture (issue 8 target: >= 20,000 packets/s).

    python bench/bench_sensor.py [--packets 200000] [--keep DIR]

The capture is what the school-facing interface of a gateway in explicit-proxy mode carries:
mostly TCP to and from the proxy port, DNS to the school's resolver, QUIC data, and a small
share of what the sensor is there for (DHCP, DNS to other resolvers, QUIC Initials, TLS and
DoT ClientHellos past the proxy, VPN handshakes). Frames are built once with scapy and then
copied with varied client addresses and ports into a pcap written directly (scapy would take
minutes to build 200k packets).

Printed, each with packets/s and CPU seconds:
1. replay: ``Sensor.replay`` end to end — pcap reading, the BPF filter (libpcap in user space,
   per packet through ctypes), detection, dedupe, pipeline and a real SQLite store;
2. live path: what Python does live, where the kernel runs the filter: detection + recording
   of the packets the filter passes, expressed per packet of the whole mixed stream;
3. no filter: the detector on every packet (the cost if the BPF filter were missing);
4. ClientHello parsing: mitmproxy's ``ClientHello`` against scapy's TLS layer.
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from filterd.decide import Policy, Rule  # noqa: E402
from filterd.identify import Identifier, LeaseTable, Network  # noqa: E402
from filterd.record import Store  # noqa: E402
from filterd.sensor import BpfMatcher, Sensor  # noqa: E402
from filterd.verdict import Verdict, What  # noqa: E402
import pcaps  # noqa: E402  (tests/pcaps.py)

PROXY = pcaps.SERVER_IP
CONFIG = dict(resolvers=[PROXY], proxy_addresses=[PROXY], school_networks=["10.20.0.0/16"])

# (share of packets, name, frame factory); ip offset 14 in every frame: src at 26, ports at 34/36
MIX = [
    (0.62, "tcp data to proxy", lambda: pcaps.tcp("10.20.1.1", PROXY, 8080, bytes(1400))),
    (0.20, "tcp data from proxy", lambda: pcaps.tcp(PROXY, "10.20.1.1", 50000, bytes(1400), sport=8080)),
    (0.07, "tcp acks", lambda: pcaps.tcp("10.20.1.1", PROXY, 8080, flags="A")),
    (0.04, "dns to school resolver", lambda: pcaps.dns_query("10.20.1.1", PROXY, "www.bbc.co.uk")),
    (0.03, "quic short header", lambda: pcaps.udp("10.20.1.1", "142.250.1.1", 443, b"\x41" + bytes(1200))),
    (0.02, "tls app data past proxy",
     lambda: pcaps.tcp("10.20.1.1", "203.0.113.9", 443, b"\x17\x03\x03\x05\x00" + bytes(1280))),
    (0.005, "dns to 8.8.8.8", lambda: pcaps.dns_query("10.20.1.1", "8.8.8.8", "www.tiktok.com")),
    (0.002, "quic initial", lambda: pcaps.udp("10.20.1.1", "142.250.1.1", 443, pcaps.quic_initial("www.youtube.com"))),
    (0.002, "tls clienthello past proxy",
     lambda: pcaps.tcp("10.20.1.1", "203.0.113.9", 443, pcaps.client_hello("www.tiktok.com"))),
    (0.001, "dot clienthello", lambda: pcaps.tcp("10.20.1.1", "1.1.1.1", 853, pcaps.client_hello("one.one.one.one"))),
    (0.001, "wireguard initiation",
     lambda: pcaps.udp("10.20.1.1", "198.51.100.4", 51820, pcaps.wireguard_initiation())),
    (0.001, "openvpn reset", lambda: pcaps.udp("10.20.1.1", "198.51.100.5", 1194, pcaps.openvpn_hard_reset())),
    (0.001, "ike sa init", lambda: pcaps.udp("10.20.1.1", "198.51.100.6", 500, pcaps.ike_sa_init(), sport=500)),
    (0.003, "esp established", lambda: pcaps.esp("10.20.1.1", "198.51.100.6", seq=5000)),
    (0.001, "dhcp", None),
]


def build_pcap(path: Path, n: int, seed: int = 8) -> dict[str, int]:
    """Write ``n`` frames of the mix to ``path`` (pcap, Ethernet); returns counts per name."""
    rng = random.Random(seed)
    templates = {name: bytes(make()) for _, name, make in MIX if make}
    dhcp = [bytes(p) for p in pcaps.dhcp_exchange()]
    names = [name for _, name, _ in MIX]
    weights = [w for w, _, _ in MIX]
    counts = dict.fromkeys(names, 0)
    t = pcaps.T0
    with path.open("wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for name in rng.choices(names, weights, k=n):
            counts[name] += 1
            t += 50e-6  # 20,000 packets/s
            if name == "dhcp":
                frame = bytearray(rng.choice(dhcp))
            else:
                frame = bytearray(templates[name])
                client = bytes([10, 20, rng.randrange(1, 8), rng.randrange(1, 255)])
                if frame[26:28] == b"\x0a\x14" and frame[26:30] != bytes([10, 20, 0, 1]):
                    frame[26:30] = client  # from a school device
                    frame[34:36] = struct.pack("!H", rng.randrange(32768, 61000))
                elif frame[30:32] == b"\x0a\x14":
                    frame[30:34] = client
            sec = int(t)
            out.write(struct.pack("<IIII", sec, int((t - sec) * 1e6), len(frame), len(frame)))
            out.write(frame)
    return counts


def make_request():
    identifier = Identifier(None, [Network("10.20.0.0/16", "pupil")], LeaseTable())
    policy = Policy([Rule(name="doh", action="log", alert=True, categories=frozenset({"doh"}))])

    def request(host: str, *, ip: str | None, user: str | None, at: datetime, host_only: bool = False,
                kind: str = "request", detail: str | None = None) -> Verdict:
        what = What(host=host, categories=("doh",) if host == "one.one.one.one" else ())
        return policy.decide(identifier.identify(ip, user, at), what, "contact", at, kind=kind, detail=detail)

    return request


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - w, time.process_time() - c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=200_000)
    ap.add_argument("--keep", type=Path, help="folder for the pcap and store (default: a temporary one)")
    args = ap.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-sensor-"))
    folder.mkdir(parents=True, exist_ok=True)
    pcap = folder / "gateway.pcap"
    _, wall, _ = timed(lambda: build_pcap(pcap, args.packets))
    print(f"generated {args.packets} packets ({pcap.stat().st_size / 1e6:.1f} MB) in {wall:.1f} s: {pcap}")
    n = args.packets

    with Store(folder / "bench.db").open() as store:
        sensor = Sensor(make_request(), store, **CONFIG)
        stats, wall, cpu = timed(lambda: sensor.replay(pcap))
        print(f"1. replay (read + BPF + detect + record): {n / wall:,.0f} packets/s, "
              f"{wall:.2f} s wall, {cpu:.2f} s CPU; passed the filter {stats['packets']}, "
              f"dropped {stats['filtered_out']}, events {stats['events']}, folded {stats['deduped']}, "
              f"leases {stats['leases']}, skips {sum(stats['skips'].values())}")
        print(f"   findings: {stats['findings']}")

        from scapy.utils import RawPcapReader

        match = BpfMatcher(sensor.bpf)
        frames = [(bytes(d), m.sec + m.usec / 1e6) for d, m in RawPcapReader(str(pcap))]
        passed = [f for f in frames if match(f[0])]
        live = Sensor(make_request(), store, **CONFIG)

        def run_live() -> None:
            for data, ts in passed:
                live.handle(data, ts)
            live.drain()

        _, wall, cpu = timed(run_live)
        print(f"2. live path (kernel filters; Python detects + records the {len(passed)} passed): "
              f"{n / cpu:,.0f} mixed packets/s per CPU second ({len(passed) / cpu:,.0f} passed packets/s), "
              f"{wall:.2f} s wall, {cpu:.2f} s CPU")

    bare = Sensor(make_request(), store=None, **CONFIG).detector  # type: ignore[arg-type]
    _, wall, cpu = timed(lambda: [bare.feed(d, ts) for d, ts in frames])
    print(f"3. no filter (detector on every packet): {n / cpu:,.0f} packets/s, {cpu:.2f} s CPU")

    from mitmproxy.tls import ClientHello
    from scapy.layers.tls.record import TLS

    record = pcaps.client_hello("www.tiktok.com")
    reps = 2000
    _, m_wall, _ = timed(lambda: [ClientHello(record[9:]).sni for _ in range(reps)])
    _, s_wall, _ = timed(lambda: [TLS(record) for _ in range(reps // 20)])
    per_m, per_s = m_wall / reps * 1e6, s_wall / (reps // 20) * 1e6
    print(f"4. ClientHello SNI: mitmproxy {per_m:.0f} µs, scapy TLS layer {per_s:.0f} µs ({per_s / per_m:.0f}× slower)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
