//! Configuration: one typed [`Config`] built by a pure function from three sources.
//!
//! Precedence is flag > env `MESHPROXY_<FLAG>` > TOML file > default, like meshinit.
//! [`Config::from_sources`] takes the environment as a map and the TOML file as its
//! contents, so nothing here reads the process environment or the disk and tests never
//! call `std::env::set_var`.
//!
//! Every source is reduced to a string first and parsed by the same function, so a bad
//! value gets the same error whichever source it came from, naming that source.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::identity::IdentityFiles;

/// The command-line flags of the proxy, as given (not yet merged or parsed).
///
/// Every value is kept as the raw string so that [`Config::from_sources`] can tell "not
/// given" from "given" and apply the precedence itself. Defaults are listed in the help.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ProxyArgs {
    /// TOML file with the same settings as the flags, keys in snake_case.
    #[arg(long, value_name = "PATH", help_heading = "Configuration")]
    pub config: Option<PathBuf>,

    /// Inbound listeners, comma-separated [default: 0.0.0.0:4143,[::]:4143].
    #[arg(long, value_name = "ADDRS", help_heading = "Listeners")]
    pub inbound_addr: Option<String>,
    /// Outbound listeners, comma-separated [default: 127.0.0.1:4140,[::1]:4140].
    #[arg(long, value_name = "ADDRS", help_heading = "Listeners")]
    pub outbound_addr: Option<String>,
    /// Admin listener for /metrics, /ready and /live [default: 0.0.0.0:4191].
    #[arg(long, value_name = "ADDR", help_heading = "Listeners")]
    pub admin_addr: Option<String>,

    /// Ports forwarded without protocol detection, `N` or `LO-HI`, comma-separated
    /// [default: 25,587,3306,4444,5432,6379,9300,11211].
    #[arg(long, value_name = "PORTS", help_heading = "Protocol detection")]
    pub opaque_ports: Option<String>,
    /// Opaque ports for inbound connections only; overrides --opaque-ports.
    #[arg(long, value_name = "PORTS", help_heading = "Protocol detection")]
    pub inbound_opaque_ports: Option<String>,
    /// Opaque ports for outbound connections only; overrides --opaque-ports.
    #[arg(long, value_name = "PORTS", help_heading = "Protocol detection")]
    pub outbound_opaque_ports: Option<String>,
    /// How long to wait for the client's first bytes before forwarding as opaque TCP
    /// [default: 10s].
    #[arg(long, value_name = "DURATION", help_heading = "Protocol detection")]
    pub detect_timeout: Option<String>,

    /// Most connections open at once, per direction (inbound and outbound each have
    /// this many); more are closed at accept [default: 16384].
    #[arg(long, value_name = "N", help_heading = "Limits")]
    pub max_connections: Option<String>,
    /// Most connections still in protocol detection (or, on the inbound port, still
    /// without a TLS ClientHello), per direction; more are closed [default: 4096].
    #[arg(long, value_name = "N", help_heading = "Limits")]
    pub max_detecting: Option<String>,
    /// How long a direct mTLS client of the inbound port may take to send its
    /// ClientHello, and an mTLS handshake with its transport header to complete
    /// [default: 10s].
    #[arg(long, value_name = "DURATION", help_heading = "Limits")]
    pub handshake_timeout: Option<String>,

    /// On SIGTERM/SIGINT, how long open connections may drain [default: 30s].
    #[arg(long, value_name = "DURATION", help_heading = "Lifecycle")]
    pub shutdown_grace: Option<String>,

    /// The UID meshproxy is meant to run as, meshinit's --proxy-uid, whose traffic is
    /// not redirected; a warning is logged at start-up when the effective UID differs
    /// [default: 2102].
    #[arg(long, value_name = "UID", help_heading = "Lifecycle")]
    pub proxy_uid: Option<String>,
    /// Metric label sets with no open connection for this long are dropped
    /// [default: 10m].
    #[arg(long, value_name = "DURATION", help_heading = "Metrics")]
    pub metrics_retain_idle: Option<String>,

    /// `plain` or `json` (one object per line) [default: plain].
    #[arg(long, value_name = "FORMAT", help_heading = "Logging")]
    pub log_format: Option<String>,

    /// Our certificate (PEM, leaf first); its DNS SAN is our identity. With
    /// --identity-key and --trust-anchors, enables mTLS [default: none, no mTLS].
    #[arg(long, value_name = "PATH", help_heading = "Identity (mTLS)")]
    pub identity_cert: Option<String>,
    /// The private key of --identity-cert (PEM).
    #[arg(long, value_name = "PATH", help_heading = "Identity (mTLS)")]
    pub identity_key: Option<String>,
    /// CA certificates (PEM) that peers' certificates must chain to.
    #[arg(long, value_name = "PATH", help_heading = "Identity (mTLS)")]
    pub trust_anchors: Option<String>,
    /// TOML file of meshed destinations: `[[peer]]` tables with `net` (CIDR or
    /// address) and `identity` [default: none, every destination is plaintext].
    #[arg(long, value_name = "PATH", help_heading = "Identity (mTLS)")]
    pub mesh_peers: Option<String>,
    /// Inbound ports that refuse clients without a mesh identity, `N` or `LO-HI`,
    /// comma-separated [default: empty].
    #[arg(long, value_name = "PORTS", help_heading = "Identity (mTLS)")]
    pub require_identity_ports: Option<String>,
    /// The port meshed peers accept mTLS on, the peers' inbound port [default: 4143].
    #[arg(long, value_name = "PORT", help_heading = "Identity (mTLS)")]
    pub peer_inbound_port: Option<String>,

    /// For `meshinit --mode tproxy`: the inbound listeners are IP_TRANSPARENT, the
    /// original destination is the accepted socket's own address, and the connection to
    /// the application comes from the client's address. Needs CAP_NET_ADMIN
    /// [default: false].
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        help_heading = "Listeners"
    )]
    pub inbound_transparent: Option<String>,
}

/// The merged, validated configuration of the proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Where redirected inbound connections arrive (meshinit's `--incoming-proxy-port`).
    /// Default `0.0.0.0:4143` and `[::]:4143`.
    pub inbound_addrs: Vec<SocketAddr>,
    /// Where redirected outbound connections arrive (meshinit's `--outgoing-proxy-port`).
    /// Loopback only, because only the pod's own processes are redirected here.
    /// Default `127.0.0.1:4140` and `[::1]:4140`.
    pub outbound_addrs: Vec<SocketAddr>,
    /// The admin server, scraped by Prometheus and probed by the kubelet. Default
    /// `0.0.0.0:4191`, a port meshinit skips by default.
    pub admin_addr: SocketAddr,
    /// Inbound destination ports forwarded without detection. Default: the list below.
    pub inbound_opaque_ports: PortSet,
    /// Outbound destination ports forwarded without detection. Default: the list below.
    pub outbound_opaque_ports: PortSet,
    /// How long detection waits for the client's first bytes. Default 10 s, Linkerd's.
    pub detect_timeout: Duration,
    /// How long open connections may drain after SIGTERM. Default 30 s, the kubelet's
    /// default termination grace period.
    pub shutdown_grace: Duration,
    /// Cap on open connections, per direction, so that a flood cannot exhaust file
    /// descriptors, and a flood of inbound connections cannot refuse the pod's own
    /// outbound ones (or the reverse). Default 16384 each.
    pub max_connections: usize,
    /// Cap on connections still in detection, per direction, each of which holds a
    /// buffer and waits up to `detect_timeout`: silent clients must not pile up.
    /// Direct mTLS connections to the inbound port count here until their ClientHello
    /// arrives. Default 4096 each.
    pub max_detecting: usize,
    /// How long a direct mTLS client may take to send its ClientHello, and any mTLS
    /// handshake (with the transport header) to complete: a silent or stalling peer
    /// must not hold a slot. Default 10 s, like `detect_timeout`.
    pub handshake_timeout: Duration,
    /// The UID meshinit exempts (`--proxy-uid`). meshproxy only warns when its
    /// effective UID differs: every connection it forwards would then be redirected
    /// back to it. Default 2102, meshinit's.
    pub proxy_uid: u32,
    /// How long a metric label set (one destination, protocol, ...) with no open
    /// connection is kept: without it every destination ever seen, a port scan's
    /// included, would stay in `/metrics` forever. Default 10 min, Linkerd's.
    pub metrics_retain_idle: Duration,
    /// How logs are written. Default plain text.
    pub log_format: LogFormat,
    /// Our certificate, key and trust anchors. Default none: no mTLS, every
    /// connection is forwarded as before.
    pub identity: Option<IdentityFiles>,
    /// The file listing meshed destinations and their identities. Default none: no
    /// destination is meshed.
    pub mesh_peers: Option<PathBuf>,
    /// Inbound application ports that only meshed (mTLS) clients may reach; plaintext
    /// clients are refused and counted. Default empty.
    pub require_identity_ports: PortSet,
    /// The port peers accept mTLS on. Default 4143, meshinit's
    /// `--incoming-proxy-port`, which every meshed pod uses.
    pub peer_inbound_port: u16,
    /// Whether inbound connections arrive by TPROXY (`meshinit --mode tproxy`) and
    /// the application is connected to from the client's address, so that it sees who
    /// the client is. Needs CAP_NET_ADMIN (IP_TRANSPARENT); off by default, which keeps
    /// the proxy free of capabilities.
    pub inbound_transparent: bool,
}

/// Ports whose protocols are server-speaks-first (SMTP, MySQL, PostgreSQL, Redis,
/// memcached, ...) or otherwise undetectable: Linkerd 2.11's default opaque ports.
pub const DEFAULT_OPAQUE_PORTS: &str = "25,587,3306,4444,5432,6379,9300,11211";

const DEFAULT_INBOUND_ADDRS: &str = "0.0.0.0:4143,[::]:4143";
const DEFAULT_OUTBOUND_ADDRS: &str = "127.0.0.1:4140,[::1]:4140";
const DEFAULT_ADMIN_ADDR: &str = "0.0.0.0:4191";
const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_PROXY_UID: u32 = 2102;
/// The longest any duration setting may be. Longer is a typo, not a wish, and huge
/// values overflow `Instant` arithmetic (a panic) in timers and deadlines.
const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);
const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
const DEFAULT_MAX_DETECTING: usize = 4_096;
const DEFAULT_METRICS_RETAIN_IDLE: Duration = crate::metrics::DEFAULT_RETAIN_IDLE;
const DEFAULT_PEER_INBOUND_PORT: u16 = 4143;
/// Descriptors beyond the connections': listeners, admin clients, certificate and
/// peers files being re-read, the bind probe of `orig_dst::is_local`, stdio, epoll.
pub const DESCRIPTOR_MARGIN: u64 = 128;
/// Upper bound for both caps: the drain waits for all permits with one `u32` call.
const MAX_CAP: usize = 1_000_000;

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line, for log collectors.
    Json,
}

/// An error in one of the configuration sources. The message names the value, the
/// source it came from, and what would be valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid value {input:?} for {origin}: {expected}")]
    Invalid {
        origin: Origin,
        input: String,
        expected: String,
    },
    #[error("invalid config file: {message}")]
    Toml { message: String },
    #[error("{message}")]
    Inconsistent { message: String },
}

/// Where a setting's value came from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Flag(&'static str),
    Env(&'static str),
    File(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => write!(f, "--{flag}"),
            Origin::Env(flag) => write!(f, "env {}", env_var(flag)),
            Origin::File(flag) => write!(f, "config file key {}", toml_key(flag)),
        }
    }
}

/// The env var of a flag: `detect-timeout` -> `MESHPROXY_DETECT_TIMEOUT`.
fn env_var(flag: &str) -> String {
    format!("MESHPROXY_{}", flag.to_uppercase().replace('-', "_"))
}

/// The TOML key of a flag: `detect-timeout` -> `detect_timeout`.
fn toml_key(flag: &str) -> String {
    flag.replace('-', "_")
}

/// The TOML file. Unknown keys are an error: a typo in an opaque-port list would
/// otherwise silently fall back to the default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    inbound_addr: Option<FileValue>,
    outbound_addr: Option<FileValue>,
    admin_addr: Option<FileValue>,
    opaque_ports: Option<FileValue>,
    inbound_opaque_ports: Option<FileValue>,
    outbound_opaque_ports: Option<FileValue>,
    detect_timeout: Option<FileValue>,
    max_connections: Option<FileValue>,
    max_detecting: Option<FileValue>,
    handshake_timeout: Option<FileValue>,
    shutdown_grace: Option<FileValue>,
    proxy_uid: Option<FileValue>,
    metrics_retain_idle: Option<FileValue>,
    log_format: Option<FileValue>,
    identity_cert: Option<FileValue>,
    identity_key: Option<FileValue>,
    trust_anchors: Option<FileValue>,
    mesh_peers: Option<FileValue>,
    require_identity_ports: Option<FileValue>,
    peer_inbound_port: Option<FileValue>,
    inbound_transparent: Option<FileValue>,
}

/// A TOML value: a string, an integer, or (for lists) an array of either.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FileValue {
    Scalar(FileScalar),
    List(Vec<FileScalar>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FileScalar {
    Int(i64),
    Bool(bool),
    Str(String),
}

impl FileValue {
    /// The value as the flag would have spelled it (arrays join with commas).
    fn to_flag_string(&self) -> String {
        fn scalar(s: &FileScalar) -> String {
            match s {
                FileScalar::Int(n) => n.to_string(),
                FileScalar::Bool(b) => b.to_string(),
                FileScalar::Str(s) => s.clone(),
            }
        }
        match self {
            FileValue::Scalar(s) => scalar(s),
            FileValue::List(items) => items.iter().map(scalar).collect::<Vec<_>>().join(","),
        }
    }
}

/// The three sources of one configuration, looked up setting by setting.
struct Sources<'a> {
    env: &'a HashMap<String, String>,
    file: FileConfig,
}

impl Sources<'_> {
    /// The value of one setting by precedence, parsed; `None` when no source sets it.
    fn resolve<T>(
        &self,
        flag: &'static str,
        from_flag: Option<&String>,
        from_file: Option<&FileValue>,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        let (origin, input) = if let Some(v) = from_flag {
            (Origin::Flag(flag), v.clone())
        } else if let Some(v) = self.env.get(&env_var(flag)) {
            (Origin::Env(flag), v.clone())
        } else if let Some(v) = from_file {
            (Origin::File(flag), v.to_flag_string())
        } else {
            return Ok(None);
        };
        parse(&input)
            .map(Some)
            .map_err(|expected| ConfigError::Invalid {
                origin,
                input,
                expected,
            })
    }
}

impl Config {
    /// Merges the three sources: `args` (flags), `env` (the process environment, as a
    /// map) and `toml` (the contents of the `--config` file, if any).
    pub fn from_sources(
        args: &ProxyArgs,
        env: &HashMap<String, String>,
        toml: Option<&str>,
    ) -> Result<Config, ConfigError> {
        let file = match toml {
            Some(text) => toml::from_str(text).map_err(|e| ConfigError::Toml {
                message: e.to_string(),
            })?,
            None => FileConfig::default(),
        };
        let s = Sources { env, file };
        let f = &s.file;
        let a = args;

        let inbound_addrs = s
            .resolve(
                "inbound-addr",
                a.inbound_addr.as_ref(),
                f.inbound_addr.as_ref(),
                parse_addrs,
            )?
            .unwrap_or_else(|| default(parse_addrs, DEFAULT_INBOUND_ADDRS));
        let outbound_addrs = s
            .resolve(
                "outbound-addr",
                a.outbound_addr.as_ref(),
                f.outbound_addr.as_ref(),
                parse_addrs,
            )?
            .unwrap_or_else(|| default(parse_addrs, DEFAULT_OUTBOUND_ADDRS));
        let admin_addr = s
            .resolve(
                "admin-addr",
                a.admin_addr.as_ref(),
                f.admin_addr.as_ref(),
                parse_addr,
            )?
            .unwrap_or_else(|| default(parse_addr, DEFAULT_ADMIN_ADDR));

        // Each list is resolved with its own precedence; a direction-specific list, from
        // any source, then overrides the shared one for its direction.
        let opaque_ports = s
            .resolve(
                "opaque-ports",
                a.opaque_ports.as_ref(),
                f.opaque_ports.as_ref(),
                PortSet::parse,
            )?
            .unwrap_or_else(|| default(PortSet::parse, DEFAULT_OPAQUE_PORTS));
        let inbound_opaque_ports = s
            .resolve(
                "inbound-opaque-ports",
                a.inbound_opaque_ports.as_ref(),
                f.inbound_opaque_ports.as_ref(),
                PortSet::parse,
            )?
            .unwrap_or_else(|| opaque_ports.clone());
        let outbound_opaque_ports = s
            .resolve(
                "outbound-opaque-ports",
                a.outbound_opaque_ports.as_ref(),
                f.outbound_opaque_ports.as_ref(),
                PortSet::parse,
            )?
            .unwrap_or(opaque_ports);

        let detect_timeout = s
            .resolve(
                "detect-timeout",
                a.detect_timeout.as_ref(),
                f.detect_timeout.as_ref(),
                parse_duration,
            )?
            .unwrap_or(DEFAULT_DETECT_TIMEOUT);
        let shutdown_grace = s
            .resolve(
                "shutdown-grace",
                a.shutdown_grace.as_ref(),
                f.shutdown_grace.as_ref(),
                parse_duration,
            )?
            .unwrap_or(DEFAULT_SHUTDOWN_GRACE);
        let max_connections = s
            .resolve(
                "max-connections",
                a.max_connections.as_ref(),
                f.max_connections.as_ref(),
                parse_cap,
            )?
            .unwrap_or(DEFAULT_MAX_CONNECTIONS);
        let max_detecting = s
            .resolve(
                "max-detecting",
                a.max_detecting.as_ref(),
                f.max_detecting.as_ref(),
                parse_cap,
            )?
            .unwrap_or(DEFAULT_MAX_DETECTING);
        let handshake_timeout = s
            .resolve(
                "handshake-timeout",
                a.handshake_timeout.as_ref(),
                f.handshake_timeout.as_ref(),
                parse_duration,
            )?
            .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT);
        let proxy_uid = s
            .resolve(
                "proxy-uid",
                a.proxy_uid.as_ref(),
                f.proxy_uid.as_ref(),
                parse_uid,
            )?
            .unwrap_or(DEFAULT_PROXY_UID);
        let metrics_retain_idle = s
            .resolve(
                "metrics-retain-idle",
                a.metrics_retain_idle.as_ref(),
                f.metrics_retain_idle.as_ref(),
                parse_duration,
            )?
            .unwrap_or(DEFAULT_METRICS_RETAIN_IDLE);
        let log_format = s
            .resolve(
                "log-format",
                a.log_format.as_ref(),
                f.log_format.as_ref(),
                parse_log_format,
            )?
            .unwrap_or_default();

        let path = |flag, from_flag, from_file| s.resolve(flag, from_flag, from_file, parse_path);
        let identity_cert = path(
            "identity-cert",
            a.identity_cert.as_ref(),
            f.identity_cert.as_ref(),
        )?;
        let identity_key = path(
            "identity-key",
            a.identity_key.as_ref(),
            f.identity_key.as_ref(),
        )?;
        let trust_anchors = path(
            "trust-anchors",
            a.trust_anchors.as_ref(),
            f.trust_anchors.as_ref(),
        )?;
        let mesh_peers = path("mesh-peers", a.mesh_peers.as_ref(), f.mesh_peers.as_ref())?;
        let require_identity_ports = s
            .resolve(
                "require-identity-ports",
                a.require_identity_ports.as_ref(),
                f.require_identity_ports.as_ref(),
                PortSet::parse,
            )?
            .unwrap_or_default();
        let peer_inbound_port = s
            .resolve(
                "peer-inbound-port",
                a.peer_inbound_port.as_ref(),
                f.peer_inbound_port.as_ref(),
                parse_port,
            )?
            .unwrap_or(DEFAULT_PEER_INBOUND_PORT);
        let inbound_transparent = s
            .resolve(
                "inbound-transparent",
                a.inbound_transparent.as_ref(),
                f.inbound_transparent.as_ref(),
                parse_bool,
            )?
            .unwrap_or(false);

        // mTLS needs all three files; half an identity is a mistake, not "no mTLS".
        let identity = match (identity_cert, identity_key, trust_anchors) {
            (Some(cert), Some(key), Some(trust_anchors)) => Some(IdentityFiles {
                cert,
                key,
                trust_anchors,
            }),
            (None, None, None) => None,
            _ => {
                return Err(ConfigError::Inconsistent {
                    message: "--identity-cert, --identity-key and --trust-anchors go together: \
                              give all three to enable mTLS, or none"
                        .to_string(),
                })
            }
        };
        // Both settings only mean something with an identity: without one, a meshed
        // peer could never be reached and a required-identity port never be.
        if identity.is_none()
            && (mesh_peers.is_some() || require_identity_ports != PortSet::default())
        {
            return Err(ConfigError::Inconsistent {
                message: "--mesh-peers and --require-identity-ports need an identity \
                          (--identity-cert, --identity-key, --trust-anchors)"
                    .to_string(),
            });
        }

        Ok(Config {
            inbound_addrs,
            outbound_addrs,
            admin_addr,
            inbound_opaque_ports,
            outbound_opaque_ports,
            detect_timeout,
            shutdown_grace,
            max_connections,
            max_detecting,
            handshake_timeout,
            proxy_uid,
            metrics_retain_idle,
            log_format,
            identity,
            mesh_peers,
            require_identity_ports,
            peer_inbound_port,
            inbound_transparent,
        })
    }

    /// How many file descriptors the caps may need at once: two per connection (the
    /// client's and ours to the destination), for both directions, plus
    /// [`DESCRIPTOR_MARGIN`] for the listeners, admin connections, files and probes.
    pub fn descriptors_needed(&self) -> u64 {
        let per_direction = u64::try_from(self.max_connections).unwrap_or(u64::MAX / 8);
        2 * 2 * per_direction + DESCRIPTOR_MARGIN
    }

    /// The `--config` path: the flag, else `MESHPROXY_CONFIG`.
    pub fn file_path(args: &ProxyArgs, env: &HashMap<String, String>) -> Option<PathBuf> {
        args.config
            .clone()
            .or_else(|| env.get(&env_var("config")).map(PathBuf::from))
    }
}

impl Default for Config {
    /// The built-in defaults. No input reaches this: an empty environment and no file
    /// cannot fail, which `config::tests` checks.
    fn default() -> Config {
        Config::from_sources(&ProxyArgs::default(), &HashMap::new(), None)
            .expect("the built-in defaults are valid")
    }
}

/// Parses a built-in default, which is a constant known to be valid (each one is parsed
/// by `Config::default()` in the tests, so a bad constant fails there, not here).
fn default<T>(parse: fn(&str) -> Result<T, String>, value: &str) -> T {
    parse(value).expect("built-in default is valid")
}

fn parse_addr(input: &str) -> Result<SocketAddr, String> {
    input
        .trim()
        .parse()
        .map_err(|_| "expected IP:PORT, e.g. 0.0.0.0:4191 or [::]:4191".to_string())
}

fn parse_addrs(input: &str) -> Result<Vec<SocketAddr>, String> {
    let expected = || "expected IP:PORT, comma-separated, e.g. 0.0.0.0:4143,[::]:4143".to_string();
    let addrs = input
        .split(',')
        .map(|item| item.trim().parse().map_err(|_| expected()))
        .collect::<Result<Vec<SocketAddr>, String>>()?;
    if addrs.is_empty() {
        return Err(expected());
    }
    Ok(addrs)
}

/// A duration greater than zero and at most [`MAX_DURATION`] (a day). Zero would make
/// every timer fire at once (no detection, no drain), which is never what was meant.
fn parse_duration(input: &str) -> Result<Duration, String> {
    let expected =
        || "expected a duration greater than 0 and at most 24h, like 10s, 500ms or 2m".to_string();
    match humantime::parse_duration(input.trim()) {
        Ok(d) if !d.is_zero() && d <= MAX_DURATION => Ok(d),
        _ => Err(expected()),
    }
}

fn parse_uid(input: &str) -> Result<u32, String> {
    input
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|&uid| uid != u32::MAX)
        .ok_or_else(|| "expected a numeric UID from 0 to 4294967294".to_string())
}

fn parse_path(input: &str) -> Result<PathBuf, String> {
    match input.trim() {
        "" => Err("expected a file path".to_string()),
        path => Ok(PathBuf::from(path)),
    }
}

fn parse_port(input: &str) -> Result<u16, String> {
    match input.trim().parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err("expected a port from 1 to 65535".to_string()),
    }
}

fn parse_cap(input: &str) -> Result<usize, String> {
    match input.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_CAP).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from 1 to {MAX_CAP}")),
    }
}

fn parse_bool(input: &str) -> Result<bool, String> {
    match input.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err("expected true or false".to_string()),
    }
}

fn parse_log_format(input: &str) -> Result<LogFormat, String> {
    match input.trim() {
        "plain" => Ok(LogFormat::Plain),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected `plain` or `json`".to_string()),
    }
}

/// A set of TCP ports, written `N` or `LO-HI`, comma-separated. Empty is allowed: it
/// means no port is opaque.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortSet {
    /// Inclusive ranges, sorted and merged.
    ranges: Vec<(u16, u16)>,
}

impl PortSet {
    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        self.ranges
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&port))
    }

    fn parse(input: &str) -> Result<PortSet, String> {
        let mut ranges = Vec::new();
        for item in input.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let bad = || format!("{item:?} is not a port (1-65535) or a range LO-HI");
            let port = |s: &str| match s.trim().parse::<u16>() {
                Ok(p) if p != 0 => Ok(p),
                _ => Err(bad()),
            };
            let range = match item.split_once('-') {
                Some((lo, hi)) => (port(lo)?, port(hi)?),
                None => (port(item)?, port(item)?),
            };
            if range.0 > range.1 {
                return Err(format!("range {item:?} has LO greater than HI"));
            }
            ranges.push(range);
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Ok(PortSet { ranges: merged })
    }
}

impl FromStr for PortSet {
    type Err = String;

    fn from_str(input: &str) -> Result<PortSet, String> {
        PortSet::parse(input)
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
