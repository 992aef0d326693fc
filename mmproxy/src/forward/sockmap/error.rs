//! Every way a sockmap connection can fail, in one enum.

use std::io;

use crate::error::Side;

/// A failure of one direction of an armed connection. Any of them ends
/// the connection with a reset to both peers (or to the peer opposite the
/// failed side), never with a clean FIN.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SockmapError {
    /// A socket call failed, or the socket reported an error (a reset).
    #[error("{side} socket")]
    Io {
        side: Side,
        #[source]
        source: io::Error,
    },
    /// A BPF map update failed.
    #[error("BPF map update")]
    Map(#[source] aya::maps::MapError),
    /// The verdict (plus userspace) handed on more than TCP received.
    #[error(
        "tripwire: {forwarded} bytes forwarded from the {side} socket but only {received} \
         received; resetting rather than delivering a corrupt stream"
    )]
    Tripwire {
        side: Side,
        forwarded: u64,
        received: u64,
    },
    /// An skb overlapped bytes already redirected by more than the
    /// verdict can trim.
    #[error(
        "the kernel handed the {side} socket an skb overlapping bytes already redirected, \
         too large to trim; resetting"
    )]
    TrimFailed { side: Side },
    /// After the FIN, bytes TCP received never reached the verdict or
    /// userspace.
    #[error(
        "the {side} socket ended with {received} bytes received but only {forwarded} \
         accounted for; resetting rather than ending the stream short"
    )]
    ShortAtEof {
        side: Side,
        forwarded: u64,
        received: u64,
    },
}

impl SockmapError {
    pub(crate) fn io(side: Side, source: io::Error) -> Self {
        Self::Io { side, source }
    }

    /// The form the forwarders' shared helpers take: a socket error
    /// belongs to its side, an inconsistency to mmproxy.
    pub(crate) fn into_side_error(self) -> (Side, io::Error) {
        match self {
            Self::Io { side, source } => (side, source),
            other => (Side::Internal, io::Error::other(other)),
        }
    }
}

impl From<aya::maps::MapError> for SockmapError {
    fn from(e: aya::maps::MapError) -> Self {
        Self::Map(e)
    }
}
