//! meshinit: installs the redirect rules that send a pod's TCP through its
//! sidecar proxy. The library holds everything; `main.rs` is the thin binary
//! (the library also lets the fuzz targets reach the config loader).
//!
//! - `cli`: flags (clap), one `Option<String>` per setting.
//! - `config`: flags > env > TOML file > defaults, validated into a `Config`.
//! - `netns`: entering the target namespace, and telling whether it is the host's.
//! - `addrs`: the namespace's IPv6 addresses (rtnetlink), for the `--ipv6=false` warning.
//! - `routing`: the policy routing of `--mode tproxy` (rtnetlink): apply, drift, undo.
//! - `backend`: runners that apply a `meshinit_rules::Ruleset` (`backend/nft`).
//! - `commands`: apply, cleanup, show, check (and `check --repair`).
//! - `validate`: proving that redirection works (`meshinit validate`).
//! - `cni`: the chained CNI plugin (`meshinit cni`, or the binary run as `meshinit-cni`).
//! - `lock`: one run at a time changes rules.
//! - `caps`: the capabilities meshinit needs, checked at start-up.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

mod addrs;
mod backend;
mod caps;
pub mod cli;
pub mod cni;
pub mod commands;
pub mod config;
mod lock;
mod netns;
mod routing;
mod validate;
