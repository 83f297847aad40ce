#!/usr/bin/env bash
# meshinit end to end, in throwaway network namespaces.
#
# Builds two "pods" (network namespaces) and one unmeshed namespace on a private
# bridge, runs meshinit in each pod, starts meshproxy beside real servers (an HTTP
# server, Redis, a server-speaks-first service) and shows what the mesh does.
# Everything is removed on exit, Ctrl-C and failure alike.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage (as root): scripts/demo.sh [--keep] [--detect-timeout SECONDS] [--no-build]

Runs the meshinit story end to end in throwaway network namespaces, in 9 stages
(about 25 seconds after the build, 10 of them the detect stall of stage 7 with the
default --detect-timeout; the first release build takes a few minutes more):
  1/9 installs what is missing with apt-get
  2/9 builds meshinit and meshproxy (release), unless --no-build
  3/9 two pods (mi-demo-a, mi-demo-b) and one unmeshed namespace (mi-demo-ext)
      on a private bridge: 198.18.1.0/24 and fd00:1::/64, never the host's network
  4/9 meshinit installs the redirect rules in each pod; the ruleset is shown
  5/9 meshproxy runs in each pod (as uid 2102, mTLS identities from a dev CA),
      beside an HTTP server, Redis (opaque port 6379) and a server-speaks-first
      "banner" service on port 7000
  6/9 HTTP (IPv4 and IPv6) and Redis cross the mesh over mTLS; the /metrics
      lines that changed
  7/9 the banner service stalls for the detect timeout, then answers at once
      once its port is marked opaque; a skip port bypasses the proxy entirely
  8/9 what the proxies counted (/metrics)
  9/9 live traffic shifting (linkerd-tcp's story): redis-benchmark through a
      service address of --discovery while its weights go 100/0 -> 50/50 -> 0/100
      (the file is rewritten, the proxy not restarted), with no client error
Everything is removed on exit, Ctrl-C and failure (unless --keep).

Options:
  --keep                  leave the namespaces and processes up for exploring,
                          and print the commands to enter them; remove them
                          later with: scripts/demo.sh --cleanup
  --cleanup               remove what a --keep run left (namespaces,
                          processes, its temp folder with the dev CA's key)
  --detect-timeout SECS   meshproxy's detect timeout (default 10, Linkerd's)
  --no-build              use the binaries already built (see --bin-dir)
  --bin-dir DIR           where the binaries are (default target/release)
  -h, --help              this text

Run it as root (network namespaces; sudo is not needed and not assumed).
Installs what is missing with apt-get (Debian/Ubuntu).
EOF
}

KEEP=0
BUILD=1
BIN_DIR=
DETECT=10
CLEANUP_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1 ;;
    --cleanup) CLEANUP_ONLY=1 ;;
    --no-build) BUILD=0 ;;
    --bin-dir) BIN_DIR="$2"; shift ;;
    --detect-timeout) DETECT="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "demo.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.."
ROOT=$(pwd)
BIN=$(cd "${BIN_DIR:-$ROOT/target/release}" 2>/dev/null && pwd || echo "${BIN_DIR:-$ROOT/target/release}")
NSES=(mi-demo-a mi-demo-b mi-demo-ext mi-demo-net)
# A --keep run records its temp folder (which holds the dev CA's private key) here, so
# that --cleanup can remove it.
KEPT=/run/meshinit-demo.kept
WORK=
A=198.18.1.1 B=198.18.1.2 EXT=198.18.1.3
A6=fd00:1::1 B6=fd00:1::2

bold= off=
if [ -t 1 ]; then bold=$(tput bold 2>/dev/null || true); off=$(tput sgr0 2>/dev/null || true); fi
stage() { printf '\n%s==> %s%s\n' "$bold" "$*" "$off"; }
say() { printf '    %s\n' "$*"; }
show() { sed 's/^/    | /'; }

cleanup() {
  local rc=$?
  if [ "$KEEP" = 1 ] && [ "$rc" = 0 ]; then
    return
  fi
  exec 2>/dev/null # no "Terminated" notices for the jobs we stop
  for ns in "${NSES[@]}"; do
    {
    if ip netns list | grep -qw "$ns"; then
      # Every process started in the namespace, then the namespace itself.
      ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
      sleep 0.2
      ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
      ip netns del "$ns" 2>/dev/null || true
    fi
    } >/dev/null 2>&1
  done
  if [ -z "${DEMO_KEEP_LOGS:-}" ]; then
    [ -z "$WORK" ] || rm -rf "$WORK"
    if [ -f "$KEPT" ]; then
      kept=$(cat "$KEPT")
      case "$kept" in /tmp/meshinit-demo.*) rm -rf "$kept" ;; esac
      rm -f "$KEPT"
    fi
  fi
  left=$(ip netns list | grep -c '^mi-demo-' || true)
  echo
  echo "cleanup complete: $left demo namespaces left, demo processes stopped"
}

if [ "$(id -u)" -ne 0 ]; then
  echo "demo.sh: run it as root (it creates network namespaces), e.g. from a root shell: scripts/demo.sh" >&2
  exit 1
fi
if [ "$CLEANUP_ONLY" = 1 ]; then
  KEEP=0
  cleanup
  exit 0
fi
WORK=$(mktemp -d /tmp/meshinit-demo.XXXXXX)
chmod 755 "$WORK" # the proxies run as uid 2102 and read their identities from here
trap cleanup EXIT
trap 'exit 130' INT TERM

spin() { # spin PID MESSAGE: a spinner while a long stage runs
  local pid=$1 msg=$2 i=0 chars='|/-\'
  while kill -0 "$pid" 2>/dev/null; do
    if [ -t 1 ]; then printf '\r    %s %s' "${chars:i++%4:1}" "$msg"; fi
    sleep 0.2
  done
  if [ -t 1 ]; then printf '\r'; fi
  wait "$pid"
}

stage "1/9 installing what is missing"
need=(nftables iproute2 redis-server redis-tools curl python3 util-linux)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "apt-get install ${missing[*]}"
  (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null) &
  spin $! "installing ${missing[*]}"
else
  say "everything is installed"
fi

if [ "$BUILD" = 1 ]; then
  stage "2/9 building meshinit and meshproxy (release)"
  (cargo build --release --locked -q -p meshinit -p meshproxy >"$WORK/build.log" 2>&1) &
  spin $! "cargo build --release" || { cat "$WORK/build.log"; exit 1; }
  say "built $BIN/meshinit and $BIN/meshproxy"
else
  stage "2/9 using the binaries in $BIN"
fi

stage "3/9 building two pods and an unmeshed namespace"
for ns in "${NSES[@]}"; do
  ip netns del "$ns" 2>/dev/null || true
  ip netns add "$ns"
  ip -n "$ns" link set lo up
done
ip -n mi-demo-net link add br0 type bridge
ip -n mi-demo-net link set br0 up
i=0
for pod in a b ext; do
  i=$((i + 1))
  ip -n "mi-demo-$pod" link add eth0 type veth peer name "v$pod" netns mi-demo-net
  ip -n "mi-demo-$pod" addr add "198.18.1.$i/24" dev eth0
  ip -n "mi-demo-$pod" addr add "fd00:1::$i/64" dev eth0 nodad
  ip -n "mi-demo-$pod" link set eth0 up
  ip -n mi-demo-net link set "v$pod" master br0 up
done
say "mi-demo-a   (pod A, client)   $A  $A6"
say "mi-demo-b   (pod B, servers)  $B  $B6"
say "mi-demo-ext (not meshed)      $EXT"
say "linked by a bridge in mi-demo-net; nothing touches the host's network"

in_ns() { local ns=$1; shift; ip netns exec "mi-demo-$ns" "$@"; }

stage "4/9 meshinit: redirect rules in each pod"
for pod in a b; do
  "$BIN/meshinit" --netns "/var/run/netns/mi-demo-$pod" --outbound-ports-to-ignore 9000 \
    --inbound-ports-to-ignore 4190,4191,9000 2>"$WORK/meshinit-$pod.log"
done
say "meshinit --netns /var/run/netns/mi-demo-b --outbound-ports-to-ignore 9000 --inbound-ports-to-ignore 4190,4191,9000"
say "installed in pod B (nft list table inet meshinit):"
in_ns b nft list table inet meshinit | show
say "inbound TCP -> :4143, outbound TCP -> :4140; port 9000 skipped both ways;"
say "the proxy's uid 2102 and loopback are exempt. 'meshinit check' confirms:"
"$BIN/meshinit" check --netns /var/run/netns/mi-demo-b --outbound-ports-to-ignore 9000 \
  --inbound-ports-to-ignore 4190,4191,9000 2>/dev/null | show

stage "5/9 servers and proxies"
# Servers in pod B. The banner service speaks first, like SMTP or MySQL.
cat >"$WORK/banner.py" <<'PY'
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1]))); s.listen(64)
while True:
    c, _ = s.accept()
    c.sendall(b"220 banner ready\r\n")
    c.close()
PY
mkdir -p "$WORK/www" && echo "hello from pod B" >"$WORK/www/index.html"
in_ns b python3 -m http.server 8080 --bind :: --directory "$WORK/www" >/dev/null 2>&1 &
in_ns b redis-server --port 6379 --bind 0.0.0.0 --protected-mode no --save '' --appendonly no >/dev/null 2>&1 &
in_ns b python3 "$WORK/banner.py" 7000 >/dev/null 2>&1 &
in_ns b python3 "$WORK/banner.py" 9000 >/dev/null 2>&1 &
disown -a # they are stopped with their namespace, without job notices

# Identities from a throwaway dev CA: each pod gets a certificate whose DNS SAN
# is its identity, and a list of the meshed peers it may expect.
"$BIN/meshproxy" identity new-ca "$WORK/ca" >/dev/null
for pod in a b; do
  # The key is mode 0600: --owner gives it to the proxy's uid.
  "$BIN/meshproxy" identity issue --ca "$WORK/ca" "$pod.demo.mesh.local" --out "$WORK/id-$pod" \
    --owner 2102:2102 >/dev/null
done
printf '[[peer]]\nnet = "%s/32"\nidentity = "b.demo.mesh.local"\n[[peer]]\nnet = "%s/128"\nidentity = "b.demo.mesh.local"\n' "$B" "$B6" >"$WORK/peers-a.toml"
printf '[[peer]]\nnet = "%s/32"\nidentity = "a.demo.mesh.local"\n[[peer]]\nnet = "%s/128"\nidentity = "a.demo.mesh.local"\n' "$A" "$A6" >"$WORK/peers-b.toml"

OPAQUE_DEFAULT=25,587,3306,4444,5432,6379,9300,11211
start_proxy() { # start_proxy POD OPAQUE_PORTS [EXTRA ARGS...]
  local pod=$1 opaque=$2; shift 2
  # Started directly (not through a shell function) so that $! is the proxy itself.
  ip netns exec "mi-demo-$pod" setpriv --reuid=2102 --regid=2102 --clear-groups \
    "$BIN/meshproxy" --opaque-ports "$opaque" --detect-timeout "${DETECT}s" "$@" \
    --admin-addr 0.0.0.0:4191 --trust-anchors "$WORK/ca/ca.crt" \
    --identity-cert "$WORK/id-$pod/$pod.demo.mesh.local.crt" \
    --identity-key "$WORK/id-$pod/$pod.demo.mesh.local.key" \
    --mesh-peers "$WORK/peers-$pod.toml" >>"$WORK/proxy-$pod.log" 2>&1 &
  echo $! >"$WORK/proxy-$pod.pid"
  disown
}
stop_proxy() { # SIGTERM, then wait until it is gone (it drains its connections first)
  local pid; pid=$(cat "$WORK/proxy-$1.pid")
  kill "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
}
wait_ready() { # wait_ready POD
  for _ in $(seq 50); do
    in_ns "$1" curl -sf -o /dev/null "http://127.0.0.1:4191/ready" && return 0
    sleep 0.1
  done
  echo "meshproxy in pod $1 did not become ready:"; cat "$WORK/proxy-$1.log"; exit 1
}
for pod in a b; do start_proxy "$pod" "$OPAQUE_DEFAULT"; done
for pod in a b; do wait_ready "$pod"; done
wait_port() { # wait_port PORT: until a server in pod B listens (checked over lo, which is exempt)
  for _ in $(seq 100); do
    in_ns b bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on pod B's port $1"; exit 1
}
for port in 8080 6379 7000 9000; do wait_port "$port"; done
say "pod B: HTTP on :8080, Redis on :6379 (opaque), banner on :7000 (not opaque) and :9000 (skipped)"
say "meshproxy in both pods, running as uid 2102, detect timeout ${DETECT}s,"
say "with identities a.demo.mesh.local / b.demo.mesh.local from a throwaway dev CA:"
say "pod A -> pod B is wrapped in mutual TLS (peer port 4143, ALPN transport.l5d.io/v1)"

metrics() { in_ns "$1" curl -s "http://127.0.0.1:4191/metrics"; }
metrics a >"$WORK/metrics-a.before"; metrics b >"$WORK/metrics-b.before"

stage "6/9 traffic across the mesh"
say "pod A: curl http://$B:8080/"
in_ns a curl -s --max-time 20 "http://$B:8080/" | show
say "pod A: curl http://[$B6]:8080/  (IPv6, same path)"
in_ns a curl -s --max-time 20 "http://[$B6]:8080/" | show
say "pod A: redis-cli -h $B SET/GET  (6379 is opaque: no detection, no delay)"
start=$(date +%s%N)
in_ns a redis-cli -h "$B" -p 6379 set greeting "hello through the mesh" | show
in_ns a redis-cli -h "$B" -p 6379 get greeting | show
say "redis round trips took $(( ($(date +%s%N) - start) / 1000000 )) ms"
say "mi-demo-ext (unmeshed): curl http://$B:8080/ still works, through B's inbound proxy"
in_ns ext curl -s --max-time 20 "http://$B:8080/" | show

changed() { # changed POD DIRECTION BEFORE AFTER: metric lines that are new or changed
  grep -E '^tcp_(open_total|read_bytes_total|write_bytes_total)\{' "$4" | grep "direction=\"$2\"" \
    | grep -vxFf "$3" | sort | show || true
}
say "pod A's outbound proxy counted (tcp_* lines that changed):"
metrics a >"$WORK/metrics-a.mid"; metrics b >"$WORK/metrics-b.mid"
changed a outbound "$WORK/metrics-a.before" "$WORK/metrics-a.mid"
say "pod B's inbound proxy counted:"
changed b inbound "$WORK/metrics-b.before" "$WORK/metrics-b.mid"
say "protocol: http1 detected from the request line; opaque for Redis (no detection); on B,"
say "http2 for the pooled mTLS connection that carries A's HTTP requests (one per destination);"
say "tls=\"true\": the hop between the pods was mutual TLS, with the peer's verified identity"
say "(server_id on A, client_id on B); the unmeshed namespace's request is tls=\"false\"."
if grep -q 'tls="true",client_id="a.demo.mesh.local"' "$WORK/metrics-b.mid"; then
  say "mTLS hop seen: B's inbound proxy verified client a.demo.mesh.local"
else
  say "no mTLS hop in B's metrics: the mesh is not working"; exit 1
fi
http_lines() { # http_lines DIRECTION FILE: the request-level counters of HTTP traffic
  grep -E '^(request_total|response_total)\{' "$2" | grep "direction=\"$1\"" | sort | show || true
}
say "each HTTP request is counted as well (request_total, response_total: Linkerd's names):"
say "pod A outbound:"
if grep -q '^request_total{direction="outbound".*tls="true"' "$WORK/metrics-a.mid"; then
  http_lines outbound "$WORK/metrics-a.mid"
else
  say "no meshed request_total on A: HTTP to a mesh peer is not proxied request by request"; exit 1
fi
say "pod B inbound (A's requests over mTLS, HTTP/1 carried as HTTP/2 with l5d-orig-proto;"
say "the unmeshed namespace's request in plaintext):"
http_lines inbound "$WORK/metrics-b.mid"

greeting_ms() { # time until the banner service's greeting arrives, from pod A
  in_ns a python3 - "$1" <<'PY'
import socket, sys, time
t = time.monotonic()
s = socket.create_connection((sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 7000), timeout=60)
data = s.recv(64)
print(f"{(time.monotonic() - t) * 1000:.0f} {data.decode().strip()}")
PY
}

stage "7/9 server-speaks-first: the detect stall, and opaque ports"
say "pod A connects to the banner on $B:7000 and waits for its greeting."
say "Pod A's outbound proxy waits for the client's first bytes to detect the protocol,"
say "but the client is waiting for the server: nothing moves until the detect timeout."
say "(Only pod A's outbound proxy waits: pod B's learns the protocol from the mTLS"
say "transport header and does not detect again.)"
read -r ms text < <(greeting_ms "$B")
say "greeting \"$text\" after ${ms} ms  (stall measured: ${ms} ms, detect timeout ${DETECT}s)"
say "restarting both proxies with 7000 added to --opaque-ports ..."
for pod in a b; do stop_proxy "$pod"; start_proxy "$pod" "$OPAQUE_DEFAULT,7000"; done
for pod in a b; do wait_ready "$pod"; done
read -r ms text < <(greeting_ms "$B")
say "greeting \"$text\" after ${ms} ms  (opaque answer: ${ms} ms)"
say "skip port 9000 bypasses both proxies entirely (no proxy, no metrics):"
read -r ms text < <(in_ns a python3 -c "
import socket, time
t = time.monotonic(); s = socket.create_connection(('$B', 9000), timeout=10); d = s.recv(64)
print(f'{(time.monotonic() - t) * 1000:.0f} {d.decode().strip()}')")
say "greeting \"$text\" after ${ms} ms on :9000"

stage "8/9 what the proxies counted after the restart (/metrics)"
metrics a >"$WORK/metrics-a.after"; metrics b >"$WORK/metrics-b.after"
: >"$WORK/empty"
say "pod A outbound, since the restart (7000 now opaque: no detect_results for it):"
changed a outbound "$WORK/empty" "$WORK/metrics-a.after"
say "pod B inbound, since the restart:"
changed b inbound "$WORK/empty" "$WORK/metrics-b.after"
if grep -q 'target_addr="[^"]*:9000"' "$WORK/metrics-a.after" "$WORK/metrics-b.after"; then
  say "port 9000 appears in the metrics: the skip port did NOT bypass the proxy"
  exit 1
fi
say "no series for port 9000: skip ports never reach the proxy"

stage "9/9 live traffic shifting (--discovery): linkerd-tcp's Redis story"
# Two Redis "clusters" in pod B (redis-a on :6379, redis-b on :6380), each answering
# with its own name, behind one service address that exists nowhere: pod A only has a
# route towards B for it, and its proxy balances the connections.
SVC=198.18.100.10
in_ns b redis-server --port 6380 --bind 0.0.0.0 --protected-mode no --save '' --appendonly no >/dev/null 2>&1 &
disown -a
wait_port 6380
in_ns b redis-cli -p 6379 set backend redis-a >/dev/null
in_ns b redis-cli -p 6380 set backend redis-b >/dev/null
ip -n mi-demo-a route add 198.18.100.0/24 via "$B"
discovery() { # discovery WEIGHT_A WEIGHT_B: write the file as an agent would (rename over)
  cat >"$WORK/discovery.new" <<TOML
[[service]]
name = "redis"
addrs = ["$SVC:6379"]
protocol = "opaque"
[[service.backend]]
name = "redis-a"
weight = $1
endpoints = [ { addr = "$B:6379", identity = "b.demo.mesh.local" } ]
[[service.backend]]
name = "redis-b"
weight = $2
endpoints = [ { addr = "$B:6380", identity = "b.demo.mesh.local" } ]
TOML
  mv "$WORK/discovery.new" "$WORK/discovery.toml"
}
discovery 100 0
"$BIN/meshproxy" discovery check "$WORK/discovery.toml" | show
stop_proxy a
start_proxy a "$OPAQUE_DEFAULT,7000" --discovery "$WORK/discovery.toml"
wait_ready a
say "pod A's proxy now reads $WORK/discovery.toml: service redis at $SVC:6379,"
say "backends redis-a ($B:6379) and redis-b ($B:6380), both reached over mTLS"
say "redis-cli -h $SVC get backend  ->  $(in_ns a redis-cli -h "$SVC" get backend)"
per_backend() { # connections per backend so far, from pod A's /metrics
  metrics a | awk '/^tcp_open_total\{.*dst_service="redis"/ {
      match($0, /dst_backend="[^"]*"/); b = substr($0, RSTART + 13, RLENGTH - 14); n[b] += $NF }
    END { printf "redis-a=%d redis-b=%d", n["redis-a"], n["redis-b"] }'
}
say "redis-benchmark from pod A, a new connection per request (-k 0), while the"
say "weights change every 2 s by rewriting the file; nothing is restarted:"
in_ns a redis-benchmark -h "$SVC" -p 6379 -c 8 -n 100000000 -k 0 -t get -q \
  >"$WORK/benchmark.out" 2>&1 &
bench=$!
disown
for weights in "100 0" "50 50" "0 100"; do
  # shellcheck disable=SC2086 # two words on purpose
  discovery $weights
  before=$(per_backend)
  sleep 2
  say "weights ${weights/ //}: connections so far $before -> $(per_backend)"
done
kill "$bench" 2>/dev/null || true # TERM: a background job of a script ignores INT
while kill -0 "$bench" 2>/dev/null; do sleep 0.05; done
say "redis-cli -h $SVC get backend  ->  $(in_ns a redis-cli -h "$SVC" get backend)"
errors=$(grep -ciE 'error|could not' "$WORK/benchmark.out" || true)
failed=$(metrics a | awk '/^tcp_close_total\{.*dst_service="redis"/ && !/errno=""/ { n += $NF } END { print n + 0 }')
say "balancer_endpoints and discovery_updates_total on pod A:"
metrics a | grep -E '^(balancer_endpoints|discovery_updates_total)' | show
say "traffic shift: $errors client errors, $failed connections closed with an error"
if [ "$errors" != 0 ] || [ "$failed" != 0 ]; then
  cat "$WORK/benchmark.out"
  exit 1
fi

if [ "$KEEP" = 1 ]; then
  stage "left running (--keep)"
  echo "$WORK" >"$KEPT"
  say "as root:"
  say "enter a pod:        ip netns exec mi-demo-a bash"
  say "see its rules:      ip netns exec mi-demo-b nft list table inet meshinit"
  say "proxy metrics:      ip netns exec mi-demo-a curl -s 127.0.0.1:4191/metrics"
  say "files (dev CA key): $WORK"
  say "remove everything:  scripts/demo.sh --cleanup"
fi
