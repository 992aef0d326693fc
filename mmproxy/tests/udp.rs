//! The UDP proxy end to end: the daemon binary with `-p udp` in a network
//! namespace, a test "balancer" sending PROXY v2 DGRAM datagrams, an echo
//! backend recording the source of everything it receives.

mod support;

use std::{net::SocketAddr, time::Duration};

use support::{
    Backend, BackendKind, Daemon, Netns, connect_with_header, header, netns_or_skip, sa,
    udp::{UdpBackend, datagram, exchange, exit_counter, exit_map_count, recv_within},
};
use tokio::net::UdpSocket;

const PROXY4: &str = "127.0.0.1:8443";
const PROXY6: &str = "[::1]:8443";
const BACKEND4: &str = "127.0.0.1:9000";
const BACKEND6: &str = "[::1]:9000";

thread_local! {
    /// The data path the running test holds the daemon to: set by the
    /// wrappers `udp_in_both_modes!` declares, read by [`start`].
    static MODE: std::cell::Cell<&'static str> = const { std::cell::Cell::new("plain") };
}

/// Declares each test function once per data path, as `plain::$name`
/// (userspace) and `ebpf::$name` (the kernel path carries each session
/// after its first datagram): one contract, two data paths.
macro_rules! udp_in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod plain {
            $(#[test] fn $name() { super::in_mode("plain", super::$name) })*
        }
        mod ebpf {
            $(#[test] fn $name() { super::in_mode("ebpf", super::$name) })*
        }
    };
}

fn in_mode(mode: &'static str, test: fn()) {
    MODE.set(mode);
    test();
}

/// The `--mode` flags of the running test's data path.
fn mode_flags() -> [&'static str; 2] {
    ["--mode", MODE.get()]
}

fn start(ns: &Netns, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "-p",
        "udp",
        "-l",
        "[::]:8443",
        "-4",
        BACKEND4,
        "-6",
        BACKEND6,
        "-v",
        "1",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&mode_flags());
    Daemon::start(ns, &args)
}

/// Stops the daemon and returns its exit counters line.
fn exit_counters(mut d: Daemon) -> String {
    d.signal(rustix::process::Signal::TERM);
    let line = d.wait_for_log("udp counters at exit", Duration::from_secs(10));
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0), "clean exit");
    line
}

async fn balancer(bind: &str) -> UdpSocket {
    UdpSocket::bind(bind).await.expect("bind balancer socket")
}

fn round_trip(
    proxy: &'static str,
    backend: &'static str,
    client: &'static str,
    bind: &'static str,
) {
    let Some(ns) = netns_or_skip("round_trip") else {
        return;
    };
    let _d = start(&ns, &[]);
    ns.run(async move {
        let backend = UdpBackend::start(backend).await;
        let lb = balancer(bind).await;
        let msg = datagram(&header::v2_dgram(sa(client), sa(proxy)), b"ping");
        let (reply, from) = exchange(&lb, sa(proxy), &msg).await;
        assert_eq!(reply, b"ping", "the reply is the payload, header removed");
        assert_eq!(
            from,
            sa(proxy),
            "the reply comes from the address we sent to"
        );
        assert_eq!(
            backend.peers(),
            vec![sa(client)],
            "the backend sees the client"
        );
        assert_eq!(backend.seen()[0].payload, b"ping");
    });
}

fn round_trip_ipv4_client_is_spoofed() {
    round_trip(PROXY4, BACKEND4, "192.0.2.7:40001", "127.0.0.1:0");
}

fn round_trip_ipv6_client_is_spoofed() {
    round_trip(PROXY6, BACKEND6, "[2001:db8::7]:40002", "[::1]:0");
}

/// On a wildcard listener, a reply must leave from the address the
/// balancer sent to, not from the one the routing table prefers.
fn replies_leave_from_the_address_the_balancer_sent_to() {
    let Some(ns) = netns_or_skip("replies_leave_from_the_address_the_balancer_sent_to") else {
        return;
    };
    ns.ip(&["addr", "add", "198.51.100.7/32", "dev", "lo"]);
    ns.ip(&["addr", "add", "2001:db8:5::7/128", "dev", "lo", "nodad"]);
    let _d = start(&ns, &[]);
    ns.run(async {
        let _backend4 = UdpBackend::start(BACKEND4).await;
        let _backend6 = UdpBackend::start(BACKEND6).await;
        for (bind, proxy, client) in [
            ("127.0.0.1:0", "198.51.100.7:8443", "192.0.2.8:1000"),
            ("[::1]:0", "[2001:db8:5::7]:8443", "[2001:db8::8]:1000"),
        ] {
            let lb = balancer(bind).await;
            let msg = datagram(&header::v2_dgram(sa(client), sa(proxy)), b"where from");
            let (_, from) = exchange(&lb, sa(proxy), &msg).await;
            assert_eq!(from, sa(proxy));
        }
    });
}

fn two_clients_kept_apart(
    proxy: &'static str,
    backend: &'static str,
    bind: &'static str,
    a: &'static str,
    b: &'static str,
) {
    let Some(ns) = netns_or_skip("two_clients_behind_one_frontend_address_are_kept_apart") else {
        return;
    };
    let d = start(&ns, &[]);
    ns.run(async move {
        let backend = UdpBackend::start(backend).await;
        let lb = balancer(bind).await;
        for round in 0..3 {
            for (client, name) in [(a, "a"), (b, "b")] {
                let payload = format!("{name}{round}");
                let msg = datagram(&header::v2_dgram(sa(client), sa(proxy)), payload.as_bytes());
                let (reply, _) = exchange(&lb, sa(proxy), &msg).await;
                assert_eq!(reply, payload.as_bytes());
            }
        }
        for seen in backend.seen() {
            let expected = if seen.payload.starts_with(b"a") { a } else { b };
            assert_eq!(
                seen.from,
                sa(expected),
                "{:?}",
                String::from_utf8_lossy(&seen.payload)
            );
        }
        assert_eq!(backend.seen().len(), 6);
    });
    let line = exit_counters(d);
    assert_eq!(exit_counter(&line, "sessions_created"), 2, "{line}");
}

fn two_clients_behind_one_frontend_address_are_kept_apart_ipv4() {
    two_clients_kept_apart(
        PROXY4,
        BACKEND4,
        "127.0.0.1:0",
        "192.0.2.1:5000",
        "192.0.2.2:5000",
    );
}

fn two_clients_behind_one_frontend_address_are_kept_apart_ipv6() {
    two_clients_kept_apart(
        PROXY6,
        BACKEND6,
        "[::1]:0",
        "[2001:db8::1]:5000",
        "[2001:db8::1]:5001",
    );
}

fn first_datagram_mode(
    proxy: &'static str,
    backend: &'static str,
    bind: &'static str,
    client: &'static str,
) {
    let Some(ns) = netns_or_skip("first_datagram_mode") else {
        return;
    };
    let d = start(&ns, &["--udp-header", "first"]);
    ns.run(async move {
        let backend = UdpBackend::start(backend).await;
        let lb = balancer(bind).await;
        let first = datagram(&header::v2_dgram(sa(client), sa(proxy)), b"one");
        assert_eq!(exchange(&lb, sa(proxy), &first).await.0, b"one");
        for payload in [&b"two"[..], b"three"] {
            assert_eq!(exchange(&lb, sa(proxy), payload).await.0, payload);
        }
        let seen = backend.seen();
        assert_eq!(seen.len(), 3);
        assert!(seen.iter().all(|s| s.from == sa(client)), "{seen:?}");
        // Another balancer port with no header yet is unknown: dropped.
        let stranger = balancer(bind).await;
        stranger.send_to(b"who am i", sa(proxy)).await.unwrap();
        assert!(
            recv_within(&stranger, Duration::from_millis(300))
                .await
                .is_none()
        );
    });
    let line = exit_counters(d);
    assert_eq!(
        exit_map_count(&line, "header_errors", "missing"),
        1,
        "{line}"
    );
}

fn first_datagram_mode_maps_headerless_datagrams_ipv4() {
    first_datagram_mode(PROXY4, BACKEND4, "127.0.0.1:0", "192.0.2.9:7000");
}

fn first_datagram_mode_maps_headerless_datagrams_ipv6() {
    first_datagram_mode(PROXY6, BACKEND6, "[::1]:0", "[2001:db8::9]:7000");
}

fn every_mode_drops_headerless_datagrams() {
    let Some(ns) = netns_or_skip("every_mode_drops_headerless_datagrams") else {
        return;
    };
    let d = start(&ns, &[]);
    ns.run(async {
        let backend = UdpBackend::start(BACKEND4).await;
        let lb = balancer("127.0.0.1:0").await;
        let client = sa("192.0.2.9:7001");
        let first = datagram(&header::v2_dgram(client, sa(PROXY4)), b"one");
        exchange(&lb, sa(PROXY4), &first).await;
        lb.send_to(b"two", sa(PROXY4)).await.unwrap();
        assert!(recv_within(&lb, Duration::from_millis(300)).await.is_none());
        assert_eq!(backend.seen().len(), 1);
    });
    let line = exit_counters(d);
    assert_eq!(
        exit_map_count(&line, "header_errors", "missing"),
        1,
        "{line}"
    );
}

fn idle_sessions_expire_after_close_after() {
    let Some(ns) = netns_or_skip("idle_sessions_expire_after_close_after") else {
        return;
    };
    let d = start(&ns, &["--close-after", "1"]);
    ns.run(async {
        let backend = UdpBackend::start(BACKEND4).await;
        let lb = balancer("127.0.0.1:0").await;
        let msg = datagram(&header::v2_dgram(sa("192.0.2.3:3000"), sa(PROXY4)), b"x");
        exchange(&lb, sa(PROXY4), &msg).await;
        // Still open after half the timeout, with traffic in between.
        tokio::time::sleep(Duration::from_millis(600)).await;
        exchange(&lb, sa(PROXY4), &msg).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        exchange(&lb, sa(PROXY4), &msg).await;
        // Then idle: closed within the timeout plus one sweep.
        tokio::time::sleep(Duration::from_millis(1600)).await;
        exchange(&lb, sa(PROXY4), &msg).await;
        assert_eq!(backend.seen().len(), 4);
    });
    let line = exit_counters(d);
    assert_eq!(exit_counter(&line, "sessions_created"), 2, "{line}");
    assert_eq!(exit_counter(&line, "sessions_expired"), 1, "{line}");
}

fn session_cap_closes_the_least_recently_used() {
    let Some(ns) = netns_or_skip("session_cap_closes_the_least_recently_used") else {
        return;
    };
    let d = start(&ns, &["--max-udp-sessions", "2"]);
    ns.run(async {
        let backend = UdpBackend::start(BACKEND4).await;
        let lb = balancer("127.0.0.1:0").await;
        // A, B, C (A out), B (kept), A (C out, as B was used after it).
        for client in [
            "192.0.2.1:1",
            "192.0.2.2:2",
            "192.0.2.3:3",
            "192.0.2.2:2",
            "192.0.2.1:1",
        ] {
            let msg = datagram(&header::v2_dgram(sa(client), sa(PROXY4)), client.as_bytes());
            assert_eq!(exchange(&lb, sa(PROXY4), &msg).await.0, client.as_bytes());
        }
        assert_eq!(backend.seen().len(), 5);
    });
    let line = exit_counters(d);
    assert_eq!(exit_counter(&line, "sessions_created"), 4, "{line}");
    assert_eq!(exit_counter(&line, "sessions_evicted"), 2, "{line}");
}

/// go-mmproxy's black hole: after an ICMP port unreachable from the
/// backend, the session must keep working once the backend is back.
fn icmp_then_backend_back(
    proxy: &'static str,
    backend_addr: &'static str,
    bind: &'static str,
    client: &'static str,
) {
    let Some(ns) = netns_or_skip("icmp_port_unreachable_then_backend_back") else {
        return;
    };
    let d = start(&ns, &[]);
    ns.run(async move {
        let lb = balancer(bind).await;
        let msg = datagram(&header::v2_dgram(sa(client), sa(proxy)), b"anyone?");
        for _ in 0..3 {
            lb.send_to(&msg, sa(proxy)).await.unwrap();
            assert!(recv_within(&lb, Duration::from_millis(200)).await.is_none());
        }
        let backend = UdpBackend::start(backend_addr).await;
        assert_eq!(exchange(&lb, sa(proxy), &msg).await.0, b"anyone?");
        assert_eq!(backend.peers(), vec![sa(client)]);
    });
    let line = exit_counters(d);
    assert_eq!(exit_counter(&line, "sessions_created"), 1, "{line}");
    assert!(exit_counter(&line, "upstream_unreachable") >= 1, "{line}");
}

fn icmp_port_unreachable_then_backend_back_ipv4() {
    icmp_then_backend_back(PROXY4, BACKEND4, "127.0.0.1:0", "192.0.2.4:4000");
}

fn icmp_port_unreachable_then_backend_back_ipv6() {
    icmp_then_backend_back(PROXY6, BACKEND6, "[::1]:0", "[2001:db8::4]:4000");
}

const SESSIONS: u16 = 10_000;

fn ten_thousand_sessions() {
    let Some(ns) = netns_or_skip("ten_thousand_sessions") else {
        return;
    };
    // All from one client address: above the default per-client share.
    let d = start(&ns, &["--max-udp-sessions-per-client", "0"]);
    ns.run(async {
        let backend = UdpBackend::start(BACKEND4).await;
        let lb = balancer("127.0.0.1:0").await;
        let mut answered = vec![false; usize::from(SESSIONS)];
        // UDP may drop under a burst: resend the unanswered, a window at a
        // time, up to five rounds. Every session must answer in the end.
        for _round in 0..5 {
            let pending: Vec<u16> = (0..SESSIONS)
                .filter(|i| !answered[usize::from(*i)])
                .collect();
            for window in pending.chunks(256) {
                for i in window {
                    let client = SocketAddr::new("192.0.2.50".parse().unwrap(), 10_000 + i);
                    let msg = datagram(&header::v2_dgram(client, sa(PROXY4)), &i.to_be_bytes());
                    lb.send_to(&msg, sa(PROXY4)).await.unwrap();
                }
                while let Some((reply, _)) = recv_within(&lb, Duration::from_millis(200)).await {
                    let i = u16::from_be_bytes([reply[0], reply[1]]);
                    answered[usize::from(i)] = true;
                    if window.iter().all(|i| answered[usize::from(*i)]) {
                        break;
                    }
                }
            }
        }
        let missing = answered.iter().filter(|a| !**a).count();
        assert_eq!(missing, 0, "{missing} sessions never answered");
        assert_eq!(backend.peers().len(), usize::from(SESSIONS));
        for seen in backend.seen() {
            let i = u16::from_be_bytes([seen.payload[0], seen.payload[1]]);
            assert_eq!(
                seen.from.port(),
                10_000 + i,
                "payload {i} arrived from the wrong client"
            );
        }
    });
    let line = exit_counters(d);
    assert_eq!(
        exit_counter(&line, "sessions_created"),
        u64::from(SESSIONS),
        "{line}"
    );
}

fn bad_and_missing_headers_are_counted_and_dropped_while_good_traffic_flows() {
    let Some(ns) = netns_or_skip("bad_and_missing_headers_are_counted_and_dropped") else {
        return;
    };
    let d = start(&ns, &[]);
    ns.run(async {
        let backend = UdpBackend::start(BACKEND4).await;
        let lb = balancer("127.0.0.1:0").await;
        let client = sa("192.0.2.5:5555");
        let good = header::v2_dgram(client, sa(PROXY4));
        let mut truncated = good.clone();
        truncated.truncate(20);
        let bad: Vec<Vec<u8>> = vec![
            b"no header at all".to_vec(),
            datagram(&header::v1(client, sa(PROXY4)), b"v1 on udp"),
            datagram(&header::v2(client, sa(PROXY4)), b"stream on udp"),
            truncated,
            Vec::new(),
        ];
        for (i, junk) in bad.iter().enumerate() {
            lb.send_to(junk, sa(PROXY4)).await.unwrap();
            let payload = format!("good {i}");
            let (reply, _) = exchange(&lb, sa(PROXY4), &datagram(&good, payload.as_bytes())).await;
            assert_eq!(reply, payload.as_bytes());
        }
        let seen = backend.seen();
        assert_eq!(
            seen.len(),
            bad.len(),
            "only good payloads reach the backend: {seen:?}"
        );
        assert!(
            seen.iter()
                .all(|s| s.payload.starts_with(b"good") && s.from == client)
        );
    });
    let line = exit_counters(d);
    assert_eq!(
        exit_map_count(&line, "header_errors", "missing"),
        2,
        "{line}"
    );
    assert_eq!(
        exit_map_count(&line, "header_errors", "transport_mismatch"),
        2,
        "{line}"
    );
    assert_eq!(
        exit_map_count(&line, "header_errors", "truncated"),
        1,
        "{line}"
    );
    assert_eq!(exit_counter(&line, "forwarded"), 5, "{line}");
}

fn local_header_forwards_without_spoofing() {
    let Some(ns) = netns_or_skip("local_header_forwards_without_spoofing") else {
        return;
    };
    let _d = start(&ns, &[]);
    ns.run(async {
        let backend = UdpBackend::start(BACKEND4).await;
        let lb = balancer("127.0.0.1:0").await;
        for h in [header::v2_local(), header::v2_local_dgram()] {
            let (reply, _) = exchange(&lb, sa(PROXY4), &datagram(&h, b"health")).await;
            assert_eq!(reply, b"health");
        }
        let peers = backend.peers();
        assert_eq!(peers.len(), 1, "one unspoofed session: {peers:?}");
        assert_eq!(peers[0].ip(), sa(PROXY4).ip());
        assert_ne!(peers[0].port(), 0);
    });
}

fn large_datagrams_pass_whole() {
    let Some(ns) = netns_or_skip("large_datagrams_pass_whole") else {
        return;
    };
    let _d = start(&ns, &[]);
    ns.run(async {
        let backend = UdpBackend::start(BACKEND6).await;
        let lb = balancer("[::1]:0").await;
        let h = header::v2_dgram(sa("[2001:db8::6]:6000"), sa(PROXY6));
        let payload: Vec<u8> = (0..65_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (reply, _) = exchange(&lb, sa(PROXY6), &datagram(&h, &payload)).await;
        assert_eq!(reply.len(), payload.len());
        assert!(reply == payload);
        assert!(backend.seen()[0].payload == payload);
    });
}

fn listeners_share_one_session_table() {
    let Some(ns) = netns_or_skip("listeners_share_one_session_table") else {
        return;
    };
    let d = start(&ns, &["--listeners", "4"]);
    ns.run(async {
        let backend = UdpBackend::start(BACKEND4).await;
        for lb_index in 0..20u16 {
            let lb = balancer("127.0.0.1:0").await;
            let client = SocketAddr::new("192.0.2.60".parse().unwrap(), 20_000 + lb_index);
            for n in 0..3u8 {
                let msg = datagram(&header::v2_dgram(client, sa(PROXY4)), &[n]);
                assert_eq!(exchange(&lb, sa(PROXY4), &msg).await.0, [n]);
            }
        }
        assert_eq!(backend.seen().len(), 60);
        assert_eq!(backend.peers().len(), 20);
    });
    let line = exit_counters(d);
    assert_eq!(exit_counter(&line, "sessions_created"), 20, "{line}");
}

fn allowed_subnets_drop_other_balancers() {
    let Some(ns) = netns_or_skip("allowed_subnets_drop_other_balancers") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("mmproxy-udp-allowed-{}", std::process::id()));
    std::fs::write(&dir, "# only the IPv6 loopback\n::1/128\n").unwrap();
    let d = start(&ns, &["--allowed-subnets", dir.to_str().unwrap()]);
    ns.run(async {
        let _backend4 = UdpBackend::start(BACKEND4).await;
        let _backend6 = UdpBackend::start(BACKEND6).await;
        let lb4 = balancer("127.0.0.1:0").await;
        let msg = datagram(&header::v2_dgram(sa("192.0.2.1:1"), sa(PROXY4)), b"x");
        lb4.send_to(&msg, sa(PROXY4)).await.unwrap();
        assert!(
            recv_within(&lb4, Duration::from_millis(300))
                .await
                .is_none()
        );
        let lb6 = balancer("[::1]:0").await;
        let msg = datagram(&header::v2_dgram(sa("[2001:db8::1]:1"), sa(PROXY6)), b"y");
        assert_eq!(exchange(&lb6, sa(PROXY6), &msg).await.0, b"y");
    });
    let _ = std::fs::remove_file(&dir);
    let line = exit_counters(d);
    assert_eq!(exit_counter(&line, "refused_peer"), 1, "{line}");
}

/// The client's ip:port is already bound on the proxy host: fallback
/// keeps the address with another port; strict drops and counts.
fn client_port_in_use_falls_back_or_is_refused() {
    let Some(ns) = netns_or_skip("client_port_in_use_falls_back_or_is_refused") else {
        return;
    };
    for (policy, expect_reply) in [("fallback", true), ("strict", false)] {
        // A port in use needs a local client address: loopback, refused by
        // default (tests/policy.rs), so allowed here.
        let d = start(
            &ns,
            &["--source-port", policy, "--allow-source", "127.0.0.0/8"],
        );
        ns.run(async move {
            let backend = UdpBackend::start(BACKEND4).await;
            let occupied = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let client = occupied.local_addr().unwrap();
            let lb = balancer("127.0.0.1:0").await;
            let msg = datagram(&header::v2_dgram(client, sa(PROXY4)), b"busy");
            lb.send_to(&msg, sa(PROXY4)).await.unwrap();
            let reply = recv_within(&lb, Duration::from_secs(1)).await;
            assert_eq!(reply.is_some(), expect_reply, "{policy}");
            if expect_reply {
                let peer = backend.peers()[0];
                assert_eq!(peer.ip(), client.ip());
                assert_ne!(peer.port(), client.port());
            } else {
                assert!(backend.seen().is_empty());
            }
        });
        let line = exit_counters(d);
        let refused = exit_map_count(&line, "session_errors", "source_port_in_use");
        assert_eq!(refused, u64::from(!expect_reply), "{policy}: {line}");
    }
}

fn tcp_and_udp_in_one_process_on_one_address() {
    let Some(ns) = netns_or_skip("tcp_and_udp_in_one_process_on_one_address") else {
        return;
    };
    let d = Daemon::start(
        &ns,
        &[
            "-p",
            "tcp,udp",
            "-l",
            "127.0.0.1:8443",
            "-4",
            BACKEND4,
            "--mode",
            MODE.get(),
        ],
    );
    d.wait_for_log("listening (tcp)", Duration::from_secs(5));
    d.wait_for_log("listening (udp)", Duration::from_secs(5));
    ns.run(async {
        let tcp_backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let udp_backend = UdpBackend::start(BACKEND4).await;
        let client = sa("192.0.2.11:1111");
        let mut s = connect_with_header(sa(PROXY4), &header::v1(client, sa(PROXY4))).await;
        assert_eq!(support::round_trip(&mut s, b"over tcp").await, b"over tcp");
        let lb = balancer("127.0.0.1:0").await;
        let msg = datagram(&header::v2_dgram(client, sa(PROXY4)), b"over udp");
        assert_eq!(exchange(&lb, sa(PROXY4), &msg).await.0, b"over udp");
        assert_eq!(tcp_backend.peers(), vec![client]);
        assert_eq!(udp_backend.peers(), vec![client]);
    });
}

/// `--mark` reaches UDP upstream sockets: with traffic to 127.0.0.2
/// prohibited unless marked 7, only the marked daemon gets through.
fn mark_is_set_on_upstream_sockets() {
    let Some(ns) = netns_or_skip("udp_mark_is_set_on_upstream_sockets") else {
        return;
    };
    ns.only_marked_reaches("127.0.0.2/32", "7");
    let common = [
        &["-p", "udp", "-4", "127.0.0.2:9000", "-v", "1"][..],
        &mode_flags(),
    ]
    .concat();
    let _marked = Daemon::start(
        &ns,
        &[&["-l", "127.0.0.1:8443", "-mark", "7"][..], &common[..]].concat(),
    );
    let unmarked = Daemon::start(&ns, &[&["-l", "127.0.0.1:8444"][..], &common[..]].concat());
    ns.run(async {
        let backend = UdpBackend::start("127.0.0.2:9000").await;
        let lb = balancer("127.0.0.1:0").await;
        let client = sa("192.0.2.1:40017");
        let msg = datagram(&header::v2_dgram(client, sa(PROXY4)), b"marked");
        assert_eq!(exchange(&lb, sa("127.0.0.1:8443"), &msg).await.0, b"marked");
        let other = datagram(
            &header::v2_dgram(sa("192.0.2.1:40018"), sa(PROXY4)),
            b"unmarked",
        );
        lb.send_to(&other, sa("127.0.0.1:8444")).await.unwrap();
        assert!(recv_within(&lb, Duration::from_millis(500)).await.is_none());
        assert_eq!(
            backend.peers(),
            vec![client],
            "unmarked traffic must not reach the backend"
        );
    });
    let line = exit_counters(unmarked);
    assert_eq!(
        exit_map_count(&line, "session_errors", "connect"),
        1,
        "{line}"
    );
}

/// One client cannot hold more than its share of the table: its next new
/// flow is dropped and counted, other clients still get sessions.
fn one_client_cannot_take_the_whole_session_table() {
    let Some(ns) = netns_or_skip("one_client_cannot_take_the_whole_session_table") else {
        return;
    };
    let d = start(
        &ns,
        &[
            "--max-udp-sessions",
            "4",
            "--max-udp-sessions-per-client",
            "2",
        ],
    );
    ns.run(async {
        let backend = UdpBackend::start(BACKEND4).await;
        let lb = balancer("127.0.0.1:0").await;
        for port in [1, 2] {
            let client = sa(&format!("192.0.2.1:{port}"));
            let msg = datagram(&header::v2_dgram(client, sa(PROXY4)), b"a");
            assert_eq!(exchange(&lb, sa(PROXY4), &msg).await.0, b"a");
        }
        let third = datagram(&header::v2_dgram(sa("192.0.2.1:3"), sa(PROXY4)), b"a3");
        lb.send_to(&third, sa(PROXY4)).await.unwrap();
        assert!(recv_within(&lb, Duration::from_millis(300)).await.is_none());
        let other = datagram(&header::v2_dgram(sa("192.0.2.2:1"), sa(PROXY4)), b"b");
        assert_eq!(exchange(&lb, sa(PROXY4), &other).await.0, b"b");
        assert_eq!(backend.seen().len(), 3);
    });
    let line = exit_counters(d);
    assert_eq!(
        exit_map_count(&line, "session_errors", "client_limit"),
        1,
        "{line}"
    );
    assert_eq!(exit_counter(&line, "sessions_evicted"), 0, "{line}");
}

/// With --dynamic-destination one client talking to two services gets a
/// session for each, so every datagram reaches the destination its header
/// named.
fn dynamic_destinations_are_separate_sessions() {
    let Some(ns) = netns_or_skip("dynamic_destinations_are_separate_sessions") else {
        return;
    };
    let _d = start(
        &ns,
        &[
            "--dynamic-destination",
            "--allowed-destinations",
            "127.0.0.1/32:9000,9001",
        ],
    );
    ns.run(async {
        let first = UdpBackend::start("127.0.0.1:9000").await;
        let second = UdpBackend::start("127.0.0.1:9001").await;
        let lb = balancer("127.0.0.1:0").await;
        let client = sa("192.0.2.7:5353");
        for (dst, payload) in [("127.0.0.1:9000", b"one"), ("127.0.0.1:9001", b"two")] {
            let msg = datagram(&header::v2_dgram(client, sa(dst)), payload);
            assert_eq!(exchange(&lb, sa(PROXY4), &msg).await.0, payload);
        }
        assert_eq!(first.seen().len(), 1, "{:?}", first.seen());
        assert_eq!(second.seen().len(), 1, "{:?}", second.seen());
        assert_eq!(second.seen()[0].payload, b"two");
        assert_eq!(second.seen()[0].from.ip(), client.ip());
    });
}

udp_in_both_modes!(
    round_trip_ipv4_client_is_spoofed,
    round_trip_ipv6_client_is_spoofed,
    replies_leave_from_the_address_the_balancer_sent_to,
    two_clients_behind_one_frontend_address_are_kept_apart_ipv4,
    two_clients_behind_one_frontend_address_are_kept_apart_ipv6,
    first_datagram_mode_maps_headerless_datagrams_ipv4,
    first_datagram_mode_maps_headerless_datagrams_ipv6,
    every_mode_drops_headerless_datagrams,
    idle_sessions_expire_after_close_after,
    session_cap_closes_the_least_recently_used,
    icmp_port_unreachable_then_backend_back_ipv4,
    icmp_port_unreachable_then_backend_back_ipv6,
    ten_thousand_sessions,
    bad_and_missing_headers_are_counted_and_dropped_while_good_traffic_flows,
    local_header_forwards_without_spoofing,
    large_datagrams_pass_whole,
    listeners_share_one_session_table,
    allowed_subnets_drop_other_balancers,
    client_port_in_use_falls_back_or_is_refused,
    tcp_and_udp_in_one_process_on_one_address,
    mark_is_set_on_upstream_sockets,
    one_client_cannot_take_the_whole_session_table,
    dynamic_destinations_are_separate_sessions,
);
