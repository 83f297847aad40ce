//! The decision for one connection once its first bytes are known: which hop carries
//! it. A pure function over plain values ([`hop`]), like `route` before it; the hops
//! themselves are in `forward` (plaintext), `inbound` and `outbound` (mTLS).
//!
//! `route` decides before any byte is read (refuse, forward, a peer's direct mTLS,
//! balanced); for a forwarded connection, [`detects`] says whether to read its first
//! bytes at all, and [`hop`] what to do with what they were: refuse a plaintext client
//! on a port that requires an identity, terminate an mTLS session that names our
//! identity, carry it to a mesh peer over mTLS (request by request over a pooled
//! HTTP/2 connection when detection found HTTP, as bytes otherwise), or forward it in
//! plaintext, as HTTP when detection found HTTP and as opaque bytes otherwise.

use std::net::SocketAddr;

use crate::config::PortSet;
use crate::detect::Detected;
use crate::route::Direction;

/// How a forwarded connection is carried after detection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Hop {
    /// Refuse: a client without a mesh identity on a `--require-identity-ports` port
    /// (`tcp_refused_total{reason="identity_required"}`).
    IdentityRequired,
    /// Plaintext bytes as they come, to the original destination: opaque ports,
    /// undetected or opaque protocols, TLS that is not for us.
    Opaque,
    /// Detected HTTP, in plaintext to the original destination.
    Http(HttpVersion),
    /// Over mTLS to the destination's proxy, a mesh peer that must prove `server_id`:
    /// the connection's bytes as they come (opaque, TLS, undetected).
    MtlsOut { server_id: String },
    /// Detected HTTP to a mesh peer: proxied request by request, each request over
    /// the one pooled mTLS HTTP/2 connection to the peer's proxy, which must prove
    /// `server_id` (see `http::orig_proto`).
    MeshHttp {
        version: HttpVersion,
        server_id: String,
    },
    /// Terminate the client's mTLS here: its ClientHello names our identity (SNI).
    MtlsIn,
}

/// The HTTP version detection found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum HttpVersion {
    /// A request line `METHOD SP target SP HTTP/1.x`.
    Http1,
    /// The HTTP/2 connection preface (prior knowledge).
    Http2,
}

/// The mesh configuration the decisions need, when an identity is configured.
pub(crate) struct MeshPolicy<'a> {
    /// Our identity's name: a TLS client that names it (SNI) is talking to us.
    pub(crate) identity: &'a str,
    /// `--require-identity-ports`: inbound ports where plaintext clients are refused.
    pub(crate) require_identity_ports: &'a PortSet,
    /// The identity expected at a destination that is a mesh peer (`--mesh-peers`);
    /// `None` for plaintext destinations. Only asked for outbound connections.
    pub(crate) peer_identity: &'a dyn Fn(SocketAddr) -> Option<String>,
}

impl MeshPolicy<'_> {
    fn requires_identity(&self, direction: Direction, target: SocketAddr) -> bool {
        direction == Direction::Inbound && self.require_identity_ports.contains(target.port())
    }
}

/// Whether to read a connection's first bytes before forwarding it to `target`.
///
/// Not on opaque ports: detection waits for the client to speak first, and in
/// server-speaks-first protocols (SMTP, MySQL, ...) the client waits for the server's
/// greeting instead, so detection would hold every such connection for the whole
/// detect timeout. Except on a port that requires an identity: there we must see
/// whether the client starts a TLS session for us, and a plaintext client is refused
/// anyway, so there is no greeting to wait for.
pub(crate) fn detects(
    direction: Direction,
    target: SocketAddr,
    opaque_ports: &PortSet,
    mesh: Option<&MeshPolicy<'_>>,
) -> bool {
    mesh.is_some_and(|mesh| mesh.requires_identity(direction, target))
        || !opaque_ports.contains(target.port())
}

/// Decides the hop of a connection accepted by the `direction` listener for `target`,
/// whose first bytes were `detected` (`None` when detection was skipped).
pub(crate) fn hop(
    direction: Direction,
    target: SocketAddr,
    detected: Option<&Detected>,
    mesh: Option<&MeshPolicy<'_>>,
) -> Hop {
    if let Some(mesh) = mesh {
        match direction {
            Direction::Inbound => {
                // A peer proxy (or a mesh-aware client) addressed us by our identity on
                // the application's port: its mTLS is terminated here.
                if let Some(Detected::Tls(hello)) = detected {
                    if hello.sni.as_deref() == Some(mesh.identity) {
                        return Hop::MtlsIn;
                    }
                }
                if mesh.requires_identity(direction, target) {
                    return Hop::IdentityRequired;
                }
            }
            Direction::Outbound => {
                if let Some(server_id) = (mesh.peer_identity)(target) {
                    return match http_version(detected) {
                        Some(version) => Hop::MeshHttp { version, server_id },
                        None => Hop::MtlsOut { server_id },
                    };
                }
            }
        }
    }
    match http_version(detected) {
        Some(version) => Hop::Http(version),
        None => Hop::Opaque,
    }
}

/// The HTTP version detection found, if it found HTTP.
fn http_version(detected: Option<&Detected>) -> Option<HttpVersion> {
    match detected {
        Some(Detected::Http1) => Some(HttpVersion::Http1),
        Some(Detected::Http2) => Some(HttpVersion::Http2),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
