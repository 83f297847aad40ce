//! Throwaway network namespaces for tests that need the kernel's rules.
//!
//! Every test builds its own [`Pods`]: a "pod" and a "peer" namespace joined by one veth
//! pair and nothing else (the host's interfaces and routes are never touched), so tests
//! are independent, run in parallel and all use the same addresses.
//!
//! Layout:
//! - `pods`: [`Pods`] and [`Family`], the two namespaces and the addresses of DESIGN.md's
//!   test networks (198.18.0.0/15, fd00::/8).
//! - `netns`: [`Netns`], one named namespace: run a command in it ([`Netns::exec`]), start a
//!   background process ([`Netns::spawn`]), run a closure on a thread that entered it
//!   ([`Netns::run`]).
//! - `process`: [`Run`], a finished command's exit code and output, and [`Spawned`], a
//!   background process killed on `Drop`.
//! - `sockets`: [`Listener`] and [`Accepted`], real TCP sockets opened inside a namespace,
//!   with the `SO_ORIGINAL_DST` that a redirect leaves behind; clients in-process
//!   ([`Netns::connect`]) or as another user ([`Netns::connect_as`]).
//! - `nft`: reading back a namespace's ruleset.
//! - `backend`: [`Backend`], meshinit's three backends ([`for_each_backend!`] runs a test
//!   once per backend), and reading back what each holds ([`Netns::firewall`]).
//! - `transfer`: bulk sends and receives hashed with SHA-256 ([`transfer::Pattern`]).
//! - `apps`: real HTTP servers and clients for the HTTP tests: Debian's nginx, nghttpd, curl and
//!   h2load, and the Python programs of `apps/` (grpcio, websockets) from the test venv.
//! - `http`: the set-up of the HTTP tests: both pods meshed in plaintext, waiting for a
//!   metric at a proxy, nginx with the tests' sites, helpers for curl, files and promtool.
//! - `fault`: [`fault::FaultyTools`], failing or killed stand-ins for nft/iptables tools.
//! - `bins`: where the binaries under test are (`meshinit`, `meshproxy`, `netns-probe`) and
//!   running `meshinit` in a namespace.
//! - `proxy`: [`MeshProxy`], the real `meshproxy` started in a namespace as the proxy uid
//!   ([`Netns::start_meshproxy`]) or as another uid through a wrapper such as `prlimit`
//!   ([`Netns::start_meshproxy_as`]), and [`Metrics`], a scrape of its `/metrics`.
//!
//! These helpers panic instead of returning errors whenever the harness itself fails (no
//! root, `ip` refused, a binary not built): in a test the panic message, with the command
//! and its stderr, is the report. Only outcomes a test asserts on are returned as values.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod apps;
mod backend;
mod bins;
pub mod cni;
pub mod fault;
pub mod http;
pub mod mesh;
mod netns;
mod nft;
mod pods;
mod process;
mod proxy;
mod sockets;
pub mod transfer;

pub use backend::{normalise_nft, normalise_save, Backend};
pub use bins::{meshinit_bin, meshproxy_bin, netns_probe_bin};
pub use netns::Netns;
pub use nft::{RuleRef, MESHINIT_TABLE};
pub use pods::{Family, Pods};
pub use process::{Run, Spawned};
pub use proxy::{MeshProxy, Metrics, ADMIN_PORT, PROXY_UID};
pub use sockets::{landed_on, original_dst, Accepted, Listener, ACCEPT_TIMEOUT, CONNECT_TIMEOUT};
