//! Start-up and shutdown: opens the listeners, runs the accept loops, and
//! on shutdown stops accepting and drains open connections for a bounded
//! time.

use std::sync::Arc;

use arc_swap::ArcSwap;
use mmproxy_common::sockmap::Counter;
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    bpf::Datapath,
    cli::Mode,
    config::Config,
    connection::TcpProxy,
    forward::{Forwarder, sockmap::SockmapForwarder, splice::SpliceForwarder},
    listener::{self, AcceptContext, ListenError, ListenOptions},
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
    #[error("-p udp is not available yet")]
    UdpUnavailable,
}

/// Runs the proxy until `shutdown` is cancelled, then drains.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    let config = Arc::new(config);
    if config.protocols.udp {
        return Err(StartError::UdpUnavailable);
    }
    let forwarder = choose_forwarder(config.mode)?;
    let opts = ListenOptions {
        addr: config.listen,
        count: config.listeners,
        transparent: config.listen_transparent,
    };
    let sockets = listener::bind_sockets(&opts)?;
    let ctx = AcceptContext {
        proxy: Arc::new(TcpProxy {
            config: config.clone(),
            upstream: UpstreamOptions {
                mark: config.mark,
                source_port: config.source_port,
                connect_timeout: config.connect_timeout,
            },
            forwarder,
        }),
        allowed: Arc::new(ArcSwap::from_pointee(config.allowed_subnets.clone())),
        permits: Arc::new(Semaphore::new(config.max_connections as usize)),
        connections: TaskTracker::new(),
        shutdown: shutdown.clone(),
    };
    let accept_loops = TaskTracker::new();
    for socket in sockets {
        let std_listener: std::net::TcpListener = socket.into();
        let listener =
            tokio::net::TcpListener::from_std(std_listener).map_err(StartError::Register)?;
        accept_loops.spawn(listener::accept_loop(listener, ctx.clone()));
    }
    info!(
        listen = %config.listen,
        listeners = config.listeners,
        target4 = %config.target4,
        target6 = %config.target6,
        mode = ctx.proxy.forwarder.name(),
        "listening (tcp)"
    );

    shutdown.cancelled().await;
    accept_loops.close();
    accept_loops.wait().await;
    let open = ctx.connections.len();
    info!(open, drain_timeout = ?config.drain_timeout, "stopped accepting; draining connections");
    ctx.connections.close();
    if tokio::time::timeout(config.drain_timeout, ctx.connections.wait())
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
    Ok(())
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
