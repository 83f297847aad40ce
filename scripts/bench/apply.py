#!/usr/bin/env python3
"""Apply-time benchmark: whole `meshinit apply` process, per backend and list size.

For each backend and each skip-port count it creates a throwaway network
namespace, runs `meshinit apply` RUNS times (each run replaces the previous
ruleset, so every run does the full work), and reports the median and min-max
wall time of the whole process, plus how many rules and set elements ended up
installed. Runs are interleaved across backends (A B C, A B C, ...) so that
machine noise hits every backend alike.

Usage: scripts/bench/apply.py [--runs N] [--bin target/release/meshinit]
Needs root. Prints a Markdown table for BENCHMARKS.md.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

BACKENDS = ["nft", "iptables-nft", "iptables-legacy"]


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def shapes():
    """(label, flags): skip-port lists of growing size, two shapes each."""
    yield "0 ports", []
    for n in (100, 1000, 10000):
        contiguous = f"20000-{20000 + n - 1}"
        scattered = ",".join(str(20000 + 2 * i) for i in range(n))
        yield f"{n:,} ports, one range", ["--outbound-ports-to-ignore", contiguous]
        yield f"{n:,} ports, scattered", ["--outbound-ports-to-ignore", scattered]
    subnets = ",".join(f"198.19.{i}.0/24" for i in range(100))
    yield "100 subnets", ["--subnets-to-ignore", subnets]


def installed(ns, backend):
    """(rules, set elements) of ours installed in the namespace."""
    if backend == "nft":
        out = sh("ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet", "meshinit").stdout
        import json
        objs = json.loads(out)["nftables"]
        rules = sum(1 for o in objs if "rule" in o)
        elems = sum(len(o["set"].get("elem", [])) for o in objs if "set" in o)
        return rules, elems
    rules = 0
    for fam in ("iptables", "ip6tables"):
        out = sh("ip", "netns", "exec", ns, f"{fam}-{backend.split('-')[1]}-save", "-t", "nat").stdout
        rules += sum(1 for l in out.splitlines() if l.startswith("-A MESHINIT_") or ("-j MESHINIT_" in l))
    return rules, 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--bin", default="target/release/meshinit")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("apply.py: needs root (it creates network namespaces)")
    binary = os.path.abspath(args.bin)
    print(f"| skip list | " + " | ".join(f"{b}: median (min-max), rules" for b in BACKENDS) + " |")
    print("|---|" + "---|" * len(BACKENDS))
    for label, flags in shapes():
        namespaces = {b: f"mi-bench-apply-{b}" for b in BACKENDS}
        for ns in namespaces.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            sh("ip", "netns", "add", ns)
        try:
            times = {b: [] for b in BACKENDS}
            for _ in range(args.runs):
                for b in BACKENDS:
                    # Time only meshinit itself: `ip netns exec` is the same for all
                    # and is not part of what a pod's init container pays.
                    cmd = [binary, "apply", "--backend", b, "--netns", f"/var/run/netns/{namespaces[b]}", *flags]
                    start = time.perf_counter()
                    subprocess.run(cmd, check=True, capture_output=True)
                    times[b].append((time.perf_counter() - start) * 1000)
            cells = []
            for b in BACKENDS:
                t = times[b]
                rules, elems = installed(namespaces[b], b)
                extra = f", {elems:,} elements" if b == "nft" else ""
                cells.append(f"{statistics.median(t):.1f} ms ({min(t):.1f}-{max(t):.1f}), {rules:,} rules{extra}")
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
        finally:
            for ns in namespaces.values():
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)


if __name__ == "__main__":
    main()
