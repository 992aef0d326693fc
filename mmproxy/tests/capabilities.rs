//! The hardened systemd unit's capability set is enough
//! (examples/mmproxy.service): the daemon runs as `nobody` with only
//! `CAP_NET_ADMIN` (plus `CAP_BPF` and `CAP_PERFMON` in ebpf mode), installs its
//! routing with --setup-routes (its lock in `$RUNTIME_DIRECTORY`, as
//! `RuntimeDirectory=` provides), spoofs TCP and UDP clients, and removes
//! the routing at exit.

#[macro_use]
mod support;

use std::{os::unix::fs::PermissionsExt as _, time::Duration};

use support::{
    Backend, BackendKind, Daemon, Netns, connect_with_header, daemon_binary, header, netns_or_skip,
    round_trip, sa,
    udp::{UdpBackend, datagram, exchange},
};

const PROXY: &str = "127.0.0.1:8443";
const BACKEND: &str = "127.0.0.1:9000";
const NOBODY: &str = "65534";

both_modes!(basic_tcp_and_udp_as_nobody_with_the_units_capabilities);

fn basic_tcp_and_udp_as_nobody_with_the_units_capabilities(mode: &'static str) {
    let Some(_root) = netns_or_skip("basic_tcp_and_udp_as_nobody") else {
        return;
    };
    let ns = Netns::without_routing();
    let caps = if mode == "ebpf" {
        "-all,+net_admin,+bpf,+perfmon"
    } else {
        "-all,+net_admin"
    };
    let runtime_dir =
        std::env::temp_dir().join(format!("mmproxy-caps-{}-{mode}", std::process::id()));
    std::fs::create_dir_all(&runtime_dir).unwrap();
    std::fs::set_permissions(&runtime_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut cmd = ns.command("setpriv");
    cmd.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        &format!("--inh-caps={caps}"),
        &format!("--ambient-caps={caps}"),
        &format!("--bounding-set={caps}"),
        "--",
    ])
    .arg(daemon_binary())
    .env("RUNTIME_DIRECTORY", &runtime_dir);
    let mut d = Daemon::start_with(
        cmd,
        &[
            "-l",
            PROXY,
            "-p",
            "tcp,udp",
            "-4",
            BACKEND,
            "--mode",
            mode,
            "--setup-routes",
        ],
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains(NOBODY)),
        "not running as nobody:\n{status}"
    );
    ns.run(async {
        let tcp_backend = Backend::start(BACKEND, BackendKind::Echo).await;
        let udp_backend = UdpBackend::start(BACKEND).await;
        let client = sa("192.0.2.1:40100");
        let mut s = connect_with_header(sa(PROXY), &header::v2(client, sa(PROXY))).await;
        assert_eq!(round_trip(&mut s, b"tcp").await, b"tcp");
        assert_eq!(tcp_backend.peers(), vec![client]);
        let lb = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let msg = datagram(&header::v2_dgram(client, sa(PROXY)), b"udp");
        assert_eq!(exchange(&lb, sa(PROXY), &msg).await.0, b"udp");
        assert_eq!(udp_backend.peers(), vec![client]);
    });
    d.signal(rustix::process::Signal::TERM);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
    d.wait_for_log("removed the routing added at start", Duration::from_secs(1));
    let _ = std::fs::remove_dir_all(runtime_dir);
}

/// `--mode auto` (the default) carries TCP in ebpf mode where the BPF
/// programs load on a kernel it was measured on (`AUTO_EBPF_SINCE`), and
/// says why not and carries it in plain mode where they cannot load
/// (here: without `CAP_BPF`); `mmproxy check` says the same.
#[test]
fn auto_mode_carries_tcp_in_ebpf_mode_where_it_loads() {
    let measured_kernel = mmproxy::forward::auto_ebpf_obstacle().is_none();
    for with_bpf in [true, false] {
        let Some(ns) = netns_or_skip("auto_tcp") else {
            return;
        };
        let caps = if with_bpf {
            support::CAPS_EBPF
        } else {
            support::CAPS_PLAIN
        };
        let setpriv = |ns: &Netns| support::daemon_with_capabilities(ns, caps);
        let ebpf = with_bpf && measured_kernel;
        let mut check = setpriv(&ns);
        let out = check
            .args(["check", "-l", PROXY, "-4", BACKEND])
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        let expected = if ebpf {
            "PASS  mode auto carries TCP in ebpf mode"
        } else {
            "INFO  mode auto carries TCP in plain mode: "
        };
        assert!(report.contains(expected), "{expected:?} not in:\n{report}");

        let d = Daemon::start_with(setpriv(&ns), &["-l", PROXY, "-4", BACKEND, "-v", "1"]);
        let listening = d.wait_for_log("listening (tcp)", Duration::from_secs(10));
        if ebpf {
            assert!(listening.contains("mode=\"ebpf\""), "{listening}");
            d.wait_for_log("mode auto: TCP in ebpf mode", Duration::from_secs(1));
        } else {
            assert!(listening.contains("mode=\"plain\""), "{listening}");
            d.wait_for_log("mode auto: TCP in plain mode", Duration::from_secs(1));
        }
        ns.run(async {
            let backend = Backend::start(BACKEND, BackendKind::Echo).await;
            let client = sa("192.0.2.1:40200");
            let mut s = connect_with_header(sa(PROXY), &header::v2(client, sa(PROXY))).await;
            assert_eq!(round_trip(&mut s, b"auto").await, b"auto");
            assert_eq!(backend.peers(), vec![client]);
        });
    }
}
