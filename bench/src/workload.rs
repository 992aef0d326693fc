//! The workloads. Each sets up its connections first, then measures a
//! fixed window, and reports what crossed the target inside it.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use hdrhistogram::Histogram;
use mmproxy::proxy_protocol::{Transport, V2Builder, encode_v1};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    time::Instant,
};

use crate::backend::SinkCounter;

/// The PROXY header each connection or datagram starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum HeaderKind {
    None,
    V1,
    V2,
}

/// What every workload is given.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub(crate) target: SocketAddr,
    pub(crate) header: HeaderKind,
    pub(crate) duration: Duration,
}

/// `key value` pairs; `bytes` (moved through the target, both ways) and
/// `seconds` are always present.
pub(crate) type Report = Vec<(&'static str, f64)>;

/// The client a connection's header names. Distinct for every `n` up to
/// millions, so that no two spoofed upstream sockets share a 4-tuple.
fn client_for(n: u64) -> SocketAddr {
    let host = u32::try_from(1 + n / 60_000).unwrap_or(u32::MAX) & 0x00ff_ffff;
    let port = u16::try_from(1024 + n % 60_000).unwrap_or(1024);
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | host)), port)
}

fn header(
    kind: HeaderKind,
    client: SocketAddr,
    target: SocketAddr,
    transport: Transport,
) -> Vec<u8> {
    match kind {
        HeaderKind::None => Vec::new(),
        HeaderKind::V1 => {
            let mut out = Vec::new();
            encode_v1(Some((client, target)), &mut out).expect("v1 encodes IPv4");
            out
        }
        HeaderKind::V2 => V2Builder::proxy(transport, client, target)
            .build()
            .expect("v2 encodes"),
    }
}

async fn connect(load: &Load, client: SocketAddr) -> Result<TcpStream> {
    let mut s = TcpStream::connect(load.target)
        .await
        .with_context(|| format!("cannot connect to {}", load.target))?;
    s.set_nodelay(true)?;
    let h = header(load.header, client, load.target, Transport::Stream);
    s.write_all(&h).await?;
    Ok(s)
}

fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

/// Writes `chunk` into `stream` without pause and reads what comes back,
/// counting bytes sent in `up` and received in `down`.
fn spawn_flood(
    tasks: &mut tokio::task::JoinSet<()>,
    stream: TcpStream,
    chunk: &Arc<[u8]>,
    (up, down): (&Arc<AtomicU64>, &Arc<AtomicU64>),
) {
    let (mut r, mut w) = stream.into_split();
    let (chunk, up, down) = (chunk.clone(), up.clone(), down.clone());
    tasks.spawn(async move {
        while w.write_all(&chunk).await.is_ok() {
            up.fetch_add(chunk.len() as u64, Relaxed);
        }
    });
    tasks.spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok(n @ 1..) = r.read(&mut buf).await {
            down.fetch_add(n as u64, Relaxed);
        }
    });
}

/// Connections writing `PING\r\n` without pause and reading the echo.
pub(crate) async fn flood(load: &Load, connections: u16) -> Result<Report> {
    const MESSAGE: &[u8] = b"PING\r\n";
    let chunk: Arc<[u8]> = MESSAGE.repeat(65_536 / MESSAGE.len()).into();
    let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut streams = Vec::new();
    for i in 0..connections {
        let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 10_000 + i);
        streams.push(connect(load, client).await?);
    }
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    for stream in streams {
        spawn_flood(&mut tasks, stream, &chunk, (&up, &down));
    }
    tokio::time::sleep(load.duration).await;
    let (sent, received, elapsed) = (up.load(Relaxed), down.load(Relaxed), start.elapsed());
    tasks.abort_all();
    let msg = MESSAGE.len() as u64;
    Ok(vec![
        ("seconds", elapsed.as_secs_f64()),
        ("bytes", (sent + received) as f64),
        ("up_mbit_s", rate(sent * 8, elapsed) / 1e6),
        ("down_mbit_s", rate(received * 8, elapsed) / 1e6),
        ("up_msgs_s", rate(sent / msg, elapsed)),
        ("down_msgs_s", rate(received / msg, elapsed)),
    ])
}

/// One connection writing into a sink; counted where it arrives.
pub(crate) async fn bulk(load: &Load, sink: &SinkCounter) -> Result<Report> {
    let stream = connect(load, client_for(0)).await?;
    let chunk = vec![0x5au8; 256 * 1024];
    let writer = tokio::spawn(async move {
        let mut stream = stream;
        while stream.write_all(&chunk).await.is_ok() {}
    });
    // Let the connection reach steady state before the window opens.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (before, start) = (sink.bytes(), Instant::now());
    tokio::time::sleep(load.duration).await;
    let (moved, elapsed) = (sink.bytes() - before, start.elapsed());
    writer.abort();
    Ok(vec![
        ("seconds", elapsed.as_secs_f64()),
        ("bytes", moved as f64),
        ("gbit_s", rate(moved * 8, elapsed) / 1e9),
    ])
}

/// Each connection sends a message and waits for its echo, in a loop.
pub(crate) async fn request_response(load: &Load, connections: u16, size: usize) -> Result<Report> {
    let mut streams = Vec::new();
    for i in 0..connections {
        streams.push(connect(load, client_for(u64::from(i))).await?);
    }
    let deadline = Instant::now() + load.duration;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut stream in streams {
        tasks.spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("3 significant digits");
            let (msg, mut buf) = (vec![0x42u8; size], vec![0u8; size]);
            while Instant::now() < deadline {
                let t = Instant::now();
                stream.write_all(&msg).await?;
                stream.read_exact(&mut buf).await?;
                hist.record(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX))?;
            }
            anyhow::Ok(hist)
        });
    }
    let mut all = Histogram::<u64>::new(3).expect("3 significant digits");
    while let Some(done) = tasks.join_next().await {
        all.add(done??)?;
    }
    let elapsed = start.elapsed();
    let us = |q: f64| all.value_at_quantile(q) as f64 / 1e3;
    Ok(vec![
        ("seconds", elapsed.as_secs_f64()),
        ("bytes", (all.len() * size as u64 * 2) as f64),
        ("requests_s", rate(all.len(), elapsed)),
        ("p50_us", us(0.5)),
        ("p99_us", us(0.99)),
        ("p999_us", us(0.999)),
    ])
}

/// Interactive connections doing 64 B request/response while flood
/// connections write and read 64 KiB chunks full duplex, all through the
/// target to one echo backend. The interactive clients are plain threads
/// with blocking sockets: on the generator's runtime they would queue
/// behind its own flood tasks and measure the generator, not the target.
pub(crate) async fn mixed(load: &Load, interactive: u16, floods: u16) -> Result<Report> {
    const SIZE: usize = 64;
    let chunk: Arc<[u8]> = vec![0x5au8; 65_536].into();
    let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut flood_tasks = tokio::task::JoinSet::new();
    for i in 0..floods {
        let stream = connect(load, client_for(u64::from(i))).await?;
        spawn_flood(&mut flood_tasks, stream, &chunk, (&up, &down));
    }
    let mut interactive_streams = Vec::new();
    for i in 0..interactive {
        let stream = connect(load, client_for(u64::from(floods + i))).await?;
        interactive_streams.push(stream.into_std()?);
    }
    // Let the floods reach steady state before the window opens.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (up_before, down_before) = (up.load(Relaxed), down.load(Relaxed));
    let start = std::time::Instant::now();
    let deadline = start + load.duration;
    let clients: Vec<_> = interactive_streams
        .into_iter()
        .map(|stream| {
            std::thread::spawn(move || -> Result<Histogram<u64>> {
                use std::io::{Read as _, Write as _};
                let mut stream = stream;
                stream.set_nonblocking(false)?;
                let mut hist = Histogram::<u64>::new(3).expect("3 significant digits");
                let (msg, mut buf) = ([0x42u8; SIZE], [0u8; SIZE]);
                while std::time::Instant::now() < deadline {
                    let t = std::time::Instant::now();
                    stream.write_all(&msg)?;
                    stream.read_exact(&mut buf)?;
                    hist.record(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX))?;
                }
                Ok(hist)
            })
        })
        .collect();
    let mut all = Histogram::<u64>::new(3).expect("3 significant digits");
    for client in clients {
        let hist = tokio::task::spawn_blocking(move || client.join())
            .await?
            .map_err(|_| anyhow::anyhow!("an interactive client panicked"))??;
        all.add(hist)?;
    }
    let elapsed = start.elapsed();
    let (sent, received) = (
        up.load(Relaxed) - up_before,
        down.load(Relaxed) - down_before,
    );
    flood_tasks.abort_all();
    let us = |q: f64| all.value_at_quantile(q) as f64 / 1e3;
    Ok(vec![
        ("seconds", elapsed.as_secs_f64()),
        (
            "bytes",
            (sent + received + all.len() * SIZE as u64 * 2) as f64,
        ),
        ("requests_s", rate(all.len(), elapsed)),
        ("p50_us", us(0.5)),
        ("p99_us", us(0.99)),
        ("p999_us", us(0.999)),
        ("flood_down_mbit_s", rate(received * 8, elapsed) / 1e6),
        ("flood_up_mbit_s", rate(sent * 8, elapsed) / 1e6),
    ])
}

/// Workers that each connect, send a header and 64 bytes, read the echo
/// and close, over and over.
pub(crate) async fn connections_per_second(load: &Load, concurrency: u16) -> Result<Report> {
    let next = Arc::new(AtomicU64::new(0));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let deadline = Instant::now() + load.duration;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (next, done, failed, load) = (next.clone(), done.clone(), failed.clone(), *load);
        tasks.spawn(async move {
            let mut buf = [0u8; 64];
            while Instant::now() < deadline {
                let client = client_for(next.fetch_add(1, Relaxed));
                let attempt = async {
                    let mut s = connect(&load, client).await?;
                    s.write_all(&[0x17; 64]).await?;
                    s.read_exact(&mut buf).await?;
                    anyhow::Ok(())
                };
                match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                    Ok(Ok(())) => done.fetch_add(1, Relaxed),
                    _ => failed.fetch_add(1, Relaxed),
                };
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    let (ok, errors) = (done.load(Relaxed), failed.load(Relaxed));
    Ok(vec![
        ("seconds", elapsed.as_secs_f64()),
        ("bytes", (ok * 128) as f64),
        ("connections_s", rate(ok, elapsed)),
        ("errors", errors as f64),
    ])
}

/// UDP flows keeping `window` datagrams in flight through an echo; a
/// flow that hears nothing for 20 ms assumes its window lost and sends a
/// fresh one.
pub(crate) async fn udp(load: &Load, flows: u16, size: usize, window: u16) -> Result<Report> {
    let (replies, reprimes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let deadline = Instant::now() + load.duration;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for flow in 0..flows {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        socket.connect(load.target).await?;
        let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 20_000 + flow);
        let mut datagram = header(load.header, client, load.target, Transport::Datagram);
        datagram.extend(std::iter::repeat_n(0x33u8, size));
        let (replies, reprimes) = (replies.clone(), reprimes.clone());
        tasks.spawn(async move {
            let mut buf = vec![0u8; 65_536];
            let prime = async |socket: &UdpSocket| {
                for _ in 0..window {
                    let _ = socket.send(&datagram).await;
                }
            };
            prime(&socket).await;
            while Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_millis(20), socket.recv(&mut buf)).await {
                    Ok(Ok(n)) if n == size => {
                        replies.fetch_add(1, Relaxed);
                        let _ = socket.send(&datagram).await;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        reprimes.fetch_add(1, Relaxed);
                        prime(&socket).await;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    let count = replies.load(Relaxed);
    Ok(vec![
        ("seconds", elapsed.as_secs_f64()),
        ("bytes", (count * size as u64 * 2) as f64),
        ("round_trips_s", rate(count, elapsed)),
        ("window_losses", reprimes.load(Relaxed) as f64),
    ])
}
