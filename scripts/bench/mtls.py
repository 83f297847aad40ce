#!/usr/bin/env python3
"""mTLS datapath benchmark: pod A -> pod B direct, through two meshproxies doing mutual
TLS, and through two stunnel instances doing mutual TLS, in ONE interleaved run.

Two throwaway namespaces, mi-bench-mtls-a-PID (pod A, the client) and mi-bench-mtls-b-PID
(pod B, the server), joined by one veth (198.18.0.1/24 in A, 198.18.0.2/24 in B); nothing
touches the host namespace, and everything is removed on exit (also on Ctrl-C).

Paths, measured A M S, A M S, ...:

  A  direct   client in A -> 198.18.0.2:PORT in B; no rules in either pod.
  M  meshproxy mTLS
              `meshinit apply --netns` (defaults) in BOTH pods; a meshproxy in each pod as
              uid 2102 with a dev-CA identity (`meshproxy identity new-ca` / `issue`),
              --trust-anchors, --mesh-peers naming the other pod, the target ports in
              --opaque-ports. A's app -> A's outbound :4140 -> mTLS (TLS 1.3, ALPN
              transport.l5d.io/v1, transport header) to B:4143 -> B's inbound -> B's app.
  S  stunnel mTLS pair (Debian's stunnel4)
              A: stunnel client, accept 127.0.0.1:PORT+10000, connect 198.18.0.2:PORT+20000,
              client certificate, verifyChain + CAfile + checkHost (B's identity).
              B: stunnel server, accept 198.18.0.2:PORT+20000, connect 127.0.0.1:PORT,
              server certificate, verifyChain + CAfile (a client certificate is required).
              TLS 1.3 only, TCP_NODELAY on both sockets. The client connects to
              127.0.0.1:PORT+10000 explicitly (stunnel is not transparent). meshinit's
              rules are NOT installed while S (and A) run: they are removed from both pods
              before each direct / stunnel measurement and re-applied before each meshproxy
              one (the meshproxies stay up, idle).

M and S use the same certificates (dev CA, ECDSA P-256 leaves a.default.mesh.local and
b.default.mesh.local).

Measures: iperf3 1 stream and 8 streams (IPv4); 64-byte request/response over one
persistent connection (p50/p99, scripts/bench/netbench pingpong); new connections per
second (scripts/bench/connrate: connect, 1-byte exchange, close; for M and S each is a new
TLS handshake between the two proxies, resumed or not as each proxy does by default, see
the report). CPU of the proxy processes (both pods) during iperf3.

  M0 with --baseline PATH only: a second meshproxy pair running another binary (the
     code before a change), on its own ports (outbound 4160, inbound 4163, admin 4192,
     --peer-inbound-port 4163) with the same identities; `meshinit apply
     --outgoing-proxy-port 4160 --incoming-proxy-port 4163` in both pods while it runs.
     Measured in the same rounds as M, so a change is compared on the same load.

Usage: scripts/bench/mtls.py [--quick] [--rounds N] [--meshinit PATH] [--meshproxy PATH]
                             [--baseline PATH] [--measures iperf,latency,conn] [--profile] [--out FILE]
--profile: `perf record -e cpu-clock -g` of each meshproxy of the pair (A's and B's,
separately) during 5 s of connection rate and 5 s of iperf3 (1 stream) through M (and M0
with --baseline), before the rounds; the top frames by self time go into the report.
Needs root. Installs iperf3, stunnel4, conntrack, curl, util-linux if missing. Builds
scripts/bench/netbench and scripts/bench/connrate (std-only, not workspace members).
Prints a Markdown section for BENCHMARKS.md (also written to --out if given).
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (NOFILE, PROXY_UID, as_proxy, build_tool, cpu_ticks, ensure_packages,  # noqa: E402
                      fmt_range, in_ns, log, procs, sh, show_logs, spawn, stop_all, wait_port)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "scripts", "bench")
TAG = f"{os.getpid()}"
NS_A = f"mi-bench-mtls-a-{TAG}"
NS_B = f"mi-bench-mtls-b-{TAG}"
A4, B4 = "198.18.0.1", "198.18.0.2"
ID_A, ID_B = "a.default.mesh.local", "b.default.mesh.local"
IPERF_PORT = 5201
ECHO_PORT = 7000
# Linkerd's default opaque ports plus ours: no protocol detection on either proxy.
OPAQUE = f"25,587,3306,4444,5432,6379,9300,11211,{IPERF_PORT},{ECHO_PORT}"
ADMIN = "127.0.0.1:4191"
OUTBOUND_PORT, INBOUND_PORT = 4140, 4143
# --baseline's pair: its own listeners in both pods, selected by meshinit's ports.
BASE_ADMIN = "127.0.0.1:4192"
BASE_OUTBOUND_PORT, BASE_INBOUND_PORT = 4160, 4163


def s_local(port):   # stunnel client's listener in A
    return port + 10000


def s_remote(port):  # stunnel server's listener in B
    return port + 20000


PACKAGES = {"iperf3": "iperf3", "stunnel4": "stunnel4", "conntrack": "conntrack",
            "curl": "curl", "ss": "iproute2", "nft": "nftables", "setpriv": "util-linux",
            "prlimit": "util-linux"}
PATHS = {"A": "direct", "M": "meshproxy mTLS", "S": "stunnel mTLS"}

tmpdir = None









LOGS = ("meshproxy-a.log", "meshproxy-b.log", "stunnel-a.log", "stunnel-b.log")


def cleanup():
    stop_all()
    for ns in (NS_A, NS_B):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    if tmpdir and sys.exc_info()[0] is not None:
        show_logs(tmpdir, LOGS)
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)


def setup_netns():
    for ns in (NS_A, NS_B):
        sh("ip", "netns", "add", ns)
    sh("ip", "-n", NS_A, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", NS_B)
    for ns, a4 in ((NS_A, A4), (NS_B, B4)):
        sh("ip", "-n", ns, "addr", "add", f"{a4}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        # Many short connections on both sides (B's proxies dial the app on loopback).
        sh(*in_ns(ns, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65000"))
        sh(*in_ns(ns, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"))



def make_identities(meshproxy):
    ca = os.path.join(tmpdir, "ca")
    ids = os.path.join(tmpdir, "ids")
    sh(meshproxy, "identity", "new-ca", ca)
    os.makedirs(ids, exist_ok=True)
    out = {}
    for name in (ID_A, ID_B):
        sh(meshproxy, "identity", "issue", "--ca", ca, name, "--out", ids)
        cert, key = os.path.join(ids, f"{name}.crt"), os.path.join(ids, f"{name}.key")
        os.chown(key, PROXY_UID, PROXY_UID)  # 0600, read by the proxy uid (stunnel runs as root)
        out[name] = (cert, key)
    for d in (tmpdir, ca, ids):
        os.chmod(d, 0o755)
    return os.path.join(ca, "ca.crt"), out


def start_meshproxy(bin_path, ns, anchors, ident, peer_net, peer_id, logname, baseline=False):
    peers = os.path.join(tmpdir, f"peers-{logname}.toml")
    with open(peers, "w") as f:
        f.write(f'[[peer]]\nnet = "{peer_net}/32"\nidentity = "{peer_id}"\n')
    os.chmod(peers, 0o644)
    ports = (["--outbound-addr", f"127.0.0.1:{BASE_OUTBOUND_PORT}", "--inbound-addr", f"0.0.0.0:{BASE_INBOUND_PORT}",
              "--admin-addr", BASE_ADMIN, "--peer-inbound-port", str(BASE_INBOUND_PORT)]
             if baseline else ["--admin-addr", ADMIN])
    p = spawn(in_ns(ns, *as_proxy(bin_path, "--opaque-ports", OPAQUE, *ports,
                                  "--identity-cert", ident[0], "--identity-key", ident[1],
                                  "--trust-anchors", anchors, "--mesh-peers", peers)),
              stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmpdir, logname), "ab"),
              env=dict(os.environ, RUST_LOG=os.environ.get("BENCH_RUST_LOG", "warn")))
    for port in ((BASE_OUTBOUND_PORT, BASE_INBOUND_PORT, 4192) if baseline else (OUTBOUND_PORT, INBOUND_PORT, 4191)):
        wait_port(ns, port)
    return p


def start_stunnel(ns, role, anchors, ident, logname):
    """role: "client" in A, "server" in B; one service per app port."""
    cfg = os.path.join(tmpdir, f"stunnel-{role}.conf")
    lines = ["foreground = yes", "pid =", "debug = warning", ""]
    for port in (IPERF_PORT, ECHO_PORT):
        lines.append(f"[p{port}]")
        if role == "client":
            lines += ["client = yes", f"accept = 127.0.0.1:{s_local(port)}", f"connect = {B4}:{s_remote(port)}",
                      f"checkHost = {ID_B}"]
        else:
            lines += [f"accept = {B4}:{s_remote(port)}", f"connect = 127.0.0.1:{port}"]
        lines += [f"cert = {ident[0]}", f"key = {ident[1]}", f"CAfile = {anchors}", "verifyChain = yes",
                  "sslVersionMin = TLSv1.3", "socket = l:TCP_NODELAY=1", "socket = r:TCP_NODELAY=1", ""]
    with open(cfg, "w") as f:
        f.write("\n".join(lines))
    p = spawn(in_ns(ns, "prlimit", NOFILE, "stunnel4", cfg), stdout=subprocess.DEVNULL,
              stderr=open(os.path.join(tmpdir, logname), "ab"))
    for port in (IPERF_PORT, ECHO_PORT):
        wait_port(ns, s_local(port) if role == "client" else s_remote(port))
    return p


class Rules:
    """meshinit's rules in both pods: for M's proxies ("M"), for M0's ("M0"), or none
    (False) for A and S."""

    def __init__(self, meshinit):
        self.meshinit, self.on = meshinit, False

    def set(self, on):
        if on is True:
            on = "M"
        if on == self.on:
            return
        for ns in (NS_A, NS_B):
            path = f"/var/run/netns/{ns}"
            if self.on:
                sh(self.meshinit, "cleanup", "--netns", path)
            if on == "M":
                sh(self.meshinit, "apply", "--netns", path)
            elif on == "M0":
                sh(self.meshinit, "apply", "--netns", path, "--outgoing-proxy-port", str(BASE_OUTBOUND_PORT),
                   "--incoming-proxy-port", str(BASE_INBOUND_PORT))
        self.on = on


def target(path, port):
    """Where the client in A connects for PATH, and whether meshinit's rules must be on."""
    if path == "S":
        return "127.0.0.1", s_local(port), False
    return B4, port, path if path in ("M", "M0") else False


def veth_bytes():
    st = json.loads(sh("ip", "-n", NS_A, "-s", "-j", "link", "show", "eth0"))[0]["stats64"]
    return st["rx"]["bytes"] + st["tx"]["bytes"]



def metrics(ns):
    return sh(*in_ns(ns, "curl", "-s", f"http://{ADMIN}/metrics"))


def sockets(ns, port):
    return len(sh(*in_ns(ns, "ss", "-Htn", "state", "established", f"( sport = :{port} )")).splitlines())


def tls_lines(text, port):
    return [l for l in text.splitlines() if 'tls="true"' in l and f'{port}"' in l and not l.startswith("#")]


def verify_paths(rules, netbench, proxy_pids):
    """Each path goes where it should; M's inbound hop in B is mTLS for the port."""
    info = {}
    for path in PATHS:
        host, port, on = target(path, ECHO_PORT)
        rules.set(on)
        p = subprocess.Popen(in_ns(NS_A, netbench, "open", "--connect", f"{host}:{port}", "--count", "1"),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = p.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"path {path}: no echo through it")
        seen = {"A:4140": sockets(NS_A, OUTBOUND_PORT), "B:4143": sockets(NS_B, INBOUND_PORT),
                "A:stunnel": sockets(NS_A, s_local(ECHO_PORT)), "B:stunnel": sockets(NS_B, s_remote(ECHO_PORT)),
                "A:4160": sockets(NS_A, BASE_OUTBOUND_PORT), "B:4163": sockets(NS_B, BASE_INBOUND_PORT)}
        p.stdin.close()
        p.wait()
        want = {"A": (0, 0, 0, 0, 0, 0), "M": (1, 1, 0, 0, 0, 0), "S": (0, 0, 1, 1, 0, 0),
                "M0": (0, 0, 0, 0, 1, 1)}[path]
        if tuple(seen.values()) != want:
            raise RuntimeError(f"path {path}: established sockets {seen}, expected {want}")
    rules.set(True)
    text_b, text_a = metrics(NS_B), metrics(NS_A)
    inbound = tls_lines(text_b, ECHO_PORT)
    outbound = tls_lines(text_a, ECHO_PORT)
    if not inbound:
        raise RuntimeError("B's /metrics shows no tls=\"true\" line for port "
                           f"{ECHO_PORT}:\n" + "\n".join(l for l in text_b.splitlines() if str(ECHO_PORT) in l))
    if not outbound:
        raise RuntimeError(f"A's /metrics shows no tls=\"true\" line for port {ECHO_PORT}")
    info["inbound_metric"] = inbound[0]
    info["outbound_metric"] = outbound[0]
    # Through both pairs with iperf3 too (1 s), so a broken iperf path fails here, not mid-run.
    for path in PATHS:
        host, port, on = target(path, IPERF_PORT)
        rules.set(on)
        out = sh(*in_ns(NS_A, "iperf3", "-c", host, "-p", str(port), "-t", "1", "-J"), timeout=30)
        if json.loads(out)["end"]["sum_received"]["bytes"] <= 0:
            raise RuntimeError(f"iperf3 through path {path} moved no bytes")
    return info


class Bench:
    def __init__(self, args, rules, netbench, connrate, pids):
        self.a, self.rules, self.netbench, self.connrate_bin, self.pids = args, rules, netbench, connrate, pids
        self.results = {}
        self.cpu = {}

    def add(self, key, value):
        self.results.setdefault(key, []).append(value)

    def iperf(self, path, streams):
        host, port, on = target(path, IPERF_PORT)
        self.rules.set(on)
        pids = self.pids.get(path, [])
        t0, c0 = time.time(), sum(cpu_ticks(p) for p in pids)
        out = sh(*in_ns(NS_A, "iperf3", "-c", host, "-p", str(port), "-t", str(self.a.iperf_seconds),
                        "-P", str(streams), "-J"), timeout=self.a.iperf_seconds + 30)
        if pids:
            pct = (sum(cpu_ticks(p) for p in pids) - c0) / os.sysconf("SC_CLK_TCK") / (time.time() - t0) * 100
            self.cpu.setdefault((f"iperf{streams}", path), []).append(pct)
        gbps = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
        self.add((f"iperf{streams}", path), gbps)

    def latency(self, path):
        host, port, on = target(path, ECHO_PORT)
        self.rules.set(on)
        out = sh(*in_ns(NS_A, self.netbench, "pingpong", "--connect", f"{host}:{port}", "--size", "64",
                        "--seconds", str(self.a.rr_seconds)))
        _, p50, p99, _ = out.split()
        self.add(("p50", path), float(p50))
        self.add(("p99", path), float(p99))

    def connrate(self, path):
        host, port, on = target(path, ECHO_PORT)
        self.rules.set(on)
        for ns in (NS_A, NS_B):
            subprocess.run(in_ns(ns, "conntrack", "-F"), capture_output=True)
        pids = self.pids.get(path, [])
        t0, c0, b0 = time.time(), sum(cpu_ticks(p) for p in pids), veth_bytes()
        out = sh(*in_ns(NS_A, "prlimit", NOFILE, self.connrate_bin, "--connect", f"{host}:{port}",
                        "--seconds", str(self.a.conn_seconds)), timeout=self.a.conn_seconds + 60)
        if pids:
            pct = (sum(cpu_ticks(p) for p in pids) - c0) / os.sysconf("SC_CLK_TCK") / (time.time() - t0) * 100
            self.cpu.setdefault(("conn", path), []).append(pct)
        self.add(("conn", path), float(out.split()[2]))
        # Bytes on the veth (both directions) per connection: tells full handshakes
        # (both certificates on the wire) from resumed ones.
        self.add(("bytes_per_conn", path), (veth_bytes() - b0) / max(int(out.split()[0]), 1))


SUITES = {0x1301: "TLS_AES_128_GCM_SHA256", 0x1302: "TLS_AES_256_GCM_SHA384", 0x1303: "TLS_CHACHA20_POLY1305_SHA256"}
GROUPS = {0x11EC: "X25519MLKEM768", 0x001D: "X25519", 0x0017: "P-256", 0x0018: "P-384", 0x001E: "X448"}


def tls_extensions(buf, server):
    """Extensions {type: data} of the ClientHello / ServerHello at the start of BUF, or None."""
    try:
        if buf[0] != 0x16 or buf[5] != (0x02 if server else 0x01):
            return None
        i = 5 + 4 + 2 + 32
        i += 1 + buf[i]                                   # session id
        suite = None
        if server:
            suite = int.from_bytes(buf[i:i + 2], "big")
            i += 2 + 1                                    # cipher suite, compression
        else:
            i += 2 + int.from_bytes(buf[i:i + 2], "big")  # cipher suites
            i += 1 + buf[i]                               # compression methods
        end = i + 2 + int.from_bytes(buf[i:i + 2], "big")
        i += 2
        ext = {}
        while i + 4 <= end and i + 4 <= len(buf):
            t, n = int.from_bytes(buf[i:i + 2], "big"), int.from_bytes(buf[i + 2:i + 4], "big")
            ext[t] = buf[i + 4:i + 4 + n]
            i += 4 + n
        if suite is not None:
            ext["suite"] = suite
        return ext
    except IndexError:
        return None


def handshake_check(rules, connrate):
    """Captures ~0.5 s of new connections on A's veth for M and S and reads the cleartext
    ClientHello / ServerHello: was each handshake resumed (ServerHello carries
    pre_shared_key) and which key exchange group was chosen."""
    if shutil.which("tcpdump") is None:
        return None
    out = {}
    for path in [p for p in ("M", "M0", "S") if p in PATHS]:
        host, port, on = target(path, ECHO_PORT)
        rules.set(on)
        pcap = os.path.join(tmpdir, f"hs-{path}.pcap")
        dport = {"M": INBOUND_PORT, "M0": BASE_INBOUND_PORT}.get(path, s_remote(ECHO_PORT))
        # Warm up first (a resuming client needs one earlier session), then capture.
        sh(*in_ns(NS_A, connrate, "--connect", f"{host}:{port}", "--seconds", "0.2"))
        cap = subprocess.Popen(in_ns(NS_A, "tcpdump", "-i", "eth0", "-s", "0", "-U", "-w", pcap,
                                     f"tcp port {dport}"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(cap)
        time.sleep(1.0)
        sh(*in_ns(NS_A, connrate, "--connect", f"{host}:{port}", "--seconds", "0.5"))
        time.sleep(0.3)
        cap.send_signal(signal.SIGINT)
        cap.wait(timeout=5)
        flows = {}
        data = open(pcap, "rb").read()
        i = 24
        while i + 16 <= len(data):
            incl = int.from_bytes(data[i + 8:i + 12], "little")
            pkt = data[i + 16:i + 16 + incl]
            i += 16 + incl
            if len(pkt) < 34 or pkt[12:14] != b"\x08\x00":
                continue
            ip = pkt[14:]
            ihl = (ip[0] & 15) * 4
            tcp = ip[ihl:]
            off = (tcp[12] >> 4) * 4
            payload = tcp[off:int.from_bytes(ip[2:4], "big") - ihl]
            if not payload:
                continue
            key = (ip[12:16], tcp[0:2], ip[16:20], tcp[2:4])
            if len(flows.get(key, b"")) < 16384:
                flows[key] = flows.get(key, b"") + payload
        hellos, resumed, groups, suites = 0, 0, {}, {}
        for (src, sp, dst, dp), buf in flows.items():
            if int.from_bytes(sp, "big") != dport:
                continue
            ext = tls_extensions(buf, server=True)
            if ext is None:
                continue
            hellos += 1
            resumed += 41 in ext
            g = GROUPS.get(int.from_bytes(ext.get(51, b"\0\0")[:2], "big"), "?")
            groups[g] = groups.get(g, 0) + 1
            c = SUITES.get(ext.get("suite"), f"0x{ext.get('suite') or 0:04x}")
            suites[c] = suites.get(c, 0) + 1
        out[path] = {"handshakes": hellos, "resumed": resumed, "groups": groups, "suites": suites}
    return out


def handshake_counts(text):
    """meshproxy metric lines about TLS handshakes / sessions, for the report (best effort)."""
    return [l for l in text.splitlines() if not l.startswith("#") and re.search(r"handshake|resum|session", l)]


def stunnel_version():
    text = subprocess.run(["stunnel4", "-version"], capture_output=True, text=True).stderr
    v = re.search(r"stunnel (\S+)", text)
    o = re.search(r"OpenSSL (\S+)", text)
    return f"stunnel {v[1] if v else '?'} (OpenSSL {o[1] if o else '?'})"



def report(a, bench, meta, info):
    r, med = bench.results, lambda k: statistics.median(bench.results[k])
    g = lambda v: f"{v:.1f}" if v >= 10 else f"{v:.2f}"
    us = lambda v: f"{v:.0f}"
    n = lambda v: f"{v:,.0f}"
    lines = []
    w = lines.append
    w("### mTLS datapath: direct vs meshproxy mTLS pair vs stunnel mTLS pair (pod A → pod B over veth)")
    w("")
    w(f"Generated by `{meta['command']}` on {meta['date']}.")
    w(f"Machine: {meta['nproc']} vCPU {meta['cpu']}, kernel {meta['kernel']}; commit {meta['commit']}; "
      f"{meta['stunnel']}; iperf3 {meta['iperf3']}.")
    loaded = max(float(meta['load_start'].split()[0]), float(meta['load_end'].split()[0])) > 1.0
    w(f"Load average (1/5/15 min) at start {meta['load_start']}, at end {meta['load_end']}"
      + (" (the load includes the benchmark's own processes; anything else running is stated with the run): "
         "absolute figures are noisy, compare the ratios, measured in the same run." if loaded else "."))
    w(f"{a.rounds} interleaved rounds (A M S, A M S, …); each cell is the median (min–max) of the rounds; "
      f"ratios are median / median in the same run (for M / S also the range of the per-round ratios). iperf3 {a.iperf_seconds} s per run, ping-pong "
      f"{a.rr_seconds} s, connection rate {a.conn_seconds} s (one client thread).")
    w("")
    w("Paths (IPv4): **A** direct, no rules. **M** `meshinit apply` (defaults) in both pods, a meshproxy "
      "in each as uid 2102 with `--identity-cert/--identity-key/--trust-anchors` from `meshproxy identity "
      "new-ca`/`issue` (ECDSA P-256), `--mesh-peers` naming the other pod, the ports in `--opaque-ports`: "
      "A's app → A's :4140 → TLS 1.3 mTLS + transport header → B's :4143 → B's app. Verified before "
      f"measuring: B's `/metrics` has `{info['inbound_metric'].split(' ')[0]}`. **S** stunnel 4 pair, "
      "same certificates: A's client (`accept 127.0.0.1`, `verifyChain`, `CAfile`, `checkHost`) → "
      "B's server (`verifyChain` + `CAfile`: client certificate required) → B's app; "
      "`sslVersionMin = TLSv1.3`, `TCP_NODELAY` both sides, otherwise Debian's defaults (threads; "
      "session resumption on). The app in A connects to stunnel's 127.0.0.1 port explicitly. "
      "meshinit's rules are removed from both pods for A and S and re-applied for M (the proxies of "
      "the other path stay up, idle)."
      + (f" **M0** the same as M with the `--baseline` binary ({a.baseline}): a second pair on its own "
         f"ports (outbound {BASE_OUTBOUND_PORT}, inbound {BASE_INBOUND_PORT}, `--peer-inbound-port "
         f"{BASE_INBOUND_PORT}`), selected by `meshinit apply --outgoing-proxy-port {BASE_OUTBOUND_PORT} "
         f"--incoming-proxy-port {BASE_INBOUND_PORT}` in both pods, measured after S in each round (A M S M0)."
         if "M0" in PATHS else ""))
    w("")
    has0 = "M0" in PATHS
    w("| measure | A direct | M meshproxy mTLS |" + (" M0 meshproxy mTLS, baseline binary | M / M0 |" if has0 else "")
      + " S stunnel mTLS | M / S | target (M) |")
    w("|---|---|---|" + ("---|---|" if has0 else "") + "---|---|---|")

    def row(title, m, f, added=False, tgt="", higher=True):
        if (m, "A") not in r:
            return
        base = med((m, "A"))
        cells = [fmt_range(r[(m, "A")], f)]
        for p in ("M", "M0", "S") if has0 else ("M", "S"):
            c = fmt_range(r[(m, p)], f)
            c += f" **{med((m, p)) - base:+.0f} µs**" if added else f" **{med((m, p)) / base:.2f}×**"
            cells.append(c)
            if p == "M0":
                per0 = [mv / bv for mv, bv in zip(r[(m, "M")], r[(m, "M0")])]
                cells.append(f"{med((m, 'M')) / med((m, 'M0')):.2f}× (per round {min(per0):.2f}–{max(per0):.2f})")
        # Same-round ratios too: the rounds of one path swing with the machine's load.
        per = [mv / sv for mv, sv in zip(r[(m, "M")], r[(m, "S")])]
        if added:
            ms = f"{(med((m, 'M')) - base) / max(med((m, 'S')) - base, 1e-9):.2f}× the added"
        else:
            ms = f"**{med((m, 'M')) / med((m, 'S')):.2f}×** (per round {min(per):.2f}–{max(per):.2f})"
        cells.append(ms)
        w(f"| {title} | " + " | ".join(cells) + f" | {tgt} |")

    row("iperf3 1 stream, Gbit/s", "iperf1", g, tgt="≥ 0.45× direct and ≥ 1.5× stunnel")
    row("iperf3 8 streams, Gbit/s", "iperf8", g)
    row("64-byte request/response p50, µs (added vs direct, 2 hops)", "p50", us, added=True,
        tgt="≤ +15 µs per hop (+30 µs)")
    row("64-byte request/response p99, µs (added vs direct)", "p99", us, added=True)
    row("new connections/s (connect, 1-byte exchange, close)", "conn", n, tgt="≥ 5× stunnel")
    w("")
    if ("bytes_per_conn", "M") in r:
        b = {p: statistics.median(r[("bytes_per_conn", p)]) for p in PATHS if ("bytes_per_conn", p) in r}
        w(f"Bytes on the veth per new connection (both directions, median): direct {b['A']:,.0f}, "
          f"meshproxy {b['M']:,.0f}, stunnel {b['S']:,.0f}. A full TLS 1.3 mutual handshake carries both "
          "certificates and CertificateVerify signatures; a resumed one (PSK) carries neither.")
        w("")
    hs = info.get("handshakes")
    if hs:
        desc = lambda h: (f"{h['resumed']} of {h['handshakes']} resumed (PSK), key exchange "
                          + ", ".join(f"{g} ×{c}" for g, c in sorted(h["groups"].items()))
                          + ", cipher suite " + ", ".join(f"{s} ×{c}" for s, c in sorted(h.get("suites", {}).items())))
        w("Handshakes, from the cleartext ServerHellos of ~0.5 s of new connections captured on the veth "
          f"(after a warm-up, so a resuming client has a session): meshproxy {desc(hs['M'])}; "
          + (f"baseline meshproxy {desc(hs['M0'])}; " if "M0" in hs else "") +
          f"stunnel {desc(hs['S'])}.")
        w("")
    parts = []
    for m, t in (("iperf1", "iperf3 1 stream"), ("iperf8", "iperf3 8 streams"), ("conn", "connection rate")):
        if (m, "M") in bench.cpu and (m, "S") in bench.cpu:
            base = (f", baseline meshproxy {statistics.median(bench.cpu[(m, 'M0')]):.0f}%"
                    if (m, "M0") in bench.cpu else "")
            parts.append(f"{t}: meshproxy {statistics.median(bench.cpu[(m, 'M')]):.0f}%{base}, "
                         f"stunnel {statistics.median(bench.cpu[(m, 'S')]):.0f}%")
    if parts:
        w("CPU of the two proxy processes together (both pods; % of one CPU, median of rounds; "
          "200% = both vCPUs): " + "; ".join(parts) + ".")
        w("")
    for title, prof in info.get("profiles", []):
        w(f"{title} ({prof[0]}; {prof[1].lstrip('# ')}), self time by symbol:")
        w("")
        w("```")
        w("\n".join(prof[2]))
        w("```")
        w("")
    return "\n".join(lines)


def profile(bench, path, pids, measure, seconds=5):
    """`perf record -e cpu-clock -g` of each of `pids` (A's and B's meshproxy of
    `path`), separately, during one `measure` run ("conn" or "iperf1") of `seconds`.
    Returns [(pid, (rate, samples line, top frames by self time))]."""
    host, port, on = target(path, ECHO_PORT if measure == "conn" else IPERF_PORT)
    bench.rules.set(on)
    for ns in (NS_A, NS_B):
        subprocess.run(in_ns(ns, "conntrack", "-F"), capture_output=True)
    recs = []
    for pid in pids:
        # BENCH_PERF_DIR keeps the recordings (for `perf report -g` afterwards).
        data = os.path.join(os.environ.get("BENCH_PERF_DIR", tmpdir), f"perf-{path}-{measure}-{pid}.data")
        recs.append((pid, data, subprocess.Popen(
            ["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", str(pid), "-o", data,
             "--", "sleep", str(seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    if measure == "conn":
        out = sh(*in_ns(NS_A, "prlimit", NOFILE, bench.connrate_bin, "--connect", f"{host}:{port}",
                        "--seconds", str(seconds)), timeout=seconds + 60)
        rate = f"{float(out.split()[2]):,.0f} conn/s under perf"
    else:
        out = sh(*in_ns(NS_A, "iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J"),
                 timeout=seconds + 30)
        rate = f"{json.loads(out)['end']['sum_received']['bits_per_second'] / 1e9:.2f} Gbit/s under perf"
    res = []
    for pid, data, rec in recs:
        rec.wait()
        top = sh("perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "dso,sym", "-g", "none",
                 "--percent-limit", "0.8")
        lines = [l for l in top.splitlines() if l.strip() and not l.startswith("#")]
        samples = next((l for l in top.splitlines() if l.startswith("# Samples")), "")
        res.append((pid, (rate, samples, lines[:25])))
    return res


def main():
    global tmpdir
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 s runs")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--meshinit", default=os.path.join(ROOT, "target/release/meshinit"))
    ap.add_argument("--meshproxy", default=os.path.join(ROOT, "target/release/meshproxy"))
    ap.add_argument("--baseline", help="another meshproxy binary, measured as a second pair (M0) in the same rounds")
    ap.add_argument("--measures", default="iperf,latency,conn",
                    help="comma-separated subset of iperf,latency,conn to run in each round")
    ap.add_argument("--profile", action="store_true",
                    help="perf record both meshproxies of M (and M0) during 5 s of connrate and of iperf3")
    ap.add_argument("--out", help="also write the Markdown here")
    a = ap.parse_args()
    measures = set(a.measures.split(","))
    a.rounds = a.rounds or (1 if a.quick else 5)
    a.iperf_seconds, a.rr_seconds, a.conn_seconds = (1, 1, 1) if a.quick else (5, 3, 3)
    if os.geteuid() != 0:
        sys.exit("mtls.py: needs root (it creates network namespaces)")
    a.meshinit, a.meshproxy = os.path.abspath(a.meshinit), os.path.abspath(a.meshproxy)
    for b in (a.meshinit, a.meshproxy):
        if not os.access(b, os.X_OK):
            sys.exit(f"mtls.py: {b} not found: cargo build --release -p meshinit -p meshproxy (or pass the path)")
    ensure_packages(PACKAGES)
    log("building netbench and connrate")
    netbench, connrate = build_tool("netbench"), build_tool("connrate")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    tmpdir = tempfile.mkdtemp(prefix="mi-bench-mtls-")
    os.chmod(tmpdir, 0o755)
    try:
        meta = {
            "command": " ".join(["scripts/bench/mtls.py"] + sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "nproc": os.cpu_count(),
            "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
            "kernel": platform.release(),
            "commit": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip() or "?",
            "stunnel": stunnel_version(),
            "iperf3": sh("iperf3", "--version").split()[1],
            "load_start": " ".join(open("/proc/loadavg").read().split()[:3]),
        }
        setup_netns()
        anchors, ids = make_identities(a.meshproxy)
        spawn(in_ns(NS_B, "prlimit", NOFILE, netbench, "serve", "--echo", f"0.0.0.0:{ECHO_PORT}"),
              stderr=subprocess.DEVNULL)
        spawn(in_ns(NS_B, "iperf3", "-s", "-p", str(IPERF_PORT)), stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL)
        for port in (ECHO_PORT, IPERF_PORT):
            wait_port(NS_B, port)
        mpa = start_meshproxy(a.meshproxy, NS_A, anchors, ids[ID_A], B4, ID_B, "meshproxy-a.log")
        mpb = start_meshproxy(a.meshproxy, NS_B, anchors, ids[ID_B], A4, ID_A, "meshproxy-b.log")
        pids = {"M": [mpa.pid, mpb.pid]}
        if a.baseline:
            PATHS["M0"] = "meshproxy mTLS, baseline binary"
            pids["M0"] = [start_meshproxy(os.path.abspath(a.baseline), ns, anchors, ids[me], peer, them,
                                          f"meshproxy0-{x}.log", baseline=True).pid
                          for ns, me, peer, them, x in ((NS_A, ID_A, B4, ID_B, "a"), (NS_B, ID_B, A4, ID_A, "b"))]
        sta = start_stunnel(NS_A, "client", anchors, ids[ID_A], "stunnel-a.log")
        stb = start_stunnel(NS_B, "server", anchors, ids[ID_B], "stunnel-b.log")
        rules = Rules(a.meshinit)
        info = verify_paths(rules, netbench, None)
        log("paths verified:", info["inbound_metric"])
        try:
            info["handshakes"] = handshake_check(rules, connrate)
        except Exception as e:  # diagnostic only
            log(f"handshake check failed: {e}")
            info["handshakes"] = None
        log("handshakes:", info["handshakes"])
        bench = Bench(a, rules, netbench, connrate, dict(pids, S=[sta.pid, stb.pid]))
        if a.profile:
            ensure_packages({"perf": "linux-perf"})
            info["profiles"] = []
            for path in [p for p in ("M", "M0") if p in PATHS]:
                for measure, what in (("conn", "5 s of connection rate"), ("iperf1", "5 s of iperf3, 1 stream")):
                    for (pid, prof), side in zip(profile(bench, path, pids[path], measure), ("A (client side)", "B (server side)")):
                        info["profiles"].append((f"{PATHS[path]}: pod {side} meshproxy during {what}", prof))
                        log(f"profiled {path} {measure} pid {pid}: {prof[0]}")
        for i in range(a.rounds):
            t = time.time()
            if "iperf" in measures:
                for streams in (1, 8):
                    for p in PATHS:
                        bench.iperf(p, streams)
            if "latency" in measures:
                for p in PATHS:
                    bench.latency(p)
            if "conn" in measures:
                for p in PATHS:
                    bench.connrate(p)
            log(f"round {i + 1}/{a.rounds} done in {time.time() - t:.0f} s; load {open('/proc/loadavg').read().split()[0]}")
        rules.set(True)
        hs = {"A": handshake_counts(metrics(NS_A)), "B": handshake_counts(metrics(NS_B))}
        rules.set(False)
        meta["load_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
        text = report(a, bench, meta, info)
        raw = {f"{m}/{p}": v for (m, p), v in bench.results.items()}
        text += "\n<details><summary>raw values per round</summary>\n\n```json\n" + json.dumps(
            {"results": raw, "proxy_cpu_percent": {f"{m}/{p}": v for (m, p), v in bench.cpu.items()},
             "meshproxy_handshake_metrics": hs}, indent=1) + "\n```\n</details>\n"
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
