//! Configuration: flags > `MESHINIT_*` env vars > `--config` TOML file > defaults.
//!
//! [`Config::load`] is a pure function of its three sources (the environment
//! is passed in as a map), so every precedence rule is tested with plain
//! values. It parses every value before anything touches the kernel: bad
//! input exits 2 with nothing changed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use meshinit_rules::{Mode, PortSet, Spec, SpecError, SubnetList, Tproxy};
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
    /// Whether `apply`, `check --repair` and CNI ADD may change the host's initial
    /// network namespace; off by default, because a bare `meshinit` run as root on a
    /// host would otherwise send all of the host's outbound TCP to a port where
    /// nothing listens.
    pub allow_host_netns: bool,
    /// How long to wait for the lock file before giving up; 30s by default. Bounded so
    /// that a stuck run cannot hold up every later one (a pod's init container) forever.
    pub lock_timeout: Duration,
    /// How long `validate` waits for the redirected connection; 5s by default.
    pub validate_timeout: Duration,
}

/// The longest any duration setting may be (unless its flag says otherwise): beyond
/// a day a wait is a hang, and a bound keeps deadline arithmetic from overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// Where a setting's value came from, so that an error can say where to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env,
    File(PathBuf),
    /// The CNI plugin's network configuration (stdin).
    Cni,
    Default,
}

impl Source {
    /// "flag --lock-timeout", "env MESHINIT_LOCK_TIMEOUT", "lock_timeout in config file F".
    pub fn describe(&self, flag: &str) -> String {
        let key = flag.replace('-', "_");
        match self {
            Source::Flag => format!("flag --{flag}"),
            Source::Env => format!("env MESHINIT_{}", key.to_uppercase()),
            Source::File(path) => format!("{key} in config file {}", path.display()),
            Source::Cni => format!("{key} in the CNI network configuration"),
            Source::Default => "the default".to_string(),
        }
    }
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
    #[error("--{flag}: {input:?} (from {origin}) {problem}")]
    FromSource {
        flag: &'static str,
        input: String,
        /// [`Source::describe`] of where the value came from.
        origin: String,
        problem: String,
    },
}

impl Settings {
    /// Each setting with its flag name, for generic merging.
    fn fields_mut(&mut self) -> [(&'static str, &mut Option<String>); 22] {
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
            ("allow-host-netns", &mut self.allow_host_netns),
            ("lock-timeout", &mut self.lock_timeout),
            ("validate-timeout", &mut self.validate_timeout),
            ("mode", &mut self.mode),
            ("tproxy-mark", &mut self.tproxy_mark),
            ("tproxy-table", &mut self.tproxy_table),
            ("tproxy-rule-priority", &mut self.tproxy_rule_priority),
        ]
    }

    /// The flag names of the settings this source gives.
    fn given(&self) -> Vec<&'static str> {
        self.clone()
            .fields_mut()
            .into_iter()
            .filter(|(_, value)| value.is_some())
            .map(|(flag, _)| flag)
            .collect()
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
        let from_env = Settings::from_env(env);
        let from_file = match file {
            Some((path, contents)) => {
                let settings: Settings =
                    toml::from_str(&contents).map_err(|err| ConfigError::File {
                        path: path.clone(),
                        message: err.message().to_string(),
                    })?;
                Some((path, settings))
            }
            None => None,
        };
        // Recorded before the merge, which forgets where each value came from.
        let (in_flags, in_env) = (flags.given(), from_env.given());
        let in_file = from_file
            .as_ref()
            .map(|(path, settings)| (path.clone(), settings.given()));
        let origin = |flag: &'static str| {
            if in_flags.contains(&flag) {
                Source::Flag
            } else if in_env.contains(&flag) {
                Source::Env
            } else {
                match &in_file {
                    Some((path, given)) if given.contains(&flag) => Source::File(path.clone()),
                    _ => Source::Default,
                }
            }
        };
        let mut settings = flags.or(from_env);
        if let Some((_, from_file)) = from_file {
            settings = settings.or(from_file);
        }
        Config::resolve(settings, &origin)
    }

    /// Validates the settings of a CNI network configuration (no env, no file).
    pub fn from_cni(settings: Settings) -> Result<Config, ConfigError> {
        Config::resolve(settings, &|_| Source::Cni)
    }

    fn resolve(
        s: Settings,
        origin: &dyn Fn(&'static str) -> Source,
    ) -> Result<Config, ConfigError> {
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
            mode: mode(&s, origin)?,
        }
        .validate()
        .map_err(|error| match error {
            SpecError::SameProxyPort { .. } => ConfigError::SameProxyPort(error),
            SpecError::ZeroMark => from_source("tproxy-mark", &s.tproxy_mark, origin, error),
            SpecError::ReservedTable { .. } => {
                from_source("tproxy-table", &s.tproxy_table, origin, error)
            }
            _ => from_source(
                "tproxy-rule-priority",
                &s.tproxy_rule_priority,
                origin,
                error,
            ),
        })?;
        Ok(Config {
            spec,
            backend: backend(&s.backend, &s.iptables_mode)?,
            netns: netns(&s.netns, origin)?,
            dry_run: boolean(&s.dry_run, "dry-run")?.unwrap_or(false),
            log_format: match s.log_format.as_deref() {
                None | Some("plain") => LogFormat::Plain,
                Some("json") => LogFormat::Json,
                Some(other) => return Err(bad("log-format", other, "plain or json")),
            },
            allow_host_netns: boolean(&s.allow_host_netns, "allow-host-netns")?.unwrap_or(false),
            lock_timeout: duration(&s.lock_timeout, "lock-timeout", origin)?
                .unwrap_or(Duration::from_secs(30)),
            validate_timeout: duration(&s.validate_timeout, "validate-timeout", origin)?
                .unwrap_or(Duration::from_secs(5)),
        })
    }
}

fn from_source(
    flag: &'static str,
    value: &Option<String>,
    origin: &dyn Fn(&'static str) -> Source,
    error: SpecError,
) -> ConfigError {
    ConfigError::FromSource {
        flag,
        input: value.clone().unwrap_or_default(),
        origin: origin(flag).describe(flag),
        problem: format!("is refused: {error}"),
    }
}

/// `--mode redirect|tproxy`, and in tproxy mode its mark, table and rule
/// priority. The three tproxy settings given in redirect mode are refused: they
/// would do nothing, which is not what whoever wrote them expects.
fn mode(s: &Settings, origin: &dyn Fn(&'static str) -> Source) -> Result<Mode, ConfigError> {
    let number = |value: &Option<String>, flag: &'static str| -> Result<Option<u32>, ConfigError> {
        let Some(text) = value else { return Ok(None) };
        let text = text.trim();
        let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => text.parse(),
        };
        parsed.map(Some).map_err(|_| ConfigError::FromSource {
            flag,
            input: text.to_string(),
            origin: origin(flag).describe(flag),
            problem: "is not a number: expected 0 to 4294967295, decimal or 0x hex".to_string(),
        })
    };
    let mark = number(&s.tproxy_mark, "tproxy-mark")?;
    let table = number(&s.tproxy_table, "tproxy-table")?;
    let priority = number(&s.tproxy_rule_priority, "tproxy-rule-priority")?;
    match s.mode.as_deref().map(str::trim) {
        None | Some("redirect") => {
            for (flag, given) in [
                ("tproxy-mark", mark.is_some()),
                ("tproxy-table", table.is_some()),
                ("tproxy-rule-priority", priority.is_some()),
            ] {
                if given {
                    return Err(ConfigError::FromSource {
                        flag,
                        input: match flag {
                            "tproxy-mark" => s.tproxy_mark.clone(),
                            "tproxy-table" => s.tproxy_table.clone(),
                            _ => s.tproxy_rule_priority.clone(),
                        }
                        .unwrap_or_default(),
                        origin: origin(flag).describe(flag),
                        problem: "only applies with --mode tproxy (the mode is redirect)"
                            .to_string(),
                    });
                }
            }
            Ok(Mode::Redirect)
        }
        Some("tproxy") => Ok(Mode::Tproxy(Tproxy {
            mark: mark.unwrap_or(Tproxy::DEFAULT.mark),
            table: table.unwrap_or(Tproxy::DEFAULT.table),
            rule_priority: priority.unwrap_or(Tproxy::DEFAULT.rule_priority),
        })),
        Some(other) => Err(ConfigError::FromSource {
            flag: "mode",
            input: other.to_string(),
            origin: origin("mode").describe("mode"),
            problem: "is not a mode: expected redirect or tproxy".to_string(),
        }),
    }
}

fn bad(flag: &'static str, input: &str, expected: &'static str) -> ConfigError {
    ConfigError::BadValue {
        flag,
        input: input.to_string(),
        expected,
    }
}

/// `--netns PATH`. An empty path is refused rather than read as "the current
/// namespace": an unset template variable (`--netns "$NS"`) must not turn a run meant
/// for a pod into one on whatever namespace meshinit happens to be in.
fn netns(
    value: &Option<String>,
    origin: &dyn Fn(&'static str) -> Source,
) -> Result<Option<PathBuf>, ConfigError> {
    match value {
        None => Ok(None),
        Some(text) if text.trim().is_empty() => Err(ConfigError::FromSource {
            flag: "netns",
            input: text.clone(),
            origin: origin("netns").describe("netns"),
            problem: "is empty: expected a namespace file (/var/run/netns/NAME or /proc/PID/ns/net); leave the setting out to use the current namespace".to_string(),
        }),
        Some(text) => Ok(Some(PathBuf::from(text))),
    }
}

/// A duration such as `30s`, `500ms` or `2m`: more than 0 and at most
/// [`MAX_DURATION`]. Zero would make every wait fail at once, and a huge value would
/// overflow the deadline it is added to.
fn duration(
    value: &Option<String>,
    flag: &'static str,
    origin: &dyn Fn(&'static str) -> Source,
) -> Result<Option<Duration>, ConfigError> {
    let Some(text) = value else { return Ok(None) };
    let error = |problem: String| ConfigError::FromSource {
        flag,
        input: text.clone(),
        origin: origin(flag).describe(flag),
        problem,
    };
    let parsed = humantime::parse_duration(text.trim()).map_err(|err| {
        error(format!(
            "is not a duration ({err}): expected e.g. 30s, 500ms or 2m"
        ))
    })?;
    if parsed.is_zero() || parsed > MAX_DURATION {
        return Err(error(
            "is out of range: expected more than 0 and at most 1day".to_string(),
        ));
    }
    Ok(Some(parsed))
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
