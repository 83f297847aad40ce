//! HTTP/1 requests carried as HTTP/2 between meshed proxies, as Linkerd carries them.
//!
//! The outbound proxy sends every request to a mesh peer over one multiplexed HTTP/2
//! connection. An HTTP/1 request is upgraded ([`upgrade_request`]) for the trip: it becomes an HTTP/2
//! request with the same method, path, headers, body and trailers, whose `:authority`
//! is the request's `Host` (an HTTP/2 request needs one), marked with the request header
//! `l5d-orig-proto: HTTP/1.1` (or `HTTP/1.0`; `; absolute-form` is appended when the
//! client sent an absolute-form target, which the application must get back). The
//! inbound proxy, meeting the mark on a request from a peer, [`downgrade`]s it: the
//! mark is removed and the request goes to the application as the HTTP/1 request it
//! was (origin-form target, `Host` as sent). Its response travels back marked
//! `l5d-orig-proto` too ([`mark_response`]), and the outbound proxy removes the mark
//! ([`restore_response`]) before answering the client in HTTP/1.
//!
//! [`carry`] decides, per request, whether either happens.
//!
//! HTTP/2 carries header names in lowercase: a name's case does not survive the trip
//! (field names are case-insensitive; Linkerd behaves the same).

use std::net::SocketAddr;

use http::header::HOST;
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{HeaderMap, HeaderValue, Version};

use super::upstream::Transport;
use super::ClientConn;
use crate::route::Direction;

/// The request (and response) header that marks an HTTP/1 message carried as HTTP/2.
pub const HEADER: &str = "l5d-orig-proto";

const HTTP_10: &str = "HTTP/1.0";
const HTTP_11: &str = "HTTP/1.1";
const ABSOLUTE_FORM: &str = "; absolute-form";

/// How a request travels to its endpoint, when not as the client sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carried {
    /// In the client's version.
    AsIs,
    /// An HTTP/1 request, as HTTP/2 to a mesh peer ([`upgrade_request`]); its response is
    /// answered to the client in this version.
    Upgraded(Version),
    /// An HTTP/1 upgrade (or `CONNECT`) to a mesh peer: it leaves HTTP after its
    /// response, so it cannot share the peer's HTTP/2 connection and takes a dedicated
    /// HTTP/1 one.
    Dedicated,
    /// A peer's HTTP/2 request restored to HTTP/1 for the application ([`downgrade`]);
    /// its response goes back marked ([`mark_response`]).
    Downgraded,
}

impl Carried {
    /// The HTTP version spoken over `transport`, for a client speaking `client`.
    pub fn version(self, transport: &Transport, client: super::Version) -> super::Version {
        match self {
            Carried::AsIs => transport.version_for(client),
            Carried::Upgraded(_) => super::Version::Http2,
            Carried::Dedicated | Carried::Downgraded => super::Version::Http1,
        }
    }
}

/// Decides how the request `parts` of `client` travels over `transport` (`upgrade`: it
/// asks for an upgrade or is a `CONNECT`), and adapts `parts` when it changes version.
pub fn carry(
    client: &ClientConn,
    parts: &mut Parts,
    transport: &Transport,
    upgrade: bool,
) -> Carried {
    match (transport, client.version) {
        (Transport::Mesh { .. }, super::Version::Http1) if upgrade => Carried::Dedicated,
        (Transport::Mesh { .. }, super::Version::Http1) => {
            let version = parts.version;
            upgrade_request(parts, &authority_of(client.target));
            Carried::Upgraded(version)
        }
        // Only from a peer proxy (our mTLS, inbound): a plaintext client's mark means
        // nothing.
        (Transport::Plain, super::Version::Http2)
            if client.direction == Direction::Inbound
                && client.peer_id.is_some()
                && downgrade(parts) =>
        {
            Carried::Downgraded
        }
        _ => Carried::AsIs,
    }
}

/// Undoes what [`carry`] did to `parts` (`carried`), so that a request whose connect
/// failed can be carried to another endpoint, reached another way. `Downgraded` is left
/// as is: only the inbound proxy's requests from a peer are, and they have one endpoint.
pub fn undo(carried: Carried, parts: &mut Parts) {
    match carried {
        Carried::Upgraded(_) => {
            downgrade(parts);
        }
        Carried::AsIs | Carried::Dedicated | Carried::Downgraded => {}
    }
}

/// `target` as an `:authority`.
fn authority_of(target: SocketAddr) -> Authority {
    Authority::try_from(target.to_string().as_str())
        .unwrap_or_else(|_| Authority::from_static("localhost"))
}

/// Turns the HTTP/1 request `parts` into the HTTP/2 request that carries it to a peer.
/// `fallback` is the `:authority` when the request has no usable `Host` (HTTP/1.0):
/// the original destination.
pub fn upgrade_request(parts: &mut Parts, fallback: &Authority) {
    let version = if parts.version == Version::HTTP_10 {
        HTTP_10
    } else {
        HTTP_11
    };
    let absolute = parts.uri.scheme().is_some() && parts.uri.authority().is_some();
    let mark = if absolute {
        HeaderValue::from_str(&format!("{version}{ABSOLUTE_FORM}"))
    } else {
        HeaderValue::from_str(version)
    };
    if let Ok(mark) = mark {
        parts.headers.insert(HEADER, mark);
    }
    if !absolute {
        let authority = parts
            .headers
            .get(HOST)
            .and_then(|host| Authority::try_from(host.as_bytes()).ok())
            .unwrap_or_else(|| fallback.clone());
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(authority);
        uri.path_and_query = Some(path);
        if let Ok(uri) = Uri::from_parts(uri) {
            parts.uri = uri;
        }
    }
    parts.version = Version::HTTP_2;
}

/// Restores the HTTP/1 request a peer's outbound proxy upgraded ([`upgrade_request`]), if `parts` carries
/// the mark: `true` when it did, and the request is to be sent in HTTP/1.
pub fn downgrade(parts: &mut Parts) -> bool {
    let Some(mark) = parts.headers.remove(HEADER) else {
        return false;
    };
    let mark = mark.to_str().unwrap_or_default();
    let (version, absolute) = match mark.strip_suffix(ABSOLUTE_FORM) {
        Some(version) => (version, true),
        None => (mark, false),
    };
    parts.version = if version.trim() == HTTP_10 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    if !absolute {
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::from(path);
    }
    true
}

/// Marks the response to a [`downgrade`]d request with the version the application
/// answered in.
pub fn mark_response(headers: &mut HeaderMap, version: Version) {
    let version = if version == Version::HTTP_10 {
        HTTP_10
    } else {
        HTTP_11
    };
    headers.insert(HEADER, HeaderValue::from_static(version));
}

/// Removes the mark of [`mark_response`] from the response to an upgraded request,
/// which is answered to the client in the client's HTTP/1 version.
pub fn restore_response(headers: &mut HeaderMap) {
    headers.remove(HEADER);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(request: Request<()>) -> Parts {
        request.into_parts().0
    }

    fn fallback() -> Authority {
        Authority::from_static("198.18.0.2:8080")
    }

    #[test]
    fn an_origin_form_request_travels_as_http2_and_comes_back_unchanged() {
        let mut p = parts(
            Request::get("/path?q=1")
                .header("Host", "Shop.Example:8080")
                .header("X-Custom", "v")
                .body(())
                .unwrap(),
        );
        upgrade_request(&mut p, &fallback());
        assert_eq!(p.version, Version::HTTP_2);
        assert_eq!(p.uri, "http://Shop.Example:8080/path?q=1");
        assert_eq!(p.headers[HEADER], "HTTP/1.1");
        assert_eq!(p.headers[HOST], "Shop.Example:8080");

        assert!(downgrade(&mut p));
        assert_eq!(p.version, Version::HTTP_11);
        assert_eq!(p.uri, "/path?q=1");
        assert!(p.uri.authority().is_none());
        assert!(p.headers.get(HEADER).is_none());
        assert_eq!(p.headers[HOST], "Shop.Example:8080");
        assert_eq!(p.headers["x-custom"], "v");
    }

    #[test]
    fn undo_gives_back_the_request_as_the_client_sent_it() {
        let sent = || {
            parts(
                Request::post("/path?q=1")
                    .header("Host", "shop.example")
                    .body(())
                    .unwrap(),
            )
        };
        let mut p = sent();
        upgrade_request(&mut p, &fallback());
        undo(Carried::Upgraded(Version::HTTP_11), &mut p);
        let want = sent();
        assert_eq!(
            (p.version, &p.uri, &p.headers),
            (want.version, &want.uri, &want.headers)
        );
        assert_eq!(p.method, want.method);
    }

    #[test]
    fn http_1_0_without_host_uses_the_destination_as_authority_and_stays_1_0() {
        let mut p = parts(
            Request::get("/")
                .version(Version::HTTP_10)
                .body(())
                .unwrap(),
        );
        upgrade_request(&mut p, &fallback());
        assert_eq!(p.uri, "http://198.18.0.2:8080/");
        assert_eq!(p.headers[HEADER], "HTTP/1.0");
        assert!(downgrade(&mut p));
        assert_eq!(
            (p.version, p.uri.to_string()),
            (Version::HTTP_10, "/".into())
        );
        assert!(p.headers.get(HOST).is_none());
    }

    #[test]
    fn an_absolute_form_request_keeps_its_form() {
        let mut p = parts(
            Request::get("http://example.com/x")
                .header("Host", "example.com")
                .body(())
                .unwrap(),
        );
        upgrade_request(&mut p, &fallback());
        assert_eq!(p.headers[HEADER], "HTTP/1.1; absolute-form");
        assert!(downgrade(&mut p));
        assert_eq!(p.uri, "http://example.com/x");
        assert_eq!(p.version, Version::HTTP_11);
    }

    fn client(direction: Direction, version: super::super::Version, peer: bool) -> ClientConn {
        let target: SocketAddr = "198.18.0.2:8080".parse().unwrap();
        ClientConn {
            direction,
            target,
            version,
            upstream: std::sync::Arc::new(super::super::Direct(super::super::Endpoint::plain(
                target,
            ))),
            peer_id: peer.then(|| "peer.mesh.local".into()),
        }
    }

    #[test]
    fn how_a_request_is_carried_depends_on_the_hop_and_the_client() {
        use super::super::Version::{Http1, Http2};
        let mesh = Transport::Mesh {
            server_id: "b.mesh.local".into(),
        };
        let get = || parts(Request::get("/x").header("Host", "h").body(()).unwrap());
        let out = |version| client(Direction::Outbound, version, true);

        // HTTP/1 to a mesh peer: upgraded, answered in the client's version.
        let mut p = get();
        let carried = carry(&out(Http1), &mut p, &mesh, false);
        assert_eq!(carried, Carried::Upgraded(Version::HTTP_11));
        assert_eq!(
            (carried.version(&mesh, Http1), p.version),
            (Http2, Version::HTTP_2)
        );
        // ... but an upgrade takes a dedicated HTTP/1 connection, unchanged.
        let mut p = get();
        let carried = carry(&out(Http1), &mut p, &mesh, true);
        assert_eq!(
            (carried, carried.version(&mesh, Http1)),
            (Carried::Dedicated, Http1)
        );
        assert!(p.headers.get(HEADER).is_none());
        // HTTP/2 to a mesh peer, and anything in plaintext: as is.
        let mut p = get();
        assert_eq!(carry(&out(Http2), &mut p, &mesh, false), Carried::AsIs);
        assert_eq!(
            carry(&out(Http1), &mut p, &Transport::Plain, false),
            Carried::AsIs
        );

        // A marked request from a peer proxy is restored to HTTP/1 ...
        let marked = || {
            let mut p = get();
            upgrade_request(&mut p, &fallback());
            p
        };
        let mut p = marked();
        let from_peer = client(Direction::Inbound, Http2, true);
        let carried = carry(&from_peer, &mut p, &Transport::Plain, false);
        assert_eq!(
            (carried, carried.version(&Transport::Plain, Http2)),
            (Carried::Downgraded, Http1)
        );
        assert_eq!(
            (p.version, p.uri.to_string()),
            (Version::HTTP_11, "/x".into())
        );
        // ... but from a plaintext HTTP/2 client the mark is left alone.
        let mut p = marked();
        let plaintext = client(Direction::Inbound, Http2, false);
        assert_eq!(
            carry(&plaintext, &mut p, &Transport::Plain, false),
            Carried::AsIs
        );
        assert_eq!(p.version, Version::HTTP_2);
    }

    #[test]
    fn an_unmarked_request_is_left_as_it_is() {
        let mut p = parts(
            Request::get("http://example.com/x")
                .version(Version::HTTP_2)
                .body(())
                .unwrap(),
        );
        assert!(!downgrade(&mut p));
        assert_eq!(
            (p.version, p.uri.to_string()),
            (Version::HTTP_2, "http://example.com/x".into())
        );
    }
}
