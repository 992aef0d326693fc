//! Start-up and shutdown. In order: the metrics endpoint (so `/healthz`
//! can answer "not yet"), `--setup-routes`, the logged routing checks, the
//! SIGHUP reloader, the TCP and UDP listeners. On shutdown: stop accepting,
//! drain open TCP connections for a bounded time, log the UDP counters,
//! remove the routing that start-up added.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    check,
    config::{AllowedSubnets, Config},
    connection::TcpProxy,
    error::error_chain,
    forward::Forwarder,
    limits::{EvictingGate, SourceCounter},
    listener::{self, AcceptContext, ListenError, ListenOptions},
    metrics::{self, LiveCounters, Metrics},
    policy::{LogLimiter, REFUSAL_LOG_INTERVAL},
    routing::{Installed, Routing, RoutingError},
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
    #[error("--metrics-addr {addr}: cannot listen")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("--setup-routes")]
    Routes(#[source] RoutingError),
}

/// Says once, loudly, that anyone who reaches the listener chooses the
/// client address the backend sees: the default listen address is
/// go-mmproxy's (every interface), so a forgotten `--allowed-subnets`
/// must not go unnoticed.
fn warn_if_open(config: &Config) {
    if config.listens_openly() {
        warn!(
            listen = %config.listen,
            "no --allowed-subnets: anyone who can reach {} may claim any client address \
             (the backend will believe it); list your load balancers' subnets in a file and \
             pass it with --allowed-subnets",
            config.listen
        );
    }
}

/// How the daemon is asked to stop: `drain` starts a graceful shutdown
/// (SIGTERM, SIGINT); `now` cuts it short (a second signal): open
/// connections are reset at once.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    pub drain: CancellationToken,
    pub now: CancellationToken,
}

/// Runs the proxy until `shutdown.drain` is cancelled, then drains. Routing
/// that `--setup-routes` added is removed on every way out, a failed
/// start included.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), StartError> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::default());
    let live = Arc::new(LiveCounters::default());
    if let Some(addr) = config.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Metrics { addr, source })?;
        let registry = Arc::new(metrics::registry(&metrics, live.clone()));
        tokio::spawn(metrics::serve(
            listener,
            registry,
            metrics.clone(),
            shutdown.drain.clone(),
        ));
    }
    let routes = if config.setup_routes {
        Some(setup_routes(&config).await?)
    } else {
        None
    };
    let served = serve(&config, &metrics, &live, &shutdown).await;
    if let Some((routing, installed)) = routes {
        match routing.remove(installed).await {
            Ok(()) => info!("removed the routing added at start"),
            Err(e) => warn!(error = %error_chain(&e), "cannot remove the routing added at start"),
        }
    }
    served
}

/// Opens the listeners, serves until shutdown, drains.
async fn serve(
    config: &Arc<Config>,
    metrics: &Arc<Metrics>,
    live: &Arc<LiveCounters>,
    shutdown: &Shutdown,
) -> Result<(), StartError> {
    if !config.quiet {
        log_start_checks(config).await;
    }
    warn_if_open(config);
    let allowed = Arc::new(ArcSwap::from_pointee(config.allowed_subnets.clone()));
    tokio::spawn(reload_on_sighup(
        config.clone(),
        allowed.clone(),
        shutdown.drain.clone(),
    ));
    let upstream = config.upstream_options();
    let loops = TaskTracker::new();
    let tcp = if config.protocols.tcp {
        let ctx = start_tcp(config, upstream, &allowed, metrics, &loops, &shutdown.drain)?;
        let _ = live.mode.set(ctx.proxy.forwarder.name());
        if let Some(stats) = ctx.proxy.forwarder.datapath_stats() {
            let _ = live.datapath.set(stats);
        }
        Some(ctx)
    } else {
        None
    };
    let udp = if config.protocols.udp {
        let udp = start_udp(config, upstream, &allowed, &loops, &shutdown.drain)?;
        let _ = live.udp.set(udp.clone());
        Some(udp)
    } else {
        None
    };
    metrics.set_ready();

    shutdown.drain.cancelled().await;
    loops.close();
    loops.wait().await;
    if let Some(ctx) = tcp {
        drain_tcp(&ctx, config.drain_timeout, &shutdown.now).await;
    }
    if let Some(udp) = udp {
        let counters = udp.stats.counters();
        info!(?counters, header_errors = ?udp.stats.header_errors(),
              session_errors = ?udp.stats.session_errors(),
              policy_refusals = ?udp.stats.policy_refusals(), "udp counters at exit");
    }
    Ok(())
}

/// `--setup-routes`: adds what is missing, remembering it for the exit.
async fn setup_routes(config: &Config) -> Result<(Routing, Installed), StartError> {
    let spec = config.routing_spec();
    let routing = Routing::connect().await.map_err(StartError::Routes)?;
    let installed = routing
        .install_missing(spec)
        .await
        .map_err(StartError::Routes)?;
    if installed.adopted > 0 {
        info!(
            adopted = installed.adopted,
            "--setup-routes: took over routing an earlier run added (proto {}) and did not remove",
            crate::routing::MMPROXY_PROTOCOL
        );
    }
    if installed.is_empty() {
        info!("--setup-routes: the routing was already in place");
    } else {
        info!(routing = ?installed, "--setup-routes: the routing is ours; it is removed at exit");
    }
    Ok((routing, installed))
}

/// The routing checks of `mmproxy check`, logged (`-q` silences them).
async fn log_start_checks(config: &Config) {
    for line in check::routing(config).await {
        if line.passed {
            info!("check: {line}");
        } else {
            warn!("check: {line}");
        }
    }
}

/// SIGHUP re-reads `--allowed-subnets`; a bad file keeps the old list.
async fn reload_on_sighup(
    config: Arc<Config>,
    allowed: Arc<ArcSwap<AllowedSubnets>>,
    shutdown: CancellationToken,
) {
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        warn!("cannot handle SIGHUP; --allowed-subnets cannot be reloaded");
        return;
    };
    loop {
        tokio::select! {
            _ = hangup.recv() => {}
            () = shutdown.cancelled() => return,
        }
        let Some(path) = &config.allowed_subnets_file else {
            info!("SIGHUP: no --allowed-subnets file to reload");
            continue;
        };
        match AllowedSubnets::load(path) {
            Ok(list) => {
                info!(file = %path.display(), subnets = list.len(), "SIGHUP: allowed subnets reloaded");
                allowed.store(Arc::new(list));
            }
            Err(e) => {
                warn!(error = %error_chain(&e), "SIGHUP: allowed subnets NOT reloaded; keeping the old list");
            }
        }
    }
}

fn start_tcp(
    config: &Arc<Config>,
    upstream: UpstreamOptions,
    allowed: &Arc<ArcSwap<AllowedSubnets>>,
    metrics: &Arc<Metrics>,
    loops: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<AcceptContext, StartError> {
    let forwarder = Forwarder::for_mode(config.mode, config.ebpf_max_backlog)
        .map_err(|e| StartError::EbpfUnavailable(error_chain(&e)))?;
    let sockets = listener::bind_sockets(&listen_options(config))?;
    let ctx = AcceptContext {
        proxy: Arc::new(TcpProxy {
            config: config.clone(),
            upstream,
            forwarder,
            metrics: metrics.clone(),
            abort: CancellationToken::new(),
            refusal_log: LogLimiter::new(REFUSAL_LOG_INTERVAL),
            header_gate: EvictingGate::new(config.max_pending_headers as usize),
            sources: SourceCounter::new(config.max_conns_per_source),
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

/// How long aborted connections get to send their resets before exit.
const ABORT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

async fn drain_tcp(
    ctx: &AcceptContext,
    drain_timeout: std::time::Duration,
    now: &CancellationToken,
) {
    let open = ctx.connections.len();
    info!(
        open,
        ?drain_timeout,
        "stopped accepting; draining connections (a second SIGTERM or SIGINT resets them now)"
    );
    ctx.connections.close();
    let cut_short = tokio::select! {
        () = ctx.connections.wait() => None,
        () = tokio::time::sleep(drain_timeout) => Some("drain timeout reached"),
        () = now.cancelled() => Some("second signal"),
    };
    if let Some(why) = cut_short {
        warn!(
            cut = ctx.connections.len(),
            "{why}; resetting remaining connections"
        );
        // A reset, never a FIN: a peer must not take a cut stream for a
        // complete one.
        ctx.proxy.abort.cancel();
        let _ = tokio::time::timeout(ABORT_GRACE, ctx.connections.wait()).await;
    }
    if let Some(stats) = ctx.proxy.forwarder.datapath_stats() {
        let counters = stats.counters();
        info!(?counters, "ebpf data path counters at exit");
    }
}
