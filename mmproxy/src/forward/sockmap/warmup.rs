//! The warm-up: before a connection is armed, userspace forwards it by
//! copying for `--ebpf-arm-after-ms`. A connection that ends within that
//! time (a short request and its answer) never touches the BPF maps:
//! arming and disarming one costs about 30 system calls more than plain
//! mode spends on a whole short connection (`strace -c`, docs/ebpf-datapath.md).
//! A longer one is armed at the first moment after the warm-up when
//! neither direction holds bytes read but not yet written (a redirected
//! skb must not overtake them) and both receive queues were read empty:
//! `tcp_read_skb()` hands the verdict whole skbs from the queue's head,
//! so the rest of an skb userspace had read in part would go out again
//! whole. A connection whose reader is slower than its writer may never
//! reach that moment and stays in userspace; on this kernel the kernel
//! path would hand it back to userspace anyway (PASS mode, at
//! `--ebpf-max-backlog-kib`).
//!
//! One loop serves both directions and never waits on one while the other
//! could move: an echo backend blocked writing to us stops reading, so
//! waiting for room in its receive window without reading its replies
//! would deadlock.

use std::io;

use tokio::{net::TcpStream, time::Instant};

use super::PreArm;
use crate::error::Side;

/// Read sizes for each direction: small first (most warm-ups carry a
/// request and its answer), larger once a read fills the buffer.
const FIRST_READ_BYTES: usize = 16 * 1024;
const READ_BYTES: usize = 32 * 1024;
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

/// Bytes read from one socket and not yet written to the other.
#[derive(Debug, Default)]
struct Pending {
    /// The last read's bytes; allocated on the first read, never zeroed.
    buf: Vec<u8>,
    /// Of `buf`, the bytes already written.
    start: usize,
    /// The source has sent its FIN.
    eof: bool,
    /// The last read found the source's receive queue empty.
    drained: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.start == self.buf.len()
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

/// Forwards by copying until `deadline` has passed and both directions
/// are empty, or until a side's FIN. Counts bytes read and written per
/// socket in `client_io` and `upstream_io`.
pub(super) async fn run(
    client: &TcpStream,
    upstream: &TcpStream,
    client_io: &mut PreArm,
    upstream_io: &mut PreArm,
    deadline: Instant,
) -> Result<WarmUp, (Side, io::Error)> {
    let mut up = Leg {
        src: client,
        dst: upstream,
        src_side: Side::Client,
        dst_side: Side::Upstream,
        pending: Pending::default(),
    };
    let mut down = Leg {
        src: upstream,
        dst: client,
        src_side: Side::Upstream,
        dst_side: Side::Client,
        pending: Pending::default(),
    };
    loop {
        up.step(&mut client_io.read, &mut upstream_io.written)?;
        down.step(&mut upstream_io.read, &mut client_io.written)?;
        let idle = up.pending.is_empty() && down.pending.is_empty();
        if idle && (up.pending.eof || down.pending.eof) {
            return Ok(WarmUp::Eof);
        }
        let now = Instant::now();
        if idle && up.pending.drained && down.pending.drained && now >= deadline {
            return Ok(WarmUp::Arm);
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
    }
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
                match self.dst.try_write(&p.buf[p.start..]) {
                    Ok(n) => {
                        p.start += n;
                        *written += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err((self.dst_side, e)),
                }
            }
            if p.eof {
                return Ok(());
            }
            p.buf.clear();
            p.start = 0;
            let size = match p.buf.capacity() {
                0 => FIRST_READ_BYTES,
                filled if p.drained => filled,
                _ => READ_BYTES,
            };
            p.buf.reserve_exact(size);
            match self.src.try_read_buf(&mut p.buf) {
                Ok(0) => {
                    p.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    // A read that filled the buffer may have stopped
                    // inside an skb; only a short one emptied the queue.
                    p.drained = n < p.buf.capacity();
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
