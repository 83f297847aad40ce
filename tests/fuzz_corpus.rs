//! Replays the fuzz corpus of meshinit's configuration loader as a regular test,
//! through the very checks the `meshinit_config` fuzz target runs.
#![deny(rust_2018_idioms)]

#[path = "../fuzz/src/meshinit_checks.rs"]
mod checks;
#[path = "../fuzz/src/replay.rs"]
mod corpus;

#[test]
fn meshinit_config_corpus() {
    corpus::replay(
        env!("CARGO_MANIFEST_DIR"),
        "meshinit_config",
        checks::meshinit_config,
    );
}
