//! Command line: flag names follow linkerd2-proxy-init so binaries can be swapped.
//!
//! Every setting is an `Option<String>` here: "not given" must stay
//! distinguishable from "given the default" so that env vars and the config
//! file can fill the gaps (see `config`). Parsing into ports and CIDRs happens
//! in one place, `config::Config::resolve`.

use clap::{Parser, Subcommand};

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
    Validate,
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

meshinit_settings::settings! {
    #[config(value_name = "FILE", global = true, help_heading = "Execution")]
    /// The settings, each readable from flag, env var or config file, declared once
    /// here: the flag `--KEY-WITH-DASHES`, the env var `MESHINIT_KEY_IN_CAPS`, the TOML
    /// key `key` (and the CNI network configuration's key) all come from the name.
    ///
    /// Unknown keys are refused, because a typo in a skip list would silently redirect
    /// traffic the user meant to exempt. Adding a setting: one entry below, then parse
    /// it in `config::Config::resolve` with `sources.get("key", parser)`.
    pub struct Settings {
        /// Port of the proxy's inbound listener [default: 4143]
        #[setting(value_name = "PORT", global = true, help_heading = "Proxy")]
        incoming_proxy_port,
        /// Port of the proxy's outbound listener [default: 4140]
        #[setting(value_name = "PORT", global = true, help_heading = "Proxy")]
        outgoing_proxy_port,
        /// Outbound traffic of this UID (the proxy's) is not redirected [default: 2102]
        #[setting(value_name = "UID", global = true, help_heading = "Proxy")]
        proxy_uid,
        /// Outbound traffic of this GID is not redirected [default: none]
        #[setting(value_name = "GID", global = true, help_heading = "Proxy")]
        proxy_gid,
        /// Inbound ports that reach the application directly: N or LO-HI, comma-separated [default: 4190,4191]
        #[setting(value_name = "PORTS", global = true, help_heading = "Exemptions")]
        inbound_ports_to_ignore,
        /// Outbound ports that are reached directly [default: none]
        #[setting(value_name = "PORTS", global = true, help_heading = "Exemptions")]
        outbound_ports_to_ignore,
        /// Only these inbound ports are redirected [default: all]
        #[setting(value_name = "PORTS", global = true, help_heading = "Exemptions")]
        ports_to_redirect,
        /// CIDRs (v4 or v6) exempt in both directions: inbound by source, outbound by destination
        #[setting(value_name = "CIDRS", global = true, help_heading = "Exemptions")]
        subnets_to_ignore,
        /// CIDRs exempt inbound only (by source address)
        #[setting(value_name = "CIDRS", global = true, help_heading = "Exemptions")]
        inbound_subnets_to_ignore,
        /// CIDRs exempt outbound only (by destination address)
        #[setting(value_name = "CIDRS", global = true, help_heading = "Exemptions")]
        outbound_subnets_to_ignore,
        /// Rule backend: nft, iptables-nft, iptables-legacy or auto [default: auto]
        #[setting(value_name = "BACKEND", global = true, help_heading = "Backend")]
        backend,
        /// Alias of --backend iptables-legacy / iptables-nft (linkerd2-proxy-init compatibility)
        #[setting(value_name = "legacy|nft", global = true, help_heading = "Backend")]
        iptables_mode,
        /// Also install IPv6 rules; --ipv6=false leaves IPv6 untouched [default: true]
        #[setting(value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", global = true, help_heading = "Backend")]
        ipv6,
        /// Inbound interception: redirect (nat REDIRECT; the application sees the pod's own
        /// address) or tproxy (mangle TPROXY plus policy routing; the application sees the
        /// client's address, and meshproxy needs --inbound-transparent and CAP_NET_ADMIN)
        /// [default: redirect]
        #[setting(value_name = "MODE", global = true, help_heading = "Transparent mode")]
        mode,
        /// tproxy mode: packet mark of intercepted connections (decimal or 0x hex, not 0)
        /// [default: 0x4d49]
        #[setting(value_name = "MARK", global = true, help_heading = "Transparent mode")]
        tproxy_mark,
        /// tproxy mode: routing table of the `local default dev lo` route (not 0, 253-255)
        /// [default: 4143]
        #[setting(value_name = "TABLE", global = true, help_heading = "Transparent mode")]
        tproxy_table,
        /// tproxy mode: priority of the `ip rule` sending marked packets to that table
        /// (1-32765) [default: 4143]
        #[setting(value_name = "PRIORITY", global = true, help_heading = "Transparent mode")]
        tproxy_rule_priority,
        /// Network namespace file to work in (/var/run/netns/NAME, /proc/PID/ns/net) [default: current]
        #[setting(value_name = "PATH", global = true, help_heading = "Execution")]
        netns,
        /// Print what would be applied and change nothing (alias: --simulate)
        #[setting(alias = "simulate", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", global = true, help_heading = "Execution")]
        dry_run,
        /// Allow apply, check --repair and CNI ADD in the host's initial network namespace,
        /// which is refused otherwise (exit 2) [default: false]
        #[setting(value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", global = true, help_heading = "Execution")]
        allow_host_netns,
        /// How long to wait for /run/meshinit.lock before giving up (exit 1); more than 0,
        /// at most 1 day [default: 30s]
        #[setting(value_name = "DURATION", global = true, help_heading = "Execution")]
        lock_timeout,
        /// validate: how long to wait for the redirected connection; more than 0, at most
        /// 1 day [default: 5s]
        #[setting(value_name = "DURATION", global = true, help_heading = "Validate")]
        validate_timeout,
        /// validate: test destination, connected to and never reached when redirection
        /// works; must be routable in the namespace [default: 198.18.255.254:1404]
        #[setting(value_name = "ADDR", global = true, help_heading = "Validate")]
        validate_addr,
        /// validate: the unprivileged UID (and GID) the test connects as when started as
        /// root; must not be the proxy's, whose traffic is exempt [default: 65534]
        #[setting(value_name = "UID", global = true, help_heading = "Validate")]
        validate_uid,
        /// Log format: plain or json (one JSON object per line) [default: plain]
        #[setting(value_name = "FORMAT", global = true, help_heading = "Execution")]
        log_format,
    }
}
