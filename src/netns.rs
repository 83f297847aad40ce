//! Entering the target network namespace.
//!
//! meshinit is single-threaded and has no async runtime, so entering on the
//! main thread before anything else runs is safe: `setns` moves only the
//! calling thread, and every `nft`/`iptables-restore` child forked after it
//! inherits that thread's namespace.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetnsError {
    #[error("network namespace file {path} does not exist (expected /var/run/netns/NAME or /proc/PID/ns/net)")]
    Missing { path: PathBuf },
    #[error(
        "{path} is not a network namespace file (expected /var/run/netns/NAME or /proc/PID/ns/net)"
    )]
    NotNetns { path: PathBuf },
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {source} (meshinit needs CAP_SYS_ADMIN to enter another namespace)")]
    Enter { path: PathBuf, source: Errno },
}

impl NetnsError {
    /// True when the error is the user's input rather than the system.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            NetnsError::Missing { .. } | NetnsError::NotNetns { .. }
        )
    }
}

/// Moves the current thread into the namespace at `path`.
pub fn enter(path: &Path) -> Result<(), NetnsError> {
    let file = File::open(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => NetnsError::Missing {
            path: path.to_path_buf(),
        },
        _ => NetnsError::Open {
            path: path.to_path_buf(),
            source,
        },
    })?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| match source {
        Errno::EINVAL => NetnsError::NotNetns {
            path: path.to_path_buf(),
        },
        _ => NetnsError::Enter {
            path: path.to_path_buf(),
            source,
        },
    })
}
