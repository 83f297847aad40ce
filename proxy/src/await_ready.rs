//! `meshproxy await`: wait until a proxy's admin server answers `/ready` with 200.
//!
//! Without native sidecars, a pod's containers start side by side and the
//! application can send its first request before the proxy listens: with the
//! redirect rules already installed, that request is refused. Two ways close the
//! race, and both run this wait: as the proxy container's `postStart` hook (the
//! kubelet starts the next container only once the hook returns), or wrapping the
//! application's command (`meshproxy await -- app ARGS`, which then becomes the
//! application), for runtimes without hooks.
//!
//! The check is a plain HTTP/1.1 GET over a fresh connection each time: it runs
//! once per pod start, and a refused connection (the proxy not listening yet) and
//! a 503 (listening, not ready) are both "not yet".

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use thiserror::Error;

/// How often `/ready` is asked.
const POLL: Duration = Duration::from_millis(100);

/// How long one attempt (connect, request, status line) may take.
const ATTEMPT: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum AwaitError {
    #[error("the proxy at {addr} was not ready after {waited} (last answer: {last}); is meshproxy running with --admin-addr {addr}?")]
    Timeout {
        addr: SocketAddr,
        waited: String,
        last: String,
    },
}

/// Polls `http://addr/ready` until it answers 200 or `timeout` has passed.
pub fn await_ready(addr: SocketAddr, timeout: Duration) -> Result<(), AwaitError> {
    let started = Instant::now();
    loop {
        let last = match ask(addr) {
            Ok(status) if status == "200" => return Ok(()),
            Ok(status) => format!("HTTP {status}"),
            Err(err) => err.to_string(),
        };
        let waited = started.elapsed();
        if waited >= timeout {
            return Err(AwaitError::Timeout {
                addr,
                waited: humantime::format_duration(timeout).to_string(),
                last,
            });
        }
        std::thread::sleep(POLL.min(timeout - waited));
    }
}

/// One GET /ready: the status code of the answer.
fn ask(addr: SocketAddr) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, ATTEMPT)?;
    stream.set_read_timeout(Some(ATTEMPT))?;
    stream.set_write_timeout(Some(ATTEMPT))?;
    stream.write_all(
        format!("GET /ready HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    // The status line fits in the first read of any sane server; read until its
    // end or a small cap.
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    while !head.contains(&b'\n') && head.len() < 256 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or("");
    match line.split(' ').collect::<Vec<_>>()[..] {
        [version, status, ..] if version.starts_with("HTTP/1.") => Ok(status.to_string()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not an HTTP answer: {line:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A server answering every request with 503 until `ready` is set, then 200.
    fn server(ready: Arc<AtomicBool>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut buf = [0u8; 512];
                let _ = stream.read(&mut buf);
                let status = if ready.load(Ordering::Acquire) {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let _ = write!(stream, "HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
            }
        });
        addr
    }

    #[test]
    fn waits_through_503_until_200() {
        let ready = Arc::new(AtomicBool::new(false));
        let addr = server(ready.clone());
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            ready.store(true, Ordering::Release);
        });
        let started = Instant::now();
        await_ready(addr, Duration::from_secs(10)).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(400));
        setter.join().unwrap();
    }

    #[test]
    fn gives_up_after_the_timeout_naming_the_last_answer() {
        let addr = server(Arc::new(AtomicBool::new(false)));
        let err = await_ready(addr, Duration::from_millis(300)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("HTTP 503") && text.contains("300ms"),
            "{text}"
        );
        assert!(text.contains(&addr.to_string()), "{text}");
    }

    #[test]
    fn nothing_listening_is_not_ready_yet() {
        // A port just freed: connections are refused.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = await_ready(addr, Duration::from_millis(250)).unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
    }
}
