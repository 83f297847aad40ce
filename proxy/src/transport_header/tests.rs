use proptest::prelude::*;

use super::*;

#[test]
fn port_5432_has_the_published_bytes() {
    let bytes = TransportHeader::new(5432, None).encode();
    let mut want = b"transport.l5d.io/v1\r\n\r\n".to_vec();
    want.extend_from_slice(&[0x00, 0x00, 0x00, 0x03]);
    want.extend_from_slice(&[0x08, 0xB8, 0x2A]);
    assert_eq!(bytes, want);
    assert_eq!(
        TransportHeader::decode(&bytes).unwrap(),
        (TransportHeader::new(5432, None), bytes.len())
    );
}

#[test]
fn the_session_protocol_is_a_nested_message() {
    let http1 = TransportHeader::new(80, Some(SessionProtocol::Http1)).encode();
    assert_eq!(
        &http1[23..],
        &[0, 0, 0, 6, 0x08, 80, 0x1A, 0x02, 0x0A, 0x00]
    );
    let http2 = TransportHeader::new(80, Some(SessionProtocol::Http2)).encode();
    assert_eq!(&http2[27..], &[0x08, 80, 0x1A, 0x02, 0x12, 0x00]);
}

#[test]
fn bytes_after_the_header_are_left_alone() {
    let mut bytes = TransportHeader::new(6379, None).encode();
    let header_len = bytes.len();
    bytes.extend_from_slice(b"PING\r\n");
    let (header, used) = TransportHeader::decode(&bytes).unwrap();
    assert_eq!(header.port, 6379);
    assert_eq!(used, header_len);
}

#[test]
fn every_truncation_is_rejected() {
    let bytes = TransportHeader::new(5432, Some(SessionProtocol::Http2)).encode();
    for cut in 0..bytes.len() {
        let err = TransportHeader::decode(&bytes[..cut]).unwrap_err();
        assert!(matches!(err, HeaderError::Truncated { .. }), "{cut}: {err}");
    }
}

#[test]
fn oversized_lengths_are_rejected_before_reading_the_message() {
    let mut bytes = PREAMBLE.to_vec();
    bytes.extend_from_slice(&(MAX_MESSAGE_LEN as u32 + 1).to_be_bytes());
    let err = TransportHeader::decode(&bytes).unwrap_err();
    assert!(
        matches!(err, HeaderError::TooLong { len } if len == 65537),
        "{err}"
    );
    let mut huge = PREAMBLE.to_vec();
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        TransportHeader::decode(&huge),
        Err(HeaderError::TooLong { .. })
    ));
}

#[test]
fn bad_preambles_and_ports_are_rejected() {
    let err = TransportHeader::decode(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_err();
    assert!(matches!(err, HeaderError::BadPreamble { .. }), "{err}");
    // A short prefix that already differs is not "truncated".
    assert!(matches!(
        TransportHeader::decode(b"GET"),
        Err(HeaderError::BadPreamble { .. })
    ));
    let header = |message: &[u8]| {
        let mut b = PREAMBLE.to_vec();
        b.extend_from_slice(&(message.len() as u32).to_be_bytes());
        b.extend_from_slice(message);
        TransportHeader::decode(&b).map(|(h, _)| h)
    };
    // No port (proto3 default 0), port 0, 65536, -1 (10-byte varint).
    for message in [
        &[][..],
        &[0x08, 0x00],
        &[0x08, 0x80, 0x80, 0x04],
        &[
            0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01,
        ],
    ] {
        let err = header(message).unwrap_err();
        assert!(
            matches!(err, HeaderError::BadPort { .. }),
            "{message:?}: {err}"
        );
    }
    // A string field whose length runs past the message.
    assert!(matches!(
        header(&[0x08, 0x50, 0x12, 0x05, b'a']),
        Err(HeaderError::Malformed { .. })
    ));
    // Unknown fields of every wire type are skipped.
    let h = header(&[
        0x08, 0x50, 0x20, 0x07, 0x29, 1, 2, 3, 4, 5, 6, 7, 8, 0x32, 0x01, b'x', 0x3D, 1, 2, 3, 4,
    ])
    .unwrap();
    assert_eq!(h.port, 80);
}

#[tokio::test]
async fn read_takes_one_header_off_a_stream() {
    let mut wire = TransportHeader::new(8080, Some(SessionProtocol::Http1)).encode();
    wire.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
    let mut reader = &wire[..];
    let header = TransportHeader::read(&mut reader).await.unwrap();
    assert_eq!(
        header,
        TransportHeader::new(8080, Some(SessionProtocol::Http1))
    );
    assert_eq!(reader, b"GET / HTTP/1.1\r\n\r\n");

    let short = &wire[..30];
    let err = TransportHeader::read(&mut &short[..]).await.unwrap_err();
    assert!(matches!(err, HeaderError::Truncated { .. }), "{err}");

    let mut oversized = PREAMBLE.to_vec();
    oversized.extend_from_slice(&u32::MAX.to_be_bytes());
    let err = TransportHeader::read(&mut &oversized[..])
        .await
        .unwrap_err();
    assert!(matches!(err, HeaderError::TooLong { .. }), "{err}");
}

/// Field 1000 (ours) after Linkerd's fields: `C0 3E 01`; a header without it, as
/// Linkerd sends, is not TLS.
#[test]
fn the_tls_extension_is_field_1000_and_absent_means_not_tls() {
    let wire = TransportHeader::tls(6379).encode();
    let message = &wire[PREAMBLE.len() + 4..];
    assert_eq!(message, [0x08, 0xEB, 0x31, 0xC0, 0x3E, 0x01]);
    assert!(TransportHeader::decode(&wire).unwrap().0.tls);
    let linkerd = TransportHeader::new(6379, None).encode();
    assert!(!TransportHeader::decode(&linkerd).unwrap().0.tls);
}

proptest! {
    #[test]
    fn round_trip(
        port in 1u16..,
        name in proptest::option::of("[a-z0-9.-]{1,40}"),
        protocol in proptest::option::of(prop_oneof![
            Just(SessionProtocol::Http1),
            Just(SessionProtocol::Http2),
        ]),
        tls in any::<bool>(),
    ) {
        let header = TransportHeader { port, name, protocol, tls };
        let bytes = header.encode();
        prop_assert_eq!(TransportHeader::decode(&bytes).unwrap(), (header, bytes.len()));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = TransportHeader::decode_message(&bytes);
    }
}
