//! `meshproxy identity`: names must be exact DNS names and files stay inside `--out`;
//! `new-ca` does not replace a CA without `--force`. Exit 2 (bad input) names the
//! value and writes nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("meshproxy-cli-{test}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn meshproxy(args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_meshproxy"))
        .args(args)
        .output()
        .expect("run meshproxy");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Every file under `dir` with its contents.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap_or_default());
            }
        }
    }
    files
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn issue_refuses_names_that_are_not_dns_names_and_writes_nothing() {
    let root = TempDir::new("names");
    // Deep enough that `../..` from --out still lands inside the test's directory,
    // where the snapshot below would see any file written there.
    let ca = root.0.join("ca");
    let out = root.0.join("a/b/out");
    std::fs::create_dir_all(&out).unwrap();
    assert_eq!(meshproxy(&["identity", "new-ca", s(&ca)]).code, Some(0));
    let before = tree(&root.0);

    let long_label = format!("{}.mesh.local", "a".repeat(64));
    let long_name = [
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(63),
        "e".repeat(62),
    ]
    .join(".");
    for name in [
        "*.shop.mesh.local",
        "web default.mesh.local",
        "../../escape",
        "../escape.mesh.local",
        "a/b.mesh.local",
        "/tmp/abs.mesh.local",
        "a..b.mesh.local",
        "a.b.mesh.local.",
        ".",
        "..",
        "",
        "-rf.mesh.local",
        &long_label,
        &long_name,
    ] {
        let run = meshproxy(&[
            "identity",
            "issue",
            "--ca",
            s(&ca),
            "--out",
            s(&out),
            "--",
            name,
        ]);
        assert_eq!(run.code, Some(2), "{name:?}: {}", run.stderr);
        assert!(
            run.stderr.contains(&format!("{name:?}")),
            "{name:?} not named: {}",
            run.stderr
        );
        assert!(run.stdout.is_empty(), "{name:?}: {}", run.stdout);
        assert_eq!(tree(&root.0), before, "{name:?} wrote something");
    }
    assert!(!root.0.join("a/escape.crt").exists());

    // A DNS name is issued, inside --out.
    let run = meshproxy(&[
        "identity",
        "issue",
        "--ca",
        s(&ca),
        "--out",
        s(&out),
        "redis-a.shop.mesh.local",
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(out.join("redis-a.shop.mesh.local.crt").is_file());
    assert!(out.join("redis-a.shop.mesh.local.key").is_file());
}

#[test]
fn issue_does_not_follow_a_symlink_planted_in_out() {
    let root = TempDir::new("symlink");
    let ca = root.0.join("ca");
    let out = root.0.join("out");
    let outside = root.0.join("outside");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    assert_eq!(meshproxy(&["identity", "new-ca", s(&ca)]).code, Some(0));
    // Someone with write access to --out points the temporary name elsewhere.
    std::os::unix::fs::symlink(
        outside.join("stolen.key"),
        out.join("web.mesh.local.key.tmp"),
    )
    .unwrap();
    let run = meshproxy(&[
        "identity",
        "issue",
        "--ca",
        s(&ca),
        "--out",
        s(&out),
        "web.mesh.local",
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        !outside.join("stolen.key").exists(),
        "wrote through the link"
    );
    assert!(out.join("web.mesh.local.key").is_file());
}

#[test]
fn new_ca_does_not_replace_a_ca_without_force() {
    let root = TempDir::new("new-ca");
    let ca = root.0.join("ca");
    assert_eq!(meshproxy(&["identity", "new-ca", s(&ca)]).code, Some(0));
    let before = tree(&root.0);

    let run = meshproxy(&["identity", "new-ca", s(&ca)]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains(s(&ca.join("ca.crt"))), "{}", run.stderr);
    assert!(run.stderr.contains("--force"), "{}", run.stderr);
    assert_eq!(tree(&root.0), before, "the CA was changed");

    // Half a CA (the key alone) is refused too, naming that file.
    std::fs::remove_file(ca.join("ca.crt")).unwrap();
    let run = meshproxy(&["identity", "new-ca", s(&ca)]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains(s(&ca.join("ca.key"))), "{}", run.stderr);

    // With --force it is replaced.
    let run = meshproxy(&["identity", "new-ca", "--force", s(&ca)]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_ne!(
        std::fs::read(ca.join("ca.key")).unwrap(),
        before[&ca.join("ca.key")],
        "a new key"
    );
    assert!(ca.join("ca.crt").is_file());
}

#[test]
fn help_lists_the_metrics_and_identity_flags() {
    let run = meshproxy(&["--help"]);
    assert_eq!(run.code, Some(0));
    assert!(
        run.stdout.contains("--metrics-retain-idle"),
        "{}",
        run.stdout
    );
    let run = meshproxy(&["identity", "new-ca", "--help"]);
    assert!(run.stdout.contains("--force"), "{}", run.stdout);
}

/// `--owner UID[:GID]` gives both files to the proxy's uid (the key is 0600, so the
/// proxy can read it only as its owner); a bad owner is exit 2, naming it, nothing
/// written. Needs root (chown); fails loudly without it.
#[test]
fn issue_owner_gives_the_files_to_that_uid_and_gid() {
    use std::os::unix::fs::MetadataExt;
    let root = TempDir::new("owner");
    let ca = root.0.join("ca");
    assert_eq!(meshproxy(&["identity", "new-ca", s(&ca)]).code, Some(0));

    let out = root.0.join("uid-gid");
    let issued = meshproxy(&[
        "identity",
        "issue",
        "--ca",
        s(&ca),
        "--owner",
        "2102:2103",
        "b.mesh.local",
        "--out",
        s(&out),
    ]);
    assert_eq!(issued.code, Some(0), "stderr: {}", issued.stderr);
    for file in ["b.mesh.local.crt", "b.mesh.local.key"] {
        let meta = std::fs::metadata(out.join(file)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (2102, 2103), "{file}");
    }
    let key = std::fs::metadata(out.join("b.mesh.local.key")).unwrap();
    assert_eq!(key.mode() & 0o777, 0o600);

    // UID alone keeps the group of whoever ran it.
    let out = root.0.join("uid");
    let issued = meshproxy(&[
        "identity",
        "issue",
        "--ca",
        s(&ca),
        "--owner",
        "2102",
        "b.mesh.local",
        "--out",
        s(&out),
    ]);
    assert_eq!(issued.code, Some(0), "stderr: {}", issued.stderr);
    let meta = std::fs::metadata(out.join("b.mesh.local.key")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (2102, nix::unistd::getegid().as_raw())
    );

    for bad in [
        "proxy",
        "2102:",
        ":2102",
        "-1",
        "2102:2102:1",
        "99999999999",
    ] {
        let out = root.0.join("bad");
        let owner = format!("--owner={bad}");
        let refused = meshproxy(&[
            "identity",
            "issue",
            "--ca",
            s(&ca),
            &owner,
            "b.mesh.local",
            "--out",
            s(&out),
        ]);
        assert_eq!(refused.code, Some(2), "{bad}: {}", refused.stderr);
        assert!(refused.stderr.contains(bad), "{bad}: {}", refused.stderr);
        assert!(!out.exists(), "{bad}: wrote {}", out.display());
    }
}
