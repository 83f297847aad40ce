#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ one after the other, each for a fixed time.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 60; no TARGET means all of them. Prints, per target,
# the executions, executions per second, coverage (cov/ft) and corpus size from
# libFuzzer's final statistics, and exits non-zero if any target crashed, hung, ran out
# of memory or failed to build. `scripts/fuzz.sh 1800` is the issue's 30 minutes each.
#
# Environment:
#   CARGO_TARGET_DIR  build directory (default /work/target-fuzz when /work exists,
#                     else fuzz/target)
#   FUZZ_SANITIZER    cargo-fuzz --sanitizer (default none: it works on a stable
#                     toolchain, and safe Rust's own bounds checks catch memory errors)
#   FUZZ_JOBS         parallel libFuzzer workers per target (default 1)
#   FUZZ_WORK         where the growing corpora, crashes and logs go
#                     (default fuzz/corpus-work, ignored by git)
#
# The committed seeds in fuzz/corpus/<target>/ are only read; what libFuzzer finds
# goes to $FUZZ_WORK/<target>/corpus, and crashes to $FUZZ_WORK/<target>/artifacts/.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/fuzz"

seconds=${1:-60}
shift || true
all=(ports subnets ruleset iptables_save nft_listing detect client_hello transport_header proxy_config identity_name meshinit_config cni_config)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${all[@]}")

if [ -d /work ] && [ -z "${CARGO_TARGET_DIR:-}" ]; then
    export CARGO_TARGET_DIR=/work/target-fuzz
fi
sanitizer=${FUZZ_SANITIZER:-none}
jobs=${FUZZ_JOBS:-1}
work=${FUZZ_WORK:-$root/fuzz/corpus-work}
# cargo-fuzz passes -Z flags to rustc; on a stable toolchain they need this.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

# The longest input each target needs: detection reads up to 8 KiB (MAX_PREFIX), so
# its inputs go past that to reach the full-buffer path.
max_len() {
    case $1 in
        ports | subnets | transport_header | identity_name) echo 512 ;;
        ruleset | proxy_config | meshinit_config) echo 2048 ;;
        client_hello | iptables_save) echo 4096 ;;
        nft_listing) echo 8192 ;;
        # Past the largest stdin limit the first byte can choose (255 * 16 bytes).
        cni_config) echo 8192 ;;
        detect) echo 10000 ;;
    esac
}

cargo fuzz build --sanitizer "$sanitizer" >&2
# More than one job makes libFuzzer fork workers that log to fuzz-N.log in the current
# directory; with one job the fuzzer runs in this process and logs to $log.
parallel=()
[ "$jobs" -gt 1 ] && parallel=(-jobs="$jobs" -workers="$jobs")
failed=()
printf '%-17s %12s %8s %9s %8s %8s %7s %6s  %s\n' target executions seconds exec/s cov ft corpus rss_mb result
for target in "${targets[@]}"; do
    mkdir -p "$work/$target/corpus" "$work/$target/artifacts"
    log=$work/$target/fuzz.log
    status=ok
    # -timeout: one input taking over 10 s is a hang. -rss_limit_mb: the process
    # growing past 512 MiB is unbounded allocation (without a sanitizer libFuzzer
    # cannot hook malloc, so this is the memory check). -print_final_stats: the
    # figures below.
    if ! cargo fuzz run --sanitizer "$sanitizer" "$target" \
        "$work/$target/corpus" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=512 \
        -max_len="$(max_len "$target")" "${parallel[@]}" \
        -artifact_prefix="$work/$target/artifacts/" -print_final_stats=1 \
        >"$log" 2>&1; then
        status=FAILED
        failed+=("$target")
    fi
    stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
    # The last status line, `#N DONE cov: C ft: F corp: U/SIZE ...` when it ended in time.
    done_line=$(grep -E '^#[0-9]+[[:space:]]' "$log" | tail -1 || true)
    field() { sed -n "s/.*[[:space:]]$1: \([0-9]*\).*/\1/p" <<<"$done_line"; }
    execs=$(stat number_of_executed_units)
    secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
    printf '%-17s %12s %8s %9s %8s %8s %7s %6s  %s\n' "$target" "${execs:-?}" "${secs:-?}" \
        "$(stat average_exec_per_sec)" "$(field cov)" "$(field ft)" \
        "$(field corp)" "$(stat peak_rss_mb)" "$status"
    if [ "$status" != ok ]; then
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written' "$log" | head -5 | sed 's/^/    /'
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]} (logs and reproducers in $work/<target>/)" >&2
    exit 1
fi
