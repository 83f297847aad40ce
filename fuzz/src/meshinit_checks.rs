//! Checks for meshinit's own configuration loader (`meshinit::config`): a TOML file
//! plus `MESHINIT_*` variables, merged and validated into a `Config`.

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
