//! The discovery file (`--discovery`): which addresses are services, their backends and
//! weights, and each backend's endpoints. Parsed and validated by a pure function
//! ([`Discovery::parse`]) so that `meshproxy discovery check`, start-up and every reload
//! give the same verdict.
//!
//! ```toml
//! [[service]]
//! name = "redis"                                         # dst_service
//! addrs = ["198.18.100.10:6379", "[fd00:100::10]:6379"]  # what clients dial
//! protocol = "opaque"                                    # opaque | http1 | http2 | detect
//! [[service.backend]]
//! name = "redis-a"                                       # dst_backend
//! weight = 100                                           # share of new connections
//! endpoints = [ { addr = "198.18.1.2:6379", identity = "redis-a.shop.mesh.local" } ]
//! ```
//!
//! Unknown keys are errors, as everywhere in meshproxy: a misspelt `identiy` must not
//! silently turn an mTLS endpoint into a plaintext one. Every error names the service
//! (and backend) it was found in, and the bad value.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::identity::check_name;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot read the discovery file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid discovery file {path}: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("discovery file {path}: {place}: {problem}")]
    Invalid {
        path: PathBuf,
        /// `service "redis"`, `service "redis", backend "redis-a"`, ...
        place: String,
        problem: String,
    },
}

/// What a service speaks, which tells the outbound proxy whether to detect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceProtocol {
    /// No detection: server-speaks-first protocols (Redis, MySQL, SMTP) connect at once.
    Opaque,
    Http1,
    Http2,
    /// Detect from the client's first bytes, as for any other destination.
    #[default]
    Detect,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    service: Vec<FileService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileService {
    name: String,
    addrs: Vec<String>,
    #[serde(default)]
    protocol: ServiceProtocol,
    #[serde(default)]
    backend: Vec<FileBackend>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    name: String,
    /// Signed so that a negative weight is reported as such, not as a TOML type error.
    weight: i64,
    #[serde(default)]
    endpoints: Vec<FileEndpoint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEndpoint {
    addr: String,
    identity: Option<String>,
}

/// A validated discovery file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Discovery {
    pub services: Vec<ServiceSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub addrs: Vec<SocketAddr>,
    pub protocol: ServiceProtocol,
    pub backends: Vec<BackendSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub name: String,
    pub weight: u32,
    pub endpoints: Vec<EndpointSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub addr: SocketAddr,
    /// The identity its proxy proves: reached over mTLS when set.
    pub identity: Option<String>,
}

impl Discovery {
    /// Reads and validates a discovery file.
    pub fn load(path: &Path) -> Result<Discovery, DiscoveryError> {
        let text = std::fs::read_to_string(path).map_err(|source| DiscoveryError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Discovery::parse(path, &text)
    }

    /// Validates the contents of a discovery file; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Discovery, DiscoveryError> {
        let file: File = toml::from_str(text).map_err(|e| DiscoveryError::Toml {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let invalid = |place: String, problem: String| DiscoveryError::Invalid {
            path: path.to_path_buf(),
            place,
            problem,
        };
        // Which service claimed each address: a second claim is ambiguous (which
        // backends would a client of that address get?), so it is an error.
        let mut claimed: HashMap<SocketAddr, String> = HashMap::new();
        let mut names: HashMap<String, ()> = HashMap::new();
        let mut services = Vec::with_capacity(file.service.len());
        for service in file.service {
            let place = format!("service {:?}", service.name);
            if service.name.is_empty() {
                return Err(invalid(place, "the name is empty".into()));
            }
            if names.insert(service.name.clone(), ()).is_some() {
                return Err(invalid(place, "a second service has this name".into()));
            }
            if service.addrs.is_empty() {
                return Err(invalid(place, "addrs is empty".into()));
            }
            let mut addrs = Vec::with_capacity(service.addrs.len());
            for addr in &service.addrs {
                let parsed = parse_addr(addr).map_err(|problem| invalid(place.clone(), problem))?;
                if let Some(other) = claimed.insert(parsed, service.name.clone()) {
                    return Err(invalid(
                        place,
                        format!("address {addr} is also an address of service {other:?}"),
                    ));
                }
                addrs.push(parsed);
            }
            let mut backends: Vec<BackendSpec> = Vec::with_capacity(service.backend.len());
            for backend in service.backend {
                let place = format!("{place}, backend {:?}", backend.name);
                if backend.name.is_empty() {
                    return Err(invalid(place, "the name is empty".into()));
                }
                if backends.iter().any(|b| b.name == backend.name) {
                    return Err(invalid(place, "a second backend has this name".into()));
                }
                let weight = u32::try_from(backend.weight).map_err(|_| {
                    invalid(
                        place.clone(),
                        format!(
                            "weight {} is not between 0 and {}",
                            backend.weight,
                            u32::MAX
                        ),
                    )
                })?;
                let mut endpoints: Vec<EndpointSpec> = Vec::with_capacity(backend.endpoints.len());
                for endpoint in backend.endpoints {
                    let addr = parse_addr(&endpoint.addr)
                        .map_err(|problem| invalid(place.clone(), format!("endpoint {problem}")))?;
                    if endpoints.iter().any(|e| e.addr == addr) {
                        return Err(invalid(place, format!("endpoint {addr} is listed twice")));
                    }
                    if let Some(identity) = &endpoint.identity {
                        check_name(identity).map_err(|bad| {
                            invalid(
                                place.clone(),
                                format!("endpoint {addr}: identity {identity:?} {}", bad.reason),
                            )
                        })?;
                    }
                    endpoints.push(EndpointSpec {
                        addr,
                        identity: endpoint.identity,
                    });
                }
                // A backend that could be chosen must have somewhere to go.
                if weight > 0 && endpoints.is_empty() {
                    return Err(invalid(place, format!("weight {weight} but no endpoints")));
                }
                backends.push(BackendSpec {
                    name: backend.name,
                    weight,
                    endpoints,
                });
            }
            if backends.iter().map(|b| u64::from(b.weight)).sum::<u64>() > u64::from(u32::MAX) {
                return Err(invalid(
                    place,
                    format!("the weights add up to more than {}", u32::MAX),
                ));
            }
            services.push(ServiceSpec {
                name: service.name,
                addrs,
                protocol: service.protocol,
                backends,
            });
        }
        Ok(Discovery { services })
    }

    /// Whether any endpoint is reached over mTLS (which needs an identity of our own).
    pub fn has_identities(&self) -> bool {
        self.services
            .iter()
            .flat_map(|s| &s.backends)
            .flat_map(|b| &b.endpoints)
            .any(|e| e.identity.is_some())
    }
}

/// An `IP:port` (IPv6 in brackets); IPv4-mapped IPv6 addresses are their IPv4 address,
/// since that is how the kernel reports the original destination of an IPv4 client.
fn parse_addr(addr: &str) -> Result<SocketAddr, String> {
    let parsed: SocketAddr = addr.trim().parse().map_err(|_| {
        format!("address {addr:?} is not IP:port (e.g. 198.18.100.10:6379, [fd00::10]:6379)")
    })?;
    if parsed.port() == 0 {
        return Err(format!("address {addr:?} has port 0"));
    }
    if parsed.ip().is_unspecified() || parsed.ip().is_multicast() {
        return Err(format!(
            "address {addr:?} is the unspecified or a multicast address"
        ));
    }
    Ok(SocketAddr::new(parsed.ip().to_canonical(), parsed.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Discovery, DiscoveryError> {
        Discovery::parse(Path::new("discovery.toml"), text)
    }

    const GOOD: &str = r#"
        [[service]]
        name = "redis"
        addrs = ["198.18.100.10:6379", "[fd00:100::10]:6379"]
        protocol = "opaque"
        [[service.backend]]
        name = "redis-a"
        weight = 100
        endpoints = [ { addr = "198.18.1.2:6379", identity = "redis-a.shop.mesh.local" } ]
        [[service.backend]]
        name = "redis-b"
        weight = 0
        endpoints = [ { addr = "198.18.2.2:6379" } ]
    "#;

    #[test]
    fn the_documented_example_parses() {
        let d = parse(GOOD).unwrap();
        assert_eq!(d.services.len(), 1);
        let s = &d.services[0];
        assert_eq!(s.protocol, ServiceProtocol::Opaque);
        assert_eq!(s.addrs[1], "[fd00:100::10]:6379".parse().unwrap());
        assert_eq!(s.backends[0].weight, 100);
        assert_eq!(
            s.backends[0].endpoints[0].identity.as_deref(),
            Some("redis-a.shop.mesh.local")
        );
        assert!(d.has_identities());
        assert_eq!(parse("").unwrap(), Discovery::default());
    }

    /// Each mistake of the issue is an error naming the value and where it is.
    #[test]
    fn mistakes_name_the_problem_and_the_place() {
        let cases: &[(&str, &str, &[&str])] = &[
            ("unknown key", "weigth = 3", &["weigth"]),
            ("negative weight", "weight = -1", &["redis-b", "weight -1"]),
            (
                "bad address",
                r#"endpoints = [ { addr = "198.18.2.300:6379" } ]"#,
                &["redis-b", "198.18.2.300:6379"],
            ),
            (
                "bad identity",
                r#"endpoints = [ { addr = "198.18.2.2:1", identity = "*.mesh.local" } ]"#,
                &["redis-b", "*.mesh.local"],
            ),
            (
                "bad identity",
                r#"endpoints = [ { addr = "198.18.2.2:1", identity = "not valid!" } ]"#,
                &["redis-b", "not valid!"],
            ),
        ];
        for (what, line, needles) in cases {
            let text = GOOD.replace(
                "weight = 0\n        endpoints = [ { addr = \"198.18.2.2:6379\" } ]",
                line,
            );
            let text = if *what == "negative weight" || *what == "unknown key" {
                GOOD.replace("weight = 0", line)
            } else {
                text.replace(
                    "name = \"redis-b\"",
                    "name = \"redis-b\"\n        weight = 1",
                )
            };
            let err = parse(&text).expect_err(what).to_string();
            for needle in *needles {
                assert!(err.contains(needle), "{what}: {err}");
            }
        }
        let dup =
            format!("{GOOD}\n[[service]]\nname = \"other\"\naddrs = [\"198.18.100.10:6379\"]\n");
        let err = parse(&dup).unwrap_err().to_string();
        assert!(
            err.contains("198.18.100.10:6379") && err.contains("\"redis\""),
            "{err}"
        );
        // The same address written as IPv4-mapped IPv6 is the same address.
        let dup = format!(
            "{GOOD}\n[[service]]\nname = \"other\"\naddrs = [\"[::ffff:198.18.100.10]:6379\"]\n"
        );
        assert!(parse(&dup).is_err());
        let err = parse("[[service]]\nname = \"x\"\naddrs = [\"redis:6379\"]").unwrap_err();
        assert!(err.to_string().contains("redis:6379"), "{err}");
        let err = parse("[[service]]\nname = \"x\"\naddrs = [\"198.18.0.1:1\"]\n[[service.backend]]\nname = \"b\"\nweight = 5\n").unwrap_err();
        assert!(err.to_string().contains("no endpoints"), "{err}");
    }
}
