//! An outbound connection to a `--discovery` service address (`Route::Balanced`):
//! detect unless the service is opaque, pick a backend by weight and an endpoint by
//! power-of-two-choices, connect (retrying a refused or timed-out connect on another
//! endpoint of the same backend and, once it has none left, of another backend: nothing
//! was sent yet, so it is always safe; see `balance::Attempts`), then copy
//! in plaintext (spliced, as for any plain destination) or, for an endpoint with an
//! identity, over mTLS to its proxy exactly as to a mesh peer.
//!
//! A connection detected as HTTP/1 or HTTP/2 is balanced per request instead
//! (`http::Balanced`): it is served by the HTTP proxy, and each of its requests picks a
//! backend by weight and an endpoint by peak-EWMA latency (an endpoint with an identity
//! over the pool's mTLS HTTP/2 connection to its proxy).
//!
//! The connection metrics keep the address the client dialled as `target_addr` (the
//! service address, as bounded as the file) and add `dst_service` and `dst_backend` (empty
//! for a connection balanced per request: its requests carry the backend).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::balance::{Load, Rng, Service, ServiceProtocol};
use crate::connect::connect;
use crate::detect::Protocol;
use crate::duplex::{duplex_tcp, Totals};
use crate::forward::Forwarder;
use crate::http::{self, Balanced};
use crate::metrics::{errno_name, ConnMetrics};
use crate::outcome::{HopError, Outcome};
use crate::prefixed::Prefixed;
use crate::route::Direction;

/// How many endpoints one connection tries before giving up.
pub(crate) const MAX_CONNECT_ATTEMPTS: usize = 3;

/// Forwards `client`, which dialled `original`, to an endpoint of `service`.
pub(crate) async fn forward(
    fwd: &Forwarder,
    mut client: TcpStream,
    original: SocketAddr,
    service: &Arc<Service>,
    conn: &mut Option<ConnMetrics>,
) -> Outcome {
    // The discovery file says what the service speaks: `opaque` connects at once, so a
    // server-speaks-first service needs no opaque port on the client side.
    let detect = service.protocol != ServiceProtocol::Opaque
        && !fwd.outbound_opaque_ports.contains(original.port());
    let classified = fwd
        .classify(&mut client, original, Direction::Outbound, detect)
        .await?;
    let version = match classified.protocol() {
        Protocol::Http1 => Some(http::Version::Http1),
        Protocol::Http2 => Some(http::Version::Http2),
        Protocol::Opaque | Protocol::Tls => None,
    };
    if let (Some(version), Some(balancer)) = (version, &fwd.balancer) {
        let conn = conn.insert(fwd.open(
            Direction::Outbound,
            original,
            classified.protocol(),
            None,
            Some((service.name.clone(), Arc::from(""))),
        ));
        let routed = http::ClientConn {
            direction: Direction::Outbound,
            target: original,
            version,
            upstream: Arc::new(Balanced {
                balancer: balancer.clone(),
                original,
            }),
            peer_id: None,
        };
        let client = Prefixed::new(classified.prefix, client);
        fwd.http.serve(client, routed, conn.counters()).await?;
        // The bytes are in the connection's counters; HTTP has no copy totals.
        return Ok(Totals::default());
    }
    let mut rng = Rng::thread();
    let mut attempts = service.attempts(Load::Connections);
    let mut last_error = None;
    // The backend of the last attempt, for the metrics of a connection that failed.
    let mut last_backend = None;
    while attempts.tried() < MAX_CONNECT_ATTEMPTS {
        let Some((backend, endpoint)) = attempts.next(Instant::now(), &mut rng) else {
            break;
        };
        last_backend = Some(backend);
        let dst = Some((service.name.clone(), backend.name.clone()));
        let open = endpoint.state.opened();
        // An endpoint with an identity is reached through its proxy's inbound port.
        let (dial, mesh) = match (&endpoint.identity, fwd.mesh.as_ref()) {
            (Some(_), Some(mesh)) => (
                SocketAddr::new(endpoint.addr.ip(), mesh.peer_inbound_port),
                Some(mesh),
            ),
            _ => (endpoint.addr, None),
        };
        // Each attempt is bounded by `--connect-timeout` (see `connect`), after which
        // the next endpoint is tried.
        let error = match connect(dial, fwd.connect_timeout).await {
            Ok(tcp) => {
                endpoint.state.succeeded();
                let peer_id = endpoint.identity.as_deref().filter(|_| mesh.is_some());
                let conn = conn.insert(fwd.open(
                    Direction::Outbound,
                    original,
                    classified.protocol(),
                    peer_id,
                    dst,
                ));
                debug!(%original, endpoint = %endpoint.addr, backend = &*backend.name, "balanced");
                let outcome = match (mesh, peer_id) {
                    (Some(mesh), Some(peer_id)) => {
                        let to = endpoint.addr;
                        super::over(fwd, mesh, client, tcp, to, classified, peer_id, conn).await
                    }
                    // Both ends are plain TCP sockets: bulk bytes can be spliced.
                    _ => Ok(duplex_tcp(client, tcp, classified.prefix, conn.counters()).await?),
                };
                drop(open);
                return outcome;
            }
            Err(error) => errno_name(&error),
        };
        let set_aside = endpoint.state.failed(Instant::now());
        info!(%original, endpoint = %dial, error, set_aside, "cannot connect to an endpoint, trying another");
        last_error = Some(error);
    }
    let Some(backend) = last_backend else {
        return Err(HopError::NoBackend {
            service: service.name.to_string(),
        });
    };
    // Every attempt failed: counted as a connection that closed with the last error,
    // like an unreachable plain destination, under the backend tried last.
    *conn = Some(fwd.open(
        Direction::Outbound,
        original,
        classified.protocol(),
        None,
        Some((service.name.clone(), backend.name.clone())),
    ));
    Err(HopError::Unreachable {
        service: service.name.to_string(),
        backend: backend.name.to_string(),
        last_error,
    })
}
