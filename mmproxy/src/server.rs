//! Start-up and shutdown: opens the TCP and UDP listeners, runs their
//! loops, and on shutdown stops accepting and drains open TCP connections
//! for a bounded time.

use std::sync::Arc;

use arc_swap::ArcSwap;
use mmproxy_common::sockmap::Counter;
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    bpf::Datapath,
    cli::Mode,
    config::{AllowedSubnets, Config},
    connection::TcpProxy,
    forward::{Forwarder, sockmap::SockmapForwarder, splice::SpliceForwarder},
    listener::{self, AcceptContext, ListenError, ListenOptions},
    udp::{UdpProxy, frontend::FrontendSocket},
    upstream::UpstreamOptions,
};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot register a listener with the runtime")]
    Register(#[source] std::io::Error),
    #[error("--mode ebpf: {0}")]
    EbpfUnavailable(String),
}

/// Runs the proxy until `shutdown` is cancelled, then drains.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    let config = Arc::new(config);
    let allowed = Arc::new(ArcSwap::from_pointee(config.allowed_subnets.clone()));
    let upstream = UpstreamOptions {
        mark: config.mark,
        source_port: config.source_port,
        connect_timeout: config.connect_timeout,
    };
    let loops = TaskTracker::new();
    let tcp = if config.protocols.tcp {
        Some(start_tcp(&config, upstream, &allowed, &loops, &shutdown)?)
    } else {
        None
    };
    let udp = if config.protocols.udp {
        Some(start_udp(&config, upstream, &allowed, &loops, &shutdown)?)
    } else {
        None
    };

    shutdown.cancelled().await;
    loops.close();
    loops.wait().await;
    if let Some(ctx) = tcp {
        drain_tcp(&ctx, config.drain_timeout).await;
    }
    if let Some(udp) = udp {
        let counters = udp.stats.counters();
        info!(?counters, header_errors = ?udp.stats.header_errors(),
              session_errors = ?udp.stats.session_errors(), "udp counters at exit");
    }
    Ok(())
}

fn start_tcp(
    config: &Arc<Config>,
    upstream: UpstreamOptions,
    allowed: &Arc<ArcSwap<AllowedSubnets>>,
    loops: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<AcceptContext, StartError> {
    let forwarder = choose_forwarder(config.mode)?;
    let sockets = listener::bind_sockets(&listen_options(config))?;
    let ctx = AcceptContext {
        proxy: Arc::new(TcpProxy {
            config: config.clone(),
            upstream,
            forwarder,
        }),
        allowed: allowed.clone(),
        permits: Arc::new(Semaphore::new(config.max_connections as usize)),
        connections: TaskTracker::new(),
        shutdown: shutdown.clone(),
    };
    for socket in sockets {
        let std_listener: std::net::TcpListener = socket.into();
        let listener =
            tokio::net::TcpListener::from_std(std_listener).map_err(StartError::Register)?;
        loops.spawn(listener::accept_loop(listener, ctx.clone()));
    }
    info!(
        listen = %config.listen,
        listeners = config.listeners,
        target4 = %config.target4,
        target6 = %config.target6,
        mode = ctx.proxy.forwarder.name(),
        "listening (tcp)"
    );
    Ok(ctx)
}

fn start_udp(
    config: &Arc<Config>,
    upstream: UpstreamOptions,
    allowed: &Arc<ArcSwap<AllowedSubnets>>,
    loops: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Arc<UdpProxy>, StartError> {
    let sockets = listener::bind_udp_sockets(&listen_options(config))?;
    let proxy = Arc::new(UdpProxy::new(config.clone(), upstream, allowed.clone()));
    for socket in sockets {
        let socket = FrontendSocket::new(socket, config.listen).map_err(StartError::Register)?;
        loops.spawn(proxy.clone().serve(Arc::new(socket), shutdown.clone()));
    }
    loops.spawn(proxy.clone().sweep(shutdown.clone()));
    info!(
        listen = %config.listen,
        listeners = config.listeners,
        target4 = %config.target4,
        target6 = %config.target6,
        header = ?config.udp_header,
        close_after = ?config.udp_idle_timeout,
        max_sessions = config.max_udp_sessions,
        "listening (udp)"
    );
    Ok(proxy)
}

fn listen_options(config: &Config) -> ListenOptions {
    ListenOptions {
        addr: config.listen,
        count: config.listeners,
        transparent: config.listen_transparent,
    }
}

async fn drain_tcp(ctx: &AcceptContext, drain_timeout: std::time::Duration) {
    let open = ctx.connections.len();
    info!(
        open,
        ?drain_timeout,
        "stopped accepting; draining connections"
    );
    ctx.connections.close();
    if tokio::time::timeout(drain_timeout, ctx.connections.wait())
        .await
        .is_err()
    {
        warn!(
            cut = ctx.connections.len(),
            "drain timeout reached; closing remaining connections"
        );
    }
    if let Forwarder::Ebpf(f) = &ctx.proxy.forwarder {
        let counters = Counter::ALL.map(|c| (c.name(), f.datapath().counter(c)));
        info!(?counters, "ebpf data path counters at exit");
    }
}

fn choose_forwarder(mode: Mode) -> Result<Forwarder, StartError> {
    match mode {
        Mode::Plain => Ok(Forwarder::Plain(SpliceForwarder::new())),
        Mode::Auto => {
            // ebpf passes the suite and the soak, but a slow backend makes
            // the kernel buffer without bound (docs/ebpf-datapath.md):
            // never a default that can exhaust memory.
            info!(
                "mode auto: using plain; --mode ebpf is opt-in until its kernel buffering is \
                 bounded (docs/ebpf-datapath.md)"
            );
            Ok(Forwarder::Plain(SpliceForwarder::new()))
        }
        Mode::Ebpf => {
            let datapath = Datapath::load()
                .map_err(|e| StartError::EbpfUnavailable(crate::connection::error_chain(&e)))?;
            info!("mode ebpf: verdict program attached");
            Ok(Forwarder::Ebpf(SockmapForwarder::new(Arc::new(datapath))))
        }
    }
}
