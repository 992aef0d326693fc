//! Listening sockets (TCP and UDP) and the TCP accept loops.
//!
//! `--listeners N` binds N sockets with SO_REUSEPORT; the kernel spreads
//! new connections across them, and each has its own accept loop. An
//! accept error never ends a loop: resource exhaustion (EMFILE, ENFILE,
//! ENOBUFS, ENOMEM) backs off and retries, anything else is retried at
//! once. `--max-connections` is a semaphore taken before `accept`, so
//! excess clients wait in the kernel's backlog instead of being refused.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

use crate::{
    activation::{Inherited, METRICS_NAME, Origin},
    config::AllowedSubnets,
    connection::TcpProxy,
    sockopt,
    upgrade::HandoverSocket,
    upstream,
};

/// Connections the kernel queues before we accept them. Independent of
/// `--listeners` (mmproxy-rs passed that as the backlog: 500 concurrent
/// connects took minutes).
pub const LISTEN_BACKLOG: i32 = 4096;
const BACKOFF_START: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How listening sockets are made.
#[derive(Debug, Clone, Copy)]
pub struct ListenOptions {
    pub addr: SocketAddr,
    pub count: u16,
    /// IP_TRANSPARENT, to accept connections a TPROXY rule sends us.
    pub transparent: bool,
}

/// Why a listener could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}{hint}")]
pub struct ListenError {
    pub addr: SocketAddr,
    hint: &'static str,
    #[source]
    pub source: io::Error,
}

/// Opens the TCP listening sockets.
pub fn bind_sockets(opts: &ListenOptions) -> Result<Vec<Socket>, ListenError> {
    (0..opts.count)
        .map(|_| {
            let socket = bind_one(opts, Type::STREAM, Protocol::TCP)?;
            // Accepted sockets inherit these: no per-connection calls.
            upstream::tune_stream(&socket);
            socket
                .listen(LISTEN_BACKLOG)
                .map_err(|source| ListenError {
                    addr: opts.addr,
                    hint: "",
                    source,
                })?;
            Ok(socket)
        })
        .collect()
}

/// Opens the UDP sockets: with `--listeners N`, N sockets on one address
/// (SO_REUSEPORT), the kernel spreading flows across them by hash.
pub fn bind_udp_sockets(opts: &ListenOptions) -> Result<Vec<Socket>, ListenError> {
    (0..opts.count)
        .map(|_| bind_one(opts, Type::DGRAM, Protocol::UDP))
        .collect()
}

fn bind_one(opts: &ListenOptions, kind: Type, protocol: Protocol) -> Result<Socket, ListenError> {
    let addr = opts.addr;
    let fail = |hint: &'static str| move |source| ListenError { addr, hint, source };
    let socket = Socket::new(
        Domain::for_address(addr),
        kind.nonblocking().cloexec(),
        Some(protocol),
    )
    .map_err(fail(""))?;
    socket.set_reuse_address(true).map_err(fail(""))?;
    if opts.count > 1 {
        socket.set_reuse_port(true).map_err(fail(""))?;
    }
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // [::] also serves IPv4 clients (as ::ffff:a.b.c.d).
        let _ = socket.set_only_v6(false);
    }
    if opts.transparent {
        sockopt::set_transparent(&socket, addr)
            .map_err(fail(" (IP_TRANSPARENT needs CAP_NET_ADMIN)"))?;
    }
    socket
        .bind(&addr.into())
        .map_err(fail(" (in use, or not a local address)"))?;
    Ok(socket)
}

/// Every listening socket of the daemon, bound here or handed over
/// (systemd socket activation, or the instance this one replaces).
#[derive(Debug, Default)]
pub struct Listeners {
    pub tcp: Vec<Socket>,
    pub udp: Vec<Socket>,
    pub metrics: Option<Socket>,
    /// The proxy's own addresses (never a destination it connects to).
    pub served: Vec<SocketAddr>,
}

/// Why handed-over sockets do not fit the flags.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("{origin} passed a {what} socket on {addr}, but -p does not include {proto}")]
    ProtocolOff {
        origin: Origin,
        what: &'static str,
        addr: SocketAddr,
        proto: &'static str,
    },
    #[error(
        "-p includes {proto}, but {origin} passed no {what} socket (with handed-over sockets, -l is not bound)"
    )]
    NoSocketFor {
        origin: Origin,
        what: &'static str,
        proto: &'static str,
    },
    #[error("{origin} passed {addr}: cannot set IP_TRANSPARENT for --listen-transparent")]
    Transparent {
        origin: Origin,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

impl Listeners {
    /// Takes the handed-over proxy sockets of a protocol we serve; one
    /// of a protocol we do not serve is an error, not a silently idle
    /// port.
    pub fn adopt(
        inherited: &mut Inherited,
        tcp: bool,
        udp: bool,
        transparent: bool,
    ) -> Result<Self, AdoptError> {
        let origin = inherited.origin.unwrap_or(Origin::Systemd);
        let served = inherited.proxy_addrs();
        let protocols = [
            (tcp, &inherited.tcp, "TCP", "tcp"),
            (udp, &inherited.udp, "UDP", "udp"),
        ];
        // A passed socket we would not serve is named first.
        if let Some((_, sockets, what, proto)) = protocols
            .iter()
            .find(|(wanted, sockets, ..)| !wanted && !sockets.is_empty())
        {
            return Err(AdoptError::ProtocolOff {
                origin,
                what,
                addr: sockets[0].local,
                proto,
            });
        }
        if let Some((_, _, what, proto)) = protocols
            .iter()
            .find(|(wanted, sockets, ..)| *wanted && sockets.is_empty() && !served.is_empty())
        {
            return Err(AdoptError::NoSocketFor {
                origin,
                what,
                proto,
            });
        }
        for s in &inherited.tcp {
            // Accepted sockets inherit these, as from our own listeners.
            upstream::tune_stream(&s.socket);
        }
        if transparent {
            for s in inherited.tcp.iter().chain(&inherited.udp) {
                sockopt::set_transparent(&s.socket, s.local).map_err(|source| {
                    AdoptError::Transparent {
                        origin,
                        addr: s.local,
                        source,
                    }
                })?;
            }
        }
        Ok(Self {
            tcp: inherited.tcp.drain(..).map(|s| s.socket).collect(),
            udp: inherited.udp.drain(..).map(|s| s.socket).collect(),
            metrics: inherited.metrics.take().map(|s| s.socket),
            served,
        })
    }

    /// Duplicates of every listening socket, named by role, for a
    /// successor ([`crate::upgrade`]).
    pub fn for_handover(&self) -> io::Result<Vec<HandoverSocket>> {
        let named = self
            .tcp
            .iter()
            .map(|s| (s, "tcp"))
            .chain(self.udp.iter().map(|s| (s, "udp")))
            .chain(self.metrics.iter().map(|s| (s, METRICS_NAME)));
        named
            .map(|(socket, name)| {
                Ok(HandoverSocket {
                    fd: socket.try_clone()?.into(),
                    name,
                })
            })
            .collect()
    }
}

/// Everything an accept loop needs.
#[derive(Debug, Clone)]
pub struct AcceptContext {
    pub proxy: Arc<TcpProxy>,
    pub allowed: Arc<ArcSwap<AllowedSubnets>>,
    pub permits: Arc<Semaphore>,
    pub connections: TaskTracker,
    pub shutdown: CancellationToken,
}

/// Accepts until `shutdown`, spawning one task per connection.
pub async fn accept_loop(listener: TcpListener, ctx: AcceptContext) {
    let mut backoff = BACKOFF_START;
    loop {
        let permit = tokio::select! {
            p = ctx.permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = ctx.shutdown.cancelled() => return,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = ctx.shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = BACKOFF_START;
                ctx.proxy.metrics.tcp_accepted.inc();
                if !ctx.allowed.load().allows(peer.ip()) {
                    ctx.proxy.metrics.rejected("not_allowed");
                    debug!(%peer, "peer not in --allowed-subnets; closed");
                    continue;
                }
                let proxy = ctx.proxy.clone();
                // Boxed: the connection's future is about 12 KiB, and tokio
                // copies a task's future into its cell at spawn and its
                // output over it at the end; boxed, those copies are one
                // pointer (memmove was 3.5% of the daemon's CPU under
                // the new-connections load).
                ctx.connections.spawn(Box::pin(async move {
                    proxy.handle(stream, peer).await;
                    drop(permit);
                }));
            }
            Err(e) if is_resource_exhaustion(&e) => {
                warn!(error = %e, retry_in = ?backoff, "accept failed for lack of resources; backing off");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = ctx.shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            // ECONNABORTED and friends: that one client is gone; carry on.
            Err(e) => debug!(error = %e, "accept failed"),
        }
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use socket2::SockRef;

    use super::*;

    /// The per-connection options are set once on the listener: the
    /// kernel copies them into every accepted socket.
    #[test]
    fn accepted_sockets_inherit_nodelay_and_keepalive() {
        let opts = ListenOptions {
            addr: "127.0.0.1:0".parse().unwrap(),
            count: 1,
            transparent: false,
        };
        let listener: std::net::TcpListener = bind_sockets(&opts).unwrap().remove(0).into();
        listener.set_nonblocking(false).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let s = SockRef::from(&accepted);
        assert!(s.tcp_nodelay().unwrap());
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_mins(1));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(10));
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 6);
    }
}
