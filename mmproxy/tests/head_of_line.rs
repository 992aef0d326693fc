//! Head-of-line blocking in plain mode (issue 33): an interactive
//! connection must not wait while a bulk connection keeps a runtime
//! worker busy.
//!
//! Measured in bytes, not milliseconds, so that a loaded machine cannot
//! make it pass or fail: the forwarder runs on a single-threaded runtime,
//! two floods keep their source sockets full, and for each of an
//! interactive connection's round trips the test counts how many flood
//! bytes the forwarder read meanwhile. A direction held until tokio's
//! budget runs out moves up to 128 pipe loads per poll (tens of MiB); one
//! that yields after its quantum (64 KiB) moves at most one more pipe load
//! before the request gets its turn. The daemon's forwarder goes further
//! and moves such floods to workers of their own (`forward/bulk.rs`): the
//! second test checks that both floods, and not the interactive
//! connection, are moved. No privileges or namespaces needed: loopback
//! sockets only.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::{AsRawFd as _, BorrowedFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    thread,
};

use bytes::Bytes;
use mmproxy::forward::{Connection, Forwarder, splice::SpliceForwarder};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Flood connections beside the interactive one.
const FLOODS: usize = 2;
/// Interactive round trips measured.
const ROUND_TRIPS: usize = 200;
/// The bound on the flood bytes read during any one round trip. A
/// direction that yields after its quantum moves at most that plus one
/// pipe load before the next task runs: measured, at most 2.2 MiB for both
/// floods together in 10 runs (a pipe holds up to 1 MiB of large skb
/// fragments: its capacity counts slots, not bytes). Held for a whole
/// tokio budget, the worst round trip of each of 5 runs saw 22 to 150 MiB.
const MAX_BOUND: u64 = 8 << 20;

/// A connected pair on loopback: (the end a peer uses, the accepted end).
fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let near = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (far, _) = listener.accept().unwrap();
    (near, far)
}

/// What the proxy read from a socket so far: received in sequence minus
/// what still waits in the receive queue.
fn consumed(fd: RawFd) -> u64 {
    // SAFETY: the sockets outlive every call (they are closed only after
    // the measurement, when the test ends).
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    // Queue first: bytes arriving between the two reads then count as
    // read (a few KiB too many), never as a negative amount.
    let queued = rustix::io::ioctl_fionread(fd).unwrap();
    let received = mmproxy::sockopt::tcp_info(&fd).unwrap().bytes_received;
    received.saturating_sub(queued)
}

/// `stream` as a tokio stream of the current runtime.
fn registered(stream: TcpStream) -> tokio::net::TcpStream {
    stream.set_nonblocking(true).unwrap();
    tokio::net::TcpStream::from_std(stream).unwrap()
}

/// The two sockets as the forwarder takes them, registered with `runtime`.
fn proxied(
    runtime: &tokio::runtime::Runtime,
    client: TcpStream,
    upstream: TcpStream,
) -> Connection {
    let _entered = runtime.enter();
    Connection {
        client: registered(client),
        upstream: registered(upstream),
        early_data: Bytes::new(),
        header_len: 0,
    }
}

/// Writes 64 KiB blocks into `to` until told to stop.
fn flood_writer(mut to: TcpStream, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let block = vec![0x5a_u8; 64 * 1024];
        while !stop.load(Relaxed) && to.write_all(&block).is_ok() {}
    })
}

/// Reads and discards until EOF or an error.
fn sink(mut from: TcpStream) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = vec![0_u8; 256 * 1024];
        while let Ok(1..) = from.read(&mut buf) {}
    })
}

#[test]
fn an_interactive_connection_is_served_between_flood_turns() {
    // On one runtime: the bulk workers would take the floods off this
    // thread, and the count would measure their parallel progress instead
    // of this runtime's turns (the move is tested below).
    let mut waits = interactive_beside_floods(SpliceForwarder::on_one_runtime());
    waits.sort_unstable();
    // The k-th hundredth of the sorted waits.
    let at = |percent: usize| waits[(waits.len() - 1) * percent / 100];
    let worst = at(100);
    let total: u64 = waits.iter().sum();
    eprintln!(
        "flood bytes read per interactive round trip: p50 {}, p90 {}, p99 {}, max {worst}, \
         total {total}",
        at(50),
        at(90),
        at(99),
    );
    assert!(
        total > 0,
        "the floods moved nothing while the interactive connection ran: the test measured nothing"
    );
    assert!(
        worst <= MAX_BOUND,
        "an interactive round trip waited for {worst} flood bytes (the worst of {ROUND_TRIPS}), \
         more than {MAX_BOUND}: a bulk direction held the worker"
    );
}

/// With the daemon's forwarder the two floods (1 MiB in a row each, their
/// sources never empty) move to the bulk workers and the interactive
/// connection stays: exactly two connections moved.
#[test]
fn floods_move_to_the_bulk_workers_and_the_interactive_connection_stays() {
    let before = mmproxy::forward::connections_moved_to_bulk_workers();
    let waits = interactive_beside_floods(SpliceForwarder::new());
    assert_eq!(waits.len(), ROUND_TRIPS);
    assert_eq!(
        mmproxy::forward::connections_moved_to_bulk_workers() - before,
        FLOODS as u64,
        "connections moved to the bulk workers"
    );
}

/// Runs `FLOODS` floods and one interactive connection through
/// `forwarder` on a one-thread runtime; returns, for each interactive
/// round trip, the flood bytes read meanwhile.
fn interactive_beside_floods(forwarder: SpliceForwarder) -> Vec<u64> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let forwarder = Arc::new(Forwarder::Plain(forwarder));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let mut flood_sources = Vec::new();
    for _ in 0..FLOODS {
        let (writer, proxy_client) = pair();
        let (proxy_upstream, backend) = pair();
        flood_sources.push(proxy_client.as_raw_fd());
        threads.push(flood_writer(writer, stop.clone()));
        threads.push(sink(backend));
        let forwarder = forwarder.clone();
        let conn = proxied(&runtime, proxy_client, proxy_upstream);
        runtime.spawn(async move { forwarder.forward(conn).await });
    }
    let (client, proxy_client) = pair();
    let (proxy_upstream, backend) = pair();
    let conn = proxied(&runtime, proxy_client, proxy_upstream);
    let interactive = {
        let forwarder = forwarder.clone();
        runtime.spawn(async move { forwarder.forward(conn).await })
    };
    let flood_read = move || flood_sources.iter().map(|&fd| consumed(fd)).sum::<u64>();
    // The interactive client and its echo backend are tasks of the same
    // runtime: a pause of this thread stops the floods' forwarding too, so
    // only the forwarder's own scheduling shows in the count.
    let waits = runtime.block_on(async move {
        let (mut client, backend) = (registered(client), registered(backend));
        tokio::spawn(async move {
            let (mut r, mut w) = backend.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        // Let the floods fill their sockets first.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let mut waits = Vec::with_capacity(ROUND_TRIPS);
        let (request, mut reply) = ([0x42_u8; 64], [0_u8; 64]);
        for _ in 0..ROUND_TRIPS {
            let before = flood_read();
            client.write_all(&request).await.unwrap();
            client.read_exact(&mut reply).await.unwrap();
            waits.push(flood_read().saturating_sub(before));
        }
        waits
    });
    stop.store(true, Relaxed);
    interactive.abort();
    drop(runtime);
    for t in threads {
        let _ = t.join();
    }
    waits
}
