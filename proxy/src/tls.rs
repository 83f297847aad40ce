//! The TLS policy of the mesh, in one place: which crypto provider, which versions,
//! how peers are verified, and how handshake failures are named.
//!
//! - Provider: aws-lc-rs, passed explicitly to every config builder
//!   (`builder_with_provider`) rather than installed process-wide, so the library
//!   never depends on what else in the process installed a default.
//! - TLS 1.3 only: both ends are our proxies, so there is no legacy client to serve,
//!   and 1.3 encrypts the certificates (the pods' identities) on the wire.
//! - Server side: a client certificate chaining to the trust anchors is required
//!   (`WebPkiClientVerifier`); ALPN `transport.l5d.io/v1` is offered.
//! - Client side: the server certificate must chain to the trust anchors
//!   (`WebPkiServerVerifier`) and carry the expected identity *exactly* as one of its
//!   DNS SANs (`ExactIdentity`); our own certificate is presented.
//!
//! Identities are exact DNS names (see `identity::name`). webpki, like every web PKI
//! client, lets a `*.shop.mesh.local` SAN match `redis-a.shop.mesh.local`; in a mesh
//! that would let whoever holds one wildcard certificate impersonate every workload
//! under it, so the name check is redone here without wildcard matching (ASCII case
//! is still ignored, as DNS does).
//!
//! An identity is the first DNS SAN of a certificate that is an exact DNS name.

use std::io;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore,
    ServerConfig, SignatureScheme,
};

use crate::identity::{check_name, same_name};
use crate::metrics::Label;
use crate::transport_header;

/// Why TLS configs could not be built from a certificate, key and trust anchors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the trust anchors hold no usable CA certificate")]
    NoTrustAnchors,
    #[error("trust anchor certificate #{index} is not usable: {source}")]
    BadTrustAnchor { index: usize, source: rustls::Error },
    #[error("the certificate has no DNS subject alternative name that is an exact DNS name (the identity; wildcards are not identities)")]
    NoIdentity,
    #[error("the certificate cannot be parsed: {0}")]
    BadCertificate(webpki::Error),
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("the identity key is not ECDSA P-256: mesh identities are ECDSA P-256 leaves (meshproxy identity issue makes them)")]
    NotP256,
    #[error("the certificate and key cannot be used (is the key the certificate's?): {0}")]
    Rustls(#[from] rustls::Error),
}

/// The one crypto provider of the proxy: aws-lc-rs, with the TLS 1.3 cipher suites
/// in the order we prefer.
///
/// AES-128-GCM-SHA256 comes first (rustls' default puts AES-256-GCM-SHA384 first):
/// every byte between two pods is encrypted once and decrypted once, and AES-128 has
/// 10 rounds to AES-256's 14; each handshake's key schedule (a few dozen HMACs, resumed
/// or not) runs on SHA-256, which x86 and ARM CPUs have instructions for, rather than
/// on SHA-384. Both are TLS 1.3's mandatory-to-implement strength; the other suites
/// stay offered and accepted, and a server follows the client's order, so a peer
/// running an older build still agrees on one.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// Both ends of our mTLS for one certificate: the config we accept with (inbound) and
/// the one we connect with (outbound).
pub(crate) struct Configs {
    pub(crate) server: Arc<ServerConfig>,
    pub(crate) client: Arc<ClientConfig>,
}

/// Builds the server and client configs for `chain` (leaf first) and `key`, verifying
/// peers against `anchors`.
pub(crate) fn configs(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    anchors: Vec<CertificateDer<'static>>,
) -> Result<Configs, TlsError> {
    let provider = provider();
    // Identities are ECDSA P-256 leaves (DESIGN.md): small certificates and fast
    // handshakes on every hop. A key that cannot sign ECDSA P-256 SHA-256 is refused
    // here, before it is offered to any peer. (rustls then checks that the key belongs
    // to the certificate.)
    let signing = provider.key_provider.load_private_key(key.clone_key())?;
    if signing
        .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
        .is_none()
    {
        return Err(TlsError::NotP256);
    }
    let mut roots = RootCertStore::empty();
    for (index, anchor) in anchors.into_iter().enumerate() {
        roots
            .add(anchor)
            .map_err(|source| TlsError::BadTrustAnchor { index, source })?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoTrustAnchors);
    }
    let roots = Arc::new(roots);

    // Requires a client certificate: `allow_unauthenticated` is deliberately not set.
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())?;
    server.alpn_protocols = vec![transport_header::ALPN.to_vec()];

    let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone()).build()?;
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        // "dangerous" only in that rustls cannot vouch for a custom verifier: this one
        // runs webpki's full verification first and only adds a stricter name check.
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ExactIdentity { webpki }))
        .with_client_auth_cert(chain, key)?;
    client.alpn_protocols = vec![transport_header::ALPN.to_vec()];

    Ok(Configs {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

/// The identity a certificate carries: its first DNS SAN that is an exact DNS name
/// (wildcard SANs are skipped).
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    let cert = webpki::EndEntityCert::try_from(cert).map_err(TlsError::BadCertificate)?;
    let name = cert
        .valid_dns_names()
        .find(|san| check_name(san).is_ok())
        .ok_or(TlsError::NoIdentity)?;
    Ok(name.to_string())
}

/// Whether `cert` carries `expected` exactly (ASCII case aside) as a DNS SAN. A
/// wildcard SAN never matches.
fn has_exact_identity(cert: &CertificateDer<'_>, expected: &str) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let found = cert
        .valid_dns_names()
        .any(|san| check_name(san).is_ok() && same_name(san, expected));
    found
}

/// The server verifier of our outbound mTLS: webpki's (chain to the trust anchors,
/// validity, key usage, and its own name check), then the expected identity must be
/// one of the certificate's DNS SANs exactly.
#[derive(Debug)]
struct ExactIdentity {
    webpki: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ExactIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let exact = match server_name {
            ServerName::DnsName(expected) => has_exact_identity(end_entity, expected.as_ref()),
            // Identities are DNS names; we never connect expecting an IP address.
            _ => false,
        };
        if !exact {
            // Named like webpki's own mismatch, so it is counted as `wrong_identity`.
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Why a handshake failed, as the `reason` label of `tls_handshake_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// The client presented no certificate (inbound), or the server said it required
    /// one (outbound).
    NoClientCert,
    /// The peer's certificate does not chain to our trust anchors, or ours not to
    /// theirs.
    Untrusted,
    /// The server's certificate is trusted but is not the identity we expected there.
    WrongIdentity,
    /// No common ALPN protocol, or a direct connection without `transport.l5d.io/v1`.
    BadAlpn,
    /// The handshake (and transport header) did not finish within the detect timeout.
    Timeout,
    /// Anything else: a reset, a non-TLS client, a malformed transport header.
    Other,
}

/// The `reason` label of `tls_handshake_failures_total`.
impl Label for HandshakeFailure {
    fn label(&self) -> &'static str {
        self.as_str()
    }
}

impl HandshakeFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::NoClientCert => "no_client_cert",
            HandshakeFailure::Untrusted => "untrusted",
            HandshakeFailure::WrongIdentity => "wrong_identity",
            HandshakeFailure::BadAlpn => "bad_alpn",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Other => "other",
        }
    }

    /// Classifies the error of a tokio-rustls handshake, which wraps the rustls error
    /// in an `io::Error`.
    pub fn of(error: &io::Error) -> HandshakeFailure {
        let Some(error) = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return HandshakeFailure::Other;
        };
        match error {
            rustls::Error::NoCertificatesPresented
            | rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
                HandshakeFailure::NoClientCert
            }
            rustls::Error::NoApplicationProtocol
            | rustls::Error::AlertReceived(AlertDescription::NoApplicationProtocol) => {
                HandshakeFailure::BadAlpn
            }
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => HandshakeFailure::WrongIdentity,
            rustls::Error::InvalidCertificate(_)
            | rustls::Error::AlertReceived(
                AlertDescription::UnknownCA
                | AlertDescription::BadCertificate
                | AlertDescription::CertificateUnknown,
            ) => HandshakeFailure::Untrusted,
            _ => HandshakeFailure::Other,
        }
    }
}

/// Certificates made in memory for tests: a CA and leaves it issued.
#[cfg(test)]
pub(crate) mod testing {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    };
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    use super::{configs, Configs};

    /// For each of `names`, the configs of an ECDSA P-256 leaf for that identity, all
    /// issued by one new CA, which is their only trust anchor.
    pub(crate) fn mesh(names: &[&str]) -> Vec<Configs> {
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ca = ca.self_signed(&ca_key).unwrap();
        names
            .iter()
            .map(|name| {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
                let mut leaf = CertificateParams::new(vec![name.to_string()]).unwrap();
                leaf.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
                let cert = leaf.signed_by(&key, &ca, &ca_key).unwrap();
                let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
                configs(vec![cert.der().clone()], key, vec![ca.der().clone()]).unwrap()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384};
    use rustls::pki_types::PrivatePkcs8KeyDer;
    use rustls::{ClientConnection, HandshakeKind, ServerConnection};

    use super::*;

    /// One handshake in memory, `client` connecting to the identity `server_id`.
    fn handshake(
        client: &Arc<ClientConfig>,
        server: &Arc<ServerConfig>,
        server_id: &str,
    ) -> (ClientConnection, ServerConnection) {
        let name = ServerName::try_from(server_id.to_string()).unwrap();
        let mut c = ClientConnection::new(client.clone(), name).unwrap();
        let mut s = ServerConnection::new(server.clone()).unwrap();
        let mut wire = Vec::new();
        for _ in 0..10 {
            if !c.is_handshaking() && !s.is_handshaking() && !s.wants_write() {
                break;
            }
            wire.clear();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            s.read_tls(&mut wire.as_slice()).unwrap();
            s.process_new_packets().unwrap();
            wire.clear();
            while s.wants_write() {
                s.write_tls(&mut wire).unwrap();
            }
            c.read_tls(&mut wire.as_slice()).unwrap();
            c.process_new_packets().unwrap();
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        (c, s)
    }

    #[test]
    fn a_second_connection_with_the_same_configs_resumes_with_aes_128() {
        let mut mesh = testing::mesh(&["a.test.mesh.local", "b.test.mesh.local"]);
        let b = mesh.pop().unwrap();
        let a = mesh.pop().unwrap();
        let (c, s) = handshake(&a.client, &b.server, "b.test.mesh.local");
        assert_eq!(c.handshake_kind(), Some(HandshakeKind::Full));
        assert_eq!(s.handshake_kind(), Some(HandshakeKind::Full));
        // The tickets of the first session are in the client config's store: the next
        // connection resumes (no certificates, no signatures on either side).
        for _ in 0..3 {
            let (c, s) = handshake(&a.client, &b.server, "b.test.mesh.local");
            assert_eq!(c.handshake_kind(), Some(HandshakeKind::Resumed));
            assert_eq!(s.handshake_kind(), Some(HandshakeKind::Resumed));
            let suite = c.negotiated_cipher_suite().unwrap().suite();
            assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
            assert!(
                s.peer_certificates().is_some(),
                "the client's identity is kept"
            );
        }
    }

    /// A self-signed certificate for `name` with a key of `alg`, used as its own anchor.
    fn self_signed(
        alg: &'static rcgen::SignatureAlgorithm,
    ) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate_for(alg).unwrap();
        let params = CertificateParams::new(vec!["a.test.mesh.local".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let der = PrivatePkcs8KeyDer::from(key.serialize_der());
        (cert.der().clone(), PrivateKeyDer::Pkcs8(der))
    }

    fn with_sans(sans: &[&str]) -> CertificateDer<'static> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let params = CertificateParams::new(sans).unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn identities_are_exact_dns_sans_never_wildcards() {
        let wildcard = with_sans(&["*.shop.mesh.local"]);
        assert!(!has_exact_identity(&wildcard, "redis-a.shop.mesh.local"));
        assert!(!has_exact_identity(&wildcard, "*.shop.mesh.local"));
        assert!(matches!(identity_of(&wildcard), Err(TlsError::NoIdentity)));
        let exact = with_sans(&["*.shop.mesh.local", "Redis-A.shop.mesh.local"]);
        assert!(has_exact_identity(&exact, "redis-a.shop.mesh.local"));
        assert!(!has_exact_identity(&exact, "redis-b.shop.mesh.local"));
        assert_eq!(identity_of(&exact).unwrap(), "Redis-A.shop.mesh.local");
    }

    #[test]
    fn identities_must_be_ecdsa_p256() {
        let (cert, key) = self_signed(&PKCS_ECDSA_P256_SHA256);
        assert!(configs(vec![cert.clone()], key, vec![cert]).is_ok());
        let (cert, key) = self_signed(&PKCS_ECDSA_P384_SHA384);
        let err = configs(vec![cert.clone()], key, vec![cert]).err().unwrap();
        assert!(matches!(err, TlsError::NotP256), "{err}");
    }
}
