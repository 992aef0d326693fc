//! What a parsed header is: its version, command, transport, addresses
//! and TLVs, and the signatures and lengths that frame it on the wire.
//! [`super::v1`] and [`super::v2`] fill it in; [`super::parse`] chooses
//! between them.

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

use super::{tlv::Tlvs, transport::Transport};

/// The 6 bytes every v1 header starts with (spec 2.1).
pub const V1_SIGNATURE: &[u8; 6] = b"PROXY ";
/// The largest v1 header, CRLF included (spec 2.1).
pub const V1_MAX_LEN: usize = 107;
/// The 12 bytes every v2 header starts with (spec 2.2).
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family/transport and length (spec 2.2).
pub const V2_FIXED_LEN: usize = 16;
/// The largest v2 header: the fixed part plus a 16-bit length.
pub const V2_MAX_LEN: usize = V2_FIXED_LEN + u16::MAX as usize;
/// The largest header of either version; a reader never needs more.
pub const MAX_HEADER_LEN: usize = V2_MAX_LEN;

/// The outcome of [`super::parse`] on the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status<'a> {
    /// A whole header, and the number of bytes it occupies at the front of
    /// the buffer. Bytes after it are payload.
    Complete(Header<'a>, usize),
    /// The bytes so far are a valid beginning; more are needed.
    Incomplete,
}

/// A parsed header. Borrowed TLV data points into the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    pub version: Version,
    pub command: Command,
    /// STREAM for every v1 header: v1 only describes TCP connections.
    pub transport: Transport,
    pub addresses: Addresses<'a>,
    /// Empty for v1. Already validated: iterating cannot fail.
    pub tlvs: Tlvs<'a>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The balancer's own connection (health checks): use the real
    /// endpoints, ignore the addresses (spec 2.2).
    Local,
    /// A relayed connection; the addresses name the original endpoints.
    Proxy,
}

/// The original endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addresses<'a> {
    /// v1 `UNKNOWN`, v2 `UNSPEC`, or any v2 `LOCAL` header.
    Unspec,
    Inet {
        source: SocketAddrV4,
        destination: SocketAddrV4,
    },
    Inet6 {
        source: SocketAddrV6,
        destination: SocketAddrV6,
    },
    /// Socket paths, NUL-padded (spec 2.2: 108 bytes each).
    Unix {
        source: &'a [u8; 108],
        destination: &'a [u8; 108],
    },
}

impl Addresses<'_> {
    /// Source and destination as socket addresses, for the IP families.
    pub fn socket_addrs(&self) -> Option<(SocketAddr, SocketAddr)> {
        match *self {
            Addresses::Inet {
                source,
                destination,
            } => Some((source.into(), destination.into())),
            Addresses::Inet6 {
                source,
                destination,
            } => Some((source.into(), destination.into())),
            Addresses::Unspec | Addresses::Unix { .. } => None,
        }
    }
}
