//! Workers of their own for bulk connections (plain mode, and ebpf mode's
//! connections kept in userspace).
//!
//! Yielding after each quantum (`turn.rs`) keeps one flood from holding a
//! worker, but a daemon whose workers are all busy with floods is still
//! slow to serve anything else: its threads are always runnable, so the
//! operating system preempts them for milliseconds at a time, and every
//! request of an interactive connection needs one of them twice per round
//! trip (bpftrace on `sched_switch`: waits of 2-16 ms beside 8 floods).
//! A second daemon that carried only the interactive connections, its
//! workers asleep between requests, served 1.5-1.9x as many of them
//! (docs/ebpf-findings.md, 2026-12-08).
//!
//! So a connection that proves to be bulk moves to a second runtime: a
//! direction that used [`PROMOTE_AFTER_QUANTA`] quanta in a row without
//! its source running dry asks for it ([`Promotion`]); both directions
//! stop where no byte is held (an empty pipe), and the two sockets and the
//! pipes are handed to a task on the bulk runtime, which forwards the rest.
//! The main runtime's workers are then left with the connections that
//! wait on each other's small messages, and sleep between them.

use std::sync::{
    OnceLock,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use tokio::{runtime::Runtime, sync::Notify};
use tracing::warn;

/// Quanta (64 KiB each) a direction moves in a row, its source never
/// empty in between, before its connection counts as bulk: 1 MiB without
/// a pause. A request/response connection runs its source dry after every
/// message.
pub(super) const PROMOTE_AFTER_QUANTA: u32 = 16;

/// Connections moved to the bulk workers since start.
static MOVED: AtomicU64 = AtomicU64::new(0);

/// Counts a connection moved.
pub(super) fn count_moved() {
    MOVED.fetch_add(1, Ordering::Relaxed);
}

/// Connections moved to the bulk workers since start.
pub(super) fn moved() -> u64 {
    MOVED.load(Ordering::Relaxed)
}

/// The bulk runtime, started on the first promotion; `None` if it cannot
/// be started (then connections stay where they are).
pub(super) fn runtime() -> Option<&'static Runtime> {
    static BULK: OnceLock<Option<Runtime>> = OnceLock::new();
    BULK.get_or_init(|| {
        let workers = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("mmproxy-bulk")
            .enable_all()
            .build()
            .inspect_err(|e| warn!(error = %e, "cannot start the bulk workers; bulk stays put"))
            .ok()
    })
    .as_ref()
}

/// A connection's request to move to the bulk runtime, seen by both of
/// its directions: the one that asks stops at once (its pipe is empty),
/// the other at its next empty pipe, or at once if it is waiting to read.
#[derive(Debug, Default)]
pub(super) struct Promotion {
    requested: AtomicBool,
    wake: Notify,
}

impl Promotion {
    pub(super) fn request(&self) {
        self.requested.store(true, Ordering::Relaxed);
        self.wake.notify_waiters();
    }

    pub(super) fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }

    /// Completes once promotion is requested.
    pub(super) async fn requested(&self) {
        let notified = self.wake.notified();
        if self.is_requested() {
            return;
        }
        notified.await;
    }
}
