//! The UDP kernel path: one TC ingress program that forwards the datagrams
//! of sessions userspace has opened, and relays the backend's replies.
//!
//! Userspace stays the control plane. The first datagram of a flow reaches
//! the daemon as always; once it has opened the session (policy, caps,
//! spoofed upstream socket), it writes the session into [`FORWARD_MAP`]
//! and [`REPLY_MAP`] (and [`FLOWS_MAP`] in first-datagram mode). From then
//! on the program rewrites matching datagrams in place:
//!
//! - forward: `balancer -> listener` with a PROXY v2 header becomes
//!   `client -> backend` without it;
//! - reply: `backend -> client` becomes `listener -> balancer`.
//!
//! Anything the program does not handle (fragments, GSO, IP options,
//! TLVs, a checksum it cannot vouch for, an unknown session) passes
//! unchanged to the stack, and so to the daemon's sockets, which treat it
//! exactly as in plain mode. Addresses are stored as 16 bytes (IPv4 as
//! `::ffff:a.b.c.d`); ports as they appear on the wire (network order).

/// `HashMap<ForwardKey, ForwardAction>`: written by userspace, counters
/// by the program.
pub const FORWARD_MAP: &str = "UDP_FORWARD";
/// `HashMap<ReplyKey, ReplyAction>`: written by userspace, counters by
/// the program.
pub const REPLY_MAP: &str = "UDP_REPLY";
/// `HashMap<Endpoint, ForwardKey>`, `--udp-header first` only: which
/// session a balancer address:port's headerless datagrams belong to.
pub const FLOWS_MAP: &str = "UDP_FLOWS";
/// `Array<UdpConfig>` with one entry, written by userspace at start.
pub const CONFIG_MAP: &str = "UDP_CONFIG";
/// `PerCpuArray<u64>`: one slot per [`UdpCounter`].
pub const COUNTERS_MAP: &str = "UDP_COUNTERS";
/// `PerCpuArray<[u8; SCRATCH_BYTES]>`: room to sum a payload chunk.
pub const SCRATCH_MAP: &str = "UDP_SCRATCH";
/// The `classifier` program, attached to ingress.
pub const PROGRAM: &str = "udp_ingress";

/// `lo`'s interface index, the same in every network namespace
/// (`LOOPBACK_IFINDEX` in the kernel): where the program delivers to local
/// backends, and the device of a balancer on this host.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// Entries of the session maps unless userspace sets
/// `--max-udp-sessions` at load time.
pub const DEFAULT_MAX_SESSIONS: u32 = 65_536;
/// Largest payload the program forwards; larger ones pass to userspace.
/// Bounded because the program sums the payload for its checksum in
/// chunks of [`CHUNK_BYTES`] (and the verifier wants a bounded loop).
pub const MAX_PAYLOAD: u32 = 8_192;
/// Bytes summed per `bpf_csum_diff` call (the helper takes at most 512).
pub const CHUNK_BYTES: u32 = 512;
/// Size of one scratch buffer: a chunk plus room to zero-pad its tail to
/// a multiple of four.
pub const SCRATCH_BYTES: u32 = CHUNK_BYTES + 8;

/// An address and port, as they appear in a packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// IPv6, or IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// The port's two bytes in network order.
    pub port: [u8; 2],
    /// Keeps the size a multiple of 4; always zero (part of hash keys).
    pub padding: [u8; 2],
}

/// Finds a session from a datagram with a header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ForwardKey {
    /// The datagram's source: the balancer.
    pub balancer: Endpoint,
    /// The header's source: the client.
    pub client: Endpoint,
    /// The header's destination. Part of the key even when the backend
    /// does not depend on it, so a header naming another destination goes
    /// to userspace, whose policy may judge it differently.
    pub destination: Endpoint,
}

/// What to do with a forwarded datagram, and what happened to the
/// session's datagrams in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForwardAction {
    /// Where the balancer must have sent it (the daemon's listening
    /// address); a datagram sent elsewhere goes to userspace.
    pub listener: Endpoint,
    /// The new source: the upstream socket's address (the client's, or an
    /// ephemeral port where the client's was taken).
    pub source: Endpoint,
    /// The new destination: the backend.
    pub backend: Endpoint,
    /// `--mark`, set on the forwarded skb (0: none). Ends at byte 64, so
    /// the counters are 8-byte aligned with no hidden padding.
    pub mark: u32,
    /// Datagrams and payload bytes forwarded in the kernel. (No time of
    /// the last one: the daemon's sweeper sees activity as these grow,
    /// and a clock read per datagram cost 0.15 µs of a 13.7 µs round
    /// trip in the profile.)
    pub packets: u64,
    pub bytes: u64,
}

/// Finds a session from a backend's reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReplyKey {
    /// The reply's destination: the upstream socket's address.
    pub upstream: Endpoint,
    /// The reply's source: the backend.
    pub backend: Endpoint,
}

/// What to do with a reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyAction {
    /// The new source: the address the balancer sent to.
    pub listener: Endpoint,
    /// The new destination: the balancer.
    pub balancer: Endpoint,
    /// The device the balancer's datagrams arrive on (from `IP_PKTINFO`):
    /// replies leave through it. `lo` (1): the balancer is local.
    pub ifindex: u32,
    /// Keeps the counters 8-byte aligned with no hidden padding.
    pub padding: u32,
    /// Replies and their bytes relayed in the kernel.
    pub packets: u64,
    pub bytes: u64,
}

/// Settings the program reads per datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpConfig {
    /// Non-zero for `--udp-header first`: a known flow's datagrams carry
    /// no header and are forwarded as they are.
    pub header_first: u32,
    /// Non-zero when `lo` takes an IPv4 datagram for 127/8 redirected to
    /// it from another device: `net.ipv4.conf.lo.route_localnet` (else the
    /// destination is martian) and `accept_local` (else the source check,
    /// whose reverse lookup from 127/8 hits table 123's local route, fails)
    /// are both 1. Without them such datagrams go to userspace.
    pub lo_localnet: u32,
    /// Where `ip_summed` lives in `struct sk_buff` (byte offset, and the
    /// bit shift within it), from BTF. The program must know whether the
    /// stack has verified the checksum it is about to replace.
    pub ip_summed_offset: u32,
    pub ip_summed_shift: u32,
    /// Non-zero once userspace has filled this in; until then the program
    /// passes everything.
    pub valid: u32,
    pub padding: u32,
}

/// Slots of [`COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpCounter {
    /// Datagrams forwarded to a backend in the kernel.
    Forwarded = 0,
    /// Replies relayed to a balancer in the kernel.
    Replied = 1,
    /// Datagrams to a session's listener passed to userspace because they
    /// are fragments, GSO, or carry IP options or extension headers.
    PassedShape = 2,
    /// A header the program does not take (TLVs, other families, LOCAL,
    /// a length it cannot remove): userspace parses it.
    PassedHeader = 3,
    /// A header-carrying datagram that matched no session (usually the
    /// first of a flow).
    PassedNoSession = 4,
    /// Payload over [`MAX_PAYLOAD`].
    PassedTooLarge = 5,
    /// A checksum that did not verify: userspace's socket drops it.
    PassedBadChecksum = 6,
    /// An IPv4 datagram from another device for a 127/8 backend, while
    /// `lo` lacks `route_localnet` or `accept_local`.
    PassedLocalnet = 7,
    /// A reply larger than the balancer device's MTU: the daemon's socket
    /// relays it (and the kernel fragments it there).
    PassedReplyRoute = 8,
    /// A helper failed: before the datagram was changed, it passed to
    /// userspace; after, it was dropped. Should stay 0.
    Errors = 9,
}

impl UdpCounter {
    /// Every counter, in slot order.
    pub const ALL: [UdpCounter; 10] = [
        UdpCounter::Forwarded,
        UdpCounter::Replied,
        UdpCounter::PassedShape,
        UdpCounter::PassedHeader,
        UdpCounter::PassedNoSession,
        UdpCounter::PassedTooLarge,
        UdpCounter::PassedBadChecksum,
        UdpCounter::PassedLocalnet,
        UdpCounter::PassedReplyRoute,
        UdpCounter::Errors,
    ];

    /// A name for logs and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            UdpCounter::Forwarded => "forwarded",
            UdpCounter::Replied => "replied",
            UdpCounter::PassedShape => "passed_shape",
            UdpCounter::PassedHeader => "passed_header",
            UdpCounter::PassedNoSession => "passed_no_session",
            UdpCounter::PassedTooLarge => "passed_too_large",
            UdpCounter::PassedBadChecksum => "passed_bad_checksum",
            UdpCounter::PassedLocalnet => "passed_localnet",
            UdpCounter::PassedReplyRoute => "passed_reply_route",
            UdpCounter::Errors => "errors",
        }
    }
}

/// Number of slots in [`COUNTERS_MAP`].
#[expect(clippy::cast_possible_truncation, reason = "10 counters fit any u32")]
pub const UDP_COUNTER_SLOTS: u32 = UdpCounter::ALL.len() as u32;

// The kernel side and userspace must agree on these layouts byte for byte.
const _: () = assert!(core::mem::size_of::<Endpoint>() == 20);
const _: () = assert!(core::mem::size_of::<ForwardKey>() == 60);
const _: () = assert!(core::mem::size_of::<ForwardAction>() == 80);
const _: () = assert!(core::mem::size_of::<ReplyKey>() == 40);
const _: () = assert!(core::mem::size_of::<ReplyAction>() == 64);
const _: () = assert!(core::mem::size_of::<UdpConfig>() == 24);

#[cfg(feature = "user")]
mod user {
    use core::net::{IpAddr, SocketAddr};

    use super::Endpoint;

    impl From<SocketAddr> for Endpoint {
        /// The packet form of an address: IPv4 as `::ffff:a.b.c.d`.
        fn from(addr: SocketAddr) -> Self {
            let v6 = match addr.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            Endpoint {
                addr: v6.octets(),
                port: addr.port().to_be_bytes(),
                padding: [0; 2],
            }
        }
    }

    // SAFETY: #[repr(C)] structs of integers and byte arrays with no
    // implicit padding (sizes asserted above), so every byte pattern is
    // a valid value.
    unsafe impl aya::Pod for super::Endpoint {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ForwardKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ForwardAction {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ReplyKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ReplyAction {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UdpConfig {}
}

#[cfg(all(test, feature = "user"))]
mod tests {
    use super::Endpoint;

    #[test]
    fn ipv4_endpoints_take_the_mapped_form_and_ports_network_order() {
        let e = Endpoint::from("192.0.2.7:4660".parse::<core::net::SocketAddr>().unwrap());
        assert_eq!(&e.addr[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&e.addr[12..], &[192, 0, 2, 7]);
        assert_eq!(e.port, [0x12, 0x34]);
    }
}
