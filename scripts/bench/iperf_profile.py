#!/usr/bin/env python3
"""Where the CPU goes during iperf3: whole-machine profile of direct vs proxied bulk TCP.

Same namespaces, rules and proxies as proxy.py (it is imported): path A direct, B
meshproxy (opaque port), C HAProxy splice-auto, and B0 with --baseline. For each path,
one iperf3 run (1 stream by default, IPv4) with:

  - throughput (Gbit/s),
  - the machine's CPU split from /proc/stat (user, system, softirq, idle; 100% = one
    vCPU), and the proxy process's own CPU,
  - the iperf3 client's and server's own CPU (as iperf3 reports it),
  - with --perf, `perf record -a -g -e cpu-clock` over the whole run (kernel included),
    reported as self time by command and by symbol (on a VM, a halted vCPU is sampled
    less often than a busy one: take idle from the /proc/stat columns, not `swapper`),
  - with --netstat, the run's TCP counter changes in both namespaces,
  - with --trace (one more run per meshproxy path), the proxy's splices and sleeps, by side,
  - with --offcpu (one more run per path), every context switch with where it slept, and
    with --ss also `ss -tmi` of both namespaces mid-run.

Usage: scripts/bench/iperf_profile.py [--paths A,B,C] [--streams 1] [--seconds 5]
                                      [--perf] [--trace] [--offcpu [--ss]] [--netstat]
                                      [--baseline PATH] [--meshproxy PATH]
Needs root; prints Markdown.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proxy as bench  # noqa: E402
from benchlib import build_tool, cpu_ticks, ensure_packages, in_ns, log, sh, spawn  # noqa: E402


def cpu_split():
    """Machine-wide jiffies: user(+nice), system, softirq(+irq), idle(+iowait, steal)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
    return {"user": user + nice, "system": system, "softirq": softirq + irq, "idle": idle + iowait,
            "steal": steal}


def netstat(ns):
    """TcpExt and Tcp counters of a namespace (/proc/net/netstat and /proc/net/snmp)."""
    out = {}
    for f in ("/proc/net/netstat", "/proc/net/snmp"):
        lines = sh(*in_ns(ns, "cat", f)).splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            prefix = names.split(":")[0]
            if prefix in ("TcpExt", "Tcp", "IpExt"):
                for k, v in zip(names.split()[1:], values.split()[1:]):
                    out[f"{prefix}.{k}"] = int(v)
    return out


def run(path, a, pids, rules, perf_dir):
    _, port, _ = bench.PATHS[path]
    rules.set(port)
    pid = pids.get(port)
    n0 = {ns: netstat(ns) for ns in (bench.POD, bench.PEER)} if a.netstat else None
    s0, c0, t0 = cpu_split(), cpu_ticks(pid) if pid else 0, time.time()
    rec = None
    if perf_dir:
        data = os.path.join(perf_dir, f"{path}.data")
        rec = subprocess.Popen(["perf", "record", "-a", "-g", "-e", "cpu-clock", "-F", "499", "-o", data,
                                "--", "sleep", str(a.seconds)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = sh(*in_ns(bench.POD, "iperf3", "-c", bench.PEER4, "-p", str(bench.IPERF_PORT), "-t", str(a.seconds),
                    "-P", str(a.streams), "-J"), timeout=a.seconds + 30)
    if rec:
        rec.wait()
    dt = time.time() - t0
    s1 = cpu_split()
    hz = os.sysconf("SC_CLK_TCK")
    split = {k: (s1[k] - s0[k]) / hz / dt * 100 for k in s0}
    proxy_pct = (cpu_ticks(pid) - c0) / hz / dt * 100 if pid else 0.0
    end = json.loads(out)["end"]
    gbps = end["sum_received"]["bits_per_second"] / 1e9
    if n0:
        for ns in (bench.POD, bench.PEER):
            n1 = netstat(ns)
            diff = {k: n1[k] - n0[ns][k] for k in n1 if k in n0[ns] and n1[k] != n0[ns][k]}
            log(f"{path} netstat {ns.split('-')[2]}: " + ", ".join(f"{k.split('.')[1]} {v}" for k, v in
                                                           sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:40]))
    split["client"] = end["cpu_utilization_percent"]["host_total"]
    split["server"] = end["cpu_utilization_percent"]["remote_total"]
    return gbps, split, proxy_pct


def trace(path, a, pids, rules):
    """One more iperf3 run on a meshproxy path with the proxy's splice and epoll_wait
    calls recorded: how many, how many returned EAGAIN, bytes per successful splice, and
    which side the proxy waited on: reading splices (socket -> pipe) against writing ones
    (pipe -> socket), told apart by the length asked (a reading splice always asks for the
    pipe's capacity, a writing one for what the pipe holds), and what the call before each
    epoll_wait was."""
    _, port, _ = bench.PATHS[path]
    rules.set(port)
    data = os.path.join(bench.tmpdir, f"{path}.trace")
    rec = subprocess.Popen(["perf", "record", "-e", "syscalls:sys_enter_splice", "-e", "syscalls:sys_exit_splice",
                            "-e", "syscalls:sys_exit_epoll_wait", "-e", "sched:sched_switch", "-p", str(pids[port]),
                            "-o", data, "--", "sleep", str(a.seconds)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    out = sh(*in_ns(bench.POD, "iperf3", "-c", bench.PEER4, "-p", str(bench.IPERF_PORT), "-t", str(a.seconds),
                    "-P", str(a.streams), "-J"), timeout=a.seconds + 30)
    rec.wait()
    text = sh("perf", "script", "-i", data, "-F", "tid,event,trace")
    sizes, eagain, waits, switches = [], 0, 0, 0
    pairs = {}       # (fd_in, fd_out) -> [calls, EAGAIN]
    lengths = {}     # (fd_in, fd_out) -> lengths asked
    entered = {}     # tid -> (fd_in, fd_out) of the splice in progress
    last = {}        # tid -> ((fd_in, fd_out), returned EAGAIN) of its last splice
    before_wait = {}  # (fd_in, fd_out) or None -> epoll_waits that followed an EAGAIN of it
    for line in text.splitlines():
        tid = line.split()[0]
        if "sys_enter_splice" in line:
            pair = (int(line.split("fd_in: ")[1].split(",")[0], 16),
                    int(line.split("fd_out: ")[1].split(",")[0], 16))
            lengths.setdefault(pair, set()).add(line.split("len: ")[1].split(",")[0])
            entered[tid] = pair
        elif "sys_exit_splice" in line:
            tok = line.split()[-1]
            ret = int(tok, 16) if tok.startswith("0x") else int(tok)
            pair = entered.pop(tid, None)
            failed = ret >= 1 << 63
            if failed:
                eagain += 1
            elif ret > 0:
                sizes.append(ret)
            if pair:
                counts = pairs.setdefault(pair, [0, 0])
                counts[0] += 1
                counts[1] += failed
                last[tid] = (pair, failed)
        elif "sys_exit_epoll_wait" in line:
            waits += 1
            pair, failed = last.pop(tid, (None, False))
            key = pair if failed else ("ok" if pair else None)
            before_wait[key] = before_wait.get(key, 0) + 1
        elif "sched_switch" in line:
            switches += 1
    sizes.sort()
    side = lambda pair: "read" if len(lengths.get(pair, ())) == 1 else "write"
    by_side = {"read": [0, 0, 0], "write": [0, 0, 0]}
    for pair, (calls, failed) in pairs.items():
        by_side[side(pair)][0] += calls
        by_side[side(pair)][1] += failed
    for pair, n in before_wait.items():
        if pair not in (None, "ok"):
            by_side[side(pair)][2] += n
    result = {"gbps": json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9,
              "splices": len(sizes) + eagain, "EAGAIN": eagain,
              "bytes per splice p50": sizes[len(sizes) // 2] if sizes else 0,
              "mean": sum(sizes) // max(1, len(sizes)), "max": sizes[-1] if sizes else 0,
              "epoll_wait": waits, "context switches": switches}
    for name, (calls, failed, waited) in by_side.items():
        result[f"{name} splices"] = f"{calls} ({failed} EAGAIN, {waited} epoll_wait after one)"
    result["epoll_wait after a successful splice"] = before_wait.get("ok", 0)
    result["other epoll_wait returns (repeated or non-blocking polls)"] = before_wait.get(None, 0)
    return result


def offcpu(path, a, rules):
    """One more iperf3 run with every context switch on the machine recorded with its
    kernel stack: per command, how often it went off CPU and where it slept (the first
    frame below the scheduler), so idle time can be traced to who waits on what."""
    _, port, _ = bench.PATHS[path]
    rules.set(port)
    data = os.path.join(bench.tmpdir, f"{path}.offcpu")
    rec = subprocess.Popen(["perf", "record", "-a", "-g", "-e", "sched:sched_switch", "-o", data, "--", "sleep",
                            str(a.seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    ss_text = None
    iperf = subprocess.Popen(in_ns(bench.POD, "iperf3", "-c", bench.PEER4, "-p", str(bench.IPERF_PORT), "-t",
                                   str(a.seconds), "-P", str(a.streams), "-J"), stdout=subprocess.PIPE, text=True)
    if a.ss:
        time.sleep(a.seconds / 2)
        ss_text = "\n".join(sh(*in_ns(ns, "ss", "-tmi", "state", "established")) for ns in (bench.POD, bench.PEER))
    out, _ = iperf.communicate(timeout=a.seconds + 30)
    rec.wait()
    text = sh("perf", "script", "-i", data, "-F", "comm,trace,ip,sym")
    skip = ("__schedule", "schedule", "__traceiter", "preempt_schedule", "schedule_hrtimeout", "schedule_timeout",
            "__cond_resched", "__x64_sys", "do_syscall_64", "entry_SYSCALL", "_cond_resched", "io_schedule",
            "__wait_for_common", "wait_woken", "raw_irqentry", "irqentry_exit", "asm_", "__do_sys", "__sys_",
            "ksys_", "x64_sys_call", "schedule_preempt", "do_nanosleep", "hrtimer_nanosleep")
    where = {}
    comm, state, frames = None, None, []

    def flush():
        if comm is None:
            return
        name = comm if not comm.startswith("tokio") else "meshproxy"
        top = [f for f in frames if not f.startswith(skip)][:3]
        key = (name, state, " < ".join(top) if state != "R" else "(preempted)")
        where[key] = where.get(key, 0) + 1

    for line in text.splitlines():
        if not line.strip():
            flush()
            comm, state, frames = None, None, []
        elif not line.startswith((" ", "\t")):
            comm = line.split()[0]
            state = line.split("prev_state=")[1].split()[0] if "prev_state=" in line else "?"
        else:
            parts = line.split()
            if len(parts) >= 2:
                frames.append(parts[1].split("+")[0])
    flush()
    gbps = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
    return gbps, sorted(where.items(), key=lambda kv: -kv[1]), ss_text


def perf_report(perf_dir, path, sort, limit):
    data = os.path.join(perf_dir, f"{path}.data")
    top = sh("perf", "report", "-i", data, "--stdio", "--no-children", "--sort", sort, "-g", "none",
             "--percent-limit", str(limit))
    return [l for l in top.splitlines() if l.strip() and not l.startswith("#")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paths", default="A,B,C")
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--perf", action="store_true")
    ap.add_argument("--baseline")
    ap.add_argument("--trace", action="store_true",
                    help="also count the proxy's splice/epoll_wait calls and splice sizes (perf tracepoints, "
                         "one extra run per meshproxy path)")
    ap.add_argument("--offcpu", action="store_true",
                    help="also record every context switch with its stack (one extra run per path): who sleeps "
                         "where")
    ap.add_argument("--netstat", action="store_true", help="log each run's TCP counter changes per namespace")
    ap.add_argument("--ss", action="store_true", help="with --offcpu, print `ss -tmi` in both namespaces mid-run")
    ap.add_argument("--keep", help="write the perf data files into this directory (kept)")
    ap.add_argument("--meshinit", default=os.path.join(bench.ROOT, "target/release/meshinit"))
    ap.add_argument("--meshproxy", default=os.path.join(bench.ROOT, "target/release/meshproxy"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("iperf_profile.py: needs root")
    ensure_packages(bench.PACKAGES)
    if a.perf:
        ensure_packages({"perf": "linux-perf"})
    netbench = build_tool("netbench")
    bench.tmpdir = tempfile.mkdtemp(prefix="mi-bench-iperfprof-")
    os.chmod(bench.tmpdir, 0o755)
    try:
        bench.setup_netns()
        spawn(in_ns(bench.PEER, "prlimit", bench.NOFILE, netbench, "serve", "--echo",
                    f"[::]:{bench.OPAQUE_PORT},[::]:{bench.DETECT_PORT}", "--hold", f"[::]:{bench.HOLD_PORT}"),
              stderr=subprocess.DEVNULL)
        spawn(in_ns(bench.PEER, "iperf3", "-s", "-p", str(bench.IPERF_PORT)), stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL)
        for port in (bench.OPAQUE_PORT, bench.IPERF_PORT):
            bench.wait_port(bench.PEER, port)
        mp = bench.start_meshproxy(a.meshproxy)
        pids = {bench.MESH_PORT: mp.pid}
        if a.baseline:
            bench.PATHS["B0"] = ("meshproxy, baseline binary", bench.BASE_PORT, bench.OPAQUE_PORT)
            pids[bench.BASE_PORT] = bench.start_meshproxy(a.baseline, baseline=True).pid
        hap = bench.start_haproxy()
        pids[bench.HAP_SPLICE_PORT] = pids[bench.HAP_PLAIN_PORT] = hap.pid
        rules = bench.Rules(a.meshinit)
        perf_dir = a.keep or bench.tmpdir
        if a.keep:
            os.makedirs(a.keep, exist_ok=True)
        load0 = open("/proc/loadavg").read().split()[:3]
        rows = []
        for r in range(a.rounds):
            for path in a.paths.split(","):
                gbps, split, proxy_pct = run(path, a, pids, rules, perf_dir if (a.perf and r == 0) else None)
                rows.append((path, gbps, split, proxy_pct))
                log(f"{path}: {gbps:.1f} Gbit/s, proxy {proxy_pct:.0f}%, {split}")
        traces = []
        if a.trace:
            for path in a.paths.split(","):
                port = bench.PATHS[path][1]
                if port in (bench.MESH_PORT, bench.BASE_PORT):
                    traces.append((path, trace(path, a, pids, rules)))
        offcpus = []
        if a.offcpu:
            for path in a.paths.split(","):
                offcpus.append((path, offcpu(path, a, rules)))
        load1 = open("/proc/loadavg").read().split()[:3]
        print(f"iperf3 -P {a.streams}, {a.seconds} s, IPv4; load {' '.join(load0)} -> {' '.join(load1)}\n")
        print("CPU split from /proc/stat (100% = one vCPU); iperf3 client and server CPU as iperf3 reports it "
              "(its own process, all threads).\n")
        print("| path | Gbit/s | user % | system % | softirq % | idle % | steal % | iperf3 client % | iperf3 server % "
              "| proxy % | proxy % per Gbit/s | machine busy % per Gbit/s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for path, gbps, s, p in rows:
            print(f"| {path} {bench.PATHS[path][0]} | {gbps:.1f} | {s['user']:.0f} | {s['system']:.0f} | "
                  f"{s['softirq']:.0f} | {s['idle']:.0f} | {s['steal']:.0f} | {s['client']:.0f} | {s['server']:.0f} | "
                  f"{p:.0f} | {(p / gbps if p else 0):.1f} | {(s['user'] + s['system'] + s['softirq']) / gbps:.1f} |")
        for path, t in traces:
            print(f"\n{path} ({bench.PATHS[path][0]}) syscalls during {a.seconds} s of iperf3 "
                  f"({t['gbps']:.1f} Gbit/s under tracing): " + ", ".join(f"{k} {v}" for k, v in t.items()
                                                                         if k != "gbps"))
        for path, (gbps, where, ss_text) in offcpus:
            total = sum(n for _, n in where)
            print(f"\n#### {path} ({bench.PATHS[path][0]}): context switches during {a.seconds} s of iperf3 "
                  f"({gbps:.1f} Gbit/s under tracing), {total} in all, by command, state and where it slept\n\n```")
            for (comm, state, frames), n in where[:25]:
                print(f"{n:8d}  {comm:16s} {state:3s} {frames}")
            print("```")
            if ss_text:
                print(f"\n`ss -tmi` mid-run:\n\n```\n{ss_text.strip()}\n```")
        if a.perf:
            for path in a.paths.split(","):
                print(f"\n#### {path} ({bench.PATHS[path][0]}): whole machine, self time by CPU and command\n\n```")
                print("\n".join(perf_report(perf_dir, path, "cpu,comm", 1.0)[:16]))
                print("```\n\nby symbol:\n\n```")
                print("\n".join(perf_report(perf_dir, path, "comm,sym", 0.8)[:40]))
                print("```")
    finally:
        bench.cleanup()


if __name__ == "__main__":
    main()
