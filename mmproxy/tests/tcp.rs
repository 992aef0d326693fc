//! The TCP proxy end to end: the real daemon binary in a network
//! namespace, real sockets, IPv4 and IPv6. Every behaviour test runs once
//! per data path (`plain::`, and `ebpf::` when that mode is available), so
//! both modes are held to the same contract.

#[macro_use]
mod support;

use std::{
    io::ErrorKind,
    net::SocketAddr,
    time::{Duration, Instant},
};

use support::{
    Backend, BackendKind, Background, Daemon, GREETING, Netns, connect_with_header, header,
    netns_or_skip, round_trip, sa, wait_closed,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const PROXY4: &str = "127.0.0.1:8443";
const PROXY6: &str = "[::1]:8443";
const BACKEND4: &str = "127.0.0.1:9000";
const BACKEND6: &str = "[::1]:9000";

/// Flags every test starts from: dual-stack listener, both targets, -v 2,
/// and the data path.
fn base_args(mode: &'static str) -> Vec<&'static str> {
    let mut args = vec!["-l", "[::]:8443", "-4", BACKEND4, "-6", BACKEND6, "-v", "2"];
    args.extend(support::mode_args(mode));
    args
}

fn start(ns: &Netns, mode: &'static str, extra: &[&str]) -> Daemon {
    let mut args = base_args(mode);
    args.extend_from_slice(extra);
    Daemon::start(ns, &args)
}

each_data_path!(
    v1_ipv4_client_is_spoofed,
    v2_ipv6_client_is_spoofed,
    tcp6_header_over_ipv4_frontend_goes_to_the_ipv6_target,
    v4_mapped_source_goes_to_the_ipv4_target,
    local_header_connects_without_spoofing,
    header_split_over_three_segments,
    payload_sent_with_the_header_and_server_speaks_first,
    one_gib_each_way_verified_with_half_close,
    thousand_concurrent_connections,
    headerless_connections_are_closed_at_the_deadline,
    backend_down_closes_the_client_promptly,
    backend_that_never_accepts_times_out,
    backend_reset_is_mirrored_to_the_client,
    client_reset_is_mirrored_to_the_backend,
    half_close_from_the_backend_keeps_the_client_direction_open,
    same_client_port_twice_keeps_the_port_when_time_wait_is_recyclable,
    same_client_port_twice_falls_back_to_an_ephemeral_port,
    same_client_port_twice_strict_drops_the_second,
    client_port_that_is_local_falls_back,
    ephemeral_source_port_policy,
    dynamic_destination_uses_the_header_destination,
    allowed_subnets_close_other_peers_before_reading,
    mark_is_set_on_upstream_sockets,
    listeners_open_that_many_reuseport_sockets,
    listen_transparent_binds_an_address_that_is_not_local,
    max_connections_makes_extra_clients_wait,
    sigterm_stops_accepting_and_drains,
    emfile_storm_is_survived,
    haproxy_send_proxy_v1_and_v2,
    nginx_stream_proxy_protocol,
);

fn v1_ipv4_client_is_spoofed(mode: &'static str) {
    let Some(ns) = netns_or_skip("v1_ipv4_client_is_spoofed") else {
        return;
    };
    let _d = start(&ns, mode, &[]);
    ns.run(async {
        let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let client = sa("192.0.2.1:40001");
        let mut s = connect_with_header(sa(PROXY4), &header::v1(client, sa(PROXY4))).await;
        assert_eq!(round_trip(&mut s, b"hello").await, b"hello");
        assert_eq!(backend.peers(), vec![client]);
    });
}

fn v2_ipv6_client_is_spoofed(mode: &'static str) {
    let Some(ns) = netns_or_skip("v2_ipv6_client_is_spoofed") else {
        return;
    };
    let _d = start(&ns, mode, &[]);
    ns.run(async {
        let backend = Backend::start(BACKEND6, BackendKind::Echo).await;
        let client = sa("[2001:db8::7]:40002");
        let mut s = connect_with_header(sa(PROXY6), &header::v2(client, sa(PROXY6))).await;
        assert_eq!(round_trip(&mut s, b"hello v6").await, b"hello v6");
        assert_eq!(backend.peers(), vec![client]);
    });
}

fn tcp6_header_over_ipv4_frontend_goes_to_the_ipv6_target(mode: &'static str) {
    let Some(ns) = netns_or_skip("tcp6_header_over_ipv4_frontend") else {
        return;
    };
    let _d = start(&ns, mode, &[]);
    ns.run(async {
        let backend6 = Backend::start(BACKEND6, BackendKind::Echo).await;
        let backend4 = Backend::start(BACKEND4, BackendKind::Echo).await;
        let client = sa("[2001:db8::9]:40003");
        let mut s =
            connect_with_header(sa(PROXY4), &header::v1(client, sa("[2001:db8::1]:443"))).await;
        assert_eq!(round_trip(&mut s, b"x").await, b"x");
        assert_eq!(backend6.peers(), vec![client]);
        assert!(backend4.peers().is_empty());
    });
}

fn v4_mapped_source_goes_to_the_ipv4_target(mode: &'static str) {
    let Some(ns) = netns_or_skip("v4_mapped_source") else {
        return;
    };
    let _d = start(&ns, mode, &[]);
    ns.run(async {
        let backend4 = Backend::start(BACKEND4, BackendKind::Echo).await;
        let hdr = header::v1(sa("[::ffff:192.0.2.5]:40004"), sa("[::ffff:192.0.2.1]:443"));
        let mut s = connect_with_header(sa(PROXY6), &hdr).await;
        assert_eq!(round_trip(&mut s, b"x").await, b"x");
        assert_eq!(backend4.peers(), vec![sa("192.0.2.5:40004")]);
    });
}

fn local_header_connects_without_spoofing(mode: &'static str) {
    let Some(ns) = netns_or_skip("local_header") else {
        return;
    };
    let _d = start(&ns, mode, &[]);
    ns.run(async {
        let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let mut s = connect_with_header(sa(PROXY4), &header::v2_local()).await;
        assert_eq!(round_trip(&mut s, b"health").await, b"health");
        let peers = backend.peers();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].ip(), sa(PROXY4).ip(), "LOCAL must not be spoofed");
        // v1 UNKNOWN is the same.
        let mut s = connect_with_header(sa(PROXY4), b"PROXY UNKNOWN\r\n").await;
        assert_eq!(round_trip(&mut s, b"u").await, b"u");
        assert_eq!(backend.peers()[1].ip(), sa(PROXY4).ip());
    });
}

fn header_split_over_three_segments(mode: &'static str) {
    let Some(ns) = netns_or_skip("header_split") else {
        return;
    };
    let _d = start(&ns, mode, &[]);
    ns.run(async {
        let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let client = sa("192.0.2.1:40005");
        for (done, hdr) in [
            header::v1(client, sa(PROXY4)),
            header::v2(client, sa(PROXY4)),
        ]
        .into_iter()
        .enumerate()
        {
            let mut s = TcpStream::connect(PROXY4).await.unwrap();
            s.set_nodelay(true).unwrap();
            let third = hdr.len() / 3;
            for part in [&hdr[..third], &hdr[third..2 * third], &hdr[2 * third..]] {
                s.write_all(part).await.unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            assert_eq!(round_trip(&mut s, b"after split").await, b"after split");
            drop(s);
            // The same client port again: wait for the backend's close.
            backend.wait_for_ends(done + 1).await;
        }
        assert!(backend.peers().iter().all(|p| p.ip() == client.ip()));
    });
}

fn payload_sent_with_the_header_and_server_speaks_first(mode: &'static str) {
    let Some(ns) = netns_or_skip("payload_with_header") else {
        return;
    };
    let _d = start(&ns, mode, &[]);
    ns.run(async {
        let _backend = Backend::start(BACKEND4, BackendKind::ServerFirst).await;
        let mut bytes = header::v2(sa("192.0.2.1:40006"), sa(PROXY4));
        bytes.extend_from_slice(b"early bytes");
        let mut s = TcpStream::connect(PROXY4).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        let mut got = vec![0u8; GREETING.len() + b"early bytes".len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
            .await
            .expect("greeting and echo")
            .unwrap();
        assert_eq!(&got[..GREETING.len()], GREETING);
        assert_eq!(&got[GREETING.len()..], b"early bytes");
    });
}

fn one_gib_each_way_verified_with_half_close(mode: &'static str) {
    let Some(ns) = netns_or_skip("one_gib_each_way") else {
        return;
    };
    let _d = start(&ns, mode, &[]);
    ns.run(async {
        let _backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let outcome = support::echo_verified(sa(PROXY4), sa("192.0.2.1:40007"), 1 << 30).await;
        assert!(outcome.is_complete(1 << 30), "{outcome:?}");
    });
}

fn thousand_concurrent_connections(mode: &'static str) {
    let Some(ns) = netns_or_skip("thousand_concurrent") else {
        return;
    };
    let _d = start(&ns, mode, &["-v", "0"]);
    ns.run(async {
        let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let mut tasks = Vec::new();
        for i in 0..1000u16 {
            tasks.push(tokio::spawn(async move {
                let client = SocketAddr::from(([192, 0, 2, 1 + (i % 200) as u8], 20000 + i));
                let mut s = connect_with_header(sa(PROXY4), &header::v2(client, sa(PROXY4))).await;
                let msg = support::pattern_chunk(u64::from(i), 64);
                assert_eq!(round_trip(&mut s, &msg).await, msg);
                // Hold every connection open until all have echoed.
                s
            }));
        }
        let mut open = Vec::new();
        for t in tasks {
            open.push(t.await.unwrap());
        }
        let mut peers = backend.peers();
        peers.sort();
        peers.dedup();
        assert_eq!(
            peers.len(),
            1000,
            "distinct spoofed clients seen by the backend"
        );
    });
}

fn headerless_connections_are_closed_at_the_deadline(mode: &'static str) {
    let Some(ns) = netns_or_skip("headerless_connections") else {
        return;
    };
    let _d = start(&ns, mode, &["--header-timeout", "2"]);
    ns.run(async {
        let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let started = Instant::now();
        let mut silent = Vec::new();
        for _ in 0..100 {
            silent.push(TcpStream::connect(PROXY4).await.unwrap());
        }
        // A good client is served at once, whatever the silent ones do.
        let mut s =
            connect_with_header(sa(PROXY4), &header::v1(sa("192.0.2.1:40008"), sa(PROXY4))).await;
        assert_eq!(round_trip(&mut s, b"ok").await, b"ok");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "good client delayed"
        );
        for mut c in silent {
            let _ = wait_closed(&mut c, Duration::from_secs(4)).await;
        }
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1900),
            "closed before the deadline: {took:?}"
        );
        assert!(took < Duration::from_secs(5), "closed late: {took:?}");
        assert_eq!(backend.peers().len(), 1);
    });
}

fn backend_down_closes_the_client_promptly(mode: &'static str) {
    let Some(ns) = netns_or_skip("backend_down") else {
        return;
    };
    let _d = start(&ns, mode, &[]);
    ns.run(async {
        let mut s =
            connect_with_header(sa(PROXY4), &header::v1(sa("192.0.2.1:40009"), sa(PROXY4))).await;
        let started = Instant::now();
        let end = wait_closed(&mut s, Duration::from_secs(3)).await;
        assert!(started.elapsed() < Duration::from_secs(1));
        // The refusal is mirrored: a reset, not a clean end of stream.
        assert_eq!(end.unwrap_err().kind(), ErrorKind::ConnectionReset);
    });
}

fn backend_that_never_accepts_times_out(mode: &'static str) {
    let Some(ns) = netns_or_skip("backend_never_accepts") else {
        return;
    };
    let _d = start(&ns, mode, &["--connect-timeout", "1"]);
    ns.run(async {
        // A listener whose accept queue is full drops further SYNs, so
        // connect() hangs: what a blackholed backend looks like.
        let listener =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        listener.bind(&sa(BACKEND4).into()).unwrap();
        listener.listen(0).unwrap();
        let mut fillers = Vec::new();
        for _ in 0..2 {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(BACKEND4)).await
            {
                fillers.push(s);
            }
        }
        let mut s =
            connect_with_header(sa(PROXY4), &header::v1(sa("192.0.2.1:40010"), sa(PROXY4))).await;
        let started = Instant::now();
        let _ = wait_closed(&mut s, Duration::from_secs(5)).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(3),
            "took {took:?}"
        );
    });
}

fn backend_reset_is_mirrored_to_the_client(mode: &'static str) {
    let Some(ns) = netns_or_skip("backend_reset") else {
        return;
    };
    let _d = start(&ns, mode, &[]);
    ns.run(async {
        let _backend = Backend::start(BACKEND4, BackendKind::Reset).await;
        let mut s =
            connect_with_header(sa(PROXY4), &header::v1(sa("192.0.2.1:40011"), sa(PROXY4))).await;
        let end = wait_closed(&mut s, Duration::from_secs(3)).await;
        assert_eq!(end.unwrap_err().kind(), ErrorKind::ConnectionReset);
    });
}

fn client_reset_is_mirrored_to_the_backend(mode: &'static str) {
    let Some(ns) = netns_or_skip("client_reset") else {
        return;
    };
    let _d = start(&ns, mode, &[]);
    ns.run(async {
        let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let mut s =
            connect_with_header(sa(PROXY4), &header::v1(sa("192.0.2.1:40012"), sa(PROXY4))).await;
        assert_eq!(round_trip(&mut s, b"x").await, b"x");
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
        let deadline = Instant::now() + Duration::from_secs(3);
        while backend.ends().is_empty() {
            assert!(Instant::now() < deadline, "backend connection never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(backend.ends(), vec![Some(ErrorKind::ConnectionReset)]);
    });
}

fn half_close_from_the_backend_keeps_the_client_direction_open(mode: &'static str) {
    let Some(ns) = netns_or_skip("backend_half_close") else {
        return;
    };
    let _d = start(&ns, mode, &[]);
    ns.run(async {
        // The backend says its piece and half-closes; then reads a reply.
        let listener = tokio::net::TcpListener::bind(BACKEND4).await.unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"bye").await.unwrap();
            s.shutdown().await.unwrap();
            let mut reply = Vec::new();
            s.read_to_end(&mut reply).await.unwrap();
            reply
        });
        let mut s =
            connect_with_header(sa(PROXY4), &header::v1(sa("192.0.2.1:40013"), sa(PROXY4))).await;
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"bye");
        s.write_all(b"still here").await.unwrap();
        s.shutdown().await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply, b"still here");
    });
}

/// Two connections from the same client ip:port, the first closed by the
/// client, so the proxy's upstream socket holds the 4-tuple in TIME_WAIT.
///
/// Linux recycles a TIME_WAIT tuple for an explicitly bound port when the
/// connection used TCP timestamps (PAWS keeps it safe), so by default the
/// second connection keeps the client's port. Without timestamps (some
/// hosts disable them) the tuple is unavailable: `connect()` fails with
/// EADDRNOTAVAIL, and the --source-port policy decides.
fn without_tcp_timestamps(ns: &Netns) {
    let ok = ns
        .command("sysctl")
        .args(["-qw", "net.ipv4.tcp_timestamps=0"])
        .status()
        .unwrap();
    assert!(ok.success());
}

async fn same_port_twice(backend: &Backend) -> (bool, bool) {
    let client = sa("192.0.2.1:40014");
    let mut s = connect_with_header(sa(PROXY4), &header::v1(client, sa(PROXY4))).await;
    assert_eq!(round_trip(&mut s, b"first").await, b"first");
    s.shutdown().await.unwrap();
    let _ = wait_closed(&mut s, Duration::from_secs(3)).await;
    let mut s = connect_with_header(sa(PROXY4), &header::v1(client, sa(PROXY4))).await;
    s.write_all(b"second").await.unwrap();
    let mut buf = [0u8; 6];
    let second_ok = matches!(
        tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut buf)).await,
        Ok(Ok(_))
    );
    (backend.peers().first() == Some(&client), second_ok)
}

fn same_client_port_twice_keeps_the_port_when_time_wait_is_recyclable(mode: &'static str) {
    let Some(ns) = netns_or_skip("same_port_recycled") else {
        return;
    };
    let _d = start(&ns, mode, &[]);
    ns.run(async {
        let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let (first_spoofed, second_ok) = same_port_twice(&backend).await;
        assert!(first_spoofed && second_ok);
        let peers = backend.peers();
        assert_eq!(peers[1], peers[0], "the client's own ip:port both times");
    });
}

fn same_client_port_twice_falls_back_to_an_ephemeral_port(mode: &'static str) {
    let Some(ns) = netns_or_skip("same_port_fallback") else {
        return;
    };
    without_tcp_timestamps(&ns);
    let d = start(&ns, mode, &[]);
    ns.run(async {
        let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let (first_spoofed, second_ok) = same_port_twice(&backend).await;
        assert!(first_spoofed);
        assert!(second_ok, "second connection must be served");
        let peers = backend.peers();
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[1].ip(), peers[0].ip(), "still the client's IP");
        assert_ne!(peers[1].port(), peers[0].port(), "an ephemeral port");
    });
    d.wait_for_log("ephemeral port", Duration::from_secs(2));
}

fn same_client_port_twice_strict_drops_the_second(mode: &'static str) {
    let Some(ns) = netns_or_skip("same_port_strict") else {
        return;
    };
    without_tcp_timestamps(&ns);
    let _d = start(&ns, mode, &["--source-port", "strict"]);
    ns.run(async {
        let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let (first_spoofed, second_ok) = same_port_twice(&backend).await;
        assert!(first_spoofed);
        assert!(!second_ok, "strict must drop the second connection");
        assert_eq!(backend.peers().len(), 1);
    });
}

fn client_port_that_is_local_falls_back(mode: &'static str) {
    let Some(ns) = netns_or_skip("client_port_local") else {
        return;
    };
    // Loopback sources are refused by default (tests/policy.rs); allowed
    // here, the header can name a port that is local and in use.
    let _d = start(&ns, mode, &["--allow-source", "127.0.0.0/8"]);
    ns.run(async {
        let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        // The header names mmproxy's own listening address as the client.
        let mut s = connect_with_header(sa(PROXY4), &header::v1(sa(PROXY4), sa(PROXY4))).await;
        assert_eq!(round_trip(&mut s, b"x").await, b"x");
        let peer = backend.peers()[0];
        assert_eq!(peer.ip(), sa(PROXY4).ip());
        assert_ne!(peer.port(), 8443);
    });
}

fn ephemeral_source_port_policy(mode: &'static str) {
    let Some(ns) = netns_or_skip("ephemeral_policy") else {
        return;
    };
    let _d = start(&ns, mode, &["--source-port", "ephemeral"]);
    ns.run(async {
        let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let mut s =
            connect_with_header(sa(PROXY4), &header::v1(sa("192.0.2.1:1"), sa(PROXY4))).await;
        assert_eq!(round_trip(&mut s, b"x").await, b"x");
        let peer = backend.peers()[0];
        assert_eq!(peer.ip(), sa("192.0.2.1:1").ip());
        assert!(peer.port() >= 1024, "ephemeral port, got {}", peer.port());
    });
}

fn dynamic_destination_uses_the_header_destination(mode: &'static str) {
    let Some(ns) = netns_or_skip("dynamic_destination") else {
        return;
    };
    let _d = start(
        &ns,
        mode,
        &[
            "--dynamic-destination",
            "--allowed-destinations",
            "127.0.0.1/32:9123",
            "-4",
            "127.0.0.1:1",
        ],
    );
    ns.run(async {
        let backend = Backend::start("127.0.0.1:9123", BackendKind::Echo).await;
        let other = Backend::start("127.0.0.1:9124", BackendKind::Echo).await;
        let client = sa("192.0.2.1:40015");
        let mut s =
            connect_with_header(sa(PROXY4), &header::v2(client, sa("127.0.0.1:9123"))).await;
        assert_eq!(round_trip(&mut s, b"x").await, b"x");
        assert_eq!(backend.peers(), vec![client]);
        // A destination outside --allowed-destinations: closed, never reached.
        let mut s =
            connect_with_header(sa(PROXY4), &header::v2(client, sa("127.0.0.1:9124"))).await;
        wait_closed(&mut s, Duration::from_secs(5))
            .await
            .expect("a refused destination closes the client");
        assert!(other.peers().is_empty());
    });
}

fn allowed_subnets_close_other_peers_before_reading(mode: &'static str) {
    let Some(ns) = netns_or_skip("allowed_subnets") else {
        return;
    };
    let dir = tempdir();
    let deny = dir.join("deny.txt");
    std::fs::write(&deny, "# only the balancers\n198.51.100.0/24\n").unwrap();
    let allow = dir.join("allow.txt");
    std::fs::write(&allow, "127.0.0.0/8 # v4 loopback\n::1/128\n").unwrap();
    {
        let _d = start(&ns, mode, &["--allowed-subnets", deny.to_str().unwrap()]);
        ns.run(async {
            let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
            let mut s = TcpStream::connect(PROXY4).await.unwrap();
            let started = Instant::now();
            let _ = wait_closed(&mut s, Duration::from_secs(3)).await;
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "closed before the header timeout"
            );
            assert!(backend.peers().is_empty());
        });
    }
    let _d = start(&ns, mode, &["-allowed-subnets", allow.to_str().unwrap()]);
    ns.run(async {
        let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        for proxy in [PROXY4, PROXY6] {
            let mut s =
                connect_with_header(sa(proxy), &header::v1(sa("192.0.2.1:40016"), sa(PROXY4)))
                    .await;
            assert_eq!(round_trip(&mut s, b"x").await, b"x");
            drop(s);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(backend.peers().len(), 2);
    });
}

fn mark_is_set_on_upstream_sockets(mode: &'static str) {
    let Some(ns) = netns_or_skip("mark") else {
        return;
    };
    // Traffic to 127.0.0.2 is prohibited unless it carries mark 7.
    ns.only_marked_reaches("127.0.0.2/32", "7");
    let daemon = |listen, extra: &[&'static str]| {
        let mut args = vec!["-l", listen, "-4", "127.0.0.2:9000", "-v", "1"];
        args.extend(support::mode_args(mode));
        args.extend_from_slice(extra);
        Daemon::start(&ns, &args)
    };
    let marked = daemon("127.0.0.1:8443", &["-mark", "7"]);
    let unmarked = daemon("127.0.0.1:8444", &[]);
    ns.run(async {
        let backend = Backend::start("127.0.0.2:9000", BackendKind::Echo).await;
        let client = sa("192.0.2.1:40017");
        let mut s =
            connect_with_header(sa("127.0.0.1:8443"), &header::v1(client, sa(PROXY4))).await;
        assert_eq!(round_trip(&mut s, b"marked").await, b"marked");
        assert_eq!(backend.peers(), vec![client]);
        let mut s = connect_with_header(
            sa("127.0.0.1:8444"),
            &header::v1(sa("192.0.2.1:40018"), sa(PROXY4)),
        )
        .await;
        let _ = wait_closed(&mut s, Duration::from_secs(3)).await;
        assert_eq!(
            backend.peers().len(),
            1,
            "unmarked traffic must not reach the backend"
        );
    });
    drop(marked);
    unmarked.wait_for_log("connection failed", Duration::from_secs(2));
}

fn listeners_open_that_many_reuseport_sockets(mode: &'static str) {
    let Some(ns) = netns_or_skip("listeners") else {
        return;
    };
    let _d = start(&ns, mode, &["-listeners", "4"]);
    let out = ns
        .command("ss")
        .args(["-Hltn", "sport = :8443"])
        .output()
        .unwrap();
    let sockets = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(sockets, 4, "{}", String::from_utf8_lossy(&out.stdout));
    ns.run(async {
        let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        for i in 0..20u16 {
            let mut s = connect_with_header(
                sa(PROXY4),
                &header::v1(SocketAddr::from(([192, 0, 2, 1], 41000 + i)), sa(PROXY4)),
            )
            .await;
            assert_eq!(round_trip(&mut s, b"x").await, b"x");
        }
        assert_eq!(backend.peers().len(), 20);
    });
}

fn listen_transparent_binds_an_address_that_is_not_local(mode: &'static str) {
    const FOREIGN: &str = "198.51.100.7:8443";
    let Some(ns) = netns_or_skip("listen_transparent") else {
        return;
    };
    // Without the flag the address cannot be bound: start-up fails, exit 1.
    let out = ns
        .command(support::daemon_binary())
        .args(["-l", FOREIGN, "-4", BACKEND4])
        .args(support::mode_args(mode))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot listen on 198.51.100.7:8443"),
        "{stderr}"
    );
    // With it, IP_TRANSPARENT lets the listener take the address, as a
    // TPROXY set-up needs; a route then delivers it locally.
    let mut args = vec!["-l", FOREIGN, "--listen-transparent", "-4", BACKEND4];
    args.extend(support::mode_args(mode));
    let _d = Daemon::start(&ns, &args);
    ns.ip(&["route", "add", "local", "198.51.100.7/32", "dev", "lo"]);
    ns.run(async {
        let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let client = sa("192.0.2.1:40021");
        let mut s = connect_with_header(sa(FOREIGN), &header::v1(client, sa(FOREIGN))).await;
        assert_eq!(round_trip(&mut s, b"tproxy").await, b"tproxy");
        assert_eq!(backend.peers(), vec![client]);
    });
}

fn max_connections_makes_extra_clients_wait(mode: &'static str) {
    let Some(ns) = netns_or_skip("max_connections") else {
        return;
    };
    let _d = start(&ns, mode, &["--max-connections", "2"]);
    ns.run(async {
        let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let hdr = |port| header::v1(SocketAddr::from(([192, 0, 2, 1], port)), sa(PROXY4));
        let mut first = connect_with_header(sa(PROXY4), &hdr(42001)).await;
        let mut second = connect_with_header(sa(PROXY4), &hdr(42002)).await;
        round_trip(&mut first, b"1").await;
        round_trip(&mut second, b"2").await;
        let mut third = connect_with_header(sa(PROXY4), &hdr(42003)).await;
        third.write_all(b"3").await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(backend.peers().len(), 2, "the third must wait");
        drop(first);
        let mut buf = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(3), third.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(backend.peers().len(), 3);
    });
}

fn sigterm_stops_accepting_and_drains(mode: &'static str) {
    let Some(ns) = netns_or_skip("sigterm_drain") else {
        return;
    };
    let mut d = start(&ns, mode, &["--drain-timeout", "10"]);
    let pid = d.pid();
    let (open_tx, open_rx) = std::sync::mpsc::channel::<()>();
    let (term_tx, term_rx) = std::sync::mpsc::channel::<()>();
    let body = ns.spawn(async move {
        let _backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let mut s =
            connect_with_header(sa(PROXY4), &header::v1(sa("192.0.2.1:40019"), sa(PROXY4))).await;
        assert_eq!(round_trip(&mut s, b"before").await, b"before");
        open_tx.send(()).unwrap();
        tokio::task::spawn_blocking(move || term_rx.recv())
            .await
            .unwrap()
            .unwrap();
        // New connections are refused (soon), the open one still works.
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(PROXY4).await.is_ok() {
            assert!(Instant::now() < deadline, "listener still open after 5 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(round_trip(&mut s, b"during drain").await, b"during drain");
        drop(s);
        std::future::pending::<()>().await;
    });
    open_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(pid > 0);
    d.signal(rustix::process::Signal::TERM);
    term_tx.send(()).unwrap();
    let code = d.wait_exit(Duration::from_secs(8));
    drop(body);
    assert_eq!(code, Some(0), "exit code after drain");
    assert!(d.log().iter().any(|l| l.contains("draining")));
}

fn emfile_storm_is_survived(mode: &'static str) {
    let Some(ns) = netns_or_skip("emfile_storm") else {
        return;
    };
    // A hard limit of 48 open files: the daemon cannot raise it.
    let mut cmd = ns.command("prlimit");
    cmd.args(["--nofile=48:48", "--"])
        .arg(support::daemon_binary());
    let mut args = base_args(mode);
    args.extend_from_slice(&["-v", "1"]);
    let d = Daemon::start_with(cmd, &args);
    ns.run(async {
        let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let mut storm = Vec::new();
        for i in 0..150u16 {
            let hdr = header::v1(SocketAddr::from(([192, 0, 2, 2], 43000 + i)), sa(PROXY4));
            if let Ok(s) = tokio::time::timeout(
                Duration::from_millis(500),
                connect_with_header(sa(PROXY4), &hdr),
            )
            .await
            {
                storm.push(s);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(storm);
        // Served again once the storm's descriptors are closed (the accept
        // back-off is at most 1 s).
        let alive = sa("192.0.2.1:40020");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // While the storm's descriptors are still being closed, the
            // daemon may accept and then close for want of a descriptor
            // for the upstream socket: such an attempt is retried, not a
            // failure (the log must say it backed off, below).
            let attempt = tokio::time::timeout(Duration::from_secs(2), async {
                let mut s = connect_with_header(sa(PROXY4), &header::v1(alive, sa(PROXY4))).await;
                s.write_all(b"alive").await?;
                let mut buf = [0u8; 5];
                s.read_exact(&mut buf).await?;
                Ok::<_, std::io::Error>(buf)
            })
            .await;
            if matches!(attempt, Ok(Ok(buf)) if &buf == b"alive") {
                break;
            }
            assert!(Instant::now() < deadline, "not served 10 s after the storm");
        }
        assert!(backend.peers().contains(&sa("192.0.2.1:40020")));
    });
    d.wait_for_log("backing off", Duration::from_secs(1));
}

fn tempdir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "mmproxy-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A helper process killed on drop (haproxy, nginx).
struct Helper(std::process::Child);

impl Helper {
    /// Spawns `cmd` with its output discarded: a helper must never hold
    /// the test harness's stdout open.
    fn spawn(mut cmd: std::process::Command, what: &str) -> Self {
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        Self(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("cannot start {what}: {e}")),
        )
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until something listens on `port` inside `ns`.
fn wait_listening(ns: &Netns, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = ns
            .command("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .unwrap();
        if !out.stdout.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The client host connects through a real balancer in front of mmproxy;
/// the backend must see the client's own address and port. While the
/// client holds its connection open, `ss` in the proxy's namespace shows
/// the upstream socket mmproxy opened to the backend. The caller keeps an
/// echo backend running on `BACKEND4` (`echo_backend`).
fn through_balancer(ns: &Netns, client_ns: &Netns, balancer_port: u16) {
    let proxy_ns = ns.name.clone();
    let (client_port, upstream_sockets) = client_ns.run(async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(sa("192.0.2.10:0")).unwrap();
        let local = socket.local_addr().unwrap();
        let mut s = socket
            .connect(SocketAddr::from(([192, 0, 2, 1], balancer_port)))
            .await
            .unwrap();
        assert_eq!(round_trip(&mut s, b"via balancer").await, b"via balancer");
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &proxy_ns,
                "ss",
                "-Htn",
                "state",
                "established",
                "dport = :9000",
            ])
            .output()
            .unwrap();
        (
            local.port(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    });
    assert!(
        upstream_sockets.contains(&format!("192.0.2.10:{client_port}")),
        "the backend should see 192.0.2.10:{client_port}; ss shows:\n{upstream_sockets}"
    );
}

/// One echo backend for a whole test. Started once per balancer pass, its
/// port could still be held when the next pass binds it: the listener's
/// file stays open while any thread of this test process is between
/// `fork` and `exec` (the tests spawn `ip`, `ss` and balancers in parallel),
/// which is the likely reason the second bind failed with `EADDRINUSE` once
/// in CI (not reproduced in 60 runs alone).
fn echo_backend(ns: &Netns) -> Background {
    ns.spawn(async {
        let _backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        std::future::pending::<()>().await;
    })
}

fn haproxy_send_proxy_v1_and_v2(mode: &'static str) {
    let Some(ns) = netns_or_skip("haproxy") else {
        return;
    };
    let client_ns = ns.client_host();
    let _d = start(&ns, mode, &[]);
    let dir = tempdir();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend v1\n  bind 192.0.2.1:7001\n  default_backend mm_v1\n\
         frontend v2\n  bind 192.0.2.1:7002\n  default_backend mm_v2\n\
         backend mm_v1\n  server mm 127.0.0.1:8443 send-proxy\n\
         backend mm_v2\n  server mm 127.0.0.1:8443 send-proxy-v2\n",
    )
    .unwrap();
    let mut haproxy = ns.command("haproxy");
    haproxy.args(["-db", "-f"]).arg(&cfg);
    let _haproxy = Helper::spawn(haproxy, "haproxy (apt-get install haproxy)");
    wait_listening(&ns, 7001);
    wait_listening(&ns, 7002);
    let _backend = echo_backend(&ns);
    through_balancer(&ns, &client_ns, 7001);
    through_balancer(&ns, &client_ns, 7002);
}

fn nginx_stream_proxy_protocol(mode: &'static str) {
    let Some(ns) = netns_or_skip("nginx") else {
        return;
    };
    let client_ns = ns.client_host();
    let _d = start(&ns, mode, &[]);
    let dir = tempdir();
    let cfg = dir.join("nginx.conf");
    std::fs::write(
        &cfg,
        format!(
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
             daemon off;\nmaster_process off;\nerror_log {dir}/error.log;\npid {dir}/nginx.pid;\n\
             events {{ worker_connections 64; }}\n\
             stream {{ server {{ listen 192.0.2.1:7003; proxy_pass 127.0.0.1:8443; proxy_protocol on; }} }}\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    let mut nginx = ns.command("nginx");
    nginx.arg("-p").arg(&dir).arg("-c").arg(&cfg);
    let _nginx = Helper::spawn(nginx, "nginx (apt-get install nginx libnginx-mod-stream)");
    wait_listening(&ns, 7003);
    let _backend = echo_backend(&ns);
    through_balancer(&ns, &client_ns, 7003);
}
