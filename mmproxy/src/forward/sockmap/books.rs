//! A direction's books: what the verdict did (BPF state), what userspace
//! did, and what TCP says, checked against each other; and the control
//! value userspace gives the verdict.
//!
//! Three counters describe where the bytes a source socket received went:
//! read by userspace (before arming, and passed bytes after), redirected
//! by the verdict, and passed but not yet read. Their sum can never exceed
//! `tcpi_bytes_received`; if it does, the stream would be corrupt and the
//! connection is reset (the tripwire).

use std::{io, net::TcpStream, sync::Arc};

use mmproxy_common::sockmap::{
    FlowControl, MODE_PASS, MODE_REDIRECT, STATE_TRIM_FAILED, SocketState,
};

use super::{error::SockmapError, watcher::Watched};
use crate::{
    bpf::Datapath,
    error::Side,
    sockopt::{self, TcpInfo},
};

/// One socket of an armed connection.
#[derive(Debug)]
pub(super) struct Leg {
    pub(super) stream: TcpStream,
    pub(super) cookie: u64,
    pub(super) side: Side,
    pub(super) watched: Arc<Watched>,
    /// `tcpi_bytes_acked` before any payload was written (it may count
    /// the SYN).
    pub(super) acked_baseline: u64,
}

impl Leg {
    pub(super) fn tcp_info(&self) -> Result<TcpInfo, SockmapError> {
        sockopt::tcp_info(&self.stream).map_err(|e| SockmapError::io(self.side, e))
    }

    /// Takes the socket lock once (`setsockopt` does), so that a verdict
    /// running on another CPU has finished and the next one sees the
    /// latest control value. `SO_RCVLOWAT` also runs the verdict over
    /// bytes waiting on the receive queue (`tcp_set_rcvlowat` calls
    /// `sk_data_ready`): the kick for skbs that arrived unprocessed.
    pub(super) fn sync_with_verdict(&self) -> Result<(), SockmapError> {
        sockopt::set_rcvlowat(&self.stream, 1).map_err(|e| SockmapError::io(self.side, e))
    }

    /// The pending socket error (a reset), if any.
    pub(super) fn error(&self) -> Result<(), SockmapError> {
        match self.stream.take_error() {
            Ok(None) => Ok(()),
            Ok(Some(e)) | Err(e) => Err(SockmapError::io(self.side, e)),
        }
    }
}

/// What userspace moved in one direction, and the verdict's control.
#[derive(Debug)]
pub(super) struct Books {
    /// Bytes userspace read from the source (header and pre-arm bytes
    /// included, then passed bytes).
    pub(super) read: u64,
    /// Bytes userspace wrote to the destination.
    pub(super) written: u64,
    /// Of `read`, the passed bytes (`FlowControl::user_read`).
    pub(super) passed_read: u64,
    /// Of `passed_read`, duplicates the verdict marked and userspace
    /// dropped (`SocketState::skip_at`).
    pub(super) skipped: u64,
    /// The control value last given to the verdict.
    pub(super) control: FlowControl,
}

impl Books {
    pub(super) fn new(read: u64, written: u64) -> Self {
        Self {
            read,
            written,
            passed_read: 0,
            skipped: 0,
            control: FlowControl::default(),
        }
    }

    /// The part of the next `len` passed bytes that the verdict marked as
    /// duplicates, as a range of offsets into them (empty: none).
    pub(super) fn duplicates_in(&self, state: &SocketState, len: u64) -> std::ops::Range<u64> {
        let start = state.skip_at.max(self.passed_read);
        let end = (state.skip_at + state.skip_len).min(self.passed_read + len);
        if start < end {
            start - self.passed_read..end - self.passed_read
        } else {
            0..0
        }
    }

    /// Counts `read` passed bytes userspace read from the source, of which
    /// it dropped `dropped` duplicates and wrote the rest.
    pub(super) fn forwarded_passed(&mut self, read: u64, dropped: u64) {
        self.read += read;
        self.passed_read += read;
        self.skipped += dropped;
        self.written += read - dropped;
    }

    /// The control value that keeps passing every skb.
    pub(super) fn pass(&self) -> FlowControl {
        FlowControl {
            mode: MODE_PASS,
            user_read: self.passed_read,
            ..self.control
        }
    }

    /// The control value that lets the verdict redirect `room` more bytes,
    /// signalling halfway, with the verdict's signals so far acknowledged.
    pub(super) fn redirect(&self, state: &SocketState, room: u64) -> FlowControl {
        FlowControl {
            mode: MODE_REDIRECT,
            user_read: self.passed_read,
            redirect_limit: state.redirected + room,
            notify_at: state.redirected + room / 2,
            signals_seen: state.signals,
            padding: 0,
        }
    }

    /// Whether the verdict has passed bytes userspace has not read, or
    /// has run out of room: either way userspace must take over.
    pub(super) fn must_pass(&self, state: &SocketState) -> bool {
        state.passed != self.passed_read || state.redirected >= self.control.redirect_limit
    }

    /// Bytes of the source's stream accounted for: read by userspace,
    /// redirected, or passed and waiting for userspace, less duplicates
    /// (dropped, or marked and still waiting).
    pub(super) fn accounted(&self, state: &SocketState) -> u64 {
        let unread = state.passed.saturating_sub(self.passed_read);
        let marked = self.duplicates_in(state, unread);
        (self.read - self.skipped) + state.redirected + unread - (marked.end - marked.start)
    }

    /// Bytes delivered to the destination's send path.
    pub(super) fn delivered(&self, state: &SocketState) -> u64 {
        self.written + state.redirected
    }
}

/// The verdict's state for `src`, checked against TCP's own count. The
/// state is read before `TCP_INFO`: both only grow, so for a correct
/// stream accounted(t1) <= received(t1) <= received(t2). Read the other
/// way round, skbs arriving between the two reads would look like
/// duplicates.
pub(super) fn check(
    datapath: &Datapath,
    src: &Leg,
    books: &Books,
) -> Result<(SocketState, TcpInfo), SockmapError> {
    let state = datapath.state(src.cookie);
    let info = src.tcp_info()?;
    if state.flags & STATE_TRIM_FAILED != 0 {
        return Err(SockmapError::TrimFailed { side: src.side });
    }
    let received = data_received(&info);
    let forwarded = books.accounted(&state);
    if forwarded > received {
        return Err(SockmapError::Tripwire {
            side: src.side,
            forwarded,
            received,
        });
    }
    Ok((state, info))
}

/// What the destination has done with the bytes sent toward it.
#[derive(Debug, Clone, Copy)]
pub(super) struct DstProgress {
    /// Bytes sent toward `dst` (by the verdict and by userspace) that its
    /// psock still holds: neither in its send queue nor acknowledged.
    /// This is what nothing but `--ebpf-max-backlog-kib` bounds.
    pub(super) backlog: u64,
    /// `tcpi_bytes_acked` of `dst`: moves while its peer reads.
    pub(super) acked: u64,
}

/// Reads `dst`'s progress (one `TCP_INFO`, one `SIOCOUTQ`).
pub(super) fn dst_progress(
    dst: &Leg,
    books: &Books,
    state: &SocketState,
) -> Result<DstProgress, SockmapError> {
    // TCP_INFO before SIOCOUTQ: an acknowledgement in between moves bytes
    // from the queue to `acked`, and reading in this order can only
    // overstate the backlog, never understate it.
    let info = dst.tcp_info()?;
    let queued =
        sockopt::send_queue_bytes(&dst.stream).map_err(|e| SockmapError::io(dst.side, e))?;
    let taken = info.bytes_acked.saturating_sub(dst.acked_baseline) + queued;
    Ok(DstProgress {
        backlog: books.delivered(state).saturating_sub(taken),
        acked: info.bytes_acked,
    })
}

/// Payload bytes received; after the peer's FIN `tcpi_bytes_received`
/// also counts the FIN's sequence number.
pub(super) fn data_received(info: &TcpInfo) -> u64 {
    if sockopt::TCP_STATES_AFTER_PEER_FIN.contains(&info.state) {
        info.bytes_received.saturating_sub(1)
    } else {
        info.bytes_received
    }
}

/// Reads what `src` holds without blocking: `Ok(None)` when nothing is
/// there yet.
pub(super) fn try_read(src: &Leg, buf: &mut [u8]) -> Result<Option<usize>, SockmapError> {
    use std::io::Read as _;
    match (&src.stream).read(buf) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(SockmapError::io(src.side, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(redirected: u64, passed: u64, skip_at: u64, skip_len: u64) -> SocketState {
        SocketState {
            redirected,
            passed,
            skip_at,
            skip_len,
            ..SocketState::default()
        }
    }

    #[test]
    fn no_mark_means_no_duplicates() {
        let books = Books::new(10, 0);
        assert_eq!(books.duplicates_in(&state(0, 100, 0, 0), 100), 0..0);
        assert_eq!(books.accounted(&state(50, 100, 0, 0)), 160);
    }

    #[test]
    fn a_marked_head_is_dropped_once_even_across_reads() {
        let mut books = Books::new(0, 0);
        // 300 passed bytes; bytes 100..150 of them are duplicates.
        let s = state(0, 300, 100, 50);
        assert_eq!(books.duplicates_in(&s, 120), 100..120);
        books.forwarded_passed(120, 20);
        assert_eq!(books.duplicates_in(&s, 100), 0..30);
        books.forwarded_passed(100, 30);
        assert_eq!(books.duplicates_in(&s, 80), 0..0);
        books.forwarded_passed(80, 0);
        assert_eq!((books.read, books.written, books.skipped), (300, 250, 50));
        // TCP received 250 bytes of the stream: the books balance.
        assert_eq!(books.accounted(&s), 250);
    }

    #[test]
    fn marked_bytes_not_read_yet_do_not_count_as_received() {
        let mut books = Books::new(0, 0);
        let s = state(1000, 300, 100, 50);
        books.forwarded_passed(50, 0);
        // 50 read, 250 unread of which 50 are duplicates: 1000 + 50 + 200.
        assert_eq!(books.accounted(&s), 1250);
    }

    #[test]
    fn redirect_allowance_starts_at_what_was_redirected() {
        let mut books = Books::new(0, 0);
        books.forwarded_passed(64, 0);
        let s = SocketState {
            redirected: 1000,
            passed: 64,
            signals: 3,
            ..SocketState::default()
        };
        let control = books.redirect(&s, 400);
        assert_eq!(control.mode, MODE_REDIRECT);
        assert_eq!(control.user_read, 64);
        assert_eq!(control.redirect_limit, 1400);
        assert_eq!(control.notify_at, 1200);
        assert_eq!(control.signals_seen, 3);
        books.control = control;
        assert!(!books.must_pass(&s));
        assert!(books.must_pass(&SocketState { passed: 65, ..s }));
        assert!(books.must_pass(&SocketState {
            redirected: 1400,
            ..s
        }));
        assert_eq!(books.pass().mode, MODE_PASS);
    }
}
