//! What meshinit prints: `show`, `--dry-run` and `--simulate` render nft text and change
//! nothing; `--log-format json` writes one JSON object per stderr line.

use netns_tests::{Pods, Run};

#[test]
fn show_dry_run_and_simulate_print_the_rules_and_change_nothing() {
    let pods = Pods::new("show_dry_run_simulate");
    for installed in [
        None,
        Some(&["apply", "--outbound-ports-to-ignore=5555"][..]),
    ] {
        if let Some(args) = installed {
            pods.pod.meshinit(args).expect_ok();
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
            let before = pods.pod.ruleset();
            let run = pods.pod.meshinit(args).expect_ok();
            if args[0] != "cleanup" {
                assert!(run.stdout.contains("table inet meshinit"), "{run}");
            }
            assert_eq!(
                pods.pod.ruleset(),
                before,
                "{args:?} changed the ruleset\n{run}"
            );
        }
    }
}

#[test]
fn show_renders_what_apply_installs() {
    let pods = Pods::new("show_renders_what_apply_installs");
    let flags = [
        "--outbound-ports-to-ignore=5555,9000-9010",
        "--subnets-to-ignore=198.19.0.0/16",
    ];
    let shown = pods
        .pod
        .meshinit(&[&["show"][..], &flags].concat())
        .expect_ok();
    pods.pod
        .meshinit(&[&["apply"][..], &flags].concat())
        .expect_ok();
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

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    let pods = Pods::new("log_format_json");
    let apply = pods
        .pod
        .meshinit(&["apply", "--log-format", "json"])
        .expect_ok();
    assert!(
        !apply.stderr.trim().is_empty(),
        "apply logged nothing\n{apply}"
    );
    assert_json_lines(&apply);
    assert_json_lines(
        &pods
            .pod
            .meshinit(&["check", "--log-format=json"])
            .expect_code(0),
    );
    assert_json_lines(
        &pods
            .pod
            .meshinit(&["cleanup", "--log-format=json"])
            .expect_ok(),
    );
    assert_json_lines(
        &pods
            .pod
            .meshinit(&["check", "--log-format=json"])
            .expect_code(1),
    );

    let mut cmd = pods.pod.meshinit_command();
    cmd.arg("apply").env("MESHINIT_LOG_FORMAT", "json");
    assert_json_lines(&Run::of(&mut cmd).expect_ok());

    // Bad input is reported through the same logger.
    let bad = pods
        .pod
        .meshinit(&[
            "apply",
            "--log-format=json",
            "--outbound-ports-to-ignore=9-3",
        ])
        .expect_code(2);
    assert!(
        !bad.stderr.trim().is_empty(),
        "bad input said nothing\n{bad}"
    );
    assert_json_lines(&bad);
}
