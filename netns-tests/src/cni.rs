//! A tiny CNI runtime: runs a conflist's plugins in order, as libcni does, with the real
//! reference plugins (Debian's `containernetworking-plugins`, in `/usr/lib/cni`) and
//! `meshinit` installed as `meshinit-cni`.
//!
//! Every plugin runs inside a dedicated "node" namespace (`ip netns exec NODE plugin`), so
//! the bridge the `bridge` plugin creates lives there and the host's namespace is never
//! touched. Each pod is a fresh namespace joined to that bridge by the plugin's veth.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{json, Value};

use crate::bins::meshinit_bin;
use crate::netns::Netns;
use crate::process::Run;

/// Where Debian installs the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// The pod subnet host-local allocates from (inside DESIGN.md's 198.18.0.0/15).
pub const POD_SUBNET: &str = "198.18.64.0/24";

static SERIAL: AtomicU32 = AtomicU32::new(0);

/// A node namespace, a plugin directory (`CNI_PATH`) and host-local's data directory,
/// all removed on `Drop`.
#[derive(Debug)]
pub struct CniNode {
    pub node: Netns,
    /// The temporary directory: `bin/` (CNI_PATH) and `ipam/` (host-local's dataDir).
    dir: PathBuf,
    /// The bridge the `bridge` plugin creates in the node namespace.
    pub bridge: String,
}

/// The result of one plugin, or of a whole chain: the last plugin's run.
#[derive(Debug, Clone)]
pub struct CniRun {
    pub run: Run,
}

impl CniRun {
    /// stdout as JSON (the result, or the error object); panics when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.run.stdout)
            .unwrap_or_else(|e| panic!("plugin stdout is not JSON ({e})\n{}", self.run))
    }

    /// The CNI error code of a failed run; panics when the run succeeded.
    #[track_caller]
    pub fn error_code(&self) -> u64 {
        if self.run.success() {
            panic!("expected a CNI error\n{}", self.run);
        }
        let error = self.json();
        error["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("no \"code\" in the error\n{}", self.run))
    }

    #[track_caller]
    pub fn expect_ok(self) -> CniRun {
        if !self.run.success() {
            panic!("expected the plugin to succeed\n{}", self.run);
        }
        self
    }
}

/// What one invocation is about: the pod's namespace and identity.
#[derive(Debug, Clone)]
pub struct Invocation<'a> {
    pub container_id: &'a str,
    /// The namespace file; `None` sends no CNI_NETNS (allowed for DEL).
    pub netns: Option<PathBuf>,
    pub args: &'a str,
}

impl CniNode {
    /// Creates the node namespace and the directories for the test `test_name`.
    pub fn new(test_name: &str) -> CniNode {
        for plugin in ["bridge", "host-local", "loopback"] {
            let path = Path::new(REFERENCE_PLUGINS).join(plugin);
            if !path.is_file() {
                panic!(
                    "{} not found: install the reference CNI plugins (apt-get install containernetworking-plugins)",
                    path.display()
                );
            }
        }
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let node = Netns::create(&format!("nt-{}-node-{pid}-{serial}", short(test_name)));
        let dir = std::env::temp_dir().join(format!("nt-cni-{pid}-{serial}"));
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).expect("create the plugin directory");
        std::fs::create_dir_all(dir.join("ipam")).expect("create host-local's directory");
        for plugin in ["bridge", "host-local", "loopback"] {
            std::os::unix::fs::symlink(Path::new(REFERENCE_PLUGINS).join(plugin), bin.join(plugin))
                .expect("link a reference plugin");
        }
        // The usual install: a symlink named after the conflist's "type".
        std::os::unix::fs::symlink(meshinit_bin(), bin.join("meshinit-cni"))
            .expect("link meshinit-cni");
        CniNode {
            node,
            dir,
            bridge: format!("nt-br{}", (pid % 100_000) * 100 + serial % 100),
        }
    }

    /// `CNI_PATH`.
    pub fn plugin_dir(&self) -> PathBuf {
        self.dir.join("bin")
    }

    /// A directory for a test's own files (an annotations file).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The plugin list: bridge + host-local (no gateway on the bridge, no masquerade, a
    /// default route so the validator's test address is routable), then meshinit with
    /// `meshinit` merged into its entry.
    pub fn conflist(&self, meshinit: Value) -> Value {
        let mut ours = json!({"type": "meshinit-cni"});
        if let (Some(ours), Some(extra)) = (ours.as_object_mut(), meshinit.as_object()) {
            ours.extend(extra.clone());
        }
        json!({
            "cniVersion": "1.0.0",
            "name": "nt-mesh",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": false,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": self.dir.join("ipam"),
                        "ranges": [[{"subnet": POD_SUBNET}]],
                        "routes": [{"dst": "0.0.0.0/0"}]
                    }
                },
                ours
            ]
        })
    }

    /// Runs one plugin (`conf` is its entry, `cniVersion`/`name` are added from `list`,
    /// `prev` becomes `prevResult`) with raw stdin bytes when `raw` is given.
    pub fn plugin(
        &self,
        command: &str,
        list: &Value,
        conf: &Value,
        prev: Option<&Value>,
        inv: &Invocation<'_>,
        raw: Option<&[u8]>,
    ) -> CniRun {
        let mut conf = conf.clone();
        let object = conf.as_object_mut().expect("a plugin entry is an object");
        object.insert("cniVersion".into(), list["cniVersion"].clone());
        object.insert("name".into(), list["name"].clone());
        if let Some(prev) = prev {
            object.insert("prevResult".into(), prev.clone());
        }
        let plugin = conf["type"].as_str().expect("a plugin type").to_string();
        let stdin = match raw {
            Some(raw) => raw.to_vec(),
            None => serde_json::to_vec(&conf).expect("serialise the config"),
        };
        let mut cmd = self.node.command(self.plugin_dir().join(&plugin));
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", inv.container_id)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", inv.args)
            .env("CNI_PATH", self.plugin_dir());
        match &inv.netns {
            Some(netns) => cmd.env("CNI_NETNS", netns),
            None => cmd.env_remove("CNI_NETNS"),
        };
        CniRun {
            run: run_with_stdin(&mut cmd, &stdin),
        }
    }

    /// ADD through the whole list (as libcni: each result becomes the next prevResult);
    /// returns the final result. Panics when a plugin fails.
    pub fn add(&self, list: &Value, inv: &Invocation<'_>) -> Value {
        // The runtime brings up lo with its own network first.
        let lo = json!({"cniVersion": list["cniVersion"], "name": "nt-lo", "type": "loopback"});
        self.plugin("ADD", &lo, &lo, None, inv, None).expect_ok();
        let mut prev: Option<Value> = None;
        for conf in list["plugins"].as_array().expect("plugins") {
            let run = self
                .plugin("ADD", list, conf, prev.as_ref(), inv, None)
                .expect_ok();
            prev = Some(run.json());
        }
        prev.expect("a result")
    }

    /// CHECK through the list with the cached result; the first failure is returned.
    pub fn check(&self, list: &Value, result: &Value, inv: &Invocation<'_>) -> CniRun {
        let mut last = None;
        for conf in list["plugins"].as_array().expect("plugins") {
            let run = self.plugin("CHECK", list, conf, Some(result), inv, None);
            if !run.run.success() {
                return run;
            }
            last = Some(run);
        }
        last.expect("a plugin")
    }

    /// DEL through the list in reverse order with the cached result; the first failure is
    /// returned.
    pub fn del(&self, list: &Value, result: Option<&Value>, inv: &Invocation<'_>) -> CniRun {
        let mut last = None;
        for conf in list["plugins"].as_array().expect("plugins").iter().rev() {
            let run = self.plugin("DEL", list, conf, result, inv, None);
            if !run.run.success() {
                return run;
            }
            last = Some(run);
        }
        last.expect("a plugin")
    }

    /// meshinit's entry of `list` (the last plugin).
    pub fn ours(list: &Value) -> &Value {
        list["plugins"]
            .as_array()
            .and_then(|plugins| plugins.last())
            .expect("meshinit's entry")
    }
}

impl Drop for CniNode {
    fn drop(&mut self) {
        // The node namespace (and its bridge) goes with `self.node`.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn short(test_name: &str) -> String {
    test_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(24)
        .collect()
}

/// Runs `cmd` to completion with `stdin` as its input.
fn run_with_stdin(cmd: &mut Command, stdin: &[u8]) -> Run {
    let command = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
    if let Some(mut pipe) = child.stdin.take() {
        let _ = pipe.write_all(stdin);
    }
    let output = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("`{command}`: {e}"));
    Run {
        command: format!("{command} <<< {}", String::from_utf8_lossy(stdin)),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
