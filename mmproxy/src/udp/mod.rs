//! The UDP proxy, in userspace.
//!
//! A datagram's path: [`frontend::FrontendSocket`] receives it with the
//! local address it was sent to; [`UdpProxy::on_datagram`] checks the
//! sender against `--allowed-subnets`, strips the PROXY v2 DGRAM header
//! (the same parser as TCP), and finds or opens the client's
//! [`session::Session`], whose spoofed, connected upstream socket sends
//! the payload to the backend. The session's task relays replies back to
//! the balancer from the address the balancer sent to. A sweeper closes
//! idle sessions (`--close-after`).
//!
//! Datagrams are forwarded whole or dropped, never cut: every drop is
//! counted by reason in [`stats::UdpStats`].
//!
//! In ebpf mode ([`kernel`]) a session, once open, is also written into
//! the kernel path's maps, and its later datagrams and replies no longer
//! pass through here.

pub mod frontend;
pub mod kernel;
pub mod session;
pub mod stats;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use mmproxy_common::udp::LOOPBACK_IFINDEX;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use self::{
    frontend::{Datagram, FrontendSocket, RecvBatch},
    kernel::{KernelPath, SessionRoute},
    session::{Clock, Session, SessionKey, SessionTable},
    stats::{UdpStats, inc},
};
use crate::{
    config::{AllowedSubnets, Config},
    error::error_chain,
    options::UdpHeaderMode,
    policy::{LogLimiter, REFUSAL_LOG_INTERVAL, Route},
    proxy_protocol::{self, Status, Transport},
    upstream::{self, UpstreamOptions},
};

pub use frontend::MAX_DATAGRAM;

/// Pause after a failed receive, doubling up to the maximum while the
/// failures last (the accept loops do the same).
const RECV_BACKOFF_START: Duration = Duration::from_millis(1);
const RECV_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What every listening socket shares.
#[derive(Debug)]
pub struct UdpProxy {
    config: Arc<Config>,
    upstream: UpstreamOptions,
    allowed: Arc<ArcSwap<AllowedSubnets>>,
    sessions: SessionTable,
    clock: Clock,
    pub stats: Arc<UdpStats>,
    /// Paces the warnings for refused headers.
    refusal_log: LogLimiter,
    /// ebpf mode: the kernel path sessions are handed to.
    kernel: Option<Arc<KernelPath>>,
}

/// Where a datagram's payload goes.
struct Classified<'a> {
    key: SessionKey,
    /// `None`: no header (first-datagram mode); the session knows.
    route: Option<Route>,
    /// The header's destination (`None` without a header).
    header_destination: Option<SocketAddr>,
    payload: &'a [u8],
}

impl UdpProxy {
    pub fn new(
        config: Arc<Config>,
        upstream: UpstreamOptions,
        allowed: Arc<ArcSwap<AllowedSubnets>>,
        kernel: Option<Arc<KernelPath>>,
    ) -> Self {
        Self {
            sessions: SessionTable::new(
                config.max_udp_sessions as usize,
                config.max_udp_sessions_per_client as usize,
            ),
            config,
            upstream,
            allowed,
            clock: Clock::new(),
            stats: Arc::default(),
            refusal_log: LogLimiter::new(REFUSAL_LOG_INTERVAL),
            kernel,
        }
    }

    /// The kernel path, in ebpf mode.
    pub fn kernel(&self) -> Option<&KernelPath> {
        self.kernel.as_deref()
    }

    /// Open sessions now.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Receives on one listening socket until `shutdown`.
    pub async fn serve(self: Arc<Self>, socket: Arc<FrontendSocket>, shutdown: CancellationToken) {
        let mut batch = RecvBatch::new(MAX_DATAGRAM);
        let mut backoff = RECV_BACKOFF_START;
        loop {
            let received = tokio::select! {
                r = socket.recv_batch(&mut batch) => r,
                () = shutdown.cancelled() => return,
            };
            match received {
                Ok(()) => {
                    backoff = RECV_BACKOFF_START;
                    for (data, meta) in batch.datagrams() {
                        self.on_datagram(&socket, data, meta);
                    }
                    // A flood keeps the socket ready, so nothing else
                    // would ever make this task yield its worker.
                    tokio::task::consume_budget().await;
                }
                Err(e) => {
                    // ENOBUFS/ENOMEM: the datagram is gone, the socket is
                    // fine. Back off, so a lasting shortage neither spins
                    // nor floods the log.
                    warn!(error = %e, retry_in = ?backoff, "receiving a datagram failed");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(RECV_BACKOFF_MAX);
                }
            }
        }
    }

    /// Closes idle sessions every so often until `shutdown`, then all.
    pub async fn sweep(self: Arc<Self>, shutdown: CancellationToken) {
        let idle = self.config.udp_idle_timeout;
        let period = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => break,
            }
            self.sync_kernel();
            let expired = self.sessions.expire(self.clock.now_ms(), idle);
            if expired > 0 {
                self.stats
                    .sessions_expired
                    .fetch_add(expired as u64, std::sync::atomic::Ordering::Relaxed);
                debug!(
                    expired,
                    open = self.sessions.len(),
                    "idle UDP sessions closed"
                );
            }
        }
        self.sessions.close_all();
    }

    /// Reads what the kernel path did for each session it carries into
    /// the counters, keeps sessions it saw traffic on alive, and takes
    /// back from it any session whose balancer a reloaded
    /// `--allowed-subnets` no longer allows (userspace then drops its
    /// datagrams, as in plain mode).
    fn sync_kernel(&self) {
        if self.kernel.is_none() {
            return;
        }
        let allowed = self.allowed.load();
        let now = self.clock.now_ms();
        for session in self.sessions.offloaded() {
            if session.sync_kernel(now) {
                self.sessions.promote(&session.key);
            }
            if !allowed.allows(session.key.frontend.ip().to_canonical()) {
                session.end_offload();
            }
        }
    }

    fn on_datagram(&self, socket: &Arc<FrontendSocket>, data: &[u8], meta: Datagram) {
        inc(&self.stats.received);
        inc(&self.stats.userspace_received);
        if !self.allowed.load().allows(meta.from.ip().to_canonical()) {
            inc(&self.stats.refused_peer);
            debug!(peer = %meta.from, "datagram from a peer not in --allowed-subnets; dropped");
            return;
        }
        if meta.truncated {
            inc(&self.stats.oversize);
            debug!(peer = %meta.from, "datagram larger than {MAX_DATAGRAM} bytes; dropped");
            return;
        }
        let Some(c) = self.classify(data, meta.from) else {
            return;
        };
        let Some((session, opened)) = self.session_for(c.key, c.route, socket, meta) else {
            return;
        };
        session.forward(c.payload, self.clock.now_ms());
        // Handed to the kernel only after its first datagram is on its
        // way, so the kernel's first one cannot overtake it.
        if opened
            && let Some(destination) = c.header_destination
            && let Some(ifindex) = balancer_device(&meta)
        {
            self.offload(&session, (socket.local_for(&meta), ifindex), destination);
        }
    }

    /// ebpf mode: writes a new session into the kernel path. `arrival`:
    /// the local address the balancer sent to, and the device it came in.
    fn offload(
        &self,
        session: &Session,
        arrival: (SocketAddr, u32),
        header_destination: SocketAddr,
    ) {
        let (listener, balancer_ifindex) = arrival;
        let (Some(kernel), Some(client), Some(upstream)) =
            (&self.kernel, session.key.client, session.upstream_addr())
        else {
            return;
        };
        let route = SessionRoute {
            balancer: session.key.frontend,
            balancer_ifindex,
            listener,
            client,
            header_destination,
            upstream,
            backend: session.route.backend,
        };
        if let Err(why) = kernel::eligibility(&route) {
            debug!(client = %client, backend = %route.backend, ?why, "UDP session stays in userspace");
            return;
        }
        match kernel.offload(&route) {
            Ok(offload) => {
                session.set_offload(offload);
                inc(&self.stats.sessions_offloaded);
                debug!(client = %client, %listener, balancer_ifindex, "UDP session handed to the kernel path");
            }
            Err(e) => {
                inc(&self.stats.offload_failures);
                debug!(client = %client, error = %e, "cannot hand the UDP session to the kernel; it stays in userspace");
            }
        }
    }

    /// Strips and interprets the header, or maps a headerless datagram to
    /// its flow (`--udp-header first`). `None`: dropped and counted.
    fn classify<'a>(&self, data: &'a [u8], frontend: SocketAddr) -> Option<Classified<'a>> {
        // In first-datagram mode a known flow's datagrams are payload,
        // whatever they look like: a client must not be able to take
        // another identity by sending bytes that parse as a header.
        if self.config.udp_header == UdpHeaderMode::First
            && let Some(key) = self.sessions.flow(frontend)
        {
            return Some(Classified {
                key,
                route: None,
                header_destination: None,
                payload: data,
            });
        }
        let refused = match proxy_protocol::parse(data) {
            Ok(Status::Complete(header, consumed)) => match header.action(Transport::Datagram) {
                Ok(action) => return self.accept_header(action, frontend, &data[consumed..]),
                Err(e) => e.label(),
            },
            Ok(Status::Incomplete) if data.is_empty() => "missing",
            // A datagram is all there is: a partial header is a bad one.
            Ok(Status::Incomplete) => "truncated",
            Err(proxy_protocol::Error::NotProxyProtocol) => "missing",
            Err(e) => e.label(),
        };
        self.stats.header_error(refused);
        debug!(peer = %frontend, reason = refused, "datagram without a valid PROXY v2 DGRAM header; dropped");
        None
    }

    /// Routes a datagram whose header parsed, or drops it if the policy
    /// refuses the header's claim.
    fn accept_header<'a>(
        &self,
        action: proxy_protocol::Action,
        frontend: SocketAddr,
        payload: &'a [u8],
    ) -> Option<Classified<'a>> {
        let header_destination = match action {
            proxy_protocol::Action::Spoof { destination, .. } => Some(destination),
            proxy_protocol::Action::Direct => None,
        };
        let route = match self.config.policy.route(action, frontend) {
            Ok(route) => route,
            Err(refusal) => {
                self.stats.policy_refusal(refusal.label());
                if let Some(suppressed) = self.refusal_log.check() {
                    warn!(peer = %frontend, %refusal, suppressed, "PROXY header refused by the source/destination policy; datagram dropped");
                }
                return None;
            }
        };
        let key = SessionKey {
            frontend,
            client: route.source,
            destination: self
                .config
                .policy
                .dynamic_destinations
                .is_some()
                .then_some(route.backend),
        };
        if self.config.udp_header == UdpHeaderMode::First {
            self.sessions.remember_flow(key);
        }
        Some(Classified {
            key,
            route: Some(route),
            header_destination,
            payload,
        })
    }

    /// The open session for `key`, or a new one (then `true`); a failed
    /// session is reopened on the same route.
    fn session_for(
        &self,
        key: SessionKey,
        route: Option<Route>,
        socket: &Arc<FrontendSocket>,
        meta: Datagram,
    ) -> Option<(Arc<Session>, bool)> {
        let existing = self.sessions.get(&key);
        // The key fixes the route (the backend follows from the client's
        // family, or with --dynamic-destination from the flow's first
        // header): a healthy session is used as it is.
        if let Some(session) = existing.clone()
            && !session.is_failed()
        {
            return Some((session, false));
        }
        // A failed session being reopened already holds its place.
        let reopening = existing.is_some();
        let route = route.or_else(|| existing.map(|s| s.route))?;
        if !reopening && !self.sessions.client_has_room(&key) {
            self.stats.session_error("client_limit");
            debug!(client = ?key.client, cap = self.config.max_udp_sessions_per_client,
                   "client has its share of UDP sessions; datagram dropped");
            return None;
        }
        let opened = self.open(key, route, socket, meta)?;
        let (session, evicted) = self.sessions.insert(opened.clone());
        if !evicted.is_empty() {
            self.stats
                .sessions_evicted
                .fetch_add(evicted.len() as u64, std::sync::atomic::Ordering::Relaxed);
            debug!(
                evicted = evicted.len(),
                cap = self.config.max_udp_sessions,
                "UDP session table full; least recently used closed"
            );
        }
        let is_new = Arc::ptr_eq(&session, &opened);
        Some((session, is_new))
    }

    fn open(
        &self,
        key: SessionKey,
        route: Route,
        socket: &Arc<FrontendSocket>,
        meta: Datagram,
    ) -> Option<Arc<Session>> {
        let opened = upstream::connect_udp(route.backend, route.source, &self.upstream)
            .map_err(|e| (e.label(), error_chain(&e)))
            .and_then(|up| {
                if up.fell_back {
                    debug!(client = ?route.source, local = %up.local, "client port in use; used an ephemeral port");
                }
                Session::start(
                    key,
                    route,
                    up.socket,
                    socket.clone(),
                    meta.to,
                    self.clock,
                    self.stats.clone(),
                )
                .map_err(|e| ("register", e.to_string()))
            });
        match opened {
            Ok(session) => {
                inc(&self.stats.sessions_created);
                debug!(frontend = %key.frontend, client = ?key.client, backend = %route.backend, "UDP session opened");
                Some(session)
            }
            Err((label, why)) => {
                self.stats.session_error(label);
                debug!(frontend = %key.frontend, client = ?key.client, error = %why, "cannot open a UDP session; datagram dropped");
                None
            }
        }
    }
}

/// The device a balancer's datagrams arrive on, which the kernel path
/// sends replies out of. `IP_PKTINFO` names it, except that it reports 0
/// for some datagrams looped back on this host (their route is gone by
/// the time the socket queues them): a balancer on a local address is
/// then on `lo`. `None`: unknown, and the session stays in userspace.
fn balancer_device(meta: &Datagram) -> Option<u32> {
    match meta.ifindex {
        Some(ifindex) if ifindex != 0 => Some(ifindex),
        _ => is_local_address(meta.from.ip().to_canonical()).then_some(LOOPBACK_IFINDEX),
    }
}

/// Whether `ip` is an address of this host: a loopback one, or one a
/// socket can bind without `IP_TRANSPARENT`.
fn is_local_address(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}
