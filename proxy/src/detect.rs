//! Protocol detection from the client's first bytes.
//!
//! [`detect`] is a plain async function over any reader: it reads into a bounded buffer
//! until the bytes so far are decisive, and returns the classification together with
//! every byte it read, so the caller replays them to the destination unchanged. The
//! classifiers themselves ([`classify`]) are pure functions over a byte slice.
//!
//! Detection fails open: when the client sends nothing decisive before the timeout, the
//! connection is forwarded as opaque TCP. Refusing it instead would break every
//! server-speaks-first protocol on a port nobody marked opaque, while failing open only
//! costs that connection its protocol label (and the detect-timeout delay).

mod tls;

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::metrics::Label;

pub use self::tls::ClientHello;

/// The most bytes detection buffers. An HTTP/1 request line or a TLS ClientHello longer
/// than this is classified from what fits (a request line: opaque; a ClientHello: TLS).
pub const MAX_PREFIX: usize = 8 * 1024;

/// The longest method in IANA's HTTP Method Registry: `UPDATEREDIRECTREF` (RFC 4437).
/// A first token longer than this cannot begin a request line we would label HTTP/1,
/// so the client is opaque at once instead of holding the connection until the detect
/// timeout (a client that sends 64 bytes of one letter and waits for an answer used to
/// stall for the whole timeout). Extension methods longer than any registered one are
/// forwarded all the same, only labelled opaque.
const MAX_METHOD: usize = 17;

/// The HTTP/2 client connection preface (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a connection is labelled with in metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Opaque,
    Http1,
    Http2,
    Tls,
}

impl Protocol {
    /// The `protocol` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Opaque => "opaque",
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Tls => "tls",
        }
    }
}

impl Label for Protocol {
    fn label(&self) -> &'static str {
        self.as_str()
    }
}

/// The `result` label of `detect_results_total`.
impl Label for Detected {
    fn label(&self) -> &'static str {
        self.result_label()
    }
}

/// What detection concluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detected {
    /// A request line `METHOD SP target SP HTTP/1.x`.
    Http1,
    /// The HTTP/2 connection preface (prior knowledge).
    Http2,
    /// A TLS ClientHello, with what it says about the destination.
    Tls(ClientHello),
    /// Bytes that are none of the above.
    Opaque,
    /// Nothing decisive arrived before the timeout: forwarded as opaque (fail open).
    Timeout,
    /// The client closed before sending a single byte. Not an error: health checks and
    /// port scanners do this all the time.
    Eof,
}

impl Detected {
    /// The protocol label of the forwarded connection.
    pub fn protocol(&self) -> Protocol {
        match self {
            Detected::Http1 => Protocol::Http1,
            Detected::Http2 => Protocol::Http2,
            Detected::Tls(_) => Protocol::Tls,
            Detected::Opaque | Detected::Timeout | Detected::Eof => Protocol::Opaque,
        }
    }

    /// The `result` label of `detect_results_total`.
    pub fn result_label(&self) -> &'static str {
        match self {
            Detected::Timeout => "timeout",
            Detected::Eof => "eof",
            other => other.protocol().as_str(),
        }
    }
}

/// The outcome of [`detect`]: what was found and the bytes read to find it.
#[derive(Debug)]
pub struct Detection {
    pub detected: Detected,
    /// Every byte read from the client, to be written to the destination first.
    pub prefix: Vec<u8>,
}

/// Reads the client's first bytes, up to [`MAX_PREFIX`], until they are decisive or
/// `timeout` passes, and classifies them.
///
/// Reads stop as soon as the prefix is decisive, so a client that sends a request line
/// and waits for the answer is not kept waiting. An I/O error is returned as is; the
/// bytes read so far are then useless because the connection is gone.
pub async fn detect<R>(io: &mut R, timeout: Duration) -> io::Result<Detection>
where
    R: AsyncRead + Unpin,
{
    let mut buf = vec![0; MAX_PREFIX];
    let mut len = 0;
    // `read` on a socket is cancel-safe, so when the timeout drops the read future no
    // byte is lost: everything read so far is in `buf[..len]`.
    let detected =
        match tokio::time::timeout(timeout, read_until_decisive(io, &mut buf, &mut len)).await {
            Ok(result) => result?,
            Err(_elapsed) => Detected::Timeout,
        };
    buf.truncate(len);
    Ok(Detection {
        detected,
        prefix: buf,
    })
}

async fn read_until_decisive<R>(io: &mut R, buf: &mut [u8], len: &mut usize) -> io::Result<Detected>
where
    R: AsyncRead + Unpin,
{
    loop {
        // `*len < buf.len()` here: it starts at 0, and once it reaches `buf.len()`
        // `classify(.., full = true)` is always decisive and the loop returns.
        let n = io.read(&mut buf[*len..]).await?;
        if n == 0 {
            if *len == 0 {
                return Ok(Detected::Eof);
            }
            // The client half-closed after a prefix that is still ambiguous: nothing more
            // will come, so it is whatever it is not yet proven to be.
            return Ok(classify(&buf[..*len], true).unwrap_or(Detected::Opaque));
        }
        *len += n;
        let full = *len == buf.len();
        if let Some(detected) = classify(&buf[..*len], full) {
            return Ok(detected);
        }
    }
}

/// The verdict of one classifier on the bytes so far.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Match(Detected),
    No,
    NeedMore,
}

/// Classifies a prefix: `Some` when it is decisive, `None` while more bytes could still
/// change the answer. `full` says no more bytes will be buffered, which makes a TLS
/// record header followed by a truncated ClientHello decisive.
pub fn classify(buf: &[u8], full: bool) -> Option<Detected> {
    let verdicts = [
        classify_h2(buf),
        classify_http1(buf),
        tls::classify(buf, full),
    ];
    let mut undecided = false;
    for verdict in verdicts {
        match verdict {
            Verdict::Match(detected) => return Some(detected),
            Verdict::NeedMore => undecided = true,
            Verdict::No => {}
        }
    }
    if undecided && !full {
        None
    } else {
        Some(Detected::Opaque)
    }
}

fn classify_h2(buf: &[u8]) -> Verdict {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] != H2_PREFACE[..n] {
        Verdict::No
    } else if n < H2_PREFACE.len() {
        Verdict::NeedMore
    } else {
        Verdict::Match(Detected::Http2)
    }
}

/// Matches a request line `METHOD SP request-target SP HTTP/1.x CRLF` (RFC 9112,
/// section 3), also accepting a bare LF as RFC 9112 allows recipients to.
///
/// Indexing cannot panic on any input: each `buf[i]` follows a check that
/// `i < buf.len()`, and `after[0]` one that `after` is not empty (the fuzz target
/// `detect` runs this on arbitrary bytes).
fn classify_http1(buf: &[u8]) -> Verdict {
    let mut i = 0;
    // method = token, no longer than a registered method
    while i < buf.len() && i <= MAX_METHOD && is_tchar(buf[i]) {
        i += 1;
    }
    if i > MAX_METHOD {
        return Verdict::No;
    }
    if i == buf.len() {
        return Verdict::NeedMore;
    }
    if i == 0 || buf[i] != b' ' {
        return Verdict::No;
    }
    i += 1;
    // request-target: any visible ASCII
    let target_start = i;
    while i < buf.len() && buf[i].is_ascii_graphic() {
        i += 1;
    }
    if i == buf.len() {
        return Verdict::NeedMore;
    }
    if i == target_start || buf[i] != b' ' {
        return Verdict::No;
    }
    i += 1;
    // HTTP-version, then the end of the line
    const VERSION: &[u8] = b"HTTP/1.";
    let rest = &buf[i..];
    let n = rest.len().min(VERSION.len());
    if rest[..n] != VERSION[..n] {
        return Verdict::No;
    }
    let after = &rest[n..];
    if n < VERSION.len() || after.is_empty() {
        return Verdict::NeedMore;
    }
    if !after[0].is_ascii_digit() {
        return Verdict::No;
    }
    match &after[1..] {
        [] | [b'\r'] => Verdict::NeedMore,
        [b'\n', ..] | [b'\r', b'\n', ..] => Verdict::Match(Detected::Http1),
        _ => Verdict::No,
    }
}

/// `tchar` of RFC 9110, section 5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests;
