//! Version 2: a binary header (spec 2.2).
//!
//! 12-byte signature, version/command byte, family/transport byte, a
//! 16-bit big-endian length, then that many bytes: the address block for
//! the family, followed by TLVs.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use super::{
    error::Error,
    header::{Addresses, Command, Header, Status, V2_FIXED_LEN, V2_SIGNATURE, Version},
    reader::Reader,
    tlv::{self, TlvType},
    transport::Transport,
};

const INET_BLOCK_LEN: usize = 12;
const INET6_BLOCK_LEN: usize = 36;
const UNIX_BLOCK_LEN: usize = 216;

/// The family nibble (high half of byte 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Unspec,
    Inet,
    Inet6,
    Unix,
}

impl Family {
    fn from_nibble(n: u8) -> Option<Self> {
        match n {
            0 => Some(Family::Unspec),
            1 => Some(Family::Inet),
            2 => Some(Family::Inet6),
            3 => Some(Family::Unix),
            _ => None,
        }
    }

    fn block_len(self) -> usize {
        match self {
            Family::Unspec => 0,
            Family::Inet => INET_BLOCK_LEN,
            Family::Inet6 => INET6_BLOCK_LEN,
            Family::Unix => UNIX_BLOCK_LEN,
        }
    }
}

fn transport_from_nibble(n: u8) -> Option<Transport> {
    match n {
        0 => Some(Transport::Unspec),
        1 => Some(Transport::Stream),
        2 => Some(Transport::Datagram),
        _ => None,
    }
}

/// Parses a v2 header; `buf` starts with the whole v2 signature.
pub(super) fn parse(buf: &[u8]) -> Result<Status<'_>, Error> {
    let mut r = Reader::new(buf);
    let _signature = r.take(V2_SIGNATURE.len());
    // Reject a bad version or command as soon as its byte is here.
    let Some(version_command) = r.u8() else {
        return Ok(Status::Incomplete);
    };
    if version_command >> 4 != 2 {
        return Err(Error::V2BadVersion);
    }
    let command = match version_command & 0x0f {
        0 => Command::Local,
        1 => Command::Proxy,
        _ => return Err(Error::V2BadCommand),
    };
    let Some(family_transport) = r.u8() else {
        return Ok(Status::Incomplete);
    };
    let family = Family::from_nibble(family_transport >> 4);
    let transport = transport_from_nibble(family_transport & 0x0f);
    if command == Command::Proxy {
        // For LOCAL "the protocol block including the family ... is ignored"
        // (spec 2.2), so unknown values only fail PROXY headers.
        if family.is_none() {
            return Err(Error::V2BadFamily);
        }
        if transport.is_none() {
            return Err(Error::V2BadTransport);
        }
    }
    let Some(len) = r.u16() else {
        return Ok(Status::Incomplete);
    };
    let Some(block) = r.take(usize::from(len)) else {
        return Ok(Status::Incomplete);
    };
    let consumed = V2_FIXED_LEN + block.len();
    let header_bytes = &buf[..consumed];

    let (addresses, tlv_area) = match (command, family) {
        (Command::Proxy, Some(family)) => parse_addresses(family, block)?,
        // LOCAL: addresses are ignored; TLVs still follow a well-formed
        // address block, so read them where they can be located.
        (Command::Local, Some(family)) => match block.get(family.block_len()..) {
            Some(rest) => (Addresses::Unspec, rest),
            None => (Addresses::Unspec, &[][..]),
        },
        (_, None) => (Addresses::Unspec, &[][..]),
    };
    let tlv_offset = consumed - tlv_area.len();
    let tlvs = tlv::validate(tlv_area, tlv_offset, header_bytes)?;
    let header = Header {
        version: Version::V2,
        command,
        transport: transport.unwrap_or(Transport::Unspec),
        addresses,
        tlvs,
    };
    Ok(Status::Complete(header, consumed))
}

fn parse_addresses(family: Family, block: &[u8]) -> Result<(Addresses<'_>, &[u8]), Error> {
    let mut r = Reader::new(block);
    let short = Error::V2AddressesTooShort;
    let addresses = match family {
        // "the receiver ... must ignore the address information" (UNSPEC):
        // the whole block is TLVs.
        Family::Unspec => Addresses::Unspec,
        Family::Inet => {
            let source_ip = r.array::<4>().ok_or(short)?;
            let destination_ip = r.array::<4>().ok_or(short)?;
            let source_port = r.u16().ok_or(short)?;
            let destination_port = r.u16().ok_or(short)?;
            Addresses::Inet {
                source: SocketAddrV4::new(Ipv4Addr::from(*source_ip), source_port),
                destination: SocketAddrV4::new(Ipv4Addr::from(*destination_ip), destination_port),
            }
        }
        Family::Inet6 => {
            let source_ip = r.array::<16>().ok_or(short)?;
            let destination_ip = r.array::<16>().ok_or(short)?;
            let source_port = r.u16().ok_or(short)?;
            let destination_port = r.u16().ok_or(short)?;
            Addresses::Inet6 {
                source: SocketAddrV6::new(Ipv6Addr::from(*source_ip), source_port, 0, 0),
                destination: SocketAddrV6::new(
                    Ipv6Addr::from(*destination_ip),
                    destination_port,
                    0,
                    0,
                ),
            }
        }
        Family::Unix => Addresses::Unix {
            source: r.array::<108>().ok_or(short)?,
            destination: r.array::<108>().ok_or(short)?,
        },
    };
    Ok((addresses, r.rest()))
}

/// Builds v2 headers: used by tests, the benchmark's load generator and
/// the UDP path. Encoding allocates; parsing does not.
#[derive(Debug, Clone)]
pub struct Builder {
    command: Command,
    transport: Transport,
    addresses: Option<(SocketAddr, SocketAddr)>,
    tlvs: Vec<(TlvType, Vec<u8>)>,
    crc32c: bool,
}

/// A header that does not fit the 16-bit length, or mixes families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("source and destination addresses are of different families")]
    MixedFamilies,
    #[error("the header would be longer than 65535 bytes after the fixed part")]
    TooLong,
}

impl Builder {
    /// A PROXY header for a `transport` connection between two addresses.
    pub fn proxy(transport: Transport, source: SocketAddr, destination: SocketAddr) -> Self {
        Self {
            command: Command::Proxy,
            transport,
            addresses: Some((source, destination)),
            tlvs: Vec::new(),
            crc32c: false,
        }
    }

    /// A LOCAL header (family UNSPEC), as balancers send for health checks.
    pub fn local() -> Self {
        Self {
            command: Command::Local,
            transport: Transport::Unspec,
            addresses: None,
            tlvs: Vec::new(),
            crc32c: false,
        }
    }

    /// A PROXY header with family UNSPEC: "connect without spoofing".
    pub fn unspec() -> Self {
        Self {
            command: Command::Proxy,
            ..Self::local()
        }
    }

    /// Appends a TLV (kept in order).
    #[must_use]
    pub fn tlv(mut self, kind: TlvType, value: &[u8]) -> Self {
        self.tlvs.push((kind, value.to_vec()));
        self
    }

    /// Appends a CRC32C TLV computed over the finished header.
    #[must_use]
    pub fn with_crc32c(mut self) -> Self {
        self.crc32c = true;
        self
    }

    /// Encodes the header.
    pub fn build(&self) -> Result<Vec<u8>, BuildError> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(V2_SIGNATURE);
        out.push(0x20 | u8::from(self.command == Command::Proxy));
        let transport = match self.transport {
            Transport::Unspec => 0,
            Transport::Stream => 1,
            Transport::Datagram => 2,
        };
        let family: u8 = match self.addresses {
            None => 0,
            Some((SocketAddr::V4(_), SocketAddr::V4(_))) => 1,
            Some((SocketAddr::V6(_), SocketAddr::V6(_))) => 2,
            Some(_) => return Err(BuildError::MixedFamilies),
        };
        out.push(family << 4 | transport);
        out.extend_from_slice(&[0, 0]); // length, patched below
        match self.addresses {
            Some((SocketAddr::V4(s), SocketAddr::V4(d))) => {
                out.extend_from_slice(&s.ip().octets());
                out.extend_from_slice(&d.ip().octets());
                out.extend_from_slice(&s.port().to_be_bytes());
                out.extend_from_slice(&d.port().to_be_bytes());
            }
            Some((SocketAddr::V6(s), SocketAddr::V6(d))) => {
                out.extend_from_slice(&s.ip().octets());
                out.extend_from_slice(&d.ip().octets());
                out.extend_from_slice(&s.port().to_be_bytes());
                out.extend_from_slice(&d.port().to_be_bytes());
            }
            _ => {}
        }
        for (kind, value) in &self.tlvs {
            push_tlv(&mut out, *kind, value)?;
        }
        let crc_at = if self.crc32c {
            push_tlv(&mut out, TlvType::CRC32C, &[0; 4])?;
            Some(out.len() - 4)
        } else {
            None
        };
        let len = u16::try_from(out.len() - V2_FIXED_LEN).map_err(|_| BuildError::TooLong)?;
        out[14..16].copy_from_slice(&len.to_be_bytes());
        if let Some(at) = crc_at {
            // Spec 2.2.5: the checksum covers the whole header with the
            // checksum field itself set to zero, which it still is.
            let crc = crc32c::crc32c(&out);
            out[at..at + 4].copy_from_slice(&crc.to_be_bytes());
        }
        Ok(out)
    }
}

fn push_tlv(out: &mut Vec<u8>, kind: TlvType, value: &[u8]) -> Result<(), BuildError> {
    let len = u16::try_from(value.len()).map_err(|_| BuildError::TooLong)?;
    out.push(kind.0);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(value);
    Ok(())
}
