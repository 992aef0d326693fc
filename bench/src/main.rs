//! `mmproxy-bench`: one workload against one target, with its backend in
//! the same process, printing `key value` lines. `cargo xtask bench` runs
//! it inside its namespace once per subject, workload and repeat, and
//! does the accounting (CPU, memory, ratios, the report).

// Counts become f64 for reporting; they stay far below 2^52.
#![allow(clippy::cast_precision_loss)]

mod backend;
mod workload;

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, Subcommand};
use workload::HeaderKind;

#[derive(Debug, Parser)]
#[command(name = "mmproxy-bench")]
struct Cli {
    /// Where to send the load: the proxy, or the backend itself.
    #[arg(long, default_value = "127.0.0.1:8443")]
    target: SocketAddr,
    /// Where the backend listens (the proxy's -4 target).
    #[arg(long, default_value = "127.0.0.1:9000")]
    backend: SocketAddr,
    /// The PROXY header each connection or datagram starts with; `none`
    /// when the target is the backend itself.
    #[arg(long, value_enum, default_value = "v1")]
    header: HeaderKind,
    /// Seconds of load.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Debug, Subcommand)]
enum Workload {
    /// go-mmproxy's published shape: connections flooding `PING\r\n` at an
    /// echo backend; throughput each way.
    Flood {
        #[arg(long, default_value_t = 50)]
        connections: u16,
    },
    /// One connection writing as fast as it can into a sink.
    Bulk,
    /// Request/response with small messages; rate and latency.
    Rr {
        #[arg(long, default_value_t = 10)]
        connections: u16,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Interactive request/response connections beside full-duplex
    /// floods through the same target to the same echo backend: how long
    /// a small request waits behind bulk traffic.
    Mixed {
        /// Request/response connections (64 B each way).
        #[arg(long, default_value_t = 8)]
        interactive: u16,
        /// Connections writing and reading 64 KiB chunks without pause.
        #[arg(long, default_value_t = 8)]
        floods: u16,
    },
    /// New connections per second: header, 64 bytes, read the echo, close.
    Cps {
        #[arg(long, default_value_t = 16)]
        concurrency: u16,
    },
    /// UDP flows, each keeping a window of datagrams in flight through an
    /// echo backend; round trips per second.
    Udp {
        #[arg(long, default_value_t = 16)]
        flows: u16,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 16)]
        window: u16,
    },
}

/// Worker threads of the mixed workload's echo backend: enough that the
/// backend is not where a request waits on two cores.
const MIXED_BACKEND_THREADS: usize = 4;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let duration = Duration::from_secs_f64(cli.seconds);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The mixed workload's backend runs on a runtime of its own, started
    // (and later stopped) outside the generator's.
    let own_backend = match cli.workload {
        Workload::Mixed { .. } => Some(backend::tcp_echo_threaded(
            cli.backend,
            MIXED_BACKEND_THREADS,
        )?),
        _ => None,
    };
    let report = runtime.block_on(async {
        let load = workload::Load {
            target: cli.target,
            header: cli.header,
            duration,
        };
        match cli.workload {
            Workload::Flood { connections } => {
                backend::tcp_echo(cli.backend)?;
                workload::flood(&load, connections).await
            }
            Workload::Bulk => {
                let sink = backend::tcp_sink(cli.backend)?;
                workload::bulk(&load, &sink).await
            }
            Workload::Rr { connections, size } => {
                backend::tcp_echo(cli.backend)?;
                workload::request_response(&load, connections, size).await
            }
            Workload::Mixed {
                interactive,
                floods,
            } => workload::mixed(&load, interactive, floods).await,
            Workload::Cps { concurrency } => {
                backend::tcp_echo(cli.backend)?;
                workload::connections_per_second(&load, concurrency).await
            }
            Workload::Udp {
                flows,
                size,
                window,
            } => {
                backend::udp_echo(cli.backend).await?;
                workload::udp(&load, flows, size, window).await
            }
        }
    })?;
    for (key, value) in report {
        println!("{key} {value}");
    }
    // Backends and stragglers are abandoned with the runtime.
    runtime.shutdown_timeout(Duration::from_millis(100));
    if let Some(backend) = own_backend {
        backend.shutdown_timeout(Duration::from_millis(100));
    }
    Ok(())
}
