#!/usr/bin/env python3
"""Datapath benchmark: direct vs meshproxy vs HAProxy, pod namespace -> peer namespace.

Two throwaway namespaces, mi-bench-pod-PID and mi-bench-peer-PID, joined by one veth
(198.18.0.1/24 + fd00:18::1/64 in the pod, 198.18.0.2/24 + fd00:18::2/64 in the peer);
nothing touches the host namespace, and everything is removed on exit (also on
Ctrl-C). Paths, all measured in ONE interleaved run (A B C.., A B C.., ...):

  A  direct          no rules in the pod
  B  meshproxy       `meshinit apply` (outbound redirect to :4140, uid 2102 exempt),
                     meshproxy as uid 2102; the target port is in --opaque-ports
  Bd meshproxy       same, but a port that goes through protocol detection
                     (the 64-byte zero payload is classified opaque at the first read)
  C  HAProxy         same rules but --outgoing-proxy-port 4150: HAProxy 2.6 as uid 2102,
                     `mode tcp`, `server orig 0.0.0.0:0` (original destination),
                     `option splice-auto`
  Cn HAProxy         same on 4151 without splicing
  B0 meshproxy       with --baseline PATH only: another meshproxy binary (the code
                     before a change), same flags, outbound on 4160, measured in
                     the same rounds as B for a before/after comparison; each further
                     --baseline is B1, B2, ... (outbound on 4170, 4180, ...), and
                     --baseline-args gives the Nth of them extra flags (e.g. "--cores 2"),
                     as --meshproxy-args does for B and Bd; at most three of them
                     (a fourth's ports collide with the first ones' admin ports)
  S  eBPF sockmap    with --sockmap only: scripts/bench/sockmap/smproxy.c on 4152, a
                     prototype forwarder whose bytes never reach user space (an sk_skb
                     verdict program redirects each segment to the paired socket); one
                     thread per connection, so its connection rate says little

Measures: iperf3 1 stream and 8 streams (IPv4 for all paths, IPv6 for A and B: HAProxy
2.6 cannot recover an IPv6 original destination); 64-byte ping-pong over one
persistent connection (p50/p99, scripts/bench/netbench); new connections per second
(scripts/bench/connrate: connect, 1-byte exchange, close); meshproxy RSS idle and with
10,000 open idle connections through it (HAProxy alongside for comparison).

Usage: scripts/bench/proxy.py [--quick] [--rounds N] [--meshinit PATH] [--meshproxy PATH]
                              [--meshproxy-args ARGS] [--baseline PATH [--baseline-args ARGS]]...
                              [--profile | --profile-only] [--measures iperf,latency,conn]
                              [--skip C,Cn] [--no-memory] [--sockmap]
Needs root. Installs iperf3, haproxy, conntrack, procps, util-linux if missing. Builds
scripts/bench/netbench and scripts/bench/connrate (std-only, not workspace members).
Prints a Markdown section for BENCHMARKS.md (also written to --out if given).
With BENCH_PERF_DATA=PREFIX set, each connection-rate profile's perf.data is kept as
PREFIX.PORT (4140 for B, 4160, 4170, ... for the baselines) for `perf report -i`.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (NOFILE, NOFILE_MAX, PROXY_UID, as_proxy, build_tool, cpu_ticks, ensure_packages,  # noqa: E402
                      fmt_range, in_ns, log, sh, show_logs, spawn, stop_all, wait_port)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "scripts", "bench")
TAG = f"{os.getpid()}"
POD = f"mi-bench-pod-{TAG}"
PEER = f"mi-bench-peer-{TAG}"
POD4, PEER4 = "198.18.0.1", "198.18.0.2"
POD6, PEER6 = "fd00:18::1", "fd00:18::2"
IPERF_PORT = 5201
OPAQUE_PORT = 7000  # in meshproxy's --opaque-ports
DETECT_PORT = 8080  # not opaque: goes through detection
HOLD_PORT = 9000    # opaque; the peer accepts and holds
MESH_PORT, HAP_SPLICE_PORT, HAP_PLAIN_PORT = 4140, 4150, 4151
SOCKMAP_PORT = 4152  # --sockmap's prototype (path S)
BASE_PORT = 4160  # --baseline's meshproxy (outbound; inbound 4163, admin 4192); the Nth
                  # further one adds 10 * N to both ports and N to the admin port
PACKAGES = {"iperf3": "iperf3", "haproxy": "haproxy", "conntrack": "conntrack",
            "ss": "iproute2", "nft": "nftables", "setpriv": "util-linux",
            "prlimit": "util-linux", "uptime": "procps"}

PATHS = {
    # key: (label, proxy port or None, destination port for latency / conn rate)
    "A": ("direct", None, OPAQUE_PORT),
    "B": ("meshproxy", MESH_PORT, OPAQUE_PORT),
    "Bd": ("meshproxy, detected port", MESH_PORT, DETECT_PORT),
    "C": ("HAProxy splice-auto", HAP_SPLICE_PORT, OPAQUE_PORT),
    "Cn": ("HAProxy no splice", HAP_PLAIN_PORT, OPAQUE_PORT),
}

HAP_MAXCONN = (NOFILE_MAX - 200) // 2
tmpdir = None









def cleanup():
    stop_all()
    for ns in (POD, PEER):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    if tmpdir and sys.exc_info()[0] is not None:
        show_logs(tmpdir, ("meshproxy.log", "haproxy.log"))
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)


def setup_netns():
    for ns in (POD, PEER):
        sh("ip", "netns", "add", ns)
    sh("ip", "-n", POD, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", PEER)
    for ns, a4, a6 in ((POD, POD4, POD6), (PEER, PEER4, PEER6)):
        sh("ip", "-n", ns, "addr", "add", f"{a4}/24", "dev", "eth0")
        sh("ip", "-n", ns, "addr", "add", f"{a6}/64", "dev", "eth0", "nodad")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
    # The veths' link-local addresses stay tentative (duplicate address detection) for
    # about a second after the link comes up, and an IPv6 SYN sent meanwhile can be lost
    # to neighbour discovery: meshproxy's 1 s connect timeout would then fail the first
    # proxied IPv6 connection. Wait until no address is tentative.
    deadline = time.time() + 10
    while any(sh("ip", "-n", ns, "-6", "addr", "show", "tentative").strip() for ns in (POD, PEER)):
        if time.time() > deadline:
            raise RuntimeError("IPv6 addresses still tentative after 10 s")
        time.sleep(0.1)
    # Client side of many short connections: both are per-namespace sysctls.
    sh(*in_ns(POD, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65000"))
    sh(*in_ns(POD, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"))



def base_port(n):
    """The outbound port of the Nth --baseline (path BN)."""
    return BASE_PORT + 10 * n


def start_meshproxy(bin_path, baseline=None, extra=()):
    """meshproxy for path B, or with `baseline` = N for path BN; `extra` are more flags."""
    if baseline is None:
        port, admin, log_name = MESH_PORT, 4191, "meshproxy.log"
        ports = ["--admin-addr", "127.0.0.1:4191"]
    else:
        port, admin = base_port(baseline), 4192 + baseline
        log_name = "meshproxy-baseline.log" if baseline == 0 else f"meshproxy-baseline{baseline}.log"
        ports = ["--outbound-addr", f"127.0.0.1:{port}", "--inbound-addr", f"0.0.0.0:{port + 3}",
                 "--admin-addr", f"127.0.0.1:{admin}"]
    p = spawn(in_ns(POD, *as_proxy(bin_path, "--opaque-ports", f"{IPERF_PORT},{OPAQUE_PORT},{HOLD_PORT}",
                                   *ports, *extra)),
              stdout=subprocess.DEVNULL,
              stderr=open(os.path.join(tmpdir, log_name), "ab"),
              env=dict(os.environ, RUST_LOG=os.environ.get("BENCH_RUST_LOG", "warn")))
    wait_port(POD, port)
    wait_port(POD, admin)
    return p


def start_sockmap():
    """Path S: builds and starts the sockmap prototype in the pod (as root: it loads its
    eBPF program, then drops to the proxy's uid itself)."""
    binary = os.path.join(tmpdir, "smproxy")
    sh("gcc", "-O2", "-Wall", "-o", binary, os.path.join(HERE, "sockmap", "smproxy.c"), "-lpthread")
    p = spawn(in_ns(POD, "prlimit", NOFILE, binary, str(SOCKMAP_PORT), str(PROXY_UID)),
              stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmpdir, "smproxy.log"), "ab"))
    wait_port(POD, SOCKMAP_PORT)
    return p


def start_haproxy():
    cfg = os.path.join(tmpdir, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(f"""global
    maxconn {HAP_MAXCONN}
    maxpipes 64
    ulimit-n {NOFILE_MAX}
    nbthread {os.cpu_count()}
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
# Transparent original-destination proxy: a 0.0.0.0 server address means "connect to
# the connection's original destination" (SO_ORIGINAL_DST, IPv4 only in HAProxy 2.6).
listen splice
    bind 127.0.0.1:{HAP_SPLICE_PORT}
    option splice-auto
    server orig 0.0.0.0:0
listen nosplice
    bind 127.0.0.1:{HAP_PLAIN_PORT}
    server orig 0.0.0.0:0
""")
    sh("haproxy", "-c", "-q", "-f", cfg)
    p = spawn(in_ns(POD, *as_proxy("haproxy", "-db", "-f", cfg)),
              stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmpdir, "haproxy.log"), "ab"))
    wait_port(POD, HAP_SPLICE_PORT)
    wait_port(POD, HAP_PLAIN_PORT)
    return p


class Rules:
    def __init__(self, meshinit):
        self.meshinit, self.current = meshinit, "none"

    def set(self, proxy_port):
        want = proxy_port or "none"
        if want == self.current:
            return
        ns = f"/var/run/netns/{POD}"
        if proxy_port is None:
            sh(self.meshinit, "cleanup", "--netns", ns)
        else:
            sh(self.meshinit, "apply", "--netns", ns, "--proxy-uid", str(PROXY_UID),
               "--outgoing-proxy-port", str(proxy_port))
        self.current = want



def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def metric(name):
    """Sum of a meshproxy metric over its label sets."""
    text = sh(*in_ns(POD, "curl", "-s", "http://127.0.0.1:4191/metrics"))
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def proxy_sockets(port):
    """Established sockets in the pod whose local port is a proxy port."""
    return len(sh(*in_ns(POD, "ss", "-Htn", "state", "established", f"( sport = :{port} )")).splitlines())


class Bench:
    def __init__(self, args, rules, netbench, connrate, pids):
        self.a, self.rules, self.netbench, self.connrate_bin, self.pids = args, rules, netbench, connrate, pids
        self.results = {}  # (measure, path) -> [values]
        self.cpu = {}      # (measure, path) -> [proxy cpu %]

    def add(self, key, value):
        self.results.setdefault(key, []).append(value)

    def iperf(self, path, streams, family):
        label, port, _ = PATHS[path]
        self.rules.set(port)
        dst = PEER4 if family == 4 else PEER6
        pid = self.pids.get(port)
        t0, c0 = time.time(), cpu_ticks(pid) if pid else 0
        out = sh(*in_ns(POD, "iperf3", "-c", dst, "-p", str(IPERF_PORT), "-t", str(self.a.iperf_seconds),
                        "-P", str(streams), "-J"), timeout=self.a.iperf_seconds + 30)
        if pid:
            pct = (cpu_ticks(pid) - c0) / os.sysconf("SC_CLK_TCK") / (time.time() - t0) * 100
            self.cpu.setdefault((f"iperf{streams}v{family}", path), []).append(pct)
        gbps = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
        self.add((f"iperf{streams}v{family}", path), gbps)

    def latency(self, path):
        _, port, dport = PATHS[path]
        self.rules.set(port)
        out = sh(*in_ns(POD, self.netbench, "pingpong", "--connect", f"{PEER4}:{dport}", "--size", "64",
                        "--seconds", str(self.a.rr_seconds)))
        _, p50, p99, _ = out.split()
        self.add(("p50", path), float(p50))
        self.add(("p99", path), float(p99))

    def connrate(self, path):
        _, port, dport = PATHS[path]
        self.rules.set(port)
        # Forget the previous runs' TIME_WAIT conntrack entries (pod namespace only).
        subprocess.run(in_ns(POD, "conntrack", "-F"), capture_output=True)
        pid = self.pids.get(port)
        c0 = cpu_ticks(pid) if pid else 0
        out = sh(*in_ns(POD, "prlimit", NOFILE, self.connrate_bin, "--connect", f"{PEER4}:{dport}",
                        "--seconds", str(self.a.conn_seconds)), timeout=self.a.conn_seconds + 60)
        rate = float(out.split()[2])
        self.add(("conn", path), rate)
        if pid and rate > 0:
            # Proxy CPU per connection, µs: the proxy's cost independent of how fast
            # the (shared, loaded) machine let the client go.
            secs = (cpu_ticks(pid) - c0) / os.sysconf("SC_CLK_TCK")
            self.cpu.setdefault(("conn_us", path), []).append(secs / (rate * self.a.conn_seconds) * 1e6)


def profile_connrate(bench, pid, seconds, port=MESH_PORT):
    """`perf record -e cpu-clock -g` of meshproxy during one connection-rate run on path B
    (B0 with `port` = BASE_PORT); returns the top frames by self time (software clock:
    works without hardware counters, as in most VMs) and the connections/s of that run."""
    bench.rules.set(port)
    subprocess.run(in_ns(POD, "conntrack", "-F"), capture_output=True)
    data = os.path.join(tmpdir, "perf.data")
    rec = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", str(pid),
                            "-o", data, "--", "sleep", str(seconds)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = sh(*in_ns(POD, "prlimit", NOFILE, bench.connrate_bin, "--connect", f"{PEER4}:{OPAQUE_PORT}",
                    "--seconds", str(seconds)), timeout=seconds + 60)
    rec.wait()
    if os.environ.get("BENCH_PERF_DATA"):  # keep the recording for a closer look (perf report -i)
        shutil.copy(data, f"{os.environ['BENCH_PERF_DATA']}.{port}")
    top = sh("perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "sym", "-g", "none",
             "--percent-limit", "0.7")
    lines = [l for l in top.splitlines() if l.strip() and not l.startswith("#")]
    samples = next((l for l in top.splitlines() if l.startswith("# Samples")), "")
    return float(out.split()[2]), samples, lines[:30]


def verify_paths(rules, netbench):
    """Each path really goes where it should: hold one connection, look for it on the proxy port."""
    for path, (label, port, dport) in PATHS.items():
        rules.set(port)
        p = subprocess.Popen(in_ns(POD, netbench, "open", "--connect", f"{PEER4}:{dport}", "--count", "1"),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = p.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"path {path} ({label}): no echo through it")
        proxy_ports = {q for _, q, _ in PATHS.values() if q} | {BASE_PORT}
        seen = {q: proxy_sockets(q) for q in sorted(proxy_ports)}
        p.stdin.close()
        p.wait()
        expect = {q: (1 if q == port else 0) for q in seen}
        if seen != expect:
            raise RuntimeError(f"path {path} ({label}): sockets on proxy ports {seen}, expected {expect}")
    rules.set(MESH_PORT)
    out = sh(*in_ns(POD, "iperf3", "-6", "-c", PEER6, "-p", str(IPERF_PORT), "-t", "1", "-J"), timeout=30)
    result = json.loads(out)
    if result.get("error") or result["end"]["sum_received"]["bytes"] <= 0:
        raise RuntimeError(f"IPv6 through meshproxy moved no bytes: {result.get('error')}")


def memory(meshproxy_bin, extra, rules, netbench, count, hap_pid):
    """meshproxy RSS: fresh and idle, with COUNT idle connections open, after they close."""
    res = {}
    mp = start_meshproxy(meshproxy_bin, extra=extra)
    time.sleep(1.0)
    res["mesh_idle"] = rss_kib(mp.pid)
    for name, port, pid in (("mesh", MESH_PORT, mp.pid), ("hap", HAP_PLAIN_PORT, hap_pid)):
        n = count if name == "mesh" else min(count, HAP_MAXCONN - 20)
        res[f"{name}_count"] = n
        rules.set(port)
        before = rss_kib(pid)
        subprocess.run(in_ns(POD, "conntrack", "-F"), capture_output=True)
        p = subprocess.Popen(in_ns(POD, "prlimit", NOFILE, netbench, "open", "--connect",
                                   f"{PEER4}:{HOLD_PORT}", "--count", str(n)),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = p.stdout.readline().split()
        if not line or line[0] != "ready":
            p.kill()
            raise RuntimeError(f"{name}: could not open {n} connections")
        time.sleep(1.0)
        res[f"{name}_before"] = before
        res[f"{name}_open"] = rss_kib(pid)
        res[f"{name}_sockets"] = proxy_sockets(port)
        if name == "mesh":
            res["mesh_metric_open"] = metric("tcp_open_connections")
        res[f"{name}_open_secs"] = float(line[2])
        p.stdin.close()
        p.wait()
        time.sleep(2.0)
        res[f"{name}_after"] = rss_kib(pid)
    mp.terminate()
    mp.wait(timeout=35)
    return res



def report(a, bench, mem, meta):
    r, med = bench.results, lambda k: statistics.median(bench.results[k])
    g = lambda v: f"{v:.1f}" if v >= 10 else f"{v:.2f}"
    us = lambda v: f"{v:.0f}"
    n = lambda v: f"{v:,.0f}"
    bases = [p for p in PATHS if p.startswith("B") and p[1:].isdigit()]
    cols = ["A", "B", "Bd", "C", "Cn"] + bases + (["S"] if "S" in PATHS else [])
    lines = []
    w = lines.append
    w("### Proxy datapath: direct vs meshproxy vs HAProxy (pod → peer over veth)")
    w("")
    w(f"Generated by `{meta['command']}` on {meta['date']}.")
    w(f"Machine: {meta['nproc']} vCPU {meta['cpu']}, kernel {meta['kernel']}; commit {meta['commit']}; "
      f"HAProxy {meta['haproxy']}, iperf3 {meta['iperf3']}.")
    if a.meshproxy_args:
        w(f"B and Bd run `meshproxy {a.meshproxy_args}`.")
    for p in bases:
        w(f"**{p}**: {PATHS[p][0]}: `{a.baseline[int(p[1:])]}`"
          + (f" `{a.baseline_args[int(p[1:])]}`" if a.baseline_args[int(p[1:])] else "") + ".")
    w(f"Load average (1/5/15 min) at start {meta['load_start']}, at end {meta['load_end']} "
      f"(the load includes the benchmark's own processes; anything else running is stated with the run: absolute figures are noisy, compare ratios).")
    w(f"{a.rounds} interleaved rounds (A B Bd C Cn, A B Bd C Cn, …); each cell is the median (min–max) of the "
      f"rounds; ratios are median / median of direct in the same run. iperf3 {a.iperf_seconds} s per run, "
      f"ping-pong {a.rr_seconds} s, connection rate {a.conn_seconds} s.")
    w("")
    w("Paths: **A** direct (no rules); **B** meshproxy, destination port in `--opaque-ports`; "
      "**Bd** meshproxy, a port that goes through protocol detection; **C** HAProxy 2.6 `mode tcp`, "
      "`server orig 0.0.0.0:0`, `option splice-auto`; **Cn** the same without splicing. B, Bd, C, Cn use "
      "the same `meshinit apply` rules (only `--outgoing-proxy-port` differs: 4140 / 4150 / 4151) and the "
      "proxy runs as uid 2102."
      + (" **S** the eBPF sockmap prototype (`scripts/bench/sockmap/smproxy.c`, 4152): bytes are redirected "
         "socket to socket in the kernel (a kworker sends them), the process only accepts, dials and passes "
         "the half-close on; one thread per connection, so its connection rate is not what a real proxy "
         "would get, and its CPU is not the process's alone (not shown)." if "S" in PATHS else ""))
    w("")
    base_col = "".join(f" {p} {PATHS[p][0]} |" for p in cols[5:])
    w("| measure | A direct | B meshproxy | Bd meshproxy, detected port | C HAProxy splice | Cn HAProxy no splice |"
      + base_col + " target (B) |")
    w("|---|---|---|---|---|---|---|" + "---|" * (len(cols) - 5))

    def row(title, measure, f, ratio=True, added=False, target="", paths=cols, na=None):
        cells = []
        base = med((measure, "A")) if (measure, "A") in r else None
        for p in cols:
            k = (measure, p)
            if k not in r:
                cells.append(na.get(p, "—") if na else "—")
                continue
            c = fmt_range(r[k], f)
            if p != "A" and base:
                if added:
                    c += f" **{med(k) - base:+.0f} µs**"
                elif ratio:
                    c += f" **{med(k) / base:.2f}×**"
            cells.append(c)
        w(f"| {title} | " + " | ".join(cells) + f" | {target} |")

    na6 = {"C": "n/a: HAProxy 2.6 has no IPv6 original destination", "Cn": "n/a"}
    if ("iperf1v4", "A") in r:
        row("iperf3 1 stream, IPv4, Gbit/s", "iperf1v4", g, target="≥ 0.80×")
        row("iperf3 8 streams, IPv4, Gbit/s", "iperf8v4", g, target="≥ 0.85×")
        row("iperf3 1 stream, IPv6, Gbit/s", "iperf1v6", g, na=na6)
    if ("iperf8v6", "A") in r:
        row("iperf3 8 streams, IPv6, Gbit/s", "iperf8v6", g, na=na6)
    if ("p50", "A") in r:
        row("64-byte request/response p50, µs (added vs direct)", "p50", us, added=True, target="≤ +15 µs")
        row("64-byte request/response p99, µs (added vs direct)", "p99", us, added=True)
    if ("conn", "A") in r:
        row("new connections/s (connect, 1-byte exchange, close)", "conn", n, target="≥ 0.60×")
    w("")
    cpu_rows = [(m, t) for m, t in (("iperf1v4", "1 stream"), ("iperf8v4", "8 streams")) if (m, "B") in bench.cpu]
    if cpu_rows:
        base_cpu = lambda m: "".join(f", {p} ({PATHS[p][0]}) {statistics.median(bench.cpu[(m, p)]):.0f}%"
                                     for p in bases if (m, p) in bench.cpu)
        w("Proxy process CPU during iperf3 (% of one CPU, median of rounds; 200% = both vCPUs): "
          + "; ".join(f"{t}: meshproxy {statistics.median(bench.cpu[(m, 'B')]):.0f}%{base_cpu(m)}"
                      + "".join(f", {PATHS[p][0]} {statistics.median(bench.cpu[(m, p)]):.0f}%"
                                for p in ("C", "Cn") if (m, p) in bench.cpu) for m, t in cpu_rows) + ".")
        w("")
    conn_cpu = [p for p in cols if ("conn_us", p) in bench.cpu]
    if conn_cpu:
        w("Proxy CPU per new connection during the connection-rate runs (µs of CPU time, median of rounds; "
          "clock ticks of the proxy process / connections made): "
          + ", ".join(f"{PATHS[p][0]} {statistics.median(bench.cpu[('conn_us', p)]):.0f} µs" for p in conn_cpu) + ".")
        w("")
    if mem:
        c = a.connections
        per = lambda name: (mem[f"{name}_open"] - mem[f"{name}_before"]) / mem[f"{name}_count"]
        w(f"Proxy memory (VmRSS from /proc/PID/status; {c:,} idle connections opened one by one through the "
          f"proxy to a peer listener that holds them, each after a 1-byte exchange so both sides are established; "
          f"IPv4, opaque port):")
        w("")
        if c < a.requested_connections:
            w(f"Only {c:,} connections, not {a.requested_connections:,}: the fd hard limit here is {NOFILE_MAX:,} "
              f"(no CAP_SYS_RESOURCE to raise it) and the proxy needs two sockets per connection.")
            w("")
        w("| | meshproxy | HAProxy no splice (for comparison) | target (meshproxy) |")
        w("|---|---|---|---|")
        w(f"| idle (fresh process, after /ready) | {mem['mesh_idle'] / 1024:.1f} MiB | — | ≤ 8 MiB |")
        w(f"| with N open connections | {mem['mesh_open'] / 1024:.1f} MiB (N = {mem['mesh_count']:,}; "
          f"{mem['mesh_sockets']:,} client sockets on :4140, tcp_open_connections = {mem['mesh_metric_open']:,.0f}) "
          f"| {mem['hap_open'] / 1024:.1f} MiB (N = {mem['hap_count']:,}, its maxconn allows no more here; "
          f"from {mem['hap_before'] / 1024:.1f} MiB after the runs above; "
          f"{mem['hap_sockets']:,} sockets on :4151) | |")
        w(f"| per open connection | {per('mesh'):.1f} KiB | {per('hap'):.1f} KiB | ≤ 24 KiB |")
        w(f"| after they all closed (+2 s) | {mem['mesh_after'] / 1024:.1f} MiB | {mem['hap_after'] / 1024:.1f} MiB | |")
        w(f"| time to open them one by one | {mem['mesh_open_secs']:.1f} s | {mem['hap_open_secs']:.1f} s | |")
        w("")
    return "\n".join(lines)


def main():
    global tmpdir
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, short runs, 1,000 connections")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--meshinit", default=os.path.join(ROOT, "target/release/meshinit"))
    ap.add_argument("--meshproxy", default=os.path.join(ROOT, "target/release/meshproxy"))
    ap.add_argument("--connections", type=int, default=None, help="idle connections for the memory test")
    ap.add_argument("--ipv6-8-streams", action="store_true", help="also iperf3 -P 8 over IPv6 (A and B)")
    ap.add_argument("--out", help="also write the Markdown here")
    ap.add_argument("--profile", action="store_true",
                    help="also profile meshproxy (perf record -e cpu-clock -g) during a connection-rate run")
    ap.add_argument("--profile-only", action="store_true", help="only the profile: no rounds, no memory test")
    ap.add_argument("--meshproxy-args", default="", help="extra flags for path B's meshproxy, e.g. \"--cores 1\"")
    ap.add_argument("--baseline", action="append", default=[],
                    help="another meshproxy binary measured as path B0 in the same rounds; "
                         "repeat for B1, B2, ...")
    ap.add_argument("--baseline-args", action="append", default=[],
                    help="extra flags for the baseline of the same rank (the first for B0, ...), "
                         "e.g. \"--cores 2\"")
    ap.add_argument("--no-memory", action="store_true", help="skip the idle-connections memory test")
    ap.add_argument("--sockmap", action="store_true",
                    help="also path S: the eBPF sockmap prototype (scripts/bench/sockmap/smproxy.c, needs gcc)")
    ap.add_argument("--skip", default="", type=lambda v: [p for p in v.split(",") if p],
                    help="comma-separated paths left out of the iperf3 runs, e.g. C,Cn (quicker A/B runs)")
    ap.add_argument("--measures", default="iperf,latency,conn",
                    help="comma-separated subset of iperf,latency,conn to run in each round")
    a = ap.parse_args()
    if len(a.baseline_args) > len(a.baseline):
        sys.exit("proxy.py: more --baseline-args than --baseline")
    a.baseline_args += [""] * (len(a.baseline) - len(a.baseline_args))
    a.rounds = a.rounds or (1 if a.quick else 4)
    a.connections = a.connections or (1000 if a.quick else 10000)
    # The proxy holds two sockets per connection (client + target) plus its listeners.
    a.requested_connections = a.connections
    a.connections = min(a.connections, (NOFILE_MAX - 64) // 2)
    if a.connections < a.requested_connections:
        log(f"fd hard limit {NOFILE_MAX}: memory test with {a.connections} connections, not {a.requested_connections}")
    a.iperf_seconds, a.rr_seconds, a.conn_seconds = (1, 1, 1) if a.quick else (5, 3, 3)
    if os.geteuid() != 0:
        sys.exit("proxy.py: needs root (it creates network namespaces)")
    for b in (a.meshinit, a.meshproxy, *a.baseline):
        if not os.access(b, os.X_OK):
            sys.exit(f"proxy.py: {b} not found: cargo build --release -p meshinit -p meshproxy (or pass the path)")
    ensure_packages(dict(PACKAGES, **({"gcc": "gcc"} if a.sockmap else {})))
    log("building netbench and connrate")
    netbench, connrate = build_tool("netbench"), build_tool("connrate")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    tmpdir = tempfile.mkdtemp(prefix="mi-bench-proxy-")
    os.chmod(tmpdir, 0o755)
    try:
        meta = {
            "command": " ".join(["scripts/bench/proxy.py"] + sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "nproc": os.cpu_count(),
            "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
            "kernel": platform.release(),
            "commit": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip() or "?",
            "haproxy": sh("haproxy", "-v").split()[2],
            "iperf3": sh("iperf3", "--version").split()[1],
            "load_start": " ".join(open("/proc/loadavg").read().split()[:3]),
        }
        setup_netns()
        spawn(in_ns(PEER, "prlimit", NOFILE, netbench, "serve", "--echo",
                    f"[::]:{OPAQUE_PORT},[::]:{DETECT_PORT}", "--hold", f"[::]:{HOLD_PORT}"),
              stderr=subprocess.DEVNULL)
        spawn(in_ns(PEER, "iperf3", "-s", "-p", str(IPERF_PORT)), stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL)
        for port in (OPAQUE_PORT, DETECT_PORT, HOLD_PORT, IPERF_PORT):
            wait_port(PEER, port)
        mp = start_meshproxy(a.meshproxy, extra=a.meshproxy_args.split())
        pids = {MESH_PORT: mp.pid}
        for n, (path, args) in enumerate(zip(a.baseline, a.baseline_args)):
            label = "meshproxy, baseline binary" + (f" {args}" if args else "")
            PATHS[f"B{n}"] = (label, base_port(n), OPAQUE_PORT)
            pids[base_port(n)] = start_meshproxy(path, baseline=n, extra=args.split()).pid
        hap = start_haproxy()
        if a.sockmap:
            PATHS["S"] = ("eBPF sockmap prototype", SOCKMAP_PORT, OPAQUE_PORT)
            pids[SOCKMAP_PORT] = start_sockmap().pid
        rules = Rules(a.meshinit)
        verify_paths(rules, netbench)
        log("paths verified")
        bench = Bench(a, rules, netbench, connrate,
                      {**pids, HAP_SPLICE_PORT: hap.pid, HAP_PLAIN_PORT: hap.pid})
        profile = None
        if a.profile or a.profile_only:
            ensure_packages({"perf": "linux-perf"})
            profile = profile_connrate(bench, mp.pid, max(a.conn_seconds, 5))
            log(f"profiled: {profile[0]:,.0f} conn/s under perf")
        if a.profile_only:
            profiled = [("B", profile)]
            for n in range(len(a.baseline)):
                profiled.append((f"B{n} ({PATHS[f'B{n}'][0]})",
                                 profile_connrate(bench, pids[base_port(n)], max(a.conn_seconds, 5),
                                                  base_port(n))))
            for path, prof in profiled:
                print(f"meshproxy during {max(a.conn_seconds, 5)} s of connrate on path {path} "
                      f"({prof[0]:,.0f} conn/s under perf; {prof[1].lstrip('# ')}), self time by symbol:\n")
                print("```\n" + "\n".join(prof[2]) + "\n```")
            return
        for i in range(a.rounds):
            t = time.time()
            measures = a.measures.split(",")
            if "iperf" in measures:
                for streams in (1, 8):
                    for p in ("A", "B", "C", "Cn") + tuple(f"B{n}" for n in range(len(a.baseline))) + (
                            ("S",) if a.sockmap else ()):
                        if p not in a.skip:
                            bench.iperf(p, streams, 4)
                for p in ("A", "B"):
                    bench.iperf(p, 1, 6)
                if a.ipv6_8_streams:
                    for p in ("A", "B"):
                        bench.iperf(p, 8, 6)
            if "latency" in measures:
                for p in PATHS:
                    bench.latency(p)
            if "conn" in measures:
                for p in PATHS:
                    bench.connrate(p)
            log(f"round {i + 1}/{a.rounds} done in {time.time() - t:.0f} s; load {open('/proc/loadavg').read().split()[0]}")
        mp.terminate()
        mp.wait(timeout=35)
        mem = None
        if not a.no_memory:
            log(f"memory test: {a.connections} connections")
            try:
                mem = memory(a.meshproxy, a.meshproxy_args.split(), rules, netbench, a.connections, hap.pid)
            except Exception as e:  # keep the datapath figures
                log(f"memory test failed: {e}")
        meta["load_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
        text = report(a, bench, mem, meta)
        if profile:
            text += (f"\nmeshproxy profile during {max(a.conn_seconds, 5)} s of connrate on path B "
                     f"({profile[0]:,.0f} conn/s under perf; {profile[1].lstrip('# ')}), self time by symbol:\n\n```\n"
                     + "\n".join(profile[2]) + "\n```\n")
        raw = {f"{m}/{p}": v for (m, p), v in bench.results.items()}
        text += "\n<details><summary>raw values per round</summary>\n\n```json\n" + json.dumps(
            {"results": raw, "proxy_cpu_percent": {f"{m}/{p}": v for (m, p), v in bench.cpu.items()},
             "memory_kib": mem}, indent=1) + "\n```\n</details>\n"
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
