//! The trust boundary: meshinit refuses to redirect the host's own namespace, never
//! silently leaves IPv6 unmeshed, treats its lock file like any root-owned path in a
//! shared directory, and as a CNI plugin bounds its input and always cleans up on DEL.
//!
//! Only one test here runs meshinit in the host's namespace, and only to prove that it is
//! refused before anything is done: meshinit gets an empty PATH (no nft, no iptables), so
//! even a broken refusal could not change the host, and the host's whole firewall is
//! compared before and after.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use netns_tests::cni::{CniNode, Invocation};
use netns_tests::{meshinit_bin, normalise_nft, normalise_save, Family, Netns, Pods, Run};
use serde_json::{json, Value};

/// The fixed inode of the initial network namespace on Linux 6.18 and later.
const NET_NS_INIT_INO: u64 = 0xEFFF_FFF9;

/// Panics unless this test process runs in the host's initial network namespace (the
/// fixed inode, or kthreadd's namespace on older kernels).
fn require_host_namespace() {
    let ino = |path: &str| std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
    let mine = ino("/proc/thread-self/ns/net").expect("read our namespace");
    assert!(
        mine.1 == NET_NS_INIT_INO || ino("/proc/2/ns/net") == Some(mine),
        "this test must run in the host's initial network namespace (ours is inode {:#x})",
        mine.1
    );
}

/// The host's whole firewall, read the way `Netns::firewall` reads a namespace's.
fn host_firewall() -> String {
    let read = |argv: &[&str]| {
        Run::of(Command::new(argv[0]).args(&argv[1..]))
            .expect_ok()
            .stdout
    };
    let mut out = String::from("## nft list ruleset\n");
    out.push_str(&normalise_nft(&read(&["nft", "list", "ruleset"])));
    for tool in [
        "iptables-nft-save",
        "ip6tables-nft-save",
        "iptables-legacy-save",
        "ip6tables-legacy-save",
    ] {
        out.push_str(&format!("## {tool}\n"));
        out.push_str(&normalise_save(&read(&[tool])));
    }
    out
}

/// An empty directory for meshinit's PATH, removed on drop.
struct EmptyPath(PathBuf);

impl EmptyPath {
    fn new(test: &str) -> EmptyPath {
        let dir = std::env::temp_dir().join(format!("nt-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        EmptyPath(dir)
    }
}

impl Drop for EmptyPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn apply_and_repair_in_the_host_namespace_are_refused_and_change_nothing() {
    require_host_namespace();
    let empty = EmptyPath::new("host-refused");
    let before = host_firewall();
    let meshinit = |args: &[&str], env: &[(&str, &str)]| {
        Run::of(
            Command::new(meshinit_bin())
                .args(args)
                .env_clear()
                .env("PATH", &empty.0)
                .envs(env.iter().copied()),
        )
    };
    for args in [
        &[][..],
        &["apply"],
        &["apply", "--outbound-ports-to-ignore", "5555"],
        &["check", "--repair"],
        // Naming the host's namespace explicitly is no different.
        &["apply", "--netns", "/proc/self/ns/net"],
        // An explicit "no" is still no.
        &["apply", "--allow-host-netns=false"],
    ] {
        let run = meshinit(args, &[]).expect_code(2);
        for needle in [
            "refusing to redirect the host",
            "--netns /var/run/netns/NAME",
            "--allow-host-netns",
            "nothing was changed",
        ] {
            assert!(run.stderr.contains(needle), "{needle:?} missing\n{run}");
        }
    }
    let run = meshinit(&["apply"], &[("MESHINIT_ALLOW_HOST_NETNS", "false")]).expect_code(2);
    assert!(
        run.stderr.contains("refusing to redirect the host"),
        "{run}"
    );
    // Reading is not refused: `check` gets as far as looking for a backend (none on PATH).
    let run = meshinit(&["check"], &[]).expect_code(1);
    assert!(!run.stderr.contains("refusing"), "{run}");

    // CNI ADD with the host's namespace as CNI_NETNS: refused the same way.
    let conf =
        json!({"cniVersion": "1.0.0", "name": "n", "type": "meshinit-cni", "prevResult": {}});
    let run = with_stdin(
        Command::new(meshinit_bin())
            .arg("cni")
            .env_clear()
            .env("PATH", &empty.0)
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", "c-host")
            .env("CNI_IFNAME", "eth0")
            .env("CNI_NETNS", "/proc/self/ns/net"),
        conf.to_string().as_bytes(),
    );
    assert_eq!(run.code, Some(2), "{run}");
    let error: Value = serde_json::from_str(&run.stdout).expect("a CNI error object");
    assert_eq!(error["code"], 4, "{run}");
    let details = error["details"].as_str().unwrap_or_default();
    assert!(details.contains("refusing to redirect the host"), "{run}");
    assert!(
        details.contains("CNI_NETNS must be the pod's namespace"),
        "{run}"
    );

    assert_eq!(host_firewall(), before, "a refused run changed the host");
}

/// Runs `cmd` to completion with `stdin` as its input.
fn with_stdin(cmd: &mut Command, stdin: &[u8]) -> Run {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start meshinit");
    if let Some(mut pipe) = child.stdin.take() {
        let _ = pipe.write_all(stdin);
    }
    let output = child.wait_with_output().expect("wait for meshinit");
    Run {
        command: format!("{cmd:?}"),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[test]
fn ipv6_off_warns_naming_the_namespaces_ipv6_addresses() {
    let pods = Pods::new("trust_ipv6_off_warns");
    let v6 = Family::V6.pod().to_string();
    for args in [
        &["apply", "--ipv6=false"][..],
        &["check", "--ipv6=false"],
        &["apply", "--ipv6=false", "--dry-run"],
    ] {
        let run = pods.pod.meshinit(args);
        assert!(
            run.stderr
                .contains("--ipv6=false, but this namespace has IPv6 addresses")
                && run.stderr.contains(&v6),
            "{args:?}: no warning naming {v6}\n{run}"
        );
    }
    // IPv6 redirected: no warning.
    let run = pods.pod.meshinit(&["apply"]).expect_ok();
    assert!(!run.stderr.contains("--ipv6=false, but"), "{run}");
    // Only loopback and link-local IPv6: nothing leaves the pod unmeshed, no warning.
    let bare = Netns::create(&format!("{}-bare", pods.pod.name()));
    bare.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    bare.ip(&["link", "set", "v0", "up"]);
    bare.ip(&["link", "set", "v1", "up"]);
    bare.ip(&["addr", "add", "fe80::18/64", "dev", "v0", "nodad"]);
    let run = bare.meshinit(&["apply", "--ipv6=false"]).expect_ok();
    assert!(!run.stderr.contains("--ipv6=false, but"), "{run}");
}

/// Runs `setup`, then `meshinit ARGS`, in `ns` with a private tmpfs on /run (inside `ip
/// netns exec`'s own mount namespace, so the host's /run and the real lock are untouched).
fn with_private_run(ns: &Netns, setup: &str, args: &str) -> Run {
    let script = format!(
        "set -e; mount -t tmpfs -o mode=0755 nt-run /run; {setup}; set +e; timeout 20 {} {args}",
        meshinit_bin().display()
    );
    let mut cmd = ns.command("sh");
    cmd.args(["-c", &script]);
    Run::of(&mut cmd)
}

#[test]
fn a_planted_or_foreign_lock_file_is_refused_and_nothing_changes() {
    let pods = Pods::new("trust_lock_file");
    pods.pod
        .meshinit(&["apply", "--outbound-ports-to-ignore", "5555"])
        .expect_ok();
    let before = pods.pod.firewall();
    for (what, setup, needle) in [
        (
            "symlink",
            "ln -s /run/planted /run/meshinit.lock",
            "it is a symlink",
        ),
        ("FIFO", "mkfifo /run/meshinit.lock", "FIFO"),
        (
            "foreign file",
            "touch /run/meshinit.lock; chown 65534 /run/meshinit.lock",
            "owned by uid 65534",
        ),
        ("directory", "mkdir /run/meshinit.lock", "a directory"),
    ] {
        for args in ["apply --outbound-ports-to-ignore 6666", "cleanup"] {
            let started = Instant::now();
            let run = with_private_run(
                &pods.pod,
                &format!("{setup}; trap 'test ! -e /run/planted || echo FOLLOWED' EXIT"),
                args,
            );
            assert_eq!(run.code, Some(1), "{what} / {args}: exit 1\n{run}");
            assert!(
                run.stderr.contains("/run/meshinit.lock") && run.stderr.contains(needle),
                "{what} / {args}: the message should name the lock and {needle:?}\n{run}"
            );
            assert!(
                !run.stdout.contains("FOLLOWED"),
                "{what}: symlink followed\n{run}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{what} / {args}: took {:?}",
                started.elapsed()
            );
            assert_eq!(
                pods.pod.firewall(),
                before,
                "{what} / {args} changed the rules"
            );
        }
    }
}

#[test]
fn a_held_lock_is_waited_for_at_most_lock_timeout() {
    let pods = Pods::new("trust_lock_timeout");
    pods.pod
        .meshinit(&["apply", "--outbound-ports-to-ignore", "5555"])
        .expect_ok();
    let before = pods.pod.firewall();
    // `flock` holds the lock (in the background, killed when the script ends) while
    // meshinit waits for it.
    let hold = "touch /run/meshinit.lock; chmod 600 /run/meshinit.lock; \
                flock /run/meshinit.lock -c 'touch /run/held; sleep 60' >/dev/null 2>&1 & holder=$!; \
                trap 'kill $holder 2>/dev/null; pkill -P $holder 2>/dev/null' EXIT; \
                while [ ! -e /run/held ]; do sleep 0.02; done";
    let started = Instant::now();
    let run = with_private_run(
        &pods.pod,
        hold,
        "apply --outbound-ports-to-ignore 6666 --lock-timeout 1s",
    );
    let took = started.elapsed();
    assert_eq!(run.code, Some(1), "{run}");
    assert!(
        run.stderr
            .contains("gave up waiting for the lock file /run/meshinit.lock after 1s"),
        "{run}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "took {took:?}\n{run}"
    );
    assert_eq!(
        pods.pod.firewall(),
        before,
        "a timed-out run changed the rules"
    );
    // The same with the timeout from the environment, and a free lock: it applies.
    let mut cmd = pods.pod.meshinit_command();
    cmd.args(["apply", "--outbound-ports-to-ignore", "6666"])
        .env("MESHINIT_LOCK_TIMEOUT", "2s");
    Run::of(&mut cmd).expect_ok();
}

const K8S_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0";

#[test]
fn cni_del_removes_our_rules_whatever_is_wrong_with_the_settings() {
    let node = CniNode::new("trust_cni_del");
    let pod = Netns::create(&format!("{}-pod", node.node.name()));
    let list = node.conflist(json!({}));
    let inv = Invocation {
        container_id: "c-trust-del",
        netns: Some(pod.path()),
        args: K8S_ARGS,
    };
    let ours = CniNode::ours(&list).clone();
    let with = |extra: Value| {
        let mut conf = ours.clone();
        conf.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        conf
    };
    let missing = node.file("no-such-annotations.json");
    for (what, conf) in [
        (
            "bad port",
            with(json!({"outbound_ports_to_ignore": "70000"})),
        ),
        (
            "unknown key",
            with(json!({"outbound_port_to_ignore": "5432"})),
        ),
        (
            "missing annotations file",
            with(json!({"annotations_file": missing})),
        ),
        (
            "bad annotation",
            with(
                json!({"annotations": {"shop/web-0": {"config.linkerd.io/skip-outbound-ports": "abc"}}}),
            ),
        ),
        (
            "excluded namespace",
            with(json!({"exclude_namespaces": ["shop"]})),
        ),
    ] {
        let result = node.add(&list, &inv);
        assert!(
            pod.meshinit_table().is_some(),
            "{what}: ADD installed nothing"
        );
        let run = node.plugin("DEL", &list, &conf, Some(&result), &inv, None);
        let run = run.expect_ok();
        assert_eq!(
            pod.meshinit_table(),
            None,
            "{what}: DEL left our table\n{}",
            run.run
        );
        assert!(
            pod.ruleset().trim().is_empty(),
            "{what}: DEL left rules:\n{}",
            pod.ruleset()
        );
        node.del(&list, Some(&result), &inv).expect_ok();
    }
}

#[test]
fn cni_config_over_1_mib_or_with_a_repeated_key_is_refused_and_changes_nothing() {
    let node = CniNode::new("trust_cni_limits");
    let pod = Netns::create(&format!("{}-pod", node.node.name()));
    let list = node.conflist(json!({}));
    let inv = Invocation {
        container_id: "c-trust-limits",
        netns: Some(pod.path()),
        args: K8S_ARGS,
    };
    let result = node.add(&list, &inv);
    let before = pod.firewall();
    let prev = result.to_string();
    let big = format!(
        r#"{{"cniVersion":"1.0.0","name":"nt-mesh","type":"meshinit-cni","prevResult":{prev},"pad":"{}"}}"#,
        "x".repeat(1024 * 1024)
    );
    let twice = format!(
        r#"{{"cniVersion":"1.0.0","name":"nt-mesh","type":"meshinit-cni","prevResult":{prev},"meshinit":{{"outbound_ports_to_ignore":"5432","outbound_ports_to_ignore":"80"}}}}"#
    );
    for command in ["ADD", "CHECK"] {
        for (what, raw, code) in [("over 1 MiB", &big, 5), ("repeated key", &twice, 7)] {
            let ours = CniNode::ours(&list);
            let run = node.plugin(command, &list, ours, None, &inv, Some(raw.as_bytes()));
            assert_eq!(run.error_code(), code, "{what} {command}");
            assert_eq!(run.run.code, Some(2), "{what} {command}: bad input exits 2");
            assert_eq!(pod.firewall(), before, "{what} {command} changed the rules");
        }
    }
    node.del(&list, Some(&result), &inv).expect_ok();
}
