//! UDP counters: what happened to every datagram, for the exit log and
//! the metrics endpoint. Dropping a datagram is normal for UDP; dropping
//! it without counting why is not.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

/// Relaxed atomics: each is a monotonic count read only for reporting.
#[derive(Debug, Default)]
pub struct UdpStats {
    /// Datagrams from balancers, before any check, by either path.
    pub received: AtomicU64,
    /// Of those, the ones the daemon's sockets read (all of them in plain
    /// mode; in ebpf mode, what the kernel path did not take).
    pub userspace_received: AtomicU64,
    /// Datagrams forwarded and replies relayed by the kernel path (ebpf
    /// mode); also counted in `forwarded` and `replied`.
    pub kernel_forwarded: AtomicU64,
    pub kernel_replied: AtomicU64,
    /// Sessions handed to the kernel path, and those it could not take
    /// (a full map; they stay in userspace).
    pub sessions_offloaded: AtomicU64,
    pub offload_failures: AtomicU64,
    /// Payloads sent to backends, and their bytes (headers excluded).
    pub forwarded: AtomicU64,
    pub forwarded_bytes: AtomicU64,
    /// Replies sent back to balancers, and their bytes.
    pub replied: AtomicU64,
    pub replied_bytes: AtomicU64,
    /// From a peer outside `--allowed-subnets`.
    pub refused_peer: AtomicU64,
    /// Larger than the receive buffer, or than the upstream accepts.
    pub oversize: AtomicU64,
    /// The backend's socket buffer was full: dropped, as a router would.
    pub upstream_full: AtomicU64,
    /// ICMP errors (port or host unreachable) reported by the backend path.
    pub upstream_unreachable: AtomicU64,
    /// Sends to the backend or to the balancer that failed otherwise.
    pub send_errors: AtomicU64,
    pub sessions_created: AtomicU64,
    pub sessions_expired: AtomicU64,
    /// Closed to make room under `--max-udp-sessions`.
    pub sessions_evicted: AtomicU64,
    /// A session's upstream socket failed; the next datagram reopens it.
    pub sessions_failed: AtomicU64,
    /// Datagrams dropped because no session could be opened, by the
    /// stage that failed (`UpstreamError::label`: bind, connect, ...).
    session_errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Datagrams dropped for a missing or bad header, by kind.
    header_errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Datagrams dropped because the policy refused the header's source
    /// or destination, by [`crate::policy::Refusal`] label.
    policy_refusals: Mutex<BTreeMap<&'static str, u64>>,
}

impl UdpStats {
    /// Counts a dropped datagram whose header was missing or invalid.
    pub fn header_error(&self, kind: &'static str) {
        bump(&self.header_errors, kind);
    }

    /// Counts a datagram whose header the policy refused.
    pub fn policy_refusal(&self, reason: &'static str) {
        bump(&self.policy_refusals, reason);
    }

    /// Counts a datagram dropped because its session could not open.
    pub fn session_error(&self, kind: &'static str) {
        bump(&self.session_errors, kind);
    }

    pub fn header_errors(&self) -> BTreeMap<&'static str, u64> {
        snapshot(&self.header_errors)
    }

    pub fn policy_refusals(&self) -> BTreeMap<&'static str, u64> {
        snapshot(&self.policy_refusals)
    }

    pub fn session_errors(&self) -> BTreeMap<&'static str, u64> {
        snapshot(&self.session_errors)
    }

    /// Every plain counter by name, for logs and metrics.
    pub fn counters(&self) -> [(&'static str, u64); 19] {
        [
            ("received", &self.received),
            ("userspace_received", &self.userspace_received),
            ("kernel_forwarded", &self.kernel_forwarded),
            ("kernel_replied", &self.kernel_replied),
            ("sessions_offloaded", &self.sessions_offloaded),
            ("offload_failures", &self.offload_failures),
            ("forwarded", &self.forwarded),
            ("forwarded_bytes", &self.forwarded_bytes),
            ("replied", &self.replied),
            ("replied_bytes", &self.replied_bytes),
            ("refused_peer", &self.refused_peer),
            ("oversize", &self.oversize),
            ("upstream_full", &self.upstream_full),
            ("upstream_unreachable", &self.upstream_unreachable),
            ("send_errors", &self.send_errors),
            ("sessions_created", &self.sessions_created),
            ("sessions_expired", &self.sessions_expired),
            ("sessions_evicted", &self.sessions_evicted),
            ("sessions_failed", &self.sessions_failed),
        ]
        .map(|(name, c)| (name, c.load(Relaxed)))
    }
}

/// Adds what the kernel path did for a session to the totals.
pub fn add_kernel_counts(stats: &UdpStats, counts: &crate::bpf::udp::SessionCounts) {
    stats.received.fetch_add(counts.forwarded, Relaxed);
    stats.forwarded.fetch_add(counts.forwarded, Relaxed);
    stats
        .forwarded_bytes
        .fetch_add(counts.forwarded_bytes, Relaxed);
    stats.kernel_forwarded.fetch_add(counts.forwarded, Relaxed);
    stats.replied.fetch_add(counts.replied, Relaxed);
    stats.replied_bytes.fetch_add(counts.replied_bytes, Relaxed);
    stats.kernel_replied.fetch_add(counts.replied, Relaxed);
}

/// Adds one to a counter.
pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

/// Adds one datagram of `bytes` to a pair of counters.
pub fn add_datagram(count: &AtomicU64, total: &AtomicU64, bytes: usize) {
    count.fetch_add(1, Relaxed);
    total.fetch_add(bytes as u64, Relaxed);
}

/// A counter map's lock; a panic elsewhere cannot leave a count torn.
type CountMap = BTreeMap<&'static str, u64>;

fn lock(map: &Mutex<CountMap>) -> MutexGuard<'_, CountMap> {
    map.lock().unwrap_or_else(PoisonError::into_inner)
}

fn bump(map: &Mutex<CountMap>, key: &'static str) {
    *lock(map).entry(key).or_default() += 1;
}

fn snapshot(map: &Mutex<CountMap>) -> CountMap {
    lock(map).clone()
}
