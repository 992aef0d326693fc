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
//! A connection that moved bulk during the warm-up (`--ebpf-bulk-mbit`,
//! 200 Mbit/s by default) is not armed at all: on this kernel an armed
//! bulk connection moves 0.70-0.75x what `splice()` does
//! (docs/ebpf-findings.md), while the kernel path's gain, never waiting
//! for a daemon thread, is for connections that wait on each other's
//! small messages. 200 Mbit/s is far above request/response traffic (64 B
//! requests at 20,000 a second are 20 Mbit/s both ways) and far below one
//! bulk stream on loopback (tens of Gbit/s).
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

/// How the warm-up ended; in every case nothing read is left unwritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WarmUp {
    /// Time to arm.
    Arm,
    /// The warm-up moved bulk (`--ebpf-bulk-mbit`): the caller forwards
    /// the rest in userspace, where bulk is cheaper.
    Bulk,
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
/// written per socket in `client_io` and `upstream_io`. With `bulk_rate`
/// (bytes a second), a warm-up that moved at least that ends in
/// [`WarmUp::Bulk`].
pub(super) async fn run(
    (client, upstream): (&TcpStream, &TcpStream),
    client_io: &mut PreArm,
    upstream_io: &mut PreArm,
    deadline: Instant,
    bulk_rate: Option<u64>,
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
    let started = Instant::now();
    let read_at_start = client_io.read + upstream_io.read;
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
            let read = client_io.read + upstream_io.read - read_at_start;
            let bulk = bulk_rate.is_some_and(|rate| is_bulk(read, now - started, rate));
            tracing::debug!(
                read,
                elapsed_ms = (now - started).as_millis(),
                bulk,
                "warm-up over"
            );
            break if bulk { WarmUp::Bulk } else { WarmUp::Arm };
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

/// Whether `read` bytes in `elapsed` is at least `rate` bytes a second. A
/// warm-up too short to judge (`--ebpf-arm-after-ms 0`) is not: that
/// setting arms at once.
fn is_bulk(read: u64, elapsed: std::time::Duration, rate: u64) -> bool {
    const SHORTEST_JUDGED: std::time::Duration = std::time::Duration::from_millis(10);
    elapsed >= SHORTEST_JUDGED
        && u128::from(read) * 1_000_000 >= u128::from(rate) * elapsed.as_micros()
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The default, 200 Mbit/s.
    const RATE: u64 = 25_000_000;

    #[test]
    fn bulk_is_judged_by_rate_over_the_warm_up() {
        let warm_up = Duration::from_millis(100);
        // 25 MB/s over 100 ms is 2.5 MB.
        assert!(is_bulk(2_500_000, warm_up, RATE));
        assert!(!is_bulk(2_499_999, warm_up, RATE));
        // Request/response: 20,000 64-byte requests a second, both ways.
        assert!(!is_bulk(20_000 * 128 / 10, warm_up, RATE));
        // A longer warm-up (the connection was not quiet at its deadline)
        // dilutes a burst.
        assert!(!is_bulk(2_500_000, Duration::from_secs(1), RATE));
    }

    #[test]
    fn a_warm_up_too_short_to_judge_arms() {
        assert!(!is_bulk(u64::MAX / 2, Duration::ZERO, RATE));
        assert!(!is_bulk(100_000_000, Duration::from_millis(9), RATE));
        assert!(is_bulk(100_000_000, Duration::from_millis(10), RATE));
    }
}
