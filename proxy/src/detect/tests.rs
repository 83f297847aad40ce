use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::*;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `detect` on a stream whose writer sends `chunks` one by one, a millisecond
/// apart, then either closes (`close`) or stays silent. Returns what detection saw and
/// how long it took on the (paused) clock.
async fn detect_chunks(chunks: Vec<Vec<u8>>, close: bool) -> (Detection, Duration) {
    let (mut client, mut server) = tokio::io::duplex(64 * 1024);
    let writer = tokio::spawn(async move {
        for chunk in chunks {
            client.write_all(&chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if close {
            drop(client);
        } else {
            // Stay connected and silent for longer than any timeout.
            tokio::time::sleep(TIMEOUT * 10).await;
            drop(client);
        }
    });
    let start = Instant::now();
    let detection = detect(&mut server, TIMEOUT).await.unwrap();
    let elapsed = start.elapsed();
    writer.abort();
    (detection, elapsed)
}

fn bytewise(data: &[u8]) -> Vec<Vec<u8>> {
    data.iter().map(|&b| vec![b]).collect()
}

/// A ClientHello record as a TLS 1.3 client sends it, built field by field.
/// `pad` adds a padding extension after SNI and ALPN.
fn client_hello(sni: Option<&str>, alpn: &[&[u8]], pad: usize) -> Vec<u8> {
    fn u16be(n: usize) -> [u8; 2] {
        (n as u16).to_be_bytes()
    }
    fn ext(out: &mut Vec<u8>, ext_type: u16, data: &[u8]) {
        out.extend_from_slice(&ext_type.to_be_bytes());
        out.extend_from_slice(&u16be(data.len()));
        out.extend_from_slice(data);
    }
    let mut exts = Vec::new();
    // supported_versions: TLS 1.3 and 1.2, before the ones we parse.
    ext(&mut exts, 43, &[4, 3, 4, 3, 3]);
    if let Some(name) = sni {
        let mut entry = vec![0];
        entry.extend_from_slice(&u16be(name.len()));
        entry.extend_from_slice(name.as_bytes());
        let mut data = u16be(entry.len()).to_vec();
        data.extend_from_slice(&entry);
        ext(&mut exts, 0, &data);
    }
    if !alpn.is_empty() {
        let mut list = Vec::new();
        for p in alpn {
            list.push(p.len() as u8);
            list.extend_from_slice(p);
        }
        let mut data = u16be(list.len()).to_vec();
        data.extend_from_slice(&list);
        ext(&mut exts, 16, &data);
    }
    // key_share with an x25519 share.
    let mut share = vec![0, 36, 0, 29, 0, 32];
    share.extend_from_slice(&[0x42; 32]);
    ext(&mut exts, 51, &share);
    if pad > 0 {
        ext(&mut exts, 21, &vec![0; pad]);
    }

    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x17; 32]); // random
    body.push(32);
    body.extend_from_slice(&[0x5e; 32]); // legacy session id
    body.extend_from_slice(&[0, 6, 0x13, 0x01, 0x13, 0x02, 0xc0, 0x2f]);
    body.extend_from_slice(&[1, 0]); // compression: null
    body.extend_from_slice(&u16be(exts.len()));
    body.extend_from_slice(&exts);

    let mut handshake = vec![1];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);

    let mut record = vec![22, 3, 1];
    record.extend_from_slice(&u16be(handshake.len()));
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test(start_paused = true)]
async fn http1_request_line_read_byte_by_byte() {
    let request = b"GET /index.html HTTP/1.1\r\nHost: example\r\n\r\n";
    let (d, elapsed) = detect_chunks(bytewise(request), false).await;
    assert_eq!(d.detected, Detected::Http1);
    // Detection stops right after the request line: the client is not kept waiting,
    // and the rest of the request stays in the socket for the copy.
    assert_eq!(d.prefix, b"GET /index.html HTTP/1.1\r\n");
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
}

#[tokio::test(start_paused = true)]
async fn http2_preface_read_byte_by_byte() {
    let mut data = H2_PREFACE.to_vec();
    data.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // an empty SETTINGS frame
    let (d, elapsed) = detect_chunks(bytewise(&data), false).await;
    assert_eq!(d.detected, Detected::Http2);
    assert_eq!(d.prefix, H2_PREFACE);
    assert!(elapsed < Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn tls_client_hello_gives_sni_and_alpn() {
    let hello = client_hello(Some("api.example.com"), &[b"h2", b"http/1.1"], 0);
    let (d, _) = detect_chunks(bytewise(&hello), false).await;
    assert_eq!(
        d.detected,
        Detected::Tls(ClientHello {
            sni: Some("api.example.com".into()),
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        })
    );
    assert_eq!(d.prefix, hello, "the whole record is replayed");
}

#[tokio::test(start_paused = true)]
async fn tls_client_hello_written_by_rustls() {
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"transport.l5d.io/v1".to_vec(), b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("payments.example.com").unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }

    let chunks = hello.chunks(100).map(<[u8]>::to_vec).collect();
    let (d, _) = detect_chunks(chunks, false).await;
    assert_eq!(
        d.detected,
        Detected::Tls(ClientHello {
            sni: Some("payments.example.com".into()),
            alpn: vec![b"transport.l5d.io/v1".to_vec(), b"h2".to_vec()],
        })
    );
    assert_eq!(d.prefix, hello);
}

#[tokio::test(start_paused = true)]
async fn tls_without_sni_or_alpn() {
    let hello = client_hello(None, &[], 0);
    let (d, _) = detect_chunks(vec![hello.clone()], false).await;
    assert_eq!(d.detected, Detected::Tls(ClientHello::default()));
    assert_eq!(d.prefix, hello);
}

#[tokio::test(start_paused = true)]
async fn tls_client_hello_larger_than_the_buffer_keeps_early_sni() {
    // A post-quantum-sized ClientHello does not fit in MAX_PREFIX: detection stops at
    // the buffer limit, still says TLS, and keeps the SNI that came before the cut.
    let hello = client_hello(Some("big.example"), &[b"h2"], 12_000);
    assert!(hello.len() > MAX_PREFIX);
    let (d, _) = detect_chunks(vec![hello.clone()], false).await;
    assert_eq!(
        d.detected,
        Detected::Tls(ClientHello {
            sni: Some("big.example".into()),
            alpn: vec![b"h2".to_vec()],
        })
    );
    assert_eq!(d.prefix, &hello[..MAX_PREFIX]);
}

#[tokio::test(start_paused = true)]
async fn malformed_client_hello_is_opaque() {
    let mut hello = client_hello(Some("x.example"), &[], 0);
    // The cipher-suite length (after 5 + 4 + 2 + 32 + 1 + 32 bytes) becomes odd.
    hello[5 + 4 + 2 + 32 + 1 + 32 + 1] = 5;
    let (d, _) = detect_chunks(vec![hello], false).await;
    assert_eq!(d.detected, Detected::Opaque);
}

#[tokio::test(start_paused = true)]
async fn other_bytes_are_opaque_at_once() {
    let (d, elapsed) = detect_chunks(vec![b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()], false).await;
    assert_eq!(d.detected, Detected::Opaque);
    assert_eq!(d.prefix, b"SSH-2.0-OpenSSH_9.6\r\n");
    assert!(elapsed < Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn ambiguous_prefix_times_out_and_fails_open() {
    let (d, elapsed) = detect_chunks(bytewise(b"GET / HT"), false).await;
    assert_eq!(d.detected, Detected::Timeout);
    assert_eq!(d.detected.protocol(), Protocol::Opaque);
    assert_eq!(
        d.prefix, b"GET / HT",
        "bytes read before the timeout are kept"
    );
    assert_eq!(elapsed, TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn silent_client_times_out_with_nothing_to_replay() {
    let (d, elapsed) = detect_chunks(vec![], false).await;
    assert_eq!(d.detected, Detected::Timeout);
    assert!(d.prefix.is_empty());
    assert_eq!(elapsed, TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn close_before_any_byte_is_eof() {
    let (d, elapsed) = detect_chunks(vec![], true).await;
    assert_eq!(d.detected, Detected::Eof);
    assert_eq!(d.detected.result_label(), "eof");
    assert!(d.prefix.is_empty());
    assert!(elapsed < Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn close_after_an_ambiguous_prefix_is_opaque() {
    let (d, _) = detect_chunks(bytewise(b"PRI * HTTP/2"), true).await;
    assert_eq!(d.detected, Detected::Opaque);
    assert_eq!(d.prefix, b"PRI * HTTP/2");
}

#[tokio::test(start_paused = true)]
async fn a_full_buffer_without_a_verdict_is_opaque() {
    // One endless request-target: could still become a request line, until the buffer
    // is full.
    let mut data = b"GET /".to_vec();
    data.resize(MAX_PREFIX + 100, b'a');
    let (d, _) = detect_chunks(vec![data], false).await;
    assert_eq!(d.detected, Detected::Opaque);
    assert_eq!(d.prefix.len(), MAX_PREFIX);
}

/// A client that sends 64 bytes of one letter and waits for an answer: no method is
/// that long, so it is opaque at once, not after the detect timeout.
#[tokio::test(start_paused = true)]
async fn a_token_longer_than_any_method_is_opaque_at_once() {
    let (d, elapsed) = detect_chunks(vec![vec![b'a'; 64]], false).await;
    assert_eq!(d.detected, Detected::Opaque);
    assert_eq!(d.prefix, vec![b'a'; 64]);
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");

    // Byte by byte, detection stops at the first byte no method can have.
    let (d, elapsed) = detect_chunks(bytewise(&[b'Z'; 64]), false).await;
    assert_eq!(d.detected, Detected::Opaque);
    assert_eq!(d.prefix.len(), MAX_METHOD + 1);
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
}

#[test]
fn the_longest_registered_method_is_still_http1() {
    assert_eq!(
        classify(b"UPDATEREDIRECTREF /r HTTP/1.1\r\n", false),
        Some(Detected::Http1)
    );
    assert_eq!(classify(b"UPDATEREDIRECTREF", false), None, "may go on");
    assert_eq!(
        classify(b"UPDATEREDIRECTREFS", false),
        Some(Detected::Opaque)
    );
}

/// First bytes that begin neither a request line, a TLS record nor the HTTP/2 preface
/// are decisive on their own, whatever may follow.
#[test]
fn bytes_that_start_no_protocol_are_decisive_at_once() {
    for first in [
        &b"\x00"[..],
        b"\x16\x02",                 // a handshake record of SSL 2 or older
        b"\x16\x03\x05",             // TLS with a minor version that does not exist
        b"\x16\x03\x01\x00\x02",     // a record too short for a handshake header
        b"\x16\x03\x01\x00\x40\x02", // a handshake that is not a ClientHello
        b"PRI * HTTP/2.1",           // neither the preface nor a request line
        b"GET\r",
        b" GET",
    ] {
        assert_eq!(classify(first, false), Some(Detected::Opaque), "{first:?}");
    }
}

#[test]
fn request_lines() {
    let http1 = Some(Detected::Http1);
    assert_eq!(classify(b"OPTIONS * HTTP/1.0\r\n", false), http1);
    assert_eq!(classify(b"get / HTTP/1.1\n", false), http1);
    assert_eq!(
        classify(b"CONNECT example.com:443 HTTP/1.1\r\n", false),
        http1
    );
    let opaque = Some(Detected::Opaque);
    assert_eq!(classify(b"GET  / HTTP/1.1\r\n", false), opaque);
    assert_eq!(classify(b"GET / HTTP/2.0\r\n", false), opaque);
    assert_eq!(classify(b"GET / HTTP/1.1 \r\n", false), opaque);
    assert_eq!(classify(b"GET /\r\n", false), opaque);
    assert_eq!(classify(b"G(T / HTTP/1.1\r\n", false), opaque);
    assert_eq!(classify(b"GET / HTTP/1.1\r", false), None);
    assert_eq!(classify(b"", false), None);
}

proptest::proptest! {
    /// Once a prefix is decisive, more bytes never change the verdict, so stopping
    /// early (as `detect` does) gives the same answer as reading everything.
    #[test]
    fn a_decisive_prefix_stays_decisive(
        kind in 0usize..5,
        tail in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
        cut in 0usize..400,
    ) {
        let mut data = match kind {
            0 => b"POST /api HTTP/1.1\r\n".to_vec(),
            1 => H2_PREFACE.to_vec(),
            2 => client_hello(Some("p.example"), &[b"h2"], 0),
            3 => b"\x00\x01binary".to_vec(),
            _ => Vec::new(),
        };
        data.extend_from_slice(&tail);
        let cut = cut.min(data.len());
        if let Some(early) = classify(&data[..cut], false) {
            proptest::prop_assert_eq!(classify(&data, false), Some(early));
        }
    }
}
