//! One connection, from its route to its close: the pipeline a reader can follow.
//!
//! ```text
//! accept (server) -> route (pure, before any byte) -> Route::Forward -> detect? (hop::detects)
//!   -> classify (read the first bytes, within budget) -> hop (pure, after detection)
//!   -> run the hop: opaque | http | inbound::terminate | outbound::mtls | mesh_http
//!   -> outcome::record (errno label, refusal and handshake counters, one log line)
//! ```
//!
//! `Route::Direct` (a peer proxy's mTLS to our inbound port) goes to `inbound::direct`,
//! `Route::Balanced` (a `--discovery` service) to `outbound::balanced`; both end in the
//! same `outcome::record`.
//!
//! The destination is a parameter: looking it up (`orig_dst`) belongs to the accept
//! loop, so this step runs the same in tests on loopback without any redirect rules.
//! The plaintext hops live here since they are the same in both directions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::debug;

use crate::balance::{Balancer, BalancerError, Table};
use crate::config::{Config, PortSet};
use crate::connect::connect_from;
use crate::detect::{detect, Detected, Protocol};
use crate::duplex::{duplex_tcp, Totals};
use crate::hop::{self, Hop, HttpVersion, MeshPolicy};
use crate::http::upstream::{MeshConnect, Transport};
use crate::http::{self, Direct, Endpoint, HttpMetrics, HttpProxy};
use crate::identity::IdentityError;
use crate::mesh::Mesh;
use crate::mesh_peers::MeshPeersError;
use crate::metrics::{ConnMetrics, Metrics};
use crate::outbound::mesh_http::MeshConnector;
use crate::outcome::{record, HopError, Outcome};
use crate::prefixed::Prefixed;
use crate::route::{Direction, Route};
use crate::{inbound, outbound};

/// What every connection needs: the policy from the config and the shared metrics.
pub struct Forwarder {
    pub(crate) metrics: Arc<Metrics>,
    detect_timeout: Duration,
    /// How long an mTLS peer may take to say hello and finish the handshake.
    pub(crate) handshake_timeout: Duration,
    /// How long any connect may take (`--connect-timeout`, see `connect`).
    pub(crate) connect_timeout: Duration,
    inbound_opaque_ports: PortSet,
    pub(crate) outbound_opaque_ports: PortSet,
    /// Permits for connections in detection (`--max-detecting`), one budget per
    /// direction: silent inbound clients must not refuse the pod's own outbound
    /// connections.
    detecting: PerDirection<Arc<Semaphore>>,
    /// Identity and meshed peers, when mTLS is configured.
    pub(crate) mesh: Option<Mesh>,
    /// Our listeners, which a transport header must not name (see `inbound`).
    pub(crate) listeners: Listeners,
    /// The services of `--discovery`, when configured (see `outbound::balanced`).
    pub(crate) balancer: Option<Arc<Balancer>>,
    /// `--inbound-transparent`: connect to the application from the client's address.
    inbound_transparent: bool,
    /// Connections detected as HTTP are proxied request by request (see `http`).
    pub(crate) http: HttpProxy,
}

/// The addresses the proxy listens on, by direction.
#[derive(Clone, Debug, Default)]
pub(crate) struct Listeners {
    pub(crate) inbound: Vec<SocketAddr>,
    pub(crate) outbound: Vec<SocketAddr>,
}

/// One value per direction: the connection and detection budgets.
#[derive(Debug)]
pub(crate) struct PerDirection<T> {
    pub(crate) inbound: T,
    pub(crate) outbound: T,
}

impl<T> PerDirection<T> {
    pub(crate) fn new(mut make: impl FnMut() -> T) -> PerDirection<T> {
        PerDirection {
            inbound: make(),
            outbound: make(),
        }
    }

    pub(crate) fn get(&self, direction: Direction) -> &T {
        match direction {
            Direction::Inbound => &self.inbound,
            Direction::Outbound => &self.outbound,
        }
    }
}

/// Why a [`Forwarder`] could not be built: the mTLS files are unusable.
#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    MeshPeers(#[from] MeshPeersError),
    #[error(transparent)]
    Discovery(#[from] BalancerError),
}

/// What a connection's first bytes were, or that they were not looked at.
pub(crate) struct Classified {
    pub(crate) detected: Option<Detected>,
    /// The bytes read to decide, replayed to the destination.
    pub(crate) prefix: Vec<u8>,
}

impl Classified {
    pub(crate) fn protocol(&self) -> Protocol {
        self.detected
            .as_ref()
            .map_or(Protocol::Opaque, Detected::protocol)
    }
}

impl Forwarder {
    /// Builds the forwarder of `config`, loading the identity and mesh peers files
    /// when they are configured.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Forwarder, ForwarderError> {
        let mesh = Mesh::new(config)?;
        let balancer = match &config.discovery {
            Some(path) => Some(Balancer::new(path, mesh.is_some(), metrics.clone())?),
            None => None,
        };
        let mesh_connector = mesh.as_ref().map(|mesh| {
            Arc::new(MeshConnector {
                identity: mesh.identity.clone(),
                metrics: metrics.clone(),
                peer_port: mesh.peer_inbound_port,
                connect_timeout: config.connect_timeout,
                handshake_timeout: config.handshake_timeout,
            }) as Arc<dyn MeshConnect>
        });
        let http_metrics = HttpMetrics::new(config.metrics_retain_idle);
        metrics.register(http_metrics.collector());
        Ok(Forwarder {
            metrics,
            detect_timeout: config.detect_timeout,
            handshake_timeout: config.handshake_timeout,
            connect_timeout: config.connect_timeout,
            inbound_opaque_ports: config.inbound_opaque_ports.clone(),
            outbound_opaque_ports: config.outbound_opaque_ports.clone(),
            detecting: PerDirection::new(|| Arc::new(Semaphore::new(config.max_detecting))),
            mesh,
            listeners: Listeners::default(),
            balancer,
            inbound_transparent: config.inbound_transparent,
            http: HttpProxy::new(
                config.connect_timeout,
                config.http_header_read_timeout,
                config.http_write_timeout,
                http_metrics,
                mesh_connector,
            ),
        })
    }

    /// The proxy shuts down: HTTP connections close once their requests in flight are
    /// answered (opaque ones are copied until they end, or the grace period does).
    pub(crate) fn drain(&self) {
        self.http.drain();
    }

    /// Tells the forwarder where the proxy listens, once bound.
    pub(crate) fn set_listeners(&mut self, listeners: Listeners) {
        self.listeners = listeners;
    }

    /// The services of `--discovery` for a new connection, reloaded if the file changed.
    pub(crate) fn services(&self) -> Option<Arc<Table>> {
        self.balancer.as_ref().map(|b| b.table())
    }

    /// Whether the inbound listener takes direct (not redirected) connections: with
    /// an identity, peer proxies connect to it directly, over mTLS.
    pub fn accepts_direct(&self) -> bool {
        self.mesh.is_some()
    }

    /// Forwards `client` (whose address `accept` gave as `client_addr`), accepted by the
    /// `direction` listener, as `route` decided, and records how it ended. Errors end
    /// the connection and are counted and logged by `outcome::record`; there is
    /// nothing to return.
    pub(crate) async fn forward(
        &self,
        client: TcpStream,
        client_addr: SocketAddr,
        direction: Direction,
        route: Route,
    ) {
        // TCP_NODELAY and keepalive come from the listener (`server::bind`).
        let client_addr = Some(client_addr);
        // The connection's metrics, once a hop counts it as open.
        let mut conn = None;
        let (target, outcome) = match route {
            Route::Forward(target) => {
                let outcome = self.forward_to(client, direction, target, &mut conn).await;
                (target, outcome)
            }
            Route::Direct(local) => {
                let outcome = match &self.mesh {
                    Some(mesh) => {
                        Box::pin(inbound::direct(self, mesh, client, local, &mut conn)).await
                    }
                    // `route` only decides `Direct` when `accepts_direct()`, i.e. with a mesh.
                    None => Err(HopError::NoIdentity),
                };
                (local, outcome)
            }
            Route::Balanced(original, service) => {
                let outcome = Box::pin(outbound::balanced::forward(
                    self, client, original, &service, &mut conn,
                ))
                .await;
                (original, outcome)
            }
        };
        record(&self.metrics, direction, client_addr, target, conn, outcome);
    }

    /// A connection to its original destination `target`: detect (unless the port is
    /// opaque), decide its [`Hop`], and run it.
    async fn forward_to(
        &self,
        mut client: TcpStream,
        direction: Direction,
        target: SocketAddr,
        conn: &mut Option<ConnMetrics>,
    ) -> Outcome {
        let opaque_ports = match direction {
            Direction::Inbound => &self.inbound_opaque_ports,
            Direction::Outbound => &self.outbound_opaque_ports,
        };
        let detect = self.decide(|mesh| hop::detects(direction, target, opaque_ports, mesh));
        let classified = self
            .classify(&mut client, target, direction, detect)
            .await?;
        let detected = classified.detected.as_ref();
        let hop = self.decide(|mesh| hop::hop(direction, target, detected, mesh));
        let mesh = self.mesh.as_ref();
        // Every hop but the opaque one is boxed: a connection's task is as large as the
        // largest state of its future, and an inlined HTTP or mTLS hop (16 KiB) would be
        // paid by every idle opaque connection (see `tests`).
        match (hop, mesh) {
            (Hop::IdentityRequired, _) => Err(HopError::IdentityRequired),
            (Hop::MtlsIn, Some(mesh)) => {
                let client = Prefixed::new(classified.prefix, client);
                Box::pin(inbound::terminate(self, mesh, client, target, false, conn)).await
            }
            (Hop::MtlsOut { server_id }, Some(mesh)) => {
                Box::pin(outbound::mtls(
                    self, mesh, client, target, classified, server_id, conn,
                ))
                .await
            }
            (Hop::MeshHttp { version, server_id }, Some(_)) => {
                Box::pin(self.mesh_http(client, target, classified, version, server_id, conn)).await
            }
            // `hop` only decides mTLS hops with a mesh.
            (Hop::MtlsIn | Hop::MtlsOut { .. } | Hop::MeshHttp { .. }, None) => {
                Err(HopError::NoIdentity)
            }
            // Detected HTTP, in plaintext: proxied request by request (see `http`).
            (Hop::Http(version), _) => {
                Box::pin(self.http(client, direction, target, classified, version, conn)).await
            }
            (Hop::Opaque, _) => {
                self.opaque(client, direction, target, classified, conn)
                    .await
            }
        }
    }

    /// Runs a decision of `hop` with the mesh configuration as it is now (the identity
    /// is reloaded when its files change), or `None` without an identity.
    fn decide<R>(&self, decision: impl FnOnce(Option<&MeshPolicy<'_>>) -> R) -> R {
        let Some(mesh) = &self.mesh else {
            return decision(None);
        };
        let identity = mesh.identity.current();
        let peer_identity = |target| mesh.peer_identity(target);
        decision(Some(&mesh.policy(&identity, &peer_identity)))
    }

    /// Reads the client's first bytes when `run_detection` says so, and records the
    /// detection metrics. An error when the connection ends here (closed, failed, or
    /// over the detection budget).
    pub(crate) async fn classify(
        &self,
        client: &mut TcpStream,
        target: SocketAddr,
        direction: Direction,
        run_detection: bool,
    ) -> Result<Classified, HopError> {
        if !run_detection {
            // Opaque ports skip detection (see `hop::detects`): we connect at once.
            return Ok(Classified {
                detected: None,
                prefix: Vec::new(),
            });
        }
        // The cap on connections in detection: each holds a buffer and may wait the
        // whole timeout, so a flood of silent clients is turned away here, at once,
        // instead of piling up.
        let Some(_permit) = self.detection_permit(direction) else {
            return Err(HopError::MaxDetecting);
        };
        let started = Instant::now();
        let detection = match detect(client, self.detect_timeout).await {
            Ok(detection) => detection,
            Err(error) => {
                self.metrics.detect_error(started.elapsed());
                return Err(HopError::Detect(error));
            }
        };
        self.metrics
            .detected(&detection.detected, started.elapsed());
        match &detection.detected {
            // Health checks and port scans do this; it is counted, not an error.
            Detected::Eof => return Err(HopError::ClientClosed),
            Detected::Timeout => debug!(
                %target,
                timeout = ?self.detect_timeout,
                "no protocol detected before the timeout, forwarding as opaque"
            ),
            Detected::Tls(hello) => debug!(
                %target,
                sni = ?hello.sni,
                alpn = ?hello.alpn.iter().map(|p| String::from_utf8_lossy(p)).collect::<Vec<_>>(),
                "detected TLS"
            ),
            other => debug!(%target, protocol = other.protocol().as_str(), "detected"),
        }
        Ok(Classified {
            detected: Some(detection.detected),
            prefix: detection.prefix,
        })
    }

    /// One of the `direction`'s detection permits (`--max-detecting`), if any is left.
    /// Per direction, so that inbound clients cannot use up the budget of the pod's own
    /// outbound connections.
    pub(crate) fn detection_permit(&self, direction: Direction) -> Option<OwnedSemaphorePermit> {
        self.detecting
            .get(direction)
            .clone()
            .try_acquire_owned()
            .ok()
    }

    /// Forwards in plaintext, as without mTLS: connect, replay, copy.
    async fn opaque(
        &self,
        client: TcpStream,
        direction: Direction,
        target: SocketAddr,
        classified: Classified,
        conn: &mut Option<ConnMetrics>,
    ) -> Outcome {
        let conn = conn.insert(self.open(direction, target, classified.protocol(), None, None));
        let from = self.source_for(direction, &client);
        let target_stream = self.connect_hop("destination", target, from).await?;
        // Both ends are plain TCP sockets: bulk bytes can be spliced.
        Ok(duplex_tcp(client, target_stream, classified.prefix, conn.counters()).await?)
    }

    /// Serves a plaintext HTTP client: each request goes to the original destination
    /// over the HTTP pool. The connection keeps its TCP metrics, `protocol="http1"` or
    /// `"http2"`, with the client's bytes counted underneath hyper.
    async fn http(
        &self,
        client: TcpStream,
        direction: Direction,
        target: SocketAddr,
        classified: Classified,
        version: HttpVersion,
        conn: &mut Option<ConnMetrics>,
    ) -> Outcome {
        let conn = conn.insert(self.open(direction, target, classified.protocol(), None, None));
        let from = self.source_for(direction, &client);
        let upstream = Direct(Endpoint {
            source: from.map(|from| from.ip()),
            ..Endpoint::plain(target)
        });
        let routed = http::ClientConn {
            direction,
            target,
            version,
            upstream: Arc::new(upstream),
            peer_id: None,
        };
        let client = Prefixed::new(classified.prefix, client);
        self.http.serve(client, routed, conn.counters()).await?;
        // The bytes are in the connection's counters; HTTP has no copy totals.
        Ok(Totals::default())
    }

    /// Serves an HTTP client whose destination is a mesh peer: each request goes over
    /// the pool's one mTLS HTTP/2 connection to the peer's proxy (see `http::orig_proto`
    /// and `outbound::mesh_http`). The connection counts `tls="true"` and
    /// `server_id`, like the opaque mTLS hop's.
    async fn mesh_http(
        &self,
        client: TcpStream,
        target: SocketAddr,
        classified: Classified,
        version: HttpVersion,
        server_id: String,
        conn: &mut Option<ConnMetrics>,
    ) -> Outcome {
        let direction = Direction::Outbound;
        let protocol = classified.protocol();
        let conn = conn.insert(self.open(direction, target, protocol, Some(&server_id), None));
        let server_id: Arc<str> = server_id.into();
        let upstream = Direct(Endpoint {
            addr: target,
            transport: Transport::Mesh {
                server_id: server_id.clone(),
            },
            source: None,
        });
        let routed = http::ClientConn {
            direction,
            target,
            version,
            upstream: Arc::new(upstream),
            peer_id: Some(server_id),
        };
        let client = Prefixed::new(classified.prefix, client);
        self.http.serve(client, routed, conn.counters()).await?;
        Ok(Totals::default())
    }

    /// Serves the HTTP connection of a peer proxy, `tls`, its mTLS terminated and its
    /// transport header read (session protocol `version`): each request goes to the
    /// application at `destination` (from `from` with `--inbound-transparent`), in
    /// the session's version, or in HTTP/1 when the peer marked an HTTP/2 request so
    /// (`http::orig_proto`).
    pub(crate) async fn serve_peer_http<I>(
        &self,
        tls: I,
        version: HttpVersion,
        destination: SocketAddr,
        from: Option<SocketAddr>,
        client_id: &str,
        conn: &ConnMetrics,
    ) -> Outcome
    where
        I: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + http::ClientSocket
            + Unpin
            + Send
            + 'static,
    {
        let upstream = Direct(Endpoint {
            source: from.map(|from| from.ip()),
            ..Endpoint::plain(destination)
        });
        let routed = http::ClientConn {
            direction: Direction::Inbound,
            target: destination,
            version,
            upstream: Arc::new(upstream),
            peer_id: Some(client_id.into()),
        };
        self.http.serve(tls, routed, conn.counters()).await?;
        Ok(Totals::default())
    }

    /// Counts a connection as open: `peer_id` is the peer's identity on mTLS hops,
    /// `dst` the service and backend of a balanced one.
    pub(crate) fn open(
        &self,
        direction: Direction,
        target: SocketAddr,
        protocol: Protocol,
        peer_id: Option<&str>,
        dst: Option<(Arc<str>, Arc<str>)>,
    ) -> ConnMetrics {
        let peer_id = peer_id.map(|id| direction.peer_id(id));
        self.metrics
            .open_balanced(direction, target, protocol, peer_id, dst)
    }

    /// Opens the hop's connection to `addr` (from `from`, see [`Self::source_for`])
    /// within `--connect-timeout`; `what` names the far end in the error.
    pub(crate) async fn connect_hop(
        &self,
        what: &'static str,
        addr: SocketAddr,
        from: Option<SocketAddr>,
    ) -> Result<TcpStream, HopError> {
        connect_from(addr, from, self.connect_timeout)
            .await
            .map_err(|error| HopError::Connect { what, addr, error })
    }

    /// The address the connection to `target` is made from: the client's, for
    /// inbound connections with `--inbound-transparent`, so that the application sees
    /// who the client is; the kernel's choice otherwise.
    pub(crate) fn source_for(
        &self,
        direction: Direction,
        client: &TcpStream,
    ) -> Option<SocketAddr> {
        // Only then is the client's address needed: no `getpeername` otherwise.
        if direction == Direction::Inbound && self.inbound_transparent {
            client.peer_addr().ok()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    /// Every open connection is one task holding this future, sized for its largest
    /// state: a large hop inlined here would be paid by every idle opaque connection
    /// (PERFORMANCE.md: at most 24 KiB each), so the large hops are boxed.
    #[tokio::test]
    async fn a_connections_future_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        let client = TcpStream::connect(target).await.unwrap();
        let config = Config::default();
        let forwarder = Forwarder::new(&config, Arc::new(Metrics::new())).unwrap();
        let client_addr = client.local_addr().unwrap();
        let future = forwarder.forward(
            client,
            client_addr,
            Direction::Outbound,
            Route::Forward(target),
        );
        let size = std::mem::size_of_val(&future);
        eprintln!("forward future: {size} bytes");
        assert!(size <= 4096, "a connection's future is {size} bytes");
    }
}
