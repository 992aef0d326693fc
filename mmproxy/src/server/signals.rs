//! The signals that change a running daemon without stopping it: SIGHUP
//! reloads `--allowed-subnets`, SIGUSR2 upgrades in place. (SIGTERM and
//! SIGINT, which stop it, are handled in `main.rs`.)

use std::sync::Arc;

use arc_swap::ArcSwap;
use sd_notify::NotifyState;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::routes::RouteOwner;
use crate::{
    activation,
    config::{AllowedSubnets, Config},
    error::error_chain,
    upgrade::{self, HandoverSocket, Launch},
};

/// SIGHUP (reload) and SIGUSR2 (upgrade), registered first thing: until
/// a handler exists either signal kills the process.
#[derive(Debug)]
pub(super) struct Signals {
    pub(super) hangup: Option<Signal>,
    pub(super) usr2: Option<Signal>,
}

impl Signals {
    pub(super) fn register() -> Self {
        let register = |kind, what| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot handle {what}");
                None
            }
        };
        Self {
            hangup: register(
                SignalKind::hangup(),
                "SIGHUP; --allowed-subnets cannot be reloaded",
            ),
            usr2: register(SignalKind::user_defined2(), "SIGUSR2; upgrades are off"),
        }
    }
}

/// SIGHUP re-reads `--allowed-subnets`; a bad file keeps the old list.
pub(super) async fn reload_on_sighup(
    mut hangup: Signal,
    config: Arc<Config>,
    allowed: Arc<ArcSwap<AllowedSubnets>>,
    shutdown: CancellationToken,
) {
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

/// SIGUSR2: start the binary at our own path with our flags, hand it the
/// listening sockets, and once it serves, stop accepting and drain. A
/// failed upgrade leaves this instance serving as before.
pub(super) async fn upgrade_on_sigusr2(
    mut usr2: Signal,
    launch: Launch,
    sockets: Vec<HandoverSocket>,
    routes: Arc<RouteOwner>,
    drain: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = usr2.recv() => {}
            () = drain.cancelled() => return,
        }
        info!(exe = %launch.exe.display(), "SIGUSR2: starting the new instance");
        match upgrade::start_successor(&launch, &sockets).await {
            Ok(successor) => {
                info!(
                    pid = successor.pid,
                    "upgrade: the new instance serves; this one stops accepting and drains"
                );
                activation::notify(&[NotifyState::MainPid(successor.pid)]);
                // In this order: the routing must be let go of before the
                // drain can end in removing it.
                routes.hand_over();
                drain.cancel();
                successor.release().await;
                return;
            }
            Err(e) => {
                warn!(error = %error_chain(&e), "upgrade failed; this instance keeps serving");
            }
        }
    }
}
