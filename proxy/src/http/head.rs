//! The first HTTP/1 request head of a connection, read and checked before hyper sees
//! it, so that a request that does not parse gets the proxy's own 400 with a
//! `meshproxy-error` header (hyper's own answer to a bad head cannot carry one).
//!
//! Detection only looked at the request line; the rest of the head may still be
//! anything. [`check`] accepts what hyper's server accepts (same parser, the same
//! `Content-Length` and `Transfer-Encoding` rules), so a head that passes here also
//! passes there. Later requests on a kept-alive connection are parsed by hyper alone:
//! a bad one there is answered by hyper's plain 400 and counted as a failure.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::server::MAX_HEAD;

/// The most headers a request may have: hyper's server default.
const MAX_HEADERS: usize = 100;

/// Why a request head is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadHead {
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
    #[error("request head larger than {MAX_HEAD} bytes")]
    TooLarge,
}

/// Whether `bytes` start with a complete, valid request head: `Ok(Some(len))` when
/// they do, `Ok(None)` when more bytes are needed.
pub fn check(bytes: &[u8]) -> Result<Option<usize>, BadHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if bytes.len() >= MAX_HEAD => return Err(BadHead::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(BadHead::Malformed("too many headers")),
        Err(_) => return Err(BadHead::Malformed("not an HTTP/1 request head")),
    };
    if len > MAX_HEAD {
        return Err(BadHead::TooLarge);
    }
    let path = request.path.unwrap_or_default();
    if http::Uri::try_from(path).is_err() {
        return Err(BadHead::Malformed("invalid request target"));
    }
    let http11 = request.version == Some(1);
    let mut content_length = None;
    let mut chunked = None;
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            if !http11 {
                return Err(BadHead::Malformed("Transfer-Encoding in HTTP/1.0"));
            }
            let last = header
                .value
                .rsplit(|b| *b == b',')
                .next()
                .unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if header.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(BadHead::Malformed("invalid Content-Length"))?;
            if content_length.is_some_and(|previous| previous != value) {
                return Err(BadHead::Malformed("conflicting Content-Length"));
            }
            content_length = Some(value);
        }
    }
    if chunked == Some(false) {
        return Err(BadHead::Malformed(
            "Transfer-Encoding not ending in chunked",
        ));
    }
    Ok(Some(len))
}

/// What [`read`] found.
pub enum Head {
    /// A valid head (and maybe more) in these bytes, to be replayed to hyper.
    Valid(Vec<u8>),
    /// An invalid one.
    Bad(BadHead),
    /// The client closed, failed or stalled before completing it: nothing to answer.
    Gone,
}

/// Reads from `io`, after `prefix`, until the first request head is complete (or
/// invalid), within `timeout`.
pub async fn read<I>(io: &mut I, prefix: Vec<u8>, timeout: Duration) -> Head
where
    I: AsyncRead + Unpin,
{
    let mut buf = prefix;
    let reading = async {
        loop {
            match check(&buf) {
                Ok(Some(_)) => return Ok(true),
                Err(bad) => return Err(bad),
                Ok(None) => {}
            }
            let start = buf.len();
            buf.resize(start + 4096, 0);
            // A read error ends the connection like an EOF: nobody to answer.
            let n = io.read(&mut buf[start..]).await.unwrap_or(0);
            buf.truncate(start + n);
            if n == 0 {
                return Ok(false);
            }
        }
    };
    match tokio::time::timeout(timeout, reading).await {
        Ok(Ok(true)) => Head::Valid(buf),
        Ok(Err(bad)) => Head::Bad(bad),
        Ok(Ok(false)) | Err(_) => Head::Gone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_hyper_accepts_pass_and_others_do_not() {
        let ok: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET http://a/x?y HTTP/1.0\r\n\r\nbody",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
        ];
        for head in ok {
            assert!(matches!(check(head), Ok(Some(_))), "{head:?}");
        }
        assert_eq!(check(b"GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        let bad: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: \x01\r\n\r\n",
        ];
        for head in bad {
            assert!(
                matches!(check(head), Err(BadHead::Malformed(_))),
                "{head:?}"
            );
        }
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_HEAD + 1, b'a');
        assert_eq!(check(&huge), Err(BadHead::TooLarge));
    }
}
