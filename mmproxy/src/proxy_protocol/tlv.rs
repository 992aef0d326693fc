//! v2 Type-Length-Value extensions (spec 2.2.1 - 2.2.8).
//!
//! The parser validates the whole TLV area once ([`validate`]): structure,
//! CRC32C, UNIQUE_ID length and the SSL TLV's fixed part and sub-TLVs.
//! Afterwards [`Tlvs::iter`] walks the borrowed bytes without allocating
//! and cannot fail. Unknown and vendor types are kept as raw values.

use std::fmt;

use super::{error::Error, reader::Reader};

/// A TLV type byte. A newtype rather than an enum, so that unknown,
/// vendor (0xE0-0xEF) and experimental types survive as they are.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TlvType(pub u8);

impl TlvType {
    pub const ALPN: TlvType = TlvType(0x01);
    pub const AUTHORITY: TlvType = TlvType(0x02);
    pub const CRC32C: TlvType = TlvType(0x03);
    pub const NOOP: TlvType = TlvType(0x04);
    pub const UNIQUE_ID: TlvType = TlvType(0x05);
    pub const SSL: TlvType = TlvType(0x20);
    pub const SSL_VERSION: TlvType = TlvType(0x21);
    pub const SSL_CN: TlvType = TlvType(0x22);
    pub const SSL_CIPHER: TlvType = TlvType(0x23);
    pub const SSL_SIG_ALG: TlvType = TlvType(0x24);
    pub const SSL_KEY_ALG: TlvType = TlvType(0x25);
    pub const NETNS: TlvType = TlvType(0x30);

    /// The spec's name for a registered type.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0x01 => "ALPN",
            0x02 => "AUTHORITY",
            0x03 => "CRC32C",
            0x04 => "NOOP",
            0x05 => "UNIQUE_ID",
            0x20 => "SSL",
            0x21 => "SSL_VERSION",
            0x22 => "SSL_CN",
            0x23 => "SSL_CIPHER",
            0x24 => "SSL_SIG_ALG",
            0x25 => "SSL_KEY_ALG",
            0x30 => "NETNS",
            _ => return None,
        })
    }

    /// 0xE0-0xEF: "application-specific data" (spec 2.2.8), e.g. AWS's 0xEA.
    pub const fn is_custom(self) -> bool {
        matches!(self.0, 0xE0..=0xEF)
    }
}

impl fmt::Debug for TlvType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "TlvType({:#04x})", self.0),
        }
    }
}

/// The largest UNIQUE_ID value (spec 2.2.6).
pub const MAX_UNIQUE_ID_LEN: usize = 128;
/// SSL TLV: client bit field (1 byte) and verify result (4 bytes).
const SSL_FIXED_LEN: usize = 5;

/// One TLV as it is on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawTlv<'a> {
    pub kind: TlvType,
    pub value: &'a [u8],
}

/// A TLV with its registered meaning applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tlv<'a> {
    /// Application-Layer Protocol Negotiation, e.g. `h2`.
    Alpn(&'a [u8]),
    /// The host name the client asked for (TLS SNI), UTF-8.
    Authority(&'a [u8]),
    /// Checksum of the header (already verified by the parser).
    Crc32c(u32),
    /// Padding.
    Noop(&'a [u8]),
    /// An opaque connection identifier of at most 128 bytes.
    UniqueId(&'a [u8]),
    /// TLS details of the client connection.
    Ssl(SslInfo<'a>),
    /// The network namespace name, US-ASCII.
    Netns(&'a [u8]),
    /// Any other type, vendor types included.
    Other(RawTlv<'a>),
}

/// The SSL TLV (spec 2.2.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SslInfo<'a> {
    /// `PP2_CLIENT_SSL` (1), `PP2_CLIENT_CERT_CONN` (2), `PP2_CLIENT_CERT_SESS` (4).
    pub client: u8,
    /// 0 when the client presented a certificate that verified.
    pub verify: u32,
    /// Sub-TLVs: SSL_VERSION, SSL_CN, SSL_CIPHER, SSL_SIG_ALG, SSL_KEY_ALG, ...
    pub sub_tlvs: Tlvs<'a>,
}

impl<'a> SslInfo<'a> {
    /// The value of the first sub-TLV of `kind`.
    pub fn get(&self, kind: TlvType) -> Option<&'a [u8]> {
        self.sub_tlvs
            .iter()
            .find(|t| t.kind == kind)
            .map(|t| t.value)
    }
}

impl<'a> From<RawTlv<'a>> for Tlv<'a> {
    fn from(raw: RawTlv<'a>) -> Self {
        match raw.kind {
            TlvType::ALPN => Tlv::Alpn(raw.value),
            TlvType::AUTHORITY => Tlv::Authority(raw.value),
            TlvType::CRC32C => match <[u8; 4]>::try_from(raw.value) {
                Ok(b) => Tlv::Crc32c(u32::from_be_bytes(b)),
                Err(_) => Tlv::Other(raw),
            },
            TlvType::NOOP => Tlv::Noop(raw.value),
            TlvType::UNIQUE_ID => Tlv::UniqueId(raw.value),
            TlvType::SSL => match ssl_info(raw.value) {
                Some(info) => Tlv::Ssl(info),
                None => Tlv::Other(raw),
            },
            TlvType::NETNS => Tlv::Netns(raw.value),
            _ => Tlv::Other(raw),
        }
    }
}

fn ssl_info(value: &[u8]) -> Option<SslInfo<'_>> {
    let mut r = Reader::new(value);
    let client = r.u8()?;
    let verify = r.u32()?;
    Some(SslInfo {
        client,
        verify,
        sub_tlvs: Tlvs { bytes: r.rest() },
    })
}

/// A validated run of TLVs, borrowed from the header.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Tlvs<'a> {
    bytes: &'a [u8],
}

impl fmt::Debug for Tlvs<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a> Tlvs<'a> {
    /// No TLVs (every v1 header).
    pub const EMPTY: Tlvs<'static> = Tlvs { bytes: &[] };

    /// The raw TLVs in wire order.
    pub fn iter(&self) -> TlvIter<'a> {
        TlvIter {
            reader: Reader::new(self.bytes),
        }
    }

    /// The TLVs in wire order, interpreted.
    pub fn parsed(&self) -> impl Iterator<Item = Tlv<'a>> + use<'a> {
        self.iter().map(Tlv::from)
    }

    /// The value of the first TLV of `kind`.
    pub fn get(&self, kind: TlvType) -> Option<&'a [u8]> {
        self.iter().find(|t| t.kind == kind).map(|t| t.value)
    }

    /// The encoded TLV bytes (for re-encoding a header as received).
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl<'a> IntoIterator for &Tlvs<'a> {
    type Item = RawTlv<'a>;
    type IntoIter = TlvIter<'a>;

    fn into_iter(self) -> TlvIter<'a> {
        self.iter()
    }
}

/// Iterates raw TLVs. Stops at the end, or at the first malformed TLV
/// (which [`validate`] has already ruled out for parsed headers).
#[derive(Debug, Clone)]
pub struct TlvIter<'a> {
    reader: Reader<'a>,
}

impl<'a> Iterator for TlvIter<'a> {
    type Item = RawTlv<'a>;

    fn next(&mut self) -> Option<RawTlv<'a>> {
        next_tlv(&mut self.reader).ok().flatten()
    }
}

fn next_tlv<'a>(r: &mut Reader<'a>) -> Result<Option<RawTlv<'a>>, Error> {
    if !r.any_left() {
        return Ok(None);
    }
    let kind = TlvType(r.u8().ok_or(Error::V2TlvTruncated)?);
    let len = r.u16().ok_or(Error::V2TlvTruncated)?;
    let value = r.take(usize::from(len)).ok_or(Error::V2TlvTruncated)?;
    Ok(Some(RawTlv { kind, value }))
}

/// Validates the TLV area of a v2 header.
///
/// `area_offset` is where `area` starts inside `header` (the whole header,
/// signature included), which the CRC32C check needs.
pub(super) fn validate<'a>(
    area: &'a [u8],
    area_offset: usize,
    header: &[u8],
) -> Result<Tlvs<'a>, Error> {
    if crc32c_count(area) > 1 {
        return Err(Error::V2DuplicateCrc32c);
    }
    let mut r = Reader::new(area);
    while let Some(tlv) = next_tlv(&mut r)? {
        match tlv.kind {
            TlvType::CRC32C => {
                let value_end = area_offset + (area.len() - r.rest().len());
                check_crc32c(header, value_end - tlv.value.len(), tlv.value)?;
            }
            TlvType::UNIQUE_ID if tlv.value.len() > MAX_UNIQUE_ID_LEN => {
                return Err(Error::V2UniqueIdTooLong);
            }
            TlvType::SSL => {
                let sub = tlv.value.get(SSL_FIXED_LEN..).ok_or(Error::V2SslTooShort)?;
                let mut sr = Reader::new(sub);
                while next_tlv(&mut sr)?.is_some() {}
            }
            _ => {}
        }
    }
    Ok(Tlvs { bytes: area })
}

/// How many CRC32C TLVs the area holds (up to where its structure
/// breaks; the main pass reports that). One pass over TLV headers only.
fn crc32c_count(area: &[u8]) -> usize {
    let mut r = Reader::new(area);
    let mut count = 0;
    while let Ok(Some(tlv)) = next_tlv(&mut r) {
        count += usize::from(tlv.kind == TlvType::CRC32C);
    }
    count
}

/// Spec 2.2.5: CRC32c over the whole header with the checksum field zeroed.
fn check_crc32c(header: &[u8], value_at: usize, value: &[u8]) -> Result<(), Error> {
    let expected = <[u8; 4]>::try_from(value).map_err(|_| Error::V2Crc32cLength)?;
    let (before, rest) = header
        .split_at_checked(value_at)
        .ok_or(Error::V2TlvTruncated)?;
    let after = rest.get(4..).ok_or(Error::V2TlvTruncated)?;
    let mut crc = crc32c::crc32c(before);
    crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc = crc32c::crc32c_append(crc, after);
    if crc == u32::from_be_bytes(expected) {
        Ok(())
    } else {
        Err(Error::V2Crc32cMismatch)
    }
}
