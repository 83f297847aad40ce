//! netbench: the small network tools behind scripts/bench/proxy.py. std only.
//!
//!   netbench serve --echo ADDR[,ADDR..] [--hold ADDR[,ADDR..]]
//!       echo: every accepted connection gets its own thread (small stack) that
//!       writes back whatever it reads until EOF. hold: accept, echo one byte,
//!       then keep the socket open without reading (for the idle-connection test).
//!   netbench pingpong --connect ADDR [--size 64] [--seconds 3] [--warmup 0.3]
//!       one persistent connection, TCP_NODELAY, write SIZE bytes, read SIZE back,
//!       repeat. Prints `<exchanges> <p50 us> <p99 us> <mean us>`.
//!   netbench open --connect ADDR --count N
//!       opens N connections one after another (connect, 1-byte exchange), prints
//!       `ready <N> <secs>`, then holds them until stdin reaches EOF.
//!
//! The ping payload is zero bytes: not TLS, not an HTTP method, not the HTTP/2
//! preface, so a detecting proxy classifies it as opaque at the first read.

use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn value(args: &[String], flag: &str) -> Option<String> {
    args.iter().position(|a| a == flag).map(|i| args[i + 1].clone())
}

fn spawn_small<F: FnOnce() + Send + 'static>(f: F) {
    let _ = std::thread::Builder::new().stack_size(64 * 1024).spawn(f);
}

fn serve(args: &[String]) {
    let mut handles = vec![];
    for addr in value(args, "--echo").unwrap_or_default().split(',').filter(|s| !s.is_empty()) {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        handles.push(std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                spawn_small(move || {
                    let _ = stream.set_nodelay(true);
                    let mut buf = [0u8; 4096];
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        }));
    }
    for addr in value(args, "--hold").unwrap_or_default().split(',').filter(|s| !s.is_empty()) {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        handles.push(std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut byte = [0u8; 1];
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                if stream.read_exact(&mut byte).is_ok() && stream.write_all(&byte).is_ok() {
                    held.push(stream);
                }
            }
        }));
    }
    eprintln!("netbench serve: listening");
    for h in handles {
        let _ = h.join();
    }
}

fn pingpong(args: &[String]) {
    let connect = value(args, "--connect").expect("--connect ADDR");
    let size: usize = value(args, "--size").map_or(64, |s| s.parse().unwrap());
    let seconds: f64 = value(args, "--seconds").map_or(3.0, |s| s.parse().unwrap());
    let warmup: f64 = value(args, "--warmup").map_or(0.3, |s| s.parse().unwrap());
    let mut stream = TcpStream::connect(&connect).expect("connect");
    stream.set_nodelay(true).unwrap();
    let out = vec![0u8; size];
    let mut back = vec![0u8; size];
    let mut samples: Vec<u32> = Vec::with_capacity(200_000);
    let start = Instant::now();
    let warm_end = start + Duration::from_secs_f64(warmup);
    let end = warm_end + Duration::from_secs_f64(seconds);
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        stream.write_all(&out).unwrap();
        stream.read_exact(&mut back).unwrap();
        if t0 >= warm_end {
            samples.push(t0.elapsed().as_nanos() as u32);
        }
    }
    samples.sort_unstable();
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0;
    let mean = samples.iter().map(|&s| s as f64).sum::<f64>() / samples.len() as f64 / 1000.0;
    println!("{} {:.1} {:.1} {:.1}", samples.len(), pct(0.50), pct(0.99), mean);
}

fn open(args: &[String]) {
    let connect = value(args, "--connect").expect("--connect ADDR");
    let count: usize = value(args, "--count").map_or(10_000, |s| s.parse().unwrap());
    let start = Instant::now();
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let mut stream = TcpStream::connect(&connect)
            .unwrap_or_else(|e| panic!("connection {i}: connect: {e}"));
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut byte = [1u8; 1];
        stream.write_all(&byte).unwrap();
        stream
            .read_exact(&mut byte)
            .unwrap_or_else(|e| panic!("connection {i}: no echo: {e}"));
        held.push(stream);
    }
    println!("ready {} {:.2}", held.len(), start.elapsed().as_secs_f64());
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let stdin = std::io::stdin();
    while stdin.lock().read_line(&mut line).map_or(false, |n| n > 0) {
        line.clear();
    }
    drop(held);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(&args),
        Some("pingpong") => pingpong(&args),
        Some("open") => open(&args),
        _ => {
            eprintln!("usage: netbench serve|pingpong|open ... (see src/main.rs)");
            std::process::exit(2);
        }
    }
}
