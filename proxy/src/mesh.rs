//! The mTLS part of the configuration, loaded: our identity (reloaded when its files
//! change), the mesh peers, the peers' inbound port and `--require-identity-ports`.
//! Shared by the decision after detection (`hop`, through [`Mesh::policy`]) and the
//! mTLS hops (`inbound`, `outbound`).

use std::net::SocketAddr;
use std::sync::Arc;

use tracing::info;

use crate::config::{Config, PortSet};
use crate::forward::ForwarderError;
use crate::hop::MeshPolicy;
use crate::identity::{Identity, IdentityWatch};
use crate::mesh_peers::MeshPeersWatch;

/// rustls reads the socket at most 4 KiB at a time; a TLS record is up to 16 KiB,
/// so without a buffer under it every record costs four `read` syscalls. One
/// record-sized buffer per mTLS connection makes it one.
pub(crate) const TLS_READ_BUF: usize = 16 * 1024;

/// The mTLS part of the configuration, loaded.
pub(crate) struct Mesh {
    /// Shared with the HTTP pool's connections to peers (`outbound::mesh_http`).
    pub(crate) identity: Arc<IdentityWatch>,
    peers: Option<MeshPeersWatch>,
    pub(crate) peer_inbound_port: u16,
    pub(crate) require_identity_ports: PortSet,
}

impl Mesh {
    /// `None` without an identity: the proxy then forwards everything in plaintext.
    pub(crate) fn new(config: &Config) -> Result<Option<Mesh>, ForwarderError> {
        let Some(files) = &config.identity else {
            return Ok(None);
        };
        let identity = Arc::new(IdentityWatch::new(files)?);
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
    pub(crate) fn peer_identity(&self, target: SocketAddr) -> Option<String> {
        let peers = self.peers.as_ref()?.current();
        peers.identity(target.ip()).map(str::to_string)
    }

    /// The plain values [`crate::hop`] decides with, for `identity` (the current one,
    /// which the caller holds while deciding).
    pub(crate) fn policy<'a>(
        &'a self,
        identity: &'a Identity,
        peer_identity: &'a dyn Fn(SocketAddr) -> Option<String>,
    ) -> MeshPolicy<'a> {
        MeshPolicy {
            identity: identity.name(),
            require_identity_ports: &self.require_identity_ports,
            peer_identity,
        }
    }
}
