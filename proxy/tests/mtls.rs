//! In-process tests of mTLS between two proxies on loopback: an outbound proxy `a`
//! whose mesh peers file points 127.0.0.1 at identity `b`, and an inbound proxy `b`
//! served with the real `SO_ORIGINAL_DST` lookup, so a connection to its inbound port
//! is a direct one exactly as in a pod. Certificates are made at test time by the
//! dev CA helpers (rcgen).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshproxy::{Config, IdentityFiles, ProxyArgs};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

#[path = "support/admin.rs"]
mod admin;
use admin::get_metrics;
#[path = "support/http.rs"]
mod support;
use support::{start, Running};
#[path = "support/pki.rs"]
mod pki;
use pki::Pki;

const A: &str = "a.default.mesh.local";
const B: &str = "b.default.mesh.local";

fn args(identity: &IdentityFiles, tweak: impl FnOnce(&mut ProxyArgs)) -> ProxyArgs {
    let mut args = pki::identity_args(identity);
    tweak(&mut args);
    args
}

/// The inbound proxy `b` and the outbound proxy `a` meshed with it, `a` sending every
/// connection to `app` (through `peer_port`, b's inbound port unless a tap sits
/// between them).
async fn mesh(pki: &Pki, app: SocketAddr, tap: bool) -> (Running, Running, Option<Tap>) {
    let b = start(args(&pki.issue(B), |_| {}), None).await;
    let b_inbound = b.addrs.inbound[0];
    let tap = if tap {
        Some(Tap::start(b_inbound).await)
    } else {
        None
    };
    let peer_port = tap.as_ref().map_or(b_inbound.port(), |t| t.addr.port());
    let peers = pki.peers(B);
    let a_args = args(&pki.issue(A), |a| {
        a.mesh_peers = Some(peers.display().to_string());
        a.peer_inbound_port = Some(peer_port.to_string());
    });
    let a = start(a_args, Some(app)).await;
    (a, b, tap)
}

/// A target that echoes until EOF, then half-closes.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                tokio::io::copy(&mut r, &mut w).await?;
                w.shutdown().await?;
                std::io::Result::Ok(())
            });
        }
    });
    addr
}

/// A TCP relay that records every byte going from the client to the server: what a
/// packet capture between the two pods would see.
struct Tap {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Tap {
    async fn start(upstream: SocketAddr) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            loop {
                let (client, _) = listener.accept().await.unwrap();
                let server = TcpStream::connect(upstream).await.unwrap();
                let record = record.clone();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            let n = cr.read(&mut buf).await?;
                            if n == 0 {
                                return sw.shutdown().await;
                            }
                            record.lock().unwrap().extend_from_slice(&buf[..n]);
                            sw.write_all(&buf[..n]).await?;
                        }
                    };
                    let down = async {
                        tokio::io::copy(&mut sr, &mut cw).await?;
                        cw.shutdown().await
                    };
                    let _: (std::io::Result<()>, std::io::Result<()>) = tokio::join!(up, down);
                });
            }
        });
        Tap { addr, seen }
    }
}

fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split(' ').next()?.parse().ok()
    })
}

/// Polls /metrics until `series` equals `want`.
async fn wait_for_sample(admin: SocketAddr, series: &str, want: f64) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = get_metrics(admin).await;
        if sample(&metrics, series) == Some(want) {
            return metrics;
        }
        if std::time::Instant::now() > deadline {
            panic!("{series} never became {want}; metrics:\n{metrics}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `request`, half-closes, and returns everything that came back.
async fn exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = stream.split();
    let send = async {
        w.write_all(request).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut response = Vec::new();
    let receive = r.read_to_end(&mut response);
    let (_, received) = tokio::join!(send, receive);
    received.unwrap();
    response
}

fn payload(len: usize) -> Vec<u8> {
    // Deterministic but not repetitive, so a shifted or dropped block shows.
    let mut x: u32 = 0x9E37_79B9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn client_config(
    anchors: &Path,
    identity: Option<&IdentityFiles>,
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(anchors).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(meshproxy::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => {
            let chain = CertificateDer::pem_file_iter(&id.cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(&id.key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS client of our own, verifying the server as `server_name`.
async fn tls_connect(
    addr: SocketAddr,
    server_name: &str,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_string()).unwrap();
    TlsConnector::from(config).connect(name, tcp).await
}

/// Reads what the server sends until EOF or error; a refused TLS 1.3 client sees the
/// refusal only here, after its own handshake completed.
async fn drain<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got)).await;
    got
}

#[tokio::test]
async fn meshed_bytes_cross_in_mtls_with_a_transport_header_and_arrive_intact() {
    let pki = Pki::new("e2e");
    let app = echo_server().await;
    let (a, b, tap) = mesh(&pki, app, true).await;
    let tap = tap.unwrap();

    // Opaque: 1 MiB, compared byte for byte after the round trip.
    let data = payload(1 << 20);
    let echoed = exchange(a.addrs.outbound[0], &data).await;
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "bytes changed on the way");
    // HTTP/1: detected by a, proxied request by request over a's pooled HTTP/2
    // connection to b (session protocol HTTP/2), which sends it to the application
    // as HTTP/1. The echo server answers no HTTP, so b answers 502 for it.
    let request = b"GET /x HTTP/1.1\r\nHost: b\r\n\r\n";
    let response = String::from_utf8(exchange(a.addrs.outbound[0], request).await).unwrap();
    assert!(response.starts_with("HTTP/1.1 502 "), "{response}");
    assert!(
        response.contains("upstream protocol error") || response.contains("upstream closed"),
        "{response}"
    );

    // On the wire between the proxies: TLS records only, no header, no payload.
    {
        let seen = tap.seen.lock().unwrap();
        assert!(seen.len() > data.len(), "the tap saw the traffic");
        assert_eq!(seen[0], 0x16, "starts with a TLS handshake record");
        for needle in [&data[..64], &b"transport.l5d.io/v1\r\n"[..], &b"GET /x"[..]] {
            assert!(
                !seen.windows(needle.len()).any(|w| w == needle),
                "plaintext {needle:?} on the wire"
            );
        }
    }

    let out = |p: &str| {
        format!("{{direction=\"outbound\",target_addr=\"{app}\",protocol=\"{p}\",tls=\"true\",server_id=\"{B}\"}}")
    };
    let inb = |p: &str| {
        format!("{{direction=\"inbound\",target_addr=\"{app}\",protocol=\"{p}\",tls=\"true\",client_id=\"{A}\"}}")
    };
    let closed = |l: String| format!("tcp_close_total{}", l.replace('}', ",errno=\"\"}"));
    wait_for_sample(a.addrs.admin, &closed(out("opaque")), 1.0).await;
    let am = wait_for_sample(a.addrs.admin, &closed(out("http1")), 1.0).await;
    wait_for_sample(b.addrs.admin, &closed(inb("opaque")), 1.0).await;
    // The pooled HTTP/2 connection stays open for the next requests.
    let bm = wait_for_sample(
        b.addrs.admin,
        &format!("tcp_open_connections{}", inb("http2")),
        1.0,
    )
    .await;
    for (m, series) in [
        (&am, format!("tcp_read_bytes_total{}", out("opaque"))),
        (&am, format!("tcp_write_bytes_total{}", out("opaque"))),
        (&bm, format!("tcp_read_bytes_total{}", inb("opaque"))),
        (&bm, format!("tcp_write_bytes_total{}", inb("opaque"))),
    ] {
        assert_eq!(sample(m, &series), Some(data.len() as f64), "{series}\n{m}");
    }
    // b did no detection: the header said what the session is.
    assert_eq!(
        sample(&bm, "detect_duration_seconds_count"),
        Some(0.0),
        "{bm}"
    );
    assert!(!bm.contains("tls_handshake_failures_total{"), "{bm}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn destinations_not_listed_stay_plaintext() {
    let pki = Pki::new("unlisted");
    let app = echo_server().await;
    let peers = pki.write(
        "peers.toml",
        "[[peer]]\nnet = \"198.18.0.2/32\"\nidentity = \"web.default.mesh.local\"\n",
    );
    let a = start(
        args(&pki.issue(A), |a| {
            a.mesh_peers = Some(peers.display().to_string())
        }),
        Some(app),
    )
    .await;
    assert_eq!(exchange(a.addrs.outbound[0], b"hello").await, b"hello");
    let l = format!(
        "{{direction=\"outbound\",target_addr=\"{app}\",protocol=\"opaque\",tls=\"false\",errno=\"\"}}"
    );
    wait_for_sample(a.addrs.admin, &format!("tcp_close_total{l}"), 1.0).await;
    a.stop().await;
}

#[tokio::test]
async fn clients_without_a_trusted_certificate_or_the_alpn_are_refused_and_counted() {
    let pki = Pki::new("refused");
    let app = echo_server().await;
    let (a, b, _) = mesh(&pki, app, false).await;
    let inbound = b.addrs.inbound[0];
    let alpn: &[&[u8]] = &[b"transport.l5d.io/v1"];
    let header = meshproxy::TransportHeader::new(app.port(), None).encode();

    // No client certificate.
    let config = client_config(&pki.anchors(), None, alpn);
    if let Ok(mut tls) = tls_connect(inbound, B, config).await {
        let _ = tls.write_all(&header).await;
        let _ = tls.write_all(b"secret").await;
        assert!(drain(&mut tls).await.is_empty(), "nothing reached the app");
    }
    // A certificate from another CA, for a name the mesh would otherwise accept.
    let other = Pki::new("refused-other");
    let config = client_config(&pki.anchors(), Some(&other.issue(A)), alpn);
    if let Ok(mut tls) = tls_connect(inbound, B, config).await {
        let _ = tls.write_all(&header).await;
        let _ = tls.write_all(b"secret").await;
        assert!(drain(&mut tls).await.is_empty(), "nothing reached the app");
    }
    // A trusted certificate, but another ALPN protocol...
    let config = client_config(&pki.anchors(), Some(&pki.issue(A)), &[b"h2"]);
    assert!(
        tls_connect(inbound, B, config).await.is_err(),
        "no common ALPN: the server ends the handshake"
    );
    // ...or none at all on the direct port.
    let config = client_config(&pki.anchors(), Some(&pki.issue(A)), &[]);
    if let Ok(mut tls) = tls_connect(inbound, B, config).await {
        let _ = tls.write_all(&header).await;
        assert!(drain(&mut tls).await.is_empty(), "nothing reached the app");
    }
    // A plaintext client on the direct port gets at most a TLS alert record back.
    let response = exchange(inbound, &header).await;
    assert!(response.is_empty() || response[0] == 0x15, "{response:?}");

    let failures = |reason: &str| {
        format!("tls_handshake_failures_total{{direction=\"inbound\",reason=\"{reason}\"}}")
    };
    wait_for_sample(b.addrs.admin, &failures("no_client_cert"), 1.0).await;
    wait_for_sample(b.addrs.admin, &failures("untrusted"), 1.0).await;
    wait_for_sample(b.addrs.admin, &failures("bad_alpn"), 2.0).await;
    let m = wait_for_sample(b.addrs.admin, &failures("other"), 1.0).await;
    assert!(
        !m.contains("tcp_open_total{"),
        "nothing was forwarded:\n{m}"
    );

    // The real client still gets through.
    assert_eq!(exchange(a.addrs.outbound[0], b"ok").await, b"ok");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn an_outbound_proxy_refuses_a_peer_with_the_wrong_identity() {
    let pki = Pki::new("wrong-id");
    let app = echo_server().await;
    // b presents "b", but a expects someone else at 127.0.0.1.
    let b = start(args(&pki.issue(B), |_| {}), None).await;
    let peers = pki.write(
        "peers.toml",
        "[[peer]]\nnet = \"127.0.0.1\"\nidentity = \"db.default.mesh.local\"\n",
    );
    let a_args = args(&pki.issue(A), |a| {
        a.mesh_peers = Some(peers.display().to_string());
        a.peer_inbound_port = Some(b.addrs.inbound[0].port().to_string());
    });
    let a = start(a_args, Some(app)).await;
    assert!(exchange(a.addrs.outbound[0], b"secret").await.is_empty());
    let series = "tls_handshake_failures_total{direction=\"outbound\",reason=\"wrong_identity\"}";
    wait_for_sample(a.addrs.admin, series, 1.0).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn rotated_certificates_are_used_by_new_connections_only() {
    let pki = Pki::new("rotation");
    let app = echo_server().await;
    let (a, b, _) = mesh(&pki, app, false).await;
    let inbound = b.addrs.inbound[0];
    let alpn: &[&[u8]] = &[b"transport.l5d.io/v1"];
    let a_files = pki.issue(A);
    let presented =
        |tls: &TlsStream<TcpStream>| tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let on_disk = || CertificateDer::from_pem_file(pki.dir.0.join(format!("{B}.crt"))).unwrap();

    // A connection through both proxies, open across the rotation.
    let mut open = TcpStream::connect(a.addrs.outbound[0]).await.unwrap();
    open.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"before");

    let first = tls_connect(
        inbound,
        B,
        client_config(&pki.anchors(), Some(&a_files), alpn),
    )
    .await
    .unwrap();
    let old = on_disk();
    assert_eq!(presented(&first), old);
    drop(first);

    // Rotate b's certificate and key on disk (same identity, new key and serial).
    pki.issue(B);
    let new = on_disk();
    assert_ne!(new, old);
    let second = tls_connect(
        inbound,
        B,
        client_config(&pki.anchors(), Some(&a_files), alpn),
    )
    .await
    .unwrap();
    assert_eq!(
        presented(&second),
        new,
        "a new connection gets the new certificate"
    );
    let serial = |der: &CertificateDer<'_>| {
        webpki::EndEntityCert::try_from(der)
            .unwrap()
            .serial()
            .to_vec()
    };
    assert_ne!(serial(&presented(&second)), serial(&old));
    assert_eq!(meshproxy::identity_of(&presented(&second)).unwrap(), B);
    drop(second);

    // The old connection is untouched, and new ones through a still work.
    open.write_all(b"after!").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after!");
    assert_eq!(exchange(a.addrs.outbound[0], b"new").await, b"new");
    drop(open);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn required_identity_ports_refuse_plaintext_but_take_mtls_for_our_identity() {
    let pki = Pki::new("require");
    let app = echo_server().await;
    let b_args = args(&pki.issue(B), |a| {
        a.require_identity_ports = Some(app.port().to_string());
        a.opaque_ports = Some(app.port().to_string());
    });
    // Redirected to the application's port: the destination is `app`, not b itself.
    let b = start(b_args, Some(app)).await;
    let inbound = b.addrs.inbound[0];

    assert!(exchange(inbound, b"plaintext").await.is_empty());
    let refused = "tcp_refused_total{direction=\"inbound\",reason=\"identity_required\"}";
    wait_for_sample(b.addrs.admin, refused, 1.0).await;

    // A ClientHello with SNI = b's identity is terminated by b and forwarded to app.
    let config = client_config(&pki.anchors(), Some(&pki.issue(A)), &[]);
    let mut tls = tls_connect(inbound, B, config).await.unwrap();
    tls.write_all(b"meshed").await.unwrap();
    tls.shutdown().await.unwrap();
    assert_eq!(drain(&mut tls).await, b"meshed");
    let l = format!(
        "{{direction=\"inbound\",target_addr=\"{app}\",protocol=\"opaque\",tls=\"true\",client_id=\"{A}\",errno=\"\"}}"
    );
    wait_for_sample(b.addrs.admin, &format!("tcp_close_total{l}"), 1.0).await;
    b.stop().await;
}

#[test]
fn half_an_identity_is_a_config_error() {
    let args = ProxyArgs {
        identity_cert: Some("a.crt".into()),
        ..ProxyArgs::default()
    };
    let err = Config::from_sources(&args, &HashMap::new(), None).unwrap_err();
    assert!(err.to_string().contains("--trust-anchors"), "{err}");
    let args = ProxyArgs {
        mesh_peers: Some("peers.toml".into()),
        ..ProxyArgs::default()
    };
    assert!(Config::from_sources(&args, &HashMap::new(), None).is_err());
}

/// A direct client of the inbound port that never sends a ClientHello is closed when
/// `--handshake-timeout` is over (not the detect timeout), and holds an inbound
/// detection permit until then: with `--max-detecting=1` a second one is refused at once.
#[tokio::test(start_paused = true)]
async fn a_silent_direct_client_is_closed_after_the_handshake_timeout() {
    let pki = Pki::new("handshake-timeout");
    let b_args = args(&pki.issue(B), |a| {
        a.detect_timeout = Some("1h".into());
        a.handshake_timeout = Some("3s".into());
        a.max_detecting = Some("1".into());
    });
    let b = start(b_args, None).await;
    let inbound = b.addrs.inbound[0];

    let started = tokio::time::Instant::now();
    let mut silent = TcpStream::connect(inbound).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut second = TcpStream::connect(inbound).await.unwrap();
    assert_eq!(second.read(&mut [0; 1]).await.unwrap_or(0), 0);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );

    assert_eq!(silent.read(&mut [0; 1]).await.unwrap_or(0), 0);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(4),
        "closed after {waited:?}, expected the 3 s handshake timeout"
    );
    let timeout = "tls_handshake_failures_total{direction=\"inbound\",reason=\"timeout\"}";
    wait_for_sample(b.addrs.admin, timeout, 1.0).await;
    let refused = "tcp_refused_total{direction=\"inbound\",reason=\"max_detecting\"}";
    wait_for_sample(b.addrs.admin, refused, 1.0).await;
    b.stop().await;
}

/// A client that speaks TLS itself (inside our mTLS) is `protocol="tls"` on both
/// proxies: the outbound one detected it, and tells the inbound one in the transport
/// header (field 1000), which does not detect again.
#[tokio::test]
async fn both_proxies_label_a_tls_client_tls() {
    let pki = Pki::new("tls-label");
    let app = echo_server().await;
    let (a, b, _) = mesh(&pki, app, false).await;

    // A real ClientHello, from rustls.
    let config = client_config(&pki.anchors(), None, &[]);
    let mut hello = Vec::new();
    rustls::ClientConnection::new(config, ServerName::try_from("app.example").unwrap())
        .unwrap()
        .write_tls(&mut hello)
        .unwrap();
    let echoed = exchange(a.addrs.outbound[0], &hello).await;
    assert_eq!(echoed, hello);

    for (admin, direction, peer) in [
        (a.addrs.admin, "outbound", format!("server_id=\"{B}\"")),
        (b.addrs.admin, "inbound", format!("client_id=\"{A}\"")),
    ] {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let metrics = get_metrics(admin).await;
            let opened: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("tcp_open_total{") && l.contains(&peer))
                .collect();
            if !opened.is_empty() {
                assert_eq!(opened.len(), 1, "{metrics}");
                let line = opened[0];
                assert!(
                    line.contains(&format!("direction=\"{direction}\"")),
                    "{line}"
                );
                assert!(line.contains("protocol=\"tls\",tls=\"true\""), "{line}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{metrics}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    a.stop().await;
    b.stop().await;
}
