//! HTTP/1 requests carried as HTTP/2 between meshed proxies, as Linkerd carries them.
//!
//! The outbound proxy sends every request to a mesh peer over one multiplexed HTTP/2
//! connection. An HTTP/1 request is [`upgrade`]d for the trip: it becomes an HTTP/2
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
//! HTTP/2 carries header names in lowercase: a name's case does not survive the trip
//! (field names are case-insensitive; Linkerd behaves the same).

use http::header::HOST;
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{HeaderMap, HeaderValue, Version};

/// The request (and response) header that marks an HTTP/1 message carried as HTTP/2.
pub const HEADER: &str = "l5d-orig-proto";

const HTTP_10: &str = "HTTP/1.0";
const HTTP_11: &str = "HTTP/1.1";
const ABSOLUTE_FORM: &str = "; absolute-form";

/// Turns the HTTP/1 request `parts` into the HTTP/2 request that carries it to a peer.
/// `fallback` is the `:authority` when the request has no usable `Host` (HTTP/1.0):
/// the original destination.
pub fn upgrade(parts: &mut Parts, fallback: &Authority) {
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

/// Restores the HTTP/1 request a peer's outbound proxy [`upgrade`]d, if `parts` carries
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

/// Removes the mark of [`mark_response`] from the response to an [`upgrade`]d request,
/// which is answered to the client in HTTP/1 (`version`, the client's).
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
        upgrade(&mut p, &fallback());
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
    fn http_1_0_without_host_uses_the_destination_as_authority_and_stays_1_0() {
        let mut p = parts(
            Request::get("/")
                .version(Version::HTTP_10)
                .body(())
                .unwrap(),
        );
        upgrade(&mut p, &fallback());
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
        upgrade(&mut p, &fallback());
        assert_eq!(p.headers[HEADER], "HTTP/1.1; absolute-form");
        assert!(downgrade(&mut p));
        assert_eq!(p.uri, "http://example.com/x");
        assert_eq!(p.version, Version::HTTP_11);
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
