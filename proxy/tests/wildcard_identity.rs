//! A mesh identity is an exact name: an outbound proxy expecting
//! `redis-a.shop.mesh.local` refuses a peer whose (trusted) certificate says
//! `*.shop.mesh.local`, and counts it as `wrong_identity`. The peer here is a bare
//! rustls server, since meshproxy itself will not take a wildcard identity; the
//! certificates are made with rcgen at test time by a CA of the test's own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshproxy::{Config, Proxy, ProxyArgs};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;

#[path = "support/admin.rs"]
mod admin_support;
use admin_support::get_metrics;

const EXPECTED: &str = "redis-a.shop.mesh.local";

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "wildcard test CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A leaf for `san`, with both TLS usages, as the dev CA makes them.
    fn leaf(&self, san: &str) -> (rcgen::Certificate, KeyPair) {
        let mut params = CertificateParams::new(vec![san.to_string()]).unwrap();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert, key)
    }
}

/// A peer proxy impostor: a TLS 1.3 server with `cert` and our ALPN. Reports what it
/// read after the handshake, or `None` if the handshake failed.
async fn peer(
    cert: &rcgen::Certificate,
    key: &KeyPair,
) -> (SocketAddr, oneshot::Receiver<Option<Vec<u8>>>) {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut config = ServerConfig::builder_with_provider(meshproxy::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
    config.alpn_protocols = vec![b"transport.l5d.io/v1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let got = match acceptor.accept(tcp).await {
            Ok(mut tls) => {
                let mut buf = vec![0; 64];
                let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or(0);
                buf.truncate(n);
                Some(buf)
            }
            Err(_) => None,
        };
        let _ = tx.send(got);
    });
    (addr, rx)
}

/// Runs an outbound proxy meshed with the peer at `peer_port` (expected to be
/// `EXPECTED`), sends one connection through it, and returns what the client got
/// back and the proxy's metrics once the connection closed.
async fn through_proxy(dir: &std::path::Path, ca: &Ca, peer_port: u16) -> (Vec<u8>, String) {
    let (cert, key) = ca.leaf("web.shop.mesh.local");
    let write = |name: &str, contents: String| {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    };
    let cert_path = write("web.crt", cert.pem());
    let key_path = write("web.key", key.serialize_pem());
    let anchors = write("ca.crt", ca.cert.pem());
    let peers = write(
        "peers.toml",
        format!("[[peer]]\nnet = \"127.0.0.1\"\nidentity = \"{EXPECTED}\"\n"),
    );
    let args = ProxyArgs {
        inbound_addr: Some("127.0.0.1:0".into()),
        outbound_addr: Some("127.0.0.1:0".into()),
        admin_addr: Some("127.0.0.1:0".into()),
        identity_cert: Some(cert_path.display().to_string()),
        identity_key: Some(key_path.display().to_string()),
        trust_anchors: Some(anchors.display().to_string()),
        mesh_peers: Some(peers.display().to_string()),
        peer_inbound_port: Some(peer_port.to_string()),
        detect_timeout: Some("2s".into()),
        ..ProxyArgs::default()
    };
    let config = Config::from_sources(&args, &HashMap::new(), None).unwrap();
    let proxy = Proxy::bind(config).await.unwrap();
    let addrs = proxy.local_addrs();
    // The application behind the peer: never reached, the peer is the impostor.
    let app = SocketAddr::from(([127, 0, 0, 1], 6379));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy.serve_with(move |_| Ok(app), async {
        let _ = stopped.await;
    }));
    let mut client = TcpStream::connect(addrs.outbound[0]).await.unwrap();
    client.write_all(b"AUTH secret\r\n").await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got)).await;
    drop(client);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let m = get_metrics(addrs.admin).await;
        if m.contains("tcp_close_total{") || std::time::Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    (got, metrics)
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn a_wildcard_certificate_cannot_pass_for_a_mesh_identity() {
    let dir =
        TempDir(std::env::temp_dir().join(format!("meshproxy-wildcard-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let ca = Ca::new();

    // The control: the exact name is accepted, and the peer reads the transport header.
    let (cert, key) = ca.leaf(EXPECTED);
    let (addr, seen) = peer(&cert, &key).await;
    let (_, metrics) = through_proxy(&dir.0, &ca, addr.port()).await;
    let seen = seen.await.unwrap().expect("the exact identity is accepted");
    assert!(
        seen.starts_with(b"transport.l5d.io/v1"),
        "{seen:?}\n{metrics}"
    );

    // The impostor: trusted CA, wildcard SAN covering the expected name.
    let (cert, key) = ca.leaf("*.shop.mesh.local");
    let (addr, seen) = peer(&cert, &key).await;
    let (got, metrics) = through_proxy(&dir.0, &ca, addr.port()).await;
    assert!(got.is_empty(), "the client got {got:?}");
    assert_eq!(
        seen.await.unwrap(),
        None,
        "the impostor completed a handshake and read our bytes"
    );
    let refused =
        "tls_handshake_failures_total{direction=\"outbound\",reason=\"wrong_identity\"} 1\n";
    assert!(metrics.contains(refused), "{metrics}");
}
