//! The balancer-facing UDP socket: receives datagrams with the local
//! address each was sent to, and sends replies from that address.
//!
//! A socket bound to a wildcard address (0.0.0.0, [::]) on a host with
//! several addresses would otherwise answer from whichever address the
//! routing table picks, and the balancer drops replies from an address
//! it did not send to (a bug reported against go-mmproxy). IP_PKTINFO /
//! IPV6_RECVPKTINFO tell us the destination of each datagram; the same
//! control message on `sendmsg` sets the source of the reply.

use std::{
    io::{self, IoSlice, IoSliceMut},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsRawFd as _,
};

use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrLike as _,
    SockaddrStorage, recvmmsg, sendmsg, setsockopt, sockopt,
};
use tokio::{io::Interest, net::UdpSocket};

/// Largest UDP payload over IPv6 (65,535 minus the 8-byte UDP header);
/// over IPv4 it is 65,507. A buffer this size never truncates.
pub const MAX_DATAGRAM: usize = 65_527;

/// One datagram's metadata.
#[derive(Debug, Clone, Copy)]
pub struct Datagram {
    pub len: usize,
    /// The balancer's address (IPv4 ones as `::ffff:a.b.c.d` on a
    /// dual-stack socket: replies must go to that form).
    pub from: SocketAddr,
    /// The local address it was sent to; `None` when the socket is bound
    /// to a specific address (which is then the only possible one).
    pub to: Option<IpAddr>,
    /// The datagram did not fit the buffer (never with a 64 KiB buffer).
    pub truncated: bool,
    /// The device it arrived on, when packet info is on.
    pub ifindex: Option<u32>,
}

/// Datagrams taken from the kernel per `recvmmsg` call.
pub const BATCH: usize = 16;

/// Buffers for one `recvmmsg` and what it received.
#[derive(Debug)]
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    received: Vec<Datagram>,
}

impl RecvBatch {
    /// [`BATCH`] buffers of `size` bytes each.
    pub fn new(size: usize) -> Self {
        Self {
            // Zeroed one by one: `vec![buf; BATCH]` copies the first
            // buffer into the others and makes every page resident (about
            // 1 MiB per listening socket, measured), where fresh zeroed
            // memory stays untouched until a datagram reaches it.
            bufs: (0..BATCH).map(|_| vec![0; size]).collect(),
            received: Vec::with_capacity(BATCH),
        }
    }

    /// Each datagram received by the last call, with its bytes.
    pub fn datagrams(&self) -> impl Iterator<Item = (&[u8], Datagram)> {
        self.received
            .iter()
            .zip(&self.bufs)
            .map(|(d, buf)| (&buf[..d.len.min(buf.len())], *d))
    }
}

/// A listening UDP socket that knows each datagram's local address.
#[derive(Debug)]
pub struct FrontendSocket {
    io: UdpSocket,
    pktinfo: bool,
    /// The address the socket is bound to.
    local: SocketAddr,
}

/// Room for one `IPV6_PKTINFO` (the larger of the two) control message.
pub fn control_buffer() -> Vec<u8> {
    nix::cmsg_space!(libc::in6_pktinfo)
}

impl FrontendSocket {
    /// Wraps a bound socket; asks for packet info when it is bound to a
    /// wildcard address, or when `want_device` (ebpf mode: the kernel path
    /// sends replies out of the device the balancer's datagrams came in).
    pub fn new(socket: socket2::Socket, want_device: bool) -> io::Result<Self> {
        let bound = crate::sockopt::bound_addr(&socket)
            .ok_or_else(|| io::Error::other("the UDP listener has no inet address"))?;
        let pktinfo = bound.ip().is_unspecified() || want_device;
        if pktinfo {
            match bound {
                SocketAddr::V4(_) => setsockopt(&socket, sockopt::Ipv4PacketInfo, &true)?,
                SocketAddr::V6(_) => setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true)?,
            }
        }
        let std_socket: std::net::UdpSocket = socket.into();
        Ok(Self {
            io: UdpSocket::from_std(std_socket)?,
            pktinfo,
            local: bound,
        })
    }

    /// The local address a datagram was sent to: the one packet info
    /// named, or the bound address.
    pub fn local_for(&self, datagram: &Datagram) -> SocketAddr {
        SocketAddr::new(datagram.to.unwrap_or(self.local.ip()), self.local.port())
    }

    /// Waits for datagrams and receives up to [`BATCH`] of them with one
    /// `recvmmsg`. A short batch means the queue is empty: the reactor is
    /// told so (a `WouldBlock` from `try_io`), which saves the extra
    /// `recvmsg` that would only learn `EAGAIN`.
    pub async fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<()> {
        batch.received.clear();
        loop {
            self.io.readable().await?;
            match self
                .io
                .try_io(Interest::READABLE, || self.try_recv_batch(batch))
            {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !batch.received.is_empty() {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_recv_batch(&self, batch: &mut RecvBatch) -> io::Result<()> {
        let RecvBatch { bufs, received } = batch;
        // Built per call: nix's `MultiHeaders` holds raw pointers, so it
        // is not `Send` and cannot live in the receive task across awaits.
        // Two small allocations per batch of up to 16 datagrams.
        let mut headers =
            MultiHeaders::<SockaddrStorage>::preallocate(BATCH, self.pktinfo.then(control_buffer));
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> =
            bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
        let results = recvmmsg(
            self.io.as_raw_fd(),
            &mut headers,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )?;
        for msg in results {
            let from = msg
                .address
                .as_ref()
                .and_then(to_socket_addr)
                .ok_or_else(|| io::Error::other("datagram without a source address"))?;
            let (mut to, mut ifindex) = (None, None);
            for cmsg in msg.cmsgs()? {
                match cmsg {
                    ControlMessageOwned::Ipv4PacketInfo(info) => {
                        to = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            info.ipi_addr.s_addr,
                        ))));
                        ifindex = u32::try_from(info.ipi_ifindex).ok();
                    }
                    ControlMessageOwned::Ipv6PacketInfo(info) => {
                        to = Some(IpAddr::from(info.ipi6_addr.s6_addr));
                        ifindex = Some(info.ipi6_ifindex);
                    }
                    _ => {}
                }
            }
            received.push(Datagram {
                len: msg.bytes,
                from,
                to,
                truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
                ifindex,
            });
        }
        if received.len() < BATCH {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    }

    /// Sends `payload` to `to`, from the local address `from` when the
    /// socket is a wildcard one. Waits while the socket buffer is full.
    pub async fn send(
        &self,
        payload: &[u8],
        to: SocketAddr,
        from: Option<IpAddr>,
    ) -> io::Result<()> {
        let from = if self.pktinfo { from } else { None };
        self.io
            .async_io(Interest::WRITABLE, || {
                send_from(&self.io, payload, to, from)
            })
            .await
            .map(drop)
    }
}

impl FrontendSocket {
    /// Sends without waiting; `WouldBlock` when the socket buffer is full.
    pub fn try_send(&self, payload: &[u8], to: SocketAddr, from: Option<IpAddr>) -> io::Result<()> {
        let from = if self.pktinfo { from } else { None };
        self.io
            .try_io(Interest::WRITABLE, || {
                send_from(&self.io, payload, to, from)
            })
            .map(drop)
    }
}

fn send_from(
    socket: &UdpSocket,
    payload: &[u8],
    to: SocketAddr,
    from: Option<IpAddr>,
) -> io::Result<usize> {
    let iov = [IoSlice::new(payload)];
    let dest = SockaddrStorage::from(to);
    let fd = socket.as_raw_fd();
    let sent = match from {
        None => sendmsg(fd, &iov, &[], MsgFlags::empty(), Some(&dest)),
        Some(IpAddr::V4(src)) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from(src).to_be(),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            let cmsg = [ControlMessage::Ipv4PacketInfo(&info)];
            sendmsg(fd, &iov, &cmsg, MsgFlags::empty(), Some(&dest))
        }
        Some(IpAddr::V6(src)) => {
            // An IPv4 balancer on a dual-stack socket: the kernel takes the
            // mapped address from IPV6_PKTINFO too (ip_cmsg_send).
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: src.octets(),
                },
                ipi6_ifindex: 0,
            };
            let cmsg = [ControlMessage::Ipv6PacketInfo(&info)];
            sendmsg(fd, &iov, &cmsg, MsgFlags::empty(), Some(&dest))
        }
    };
    Ok(sent?)
}

fn to_socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    if let Some(v6) = addr.as_sockaddr_in6() {
        return Some(SocketAddr::V6(SocketAddrV6::from(*v6)));
    }
    debug_assert!(addr.family().is_none(), "unexpected address family");
    None
}
