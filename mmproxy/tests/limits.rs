//! Limits a hostile or broken peer runs into (src/limits.rs): silent
//! connections in the header phase, too many connections from one
//! claimed client, and connections that go idle.

#[macro_use]
mod support;

use std::{
    io::ErrorKind,
    time::{Duration, Instant},
};

use support::{
    Backend, BackendKind, Daemon, Netns, connect_with_header, echo_verified, header, netns_or_skip,
    round_trip, sa, wait_for_metrics,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const PROXY: &str = "127.0.0.1:8443";
const BACKEND: &str = "127.0.0.1:9000";
const METRICS: &str = "127.0.0.1:9100";

fn start(ns: &Netns, mode: &'static str, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "-l",
        PROXY,
        "-4",
        BACKEND,
        "--mode",
        mode,
        "--metrics-addr",
        METRICS,
    ];
    args.extend_from_slice(extra);
    Daemon::start(ns, &args)
}

/// The test opens a thousand sockets of its own.
fn raise_nofile() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    setrlimit(Resource::Nofile, limit).expect("raise RLIMIT_NOFILE");
}

/// 1000 connections that never send a header, while 20 real clients each
/// echo 8 MiB: every real transfer completes byte for byte, the silent
/// ones are closed (evicted or at the header deadline), and the daemon's
/// memory comes back down once they are gone.
#[test]
fn silent_connections_do_not_crowd_out_real_ones() {
    let Some(ns) = netns_or_skip("silent_connections_do_not_crowd_out_real_ones") else {
        return;
    };
    raise_nofile();
    let d = start(
        &ns,
        "plain",
        &[
            "--max-pending-headers",
            "100",
            "--header-timeout",
            "3",
            // Fewer slots than silent connections: without the gate the
            // real clients would queue behind them.
            "--max-connections",
            "300",
        ],
    );
    let baseline = d.rss_kib();
    let pid_rss = move || d.rss_kib();
    let (peak, after) = ns.run(async move {
        let _backend = Backend::start(BACKEND, BackendKind::Echo).await;
        let mut silent = Vec::new();
        for _ in 0..1000 {
            silent.push(TcpStream::connect(PROXY).await.expect("connect"));
        }
        let real: Vec<_> = (0..20u16)
            .map(|i| {
                tokio::spawn(echo_verified(
                    sa(PROXY),
                    sa(&format!("192.0.2.1:{}", 30_000 + i)),
                    8 << 20,
                ))
            })
            .collect();
        let peak = pid_rss();
        for (i, transfer) in real.into_iter().enumerate() {
            let outcome = transfer.await.unwrap();
            assert!(outcome.is_complete(8 << 20), "real client {i}: {outcome:?}");
        }
        // Every silent connection ends by the header deadline (3 s after
        // it was accepted), most of them much sooner, by eviction.
        let deadline = Instant::now() + Duration::from_secs(10);
        for mut s in silent {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut buf = [0u8; 1];
            let end = tokio::time::timeout(left, s.read(&mut buf))
                .await
                .expect("every silent connection is closed within 10 s");
            assert!(
                matches!(end, Ok(0) | Err(_)),
                "a silent connection got data"
            );
        }
        let body = wait_for_metrics(sa(METRICS), &[("mmproxy_tcp_connections_active", 0)]).await;
        // 1000 silent plus 20 real through a gate of 100: at least 900
        // of the silent ones made way for newer connections.
        let evicted = support::metric(&body, "mmproxy_tcp_header_errors_total{kind=\"evicted\"}");
        assert!(evicted >= 900, "{evicted} evicted:\n{body}");
        (peak, pid_rss())
    });
    eprintln!("daemon RSS: {baseline} KiB at start, {peak} KiB under load, {after} KiB after");
    assert!(
        after <= baseline + baseline / 2 + 2048,
        "RSS {after} KiB after the load, {baseline} KiB before"
    );
}

#[test]
fn max_conns_per_source_closes_the_extra_ones() {
    let Some(ns) = netns_or_skip("max_conns_per_source_closes_the_extra_ones") else {
        return;
    };
    let _d = start(&ns, "plain", &["--max-conns-per-source", "2"]);
    ns.run(async {
        let _backend = Backend::start(BACKEND, BackendKind::Echo).await;
        let a = sa("192.0.2.1:41000");
        let open = |port: u16| async move {
            let client = sa(&format!("192.0.2.1:{port}"));
            connect_with_header(sa(PROXY), &header::v2(client, sa(PROXY))).await
        };
        let mut first = connect_with_header(sa(PROXY), &header::v2(a, sa(PROXY))).await;
        assert_eq!(round_trip(&mut first, b"1").await, b"1");
        let mut second = open(41001).await;
        assert_eq!(round_trip(&mut second, b"2").await, b"2");
        let mut third = open(41002).await;
        let mut buf = [0u8; 1];
        let _ = third.write_all(b"3").await;
        let end = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
            .await
            .expect("the third connection is closed");
        assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
        // Another client is not affected.
        let b = sa("192.0.2.2:41000");
        let mut other = connect_with_header(sa(PROXY), &header::v2(b, sa(PROXY))).await;
        assert_eq!(round_trip(&mut other, b"b").await, b"b");
        // A freed slot is usable again.
        drop(first);
        wait_for_metrics(sa(METRICS), &[("mmproxy_tcp_connections_active", 2)]).await;
        let mut again = open(41003).await;
        assert_eq!(round_trip(&mut again, b"4").await, b"4");
        wait_for_metrics(
            sa(METRICS),
            &[(
                "mmproxy_tcp_connections_rejected_total{reason=\"source_limit\"}",
                1,
            )],
        )
        .await;
    });
}

both_modes!(idle_connections_are_reset_and_busy_ones_kept);

fn idle_connections_are_reset_and_busy_ones_kept(mode: &'static str) {
    let Some(ns) = netns_or_skip("idle_connections_are_reset_and_busy_ones_kept") else {
        return;
    };
    let _d = start(&ns, mode, &["--idle-timeout", "1"]);
    ns.run(async {
        let _backend = Backend::start(BACKEND, BackendKind::Echo).await;
        let mut quiet =
            connect_with_header(sa(PROXY), &header::v2(sa("192.0.2.1:42000"), sa(PROXY))).await;
        assert_eq!(round_trip(&mut quiet, b"q").await, b"q");
        let mut busy =
            connect_with_header(sa(PROXY), &header::v2(sa("192.0.2.1:42001"), sa(PROXY))).await;
        let went_quiet = Instant::now();
        let mut buf = [0u8; 8];
        // The busy one talks every 200 ms for 3 s: three idle timeouts.
        let busy_task = tokio::spawn(async move {
            for _ in 0..15 {
                assert_eq!(round_trip(&mut busy, b"b").await, b"b");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let end = tokio::time::timeout(Duration::from_secs(5), quiet.read(&mut buf))
            .await
            .expect("the quiet connection is cut");
        let after = went_quiet.elapsed();
        assert_eq!(end.map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset));
        assert!(after >= Duration::from_millis(900), "cut after {after:?}");
        busy_task.await.expect("the busy connection stays up");
    });
}
