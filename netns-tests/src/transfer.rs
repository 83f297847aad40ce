//! Bulk transfers with integrity checks: a sender of a non-repeating byte stream and a
//! receiver, both hashing with SHA-256, so a test compares what arrived with what left.

use std::io::{self, Read, Write};
use std::net::TcpStream;

use aws_lc_rs::digest::{Context, SHA256};

/// The chunk size of every bulk read and write.
pub const CHUNK: usize = 64 * 1024;

/// A count of bytes and their SHA-256, in hex.
#[derive(Debug, PartialEq, Eq)]
pub struct Transfer {
    pub bytes: u64,
    pub sha256: String,
}

/// What both ends of a two-way transfer sent and received.
#[derive(Debug)]
pub struct Exchange {
    pub up_sent: Transfer,
    pub up_received: Transfer,
    pub down_sent: Transfer,
    pub down_received: Transfer,
}

impl Exchange {
    /// Panics unless each direction received exactly what was sent.
    #[track_caller]
    pub fn assert_intact(&self, context: &str) {
        assert_eq!(
            self.up_received, self.up_sent,
            "{context}: client -> server: received, sent"
        );
        assert_eq!(
            self.down_received, self.down_sent,
            "{context}: server -> client: received, sent"
        );
    }
}

/// A non-repeating byte stream that is cheap to make in a debug build: a pseudo-random
/// 64 KiB block (different per seed) whose first 8 bytes are replaced by the number of the
/// chunk, so a chunk lost, repeated or reordered changes the hash as surely as a flipped
/// byte does. Hashed as it is sent.
pub struct Pattern {
    block: Vec<u8>,
    chunk: u64,
    hash: Context,
    total: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        let mut state = seed;
        let block = (0..CHUNK / 8)
            .flat_map(|_| splitmix64(&mut state).to_le_bytes())
            .collect();
        Pattern {
            block,
            chunk: 0,
            hash: Context::new(&SHA256),
            total: 0,
        }
    }

    /// Writes the next `len` bytes of the stream.
    pub fn send(&mut self, stream: &mut TcpStream, len: u64) -> io::Result<()> {
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            self.block[..8].copy_from_slice(&self.chunk.to_le_bytes());
            self.chunk += 1;
            stream.write_all(&self.block[..n]).map_err(|e| {
                io::Error::new(e.kind(), format!("after {} bytes: {e}", self.total))
            })?;
            self.hash.update(&self.block[..n]);
            self.total += n as u64;
            left -= n as u64;
        }
        Ok(())
    }

    /// What was sent so far.
    pub fn finish(self) -> Transfer {
        Transfer {
            bytes: self.total,
            sha256: hex(self.hash.finish().as_ref()),
        }
    }
}

/// Writes `len` bytes of the stream seeded with `seed`.
pub fn send(stream: &mut TcpStream, seed: u64, len: u64) -> io::Result<Transfer> {
    let mut pattern = Pattern::new(seed);
    pattern.send(stream, len)?;
    Ok(pattern.finish())
}

/// Reads until EOF (a reset is an error), hashing what arrives.
pub fn receive(stream: &mut TcpStream) -> io::Result<Transfer> {
    let mut hash = Context::new(&SHA256);
    let mut total = 0;
    let mut buf = vec![0; CHUNK];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hash.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("after {total} bytes: {e}"),
                ))
            }
        }
    }
    Ok(Transfer {
        bytes: total,
        sha256: hex(hash.finish().as_ref()),
    })
}

/// The next value of the splitmix64 generator whose state is `state`.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
