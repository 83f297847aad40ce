//! One connection, from its known destination to its close: detect (unless the port
//! is opaque), connect, replay the detected bytes, copy, count.
//!
//! The destination is a parameter: looking it up (`orig_dst`) belongs to the accept
//! loop, so this step runs the same in tests on loopback without any redirect rules.
//!
//! With an identity configured, three more paths branch off here, implemented in
//! `mtls`: outbound connections to a meshed destination go over mTLS to the peer
//! proxy; inbound direct connections from peer proxies (and TLS clients naming our
//! identity on an application port) are terminated; and plaintext clients on
//! `--require-identity-ports` are refused.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::balance::{Balancer, BalancerError, Table};
use crate::config::{Config, PortSet};
use crate::detect::{detect, Detected, Protocol};
use crate::duplex::{duplex, duplex_tcp, DuplexError, Totals};
use crate::http::{self, Direct, Endpoint, HttpProxy};
use crate::identity::IdentityError;
use crate::mesh_peers::MeshPeersError;
use crate::metrics::{errno_name, ConnMetrics, Direction, Metrics, Refused};
use crate::prefixed::Prefixed;
use crate::route::Route;

mod balanced;
mod mtls;

use self::mtls::Mesh;

/// What every connection needs: the policy from the config and the shared metrics.
pub struct Forwarder {
    metrics: Arc<Metrics>,
    detect_timeout: Duration,
    /// How long an mTLS peer may take to say hello and finish the handshake.
    handshake_timeout: Duration,
    inbound_opaque_ports: PortSet,
    outbound_opaque_ports: PortSet,
    /// Permits for connections in detection (`--max-detecting`), one budget per
    /// direction: silent inbound clients must not refuse the pod's own outbound
    /// connections.
    detecting: PerDirection<Arc<Semaphore>>,
    /// Identity and meshed peers, when mTLS is configured.
    mesh: Option<Mesh>,
    /// Our listeners, which a transport header must not name (see `mtls::inbound`).
    listeners: Listeners,
    /// The services of `--discovery`, when configured (see `balanced`).
    balancer: Option<Arc<Balancer>>,
    /// `--inbound-transparent`: connect to the application from the client's address.
    inbound_transparent: bool,
    /// Connections detected as HTTP are proxied request by request (see `http`).
    http: HttpProxy,
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

/// TCP keepalive on both sockets of a forwarded connection: probes start after 60 s
/// without traffic, every 10 s, and 6 unanswered probes (2 minutes in all) reset the
/// connection. Without it a peer that vanished (a node gone, a NAT entry expired) holds
/// its connection slot and two descriptors until the process restarts; with it the
/// copy loop gets an error and the slot is freed. Idle but live connections are not
/// affected: the peer's kernel answers the probes.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 6;

/// Enables [`KEEPALIVE_IDLE`] and friends on a forwarded connection's socket.
pub(crate) fn set_keepalive(stream: &TcpStream) -> io::Result<()> {
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    SockRef::from(stream).set_tcp_keepalive(&keepalive)
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
struct Classified {
    detected: Option<Detected>,
    prefix: Vec<u8>,
}

impl Classified {
    fn protocol(&self) -> Protocol {
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
        Ok(Forwarder {
            metrics: metrics.clone(),
            detect_timeout: config.detect_timeout,
            handshake_timeout: config.handshake_timeout,
            inbound_opaque_ports: config.inbound_opaque_ports.clone(),
            outbound_opaque_ports: config.outbound_opaque_ports.clone(),
            detecting: PerDirection::new(|| Arc::new(Semaphore::new(config.max_detecting))),
            mesh,
            listeners: Listeners::default(),
            balancer,
            inbound_transparent: config.inbound_transparent,
            http: HttpProxy::new(config.connect_timeout, metrics.http().clone()),
        })
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

    /// Forwards `client`, accepted by the `direction` listener, as `route` decided.
    /// Errors end the connection and are logged and counted here; there is nothing to
    /// return.
    ///
    /// [`Route::Direct`] is a peer proxy's direct mTLS connection to our inbound port
    /// (only decided with an identity); see `mtls`.
    pub(crate) async fn forward(&self, mut client: TcpStream, direction: Direction, route: Route) {
        // We forward what we read as soon as we read it; Nagle would only add delay.
        let _ = client.set_nodelay(true);
        // Best effort: a socket that refuses keepalive is still forwarded.
        let _ = set_keepalive(&client);
        let mesh = self.mesh.as_ref();

        let target = match (route, mesh) {
            (Route::Forward(target), _) => target,
            (Route::Direct(local), Some(mesh)) => {
                return mtls::inbound_direct(self, mesh, client, local).await;
            }
            // `route` only decides `Direct` when `accepts_direct()`, i.e. with a mesh.
            (Route::Direct(_), None) => return,
            (Route::Balanced(original, service), _) => {
                return balanced::forward(self, client, original, &service).await;
            }
        };

        // On a port that requires an identity we must see whether the client starts a
        // TLS session for us, so it is detected even if it is opaque: a plaintext client
        // is refused there anyway, so there is no server greeting to wait for.
        let require_identity = direction == Direction::Inbound
            && mesh.is_some_and(|m| m.require_identity_ports.contains(target.port()));
        let opaque_ports = match direction {
            Direction::Inbound => &self.inbound_opaque_ports,
            Direction::Outbound => &self.outbound_opaque_ports,
        };
        let detect = require_identity || !opaque_ports.contains(target.port());
        let Some(classified) = self.classify(&mut client, target, direction, detect).await else {
            return;
        };

        if let (Some(mesh), Direction::Inbound) = (mesh, direction) {
            if let Some(Detected::Tls(hello)) = &classified.detected {
                let identity = mesh.identity.current();
                if hello.sni.as_deref() == Some(identity.name()) {
                    // A peer proxy (or a mesh-aware client) addressed us by our
                    // identity on the application's port: terminate its mTLS here.
                    let client = Prefixed::new(classified.prefix, client);
                    return mtls::inbound(self, mesh, client, target, false).await;
                }
            }
        }
        if require_identity {
            self.metrics.refused(direction, Refused::IdentityRequired);
            info!(
                client = ?client.peer_addr().ok(),
                %target,
                "refusing a client without a mesh identity on a port that requires one"
            );
            return;
        }
        if let (Some(mesh), Direction::Outbound) = (mesh, direction) {
            if let Some(peer_id) = mesh.peer_identity(target) {
                return mtls::outbound(self, mesh, client, target, classified, peer_id).await;
            }
        }
        self.plaintext(client, direction, target, classified).await;
    }

    /// Reads the client's first bytes when `detect` says so, and records the outcome.
    /// `None` when the connection ends here (closed, failed, or over the cap).
    async fn classify(
        &self,
        client: &mut TcpStream,
        target: SocketAddr,
        direction: Direction,
        run_detection: bool,
    ) -> Option<Classified> {
        let client_addr = client.peer_addr().ok();
        if !run_detection {
            // Opaque ports skip detection. Detection waits for the client to speak
            // first; in server-speaks-first protocols (SMTP, MySQL, ...) the client waits
            // for the server's greeting instead, so detection would hold every such
            // connection for the whole detect timeout. On these ports we know in
            // advance that there is nothing to detect, so we connect at once.
            return Some(Classified {
                detected: None,
                prefix: Vec::new(),
            });
        }
        // The cap on connections in detection: each holds a buffer and may wait the
        // whole timeout, so a flood of silent clients is turned away here, at once,
        // instead of piling up. Per direction, so that inbound clients cannot use up
        // the budget of the pod's own outbound connections.
        let Ok(_permit) = self.detecting.get(direction).clone().try_acquire_owned() else {
            self.metrics.refused(direction, Refused::MaxDetecting);
            debug!(?client_addr, %target, "too many connections in protocol detection, closing");
            return None;
        };
        let started = Instant::now();
        let detection = match detect(client, self.detect_timeout).await {
            Ok(detection) => detection,
            Err(error) => {
                self.metrics.detect_error(started.elapsed());
                debug!(?client_addr, %target, %error, "client failed during protocol detection");
                return None;
            }
        };
        self.metrics
            .detected(&detection.detected, started.elapsed());
        match &detection.detected {
            Detected::Eof => {
                // Health checks and port scans do this; it is counted, not an error.
                debug!(?client_addr, %target, "client closed before sending anything");
                return None;
            }
            Detected::Timeout => debug!(
                ?client_addr,
                %target,
                timeout = ?self.detect_timeout,
                "no protocol detected before the timeout, forwarding as opaque"
            ),
            Detected::Tls(hello) => debug!(
                ?client_addr,
                %target,
                sni = ?hello.sni,
                alpn = ?hello.alpn.iter().map(|p| String::from_utf8_lossy(p)).collect::<Vec<_>>(),
                "detected TLS"
            ),
            other => {
                debug!(?client_addr, %target, protocol = other.protocol().as_str(), "detected")
            }
        }
        Some(Classified {
            detected: Some(detection.detected),
            prefix: detection.prefix,
        })
    }

    /// Forwards in plaintext, as without mTLS: connect, replay, copy.
    async fn plaintext(
        &self,
        client: TcpStream,
        direction: Direction,
        target: SocketAddr,
        classified: Classified,
    ) {
        let client_addr = client.peer_addr().ok();
        let mut conn = self
            .metrics
            .open(direction, target, classified.protocol(), None);
        let from = self.source_for(direction, client_addr);
        if let Some(version) = http::Version::detected(classified.protocol()) {
            let upstream = Direct(Endpoint {
                source: from.map(|from| from.ip()),
                ..Endpoint::plain(target)
            });
            let routed = http::Client {
                direction,
                target,
                version,
                upstream: Arc::new(upstream),
                peer_id: None,
            };
            let io = Prefixed::new(classified.prefix, client);
            let served = self.http.serve(io, routed, conn.counters()).await;
            return http::record(served, &mut conn, target);
        }
        let target_stream = match connect_from(target, from).await {
            Ok(stream) => stream,
            Err(error) => {
                info!(?client_addr, %target, %error, "cannot connect to the destination");
                conn.set_errno(Some(errno_name(&error)));
                return;
            }
        };
        // Both ends are plain TCP sockets: bulk bytes can be spliced.
        let copied = duplex_tcp(client, target_stream, classified.prefix, conn.counters()).await;
        record(copied, &mut conn, target);
    }
}

impl Forwarder {
    /// The address the connection to `target` is made from: the client's, for
    /// inbound connections with `--inbound-transparent`, so that the application sees
    /// who the client is; the kernel's choice otherwise.
    pub(crate) fn source_for(
        &self,
        direction: Direction,
        client: Option<SocketAddr>,
    ) -> Option<SocketAddr> {
        (direction == Direction::Inbound && self.inbound_transparent)
            .then_some(client)
            .flatten()
    }
}

/// Copies until both sides are done and records how the connection ended.
async fn copy<C, T>(client: C, target: T, prefix: Vec<u8>, conn: &mut ConnMetrics, to: SocketAddr)
where
    C: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let copied = duplex(client, target, prefix, conn.counters()).await;
    record(copied, conn, to);
}

/// Records how a connection ended: its errno label, and a debug line.
fn record(copied: Result<Totals, DuplexError>, conn: &mut ConnMetrics, to: SocketAddr) {
    match copied {
        Ok(totals) => {
            conn.set_errno(None);
            debug!(
                target = %to,
                sent = totals.client_to_target,
                received = totals.target_to_client,
                spliced = totals.spliced,
                "connection closed"
            );
        }
        Err(error) => {
            conn.set_errno(Some(errno_name(&error.source)));
            debug!(target = %to, %error, "connection failed");
        }
    }
}

/// Opens the proxy's own connection to a destination.
///
/// This connection is not redirected back into the proxy only because the proxy runs as
/// the proxy UID (2102 by default), whose traffic meshinit's outbound rule exempts, and
/// because inbound destinations (the pod's own address) are reached over `lo`, which the
/// rules exempt too. Under any other UID each forwarded connection would come back to
/// the outbound listener, until `--max-connections` stops the loop; meshproxy warns at
/// start-up when its UID is not `--proxy-uid`.
///
/// Meshed destinations get this same connection, to the peer's inbound port, wrapped
/// in mTLS by `mtls::outbound`.
///
/// The connection gets TCP keepalive (see [`KEEPALIVE_IDLE`]).
pub async fn connect(target: SocketAddr) -> io::Result<TcpStream> {
    connect_from(target, None).await
}

/// [`connect`], from the address `from` when given: a transparent socket
/// (IP_TRANSPARENT, which needs CAP_NET_ADMIN) bound to the client's address, so
/// that the application sees the client, not the pod, as its peer. meshinit's
/// `tproxy` mode routes the application's replies back to this socket.
///
/// The port is the kernel's choice, never the client's own: the client's
/// connection already holds the 4-tuple (client address and port, application
/// address and port) in this namespace, and a second connection with the same one
/// would be taken for it. The rare ephemeral port equal to the client's is
/// therefore refused and another one taken.
pub async fn connect_from(target: SocketAddr, from: Option<SocketAddr>) -> io::Result<TcpStream> {
    let stream = match from {
        None => TcpStream::connect(target).await?,
        Some(from) => {
            // Port 0: the kernel's choice; a link-local client keeps its scope.
            let mut source = from;
            source.set_port(0);
            if let SocketAddr::V6(v6) = &mut source {
                v6.set_flowinfo(0);
            }
            let mut socket = transparent_socket(source)?;
            if socket.local_addr()?.port() == from.port() {
                socket = transparent_socket(source)?;
            }
            socket.connect(target).await?
        }
    };
    stream.set_nodelay(true)?;
    set_keepalive(&stream)?;
    Ok(stream)
}

/// A TCP socket bound, with IP_TRANSPARENT, to `source` (which need not be ours).
fn transparent_socket(source: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
    let socket = match source {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    crate::orig_dst::set_transparent(&socket)?;
    socket.bind(source)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use nix::sys::socket::{getsockopt, sockopt};
    use tokio::net::TcpListener;

    use super::*;

    /// Both sockets of a forwarded connection: the one `connect` opens, and the
    /// accepted one, which `forward` passes through `set_keepalive`.
    #[tokio::test]
    async fn forwarded_sockets_have_tcp_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        set_keepalive(&accepted).unwrap();
        for stream in [&upstream, &accepted] {
            assert!(getsockopt(stream, sockopt::KeepAlive).unwrap());
            assert_eq!(getsockopt(stream, sockopt::TcpKeepIdle).unwrap(), 60);
            assert_eq!(getsockopt(stream, sockopt::TcpKeepInterval).unwrap(), 10);
            assert_eq!(getsockopt(stream, sockopt::TcpKeepCount).unwrap(), 6);
        }
    }
}
