//! What meshinit prints: `show`, `--dry-run` and `--simulate` render the backend's rules (nft
//! text or iptables-restore documents) and change nothing; `--log-format json` writes one
//! JSON object per stderr line. Each backend.

use netns_tests::{for_each_backend, Backend, Family, Pods, Run};

/// A line that the rendering of `backend` always holds.
fn rendering_marker(backend: Backend) -> String {
    match backend {
        Backend::Nft => "table inet meshinit".to_string(),
        iptables => format!("# {} --noflush", iptables.tool(Family::V4, "restore")),
    }
}

fn show_dry_run_and_simulate_print_the_rules_and_change_nothing(backend: Backend) {
    let pods = Pods::new(&backend.test_name("show_dry_run_simulate"));
    let marker = rendering_marker(backend);
    for installed in [
        None,
        Some(&["apply", "--outbound-ports-to-ignore=5555"][..]),
    ] {
        if let Some(args) = installed {
            pods.pod.meshinit_on(backend, args).expect_ok();
        }
        for args in [
            &["show"][..],
            &[
                "show",
                "--outbound-ports-to-ignore=9000-9010",
                "--proxy-gid=2200",
            ],
            &["apply", "--dry-run", "--outbound-ports-to-ignore=7777"],
            &["apply", "--simulate", "--outbound-ports-to-ignore=7777"],
            &["--dry-run", "--inbound-ports-to-ignore=1-100"],
            &["--simulate"],
            &["cleanup", "--dry-run"],
        ] {
            let before = pods.pod.firewall();
            let run = pods.pod.meshinit_on(backend, args).expect_ok();
            if args[0] != "cleanup" {
                assert!(run.stdout.contains(&marker), "{run}");
            }
            assert_eq!(
                pods.pod.firewall(),
                before,
                "{args:?} changed the ruleset\n{run}"
            );
        }
    }
}

/// The `-A MESHINIT_*` lines of an iptables document or listing, without quotes (the save
/// output drops them around one-word comments) and with single spaces.
fn chain_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("-A MESHINIT_"))
        .map(|l| {
            l.replace('"', "")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

fn show_renders_what_apply_installs(backend: Backend) {
    let pods = Pods::new(&backend.test_name("show_renders_what_apply_installs"));
    let flags = [
        "--outbound-ports-to-ignore=5555,9000-9010",
        "--subnets-to-ignore=198.19.0.0/16,fd00:19::/64",
    ];
    let shown = pods
        .pod
        .meshinit_on(backend, &[&["show"][..], &flags].concat())
        .expect_ok();
    pods.pod
        .meshinit_on(backend, &[&["apply"][..], &flags].concat())
        .expect_ok();
    if backend == Backend::Nft {
        let installed = pods
            .pod
            .meshinit_table()
            .expect("apply installed the table");
        for needle in [
            "5555",
            "9000-9010",
            "198.19.0.0/16",
            "redirect to :4140",
            "redirect to :4143",
        ] {
            assert!(
                shown.stdout.contains(needle),
                "show lacks {needle:?}\n{shown}"
            );
            assert!(
                installed.contains(needle),
                "installed table lacks {needle:?}\n{installed}"
            );
        }
        return;
    }
    // One document per family, each after a `# <tool>-restore --noflush` line: the chains
    // installed hold exactly the rules of the document, in order.
    let (v4_doc, v6_doc) = shown
        .stdout
        .split_once(&format!(
            "# {} --noflush",
            backend.tool(Family::V6, "restore")
        ))
        .unwrap_or_else(|| panic!("show printed no IPv6 document\n{shown}"));
    for (family, document) in [(Family::V4, v4_doc), (Family::V6, v6_doc)] {
        let want = chain_lines(document);
        assert!(
            want.iter().any(|l| l.contains("--to-ports 4140"))
                && want.iter().any(|l| l.contains("--to-ports 4143")),
            "{family:?}: show lacks the redirects\n{shown}"
        );
        let save = pods.pod.nat_save(backend, family);
        assert_eq!(
            chain_lines(&save),
            want,
            "{family:?}: installed chains differ from what show printed\n{save}"
        );
    }
}

/// Asserts that every line `run` wrote to stderr is a JSON object.
#[track_caller]
fn assert_json_lines(run: &Run) {
    for line in run.stderr.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line:?}\n{run}"));
        assert!(
            value.is_object(),
            "stderr line is not a JSON object: {line:?}\n{run}"
        );
    }
}

fn log_format_json_writes_one_json_object_per_line(backend: Backend) {
    let pods = Pods::new(&backend.test_name("log_format_json"));
    let apply = pods
        .pod
        .meshinit_on(backend, &["apply", "--log-format", "json"])
        .expect_ok();
    assert!(
        !apply.stderr.trim().is_empty(),
        "apply logged nothing\n{apply}"
    );
    assert_json_lines(&apply);
    assert_json_lines(
        &pods
            .pod
            .meshinit_on(backend, &["check", "--log-format=json"])
            .expect_code(0),
    );
    assert_json_lines(
        &pods
            .pod
            .meshinit_on(backend, &["cleanup", "--log-format=json"])
            .expect_ok(),
    );
    assert_json_lines(
        &pods
            .pod
            .meshinit_on(backend, &["check", "--log-format=json"])
            .expect_code(1),
    );

    let mut cmd = pods.pod.meshinit_command();
    cmd.arg("apply")
        .arg(backend.flag())
        .env("MESHINIT_LOG_FORMAT", "json");
    assert_json_lines(&Run::of(&mut cmd).expect_ok());

    // Bad input is reported through the same logger.
    let bad = pods
        .pod
        .meshinit_on(
            backend,
            &[
                "apply",
                "--log-format=json",
                "--outbound-ports-to-ignore=9-3",
            ],
        )
        .expect_code(2);
    assert!(
        !bad.stderr.trim().is_empty(),
        "bad input said nothing\n{bad}"
    );
    assert_json_lines(&bad);
}

for_each_backend!(
    show_dry_run_and_simulate_print_the_rules_and_change_nothing,
    show_renders_what_apply_installs,
    log_format_json_writes_one_json_object_per_line,
);
