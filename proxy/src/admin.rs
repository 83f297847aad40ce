//! The admin server: `/metrics` for Prometheus, `/ready` and `/live` for the kubelet.
//!
//! A tiny hand-written HTTP/1.0-style responder (one request per connection, then
//! close) is enough for scrapes and probes and keeps an HTTP stack out of the proxy.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::metrics::Metrics;

/// The largest request head we read; probes and scrapes send a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;
/// A client that has not sent its request by then is dropped, so idle connections
/// cannot pile up on the admin port.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// Serves admin requests on `listener` until the task is aborted.
pub(crate) async fn serve(listener: TcpListener, metrics: Arc<Metrics>, ready: Arc<AtomicBool>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                debug!(%error, "admin accept failed");
                // Out of file descriptors, most likely: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, ready) = (metrics.clone(), ready.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, respond(stream, &metrics, &ready)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => debug!(%error, "admin request failed"),
                Err(_) => debug!("admin client sent no request in time"),
            }
        });
    }
}

async fn respond(mut stream: TcpStream, metrics: &Metrics, ready: &AtomicBool) -> io::Result<()> {
    let Some(head) = read_head(&mut stream).await? else {
        return Ok(());
    };
    let (status, content_type, body) = route(&head, metrics, ready);
    let is_head = head.starts_with("HEAD ");
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !is_head {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Reads until the end of the request head. `None` if the client closed first or
/// sent more than `MAX_REQUEST` bytes without ending it.
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<String>> {
    let mut buf = vec![0; MAX_REQUEST];
    let mut len = 0;
    while len < buf.len() {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(None);
        }
        len += n;
        let head = &buf[..len];
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(String::from_utf8_lossy(head).into_owned()));
        }
    }
    Ok(None)
}

/// The status line, content type and body for a request head.
fn route(
    head: &str,
    metrics: &Metrics,
    ready: &AtomicBool,
) -> (&'static str, &'static str, String) {
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return ("405 Method Not Allowed", TEXT, "only GET and HEAD\n".into());
    }
    match path {
        "/metrics" => ("200 OK", PROMETHEUS, metrics.encode()),
        // Ready once every listener is bound, and no longer once draining: the
        // kubelet then stops sending new connections our way.
        "/ready" if ready.load(Ordering::Acquire) => ("200 OK", TEXT, "ready\n".into()),
        "/ready" => ("503 Service Unavailable", TEXT, "not ready\n".into()),
        // Live as long as the process can answer.
        "/live" => ("200 OK", TEXT, "live\n".into()),
        _ => (
            "404 Not Found",
            TEXT,
            "try /metrics, /ready or /live\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let metrics = Metrics::new();
        let ready = AtomicBool::new(false);
        let get = |path: &str| route(&format!("GET {path} HTTP/1.1\r\n\r\n"), &metrics, &ready).0;
        assert_eq!(get("/ready"), "503 Service Unavailable");
        ready.store(true, Ordering::Release);
        assert_eq!(get("/ready"), "200 OK");
        assert_eq!(get("/live"), "200 OK");
        assert_eq!(get("/metrics?x=1"), "200 OK");
        assert_eq!(get("/nope"), "404 Not Found");
        let post = route("POST /metrics HTTP/1.1\r\n\r\n", &metrics, &ready).0;
        assert_eq!(post, "405 Method Not Allowed");
    }
}
