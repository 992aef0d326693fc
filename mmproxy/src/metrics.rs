//! Prometheus metrics on `--metrics-addr` (`/metrics`), and `/healthz`.
//!
//! TCP events are counted where they happen, in prometheus-client
//! metrics held by [`Metrics`]. Counters that live elsewhere (the UDP
//! proxy's, the BPF programs' per-CPU ones) are read at scrape time by
//! [`LiveCounters`], so the hot paths never touch two sets of atomics.

use std::{
    convert::Infallible,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::{forward::sockmap::DatapathStats, limits::EvictingGate, udp::UdpProxy};

/// Label pairs; the values are a handful of fixed names or errno names.
pub type Labels = Vec<(&'static str, String)>;

/// What the TCP side counts as it goes.
#[derive(Debug, Default)]
pub struct Metrics {
    pub tcp_accepted: Counter,
    pub tcp_active: Gauge,
    /// `reason`: `not_allowed`, `header`, `policy`, `source_limit`, `upstream`.
    pub tcp_rejected: Family<Labels, Counter>,
    /// `reason`: a [`crate::policy::Refusal`] label.
    pub tcp_policy_refusals: Family<Labels, Counter>,
    /// `kind`: the parser's error label, timeout, closed, io.
    pub tcp_header_errors: Family<Labels, Counter>,
    /// `stage` (socket, bind, connect, ...) and `errno`.
    pub tcp_upstream_errors: Family<Labels, Counter>,
    /// `datapath` (plain, ebpf) and `direction` (`to_backend`, `to_client`),
    /// added when a connection ends.
    pub tcp_forwarded_bytes: Family<Labels, Counter>,
    /// Every listener is bound (`/healthz`).
    ready: AtomicBool,
}

impl Metrics {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Counts a TCP connection closed before forwarding, by reason.
    pub fn rejected(&self, reason: &'static str) {
        self.tcp_rejected
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc();
    }

    /// Counts an upstream failure with its errno's name.
    pub fn upstream_error(&self, stage: &'static str, errno: Option<i32>) {
        let errno = errno.map_or_else(|| "none".to_owned(), errno_name);
        self.tcp_upstream_errors
            .get_or_create(&vec![("stage", stage.to_owned()), ("errno", errno)])
            .inc();
    }
}

/// `ECONNREFUSED` for 111.
pub fn errno_name(errno: i32) -> String {
    format!("{:?}", nix::errno::Errno::from_raw(errno))
}

/// Counters owned by other subsystems, read when scraped. Filled in as
/// the subsystems start (the endpoint is up before the listeners, so
/// that `/healthz` can say they are not bound yet).
#[derive(Debug, Default)]
pub struct LiveCounters {
    pub mode: OnceLock<&'static str>,
    pub udp: OnceLock<Arc<UdpProxy>>,
    pub datapath: OnceLock<DatapathStats>,
}

impl Collector for LiveCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(mode) = self.mode.get() {
            let mut info = encoder.encode_descriptor(
                "mmproxy_tcp_datapath",
                "The TCP data path in use (1 for the active one)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(1i64)
                .encode(info.encode_family(&vec![("mode", (*mode).to_owned())])?)?;
            let moved = encoder.encode_descriptor(
                "mmproxy_tcp_connections_moved_to_bulk_workers",
                "TCP connections moved to the bulk workers after 1 MiB without a pause",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(crate::forward::connections_moved_to_bulk_workers()).encode(moved)?;
        }
        if let Some(udp) = self.udp.get() {
            encode_udp(&mut encoder, udp)?;
        }
        if let Some(datapath) = self.datapath.get() {
            // BPF verdict counters summed over CPUs, and `pass_episodes`:
            // directions switched to PASS because their redirect backlog
            // reached --ebpf-max-backlog-kib.
            for (name, value) in datapath.counters() {
                let name = format!("mmproxy_ebpf_{name}");
                let metric = encoder.encode_descriptor(
                    &name,
                    "ebpf data path counter (BPF counters summed over CPUs)",
                    None,
                    MetricType::Counter,
                )?;
                ConstCounter::new(value).encode(metric)?;
            }
        }
        Ok(())
    }
}

fn encode_udp(encoder: &mut DescriptorEncoder, udp: &UdpProxy) -> Result<(), std::fmt::Error> {
    for (name, value) in udp.stats.counters() {
        let name = format!("mmproxy_udp_{name}");
        let metric = encoder.encode_descriptor(
            &name,
            "UDP datagrams and sessions",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(value).encode(metric)?;
    }
    let sessions = encoder.encode_descriptor(
        "mmproxy_udp_sessions",
        "UDP sessions open now",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(i64::try_from(udp.session_count()).unwrap_or(i64::MAX)).encode(sessions)?;
    for (name, help, map) in [
        (
            "mmproxy_udp_header_errors",
            "UDP datagrams dropped for a missing or bad PROXY header, by kind",
            udp.stats.header_errors(),
        ),
        (
            "mmproxy_udp_session_errors",
            "UDP datagrams dropped because their session could not open, by stage",
            udp.stats.session_errors(),
        ),
        (
            "mmproxy_udp_policy_refusals",
            "UDP datagrams whose PROXY header claimed a refused source or destination, by reason",
            udp.stats.policy_refusals(),
        ),
    ] {
        let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (kind, value) in map {
            ConstCounter::new(value)
                .encode(metric.encode_family(&vec![("kind", kind.to_owned())])?)?;
        }
    }
    if let Some(kernel) = udp.kernel() {
        let mut metric = encoder.encode_descriptor(
            "mmproxy_udp_kernel_program",
            "What the UDP TC program did with the datagrams it looked at (ebpf mode), by outcome",
            None,
            MetricType::Counter,
        )?;
        for (outcome, value) in kernel.program_counters() {
            ConstCounter::new(value)
                .encode(metric.encode_family(&vec![("outcome", outcome.to_owned())])?)?;
        }
    }
    Ok(())
}

/// Builds the registry: the TCP metrics and the live counters.
pub fn registry(metrics: &Metrics, live: Arc<LiveCounters>) -> Registry {
    let mut r = Registry::default();
    r.register(
        "mmproxy_tcp_connections_accepted",
        "TCP connections accepted",
        metrics.tcp_accepted.clone(),
    );
    r.register(
        "mmproxy_tcp_connections_active",
        "TCP connections open now",
        metrics.tcp_active.clone(),
    );
    r.register(
        "mmproxy_tcp_connections_rejected",
        "TCP connections closed before forwarding, by reason",
        metrics.tcp_rejected.clone(),
    );
    r.register(
        "mmproxy_tcp_header_errors",
        "TCP connections with a missing or bad PROXY header, by kind",
        metrics.tcp_header_errors.clone(),
    );
    r.register(
        "mmproxy_tcp_policy_refusals",
        "TCP connections whose PROXY header claimed a refused source or destination, by reason",
        metrics.tcp_policy_refusals.clone(),
    );
    r.register(
        "mmproxy_tcp_upstream_errors",
        "Upstream socket, bind and connect failures, by stage and errno",
        metrics.tcp_upstream_errors.clone(),
    );
    r.register(
        "mmproxy_tcp_forwarded_bytes",
        "Bytes forwarded by finished TCP connections, by data path and direction",
        metrics.tcp_forwarded_bytes.clone(),
    );
    r.register_collector(Box::new(live));
    r
}

/// Time a metrics client has to send its request headers.
const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Metrics connections open at once; a new one beyond it closes the
/// oldest (scrapers reconnect; a slowloris only ever holds this many).
const METRICS_MAX_CONNECTIONS: usize = 64;
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown`. The
/// endpoint is exposed to whoever can reach it, so it is bounded like the
/// proxy: a header read timeout, a connection cap that evicts the oldest
/// connection, and a back-off when accepting fails for lack of resources.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics on http://{addr}/metrics, health on /healthz");
    }
    let gate = EvictingGate::new(METRICS_MAX_CONNECTIONS);
    let mut backoff = ACCEPT_BACKOFF_START;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = ACCEPT_BACKOFF_START;
                a
            }
            Err(e) => {
                debug!(error = %e, retry_in = ?backoff, "metrics accept failed");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let (slot, _) = gate.enter();
        let (registry, metrics) = (registry.clone(), metrics.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = respond(&req, &registry, &metrics);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                served = connection => if let Err(e) = served {
                    debug!(%peer, error = %e, "metrics connection failed");
                },
                () = slot.evicted.cancelled() => {
                    debug!(%peer, "metrics connection closed to make room");
                }
            }
        });
    }
}

fn respond(
    req: &Request<hyper::body::Incoming>,
    registry: &Registry,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => (
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(_) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "encoding failed\n".to_owned(),
                ),
            }
        }
        "/healthz" if metrics.is_ready() => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/healthz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "listeners not bound yet\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_labels_are_symbolic() {
        assert_eq!(errno_name(libc::ECONNREFUSED), "ECONNREFUSED");
        assert_eq!(errno_name(libc::EADDRINUSE), "EADDRINUSE");
    }

    #[test]
    fn the_registry_encodes_counters_with_their_labels() {
        let metrics = Metrics::default();
        metrics.tcp_accepted.inc();
        metrics.upstream_error("connect", Some(libc::ECONNREFUSED));
        let live = Arc::new(LiveCounters::default());
        let _ = live.mode.set("plain");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry(&metrics, live)).unwrap();
        assert!(
            text.contains("mmproxy_tcp_connections_accepted_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "mmproxy_tcp_upstream_errors_total{stage=\"connect\",errno=\"ECONNREFUSED\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("mmproxy_tcp_datapath{mode=\"plain\"} 1\n"),
            "{text}"
        );
    }
}
