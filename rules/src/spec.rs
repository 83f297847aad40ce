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
}
