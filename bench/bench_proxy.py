"""Benchmark: the filterd proxy against bare ``mitmdump``, in the same run, on the same upstream.

    python bench/bench_proxy.py [--python /tmp/v312/bin/python] [--ut1 PATH] [--rounds 3]
                                [--duration 3] [--conns 16] [--rate 150] [--lat-conns 4]
                                [--profile /tmp/v311/bin/py-spy]

Issue 4's targets: throughput with filterd and the full UT1 lists >= 0.9 x bare mitmdump (HTTP
keep-alive and intercepted HTTPS), added p99 latency < 1 ms.

What runs (all on 127.0.0.1, each in its own process):

- upstream: one asyncio server process (this file, ``upstream`` subcommand), HTTP and HTTPS
  (trustme certificate for 127.0.0.1-3), keep-alive, a fixed 12-byte body. Measured directly
  (wrk, and the Python client) to show it is not the bottleneck.
- ``mitmdump --listen-host 127.0.0.1 -p PORT --set connection_strategy=lazy
  --set ssl_verify_upstream_trusted_ca=CA --set confdir=DIR -q`` (the interpreter's venv).
- ``python -m filterd -c CONFIG run`` with one ``[[lists]]`` per UT1 category folder
  (squidguard), the shipped ``[categories]`` and ``[[rules]]`` copied from
  config/filterd.toml, ``[storage] data_dir`` in a temp dir, no users, no timetable
  (so every request is ``out_of_hours``, no role). Three small extra lists:
  127.0.0.2 = social_networks (rule ``social-media``: logged, write-behind),
  127.0.0.3 = encyclopaedia_edit (rule ``encyclopaedia-editing``: blocked, no alert),
  terror.invalid = terrorism (so the shipped terrorism rule has its category).
  Its index is compiled by a first start before anything is timed.
- load: the Python client (this file, ``client`` subcommand; asyncio streams, one process):
  N persistent keep-alive connections; HTTP sends absolute-form GETs to the proxy; HTTPS
  sends CONNECT, then TLS (trusting the proxy's CA), then keep-alive GETs. ``thr`` rows are
  closed-loop (each connection sends its next request when the answer is in) with
  ``--conns``; ``lat`` rows are paced (open-loop, ``--rate`` requests/s in total over
  ``--lat-conns`` connections) so that latency is the proxy's, not a queue's. HTTP
  throughput is also measured with ``wrk`` (absolute-form path through a Lua script), when
  installed.

Each round runs every measurement once, mitmdump and filterd alternating which goes first;
tables show the median over rounds (and min-max for req/s). RSS is each proxy's VmRSS after
the last round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_UT1 = REPO.parent / "shared" / "data" / "ut1" / "blacklists"
BODY = b"upstream ok\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
            + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)


# --- upstream ------------------------------------------------------------------------------
class _Upstream(asyncio.Protocol):
    """Answers every request head with the fixed response; keep-alive; GET only (no bodies)."""

    __slots__ = ("t", "buf")

    def connection_made(self, transport) -> None:
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        n = 0
        while True:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                break
            buf = buf[i + 4:]
            n += 1
        self.buf = buf
        if n:
            self.t.write(RESPONSE * n)


async def _serve_upstream(http_port: int, https_port: int, cert: str, key: str) -> None:
    loop = asyncio.get_running_loop()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    s1 = await loop.create_server(_Upstream, "0.0.0.0", http_port, backlog=1024)
    s2 = await loop.create_server(_Upstream, "0.0.0.0", https_port, ssl=ctx, backlog=1024)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    s1.close()
    s2.close()


# --- client --------------------------------------------------------------------------------
async def _open(args, ctx):
    reader, writer = await asyncio.open_connection(args.connect_host, args.connect_port)
    if args.scheme == "https":
        if args.via_proxy:
            writer.write(f"CONNECT {args.host}:{args.port} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
                raise RuntimeError(f"CONNECT refused: {head[:80]!r}")
        await writer.start_tls(ctx, server_hostname=args.host)
    return reader, writer


async def _one(reader, writer, req: bytes) -> int:
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    low = head.lower()
    i = low.find(b"\r\ncontent-length:")
    if i < 0:
        raise RuntimeError(f"no content-length: {head[:200]!r}")
    j = low.find(b"\r\n", i + 2)
    n = int(low[i + 17:j])
    if n:
        await reader.readexactly(n)
    return int(head[9:12])


async def _client(args) -> dict:
    ctx = None
    if args.scheme == "https":
        ctx = ssl.create_default_context(cafile=args.ca)
    target = f"{args.host}:{args.port}"
    if args.scheme == "http" and args.via_proxy:
        line = f"GET http://{target}/x HTTP/1.1\r\n"
    else:
        line = "GET /x HTTP/1.1\r\n"
    req = (line + f"Host: {target}\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n").encode()
    conns = [await _open(args, ctx) for _ in range(args.conns)]
    # warm: one request on each connection (upstream connection, certificate, caches)
    for r, w in conns:
        await _one(r, w, req)
    lats: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    start = time.perf_counter()
    end = start + args.duration
    interval = args.conns / args.rate if args.rate else 0.0

    async def worker(k: int, r, w) -> None:
        nonlocal errors
        pc = time.perf_counter
        nxt = start + (k * interval / args.conns if interval else 0.0)
        while True:
            if interval:
                now = pc()
                if nxt > now:
                    await asyncio.sleep(nxt - now)
                nxt += interval
            t0 = pc()
            if t0 >= end:
                return
            try:
                st = await _one(r, w, req)
            except Exception:
                errors += 1
                return
            t1 = pc()
            lats.append(t1 - t0)
            statuses[st] = statuses.get(st, 0) + 1

    await asyncio.gather(*(worker(k, r, w) for k, (r, w) in enumerate(conns)))
    elapsed = time.perf_counter() - start
    for _, w in conns:
        w.close()
    lats.sort()

    def pct(p: float) -> float:
        return lats[min(len(lats) - 1, int(p * len(lats)))] * 1000 if lats else float("nan")

    return {"n": len(lats), "rps": len(lats) / elapsed, "p50": pct(0.50), "p90": pct(0.90),
            "p99": pct(0.99), "max": lats[-1] * 1000 if lats else float("nan"),
            "statuses": statuses, "errors": errors,
            "lats": [round(x * 1e6) for x in lats] if args.rate else []}


# --- orchestration -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float, log: Path, also: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            if also is None or also.exists():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"did not start in {timeout}s: {log.read_text()[-3000:]}")


def cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def filterd_config(root: Path, ut1: Path, port: int, ca: Path) -> Path:
    shipped = (REPO / "config" / "filterd.toml").read_text().splitlines()
    cats, rules, mode = [], [], None
    for line in shipped:
        if line.startswith("["):
            mode = ("cats" if line.strip() == "[categories]" else
                    "rules" if line.strip() == "[[rules]]" else
                    "rules" if mode == "rules" and line.startswith("[[rules]]") else None)
        if mode == "cats":
            cats.append(line)
        elif mode == "rules":
            rules.append(line)
    lists = root / "lists"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "bench_social").write_text("127.0.0.2\n")
    (lists / "bench_block").write_text("127.0.0.3\n")
    (lists / "bench_terror").write_text("terror.invalid\n")
    out = ["[school]", 'name = "Bench School"', 'ict_contact = "ict@bench.example"', "",
           "[proxy]", 'listen_host = "127.0.0.1"', f"listen_port = {port}", f'upstream_ca = "{ca}"', "",
           "[storage]", f'data_dir = "{root / "data"}"', "",
           "[identity]", 'users = ""', "", "[timetable]", 'path = ""', ""]
    n = 0
    for p in sorted(ut1.iterdir()):
        if p.is_dir() and not p.is_symlink() and any((p / f).is_file() for f in ("domains", "urls")):
            out += ["[[lists]]", f'category = "{p.name}"', f'path = "{p}"', 'format = "squidguard"', ""]
            n += 1
    for name, cat in (("bench_social", "social_networks"), ("bench_block", "encyclopaedia_edit"),
                      ("bench_terror", "terrorism")):
        out += ["[[lists]]", f'name = "{name}"', f'category = "{cat}"', f'path = "{lists / name}"',
                'format = "domains"', ""]
    out += cats + [""] + rules
    cfg = root / "filterd.toml"
    cfg.write_text("\n".join(out) + "\n")
    return cfg


class Proc:
    def __init__(self, name: str, argv: list[str], port: int, log: Path, env: dict | None = None) -> None:
        self.name, self.argv, self.port, self.log = name, argv, port, log
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
                                     env=env or dict(os.environ, PYTHONUNBUFFERED="1"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_client(py: str, **kw) -> dict:
    argv = [py, str(Path(__file__).resolve()), "client"]
    for k, v in kw.items():
        if v is True:
            argv.append("--" + k.replace("_", "-"))
        elif v not in (None, False):
            argv += ["--" + k.replace("_", "-"), str(v)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=kw.get("duration", 5) + 60)
    if out.returncode != 0:
        return {"n": 0, "rps": float("nan"), "p50": float("nan"), "p99": float("nan"),
                "error": out.stderr.strip().splitlines()[-1:] }
    return json.loads(out.stdout)


def run_wrk(url: str, conns: int, duration: float, *, proxy_port: int | None = None,
            tmp: Path | None = None) -> dict:
    if not shutil.which("wrk"):
        return {"rps": float("nan")}
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--latency"]
    if proxy_port:
        script = tmp / "proxy.lua"
        host = url.split("/")[2]
        script.write_text(f'wrk.method = "GET"\nwrk.path = "{url}"\nwrk.headers["Host"] = "{host}"\n')
        argv += ["-s", str(script), f"http://127.0.0.1:{proxy_port}"]
    else:
        argv.append(url)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: (.*)", out)
    return {"rps": float(m.group(1)) if m else float("nan"),
            "non2xx": int(non2xx.group(1)) if non2xx else 0, "errors": errs.group(1) if errs else ""}


def pooled(runs: list[dict], p: float) -> float:
    xs = sorted(x for r in runs for x in r.get("lats", []))
    return xs[min(len(xs) - 1, int(p * len(xs)))] / 1000 if xs else float("nan")


def med(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="interpreter of the venv to test (its mitmdump too)")
    ap.add_argument("--ut1", default=str(DEFAULT_UT1))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    ap.add_argument("--conns", type=int, default=16, help="connections for throughput")
    ap.add_argument("--rate", type=float, default=150, help="total req/s for the paced latency rows")
    ap.add_argument("--lat-conns", type=int, default=4)
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    ap.add_argument("--allowed-only", action="store_true",
                    help="only the target rows (allowed HTTP/HTTPS): more rounds in the same time")
    ap.add_argument("--profile", default="", help="py-spy binary: record filterd during one extra HTTP and HTTPS run")
    a = ap.parse_args()

    py = a.python
    venv_bin = Path(py).parent
    mitmdump = str(venv_bin / "mitmdump")
    pyver = subprocess.run([py, "-c", "import sys, importlib.metadata as m; "
                            "print(sys.version.split()[0], m.version('mitmproxy'))"],
                           capture_output=True, text=True).stdout.split()
    tmp = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    print(f"# bench_proxy: Python {pyver[0]}, mitmproxy {pyver[1]}, {os.cpu_count()} CPUs, "
          f"load avg {os.getloadavg()[0]:.2f}, tmp {tmp}", flush=True)
    procs: list[Proc] = []
    try:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "127.0.0.2", "127.0.0.3", "localhost")
        ca_file = tmp / "upstream-ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        cert.private_key_pem.write_to_path(str(tmp / "up-key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(tmp / "up-cert.pem"))
        up_http, up_https = free_port(), free_port()
        up = Proc("upstream", [py, str(Path(__file__).resolve()), "upstream", "--http-port", str(up_http),
                               "--https-port", str(up_https), "--cert", str(tmp / "up-cert.pem"),
                               "--key", str(tmp / "up-key.pem")], up_http, tmp / "upstream.log")
        procs.append(up)
        wait_port(up_https, up.proc, 20, up.log)

        # filterd: first start compiles the index (not timed), then a fresh start for the runs
        fport = free_port()
        cfg = filterd_config(tmp / "filterd", Path(a.ut1), fport, ca_file)
        nlists = cfg.read_text().count("[[lists]]")
        t0 = time.monotonic()
        f = Proc("filterd", [py, "-m", "filterd", "-c", str(cfg), "run"], fport, tmp / "filterd-compile.log")
        fca = tmp / "filterd" / "data" / "mitmproxy" / "mitmproxy-ca-cert.pem"
        wait_port(fport, f.proc, 900, f.log, fca)
        compile_s = time.monotonic() - t0
        f.stop()
        t0 = time.monotonic()
        f = Proc("filterd", [py, "-m", "filterd", "-c", str(cfg), "run"], fport, tmp / "filterd.log")
        procs.append(f)
        wait_port(fport, f.proc, 300, f.log, fca)
        warm_s = time.monotonic() - t0
        print(f"# filterd: {nlists} lists; first start (compile) {compile_s:.1f}s, warm start {warm_s:.1f}s; "
              f"RSS idle {rss_mb(f.proc.pid):.0f} MB", flush=True)

        mport = free_port()
        mconf = tmp / "mitmdump-conf"
        mconf.mkdir()
        m = Proc("mitmdump", [mitmdump, "--listen-host", "127.0.0.1", "-p", str(mport),
                              "--set", "connection_strategy=lazy",
                              "--set", f"ssl_verify_upstream_trusted_ca={ca_file}",
                              "--set", f"confdir={mconf}", "-q"], mport, tmp / "mitmdump.log")
        procs.append(m)
        mca = mconf / "mitmproxy-ca-cert.pem"
        wait_port(mport, m.proc, 60, m.log, mca)
        print(f"# mitmdump RSS idle {rss_mb(m.proc.pid):.0f} MB", flush=True)
        proxies = {"mitmdump": (m, mca), "filterd": (f, fca)}

        D = a.duration

        def client(proxy: str | None, scheme: str, host: str, *, paced: bool, dur: float = D) -> dict:
            port = up_http if scheme == "http" else up_https
            kw = dict(scheme=scheme, host=host, port=port, duration=dur,
                      conns=a.lat_conns if paced else a.conns, rate=a.rate if paced else 0)
            if proxy:
                p, pca = proxies[proxy]
                kw.update(connect_host="127.0.0.1", connect_port=p.port, via_proxy=True, ca=pca)
                c0 = cpu_s(p.proc.pid)
                r = run_client(py, **kw)
                # includes the client's connection set-up and warm requests: a few per connection
                r["cpu_ms"] = (cpu_s(p.proc.pid) - c0) * 1000 / max(1, r["n"] + kw["conns"])
                return r
            kw.update(connect_host=host, connect_port=port, ca=ca_file)
            return run_client(py, **kw)

        # upstream alone: wrk and the Python client, straight at it
        direct = {
            "http wrk": run_wrk(f"http://127.0.0.1:{up_http}/x", a.conns, 3),
            "https wrk": run_wrk(f"https://127.0.0.1:{up_https}/x", a.conns, 3),
            "http pyclient": client(None, "http", "127.0.0.1", paced=False, dur=3),
            "https pyclient": client(None, "https", "127.0.0.1", paced=False, dur=3),
            "http pyclient lat": client(None, "http", "127.0.0.1", paced=True, dur=3),
            "https pyclient lat": client(None, "https", "127.0.0.1", paced=True, dur=3),
        }
        # warm both proxies (certificates for the hosts, first-request paths)
        for proxy in proxies:
            for scheme in ("http", "https"):
                for host in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
                    client(proxy, scheme, host, paced=False, dur=0.5)

        # background CPU of each proxy with no traffic (filterd: file watch, scheduler, store thread)
        idle0 = {name: cpu_s(p.proc.pid) for name, (p, _) in proxies.items()}
        time.sleep(5)
        idle = {name: (cpu_s(p.proc.pid) - idle0[name]) / 5 * 100 for name, (p, _) in proxies.items()}
        results: dict[tuple, list[dict]] = {}
        cases = [("http", "127.0.0.1", "allowed"), ("https", "127.0.0.1", "allowed")]
        extra = [("http", "127.0.0.2", "logged"), ("https", "127.0.0.2", "logged"),
                 ("http", "127.0.0.3", "blocked"), ("https", "127.0.0.3", "blocked")]
        for rnd in range(a.rounds):
            order = ["mitmdump", "filterd"] if rnd % 2 == 0 else ["filterd", "mitmdump"]
            for scheme, host, what in cases:
                for proxy in order:
                    results.setdefault((proxy, scheme, what, "thr"), []).append(
                        client(proxy, scheme, host, paced=False))
                    results.setdefault((proxy, scheme, what, "lat"), []).append(
                        client(proxy, scheme, host, paced=True))
            for proxy in order:
                results.setdefault((proxy, "http", "allowed", "wrk"), []).append(
                    run_wrk(f"http://127.0.0.1:{up_http}/x", a.conns, D, proxy_port=proxies[proxy][0].port, tmp=tmp))
            for scheme, host, what in ([] if a.allowed_only else extra):
                for proxy in order:
                    results.setdefault((proxy, scheme, what, "thr"), []).append(
                        client(proxy, scheme, host, paced=False))
                    if what == "logged":
                        results.setdefault((proxy, scheme, what, "lat"), []).append(
                            client(proxy, scheme, host, paced=True))
            print(f"# round {rnd + 1}/{a.rounds} done, load avg {os.getloadavg()[0]:.2f}", flush=True)
        rss = {name: rss_mb(p.proc.pid) for name, (p, _) in proxies.items()}

        # ---- report ----------------------------------------------------------------------
        print()
        print("## upstream direct (not the bottleneck)")
        print(f"  wrk  http {direct['http wrk']['rps']:9.0f} req/s   https {direct['https wrk']['rps']:9.0f} req/s   (c={a.conns})")
        for s in ("http", "https"):
            c, l = direct[f"{s} pyclient"], direct[f"{s} pyclient lat"]
            print(f"  pyclient {s:5} {c['rps']:9.0f} req/s (c={a.conns})   paced {a.rate:.0f}/s: "
                  f"p50 {l['p50']:.3f} ms  p99 {l['p99']:.3f} ms")
        print()
        print(f"## throughput, req/s, median of {a.rounds} rounds [min-max], {a.conns} keep-alive connections")
        print(f"{'case':32} {'mitmdump':>22} {'filterd':>22} {'filterd/mitmdump':>17}")

        def rps(key):
            xs = [r["rps"] for r in results.get(key, [])]
            return med(xs), (min(xs) if xs else float("nan")), (max(xs) if xs else float("nan"))

        rows = [("http", "allowed", "thr", "HTTP keep-alive, allowed (py)"),
                ("http", "allowed", "wrk", "HTTP keep-alive, allowed (wrk)"),
                ("https", "allowed", "thr", "HTTPS intercepted, allowed"),
                ("http", "logged", "thr", "HTTP, logged (write-behind)"),
                ("https", "logged", "thr", "HTTPS, logged (write-behind)"),
                ("http", "blocked", "thr", "HTTP, blocked (403, incident)"),
                ("https", "blocked", "thr", "HTTPS, blocked (403, incident)")]
        for scheme, what, kind, label in rows:
            if ("mitmdump", scheme, what, kind) not in results:
                continue
            mm, mlo, mhi = rps(("mitmdump", scheme, what, kind))
            fm, flo, fhi = rps(("filterd", scheme, what, kind))
            ratio = fm / mm if mm == mm and mm else float("nan")
            mark = "" if ratio != ratio else ("  ok" if ratio >= 0.9 else "  BELOW 0.9")
            if what != "allowed":
                mark += "  (mitmdump forwards)" if what == "blocked" else ""
            print(f"{label:32} {mm:8.0f} [{mlo:5.0f}-{mhi:5.0f}] {fm:8.0f} [{flo:5.0f}-{fhi:5.0f}] {ratio:16.2f}x{mark}")
        print()
        print("## proxy CPU per request (utime+stime of the proxy process, all threads / requests), ms,")
        print("## median of rounds: robust to other load on the machine; 'rps ratio' = mitmdump/filterd CPU")
        print(f"{'case':32} {'mitmdump':>10} {'filterd':>10} {'added':>8} {'rps ratio':>10}")
        for scheme, what, kind, label in rows:
            if kind == "wrk" or ("mitmdump", scheme, what, kind) not in results:
                continue
            mc = med([r.get("cpu_ms", float("nan")) for r in results.get(("mitmdump", scheme, what, kind), [])])
            fc = med([r.get("cpu_ms", float("nan")) for r in results.get(("filterd", scheme, what, kind), [])])
            print(f"{label:32} {mc:10.3f} {fc:10.3f} {fc - mc:8.3f} {mc / fc:9.2f}x")
        print()
        print(f"## latency, ms, paced {a.rate:.0f} req/s over {a.lat_conns} keep-alive connections, "
              f"percentiles of all rounds' samples pooled ({a.rounds} x {a.rate * D:.0f})")
        print(f"{'case':32} {'mitmdump p50/p99':>18} {'filterd p50/p99':>18} {'added p50':>10} {'added p99':>10}")
        for scheme, what, label in (("http", "allowed", "HTTP keep-alive, allowed"),
                                    ("https", "allowed", "HTTPS intercepted, allowed"),
                                    ("http", "logged", "HTTP, logged (write-behind)"),
                                    ("https", "logged", "HTTPS, logged (write-behind)")):
            mk, fk = ("mitmdump", scheme, what, "lat"), ("filterd", scheme, what, "lat")
            if mk not in results:
                continue
            m50, m99 = pooled(results[mk], 0.50), pooled(results[mk], 0.99)
            f50, f99 = pooled(results[fk], 0.50), pooled(results[fk], 0.99)
            mark = "  ok" if f99 - m99 < 1 else "  ABOVE 1 ms"
            print(f"{label:32} {m50:8.3f}/{m99:8.3f} {f50:8.3f}/{f99:8.3f} {f50 - m50:10.3f} {f99 - m99:10.3f}{mark}")
        print()
        print(f"## idle CPU (5 s, no traffic): mitmdump {idle['mitmdump']:.1f}%, filterd {idle['filterd']:.1f}% of a core")
        print(f"## RSS after the run: mitmdump {rss['mitmdump']:.0f} MB, filterd {rss['filterd']:.0f} MB "
              f"(+{rss['filterd'] - rss['mitmdump']:.0f} MB)")
        bad = []
        for key, rs in results.items():
            for r in rs:
                if r.get("errors") or r.get("error") or r.get("non2xx") and key[2] != "blocked":
                    bad.append((key, r.get("errors"), r.get("error"), r.get("non2xx")))
                sts = r.get("statuses") or {}
                want = "403" if key[2] == "blocked" and key[0] == "filterd" else "200"
                if sts and set(map(str, sts)) != {want}:
                    bad.append((key, sts))
        print("## errors / unexpected statuses:", bad[:8] if bad else "none")

        if a.profile:
            profile(a.profile, f, client, tmp)
    finally:
        for p in reversed(procs):
            p.stop()
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def profile(pyspy: str, f: Proc, client, tmp: Path) -> None:
    """py-spy (raw collapsed stacks, --nonblocking) on filterd during throughput runs."""
    for scheme, host in (("http", "127.0.0.1"), ("https", "127.0.0.1"), ("http", "127.0.0.2"),
                         ("http", "127.0.0.3")):
        out = tmp / f"prof-{scheme}-{host}.txt"
        rec = subprocess.Popen([pyspy, "record", "--pid", str(f.proc.pid), "-d", "5", "-r", "250",
                                "--format", "raw", "-o", str(out), "--nonblocking", "--threads"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        r = client("filterd", scheme, host, paced=False, dur=5)
        rec.wait(30)
        print(f"\n## profile: filterd {scheme} {host}: {r['rps']:.0f} req/s, {r['cpu_ms']:.3f} ms CPU/req while sampled")
        summarize(out, r["cpu_ms"])
        shutil.copy(out, Path(tempfile.gettempdir()) / out.name)


def summarize(path: Path, cpu_ms: float) -> None:
    """Inclusive share of the non-idle samples per filterd function, and µs per request."""
    if not path.exists():
        print("  (no profile)")
        return
    total, incl, threads = 0, {}, {}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        n = int(n)
        frames = stack.split(";")
        total += n
        th = frames[0] if frames[0].startswith("thread") or frames[0].startswith("process") else "?"
        threads[th] = threads.get(th, 0) + n
        seen = set()
        for fr in frames:
            if "(filterd/" in fr or "/filterd/" in fr:
                if any(x in fr for x in ("filterd/__main__.py", "filterd/cli.py", "run (filterd/daemon.py")):
                    continue
                name = fr.split(" (")[0] + " (" + fr.replace("(filterd/", "(/filterd/").split("/filterd/")[-1]
                name = name.rsplit(":", 1)[0] + ")"
                if name not in seen:
                    incl[name] = incl.get(name, 0) + n
                    seen.add(name)
    print(f"  {total} non-idle samples; by thread: " +
          ", ".join(f"{k[:40]} {100 * v / total:.0f}%" for k, v in sorted(threads.items(), key=lambda x: -x[1])[:4]))
    print(f"  filterd functions, inclusive: % of the process's CPU, and µs per request (x {cpu_ms:.3f} ms):")
    for name, n in sorted(incl.items(), key=lambda x: -x[1])[:30]:
        print(f"    {100 * n / total:5.1f}%  {1000 * cpu_ms * n / total:7.1f} µs  {name}")


def cli() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "upstream":
        ap = argparse.ArgumentParser()
        ap.add_argument("cmd")
        ap.add_argument("--http-port", type=int, required=True)
        ap.add_argument("--https-port", type=int, required=True)
        ap.add_argument("--cert", required=True)
        ap.add_argument("--key", required=True)
        x = ap.parse_args()
        asyncio.run(_serve_upstream(x.http_port, x.https_port, x.cert, x.key))
    elif len(sys.argv) > 1 and sys.argv[1] == "client":
        ap = argparse.ArgumentParser()
        ap.add_argument("cmd")
        ap.add_argument("--scheme", required=True)
        ap.add_argument("--host", required=True)
        ap.add_argument("--port", type=int, required=True)
        ap.add_argument("--connect-host", required=True)
        ap.add_argument("--connect-port", type=int, required=True)
        ap.add_argument("--via-proxy", action="store_true")
        ap.add_argument("--ca")
        ap.add_argument("--conns", type=int, default=16)
        ap.add_argument("--rate", type=float, default=0)
        ap.add_argument("--duration", type=float, default=4)
        x = ap.parse_args()
        print(json.dumps(asyncio.run(_client(x))))
    else:
        main()


if __name__ == "__main__":
    cli()
