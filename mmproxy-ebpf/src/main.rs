//! mmproxy's in-kernel data path (v2).
//!
//! Userspace puts both sockets of a proxied connection into [`SOCKETS`],
//! records each one's peer in [`STATES`] and what the verdict may do with
//! it in [`CONTROLS`]. Every skb TCP hands to an armed socket's
//! stream-verdict hook (`tcp_read_skb`, Linux 6.6+ for verdict-only
//! sockmaps) comes here and is either redirected out of the peer socket
//! or passed to the socket's own psock queue, where userspace reads it.
//! Both are lossless; which one applies is a map value, never a change
//! of map membership (a delete races the kernel's read loop and drops
//! data: docs/ebpf-datapath.md, finding 8).
//!
//! The verdict redirects only while userspace allows it (mode REDIRECT),
//! every passed byte has been forwarded (so nothing overtakes them), and
//! the bytes redirected stay under a limit userspace moves on as the peer
//! drains (so a slow reader closes the sender's window instead of growing
//! a backlog without bound). At a threshold, and when it starts passing
//! on its own, it signals userspace through [`SIGNALS`].
//!
//! The overlap guard exists because `tcp_read_skb` hands over whole skbs
//! even when the head of one was already read (a coalesced partial
//! retransmit); redirected as is, those bytes would reach the peer twice.

#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::{bpf_get_socket_cookie, bpf_probe_read_kernel, generated::bpf_skb_adjust_room},
    macros::{map, stream_verdict},
    maps::{Array, HashMap, PerCpuArray, RingBuf, SockHash},
    programs::SkBuffContext,
};
use mmproxy_common::sockmap::{
    COUNTER_SLOTS, Counter, FlowControl, KernelOffsets, MAX_SOCKETS, MODE_REDIRECT, SIGNALS_BYTES,
    STATE_SEQ_VALID, STATE_TRIM_FAILED, Signal, SocketState,
};

#[map(name = "SOCKETS")]
static SOCKETS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "STATES")]
static STATES: HashMap<u64, SocketState> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "CONTROLS")]
static CONTROLS: HashMap<u64, FlowControl> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "SIGNALS")]
static SIGNALS: RingBuf = RingBuf::with_byte_size(SIGNALS_BYTES, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map(name = "OFFSETS")]
static OFFSETS: Array<KernelOffsets> = Array::with_max_entries(1, 0);

/// `bpf_skb_adjust_room` on sk_skb removes at most 0xfff bytes per call
/// (`sk_skb_adjust_room` in net/core/filter.c).
const MAX_TRIM_PER_CALL: u32 = 4095;

#[stream_verdict]
fn redirect_or_pass(ctx: SkBuffContext) -> u32 {
    verdict(&ctx)
}

fn verdict(ctx: &SkBuffContext) -> u32 {
    // A FIN arrives as an empty skb, after TCP has already recorded it
    // (RCV_SHUTDOWN, CLOSE_WAIT, EPOLLRDHUP), so the skb carries nothing.
    // Redirected or passed, it can end on a psock backlog where a zero
    // return from the send is a hard error (EPIPE, transmit disabled).
    // Dropped, it is harmless; userspace propagates the FIN.
    if ctx.len() == 0 {
        count(Counter::Empty, 1);
        return SK_DROP;
    }

    // SAFETY: the context of an sk_skb program is a valid sk_buff.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(state) = STATES.get_ptr_mut(cookie) else {
        // Not armed (or being torn down). Passing keeps the bytes on this
        // socket, where userspace can still read them; dropping would
        // lose data TCP has already acknowledged.
        count(Counter::NoPeer, 1);
        return SK_PASS;
    };
    // SAFETY: map value pointers stay valid for the program's run, and the
    // verdict runs with this socket locked, so no other writer races us.
    let state = unsafe { &mut *state };
    // SAFETY: as above; userspace replaces the whole value atomically.
    let control = unsafe { CONTROLS.get(cookie) }.copied().unwrap_or_default();

    match skip_already_redirected(ctx, state) {
        Overlap::None => {}
        Overlap::AllOld => {
            count(Counter::DuplicatesDropped, 1);
            return SK_DROP;
        }
        Overlap::TooLarge(overlap) => {
            // Passed whole, its duplicate head marked for userspace, which
            // drops it. Only one mark fits: if userspace has not reported
            // reading past the previous one, flag the socket for a reset.
            if state.skip_len == 0 || control.user_read >= state.skip_at + state.skip_len {
                state.skip_at = state.passed;
                state.skip_len = u64::from(overlap);
                count(Counter::OverlapsPassed, 1);
            } else {
                state.flags |= STATE_TRIM_FAILED;
                count(Counter::TrimFailures, 1);
            }
            pass(ctx, cookie, state, &control);
            return SK_PASS;
        }
    }

    let len = u64::from(ctx.len());
    let allowed = !keeps_own_bytes(state, &control) && state.redirected < control.redirect_limit;
    if allowed && peer_is_passing(state.peer_cookie) {
        // The peer's own passed skbs wait behind whatever is queued to be
        // sent out of it, uncharged, so its window stays open while its
        // memory grows. Redirecting more into it would prolong that.
        count(Counter::PeerPassing, 1);
        pass(ctx, cookie, state, &control);
        return SK_PASS;
    }
    if allowed {
        if SOCKETS.redirect_skb(ctx, state.peer_cookie, 0) == i64::from(SK_PASS) {
            state.redirected += len;
            count(Counter::RedirectedSkbs, 1);
            count(Counter::RedirectedBytes, len);
            if state.redirected >= control.notify_at {
                signal(cookie, state, &control);
            }
            return SK_PASS;
        }
        // The peer is not in the map (closed meanwhile).
        count(Counter::RedirectFailures, 1);
    }
    pass(ctx, cookie, state, &control);
    SK_PASS
}

/// Whether the peer socket's verdict is keeping (or has kept, and
/// userspace has not yet read) its own bytes. Read without the peer's
/// lock: a stale answer costs one skb's worth of coupling, never order.
fn peer_is_passing(peer_cookie: u64) -> bool {
    // SAFETY: map values are plain data; a racing update is a whole value.
    let (Some(peer_state), Some(peer_control)) = (unsafe { STATES.get(peer_cookie) }, unsafe {
        CONTROLS.get(peer_cookie)
    }) else {
        return false;
    };
    keeps_own_bytes(peer_state, peer_control)
}

/// Whether a socket's verdict keeps its bytes for userspace: its direction
/// is in PASS, or it passed bytes userspace has not forwarded yet (nothing
/// may be redirected past those).
fn keeps_own_bytes(state: &SocketState, control: &FlowControl) -> bool {
    control.mode != MODE_REDIRECT || state.passed != control.user_read
}

/// Keeps the skb on its own socket for userspace, and tells userspace if
/// it believes the direction is redirected (it is not reading).
fn pass(ctx: &SkBuffContext, cookie: u64, state: &mut SocketState, control: &FlowControl) {
    let len = u64::from(ctx.len());
    state.passed += len;
    count(Counter::PassedSkbs, 1);
    count(Counter::PassedBytes, len);
    if control.mode == MODE_REDIRECT {
        signal(cookie, state, control);
    }
}

/// One signal in flight per socket: userspace acknowledges it by copying
/// `signals` into `signals_seen`. A full ring is retried on the next skb.
fn signal(cookie: u64, state: &mut SocketState, control: &FlowControl) {
    if state.signals != control.signals_seen {
        return;
    }
    if SIGNALS.output::<Signal>(Signal { cookie }, 0).is_ok() {
        state.signals += 1;
        count(Counter::Signals, 1);
    } else {
        count(Counter::SignalsLost, 1);
    }
}

/// What the overlap guard found.
enum Overlap {
    /// Nothing of this skb was seen before (or it was trimmed off).
    None,
    /// Every byte was seen before: drop it.
    AllOld,
    /// An overlap of this many bytes, more than one trim removes: the skb
    /// is passed whole and userspace drops the duplicate head.
    TooLarge(u32),
}

/// Trims bytes this socket already handed on off the front of the skb.
fn skip_already_redirected(ctx: &SkBuffContext, state: &mut SocketState) -> Overlap {
    let Some(offsets) = OFFSETS.get(0) else {
        return Overlap::None;
    };
    if offsets.valid == 0 {
        return Overlap::None;
    }
    let skb = ctx.skb.skb as *const u8;
    let seq = read_u32(skb, offsets.skb_seq);
    let end_seq = read_u32(skb, offsets.skb_end_seq);

    let had_seq = state.flags & STATE_SEQ_VALID != 0;
    let next = state.next_seq;
    // Sequence numbers wrap: compare as a signed distance (RFC 793 style).
    if !had_seq || seq_after(end_seq, next) {
        state.next_seq = end_seq;
        state.flags |= STATE_SEQ_VALID;
    }
    if !had_seq {
        return Overlap::None;
    }
    let overlap = next.wrapping_sub(seq) as i32;
    if overlap <= 0 {
        return Overlap::None;
    }
    let overlap = overlap as u32;
    if overlap >= ctx.len() {
        return Overlap::AllOld;
    }
    // One helper call removes at most 4095 bytes. A bounded loop of calls
    // exceeded the verifier's budget on 6.18 (E2BIG after 24 s with 64
    // iterations, and after 71 s with 48), so a larger partial overlap is
    // passed to this socket and userspace drops the duplicate bytes.
    if overlap > MAX_TRIM_PER_CALL || !shrink_front(ctx, overlap) {
        return Overlap::TooLarge(overlap);
    }
    count(Counter::OverlapsTrimmed, 1);
    count(Counter::OverlapBytes, u64::from(overlap));
    Overlap::None
}

/// Removes `bytes` (at most 4095) from the front of the skb.
fn shrink_front(ctx: &SkBuffContext, bytes: u32) -> bool {
    // SAFETY: the helper checks its arguments; a failure returns < 0.
    unsafe { bpf_skb_adjust_room(ctx.skb.skb, -(bytes as i32), 0, 0) == 0 }
}

fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

fn read_u32(base: *const u8, offset: u32) -> u32 {
    // SAFETY: bpf_probe_read_kernel validates the address; a failed read
    // yields 0, which the sequence comparison treats as "no overlap".
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<u32>()).unwrap_or(0) }
}

fn count(counter: Counter, value: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, and BPF programs are not preempted on it.
        unsafe { *slot += value };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
