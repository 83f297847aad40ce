//! The proxy's own connections to destinations, applications and peer proxies: TCP
//! keepalive on every forwarded socket, `--inbound-transparent`'s sockets bound to
//! the client's address, and `--connect-timeout` on every connect. One place, so every
//! hop connects the same way.
//!
//! The connect timeout (1 s by default, Linkerd's outbound one) is there because the
//! kernel's own gives up only after about two minutes of SYN retries: a destination
//! that drops SYNs would hold the client (and its connection slot) that long. A
//! connect that times out fails with `ETIMEDOUT`, the errno the kernel uses for the
//! same thing, so it is labelled alike in `tcp_close_total` (and answered 504 to an
//! HTTP client).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// TCP keepalive on both sockets of a forwarded connection: probes start after 60 s
/// without traffic, every 10 s, and 6 unanswered probes (2 minutes in all) reset the
/// connection. Without it a peer that vanished (a node gone, a NAT entry expired) holds
/// its connection slot and two descriptors until the process restarts; with it the
/// copy loop gets an error and the slot is freed. Idle but live connections are not
/// affected: the peer's kernel answers the probes.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 6;

/// Enables [`KEEPALIVE_IDLE`] and friends on a forwarded connection's socket.
pub(crate) fn set_keepalive(socket: &impl std::os::fd::AsFd) -> io::Result<()> {
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    SockRef::from(socket).set_tcp_keepalive(&keepalive)
}

/// Opens the proxy's own connection to a destination.
///
/// This connection is not redirected back into the proxy only because the proxy runs as
/// the proxy UID (2102 by default), whose traffic meshinit's outbound rule exempts, and
/// because inbound destinations (the pod's own address) are reached over `lo`, which the
/// rules exempt too. Under any other UID each forwarded connection would come back to
/// the outbound listener, until `--max-connections` stops the loop; meshproxy warns at
/// start-up when its UID is not `--proxy-uid`.
///
/// Meshed destinations get this same connection, to the peer's inbound port, wrapped
/// in mTLS by `outbound::mtls`.
///
/// The connection gets TCP keepalive (see [`KEEPALIVE_IDLE`]); it fails with
/// `ETIMEDOUT` when not established within `timeout` (`--connect-timeout`).
pub async fn connect(target: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    connect_from(target, None, timeout).await
}

/// [`connect`], from the address `from` when given: a transparent socket
/// (IP_TRANSPARENT, which needs CAP_NET_ADMIN) bound to the client's address, so
/// that the application sees the client, not the pod, as its peer. meshinit's
/// `tproxy` mode routes the application's replies back to this socket.
///
/// The port is the kernel's choice, never the client's own: the client's
/// connection already holds the 4-tuple (client address and port, application
/// address and port) in this namespace, and a second connection with the same one
/// would be taken for it. The rare ephemeral port equal to the client's is
/// therefore refused and another one taken.
pub async fn connect_from(
    target: SocketAddr,
    from: Option<SocketAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    match tokio::time::timeout(timeout, connect_untimed(target, from)).await {
        Ok(connected) => connected,
        Err(_elapsed) => Err(io::Error::from_raw_os_error(nix::libc::ETIMEDOUT)),
    }
}

async fn connect_untimed(target: SocketAddr, from: Option<SocketAddr>) -> io::Result<TcpStream> {
    let stream = match from {
        None => TcpStream::connect(target).await?,
        Some(from) => {
            // Port 0: the kernel's choice; a link-local client keeps its scope.
            let mut source = from;
            source.set_port(0);
            if let SocketAddr::V6(v6) = &mut source {
                v6.set_flowinfo(0);
            }
            let mut socket = transparent_socket(source)?;
            if socket.local_addr()?.port() == from.port() {
                socket = transparent_socket(source)?;
            }
            socket.connect(target).await?
        }
    };
    stream.set_nodelay(true)?;
    set_keepalive(&stream)?;
    Ok(stream)
}

/// A TCP socket bound, with IP_TRANSPARENT, to `source` (which need not be ours).
fn transparent_socket(source: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
    let socket = match source {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    crate::orig_dst::set_transparent(&socket)?;
    socket.bind(source)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use nix::sys::socket::{getsockopt, sockopt};
    use tokio::net::TcpListener;

    use super::*;

    /// Both sockets of a forwarded connection: the one `connect` opens, and the
    /// accepted one, which `forward` passes through `set_keepalive`.
    #[tokio::test]
    async fn forwarded_sockets_have_tcp_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = connect(listener.local_addr().unwrap(), Duration::from_secs(1))
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        set_keepalive(&accepted).unwrap();
        for stream in [&upstream, &accepted] {
            assert!(getsockopt(stream, sockopt::KeepAlive).unwrap());
            assert_eq!(getsockopt(stream, sockopt::TcpKeepIdle).unwrap(), 60);
            assert_eq!(getsockopt(stream, sockopt::TcpKeepInterval).unwrap(), 10);
            assert_eq!(getsockopt(stream, sockopt::TcpKeepCount).unwrap(), 6);
        }
    }
}
