//! Reading a namespace's IPv6 addresses over rtnetlink, so that `--ipv6=false`
//! never silently un-meshes IPv6.
//!
//! With IPv6 rules off, a namespace that has a global or unique-local IPv6
//! address sends and receives IPv6 TCP around the proxy (no mTLS, no metrics),
//! which is rarely what a user who wrote `--ipv6=false` on a dual-stack pod
//! meant. `apply` and `check` therefore warn, naming the addresses.
//!
//! The netlink socket is created on the calling thread, inside the runtime's
//! `block_on`: a current-thread tokio runtime runs there too, so the socket
//! lives in the namespace that thread entered (`netns`: `setns` is per thread).

use std::io;
use std::net::{IpAddr, Ipv6Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::AddressFamily;

/// The IPv6 addresses of the calling thread's network namespace, every interface.
pub fn ipv6_addresses() -> io::Result<Vec<Ipv6Addr>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        let connection = tokio::spawn(connection);
        let mut request = handle.address().get();
        request.message_mut().header.family = AddressFamily::Inet6;
        let messages: Vec<_> = request
            .execute()
            .try_collect()
            .await
            .map_err(|err| io::Error::other(format!("netlink address dump: {err}")))?;
        connection.abort();
        let mut addresses = Vec::new();
        for message in messages {
            if message.header.family != AddressFamily::Inet6 {
                continue;
            }
            for attribute in message.attributes {
                if let AddressAttribute::Address(IpAddr::V6(address)) = attribute {
                    addresses.push(address);
                }
            }
        }
        addresses.sort();
        addresses.dedup();
        Ok(addresses)
    })
}

/// The addresses through which a namespace can reach, or be reached from, other
/// hosts over IPv6: global unicast (2000::/3) and unique local (fc00::/7).
/// Loopback, link-local and multicast ones do not leave the link or the pod.
pub fn routable(addresses: &[Ipv6Addr]) -> Vec<Ipv6Addr> {
    addresses
        .iter()
        .copied()
        .filter(|address| {
            // `segments()` is a [u16; 8]: index 0 always exists.
            let first = address.segments()[0];
            first & 0xe000 == 0x2000 || first & 0xfe00 == 0xfc00
        })
        .collect()
}

/// With IPv6 rules off, warns when the current namespace has routable IPv6
/// addresses. A failure to read them is logged at debug level only: the warning
/// is advice, and reading addresses must never fail a run.
pub fn warn_if_ipv6_unmeshed(ipv6_rules: bool) {
    if ipv6_rules {
        return;
    }
    match ipv6_addresses() {
        Ok(addresses) => {
            let routable = routable(&addresses);
            if !routable.is_empty() {
                let list: Vec<String> = routable.iter().map(ToString::to_string).collect();
                tracing::warn!(
                    addresses = %list.join(","),
                    "--ipv6=false, but this namespace has IPv6 addresses {}: its IPv6 TCP is not redirected and bypasses the proxy (no mTLS, no metrics); drop --ipv6=false to redirect it too",
                    list.join(", ")
                );
            }
        }
        Err(err) => tracing::debug!("cannot read this namespace's IPv6 addresses: {err}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_global_and_unique_local_addresses_count() {
        let all: Vec<Ipv6Addr> = [
            "::1",
            "fe80::1",
            "ff02::1",
            "::",
            "fd00:18::2",
            "fc00::1",
            "2001:db8::1",
            "3fff::1",
            "fec0::1",
            "::ffff:198.18.0.1",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let want: Vec<Ipv6Addr> = ["fd00:18::2", "fc00::1", "2001:db8::1", "3fff::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(routable(&all), want);
    }
}
