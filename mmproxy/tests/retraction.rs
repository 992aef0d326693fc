//! A backend that retracts its TCP window must not deadlock a connection.
//!
//! The kernel side (docs/ebpf-findings.md, "The stall, reproduced"): a
//! receiver whose memory runs out inside its advertised window retracts
//! the window to zero ("tcp: correct handling of extreme memory squeeze").
//! If fewer than 2^scale bytes of the sender are then in flight beyond
//! the retracted edge, Linux before 7.1 stamps the sender's
//! acknowledgments with `snd_nxt`, beyond that edge, and the receiver
//! drops every one of them; a receiver that waits for those
//! acknowledgments before it reads again (an echo, a server that writes
//! its whole answer before reading on) never moves again. The daemon
//! clamps its upstream sockets' window (`--upstream-window-clamp-kib`), so
//! their window scale is 5 instead of 10 and only a sender with fewer than
//! 32 bytes in flight could be caught.
//!
//! The recipe is the kernel's own test for the squeeze
//! (`tcp_rcv_wnd_shrink_nomem.pkt`, net-next 2026): the backend holds
//! unread bytes, shrinks its `SO_RCVBUF`, and the next small segments find
//! no memory. Here they come from the client, through the daemon.

#[macro_use]
mod support;

use std::{
    io::Write as _,
    net::TcpListener as StdTcpListener,
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use support::{Daemon, Netns, connect_with_header, header, netns_or_skip, sa};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const PROXY: &str = "127.0.0.1:8443";
const BACKEND: &str = "127.0.0.1:9000";
/// What the backend writes while it does not read.
const ANSWER: u64 = 16 << 20;
/// Unread bytes the backend holds when it shrinks its receive buffer.
const HELD: usize = 60_000;
/// The small segments that then find no memory: each is less than the
/// 1 KiB that an unclamped upstream socket's scale (10) tolerates, and
/// stay under it even when a busy daemon merges three of them.
const SMALL: usize = 300;
const SMALL_COUNT: usize = 20;
/// No byte for this long counts as a deadlock.
const STALLED: Duration = Duration::from_secs(5);

both_modes!(backend_retracting_its_window_does_not_deadlock_the_connection);

/// With the default clamp the squeeze happens (the backend drops a segment
/// for memory) and the connection still completes.
fn backend_retracting_its_window_does_not_deadlock_the_connection(mode: &'static str) {
    let Some(ns) = netns_or_skip("backend_retracting_its_window") else {
        return;
    };
    let outcome = squeeze(&ns, mode, &[]);
    assert!(
        outcome.memory_drops >= 1,
        "the recipe did not squeeze the backend (TCPRcvQDrop {}): the test proves nothing",
        outcome.memory_drops
    );
    assert_eq!(
        outcome.received, ANSWER,
        "the client got {} of {ANSWER} bytes: the connection deadlocked\n{}",
        outcome.received, outcome.sockets
    );
}

/// The control: the same squeeze with the clamp off deadlocks on kernels
/// without the RFC 7323 receiver fix (net-next 0e24d17bd966, Linux 7.1),
/// and completes on kernels with it. This is what makes the test above
/// mean something on this kernel.
#[test]
fn without_the_clamp_the_squeeze_deadlocks_on_kernels_without_the_fix() {
    let Some(ns) = netns_or_skip("without_the_clamp") else {
        return;
    };
    let outcome = squeeze(&ns, "plain", &["--upstream-window-clamp-kib", "0"]);
    assert!(
        outcome.memory_drops >= 1,
        "the recipe did not squeeze the backend"
    );
    match kernel_accepts_segments_in_a_retracted_window() {
        Some(false) => assert!(
            outcome.received < ANSWER,
            "this kernel lacks the fix, yet the unclamped connection completed: \
             the recipe no longer reproduces the deadlock"
        ),
        Some(true) => assert_eq!(
            outcome.received, ANSWER,
            "the kernel has the fix, yet the connection deadlocked\n{}",
            outcome.sockets
        ),
        None => eprintln!(
            "without_the_clamp: no kernel BTF to tell whether the kernel has the fix; \
             received {} of {ANSWER}",
            outcome.received
        ),
    }
}

struct Outcome {
    /// Bytes of the backend's answer the client got before it stalled.
    received: u64,
    /// Segments dropped because the receiver's memory was full
    /// (`TcpExt: TCPRcvQDrop` in the test's namespace).
    memory_drops: u64,
    /// `ss -tnmi` in the namespace when the client stopped reading.
    sockets: String,
}

/// The client sends [`HELD`] bytes that the backend does not read; the
/// backend shrinks its receive buffer; the client sends [`SMALL_COUNT`]
/// segments of [`SMALL`] bytes, and the backend drops one for memory and
/// retracts its window to zero. Then the backend writes [`ANSWER`] bytes
/// without reading (as an echo blocked in `write` does) and the client
/// reads: the backend's writes complete only if the daemon's upstream
/// socket's acknowledgments are accepted.
fn squeeze(ns: &Netns, mode: &'static str, extra: &[&str]) -> Outcome {
    // In ebpf mode the squeeze must meet the kernel path: `mode_args`
    // arms from the first byte.
    let mut args = vec!["-l", PROXY, "-4", BACKEND];
    args.extend(support::mode_args(mode));
    args.extend_from_slice(extra);
    let _daemon = Daemon::start(ns, &args);
    ns.run(async move {
        let listener = StdTcpListener::bind(BACKEND).expect("bind the backend");
        let client_addr = sa("192.0.2.1:41000");
        let mut client = connect_with_header(sa(PROXY), &header::v1(client_addr, sa(PROXY))).await;
        client.set_nodelay(true).unwrap();
        let (backend, _) = listener.accept().expect("accept");

        client.write_all(&vec![b'a'; HELD]).await.unwrap();
        wait_for(
            || unread_bytes(&backend) >= HELD,
            "the backend holds the bytes",
        )
        .await;
        socket2::SockRef::from(&backend)
            .set_recv_buffer_size(16_000)
            .unwrap();
        let drops_before = memory_drops();
        for _ in 0..SMALL_COUNT {
            client.write_all(&[b's'; SMALL]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let memory_drops = memory_drops() - drops_before;

        // The writer blocks for good if the acknowledgments never arrive;
        // the daemon's exit (a reset) ends it. It hands the socket back
        // when done: closing it with unread bytes would send a reset.
        let writer = std::thread::spawn(move || {
            let mut backend = backend;
            let chunk = vec![b'b'; 64 << 10];
            let mut written = 0;
            while written < ANSWER && backend.write_all(&chunk).is_ok() {
                written += chunk.len() as u64;
            }
            backend
        });
        let received = read_until_stalled(&mut client).await;
        let sockets = socket_report();
        if received == ANSWER {
            drop(writer.join().unwrap());
        }
        drop(client);
        Outcome {
            received,
            memory_drops,
            sockets,
        }
    })
}

/// Reads until [`ANSWER`] bytes came or none came for [`STALLED`].
async fn read_until_stalled(client: &mut tokio::net::TcpStream) -> u64 {
    let mut buf = vec![0u8; 1 << 20];
    let mut received = 0u64;
    while received < ANSWER {
        match tokio::time::timeout(STALLED, client.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => received += n as u64,
            _ => break,
        }
    }
    received
}

async fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Bytes in a socket's receive queue (`FIONREAD`).
fn unread_bytes(s: &std::net::TcpStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &raw mut n) };
    assert_eq!(rc, 0, "FIONREAD");
    usize::try_from(n).unwrap_or(0)
}

/// The namespace's TCP sockets with their memory and window state.
fn socket_report() -> String {
    std::process::Command::new("ss")
        .arg("-tnmi")
        .output()
        .map_or_else(
            |e| format!("ss: {e}"),
            |out| String::from_utf8_lossy(&out.stdout).into_owned(),
        )
}

/// `TcpExt: TCPRcvQDrop` of the calling thread's network namespace.
fn memory_drops() -> u64 {
    let netstat = std::fs::read_to_string("/proc/thread-self/net/netstat").expect("read netstat");
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "TCPRcvQDrop")
        .map(|(_, value)| value.parse().unwrap())
        .expect("TCPRcvQDrop in /proc/net/netstat")
}

/// Whether the kernel has the RFC 7323 receiver fix, told by the field it
/// added to `struct tcp_sock` (`rcv_mwnd_seq`) in the kernel's BTF; `None`
/// without BTF.
fn kernel_accepts_segments_in_a_retracted_window() -> Option<bool> {
    let btf = std::fs::read("/sys/kernel/btf/vmlinux").ok()?;
    let needle = b"rcv_mwnd_seq";
    Some(btf.windows(needle.len()).any(|w| w == needle))
}
