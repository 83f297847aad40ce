//! One client connection served with hyper, and each of its requests proxied.
//!
//! The server speaks the version detection found: HTTP/1 (keep-alive, pipelining,
//! HTTP/1.0, `Expect: 100-continue`, upgrades, header-name case preserved) or HTTP/2
//! (multiplexed streams, flow control, extended `CONNECT`). Each request is counted,
//! stripped of its hop-by-hop headers, sent through the pool to the endpoint its
//! [`Upstream`] picks, and its response streamed back through a [`ResponseBody`] that
//! records it when it ends.
//!
//! A client cannot hold the server forever: an HTTP/1 request head must arrive within
//! `--http-header-read-timeout` (which also closes a keep-alive connection idle for
//! that long) and fit in [`MAX_HEAD`]; HTTP/2 header lists are bounded alike, and so
//! are an HTTP/2 client's streams ([`MAX_CONCURRENT_STREAMS`]) and the response bytes
//! each may leave unread ([`MAX_SEND_BUFFER`]). (h2 itself answers rapid resets and
//! CONTINUATION floods with a GOAWAY.)

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::body::{Recorder, ResponseBody};
use super::errors::{self, ProxyError};
use super::head::{self, BadHead, Head};
use super::headers::{self, Upgrade};
use super::idle::Activity;
use super::metrics::{HttpMetrics, RequestLabels, ResponseLabels, Series};
use super::orig_proto::{self, Carried};
use super::stall::{ClientIo, ClientSocket, StreamExecutor, Waiting};
use super::upstream::pool::MESH_KEEP_ALIVE;
use super::upstream::pool::{Key, SendError};
use super::upstream::{Endpoint, Observe, Pick, Transport, MAX_CONNECT_ATTEMPTS};
use super::{ClientConn, HttpProxy, Version};
use crate::metrics::Counters;
use crate::prefixed::Prefixed;
use crate::route::Direction;

/// The largest HTTP/1 request head, and HTTP/2 header list, a client may send.
pub const MAX_HEAD: usize = 64 * 1024;

/// Most concurrent streams on one HTTP/2 connection, from a client or a peer proxy
/// (whose one connection carries all its clients' requests to us): each holds buffers
/// and a task, so an unauthenticated client cannot open more.
pub const MAX_CONCURRENT_STREAMS: u32 = 512;

/// Most response bytes buffered per HTTP/2 stream while the client does not read them
/// (hyper's default is 400 KiB). A client that opens [`MAX_CONCURRENT_STREAMS`] streams,
/// grants a 2 GiB window and never reads would otherwise pin 200 MiB (the proxy itself
/// runs in about 15 MiB); at 64 KiB (four full DATA frames) it holds 32 MiB of response
/// data at most, and a stream still has a frame ready whenever the socket takes more.
pub const MAX_SEND_BUFFER: usize = 64 * 1024;

/// Streams an HTTP/2 client may reset before the proxy has taken them up, at once,
/// before the connection gets a GOAWAY (`ENHANCE_YOUR_CALM`): the rapid reset attack
/// (CVE-2023-44487) opens and resets streams in a loop so that the server does work
/// for each while the client's concurrency stays low. h2's default, set here so that
/// the bound is ours, with a test (`netns-tests/tests/attack.rs`).
pub const MAX_PENDING_RESETS: usize = 20;

/// Streams the proxy may reset because of a client's errors (streams past
/// [`MAX_CONCURRENT_STREAMS`] included) before the connection gets a GOAWAY: the same
/// attack with the proxy made to do the resetting. h2's default, set here for the same
/// reason.
pub const MAX_ERROR_RESETS: usize = 1024;

/// A tunnel to run beside the connection once its upgrade completes.
type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves `io` until the client closes it, and waits for its tunnels to end.
pub async fn serve<I>(
    proxy: HttpProxy,
    io: I,
    client: ClientConn,
    counters: Counters,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + ClientSocket + Unpin + Send + 'static,
{
    let (tunnels_tx, tunnels_rx) = mpsc::unbounded_channel();
    let version = client.version;
    let meshed = client.peer_id.is_some();
    let direction = client.direction;
    let draining = proxy.draining.subscribe();
    let header_read_timeout = proxy.header_read_timeout;
    // Requests in flight are only counted where they decide something: a client's
    // HTTP/2 connection, closed once idle (HTTP/1 ones are hyper's header read
    // timeout's; a mesh peer's pooled connection is the peer's pool's to close, since a
    // GOAWAY from us could race a request it is sending, which would fail).
    let activity = (version == Version::Http2 && !meshed).then(Activity::new);
    let cx = Arc::new(ConnCx {
        proxy,
        client,
        series: Mutex::new(None),
        tunnels: tunnels_tx,
    });
    let service = service_fn({
        let cx = cx.clone();
        let activity = activity.clone();
        move |request| {
            let cx = cx.clone();
            // Held until the response body ends: the request is in flight till then.
            let in_flight = activity.as_ref().map(Activity::start);
            async move {
                let mut response = cx.proxy(request).await;
                if let Some(in_flight) = in_flight {
                    response.body_mut().hold(in_flight);
                }
                Ok::<_, Infallible>(response)
            }
        }
    });
    let mut io = ClientIo::new(io, Some(counters), cx.proxy.write_timeout);
    match version {
        Version::Http1 => {
            let started = Instant::now();
            let io = match head::read(&mut io, Vec::new(), header_read_timeout).await {
                Head::Valid(bytes) => TokioIo::new(Prefixed::new(bytes, io)),
                Head::Bad(bad) => return answer_bad_head(&cx, io, bad, started).await,
                // Gone before a full head: hyper would find nothing to answer either.
                Head::Gone => return Ok(()),
            };
            let connection = http1::Builder::new()
                .preserve_header_case(true)
                // Responses from a mesh peer came over HTTP/2, which lowercases header
                // names: they are written in Title-Case, as HTTP/1 servers write them.
                .title_case_headers(meshed && direction == Direction::Outbound)
                // Nothing is added to responses: the destination's `Date`, or none.
                .auto_date_header(false)
                .half_close(true)
                // Not `pipeline_flush`: it lifts the bound on hyper's write buffer, so
                // a response to a client that does not read would be buffered whole.
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .max_buf_size(MAX_HEAD)
                .serve_connection(io, service)
                .with_upgrades();
            let graceful = http1::UpgradeableConnection::graceful_shutdown;
            let served = drive(connection, tunnels_rx, draining, graceful, None).await;
            if let Err(error) = &served {
                cx.count_hyper_answer(error);
            }
            served
        }
        Version::Http2 => {
            let io = TokioIo::new(io);
            // Each stream runs in a task of its own, reset once its response has waited
            // for the client's flow-control window for the write timeout.
            let executor = StreamExecutor {
                timeout: cx.proxy.write_timeout,
            };
            let mut builder = http2::Builder::new(executor);
            builder
                .auto_date_header(false)
                .timer(TokioTimer::new())
                .max_header_list_size(MAX_HEAD as u32)
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                .max_send_buf_size(MAX_SEND_BUFFER)
                .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
                .max_local_error_reset_streams(MAX_ERROR_RESETS)
                .enable_connect_protocol();
            if meshed {
                // A peer proxy's pooled connection lives long: one whose peer
                // vanished is found by pings, not kept until the process ends.
                builder
                    .keep_alive_interval(MESH_KEEP_ALIVE)
                    .keep_alive_timeout(MESH_KEEP_ALIVE);
            }
            // A client's connection with no request in flight for as long as an HTTP/1
            // one may stay idle gets a GOAWAY, like nginx's keep-alive timeout: HTTP/2
            // clients open a new connection for their next request.
            let idle = activity.map(|activity| (activity, header_read_timeout));
            let connection = builder.serve_connection(io, service);
            let graceful = http2::Connection::graceful_shutdown;
            drive(connection, tunnels_rx, draining, graceful, idle).await
        }
    }
}

/// Answers a first request head that does not parse with the proxy's own 400 (or
/// 431), counted as a request and a failed response, and closes.
async fn answer_bad_head<I>(
    cx: &ConnCx,
    mut io: I,
    bad: BadHead,
    started: Instant,
) -> Result<(), hyper::Error>
where
    I: AsyncWrite + Unpin,
{
    let error = ProxyError::BadRequest(bad);
    cx.proxy.log_error(cx.client.direction, &error);
    // Outbound series always carry `authority`: empty, since nothing parsed.
    let authority = (cx.client.direction == Direction::Outbound).then_some("");
    let series = cx.unrouted_series(authority);
    cx.proxy.metrics.request(&series);
    // Best effort: a client that sent garbage may well be gone already.
    let _ = io.write_all(&errors::http1_bytes(&error)).await;
    let _ = io.shutdown().await;
    let response = ResponseLabels {
        status: error.status().as_u16(),
        grpc_status: None,
        failure: true,
    };
    cx.proxy
        .metrics
        .response(&series, response, Some(started.elapsed()));
    Ok(())
}

/// Runs the connection and the tunnels its requests open, until all are done; asks
/// the connection to finish gracefully once the proxy drains, or once it has had no
/// request in flight (and no tunnel) for `idle`'s timeout.
async fn drive<C>(
    connection: C,
    mut tunnels_rx: mpsc::UnboundedReceiver<Tunnel>,
    mut draining: watch::Receiver<bool>,
    graceful_shutdown: fn(Pin<&mut C>),
    idle: Option<(Arc<Activity>, Duration)>,
) -> Result<(), hyper::Error>
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    let mut tunnels = JoinSet::new();
    tokio::pin!(connection);
    let mut asked = false;
    // Set once an idle connection was asked to close: by then it must have closed.
    let mut idle_deadline = None;
    let result = loop {
        tokio::select! {
            result = &mut connection => break result,
            Some(tunnel) = tunnels_rx.recv() => {
                tunnels.spawn(tunnel);
            }
            drained = draining.wait_for(|d| *d), if !asked => {
                asked = true;
                // The sender lives as long as the proxy; gone means the same.
                let _ = drained;
                graceful_shutdown(connection.as_mut());
            }
            Some(_) = tunnels.join_next(), if !tunnels.is_empty() => {}
            () = idle_for(&idle), if !asked && tunnels.is_empty() => {
                asked = true;
                graceful_shutdown(connection.as_mut());
                idle_deadline = idle.as_ref().map(|(_, timeout)| Instant::now() + *timeout);
            }
            () = sleep_until(idle_deadline) => {
                // h2 closes gracefully only once the client has answered its PING: a
                // client that does not is dropped, when it still has nothing in
                // flight (else it gets another timeout).
                let idle_now = idle.as_ref().is_some_and(|(a, _)| a.in_flight() == 0);
                if idle_now && tunnels.is_empty() {
                    break Ok(());
                }
                idle_deadline = idle.as_ref().map(|(_, timeout)| Instant::now() + *timeout);
            }
        }
    };
    // An HTTP/1 upgrade ends hyper's connection: the tunnel is what is left of it.
    while let Ok(tunnel) = tunnels_rx.try_recv() {
        tunnels.spawn(tunnel);
    }
    while tunnels.join_next().await.is_some() {}
    result
}

/// Completes at `deadline`; never without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Completes once the connection has been idle for the timeout; never without one.
async fn idle_for(idle: &Option<(Arc<Activity>, Duration)>) {
    match idle {
        Some((activity, timeout)) => activity.idle_for(*timeout).await,
        None => std::future::pending().await,
    }
}

/// What the requests of one connection share.
struct ConnCx {
    proxy: HttpProxy,
    client: ClientConn,
    /// The label set of the last request: most connections send every request to
    /// the same authority, so most requests skip the label-set lookup.
    series: Mutex<Option<Arc<Series>>>,
    tunnels: mpsc::UnboundedSender<Tunnel>,
}

impl ConnCx {
    /// Proxies one request and returns the response the client gets.
    async fn proxy(&self, request: Request<Incoming>) -> Response<ResponseBody> {
        let started = Instant::now();
        let upgrade = Upgrade::of(&request);
        let (mut parts, body) = request.into_parts();
        let client_upgrade = parts.extensions.remove::<OnUpgrade>();
        headers::strip_hop_by_hop(&mut parts.headers, upgrade == Some(Upgrade::Protocol));
        let authority = match self.client.direction {
            Direction::Outbound => Some(headers::authority_of(&parts)),
            Direction::Inbound => None,
        };
        let pick = match self.client.upstream.pick(&parts) {
            Ok(pick) => pick,
            Err(error) => {
                // A balanced service without a backend to pick: still a request to that
                // service, counted under it with an empty backend.
                let dst = error
                    .service()
                    .map(|service| (service.clone(), Arc::from("")));
                let series = self.series(authority, self.client.peer_id.as_ref(), dst);
                self.proxy.metrics.request(&series);
                return self.answer(error, series, started, None);
            }
        };
        let Pick {
            endpoint,
            dst,
            mut observer,
        } = pick;
        // The request's labels name the pick's backend and hop; it is counted once
        // connected (`on_connected`), so that a retry elsewhere counts it under the
        // backend that answers, or, when every attempt fails, the last one tried.
        let mut counting = Counting {
            metrics: &self.proxy.metrics,
            series: self.series(authority, self.peer_of(&endpoint), dst),
            counted: false,
        };
        let mut carried = orig_proto::carry(
            &self.client,
            &mut parts,
            &endpoint.transport,
            upgrade.is_some(),
        );
        let mut key = Key {
            version: carried.version(&endpoint.transport, self.client.version),
            endpoint,
        };
        let mut request = Request::from_parts(parts, body);
        // A failed connect sent nothing, so the upstream may offer another endpoint (a
        // balanced service does).
        let mut failed = Vec::new();
        let mut response = loop {
            let addr = key.endpoint.addr;
            let sent = self
                .proxy
                .pool
                .send_or_return(key, request, || {
                    counting.count();
                    if let Some(observer) = &observer {
                        observer.connected();
                    }
                })
                .await;
            let error = match sent {
                Ok(response) => break response,
                Err(SendError { error, unsent }) => {
                    if error.is_connect() {
                        self.client.upstream.connect_failed(addr);
                    }
                    let retry = unsent
                        .filter(|_| error.is_connect() && failed.len() + 1 < MAX_CONNECT_ATTEMPTS)
                        .and_then(|unsent| {
                            failed.push(addr);
                            let (parts, body) = unsent.into_parts();
                            let next = self.client.upstream.retry(&parts, &failed)?;
                            Some((next, parts, body))
                        });
                    match retry {
                        Some((next, mut parts, body)) => {
                            if let Some(observer) = observer.take() {
                                observer.observe(started.elapsed(), true);
                            }
                            observer = next.observer;
                            // Prepared for the failed endpoint's transport: prepared
                            // again for the next one's (plain or a mesh peer).
                            orig_proto::undo(carried, &mut parts);
                            carried = orig_proto::carry(
                                &self.client,
                                &mut parts,
                                &next.endpoint.transport,
                                upgrade.is_some(),
                            );
                            counting.series = self.series(
                                counting.series.labels().authority.as_deref(),
                                self.peer_of(&next.endpoint),
                                next.dst,
                            );
                            key = Key {
                                version: carried
                                    .version(&next.endpoint.transport, self.client.version),
                                endpoint: next.endpoint,
                            };
                            request = Request::from_parts(parts, body);
                            continue;
                        }
                        None => error,
                    }
                }
            };
            counting.count();
            return self.answer(error, counting.series.clone(), started, observer);
        };
        let series = counting.series.clone();
        let upgraded = match (upgrade, client_upgrade) {
            (Some(kind), Some(client)) if kind.accepted(&response) => {
                let upstream = hyper::upgrade::on(&mut response);
                // On HTTP/2, the stream the tunnel runs in (see `stall`).
                let stream = Waiting::current();
                let timeout = self.proxy.write_timeout;
                let tunnel = super::upgrade::tunnel(client, upstream, timeout, stream);
                let _ = self.tunnels.send(Box::pin(tunnel));
                true
            }
            _ => false,
        };
        let protocol_upgrade = upgraded && upgrade == Some(Upgrade::Protocol);
        let close = headers::asks_close(response.headers());
        headers::strip_hop_by_hop(response.headers_mut(), protocol_upgrade);
        if close && self.client.version == Version::Http1 {
            // The server closes its connection after this response: so does the
            // proxy with the client's, so that a client reading to the end of the
            // connection (or counting on the close) sees what it would without us.
            response.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        match carried {
            Carried::Upgraded(version) => {
                orig_proto::restore_response(response.headers_mut());
                *response.version_mut() = version;
            }
            Carried::Downgraded => {
                let version = response.version();
                orig_proto::mark_response(response.headers_mut(), version);
            }
            Carried::AsIs | Carried::Dedicated => {}
        }
        let grpc =
            headers::is_grpc(response.headers()).then(|| headers::grpc_status(response.headers()));
        let recorder = Recorder {
            metrics: self.proxy.metrics.clone(),
            series,
            started,
            status: response.status().as_u16(),
            grpc,
            local_error: false,
            observer,
        };
        let (parts, body) = response.into_parts();
        Response::from_parts(parts, ResponseBody::upstream(body, recorder))
    }

    /// The response the proxy gives itself for `error`, counted and logged.
    fn answer(
        &self,
        error: ProxyError,
        series: Arc<Series>,
        started: Instant,
        observer: Option<Box<dyn Observe>>,
    ) -> Response<ResponseBody> {
        self.proxy.log_error(self.client.direction, &error);
        let (parts, bytes): (_, Bytes) = error.response().into_parts();
        let recorder = Recorder {
            metrics: self.proxy.metrics.clone(),
            series,
            started,
            status: parts.status.as_u16(),
            grpc: None,
            local_error: true,
            observer,
        };
        Response::from_parts(parts, ResponseBody::local(Some(bytes), recorder))
    }

    /// Counts the answer hyper itself gave to a later request of a kept-alive HTTP/1
    /// connection that did not parse (400, or 431 for a head too large): a request and
    /// a failed response, whose latency is unknown (hyper measured nothing).
    fn count_hyper_answer(&self, error: &hyper::Error) {
        if !error.is_parse() || error.is_parse_version_h2() {
            return;
        }
        let status = if error.is_parse_too_large() { 431 } else { 400 };
        let authority = (self.client.direction == Direction::Outbound).then_some("");
        let series = self.unrouted_series(authority);
        self.proxy.metrics.request(&series);
        let response = ResponseLabels {
            status,
            grpc_status: None,
            failure: true,
        };
        self.proxy.metrics.response(&series, response, None);
    }

    /// The identity labelled on a request sent to `endpoint`: inbound, the client's
    /// (`client_id`); outbound, the one the endpoint's proxy proved (`server_id`), when
    /// the hop to it is our mTLS: a balanced service mixes plain and meshed endpoints.
    fn peer_of<'e>(&'e self, endpoint: &'e Endpoint) -> Option<&'e Arc<str>> {
        match (self.client.direction, &endpoint.transport) {
            (Direction::Inbound, _) => self.client.peer_id.as_ref(),
            (Direction::Outbound, Transport::Mesh { server_id }) => Some(server_id),
            (Direction::Outbound, Transport::Plain) => None,
        }
    }

    /// The label set of a request that reached no endpoint (its head did not parse):
    /// the connection's hop, and on a balanced connection its service, with an empty
    /// backend.
    fn unrouted_series(&self, authority: Option<&str>) -> Arc<Series> {
        let dst = self
            .client
            .upstream
            .service()
            .map(|service| (service, Arc::from("")));
        self.series(authority, self.client.peer_id.as_ref(), dst)
    }

    /// The label set of a request, from the connection's cache when it matches: its
    /// `authority`, the peer's identity on an mTLS hop (`tls="true"`), the service and
    /// backend when balanced.
    fn series(
        &self,
        authority: Option<&str>,
        peer_id: Option<&Arc<str>>,
        dst: Option<(Arc<str>, Arc<str>)>,
    ) -> Arc<Series> {
        let mut cached = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(series) = &*cached {
            let labels = series.labels();
            if labels.authority.as_deref() == authority
                && labels.peer_id.as_ref() == peer_id
                && labels.dst == dst
            {
                return series.clone();
            }
        }
        let series = self.proxy.metrics.series(RequestLabels {
            direction: self.client.direction,
            target_addr: self.client.target.to_string(),
            authority: authority.map(str::to_string),
            tls: peer_id.is_some(),
            peer_id: peer_id.cloned(),
            dst,
        });
        *cached = Some(series.clone());
        series
    }
}

/// A request to count once in `request_total`, under `series`: when it gets a
/// connection, or else when it ends without one (answered by the proxy, or dropped
/// because the client went away while its connects were tried).
struct Counting<'a> {
    metrics: &'a HttpMetrics,
    series: Arc<Series>,
    counted: bool,
}

impl Counting<'_> {
    fn count(&mut self) {
        if !std::mem::replace(&mut self.counted, true) {
            self.metrics.request(&self.series);
        }
    }
}

impl Drop for Counting<'_> {
    fn drop(&mut self) {
        self.count();
    }
}
