//! mmproxy: preserves client addresses behind PROXY-protocol load balancers.
//!
//! # Layout
//! The path of a connection, in file order:
//! - [`proxy_protocol`]: the pure PROXY v1/v2 parser and encoder.

pub mod proxy_protocol;
