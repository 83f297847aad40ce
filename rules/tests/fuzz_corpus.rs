//! Replays the fuzz corpora of meshinit-rules' targets as a regular test.
//!
//! Every file in `fuzz/corpus/<target>/` (the committed seeds, interesting inputs the
//! fuzzer found, and reproducers of fixed crashes) goes through the very checks the
//! fuzz target runs: `fuzz/src/rules_checks.rs` is compiled in here. So CI keeps the
//! corpora passing without cargo-fuzz or a nightly toolchain.
#![deny(rust_2018_idioms)]

#[path = "../../fuzz/src/rules_checks.rs"]
mod checks;

#[path = "../../fuzz/src/replay.rs"]
mod corpus;

fn replay(target: &str, check: impl FnMut(&[u8])) {
    corpus::replay(env!("CARGO_MANIFEST_DIR"), target, check);
}

#[test]
fn ports_corpus() {
    replay("ports", checks::ports);
}

#[test]
fn subnets_corpus() {
    replay("subnets", checks::subnets);
}

#[test]
fn ruleset_corpus() {
    // The seeds are valid specs, so the renderer checks actually run on them.
    assert!(checks::spec_from_lines("4143\n4140\n2102\n\n4190-4191\n\n\n\n\ntrue\n").is_some());
    replay("ruleset", checks::ruleset);
}

#[test]
fn iptables_save_corpus() {
    replay("iptables_save", checks::iptables_save);
}

#[test]
fn nft_listing_corpus() {
    replay("nft_listing", checks::nft_listing);
}
