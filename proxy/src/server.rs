//! The listeners, the accept loops, the connection cap and graceful shutdown.
//!
//! [`run`] binds and serves until `shutdown` completes (mini-redis' `server::run`
//! shape), then stops accepting, marks the proxy not ready, and lets open connections
//! drain for `--shutdown-grace` before dropping whatever is left.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::admin;
use crate::config::Config;
use crate::forward::{Forwarder, ForwarderError};
use crate::metrics::{Direction, Metrics, Refused};
use crate::orig_dst::{original_dst, OrigDstError};

/// Pending connections the kernel queues per listener before we accept them.
const BACKLOG: i32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Mesh(#[from] ForwarderError),
}

/// Runs the proxy with `config` until `shutdown` completes, then drains.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    Proxy::bind(config).await?.serve(shutdown).await
}

/// A proxy whose listeners are bound but not yet accepting.
pub struct Proxy {
    config: Config,
    inbound: Vec<TcpListener>,
    outbound: Vec<TcpListener>,
    admin: TcpListener,
    metrics: Arc<Metrics>,
    forwarder: Forwarder,
}

/// The addresses the proxy actually listens on (useful with port 0).
#[derive(Clone, Debug)]
pub struct BoundAddrs {
    pub inbound: Vec<SocketAddr>,
    pub outbound: Vec<SocketAddr>,
    pub admin: SocketAddr,
}

impl Proxy {
    /// Loads the identity and mesh peers (when configured), then binds the admin,
    /// inbound and outbound listeners of `config`. Unusable certificate files are an
    /// error here, before anything listens.
    ///
    /// An IPv6 address that cannot be bound because the host has no IPv6 is skipped with
    /// a warning, as long as another address of the same direction is bound: the
    /// defaults list both families and must work on IPv4-only hosts.
    pub async fn bind(config: Config) -> Result<Proxy, ServerError> {
        let metrics = Arc::new(Metrics::with_retain_idle(config.metrics_retain_idle));
        let forwarder = Forwarder::new(&config, metrics.clone())?;
        let admin = bind(config.admin_addr)?;
        let inbound = bind_all(&config.inbound_addrs)?;
        let outbound = bind_all(&config.outbound_addrs)?;
        Ok(Proxy {
            config,
            inbound,
            outbound,
            admin,
            metrics,
            forwarder,
        })
    }

    pub fn local_addrs(&self) -> BoundAddrs {
        let addrs = |ls: &[TcpListener]| ls.iter().filter_map(|l| l.local_addr().ok()).collect();
        BoundAddrs {
            inbound: addrs(&self.inbound),
            outbound: addrs(&self.outbound),
            admin: self
                .admin
                .local_addr()
                .expect("a bound listener has an address"),
        }
    }

    /// The metrics the proxy records.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Serves redirected connections, each sent to its `SO_ORIGINAL_DST`.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        self.serve_with(original_dst, shutdown).await
    }

    /// Serves connections, each sent where `destination` says. `serve` passes the
    /// kernel's original destination; tests pass a fixed address.
    pub async fn serve_with<F>(
        self,
        destination: F,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError>
    where
        F: Fn(&TcpStream) -> Result<SocketAddr, OrigDstError> + Send + Sync + 'static,
    {
        let addrs = self.local_addrs();
        let Proxy {
            config,
            inbound,
            outbound,
            admin,
            metrics,
            forwarder,
        } = self;

        let ready = Arc::new(AtomicBool::new(false));
        let admin_task = tokio::spawn(admin::serve(admin, metrics.clone(), ready.clone()));

        // `stop_accepting` ends the accept loops; `abort` ends the connections still open
        // when the grace period is over. Dropping the senders (this future cancelled)
        // does both.
        let (stop_accepting, stop_rx) = watch::channel(false);
        let (abort, abort_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            forwarder,
            metrics,
            connections: Arc::new(Semaphore::new(config.max_connections)),
            destination,
            abort: abort_rx,
        });
        let mut accept_loops = JoinSet::new();
        let listeners = (inbound.into_iter().map(|l| (Direction::Inbound, l)))
            .chain(outbound.into_iter().map(|l| (Direction::Outbound, l)));
        for (direction, listener) in listeners {
            accept_loops.spawn(accept_loop(
                listener,
                direction,
                shared.clone(),
                stop_rx.clone(),
            ));
        }
        ready.store(true, Ordering::Release);
        info!(
            inbound = ?addrs.inbound,
            outbound = ?addrs.outbound,
            admin = %addrs.admin,
            uid = nix::unistd::Uid::effective().as_raw(),
            "meshproxy ready"
        );

        shutdown.await;
        let grace = config.shutdown_grace;
        info!(
            ?grace,
            "shutting down: no new connections, draining open ones"
        );
        ready.store(false, Ordering::Release);
        let _ = stop_accepting.send(true);
        // The loops drop their listeners: from here the kernel refuses new connections.
        while accept_loops.join_next().await.is_some() {}

        // Every open connection holds one permit; all permits back means all closed.
        let all =
            u32::try_from(config.max_connections).expect("max_connections is capped by config");
        match tokio::time::timeout(grace, shared.connections.acquire_many(all)).await {
            Ok(_) => info!("all connections drained"),
            Err(_) => {
                let left = config.max_connections - shared.connections.available_permits();
                warn!(
                    left,
                    "shutdown grace period over, closing the remaining connections"
                );
                let _ = abort.send(true);
            }
        }
        admin_task.abort();
        Ok(())
    }
}

/// What the accept loops and connection tasks share.
struct Shared<F> {
    forwarder: Forwarder,
    metrics: Arc<Metrics>,
    /// One permit per open connection (`--max-connections`).
    connections: Arc<Semaphore>,
    destination: F,
    abort: watch::Receiver<bool>,
}

async fn accept_loop<F>(
    listener: TcpListener,
    direction: Direction,
    shared: Arc<Shared<F>>,
    mut stop: watch::Receiver<bool>,
) where
    F: Fn(&TcpStream) -> Result<SocketAddr, OrigDstError> + Send + Sync + 'static,
{
    loop {
        let stream = tokio::select! {
            biased;
            () = set(&mut stop) => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    accept_failed(&error).await;
                    continue;
                }
            },
        };
        // The connection cap: past it, close at once rather than queue, so a flood
        // cannot exhaust file descriptors (each connection costs two).
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            shared.metrics.refused(direction, Refused::MaxConnections);
            debug!(
                direction = direction.as_str(),
                "too many open connections, closing a new one"
            );
            continue;
        };
        let target =
            match (shared.destination)(&stream) {
                Ok(target) => target,
                // With mTLS, peer proxies connect to the inbound port directly. Under
                // meshinit's rules such a connection is redirected to the port it was
                // already going to (original destination == our own address); without
                // rules it has no NAT record at all. Either way its destination is the
                // listener itself, and `forward` will demand mTLS and a transport header.
                Err(
                    OrigDstError::NotRedirected { local, .. } | OrigDstError::Lookup { local, .. },
                ) if direction == Direction::Inbound && shared.forwarder.accepts_direct() => local,
                Err(error) => {
                    shared.metrics.refused(direction, Refused::NoOriginalDst);
                    warn!(direction = direction.as_str(), %error, "refusing connection");
                    continue;
                }
            };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut abort = shared.abort.clone();
            tokio::select! {
                () = shared.forwarder.forward(stream, direction, target) => {}
                () = set(&mut abort) => {}
            }
        });
    }
}

/// Completes when the flag is set, or when its sender is gone (the server stopped).
async fn set(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

/// Handles a failed `accept`. Errors about one connection (it was reset while queued)
/// are ignored; others (out of file descriptors) get a pause so the loop does not spin.
async fn accept_failed(error: &io::Error) {
    match error.kind() {
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset => {}
        _ => {
            warn!(%error, "accept failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn bind_all(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, ServerError> {
    let mut listeners = Vec::new();
    let mut skipped = None;
    for &addr in addrs {
        match bind(addr) {
            Ok(listener) => listeners.push(listener),
            Err(ServerError::Bind { addr, source }) if addr.is_ipv6() && no_ipv6(&source) => {
                warn!(%addr, error = %source, "IPv6 is not available, not listening on this address");
                skipped = Some(ServerError::Bind { addr, source });
            }
            Err(error) => return Err(error),
        }
    }
    match skipped {
        Some(error) if listeners.is_empty() => Err(error),
        _ => Ok(listeners),
    }
}

/// Whether a bind error means the host (or namespace) has no IPv6.
fn no_ipv6(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(code) if code == nix::libc::EAFNOSUPPORT || code == nix::libc::EADDRNOTAVAIL
    )
}

fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    let bind_error = |source| ServerError::Bind { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(bind_error)?;
    // A restarted proxy must be able to bind while its old connections sit in
    // TIME_WAIT.
    socket.set_reuse_address(true).map_err(bind_error)?;
    if addr.is_ipv6() {
        // `[::]:4143` must not claim IPv4 too, or it would clash with `0.0.0.0:4143`;
        // and IPv4 clients must reach the IPv4 socket, where SO_ORIGINAL_DST works.
        socket.set_only_v6(true).map_err(bind_error)?;
    }
    socket.set_nonblocking(true).map_err(bind_error)?;
    socket.bind(&addr.into()).map_err(bind_error)?;
    socket.listen(BACKLOG).map_err(bind_error)?;
    TcpListener::from_std(socket.into()).map_err(bind_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ipv4_and_ipv6_wildcards_share_a_port() {
        let v4 = bind("0.0.0.0:0".parse().unwrap()).unwrap();
        let port = v4.local_addr().unwrap().port();
        // Without IPV6_V6ONLY this bind would fail with EADDRINUSE.
        let v6 = bind(SocketAddr::from(([0u16; 8], port))).unwrap();
        assert_eq!(v6.local_addr().unwrap().port(), port);
    }

    #[tokio::test]
    async fn an_ipv6_address_the_host_lacks_is_skipped_if_another_binds() {
        // fd00::dead is not assigned to any interface here: EADDRNOTAVAIL.
        let missing: SocketAddr = "[fd00::dead]:0".parse().unwrap();
        let listeners = bind_all(&["127.0.0.1:0".parse().unwrap(), missing]).unwrap();
        assert_eq!(listeners.len(), 1);
        // Alone, it is an error: a direction without any listener is useless.
        let err = bind_all(&[missing]).unwrap_err();
        assert!(err.to_string().contains("[fd00::dead]:0"), "{err}");
        // Any other bind failure is fatal.
        let taken = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = taken.local_addr().unwrap();
        assert!(bind_all(&[addr, missing]).is_err());
    }
}
