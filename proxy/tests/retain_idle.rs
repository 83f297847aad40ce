//! `--metrics-retain-idle`: its three sources, and the proxy dropping idle label sets
//! from `/metrics` while keeping those with an open connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use meshproxy::{Config, Proxy, ProxyArgs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

#[path = "support/admin.rs"]
mod admin_support;
use admin_support::get_metrics;

#[test]
fn retain_idle_comes_from_the_flag_the_env_or_the_file() {
    let config = |args: ProxyArgs, env: &[(&str, &str)], toml: Option<&str>| {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_sources(&args, &env, toml)
    };
    let default = config(ProxyArgs::default(), &[], None).unwrap();
    assert_eq!(default.metrics_retain_idle, Duration::from_secs(600));
    let toml = Some("metrics_retain_idle = \"2m\"");
    assert_eq!(
        config(ProxyArgs::default(), &[], toml)
            .unwrap()
            .metrics_retain_idle,
        Duration::from_secs(120)
    );
    let env = [("MESHPROXY_METRICS_RETAIN_IDLE", "30s")];
    assert_eq!(
        config(ProxyArgs::default(), &env, toml)
            .unwrap()
            .metrics_retain_idle,
        Duration::from_secs(30)
    );
    let flag = ProxyArgs {
        metrics_retain_idle: Some("500ms".into()),
        ..ProxyArgs::default()
    };
    assert_eq!(
        config(flag, &env, toml).unwrap().metrics_retain_idle,
        Duration::from_millis(500)
    );
    let err = config(
        ProxyArgs::default(),
        &[("MESHPROXY_METRICS_RETAIN_IDLE", "soon")],
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("soon") && err.contains("MESHPROXY_METRICS_RETAIN_IDLE"),
        "{err}"
    );
}

#[tokio::test]
async fn the_proxy_drops_idle_label_sets_but_not_open_ones() {
    // Two echo targets: one connection to `idle` comes and goes, one to `busy` stays.
    let mut targets = Vec::new();
    for _ in 0..2 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        targets.push(listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    tokio::io::copy(&mut r, &mut w).await
                });
            }
        });
    }
    let (idle, busy) = (targets[0], targets[1]);
    let args = ProxyArgs {
        inbound_addr: Some("127.0.0.1:0".into()),
        outbound_addr: Some("127.0.0.1:0".into()),
        admin_addr: Some("127.0.0.1:0".into()),
        metrics_retain_idle: Some("1s".into()),
        // Both targets are opaque: no detection, so nothing waits on a first byte.
        opaque_ports: Some(format!("{},{}", idle.port(), busy.port())),
        ..ProxyArgs::default()
    };
    let config = Config::from_sources(&args, &HashMap::new(), None).unwrap();
    let proxy = Proxy::bind(config).await.unwrap();
    let addrs = proxy.local_addrs();
    // The first connection goes to `busy`, every later one to `idle`.
    let first = std::sync::atomic::AtomicBool::new(true);
    let destination = move |_: &TcpStream| {
        Ok(if first.swap(false, std::sync::atomic::Ordering::Relaxed) {
            busy
        } else {
            idle
        })
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy.serve_with(destination, async {
        let _ = stopped.await;
    }));

    let mut open = TcpStream::connect(addrs.outbound[0]).await.unwrap();
    open.write_all(b"hi").await.unwrap();
    open.read_exact(&mut [0; 2]).await.unwrap();
    let mut closed = TcpStream::connect(addrs.outbound[0]).await.unwrap();
    closed.write_all(b"bye").await.unwrap();
    closed.read_exact(&mut [0; 3]).await.unwrap();
    drop(closed);

    let has = |m: &str, target: SocketAddr| m.contains(&format!("target_addr=\"{target}\""));
    let m = get_metrics(addrs.admin).await;
    assert!(has(&m, idle) && has(&m, busy), "{m}");
    // The idle label set goes once it has been idle for 1 s; the open one stays.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = get_metrics(addrs.admin).await;
        if !has(&m, idle) {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "never dropped:\n{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let busy_open = format!(
        "tcp_open_connections{{direction=\"outbound\",target_addr=\"{busy}\",protocol=\"opaque\",tls=\"false\"}} 1\n"
    );
    assert!(m.contains(&busy_open), "{m}");
    // Still counting.
    open.write_all(b"again").await.unwrap();
    open.read_exact(&mut [0; 5]).await.unwrap();
    drop(open);
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}
