//! Finished commands ([`Run`]) and background processes ([`Spawned`]).

use std::fmt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

/// A command that ran to completion: how it was called, its exit code and its output.
///
/// `Display` shows all of it, so `panic!("{run}")` is a complete report.
#[derive(Debug, Clone)]
pub struct Run {
    /// The command line, for messages.
    pub command: String,
    /// The exit code; `None` when a signal ended the process.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Runs `cmd` to completion with stdin closed, capturing stdout and stderr.
    ///
    /// Panics only when the command cannot be started at all.
    pub fn of(cmd: &mut Command) -> Run {
        let command = describe(cmd);
        let output = cmd
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
        Run {
            command,
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// True when the command exited with status 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Returns `self` when the command exited with status 0, panics with the report otherwise.
    #[track_caller]
    pub fn expect_ok(self) -> Run {
        if !self.success() {
            panic!("expected exit 0\n{self}");
        }
        self
    }

    /// Returns `self` when the command exited with `code`, panics with the report otherwise.
    #[track_caller]
    pub fn expect_code(self, code: i32) -> Run {
        if self.code != Some(code) {
            panic!("expected exit {code}\n{self}");
        }
        self
    }
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = match self.code {
            Some(code) => code.to_string(),
            None => "a signal".to_string(),
        };
        write!(
            f,
            "`{}` exited with {code}\n--- stdout\n{}--- stderr\n{}---",
            self.command, self.stdout, self.stderr
        )
    }
}

/// A background process, killed (SIGKILL) and reaped on `Drop`.
///
/// Its pid is also recorded with the namespace that started it, so the namespace kills it
/// too if it outlives this guard (the guard was leaked, or dropped after the namespace).
#[derive(Debug)]
pub struct Spawned {
    child: Child,
    command: String,
    registry: Arc<Mutex<Vec<u32>>>,
}

impl Spawned {
    pub(crate) fn start(cmd: &mut Command, registry: Arc<Mutex<Vec<u32>>>) -> Spawned {
        let command = describe(cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
        registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(child.id());
        Spawned {
            child,
            command,
            registry,
        }
    }

    /// The process id (`ip netns exec` execs the program, so this is the program itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The command line, for messages.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // Killing an exited but unreaped child is harmless: its pid cannot be reused
        // before `wait` below.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let pid = self.child.id();
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|&p| p != pid);
    }
}

/// `program arg arg` with `NAME=value` for environment overrides, for messages.
fn describe(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .map(|(k, v)| {
            let v = v
                .map(|v| v.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!("{}={v}", k.to_string_lossy())
        })
        .collect();
    parts.push(cmd.get_program().to_string_lossy().into_owned());
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}
