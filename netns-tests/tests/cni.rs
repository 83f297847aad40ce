//! meshinit as a chained CNI plugin behind the real reference plugins (bridge, host-local,
//! loopback), driven the way a runtime drives a conflist. Every plugin runs inside a node
//! namespace of the test's own; the host's namespace is never touched.

use netns_tests::cni::{CniNode, Invocation};
use netns_tests::Netns;
use serde_json::{json, Value};

const K8S_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0";

fn invocation<'a>(pod: &Netns, id: &'a str, args: &'a str) -> Invocation<'a> {
    Invocation {
        container_id: id,
        netns: Some(pod.path()),
        args,
    }
}

/// `meshinit validate` inside the pod: the proof that redirection works.
fn validate(pod: &Netns) -> netns_tests::Run {
    pod.meshinit(&["validate", "--validate-timeout", "3s"])
}

#[test]
fn add_redirects_check_detects_a_deleted_rule_and_del_removes_everything() {
    let node = CniNode::new("cni_add_check_del");
    let pod = Netns::create(&format!("{}-pod", node.node.name()));
    let list = node.conflist(json!({}));
    let inv = invocation(&pod, "c-add-check-del", K8S_ARGS);

    let result = node.add(&list, &inv);
    // Our plugin returns the bridge plugin's result unchanged: the pod's address is there.
    let ips = result["ips"].to_string();
    assert!(
        ips.contains("198.18.64."),
        "result without the pod's address: {result}"
    );
    assert!(pod.meshinit_table().is_some(), "ADD installed no table");
    validate(&pod).expect_ok();

    node.check(&list, &result, &inv).expect_ok();

    // Someone deletes the outbound redirect: CHECK reports drift with our code, naming it.
    let redirect = pod
        .meshinit_rules()
        .into_iter()
        .find(|r| {
            r.chain == "output"
                && r.comment
                    .as_deref()
                    .is_some_and(|c| c.contains("outbound TCP goes to the proxy"))
        })
        .expect("the outbound redirect rule");
    pod.delete_rule(&redirect);
    let check = node.check(&list, &result, &inv);
    assert_eq!(check.error_code(), 101, "{}", check.run);
    assert!(
        check.json()["details"].as_str().unwrap().contains("output"),
        "{}",
        check.run
    );
    assert_eq!(
        validate(&pod).code,
        Some(95),
        "validate passed without the redirect"
    );

    node.del(&list, Some(&result), &inv).expect_ok();
    assert_eq!(pod.meshinit_table(), None, "DEL left our table");
    assert!(
        pod.ruleset().trim().is_empty(),
        "DEL left rules:\n{}",
        pod.ruleset()
    );
    // DEL again (runtimes retry), and once the namespace is gone: both succeed.
    node.del(&list, Some(&result), &inv).expect_ok();
    let gone = Invocation {
        netns: Some("/var/run/netns/nt-cni-no-such-namespace".into()),
        ..inv.clone()
    };
    node.plugin(
        "DEL",
        &list,
        CniNode::ours(&list),
        Some(&result),
        &gone,
        None,
    )
    .expect_ok();
    let none = Invocation { netns: None, ..inv };
    node.plugin(
        "DEL",
        &list,
        CniNode::ours(&list),
        Some(&result),
        &none,
        None,
    )
    .expect_ok();
}

#[test]
fn add_twice_gives_the_identical_ruleset() {
    let node = CniNode::new("cni_add_twice");
    let pod = Netns::create(&format!("{}-pod", node.node.name()));
    let list = node.conflist(json!({"outbound_ports_to_ignore": "5432,9000-9010"}));
    let inv = invocation(&pod, "c-add-twice", K8S_ARGS);

    let result = node.add(&list, &inv);
    let first = pod.ruleset();
    // Our plugin returned the bridge plugin's result unchanged, so the chain's result is
    // also what it received as prevResult.
    let prev = result.clone();
    let again = node
        .plugin("ADD", &list, CniNode::ours(&list), Some(&prev), &inv, None)
        .expect_ok();
    assert_eq!(
        again.json(),
        prev,
        "ADD did not pass prevResult through unchanged"
    );
    assert_eq!(pod.ruleset(), first, "a second ADD changed the ruleset");
    assert!(first.contains("5432"), "{first}");
    node.check(&list, &result, &inv).expect_ok();
    node.del(&list, Some(&result), &inv).expect_ok();
}

#[test]
fn malformed_config_gives_the_spec_error_and_changes_nothing() {
    let node = CniNode::new("cni_malformed");
    let pod = Netns::create(&format!("{}-pod", node.node.name()));
    let list = node.conflist(json!({}));
    let inv = invocation(&pod, "c-malformed", K8S_ARGS);
    let result = node.add(&list, &inv);
    let before = pod.ruleset();

    let ours = CniNode::ours(&list);
    let with = |extra: Value| {
        let mut conf = ours.clone();
        conf.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        conf
    };
    let cases: Vec<(&str, Option<Vec<u8>>, Value, u64)> = vec![
        (
            "bad JSON",
            Some(b"{\"cniVersion\": \"1.0.0\", ".to_vec()),
            ours.clone(),
            6,
        ),
        (
            "bad port",
            None,
            with(json!({"outbound_ports_to_ignore": "70000"})),
            7,
        ),
        (
            "bad port in meshinit",
            None,
            with(json!({"meshinit": {"inbound_ports_to_ignore": "9-3"}})),
            7,
        ),
        (
            "unknown key",
            None,
            with(json!({"outbound_port_to_ignore": "5432"})),
            2,
        ),
        ("dry run", None, with(json!({"dry_run": true})), 2),
        (
            "bad annotation",
            None,
            with(
                json!({"annotations": {"shop/web-0": {"config.linkerd.io/skip-outbound-ports": "abc"}}}),
            ),
            7,
        ),
    ];
    for (what, raw, conf, code) in cases {
        // DEL refuses only a config it cannot read at all; a settings problem does not stop
        // it from removing our rules (trust_boundary.rs proves that).
        let commands: &[&str] = if raw.is_some() {
            &["ADD", "CHECK", "DEL"]
        } else {
            &["ADD", "CHECK"]
        };
        for &command in commands {
            let run = node.plugin(command, &list, &conf, Some(&result), &inv, raw.as_deref());
            assert_eq!(run.error_code(), code, "{what} {command}: {}", run.run);
            let error = run.json();
            assert_eq!(error["cniVersion"], "1.0.0", "{what}: {error}");
            assert!(
                error["msg"].as_str().is_some_and(|m| !m.is_empty()),
                "{what}: {error}"
            );
            assert_eq!(
                pod.ruleset(),
                before,
                "{what} {command} changed the ruleset"
            );
        }
    }
    // An unsupported version is code 1, and a fresh namespace stays empty on any error.
    let fresh = Netns::create(&format!("{}-fresh", node.node.name()));
    let fresh_inv = invocation(&fresh, "c-fresh", K8S_ARGS);
    let old = json!({"cniVersion": "0.2.0", "name": "nt-mesh"});
    let run = node.plugin("ADD", &old, ours, Some(&result), &fresh_inv, None);
    assert_eq!(run.error_code(), 1, "{}", run.run);
    let run = node.plugin(
        "ADD",
        &list,
        &with(json!({"proxy_uid": "nobody"})),
        Some(&result),
        &fresh_inv,
        None,
    );
    assert_eq!(run.error_code(), 7, "{}", run.run);
    assert!(
        fresh.ruleset().trim().is_empty(),
        "an error left rules:\n{}",
        fresh.ruleset()
    );
    node.del(&list, Some(&result), &inv).expect_ok();
}

#[test]
fn annotations_from_config_or_file_change_the_skip_ports() {
    let node = CniNode::new("cni_annotations");
    let pod = Netns::create(&format!("{}-pod", node.node.name()));
    let list = node.conflist(json!({
        "outbound_ports_to_ignore": "25",
        "annotations": {
            "shop/web-0": {
                "config.linkerd.io/skip-outbound-ports": "5432",
                "config.linkerd.io/skip-inbound-ports": "8081",
                "config.linkerd.io/opaque-ports": "3306",
                "config.linkerd.io/proxy-uid": "2200"
            },
            "shop/other": {"config.linkerd.io/skip-outbound-ports": "6379"}
        }
    }));
    let inv = invocation(&pod, "c-annotations", K8S_ARGS);
    let result = node.add(&list, &inv);
    let table = pod.meshinit_table().expect("our table");
    assert!(
        table.contains("25, 5432"),
        "outbound skip ports not merged:\n{table}"
    );
    assert!(
        table.contains("8081"),
        "inbound skip port missing:\n{table}"
    );
    assert!(
        table.contains("4190-4191"),
        "the admin ports must stay exempt:\n{table}"
    );
    assert!(
        table.contains("meta skuid 2200"),
        "proxy uid not taken from the annotation:\n{table}"
    );
    assert!(
        !table.contains("6379"),
        "another pod's annotation applied:\n{table}"
    );
    node.check(&list, &result, &inv).expect_ok();
    validate(&pod).expect_ok();

    // The same from a TOML file; the file's entry wins over the inline one.
    let file = node.file("annotations.toml");
    std::fs::write(
        &file,
        "[\"shop/web-0\"]\n\"config.linkerd.io/skip-outbound-ports\" = \"11211\"\n",
    )
    .unwrap();
    let mut with_file = list.clone();
    with_file["plugins"][1]["annotations_file"] = json!(file);
    node.plugin(
        "ADD",
        &with_file,
        CniNode::ours(&with_file),
        Some(&result),
        &inv,
        None,
    )
    .expect_ok();
    let table = pod.meshinit_table().expect("our table");
    assert!(
        table.contains("25, 11211"),
        "file annotation not applied:\n{table}"
    );
    assert!(!table.contains("5432"), "{table}");
    // A pod without annotations gets the config's settings only.
    let plain = Invocation {
        args: "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=nobody",
        ..inv.clone()
    };
    node.plugin(
        "ADD",
        &with_file,
        CniNode::ours(&with_file),
        Some(&result),
        &plain,
        None,
    )
    .expect_ok();
    let table = pod.meshinit_table().expect("our table");
    assert!(table.contains("elements = { 25 }"), "{table}");
    // A missing annotations file is "try again later".
    with_file["plugins"][1]["annotations_file"] = json!(node.file("missing.json"));
    let run = node.plugin(
        "ADD",
        &with_file,
        CniNode::ours(&with_file),
        Some(&result),
        &inv,
        None,
    );
    assert_eq!(run.error_code(), 11, "{}", run.run);
    node.del(&list, Some(&result), &inv).expect_ok();
    assert_eq!(pod.meshinit_table(), None);
}

/// The network configuration selects `tproxy` mode: ADD installs the TPROXY chain and
/// the policy routing (table and priority from the config), CHECK reports a deleted
/// `ip rule`, DEL removes both and leaves `ip rule` and every table as before ADD.
#[test]
fn tproxy_mode_from_the_network_config_adds_checks_and_deletes_the_policy_routing() {
    let node = CniNode::new("cni_tproxy");
    let pod = Netns::create(&format!("{}-pod", node.node.name()));
    let routing = |pod: &Netns| {
        ["-4", "-6"]
            .iter()
            .map(|f| {
                pod.ip(&[f, "rule"]).expect_ok().stdout
                    + &pod
                        .ip(&[f, "route", "show", "table", "all"])
                        .expect_ok()
                        .stdout
            })
            .collect::<String>()
    };
    let before = routing(&pod);
    let list = node.conflist(json!({
        "meshinit": {"mode": "tproxy", "tproxy_table": 77, "tproxy_rule_priority": 1077, "backend": "nft"}
    }));
    let inv = invocation(&pod, "c-tproxy", K8S_ARGS);
    let result = node.add(&list, &inv);
    let rules = pod
        .exec(&["nft", "list", "table", "inet", "meshinit"])
        .expect_ok()
        .stdout;
    assert!(rules.contains("tproxy to :4143"), "{rules}");
    let added = pod.ip(&["-6", "rule"]).expect_ok().stdout;
    assert!(
        added.contains("1077:\tfrom all fwmark 0x4d49 lookup 77"),
        "{added}"
    );
    node.check(&list, &result, &inv).expect_ok();

    pod.ip(&["-6", "rule", "del", "priority", "1077"])
        .expect_ok();
    let check = node.check(&list, &result, &inv);
    assert_eq!(check.error_code(), 101, "{}", check.run);
    assert!(
        check.json()["details"]
            .as_str()
            .unwrap()
            .contains("ip rule (IPv6)"),
        "{}",
        check.run
    );

    node.del(&list, Some(&result), &inv).expect_ok();
    assert!(pod.meshinit_table().is_none(), "DEL left our table");
    // The bridge plugin's DEL removed the interface and its routes; ours are gone too.
    assert_eq!(
        routing(&pod),
        before,
        "DEL leaves ip rule and every table as before ADD"
    );
}
