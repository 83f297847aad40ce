use std::path::Path;

use proptest::prelude::*;

use super::Rng;
use super::*;

fn table(text: &str) -> Table {
    Table::build(
        Discovery::parse(Path::new("d.toml"), text).unwrap(),
        &Table::default(),
    )
}

fn two_backends(a: u32, b: u32) -> String {
    format!(
        r#"
        [[service]]
        name = "redis"
        addrs = ["198.18.100.10:6379"]
        [[service.backend]]
        name = "a"
        weight = {a}
        endpoints = [ {{ addr = "198.18.1.2:6379" }} ]
        [[service.backend]]
        name = "b"
        weight = {b}
        endpoints = [ {{ addr = "198.18.2.2:6379" }} ]
        "#
    )
}

fn three_endpoints() -> Table {
    table(
        r#"
        [[service]]
        name = "s"
        addrs = ["198.18.100.10:80"]
        [[service.backend]]
        name = "b"
        weight = 1
        endpoints = [ { addr = "198.18.1.1:80" }, { addr = "198.18.1.2:80" }, { addr = "198.18.1.3:80" } ]
        "#,
    )
}

fn service(table: &Table) -> &Arc<Service> {
    table
        .service("198.18.100.10:80".parse().unwrap())
        .or_else(|| table.service("198.18.100.10:6379".parse().unwrap()))
        .unwrap()
}

#[test]
fn the_table_maps_service_addresses_including_ipv4_mapped_ones() {
    let t = table(&two_backends(1, 1));
    assert!(t.service("198.18.100.10:6379".parse().unwrap()).is_some());
    assert!(t
        .service("[::ffff:198.18.100.10]:6379".parse().unwrap())
        .is_some());
    assert!(t.service("198.18.100.10:6380".parse().unwrap()).is_none());
}

#[test]
fn all_zero_weights_pick_no_backend_and_a_zero_weight_is_never_picked() {
    let t = table(&two_backends(0, 0));
    let mut rng = Rng::seeded(7);
    assert!(service(&t).pick_backend(&mut rng).is_none());
    let t = table(&two_backends(0, 5));
    for _ in 0..1000 {
        assert_eq!(&*service(&t).pick_backend(&mut rng).unwrap().name, "b");
    }
}

#[test]
fn p2c_prefers_the_endpoint_with_fewer_open_connections() {
    let t = three_endpoints();
    let backend = &service(&t).backends[0];
    // Endpoint 0 is busy. The two choices are distinct endpoints, so it is always
    // drawn against an idle one, and loses.
    let _busy: Vec<_> = (0..10)
        .map(|_| backend.endpoints[0].state.opened())
        .collect();
    let mut rng = Rng::seeded(3);
    let now = Instant::now();
    let mut counts = [0; 3];
    for _ in 0..3000 {
        let e = backend
            .pick_endpoint_by(&[], now, &mut rng, Load::Connections)
            .unwrap();
        counts[backend
            .endpoints
            .iter()
            .position(|x| x.addr == e.addr)
            .unwrap()] += 1;
    }
    assert_eq!(counts[0], 0, "{counts:?}");
    assert!(counts[1] > 1200 && counts[2] > 1200, "{counts:?}");
}

#[test]
fn tried_endpoints_are_skipped_and_none_is_left_after_all() {
    let t = three_endpoints();
    let backend = &service(&t).backends[0];
    let mut rng = Rng::seeded(11);
    let now = Instant::now();
    let mut tried = Vec::new();
    for _ in 0..3 {
        let e = backend
            .pick_endpoint_by(&tried, now, &mut rng, Load::Connections)
            .unwrap();
        assert!(!tried.contains(&e.addr));
        tried.push(e.addr);
    }
    assert!(backend
        .pick_endpoint_by(&tried, now, &mut rng, Load::Connections)
        .is_none());
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_that_keeps_failing_is_set_aside_for_the_penalty_then_put_back() {
    let t = three_endpoints();
    let backend = &service(&t).backends[0];
    let bad = &backend.endpoints[0];
    let mut rng = Rng::seeded(5);
    for i in 1..FAILURES_TO_SET_ASIDE {
        assert!(
            !bad.state.failed(Instant::now()),
            "set aside after {i} failures"
        );
    }
    assert!(bad.state.failed(Instant::now()));
    let picks = |rng: &mut Rng| {
        (0..300)
            .filter(|_| {
                backend
                    .pick_endpoint_by(&[], Instant::now(), rng, Load::Connections)
                    .unwrap()
                    .addr
                    == bad.addr
            })
            .count()
    };
    assert_eq!(picks(&mut rng), 0);
    tokio::time::advance(PENALTY - Duration::from_millis(1)).await;
    assert_eq!(picks(&mut rng), 0);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(picks(&mut rng) > 0, "put back after the penalty");
    // Still on probation: one more failure sets it aside again; a success clears it.
    assert!(bad.state.failed(Instant::now()));
    assert!(!bad.state.is_ready(Instant::now()));
    bad.state.succeeded();
    assert!(bad.state.is_ready(Instant::now()));
    assert!(!bad.state.failed(Instant::now()));
}

#[tokio::test(start_paused = true)]
async fn all_set_aside_are_used_anyway() {
    let t = three_endpoints();
    let backend = &service(&t).backends[0];
    for e in &backend.endpoints {
        for _ in 0..FAILURES_TO_SET_ASIDE {
            e.state.failed(Instant::now());
        }
    }
    let mut rng = Rng::seeded(9);
    assert!(backend
        .pick_endpoint_by(&[], Instant::now(), &mut rng, Load::Connections)
        .is_some());
    // Though an untried ready endpoint is still preferred over set-aside ones.
    backend.endpoints[2].state.succeeded();
    let tried = [backend.endpoints[0].addr];
    for _ in 0..50 {
        let e = backend
            .pick_endpoint_by(&tried, Instant::now(), &mut rng, Load::Connections)
            .unwrap();
        assert_eq!(e.addr, backend.endpoints[2].addr);
    }
}

#[test]
fn endpoint_state_survives_a_reload() {
    let before = table(&two_backends(1, 1));
    let state = service(&before).backends[0].endpoints[0].state.clone();
    let _open = state.opened();
    let after = Table::build(
        Discovery::parse(Path::new("d.toml"), &two_backends(0, 1)).unwrap(),
        &before,
    );
    assert_eq!(service(&after).backends[0].endpoints[0].state.open(), 1);
}

/// Writes `text` to `path` the way a node agent should: a new file renamed over.
fn write(path: &Path, text: &str) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_change_is_seen_after_the_check_interval_and_an_invalid_one_is_counted_and_ignored() {
    let dir = std::env::temp_dir().join(format!("meshproxy-balance-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("discovery.toml");
    write(&path, &two_backends(100, 0));
    let metrics = Arc::new(Metrics::new());
    let balancer = Balancer::new(&path, false, metrics.clone()).unwrap();
    let weights = |b: &Balancer| -> Vec<u32> {
        service(&b.table())
            .backends
            .iter()
            .map(|b| b.weight)
            .collect()
    };
    assert_eq!(weights(&balancer), [100, 0]);

    write(&path, &two_backends(0, 100));
    // Within the interval the file is not even looked at.
    tokio::time::advance(CHECK_INTERVAL / 2).await;
    assert_eq!(weights(&balancer), [100, 0]);
    tokio::time::advance(CHECK_INTERVAL / 2).await;
    assert_eq!(weights(&balancer), [0, 100]);

    write(
        &path,
        &two_backends(0, 100).replace("weight = 0", "weight = -3"),
    );
    tokio::time::advance(CHECK_INTERVAL).await;
    assert_eq!(weights(&balancer), [0, 100]);
    let text = metrics.encode();
    assert!(
        text.contains(r#"discovery_updates_total{result="ok"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"discovery_updates_total{result="invalid"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"balancer_endpoints{service="redis",backend="b",state="ready"} 1"#),
        "{text}"
    );
    // The invalid version is not re-read until the file changes again.
    tokio::time::advance(CHECK_INTERVAL).await;
    balancer.table();
    assert!(metrics
        .encode()
        .contains(r#"discovery_updates_total{result="invalid"} 1"#));

    // Set aside endpoints are reported as failed.
    let t = balancer.table();
    for _ in 0..FAILURES_TO_SET_ASIDE {
        service(&t).backends[1].endpoints[0]
            .state
            .failed(Instant::now());
    }
    let text = metrics.encode();
    assert!(
        text.contains(r#"balancer_endpoints{service="redis",backend="b",state="failed"} 1"#),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_identity_without_mtls_is_an_error_naming_the_endpoint() {
    let dir = std::env::temp_dir().join(format!("meshproxy-balance-id-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("discovery.toml");
    write(
        &path,
        &two_backends(1, 1).replace(
            r#"{ addr = "198.18.2.2:6379" }"#,
            r#"{ addr = "198.18.2.2:6379", identity = "b.mesh.local" }"#,
        ),
    );
    let err = Balancer::check(&path, false).unwrap_err().to_string();
    assert!(
        err.contains("198.18.2.2:6379") && err.contains("--identity-cert"),
        "{err}"
    );
    assert!(Balancer::check(&path, true).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

proptest! {
    /// Over many picks each backend's share is its weight's share, within 3
    /// percentage points (10,000 picks: the standard deviation is at most 0.5 points,
    /// so this is six of them: a correct picker fails it about once in 10^9 checks).
    #[test]
    fn weights_are_honoured(weights in prop::collection::vec(0u32..1000, 1..6), seed: u64) {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut rng = Rng::seeded(seed);
        let mut counts = vec![0u64; weights.len()];
        const PICKS: u64 = 10_000;
        for _ in 0..PICKS {
            match pick_weighted(weights.iter().copied(), &mut rng) {
                Some(i) => counts[i] += 1,
                None => prop_assert_eq!(total, 0),
            }
        }
        if total > 0 {
            for (w, c) in weights.iter().zip(&counts) {
                let expected = *w as f64 / total as f64;
                let got = *c as f64 / PICKS as f64;
                prop_assert!((expected - got).abs() < 0.03, "weight {} of {}: {} vs {}", w, total, got, expected);
                if *w == 0 { prop_assert_eq!(*c, 0); }
            }
        }
    }
}

/// A service of backends named b0, b1, … each with endpoints 198.18.<backend+1>.<n>:80.
fn service_of(backends: &[(u32, usize)]) -> Table {
    let mut text = String::from("[[service]]\nname = \"s\"\naddrs = [\"198.18.100.10:80\"]\n");
    for (b, (weight, endpoints)) in backends.iter().enumerate() {
        let endpoints: Vec<String> = (1..=*endpoints)
            .map(|n| format!("{{ addr = \"198.18.{}.{n}:80\" }}", b + 1))
            .collect();
        text += &format!(
            "[[service.backend]]\nname = \"b{b}\"\nweight = {weight}\nendpoints = [ {} ]\n",
            endpoints.join(", ")
        );
    }
    table(&text)
}

#[test]
fn attempts_move_to_another_endpoint_then_another_backend_never_a_drained_one() {
    let t = service_of(&[(1, 2), (0, 1), (1, 1)]);
    let s = service(&t);
    for seed in 0..50 {
        let mut rng = Rng::seeded(seed);
        let mut attempts = s.attempts(Load::Connections);
        let now = Instant::now();
        let (first, _) = attempts.next(now, &mut rng).unwrap();
        let mut backends = vec![first.name.to_string()];
        let mut endpoints = 1;
        while let Some((backend, _)) = attempts.next(now, &mut rng) {
            if backends.last().map(String::as_str) != Some(&*backend.name) {
                backends.push(backend.name.to_string());
            }
            endpoints += 1;
        }
        // Every endpoint of b0 and b2 once, backend by backend; b1 (weight 0) never.
        assert_eq!(endpoints, 3, "seed {seed}");
        assert_eq!(attempts.tried(), 3);
        backends.sort();
        assert_eq!(backends, ["b0", "b2"], "seed {seed}");
    }
}

#[test]
fn all_zero_weights_give_no_attempt_at_all() {
    let t = service_of(&[(0, 2), (0, 1)]);
    let mut rng = Rng::seeded(1);
    let mut attempts = service(&t).attempts(Load::Latency);
    assert!(attempts.next(Instant::now(), &mut rng).is_none());
}

/// Index of `endpoint` among all endpoints of the service, backend by backend.
fn position(s: &Service, endpoint: &Endpoint) -> usize {
    s.backends
        .iter()
        .flat_map(|b| &b.endpoints)
        .position(|e| e.addr == endpoint.addr)
        .unwrap()
}

/// Sends `requests` requests one after another (one keep-alive client) on the paused
/// clock, each answered after `latency[endpoint]`; returns the requests per endpoint.
async fn sequential(s: &Service, latency: &[Duration], requests: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::seeded(seed);
    let mut counts = vec![0; latency.len()];
    for _ in 0..requests {
        let (_, endpoint) = s
            .attempts(Load::Latency)
            .next(Instant::now(), &mut rng)
            .unwrap();
        let i = position(s, endpoint);
        let sent = endpoint.state.latency.start(Instant::now());
        tokio::time::advance(latency[i]).await;
        sent.responded(Instant::now());
        counts[i] += 1;
    }
    counts
}

#[tokio::test(start_paused = true)]
async fn per_request_the_endpoint_20ms_slower_gets_a_small_share_but_is_probed() {
    let ms = Duration::from_millis;
    for seed in 0..5 {
        let t = service_of(&[(1, 2)]);
        let s = service(&t);
        let latency = [ms(1), ms(21)];
        let counts = sequential(s, &latency, 300, seed).await;
        // Both are tried once (unmeasured endpoints are free), then the fast one
        // takes the rest: the slow one's estimate needs ~30 s to decay below 1 ms.
        assert_eq!(counts[1], 1, "seed {seed}: {counts:?}");
        // Over a minute the slow one is probed again now and then, never abandoned.
        let counts = sequential(s, &latency, 60_000, seed).await;
        assert!((1..=10).contains(&counts[1]), "seed {seed}: {counts:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn per_request_an_endpoint_that_turns_slow_loses_its_share_at_once() {
    let ms = Duration::from_millis;
    let t = service_of(&[(1, 2)]);
    let s = service(&t);
    let counts = sequential(s, &[ms(2), ms(1)], 100, 7).await;
    assert!(counts[1] >= 95, "{counts:?}");
    // Endpoint 1 turns 50 ms slow: its very next response moves traffic over.
    let counts = sequential(s, &[ms(2), ms(50)], 100, 7).await;
    assert!(counts[1] <= 1 && counts[0] >= 99, "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn per_request_a_burst_spreads_over_equal_endpoints_and_a_new_one_gets_one_probe() {
    let ms = Duration::from_millis;
    let t = service_of(&[(1, 2)]);
    let s = service(&t);
    let mut rng = Rng::seeded(3);
    // Endpoint 0 is measured at 5 ms; endpoint 1 is new. A burst of 8 requests (all in
    // flight at once) sends one probe to the new endpoint and the rest to the known one.
    let e0 = &s.backends[0].endpoints[0];
    e0.state
        .latency
        .start(Instant::now())
        .responded(Instant::now() + ms(5));
    tokio::time::advance(ms(5)).await;
    let burst = |rng: &mut Rng| {
        let mut counts = [0, 0];
        let in_flight: Vec<InFlight> = (0..8)
            .map(|_| {
                let (_, e) = s.attempts(Load::Latency).next(Instant::now(), rng).unwrap();
                counts[position(s, e)] += 1;
                e.state.latency.start(Instant::now())
            })
            .collect();
        (counts, in_flight)
    };
    let (counts, in_flight) = burst(&mut rng);
    assert_eq!(counts, [7, 1]);
    tokio::time::advance(ms(5)).await;
    for sent in in_flight {
        sent.responded(Instant::now());
    }
    // Now both answer in 5 ms: requests in flight split a burst evenly.
    tokio::time::advance(ms(1)).await;
    let (counts, _in_flight) = burst(&mut rng);
    assert_eq!(counts, [4, 4]);
}

#[tokio::test(start_paused = true)]
async fn per_request_a_failing_endpoint_is_avoided() {
    let t = service_of(&[(1, 2)]);
    let s = service(&t);
    let [e0, e1] = [&s.backends[0].endpoints[0], &s.backends[0].endpoints[1]];
    let now = Instant::now();
    e0.state
        .latency
        .start(now)
        .responded(now + Duration::from_millis(3));
    // Endpoint 1 refuses at once: fast, but a failure counts as FAILURE_RTT.
    e1.state.latency.start(now).failed(now);
    tokio::time::advance(Duration::from_millis(3)).await;
    let counts = sequential(s, &[Duration::from_millis(3); 2], 200, 5).await;
    assert_eq!(counts, [200, 0]);
}

proptest! {
    /// Per request, the first backend chosen follows the weights as closely as
    /// `pick_weighted` does (same tolerance as above), whatever the endpoints' load.
    #[test]
    fn per_request_attempts_honour_weights(weights in prop::collection::vec(0u32..1000, 1..5), seed: u64) {
        let t = service_of(&weights.iter().map(|&w| (w, 2)).collect::<Vec<_>>());
        let s = service(&t);
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut rng = Rng::seeded(seed);
        let mut counts = vec![0u64; weights.len()];
        const PICKS: u64 = 10_000;
        let now = Instant::now();
        for _ in 0..PICKS {
            match s.attempts(Load::Latency).next(now, &mut rng) {
                Some((b, _)) => counts[s.backends.iter().position(|x| x.name == b.name).unwrap()] += 1,
                None => prop_assert_eq!(total, 0),
            }
        }
        if total > 0 {
            for (w, c) in weights.iter().zip(&counts) {
                let got = *c as f64 / PICKS as f64;
                let expected = *w as f64 / total as f64;
                prop_assert!((expected - got).abs() < 0.03, "weight {} of {}: {} vs {}", w, total, got, expected);
            }
        }
    }
}
