//! The proxy's identity: its certificate, key and trust anchors, read from PEM files
//! and reloaded when they change on disk.
//!
//! The identity *name* is the first exact DNS SAN of our certificate (Linkerd's convention,
//! e.g. `web.default.serviceaccount.identity.linkerd.cluster.local`; ours are whatever
//! the CA issued, e.g. `web.default.mesh.local`). Peers are checked against the names
//! listed in `--mesh-peers`, and inbound clients are labelled with theirs.
//!
//! Rotation: every new connection takes [`IdentityWatch::current`], which re-reads the
//! three files when their stamps changed (see `reload`) and rebuilds both TLS configs.
//! Connections already open keep the config they started with. The trust anchors are
//! reloaded with the certificate, so a CA rotation is a file change too.
//!
//! `name` says what an identity name may be (an exact DNS name, never a wildcard);
//! `dev_ca` holds the `meshproxy identity new-ca|issue` helpers for demos and tests.

mod dev_ca;
mod name;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, ServerConfig};

use crate::reload::Watched;
use crate::tls::{self, TlsError};

pub use self::dev_ca::{
    issue, issue_owned, new_ca, new_ca_replacing, BadOwner, DevCaError, Issued, Owner,
};
pub(crate) use self::name::same as same_name;
pub use self::name::{check as check_name, InvalidName};

/// The three PEM files of an identity (`--identity-cert`, `--identity-key`,
/// `--trust-anchors`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityFiles {
    /// Our certificate, leaf first, optionally followed by intermediates.
    pub cert: PathBuf,
    /// The leaf's private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// The CA certificates peers' certificates must chain to.
    pub trust_anchors: PathBuf,
}

/// Why an identity could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {what} from {path}: {source}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        source: pem::Error,
    },
    #[error("{path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: PathBuf },
    #[error("identity {} / {} / {}: {source}", files.cert.display(), files.key.display(), files.trust_anchors.display())]
    Tls {
        // Boxed: errors are rare and a large `Err` makes every `Result` large.
        files: Box<IdentityFiles>,
        source: TlsError,
    },
}

/// One loaded identity: our name and the TLS configs that present it.
pub struct Identity {
    name: String,
    configs: tls::Configs,
}

impl Identity {
    /// Reads and checks the three files.
    pub fn load(files: &IdentityFiles) -> Result<Identity, IdentityError> {
        let chain = read_certs(&files.cert, "the identity certificate")?;
        let key =
            PrivateKeyDer::from_pem_file(&files.key).map_err(|source| IdentityError::Pem {
                what: "the identity key",
                path: files.key.clone(),
                source,
            })?;
        let anchors = read_certs(&files.trust_anchors, "the trust anchors")?;
        let tls_error = |source| IdentityError::Tls {
            files: Box::new(files.clone()),
            source,
        };
        // `read_certs` never returns an empty chain (`NoCertificate`), so [0] exists.
        let name = tls::identity_of(&chain[0]).map_err(tls_error)?;
        let configs = tls::configs(chain, key, anchors).map_err(tls_error)?;
        Ok(Identity { name, configs })
    }

    /// Our identity: the first DNS SAN of our certificate.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn server_config(&self) -> Arc<ServerConfig> {
        self.configs.server.clone()
    }

    pub(crate) fn client_config(&self) -> Arc<ClientConfig> {
        self.configs.client.clone()
    }
}

fn read_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let pem_error = |source| IdentityError::Pem {
        what,
        path: path.to_path_buf(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err(IdentityError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The identity, reloaded when any of its files changes.
pub struct IdentityWatch {
    watched: Watched<Identity, IdentityError>,
}

impl IdentityWatch {
    /// Loads the identity; an error means the proxy must not start.
    pub fn new(files: &IdentityFiles) -> Result<IdentityWatch, IdentityError> {
        let paths = vec![
            files.cert.clone(),
            files.key.clone(),
            files.trust_anchors.clone(),
        ];
        // `Watched` calls the loader with exactly the paths given here, these three,
        // so the indexing below cannot go out of bounds.
        let watched = Watched::new("identity", paths, |paths| {
            Identity::load(&IdentityFiles {
                cert: paths[0].clone(),
                key: paths[1].clone(),
                trust_anchors: paths[2].clone(),
            })
        })?;
        Ok(IdentityWatch { watched })
    }

    /// The identity new connections use.
    pub fn current(&self) -> Arc<Identity> {
        self.watched.current()
    }
}
