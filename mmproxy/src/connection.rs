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
    limits::{EvictingGate, SourceCounter},
    memory::HeapReclaimer,
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
    pub header_gate: Arc<EvictingGate>,
    /// `--max-conns-per-source`.
    pub sources: Arc<SourceCounter>,
    /// Hears of each connection count, to trim the heap after a burst.
    pub reclaimer: Arc<HeapReclaimer>,
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
        let open = self.metrics.tcp_active.inc() + 1;
        self.reclaimer
            .note_open(usize::try_from(open).unwrap_or_default());
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
                m.rejected("header");
                m.tcp_header_errors
                    .get_or_create(&vec![("kind", e.label().to_owned())])
                    .inc();
            }
            Err(ConnectionError::Refused(refusal)) => {
                m.rejected("policy");
                m.tcp_policy_refusals
                    .get_or_create(&vec![("reason", refusal.label().to_owned())])
                    .inc();
            }
            Err(ConnectionError::SourceLimit { .. }) => {
                m.rejected("source_limit");
            }
            Err(ConnectionError::Upstream(e)) => {
                m.rejected("upstream");
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
        // NODELAY and keepalive: inherited from the listener (listener.rs).
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
            let local = upstream.stream.local_addr().ok();
            debug!(%peer, ?source, ?local, "client port in use upstream; used an ephemeral port");
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

/// The connection's life without root: LOCAL headers connect unspoofed,
/// so header handling, deadlines, eviction, connect errors, forwarding,
/// half-close and the drain reset run in-process on loopback, under
/// `cargo test` as any user. (Spoofing itself needs `IP_TRANSPARENT`:
/// tests/tcp.rs, in network namespaces.)
#[cfg(test)]
mod tests {
    use std::io::ErrorKind;

    use clap::Parser as _;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;
    use crate::{
        cli::Cli, forward::splice::SpliceForwarder, policy::REFUSAL_LOG_INTERVAL,
        proxy_protocol::V2Builder as Builder,
    };

    /// A connected pair: (the proxy's accepted end, the client's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (accepted, client)
    }

    fn local_header() -> Vec<u8> {
        Builder::local().build().unwrap()
    }

    fn proxy_to(backend: SocketAddr, extra: &[&str]) -> TcpProxy {
        let target = backend.to_string();
        let mut args = vec!["mmproxy", "-4", target.as_str(), "--header-timeout", "5"];
        args.extend_from_slice(extra);
        let config = Config::from_cli(&Cli::try_parse_from(args).unwrap()).unwrap();
        TcpProxy {
            upstream: config.upstream_options(),
            header_gate: EvictingGate::new(config.max_pending_headers as usize),
            sources: SourceCounter::new(config.max_conns_per_source),
            config: Arc::new(config),
            forwarder: Forwarder::Plain(SpliceForwarder::new()),
            metrics: Arc::default(),
            abort: CancellationToken::new(),
            refusal_log: LogLimiter::new(REFUSAL_LOG_INTERVAL),
            reclaimer: Arc::default(),
        }
    }

    /// An echo backend on loopback: its address.
    async fn echo_backend() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_header_in_pieces_is_read_and_what_follows_is_payload() {
        let (proxy_end, mut client) = pair().await;
        let header = local_header();
        let writer = tokio::spawn(async move {
            for piece in header.chunks(5) {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            client.write_all(b"payload").await.unwrap();
            client
        });
        let never = CancellationToken::new();
        let (action, buf, consumed) = read_header(&proxy_end, Duration::from_secs(5), &never)
            .await
            .unwrap();
        assert_eq!(action, Action::Direct);
        assert_eq!(consumed, local_header().len());
        drop(writer.await.unwrap());
        // The payload may or may not have arrived with the last piece.
        assert!(b"payload".starts_with(&buf[consumed..]));
    }

    #[tokio::test(start_paused = true)]
    async fn silence_hits_the_deadline_with_the_bytes_counted() {
        let (proxy_end, mut client) = pair().await;
        client.write_all(b"PROXY TCP4 ").await.unwrap();
        let never = CancellationToken::new();
        let err = read_header(&proxy_end, Duration::from_secs(5), &never)
            .await
            .unwrap_err();
        assert!(
            matches!(err, HeaderError::Timeout { received: 11, .. }),
            "{err:?}"
        );
        assert_eq!(err.label(), "timeout");
    }

    #[tokio::test]
    async fn garbage_an_early_close_and_an_eviction_end_the_wait() {
        let never = CancellationToken::new();
        let (proxy_end, mut client) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let err = read_header(&proxy_end, Duration::from_secs(5), &never)
            .await
            .unwrap_err();
        assert!(matches!(err, HeaderError::Invalid(_)), "{err:?}");

        let (proxy_end, mut client) = pair().await;
        client.write_all(b"PROXY").await.unwrap();
        drop(client);
        let err = read_header(&proxy_end, Duration::from_secs(5), &never)
            .await
            .unwrap_err();
        assert!(
            matches!(err, HeaderError::Closed { received: 5 }),
            "{err:?}"
        );

        let (proxy_end, _client) = pair().await;
        let evicted = CancellationToken::new();
        evicted.cancel();
        let err = read_header(&proxy_end, Duration::from_secs(5), &evicted)
            .await
            .unwrap_err();
        assert_eq!(err.label(), "evicted");
    }

    #[tokio::test]
    async fn a_local_connection_is_forwarded_half_closed_and_counted() {
        let proxy = proxy_to(echo_backend().await, &[]);
        let (proxy_end, mut client) = pair().await;
        let peer = client.local_addr().unwrap();
        let handled = tokio::spawn(async move {
            proxy.handle(proxy_end, peer).await;
            proxy
        });
        client.write_all(&local_header()).await.unwrap();
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        client.read_to_end(&mut echoed).await.unwrap();
        assert_eq!(echoed, b"hello");
        let proxy = handled.await.unwrap();
        let to_backend = proxy
            .metrics
            .tcp_forwarded_bytes
            .get_or_create(&vec![
                ("datapath", "plain".to_owned()),
                ("direction", "to_backend".to_owned()),
            ])
            .get();
        assert_eq!(to_backend, 5);
        assert_eq!(proxy.metrics.tcp_active.get(), 0);
    }

    #[tokio::test]
    async fn a_refusing_backend_resets_the_client_and_is_counted() {
        // A port that was free a moment ago: nothing listens there.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let proxy = proxy_to(closed, &[]);
        let (proxy_end, mut client) = pair().await;
        client.write_all(&local_header()).await.unwrap();
        proxy.handle(proxy_end, client.local_addr().unwrap()).await;
        let mut buf = [0u8; 8];
        let end = client.read(&mut buf).await.map_err(|e| e.kind());
        assert_eq!(end, Err(ErrorKind::ConnectionReset));
        let refused = proxy
            .metrics
            .tcp_rejected
            .get_or_create(&vec![("reason", "upstream".to_owned())])
            .get();
        assert_eq!(refused, 1);
    }

    #[tokio::test]
    async fn the_drain_timeout_resets_a_connection_still_open() {
        let proxy = Arc::new(proxy_to(echo_backend().await, &[]));
        let (proxy_end, mut client) = pair().await;
        let peer = client.local_addr().unwrap();
        let running = proxy.clone();
        let handled = tokio::spawn(async move { running.handle(proxy_end, peer).await });
        client.write_all(&local_header()).await.unwrap();
        client.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        client.read_exact(&mut one).await.unwrap();
        proxy.abort.cancel();
        handled.await.unwrap();
        let end = client.read(&mut one).await.map_err(|e| e.kind());
        assert_eq!(end, Err(ErrorKind::ConnectionReset));
    }

    #[tokio::test]
    async fn local_headers_are_refused_when_not_allowed() {
        let proxy = proxy_to(echo_backend().await, &["--allow-local", "false"]);
        let (proxy_end, mut client) = pair().await;
        client.write_all(&local_header()).await.unwrap();
        proxy.handle(proxy_end, client.local_addr().unwrap()).await;
        let mut buf = [0u8; 8];
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
        let refused = proxy
            .metrics
            .tcp_policy_refusals
            .get_or_create(&vec![("reason", "local".to_owned())])
            .get();
        assert_eq!(refused, 1);
    }
}
