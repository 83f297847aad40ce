//! How a connection ended, and the one place that records it.
//!
//! Every hop (`forward`, `inbound`, `outbound`) returns an [`Outcome`]: the byte totals
//! of a connection copied to its end, or a [`HopError`] saying why it stopped. [`record`]
//! turns that into the connection's `errno` label (`tcp_close_total`), the refusal and
//! handshake-failure counters, and one log line. Keeping this in one function is what
//! lets a reader check that every way a connection ends is counted once, and counted
//! the same way whichever hop it took.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tracing::{debug, info};

use crate::duplex::{DuplexError, Totals};
use crate::metrics::{errno_name, ConnMetrics, Label, Metrics};
use crate::route::Direction;
use crate::tls::HandshakeFailure;
use crate::transport_header::HeaderError;

/// Why a connection was closed before being forwarded: the `reason` label of
/// `tcp_refused_total`.
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
    /// A service of `--discovery` whose backends all have weight zero.
    NoBackend,
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
            Refused::NoBackend => "no_backend",
        }
    }
}

impl Label for Refused {
    fn label(&self) -> &'static str {
        self.as_str()
    }
}

/// How one hop ended: the bytes copied until both sides were done, or why it stopped.
pub(crate) type Outcome = Result<Totals, HopError>;

/// The `errno` label of a connection that ended in a failed handshake: not a kernel
/// error, so the closest errno names it.
const ERRNO_HANDSHAKE: &str = "EPROTO";
const ERRNO_TIMEOUT: &str = "ETIMEDOUT";

/// Why a connection stopped before copying to its end. Each variant says what it
/// counts (see [`record`]); the message is the log line.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HopError {
    /// Too many connections waiting for their first bytes (`--max-detecting`).
    #[error("too many connections in protocol detection (or without a ClientHello), closing")]
    MaxDetecting,
    #[error("refusing a client without a mesh identity on a port that requires one")]
    IdentityRequired,
    #[error("every backend of service {service} has weight 0, refusing the connection")]
    NoBackend { service: String },
    /// Reading the first bytes failed (counted as `detect_results_total{result="error"}`).
    #[error("client failed during protocol detection: {0}")]
    Detect(io::Error),
    /// Health checks and port scans do this; counted by detection, not an error.
    #[error("client closed before sending anything")]
    ClientClosed,
    /// A peer proxy's direct connection that never said hello. Logged at debug only,
    /// since a flood of these is what the detection budget is for.
    #[error("closing a direct connection that sent no ClientHello within the handshake timeout ({timeout:?})")]
    NoClientHello { timeout: Duration },
    /// Our mTLS handshake (or transport header) to a peer proxy failed.
    #[error("mTLS to the peer proxy {peer_id} at {peer:?} failed: {}", reason.as_str())]
    PeerHandshake {
        reason: HandshakeFailure,
        peer: Option<SocketAddr>,
        peer_id: String,
    },
    /// A client's mTLS handshake with us failed.
    #[error("refused an mTLS client: {}", reason.as_str())]
    ClientHandshake { reason: HandshakeFailure },
    #[error("refused an mTLS client {client_id:?} whose transport header is invalid: {error}")]
    BadHeader {
        client_id: String,
        error: HeaderError,
    },
    /// Forwarding there would loop back into us.
    #[error("refused an mTLS client {client_id:?} whose transport header names port {port} of the proxy itself")]
    HeaderSelfLoop { client_id: String, port: u16 },
    #[error("cannot connect to the {what} {addr}: {error}")]
    Connect {
        /// `destination`, `peer proxy` or `application`.
        what: &'static str,
        addr: SocketAddr,
        error: io::Error,
    },
    /// Every attempt on a balanced service's endpoints failed (or it had none).
    #[error("no endpoint of {service}/{backend} could be reached (last error {last_error:?})")]
    Unreachable {
        service: String,
        backend: String,
        last_error: Option<String>,
    },
    /// The copy loop failed after the connection was established.
    #[error("connection failed: {0}")]
    Copy(#[from] DuplexError),
    /// An HTTP client connection failed (reset, header read timeout, a later request
    /// that does not parse, ...). Errors of single requests are answered and counted
    /// by `http`, not here.
    #[error("HTTP connection failed: {0}")]
    Http(#[from] hyper::Error),
    /// A mesh hop was decided without an identity configured: unreachable, since both
    /// decisions (`route`, `hop`) only pick mesh hops with one.
    #[error("mTLS hop without an identity configured")]
    NoIdentity,
}

impl HopError {
    /// The `tcp_refused_total` reason this counts as, if any.
    fn refused(&self) -> Option<Refused> {
        match self {
            HopError::MaxDetecting => Some(Refused::MaxDetecting),
            HopError::IdentityRequired => Some(Refused::IdentityRequired),
            HopError::NoBackend { .. } => Some(Refused::NoBackend),
            HopError::HeaderSelfLoop { .. } => Some(Refused::SelfLoop),
            _ => None,
        }
    }

    /// The `tls_handshake_failures_total` reason this counts as, if any.
    fn handshake_failure(&self) -> Option<HandshakeFailure> {
        match self {
            HopError::NoClientHello { .. } => Some(HandshakeFailure::Timeout),
            HopError::PeerHandshake { reason, .. } | HopError::ClientHandshake { reason } => {
                Some(*reason)
            }
            HopError::BadHeader { .. } | HopError::HeaderSelfLoop { .. } => {
                Some(HandshakeFailure::Other)
            }
            _ => None,
        }
    }

    /// The `errno` label of the close, for the errors that end a connection already
    /// counted as open.
    fn errno(&self) -> String {
        match self {
            HopError::Connect { error, .. } => errno_name(error),
            HopError::Copy(error) => errno_name(&error.source),
            // A header read timeout, an I/O error's errno, else a protocol error.
            HopError::Http(error) if error.is_timeout() => ERRNO_TIMEOUT.to_string(),
            HopError::Http(error) => std::error::Error::source(error)
                .and_then(|source| source.downcast_ref::<io::Error>())
                .map_or_else(|| ERRNO_HANDSHAKE.to_string(), errno_name),
            HopError::PeerHandshake {
                reason: HandshakeFailure::Timeout,
                ..
            } => ERRNO_TIMEOUT.to_string(),
            HopError::PeerHandshake { .. } => ERRNO_HANDSHAKE.to_string(),
            HopError::Unreachable { last_error, .. } => last_error
                .clone()
                .unwrap_or_else(|| "EHOSTUNREACH".to_string()),
            // None of these happens once a connection is counted as open; if one did,
            // it was cut short.
            _ => "ECANCELED".to_string(),
        }
    }

    /// Whether the log line is worth INFO: failures an operator should see. Detection
    /// outcomes, the detection budget and copy errors (a reset peer) are DEBUG, as a
    /// flood of them is ordinary.
    fn is_notable(&self) -> bool {
        !matches!(
            self,
            HopError::MaxDetecting
                | HopError::Detect(_)
                | HopError::ClientClosed
                | HopError::NoClientHello { .. }
                | HopError::Copy(_)
                | HopError::Http(_)
                | HopError::NoIdentity
        )
    }
}

/// Records how a connection ended: `conn` (when it was counted as open) closes with the
/// outcome's `errno` (empty when clean), refusals and handshake failures are counted,
/// and one line is logged.
pub(crate) fn record(
    metrics: &Metrics,
    direction: Direction,
    client: Option<SocketAddr>,
    target: SocketAddr,
    conn: Option<ConnMetrics>,
    outcome: Outcome,
) {
    let error = match outcome {
        Ok(totals) => {
            if let Some(mut conn) = conn {
                conn.set_errno(None);
            }
            debug!(
                direction = direction.as_str(),
                ?client,
                %target,
                sent = totals.client_to_target,
                received = totals.target_to_client,
                spliced = totals.spliced,
                "connection closed"
            );
            return;
        }
        Err(error) => error,
    };
    if let Some(reason) = error.refused() {
        metrics.refused(direction, reason);
    }
    if let Some(reason) = error.handshake_failure() {
        metrics.handshake_failed(direction, reason);
    }
    if let Some(mut conn) = conn {
        conn.set_errno(Some(error.errno()));
    }
    if error.is_notable() {
        info!(direction = direction.as_str(), ?client, %target, "{error}");
    } else {
        debug!(direction = direction.as_str(), ?client, %target, "{error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records `error` for an outbound connection to `198.18.0.9:80` (counted as open
    /// when `opened`), and returns the scrape.
    fn recorded(direction: Direction, opened: bool, error: HopError) -> String {
        let metrics = Metrics::new();
        let target: SocketAddr = "198.18.0.9:80".parse().unwrap();
        let conn = opened.then(|| metrics.open(direction, target, "opaque", None));
        record(&metrics, direction, None, target, conn, Err(error));
        metrics.encode()
    }

    fn closed_with(direction: &str, errno: &str) -> String {
        format!(
            r#"tcp_close_total{{direction="{direction}",target_addr="198.18.0.9:80",protocol="opaque",tls="false",errno="{errno}"}} 1"#
        )
    }

    #[test]
    fn each_ending_is_counted_where_it_was_before() {
        use Direction::{Inbound, Outbound};
        let peer_handshake = |reason| HopError::PeerHandshake {
            reason,
            peer: None,
            peer_id: "api.ns".to_string(),
        };
        let text = recorded(Outbound, true, peer_handshake(HandshakeFailure::Timeout));
        assert!(
            text.contains(&closed_with("outbound", "ETIMEDOUT")),
            "{text}"
        );
        assert!(
            text.contains(
                r#"tls_handshake_failures_total{direction="outbound",reason="timeout"} 1"#
            ),
            "{text}"
        );
        let text = recorded(Outbound, true, peer_handshake(HandshakeFailure::Untrusted));
        assert!(text.contains(&closed_with("outbound", "EPROTO")), "{text}");

        let refused = io::Error::from_raw_os_error(nix::libc::ECONNREFUSED);
        let connect = HopError::Connect {
            what: "destination",
            addr: "198.18.0.9:80".parse().unwrap(),
            error: refused,
        };
        let text = recorded(Outbound, true, connect);
        assert!(
            text.contains(&closed_with("outbound", "ECONNREFUSED")),
            "{text}"
        );
        assert!(!text.contains("tcp_refused_total{"), "{text}");

        let unreachable = HopError::Unreachable {
            service: "web".to_string(),
            backend: "v1".to_string(),
            last_error: None,
        };
        let text = recorded(Outbound, true, unreachable);
        assert!(
            text.contains(&closed_with("outbound", "EHOSTUNREACH")),
            "{text}"
        );

        // A transport header naming our own port: a refusal and a failed handshake,
        // and no connection.
        let self_loop = HopError::HeaderSelfLoop {
            client_id: "api.ns".to_string(),
            port: 4143,
        };
        let text = recorded(Inbound, false, self_loop);
        assert!(
            text.contains(r#"tcp_refused_total{direction="inbound",reason="self_loop"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tls_handshake_failures_total{direction="inbound",reason="other"} 1"#),
            "{text}"
        );
        assert!(!text.contains("tcp_close_total{"), "{text}");

        let text = recorded(Inbound, false, HopError::IdentityRequired);
        assert!(
            text.contains(r#"tcp_refused_total{direction="inbound",reason="identity_required"} 1"#),
            "{text}"
        );
        let text = recorded(Outbound, false, HopError::MaxDetecting);
        assert!(
            text.contains(r#"tcp_refused_total{direction="outbound",reason="max_detecting"} 1"#),
            "{text}"
        );
        // Ended during detection: counted by detection alone.
        let text = recorded(Inbound, false, HopError::ClientClosed);
        assert!(!text.contains("tcp_refused_total{"), "{text}");
        assert!(!text.contains("tls_handshake_failures_total{"), "{text}");
    }

    #[test]
    fn a_clean_close_has_an_empty_errno() {
        let metrics = Metrics::new();
        let target: SocketAddr = "198.18.0.9:80".parse().unwrap();
        let conn = metrics.open(Direction::Outbound, target, "opaque", None);
        record(
            &metrics,
            Direction::Outbound,
            None,
            target,
            Some(conn),
            Ok(Totals::default()),
        );
        let text = metrics.encode();
        assert!(text.contains(&closed_with("outbound", "")), "{text}");
    }
}
