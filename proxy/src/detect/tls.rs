//! A bounded parser for the TLS ClientHello: just enough to recognise one and to read
//! its SNI and ALPN (RFC 8446 section 4.1.2, RFC 6066 section 3, RFC 7301).
//!
//! It never allocates more than the names it returns and never reads past the slice
//! it is given; every length field is checked against what is left.

use super::{Detected, Verdict};

/// TLS record content type `handshake`.
const HANDSHAKE: u8 = 22;
/// Handshake message type `client_hello`.
const CLIENT_HELLO: u8 = 1;
/// The largest record the spec allows (2^14) plus room for TLS 1.2's expansion.
const MAX_RECORD: usize = (1 << 14) + 2048;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const SNI_HOST_NAME: u8 = 0;

/// What a ClientHello tells about the destination.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The `server_name` extension's host name, if any.
    pub sni: Option<String>,
    /// The ALPN protocols the client offers, in its order.
    pub alpn: Vec<Vec<u8>>,
}

/// Classifies a prefix as a ClientHello record, as long as the record header and the
/// handshake type say so; then waits for the whole record (or a full buffer) to read
/// the SNI and ALPN out of it.
pub(super) fn classify(buf: &[u8], full: bool) -> Verdict {
    // Record header: type, legacy version 3.x, length; then the handshake type.
    let header_ok = [
        buf.first().map(|&b| b == HANDSHAKE),
        buf.get(1).map(|&b| b == 3),
        buf.get(2).map(|&b| b <= 4),
    ];
    if header_ok.contains(&Some(false)) {
        return Verdict::No;
    }
    // The record length is decisive as soon as it is there: a record too short for a
    // handshake header, or longer than TLS allows, is no ClientHello.
    if let (Some(&high), Some(&low)) = (buf.get(3), buf.get(4)) {
        if !(4..=MAX_RECORD).contains(&usize::from(u16::from_be_bytes([high, low]))) {
            return Verdict::No;
        }
    }
    if buf.len() < 6 {
        return Verdict::NeedMore;
    }
    // From here `buf.len() >= 6`: indexes 3 to 5, and `5..` below, are in bounds.
    let record_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf[5] != CLIENT_HELLO {
        return Verdict::No;
    }
    let record_end = 5 + record_len;
    if buf.len() < record_end && !full {
        return Verdict::NeedMore;
    }
    let fragment = &buf[5..buf.len().min(record_end)];
    match parse_handshake(fragment) {
        Ok(hello) => Verdict::Match(Detected::Tls(hello)),
        // Cut off by the buffer limit or split across records: still a ClientHello,
        // we just cannot see its extensions.
        Err(Error::Truncated) => Verdict::Match(Detected::Tls(ClientHello::default())),
        Err(Error::Malformed) => Verdict::No,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Error {
    /// The message goes on past the bytes we have.
    Truncated,
    /// A length field contradicts the message's own length.
    Malformed,
}

/// Parses a handshake message that starts with a ClientHello header. `fragment` may
/// hold less than the whole message (`Truncated`) but never more than one record.
fn parse_handshake(fragment: &[u8]) -> Result<ClientHello, Error> {
    let mut r = Reader::new(fragment, Error::Truncated);
    let _msg_type = r.u8()?;
    let msg_len = r.u24()?;
    // Inside a message we have whole, any overrun is a lie about lengths; inside a
    // partial one it just means we stopped early.
    let (body, overrun) = if msg_len <= r.remaining() {
        (r.bytes(msg_len)?, Error::Malformed)
    } else {
        (r.rest(), Error::Truncated)
    };
    let mut r = Reader::new(body, overrun);
    let _legacy_version = r.u16()?;
    let _random = r.bytes(32)?;
    let session_id = r.u8()?;
    if session_id > 32 {
        return Err(Error::Malformed);
    }
    r.bytes(usize::from(session_id))?;
    let ciphers = r.u16()?;
    if ciphers < 2 || ciphers % 2 != 0 {
        return Err(Error::Malformed);
    }
    r.bytes(usize::from(ciphers))?;
    let compression = r.u8()?;
    if compression < 1 {
        return Err(Error::Malformed);
    }
    r.bytes(usize::from(compression))?;

    let mut hello = ClientHello::default();
    if r.remaining() == 0 && overrun == Error::Malformed {
        // A complete ClientHello without extensions (TLS 1.2 and older allow it).
        return Ok(hello);
    }
    let extensions_len = r.u16()?;
    let mut exts = r.up_to(usize::from(extensions_len))?;
    while exts.remaining() > 0 {
        match parse_extension(&mut exts, &mut hello) {
            Ok(()) => {}
            // Keep what the extensions we saw whole told us.
            Err(Error::Truncated) => break,
            Err(Error::Malformed) => return Err(Error::Malformed),
        }
    }
    Ok(hello)
}

fn parse_extension(exts: &mut Reader<'_>, hello: &mut ClientHello) -> Result<(), Error> {
    let ext_type = exts.u16()?;
    let ext_len = exts.u16()?;
    let mut data = exts.sub(usize::from(ext_len))?;
    match ext_type {
        EXT_SERVER_NAME => hello.sni = parse_sni(&mut data)?,
        EXT_ALPN => hello.alpn = parse_alpn(&mut data)?,
        _ => {}
    }
    Ok(())
}

fn parse_sni(data: &mut Reader<'_>) -> Result<Option<String>, Error> {
    let list_len = data.u16()?;
    let mut list = data.sub(usize::from(list_len))?;
    while list.remaining() > 0 {
        let name_type = list.u8()?;
        let name_len = list.u16()?;
        let name = list.bytes(usize::from(name_len))?;
        if name_type == SNI_HOST_NAME {
            // A host name is ASCII (RFC 6066); anything else is not a name we can use.
            return match std::str::from_utf8(name) {
                Ok(name) if !name.is_empty() && name.is_ascii() => Ok(Some(name.to_owned())),
                _ => Err(Error::Malformed),
            };
        }
    }
    Ok(None)
}

fn parse_alpn(data: &mut Reader<'_>) -> Result<Vec<Vec<u8>>, Error> {
    let list_len = data.u16()?;
    let mut list = data.sub(usize::from(list_len))?;
    let mut protocols = Vec::new();
    while list.remaining() > 0 {
        let len = list.u8()?;
        if len == 0 {
            return Err(Error::Malformed);
        }
        protocols.push(list.bytes(usize::from(len))?.to_vec());
    }
    Ok(protocols)
}

/// A cursor over a byte slice. Running past the end yields `overrun`: `Malformed` when
/// the slice is known to be whole, `Truncated` when the message goes on past it.
struct Reader<'a> {
    buf: &'a [u8],
    overrun: Error,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], overrun: Error) -> Self {
        Reader { buf, overrun }
    }

    fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if n > self.buf.len() {
            return Err(self.overrun);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// A reader over the next `n` bytes, which are all there: overrunning them is
    /// `Malformed`.
    fn sub(&mut self, n: usize) -> Result<Reader<'a>, Error> {
        Ok(Reader::new(self.bytes(n)?, Error::Malformed))
    }

    /// Like `sub`, but in a truncated message takes what is left of the `n` bytes.
    fn up_to(&mut self, n: usize) -> Result<Reader<'a>, Error> {
        if n > self.remaining() && self.overrun == Error::Truncated {
            return Ok(Reader::new(self.rest(), Error::Truncated));
        }
        self.sub(n)
    }

    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Error> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u24(&mut self) -> Result<usize, Error> {
        let b = self.bytes(3)?;
        Ok(usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
}
