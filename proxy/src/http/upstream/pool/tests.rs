use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::Response;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::*;
use crate::http::upstream::Endpoint;

/// Connections a test server accepted and saw closed.
#[derive(Default)]
struct Seen {
    accepted: AtomicUsize,
    closed: AtomicUsize,
}

/// A hyper server (HTTP/2 when `http2`) answering `ok`, each answer waiting for a
/// permit of `gate`; with `close`, HTTP/1 connections close after one response.
async fn server(http2: bool, close: bool, gate: Arc<Semaphore>) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let counts = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            counts.accepted.fetch_add(1, Ordering::SeqCst);
            let counts = counts.clone();
            let gate = gate.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req| {
                    let gate = gate.clone();
                    async move {
                        let _permit = gate.acquire().await.unwrap();
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let io = TokioIo::new(stream);
                if http2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(!close)
                        .serve_connection(io, service)
                        .await;
                }
                counts.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, seen)
}

fn open_gate() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(Semaphore::MAX_PERMITS))
}

fn key(addr: SocketAddr, version: Version) -> Key {
    Key {
        endpoint: Endpoint::plain(addr),
        version,
    }
}

type TestPool = Pool<Full<Bytes>>;

async fn get(pool: &Arc<TestPool>, key: &Key) {
    let request = Request::get("/")
        .header("host", "pool.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = pool.send(key.clone(), request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
}

/// Waits (a few seconds at most) until `done` holds.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn http1_connections_are_reused_then_closed_after_the_idle_timeout() {
    let (addr, seen) = server(false, false, open_gate()).await;
    let pool = TestPool::new(Duration::from_secs(1), None);
    let key = key(addr, Version::Http1);
    for _ in 0..3 {
        get(&pool, &key).await;
        // Back in the pool once the response has been read to its end.
        eventually("checked in", || pool.counts().0 == 1).await;
    }
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);

    pool.reap_idle(Instant::now() + IDLE_TIMEOUT);
    assert_eq!(pool.counts().0, 0);
    eventually("the idle connection closed", || {
        seen.closed.load(Ordering::SeqCst) == 1
    })
    .await;
    get(&pool, &key).await;
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_connection_the_server_closes_is_not_reused() {
    let (addr, seen) = server(false, true, open_gate()).await;
    let pool = TestPool::new(Duration::from_secs(1), None);
    let key = key(addr, Version::Http1);
    for n in 1..=5 {
        get(&pool, &key).await;
        assert_eq!(seen.accepted.load(Ordering::SeqCst), n);
    }
}

#[tokio::test]
async fn idle_http1_connections_per_key_are_capped() {
    let gate = Arc::new(Semaphore::new(0));
    let (addr, seen) = server(false, false, gate.clone()).await;
    let pool = TestPool::new(Duration::from_secs(1), None);
    let key = key(addr, Version::Http1);
    let wanted = MAX_IDLE_PER_KEY + 6;
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..wanted {
        let (pool, key) = (pool.clone(), key.clone());
        requests.spawn(async move { get(&pool, &key).await });
    }
    // Every request in flight at once: one connection each.
    eventually("all connected", || {
        seen.accepted.load(Ordering::SeqCst) == wanted
    })
    .await;
    gate.add_permits(wanted);
    while let Some(done) = requests.join_next().await {
        done.unwrap();
    }
    eventually("the surplus closed", || {
        seen.closed.load(Ordering::SeqCst) == wanted - MAX_IDLE_PER_KEY
    })
    .await;
    assert_eq!(pool.counts().0, MAX_IDLE_PER_KEY);
}

#[tokio::test]
async fn http2_requests_share_one_connection_opened_once() {
    let gate = Arc::new(Semaphore::new(0));
    let (addr, seen) = server(true, false, gate.clone()).await;
    let pool = TestPool::new(Duration::from_secs(1), None);
    let key = key(addr, Version::Http2);
    let mut requests = tokio::task::JoinSet::new();
    // Concurrent first requests: they wait for one connection instead of each
    // opening their own.
    for _ in 0..20 {
        let (pool, key) = (pool.clone(), key.clone());
        requests.spawn(async move { get(&pool, &key).await });
    }
    gate.add_permits(20);
    while let Some(done) = requests.join_next().await {
        done.unwrap();
    }
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(pool.counts().1, 1);

    // Unused for the idle timeout: dropped, and the connection closes.
    pool.reap_idle(Instant::now() + IDLE_TIMEOUT);
    assert_eq!(pool.counts().1, 0);
    eventually("the HTTP/2 connection closed", || {
        seen.closed.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test]
async fn http2_connections_are_capped_and_the_least_recently_used_goes_first() {
    const MAX: usize = 3;
    let pool = TestPool::with_max_h2(Duration::from_secs(1), None, MAX);
    let mut servers = Vec::new();
    for _ in 0..MAX + 2 {
        servers.push(server(true, false, open_gate()).await);
    }
    let keys: Vec<Key> = servers
        .iter()
        .map(|(addr, _)| key(*addr, Version::Http2))
        .collect();
    for key in &keys[..MAX] {
        get(&pool, key).await;
    }
    // The first is used again: the second is now the least recently used.
    get(&pool, &keys[0]).await;
    for key in &keys[MAX..] {
        get(&pool, key).await;
    }
    assert_eq!(pool.counts().1, MAX);
    let closed = |i: usize| servers[i].1.closed.load(Ordering::SeqCst);
    eventually("the two least recently used closed", || {
        closed(1) == 1 && closed(2) == 1
    })
    .await;
    assert_eq!(closed(0), 0);
    // An evicted destination simply gets a new connection.
    get(&pool, &keys[1]).await;
    assert_eq!(servers[1].1.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(pool.counts().1, MAX);
}

#[tokio::test]
async fn a_refused_connect_is_a_proxy_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let pool = TestPool::new(Duration::from_secs(1), None);
    let request = Request::get("/").body(Full::new(Bytes::new())).unwrap();
    let error = pool
        .send(key(addr, Version::Http1), request)
        .await
        .unwrap_err();
    assert_eq!(error.cause(), "connection refused");
}

/// A request body that never ends, counting the bytes the pool took from it.
struct Endless(Arc<AtomicUsize>);

static CHUNK: [u8; 16 * 1024] = [0; 16 * 1024];

impl hyper::body::Body for Endless {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.0.fetch_add(CHUNK.len(), Ordering::SeqCst);
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
            &CHUNK,
        )))))
    }
}

/// A hostile HTTP/2 destination: it grants the largest window there is, then never
/// reads its socket (whose receive buffer is kept small), so the request bodies sent
/// to it stay in the client's buffers.
async fn stalled_destination() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(16).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let max = 0x7fff_ffffu32;
        // SETTINGS: INITIAL_WINDOW_SIZE = 2^31 - 1; WINDOW_UPDATE of the connection to it.
        let mut frames = vec![0, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 0x4];
        frames.extend_from_slice(&max.to_be_bytes());
        frames.extend_from_slice(&[0, 0, 4, 0x8, 0, 0, 0, 0, 0]);
        frames.extend_from_slice(&(max - 65_535).to_be_bytes());
        tokio::io::AsyncWriteExt::write_all(&mut stream, &frames)
            .await
            .unwrap();
        // Holds the connection open, reading nothing.
        std::future::pending::<()>().await;
        drop(stream);
    });
    addr
}

#[tokio::test]
async fn a_destination_that_stops_reading_gets_at_most_the_send_buffer_of_each_stream() {
    const STREAMS: usize = 64;
    let addr = stalled_destination().await;
    let pool = Pool::<Endless>::new(Duration::from_secs(1), None);
    let key = key(addr, Version::Http2);
    let taken = Arc::new(AtomicUsize::new(0));
    let mut sends = Vec::new();
    for _ in 0..STREAMS {
        let request = Request::post("/upload")
            .header("host", "pool.test")
            .body(Endless(taken.clone()))
            .unwrap();
        let pool = pool.clone();
        let key = key.clone();
        sends.push(tokio::spawn(async move { pool.send(key, request).await }));
    }
    // Until the bodies stop being taken: the socket buffers and h2's are full.
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = taken.load(Ordering::SeqCst);
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    for send in &sends {
        send.abort();
    }
    // Each stream's send buffer, plus what the kernel's socket buffers took (the
    // sender's, autotuned up to tcp_wmem's 4 MiB on loopback) and a chunk per stream in
    // hand. With h2's default (400 KiB per stream) 23 MiB were taken.
    let bound = STREAMS * (crate::http::server::MAX_SEND_BUFFER + 2 * CHUNK.len()) + (8 << 20);
    assert!(
        last <= bound,
        "{} KiB taken from the bodies, bound {} KiB",
        last >> 10,
        bound >> 10
    );
}
