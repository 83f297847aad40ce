//! Backends: the runners that install a [`Ruleset`] in the kernel.
//!
//! Each backend applies in one transaction per family and reads back only
//! what is ours. The `nft` backend is the default; iptables is for hosts
//! where nftables cannot be used.

mod iptables;
mod nf_tables;
mod nft;

use std::io::Write;
use std::process::{Child, Command, Stdio};

use meshinit_rules::{Family, Ruleset};
use thiserror::Error;

use crate::config::BackendChoice;

pub use iptables::{Flavor, Iptables};
pub use nft::Nft;

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("`{binary}` was not found in PATH ({hint})")]
    Missing { binary: String, hint: &'static str },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}`: {source}")]
    Io {
        command: String,
        source: std::io::Error,
    },
    #[error("no backend is usable here ({tried})")]
    NoBackend { tried: String },
    #[error("cannot read `{command}` output: {message}")]
    Unreadable { command: String, message: String },
}

/// A way of installing rules.
pub trait Backend {
    /// Short name for logs: `nft`, `iptables-nft`, `iptables-legacy`.
    fn name(&self) -> &'static str;
    /// What `show` and `--dry-run` print.
    fn render(&self, ruleset: &Ruleset) -> String;
    /// Replaces our rules with `ruleset`, atomically, and says what it saw.
    fn apply(&self, ruleset: &Ruleset) -> Result<Applied, BackendError>;
    /// Removes our rules (and nothing else); succeeds when there are none.
    fn cleanup(&self) -> Result<(), BackendError>;
    /// Differences between what is installed and `ruleset`; empty when equal.
    fn diff(&self, ruleset: &Ruleset) -> Result<Vec<String>, BackendError>;
    /// True when any rule, chain or table of ours is installed.
    fn has_ours(&self) -> Result<bool, BackendError>;
    /// [`Backend::has_ours`] after an apply, using what it saw (`applied`) instead of
    /// running a process of its own where that is enough.
    fn has_ours_after(&self, applied: &Applied) -> Result<bool, BackendError> {
        let _ = applied;
        self.has_ours()
    }
}

/// What an apply learned on the way, so that the leftover checks after it need
/// no process of their own when there is nothing to find.
#[derive(Debug, Default)]
pub struct Applied {
    /// The nf_tables tables (lines `table FAMILY NAME`, as `nft list tables` prints
    /// them) that the nft backend's transaction saw, or that the iptables-nft backend
    /// listed before its restore (which changes only `ip`/`ip6` tables, read by no
    /// other backend's check); `None` from iptables-legacy.
    pub nf_tables: Option<String>,
    /// True when our rules were already exactly in place, so nothing was written
    /// (no rule deleted and re-added, no nf_tables commit to wait for).
    pub unchanged: bool,
}

impl Applied {
    /// Makes sure the nf_tables tables are known, listing them (in process, see
    /// [`nf_tables_listing`]) when the apply did not: the nft and iptables-nft
    /// leftover checks then share that one listing. Left unknown when neither
    /// netlink nor `nft` can list them; each check then runs its own look.
    pub fn with_nf_tables(self) -> Applied {
        if self.nf_tables.is_some() {
            return self;
        }
        Applied {
            nf_tables: nf_tables_listing().ok(),
            ..self
        }
    }
}

/// The nf_tables tables of this namespace as `nft list tables` prints them: read
/// over netlink in this process, or, when that fails, by running `nft list tables`.
pub(crate) fn nf_tables_listing() -> Result<String, BackendError> {
    nf_tables::list_tables().or_else(nft_list_tables)
}

/// `nft list tables`, run because the listing over netlink failed with `err`.
fn nft_list_tables(err: String) -> Result<String, BackendError> {
    tracing::debug!("listing nf_tables tables over netlink failed ({err}); running nft");
    run("nft", &["list", "tables"], None, nft::HINT)
}

/// Runs `program args...`, feeding `stdin`, and returns its stdout.
///
/// stdout and stderr are both captured: on failure the error carries the
/// tool's own message, which is what a user needs to see.
pub(crate) fn run(
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    hint: &'static str,
) -> Result<String, BackendError> {
    start(program, args, stdin, hint)?.output()
}

/// A process started by [`start`]: several reads can run at once (each
/// process costs milliseconds of start-up, most of an apply's time), then
/// [`Running::output`] waits for each.
pub(crate) struct Running {
    command: String,
    child: Child,
}

/// Starts `program args...`, feeding it `stdin`; [`Running::output`] waits for it.
pub(crate) fn start(
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    hint: &'static str,
) -> Result<Running, BackendError> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => BackendError::Missing {
                binary: program.to_string(),
                hint,
            },
            _ => BackendError::Io {
                command: command.clone(),
                source,
            },
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A child that exits early closes the pipe; its exit status and
        // stderr below say why, so a write error here is not the story.
        let _ = pipe.write_all(input);
    }
    Ok(Running { command, child })
}

impl Running {
    /// Waits for the process and returns its stdout, or its failure.
    pub(crate) fn output(self) -> Result<String, BackendError> {
        let Running { command, child } = self;
        let output = child
            .wait_with_output()
            .map_err(|source| BackendError::Io {
                command: command.clone(),
                source,
            })?;
        if !output.status.success() {
            return Err(BackendError::Failed {
                command,
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// Whether native nft works here: the kernel answers an nf_tables dump and `nft` is
/// an executable in PATH. Answered in process, so that an apply with `auto` (the
/// default) runs one `nft`, the apply's own; when the dump fails, running `nft list
/// tables` decides, as it always did.
fn nft_usable() -> Result<(), BackendError> {
    if let Err(err) = nf_tables::list_tables() {
        return nft_list_tables(err).map(drop);
    }
    let executable = |dir: std::path::PathBuf| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(dir.join("nft"))
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(executable) {
        Ok(())
    } else {
        Err(BackendError::Missing {
            binary: "nft".to_string(),
            hint: nft::HINT,
        })
    }
}

/// Every backend, for cleaning up after a switch.
pub fn all() -> Vec<Box<dyn Backend>> {
    vec![
        Box::new(Nft),
        Box::new(Iptables::new(Flavor::Nft)),
        Box::new(Iptables::new(Flavor::Legacy)),
    ]
}

/// The backend for an explicit choice.
pub fn named(choice: BackendChoice) -> Option<Box<dyn Backend>> {
    match choice {
        BackendChoice::Auto => None,
        BackendChoice::Nft => Some(Box::new(Nft)),
        BackendChoice::IptablesNft => Some(Box::new(Iptables::new(Flavor::Nft))),
        BackendChoice::IptablesLegacy => Some(Box::new(Iptables::new(Flavor::Legacy))),
    }
}

/// Picks a backend for `--backend auto`, logging why.
///
/// 1. If iptables-legacy already holds rules (ours or anyone's) in this
///    namespace, use legacy: rules split between legacy and nf_tables are
///    evaluated in an order nobody intended and traffic silently breaks.
/// 2. Else native nft, when the binary and the kernel's nf_tables work.
/// 3. Else iptables-nft; 4. else iptables-legacy.
pub fn auto() -> Result<Box<dyn Backend>, BackendError> {
    let mut tried = Vec::new();
    let legacy = Iptables::new(Flavor::Legacy);
    match legacy.has_any_rule() {
        Ok(true) => {
            tracing::info!(
                backend = "iptables-legacy",
                "auto: iptables-legacy already holds rules in this namespace; \
                 using it so rules are not split between legacy and nf_tables"
            );
            return Ok(Box::new(legacy));
        }
        Ok(false) => tracing::debug!("auto: iptables-legacy holds no rules"),
        Err(err) => {
            tracing::info!("auto: cannot list iptables-legacy rules ({err}); skipping that check")
        }
    }
    match nft_usable() {
        Ok(()) => {
            tracing::info!(
                backend = "nft",
                "auto: nft and the kernel's nf_tables work; using native nft"
            );
            return Ok(Box::new(Nft));
        }
        Err(err) => {
            tracing::info!("auto: native nft is not usable: {err}");
            tried.push(format!("nft: {err}"));
        }
    }
    for flavor in [Flavor::Nft, Flavor::Legacy] {
        let backend = Iptables::new(flavor);
        match backend.installed(Family::V4) {
            Ok(_) => {
                tracing::info!(backend = backend.name(), "auto: using {}", backend.name());
                return Ok(Box::new(backend));
            }
            Err(err) => {
                tracing::info!("auto: {} is not usable: {err}", backend.name());
                tried.push(format!("{}: {err}", backend.name()));
            }
        }
    }
    Err(BackendError::NoBackend {
        tried: tried.join("; "),
    })
}
