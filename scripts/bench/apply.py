#!/usr/bin/env python3
"""Apply-time benchmark: the whole `meshinit apply` process, per backend and skip-list
size, against the bare tool doing the same work on the same ruleset, in the same run.

Three scenarios, each compared like for like (`--scenarios`, default all three):

* **fresh** -- the first apply in a new pod. Every run gets a network namespace of its
  own, created before the clock starts and deleted after it stops, for meshinit and
  for the bare tool alike: both start from an empty namespace (no tables at all).
* **replace** -- a re-apply that changes the rules. The namespace holds the previous
  ruleset; runs alternate between two rulesets that differ in one rule
  (`--outgoing-proxy-port` 4140 / 4141), so every run deletes the old rules and adds
  the new ones. The bare tool replaces its rules too: `nft -f` of `meshinit show`'s
  text preceded by `add table` + `delete table` (what meshinit's batch does), and
  `*-restore` of each family's text *without* `--noflush`, which flushes the nat
  table the text names and re-adds everything, into a namespace holding the other
  ruleset. Deleting rules is what makes nf_tables wait for an RCU grace period
  when the netlink socket of the transaction closes (~15 ms here), so both pay it.
* **unchanged** -- a re-apply of exactly the rules already installed (a restarted
  init container, a CNI ADD retried). The bare tool does what it always does: the
  same replace as above, with the same text again.

The bare tools enter the namespace with setns(2) as `meshinit --netns` does, so
neither pays `ip netns exec`. Runs are interleaved (meshinit, [baseline,] bare for
each backend, then the next run) so machine noise hits every column alike. With
`--baseline-bin` a second meshinit binary (e.g. main's) runs in the same rounds, in
namespaces of its own, so before/after is read from one run.

Processes are spawned with a container's PATH (/usr/local/sbin:...:/bin), not the
caller's: a long PATH makes each spawn try several directories first.

`--count-processes` first prints how many processes each binary starts per apply
(successful execve(2) calls under `strace -f`, meshinit itself not counted) for
every backend, in a fresh namespace, a namespace holding other rules of ours, and
one holding the same rules.

Ratio = meshinit median / bare median of the same cell. The target (issue 14,
PERFORMANCE.md) is <= 2x for every backend.

Usage: scripts/bench/apply.py [--runs N] [--bin target/release/meshinit]
       [--baseline-bin /work/main-bin/meshinit] [--scenarios fresh,replace,unchanged]
       [--shapes 0,100r,...] [--backends nft,...] [--count-processes]
Needs root. Prints Markdown for BENCHMARKS.md.
"""
import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

BACKENDS = ["nft", "iptables-nft", "iptables-legacy"]
SCENARIOS = ["fresh", "replace", "unchanged"]
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The two rulesets a replace alternates between.
VARIANTS = [["--outgoing-proxy-port", "4140"], ["--outgoing-proxy-port", "4141"]]


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def shapes():
    """(key, label, flags): skip-port lists of growing size, two shapes each."""
    yield "0", "0 ports", []
    for n in (100, 1000, 10000):
        contiguous = f"20000-{20000 + n - 1}"
        scattered = ",".join(str(20000 + 2 * i) for i in range(n))
        yield f"{n}r", f"{n:,} ports, one range", ["--outbound-ports-to-ignore", contiguous]
        yield f"{n}s", f"{n:,} ports, scattered", ["--outbound-ports-to-ignore", scattered]
    subnets = ",".join(f"198.19.{i}.0/24" for i in range(100))
    yield "100n", "100 subnets", ["--subnets-to-ignore", subnets]


def installed(ns, backend):
    """(rules, set elements) of ours installed in the namespace."""
    if backend == "nft":
        out = sh("ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet", "meshinit").stdout
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


def bare_commands(binary, backend, flags, tmp, tag):
    """[(argv, stdin path)] replacing our rules with the ruleset meshinit would apply,
    with the bare tool: `nft -f` (add + delete table first, as our batch does), or one
    `*-restore` per family without --noflush (the nat table is flushed and refilled)."""
    text = sh(binary, "show", "--backend", backend, *flags).stdout
    if backend == "nft":
        path = os.path.join(tmp, f"{tag}-nft.txt")
        with open(path, "w") as f:
            f.write("add table inet meshinit\ndelete table inet meshinit\n" + text)
        return [(["nft", "-f", path], path)]
    commands = []
    for part in text.split("# ")[1:]:
        header, body = part.split("\n", 1)
        tool = header.split()[0]
        path = os.path.join(tmp, f"{tag}-{tool}.txt")
        with open(path, "w") as f:
            f.write(body)
        commands.append(([tool], path))
    return commands


def ns_add(ns):
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    sh("ip", "netns", "add", ns)


def ns_del(ns):
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def timed(argv, ns=None, stdin=None):
    """Wall time in ms of one process (entering `ns` with setns when given)."""
    with open(stdin) if stdin else open(os.devnull) as f:
        start = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, stdin=f,
                                preexec_fn=entering(ns) if ns else None)
        elapsed = (time.perf_counter() - start) * 1000
    if result.returncode != 0:
        sys.exit(f"apply.py: {' '.join(argv[:4])} failed: {result.stderr.decode()[-400:]}")
    return elapsed


def meshinit_argv(binary, backend, ns, flags):
    return [binary, "apply", "--backend", backend, "--netns", f"/var/run/netns/{ns}", *flags]


def run_bare(commands, ns):
    return sum(timed(argv, ns, stdin) for argv, stdin in commands)


def count_processes(binaries, flags_list):
    """Markdown table: processes per apply, per binary, backend and namespace state."""
    lines = ["| binary | backend | fresh namespace | holding other rules of ours | holding the same rules |",
             "|---|---|---|---|---|"]
    for name, binary in binaries:
        for backend in BACKENDS:
            ns = f"mi-bench-count-{backend}"
            counts, commands = [], []
            ns_add(ns)
            try:
                for flags in flags_list:
                    with tempfile.NamedTemporaryFile(prefix="mi-strace-") as out:
                        sh("strace", "-f", "-qq", "-z", "-e", "trace=execve", "-o", out.name,
                           *meshinit_argv(binary, backend, ns, flags))
                        execs = [l for l in open(out.name).read().splitlines() if "execve(" in l][1:]
                    counts.append(len(execs))
                    commands.append("; ".join(
                        " ".join(json.loads("[" + l.split("[", 1)[1].split("]", 1)[0] + "]"))
                        for l in execs))
            finally:
                ns_del(ns)
            cells = [f"**{c}**: `{cmd}`" if c else "**0**" for c, cmd in zip(counts, commands)]
            lines.append(f"| {name} | {backend} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell(values):
    return f"{statistics.median(values):.1f} ms ({min(values):.1f}-{max(values):.1f})"


def main():
    global BACKENDS
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--bin", default="target/release/meshinit")
    ap.add_argument("--baseline-bin", help="a second meshinit (e.g. main's), measured in the same rounds")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--shapes", help="comma-separated keys: 0,100r,100s,1000r,1000s,10000r,10000s,100n")
    ap.add_argument("--count-processes", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("apply.py: needs root (it creates network namespaces)")
    os.environ["PATH"] = CONTAINER_PATH
    BACKENDS = args.backends.split(",")
    scenarios = [s for s in args.scenarios.split(",") if s]
    binaries = [("meshinit", os.path.abspath(args.bin))]
    if args.baseline_bin:
        binaries.append(("baseline", os.path.abspath(args.baseline_bin)))
    tmp = tempfile.mkdtemp(prefix="mi-bench-apply-")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"Generated by `scripts/bench/apply.py {' '.join(sys.argv[1:])}` on "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}.")
    print(f"Load average at start: {open('/proc/loadavg').read().split()[:3]}. "
          f"nft {sh('nft', '--version').stdout.split()[1]}, "
          f"{sh('iptables-nft', '--version').stdout.strip()}.\n")
    if args.count_processes:
        print("Processes per apply (successful execve under `strace -f`, meshinit itself not counted):\n")
        print(count_processes(binaries, [[], VARIANTS[1], VARIANTS[1]]))
        print()

    for scenario in scenarios:
        print(f"\n### {scenario}\n")
        header = "| skip list | backend | " + " | ".join(
            f"{name} median (min-max)" for name, _ in binaries) + " | bare | " + " | ".join(
            f"{name} / bare" for name, _ in binaries) + " | rules |"
        print(header)
        print("|" + "---|" * (header.count("|") - 1), flush=True)
        for key, label, flags in shapes():
            if args.shapes and key not in args.shapes.split(","):
                continue
            bare = {b: [bare_commands(binaries[0][1], b, flags + v, tmp, f"{b}-{i}")
                        for i, v in enumerate(VARIANTS)] for b in BACKENDS}
            times = {(name, b): [] for name, _ in binaries for b in BACKENDS}
            times.update({("bare", b): [] for b in BACKENDS})
            # Long-lived namespaces for replace/unchanged, one per binary and backend
            # (plus the bare tool's), holding variant 0 to start with.
            held = {}
            if scenario != "fresh":
                for b in BACKENDS:
                    for name, binary in binaries:
                        ns = held[(name, b)] = f"mi-bench-{name}-{b}"
                        ns_add(ns)
                        sh(*meshinit_argv(binary, b, ns, flags + VARIANTS[0]))
                    ns = held[("bare", b)] = f"mi-bench-bare-{b}"
                    ns_add(ns)
                    run_bare(bare[b][0], ns)
            last_ns = {}
            try:
                for run in range(args.runs):
                    variant = (run + 1) % 2 if scenario == "replace" else 0
                    for b in BACKENDS:
                        for name, binary in binaries:
                            ns = held.get((name, b)) or f"mi-bench-fresh-{name}-{b}"
                            if scenario == "fresh":
                                ns_add(ns)
                            times[(name, b)].append(
                                timed(meshinit_argv(binary, b, ns, flags + VARIANTS[variant])))
                            last_ns[(name, b)] = ns
                            if scenario == "fresh" and run < args.runs - 1:
                                ns_del(ns)
                        ns = held.get(("bare", b)) or f"mi-bench-fresh-bare-{b}"
                        if scenario == "fresh":
                            ns_add(ns)
                        times[("bare", b)].append(run_bare(bare[b][variant], ns))
                        if scenario == "fresh":
                            ns_del(ns)
                for b in BACKENDS:
                    rules, elems = installed(last_ns[(binaries[0][0], b)], b)
                    extra = f", {elems:,} elements" if b == "nft" else ""
                    bt = times[("bare", b)]
                    cells = [cell(times[(name, b)]) for name, _ in binaries] + [cell(bt)]
                    cells += [f"**{statistics.median(times[(name, b)]) / statistics.median(bt):.2f}x**"
                              for name, _ in binaries]
                    print(f"| {label} | {b} | " + " | ".join(cells) + f" | {rules:,}{extra} |", flush=True)
            finally:
                for ns in list(held.values()) + list(last_ns.values()):
                    ns_del(ns)
    print(f"\nLoad average at end: {open('/proc/loadavg').read().split()[:3]}.")


if __name__ == "__main__":
    main()
