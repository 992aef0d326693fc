//! The userspace data path: `splice(2)` from one socket into a pipe and
//! from the pipe into the other socket, so payload bytes never enter
//! userspace. Pipes are pooled across connections (creating and sizing
//! one costs three syscalls). When no pipe can be had (EMFILE), that
//! direction falls back to copying through a buffer.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    sync::Mutex,
};

use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use tokio::{io::Interest, net::TcpStream};

use super::contract::{
    Connection, DirectionResult, ForwardError, Transferred, mirror_failure, shutdown_write,
    until_both_end, write_all,
};
use super::turn::Turn;
use crate::error::Side;

/// Pipe capacity: bytes in flight per direction. 256 KiB is four times
/// the default, enough to keep a 10 Gbit/s loopback flow moving in few
/// syscalls, while bounding what a slow backend makes us hold.
pub const PIPE_SIZE_BYTES: usize = 256 * 1024;
/// Copy-fallback buffer per direction.
const COPY_BUFFER_BYTES: usize = 64 * 1024;
/// Idle pipes kept for reuse; beyond this they are closed.
const MAX_IDLE_PIPES: usize = 1024;

/// The splice forwarder and its pipe pool.
#[derive(Debug, Default)]
pub struct SpliceForwarder {
    pool: PipePool,
    /// Copy through a buffer, never splice: for sockets in a BPF
    /// sockmap, whose passed bytes `splice()` would not see.
    copy_only: bool,
}

impl SpliceForwarder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A forwarder that reads with `recv()` only.
    pub fn copying() -> Self {
        Self {
            pool: PipePool::default(),
            copy_only: true,
        }
    }

    pub(super) async fn forward(&self, conn: Connection) -> Result<Transferred, ForwardError> {
        let Connection {
            client,
            upstream,
            early_data,
            header_len: _,
        } = conn;
        let mut moved = Transferred::default();
        if let Err(source) = write_all(&upstream, &early_data).await {
            mirror_failure(Side::Upstream, &client, &upstream);
            return Err(ForwardError {
                side: Side::Upstream,
                source,
                transferred: moved,
            });
        }
        moved.client_to_upstream = early_data.len() as u64;

        let up = self.direction(&client, &upstream, Side::Client, Side::Upstream);
        let down = self.direction(&upstream, &client, Side::Upstream, Side::Client);
        match until_both_end(up, down).await {
            Ok((up, down)) => {
                moved.client_to_upstream += up;
                moved.upstream_to_client += down;
                Ok(moved)
            }
            Err((side, source, finished)) => {
                mirror_failure(side, &client, &upstream);
                moved.client_to_upstream += finished.client_to_upstream;
                moved.upstream_to_client += finished.upstream_to_client;
                Err(ForwardError {
                    side,
                    source,
                    transferred: moved,
                })
            }
        }
    }

    /// A pipe from the pool, for a caller that splices on its own (ebpf
    /// mode's warm-up).
    pub(super) fn take_pipe(&self) -> io::Result<Pipe> {
        self.pool.take()
    }

    /// Returns an empty pipe to the pool; a pipe holding bytes must be
    /// dropped instead.
    pub(super) fn give_back_pipe(&self, pipe: Pipe) {
        self.pool.give_back(pipe);
    }

    /// Moves `src` to `dst` until EOF, then half-closes `dst`.
    async fn direction(
        &self,
        src: &TcpStream,
        dst: &TcpStream,
        src_side: Side,
        dst_side: Side,
    ) -> DirectionResult {
        let pipe = if self.copy_only {
            Err(io::ErrorKind::Unsupported.into())
        } else {
            self.pool.take()
        };
        let moved = match pipe {
            Ok(pipe) => {
                let result = splice_until_eof(src, dst, &pipe, src_side, dst_side).await;
                // A pipe is only reusable when empty, i.e. after a clean EOF.
                if result.is_ok() {
                    self.pool.give_back(pipe);
                }
                result?
            }
            Err(_) => copy_until_eof(src, dst, src_side, dst_side).await?,
        };
        // Propagate the FIN; the other direction keeps flowing.
        shutdown_write(dst).map_err(|e| (dst_side, e))?;
        Ok(moved)
    }
}

async fn splice_until_eof(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    src_side: Side,
    dst_side: Side,
) -> Result<u64, (Side, io::Error)> {
    let mut total = 0u64;
    let mut turn = Turn::default();
    loop {
        // The pipe is empty here.
        let filled = loop {
            src.readable().await.map_err(|e| (src_side, e))?;
            match pipe.fill_from(src) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err((src_side, e)),
            }
        };
        if filled == 0 {
            return Ok(total);
        }
        let mut left = filled;
        while left > 0 {
            dst.writable().await.map_err(|e| (dst_side, e))?;
            match pipe.drain_to(dst, left) {
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err((dst_side, e)),
            }
        }
        total += filled as u64;
        // Without a bound one fast flow pins a worker, and accepts,
        // timeouts, SIGTERM and interactive connections wait
        // (tests/fairness.rs).
        turn.moved(filled).await;
    }
}

async fn copy_until_eof(
    src: &TcpStream,
    dst: &TcpStream,
    src_side: Side,
    dst_side: Side,
) -> Result<u64, (Side, io::Error)> {
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    let mut total = 0u64;
    let mut turn = Turn::default();
    loop {
        src.readable().await.map_err(|e| (src_side, e))?;
        let n = match src.try_read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err((src_side, e)),
        };
        write_all(dst, &buf[..n]).await.map_err(|e| (dst_side, e))?;
        total += n as u64;
        turn.moved(n).await;
    }
}

/// A pipe: what `splice(2)` needs between two sockets.
#[derive(Debug)]
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

/// Never block: readiness comes from the reactor.
const SPLICE_FLAGS: SpliceFlags = SpliceFlags::MOVE.union(SpliceFlags::NONBLOCK);

impl Pipe {
    /// Moves what `src` has, up to the pipe's capacity, into the pipe
    /// (which must be empty). `WouldBlock` clears `src`'s readiness. A
    /// short count does not prove `src` drained: the splice also stops
    /// when the pipe runs out of slots.
    pub(super) fn fill_from(&self, src: &TcpStream) -> io::Result<usize> {
        src.try_io(Interest::READABLE, || {
            splice(src, None, &self.write, None, self.capacity, SPLICE_FLAGS)
                .map_err(io::Error::from)
        })
    }

    /// Moves up to `len` of the bytes in the pipe to `dst`.
    pub(super) fn drain_to(&self, dst: &TcpStream, len: usize) -> io::Result<usize> {
        dst.try_io(Interest::WRITABLE, || {
            splice(&self.read, None, dst, None, len, SPLICE_FLAGS).map_err(io::Error::from)
        })
    }

    fn new() -> io::Result<Self> {
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // Raising the size may fail past /proc/sys/fs/pipe-max-size or the
        // per-user pipe quota; the default 64 KiB pipe still works.
        let capacity = fcntl_setpipe_size(write.as_fd(), PIPE_SIZE_BYTES).unwrap_or(64 * 1024);
        Ok(Self {
            read,
            write,
            capacity,
        })
    }
}

/// Idle pipes, reused across connections.
#[derive(Debug, Default)]
struct PipePool {
    idle: Mutex<Vec<Pipe>>,
}

impl PipePool {
    fn take(&self) -> io::Result<Pipe> {
        let reused = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        match reused {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(),
        }
    }

    fn give_back(&self, pipe: Pipe) {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < MAX_IDLE_PIPES
        {
            idle.push(pipe);
        }
    }
}
