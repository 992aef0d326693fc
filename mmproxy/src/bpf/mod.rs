//! The BPF loaders: each loads an object built by `cargo xtask
//! build-ebpf`, fills in what it needs from the kernel's BTF, attaches its
//! program and gives typed access to its maps. This file: the TCP verdict
//! (attached to the socket map); [`udp`]: the UDP TC program.

pub mod btf;
mod loader;
pub mod udp;

use std::{
    os::fd::AsRawFd,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf, SockHash},
    programs::SkSkb,
};
use mmproxy_common::sockmap::{
    CONTROLS_MAP, COUNTERS_MAP, Counter, FlowControl, KernelOffsets, OFFSETS_MAP, SIGNALS_MAP,
    SOCKETS_MAP, STATES_MAP, SocketState, VERDICT_PROGRAM,
};

/// The object `cargo xtask build-ebpf` built (path set by build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MMPROXY_BPF_OBJECT"));

/// Why the in-kernel data path is unavailable.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this binary was built without its BPF programs: run `cargo xtask build-ebpf`, then \
         build again"
    )]
    NotBuilt,
    #[error("cannot load the BPF object (needs CAP_BPF and CAP_NET_ADMIN, Linux 6.6+)")]
    Object(#[source] aya::EbpfError),
    #[error("the BPF object lacks map {0}")]
    MissingMap(&'static str),
    #[error("BPF map {0} has an unexpected type or size")]
    Map(&'static str, #[source] aya::maps::MapError),
    #[error("cannot load or attach the verdict program")]
    Program(#[source] aya::programs::ProgramError),
    #[error("the BPF object lacks program {VERDICT_PROGRAM}")]
    MissingProgram,
    #[error("cannot find sk_buff offsets in the kernel's BTF")]
    Btf(#[source] btf::BtfError),
}

/// The loaded program and its maps. Dropping it detaches everything.
pub struct Datapath {
    /// Keeps the program attached.
    _ebpf: aya::Ebpf,
    maps: Mutex<Maps>,
    counters: PerCpuArray<MapData, u64>,
    /// Taken once by the forwarder's watcher.
    signals: Mutex<Option<RingBuf<MapData>>>,
    /// Times a direction was switched to PASS because its backlog grew
    /// (or its reader fell behind), summed over connections.
    pass_episodes: AtomicU64,
    /// Connections armed (the others ended during the warm-up, moved bulk
    /// during it, or could not be armed).
    connections_armed: AtomicU64,
    /// Connections kept in userspace because they moved bulk during the
    /// warm-up.
    connections_kept_bulk: AtomicU64,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath").finish_non_exhaustive()
    }
}

struct Maps {
    sockets: SockHash<MapData, u64>,
    states: HashMap<MapData, u64, SocketState>,
    controls: HashMap<MapData, u64, FlowControl>,
}

impl Datapath {
    pub fn load() -> Result<Self, LoadError> {
        embedded_object(OBJECT)?;
        let offsets = skb_offsets()?;
        // The program needs no CO-RE relocations (its kernel offsets come
        // through OFFSETS): no BTF relocation pass.
        let mut ebpf = loader::loader_without_kernel_btf()
            .btf(None)
            .load(OBJECT)
            .map_err(LoadError::Object)?;
        let sockets: SockHash<MapData, u64> = take(&mut ebpf, SOCKETS_MAP)?;
        let states: HashMap<MapData, u64, SocketState> = take(&mut ebpf, STATES_MAP)?;
        let controls: HashMap<MapData, u64, FlowControl> = take(&mut ebpf, CONTROLS_MAP)?;
        let signals: RingBuf<MapData> = take(&mut ebpf, SIGNALS_MAP)?;
        let counters: PerCpuArray<MapData, u64> = take(&mut ebpf, COUNTERS_MAP)?;
        let mut offsets_map: Array<MapData, KernelOffsets> = take(&mut ebpf, OFFSETS_MAP)?;
        offsets_map
            .set(0, offsets, 0)
            .map_err(|e| LoadError::Map(OFFSETS_MAP, e))?;
        let map_fd = sockets
            .fd()
            .try_clone()
            .map_err(|e| LoadError::Map(SOCKETS_MAP, e.into()))?;
        let program: &mut SkSkb = ebpf
            .program_mut(VERDICT_PROGRAM)
            .ok_or(LoadError::MissingProgram)?
            .try_into()
            .map_err(LoadError::Program)?;
        program.load().map_err(LoadError::Program)?;
        program.attach(&map_fd).map_err(LoadError::Program)?;
        drop(map_fd);
        // What the loader freed (20 MiB when Landlock is unavailable and
        // it parsed the kernel's BTF) stays in glibc's heap unless
        // trimmed: 22 MiB resident at idle against plain mode's 6 MiB.
        crate::memory::release_free_heap();
        Ok(Self {
            _ebpf: ebpf,
            maps: Mutex::new(Maps {
                sockets,
                states,
                controls,
            }),
            counters,
            signals: Mutex::new(Some(signals)),
            pass_episodes: AtomicU64::new(0),
            connections_armed: AtomicU64::new(0),
            connections_kept_bulk: AtomicU64::new(0),
        })
    }

    /// Arms two sockets with `control` for both: states and controls go
    /// in first, then the sockets, client first. A redirect that finds its
    /// peer not in the map yet is passed instead (lossless, and signalled
    /// when `control` is REDIRECT); with the client first, only client
    /// bytes sent in the moment between the two inserts can meet that, not
    /// the backend's reply. On error, the caller must treat any socket
    /// that went in as armed: it leaves the map only when closed.
    pub fn arm(
        &self,
        client: (&impl AsRawFd, u64),
        upstream: (&impl AsRawFd, u64),
        control: &FlowControl,
    ) -> Result<(), aya::maps::MapError> {
        let state = |peer| SocketState {
            peer_cookie: peer,
            ..SocketState::default()
        };
        let mut maps = self.lock();
        maps.states.insert(client.1, state(upstream.1), 0)?;
        maps.states.insert(upstream.1, state(client.1), 0)?;
        maps.controls.insert(client.1, control, 0)?;
        maps.controls.insert(upstream.1, control, 0)?;
        maps.sockets.insert(client.1, client.0.as_raw_fd(), 0)?;
        maps.sockets.insert(upstream.1, upstream.0.as_raw_fd(), 0)
    }

    /// The verdict's state for the socket with this cookie.
    pub fn state(&self, cookie: u64) -> SocketState {
        self.lock().states.get(&cookie, 0).unwrap_or_default()
    }

    /// Replaces what the verdict may do with this socket's skbs. The
    /// verdict sees the new value on the next skb; one already running
    /// on another CPU may still use the old one (take the socket lock to
    /// wait for it).
    pub fn set_control(
        &self,
        cookie: u64,
        control: &FlowControl,
    ) -> Result<(), aya::maps::MapError> {
        self.lock().controls.insert(cookie, control, 0)
    }

    /// Forgets a connection's states and controls. Call after closing
    /// both sockets (closing is what takes them out of the socket map).
    pub fn forget(&self, cookies: [u64; 2]) {
        let mut maps = self.lock();
        for cookie in cookies {
            let _ = maps.states.remove(&cookie);
            let _ = maps.controls.remove(&cookie);
        }
    }

    /// The ring buffer the verdict signals through; `None` after the first
    /// call (one watcher reads it).
    pub fn take_signals(&self) -> Option<RingBuf<MapData>> {
        self.signals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Counts a direction switched to PASS.
    pub fn count_pass_episode(&self) {
        self.pass_episodes.fetch_add(1, Ordering::Relaxed);
    }

    /// Directions switched to PASS since start.
    pub fn pass_episodes(&self) -> u64 {
        self.pass_episodes.load(Ordering::Relaxed)
    }

    /// Counts a connection armed.
    pub fn count_armed(&self) {
        self.connections_armed.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections armed since start.
    pub fn connections_armed(&self) -> u64 {
        self.connections_armed.load(Ordering::Relaxed)
    }

    /// Counts a connection kept in userspace for its bulk warm-up.
    pub fn count_kept_bulk(&self) {
        self.connections_kept_bulk.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections kept in userspace for their bulk warm-up since start.
    pub fn connections_kept_bulk(&self) -> u64 {
        self.connections_kept_bulk.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sum over CPUs of one counter.
    pub fn counter(&self, counter: Counter) -> u64 {
        self.counters
            .get(&(counter as u32), 0)
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }
}

/// The object build.rs embedded, or why there is none (it embeds an empty
/// placeholder when `cargo xtask build-ebpf` has not run).
fn embedded_object(object: &'static [u8]) -> Result<&'static [u8], LoadError> {
    if object.is_empty() {
        Err(LoadError::NotBuilt)
    } else {
        Ok(object)
    }
}

/// Where `TCP_SKB_CB(skb)->seq` and `->end_seq` live in this kernel.
fn skb_offsets() -> Result<KernelOffsets, LoadError> {
    let mut btf = btf::Btf::from_kernel().map_err(LoadError::Btf)?;
    let cb = btf.member_offset("sk_buff", "cb").map_err(LoadError::Btf)?;
    let seq = btf
        .member_offset("tcp_skb_cb", "seq")
        .map_err(LoadError::Btf)?;
    let end_seq = btf
        .member_offset("tcp_skb_cb", "end_seq")
        .map_err(LoadError::Btf)?;
    Ok(KernelOffsets {
        skb_seq: cb + seq,
        skb_end_seq: cb + end_seq,
        valid: 1,
        padding: 0,
    })
}

fn take<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    T::try_from(map).map_err(|e| LoadError::Map(name, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_without_the_bpf_object_refuses_ebpf_mode_in_one_sentence() {
        let error = embedded_object(&[]).unwrap_err();
        assert!(matches!(error, LoadError::NotBuilt));
        assert!(
            error.to_string().contains("cargo xtask build-ebpf"),
            "{error}"
        );
        assert!(embedded_object(b"\x7fELF").is_ok());
    }
}
