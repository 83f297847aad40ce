//! The outbound hops that leave in mTLS, and balanced services (`balanced`).
//!
//! To a destination listed in `--mesh-peers` (`hop::Hop::MtlsOut`), [`mtls`] connects
//! to the peer's inbound port (4143) at the destination's address, handshakes with
//! SNI = the identity expected there and ALPN `transport.l5d.io/v1`, verifies the
//! server certificate against the trust anchors and that identity, sends the transport
//! header (the original port, and the session protocol when detection found HTTP),
//! then the client's bytes. The handshake and header must finish within
//! `--handshake-timeout`. [`over`] is that hop on a connection already open, which is
//! also how a balanced endpoint with an identity is reached.
//!
//! Each hop returns an [`Outcome`]; `outcome::record` counts and logs it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::detect::Protocol;
use crate::duplex::duplex;
use crate::forward::{Classified, Forwarder};
use crate::mesh::{Mesh, TLS_READ_BUF};
use crate::metrics::ConnMetrics;
use crate::outcome::{HopError, Outcome};
use crate::route::Direction;
use crate::tls::HandshakeFailure;
use crate::transport_header::{self, SessionProtocol, TransportHeader};

pub(crate) mod balanced;
pub(crate) mod mesh_http;

/// Carries `client` to `target` over mTLS to its peer proxy, which must prove
/// `server_id`.
pub(crate) async fn mtls(
    fwd: &Forwarder,
    mesh: &Mesh,
    client: TcpStream,
    target: SocketAddr,
    classified: Classified,
    server_id: String,
    conn: &mut Option<ConnMetrics>,
) -> Outcome {
    let protocol = classified.protocol();
    let conn = conn.insert(fwd.open(
        Direction::Outbound,
        target,
        protocol,
        Some(&server_id),
        None,
    ));
    let peer = SocketAddr::new(target.ip(), mesh.peer_inbound_port);
    let tcp = fwd.connect_hop("peer proxy", peer, None).await?;
    over(fwd, mesh, client, tcp, target, classified, &server_id, conn).await
}

/// The mTLS hop of [`mtls`] over `tcp`, a connection already open to the peer proxy
/// of `target`, counted in `conn`: handshake, transport header naming `target`'s port,
/// copy.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn over(
    fwd: &Forwarder,
    mesh: &Mesh,
    client: TcpStream,
    tcp: TcpStream,
    target: SocketAddr,
    classified: Classified,
    server_id: &str,
    conn: &ConnMetrics,
) -> Outcome {
    let protocol = classified.protocol();
    let peer = tcp.peer_addr().ok();
    let client_config = mesh.identity.current().client_config();
    let header = header(target, protocol);
    let tls = handshake(
        client_config,
        tcp,
        server_id,
        &header,
        fwd.handshake_timeout,
    )
    .await
    .map_err(|reason| HopError::PeerHandshake {
        reason,
        peer,
        peer_id: server_id.to_string(),
    })?;
    debug!(%target, ?peer, %server_id, "mTLS established");
    Ok(duplex(client, tls, classified.prefix, conn.counters()).await?)
}

/// The client side of the mTLS session with a peer proxy over `tcp`: handshake with
/// SNI = `server_id` and ALPN `transport.l5d.io/v1`, verify that the peer proves
/// `server_id`, write `header`. All within `timeout`. Shared by the opaque hop above
/// and the HTTP pool's connections to peers (`mesh_http`).
pub(crate) async fn handshake(
    client_config: Arc<ClientConfig>,
    tcp: TcpStream,
    server_id: &str,
    header: &TransportHeader,
    timeout: Duration,
) -> Result<TlsStream<BufReader<TcpStream>>, HandshakeFailure> {
    let Ok(server_name) = ServerName::try_from(server_id.to_string()) else {
        // Checked when the peers file was parsed; kept as a guard, not a panic.
        return Err(HandshakeFailure::Other);
    };
    let connector = TlsConnector::from(client_config);
    let handshake = tokio::time::timeout(timeout, async {
        let mut tls = connector
            .connect(server_name, BufReader::with_capacity(TLS_READ_BUF, tcp))
            .await
            .map_err(|e| HandshakeFailure::of(&e))?;
        // A server that ignored our ALPN would not understand the header either.
        if tls.get_ref().1.alpn_protocol() != Some(transport_header::ALPN) {
            return Err(HandshakeFailure::BadAlpn);
        }
        // The header is ours, not the client's, so it is written here rather than
        // replayed by `duplex` (which counts its prefix as bytes read from the client).
        tls.write_all(&header.encode())
            .await
            .map_err(|e| HandshakeFailure::of(&e))?;
        Ok(tls)
    })
    .await;
    match handshake {
        Ok(result) => result,
        Err(_elapsed) => Err(HandshakeFailure::Timeout),
    }
}

/// The transport header for `target`'s port and the detected `protocol`.
fn header(target: SocketAddr, protocol: Protocol) -> TransportHeader {
    match protocol {
        Protocol::Http1 => TransportHeader::new(target.port(), Some(SessionProtocol::Http1)),
        Protocol::Http2 => TransportHeader::new(target.port(), Some(SessionProtocol::Http2)),
        Protocol::Opaque => TransportHeader::new(target.port(), None),
        // TLS has no `SessionProtocol`: our field 1000 tells the inbound proxy, so both
        // label the connection `protocol="tls"`.
        Protocol::Tls => TransportHeader::tls(target.port()),
    }
}
