//! meshproxy: the sidecar that receives the connections meshinit's rules redirect.
//!
//! Each accepted connection goes through the same few steps, one module each:
//!
//! - `config`: flags, `MESHPROXY_*` env vars and a TOML file merged into one [`Config`]
//!   by a pure function.
//! - `server`: binds the inbound, outbound and admin listeners, accepts, enforces the
//!   connection caps and drains on shutdown ([`run`], [`Proxy`]).
//! - `orig_dst`: recovers where the client meant to go (`SO_ORIGINAL_DST`,
//!   `IP6T_SO_ORIGINAL_DST`) and refuses connections that were not redirected.
//! - `detect`: reads the client's first bytes and classifies HTTP/1, HTTP/2, TLS or
//!   opaque TCP; a plain async function over any reader, no sockets.
//! - `forward`: one connection from detection to close: connect to the destination,
//!   replay the detected bytes, copy, count.
//! - `duplex`: the copy loop in both directions with half-close and byte counters.
//! - `metrics`: the Prometheus registry and the per-connection counters.
//! - `admin`: the tiny HTTP/1 server for `/metrics`, `/ready` and `/live`.
//!
//! Mutual TLS between proxies comes later: it will wrap `forward::connect` (outbound)
//! and the accepted stream (inbound) without changing the steps above.

#![deny(rust_2018_idioms)]
// No module needs `unsafe`: nix wraps the one raw getsockopt we make (orig_dst).
#![forbid(unsafe_code)]

mod admin;
mod config;
mod detect;
mod duplex;
mod forward;
mod metrics;
mod orig_dst;
mod server;

pub use crate::config::{Config, ConfigError, LogFormat, PortSet, ProxyArgs};
pub use crate::detect::{detect, ClientHello, Detected, Detection, Protocol, MAX_PREFIX};
pub use crate::duplex::{duplex, Counters, DuplexError, Side, Totals};
pub use crate::forward::{connect, Forwarder};
pub use crate::metrics::{Direction, Metrics};
pub use crate::orig_dst::{original_dst, OrigDstError};
pub use crate::server::{run, BoundAddrs, Proxy, ServerError};
