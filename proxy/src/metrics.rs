//! The Prometheus metrics of the proxy, with the names of DESIGN.md.
//!
//! Connection metrics are labelled `direction` (inbound/outbound), `target_addr` (the
//! original destination), `protocol` (opaque, http1, http2, tls) and `tls` (whether the
//! hop is our mTLS). mTLS hops also carry the peer's identity: `client_id` on inbound
//! connections, `server_id` on outbound ones. Plaintext hops have neither label, which
//! Prometheus reads as the empty value, so their series are unchanged:
//!
//! - `tcp_open_total`: connections forwarded, counted once detection has named the
//!   protocol, before connecting to the target.
//! - `tcp_close_total`: the same connections once closed, with `errno` the name of the
//!   error that ended it (`ECONNREFUSED`, `ECONNRESET`, ...), or empty on a clean close.
//! - `tcp_open_connections`: open minus closed.
//! - `tcp_read_bytes_total`: bytes read from the client (the accepted socket), including
//!   the bytes read during detection.
//! - `tcp_write_bytes_total`: bytes written to the client.
//!
//! Byte counters are updated after every read or write, so long-lived connections are
//! visible while they last; each update is one atomic add on a counter looked up once
//! per connection.
//!
//! The connection label sets are bounded, because `target_addr` is whatever a client
//! connects to: a port scan once grew `/metrics` from 8 KB to 12 MB. There are at most
//! [`MAX_CONN_LABEL_SETS`] connection label sets and [`MAX_CLOSE_LABEL_SETS`] close
//! label sets; past them a connection is counted under `target_addr="overflow"` (same
//! direction, protocol and `tls`, no peer identity), so totals stay right. A label set
//! that has had no open connection for `--metrics-retain-idle` (10 minutes) is dropped
//! at the next scrape, or when the table is full; one with an open connection never
//! is. A dropped counter that comes back starts from zero, which Prometheus reads as a
//! counter reset (`rate()` and `increase()` handle it).
//!
//! Detection: `detect_results_total{result}` with `result` one of http1, http2, tls,
//! opaque, timeout (failed open), eof (closed before sending), error (read failed);
//! `detect_duration_seconds` how long detection took. Connections on opaque ports skip
//! detection and appear in neither.
//!
//! `tcp_refused_total{direction,reason}` counts connections closed before forwarding:
//! `max_connections`, `max_detecting` (the caps, per direction), `no_original_dst` (not
//! redirected), `identity_required` (a plaintext client on a `--require-identity-ports`
//! port), and the trust boundary (see `route`): `loopback_destination`,
//! `unspecified_destination`, `multicast_destination`, `foreign_destination` (an inbound
//! original destination that is not an address of the pod) and `self_loop` (an original
//! destination that is one of the proxy's own listeners).
//!
//! The HTTP families (`request_total`, `response_total`, `response_latency_seconds`)
//! belong to `http::metrics`, which registers them here with [`Metrics::register`].
//!
//! The standard process metrics (`process_cpu_seconds_total`, `process_open_fds`, ...):
//! see `metrics/process`.
//!
//! `tls_handshake_failures_total{direction,reason}` counts failed mTLS handshakes:
//! `reason` is `no_client_cert`, `untrusted` (no chain to the trust anchors),
//! `wrong_identity` (a trusted certificate for another identity), `bad_alpn`,
//! `timeout` or `other` (including a malformed transport header).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, EncodeMetric, LabelSetEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

mod process;

/// A label value of a domain type. The types are owned (and their values spelled) by
/// the modules they describe: `Direction` by `route`, `Protocol` and `Detected` by
/// `detect`, `HandshakeFailure` by `tls`, `Refused` by `outcome`. This module only
/// stores the strings, so it depends on none of them.
pub trait Label {
    /// The label value, exactly as exposed.
    fn label(&self) -> &'static str;
}

/// A value spelled out, as the tests and `discovery_updates_total` do.
impl Label for &'static str {
    fn label(&self) -> &'static str {
        self
    }
}

/// Byte counters of one connection, from the client's point of view; the copy loop
/// (`duplex`) adds to them.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// Bytes read from the client.
    pub read: Counter,
    /// Bytes written to the client.
    pub written: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct ConnLabels {
    direction: &'static str,
    target_addr: String,
    protocol: &'static str,
    tls: &'static str,
    /// On mTLS hops, the peer's identity: `client_id` inbound, `server_id` outbound.
    peer_id: Option<(&'static str, String)>,
    /// On balanced connections (`--discovery`), the service and the backend chosen:
    /// `dst_service` and `dst_backend`. As bounded as the discovery file.
    dst: Option<(Arc<str>, Arc<str>)>,
}

impl ConnLabels {
    fn encode_into(&self, encoder: &mut LabelSetEncoder<'_>) -> fmt::Result {
        ("direction", self.direction).encode(encoder.encode_label())?;
        ("target_addr", self.target_addr.as_str()).encode(encoder.encode_label())?;
        ("protocol", self.protocol).encode(encoder.encode_label())?;
        ("tls", self.tls).encode(encoder.encode_label())?;
        // Only on mTLS hops. Prometheus treats an absent label and an empty one alike,
        // so plaintext series keep exactly the labels they had before mTLS existed.
        if let Some((key, id)) = &self.peer_id {
            (*key, id.as_str()).encode(encoder.encode_label())?;
        }
        if let Some((service, backend)) = &self.dst {
            ("dst_service", &**service).encode(encoder.encode_label())?;
            ("dst_backend", &**backend).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

impl ConnLabels {
    fn is_overflow(&self) -> bool {
        self.target_addr == OVERFLOW
    }

    /// The label set a connection is counted under once the label sets are full: the
    /// same direction, protocol and `tls`, `target_addr="overflow"`, and no peer
    /// identity (which would be one more unbounded label).
    fn overflow(&self) -> ConnLabels {
        ConnLabels {
            direction: self.direction,
            target_addr: OVERFLOW.to_string(),
            protocol: self.protocol,
            tls: self.tls,
            peer_id: None,
            dst: None,
        }
    }
}

impl EncodeLabelSet for ConnLabels {
    fn encode(&self, mut encoder: LabelSetEncoder<'_>) -> fmt::Result {
        self.encode_into(&mut encoder)
    }
}

/// The labels of a `tcp_close_total` sample: the connection's and `errno`.
struct CloseLabels<'a> {
    conn: &'a ConnLabels,
    errno: &'a str,
}

impl EncodeLabelSet for CloseLabels<'_> {
    fn encode(&self, mut encoder: LabelSetEncoder<'_>) -> fmt::Result {
        self.conn.encode_into(&mut encoder)?;
        ("errno", self.errno).encode(encoder.encode_label())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    direction: &'static str,
    reason: &'static str,
}

/// The same two labels for handshake failures.
type HandshakeLabels = RefusedLabels;

/// Most label sets of the connection families (`tcp_open_total`,
/// `tcp_open_connections`, `tcp_read_bytes_total`, `tcp_write_bytes_total`, which share
/// their label sets). Past it, a connection to a new destination is counted under
/// `target_addr="overflow"` (one label set per direction, protocol and `tls`, which the
/// cap does not count: at most 16 more).
///
/// Why 2048: each label set costs four samples of about 110 bytes, so the four
/// families stay under 1 MiB of text however many destinations a port scan tries,
/// while a pod that really talks to many services (a few hundred distinct
/// `IP:port`, even counting both directions) never reaches it.
pub const MAX_CONN_LABEL_SETS: usize = 2048;

/// Most label sets of `tcp_close_total` (a connection label set times an `errno`).
/// Past it, a close that would start a new label set is counted under the overflow
/// label set of its direction, protocol and `tls`, with its `errno`. 4096 samples of
/// about 125 bytes: under 0.5 MiB, so all connection metrics together stay well under
/// 2 MiB.
pub const MAX_CLOSE_LABEL_SETS: usize = 4096;

/// `--metrics-retain-idle` when not set: Linkerd's 10 minutes.
pub const DEFAULT_RETAIN_IDLE: Duration = Duration::from_secs(600);

/// The `target_addr` of connections past the label-set cap.
pub const OVERFLOW: &str = "overflow";

/// While the label sets are full, how often a new destination may trigger a sweep of
/// idle label sets: a sweep walks them all, so it must not run once per connection of
/// a flood.
const FULL_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// All metrics of one proxy, and the registry that exposes them.
pub struct Metrics {
    registry: Registry,
    conns: Arc<Conns>,
    detect_results: Family<ResultLabels, Counter>,
    detect_duration: Histogram,
    refused: Family<RefusedLabels, Counter>,
    handshake_failures: Family<HandshakeLabels, Counter>,
    /// `discovery_updates_total{result="ok"|"invalid"}`.
    discovery_updates: Family<ResultLabels, Counter>,
    /// Where `balancer_endpoints` comes from, once a balancer exists.
    balancer_endpoints: Arc<OnceLock<EndpointGauges>>,
    /// Families owned by another module, registered once it exists: the HTTP
    /// families (`http::metrics`).
    later: Arc<OnceLock<Box<dyn Collector>>>,
}

/// Computes `balancer_endpoints` at each scrape.
pub type EndpointGauges = Box<dyn Fn() -> Vec<EndpointGauge> + Send + Sync>;

/// One sample of `balancer_endpoints{service,backend,state}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointGauge {
    pub service: Arc<str>,
    pub backend: Arc<str>,
    /// `ready` or `failed` (set aside after failing to connect).
    pub state: &'static str,
    pub count: i64,
}

/// `balancer_endpoints`, computed when scraped, so an endpoint whose penalty ran out
/// shows as ready again without waiting for a connection.
struct BalancerCollector(Arc<OnceLock<EndpointGauges>>);

impl fmt::Debug for BalancerCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BalancerCollector")
    }
}

impl Collector for BalancerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let Some(gauges) = self.0.get() else {
            return Ok(());
        };
        let gauges = gauges();
        let mut family = encoder.encode_descriptor(
            "balancer_endpoints",
            "Endpoints of each service backend, ready or set aside after failing.",
            None,
            MetricType::Gauge,
        )?;
        for gauge in &gauges {
            let labels = [
                ("service", &*gauge.service),
                ("backend", &*gauge.backend),
                ("state", gauge.state),
            ];
            ConstGauge::new(gauge.count).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The collector given to [`Metrics::register`], once it is.
struct Later(Arc<OnceLock<Box<dyn Collector>>>);

impl fmt::Debug for Later {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Later")
    }
}

impl Collector for Later {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> fmt::Result {
        match self.0.get() {
            Some(collector) => collector.encode(encoder),
            None => Ok(()),
        }
    }
}

/// The connection metrics: their label sets, handles and the bookkeeping that bounds
/// them, encoded by the registry through [`ConnFamilies`].
///
/// They are not prometheus-client `Family`s: a `Family` is read-locked while it is
/// encoded, and creating a label set write-locks it, so a connection to a new
/// destination would wait for a scrape to finish encoding (and every other connection
/// behind it, for the mutex below). Here an encode copies the values under `book` (a
/// few microseconds per label set, no text formatting) and formats them after
/// releasing it; opening and closing a connection only ever takes `book`, briefly.
///
/// A label set with an open connection is never dropped: `open` is counted under the
/// same lock that decides removal. The handles of a label set are resolved once, when
/// the connection opens, and the copy loop only adds to its byte counters.
#[derive(Debug)]
struct Conns {
    /// Label sets without an open connection for this long are dropped.
    retain_idle: Duration,
    book: Mutex<Book>,
}

/// What is known about the live label sets.
#[derive(Debug)]
struct Book {
    series: HashMap<Arc<ConnLabels>, Series>,
    /// Label sets of `tcp_close_total` (the sum of every `Series::closes` length).
    close_label_sets: usize,
    /// When idle label sets were last dropped.
    last_sweep: Option<Instant>,
}

/// One connection label set: its metrics, and whether it may be dropped.
#[derive(Debug, Default)]
struct Series {
    open_total: Counter,
    open_now: Gauge,
    read: Counter,
    written: Counter,
    /// `tcp_close_total` of this label set, by `errno` (a handful at most).
    closes: Vec<(Arc<str>, Counter)>,
    /// Connections open now. A label set is never dropped while this is not zero.
    open: u64,
    /// When a connection with these labels last opened or closed.
    last_active: Option<Instant>,
}

/// The values of one label set at one scrape.
struct Sample {
    labels: Arc<ConnLabels>,
    open_total: u64,
    open_now: i64,
    read: u64,
    written: u64,
    closes: Vec<(Arc<str>, u64)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Metrics that drop idle label sets after `DEFAULT_RETAIN_IDLE` (10 minutes).
    pub fn new() -> Metrics {
        Metrics::with_retain_idle(DEFAULT_RETAIN_IDLE)
    }

    /// Metrics that drop label sets with no open connection for `retain_idle`
    /// (`--metrics-retain-idle`).
    pub fn with_retain_idle(retain_idle: Duration) -> Metrics {
        let mut registry = Registry::default();
        let conns = Arc::new(Conns {
            retain_idle,
            book: Mutex::new(Book {
                series: HashMap::new(),
                close_label_sets: 0,
                last_sweep: None,
            }),
        });
        let detect_results = Family::default();
        // 1 ms to 16 s: covers a fast client and the default 10 s timeout.
        let detect_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let refused = Family::default();
        let handshake_failures = Family::default();
        let discovery_updates = Family::default();
        let balancer_endpoints = Arc::new(OnceLock::new());
        registry.register(
            "discovery_updates",
            "Loads of the discovery file, valid or not",
            discovery_updates.clone(),
        );
        registry.register_collector(Box::new(BalancerCollector(balancer_endpoints.clone())));
        // `tcp_open`, `tcp_close`, `tcp_open_connections`, `tcp_read_bytes`,
        // `tcp_write_bytes`: see `ConnFamilies`.
        registry.register_collector(Box::new(ConnFamilies(conns.clone())));
        registry.register_collector(Box::new(process::ProcessCollector));
        let later = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(Later(later.clone())));
        // prometheus-client appends `_total` to counters: `tcp_refused` is exposed as
        // `tcp_refused_total`.
        registry.register(
            "detect_results",
            "Protocol detection outcomes",
            detect_results.clone(),
        );
        registry.register(
            "detect_duration_seconds",
            "Time spent detecting the protocol",
            detect_duration.clone(),
        );
        registry.register(
            "tcp_refused",
            "Connections closed before forwarding",
            refused.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "mTLS handshakes (and transport headers) that failed",
            handshake_failures.clone(),
        );
        Metrics {
            registry,
            conns,
            detect_results,
            detect_duration,
            refused,
            handshake_failures,
            discovery_updates,
            balancer_endpoints,
            later,
        }
    }

    /// Registers the families of `collector` (the HTTP ones), encoded at each scrape
    /// with the rest; only the first call counts (one forwarder per proxy).
    pub fn register(&self, collector: Box<dyn Collector>) {
        let _ = self.later.set(collector);
    }

    /// Every metric in the Prometheus text format (version 0.0.4), after dropping the
    /// label sets idle for longer than `retain_idle`.
    ///
    /// This walks every label set: the admin server calls it off the async workers
    /// (`spawn_blocking`), one call at a time.
    pub fn encode(&self) -> String {
        self.conns.sweep(Instant::now());
        let mut openmetrics = String::new();
        // Unreachable error: `encode` fails only when its writer does, and writing to a
        // `String` cannot fail (our label encoders only pass the writer's result on).
        encode(&mut openmetrics, &self.registry).expect("writing to a String cannot fail");
        openmetrics_to_prometheus(&openmetrics)
    }

    /// Records a detection outcome and how long it took.
    pub fn detected(&self, result: &impl Label, took: Duration) {
        self.detect_results
            .get_or_create(&ResultLabels {
                result: result.label(),
            })
            .inc();
        self.detect_duration.observe(took.as_secs_f64());
    }

    /// Records a detection that ended in a read error.
    pub fn detect_error(&self, took: Duration) {
        self.detect_results
            .get_or_create(&ResultLabels { result: "error" })
            .inc();
        self.detect_duration.observe(took.as_secs_f64());
    }

    /// Records a connection closed before forwarding.
    pub fn refused(&self, direction: impl Label, reason: impl Label) {
        self.refused
            .get_or_create(&RefusedLabels {
                direction: direction.label(),
                reason: reason.label(),
            })
            .inc();
    }

    /// Records a failed mTLS handshake (or transport header) and why.
    pub fn handshake_failed(&self, direction: impl Label, reason: impl Label) {
        self.handshake_failures
            .get_or_create(&HandshakeLabels {
                direction: direction.label(),
                reason: reason.label(),
            })
            .inc();
    }

    /// Counts a load of the discovery file: `ok` or `invalid`.
    pub fn discovery_update(&self, ok: bool) {
        let result = if ok { "ok" } else { "invalid" };
        self.discovery_updates
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Sets where `balancer_endpoints` comes from; only the first call counts (one
    /// balancer per proxy).
    pub fn set_balancer_endpoints(&self, gauges: EndpointGauges) {
        let _ = self.balancer_endpoints.set(gauges);
    }

    /// Counts a connection as open and returns its counters. Dropping the result counts
    /// it as closed. `peer_id` is the peer's identity when the hop is our mTLS, as its
    /// label name and value: `client_id` for inbound connections, `server_id` for
    /// outbound ones (see `Direction::peer_id`).
    ///
    /// Past `MAX_CONN_LABEL_SETS` a new destination is counted under
    /// `target_addr="overflow"`.
    pub fn open(
        &self,
        direction: impl Label,
        target: std::net::SocketAddr,
        protocol: impl Label,
        peer_id: Option<(&'static str, &str)>,
    ) -> ConnMetrics {
        self.open_balanced(direction, target, protocol, peer_id, None)
    }

    /// [`Metrics::open`] for a connection to a service of `--discovery`: `dst` is the
    /// service and the backend chosen (`dst_service`, `dst_backend`).
    pub fn open_balanced(
        &self,
        direction: impl Label,
        target: std::net::SocketAddr,
        protocol: impl Label,
        peer_id: Option<(&'static str, &str)>,
        dst: Option<(Arc<str>, Arc<str>)>,
    ) -> ConnMetrics {
        let labels = ConnLabels {
            direction: direction.label(),
            target_addr: target.to_string(),
            protocol: protocol.label(),
            tls: if peer_id.is_some() { "true" } else { "false" },
            peer_id: peer_id.map(|(key, id)| (key, id.to_string())),
            dst,
        };
        let (labels, counters) = self.conns.open(labels, Instant::now());
        ConnMetrics {
            counters,
            conns: self.conns.clone(),
            labels,
            // Until `set_errno` says otherwise, a connection dropped midway (shutdown
            // grace expired) was cancelled.
            errno: Some("ECANCELED".to_string()),
        }
    }
}

impl Conns {
    /// The bookkeeping. A panic while it was held cannot leave it inconsistent in a
    /// way that matters more than losing metrics, so a poisoned lock is used as is.
    fn lock(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one more open connection under `labels` (or its overflow label set when
    /// the label sets are full) and returns the labels used and the byte counters.
    fn open(&self, labels: ConnLabels, now: Instant) -> (Arc<ConnLabels>, Counters) {
        let mut book = self.lock();
        let labels = if book.series.contains_key(&labels) || labels.is_overflow() {
            labels
        } else {
            if book.series.len() >= MAX_CONN_LABEL_SETS
                && book
                    .last_sweep
                    .is_none_or(|at| now.saturating_duration_since(at) >= FULL_SWEEP_INTERVAL)
            {
                self.sweep_locked(&mut book, now);
            }
            if book.series.len() >= MAX_CONN_LABEL_SETS {
                labels.overflow()
            } else {
                labels
            }
        };
        let (labels, series) = entry(&mut book, labels);
        series.open += 1;
        series.last_active = Some(now);
        series.open_total.inc();
        series.open_now.inc();
        let counters = Counters {
            read: series.read.clone(),
            written: series.written.clone(),
        };
        (labels, counters)
    }

    /// Counts a connection opened under `labels` as closed with `errno`.
    fn close(&self, labels: &ConnLabels, errno: String, now: Instant) {
        let mut book = self.lock();
        let book = &mut *book;
        let Some(series) = book.series.get_mut(labels) else {
            // Unreachable: a label set with an open connection (this one) is never
            // dropped. Losing one close is better than a panic in a destructor.
            debug_assert!(false, "label set dropped while open: {labels:?}");
            return;
        };
        series.open = series.open.saturating_sub(1);
        series.last_active = Some(now);
        series.open_now.dec();
        if let Some((_, closed)) = series.closes.iter().find(|(e, _)| **e == *errno) {
            closed.inc();
            return;
        }
        // A new `tcp_close_total` label set: past the cap, count it under the
        // overflow label set instead (created if needed, and then idle at once).
        let series = if book.close_label_sets >= MAX_CLOSE_LABEL_SETS && !labels.is_overflow() {
            let (_, series) = entry(book, labels.overflow());
            series.last_active = Some(now);
            series
        } else {
            match book.series.get_mut(labels) {
                Some(series) => series,
                // Unreachable: found above, under the same lock.
                None => return,
            }
        };
        if let Some((_, closed)) = series.closes.iter().find(|(e, _)| **e == *errno) {
            closed.inc();
            return;
        }
        let closed = Counter::default();
        closed.inc();
        series.closes.push((errno.into(), closed));
        book.close_label_sets += 1;
    }

    /// Drops the label sets that have had no open connection for `retain_idle`.
    fn sweep(&self, now: Instant) {
        let mut book = self.lock();
        self.sweep_locked(&mut book, now);
    }

    fn sweep_locked(&self, book: &mut Book, now: Instant) {
        let mut dropped_closes = 0;
        book.series.retain(|_, series| {
            // Never a label set with an open connection: its handles are in use and
            // its gauge is not zero.
            let idle_since = series.last_active.unwrap_or(now);
            let keep =
                series.open > 0 || now.saturating_duration_since(idle_since) < self.retain_idle;
            if !keep {
                dropped_closes += series.closes.len();
            }
            keep
        });
        book.close_label_sets = book.close_label_sets.saturating_sub(dropped_closes);
        book.last_sweep = Some(now);
    }

    /// The values of every label set, copied under the lock; formatting them into text
    /// happens after it is released.
    fn samples(&self) -> Vec<Sample> {
        let book = self.lock();
        book.series
            .iter()
            .map(|(labels, series)| Sample {
                labels: labels.clone(),
                open_total: series.open_total.get(),
                open_now: series.open_now.get(),
                read: series.read.get(),
                written: series.written.get(),
                closes: series
                    .closes
                    .iter()
                    .map(|(errno, closed)| (errno.clone(), closed.get()))
                    .collect(),
            })
            .collect()
    }
}

/// The label set `labels` of `book`, created if new, and its key.
fn entry(book: &mut Book, labels: ConnLabels) -> (Arc<ConnLabels>, &mut Series) {
    // Looked up first so that an existing label set costs no allocation.
    let key = match book.series.get_key_value(&labels) {
        Some((key, _)) => key.clone(),
        None => Arc::new(labels),
    };
    let series = book.series.entry(key.clone()).or_default();
    (key, series)
}

/// The connection families, as the registry encodes them at each scrape.
#[derive(Debug)]
struct ConnFamilies(Arc<Conns>);

impl Collector for ConnFamilies {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let samples = self.0.samples();
        let counter = |encoder: &mut DescriptorEncoder<'_>,
                       name: &str,
                       help: &str,
                       value: fn(&Sample) -> u64|
         -> fmt::Result {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for sample in &samples {
                ConstCounter::new(value(sample)).encode(family.encode_family(&*sample.labels)?)?;
            }
            Ok(())
        };
        counter(&mut encoder, "tcp_open", "Connections forwarded.", |s| {
            s.open_total
        })?;
        let mut closes = encoder.encode_descriptor(
            "tcp_close",
            "Forwarded connections closed.",
            None,
            MetricType::Counter,
        )?;
        for sample in &samples {
            for (errno, closed) in &sample.closes {
                let labels = CloseLabels {
                    conn: &sample.labels,
                    errno,
                };
                ConstCounter::new(*closed).encode(closes.encode_family(&labels)?)?;
            }
        }
        let mut open = encoder.encode_descriptor(
            "tcp_open_connections",
            "Forwarded connections currently open.",
            None,
            MetricType::Gauge,
        )?;
        for sample in &samples {
            ConstGauge::new(sample.open_now).encode(open.encode_family(&*sample.labels)?)?;
        }
        counter(
            &mut encoder,
            "tcp_read_bytes",
            "Bytes read from the client.",
            |s| s.read,
        )?;
        counter(
            &mut encoder,
            "tcp_write_bytes",
            "Bytes written to the client.",
            |s| s.written,
        )
    }
}

/// The metrics of one open connection. Records the close when dropped.
pub struct ConnMetrics {
    counters: Counters,
    conns: Arc<Conns>,
    labels: Arc<ConnLabels>,
    errno: Option<String>,
}

impl ConnMetrics {
    /// The byte counters the copy loop adds to.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The `errno` label of the close: `None` for a clean close.
    pub fn set_errno(&mut self, errno: Option<String>) {
        self.errno = errno;
    }
}

impl Drop for ConnMetrics {
    fn drop(&mut self) {
        let errno = self.errno.take().unwrap_or_default();
        self.conns.close(&self.labels, errno, Instant::now());
    }
}

/// Rewrites prometheus-client's OpenMetrics text as Prometheus text, which is what
/// DESIGN.md promises and what `promtool check metrics` reads.
///
/// The two differ in what matters here only in naming: OpenMetrics names a counter
/// family without `_total` (`# TYPE tcp_open counter`, samples `tcp_open_total`), while
/// the Prometheus format names it with (`# TYPE tcp_open_total counter`). OpenMetrics'
/// `# EOF` and `# UNIT` lines have no Prometheus equivalent and are dropped.
fn openmetrics_to_prometheus(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let metadata = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|tag| Some((tag, line.strip_prefix(tag)?)));
        match metadata {
            Some((tag, rest)) => {
                let name = rest.split(' ').next().unwrap_or_default();
                if counters.contains(&name) {
                    // In bounds, on a char boundary: `name` is a prefix of `rest`.
                    out.push_str(&format!("{tag}{name}_total{}", &rest[name.len()..]));
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The `errno` label of an I/O error: the errno's name, or "EIO" for an error that did
/// not come from the kernel.
pub fn errno_name(error: &std::io::Error) -> String {
    match error.raw_os_error() {
        Some(code) => format!("{:?}", nix::errno::Errno::from_raw(code)),
        None => "EIO".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_with_total_in_the_prometheus_format() {
        let metrics = Metrics::new();
        let target = "10.0.0.1:80".parse().unwrap();
        drop(metrics.open("outbound", target, "http1", None));
        let text = metrics.encode();
        assert!(text.contains("# TYPE tcp_open_total counter\n"), "{text}");
        assert!(
            text.contains("# HELP tcp_open_total Connections forwarded.\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE tcp_open_connections gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE detect_duration_seconds histogram\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        let labels =
            r#"{direction="outbound",target_addr="10.0.0.1:80",protocol="http1",tls="false"}"#;
        assert!(
            text.contains(&format!("tcp_open_total{labels} 1\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("tcp_open_connections{labels} 0\n")),
            "{text}"
        );
        // Dropped without a verdict: the connection was cut short.
        let closed = r#"{direction="outbound",target_addr="10.0.0.1:80",protocol="http1",tls="false",errno="ECANCELED"}"#;
        assert!(
            text.contains(&format!("tcp_close_total{closed} 1\n")),
            "{text}"
        );
    }

    /// The distinct `target_addr` values of a scrape.
    fn target_addrs(text: &str) -> std::collections::BTreeSet<String> {
        text.lines()
            .filter_map(|line| {
                let rest = line.split("target_addr=\"").nth(1)?;
                Some(rest.split('"').next()?.to_string())
            })
            .collect()
    }

    fn addr(n: usize) -> std::net::SocketAddr {
        let n = u32::try_from(n).unwrap();
        std::net::SocketAddr::from(([198, 18, (n >> 16) as u8, (n >> 8) as u8], n as u16))
    }

    #[tokio::test(start_paused = true)]
    async fn a_port_scan_is_capped_and_the_rest_is_counted_as_overflow() {
        let metrics = Metrics::new();
        let scanned = MAX_CONN_LABEL_SETS + 500;
        for n in 0..scanned {
            let mut conn = metrics.open("inbound", addr(n), "opaque", None);
            conn.set_errno(Some("ECONNREFUSED".into()));
        }
        let text = metrics.encode();
        let targets = target_addrs(&text);
        // The cap, plus the one overflow value.
        assert_eq!(targets.len(), MAX_CONN_LABEL_SETS + 1, "{}", text.len());
        assert!(targets.contains(OVERFLOW));
        let overflow =
            r#"{direction="inbound",target_addr="overflow",protocol="opaque",tls="false"}"#;
        assert!(
            text.contains(&format!("tcp_open_total{overflow} 500\n")),
            "overflow not counted"
        );
        let closed = r#"{direction="inbound",target_addr="overflow",protocol="opaque",tls="false",errno="ECONNREFUSED"}"#;
        assert!(text.contains(&format!("tcp_close_total{closed} 500\n")));
        // Every connection is counted once, capped or not.
        let opened: f64 = text
            .lines()
            .filter(|l| l.starts_with("tcp_open_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(opened, scanned as f64);
        assert!(text.len() < 2 << 20, "{} bytes", text.len());
    }

    #[tokio::test(start_paused = true)]
    async fn close_label_sets_are_capped_too() {
        let metrics = Metrics::new();
        // 1,500 destinations failing in 4 different ways: 6,000 close label sets wanted.
        for n in 0..1500 {
            for errno in ["ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "EHOSTUNREACH"] {
                let mut conn = metrics.open("outbound", addr(n), "http1", None);
                conn.set_errno(Some(errno.into()));
            }
        }
        let text = metrics.encode();
        let closes = text
            .lines()
            .filter(|l| l.starts_with("tcp_close_total{"))
            .count();
        assert!(
            closes <= MAX_CLOSE_LABEL_SETS + 4,
            "{closes} close label sets"
        );
        let overflow = r#"tcp_close_total{direction="outbound",target_addr="overflow",protocol="http1",tls="false",errno="EHOSTUNREACH"}"#;
        assert!(text.contains(overflow), "overflowing closes are counted");
        let total: f64 = text
            .lines()
            .filter(|l| l.starts_with("tcp_close_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(total, 6000.0);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_label_sets_are_dropped_but_never_one_with_an_open_connection() {
        let metrics = Metrics::new();
        let (idle, busy) = (addr(1), addr(2));
        drop(metrics.open("outbound", idle, "opaque", None));
        let open = metrics.open("outbound", busy, "opaque", None);
        open.counters().read.inc_by(7);

        // Just under the default 10 minutes: both kept.
        tokio::time::advance(Duration::from_secs(599)).await;
        let text = metrics.encode();
        assert!(target_addrs(&text).contains(&idle.to_string()), "{text}");
        tokio::time::advance(Duration::from_secs(2)).await;
        let text = metrics.encode();
        let targets = target_addrs(&text);
        assert!(
            !targets.contains(&idle.to_string()),
            "idle label set kept:\n{text}"
        );
        // Open for 10 minutes without a byte: still there, still counting.
        assert!(targets.contains(&busy.to_string()), "{text}");
        let busy_labels = format!(
            r#"{{direction="outbound",target_addr="{busy}",protocol="opaque",tls="false"}}"#
        );
        assert!(
            text.contains(&format!("tcp_open_connections{busy_labels} 1\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("tcp_read_bytes_total{busy_labels} 7\n")),
            "{text}"
        );

        // Once closed, it goes after its own idle period, close counter included.
        tokio::time::advance(Duration::from_secs(3600)).await;
        drop(open);
        let text = metrics.encode();
        assert!(
            text.contains(&format!("tcp_open_connections{busy_labels} 0\n")),
            "{text}"
        );
        tokio::time::advance(Duration::from_secs(601)).await;
        let text = metrics.encode();
        assert!(target_addrs(&text).is_empty(), "{text}");

        // A destination that comes back starts again from zero (a counter reset).
        drop(metrics.open("outbound", idle, "opaque", None));
        let idle_labels = format!(
            r#"{{direction="outbound",target_addr="{idle}",protocol="opaque",tls="false"}}"#
        );
        assert!(metrics
            .encode()
            .contains(&format!("tcp_open_total{idle_labels} 1\n")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_makes_room_by_dropping_idle_label_sets() {
        let metrics = Metrics::with_retain_idle(Duration::from_secs(60));
        for n in 0..MAX_CONN_LABEL_SETS {
            drop(metrics.open("inbound", addr(n), "opaque", None));
        }
        tokio::time::advance(Duration::from_secs(61)).await;
        // No scrape in between: the full table sweeps itself for the new destination.
        let new = addr(MAX_CONN_LABEL_SETS + 1);
        drop(metrics.open("inbound", new, "opaque", None));
        let text = metrics.encode();
        assert_eq!(
            target_addrs(&text).into_iter().collect::<Vec<_>>(),
            [new.to_string()]
        );
    }

    #[test]
    fn errno_names() {
        let refused = std::io::Error::from_raw_os_error(nix::libc::ECONNREFUSED);
        assert_eq!(errno_name(&refused), "ECONNREFUSED");
        assert_eq!(errno_name(&std::io::Error::other("no errno")), "EIO");
    }
}
