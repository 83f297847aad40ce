//! Connections detected as HTTP/1 or HTTP/2 are proxied request by request, so that
//! each request gets the golden metrics (`request_total`, `response_total`,
//! `response_latency_seconds`) and, later, a destination of its own.
//!
//! - `server`: serves one client connection with hyper (the detected bytes replayed
//!   first), in the version the client spoke, and proxies each request: hop-by-hop
//!   headers removed, everything else unchanged, the body streamed both ways.
//! - `upstream`: where a request goes ([`Upstream`], [`Endpoint`]) and the pool of
//!   connections to endpoints (`upstream/pool`), one per request in flight for
//!   HTTP/1, one multiplexed connection for HTTP/2.
//! - `headers`: the hop-by-hop rules of RFC 9110 §7.6.1, upgrades, gRPC statuses.
//! - `upgrade`: `Upgrade` and `CONNECT`, which leave HTTP for opaque bytes.
//! - `orig_proto`: HTTP/1 requests carried as HTTP/2 between meshed proxies, marked
//!   `l5d-orig-proto`, and restored by the inbound proxy.
//! - `errors`: what the proxy answers itself (502, 504, 400) and the
//!   `meshproxy-error` header that says why.
//! - `body` and `metrics`: the response body that records its request once it ends,
//!   and the metric families, with their label sets bounded.
//! - `idle`: the requests in flight on a connection, so that an idle HTTP/2 one is
//!   closed.
//!
//! The proxy speaks to the destination the HTTP version the client spoke (to a mesh
//! peer's proxy: HTTP/2, over one pooled mTLS connection), and never
//! rewrites the request target, `Host`/`:authority`, the method, the body or the
//! trailers: the application must not notice the proxy.

mod body;
mod errors;
mod head;
mod headers;
mod idle;
pub mod metrics;
mod orig_proto;
mod server;
mod stall;
mod upgrade;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::info;

use crate::metrics::Counters;
use crate::route::Direction;

pub use self::errors::ProxyError;
pub use self::metrics::HttpMetrics;
pub use self::stall::ClientSocket;
pub use self::upstream::balanced::Balanced;
pub use self::upstream::pool::Pool;
pub use self::upstream::{Direct, Endpoint, Upstream};

/// `--connect-timeout` when not set: Linkerd's outbound connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// `--http-header-read-timeout` when not set: a minute, like common servers' header
/// and keep-alive timeouts.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// `--http-write-timeout` when not set: a minute, like nginx's `send_timeout`.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// The HTTP version of a connection, as detected (and of the pooled connections it
/// uses: the proxy speaks the client's version).
pub(crate) use crate::hop::HttpVersion as Version;

/// What every HTTP connection shares: the pool and the metrics.
#[derive(Clone)]
pub struct HttpProxy {
    pool: Arc<Pool>,
    metrics: HttpMetrics,
    /// How long an HTTP/1 client may take to send a request head
    /// (`--http-header-read-timeout`).
    header_read_timeout: Duration,
    /// How long a write to a client may wait for it to take a byte
    /// (`--http-write-timeout`).
    write_timeout: Duration,
    errors: Arc<ErrorLog>,
    /// Set when the proxy shuts down: connections finish their requests in flight,
    /// then close (HTTP/1 after the current response, HTTP/2 with a GOAWAY), instead
    /// of holding the drain for the whole grace period while idle.
    draining: Arc<tokio::sync::watch::Sender<bool>>,
}

/// One client connection, as routed: what its requests are labelled with and where
/// they go.
pub struct ClientConn {
    pub direction: Direction,
    /// The original destination (`target_addr`).
    pub target: SocketAddr,
    pub version: Version,
    /// Where its requests go.
    pub upstream: Arc<dyn Upstream>,
    /// The peer's identity when the client's hop is our mTLS.
    pub peer_id: Option<Arc<str>>,
}

impl HttpProxy {
    /// A proxy whose connects give up after `connect_timeout`, whose HTTP/1 clients
    /// must send each request head within `header_read_timeout`, whose clients must
    /// take each write within `write_timeout`, and that reaches mesh peers
    /// ([`upstream::Transport::Mesh`]) through `mesh`, when given.
    pub fn new(
        connect_timeout: Duration,
        header_read_timeout: Duration,
        write_timeout: Duration,
        metrics: HttpMetrics,
        mesh: Option<Arc<dyn upstream::MeshConnect>>,
    ) -> HttpProxy {
        HttpProxy {
            pool: Pool::new(connect_timeout, mesh),
            metrics,
            header_read_timeout,
            write_timeout,
            errors: Arc::new(ErrorLog::default()),
            draining: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    /// Asks every connection to close once its requests in flight are answered.
    pub fn drain(&self) {
        self.draining.send_replace(true);
    }

    /// Serves the client connection `io` until it closes: each request is proxied
    /// as `client.upstream` says. `io` starts with the bytes detection read (see
    /// `prefixed`); its bytes are counted in `counters`.
    pub async fn serve<I>(
        &self,
        io: I,
        client: ClientConn,
        counters: &Counters,
    ) -> Result<(), hyper::Error>
    where
        I: AsyncRead + AsyncWrite + ClientSocket + Unpin + Send + 'static,
    {
        server::serve(self.clone(), io, client, counters.clone()).await
    }

    /// Logs an error the proxy answered itself: at most one line a second, with the
    /// number of others since (a failing destination must not flood the log).
    fn log_error(&self, direction: Direction, error: &ProxyError) {
        let Some(suppressed) = self.errors.check(Instant::now()) else {
            return;
        };
        info!(
            direction = direction.as_str(),
            status = error.status().as_u16(),
            cause = error.cause(),
            suppressed,
            "answering the request itself: {error}"
        );
    }
}

/// The one-line-a-second limit of [`HttpProxy::log_error`].
#[derive(Default)]
struct ErrorLog {
    /// When a line was last logged, and how many were suppressed since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl ErrorLog {
    const INTERVAL: Duration = Duration::from_secs(1);

    /// `Some(suppressed)` when a line may be logged now.
    fn check(&self, now: Instant) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (last, suppressed) = &mut *state;
        if last.is_some_and(|at| now.saturating_duration_since(at) < Self::INTERVAL) {
            *suppressed += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn error_lines_are_limited_to_one_a_second_with_the_count_of_the_rest() {
        let log = ErrorLog::default();
        assert_eq!(log.check(Instant::now()), Some(0));
        for _ in 0..99 {
            assert_eq!(log.check(Instant::now()), None);
        }
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(log.check(Instant::now()), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(log.check(Instant::now()), Some(100));
        assert_eq!(log.check(Instant::now()), None);
    }
}
