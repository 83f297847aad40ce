#!/bin/bash
# An experiment (issue 14, sixth pass; not how releases are built): builds
# target/release/meshproxy (and meshinit) with profile-guided optimisation:
#
#   1. an instrumented meshproxy (target/pgo-generate/release/meshproxy);
#   2. training: the quick runs of the HTTP, datapath and mTLS benchmarks
#      (scripts/bench/http.py, proxy.py, mtls.py) through it, in throwaway namespaces,
#      each meshproxy writing its profile when SIGTERM stops it;
#   3. the profiles merged with the toolchain's own llvm-profdata (rustup's
#      llvm-tools component, whose LLVM matches rustc's);
#   4. the release build using the merged profile: target/pgo-use/release/meshproxy,
#      to measure against target/release/meshproxy (e.g. http.py --baseline).
#
# Run as root on the machine that builds the release (the training runs need network
# namespaces). Usage: scripts/bench/build-pgo.sh [PROFILE_DIR]; PROFILE_DIR keeps the profiles
# (default: a fresh directory under /tmp).
set -euo pipefail
cd "$(dirname "$0")/../.."

dir=${1:-$(mktemp -d /tmp/meshproxy-pgo.XXXXXX)}
mkdir -p "$dir"
rm -f "$dir"/*.profraw "$dir"/merged.profdata
# The benchmarks run meshproxy as its own uid: it must be able to write its profile.
chmod 1777 "$dir"

rustup component add llvm-tools >/dev/null 2>&1 || rustup component add llvm-tools-preview
profdata=$(find "$(rustc --print sysroot)/lib/rustlib" -name llvm-profdata -type f | head -1)
[ -x "$profdata" ] || { echo "build-pgo.sh: llvm-profdata not found in the toolchain" >&2; exit 1; }

echo "build-pgo.sh: instrumented build" >&2
RUSTFLAGS="-Cprofile-generate=$dir" \
    cargo build --release -p meshproxy --target-dir target/pgo-generate
cargo build --release -p meshinit
instrumented=target/pgo-generate/release/meshproxy

echo "build-pgo.sh: training runs" >&2
for bench in http.py proxy.py mtls.py; do
    python3 "scripts/bench/$bench" --quick --meshproxy "$instrumented" \
        --meshinit target/release/meshinit >/dev/null
done
ls "$dir"/*.profraw >/dev/null

echo "build-pgo.sh: merging $(ls "$dir"/*.profraw | wc -l) profiles" >&2
"$profdata" merge -o "$dir/merged.profdata" "$dir"/*.profraw

echo "build-pgo.sh: optimised build" >&2
RUSTFLAGS="-Cprofile-use=$dir/merged.profdata" \
    cargo build --release -p meshproxy --target-dir target/pgo-use
echo "build-pgo.sh: target/pgo-use/release/meshproxy (profile: $dir/merged.profdata)" >&2
