//! Per-request balancing: the [`Upstream`] of an outbound HTTP connection to a
//! `--discovery` service address (`Route::Balanced`, detected as HTTP/1 or HTTP/2).
//!
//! Each request, not the connection, is balanced: it asks the discovery table *as it is
//! now* for the service the client dialled (so a weight change reaches the next request
//! of a keep-alive connection, within the table's 250 ms check), picks a backend by
//! weight and an endpoint of it by power-of-two-choices over peak-EWMA latency × requests
//! in flight (`balance::Attempts` with `Load::Latency`), and is sent over a pooled
//! connection to that endpoint. Many requests of one client connection thus spread over
//! the endpoints, and a slow endpoint gets few of them.
//!
//! The request's [`Observer`] counts it in flight until it ends, then feeds its latency
//! (pick to end of response) to the endpoint's estimate; a failed request (5xx, gRPC
//! error, a broken stream, the proxy's own 502/504) counts as at least
//! `balance::FAILURE_RTT`, so an endpoint that fails fast does not look fast.
//!
//! All-zero weights answer 503 (`no backend`). A service removed from the file while the
//! connection is open sends its requests where the client dialled, as a new connection
//! would be. An endpoint with an `identity` is only reached over mTLS, which the pool does
//! not speak yet: connections to a service with one are balanced per connection instead
//! (see `outbound::balanced`), and if a reload adds one mid-connection, a request picked
//! for it is answered 502 rather than sent in plaintext.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use tokio::time::Instant;

use super::{Endpoint, Observe, Pick, Upstream};
use crate::balance::{Balancer, InFlight, Load, Rng};
use crate::http::ProxyError;

/// The requests of one client connection to the service address `original`.
pub struct Balanced {
    pub balancer: Arc<Balancer>,
    /// The service address the client dialled.
    pub original: SocketAddr,
}

impl Upstream for Balanced {
    fn pick(&self, _request: &Parts) -> Result<Pick, ProxyError> {
        let table = self.balancer.table();
        let Some(service) = table.service(self.original) else {
            return Ok(Pick::to(Endpoint::plain(self.original)));
        };
        let now = Instant::now();
        let mut rng = Rng::thread();
        let Some((backend, endpoint)) = service.attempts(Load::Latency).next(now, &mut rng) else {
            return Err(ProxyError::NoBackend {
                service: service.name.clone(),
            });
        };
        if endpoint.identity.is_some() {
            return Err(ProxyError::Connect {
                addr: endpoint.addr,
                source: io::Error::other(
                    "the endpoint has an identity (mTLS), which request-level balancing does not speak",
                ),
            });
        }
        Ok(Pick {
            endpoint: Endpoint::plain(endpoint.addr),
            dst: Some((service.name.clone(), backend.name.clone())),
            observer: Some(Box::new(Observer(endpoint.state.latency.start(now)))),
        })
    }
}

/// One balanced request in flight, reported to its endpoint's estimate when it ends.
pub struct Observer(InFlight);

impl Observe for Observer {
    fn observe(self: Box<Self>, _latency: Duration, failure: bool) {
        // Timed from the pick (`InFlight`), on tokio's clock like the rest of `balance`.
        let now = Instant::now();
        if failure {
            self.0.failed(now);
        } else {
            self.0.responded(now);
        }
    }
}
