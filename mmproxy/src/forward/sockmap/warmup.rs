//! The warm-up: before a connection is armed, userspace forwards it for
//! `--ebpf-arm-after-ms`, with `splice()` through pooled pipes as plain
//! mode does (copying through a buffer when no pipe can be had): the
//! sockets are in no sockmap yet, so `splice()` sees every byte. A
//! connection that ends within that time (a short request and its
//! answer) never touches the BPF maps: arming and disarming one costs
//! about 30 system calls more than plain mode spends on a whole short
//! connection (`strace -c`, docs/ebpf-datapath.md).
//!
//! A longer one is armed at the first moment after the warm-up when
//! neither direction holds bytes read but not yet written (a redirected
//! skb must not overtake them) and both receive queues were read empty,
//! i.e. the last read of each socket returned `EAGAIN`: `tcp_read_skb()`
//! hands the verdict whole skbs from the queue's head, so the rest of an
//! skb userspace had read in part would go out again whole. (A short
//! `splice()` does not prove the queue empty: it also stops when the pipe
//! runs out of slots.) A connection whose reader is slower than its
//! writer may never reach that moment and stays in userspace; on this
//! kernel the kernel path would hand it back to userspace anyway (PASS
//! mode, at `--ebpf-max-backlog-kib`).
//!
//! One loop serves both directions and never waits on one while the other
//! could move: an echo backend blocked writing to us stops reading, so
//! waiting for room in its receive window without reading its replies
//! would deadlock.

use std::io;

use tokio::{net::TcpStream, time::Instant};

use crate::{
    error::Side,
    forward::{
        splice::{Pipe, SpliceForwarder},
        turn::Turn,
    },
};

/// Bytes userspace moved through one socket before arming.
#[derive(Debug, Default)]
pub(super) struct PreArm {
    pub(super) read: u64,
    pub(super) written: u64,
}

/// Copy-buffer size when no pipe can be had.
const COPY_BUFFER_BYTES: usize = 32 * 1024;
/// Reads per direction before the other gets its turn.
const READS_PER_TURN: usize = 4;

/// How the warm-up ended; in both cases nothing read is left unwritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WarmUp {
    /// Time to arm.
    Arm,
    /// A side sent its FIN (the caller forwards the rest in userspace:
    /// the kernel takes only ESTABLISHED sockets into a sockmap).
    Eof,
}

/// What holds a direction's bytes between reading and writing.
#[derive(Debug)]
enum Carrier {
    /// A pipe from the pool and the bytes in it.
    Pipe { pipe: Pipe, held: usize },
    /// A buffer (no pipe could be had: EMFILE), and of it the bytes
    /// already written.
    Buffer { buf: Vec<u8>, start: usize },
}

impl Carrier {
    fn new(pipes: &SpliceForwarder) -> Self {
        match pipes.take_pipe() {
            Ok(pipe) => Carrier::Pipe { pipe, held: 0 },
            Err(_) => Carrier::Buffer {
                buf: Vec::new(),
                start: 0,
            },
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Carrier::Pipe { held, .. } => *held == 0,
            Carrier::Buffer { buf, start } => *start == buf.len(),
        }
    }

    /// Reads what `src` has (up to the carrier's size) into an empty
    /// carrier.
    fn read_from(&mut self, src: &TcpStream) -> io::Result<usize> {
        match self {
            Carrier::Pipe { pipe, held } => {
                *held = pipe.fill_from(src)?;
                Ok(*held)
            }
            Carrier::Buffer { buf, start } => {
                buf.clear();
                *start = 0;
                buf.reserve_exact(COPY_BUFFER_BYTES);
                src.try_read_buf(buf)
            }
        }
    }

    /// Writes some of what is held to `dst`.
    fn write_to(&mut self, dst: &TcpStream) -> io::Result<usize> {
        match self {
            Carrier::Pipe { pipe, held } => {
                let n = pipe.drain_to(dst, *held)?;
                *held -= n;
                Ok(n)
            }
            Carrier::Buffer { buf, start } => {
                let n = dst.try_write(&buf[*start..])?;
                *start += n;
                Ok(n)
            }
        }
    }

    /// An empty pipe goes back to the pool.
    fn release(self, pipes: &SpliceForwarder) {
        if let Carrier::Pipe { pipe, held: 0 } = self {
            pipes.give_back_pipe(pipe);
        }
    }
}

/// Bytes read from one socket and not yet written to the other.
#[derive(Debug)]
struct Pending {
    carrier: Carrier,
    /// The source has sent its FIN.
    eof: bool,
    /// The last read of the source returned `EAGAIN` and nothing was
    /// read since: its receive queue held no partly read skb.
    drained: bool,
}

impl Pending {
    fn new(pipes: &SpliceForwarder) -> Self {
        Self {
            carrier: Carrier::new(pipes),
            eof: false,
            drained: false,
        }
    }

    fn is_empty(&self) -> bool {
        self.carrier.is_empty()
    }
}

/// One direction: its sockets, their sides, and the counters to keep.
struct Leg<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    src_side: Side,
    dst_side: Side,
    pending: Pending,
}

/// Forwards (pipes from `pipes`) until `deadline` has passed and both
/// directions are empty, or until a side's FIN. Counts bytes read and
/// written per socket in `client_io` and `upstream_io`.
pub(super) async fn run(
    (client, upstream): (&TcpStream, &TcpStream),
    client_io: &mut PreArm,
    upstream_io: &mut PreArm,
    deadline: Instant,
    pipes: &SpliceForwarder,
) -> Result<WarmUp, (Side, io::Error)> {
    let mut up = Leg {
        src: client,
        dst: upstream,
        src_side: Side::Client,
        dst_side: Side::Upstream,
        pending: Pending::new(pipes),
    };
    let mut down = Leg {
        src: upstream,
        dst: client,
        src_side: Side::Upstream,
        dst_side: Side::Client,
        pending: Pending::new(pipes),
    };
    let mut turn = Turn::default();
    let ended = loop {
        let read_before = client_io.read + upstream_io.read;
        up.step(&mut client_io.read, &mut upstream_io.written)?;
        down.step(&mut upstream_io.read, &mut client_io.written)?;
        // The readiness futures below do not make a ready socket wait:
        // without a turn, new connections starved beside a flood.
        let read = client_io.read + upstream_io.read - read_before;
        turn.moved(usize::try_from(read).unwrap_or(usize::MAX))
            .await;
        let idle = up.pending.is_empty() && down.pending.is_empty();
        if idle && (up.pending.eof || down.pending.eof) {
            break WarmUp::Eof;
        }
        let now = Instant::now();
        if idle && up.pending.drained && down.pending.drained && now >= deadline {
            break WarmUp::Arm;
        }
        // Something can always wake this: an empty direction without EOF
        // waits to read (at once if its turn ended before the queue was
        // empty), a full one to write, and when both are empty no EOF has
        // come (checked above).
        tokio::select! {
            r = up.src.readable(), if up.wants_read() => r.map_err(|e| (up.src_side, e))?,
            r = up.dst.writable(), if !up.pending.is_empty() => r.map_err(|e| (up.dst_side, e))?,
            r = down.src.readable(), if down.wants_read() => r.map_err(|e| (down.src_side, e))?,
            r = down.dst.writable(), if !down.pending.is_empty() => {
                r.map_err(|e| (down.dst_side, e))?;
            }
            () = tokio::time::sleep_until(deadline), if now < deadline => {}
        }
    };
    // Both empty here; on an error the pipes (perhaps holding bytes) are
    // closed instead.
    up.pending.carrier.release(pipes);
    down.pending.carrier.release(pipes);
    Ok(ended)
}

impl Leg<'_> {
    fn wants_read(&self) -> bool {
        self.pending.is_empty() && !self.pending.eof
    }

    /// Writes what is pending and reads more, until either socket would
    /// block, the source is at EOF, or the turn is over.
    fn step(&mut self, read: &mut u64, written: &mut u64) -> Result<(), (Side, io::Error)> {
        for _ in 0..READS_PER_TURN {
            let p = &mut self.pending;
            while !p.is_empty() {
                match p.carrier.write_to(self.dst) {
                    Ok(0) => return Err((self.dst_side, io::ErrorKind::WriteZero.into())),
                    Ok(n) => *written += n as u64,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err((self.dst_side, e)),
                }
            }
            if p.eof {
                return Ok(());
            }
            match p.carrier.read_from(self.src) {
                Ok(0) => {
                    p.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    p.drained = false;
                    *read += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    p.drained = true;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err((self.src_side, e)),
            }
        }
        Ok(())
    }
}
