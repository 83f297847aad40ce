#!/usr/bin/env bash
# The image in a real container runtime (Debian's podman with runc and the CNI
# plugins), run by scripts/test.sh:
#
#   1. capabilities: `meshinit apply` in the image with --cap-drop all
#      --cap-add NET_ADMIN works with nft and iptables-nft, iptables-legacy needs
#      NET_RAW too, none fails naming the capability; a read-only /run is an error;
#   2. `podman kube play` of deploy/pod-classic.yaml (meshinit, validator, meshproxy,
#      an application) for two pods: the application's outbound (mTLS to the meshed
#      peer) and inbound traffic go through the proxies (their /metrics), and the
#      application's very first request, made as it starts, already succeeds;
#   3. a podman CNI network whose conflist chains meshinit-cni after bridge +
#      host-local: containers get the rules with no init container, CHECK detects a
#      removed rule, a broken meshinit config fails ADD and DEL still releases the
#      IPAM lease;
#   4. deploy/cni-daemonset.yaml's install step copies the plugin and the conflist.
#
# Everything runs inside a network namespace this script creates (podman runs
# under `nsenter --net`, not `ip netns exec`, which remounts /sys and hides the
# cgroup mounts runc needs), with podman's storage, run and CNI directories under a
# temporary directory: the host's network, rules and podman state are untouched.
# This machine's quirks are handled here: crun refuses cgroups in hybrid mode, so
# runc; podman's default RLIMIT_NPROC/NOFILE are above what an unprivileged-
# resource process may set, so the defaults are this shell's limits.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN_DIR=${BIN_DIR:-target/debug}
KV=${KUBERNETES_VALIDATE_VENV:-target/kubernetes-validate}
started=$(date +%s)
NS=nt-image-$$
WORK=$(mktemp -d /tmp/meshinit-image-test.XXXXXX)
TAG=localhost/meshinit:test
APP=localhost/meshinit-testapp:test
SUBNET=198.18.64
export CONTAINERS_CONF="$WORK/containers.conf"
PODMAN=(podman --root "$WORK/storage" --runroot "$WORK/run")
in_ns() { nsenter --net="/run/netns/$NS" "$@"; }
pm() { in_ns "${PODMAN[@]}" "$@"; }
fail() { echo "scripts/image-test.sh: FAIL: $*" >&2; exit 1; }
step() { echo "==> $* ($(($(date +%s) - started)) s)"; }

cleanup() {
  set +e
  pm pod rm --all --force --time 0 >/dev/null 2>&1
  pm rm --all --force --time 0 >/dev/null 2>&1
  pm system reset --force >/dev/null 2>&1
  ip netns del "$NS" 2>/dev/null
  # overlay mounts podman may leave under the storage directory
  grep -o " $WORK[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
  rm -rf "$WORK"
}
# KEEP=1 leaves everything in place for debugging (remove it by hand).
[ "${KEEP:-0}" = 1 ] && echo "KEEP: WORK=$WORK NS=$NS" || trap cleanup EXIT

for tool in podman runc mmdebstrap nsenter curl; do
  command -v "$tool" >/dev/null || fail "$tool not found"
done
[ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] || fail "containernetworking-plugins missing"
[ -x "$KV/bin/python" ] || fail "no $KV (scripts/test.sh makes that venv)"

mkdir -p "$WORK/cni" "$WORK/cni-bin" "$WORK/ids" "$WORK/run"
ln -s /usr/lib/cni/* "$WORK/cni-bin/"
ln -s "$(realpath "$BIN_DIR/meshinit")" "$WORK/cni-bin/meshinit-cni"
nofile=$(ulimit -Hn)
nproc=$(( $(ulimit -Hu) < 4096 ? $(ulimit -Hu) : 4096 ))
cat >"$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
pids_limit = 0
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
[network]
network_backend = "cni"
network_config_dir = "$WORK/cni"
cni_plugin_dirs = ["$WORK/cni-bin"]
EOF
ip netns add "$NS"
in_ns ip link set lo up

step "image (scripts/image.sh, rootfs cached in target/image-cache)"
# Outside the test namespace: mmdebstrap fetches from Debian's mirror (first run
# only), and `podman import` does no networking.
PODMAN_OPTS="--root $WORK/storage --runroot $WORK/run" \
  scripts/image.sh --no-build --bin-dir "$BIN_DIR" --tag "$TAG"
# The test application: the image plus a static busybox (httpd, nc, sh), run as
# uid 1000 (not the proxy's 2102, whose traffic is exempt from redirection).
cid=$(pm create "$TAG")
pm cp /bin/busybox "$cid:/usr/local/bin/busybox"
pm commit --quiet --change 'USER 1000:1000' --change 'ENTRYPOINT []' "$cid" "$APP" >/dev/null
pm rm "$cid" >/dev/null

# ---------------------------------------------------------------------------
step "1. capabilities of the image"
run_meshinit() { # CAPS... -- ARGS...
  local caps=()
  while [ "$1" != -- ]; do caps+=(--cap-add "$1"); shift; done
  shift
  pm run --rm --network none --user 0:0 --read-only --cap-drop all "${caps[@]}" \
    --entrypoint /usr/local/bin/meshinit "$TAG" "$@"
}
for backend in nft iptables-nft; do
  run_meshinit NET_ADMIN -- apply --backend "$backend" >"$WORK/out" 2>&1 \
    || { cat "$WORK/out"; fail "apply --backend $backend with only NET_ADMIN"; }
  grep -q "applied redirect rules backend=\"$backend\"" "$WORK/out" || { cat "$WORK/out"; fail "$backend: no rules"; }
  echo "    NET_ADMIN only: apply --backend $backend ok"
done
if run_meshinit NET_ADMIN -- apply --backend iptables-legacy >"$WORK/out" 2>&1; then
  fail "iptables-legacy worked without NET_RAW"
fi
grep -q 'needs CAP_NET_RAW' "$WORK/out" || { cat "$WORK/out"; fail "no message naming CAP_NET_RAW"; }
run_meshinit NET_ADMIN NET_RAW -- apply --backend iptables-legacy >"$WORK/out" 2>&1 \
  || { cat "$WORK/out"; fail "iptables-legacy with NET_ADMIN NET_RAW"; }
echo "    iptables-legacy: refused without NET_RAW (named), ok with it"
set +e
run_meshinit -- apply >"$WORK/out" 2>&1; rc=$?
set -e
[ "$rc" = 1 ] && grep -q 'needs CAP_NET_ADMIN' "$WORK/out" || { cat "$WORK/out"; fail "no capability: exit $rc"; }
echo "    no capability: exit 1, $(grep -o 'applying rules needs CAP_NET_ADMIN' "$WORK/out")"
# A read-only root filesystem and no writable /run (podman's default tmpfs off).
set +e
pm run --rm --network none --user 0:0 --read-only --read-only-tmpfs=false --cap-drop all \
  --cap-add NET_ADMIN --entrypoint /usr/local/bin/meshinit "$TAG" apply >"$WORK/out" 2>&1; rc=$?
set -e
[ "$rc" = 1 ] && grep -q 'cannot create the lock file /run/meshinit.lock: Read-only file system' "$WORK/out" \
  || { cat "$WORK/out"; fail "read-only /run: exit $rc"; }
echo "    read-only /run: exit 1, lock error"
# The validator and the proxy run with no capability at all (the proxy as 2102).
pm run --rm --network none --user 65534:65534 --cap-drop all --read-only \
  --entrypoint /usr/local/bin/meshinit "$TAG" show >/dev/null || fail "show as nobody"
echo "    validator and show need no capability"

# ---------------------------------------------------------------------------
step "2. podman kube play deploy/pod-classic.yaml: two meshed pods"
# A CNI network of our own (not `podman network create`, whose host-local leases
# would live in the host's /var/lib/cni/networks): bridge + host-local, leases
# under $WORK.
cat >"$WORK/cni/meshtest.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "meshtest",
  "plugins": [
    {
      "type": "bridge", "bridge": "meshtest", "isGateway": true,
      "ipam": {
        "type": "host-local", "dataDir": "$WORK/ipam",
        "ranges": [[{"subnet": "$SUBNET.0/24", "gateway": "$SUBNET.1"}]], "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
JSON
# A throwaway CA and one identity per pod, readable by the proxy's uid.
"$BIN_DIR/meshproxy" identity new-ca "$WORK/ids" >/dev/null
for pod in web peer; do
  "$BIN_DIR/meshproxy" identity issue --ca "$WORK/ids" "$pod.default.mesh.local" >/dev/null
done
cat >"$WORK/ids/peers.toml" <<TOML
[[peer]]
net = "$SUBNET.10"
identity = "web.default.mesh.local"
[[peer]]
net = "$SUBNET.20"
identity = "peer.default.mesh.local"
TOML
rm "$WORK/ids/ca.key"
chown -R 2102:2102 "$WORK/ids"
# The shipped manifest, with only what a test must change: local images, the
# identity flags and their volume, and a busybox application that makes its first
# outbound request (to the other pod) the moment it starts, then serves HTTP.
transform() { # POD FIRST_REQUEST_URL
  "$KV/bin/python" - "$1" "$2" "$TAG" "$APP" "$WORK/ids" <<'PY'
import sys, yaml
pod, first, image, app_image, ids = sys.argv[1:]
doc = yaml.safe_load(open("deploy/pod-classic.yaml"))
doc["metadata"]["name"] = pod
spec = doc["spec"]
# podman 4.3 applies the pod's restartPolicy (Always by default) to init
# containers too, restarting a finished meshinit forever: the kubelet does not.
spec["restartPolicy"] = "OnFailure"
# podman 4.3 publishes every containerPort on the host (here: the test's
# namespace) as if it had a hostPort, so two pods cannot both declare port 80.
for c in spec["containers"]:
    c.pop("ports", None)
for c in spec["initContainers"] + spec["containers"]:
    if c["image"] == "meshinit:latest":
        c["image"] = image
proxy = next(c for c in spec["containers"] if c["name"] == "meshproxy")
ident = f"/identity/{pod}.default.mesh.local"
proxy["args"] += [f"--identity-cert={ident}.crt", f"--identity-key={ident}.key",
                  "--trust-anchors=/identity/ca.crt", "--mesh-peers=/identity/peers.toml"]
proxy["volumeMounts"] = [{"name": "identity", "mountPath": "/identity", "readOnly": True}]
spec["volumes"].append({"name": "identity", "hostPath": {"path": ids, "type": "Directory"}})
app = next(c for c in spec["containers"] if c["name"] == "app")
app["image"] = app_image
# podman 4.3 ignores postStart hooks: the application waits for the proxy itself
# by running under `meshproxy await` (the README's podman note).
www = "/tmp/www"
script = f"mkdir -p {www} && echo {pod} > {www}/index.html && "
if first:
    script += (f"if printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 5 {first} > {www}/first"
               f" && grep -q '200 OK' {www}/first; then echo ok; else echo failed; fi > {www}/first-status && ")
script += f"exec busybox httpd -f -p 8080 -h {www}"
app["command"] = ["/usr/local/bin/meshproxy", "await", "--timeout=60s", "--",
                  "/usr/local/bin/busybox", "sh", "-c", script]
app["env"] = [{"name": "PATH", "value": "/usr/local/bin"}]
# The application listed first, so podman starts it before the proxy: the
# guard must not depend on the start order (without `meshproxy await` this
# first request is refused: the rules are in place, the proxy is not).
spec["containers"].sort(key=lambda c: c["name"] != "app")
yaml.safe_dump(doc, sys.stdout)
PY
}
transform peer "" >"$WORK/peer.yaml"
transform web "$SUBNET.20 8080" >"$WORK/web.yaml"
pm kube play --network meshtest --ip "$SUBNET.20" "$WORK/peer.yaml" >"$WORK/out" 2>&1 || { cat "$WORK/out"; fail "kube play peer"; }
pm kube play --network meshtest --ip "$SUBNET.10" "$WORK/web.yaml" >"$WORK/out" 2>&1 || { cat "$WORK/out"; fail "kube play web"; }

# The init containers ran to completion, in order, before the proxy and the app.
for pod in peer web; do
  for c in meshinit meshinit-validate; do
    state=$(pm inspect "$pod-$c" --format '{{.State.Status}} {{.State.ExitCode}}' 2>/dev/null || echo "removed 0")
    case "$state" in "exited 0"|"removed 0") ;; *) pm logs "$pod-$c" || true; fail "$pod-$c: $state" ;; esac
  done
done
http() { in_ns curl -sS --max-time 5 "$@"; }
wait_for() { # URL: until the app answers (it starts behind `meshproxy await`); -f: the
  # inbound proxy itself answers 502 while nothing listens on the app's port yet
  for _ in $(seq 100); do http -f -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done
  pm logs web-app || true; fail "nothing answers $1"
}
wait_for "http://$SUBNET.10:8080/"
# Inbound: from outside the pod to the app's port, through web's inbound proxy.
[ "$(http "http://$SUBNET.10:8080/")" = web ] || fail "inbound answer"
# The app's first outbound request, made as it started, went through (mTLS).
status=$(http "http://$SUBNET.10:8080/first-status")
[ "$status" = ok ] || { http "http://$SUBNET.10:8080/first" || true; fail "the app's first request: $status"; }
# And a later one, from inside the app container.
pm exec web-app busybox sh -c "printf 'GET / HTTP/1.0\r\n\r\n' | busybox nc -w 5 $SUBNET.20 8080" | grep -q '^peer' \
  || fail "outbound from the app"
web_metrics=$(http "http://$SUBNET.10:4191/metrics")
peer_metrics=$(http "http://$SUBNET.20:4191/metrics")
expect() { # WHAT METRICS REGEX
  grep -Eq "$3" <<<"$2" || { grep -E '^tcp_open_total' <<<"$2" >&2; fail "$1: no $3"; }
  echo "    $1: $(grep -E "$3" <<<"$2" | head -1)"
}
expect "web outbound, mTLS" "$web_metrics" \
  "^tcp_open_total\\{direction=\"outbound\",target_addr=\"$SUBNET.20:8080\",protocol=\"http1\",tls=\"true\",server_id=\"peer.default.mesh.local\"\\} [2-9]"
expect "web inbound" "$web_metrics" \
  "^tcp_open_total\\{direction=\"inbound\",target_addr=\"$SUBNET.10:8080\",protocol=\"http1\",tls=\"false\"\\} [1-9]"
# Between the proxies the app's HTTP/1 requests share one pooled mTLS HTTP/2
# connection, and the peer's inbound proxy counts each request under web's identity.
expect "peer inbound, mTLS" "$peer_metrics" \
  "^tcp_open_total\\{direction=\"inbound\",target_addr=\"$SUBNET.20:8080\",protocol=\"http2\",tls=\"true\",client_id=\"web.default.mesh.local\"\\} [1-9]"
expect "peer inbound, mTLS requests" "$peer_metrics" \
  "^request_total\\{direction=\"inbound\",target_addr=\"$SUBNET.20:8080\",.*tls=\"true\",.*client_id=\"web.default.mesh.local\".*\\} [2-9]"
pm pod rm --force --time 0 web peer >/dev/null 2>&1

# ---------------------------------------------------------------------------
step "3. a podman CNI network chaining meshinit-cni after bridge + host-local"
conflist() { # NAME OCTET MESHINIT_SETTINGS_JSON
  cat >"$WORK/cni/$1.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "$1",
  "plugins": [
    {
      "type": "bridge", "bridge": "$1", "isGateway": true,
      "ipam": {
        "type": "host-local", "dataDir": "$WORK/ipam",
        "ranges": [[{"subnet": "198.18.$2.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    { "type": "meshinit-cni", "meshinit": $3 }
  ]
}
JSON
}
conflist meshcni 65 '{"proxy_uid": 2102, "outbound_ports_to_ignore": "5432", "backend": "nft"}'
leases() { # NETWORK: the addresses host-local holds
  find "$WORK/ipam/$1" -maxdepth 1 -name '198.18.*' -printf '%f\n' 2>/dev/null | sort | tr '\n' ' '
}
# No init container: the image's entrypoint (meshproxy) and nothing else.
pm run -d --name cni1 --network meshcni "$TAG" >/dev/null || fail "run on meshcni"
sandbox=$(pm inspect cni1 --format '{{.NetworkSettings.SandboxKey}}')
ip=$(pm inspect cni1 --format '{{(index .NetworkSettings.Networks "meshcni").IPAddress}}')
[ -n "$sandbox" ] && [ -n "$ip" ] || fail "no sandbox/address for cni1"
[ "$(leases meshcni)" = "$ip " ] || fail "lease of $ip: $(leases meshcni)"
ruleset=$(nsenter --net="$sandbox" nft list table inet meshinit) || fail "no meshinit table in cni1's namespace"
grep -q 'redirect to :4140' <<<"$ruleset" && grep -q 'redirect to :4143' <<<"$ruleset" && grep -q 5432 <<<"$ruleset" \
  || { echo "$ruleset"; fail "cni1's rules"; }
echo "    cni1 ($ip): rules installed by the CNI ADD, no init container"
# CHECK, as the runtime would send it: the plugin's config with prevResult.
cni_check() {
  local conf
  conf=$("$KV/bin/python" - "$WORK/cni/meshcni.conflist" "$ip" <<'PY'
import json, sys
conflist = json.load(open(sys.argv[1]))
conf = dict(conflist["plugins"][-1], cniVersion=conflist["cniVersion"], name=conflist["name"])
conf["prevResult"] = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
                      "ips": [{"address": sys.argv[2] + "/24", "interface": 0}]}
print(json.dumps(conf))
PY
)
  CNI_COMMAND=CHECK CNI_CONTAINERID=cni1 CNI_NETNS="$sandbox" CNI_IFNAME=eth0 CNI_PATH="$WORK/cni-bin" \
    "$WORK/cni-bin/meshinit-cni" <<<"$conf"
}
cni_check >"$WORK/out" 2>&1 || { cat "$WORK/out"; fail "CHECK of intact rules"; }
handle=$(nsenter --net="$sandbox" nft -a list table inet meshinit | grep 'redirect to :4140' | head -1 | sed 's/.*# handle //')
chain=$(nsenter --net="$sandbox" nft -a list table inet meshinit | awk -v h="# handle $handle" '/chain /{c=$2} index($0,h){print c; exit}')
nsenter --net="$sandbox" nft delete rule inet meshinit "$chain" handle "$handle"
if cni_check >"$WORK/out" 2>&1; then fail "CHECK passed with the outbound redirect removed"; fi
echo "    CHECK: ok when intact; after deleting the rule in $chain: $(grep -o '"msg": *"[^"]*"' "$WORK/out" | head -1 | cut -c1-120)"
pm rm --force --time 0 cni1 >/dev/null
[ -z "$(leases meshcni)" ] || fail "lease kept after the container was removed: $(leases meshcni)"
echo "    removed: lease released"

# A broken meshinit setting: ADD fails (the container does not start), and the
# DEL the runtime sends next still releases the bridge's IPAM lease.
conflist meshbad 66 '{"proxy_uid": 2102, "outbound_ports_to_ignore": "99999"}'
if pm run -d --name cni2 --network meshbad "$TAG" >"$WORK/out" 2>&1; then
  fail "a container started on a network with a broken meshinit config"
fi
grep -q 99999 "$WORK/out" || { cat "$WORK/out"; fail "the ADD error does not name 99999"; }
echo "    broken config: ADD fails: $(grep -o '[^:]*99999[^"]*' "$WORK/out" | head -1 | cut -c1-140)"
[ -z "$(leases meshbad)" ] || fail "the IPAM lease was not released: $(leases meshbad)"
echo "    broken config: no IPAM lease left (DEL succeeded)"
pm rm --force --time 0 cni2 >/dev/null 2>&1 || true

# ---------------------------------------------------------------------------
step "4. deploy/cni-daemonset.yaml's install step, run in the image"
mkdir -p "$WORK/node/bin" "$WORK/node/net.d" "$WORK/node/config"
"$KV/bin/python" - "$WORK/node" <<'PY'
import sys, yaml
docs = list(yaml.safe_load_all(open("deploy/cni-daemonset.yaml")))
config = next(d for d in docs if d["kind"] == "ConfigMap")
for name, text in config["data"].items():
    open(f"{sys.argv[1]}/config/{name}", "w").write(text)
ds = next(d for d in docs if d["kind"] == "DaemonSet")
install = ds["spec"]["template"]["spec"]["initContainers"][0]
caps = install["securityContext"]["capabilities"]["add"]
open(f"{sys.argv[1]}/command", "w").write("\0".join(install["command"]))
open(f"{sys.argv[1]}/caps", "w").write(",".join(caps))
PY
mapfile -d '' -t install <"$WORK/node/command"
pm run --rm --network none --user 0:0 --read-only --cap-drop all --cap-add "$(cat "$WORK/node/caps")" \
  -v "$WORK/node/bin:/host/opt/cni/bin" -v "$WORK/node/net.d:/host/etc/cni/net.d" \
  -v "$WORK/node/config:/config:ro" --entrypoint "${install[0]}" "$TAG" "${install[@]:1}" \
  || fail "the DaemonSet's install step"
cmp -s "$WORK/node/bin/meshinit-cni" "$BIN_DIR/meshinit" && [ -x "$WORK/node/bin/meshinit-cni" ] \
  || fail "meshinit-cni not installed"
cmp -s "$WORK/node/net.d/10-meshinit.conflist" "$WORK/node/config/10-meshinit.conflist" || fail "conflist not installed"
[ "$(cat "$WORK/node/net.d/meshinit-annotations.json")" = '{}' ] || fail "annotations file"
ls -A "$WORK/node/bin" "$WORK/node/net.d" | grep -q '\.tmp' && fail "temporary files left"
echo "    installed /opt/cni/bin/meshinit-cni and net.d/10-meshinit.conflist"
pm run --rm --network none --user 65534:65534 --cap-drop all --read-only --entrypoint /bin/sleep "$TAG" 0 \
  || fail "the idle container's sleep"

step "done"
