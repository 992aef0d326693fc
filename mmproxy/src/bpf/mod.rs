//! The BPF loader: loads the embedded object built by `cargo xtask
//! build-ebpf`, fills in the kernel offsets from BTF, attaches the verdict
//! program to the sources sockhash, and gives typed access to the maps.

pub mod btf;

use std::{
    os::fd::AsRawFd,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, SockHash},
    programs::SkSkb,
};
use mmproxy_common::sockmap::{
    COUNTERS_MAP, Counter, KernelOffsets, OFFSETS_MAP, SOURCES_MAP, STATES_MAP, SocketState,
    TARGETS_MAP, USER_READ_MAP, VERDICT_PROGRAM,
};

/// The object `cargo xtask build-ebpf` built (path set by build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MMPROXY_BPF_OBJECT"));

/// Why the in-kernel data path is unavailable.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
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

/// The loaded programs and maps. Dropping it detaches everything.
pub struct Datapath {
    /// Keeps the program attached.
    _ebpf: Ebpf,
    maps: Mutex<Maps>,
    counters: PerCpuArray<MapData, u64>,
    /// Directions handed back to userspace because their backlog grew.
    handovers: AtomicU64,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath").finish_non_exhaustive()
    }
}

struct Maps {
    sources: SockHash<MapData, u64>,
    targets: SockHash<MapData, u64>,
    states: HashMap<MapData, u64, SocketState>,
    user_read: HashMap<MapData, u64, u64>,
}

impl Datapath {
    pub fn load() -> Result<Self, LoadError> {
        let btf = btf::Btf::from_kernel().map_err(LoadError::Btf)?;
        let cb = btf.member_offset("sk_buff", "cb").map_err(LoadError::Btf)?;
        let seq = btf
            .member_offset("tcp_skb_cb", "seq")
            .map_err(LoadError::Btf)?;
        let end_seq = btf
            .member_offset("tcp_skb_cb", "end_seq")
            .map_err(LoadError::Btf)?;

        let mut ebpf = Ebpf::load(OBJECT).map_err(LoadError::Object)?;
        let sources: SockHash<MapData, u64> = take(&mut ebpf, SOURCES_MAP)?;
        let targets: SockHash<MapData, u64> = take(&mut ebpf, TARGETS_MAP)?;
        let states: HashMap<MapData, u64, SocketState> = take(&mut ebpf, STATES_MAP)?;
        let user_read: HashMap<MapData, u64, u64> = take(&mut ebpf, USER_READ_MAP)?;
        let counters: PerCpuArray<MapData, u64> = take(&mut ebpf, COUNTERS_MAP)?;
        let mut offsets: Array<MapData, KernelOffsets> = take(&mut ebpf, OFFSETS_MAP)?;
        offsets
            .set(
                0,
                KernelOffsets {
                    skb_seq: cb + seq,
                    skb_end_seq: cb + end_seq,
                    valid: 1,
                    padding: 0,
                },
                0,
            )
            .map_err(|e| LoadError::Map(OFFSETS_MAP, e))?;
        let map_fd = sources
            .fd()
            .try_clone()
            .map_err(|e| LoadError::Map(SOURCES_MAP, e.into()))?;
        let program: &mut SkSkb = ebpf
            .program_mut(VERDICT_PROGRAM)
            .ok_or(LoadError::MissingProgram)?
            .try_into()
            .map_err(LoadError::Program)?;
        program.load().map_err(LoadError::Program)?;
        program.attach(&map_fd).map_err(LoadError::Program)?;
        Ok(Self {
            _ebpf: ebpf,
            maps: Mutex::new(Maps {
                sources,
                targets,
                states,
                user_read,
            }),
            counters,
            handovers: AtomicU64::new(0),
        })
    }

    /// Splices two sockets: each one's skbs go out of the other. States go
    /// in first, then both sockets as redirect targets, then both as
    /// sources (upstream first): when the verdict first runs on either
    /// socket its peer can already take the redirect, so no skb of the
    /// arming window is passed. `gap` widens the moment between the two
    /// source inserts (fault injection for tests, `MMPROXY_FAULT_ARM_GAP_MS`).
    pub async fn arm(
        &self,
        client: (&impl AsRawFd, u64),
        upstream: (&impl AsRawFd, u64),
        gap: Option<std::time::Duration>,
    ) -> Result<(), aya::maps::MapError> {
        let state = |peer| SocketState {
            peer_cookie: peer,
            ..SocketState::default()
        };
        {
            let mut maps = self.lock();
            maps.states.insert(client.1, state(upstream.1), 0)?;
            maps.states.insert(upstream.1, state(client.1), 0)?;
            maps.targets.insert(upstream.1, upstream.0.as_raw_fd(), 0)?;
            maps.targets.insert(client.1, client.0.as_raw_fd(), 0)?;
            maps.sources.insert(upstream.1, upstream.0.as_raw_fd(), 0)?;
        }
        if let Some(gap) = gap {
            tokio::time::sleep(gap).await;
        }
        self.lock()
            .sources
            .insert(client.1, client.0.as_raw_fd(), 0)
    }

    /// Stops the verdict on one socket: what arrives there stays on its
    /// receive queue (TCP flow control applies again) for userspace to
    /// forward. The socket stays a redirect target, so skbs already queued
    /// to be sent out of it, and its peer's redirects, are unaffected.
    /// A verdict already running on another CPU may still finish; taking
    /// the socket lock afterwards (any `setsockopt`) waits for it.
    pub fn stop_verdict(&self, cookie: u64) -> Result<(), aya::maps::MapError> {
        self.lock().sources.remove(&cookie)?;
        self.handovers.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Directions handed back to userspace since start.
    pub fn handovers(&self) -> u64 {
        self.handovers.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Bytes the verdict redirected from the socket with this cookie.
    pub fn redirected(&self, cookie: u64) -> u64 {
        self.state(cookie).bytes
    }

    /// The verdict's state for the socket with this cookie.
    pub fn state(&self, cookie: u64) -> SocketState {
        self.lock().states.get(&cookie, 0).unwrap_or_default()
    }

    /// Removes a connection's sockets and states.
    pub fn disarm(&self, cookies: [u64; 2]) {
        let mut maps = self.lock();
        // Verdicts stop first; then nothing can be redirected to a socket
        // that is leaving the targets.
        for cookie in cookies {
            let _ = maps.sources.remove(&cookie);
        }
        for cookie in cookies {
            let _ = maps.targets.remove(&cookie);
            let _ = maps.states.remove(&cookie);
            let _ = maps.user_read.remove(&cookie);
        }
    }

    /// Records that userspace has read and forwarded `bytes` passed bytes
    /// of this socket in total; the verdict resumes redirecting once this
    /// catches up with what it passed.
    pub fn set_user_read(&self, cookie: u64, bytes: u64) -> Result<(), aya::maps::MapError> {
        self.lock().user_read.insert(cookie, bytes, 0)
    }

    /// Sum over CPUs of one counter.
    pub fn counter(&self, counter: Counter) -> u64 {
        self.counters
            .get(&(counter as u32), 0)
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    T::try_from(map).map_err(|e| LoadError::Map(name, e))
}
