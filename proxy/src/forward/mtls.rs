//! The mTLS hops between two proxies.
//!
//! Outbound, to a destination listed in `--mesh-peers`: connect to the peer's
//! inbound port (4143) at the destination's address, handshake with SNI = the
//! identity expected there and ALPN `transport.l5d.io/v1`, verify the server
//! certificate against the trust anchors and that identity, send the transport header
//! (the original port, and the session protocol when detection found HTTP), then the
//! client's bytes.
//!
//! Inbound, on a direct connection: require a client certificate chaining to the trust
//! anchors and the ALPN, read the header, and forward to the local application at the
//! connection's destination address and the header's port. A direct client must send
//! its ClientHello within `--handshake-timeout`, and holds one of the inbound detection
//! permits (`--max-detecting`) until it has: otherwise silent connections to port 4143
//! would pile up outside every budget. The handshake and the header together must then
//! finish within `--handshake-timeout` again: a peer that stalls in either must not hold
//! a connection slot forever. Outbound handshakes get the same timeout.

use std::net::SocketAddr;

use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{debug, info};

/// rustls reads the socket at most 4 KiB at a time; a TLS record is up to 16 KiB,
/// so without a buffer under it every record costs four `read` syscalls. One
/// record-sized buffer per mTLS connection makes it one.
const TLS_READ_BUF: usize = 16 * 1024;

use super::{connect, connect_from, copy, Classified, Forwarder, ForwarderError};
use crate::config::{Config, PortSet};
use crate::detect::{detect, Detected, Protocol};
use crate::identity::IdentityWatch;
use crate::mesh_peers::MeshPeersWatch;
use crate::metrics::{errno_name, ConnMetrics, Direction, Refused};
use crate::prefixed::Prefixed;
use crate::route::{own_listener, Context};
use crate::tls::{self, HandshakeFailure};
use crate::transport_header::{self, SessionProtocol, TransportHeader};

/// The mTLS part of the configuration, loaded.
pub(super) struct Mesh {
    pub(super) identity: IdentityWatch,
    peers: Option<MeshPeersWatch>,
    pub(super) peer_inbound_port: u16,
    pub(super) require_identity_ports: PortSet,
}

impl Mesh {
    /// `None` without an identity: the proxy then forwards everything in plaintext.
    pub(super) fn new(config: &Config) -> Result<Option<Mesh>, ForwarderError> {
        let Some(files) = &config.identity else {
            return Ok(None);
        };
        let identity = IdentityWatch::new(files)?;
        let peers = match &config.mesh_peers {
            Some(path) => Some(MeshPeersWatch::new(path)?),
            None => None,
        };
        info!(identity = identity.current().name(), "mTLS identity loaded");
        Ok(Some(Mesh {
            identity,
            peers,
            peer_inbound_port: config.peer_inbound_port,
            require_identity_ports: config.require_identity_ports.clone(),
        }))
    }

    /// The identity expected at a meshed destination; `None` for plaintext ones.
    pub(super) fn peer_identity(&self, target: SocketAddr) -> Option<String> {
        let peers = self.peers.as_ref()?.current();
        peers.identity(target.ip()).map(str::to_string)
    }
}

/// The `errno` label of a connection that ended in a failed handshake: not a kernel
/// error, so the closest errno names it.
const ERRNO_HANDSHAKE: &str = "EPROTO";
const ERRNO_TIMEOUT: &str = "ETIMEDOUT";

pub(super) async fn outbound(
    fwd: &Forwarder,
    mesh: &Mesh,
    client: TcpStream,
    target: SocketAddr,
    classified: Classified,
    peer_id: String,
) {
    let protocol = classified.protocol();
    let mut conn = fwd
        .metrics
        .open(Direction::Outbound, target, protocol, Some(&peer_id));
    let peer = SocketAddr::new(target.ip(), mesh.peer_inbound_port);
    let tcp = match connect(peer).await {
        Ok(stream) => stream,
        Err(error) => {
            info!(%target, %peer, %error, "cannot connect to the peer proxy");
            conn.set_errno(Some(errno_name(&error)));
            return;
        }
    };
    outbound_over(fwd, mesh, client, tcp, target, classified, &peer_id, conn).await;
}

/// The mTLS hop of [`outbound`] over `tcp`, a connection already open to the peer
/// proxy of `target` (also how a balanced endpoint with an identity is reached):
/// handshake, transport header naming `target`'s port, copy.
#[allow(clippy::too_many_arguments)]
pub(super) async fn outbound_over(
    fwd: &Forwarder,
    mesh: &Mesh,
    client: TcpStream,
    tcp: TcpStream,
    target: SocketAddr,
    classified: Classified,
    peer_id: &str,
    mut conn: ConnMetrics,
) {
    let protocol = classified.protocol();
    let peer = tcp.peer_addr().ok();
    let failed = |reason: HandshakeFailure| {
        fwd.metrics.handshake_failed(Direction::Outbound, reason);
        info!(%target, ?peer, %peer_id, reason = reason.as_str(), "mTLS to the peer proxy failed");
    };
    let Ok(server_name) = ServerName::try_from(peer_id.to_string()) else {
        // Checked when the peers file was parsed; kept as a guard, not a panic.
        failed(HandshakeFailure::Other);
        conn.set_errno(Some(ERRNO_HANDSHAKE.to_string()));
        return;
    };
    let connector = TlsConnector::from(mesh.identity.current().client_config());
    let handshake = tokio::time::timeout(fwd.handshake_timeout, async {
        let mut tls = connector
            .connect(server_name, BufReader::with_capacity(TLS_READ_BUF, tcp))
            .await
            .map_err(|e| HandshakeFailure::of(&e))?;
        // A server that ignored our ALPN would not understand the header either.
        if tls.get_ref().1.alpn_protocol() != Some(transport_header::ALPN) {
            return Err(HandshakeFailure::BadAlpn);
        }
        let session = match protocol {
            Protocol::Http1 => Some(SessionProtocol::Http1),
            Protocol::Http2 => Some(SessionProtocol::Http2),
            Protocol::Opaque | Protocol::Tls => None,
        };
        // TLS has no `SessionProtocol`: our field 1000 tells the inbound proxy, so both
        // label the connection `protocol="tls"`.
        let header = match protocol {
            Protocol::Tls => TransportHeader::tls(target.port()),
            _ => TransportHeader::new(target.port(), session),
        }
        .encode();
        // The header is ours, not the client's, so it is written here rather than
        // replayed by `duplex` (which counts its prefix as bytes read from the client).
        tls.write_all(&header)
            .await
            .map_err(|e| HandshakeFailure::of(&e))?;
        Ok(tls)
    })
    .await;
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(reason)) => {
            failed(reason);
            conn.set_errno(Some(ERRNO_HANDSHAKE.to_string()));
            return;
        }
        Err(_elapsed) => {
            failed(HandshakeFailure::Timeout);
            conn.set_errno(Some(ERRNO_TIMEOUT.to_string()));
            return;
        }
    };
    debug!(%target, ?peer, %peer_id, "mTLS established");
    copy(client, tls, classified.prefix, &mut conn, target).await;
}

/// A peer proxy's direct connection to our inbound listener at `local`: waits, holding
/// an inbound detection permit, for its ClientHello, then terminates its mTLS.
pub(super) async fn inbound_direct(
    fwd: &Forwarder,
    mesh: &Mesh,
    mut client: TcpStream,
    local: SocketAddr,
) {
    let client_addr = client.peer_addr().ok();
    let hello = {
        let Ok(_permit) = fwd
            .detecting
            .get(Direction::Inbound)
            .clone()
            .try_acquire_owned()
        else {
            fwd.metrics
                .refused(Direction::Inbound, Refused::MaxDetecting);
            debug!(?client_addr, %local, "too many connections without a ClientHello, closing");
            return;
        };
        // `detect` reads until the bytes are decisive: for TLS, the whole ClientHello
        // record (or 8 KiB of it). Whatever it read is replayed to rustls.
        match detect(&mut client, fwd.handshake_timeout).await {
            Ok(detection) => detection,
            Err(error) => {
                debug!(?client_addr, %error, "direct client failed before its ClientHello");
                return;
            }
        }
    };
    match hello.detected {
        Detected::Eof => {
            debug!(?client_addr, "direct client closed before sending anything");
        }
        Detected::Timeout => {
            fwd.metrics
                .handshake_failed(Direction::Inbound, HandshakeFailure::Timeout);
            // Counted; logged at debug only, since a flood of these is what the budget
            // is for.
            debug!(
                ?client_addr,
                timeout = ?fwd.handshake_timeout,
                "closing a direct connection that sent no ClientHello within the handshake timeout"
            );
        }
        // Not TLS is left to rustls, which rejects it with the usual reason.
        _ => inbound(fwd, mesh, Prefixed::new(hello.prefix, client), local, true).await,
    }
}

/// Terminates mTLS from a peer. `direct` says the client connected to the inbound
/// port itself, where the transport ALPN (and so the header) is required; a client
/// that named our identity on an application port may omit it and is then forwarded
/// to that port.
pub(super) async fn inbound(
    fwd: &Forwarder,
    mesh: &Mesh,
    client: Prefixed<TcpStream>,
    target: SocketAddr,
    direct: bool,
) {
    let identity = mesh.identity.current();
    let acceptor = TlsAcceptor::from(identity.server_config());
    let listener_port = target.port();
    let from = fwd.source_for(Direction::Inbound, client.get_ref().peer_addr().ok());
    let accepted = tokio::time::timeout(fwd.handshake_timeout, async {
        let mut tls = acceptor
            .accept(BufReader::with_capacity(TLS_READ_BUF, client))
            .await
            .map_err(|e| HandshakeFailure::of(&e))?;
        let header = if tls.get_ref().1.alpn_protocol() == Some(transport_header::ALPN) {
            let header = TransportHeader::read(&mut tls).await.map_err(|error| {
                info!(%error, "refusing a peer whose transport header is invalid");
                HandshakeFailure::Other
            })?;
            Some(header)
        } else if direct {
            return Err(HandshakeFailure::BadAlpn);
        } else {
            None
        };
        Ok((tls, header))
    })
    .await;
    let failed = |reason: HandshakeFailure| {
        fwd.metrics.handshake_failed(Direction::Inbound, reason);
        info!(%target, reason = reason.as_str(), "refused an mTLS client");
    };
    let (tls, header) = match accepted {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(reason)) => return failed(reason),
        Err(_elapsed) => return failed(HandshakeFailure::Timeout),
    };
    // The verifier required a certificate, so there is one; its first DNS SAN is the
    // client's identity.
    let client_id = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| tls::identity_of(leaf).ok())
        .unwrap_or_default();

    let (destination, protocol) = match header {
        Some(header) => {
            let destination = SocketAddr::new(target.ip(), header.port);
            let cx = Context {
                accepts_direct: false,
                inbound: &fwd.listeners.inbound,
                outbound: &fwd.listeners.outbound,
                is_local: Some(&crate::orig_dst::is_local),
                services: None,
            };
            if (direct && header.port == listener_port) || own_listener(destination, &cx).is_some()
            {
                // Forwarding to one of our own listeners would loop back into us.
                debug!(%target, %client_id, port = header.port, "transport header names a port of the proxy itself");
                fwd.metrics.refused(Direction::Inbound, Refused::SelfLoop);
                return failed(HandshakeFailure::Other);
            }
            let protocol = match header.protocol {
                Some(SessionProtocol::Http1) => Protocol::Http1,
                Some(SessionProtocol::Http2) => Protocol::Http2,
                None if header.tls => Protocol::Tls,
                None => Protocol::Opaque,
            };
            (SocketAddr::new(target.ip(), header.port), protocol)
        }
        None => (target, Protocol::Opaque),
    };
    let mut conn = fwd
        .metrics
        .open(Direction::Inbound, destination, protocol, Some(&client_id));
    let app = match connect_from(destination, from).await {
        Ok(stream) => stream,
        Err(error) => {
            info!(%destination, %client_id, %error, "cannot connect to the application");
            conn.set_errno(Some(errno_name(&error)));
            return;
        }
    };
    debug!(%destination, %client_id, "mTLS terminated");
    copy(tls, app, Vec::new(), &mut conn, destination).await;
}
