//! The bad cases of a full backlog, in both data paths: a client that
//! stops reading, a backend that resets or half-closes while bytes are
//! queued toward a reader that is not reading, and a SIGTERM whose drain
//! timeout cuts transfers in the middle. Each must end with exact bytes or
//! a reset, never with a clean end of stream and bytes missing, and the
//! proxy host must hold a bounded amount meanwhile.

#[macro_use]
mod support;

use std::{
    io::ErrorKind,
    net::SocketAddr,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use support::{
    Backend, BackendKind, Daemon, Netns, SourceEnd, connect_with_header, header, netns_or_skip,
    pattern_chunk, sa,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const PROXY: &str = "127.0.0.1:8443";
const BACKEND: &str = "127.0.0.1:9000";

fn start(ns: &Netns, mode: &'static str, extra: &[&str]) -> Daemon {
    let mut args = vec!["-l", PROXY, "-4", BACKEND, "-v", "1"];
    args.extend(support::mode_args(mode));
    args.extend_from_slice(extra);
    Daemon::start(ns, &args)
}

each_data_path!(
    client_pauses_reading_for_10s_then_reads_everything,
    backend_reset_during_a_full_backlog_is_mirrored,
    backend_half_close_during_a_full_backlog,
    sigterm_during_backlogged_transfers_resets_what_it_cuts,
);

/// Reads from `s` until the end, checking every byte against the 1 MiB
/// pattern seeded by `seed`. Returns the bytes read and how it ended.
async fn read_pattern(
    s: &mut (impl tokio::io::AsyncRead + Unpin),
    seed: u16,
) -> (u64, Result<(), ErrorKind>) {
    let pattern = pattern_chunk(seed.into(), 1 << 20);
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await {
            Err(_) => return (at, Err(ErrorKind::TimedOut)),
            Ok(Ok(0)) => return (at, Ok(())),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return (at, Err(e.kind())),
        };
        for (i, b) in buf[..n].iter().enumerate() {
            let offset = at + i as u64;
            let want = pattern[usize::try_from(offset % (1 << 20)).unwrap()];
            assert_eq!(*b, want, "byte {offset} differs");
        }
        at += n as u64;
    }
}

/// The backend sends 128 MiB at once; the client reads nothing for 10 s,
/// then everything. Meanwhile the proxy host may hold only socket buffers
/// and the ebpf backlog limit, not the whole transfer.
fn client_pauses_reading_for_10s_then_reads_everything(mode: &'static str) {
    const MIB: u32 = 128;
    let Some(ns) = netns_or_skip("client_pauses") else {
        return;
    };
    let _d = start(&ns, mode, &[]);
    ns.run(async move {
        let backend = Backend::start(
            BACKEND,
            BackendKind::Source {
                mib: MIB,
                end: SourceEnd::HalfClose,
            },
        )
        .await;
        let client = sa("192.0.2.1:34001");
        let mut s = connect_with_header(sa(PROXY), &header::v2(client, sa(PROXY))).await;
        let mut held_max = 0u64;
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            let written = backend.progress().written.load(Ordering::Relaxed);
            let received = mmproxy::sockopt::tcp_info(&s).unwrap().bytes_received;
            held_max = held_max.max(written.saturating_sub(received));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (read, end) = read_pattern(&mut s, client.port()).await;
        eprintln!(
            "client paused, mode {mode}: at most {} MiB held by the proxy host",
            held_max >> 20
        );
        assert_eq!(end, Ok(()), "{mode}: the stream ended with an error");
        assert_eq!(read, u64::from(MIB) << 20, "{mode}: bytes read");
        assert!(
            held_max < 48 << 20,
            "{mode}: {held_max} bytes held while the client paused"
        );
        s.shutdown().await.unwrap();
    });
}

/// The backend writes 64 MiB and resets while the client is not reading:
/// the client must see the reset, after at most the bytes sent.
fn backend_reset_during_a_full_backlog_is_mirrored(mode: &'static str) {
    let Some(ns) = netns_or_skip("backend_reset_backlog") else {
        return;
    };
    let _d = start(&ns, mode, &[]);
    ns.run(async move {
        let _backend = Backend::start(
            BACKEND,
            BackendKind::Source {
                mib: 64,
                end: SourceEnd::Reset,
            },
        )
        .await;
        let client = sa("192.0.2.1:34002");
        let mut s = connect_with_header(sa(PROXY), &header::v2(client, sa(PROXY))).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (read, end) = read_pattern(&mut s, client.port()).await;
        assert_eq!(
            end,
            Err(ErrorKind::ConnectionReset),
            "{mode}: after {read} bytes the client saw {end:?}, not the backend's reset"
        );
    });
}

/// The backend sends 64 MiB and half-closes while the client is not
/// reading; the client then sends 1 MiB and half-closes. Both directions
/// must complete: the backend's FIN waits for its bytes, and does not
/// close the other direction.
fn backend_half_close_during_a_full_backlog(mode: &'static str) {
    let Some(ns) = netns_or_skip("backend_half_close_backlog") else {
        return;
    };
    let _d = start(&ns, mode, &[]);
    ns.run(async move {
        let backend = Backend::start(
            BACKEND,
            BackendKind::Source {
                mib: 64,
                end: SourceEnd::HalfClose,
            },
        )
        .await;
        let client = sa("192.0.2.1:34003");
        let s = connect_with_header(sa(PROXY), &header::v2(client, sa(PROXY))).await;
        let (mut r, mut w) = s.into_split();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let writer = tokio::spawn(async move {
            w.write_all(&vec![7u8; 1 << 20]).await.unwrap();
            w.shutdown().await.unwrap();
            w
        });
        let (read, end) = read_pattern(&mut r, client.port()).await;
        assert_eq!(end, Ok(()), "{mode}: the backend's half-close");
        assert_eq!(read, 64 << 20, "{mode}: bytes before the backend's FIN");
        let _w = writer.await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while backend.progress().read.load(Ordering::Relaxed) < 1 << 20 {
            assert!(
                Instant::now() < deadline,
                "{mode}: the backend got {} of the client's bytes after its FIN",
                backend.progress().read.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// Four full-duplex transfers too long for a 2 s drain; in ebpf mode with
/// a 16 KiB backlog limit, so they switch between REDIRECT and PASS all
/// the time. SIGTERM, then the drain timeout: every transfer must be
/// either complete or reset, never cleanly short.
fn sigterm_during_backlogged_transfers_resets_what_it_cuts(mode: &'static str) {
    const TRANSFERS: u16 = 4;
    let Some(ns) = netns_or_skip("sigterm_backlog") else {
        return;
    };
    let mut extra = vec!["--drain-timeout", "2"];
    if support::is_ebpf(mode) {
        extra.extend(["--ebpf-max-backlog-kib", "16"]);
    }
    let mut d = start(&ns, mode, &extra);
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let (code, outcomes) = std::thread::scope(|scope| {
        let transfers = scope.spawn(|| {
            ns.run(async move {
                let _backend = Backend::start(BACKEND, BackendKind::Echo).await;
                let mut tasks = Vec::new();
                for i in 0..TRANSFERS {
                    let client = SocketAddr::from(([192, 0, 2, 1], 34100 + i));
                    tasks.push(tokio::spawn(support::echo_verified(
                        sa(PROXY),
                        client,
                        4 << 30,
                    )));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                started_tx.send(()).unwrap();
                let mut outcomes = Vec::new();
                for t in tasks {
                    outcomes.push(t.await.unwrap());
                }
                outcomes
            })
        });
        // Generous: under a concurrent compile on 2 cores this client's
        // runtime once needed more than 10 s to run its 1 s timer.
        started_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        d.signal(rustix::process::Signal::TERM);
        let code = d.wait_exit(Duration::from_secs(10));
        (code, transfers.join().unwrap())
    });
    assert_eq!(code, Some(0), "{mode}: exit code after the drain timeout");
    for o in &outcomes {
        assert!(
            !o.is_silent_failure(4 << 30),
            "{mode}: a cut transfer ended cleanly: {o:?}"
        );
        assert!(
            !o.is_complete(4 << 30),
            "{mode}: 4 GiB completed within the drain: the test cut nothing"
        );
    }
    assert!(
        d.log()
            .iter()
            .any(|l| l.contains("resetting remaining connections")),
        "{mode}: the drain timeout did not expire"
    );
}
