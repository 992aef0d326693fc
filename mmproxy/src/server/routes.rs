//! The `--setup-routes` routing as this instance owns it: installed at
//! start (or, for an upgraded instance, taken over from its
//! predecessor), removed at exit, or left in place for a successor.

use tracing::{info, warn};

use crate::{
    config::Config,
    error::error_chain,
    routing::{Installed, Routing, RoutingError},
};

/// The `--setup-routes` routing this instance owns: removed at exit, or
/// left in place for a successor.
#[derive(Debug, Default)]
pub(super) struct RouteOwner(std::sync::Mutex<Option<(Routing, Installed)>>);

impl RouteOwner {
    pub(super) async fn take_over(&self, config: &Config) -> Result<(), RoutingError> {
        let owned = setup_routes(config).await?;
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(owned);
        Ok(())
    }

    /// Lets go of the routing without removing it.
    pub(super) fn hand_over(&self) {
        if let Some((_, installed)) = self.take() {
            installed.hand_over();
        }
    }

    pub(super) async fn remove(&self) {
        let Some((routing, installed)) = self.take() else {
            return;
        };
        match routing.remove(installed).await {
            Ok(()) => info!("removed the routing added at start"),
            Err(e) => warn!(error = %error_chain(&e), "cannot remove the routing added at start"),
        }
    }

    fn take(&self) -> Option<(Routing, Installed)> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// `--setup-routes`: adds what is missing, remembering it for the exit.
async fn setup_routes(config: &Config) -> Result<(Routing, Installed), RoutingError> {
    let spec = config.routing_spec();
    let routing = Routing::connect().await?;
    let installed = routing.install_missing(spec).await?;
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
        info!(routing = %installed, "--setup-routes: the routing is ours; it is removed at exit");
    }
    Ok((routing, installed))
}
