//! What every subsystem's errors share: whose side a failure is on, and
//! how a chain of causes is written on one log line.

use std::fmt;

/// Which party a failure belongs to; a metrics label and a log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The load balancer's connection (or the client behind it).
    Client,
    /// The backend.
    Upstream,
    /// mmproxy itself or the host (resources, permissions).
    Internal,
}

impl Side {
    pub const fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
            Side::Internal => "internal",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// "a: b: c" from an error and its sources, for one-line logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
