//! mmproxy's UDP data path: a TC ingress program that forwards the
//! datagrams of sessions userspace has opened, and relays their replies.
//!
//! Attached to the ingress of `lo` and of the devices balancers send
//! through. Per datagram, in this order:
//!
//! 1. A reply (`backend -> upstream address` in [`UDP_REPLY`]) is
//!    rewritten to `listener -> balancer` and sent out of the device the
//!    balancer's datagrams arrived on (`bpf_redirect_neigh`), or up the
//!    stack when the balancer is local.
//! 2. A datagram to a session's listener is forwarded: in header mode its
//!    PROXY v2 header names the session ([`UDP_FORWARD`]) and is removed
//!    (`bpf_skb_adjust_room`); in first-datagram mode the balancer's
//!    address:port names it ([`UDP_FLOWS`]). Source and destination become
//!    the upstream address and the backend, and the datagram is delivered
//!    through `lo` (backends are loopback addresses).
//! 3. Everything else passes unchanged, and the daemon's sockets see it as
//!    in plain mode: fragments, GSO, IP options, IPv6 extension headers,
//!    headers with TLVs, unknown sessions, payloads over `MAX_PAYLOAD`,
//!    checksums that do not verify, replies the route lookup cannot send.
//!
//! Checksums: the reply path changes only addresses and ports, and the
//! `l3/l4_csum_replace` helpers update the checksums for whatever state the
//! skb is in. The forward path moves the UDP header when it removes the
//! PROXY header, which leaves a `CHECKSUM_PARTIAL` skb's `csum_start`
//! behind (no helper moves it), so the program writes a complete checksum,
//! summed over the payload, that the receiver verifies in software. A
//! datagram whose checksum nobody has verified yet (`CHECKSUM_NONE` or
//! `COMPLETE`) is verified first; one that fails passes to the stack,
//! which drops it as plain mode's socket would.

#![no_std]
#![no_main]
// The BPF atomic add on shared session counters (see `add`).
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{
        BPF_F_INGRESS, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, TC_ACT_OK,
        TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_NET,
    },
    helpers::{
        bpf_csum_diff, bpf_probe_read_kernel,
        generated::{bpf_check_mtu, bpf_redirect, bpf_redirect_neigh, bpf_skb_load_bytes},
    },
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::TcContext,
};
use mmproxy_common::udp::{
    CHUNK_BYTES, DEFAULT_MAX_SESSIONS, Endpoint, ForwardAction, ForwardKey, LOOPBACK_IFINDEX,
    MAX_PAYLOAD, ReplyAction, ReplyKey, SCRATCH_BYTES, UDP_COUNTER_SLOTS, UdpConfig, UdpCounter,
};

#[map(name = "UDP_FORWARD")]
static UDP_FORWARD: HashMap<ForwardKey, ForwardAction> =
    HashMap::with_max_entries(DEFAULT_MAX_SESSIONS, 0);

#[map(name = "UDP_REPLY")]
static UDP_REPLY: HashMap<ReplyKey, ReplyAction> =
    HashMap::with_max_entries(DEFAULT_MAX_SESSIONS, 0);

#[map(name = "UDP_FLOWS")]
static UDP_FLOWS: HashMap<Endpoint, ForwardKey> =
    HashMap::with_max_entries(DEFAULT_MAX_SESSIONS, 0);

#[map(name = "UDP_CONFIG")]
static UDP_CONFIG: Array<UdpConfig> = Array::with_max_entries(1, 0);

#[map(name = "UDP_COUNTERS")]
static UDP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(UDP_COUNTER_SLOTS, 0);

#[map(name = "UDP_SCRATCH")]
static UDP_SCRATCH: PerCpuArray<[u8; SCRATCH_BYTES as usize]> = PerCpuArray::with_max_entries(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_UDP: u8 = 17;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;

/// The PROXY protocol v2 signature, then version 2 + PROXY, then the
/// family byte for UDP over IPv4 and over IPv6.
const PP2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const PP2_PROXY: u8 = 0x21;
const PP2_UDP4: u8 = 0x12;
const PP2_UDP6: u8 = 0x22;
/// Fixed part of a v2 header, and its address blocks without TLVs.
const PP2_FIXED: usize = 16;
const PP2_ADDR4: usize = 12;
const PP2_ADDR6: usize = 36;

/// `skb->ip_summed` values (include/linux/skbuff.h).
const CHECKSUM_NONE: u8 = 0;
const CHECKSUM_COMPLETE: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Header {
    version_ihl: u8,
    tos: u8,
    total_len: [u8; 2],
    id: [u8; 2],
    frag: [u8; 2],
    ttl: u8,
    protocol: u8,
    check: [u8; 2],
    saddr: [u8; 4],
    daddr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Header {
    version_flow: [u8; 4],
    payload_len: [u8; 2],
    next_header: u8,
    hop_limit: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UdpHeader {
    sport: [u8; 2],
    dport: [u8; 2],
    len: [u8; 2],
    check: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Pp2Fixed {
    signature: [u8; 12],
    version_command: u8,
    family: u8,
    len: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Pp2Udp4 {
    fixed: Pp2Fixed,
    src: [u8; 4],
    dst: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Pp2Udp6 {
    fixed: Pp2Fixed,
    src: [u8; 16],
    dst: [u8; 16],
    sport: [u8; 2],
    dport: [u8; 2],
}

/// The IPv4 pseudo header of the UDP checksum.
#[repr(C)]
struct Pseudo4 {
    saddr: [u8; 4],
    daddr: [u8; 4],
    zero: u8,
    protocol: u8,
    len: [u8; 2],
}

/// The IPv6 pseudo header of the UDP checksum.
#[repr(C)]
struct Pseudo6 {
    saddr: [u8; 16],
    daddr: [u8; 16],
    len: [u8; 4],
    zero: [u8; 3],
    next_header: u8,
}

/// What became of a datagram the program looked at.
enum Outcome {
    /// Not one of ours: the stack handles it, uncounted.
    NotOurs,
    /// Ours but not handled here: passed unchanged, counted.
    Passed(UdpCounter),
    /// Handled: the TC action to return.
    Done(i32),
}

/// A helper failed after the packet was changed: drop it (counted).
struct Broken;

#[classifier]
pub fn udp_ingress(ctx: TcContext) -> i32 {
    match ingress(&ctx) {
        Ok(Outcome::NotOurs) => TC_ACT_OK as i32,
        Ok(Outcome::Passed(counter)) => {
            count(counter);
            TC_ACT_OK as i32
        }
        Ok(Outcome::Done(action)) => action,
        Err(Broken) => {
            count(UdpCounter::Errors);
            TC_ACT_SHOT as i32
        }
    }
}

fn ingress(ctx: &TcContext) -> Result<Outcome, Broken> {
    let Some(config) = UDP_CONFIG.get(0) else {
        return Ok(Outcome::NotOurs);
    };
    if config.valid == 0 {
        return Ok(Outcome::NotOurs);
    }
    // SAFETY: a TC program's context is a valid __sk_buff.
    let protocol = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    match protocol {
        ETH_P_IP => datagram::<V4>(ctx, config),
        ETH_P_IPV6 => datagram::<V6>(ctx, config),
        _ => Ok(Outcome::NotOurs),
    }
}

/// Replies first, then forwarding: each in a function of its own, so
/// their stack frames are siblings (the verifier allows 512 bytes for the
/// deepest chain of calls). Each reads the headers itself: passing them
/// down would stack two frames holding them.
fn datagram<F: Family>(ctx: &TcContext, config: &UdpConfig) -> Result<Outcome, Broken> {
    match reply_path::<F>(ctx)? {
        Outcome::NotOurs if config.header_first == 0 => forward_unwrap::<F>(ctx, config),
        Outcome::NotOurs => forward_flow::<F>(ctx, config),
        outcome => Ok(outcome),
    }
}

/// What differs between IPv4 and IPv6: header layouts, parsing, the
/// checksum's pseudo header, rewriting in place.
trait Family {
    type Ip: Copy;
    /// The PROXY v2 header for UDP over this family, without TLVs.
    type Pp: Copy;
    const IP_HLEN: usize;
    /// The v2 header's family byte and address block length.
    const PP_FAMILY: u8;
    const PP_ADDRS: usize;
    /// IPv6 makes the UDP checksum mandatory; IPv4 allows 0 (none).
    const CHECKSUM_REQUIRED: bool;

    /// The IP and UDP headers of a datagram the program can rewrite, or
    /// what to do with one it cannot.
    fn parse(ctx: &TcContext) -> Result<(Self::Ip, UdpHeader), Outcome>;
    fn source(ip: &Self::Ip, udp: &UdpHeader) -> Endpoint;
    fn destination(ip: &Self::Ip, udp: &UdpHeader) -> Endpoint;
    /// The header's client and destination.
    fn claimed(pp: &Self::Pp) -> (Endpoint, Endpoint);
    /// The UDP payload's length (after the UDP header).
    fn payload_len(ip: &Self::Ip) -> usize;
    fn verifies(ip: &Self::Ip, udp: &UdpHeader, pp: &Self::Pp, payload_sum: u32) -> bool;
    fn unwrap(
        ctx: &TcContext,
        ip: &Self::Ip,
        action: &ForwardAction,
        payload_len: usize,
        payload_sum: u32,
    ) -> Result<bool, Broken>;
    fn rewrite(
        ctx: &TcContext,
        ip: &Self::Ip,
        source: &Endpoint,
        destination: &Endpoint,
    ) -> Result<(), Broken>;
    /// Why the backend cannot be reached from the arrival device.
    fn cannot_reach_backend(
        ctx: &TcContext,
        config: &UdpConfig,
        action: &ForwardAction,
    ) -> Option<UdpCounter>;
}

/// IPv4.
struct V4;
/// IPv6.
struct V6;

impl Family for V4 {
    type Ip = Ipv4Header;
    type Pp = Pp2Udp4;
    const IP_HLEN: usize = IPV4_HLEN;
    const PP_FAMILY: u8 = PP2_UDP4;
    const PP_ADDRS: usize = PP2_ADDR4;
    const CHECKSUM_REQUIRED: bool = false;

    fn parse(ctx: &TcContext) -> Result<(Ipv4Header, UdpHeader), Outcome> {
        parse4(ctx)
    }
    fn source(ip: &Ipv4Header, udp: &UdpHeader) -> Endpoint {
        endpoint4(ip.saddr, udp.sport)
    }
    fn destination(ip: &Ipv4Header, udp: &UdpHeader) -> Endpoint {
        endpoint4(ip.daddr, udp.dport)
    }
    fn claimed(pp: &Pp2Udp4) -> (Endpoint, Endpoint) {
        (endpoint4(pp.src, pp.sport), endpoint4(pp.dst, pp.dport))
    }
    fn payload_len(ip: &Ipv4Header) -> usize {
        usize::from(u16::from_be_bytes(ip.total_len)).saturating_sub(IPV4_HLEN + UDP_HLEN)
    }
    fn verifies(ip: &Ipv4Header, udp: &UdpHeader, pp: &Pp2Udp4, payload_sum: u32) -> bool {
        verifies4(ip, udp, pp, payload_sum)
    }
    fn unwrap(
        ctx: &TcContext,
        ip: &Ipv4Header,
        action: &ForwardAction,
        payload_len: usize,
        payload_sum: u32,
    ) -> Result<bool, Broken> {
        unwrap4(ctx, ip, action, payload_len, payload_sum)
    }
    fn rewrite(
        ctx: &TcContext,
        ip: &Ipv4Header,
        source: &Endpoint,
        destination: &Endpoint,
    ) -> Result<(), Broken> {
        rewrite4(ctx, ip, source, destination)
    }
    fn cannot_reach_backend(
        ctx: &TcContext,
        config: &UdpConfig,
        action: &ForwardAction,
    ) -> Option<UdpCounter> {
        cannot_reach_backend4(ctx, config, action)
    }
}

impl Family for V6 {
    type Ip = Ipv6Header;
    type Pp = Pp2Udp6;
    const IP_HLEN: usize = IPV6_HLEN;
    const PP_FAMILY: u8 = PP2_UDP6;
    const PP_ADDRS: usize = PP2_ADDR6;
    const CHECKSUM_REQUIRED: bool = true;

    fn parse(ctx: &TcContext) -> Result<(Ipv6Header, UdpHeader), Outcome> {
        parse6(ctx)
    }
    fn source(ip: &Ipv6Header, udp: &UdpHeader) -> Endpoint {
        endpoint6(ip.saddr, udp.sport)
    }
    fn destination(ip: &Ipv6Header, udp: &UdpHeader) -> Endpoint {
        endpoint6(ip.daddr, udp.dport)
    }
    fn claimed(pp: &Pp2Udp6) -> (Endpoint, Endpoint) {
        (endpoint6(pp.src, pp.sport), endpoint6(pp.dst, pp.dport))
    }
    fn payload_len(ip: &Ipv6Header) -> usize {
        usize::from(u16::from_be_bytes(ip.payload_len)).saturating_sub(UDP_HLEN)
    }
    fn verifies(ip: &Ipv6Header, udp: &UdpHeader, pp: &Pp2Udp6, payload_sum: u32) -> bool {
        verifies6(ip, udp, pp, payload_sum)
    }
    fn unwrap(
        ctx: &TcContext,
        ip: &Ipv6Header,
        action: &ForwardAction,
        payload_len: usize,
        payload_sum: u32,
    ) -> Result<bool, Broken> {
        unwrap6(ctx, ip, action, payload_len, payload_sum)
    }
    fn rewrite(
        ctx: &TcContext,
        ip: &Ipv6Header,
        source: &Endpoint,
        destination: &Endpoint,
    ) -> Result<(), Broken> {
        rewrite6(ctx, ip, source, destination)
    }
    /// `::1` arriving on `lo` from another device is accepted there.
    fn cannot_reach_backend(_: &TcContext, _: &UdpConfig, _: &ForwardAction) -> Option<UdpCounter> {
        None
    }
}

/// The IPv4 and UDP headers of a datagram the program can rewrite, or
/// what to do with one it cannot.
fn parse4(ctx: &TcContext) -> Result<(Ipv4Header, UdpHeader), Outcome> {
    let ip = ctx
        .load::<Ipv4Header>(ETH_HLEN)
        .map_err(|_| Outcome::NotOurs)?;
    if ip.protocol != IPPROTO_UDP {
        return Err(Outcome::NotOurs);
    }
    let fragment = u16::from_be_bytes(ip.frag) & 0x3fff != 0;
    if ip.version_ihl != 0x45 || fragment || is_gso(ctx) {
        return Err(Outcome::Passed(UdpCounter::PassedShape));
    }
    let udp = ctx
        .load::<UdpHeader>(ETH_HLEN + IPV4_HLEN)
        .map_err(|_| Outcome::NotOurs)?;
    let ip_len = usize::from(u16::from_be_bytes(ip.total_len));
    if usize::from(u16::from_be_bytes(udp.len)) + IPV4_HLEN != ip_len
        || (ctx.len() as usize) < ETH_HLEN + ip_len
    {
        return Err(Outcome::Passed(UdpCounter::PassedShape));
    }
    Ok((ip, udp))
}

/// The same for IPv6. Extension headers (a fragment header among them)
/// are left to the stack: the UDP header is not where this program looks.
fn parse6(ctx: &TcContext) -> Result<(Ipv6Header, UdpHeader), Outcome> {
    let ip = ctx
        .load::<Ipv6Header>(ETH_HLEN)
        .map_err(|_| Outcome::NotOurs)?;
    if ip.next_header != IPPROTO_UDP {
        return Err(Outcome::NotOurs);
    }
    if is_gso(ctx) {
        return Err(Outcome::Passed(UdpCounter::PassedShape));
    }
    let udp = ctx
        .load::<UdpHeader>(ETH_HLEN + IPV6_HLEN)
        .map_err(|_| Outcome::NotOurs)?;
    let payload_len = usize::from(u16::from_be_bytes(ip.payload_len));
    if usize::from(u16::from_be_bytes(udp.len)) != payload_len
        || (ctx.len() as usize) < ETH_HLEN + IPV6_HLEN + payload_len
    {
        return Err(Outcome::Passed(UdpCounter::PassedShape));
    }
    Ok((ip, udp))
}

#[inline(never)]
fn reply_path<F: Family>(ctx: &TcContext) -> Result<Outcome, Broken> {
    let (ip, udp) = match F::parse(ctx) {
        Ok(headers) => headers,
        // Counted, if at all, on the forward path.
        Err(_) => return Ok(Outcome::NotOurs),
    };
    let key = ReplyKey {
        upstream: F::destination(&ip, &udp),
        backend: F::source(&ip, &udp),
    };
    match UDP_REPLY.get_ptr_mut(&key) {
        // SAFETY: map values stay valid for the program's run.
        Some(reply) => relay_reply::<F>(ctx, &ip, unsafe { &mut *reply }),
        None => Ok(Outcome::NotOurs),
    }
}

// ---- forward, first-datagram mode: no header to remove ----

#[inline(never)]
fn forward_flow<F: Family>(ctx: &TcContext, config: &UdpConfig) -> Result<Outcome, Broken> {
    let (ip, udp) = match F::parse(ctx) {
        Ok(headers) => headers,
        Err(outcome) => return Ok(outcome),
    };
    match flow_action(F::source(&ip, &udp), F::destination(&ip, &udp)) {
        // SAFETY: map values stay valid for the program's run.
        Some(action) => forward_as_is::<F>(ctx, config, &ip, unsafe { &mut *action }),
        None => Ok(Outcome::NotOurs),
    }
}

/// First-datagram mode: the session a balancer address:port's datagrams
/// to `listener` belong to.
fn flow_action(balancer: Endpoint, listener: Endpoint) -> Option<*mut ForwardAction> {
    // SAFETY: map values stay valid for the program's run.
    let key = unsafe { UDP_FLOWS.get(&balancer) }?;
    let action = UDP_FORWARD.get_ptr_mut(key)?;
    // SAFETY: as above.
    same(unsafe { &(*action).listener }, &listener).then_some(action)
}

#[inline(never)]
fn forward_as_is<F: Family>(
    ctx: &TcContext,
    config: &UdpConfig,
    ip: &F::Ip,
    action: &mut ForwardAction,
) -> Result<Outcome, Broken> {
    if let Some(counter) = F::cannot_reach_backend(ctx, config, action) {
        return Ok(Outcome::Passed(counter));
    }
    let source = action.source;
    let backend = action.backend;
    F::rewrite(ctx, ip, &source, &backend)?;
    account_forward(ctx, action, F::payload_len(ip));
    deliver_locally(ctx).map(Outcome::Done)
}

// ---- forward, header mode ----

#[inline(never)]
fn forward_unwrap<F: Family>(ctx: &TcContext, config: &UdpConfig) -> Result<Outcome, Broken> {
    let (ip, udp) = match F::parse(ctx) {
        Ok(headers) => headers,
        Err(outcome) => return Ok(outcome),
    };
    let pp_at = ETH_HLEN + F::IP_HLEN + UDP_HLEN;
    let Ok(fixed) = ctx.load::<Pp2Fixed>(pp_at) else {
        return Ok(Outcome::NotOurs);
    };
    if !is_pp2_signature(&fixed.signature) {
        return Ok(Outcome::NotOurs);
    }
    if fixed.version_command != PP2_PROXY
        || fixed.family != F::PP_FAMILY
        || usize::from(u16::from_be_bytes(fixed.len)) != F::PP_ADDRS
    {
        return Ok(Outcome::Passed(UdpCounter::PassedHeader));
    }
    let Ok(pp) = ctx.load::<F::Pp>(pp_at) else {
        return Ok(Outcome::Passed(UdpCounter::PassedShape));
    };
    let (client, destination) = F::claimed(&pp);
    let key = ForwardKey {
        balancer: F::source(&ip, &udp),
        client,
        destination,
    };
    let Some(action) = UDP_FORWARD.get_ptr_mut(&key) else {
        return Ok(Outcome::Passed(UdpCounter::PassedNoSession));
    };
    // SAFETY: map values stay valid for the program's run.
    let action = unsafe { &mut *action };
    if !same(&action.listener, &F::destination(&ip, &udp)) {
        return Ok(Outcome::Passed(UdpCounter::PassedNoSession));
    }
    let header_len = PP2_FIXED + F::PP_ADDRS;
    let Some(payload_len) = F::payload_len(&ip).checked_sub(header_len) else {
        return Ok(Outcome::Passed(UdpCounter::PassedShape));
    };
    if payload_len > MAX_PAYLOAD as usize {
        return Ok(Outcome::Passed(UdpCounter::PassedTooLarge));
    }
    if let Some(counter) = F::cannot_reach_backend(ctx, config, action) {
        return Ok(Outcome::Passed(counter));
    }
    let Some(payload_sum) = sum_payload(ctx, pp_at + header_len, payload_len) else {
        return Ok(Outcome::Passed(UdpCounter::PassedShape));
    };
    let has_checksum = F::CHECKSUM_REQUIRED || udp.check != [0, 0];
    if needs_verifying(ctx, config) && has_checksum && !F::verifies(&ip, &udp, &pp, payload_sum) {
        return Ok(Outcome::Passed(UdpCounter::PassedBadChecksum));
    }
    // From here on the datagram is ours: it is forwarded or dropped.
    if !F::unwrap(ctx, &ip, action, payload_len, payload_sum)? {
        return Ok(Outcome::Passed(UdpCounter::Errors));
    }
    account_forward(ctx, action, payload_len);
    deliver_locally(ctx).map(Outcome::Done)
}

// ---- removing the header: new headers with complete checksums ----

/// Whether the IPv4 datagram's UDP checksum holds, summed over the pseudo
/// header, the UDP header, the PROXY header and the payload.
#[inline(never)]
fn verifies4(ip: &Ipv4Header, udp: &UdpHeader, pp: &Pp2Udp4, payload_sum: u32) -> bool {
    let pseudo = Pseudo4 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        zero: 0,
        protocol: IPPROTO_UDP,
        len: udp.len,
    };
    let sum = csum_add(
        csum_add(csum_add(payload_sum, sum_of(&pseudo)), sum_of(udp)),
        sum_of(pp),
    );
    fold(sum) == 0xffff
}

/// The same for IPv6.
#[inline(never)]
fn verifies6(ip: &Ipv6Header, udp: &UdpHeader, pp: &Pp2Udp6, payload_sum: u32) -> bool {
    let pseudo = Pseudo6 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        len: u32::from(u16::from_be_bytes(udp.len)).to_be_bytes(),
        zero: [0; 3],
        next_header: IPPROTO_UDP,
    };
    let sum = csum_add(
        csum_add(csum_add(payload_sum, sum_of(&pseudo)), sum_of(udp)),
        sum_of(pp),
    );
    fold(sum) == 0xffff
}

/// Removes the PROXY header of an IPv4 datagram and writes the new IP
/// and UDP headers (`upstream -> backend`, complete checksums). `false`:
/// the header could not be removed and the skb is unchanged.
#[inline(never)]
fn unwrap4(
    ctx: &TcContext,
    ip: &Ipv4Header,
    action: &ForwardAction,
    payload_len: usize,
    payload_sum: u32,
) -> Result<bool, Broken> {
    let new_udp_len = (UDP_HLEN + payload_len) as u16;
    let mut new_ip = *ip;
    new_ip.saddr = v4_of(&action.source);
    new_ip.daddr = v4_of(&action.backend);
    new_ip.total_len = (IPV4_HLEN as u16 + new_udp_len).to_be_bytes();
    new_ip.check = [0, 0];
    new_ip.check = (!fold(sum_of(&new_ip))).to_ne_bytes();
    let mut new_udp = UdpHeader {
        sport: action.source.port,
        dport: action.backend.port,
        len: new_udp_len.to_be_bytes(),
        check: [0, 0],
    };
    let pseudo = Pseudo4 {
        saddr: new_ip.saddr,
        daddr: new_ip.daddr,
        zero: 0,
        protocol: IPPROTO_UDP,
        len: new_udp.len,
    };
    new_udp.check = udp_checksum(csum_add(
        csum_add(payload_sum, sum_of(&pseudo)),
        sum_of(&new_udp),
    ));
    let removed = (PP2_FIXED + PP2_ADDR4) as i32;
    if ctx.adjust_room(-removed, BPF_ADJ_ROOM_NET, 0).is_err() {
        // The skb is as it was: it can still take the userspace path.
        return Ok(false);
    }
    store(ctx, ETH_HLEN, &new_ip)?;
    store(ctx, ETH_HLEN + IPV4_HLEN, &new_udp)?;
    Ok(true)
}

/// The same for IPv6 (no IP checksum; the UDP one is mandatory).
#[inline(never)]
fn unwrap6(
    ctx: &TcContext,
    ip: &Ipv6Header,
    action: &ForwardAction,
    payload_len: usize,
    payload_sum: u32,
) -> Result<bool, Broken> {
    let new_udp_len = (UDP_HLEN + payload_len) as u16;
    let mut new_ip = *ip;
    new_ip.saddr = action.source.addr;
    new_ip.daddr = action.backend.addr;
    new_ip.payload_len = new_udp_len.to_be_bytes();
    let mut new_udp = UdpHeader {
        sport: action.source.port,
        dport: action.backend.port,
        len: new_udp_len.to_be_bytes(),
        check: [0, 0],
    };
    let pseudo = Pseudo6 {
        saddr: new_ip.saddr,
        daddr: new_ip.daddr,
        len: u32::from(new_udp_len).to_be_bytes(),
        zero: [0; 3],
        next_header: IPPROTO_UDP,
    };
    new_udp.check = udp_checksum(csum_add(
        csum_add(payload_sum, sum_of(&pseudo)),
        sum_of(&new_udp),
    ));
    let removed = (PP2_FIXED + PP2_ADDR6) as i32;
    if ctx.adjust_room(-removed, BPF_ADJ_ROOM_NET, 0).is_err() {
        // The skb is as it was: it can still take the userspace path.
        return Ok(false);
    }
    store(ctx, ETH_HLEN, &new_ip)?;
    store(ctx, ETH_HLEN + IPV6_HLEN, &new_udp)?;
    Ok(true)
}

/// Why an IPv4 datagram cannot be delivered to a 127/8 backend from the
/// device it arrived on: redirected to `lo` without a route, the stack
/// drops it as martian unless `lo` has `route_localnet` and `accept_local`
/// (`UdpConfig::lo_localnet`).
fn cannot_reach_backend4(
    ctx: &TcContext,
    config: &UdpConfig,
    action: &ForwardAction,
) -> Option<UdpCounter> {
    let arrived_on_lo = device_ifindex(ctx) == LOOPBACK_IFINDEX;
    let loopback_backend = action.backend.addr[12] == 127;
    (!arrived_on_lo && loopback_backend && config.lo_localnet == 0)
        .then_some(UdpCounter::PassedLocalnet)
}

fn account_forward(ctx: &TcContext, action: &mut ForwardAction, payload_len: usize) {
    if action.mark != 0 {
        ctx.set_mark(action.mark);
    }
    add(&raw mut action.packets, 1);
    add(&raw mut action.bytes, payload_len as u64);
    count(UdpCounter::Forwarded);
}

/// Hands a forwarded datagram to the local stack: as it is on `lo`, and
/// through `lo`'s ingress from any other device (a loopback destination
/// arriving on a real device is dropped as martian).
fn deliver_locally(ctx: &TcContext) -> Result<i32, Broken> {
    if device_ifindex(ctx) == LOOPBACK_IFINDEX {
        return Ok(TC_ACT_OK as i32);
    }
    // `lo`'s address is all zeros: anything else makes the skb
    // PACKET_OTHERHOST there, which IP drops.
    ctx.store(0, &[0u8; 6], 0).map_err(|_| Broken)?;
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(LOOPBACK_IFINDEX, u64::from(BPF_F_INGRESS)) } as i32)
}

// ---- replies ----

#[inline(never)]
fn relay_reply<F: Family>(
    ctx: &TcContext,
    ip: &F::Ip,
    reply: &mut ReplyAction,
) -> Result<Outcome, Broken> {
    if !fits_reply_device(ctx, reply) {
        return Ok(Outcome::Passed(UdpCounter::PassedReplyRoute));
    }
    let listener = reply.listener;
    let balancer = reply.balancer;
    F::rewrite(ctx, ip, &listener, &balancer)?;
    account_reply(reply, F::payload_len(ip));
    send_reply(ctx, reply.ifindex).map(Outcome::Done)
}

/// Whether the reply fits the MTU of the device toward the balancer. A
/// redirected skb is not fragmented: one too large would be dropped
/// there, so it goes to the daemon, whose socket send fragments it.
fn fits_reply_device(ctx: &TcContext, reply: &ReplyAction) -> bool {
    if reply.ifindex == LOOPBACK_IFINDEX {
        return true;
    }
    let mut mtu_len: u32 = 0;
    // SAFETY: plain helper call; `mtu_len` is a valid out-parameter.
    let ret = unsafe { bpf_check_mtu(ctx.skb.skb.cast(), reply.ifindex, &mut mtu_len, 0, 0) };
    ret == 0
}

/// Sends a rewritten reply toward the balancer: up the stack when the
/// balancer is local (it sent through `lo`), else out of the device its
/// datagrams arrived on, the kernel resolving route and neighbour
/// (`bpf_redirect_neigh`; no forwarding sysctl needed, unlike
/// `bpf_fib_lookup`).
fn send_reply(ctx: &TcContext, ifindex: u32) -> Result<i32, Broken> {
    if ifindex == LOOPBACK_IFINDEX {
        return deliver_locally(ctx);
    }
    // SAFETY: no next-hop parameters: the kernel looks the route up.
    Ok(unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) } as i32)
}

fn account_reply(reply: &mut ReplyAction, payload_len: usize) {
    add(&raw mut reply.packets, 1);
    add(&raw mut reply.bytes, payload_len as u64);
    count(UdpCounter::Replied);
}

// ---- rewriting addresses and ports in place ----

const IPV4_CHECK_AT: usize = ETH_HLEN + 10;
const IPV4_SADDR_AT: usize = ETH_HLEN + 12;
const IPV4_DADDR_AT: usize = ETH_HLEN + 16;
const IPV6_SADDR_AT: usize = ETH_HLEN + 8;
const IPV6_DADDR_AT: usize = ETH_HLEN + 24;

/// Sets source and destination of an IPv4 UDP datagram whose length does
/// not change; the helpers fix both checksums for any `ip_summed`.
fn rewrite4(
    ctx: &TcContext,
    ip: &Ipv4Header,
    source: &Endpoint,
    destination: &Endpoint,
) -> Result<(), Broken> {
    let udp_at = ETH_HLEN + IPV4_HLEN;
    let udp_check_at = udp_at + 6;
    let Ok(udp) = ctx.load::<UdpHeader>(udp_at) else {
        return Err(Broken);
    };
    let new_saddr = v4_of(source);
    let new_daddr = v4_of(destination);
    let l4_addr = u64::from(BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0) | 4;
    let l4_port = u64::from(BPF_F_MARK_MANGLED_0) | 2;
    let old_s = u64::from(u32::from_ne_bytes(ip.saddr));
    let old_d = u64::from(u32::from_ne_bytes(ip.daddr));
    let new_s = u64::from(u32::from_ne_bytes(new_saddr));
    let new_d = u64::from(u32::from_ne_bytes(new_daddr));
    ctx.l4_csum_replace(udp_check_at, old_s, new_s, l4_addr)
        .and_then(|()| ctx.l4_csum_replace(udp_check_at, old_d, new_d, l4_addr))
        .and_then(|()| ctx.l3_csum_replace(IPV4_CHECK_AT, old_s, new_s, 4))
        .and_then(|()| ctx.l3_csum_replace(IPV4_CHECK_AT, old_d, new_d, 4))
        .and_then(|()| ctx.store(IPV4_SADDR_AT, &new_saddr, 0))
        .and_then(|()| ctx.store(IPV4_DADDR_AT, &new_daddr, 0))
        .map_err(|_| Broken)?;
    rewrite_ports(ctx, udp_at, &udp, source, destination, l4_port)
}

/// Sets source and destination of an IPv6 UDP datagram whose length does
/// not change.
fn rewrite6(
    ctx: &TcContext,
    ip: &Ipv6Header,
    source: &Endpoint,
    destination: &Endpoint,
) -> Result<(), Broken> {
    let udp_at = ETH_HLEN + IPV6_HLEN;
    let udp_check_at = udp_at + 6;
    let Ok(udp) = ctx.load::<UdpHeader>(udp_at) else {
        return Err(Broken);
    };
    let mut old = [0u8; 32];
    old[..16].copy_from_slice(&ip.saddr);
    old[16..].copy_from_slice(&ip.daddr);
    let mut new = [0u8; 32];
    new[..16].copy_from_slice(&source.addr);
    new[16..].copy_from_slice(&destination.addr);
    // SAFETY: both buffers are 32 bytes on the stack.
    let diff =
        unsafe { bpf_csum_diff(old.as_mut_ptr().cast(), 32, new.as_mut_ptr().cast(), 32, 0) };
    if diff < 0 {
        return Err(Broken);
    }
    let l4_diff = u64::from(BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0);
    ctx.l4_csum_replace(udp_check_at, 0, diff as u64, l4_diff)
        .and_then(|()| ctx.store(IPV6_SADDR_AT, &source.addr, 0))
        .and_then(|()| ctx.store(IPV6_DADDR_AT, &destination.addr, 0))
        .map_err(|_| Broken)?;
    let l4_port = u64::from(BPF_F_MARK_MANGLED_0) | 2;
    rewrite_ports(ctx, udp_at, &udp, source, destination, l4_port)
}

fn rewrite_ports(
    ctx: &TcContext,
    udp_at: usize,
    udp: &UdpHeader,
    source: &Endpoint,
    destination: &Endpoint,
    flags: u64,
) -> Result<(), Broken> {
    let check_at = udp_at + 6;
    let old_s = u64::from(u16::from_ne_bytes(udp.sport));
    let old_d = u64::from(u16::from_ne_bytes(udp.dport));
    let new_s = u64::from(u16::from_ne_bytes(source.port));
    let new_d = u64::from(u16::from_ne_bytes(destination.port));
    ctx.l4_csum_replace(check_at, old_s, new_s, flags)
        .and_then(|()| ctx.l4_csum_replace(check_at, old_d, new_d, flags))
        .and_then(|()| ctx.store(udp_at, &source.port, 0))
        .and_then(|()| ctx.store(udp_at + 2, &destination.port, 0))
        .map_err(|_| Broken)
}

// ---- checksums ----

/// Whether nobody has verified this skb's UDP checksum yet. A skb whose
/// checksum the device verified (`UNNECESSARY`) or that was made on this
/// host (`PARTIAL`, no checksum computed yet) is not checked again.
fn needs_verifying(ctx: &TcContext, config: &UdpConfig) -> bool {
    let base = ctx.skb.skb as *const u8;
    // SAFETY: bpf_probe_read_kernel validates the address; a failed read
    // yields CHECKSUM_NONE, which verifies (the safe side).
    let byte = unsafe {
        bpf_probe_read_kernel(base.wrapping_add(config.ip_summed_offset as usize)).unwrap_or(0u8)
    };
    let state = (byte >> (config.ip_summed_shift & 7)) & 3;
    state == CHECKSUM_NONE || state == CHECKSUM_COMPLETE
}

/// The ones' complement sum of `len` payload bytes at `at`, a chunk at a
/// time through the per-CPU scratch buffer (zero-padded, so an odd tail
/// sums as the checksum pads it).
fn sum_payload(ctx: &TcContext, at: usize, len: usize) -> Option<u32> {
    let buf = UDP_SCRATCH.get_ptr_mut(0)?;
    let mut sum: u32 = 0;
    let chunks = (MAX_PAYLOAD / CHUNK_BYTES) as usize;
    for i in 0..chunks {
        let done = i * CHUNK_BYTES as usize;
        if done >= len {
            break;
        }
        // 1..=CHUNK_BYTES, written so the verifier can see both bounds
        // (it rejects a load it cannot prove non-empty).
        let n = ((len - done).min(CHUNK_BYTES as usize) - 1) % CHUNK_BYTES as usize + 1;
        // SAFETY: `buf` is a SCRATCH_BYTES map value and n <= CHUNK_BYTES.
        let loaded = unsafe {
            let start = buf.cast::<u8>();
            bpf_skb_load_bytes(
                ctx.skb.skb.cast(),
                (at + done) as u32,
                start.cast(),
                n as u32,
            )
        };
        if loaded != 0 {
            return None;
        }
        let padded = (n + 3) & !3;
        // SAFETY: n + 3 < SCRATCH_BYTES; then `padded` bytes are summed.
        let chunk_sum = unsafe {
            let start = buf.cast::<u8>();
            *start.add(n) = 0;
            *start.add(n + 1) = 0;
            *start.add(n + 2) = 0;
            bpf_csum_diff(core::ptr::null_mut(), 0, start.cast(), padded as u32, sum)
        };
        if chunk_sum < 0 {
            return None;
        }
        sum = chunk_sum as u32;
    }
    Some(sum)
}

/// The ones' complement sum of a header-sized value (size a multiple of 4).
fn sum_of<T>(value: &T) -> u32 {
    // SAFETY: reads size_of::<T>() bytes of `value` only.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            (value as *const T).cast_mut().cast(),
            core::mem::size_of::<T>() as u32,
            0,
        )
    };
    sum as u32
}

fn csum_add(a: u32, b: u32) -> u32 {
    let (sum, carry) = a.overflowing_add(b);
    sum + u32::from(carry)
}

fn fold(sum: u32) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The checksum field for a sum over pseudo header, header and payload;
/// 0 means "no checksum", so a computed 0 is sent as 0xffff (RFC 768).
fn udp_checksum(sum: u32) -> [u8; 2] {
    let check = !fold(sum);
    if check == 0 {
        [0xff, 0xff]
    } else {
        check.to_ne_bytes()
    }
}

// ---- small helpers ----

fn is_gso(ctx: &TcContext) -> bool {
    // SAFETY: a TC program's context is a valid __sk_buff.
    unsafe { (*ctx.skb.skb).gso_size != 0 }
}

fn device_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: as above.
    unsafe { (*ctx.skb.skb).ifindex }
}

fn store<T>(ctx: &TcContext, at: usize, value: &T) -> Result<(), Broken> {
    ctx.store(at, value, u64::from(BPF_F_RECOMPUTE_CSUM))
        .map_err(|_| Broken)
}

fn endpoint4(addr: [u8; 4], port: [u8; 2]) -> Endpoint {
    Endpoint {
        addr: [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
        ],
        port,
        padding: [0; 2],
    }
}

fn endpoint6(addr: [u8; 16], port: [u8; 2]) -> Endpoint {
    Endpoint {
        addr,
        port,
        padding: [0; 2],
    }
}

fn v4_of(endpoint: &Endpoint) -> [u8; 4] {
    [
        endpoint.addr[12],
        endpoint.addr[13],
        endpoint.addr[14],
        endpoint.addr[15],
    ]
}

/// Compares word by word (no `memcmp` in BPF).
fn is_pp2_signature(signature: &[u8; 12]) -> bool {
    let word = |s: &[u8; 12], i: usize| u32::from_ne_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    word(signature, 0) == word(&PP2_SIGNATURE, 0)
        && word(signature, 4) == word(&PP2_SIGNATURE, 4)
        && word(signature, 8) == word(&PP2_SIGNATURE, 8)
}

fn words(addr: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}

/// Compares two endpoints word by word (no `memcmp` in BPF).
fn same(a: &Endpoint, b: &Endpoint) -> bool {
    let a = as_words(a);
    let b = as_words(b);
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4]
}

fn as_words(e: &Endpoint) -> [u32; 5] {
    let w = words(&e.addr);
    [
        w[0],
        w[1],
        w[2],
        w[3],
        u32::from_ne_bytes([e.port[0], e.port[1], e.padding[0], e.padding[1]]),
    ]
}

/// Adds to a session counter that several CPUs may update at once.
fn add(counter: *mut u64, value: u64) {
    // SAFETY: `counter` points into a map value, 8-byte aligned (the
    // layouts are asserted in mmproxy-common), valid for the program's run.
    // The BPF target has no `AtomicU64::fetch_add`; the intrinsic lowers
    // to the BPF atomic add instruction.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, value) };
}

fn count(counter: UdpCounter) {
    if let Some(slot) = UDP_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, and BPF programs are not preempted on it.
        unsafe { *slot += 1 };
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
