//! Values loaded from files and reloaded when the files change on disk.
//!
//! Certificates are rotated, and the list of meshed peers is edited, while the proxy
//! runs; restarting the proxy would cut every open connection. So each new connection
//! asks for the current value, and [`Watched::current`] first compares the files'
//! stamps (modification time, size, inode) with those of the last load: a few `stat`
//! calls, which cost microseconds against a connection set-up or a TLS handshake.
//! Open connections keep the `Arc` they took and are never touched.
//!
//! The inode is part of the stamp because Kubernetes updates mounted secrets by
//! swapping a symlink, which can leave the modification time of the new file older
//! than the old one's.
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
type Stamp = Option<(SystemTime, u64, u64, u64)>;

fn stamps(paths: &[PathBuf]) -> Vec<Stamp> {
    paths
        .iter()
        .map(|path| {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.modified().ok()?, meta.len(), meta.dev(), meta.ino()))
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
