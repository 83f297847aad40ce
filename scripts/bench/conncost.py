#!/usr/bin/env python3
"""What one proxied connection, and one 64-byte round trip, costs the proxy in syscalls
and wake-ups: meshproxy (opaque port B, detected port Bd, and the same for each
--baseline binary) against HAProxy (C, splice-auto), in proxy.py's namespaces and rules.

For each path a fixed number of connections (scripts/bench/connrate --count: connect,
1-byte exchange, close, one client thread) and then a fixed time of 64-byte ping-pong
over one connection (scripts/bench/netbench pingpong), each measured three ways, in
separate runs so that one tool's overhead does not change the other's figures:

  perf stat   task-clock (CPU time), context-switches and sched:sched_wakeup of the proxy process (all its
              threads), and its voluntary context switches from /proc (each one is a
              sleep, i.e. one wake-up of the proxy later)
  perf trace  -s --errno-summary: calls and errors (by errno) per syscall
  strace      (--sequence only) the syscalls of a few connections, in order

Every count is divided by the connections (or round trips) the client made.

Usage: scripts/bench/conncost.py [--connections 3000] [--seconds 2] [--meshproxy BIN]
                                 [--baseline BIN]... [--sequence N] [--out FILE]
Needs root, perf (linux-perf), strace. Prints Markdown.
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proxy  # noqa: E402  (its namespaces, proxies and rules)
from benchlib import NOFILE, build_tool, ensure_packages, in_ns, log, sh, stop_all  # noqa: E402

PEER4 = proxy.PEER4


def ctxsw(pid):
    """Voluntary context switches of all threads of `pid`."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def run_client(kind, dport, n, seconds):
    """Runs the client; returns the number of connections or round trips it made."""
    if kind == "conn":
        out = sh(*in_ns(proxy.POD, "prlimit", NOFILE, CONNRATE, "--connect", f"{PEER4}:{dport}",
                        "--count", str(n), "--seconds", "120"), timeout=180)
        return int(out.split()[0])
    out = sh(*in_ns(proxy.POD, NETBENCH, "pingpong", "--connect", f"{PEER4}:{dport}", "--size", "64",
                    "--seconds", str(seconds), "--warmup", "0"), timeout=seconds + 60)
    return int(out.split()[0])


def traced(tool_args, pid, kind, dport, n, seconds):
    """Runs `tool_args` attached to `pid` around one client run; returns (made, tool output)."""
    out = tempfile.NamedTemporaryFile(prefix="mi-conncost-", suffix=".txt", delete=False).name
    tracer = subprocess.Popen([*tool_args, "-o", out, "-p", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the first connection
    made = run_client(kind, dport, n, seconds)
    time.sleep(0.3)  # the proxy's closes of the last connection
    tracer.send_signal(signal.SIGINT)
    tracer.wait(timeout=60)
    text = open(out).read()
    os.unlink(out)
    return made, text


def perf_stat(pid, kind, dport, n, seconds):
    c0 = ctxsw(pid)
    made, text = traced(["perf", "stat", "-x", ",", "-e", "task-clock,context-switches,sched:sched_wakeup"],
                        pid, kind, dport, n, seconds)
    vol = ctxsw(pid) - c0
    counts = {}
    for line in text.splitlines():
        f = line.split(",")
        if len(f) > 2 and f[0].replace(".", "").isdigit():
            counts[f[2]] = float(f[0])
    return made, {"task-clock": counts.get("task-clock", 0) / made * 1000,  # ms -> µs
                  "context-switches": counts.get("context-switches", 0) / made,
                  "sched_wakeup": counts.get("sched:sched_wakeup", 0) / made,
                  "voluntary": vol / made}


def perf_trace(pid, kind, dport, n, seconds):
    """Calls and errors per syscall, summed over the process's threads."""
    made, text = traced(["perf", "trace", "-s", "--errno-summary"], pid, kind, dport, n, seconds)
    calls, errors = {}, {}
    last = None
    for line in text.splitlines():
        m = re.match(r"\s+([a-z_0-9]+)\s+(\d+)\s+(\d+)\s+[\d.]+", line)
        if m:
            last = m.group(1)
            calls[last] = calls.get(last, 0) + int(m.group(2))
            continue
        m = re.match(r"\s+([A-Z][A-Z0-9]+): (\d+)", line)
        if m and last:
            key = (last, m.group(1))
            errors[key] = errors.get(key, 0) + int(m.group(2))
    return made, calls, errors


def sequence(pid, dport, count):
    """strace of `count` connections, in order (after a warm-up by the caller)."""
    out = tempfile.NamedTemporaryFile(prefix="mi-conncost-", suffix=".txt", delete=False).name
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-o", out, "-p", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    run_client("conn", dport, count, 0)
    time.sleep(0.3)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(timeout=60)
    text = open(out).read()
    os.unlink(out)
    return text


def main():
    global CONNRATE, NETBENCH
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--meshinit", default=os.path.join(proxy.ROOT, "target/release/meshinit"))
    ap.add_argument("--meshproxy", default=os.path.join(proxy.ROOT, "target/release/meshproxy"))
    ap.add_argument("--meshproxy-args", default="")
    ap.add_argument("--baseline", action="append", default=[])
    ap.add_argument("--connections", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=2.0, help="ping-pong time per run")
    ap.add_argument("--sequence", type=int, default=0,
                    help="also strace this many connections per meshproxy path and print them")
    ap.add_argument("--out")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("conncost.py: needs root (it creates network namespaces)")
    ensure_packages({**proxy.PACKAGES, "perf": "linux-perf", "strace": "strace"})
    NETBENCH, CONNRATE = build_tool("netbench"), build_tool("connrate")
    proxy.tmpdir = tempfile.mkdtemp(prefix="mi-bench-conncost-")
    os.chmod(proxy.tmpdir, 0o755)
    load_start = " ".join(open("/proc/loadavg").read().split()[:3])
    lines = []
    w = lines.append
    try:
        proxy.setup_netns()
        proxy.spawn(in_ns(proxy.PEER, "prlimit", NOFILE, NETBENCH, "serve", "--echo",
                          f"[::]:{proxy.OPAQUE_PORT},[::]:{proxy.DETECT_PORT}"), stderr=subprocess.DEVNULL)
        for port in (proxy.OPAQUE_PORT, proxy.DETECT_PORT):
            proxy.wait_port(proxy.PEER, port)
        mp = proxy.start_meshproxy(a.meshproxy, extra=a.meshproxy_args.split())
        paths = {"B": (proxy.MESH_PORT, proxy.OPAQUE_PORT, mp.pid),
                 "Bd": (proxy.MESH_PORT, proxy.DETECT_PORT, mp.pid)}
        labels = {"B": f"meshproxy `{a.meshproxy}`, opaque port", "Bd": "same, detected port"}
        for n, path in enumerate(a.baseline):
            pid = proxy.start_meshproxy(path, baseline=n, extra=a.meshproxy_args.split()).pid
            paths[f"B{n}"] = (proxy.base_port(n), proxy.OPAQUE_PORT, pid)
            paths[f"B{n}d"] = (proxy.base_port(n), proxy.DETECT_PORT, pid)
            labels[f"B{n}"], labels[f"B{n}d"] = f"baseline `{path}`, opaque port", "same, detected port"
        hap = proxy.start_haproxy()
        paths["C"] = (proxy.HAP_SPLICE_PORT, proxy.OPAQUE_PORT, hap.pid)
        labels["C"] = "HAProxy splice-auto (2 threads), opaque port"
        rules = proxy.Rules(a.meshinit)
        stats, traces = {}, {}
        for kind in ("conn", "pingpong"):
            for p, (port, dport, pid) in paths.items():
                rules.set(port)
                subprocess.run(in_ns(proxy.POD, "conntrack", "-F"), capture_output=True)
                run_client("conn", dport, 200, 0)  # warm-up: pools, buffers, conntrack
                stats[(kind, p)] = perf_stat(pid, kind, dport, a.connections, a.seconds)
                subprocess.run(in_ns(proxy.POD, "conntrack", "-F"), capture_output=True)
                traces[(kind, p)] = perf_trace(pid, kind, dport, a.connections, a.seconds)
                log(f"{kind} {p}: {stats[(kind, p)][0]} / {traces[(kind, p)][0]} made")
        seqs = {}
        if a.sequence:
            for p, (port, dport, pid) in paths.items():
                rules.set(port)
                run_client("conn", dport, 50, 0)
                seqs[p] = sequence(pid, dport, a.sequence)
        load_end = " ".join(open("/proc/loadavg").read().split()[:3])
        cols = list(paths)
        w(f"Generated by `scripts/bench/conncost.py {' '.join(sys.argv[1:])}` on "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load {load_start} -> {load_end}.")
        w("")
        w("Paths: " + "; ".join(f"**{p}** {labels[p]}" for p in cols) + ".")
        for kind, title in (("conn", "per connection (connect, 1-byte exchange, close)"),
                            ("pingpong", "per 64-byte round trip (one persistent connection)")):
            w("")
            w(f"#### Proxy syscalls and wake-ups {title}")
            w("")
            made = {p: f"{stats[(kind, p)][0]:,} / {traces[(kind, p)][0]:,}" for p in cols}
            w("| | " + " | ".join(cols) + " |")
            w("|---|" + "---|" * len(cols))
            w("| made (perf stat run / perf trace run) | " + " | ".join(made[p] for p in cols) + " |")
            for key, title2 in (("task-clock", "proxy CPU, µs (perf stat task-clock)"),
                                ("voluntary", "proxy sleeps (voluntary context switches)"),
                                ("context-switches", "context switches (perf stat)"),
                                ("sched_wakeup", "sched_wakeup events in proxy context (wake-ups it causes)")):
                w(f"| {title2} | " + " | ".join(f"{stats[(kind, p)][1][key]:.2f}" for p in cols) + " |")
            names = sorted({s for p in cols for s in traces[(kind, p)][1]},
                           key=lambda s: -max(traces[(kind, p)][1].get(s, 0) / traces[(kind, p)][0] for p in cols))
            total = {p: sum(traces[(kind, p)][1].values()) / traces[(kind, p)][0] for p in cols}
            w("| **syscalls, all** | " + " | ".join(f"**{total[p]:.2f}**" for p in cols) + " |")
            for s in names:
                cells = []
                for p in cols:
                    made_n, calls, errors = traces[(kind, p)]
                    c = calls.get(s, 0) / made_n
                    if c < 0.005:
                        cells.append("")
                        continue
                    errs = ", ".join(f"{e} {v / made_n:.2f}" for (s2, e), v in sorted(errors.items()) if s2 == s)
                    cells.append(f"{c:.2f}" + (f" ({errs})" if errs else ""))
                if any(cells):
                    w(f"| {s} | " + " | ".join(cells) + " |")
        for p, text in seqs.items():
            w("")
            w(f"strace of {a.sequence} connections on path {p}:")
            w("")
            w("```")
            w(text.rstrip())
            w("```")
    finally:
        stop_all()
        for ns in (proxy.POD, proxy.PEER):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(proxy.tmpdir, ignore_errors=True)
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
