//! Listening sockets the daemon is handed instead of binding them: by
//! systemd (socket activation, `LISTEN_FDS`) or by the instance it
//! replaces ([`crate::upgrade`]). And the `sd_notify` messages that tell
//! systemd how the service is doing.
//!
//! Roles come from the socket names (`LISTEN_FDNAMES`, systemd's
//! `FileDescriptorName=`): `metrics` is the metrics endpoint, any other
//! name is a proxy listener, TCP or UDP by the socket's type. Every
//! socket is checked before use: an inet socket, and a stream socket
//! must already listen. A socket that fits no role is a start-up error,
//! never silently left open.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
};

use socket2::{Domain, Socket, Type};

/// The name that makes a handed-over socket the metrics endpoint.
pub const METRICS_NAME: &str = "metrics";

/// Where inherited sockets came from (for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Systemd,
    Predecessor,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Systemd => "LISTEN_FDS",
            Self::Predecessor => "the upgrade handover",
        })
    }
}

/// Why a handed-over socket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    #[error("{origin}: cannot read the passed sockets")]
    Environment {
        origin: Origin,
        #[source]
        source: io::Error,
    },
    #[error("{origin}: descriptor {fd} (name {name:?}) is not an IPv4 or IPv6 socket")]
    NotInet {
        origin: Origin,
        fd: RawFd,
        name: String,
    },
    #[error("{origin}: {what} socket {addr} (name {name:?}) {problem}")]
    Unusable {
        origin: Origin,
        what: &'static str,
        addr: SocketAddr,
        name: String,
        problem: &'static str,
    },
}

/// One handed-over socket, checked.
#[derive(Debug)]
pub struct InheritedSocket {
    pub socket: Socket,
    pub name: String,
    pub local: SocketAddr,
    pub stream: bool,
}

/// The sockets handed to this process, by role.
#[derive(Debug, Default)]
pub struct Inherited {
    pub origin: Option<Origin>,
    pub tcp: Vec<InheritedSocket>,
    pub udp: Vec<InheritedSocket>,
    pub metrics: Option<InheritedSocket>,
}

impl Inherited {
    /// Takes systemd's `LISTEN_FDS` (only when `LISTEN_PID` is ours) and
    /// removes the variables, so nothing we start inherits them.
    ///
    /// # Safety
    /// Changes the environment: call it before any thread is started.
    pub unsafe fn from_systemd() -> Result<Self, InheritError> {
        // SAFETY: the caller runs this before any other thread exists.
        let fds =
            unsafe { sd_notify::listen_fds_with_names_and_unset_env() }.map_err(|source| {
                InheritError::Environment {
                    origin: Origin::Systemd,
                    source,
                }
            })?;
        let owned = fds
            .map(|(fd, name)| {
                // SAFETY: systemd passed these descriptors to us, open,
                // and nothing else in this process has taken them.
                (unsafe { OwnedFd::from_raw_fd(fd) }, name)
            })
            .collect();
        Self::from_fds(owned, Origin::Systemd)
    }

    /// Checks each socket and sorts it into its role.
    pub fn from_fds(fds: Vec<(OwnedFd, String)>, origin: Origin) -> Result<Self, InheritError> {
        let mut inherited = Self {
            origin: (!fds.is_empty()).then_some(origin),
            ..Self::default()
        };
        for (fd, name) in fds {
            let socket = check_socket(fd, &name, origin)?;
            if name == METRICS_NAME {
                if !socket.stream {
                    return Err(socket.unusable(origin, "metrics", "is not a TCP socket"));
                }
                if inherited.metrics.is_some() {
                    return Err(socket.unusable(origin, "metrics", "is a second metrics socket"));
                }
                inherited.metrics = Some(socket);
            } else if socket.stream {
                inherited.tcp.push(socket);
            } else {
                inherited.udp.push(socket);
            }
        }
        Ok(inherited)
    }

    /// The addresses of the proxy listeners handed over.
    pub fn proxy_addrs(&self) -> Vec<SocketAddr> {
        let mut addrs: Vec<SocketAddr> =
            self.tcp.iter().chain(&self.udp).map(|s| s.local).collect();
        addrs.sort_unstable();
        addrs.dedup();
        addrs
    }
}

impl InheritedSocket {
    fn unusable(&self, origin: Origin, what: &'static str, problem: &'static str) -> InheritError {
        InheritError::Unusable {
            origin,
            what,
            addr: self.local,
            name: self.name.clone(),
            problem,
        }
    }
}

/// An inet socket of type stream (listening) or datagram, made
/// non-blocking and close-on-exec.
fn check_socket(fd: OwnedFd, name: &str, origin: Origin) -> Result<InheritedSocket, InheritError> {
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let not_inet = || InheritError::NotInet {
        origin,
        fd: raw,
        name: name.to_owned(),
    };
    let socket = Socket::from(fd);
    let domain = socket.domain().map_err(|_| not_inet())?;
    if domain != Domain::IPV4 && domain != Domain::IPV6 {
        return Err(not_inet());
    }
    let local = crate::sockopt::bound_addr(&socket).ok_or_else(not_inet)?;
    let kind = socket.r#type().map_err(|_| not_inet())?;
    let inherited = InheritedSocket {
        stream: kind == Type::STREAM,
        socket,
        name: name.to_owned(),
        local,
    };
    let unusable = |problem| inherited.unusable(origin, "a", problem);
    if kind != Type::STREAM && kind != Type::DGRAM {
        return Err(unusable("is neither TCP nor UDP"));
    }
    if inherited.stream && !is_listening(inherited.socket.as_fd()) {
        return Err(unusable("is a TCP socket that does not listen"));
    }
    if inherited.socket.set_nonblocking(true).is_err()
        || inherited.socket.set_cloexec(true).is_err()
    {
        return Err(unusable("cannot be made non-blocking"));
    }
    Ok(inherited)
}

fn is_listening(fd: BorrowedFd<'_>) -> bool {
    rustix::net::sockopt::socket_acceptconn(fd).unwrap_or(false)
}

/// Tells systemd (when it started us with `NOTIFY_SOCKET`) what the
/// service is doing; a no-op otherwise. Failures are not fatal: the
/// service works, systemd only knows less.
pub fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, UdpSocket};

    use super::*;

    fn owned(fd: impl Into<OwnedFd>, name: &str) -> (OwnedFd, String) {
        (fd.into(), name.to_owned())
    }

    #[test]
    fn sockets_are_sorted_by_name_and_type() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").unwrap();
        let (tcp_addr, udp_addr, metrics_addr) = (
            tcp.local_addr().unwrap(),
            udp.local_addr().unwrap(),
            metrics.local_addr().unwrap(),
        );
        let got = Inherited::from_fds(
            vec![
                owned(tcp, "proxy"),
                owned(udp, "proxy"),
                owned(metrics, "metrics"),
            ],
            Origin::Systemd,
        )
        .unwrap();
        assert_eq!(got.origin, Some(Origin::Systemd));
        assert_eq!(got.tcp.len(), 1);
        assert_eq!(got.tcp[0].local, tcp_addr);
        assert_eq!(got.udp[0].local, udp_addr);
        assert_eq!(got.metrics.as_ref().unwrap().local, metrics_addr);
        let mut expected = vec![tcp_addr, udp_addr];
        expected.sort_unstable();
        assert_eq!(got.proxy_addrs(), expected);
    }

    #[test]
    fn nothing_handed_over_is_no_origin() {
        let got = Inherited::from_fds(Vec::new(), Origin::Systemd).unwrap();
        assert!(got.origin.is_none() && got.tcp.is_empty() && got.metrics.is_none());
    }

    #[test]
    fn a_stream_socket_that_does_not_listen_is_refused() {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let err = Inherited::from_fds(vec![owned(s, "proxy")], Origin::Systemd).unwrap_err();
        assert!(err.to_string().contains("does not listen"), "{err}");
    }

    #[test]
    fn a_file_or_unix_socket_is_refused() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let err = Inherited::from_fds(vec![owned(file, "proxy")], Origin::Systemd).unwrap_err();
        assert!(matches!(err, InheritError::NotInet { .. }), "{err}");
        let (unix, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = Inherited::from_fds(vec![owned(unix, "proxy")], Origin::Systemd).unwrap_err();
        assert!(matches!(err, InheritError::NotInet { .. }), "{err}");
    }

    #[test]
    fn a_udp_metrics_socket_or_a_second_one_is_refused() {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = Inherited::from_fds(vec![owned(udp, "metrics")], Origin::Systemd).unwrap_err();
        assert!(err.to_string().contains("not a TCP socket"), "{err}");
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let err = Inherited::from_fds(
            vec![owned(a, "metrics"), owned(b, "metrics")],
            Origin::Predecessor,
        )
        .unwrap_err();
        assert!(err.to_string().contains("second metrics socket"), "{err}");
    }
}
