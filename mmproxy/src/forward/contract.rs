//! What both data paths share: the connection they are handed, what
//! they report, and the moves that keep the contract of [`super`]: early
//! bytes written first ([`write_all`]), a FIN forwarded as a half-close
//! ([`shutdown_write`]), a failure mirrored as a reset ([`mirror_failure`]),
//! both directions driven to their ends ([`until_both_end`]).
//!
//! It sits below [`super::splice`], [`super::sockmap`] and the
//! [`super::Forwarder`] that chooses between them, so neither data path
//! reaches back into the module that dispatches to it.

use std::{io, os::fd::AsFd, time::Duration};

use bytes::Bytes;
use socket2::SockRef;
use tokio::net::TcpStream;

use crate::error::Side;

/// A proxied connection, ready to forward.
#[derive(Debug)]
pub struct Connection {
    pub client: TcpStream,
    pub upstream: TcpStream,
    /// Client bytes that arrived behind the PROXY header.
    pub early_data: Bytes,
    /// Length of the PROXY header read from the client.
    pub header_len: usize,
}

/// Bytes moved in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
}

/// A forwarding failure. The other side has been reset.
#[derive(Debug, thiserror::Error)]
#[error("{side} side failed while forwarding")]
pub struct ForwardError {
    pub side: Side,
    #[source]
    pub source: io::Error,
    /// What had been moved before the failure.
    pub transferred: Transferred,
}

/// Makes the kernel answer with RST when `stream` is closed: what a peer
/// that failed must look like to the other end.
pub fn reset_on_close(stream: &impl AsFd) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Forwards a FIN: half-closes `stream` for writing. A peer that is
/// already gone (`ENOTCONN`) is not an error here: its own direction
/// reports that.
pub(crate) fn shutdown_write(stream: &impl AsFd) -> io::Result<()> {
    match SockRef::from(stream).shutdown(std::net::Shutdown::Write) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
        other => other,
    }
}

/// Resets the socket opposite to the one that failed.
pub(crate) fn mirror_failure(failed: Side, client: &impl AsFd, upstream: &impl AsFd) {
    match failed {
        Side::Client => reset_on_close(upstream),
        Side::Upstream => reset_on_close(client),
        Side::Internal => {
            reset_on_close(client);
            reset_on_close(upstream);
        }
    }
}

/// A direction's result: bytes moved, or the failing side and its error.
pub(crate) type DirectionResult<T = u64> = Result<T, (Side, io::Error)>;

/// Drives both directions of a connection until both have ended, and
/// stops at the first failure: the caller then resets the other side.
/// On failure, also returns the bytes (`bytes` of each result) of any
/// direction that had finished.
pub(crate) async fn until_both_end<T>(
    up: impl Future<Output = DirectionResult<T>>,
    down: impl Future<Output = DirectionResult<T>>,
    bytes: impl Fn(&T) -> u64,
) -> Result<(T, T), (Side, io::Error, Transferred)> {
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (None, None);
    while up_done.is_none() || down_done.is_none() {
        let result = tokio::select! {
            r = &mut up, if up_done.is_none() => r.map(|n| up_done = Some(n)),
            r = &mut down, if down_done.is_none() => r.map(|n| down_done = Some(n)),
        };
        if let Err((side, error)) = result {
            let finished = Transferred {
                client_to_upstream: up_done.as_ref().map_or(0, &bytes),
                upstream_to_client: down_done.as_ref().map_or(0, &bytes),
            };
            return Err((side, error, finished));
        }
    }
    match (up_done, down_done) {
        (Some(up), Some(down)) => Ok((up, down)),
        _ => unreachable!("the loop ends when both are done"),
    }
}

/// Writes all of `data` through a shared reference (both directions of a
/// connection hold the same streams).
pub(crate) async fn write_all(stream: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        stream.writable().await?;
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
