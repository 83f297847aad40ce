//! Command line: flag names follow linkerd2-proxy-init so binaries can be swapped.
//!
//! Every setting is an `Option<String>` here: "not given" must stay
//! distinguishable from "given the default" so that env vars and the config
//! file can fill the gaps (see `config`). Parsing into ports and CIDRs happens
//! in one place, `config::Config::resolve`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::config::setting;

#[derive(Debug, Parser)]
#[command(
    name = "meshinit",
    version,
    about = "Redirect a pod's TCP traffic to its sidecar proxy (nftables or iptables), atomically",
    long_about = "Installs redirect rules in a network namespace: inbound TCP to the proxy's \
inbound port, outbound TCP to its outbound port, with skip ports, skip subnets, loopback and \
the proxy's own UID/GID exempt. Every flag can also be set with MESHINIT_<FLAG> (e.g. \
MESHINIT_OUTBOUND_PORTS_TO_IGNORE) or a key of the --config TOML file (snake_case); \
precedence: flag > env > file > default.\n\nExit codes: 0 success; 2 bad input (nothing was \
changed); 1 failure while applying (the previous ruleset is intact); check: 1 on drift."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Install (or replace) the rules in one atomic transaction. The default.
    Apply,
    /// Remove the rules meshinit installed, and nothing else.
    Cleanup,
    /// Print the rules the flags describe; change nothing.
    Show,
    /// Exit 0 when the installed rules equal the expected ones, 1 on drift.
    Check {
        /// On drift, re-apply the expected rules atomically: exit 0 once they are
        /// restored (the differences are logged), 1 when the repair fails.
        #[arg(long)]
        repair: bool,
    },
    /// Prove that outbound redirection works: listen on the outbound proxy port,
    /// connect to a test address as an unprivileged user, and require the
    /// connection to come back with that address as its original destination.
    /// Exit 0 on success, 95 on failure.
    Validate(ValidateArgs),
    /// Run as a chained CNI plugin (spec 1.0.0): CNI_COMMAND and the other CNI_*
    /// variables, the network config on stdin, the result or error JSON on stdout.
    /// Also what the binary does when invoked as `meshinit-cni`.
    Cni,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) generated from these flags.
    Man,
}

/// Flags of `meshinit validate` (also `MESHINIT_VALIDATE_*` variables).
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct ValidateArgs {
    /// Test destination: connected to, never reached when redirection works. Must be
    /// routable in the namespace (connect() fails with "network unreachable" otherwise).
    #[arg(
        long,
        value_name = "ADDR",
        env = "MESHINIT_VALIDATE_ADDR",
        default_value = "198.18.255.254:1404"
    )]
    pub validate_addr: std::net::SocketAddr,
    /// The unprivileged UID (and GID) the test connects as when started as root; must
    /// not be the proxy's, whose traffic is exempt
    #[arg(
        long,
        value_name = "UID",
        env = "MESHINIT_VALIDATE_UID",
        default_value_t = 65534
    )]
    pub validate_uid: u32,
}

/// The settings, each readable from flag, env var or config file.
///
/// The same struct is deserialised from the TOML file: unknown keys are
/// refused, because a typo in a skip list would silently redirect traffic the
/// user meant to exempt.
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Port of the proxy's inbound listener [default: 4143]
    #[arg(long, value_name = "PORT", global = true, help_heading = "Proxy")]
    #[serde(default, deserialize_with = "setting")]
    pub incoming_proxy_port: Option<String>,
    /// Port of the proxy's outbound listener [default: 4140]
    #[arg(long, value_name = "PORT", global = true, help_heading = "Proxy")]
    #[serde(default, deserialize_with = "setting")]
    pub outgoing_proxy_port: Option<String>,
    /// Outbound traffic of this UID (the proxy's) is not redirected [default: 2102]
    #[arg(long, value_name = "UID", global = true, help_heading = "Proxy")]
    #[serde(default, deserialize_with = "setting")]
    pub proxy_uid: Option<String>,
    /// Outbound traffic of this GID is not redirected [default: none]
    #[arg(long, value_name = "GID", global = true, help_heading = "Proxy")]
    #[serde(default, deserialize_with = "setting")]
    pub proxy_gid: Option<String>,

    /// Inbound ports that reach the application directly: N or LO-HI, comma-separated [default: 4190,4191]
    #[arg(long, value_name = "PORTS", global = true, help_heading = "Exemptions")]
    #[serde(default, deserialize_with = "setting")]
    pub inbound_ports_to_ignore: Option<String>,
    /// Outbound ports that are reached directly [default: none]
    #[arg(long, value_name = "PORTS", global = true, help_heading = "Exemptions")]
    #[serde(default, deserialize_with = "setting")]
    pub outbound_ports_to_ignore: Option<String>,
    /// Only these inbound ports are redirected [default: all]
    #[arg(long, value_name = "PORTS", global = true, help_heading = "Exemptions")]
    #[serde(default, deserialize_with = "setting")]
    pub ports_to_redirect: Option<String>,
    /// CIDRs (v4 or v6) exempt in both directions: inbound by source, outbound by destination
    #[arg(long, value_name = "CIDRS", global = true, help_heading = "Exemptions")]
    #[serde(default, deserialize_with = "setting")]
    pub subnets_to_ignore: Option<String>,
    /// CIDRs exempt inbound only (by source address)
    #[arg(long, value_name = "CIDRS", global = true, help_heading = "Exemptions")]
    #[serde(default, deserialize_with = "setting")]
    pub inbound_subnets_to_ignore: Option<String>,
    /// CIDRs exempt outbound only (by destination address)
    #[arg(long, value_name = "CIDRS", global = true, help_heading = "Exemptions")]
    #[serde(default, deserialize_with = "setting")]
    pub outbound_subnets_to_ignore: Option<String>,

    /// Rule backend: nft, iptables-nft, iptables-legacy or auto [default: auto]
    #[arg(long, value_name = "BACKEND", global = true, help_heading = "Backend")]
    #[serde(default, deserialize_with = "setting")]
    pub backend: Option<String>,
    /// Alias of --backend iptables-legacy / iptables-nft (linkerd2-proxy-init compatibility)
    #[arg(
        long,
        value_name = "legacy|nft",
        global = true,
        help_heading = "Backend"
    )]
    #[serde(default, deserialize_with = "setting")]
    pub iptables_mode: Option<String>,
    /// Also install IPv6 rules; --ipv6=false leaves IPv6 untouched [default: true]
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        global = true,
        help_heading = "Backend"
    )]
    #[serde(default, deserialize_with = "setting")]
    pub ipv6: Option<String>,

    /// Inbound interception: redirect (nat REDIRECT; the application sees the pod's own
    /// address) or tproxy (mangle TPROXY plus policy routing; the application sees the
    /// client's address, and meshproxy needs --inbound-transparent and CAP_NET_ADMIN)
    /// [default: redirect]
    #[arg(
        long,
        value_name = "MODE",
        global = true,
        help_heading = "Transparent mode"
    )]
    #[serde(default, deserialize_with = "setting")]
    pub mode: Option<String>,
    /// tproxy mode: packet mark of intercepted connections (decimal or 0x hex, not 0)
    /// [default: 0x4d49]
    #[arg(
        long,
        value_name = "MARK",
        global = true,
        help_heading = "Transparent mode"
    )]
    #[serde(default, deserialize_with = "setting")]
    pub tproxy_mark: Option<String>,
    /// tproxy mode: routing table of the `local default dev lo` route (not 0, 253-255)
    /// [default: 4143]
    #[arg(
        long,
        value_name = "TABLE",
        global = true,
        help_heading = "Transparent mode"
    )]
    #[serde(default, deserialize_with = "setting")]
    pub tproxy_table: Option<String>,
    /// tproxy mode: priority of the `ip rule` sending marked packets to that table
    /// (1-32765) [default: 4143]
    #[arg(
        long,
        value_name = "PRIORITY",
        global = true,
        help_heading = "Transparent mode"
    )]
    #[serde(default, deserialize_with = "setting")]
    pub tproxy_rule_priority: Option<String>,

    /// Network namespace file to work in (/var/run/netns/NAME, /proc/PID/ns/net) [default: current]
    #[arg(long, value_name = "PATH", global = true, help_heading = "Execution")]
    #[serde(default, deserialize_with = "setting")]
    pub netns: Option<String>,
    /// Print what would be applied and change nothing (alias: --simulate)
    #[arg(long, alias = "simulate", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", global = true, help_heading = "Execution")]
    #[serde(default, deserialize_with = "setting")]
    pub dry_run: Option<String>,
    /// Allow apply, check --repair and CNI ADD in the host's initial network namespace,
    /// which is refused otherwise (exit 2) [default: false]
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        global = true,
        help_heading = "Execution"
    )]
    #[serde(default, deserialize_with = "setting")]
    pub allow_host_netns: Option<String>,
    /// How long to wait for /run/meshinit.lock before giving up (exit 1); more than 0,
    /// at most 1 day [default: 30s]
    #[arg(
        long,
        value_name = "DURATION",
        global = true,
        help_heading = "Execution"
    )]
    #[serde(default, deserialize_with = "setting")]
    pub lock_timeout: Option<String>,
    /// validate: how long to wait for the redirected connection; more than 0, at most
    /// 1 day [default: 5s]
    #[arg(
        long,
        value_name = "DURATION",
        global = true,
        help_heading = "Validate"
    )]
    #[serde(default, deserialize_with = "setting")]
    pub validate_timeout: Option<String>,
    /// TOML file with settings (keys are the flag names in snake_case)
    #[arg(long, value_name = "FILE", global = true, help_heading = "Execution")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Log format: plain or json (one JSON object per line) [default: plain]
    #[arg(long, value_name = "FORMAT", global = true, help_heading = "Execution")]
    #[serde(default, deserialize_with = "setting")]
    pub log_format: Option<String>,
}
