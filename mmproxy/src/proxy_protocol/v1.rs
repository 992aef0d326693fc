//! Version 1: one line of text (spec 2.1).
//!
//! `PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n`, or
//! `PROXY UNKNOWN` followed by anything up to the CRLF, which is ignored.

use std::{
    io::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    str::FromStr,
};

use super::{
    error::Error,
    header::{Addresses, Command, Header, Status, V1_MAX_LEN, V1_SIGNATURE, Version},
    tlv::Tlvs,
    transport::Transport,
};

/// Parses a v1 header; `buf` starts with the whole v1 signature.
pub(super) fn parse(buf: &[u8]) -> Result<Status<'_>, Error> {
    let Some(line_len) = find_line_end(buf)? else {
        if buf.len() >= V1_MAX_LEN {
            return Err(Error::V1TooLong);
        }
        check_protocol_prefix(buf.get(V1_SIGNATURE.len()..).unwrap_or_default())?;
        return Ok(Status::Incomplete);
    };
    // `line_len` counts up to the CR; the header ends after the LF.
    let consumed = line_len + 2;
    let line = buf.get(V1_SIGNATURE.len()..line_len).unwrap_or_default();
    let mut fields = line.split(|&b| b == b' ');
    let protocol = fields.next().unwrap_or_default();
    let addresses = match protocol {
        // "the receiver must ignore anything presented before the CRLF"
        b"UNKNOWN" => Addresses::Unspec,
        b"TCP4" => {
            let [src, dst, sport, dport] = four_fields(fields)?;
            Addresses::Inet {
                source: SocketAddrV4::new(ip::<Ipv4Addr>(src)?, port(sport)?),
                destination: SocketAddrV4::new(ip::<Ipv4Addr>(dst)?, port(dport)?),
            }
        }
        b"TCP6" => {
            let [src, dst, sport, dport] = four_fields(fields)?;
            Addresses::Inet6 {
                source: SocketAddrV6::new(ip::<Ipv6Addr>(src)?, port(sport)?, 0, 0),
                destination: SocketAddrV6::new(ip::<Ipv6Addr>(dst)?, port(dport)?, 0, 0),
            }
        }
        _ => return Err(Error::V1BadProtocol),
    };
    let header = Header {
        version: Version::V1,
        command: Command::Proxy,
        transport: Transport::Stream,
        addresses,
        tlvs: Tlvs::EMPTY,
    };
    Ok(Status::Complete(header, consumed))
}

/// Fails a partial line whose protocol field can no longer become
/// `TCP4`, `TCP6` or `UNKNOWN`, so garbage is refused without waiting.
fn check_protocol_prefix(partial: &[u8]) -> Result<(), Error> {
    const PROTOCOLS: [&[u8]; 3] = [b"TCP4", b"TCP6", b"UNKNOWN"];
    let possible = match partial.iter().position(|&b| b == b' ' || b == b'\r') {
        Some(end) => PROTOCOLS.contains(&&partial[..end]),
        None => PROTOCOLS.iter().any(|p| p.starts_with(partial)),
    };
    if possible {
        Ok(())
    } else {
        Err(Error::V1BadProtocol)
    }
}

/// Finds the CR of the terminating CRLF within the first 107 bytes.
/// Rejects early any byte a v1 line cannot hold, so binary garbage fails
/// at once instead of waiting for 107 bytes or the header timeout.
fn find_line_end(buf: &[u8]) -> Result<Option<usize>, Error> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    for (i, &b) in window.iter().enumerate() {
        match b {
            b'\r' => {
                return match window.get(i + 1) {
                    Some(b'\n') => Ok(Some(i)),
                    Some(_) => Err(Error::V1BadCharacter),
                    None if i + 1 >= V1_MAX_LEN => Err(Error::V1TooLong),
                    None => Ok(None),
                };
            }
            b' '..=b'~' => {}
            _ => return Err(Error::V1BadCharacter),
        }
    }
    Ok(None)
}

fn four_fields<'a>(mut fields: impl Iterator<Item = &'a [u8]>) -> Result<[&'a [u8]; 4], Error> {
    let mut out = [&[][..]; 4];
    for slot in &mut out {
        match fields.next() {
            Some(f) if !f.is_empty() => *slot = f,
            _ => return Err(Error::V1BadFields),
        }
    }
    if fields.next().is_some() {
        return Err(Error::V1BadFields);
    }
    Ok(out)
}

fn ip<T: FromStr>(field: &[u8]) -> Result<T, Error> {
    // std's parsers reject IPv4 octets with leading zeros (no octal
    // ambiguity) and IPv6 zone identifiers.
    std::str::from_utf8(field)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(Error::V1BadAddress)
}

fn port(field: &[u8]) -> Result<u16, Error> {
    let valid_digits = matches!(field, [b'0'] | [b'1'..=b'9', ..])
        && field.len() <= 5
        && field.iter().all(u8::is_ascii_digit);
    if !valid_digits {
        return Err(Error::V1BadPort);
    }
    field
        .iter()
        .try_fold(0u32, |acc, &d| Some(acc * 10 + u32::from(d - b'0')))
        .and_then(|n| u16::try_from(n).ok())
        .ok_or(Error::V1BadPort)
}

/// Appends a v1 header: `TCP4`/`TCP6` for a pair of addresses of one
/// family, `UNKNOWN` for `None`. Mixed families are encoded as `UNKNOWN`
/// would lose information, so they are refused.
pub fn encode(
    addresses: Option<(SocketAddr, SocketAddr)>,
    out: &mut Vec<u8>,
) -> Result<(), MixedFamilies> {
    let line = match addresses {
        None => {
            out.extend_from_slice(b"PROXY UNKNOWN\r\n");
            return Ok(());
        }
        Some((SocketAddr::V4(s), SocketAddr::V4(d))) => (
            ("TCP4", s.ip().to_string(), d.ip().to_string()),
            s.port(),
            d.port(),
        ),
        Some((SocketAddr::V6(s), SocketAddr::V6(d))) => (
            ("TCP6", s.ip().to_string(), d.ip().to_string()),
            s.port(),
            d.port(),
        ),
        Some(_) => return Err(MixedFamilies),
    };
    let ((proto, src, dst), sport, dport) = line;
    // Writing into a Vec cannot fail.
    let _ = write!(out, "PROXY {proto} {src} {dst} {sport} {dport}\r\n");
    Ok(())
}

/// Source and destination of a v1 header must share one address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a v1 header needs source and destination of the same address family")]
pub struct MixedFamilies;
