//! The UDP kernel path's loader: loads the TC program `cargo xtask
//! build-ebpf` built, attaches it to the ingress of `lo` and of every
//! Ethernet device, and gives typed access to its session maps.
//!
//! Attached with TCX (Linux 6.6+): the attachment is a BPF link owned by
//! this process, so it goes away with the process, even after `SIGKILL`,
//! and nothing is left on a device. Older kernels get a `clsact` qdisc and
//! a netlink filter, which a killed process leaves behind (logged).

use std::{
    fs,
    path::Path,
    sync::{Mutex, MutexGuard, PoisonError},
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TcAttachType, tc},
    util::KernelVersion,
};
use mmproxy_common::udp::{
    CONFIG_MAP, COUNTERS_MAP, Endpoint, FLOWS_MAP, FORWARD_MAP, ForwardAction, ForwardKey, PROGRAM,
    REPLY_MAP, ReplyAction, ReplyKey, UdpConfig, UdpCounter,
};

use super::btf;

/// The object `cargo xtask build-ebpf` built (path set by build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MMPROXY_UDP_BPF_OBJECT"));

/// `/sys/class/net/*/type` of the devices the program can parse: it
/// expects a 14-byte Ethernet header, which `lo` also carries.
const ARPHRD_ETHER: u32 = 1;
const ARPHRD_LOOPBACK: u32 = 772;

/// Why the UDP kernel path is unavailable.
#[derive(Debug, thiserror::Error)]
pub enum UdpLoadError {
    #[error(
        "this binary was built without its BPF programs: run `cargo xtask build-ebpf`, then \
         build again"
    )]
    NotBuilt,
    #[error("cannot load the UDP BPF object (needs CAP_BPF and CAP_NET_ADMIN)")]
    Object(#[source] aya::EbpfError),
    #[error("the UDP BPF object lacks map {0}")]
    MissingMap(&'static str),
    #[error("BPF map {0} has an unexpected type or size")]
    Map(&'static str, #[source] aya::maps::MapError),
    #[error("the UDP BPF object lacks program {PROGRAM}")]
    MissingProgram,
    #[error("cannot load the UDP TC program")]
    Program(#[source] aya::programs::ProgramError),
    #[error("cannot attach the UDP TC program to {device}")]
    Attach {
        device: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot list network devices")]
    Devices(#[source] std::io::Error),
    #[error("cannot find sk_buff.ip_summed in the kernel's BTF")]
    Btf(#[source] btf::BtfError),
}

/// What the program needs to know at load time.
#[derive(Debug, Clone, Copy)]
pub struct UdpDatapathOptions {
    /// Entries of each session map (`--max-udp-sessions`).
    pub max_sessions: u32,
    /// `--udp-header first`.
    pub header_first: bool,
}

/// A session as the program sees it: the entries userspace writes.
#[derive(Debug, Clone, Copy)]
pub struct KernelSession {
    pub forward_key: ForwardKey,
    pub forward: ForwardAction,
    pub reply_key: ReplyKey,
    pub reply: ReplyAction,
    /// First-datagram mode: the balancer address:port whose headerless
    /// datagrams belong to this session.
    pub flow: Option<Endpoint>,
}

/// What the program counted for one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionCounts {
    pub forwarded: u64,
    pub forwarded_bytes: u64,
    pub replied: u64,
    pub replied_bytes: u64,
}

/// How the program is attached to a device's ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attachment {
    /// A TCX link (Linux 6.6+), owned by this process: gone with it.
    Tcx,
    /// A filter on a `clsact` qdisc: a killed process leaves it behind.
    Clsact,
}

impl Attachment {
    pub fn name(self) -> &'static str {
        match self {
            Attachment::Tcx => "tcx",
            Attachment::Clsact => "clsact",
        }
    }
}

/// The loaded, attached program and its maps. Dropping it detaches the
/// program from every device.
pub struct UdpDatapath {
    /// Keeps the program and its links alive.
    _ebpf: aya::Ebpf,
    maps: Mutex<Maps>,
    counters: PerCpuArray<MapData, u64>,
    devices: Vec<String>,
    attachment: Attachment,
    lo_localnet: bool,
}

impl std::fmt::Debug for UdpDatapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpDatapath")
            .field("devices", &self.devices)
            .field("attachment", &self.attachment)
            .finish_non_exhaustive()
    }
}

struct Maps {
    forward: HashMap<MapData, ForwardKey, ForwardAction>,
    reply: HashMap<MapData, ReplyKey, ReplyAction>,
    flows: HashMap<MapData, Endpoint, ForwardKey>,
}

impl UdpDatapath {
    /// Loads the program and attaches it to `lo` and every Ethernet device
    /// of this network namespace.
    pub fn load(opts: UdpDatapathOptions) -> Result<Self, UdpLoadError> {
        if OBJECT.is_empty() {
            return Err(UdpLoadError::NotBuilt);
        }
        let (ip_summed_offset, ip_summed_shift) = ip_summed_bits()?;
        let lo_localnet = lo_localnet();
        let entries = opts.max_sessions.max(1);
        let mut ebpf = super::loader::loader_without_kernel_btf()
            .btf(None)
            .map_max_entries(FORWARD_MAP, entries)
            .map_max_entries(REPLY_MAP, entries)
            .map_max_entries(FLOWS_MAP, entries)
            .load(OBJECT)
            .map_err(UdpLoadError::Object)?;
        let mut config: Array<MapData, UdpConfig> = take(&mut ebpf, CONFIG_MAP)?;
        config
            .set(
                0,
                UdpConfig {
                    header_first: u32::from(opts.header_first),
                    lo_localnet: u32::from(lo_localnet),
                    ip_summed_offset,
                    ip_summed_shift,
                    valid: 1,
                    padding: 0,
                },
                0,
            )
            .map_err(|e| UdpLoadError::Map(CONFIG_MAP, e))?;
        let maps = Maps {
            forward: take(&mut ebpf, FORWARD_MAP)?,
            reply: take(&mut ebpf, REPLY_MAP)?,
            flows: take(&mut ebpf, FLOWS_MAP)?,
        };
        let counters = take(&mut ebpf, COUNTERS_MAP)?;
        let devices = devices()?;
        let attachment = attach(&mut ebpf, &devices)?;
        crate::memory::release_free_heap();
        Ok(Self {
            _ebpf: ebpf,
            maps: Mutex::new(maps),
            counters,
            devices,
            attachment,
            lo_localnet,
        })
    }

    /// The devices the program is attached to.
    pub fn devices(&self) -> &[String] {
        &self.devices
    }

    pub fn attachment(&self) -> Attachment {
        self.attachment
    }

    /// Whether `lo` takes IPv4 datagrams for 127/8 redirected from other
    /// devices (see `UdpConfig::lo_localnet`).
    pub fn lo_localnet(&self) -> bool {
        self.lo_localnet
    }

    /// Writes a session into the maps: forward and reply entries first,
    /// then (first-datagram mode) the flow that leads to them. On error,
    /// whatever went in is taken out again.
    pub fn install(&self, session: &KernelSession) -> Result<(), aya::maps::MapError> {
        let mut maps = self.lock();
        let installed = maps
            .forward
            .insert(session.forward_key, session.forward, 0)
            .and_then(|()| maps.reply.insert(session.reply_key, session.reply, 0))
            .and_then(|()| match session.flow {
                Some(flow) => maps.flows.insert(flow, session.forward_key, 0),
                None => Ok(()),
            });
        if installed.is_err() {
            remove_entries(&mut maps, session);
        }
        installed
    }

    /// Takes a session out of the maps, returning what the program counted
    /// for it until then.
    pub fn remove(&self, session: &KernelSession) -> SessionCounts {
        let mut maps = self.lock();
        let counts = read_counts(&maps, session);
        remove_entries(&mut maps, session);
        counts
    }

    /// What the program has counted for a session.
    pub fn counts(&self, session: &KernelSession) -> SessionCounts {
        read_counts(&self.lock(), session)
    }

    /// Sum over CPUs of one program counter.
    pub fn counter(&self, counter: UdpCounter) -> u64 {
        self.counters
            .get(&(counter as u32), 0)
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }

    fn lock(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn read_counts(maps: &Maps, session: &KernelSession) -> SessionCounts {
    let forward = maps
        .forward
        .get(&session.forward_key, 0)
        .unwrap_or_default();
    let reply = maps.reply.get(&session.reply_key, 0).unwrap_or_default();
    counts_of(&forward, &reply)
}

fn counts_of(forward: &ForwardAction, reply: &ReplyAction) -> SessionCounts {
    SessionCounts {
        forwarded: forward.packets,
        forwarded_bytes: forward.bytes,
        replied: reply.packets,
        replied_bytes: reply.bytes,
    }
}

fn remove_entries(maps: &mut Maps, session: &KernelSession) {
    // The flow first: a headerless datagram then finds no session and goes
    // to userspace, never to a half-removed one.
    if let Some(flow) = session.flow
        && maps.flows.get(&flow, 0).ok() == Some(session.forward_key)
    {
        let _ = maps.flows.remove(&flow);
    }
    let _ = maps.forward.remove(&session.forward_key);
    let _ = maps.reply.remove(&session.reply_key);
}

/// Attaches the program to the ingress of each device; with TCX where the
/// kernel has it.
fn attach(ebpf: &mut aya::Ebpf, devices: &[String]) -> Result<Attachment, UdpLoadError> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(PROGRAM)
        .ok_or(UdpLoadError::MissingProgram)?
        .try_into()
        .map_err(UdpLoadError::Program)?;
    program.load().map_err(UdpLoadError::Program)?;
    let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    for device in devices {
        if !tcx {
            // EEXIST: the qdisc is already there, which is what we want.
            let _ = tc::qdisc_add_clsact(device);
        }
        program
            .attach(device, TcAttachType::Ingress)
            .map_err(|source| UdpLoadError::Attach {
                device: device.clone(),
                source,
            })?;
    }
    Ok(if tcx {
        Attachment::Tcx
    } else {
        Attachment::Clsact
    })
}

/// `lo` and every Ethernet device, by name, sorted.
fn devices() -> Result<Vec<String>, UdpLoadError> {
    let mut devices = Vec::new();
    for entry in fs::read_dir("/sys/class/net").map_err(UdpLoadError::Devices)? {
        let entry = entry.map_err(UdpLoadError::Devices)?;
        let kind = fs::read_to_string(entry.path().join("type"))
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok());
        if matches!(kind, Some(ARPHRD_ETHER | ARPHRD_LOOPBACK)) {
            devices.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    devices.sort();
    Ok(devices)
}

/// Where `sk_buff.ip_summed` lives: byte offset and bit shift.
fn ip_summed_bits() -> Result<(u32, u32), UdpLoadError> {
    let mut btf = btf::Btf::from_kernel().map_err(UdpLoadError::Btf)?;
    let bits = btf
        .member_bit_offset("sk_buff", "ip_summed")
        .map_err(UdpLoadError::Btf)?;
    Ok((bits / 8, bits % 8))
}

/// What sets the two sysctls [`lo_localnet`] reads (the daemon's log and
/// `mmproxy check` both name it).
pub const LO_LOCALNET_FIX: &str =
    "sysctl -w net.ipv4.conf.lo.route_localnet=1 net.ipv4.conf.lo.accept_local=1";

/// Whether `net.ipv4.conf.lo.route_localnet` and `accept_local` are both
/// 1 in this network namespace.
pub fn lo_localnet() -> bool {
    ["route_localnet", "accept_local"]
        .iter()
        .all(|name| read_flag(&Path::new("/proc/sys/net/ipv4/conf/lo").join(name)))
}

fn read_flag(path: &Path) -> bool {
    fs::read_to_string(path).is_ok_and(|v| v.trim() == "1")
}

fn take<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T, UdpLoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(UdpLoadError::MissingMap(name))?;
    T::try_from(map).map_err(|e| UdpLoadError::Map(name, e))
}
