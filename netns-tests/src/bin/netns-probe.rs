//! `netns-probe ADDR [TIMEOUT_MS]`: opens one TCP connection to `ADDR` and exits 0 once it is
//! established (printing both ends), 1 when it is refused or times out.
//!
//! The harness runs it under `setpriv` to connect as another uid/gid, which a thread of the
//! test process cannot do (see `Netns::connect_as`).

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (addr, timeout_ms) = match args.as_slice() {
        [addr] => (addr, "2000"),
        [addr, timeout_ms] => (addr, timeout_ms.as_str()),
        _ => {
            eprintln!("usage: netns-probe ADDR [TIMEOUT_MS]");
            return ExitCode::from(2);
        }
    };
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        eprintln!("netns-probe: {addr:?} is not an address like 198.18.0.2:80 or [fd00:18::2]:80");
        return ExitCode::from(2);
    };
    let Ok(timeout_ms) = timeout_ms.parse::<u64>() else {
        eprintln!("netns-probe: {timeout_ms:?} is not a number of milliseconds");
        return ExitCode::from(2);
    };
    match TcpStream::connect_timeout(&addr, Duration::from_millis(timeout_ms)) {
        Ok(stream) => {
            let local = stream
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            println!("connected {local} -> {addr}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("netns-probe: connect {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}
