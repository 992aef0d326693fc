//! How long one connection may hold a runtime worker.
//!
//! A socket that stays ready never makes tokio's readiness futures return
//! `Pending`, so a bulk connection's loop would run until tokio's
//! cooperative budget ran out: three budget units per splice round, about
//! 40 rounds of up to a pipe (256 KiB) each, milliseconds of one worker.
//! Meanwhile a ready interactive connection waits, and so does the I/O
//! driver: a busy worker polls it only when its run queue empties (or
//! every 61 tasks), so readiness for everyone else is not even seen.
//!
//! A [`Turn`] ends after [`QUANTUM_BYTES`]: the task yields, goes to the
//! back of the queue, and the worker polls the driver before it runs
//! again. Nothing here knows which connections are interactive: every
//! connection gets the same quantum, and one that moves less than it
//! between waits never notices.

/// Bytes a direction moves before it lets other tasks run. Profiled under
/// 8 interactive connections beside 8 full-duplex floods (bench `mixed`,
/// docs/performance.md): with no bound a worker went up to 64 ms between
/// polls of the I/O driver (bpftrace on `epoll_wait`).
pub(crate) const QUANTUM_BYTES: usize = 64 * 1024;

/// Bytes moved since the direction last gave up its worker.
#[derive(Debug, Default)]
pub(crate) struct Turn {
    moved: usize,
    /// Quanta used in a row without the source running dry.
    streak: u32,
}

impl Turn {
    /// Quanta used in a row since the source was last found empty.
    pub(crate) fn streak(&self) -> u32 {
        self.streak
    }

    /// The source was found empty: whatever it is, it is not a flood now.
    pub(crate) fn ran_dry(&mut self) {
        self.streak = 0;
    }

    /// Counts `bytes` moved; past the quantum, yields to the runtime.
    pub(crate) async fn moved(&mut self, bytes: usize) {
        self.moved += bytes;
        if self.moved >= QUANTUM_BYTES {
            self.moved = 0;
            self.streak = self.streak.saturating_add(1);
            tokio::task::yield_now().await;
        } else {
            // Small moves still count against tokio's budget, so that a
            // stream of them cannot pin the worker either.
            tokio::task::consume_budget().await;
        }
    }
}
