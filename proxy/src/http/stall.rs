//! `--http-write-timeout`: a client that takes nothing of what it is sent is not held
//! forever.
//!
//! - [`Stall`] times one wait: from the moment something for the client cannot go on
//!   until it does.
//! - [`ClientIo`], the client's side, fails a write that has waited the timeout: below
//!   hyper (its socket) that ends the connection, with a reset ([`ClientSocket`]); above
//!   it (a tunnel) it ends the tunnel, which on HTTP/2 is a stream whose writes wait
//!   for its flow-control window, not for the socket.
//! - [`StreamExecutor`] runs each HTTP/2 stream hyper serves, and resets a stream whose
//!   response has had its next piece ready, and not let through by the client's
//!   flow-control window, for the timeout. h2 sends a stream's data only within the
//!   window its client grants, so a client that reads its socket (answers pings, takes
//!   other streams' data) but never opens one stream's window otherwise held that
//!   stream, its buffers and its request to the destination for as long as it liked,
//!   and no write to its socket ever waited.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tracing::debug;

use crate::metrics::Counters;
use crate::prefixed::Prefixed;

/// Times a wait that cannot go on: from the moment one first waits until one goes
/// through ([`Stall::moved`]). A client that takes a byte now and then starts it again,
/// so only a client that takes nothing at all for `timeout` is cut (nginx's
/// `send_timeout`).
///
/// A download to a client slower than its server waits on most writes, so a wait costs
/// one clock read and a poll of the timer; the timer is made once, and moved only when
/// it fires for a wait that has since ended (at most once a `timeout`).
pub struct Stall {
    timeout: Duration,
    /// When the current wait began; `None` while things go through.
    since: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Stall {
    pub fn new(timeout: Duration) -> Stall {
        Stall {
            timeout,
            since: None,
            timer: None,
        }
    }

    /// Things went through: the current wait, if any, is over.
    pub fn moved(&mut self) {
        self.since = None;
    }

    /// Still waiting: ready once the wait has lasted the timeout; until then `cx` is
    /// woken when it will have.
    pub fn wait(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = *self.since.get_or_insert_with(Instant::now) + self.timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        while timer.as_mut().poll(cx).is_ready() {
            if timer.deadline() >= deadline {
                return Poll::Ready(());
            }
            // Armed for an earlier wait, which ended: this one's deadline is later.
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }

    /// What a write (or flush, or shutdown) to the client returned, unless it has
    /// waited too long: then it fails with `TimedOut`, which ends the connection (hyper
    /// drops it, and with it what was buffered for the client).
    pub fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.moved();
            return polled;
        }
        std::task::ready!(self.wait(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client took nothing of what it was sent for {} (--http-write-timeout)",
                humantime::format_duration(self.timeout)
            ),
        )))
    }
}

/// A client connection whose TCP socket is reachable below its layers (the bytes
/// detection read, replayed; TLS), so that the write timeout can reset it; a tunnel
/// above hyper has none of its own.
pub trait ClientSocket {
    fn tcp(&self) -> Option<&TcpStream>;
}

impl ClientSocket for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl<S: ClientSocket> ClientSocket for Prefixed<S> {
    fn tcp(&self) -> Option<&TcpStream> {
        self.get_ref().tcp()
    }
}

impl<S: ClientSocket + AsyncRead> ClientSocket for BufReader<S> {
    fn tcp(&self) -> Option<&TcpStream> {
        self.get_ref().tcp()
    }
}

impl<S: ClientSocket> ClientSocket for tokio_rustls::server::TlsStream<S> {
    fn tcp(&self) -> Option<&TcpStream> {
        self.get_ref().0.tcp()
    }
}

/// An upgraded connection: HTTP/1's goes on over the client's socket, whose
/// [`ClientIo`] below hyper resets it; HTTP/2's is one stream of the connection.
impl ClientSocket for TokioIo<Upgraded> {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

tokio::task_local! {
    /// The stream being served, for the response body made while serving it.
    static STREAM: Arc<Waiting>;
}

/// Whether a stream's response waits for its client to let the next piece through,
/// set by the response body ([`Waiting::begin`], [`Waiting::end`]), or by a tunnel's
/// writes, and read by the stream's task: the number of waits begun and ended, so odd
/// while one is on, and a new wait is told from an old one.
#[derive(Debug, Default)]
pub struct Waiting {
    waits: AtomicU64,
    /// The task that watches from elsewhere (the one hyper spawns to write a tunnel's
    /// bytes into the stream), woken when a wait begins; none for a stream's own task,
    /// which sees its body's waits as they happen.
    watcher: AtomicWaker,
}

impl Waiting {
    /// The stream's, for a body made while serving an HTTP/2 stream; `None` elsewhere
    /// (HTTP/1, where the socket's writes are timed instead).
    pub fn current() -> Option<Arc<Waiting>> {
        STREAM.try_with(Arc::clone).ok()
    }

    /// The response has handed over something (its head, or a frame) and is not asked
    /// for more until the client takes it.
    pub fn begin(&self) {
        if self.step(|waits| waits.is_multiple_of(2)) {
            self.watcher.wake();
        }
    }

    /// The response is asked for more, or has ended.
    pub fn end(&self) {
        self.step(|waits| !waits.is_multiple_of(2));
    }

    /// Counts one more begin or end when `from` holds. Atomic: a tunnel's writes may
    /// begin a wait on another thread while the response's body ends one.
    fn step(&self, from: impl Fn(u64) -> bool) -> bool {
        self.waits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |waits| {
                from(waits).then_some(waits + 1)
            })
            .is_ok()
    }

    fn state(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }
}

/// Spawns each HTTP/2 stream hyper serves as a tokio task that ends (dropping the
/// stream, which h2 resets with `CANCEL`) once its response has waited for the client
/// for `timeout`.
///
/// hyper spawns one more task for a stream that becomes a tunnel (extended `CONNECT`):
/// the one that writes the tunnel's bytes into it, which holds the stream while it
/// waits for window, even after the tunnel has gone. Spawned from within the stream's
/// task, it shares that stream's [`Waiting`], which the tunnel's writes set (see
/// `upgrade`), and ends the same way.
#[derive(Clone, Copy, Debug)]
pub struct StreamExecutor {
    pub timeout: Duration,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        let timeout = self.timeout;
        let parent = Waiting::current();
        tokio::spawn(async move {
            let from_elsewhere = parent.is_some();
            let waiting = parent.unwrap_or_default();
            let served = STREAM.scope(waiting.clone(), stream);
            tokio::pin!(served);
            let mut stall = Stall::new(timeout);
            let mut seen = 0;
            let reset = poll_fn(|cx| {
                if served.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(false);
                }
                if from_elsewhere {
                    waiting.watcher.register(cx.waker());
                }
                let state = waiting.state();
                if state != seen {
                    seen = state;
                    stall.moved();
                }
                if state.is_multiple_of(2) {
                    return Poll::Pending;
                }
                stall.wait(cx).map(|()| true)
            })
            .await;
            if reset {
                debug!(
                    timeout = %humantime::format_duration(timeout),
                    "HTTP/2 stream reset: its client let none of the response through (--http-write-timeout)"
                );
            }
        });
    }
}

/// The client's side: its socket below hyper (maybe under TLS), whose bytes are counted
/// into the connection's `tcp_*_bytes_total`, or a tunnel above hyper; either way a write
/// the client leaves waiting for `--http-write-timeout` fails ([`Stall`]).
pub struct ClientIo<I> {
    io: I,
    counters: Option<Counters>,
    stall: Stall,
    /// A tunnel's HTTP/2 stream, told when a write waits and when one goes through.
    stream: Option<Arc<Waiting>>,
}

impl<I> ClientIo<I> {
    pub fn new(io: I, counters: Option<Counters>, write_timeout: Duration) -> ClientIo<I> {
        ClientIo {
            io,
            counters,
            stall: Stall::new(write_timeout),
            stream: None,
        }
    }

    /// Tells `stream` (a tunnel's, on HTTP/2) when a write waits: the task hyper writes
    /// the stream with then ends too when the wait lasts (see [`StreamExecutor`]).
    pub fn telling(mut self, stream: Option<Arc<Waiting>>) -> ClientIo<I> {
        self.stream = stream;
        self
    }
}

impl<I: ClientSocket> ClientIo<I> {
    /// What a write to the client returned, unless it has waited too long: then the
    /// socket is reset as it closes. Closed with the bytes the client never took, it
    /// would linger as an orphan, holding its send buffer (up to megabytes) and probing
    /// a client that takes nothing for minutes.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if let Some(stream) = &self.stream {
            match polled {
                Poll::Ready(_) => stream.end(),
                Poll::Pending => stream.begin(),
            }
        }
        let checked = self.stall.check(cx, polled);
        if let Poll::Ready(Err(error)) = &checked {
            if let (io::ErrorKind::TimedOut, Some(tcp)) = (error.kind(), self.io.tcp()) {
                // Best effort: the socket is closed next either way.
                let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
            }
        }
        checked
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for ClientIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if let (1.., Some(counters)) = (read, &self.counters) {
            counters.read.inc_by(read as u64);
        }
        polled
    }
}

impl<I: AsyncWrite + ClientSocket + Unpin> AsyncWrite for ClientIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let (Poll::Ready(Ok(n)), Some(counters)) = (&polled, &self.counters) {
            counters.written.inc_by(*n as u64);
        }
        self.check(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let (Poll::Ready(Ok(n)), Some(counters)) = (&polled, &self.counters) {
            counters.written.inc_by(*n as u64);
        }
        self.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.check(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use tokio::sync::oneshot;

    const TIMEOUT: Duration = Duration::from_secs(1);

    /// Runs `stream` with [`StreamExecutor`]; the receiver hears `true` if it ended by
    /// itself, and is dropped unanswered if the executor dropped it.
    fn run<F>(stream: impl FnOnce(oneshot::Sender<bool>) -> F) -> oneshot::Receiver<bool>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        StreamExecutor { timeout: TIMEOUT }.execute(stream(tx));
        rx
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_left_waiting_is_dropped_at_the_timeout() {
        let mut ended = run(|tx| async move {
            Waiting::current().unwrap().begin();
            std::future::pending::<()>().await;
            let _ = tx.send(true);
        });
        tokio::time::sleep(TIMEOUT - Duration::from_millis(10)).await;
        assert_eq!(ended.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(ended.try_recv(), Err(oneshot::error::TryRecvError::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_whose_waits_each_end_within_the_timeout_runs_on() {
        let ended = run(|tx| async move {
            let waiting = Waiting::current().unwrap();
            for _ in 0..10 {
                waiting.begin();
                tokio::time::sleep(TIMEOUT * 3 / 4).await;
                waiting.end();
                // Asked for more at once, then handed over again: a new wait.
                waiting.begin();
                tokio::time::sleep(TIMEOUT / 2).await;
                waiting.end();
            }
            let _ = tx.send(true);
        });
        assert_eq!(ended.await, Ok(true));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_not_waiting_for_its_client_is_not_timed() {
        // Waiting on the destination (a long poll): no wait for the client is on.
        let ended = run(|tx| async move {
            let waiting = Waiting::current().unwrap();
            waiting.begin();
            waiting.end();
            tokio::time::sleep(TIMEOUT * 10).await;
            let _ = tx.send(true);
        });
        assert_eq!(ended.await, Ok(true));
        assert!(Waiting::current().is_none(), "outside a stream: no wait");
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_spawned_from_a_stream_ends_when_a_wait_begun_elsewhere_lasts() {
        // The stream's task spawns one more, as hyper does to write a tunnel's bytes,
        // and hands its wait out, as the tunnel gets it.
        let (handoff_tx, handoff_rx) = oneshot::channel();
        let _stream = run(|_| async move {
            let writer = run(|tx| async move {
                std::future::pending::<()>().await;
                let _ = tx.send(true);
            });
            let _ = handoff_tx.send((Waiting::current().unwrap(), writer));
        });
        let (stream, mut writer) = handoff_rx.await.unwrap();
        tokio::time::sleep(TIMEOUT * 3).await;
        assert_eq!(writer.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        // The tunnel's write waits, from its own task.
        stream.begin();
        tokio::time::sleep(TIMEOUT - Duration::from_millis(10)).await;
        assert_eq!(writer.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(writer.try_recv(), Err(oneshot::error::TryRecvError::Closed));
    }
}
