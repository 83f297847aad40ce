"""Helpers shared by the benchmark scripts (proxy.py, mtls.py, discovery*.py, ...).

Processes started with `spawn` are remembered in `procs` and stopped by
`stop_all`; `log` prefixes lines with the script's name (set `NAME`).
"""
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = os.path.basename(sys.argv[0])
PROXY_UID = 2102

# Raise the fd limit to the hard limit we have (this workplace may lack CAP_SYS_RESOURCE).
_HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
NOFILE_MAX = 1 << 20 if _HARD == resource.RLIM_INFINITY else _HARD
NOFILE = f"--nofile={NOFILE_MAX}:{NOFILE_MAX}"

procs = []      # background processes we started (stopped by stop_all)


def log(*a):
    print(f"{NAME}:", *a, file=sys.stderr, flush=True)


def sh(*args, check=True, **kw):
    r = subprocess.run(args, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))}: exit {r.returncode}\n{r.stdout}{r.stderr}")
    return r.stdout


def in_ns(ns, *args):
    return ["ip", "netns", "exec", ns, *args]


def as_proxy(*args):
    # Root raises the fd limit, then drops to the proxy uid (exempt from redirect).
    return ["prlimit", NOFILE, "setpriv", f"--reuid={PROXY_UID}",
            f"--regid={PROXY_UID}", "--clear-groups", *args]


def spawn(args, **kw):
    p = subprocess.Popen(args, **kw)
    procs.append(p)
    return p


def stop_all():
    """SIGTERM every spawned process, SIGKILL what is left after 3 s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + 3
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def show_logs(tmpdir, names):
    """The last lines of each log, after a failure."""
    for name in names:
        path = os.path.join(tmpdir, name)
        if os.path.exists(path):
            log(f"--- {name} (last lines) ---\n" + "".join(open(path, errors="replace").readlines()[-15:]))


def ensure_packages(packages):
    """apt-get install the packages whose command (the dict's key) is missing."""
    missing = sorted({pkg for cmd, pkg in packages.items() if shutil.which(cmd) is None})
    if not missing:
        return
    log("installing", *missing)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=True)
        subprocess.run(cmd, env=env, capture_output=True, check=True)


def build_tool(name):
    """Builds scripts/bench/NAME (a std-only crate outside the workspace)."""
    manifest = os.path.join(HERE, name, "Cargo.toml")
    target = os.path.join(HERE, name, "target")
    sh("cargo", "build", "--release", "-q", "--manifest-path", manifest,
       env=dict(os.environ, CARGO_TARGET_DIR=target))
    return os.path.join(target, "release", name)


def wait_port(ns, port, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if sh(*in_ns(ns, "ss", "-Htln", f"sport = :{port}")).strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} in {ns}")


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def fmt_range(vals, fmt):
    """median (min–max), each formatted with fmt."""
    return f"{fmt(statistics.median(vals))} ({fmt(min(vals))}–{fmt(max(vals))})"


def pod_and_peer(pod, peer, extra_peer_ips=(), pod_routes=()):
    """Fresh namespaces `pod` (198.18.0.1) and `peer` (198.18.0.2, and each of
    `extra_peer_ips` as a /32) joined by a veth pair, the pod routing each net of
    `pod_routes` via the peer. Namespaces left by an earlier run are replaced."""
    for ns in (pod, peer):
        sh("ip", "netns", "del", ns, check=False)
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer)
    sh("ip", "-n", pod, "addr", "add", "198.18.0.1/24", "dev", "eth0")
    sh("ip", "-n", peer, "addr", "add", "198.18.0.2/24", "dev", "eth0")
    for ip in extra_peer_ips:
        sh("ip", "-n", peer, "addr", "add", f"{ip}/32", "dev", "eth0")
    for ns in (pod, peer):
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
    for net in pod_routes:
        sh("ip", "-n", pod, "route", "add", net, "via", "198.18.0.2")


def down(*namespaces):
    """Stops every spawned process and deletes `namespaces`."""
    stop_all()
    procs.clear()
    for ns in namespaces:
        sh("ip", "netns", "del", ns, check=False)
