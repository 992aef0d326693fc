//! Wake-ups for armed sockets, without one per skb.
//!
//! After each read loop the kernel calls an armed socket's saved
//! `sk_data_ready`, which wakes every epoll that registered the socket for
//! `EPOLLIN`: a socket left in tokio's reactor wakes a worker thread per
//! skb although nobody reads it. So armed sockets leave tokio's reactor
//! and go into this epoll instance instead, registered for `EPOLLRDHUP`
//! only (`EPOLLERR` and `EPOLLHUP` always report): `ep_poll_callback()`
//! drops a wake-up whose poll key shares no bit with the registration, so
//! a data-ready wake-up (`EPOLLIN | EPOLLRDNORM ...`) costs nothing, while
//! a FIN (`sk_state_change`, no key) or an error still arrives.
//! `EPOLLIN` or `EPOLLOUT` are added only while userspace itself reads or
//! writes the socket (a PASS episode).
//!
//! The other source of wake-ups is the verdict's signal ring. One task
//! reads both and wakes the direction concerned.

use std::{
    collections::HashMap,
    io,
    mem::MaybeUninit,
    os::fd::{BorrowedFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use aya::maps::{MapData, RingBuf};
use mmproxy_common::sockmap::Signal;
use rustix::event::epoll::{self, EventData, EventFlags};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::Notify,
};

/// Events read per `epoll_wait`.
const EVENT_BATCH: usize = 64;

/// The epoll instance and the sockets registered in it, by cookie.
#[derive(Debug)]
pub(super) struct Watcher {
    epoll: AsyncFd<OwnedFd>,
    sockets: Mutex<HashMap<u64, Arc<Watched>>>,
}

/// One registered socket: what happened to it and who to wake.
#[derive(Debug)]
pub(super) struct Watched {
    cookie: u64,
    /// `EventFlags` bits currently registered.
    interest: Mutex<EventFlags>,
    /// Sticky: `EPOLLRDHUP`, `EPOLLHUP` and `EPOLLERR` once seen.
    ended: AtomicU32,
    /// Wakes the direction that reads this socket: a signal from the
    /// verdict, a FIN, an error, or (when asked for) readable data.
    pub(super) source: Notify,
    /// Wakes a writer blocked on this socket: writable, or an error.
    pub(super) sink: Notify,
}

impl Watched {
    /// The socket has seen a FIN, a hang-up or an error.
    pub(super) fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire) != 0
    }
}

impl Watcher {
    pub(super) fn new() -> io::Result<Self> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays
        // open and the same for the AsyncFd's whole life.
        let epoll = unsafe { AsyncFd::register_with_interest(epoll, Interest::READABLE) }?;
        Ok(Self {
            epoll,
            sockets: Mutex::new(HashMap::new()),
        })
    }

    /// Registers a socket for FIN, hang-up and error only.
    pub(super) fn register(&self, fd: BorrowedFd<'_>, cookie: u64) -> io::Result<Arc<Watched>> {
        let interest = EventFlags::RDHUP | EventFlags::ET;
        let watched = Arc::new(Watched {
            cookie,
            interest: Mutex::new(interest),
            ended: AtomicU32::new(0),
            source: Notify::new(),
            sink: Notify::new(),
        });
        self.lock().insert(cookie, watched.clone());
        if let Err(e) = epoll::add(
            self.epoll.get_ref(),
            fd,
            EventData::new_u64(cookie),
            interest,
        ) {
            self.lock().remove(&cookie);
            return Err(e.into());
        }
        Ok(watched)
    }

    /// Adds or removes `EPOLLIN` / `EPOLLOUT`. Re-registering makes epoll
    /// re-check readiness, so a condition already true is reported.
    pub(super) fn want(
        &self,
        fd: BorrowedFd<'_>,
        watched: &Watched,
        flags: EventFlags,
        on: bool,
    ) -> io::Result<()> {
        let mut interest = watched
            .interest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = if on {
            *interest | flags
        } else {
            *interest - flags
        };
        if next != *interest {
            epoll::modify(
                self.epoll.get_ref(),
                fd,
                EventData::new_u64(watched.cookie),
                next,
            )?;
            *interest = next;
        }
        Ok(())
    }

    /// Takes a socket out of the epoll set and forgets it, for a socket
    /// that stays open.
    pub(super) fn unregister(&self, fd: BorrowedFd<'_>, cookie: u64) {
        let _ = epoll::delete(self.epoll.get_ref(), fd);
        self.forget(cookie);
    }

    /// Forgets a socket about to be closed (closing its last descriptor
    /// takes it out of the epoll set).
    pub(super) fn forget(&self, cookie: u64) {
        self.lock().remove(&cookie);
    }

    /// Reads socket events and verdict signals until the ring fails.
    pub(super) async fn run(self: Arc<Self>, signals: RingBuf<MapData>) {
        // SAFETY: the AsyncFd owns the ring buffer, which owns its map
        // descriptor for its whole life.
        let mut signals =
            match unsafe { AsyncFd::register_with_interest(signals, Interest::READABLE) } {
                Ok(signals) => signals,
                Err(e) => {
                    tracing::error!(error = %e, "sockmap: cannot watch the signal ring");
                    return;
                }
            };
        loop {
            let result = tokio::select! {
                ready = self.epoll.readable() => ready.map(|mut guard| {
                    self.dispatch_socket_events();
                    guard.clear_ready();
                }),
                ready = signals.readable_mut() => ready.map(|mut guard| {
                    while let Some(item) = guard.get_inner_mut().next() {
                        self.dispatch_signal(&item);
                    }
                    guard.clear_ready();
                }),
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "sockmap: the watcher failed; armed connections \
                                             will only see their periodic checks");
                return;
            }
        }
    }

    fn dispatch_socket_events(&self) {
        let mut buf = [MaybeUninit::<epoll::Event>::uninit(); EVENT_BATCH];
        let zero = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        loop {
            let Ok((events, _)) = epoll::wait(self.epoll.get_ref(), &mut buf, Some(&zero)) else {
                return;
            };
            let n = events.len();
            let sockets = self.lock();
            for event in events.iter() {
                // `epoll_event` is packed: copy the fields out.
                let (flags, data) = (event.flags, event.data);
                let Some(watched) = sockets.get(&data.u64()) else {
                    continue;
                };
                let ended = flags & (EventFlags::RDHUP | EventFlags::HUP | EventFlags::ERR);
                if !ended.is_empty() {
                    watched.ended.fetch_or(ended.bits(), Ordering::Release);
                }
                if flags.intersects(!EventFlags::OUT) {
                    watched.source.notify_one();
                }
                if flags.intersects(EventFlags::OUT | EventFlags::ERR | EventFlags::HUP) {
                    watched.sink.notify_one();
                }
            }
            drop(sockets);
            if n < EVENT_BATCH {
                return;
            }
        }
    }

    fn dispatch_signal(&self, item: &[u8]) {
        let Some(bytes) = item.get(..size_of::<Signal>()) else {
            return;
        };
        let cookie = u64::from_ne_bytes(bytes.try_into().unwrap_or_default());
        if let Some(watched) = self.lock().get(&cookie) {
            watched.source.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Watched>>> {
        self.sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
