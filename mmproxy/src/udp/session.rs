//! UDP sessions: one per (balancer address:port, client address:port),
//! each with its own spoofed upstream socket connected to the backend,
//! and a task that relays the backend's replies to the balancer.
//!
//! The table is shared by every listening socket (`--listeners N`): the
//! kernel may hash one balancer's datagrams to different sockets, and
//! they must still meet the same session. It is bounded (least recently
//! used first out) and swept for idle sessions.

use std::{
    cell::RefCell,
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use lru::LruCache;
use tokio::{io::Interest, net::UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::policy::Route;

use super::{
    frontend::{FrontendSocket, MAX_DATAGRAM},
    kernel::Offload,
    stats::{UdpStats, add_datagram, add_kernel_counts, inc},
};

/// What identifies a session. Two clients behind one balancer address
/// differ in `client`; one client seen through two balancers (or two
/// balancer sockets) differs in `frontend`, and replies must go back the
/// way they came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub frontend: SocketAddr,
    /// `None` for LOCAL headers: the balancer's own traffic, not spoofed.
    pub client: Option<SocketAddr>,
    /// With `--dynamic-destination`, the header's destination: one client
    /// talking to two services is two sessions, never one that sends
    /// everything to whichever destination came first. `None` otherwise.
    pub destination: Option<SocketAddr>,
}

/// Milliseconds since the table was made: cheap to store in an atomic.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// One client flow.
#[derive(Debug)]
pub struct Session {
    pub key: SessionKey,
    pub route: Route,
    upstream: UdpSocket,
    /// The listening socket the flow arrived on: replies leave through it.
    frontend: Arc<FrontendSocket>,
    /// The local address the balancer sent to: replies come from it.
    reply_from: Option<IpAddr>,
    clock: Clock,
    last_active_ms: AtomicU64,
    /// The upstream socket failed for good; the next datagram reopens.
    failed: AtomicBool,
    closed: CancellationToken,
    /// ebpf mode: the session's entries in the kernel path, once handed
    /// over; taken out when the session closes or fails.
    offload: Mutex<Option<Offload>>,
    stats: Arc<UdpStats>,
}

thread_local! {
    /// Replies are read here, one runtime thread at a time, so that ten
    /// thousand idle sessions do not each hold a 64 KiB buffer.
    static REPLY_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM]);
}

/// What reading one reply led to.
enum ReplyStep {
    Sent,
    /// The balancer's socket was full: this copy waits for room.
    Pending(Vec<u8>),
    Drained,
    Unreachable,
    Failed(io::Error),
}

impl Session {
    /// Wraps a connected upstream socket and starts relaying its replies.
    pub fn start(
        key: SessionKey,
        route: Route,
        upstream: std::net::UdpSocket,
        frontend: Arc<FrontendSocket>,
        reply_from: Option<IpAddr>,
        clock: Clock,
        stats: Arc<UdpStats>,
    ) -> io::Result<Arc<Self>> {
        let session = Arc::new(Self {
            key,
            route,
            upstream: UdpSocket::from_std(upstream)?,
            frontend,
            reply_from,
            clock,
            last_active_ms: AtomicU64::new(clock.now_ms()),
            failed: AtomicBool::new(false),
            closed: CancellationToken::new(),
            offload: Mutex::new(None),
            stats,
        });
        tokio::spawn(session.clone().relay_replies());
        Ok(session)
    }

    /// Sends one payload to the backend. Never waits: a full socket
    /// buffer drops the datagram (counted), as a congested router would,
    /// rather than stalling every other session behind this one. The
    /// send goes straight to the kernel: tokio's `try_send` would report
    /// `WouldBlock` on a fresh socket whose writability the reactor has
    /// not seen yet, dropping every session's first datagram.
    pub fn forward(&self, payload: &[u8], now_ms: u64) {
        let stats = &self.stats;
        self.touch(now_ms);
        for attempt in 0..2 {
            match rustix::net::send(&self.upstream, payload, rustix::net::SendFlags::DONTWAIT)
                .map_err(io::Error::from)
            {
                Ok(_) => {
                    add_datagram(&stats.forwarded, &stats.forwarded_bytes, payload.len());
                    return;
                }
                // A connected UDP socket reports an ICMP error caused by
                // an earlier datagram on the next call, once; the socket
                // is fine afterwards, so this datagram is sent again.
                Err(e) if is_icmp_error(&e) && attempt == 0 => inc(&stats.upstream_unreachable),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    inc(&stats.upstream_full);
                    return;
                }
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                    inc(&stats.oversize);
                    debug!(client = ?self.key.client, len = payload.len(), backend = %self.route.backend,
                           "datagram too large for the upstream path; dropped");
                    return;
                }
                Err(e) => {
                    inc(&stats.send_errors);
                    debug!(client = ?self.key.client, error = %e, "sending to the backend failed");
                    return;
                }
            }
        }
    }

    /// The upstream socket's own address (the client's, or an ephemeral
    /// port where the client's was taken).
    pub fn upstream_addr(&self) -> Option<SocketAddr> {
        self.upstream.local_addr().ok()
    }

    pub fn is_failed(&self) -> bool {
        self.failed.load(Relaxed)
    }

    pub fn idle_since(&self) -> u64 {
        self.last_active_ms.load(Relaxed)
    }

    /// Stops the reply task and takes the session out of the kernel path;
    /// the socket closes with the last reference.
    pub fn close(&self) {
        self.closed.cancel();
        self.end_offload();
    }

    /// Records that the kernel path now carries this session.
    pub fn set_offload(&self, offload: Offload) {
        *self.offload_slot() = Some(offload);
    }

    pub fn is_offloaded(&self) -> bool {
        self.offload_slot().is_some()
    }

    /// Adds what the kernel did for this session since the last call to
    /// the counters; traffic either way keeps it from going idle, as in
    /// userspace. Returns whether the balancer sent any (what orders the
    /// table for eviction).
    pub fn sync_kernel(&self, now_ms: u64) -> bool {
        let Some(counts) = self.offload_slot().as_ref().map(Offload::take_new_counts) else {
            return false;
        };
        add_kernel_counts(&self.stats, &counts);
        if counts.forwarded > 0 || counts.replied > 0 {
            self.touch(now_ms);
        }
        counts.forwarded > 0
    }

    /// Takes the session out of the kernel path, counting what it did.
    pub fn end_offload(&self) {
        if let Some(offload) = self.offload_slot().take() {
            add_kernel_counts(&self.stats, &offload.remove());
        }
    }

    fn offload_slot(&self) -> std::sync::MutexGuard<'_, Option<Offload>> {
        self.offload
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn touch(&self, now_ms: u64) {
        // Skip the store when nothing changed: the line is shared with the
        // reply task's core.
        if self.last_active_ms.load(Relaxed) != now_ms {
            self.last_active_ms.store(now_ms, Relaxed);
        }
    }

    async fn relay_replies(self: Arc<Self>) {
        let stats = &self.stats;
        loop {
            // Errors too: in ebpf mode the kernel forwards the flow and no
            // send of ours would pick up an ICMP error the backend caused.
            let ready = tokio::select! {
                () = self.closed.cancelled() => return,
                ready = self.upstream.ready(Interest::READABLE | Interest::ERROR) => match ready {
                    Ok(ready) => ready,
                    Err(e) => {
                        self.fail(&e);
                        return;
                    }
                },
            };
            if ready.is_error() && !ready.is_readable() {
                if self.take_error() {
                    return;
                }
                continue;
            }
            loop {
                match self.read_and_reply() {
                    ReplyStep::Sent => {}
                    ReplyStep::Pending(copy) => {
                        if let Err(e) = self.send_reply(&copy).await {
                            inc(&stats.send_errors);
                            debug!(frontend = %self.key.frontend, error = %e, "reply to the balancer failed");
                        } else {
                            add_datagram(&stats.replied, &stats.replied_bytes, copy.len());
                        }
                    }
                    ReplyStep::Unreachable => inc(&stats.upstream_unreachable),
                    ReplyStep::Drained => break,
                    ReplyStep::Failed(e) => {
                        self.fail(&e);
                        return;
                    }
                }
                // A backend that answers without pause would otherwise
                // keep this loop (and its worker) busy forever.
                tokio::task::consume_budget().await;
            }
            self.touch(self.clock.now_ms());
        }
    }

    /// Reads and clears the socket's pending error (`SO_ERROR`): an ICMP
    /// error from the backend's path is counted, as a failed send counts
    /// it; any other fails the session (`true`), as a failed read does.
    fn take_error(&self) -> bool {
        let mut failed = false;
        let _ = self.upstream.try_io(Interest::ERROR, || {
            match self.upstream.take_error() {
                Ok(Some(e)) if is_icmp_error(&e) => inc(&self.stats.upstream_unreachable),
                Ok(Some(e)) => {
                    self.fail(&e);
                    failed = true;
                }
                Ok(None) | Err(_) => {}
            }
            // Clears tokio's error readiness until the next error.
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
        failed
    }

    fn read_and_reply(&self) -> ReplyStep {
        let stats = &self.stats;
        REPLY_BUF.with_borrow_mut(|buf| match self.upstream.try_recv(buf) {
            Ok(len) => match self.frontend.try_send(&buf[..len], self.key.frontend, self.reply_from) {
                Ok(()) => {
                    add_datagram(&stats.replied, &stats.replied_bytes, len);
                    ReplyStep::Sent
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ReplyStep::Pending(buf[..len].to_vec())
                }
                Err(e) => {
                    inc(&stats.send_errors);
                    debug!(frontend = %self.key.frontend, error = %e, "reply to the balancer failed");
                    ReplyStep::Sent
                }
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ReplyStep::Drained,
            Err(e) if is_icmp_error(&e) => ReplyStep::Unreachable,
            Err(e) => ReplyStep::Failed(e),
        })
    }

    async fn send_reply(&self, payload: &[u8]) -> io::Result<()> {
        self.frontend
            .send(payload, self.key.frontend, self.reply_from)
            .await
    }

    fn fail(&self, e: &io::Error) {
        inc(&self.stats.sessions_failed);
        // The next datagram must reach userspace to reopen the session.
        self.end_offload();
        debug!(client = ?self.key.client, error = %e, "upstream socket failed; the next datagram reopens the session");
        self.failed.store(true, Relaxed);
    }
}

/// Errors a connected UDP socket reports for an ICMP message about an
/// earlier datagram (port, host or network unreachable).
fn is_icmp_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN)
    )
}

/// Every open session, bounded and shared by all listening sockets.
#[derive(Debug)]
pub struct SessionTable {
    inner: Mutex<Inner>,
    capacity: usize,
    /// Most sessions one client address may hold (0: no cap), so one
    /// client cannot push everyone else out of the table.
    per_client: usize,
}

#[derive(Debug)]
struct Inner {
    /// Ordered by the balancer side's use; the cap evicts from the back.
    sessions: LruCache<SessionKey, Arc<Session>>,
    /// `--udp-header first`: the session each balancer address:port
    /// announced in its last header.
    flows: HashMap<SocketAddr, SessionKey>,
    /// Sessions per client address (spoofed sessions only).
    per_client: HashMap<IpAddr, usize>,
}

impl SessionTable {
    pub fn new(capacity: usize, per_client: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                sessions: LruCache::unbounded(),
                flows: HashMap::new(),
                per_client: HashMap::new(),
            }),
            capacity,
            per_client,
        }
    }

    /// Whether `key`'s client may open one more session.
    pub fn client_has_room(&self, key: &SessionKey) -> bool {
        let Some(client) = key.client else {
            return true;
        };
        self.per_client == 0
            || self
                .lock()
                .per_client
                .get(&client.ip())
                .is_none_or(|&n| n < self.per_client)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map half-updated
        // in a way that matters more than losing every session.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The session for `key`, marked as just used.
    pub fn get(&self, key: &SessionKey) -> Option<Arc<Session>> {
        self.lock().sessions.get(key).cloned()
    }

    /// The session a headerless datagram from `frontend` belongs to.
    pub fn flow(&self, frontend: SocketAddr) -> Option<SessionKey> {
        self.lock().flows.get(&frontend).copied()
    }

    /// Remembers which client `frontend`'s headerless datagrams belong to.
    pub fn remember_flow(&self, key: SessionKey) {
        let mut inner = self.lock();
        if inner.flows.get(&key.frontend) != Some(&key) {
            inner.flows.insert(key.frontend, key);
        }
    }

    /// Inserts `session`, replacing a failed one with the same key.
    /// Returns the session to use (an existing healthy one wins a race
    /// between two listening sockets) and the sessions closed to make
    /// room, which the caller counts.
    pub fn insert(&self, session: Arc<Session>) -> (Arc<Session>, Vec<Arc<Session>>) {
        let mut inner = self.lock();
        if let Some(existing) = inner.sessions.get(&session.key)
            && !existing.is_failed()
        {
            let existing = existing.clone();
            drop(inner);
            session.close();
            return (existing, Vec::new());
        }
        if !inner.sessions.contains(&session.key) && inner.sessions.len() >= self.capacity {
            inner.refresh_least_recent();
        }
        let mut evicted = Vec::new();
        match inner.sessions.put(session.key, session.clone()) {
            Some(old) => old.close(),
            None => inner.count(&session.key, true),
        }
        while inner.sessions.len() > self.capacity {
            let Some((_, old)) = inner.sessions.pop_lru() else {
                break;
            };
            inner.forget_flow(&old.key);
            inner.count(&old.key, false);
            old.close();
            evicted.push(old);
        }
        (session, evicted)
    }

    /// Closes and removes sessions idle for `idle` or longer.
    pub fn expire(&self, now_ms: u64, idle: Duration) -> usize {
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        let mut inner = self.lock();
        let expired: Vec<SessionKey> = inner
            .sessions
            .iter()
            .filter(|(_, s)| now_ms.saturating_sub(s.idle_since()) >= idle_ms)
            .map(|(k, _)| *k)
            .collect();
        for key in &expired {
            if let Some(session) = inner.sessions.pop(key) {
                session.close();
                inner.count(key, false);
            }
            inner.forget_flow(key);
        }
        expired.len()
    }

    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    /// The sessions the kernel path carries (a snapshot: the caller reads
    /// their kernel counters without holding the table's lock).
    pub fn offloaded(&self) -> Vec<Arc<Session>> {
        self.lock()
            .sessions
            .iter()
            .filter(|(_, s)| s.is_offloaded())
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// Marks a session as just used (the kernel saw its traffic).
    pub fn promote(&self, key: &SessionKey) {
        self.lock().sessions.promote(key);
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every session (shutdown).
    pub fn close_all(&self) {
        let mut inner = self.lock();
        for (_, session) in &inner.sessions {
            session.close();
        }
        inner.sessions.clear();
        inner.flows.clear();
        inner.per_client.clear();
    }
}

impl Inner {
    /// ebpf mode: before the least recently used session is evicted, asks
    /// the kernel whether the balancer has used it (or the next ones)
    /// since the daemon last looked, and moves those up. Each session is
    /// asked once; a session with no kernel path answers no at once.
    fn refresh_least_recent(&mut self) {
        for _ in 0..self.sessions.len() {
            let Some((&key, lru)) = self.sessions.peek_lru() else {
                return;
            };
            if !lru.sync_kernel(lru.clock.now_ms()) {
                return;
            }
            self.sessions.promote(&key);
        }
    }

    /// Keeps `per_client` in step with `sessions`.
    fn count(&mut self, key: &SessionKey, added: bool) {
        let Some(client) = key.client else { return };
        let n = self.per_client.entry(client.ip()).or_default();
        if added {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_client.remove(&client.ip());
            }
        }
    }

    fn forget_flow(&mut self, key: &SessionKey) {
        if self.flows.get(&key.frontend) == Some(key) {
            self.flows.remove(&key.frontend);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frontend() -> Arc<FrontendSocket> {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        socket.bind(&addr.into()).unwrap();
        Arc::new(FrontendSocket::new(socket, false).unwrap())
    }

    fn session(client_port: u16, clock: Clock) -> Arc<Session> {
        let upstream = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        upstream.set_nonblocking(true).unwrap();
        upstream.connect("127.0.0.1:9").unwrap();
        let key = SessionKey {
            frontend: "127.0.0.1:1000".parse().unwrap(),
            client: Some(SocketAddr::new("192.0.2.1".parse().unwrap(), client_port)),
            destination: None,
        };
        let route = Route {
            backend: "127.0.0.1:9".parse().unwrap(),
            source: key.client,
        };
        Session::start(
            key,
            route,
            upstream,
            frontend(),
            None,
            clock,
            Arc::default(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn the_cap_evicts_the_least_recently_used() {
        let (table, clock) = (SessionTable::new(2, 0), Clock::new());
        let (a, b, c) = (session(1, clock), session(2, clock), session(3, clock));
        assert!(table.insert(a.clone()).1.is_empty());
        assert!(table.insert(b.clone()).1.is_empty());
        assert!(table.get(&a.key).is_some(), "a is now the most recent");
        let (_, evicted) = table.insert(c.clone());
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].key, b.key);
        assert!(b.closed.is_cancelled(), "an evicted session is closed");
        assert_eq!(table.len(), 2);
    }

    #[tokio::test]
    async fn a_healthy_session_wins_a_race_and_a_failed_one_is_replaced() {
        let (table, clock) = (SessionTable::new(10, 0), Clock::new());
        let (first, second) = (session(1, clock), session(1, clock));
        table.insert(first.clone());
        let (winner, _) = table.insert(second.clone());
        assert!(Arc::ptr_eq(&winner, &first));
        assert!(second.closed.is_cancelled());
        first.failed.store(true, Relaxed);
        let third = session(1, clock);
        let (winner, _) = table.insert(third.clone());
        assert!(Arc::ptr_eq(&winner, &third));
        assert!(first.closed.is_cancelled());
    }

    #[tokio::test]
    async fn idle_sessions_expire_with_their_flow() {
        let (table, clock) = (SessionTable::new(10, 0), Clock::new());
        let (idle, busy) = (session(1, clock), session(2, clock));
        table.insert(idle.clone());
        table.insert(busy.clone());
        table.remember_flow(idle.key);
        idle.last_active_ms.store(0, Relaxed);
        busy.last_active_ms.store(5_000, Relaxed);
        assert_eq!(table.expire(6_000, Duration::from_secs(2)), 1);
        assert!(table.get(&idle.key).is_none());
        assert!(table.get(&busy.key).is_some());
        assert_eq!(
            table.flow(idle.key.frontend),
            None,
            "the flow goes with its session"
        );
        assert!(idle.closed.is_cancelled());
    }

    #[tokio::test]
    async fn one_client_is_capped_and_its_count_follows_the_table() {
        let (table, clock) = (SessionTable::new(10, 2), Clock::new());
        let (a, b, c) = (session(1, clock), session(2, clock), session(3, clock));
        assert!(table.client_has_room(&a.key));
        table.insert(a.clone());
        table.insert(b.clone());
        assert!(!table.client_has_room(&c.key), "192.0.2.1 holds 2 of 2");
        a.last_active_ms.store(0, Relaxed);
        b.last_active_ms.store(5_000, Relaxed);
        assert_eq!(table.expire(6_000, Duration::from_secs(2)), 1);
        assert!(
            table.client_has_room(&c.key),
            "the expired one is uncounted"
        );
        let local = SessionKey {
            client: None,
            ..c.key
        };
        assert!(
            table.client_has_room(&local),
            "LOCAL sessions are not a client's"
        );
    }
}
