//! UDP test support: an echo backend that records who sent what, and a
//! balancer-side client that sends header + payload datagrams.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::net::UdpSocket;

/// One datagram a backend received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub from: SocketAddr,
    pub payload: Vec<u8>,
}

/// A UDP backend that echoes every datagram to its sender and records it.
#[derive(Clone)]
pub struct UdpBackend {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl UdpBackend {
    pub async fn start(bind: &str) -> Self {
        let socket = UdpSocket::bind(bind).await.expect("bind UDP backend");
        let addr = socket.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((len, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                record.lock().unwrap().push(Seen {
                    from,
                    payload: buf[..len].to_vec(),
                });
                let _ = socket.send_to(&buf[..len], from).await;
            }
        });
        Self { addr, seen }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The distinct source addresses seen, in order of first appearance.
    pub fn peers(&self) -> Vec<SocketAddr> {
        let mut peers = Vec::new();
        for s in self.seen() {
            if !peers.contains(&s.from) {
                peers.push(s.from);
            }
        }
        peers
    }

    /// Waits until `n` datagrams have arrived.
    pub async fn wait_for(&self, n: usize) -> Vec<Seen> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = self.seen();
            if seen.len() >= n {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "backend saw {} of {n} datagrams",
                seen.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// `header` followed by `payload`, as one datagram.
pub fn datagram(header: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut d = header.to_vec();
    d.extend_from_slice(payload);
    d
}

/// Receives one datagram within `timeout`: its payload and source.
pub async fn recv_within(socket: &UdpSocket, timeout: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 65_536];
    match tokio::time::timeout(timeout, socket.recv_from(&mut buf)).await {
        Ok(Ok((len, from))) => Some((buf[..len].to_vec(), from)),
        Ok(Err(e)) => panic!("recv: {e}"),
        Err(_) => None,
    }
}

/// Sends `datagram` to `proxy` and waits for one reply; returns it and
/// the address it came from. Panics after 5 s.
pub async fn exchange(
    socket: &UdpSocket,
    proxy: SocketAddr,
    datagram: &[u8],
) -> (Vec<u8>, SocketAddr) {
    socket
        .send_to(datagram, proxy)
        .await
        .expect("send datagram");
    recv_within(socket, Duration::from_secs(5))
        .await
        .expect("no reply through the proxy within 5 s")
}

/// The value of `name` in the daemon's "udp counters at exit" line.
pub fn exit_counter(line: &str, name: &str) -> u64 {
    let pattern = format!("(\"{name}\", ");
    let start = line
        .find(&pattern)
        .unwrap_or_else(|| panic!("no counter {name} in {line}"))
        + pattern.len();
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("counter {name} unreadable in {line}"))
}

/// The count for `name` in a `{"name": n, ...}` map of that line, or 0.
pub fn exit_map_count(line: &str, map: &str, name: &str) -> u64 {
    let Some(map_start) = line.find(&format!("{map}={{")) else {
        return 0;
    };
    let map_text = &line[map_start..];
    let map_text = &map_text[..map_text.find('}').unwrap_or(map_text.len())];
    let pattern = format!("\"{name}\": ");
    let Some(at) = map_text.find(&pattern) else {
        return 0;
    };
    map_text[at + pattern.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
