//! The sockmap data path: one stream-verdict program redirects every skb
//! that arrives on a spliced socket out of its peer socket.

/// `SockHash<u64>`, keyed by socket cookie (`SO_COOKIE`): the sockets whose
/// arriving skbs the verdict program (attached to this map) redirects.
pub const SOURCES_MAP: &str = "SOURCES";
/// `SockHash<u64>`, keyed by socket cookie: the sockets skbs may be
/// redirected to. No program is attached, so a socket that leaves
/// [`SOURCES_MAP`] keeps its psock (and its queued skbs) through this one.
pub const TARGETS_MAP: &str = "TARGETS";
/// `HashMap<u64, SocketState>`: per spliced socket, its peer and progress.
pub const STATES_MAP: &str = "STATES";
/// `HashMap<u64, u64>`: per socket, the passed bytes userspace has read
/// and forwarded by hand. Only userspace writes it (so it never races the
/// verdict's own updates of [`SocketState`]).
pub const USER_READ_MAP: &str = "USER_READ";
/// `PerCpuArray<u64>`: one slot per [`Counter`].
pub const COUNTERS_MAP: &str = "COUNTERS";
/// `Array<KernelOffsets>` with one entry, filled by userspace from BTF.
pub const OFFSETS_MAP: &str = "OFFSETS";
/// The `sk_skb/stream_verdict` program.
pub const VERDICT_PROGRAM: &str = "redirect_to_peer";

/// Entries in each socket map and [`STATES_MAP`]: two per connection.
pub const MAX_SOCKETS: u32 = 131_072;

/// Per-socket state, keyed by the socket's cookie.
///
/// Written by userspace when a connection is armed; the verdict program
/// updates `next_seq` and `bytes`. The verdict runs with the receiving
/// socket locked, so per-socket fields need no atomics.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketState {
    /// Cookie of the socket every skb received here is sent out of.
    pub peer_cookie: u64,
    /// Payload bytes this socket handed to its peer through the verdict.
    pub bytes: u64,
    /// Payload bytes the verdict passed to this socket's own queue: the
    /// peer was not armed yet, or earlier passed bytes were still unread.
    /// While userspace has read fewer ([`USER_READ_MAP`]), the verdict keeps
    /// passing, so bytes reach the peer in order.
    pub passed: u64,
    /// TCP sequence number just past the last byte given to the verdict;
    /// valid when `flags & STATE_SEQ_VALID`. See `docs/ebpf-datapath.md`.
    pub next_seq: u32,
    /// `STATE_*` bits.
    pub flags: u32,
}

/// `SocketState::next_seq` holds a sequence number.
pub const STATE_SEQ_VALID: u32 = 1;
/// The verdict passed an skb it could not trim: bytes on this socket's own
/// queue overlap bytes already redirected. Userspace must reset.
pub const STATE_TRIM_FAILED: u32 = 2;

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
    /// overlap guard is off and the verdict passes nothing it cannot check.
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
    /// Redirects the kernel refused; the skb stayed on its own socket.
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
    /// A trim the kernel refused (`bpf_skb_adjust_room` failed); the skb
    /// was passed to its own socket rather than redirected with old bytes.
    TrimFailures = 8,
    /// skbs passed because earlier passed bytes were still unread.
    PassedInOrder = 9,
}

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; 10] = [
        Counter::RedirectedSkbs,
        Counter::RedirectedBytes,
        Counter::RedirectFailures,
        Counter::NoPeer,
        Counter::Empty,
        Counter::OverlapsTrimmed,
        Counter::OverlapBytes,
        Counter::DuplicatesDropped,
        Counter::TrimFailures,
        Counter::PassedInOrder,
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
            Counter::PassedInOrder => "passed_in_order",
        }
    }
}

/// Number of slots in [`COUNTERS_MAP`].
#[expect(clippy::cast_possible_truncation, reason = "ten counters fit any u32")]
pub const COUNTER_SLOTS: u32 = Counter::ALL.len() as u32;

// The kernel side and userspace must agree on these layouts byte for byte.
const _: () = assert!(core::mem::size_of::<SocketState>() == 32);
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 16);

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are #[repr(C)] structs of integers with no padding
    // (asserted above), so every byte pattern is a valid value.
    unsafe impl aya::Pod for super::SocketState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelOffsets {}
}
