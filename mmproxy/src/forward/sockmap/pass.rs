//! A direction in PASS mode: the verdict keeps every skb on the source
//! socket (charged to it, so its TCP window closes), userspace waits until
//! the destination has taken every redirected byte, forwards the passed
//! bytes itself, and switches back to REDIRECT once it has caught up.
//!
//! Lossless by construction, on these kernel facts (docs/ebpf-datapath.md):
//! - the switch is a map value, never a socket leaving the map, so no skb
//!   can meet a half-removed psock (where the verdict's default is DROP);
//! - userspace calls `recv()` only in PASS mode, after taking the socket
//!   lock: `tcp_bpf_recvmsg_parser()` runs pending verdicts and then
//!   writes back the `copied_seq` it read before them, which is stale if
//!   a verdict redirected in between, and correct if it passed;
//! - passed bytes are written to the destination only after its redirect
//!   backlog is empty, and the verdict redirects again only once userspace
//!   has written every passed byte, so nothing overtakes anything;
//! - the FIN is forwarded only after the same two conditions hold and the
//!   books balance with TCP's count.

use std::{
    io::{self, Write as _},
    time::{Duration, Instant},
};

use rustix::event::epoll::EventFlags;

use super::{
    books::{self, Leg},
    direction::{Direction, Flow},
    error::SockmapError,
};
use crate::sockopt;

/// Read size for passed bytes. The buffer exists only during a PASS
/// episode: kept for the connection's life it made 50 flooding
/// connections hold 25 MiB (256 KiB per direction, measured by the bench).
const READ_BYTES: usize = 64 * 1024;
/// First and longest pause while waiting for the destination to take the
/// redirected bytes (no event says when the psock's worker is done).
const DRAIN_POLL_MIN: Duration = Duration::from_micros(200);
const DRAIN_POLL_MAX: Duration = Duration::from_millis(10);
/// Checks of the destination's backlog before the first pause.
const DRAIN_YIELDS: u32 = 8;
/// A destination whose acknowledgements stand still this long while its
/// psock holds bytes gets its backlog worker kicked.
const SEND_STALL: Duration = Duration::from_millis(100);
/// A safety net under every wait for an event.
const EVENT_TIMEOUT: Duration = Duration::from_millis(250);
/// After the FIN, how long bytes TCP received may stay out of the books
/// (neither redirected, passed nor read) before the stream is declared
/// short. Passed bytes queued behind the other direction do not count.
const EOF_BOOKS_TIMEOUT: Duration = Duration::from_secs(2);

/// What an attempt to switch back to REDIRECT found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// Redirecting again.
    Done,
    /// Passed bytes are still unread; `redirected` if skbs were
    /// redirected before them.
    Behind { redirected: bool },
}

impl Direction<'_> {
    /// Switches the direction to PASS until the destination has drained
    /// and userspace has caught up.
    pub(super) async fn episode(&mut self) -> Result<Flow, SockmapError> {
        self.shared.datapath.count_pass_episode();
        self.enter_pass_mode()?;
        self.wait_backlog_empty().await?;
        self.forward_passed().await
    }

    /// Sets PASS and waits for any verdict still using the old value.
    fn enter_pass_mode(&mut self) -> Result<(), SockmapError> {
        self.set_control(self.books.pass())?;
        self.src.sync_with_verdict()
    }

    /// Forwards passed bytes until userspace has caught up with the
    /// verdict, then switches back to REDIRECT. Requires PASS mode.
    pub(super) async fn forward_passed(&mut self) -> Result<Flow, SockmapError> {
        self.want(self.src, EventFlags::IN, true)?;
        let flow = self.forward_passed_until_resumed().await;
        self.want(self.src, EventFlags::IN, false)?;
        self.buf = Vec::new();
        flow
    }

    async fn forward_passed_until_resumed(&mut self) -> Result<Flow, SockmapError> {
        loop {
            match self.read_passed()? {
                Some(0) => return Ok(Flow::Eof),
                Some(n) => {
                    // Tell the verdict at once that a duplicate mark is
                    // used up: it has room for one, and under a flood the
                    // next switch attempt (at EAGAIN) may be seconds away.
                    if self.write_passed(n).await? && self.resume().await? {
                        return Ok(Flow::Redirect);
                    }
                }
                None => {
                    if self.resume().await? {
                        return Ok(Flow::Redirect);
                    }
                    if self.src.watched.ended() {
                        return Ok(Flow::Eof);
                    }
                    self.wait_source().await;
                }
            }
        }
    }

    /// Tries to switch back to REDIRECT (true when done). When passed bytes
    /// are still unread and the verdict redirected a few skbs (up to the
    /// limit) before passing them, those must leave the destination's
    /// backlog before userspace writes anything behind them: waits for it.
    async fn resume(&mut self) -> Result<bool, SockmapError> {
        match self.try_resume()? {
            Resume::Done => Ok(true),
            Resume::Behind { redirected: false } => Ok(false),
            Resume::Behind { redirected: true } => {
                self.wait_backlog_empty().await?;
                Ok(false)
            }
        }
    }

    /// Lets the verdict redirect again, from the next skb on, if userspace
    /// has forwarded every passed byte. The destination's backlog is empty
    /// here (nothing was redirected since PASS began, or the caller waited
    /// for it), so the verdict gets the whole `--ebpf-max-backlog-kib`.
    ///
    /// If an skb was passed after the last read, the verdict keeps passing
    /// (it redirects only while every passed byte has been read), so
    /// reading stays safe without switching back to PASS: under load that
    /// saves a switch per read, and the next call tries again.
    fn try_resume(&mut self) -> Result<Resume, SockmapError> {
        let state = self.shared.datapath.state(self.src.cookie);
        self.set_control(self.books.redirect(&state, self.shared.max_backlog))?;
        self.src.sync_with_verdict()?;
        let now = self.shared.datapath.state(self.src.cookie);
        if now.passed == self.books.passed_read {
            return Ok(Resume::Done);
        }
        Ok(Resume::Behind {
            redirected: now.redirected != state.redirected,
        })
    }

    /// The source hung up (or failed): everything it received reaches
    /// the destination, then its FIN does. Returns the bytes delivered.
    pub(super) async fn finish(mut self) -> Result<u64, SockmapError> {
        self.src.error()?;
        // The FIN arrived after every byte; skbs before it that no verdict
        // has seen yet are run through it now (under the socket lock).
        self.src.sync_with_verdict()?;
        let (state, info) = books::check(&self.shared.datapath, self.src, &self.books)?;
        let balanced = state.passed == self.books.passed_read
            && self.books.accounted(&state) == books::data_received(&info);
        if balanced {
            // Everything went through the verdict and nothing is left for
            // userspace: only the destination's backlog must drain.
            self.wait_backlog_empty().await?;
            return self.forward_fin(self.books.delivered(&state));
        }
        self.enter_pass_mode()?;
        self.wait_backlog_empty().await?;
        self.want(self.src, EventFlags::IN, true)?;
        let delivered = self.read_to_balanced_books().await;
        self.want(self.src, EventFlags::IN, false)?;
        self.forward_fin(delivered?)
    }

    /// Half-closes the destination; returns `delivered`.
    fn forward_fin(&self, delivered: u64) -> Result<u64, SockmapError> {
        crate::forward::contract::shutdown_write(&self.dst.stream)
            .map_err(|e| SockmapError::io(self.dst.side, e))?;
        Ok(delivered)
    }

    /// Reads passed bytes until the source's EOF and until every byte TCP
    /// received is accounted for (passed bytes can sit on the psock's
    /// queue behind bytes the other direction is sending out of the same
    /// socket; `recv()` reports EOF before they arrive).
    async fn read_to_balanced_books(&mut self) -> Result<u64, SockmapError> {
        let mut short_since: Option<Instant> = None;
        loop {
            match self.read_passed()? {
                Some(0) => {}
                Some(n) => {
                    if self.write_passed(n).await? {
                        // A duplicate mark used up: report it (see above).
                        self.enter_pass_mode()?;
                    }
                    continue;
                }
                None => {
                    self.wait_source().await;
                    continue;
                }
            }
            let (state, info) = books::check(&self.shared.datapath, self.src, &self.books)?;
            let received = books::data_received(&info);
            let accounted = self.books.accounted(&state);
            if state.passed == self.books.passed_read && accounted == received {
                return Ok(self.books.delivered(&state));
            }
            if accounted < received {
                // Never seen by a verdict: kick, and give up after a while.
                let since = *short_since.get_or_insert_with(Instant::now);
                if since.elapsed() > EOF_BOOKS_TIMEOUT {
                    return Err(SockmapError::ShortAtEof {
                        side: self.src.side,
                        forwarded: accounted,
                        received,
                    });
                }
                self.src.sync_with_verdict()?;
            } else {
                short_since = None;
            }
            self.wait_source().await;
        }
    }

    fn read_passed(&mut self) -> Result<Option<usize>, SockmapError> {
        if self.buf.is_empty() {
            self.buf.resize(READ_BYTES, 0);
        }
        books::try_read(self.src, &mut self.buf)
    }

    /// Writes the `n` passed bytes just read to the destination, less any
    /// duplicates the verdict marked among them, and books them. Returns
    /// whether the verdict's duplicate mark is now used up.
    async fn write_passed(&mut self, n: usize) -> Result<bool, SockmapError> {
        let state = self.shared.datapath.state(self.src.cookie);
        let dup = self.books.duplicates_in(&state, n as u64);
        let (dup_start, dup_end) = (
            usize::try_from(dup.start).unwrap_or(n),
            usize::try_from(dup.end).unwrap_or(n),
        );
        if dup_start < dup_end {
            tracing::debug!(
                side = %self.src.side,
                bytes = dup_end - dup_start,
                "sockmap: dropping duplicate bytes the verdict marked"
            );
            self.buf.copy_within(dup_end..n, dup_start);
        }
        let keep = n - (dup_end - dup_start);
        self.write_buf(keep).await?;
        self.books
            .forwarded_passed(n as u64, (dup_end - dup_start) as u64);
        Ok(dup_start < dup_end && self.books.passed_read >= state.skip_at + state.skip_len)
    }

    /// Writes the first `n` bytes of the buffer to the destination.
    async fn write_buf(&mut self, n: usize) -> Result<(), SockmapError> {
        let mut sent = 0;
        let mut waiting = false;
        while sent < n {
            match (&self.dst.stream).write(&self.buf[sent..n]) {
                Ok(k) => sent += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !waiting {
                        self.want(self.dst, EventFlags::OUT, true)?;
                        waiting = true;
                    }
                    let _ =
                        tokio::time::timeout(EVENT_TIMEOUT, self.dst.watched.sink.notified()).await;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(SockmapError::io(self.dst.side, e)),
            }
        }
        if waiting {
            self.want(self.dst, EventFlags::OUT, false)?;
        }
        Ok(())
    }

    /// Waits until the destination's psock has handed every redirected
    /// byte to its send queue. No deadline: a slow reader may be slow, as
    /// in plain mode; a destination error ends the wait.
    async fn wait_backlog_empty(&mut self) -> Result<(), SockmapError> {
        let mut poll = DRAIN_POLL_MIN;
        let mut yields = 0;
        let mut kicks = 0u64;
        let mut acked = (0u64, Instant::now());
        loop {
            let state = self.shared.datapath.state(self.src.cookie);
            let progress = books::dst_progress(self.dst, &self.books, &state)?;
            if progress.backlog == 0 {
                return Ok(());
            }
            self.dst.error()?;
            let now = progress.acked;
            if now != acked.0 {
                acked = (now, Instant::now());
            } else if acked.1.elapsed() >= SEND_STALL {
                kicks += 1;
                if kicks == 1 || kicks.is_multiple_of(50) {
                    tracing::debug!(
                        from = %self.src.side,
                        to = %self.dst.side,
                        backlog = progress.backlog,
                        kicks,
                        "sockmap: the destination's psock holds bytes and nothing moves; kicking"
                    );
                }
                let _ = sockopt::kick_write_space(&self.dst.stream);
                acked.1 = Instant::now();
            }
            // The psock's worker usually finishes within microseconds;
            // tokio's timer would round the first pause up to 1 ms.
            if yields < DRAIN_YIELDS {
                yields += 1;
                tokio::task::yield_now().await;
                continue;
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(DRAIN_POLL_MAX);
        }
    }

    /// Waits for the source to become readable, hang up or signal.
    async fn wait_source(&self) {
        let _ = tokio::time::timeout(EVENT_TIMEOUT, self.src.watched.source.notified()).await;
    }

    fn want(&self, leg: &Leg, flags: EventFlags, on: bool) -> Result<(), SockmapError> {
        use std::os::fd::AsFd as _;
        self.watcher
            .want(leg.stream.as_fd(), &leg.watched, flags, on)
            .map_err(|e| SockmapError::io(leg.side, e))
    }
}
