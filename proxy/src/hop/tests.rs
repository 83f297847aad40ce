use std::net::{IpAddr, SocketAddr};

use super::*;
use crate::detect::ClientHello;

const US: &str = "web.ns.serviceaccount.identity.mesh.local";
const PEER: &str = "api.ns.serviceaccount.identity.mesh.local";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ports(s: &str) -> PortSet {
    s.parse().unwrap()
}

/// The mesh peers of these tests: everything in 198.18.1.0/24 runs a proxy whose
/// identity is `PEER`.
fn peers(target: SocketAddr) -> Option<String> {
    match target.ip() {
        IpAddr::V4(v4) if v4.octets()[..3] == [198, 18, 1] => Some(PEER.to_string()),
        _ => None,
    }
}

fn tls(sni: Option<&str>) -> Detected {
    Detected::Tls(ClientHello {
        sni: sni.map(str::to_string),
        alpn: Vec::new(),
    })
}

/// The decision with an identity and `--require-identity-ports 8443`.
fn meshed(direction: Direction, target: &str, detected: Option<&Detected>) -> Hop {
    let required = ports("8443");
    let mesh = MeshPolicy {
        identity: US,
        require_identity_ports: &required,
        peer_identity: &peers,
    };
    hop(direction, addr(target), detected, Some(&mesh))
}

#[test]
fn without_an_identity_everything_is_plaintext_http_or_opaque() {
    for direction in [Direction::Inbound, Direction::Outbound] {
        let plain =
            |detected: Option<&Detected>| hop(direction, addr("198.18.1.5:8443"), detected, None);
        assert_eq!(plain(Some(&Detected::Http1)), Hop::Http(HttpVersion::Http1));
        assert_eq!(plain(Some(&Detected::Http2)), Hop::Http(HttpVersion::Http2));
        for other in [Detected::Opaque, Detected::Timeout, tls(Some(US))] {
            assert_eq!(plain(Some(&other)), Hop::Opaque, "{other:?}");
        }
        // Detection skipped (an opaque port).
        assert_eq!(plain(None), Hop::Opaque);
    }
}

#[test]
fn inbound_tls_naming_our_identity_is_terminated_here() {
    use Direction::Inbound;
    let ours = tls(Some(US));
    // On an application port, and on one that requires an identity.
    assert_eq!(meshed(Inbound, "198.18.0.1:8080", Some(&ours)), Hop::MtlsIn);
    assert_eq!(meshed(Inbound, "198.18.0.1:8443", Some(&ours)), Hop::MtlsIn);
    // TLS for someone else (the application's own TLS) passes through untouched.
    for other in [tls(Some(PEER)), tls(None)] {
        assert_eq!(
            meshed(Inbound, "198.18.0.1:8080", Some(&other)),
            Hop::Opaque
        );
    }
    // Outbound, naming our identity means nothing: it goes where it was going.
    assert_eq!(
        meshed(Direction::Outbound, "198.18.2.9:443", Some(&ours)),
        Hop::Opaque
    );
}

#[test]
fn plaintext_clients_are_refused_on_ports_that_require_an_identity() {
    use Direction::Inbound;
    for detected in [
        Some(Detected::Http1),
        Some(Detected::Http2),
        Some(Detected::Opaque),
        Some(Detected::Timeout),
        Some(tls(Some(PEER))),
        None,
    ] {
        assert_eq!(
            meshed(Inbound, "198.18.0.1:8443", detected.as_ref()),
            Hop::IdentityRequired,
            "{detected:?}"
        );
    }
    // Other inbound ports, and outbound connections to that port, are not concerned.
    assert_eq!(
        meshed(Inbound, "198.18.0.1:8080", Some(&Detected::Http1)),
        Hop::Http(HttpVersion::Http1)
    );
    assert_eq!(
        meshed(
            Direction::Outbound,
            "198.18.2.9:8443",
            Some(&Detected::Opaque)
        ),
        Hop::Opaque
    );
}

#[test]
fn outbound_connections_to_mesh_peers_go_over_mtls_whatever_they_speak() {
    use Direction::Outbound;
    let server_id = PEER.to_string();
    for detected in [
        Some(Detected::Opaque),
        Some(Detected::Timeout),
        Some(tls(Some("example.com"))),
        None,
    ] {
        assert_eq!(
            meshed(Outbound, "198.18.1.7:80", detected.as_ref()),
            Hop::MtlsOut {
                server_id: server_id.clone()
            },
            "{detected:?}"
        );
    }
    // HTTP to a peer is proxied request by request over the pooled mTLS connection.
    for (detected, version) in [
        (Detected::Http1, HttpVersion::Http1),
        (Detected::Http2, HttpVersion::Http2),
    ] {
        assert_eq!(
            meshed(Outbound, "198.18.1.7:80", Some(&detected)),
            Hop::MeshHttp {
                version,
                server_id: server_id.clone()
            },
            "{detected:?}"
        );
    }
    // Not a peer: plaintext, HTTP as detected.
    assert_eq!(
        meshed(Outbound, "198.18.2.7:80", Some(&Detected::Http2)),
        Hop::Http(HttpVersion::Http2)
    );
    // Inbound connections from that address are not sent back over mTLS.
    assert_eq!(
        meshed(Direction::Inbound, "198.18.1.7:80", Some(&Detected::Http1)),
        Hop::Http(HttpVersion::Http1)
    );
}

#[test]
fn opaque_ports_skip_detection_unless_an_identity_is_required_there() {
    let opaque = ports("25,3306");
    let required = ports("3306");
    let mesh = MeshPolicy {
        identity: US,
        require_identity_ports: &required,
        peer_identity: &peers,
    };
    let smtp = addr("198.18.0.1:25");
    let mysql = addr("198.18.0.1:3306");
    let web = addr("198.18.0.1:80");
    for direction in [Direction::Inbound, Direction::Outbound] {
        assert!(!detects(direction, smtp, &opaque, None));
        assert!(!detects(direction, smtp, &opaque, Some(&mesh)));
        assert!(detects(direction, web, &opaque, None));
        assert!(!detects(direction, mysql, &opaque, None));
    }
    // A plaintext client must be told apart from a TLS one to be refused.
    assert!(detects(Direction::Inbound, mysql, &opaque, Some(&mesh)));
    // Outbound, `--require-identity-ports` does not apply.
    assert!(!detects(Direction::Outbound, mysql, &opaque, Some(&mesh)));
}

#[test]
fn http_to_a_mesh_peer_needs_an_identity_and_an_outbound_connection() {
    // Without an identity, HTTP to the same address is plaintext HTTP.
    assert_eq!(
        hop(
            Direction::Outbound,
            addr("198.18.1.7:80"),
            Some(&Detected::Http1),
            None
        ),
        Hop::Http(HttpVersion::Http1)
    );
    // On an opaque port (detection skipped), a peer still gets the bytes over mTLS.
    assert_eq!(
        meshed(Direction::Outbound, "198.18.1.7:3306", None),
        Hop::MtlsOut {
            server_id: PEER.to_string()
        }
    );
}
