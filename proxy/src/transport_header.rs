//! The transport header that opens every meshed connection, inside the mTLS session.
//!
//! The outbound proxy connects to the peer proxy's inbound port (4143) instead of the
//! application's port, so the application port has to travel in-band. The format is
//! Linkerd's, so that the wire is familiar to anyone who has debugged Linkerd:
//!
//! ```text
//! "transport.l5d.io/v1\r\n\r\n"   23 bytes, fixed
//! length                          4 bytes, big-endian, of the message that follows
//! message                         protobuf { 1: int32 port, 2: string name,
//!                                            3: SessionProtocol protocol }
//! ```
//!
//! The protobuf is hand-written: two wire types (varint, length-delimited) are all a
//! three-field message needs, and a code generator would be a build dependency for
//! a dozen lines.
//!
//! Field 3, the session protocol, follows Linkerd's `SessionProtocol` message: a
//! nested message whose field 1 (`http1`) or field 2 (`http2`) is present as an empty
//! message. It is sent when outbound detection found HTTP/1 or HTTP/2, and omitted for
//! opaque traffic, so an HTTP/1 header is `1A 02 0A 00` after the port and an opaque one
//! ends after the port.
//!
//! Field 1000, `tls`, is meshproxy's own: a varint 1 when the outbound proxy detected a
//! TLS ClientHello from its client (the application speaks TLS inside our mTLS). Linkerd's
//! `SessionProtocol` has no TLS case, and the inbound proxy does not detect again, so
//! without it the two proxies of one connection would label it `protocol="tls"` and
//! `protocol="opaque"`. A field number far above Linkerd's keeps it apart from any field
//! Linkerd may add; a Linkerd proxy skips it as an unknown field, and a header without it
//! (Linkerd's) means "not detected as TLS", as before.
//!
//! Decoding is defensive: the length is bounded ([`MAX_MESSAGE_LEN`]) before anything is
//! allocated, a short read is an error, unknown fields are skipped (protobuf's forward
//! compatibility), and the port must be a real TCP port.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The fixed preamble of a transport header.
pub const PREAMBLE: &[u8; 23] = b"transport.l5d.io/v1\r\n\r\n";

/// The ALPN protocol both proxies negotiate when a transport header follows the
/// handshake.
pub const ALPN: &[u8] = b"transport.l5d.io/v1";

/// The longest message we accept. A real header is a few bytes plus an optional name;
/// the bound keeps a hostile peer from making us allocate whatever its 32-bit length
/// field says.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

// Protobuf wire types (https://protobuf.dev/programming-guides/encoding/).
const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

const FIELD_PORT: u32 = 1;
const FIELD_NAME: u32 = 2;
const FIELD_PROTOCOL: u32 = 3;
const FIELD_TLS: u32 = 1000;
const PROTOCOL_HTTP1: u32 = 1;
const PROTOCOL_HTTP2: u32 = 2;

/// The decoded header: where the inbound proxy should forward the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportHeader {
    /// The application port on the peer, the client's original destination port.
    pub port: u16,
    /// A logical destination name (Linkerd's gateway use). We never set it and ignore
    /// it on receipt, but decode it so a header from another implementation is valid.
    pub name: Option<String>,
    /// The session protocol the outbound proxy detected, when it detected HTTP.
    pub protocol: Option<SessionProtocol>,
    /// The outbound proxy detected TLS from its client (field 1000, ours).
    pub tls: bool,
}

/// Field 3: what the outbound side found the session to speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionProtocol {
    Http1,
    Http2,
}

/// Why a transport header was refused.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("the connection does not start with the transport header preamble {expected:?} (got {got:?})", expected = String::from_utf8_lossy(PREAMBLE))]
    BadPreamble { got: Vec<u8> },
    #[error(
        "transport header message of {len} bytes is longer than the limit of {MAX_MESSAGE_LEN}"
    )]
    TooLong { len: u32 },
    #[error("the transport header ends early: {context}")]
    Truncated { context: &'static str },
    #[error("malformed transport header: {reason}")]
    Malformed { reason: &'static str },
    #[error("transport header port {port} is not a TCP port (1-65535)")]
    BadPort { port: i64 },
    #[error("cannot read the transport header: {0}")]
    Io(io::Error),
}

impl TransportHeader {
    /// A header for `port` with the session protocol, if any.
    pub fn new(port: u16, protocol: Option<SessionProtocol>) -> TransportHeader {
        TransportHeader {
            port,
            name: None,
            protocol,
            tls: false,
        }
    }

    /// A header for a client whose bytes the outbound proxy detected as TLS.
    pub fn tls(port: u16) -> TransportHeader {
        TransportHeader {
            tls: true,
            ..TransportHeader::new(port, None)
        }
    }

    /// The whole header as it goes on the wire: preamble, length, message.
    pub fn encode(&self) -> Vec<u8> {
        let message = self.encode_message();
        let mut out = Vec::with_capacity(PREAMBLE.len() + 4 + message.len());
        out.extend_from_slice(PREAMBLE);
        let len = u32::try_from(message.len()).expect("a header message is a few bytes");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&message);
        out
    }

    /// The protobuf message alone.
    fn encode_message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(16);
        put_key(&mut m, FIELD_PORT, VARINT);
        put_varint(&mut m, u64::from(self.port));
        if let Some(name) = &self.name {
            put_key(&mut m, FIELD_NAME, LEN);
            put_varint(&mut m, name.len() as u64);
            m.extend_from_slice(name.as_bytes());
        }
        if let Some(protocol) = self.protocol {
            let field = match protocol {
                SessionProtocol::Http1 => PROTOCOL_HTTP1,
                SessionProtocol::Http2 => PROTOCOL_HTTP2,
            };
            // SessionProtocol { <field>: {} }: the key and a zero length.
            let mut inner = Vec::with_capacity(2);
            put_key(&mut inner, field, LEN);
            put_varint(&mut inner, 0);
            put_key(&mut m, FIELD_PROTOCOL, LEN);
            put_varint(&mut m, inner.len() as u64);
            m.extend_from_slice(&inner);
        }
        if self.tls {
            put_key(&mut m, FIELD_TLS, VARINT);
            put_varint(&mut m, 1);
        }
        m
    }

    /// Decodes a whole header (preamble, length, message) from a byte slice. Bytes after
    /// the message are the application's and are not looked at.
    pub fn decode(buf: &[u8]) -> Result<(TransportHeader, usize), HeaderError> {
        if buf.len() < PREAMBLE.len() {
            if !PREAMBLE.starts_with(buf) {
                return Err(HeaderError::BadPreamble { got: buf.to_vec() });
            }
            return Err(HeaderError::Truncated {
                context: "in the preamble",
            });
        }
        let (preamble, rest) = buf.split_at(PREAMBLE.len());
        if preamble != PREAMBLE {
            return Err(HeaderError::BadPreamble {
                got: preamble.to_vec(),
            });
        }
        let Some((len, rest)) = rest.split_first_chunk::<4>() else {
            return Err(HeaderError::Truncated {
                context: "in the length",
            });
        };
        let len = checked_len(u32::from_be_bytes(*len))?;
        let Some(message) = rest.get(..len) else {
            return Err(HeaderError::Truncated {
                context: "in the message",
            });
        };
        let header = TransportHeader::decode_message(message)?;
        Ok((header, PREAMBLE.len() + 4 + len))
    }

    /// Decodes the protobuf message alone.
    pub fn decode_message(mut m: &[u8]) -> Result<TransportHeader, HeaderError> {
        let mut port = None;
        let mut name = None;
        let mut protocol = None;
        let mut tls = false;
        while !m.is_empty() {
            let (field, wire_type) = take_key(&mut m)?;
            match (field, wire_type) {
                (FIELD_TLS, VARINT) => tls = take_varint(&mut m)? == 1,
                (FIELD_PORT, VARINT) => {
                    // int32: negative values are sign-extended to 64 bits on the wire.
                    let value = take_varint(&mut m)? as i64 as i32;
                    port = Some(i64::from(value));
                }
                (FIELD_NAME, LEN) => {
                    let bytes = take_len(&mut m)?;
                    let s = std::str::from_utf8(bytes).map_err(|_| HeaderError::Malformed {
                        reason: "the name is not UTF-8",
                    })?;
                    name = (!s.is_empty()).then(|| s.to_string());
                }
                (FIELD_PROTOCOL, LEN) => protocol = decode_protocol(take_len(&mut m)?)?,
                (FIELD_PORT | FIELD_NAME | FIELD_PROTOCOL | FIELD_TLS, _) => {
                    return Err(HeaderError::Malformed {
                        reason: "a known field has the wrong wire type",
                    })
                }
                (_, wire_type) => skip(&mut m, wire_type)?,
            }
        }
        // proto3: an absent port is 0, which is not a port.
        let port = port.unwrap_or(0);
        let port = match u16::try_from(port) {
            Ok(p) if p != 0 => p,
            _ => return Err(HeaderError::BadPort { port }),
        };
        Ok(TransportHeader {
            port,
            name,
            protocol,
            tls,
        })
    }

    /// Reads exactly one header from `io`, leaving the application's bytes that follow
    /// it unread. The caller bounds the time (the detect timeout): a peer that sends a
    /// partial header and stalls must not hold the connection forever.
    pub async fn read<R>(io: &mut R) -> Result<TransportHeader, HeaderError>
    where
        R: AsyncRead + Unpin,
    {
        let mut fixed = [0u8; PREAMBLE.len() + 4];
        read_exact(io, &mut fixed, "in the preamble or length").await?;
        let (preamble, len) = fixed.split_at(PREAMBLE.len());
        if preamble != PREAMBLE {
            return Err(HeaderError::BadPreamble {
                got: preamble.to_vec(),
            });
        }
        let len = checked_len(u32::from_be_bytes(len.try_into().expect("4 bytes")))?;
        let mut message = vec![0; len];
        read_exact(io, &mut message, "in the message").await?;
        TransportHeader::decode_message(&message)
    }
}

fn checked_len(len: u32) -> Result<usize, HeaderError> {
    match usize::try_from(len) {
        Ok(n) if n <= MAX_MESSAGE_LEN => Ok(n),
        _ => Err(HeaderError::TooLong { len }),
    }
}

async fn read_exact<R>(io: &mut R, buf: &mut [u8], context: &'static str) -> Result<(), HeaderError>
where
    R: AsyncRead + Unpin,
{
    match io.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Err(HeaderError::Truncated { context })
        }
        Err(e) => Err(HeaderError::Io(e)),
    }
}

fn decode_protocol(mut m: &[u8]) -> Result<Option<SessionProtocol>, HeaderError> {
    let mut protocol = None;
    while !m.is_empty() {
        let (field, wire_type) = take_key(&mut m)?;
        match (field, wire_type) {
            (PROTOCOL_HTTP1, LEN) => {
                take_len(&mut m)?;
                protocol = Some(SessionProtocol::Http1);
            }
            (PROTOCOL_HTTP2, LEN) => {
                take_len(&mut m)?;
                protocol = Some(SessionProtocol::Http2);
            }
            // A protocol we do not know: treated as no protocol (opaque).
            (_, wire_type) => skip(&mut m, wire_type)?,
        }
    }
    Ok(protocol)
}

fn put_key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, u64::from(field << 3 | u32::from(wire_type)));
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn take_key(m: &mut &[u8]) -> Result<(u32, u8), HeaderError> {
    let key = take_varint(m)?;
    let field = u32::try_from(key >> 3).map_err(|_| HeaderError::Malformed {
        reason: "field number out of range",
    })?;
    if field == 0 {
        return Err(HeaderError::Malformed {
            reason: "field number 0",
        });
    }
    Ok((field, (key & 7) as u8))
}

fn take_varint(m: &mut &[u8]) -> Result<u64, HeaderError> {
    let mut value = 0u64;
    // At most 10 bytes encode 64 bits.
    for i in 0..10 {
        let Some((&byte, rest)) = m.split_first() else {
            return Err(HeaderError::Malformed {
                reason: "a varint is cut off",
            });
        };
        *m = rest;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(HeaderError::Malformed {
        reason: "a varint is longer than 10 bytes",
    })
}

fn take_len<'a>(m: &mut &'a [u8]) -> Result<&'a [u8], HeaderError> {
    let len = take_varint(m)?;
    let len =
        usize::try_from(len)
            .ok()
            .filter(|&n| n <= m.len())
            .ok_or(HeaderError::Malformed {
                reason: "a length-delimited field runs past the message",
            })?;
    let (field, rest) = m.split_at(len);
    *m = rest;
    Ok(field)
}

fn skip(m: &mut &[u8], wire_type: u8) -> Result<(), HeaderError> {
    let fixed = |m: &mut &[u8], n: usize| {
        if m.len() < n {
            return Err(HeaderError::Malformed {
                reason: "a fixed-size field is cut off",
            });
        }
        *m = &m[n..];
        Ok(())
    };
    match wire_type {
        VARINT => take_varint(m).map(drop),
        I64 => fixed(m, 8),
        LEN => take_len(m).map(drop),
        I32 => fixed(m, 4),
        _ => Err(HeaderError::Malformed {
            reason: "unsupported wire type (groups are not used)",
        }),
    }
}

#[cfg(test)]
mod tests;
