//! One named network namespace, created with `ip netns add` and removed on `Drop`.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::process::{Run, Spawned};

/// Where `ip netns add` puts the namespace files.
const NETNS_DIR: &str = "/var/run/netns";

/// A named network namespace (`/var/run/netns/NAME`), deleted on `Drop` together with every
/// process still running in it.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// Pids of the background processes started with [`Netns::spawn`] that are not reaped yet.
    children: Arc<Mutex<Vec<u32>>>,
}

impl Netns {
    /// Creates the namespace `name` with `lo` up. Panics when not root or when `ip` fails.
    pub fn create(name: &str) -> Netns {
        require_root();
        Run::of(Command::new("ip").args(["netns", "add", name])).expect_ok();
        // From here on `Drop` removes the namespace, even if a later step panics.
        let ns = Netns {
            name: name.to_string(),
            children: Arc::default(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file, for `meshinit --netns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// The namespace's inode: two namespace files name the same namespace when they are equal.
    pub fn inode(&self) -> u64 {
        let path = self.path();
        std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()))
            .ino()
    }

    /// `ip -n NAME ARGS…`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> Run {
        Run::of(Command::new("ip").arg("-n").arg(&self.name).args(args)).expect_ok()
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME program`);
    /// add arguments and environment, then pass it to [`Run::of`] or [`Netns::spawn`].
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `argv` inside the namespace to completion and returns its exit code and output.
    /// A non-zero exit is not a panic: check it with [`Run::expect_ok`] or [`Run::code`].
    pub fn exec(&self, argv: &[&str]) -> Run {
        let (program, args) = argv.split_first().expect("exec needs a program");
        Run::of(self.command(program).args(args))
    }

    /// Starts `cmd` (built with [`Netns::command`]) in the background. The process is killed
    /// when the returned guard is dropped, and at the latest when this namespace is.
    pub fn spawn(&self, mut cmd: Command) -> Spawned {
        Spawned::start(&mut cmd, Arc::clone(&self.children))
    }

    /// Starts `sleep` in the namespace and returns once it is inside, so that
    /// `/proc/PID/ns/net` names this namespace (for `meshinit --netns /proc/PID/ns/net`).
    pub fn spawn_sleeper(&self) -> Spawned {
        let mut cmd = self.command("sleep");
        cmd.arg("600");
        let mut sleeper = self.spawn(cmd);
        let want = self.inode();
        let path = format!("/proc/{}/ns/net", sleeper.pid());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // `ip netns exec` enters the namespace before it execs `sleep` under the same pid.
            if std::fs::metadata(&path).map(|m| m.ino()).ok() == Some(want) {
                return sleeper;
            }
            if !sleeper.is_running() || Instant::now() > deadline {
                panic!("`{}` never entered {}", sleeper.command(), self.name);
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Runs `f` on a fresh thread that has entered this namespace (`setns(CLONE_NEWNET)` on
    /// that thread only) and returns its result; a panic in `f` is re-raised here.
    ///
    /// Sockets opened by `f` stay in this namespace after the thread ends, so a listener or
    /// stream returned from `f` can be used from any thread.
    pub fn run<T, F>(&self, f: F) -> T
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        let path = self.path();
        let file =
            File::open(&path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        thread::scope(|scope| {
            let thread = scope.spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns into {}: {e}", path.display()));
                f()
            });
            match thread.join() {
                Ok(value) => value,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Kills every process still in the namespace: the unreaped [`Netns::spawn`] children and
    /// whatever they started (`ip netns pids`). The namespace is unique to one test, so all of
    /// them were started by it.
    fn kill_processes(&self) {
        let mut pids: Vec<u32> = self
            .children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let listed = Run::of(Command::new("ip").args(["netns", "pids", &self.name]));
        pids.extend(
            listed
                .stdout
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
        pids.retain(|&pid| pid != std::process::id());
        for &pid in &pids {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        // SIGKILL is asynchronous: wait (briefly) until they are gone, so that nothing of the
        // test outlives it.
        let deadline = Instant::now() + Duration::from_secs(2);
        while pids.iter().any(|&pid| is_alive(pid)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.kill_processes();
        let del = Run::of(Command::new("ip").args(["netns", "del", &self.name]));
        // A failed delete leaks a namespace on the machine: say so, but do not panic while a
        // test's own panic may be unwinding.
        if !del.success() {
            eprintln!(
                "netns-tests: could not delete namespace {}\n{del}",
                self.name
            );
        }
    }
}

/// True while `pid` exists and is not a zombie (a killed process that nobody reaped yet is
/// dead for our purposes).
pub(crate) fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // `pid (comm) STATE …`; comm may contain spaces and parentheses.
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// Panics unless the process runs as root: namespaces and nftables need it, and a test that
/// skips silently would prove nothing.
fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("netns tests need root: run scripts/test.sh as root");
    }
}
