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
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use meshinit_settings::{File, FileError, SettingError, Sources};

use crate::identity::IdentityFiles;

meshinit_settings::settings! {
    #[config(value_name = "PATH", help_heading = "Configuration")]
    /// The command-line flags of the proxy, as given (not yet merged or parsed), each
    /// setting declared once: its flag `--KEY-WITH-DASHES`, env var `MESHPROXY_KEY` and
    /// TOML key `key` come from the name.
    ///
    /// Every value is kept as the raw string so that [`Config::from_sources`] can tell "not
    /// given" from "given" and apply the precedence itself. Defaults are listed in the help.
    /// Adding a setting: one entry here, then parse it in `Config::from_sources` with
    /// `sources.get("key", parser)`.
    pub struct ProxyArgs {
        /// Inbound listeners, comma-separated [default: 0.0.0.0:4143,[::]:4143].
        #[setting(value_name = "ADDRS", help_heading = "Listeners")]
        inbound_addr,
        /// Outbound listeners, comma-separated [default: 127.0.0.1:4140,[::1]:4140].
        #[setting(value_name = "ADDRS", help_heading = "Listeners")]
        outbound_addr,
        /// Admin listener for /metrics, /ready and /live [default: 0.0.0.0:4191].
        #[setting(value_name = "ADDR", help_heading = "Listeners")]
        admin_addr,
        /// For `meshinit --mode tproxy`: the inbound listeners are IP_TRANSPARENT, the
        /// original destination is the accepted socket's own address, and the connection to
        /// the application comes from the client's address. Needs CAP_NET_ADMIN
        /// [default: false].
        #[setting(value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", help_heading = "Listeners")]
        inbound_transparent,
        /// Ports forwarded without protocol detection, `N` or `LO-HI`, comma-separated
        /// [default: 25,587,3306,4444,5432,6379,9300,11211].
        #[setting(value_name = "PORTS", help_heading = "Protocol detection")]
        opaque_ports,
        /// Opaque ports for inbound connections only; overrides --opaque-ports.
        #[setting(value_name = "PORTS", help_heading = "Protocol detection")]
        inbound_opaque_ports,
        /// Opaque ports for outbound connections only; overrides --opaque-ports.
        #[setting(value_name = "PORTS", help_heading = "Protocol detection")]
        outbound_opaque_ports,
        /// How long to wait for the client's first bytes before forwarding as opaque TCP
        /// [default: 10s].
        #[setting(value_name = "DURATION", help_heading = "Protocol detection")]
        detect_timeout,
        /// Most connections open at once, per direction (inbound and outbound each have
        /// this many); more are closed at accept [default: 16384].
        #[setting(value_name = "N", help_heading = "Limits")]
        max_connections,
        /// Most connections still in protocol detection (or, on the inbound port, still
        /// without a TLS ClientHello), per direction; more are closed [default: 4096].
        #[setting(value_name = "N", help_heading = "Limits")]
        max_detecting,
        /// How long a direct mTLS client of the inbound port may take to send its
        /// ClientHello, and an mTLS handshake with its transport header to complete
        /// [default: 10s].
        #[setting(value_name = "DURATION", help_heading = "Limits")]
        handshake_timeout,
        /// How long any connection the proxy opens (to a destination, a peer proxy or a
        /// service endpoint) may take to be established; HTTP requests are then answered
        /// 504 [default: 1s].
        #[setting(value_name = "DURATION", help_heading = "Limits")]
        connect_timeout,
        /// How long an HTTP/1 client may take to send a request head (a slowloris is
        /// closed then), counted from the end of detection or of the previous response,
        /// so it is also how long a keep-alive connection may stay idle; an HTTP/2 client
        /// connection with no request in flight this long gets a GOAWAY [default: 60s].
        #[setting(value_name = "DURATION", help_heading = "Limits")]
        http_header_read_timeout,
        /// How long the proxy may wait to write to an HTTP client (or a tunnel upgraded
        /// from HTTP) that takes no byte of what it is sent: then the connection is
        /// closed, and the buffers held for its unread responses freed; a client that
        /// reads, however slowly, is not cut [default: 60s].
        #[setting(value_name = "DURATION", help_heading = "Limits")]
        http_write_timeout,
        /// On SIGTERM/SIGINT, how long open connections may drain [default: 30s].
        #[setting(value_name = "DURATION", help_heading = "Lifecycle")]
        shutdown_grace,
        /// Worker threads of the async runtime, 1 to 256: 1 runs everything on one
        /// thread (no cross-thread wake-ups), more is a work-stealing pool of that many
        /// [default: 1].
        #[setting(value_name = "N", help_heading = "Lifecycle")]
        cores,
        /// The UID meshproxy is meant to run as, meshinit's --proxy-uid, whose traffic is
        /// not redirected; a warning is logged at start-up when the effective UID differs
        /// [default: 2102].
        #[setting(value_name = "UID", help_heading = "Lifecycle")]
        proxy_uid,
        /// Metric label sets with no open connection for this long are dropped
        /// [default: 10m].
        #[setting(value_name = "DURATION", help_heading = "Metrics")]
        metrics_retain_idle,
        /// `plain` or `json` (one object per line) [default: plain].
        #[setting(value_name = "FORMAT", help_heading = "Logging")]
        log_format,
        /// Our certificate (PEM, leaf first); its DNS SAN is our identity. With
        /// --identity-key and --trust-anchors, enables mTLS [default: none, no mTLS].
        #[setting(value_name = "PATH", help_heading = "Identity (mTLS)")]
        identity_cert,
        /// The private key of --identity-cert (PEM).
        #[setting(value_name = "PATH", help_heading = "Identity (mTLS)")]
        identity_key,
        /// CA certificates (PEM) that peers' certificates must chain to.
        #[setting(value_name = "PATH", help_heading = "Identity (mTLS)")]
        trust_anchors,
        /// TOML file of meshed destinations: `[[peer]]` tables with `net` (CIDR or
        /// address) and `identity` [default: none, every destination is plaintext].
        #[setting(value_name = "PATH", help_heading = "Identity (mTLS)")]
        mesh_peers,
        /// Inbound ports that refuse clients without a mesh identity, `N` or `LO-HI`,
        /// comma-separated [default: empty].
        #[setting(value_name = "PORTS", help_heading = "Identity (mTLS)")]
        require_identity_ports,
        /// The port meshed peers accept mTLS on, the peers' inbound port [default: 4143].
        #[setting(value_name = "PORT", help_heading = "Identity (mTLS)")]
        peer_inbound_port,
        /// TOML file of services (`[[service]]` with addrs, backends, weights and
        /// endpoints), re-read when it changes [default: none, no balancing].
        #[setting(value_name = "PATH", help_heading = "Services")]
        discovery,
    }
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
    /// How long a connect to a destination, peer proxy or endpoint may take. Default
    /// 1 s, Linkerd's outbound connect timeout: within a cluster a connect that takes
    /// longer is lost, and an HTTP client is better told so (504) than left waiting
    /// for the kernel's two minutes of SYN retries.
    pub connect_timeout: Duration,
    /// How long an HTTP/1 client may take to send a request head, and a kept-alive
    /// HTTP/1 connection or a client's HTTP/2 connection may stay idle: a client
    /// trickling its head byte by byte (slowloris), or just connected, must not hold a
    /// connection forever. Default 60 s, like common servers' header and keep-alive
    /// timeouts (nginx's `client_header_timeout`, `keepalive_timeout`).
    pub http_header_read_timeout: Duration,
    /// How long a write to an HTTP client may wait without the client taking a byte:
    /// a client that stops reading (or a peer that sends requests and never reads the
    /// answers) must not hold its connection and the responses buffered for it forever.
    /// Default 60 s, like nginx's `send_timeout`, which also times the wait between two
    /// successive writes rather than the whole response.
    pub http_write_timeout: Duration,
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
    /// The discovery file: services whose addresses are balanced over their endpoints.
    /// Default none: every connection goes where it was dialled.
    pub discovery: Option<PathBuf>,
    /// Whether inbound connections arrive by TPROXY (`meshinit --mode tproxy`) and
    /// the application is connected to from the client's address, so that it sees who
    /// the client is. Needs CAP_NET_ADMIN (IP_TRANSPARENT); off by default, which keeps
    /// the proxy free of capabilities.
    pub inbound_transparent: bool,
    /// Worker threads of the async runtime. 1 (the default) is a current-thread runtime:
    /// a sidecar's cost is paid once per pod, and on a small node one thread that never
    /// wakes another costs less CPU per connection than a work-stealing pool, which pays
    /// a cross-thread wake-up (futex, context switch) on most events. Like Linkerd's
    /// proxy (`LINKERD2_PROXY_CORES`), more cores are asked for, not assumed.
    pub cores: usize,
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
const DEFAULT_CORES: usize = 1;
/// Upper bound for `--cores`: more worker threads than this is a typo on any node a
/// sidecar runs on, and each thread costs a stack.
const MAX_CORES: usize = 256;
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
    #[error(transparent)]
    Setting(#[from] SettingError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{message}")]
    Inconsistent { message: String },
}

/// The prefix of meshproxy's environment variables: `MESHPROXY_DETECT_TIMEOUT`.
pub const ENV_PREFIX: &str = "MESHPROXY";

impl Config {
    /// Merges the three sources: `args` (flags), `env` (the process environment, as a
    /// map) and `toml` (the contents of the `--config` file, if any).
    pub fn from_sources(
        args: &ProxyArgs,
        env: &HashMap<String, String>,
        toml: Option<&str>,
    ) -> Result<Config, ConfigError> {
        // The file's name in messages: the path when known, as `main` reads it.
        let path = Config::file_path(args, env)
            .map(|path| path.display().to_string())
            .unwrap_or_else(|| "config file".to_string());
        let file = match toml {
            Some(text) => Some(File::parse(&path, text, ProxyArgs::ALL)?),
            None => None,
        };
        let s = Sources::new(ENV_PREFIX, args.values(), env, file);

        let inbound_addrs = s
            .get("inbound_addr", parse_addrs)?
            .unwrap_or_else(|| default(parse_addrs, DEFAULT_INBOUND_ADDRS));
        let outbound_addrs = s
            .get("outbound_addr", parse_addrs)?
            .unwrap_or_else(|| default(parse_addrs, DEFAULT_OUTBOUND_ADDRS));
        let admin_addr = s
            .get("admin_addr", parse_addr)?
            .unwrap_or_else(|| default(parse_addr, DEFAULT_ADMIN_ADDR));

        // Each list is resolved with its own precedence; a direction-specific list, from
        // any source, then overrides the shared one for its direction.
        let opaque_ports = s
            .get("opaque_ports", parse_ports)?
            .unwrap_or_else(|| default(parse_ports, DEFAULT_OPAQUE_PORTS));
        let inbound_opaque_ports = s
            .get("inbound_opaque_ports", parse_ports)?
            .unwrap_or_else(|| opaque_ports.clone());
        let outbound_opaque_ports = s
            .get("outbound_opaque_ports", parse_ports)?
            .unwrap_or(opaque_ports);

        let detect_timeout = s
            .get("detect_timeout", parse_duration)?
            .unwrap_or(DEFAULT_DETECT_TIMEOUT);
        let shutdown_grace = s
            .get("shutdown_grace", parse_duration)?
            .unwrap_or(DEFAULT_SHUTDOWN_GRACE);
        let max_connections = s
            .get("max_connections", parse_cap)?
            .unwrap_or(DEFAULT_MAX_CONNECTIONS);
        let max_detecting = s
            .get("max_detecting", parse_cap)?
            .unwrap_or(DEFAULT_MAX_DETECTING);
        let handshake_timeout = s
            .get("handshake_timeout", parse_duration)?
            .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT);
        let connect_timeout = s
            .get("connect_timeout", parse_duration)?
            .unwrap_or(crate::http::DEFAULT_CONNECT_TIMEOUT);
        let http_header_read_timeout = s
            .get("http_header_read_timeout", parse_duration)?
            .unwrap_or(crate::http::DEFAULT_HEADER_READ_TIMEOUT);
        let http_write_timeout = s
            .get("http_write_timeout", parse_duration)?
            .unwrap_or(crate::http::DEFAULT_WRITE_TIMEOUT);
        let proxy_uid = s.get("proxy_uid", parse_uid)?.unwrap_or(DEFAULT_PROXY_UID);
        let metrics_retain_idle = s
            .get("metrics_retain_idle", parse_duration)?
            .unwrap_or(DEFAULT_METRICS_RETAIN_IDLE);
        let log_format = s.get("log_format", parse_log_format)?.unwrap_or_default();

        let path = |key| s.get(key, parse_path);
        let identity_cert = path("identity_cert")?;
        let identity_key = path("identity_key")?;
        let trust_anchors = path("trust_anchors")?;
        let mesh_peers = path("mesh_peers")?;
        let discovery = path("discovery")?;
        let require_identity_ports = s
            .get("require_identity_ports", parse_ports)?
            .unwrap_or_default();
        let peer_inbound_port = s
            .get("peer_inbound_port", parse_port)?
            .unwrap_or(DEFAULT_PEER_INBOUND_PORT);
        let inbound_transparent = s.get("inbound_transparent", parse_bool)?.unwrap_or(false);
        let cores = s.get("cores", parse_cores)?.unwrap_or(DEFAULT_CORES);

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
            connect_timeout,
            http_header_read_timeout,
            http_write_timeout,
            proxy_uid,
            metrics_retain_idle,
            log_format,
            identity,
            mesh_peers,
            require_identity_ports,
            peer_inbound_port,
            discovery,
            inbound_transparent,
            cores,
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
            .or_else(|| env.get(&format!("{ENV_PREFIX}_CONFIG")).map(PathBuf::from))
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

fn parse_cores(input: &str) -> Result<usize, String> {
    match input.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_CORES).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from 1 to {MAX_CORES}")),
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

/// A set of ports (`25,587,9000-9010`): meshinit's own type, so both binaries take a
/// port list the same way (an empty item such as `80,,81` is refused as a likely typo).
pub use meshinit_rules::PortSet;

/// A port list for [`Sources::get`]; the error quotes the bad item.
fn parse_ports(input: &str) -> Result<PortSet, String> {
    input
        .parse()
        .map_err(|error: meshinit_rules::SpecError| error.to_string())
}

#[cfg(test)]
mod tests;
