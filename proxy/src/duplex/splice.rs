//! Moving one direction's bytes with `splice(2)`: socket to pipe, pipe to socket, so the
//! payload never crosses into user space (no copy in, no copy out, no buffer of ours).
//!
//! The pipe is the kernel-side buffer between the two splices. We only fill it when it
//! is empty and then drain it completely before reading again, so an `EAGAIN` from the
//! reading splice always means "the socket has nothing now" (never "the pipe is full"),
//! and an `EAGAIN` from the writing splice "the socket's send buffer is full" (never
//! "the pipe is empty"). That keeps readiness exactly tokio's socket readiness, and no
//! byte is ever left in the pipe when a direction ends normally.
//!
//! The pipe is grown to [`PIPE_SIZE`] (1 MiB) when it is made: each splice then moves
//! whatever the socket holds, up to 1 MiB, instead of at most the default 64 KiB, which
//! halves the splices and the sleeps and wake-ups between them during a bulk transfer
//! (docs/bench/issue14-splice.md). Pages are only taken while bytes sit in the pipe, so a
//! large pipe costs no memory while it is empty. The kernel may refuse to grow it
//! (past `/proc/sys/fs/pipe-max-size`, or past the `pipe-user-pages-soft` budget of an
//! unprivileged proxy's uid when many big pipes are open): the pipe then keeps the
//! size it has, and splice works the same in smaller steps.
//!
//! That budget is shared by every pipe of the uid: 64 MiB by default, i.e. 1,024 pipes
//! of the default size but only 64 of 1 MiB, and past it the kernel makes every new
//! pipe of the uid 8 KiB. So at most [`MAX_GROWN`] pipes are grown at once (16 MiB of
//! the budget, eight bulk transfers both ways); the others keep the default size, and a
//! busy proxy never starves its own later pipes.
//!
//! Byte counters are added to from splice's return values, read side and write side
//! separately, exactly where the copy loop adds after `read` and after `write`.
//!
//! nix's `pipe2` and `splice` are safe wrappers, so this module needs no `unsafe`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use prometheus_client::metrics::counter::Counter;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{DuplexError, Side};

/// The capacity each direction's pipe is grown to: the most one splice moves. 1 MiB is
/// the default `/proc/sys/fs/pipe-max-size`, the most an unprivileged process may ask.
pub(crate) const PIPE_SIZE: usize = 1024 * 1024;

/// The kernel's default pipe capacity (16 pages), assumed when it cannot be read.
const DEFAULT_PIPE_SIZE: usize = 64 * 1024;

/// The most pipes grown past the default at once, process-wide (see the module doc).
pub(crate) const MAX_GROWN: usize = 16;

/// The process's grown pipes.
static GROWN: Budget = Budget::new(MAX_GROWN);

/// How many pipes may be grown past the default size at once.
#[derive(Debug)]
pub(crate) struct Budget {
    max: usize,
    open: AtomicUsize,
}

impl Budget {
    pub(crate) const fn new(max: usize) -> Budget {
        Budget {
            max,
            open: AtomicUsize::new(0),
        }
    }

    /// Takes a slot if one is free.
    fn take(&self) -> bool {
        self.open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |open| {
                (open < self.max).then_some(open + 1)
            })
            .is_ok()
    }

    fn give_back(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One direction's pipe. Both ends are non-blocking and close-on-exec; dropping it
/// closes them (with whatever a failed direction left inside).
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes the pipe holds at most: the length asked of each filling splice.
    capacity: usize,
    /// The budget whose slot it holds when grown, given back on drop.
    grown: Option<&'static Budget>,
}

impl Pipe {
    /// A fresh pipe (two descriptors) of [`PIPE_SIZE`], or smaller when the kernel
    /// refuses to grow it. Fails like `pipe2(2)`: `EMFILE`/`ENFILE` when out of
    /// descriptors, which the caller answers by copying instead.
    pub(crate) fn new() -> io::Result<Pipe> {
        Pipe::within(&GROWN)
    }

    /// A fresh pipe, grown to [`PIPE_SIZE`] if `budget` has a slot free.
    pub(crate) fn within(budget: &'static Budget) -> io::Result<Pipe> {
        if !budget.take() {
            return Pipe::with_size(DEFAULT_PIPE_SIZE);
        }
        match Pipe::with_size(PIPE_SIZE) {
            Ok(mut pipe) if pipe.capacity > DEFAULT_PIPE_SIZE => {
                pipe.grown = Some(budget);
                Ok(pipe)
            }
            other => {
                budget.give_back();
                other
            }
        }
    }

    /// A fresh pipe grown to `size` bytes if the kernel allows (it rounds up to a power
    /// of two pages).
    pub(crate) fn with_size(size: usize) -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let capacity = resize(&write, size);
        Ok(Pipe {
            read,
            write,
            capacity,
            grown: None,
        })
    }

    /// A "pipe" of any two descriptors, for tests that need splice to refuse.
    #[cfg(test)]
    pub(crate) fn from_fds(read: OwnedFd, write: OwnedFd) -> Pipe {
        let capacity = resize(&write, PIPE_SIZE);
        Pipe {
            read,
            write,
            capacity,
            grown: None,
        }
    }

    /// Bytes the pipe holds at most.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    #[cfg(test)]
    pub(crate) fn write_end(&self) -> &OwnedFd {
        &self.write
    }

    #[cfg(test)]
    pub(crate) fn resize_to(&self, size: usize) -> usize {
        resize(&self.write, size)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if let Some(budget) = self.grown {
            budget.give_back();
        }
    }
}

/// Asks the kernel to make the pipe behind `write` hold `size` bytes and returns what
/// it holds now. A refusal (`EPERM` past the limits above, `EBUSY` if it held more
/// than fits) is not an error: the pipe keeps its size, read back with
/// `F_GETPIPE_SZ`, or the default if even that fails (not a pipe: splice will refuse
/// it and the caller copies instead).
fn resize(write: &OwnedFd, size: usize) -> usize {
    let fd = write.as_raw_fd();
    let asked = i32::try_from(size).unwrap_or(i32::MAX);
    fcntl(fd, FcntlArg::F_SETPIPE_SZ(asked))
        .or_else(|_| fcntl(fd, FcntlArg::F_GETPIPE_SZ))
        .ok()
        .and_then(|held| usize::try_from(held).ok())
        .filter(|&held| held > 0)
        .unwrap_or(DEFAULT_PIPE_SIZE)
}

/// Why a direction could not be spliced to its end.
#[derive(Debug)]
pub(super) enum SpliceError {
    /// The kernel refused the very first splice (`EINVAL`, `ENOSYS`, `EOPNOTSUPP`,
    /// `EPERM` under a seccomp filter): nothing was moved, the copy loop takes over.
    Unsupported(io::Error),
    /// A socket failed, as in the copy loop; bytes moved before are already counted.
    Failed(DuplexError),
}

/// Splices `from` to `to` through `pipe` until `from` reaches EOF, and returns the bytes
/// moved. Does not shut `to` down: the caller does, as after the copy loop.
pub(super) async fn splice_to_eof(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    counted_read: Option<&Counter>,
    counted_write: Option<&Counter>,
    from_side: Side,
) -> Result<u64, SpliceError> {
    let to_side = from_side.other();
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut total = 0u64;
    loop {
        let filled = from
            .async_io(Interest::READABLE, || {
                Ok(splice(from, None, &pipe.write, None, pipe.capacity, flags)?)
            })
            .await;
        let n = match filled {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(source) if total == 0 && unsupported(&source) => {
                return Err(SpliceError::Unsupported(source))
            }
            Err(source) => {
                return Err(SpliceError::Failed(DuplexError {
                    side: from_side,
                    source,
                }))
            }
        };
        if let Some(counter) = counted_read {
            counter.inc_by(n as u64);
        }
        let mut left = n;
        while left > 0 {
            let drained = to
                .async_io(Interest::WRITABLE, || {
                    Ok(splice(&pipe.read, None, to, None, left, flags)?)
                })
                .await
                .and_then(|m| match m {
                    // Only an empty pipe gives 0, and ours holds `left` bytes: never
                    // spin on it.
                    0 => Err(io::Error::from(io::ErrorKind::WriteZero)),
                    m => Ok(m),
                })
                .map_err(|source| {
                    SpliceError::Failed(DuplexError {
                        side: to_side,
                        source,
                    })
                })?;
            if let Some(counter) = counted_write {
                counter.inc_by(drained as u64);
            }
            left -= drained;
        }
        total += n as u64;
    }
}

/// Errors that mean "this pair of descriptors cannot be spliced", not "the connection
/// failed".
fn unsupported(error: &io::Error) -> bool {
    error.raw_os_error().is_some_and(|code| {
        [
            Errno::EINVAL,
            Errno::ENOSYS,
            Errno::EOPNOTSUPP,
            Errno::EPERM,
        ]
        .iter()
        .any(|&errno| errno as i32 == code)
    })
}
