//! mmproxy's in-kernel data path.
//!
//! Userspace puts both sockets of a proxied connection into [`TARGETS`]
//! (where redirects look their peer up), then into [`SOURCES`] (where this
//! program is attached), and records each one's peer in [`STATES`]. From
//! then on every skb that TCP hands to a source socket's stream-verdict
//! hook (`tcp_read_skb`, Linux 6.6+ for verdict-only sockmaps) comes here
//! and is redirected out of the peer socket's send path: the bytes never
//! reach userspace.
//!
//! Two maps, because a direction must be able to leave the kernel path on
//! its own: when a slow reader lets a direction's backlog grow, userspace
//! removes the source socket from [`SOURCES`] (its verdict stops, TCP flow
//! control is back) while the socket stays in [`TARGETS`], so its psock,
//! and the bytes still queued to be sent out of it, survive.
//!
//! The overlap guard exists because `tcp_read_skb` hands over whole skbs
//! even when the head of one was already read (a coalesced partial
//! retransmit); redirected as is, those bytes would reach the peer twice.
//! `docs/ebpf-datapath.md` has the mechanism and the measurements.

#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::{bpf_get_socket_cookie, bpf_probe_read_kernel, generated::bpf_skb_adjust_room},
    macros::{map, stream_verdict},
    maps::{Array, HashMap, PerCpuArray, SockHash},
    programs::SkBuffContext,
};
use mmproxy_common::sockmap::{
    COUNTER_SLOTS, Counter, KernelOffsets, MAX_SOCKETS, STATE_SEQ_VALID, STATE_TRIM_FAILED,
    SocketState,
};

#[map(name = "SOURCES")]
static SOURCES: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "TARGETS")]
static TARGETS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "STATES")]
static STATES: HashMap<u64, SocketState> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "USER_READ")]
static USER_READ: HashMap<u64, u64> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map(name = "OFFSETS")]
static OFFSETS: Array<KernelOffsets> = Array::with_max_entries(1, 0);

/// `bpf_skb_adjust_room` on sk_skb removes at most 0xfff bytes per call
/// (`sk_skb_adjust_room` in net/core/filter.c).
const MAX_TRIM_PER_CALL: u32 = 4095;

#[stream_verdict]
fn redirect_to_peer(ctx: SkBuffContext) -> u32 {
    match try_redirect_to_peer(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

fn try_redirect_to_peer(ctx: &SkBuffContext) -> Result<u32, u32> {
    // A FIN arrives as an empty skb, after TCP has already recorded it
    // (RCV_SHUTDOWN, CLOSE_WAIT, EPOLLRDHUP), so the skb carries nothing.
    // Redirected, the peer's backlog worker reads `skb_send_sock() == 0` as
    // a hard error. Passed, it can reach this socket's own backlog, where
    // `sk_psock_handle_skb() == 0` is the same hard error: EPIPE on this
    // socket and its transmit disabled, so data still being redirected to
    // it is lost (seen here: a 1 GiB echo cut at 724 MB). Dropped, it is
    // harmless; userspace propagates the FIN with shutdown(SHUT_WR).
    if ctx.len() == 0 {
        count(Counter::Empty, 1);
        return Ok(SK_DROP);
    }

    // SAFETY: the context of an sk_skb program is a valid sk_buff.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(state) = STATES.get_ptr_mut(&cookie) else {
        // Not armed (or being torn down). Passing keeps the bytes on this
        // socket's receive queue, where userspace can still read them;
        // dropping would lose data TCP has already acknowledged.
        count(Counter::NoPeer, 1);
        return Ok(SK_PASS);
    };
    // SAFETY: map value pointers stay valid for the program's run, and the
    // verdict runs with this socket locked, so no other writer races us.
    let state = unsafe { &mut *state };

    if !skip_already_redirected(ctx, state)? {
        count(Counter::DuplicatesDropped, 1);
        return Ok(SK_DROP);
    }

    let len = u64::from(ctx.len());
    // Bytes passed earlier that userspace has not forwarded yet must reach
    // the peer first: keep passing behind them until it catches up.
    // SAFETY: map value pointers stay valid for the program's run.
    let user_read = unsafe { USER_READ.get(&cookie) }.copied().unwrap_or(0);
    if state.passed > user_read {
        state.passed += len;
        count(Counter::PassedInOrder, 1);
        return Ok(SK_PASS);
    }
    let action = TARGETS.redirect_skb(ctx, state.peer_cookie, 0);
    if action == i64::from(SK_PASS) {
        state.bytes += len;
        count(Counter::RedirectedSkbs, 1);
        count(Counter::RedirectedBytes, len);
        Ok(SK_PASS)
    } else {
        // The peer is not in the map (yet, or any more). Keep the data on
        // this socket, in order, for userspace to forward.
        state.passed += len;
        count(Counter::RedirectFailures, 1);
        Err(SK_PASS)
    }
}

/// Trims bytes this socket already redirected off the front of the skb.
/// Returns `Ok(false)` when nothing new is left (the caller drops the skb).
fn skip_already_redirected(ctx: &SkBuffContext, state: &mut SocketState) -> Result<bool, u32> {
    let Some(offsets) = OFFSETS.get(0) else {
        return Ok(true);
    };
    if offsets.valid == 0 {
        return Ok(true);
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
        return Ok(true);
    }
    let overlap = next.wrapping_sub(seq) as i32;
    if overlap <= 0 {
        return Ok(true);
    }
    let overlap = overlap as u32;
    if overlap >= ctx.len() {
        return Ok(false);
    }
    // One helper call removes at most 4095 bytes. A bounded loop of calls
    // exceeded the verifier's budget on 6.18 (E2BIG after 24 s with 64
    // iterations, and after 71 s with 48), so a larger partial overlap is
    // passed to this socket instead of redirected: userspace sees bytes it
    // cannot account for and resets the connection. Never a corrupt stream.
    if overlap > MAX_TRIM_PER_CALL || !shrink_front(ctx, overlap) {
        count(Counter::TrimFailures, 1);
        state.flags |= STATE_TRIM_FAILED;
        return Err(SK_PASS);
    }
    count(Counter::OverlapsTrimmed, 1);
    count(Counter::OverlapBytes, u64::from(overlap));
    Ok(true)
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
