//! Replays the fuzz corpora of meshproxy's targets as a regular test.
//!
//! Every file in `fuzz/corpus/<target>/` (the committed seeds, interesting inputs the
//! fuzzer found, and reproducers of fixed crashes) goes through the very checks the
//! fuzz target runs: `fuzz/src/proxy_checks.rs` is compiled in here. So CI keeps the
//! corpora passing without cargo-fuzz or a nightly toolchain.
#![deny(rust_2018_idioms)]

#[path = "../../fuzz/src/proxy_checks.rs"]
mod checks;

#[path = "../../fuzz/src/replay.rs"]
mod corpus;

fn replay(target: &str, check: impl FnMut(&[u8])) {
    corpus::replay(env!("CARGO_MANIFEST_DIR"), target, check);
}

#[test]
fn ports_corpus() {
    replay("ports", checks::proxy_ports);
}

#[test]
fn detect_corpus() {
    let rt = checks::runtime();
    replay("detect", |data| checks::detect_bytes(&rt, data));
}

#[test]
fn client_hello_corpus() {
    replay("client_hello", checks::client_hello);
}

#[test]
fn transport_header_corpus() {
    let rt = checks::runtime();
    replay("transport_header", |data| {
        checks::transport_header(&rt, data)
    });
}

#[test]
fn proxy_config_corpus() {
    replay("proxy_config", checks::proxy_config);
}

#[test]
fn identity_name_corpus() {
    replay("identity_name", checks::identity_name);
}
