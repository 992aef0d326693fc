//! Per-connection limits a hostile peer must not get around:
//!
//! - [`EvictingGate`]: at most N holders at once; a new one beyond that
//!   evicts the *oldest*. With `--max-pending-headers` it bounds the
//!   connections waiting for their PROXY header, so a slowloris that opens
//!   thousands of silent connections only ever holds the gate's capacity
//!   and a real balancer (which sends its header at once) still gets
//!   through; the metrics endpoint bounds its connections with one too.
//! - [`SourceCounter`]: at most `--max-conns-per-source` connections per
//!   claimed client address, so one client cannot take every backend slot.
//! - [`IdleWatch`]: `--idle-timeout`, measured from the sockets' own byte
//!   counters (`TCP_INFO`), so both data paths, the in-kernel one included,
//!   are judged by the same numbers.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::IpAddr,
    os::fd::{BorrowedFd, RawFd},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use crate::sockopt;

/// Holders of a bounded resource, oldest first; the newest always gets in.
#[derive(Debug)]
pub struct EvictingGate {
    capacity: usize,
    inner: Mutex<GateInner>,
}

#[derive(Debug, Default)]
struct GateInner {
    next_id: u64,
    /// By arrival: the lowest id is the oldest waiter.
    waiting: BTreeMap<u64, CancellationToken>,
}

/// A place in the gate; leaving it (drop) frees the slot. `evicted` is
/// cancelled when a newer connection needed the slot.
#[derive(Debug)]
pub struct GateSlot {
    gate: Arc<EvictingGate>,
    id: u64,
    pub evicted: CancellationToken,
}

impl EvictingGate {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity: capacity.max(1),
            inner: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, GateInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Enters the gate, evicting the oldest waiter if it is full. Returns
    /// the slot and whether someone was evicted.
    pub fn enter(self: &Arc<Self>) -> (GateSlot, bool) {
        let mut inner = self.lock();
        let evicted_someone = if inner.waiting.len() >= self.capacity {
            inner
                .waiting
                .pop_first()
                .map(|(_, token)| token.cancel())
                .is_some()
        } else {
            false
        };
        let id = inner.next_id;
        inner.next_id += 1;
        let evicted = CancellationToken::new();
        inner.waiting.insert(id, evicted.clone());
        let slot = GateSlot {
            gate: self.clone(),
            id,
            evicted,
        };
        (slot, evicted_someone)
    }

    /// Connections waiting now.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }
}

impl Drop for GateSlot {
    fn drop(&mut self) {
        self.gate.lock().waiting.remove(&self.id);
    }
}

/// Connections per claimed client address.
#[derive(Debug)]
pub struct SourceCounter {
    /// 0: unlimited.
    limit: u32,
    counts: Mutex<HashMap<IpAddr, u32>>,
}

/// One counted connection; dropping it uncounts it.
#[derive(Debug)]
pub struct SourceTicket {
    counter: Arc<SourceCounter>,
    source: IpAddr,
}

impl SourceCounter {
    pub fn new(limit: u32) -> Arc<Self> {
        Arc::new(Self {
            limit,
            counts: Mutex::default(),
        })
    }

    /// Counts a connection from `source`, or `None` when it already has
    /// `limit` of them.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Option<SourceTicket> {
        let mut counts = self.lock();
        let count = counts.entry(source).or_default();
        if self.limit != 0 && *count >= self.limit {
            return None;
        }
        *count += 1;
        drop(counts);
        Some(SourceTicket {
            counter: self.clone(),
            source,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, u32>> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connections counted for `source` now.
    pub fn count(&self, source: IpAddr) -> u32 {
        self.lock().get(&source).copied().unwrap_or(0)
    }
}

impl Drop for SourceTicket {
    fn drop(&mut self) {
        let mut counts = self.counter.lock();
        if let Some(count) = counts.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

/// Watches two sockets' byte counters for `--idle-timeout`.
#[derive(Debug)]
pub struct IdleWatch {
    fds: [RawFd; 2],
    timeout: Duration,
}

impl IdleWatch {
    /// The sockets must stay open while [`IdleWatch::until_idle`] runs.
    pub fn new(fds: [RawFd; 2], timeout: Duration) -> Self {
        Self { fds, timeout }
    }

    /// Returns once neither socket has received or had acknowledged a
    /// byte for the whole timeout, checking four times per timeout.
    pub async fn until_idle(&self) -> io::Result<()> {
        let period = (self.timeout / 4).max(Duration::from_millis(10));
        let mut last = self.activity()?;
        let mut quiet = Duration::ZERO;
        loop {
            tokio::time::sleep(period).await;
            let now = self.activity()?;
            if now == last {
                quiet += period;
                if quiet >= self.timeout {
                    return Ok(());
                }
            } else {
                last = now;
                quiet = Duration::ZERO;
            }
        }
    }

    /// Bytes received plus bytes acknowledged, on both sockets.
    fn activity(&self) -> io::Result<u64> {
        let mut total = 0u64;
        for fd in self.fds {
            // SAFETY: by the constructor's contract the socket is open.
            let info = sockopt::tcp_info(&unsafe { BorrowedFd::borrow_raw(fd) })?;
            total = total
                .wrapping_add(info.bytes_received)
                .wrapping_add(info.bytes_acked);
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_gate_evicts_its_oldest_waiter() {
        let gate = EvictingGate::new(2);
        let (a, evicted) = gate.enter();
        assert!(!evicted);
        let (b, _) = gate.enter();
        let (c, evicted) = gate.enter();
        assert!(evicted);
        assert!(a.evicted.is_cancelled(), "the oldest goes");
        assert!(!b.evicted.is_cancelled() && !c.evicted.is_cancelled());
        assert_eq!(gate.waiting(), 2);
        drop(b);
        assert_eq!(gate.waiting(), 1);
        let (_d, evicted) = gate.enter();
        assert!(!evicted, "a freed slot is reused without evicting");
        drop(a);
        assert_eq!(gate.waiting(), 2, "an evicted slot is already gone");
    }

    #[test]
    fn sources_are_capped_and_uncounted_on_drop() {
        let counter = SourceCounter::new(2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let first = counter.admit(ip).unwrap();
        let _second = counter.admit(ip).unwrap();
        assert!(counter.admit(ip).is_none());
        assert!(counter.admit(other).is_some());
        drop(first);
        assert_eq!(counter.count(ip), 1);
        assert!(counter.admit(ip).is_some());
    }

    #[test]
    fn zero_means_unlimited() {
        let counter = SourceCounter::new(0);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let tickets: Vec<_> = (0..1000).map(|_| counter.admit(ip).unwrap()).collect();
        assert_eq!(counter.count(ip), 1000);
        drop(tickets);
        assert_eq!(counter.count(ip), 0);
    }
}
