#!/usr/bin/env python3
"""Apply-time benchmark: whole `meshinit apply` process, per backend and list size,
against the bare tool applying the same ruleset.

For each backend and each skip-port count it creates a throwaway network
namespace, runs `meshinit apply` RUNS times (each run replaces the previous
ruleset, so every run does the full work), and reports the median and min-max
wall time of the whole process, plus how many rules and set elements ended up
installed. Next to each, the bare tool in a namespace of its own: `nft -f` of
`meshinit show`'s text (preceded by the same add+delete of the table that
meshinit's batch does), and `*-restore --noflush` of each family's text (the nat
table flushed before each run, untimed), entered with setns(2) like meshinit
enters its --netns. Runs are interleaved across backends and tools (A A' B B' C
C', ...) so that machine noise hits every column alike.

Usage: scripts/bench/apply.py [--runs N] [--bin target/release/meshinit]
Needs root. Prints a Markdown table for BENCHMARKS.md.
"""
import argparse
import ctypes
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


CLONE_NEWNET = 0x40000000
LIBC = ctypes.CDLL(None, use_errno=True)


def entering(ns):
    """A preexec_fn that moves the child into namespace `ns`, as meshinit --netns does."""
    def enter():
        fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
        if LIBC.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        os.close(fd)
    return enter


def bare_commands(binary, backend, flags, tmp):
    """[(argv, stdin file)] applying the ruleset meshinit would, with the bare tool."""
    text = sh(binary, "show", "--backend", backend, *flags).stdout
    if backend == "nft":
        path = os.path.join(tmp, "nft.txt")
        with open(path, "w") as f:
            f.write("add table inet meshinit\ndelete table inet meshinit\n" + text)
        return [(["nft", "-f", path], None)]
    commands = []
    for part in text.split("# ")[1:]:
        header, body = part.split("\n", 1)
        path = os.path.join(tmp, header.split()[0] + ".txt")
        with open(path, "w") as f:
            f.write(body)
        commands.append((header.split(), path))
    return commands


def reset_nat(ns, backend):
    """Empties the nat tables of an iptables flavour (untimed, before a bare run)."""
    flavor = backend.split("-")[1]
    for fam in ("iptables", "ip6tables"):
        for flag in ("-F", "-X"):
            subprocess.run(["ip", "netns", "exec", ns, f"{fam}-{flavor}", "-t", "nat", flag],
                           capture_output=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--bin", default="target/release/meshinit")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("apply.py: needs root (it creates network namespaces)")
    binary = os.path.abspath(args.bin)
    import tempfile
    tmp = tempfile.mkdtemp(prefix="mi-bench-apply-")
    print("| skip list | " + " | ".join(
        f"{b}: meshinit median (min-max), rules | bare {'nft -f' if b == 'nft' else '*-restore'} | ratio"
        for b in BACKENDS) + " |")
    print("|---|" + "---|---|---|" * len(BACKENDS))
    for label, flags in shapes():
        namespaces = {b: f"mi-bench-apply-{b}" for b in BACKENDS}
        bare_ns = {b: f"mi-bench-bare-{b}" for b in BACKENDS}
        all_ns = list(namespaces.values()) + list(bare_ns.values())
        for ns in all_ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            sh("ip", "netns", "add", ns)
        try:
            bare = {b: bare_commands(binary, b, flags, tmp) for b in BACKENDS}
            times = {b: [] for b in BACKENDS}
            bare_times = {b: [] for b in BACKENDS}
            for _ in range(args.runs):
                for b in BACKENDS:
                    # Time only meshinit itself: `ip netns exec` is the same for all
                    # and is not part of what a pod's init container pays.
                    cmd = [binary, "apply", "--backend", b, "--netns", f"/var/run/netns/{namespaces[b]}", *flags]
                    start = time.perf_counter()
                    subprocess.run(cmd, check=True, capture_output=True)
                    times[b].append((time.perf_counter() - start) * 1000)
                    if b != "nft":
                        reset_nat(bare_ns[b], b)
                    elapsed = 0.0
                    for argv, stdin in bare[b]:
                        with open(stdin) if stdin else open(os.devnull) as f:
                            start = time.perf_counter()
                            subprocess.run(argv, check=True, capture_output=True, stdin=f,
                                           preexec_fn=entering(bare_ns[b]))
                            elapsed += (time.perf_counter() - start) * 1000
                    bare_times[b].append(elapsed)
            cells = []
            for b in BACKENDS:
                t, bt = times[b], bare_times[b]
                rules, elems = installed(namespaces[b], b)
                extra = f", {elems:,} elements" if b == "nft" else ""
                cells.append(f"{statistics.median(t):.1f} ms ({min(t):.1f}-{max(t):.1f}), {rules:,} rules{extra}")
                cells.append(f"{statistics.median(bt):.1f} ms ({min(bt):.1f}-{max(bt):.1f})")
                cells.append(f"**{statistics.median(t) / statistics.median(bt):.2f}×**")
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
        finally:
            for ns in all_ns:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)


if __name__ == "__main__":
    main()
