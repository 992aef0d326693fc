//! ebpf mode's UDP kernel path over a real device: the balancer in one
//! network namespace, the daemon and its backend in another, joined by a
//! veth pair with checksum offload off on both ends (so every receiver
//! verifies checksums in software and drops a wrong one), IPv4 and IPv6.
//!
//! What these tests hold the kernel path to:
//! - an established session bypasses the daemon: its own receive counter
//!   stays at the flow's first datagram while the flow goes on, and the
//!   program's counters account for every other datagram and every reply;
//! - every payload arrives intact and from the right addresses, for sizes
//!   around the checksum's chunking (odd lengths, 512-byte boundaries);
//! - what the program does not handle (fragments, a reply too large for
//!   the device, 127/8 from a device without `route_localnet`) takes the
//!   userspace path and still arrives;
//! - the program leaves every device when the daemon exits or is killed.

mod support;

use std::{net::SocketAddr, time::Duration};

use aya::programs::{SchedClassifier, TcAttachType};
use support::{
    Daemon, Netns, header, netns_or_skip, sa,
    udp::{UdpBackend, datagram, exchange, exit_counter, recv_within},
};
use tokio::net::UdpSocket;

const BACKEND4: &str = "127.0.0.1:9000";
const BACKEND6: &str = "[::1]:9000";
/// The daemon's side of the veth, and the balancer's.
const PROXY4: &str = "192.0.2.1:8443";
const PROXY6: &str = "[2001:db8:1::1]:8443";
const BALANCER4: &str = "192.0.2.10:0";
/// Payload sizes around the program's checksum arithmetic: empty, odd,
/// a 4-byte multiple, the 512-byte chunk edges, a typical MTU payload.
const SIZES: [usize; 9] = [0, 1, 3, 64, 511, 512, 513, 1025, 1400];

/// The daemon's namespace and the balancer's, joined by a veth.
struct Topology {
    daemon: Netns,
    balancer: Netns,
    /// The daemon side's veth.
    device: String,
}

impl Topology {
    /// `route_localnet`: whether `lo` in the daemon's namespace takes 127/8
    /// from other devices (`route_localnet` and `accept_local`: what the
    /// IPv4 kernel path needs).
    fn new(test: &str, route_localnet: bool) -> Option<Self> {
        let daemon = netns_or_skip(test)?;
        let balancer = daemon.client_host();
        let device = veth_of(&daemon);
        daemon.ip(&["addr", "add", "2001:db8:1::1/64", "dev", &device, "nodad"]);
        let peer = veth_of(&balancer);
        balancer.ip(&["addr", "add", "2001:db8:1::10/64", "dev", &peer, "nodad"]);
        for (ns, dev) in [(&daemon, &device), (&balancer, &peer)] {
            run(ns, "ethtool", &["-K", dev, "tx", "off", "rx", "off"]);
        }
        if route_localnet {
            run(
                &daemon,
                "sysctl",
                &[
                    "-qw",
                    "net.ipv4.conf.lo.route_localnet=1",
                    "net.ipv4.conf.lo.accept_local=1",
                ],
            );
        }
        Some(Self {
            daemon,
            balancer,
            device,
        })
    }

    fn start(&self, extra: &[&str]) -> Daemon {
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
            "--mode",
            "ebpf",
        ];
        args.extend_from_slice(extra);
        let d = Daemon::start(&self.daemon, &args);
        d.wait_for_log("listening (udp)", Duration::from_secs(10));
        d
    }

    /// A backend in the daemon's namespace, kept until the guard drops.
    fn backend(&self, bind: &'static str) -> (UdpBackend, support::Background) {
        let (tx, rx) = std::sync::mpsc::channel();
        let guard = self.daemon.spawn(async move {
            let backend = UdpBackend::start(bind).await;
            tx.send(backend).unwrap();
            std::future::pending::<()>().await;
        });
        (rx.recv().unwrap(), guard)
    }

    /// The names of the programs attached to a device's ingress.
    fn attached(&self, device: &str) -> Vec<String> {
        let device = device.to_owned();
        self.daemon.run(async move {
            let (_, programs) = SchedClassifier::query_tcx(&device, TcAttachType::Ingress)
                .unwrap_or_else(|e| panic!("query {device}: {e}"));
            programs
                .iter()
                .map(|p| p.name_as_str().unwrap_or_default().to_owned())
                .collect()
        })
    }
}

fn veth_of(ns: &Netns) -> String {
    let out = ns.ip_output(&["-o", "link", "show", "type", "veth"]);
    out.split(':')
        .nth(1)
        .map(|name| name.trim().split('@').next().unwrap_or_default().to_owned())
        .expect("a veth in the namespace")
}

fn run(ns: &Netns, program: &str, args: &[&str]) {
    let out = ns.command(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Stops the daemon; returns its UDP counters and program counters lines.
fn stop(d: Daemon) -> (String, String) {
    let (counters, program) = stop_with(d, true);
    (counters, program.unwrap_or_default())
}

fn payload(round: usize) -> Vec<u8> {
    let len = SIZES[round % SIZES.len()];
    (0..len).map(|i| (i * 7 + round).to_le_bytes()[0]).collect()
}

/// A flow of `rounds` echoes through the proxy from the balancer's
/// namespace: every reply is the payload, from the proxy's address; the
/// backend saw each from the client.
fn echo_flow(
    topo: &Topology,
    bind: &'static str,
    proxy: &'static str,
    client: &'static str,
    rounds: usize,
) {
    topo.balancer.run(async move {
        let lb = UdpSocket::bind(bind).await.unwrap();
        let hdr = header::v2_dgram(sa(client), sa(proxy));
        for round in 0..rounds {
            let body = payload(round);
            let (reply, from) = exchange(&lb, sa(proxy), &datagram(&hdr, &body)).await;
            assert_eq!(reply, body, "round {round}: {} bytes", body.len());
            assert_eq!(from, sa(proxy), "round {round}");
        }
    });
}

fn bypass(test: &str, backend_addr: &'static str, bind: &'static str, proxy: &'static str) {
    let Some(topo) = Topology::new(test, true) else {
        return;
    };
    let d = topo.start(&[]);
    let (backend, _guard) = topo.backend(backend_addr);
    let client = if proxy == PROXY4 {
        "198.51.100.7:40000"
    } else {
        "[2001:db8:9::7]:40000"
    };
    let rounds = 4 * SIZES.len();
    echo_flow(&topo, bind, proxy, client, rounds);
    let seen = backend.seen();
    assert_eq!(seen.len(), rounds);
    assert!(seen.iter().all(|s| s.from == sa(client)), "{seen:?}");
    for (round, s) in seen.iter().enumerate() {
        assert_eq!(s.payload, payload(round), "round {round} at the backend");
    }
    let (counters, program) = stop(d);
    let rounds = rounds as u64;
    assert_eq!(
        exit_counter(&counters, "userspace_received"),
        1,
        "only the first datagram reaches the daemon: {counters}"
    );
    assert_eq!(
        exit_counter(&counters, "kernel_forwarded"),
        rounds - 1,
        "{counters}"
    );
    // The first reply may reach the daemon's socket before the session is
    // installed (the backend answers while the daemon is still at it).
    assert!(
        exit_counter(&counters, "kernel_replied") >= rounds - 1,
        "{counters}"
    );
    assert_eq!(exit_counter(&counters, "received"), rounds, "{counters}");
    assert_eq!(exit_counter(&counters, "forwarded"), rounds, "{counters}");
    assert_eq!(exit_counter(&counters, "replied"), rounds, "{counters}");
    for outcome in ["errors", "passed_bad_checksum", "passed_localnet"] {
        assert_eq!(exit_counter(&program, outcome), 0, "{outcome}: {program}");
    }
}

#[test]
fn an_established_ipv4_session_bypasses_the_daemon_over_a_veth() {
    bypass("udp_kernel_bypass_ipv4", BACKEND4, "0.0.0.0:0", PROXY4);
}

#[test]
fn an_established_ipv6_session_bypasses_the_daemon_over_a_veth() {
    bypass("udp_kernel_bypass_ipv6", BACKEND6, "[::]:0", PROXY6);
}

/// Without `route_localnet` and `accept_local` on `lo`, an IPv4 datagram
/// redirected there for 127.0.0.1 would be dropped as martian: the program
/// passes those to the daemon instead, and relays the replies itself.
#[test]
fn without_route_localnet_ipv4_datagrams_take_the_userspace_path() {
    let Some(topo) = Topology::new("udp_kernel_no_localnet", false) else {
        return;
    };
    let d = topo.start(&[]);
    let (backend, _guard) = topo.backend(BACKEND4);
    let client = "198.51.100.8:40000";
    echo_flow(&topo, BALANCER4, PROXY4, client, 20);
    assert_eq!(backend.peers(), vec![sa(client)]);
    let (counters, program) = stop(d);
    assert_eq!(
        exit_counter(&counters, "userspace_received"),
        20,
        "{counters}"
    );
    assert!(
        exit_counter(&counters, "kernel_replied") >= 19,
        "{counters}"
    );
    assert_eq!(exit_counter(&program, "passed_localnet"), 19, "{program}");
}

/// 3,000 bytes over a 1,500-byte MTU: the balancer's datagram arrives as
/// fragments (the program passes them; the daemon gets the reassembled
/// datagram), and the backend's 3,000-byte reply does not fit the veth, so
/// the program passes it to the daemon, whose send fragments it.
#[test]
fn a_datagram_larger_than_the_mtu_arrives_whole_both_ways() {
    let Some(topo) = Topology::new("udp_kernel_fragments", true) else {
        return;
    };
    let d = topo.start(&[]);
    let (backend, _guard) = topo.backend(BACKEND4);
    let client = "198.51.100.9:40000";
    topo.balancer.run(async move {
        let lb = UdpSocket::bind(BALANCER4).await.unwrap();
        let hdr = header::v2_dgram(sa(client), sa(PROXY4));
        for (round, len) in [64usize, 3000, 64, 3000].into_iter().enumerate() {
            let body: Vec<u8> = (0..len).map(|i| (i % 251).to_le_bytes()[0]).collect();
            let (reply, _) = exchange(&lb, sa(PROXY4), &datagram(&hdr, &body)).await;
            assert_eq!(reply, body, "round {round}, {len} bytes");
        }
    });
    assert_eq!(backend.seen().len(), 4);
    let (counters, program) = stop(d);
    assert!(exit_counter(&program, "passed_shape") >= 2, "{program}");
    assert!(
        exit_counter(&program, "passed_reply_route") >= 2,
        "{program}"
    );
    assert_eq!(exit_counter(&counters, "kernel_forwarded"), 1, "{counters}");
    assert_eq!(exit_counter(&program, "errors"), 0, "{program}");
}

/// A payload that looks like a PROXY header is payload: in header mode
/// after the real header, in first-datagram mode anywhere after the
/// flow's first datagram. It never moves the flow to another client.
fn header_looking_payload(first_mode: bool) {
    let Some(topo) = Topology::new("udp_kernel_header_payload", true) else {
        return;
    };
    let d = topo.start(if first_mode {
        &["--udp-header", "first"]
    } else {
        &[]
    });
    let (backend, _guard) = topo.backend(BACKEND4);
    let client = sa("198.51.100.10:40000");
    let impostor = sa("203.0.113.66:6666");
    topo.balancer.run(async move {
        let lb = UdpSocket::bind(BALANCER4).await.unwrap();
        let real = header::v2_dgram(client, sa(PROXY4));
        let fake = datagram(&header::v2_dgram(impostor, sa(PROXY4)), b"not a header");
        exchange(&lb, sa(PROXY4), &datagram(&real, b"hello")).await;
        for _ in 0..3 {
            let sent = if first_mode {
                fake.clone()
            } else {
                datagram(&real, &fake)
            };
            let (reply, _) = exchange(&lb, sa(PROXY4), &sent).await;
            assert_eq!(reply, fake, "the look-alike header is echoed as payload");
        }
    });
    assert_eq!(backend.peers(), vec![client], "never the impostor");
    let (counters, _) = stop(d);
    assert_eq!(exit_counter(&counters, "kernel_forwarded"), 3, "{counters}");
}

#[test]
fn a_header_looking_payload_mid_flow_stays_payload() {
    header_looking_payload(false);
}

#[test]
fn a_header_looking_payload_mid_flow_stays_payload_in_first_datagram_mode() {
    header_looking_payload(true);
}

/// The program is on `lo` and the veth while the daemon runs, and on
/// neither after it exits or after SIGKILL; a daemon started after SIGKILL
/// serves. (A failed start is covered by SIGKILL: the attachments are TCX
/// links owned by the process, so no exit path, however abrupt, leaves
/// them; nothing in the daemon fails after the program is attached.)
#[test]
fn the_program_leaves_every_device_on_exit_and_on_sigkill() {
    let Some(topo) = Topology::new("udp_kernel_detach", true) else {
        return;
    };
    let ours = || vec!["udp_ingress".to_owned()];
    let (backend, _guard) = topo.backend(BACKEND4);

    let d = topo.start(&[]);
    assert_eq!(topo.attached("lo"), ours());
    assert_eq!(topo.attached(&topo.device), ours());
    stop(d);
    assert!(topo.attached("lo").is_empty(), "after a clean exit");
    assert!(topo.attached(&topo.device).is_empty());

    let mut d = topo.start(&[]);
    echo_flow(&topo, BALANCER4, PROXY4, "198.51.100.11:40000", 3);
    d.signal(rustix::process::Signal::KILL);
    d.wait_exit(Duration::from_secs(10));
    assert!(topo.attached("lo").is_empty(), "after SIGKILL");
    assert!(topo.attached(&topo.device).is_empty());

    let d = topo.start(&[]);
    echo_flow(&topo, BALANCER4, PROXY4, "198.51.100.11:40000", 3);
    let (counters, _) = stop(d);
    assert_eq!(exit_counter(&counters, "kernel_forwarded"), 2, "{counters}");
    assert_eq!(backend.peers(), vec![sa("198.51.100.11:40000")]);
}

/// Replies to a balancer that sends no more: relayed by the kernel all the
/// same, and counted.
#[test]
fn replies_the_backend_sends_unasked_are_relayed() {
    let Some(topo) = Topology::new("udp_kernel_unasked", true) else {
        return;
    };
    let d = topo.start(&[]);
    let client = sa("198.51.100.12:40000");
    // A backend that answers each datagram three times.
    let _guard = topo.daemon.spawn(async move {
        let socket = UdpSocket::bind(BACKEND4).await.unwrap();
        let mut buf = vec![0u8; 2048];
        loop {
            let (len, from) = socket.recv_from(&mut buf).await.unwrap();
            for _ in 0..3 {
                socket.send_to(&buf[..len], from).await.unwrap();
            }
        }
    });
    topo.balancer.run(async move {
        let lb = UdpSocket::bind(BALANCER4).await.unwrap();
        let hdr = header::v2_dgram(client, sa(PROXY4));
        for round in 0..3u8 {
            lb.send_to(&datagram(&hdr, &[round]), sa(PROXY4))
                .await
                .unwrap();
            for copy in 0..3 {
                let got = recv_within(&lb, Duration::from_secs(5)).await;
                let (reply, from): (Vec<u8>, SocketAddr) =
                    got.unwrap_or_else(|| panic!("round {round} copy {copy} lost"));
                assert_eq!((reply, from), (vec![round], sa(PROXY4)));
            }
        }
    });
    let (counters, _) = stop(d);
    assert_eq!(exit_counter(&counters, "replied"), 9, "{counters}");
    assert!(exit_counter(&counters, "kernel_replied") >= 6, "{counters}");
}

/// `--mode auto` carries UDP sessions in the kernel where the program
/// loads, and says why not and stays in userspace where it cannot (here:
/// run without `CAP_BPF`).
#[test]
fn auto_mode_uses_the_kernel_path_where_it_loads() {
    for with_bpf in [true, false] {
        let Some(topo) = Topology::new("udp_kernel_auto", true) else {
            return;
        };
        let caps = if with_bpf {
            support::CAPS_EBPF
        } else {
            support::CAPS_PLAIN
        };
        let cmd = support::daemon_with_capabilities(&topo.daemon, caps);
        let d = Daemon::start_with(
            cmd,
            &[
                "-p",
                "udp",
                "-l",
                "[::]:8443",
                "-4",
                BACKEND4,
                "-v",
                "1",
                "--mode",
                "auto",
            ],
        );
        let listening = d.wait_for_log("listening (udp)", Duration::from_secs(10));
        let (backend, _guard) = topo.backend(BACKEND4);
        echo_flow(&topo, BALANCER4, PROXY4, "198.51.100.13:40000", 5);
        assert_eq!(backend.peers(), vec![sa("198.51.100.13:40000")]);
        if with_bpf {
            assert!(listening.contains("mode=\"ebpf\""), "{listening}");
            d.wait_for_log("udp: kernel path attached", Duration::from_secs(1));
        } else {
            assert!(listening.contains("mode=\"plain\""), "{listening}");
            d.wait_for_log("mode auto: UDP stays in userspace", Duration::from_secs(1));
        }
        let (counters, _) = stop_with(d, with_bpf);
        let expected = if with_bpf { 4 } else { 0 };
        assert_eq!(
            exit_counter(&counters, "kernel_forwarded"),
            expected,
            "{counters}"
        );
    }
}

/// Stops the daemon; returns its UDP counters line and, when it has a
/// kernel path (`kernel`), its program counters line.
fn stop_with(mut d: Daemon, kernel: bool) -> (String, Option<String>) {
    d.signal(rustix::process::Signal::TERM);
    let counters = d.wait_for_log("udp counters at exit", Duration::from_secs(10));
    let program =
        kernel.then(|| d.wait_for_log("udp kernel program counters", Duration::from_secs(10)));
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0), "clean exit");
    (counters, program)
}

/// `mmproxy check` says whether `lo` takes 127/8 from other devices, as an
/// INFO line with the fix (the userspace path still works without it),
/// and PASS once the two sysctls are set.
#[test]
fn check_names_the_lo_sysctls_the_ipv4_kernel_path_needs() {
    for set in [false, true] {
        let Some(topo) = Topology::new("udp_kernel_check", set) else {
            return;
        };
        let out = topo
            .daemon
            .command(support::daemon_binary())
            .args([
                "check",
                "-p",
                "udp",
                "-l",
                "[::]:8443",
                "-4",
                BACKEND4,
                "--mode",
                "ebpf",
            ])
            .output()
            .expect("run mmproxy check");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("lo takes 127/8 from other devices"))
            .unwrap_or_else(|| panic!("no lo line in:\n{text}"));
        if set {
            assert!(line.starts_with("PASS"), "{text}");
        } else {
            assert!(line.starts_with("INFO"), "{text}");
            assert!(
                text.contains(
                    "fix: sysctl -w net.ipv4.conf.lo.route_localnet=1 net.ipv4.conf.lo.accept_local=1"
                ),
                "{text}"
            );
        }
    }
}
