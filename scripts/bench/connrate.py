#!/usr/bin/env python3
"""New-connection rate through the outbound redirect, per backend and skip-list size.

A "pod" namespace gets meshinit's rules; a connrate client in it connects to
198.18.0.2:8080 (a peer address), which the outbound rule redirects to the
local port 4140 where connrate's own echo server answers. Every connection's
first packet walks the output chain, so a skip list that the destination port
is NOT in is walked in full: a set lookup for nft, 15 ports per rule for
iptables multiport. Runs are interleaved (A B C, A B C, ...); the table gives
medians with min-max and the ratio to the same backend with no skip ports.

Usage: scripts/bench/connrate.py [--rounds 5] [--seconds 3]
Needs root; builds target/release/meshinit and scripts/bench/connrate first.
"""
import argparse
import os
import statistics
import subprocess
import sys

BACKENDS = ["nft", "iptables-nft", "iptables-legacy"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("connrate.py: needs root (it creates network namespaces)")
    meshinit = os.path.join(ROOT, "target/release/meshinit")
    connrate = os.path.join(ROOT, "scripts/bench/connrate/target/release/connrate")
    sh("cargo", "build", "--release", "-q", "--manifest-path", os.path.join(ROOT, "scripts/bench/connrate/Cargo.toml"))
    sizes = {"no skip ports": "", "10,000 skip ports": ",".join(str(20000 + 2 * i) for i in range(10000))}
    ns = {b: f"mi-bench-conn-{b}" for b in BACKENDS}
    peer = {b: f"mi-bench-connp-{b}" for b in BACKENDS}
    results = {(b, s): [] for b in BACKENDS for s in sizes}
    try:
        for b in BACKENDS:
            for n in (ns[b], peer[b]):
                subprocess.run(["ip", "netns", "del", n], capture_output=True)
                sh("ip", "netns", "add", n)
            sh("ip", "-n", ns[b], "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer[b])
            sh("ip", "-n", ns[b], "addr", "add", "198.18.0.1/24", "dev", "eth0")
            sh("ip", "-n", peer[b], "addr", "add", "198.18.0.2/24", "dev", "eth0")
            for n in (ns[b], peer[b]):
                sh("ip", "-n", n, "link", "set", "eth0", "up")
                sh("ip", "-n", n, "link", "set", "lo", "up")
        for _ in range(args.rounds):
            for size, ports in sizes.items():
                for b in BACKENDS:
                    flags = ["--outbound-ports-to-ignore", ports] if ports else []
                    sh(meshinit, "apply", "--backend", b, "--netns", f"/var/run/netns/{ns[b]}", *flags)
                    out = sh("ip", "netns", "exec", ns[b], connrate, "--listen", "0.0.0.0:4140",
                             "--connect", "198.18.0.2:8080", "--seconds", str(args.seconds))
                    results[(b, size)].append(float(out.split()[2]))
    finally:
        for b in BACKENDS:
            for n in (ns[b], peer[b]):
                subprocess.run(["ip", "netns", "del", n], capture_output=True)
    print("| backend | " + " | ".join(f"{s}: conn/s median (min-max)" for s in sizes) + " | 10,000 / none |")
    print("|---|" + "---|" * (len(sizes) + 1))
    for b in BACKENDS:
        cells = []
        for s in sizes:
            r = results[(b, s)]
            cells.append(f"{statistics.median(r):,.0f} ({min(r):,.0f}-{max(r):,.0f})")
        ratio = statistics.median(results[(b, "10,000 skip ports")]) / statistics.median(results[(b, "no skip ports")])
        print(f"| {b} | " + " | ".join(cells) + f" | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
