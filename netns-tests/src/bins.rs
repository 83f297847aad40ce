//! The binaries under test: where they are, and running `meshinit` in a namespace.

use std::path::PathBuf;
use std::process::Command;

use crate::netns::Netns;
use crate::process::Run;

/// `meshinit`, from `$MESHINIT_BIN` or next to the test executable.
pub fn meshinit_bin() -> PathBuf {
    locate("meshinit", "MESHINIT_BIN")
}

/// `meshproxy`, from `$MESHPROXY_BIN` or next to the test executable.
pub fn meshproxy_bin() -> PathBuf {
    locate("meshproxy", "MESHPROXY_BIN")
}

/// This crate's `netns-probe` client, from `$NETNS_PROBE_BIN` or next to the test executable.
pub fn netns_probe_bin() -> PathBuf {
    locate("netns-probe", "NETNS_PROBE_BIN")
}

/// A test runs as `target/<profile>/deps/<test>-<hash>`, and `cargo build` puts binaries in
/// `target/<profile>/`; `env` overrides that for a binary built elsewhere.
fn locate(name: &str, env: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            panic!(
                "{env}={} is not a file: build it first: cargo build --workspace --bins",
                path.display()
            );
        }
        return path;
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let mut dir = exe
        .parent()
        .expect("the test executable's directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "{} not found: build it first: cargo build --workspace --bins (or set {env})",
            path.display()
        );
    }
    path
}

impl Netns {
    /// `meshinit ARGS…` run inside the namespace (`ip netns exec`), to completion.
    pub fn meshinit(&self, args: &[&str]) -> Run {
        Run::of(self.meshinit_command().args(args))
    }

    /// The `meshinit` command inside the namespace, to add arguments or environment to.
    pub fn meshinit_command(&self) -> Command {
        self.command(meshinit_bin())
    }
}
