#!/usr/bin/env python3
"""Inbound benchmark: `--mode redirect` vs `--mode tproxy`, peer namespace -> pod namespace.

Two throwaway namespaces, mi-bench-tpod-PID and mi-bench-tpeer-PID, joined by one veth
(198.18.0.1/24 in the pod, 198.18.0.2/24 in the peer); nothing touches the host namespace,
and everything is removed on exit (also on Ctrl-C). The application (scripts/bench/netbench
`serve --echo`) listens in the pod on an opaque port; the client runs in the peer. Two
meshproxy processes run in the pod as uid 2102, so that switching paths is one
`meshinit apply` (one transaction) and never a proxy restart:

  A  direct     no rules in the pod
  R  redirect   `meshinit apply` (inbound REDIRECT to :4143), meshproxy on :4143
  T  tproxy     `meshinit apply --mode tproxy --incoming-proxy-port 4144`, meshproxy
                `--inbound-transparent` on :4144 with CAP_NET_ADMIN

All paths are measured in ONE interleaved run (A R T, A R T, ...). Measures: 64-byte
ping-pong over one persistent connection (p50/p99, netbench) and new connections per
second (connrate: connect, 1-byte exchange, close), both IPv4.

Usage: scripts/bench/tproxy.py [--rounds N] [--seconds S] [--meshinit PATH] [--meshproxy PATH]
Needs root. Prints a Markdown section for BENCHMARKS.md (also written to --out if given).
"""
import argparse
import datetime
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (NOFILE, PROXY_UID, build_tool, fmt_range, in_ns, log, sh, show_logs,  # noqa: E402
                      spawn, stop_all, wait_port)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TAG = f"{os.getpid()}"
POD = f"mi-bench-tpod-{TAG}"
PEER = f"mi-bench-tpeer-{TAG}"
POD4, PEER4 = "198.18.0.1", "198.18.0.2"
APP_PORT = 7000  # opaque in both proxies
PATHS = {"A": "direct", "R": "redirect", "T": "tproxy"}
tmpdir = None


def cleanup():
    stop_all()
    for ns in (POD, PEER):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    if tmpdir and sys.exc_info()[0] is not None:
        show_logs(tmpdir, ("meshproxy-redirect.log", "meshproxy-tproxy.log"))


def setup_netns():
    for ns in (POD, PEER):
        sh("ip", "netns", "add", ns)
    sh("ip", "-n", POD, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", PEER)
    for ns, a4 in ((POD, POD4), (PEER, PEER4)):
        sh("ip", "-n", ns, "addr", "add", f"{a4}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
    # The client side of many short connections is the peer; the proxy's hop to the
    # application in tproxy mode takes ephemeral ports in the pod.
    for ns in (POD, PEER):
        sh(*in_ns(ns, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65000"))
        sh(*in_ns(ns, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"))


def start_proxy(meshproxy, name, extra, caps, admin_port):
    log_path = os.path.join(tmpdir, f"meshproxy-{name}.log")
    args = ["prlimit", NOFILE, "setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups",
            *caps, meshproxy, "--opaque-ports", str(APP_PORT), "--admin-addr", f"127.0.0.1:{admin_port}", *extra]
    p = spawn(in_ns(POD, *args), stdout=subprocess.DEVNULL, stderr=open(log_path, "ab"),
              env=dict(os.environ, RUST_LOG="warn"))
    wait_port(POD, admin_port)
    return p


def apply(meshinit, path):
    if path == "A":
        sh(*in_ns(POD, meshinit, "cleanup"))
    elif path == "R":
        sh(*in_ns(POD, meshinit, "apply", "--backend", "nft", "--ipv6=false"))
    else:
        sh(*in_ns(POD, meshinit, "apply", "--backend", "nft", "--ipv6=false", "--mode", "tproxy",
                  "--incoming-proxy-port", "4144"))


def main():
    global tmpdir
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--meshinit", default=os.path.join(ROOT, "target", "release", "meshinit"))
    ap.add_argument("--meshproxy", default=os.path.join(ROOT, "target", "release", "meshproxy"))
    ap.add_argument("--out")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("tproxy.py: run as root (it creates network namespaces)")
    for b in (a.meshinit, a.meshproxy):
        if not os.path.exists(b):
            sys.exit(f"tproxy.py: {b} not found: cargo build --release -p meshinit -p meshproxy (or pass the path)")
    netbench, connrate = build_tool("netbench"), build_tool("connrate")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    tmpdir = tempfile.mkdtemp(prefix="mi-bench-tproxy-")
    os.chmod(tmpdir, 0o755)
    results = {}
    try:
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "nproc": os.cpu_count(),
            "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
            "kernel": platform.release(),
            "commit": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip() or "?",
            "load_start": " ".join(open("/proc/loadavg").read().split()[:3]),
        }
        setup_netns()
        spawn(in_ns(POD, "prlimit", NOFILE, netbench, "serve", "--echo", f"0.0.0.0:{APP_PORT}"),
              stderr=subprocess.DEVNULL)
        wait_port(POD, APP_PORT)
        start_proxy(a.meshproxy, "redirect", [], [], 4191)
        start_proxy(a.meshproxy, "tproxy",
                    ["--inbound-transparent", "--inbound-addr", "0.0.0.0:4144", "--outbound-addr", "127.0.0.1:4141"],
                    ["--inh-caps=+net_admin", "--ambient-caps=+net_admin"], 4192)
        target = f"{POD4}:{APP_PORT}"
        for i in range(a.rounds):
            t = time.time()
            for path in PATHS:
                apply(a.meshinit, path)
                out = sh(*in_ns(PEER, netbench, "pingpong", "--connect", target, "--size", "64",
                                "--seconds", str(a.seconds)))
                _, p50, p99, _ = out.split()
                results.setdefault(("p50", path), []).append(float(p50))
                results.setdefault(("p99", path), []).append(float(p99))
            for path in PATHS:
                apply(a.meshinit, path)
                for ns in (POD, PEER):
                    subprocess.run(in_ns(ns, "conntrack", "-F"), capture_output=True)
                out = sh(*in_ns(PEER, "prlimit", NOFILE, connrate, "--connect", target,
                                "--seconds", str(a.seconds)), timeout=a.seconds + 60)
                results.setdefault(("conn", path), []).append(float(out.split()[2]))
            log(f"round {i + 1}/{a.rounds} done in {time.time() - t:.0f} s")
        meta["load_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
        # Each proxy must have carried its path's connections.
        for name, port in (("redirect", 4191), ("tproxy", 4192)):
            text = sh(*in_ns(POD, "curl", "-s", f"http://127.0.0.1:{port}/metrics"))
            opened = sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                         if l.startswith("tcp_open_total{") and 'direction="inbound"' in l)
            if opened == 0:
                raise RuntimeError(f"the {name} proxy carried no inbound connection")
            meta[f"opened_{name}"] = opened
    finally:
        cleanup()
    text = report(a, results, meta)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


def report(a, r, meta):
    med = lambda k: statistics.median(r[k])  # noqa: E731
    lines = [
        "## Inbound: `--mode tproxy` vs `--mode redirect` (peer → pod over veth)",
        "",
        f"Generated by `sudo scripts/bench/tproxy.py --rounds {a.rounds} --seconds {a.seconds:g}` on {meta['date']}.",
        f"Machine: {meta['nproc']} vCPU {meta['cpu']}, kernel {meta['kernel']}; commit {meta['commit']}.",
        f"Load average at start {meta['load_start']}, at end {meta['load_end']} (shared vCPUs: compare ratios).",
        f"{a.rounds} interleaved rounds (A R T, A R T, …); each cell is the median (min–max) of the rounds; "
        "IPv4, application on an opaque port (no detection).",
        "",
        "Paths: **A** direct (no rules); **R** `meshinit apply` + meshproxy (REDIRECT, the application sees the "
        "pod's address); **T** `meshinit apply --mode tproxy` + meshproxy `--inbound-transparent` (the application "
        "sees the client's address).",
        f"Inbound connections counted by the proxies: redirect {meta['opened_redirect']:,.0f}, "
        f"tproxy {meta['opened_tproxy']:,.0f}.",
        "",
        "| measure | A direct | R redirect | T tproxy | T vs R |",
        "|---|---|---|---|---|",
    ]
    us = lambda v: f"{v:.0f}"  # noqa: E731
    for key, name in (("p50", "64-byte request/response p50, µs"), ("p99", "64-byte request/response p99, µs")):
        lines.append(f"| {name} | {fmt_range(r[(key, 'A')], us)} | {fmt_range(r[(key, 'R')], us)} | "
                     f"{fmt_range(r[(key, 'T')], us)} | {med((key, 'T')) - med((key, 'R')):+.0f} µs |")
    rate = lambda v: f"{v:,.0f}"  # noqa: E731
    lines.append(f"| new connections/s (connect, 1-byte exchange, close) | {fmt_range(r[('conn', 'A')], rate)} | "
                 f"{fmt_range(r[('conn', 'R')], rate)} | {fmt_range(r[('conn', 'T')], rate)} | "
                 f"{med(('conn', 'T')) / med(('conn', 'R')):.2f}× |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
