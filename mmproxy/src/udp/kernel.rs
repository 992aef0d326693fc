//! ebpf mode for UDP: hands established sessions to the kernel path
//! (`bpf::udp`, the TC program) and reads back what it did.
//!
//! The daemon stays the control plane. A flow's first datagram is handled
//! here as in plain mode (allowed subnets, policy, caps, the spoofed
//! upstream socket); once the session exists and has forwarded that
//! datagram, [`KernelPath::offload`] writes it into the program's maps and
//! the kernel forwards the flow's later datagrams and relays the
//! backend's replies without waking the daemon. The session keeps its
//! upstream socket: it holds the client's address:port, and it is where
//! anything the program passes (fragments, TLVs, ...) still goes.
//!
//! The sweeper reads each offloaded session's kernel counters
//! ([`Offload::take_new_counts`]) into the UDP counters, so
//! `mmproxy_udp_forwarded` and friends count both paths, and treats a
//! session the kernel saw traffic on as active.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
};

use mmproxy_common::udp::{Endpoint, ForwardAction, ForwardKey, ReplyAction, ReplyKey, UdpCounter};

use crate::bpf::udp::{
    KernelSession, SessionCounts, UdpDatapath, UdpDatapathOptions, UdpLoadError,
};

/// The loaded UDP program, shared by every session.
#[derive(Debug)]
pub struct KernelPath {
    datapath: UdpDatapath,
    header_first: bool,
    mark: u32,
}

/// Everything the kernel needs to know about one session.
#[derive(Debug, Clone, Copy)]
pub struct SessionRoute {
    /// Where the balancer sends from, and the device its datagrams
    /// arrive on (replies leave through it).
    pub balancer: SocketAddr,
    pub balancer_ifindex: u32,
    /// The local address the balancer sent to (and replies come from).
    pub listener: SocketAddr,
    /// The header's source and destination.
    pub client: SocketAddr,
    pub header_destination: SocketAddr,
    /// The upstream socket's address and the backend it is connected to.
    pub upstream: SocketAddr,
    pub backend: SocketAddr,
}

/// Why a session stays in userspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ineligible {
    /// The balancer, the client and the backend are not all one family:
    /// the program does not translate between IPv4 and IPv6.
    MixedFamilies,
    /// The backend is not a loopback address: the program delivers
    /// through `lo` only (remote backends take the userspace path).
    RemoteBackend,
}

impl KernelPath {
    pub fn load(max_sessions: u32, header_first: bool, mark: u32) -> Result<Self, UdpLoadError> {
        let datapath = UdpDatapath::load(UdpDatapathOptions {
            max_sessions,
            header_first,
        })?;
        Ok(Self {
            datapath,
            header_first,
            mark,
        })
    }

    pub fn datapath(&self) -> &UdpDatapath {
        &self.datapath
    }

    /// The program's own counters, by name (`UdpCounter`).
    pub fn program_counters(&self) -> Vec<(&'static str, u64)> {
        UdpCounter::ALL
            .iter()
            .map(|&c| (c.name(), self.datapath.counter(c)))
            .collect()
    }

    /// Writes a session into the program's maps. The caller has checked
    /// [`eligibility`] (and says why a session stays in userspace).
    pub fn offload(self: &Arc<Self>, route: &SessionRoute) -> Result<Offload, aya::maps::MapError> {
        debug_assert!(eligibility(route).is_ok(), "{route:?}");
        let entries = self.entries(route);
        self.datapath.install(&entries)?;
        Ok(Offload {
            path: self.clone(),
            entries,
            seen: Mutex::new(SessionCounts::default()),
        })
    }

    fn entries(&self, route: &SessionRoute) -> KernelSession {
        let balancer = Endpoint::from(route.balancer);
        let listener = Endpoint::from(route.listener);
        let upstream = Endpoint::from(route.upstream);
        let backend = Endpoint::from(route.backend);
        let forward_key = ForwardKey {
            balancer,
            client: Endpoint::from(route.client),
            destination: Endpoint::from(route.header_destination),
        };
        KernelSession {
            forward_key,
            forward: ForwardAction {
                listener,
                source: upstream,
                backend,
                mark: self.mark,
                ..ForwardAction::default()
            },
            reply_key: ReplyKey { upstream, backend },
            reply: ReplyAction {
                listener,
                balancer,
                ifindex: route.balancer_ifindex,
                ..ReplyAction::default()
            },
            flow: self.header_first.then_some(balancer),
        }
    }
}

/// Whether the program can carry a session.
pub fn eligibility(route: &SessionRoute) -> Result<(), Ineligible> {
    let wire_v4 = route.balancer.ip().to_canonical().is_ipv4();
    let same_family = [route.client, route.upstream, route.backend]
        .iter()
        .all(|a| a.ip().to_canonical().is_ipv4() == wire_v4);
    // A client given as IPv4 in an IPv6 header would need the header's
    // family on the wire; the parser unmaps it, so compare raw families.
    if !same_family || route.client.is_ipv4() != wire_v4 {
        return Err(Ineligible::MixedFamilies);
    }
    let loopback = match route.backend.ip().to_canonical() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback(),
    };
    if !loopback {
        return Err(Ineligible::RemoteBackend);
    }
    Ok(())
}

/// A session's entries in the kernel's maps. Removed by
/// [`Offload::remove`] when the session closes; a session dropped without
/// closing (never, in the daemon) leaves them until the maps go.
#[derive(Debug)]
pub struct Offload {
    path: Arc<KernelPath>,
    entries: KernelSession,
    /// What [`Offload::take_new_counts`] has reported so far.
    seen: Mutex<SessionCounts>,
}

impl Offload {
    /// The balancer address this session's datagrams come from.
    pub fn balancer(&self) -> Endpoint {
        self.entries.forward_key.balancer
    }

    /// What the kernel counted since the last call.
    pub fn take_new_counts(&self) -> SessionCounts {
        let now = self.path.datapath.counts(&self.entries);
        self.advance(now)
    }

    /// Takes the session out of the kernel; returns the counts not yet
    /// reported. The kernel passes the flow's later datagrams to userspace.
    pub fn remove(&self) -> SessionCounts {
        let now = self.path.datapath.remove(&self.entries);
        self.advance(now)
    }

    fn advance(&self, now: SessionCounts) -> SessionCounts {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let new = SessionCounts {
            forwarded: now.forwarded.saturating_sub(seen.forwarded),
            forwarded_bytes: now.forwarded_bytes.saturating_sub(seen.forwarded_bytes),
            replied: now.replied.saturating_sub(seen.replied),
            replied_bytes: now.replied_bytes.saturating_sub(seen.replied_bytes),
        };
        // A removed entry reads as zero: keep the high-water mark.
        *seen = SessionCounts {
            forwarded: seen.forwarded.max(now.forwarded),
            forwarded_bytes: seen.forwarded_bytes.max(now.forwarded_bytes),
            replied: seen.replied.max(now.replied),
            replied_bytes: seen.replied_bytes.max(now.replied_bytes),
        };
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(balancer: &str, client: &str, backend: &str) -> SessionRoute {
        let upstream: SocketAddr = client.parse().unwrap();
        SessionRoute {
            balancer: balancer.parse().unwrap(),
            balancer_ifindex: 1,
            listener: "127.0.0.1:8443".parse().unwrap(),
            client: client.parse().unwrap(),
            header_destination: "192.0.2.9:443".parse().unwrap(),
            upstream,
            backend: backend.parse().unwrap(),
        }
    }

    #[test]
    fn same_family_sessions_to_loopback_backends_are_offloaded() {
        assert_eq!(
            eligibility(&route(
                "10.0.0.1:5000",
                "198.51.100.7:40000",
                "127.0.0.1:9000"
            )),
            Ok(())
        );
        assert_eq!(
            eligibility(&route(
                "[2001:db8::1]:5000",
                "[2001:db8::7]:40000",
                "[::1]:9000"
            )),
            Ok(())
        );
        // An IPv4 balancer seen on a dual-stack socket.
        assert_eq!(
            eligibility(&route(
                "[::ffff:10.0.0.1]:5000",
                "198.51.100.7:40000",
                "127.0.0.1:9000"
            )),
            Ok(())
        );
    }

    #[test]
    fn mixed_families_and_remote_backends_stay_in_userspace() {
        assert_eq!(
            eligibility(&route("10.0.0.1:5000", "[2001:db8::7]:40000", "[::1]:9000")),
            Err(Ineligible::MixedFamilies)
        );
        assert_eq!(
            eligibility(&route(
                "10.0.0.1:5000",
                "198.51.100.7:40000",
                "10.0.0.9:9000"
            )),
            Err(Ineligible::RemoteBackend)
        );
    }
}
