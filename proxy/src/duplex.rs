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
//! response depend on it. Between two TCP sockets ([`duplex_tcp`]) the direction that
//! ends last does not call `shutdown`: both sockets are closed as soon as it returns,
//! and `close` sends the same FIN, since the other direction read its socket to EOF and
//! nothing is left unread (unread bytes would make it a reset). That is one syscall
//! less per connection, and the FIN leaves at the same moment (docs/bench/issue14-conn-s5.md).
//!
//! Between two TCP sockets ([`duplex_tcp`], plaintext opaque connections) a direction
//! that carries bulk data leaves user space: once one of its reads fills the buffer, it
//! moves the rest with `splice(2)` through a pipe of its own (`splice`), and frees the
//! buffer. Small exchanges (a request and its answer) never fill it, so they cost no
//! pipe; an idle connection holds no pipe either. Where splice is not possible (no
//! descriptors left for a pipe, a kernel or filter that refuses it) the direction goes
//! on with the copy loop. Counters, half-close and errors are the same either way.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tracing::debug;

pub use crate::metrics::Counters;

mod splice;

use self::splice::{splice_to_eof, Pipe, SpliceError};

/// First size of each direction's buffer.
const MIN_BUF: usize = 4 * 1024;
/// Largest size of each direction's buffer, reached after reads that filled it.
const MAX_BUF: usize = 64 * 1024;

/// Bytes copied in each direction of one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Client to target, including the replayed prefix.
    pub client_to_target: u64,
    /// Target to client.
    pub target_to_client: u64,
    /// Of both, the bytes moved with `splice(2)` rather than copied.
    pub spliced: u64,
}

/// Which side's socket failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Target,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Client => Side::Target,
            Side::Target => Side::Client,
        }
    }
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
        let (copied, _) = copy(
            &mut client_read,
            &mut target_write,
            &mut buf,
            Some(&counters.read),
            None,
            Side::Client,
            Until::Eof,
        )
        .await?;
        shutdown(&mut target_write, Side::Target).await?;
        Ok(replayed + copied)
    };
    let downstream = async {
        let mut buf = vec![0; MIN_BUF];
        let (copied, _) = copy(
            &mut target_read,
            &mut client_write,
            &mut buf,
            None,
            Some(&counters.written),
            Side::Target,
            Until::Eof,
        )
        .await?;
        shutdown(&mut client_write, Side::Client).await?;
        Ok(copied)
    };
    let (client_to_target, target_to_client) = tokio::try_join!(upstream, downstream)?;
    Ok(Totals {
        client_to_target,
        target_to_client,
        spliced: 0,
    })
}

/// [`duplex`] between two TCP sockets, moving bulk data with `splice(2)` (see the
/// module doc). Counters, totals, half-close and errors are those of [`duplex`].
pub async fn duplex_tcp(
    client: TcpStream,
    target: TcpStream,
    prefix: Vec<u8>,
    counters: &Counters,
) -> Result<Totals, DuplexError> {
    duplex_tcp_with(client, target, prefix, counters, &Pipe::new).await
}

/// What the two directions of [`duplex_tcp`] share.
struct Both<'a> {
    /// Makes a direction's pipe for splice.
    pipes: &'a (dyn Fn() -> io::Result<Pipe> + Sync),
    /// Set by the first direction to reach EOF: the second one then needs no
    /// `shutdown` (see the module doc). Both directions run in one task; atomic only
    /// because the connection's future must be `Send`.
    one_ended: AtomicBool,
}

impl Both<'_> {
    /// Propagates the EOF of `to_side`'s peer direction: `shutdown(to, SHUT_WR)` if
    /// the other direction is still open, nothing if it has ended (the caller closes
    /// both sockets, and `close` sends the FIN).
    async fn eof(&self, to: &mut WriteHalf<'_>, to_side: Side) -> Result<(), DuplexError> {
        if self.one_ended.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        shutdown(to, to_side).await
    }
}

/// [`duplex_tcp`] with the pipe factory as a parameter, so tests can make it fail.
async fn duplex_tcp_with(
    mut client: TcpStream,
    mut target: TcpStream,
    prefix: Vec<u8>,
    counters: &Counters,
    pipes: &(dyn Fn() -> io::Result<Pipe> + Sync),
) -> Result<Totals, DuplexError> {
    let (mut client_read, mut client_write) = client.split();
    let (mut target_read, mut target_write) = target.split();
    let both = Both {
        pipes,
        one_ended: AtomicBool::new(false),
    };

    counters.read.inc_by(prefix.len() as u64);
    let upstream = async {
        let mut buf = prefix;
        let replayed = buf.len() as u64;
        write(&mut target_write, &buf, Side::Target).await?;
        buf.resize(MIN_BUF.max(buf.len()), 0);
        let (copied, spliced) = tcp_direction(
            &mut client_read,
            &mut target_write,
            buf,
            Some(&counters.read),
            None,
            Side::Client,
            &both,
        )
        .await?;
        Ok((replayed + copied, spliced))
    };
    let downstream = tcp_direction(
        &mut target_read,
        &mut client_write,
        vec![0; MIN_BUF],
        None,
        Some(&counters.written),
        Side::Target,
        &both,
    );
    let ((client_to_target, spliced_up), (target_to_client, spliced_down)) =
        tokio::try_join!(upstream, downstream)?;
    Ok(Totals {
        client_to_target,
        target_to_client,
        spliced: spliced_up + spliced_down,
    })
}

/// One direction between two TCP sockets: copies until a read fills the buffer, then
/// splices to EOF; copies to EOF when no pipe can be had or the kernel refuses to
/// splice; then propagates the EOF (`Both::eof`). Returns the bytes moved in all, and
/// of them the bytes spliced.
async fn tcp_direction(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    mut buf: Vec<u8>,
    counted_read: Option<&Counter>,
    counted_write: Option<&Counter>,
    from_side: Side,
    both: &Both<'_>,
) -> Result<(u64, u64), DuplexError> {
    let (copied, ended) = copy(
        from,
        to,
        &mut buf,
        counted_read,
        counted_write,
        from_side,
        Until::Full,
    )
    .await?;
    if ended == Ended::Eof {
        both.eof(to, from_side.other()).await?;
        return Ok((copied, 0));
    }
    let spliced = match (both.pipes)() {
        // The buffer is not needed while splicing: a long-lived bulk connection that
        // goes idle holds a pipe (no pages while it is empty), not 4 KiB more.
        Ok(pipe) => {
            let parked = std::mem::take(&mut buf);
            let spliced = splice_to_eof(
                from.as_ref(),
                to.as_ref(),
                &pipe,
                counted_read,
                counted_write,
                from_side,
            )
            .await;
            buf = parked;
            match spliced {
                Ok(spliced) => {
                    drop(pipe);
                    both.eof(to, from_side.other()).await?;
                    return Ok((copied + spliced, spliced));
                }
                Err(SpliceError::Failed(error)) => return Err(error),
                Err(SpliceError::Unsupported(error)) => {
                    debug!(%error, "splice refused, copying instead");
                    0
                }
            }
        }
        Err(error) => {
            debug!(%error, "no pipe for splice, copying instead");
            0
        }
    };
    let (rest, _) = copy(
        from,
        to,
        &mut buf,
        counted_read,
        counted_write,
        from_side,
        Until::Eof,
    )
    .await?;
    both.eof(to, from_side.other()).await?;
    Ok((copied + spliced + rest, spliced))
}

/// When [`copy`] stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Until {
    /// At EOF only.
    Eof,
    /// At EOF, or after writing a read that filled the buffer (bulk data: splice it).
    Full,
}

/// Why [`copy`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// `from` ended (the caller propagates it to `to`).
    Eof,
    /// A read filled the buffer ([`Until::Full`]); everything read was written.
    Full,
}

/// Copies `from` to `to` until EOF (the caller then shuts down `to`'s write side, the
/// half-close); with [`Until::Full`], stops earlier after a read that filled the buffer.
/// `counted_read` is added to after each read, `counted_write` after each write.
/// `from_side` names the side `from` reads; `to` is the other one. Returns the bytes
/// copied and why it stopped.
async fn copy<R, W>(
    from: &mut R,
    to: &mut W,
    buf: &mut Vec<u8>,
    counted_read: Option<&Counter>,
    counted_write: Option<&Counter>,
    from_side: Side,
    until: Until,
) -> Result<(u64, Ended), DuplexError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let to_side = from_side.other();
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
            return Ok((total, Ended::Eof));
        }
        if let Some(counter) = counted_read {
            counter.inc_by(n as u64);
        }
        write(to, &buf[..n], to_side).await?;
        if let Some(counter) = counted_write {
            counter.inc_by(n as u64);
        }
        total += n as u64;
        if n == buf.len() {
            if until == Until::Full {
                return Ok((total, Ended::Full));
            }
            if buf.len() < MAX_BUF {
                buf.resize(buf.len() * 2, 0);
            }
        }
    }
}

/// Shuts down `to`'s write side: the FIN that propagates a half-close.
async fn shutdown<W>(to: &mut W, side: Side) -> Result<(), DuplexError>
where
    W: AsyncWrite + Unpin,
{
    to.shutdown()
        .await
        .map_err(|source| DuplexError { side, source })
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
