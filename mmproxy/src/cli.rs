//! The command line: go-mmproxy's flags, spelled its way too, plus ours.
//!
//! go-mmproxy uses Go's `flag` package, where long flags take one dash
//! (`-mark 1`, `-allowed-subnets f`). [`normalize_args`] rewrites those to
//! two dashes before clap sees them, so an operator can switch binaries
//! without touching a unit file.

use std::{ffi::OsString, net::SocketAddr, path::PathBuf};

use clap::{Parser, ValueEnum};
use ipnet::IpNet;

use crate::options::{Mode, Protocols, SourcePortPolicy, UdpHeaderMode};
use crate::policy::{DestinationRule, parse_net};

/// Preserves client addresses behind PROXY-protocol load balancers.
///
/// Accepts connections (or datagrams) that start with a PROXY protocol v1
/// or v2 header, and connects to the backend from the client's own address
/// (IP_TRANSPARENT), so the backend sees the real client. Replies find
/// their way back through a policy route; see `mmproxy check`.
///
/// `mmproxy check [flags]` checks the routing, the backends and BPF for
/// those flags, prints one line per check, and exits 0 only if all pass.
///
/// Signals: SIGTERM or SIGINT stops accepting and drains open connections
/// (a second one resets them); SIGHUP reloads --allowed-subnets; SIGUSR2
/// starts the binary at the same path with the same flags, hands it the
/// listening sockets and drains (an upgrade without refused connections).
/// Listening sockets passed by systemd (`LISTEN_FDS`) are used instead of
/// -l; one named "metrics" serves --metrics-addr.
#[derive(Debug, Clone, Parser)]
// Each switch of go-mmproxy's and ours is a bool; an enum per flag would
// only rename them.
#[allow(clippy::struct_excessive_bools)]
// A flag given twice takes its last value, as with go-mmproxy (and as a
// systemd drop-in that appends flags expects).
#[command(
    name = "mmproxy",
    version,
    max_term_width = 100,
    args_override_self = true
)]
pub struct Cli {
    /// Address to listen on.
    #[arg(
        short = 'l',
        long = "listen",
        value_name = "ADDR",
        default_value = "0.0.0.0:8443"
    )]
    pub listen: SocketAddr,

    /// Backend for IPv4 clients.
    #[arg(short = '4', long = "target4", value_name = "ADDR", default_value = "127.0.0.1:443",
          value_parser = parse_ipv4_target)]
    pub target4: SocketAddr,

    /// Backend for IPv6 clients.
    #[arg(short = '6', long = "target6", value_name = "ADDR", default_value = "[::1]:443",
          value_parser = parse_ipv6_target)]
    pub target6: SocketAddr,

    /// Protocols to proxy: tcp, udp, or both as "tcp,udp" (same address).
    #[arg(short = 'p', long = "protocol", value_name = "PROTO", default_value = "tcp",
          value_parser = parse_protocols)]
    pub protocols: Protocols,

    /// 0: no per-connection logs; 1: per-connection errors; 2: every
    /// connection's state changes (go-mmproxy's levels).
    #[arg(short = 'v', long = "verbose", value_name = "LEVEL", default_value_t = 0,
          value_parser = clap::value_parser!(u8).range(0..=2))]
    pub verbose: u8,

    /// File of allowed client subnets (the balancers' addresses): one CIDR
    /// per line, `#` comments and blank lines allowed. Connections from
    /// elsewhere are closed before anything is read. A bad line, or a file
    /// without subnets, stops start-up.
    #[arg(long = "allowed-subnets", value_name = "FILE")]
    pub allowed_subnets: Option<PathBuf>,

    /// SO_MARK for upstream sockets (0: none), for policy routing to a
    /// backend on another host.
    #[arg(long = "mark", value_name = "N", default_value_t = 0)]
    pub mark: u32,

    /// Number of listening sockets (SO_REUSEPORT), each with its own
    /// accept loop.
    #[arg(long = "listeners", value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub listeners: u16,

    /// UDP: seconds of inactivity after which a session is closed.
    #[arg(long = "close-after", value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub close_after_secs: u64,

    /// Connect to the destination named in each header instead of -4/-6
    /// (for TPROXY set-ups that serve many ports). Needs
    /// --allowed-destinations: without it any client could make the
    /// daemon connect anywhere.
    #[arg(long = "dynamic-destination")]
    pub dynamic_destination: bool,

    /// With --dynamic-destination: where headers may send us, as
    /// CIDR[:PORTS] (`10.0.0.0/8:80,443,8000-8099`); repeat or separate
    /// entries with spaces. Loopback destinations need an entry inside
    /// 127.0.0.0/8 or naming the IPv6 loopback; our own listening address needs an entry that
    /// names exactly it.
    #[arg(long = "allowed-destinations", value_name = "CIDR[:PORTS]",
          value_delimiter = ' ', num_args = 1..)]
    pub allowed_destinations: Vec<DestinationRule>,

    /// Header sources accepted even where a built-in rule refuses them
    /// (loopback, unspecified, multicast, broadcast, link-local, a backend's
    /// address). Repeatable; the longest matching prefix of
    /// --allow-source and --deny-source wins, a tie denies.
    #[arg(long = "allow-source", value_name = "CIDR", value_parser = parse_cidr)]
    pub allow_source: Vec<IpNet>,

    /// Header sources refused (the connection is closed, the refusal
    /// counted). Repeatable.
    #[arg(long = "deny-source", value_name = "CIDR", value_parser = parse_cidr)]
    pub deny_source: Vec<IpNet>,

    /// Whether v2 LOCAL and v1 UNKNOWN headers (balancer health checks)
    /// connect to the backend from the proxy's own address. On by default,
    /// as in go-mmproxy.
    #[arg(long = "allow-local", value_name = "BOOL", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub allow_local: bool,

    /// Set IP_TRANSPARENT on the listeners, so they accept connections
    /// redirected to them by a TPROXY rule.
    #[arg(long = "listen-transparent")]
    pub listen_transparent: bool,

    /// Data path. TCP: ebpf (in-kernel sockmap), plain (userspace
    /// splice), auto (plain). UDP: ebpf (a TC program carries established
    /// sessions), plain (userspace), auto (ebpf where it loads).
    #[arg(long = "mode", value_name = "MODE", default_value = "auto")]
    pub mode: Mode,

    /// ebpf mode: KiB a direction may hold in the kernel, redirected but not
    /// yet taken by the receiving socket. At the limit the direction
    /// switches to userspace forwarding (PASS) until the backlog drains, so
    /// a slow reader closes the sender's TCP window as in plain mode.
    #[arg(long = "ebpf-max-backlog-kib", value_name = "KIB", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(16..=1_048_576))]
    pub ebpf_max_backlog_kib: u64,

    /// ebpf mode: milliseconds a connection is forwarded in userspace (as
    /// in plain mode) before it is armed (put into the kernel's data path).
    /// A connection that ends sooner never costs the kernel path's set-up;
    /// 0 arms at once.
    #[arg(long = "ebpf-arm-after-ms", value_name = "MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub ebpf_arm_after_ms: u64,

    /// ebpf mode: a connection that moved at least this many Mbit/s (both
    /// directions together) over its warm-up is never armed and stays in
    /// userspace, where bulk is cheaper on the kernels measured; 0 arms
    /// bulk connections too.
    #[arg(long = "ebpf-bulk-mbit", value_name = "MBIT", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub ebpf_bulk_mbit: u64,

    /// Seconds a TCP client has to send a complete PROXY header.
    #[arg(long = "header-timeout", value_name = "SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout_secs: u64,

    /// Seconds to wait for the backend to accept a connection.
    #[arg(long = "connect-timeout", value_name = "SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub connect_timeout_secs: u64,

    /// KiB: the most a backend may send toward one upstream socket before
    /// it is acknowledged (`TCP_WINDOW_CLAMP`, set before connecting; 0: the
    /// kernel's default). Clamping keeps the upstream socket's window scale
    /// small (1024 KiB: scale 5), which keeps a backend that retracts its
    /// window under memory pressure from dropping every acknowledgment the
    /// socket sends and deadlocking the connection (Linux before 7.1). A
    /// connection then moves at most this much per round trip from the
    /// backend: raise it for backends far away.
    #[arg(long = "upstream-window-clamp-kib", value_name = "KIB", default_value_t = 1024,
          value_parser = parse_window_clamp_kib)]
    pub upstream_window_clamp_kib: u32,

    /// Most TCP connections handled at once; further clients wait in the
    /// listen backlog.
    #[arg(long = "max-connections", value_name = "N", default_value_t = 32768,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Most TCP connections waiting for their PROXY header at once; a new
    /// one beyond it closes the one that has waited longest (slowloris
    /// protection: a balancer sends its header at once).
    #[arg(long = "max-pending-headers", value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_headers: u32,

    /// Most TCP connections per claimed client address (0: no limit).
    /// Beyond it a connection is closed after its header.
    #[arg(long = "max-conns-per-source", value_name = "N", default_value_t = 0)]
    pub max_conns_per_source: u32,

    /// Seconds a TCP connection may go without a byte either way before
    /// both peers are reset (0: never).
    #[arg(long = "idle-timeout", value_name = "SECS", default_value_t = 0)]
    pub idle_timeout_secs: u64,

    /// When the client's ip:port cannot be bound upstream (it is local, or
    /// in `TIME_WAIT`): fallback (client IP, ephemeral port, logged), strict
    /// (drop the connection), or ephemeral (always an ephemeral port).
    #[arg(
        long = "source-port",
        value_name = "POLICY",
        default_value = "fallback"
    )]
    pub source_port: SourcePortPolicy,

    /// On SIGTERM/SIGINT: seconds open connections get to finish after
    /// the listeners close.
    #[arg(long = "drain-timeout", value_name = "SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,

    /// UDP: every (each datagram starts with a PROXY v2 DGRAM header) or
    /// first (only a flow's first datagram does, as Cloudflare Spectrum
    /// and frp send; later ones from the same balancer address:port
    /// belong to that client).
    #[arg(long = "udp-header", value_name = "WHEN", default_value = "every")]
    pub udp_header: UdpHeaderMode,

    /// UDP: most sessions (client flows) at once; beyond it the least
    /// recently used session is closed.
    #[arg(long = "max-udp-sessions", value_name = "N", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_udp_sessions: u32,

    /// UDP: most sessions one client address may hold (0: no cap); its
    /// next new flow is dropped (counted) until one of its sessions ends,
    /// so one client cannot push every other client out of the table.
    #[arg(
        long = "max-udp-sessions-per-client",
        value_name = "N",
        default_value_t = 4096
    )]
    pub max_udp_sessions_per_client: u32,

    /// Add the policy routing rules and routes that are missing (see
    /// `mmproxy check`) at start, and remove exactly those at exit.
    #[arg(long = "setup-routes")]
    pub setup_routes: bool,

    /// Routing table for the `local` default route.
    #[arg(long = "route-table", value_name = "N", default_value_t = 123,
          value_parser = clap::value_parser!(u32).range(1..=0xffff_fffe))]
    pub route_table: u32,

    /// Serve Prometheus metrics on `http://ADDR/metrics` and a health check
    /// on `/healthz` (200 once every listener is bound).
    #[arg(long = "metrics-addr", value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Log lines as text or as JSON objects (one per line).
    #[arg(long = "log-format", value_name = "FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// Do not log the start-up checks (routing, BPF).
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
}

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn parse_protocols(s: &str) -> Result<Protocols, String> {
    let mut p = Protocols {
        tcp: false,
        udp: false,
    };
    for part in s.split(',') {
        match part.trim() {
            "tcp" => p.tcp = true,
            "udp" => p.udp = true,
            other => return Err(format!("'{other}' is not tcp or udp")),
        }
    }
    Ok(p)
}

/// 0 (no clamp) or 4 KiB to 1 GiB: the kernel raises smaller clamps to
/// about 2 KiB, and a window larger than 1 GiB cannot be advertised.
fn parse_window_clamp_kib(s: &str) -> Result<u32, String> {
    let kib: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of KiB"))?;
    if kib == 0 || (4..=1_048_576).contains(&kib) {
        Ok(kib)
    } else {
        Err(format!("{kib} KiB: use 0 (no clamp) or 4 to 1048576"))
    }
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    parse_net(s).ok_or_else(|| format!("'{s}' is not a CIDR subnet (e.g. 192.0.2.0/24)"))
}

fn parse_ipv4_target(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.parse().map_err(|e| format!("{e}"))?;
    if addr.is_ipv4() {
        Ok(addr)
    } else {
        Err("-4 needs an IPv4 address".into())
    }
}

fn parse_ipv6_target(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.parse().map_err(|e| format!("{e}"))?;
    if addr.is_ipv6() {
        Ok(addr)
    } else {
        Err("-6 needs an IPv6 address, e.g. [::1]:443".into())
    }
}

/// Long options that go-mmproxy spells with one dash.
const LONG_FLAGS: &[&str] = &[
    "listen",
    "target4",
    "target6",
    "protocol",
    "verbose",
    "allowed-subnets",
    "mark",
    "listeners",
    "close-after",
    "dynamic-destination",
    "allowed-destinations",
    "allow-source",
    "deny-source",
    "allow-local",
    "listen-transparent",
    "mode",
    "ebpf-max-backlog-kib",
    "ebpf-arm-after-ms",
    "ebpf-bulk-mbit",
    "header-timeout",
    "connect-timeout",
    "upstream-window-clamp-kib",
    "max-connections",
    "max-pending-headers",
    "max-conns-per-source",
    "idle-timeout",
    "source-port",
    "drain-timeout",
    "udp-header",
    "max-udp-sessions",
    "max-udp-sessions-per-client",
    "setup-routes",
    "route-table",
    "metrics-addr",
    "log-format",
    "quiet",
    "help",
    "version",
];

/// Rewrites `-name` and `-name=value` to `--name...` for the long flags.
pub fn normalize_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    args.into_iter()
        .map(|arg| {
            let Some(s) = arg.to_str() else { return arg };
            let Some(rest) = s.strip_prefix('-') else {
                return arg;
            };
            if rest.starts_with('-') {
                return arg;
            }
            let name = rest.split_once('=').map_or(rest, |(n, _)| n);
            if LONG_FLAGS.contains(&name) {
                OsString::from(format!("-{s}"))
            } else {
                arg
            }
        })
        .collect()
}

/// What the binary was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Proxy (the default).
    Run,
    /// `mmproxy check [flags]`: check the host for those flags and exit.
    Check,
    /// `mmproxy generate man|bash|zsh|fish`: print the man page or a
    /// shell completion script, made from these flag definitions (the
    /// Debian package ships them).
    Generate(Generated),
}

/// What `mmproxy generate` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Generated {
    Man,
    Bash,
    Zsh,
    Fish,
}

/// Writes the man page (roff) or a completion script to `out`.
pub fn generate(what: Generated, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    use clap::CommandFactory as _;
    use clap_complete::Shell;
    let mut command = Cli::command();
    let shell = match what {
        Generated::Man => return clap_mangen::Man::new(command).render(out),
        Generated::Bash => Shell::Bash,
        Generated::Zsh => Shell::Zsh,
        Generated::Fish => Shell::Fish,
    };
    clap_complete::generate(shell, &mut command, "mmproxy", out);
    Ok(())
}

impl Cli {
    /// Parses the process arguments: `mmproxy [check] [flags]`. Bad values
    /// exit with status 2 and one line naming the flag; `--help` and
    /// `--version` print and exit 0.
    pub fn parse_or_exit(args: impl IntoIterator<Item = OsString>) -> (Command, Self) {
        let mut args: Vec<OsString> = args.into_iter().collect();
        let command = match args.get(1).and_then(|a| a.to_str()) {
            Some("check") => {
                args.remove(1);
                Command::Check
            }
            Some("generate") => {
                let what = args.get(2).and_then(|a| a.to_str()).unwrap_or("");
                let Ok(what) = Generated::from_str(what, false) else {
                    eprintln!("mmproxy: generate needs one of: man, bash, zsh, fish");
                    std::process::exit(2);
                };
                return (Command::Generate(what), Self::parse_from(["mmproxy"]));
            }
            _ => Command::Run,
        };
        match Self::try_parse_from(normalize_args(args)) {
            Ok(cli) => (command, cli),
            Err(e) if !e.use_stderr() => e.exit(),
            Err(e) => {
                let rendered = e.to_string();
                let line = rendered
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("invalid arguments");
                let line = line.strip_prefix("error: ").unwrap_or(line);
                eprintln!("mmproxy: {line} (see --help)");
                std::process::exit(2);
            }
        }
    }
}
