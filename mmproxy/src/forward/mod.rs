//! Moving bytes between the client and the backend once both are connected.
//!
//! Two data paths share one interface, [`Forwarder::forward`]:
//! - [`splice`]: userspace moves bytes with zero-copy `splice(2)` through
//!   pooled pipes (a buffer copy when no pipe can be had);
//! - [`sockmap`]: the kernel redirects each skb to the peer socket (BPF),
//!   or passes it to userspace while the peer is backlogged.
//!
//! Both keep the same contract: bytes that arrived with the PROXY header
//! go first; a FIN is propagated as a half-close (`shutdown(SHUT_WR)`) and
//! the other direction keeps flowing; a reset or error on one side is
//! mirrored as a reset on the other (SO_LINGER 0), never as a clean FIN,
//! so neither end mistakes a broken transfer for a complete one.

pub mod sockmap;
pub mod splice;

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    time::Duration,
};

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

/// The data path chosen at start-up.
#[derive(Debug)]
pub enum Forwarder {
    Plain(splice::SpliceForwarder),
    Ebpf(sockmap::SockmapForwarder),
}

impl Forwarder {
    /// Forwards until both directions have ended (or one side failed).
    pub async fn forward(&self, conn: Connection) -> Result<Transferred, ForwardError> {
        match self {
            Forwarder::Plain(f) => f.forward(conn).await,
            Forwarder::Ebpf(f) => f.forward(conn).await,
        }
    }

    /// As [`Forwarder::forward`], until `abort` is cancelled (the drain
    /// timeout expired): then both peers get a reset, never a clean FIN
    /// with bytes missing.
    pub async fn forward_until(
        &self,
        conn: Connection,
        abort: &tokio_util::sync::CancellationToken,
    ) -> Result<Transferred, ForwardError> {
        let fds = [conn.client.as_raw_fd(), conn.upstream.as_raw_fd()];
        let forwarding = self.forward(conn);
        tokio::pin!(forwarding);
        tokio::select! {
            result = &mut forwarding => result,
            () = abort.cancelled() => {
                for fd in fds {
                    // SAFETY: `forwarding` owns both sockets and is alive
                    // until this function returns, so the descriptors are
                    // open and still refer to them.
                    reset_on_close(&unsafe { BorrowedFd::borrow_raw(fd) });
                }
                Err(ForwardError {
                    side: Side::Internal,
                    source: io::Error::other("drain timeout expired; connection reset"),
                    transferred: Transferred::default(),
                })
            }
        }
    }

    /// `plain` or `ebpf`, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Forwarder::Plain(_) => "plain",
            Forwarder::Ebpf(_) => "ebpf",
        }
    }
}

/// Makes the kernel answer with RST when `stream` is closed: what a peer
/// that failed must look like to the other end.
pub fn reset_on_close(stream: &impl AsFd) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
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
pub(crate) type DirectionResult = Result<u64, (Side, io::Error)>;

/// Drives both directions of a connection until both have ended, and
/// stops at the first failure: the caller then resets the other side.
/// On failure, also returns the bytes of any direction that had finished.
pub(crate) async fn until_both_end(
    up: impl Future<Output = DirectionResult>,
    down: impl Future<Output = DirectionResult>,
) -> Result<(u64, u64), (Side, io::Error, Transferred)> {
    tokio::pin!(up, down);
    let (mut up_bytes, mut down_bytes) = (None, None);
    while up_bytes.is_none() || down_bytes.is_none() {
        let result = tokio::select! {
            r = &mut up, if up_bytes.is_none() => r.map(|n| up_bytes = Some(n)),
            r = &mut down, if down_bytes.is_none() => r.map(|n| down_bytes = Some(n)),
        };
        if let Err((side, error)) = result {
            let finished = Transferred {
                client_to_upstream: up_bytes.unwrap_or(0),
                upstream_to_client: down_bytes.unwrap_or(0),
            };
            return Err((side, error, finished));
        }
    }
    Ok((up_bytes.unwrap_or(0), down_bytes.unwrap_or(0)))
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
