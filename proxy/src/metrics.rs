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
//! `tls_handshake_failures_total{direction,reason}` counts failed mTLS handshakes:
//! `reason` is `no_client_cert`, `untrusted` (no chain to the trust anchors),
//! `wrong_identity` (a trusted certificate for another identity), `bad_alpn`,
//! `timeout` or `other` (including a malformed transport header).

use std::fmt;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::detect::{Detected, Protocol};
use crate::duplex::Counters;
use crate::tls::HandshakeFailure;

/// Which listener accepted a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From outside the pod to an application in it (port 4143).
    Inbound,
    /// From an application in the pod to anywhere (port 4140).
    Outbound,
}

impl Direction {
    /// The `direction` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct ConnLabels {
    direction: &'static str,
    target_addr: String,
    protocol: &'static str,
    tls: &'static str,
    /// On mTLS hops, the peer's identity: `client_id` inbound, `server_id` outbound.
    peer_id: Option<(&'static str, String)>,
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
        Ok(())
    }
}

impl EncodeLabelSet for ConnLabels {
    fn encode(&self, mut encoder: LabelSetEncoder<'_>) -> fmt::Result {
        self.encode_into(&mut encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct CloseLabels {
    conn: ConnLabels,
    errno: String,
}

impl EncodeLabelSet for CloseLabels {
    fn encode(&self, mut encoder: LabelSetEncoder<'_>) -> fmt::Result {
        self.conn.encode_into(&mut encoder)?;
        ("errno", self.errno.as_str()).encode(encoder.encode_label())
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

/// Why a connection was closed before being forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refused {
    MaxConnections,
    MaxDetecting,
    NoOriginalDst,
    /// A plaintext client on a `--require-identity-ports` port.
    IdentityRequired,
    /// Trust boundary (`route`): an inbound original destination on loopback,
    LoopbackDestination,
    /// the unspecified address,
    UnspecifiedDestination,
    /// a multicast or broadcast address,
    MulticastDestination,
    /// or an address that is not one of the namespace's own;
    ForeignDestination,
    /// an original destination that is one of the proxy's own listeners.
    SelfLoop,
}

impl Refused {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Refused::MaxConnections => "max_connections",
            Refused::MaxDetecting => "max_detecting",
            Refused::NoOriginalDst => "no_original_dst",
            Refused::IdentityRequired => "identity_required",
            Refused::LoopbackDestination => "loopback_destination",
            Refused::UnspecifiedDestination => "unspecified_destination",
            Refused::MulticastDestination => "multicast_destination",
            Refused::ForeignDestination => "foreign_destination",
            Refused::SelfLoop => "self_loop",
        }
    }
}

/// All metrics of one proxy, and the registry that exposes them.
pub struct Metrics {
    registry: Registry,
    tcp_open: Family<ConnLabels, Counter>,
    tcp_close: Family<CloseLabels, Counter>,
    tcp_open_connections: Family<ConnLabels, Gauge>,
    tcp_read_bytes: Family<ConnLabels, Counter>,
    tcp_write_bytes: Family<ConnLabels, Counter>,
    detect_results: Family<ResultLabels, Counter>,
    detect_duration: Histogram,
    refused: Family<RefusedLabels, Counter>,
    handshake_failures: Family<HandshakeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let tcp_open = Family::default();
        let tcp_close = Family::default();
        let tcp_open_connections = Family::default();
        let tcp_read_bytes = Family::default();
        let tcp_write_bytes = Family::default();
        let detect_results = Family::default();
        // 1 ms to 16 s: covers a fast client and the default 10 s timeout.
        let detect_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let refused = Family::default();
        let handshake_failures = Family::default();
        // prometheus-client appends `_total` to counters: `tcp_open` is exposed as
        // `tcp_open_total`.
        registry.register("tcp_open", "Connections forwarded", tcp_open.clone());
        registry.register(
            "tcp_close",
            "Forwarded connections closed",
            tcp_close.clone(),
        );
        registry.register(
            "tcp_open_connections",
            "Forwarded connections currently open",
            tcp_open_connections.clone(),
        );
        registry.register(
            "tcp_read_bytes",
            "Bytes read from the client",
            tcp_read_bytes.clone(),
        );
        registry.register(
            "tcp_write_bytes",
            "Bytes written to the client",
            tcp_write_bytes.clone(),
        );
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
            tcp_open,
            tcp_close,
            tcp_open_connections,
            tcp_read_bytes,
            tcp_write_bytes,
            detect_results,
            detect_duration,
            refused,
            handshake_failures,
        }
    }

    /// Every metric in the Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut openmetrics = String::new();
        encode(&mut openmetrics, &self.registry).expect("writing to a String cannot fail");
        openmetrics_to_prometheus(&openmetrics)
    }

    /// Records a detection outcome and how long it took.
    pub fn detected(&self, detected: &Detected, took: Duration) {
        self.detect_results
            .get_or_create(&ResultLabels {
                result: detected.result_label(),
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
    pub fn refused(&self, direction: Direction, reason: Refused) {
        self.refused
            .get_or_create(&RefusedLabels {
                direction: direction.as_str(),
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Records a failed mTLS handshake (or transport header) and why.
    pub fn handshake_failed(&self, direction: Direction, reason: HandshakeFailure) {
        self.handshake_failures
            .get_or_create(&HandshakeLabels {
                direction: direction.as_str(),
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Counts a connection as open and returns its counters. Dropping the result counts
    /// it as closed. `peer_id` is the peer's identity when the hop is our mTLS: the
    /// client's for inbound connections, the server's for outbound ones.
    pub fn open(
        &self,
        direction: Direction,
        target: std::net::SocketAddr,
        protocol: Protocol,
        peer_id: Option<&str>,
    ) -> ConnMetrics {
        let labels = ConnLabels {
            direction: direction.as_str(),
            target_addr: target.to_string(),
            protocol: protocol.as_str(),
            tls: if peer_id.is_some() { "true" } else { "false" },
            peer_id: peer_id.map(|id| {
                let key = match direction {
                    Direction::Inbound => "client_id",
                    Direction::Outbound => "server_id",
                };
                (key, id.to_string())
            }),
        };
        self.tcp_open.get_or_create(&labels).inc();
        let open = self.tcp_open_connections.get_or_create(&labels).clone();
        open.inc();
        ConnMetrics {
            counters: Counters {
                read: self.tcp_read_bytes.get_or_create(&labels).clone(),
                written: self.tcp_write_bytes.get_or_create(&labels).clone(),
            },
            open,
            close: self.tcp_close.clone(),
            labels,
            // Until `set_errno` says otherwise, a connection dropped midway (shutdown
            // grace expired) was cancelled.
            errno: Some("ECANCELED".to_string()),
        }
    }
}

/// The metrics of one open connection. Records the close when dropped.
pub struct ConnMetrics {
    counters: Counters,
    open: Gauge,
    close: Family<CloseLabels, Counter>,
    labels: ConnLabels,
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
        self.open.dec();
        let labels = CloseLabels {
            conn: self.labels.clone(),
            errno: self.errno.take().unwrap_or_default(),
        };
        self.close.get_or_create(&labels).inc();
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
        drop(metrics.open(Direction::Outbound, target, Protocol::Http1, None));
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

    #[test]
    fn errno_names() {
        let refused = std::io::Error::from_raw_os_error(nix::libc::ECONNREFUSED);
        assert_eq!(errno_name(&refused), "ECONNREFUSED");
        assert_eq!(errno_name(&std::io::Error::other("no errno")), "EIO");
    }
}
