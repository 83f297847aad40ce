//! A dev CA in a temporary directory, for the in-process mTLS tests (included with
//! `#[path]`, so it is not a test target of its own).
#![allow(dead_code)] // each test file uses its own part of it

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use meshproxy::{IdentityFiles, ProxyArgs};

/// A directory removed when the test ends.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(test: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("meshproxy-{test}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A dev CA and the identities it issues, in a temporary directory.
pub struct Pki {
    pub dir: TempDir,
}

impl Pki {
    pub fn new(test: &str) -> Pki {
        let dir = TempDir::new(test);
        meshproxy::new_ca(&dir.0.join("ca")).unwrap();
        Pki { dir }
    }

    pub fn anchors(&self) -> PathBuf {
        self.dir.0.join("ca/ca.crt")
    }

    /// Issues (or re-issues, replacing the files) the identity `name`.
    pub fn issue(&self, name: &str) -> IdentityFiles {
        let issued = meshproxy::issue(&self.dir.0.join("ca"), name, &self.dir.0).unwrap();
        IdentityFiles {
            cert: issued.cert,
            key: issued.key,
            trust_anchors: self.anchors(),
        }
    }

    /// Writes `contents` to `file` in the directory.
    pub fn write(&self, file: &str, contents: &str) -> PathBuf {
        let path = self.dir.0.join(file);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// A mesh peers file saying 127.0.0.1 runs a proxy that is `identity`.
    pub fn peers(&self, identity: &str) -> PathBuf {
        let peers = format!("[[peer]]\nnet = \"127.0.0.1/32\"\nidentity = \"{identity}\"\n");
        self.write("peers.toml", &peers)
    }
}

/// Arguments of a proxy on free loopback ports proving `identity` (a 2 s detect
/// timeout keeps the tests short).
pub fn identity_args(identity: &IdentityFiles) -> ProxyArgs {
    ProxyArgs {
        inbound_addr: Some("127.0.0.1:0".into()),
        outbound_addr: Some("127.0.0.1:0".into()),
        admin_addr: Some("127.0.0.1:0".into()),
        identity_cert: Some(identity.cert.display().to_string()),
        identity_key: Some(identity.key.display().to_string()),
        trust_anchors: Some(identity.trust_anchors.display().to_string()),
        detect_timeout: Some("2s".into()),
        ..ProxyArgs::default()
    }
}
