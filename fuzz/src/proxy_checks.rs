//! What must hold for any input to meshproxy's parsers and checks.
//!
//! One function per fuzz target. The same file is compiled into
//! `proxy/tests/fuzz_corpus.rs` (by `#[path]`), which replays every file of
//! `fuzz/corpus/<target>/` through these functions, so CI checks the corpora
//! with the fuzz targets' own assertions and without cargo-fuzz. That is why
//! it uses only crates meshproxy itself depends on.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use meshproxy::fuzzing::classify;
use meshproxy::{
    check_identity_name, detect, Config, Detected, MeshPeers, PortSet, ProxyArgs, SessionProtocol,
    TransportHeader, MAX_PREFIX,
};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::runtime::Runtime;

/// The runtime the async parsers run on: current-thread, built once per process.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime")
}

/// An in-memory client that hands out at most `chunk` bytes per read, then EOF.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.data.len().min(self.chunk).min(buf.remaining());
        let (head, tail) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = tail;
        Poll::Ready(Ok(()))
    }
}

/// `ports` (proxy side): meshproxy's own port list (`--opaque-ports`) prints what
/// parses back to the same set.
pub fn proxy_ports(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(set) = text.parse::<PortSet>() else {
        return;
    };
    let shown = set.to_string();
    assert_eq!(
        shown.parse::<PortSet>().as_ref(),
        Ok(&set),
        "{text:?} printed as {shown:?}"
    );
    assert!(!set.contains(0), "{text:?}");
}

/// `detect`: on any first bytes, delivered in any chunking, detection ends, keeps
/// at most [`MAX_PREFIX`] bytes, replays exactly the bytes it consumed, and reaches
/// the same verdict as when the bytes arrive in one read.
///
/// The first input byte is the chunk size of the first run (0: unbounded); the
/// rest is what the client sends.
pub fn detect_bytes(rt: &Runtime, data: &[u8]) {
    let Some((&chunk, sent)) = data.split_first() else {
        return;
    };
    let run = |chunk: usize| {
        rt.block_on(async {
            let mut client = Chunked { data: sent, chunk };
            detect(&mut client, Duration::from_secs(3600)).await
        })
        .expect("an in-memory reader does not fail")
    };
    let chunk = if chunk == 0 {
        usize::MAX
    } else {
        usize::from(chunk)
    };
    let chunked = run(chunk);
    let whole = run(usize::MAX);
    for detection in [&chunked, &whole] {
        let prefix = &detection.prefix;
        assert!(prefix.len() <= MAX_PREFIX);
        assert_eq!(
            &sent[..prefix.len()],
            &prefix[..],
            "the replayed prefix is what was read"
        );
        match &detection.detected {
            Detected::Eof => assert!(sent.is_empty()),
            Detected::Timeout => panic!("an in-memory client never stalls"),
            detected => {
                assert!(!prefix.is_empty());
                // Stopped early: the prefix alone was decisive.
                let stopped_early = prefix.len() < sent.len() && prefix.len() < MAX_PREFIX;
                if stopped_early {
                    assert_eq!(classify(prefix, false).as_ref(), Some(detected));
                }
            }
        }
        if let Detected::Tls(hello) = &detection.detected {
            check_hello(hello, prefix.len());
        }
    }
    assert_eq!(
        chunked.detected, whole.detected,
        "the verdict does not depend on chunking"
    );
}

fn check_hello(hello: &meshproxy::ClientHello, input_len: usize) {
    if let Some(sni) = &hello.sni {
        assert!(
            !sni.is_empty() && sni.is_ascii() && sni.len() <= input_len,
            "{sni:?}"
        );
    }
    let alpn_bytes: usize = hello.alpn.iter().map(Vec::len).sum();
    assert!(alpn_bytes <= input_len);
    assert!(
        hello.alpn.iter().all(|p| !p.is_empty() && p.len() <= 255),
        "{:?}",
        hello.alpn
    );
}

/// `client_hello`: the ClientHello parser (through the classifier) on any record.
///
/// The first byte selects the mode: bit 0 set, the rest is classified as is;
/// clear, the rest is wrapped in a TLS handshake record header with the right
/// length, so mutations go into the ClientHello itself. Bit 1 is `full`.
pub fn client_hello(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let buf = if mode & 1 == 1 {
        rest.to_vec()
    } else {
        let len = u16::try_from(rest.len()).unwrap_or(u16::MAX);
        let mut record = vec![22, 3, 1];
        record.extend_from_slice(&len.to_be_bytes());
        record.extend_from_slice(rest);
        record
    };
    let full = mode & 2 == 2;
    let verdict = classify(&buf, full);
    if full || buf.len() >= MAX_PREFIX {
        assert!(verdict.is_some(), "a full buffer is always decisive");
    }
    if let Some(detected) = &verdict {
        // Decisive without `full` stays so with it.
        if !full {
            assert_eq!(classify(&buf, true).as_ref(), Some(detected));
        }
        if let Detected::Tls(hello) = detected {
            check_hello(hello, buf.len());
        }
    }
}

/// `transport_header`: decoding any bytes ends in a header or an error; a decoded
/// header re-encodes to bytes that decode to it; the async reader agrees with
/// the slice decoder; and every header we can build round-trips.
pub fn transport_header(rt: &Runtime, data: &[u8]) {
    let decoded = TransportHeader::decode(data);
    let read = rt.block_on(async {
        let mut io = data;
        TransportHeader::read(&mut io).await
    });
    match (&decoded, &read) {
        (Ok((header, used)), Ok(again)) => {
            assert!(*used <= data.len());
            assert_ne!(header.port, 0);
            assert_eq!(header, again, "read and decode agree");
            assert_eq!(
                TransportHeader::decode(&header.encode()).unwrap().0,
                *header
            );
        }
        (Err(_), Err(_)) => {}
        (decoded, read) => panic!("decode gave {decoded:?} but read gave {read:?}"),
    }

    // Build a header from the input: port, protocol, optional name.
    if data.len() >= 3 {
        let port = u16::from_be_bytes([data[0], data[1]]).max(1);
        let protocol = match data[2] % 3 {
            0 => None,
            1 => Some(SessionProtocol::Http1),
            _ => Some(SessionProtocol::Http2),
        };
        let mut header = TransportHeader::new(port, protocol);
        let name = String::from_utf8_lossy(&data[3..]);
        header.name = (!name.is_empty()).then(|| name.into_owned());
        let wire = header.encode();
        assert_eq!(
            TransportHeader::decode(&wire).unwrap(),
            (header.clone(), wire.len())
        );
        // Application bytes after the header are left alone.
        let mut more = wire.clone();
        more.extend_from_slice(data);
        assert_eq!(
            TransportHeader::decode(&more).unwrap(),
            (header, wire.len())
        );
    }
}

/// `proxy_config`: any TOML text is a configuration or an error naming what is
/// wrong, both as the `--config` file and as the `--mesh-peers` file. Text after
/// a NUL byte is the environment, one `KEY=VALUE` per line.
pub fn proxy_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (toml, env_text) = text.split_once('\0').unwrap_or((text, ""));
    let env: HashMap<String, String> = env_text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Ok(config) = Config::from_sources(&ProxyArgs::default(), &env, Some(toml)) {
        assert!(!config.inbound_addrs.is_empty() && !config.outbound_addrs.is_empty());
        assert!(config.max_connections >= 1 && config.max_detecting >= 1);
        // A runtime of 0 workers (or thousands) must be refused, never built.
        assert!((1..=256).contains(&config.cores), "{}", config.cores);
        // Every duration is in its documented range: above zero, at most a day.
        for d in [
            config.detect_timeout,
            config.shutdown_grace,
            config.handshake_timeout,
        ] {
            assert!(!d.is_zero() && d <= Duration::from_secs(86_400), "{d:?}");
        }
        assert_ne!(config.peer_inbound_port, 0);
        for ports in [&config.inbound_opaque_ports, &config.outbound_opaque_ports] {
            assert_eq!(ports.to_string().parse::<PortSet>().as_ref(), Ok(ports));
        }
    }
    if let Ok(peers) = MeshPeers::parse(Path::new("mesh-peers.toml"), toml) {
        for ip in ["198.18.0.2", "10.0.0.1", "fd00::2", "::ffff:198.18.0.2"] {
            let _ = peers.identity(ip.parse().unwrap());
        }
    }
}

/// `identity_name`: meshproxy's identity name check (`meshproxy identity issue`, and
/// which certificate SANs are identities) accepts exactly the DNS host names of at
/// most 253 characters, never a wildcard, and what it accepts is a plain file name;
/// a refusal names the input.
pub fn identity_name(data: &[u8]) {
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    let verdict = check_identity_name(name);
    assert_eq!(verdict.is_ok(), is_host_name(name), "{name:?}: {verdict:?}");
    match verdict {
        Ok(()) => {
            assert!(!name.contains(['*', '/', '\0']), "{name:?}");
            // `issue` writes NAME.crt and NAME.key into --out: one plain component.
            for ext in ["crt", "key"] {
                let file = format!("{name}.{ext}");
                let parts: Vec<_> = Path::new(&file).components().collect();
                assert!(
                    matches!(parts.as_slice(), [std::path::Component::Normal(p)] if *p == file.as_str()),
                    "{file:?} is not a plain file name"
                );
            }
            // Case does not matter; a wildcard over it is never an identity.
            assert!(check_identity_name(&name.to_ascii_uppercase()).is_ok());
            assert!(check_identity_name(&name.to_ascii_lowercase()).is_ok());
            assert!(check_identity_name(&format!("*.{name}")).is_err());
        }
        Err(error) => {
            assert_eq!(error.name, name);
            let message = error.to_string();
            assert!(message.contains(&format!("{name:?}")), "{message}");
        }
    }
}

/// The oracle: RFC 1123 host names, written independently of meshproxy's check
/// (bytes and indices rather than labels and chars).
fn is_host_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() > 253 {
        return false;
    }
    let mut start = 0;
    let mut last_all_digits = false;
    for end in (0..=bytes.len()).filter(|&i| i == bytes.len() || bytes[i] == b'.') {
        let label = &bytes[start..end];
        let ok = (1..=63).contains(&label.len())
            && label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            && label[0] != b'-'
            && label[label.len() - 1] != b'-';
        if !ok {
            return false;
        }
        last_all_digits = label.iter().all(u8::is_ascii_digit);
        start = end + 1;
    }
    !last_all_digits
}
