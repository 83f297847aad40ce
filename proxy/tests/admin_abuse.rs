//! The admin server from an attacker's side: floods of connections, clients that never
//! send a request, and many concurrent scrapes of a large `/metrics` must not stop a
//! legitimate scrape, nor slow the proxy's forwarding, beyond a bound.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshproxy::{BoundAddrs, Config, Direction, Metrics, Protocol, Proxy, ProxyArgs, ServerError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Running {
    addrs: BoundAddrs,
    metrics: Arc<Metrics>,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

async fn start(target: SocketAddr) -> Running {
    let args = ProxyArgs {
        inbound_addr: Some("127.0.0.1:0".into()),
        outbound_addr: Some("127.0.0.1:0".into()),
        admin_addr: Some("127.0.0.1:0".into()),
        ..ProxyArgs::default()
    };
    let config = Config::from_sources(&args, &HashMap::new(), None).unwrap();
    let proxy = Proxy::bind(config).await.unwrap();
    let addrs = proxy.local_addrs();
    let metrics = proxy.metrics();
    let (shutdown, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy.serve_with(move |_| Ok(target), async {
        let _ = rx.await;
    }));
    Running {
        addrs,
        metrics,
        shutdown,
        task,
    }
}

async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                tokio::io::copy(&mut r, &mut w).await
            });
        }
    });
    addr
}

/// GET `path`: the whole response, or `None` if the server closed without one.
async fn try_get(admin: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(admin).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.starts_with("HTTP/1.1 200 OK").then_some(response)
}

/// Whether the server closes `stream` within `within` (EOF or reset).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_excess_admin_connections_cannot_lock_out_a_scrape() {
    let proxy = start(echo_server().await).await;
    let admin = proxy.addrs.admin;

    // An attacker takes every admin slot with connections that never send a request.
    let mut silent = Vec::new();
    for _ in 0..64 {
        silent.push(TcpStream::connect(admin).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Past the cap, its further connections are closed at once rather than queued.
    let mut excess = Vec::new();
    for _ in 0..100 {
        excess.push(TcpStream::connect(admin).await.unwrap());
    }
    for stream in &mut excess {
        assert!(
            closed_within(stream, Duration::from_millis(500)).await,
            "an admin connection past the cap was kept open"
        );
    }

    // A scraper retrying (as Prometheus does at its next interval, only faster) gets
    // through once the silent connections time out: within the 2 s head timeout.
    let started = Instant::now();
    let scrape = loop {
        if let Some(response) = try_get(admin, "/metrics").await {
            break response;
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "locked out of /metrics"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(scrape.contains("# TYPE tcp_open_total counter"));
    eprintln!("scrape served after {:?}", started.elapsed());
    for stream in &mut silent {
        assert!(
            closed_within(stream, Duration::from_secs(3)).await,
            "a silent admin client kept its slot"
        );
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_scrapes_of_a_large_output_do_not_stall_forwarding() {
    let proxy = start(echo_server().await).await;
    // A large /metrics: every connection label set the cap allows.
    for n in 0..2048u32 {
        let target = SocketAddr::from(([198, 18, (n >> 8) as u8, n as u8], 10_000));
        drop(
            proxy
                .metrics
                .open(Direction::Inbound, target, Protocol::Http1, None),
        );
    }
    let started = Instant::now();
    let size = proxy.metrics.encode().len();
    let encode = started.elapsed();

    // A client with a connection through the proxy, kept open: round trips measure
    // only the forwarding path.
    let mut client = TcpStream::connect(proxy.addrs.outbound[0]).await.unwrap();
    client.set_nodelay(true).unwrap();
    let round_trip = async |client: &mut TcpStream| {
        let started = Instant::now();
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).await.unwrap();
        started.elapsed()
    };
    round_trip(&mut client).await;
    let mut idle = Duration::ZERO;
    for _ in 0..20 {
        idle = idle.max(round_trip(&mut client).await);
    }

    // 16 scrapers in a loop for 1.5 s, on a runtime of their own (another process,
    // in reality): the proxy's workers serve them but do not also run them.
    let stop = Arc::new(AtomicBool::new(false));
    let admin = proxy.addrs.admin;
    let scrapers = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let scrapers: Vec<_> = (0..16)
                    .map(|_| {
                        let stop = stop.clone();
                        tokio::spawn(async move {
                            let mut served = 0;
                            while !stop.load(Ordering::Relaxed) {
                                if let Some(response) = try_get(admin, "/metrics").await {
                                    assert!(response.len() > size);
                                    served += 1;
                                }
                            }
                            served
                        })
                    })
                    .collect();
                let mut scrapes = 0;
                for scraper in scrapers {
                    scrapes += scraper.await.unwrap();
                }
                scrapes
            })
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut loaded = Duration::ZERO;
    let until = Instant::now() + Duration::from_millis(1500);
    let mut trips = 0;
    while Instant::now() < until {
        loaded = loaded.max(round_trip(&mut client).await);
        trips += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let scrapes = tokio::task::spawn_blocking(move || scrapers.join().unwrap())
        .await
        .unwrap();
    eprintln!(
        "/metrics {size} bytes, one encode {encode:?}; round trip idle max {idle:?}, \
         with 16 scrapers max {loaded:?} over {trips} trips; {scrapes} scrapes served"
    );
    assert!(scrapes >= 16, "scrapes were served ({scrapes})");
    // Encodes run on the blocking pool: a round trip never waits for a queue of them.
    // Encoded on the workers, 16 scrapers put a round trip behind many encodes (1.29 s
    // measured); the bound leaves room for a busy 2-core machine, where the blocking
    // pool's encode competes with the workers for the CPUs (53 ms seen at load 7).
    let bound = (encode * 4).max(Duration::from_millis(200));
    assert!(
        loaded < bound,
        "a round trip took {loaded:?} while scrapes ran (one encode: {encode:?})"
    );
    drop(client);
    proxy.stop().await;
}

/// Reads one response with a `Content-Length` body from a kept-alive connection:
/// (head, body).
async fn read_response(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "closed mid-head");
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("a Content-Length")
        .parse()
        .unwrap();
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.unwrap();
    (head, body)
}

/// Scrapes reuse one connection (through the mesh each new one would cost an mTLS
/// handshake), `Accept-Encoding: gzip` gets the same text gzipped, and a client asking
/// to close, or an HTTP/1.0 one, is closed after its response.
#[tokio::test]
async fn scrapes_keep_the_connection_alive_and_get_gzip_when_they_ask() {
    let proxy = start(echo_server().await).await;
    for n in 0..200u32 {
        let target = SocketAddr::from(([198, 18, 7, n as u8], 10_000));
        drop(
            proxy
                .metrics
                .open(Direction::Inbound, target, Protocol::Http1, None),
        );
    }
    let admin = proxy.addrs.admin;
    let mut stream = TcpStream::connect(admin).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n")
        .await
        .unwrap();
    let (head, plain) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("Connection: keep-alive"), "{head}");
    assert!(!head.contains("Content-Encoding"), "{head}");
    let plain = String::from_utf8(plain).unwrap();
    assert!(plain.contains("# TYPE tcp_open_total counter"));

    // The same connection, with Prometheus' Accept-Encoding, pipelined with /ready.
    stream
        .write_all(
            b"GET /metrics HTTP/1.1\r\nHost: admin\r\nAccept-Encoding: gzip\r\n\r\n\
              GET /live HTTP/1.1\r\nHost: admin\r\n\r\n",
        )
        .await
        .unwrap();
    let (head, gzipped) = read_response(&mut stream).await;
    assert!(head.contains("Content-Encoding: gzip"), "{head}");
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(gzipped.as_slice()),
        &mut text,
    )
    .unwrap();
    assert!(text.contains("# TYPE tcp_open_total counter"), "{text}");
    assert!(text.contains("198.18.7.199:10000"));
    assert!(
        gzipped.len() * 4 < plain.len(),
        "gzip {} of {} bytes",
        gzipped.len(),
        plain.len()
    );
    let (head, body) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert_eq!(body, b"live\n");

    // After an idle while, still the same connection.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stream
        .write_all(b"GET /live HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut stream).await;
    assert!(head.contains("Connection: close"), "{head}");
    assert!(closed_within(&mut stream, Duration::from_secs(1)).await);

    let mut old = TcpStream::connect(admin).await.unwrap();
    old.write_all(b"GET /live HTTP/1.0\r\n\r\n").await.unwrap();
    let (head, _) = read_response(&mut old).await;
    assert!(head.contains("Connection: close"), "{head}");
    assert!(closed_within(&mut old, Duration::from_secs(1)).await);
    proxy.stop().await;
}

/// Kept-alive connections waiting for their next request hold no active slot: 200 of
/// them (past both caps) do not keep a scrape out, and those past the idle cap are told
/// `Connection: close` and closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_kept_alive_connections_cannot_lock_out_a_scrape() {
    let proxy = start(echo_server().await).await;
    let admin = proxy.addrs.admin;
    let mut idle = Vec::new();
    let (mut kept, mut closed) = (0, 0);
    for _ in 0..200 {
        let Ok(mut stream) = TcpStream::connect(admin).await else {
            continue;
        };
        if stream
            .write_all(b"GET /live HTTP/1.1\r\nHost: admin\r\n\r\n")
            .await
            .is_err()
        {
            continue;
        }
        // The whole head: one read may return only part of it on a busy machine.
        let mut head = Vec::new();
        let mut buf = [0u8; 512];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        if head.contains("Connection: close") {
            closed += 1;
        } else if head.starts_with("HTTP/1.1 200") {
            kept += 1;
        }
        idle.push(stream);
    }
    // At most 64 (MAX_IDLE) are kept alive; every other answered one is told to close.
    assert!(
        kept <= 64,
        "{kept} connections kept alive past the idle cap"
    );
    assert!(
        kept + closed >= 190,
        "only {kept} kept and {closed} closed of 200"
    );
    let started = Instant::now();
    let scrape = try_get(admin, "/metrics")
        .await
        .expect("a scrape got through");
    assert!(scrape.contains("# TYPE tcp_open_total counter"));
    assert!(started.elapsed() < Duration::from_secs(1));
    proxy.stop().await;
}
