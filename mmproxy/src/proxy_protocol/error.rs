//! Why a PROXY protocol header was refused.

use super::transport::Transport;

/// Every way a header can be invalid, or unusable on a listener.
///
/// A flat `Copy` enum: the parser allocates nothing, and each variant maps
/// to a fixed metrics label through [`Error::label`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The bytes start with neither the v1 nor the v2 signature.
    #[error("not a PROXY protocol header (neither the v1 nor the v2 signature)")]
    NotProxyProtocol,

    /// No CRLF within the 107 bytes a v1 header may take (spec 2.1).
    #[error("v1 header has no CRLF within 107 bytes")]
    V1TooLong,
    /// A byte that is not printable ASCII, or a CR not followed by LF.
    #[error("v1 header contains a byte that is not printable ASCII, or a CR without LF")]
    V1BadCharacter,
    /// The protocol field is not `TCP4`, `TCP6` or `UNKNOWN`.
    #[error("v1 protocol is not TCP4, TCP6 or UNKNOWN")]
    V1BadProtocol,
    /// Fields are not separated by exactly one space, or there are not
    /// exactly four after the protocol.
    #[error("v1 header does not have four fields separated by single spaces")]
    V1BadFields,
    /// An address that is not a valid address of the declared family.
    #[error("v1 address is not a valid address of the declared family")]
    V1BadAddress,
    /// A port that is not a decimal number 0-65535 without leading zeros.
    #[error("v1 port is not a decimal number 0-65535 without leading zeros")]
    V1BadPort,

    /// The version nibble is not 2 (spec 2.2).
    #[error("v2 version is not 2")]
    V2BadVersion,
    /// The command nibble is neither LOCAL (0) nor PROXY (1).
    #[error("v2 command is neither LOCAL nor PROXY")]
    V2BadCommand,
    /// The address family nibble is not UNSPEC, INET, INET6 or UNIX.
    #[error("v2 address family is not UNSPEC, INET, INET6 or UNIX")]
    V2BadFamily,
    /// The transport nibble is not UNSPEC, STREAM or DGRAM.
    #[error("v2 transport protocol is not UNSPEC, STREAM or DGRAM")]
    V2BadTransport,
    /// The declared length is smaller than the address family needs.
    #[error("v2 header is too short for its address family")]
    V2AddressesTooShort,
    /// A TLV (or SSL sub-TLV) runs past the end of its container.
    #[error("v2 TLV runs past the end of the header")]
    V2TlvTruncated,
    /// A CRC32C TLV whose value is not 4 bytes long.
    #[error("v2 CRC32C TLV is not 4 bytes long")]
    V2Crc32cLength,
    /// The CRC32C TLV does not match the header (spec 2.2.5).
    #[error("v2 CRC32C checksum does not match the header")]
    V2Crc32cMismatch,
    /// More than one CRC32C TLV. Refused before any is computed: each one
    /// costs a pass over the whole header, so thousands of them in a
    /// 64 KiB header would make parsing quadratic.
    #[error("v2 header carries more than one CRC32C TLV")]
    V2DuplicateCrc32c,
    /// A UNIQUE_ID TLV longer than 128 bytes (spec 2.2.6).
    #[error("v2 UNIQUE_ID TLV is longer than 128 bytes")]
    V2UniqueIdTooLong,
    /// An SSL TLV shorter than its 5-byte fixed part (spec 2.2.7).
    #[error("v2 SSL TLV is shorter than its client and verify fields")]
    V2SslTooShort,

    /// UNIX socket addresses name no IP endpoint to spoof.
    #[error("the header carries UNIX socket addresses, which cannot be spoofed")]
    UnixAddresses,
    /// The header's transport is not the listener's (a DGRAM header on a
    /// TCP listener, a STREAM or v1 header on UDP).
    #[error("the header declares {declared} but arrived over {listener}")]
    TransportMismatch {
        /// What the header declares.
        declared: Transport,
        /// What the listener speaks.
        listener: Transport,
    },
}

impl Error {
    /// A short fixed name for metrics labels and structured logs.
    pub const fn label(self) -> &'static str {
        match self {
            Error::NotProxyProtocol => "not_proxy_protocol",
            Error::V1TooLong => "v1_too_long",
            Error::V1BadCharacter => "v1_bad_character",
            Error::V1BadProtocol => "v1_bad_protocol",
            Error::V1BadFields => "v1_bad_fields",
            Error::V1BadAddress => "v1_bad_address",
            Error::V1BadPort => "v1_bad_port",
            Error::V2BadVersion => "v2_bad_version",
            Error::V2BadCommand => "v2_bad_command",
            Error::V2BadFamily => "v2_bad_family",
            Error::V2BadTransport => "v2_bad_transport",
            Error::V2AddressesTooShort => "v2_addresses_too_short",
            Error::V2TlvTruncated => "v2_tlv_truncated",
            Error::V2Crc32cLength => "v2_crc32c_length",
            Error::V2Crc32cMismatch => "v2_crc32c_mismatch",
            Error::V2DuplicateCrc32c => "v2_duplicate_crc32c",
            Error::V2UniqueIdTooLong => "v2_unique_id_too_long",
            Error::V2SslTooShort => "v2_ssl_too_short",
            Error::UnixAddresses => "unix_addresses",
            Error::TransportMismatch { .. } => "transport_mismatch",
        }
    }
}
