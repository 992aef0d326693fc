//! The backends a workload runs against, in the load generator's own
//! process so that it can read their counters: TCP echo, TCP sink, UDP
//! echo. Each runs on the generator's runtime until the process exits.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
};

/// Bytes a sink has read, across all its connections.
#[derive(Debug, Default)]
pub(crate) struct SinkCounter(AtomicU64);

impl SinkCounter {
    pub(crate) fn bytes(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Echoes every TCP connection back to itself; half-closes on EOF.
pub(crate) fn tcp_echo(addr: SocketAddr) -> Result<()> {
    let listener = bind_tcp(addr)?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(echo(stream));
        }
    });
    Ok(())
}

async fn echo(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (mut r, mut w) = stream.into_split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// The same echo on a runtime of its own with `threads` workers, so that
/// a workload's own tasks (flood writers) do not delay the backend's
/// replies. Runs until the returned runtime is dropped.
pub(crate) fn tcp_echo_threaded(
    addr: SocketAddr,
    threads: usize,
) -> Result<tokio::runtime::Runtime> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("echo-backend")
        .enable_all()
        .build()?;
    let listener = {
        let _entered = runtime.enter();
        bind_tcp(addr)?
    };
    runtime.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(echo(stream));
        }
    });
    Ok(runtime)
}

/// Reads and discards every TCP connection, counting bytes.
pub(crate) fn tcp_sink(addr: SocketAddr) -> Result<Arc<SinkCounter>> {
    let listener = bind_tcp(addr)?;
    let counter = Arc::new(SinkCounter::default());
    let total = counter.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let total = total.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    total.0.fetch_add(n as u64, Relaxed);
                }
            });
        }
    });
    Ok(counter)
}

/// Echoes every UDP datagram to its sender.
pub(crate) async fn udp_echo(addr: SocketAddr) -> Result<()> {
    let socket = UdpSocket::bind(addr)
        .await
        .with_context(|| format!("cannot bind the UDP backend on {addr}"))?;
    socket2::SockRef::from(&socket).set_recv_buffer_size(8 << 20)?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            if let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(&buf[..n], from).await;
            }
        }
    });
    Ok(())
}

fn bind_tcp(addr: SocketAddr) -> Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("cannot bind the backend on {addr}"))?;
    Ok(socket.listen(4096)?)
}
