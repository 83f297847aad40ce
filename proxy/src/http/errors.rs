//! The errors the proxy answers itself, instead of the destination: each is a status
//! and a `meshproxy-error` response header naming the cause, so that an operator can
//! tell the proxy's 502 from the application's.
//!
//! | cause | status | `meshproxy-error` |
//! |---|---|---|
//! | the destination refused the connection | 502 | `connection refused` |
//! | no route to the destination | 502 | `unreachable` |
//! | any other connect error | 502 | `connect failed` |
//! | no connection within `--connect-timeout` | 504 | `connect timeout` |
//! | the destination closed or reset before answering | 502 | `upstream closed` |
//! | the destination answered something that is not HTTP | 502 | `upstream protocol error` |
//! | every backend of the `--discovery` service has weight 0 | 503 | `no backend` |
//! | the client's request does not parse | 400 | `bad request` |
//! | the client's request head is larger than 64 KiB | 431 | `request header too large` |
//! | the mTLS handshake with a mesh peer's proxy failed (wrong identity, untrusted, ...) | 502 | `peer handshake failed` |
//! | a mesh peer, but no identity configured (a guard: `hop` decides no such hop) | 502 | `no identity` |

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use super::head::BadHead;
use crate::tls::HandshakeFailure;

/// The response header that marks a response as the proxy's own.
pub const HEADER: &str = "meshproxy-error";

/// Why the proxy answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{addr} refused the connection")]
    Refused { addr: SocketAddr },
    #[error("{addr} is unreachable: {source}")]
    Unreachable { addr: SocketAddr, source: io::Error },
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("no connection to {addr} within {timeout:?} (--connect-timeout)")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("{addr} closed the connection before answering: {source}")]
    UpstreamClosed {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("{addr} did not answer in HTTP: {source}")]
    UpstreamProtocol {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("the client's request does not parse: {0}")]
    BadRequest(BadHead),
    /// A balanced service (`--discovery`) whose backends all have weight 0.
    #[error("every backend of service {service} has weight 0")]
    NoBackend { service: std::sync::Arc<str> },
    #[error("mTLS handshake with {addr}, expected to be {server_id}, failed: {}", reason.as_str())]
    PeerHandshake {
        /// The peer proxy's address.
        addr: SocketAddr,
        server_id: String,
        reason: HandshakeFailure,
    },
    #[error("{addr} is a mesh peer, but no identity is configured")]
    NoIdentity { addr: SocketAddr },
}

impl ProxyError {
    /// The error of a failed connect to `addr`.
    pub fn connect(addr: SocketAddr, source: io::Error) -> ProxyError {
        use nix::libc;
        match source.raw_os_error() {
            Some(libc::ECONNREFUSED) => ProxyError::Refused { addr },
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN | libc::ENETDOWN) => {
                ProxyError::Unreachable { addr, source }
            }
            _ => ProxyError::Connect { addr, source },
        }
    }

    /// The error of a connect to `addr` given up after `timeout`, which fails with
    /// `ETIMEDOUT` (see `connect`): a 504, any other error as [`ProxyError::connect`].
    pub fn connect_within(addr: SocketAddr, source: io::Error, timeout: Duration) -> ProxyError {
        match source.raw_os_error() {
            Some(nix::libc::ETIMEDOUT) => ProxyError::ConnectTimeout { addr, timeout },
            _ => ProxyError::connect(addr, source),
        }
    }

    /// The error of a request that failed on an open connection to `addr`.
    pub fn upstream(addr: SocketAddr, source: hyper::Error) -> ProxyError {
        if source.is_parse() || source.is_parse_status() || source.is_user() {
            ProxyError::UpstreamProtocol { addr, source }
        } else {
            ProxyError::UpstreamClosed { addr, source }
        }
    }

    /// Whether the connect failed, so that nothing of the request was sent.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            ProxyError::Refused { .. }
                | ProxyError::Unreachable { .. }
                | ProxyError::Connect { .. }
                | ProxyError::ConnectTimeout { .. }
        )
    }

    /// The balanced service a request was for, when the error is that it has no
    /// backend (its metrics carry the service, and an empty backend).
    pub fn service(&self) -> Option<&std::sync::Arc<str>> {
        match self {
            ProxyError::NoBackend { service } => Some(service),
            _ => None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::ConnectTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::NoBackend { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BadRequest(BadHead::TooLarge) => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            ProxyError::BadRequest(BadHead::Malformed(_)) => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// The value of the `meshproxy-error` header.
    pub fn cause(&self) -> &'static str {
        match self {
            ProxyError::Refused { .. } => "connection refused",
            ProxyError::Unreachable { .. } => "unreachable",
            ProxyError::Connect { .. } => "connect failed",
            ProxyError::ConnectTimeout { .. } => "connect timeout",
            ProxyError::UpstreamClosed { .. } => "upstream closed",
            ProxyError::UpstreamProtocol { .. } => "upstream protocol error",
            ProxyError::BadRequest(BadHead::TooLarge) => "request header too large",
            ProxyError::BadRequest(BadHead::Malformed(_)) => "bad request",
            ProxyError::NoBackend { .. } => "no backend",
            ProxyError::PeerHandshake { .. } => "peer handshake failed",
            ProxyError::NoIdentity { .. } => "no identity",
        }
    }

    /// The response the client gets: the status, the header, and the cause as a
    /// one-line text body.
    pub fn response(&self) -> Response<Bytes> {
        let mut response = Response::new(Bytes::from(format!("{}\n", self.cause())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(HEADER, HeaderValue::from_static(self.cause()));
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        response
    }
}

/// [`ProxyError::response`] as HTTP/1.1 bytes, for a client whose request hyper never
/// parsed; the connection is closed after it.
pub fn http1_bytes(error: &ProxyError) -> Vec<u8> {
    let status = error.status();
    let body = format!("{}\n", error.cause());
    format!(
        "HTTP/1.1 {} {}\r\n{HEADER}: {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        error.cause(),
        body.len(),
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_are_named_by_errno() {
        let addr: SocketAddr = "198.18.0.1:80".parse().unwrap();
        let refused =
            ProxyError::connect(addr, io::Error::from_raw_os_error(nix::libc::ECONNREFUSED));
        assert_eq!(
            (refused.status(), refused.cause()),
            (StatusCode::BAD_GATEWAY, "connection refused")
        );
        let unreachable =
            ProxyError::connect(addr, io::Error::from_raw_os_error(nix::libc::EHOSTUNREACH));
        assert_eq!(unreachable.cause(), "unreachable");
        let timeout = ProxyError::ConnectTimeout {
            addr,
            timeout: Duration::from_secs(1),
        };
        let response = timeout.response();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(response.headers()[HEADER], "connect timeout");
    }
}
