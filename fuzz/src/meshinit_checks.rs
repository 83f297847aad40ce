//! Checks for meshinit's own configuration loaders: `meshinit::config` (a TOML file
//! plus `MESHINIT_*` variables, merged and validated into a `Config`) and the CNI
//! plugin's network configuration on stdin (`meshinit::cni`: the size limit and the
//! duplicate-key check).

use std::collections::HashMap;
use std::path::PathBuf;

use meshinit::cli::Settings;
use meshinit::config::Config;
use meshinit_rules::{iptables, nft_json, nft_text, Family, Jumps, Ruleset};

/// The input is `TOML`, optionally followed by a NUL and `KEY=VALUE` lines of
/// environment. Whatever it is, loading must not panic; a config that loads must be
/// internally consistent and render in every format.
pub fn meshinit_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (toml, env_text) = text.split_once('\0').unwrap_or((text, ""));
    let env: HashMap<String, String> = env_text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let file = Some((PathBuf::from("meshinit.toml"), toml.to_string()));
    let Ok(config) = Config::load(Settings::default(), &env, file) else {
        return;
    };
    let spec = &config.spec;
    assert_ne!(spec.incoming_proxy_port, spec.outgoing_proxy_port);
    assert_ne!(spec.incoming_proxy_port, 0);
    assert_ne!(spec.outgoing_proxy_port, 0);
    let ruleset = Ruleset::from(spec);
    let _ = nft_text::render(&ruleset);
    serde_json::to_string(&nft_json::apply_batch(&ruleset)).expect("nft JSON serialises");
    for family in [Family::V4, Family::V6] {
        let _ = iptables::restore_text(&ruleset, family, Jumps::BOTH);
    }
}

/// The input is one byte choosing a stdin limit (16 bytes per unit, so the limit is
/// reached by small inputs too), then the bytes on stdin. Reading keeps at most
/// limit + 1 bytes and refuses anything longer with code 5; a configuration with a
/// key given twice in one object is never accepted (code 7); whatever parses
/// resolves or is refused without panicking.
pub fn cni_config(data: &[u8]) {
    let Some((&unit, stdin)) = data.split_first() else {
        return;
    };
    let limit = u64::from(unit) * 16;
    let mut input = Vec::new();
    match meshinit::cni::read_stdin(stdin, limit, &mut input) {
        Ok(()) => {
            assert!(input.len() as u64 <= limit);
            assert_eq!(input, stdin);
        }
        Err(err) => {
            assert_eq!(err.code(), 5, "{err:?}");
            assert!(stdin.len() as u64 > limit);
            assert_eq!(input.len() as u64, limit + 1, "read more than limit + 1");
            return;
        }
    }
    let duplicate = meshinit::cni::duplicate_key(&input);
    let is_json = serde_json::from_slice::<serde_json::Value>(&input).is_ok();
    match meshinit::cni::parse_config(&input) {
        Ok(settings) => {
            assert!(is_json, "accepted a config that is not JSON");
            assert_eq!(duplicate, None, "accepted a config with a repeated key");
            let _ = Config::from_cni(settings);
        }
        Err(err) => {
            if is_json && duplicate.is_some() {
                assert_eq!(err.code(), 7, "a repeated key must be code 7: {err:?}");
            }
        }
    }
    // A document serde_json writes has no repeated key.
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&input) {
        let rewritten = serde_json::to_vec(&value).expect("a Value serialises");
        assert_eq!(meshinit::cni::duplicate_key(&rewritten), None);
    }
}
