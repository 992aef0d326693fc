//! The PROXY protocol, versions 1 and 2, as `HAProxy`'s `proxy-protocol.txt`
//! specifies them: a pure parser and an encoder.
//!
//! [`parse`] looks at the bytes received so far and answers one of:
//! - [`Status::Complete`]: a whole header and how many bytes it used, so
//!   the caller consumes exactly the header and keeps the payload behind it;
//! - [`Status::Incomplete`]: a valid prefix, wait for more bytes (a header
//!   split across TCP segments);
//! - an [`Error`] saying what is wrong.
//!
//! The parser does no I/O, allocates nothing, has no `unsafe` and never
//! panics (the fuzz target and the mutation tests hold it to that). Every
//! read goes through a bounds-checked [`reader::Reader`]; lengths declared
//! on the wire are checked against the buffer before they are used.
//!
//! [`Header::action`] turns a header into what the proxy does with the
//! connection: spoof the client's address, connect without spoofing, or
//! refuse.

mod error;
mod reader;
mod tlv;
mod v1;
mod v2;

#[cfg(test)]
mod tests;

use std::{
    fmt,
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
};

pub use error::Error;
pub use tlv::{MAX_UNIQUE_ID_LEN, RawTlv, SslInfo, Tlv, TlvIter, TlvType, Tlvs};
pub use v1::encode as encode_v1;
pub use v2::Builder as V2Builder;

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

/// The outcome of [`parse`] on the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status<'a> {
    /// A whole header, and the number of bytes it occupies at the front of
    /// the buffer. Bytes after it are payload.
    Complete(Header<'a>, usize),
    /// The bytes so far are a valid beginning; more are needed.
    Incomplete,
}

/// Parses the header at the front of `buf`.
pub fn parse(buf: &[u8]) -> Result<Status<'_>, Error> {
    if let Some(head) = buf.get(..V1_SIGNATURE.len().min(buf.len()))
        && V1_SIGNATURE.starts_with(head)
    {
        return if buf.len() < V1_SIGNATURE.len() {
            Ok(Status::Incomplete)
        } else {
            v1::parse(buf)
        };
    }
    let head = &buf[..V2_SIGNATURE.len().min(buf.len())];
    if V2_SIGNATURE.starts_with(head) {
        return if buf.len() < V2_SIGNATURE.len() {
            Ok(Status::Incomplete)
        } else {
            v2::parse(buf)
        };
    }
    Err(Error::NotProxyProtocol)
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

/// The transport the header declares, or the one a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Unspec,
    Stream,
    Datagram,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Unspec => "UNSPEC",
            Transport::Stream => "STREAM (TCP)",
            Transport::Datagram => "DGRAM (UDP)",
        })
    }
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

/// What the proxy should do with a connection, decided from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Connect upstream from `source` (the real client). IPv4-mapped IPv6
    /// addresses are given as IPv4: that is the family they belong to.
    Spoof {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// Connect upstream without spoofing: LOCAL, UNKNOWN or UNSPEC.
    Direct,
}

impl Header<'_> {
    /// Decides what to do with a header that arrived on a `listener`
    /// speaking STREAM (TCP) or DGRAM (UDP).
    pub fn action(&self, listener: Transport) -> Result<Action, Error> {
        if self.transport != listener && self.transport != Transport::Unspec {
            // Checked before LOCAL: a v1 header or a STREAM health check on
            // a UDP port is a misconfigured balancer, better refused loudly.
            return Err(Error::TransportMismatch {
                declared: self.transport,
                listener,
            });
        }
        if self.command == Command::Local {
            return Ok(Action::Direct);
        }
        match self.addresses {
            Addresses::Unspec => Ok(Action::Direct),
            Addresses::Unix { .. } => Err(Error::UnixAddresses),
            Addresses::Inet { .. } | Addresses::Inet6 { .. } => {
                if self.transport != listener {
                    return Err(Error::TransportMismatch {
                        declared: self.transport,
                        listener,
                    });
                }
                let (source, destination) =
                    self.addresses.socket_addrs().ok_or(Error::UnixAddresses)?;
                Ok(Action::Spoof {
                    source: unmap(source),
                    destination: unmap(destination),
                })
            }
        }
    }
}

/// `::ffff:a.b.c.d` becomes `a.b.c.d`: a TCP6 header for an IPv4 client
/// must be spoofed and routed as IPv4.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// The fuzz target's body (`fuzz/fuzz_targets/parse.rs`): parses, then
/// checks the invariants a caller relies on. Panics on a violation.
#[doc(hidden)]
pub fn fuzz_parse(data: &[u8]) {
    let Ok(Status::Complete(header, consumed)) = parse(data) else {
        return;
    };
    assert!(consumed <= data.len(), "consumed past the input");
    for tlv in header.tlvs.parsed() {
        if let Tlv::Ssl(ssl) = tlv {
            let _ = ssl.sub_tlvs.iter().count();
        }
    }
    let _ = header.action(Transport::Stream);
    let _ = header.action(Transport::Datagram);
    // The header alone, without what followed it, parses the same.
    assert_eq!(
        parse(&data[..consumed]),
        Ok(Status::Complete(header, consumed))
    );
}
