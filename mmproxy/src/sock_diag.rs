//! One question to the kernel's `sock_diag` netlink interface: how many
//! bytes sit on a TCP socket's receive queue, counted from TCP's read
//! position (`rcv_nxt - copied_seq`, what `ss` shows as Recv-Q).
//!
//! `FIONREAD` cannot answer it for a socket in a BPF sockmap: there the
//! kernel reports the psock's own queue instead (`tcp_bpf_ioctl`).

use std::{io, net::SocketAddr, os::fd::AsFd};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};
use socket2::SockRef;

/// Bytes between TCP's read position and the next byte expected from the
/// peer: received, not yet read (by a reader or by a BPF verdict).
pub fn tcp_receive_queue(stream: &impl AsFd) -> io::Result<u32> {
    let sock = SockRef::from(stream);
    let local = sock
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an inet socket"))?;
    let peer = sock
        .peer_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an inet socket"))?;
    let cookie = sock.cookie()?;
    let request = request(local, peer, cookie);

    let mut netlink = Socket::new(NETLINK_SOCK_DIAG)?;
    netlink.bind_auto()?;
    netlink.connect(&NetlinkAddr::new(0, 0))?;
    netlink.send(&request, 0)?;
    let mut buf = vec![0u8; 8192];
    let n = netlink.recv(&mut &mut buf[..], 0)?;
    let reply = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[..n])
        .map_err(|e| io::Error::other(format!("sock_diag reply: {e}")))?;
    match reply.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
            Ok(response.header.recv_queue)
        }
        NetlinkPayload::Error(e) => Err(e.to_io()),
        other => Err(io::Error::other(format!(
            "sock_diag: unexpected reply {other:?}"
        ))),
    }
}

/// A request for exactly one socket: its addresses and its cookie.
fn request(local: SocketAddr, peer: SocketAddr, cookie: u64) -> Vec<u8> {
    let family = if local.is_ipv4() { AF_INET } else { AF_INET6 };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut message = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: local.port(),
                destination_port: peer.port(),
                source_address: local.ip(),
                destination_address: peer.ip(),
                interface_id: 0,
                // The kernel splits the cookie into two host-order u32s,
                // low half first: on a little-endian host, its bytes.
                cookie: cookie.to_ne_bytes(),
            },
        })
        .into(),
    );
    message.finalize();
    let mut buf = vec![0u8; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}
