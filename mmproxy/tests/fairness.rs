//! Fair scheduling under load (issue 15, item 1): a flood must not pin the
//! daemon's workers. While 50 TCP connections (or a UDP flood) run flat
//! out, a new connection is still accepted and answered promptly, and
//! SIGTERM still ends the daemon within the drain timeout.
//!
//! The latency bound is checked on the median of ten probes (each also
//! under a second): without yielding, a probe waits for as long as the
//! flood lasts, not for some milliseconds more.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use support::{
    Backend, BackendKind, Daemon, Netns, connect_with_header, header, netns_or_skip, round_trip, sa,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UdpSocket,
};

const PROXY4: &str = "127.0.0.1:8443";
const ECHO: &str = "127.0.0.1:9000";
const SINK: &str = "127.0.0.1:9001";
const DRAIN_SECS: u64 = 3;

fn start(ns: &Netns, protocol: &str, mode: &'static str) -> Daemon {
    Daemon::start(
        ns,
        &[
            "-l",
            PROXY4,
            "-p",
            protocol,
            "-4",
            ECHO,
            "--mode",
            mode,
            "--dynamic-destination",
            "--allowed-destinations",
            "127.0.0.1/32:9000,9001",
            "--drain-timeout",
            &DRAIN_SECS.to_string(),
        ],
    )
}

/// 50 clients, each writing 64 KiB blocks to the sink backend forever.
async fn tcp_flood() {
    for i in 0..50u16 {
        let client = sa(&format!("192.0.2.1:{}", 20_000 + i));
        let mut s = connect_with_header(sa(PROXY4), &header::v2(client, sa(SINK))).await;
        tokio::spawn(async move {
            let block = vec![0x5a_u8; 64 * 1024];
            while s.write_all(&block).await.is_ok() {}
        });
    }
}

/// 50 clients flooding full duplex through an echo backend of their own
/// (on the sink's address, so the probes' backend is not the one busy):
/// each writes 64 KiB blocks and reads back what it can, forever.
async fn echo_flood() {
    for i in 0..50u16 {
        let client = sa(&format!("192.0.2.3:{}", 20_000 + i));
        let s = connect_with_header(sa(PROXY4), &header::v2(client, sa(SINK))).await;
        let (mut rd, mut wr) = s.into_split();
        tokio::spawn(async move {
            let block = vec![0x5a_u8; 64 * 1024];
            while wr.write_all(&block).await.is_ok() {}
        });
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
        });
    }
}

/// Two senders blasting 1,200-byte datagrams (with their headers) at the
/// proxy, toward a backend socket nobody reads.
async fn udp_flood() -> UdpSocket {
    let backend = UdpSocket::bind(SINK).await.expect("bind the UDP sink");
    for i in 0..2u16 {
        let lb = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let client = sa(&format!("192.0.2.2:{}", 30_000 + i));
        let mut msg = header::v2_dgram(client, sa(SINK));
        msg.extend_from_slice(&[0xa5; 1200]);
        tokio::spawn(async move {
            loop {
                let _ = lb.send_to(&msg, sa(PROXY4)).await;
            }
        });
    }
    backend
}

/// Ten fresh connections, one after another: the median time from
/// `connect` to the echoed reply, and the slowest.
async fn probe_latency() -> (Duration, Duration) {
    let mut times = Vec::new();
    for i in 0..10u16 {
        let started = Instant::now();
        let client = sa(&format!("192.0.2.9:{}", 40_000 + i));
        let mut s = connect_with_header(sa(PROXY4), &header::v2(client, sa(ECHO))).await;
        assert_eq!(round_trip(&mut s, b"probe").await, b"probe");
        times.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    times.sort();
    (times[times.len() / 2], times[times.len() - 1])
}

/// Which flood runs beside the probes.
#[derive(Clone, Copy)]
enum Flood {
    /// 50 TCP connections writing to a sink.
    TcpToSink,
    /// 50 TCP connections echoing full duplex.
    TcpEcho,
    /// Two UDP senders.
    Udp,
}

fn flood_then_probe_then_sigterm(test: &str, protocol: &str, flood: Flood, mode: &'static str) {
    let Some(ns) = netns_or_skip(test) else {
        return;
    };
    let mut d = start(&ns, protocol, mode);
    let (tx, rx) = std::sync::mpsc::channel();
    // The flood and its sink run on their own runtime, so the probes
    // below measure the daemon, not the test's own scheduling.
    let flood = ns.spawn(async move {
        let sink_kind = match flood {
            Flood::TcpEcho => BackendKind::Echo,
            Flood::TcpToSink | Flood::Udp => BackendKind::Sink {
                slow_for: Duration::ZERO,
            },
        };
        let _sink = Backend::start(SINK, sink_kind).await;
        let _udp_sink = match flood {
            Flood::Udp => Some(udp_flood().await),
            Flood::TcpToSink => {
                tcp_flood().await;
                None
            }
            Flood::TcpEcho => {
                echo_flood().await;
                None
            }
        };
        tx.send(()).unwrap();
        std::future::pending::<()>().await;
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the flood started");
    let (median, slowest) = ns.run(async {
        let _echo = Backend::start(ECHO, BackendKind::Echo).await;
        // Let the flood reach full speed before probing.
        tokio::time::sleep(Duration::from_secs(1)).await;
        probe_latency().await
    });
    eprintln!("{test}: probe median {median:?}, slowest {slowest:?}");
    assert!(
        median < Duration::from_millis(100),
        "median probe {median:?} (slowest {slowest:?}) under the flood"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "slowest probe {slowest:?}"
    );
    let asked = Instant::now();
    d.signal(rustix::process::Signal::TERM);
    let code = d.wait_exit(Duration::from_secs(DRAIN_SECS + 5));
    let took = asked.elapsed();
    drop(flood);
    assert_eq!(code, Some(0), "exit after SIGTERM under the flood");
    assert!(
        took < Duration::from_secs(DRAIN_SECS + 2),
        "SIGTERM took {took:?} with a {DRAIN_SECS} s drain timeout"
    );
}

// ebpf mode with its default warm-up: a saturated connection is never
// quiet long enough to be armed, so the 50 flooding connections stay in
// the warm-up's userspace loop, which must yield its worker as plain
// mode's splice loop does.
both_modes!(
    a_tcp_flood_does_not_starve_new_connections_or_sigterm,
    a_full_duplex_flood_does_not_starve_new_connections_or_sigterm,
    a_udp_flood_does_not_starve_new_connections_or_sigterm,
);

fn a_tcp_flood_does_not_starve_new_connections_or_sigterm(mode: &'static str) {
    flood_then_probe_then_sigterm(
        "a_tcp_flood_does_not_starve_new_connections_or_sigterm",
        "tcp",
        Flood::TcpToSink,
        mode,
    );
}

fn a_full_duplex_flood_does_not_starve_new_connections_or_sigterm(mode: &'static str) {
    flood_then_probe_then_sigterm(
        "a_full_duplex_flood_does_not_starve_new_connections",
        "tcp",
        Flood::TcpEcho,
        mode,
    );
}

fn a_udp_flood_does_not_starve_new_connections_or_sigterm(mode: &'static str) {
    flood_then_probe_then_sigterm(
        "a_udp_flood_does_not_starve_new_connections_or_sigterm",
        "tcp,udp",
        Flood::Udp,
        mode,
    );
}
