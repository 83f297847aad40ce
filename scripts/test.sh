#!/usr/bin/env bash
# Runs every test of the project: unit, snapshot and property tests, CLI tests,
# and the netns tests that apply real rules with real nft/iptables in
# throwaway network namespaces. Run it as root (the netns tests fail loudly
# without it; sudo is not needed). Installs the system packages it needs with
# apt-get first (Debian 12 or later). Ends with the totals and the verdict.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: must run as root (the netns tests create network namespaces); from a root shell: scripts/test.sh" >&2
  exit 1
fi

# Debian packages the tests use: the rule tools, ip, a real Redis and HTTP
# server for traffic, promtool (package prometheus) to lint /metrics, and
# HAProxy / stunnel / iperf3 for the benchmark peers; PostgreSQL for the tproxy
# test that reads inet_client_addr(); podman, runc, catatonit (podman's pause
# process), mmdebstrap and busybox-static for the image test
# (scripts/image-test.sh), python3-venv for kubernetes-validate and the HTTP
# tests' grpcio and websockets; nginx, nghttp2-server (nghttpd) and
# nghttp2-client (nghttp, h2load) as real HTTP/1 and HTTP/2 servers and clients
# for the HTTP netns tests (netns-tests/tests/http.rs); tinyproxy as a real
# CONNECT server (netns-tests/tests/http_mtls.rs); strace to count a proxied
# connection's syscalls (netns-tests/tests/syscalls.rs).
packages=(nftables iptables iproute2 procps util-linux strace python3 prometheus redis-server redis-tools curl tcpdump openssl containernetworking-plugins postgresql podman runc catatonit mmdebstrap busybox-static python3-venv nginx nghttp2-server nghttp2-client tinyproxy)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# kubernetes-validate (PyPI) checks every manifest in deploy/ (tests/deploy.rs).
if [ ! -x target/kubernetes-validate/bin/kubernetes-validate ]; then
  echo "==> installing kubernetes-validate into target/kubernetes-validate"
  python3 -m venv target/kubernetes-validate
  target/kubernetes-validate/bin/pip install -q kubernetes-validate==1.37.0
fi

# grpcio and websockets (PyPI) for the HTTP netns tests' gRPC and WebSocket
# servers and clients (netns-tests/apps/*.py, run by netns-tests/tests/http.rs);
# h2 (its hyperframe and hpack) for the raw HTTP/2 frames of the attack tests
# (netns-tests/apps/h2_attack.py, run by netns-tests/tests/attack.rs); hypercorn for
# the WebSocket over HTTP/2 server (RFC 8441, netns-tests/apps/ws_h2.py).
if ! target/http-venv/bin/python3 -c 'import grpc, websockets, hyperframe, hpack, hypercorn' 2>/dev/null; then
  echo "==> installing grpcio, websockets, h2 and hypercorn into target/http-venv"
  python3 -m venv target/http-venv
  target/http-venv/bin/pip install -q grpcio==1.85.3 websockets==17.4 h2==4.4.1 hypercorn==0.18.0
fi

echo "==> building"
cargo build --workspace --bins --locked

# Sums the "test result:" lines of cargo's output, so the run ends with its totals.
test_log=$(mktemp)
totals() {
  awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1); if ($(i) ~ /^ignored;?$/) g += $(i-1) } }
       END { printf "%d passed, %d failed, %d ignored\n", p, f, g }' "$test_log"
}

echo "==> testing"
if ! cargo test --workspace --locked --no-fail-fast -- --test-threads="${TEST_THREADS:-4}" 2>&1 | tee "$test_log"; then
  echo "==> tests: $(totals)"
  echo "scripts/test.sh: FAILED (cargo test)" >&2
  exit 1
fi
echo "==> tests: $(totals)"

echo "==> the image in podman (scripts/image-test.sh)"
image_started=$(date +%s)
scripts/image-test.sh
echo "    image test: $(($(date +%s) - image_started)) s"

echo "==> demo (non-interactive), checking its claims"
demo_out=$(mktemp)
if ! scripts/demo.sh --no-build --bin-dir target/debug --detect-timeout 2 >"$demo_out" 2>&1; then
  cat "$demo_out"; echo "scripts/test.sh: the demo failed" >&2; exit 1
fi
demo_fail() { cat "$demo_out"; echo "scripts/test.sh: demo claim failed: $*" >&2; exit 1; }
grep -q 'mTLS hop seen' "$demo_out" || demo_fail "no mTLS hop seen"
stall=$(sed -n 's/.*stall measured: \([0-9]*\) ms.*/\1/p' "$demo_out")
[ -n "$stall" ] && [ "$stall" -ge 2000 ] || demo_fail "stall ${stall:-?} ms < detect timeout 2000 ms"
opaque=$(sed -n 's/.*opaque answer: \([0-9]*\) ms.*/\1/p' "$demo_out")
[ -n "$opaque" ] && [ "$opaque" -lt 1000 ] || demo_fail "opaque answer ${opaque:-?} ms >= 1 s"
grep -q 'traffic shift: 0 client errors, 0 connections closed with an error' "$demo_out" \
  || demo_fail "the weight shift cost clients errors"
grep -q 'get backend  ->  redis-b' "$demo_out" || demo_fail "the weight shift did not move to redis-b"
grep -q 'cleanup complete: 0 demo namespaces left' "$demo_out" || demo_fail "cleanup incomplete"
if ip netns list | grep -q '^mi-demo-' || pgrep -f 'meshinit-demo\.' >/dev/null; then
  demo_fail "a demo namespace or process survived"
fi
echo "    demo: mTLS hop seen, stall ${stall} ms >= 2000 ms, opaque answer ${opaque} ms, traffic shifted to redis-b without errors, cleanup complete"
rm -f "$demo_out"

# Test namespaces are named nt-<test>-<pid>-<n> (benches and the demo use mi-*);
# none may survive its test.
leftover=$(ip netns list | grep -c '^nt-' || true)
if [ "$leftover" -ne 0 ]; then
  echo "scripts/test.sh: network namespaces left behind by tests:" >&2
  ip netns list | grep '^nt-' >&2
  exit 1
fi
echo "==> all tests passed: $(totals); the demo's claims hold"
rm -f "$test_log"
