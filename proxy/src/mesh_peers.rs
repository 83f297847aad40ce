//! Which destinations are meshed, and the identity expected at each: `--mesh-peers`.
//!
//! The file is TOML, one `[[peer]]` table per network:
//!
//! ```toml
//! [[peer]]
//! net = "198.18.0.2/32"              # a CIDR, or a bare address (= /32 or /128)
//! identity = "web.default.mesh.local" # the DNS SAN its proxy's certificate must carry
//!
//! [[peer]]
//! net = "fd00::/64"
//! identity = "db.default.mesh.local"
//! ```
//!
//! A destination matching several entries takes the longest prefix, so a /32 can
//! override its /24. IPv4-mapped IPv6 networks (`::ffff:198.18.0.2`,
//! `::ffff:198.18.0.0/120`) are the IPv4 networks they map: destinations are compared
//! as IPv4, so kept as IPv6 they would silently match nothing. A destination matching none is not meshed and is reached in
//! plaintext, exactly as without the flag. Unknown keys are an error: a typo such as
//! `identiy` must not silently turn a peer into a plaintext destination.
//!
//! The file is reloaded when it changes (see `reload`); a file that no longer parses
//! keeps the previous list.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use rustls::pki_types::ServerName;
use serde::Deserialize;

use crate::reload::Watched;

#[derive(Debug, thiserror::Error)]
pub enum MeshPeersError {
    #[error("cannot read the mesh peers file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid mesh peers file {path}: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("mesh peers file {path}: net {net:?} is not a CIDR or an IP address (e.g. 198.18.0.0/24, fd00::2)")]
    BadNet { path: PathBuf, net: String },
    #[error("mesh peers file {path}: identity {identity:?} is not a DNS name")]
    BadIdentity { path: PathBuf, identity: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    peer: Vec<FilePeer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePeer {
    net: String,
    identity: String,
}

/// The parsed list: networks, longest prefix first, with their identities.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshPeers {
    peers: Vec<(IpNet, String)>,
}

impl MeshPeers {
    /// Parses the contents of a mesh peers file; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<MeshPeers, MeshPeersError> {
        let file: File = toml::from_str(text).map_err(|e| MeshPeersError::Toml {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut peers = Vec::with_capacity(file.peer.len());
        for FilePeer { net, identity } in file.peer {
            let parsed = net
                .trim()
                .parse::<IpNet>()
                .or_else(|_| net.trim().parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| MeshPeersError::BadNet {
                    path: path.to_path_buf(),
                    net: net.clone(),
                })?;
            if !matches!(
                ServerName::try_from(identity.as_str()),
                Ok(ServerName::DnsName(_))
            ) {
                return Err(MeshPeersError::BadIdentity {
                    path: path.to_path_buf(),
                    identity,
                });
            }
            peers.push((ipv4_mapped_to_ipv4(parsed).trunc(), identity));
        }
        // Longest prefix first, so the first match is the most specific.
        peers.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        Ok(MeshPeers { peers })
    }

    /// Reads and parses a mesh peers file.
    pub fn load(path: &Path) -> Result<MeshPeers, MeshPeersError> {
        let text = std::fs::read_to_string(path).map_err(|source| MeshPeersError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        MeshPeers::parse(path, &text)
    }

    /// The identity expected at `ip`, if it is meshed.
    pub fn identity(&self, ip: IpAddr) -> Option<&str> {
        // An IPv4-mapped IPv6 destination is the IPv4 peer.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.peers
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|(_, identity)| identity.as_str())
    }
}

/// An IPv4-mapped IPv6 network (inside `::ffff:0:0/96`) as the IPv4 network it maps;
/// any other network unchanged.
fn ipv4_mapped_to_ipv4(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        other => other,
    }
}

/// The mesh peers file, reloaded when it changes.
pub struct MeshPeersWatch {
    watched: Watched<MeshPeers, MeshPeersError>,
}

impl MeshPeersWatch {
    pub fn new(path: &Path) -> Result<MeshPeersWatch, MeshPeersError> {
        let watched = Watched::new("mesh peers", vec![path.to_path_buf()], |paths| {
            // `Watched` hands back the one path it was given.
            let path = paths.first().map_or(Path::new(""), PathBuf::as_path);
            MeshPeers::load(path)
        })?;
        Ok(MeshPeersWatch { watched })
    }

    pub fn current(&self) -> std::sync::Arc<MeshPeers> {
        self.watched.current()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MeshPeers, MeshPeersError> {
        MeshPeers::parse(Path::new("peers.toml"), text)
    }

    #[test]
    fn longest_prefix_wins_and_unlisted_is_plaintext() {
        let peers = parse(
            r#"
            [[peer]]
            net = "198.18.0.0/24"
            identity = "any.default.mesh.local"
            [[peer]]
            net = "198.18.0.2"
            identity = "web.default.mesh.local"
            [[peer]]
            net = "fd00::/64"
            identity = "db.default.mesh.local"
            "#,
        )
        .unwrap();
        let id = |ip: &str| peers.identity(ip.parse().unwrap());
        assert_eq!(id("198.18.0.2"), Some("web.default.mesh.local"));
        assert_eq!(id("198.18.0.3"), Some("any.default.mesh.local"));
        assert_eq!(id("::ffff:198.18.0.2"), Some("web.default.mesh.local"));
        assert_eq!(id("fd00::9"), Some("db.default.mesh.local"));
        assert_eq!(id("198.18.1.2"), None);
        assert_eq!(parse("").unwrap(), MeshPeers::default());
    }

    #[test]
    fn ipv4_mapped_networks_are_their_ipv4_networks() {
        let peers = parse(
            r#"
            [[peer]]
            net = "::ffff:198.18.0.2"
            identity = "web.default.mesh.local"
            [[peer]]
            net = "::ffff:198.18.1.0/120"
            identity = "any.default.mesh.local"
            "#,
        )
        .unwrap();
        let id = |ip: &str| peers.identity(ip.parse().unwrap());
        assert_eq!(id("198.18.0.2"), Some("web.default.mesh.local"));
        assert_eq!(id("::ffff:198.18.0.2"), Some("web.default.mesh.local"));
        assert_eq!(id("198.18.1.77"), Some("any.default.mesh.local"));
        assert_eq!(id("198.18.2.1"), None);
        // A network that merely contains the mapped range stays IPv6.
        let peers = parse("[[peer]]\nnet = \"::/64\"\nidentity = \"a.b\"").unwrap();
        assert_eq!(peers.identity("198.18.0.2".parse().unwrap()), None);
        assert_eq!(peers.identity("::5".parse().unwrap()), Some("a.b"));
    }

    #[test]
    fn mistakes_are_errors_naming_the_value() {
        let err = parse("[[peer]]\nnet = \"198.18.0.300\"\nidentity = \"a.b\"").unwrap_err();
        assert!(err.to_string().contains("198.18.0.300"), "{err}");
        let err = parse("[[peer]]\nnet = \"198.18.0.3\"\nidentity = \"not valid!\"").unwrap_err();
        assert!(matches!(err, MeshPeersError::BadIdentity { .. }), "{err}");
        let err = parse("[[peer]]\nnet = \"198.18.0.3\"\nidentiy = \"a.b\"").unwrap_err();
        assert!(err.to_string().contains("identiy"), "{err}");
    }
}
