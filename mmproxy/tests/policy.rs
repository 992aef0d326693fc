//! The spoofing policy end to end (src/policy.rs): what a PROXY header
//! may claim as its source, LOCAL headers, the warning for an open
//! listener, and `--udp-header first` identities. The policy runs before
//! any data path, so these run in plain mode only.

mod support;

use std::time::Duration;

use support::{
    Backend, BackendKind, Daemon, Netns, connect_with_header, header, http_get, netns_or_skip,
    round_trip, sa,
    udp::{UdpBackend, datagram, exchange, exit_map_count, recv_within},
    wait_closed, wait_for_metrics,
};
use tokio::net::UdpSocket;

const PROXY4: &str = "127.0.0.1:8443";
const PROXY6: &str = "[::1]:8443";
const BACKEND4: &str = "127.0.0.1:9000";
const BACKEND6: &str = "[::1]:9000";
const METRICS: &str = "127.0.0.1:9100";

fn start(ns: &Netns, protocol: &str, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "-l",
        "[::]:8443",
        "-p",
        protocol,
        "-4",
        BACKEND4,
        "-6",
        BACKEND6,
        "--mode",
        "plain",
        "--metrics-addr",
        METRICS,
        "-v",
        "1",
    ];
    args.extend_from_slice(extra);
    Daemon::start(ns, &args)
}

/// Sends `header` and expects the daemon to close without connecting.
async fn expect_refused(proxy: &str, header: &[u8]) {
    let mut s = connect_with_header(sa(proxy), header).await;
    wait_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("a refused header closes the connection");
}

#[test]
fn special_sources_are_refused_before_connecting() {
    let Some(ns) = netns_or_skip("special_sources_are_refused_before_connecting") else {
        return;
    };
    let d = start(&ns, "tcp", &[]);
    ns.run(async {
        let v4 = Backend::start(BACKEND4, BackendKind::Echo).await;
        let v6 = Backend::start(BACKEND6, BackendKind::Echo).await;
        for (proxy, source) in [
            (PROXY4, "127.0.0.1:40000"),
            (PROXY4, "127.0.0.2:40000"),
            (PROXY6, "[::1]:40000"),
            (PROXY4, "0.0.0.0:40000"),
            (PROXY4, "224.0.0.9:40000"),
            (PROXY4, "255.255.255.255:40000"),
            (PROXY4, "169.254.7.7:40000"),
            (PROXY6, "[fe80::7]:40000"),
        ] {
            let dst = sa(proxy);
            expect_refused(proxy, &header::v2(sa(source), dst)).await;
            expect_refused(proxy, &header::v1(sa(source), dst)).await;
        }
        // An ordinary client still gets through, and was the only one.
        let client = sa("192.0.2.1:40001");
        let mut s = connect_with_header(sa(PROXY4), &header::v1(client, sa(PROXY4))).await;
        assert_eq!(round_trip(&mut s, b"hi").await, b"hi");
        assert_eq!(v4.peers(), vec![client]);
        assert!(v6.peers().is_empty(), "{:?}", v6.peers());
        wait_for_metrics(
            sa(METRICS),
            &[
                (
                    "mmproxy_tcp_connections_rejected_total{reason=\"policy\"}",
                    16,
                ),
                (
                    "mmproxy_tcp_policy_refusals_total{reason=\"loopback_source\"}",
                    6,
                ),
                (
                    "mmproxy_tcp_policy_refusals_total{reason=\"unspecified_source\"}",
                    2,
                ),
                (
                    "mmproxy_tcp_policy_refusals_total{reason=\"multicast_source\"}",
                    2,
                ),
                (
                    "mmproxy_tcp_policy_refusals_total{reason=\"broadcast_source\"}",
                    2,
                ),
                (
                    "mmproxy_tcp_policy_refusals_total{reason=\"link_local_source\"}",
                    4,
                ),
            ],
        )
        .await;
    });
    // Sixteen refusals, one warning: the rest are counted, not logged.
    let warnings = d
        .log()
        .iter()
        .filter(|l| l.contains("refused by the source/destination policy"))
        .count();
    assert_eq!(warnings, 1, "{}", d.log().join("\n"));
}

#[test]
fn allow_and_deny_source_override_the_builtin_rules() {
    let Some(ns) = netns_or_skip("allow_and_deny_source_override_the_builtin_rules") else {
        return;
    };
    let _d = start(
        &ns,
        "tcp",
        &[
            "--allow-source",
            "169.254.0.0/16",
            "--deny-source",
            "192.0.2.0/24",
            "--allow-source",
            "192.0.2.128/25",
        ],
    );
    ns.run(async {
        let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let link_local = sa("169.254.7.7:40002");
        let mut s = connect_with_header(sa(PROXY4), &header::v2(link_local, sa(PROXY4))).await;
        assert_eq!(round_trip(&mut s, b"ll").await, b"ll");
        expect_refused(PROXY4, &header::v2(sa("192.0.2.1:40003"), sa(PROXY4))).await;
        let carved_out = sa("192.0.2.200:40004");
        let mut s = connect_with_header(sa(PROXY4), &header::v2(carved_out, sa(PROXY4))).await;
        assert_eq!(round_trip(&mut s, b"co").await, b"co");
        assert_eq!(backend.peers(), vec![link_local, carved_out]);
        wait_for_metrics(
            sa(METRICS),
            &[(
                "mmproxy_tcp_policy_refusals_total{reason=\"denied_source\"}",
                1,
            )],
        )
        .await;
    });
}

#[test]
fn local_headers_need_allow_local() {
    let Some(ns) = netns_or_skip("local_headers_need_allow_local") else {
        return;
    };
    {
        let _d = start(&ns, "tcp", &[]);
        ns.run(async {
            let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
            let mut s = connect_with_header(sa(PROXY4), &header::v2_local()).await;
            assert_eq!(round_trip(&mut s, b"hc").await, b"hc");
            assert_eq!(backend.peers().len(), 1, "the default connects LOCAL");
        });
    }
    let _d = start(&ns, "tcp", &["--allow-local", "false"]);
    ns.run(async {
        let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        expect_refused(PROXY4, &header::v2_local()).await;
        expect_refused(PROXY4, b"PROXY UNKNOWN\r\n").await;
        assert!(backend.peers().is_empty());
        wait_for_metrics(
            sa(METRICS),
            &[("mmproxy_tcp_policy_refusals_total{reason=\"local\"}", 2)],
        )
        .await;
    });
}

#[test]
fn an_open_listener_is_warned_about_once() {
    let Some(ns) = netns_or_skip("an_open_listener_is_warned_about_once") else {
        return;
    };
    let open = start(&ns, "tcp", &[]);
    let needle = "no --allowed-subnets: anyone who can reach";
    assert_eq!(
        open.log().iter().filter(|l| l.contains(needle)).count(),
        1,
        "{}",
        open.log().join("\n")
    );
    drop(open);
    let local = Daemon::start(&ns, &["-l", PROXY4, "-4", BACKEND4, "--mode", "plain"]);
    assert!(
        !local.log().iter().any(|l| l.contains(needle)),
        "a loopback listener is not open: {}",
        local.log().join("\n")
    );
}

#[test]
fn udp_refuses_special_sources() {
    let Some(ns) = netns_or_skip("udp_refuses_special_sources") else {
        return;
    };
    let d = start(&ns, "udp", &[]);
    ns.run(async {
        let backend = UdpBackend::start(BACKEND4).await;
        let lb = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for source in ["127.0.0.1:5000", "169.254.1.1:5000", "0.0.0.0:5000"] {
            let msg = datagram(&header::v2_dgram(sa(source), sa(PROXY4)), b"evil");
            lb.send_to(&msg, sa(PROXY4)).await.unwrap();
        }
        let good = datagram(&header::v2_dgram(sa("192.0.2.5:5000"), sa(PROXY4)), b"ok");
        assert_eq!(exchange(&lb, sa(PROXY4), &good).await.0, b"ok");
        let seen = backend.seen();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].from, sa("192.0.2.5:5000"));
        let (_, body) = http_get(sa(METRICS), "/metrics").await;
        assert!(
            body.contains("mmproxy_udp_policy_refusals_total{kind=\"loopback_source\"} 1"),
            "{body}"
        );
    });
    d.signal(rustix::process::Signal::TERM);
    let line = d.wait_for_log("udp counters at exit", Duration::from_secs(10));
    assert_eq!(
        exit_map_count(&line, "policy_refusals", "loopback_source"),
        1,
        "{line}"
    );
    assert_eq!(
        exit_map_count(&line, "policy_refusals", "link_local_source"),
        1,
        "{line}"
    );
    assert_eq!(
        exit_map_count(&line, "policy_refusals", "unspecified_source"),
        1,
        "{line}"
    );
}

/// `--udp-header first`: once a balancer port is a client's flow, a later
/// datagram that happens to parse as a PROXY header is that client's
/// payload, delivered whole; it never switches the flow to another
/// identity.
#[test]
fn udp_first_mode_never_takes_a_new_identity_mid_flow() {
    let Some(ns) = netns_or_skip("udp_first_mode_never_takes_a_new_identity_mid_flow") else {
        return;
    };
    let _d = start(&ns, "udp", &["--udp-header", "first"]);
    ns.run(async {
        let backend = UdpBackend::start(BACKEND4).await;
        let lb = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let client = sa("192.0.2.9:7000");
        let first = datagram(&header::v2_dgram(client, sa(PROXY4)), b"one");
        assert_eq!(exchange(&lb, sa(PROXY4), &first).await.0, b"one");
        let injected = datagram(
            &header::v2_dgram(sa("203.0.113.66:6666"), sa(PROXY4)),
            b"two",
        );
        assert_eq!(
            exchange(&lb, sa(PROXY4), &injected).await.0,
            injected,
            "the header-like payload arrives whole"
        );
        let seen = backend.wait_for(2).await;
        assert!(seen.iter().all(|s| s.from == client), "{seen:?}");
        assert!(recv_within(&lb, Duration::from_millis(200)).await.is_none());
    });
}
