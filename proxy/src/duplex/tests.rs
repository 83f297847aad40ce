use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// Fails the test instead of hanging it when a direction never ends (a lost FIN).
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(20), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Two connected loopback sockets.
async fn socket_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let connect = TcpStream::connect(listener.local_addr().unwrap());
    let (connected, accepted) = tokio::join!(connect, listener.accept());
    (connected.unwrap(), accepted.unwrap().0)
}

/// A client app, a target app, and the proxy's two sockets between them, copying.
async fn proxied(
    prefix: &[u8],
) -> (
    TcpStream,
    TcpStream,
    Counters,
    tokio::task::JoinHandle<Result<Totals, DuplexError>>,
) {
    let (client_app, proxy_client_side) = socket_pair().await;
    let (proxy_target_side, target_app) = socket_pair().await;
    let counters = Counters::default();
    let task_counters = counters.clone();
    let prefix = prefix.to_vec();
    let copy = tokio::spawn(async move {
        duplex(proxy_client_side, proxy_target_side, prefix, &task_counters).await
    });
    (client_app, target_app, counters, copy)
}

#[tokio::test]
async fn client_half_close_reaches_the_target_and_the_answer_still_flows_back() {
    let (mut client, mut target, counters, copy) = proxied(b"REQ ").await;
    client.write_all(b"body").await.unwrap();
    client.shutdown().await.unwrap(); // FIN: "that was the whole request"

    // The target sees the replayed prefix, the body, then EOF...
    let mut request = Vec::new();
    within("target sees EOF", target.read_to_end(&mut request))
        .await
        .unwrap();
    assert_eq!(request, b"REQ body");
    // ...and can still answer over the other direction.
    target.write_all(b"response").await.unwrap();
    target.shutdown().await.unwrap();

    let mut response = Vec::new();
    within("client sees EOF", client.read_to_end(&mut response))
        .await
        .unwrap();
    assert_eq!(response, b"response");

    let totals = copy.await.unwrap().unwrap();
    assert_eq!(
        totals,
        Totals {
            client_to_target: 8,
            target_to_client: 8,
            spliced: 0,
        }
    );
    assert_eq!(counters.read.get(), 8, "prefix + body read from the client");
    assert_eq!(counters.written.get(), 8, "response written to the client");
}

#[tokio::test]
async fn target_half_close_does_not_cut_the_client_upload() {
    let (mut client, mut target, _counters, copy) = proxied(b"").await;
    // A server-speaks-first target greets and half-closes at once.
    target.write_all(b"220 hello\r\n").await.unwrap();
    target.shutdown().await.unwrap();
    let mut greeting = Vec::new();
    within("client sees EOF", client.read_to_end(&mut greeting))
        .await
        .unwrap();
    assert_eq!(greeting, b"220 hello\r\n");

    // The client keeps sending after the target's FIN; every byte arrives.
    for _ in 0..100 {
        client.write_all(&[7; 1000]).await.unwrap();
    }
    client.shutdown().await.unwrap();
    let mut upload = Vec::new();
    within("target sees EOF", target.read_to_end(&mut upload))
        .await
        .unwrap();
    assert_eq!(upload.len(), 100_000);
    assert!(upload.iter().all(|&b| b == 7));
    copy.await.unwrap().unwrap();
}

/// A reproducible byte stream (xorshift), so both ends can agree on its content.
struct Stream(u64);

impl Stream {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
    }
}

/// FNV-1a, enough to compare what was sent with what arrived.
fn fnv(hash: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *hash ^= u64::from(b);
        *hash = hash.wrapping_mul(0x100_0000_01b3);
    }
}

async fn send(mut w: impl AsyncWrite + Unpin, seed: u64, len: usize) -> u64 {
    let (mut stream, mut hash, mut buf) = (Stream(seed), 0xcbf2_9ce4_8422_2325, vec![0; 7777]);
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        stream.fill(&mut buf[..n]);
        fnv(&mut hash, &buf[..n]);
        w.write_all(&buf[..n]).await.unwrap();
        left -= n;
    }
    w.shutdown().await.unwrap();
    hash
}

async fn receive(mut r: impl AsyncRead + Unpin) -> (u64, usize) {
    let (mut hash, mut buf, mut len) = (0xcbf2_9ce4_8422_2325, vec![0; 5003], 0);
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            return (hash, len);
        }
        fnv(&mut hash, &buf[..n]);
        len += n;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfers_both_ways_arrive_intact() {
    const UP: usize = 24 << 20;
    const DOWN: usize = 16 << 20 | 12345;
    let (client, target, counters, copy) = proxied(b"").await;
    let (client_r, client_w) = client.into_split();
    let (target_r, target_w) = target.into_split();

    let (sent_up, (got_up, len_up), sent_down, (got_down, len_down)) = within("transfers", async {
        tokio::join!(
            send(client_w, 1, UP),
            receive(target_r),
            send(target_w, 2, DOWN),
            receive(client_r),
        )
    })
    .await;
    assert_eq!(len_up, UP);
    assert_eq!(got_up, sent_up, "client -> target corrupted");
    assert_eq!(len_down, DOWN);
    assert_eq!(got_down, sent_down, "target -> client corrupted");

    let totals = copy.await.unwrap().unwrap();
    assert_eq!(totals.client_to_target, UP as u64);
    assert_eq!(totals.target_to_client, DOWN as u64);
    assert_eq!(counters.read.get(), UP as u64);
    assert_eq!(counters.written.get(), DOWN as u64);
}

#[tokio::test]
async fn a_reset_target_ends_the_copy_with_its_error() {
    let (mut client, target, _counters, copy) = proxied(b"").await;
    // SO_LINGER 0: closing sends RST instead of FIN (and cannot block, with 0).
    socket2::SockRef::from(&target)
        .set_linger(Some(std::time::Duration::ZERO))
        .unwrap();
    drop(target);
    let err = within("copy ends", copy).await.unwrap().expect_err("reset");
    assert_eq!(err.side, Side::Target);
    assert_eq!(err.source.kind(), io::ErrorKind::ConnectionReset);
    // The client's connection is closed as well.
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
}

// --- Between two TCP sockets, with splice(2) ---

/// Like [`proxied`], through [`duplex_tcp_with`] and the given pipe factory.
async fn spliced(
    pipes: &'static (dyn Fn() -> io::Result<Pipe> + Sync),
) -> (
    TcpStream,
    TcpStream,
    Counters,
    tokio::task::JoinHandle<Result<Totals, DuplexError>>,
) {
    let (client_app, proxy_client_side) = socket_pair().await;
    let (proxy_target_side, target_app) = socket_pair().await;
    let counters = Counters::default();
    let task_counters = counters.clone();
    let copy = tokio::spawn(async move {
        duplex_tcp_with(
            proxy_client_side,
            proxy_target_side,
            Vec::new(),
            &task_counters,
            pipes,
        )
        .await
    });
    (client_app, target_app, counters, copy)
}

/// Sends `up` bytes client -> target and `down` bytes target -> client at once, checks
/// both arrive intact, and returns the copy's totals after checking them and the
/// counters against what was sent.
async fn transfer_both_ways(
    pipes: &'static (dyn Fn() -> io::Result<Pipe> + Sync),
    up: usize,
    down: usize,
) -> Totals {
    let (client, target, counters, copy) = spliced(pipes).await;
    let (client_r, client_w) = client.into_split();
    let (target_r, target_w) = target.into_split();
    let (sent_up, (got_up, len_up), sent_down, (got_down, len_down)) = within("transfers", async {
        tokio::join!(
            send(client_w, 3, up),
            receive(target_r),
            send(target_w, 4, down),
            receive(client_r),
        )
    })
    .await;
    assert_eq!((len_up, got_up), (up, sent_up), "client -> target");
    assert_eq!((len_down, got_down), (down, sent_down), "target -> client");
    let totals = copy.await.unwrap().unwrap();
    assert_eq!(totals.client_to_target, up as u64);
    assert_eq!(totals.target_to_client, down as u64);
    assert_eq!(counters.read.get(), up as u64, "bytes read from the client");
    assert_eq!(counters.written.get(), down as u64, "bytes written to it");
    totals
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_bytes_are_spliced_and_counted_exactly() {
    const UP: usize = 24 << 20;
    const DOWN: usize = 16 << 20 | 12345;
    let totals = transfer_both_ways(&Pipe::new, UP, DOWN).await;
    // Only the reads before the first one that filled a 4 KiB buffer are copied.
    assert!(
        totals.spliced >= (UP + DOWN - 2 * 64 * 1024) as u64,
        "{totals:?}"
    );
}

#[tokio::test]
async fn small_exchanges_are_copied_without_a_pipe() {
    fn no_pipe() -> io::Result<Pipe> {
        panic!("a pipe was made for a small exchange")
    }
    let (mut client, mut target, counters, copy) = spliced(&no_pipe).await;
    client.write_all(b"ping").await.unwrap();
    let mut ping = [0; 4];
    target.read_exact(&mut ping).await.unwrap();
    target.write_all(b"pong").await.unwrap();
    let mut pong = [0; 4];
    client.read_exact(&mut pong).await.unwrap();
    drop((client, target));
    let totals = within("copy ends", copy).await.unwrap().unwrap();
    assert_eq!((totals.spliced, counters.read.get()), (0, 4));
}

/// Out of descriptors for a pipe: the direction goes on copying, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_pipe_bulk_bytes_are_copied() {
    fn emfile() -> io::Result<Pipe> {
        Err(io::Error::from_raw_os_error(nix::libc::EMFILE))
    }
    let totals = transfer_both_ways(&emfile, 3 << 20, 2 << 20 | 77).await;
    assert_eq!(totals.spliced, 0);
}

/// The kernel refuses the splice (here: neither descriptor is a pipe, `EINVAL`): the
/// direction goes on copying, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_splice_falls_back_to_copying() {
    fn not_a_pipe() -> io::Result<Pipe> {
        let null = || std::fs::File::options().write(true).open("/dev/null");
        Ok(Pipe::from_fds(null()?.into(), null()?.into()))
    }
    let totals = transfer_both_ways(&not_a_pipe, 3 << 20, 2 << 20 | 77).await;
    assert_eq!(totals.spliced, 0);
}

#[tokio::test]
async fn spliced_client_half_close_reaches_the_target_and_the_answer_still_flows_back() {
    let (client, target, counters, copy) = spliced(&Pipe::new).await;
    let (client_r, client_w) = client.into_split();
    let (target_r, target_w) = target.into_split();
    // The client sends its whole request, then FIN...
    let (sent, (got, len)) = within("request", async {
        tokio::join!(send(client_w, 5, 1 << 20), receive(target_r))
    })
    .await;
    assert_eq!(
        (got, len),
        (sent, 1 << 20),
        "the target saw the request and EOF"
    );
    // ...and the target answers after it has seen the EOF.
    let (sent, (got, len)) = within("response", async {
        tokio::join!(send(target_w, 6, 1 << 20), receive(client_r))
    })
    .await;
    assert_eq!(
        (got, len),
        (sent, 1 << 20),
        "the client got the answer and EOF"
    );
    let totals = copy.await.unwrap().unwrap();
    assert!(totals.spliced > 1 << 20, "{totals:?}");
    assert_eq!(counters.read.get(), 1 << 20);
    assert_eq!(counters.written.get(), 1 << 20);
}

#[tokio::test]
async fn spliced_target_half_close_does_not_cut_the_client_upload() {
    let (client, target, counters, copy) = spliced(&Pipe::new).await;
    let (client_r, client_w) = client.into_split();
    let (target_r, target_w) = target.into_split();
    // The target sends everything and half-closes first...
    let (sent, (got, len)) = within("download", async {
        tokio::join!(send(target_w, 7, 1 << 20), receive(client_r))
    })
    .await;
    assert_eq!((got, len), (sent, 1 << 20));
    // ...and the client's upload after that still arrives whole.
    let (sent, (got, len)) = within("upload", async {
        tokio::join!(send(client_w, 8, 1 << 20), receive(target_r))
    })
    .await;
    assert_eq!((got, len), (sent, 1 << 20));
    let totals = copy.await.unwrap().unwrap();
    assert!(totals.spliced > 1 << 20, "{totals:?}");
    assert_eq!(counters.read.get(), 1 << 20);
    assert_eq!(counters.written.get(), 1 << 20);
}

/// A client that resets while the target's bytes are being spliced to it: the copy
/// ends with the client's errno, as the copy loop's does, and the bytes already moved
/// stay counted.
#[tokio::test]
async fn a_reset_mid_splice_ends_the_copy_with_its_errno() {
    static PIPES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    fn counted() -> io::Result<Pipe> {
        PIPES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Pipe::new()
    }
    let (mut client, mut target, counters, copy) = spliced(&counted).await;
    // The target streams far more than the sockets and the pipe hold.
    let streaming = tokio::spawn(async move {
        let chunk = vec![9; 64 * 1024];
        while target.write_all(&chunk).await.is_ok() {}
    });
    let mut got = vec![0; 256 * 1024];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(
        PIPES.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "splicing"
    );
    socket2::SockRef::from(&client)
        .set_linger(Some(std::time::Duration::ZERO))
        .unwrap();
    drop(client);
    let err = within("copy ends", copy).await.unwrap().expect_err("reset");
    assert_eq!(err.side, Side::Client);
    let errno = crate::metrics::errno_name(&err.source);
    assert!(["ECONNRESET", "EPIPE"].contains(&errno.as_str()), "{err}");
    assert!(counters.written.get() >= got.len() as u64);
    assert!(counters.read.get() == 0);
    streaming.abort();
}

/// The pipe's size as the kernel reports it, not as `Pipe` remembers it.
fn kernel_pipe_size(fd: &impl std::os::fd::AsRawFd) -> usize {
    let held = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETPIPE_SZ).unwrap();
    usize::try_from(held).unwrap()
}

/// A budget of its own, so that pipes other tests open at the same time do not count.
fn budget(max: usize) -> &'static splice::Budget {
    Box::leak(Box::new(splice::Budget::new(max)))
}

#[test]
fn pipes_are_grown_to_pipe_size() {
    let pipe = Pipe::within(budget(1)).unwrap();
    assert_eq!(pipe.capacity(), splice::PIPE_SIZE);
    assert_eq!(kernel_pipe_size(pipe.write_end()), splice::PIPE_SIZE);
}

/// Past the budget, pipes keep the default size (the uid's pipe pages are shared by all
/// its pipes: see the module doc of `splice`), and a slot given back is used again.
#[test]
fn only_the_budgets_number_of_pipes_are_grown_at_once() {
    let budget = budget(2);
    let mut pipes: Vec<Pipe> = (0..4).map(|_| Pipe::within(budget).unwrap()).collect();
    let sizes: Vec<usize> = pipes
        .iter()
        .map(|p| kernel_pipe_size(p.write_end()))
        .collect();
    let (big, default) = (splice::PIPE_SIZE, 64 * 1024);
    assert_eq!(sizes, [big, big, default, default]);
    pipes.remove(0);
    pipes.remove(2);
    let again = Pipe::within(budget).unwrap();
    assert_eq!(
        kernel_pipe_size(again.write_end()),
        big,
        "a grown pipe's slot came back"
    );
    let over = Pipe::within(budget).unwrap();
    assert_eq!(kernel_pipe_size(over.write_end()), default);
}

/// The kernel refuses to shrink a pipe below what it holds (`EBUSY`): the pipe keeps,
/// and reports, the size it has.
#[test]
fn a_refused_resize_keeps_the_size_the_pipe_has() {
    let pipe = Pipe::with_size(256 * 1024).unwrap();
    let held = vec![1; 128 * 1024];
    assert_eq!(
        nix::unistd::write(pipe.write_end(), &held).unwrap(),
        held.len()
    );
    assert_eq!(pipe.resize_to(4096), 256 * 1024);
    assert_eq!(kernel_pipe_size(pipe.write_end()), 256 * 1024);
}

/// Descriptors that are no pipe: no size to set or read, the default is assumed (and
/// splice will refuse them: see `a_refused_splice_falls_back_to_copying`).
#[test]
fn a_non_pipe_gets_the_default_size() {
    let null = std::fs::File::options()
        .write(true)
        .open("/dev/null")
        .unwrap();
    let not_a_pipe = Pipe::from_fds(null.try_clone().unwrap().into(), null.into());
    assert_eq!(not_a_pipe.capacity(), 64 * 1024);
}

/// A pipe that could not grow (here: one page) moves every byte in smaller steps, with
/// exact counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_page_pipe_still_splices_every_byte() {
    fn one_page() -> io::Result<Pipe> {
        let pipe = Pipe::with_size(4096)?;
        assert_eq!(pipe.capacity(), 4096);
        Ok(pipe)
    }
    let totals = transfer_both_ways(&one_page, 3 << 20, 2 << 20 | 77).await;
    assert!(totals.spliced >= (5 << 20) - 2 * 64 * 1024, "{totals:?}");
}

/// Half-close with the large pipe: several MiB each way, the request's FIN reaching the
/// target only after every byte of it, counters exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_pipe_half_close_keeps_counters_exact() {
    let (client, target, counters, copy) = spliced(&Pipe::new).await;
    let (client_r, client_w) = client.into_split();
    let (target_r, target_w) = target.into_split();
    const UP: usize = 9 << 20 | 4321;
    const DOWN: usize = 7 << 20 | 99;
    let (sent, (got, len)) = within("request", async {
        tokio::join!(send(client_w, 11, UP), receive(target_r))
    })
    .await;
    assert_eq!((got, len), (sent, UP), "the whole request, then EOF");
    let (sent, (got, len)) = within("response", async {
        tokio::join!(send(target_w, 12, DOWN), receive(client_r))
    })
    .await;
    assert_eq!((got, len), (sent, DOWN), "the whole response, then EOF");
    let totals = copy.await.unwrap().unwrap();
    assert_eq!(
        (totals.client_to_target, totals.target_to_client),
        (UP as u64, DOWN as u64)
    );
    assert!(
        totals.spliced >= (UP + DOWN - 2 * 64 * 1024) as u64,
        "{totals:?}"
    );
    assert_eq!(counters.read.get(), UP as u64);
    assert_eq!(counters.written.get(), DOWN as u64);
}
