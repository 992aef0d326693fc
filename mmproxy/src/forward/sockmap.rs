//! The in-kernel data path: both sockets go into BPF sockhashes and the
//! verdict program (`mmproxy-ebpf`) sends each arriving skb out of the
//! peer socket. Userspace never reads payload once a connection is armed;
//! it watches for FIN, errors and resets, and keeps the books.
//!
//! The order of operations matters on this kernel (docs/ebpf-datapath.md):
//! 1. Everything already readable is read and forwarded by userspace, so
//!    no skb is left half-read (the verdict would send it whole again).
//! 2. States go in first, then both sockets as redirect targets, then
//!    both as verdict sources, so no skb can find its peer missing.
//! 3. `SO_RCVLOWAT` kicks the verdict over bytes that arrived between 1
//!    and 2 (a `recv()` would leave a stale `copied_seq` behind).
//! 4. On FIN, the peer is half-closed only once every byte the source
//!    received has been acknowledged by the peer's far end (the redirect
//!    backlog may still hold data when the FIN is seen).
//! 5. A tripwire compares what the verdict redirected with what TCP
//!    received; any inconsistency resets both sides rather than deliver a
//!    corrupt stream.
//! 6. A direction whose redirect backlog (bytes the kernel took from the
//!    source but the destination socket has not taken yet) passes the
//!    limit is handed back to userspace for good: nothing else bounds that
//!    backlog, so a slow reader would otherwise make the kernel hold
//!    everything the sender can push.

use std::{
    io,
    sync::Arc,
    time::{Duration, Instant},
};

use socket2::SockRef;
use tokio::{io::Interest, net::TcpStream};

use super::{
    Connection, DirectionResult, ForwardError, Transferred, mirror_failure,
    splice::SpliceForwarder, until_both_end, write_all,
};
use mmproxy_common::sockmap::{Counter, STATE_TRIM_FAILED};

use crate::{
    bpf::Datapath,
    error::Side,
    sock_diag,
    sockopt::{self, TcpInfo},
};

/// How often an idle direction re-checks its books and kicks stalls.
const WATCH_TICK: Duration = Duration::from_millis(15);
/// How long a finished direction may take to deliver its last bytes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A destination whose acknowledgements have not moved for this long while
/// redirected bytes are outstanding gets its backlog worker kicked.
const SEND_STALL: Duration = Duration::from_millis(100);
/// Poll interval while draining.
const DRAIN_POLL: Duration = Duration::from_micros(500);
/// Read size for the bytes forwarded by hand before arming.
const PREARM_READ_BYTES: usize = 64 * 1024;
/// Attempts at reading a quiet receive queue for the hand-over's books.
const HANDOVER_BOOK_TRIES: u32 = 200;

/// The sockmap forwarder.
#[derive(Debug)]
pub struct SockmapForwarder {
    datapath: Arc<Datapath>,
    /// For connections that cannot be armed: the kernel only takes
    /// ESTABLISHED sockets into a sockmap, so a side that has already sent
    /// its FIN is forwarded in userspace for the rest of the connection.
    fallback: SpliceForwarder,
    /// Fault injection for tests: a pause between the two map inserts,
    /// from `MMPROXY_FAULT_ARM_GAP_MS` at start-up. None in production.
    arm_gap: Option<Duration>,
    /// Bytes a direction's redirect backlog may hold before the direction
    /// is handed back to userspace (`--ebpf-max-backlog-kib`).
    max_backlog: u64,
}

/// How watching a direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watched {
    /// The source sent its FIN.
    Eof,
    /// The backlog passed the limit: userspace takes the direction over.
    Backlogged,
}

/// One socket of a connection and its accounting.
#[derive(Debug, Clone, Copy)]
struct Leg<'a> {
    stream: &'a TcpStream,
    cookie: u64,
    side: Side,
    /// Payload bytes userspace read from this socket (header included).
    read_by_userspace: u64,
    /// Payload bytes userspace wrote to this socket.
    written_by_userspace: u64,
    /// Of `read_by_userspace`, the bytes the verdict passed to this socket
    /// after arming (reported to it through `USER_READ`).
    passed_read: u64,
    /// `tcpi_bytes_acked` before any payload was written (it may count
    /// the SYN).
    acked_baseline: u64,
}

impl SockmapForwarder {
    pub fn new(datapath: Arc<Datapath>, max_backlog: u64) -> Self {
        let arm_gap = std::env::var("MMPROXY_FAULT_ARM_GAP_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map(Duration::from_millis);
        if let Some(gap) = arm_gap {
            tracing::warn!(
                ?gap,
                "fault injection: pausing between the two sockmap inserts"
            );
        }
        Self {
            datapath,
            fallback: SpliceForwarder::new(),
            arm_gap,
            max_backlog,
        }
    }

    pub fn datapath(&self) -> &Arc<Datapath> {
        &self.datapath
    }

    pub(super) async fn forward(&self, conn: Connection) -> Result<Transferred, ForwardError> {
        let Connection {
            client,
            upstream,
            early_data,
            header_len,
        } = conn;
        let fail = |side, source, moved| {
            mirror_failure(side, &client, &upstream);
            ForwardError {
                side,
                source,
                transferred: moved,
            }
        };
        let mut moved = Transferred::default();
        let mut client_leg =
            leg(&client, Side::Client).map_err(|e| fail(Side::Client, e, moved))?;
        let mut upstream_leg =
            leg(&upstream, Side::Upstream).map_err(|e| fail(Side::Upstream, e, moved))?;
        client_leg.read_by_userspace = (header_len + early_data.len()) as u64;

        // 1. Forward what userspace holds and everything readable now.
        write_all(&upstream, &early_data)
            .await
            .map_err(|e| fail(Side::Upstream, e, moved))?;
        upstream_leg.written_by_userspace = early_data.len() as u64;
        let (client_eof, upstream_eof) = drain_readable(&mut client_leg, &mut upstream_leg)
            .await
            .map_err(|(side, e)| fail(side, e, moved))?;
        moved.client_to_upstream = upstream_leg.written_by_userspace;
        moved.upstream_to_client = client_leg.written_by_userspace;

        // 2. and 3.: arm, then kick anything that arrived meanwhile.
        let armed = !(client_eof || upstream_eof)
            && self
                .datapath
                .arm(
                    (&client, client_leg.cookie),
                    (&upstream, upstream_leg.cookie),
                    self.arm_gap,
                )
                .await
                .is_ok();
        if !armed {
            // A FIN came first (before or while arming). Whatever the
            // half-armed side already holds is read while its psock still
            // exists, then userspace forwards the rest.
            drain_readable(&mut client_leg, &mut upstream_leg)
                .await
                .map_err(|(side, e)| fail(side, e, moved))?;
            self.datapath
                .disarm([client_leg.cookie, upstream_leg.cookie]);
            moved.client_to_upstream = upstream_leg.written_by_userspace;
            moved.upstream_to_client = client_leg.written_by_userspace;
            let rest = Connection {
                client,
                upstream,
                early_data: bytes::Bytes::new(),
                header_len: 0,
            };
            let more = self.fallback.forward(rest).await.map_err(|mut e| {
                e.transferred.client_to_upstream += moved.client_to_upstream;
                e.transferred.upstream_to_client += moved.upstream_to_client;
                e
            })?;
            moved.client_to_upstream += more.client_to_upstream;
            moved.upstream_to_client += more.upstream_to_client;
            return Ok(moved);
        }
        let _ = sockopt::set_rcvlowat(&client, 1);
        let _ = sockopt::set_rcvlowat(&upstream, 1);

        let up = self.direction(client_leg, upstream_leg);
        let down = self.direction(upstream_leg, client_leg);
        let result = until_both_end(up, down).await;
        self.datapath
            .disarm([client_leg.cookie, upstream_leg.cookie]);
        match result {
            Ok((up, down)) => Ok(Transferred {
                client_to_upstream: up,
                upstream_to_client: down,
            }),
            Err((side, source, finished)) => {
                // A finished direction's total includes what was written
                // before arming; an unfinished one's is at least that.
                moved.client_to_upstream =
                    moved.client_to_upstream.max(finished.client_to_upstream);
                moved.upstream_to_client =
                    moved.upstream_to_client.max(finished.upstream_to_client);
                tracing::debug!(
                    %side,
                    error = %source,
                    counters = ?Counter::ALL.map(|c| (c.name(), self.datapath.counter(c))),
                    "sockmap connection failed"
                );
                Err(fail(side, source, moved))
            }
        }
    }

    /// Watches `src` until its FIN, drains to `dst`, half-closes `dst`.
    /// Returns every byte delivered to `dst`: written by hand (before and
    /// after arming) plus redirected by the kernel.
    async fn direction(&self, mut src: Leg<'_>, mut dst: Leg<'_>) -> DirectionResult {
        if self.watch(&mut src, &mut dst).await? == Watched::Backlogged {
            return self.hand_over(&mut src, &mut dst).await;
        }
        let redirected = self.drain(&mut src, &mut dst).await?;
        match SockRef::from(dst.stream).shutdown(std::net::Shutdown::Write) {
            Err(e) if e.raw_os_error() != Some(libc::ENOTCONN) => return Err((dst.side, e)),
            _ => {}
        }
        Ok(dst.written_by_userspace + redirected)
    }

    /// Watches `src` until its FIN or until the direction's backlog passes
    /// the limit, forwarding passed bytes and kicking stalls meanwhile.
    async fn watch(
        &self,
        src: &mut Leg<'_>,
        dst: &mut Leg<'_>,
    ) -> Result<Watched, (Side, io::Error)> {
        let mut last_progress = (0u64, Instant::now());
        let mut last_kick = Instant::now();
        let mut kicks = 0u64;
        let mut send = SendWatch::new();
        let mut buf = Vec::new();
        loop {
            let ready = tokio::time::timeout(
                WATCH_TICK,
                src.stream.ready(Interest::READABLE | Interest::ERROR),
            )
            .await;
            if let Ok(ready) = ready {
                let ready = ready.map_err(|e| (src.side, e))?;
                if let Some(e) = src.stream.take_error().map_err(|e| (src.side, e))? {
                    return Err((src.side, e));
                }
                if ready.is_error() {
                    return Err((src.side, io::Error::other("socket error")));
                }
                if ready.is_read_closed() {
                    return Ok(Watched::Eof);
                }
                // Readable without FIN: the verdict passed skbs to this
                // socket, or tokio's readiness is stale (the forward below
                // then reads nothing). Passed skbs come from the arming
                // window (the peer was not in the map yet) and are
                // forwarded by hand, counted in the books. An skb the
                // verdict could not trim overlaps bytes already sent:
                // reset rather than forward a duplicate.
                if self.datapath.state(src.cookie).flags & STATE_TRIM_FAILED != 0 {
                    return Err(trim_failed(src.side));
                }
                if self.forward_passed(src, dst, &mut buf).await? {
                    return Ok(Watched::Eof);
                }
            }
            let (redirected, info) = self.check_books(src)?;
            if sockopt::TCP_STATES_AFTER_PEER_FIN.contains(&info.state) {
                return Ok(Watched::Eof);
            }
            // Passed bytes must reach `dst` before the hand-over (they are
            // forwarded above); a hand-over with some unread would skip them.
            let dst_info = tcp_info(dst)?;
            if redirect_backlog(dst, &dst_info, redirected)? > self.max_backlog
                && self.datapath.state(src.cookie).passed == src.passed_read
            {
                return Ok(Watched::Backlogged);
            }
            // Watchdog: bytes received but not redirected, no progress for
            // a tick, and no kick for a tick.
            let pending = info.bytes_received > src.read_by_userspace + redirected;
            if pending
                && redirected == last_progress.0
                && last_progress.1.elapsed() >= WATCH_TICK
                && last_kick.elapsed() >= WATCH_TICK
            {
                last_kick = Instant::now();
                kicks += 1;
                if kicks == 1 || kicks.is_multiple_of(100) {
                    tracing::debug!(
                        side = %src.side,
                        received = info.bytes_received,
                        by_userspace = src.read_by_userspace,
                        redirected,
                        kicks,
                        "sockmap: bytes waiting for the verdict; kicking"
                    );
                }
                let _ = sockopt::set_rcvlowat(src.stream, 1);
            }
            if redirected != last_progress.0 {
                last_progress = (redirected, Instant::now());
            }
            if !pending {
                send.check(src, dst, &dst_info, redirected);
            }
        }
    }

    /// Hands the direction back to userspace for the rest of the
    /// connection. The verdict stops on `src`, so what arrives there stays
    /// on its receive queue and TCP closes the window on a slow reader.
    /// Once `dst`'s far end has acknowledged every redirected byte (the
    /// backlog is empty, so nothing can overtake it), userspace splices
    /// `src` to `dst` until EOF, exactly as plain mode does.
    async fn hand_over(&self, src: &mut Leg<'_>, dst: &mut Leg<'_>) -> DirectionResult {
        self.datapath
            .stop_verdict(src.cookie)
            .map_err(|e| (Side::Internal, io::Error::other(e)))?;
        // A verdict already running on another CPU holds the socket lock;
        // setsockopt takes it, so the counts read below are final.
        sockopt::set_rcvlowat(src.stream, 1).map_err(|e| (src.side, e))?;
        let state = self.datapath.state(src.cookie);
        if state.flags & STATE_TRIM_FAILED != 0 {
            return Err(trim_failed(src.side));
        }
        if state.passed != src.passed_read {
            // Passed between the last check and the stop: those bytes sit
            // on the psock's queue, which nothing reads once the verdict is
            // off. Never seen; loud rather than a gap in the stream.
            return Err((
                Side::Internal,
                io::Error::other(format!(
                    "sockmap hand-over: {} bytes passed to the {} socket during the hand-over; \
                     resetting",
                    state.passed - src.passed_read,
                    src.side
                )),
            ));
        }
        tracing::debug!(
            from = %src.side,
            redirected = state.bytes,
            "sockmap: backlog over the limit; handing the direction to userspace"
        );
        self.wait_acknowledged(src, dst, state.bytes).await?;
        check_handover_books(src, state.bytes).await?;
        let spliced = self
            .fallback
            .direction(src.stream, dst.stream, src.side, dst.side)
            .await?;
        Ok(dst.written_by_userspace + state.bytes + spliced)
    }

    /// Waits, without a deadline (a slow reader is allowed to be slow), until
    /// `dst`'s far end has acknowledged everything sent to it.
    async fn wait_acknowledged(
        &self,
        src: &Leg<'_>,
        dst: &Leg<'_>,
        redirected: u64,
    ) -> Result<(), (Side, io::Error)> {
        let mut send = SendWatch::new();
        let mut poll = DRAIN_POLL;
        while !send.check(src, dst, &tcp_info(dst)?, redirected) {
            if let Some(e) = dst.stream.take_error().map_err(|e| (dst.side, e))? {
                return Err((dst.side, e));
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(WATCH_TICK);
        }
        Ok(())
    }

    /// Waits until everything `src` received has been acknowledged by
    /// `dst`'s peer. Returns the bytes redirected from `src`.
    async fn drain(&self, src: &mut Leg<'_>, dst: &mut Leg<'_>) -> Result<u64, (Side, io::Error)> {
        let mut buf = Vec::new();
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut send = SendWatch::new();
        loop {
            let (redirected, info) = self.check_books(src)?;
            let received = data_received(&info);
            if src.read_by_userspace + redirected < received {
                // Passed to this socket and unread, or queued but not yet
                // through the verdict.
                self.forward_passed(src, dst, &mut buf).await?;
                let _ = sockopt::set_rcvlowat(src.stream, 1);
            } else {
                if send.check(src, dst, &tcp_info(dst)?, redirected) {
                    return Ok(redirected);
                }
                if let Some(e) = dst.stream.take_error().map_err(|e| (dst.side, e))? {
                    return Err((dst.side, e));
                }
            }
            if Instant::now() > deadline {
                return Err((
                    Side::Internal,
                    io::Error::other(format!(
                        "sockmap drain timed out: {received} bytes received, {} redirected",
                        redirected + src.read_by_userspace
                    )),
                ));
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    /// Reads the bytes the verdict passed to `src` and forwards them by
    /// hand, then tells the verdict how far userspace got: until then it
    /// keeps passing rather than redirecting, so order holds. Returns true
    /// at EOF.
    async fn forward_passed(
        &self,
        src: &mut Leg<'_>,
        dst: &mut Leg<'_>,
        buf: &mut Vec<u8>,
    ) -> Result<bool, (Side, io::Error)> {
        if buf.is_empty() {
            buf.resize(PREARM_READ_BYTES, 0);
        }
        let before = src.read_by_userspace;
        let eof = forward_readable(src, dst, buf).await?;
        if src.read_by_userspace > before {
            src.passed_read += src.read_by_userspace - before;
            self.datapath
                .set_user_read(src.cookie, src.passed_read)
                .map_err(|e| (Side::Internal, io::Error::other(e)))?;
        }
        Ok(eof)
    }

    /// The tripwire: the verdict can never have redirected more than TCP
    /// received. Returns the bytes redirected and the socket's `TCP_INFO`.
    ///
    /// The redirect count is read before `TCP_INFO`: both only grow, so
    /// redirected(t1) <= received(t1) <= received(t2) holds for a correct
    /// stream. Read the other way round, skbs that arrive between the two
    /// reads look like duplicates.
    fn check_books(&self, src: &Leg<'_>) -> Result<(u64, TcpInfo), (Side, io::Error)> {
        let redirected = self.datapath.redirected(src.cookie);
        let info = tcp_info(src)?;
        let received = data_received(&info);
        if src.read_by_userspace + redirected > received {
            return Err((
                Side::Internal,
                io::Error::other(format!(
                    "sockmap tripwire: {} bytes forwarded from {} ({} by userspace) but only \
                     {received} received; resetting rather than delivering a corrupt stream \
                     (overlaps trimmed {}, duplicates dropped {}, trim failures {})",
                    src.read_by_userspace + redirected,
                    src.side,
                    src.read_by_userspace,
                    self.datapath.counter(Counter::OverlapsTrimmed),
                    self.datapath.counter(Counter::DuplicatesDropped),
                    self.datapath.counter(Counter::TrimFailures),
                )),
            ));
        }
        Ok((redirected, info))
    }
}

/// Watches one direction's far side: have the bytes redirected to `dst`
/// been acknowledged by its peer? Kicks `dst`'s psock backlog when its
/// acknowledgements stall with bytes outstanding (seen here: about 2 in
/// 100 full-duplex 1 GiB runs stalled with nothing pending at the source).
struct SendWatch {
    acked: u64,
    since: Instant,
    kicks: u64,
}

impl SendWatch {
    fn new() -> Self {
        Self {
            acked: 0,
            since: Instant::now(),
            kicks: 0,
        }
    }

    /// True when everything sent to `dst` has been acknowledged, judged
    /// from `dst_info` (`dst`'s `TCP_INFO`, read by the caller).
    fn check(&mut self, src: &Leg<'_>, dst: &Leg<'_>, dst_info: &TcpInfo, redirected: u64) -> bool {
        let acked = dst_info.bytes_acked.saturating_sub(dst.acked_baseline);
        let owed = dst.written_by_userspace + redirected;
        if acked >= owed {
            return true;
        }
        if acked != self.acked {
            self.acked = acked;
            self.since = Instant::now();
        } else if self.since.elapsed() >= SEND_STALL {
            self.kicks += 1;
            if self.kicks == 1 || self.kicks.is_multiple_of(50) {
                tracing::debug!(
                    from = %src.side,
                    to = %dst.side,
                    acked,
                    owed,
                    kicks = self.kicks,
                    "sockmap: redirected bytes not acknowledged; kicking the backlog"
                );
            }
            let _ = sockopt::kick_write_space(dst.stream);
            self.since = Instant::now();
        }
        false
    }
}

/// Before userspace reads `src` itself: TCP's read position must sit
/// exactly after the bytes already forwarded, or a splice would skip or
/// repeat some. Checked as received = forwarded + still queued. Nothing
/// reads `src` now, so its queue only grows: the same queue length before
/// and after `TCP_INFO` means nothing arrived in between. A queue that
/// never holds still (the window closes within milliseconds once nothing
/// reads) is not spliced unchecked: the connection is reset.
async fn check_handover_books(src: &Leg<'_>, redirected: u64) -> Result<(), (Side, io::Error)> {
    let forwarded = src.read_by_userspace + redirected;
    for _ in 0..HANDOVER_BOOK_TRIES {
        let queued = sock_diag::tcp_receive_queue(src.stream).map_err(|e| (src.side, e))?;
        let info = tcp_info(src)?;
        let again = sock_diag::tcp_receive_queue(src.stream).map_err(|e| (src.side, e))?;
        if queued != again {
            tokio::time::sleep(DRAIN_POLL).await;
            continue;
        }
        let received = data_received(&info);
        if forwarded + u64::from(queued) == received {
            return Ok(());
        }
        return Err((
            Side::Internal,
            io::Error::other(format!(
                "sockmap hand-over: the {} socket received {received} bytes, {forwarded} \
                 were forwarded and {queued} are queued; resetting rather than reading \
                 from the wrong place",
                src.side
            )),
        ));
    }
    Err((
        Side::Internal,
        io::Error::other(format!(
            "sockmap hand-over: the {} socket's receive queue kept growing; its books could \
             not be checked, resetting",
            src.side
        )),
    ))
}

/// Bytes redirected to `dst` that its psock still holds: sent to it
/// (by the verdict or by hand) but neither acknowledged by its far end
/// nor in its send queue. Socket buffers bound the rest.
fn redirect_backlog(
    dst: &Leg<'_>,
    dst_info: &TcpInfo,
    redirected: u64,
) -> Result<u64, (Side, io::Error)> {
    let queued = sockopt::send_queue_bytes(dst.stream).map_err(|e| (dst.side, e))?;
    let acked = dst_info.bytes_acked.saturating_sub(dst.acked_baseline);
    Ok((dst.written_by_userspace + redirected).saturating_sub(acked + queued))
}

/// A leg's `TCP_INFO`, an error blamed on its side.
fn tcp_info(leg: &Leg<'_>) -> Result<TcpInfo, (Side, io::Error)> {
    sockopt::tcp_info(leg.stream).map_err(|e| (leg.side, e))
}

fn trim_failed(side: Side) -> (Side, io::Error) {
    (
        Side::Internal,
        io::Error::other(format!(
            "sockmap: the kernel handed the {side} socket an skb overlapping bytes already \
             redirected, too large to trim; resetting"
        )),
    )
}

/// Payload bytes received; after the peer's FIN `tcpi_bytes_received`
/// also counts the FIN's sequence number.
fn data_received(info: &TcpInfo) -> u64 {
    if sockopt::TCP_STATES_AFTER_PEER_FIN.contains(&info.state) {
        info.bytes_received.saturating_sub(1)
    } else {
        info.bytes_received
    }
}

fn leg(stream: &TcpStream, side: Side) -> io::Result<Leg<'_>> {
    Ok(Leg {
        stream,
        cookie: SockRef::from(stream).cookie()?,
        side,
        read_by_userspace: 0,
        written_by_userspace: 0,
        passed_read: 0,
        acked_baseline: sockopt::tcp_info(stream)?.bytes_acked,
    })
}

/// Reads whatever each socket holds right now and forwards it by hand, so
/// that no skb is left half-read when the sockets are armed. Returns
/// whether each side has already sent its FIN.
async fn drain_readable(
    client: &mut Leg<'_>,
    upstream: &mut Leg<'_>,
) -> Result<(bool, bool), (Side, io::Error)> {
    let mut buf = vec![0u8; PREARM_READ_BYTES];
    let c_eof = forward_readable(client, upstream, &mut buf).await?;
    let u_eof = forward_readable(upstream, client, &mut buf).await?;
    Ok((c_eof, u_eof))
}

async fn forward_readable(
    src: &mut Leg<'_>,
    dst: &mut Leg<'_>,
    buf: &mut [u8],
) -> Result<bool, (Side, io::Error)> {
    loop {
        match src.stream.try_read(buf) {
            Ok(0) => return Ok(true),
            Ok(n) => {
                write_all(dst.stream, &buf[..n])
                    .await
                    .map_err(|e| (dst.side, e))?;
                src.read_by_userspace += n as u64;
                dst.written_by_userspace += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err((src.side, e)),
        }
    }
}
