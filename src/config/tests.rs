use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use super::*;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn file(contents: &str) -> Option<(PathBuf, String)> {
    Some((PathBuf::from("meshinit.toml"), contents.to_string()))
}

#[test]
fn defaults_match_design() {
    let config = Config::load(Settings::default(), &env(&[]), None).unwrap();
    assert_eq!(config.spec, Spec::default());
    assert_eq!(config.spec.incoming_proxy_port, 4143);
    assert_eq!(config.spec.outgoing_proxy_port, 4140);
    assert_eq!(config.spec.proxy_uid, Some(2102));
    assert_eq!(config.spec.inbound_ports_to_ignore.to_string(), "4190-4191");
    assert_eq!(config.backend, BackendChoice::Auto);
    assert!(config.spec.ipv6);
    assert!(!config.dry_run);
    assert_eq!(config.log_format, LogFormat::Plain);
}

#[test]
fn flag_beats_env_beats_file_beats_default() {
    let toml = r#"
        outbound_ports_to_ignore = [5555, "9000-9010"]
        inbound_ports_to_ignore = "1-2"
        proxy_uid = 1
        incoming_proxy_port = 1111
    "#;
    let flags = Settings {
        outbound_ports_to_ignore: Some("7777".into()),
        ..Settings::default()
    };
    let vars = env(&[
        ("MESHINIT_OUTBOUND_PORTS_TO_IGNORE", "6666"),
        ("MESHINIT_INBOUND_PORTS_TO_IGNORE", "3-4"),
    ]);
    let config = Config::load(flags, &vars, file(toml)).unwrap();
    assert_eq!(config.spec.outbound_ports_to_ignore.to_string(), "7777"); // flag
    assert_eq!(config.spec.inbound_ports_to_ignore.to_string(), "3-4"); // env
    assert_eq!(config.spec.proxy_uid, Some(1)); // file
    assert_eq!(config.spec.incoming_proxy_port, 1111); // file
    assert_eq!(config.spec.outgoing_proxy_port, 4140); // default
}

#[test]
fn toml_lists_may_be_arrays_or_strings() {
    let config = Config::load(
        Settings::default(),
        &env(&[]),
        file("outbound_ports_to_ignore = [5555, \"9000-9010\"]\nsubnets_to_ignore = [\"198.18.0.0/24\", \"fd00::/8\"]\nipv6 = false\ndry_run = true"),
    )
    .unwrap();
    assert_eq!(
        config.spec.outbound_ports_to_ignore.to_string(),
        "5555,9000-9010"
    );
    assert_eq!(
        config.spec.outbound_subnets_to_ignore.to_string(),
        "198.18.0.0/24,fd00::/8"
    );
    assert_eq!(
        config.spec.inbound_subnets_to_ignore.to_string(),
        "198.18.0.0/24,fd00::/8"
    );
    assert!(!config.spec.ipv6);
    assert!(config.dry_run);
}

#[test]
fn unknown_toml_key_is_refused_by_name() {
    let err = Config::load(
        Settings::default(),
        &env(&[]),
        file("outbound_port_to_ignore = \"80\""),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("outbound_port_to_ignore"), "{err}");
    assert!(err.contains("meshinit.toml"), "{err}");
}

#[test]
fn subnets_to_ignore_covers_both_directions_and_adds_to_one_way_lists() {
    let flags = Settings {
        subnets_to_ignore: Some("198.18.0.0/24".into()),
        inbound_subnets_to_ignore: Some("198.19.1.0/24".into()),
        outbound_subnets_to_ignore: Some("fd00:18::/64".into()),
        ..Settings::default()
    };
    let config = Config::load(flags, &env(&[]), None).unwrap();
    assert_eq!(
        config.spec.inbound_subnets_to_ignore.to_string(),
        "198.18.0.0/24,198.19.1.0/24"
    );
    assert_eq!(
        config.spec.outbound_subnets_to_ignore.to_string(),
        "198.18.0.0/24,fd00:18::/64"
    );
}

#[test]
fn bad_values_name_the_flag_and_the_value() {
    let cases: Vec<(Settings, &str)> = vec![
        (
            Settings {
                outbound_ports_to_ignore: Some("0".into()),
                ..Default::default()
            },
            "\"0\"",
        ),
        (
            Settings {
                outbound_ports_to_ignore: Some("70000".into()),
                ..Default::default()
            },
            "\"70000\"",
        ),
        (
            Settings {
                inbound_ports_to_ignore: Some("9-3".into()),
                ..Default::default()
            },
            "\"9-3\"",
        ),
        (
            Settings {
                ports_to_redirect: Some("abc".into()),
                ..Default::default()
            },
            "\"abc\"",
        ),
        (
            Settings {
                subnets_to_ignore: Some("198.18.0.0/33".into()),
                ..Default::default()
            },
            "\"198.18.0.0/33\"",
        ),
        (
            Settings {
                outbound_subnets_to_ignore: Some("10.0.0/8x".into()),
                ..Default::default()
            },
            "\"10.0.0/8x\"",
        ),
        (
            Settings {
                incoming_proxy_port: Some("4140".into()),
                ..Default::default()
            },
            "4140",
        ),
        (
            Settings {
                backend: Some("ipchains".into()),
                ..Default::default()
            },
            "\"ipchains\"",
        ),
        (
            Settings {
                ipv6: Some("maybe".into()),
                ..Default::default()
            },
            "\"maybe\"",
        ),
        (
            Settings {
                proxy_uid: Some("-1".into()),
                ..Default::default()
            },
            "\"-1\"",
        ),
    ];
    for (flags, needle) in cases {
        let err = Config::load(flags.clone(), &env(&[]), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{flags:?}: {err}");
    }
}

#[test]
fn iptables_mode_is_an_alias_and_backend_wins() {
    let mode = |m: &str| Settings {
        iptables_mode: Some(m.into()),
        ..Default::default()
    };
    assert_eq!(
        Config::load(mode("legacy"), &env(&[]), None)
            .unwrap()
            .backend,
        BackendChoice::IptablesLegacy
    );
    assert_eq!(
        Config::load(mode("nft"), &env(&[]), None).unwrap().backend,
        BackendChoice::IptablesNft
    );
    let both = Settings {
        backend: Some("nft".into()),
        ..mode("legacy")
    };
    assert_eq!(
        Config::load(both, &env(&[]), None).unwrap().backend,
        BackendChoice::Nft
    );
}

#[test]
fn durations_have_defaults_and_accept_human_units() {
    let config = Config::load(Settings::default(), &env(&[]), None).unwrap();
    assert_eq!(config.lock_timeout, Duration::from_secs(30));
    assert_eq!(config.validate_timeout, Duration::from_secs(5));
    assert!(!config.allow_host_netns);
    let flags = Settings {
        lock_timeout: Some("500ms".into()),
        validate_timeout: Some("1day".into()),
        allow_host_netns: Some("true".into()),
        ..Settings::default()
    };
    let config = Config::load(flags, &env(&[]), None).unwrap();
    assert_eq!(config.lock_timeout, Duration::from_millis(500));
    assert_eq!(config.validate_timeout, MAX_DURATION);
    assert!(config.allow_host_netns);
}

/// The message of a refused duration names the value and where it came from.
#[track_caller]
fn refused(flags: Settings, vars: &[(&str, &str)], toml: Option<&str>, needles: &[&str]) {
    let err = Config::load(flags, &env(vars), toml.and_then(file))
        .expect_err("must be refused")
        .to_string();
    for needle in needles {
        assert!(err.contains(needle), "{needle:?} missing from: {err}");
    }
}

#[test]
fn durations_out_of_range_are_refused_naming_value_and_source() {
    for bad in [
        "500000000000years",
        "0s",
        "0",
        "25h",
        "1day 1s",
        "-1s",
        "soon",
        "",
    ] {
        refused(
            Settings {
                validate_timeout: Some(bad.into()),
                ..Settings::default()
            },
            &[],
            None,
            &[&format!("{bad:?}"), "--validate-timeout: "],
        );
        refused(
            Settings::default(),
            &[("MESHINIT_LOCK_TIMEOUT", bad)],
            None,
            &[&format!("{bad:?}"), "MESHINIT_LOCK_TIMEOUT: "],
        );
        refused(
            Settings::default(),
            &[],
            Some(&format!("lock_timeout = {bad:?}")),
            &[&format!("{bad:?}"), "meshinit.toml: lock_timeout: "],
        );
    }
    // The flag wins, so the flag is named even when env and file are set too.
    refused(
        Settings {
            lock_timeout: Some("0s".into()),
            ..Settings::default()
        },
        &[("MESHINIT_LOCK_TIMEOUT", "1s")],
        Some("lock_timeout = \"2s\""),
        &["\"0s\"", "--lock-timeout: "],
    );
    let err = Config::from_cni(Settings {
        lock_timeout: Some("0s".into()),
        ..Settings::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("the CNI network configuration: lock_timeout: "),
        "{err}"
    );
}

#[test]
fn an_empty_netns_is_bad_input_not_the_current_namespace() {
    refused(
        Settings {
            netns: Some(String::new()),
            ..Settings::default()
        },
        &[],
        None,
        &["--netns: \"\" is empty"],
    );
    refused(
        Settings::default(),
        &[("MESHINIT_NETNS", " ")],
        None,
        &["MESHINIT_NETNS: \" \" is empty"],
    );
    refused(
        Settings::default(),
        &[],
        Some("netns = \"\""),
        &["meshinit.toml: netns: \"\" is empty"],
    );
    let config = Config::load(Settings::default(), &env(&[]), None).unwrap();
    assert_eq!(config.netns, None);
}

#[test]
fn allow_host_netns_comes_from_flag_env_or_file() {
    let load = |flags: Settings, vars: &[(&str, &str)], toml: Option<&str>| {
        Config::load(flags, &env(vars), toml.and_then(file))
    };
    assert!(
        load(
            Settings::default(),
            &[("MESHINIT_ALLOW_HOST_NETNS", "true")],
            None
        )
        .unwrap()
        .allow_host_netns
    );
    assert!(
        load(Settings::default(), &[], Some("allow_host_netns = true"))
            .unwrap()
            .allow_host_netns
    );
    let no = Settings {
        allow_host_netns: Some("false".into()),
        ..Settings::default()
    };
    assert!(
        !load(no, &[("MESHINIT_ALLOW_HOST_NETNS", "true")], None)
            .unwrap()
            .allow_host_netns
    );
    let err = load(
        Settings::default(),
        &[("MESHINIT_ALLOW_HOST_NETNS", "maybe")],
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("MESHINIT_ALLOW_HOST_NETNS: invalid value \"maybe\""),
        "{err}"
    );
}

/// Every error names where the bad value came from: the flag, the variable or the
/// file's key, for every kind of setting (a port list, a CIDR list, a number, a
/// backend), not only the ones that used to know.
#[test]
fn every_bad_value_names_its_source() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "outbound_ports_to_ignore",
            "70000",
            "invalid port \"70000\"",
        ),
        ("subnets_to_ignore", "10.0.0/8x", "\"10.0.0/8x\""),
        ("proxy_uid", "-1", "invalid value \"-1\""),
        ("backend", "ipchains", "invalid value \"ipchains\""),
        ("ipv6", "maybe", "invalid value \"maybe\""),
        ("log_format", "xml", "invalid value \"xml\""),
        ("mode", "tproxi", "invalid value \"tproxi\""),
        ("tproxy_mark", "lots", "invalid value \"lots\""),
    ];
    for (key, bad, problem) in cases {
        let var = format!("MESHINIT_{}", key.to_uppercase());
        let err = Config::load(Settings::default(), &env(&[(&var, bad)]), None)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(&format!("{var}: ")), "{err}");
        assert!(err.contains(problem), "{err}");
        let err = Config::load(
            Settings::default(),
            &env(&[]),
            file(&format!("{key} = {bad:?}")),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with(&format!("meshinit.toml: {key}: ")), "{err}");
        assert!(err.contains(problem), "{err}");
    }
}

/// Every declared setting is read from its environment variable: none can be
/// forgotten, because the variables come from the one list of settings.
#[test]
fn every_setting_reads_its_environment_variable() {
    for setting in Settings::ALL {
        let var = setting.env_var("MESHINIT");
        let err = Config::load(Settings::default(), &env(&[(&var, "\u{1}bad")]), None);
        match err {
            Err(err) => assert!(err.to_string().starts_with(&format!("{var}: ")), "{err}"),
            // Settings whose every value is valid (a namespace path) accept it.
            Ok(_) => assert_eq!(setting.key, "netns", "{var} was ignored"),
        }
    }
}

#[test]
fn mode_comes_from_flag_env_or_file_with_tproxy_settings() {
    let config = Config::load(Settings::default(), &env(&[]), None).unwrap();
    assert_eq!(config.spec.mode, Mode::Redirect);
    let flags = Settings {
        mode: Some("tproxy".into()),
        ..Settings::default()
    };
    let config = Config::load(flags, &env(&[]), None).unwrap();
    assert_eq!(config.spec.mode, Mode::Tproxy(Tproxy::DEFAULT));
    let vars = env(&[
        ("MESHINIT_MODE", "tproxy"),
        ("MESHINIT_TPROXY_MARK", "0x10"),
    ]);
    let config = Config::load(
        Settings::default(),
        &vars,
        file("tproxy_table = 77\ntproxy_rule_priority = 9"),
    )
    .unwrap();
    assert_eq!(
        config.spec.mode,
        Mode::Tproxy(Tproxy {
            mark: 0x10,
            table: 77,
            rule_priority: 9
        })
    );
    let config = Config::load(Settings::default(), &env(&[]), file("mode = \"tproxy\"")).unwrap();
    assert!(matches!(config.spec.mode, Mode::Tproxy(_)));
    let flags = Settings {
        mode: Some("redirect".into()),
        ..Settings::default()
    };
    let config = Config::load(flags, &env(&[("MESHINIT_MODE", "tproxy")]), None).unwrap();
    assert_eq!(config.spec.mode, Mode::Redirect);
}

#[test]
fn bad_modes_and_tproxy_settings_are_refused_naming_value_and_source() {
    let tproxy = || Settings {
        mode: Some("tproxy".into()),
        ..Settings::default()
    };
    refused(
        Settings::default(),
        &[("MESHINIT_MODE", "tproxi")],
        None,
        &["\"tproxi\"", "MESHINIT_MODE: ", "redirect or tproxy"],
    );
    refused(
        tproxy(),
        &[],
        Some("tproxy_mark = \"0\""),
        &["\"0\"", "meshinit.toml: tproxy_mark: ", "must not be 0"],
    );
    refused(
        tproxy(),
        &[("MESHINIT_TPROXY_MARK", "lots")],
        None,
        &["\"lots\"", "MESHINIT_TPROXY_MARK: ", "not a number"],
    );
    for table in ["0", "253", "254", "255"] {
        refused(
            Settings {
                tproxy_table: Some(table.into()),
                ..tproxy()
            },
            &[],
            None,
            &["--tproxy-table: ", "reserved"],
        );
    }
    for priority in ["0", "32766", "40000"] {
        refused(
            Settings {
                tproxy_rule_priority: Some(priority.into()),
                ..tproxy()
            },
            &[],
            None,
            &["--tproxy-rule-priority: ", priority, "1 to 32765"],
        );
    }
    refused(
        Settings::default(),
        &[("MESHINIT_TPROXY_TABLE", "77")],
        None,
        &[
            "MESHINIT_TPROXY_TABLE: ",
            "\"77\"",
            "only applies with --mode tproxy",
        ],
    );
}
