//! A real Prometheus (Debian's package) scrapes both proxies of the mTLS pair, and what
//! its PromQL API says about `tcp_write_bytes_total` agrees with the bytes the test
//! sent. Prometheus runs in pod B: it scrapes B's proxy over loopback and A's proxy
//! through the mesh (B's outbound proxy, mTLS, A's inbound proxy), with keep-alive and
//! gzip as Prometheus asks for them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use netns_tests::mesh::Mesh;
use netns_tests::{Family, Pods};

/// Prometheus' HTTP API, inside pod B.
const PROMETHEUS: &str = "127.0.0.1:9090";
/// An opaque port (in the default list), so no detection waits for a first byte.
const PORT: u16 = 3306;
/// What the server in pod B sends to the client in pod A.
const BYTES: usize = 1 << 20;

/// Percent-encodes a PromQL query for a URL.
fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET path` from Prometheus in pod B: the body.
fn get(pods: &Pods, path: &str) -> Option<String> {
    pods.peer.run(|| {
        let mut stream = TcpStream::connect(PROMETHEUS).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: prometheus\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_string())
    })
}

/// The result vector of an instant query: (labels, value) per series.
fn query(pods: &Pods, promql: &str) -> Vec<(serde_json::Value, f64)> {
    let Some(body) = get(pods, &format!("/api/v1/query?query={}", encode(promql))) else {
        return Vec::new();
    };
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    json["data"]["result"]
        .as_array()
        .map(|series| {
            series
                .iter()
                .filter_map(|s| {
                    let value = s["value"][1].as_str()?.parse().ok()?;
                    Some((s["metric"].clone(), value))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `promql` until every series it returns satisfies `ok` and there are `count`
/// of them; returns them.
#[track_caller]
fn wait_for(
    pods: &Pods,
    promql: &str,
    count: usize,
    ok: impl Fn(f64) -> bool,
) -> Vec<(serde_json::Value, f64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let result = query(pods, promql);
        if result.len() == count && result.iter().all(|(_, v)| ok(*v)) {
            return result;
        }
        assert!(
            Instant::now() < deadline,
            "{promql}: {result:?} (want {count} series)"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn prometheus_scrapes_both_proxies_and_promql_agrees_with_the_bytes_sent() {
    let pods = Pods::new("prometheus");
    let mesh = Mesh::new("prometheus", &pods);
    let b = mesh.start_b(&pods, &[]);
    let a = mesh.start_a(&pods, Some(&mesh.peers_of_a), &[]);

    let config = mesh.scratch.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: meshproxy\n    static_configs:\n\
             \x20     - targets: ['127.0.0.1:4191']\n        labels: {{pod: b}}\n\
             \x20     - targets: ['{}:4191']\n        labels: {{pod: a}}\n",
            Family::V4.pod()
        ),
    )
    .unwrap();
    let mut cmd = pods.peer.command("prometheus");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            mesh.scratch.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={PROMETHEUS}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _prometheus = pods.peer.spawn(cmd);

    // Both proxies are up for Prometheus: A's through the mesh.
    wait_for(&pods, "up == 1", 2, |v| v == 1.0);

    // A server in pod B that sends BYTES once the client says "go"; the client in pod
    // A connects first, so both proxies expose the connection's series at 0 before
    // any byte moves, and rate() sees the counter rise from 0.
    let target = SocketAddr::new(Family::V4.peer(), PORT);
    let listener = pods
        .peer
        .run(|| TcpListener::bind(("0.0.0.0", PORT)).unwrap());
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut go = [0u8; 2];
        stream.read_exact(&mut go).unwrap();
        stream.write_all(&vec![b'x'; BYTES]).unwrap();
    });
    let mut client = pods.pod.run(|| TcpStream::connect(target).unwrap());
    let series = format!("tcp_write_bytes_total{{target_addr=\"{target}\",tls=\"true\"}}");
    let zero = wait_for(&pods, &series, 2, |v| v == 0.0);
    let directions: Vec<(String, String)> = zero
        .iter()
        .map(|(m, _)| {
            (
                m["pod"].as_str().unwrap_or("").to_string(),
                m["direction"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(
        directions.contains(&("a".into(), "outbound".into()))
            && directions.contains(&("b".into(), "inbound".into())),
        "{directions:?}"
    );
    // A few scrapes at 0, so the rate's window starts before the bytes.
    std::thread::sleep(Duration::from_secs(3));

    client.write_all(b"go").unwrap();
    let mut received = Vec::new();
    client.read_to_end(&mut received).unwrap();
    assert_eq!(received.len(), BYTES);
    server.join().unwrap();

    // Both sides wrote BYTES to their client: B's proxy to A's, A's to the application.
    wait_for(&pods, &series, 2, |v| v == BYTES as f64);
    // And the rate over the last minute, times the minute, is those bytes (within
    // Prometheus' extrapolation to the window's end, less than one scrape interval).
    std::thread::sleep(Duration::from_secs(2));
    let rate = query(&pods, &format!("sum by (pod) (rate({series}[1m])) * 60"));
    assert_eq!(rate.len(), 2, "{rate:?}\n{}\n{}", a.report(), b.report());
    for (labels, bytes) in &rate {
        let ratio = bytes / BYTES as f64;
        assert!(
            (0.9..1.3).contains(&ratio),
            "{labels}: rate * 60 s = {bytes}, sent {BYTES}"
        );
    }
}
