//! `meshinit validate`: proves that outbound redirection works in this namespace,
//! the way linkerd-network-validator does.
//!
//! It listens on the proxy's outbound port (on `127.0.0.1` and `[::1]`, where a
//! nat OUTPUT `redirect` delivers locally generated connections), drops to an
//! unprivileged UID that is not the proxy's (the proxy's own traffic is exempt,
//! so testing as that UID would prove nothing), connects to a test address that
//! nobody answers for (default `198.18.255.254:1404`, in the benchmarking range,
//! never a real host) and passes only when that connection arrives at our
//! listener with the test address as its `SO_ORIGINAL_DST` and carries the
//! random token we sent. Anything else exits 95, so a pod whose redirection is
//! missing (a CNI plugin that did not run, rules deleted) can be detected and
//! restarted before the application starts.
//!
//! The kernel routes a locally generated packet before the nat OUTPUT hook sees
//! it, so the test address must be routable in the namespace (a pod has a
//! default route; a bare namespace with only `lo` does not): without a route,
//! connect() fails with "network unreachable" and validation fails saying so.
//!
//! meshinit is single-threaded, so changing the process's UID with
//! `setresuid` is safe here (no other thread keeps the old credentials).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use nix::errno::Errno;
use nix::unistd::{Gid, Uid};
use thiserror::Error;

use crate::commands::Failure;
use crate::config::Config;

/// The exit code of a failed validation (linkerd-network-validator's).
pub const FAILED: u8 = 95;

/// Bytes of the random token sent through the connection.
const TOKEN_LEN: usize = 16;

#[derive(Debug, Error)]
pub enum ValidateError {
    #[error("cannot listen on {addr}: {source} (validate must run before the proxy binds its outbound port)")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot drop privileges to uid/gid {uid}: {source} (start as root, or as a user other than the proxy's)")]
    DropPrivileges { uid: u32, source: Errno },
    #[error("no redirect: connect to {addr} failed: {source} (the test address has no route in this namespace; a pod needs a default route, or pick --validate-addr in a connected subnet)")]
    Unreachable { addr: SocketAddr, source: io::Error },
    #[error("no redirect: connect to {addr} failed: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("no redirect: the connection to {addr} did not reach our listener on port {port} within {timeout:?}")]
    NotRedirected {
        addr: SocketAddr,
        port: u16,
        timeout: Duration,
    },
    #[error("wrong original destination: a connection reached our listener on port {port} with original destination {got}, expected {addr}")]
    WrongDestination {
        addr: SocketAddr,
        port: u16,
        got: String,
    },
    #[error("a connection reached our listener without our token (another process connected to port {port}?)")]
    WrongToken { port: u16 },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

fn io_error(what: &'static str) -> impl FnOnce(io::Error) -> ValidateError {
    move |source| ValidateError::Io { what, source }
}

/// Runs the validation in the current namespace (already entered with `--netns`).
pub fn run(config: &Config) -> Result<ExitCode, Failure> {
    let uid = config.validate_uid;
    if Some(uid) == config.spec.proxy_uid || Some(uid) == config.spec.proxy_gid {
        return Err(Failure::BadInput(anyhow!(
            "--validate-uid {uid}: the proxy's UID/GID is exempt from redirection, so a test as {uid} proves nothing; use another (default 65534)"
        )));
    }
    let euid = Uid::effective();
    if !euid.is_root() && Some(euid.as_raw()) == config.spec.proxy_uid {
        return Err(Failure::BadInput(anyhow!(
            "running as the proxy's uid {euid}, whose traffic is exempt: run validate as another user"
        )));
    }
    let port = config.spec.outgoing_proxy_port;
    let timeout = config.validate_timeout;
    match validate(config.validate_addr, port, uid, timeout) {
        Ok(()) => {
            println!(
                "ok: a connection to {} was redirected to port {port} with the right original destination",
                config.validate_addr
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            tracing::error!("validation failed: {err}");
            Ok(ExitCode::from(FAILED))
        }
    }
}

fn validate(addr: SocketAddr, port: u16, uid: u32, timeout: Duration) -> Result<(), ValidateError> {
    let listeners = listen(addr, port)?;
    if Uid::effective().is_root() {
        drop_privileges(uid)?;
        tracing::debug!(uid, "dropped privileges");
    }
    let token = token()?;
    // Cannot overflow: `config` bounds the timeout to at most a day (a huge
    // --validate-timeout used to panic right here).
    let deadline = Instant::now() + timeout;

    let mut client = TcpStream::connect_timeout(&addr, timeout).map_err(|source| {
        match source.raw_os_error().map(Errno::from_raw) {
            Some(Errno::ENETUNREACH) => ValidateError::Unreachable { addr, source },
            _ if source.kind() == io::ErrorKind::TimedOut => ValidateError::NotRedirected {
                addr,
                port,
                timeout,
            },
            _ => ValidateError::Connect { addr, source },
        }
    })?;
    client
        .write_all(&token)
        .map_err(io_error("sending the token"))?;

    let (mut accepted, v6) = accept(&listeners, deadline).ok_or(ValidateError::NotRedirected {
        addr,
        port,
        timeout,
    })?;
    accepted
        .set_nonblocking(false)
        .and_then(|()| accepted.set_read_timeout(Some(remaining(deadline))))
        .map_err(io_error("configuring the accepted connection"))?;
    let got = original_dst(&accepted, v6).map_err(io_error("reading SO_ORIGINAL_DST"))?;
    if got != addr {
        return Err(ValidateError::WrongDestination {
            addr,
            port,
            got: got.to_string(),
        });
    }
    let mut received = [0u8; TOKEN_LEN];
    accepted
        .read_exact(&mut received)
        .map_err(|_| ValidateError::WrongToken { port })?;
    if received != token {
        return Err(ValidateError::WrongToken { port });
    }
    // Echo it, so the client side too sees that it talked to us.
    accepted
        .write_all(&received)
        .map_err(io_error("echoing the token"))?;
    client
        .set_read_timeout(Some(remaining(deadline)))
        .map_err(io_error("configuring the client"))?;
    let mut echoed = [0u8; TOKEN_LEN];
    client
        .read_exact(&mut echoed)
        .map_err(io_error("reading the echoed token"))?;
    if echoed != token {
        return Err(ValidateError::WrongToken { port });
    }
    Ok(())
}

/// Listeners on the loopback addresses where `redirect` delivers: the one of the
/// test address's family must bind, the other is best effort (IPv6 may be off).
fn listen(addr: SocketAddr, port: u16) -> Result<Vec<(TcpListener, bool)>, ValidateError> {
    let mut listeners = Vec::new();
    for ip in [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ] {
        let local = SocketAddr::new(ip, port);
        match TcpListener::bind(local) {
            Ok(listener) => {
                listener
                    .set_nonblocking(true)
                    .map_err(io_error("configuring the listener"))?;
                listeners.push((listener, ip.is_ipv6()));
            }
            Err(source) if ip.is_ipv4() == addr.is_ipv4() => {
                return Err(ValidateError::Bind {
                    addr: local,
                    source,
                })
            }
            Err(err) => tracing::debug!("not listening on {local}: {err}"),
        }
    }
    Ok(listeners)
}

fn drop_privileges(uid: u32) -> Result<(), ValidateError> {
    let fail = |source| ValidateError::DropPrivileges { uid, source };
    nix::unistd::setgroups(&[]).map_err(fail)?;
    let gid = Gid::from_raw(uid);
    nix::unistd::setresgid(gid, gid, gid).map_err(fail)?;
    let uid_ = Uid::from_raw(uid);
    nix::unistd::setresuid(uid_, uid_, uid_).map_err(fail)
}

fn token() -> Result<[u8; TOKEN_LEN], ValidateError> {
    let mut token = [0u8; TOKEN_LEN];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut token))
        .map_err(io_error("reading /dev/urandom"))?;
    Ok(token)
}

fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(10))
}

/// The first connection on any listener before `deadline`, and whether it is IPv6.
fn accept(listeners: &[(TcpListener, bool)], deadline: Instant) -> Option<(TcpStream, bool)> {
    loop {
        for (listener, v6) in listeners {
            match listener.accept() {
                Ok((stream, _)) => return Some((stream, *v6)),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => tracing::debug!("accept: {err}"),
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn original_dst(stream: &TcpStream, v6: bool) -> io::Result<SocketAddr> {
    meshinit_settings::original_dst(stream, v6)
}
