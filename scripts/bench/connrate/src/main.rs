//! connrate: measures new TCP connections per second.
//!
//! Each connection: connect, send one byte, read one byte back, close. With
//! `--listen ADDR` the same process also runs the echoing server (on its own
//! threads), so a redirect to a local port can be measured in one namespace.
//!
//! Usage: connrate [--listen ADDR] --connect ADDR [--seconds N] [--threads N] [--count N]
//!        connrate --listen ADDR            (only the echoing server, until killed)
//! With `--count N` each client thread stops after N connections (or at `--seconds`,
//! whichever comes first): a fixed number of connections for per-connection
//! syscall and wake-up counts (scripts/bench/conncost.py).
//! Prints: `<connections> <seconds> <per-second>`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .map(|i| args[i + 1].clone())
    };
    let seconds: f64 = value("--seconds").map_or(3.0, |s| s.parse().unwrap());
    let threads: usize = value("--threads").map_or(1, |s| s.parse().unwrap());
    let connect = value("--connect");
    let count_limit: u64 = value("--count").map_or(u64::MAX, |s| s.parse().unwrap());

    if let Some(listen) = value("--listen") {
        let listener = TcpListener::bind(&listen).expect("bind");
        for _ in 0..2 {
            let listener = listener.try_clone().unwrap();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(mut stream) = stream else { continue };
                    let mut byte = [0u8; 1];
                    if stream.read_exact(&mut byte).is_ok() {
                        let _ = stream.write_all(&byte);
                    }
                }
            });
        }
    }
    let Some(connect) = connect else {
        // Server only: the echo threads run until the process is killed.
        loop {
            std::thread::park();
        }
    };

    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, count, connect) = (stop.clone(), count.clone(), connect.clone());
            std::thread::spawn(move || {
                let mut byte = [7u8; 1];
                let mut made = 0;
                while made < count_limit && !stop.load(Ordering::Relaxed) {
                    let mut stream = TcpStream::connect(&connect).expect("connect");
                    stream.set_nodelay(true).unwrap();
                    stream.write_all(&byte).unwrap();
                    stream.read_exact(&mut byte).unwrap();
                    drop(stream);
                    made += 1;
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let deadline = start + Duration::from_secs_f64(seconds);
    while Instant::now() < deadline && !workers.iter().all(|w| w.is_finished()) {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = count.load(Ordering::Relaxed);
    println!("{n} {elapsed:.3} {:.0}", n as f64 / elapsed);
}
