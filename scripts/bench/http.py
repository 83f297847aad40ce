#!/usr/bin/env python3
"""HTTP request-level benchmark: direct vs meshproxy one hop vs the meshproxy mTLS pair vs
HAProxy `mode http`, pod namespace -> peer namespace, 1 KiB responses.

Two throwaway namespaces, mi-bench-http-pod-PID and mi-bench-http-peer-PID, joined by one
veth (198.18.0.1/24 in the pod, 198.18.0.2/24 in the peer); nothing touches the host
namespace, and everything is removed on exit (also on Ctrl-C). The server is Debian's nginx
in the peer (one worker, keep-alive without a request limit): :8080 HTTP/1.1, :8081 HTTP/2
with prior knowledge (h2c), `/1k` answers a 1,024-byte body. The client is `oha` (crates.io)
in the pod, as root, so the pod's rules redirect it. Paths, measured in ONE interleaved run
(A B P H, A B P H, ...):

  A  direct     no rules in either namespace
  B  meshproxy  one hop: `meshinit apply` in the pod (outbound to :4140), a meshproxy as uid
                2102 with no identity: plaintext, request by request (HTTP detected)
  P  meshproxy mTLS pair: the pod's rules send outbound to :4240, where a second meshproxy
                in the pod has a dev-CA identity and --mesh-peers naming the peer; the peer
                has `meshinit apply` (inbound to :4143) and its own meshproxy with identity.
                HTTP travels pod -> peer over one pooled mTLS HTTP/2 connection. Two hops.
  B0 meshproxy  with --baseline PATH only: the same one hop through another meshproxy binary
                (the code before a change, or the same one with other --baseline-args), outbound
                on :4340, measured in the same rounds as B for a before/after comparison
  H  HAProxy 2.6 `mode http` as a transparent original-destination proxy (`server orig
                0.0.0.0:0`), uid 2102, outbound rules to :4150; HTTP/1.1 and h2c (prior
                knowledge, detected from the preface) on the same bind; to nginx it speaks
                the client's protocol (`proto h2` to :8081, chosen by the original
                destination port).

Measures, per path and per protocol (HTTP/1.1, HTTP/2): fixed-rate latency at 1,000 and
5,000 requests/s (`oha --qps N --latency-correction`: coordinated-omission corrected,
p50/p99), the most requests/s on 8 connections (HTTP/2: 8 connections, 8 streams each),
and the proxies' CPU (utime + stime from /proc/PID/stat) and VmRSS during the fixed-rate
runs, as vCPU and MiB per 1,000 requests/s.

Usage: scripts/bench/http.py [--quick] [--rounds N] [--seconds S] [--oha PATH] [--out FILE]
                             [--profile [--profile-rate Q] [--profile-seconds S] [--profile-http2]] [--meshproxy-args ARGS] [--baseline PATH [--baseline-args ARGS]]
Needs root. Installs nginx, haproxy, curl, util-linux if missing; `oha` from
target/bench-tools/bin/oha (`cargo install oha --locked --no-default-features --features native-tls --root
target/bench-tools`) or PATH. Prints a Markdown section for BENCHMARKS.md.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (NOFILE, PROXY_UID, as_proxy, cpu_ticks, down, ensure_packages, fmt_range, in_ns,  # noqa: E402
                      log, pod_and_peer, sh, show_logs, spawn, wait_port)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TAG = f"{os.getpid()}"
POD = f"mi-bench-http-pod-{TAG}"
PEER = f"mi-bench-http-peer-{TAG}"
POD4, PEER4 = "198.18.0.1", "198.18.0.2"
ID_POD, ID_PEER = "pod.default.mesh.local", "peer.default.mesh.local"
H1_PORT, H2_PORT = 8080, 8081
ONE_HOP, PAIR_OUT, HAP, BASE = 4140, 4240, 4150, 4340
BASE_ADMIN = 4391
PACKAGES = {"nginx": "nginx", "haproxy": "haproxy", "curl": "curl", "nft": "nftables",
            "setpriv": "util-linux", "prlimit": "util-linux", "uptime": "procps"}
PATHS = {"A": "direct", "B": "meshproxy one hop", "P": "meshproxy mTLS pair", "H": "HAProxy mode http"}
LOGS = ("nginx.log", "meshproxy-b.log", "meshproxy-p-out.log", "meshproxy-p-in.log", "haproxy.log",
        "meshproxy-b0.log")
CLK = os.sysconf("SC_CLK_TCK")
tmpdir = None


def cleanup():
    down(POD, PEER)
    if tmpdir and sys.exc_info()[0] is not None:
        show_logs(tmpdir, LOGS)
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)


def start_nginx():
    www = os.path.join(tmpdir, "www")
    os.makedirs(www)
    with open(os.path.join(www, "1k"), "w") as f:
        f.write("x" * 1023 + "\n")
    path = lambda n: os.path.join(tmpdir, n)
    conf = path("nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""daemon off;
user root;
worker_processes 1;
pid {path('nginx.pid')};
error_log stderr;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  default_type text/plain;
  keepalive_requests 100000000;
  keepalive_timeout 120s;
  client_body_temp_path {path('b')}; proxy_temp_path {path('p')}; fastcgi_temp_path {path('f')};
  uwsgi_temp_path {path('u')}; scgi_temp_path {path('s')};
  server {{ listen {H1_PORT}; root {www}; }}
  server {{ listen {H2_PORT} http2; root {www}; }}
}}
""")
    spawn(in_ns(PEER, "prlimit", NOFILE, "nginx", "-e", "stderr", "-c", conf),
          stdout=subprocess.DEVNULL, stderr=open(path("nginx.log"), "ab"))
    wait_port(PEER, H1_PORT)
    wait_port(PEER, H2_PORT)


def make_identities(meshproxy):
    ca, ids = os.path.join(tmpdir, "ca"), os.path.join(tmpdir, "ids")
    sh(meshproxy, "identity", "new-ca", ca)
    os.makedirs(ids, exist_ok=True)
    out = {}
    for name in (ID_POD, ID_PEER):
        sh(meshproxy, "identity", "issue", "--ca", ca, name, "--out", ids)
        cert, key = os.path.join(ids, f"{name}.crt"), os.path.join(ids, f"{name}.key")
        os.chown(key, PROXY_UID, PROXY_UID)
        out[name] = (cert, key)
    for d in (tmpdir, ca, ids):
        os.chmod(d, 0o755)
    return os.path.join(ca, "ca.crt"), out


def start_meshproxy(bin_path, ns, out_port, admin, logname, mesh=None, extra=()):
    """mesh: (anchors, (cert, key), peer net, peer identity) for an mTLS proxy, else None;
    extra: more flags."""
    args = ["--outbound-addr", f"127.0.0.1:{out_port}", "--inbound-addr", f"0.0.0.0:{out_port + 3}",
            "--admin-addr", f"127.0.0.1:{admin}", *extra]
    if mesh:
        anchors, ident, peer_net, peer_id = mesh
        peers = os.path.join(tmpdir, f"peers-{logname}.toml")
        with open(peers, "w") as f:
            f.write(f'[[peer]]\nnet = "{peer_net}/32"\nidentity = "{peer_id}"\n')
        os.chmod(peers, 0o644)
        args += ["--identity-cert", ident[0], "--identity-key", ident[1], "--trust-anchors", anchors,
                 "--mesh-peers", peers]
    p = spawn(in_ns(ns, *as_proxy(bin_path, *args)), stdout=subprocess.DEVNULL,
              stderr=open(os.path.join(tmpdir, logname), "ab"), env=dict(os.environ, RUST_LOG="warn"))
    for port in (out_port, out_port + 3, admin):
        wait_port(ns, port)
    return p


def start_haproxy():
    cfg = os.path.join(tmpdir, "haproxy.cfg")
    run = os.path.join(tmpdir, "haproxy")  # its stats socket, written as the proxy uid
    os.makedirs(run)
    os.chown(run, PROXY_UID, PROXY_UID)
    with open(cfg, "w") as f:
        f.write(f"""global
    maxconn 5000
    nbthread {os.cpu_count()}
    stats socket {run}/stats.sock mode 666
defaults
    mode http
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout http-keep-alive 1h
# Transparent original-destination proxy in mode http: a 0.0.0.0 server address means
# "connect to the connection's original destination" (SO_ORIGINAL_DST, IPv4 only in 2.6).
# A clear-text bind accepts HTTP/1.1 and the HTTP/2 preface (h2c, prior knowledge); the
# h2c nginx port gets HTTP/2 towards it too.
frontend http
    bind 127.0.0.1:{HAP}
    use_backend orig_h2 if {{ dst_port {H2_PORT} }}
    default_backend orig_h1
backend orig_h1
    server orig 0.0.0.0:0
backend orig_h2
    server orig 0.0.0.0:0 proto h2
""")
    sh("haproxy", "-c", "-q", "-f", cfg)
    p = spawn(in_ns(POD, *as_proxy("haproxy", "-db", "-f", cfg)),
              stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmpdir, "haproxy.log"), "ab"))
    wait_port(POD, HAP)
    return p


def haproxy_requests(backend):
    """Requests HAProxy sent to BACKEND so far (stats socket, `show stat`)."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.path.join(tmpdir, "haproxy", "stats.sock"))
    s.sendall(b"show stat\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    lines = data.decode().splitlines()
    head = lines[0].lstrip("# ").split(",")
    for line in lines[1:]:
        row = dict(zip(head, line.split(",")))
        if row.get("pxname") == backend and row.get("svname") == "BACKEND":
            return int(row.get("req_tot") or 0)
    raise RuntimeError(f"no backend {backend} in HAProxy's stats")


class Rules:
    """The pod's outbound redirect (none or a proxy port) and the peer's inbound one (P only)."""

    def __init__(self, meshinit):
        self.meshinit, self.pod, self.peer = meshinit, None, False

    def set(self, path):
        pod = {"A": None, "B": ONE_HOP, "P": PAIR_OUT, "H": HAP, "B0": BASE}[path]
        if pod != self.pod:
            ns = f"/var/run/netns/{POD}"
            if pod is None:
                sh(self.meshinit, "cleanup", "--netns", ns)
            else:
                sh(self.meshinit, "apply", "--netns", ns, "--proxy-uid", str(PROXY_UID),
                   "--outgoing-proxy-port", str(pod))
            self.pod = pod
        peer = path == "P"
        if peer != self.peer:
            ns = f"/var/run/netns/{PEER}"
            if peer:
                sh(self.meshinit, "apply", "--netns", ns, "--proxy-uid", str(PROXY_UID))
            else:
                sh(self.meshinit, "cleanup", "--netns", ns)
            self.peer = peer


def metric(ns, admin, prefix):
    text = sh(*in_ns(ns, "curl", "-s", f"http://127.0.0.1:{admin}/metrics"))
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(prefix))


def rss_kib(pid, field="VmRSS"):
    """A memory line of /proc/PID/status: VmRSS, or of it RssAnon (what the process
    allocated) and RssFile (resident pages of the executable and libraries); or Pss from
    /proc/PID/smaps_rollup: the resident pages with each shared one divided among the
    processes that map it (the pair's two proxies share their executable's pages)."""
    with open(f"/proc/{pid}/{'smaps_rollup' if field == 'Pss' else 'status'}") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def url(h2):
    return f"http://{PEER4}:{H2_PORT if h2 else H1_PORT}/1k"


def verify_paths(rules):
    """Each path goes where it should: 20 requests per protocol, counted where they must be."""
    counters = {
        "B": lambda: metric(POD, 4191, 'request_total{direction="outbound"'),
        "P": lambda: (metric(POD, 4291, 'request_total{direction="outbound"')
                      + metric(PEER, 4191, 'request_total{direction="inbound"')),
        "H": lambda: haproxy_requests("orig_h1") + haproxy_requests("orig_h2"),
    }
    if "B0" in PATHS:
        counters["B0"] = lambda: metric(POD, BASE_ADMIN, 'request_total{direction="outbound"')
    for path in PATHS:
        rules.set(path)
        before = {p: c() for p, c in counters.items()}
        for h2 in (False, True):
            flag = "--http2-prior-knowledge" if h2 else "--http1.1"
            # One curl per request: curl 7.88 fails (exit 16) reusing an h2c connection.
            out = "".join(sh(*in_ns(POD, "curl", "-s", flag, "-w", "%{http_version} %{size_download}\\n",
                                    "-o", "/dev/null", url(h2))) for _ in range(10))
            want = f"{2 if h2 else 1.1} 1024"
            if any(l != want for l in out.splitlines()) or len(out.splitlines()) != 10:
                raise RuntimeError(f"path {path}: curl {flag} gave {out!r}, expected 10 × {want!r}")
        time.sleep(0.5)
        seen = {p: c() - before[p] for p, c in counters.items()}
        expect = {p: (0 if p != path else (40 if p == "P" else 20)) for p in counters}
        if seen != expect:
            raise RuntimeError(f"path {path}: requests counted {seen}, expected {expect}")


class Bench:
    def __init__(self, a, rules, pids):
        self.a, self.rules, self.pids = a, rules, pids
        self.results = {}   # (measure, path) -> [values]

    def add(self, key, value):
        self.results.setdefault(key, []).append(value)

    def oha(self, path, h2, qps=None, seconds=None):
        self.rules.set(path)
        seconds = seconds or self.a.seconds
        args = [self.a.oha, "--no-tui", "--output-format", "json", "-z", f"{seconds}s", "-w"]
        if h2:
            args += ["--http2", "-c", "8", "-p", "8"] if qps is None else ["--http2", "-c", "4", "-p", "4"]
        else:
            args += ["-c", "8"] if qps is None else ["-c", "16"]
        if qps:
            args += ["-q", str(qps), "--latency-correction"]
        pids = self.pids.get(path, [])
        c0, t0 = [cpu_ticks(p) for p in pids], time.time()
        out = sh(*in_ns(POD, "prlimit", NOFILE, *args, url(h2)), timeout=seconds + 60)
        dt = time.time() - t0
        cpu = [(cpu_ticks(p) - c) / CLK / dt for p, c in zip(pids, c0)]
        rss = [(rss_kib(p) / 1024, rss_kib(p, "RssAnon") / 1024, rss_kib(p, "Pss") / 1024) for p in pids]
        r = json.loads(out)
        s = r["summary"]
        codes = r.get("statusCodeDistribution", {})
        # Requests still in flight when the run ends (HTTP/2 ignores -w) are not failures.
        errors = {k: v for k, v in r.get("errorDistribution", {}).items() if k != "aborted due to deadline"}
        ok = codes.get("200", 0)
        bad = sum(v for k, v in codes.items() if k != "200") + sum(errors.values())
        if bad > max(5, ok // 1000):
            raise RuntimeError(f"path {path} h2={h2} qps={qps}: {codes} errors {errors}")
        return s["requestsPerSec"], r["latencyPercentiles"], cpu, rss, bad

    def fixed(self, path, h2, qps):
        proto = "h2" if h2 else "h1"
        rps, pct, cpu, rss, bad = self.oha(path, h2, qps)
        self.add((f"{proto}@{qps}/p50", path), pct["p50"] * 1e3)
        self.add((f"{proto}@{qps}/p99", path), pct["p99"] * 1e3)
        self.add((f"{proto}@{qps}/rps", path), rps)
        self.add((f"{proto}@{qps}/bad", path), bad)
        for i, (c, (m, anon, pss)) in enumerate(zip(cpu, rss)):
            self.add((f"{proto}@{qps}/cpu{i}", path), c / (rps / 1000))
            self.add((f"{proto}@{qps}/rss{i}", path), m)
            self.add((f"{proto}@{qps}/anon{i}", path), anon)
            self.add((f"{proto}@{qps}/pss{i}", path), pss)

    def most(self, path, h2):
        proto = "h2" if h2 else "h1"
        rps, _, cpu, _, _ = self.oha(path, h2)
        self.add((f"{proto}/max", path), rps)
        for i, c in enumerate(cpu):
            self.add((f"{proto}/maxcpu{i}", path), c)


def profile(bench, pid, seconds, qps=None, h2=False):
    """perf record -g of the one-hop meshproxy during an HTTP/1.1 run at the most rps (or at
    `qps`); top self frames, and the samples by object (the proxy's own code, libc, kernel)."""
    bench.rules.set("B")
    data = os.path.join(tmpdir, "perf.data")
    rec = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", str(pid),
                            "-o", data, "--", "sleep", str(seconds)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rps = bench.oha("B", h2, qps=qps, seconds=seconds)[0]
    rec.wait()
    lines = lambda text, n: [l for l in text.splitlines() if l.strip() and not l.startswith("#")][:n]
    top = sh("perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "sym", "-g", "none",
             "--percent-limit", "0.8")
    dso = sh("perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "dso", "-g", "none",
             "--percent-limit", "0.5")
    return rps, lines(top, 35) + ["", "by object:"] + lines(dso, 10)


def report(a, bench, meta):
    r = bench.results
    med = lambda k: statistics.median(r[k])
    ms = lambda v: f"{v:.3f}"
    n = lambda v: f"{v:,.0f}"
    lines = []
    w = lines.append
    w("### HTTP request level: direct vs meshproxy one hop vs meshproxy mTLS pair vs HAProxy `mode http`")
    w("")
    w(f"Generated by `{meta['command']}` on {meta['date']}.")
    w(f"Machine: {meta['nproc']} vCPU {meta['cpu']}, kernel {meta['kernel']}; commit {meta['commit']}; "
      f"HAProxy {meta['haproxy']}, nginx {meta['nginx']}, {meta['oha']}.")
    w(f"`uptime` at start: `{meta['uptime_start']}`; at end: `{meta['uptime_end']}`. "
      f"{meta['others']}")
    w(f"{a.rounds} interleaved rounds (A B P H, A B P H, …); each cell is the median (min–max) of the rounds. "
      f"Each run is {a.seconds} s of `oha` in the pod (`--latency-correction` for the fixed-rate runs: latency "
      f"is measured from when each request was due, so a stall is not hidden by coordinated omission). "
      f"Fixed rate: HTTP/1.1 on 16 connections, HTTP/2 on 4 connections × 4 streams. Most requests/s: "
      f"HTTP/1.1 on 8 connections, HTTP/2 on 8 connections × 8 streams. The client, the proxies and nginx "
      f"share the 2 vCPUs, so the most requests/s is bounded by the whole machine, not by the proxy alone.")
    w("")
    w("Paths: **A** direct (no rules); **B** meshproxy one hop (the pod's outbound proxy, plaintext, request "
      "by request); **P** the meshproxy mTLS pair (the pod's outbound proxy → one pooled mTLS HTTP/2 "
      "connection → the peer's inbound proxy; HTTP/1.1 is carried as HTTP/2 between them): **two hops**, so "
      "its added latency per hop is (P − A) / 2; **H** HAProxy 2.6 `mode http`, transparent "
      "(`server orig 0.0.0.0:0`, `proto h2` towards the h2c port). B, P and H use the same `meshinit apply` "
      "rules (only `--outgoing-proxy-port` differs); the proxies run as uid 2102.")
    w("")
    if a.meshproxy_args:
        w(f"B and both proxies of P run `meshproxy {a.meshproxy_args}`.")
    if "B0" in PATHS:
        w(f"**B0**: the same one hop through `{a.baseline}`"
          + (f" `{a.baseline_args}`" if a.baseline_args else "") + f" (outbound :{BASE}).")
    w("")
    w("| measure | A direct | B meshproxy | P meshproxy mTLS pair | H HAProxy `mode http` |"
      + (" B0 meshproxy one hop, baseline |" if "B0" in PATHS else ""))
    w("|---|---|---|---|---|" + ("---|" if "B0" in PATHS else ""))

    def row(title, key, f, added=False, higher=False):
        cells = []
        base = med((key, "A")) if (key, "A") in r else None
        for p in PATHS:
            k = (key, p)
            if k not in r:
                cells.append("—")
                continue
            c = fmt_range(r[k], f)
            if p != "A" and base is not None:
                if added:
                    d = med(k) - base
                    c += f" **{d:+.3f}**" + (f" (**{d / 2:+.3f}** per hop)" if p == "P" else "")
                elif higher:
                    c += f" **{med(k) / base:.2f}×**"
            cells.append(c)
        w(f"| {title} | " + " | ".join(cells) + " |")

    for proto, name in (("h1", "HTTP/1.1"), ("h2", "HTTP/2")):
        for q in a.rates:
            row(f"{name} @ {q:,} rps: p50 ms (added)", f"{proto}@{q}/p50", ms, added=True)
            row(f"{name} @ {q:,} rps: p99 ms (added)", f"{proto}@{q}/p99", ms, added=True)
        row(f"{name}: most requests/s (× direct)", f"{proto}/max", n, higher=True)
    w("")
    w("Proxy cost during the fixed-rate runs, per 1,000 requests/s: CPU is (utime + stime) of the proxy "
      "process over the run / achieved requests/s × 1,000, in vCPU; RSS is VmRSS at the end of the run "
      "(absolute, at that rate: the figure peers publish), and of it RssAnon, the memory the process "
      "allocated (the rest is resident pages of the executable and libraries), and Pss, which divides each "
      "shared page among the processes mapping it (what the proxy adds to a node where other processes run "
      "the same binary; here path B's proxy and the pair's two run the same executable, so its pages are "
      "divided among three). For the pair, each proxy separately.")
    w("")
    w("| proxy | " + " | ".join(f"{'HTTP/1.1' if p == 'h1' else 'HTTP/2'} @ {q:,}: vCPU per 1k rps"
                             for p in ("h1", "h2") for q in a.rates)
      + " | RSS MiB (HTTP/1.1 @ 1,000 / max of all) | of it RssAnon MiB (same) | Pss MiB (same) |")
    w("|---|" + "---|" * (2 * len(a.rates)) + "---|---|---|")
    names = (("B", 0, "meshproxy one hop"), ("P", 0, "meshproxy pair: pod outbound"),
             ("P", 1, "meshproxy pair: peer inbound"), ("H", 0, "HAProxy `mode http`"))
    if "B0" in PATHS:
        names += (("B0", 0, "meshproxy one hop, baseline"),)
    for path, i, label in names:
        cells = [fmt_range(r[(f"{p}@{q}/cpu{i}", path)], lambda v: f"{v:.3f}")
                 for p in ("h1", "h2") for q in a.rates]
        first = f"h1@{a.rates[0]}/rss{i}"
        rss_all = max(max(r[(f"{p}@{q}/rss{i}", path)]) for p in ("h1", "h2") for q in a.rates)
        cells.append(f"{med((first, path)):.1f} / {rss_all:.1f}")
        anon_all = max(max(r[(f"{p}@{q}/anon{i}", path)]) for p in ("h1", "h2") for q in a.rates)
        cells.append(f"{med((f'h1@{a.rates[0]}/anon{i}', path)):.1f} / {anon_all:.1f}")
        pss_all = max(max(r[(f"{p}@{q}/pss{i}", path)]) for p in ("h1", "h2") for q in a.rates)
        cells.append(f"{med((f'h1@{a.rates[0]}/pss{i}', path)):.1f} / {pss_all:.1f}")
        w(f"| {label} | " + " | ".join(cells) + " |")
    w("")
    return "\n".join(lines)


def targets(a, bench):
    r = bench.results
    med = lambda k: statistics.median(r[k])
    q = a.rates[0]
    out = ["", "Targets (PERFORMANCE.md, HTTP request level):", ""]
    for proto, name in (("h1", "HTTP/1.1"), ("h2", "HTTP/2")):
        base = med((f"{proto}@{q}/p99", "A"))
        b = med((f"{proto}@{q}/p99", "B")) - base
        p = (med((f"{proto}@{q}/p99", "P")) - base) / 2
        out.append(f"- added p99 ≤ 0.5 ms per hop at {q:,} rps, {name}: one hop {b:+.3f} ms "
                   f"({'met' if b <= 0.5 else 'MISSED'}); pair {p:+.3f} ms per hop "
                   f"({'met' if p <= 0.5 else 'MISSED'}).")
    for path, i, label in (("B", 0, "one hop"), ("P", 0, "pair, outbound"), ("P", 1, "pair, inbound")):
        cpu = max(med((f"{p}@{q}/cpu{i}", path)) for p in ("h1", "h2") for q in a.rates)
        rss = max(med((f"{p}@{q}/rss{i}", path)) for p in ("h1", "h2") for q in a.rates)
        out.append(f"- ≤ 0.05 vCPU and ≤ 10 MiB RSS per 1,000 rps, meshproxy {label}: worst median "
                   f"{cpu:.3f} vCPU ({'met' if cpu <= 0.05 else 'MISSED'}), {rss:.1f} MiB "
                   f"({'met' if rss <= 10 else 'MISSED'}).")
    for proto, name in (("h1", "HTTP/1.1"), ("h2", "HTTP/2")):
        b, h = med((f"{proto}/max", "B")), med((f"{proto}/max", "H"))
        out.append(f"- most requests/s through one hop ≥ HAProxy `mode http`, {name}: meshproxy {b:,.0f}, "
                   f"HAProxy {h:,.0f} ({b / h:.2f}×, {'met' if b >= h else 'MISSED'}).")
    return "\n".join(out) + "\n"


def find_oha(given):
    for c in (given, os.path.join(ROOT, "target/bench-tools/bin/oha"), shutil.which("oha")):
        if c and os.access(c, os.X_OK):
            return os.path.abspath(c)
    sys.exit("http.py: no oha: cargo install oha --locked --no-default-features --features native-tls --root target/bench-tools")


def main():
    global tmpdir
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round of 2 s runs")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--seconds", type=int, default=None, help="length of each oha run")
    ap.add_argument("--rates", default="1000,5000", help="fixed rates, requests/s")
    ap.add_argument("--meshinit", default=os.path.join(ROOT, "target/release/meshinit"))
    ap.add_argument("--meshproxy", default=os.path.join(ROOT, "target/release/meshproxy"))
    ap.add_argument("--oha")
    ap.add_argument("--others", default="", help="what else was running (stated in the report)")
    ap.add_argument("--profile", action="store_true", help="perf record meshproxy (one hop) at the most rps")
    ap.add_argument("--profile-rate", type=int, default=None,
                    help="with --profile: at this fixed rate (requests/s) instead of the most")
    ap.add_argument("--profile-seconds", type=int, default=5, help="with --profile: how long (default 5)")
    ap.add_argument("--profile-http2", action="store_true", help="with --profile: HTTP/2 instead of HTTP/1.1")
    ap.add_argument("--out", help="also write the Markdown here")
    ap.add_argument("--meshproxy-args", default="",
                    help="extra flags for the meshproxies of B and P, e.g. \"--cores 1\"")
    ap.add_argument("--baseline", help="another meshproxy binary measured as one hop, path B0, in the same rounds")
    ap.add_argument("--baseline-args", default="", help="extra flags for the baseline, e.g. \"--cores 2\"")
    a = ap.parse_args()
    a.rounds = a.rounds or (1 if a.quick else 3)
    a.seconds = a.seconds or (2 if a.quick else 6)
    a.rates = [int(x) for x in a.rates.split(",")]
    a.oha = find_oha(a.oha)
    a.meshinit, a.meshproxy = os.path.abspath(a.meshinit), os.path.abspath(a.meshproxy)
    if os.geteuid() != 0:
        sys.exit("http.py: needs root (it creates network namespaces)")
    if a.baseline:
        a.baseline = os.path.abspath(a.baseline)
        PATHS["B0"] = "meshproxy one hop, baseline"
    for b in (a.meshinit, a.meshproxy) + ((a.baseline,) if a.baseline else ()):
        if not os.access(b, os.X_OK):
            sys.exit(f"http.py: {b} not found: cargo build --release -p meshinit -p meshproxy (or pass the path)")
    ensure_packages(PACKAGES)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    tmpdir = tempfile.mkdtemp(prefix="mi-bench-http-")
    os.chmod(tmpdir, 0o755)
    try:
        meta = {
            "command": " ".join(["scripts/bench/http.py"] + sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "nproc": os.cpu_count(),
            "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
            "kernel": platform.release(),
            "commit": sh("git", "-C", ROOT, "rev-parse", "--short", "HEAD").strip(),
            "haproxy": sh("haproxy", "-v").split()[2],
            "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1],
            "oha": sh(a.oha, "--version").strip(),
            "uptime_start": sh("uptime").strip(),
            "others": a.others,
        }
        pod_and_peer(POD, PEER)
        start_nginx()
        anchors, ids = make_identities(a.meshproxy)
        extra = a.meshproxy_args.split()
        b = start_meshproxy(a.meshproxy, POD, ONE_HOP, 4191, "meshproxy-b.log", extra=extra)
        p_out = start_meshproxy(a.meshproxy, POD, PAIR_OUT, 4291, "meshproxy-p-out.log",
                                (anchors, ids[ID_POD], PEER4, ID_PEER), extra=extra)
        p_in = start_meshproxy(a.meshproxy, PEER, ONE_HOP, 4191, "meshproxy-p-in.log",
                               (anchors, ids[ID_PEER], POD4, ID_POD), extra=extra)
        pids = {"B": [b.pid], "P": [p_out.pid, p_in.pid]}
        if a.baseline:
            pids["B0"] = [start_meshproxy(a.baseline, POD, BASE, BASE_ADMIN, "meshproxy-b0.log",
                                          extra=a.baseline_args.split()).pid]
        hap = start_haproxy()
        rules = Rules(a.meshinit)
        verify_paths(rules)
        log("paths verified")
        bench = Bench(a, rules, {**pids, "H": [hap.pid]})
        for path in PATHS:  # warm-up: connections, pools, page cache
            for h2 in (False, True):
                bench.oha(path, h2, qps=1000, seconds=1)
        prof = None
        if a.profile:
            ensure_packages({"perf": "linux-perf"})
            prof = profile(bench, b.pid, a.profile_seconds, a.profile_rate, a.profile_http2)
            log(f"profiled: {prof[0]:,.0f} rps under perf")
        for i in range(a.rounds):
            t = time.time()
            for h2 in (False, True):
                for q in a.rates:
                    for path in PATHS:
                        bench.fixed(path, h2, q)
                for path in PATHS:
                    bench.most(path, h2)
            log(f"round {i + 1}/{a.rounds} done in {time.time() - t:.0f} s; load "
                f"{open('/proc/loadavg').read().split()[0]}")
        meta["uptime_end"] = sh("uptime").strip()
        text = report(a, bench, meta) + targets(a, bench)
        if prof:
            at = f"{a.profile_rate:,} requests/s" if a.profile_rate else "the most requests/s"
            text += (f"\nmeshproxy (one hop) profile, {a.profile_seconds} s of "
                     f"{'HTTP/2' if a.profile_http2 else 'HTTP/1.1'} at {at} "
                     f"({prof[0]:,.0f} rps under perf), self time by symbol:\n\n```\n" + "\n".join(prof[1]) + "\n```\n")
        raw = {f"{m}/{p}": v for (m, p), v in bench.results.items()}
        text += ("\n\n<details><summary>raw values per round</summary>\n\n```json\n" + json.dumps(raw, indent=1)
                 + "\n```\n</details>\n")
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text)
    finally:
        cleanup()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
