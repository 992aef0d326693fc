//! Deployment: systemd socket activation (`LISTEN_FDS`) and the
//! zero-downtime upgrade on SIGUSR2.

#[macro_use]
mod support;

use std::{
    net::SocketAddr,
    os::{
        fd::{AsRawFd as _, OwnedFd, RawFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rustix::process::Signal;
use support::{
    Backend, BackendKind, Daemon, Netns, connect_with_header, daemon_binary,
    echo_verified_with_pauses, header, http_get, netns_or_skip, round_trip, sa,
    udp::{UdpBackend, datagram, exchange},
};
use tokio::net::UdpSocket;

const BACKEND4: &str = "127.0.0.1:9000";
const BACKEND6: &str = "[::1]:9000";
const PROXY4: &str = "127.0.0.1:8443";
const METRICS: &str = "127.0.0.1:9100";
/// Where `-l` points when the sockets are handed over: must stay unbound.
const UNUSED_LISTEN: &str = "127.0.0.1:8444";
/// Bytes each way of a transfer that spans an upgrade.
const LONG_TOTAL: u64 = 48 << 20;

/// The command systemd would run for a socket-activated service:
/// `sockets` at descriptors 3.., `LISTEN_FDS`, `LISTEN_FDNAMES`, and
/// `LISTEN_PID` naming the daemon itself (the shell execs it, so its pid
/// is the daemon's).
fn activated_command(ns: &Netns, sockets: Vec<(OwnedFd, &str)>, args: &[&str]) -> Command {
    const MAX: usize = 8;
    assert!(sockets.len() <= MAX);
    let names: Vec<&str> = sockets.iter().map(|(_, n)| *n).collect();
    let mut raw = [-1 as RawFd; MAX];
    for (slot, (fd, _)) in raw.iter_mut().zip(&sockets) {
        *slot = fd.as_raw_fd();
    }
    let count = sockets.len();
    // Owned by the command, so they stay open until it is spawned.
    let keep: Vec<OwnedFd> = sockets.into_iter().map(|(fd, _)| fd).collect();
    let mut cmd = ns.command("sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
        .arg(daemon_binary())
        .args(args)
        .env("LISTEN_FDS", count.to_string())
        .env("LISTEN_FDNAMES", names.join(":"));
    // SAFETY: only fcntl and dup2 (async-signal-safe) on a fixed array.
    unsafe {
        cmd.pre_exec(move || {
            let _ = &keep;
            // Out of the way first, then into place; dup2 clears
            // close-on-exec on the copy.
            let mut high = [-1 as RawFd; MAX];
            for i in 0..count {
                high[i] = libc::fcntl(raw[i], libc::F_DUPFD_CLOEXEC, 100);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, fd) in high.iter().take(count).enumerate() {
                let target = 3 + i32::try_from(i).unwrap_or(0);
                if libc::dup2(*fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// Listening sockets made inside `ns`, as systemd makes them.
fn sockets_in(ns: &Netns) -> (OwnedFd, OwnedFd, OwnedFd) {
    ns.run(async {
        let tcp = std::net::TcpListener::bind(PROXY4).expect("bind tcp");
        let udp = std::net::UdpSocket::bind(PROXY4).expect("bind udp");
        let metrics = std::net::TcpListener::bind(METRICS).expect("bind metrics");
        (tcp.into(), udp.into(), metrics.into())
    })
}

#[test]
fn socket_activation_serves_on_the_sockets_it_is_given() {
    let Some(_root) = netns_or_skip("socket_activation_serves_on_the_sockets_it_is_given") else {
        return;
    };
    let ns = Netns::new();
    let (tcp, udp, metrics) = sockets_in(&ns);
    let cmd = activated_command(
        &ns,
        vec![(tcp, "proxy"), (udp, "proxy"), (metrics, "metrics")],
        &[
            "-l",
            UNUSED_LISTEN,
            "-p",
            "tcp,udp",
            "-4",
            BACKEND4,
            "-6",
            BACKEND6,
            "--mode",
            "plain",
        ],
    );
    let d = Daemon::start_with(cmd, &[]);
    d.wait_for_log("listening (udp)", Duration::from_secs(5));
    let line = d.wait_for_log(
        "using handed-over listening sockets",
        Duration::from_secs(1),
    );
    assert!(line.contains("LISTEN_FDS"), "{line}");
    ns.run(async {
        let backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let client = sa("192.0.2.7:40001");
        let mut s = connect_with_header(sa(PROXY4), &header::v1(client, sa(PROXY4))).await;
        assert_eq!(round_trip(&mut s, b"activated").await, b"activated");
        assert_eq!(backend.wait_for_peers(1).await, vec![client]);

        let udp_backend = UdpBackend::start(BACKEND4).await;
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let udp_client = sa("192.0.2.7:40002");
        let d = datagram(&header::v2_dgram(udp_client, sa(PROXY4)), b"dgram");
        let (reply, from) = exchange(&sock, sa(PROXY4), &d).await;
        assert_eq!((reply.as_slice(), from), (&b"dgram"[..], sa(PROXY4)));
        assert_eq!(udp_backend.peers(), vec![udp_client]);

        let (status, _) = http_get(sa(METRICS), "/healthz").await;
        assert_eq!(status, 200, "metrics on the socket named \"metrics\"");
        let refused = tokio::net::TcpStream::connect(UNUSED_LISTEN).await;
        assert!(
            refused.is_err(),
            "-l is not bound when sockets are handed over"
        );
    });
}

#[test]
fn socket_activation_refuses_a_socket_it_would_not_serve() {
    let Some(_root) = netns_or_skip("socket_activation_refuses_a_socket_it_would_not_serve") else {
        return;
    };
    let ns = Netns::new();
    let (tcp, udp, _metrics) = sockets_in(&ns);
    let out = activated_command(
        &ns,
        vec![(tcp, "proxy"), (udp, "proxy")],
        &[
            "-p", "tcp", "-4", BACKEND4, "-6", BACKEND6, "--mode", "plain", "-q",
        ],
    )
    .stdin(Stdio::null())
    .output()
    .expect("run mmproxy");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "LISTEN_FDS passed a UDP socket on 127.0.0.1:8443, but -p does not include udp"
        ),
        "{stderr}"
    );
}

/// A process the test did not start but must not leave running: the
/// upgraded daemon, a child of the old one.
struct Orphan(i32);

impl Orphan {
    fn from_log(line: &str) -> Self {
        let pid = line
            .split("pid=")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {line}"));
        Self(pid)
    }

    fn alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.0)).is_ok_and(|stat| {
            stat.rsplit(") ")
                .next()
                .is_some_and(|s| !s.starts_with('Z'))
        })
    }

    fn signal(&self, sig: Signal) {
        support::signal_pid(self.0, sig);
    }

    /// SIGTERM; true if it is gone within `timeout`.
    fn stop(&self, timeout: Duration) -> bool {
        self.signal(Signal::TERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.alive() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Orphan {
    fn drop(&mut self) {
        if !self.stop(Duration::from_secs(3)) {
            self.signal(Signal::KILL);
        }
    }
}

/// What a client opening connection after connection saw.
#[derive(Debug, Default)]
struct Churn {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// Opens a connection, exchanges 64 bytes, closes; again and again until
/// `stop`. Every client port is new, so no 4-tuple is reused.
async fn churn(churn: Arc<Churn>, stop: Arc<AtomicBool>) {
    let mut port = 20_000u16;
    while !stop.load(Ordering::Relaxed) {
        port = if port >= 60_000 { 20_000 } else { port + 1 };
        let client = SocketAddr::new(sa("192.0.2.9:1").ip(), port);
        let attempt = tokio::time::timeout(Duration::from_secs(5), async {
            let mut s = tokio::net::TcpStream::connect(PROXY4).await?;
            tokio::io::AsyncWriteExt::write_all(&mut s, &header::v1(client, sa(PROXY4))).await?;
            let msg = [0x5a; 64];
            tokio::io::AsyncWriteExt::write_all(&mut s, &msg).await?;
            let mut back = [0u8; 64];
            tokio::io::AsyncReadExt::read_exact(&mut s, &mut back).await?;
            Ok::<bool, std::io::Error>(back == msg)
        })
        .await;
        match attempt {
            Ok(Ok(true)) => churn.ok.fetch_add(1, Ordering::Relaxed),
            other => {
                eprintln!("churn connection from {client} failed: {other:?}");
                churn.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// An echo backend, three long transfers (each sends `true` on `long`
/// when it ends exact) and the connection churn, in `ns`.
fn start_traffic(
    ns: &Netns,
    churned: &Arc<Churn>,
    stop: &Arc<AtomicBool>,
) -> (support::Background, std::sync::mpsc::Receiver<bool>) {
    let (long_tx, long_rx) = std::sync::mpsc::channel();
    let (churned, stop) = (churned.clone(), stop.clone());
    let traffic = ns.spawn(async move {
        let _backend = Backend::start(BACKEND4, BackendKind::Echo).await;
        let long: Vec<_> = (0..3u16)
            .map(|i| {
                let client = SocketAddr::new(sa("192.0.2.8:1").ip(), 41_000 + i);
                tokio::spawn(echo_verified_with_pauses(
                    sa(PROXY4),
                    client,
                    LONG_TOTAL,
                    Some((4 << 20, Duration::from_millis(100))),
                ))
            })
            .collect();
        let client_loop = tokio::spawn(churn(churned, stop));
        for t in long {
            let outcome = t.await.unwrap();
            long_tx.send(outcome.is_complete(LONG_TOTAL)).unwrap();
        }
        let _ = client_loop.await;
        std::future::pending::<()>().await;
    });
    (traffic, long_rx)
}

/// The upgrade contract: a client that keeps opening connections sees
/// none refused or reset, transfers begun before it finish exact (the
/// old instance drains them), the old instance exits 0, and the
/// `--setup-routes` routing passes to the new one, which removes it at
/// its own exit.
fn upgrade_refuses_nothing_and_finishes_long_transfers(mode: &str) {
    let Some(_root) = netns_or_skip("upgrade_refuses_nothing_and_finishes_long_transfers") else {
        return;
    };
    let ns = Netns::without_routing();
    let before = ns.routing_listing();
    let mut old = Daemon::start(
        &ns,
        &[
            "-l",
            PROXY4,
            "-4",
            BACKEND4,
            "-6",
            BACKEND6,
            "--mode",
            mode,
            "--setup-routes",
            "--metrics-addr",
            METRICS,
        ],
    );
    let churned = Arc::new(Churn::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (_traffic, long_rx) = start_traffic(&ns, &churned, &stop);
    std::thread::sleep(Duration::from_millis(400));
    let ok_before = churned.ok.load(Ordering::Relaxed);
    assert!(ok_before > 0, "the churn runs before the upgrade");
    old.signal(Signal::USR2);
    let line = old.wait_for_log("upgrade: the new instance serves", Duration::from_secs(20));
    let new = Orphan::from_log(&line);
    assert_ne!(new.0, old.pid());
    assert_eq!(
        old.wait_exit(Duration::from_secs(30)),
        Some(0),
        "the old instance drains and exits 0"
    );
    for _ in 0..3 {
        let complete = long_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("long transfer ends");
        assert!(complete, "a transfer begun before the upgrade is exact");
    }
    let ok_at_exit = churned.ok.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(100));
    let (ok, failed) = (
        churned.ok.load(Ordering::Relaxed),
        churned.failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "churn: {ok_before} before the upgrade, {ok_at_exit} by the old one's exit, {ok} in all, {failed} failed"
    );
    assert_eq!(failed, 0, "no connection refused, reset or stalled");
    assert!(
        ok > ok_at_exit,
        "the new instance serves after the old one left"
    );
    assert!(new.alive());
    old.wait_for_log("exiting", Duration::from_secs(1));
    assert!(
        !old.log()
            .iter()
            .any(|l| l.contains("removed the routing added at start")),
        "the old instance leaves the routing to the new one"
    );
    assert_ne!(
        ns.routing_listing(),
        before,
        "the routing stays while the new one runs"
    );
    assert!(
        new.stop(Duration::from_secs(10)),
        "the new instance stops on SIGTERM"
    );
    assert_eq!(
        ns.routing_listing(),
        before,
        "the new instance removed the routing at exit"
    );
}

both_modes!(upgrade_refuses_nothing_and_finishes_long_transfers);

/// Writes `contents` to `path` the way a package manager replaces a
/// binary: a new file renamed over the old one.
fn replace_file(path: &Path, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A copy of the daemon in a directory of its own, removed on drop.
struct Installed(PathBuf);

impl Installed {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("mmproxy-upgrade-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("mmproxy");
        replace_file(&exe, &std::fs::read(daemon_binary()).unwrap());
        Self(exe)
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn a_failed_upgrade_keeps_the_old_instance_serving_and_upgrades_chain() {
    let Some(_root) =
        netns_or_skip("a_failed_upgrade_keeps_the_old_instance_serving_and_upgrades_chain")
    else {
        return;
    };
    let ns = Netns::new();
    let installed = Installed::new();
    let mut old = Daemon::start_with(
        ns.command(&installed.0),
        &[
            "-l", PROXY4, "-4", BACKEND4, "-6", BACKEND6, "--mode", "plain",
        ],
    );
    let real = std::fs::read(&installed.0).unwrap();
    replace_file(
        &installed.0,
        b"#!/bin/sh\necho 'broken build' >&2\nexit 3\n",
    );
    old.signal(Signal::USR2);
    let line = old.wait_for_log("upgrade failed", Duration::from_secs(20));
    assert!(line.contains("keeps serving"), "{line}");
    let exchange_once = |port: u16| {
        ns.run(async move {
            let _backend = Backend::start(BACKEND4, BackendKind::Echo).await;
            let client = SocketAddr::new(sa("192.0.2.7:1").ip(), port);
            let mut s = connect_with_header(sa(PROXY4), &header::v1(client, sa(PROXY4))).await;
            round_trip(&mut s, b"still here").await
        })
    };
    assert_eq!(exchange_once(42_001), b"still here");

    // With the binary fixed, the next SIGUSR2 upgrades.
    replace_file(&installed.0, &real);
    old.signal(Signal::USR2);
    let line = old.wait_for_log("upgrade: the new instance serves", Duration::from_secs(20));
    let new = Orphan::from_log(&line);
    assert_eq!(old.wait_exit(Duration::from_secs(10)), Some(0));
    assert_eq!(exchange_once(42_002), b"still here");

    // The upgraded instance upgrades in turn (its log shares the pipe).
    new.signal(Signal::USR2);
    let line = old.wait_for_nth_log(
        "upgrade: the new instance serves",
        2,
        Duration::from_secs(20),
    );
    let newer = Orphan::from_log(&line);
    assert_ne!(newer.0, new.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while new.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!new.alive(), "the second instance drains and exits");
    assert_eq!(exchange_once(42_003), b"still here");
    assert!(newer.stop(Duration::from_secs(10)));
}

#[test]
fn a_udp_flow_continues_through_an_upgrade() {
    let Some(_root) = netns_or_skip("a_udp_flow_continues_through_an_upgrade") else {
        return;
    };
    let ns = Netns::new();
    let mut old = Daemon::start(
        &ns,
        &["-l", PROXY4, "-p", "udp", "-4", BACKEND4, "-6", BACKEND6],
    );
    let (sock_tx, sock_rx) = std::sync::mpsc::channel();
    let (step_tx, step_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let _flow = ns.spawn(async move {
        let backend = UdpBackend::start(BACKEND4).await;
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let client = sa("192.0.2.7:40100");
        let mut step_rx = step_rx;
        for round in 0..2u8 {
            let payload = [b'a' + round; 8];
            let d = datagram(&header::v2_dgram(client, sa(PROXY4)), &payload);
            let (reply, _) = exchange(&sock, sa(PROXY4), &d).await;
            assert_eq!(reply, payload);
            sock_tx.send(backend.peers()).unwrap();
            step_rx.recv().await;
        }
        std::future::pending::<()>().await;
    });
    assert_eq!(
        sock_rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        vec![sa("192.0.2.7:40100")]
    );
    old.signal(Signal::USR2);
    let line = old.wait_for_log("upgrade: the new instance serves", Duration::from_secs(20));
    let new = Orphan::from_log(&line);
    assert_eq!(old.wait_exit(Duration::from_secs(10)), Some(0));
    step_tx.send(()).unwrap();
    let peers = sock_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a reply through the new instance");
    assert_eq!(
        peers,
        vec![sa("192.0.2.7:40100")],
        "the same client address upstream"
    );
    assert!(new.stop(Duration::from_secs(10)));
}

/// Reads `NOTIFY_SOCKET` datagrams until one contains `wanted`.
fn wait_for_notification(sock: &std::os::unix::net::UnixDatagram, wanted: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            let found = message.lines().any(|l| l == wanted);
            seen.push(message);
            if found {
                return seen;
            }
        }
    }
    panic!("no {wanted:?} on NOTIFY_SOCKET within 10 s; seen {seen:?}");
}

/// What a `Type=notify` unit relies on: READY=1 once serving, MAINPID=
/// of the new instance from the old one after an upgrade, STOPPING=1 on
/// SIGTERM.
#[test]
fn systemd_hears_ready_the_new_main_pid_and_stopping() {
    let Some(_root) = netns_or_skip("systemd_hears_ready_the_new_main_pid_and_stopping") else {
        return;
    };
    let ns = Netns::new();
    let dir = std::env::temp_dir().join(format!("mmproxy-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify");
    let _ = std::fs::remove_file(&path);
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut cmd = ns.command(daemon_binary());
    cmd.env("NOTIFY_SOCKET", &path);
    let mut old = Daemon::start_with(
        cmd,
        &[
            "-l", PROXY4, "-4", BACKEND4, "-6", BACKEND6, "--mode", "plain",
        ],
    );
    wait_for_notification(&sock, "READY=1");
    old.signal(Signal::USR2);
    let line = old.wait_for_log("upgrade: the new instance serves", Duration::from_secs(20));
    let new = Orphan::from_log(&line);
    wait_for_notification(&sock, &format!("MAINPID={}", new.0));
    assert_eq!(old.wait_exit(Duration::from_secs(10)), Some(0));
    new.signal(Signal::TERM);
    wait_for_notification(&sock, "STOPPING=1");
    let _ = std::fs::remove_dir_all(&dir);
}
