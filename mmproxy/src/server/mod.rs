//! Start-up and shutdown. In order: the SIGHUP and SIGUSR2 handlers, the
//! listening sockets (bound, or handed over by systemd or a predecessor),
//! the metrics endpoint (so `/healthz` can answer "not yet"),
//! `--setup-routes` ([`routes`]), the logged routing checks, the TCP and
//! UDP accept loops, `READY=1`. On shutdown (SIGTERM, or a successor
//! serving after SIGUSR2, see [`signals`]): stop accepting, drain open TCP
//! connections for a bounded time, log the UDP counters, remove the
//! routing that start-up added unless a successor took it over.

use std::sync::Arc;

use arc_swap::ArcSwap;
use sd_notify::NotifyState;
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

mod routes;
mod signals;

use self::{
    routes::RouteOwner,
    signals::{Signals, reload_on_sighup, upgrade_on_sigusr2},
};
use crate::{
    activation::{self, Inherited},
    bpf::udp::Attachment,
    check,
    config::{AllowedSubnets, Config},
    connection::TcpProxy,
    error::error_chain,
    forward::Forwarder,
    limits::{EvictingGate, SourceCounter},
    listener::{self, AcceptContext, AdoptError, ListenError, ListenOptions, Listeners},
    metrics::{self, LiveCounters, Metrics},
    options::{Mode, UdpHeaderMode},
    policy::{LogLimiter, REFUSAL_LOG_INTERVAL},
    routing::RoutingError,
    udp::{UdpProxy, frontend::FrontendSocket, kernel::KernelPath},
    upgrade::{HandoverSocket, Launch, Predecessor},
};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Adopt(#[from] AdoptError),
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

/// Trims the heap after each burst of TCP connections, until `stop`.
async fn reclaim_heap_after_bursts(proxy: Arc<TcpProxy>, stop: CancellationToken) {
    let open = || usize::try_from(proxy.metrics.tcp_active.get()).unwrap_or_default();
    proxy.reclaimer.run(open, stop).await;
}

/// Says once, loudly, that anyone who reaches the listener chooses the
/// client address the backend sees: the default listen address is
/// go-mmproxy's (every interface), so a forgotten `--allowed-subnets`
/// must not go unnoticed.
fn warn_if_open(config: &Config) {
    if config.listens_openly() {
        let listen = display_addrs(&config.policy.listening);
        warn!(
            %listen,
            "no --allowed-subnets: anyone who can reach {listen} may claim any client address \
             (the backend will believe it); list your load balancers' subnets in a file and \
             pass it with --allowed-subnets"
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

/// What a starting instance was handed: sockets (systemd's, or a
/// predecessor's), the predecessor to tell when we serve, and how to
/// start a successor on SIGUSR2 (`None`: no upgrades).
#[derive(Debug, Default)]
pub struct Startup {
    pub inherited: Inherited,
    pub predecessor: Option<Predecessor>,
    pub launch: Option<Launch>,
}

/// Runs the proxy until `shutdown.drain` is cancelled, then drains. Routing
/// that `--setup-routes` added is removed on every way out, a failed
/// start included, unless a successor took it over.
pub async fn run(
    mut config: Config,
    startup: Startup,
    shutdown: Shutdown,
) -> Result<(), StartError> {
    let signals = Signals::register();
    let Startup {
        inherited,
        predecessor,
        launch,
    } = startup;
    let mut listeners = open_listeners(&config, inherited)?;
    config.policy.listening.clone_from(&listeners.served);
    let upgrades = launch.and_then(|launch| match listeners.for_handover() {
        Ok(sockets) => Some((launch, sockets)),
        Err(e) => {
            warn!(error = %e, "cannot keep copies of the listening sockets; SIGUSR2 upgrades are off");
            None
        }
    });
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::default());
    let live = Arc::new(LiveCounters::default());
    if let Some(socket) = listeners.metrics.take() {
        let listener =
            tokio::net::TcpListener::from_std(socket.into()).map_err(StartError::Register)?;
        let registry = Arc::new(metrics::registry(&metrics, live.clone()));
        tokio::spawn(metrics::serve(
            listener,
            registry,
            metrics.clone(),
            shutdown.drain.clone(),
        ));
    }
    let routes = Arc::new(RouteOwner::default());
    // A successor takes the routing over once its predecessor lets go.
    if config.setup_routes && predecessor.is_none() {
        routes
            .take_over(&config)
            .await
            .map_err(StartError::Routes)?;
    }
    let serving = Serving {
        config: &config,
        metrics: &metrics,
        live: &live,
        shutdown: &shutdown,
        routes: &routes,
    };
    let served = serving
        .serve(listeners, predecessor, upgrades, signals)
        .await;
    routes.remove().await;
    served
}

/// Opens the listening sockets first, so that a busy port fails the
/// start before anything else happens: the handed-over ones, or `-l`
/// (and `--metrics-addr`).
fn open_listeners(config: &Config, mut inherited: Inherited) -> Result<Listeners, StartError> {
    let origin = inherited.origin;
    let mut listeners = Listeners::adopt(
        &mut inherited,
        config.protocols.tcp,
        config.protocols.udp,
        config.listen_transparent,
    )?;
    if let Some(origin) = origin {
        info!(
            %origin,
            tcp = listeners.tcp.len(),
            udp = listeners.udp.len(),
            metrics = listeners.metrics.is_some(),
            "using handed-over listening sockets"
        );
    }
    if listeners.served.is_empty() {
        let opts = listen_options(config);
        if config.protocols.tcp {
            listeners.tcp = listener::bind_sockets(&opts)?;
        }
        if config.protocols.udp {
            listeners.udp = listener::bind_udp_sockets(&opts)?;
        }
        listeners.served = vec![config.listen];
    }
    if let (None, Some(addr)) = (&listeners.metrics, config.metrics_addr) {
        let socket = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| StartError::Metrics { addr, source })?;
        listeners.metrics = Some(socket.into());
    }
    Ok(listeners)
}

/// What serving needs, borrowed from [`run`].
struct Serving<'a> {
    config: &'a Arc<Config>,
    metrics: &'a Arc<Metrics>,
    live: &'a Arc<LiveCounters>,
    shutdown: &'a Shutdown,
    routes: &'a Arc<RouteOwner>,
}

impl Serving<'_> {
    /// Starts the accept loops, serves until shutdown, drains.
    async fn serve(
        &self,
        listeners: Listeners,
        predecessor: Option<Predecessor>,
        upgrades: Option<(Launch, Vec<HandoverSocket>)>,
        signals: Signals,
    ) -> Result<(), StartError> {
        let (config, shutdown) = (self.config, self.shutdown);
        if !config.quiet {
            log_start_checks(config).await;
        }
        warn_if_open(config);
        let allowed = Arc::new(ArcSwap::from_pointee(config.allowed_subnets.clone()));
        if let Some(hangup) = signals.hangup {
            tokio::spawn(reload_on_sighup(
                hangup,
                config.clone(),
                allowed.clone(),
                shutdown.drain.clone(),
            ));
        }
        if let (Some(usr2), Some((launch, sockets))) = (signals.usr2, upgrades) {
            tokio::spawn(upgrade_on_sigusr2(
                usr2,
                launch,
                sockets,
                self.routes.clone(),
                shutdown.drain.clone(),
            ));
        }
        let loops = TaskTracker::new();
        let tcp = self.start_tcp(listeners.tcp, &allowed, &loops)?;
        let udp = self.start_udp(listeners.udp, &allowed, &loops)?;
        self.metrics.set_ready();
        match predecessor {
            // systemd hears of a successor through its predecessor
            // (MAINPID=); it is not the main PID yet, so it stays quiet.
            Some(predecessor) => self.follow(predecessor).await,
            None => activation::notify(&[NotifyState::Ready]),
        }

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
            if let Some(kernel) = udp.kernel() {
                info!(counters = ?kernel.program_counters(), "udp kernel program counters at exit");
            }
        }
        Ok(())
    }

    fn start_tcp(
        &self,
        sockets: Vec<socket2::Socket>,
        allowed: &Arc<ArcSwap<AllowedSubnets>>,
        loops: &TaskTracker,
    ) -> Result<Option<AcceptContext>, StartError> {
        if sockets.is_empty() {
            return Ok(None);
        }
        let config = self.config;
        let forwarder = Forwarder::for_mode(config.mode, config.ebpf_options())
            .map_err(|e| StartError::EbpfUnavailable(error_chain(&e)))?;
        let ctx = AcceptContext {
            proxy: Arc::new(TcpProxy {
                config: config.clone(),
                upstream: config.upstream_options(),
                forwarder,
                metrics: self.metrics.clone(),
                abort: CancellationToken::new(),
                refusal_log: LogLimiter::new(REFUSAL_LOG_INTERVAL),
                header_gate: EvictingGate::new(config.max_pending_headers as usize),
                sources: SourceCounter::new(config.max_conns_per_source),
                reclaimer: Arc::default(),
            }),
            allowed: allowed.clone(),
            permits: Arc::new(Semaphore::new(config.max_connections as usize)),
            connections: TaskTracker::new(),
            shutdown: self.shutdown.drain.clone(),
        };
        let count = sockets.len();
        for socket in sockets {
            let listener =
                tokio::net::TcpListener::from_std(socket.into()).map_err(StartError::Register)?;
            loops.spawn(listener::accept_loop(listener, ctx.clone()));
        }
        loops.spawn(reclaim_heap_after_bursts(
            ctx.proxy.clone(),
            ctx.shutdown.clone(),
        ));
        let _ = self.live.mode.set(ctx.proxy.forwarder.name());
        if let Some(stats) = ctx.proxy.forwarder.datapath_stats() {
            let _ = self.live.datapath.set(stats);
        }
        info!(
            listen = %display_addrs(&config.policy.listening),
            listeners = count,
            target4 = %config.target4,
            target6 = %config.target6,
            mode = ctx.proxy.forwarder.name(),
            "listening (tcp)"
        );
        Ok(Some(ctx))
    }

    fn start_udp(
        &self,
        sockets: Vec<socket2::Socket>,
        allowed: &Arc<ArcSwap<AllowedSubnets>>,
        loops: &TaskTracker,
    ) -> Result<Option<Arc<UdpProxy>>, StartError> {
        if sockets.is_empty() {
            return Ok(None);
        }
        let (config, shutdown) = (self.config, &self.shutdown.drain);
        let kernel = udp_kernel_path(config)?;
        let with_kernel = kernel.is_some();
        let mode = if with_kernel { "ebpf" } else { "plain" };
        let proxy = Arc::new(UdpProxy::new(
            config.clone(),
            config.upstream_options(),
            allowed.clone(),
            kernel,
        ));
        let count = sockets.len();
        for socket in sockets {
            let socket = FrontendSocket::new(socket, with_kernel).map_err(StartError::Register)?;
            loops.spawn(proxy.clone().serve(Arc::new(socket), shutdown.clone()));
        }
        loops.spawn(proxy.clone().sweep(shutdown.clone()));
        let _ = self.live.udp.set(proxy.clone());
        info!(
            listen = %display_addrs(&config.policy.listening),
            listeners = count,
            target4 = %config.target4,
            target6 = %config.target6,
            header = ?config.udp_header,
            close_after = ?config.udp_idle_timeout,
            max_sessions = config.max_udp_sessions,
            mode,
            "listening (udp)"
        );
        Ok(Some(proxy))
    }

    /// A successor's last start-up step: tell the old instance we serve,
    /// wait until it has stopped accepting, take the routing over.
    async fn follow(&self, mut predecessor: Predecessor) {
        if let Err(e) = predecessor.ready() {
            warn!(error = %e, "upgrade: cannot tell the old instance that we serve");
        }
        info!("upgrade: serving; the old instance stops accepting and drains");
        tokio::select! {
            () = predecessor.released() => {}
            () = self.shutdown.drain.cancelled() => return,
        }
        if !self.config.setup_routes {
            return;
        }
        if let Err(e) = self
            .routes
            .take_over(self.config)
            .await
            .map_err(StartError::Routes)
        {
            warn!(error = %error_chain(&e), "upgrade: cannot take over the --setup-routes routing; it stays in place but will not be removed at exit");
        }
    }
}

/// Addresses for a log line.
fn display_addrs(addrs: &[std::net::SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
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

/// The UDP kernel path for `--mode`: required in ebpf mode, used where it
/// loads in auto mode (it forwards near no-proxy speed), never in plain.
fn udp_kernel_path(config: &Config) -> Result<Option<Arc<KernelPath>>, StartError> {
    if config.mode == Mode::Plain {
        return Ok(None);
    }
    let loaded = KernelPath::load(
        config.max_udp_sessions,
        config.udp_header == UdpHeaderMode::First,
        config.mark,
    );
    let kernel = match (loaded, config.mode) {
        (Ok(kernel), _) => kernel,
        (Err(e), Mode::Ebpf) => return Err(StartError::EbpfUnavailable(error_chain(&e))),
        (Err(e), _) => {
            info!(reason = %error_chain(&e), "mode auto: UDP stays in userspace");
            return Ok(None);
        }
    };
    let datapath = kernel.datapath();
    info!(
        devices = %datapath.devices().join(","),
        attach = datapath.attachment().name(),
        "udp: kernel path attached (ingress)"
    );
    if datapath.attachment() == Attachment::Clsact {
        warn!(
            "udp: this kernel has no TCX (Linux 6.6+): the program sits in a clsact filter, which a \
             killed daemon leaves behind (tc filter del dev DEVICE ingress)"
        );
    }
    if !datapath.lo_localnet() && config.target4.ip().is_loopback() {
        info!(
            fix = crate::bpf::udp::LO_LOCALNET_FIX,
            "udp: net.ipv4.conf.lo.route_localnet and accept_local are not both 1: IPv4 datagrams \
             arriving on devices other than lo take the userspace path to the 127/8 backend (the \
             sysctls concern only what arrives on lo)"
        );
    }
    Ok(Some(Arc::new(kernel)))
}
