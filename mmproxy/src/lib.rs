//! mmproxy: preserves client addresses behind PROXY-protocol load balancers.
//!
//! # Layout
//! The path of a TCP connection, in the order it meets the modules:
//! - [`cli`], [`config`]: flags (go-mmproxy compatible) become a [`config::Config`].
//!   [`options`] names the choices among them that the subsystems act on.
//! - [`server`]: opens the listeners (or takes them over: [`activation`]
//!   from systemd, [`upgrade`] from the instance it replaces), runs until
//!   shutdown, drains.
//! - [`listener`]: accept loops, the allowed-subnets check, the connection cap.
//! - [`limits`]: the header-phase gate, per-source caps, the idle timeout.
//! - [`connection`]: reads the PROXY header ([`proxy_protocol`], a pure
//!   parser); [`policy`] decides where to connect and as whom, or refuses.
//! - [`upstream`]: the spoofed (IP_TRANSPARENT) socket to the backend.
//! - [`forward`]: moves the bytes, [`forward::splice`] in userspace or
//!   [`forward::sockmap`] in the kernel ([`bpf`] loads the programs).
//!
//! A UDP datagram takes [`udp`]: [`udp::frontend`] receives it,
//! [`udp::session`] maps it to a client's spoofed upstream socket.
//!
//! Around them: [`routing`] reads and installs the policy routing through
//! netlink, [`check`] is `mmproxy check`, [`metrics`] serves Prometheus
//! metrics and `/healthz`, [`memory`] gives the heap back after a burst.
//!
//! [`error::Side`] names whose fault a failure is, in every subsystem.

pub mod activation;
pub mod bpf;
pub mod check;
pub mod cli;
pub mod config;
pub mod connection;
pub mod error;
pub mod forward;
pub mod limits;
pub mod listener;
pub mod memory;
pub mod metrics;
pub mod options;
pub mod policy;
pub mod proxy_protocol;
pub mod routing;
pub mod server;
pub mod sockopt;
pub mod udp;
pub mod upgrade;
pub mod upstream;
