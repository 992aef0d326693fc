//! One TCP connection's life: read the PROXY header, decide where to
//! connect and as whom, connect upstream, forward.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    sync::Arc,
    time::Duration,
};

use bytes::BytesMut;
use tokio::{net::TcpStream, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, trace, warn};

use crate::{
    config::Config,
    error::{Side, error_chain},
    forward::{self, Connection, ForwardError, Forwarder, ResetOnPanic, Transferred},
    limits::{HeaderGate, SourceCounter},
    metrics::Metrics,
    policy::{LogLimiter, Refusal},
    proxy_protocol::{self, Action, MAX_HEADER_LEN, Status, Transport},
    upstream::{self, UpstreamError, UpstreamOptions},
};

/// Read size while waiting for the header. Most headers fit in one read;
/// the buffer grows for v2 headers with large TLVs.
const HEADER_READ_BYTES: usize = 1024;

/// What every TCP connection shares.
#[derive(Debug)]
pub struct TcpProxy {
    pub config: Arc<Config>,
    pub upstream: UpstreamOptions,
    pub forwarder: Forwarder,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the drain timeout expires: connections still
    /// forwarding then end with a reset to both peers.
    pub abort: tokio_util::sync::CancellationToken,
    /// Paces the warnings for refused headers.
    pub refusal_log: LogLimiter,
    /// `--max-pending-headers`.
    pub header_gate: Arc<HeaderGate>,
    /// `--max-conns-per-source`.
    pub sources: Arc<SourceCounter>,
}

/// Why a connection ended before or during forwarding.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("header refused: {0}")]
    Refused(#[from] Refusal),
    #[error("{client} already has {limit} connections (--max-conns-per-source)")]
    SourceLimit { client: IpAddr, limit: u32 },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
}

/// Why no usable PROXY header was read.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("invalid PROXY header: {0}")]
    Invalid(#[from] proxy_protocol::Error),
    #[error("no complete PROXY header within {timeout:?} ({received} bytes received)")]
    Timeout { timeout: Duration, received: usize },
    #[error(
        "the client closed the connection before a complete PROXY header ({received} bytes received)"
    )]
    Closed { received: usize },
    #[error("reading the PROXY header failed")]
    Io(#[source] io::Error),
    #[error(
        "closed while waiting for a PROXY header: --max-pending-headers newer connections were waiting too ({received} bytes received)"
    )]
    Evicted { received: usize },
}

impl HeaderError {
    /// A short name for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            HeaderError::Invalid(e) => e.label(),
            HeaderError::Timeout { .. } => "timeout",
            HeaderError::Closed { .. } => "closed",
            HeaderError::Io(_) => "io",
            HeaderError::Evicted { .. } => "evicted",
        }
    }
}

impl ConnectionError {
    pub fn side(&self) -> Side {
        match self {
            ConnectionError::Header(_)
            | ConnectionError::Refused(_)
            | ConnectionError::SourceLimit { .. } => Side::Client,
            ConnectionError::Upstream(e) => e.side(),
            ConnectionError::Forward(e) => e.side,
        }
    }
}

impl TcpProxy {
    /// Handles one accepted connection to its end, and logs how it ended:
    /// errors at debug (`-v 1`), everything else at trace (`-v 2`).
    pub async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        trace!(%peer, "accepted");
        self.metrics.tcp_active.inc();
        let result = self.proxy(client, peer).await;
        self.metrics.tcp_active.dec();
        self.count(&result);
        match result {
            Ok(t) => trace!(
                %peer,
                sent = t.client_to_upstream,
                received = t.upstream_to_client,
                "closed"
            ),
            Err(ConnectionError::Header(HeaderError::Timeout {
                timeout,
                received: 0,
            })) => debug!(
                %peer,
                "no PROXY header and no data within {timeout:?}: if the balancer sends the \
                 header only with the client's first bytes (AWS NLB does), protocols where the \
                 server speaks first (SSH, SMTP) cannot work through it"
            ),
            Err(ConnectionError::Refused(refusal)) => {
                if let Some(suppressed) = self.refusal_log.check() {
                    warn!(%peer, %refusal, suppressed, "PROXY header refused by the source/destination policy");
                }
            }
            Err(e) => {
                debug!(%peer, side = %e.side(), error = %error_chain(&e), "connection failed");
            }
        }
    }

    fn count(&self, result: &Result<Transferred, ConnectionError>) {
        let m = &self.metrics;
        match result {
            Ok(t) => {
                let datapath = self.forwarder.name().to_owned();
                for (direction, bytes) in [
                    ("to_backend", t.client_to_upstream),
                    ("to_client", t.upstream_to_client),
                ] {
                    m.tcp_forwarded_bytes
                        .get_or_create(&vec![
                            ("datapath", datapath.clone()),
                            ("direction", direction.to_owned()),
                        ])
                        .inc_by(bytes);
                }
            }
            Err(ConnectionError::Header(e)) => {
                m.tcp_rejected
                    .get_or_create(&vec![("reason", "header".to_owned())])
                    .inc();
                m.tcp_header_errors
                    .get_or_create(&vec![("kind", e.label().to_owned())])
                    .inc();
            }
            Err(ConnectionError::Refused(refusal)) => {
                m.tcp_rejected
                    .get_or_create(&vec![("reason", "policy".to_owned())])
                    .inc();
                m.tcp_policy_refusals
                    .get_or_create(&vec![("reason", refusal.label().to_owned())])
                    .inc();
            }
            Err(ConnectionError::SourceLimit { .. }) => {
                m.tcp_rejected
                    .get_or_create(&vec![("reason", "source_limit".to_owned())])
                    .inc();
            }
            Err(ConnectionError::Upstream(e)) => {
                m.tcp_rejected
                    .get_or_create(&vec![("reason", "upstream".to_owned())])
                    .inc();
                m.upstream_error(e.label(), e.errno());
            }
            Err(ConnectionError::Forward(_)) => {}
        }
    }

    async fn proxy(
        &self,
        client: TcpStream,
        peer: SocketAddr,
    ) -> Result<Transferred, ConnectionError> {
        upstream::tune_stream(&client);
        // A bug that panics in here must not close the client cleanly.
        let mut reset_on_panic = ResetOnPanic::new(&[client.as_raw_fd()]);
        let (slot, _) = self.header_gate.enter();
        let (action, mut buf, consumed) =
            read_header(&client, self.config.header_timeout, &slot.evicted).await?;
        drop(slot);
        let route = self.config.policy.route(action, peer)?;
        let (backend, source) = (route.backend, route.source);
        let _ticket = match source {
            Some(client) => Some(self.sources.admit(client.ip()).ok_or(
                ConnectionError::SourceLimit {
                    client: client.ip(),
                    limit: self.config.max_conns_per_source,
                },
            )?),
            None => None,
        };
        trace!(%peer, ?action, %backend, "header read");
        let upstream = match upstream::connect(backend, source, &self.upstream).await {
            Ok(up) => up,
            Err(e) => {
                if matches!(e, UpstreamError::Connect { .. }) {
                    // The backend refused: let the client see a refusal too.
                    forward::reset_on_close(&client);
                }
                return Err(e.into());
            }
        };
        reset_on_panic.add(upstream.stream.as_raw_fd());
        if upstream.fell_back {
            debug!(%peer, ?source, local = %upstream.local, "client port in use upstream; used an ephemeral port");
        }
        let early_data = buf.split_off(consumed).freeze();
        let conn = Connection {
            client,
            upstream: upstream.stream,
            early_data,
            header_len: consumed,
        };
        // The forwarder's own guard covers the sockets from here on.
        reset_on_panic.disarm();
        Ok(self
            .forwarder
            .forward_until(conn, &self.abort, self.config.idle_timeout)
            .await?)
    }
}

/// Reads until the buffer holds a complete header, under one deadline for
/// the whole header (so a slow-drip client cannot extend it). Returns the
/// action, the buffer, and the header's length; bytes after it are payload.
pub async fn read_header(
    client: &TcpStream,
    timeout: Duration,
    evicted: &CancellationToken,
) -> Result<(Action, BytesMut, usize), HeaderError> {
    let deadline = Instant::now() + timeout;
    let mut buf = BytesMut::with_capacity(HEADER_READ_BYTES);
    loop {
        match proxy_protocol::parse(&buf)? {
            Status::Complete(header, consumed) => {
                let action = header.action(Transport::Stream)?;
                return Ok((action, buf, consumed));
            }
            Status::Incomplete => {}
        }
        // The parser never asks for more than MAX_HEADER_LEN bytes.
        debug_assert!(buf.len() < MAX_HEADER_LEN);
        buf.reserve(HEADER_READ_BYTES);
        let read = tokio::select! {
            read = tokio::time::timeout_at(deadline, read_some(client, &mut buf)) => read,
            () = evicted.cancelled() => {
                return Err(HeaderError::Evicted { received: buf.len() });
            }
        };
        match read {
            Err(_) => {
                return Err(HeaderError::Timeout {
                    timeout,
                    received: buf.len(),
                });
            }
            Ok(Err(e)) => return Err(HeaderError::Io(e)),
            Ok(Ok(0)) => {
                return Err(HeaderError::Closed {
                    received: buf.len(),
                });
            }
            Ok(Ok(_)) => {}
        }
    }
}

async fn read_some(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => return other,
        }
    }
}
