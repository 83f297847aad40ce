//! One meshinit at a time changes rules on this host.
//!
//! nft applies a batch atomically, but the iptables backends write IPv4 and
//! IPv6 in two transactions, and a switch between backends is apply-then-
//! clean: two concurrent runs could interleave those steps and leave IPv4 from
//! one run and IPv6 from the other. An exclusive `flock` on a lock file around
//! every change makes concurrent runs take turns, so the end state is exactly
//! one run's ruleset (the last one's).
//!
//! The lock file is opened as carefully as any root-owned path in a shared
//! directory: `O_NOFOLLOW`, so a symlink planted at the path cannot make root
//! create or open a file elsewhere; `O_NONBLOCK`, so a FIFO planted there cannot
//! hang the open; and it must then be a regular file owned by root (or by the
//! user meshinit runs as), mode 0600. Anything else is refused (exit 1) rather
//! than trusted. The wait is bounded (`--lock-timeout`): a run that never
//! releases the lock must not hold up every later one forever.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use thiserror::Error;

/// Where the lock lives. `/run` is per host (or per container), which is the
/// scope of the namespaces one meshinit can reach.
pub const PATH: &str = "/run/meshinit.lock";

/// How often a waiting run retries the lock.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Error)]
pub enum LockError {
    #[error("refusing the lock file {path}: it is a symlink (the lock file must be a regular file; remove it)")]
    Symlink { path: PathBuf },
    #[error("refusing the lock file {path}: it is {kind}, not a regular file (remove it)")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("refusing the lock file {path}: it is owned by uid {uid}, not by root (remove it)")]
    Owner { path: PathBuf, uid: u32 },
    #[error("cannot set the lock file {path} to mode 0600: {source}")]
    Mode { path: PathBuf, source: io::Error },
    #[error("gave up waiting for the lock file {path} after {waited}: another meshinit run holds it (raise --lock-timeout, or find the run holding it)")]
    Timeout { path: PathBuf, waited: String },
    #[error("cannot lock {path}: {source}")]
    Flock { path: PathBuf, source: Errno },
    #[error("cannot create the lock file {path}: {source} (meshinit needs a writable /run to serialise its runs; in a container with a read-only root filesystem, mount an emptyDir volume at /run)")]
    Create { path: PathBuf, source: io::Error },
}

/// Held for as long as the value lives; released on drop (and by the kernel
/// when the process dies, so a crash never leaves a stale lock).
#[derive(Debug)]
pub struct Lock {
    _lock: Flock<File>,
}

/// Takes the lock at `path`, waiting at most `timeout` for a concurrent run to
/// finish.
///
/// When the lock file cannot be created at all (a read-only or missing `/run`,
/// as in a container with `readOnlyRootFilesystem` and no volume there) the run
/// is refused (exit 1), not run unlocked: an unlocked run would silently drop
/// the serialisation this module exists for, and the fix (a writable `/run`)
/// is the operator's to make. Something that is there but is not our kind of
/// lock file is refused too, because it was put there by someone.
pub fn acquire(path: &Path, timeout: Duration) -> Result<Lock, LockError> {
    let file = open(path)?;
    let deadline = Instant::now().checked_add(timeout);
    let mut file = file;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(Lock { _lock: lock }),
            Err((back, Errno::EWOULDBLOCK | Errno::EINTR)) => file = back,
            Err((_, source)) => {
                return Err(LockError::Flock {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        let now = Instant::now();
        // `checked_add` is `None` only past the end of time: then wait forever.
        if deadline.is_some_and(|deadline| now >= deadline) {
            return Err(LockError::Timeout {
                path: path.to_path_buf(),
                waited: humantime::format_duration(timeout).to_string(),
            });
        }
        let left = deadline.map_or(POLL, |d| d.saturating_duration_since(now));
        std::thread::sleep(POLL.min(left));
    }
}

/// Opens (creating it 0600 if needed) the lock file.
fn open(path: &Path) -> Result<File, LockError> {
    let refused_kind = |kind| LockError::NotRegular {
        path: path.to_path_buf(),
        kind,
    };
    let file = match OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open(path)
    {
        Ok(file) => file,
        Err(err) => {
            return match err.raw_os_error().map(Errno::from_raw) {
                Some(Errno::ELOOP) => Err(LockError::Symlink {
                    path: path.to_path_buf(),
                }),
                // A FIFO without a reader, opened write-only and non-blocking.
                Some(Errno::ENXIO) => Err(refused_kind("a FIFO or device")),
                Some(Errno::EISDIR) => Err(refused_kind("a directory")),
                _ => Err(LockError::Create {
                    path: path.to_path_buf(),
                    source: err,
                }),
            };
        }
    };
    let meta = file.metadata().map_err(|source| LockError::Mode {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(refused_kind(kind_of(&meta)));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(LockError::Owner {
            path: path.to_path_buf(),
            uid: meta.uid(),
        });
    }
    // Earlier versions created the file with the umask's mode (usually 0644).
    if meta.mode() & 0o7777 != 0o600 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|source| LockError::Mode {
                path: path.to_path_buf(),
                source,
            })?;
    }
    Ok(file)
}

fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let kind = meta.file_type();
    if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else if kind.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory for one test's lock file, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(test: &str) -> Dir {
            let dir =
                std::env::temp_dir().join(format!("meshinit-lock-{}-{test}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }
        fn lock(&self) -> PathBuf {
            self.0.join("meshinit.lock")
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const SHORT: Duration = Duration::from_millis(300);

    #[test]
    fn creates_a_regular_0600_file_and_fixes_an_older_mode() {
        let dir = Dir::new("mode");
        drop(acquire(&dir.lock(), SHORT).unwrap());
        let meta = std::fs::symlink_metadata(dir.lock()).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.mode() & 0o7777, 0o600);
        std::fs::set_permissions(dir.lock(), std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(acquire(&dir.lock(), SHORT).unwrap());
        assert_eq!(
            std::fs::metadata(dir.lock()).unwrap().mode() & 0o7777,
            0o600
        );
    }

    #[test]
    fn the_wait_is_bounded_and_names_the_lock() {
        let dir = Dir::new("timeout");
        let held = acquire(&dir.lock(), SHORT).unwrap();
        let started = Instant::now();
        let err = acquire(&dir.lock(), SHORT).unwrap_err();
        let waited = started.elapsed();
        assert!(matches!(err, LockError::Timeout { .. }), "{err:?}");
        assert!(err.to_string().contains(&dir.lock().display().to_string()));
        assert!(err.to_string().contains("300ms"), "{err}");
        assert!(waited >= SHORT, "gave up after {waited:?}");
        assert!(waited < SHORT * 10, "waited {waited:?}");
        drop(held);
        acquire(&dir.lock(), SHORT).expect("free once the holder is gone");
    }

    #[test]
    fn a_symlink_is_refused_and_not_followed() {
        let dir = Dir::new("symlink");
        let target = dir.0.join("target");
        std::os::unix::fs::symlink(&target, dir.lock()).unwrap();
        let err = acquire(&dir.lock(), SHORT).unwrap_err();
        assert!(matches!(err, LockError::Symlink { .. }), "{err:?}");
        assert!(!target.exists(), "the symlink was followed");
    }

    #[test]
    fn a_fifo_or_directory_is_refused_without_hanging() {
        let dir = Dir::new("fifo");
        nix::unistd::mkfifo(&dir.lock(), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let started = Instant::now();
        let err = acquire(&dir.lock(), Duration::from_secs(30)).unwrap_err();
        assert!(matches!(err, LockError::NotRegular { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        std::fs::remove_file(dir.lock()).unwrap();
        std::fs::create_dir(dir.lock()).unwrap();
        let err = acquire(&dir.lock(), SHORT).unwrap_err();
        assert!(matches!(err, LockError::NotRegular { .. }), "{err:?}");
    }

    #[test]
    fn a_lock_file_that_cannot_be_created_is_an_error_not_a_warning() {
        let dir = Dir::new("missing");
        // A missing directory stands for a read-only /run (EROFS: root ignores
        // permission bits, so a chmod'ed directory would not do; the podman test
        // in scripts/image-test.sh shows the read-only root filesystem itself).
        let path = dir.0.join("no-such-dir").join("meshinit.lock");
        let err = acquire(&path, SHORT).unwrap_err();
        assert!(matches!(err, LockError::Create { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("writable /run"), "{text}");
    }

    #[test]
    fn a_file_owned_by_someone_else_is_refused() {
        let dir = Dir::new("owner");
        std::fs::write(dir.lock(), "").unwrap();
        std::os::unix::fs::chown(dir.lock(), Some(65534), Some(65534)).unwrap();
        let err = acquire(&dir.lock(), SHORT).unwrap_err();
        assert!(
            matches!(err, LockError::Owner { uid: 65534, .. }),
            "{err:?}"
        );
    }
}
