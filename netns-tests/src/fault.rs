//! Fault injection: stand-in tools put first in meshinit's `PATH`.
//!
//! A test names the tools to replace (`nft`, `ip6tables-nft-restore`, …) and a shell
//! script for each; every other tool resolves to the real one. The directory is removed
//! on `Drop`.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use crate::{meshinit_bin, Netns, Run};

/// A script that fails like a refusing tool: a message on stderr, exit 1.
pub const FAILS: &str = "#!/bin/sh\necho \"injected failure\" >&2\nexit 1\n";
/// A script killed by SIGKILL after reading its whole input, as if the OOM killer or a
/// timeout took it mid-run (before it could commit anything).
pub const KILLED: &str = "#!/bin/sh\ncat >/dev/null\nkill -9 $$\n";

/// A directory of stand-in tools, first in meshinit's PATH.
pub struct FaultyTools {
    dir: PathBuf,
}

impl FaultyTools {
    /// Installs `script` under each name in `tools`; `test` keeps directories apart.
    pub fn new(test: &str, tools: &[&str], script: &str) -> FaultyTools {
        let dir = std::env::temp_dir().join(format!("netns-tests-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fault directory");
        for tool in tools {
            let path = dir.join(tool);
            std::fs::write(&path, script).expect("write a stand-in tool");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .expect("make the stand-in executable");
        }
        FaultyTools { dir }
    }

    /// `meshinit ARGS…` in `ns`, with the stand-ins first in its PATH.
    pub fn meshinit(&self, ns: &Netns, args: &[&str]) -> Run {
        let path = std::env::var("PATH").unwrap_or_default();
        let mut cmd = ns.command("env");
        cmd.arg(format!("PATH={}:{path}", self.dir.display()))
            .arg(meshinit_bin())
            .args(args);
        Run::of(&mut cmd)
    }
}

impl Drop for FaultyTools {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
