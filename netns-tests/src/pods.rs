//! A "pod" and a "peer" namespace joined by one veth pair, with fixed test addresses.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// The name of the veth end in each namespace. Names only need to be unique inside one
/// namespace, and both ends are created directly inside fresh ones, so they can be short and
/// fixed (a veth name has at most 15 characters).
pub const VETH: &str = "eth0";

/// Numbers the `Pods` of one test process, so a test may build several.
static SERIAL: AtomicU32 = AtomicU32::new(0);

/// Two fresh namespaces, `pod` (where meshinit installs its rules and the proxy listens) and
/// `peer` (the rest of the world), joined by a veth pair and nothing else.
///
/// | | IPv4 | IPv6 |
/// |---|---|---|
/// | pod | 198.18.0.1/24 | fd00:18::1/64 |
/// | peer | 198.18.0.2/24 | fd00:18::2/64 |
///
/// Both namespaces and every process left in them are removed on `Drop`, pass or fail.
#[derive(Debug)]
pub struct Pods {
    pub pod: Netns,
    pub peer: Netns,
}

impl Pods {
    /// Builds the pair for the test `test_name` (names are derived from it, the pid and a
    /// counter, so parallel tests never collide). Panics when not root.
    pub fn new(test_name: &str) -> Pods {
        let base = namespace_base(test_name);
        let pods = Pods {
            pod: Netns::create(&format!("{base}-pod")),
            peer: Netns::create(&format!("{base}-peer")),
        };
        for ns in [&pods.pod, &pods.peer] {
            // No duplicate address detection on the interfaces about to be created: while the
            // veth's link-local address is "tentative", neighbour discovery stalls and the
            // first IPv6 SYN is lost (one second of retransmit). The namespace is ours alone, so
            // there is nothing to detect. (`nodad` below covers the global addresses.)
            ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"])
                .expect_ok();
        }
        pods.pod.ip(&[
            "link",
            "add",
            VETH,
            "type",
            "veth",
            "peer",
            "name",
            VETH,
            "netns",
            pods.peer.name(),
        ]);
        for (ns, family_addrs) in [
            (&pods.pod, [Family::V4.pod(), Family::V6.pod()]),
            (&pods.peer, [Family::V4.peer(), Family::V6.peer()]),
        ] {
            for addr in family_addrs {
                let cidr = format!("{addr}/{}", if addr.is_ipv4() { 24 } else { 64 });
                // `nodad`: without it an IPv6 address is "tentative" for a second or two
                // and cannot be bound or connected to.
                let nodad: &[&str] = if addr.is_ipv6() { &["nodad"] } else { &[] };
                ns.ip(&[&["addr", "add", &cidr, "dev", VETH], nodad].concat());
            }
            ns.ip(&["link", "set", VETH, "up"]);
        }
        pods.wait_until_reachable();
        pods
    }

    /// Waits until the pod reaches the peer in both families. A veth that was just set up
    /// drops IPv6 packets for up to a second (the kernel applies link changes from a delayed
    /// worker), and a lost SYN costs a one-second retransmit in the middle of a test. A
    /// "connection refused" from a port nobody listens on proves the path works both ways.
    fn wait_until_reachable(&self) {
        const PROBE_PORT: u16 = 9;
        let deadline = Instant::now() + Duration::from_secs(5);
        for family in Family::ALL {
            let to = SocketAddr::new(family.peer(), PROBE_PORT);
            loop {
                let attempt = self
                    .pod
                    .run(|| TcpStream::connect_timeout(&to, Duration::from_millis(50)));
                match attempt {
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                    Err(e) if Instant::now() > deadline => {
                        panic!(
                            "{} cannot reach {to} in {}: {e}",
                            self.pod.name(),
                            self.peer.name()
                        )
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }
}

/// `nt-<test name, shortened>-<pid>-<serial>`: recognisable in `ip netns list`, unique.
fn namespace_base(test_name: &str) -> String {
    let short: String = test_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(32)
        .collect();
    let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
    format!("nt-{short}-{}-{serial}", std::process::id())
}

/// An IP family: every traffic test runs once for each of [`Family::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The pod's address on the veth.
    pub fn pod(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
            Family::V6 => IpAddr::V6(Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 1)),
        }
    }

    /// The peer's address on the veth.
    pub fn peer(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)),
            Family::V6 => IpAddr::V6(Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 2)),
        }
    }

    /// The wildcard address: `0.0.0.0` or `::`.
    pub fn any(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }

    /// `any():port`, for a listener.
    pub fn any_port(self, port: u16) -> SocketAddr {
        SocketAddr::new(self.any(), port)
    }

    /// The subnet of the veth (`198.18.0.0/24` or `fd00:18::/64`), for skip-subnet flags.
    pub fn subnet(self) -> &'static str {
        match self {
            Family::V4 => "198.18.0.0/24",
            Family::V6 => "fd00:18::/64",
        }
    }
}
