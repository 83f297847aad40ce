#!/usr/bin/env python3
"""Connection rate to a --discovery service address, and how fast a weight change lands.

One "pod" namespace with meshinit's rules and a release meshproxy (as the proxy
uid) reading a discovery file; one "peer" namespace with connrate's echo server on
:8080 of 101 addresses (198.18.0.2 and 198.18.2.1-100). Port 8080 is opaque for
the proxy, so no cell waits for detection. Interleaved rounds (A B C, A B C, ...)
of connrate from the pod, one client thread, to:

  direct    198.18.0.2:8080, dialled directly through the proxy (Route::Forward)
  svc 1     198.18.100.10:8080, a service with one endpoint (198.18.0.2:8080)
  svc 100   198.18.100.11:8080, a service with 100 endpoints (198.18.2.1-100:8080)

Then the shift: a service 198.18.100.12:8080 with backends a (198.18.0.2) and b
(198.18.2.1) at 100/0 while connrate runs against it; the file is rewritten (a new
file renamed over) to 0/100 (then back), and /metrics is polled every 5 ms until the
new backend's tcp_open_total moves: the time from the rename to the first connection
on the new backend.

Usage: sudo scripts/bench/discovery.py [--rounds 5] [--seconds 3] [--shifts 10]
Needs root; builds target/release/meshinit, meshproxy and scripts/bench/connrate.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import (as_proxy, build_tool, fmt_range, in_ns, pod_and_peer, sh,  # noqa: E402
                      show_logs, spawn, wait_port)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POD, PEER = "mi-bench-disc-pod", "mi-bench-disc-peer"
ENDPOINTS = [f"198.18.2.{i}" for i in range(1, 101)]
CELLS = {
    "direct": "198.18.0.2:8080",
    "svc 1": "198.18.100.10:8080",
    "svc 100": "198.18.100.11:8080",
}


def discovery(shift_a, shift_b):
    many = ", ".join(f'{{ addr = "{ip}:8080" }}' for ip in ENDPOINTS)
    return f'''
[[service]]
name = "one"
addrs = ["198.18.100.10:8080"]
protocol = "opaque"
[[service.backend]]
name = "one"
weight = 1
endpoints = [ {{ addr = "198.18.0.2:8080" }} ]

[[service]]
name = "hundred"
addrs = ["198.18.100.11:8080"]
protocol = "opaque"
[[service.backend]]
name = "hundred"
weight = 1
endpoints = [ {many} ]

[[service]]
name = "shift"
addrs = ["198.18.100.12:8080"]
protocol = "opaque"
[[service.backend]]
name = "a"
weight = {shift_a}
endpoints = [ {{ addr = "198.18.0.2:8080" }} ]
[[service.backend]]
name = "b"
weight = {shift_b}
endpoints = [ {{ addr = "198.18.2.1:8080" }} ]
'''


def write(path, text):
    with open(path + ".new", "w") as f:
        f.write(text)
    os.rename(path + ".new", path)


def opened(backend):
    # Scraped inside the pod (the admin port is on its loopback).
    text = sh(*in_ns(POD, "curl", "-s", "http://127.0.0.1:4191/metrics"))
    total = 0.0
    for line in text.splitlines():
        if line.startswith("tcp_open_total{") and f'dst_backend="{backend}"' in line \
                and 'dst_service="shift"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def up(meshinit, meshproxy, connrate, path, tmp):
    """Fresh namespaces, rules, echo server and proxy: every run starts from the same
    kernel state (connections in TIME_WAIT and conntrack entries of earlier runs slow
    down new connections, whichever path they take)."""
    pod_and_peer(POD, PEER, ENDPOINTS, ("198.18.2.0/24", "198.18.100.0/24"))
    sh(meshinit, "apply", "--netns", f"/var/run/netns/{POD}")
    spawn(in_ns(PEER, connrate, "--listen", "0.0.0.0:8080"))
    proxy_log = open(os.path.join(tmp, "proxy.log"), "a")
    spawn(in_ns(POD, *as_proxy(meshproxy, "--discovery", path, "--opaque-ports", "8080",
                               "--admin-addr", "127.0.0.1:4191")), stderr=proxy_log)
    wait_port(PEER, 8080)
    wait_port(POD, 4191)


def down():
    benchlib.down(POD, PEER)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--shifts", type=int, default=10)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("discovery.py: needs root (it creates network namespaces)")
    sh("cargo", "build", "--release", "--locked", "-q", "-p", "meshinit", "-p", "meshproxy", cwd=ROOT)
    tools = (os.path.join(ROOT, "target/release/meshinit"),
             os.path.join(ROOT, "target/release/meshproxy"),
             build_tool("connrate"))
    tmp = tempfile.mkdtemp(prefix="meshinit-bench-disc.")
    os.chmod(tmp, 0o755)
    path = os.path.join(tmp, "discovery.toml")
    write(path, discovery(100, 0))
    results = {cell: [] for cell in CELLS}
    shifts = []
    try:
        for _ in range(args.rounds):
            for cell, to in CELLS.items():
                up(*tools, path, tmp)
                out = sh(*in_ns(POD, tools[2], "--connect", to, "--seconds", str(args.seconds)))
                results[cell].append(float(out.split()[2]))
                down()
        # The shift: connections keep coming while the file changes.
        up(*tools, path, tmp)
        client = spawn(in_ns(POD, tools[2], "--connect", "198.18.100.12:8080",
                             "--seconds", str(3600)), stdout=open(os.devnull, "w"))
        time.sleep(1)
        to_b = True
        for _ in range(args.shifts):
            target = "b" if to_b else "a"
            before = opened(target)
            started = time.monotonic()
            write(path, discovery(0, 100) if to_b else discovery(100, 0))
            while opened(target) == before:
                if time.monotonic() - started > 5:
                    raise RuntimeError(f"no connection on {target} 5 s after the change")
                time.sleep(0.005)
            shifts.append((time.monotonic() - started) * 1000)
            to_b = not to_b
            time.sleep(0.5)
        client.terminate()
    except Exception:
        show_logs(tmp, ["proxy.log"])
        raise
    finally:
        down()
        shutil.rmtree(tmp, ignore_errors=True)
    load = os.getloadavg()[0]
    print(f"load average at the end: {load:.1f}")
    print("| destination | conn/s median (min–max) | / direct |")
    print("|---|---|---|")
    direct = statistics.median(results["direct"])
    for cell, r in results.items():
        print(f"| {cell} | {fmt_range(r, lambda v: f'{v:,.0f}')} | {statistics.median(r) / direct:.2f}x |")
    print(f"file change -> first connection on the new backend (polling /metrics every ~5 ms "
          f"plus a scrape): {fmt_range(shifts, lambda v: f'{v:.0f} ms')} over {len(shifts)} shifts")


if __name__ == "__main__":
    main()
