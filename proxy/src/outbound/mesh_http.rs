//! The connections the HTTP pool opens to mesh peers (`http::upstream::Transport::Mesh`):
//! TCP to the peer's inbound port (4143) at the destination's address, the mTLS
//! handshake of every outbound hop (`outbound::handshake`: SNI = the identity expected
//! there, ALPN `transport.l5d.io/v1`, the peer's certificate verified against the trust
//! anchors and that identity), and a transport header naming the destination's port
//! and the session protocol: HTTP/2 for the shared connection that carries requests,
//! HTTP/1 for a dedicated connection that carries an upgrade.
//!
//! A failed handshake counts in `tls_handshake_failures_total{direction="outbound"}`
//! like the opaque hop's, and the request is answered 502 `peer handshake failed`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tracing::debug;

use crate::connect::connect;
use crate::http::upstream::io::MeshStream;
use crate::http::upstream::{Connecting, MeshConnect};
use crate::http::{ProxyError, Version};
use crate::identity::IdentityWatch;
use crate::metrics::Metrics;
use crate::route::Direction;
use crate::transport_header::{SessionProtocol, TransportHeader};

/// Opens mTLS connections to peer proxies for the HTTP pool.
pub(crate) struct MeshConnector {
    pub(crate) identity: Arc<IdentityWatch>,
    pub(crate) metrics: Arc<Metrics>,
    /// The peers' inbound port (`--peer-inbound-port`, 4143).
    pub(crate) peer_port: u16,
    pub(crate) connect_timeout: Duration,
    pub(crate) handshake_timeout: Duration,
}

impl MeshConnector {
    async fn open(
        &self,
        target: SocketAddr,
        server_id: &str,
        session: Version,
    ) -> Result<MeshStream, ProxyError> {
        let proxy = SocketAddr::new(target.ip(), self.peer_port);
        let tcp = connect(proxy, self.connect_timeout)
            .await
            .map_err(|error| ProxyError::connect_within(proxy, error, self.connect_timeout))?;
        let session = match session {
            Version::Http1 => SessionProtocol::Http1,
            Version::Http2 => SessionProtocol::Http2,
        };
        let header = TransportHeader::new(target.port(), Some(session));
        let client_config = self.identity.current().client_config();
        let tls = super::handshake(
            client_config,
            tcp,
            server_id,
            &header,
            self.handshake_timeout,
        )
        .await
        .map_err(|reason| {
            self.metrics.handshake_failed(Direction::Outbound, reason);
            ProxyError::PeerHandshake {
                addr: proxy,
                server_id: server_id.to_string(),
                reason,
            }
        })?;
        debug!(%target, %proxy, %server_id, ?session, "mTLS connection for HTTP established");
        Ok(tls)
    }
}

impl MeshConnect for MeshConnector {
    fn connect<'a>(
        &'a self,
        target: SocketAddr,
        server_id: &'a str,
        session: Version,
    ) -> Connecting<'a> {
        Box::pin(self.open(target, server_id, session))
    }
}
