//! Operations: `mmproxy check`, `--setup-routes`, metrics and health,
//! SIGHUP reloads, log formats.

mod support;

use std::{process::Stdio, time::Duration};

use support::{
    Backend, BackendKind, Daemon, Netns, connect_with_header, daemon_binary, header, http_get,
    metric, netns_or_skip, round_trip, sa,
    udp::{UdpBackend, datagram, exchange},
    wait_closed,
};
use tokio::{io::AsyncWriteExt as _, net::UdpSocket};

const BACKEND4: &str = "127.0.0.1:9000";
const BACKEND6: &str = "[::1]:9000";
const PROXY4: &str = "127.0.0.1:8443";

/// Runs `mmproxy check` with `args` in `ns`: exit code and stdout.
fn check(ns: &Netns, args: &[&str]) -> (i32, String) {
    let out = ns
        .command(daemon_binary())
        .arg("check")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run mmproxy check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

const TARGETS: [&str; 6] = ["-4", BACKEND4, "-6", BACKEND6, "--mode", "plain"];

#[test]
fn check_fails_with_fixes_then_passes_after_setup_routes_which_cleans_up() {
    let Some(_root) = netns_or_skip("check_fails_with_fixes_then_passes_after_setup_routes") else {
        return;
    };
    let ns = Netns::without_routing();
    let before = ns.routing_listing();
    let _backends = ns.spawn(async {
        let _b4 = Backend::start(BACKEND4, BackendKind::Echo).await;
        let _b6 = Backend::start(BACKEND6, BackendKind::Echo).await;
        std::future::pending::<()>().await;
    });

    let (code, out) = check(&ns, &TARGETS);
    assert_eq!(code, 1, "{out}");
    for line in [
        "FAIL  ipv4 rule from 127.0.0.1/8 iif lo lookup 123: missing",
        "fix: ip rule add from 127.0.0.1/8 iif lo lookup 123",
        "FAIL  ipv4 route local 0.0.0.0/0 dev lo table 123: missing",
        "fix: ip route add local 0.0.0.0/0 dev lo table 123",
        "fix: ip -6 rule add from ::1/128 iif lo lookup 123",
        "fix: ip -6 route add local ::/0 dev lo table 123",
        "PASS  backend 127.0.0.1:9000 (-4) accepts a connection",
        "FAIL  backend 127.0.0.1:9000 answers a connection from 192.0.2.1",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }

    // With the flag that adds it, missing routing is no failure yet.
    let (code, out) = check(&ns, &[&TARGETS[..], &["--setup-routes"]].concat());
    assert_eq!(code, 0, "{out}");
    for line in [
        "INFO  ipv4 rule from 127.0.0.1/8 iif lo lookup 123: missing; --setup-routes adds it at start",
        "INFO  ipv6 route local ::/0 dev lo table 123: missing; --setup-routes adds it at start",
        "INFO  backend 127.0.0.1:9000 answers a connection from 192.0.2.1: needs the routing",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }

    let mut d = Daemon::start(
        &ns,
        &[&["-l", PROXY4, "--setup-routes"][..], &TARGETS].concat(),
    );
    let (code, out) = check(&ns, &TARGETS);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("FAIL"), "{out}");
    assert!(
        out.contains("PASS  backend [::1]:9000 answers a connection from 2001:db8::1"),
        "{out}"
    );

    d.signal(rustix::process::Signal::TERM);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
    d.wait_for_log("removed the routing added at start", Duration::from_secs(1));
    assert_eq!(
        ns.routing_listing(),
        before,
        "exit removes exactly what start added"
    );
    let (code, _) = check(&ns, &TARGETS);
    assert_eq!(code, 1);
}

#[test]
fn rules_that_existed_before_survive_exit() {
    let Some(_root) = netns_or_skip("rules_that_existed_before_survive_exit") else {
        return;
    };
    let ns = Netns::without_routing();
    // Only the IPv4 half is there before the daemon starts.
    ns.add_routing_v4();
    let before = ns.routing_listing();
    let mut d = Daemon::start(
        &ns,
        &[&["-l", PROXY4, "--setup-routes"][..], &TARGETS].concat(),
    );
    let during = ns.routing_listing();
    assert!(during.contains("from ::1 iif lo lookup 123"), "{during}");
    d.signal(rustix::process::Signal::TERM);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
    let after = ns.routing_listing();
    assert_eq!(after, before);
    assert!(
        after.contains("from 127.0.0.1/8 iif lo lookup 123"),
        "{after}"
    );
}

/// 500 slowloris connections to the metrics port (request headers begun,
/// never finished) with only 256 open files allowed: `/healthz` still
/// answers, because the endpoint caps its connections by closing the
/// oldest, and its accept loop backs off instead of spinning on EMFILE.
#[test]
fn metrics_survive_a_slowloris() {
    let Some(ns) = netns_or_skip("metrics_survive_a_slowloris") else {
        return;
    };
    let mut cmd = ns.command("prlimit");
    cmd.args(["--nofile=256:256", "--"]).arg(daemon_binary());
    let _d = Daemon::start_with(
        cmd,
        &[
            &["-l", PROXY4, "--metrics-addr", "127.0.0.1:9100"][..],
            &TARGETS,
        ]
        .concat(),
    );
    ns.run(async {
        let metrics = sa("127.0.0.1:9100");
        let mut slow = Vec::new();
        for _ in 0..500 {
            let Ok(Ok(mut s)) = tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(metrics),
            )
            .await
            else {
                continue;
            };
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await;
            slow.push(s);
        }
        for _ in 0..3 {
            let (status, body) = http_get(metrics, "/healthz").await;
            assert_eq!(status, 200, "{body}");
        }
        drop(slow);
    });
}

#[test]
fn a_failed_start_leaves_no_routing_behind() {
    let Some(_root) = netns_or_skip("a_failed_start_leaves_no_routing_behind") else {
        return;
    };
    let ns = Netns::without_routing();
    let before = ns.routing_listing();
    let (tx, rx) = std::sync::mpsc::channel();
    let _squatter = ns.spawn(async move {
        let _taken = tokio::net::TcpListener::bind(PROXY4).await.unwrap();
        tx.send(()).unwrap();
        std::future::pending::<()>().await;
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let out = ns
        .command(daemon_binary())
        .args([&["-l", PROXY4, "--setup-routes", "-q"][..], &TARGETS].concat())
        .stdin(Stdio::null())
        .output()
        .expect("run mmproxy");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(PROXY4), "{stderr}");
    // The listeners open first, so a busy port fails the start before
    // any routing is added (failures after it remove what was added).
    assert!(!stderr.contains("routing is ours"), "{stderr}");
    assert_eq!(ns.routing_listing(), before, "nothing left behind");
}

#[test]
fn a_second_sigterm_resets_at_once_and_still_cleans_up() {
    let Some(_root) = netns_or_skip("a_second_sigterm_resets_at_once") else {
        return;
    };
    let ns = Netns::without_routing();
    let before = ns.routing_listing();
    let mut d = Daemon::start(
        &ns,
        &[
            &["-l", PROXY4, "--setup-routes", "--drain-timeout", "60"][..],
            &TARGETS,
        ]
        .concat(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let (cut_tx, cut_rx) = std::sync::mpsc::channel();
    let _client = ns.spawn(async move {
        let _backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let mut s =
            connect_with_header(sa(PROXY4), &header::v1(sa("192.0.2.1:41000"), sa(PROXY4))).await;
        assert_eq!(round_trip(&mut s, b"open").await, b"open");
        tx.send(()).unwrap();
        let mut buf = [0u8; 16];
        let end = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
        cut_tx.send(end.map_err(|e| e.kind())).unwrap();
        std::future::pending::<()>().await;
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    d.signal(rustix::process::Signal::TERM);
    d.wait_for_log("draining connections", Duration::from_secs(5));
    let second = std::time::Instant::now();
    d.signal(rustix::process::Signal::TERM);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        second.elapsed() < Duration::from_secs(3),
        "exit took {:?} after the second SIGTERM",
        second.elapsed()
    );
    d.wait_for_log("second signal; resetting", Duration::from_secs(1));
    let end = cut_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        end,
        Err(std::io::ErrorKind::ConnectionReset),
        "the cut connection ends in a reset, not a clean FIN"
    );
    assert_eq!(ns.routing_listing(), before, "routes removed");
}

#[test]
fn a_restart_after_sigkill_takes_over_its_leftovers() {
    let Some(_root) = netns_or_skip("a_restart_after_sigkill_takes_over_its_leftovers") else {
        return;
    };
    let ns = Netns::without_routing();
    let before = ns.routing_listing();
    let args = [&["-l", PROXY4, "--setup-routes"][..], &TARGETS].concat();
    let mut killed = Daemon::start(&ns, &args);
    killed.signal(rustix::process::Signal::KILL);
    killed.wait_exit(Duration::from_secs(5));
    let leftovers = ns.routing_listing();
    assert!(
        leftovers.contains("proto 109"),
        "tagged leftovers:\n{leftovers}"
    );
    let mut d = Daemon::start(&ns, &args);
    d.wait_for_log(
        "took over routing an earlier run added",
        Duration::from_secs(2),
    );
    let rules = ns.ip_output(&["rule", "show"]) + &ns.ip_output(&["-6", "rule", "show"]);
    assert_eq!(
        rules.matches("lookup 123").count(),
        2,
        "one copy of each rule:\n{rules}"
    );
    assert_eq!(ns.routing_listing(), leftovers, "nothing added twice");
    d.signal(rustix::process::Signal::TERM);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
    assert_eq!(
        ns.routing_listing(),
        before,
        "a clean exit removes them all"
    );
}

#[test]
fn mark_variant_is_checked_and_set_up() {
    let Some(_root) = netns_or_skip("mark_variant_is_checked_and_set_up") else {
        return;
    };
    let ns = Netns::without_routing();
    let args = [&TARGETS[..], &["--mark", "7", "--route-table", "77"]].concat();
    let (code, out) = check(&ns, &args);
    assert_eq!(code, 1);
    assert!(out.contains("fix: ip rule add fwmark 7 lookup 77"), "{out}");
    assert!(
        out.contains("fix: ip route add local 0.0.0.0/0 dev lo table 77"),
        "{out}"
    );
    let _d = Daemon::start(
        &ns,
        &[&["-l", PROXY4, "--setup-routes"][..], &args].concat(),
    );
    let rules = ns.ip_output(&["rule", "show"]);
    assert!(rules.contains("fwmark 0x7 lookup 77"), "{rules}");
}

#[test]
fn start_up_logs_the_routing_checks_unless_quiet() {
    let Some(ns) = netns_or_skip("start_up_logs_the_routing_checks_unless_quiet") else {
        return;
    };
    let d = Daemon::start(&ns, &[&["-l", PROXY4][..], &TARGETS].concat());
    d.wait_for_log(
        "check: PASS  ipv6 route local ::/0 dev lo table 123",
        Duration::from_secs(2),
    );
    drop(d);
    let d = Daemon::start(&ns, &[&["-l", PROXY4, "-q"][..], &TARGETS].concat());
    assert!(
        !d.log().iter().any(|l| l.contains("check:")),
        "{:?}",
        d.log()
    );
}

/// One good TCP connection, one bad header, one backend refusal (IPv6,
/// no backend there), one good datagram and one without a header.
async fn good_bad_and_refused_traffic() {
    let client = sa("192.0.2.1:1000");
    // One good connection, one bad header, one backend refusal (IPv6).
    let mut s = connect_with_header(sa(PROXY4), &header::v1(client, sa(PROXY4))).await;
    assert_eq!(round_trip(&mut s, b"hello").await, b"hello");
    drop(s);
    let mut bad = connect_with_header(sa(PROXY4), b"GET / HTTP/1.1\r\n\r\n").await;
    let _ = wait_closed(&mut bad, Duration::from_secs(5)).await;
    let mut refused = connect_with_header(
        sa(PROXY4),
        &header::v2(sa("[2001:db8::1]:1"), sa("[::1]:8443")),
    )
    .await;
    let _ = refused.write_all(b"x").await;
    let _ = wait_closed(&mut refused, Duration::from_secs(5)).await;
    let lb = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    exchange(
        &lb,
        sa(PROXY4),
        &datagram(&header::v2_dgram(client, sa(PROXY4)), b"udp"),
    )
    .await;
    lb.send_to(b"no header", sa(PROXY4)).await.unwrap();
}

#[test]
fn metrics_move_with_traffic_and_errors_and_healthz_answers() {
    let Some(ns) = netns_or_skip("metrics_move_with_traffic_and_errors") else {
        return;
    };
    let _d = Daemon::start(
        &ns,
        &[
            &[
                "-l",
                PROXY4,
                "-p",
                "tcp,udp",
                "--metrics-addr",
                "127.0.0.1:9100",
            ][..],
            &TARGETS,
        ]
        .concat(),
    );
    ns.run(async {
        let metrics = sa("127.0.0.1:9100");
        // 503 until the last listener (UDP here) is bound, then 200.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match http_get(metrics, "/healthz").await.0 {
                200 => break,
                503 if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => panic!("/healthz answered {other}"),
            }
        }
        assert_eq!(http_get(metrics, "/nope").await.0, 404);
        let _backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let _udp_backend = UdpBackend::start(BACKEND4).await;
        good_bad_and_refused_traffic().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let body = loop {
            let (status, body) = http_get(metrics, "/metrics").await;
            assert_eq!(status, 200);
            // The good connection's bytes are added when it has ended.
            if body.contains(
                "mmproxy_tcp_forwarded_bytes_total{datapath=\"plain\",direction=\"to_backend\"} 5",
            ) && body.contains("mmproxy_udp_header_errors_total{kind=\"missing\"} 1")
            {
                break body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "metrics did not settle:\n{body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            metric(&body, "mmproxy_tcp_connections_accepted_total"),
            3,
            "{body}"
        );
        assert_eq!(metric(&body, "mmproxy_tcp_connections_active"), 0, "{body}");
        assert_eq!(
            metric(
                &body,
                "mmproxy_tcp_header_errors_total{kind=\"not_proxy_protocol\"}"
            ),
            1
        );
        assert_eq!(
            metric(
                &body,
                "mmproxy_tcp_upstream_errors_total{stage=\"connect\",errno=\"ECONNREFUSED\"}"
            ),
            1
        );
        assert_eq!(
            metric(
                &body,
                "mmproxy_tcp_connections_rejected_total{reason=\"header\"}"
            ),
            1
        );
        assert_eq!(
            metric(
                &body,
                "mmproxy_tcp_connections_rejected_total{reason=\"upstream\"}"
            ),
            1
        );
        assert_eq!(metric(&body, "mmproxy_tcp_datapath{mode=\"plain\"}"), 1);
        assert_eq!(metric(&body, "mmproxy_udp_forwarded_total"), 1);
        // The gauge itself (the trailing space keeps the prefix off the
        // `mmproxy_udp_sessions_*` counters).
        assert_eq!(metric(&body, "mmproxy_udp_sessions "), 1);
    });
}

#[test]
fn sighup_reloads_allowed_subnets_and_keeps_the_old_list_on_a_bad_file() {
    let Some(ns) = netns_or_skip("sighup_reloads_allowed_subnets") else {
        return;
    };
    let file = std::env::temp_dir().join(format!("mmproxy-sighup-{}", std::process::id()));
    std::fs::write(&file, "::1/128\n").unwrap();
    let d = Daemon::start(
        &ns,
        &[
            &["-l", PROXY4, "--allowed-subnets", file.to_str().unwrap()][..],
            &TARGETS,
        ]
        .concat(),
    );
    let try_client = |ns: &Netns| {
        ns.run(async {
            let _backend = Backend::start(BACKEND4, BackendKind::Echo).await;
            let mut s =
                connect_with_header(sa(PROXY4), &header::v1(sa("192.0.2.1:1"), sa(PROXY4))).await;
            s.write_all(b"hi").await.is_ok()
                && tokio::time::timeout(Duration::from_secs(2), async {
                    let mut buf = [0u8; 2];
                    tokio::io::AsyncReadExt::read_exact(&mut s, &mut buf)
                        .await
                        .is_ok()
                })
                .await
                .unwrap_or(false)
        })
    };
    assert!(!try_client(&ns), "127.0.0.1 is not allowed yet");
    std::fs::write(&file, "# now IPv4 loopback too\n::1/128\n127.0.0.0/8\n").unwrap();
    d.signal(rustix::process::Signal::HUP);
    d.wait_for_log("SIGHUP: allowed subnets reloaded", Duration::from_secs(5));
    assert!(try_client(&ns), "allowed after the reload");
    std::fs::write(&file, "127.0.0.0/8\nnot a subnet\n").unwrap();
    d.signal(rustix::process::Signal::HUP);
    let line = d.wait_for_log("NOT reloaded", Duration::from_secs(5));
    assert!(line.contains(":2: 'not a subnet'"), "{line}");
    assert!(try_client(&ns), "the old list is kept");
    let _ = std::fs::remove_file(&file);
}

#[test]
fn json_log_format_writes_one_object_per_line() {
    let Some(ns) = netns_or_skip("json_log_format_writes_one_object_per_line") else {
        return;
    };
    let d = Daemon::start(
        &ns,
        &[&["-l", PROXY4, "--log-format", "json"][..], &TARGETS].concat(),
    );
    let line = d.wait_for_log("listening (tcp)", Duration::from_secs(1));
    assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
    assert!(line.contains("\"level\":\"INFO\""), "{line}");
    assert!(line.contains("\"listen\":\"127.0.0.1:8443\""), "{line}");
}

/// examples/tproxy.md, end to end: a balancer on another host connects to
/// ports 10000-10004; TPROXY hands them to one transparent listener; each
/// reaches the service its header names, from the client's address.
#[test]
fn tproxy_recipe_serves_ports_10000_to_10004() {
    let Some(ns) = netns_or_skip("tproxy_recipe_serves_ports_10000_to_10004") else {
        return;
    };
    let balancer = ns.client_host();
    let veth = ns
        .ip_output(&["-o", "link", "show", "type", "veth"])
        .split(": ")
        .nth(1)
        .and_then(|n| n.split('@').next())
        .expect("the veth's name")
        .to_owned();
    ns.ip(&["rule", "add", "fwmark", "1", "lookup", "100"]);
    ns.ip(&[
        "route",
        "add",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        "100",
    ]);
    // The recipe's rule, as in examples/tproxy.md, on this veth.
    let rules = format!(
        "table ip mmproxy_tproxy {{\n  chain prerouting {{\n    \
         type filter hook prerouting priority mangle; policy accept;\n    \
         iifname \"{veth}\" tcp dport 10000-10004 tproxy to :8443 meta mark set 1 accept\n  \
         }}\n}}\n"
    );
    let status = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().expect("stdin").write_all(rules.as_bytes())?;
            c.wait()
        })
        .expect("run nft");
    assert!(status.success(), "nft rejected the recipe's rule");
    let _d = Daemon::start(
        &ns,
        &[
            "-l",
            "0.0.0.0:8443",
            "--listen-transparent",
            "--dynamic-destination",
            "--allowed-destinations",
            "127.0.0.0/8:10000-10004",
            "--mode",
            "plain",
        ],
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let _services = ns.spawn(async move {
        let mut backends = Vec::new();
        for port in 10_000..=10_004 {
            backends.push(Backend::start(&format!("127.0.0.1:{port}"), BackendKind::Echo).await);
        }
        tx.send(backends).expect("test thread waits");
        std::future::pending::<()>().await;
    });
    let backends = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("services started");
    balancer.run(async {
        for port in 10_000u16..=10_004 {
            let client =
                std::net::SocketAddr::new("198.51.100.7".parse().unwrap(), 40_000 + port % 100);
            let service = std::net::SocketAddr::new("127.0.0.1".parse().unwrap(), port);
            let public = std::net::SocketAddr::new("192.0.2.1".parse().unwrap(), port);
            let mut s = connect_with_header(public, &header::v1(client, service)).await;
            let msg = format!("port {port}");
            assert_eq!(round_trip(&mut s, msg.as_bytes()).await, msg.as_bytes());
        }
    });
    for (i, backend) in backends.iter().enumerate() {
        let port = 10_000 + u16::try_from(i).unwrap();
        assert_eq!(
            backend.peers(),
            vec![std::net::SocketAddr::new(
                "198.51.100.7".parse().unwrap(),
                40_000 + port % 100
            )],
            "service on port {port}"
        );
    }
}
