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
//! A request whose connect fails was not sent: the server loop tells
//! [`Balanced::connect_failed`], which counts the failure toward setting the endpoint
//! aside (every failed attempt, the last one included; a request that gets a connection,
//! [`Observer`]'s `connected`, clears the record, as a TCP connect does), and asks
//! [`Balanced::retry`] for
//! another endpoint (up to `MAX_CONNECT_ATTEMPTS` in all), picked again among those not
//! yet tried. The request's metrics name the backend of the endpoint that answered (or
//! was tried last), not the first pick's.
//!
//! All-zero weights answer 503 (`no backend`). A service removed from the file while the
//! connection is open sends its requests where the client dialled, as a new connection
//! would be. An endpoint with an `identity` is a mesh peer: its requests go over the
//! pool's mTLS HTTP/2 connection to its proxy (`Transport::Mesh`), never in plaintext.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use tokio::time::Instant;

use super::{Endpoint, Observe, Pick, Transport, Upstream};
use crate::balance::{
    Backend, Balancer, Endpoint as BalancedEndpoint, EndpointState, InFlight, Load, Rng,
};
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
        Ok(pick(&service.name, backend, endpoint, now))
    }

    fn service(&self) -> Option<Arc<str>> {
        let table = self.balancer.table();
        table
            .service(self.original)
            .map(|service| service.name.clone())
    }

    /// A failed connect counts toward setting the endpoint aside (three in a row, as
    /// for TCP), whether or not the request is tried elsewhere.
    fn connect_failed(&self, failed: SocketAddr) {
        let table = self.balancer.table();
        let Some(service) = table.service(self.original) else {
            return;
        };
        let now = Instant::now();
        let endpoints = service.backends.iter().flat_map(|b| &b.endpoints);
        for endpoint in endpoints.filter(|e| e.addr == failed) {
            endpoint.state.failed(now);
        }
    }

    /// After failed connects (nothing was sent): the request is picked again, by weight
    /// and latency, among the backends and endpoints not yet tried.
    fn retry(&self, _request: &Parts, failed: &[SocketAddr]) -> Option<Pick> {
        let table = self.balancer.table();
        let service = table.service(self.original)?;
        let now = Instant::now();
        let mut rng = Rng::thread();
        let (backend, endpoint) = service
            .attempts_after(Load::Latency, failed)
            .next(now, &mut rng)?;
        Some(pick(&service.name, backend, endpoint, now))
    }
}

/// The pick of `endpoint`, in flight from `now`.
fn pick(service: &Arc<str>, backend: &Backend, endpoint: &BalancedEndpoint, now: Instant) -> Pick {
    // An endpoint with an identity is a mesh peer: its requests go over the pool's
    // mTLS HTTP/2 connection to its proxy, which must prove that identity.
    let transport = match &endpoint.identity {
        Some(identity) => Transport::Mesh {
            server_id: identity.as_str().into(),
        },
        None => Transport::Plain,
    };
    Pick {
        endpoint: Endpoint {
            addr: endpoint.addr,
            transport,
            source: None,
        },
        dst: Some((service.clone(), backend.name.clone())),
        observer: Some(Box::new(Observer {
            in_flight: endpoint.state.latency.start(now),
            state: endpoint.state.clone(),
        })),
    }
}

/// One balanced request in flight, reported to its endpoint's estimate when it ends.
pub struct Observer {
    in_flight: InFlight,
    state: Arc<EndpointState>,
}

impl Observe for Observer {
    /// Connected: the endpoint's connect failures are behind it, as a TCP connect clears
    /// them, even if it then answers a 5xx (which its latency estimate takes).
    fn connected(&self) {
        self.state.succeeded();
    }

    fn observe(self: Box<Self>, _latency: Duration, failure: bool) {
        // Timed from the pick (`InFlight`), on tokio's clock like the rest of `balance`.
        let now = Instant::now();
        if failure {
            self.in_flight.failed(now);
        } else {
            self.in_flight.responded(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use http::Request;

    use super::*;
    use crate::metrics::Metrics;

    const SERVICE: &str = "198.18.100.10:80";

    fn web(a: u32, b: u32) -> String {
        format!(
            r#"
            [[service]]
            name = "web"
            addrs = ["{SERVICE}"]
            [[service.backend]]
            name = "a"
            weight = {a}
            endpoints = [ {{ addr = "198.18.1.1:80" }}, {{ addr = "198.18.1.2:80" }} ]
            [[service.backend]]
            name = "b"
            weight = {b}
            endpoints = [ {{ addr = "198.18.2.1:80" }} ]
            "#
        )
    }

    /// A discovery file in a directory of its own, removed on drop.
    struct File(PathBuf);

    impl File {
        fn new(name: &str, text: &str) -> File {
            let dir = std::env::temp_dir().join(format!(
                "meshproxy-http-balanced-{name}-{}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let file = File(dir.join("discovery.toml"));
            file.write(text);
            file
        }

        fn write(&self, text: &str) {
            let staged = self.0.with_extension("new");
            std::fs::write(&staged, text).unwrap();
            std::fs::rename(&staged, &self.0).unwrap();
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for File {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
        }
    }

    fn upstream(file: &File) -> Balanced {
        Balanced {
            balancer: Balancer::new(file.path(), false, Arc::new(Metrics::new())).unwrap(),
            original: SERVICE.parse().unwrap(),
        }
    }

    fn parts() -> Parts {
        Request::get("/").body(()).unwrap().into_parts().0
    }

    #[tokio::test(start_paused = true)]
    async fn each_request_follows_the_file_as_it_is_now() {
        let file = File::new("follow", &web(100, 0));
        let upstream = upstream(&file);
        let backend = |u: &Balanced| u.pick(&parts()).unwrap().dst.unwrap().1.to_string();
        assert_eq!(backend(&upstream), "a");
        file.write(&web(0, 100));
        tokio::time::advance(crate::balance::CHECK_INTERVAL).await;
        // The same upstream (one client connection): its next request goes to b.
        assert_eq!(backend(&upstream), "b");
        let pick = upstream.pick(&parts()).unwrap();
        assert_eq!(
            pick.endpoint,
            Endpoint::plain("198.18.2.1:80".parse().unwrap())
        );
        assert_eq!(&*pick.dst.unwrap().0, "web");
    }

    #[tokio::test(start_paused = true)]
    async fn all_zero_weights_answer_503_no_backend() {
        let file = File::new("zero", &web(0, 0));
        let error = upstream(&file).pick(&parts()).err().unwrap();
        assert_eq!(error.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error.cause(), "no backend");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_is_in_flight_until_observed_and_a_failure_is_dear() {
        let file = File::new("observe", &web(0, 1));
        let upstream = upstream(&file);
        let table = upstream.balancer.table();
        let state = &table.service(upstream.original).unwrap().backends[1].endpoints[0].state;
        let pick = upstream.pick(&parts()).unwrap();
        assert_eq!(state.latency.pending(), 1);
        tokio::time::advance(Duration::from_millis(3)).await;
        pick.observer.unwrap().observe(Duration::ZERO, false);
        assert_eq!(state.latency.pending(), 0);
        let rtt = state.latency.estimate_at(Instant::now());
        assert!((rtt - 3e6).abs() < 1e3, "{rtt}");
        // A failure after 1 ms weighs as much as a 1 s response.
        let pick = upstream.pick(&parts()).unwrap();
        tokio::time::advance(Duration::from_millis(1)).await;
        pick.observer.unwrap().observe(Duration::ZERO, true);
        let rtt = state.latency.estimate_at(Instant::now());
        assert!(
            rtt >= crate::balance::FAILURE_RTT.as_nanos() as f64,
            "{rtt}"
        );
        // A request the client gave up on (its observer dropped) only stops counting.
        drop(upstream.pick(&parts()).unwrap());
        assert_eq!(state.latency.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_skips_the_failed_endpoints_then_the_backend_and_failures_set_aside() {
        let file = File::new("retry", &web(1, 1));
        let upstream = upstream(&file);
        let table = upstream.balancer.table();
        let service = table.service(upstream.original).unwrap();
        let a: Vec<SocketAddr> = service.backends[0]
            .endpoints
            .iter()
            .map(|e| e.addr)
            .collect();
        // Both endpoints of a failed: the retry goes to b's only endpoint.
        for _ in 0..20 {
            let pick = upstream.retry(&parts(), &a).unwrap();
            assert_eq!(pick.endpoint.addr, "198.18.2.1:80".parse().unwrap());
            assert_eq!(&*pick.dst.unwrap().1, "b");
        }
        // A retry counts no failure itself: the server loop reports each failed connect.
        let last = &service.backends[0].endpoints[1].state;
        assert!(last.is_ready(Instant::now()));
        for _ in 0..crate::balance::FAILURES_TO_SET_ASIDE {
            upstream.connect_failed(a[1]);
        }
        assert!(!last.is_ready(Instant::now()));
        // Every endpoint tried: nothing left.
        let all = [a[0], a[1], "198.18.2.1:80".parse().unwrap()];
        assert!(upstream.retry(&parts(), &all).is_none());
        // A request that gets a connection to it clears the record, whatever the answer.
        let backend = &service.backends[0];
        let answered = pick(
            &service.name,
            backend,
            &backend.endpoints[1],
            Instant::now(),
        );
        let observer = answered.observer.unwrap();
        observer.connected();
        assert!(last.is_ready(Instant::now()));
        observer.observe(Duration::ZERO, true);
        assert!(last.is_ready(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_removed_mid_connection_sends_requests_where_the_client_dialled() {
        let file = File::new("removed", &web(1, 1));
        let upstream = upstream(&file);
        file.write(&web(1, 1).replace(SERVICE, "198.18.100.99:80"));
        tokio::time::advance(crate::balance::CHECK_INTERVAL).await;
        let pick = upstream.pick(&parts()).unwrap();
        assert_eq!(pick.endpoint, Endpoint::plain(upstream.original));
        assert!(pick.dst.is_none());
    }
}
