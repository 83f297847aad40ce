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
            target_to_client: 8
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
