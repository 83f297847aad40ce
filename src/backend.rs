//! Backends: the runners that install a [`Ruleset`] in the kernel.
//!
//! Each backend applies in one transaction per family and reads back only
//! what is ours. The `nft` backend is the default; iptables is for hosts
//! where nftables cannot be used.

mod nft;

use std::io::Write;
use std::process::{Command, Stdio};

use meshinit_rules::Ruleset;
use thiserror::Error;

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
    #[error("cannot read `{command}` output: {message}")]
    Unreadable { command: String, message: String },
}

/// A way of installing rules.
pub trait Backend {
    /// Short name for logs: `nft`, `iptables-nft`, `iptables-legacy`.
    fn name(&self) -> &'static str;
    /// What `show` and `--dry-run` print.
    fn render(&self, ruleset: &Ruleset) -> String;
    /// Replaces our rules with `ruleset`, atomically.
    fn apply(&self, ruleset: &Ruleset) -> Result<(), BackendError>;
    /// Removes our rules (and nothing else); succeeds when there are none.
    fn cleanup(&self) -> Result<(), BackendError>;
    /// Differences between what is installed and `ruleset`; empty when equal.
    fn diff(&self, ruleset: &Ruleset) -> Result<Vec<String>, BackendError>;
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
    let output = child.wait_with_output().map_err(|source| BackendError::Io {
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
