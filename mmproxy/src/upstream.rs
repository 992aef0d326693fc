//! Upstream sockets: connect to the backend from the client's address.
//!
//! The socket gets IP_TRANSPARENT (so it may bind an address that is not
//! local), SO_REUSEADDR, SO_MARK when configured, and is bound to the
//! client's ip:port before connecting. The backend's replies to that
//! address come back to us through the policy route (`mmproxy check`).

use std::{io, net::SocketAddr, time::Duration};

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpSocket, TcpStream};
use tracing::debug;

use crate::{error::Side, options::SourcePortPolicy, sockopt};

/// How upstream sockets are made.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamOptions {
    /// 0: no SO_MARK.
    pub mark: u32,
    pub source_port: SourcePortPolicy,
    pub connect_timeout: Duration,
    /// `TCP_WINDOW_CLAMP` in bytes, set before connecting (TCP only); `None`:
    /// the kernel's default. Why: [`sockopt::set_window_clamp`].
    pub window_clamp: Option<u32>,
}

/// Why no upstream connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot create the upstream socket")]
    Socket(#[source] io::Error),
    #[error(
        "cannot set IP_TRANSPARENT on the upstream socket (needs CAP_NET_ADMIN or CAP_NET_RAW)"
    )]
    Transparent(#[source] io::Error),
    #[error("cannot set TCP_WINDOW_CLAMP to {bytes} bytes on the upstream socket")]
    WindowClamp {
        bytes: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot set SO_MARK {mark} (needs CAP_NET_ADMIN)")]
    Mark {
        mark: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind the upstream socket to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the client's source {addr} is in use locally and --source-port is strict")]
    SourcePortInUse { addr: SocketAddr },
    #[error("cannot connect to the backend {backend}")]
    Connect {
        backend: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the backend {backend} did not accept within {timeout:?}")]
    ConnectTimeout {
        backend: SocketAddr,
        timeout: Duration,
    },
}

impl UpstreamError {
    /// Whose fault it was, for metrics and logs.
    pub fn side(&self) -> Side {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. } => Side::Upstream,
            UpstreamError::SourcePortInUse { .. } => Side::Client,
            _ => Side::Internal,
        }
    }

    /// A short fixed name for metrics labels.
    pub fn label(&self) -> &'static str {
        match self {
            UpstreamError::Socket(_) => "socket",
            UpstreamError::Transparent(_) => "transparent",
            UpstreamError::Mark { .. } => "mark",
            UpstreamError::WindowClamp { .. } => "window_clamp",
            UpstreamError::Bind { .. } => "bind",
            UpstreamError::SourcePortInUse { .. } => "source_port_in_use",
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::ConnectTimeout { .. } => "connect_timeout",
        }
    }

    /// The errno, when there is one (metrics label).
    pub fn errno(&self) -> Option<i32> {
        match self {
            UpstreamError::Socket(e)
            | UpstreamError::Transparent(e)
            | UpstreamError::Mark { source: e, .. }
            | UpstreamError::WindowClamp { source: e, .. }
            | UpstreamError::Bind { source: e, .. }
            | UpstreamError::Connect { source: e, .. } => e.raw_os_error(),
            _ => None,
        }
    }
}

/// A connected upstream stream, and whether its source port fell back to
/// an ephemeral one (the address it used is then `stream.local_addr()`,
/// asked only when someone logs it: one system call per connection).
#[derive(Debug)]
pub struct Upstream {
    pub stream: TcpStream,
    pub fell_back: bool,
}

/// Connects to `backend`, spoofing `source` when given.
pub async fn connect(
    backend: SocketAddr,
    source: Option<SocketAddr>,
    opts: &UpstreamOptions,
) -> Result<Upstream, UpstreamError> {
    let Some(source) = source else {
        let socket = new_socket(backend, opts, false)?;
        return finish(socket, backend, opts, false).await;
    };
    let wanted = first_choice(source, opts.source_port);
    let socket = new_socket(backend, opts, true)?;
    match bind(&socket, wanted) {
        Ok(()) => {}
        Err(UpstreamError::Bind { source: e, .. }) if is_port_in_use(&e) => {
            return retry_with_ephemeral_port(backend, source, opts).await;
        }
        Err(e) => return Err(e),
    }
    match finish(socket, backend, opts, false).await {
        // With SO_REUSEADDR the bind succeeds even when the same 4-tuple
        // is still in TIME_WAIT; connect() then reports EADDRNOTAVAIL.
        Err(UpstreamError::Connect { source: e, .. })
            if wanted.port() != 0 && is_port_in_use(&e) =>
        {
            retry_with_ephemeral_port(backend, source, opts).await
        }
        other => other,
    }
}

async fn retry_with_ephemeral_port(
    backend: SocketAddr,
    source: SocketAddr,
    opts: &UpstreamOptions,
) -> Result<Upstream, UpstreamError> {
    let ephemeral = fallback(source, opts.source_port)?;
    debug!(%source, %backend, "client source port unavailable upstream, using an ephemeral port");
    let socket = new_socket(backend, opts, true)?;
    bind(&socket, ephemeral)?;
    finish(socket, backend, opts, true).await
}

/// The source to bind first under `policy`: the client's own ip:port, or
/// with `ephemeral` its IP and any port.
fn first_choice(source: SocketAddr, policy: SourcePortPolicy) -> SocketAddr {
    match policy {
        SourcePortPolicy::Ephemeral => SocketAddr::new(source.ip(), 0),
        SourcePortPolicy::Fallback | SourcePortPolicy::Strict => source,
    }
}

/// After the client's port proved unusable: its IP with an ephemeral port,
/// or under `strict` the refusal. TCP and UDP share this rule.
fn fallback(source: SocketAddr, policy: SourcePortPolicy) -> Result<SocketAddr, UpstreamError> {
    if policy == SourcePortPolicy::Strict {
        return Err(UpstreamError::SourcePortInUse { addr: source });
    }
    Ok(SocketAddr::new(source.ip(), 0))
}

fn is_port_in_use(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRINUSE | libc::EADDRNOTAVAIL)
    )
}

fn new_socket(
    backend: SocketAddr,
    opts: &UpstreamOptions,
    spoof: bool,
) -> Result<Socket, UpstreamError> {
    let socket = new_raw_socket(backend, opts, spoof, Type::STREAM, Protocol::TCP)?;
    if let Some(bytes) = opts.window_clamp {
        // Before connect(): the SYN fixes the window scale.
        sockopt::set_window_clamp(&socket, bytes)
            .map_err(|source| UpstreamError::WindowClamp { bytes, source })?;
    }
    if spoof {
        // TCP only: lets a client port still in TIME_WAIT be bound again
        // (connect then decides). On UDP it would let two sessions share
        // one source and steal each other's replies.
        socket
            .set_reuse_address(true)
            .map_err(UpstreamError::Socket)?;
    }
    Ok(socket)
}

fn new_raw_socket(
    backend: SocketAddr,
    opts: &UpstreamOptions,
    spoof: bool,
    kind: Type,
    protocol: Protocol,
) -> Result<Socket, UpstreamError> {
    let domain = Domain::for_address(backend);
    let socket = Socket::new(domain, kind.nonblocking().cloexec(), Some(protocol))
        .map_err(UpstreamError::Socket)?;
    if spoof {
        sockopt::set_transparent(&socket, backend).map_err(UpstreamError::Transparent)?;
    }
    if opts.mark != 0 {
        socket
            .set_mark(opts.mark)
            .map_err(|source| UpstreamError::Mark {
                mark: opts.mark,
                source,
            })?;
    }
    Ok(socket)
}

fn bind(socket: &Socket, addr: SocketAddr) -> Result<(), UpstreamError> {
    if addr.port() == 0 && socket.r#type().is_ok_and(|t| t == Type::STREAM) {
        // Best effort: without it the bind still works, only slower.
        let _ = sockopt::set_bind_address_no_port(socket);
    }
    socket
        .bind(&addr.into())
        .map_err(|source| UpstreamError::Bind { addr, source })
}

async fn finish(
    socket: Socket,
    backend: SocketAddr,
    opts: &UpstreamOptions,
    fell_back: bool,
) -> Result<Upstream, UpstreamError> {
    let socket = TcpSocket::from_std_stream(socket.into());
    let stream = match tokio::time::timeout(opts.connect_timeout, socket.connect(backend)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) => return Err(UpstreamError::Connect { backend, source }),
        Err(_) => {
            return Err(UpstreamError::ConnectTimeout {
                backend,
                timeout: opts.connect_timeout,
            });
        }
    };
    tune_upstream(&stream, backend);
    Ok(Upstream { stream, fell_back })
}

/// [`tune_stream`] for an upstream socket, without keepalive when the
/// backend is on this host: the kernel ends a loopback connection whose
/// process dies, and a host that vanishes takes this daemon with it, so
/// probes there find nothing and cost four `setsockopt` calls per
/// connection (`strace -c` under the new-connections load: 8 of about 31
/// system calls per connection were `setsockopt`, 4 of them keepalive).
fn tune_upstream(stream: &TcpStream, backend: SocketAddr) {
    if backend.ip().is_loopback() {
        let _ = SockRef::from(stream).set_tcp_nodelay(true);
    } else {
        tune_stream(stream);
    }
}

/// TCP_NODELAY (we forward what arrives; Nagle would only add delay) and
/// keepalive (a vanished peer must not hold a connection forever) on a
/// proxied socket. Set once on each listening socket, whose accepted
/// sockets inherit them (5 setsockopt calls saved per connection), and on
/// each upstream socket to a backend on another host. Failures only cost
/// latency, so they are ignored.
pub fn tune_stream(stream: &impl std::os::fd::AsFd) {
    let socket = SockRef::from(stream);
    let _ = socket.set_tcp_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_mins(1))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    let _ = socket.set_tcp_keepalive(&keepalive);
}

/// A connected UDP socket to the backend and the source it really uses.
#[derive(Debug)]
pub struct UdpUpstream {
    pub socket: std::net::UdpSocket,
    pub local: SocketAddr,
    pub fell_back: bool,
}

/// Opens a UDP socket bound to `source` (when spoofing) and connected to
/// `backend`, with the same source-port policy as TCP. Connecting makes
/// the kernel deliver only the backend's datagrams to it, and report the
/// backend's ICMP errors on it.
pub fn connect_udp(
    backend: SocketAddr,
    source: Option<SocketAddr>,
    opts: &UpstreamOptions,
) -> Result<UdpUpstream, UpstreamError> {
    let wanted = source.map(|source| first_choice(source, opts.source_port));
    match open_udp(backend, wanted, opts) {
        Err(UpstreamError::Bind { source: e, addr }) if addr.port() != 0 && is_port_in_use(&e) => {
            let mut up = open_udp(backend, Some(fallback(addr, opts.source_port)?), opts)?;
            up.fell_back = true;
            Ok(up)
        }
        other => other,
    }
}

fn open_udp(
    backend: SocketAddr,
    source: Option<SocketAddr>,
    opts: &UpstreamOptions,
) -> Result<UdpUpstream, UpstreamError> {
    let socket = new_raw_socket(backend, opts, source.is_some(), Type::DGRAM, Protocol::UDP)?;
    if let Some(source) = source {
        bind(&socket, source)?;
    }
    socket
        .connect(&backend.into())
        .map_err(|source| UpstreamError::Connect { backend, source })?;
    let local = crate::sockopt::bound_addr(&socket)
        .ok_or_else(|| UpstreamError::Socket(io::Error::other("no local address")))?;
    Ok(UdpUpstream {
        socket: socket.into(),
        local,
        fell_back: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair on loopback: the stream to tune.
    async fn connected() -> TcpStream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stream, _) = tokio::join!(TcpStream::connect(addr), listener.accept());
        stream.unwrap()
    }

    #[tokio::test]
    async fn loopback_backends_get_nodelay_without_keepalive() {
        let stream = connected().await;
        tune_upstream(&stream, "127.0.0.1:9000".parse().unwrap());
        let socket = SockRef::from(&stream);
        assert!(socket.tcp_nodelay().unwrap());
        assert!(!socket.keepalive().unwrap());
    }

    #[tokio::test]
    async fn backends_elsewhere_get_keepalive_too() {
        let stream = connected().await;
        tune_upstream(&stream, "[2001:db8::1]:443".parse().unwrap());
        let socket = SockRef::from(&stream);
        assert!(socket.tcp_nodelay().unwrap());
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_mins(1));
    }
}
