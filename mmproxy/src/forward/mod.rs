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
//! so neither end mistakes a broken transfer for a complete one. What
//! they share to keep it (the connection, its totals and errors, the
//! half-close and the mirrored reset) is in `contract.rs`, below both.

mod bulk;
mod contract;
pub mod sockmap;
pub mod splice;
mod turn;

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, RawFd},
    sync::Arc,
    time::Duration,
};

use tracing::info;

pub use self::contract::{Connection, ForwardError, Transferred, reset_on_close};
use crate::{
    bpf::{Datapath, LoadError},
    error::{Side, error_chain},
    limits::IdleWatch,
    options::Mode,
};

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
    /// timeout expired) or, with `idle_timeout`, no byte moved either way
    /// for that long: then both peers get a reset, never a clean FIN with
    /// bytes missing.
    pub async fn forward_until(
        &self,
        conn: Connection,
        abort: &tokio_util::sync::CancellationToken,
        idle_timeout: Option<Duration>,
    ) -> Result<Transferred, ForwardError> {
        let fds = [conn.client.as_raw_fd(), conn.upstream.as_raw_fd()];
        let forwarding = self.forward(conn);
        tokio::pin!(forwarding);
        // Declared after `forwarding`, so dropped before it: the sockets
        // are still open when a panic's unwinding reaches the guard.
        let _reset_on_panic = ResetOnPanic::new(&fds);
        // `forwarding` owns both sockets and lives until this returns.
        let idle = async {
            match idle_timeout {
                Some(timeout) => IdleWatch::new(fds, timeout).until_idle().await,
                None => std::future::pending().await,
            }
        };
        let cut = tokio::select! {
            result = &mut forwarding => return result,
            () = abort.cancelled() => "drain timeout expired; connection reset",
            watched = idle => match watched {
                Ok(()) => "idle timeout; connection reset",
                Err(_) => "cannot read the sockets' counters; connection reset",
            },
        };
        // SAFETY: `forwarding` owns both sockets and is alive until this
        // function returns, so the descriptors are open and refer to them.
        unsafe { reset_raw(&fds) };
        Err(ForwardError {
            side: Side::Internal,
            source: io::Error::other(cut),
            transferred: Transferred::default(),
        })
    }

    /// The data path `--mode` asks for. ebpf loads and attaches the BPF
    /// programs, or says why it cannot; auto takes ebpf where
    /// [`auto_ebpf_obstacle`] finds nothing in the way and the programs
    /// load, and says why not otherwise.
    pub fn for_mode(mode: Mode, ebpf: sockmap::EbpfOptions) -> Result<Self, LoadError> {
        let plain = || Forwarder::Plain(splice::SpliceForwarder::new());
        let ebpf_with =
            |datapath| Forwarder::Ebpf(sockmap::SockmapForwarder::new(Arc::new(datapath), ebpf));
        match mode {
            Mode::Plain => Ok(plain()),
            Mode::Auto => {
                if let Some(reason) = auto_ebpf_obstacle() {
                    info!(%reason, "mode auto: TCP in plain mode");
                    return Ok(plain());
                }
                match Datapath::load() {
                    Ok(datapath) => {
                        info!("mode auto: TCP in ebpf mode; verdict program attached");
                        Ok(ebpf_with(datapath))
                    }
                    Err(e) => {
                        info!(reason = %error_chain(&e), "mode auto: TCP in plain mode");
                        Ok(plain())
                    }
                }
            }
            Mode::Ebpf => {
                let datapath = Datapath::load()?;
                info!("mode ebpf: verdict program attached");
                Ok(ebpf_with(datapath))
            }
        }
    }

    /// The in-kernel data path's counters (ebpf mode only).
    pub fn datapath_stats(&self) -> Option<sockmap::DatapathStats> {
        match self {
            Forwarder::Plain(_) => None,
            Forwarder::Ebpf(f) => Some(f.stats()),
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

/// TCP connections moved to the bulk workers since start (`bulk.rs`).
pub fn connections_moved_to_bulk_workers() -> u64 {
    bulk::moved()
}

/// The oldest kernel on which ebpf mode's TCP path was measured at least
/// level with plain mode on flood, bulk and new connections (the bench of
/// 2026-12-08 on Linux 6.18: 1.07x, 1.05x and 1.01x plain, with the bulk
/// rule of `--ebpf-bulk-mbit`), which is what `--mode auto` asks of it.
/// Older kernels' sockmap code differs (docs/ebpf-findings.md); there
/// auto stays plain until someone measures them.
pub const AUTO_EBPF_SINCE: (u8, u8) = (6, 18);

/// Why `--mode auto` does not try ebpf mode for TCP on this host, if
/// something is in the way before loading (the kernel's version).
pub fn auto_ebpf_obstacle() -> Option<String> {
    let (major, minor) = AUTO_EBPF_SINCE;
    match aya::util::KernelVersion::current() {
        Ok(v) if v >= aya::util::KernelVersion::new(major, minor, 0) => None,
        Ok(v) => Some(format!(
            "kernel {v} is older than {major}.{minor}, the oldest on which ebpf mode was \
             measured level with plain; --mode ebpf forces it"
        )),
        Err(e) => Some(format!("cannot read the kernel's version: {e}")),
    }
}

/// Resets sockets that are closed because their task panicked: a
/// connection cut by a bug must not look complete to either peer (a
/// plain close would send a FIN). The guard must be dropped while the
/// sockets are still open: declare it after their owner, or
/// [`disarm`](ResetOnPanic::disarm) it before handing them on.
#[derive(Debug)]
pub struct ResetOnPanic {
    fds: Vec<RawFd>,
}

impl ResetOnPanic {
    pub fn new(fds: &[RawFd]) -> Self {
        Self { fds: fds.to_vec() }
    }

    /// Covers one more socket.
    pub fn add(&mut self, fd: RawFd) {
        self.fds.push(fd);
    }

    /// Stops covering anything (the sockets moved on).
    pub fn disarm(&mut self) {
        self.fds.clear();
    }
}

impl Drop for ResetOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // SAFETY: by the type's contract the descriptors are still
            // open and refer to the sockets the guard was given.
            unsafe { reset_raw(&self.fds) };
        }
    }
}

/// [`reset_on_close`] on sockets known only by descriptor.
///
/// # Safety
/// Each descriptor must be open and refer to the socket meant, for the
/// duration of the call.
unsafe fn reset_raw(fds: &[RawFd]) {
    for &fd in fds {
        // SAFETY: the caller's contract.
        reset_on_close(&unsafe { BorrowedFd::borrow_raw(fd) });
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{ErrorKind, Read as _, Write as _},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// A connected pair on loopback: (our end, the peer's end).
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        (ours, peer)
    }

    fn peer_sees(mut peer: TcpStream) -> Result<usize, ErrorKind> {
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        peer.read(&mut buf).map_err(|e| e.kind())
    }

    #[test]
    fn a_panic_resets_both_peers() {
        let ((client, client_peer), (upstream, upstream_peer)) = (pair(), pair());
        let unwound = std::panic::catch_unwind(move || {
            let sockets = (client, upstream);
            let _guard = ResetOnPanic::new(&[sockets.0.as_raw_fd(), sockets.1.as_raw_fd()]);
            panic!("a bug in a connection task");
        });
        assert!(unwound.is_err());
        assert_eq!(peer_sees(client_peer), Err(ErrorKind::ConnectionReset));
        assert_eq!(peer_sees(upstream_peer), Err(ErrorKind::ConnectionReset));
    }

    #[test]
    fn without_a_panic_or_once_disarmed_a_close_is_a_fin() {
        let (ours, peer) = pair();
        {
            let _guard = ResetOnPanic::new(&[ours.as_raw_fd()]);
            drop(ours);
        }
        assert_eq!(peer_sees(peer), Ok(0));
        let (mut ours, peer) = pair();
        let unwound = std::panic::catch_unwind(move || {
            let mut guard = ResetOnPanic::new(&[ours.as_raw_fd()]);
            ours.write_all(b"x").unwrap();
            guard.disarm();
            drop(ours);
            panic!("after the hand-over");
        });
        assert!(unwound.is_err());
        let mut peer = peer;
        let mut buf = [0u8; 4];
        assert_eq!(peer.read(&mut buf).unwrap(), 1);
        assert_eq!(peer_sees(peer), Ok(0));
    }
}
