//! Types shared by the BPF programs (`mmproxy-ebpf`) and the daemon's loader.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel side reads and
//! writes these structs in BPF maps, and userspace reads them back through
//! aya with the `user` feature, which implements `aya::Pod` for them.
//! Map and program names are constants so that neither side can spell them
//! differently.
//!
//! - [`sockmap`]: the TCP data path (a stream verdict splicing sockets).
//! - [`udp`]: the UDP data path (a TC program rewriting datagrams).

#![no_std]

pub mod sockmap;
pub mod udp;
