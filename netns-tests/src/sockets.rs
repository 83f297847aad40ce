//! Real TCP sockets inside a namespace, and the original destination a redirect leaves.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrIn, SockaddrIn6,
};

use crate::bins::netns_probe_bin;
use crate::netns::Netns;
use crate::process::Run;

/// How long a client waits for a connection. Everything is on one veth, so an answer (accept
/// or reset) comes in microseconds; waiting longer only slows down a failing test.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long [`landed_on`] and [`Listener::accept_within`] callers wait for a connection that
/// the client already saw established.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(2);

/// A listening TCP socket opened inside a namespace, with a label naming its role
/// ("proxy outbound", "peer app") so that a test can say where a connection landed.
#[derive(Debug)]
pub struct Listener {
    label: String,
    inner: TcpListener,
}

/// A connection taken from a [`Listener`].
#[derive(Debug)]
pub struct Accepted {
    pub stream: TcpStream,
    /// The client's address as this side sees it.
    pub peer: SocketAddr,
    /// This side's address: after a redirect, the proxy port, not the one the client dialled.
    pub local: SocketAddr,
    /// What `SO_ORIGINAL_DST` said right after the accept: after a redirect, the destination
    /// the client dialled; without one, `local` (or an error when nothing tracked the
    /// connection).
    pub original_dst: io::Result<SocketAddr>,
}

impl Netns {
    /// Listens on `addr` inside the namespace. IPv6 sockets are `IPV6_V6ONLY`, so that
    /// `0.0.0.0:P` and `[::]:P` can both be bound and each proves its own family.
    pub fn listen(&self, label: &str, addr: SocketAddr) -> Listener {
        let inner = self.run(|| bind_retrying(addr)).unwrap_or_else(|e| {
            let sockets = self.exec(&["ss", "-tan"]);
            panic!(
                "{label}: cannot listen on {addr} in {}: {e}\n{sockets}",
                self.name()
            )
        });
        inner
            .set_nonblocking(true)
            .expect("set a listener non-blocking");
        Listener {
            label: label.to_string(),
            inner,
        }
    }

    /// Connects to `to` from inside the namespace, as root, waiting at most
    /// [`CONNECT_TIMEOUT`]. The stream stays in the namespace and can be used from any thread.
    pub fn connect(&self, to: SocketAddr) -> io::Result<TcpStream> {
        self.run(|| TcpStream::connect_timeout(&to, CONNECT_TIMEOUT))
    }

    /// Connects to `to` from inside the namespace (as root) and returns which of `listeners`
    /// received the connection, and the connection; panics when the client fails or none of
    /// them received it.
    #[track_caller]
    pub fn connect_and_land<'a>(
        &self,
        to: SocketAddr,
        listeners: &[&'a Listener],
    ) -> (&'a str, Accepted) {
        let client = self
            .connect(to)
            .unwrap_or_else(|e| panic!("connect from {} to {to}: {e}", self.name()));
        let landed = landed_on(listeners);
        drop(client);
        landed
    }

    /// Connects to `to` from inside the namespace as `uid`/`gid` (no supplementary groups),
    /// in a separate `netns-probe` process started through `setpriv`. A process of its own,
    /// because changing the uid of one thread is not possible: glibc applies `setuid` to every
    /// thread of the process. The probe exits 0 once the connection is established.
    pub fn connect_as(&self, to: SocketAddr, uid: u32, gid: u32) -> Run {
        let timeout_ms = CONNECT_TIMEOUT.as_millis().to_string();
        Run::of(
            self.command("setpriv")
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups")
                .arg(netns_probe_bin())
                .arg(to.to_string())
                .arg(timeout_ms),
        )
    }
}

impl Listener {
    /// The role given to [`Netns::listen`].
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr().expect("listener address")
    }

    /// Takes a pending connection, if there is one, without waiting.
    pub fn try_accept(&self) -> Option<Accepted> {
        match self.inner.accept() {
            Ok((stream, peer)) => {
                stream
                    .set_nonblocking(false)
                    .expect("set an accepted stream blocking");
                let local = stream.local_addr().expect("accepted stream address");
                let original_dst = original_dst(&stream);
                Some(Accepted {
                    stream,
                    peer,
                    local,
                    original_dst,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("{}: accept failed: {e}", self.label),
        }
    }

    /// Waits up to `timeout` for a connection.
    pub fn accept_within(&self, timeout: Duration) -> Option<Accepted> {
        landed_within(&[self], timeout).map(|(_, accepted)| accepted)
    }
}

/// Which of `listeners` received the client's connection: waits up to [`ACCEPT_TIMEOUT`] and
/// returns the label of the one that accepted, with the connection. Panics when none did,
/// naming them all.
#[track_caller]
pub fn landed_on<'a>(listeners: &[&'a Listener]) -> (&'a str, Accepted) {
    landed_within(listeners, ACCEPT_TIMEOUT).unwrap_or_else(|| {
        let labels: Vec<&str> = listeners.iter().map(|l| l.label()).collect();
        panic!(
            "no connection arrived within {ACCEPT_TIMEOUT:?} on any of {labels:?}; \
             the client connected, so it reached something else"
        )
    })
}

fn landed_within<'a>(listeners: &[&'a Listener], timeout: Duration) -> Option<(&'a str, Accepted)> {
    let deadline = Instant::now() + timeout;
    loop {
        for listener in listeners {
            if let Some(accepted) = listener.try_accept() {
                return Some((listener.label(), accepted));
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// The original destination of a redirected (or merely conntracked) connection:
/// `SO_ORIGINAL_DST` for IPv4, `IP6T_SO_ORIGINAL_DST` for IPv6.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    meshinit_settings::original_dst(stream, stream.local_addr()?.is_ipv6())
}

/// Binds `addr`, retrying for a moment while it is in use. A listener that a test just
/// dropped can outlive its `close` briefly: a process that another test forks at that moment
/// holds a copy of every descriptor until its `exec` closes them (`O_CLOEXEC` acts at exec,
/// not at fork), so re-binding the same port right away fails now and then.
fn bind_retrying(addr: SocketAddr) -> io::Result<TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match bind_listener(addr) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            result => return result,
        }
    }
}

fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    match addr {
        SocketAddr::V4(v4) => bind(fd.as_raw_fd(), &SockaddrIn::from(v4))?,
        SocketAddr::V6(v6) => {
            setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
            bind(fd.as_raw_fd(), &SockaddrIn6::from(v6))?;
        }
    }
    listen(&fd, Backlog::new(128)?)?;
    Ok(TcpListener::from(fd))
}
