//! Socket options in one place: the family-dependent transparent flag,
//! and the ones socket2 and rustix do not cover (each a small `unsafe`
//! call).

use std::{io, mem, os::fd::AsRawFd};

/// Sets `IP_TRANSPARENT` or `IPV6_TRANSPARENT`, whichever matches the
/// address family the socket is used for: it may then bind addresses that
/// are not local (spoofed sources, TPROXY listeners).
pub fn set_transparent(socket: &socket2::Socket, addr: std::net::SocketAddr) -> io::Result<()> {
    if addr.is_ipv4() {
        socket.set_ip_transparent_v4(true)
    } else {
        socket.set_ip_transparent_v6(true)
    }
}

/// The inet address a socket is bound to (`None` for other families or an
/// unbound socket).
pub fn bound_addr(socket: &socket2::Socket) -> Option<std::net::SocketAddr> {
    socket.local_addr().ok().and_then(|a| a.as_socket())
}

/// The parts of `struct tcp_info` (linux/tcp.h) the sockmap path uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpInfo {
    pub state: u8,
    /// `tcpi_bytes_acked`: bytes the peer acknowledged (RFC 4898).
    pub bytes_acked: u64,
    /// `tcpi_bytes_received`: bytes received in sequence (a FIN counts 1).
    pub bytes_received: u64,
}

/// `TCP_CLOSE_WAIT` and later: the peer has sent its FIN.
pub const TCP_STATES_AFTER_PEER_FIN: [u8; 4] = [8, 9, 11, 7]; // CLOSE_WAIT LAST_ACK CLOSING CLOSE

// Offsets of the fields above in `struct tcp_info`, stable since 4.1.
const TCPI_BYTES_ACKED_AT: usize = 120;
const TCPI_BYTES_RECEIVED_AT: usize = 128;
const TCPI_LEN: usize = 136;

/// Reads `TCP_INFO`.
pub fn tcp_info(fd: &impl AsRawFd) -> io::Result<TcpInfo> {
    let mut buf = [0u8; 256];
    let mut len = libc::socklen_t::try_from(buf.len()).unwrap_or(256);
    // SAFETY: buf and len are valid for writes of len bytes; the kernel
    // writes at most len bytes and updates len.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < TCPI_LEN {
        return Err(io::Error::other(
            "TCP_INFO too short for tcpi_bytes_received (kernel < 4.1)",
        ));
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[at..at + 8]);
        u64::from_ne_bytes(b)
    };
    Ok(TcpInfo {
        state: buf[0],
        bytes_acked: u64_at(TCPI_BYTES_ACKED_AT),
        bytes_received: u64_at(TCPI_BYTES_RECEIVED_AT),
    })
}

/// Sets `IP_BIND_ADDRESS_NO_PORT`: a `bind()` to port 0 then only fixes
/// the address, and `connect()` picks the port knowing the whole 4-tuple,
/// so almost every port is usable. Without it the kernel must find a port
/// free for *any* destination at bind time (`inet_csk_get_port`), which
/// made `--source-port ephemeral` cost two thirds of the connection rate.
/// Honoured for IPv6 sockets too (it is an `inet_sock` flag).
pub fn set_bind_address_no_port(fd: &impl AsRawFd) -> io::Result<()> {
    set_int(fd, libc::SOL_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)
}

/// Sets `SO_RCVLOWAT`. On TCP this also re-checks the receive queue and
/// calls `sk_data_ready` when data is waiting (`tcp_set_rcvlowat`), which
/// for a sockmap socket runs the verdict on bytes queued before it was
/// armed, without the `recv()` that the sockmap path must avoid.
pub fn set_rcvlowat(fd: &impl AsRawFd, bytes: i32) -> io::Result<()> {
    set_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

/// Sets `TCP_NOTSENT_LOWAT` to 0 (its default: use the sysctl), which also
/// calls `sk_write_space` (`do_tcp_setsockopt`). On a sockmap socket that
/// is `sk_psock_write_space`, which schedules the psock's backlog worker:
/// the kick for redirected skbs waiting on a wakeup that was lost.
pub fn kick_write_space(fd: &impl AsRawFd) -> io::Result<()> {
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, 0)
}

/// Bytes in a TCP socket's send queue: written but not yet acknowledged
/// by the peer (`SIOCOUTQ`: `write_seq - snd_una`).
pub fn send_queue_bytes(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) };
    if rc == 0 {
        Ok(u64::try_from(queued).unwrap_or(0))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets `TCP_WINDOW_CLAMP`: the receive window never exceeds `bytes`.
/// Set before `connect()` it also caps the window scale the SYN announces
/// (`tcp_select_initial_window`: 1 MiB gives scale 5 instead of the 10 that
/// a 32 MiB `tcp_rmem` maximum gives). That is the point: when the peer has
/// retracted its window to zero and less than 2^scale bytes of ours are in
/// flight beyond it, Linux before 7.1 still stamps our acknowledgments with
/// `snd_nxt` (`tcp_acceptable_seq`), beyond the retracted edge, and the
/// peer drops every one of them (`tcp_sequence`); if the peer waits for
/// those acknowledgments before it reads again, neither side ever moves.
/// A smaller scale makes that window of bytes small enough (32 bytes at
/// scale 5) that the acknowledgments carry `snd_una` instead, which the
/// peer accepts. docs/ebpf-findings.md, "The stall, reproduced".
pub fn set_window_clamp(fd: &impl AsRawFd, bytes: u32) -> io::Result<()> {
    let bytes = i32::try_from(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP, bytes)
}

/// `setsockopt` with an `int` value.
fn set_int(fd: &impl AsRawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: a valid pointer to an int, and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            libc::socklen_t::try_from(mem::size_of::<i32>()).unwrap_or(4),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
