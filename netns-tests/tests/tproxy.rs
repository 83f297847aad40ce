//! `meshinit --mode tproxy` with `meshproxy --inbound-transparent`: inbound connections
//! are handed to the proxy by TPROXY, and the proxy connects to the application from the
//! client's address, so the application sees the real client. The native nft backend is
//! the one that applies this mode (the iptables backends refuse it: `bad_input`). Every
//! traffic case runs for IPv4 and IPv6.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use netns_tests::transfer::{receive, send, Exchange};
use netns_tests::{Accepted, Backend, Family, Listener, MeshProxy, Netns, Pods, ACCEPT_TIMEOUT};

const MIB: u64 = 1 << 20;
/// The bulk transfer of the issue: 100 MiB in each direction.
const BULK: u64 = 100 * MIB;
/// A detected (not opaque) application port.
const APP_PORT: u16 = 8080;
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Applies `--mode tproxy` (plus `flags`) with the nft backend in the pod and starts the
/// transparent proxy there.
fn transparent<'a>(pods: &'a Pods, flags: &[&str]) -> MeshProxy<'a> {
    let args = [&["apply", "--mode", "tproxy"], flags].concat();
    pods.pod.meshinit_on(Backend::Nft, &args).expect_ok();
    pods.pod.start_meshproxy_transparent(&[])
}

#[track_caller]
fn connect(ns: &Netns, to: SocketAddr) -> TcpStream {
    let stream = ns
        .connect(to)
        .unwrap_or_else(|e| panic!("connect from {} to {to}: {e}", ns.name()));
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

#[track_caller]
fn accept(server: &Listener) -> Accepted {
    let accepted = server.accept_within(ACCEPT_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "{}: no connection within {ACCEPT_TIMEOUT:?}",
            server.label()
        )
    });
    accepted.stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    accepted.stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    accepted
}

/// One request and one reply through the proxy; returns the peer address the
/// application saw.
#[track_caller]
fn ping(client_ns: &Netns, server: &Listener, to: SocketAddr) -> SocketAddr {
    let mut client = connect(client_ns, to);
    client.write_all(b"ping\n").expect("client write");
    let mut accepted = accept(server);
    let mut got = [0; 5];
    accepted.stream.read_exact(&mut got).expect("app read");
    assert_eq!(&got, b"ping\n");
    accepted.stream.write_all(b"pong\n").expect("app write");
    let mut back = [0; 5];
    client
        .read_exact(&mut back)
        .expect("client read: the reply must come back");
    assert_eq!(&back, b"pong\n");
    accepted.peer
}

/// `up` bytes client -> app and `down` bytes app -> client at once, each hashed.
fn exchange(client: TcpStream, server: &Listener, up: u64, down: u64) -> (Exchange, SocketAddr) {
    thread::scope(|scope| {
        let mut client_writer = client.try_clone().expect("clone");
        let up_sent = scope.spawn(move || {
            let sent = send(&mut client_writer, 1, up).expect("client send");
            client_writer
                .shutdown(Shutdown::Write)
                .expect("client shutdown");
            sent
        });
        let mut client_reader = client;
        let down_received =
            scope.spawn(move || receive(&mut client_reader).expect("client receive"));
        let accepted = accept(server);
        let saw = accepted.peer;
        let mut server_reader = accepted.stream.try_clone().expect("clone");
        let up_received = scope.spawn(move || receive(&mut server_reader).expect("app receive"));
        let mut server_writer = accepted.stream;
        let down_sent = send(&mut server_writer, 2, down).expect("app send");
        server_writer
            .shutdown(Shutdown::Write)
            .expect("app shutdown");
        (
            Exchange {
                up_sent: up_sent.join().unwrap(),
                up_received: up_received.join().unwrap(),
                down_sent,
                down_received: down_received.join().unwrap(),
            },
            saw,
        )
    })
}

#[test]
fn the_application_sees_the_clients_address_through_the_transparent_proxy() {
    let pods = Pods::new("tproxy_client_address");
    let proxy = transparent(&pods, &[]);
    for family in Family::ALL {
        let server = pods.pod.listen("pod app", family.any_port(APP_PORT));
        let to = SocketAddr::new(family.pod(), APP_PORT);
        let saw = ping(&pods.peer, &server, to);
        assert_eq!(
            saw.ip(),
            family.peer(),
            "the application sees the client's address"
        );
        let _ = &proxy;
    }
    proxy.wait_for_metric(
        "tcp_open_total",
        &[("direction", "inbound")],
        2.0,
        Duration::from_secs(5),
    );
}
