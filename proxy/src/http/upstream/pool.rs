//! Connections to endpoints, kept open and reused, keyed by endpoint and HTTP version.
//!
//! - **HTTP/1**: a connection carries one request at a time. A request takes an idle
//!   connection of its key, or opens a new one; once the response has been read to the
//!   end, the connection goes back to the idle list (at most [`MAX_IDLE_PER_KEY`] per
//!   key, [`MAX_IDLE`] in all), and is closed after [`IDLE_TIMEOUT`] unused.
//! - **HTTP/2**: one connection per key carries every request, multiplexed; it is
//!   opened by the first request (the others wait for it rather than open their own)
//!   and closed after [`IDLE_TIMEOUT`] without a request. A connection that fails is
//!   dropped: the requests on it get a 502 (`upstream closed`), the next request opens
//!   a new one. At most [`MAX_H2`] are kept: opening one more (to a new destination)
//!   first lets go of the one used least recently.
//! - **Mesh peers** ([`Transport::Mesh`]): the key is (the peer's address and port,
//!   the identity it must prove), so every client connection to the same meshed
//!   destination shares one mTLS HTTP/2 connection (pinged every [`MESH_KEEP_ALIVE`])
//!   and pays no handshake. HTTP/1 upgrades take a dedicated HTTP/1 mTLS connection
//!   of the same key, which the upgrade consumes.
//!
//! The pool is built on hyper's connection-level client (`hyper::client::conn`), not
//! hyper-util's pooled `Client`: that one rewrites the request target to origin form
//! and `Host`/`:authority` from the URI, and a transparent proxy must change neither.
//!
//! A request that comes back unsent from an idle HTTP/1 connection (the server closed
//! it while it was idle, a race every keep-alive client has) is retried once on a new
//! connection: nothing of it reached the server, so retrying is safe.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;
use tracing::debug;

use super::io::Io;
use super::{Endpoint, MeshConnect, Transport};
use crate::connect::connect_from;
use crate::http::errors::ProxyError;
use crate::http::Version;

/// How long a connection may stay unused in the pool before it is closed. Longer
/// than most servers' own keep-alive timeouts (nginx 75 s), so the server usually
/// closes first, which the pool notices (see the module doc for the race).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Most idle HTTP/1 connections kept per key.
pub const MAX_IDLE_PER_KEY: usize = 64;

/// Most idle HTTP/1 connections kept in all: the pool must not hold descriptors a
/// client could make it open (one idle connection per destination it tried).
pub const MAX_IDLE: usize = 1024;

/// Most HTTP/2 connections kept, one per key. Without a cap an application could make
/// the pool hold one open connection (a descriptor) per destination it ever spoke
/// HTTP/2 to, for [`IDLE_TIMEOUT`] each, past `--max-connections`: HTTP/1's idle
/// connections have [`MAX_IDLE`] for the same reason.
pub const MAX_H2: usize = 1024;

/// How often the HTTP/2 connection to a mesh peer is pinged, and how long a ping may
/// go unanswered before the connection is given up (and replaced by the next request).
pub const MESH_KEEP_ALIVE: Duration = Duration::from_secs(10);

/// How often idle connections are looked at.
const REAP_INTERVAL: Duration = Duration::from_secs(10);

/// A request the pool could not send: why, and the request itself when none of it left
/// (its connect failed), so that it can be tried on another endpoint.
pub struct SendError<B> {
    pub error: ProxyError,
    pub unsent: Option<Request<B>>,
}

impl<B> SendError<B> {
    fn unsent(error: ProxyError, request: Request<B>) -> SendError<B> {
        SendError {
            error,
            unsent: Some(request),
        }
    }
}

impl<B> From<ProxyError> for SendError<B> {
    fn from(error: ProxyError) -> SendError<B> {
        SendError {
            error,
            unsent: None,
        }
    }
}

/// What a pooled connection is for.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Key {
    pub endpoint: Endpoint,
    /// The HTTP version spoken on the connection.
    pub version: Version,
}

/// What a request body must be for the pool to send it: the client's `Incoming`,
/// streamed, in the proxy; any body in tests (and for whoever wraps bodies later).
pub trait SendBody:
    http_body::Body<Data = Bytes, Error = Self::E> + Send + Unpin + 'static
{
    type E: Into<Box<dyn std::error::Error + Send + Sync>>;
}

impl<B> SendBody for B
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type E = B::Error;
}

/// The connections to every endpoint, sending request bodies of type `B`.
pub struct Pool<B = Incoming> {
    connect_timeout: Duration,
    /// [`MAX_H2`], smaller in tests.
    max_h2: usize,
    /// Opens [`Transport::Mesh`] connections; `None` without an identity.
    mesh: Option<Arc<dyn MeshConnect>>,
    state: Mutex<State<B>>,
    /// Whether the reaper task runs (started with the first idle connection, so that
    /// a pool can be built outside a runtime).
    reaper: std::sync::Once,
}

struct State<B> {
    idle: HashMap<Key, Vec<Idle<B>>>,
    idle_count: usize,
    h2: HashMap<Key, Arc<H2Slot<B>>>,
}

struct Idle<B> {
    sender: http1::SendRequest<B>,
    since: Instant,
}

/// The one HTTP/2 connection of a key.
struct H2Slot<B> {
    sender: Mutex<Option<http2::SendRequest<B>>>,
    /// Held while connecting, so concurrent first requests share one connection.
    connecting: tokio::sync::Mutex<()>,
    last_used: Mutex<Instant>,
}

impl<B: SendBody> Pool<B> {
    /// A pool whose connects give up after `connect_timeout` (`--connect-timeout`), and
    /// that opens [`Transport::Mesh`] connections with `mesh`, when given.
    pub fn new(connect_timeout: Duration, mesh: Option<Arc<dyn MeshConnect>>) -> Arc<Pool<B>> {
        Pool::with_max_h2(connect_timeout, mesh, MAX_H2)
    }

    fn with_max_h2(
        connect_timeout: Duration,
        mesh: Option<Arc<dyn MeshConnect>>,
        max_h2: usize,
    ) -> Arc<Pool<B>> {
        Arc::new(Pool {
            connect_timeout,
            max_h2,
            mesh,
            state: Mutex::new(State {
                idle: HashMap::new(),
                idle_count: 0,
                h2: HashMap::new(),
            }),
            reaper: std::sync::Once::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<B>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `request` to the endpoint of `key` and returns the response head; its
    /// body streams from the connection. (The proxy uses [`Pool::send_or_return`].)
    #[cfg(test)]
    pub async fn send(
        self: &Arc<Self>,
        key: Key,
        request: Request<B>,
    ) -> Result<Response<Incoming>, ProxyError> {
        self.send_or_return(key, request, || {})
            .await
            .map_err(|failed| failed.error)
    }

    /// [`Pool::send`], which hands the request back when the connect failed (nothing of
    /// it was sent), so that the caller may try another endpoint.
    ///
    /// `on_connected` is called once a connection to the endpoint is in hand, before the
    /// request is sent: from then on the request belongs to this endpoint (the caller
    /// counts it under the endpoint's labels), and it is never handed back.
    pub async fn send_or_return(
        self: &Arc<Self>,
        key: Key,
        request: Request<B>,
        on_connected: impl FnOnce() + Send,
    ) -> Result<Response<Incoming>, SendError<B>> {
        self.start_reaper();
        match key.version {
            Version::Http1 => self.send_h1(key, request, on_connected).await,
            Version::Http2 => self.send_h2(key, request, on_connected).await,
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        key: Key,
        mut request: Request<B>,
        on_connected: impl FnOnce() + Send,
    ) -> Result<Response<Incoming>, SendError<B>> {
        let addr = key.endpoint.addr;
        let mut on_connected = Some(on_connected);
        loop {
            let (mut sender, reused) = match self.checkout_h1(&key) {
                Some(sender) => (sender, true),
                None => match self.connect_h1(&key).await {
                    Ok(sender) => (sender, false),
                    // The request came back from a closed idle connection, after
                    // `on_connected`: it stays this endpoint's, and fails here.
                    Err(error) if on_connected.is_none() => return Err(error.into()),
                    Err(error) => return Err(SendError::unsent(error, request)),
                },
            };
            if let Some(connected) = on_connected.take() {
                connected();
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.checkin_when_ready(key, sender);
                    return Ok(response);
                }
                Err(mut error) => match error.take_message() {
                    // Not sent: the idle connection was closed under us. Retry on a
                    // new one (which cannot come back unsent for this reason).
                    Some(unsent) if reused => {
                        debug!(%addr, error = %error.error(), "idle connection was closed, retrying");
                        request = unsent;
                    }
                    _ => return Err(ProxyError::upstream(addr, error.into_error()).into()),
                },
            }
        }
    }

    /// An idle, usable connection of `key`, the most recently used first.
    fn checkout_h1(&self, key: &Key) -> Option<http1::SendRequest<B>> {
        let mut state = self.lock();
        let state = &mut *state;
        let list = state.idle.get_mut(key)?;
        let mut found = None;
        while let Some(idle) = list.pop() {
            state.idle_count -= 1;
            if idle.sender.is_ready() && idle.since.elapsed() < IDLE_TIMEOUT {
                found = Some(idle.sender);
                break;
            }
        }
        if list.is_empty() {
            state.idle.remove(key);
        }
        found
    }

    /// Puts the connection back once its response has been read to the end (or drops
    /// it, when it closed or was upgraded).
    fn checkin_when_ready(self: &Arc<Self>, key: Key, mut sender: http1::SendRequest<B>) {
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            let Some(pool) = pool.upgrade() else { return };
            let mut state = pool.lock();
            if state.idle_count >= MAX_IDLE {
                return;
            }
            let list = state.idle.entry(key).or_default();
            if list.len() >= MAX_IDLE_PER_KEY {
                return;
            }
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
            state.idle_count += 1;
        });
    }

    async fn connect_h1(&self, key: &Key) -> Result<http1::SendRequest<B>, ProxyError> {
        let io = self.connect(&key.endpoint, key.version).await?;
        let addr = key.endpoint.addr;
        let (sender, connection) = http1::Builder::new()
            .preserve_header_case(true)
            // A request without the case of its header names (one a peer proxy
            // carried as HTTP/2, whose names are lowercase) gets them in Title-Case,
            // the way HTTP/1 clients write them; the others keep theirs.
            .title_case_headers(true)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| ProxyError::upstream(addr, e))?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                debug!(%addr, %error, "HTTP/1 connection to the destination failed");
            }
        });
        Ok(sender)
    }

    async fn send_h2(
        self: &Arc<Self>,
        key: Key,
        request: Request<B>,
        on_connected: impl FnOnce() + Send,
    ) -> Result<Response<Incoming>, SendError<B>> {
        let addr = key.endpoint.addr;
        let slot = {
            let mut state = self.lock();
            if !state.h2.contains_key(&key) && state.h2.len() >= self.max_h2 {
                evict_least_recently_used(&mut state.h2);
            }
            state
                .h2
                .entry(key.clone())
                .or_insert_with(|| {
                    Arc::new(H2Slot {
                        sender: Mutex::new(None),
                        connecting: tokio::sync::Mutex::new(()),
                        last_used: Mutex::new(Instant::now()),
                    })
                })
                .clone()
        };
        *lock(&slot.last_used) = Instant::now();
        let mut sender = match slot.ready() {
            Some(sender) => sender,
            None => {
                let _connecting = slot.connecting.lock().await;
                match slot.ready() {
                    Some(sender) => sender,
                    None => {
                        let sender = match self.connect_h2(&key).await {
                            Ok(sender) => sender,
                            Err(error) => return Err(SendError::unsent(error, request)),
                        };
                        *lock(&slot.sender) = Some(sender.clone());
                        sender
                    }
                }
            }
        };
        on_connected();
        sender
            .send_request(request)
            .await
            .map_err(|e| ProxyError::upstream(addr, e).into())
    }

    async fn connect_h2(&self, key: &Key) -> Result<http2::SendRequest<B>, ProxyError> {
        let io = self.connect(&key.endpoint, key.version).await?;
        let addr = key.endpoint.addr;
        let mut builder = http2::Builder::new(TokioExecutor::new());
        // A destination that grants a large window and stops reading would otherwise
        // make us buffer 400 KiB (h2's default) of each stream's request body.
        builder
            .timer(TokioTimer::new())
            .max_send_buf_size(crate::http::server::MAX_SEND_BUFFER);
        if matches!(key.endpoint.transport, Transport::Mesh { .. }) {
            // The connection every request to the peer shares: a peer that stopped
            // answering must be noticed, so that the next request opens a new one,
            // rather than when a request times out.
            builder
                .keep_alive_interval(MESH_KEEP_ALIVE)
                .keep_alive_timeout(MESH_KEEP_ALIVE)
                .keep_alive_while_idle(true)
                .max_header_list_size(crate::http::server::MAX_HEAD as u32);
        }
        let (sender, connection) = builder
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| ProxyError::upstream(addr, e))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%addr, %error, "HTTP/2 connection to the destination failed");
            }
        });
        Ok(sender)
    }

    /// Opens the transport to `endpoint` for `version`, within the connect timeout
    /// (and, to a mesh peer, the handshake timeout).
    async fn connect(&self, endpoint: &Endpoint, version: Version) -> Result<Io, ProxyError> {
        let addr = endpoint.addr;
        match &endpoint.transport {
            Transport::Plain => {
                let from = endpoint.source.map(|ip| std::net::SocketAddr::new(ip, 0));
                let stream = connect_from(addr, from, self.connect_timeout)
                    .await
                    .map_err(|error| {
                        ProxyError::connect_within(addr, error, self.connect_timeout)
                    })?;
                Ok(Io::Plain(stream))
            }
            Transport::Mesh { server_id } => match &self.mesh {
                Some(mesh) => Ok(Io::Mesh(Box::new(
                    mesh.connect(addr, server_id, version).await?,
                ))),
                // `hop` only decides a mesh hop with an identity, which builds `mesh`.
                None => Err(ProxyError::NoIdentity { addr }),
            },
        }
    }

    fn start_reaper(self: &Arc<Self>) {
        self.reaper.call_once(|| {
            tokio::spawn(reap(Arc::downgrade(self)));
        });
    }

    /// Closes the connections unused for [`IDLE_TIMEOUT`].
    fn reap_idle(&self, now: Instant) {
        let mut state = self.lock();
        let state = &mut *state;
        let mut closed = 0;
        state.idle.retain(|_, list| {
            let before = list.len();
            list.retain(|idle| {
                !idle.sender.is_closed() && now.saturating_duration_since(idle.since) < IDLE_TIMEOUT
            });
            closed += before - list.len();
            !list.is_empty()
        });
        state.idle_count -= closed;
        state.h2.retain(|_, slot| {
            let last = *lock(&slot.last_used);
            let mut sender = lock(&slot.sender);
            let live = sender.as_ref().is_some_and(|s| !s.is_closed());
            if !live && slot.connecting.try_lock().is_ok() {
                *sender = None;
                return Arc::strong_count(slot) > 1;
            }
            if now.saturating_duration_since(last) >= IDLE_TIMEOUT {
                // Dropping our handle lets the connection close once the requests
                // still using it are done.
                *sender = None;
                return Arc::strong_count(slot) > 1;
            }
            true
        });
    }
}

#[cfg(test)]
impl<B: SendBody> Pool<B> {
    /// Idle HTTP/1 connections, and open HTTP/2 ones.
    fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        let h2 = state
            .h2
            .values()
            .filter(|slot| lock(&slot.sender).is_some())
            .count();
        (state.idle_count, h2)
    }
}

impl<B> H2Slot<B> {
    /// A handle on the open connection, if it is still usable.
    fn ready(&self) -> Option<http2::SendRequest<B>> {
        let sender = lock(&self.sender);
        sender.as_ref().filter(|s| !s.is_closed()).cloned()
    }
}

/// Lets go of the HTTP/2 connection used least recently: requests still on it finish
/// (they hold the slot), later ones to its key open a new connection.
fn evict_least_recently_used<B>(h2: &mut HashMap<Key, Arc<H2Slot<B>>>) {
    let oldest = h2
        .iter()
        .min_by_key(|(_, slot)| *lock(&slot.last_used))
        .map(|(key, _)| key.clone());
    if let Some(slot) = oldest.and_then(|key| h2.remove(&key)) {
        *lock(&slot.sender) = None;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn reap<B: SendBody>(pool: Weak<Pool<B>>) {
    let mut interval = tokio::time::interval(REAP_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        pool.reap_idle(Instant::now());
    }
}

#[cfg(test)]
mod tests;
