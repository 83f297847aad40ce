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
//! - `route`: the pure decision per connection, before any byte: forward, terminate a
//!   peer's direct mTLS, balance over a service, or refuse (the trust boundary:
//!   loopback, foreign or own-listener destinations).
//! - `detect`: reads the client's first bytes and classifies HTTP/1, HTTP/2, TLS or
//!   opaque TCP; a plain async function over any reader, no sockets.
//! - `hop`: the pure decision once the first bytes are known: opaque or HTTP in
//!   plaintext, mTLS out to a mesh peer, mTLS in (the SNI names us), or refuse a
//!   plaintext client where an identity is required.
//! - `forward`: the pipeline of one connection (route, detect, hop, run it, record)
//!   and the plaintext hops; `connect` opens the proxy's own connections.
//! - `outcome`: how a connection ended, and the one place that turns it into its close
//!   `errno`, the refusal and handshake counters, and a log line.
//! - `duplex`: the copy loop in both directions with half-close and byte counters, and
//!   `splice(2)` for bulk bytes between two TCP sockets.
//! - `metrics`: the Prometheus registry and the per-connection counters, with the
//!   connection label sets capped and idle ones dropped (`--metrics-retain-idle`).
//!   Plumbing only: the label types (`Direction`, `Protocol`, `Refused`, ...) belong
//!   to the modules they describe and give their values through `metrics::Label`.
//! - `http`: connections detected as HTTP/1 or HTTP/2 (`Hop::Http`) proxied request by
//!   request with hyper: a pool of connections per destination, hop-by-hop headers,
//!   upgrades, the proxy's own error answers (`meshproxy-error`) and the golden
//!   metrics (`request_total`, `response_total`, `response_latency_seconds`).
//! - `admin`: the tiny HTTP/1 server for `/metrics`, `/ready` and `/live`; encodes off
//!   the async workers, one at a time, and caps its connections.
//!
//! Mutual TLS between proxies adds two hops and these:
//!
//! - `inbound`: terminates a peer proxy's mTLS (direct, or naming our identity on an
//!   application port), reads the transport header, forwards to the application.
//! - `outbound`: carries a connection over mTLS to a mesh peer's proxy.
//! - `mesh`: the mTLS configuration, loaded (identity, peers, ports).
//! - `tls`: the one crypto provider (aws-lc-rs), TLS 1.3 only, how peers are verified,
//!   and how handshake failures are named.
//! - `identity`: our certificate, key and trust anchors from PEM files, reloaded on
//!   change; `identity/name` says what an identity name may be (an exact DNS name,
//!   never a wildcard); `identity/dev_ca` makes a throwaway CA and identities
//!   (`meshproxy identity`).
//! - `mesh_peers`: which destinations are meshed and the identity expected there.
//! - `transport_header`: the header that tells the peer proxy the application port.
//! - `prefixed`: replays the bytes detection read, for a TLS session we terminate.
//! - `reload`: values rebuilt when their files change on disk.
//! - `await_ready`: `meshproxy await`, which waits for a proxy's `/ready` (the
//!   classic-sidecar pod's guard against the application starting first).
//!
//! Services (`--discovery`) add a `Route::Balanced` and these:
//!
//! - `balance`: the discovery file (`balance/discovery`), reloaded on change, and the
//!   pickers: a backend by weight, an endpoint by power-of-two-choices (`balance/p2c`)
//!   over open connections or peak-EWMA latency (`balance/ewma`), failing endpoints set
//!   aside, a failed connect moved on to another endpoint or backend;
//!   `outbound/balanced` connects and copies, or serves an HTTP connection whose
//!   requests are balanced one by one (`http/upstream/balanced`).

#![deny(rust_2018_idioms)]
// No module needs `unsafe`: nix wraps the one raw getsockopt we make (orig_dst).
#![forbid(unsafe_code)]

mod admin;
mod await_ready;
mod balance;
mod config;
mod connect;
mod detect;
mod duplex;
mod forward;
mod hop;
mod http;
mod identity;
mod inbound;
mod mesh;
mod mesh_peers;
mod metrics;
mod orig_dst;
mod outbound;
mod outcome;
mod prefixed;
mod reload;
mod route;
mod server;
mod tls;
mod transport_header;

pub use crate::await_ready::{await_ready, AwaitError};
pub use crate::balance::{Balancer, BalancerError, Discovery, DiscoveryError, ServiceProtocol};
pub use crate::config::{Config, ConfigError, LogFormat, PortSet, ProxyArgs};
pub use crate::connect::connect;
pub use crate::detect::{detect, ClientHello, Detected, Detection, Protocol, MAX_PREFIX};
pub use crate::duplex::{duplex, duplex_tcp, DuplexError, Side, Totals};
pub use crate::forward::{Forwarder, ForwarderError};
pub use crate::identity::{
    check_name as check_identity_name, issue, issue_owned, new_ca, new_ca_replacing, BadOwner,
    DevCaError, Identity, IdentityError, IdentityFiles, IdentityWatch, InvalidName, Issued, Owner,
};
pub use crate::mesh_peers::{MeshPeers, MeshPeersError};
pub use crate::metrics::{Counters, Metrics};
pub use crate::orig_dst::{original_dst, OrigDstError};
pub use crate::route::Direction;
pub use crate::server::{run, BoundAddrs, Proxy, ServerError};
pub use crate::tls::{identity_of, provider, HandshakeFailure, TlsError};
pub use crate::transport_header::{HeaderError, SessionProtocol, TransportHeader};

/// Internals the fuzz targets in `fuzz/` (and the corpus replay test) call directly:
/// the pure classifier behind [`detect`], which holds the ClientHello parser. Not API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::detect::classify;
}
