//! The choices the command line offers that several subsystems act on:
//! the data path, the protocols, the source-port policy, the UDP header
//! mode.
//!
//! They sit below [`crate::cli`] (which parses them), [`crate::config`]
//! (which holds them) and the subsystems that act on them ([`crate::forward`],
//! [`crate::upstream`], [`crate::udp`]), so that none of those needs to
//! import another to name a choice: the configuration is built from the
//! command line and hands the subsystems their options, never the other
//! way round.

use clap::ValueEnum;

/// Which UDP datagrams carry a PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UdpHeaderMode {
    Every,
    First,
}

/// Which protocols to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocols {
    pub tcp: bool,
    pub udp: bool,
}

/// The data path (`--mode`): `auto` means each protocol's kernel path
/// where it loads (for TCP, on kernels where it was measured level with
/// plain: `forward::AUTO_EBPF_SINCE`), userspace otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Auto,
    Ebpf,
    Plain,
}

/// What to do when the client's source port cannot be used upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourcePortPolicy {
    Fallback,
    Strict,
    Ephemeral,
}
