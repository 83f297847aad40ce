//! Replays the fuzz corpora of meshinit's configuration loaders as regular tests,
//! through the very checks the `meshinit_config` and `cni_config` fuzz targets run.
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

#[test]
fn cni_config_corpus() {
    corpus::replay(env!("CARGO_MANIFEST_DIR"), "cni_config", checks::cni_config);
}
