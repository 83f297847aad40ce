//! The listeners, the accept loops, the connection caps and graceful shutdown.
//!
//! [`run`] binds and serves until `shutdown` completes (mini-redis' `server::run`
//! shape), then stops accepting, marks the proxy not ready, and lets open connections
//! drain for `--shutdown-grace` before dropping whatever is left.
//!
//! Inbound and outbound connections have separate budgets (`--max-connections` and
//! `--max-detecting` each apply per direction): one shared cap let a flood of silent
//! inbound sockets refuse the pod's own outbound connections.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::admin;
use crate::config::Config;
use crate::forward::{Forwarder, ForwarderError, Listeners, PerDirection};
use crate::metrics::Metrics;
use crate::orig_dst::{self, accepted_original_dst, OrigDstError};
use crate::outcome::Refused;
use crate::route::Direction;
use crate::route::{self, Context, Refusal};

/// Pending connections the kernel queues per listener before we accept them.
const BACKLOG: i32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot read the address of a bound listener: {0}")]
    LocalAddr(io::Error),
    #[error("cannot make the inbound listener {addr} transparent (--inbound-transparent needs CAP_NET_ADMIN): {source}")]
    Transparent { addr: SocketAddr, source: io::Error },
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
    addrs: BoundAddrs,
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
        let mut forwarder = Forwarder::new(&config, metrics.clone())?;
        let admin = bind(config.admin_addr, false)?;
        let inbound = bind_all(&config.inbound_addrs, config.inbound_transparent)?;
        let outbound = bind_all(&config.outbound_addrs, false)?;
        let addrs = BoundAddrs {
            inbound: local_addrs(&inbound)?,
            outbound: local_addrs(&outbound)?,
            admin: local_addr(&admin)?,
        };
        forwarder.set_listeners(Listeners {
            inbound: addrs.inbound.clone(),
            outbound: addrs.outbound.clone(),
        });
        Ok(Proxy {
            config,
            inbound,
            outbound,
            admin,
            addrs,
            metrics,
            forwarder,
        })
    }

    pub fn local_addrs(&self) -> BoundAddrs {
        self.addrs.clone()
    }

    /// The metrics the proxy records.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Serves redirected connections, each sent to its `SO_ORIGINAL_DST` unless `route`
    /// refuses it (the trust boundary: see there).
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        if orig_dst::nonlocal_bind_enabled() {
            warn!(
                "net.ipv4/ipv6.ip_nonlocal_bind is set in this network namespace: inbound \
                 original destinations that are not addresses of the pod cannot be told apart \
                 and are forwarded"
            );
        }
        let transparent = self.config.inbound_transparent;
        self.serve_inner(
            |stream: &TcpStream, accepted: Accepted| {
                accepted_original_dst(stream, accepted.listener, accepted.peer)
            },
            Some(orig_dst::is_local),
            transparent,
            shutdown,
        )
        .await
    }

    /// Serves connections, each sent where `destination` says. `serve` passes the
    /// kernel's original destination; tests pass a fixed address, which is trusted as
    /// chosen: only the self-loop check of `route` applies to it, not the inbound
    /// address checks (a test's destination is on loopback).
    pub async fn serve_with<F>(
        self,
        destination: F,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError>
    where
        F: Fn(&TcpStream) -> Result<SocketAddr, OrigDstError> + Send + Sync + 'static,
    {
        let destination = move |stream: &TcpStream, _: Accepted| destination(stream);
        self.serve_inner(destination, None, false, shutdown).await
    }

    /// `transparent`: inbound connections come by TPROXY, and their destination is
    /// the accepted socket's own address (`orig_dst::transparent_dst`).
    async fn serve_inner<F>(
        self,
        destination: F,
        is_local: Option<fn(std::net::IpAddr) -> bool>,
        transparent: bool,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError>
    where
        F: Fn(&TcpStream, Accepted) -> Result<SocketAddr, OrigDstError> + Send + Sync + 'static,
    {
        let Proxy {
            config,
            inbound,
            outbound,
            admin,
            addrs,
            metrics,
            forwarder,
        } = self;
        warn_unless_proxy_uid(config.proxy_uid);

        let ready = Arc::new(AtomicBool::new(false));
        let admin_task = tokio::spawn(admin::serve(admin, metrics.clone(), ready.clone()));

        // `stop_accepting` ends the accept loops; `abort` ends the connections still open
        // when the grace period is over. Dropping the senders (this future cancelled)
        // does both.
        let (stop_accepting, stop_rx) = watch::channel(false);
        let (abort, abort_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            accepts_direct: forwarder.accepts_direct(),
            forwarder,
            metrics,
            connections: PerDirection::new(|| Arc::new(Semaphore::new(config.max_connections))),
            destination,
            transparent,
            is_local,
            listeners: Listeners {
                inbound: addrs.inbound.clone(),
                outbound: addrs.outbound.clone(),
            },
            warnings: RateLimited::new(WARN_INTERVAL),
            abort: abort_rx,
        });
        let mut accept_loops = JoinSet::new();
        // Each listener with the address it is bound to (`local_addrs` read them in the
        // same order).
        let inbound =
            (inbound.into_iter().zip(addrs.inbound.clone())).map(|l| (Direction::Inbound, l));
        let outbound =
            (outbound.into_iter().zip(addrs.outbound.clone())).map(|l| (Direction::Outbound, l));
        for (direction, listener) in inbound.chain(outbound) {
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
        shared.forwarder.drain();
        // The loops drop their listeners: from here the kernel refuses new connections.
        while accept_loops.join_next().await.is_some() {}

        // Every open connection holds one permit; all permits back means all closed.
        // `max_connections` is at most a million (config's MAX_CAP), so it fits a u32;
        // were it not, waiting for u32::MAX permits would only end at the grace period.
        let all = u32::try_from(config.max_connections).unwrap_or(u32::MAX);
        let conns = &shared.connections;
        let drained = async {
            let _inbound = conns.inbound.acquire_many(all).await;
            let _outbound = conns.outbound.acquire_many(all).await;
        };
        match tokio::time::timeout(grace, drained).await {
            Ok(()) => info!("all connections drained"),
            Err(_) => {
                let left = 2 * config.max_connections
                    - conns.inbound.available_permits()
                    - conns.outbound.available_permits();
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

/// Where an accepted connection came from and in: what `accept` already told us, so
/// the destination lookup does not ask the kernel again.
#[derive(Clone, Copy, Debug)]
struct Accepted {
    /// The address the accepting listener is bound to (maybe a wildcard).
    listener: SocketAddr,
    /// The client's address.
    peer: SocketAddr,
}

/// What the accept loops and connection tasks share.
struct Shared<F> {
    forwarder: Forwarder,
    /// Whether the inbound listener takes direct mTLS connections.
    accepts_direct: bool,
    metrics: Arc<Metrics>,
    /// One permit per open connection (`--max-connections`), per direction.
    connections: PerDirection<Arc<Semaphore>>,
    destination: F,
    /// `--inbound-transparent`: inbound destinations are the accepted sockets' own
    /// addresses (TPROXY), outbound ones still come from `destination`.
    transparent: bool,
    /// `orig_dst::is_local` for the kernel's destinations; `None` for chosen ones.
    is_local: Option<fn(std::net::IpAddr) -> bool>,
    listeners: Listeners,
    /// Refusal warnings, at most one per reason per [`WARN_INTERVAL`].
    warnings: RateLimited,
    abort: watch::Receiver<bool>,
}

/// How often each kind of refusal may be logged at WARN. A refusal can come in floods
/// (a redirect loop, a scan, a misconfigured rule): one line a second per reason, with
/// the number left out, says as much without filling the disk.
const WARN_INTERVAL: Duration = Duration::from_secs(1);

/// At most one event per key per interval; counts the ones it suppressed.
struct RateLimited {
    interval: Duration,
    /// Per key: when it was last let through, and how many were suppressed since.
    last: Mutex<HashMap<Refused, (Instant, u64)>>,
}

impl RateLimited {
    fn new(interval: Duration) -> RateLimited {
        RateLimited {
            interval,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed)` when an event for `key` at `now` may be logged (with the
    /// number suppressed since the last one), `None` when it is to be suppressed.
    fn check(&self, key: Refused, now: Instant) -> Option<u64> {
        // A poisoned lock only means another thread panicked while holding it; the
        // map is still a valid map.
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match last.get_mut(&key) {
            Some((at, suppressed)) if now.duration_since(*at) < self.interval => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                let n = std::mem::take(suppressed);
                *at = now;
                Some(n)
            }
            None => {
                last.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

/// Warns when the proxy does not run as the UID meshinit exempts: each connection it
/// forwards would then be redirected back into its own outbound listener, with the same
/// original destination, again and again until the outbound `--max-connections` is used
/// up, and nothing else would say why.
fn warn_unless_proxy_uid(proxy_uid: u32) {
    let uid = nix::unistd::Uid::effective().as_raw();
    if uid != proxy_uid {
        warn!(
            uid,
            proxy_uid,
            "meshproxy is not running as the proxy UID (--proxy-uid, meshinit's --proxy-uid): \
             its own connections are redirected back to it, so forwarded connections will fail; \
             run it as UID {proxy_uid}, or set --proxy-uid to the UID meshinit exempts"
        );
    }
}

/// Accepts on `listener` (bound to the address it comes with) until `stop` is set.
async fn accept_loop<F>(
    (listener, listener_addr): (TcpListener, SocketAddr),
    direction: Direction,
    shared: Arc<Shared<F>>,
    mut stop: watch::Receiver<bool>,
) where
    F: Fn(&TcpStream, Accepted) -> Result<SocketAddr, OrigDstError> + Send + Sync + 'static,
{
    loop {
        let (stream, client_addr) = tokio::select! {
            biased;
            () = set(&mut stop) => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(&error).await;
                    continue;
                }
            },
        };
        // The connection cap: past it, close at once rather than queue, so a flood
        // cannot exhaust file descriptors (each connection costs two). Per direction,
        // so a flood of one cannot starve the other.
        let Ok(permit) = shared
            .connections
            .get(direction)
            .clone()
            .try_acquire_owned()
        else {
            shared.metrics.refused(direction, Refused::MaxConnections);
            debug!(
                direction = direction.as_str(),
                "too many open connections, closing a new one"
            );
            continue;
        };
        let is_local = shared.is_local.as_ref().map(|f| f as &dyn Fn(_) -> bool);
        // Only outbound connections are balanced: inbound ones skip the table (and the
        // discovery file's change check behind it).
        let services = match direction {
            Direction::Outbound => shared.forwarder.services(),
            Direction::Inbound => None,
        };
        let cx = Context {
            accepts_direct: shared.accepts_direct,
            inbound: &shared.listeners.inbound,
            outbound: &shared.listeners.outbound,
            is_local,
            services: services.as_deref(),
        };
        let original = if shared.transparent && direction == Direction::Inbound {
            orig_dst::transparent_dst(&stream)
        } else {
            let accepted = Accepted {
                listener: listener_addr,
                peer: client_addr,
            };
            (shared.destination)(&stream, accepted)
        };
        let route = match route::route(direction, original, &cx) {
            Ok(route) => route,
            Err(refusal) => {
                refuse(&shared, direction, &stream, &refusal);
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut abort = shared.abort.clone();
            tokio::select! {
                () = shared.forwarder.forward(stream, client_addr, direction, route) => {}
                () = set(&mut abort) => {}
            }
        });
    }
}

/// Counts a refused connection and logs it at WARN, rate-limited per reason. The
/// connection is closed when the caller drops it.
fn refuse<F>(shared: &Shared<F>, direction: Direction, stream: &TcpStream, refusal: &Refusal) {
    let reason = refusal.reason();
    shared.metrics.refused(direction, reason);
    let Some(suppressed) = shared.warnings.check(reason, Instant::now()) else {
        return;
    };
    warn!(
        direction = direction.as_str(),
        reason = reason.as_str(),
        client = ?stream.peer_addr().ok(),
        suppressed,
        "refusing connection: {refusal}"
    );
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

fn bind_all(addrs: &[SocketAddr], transparent: bool) -> Result<Vec<TcpListener>, ServerError> {
    let mut listeners = Vec::new();
    let mut skipped = None;
    for &addr in addrs {
        match bind(addr, transparent) {
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

fn local_addr(listener: &TcpListener) -> Result<SocketAddr, ServerError> {
    listener.local_addr().map_err(ServerError::LocalAddr)
}

fn local_addrs(listeners: &[TcpListener]) -> Result<Vec<SocketAddr>, ServerError> {
    listeners.iter().map(local_addr).collect()
}

fn bind(addr: SocketAddr, transparent: bool) -> Result<TcpListener, ServerError> {
    let bind_error = |source| ServerError::Bind { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(bind_error)?;
    // TPROXY hands connections only to transparent listeners.
    if transparent {
        orig_dst::set_transparent(&socket)
            .map_err(|source| ServerError::Transparent { addr, source })?;
    }
    // A restarted proxy must be able to bind while its old connections sit in
    // TIME_WAIT.
    socket.set_reuse_address(true).map_err(bind_error)?;
    if addr.is_ipv6() {
        // `[::]:4143` must not claim IPv4 too, or it would clash with `0.0.0.0:4143`;
        // and IPv4 clients must reach the IPv4 socket, where SO_ORIGINAL_DST works.
        socket.set_only_v6(true).map_err(bind_error)?;
    }
    // Every accepted connection inherits these from its listener (Linux copies the
    // listener's socket options, and arms the keepalive timer, when it creates the
    // connection): set once here instead of five `setsockopt` calls per connection.
    // We forward what we read as soon as we read it, so Nagle would only add delay;
    // keepalive finds clients that vanished (`connect::set_keepalive`).
    socket.set_nodelay(true).map_err(bind_error)?;
    crate::connect::set_keepalive(&socket).map_err(bind_error)?;
    socket.set_nonblocking(true).map_err(bind_error)?;
    socket.bind(&addr.into()).map_err(bind_error)?;
    socket.listen(BACKLOG).map_err(bind_error)?;
    TcpListener::from_std(socket.into()).map_err(bind_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn refusal_warnings_are_limited_to_one_per_second_per_reason() {
        let limiter = RateLimited::new(WARN_INTERVAL);
        let start = Instant::now();
        assert_eq!(limiter.check(Refused::SelfLoop, start), Some(0));
        // A flood within the second: suppressed, and counted.
        for _ in 0..1000 {
            assert_eq!(limiter.check(Refused::SelfLoop, Instant::now()), None);
        }
        // Another reason has its own budget.
        assert_eq!(
            limiter.check(Refused::ForeignDestination, Instant::now()),
            Some(0)
        );
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(limiter.check(Refused::SelfLoop, Instant::now()), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        // The next one says how many were left out.
        assert_eq!(limiter.check(Refused::SelfLoop, Instant::now()), Some(1001));
        assert_eq!(limiter.check(Refused::SelfLoop, Instant::now()), None);
    }

    /// One silent inbound client holds the only inbound connection and detection
    /// permits; an outbound connection still gets both of its own.
    #[tokio::test(start_paused = true)]
    async fn inbound_and_outbound_have_separate_budgets() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let args = crate::config::ProxyArgs {
            inbound_addr: Some("127.0.0.1:0".into()),
            outbound_addr: Some("127.0.0.1:0".into()),
            admin_addr: Some("127.0.0.1:0".into()),
            max_connections: Some("1".into()),
            max_detecting: Some("1".into()),
            ..Default::default()
        };
        let config = Config::from_sources(&args, &HashMap::new(), None).unwrap();
        let proxy = Proxy::bind(config).await.unwrap();
        let addrs = proxy.local_addrs();
        let metrics = proxy.metrics();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(proxy.serve_with(move |_| Ok(target), async {
            let _ = stopped.await;
        }));

        let silent = TcpStream::connect(addrs.inbound[0]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        // The inbound budget is used up...
        let mut refused = TcpStream::connect(addrs.inbound[0]).await.unwrap();
        assert_eq!(refused.read(&mut [0; 1]).await.unwrap_or(0), 0);
        // ...the outbound one is not.
        let mut client = TcpStream::connect(addrs.outbound[0]).await.unwrap();
        // Opaque bytes (HTTP would be proxied request by request, and an echo server
        // does not answer HTTP).
        client.write_all(b"\0opaque  bytes\r\n\r\n").await.unwrap();
        let mut echoed = [0; 18];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"\0opaque  bytes\r\n\r\n");
        let text = metrics.encode();
        assert!(
            text.contains("tcp_refused_total{direction=\"inbound\",reason=\"max_connections\"} 1"),
            "{text}"
        );
        assert!(!text.contains("direction=\"outbound\",reason="), "{text}");
        drop((client, silent));
        stop.send(()).unwrap();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn ipv4_and_ipv6_wildcards_share_a_port() {
        let v4 = bind("0.0.0.0:0".parse().unwrap(), false).unwrap();
        let port = v4.local_addr().unwrap().port();
        // Without IPV6_V6ONLY this bind would fail with EADDRINUSE.
        let v6 = bind(SocketAddr::from(([0u16; 8], port)), false).unwrap();
        assert_eq!(v6.local_addr().unwrap().port(), port);
    }

    #[tokio::test]
    async fn an_ipv6_address_the_host_lacks_is_skipped_if_another_binds() {
        // fd00::dead is not assigned to any interface here: EADDRNOTAVAIL.
        let missing: SocketAddr = "[fd00::dead]:0".parse().unwrap();
        let listeners = bind_all(&["127.0.0.1:0".parse().unwrap(), missing], false).unwrap();
        assert_eq!(listeners.len(), 1);
        // Alone, it is an error: a direction without any listener is useless.
        let err = bind_all(&[missing], false).unwrap_err();
        assert!(err.to_string().contains("[fd00::dead]:0"), "{err}");
        // Any other bind failure is fatal.
        let taken = bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = taken.local_addr().unwrap();
        assert!(bind_all(&[addr, missing], false).is_err());
    }

    /// Accepted connections take TCP_NODELAY and keepalive from their listener, which
    /// is why `forward` no longer sets them on each client socket.
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_and_keepalive_from_the_listener() {
        use nix::sys::socket::{getsockopt, sockopt};
        let listener = bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(getsockopt(&accepted, sockopt::TcpNoDelay).unwrap());
        assert!(getsockopt(&accepted, sockopt::KeepAlive).unwrap());
        assert_eq!(getsockopt(&accepted, sockopt::TcpKeepIdle).unwrap(), 60);
        assert_eq!(getsockopt(&accepted, sockopt::TcpKeepInterval).unwrap(), 10);
        assert_eq!(getsockopt(&accepted, sockopt::TcpKeepCount).unwrap(), 6);
        // The client's socket is not ours and stays untouched: the check can tell.
        assert!(!getsockopt(&client, sockopt::KeepAlive).unwrap());
    }
}
