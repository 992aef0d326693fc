//! ebpf mode's warm-up (`--ebpf-arm-after-ms`): a connection is copied in
//! userspace first and armed only if it outlives the warm-up. The contract
//! tests of tcp.rs and backlog.rs also run with it (`ebpf_warm_up::`);
//! these check what it is for: short connections are never armed, a long
//! light one is armed after it, a bulk one stays in userspace
//! (`--ebpf-bulk-mbit`) unless told otherwise, then is armed in the middle
//! of its transfer and still arrives whole, and 0 arms at once.

#[macro_use]
mod support;

use std::{net::SocketAddr, time::Duration};

use support::{
    Backend, BackendKind, Daemon, Netns, connect_with_header, echo_verified, header, netns_or_skip,
    round_trip, sa,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const PROXY: &str = "127.0.0.1:8443";
const BACKEND: &str = "127.0.0.1:9000";
const METRICS: &str = "127.0.0.1:9100";
const ARMED: &str = "mmproxy_ebpf_connections_armed_total";
const KEPT_BULK: &str = "mmproxy_ebpf_connections_kept_bulk_total";

/// ebpf mode with the default warm-up, `extra` flags and metrics.
fn start(ns: &Netns, extra: &[&str]) -> Daemon {
    let mut args = vec!["-l", PROXY, "-4", BACKEND, "--metrics-addr", METRICS];
    args.extend(support::mode_args("ebpf-warm-up"));
    args.extend_from_slice(extra);
    Daemon::start(ns, &args)
}

/// A daemon started with `extra` flags in a namespace of its own carries
/// `count` echoes of `bytes` each (see [`echoes_then_armed`]); returns the
/// connections it armed, or `None` when the test is skipped.
fn armed_connections(test: &str, extra: &[&str], count: u16, bytes: u64) -> Option<u64> {
    let ns = netns_or_skip(test)?;
    let _d = start(&ns, extra);
    Some(ns.run(echoes_then_armed(count, bytes)))
}

/// `count` connections one after the other, each echoing `bytes` (header,
/// data, FIN, echo, FIN). Panics on a wrong echo; then waits until the
/// daemon has closed them all, and returns the connections it armed.
async fn echoes_then_armed(count: u16, bytes: u64) -> u64 {
    let _backend = Backend::start(BACKEND, BackendKind::Echo).await;
    for i in 0..count {
        let client = SocketAddr::from(([192, 0, 2, 1], 40000 + i));
        let outcome = echo_verified(sa(PROXY), client, bytes).await;
        assert!(
            outcome.is_complete(bytes),
            "connection {i}: {outcome:?} for {bytes} bytes"
        );
    }
    support::metric(&metrics_once_closed(count).await, ARMED)
}

/// The metrics page once `count` connections were accepted and all closed.
async fn metrics_once_closed(count: u16) -> String {
    support::wait_for_metrics(
        sa(METRICS),
        &[
            ("mmproxy_tcp_connections_accepted_total", u64::from(count)),
            ("mmproxy_tcp_connections_active", 0),
        ],
    )
    .await
}

/// 4 MiB blocks each pause the sender for this long: both directions
/// drain (the reader never pauses), so a warm-up ends there, in the middle
/// of the transfer. (`support::echo_verified` hashes its whole stream
/// before sending a byte, so a short warm-up ends before its payload.)
const SENDER_PAUSE: Duration = Duration::from_millis(20);

/// A full-duplex echo of `blocks` 4 MiB blocks through the proxy, the
/// sender pausing after each; panics unless exactly what was sent comes
/// back, in order.
async fn paused_echo(client: SocketAddr, blocks: u32) {
    // Made before connecting: a connection silent through its warm-up
    // would be armed before its payload, which is not what is tested.
    let block = support::pattern_chunk(client.port().into(), 4 << 20);
    let expected = block.clone();
    let s = connect_with_header(sa(PROXY), &header::v2(client, sa(PROXY))).await;
    let (mut reader, mut writer) = s.into_split();
    let sender = tokio::spawn(async move {
        for _ in 0..blocks {
            writer.write_all(&block).await.unwrap();
            tokio::time::sleep(SENDER_PAUSE).await;
        }
        writer.shutdown().await.unwrap();
    });
    let mut buf = vec![0_u8; 1 << 20];
    let mut received = 0_usize;
    loop {
        let n = reader.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        for (i, byte) in buf[..n].iter().enumerate() {
            let at = received + i;
            assert_eq!(
                *byte,
                expected[at % expected.len()],
                "echo differs at byte {at}"
            );
        }
        received += n;
    }
    assert_eq!(received, blocks as usize * expected.len(), "echo length");
    sender.await.unwrap();
}

/// Two 64 MiB paused echoes (one after the other), then the metrics page.
async fn paused_echoes_then_metrics() -> String {
    let _backend = Backend::start(BACKEND, BackendKind::Echo).await;
    for i in 0..2 {
        paused_echo(SocketAddr::from(([192, 0, 2, 1], 40200 + i)), 16).await;
    }
    metrics_once_closed(2).await
}

/// The default warm-up (100 ms) outlasts a 4 KiB exchange on loopback:
/// none of them touches the BPF maps.
#[test]
fn short_exchanges_are_not_armed() {
    let Some(armed) = armed_connections("warmup_short", &[], 20, 4096) else {
        return;
    };
    assert_eq!(armed, 0, "short connections armed");
}

/// Opens 20 connections, each with one 4 KiB round trip, and keeps them
/// open; then waits (up to 5 s) until the metrics show `armed` of them
/// armed while all 20 are still active, or panics with the metrics.
async fn held_open_then_armed(armed: u64) {
    let _backend = Backend::start(BACKEND, BackendKind::Echo).await;
    let mut open = Vec::new();
    for i in 0..20u16 {
        let client = SocketAddr::from(([192, 0, 2, 1], 40100 + i));
        let mut s = connect_with_header(sa(PROXY), &header::v2(client, sa(PROXY))).await;
        let message = vec![b'x'; 4096];
        assert_eq!(
            round_trip(&mut s, &message).await,
            message,
            "connection {i}"
        );
        open.push(s);
    }
    support::wait_for_metrics(
        sa(METRICS),
        &[("mmproxy_tcp_connections_active", 20), (ARMED, armed)],
    )
    .await;
}

/// With `--ebpf-arm-after-ms 0` every connection is armed as soon as it
/// is idle, as before the warm-up existed. The clients keep their
/// connections open: one whose FIN reaches the daemon before it arms is
/// forwarded in userspace instead (the kernel takes only ESTABLISHED
/// sockets), which made 2 of 20 half-closing echoes unarmed in a CI run.
#[test]
fn arm_after_zero_arms_every_connection() {
    let Some(ns) = netns_or_skip("warmup_zero") else {
        return;
    };
    let _d = start(&ns, &["--ebpf-arm-after-ms", "0"]);
    ns.run(held_open_then_armed(20));
}

/// The control for the test above: the same open, idle connections are
/// not armed while the warm-up (60 s here) lasts.
#[test]
fn idle_connections_wait_for_the_warm_up() {
    let Some(ns) = netns_or_skip("warmup_idle") else {
        return;
    };
    let _d = start(&ns, &["--ebpf-arm-after-ms", "60000"]);
    ns.run(held_open_then_armed(0));
}

/// With the default warm-up, open connections that exchanged a few KiB
/// (far below `--ebpf-bulk-mbit`) are armed once it is over.
#[test]
fn light_connections_are_armed_after_the_warm_up() {
    let Some(ns) = netns_or_skip("warmup_light") else {
        return;
    };
    let _d = start(&ns, &[]);
    ns.run(held_open_then_armed(20));
}

/// A 64 MiB full-duplex echo moves gigabits a second through its warm-up:
/// it is never armed, counted as kept in userspace, and every byte arrives
/// once, in order. The bound is 10 Mbit/s here, not the default 200, so
/// that a loaded machine (CI runs tests in parallel) cannot slow the first
/// blocks under it.
#[test]
fn bulk_connections_stay_in_userspace() {
    let Some(ns) = netns_or_skip("warmup_bulk") else {
        return;
    };
    let _d = start(
        &ns,
        &["--ebpf-arm-after-ms", "20", "--ebpf-bulk-mbit", "10"],
    );
    let body = ns.run(paused_echoes_then_metrics());
    assert_eq!(support::metric(&body, ARMED), 0, "bulk connections armed");
    assert_eq!(
        support::metric(&body, KEPT_BULK),
        2,
        "bulk connections kept"
    );
}

/// The same with `--ebpf-bulk-mbit 0`: each echo is armed in the middle
/// of its transfer, and every byte still arrives once, in order.
#[test]
fn long_full_duplex_echo_is_armed_mid_stream() {
    let Some(ns) = netns_or_skip("warmup_long") else {
        return;
    };
    let _d = start(&ns, &["--ebpf-arm-after-ms", "20", "--ebpf-bulk-mbit", "0"]);
    let body = ns.run(paused_echoes_then_metrics());
    assert_eq!(support::metric(&body, ARMED), 2, "long connections armed");
    assert_eq!(support::metric(&body, KEPT_BULK), 0, "connections kept");
}
