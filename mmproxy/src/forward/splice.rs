//! The userspace data path: `splice(2)` from one socket into a pipe and
//! from the pipe into the other socket, so payload bytes never enter
//! userspace. Pipes are pooled across connections (creating and sizing
//! one costs three syscalls). When no pipe can be had (EMFILE), that
//! direction falls back to copying through a buffer. A connection that
//! turns out to be bulk is finished on workers of its own (`bulk.rs`).

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    sync::Mutex,
};

use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use tokio::{io::Interest, net::TcpStream};

use super::{
    bulk::{self, Promotion},
    contract::{
        Connection, DirectionResult, ForwardError, Transferred, mirror_failure, shutdown_write,
        until_both_end, write_all,
    },
    turn::Turn,
};
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
    /// Keep every connection on the runtime that started it, never move
    /// bulk to the bulk workers (`bulk.rs`).
    one_runtime: bool,
}

impl SpliceForwarder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A forwarder that reads with `recv()` only.
    pub fn copying() -> Self {
        Self {
            copy_only: true,
            ..Self::default()
        }
    }

    /// A forwarder that never moves a connection to the bulk workers: every
    /// byte is moved on the runtime the connection started on (what
    /// `tests/head_of_line.rs` measures the turns on).
    pub fn on_one_runtime() -> Self {
        Self {
            one_runtime: true,
            ..Self::default()
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

        // Copying (sockets in a sockmap) stays put: rare, and its buffer
        // is not a pipe to hand over.
        let promotion = (!self.copy_only && !self.one_runtime).then(Promotion::default);
        let up = self.direction(
            &client,
            &upstream,
            Side::Client,
            Side::Upstream,
            promotion.as_ref(),
        );
        let down = self.direction(
            &upstream,
            &client,
            Side::Upstream,
            Side::Client,
            promotion.as_ref(),
        );
        match until_both_end(up, down, Leg::bytes).await {
            Ok((Leg::Ended(up), Leg::Ended(down))) => {
                moved.client_to_upstream += up;
                moved.upstream_to_client += down;
                Ok(moved)
            }
            Ok((up, down)) => finish_on_bulk_workers(client, upstream, up, down, moved).await,
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

    /// Moves `src` to `dst` until EOF, then half-closes `dst`; or, when
    /// the connection is promoted, stops with an empty pipe.
    async fn direction(
        &self,
        src: &TcpStream,
        dst: &TcpStream,
        src_side: Side,
        dst_side: Side,
        promotion: Option<&Promotion>,
    ) -> DirectionResult<Leg> {
        let pipe = if self.copy_only {
            Err(io::ErrorKind::Unsupported.into())
        } else {
            self.pool.take()
        };
        let moved = match pipe {
            Ok(pipe) => {
                let result =
                    splice_until_eof(src, dst, &pipe, (src_side, dst_side), promotion).await;
                match result {
                    Ok(Spliced::Paused(total)) => return Ok(Leg::Paused { total, pipe }),
                    // A pipe is only reusable when empty, i.e. after a
                    // clean EOF.
                    Ok(Spliced::Eof(total)) => {
                        self.pool.give_back(pipe);
                        total
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(_) => copy_until_eof(src, dst, src_side, dst_side).await?,
        };
        // Propagate the FIN; the other direction keeps flowing.
        shutdown_write(dst).map_err(|e| (dst_side, e))?;
        Ok(Leg::Ended(moved))
    }
}

/// Where a direction stood when both stopped.
#[derive(Debug)]
enum Leg {
    /// At EOF, the FIN passed on: bytes moved.
    Ended(u64),
    /// Stopped for the move to the bulk workers, its pipe empty.
    Paused { total: u64, pipe: Pipe },
}

impl Leg {
    fn bytes(&self) -> u64 {
        match self {
            Leg::Ended(total) | Leg::Paused { total, .. } => *total,
        }
    }
}

/// How a splice loop stopped.
enum Spliced {
    Eof(u64),
    Paused(u64),
}

/// Hands the two sockets and the paused directions to the bulk workers
/// (`bulk.rs`) and waits for them to finish the connection. The sockets
/// come back to be closed here: the caller's guards (reset on panic, the
/// drain and idle timeouts) hold their descriptors until this returns,
/// and dropping this future stops the task.
async fn finish_on_bulk_workers(
    client: TcpStream,
    upstream: TcpStream,
    up: Leg,
    down: Leg,
    before: Transferred,
) -> Result<Transferred, ForwardError> {
    let so_far = Transferred {
        client_to_upstream: before.client_to_upstream + up.bytes(),
        upstream_to_client: before.upstream_to_client + down.bytes(),
    };
    let internal = |source: io::Error| ForwardError {
        side: Side::Internal,
        source,
        transferred: so_far,
    };
    let Some(bulk) = bulk::runtime() else {
        mirror_failure(Side::Internal, &client, &upstream);
        return Err(internal(io::Error::other("no bulk workers")));
    };
    bulk::count_moved();
    let (client_fd, upstream_fd) = (client.into_std(), upstream.into_std());
    let (client, upstream) = match (client_fd, upstream_fd) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => return Err(internal(e)),
    };
    let mut task = AbortOnDrop(bulk.spawn(async move {
        let registered = (TcpStream::from_std(client), TcpStream::from_std(upstream));
        let (client, upstream) = match registered {
            (Ok(c), Ok(u)) => (c, u),
            (Err(e), _) | (_, Err(e)) => {
                return (Err((Side::Internal, e, Transferred::default())), None);
            }
        };
        let result = until_both_end(
            resume(&client, &upstream, (Side::Client, Side::Upstream), up),
            resume(&upstream, &client, (Side::Upstream, Side::Client), down),
            |n| *n,
        )
        .await;
        if let Err((side, ..)) = &result {
            mirror_failure(*side, &client, &upstream);
        }
        (result, Some((client.into_std(), upstream.into_std())))
    }));
    let (result, sockets) = match (&mut task.0).await {
        Ok(done) => done,
        Err(e) => return Err(internal(io::Error::other(format!("bulk task: {e}")))),
    };
    // Closed here, in the connection's own task: until now its guards
    // (reset on panic, the drain and idle timeouts) could still reach them
    // by descriptor.
    drop(sockets);
    match result {
        Ok((up, down)) => Ok(Transferred {
            client_to_upstream: before.client_to_upstream + up,
            upstream_to_client: before.upstream_to_client + down,
        }),
        Err((side, source, finished)) => Err(ForwardError {
            side,
            source,
            // A finished direction's total counts from the connection's
            // start; an unfinished one moved at least what it had before.
            transferred: Transferred {
                client_to_upstream: so_far
                    .client_to_upstream
                    .max(before.client_to_upstream + finished.client_to_upstream),
                upstream_to_client: so_far
                    .upstream_to_client
                    .max(before.upstream_to_client + finished.upstream_to_client),
            },
        }),
    }
}

/// Aborts the task when dropped (a connection cut by a timeout must not
/// leave its bulk task running).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Finishes a direction on the bulk workers: an ended one is done; a
/// paused one splices on, with its own pipe, to EOF and the half-close.
async fn resume(
    src: &TcpStream,
    dst: &TcpStream,
    sides: (Side, Side),
    leg: Leg,
) -> DirectionResult {
    match leg {
        Leg::Ended(total) => Ok(total),
        Leg::Paused { total, pipe } => {
            let more = match splice_until_eof(src, dst, &pipe, sides, None).await? {
                Spliced::Eof(n) | Spliced::Paused(n) => n,
            };
            shutdown_write(dst).map_err(|e| (sides.1, e))?;
            Ok(total + more)
        }
    }
}

/// Splices `src` into `dst` until EOF; with `promotion`, stops (the pipe
/// empty) once the connection is promoted, by this direction's bulk or the
/// other's.
async fn splice_until_eof(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    (src_side, dst_side): (Side, Side),
    promotion: Option<&Promotion>,
) -> Result<Spliced, (Side, io::Error)> {
    let mut total = 0u64;
    let mut turn = Turn::default();
    let never = std::future::pending::<()>;
    loop {
        // The pipe is empty here: a safe place to stop.
        if promotion.is_some_and(Promotion::is_requested) {
            return Ok(Spliced::Paused(total));
        }
        let filled = loop {
            tokio::select! {
                r = src.readable() => r.map_err(|e| (src_side, e))?,
                () = async {
                    match promotion {
                        Some(p) => p.requested().await,
                        None => never().await,
                    }
                } => return Ok(Spliced::Paused(total)),
            }
            match pipe.fill_from(src) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => turn.ran_dry(),
                Err(e) => return Err((src_side, e)),
            }
        };
        if filled == 0 {
            return Ok(Spliced::Eof(total));
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
        // (tests/fairness.rs, tests/head_of_line.rs).
        turn.moved(filled).await;
        if let Some(p) = promotion
            && turn.streak() >= bulk::PROMOTE_AFTER_QUANTA
            && bulk::runtime().is_some()
        {
            p.request();
        }
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
