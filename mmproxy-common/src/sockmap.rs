//! The sockmap data path (v2): one stream-verdict program and a per-socket
//! switch between two lossless actions.
//!
//! - REDIRECT: the skb is sent out of the peer socket (the kernel path).
//! - PASS: the skb is queued on the socket's own psock (`ingress_msg`),
//!   charged to that socket so its TCP window closes, and read by
//!   userspace with `recv()`.
//!
//! Sockets stay in [`SOCKETS_MAP`] until `close()`: a delete from a live
//! socket can race the kernel's read loop and drop data
//! (docs/ebpf-datapath.md, finding 8), so the switch is a map value, never
//! a map membership.

/// `SockHash<u64>`, keyed by socket cookie (`SO_COOKIE`): every armed
/// socket; the verdict program is attached here. A socket leaves it only
/// when it is closed (`sock_map_close`, under the socket lock).
pub const SOCKETS_MAP: &str = "SOCKETS";
/// `HashMap<u64, SocketState>`: per armed socket, written by the verdict.
pub const STATES_MAP: &str = "STATES";
/// `HashMap<u64, FlowControl>`: per armed socket, written by userspace
/// only (so neither side ever overwrites the other's fields).
pub const CONTROLS_MAP: &str = "CONTROLS";
/// `RingBuf` of [`Signal`]s: the verdict asks userspace to look at a
/// socket. The only wake-up userspace gets while a direction is redirected.
pub const SIGNALS_MAP: &str = "SIGNALS";
/// `PerCpuArray<u64>`: one slot per [`Counter`].
pub const COUNTERS_MAP: &str = "COUNTERS";
/// `Array<KernelOffsets>` with one entry, filled by userspace from BTF.
pub const OFFSETS_MAP: &str = "OFFSETS";
/// The `sk_skb/stream_verdict` program.
pub const VERDICT_PROGRAM: &str = "redirect_or_pass";

/// Entries in the socket map and the per-socket hash maps: two per
/// connection.
pub const MAX_SOCKETS: u32 = 131_072;
/// Bytes of [`SIGNALS_MAP`]: 16 K signals of 8 bytes (plus the ring's
/// 8-byte record headers) in flight before the verdict has to retry.
pub const SIGNALS_BYTES: u32 = 256 * 1024;

/// [`FlowControl::mode`]: skbs arriving on the socket are passed to it.
pub const MODE_PASS: u32 = 0;
/// [`FlowControl::mode`]: skbs arriving on the socket are redirected to
/// its peer, within [`FlowControl::redirect_limit`].
pub const MODE_REDIRECT: u32 = 1;

/// Per-socket state, keyed by the socket's cookie. Inserted by userspace
/// at arming, then written only by the verdict, which runs with the
/// receiving socket locked, so its fields need no atomics.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketState {
    /// Cookie of the socket every redirected skb is sent out of.
    pub peer_cookie: u64,
    /// Payload bytes redirected to the peer.
    pub redirected: u64,
    /// Payload bytes passed to this socket's own queue for userspace.
    pub passed: u64,
    /// Signals sent for this socket (see [`FlowControl::signals_seen`]).
    pub signals: u64,
    /// Where, in the stream of passed bytes, the latest passed skb that
    /// overlapped bytes already handed on begins; its first `skip_len`
    /// bytes are duplicates that userspace drops.
    pub skip_at: u64,
    /// Duplicate bytes at `skip_at` (0: none yet).
    pub skip_len: u64,
    /// TCP sequence number just past the last byte given to the verdict;
    /// valid when `flags & STATE_SEQ_VALID`. See `docs/ebpf-datapath.md`.
    pub next_seq: u32,
    /// `STATE_*` bits.
    pub flags: u32,
}

/// `SocketState::next_seq` holds a sequence number.
pub const STATE_SEQ_VALID: u32 = 1;
/// An overlapping skb arrived while userspace had not yet reported
/// dropping the previous one's duplicates: the verdict cannot describe
/// both, so userspace resets.
pub const STATE_TRIM_FAILED: u32 = 2;

/// What userspace allows the verdict to do with one socket's skbs.
/// Written only by userspace; the verdict reads it per skb.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowControl {
    /// Passed bytes userspace has read and written to the peer. The
    /// verdict redirects only while `SocketState::passed == user_read`:
    /// a redirected skb can then never overtake passed bytes.
    pub user_read: u64,
    /// The verdict redirects while `SocketState::redirected` is below
    /// this; past it, skbs are passed (the direction's redirect backlog
    /// is bounded by `--ebpf-max-backlog-kib`).
    pub redirect_limit: u64,
    /// Once `SocketState::redirected` reaches this, the verdict signals
    /// userspace, which measures the backlog and moves the limit on.
    pub notify_at: u64,
    /// Signals userspace has handled. The verdict signals only while
    /// `SocketState::signals == signals_seen`: one signal in flight per
    /// socket, however many skbs arrive.
    pub signals_seen: u64,
    /// [`MODE_PASS`] or [`MODE_REDIRECT`].
    pub mode: u32,
    /// Keeps the struct size a multiple of 8 on both sides.
    pub padding: u32,
}

/// A record of [`SIGNALS_MAP`]: look at this socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Signal {
    /// The cookie of the socket whose verdict signalled.
    pub cookie: u64,
}

/// Offsets the verdict needs inside the kernel's `struct sk_buff`, read
/// from the running kernel's BTF at start-up (never hard-coded: they differ
/// between kernel builds).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `offsetof(struct sk_buff, cb) + offsetof(struct tcp_skb_cb, seq)`.
    pub skb_seq: u32,
    /// `offsetof(struct sk_buff, cb) + offsetof(struct tcp_skb_cb, end_seq)`.
    pub skb_end_seq: u32,
    /// Non-zero once userspace has filled the offsets in; until then the
    /// overlap guard is off.
    pub valid: u32,
    /// Keeps the struct size a multiple of 8 on both sides.
    pub padding: u32,
}

/// Slots of [`COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// skbs sent out of the peer socket.
    RedirectedSkbs = 0,
    /// Payload bytes in those skbs.
    RedirectedBytes = 1,
    /// Redirects the kernel refused; the skb was passed instead.
    RedirectFailures = 2,
    /// skbs on a socket with no state entry (not armed, or being removed).
    NoPeer = 3,
    /// Zero-length skbs (a FIN), dropped: userspace propagates the close.
    Empty = 4,
    /// skbs that began before data already redirected, and were trimmed.
    OverlapsTrimmed = 5,
    /// Bytes cut off those skbs.
    OverlapBytes = 6,
    /// skbs that held only data already redirected, and were dropped.
    DuplicatesDropped = 7,
    /// An overlap that could not be described to userspace (see
    /// `STATE_TRIM_FAILED`); the connection is reset.
    TrimFailures = 8,
    /// skbs passed to their own socket for userspace.
    PassedSkbs = 9,
    /// Payload bytes in those skbs.
    PassedBytes = 10,
    /// Signals sent to userspace.
    Signals = 11,
    /// Signals the ring buffer had no room for (retried on the next skb).
    SignalsLost = 12,
    /// skbs that overlapped bytes already handed on by more than one trim
    /// can remove, passed whole with the duplicates marked for userspace.
    OverlapsPassed = 13,
    /// skbs passed because the peer socket was passing its own bytes: a
    /// redirect would queue them ahead of the peer's passed skbs, which
    /// then wait uncharged (docs/ebpf-datapath.md, "coupled directions").
    PeerPassing = 14,
}

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; 15] = [
        Counter::RedirectedSkbs,
        Counter::RedirectedBytes,
        Counter::RedirectFailures,
        Counter::NoPeer,
        Counter::Empty,
        Counter::OverlapsTrimmed,
        Counter::OverlapBytes,
        Counter::DuplicatesDropped,
        Counter::TrimFailures,
        Counter::PassedSkbs,
        Counter::PassedBytes,
        Counter::Signals,
        Counter::SignalsLost,
        Counter::OverlapsPassed,
        Counter::PeerPassing,
    ];

    /// A name for logs and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::RedirectedSkbs => "redirected_skbs",
            Counter::RedirectedBytes => "redirected_bytes",
            Counter::RedirectFailures => "redirect_failures",
            Counter::NoPeer => "no_peer",
            Counter::Empty => "empty",
            Counter::OverlapsTrimmed => "overlaps_trimmed",
            Counter::OverlapBytes => "overlap_bytes",
            Counter::DuplicatesDropped => "duplicates_dropped",
            Counter::TrimFailures => "trim_failures",
            Counter::PassedSkbs => "passed_skbs",
            Counter::PassedBytes => "passed_bytes",
            Counter::Signals => "signals",
            Counter::SignalsLost => "signals_lost",
            Counter::OverlapsPassed => "overlaps_passed",
            Counter::PeerPassing => "peer_passing",
        }
    }
}

/// Number of slots in [`COUNTERS_MAP`].
#[expect(clippy::cast_possible_truncation, reason = "15 counters fit any u32")]
pub const COUNTER_SLOTS: u32 = Counter::ALL.len() as u32;

// The kernel side and userspace must agree on these layouts byte for byte.
const _: () = assert!(core::mem::size_of::<SocketState>() == 56);
const _: () = assert!(core::mem::size_of::<FlowControl>() == 40);
const _: () = assert!(core::mem::size_of::<Signal>() == 8);
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 16);

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)] structs of integers with no padding (asserted
    // above), so every byte pattern is a valid value.
    unsafe impl aya::Pod for super::SocketState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowControl {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelOffsets {}
}
