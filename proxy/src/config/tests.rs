use std::collections::HashMap;
use std::time::Duration;

use super::*;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn config(args: ProxyArgs, env_pairs: &[(&str, &str)], toml: Option<&str>) -> Config {
    Config::from_sources(&args, &env(env_pairs), toml).expect("valid config")
}

fn error(args: ProxyArgs, env_pairs: &[(&str, &str)], toml: Option<&str>) -> String {
    Config::from_sources(&args, &env(env_pairs), toml)
        .expect_err("invalid config")
        .to_string()
}

#[test]
fn defaults_match_design() {
    let c = Config::default();
    assert_eq!(
        c.inbound_addrs,
        vec![
            "0.0.0.0:4143".parse().unwrap(),
            "[::]:4143".parse().unwrap()
        ]
    );
    assert_eq!(
        c.outbound_addrs,
        vec![
            "127.0.0.1:4140".parse().unwrap(),
            "[::1]:4140".parse().unwrap()
        ]
    );
    assert_eq!(c.admin_addr, "0.0.0.0:4191".parse().unwrap());
    assert_eq!(c.inbound_opaque_ports.to_string(), DEFAULT_OPAQUE_PORTS);
    assert_eq!(c.outbound_opaque_ports.to_string(), DEFAULT_OPAQUE_PORTS);
    assert_eq!(c.detect_timeout, Duration::from_secs(10));
    assert_eq!(c.shutdown_grace, Duration::from_secs(30));
    assert_eq!(c.log_format, LogFormat::Plain);
    assert_eq!(c.handshake_timeout, Duration::from_secs(10));
    assert_eq!(c.proxy_uid, 2102);
    assert!(c.outbound_opaque_ports.contains(3306));
    assert!(!c.outbound_opaque_ports.contains(80));
}

#[test]
fn flag_beats_env_beats_file_beats_default() {
    let file = r#"
        detect_timeout = "3s"
        shutdown_grace = "4s"
        max_connections = 7
    "#;
    let vars = [
        ("MESHPROXY_DETECT_TIMEOUT", "2s"),
        ("MESHPROXY_SHUTDOWN_GRACE", "500ms"),
    ];
    let args = ProxyArgs {
        detect_timeout: Some("1s".into()),
        ..ProxyArgs::default()
    };
    let c = config(args, &vars, Some(file));
    assert_eq!(c.detect_timeout, Duration::from_secs(1), "flag wins");
    assert_eq!(
        c.shutdown_grace,
        Duration::from_millis(500),
        "env beats file"
    );
    assert_eq!(c.max_connections, 7, "file beats default");
    assert_eq!(c.max_detecting, DEFAULT_MAX_DETECTING, "default");
}

#[test]
fn durations_accept_the_documented_forms() {
    for (input, want) in [
        ("10s", Duration::from_secs(10)),
        ("500ms", Duration::from_millis(500)),
        ("2m", Duration::from_secs(120)),
    ] {
        let args = ProxyArgs {
            detect_timeout: Some(input.into()),
            ..ProxyArgs::default()
        };
        assert_eq!(config(args, &[], None).detect_timeout, want, "{input}");
    }
}

#[test]
fn connect_timeout_defaults_to_a_second_and_comes_from_every_source() {
    assert_eq!(
        config(ProxyArgs::default(), &[], None).connect_timeout,
        Duration::from_secs(1)
    );
    let args = ProxyArgs {
        connect_timeout: Some("300ms".into()),
        ..ProxyArgs::default()
    };
    assert_eq!(
        config(args, &[], None).connect_timeout,
        Duration::from_millis(300)
    );
    let c = config(
        ProxyArgs::default(),
        &[("MESHPROXY_CONNECT_TIMEOUT", "2s")],
        None,
    );
    assert_eq!(c.connect_timeout, Duration::from_secs(2));
    let c = config(ProxyArgs::default(), &[], Some("connect_timeout = \"5s\""));
    assert_eq!(c.connect_timeout, Duration::from_secs(5));
}

#[test]
fn handshake_timeout_and_proxy_uid_come_from_every_source() {
    let args = ProxyArgs {
        handshake_timeout: Some("3s".into()),
        ..ProxyArgs::default()
    };
    let c = config(args, &[("MESHPROXY_PROXY_UID", "1337")], None);
    assert_eq!(c.handshake_timeout, Duration::from_secs(3));
    assert_eq!(c.proxy_uid, 1337);
    let c = config(
        ProxyArgs::default(),
        &[("MESHPROXY_HANDSHAKE_TIMEOUT", "250ms")],
        Some("proxy_uid = 0"),
    );
    assert_eq!(c.handshake_timeout, Duration::from_millis(250));
    assert_eq!(c.proxy_uid, 0);
    let err = error(ProxyArgs::default(), &[], Some("proxy_uid = -1"));
    assert!(err.contains("\"-1\"") && err.contains("proxy_uid"), "{err}");
}

/// The HTTP timeouts: a minute unless set, and set from the flag, the environment or the
/// settings file.
#[test]
fn http_timeouts_default_to_a_minute_and_come_from_every_source() {
    type Set = fn(&mut ProxyArgs, String);
    type Get = fn(&Config) -> Duration;
    let settings: [(&str, Set, Get); 2] = [
        (
            "http-header-read-timeout",
            |a, v| a.http_header_read_timeout = Some(v),
            |c| c.http_header_read_timeout,
        ),
        (
            "http-write-timeout",
            |a, v| a.http_write_timeout = Some(v),
            |c| c.http_write_timeout,
        ),
    ];
    for (flag, set, get) in settings {
        assert_eq!(
            get(&config(ProxyArgs::default(), &[], None)),
            Duration::from_secs(60),
            "{flag}"
        );
        let mut args = ProxyArgs::default();
        set(&mut args, "2s".into());
        assert_eq!(
            get(&config(args, &[], None)),
            Duration::from_secs(2),
            "{flag}"
        );
        let var = format!("MESHPROXY_{}", flag.to_uppercase().replace('-', "_"));
        let c = config(ProxyArgs::default(), &[(var.as_str(), "3s")], None);
        assert_eq!(get(&c), Duration::from_secs(3), "{var}");
        let file = format!("{} = \"5s\"", flag.replace('-', "_"));
        let c = config(ProxyArgs::default(), &[], Some(&file));
        assert_eq!(get(&c), Duration::from_secs(5), "{file}");
    }
}

/// Every duration setting: zero and out-of-range values (which used to overflow timer
/// arithmetic, or make every timer fire at once) are errors naming the value and where
/// it came from, whichever source it came from.
#[test]
fn durations_out_of_range_are_errors_naming_value_and_source() {
    type Set = fn(&mut ProxyArgs, String);
    let settings: [(&str, Set); 6] = [
        ("detect-timeout", |a, v| a.detect_timeout = Some(v)),
        ("shutdown-grace", |a, v| a.shutdown_grace = Some(v)),
        ("handshake-timeout", |a, v| a.handshake_timeout = Some(v)),
        ("connect-timeout", |a, v| a.connect_timeout = Some(v)),
        ("http-header-read-timeout", |a, v| {
            a.http_header_read_timeout = Some(v)
        }),
        ("http-write-timeout", |a, v| a.http_write_timeout = Some(v)),
    ];
    for (flag, set) in settings {
        for bad in [
            "0s",
            "0ms",
            "25h",
            "2days",
            "500000000000years",
            "-1s",
            "soon",
        ] {
            let mut args = ProxyArgs::default();
            set(&mut args, bad.to_string());
            let err = error(args, &[], None);
            assert!(
                err.contains(&format!("--{flag}")) && err.contains(bad),
                "{err}"
            );

            let var = format!("MESHPROXY_{}", flag.to_uppercase().replace('-', "_"));
            let err = error(ProxyArgs::default(), &[(var.as_str(), bad)], None);
            assert!(err.contains(&var) && err.contains(bad), "{err}");

            let key = flag.replace('-', "_");
            let err = error(
                ProxyArgs::default(),
                &[],
                Some(&format!("{key} = \"{bad}\"")),
            );
            assert!(err.contains(&key) && err.contains(bad), "{err}");
        }
        // The bounds themselves are valid.
        for good in ["1ms", "24h"] {
            let mut args = ProxyArgs::default();
            set(&mut args, good.to_string());
            config(args, &[], None);
        }
    }
}

#[test]
fn direction_lists_override_the_shared_list() {
    let args = ProxyArgs {
        opaque_ports: Some("1000-1002,80".into()),
        ..ProxyArgs::default()
    };
    let c = config(args, &[("MESHPROXY_INBOUND_OPAQUE_PORTS", "9000")], None);
    assert_eq!(c.outbound_opaque_ports.to_string(), "80,1000-1002");
    assert_eq!(c.inbound_opaque_ports.to_string(), "9000");
    assert!(c.outbound_opaque_ports.contains(1001));
    assert!(!c.inbound_opaque_ports.contains(1001));
}

#[test]
fn toml_lists_may_be_arrays_or_strings() {
    let c = config(
        ProxyArgs::default(),
        &[],
        Some(
            r#"
            opaque_ports = [25, "8000-8002"]
            outbound_opaque_ports = "7,9"
            inbound_addr = ["127.0.0.1:1", "[::1]:1"]
            log_format = "json"
            "#,
        ),
    );
    assert_eq!(c.inbound_opaque_ports.to_string(), "25,8000-8002");
    assert_eq!(c.outbound_opaque_ports.to_string(), "7,9");
    assert_eq!(c.inbound_addrs.len(), 2);
    assert_eq!(c.log_format, LogFormat::Json);
}

#[test]
fn empty_opaque_list_disables_opaque_ports() {
    let args = ProxyArgs {
        opaque_ports: Some(String::new()),
        ..ProxyArgs::default()
    };
    let c = config(args, &[], None);
    assert!(!c.inbound_opaque_ports.contains(3306));
}

#[test]
fn port_ranges_are_merged() {
    let set: PortSet = "10-20,15-30,31,5".parse().unwrap();
    assert_eq!(set.to_string(), "5,10-31");
}

#[test]
fn bad_values_name_the_value_and_its_source() {
    let args = ProxyArgs {
        opaque_ports: Some("25,70000".into()),
        ..ProxyArgs::default()
    };
    let msg = error(args, &[], None);
    assert!(msg.contains("\"25,70000\""), "{msg}");
    assert!(msg.contains("--opaque-ports"), "{msg}");
    assert!(msg.contains("invalid port \"70000\""), "{msg}");

    let msg = error(
        ProxyArgs::default(),
        &[("MESHPROXY_DETECT_TIMEOUT", "soon")],
        None,
    );
    assert!(msg.contains("\"soon\""), "{msg}");
    assert!(msg.starts_with("MESHPROXY_DETECT_TIMEOUT: "), "{msg}");
    assert!(msg.contains("10s, 500ms or 2m"), "{msg}");

    let msg = error(ProxyArgs::default(), &[], Some("admin_addr = \"nowhere\""));
    assert!(msg.starts_with("config file: admin_addr: "), "{msg}");

    let msg = error(ProxyArgs::default(), &[], Some("max_detecting = 0"));
    assert!(
        msg.starts_with("config file: max_detecting: invalid value \"0\""),
        "{msg}"
    );

    let msg = error(
        ProxyArgs::default(),
        &[("MESHPROXY_OPAQUE_PORTS", "30-20")],
        None,
    );
    assert!(msg.contains("invalid port range \"30-20\""), "{msg}");

    let msg = error(
        ProxyArgs {
            log_format: Some("xml".into()),
            ..ProxyArgs::default()
        },
        &[],
        None,
    );
    assert!(msg.contains("`plain` or `json`"), "{msg}");
}

#[test]
fn unknown_toml_keys_are_rejected() {
    let msg = error(ProxyArgs::default(), &[], Some("opaque_port = \"25\""));
    assert!(msg.contains("opaque_port"), "{msg}");
}

#[test]
fn config_path_comes_from_flag_then_env() {
    let vars = env(&[("MESHPROXY_CONFIG", "/env.toml")]);
    assert_eq!(
        Config::file_path(&ProxyArgs::default(), &vars),
        Some("/env.toml".into())
    );
    let args = ProxyArgs {
        config: Some("/flag.toml".into()),
        ..ProxyArgs::default()
    };
    assert_eq!(Config::file_path(&args, &vars), Some("/flag.toml".into()));
}

proptest::proptest! {
    /// Any list of ports and ranges parses to a set holding exactly those ports.
    #[test]
    fn port_set_holds_exactly_the_listed_ports(
        items in proptest::collection::vec((1u16..2000, 0u16..5), 0..8),
        probe in 1u16..2100,
    ) {
        let text = items
            .iter()
            .map(|&(lo, width)| if width == 0 { lo.to_string() } else { format!("{lo}-{}", lo + width) })
            .collect::<Vec<_>>()
            .join(",");
        let set = text.parse::<PortSet>().unwrap();
        let expected = items.iter().any(|&(lo, width)| (lo..=lo + width).contains(&probe));
        proptest::prop_assert_eq!(set.contains(probe), expected);
        // The canonical form parses back to the same set.
        proptest::prop_assert_eq!(set.to_string().parse::<PortSet>().unwrap(), set);
    }
}

/// The file is named by its path when `--config` (or `MESHPROXY_CONFIG`) gives it, and
/// every declared setting reads its `MESHPROXY_` variable.
#[test]
fn errors_name_the_file_path_and_every_setting_reads_its_variable() {
    let args = ProxyArgs {
        config: Some("/etc/meshproxy.toml".into()),
        ..ProxyArgs::default()
    };
    let msg = error(args, &[], Some("max_detecting = 0"));
    assert!(
        msg.starts_with("/etc/meshproxy.toml: max_detecting: invalid value \"0\""),
        "{msg}"
    );
    for setting in ProxyArgs::ALL {
        let var = setting.env_var(ENV_PREFIX);
        let err = Config::from_sources(
            &ProxyArgs::default(),
            &[(var.clone(), "\u{1}bad".to_string())]
                .into_iter()
                .collect(),
            None,
        );
        match err {
            // Paths accept any text, but one alone is an incomplete identity: read.
            Err(ConfigError::Inconsistent { .. }) => assert!(
                [
                    "identity_cert",
                    "identity_key",
                    "trust_anchors",
                    "mesh_peers"
                ]
                .contains(&setting.key),
                "{var}"
            ),
            Err(err) => assert!(err.to_string().starts_with(&format!("{var}: ")), "{err}"),
            // The discovery file needs no identity (until it names one), so any path is
            // a valid configuration: read if it is the one the variable gave.
            Ok(c) if setting.key == "discovery" => {
                assert_eq!(c.discovery, Some(PathBuf::from("\u{1}bad")), "{var}")
            }
            Ok(_) => panic!("{var} was ignored"),
        }
    }
}

#[test]
fn discovery_comes_from_every_source() {
    assert_eq!(config(ProxyArgs::default(), &[], None).discovery, None);
    let args = ProxyArgs {
        discovery: Some("/flag.toml".into()),
        ..ProxyArgs::default()
    };
    let c = config(args, &[("MESHPROXY_DISCOVERY", "/env.toml")], None);
    assert_eq!(c.discovery, Some(PathBuf::from("/flag.toml")));
    let c = config(
        ProxyArgs::default(),
        &[("MESHPROXY_DISCOVERY", "/env.toml")],
        Some("discovery = \"/file.toml\""),
    );
    assert_eq!(c.discovery, Some(PathBuf::from("/env.toml")));
    let c = config(
        ProxyArgs::default(),
        &[],
        Some("discovery = \"/file.toml\""),
    );
    assert_eq!(c.discovery, Some(PathBuf::from("/file.toml")));
}

#[test]
fn inbound_transparent_is_off_by_default_and_comes_from_every_source() {
    assert!(!Config::default().inbound_transparent);
    assert!(!config(ProxyArgs::default(), &[], None).inbound_transparent);
    let flag = ProxyArgs {
        inbound_transparent: Some("true".into()),
        ..ProxyArgs::default()
    };
    assert!(config(flag, &[("MESHPROXY_INBOUND_TRANSPARENT", "false")], None).inbound_transparent);
    assert!(
        config(
            ProxyArgs::default(),
            &[("MESHPROXY_INBOUND_TRANSPARENT", "yes")],
            None
        )
        .inbound_transparent
    );
    assert!(
        config(
            ProxyArgs::default(),
            &[],
            Some("inbound_transparent = true")
        )
        .inbound_transparent
    );
    let err = error(
        ProxyArgs::default(),
        &[("MESHPROXY_INBOUND_TRANSPARENT", "maybe")],
        None,
    );
    assert!(
        err.contains("\"maybe\"")
            && err.contains("MESHPROXY_INBOUND_TRANSPARENT")
            && err.contains("true or false"),
        "{err}"
    );
}

#[test]
fn cores_default_to_one_and_come_from_every_source() {
    assert_eq!(Config::default().cores, 1);
    let flag = ProxyArgs {
        cores: Some("4".into()),
        ..ProxyArgs::default()
    };
    assert_eq!(
        config(flag, &[("MESHPROXY_CORES", "3")], Some("cores = 2")).cores,
        4,
        "flag wins"
    );
    assert_eq!(
        config(
            ProxyArgs::default(),
            &[("MESHPROXY_CORES", "3")],
            Some("cores = 2")
        )
        .cores,
        3,
        "env beats file"
    );
    assert_eq!(
        config(ProxyArgs::default(), &[], Some("cores = 2")).cores,
        2,
        "file"
    );
    assert_eq!(
        config(ProxyArgs::default(), &[("MESHPROXY_CORES", "256")], None).cores,
        256,
        "the largest"
    );
}

#[test]
fn bad_cores_name_the_value_and_its_source() {
    for bad in ["0", "257", "-1", "two", "1.5", ""] {
        let flag = ProxyArgs {
            cores: Some(bad.into()),
            ..ProxyArgs::default()
        };
        let msg = error(flag, &[], None);
        assert!(
            msg.starts_with(&format!("--cores: invalid value \"{bad}\""))
                && msg.contains("from 1 to 256"),
            "{msg}"
        );
        let msg = error(ProxyArgs::default(), &[("MESHPROXY_CORES", bad)], None);
        assert!(
            msg.starts_with(&format!("MESHPROXY_CORES: invalid value \"{bad}\"")),
            "{msg}"
        );
    }
    let msg = error(ProxyArgs::default(), &[], Some("cores = 0"));
    assert!(
        msg.starts_with("config file: cores: invalid value \"0\""),
        "{msg}"
    );
}
