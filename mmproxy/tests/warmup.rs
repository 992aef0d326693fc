//! ebpf mode's warm-up (`--ebpf-arm-after-ms`): a connection is copied in
//! userspace first and armed only if it outlives the warm-up. The contract
//! tests of tcp.rs and backlog.rs also run with it (`ebpf_warm_up::`);
//! these check what it is for: short connections are never armed, a long
//! one is armed in the middle of its transfer and still arrives whole, and
//! 0 arms at once.

#[macro_use]
mod support;

use std::net::SocketAddr;

use support::{
    Backend, BackendKind, Daemon, Netns, connect_with_header, echo_verified, header, netns_or_skip,
    round_trip, sa,
};

const PROXY: &str = "127.0.0.1:8443";
const BACKEND: &str = "127.0.0.1:9000";
const METRICS: &str = "127.0.0.1:9100";
const ARMED: &str = "mmproxy_ebpf_connections_armed_total";

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
    let body = support::wait_for_metrics(
        sa(METRICS),
        &[
            ("mmproxy_tcp_connections_accepted_total", u64::from(count)),
            ("mmproxy_tcp_connections_active", 0),
        ],
    )
    .await;
    support::metric(&body, ARMED)
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

/// A 64 MiB full-duplex echo outlives a 20 ms warm-up by far: it is armed
/// while both directions are busy, and every byte arrives once, in order
/// (SHA-256 each way).
#[test]
fn long_full_duplex_echo_is_armed_mid_stream() {
    let extra = ["--ebpf-arm-after-ms", "20"];
    let Some(armed) = armed_connections("warmup_long", &extra, 2, 64 << 20) else {
        return;
    };
    assert_eq!(armed, 2, "long connections armed after the warm-up");
}
