//! A throwaway certificate authority for demos and tests: `meshproxy identity new-ca
//! DIR` and `meshproxy identity issue --ca DIR NAME`.
//!
//! Not a production CA: keys sit unencrypted in files (mode 0600), nothing is revoked,
//! and certificates are valid until rcgen's far-future default. In a cluster the
//! identities come from a real issuer (cert-manager, Linkerd's identity controller).
//!
//! Names are checked first (`identity::name`): an exact DNS name, never a wildcard,
//! which also makes `NAME.crt` a plain file name inside `--out`. `new-ca` never
//! replaces an existing CA unless asked (`--force`): every identity issued by the old
//! one would stop being trusted.
//!
//! Every key is ECDSA P-256, the mesh's one key type. Leaves carry their name as the
//! only DNS SAN (the identity) and both the serverAuth and clientAuth extended key
//! usages, since every proxy is a TLS server (inbound) and client (outbound).
//!
//! rcgen cannot parse an existing certificate without its optional x509-parser
//! feature, so `issue` rebuilds the CA certificate from the same fixed parameters and
//! the CA key on disk. The rebuilt one has the same subject and key as `ca.crt`, which
//! is all a leaf's issuer name, authority key identifier and signature depend on; the
//! subject and key are compared with `ca.crt` so a mismatched directory is an error,
//! not a chain that silently fails to verify.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::name::{self, InvalidName};

/// The subject of every dev CA.
const CA_COMMON_NAME: &str = "meshproxy dev CA";

#[derive(Debug, thiserror::Error)]
pub enum DevCaError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a PEM certificate")]
    BadCaCert { path: PathBuf },
    #[error("{dir} was not made by `meshproxy identity new-ca` (ca.crt and ca.key do not match the dev CA)")]
    NotADevCa { dir: PathBuf },
    #[error(transparent)]
    BadName(#[from] InvalidName),
    #[error("{path} already exists: not replacing a CA, since identities it issued would no longer be trusted (use --force to replace it)")]
    CaExists { path: PathBuf },
    #[error("{name:?} cannot name a file inside {out}")]
    UnsafeFileName { name: String, out: PathBuf },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// Who owns the files `issue` writes (`--owner UID[:GID]`): the key is mode 0600, so
/// the proxy can read it only when it runs as its owner (uid 2102 by default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: Option<u32>,
}

/// An `--owner` that is not `UID` or `UID:GID` (numbers: no user-name lookup).
#[derive(Debug, thiserror::Error)]
#[error("invalid owner {input:?}: expected UID or UID:GID, numbers such as 2102 or 2102:2102")]
pub struct BadOwner {
    pub input: String,
}

impl std::str::FromStr for Owner {
    type Err = BadOwner;

    fn from_str(input: &str) -> Result<Owner, BadOwner> {
        let bad = || BadOwner {
            input: input.to_string(),
        };
        let number = |s: &str| -> Result<u32, BadOwner> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            s.parse().map_err(|_| bad())
        };
        match input.split_once(':') {
            None => Ok(Owner {
                uid: number(input)?,
                gid: None,
            }),
            Some((uid, gid)) => Ok(Owner {
                uid: number(uid)?,
                gid: Some(number(gid)?),
            }),
        }
    }
}

/// The files `issue` wrote.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Whether writing a file may replace one already there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Existing {
    Replace,
    Refuse,
}

/// Creates `dir/ca.crt` and `dir/ca.key` (creating `dir` if needed). Returns the path
/// of `ca.crt`, the trust anchors file. An existing CA in `dir` is an error
/// ([`DevCaError::CaExists`]), and nothing is written.
pub fn new_ca(dir: &Path) -> Result<PathBuf, DevCaError> {
    make_ca(dir, Existing::Refuse)
}

/// [`new_ca`], replacing a CA already in `dir` (`new-ca --force`).
pub fn new_ca_replacing(dir: &Path) -> Result<PathBuf, DevCaError> {
    make_ca(dir, Existing::Replace)
}

fn make_ca(dir: &Path, existing: Existing) -> Result<PathBuf, DevCaError> {
    let cert_path = dir.join("ca.crt");
    let key_path = dir.join("ca.key");
    if existing == Existing::Refuse {
        // Checked for both before writing either, so a refusal leaves `dir` as it was.
        // (`write` also refuses atomically, should one appear in between.)
        for path in [&cert_path, &key_path] {
            if path.symlink_metadata().is_ok() {
                return Err(DevCaError::CaExists { path: path.clone() });
            }
        }
    }
    create_dir(dir)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = ca_params().self_signed(&key)?;
    // The key first: a CA certificate without its key on disk would be useless.
    let file = |path, contents, mode| File {
        path,
        contents,
        mode,
        existing,
        owner: None,
    };
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    write(file(&key_path, key_pem.as_bytes(), 0o600))?;
    write(file(&cert_path, cert_pem.as_bytes(), 0o644))?;
    Ok(cert_path)
}

/// Issues `out/NAME.crt` and `out/NAME.key` for identity `name`, signed by the dev CA
/// in `ca_dir`, owned by whoever runs this.
pub fn issue(ca_dir: &Path, name: &str, out: &Path) -> Result<Issued, DevCaError> {
    issue_owned(ca_dir, name, out, None)
}

/// [`issue`], with both files given to `owner` (which needs root or CAP_CHOWN) before
/// they appear under their names, so the proxy's uid can read the 0600 key.
pub fn issue_owned(
    ca_dir: &Path,
    name: &str,
    out: &Path,
    owner: Option<Owner>,
) -> Result<Issued, DevCaError> {
    name::check(name)?;
    let file = |ext: &str| -> Result<PathBuf, DevCaError> {
        let file_name = format!("{name}.{ext}");
        // Already implied by the name check (no '/', not "." or ".."); kept as a
        // second lock on the door, since these paths are written to.
        let mut components = Path::new(&file_name).components();
        match (components.next(), components.next()) {
            (Some(std::path::Component::Normal(_)), None) => Ok(out.join(file_name)),
            _ => Err(DevCaError::UnsafeFileName {
                name: name.to_string(),
                out: out.to_path_buf(),
            }),
        }
    };
    let issued = Issued {
        cert: file("crt")?,
        key: file("key")?,
    };
    let ca_key_path = ca_dir.join("ca.key");
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).map_err(|source| DevCaError::Read {
        path: ca_key_path.clone(),
        source,
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let ca = ca_params().self_signed(&ca_key)?;
    check_same_ca(ca_dir, ca.der())?;

    let mut params = CertificateParams::new(vec![name.to_string()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;

    create_dir(out)?;
    // Re-issuing replaces the files: that is how an identity is rotated.
    let file = |path, contents, mode| File {
        path,
        contents,
        mode,
        existing: Existing::Replace,
        owner,
    };
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    write(file(&issued.cert, cert_pem.as_bytes(), 0o644))?;
    write(file(&issued.key, key_pem.as_bytes(), 0o600))?;
    Ok(issued)
}

/// Checks that `ca_dir/ca.crt` has the subject and public key of `rebuilt`.
fn check_same_ca(ca_dir: &Path, rebuilt: &CertificateDer<'_>) -> Result<(), DevCaError> {
    let path = ca_dir.join("ca.crt");
    let on_disk = CertificateDer::from_pem_file(&path)
        .map_err(|_| DevCaError::BadCaCert { path: path.clone() })?;
    let parse = |der| webpki::EndEntityCert::try_from(der).ok();
    let (Some(a), Some(b)) = (parse(&on_disk), parse(rebuilt)) else {
        return Err(DevCaError::BadCaCert { path });
    };
    if a.subject() != b.subject() || a.subject_public_key_info() != b.subject_public_key_info() {
        return Err(DevCaError::NotADevCa {
            dir: ca_dir.to_path_buf(),
        });
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), DevCaError> {
    std::fs::create_dir_all(dir).map_err(|source| DevCaError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

/// A file to write: where, what, with which mode and owner.
struct File<'a> {
    path: &'a Path,
    contents: &'a [u8],
    mode: u32,
    existing: Existing,
    owner: Option<Owner>,
}

/// Writes a file whole. It goes to a temporary name first and is then renamed (or,
/// when an existing file must not be replaced, hard-linked, which fails if the name
/// exists), so a proxy watching the file never reads half of it.
///
/// The temporary file is created with `O_EXCL` after removing any stale one, so a
/// symlink planted at its name is replaced, never followed out of the directory.
/// An owner is set on the temporary file, so the file never appears under its name
/// with the wrong owner.
fn write(file: File<'_>) -> Result<(), DevCaError> {
    let File {
        path,
        contents,
        mode,
        existing,
        owner,
    } = file;
    let error = |source| DevCaError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(error(e)),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(error)?;
    file.write_all(contents).map_err(error)?;
    if let Some(owner) = owner {
        std::os::unix::fs::fchown(&file, Some(owner.uid), owner.gid).map_err(error)?;
    }
    file.sync_all().map_err(error)?;
    match existing {
        Existing::Replace => std::fs::rename(&tmp, path).map_err(error),
        Existing::Refuse => {
            let linked = std::fs::hard_link(&tmp, path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(DevCaError::CaExists {
                    path: path.to_path_buf(),
                }),
                other => other.map_err(error),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Identity, IdentityFiles};

    #[test]
    fn issued_identities_load_and_name_themselves() {
        let dir = std::env::temp_dir().join(format!("meshproxy-dev-ca-{}", std::process::id()));
        let anchors = new_ca(&dir.join("ca")).unwrap();
        let issued = issue(&dir.join("ca"), "web.default.mesh.local", &dir).unwrap();
        let identity = Identity::load(&IdentityFiles {
            cert: issued.cert.clone(),
            key: issued.key.clone(),
            trust_anchors: anchors,
        })
        .unwrap();
        assert_eq!(identity.name(), "web.default.mesh.local");
        // Another CA's directory with this key is refused, not silently mis-signed.
        new_ca(&dir.join("other")).unwrap();
        std::fs::copy(dir.join("ca/ca.key"), dir.join("other/ca.key")).unwrap();
        let err = issue(&dir.join("other"), "x.mesh.local", &dir).unwrap_err();
        assert!(matches!(err, DevCaError::NotADevCa { .. }), "{err}");
        let err = issue(&dir.join("ca"), "wéb.mesh.local", &dir).unwrap_err();
        assert!(matches!(err, DevCaError::BadName { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
