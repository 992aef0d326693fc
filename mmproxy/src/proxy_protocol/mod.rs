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
mod header;
mod reader;
mod tlv;
mod transport;
mod v1;
mod v2;

#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};

pub use error::Error;
pub use header::{
    Addresses, Command, Header, MAX_HEADER_LEN, Status, V1_MAX_LEN, V1_SIGNATURE, V2_FIXED_LEN,
    V2_MAX_LEN, V2_SIGNATURE, Version,
};
pub use tlv::{MAX_UNIQUE_ID_LEN, RawTlv, SslInfo, Tlv, TlvIter, TlvType, Tlvs};
pub use transport::Transport;
pub use v1::encode as encode_v1;
pub use v2::Builder as V2Builder;

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
