//! One connection, from its known destination to its close: detect (unless the port
//! is opaque), connect, replay the detected bytes, copy, count.
//!
//! The destination is a parameter: looking it up (`orig_dst`) belongs to the accept
//! loop, so this step runs the same in tests on loopback without any redirect rules.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::config::{Config, PortSet};
use crate::detect::{detect, Detected, Protocol};
use crate::duplex::duplex;
use crate::metrics::{errno_name, Direction, Metrics, Refused};

/// What every connection needs: the policy from the config and the shared metrics.
pub struct Forwarder {
    metrics: Arc<Metrics>,
    detect_timeout: Duration,
    inbound_opaque_ports: PortSet,
    outbound_opaque_ports: PortSet,
    /// Permits for connections in detection (`--max-detecting`).
    detecting: Arc<Semaphore>,
}

impl Forwarder {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Forwarder {
        Forwarder {
            metrics,
            detect_timeout: config.detect_timeout,
            inbound_opaque_ports: config.inbound_opaque_ports.clone(),
            outbound_opaque_ports: config.outbound_opaque_ports.clone(),
            detecting: Arc::new(Semaphore::new(config.max_detecting)),
        }
    }

    /// Forwards `client`, accepted by the `direction` listener, to `target`. Errors end
    /// the connection and are logged and counted here; there is nothing to return.
    pub async fn forward(&self, mut client: TcpStream, direction: Direction, target: SocketAddr) {
        let client_addr = client.peer_addr().ok();
        // We forward what we read as soon as we read it; Nagle would only add delay.
        let _ = client.set_nodelay(true);

        let opaque_ports = match direction {
            Direction::Inbound => &self.inbound_opaque_ports,
            Direction::Outbound => &self.outbound_opaque_ports,
        };
        let (protocol, prefix) = if opaque_ports.contains(target.port()) {
            // Opaque ports skip detection. Detection waits for the client to speak
            // first; in server-speaks-first protocols (SMTP, MySQL, ...) the client waits
            // for the server's greeting instead, so detection would hold every such
            // connection for the whole detect timeout. On these ports we know in
            // advance that there is nothing to detect, so we connect at once.
            (Protocol::Opaque, Vec::new())
        } else {
            // The cap on connections in detection: each holds a buffer and may wait the
            // whole timeout, so a flood of silent clients is turned away here, at once,
            // instead of piling up.
            let Ok(_permit) = self.detecting.clone().try_acquire_owned() else {
                self.metrics.refused(direction, Refused::MaxDetecting);
                debug!(?client_addr, %target, "too many connections in protocol detection, closing");
                return;
            };
            let started = Instant::now();
            let detection = match detect(&mut client, self.detect_timeout).await {
                Ok(detection) => detection,
                Err(error) => {
                    self.metrics.detect_error(started.elapsed());
                    debug!(?client_addr, %target, %error, "client failed during protocol detection");
                    return;
                }
            };
            self.metrics
                .detected(&detection.detected, started.elapsed());
            match &detection.detected {
                Detected::Eof => {
                    // Health checks and port scans do this; it is counted, not an error.
                    debug!(?client_addr, %target, "client closed before sending anything");
                    return;
                }
                Detected::Timeout => debug!(
                    ?client_addr,
                    %target,
                    timeout = ?self.detect_timeout,
                    "no protocol detected before the timeout, forwarding as opaque"
                ),
                Detected::Tls(hello) => debug!(
                    ?client_addr,
                    %target,
                    sni = ?hello.sni,
                    alpn = ?hello.alpn.iter().map(|p| String::from_utf8_lossy(p)).collect::<Vec<_>>(),
                    "detected TLS"
                ),
                other => {
                    debug!(?client_addr, %target, protocol = other.protocol().as_str(), "detected")
                }
            }
            (detection.detected.protocol(), detection.prefix)
        };

        let mut conn = self.metrics.open(direction, target, protocol);
        let target_stream = match connect(target).await {
            Ok(stream) => stream,
            Err(error) => {
                info!(?client_addr, %target, %error, "cannot connect to the destination");
                conn.set_errno(Some(errno_name(&error)));
                return;
            }
        };
        match duplex(client, target_stream, prefix, conn.counters()).await {
            Ok(totals) => {
                conn.set_errno(None);
                debug!(
                    ?client_addr,
                    %target,
                    sent = totals.client_to_target,
                    received = totals.target_to_client,
                    "connection closed"
                );
            }
            Err(error) => {
                conn.set_errno(Some(errno_name(&error.source)));
                debug!(?client_addr, %target, %error, "connection failed");
            }
        }
    }
}

/// Opens the proxy's own connection to a destination.
///
/// This connection is not redirected back into the proxy only because the proxy runs as
/// the proxy UID (2102 by default), whose traffic meshinit's outbound rule exempts, and
/// because inbound destinations (the pod's own address) are reached over `lo`, which the
/// rules exempt too. Under any other UID each forwarded connection would come back to
/// the outbound listener, until `--max-connections` stops the loop.
///
/// This is the seam for mTLS: a later `tls` module wraps the stream returned here.
pub async fn connect(target: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
