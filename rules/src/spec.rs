//! The validated input: everything a ruleset is built from.

use thiserror::Error;

use crate::ports::PortSet;
use crate::subnets::SubnetList;

/// What the user asked for, after parsing. Build it with [`Spec::validate`]
/// so that contradictions are refused before anything is rendered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    /// Where inbound TCP is redirected (the proxy's inbound listener).
    pub incoming_proxy_port: u16,
    /// Where outbound TCP is redirected (the proxy's outbound listener).
    pub outgoing_proxy_port: u16,
    /// Outbound traffic of this UID is not redirected (the proxy's own).
    pub proxy_uid: Option<u32>,
    /// Outbound traffic of this GID is not redirected.
    pub proxy_gid: Option<u32>,
    /// Inbound destination ports that reach the application directly.
    pub inbound_ports_to_ignore: PortSet,
    /// Outbound destination ports that leave the pod directly.
    pub outbound_ports_to_ignore: PortSet,
    /// When not empty, only these inbound ports are redirected.
    pub ports_to_redirect: PortSet,
    /// Inbound sources that reach the application directly.
    pub inbound_subnets_to_ignore: SubnetList,
    /// Outbound destinations that are reached directly.
    pub outbound_subnets_to_ignore: SubnetList,
    /// Also redirect IPv6; when false IPv6 traffic is left alone.
    pub ipv6: bool,
    /// How inbound TCP reaches the proxy; [`Mode::Redirect`] by default.
    pub mode: Mode,
}

/// How inbound connections are handed to the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// nat REDIRECT: the proxy needs no privilege, but the application sees
    /// every connection coming from the pod's own address.
    Redirect,
    /// TPROXY in the mangle hook plus policy routing: the proxy (with
    /// CAP_NET_ADMIN) connects to the application from the client's address.
    Tproxy(Tproxy),
}

/// The mark and the policy routing of [`Mode::Tproxy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tproxy {
    /// Packet mark (whole 32 bits) of intercepted packets and of the replies
    /// the application sends to the proxy's transparent connections.
    pub mark: u32,
    /// Routing table holding the `local default dev lo` route.
    pub table: u32,
    /// Priority of the `ip rule` sending marked packets to `table`.
    pub rule_priority: u32,
}

impl Tproxy {
    /// Defaults: mark 0x4d49 ("MI"), table 4143, rule priority 4143 — after the
    /// `local` rule (0), before `main` (32766), and numbers unlikely to be
    /// anyone else's.
    pub const DEFAULT: Tproxy = Tproxy {
        mark: 0x4d49,
        table: 4143,
        rule_priority: 4143,
    };
}

impl Default for Spec {
    /// The defaults of DESIGN.md: 4143 in, 4140 out, UID 2102, admin and
    /// health ports 4190 and 4191 skipped inbound, IPv6 on.
    fn default() -> Self {
        Spec {
            incoming_proxy_port: 4143,
            outgoing_proxy_port: 4140,
            proxy_uid: Some(2102),
            proxy_gid: None,
            inbound_ports_to_ignore: PortSet::new([crate::PortRange { lo: 4190, hi: 4191 }]),
            outbound_ports_to_ignore: PortSet::default(),
            ports_to_redirect: PortSet::default(),
            inbound_subnets_to_ignore: SubnetList::default(),
            outbound_subnets_to_ignore: SubnetList::default(),
            ipv6: true,
            mode: Mode::Redirect,
        }
    }
}

impl Spec {
    /// Refuses specs that cannot work.
    ///
    /// One port used for both proxy ports would send outbound traffic into the
    /// inbound listener (or the reverse), so every connection would loop or
    /// be misattributed.
    pub fn validate(self) -> Result<Self, SpecError> {
        if self.incoming_proxy_port == self.outgoing_proxy_port {
            return Err(SpecError::SameProxyPort {
                port: self.incoming_proxy_port,
            });
        }
        if let Mode::Tproxy(tproxy) = self.mode {
            if tproxy.mark == 0 {
                return Err(SpecError::ZeroMark);
            }
            // 0 is "unspecified"; 253-255 are the kernel's default, main and
            // local tables, which are not ours to fill or empty.
            if matches!(tproxy.table, 0 | 253..=255) {
                return Err(SpecError::ReservedTable {
                    table: tproxy.table,
                });
            }
            // Priority 0 is the `local` rule's; 32766 and 32767 are `main` and
            // `default`. Ours must sit strictly between them to be consulted.
            if tproxy.rule_priority == 0 || tproxy.rule_priority >= 32766 {
                return Err(SpecError::BadRulePriority {
                    priority: tproxy.rule_priority,
                });
            }
        }
        Ok(self)
    }
}

/// Why an input was refused. Each variant names the offending value.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SpecError {
    #[error("invalid port {input:?}: expected a number from 1 to 65535")]
    BadPort { input: String },
    #[error("invalid port range {input:?}: expected LO-HI with 1 <= LO <= HI <= 65535")]
    BadRange { input: String },
    #[error("invalid CIDR {input:?}: expected an IPv4 or IPv6 address with an optional /prefix (e.g. 198.18.0.0/15, fd00::/8)")]
    BadCidr { input: String },
    #[error("invalid CIDR {input:?}: an IPv4-mapped IPv6 subnet (::ffff:a.b.c.d/N) stands for the IPv4 subnet a.b.c.d/(N-96), so its prefix must be /96 to /128; write IPv4 subnets as IPv4 (e.g. 198.18.0.0/15)")]
    MappedCidrTooWide { input: String },
    #[error("port {port} given as both --incoming-proxy-port and --outgoing-proxy-port: they must differ")]
    SameProxyPort { port: u16 },
    #[error("--tproxy-mark 0: the mark must not be 0 (unmarked packets carry 0)")]
    ZeroMark,
    #[error("--tproxy-table {table}: tables 0, 253 (default), 254 (main) and 255 (local) are reserved; expected 1-252 or 256-4294967295")]
    ReservedTable { table: u32 },
    #[error("--tproxy-rule-priority {priority}: expected 1 to 32765 (0 is the local rule's, 32766 main's)")]
    BadRulePriority { priority: u32 },
}
