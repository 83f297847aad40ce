//! The inbound mTLS hops: connections from peer proxies (and mesh-aware clients), which
//! we terminate before forwarding to the local application.
//!
//! A peer proxy connects to our inbound port directly (`route` decides
//! `Route::Direct`): [`direct`] waits for its ClientHello, then [`terminate`] requires a
//! client certificate chaining to the trust anchors and the transport ALPN, reads the
//! transport header, and forwards to the application at the connection's destination
//! address and the header's port. A TLS client that names our identity on an
//! application port (`hop::Hop::MtlsIn`) is terminated the same way, and may omit the
//! header: it is then forwarded to that port.
//!
//! A direct client must send its ClientHello within `--handshake-timeout`, and holds one
//! of the inbound detection permits (`--max-detecting`) until it has: otherwise silent
//! connections to port 4143 would pile up outside every budget. The handshake and the
//! header together must then finish within `--handshake-timeout` again: a peer that
//! stalls in either must not hold a connection slot forever.
//!
//! A header whose session protocol is HTTP/2 comes from a peer proxy's pooled HTTP
//! connection: it is served request by request (`Forwarder::serve_peer_http`), each
//! request sent to the application in HTTP/2, or in HTTP/1 when the peer marked it
//! `l5d-orig-proto` (`http::orig_proto`), with the golden metrics labelled
//! `tls="true"` and `client_id`. A header whose session protocol is HTTP/1 comes from
//! a connection the peer dedicated to an upgrade or `CONNECT`: it is served as HTTP/1
//! the same way (the request and its 101 or 2xx counted), then the upgraded bytes are
//! carried. A session without a protocol (opaque, TLS) is forwarded as bytes.
//!
//! Each hop returns an [`Outcome`]; `outcome::record` counts and logs it.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::detect::{detect, Detected, Protocol};
use crate::duplex::duplex;
use crate::forward::Forwarder;
use crate::hop::HttpVersion;
use crate::mesh::{Mesh, TLS_READ_BUF};
use crate::metrics::ConnMetrics;
use crate::outcome::{HopError, Outcome};
use crate::prefixed::Prefixed;
use crate::route::{own_listener, Context, Direction};
use crate::tls::{self, HandshakeFailure};
use crate::transport_header::{self, SessionProtocol, TransportHeader};

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The most bytes read to see that a session of protocol HTTP/1 has started.
const HTTP1_FIRST_READ: usize = 4096;

/// A peer proxy's direct connection to our inbound listener at `local`: waits, holding
/// an inbound detection permit, for its ClientHello, then terminates its mTLS.
pub(crate) async fn direct(
    fwd: &Forwarder,
    mesh: &Mesh,
    mut client: TcpStream,
    local: SocketAddr,
    conn: &mut Option<ConnMetrics>,
) -> Outcome {
    let hello = {
        let Some(_permit) = fwd.detection_permit(Direction::Inbound) else {
            return Err(HopError::MaxDetecting);
        };
        // `detect` reads until the bytes are decisive: for TLS, the whole ClientHello
        // record (or 8 KiB of it). Whatever it read is replayed to rustls.
        detect(&mut client, fwd.handshake_timeout)
            .await
            .map_err(HopError::Detect)?
    };
    match hello.detected {
        Detected::Eof => Err(HopError::ClientClosed),
        Detected::Timeout => Err(HopError::NoClientHello {
            timeout: fwd.handshake_timeout,
        }),
        // Not TLS is left to rustls, which rejects it with the usual reason.
        _ => {
            let client = Prefixed::new(hello.prefix, client);
            terminate(fwd, mesh, client, local, true, conn).await
        }
    }
}

/// Terminates mTLS from a peer. `direct` says the client connected to the inbound
/// port itself, where the transport ALPN (and so the header) is required; a client
/// that named our identity on an application port may omit it and is then forwarded
/// to that port.
pub(crate) async fn terminate(
    fwd: &Forwarder,
    mesh: &Mesh,
    client: Prefixed<TcpStream>,
    target: SocketAddr,
    direct: bool,
    conn: &mut Option<ConnMetrics>,
) -> Outcome {
    let identity = mesh.identity.current();
    let acceptor = TlsAcceptor::from(identity.server_config());
    let from = fwd.source_for(Direction::Inbound, client.get_ref());
    let accepted = tokio::time::timeout(fwd.handshake_timeout, async {
        let mut tls = acceptor
            .accept(BufReader::with_capacity(TLS_READ_BUF, client))
            .await
            .map_err(|e| HandshakeFailure::of(&e))?;
        // A header that does not parse is told apart below, once the client's identity
        // is known (it is counted as a handshake failure all the same).
        let header = if tls.get_ref().1.alpn_protocol() == Some(transport_header::ALPN) {
            Some(TransportHeader::read(&mut tls).await)
        } else if direct {
            return Err(HandshakeFailure::BadAlpn);
        } else {
            None
        };
        Ok((tls, header))
    })
    .await;
    let (tls, header) = match accepted {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(reason)) => return Err(HopError::ClientHandshake { reason }),
        Err(_elapsed) => {
            return Err(HopError::ClientHandshake {
                reason: HandshakeFailure::Timeout,
            })
        }
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
        Some(Ok(header)) => {
            let destination = SocketAddr::new(target.ip(), header.port);
            if (direct && header.port == target.port()) || is_ours(fwd, destination) {
                // Forwarding to one of our own listeners would loop back into us.
                return Err(HopError::HeaderSelfLoop {
                    client_id,
                    port: header.port,
                });
            }
            (destination, session_protocol(&header))
        }
        Some(Err(error)) => return Err(HopError::BadHeader { client_id, error }),
        None => (target, Protocol::Opaque),
    };
    let conn = conn.insert(fwd.open(
        Direction::Inbound,
        destination,
        protocol,
        Some(&client_id),
        None,
    ));
    let timed_out = || HopError::ClientHandshake {
        reason: HandshakeFailure::Timeout,
    };
    match protocol {
        Protocol::Http2 => {
            // A peer proxy's HTTP connection (`outbound::mesh_http`): its requests are
            // served one by one. It must start with the HTTP/2 preface in time, like any
            // silent client.
            let mut tls = tls;
            let mut preface = [0u8; PREFACE.len()];
            let read = tls.read_exact(&mut preface);
            match tokio::time::timeout(fwd.handshake_timeout, read).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return Err(HopError::ClientClosed),
                Err(_elapsed) => return Err(timed_out()),
            }
            debug!(%destination, %client_id, "mTLS terminated, serving HTTP/2");
            let tls = Prefixed::new(preface.to_vec(), tls);
            return fwd
                .serve_peer_http(tls, HttpVersion::Http2, destination, from, &client_id, conn)
                .await;
        }
        Protocol::Http1 => {
            // A peer proxy's dedicated connection for an upgrade or `CONNECT`
            // (`http::orig_proto`): served as HTTP/1, so that the request is counted
            // here too, then its upgraded bytes are carried. Its first bytes must come
            // in time, as the HTTP/2 preface must.
            let mut tls = tls;
            let mut first = vec![0u8; HTTP1_FIRST_READ];
            let n = match tokio::time::timeout(fwd.handshake_timeout, tls.read(&mut first)).await {
                Ok(Ok(0) | Err(_)) => return Err(HopError::ClientClosed),
                Ok(Ok(n)) => n,
                Err(_elapsed) => return Err(timed_out()),
            };
            first.truncate(n);
            debug!(%destination, %client_id, "mTLS terminated, serving HTTP/1");
            let tls = Prefixed::new(first, tls);
            return fwd
                .serve_peer_http(tls, HttpVersion::Http1, destination, from, &client_id, conn)
                .await;
        }
        Protocol::Opaque | Protocol::Tls => {}
    }
    let app = fwd.connect_hop("application", destination, from).await?;
    debug!(%destination, %client_id, "mTLS terminated");
    Ok(duplex(tls, app, Vec::new(), conn.counters()).await?)
}

/// Whether `destination` is one of our own listeners.
fn is_ours(fwd: &Forwarder, destination: SocketAddr) -> bool {
    let cx = Context {
        accepts_direct: false,
        inbound: &fwd.listeners.inbound,
        outbound: &fwd.listeners.outbound,
        is_local: Some(&crate::orig_dst::is_local),
        services: None,
    };
    own_listener(destination, &cx).is_some()
}

/// The `protocol` label the sending proxy detected, as its header says.
fn session_protocol(header: &TransportHeader) -> Protocol {
    match header.protocol {
        Some(SessionProtocol::Http1) => Protocol::Http1,
        Some(SessionProtocol::Http2) => Protocol::Http2,
        None if header.tls => Protocol::Tls,
        None => Protocol::Opaque,
    }
}
