//! What the proxy reads from and removes in headers: the hop-by-hop headers of RFC 9110
//! §7.6.1, upgrades, the authority label and gRPC statuses. Pure functions over
//! header maps.
//!
//! Hop-by-hop headers describe one connection, not the message, so a proxy must not
//! forward them: `Connection` and every header it names, `Keep-Alive`,
//! `Proxy-Connection`, `TE` (except `trailers`, which gRPC needs and which says
//! something about the whole path), `Transfer-Encoding` (hyper frames the body again
//! for the next hop), and `Upgrade` unless the request is an upgrade that the proxy
//! carries through. Everything else, including `Host`, passes unchanged.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};

/// Whether `name` is hop-by-hop whatever `Connection` says.
fn is_fixed_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Removes the hop-by-hop headers of one message. With `upgrade`, the request (or
/// its 101 response) is an upgrade the proxy carries through: `Upgrade` is kept and
/// `Connection` is set to `upgrade` alone, which is what asks the next hop for it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Headers named by `Connection` (a comma-separated token list, possibly in
    // several field lines).
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect();
    for name in &named {
        if upgrade && name == header::UPGRADE {
            continue;
        }
        // `TE: trailers` is handled below; `Connection: TE` names it as hop-by-hop
        // (as RFC 9110 asks senders of TE to do), which does not make
        // `trailers` less needed by the server.
        if name == header::TE {
            continue;
        }
        headers.remove(name);
    }
    let fixed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_fixed_hop(name) && !(upgrade && *name == header::UPGRADE))
        .cloned()
        .collect();
    for name in fixed {
        headers.remove(name);
    }
    strip_te(headers);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether a message says `Connection: close`.
pub fn asks_close(headers: &HeaderMap) -> bool {
    connection_tokens(headers).any(|token| token.eq_ignore_ascii_case("close"))
}

/// The tokens of the `Connection` header, trimmed.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
}

/// `TE` keeps only `trailers`: the other transfer codings were offered to us, not to
/// the next hop.
fn strip_te(headers: &mut HeaderMap) {
    if !headers.contains_key(header::TE) {
        return;
    }
    let trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|coding| {
            coding
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("trailers")
        });
    headers.remove(header::TE);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// How a request asks to leave HTTP: an `Upgrade` (HTTP/1.1) or a `CONNECT` tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// `Connection: upgrade` with an `Upgrade` header: switched by a 101.
    Protocol,
    /// `CONNECT`: a tunnel once the server answers 2xx.
    Connect,
}

impl Upgrade {
    /// Whether the request asks for an upgrade or a tunnel.
    pub fn of<B>(request: &Request<B>) -> Option<Upgrade> {
        if request.method() == Method::CONNECT {
            return Some(Upgrade::Connect);
        }
        let headers = request.headers();
        let asks = connection_tokens(headers).any(|token| token.eq_ignore_ascii_case("upgrade"));
        (asks && headers.contains_key(header::UPGRADE)).then_some(Upgrade::Protocol)
    }

    /// Whether `response` accepts it: the connection continues as opaque bytes.
    pub fn accepted<B>(self, response: &Response<B>) -> bool {
        match self {
            Upgrade::Protocol => response.status() == StatusCode::SWITCHING_PROTOCOLS,
            Upgrade::Connect => response.status().is_success(),
        }
    }
}

/// The `authority` label of an outbound request: the URI's authority (absolute-form
/// HTTP/1 targets and HTTP/2's `:authority`), else the `Host` header; empty without
/// either, and [`INVALID_AUTHORITY`] when it is not one.
///
/// The label is whatever a client writes, and the text format does not escape label
/// values: a `"` or `\` in a `Host` header would break every later scrape. So only a
/// host name or address with an optional port (at most [`MAX_AUTHORITY`] bytes) is
/// used as is.
pub fn authority_of(request: &Parts) -> &str {
    let authority = match request.uri.authority() {
        Some(authority) => authority.as_str(),
        None => request
            .headers
            .get(header::HOST)
            .map_or(Some(""), |host| host.to_str().ok())
            .unwrap_or(INVALID_AUTHORITY),
    };
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-._:[]%".contains(&b);
    if authority.len() <= MAX_AUTHORITY && authority.bytes().all(allowed) {
        authority
    } else {
        INVALID_AUTHORITY
    }
}

/// The `authority` label of a request whose authority is not a host and port.
pub const INVALID_AUTHORITY: &str = "invalid";

/// The longest `authority` label: a DNS name (253) and a port.
pub const MAX_AUTHORITY: usize = 253 + 6;

/// Whether a message is gRPC (`content-type: application/grpc` or `application/grpc+…`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value.strip_prefix("application/grpc").is_some_and(|rest| {
                rest.is_empty() || rest.starts_with('+') || rest.starts_with(';')
            })
        })
}

/// The highest status gRPC defines (16, UNAUTHENTICATED).
const MAX_GRPC_STATUS: u32 = 16;

/// gRPC's UNKNOWN.
const GRPC_UNKNOWN: u32 = 2;

/// The `grpc-status` of a header or trailer map, if it has a valid one. A number gRPC
/// does not define is UNKNOWN (2), which is how gRPC clients read it (grpc-java's
/// `Status.fromCodeValue`): the `grpc_status` label keeps to 17 values whatever a
/// hostile server sends.
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u32>().ok())
        .map(|code| {
            if code > MAX_GRPC_STATUS {
                GRPC_UNKNOWN
            } else {
                code
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut headers = map(&[
            ("host", "example.com"),
            ("connection", "keep-alive, X-Hop"),
            ("connection", "close"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("te", "gzip, trailers;q=0.5"),
            ("x-end-to-end", "kept"),
        ]);
        strip_hop_by_hop(&mut headers, false);
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["host", "te", "x-end-to-end"]);
        assert_eq!(headers["te"], "trailers");
    }

    #[test]
    fn te_without_trailers_is_removed() {
        let mut headers = map(&[("te", "gzip, deflate")]);
        strip_hop_by_hop(&mut headers, false);
        assert!(headers.is_empty());
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_asks_for_it_again() {
        let mut headers = map(&[
            ("connection", "Upgrade, x-hop"),
            ("upgrade", "websocket"),
            ("x-hop", "1"),
            ("sec-websocket-key", "abc"),
        ]);
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers["upgrade"], "websocket");
        assert_eq!(headers["connection"], "upgrade");
        assert!(!headers.contains_key("x-hop"));
        assert_eq!(headers["sec-websocket-key"], "abc");
    }

    #[test]
    fn upgrades_and_tunnels_are_recognised() {
        let ws = Request::get("/")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert_eq!(Upgrade::of(&ws), Some(Upgrade::Protocol));
        let connect = Request::connect("example.com:443").body(()).unwrap();
        assert_eq!(Upgrade::of(&connect), Some(Upgrade::Connect));
        let plain = Request::get("/").header("upgrade", "h2c").body(()).unwrap();
        assert_eq!(Upgrade::of(&plain), None);
    }

    #[test]
    fn grpc_content_types_and_statuses() {
        assert!(is_grpc(&map(&[("content-type", "application/grpc")])));
        assert!(is_grpc(&map(&[("content-type", "application/grpc+proto")])));
        assert!(!is_grpc(&map(&[("content-type", "application/grpcx")])));
        assert!(!is_grpc(&map(&[("content-type", "text/html")])));
        assert_eq!(grpc_status(&map(&[("grpc-status", "5")])), Some(5));
        assert_eq!(grpc_status(&map(&[("grpc-status", "x")])), None);
        assert_eq!(grpc_status(&map(&[("grpc-status", "16")])), Some(16));
        // Codes gRPC does not define are UNKNOWN: a hostile server cannot invent labels.
        assert_eq!(grpc_status(&map(&[("grpc-status", "17")])), Some(2));
        assert_eq!(grpc_status(&map(&[("grpc-status", "4294967295")])), Some(2));
    }

    #[test]
    fn authority_from_the_uri_then_host() {
        let absolute = Request::get("http://a.example:8080/x")
            .header("host", "b.example")
            .body(())
            .unwrap();
        assert_eq!(authority_of(&absolute.into_parts().0), "a.example:8080");
        let origin = Request::get("/x")
            .header("host", "b.example")
            .body(())
            .unwrap();
        assert_eq!(authority_of(&origin.into_parts().0), "b.example");
        let none = Request::get("/").body(()).unwrap();
        assert_eq!(authority_of(&none.into_parts().0), "");
        let v6 = Request::get("/")
            .header("host", "[fd00::1]:8080")
            .body(())
            .unwrap();
        assert_eq!(authority_of(&v6.into_parts().0), "[fd00::1]:8080");
        // What would break the text format, or bloat it, is not a label value.
        for bad in ["a\"b", "a\\b", "a b", "user@host"] {
            let request = Request::get("/").header("host", bad).body(()).unwrap();
            assert_eq!(
                authority_of(&request.into_parts().0),
                INVALID_AUTHORITY,
                "{bad}"
            );
        }
        let long = "a".repeat(MAX_AUTHORITY + 1);
        let request = Request::get("/").header("host", &long).body(()).unwrap();
        assert_eq!(authority_of(&request.into_parts().0), INVALID_AUTHORITY);
    }
}
