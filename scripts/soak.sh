#!/usr/bin/env bash
# The long load runs of issue 8 ("The proxy under load"), which CI does not run:
# netns-tests/tests/load.rs with the release meshproxy and meshinit and the soak sizes:
#
#   - 10,000 idle connections held open through the outbound proxy (RSS idle, at N,
#     per connection);
#   - a flood of 8,000 silent clients against --max-detecting 200 / --detect-timeout 2s
#     while a well-behaved client makes 200 round trips (p50/p99/max);
#   - 4 GiB each way through two proxies and their mTLS hop, SHA-256 equal, half-close;
#   - 10,000 connections to an upstream that refuses or resets (errno counters, no
#     leaked descriptor or thread).
#
# Prints a Markdown section for BENCHMARKS.md (date, machine, figures) on stdout; the full
# test log goes to $SOAK_LOG (default: a temp file, named at the end). Needs root.
#
#   scripts/soak.sh [> soak.md]
#
# Sizes can be overridden with the LOAD_* variables of netns-tests/tests/load.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/soak.sh: must run as root (the tests create network namespaces)" >&2
  exit 1
fi

echo "==> building (release proxy and meshinit; the test binary in debug)" >&2
cargo build --release -p meshproxy -p meshinit >&2
cargo build --workspace --bins >&2
export MESHPROXY_BIN="$PWD/target/release/meshproxy"
export MESHINIT_BIN="$PWD/target/release/meshinit"

# Each connection costs two descriptors in the proxy and two in the test process (client
# and server ends), and both inherit this shell's hard RLIMIT_NOFILE, which only
# CAP_SYS_RESOURCE may raise. Ask for 10,000 unless the limit cannot hold them.
hard=$(ulimit -Hn)
want=10000
note=""
if [ "$hard" != unlimited ] && [ $((2 * want + 100)) -gt "$hard" ]; then
  fit=$(((hard - 100) / 2))
  note="The hard RLIMIT_NOFILE here is $hard (no CAP_SYS_RESOURCE to raise it); 10,000 connections need 20,000 descriptors in the proxy plus its own, so this run holds $fit."
  want=$fit
fi
export LOAD_CONNECTIONS="${LOAD_CONNECTIONS:-$want}"
export LOAD_FLOOD="${LOAD_FLOOD:-8000}"
export LOAD_ROUND_TRIPS="${LOAD_ROUND_TRIPS:-200}"
export LOAD_MTLS_MIB="${LOAD_MTLS_MIB:-4096}"
export LOAD_CHURN="${LOAD_CHURN:-10000}"
export LOAD_ROUNDS="${LOAD_ROUNDS:-4}"

log="${SOAK_LOG:-$(mktemp /tmp/soak.XXXXXX.log)}"
# Other work on the machine shows in latency and throughput: say how busy it was.
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
echo "==> running netns-tests/tests/load.rs (log: $log)" >&2
start=$(date +%s)
if ! cargo test -p netns-tests --test load -- --nocapture --test-threads=1 >"$log" 2>&1; then
  cat "$log" >&2
  echo "scripts/soak.sh: the load tests failed (log: $log)" >&2
  exit 1
fi
# The idle connections once more with one malloc arena (inherited by the proxy): RSS over
# rounds with and without the per-thread arenas' fragmentation.
arena_log="$log.arena1"
if ! MALLOC_ARENA_MAX=1 cargo test -p netns-tests --test load many_idle -- --nocapture >"$arena_log" 2>&1; then
  cat "$arena_log" >&2
  echo "scripts/soak.sh: the load tests failed with MALLOC_ARENA_MAX=1 (log: $arena_log)" >&2
  exit 1
fi
took=$(($(date +%s) - start))
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# val TEST KEY [LOG]: the value of KEY on the `LOAD TEST …` line of LOG (default: the run).
val() {
  # With --nocapture the line may follow libtest's `test NAME ... ` on the same line.
  awk -v test="$1" -v key="$2" '
    {
      for (s = 1; s < NF; s++) {
        if ($s != "LOAD" || $(s + 1) != test) continue
        for (i = s + 2; i <= NF; i++) {
          split($i, kv, "=")
          if (kv[1] == key) { print substr($i, length(key) + 2); exit }
        }
      }
    }' "${3:-$log}"
}

cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
mem=$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain 2>/dev/null | grep -q . && echo " (with uncommitted changes)" || true)

cat <<EOF
### Proxy under load (scripts/soak.sh)

$(date -u '+%Y-%m-%d %H:%M UTC') · commit \`$commit\`$dirty · $(nproc) vCPU ($cpu) · $mem RAM ·
Linux $(uname -r) · release \`meshproxy\` as uid 2102 behind meshinit's rules, in network
namespaces joined by a veth · $took s in all · load average before $load_before, after
$load_after.

**Idle connections held open** (pod → outbound proxy → peer, opaque port, half IPv4, half
IPv6; every connection then carries one byte each way):

| connections | idle RSS | RSS at N | per connection (RSS / anon) | after all closed | proxy fds | target |
|---|---|---|---|---|---|---|
| $(val idle-connections n) | $(val idle-connections idle_rss_mib) MiB | $(val idle-connections rss_at_n_mib) MiB | $(val idle-connections per_conn_kib) / $(val idle-connections per_conn_anon_kib) KiB | $(val idle-connections rss_after_close_mib) MiB | $(val idle-connections proxy_fds) | idle ≤ 8 MiB, ≤ 24 KiB per connection |

Opened in $(val idle-connections opened_s) s; descriptors back to idle after each round. RSS at N over
$LOAD_ROUNDS rounds of opening and closing the same connections: $(val idle-connections rss_at_n_per_round_mib | sed 's/,/, /g') MiB
(glibc's default per-thread arenas); with \`MALLOC_ARENA_MAX=1\`: $(val idle-connections rss_at_n_per_round_mib "$arena_log" | sed 's/,/, /g') MiB
(idle $(val idle-connections idle_rss_mib "$arena_log") MiB, $(val idle-connections per_conn_kib "$arena_log") KiB per connection).
${note:+
$note
}
**Silent flood** ($(val silent-flood flood) clients that connect to a detected port and send
nothing, opened in $(val silent-flood opened_s) s; \`--max-detecting $(val silent-flood max_detecting) --detect-timeout $(val silent-flood detect_timeout_s)s\`):
$(val silent-flood refused) refused at once by the cap (counted in
\`tcp_refused_total{reason="max_detecting"}\`), $(val silent-flood timed_out_forwarded) held for the
timeout then forwarded as opaque; proxy peak RSS $(val silent-flood proxy_hwm_mib) MiB;
\`tcp_open_connections\` back to 0 afterwards. A well-behaved client's round trips
($(val silent-flood round_trips) each, paced 20 ms, echo server in the peer):

| round trip | before the flood p50 / p99 / max | during the flood p50 / p99 / max |
|---|---|---|
| HTTP/1 request on a kept-alive connection (detected port) | $(val silent-flood keepalive_before_p50_ms) / $(val silent-flood keepalive_before_p99_ms) / $(val silent-flood keepalive_before_max_ms) ms | $(val silent-flood keepalive_during_p50_ms) / $(val silent-flood keepalive_during_p99_ms) / $(val silent-flood keepalive_during_max_ms) ms |
| new connection + exchange + close (opaque port) | $(val silent-flood fresh_before_p50_ms) / $(val silent-flood fresh_before_p99_ms) / $(val silent-flood fresh_before_max_ms) ms | $(val silent-flood fresh_during_p50_ms) / $(val silent-flood fresh_during_p99_ms) / $(val silent-flood fresh_during_max_ms) ms |

New connections to the detected port while the cap was full: $(val silent-flood probes_served) served,
$(val silent-flood probes_refused) refused at once (slowest answer $(val silent-flood probes_slowest_ms) ms).

**Bulk through two proxies with mTLS**: $(val mtls-bulk mib_each_way) MiB each way concurrently (pod A
client → A's outbound proxy → mTLS → B's inbound proxy → B's server), the client half-closing
after sending and still receiving everything: $(val mtls-bulk seconds) s, $(val mtls-bulk mib_s_each_way) MiB/s each way;
SHA-256 equal at both ends (up \`$(val mtls-bulk sha256_up | cut -c1-16)…\`, down \`$(val mtls-bulk sha256_down | cut -c1-16)…\`);
RSS afterwards A $(val mtls-bulk a_rss_mib) MiB (peak $(val mtls-bulk a_hwm_mib)), B $(val mtls-bulk b_rss_mib) MiB (peak $(val mtls-bulk b_hwm_mib)). The $(nproc) vCPUs run the client, the
server, SHA-256 of all four streams and both proxies' TLS at once: a correctness run, not a
throughput benchmark (see the datapath benchmarks for that).

**Upstream refusing or resetting**: $(val refused-reset churn) connections ($(val refused-reset parallel) at once, half to
a port with no listener, half to a server that resets with \`SO_LINGER\` 0, both families) in
$(val refused-reset seconds) s; slowest close seen by a client $(val refused-reset slowest_close_ms) ms; \`tcp_close_total{errno="ECONNREFUSED"}\` =
$(val refused-reset econnrefused), \`{errno="ECONNRESET"}\` = $(val refused-reset econnreset) (warm-up included); proxy descriptors
$(val refused-reset fds_before) → $(val refused-reset fds_after), threads $(val refused-reset threads_before) → $(val refused-reset threads_after), RSS $(val refused-reset rss_before_mib) → $(val refused-reset rss_after_mib) MiB; still serving, no panic.
EOF
echo "scripts/soak.sh: full log in $log" >&2
