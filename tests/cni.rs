//! `meshinit cni` without privileges: VERSION, and the error JSON of every input that
//! is refused before any namespace is entered.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn plugin(program: &std::path::Path, sub: &[&str], vars: &[(&str, &str)], stdin: &str) -> Output {
    let mut child = Command::new(program)
        .args(sub)
        .env_clear()
        .env("PATH", "/nonexistent")
        .envs(vars.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run meshinit");
    // A plugin may exit without reading stdin (VERSION): a broken pipe is not the story.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

fn cni(vars: &[(&str, &str)], stdin: &str) -> Output {
    plugin(
        env!("CARGO_BIN_EXE_meshinit").as_ref(),
        &["cni"],
        vars,
        stdin,
    )
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

const ADD: &[(&str, &str)] = &[
    ("CNI_COMMAND", "ADD"),
    ("CNI_CONTAINERID", "c1"),
    ("CNI_IFNAME", "eth0"),
    ("CNI_NETNS", "/var/run/netns/meshinit-test-does-not-exist"),
    ("CNI_ARGS", "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p"),
];

#[test]
fn version_lists_the_supported_versions() {
    let out = cni(&[("CNI_COMMAND", "VERSION")], "{\"cniVersion\":\"1.0.0\"}");
    assert!(out.status.success());
    let v = json(&out);
    assert_eq!(v["cniVersion"], "1.0.0");
    let versions: Vec<&str> = v["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(versions, ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]);
}

#[test]
fn invoked_as_meshinit_cni_it_is_the_plugin() {
    let dir = std::env::temp_dir().join(format!("meshinit-cni-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("meshinit-cni");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_meshinit"), &link).unwrap();
    let out = plugin(&link, &[], &[("CNI_COMMAND", "VERSION")], "");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(out.status.success());
    assert_eq!(json(&out)["cniVersion"], "1.0.0");
}

#[test]
fn refused_input_gives_the_spec_error_json_on_stdout_only() {
    let ok = r#"{"cniVersion":"1.0.0","name":"n","type":"meshinit-cni","prevResult":{"cniVersion":"1.0.0"}}"#;
    // (what, environment, stdin, expected code)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str, u64);
    let cases: &[Case<'_>] = &[
        ("not JSON", ADD, "{\"cniVersion\":", 6),
        (
            "unsupported version",
            ADD,
            r#"{"cniVersion":"0.1.0","name":"n","type":"meshinit-cni"}"#,
            1,
        ),
        (
            "bad port",
            ADD,
            r#"{"cniVersion":"1.0.0","name":"n","type":"meshinit-cni","prevResult":{},"outbound_ports_to_ignore":"0"}"#,
            7,
        ),
        (
            "bad CIDR",
            ADD,
            r#"{"cniVersion":"1.0.0","name":"n","type":"meshinit-cni","prevResult":{},"meshinit":{"subnets_to_ignore":"10.0.0.0/33"}}"#,
            7,
        ),
        (
            "unknown key",
            ADD,
            r#"{"cniVersion":"1.0.0","name":"n","type":"meshinit-cni","prevResult":{},"skip_ports":"1"}"#,
            2,
        ),
        (
            "no prevResult",
            ADD,
            r#"{"cniVersion":"1.0.0","name":"n","type":"meshinit-cni"}"#,
            7,
        ),
        ("no CNI_COMMAND", &[], ok, 4),
        ("unknown command", &[("CNI_COMMAND", "FROB")], ok, 4),
        (
            "no container id",
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
            ],
            ok,
            4,
        ),
        ("missing namespace", ADD, ok, 4),
        (
            "CHECK in 0.3.1",
            &[
                ("CNI_COMMAND", "CHECK"),
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
            ],
            r#"{"cniVersion":"0.3.1","name":"n","type":"meshinit-cni"}"#,
            1,
        ),
    ];
    for (what, vars, stdin, code) in cases {
        let out = cni(vars, stdin);
        assert!(!out.status.success(), "{what}: succeeded");
        let error = json(&out);
        assert_eq!(error["code"].as_u64(), Some(*code), "{what}: {error}");
        assert!(
            error["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {error}"
        );
        assert!(error["details"].is_string(), "{what}: {error}");
        assert!(error["cniVersion"].is_string(), "{what}: {error}");
        // Input errors exit 2, like the CLI's bad input.
        assert_eq!(out.status.code(), Some(2), "{what}");
    }
    // The error names the bad value.
    let out = cni(
        ADD,
        r#"{"cniVersion":"0.4.0","name":"n","type":"meshinit-cni","prevResult":{},"outbound_ports_to_ignore":"70000"}"#,
    );
    let error = json(&out);
    assert_eq!(
        error["cniVersion"], "0.4.0",
        "the error speaks the config's version"
    );
    assert!(
        error["details"].as_str().unwrap().contains("70000"),
        "{error}"
    );
}

#[test]
fn del_without_a_namespace_succeeds_and_prints_nothing() {
    let conf = r#"{"cniVersion":"1.0.0","name":"n","type":"meshinit-cni"}"#;
    let out = cni(
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
        ],
        conf,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
}
