#!/usr/bin/env python3
"""HTTP request rate and latency to a --discovery service address (balanced per request).

One "pod" namespace with meshinit's rules and a release meshproxy (as the proxy
uid) reading a discovery file; one "peer" namespace with nginx answering
`200 ok` on :8080 of 101 addresses (198.18.0.2 and 198.18.2.1-100). Port 8080 is
not opaque, so every cell is detected as HTTP/1 and proxied request by request.
Interleaved rounds (A B C, A B C, ...) of h2load (--h1, keep-alive) from the pod to:

  direct    198.18.0.2:8080, dialled directly through the proxy (one endpoint)
  svc 1     198.18.100.10:8080, a service with one endpoint (198.18.0.2:8080)
  svc 100   198.18.100.11:8080, a service with 100 endpoints (198.18.2.1-100:8080):
            each request picks a backend by weight and an endpoint by P2C over
            peak-EWMA, and goes over a pooled connection to that endpoint

Two measures per cell and round: the request rate with 16 keep-alive connections
(h2load -c 16 -m 1), and the latency of one connection sending one request at a
time (h2load -c 1, per-request times from --log-file: p50 and p99).

Usage: sudo scripts/bench/discovery_http.py [--rounds 5] [--seconds 3]
Needs root, nginx and h2load (Debian: nginx, nghttp2-client); builds
target/release/meshinit and meshproxy.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import (as_proxy, fmt_range, in_ns, pod_and_peer, sh,  # noqa: E402
                      show_logs, spawn, wait_port)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POD, PEER = "mi-bench-dh-pod", "mi-bench-dh-peer"
ENDPOINTS = [f"198.18.2.{i}" for i in range(1, 101)]
CELLS = {
    "direct": "198.18.0.2:8080",
    "svc 1": "198.18.100.10:8080",
    "svc 100": "198.18.100.11:8080",
}

NGINX = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 8080 reuseport;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def discovery():
    many = ", ".join(f'{{ addr = "{ip}:8080" }}' for ip in ENDPOINTS)
    return f'''
[[service]]
name = "one"
addrs = ["198.18.100.10:8080"]
[[service.backend]]
name = "one"
weight = 1
endpoints = [ {{ addr = "198.18.0.2:8080" }} ]

[[service]]
name = "hundred"
addrs = ["198.18.100.11:8080"]
[[service.backend]]
name = "hundred"
weight = 1
endpoints = [ {many} ]
'''


def up(meshinit, meshproxy, path, tmp):
    pod_and_peer(POD, PEER, ENDPOINTS, ("198.18.2.0/24", "198.18.100.0/24"))
    sh(meshinit, "apply", "--netns", f"/var/run/netns/{POD}")
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX.format(tmp=tmp))
    spawn(in_ns(PEER, "nginx", "-c", conf, "-p", tmp))
    proxy_log = open(os.path.join(tmp, "proxy.log"), "a")
    spawn(in_ns(POD, *as_proxy(meshproxy, "--discovery", path,
                               "--admin-addr", "127.0.0.1:4191")), stderr=proxy_log)
    wait_port(PEER, 8080)
    wait_port(POD, 4191)


def down():
    benchlib.down(POD, PEER)


def rate(to, seconds):
    out = sh(*in_ns(POD, "h2load", "--h1", "-c", "16", "-t", "1", "-m", "1",
                    "-D", str(max(1, round(seconds))), f"http://{to}/"))
    check_all_ok(out)
    for line in out.splitlines():
        if line.startswith("finished in"):
            # "finished in 3.00s, 12345.67 req/s, 1.23MB/s"
            return float(line.split(",")[1].split()[0])
    raise RuntimeError(f"no rate in h2load's output:\n{out}")


def latency(to, seconds, tmp):
    log_file = os.path.join(tmp, "h2load.log")
    out = sh(*in_ns(POD, "h2load", "--h1", "-c", "1", "-t", "1", "-m", "1",
                    "-D", str(max(1, round(seconds))), f"--log-file={log_file}", f"http://{to}/"))
    check_all_ok(out)
    # One line per request: start (µs since start), status, time to the response (µs).
    times = []
    with open(log_file) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[1] == "200":
                times.append(int(fields[2]))
    os.unlink(log_file)
    times.sort()
    if not times:
        raise RuntimeError(f"no request in h2load's log:\n{out}")
    return times[len(times) // 2], times[min(len(times) - 1, len(times) * 99 // 100)]


def check_all_ok(out):
    for line in out.splitlines():
        if line.startswith("requests:") and " 0 failed, 0 errored" not in line:
            raise RuntimeError(f"h2load saw failures:\n{out}")
        if line.startswith("status codes:") and " 0 4xx, 0 5xx" not in line:
            raise RuntimeError(f"h2load saw error statuses:\n{out}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("discovery_http.py: needs root (it creates network namespaces)")
    for tool in ("nginx", "h2load"):
        if shutil.which(tool) is None:
            sys.exit(f"discovery_http.py: needs {tool} (Debian: nginx, nghttp2-client)")
    sh("cargo", "build", "--release", "--locked", "-q", "-p", "meshinit", "-p", "meshproxy", cwd=ROOT)
    tools = (os.path.join(ROOT, "target/release/meshinit"),
             os.path.join(ROOT, "target/release/meshproxy"))
    tmp = tempfile.mkdtemp(prefix="meshinit-bench-dh.")
    os.chmod(tmp, 0o755)
    path = os.path.join(tmp, "discovery.toml")
    with open(path, "w") as f:
        f.write(discovery())
    rates = {cell: [] for cell in CELLS}
    p50s = {cell: [] for cell in CELLS}
    p99s = {cell: [] for cell in CELLS}
    try:
        up(*tools, path, tmp)
        # Warm every cell once (pooled connections, the first request to each endpoint).
        for to in CELLS.values():
            rate(to, 1)
        for _ in range(args.rounds):
            for cell, to in CELLS.items():
                rates[cell].append(rate(to, args.seconds))
                p50, p99 = latency(to, args.seconds, tmp)
                p50s[cell].append(p50)
                p99s[cell].append(p99)
    except Exception:
        show_logs(tmp, ["proxy.log"])
        raise
    finally:
        down()
        shutil.rmtree(tmp, ignore_errors=True)
    load = os.getloadavg()[0]
    print(f"load average at the end: {load:.1f}")
    print("| destination | req/s, 16 connections, median (min–max) | / direct "
          "| p50 µs, 1 connection | p99 µs | p50 / direct |")
    print("|---|---|---|---|---|---|")
    direct = statistics.median(rates["direct"])
    direct_p50 = statistics.median(p50s["direct"])
    for cell in CELLS:
        r = rates[cell]
        print(f"| {cell} | {fmt_range(r, lambda v: f'{v:,.0f}')} "
              f"| {statistics.median(r) / direct:.2f}x "
              f"| {fmt_range(p50s[cell], lambda v: f'{v:.0f}')} "
              f"| {fmt_range(p99s[cell], lambda v: f'{v:.0f}')} "
              f"| {statistics.median(p50s[cell]) / direct_p50:.2f}x |")


if __name__ == "__main__":
    main()
