//! Copying bytes between the client and the target, both directions at once.
//!
//! Each direction reads into one buffer reused for every read, writes everything it
//! read before reading again (so no byte is lost or reordered), and counts bytes into
//! counters shared with the metrics.
//!
//! The buffer starts small and doubles each time a read fills it, up to 64 KiB: an idle
//! connection (most of 10,000 open ones) holds 2 × 4 KiB, while a bulk transfer soon
//! reads 64 KiB per syscall. A direction grows at most four times, so nothing is
//! allocated per read.
//!
//! Half-close is propagated, not turned into a full close: when one side sends FIN, we
//! shut down writing towards the other side and keep copying the other direction until
//! it ends too. Protocols that signal "end of request" with a FIN and then read the
//! response depend on it.

use std::io;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// First size of each direction's buffer.
const MIN_BUF: usize = 4 * 1024;
/// Largest size of each direction's buffer, reached after reads that filled it.
const MAX_BUF: usize = 64 * 1024;

/// Byte counters of one connection, from the client's point of view.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// Bytes read from the client.
    pub read: Counter,
    /// Bytes written to the client.
    pub written: Counter,
}

/// Bytes copied in each direction of one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Client to target, including the replayed prefix.
    pub client_to_target: u64,
    /// Target to client.
    pub target_to_client: u64,
}

/// Which side's socket failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Target,
}

/// An I/O error that ended the copy, and on which side it happened.
#[derive(Debug, thiserror::Error)]
#[error("{side:?} socket failed: {source}")]
pub struct DuplexError {
    pub side: Side,
    pub source: io::Error,
}

/// Copies between `client` and `target` until both directions have ended, first
/// writing `prefix` (the bytes detection already read from the client) to the target.
///
/// An error in either direction ends both: the connection is broken and the sockets
/// are dropped (closed) by the caller.
pub async fn duplex<C, T>(
    client: C,
    target: T,
    prefix: Vec<u8>,
    counters: &Counters,
) -> Result<Totals, DuplexError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut target_read, mut target_write) = tokio::io::split(target);

    // The prefix was read from the client during detection.
    counters.read.inc_by(prefix.len() as u64);
    let upstream = async {
        let mut buf = prefix;
        let replayed = buf.len() as u64;
        write(&mut target_write, &buf, Side::Target).await?;
        // Reuse detection's buffer for this direction.
        buf.resize(MIN_BUF.max(buf.len()), 0);
        let copied = copy(
            &mut client_read,
            &mut target_write,
            &mut buf,
            Some(&counters.read),
            None,
            Side::Client,
        )
        .await?;
        Ok(replayed + copied)
    };
    let downstream = async {
        let mut buf = vec![0; MIN_BUF];
        copy(
            &mut target_read,
            &mut client_write,
            &mut buf,
            None,
            Some(&counters.written),
            Side::Target,
        )
        .await
    };
    let (client_to_target, target_to_client) = tokio::try_join!(upstream, downstream)?;
    Ok(Totals {
        client_to_target,
        target_to_client,
    })
}

/// Copies `from` to `to` until EOF, then shuts down `to`'s write side (half-close).
/// `counted_read` is added to after each read, `counted_write` after each write.
/// `from_side` names the side `from` reads; `to` is the other one.
async fn copy<R, W>(
    from: &mut R,
    to: &mut W,
    buf: &mut Vec<u8>,
    counted_read: Option<&Counter>,
    counted_write: Option<&Counter>,
    from_side: Side,
) -> Result<u64, DuplexError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let to_side = match from_side {
        Side::Client => Side::Target,
        Side::Target => Side::Client,
    };
    let mut total = 0;
    loop {
        let n = from
            .read(&mut buf[..])
            .await
            .map_err(|source| DuplexError {
                side: from_side,
                source,
            })?;
        if n == 0 {
            to.shutdown().await.map_err(|source| DuplexError {
                side: to_side,
                source,
            })?;
            return Ok(total);
        }
        if let Some(counter) = counted_read {
            counter.inc_by(n as u64);
        }
        write(to, &buf[..n], to_side).await?;
        if let Some(counter) = counted_write {
            counter.inc_by(n as u64);
        }
        total += n as u64;
        if n == buf.len() && buf.len() < MAX_BUF {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

async fn write<W>(to: &mut W, bytes: &[u8], side: Side) -> Result<(), DuplexError>
where
    W: AsyncWrite + Unpin,
{
    if bytes.is_empty() {
        return Ok(());
    }
    // `flush` is free on a TCP socket; a TLS stream needs it to send the record now.
    async {
        to.write_all(bytes).await?;
        to.flush().await
    }
    .await
    .map_err(|source| DuplexError { side, source })
}

#[cfg(test)]
mod tests;
