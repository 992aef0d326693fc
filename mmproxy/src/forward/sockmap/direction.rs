//! One direction of an armed connection while the kernel redirects it.
//!
//! The direction sleeps until the verdict signals (the redirected bytes
//! reached the threshold userspace set, or the verdict started passing),
//! the source hangs up or fails, or a slow periodic check comes due. On a
//! signal it measures the destination's redirect backlog and either moves
//! the verdict's limit on (the peer keeps up) or lets the direction go to
//! PASS (pass.rs) until the backlog has drained.

use std::{
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use mmproxy_common::sockmap::SocketState;

use super::{
    books::{self, Books, Leg},
    error::SockmapError,
    watcher::Watcher,
};
use crate::{
    bpf::Datapath,
    sockopt::{self, TcpInfo},
};

/// The periodic check while bytes are pending somewhere.
const TICK_BUSY: Duration = Duration::from_millis(100);
/// The periodic check of an idle direction (doubles up to this).
const TICK_IDLE_MAX: Duration = Duration::from_secs(1);

/// What every connection's directions share.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) datapath: Arc<Datapath>,
    /// Started on the first connection (it needs the runtime).
    pub(super) watcher: OnceLock<Arc<Watcher>>,
    /// Serialises starting the watcher: the first connections arrive on
    /// several worker threads at once, and only one may take the ring.
    pub(super) watcher_start: Mutex<()>,
    /// Bytes a direction's redirect backlog may hold
    /// (`--ebpf-max-backlog-kib`).
    pub(super) max_backlog: u64,
    /// `--ebpf-arm-after-ms`.
    pub(super) arm_after: Duration,
    /// `--ebpf-bulk-mbit`, in bytes a second.
    pub(super) bulk_rate: Option<u64>,
}

/// How a PASS episode ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flow {
    /// Back to REDIRECT.
    Redirect,
    /// The source sent its FIN.
    Eof,
}

/// A direction from `src` to `dst`.
#[derive(Debug)]
pub(super) struct Direction<'a> {
    pub(super) shared: &'a Shared,
    pub(super) watcher: &'a Watcher,
    pub(super) src: &'a Leg,
    pub(super) dst: &'a Leg,
    pub(super) books: Books,
    /// Read buffer for passed bytes, allocated on first use.
    pub(super) buf: Vec<u8>,
}

impl<'a> Direction<'a> {
    pub(super) fn new(
        shared: &'a Shared,
        watcher: &'a Watcher,
        src: &'a Leg,
        dst: &'a Leg,
        books: Books,
    ) -> Self {
        Self {
            shared,
            watcher,
            src,
            dst,
            books,
            buf: Vec::new(),
        }
    }

    /// Runs until the source's FIN has been forwarded, or a failure.
    /// Returns the bytes delivered to the destination.
    pub(super) async fn run(mut self) -> Result<u64, SockmapError> {
        let mut watchdog = Watchdog::new();
        let mut tick = TICK_BUSY;
        loop {
            let signalled = tokio::select! {
                () = self.src.watched.source.notified() => true,
                () = tokio::time::sleep(tick) => false,
            };
            if self.src.watched.ended() {
                return self.finish().await;
            }
            let (state, info) = books::check(&self.shared.datapath, self.src, &self.books)?;
            if sockopt::TCP_STATES_AFTER_PEER_FIN.contains(&info.state) {
                return self.finish().await;
            }
            // A signal whose wake-up was taken by another wait still
            // stands: the verdict sends no other until it is answered.
            let signal = signalled || state.signals != self.books.control.signals_seen;
            if self.books.must_pass(&state) || (signal && self.extend(&state)?) {
                if self.episode().await? == Flow::Eof {
                    return self.finish().await;
                }
                watchdog = Watchdog::new();
                tick = TICK_BUSY;
                continue;
            }
            if !signalled {
                tick = if watchdog.check(&self, &state, &info)? {
                    TICK_BUSY
                } else {
                    (tick * 2).min(TICK_IDLE_MAX)
                };
            }
        }
    }

    /// Moves the verdict's limit on by what the destination's backlog
    /// leaves of `--ebpf-max-backlog-kib`, and acknowledges the signal.
    /// Returns true when the direction must go to PASS instead.
    fn extend(&mut self, state: &SocketState) -> Result<bool, SockmapError> {
        let backlog = books::dst_progress(self.dst, &self.books, state)?.backlog;
        let room = self.shared.max_backlog.saturating_sub(backlog);
        self.set_control(self.books.redirect(state, room))?;
        // A verdict that ran between the state read and the update used
        // the old control and may have passed without signalling (one
        // signal in flight). After the lock, every verdict sees the new
        // one; what happened before shows in the state.
        self.src.sync_with_verdict()?;
        let now = self.shared.datapath.state(self.src.cookie);
        Ok(self.books.must_pass(&now))
    }

    pub(super) fn set_control(
        &mut self,
        control: mmproxy_common::sockmap::FlowControl,
    ) -> Result<(), SockmapError> {
        self.shared
            .datapath
            .set_control(self.src.cookie, &control)?;
        self.books.control = control;
        Ok(())
    }
}

/// Catches the two stalls seen on this kernel while a direction is
/// redirected, and kicks the kernel out of them:
/// - bytes on the source's receive queue that no verdict has run over
///   (the field notes saw 11-14 s until a zero-window probe): take the
///   socket lock with `SO_RCVLOWAT`, which re-runs `sk_data_ready`;
/// - redirected bytes the destination's psock holds while its
///   acknowledgements stand still (its backlog worker waiting for a
///   wake-up it missed): `TCP_NOTSENT_LOWAT` calls `sk_write_space`,
///   which reschedules the worker.
#[derive(Debug)]
struct Watchdog {
    accounted: u64,
    acked: u64,
    since: Instant,
    kicks: u64,
}

impl Watchdog {
    fn new() -> Self {
        Self {
            accounted: 0,
            acked: 0,
            since: Instant::now(),
            kicks: 0,
        }
    }

    /// Returns whether anything is pending (the caller keeps checking
    /// often) or the direction is idle (the caller backs off).
    fn check(
        &mut self,
        dir: &Direction<'_>,
        state: &SocketState,
        info: &TcpInfo,
    ) -> Result<bool, SockmapError> {
        let accounted = dir.books.accounted(state);
        let waiting_for_verdict = books::data_received(info) > accounted;
        let books::DstProgress { backlog, acked } =
            books::dst_progress(dir.dst, &dir.books, state)?;
        if !waiting_for_verdict && backlog == 0 {
            *self = Self::new();
            return Ok(false);
        }
        if accounted != self.accounted || acked != self.acked {
            self.accounted = accounted;
            self.acked = acked;
            self.since = Instant::now();
            return Ok(true);
        }
        if self.since.elapsed() < TICK_BUSY {
            return Ok(true);
        }
        self.kicks += 1;
        if self.kicks == 1 || self.kicks.is_multiple_of(50) {
            tracing::debug!(
                from = %dir.src.side,
                to = %dir.dst.side,
                waiting_for_verdict,
                backlog,
                kicks = self.kicks,
                "sockmap: no progress; kicking"
            );
        }
        if waiting_for_verdict {
            dir.src.sync_with_verdict()?;
        }
        if backlog > 0 {
            let _ = sockopt::kick_write_space(&dir.dst.stream);
        }
        self.since = Instant::now();
        Ok(true)
    }
}
