//! The checks behind the fuzz targets in `fuzz_targets/`, one function per target.
//!
//! - `rules_checks`: meshinit-rules' port and CIDR parsers, the renderers, and the
//!   readers of `iptables-save` and `nft -j` listings.
//! - `meshinit_checks`: meshinit's TOML + env configuration loader.
//! - `proxy_checks`: meshproxy's detection, ClientHello parser, transport header and
//!   TOML configuration.
//!
//! Each module is also compiled into its crate's `tests/fuzz_corpus.rs`, which replays
//! `fuzz/corpus/<target>/` as a regular test.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod meshinit_checks;
pub mod proxy_checks;
pub mod rules_checks;
