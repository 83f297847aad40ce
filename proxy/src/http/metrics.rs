//! The golden metrics of proxied HTTP requests, with Linkerd's names:
//!
//! - `request_total`: requests received from clients (an upgrade or a `CONNECT`
//!   tunnel is one request, however long it lasts);
//! - `response_total`: responses sent to clients, with `status_code`,
//!   `classification` (`success` or `failure`) and, for gRPC, `grpc_status`;
//! - `response_latency_seconds`: from the request's headers to the end of the
//!   response body, with Linkerd's bucket boundaries ([`LATENCY_BUCKETS`]).
//!
//! All three are labelled `direction`, `target_addr` (the original destination),
//! `authority` (outbound only: the `Host` or `:authority` the client sent), `tls`
//! (whether the request's hop is our mTLS: the client's inbound, the one to the
//! endpoint outbound), `client_id` / `server_id` (the peer's identity on mTLS hops,
//! absent on plaintext ones) and `dst_service` / `dst_backend` (balanced requests only:
//! the backend that answered; empty when the request reached none).
//!
//! A response is a failure when its status is 500 or more, its gRPC status is not 0
//! (in the headers of a trailers-only response or in the trailers), or its body ended
//! in an error (the upstream reset the stream, or the client went away first).
//!
//! # Bounds
//!
//! `authority` is whatever a client writes and `target_addr` whatever it connects to,
//! so the label sets are capped like the connection metrics' (see `metrics`): at most
//! [`MAX_REQUEST_LABEL_SETS`] request label sets and [`MAX_RESPONSE_LABEL_SETS`]
//! response label sets. Past them a request is counted under `target_addr="overflow"`
//! (and `authority="overflow"` outbound), without peer identity or service labels, so
//! totals stay right. A label set that no connection uses and that has seen no request
//! for `--metrics-retain-idle` is dropped at the next scrape.
//!
//! The overflow label sets have response label sets of their own, one per status code a
//! destination answered: a hostile one answering every code from 100 to 999 would add
//! thousands. So each overflow label set keeps at most [`MAX_OVERFLOW_RESPONSE_SETS`];
//! past them a response is counted under `status_code="overflow"`. (`grpc_status` is
//! one of gRPC's 17 codes: see `headers::grpc_status`.)

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, EncodeMetric, LabelSetEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use tokio::time::Instant;

use crate::metrics::OVERFLOW;
use crate::route::Direction;

/// Linkerd's latency buckets (1 ms to 50 s), in seconds.
pub const LATENCY_BUCKETS: [f64; 25] = [
    0.001, 0.002, 0.003, 0.004, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0,
    2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0,
];

/// Most request label sets. Each costs a request counter and a 25-bucket histogram,
/// about 30 lines (4 KB) of text, so 512 keep the HTTP families around 2 MB however
/// many authorities a client invents, while a pod that really talks to a few hundred
/// services never reaches it.
pub const MAX_REQUEST_LABEL_SETS: usize = 512;

/// Most response label sets (a request label set times status, classification and
/// gRPC status), about 200 bytes each.
pub const MAX_RESPONSE_LABEL_SETS: usize = 2048;

/// Most response label sets of one overflow label set (there is one per direction and
/// `tls`): more status codes and gRPC statuses than honest destinations answer, and at
/// about 200 bytes each, 50 KB of text.
pub const MAX_OVERFLOW_RESPONSE_SETS: usize = 256;

/// The status of the responses counted past [`MAX_OVERFLOW_RESPONSE_SETS`], written
/// `status_code="overflow"`: no HTTP status is 0.
const OVERFLOW_STATUS: u16 = 0;

/// The labels shared by the three families.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RequestLabels {
    pub direction: Direction,
    pub target_addr: String,
    /// Outbound only: the `Host` header or `:authority` as the client sent it.
    pub authority: Option<String>,
    /// Whether the request's hop is our mTLS (inbound: the client's; outbound: the
    /// one to the endpoint).
    pub tls: bool,
    /// On mTLS hops, the peer's identity: `client_id` inbound, `server_id` outbound.
    pub peer_id: Option<Arc<str>>,
    /// On balanced requests: `dst_service` and `dst_backend`.
    pub dst: Option<(Arc<str>, Arc<str>)>,
}

impl RequestLabels {
    fn overflow(&self) -> RequestLabels {
        RequestLabels {
            direction: self.direction,
            target_addr: OVERFLOW.to_string(),
            authority: self.authority.as_ref().map(|_| OVERFLOW.to_string()),
            tls: self.tls,
            peer_id: None,
            dst: None,
        }
    }

    fn is_overflow(&self) -> bool {
        self.target_addr == OVERFLOW
    }

    fn encode_into(&self, encoder: &mut LabelSetEncoder<'_>) -> fmt::Result {
        ("direction", self.direction.as_str()).encode(encoder.encode_label())?;
        ("target_addr", self.target_addr.as_str()).encode(encoder.encode_label())?;
        if let Some(authority) = &self.authority {
            ("authority", authority.as_str()).encode(encoder.encode_label())?;
        }
        let tls = if self.tls { "true" } else { "false" };
        ("tls", tls).encode(encoder.encode_label())?;
        if let Some(id) = &self.peer_id {
            let key = match self.direction {
                Direction::Inbound => "client_id",
                Direction::Outbound => "server_id",
            };
            (key, &**id).encode(encoder.encode_label())?;
        }
        if let Some((service, backend)) = &self.dst {
            ("dst_service", &**service).encode(encoder.encode_label())?;
            ("dst_backend", &**backend).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, mut encoder: LabelSetEncoder<'_>) -> fmt::Result {
        self.encode_into(&mut encoder)
    }
}

/// How a response ended, for `response_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ResponseLabels {
    pub status: u16,
    /// The gRPC status, for gRPC responses that carried one.
    pub grpc_status: Option<u32>,
    pub failure: bool,
}

struct ResponseSample<'a> {
    request: &'a RequestLabels,
    response: ResponseLabels,
}

impl EncodeLabelSet for ResponseSample<'_> {
    fn encode(&self, mut encoder: LabelSetEncoder<'_>) -> fmt::Result {
        self.request.encode_into(&mut encoder)?;
        let status = match self.response.status {
            OVERFLOW_STATUS => OVERFLOW.to_string(),
            status => status.to_string(),
        };
        ("status_code", status.as_str()).encode(encoder.encode_label())?;
        let class = if self.response.failure {
            "failure"
        } else {
            "success"
        };
        ("classification", class).encode(encoder.encode_label())?;
        if let Some(grpc) = self.response.grpc_status {
            let grpc = grpc.to_string();
            ("grpc_status", grpc.as_str()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// The metrics of one request label set. Connections hold it (`Arc`) while they use
/// it, which keeps it from being dropped.
pub struct Series {
    labels: RequestLabels,
    requests: Counter,
    latency: Histogram,
    responses: Mutex<Vec<(ResponseLabels, Counter)>>,
    /// When a request last used it, in nanoseconds since [`Inner::epoch`].
    last_active: AtomicU64,
}

impl Series {
    fn new(labels: RequestLabels) -> Series {
        Series {
            labels,
            requests: Counter::default(),
            latency: Histogram::new(LATENCY_BUCKETS),
            responses: Mutex::new(Vec::new()),
            last_active: AtomicU64::new(0),
        }
    }

    pub fn labels(&self) -> &RequestLabels {
        &self.labels
    }
}

impl fmt::Debug for Series {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Series")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

/// The HTTP metric families: cheap to clone, shared by every connection.
#[derive(Clone, Debug)]
pub struct HttpMetrics(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    retain_idle: Duration,
    epoch: Instant,
    series: Mutex<HashMap<RequestLabels, Arc<Series>>>,
    response_label_sets: AtomicUsize,
}

impl HttpMetrics {
    /// Families that drop label sets idle for `retain_idle` (`--metrics-retain-idle`).
    pub fn new(retain_idle: Duration) -> HttpMetrics {
        HttpMetrics(Arc::new(Inner {
            retain_idle,
            epoch: Instant::now(),
            series: Mutex::new(HashMap::new()),
            response_label_sets: AtomicUsize::new(0),
        }))
    }

    /// What the registry encodes at each scrape.
    pub fn collector(&self) -> Box<dyn Collector> {
        Box::new(Families(self.0.clone()))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<RequestLabels, Arc<Series>>> {
        self.0.series.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        let nanos = Instant::now()
            .saturating_duration_since(self.0.epoch)
            .as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX)
    }

    /// The series of `labels`, created if new, or the overflow series once
    /// [`MAX_REQUEST_LABEL_SETS`] are in use.
    pub fn series(&self, labels: RequestLabels) -> Arc<Series> {
        let mut map = self.lock();
        if let Some(series) = map.get(&labels) {
            return series.clone();
        }
        let labels = if map.len() >= MAX_REQUEST_LABEL_SETS && !labels.is_overflow() {
            self.sweep_locked(&mut map);
            if map.len() >= MAX_REQUEST_LABEL_SETS {
                labels.overflow()
            } else {
                labels
            }
        } else {
            labels
        };
        let series = map
            .entry(labels)
            .or_insert_with_key(|labels| Arc::new(Series::new(labels.clone())));
        series.last_active.store(self.now(), Ordering::Relaxed);
        series.clone()
    }

    /// Counts a request received.
    pub fn request(&self, series: &Series) {
        series.requests.inc();
        series.last_active.store(self.now(), Ordering::Relaxed);
    }

    /// Counts a response, finished after `latency` (`None` when it is not known: the
    /// response is then counted in `response_total` only).
    pub fn response(&self, series: &Series, response: ResponseLabels, latency: Option<Duration>) {
        if let Some(latency) = latency {
            series.latency.observe(latency.as_secs_f64());
        }
        series.last_active.store(self.now(), Ordering::Relaxed);
        if count_response(series, response, |_| {
            self.0
                .response_label_sets
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < MAX_RESPONSE_LABEL_SETS).then_some(n + 1)
                })
                .is_ok()
        }) {
            return;
        }
        // Past the cap: under the overflow label set, and past its own cap under the
        // overflow status.
        let overflow = self.series(series.labels.overflow());
        if !count_response(&overflow, response, |sets| {
            sets < MAX_OVERFLOW_RESPONSE_SETS
        }) {
            let response = ResponseLabels {
                status: OVERFLOW_STATUS,
                grpc_status: None,
                failure: response.failure,
            };
            count_response(&overflow, response, |_| true);
        }
    }

    /// Drops the label sets no connection holds and no request used for
    /// `retain_idle`.
    fn sweep_locked(&self, map: &mut HashMap<RequestLabels, Arc<Series>>) {
        let now = self.now();
        let idle = u64::try_from(self.0.retain_idle.as_nanos()).unwrap_or(u64::MAX);
        let mut dropped = 0;
        map.retain(|_, series| {
            // The map's own reference is the only one: no connection uses it.
            let unused = Arc::strong_count(series) == 1;
            let last = series.last_active.load(Ordering::Relaxed);
            let keep = !unused || now.saturating_sub(last) < idle;
            if !keep {
                dropped += lock(&series.responses).len();
            }
            keep
        });
        let _ =
            self.0
                .response_label_sets
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(dropped))
                });
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Adds one to `response` in `series`; a new label set only if `may_grow` agrees, told
/// how many the series has.
fn count_response(
    series: &Series,
    response: ResponseLabels,
    may_grow: impl FnOnce(usize) -> bool,
) -> bool {
    let mut responses = lock(&series.responses);
    if let Some((_, counter)) = responses.iter().find(|(r, _)| *r == response) {
        counter.inc();
        return true;
    }
    if !may_grow(responses.len()) {
        return false;
    }
    let counter = Counter::default();
    counter.inc();
    responses.push((response, counter));
    true
}

#[derive(Debug)]
struct Families(Arc<Inner>);

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let metrics = HttpMetrics(self.0.clone());
        let all: Vec<Arc<Series>> = {
            let mut map = metrics.lock();
            metrics.sweep_locked(&mut map);
            map.values().cloned().collect()
        };
        // OpenMetrics names counters without `_total`; `metrics` renames them.
        let mut family = encoder.encode_descriptor(
            "request",
            "HTTP requests received from clients.",
            None,
            MetricType::Counter,
        )?;
        for series in &all {
            ConstCounter::new(series.requests.get())
                .encode(family.encode_family(&series.labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "response",
            "HTTP responses sent to clients.",
            None,
            MetricType::Counter,
        )?;
        for series in &all {
            let responses: Vec<(ResponseLabels, u64)> = lock(&series.responses)
                .iter()
                .map(|(r, c)| (*r, c.get()))
                .collect();
            for (response, count) in responses {
                let labels = ResponseSample {
                    request: &series.labels,
                    response,
                };
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "response_latency_seconds",
            "Time from a request's headers to the end of its response.",
            None,
            MetricType::Histogram,
        )?;
        for series in &all {
            series
                .latency
                .encode(family.encode_family(&series.labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: usize) -> RequestLabels {
        RequestLabels {
            direction: Direction::Outbound,
            target_addr: "198.18.0.1:80".to_string(),
            authority: Some(format!("host-{n}.test")),
            tls: false,
            peer_id: None,
            dst: None,
        }
    }

    fn ok() -> ResponseLabels {
        ResponseLabels {
            status: 200,
            grpc_status: None,
            failure: false,
        }
    }

    /// The registry's text for these families alone.
    fn encode(metrics: &HttpMetrics) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(metrics.collector());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    fn sum(text: &str, prefix: &str) -> f64 {
        text.lines()
            .filter(|line| line.starts_with(prefix))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    #[tokio::test(start_paused = true)]
    async fn invented_authorities_are_capped_and_counted_as_overflow() {
        let metrics = HttpMetrics::new(Duration::from_secs(600));
        let requests = MAX_REQUEST_LABEL_SETS + 100;
        for n in 0..requests {
            let series = metrics.series(labels(n));
            metrics.request(&series);
            metrics.response(&series, ok(), Some(Duration::from_millis(3)));
        }
        let text = encode(&metrics);
        let request_lines = text
            .lines()
            .filter(|l| l.starts_with("request_total{"))
            .count();
        assert_eq!(
            request_lines,
            MAX_REQUEST_LABEL_SETS + 1,
            "the cap and overflow"
        );
        let overflow = r#"request_total{direction="outbound",target_addr="overflow",authority="overflow",tls="false"} 100"#;
        assert!(text.contains(overflow), "{text}");
        // Every request and response counted once, capped or not.
        assert_eq!(sum(&text, "request_total{"), requests as f64);
        assert_eq!(sum(&text, "response_total{"), requests as f64);
        assert_eq!(
            sum(&text, "response_latency_seconds_count{"),
            requests as f64
        );
        // 3 ms falls in the 0.003 bucket (le is inclusive) of every label set.
        let first = r#"response_latency_seconds_bucket{le="0.003",direction="outbound",target_addr="198.18.0.1:80",authority="host-0.test",tls="false"} 1"#;
        assert!(text.contains(first), "{text}");
        // Linkerd's boundaries, exactly, then +Inf.
        let bounds: Vec<String> = text
            .lines()
            .filter(|l| {
                l.starts_with("response_latency_seconds_bucket{") && l.contains("host-0.test")
            })
            .filter_map(|l| Some(l.split("le=\"").nth(1)?.split('"').next()?.to_string()))
            .collect();
        let mut want: Vec<String> = LATENCY_BUCKETS.iter().map(|b| format!("{b:?}")).collect();
        want.push("+Inf".to_string());
        assert_eq!(bounds, want);
    }

    #[tokio::test(start_paused = true)]
    async fn response_label_sets_are_capped_too() {
        let metrics = HttpMetrics::new(Duration::from_secs(600));
        let series = metrics.series(labels(0));
        // Every status code, with and without a gRPC status: more than the cap.
        let mut responses = 0;
        for status in 100..1000 {
            for grpc_status in [None, Some(2), Some(5)] {
                let response = ResponseLabels {
                    status,
                    grpc_status,
                    failure: status >= 500,
                };
                metrics.response(&series, response, Some(Duration::from_millis(1)));
                responses += 1;
            }
        }
        let text = encode(&metrics);
        let mine = text
            .lines()
            .filter(|l| l.starts_with("response_total{") && l.contains("host-0.test"))
            .count();
        assert_eq!(mine, MAX_RESPONSE_LABEL_SETS);
        assert!(text.contains(r#"authority="overflow""#), "{text}");
        assert_eq!(sum(&text, "response_total{"), f64::from(responses));
        // The 652 past the cap (statuses 782 to 999, failures) went to the overflow
        // label set, which keeps its own cap, plus the overflow status.
        let overflow = text
            .lines()
            .filter(|l| l.starts_with("response_total{") && l.contains(r#"target_addr="overflow""#))
            .count();
        assert_eq!(overflow, MAX_OVERFLOW_RESPONSE_SETS + 1, "{text}");
        assert!(
            text.contains(r#"status_code="overflow",classification="failure""#),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_label_sets_are_dropped_unless_a_connection_holds_them() {
        let metrics = HttpMetrics::new(Duration::from_secs(600));
        let held = metrics.series(labels(1));
        metrics.request(&held);
        let dropped = metrics.series(labels(2));
        metrics.request(&dropped);
        drop(dropped);
        tokio::time::advance(Duration::from_secs(601)).await;
        let text = encode(&metrics);
        assert!(text.contains("host-1.test"), "{text}");
        assert!(!text.contains("host-2.test"), "{text}");
    }

    #[test]
    fn grpc_status_and_classification_are_labels() {
        let metrics = HttpMetrics::new(Duration::from_secs(600));
        let series = metrics.series(labels(0));
        let failed = ResponseLabels {
            status: 200,
            grpc_status: Some(5),
            failure: true,
        };
        metrics.response(&series, failed, Some(Duration::from_millis(1)));
        let text = encode(&metrics);
        let line = r#"response_total{direction="outbound",target_addr="198.18.0.1:80",authority="host-0.test",tls="false",status_code="200",classification="failure",grpc_status="5"} 1"#;
        assert!(text.contains(line), "{text}");
    }
}
