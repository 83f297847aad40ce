//! Configuration: flags > `MESHINIT_*` env vars > `--config` TOML file > defaults.
//!
//! [`Config::load`] is a pure function of its three sources (the environment
//! is passed in as a map), so every precedence rule is tested with plain
//! values. It parses every value before anything touches the kernel: bad
//! input exits 2 with nothing changed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use meshinit_rules::{Mode, PortSet, Spec, SpecError, SubnetList, Tproxy};
use meshinit_settings::{File, FileError, SettingError, Sources};
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
    /// Where `validate` connects: an address in the benchmarking range that no host
    /// answers for; 198.18.255.254:1404 by default.
    pub validate_addr: SocketAddr,
    /// The unprivileged uid `validate` connects as when started as root; 65534
    /// (nobody) by default.
    pub validate_uid: u32,
}

/// The longest any duration setting may be (unless its flag says otherwise): beyond
/// a day a wait is a hang, and a bound keeps deadline arithmetic from overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// The prefix of meshinit's environment variables: `MESHINIT_OUTBOUND_PORTS_TO_IGNORE`.
pub const ENV_PREFIX: &str = "MESHINIT";

/// What the CNI plugin's settings are called in error messages.
const CNI_CONFIG: &str = "the CNI network configuration";

#[derive(Debug, Error)]
pub enum ConfigError {
    /// A value that does not parse, naming it and its source.
    #[error(transparent)]
    Setting(#[from] SettingError),
    #[error("{0}")]
    SameProxyPort(SpecError),
    /// The `--config` file as a whole: not TOML, or an unknown key.
    #[error(transparent)]
    File(#[from] FileError),
}

impl Settings {
    /// The keys of the TOML file (and of the CNI network config): the flag names
    /// in snake_case.
    pub fn keys() -> Vec<String> {
        Settings::ALL.iter().map(|s| s.key.to_string()).collect()
    }
}

/// Deserialises a TOML value that may be a string, a number, a boolean, or an
/// array of strings and numbers (`[5555, "9000-9010"]`) into the same string
/// form a flag takes.
pub use meshinit_settings::document_value as setting;

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
        let file = match file {
            Some((path, contents)) => Some(File::parse(
                &path.display().to_string(),
                &contents,
                Settings::ALL,
            )?),
            None => None,
        };
        Config::resolve(&Sources::new(ENV_PREFIX, flags.values(), env, file))
    }

    /// Validates the settings of a CNI network configuration (no env, no file).
    pub fn from_cni(settings: Settings) -> Result<Config, ConfigError> {
        Config::resolve(&Sources::document(CNI_CONFIG, settings.values()))
    }

    fn resolve(s: &Sources<'_>) -> Result<Config, ConfigError> {
        let defaults = Spec::default();
        let subnets = |key| {
            s.get(key, spec(str::parse::<SubnetList>))
                .map(Option::unwrap_or_default)
        };
        let spec = Spec {
            incoming_proxy_port: s
                .get("incoming_proxy_port", port)?
                .unwrap_or(defaults.incoming_proxy_port),
            outgoing_proxy_port: s
                .get("outgoing_proxy_port", port)?
                .unwrap_or(defaults.outgoing_proxy_port),
            proxy_uid: s.get("proxy_uid", id)?.or(defaults.proxy_uid),
            proxy_gid: s.get("proxy_gid", id)?,
            inbound_ports_to_ignore: s
                .get("inbound_ports_to_ignore", spec(str::parse::<PortSet>))?
                .unwrap_or(defaults.inbound_ports_to_ignore),
            outbound_ports_to_ignore: s
                .get("outbound_ports_to_ignore", spec(str::parse::<PortSet>))?
                .unwrap_or_default(),
            ports_to_redirect: s
                .get("ports_to_redirect", spec(str::parse::<PortSet>))?
                .unwrap_or_default(),
            inbound_subnets_to_ignore: subnets("subnets_to_ignore")?
                .union(&subnets("inbound_subnets_to_ignore")?),
            outbound_subnets_to_ignore: subnets("subnets_to_ignore")?
                .union(&subnets("outbound_subnets_to_ignore")?),
            ipv6: s.get("ipv6", boolean)?.unwrap_or(true),
            mode: mode(s)?,
        }
        .validate()
        .map_err(|error| refused(s, error))?;
        Ok(Config {
            spec,
            backend: backend(s)?,
            netns: s.get("netns", netns)?,
            dry_run: s.get("dry_run", boolean)?.unwrap_or(false),
            log_format: s.get("log_format", log_format)?.unwrap_or(LogFormat::Plain),
            allow_host_netns: s.get("allow_host_netns", boolean)?.unwrap_or(false),
            lock_timeout: s
                .get("lock_timeout", duration)?
                .unwrap_or(Duration::from_secs(30)),
            validate_timeout: s
                .get("validate_timeout", duration)?
                .unwrap_or(Duration::from_secs(5)),
            validate_addr: s
                .get("validate_addr", |text| {
                    text.trim()
                        .parse()
                        .map_err(|_| "expected IP:PORT, e.g. 198.18.255.254:1404".to_string())
                })?
                .unwrap_or(SocketAddr::from(([198, 18, 255, 254], 1404))),
            validate_uid: s.get("validate_uid", id)?.unwrap_or(65534),
        })
    }
}

/// A parser from the rules crate, whose errors already quote the input.
fn spec<T>(parse: fn(&str) -> Result<T, SpecError>) -> impl Fn(&str) -> Result<T, String> {
    move |text| parse(text).map_err(|error| error.to_string())
}

/// A refusal of [`Spec::validate`]: the proxy ports' clash is about two settings; the
/// tproxy ones name the setting they are about, so the error says where it came from.
fn refused(s: &Sources<'_>, error: SpecError) -> ConfigError {
    let key = match error {
        SpecError::ZeroMark => "tproxy_mark",
        SpecError::ReservedTable { .. } => "tproxy_table",
        SpecError::BadRulePriority { .. } => "tproxy_rule_priority",
        _ => return ConfigError::SameProxyPort(error),
    };
    match s.raw(key) {
        Some((origin, input)) => {
            SettingError::new(origin, &input, &format!("{input:?} is refused: {error}")).into()
        }
        // A default the rules crate refuses would be a bug in the default.
        None => ConfigError::SameProxyPort(error),
    }
}

/// `--mode redirect|tproxy`.
fn parse_mode(text: &str) -> Result<Mode, String> {
    match text.trim() {
        "redirect" => Ok(Mode::Redirect),
        "tproxy" => Ok(Mode::Tproxy(Tproxy::DEFAULT)),
        _ => Err("expected redirect or tproxy".to_string()),
    }
}

/// A mark, table or rule priority: decimal or 0x hex.
fn number(text: &str) -> Result<u32, String> {
    let text = text.trim();
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .map_err(|_| "not a number: expected 0 to 4294967295, decimal or 0x hex".to_string())
}

/// The settings only tproxy mode reads.
const TPROXY_KEYS: [&str; 3] = ["tproxy_mark", "tproxy_table", "tproxy_rule_priority"];

/// `--mode redirect|tproxy`, and in tproxy mode its mark, table and rule
/// priority. The three tproxy settings given in redirect mode are refused: they
/// would do nothing, which is not what whoever wrote them expects.
fn mode(s: &Sources<'_>) -> Result<Mode, SettingError> {
    let mark = s.get("tproxy_mark", number)?;
    let table = s.get("tproxy_table", number)?;
    let priority = s.get("tproxy_rule_priority", number)?;
    match s.get("mode", parse_mode)?.unwrap_or(Mode::Redirect) {
        Mode::Redirect => {
            if let Some((origin, input)) = TPROXY_KEYS.into_iter().find_map(|key| s.raw(key)) {
                // Quoting the input keeps "invalid value" out: the value is fine,
                // only useless in this mode.
                let problem =
                    format!("{input:?} only applies with --mode tproxy (the mode is redirect)");
                return Err(SettingError::new(origin, &input, &problem));
            }
            Ok(Mode::Redirect)
        }
        Mode::Tproxy(defaults) => Ok(Mode::Tproxy(Tproxy {
            mark: mark.unwrap_or(defaults.mark),
            table: table.unwrap_or(defaults.table),
            rule_priority: priority.unwrap_or(defaults.rule_priority),
        })),
    }
}

/// `--netns PATH`. An empty path is refused rather than read as "the current
/// namespace": an unset template variable (`--netns "$NS"`) must not turn a run meant
/// for a pod into one on whatever namespace meshinit happens to be in.
fn netns(text: &str) -> Result<PathBuf, String> {
    if text.trim().is_empty() {
        return Err(format!(
            "{text:?} is empty: expected a namespace file (/var/run/netns/NAME or \
             /proc/PID/ns/net); leave the setting out to use the current namespace"
        ));
    }
    Ok(PathBuf::from(text))
}

/// A duration such as `30s`, `500ms` or `2m`: more than 0 and at most
/// [`MAX_DURATION`]. Zero would make every wait fail at once, and a huge value would
/// overflow the deadline it is added to.
fn duration(text: &str) -> Result<Duration, String> {
    let parsed = humantime::parse_duration(text.trim()).map_err(|err| {
        format!("{text:?} is not a duration ({err}): expected e.g. 30s, 500ms or 2m")
    })?;
    if parsed.is_zero() || parsed > MAX_DURATION {
        return Err(format!(
            "{text:?} is out of range: expected more than 0 and at most 1day"
        ));
    }
    Ok(parsed)
}

fn port(text: &str) -> Result<u16, String> {
    match text.trim().parse::<meshinit_rules::PortRange>() {
        Ok(range) if range.is_single() => Ok(range.lo),
        Ok(_) => Err("expected a single port from 1 to 65535".to_string()),
        Err(error) => Err(error.to_string()),
    }
}

fn id(text: &str) -> Result<u32, String> {
    text.trim()
        .parse::<u32>()
        .map_err(|_| "expected a numeric id from 0 to 4294967295".to_string())
}

fn boolean(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err("expected true or false".to_string()),
    }
}

fn log_format(text: &str) -> Result<LogFormat, String> {
    match text {
        "plain" => Ok(LogFormat::Plain),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected plain or json".to_string()),
    }
}

/// `--backend` wins over its alias `--iptables-mode`; both unset means auto.
fn backend(s: &Sources<'_>) -> Result<BackendChoice, SettingError> {
    let backend = s.get("backend", |name| match name.trim() {
        "auto" => Ok(BackendChoice::Auto),
        "nft" => Ok(BackendChoice::Nft),
        "iptables-nft" => Ok(BackendChoice::IptablesNft),
        "iptables-legacy" => Ok(BackendChoice::IptablesLegacy),
        _ => Err("expected nft, iptables-nft, iptables-legacy or auto".to_string()),
    })?;
    if let Some(backend) = backend {
        return Ok(backend);
    }
    let mode = s.get("iptables_mode", |mode| match mode.trim() {
        "nft" => Ok(BackendChoice::IptablesNft),
        "legacy" => Ok(BackendChoice::IptablesLegacy),
        _ => Err("expected legacy or nft".to_string()),
    })?;
    Ok(mode.unwrap_or(BackendChoice::Auto))
}

#[cfg(test)]
mod tests;
