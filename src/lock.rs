//! One meshinit at a time changes rules on this host.
//!
//! nft applies a batch atomically, but the iptables backends write IPv4 and
//! IPv6 in two transactions, and a switch between backends is apply-then-
//! clean: two concurrent runs could interleave those steps and leave IPv4 from
//! one run and IPv6 from the other. An exclusive `flock` on a lock file around
//! every change makes concurrent runs take turns, so the end state is exactly
//! one run's ruleset (the last one's).

use std::fs::{File, OpenOptions};
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

/// Where the lock lives. `/run` is per host (or per container), which is the
/// scope of the namespaces one meshinit can reach.
pub const PATH: &str = "/run/meshinit.lock";

/// Held for as long as the value lives; released on drop (and by the kernel
/// when the process dies, so a crash never leaves a stale lock).
pub struct Lock {
    _lock: Option<Flock<File>>,
}

/// Takes the lock, waiting for a concurrent run to finish. When the lock file
/// cannot be opened (read-only /run) the run proceeds unlocked with a warning:
/// refusing would make meshinit unusable there, and nft itself stays atomic.
pub fn acquire() -> Lock {
    let path = Path::new(PATH);
    let file = match OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
    {
        Ok(file) => file,
        Err(err) => {
            tracing::warn!(
                "cannot open {PATH} ({err}); concurrent meshinit runs are not serialised"
            );
            return Lock { _lock: None };
        }
    };
    match Flock::lock(file, FlockArg::LockExclusive) {
        Ok(lock) => Lock { _lock: Some(lock) },
        Err((_, errno)) => {
            tracing::warn!(
                "cannot lock {PATH} ({errno}); concurrent meshinit runs are not serialised"
            );
            Lock { _lock: None }
        }
    }
}
