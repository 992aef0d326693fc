//! The transport a header declares (v2's transport nibble; STREAM for
//! v1), or the one a listener speaks. On its own, below both the header
//! and the errors that name it.

use std::fmt;

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
