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
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
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
pub(crate) async fn handshake<IO>(
    client_config: Arc<ClientConfig>,
    tcp: IO,
    server_id: &str,
    header: &TransportHeader,
    timeout: Duration,
) -> Result<TlsStream<BufReader<IO>>, HandshakeFailure>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let Ok(server_name) = ServerName::try_from(server_id.to_string()) else {
        // Checked when the peers file was parsed; kept as a guard, not a panic.
        return Err(HandshakeFailure::Other);
    };
    let connector = TlsConnector::from(client_config);
    let encoded = header.encode();
    let handshake = tokio::time::timeout(timeout, async {
        // The header is ours, not the client's, so it is written here rather than
        // replayed by `duplex` (which counts its prefix as bytes read from the client).
        // It is handed to rustls before the handshake: rustls holds application data
        // until the handshake is complete (the server proved `server_id`) and then sends
        // it in the same write as our Finished, so the server has the header with the
        // handshake's last flight instead of one more packet, and one more wake-up,
        // later. (Not early data: nothing is sent before the server is verified.)
        let mut buffered = Ok(());
        let mut tls = connector
            .connect_with(
                server_name,
                BufReader::with_capacity(TLS_READ_BUF, tcp),
                |conn| buffered = std::io::Write::write_all(&mut conn.writer(), &encoded),
            )
            .await
            .map_err(|e| HandshakeFailure::of(&e))?;
        // Only copied into rustls' plaintext buffer (64 KiB), so this cannot fail for
        // a header; checked rather than assumed.
        buffered.map_err(|e| HandshakeFailure::of(&e))?;
        // A server that ignored our ALPN does not understand the header: the session is
        // refused (the header, a port number, went to a server that proved `server_id`).
        if tls.get_ref().1.alpn_protocol() != Some(transport_header::ALPN) {
            return Err(HandshakeFailure::BadAlpn);
        }
        // Whatever rustls did not manage to write yet goes now.
        tls.flush().await.map_err(|e| HandshakeFailure::of(&e))?;
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

#[cfg(test)]
mod tests {
    use std::io;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    use tokio::io::{AsyncReadExt, ReadBuf};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;

    use super::*;
    use crate::tls::testing;

    /// A TCP stream that counts the writes made to it (each one a `write`/`writev`).
    struct CountWrites {
        tcp: TcpStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for CountWrites {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.tcp).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for CountWrites {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let polled = Pin::new(&mut self.tcp).poll_write(cx, buf);
            if let Poll::Ready(Ok(_)) = polled {
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            polled
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let polled = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
            if let Poll::Ready(Ok(_)) = polled {
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            polled
        }

        fn is_write_vectored(&self) -> bool {
            self.tcp.is_write_vectored()
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.tcp).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.tcp).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn the_transport_header_leaves_with_the_clients_finished() {
        let mut mesh = testing::mesh(&["a.test.mesh.local", "b.test.mesh.local"]);
        let b = mesh.pop().unwrap();
        let a = mesh.pop().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(b.server);
        let server = tokio::spawn(async move {
            let mut sessions = Vec::new();
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut tls = acceptor.accept(tcp).await.unwrap();
                let header = TransportHeader::read(&mut tls).await.unwrap();
                // The client's bytes after the header, up to its close.
                let mut rest = Vec::new();
                tls.read_to_end(&mut rest).await.unwrap();
                sessions.push((header.port, rest));
            }
            sessions
        });
        // A full handshake, then a resumed one, as between two proxies.
        let mut writes_per_handshake = Vec::new();
        for _ in 0..2 {
            let writes = Arc::new(AtomicUsize::new(0));
            let tcp = CountWrites {
                tcp: TcpStream::connect(addr).await.unwrap(),
                writes: writes.clone(),
            };
            let header = TransportHeader::new(6379, None);
            let mut tls = handshake(
                a.client.clone(),
                tcp,
                "b.test.mesh.local",
                &header,
                Duration::from_secs(5),
            )
            .await
            .unwrap();
            writes_per_handshake.push(writes.load(Ordering::Relaxed));
            tls.write_all(b"PING\r\n").await.unwrap();
            tls.shutdown().await.unwrap();
        }
        let sessions = server.await.unwrap();
        for (port, rest) in &sessions {
            assert_eq!(*port, 6379);
            assert_eq!(rest, b"PING\r\n");
        }
        // The ClientHello, then the Finished with the header in one write: no packet of
        // its own for the header (nor one more wake-up of the server for it).
        assert_eq!(writes_per_handshake, [2, 2]);
    }
}
