//! After a 101 (`Upgrade`) or a 2xx to `CONNECT`, the HTTP exchange is over and both
//! connections continue as opaque bytes: the client's upgraded connection is joined
//! to the destination's and copied both ways until both sides are done.
//!
//! Both halves come from hyper (`hyper::upgrade::on` on the request and on the
//! response), with any bytes either side sent early already buffered in them. The
//! client's bytes are still counted in the connection's `tcp_*_bytes_total`: its
//! socket is wrapped below hyper.

use std::sync::Arc;
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::stall::{ClientIo, Waiting};

/// Joins the client's upgraded connection to the destination's. Run beside the
/// client's connection (see `server`): the client's upgrade completes only once its
/// response has been written.
///
/// Writes to the client that wait `write_timeout` end the tunnel: over HTTP/2 (extended
/// `CONNECT`, `stream` given) they wait for the stream's flow-control window, which the
/// socket's own timeout below hyper does not see, and the stream is reset.
pub async fn tunnel(
    client: OnUpgrade,
    upstream: OnUpgrade,
    write_timeout: Duration,
    stream: Option<Arc<Waiting>>,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(error) => {
            debug!(%error, "upgrade failed");
            return;
        }
    };
    let mut client = ClientIo::new(TokioIo::new(client), None, write_timeout).telling(stream);
    let mut upstream = TokioIo::new(upstream);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => debug!(sent, received, "upgraded connection closed"),
        Err(error) => debug!(%error, "upgraded connection failed"),
    }
}
