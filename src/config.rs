//! Configuration: flags > `MESHINIT_*` env vars > `--config` TOML file > defaults.
//!
//! [`Config::load`] is a pure function of its three sources (the environment
//! is passed in as a map), so every precedence rule is tested with plain
//! values. It parses every value before anything touches the kernel: bad
//! input exits 2 with nothing changed.

use std::collections::HashMap;
use std::path::PathBuf;

use meshinit_rules::{PortSet, Spec, SpecError, SubnetList};
use serde::{Deserialize, Deserializer};
use thiserror::Error;

use crate::cli::Settings;

/// Which rule backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// Decide from what the namespace and host support (the default).
    Auto,
    Nft,
    IptablesNft,
    IptablesLegacy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Everything meshinit needs to run, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The rules to install (ports, subnets, uid/gid, IPv6).
    pub spec: Spec,
    /// Rule backend; `auto` by default.
    pub backend: BackendChoice,
    /// Namespace file to enter first; `None` means the current namespace.
    pub netns: Option<PathBuf>,
    /// Print instead of applying; off by default.
    pub dry_run: bool,
    /// Log format; plain by default.
    pub log_format: LogFormat,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("--{flag}: {error}")]
    Spec {
        flag: &'static str,
        error: SpecError,
    },
    #[error("--{flag}: invalid value {input:?}: expected {expected}")]
    BadValue {
        flag: &'static str,
        input: String,
        expected: &'static str,
    },
    #[error("{0}")]
    SameProxyPort(SpecError),
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
}

impl Settings {
    /// Each setting with its flag name, for generic merging.
    fn fields_mut(&mut self) -> [(&'static str, &mut Option<String>); 15] {
        [
            ("incoming-proxy-port", &mut self.incoming_proxy_port),
            ("outgoing-proxy-port", &mut self.outgoing_proxy_port),
            ("proxy-uid", &mut self.proxy_uid),
            ("proxy-gid", &mut self.proxy_gid),
            ("inbound-ports-to-ignore", &mut self.inbound_ports_to_ignore),
            (
                "outbound-ports-to-ignore",
                &mut self.outbound_ports_to_ignore,
            ),
            ("ports-to-redirect", &mut self.ports_to_redirect),
            ("subnets-to-ignore", &mut self.subnets_to_ignore),
            (
                "inbound-subnets-to-ignore",
                &mut self.inbound_subnets_to_ignore,
            ),
            (
                "outbound-subnets-to-ignore",
                &mut self.outbound_subnets_to_ignore,
            ),
            ("backend", &mut self.backend),
            ("iptables-mode", &mut self.iptables_mode),
            ("ipv6", &mut self.ipv6),
            ("netns", &mut self.netns),
            ("dry-run", &mut self.dry_run),
        ]
    }

    /// The keys of the TOML file (and of the CNI network config): the flag names
    /// in snake_case.
    pub fn keys() -> Vec<String> {
        let mut keys: Vec<String> = Settings::default()
            .fields_mut()
            .iter()
            .map(|(flag, _)| flag.replace('-', "_"))
            .collect();
        keys.push("log_format".to_string());
        keys
    }

    /// Settings from `MESHINIT_<FLAG_IN_CAPS>` variables.
    pub fn from_env(env: &HashMap<String, String>) -> Settings {
        let mut settings = Settings::default();
        for (flag, slot) in settings.fields_mut() {
            let key = format!("MESHINIT_{}", flag.replace('-', "_").to_uppercase());
            *slot = env.get(&key).cloned();
        }
        settings.log_format = env.get("MESHINIT_LOG_FORMAT").cloned();
        settings.config = env.get("MESHINIT_CONFIG").map(PathBuf::from);
        settings
    }

    /// Fills every setting still unset from `lower` (a lower-precedence source).
    pub fn or(mut self, mut lower: Settings) -> Settings {
        for ((_, mine), (_, theirs)) in self.fields_mut().into_iter().zip(lower.fields_mut()) {
            if mine.is_none() {
                *mine = theirs.take();
            }
        }
        self.log_format = self.log_format.or(lower.log_format);
        self.config = self.config.or(lower.config);
        self
    }
}

/// Deserialises a TOML value that may be a string, a number, a boolean, or an
/// array of strings and numbers (`[5555, "9000-9010"]`) into the same string
/// form a flag takes.
pub fn setting<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Item {
        Text(String),
        Number(i64),
        Bool(bool),
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        One(Item),
        List(Vec<Item>),
    }
    let text = |item: Item| match item {
        Item::Text(text) => text,
        Item::Number(number) => number.to_string(),
        Item::Bool(flag) => flag.to_string(),
    };
    Ok(Some(match Value::deserialize(deserializer)? {
        Value::One(item) => text(item),
        Value::List(items) => items.into_iter().map(text).collect::<Vec<_>>().join(","),
    }))
}

impl Config {
    /// Merges the three sources and validates the result.
    ///
    /// `file` is the config file's path and contents, when there is one (the
    /// caller reads it: this function does no I/O).
    pub fn load(
        flags: Settings,
        env: &HashMap<String, String>,
        file: Option<(PathBuf, String)>,
    ) -> Result<Config, ConfigError> {
        let mut settings = flags.or(Settings::from_env(env));
        if let Some((path, contents)) = file {
            let from_file: Settings =
                toml::from_str(&contents).map_err(|err| ConfigError::File {
                    path: path.clone(),
                    message: err.message().to_string(),
                })?;
            settings = settings.or(from_file);
        }
        Config::resolve(settings)
    }

    fn resolve(s: Settings) -> Result<Config, ConfigError> {
        let defaults = Spec::default();
        let spec = Spec {
            incoming_proxy_port: port(&s.incoming_proxy_port, "incoming-proxy-port")?
                .unwrap_or(defaults.incoming_proxy_port),
            outgoing_proxy_port: port(&s.outgoing_proxy_port, "outgoing-proxy-port")?
                .unwrap_or(defaults.outgoing_proxy_port),
            proxy_uid: id(&s.proxy_uid, "proxy-uid")?.or(defaults.proxy_uid),
            proxy_gid: id(&s.proxy_gid, "proxy-gid")?,
            inbound_ports_to_ignore: ports(&s.inbound_ports_to_ignore, "inbound-ports-to-ignore")?
                .unwrap_or(defaults.inbound_ports_to_ignore),
            outbound_ports_to_ignore: ports(
                &s.outbound_ports_to_ignore,
                "outbound-ports-to-ignore",
            )?
            .unwrap_or_default(),
            ports_to_redirect: ports(&s.ports_to_redirect, "ports-to-redirect")?
                .unwrap_or_default(),
            inbound_subnets_to_ignore: subnets(&s.subnets_to_ignore, "subnets-to-ignore")?.union(
                &subnets(&s.inbound_subnets_to_ignore, "inbound-subnets-to-ignore")?,
            ),
            outbound_subnets_to_ignore: subnets(&s.subnets_to_ignore, "subnets-to-ignore")?.union(
                &subnets(&s.outbound_subnets_to_ignore, "outbound-subnets-to-ignore")?,
            ),
            ipv6: boolean(&s.ipv6, "ipv6")?.unwrap_or(true),
        }
        .validate()
        .map_err(ConfigError::SameProxyPort)?;
        Ok(Config {
            spec,
            backend: backend(&s.backend, &s.iptables_mode)?,
            netns: s.netns.filter(|p| !p.is_empty()).map(PathBuf::from),
            dry_run: boolean(&s.dry_run, "dry-run")?.unwrap_or(false),
            log_format: match s.log_format.as_deref() {
                None | Some("plain") => LogFormat::Plain,
                Some("json") => LogFormat::Json,
                Some(other) => return Err(bad("log-format", other, "plain or json")),
            },
        })
    }
}

fn bad(flag: &'static str, input: &str, expected: &'static str) -> ConfigError {
    ConfigError::BadValue {
        flag,
        input: input.to_string(),
        expected,
    }
}

fn port(value: &Option<String>, flag: &'static str) -> Result<Option<u16>, ConfigError> {
    let Some(text) = value else { return Ok(None) };
    match text.trim().parse::<meshinit_rules::PortRange>() {
        Ok(range) if range.is_single() => Ok(Some(range.lo)),
        Ok(_) => Err(bad(flag, text, "a single port from 1 to 65535")),
        Err(error) => Err(ConfigError::Spec { flag, error }),
    }
}

fn id(value: &Option<String>, flag: &'static str) -> Result<Option<u32>, ConfigError> {
    let Some(text) = value else { return Ok(None) };
    text.trim()
        .parse::<u32>()
        .map(Some)
        .map_err(|_| bad(flag, text, "a numeric id from 0 to 4294967295"))
}

fn ports(value: &Option<String>, flag: &'static str) -> Result<Option<PortSet>, ConfigError> {
    value
        .as_deref()
        .map(|text| {
            text.parse()
                .map_err(|error| ConfigError::Spec { flag, error })
        })
        .transpose()
}

fn subnets(value: &Option<String>, flag: &'static str) -> Result<SubnetList, ConfigError> {
    value
        .as_deref()
        .map(|text| {
            text.parse()
                .map_err(|error| ConfigError::Spec { flag, error })
        })
        .transpose()
        .map(Option::unwrap_or_default)
}

fn boolean(value: &Option<String>, flag: &'static str) -> Result<Option<bool>, ConfigError> {
    let Some(text) = value else { return Ok(None) };
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(Some(true)),
        "false" | "0" | "no" => Ok(Some(false)),
        _ => Err(bad(flag, text, "true or false")),
    }
}

/// `--backend` wins over its alias `--iptables-mode`; both unset means auto.
fn backend(backend: &Option<String>, mode: &Option<String>) -> Result<BackendChoice, ConfigError> {
    if let Some(name) = backend {
        return match name.trim() {
            "auto" => Ok(BackendChoice::Auto),
            "nft" => Ok(BackendChoice::Nft),
            "iptables-nft" => Ok(BackendChoice::IptablesNft),
            "iptables-legacy" => Ok(BackendChoice::IptablesLegacy),
            _ => Err(bad(
                "backend",
                name,
                "nft, iptables-nft, iptables-legacy or auto",
            )),
        };
    }
    match mode.as_deref().map(str::trim) {
        None => Ok(BackendChoice::Auto),
        Some("nft") => Ok(BackendChoice::IptablesNft),
        Some("legacy") => Ok(BackendChoice::IptablesLegacy),
        Some(other) => Err(bad("iptables-mode", other, "legacy or nft")),
    }
}

#[cfg(test)]
mod tests;
