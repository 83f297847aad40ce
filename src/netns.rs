//! Entering the target network namespace, and telling whether a namespace is
//! the host's own ([`current`], [`classify`]).
//!
//! meshinit is single-threaded (its one async runtime, in `addrs`, is a
//! current-thread one: it runs on the calling thread and starts none), so
//! entering on the main thread before anything else runs is safe: `setns`
//! moves only the calling thread, and every `nft`/`iptables-restore` child
//! forked after it, and every socket it opens, is in that thread's namespace.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
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

/// The fixed nsfs inode of the initial network namespace (`NET_NS_INIT_INO` in
/// linux/nsfs.h, Linux 6.18 and later).
pub const NET_NS_INIT_INO: u64 = 0xEFFF_FFF9;
/// The fixed inode of the initial PID namespace (`PROC_PID_INIT_INO`, every kernel
/// meshinit runs on).
pub const PID_NS_INIT_INO: u64 = 0xEFFF_FFFC;

/// A namespace's identity: the device and inode of its nsfs file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

/// What this thread can find out about the namespace it is in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    /// The thread's network namespace.
    pub net: NsId,
    /// The inode of the process's PID namespace, when readable.
    pub pid_ns: Option<u64>,
    /// The network namespace of the initial PID namespace's processes (init, or
    /// kthreadd when init's is unreadable), or why it could not be read.
    pub init_net: Result<NsId, String>,
}

/// Whether a namespace is the host's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The host's initial network namespace; the text says how that was decided.
    Host(&'static str),
    /// Some other namespace: a pod's, or one made with `ip netns add`.
    Other,
    /// It cannot be told (the text says why).
    Unknown(String),
}

/// Decides from `facts` whether the namespace is the host's. Pure, so every case
/// is tested with plain values.
///
/// Recent kernels give the initial network namespace a fixed inode, which settles
/// it. Elsewhere the host's namespace is the one the initial PID namespace's init
/// runs in; from inside another PID namespace (a container) that init cannot be
/// seen, and a container is taken to be a pod.
pub fn classify(facts: &Facts) -> Target {
    if facts.net.ino == NET_NS_INIT_INO {
        return Target::Host("its inode is the initial network namespace's fixed 0xEFFFFFF9");
    }
    if facts.pid_ns != Some(PID_NS_INIT_INO) {
        return Target::Other;
    }
    match &facts.init_net {
        Ok(init) if *init == facts.net => {
            Target::Host("it is the network namespace of the host's init process")
        }
        Ok(_) => Target::Other,
        Err(why) => Target::Unknown(why.clone()),
    }
}

/// The facts about the calling thread's namespace (`/proc/thread-self`: `setns`
/// moves only the calling thread).
pub fn facts() -> io::Result<Facts> {
    let net = ns_id(Path::new("/proc/thread-self/ns/net"))?;
    let pid_ns = ns_id(Path::new("/proc/self/ns/pid")).ok().map(|id| id.ino);
    // init's namespace files may be unreadable even to root (an LSM, or a
    // restricted /proc); kthreadd, pid 2 of the initial PID namespace, always
    // runs in the initial network namespace too.
    let init_net = ns_id(Path::new("/proc/1/ns/net")).or_else(|first| {
        let kthreadd = std::fs::read_to_string("/proc/2/comm").unwrap_or_default();
        if kthreadd.trim() != "kthreadd" {
            return Err(format!("/proc/1/ns/net: {first}"));
        }
        ns_id(Path::new("/proc/2/ns/net"))
            .map_err(|second| format!("/proc/1/ns/net: {first}; /proc/2/ns/net: {second}"))
    });
    Ok(Facts {
        net,
        pid_ns,
        init_net,
    })
}

/// Classifies the calling thread's namespace; unreadable `/proc` is `Unknown`.
pub fn current() -> Target {
    match facts() {
        Ok(facts) => classify(&facts),
        Err(err) => Target::Unknown(format!("/proc/thread-self/ns/net: {err}")),
    }
}

fn ns_id(path: &Path) -> io::Result<NsId> {
    let meta = std::fs::metadata(path)?;
    Ok(NsId {
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: NsId = NsId {
        dev: 4,
        ino: 4026532300,
    };
    /// An initial namespace on a kernel without fixed network inodes.
    const OLD_INIT: NsId = NsId {
        dev: 4,
        ino: 4026531993,
    };

    fn facts(net: NsId, pid_ns: Option<u64>, init_net: Result<NsId, String>) -> Facts {
        Facts {
            net,
            pid_ns,
            init_net,
        }
    }

    #[test]
    fn the_fixed_inode_is_the_host_whatever_else_is_known() {
        let host = NsId {
            dev: 4,
            ino: NET_NS_INIT_INO,
        };
        for pid_ns in [Some(PID_NS_INIT_INO), Some(4026532400), None] {
            for init in [Ok(host), Err("EACCES".to_string())] {
                assert!(matches!(
                    classify(&facts(host, pid_ns, init)),
                    Target::Host(_)
                ));
            }
        }
    }

    #[test]
    fn without_the_fixed_inode_the_host_is_inits_namespace() {
        let initial = Some(PID_NS_INIT_INO);
        assert!(matches!(
            classify(&facts(OLD_INIT, initial, Ok(OLD_INIT))),
            Target::Host(_)
        ));
        assert_eq!(classify(&facts(POD, initial, Ok(OLD_INIT))), Target::Other);
        // The same inode on another device is another namespace.
        let elsewhere = NsId { dev: 5, ..OLD_INIT };
        assert_eq!(
            classify(&facts(elsewhere, initial, Ok(OLD_INIT))),
            Target::Other
        );
    }

    #[test]
    fn inside_a_container_the_namespace_is_a_pods() {
        // Another PID namespace: its pid 1 is the container's init, not the host's.
        assert_eq!(
            classify(&facts(OLD_INIT, Some(4026532400), Ok(OLD_INIT))),
            Target::Other
        );
        assert_eq!(classify(&facts(POD, None, Ok(POD))), Target::Other);
    }

    #[test]
    fn an_unreadable_init_namespace_is_unknown_not_a_guess() {
        let target = classify(&facts(POD, Some(PID_NS_INIT_INO), Err("EACCES".into())));
        assert_eq!(target, Target::Unknown("EACCES".into()));
    }

    #[test]
    fn this_process_is_classified_without_error() {
        // The test runs either in the host's namespace or in some other one; both
        // must be decided (init's namespace unreadable falls back to kthreadd's).
        let facts = super::facts().expect("/proc/thread-self/ns/net is readable");
        assert!(!matches!(classify(&facts), Target::Unknown(_)), "{facts:?}");
    }
}
