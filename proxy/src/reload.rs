//! Values loaded from files and reloaded when the files change on disk.
//!
//! Certificates are rotated, and the list of meshed peers is edited, while the proxy
//! runs; restarting the proxy would cut every open connection. So each new connection
//! asks for the current value, and [`Watched::current`] first compares the files'
//! stamps (modification time, change time, size, inode) with those of the last load: a few `stat`
//! calls, which cost microseconds against a connection set-up or a TLS handshake.
//! Open connections keep the `Arc` they took and are never touched.
//!
//! The inode is part of the stamp because Kubernetes updates mounted secrets by
//! swapping a symlink, which can leave the modification time of the new file older
//! than the old one's.
//!
//! The change time (ctime) is part of it because fixing a file's owner or mode (say,
//! `chown` of a key issued by root) changes nothing else, and must trigger a retry of a
//! reload that failed for lack of permission.
//!
//! A reload that fails (a half-written file, a key that does not match the new
//! certificate yet) keeps the previous value and is logged; the stamps are recorded all
//! the same, so the next change on disk triggers the next attempt instead of every
//! connection retrying and logging.

use std::fmt::Display;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use tracing::{info, warn};

/// What identifies one version of a file; `None` when the file cannot be read.
pub(crate) type Stamp = Option<(SystemTime, (i64, i64), u64, u64, u64)>;

pub(crate) fn stamps(paths: &[PathBuf]) -> Vec<Stamp> {
    paths
        .iter()
        .map(|path| {
            let meta = std::fs::metadata(path).ok()?;
            Some((
                meta.modified().ok()?,
                (meta.ctime(), meta.ctime_nsec()),
                meta.len(),
                meta.dev(),
                meta.ino(),
            ))
        })
        .collect()
}

/// A value built from some files, rebuilt when any of them changes.
pub(crate) struct Watched<T, E> {
    what: &'static str,
    paths: Vec<PathBuf>,
    load: fn(&[PathBuf]) -> Result<T, E>,
    state: RwLock<State<T>>,
}

struct State<T> {
    stamps: Vec<Stamp>,
    value: Arc<T>,
}

impl<T, E: Display> Watched<T, E> {
    /// Loads the value once; an error here is returned (the proxy refuses to start
    /// with files it cannot use), later errors only keep the old value.
    pub(crate) fn new(
        what: &'static str,
        paths: Vec<PathBuf>,
        load: fn(&[PathBuf]) -> Result<T, E>,
    ) -> Result<Watched<T, E>, E> {
        let stamps = stamps(&paths);
        let value = Arc::new(load(&paths)?);
        Ok(Watched {
            what,
            paths,
            load,
            state: RwLock::new(State { stamps, value }),
        })
    }

    /// The value for a new connection, reloaded first if a file changed.
    pub(crate) fn current(&self) -> Arc<T> {
        let now = stamps(&self.paths);
        {
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            if state.stamps == now {
                return state.value.clone();
            }
        }
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        // Another connection may have reloaded while we waited for the lock.
        if state.stamps != now {
            state.stamps = now;
            match (self.load)(&self.paths) {
                Ok(value) => {
                    info!(what = self.what, paths = ?self.paths, "reloaded");
                    state.value = Arc::new(value);
                }
                Err(error) => warn!(
                    what = self.what,
                    %error,
                    "cannot reload, keeping the previous version"
                ),
            }
        }
        state.value.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// Reads the file, refusing it while its owner cannot read it (the test
    /// runs as root, which the kernel would let read anything).
    fn load(paths: &[PathBuf]) -> Result<String, String> {
        let mode = std::fs::metadata(&paths[0])
            .map_err(|e| e.to_string())?
            .permissions()
            .mode();
        if mode & 0o400 == 0 {
            return Err("permission denied".into());
        }
        std::fs::read_to_string(&paths[0]).map_err(|e| e.to_string())
    }

    #[test]
    fn a_failed_reload_is_retried_after_a_mode_or_owner_fix() {
        let dir = std::env::temp_dir().join(format!("meshproxy-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cert.pem");
        std::fs::write(&path, "v1").unwrap();
        let watched = Watched::new("test", vec![path.clone()], load).unwrap();
        assert_eq!(*watched.current(), "v1");

        // A new version arrives unreadable: the old one is kept.
        let staged = dir.join("cert.pem.new");
        std::fs::write(&staged, "v2").unwrap();
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o000)).unwrap();
        std::fs::rename(&staged, &path).unwrap();
        assert_eq!(*watched.current(), "v1");

        // Only the mode changes (as with chown): mtime, size and inode stay.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(*watched.current(), "v2");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
