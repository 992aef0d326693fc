//! The daemon's validated configuration, and the allowed-subnets file.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;

use crate::{
    cli::Cli,
    forward::sockmap::EbpfOptions,
    options::{Mode, Protocols, SourcePortPolicy, UdpHeaderMode},
    policy::{Policy, SourceOverrides, parse_net},
    routing::RoutingSpec,
    upstream::UpstreamOptions,
};

/// Everything the proxy needs, checked once at start-up.
#[derive(Debug, Clone)]
#[allow(clippy::struct_excessive_bools)] // the command line's switches
pub struct Config {
    /// `-l`: bound unless listening sockets are handed over (then
    /// `policy.listening` holds theirs).
    pub listen: SocketAddr,
    pub target4: SocketAddr,
    pub target6: SocketAddr,
    pub protocols: Protocols,
    pub verbose: u8,
    pub allowed_subnets_file: Option<PathBuf>,
    /// Empty means every peer is allowed.
    pub allowed_subnets: AllowedSubnets,
    /// 0: no SO_MARK.
    pub mark: u32,
    pub listeners: u16,
    pub udp_idle_timeout: Duration,
    /// Which sources and destinations a header may claim (and, with
    /// `--dynamic-destination`, the allowed destinations).
    pub policy: Policy,
    pub listen_transparent: bool,
    pub mode: Mode,
    /// ebpf mode: bytes per direction in the kernel's redirect backlog
    /// before the direction goes back to userspace.
    pub ebpf_max_backlog: u64,
    /// ebpf mode: how long a connection is forwarded in userspace before it
    /// is armed.
    pub ebpf_arm_after: Duration,
    /// ebpf mode: bytes a second over the warm-up from which a connection
    /// stays in userspace; `None`: every connection is armed.
    pub ebpf_bulk_rate: Option<u64>,
    pub header_timeout: Duration,
    pub connect_timeout: Duration,
    /// Bytes; `None`: the kernel's default window (`--upstream-window-clamp-kib 0`).
    pub upstream_window_clamp: Option<u32>,
    pub max_connections: u32,
    pub max_pending_headers: u32,
    /// 0: no limit.
    pub max_conns_per_source: u32,
    /// `None`: connections may idle forever.
    pub idle_timeout: Option<Duration>,
    pub source_port: SourcePortPolicy,
    pub drain_timeout: Duration,
    pub udp_header: UdpHeaderMode,
    pub max_udp_sessions: u32,
    /// 0: no cap.
    pub max_udp_sessions_per_client: u32,
    pub setup_routes: bool,
    pub route_table: u32,
    pub metrics_addr: Option<SocketAddr>,
    pub quiet: bool,
}

impl Config {
    /// Validates the command line and reads the files it names.
    pub fn from_cli(cli: &Cli) -> Result<Self, ConfigError> {
        let allowed_subnets = match &cli.allowed_subnets {
            Some(path) => AllowedSubnets::load(path)?,
            None => AllowedSubnets::any(),
        };
        if cli.dynamic_destination && cli.allowed_destinations.is_empty() {
            return Err(ConfigError::OpenRelay);
        }
        if !cli.dynamic_destination && !cli.allowed_destinations.is_empty() {
            return Err(ConfigError::DestinationsUnused);
        }
        let policy = Policy {
            target4: cli.target4,
            target6: cli.target6,
            dynamic_destinations: cli
                .dynamic_destination
                .then(|| cli.allowed_destinations.clone()),
            sources: SourceOverrides {
                allow: cli.allow_source.clone(),
                deny: cli.deny_source.clone(),
            },
            allow_local: cli.allow_local,
            listening: vec![cli.listen],
        };
        Ok(Self {
            listen: cli.listen,
            target4: cli.target4,
            target6: cli.target6,
            protocols: cli.protocols,
            verbose: cli.verbose,
            allowed_subnets_file: cli.allowed_subnets.clone(),
            allowed_subnets,
            mark: cli.mark,
            listeners: cli.listeners,
            udp_idle_timeout: Duration::from_secs(cli.close_after_secs),
            policy,
            listen_transparent: cli.listen_transparent,
            mode: cli.mode,
            ebpf_max_backlog: cli.ebpf_max_backlog_kib * 1024,
            ebpf_arm_after: Duration::from_millis(cli.ebpf_arm_after_ms),
            ebpf_bulk_rate: (cli.ebpf_bulk_mbit > 0).then(|| cli.ebpf_bulk_mbit * 1_000_000 / 8),
            header_timeout: Duration::from_secs(cli.header_timeout_secs),
            connect_timeout: Duration::from_secs(cli.connect_timeout_secs),
            upstream_window_clamp: (cli.upstream_window_clamp_kib > 0)
                .then(|| cli.upstream_window_clamp_kib * 1024),
            max_connections: cli.max_connections,
            max_pending_headers: cli.max_pending_headers,
            max_conns_per_source: cli.max_conns_per_source,
            idle_timeout: (cli.idle_timeout_secs > 0)
                .then(|| Duration::from_secs(cli.idle_timeout_secs)),
            source_port: cli.source_port,
            drain_timeout: Duration::from_secs(cli.drain_timeout_secs),
            udp_header: cli.udp_header,
            max_udp_sessions: cli.max_udp_sessions,
            max_udp_sessions_per_client: cli.max_udp_sessions_per_client,
            setup_routes: cli.setup_routes,
            route_table: cli.route_table,
            metrics_addr: cli.metrics_addr,
            quiet: cli.quiet,
        })
    }

    /// How upstream sockets are made: mark, source port, connect timeout,
    /// window clamp.
    pub fn upstream_options(&self) -> UpstreamOptions {
        UpstreamOptions {
            mark: self.mark,
            source_port: self.source_port,
            connect_timeout: self.connect_timeout,
            window_clamp: self.upstream_window_clamp,
        }
    }

    /// What the ebpf data path is configured with.
    pub fn ebpf_options(&self) -> EbpfOptions {
        EbpfOptions {
            max_backlog: self.ebpf_max_backlog,
            arm_after: self.ebpf_arm_after,
            bulk_rate: self.ebpf_bulk_rate,
        }
    }

    /// The policy routing the flags need (`mmproxy check`, `--setup-routes`).
    pub fn routing_spec(&self) -> RoutingSpec {
        RoutingSpec {
            table: self.route_table,
            mark: self.mark,
        }
    }

    /// Whether anyone who reaches a non-loopback listener may choose the
    /// source address the backend sees: no `--allowed-subnets`.
    pub fn listens_openly(&self) -> bool {
        self.allowed_subnets.is_empty()
            && self
                .policy
                .listening
                .iter()
                .any(|a| !a.ip().to_canonical().is_loopback())
    }
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read allowed-subnets file {path}")]
    ReadSubnets {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: '{text}' is not a subnet in CIDR notation (e.g. 192.0.2.0/24)")]
    BadSubnet {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error(
        "{path} lists no subnets: every connection would be refused (remove --allowed-subnets to allow all)"
    )]
    NoSubnets { path: PathBuf },
    #[error(
        "--dynamic-destination needs --allowed-destinations CIDR[:PORTS]: without it any client could make the proxy connect anywhere"
    )]
    OpenRelay,
    #[error("--allowed-destinations applies only with --dynamic-destination")]
    DestinationsUnused,
}

/// The peers allowed to connect: the load balancers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedSubnets {
    /// Empty: everyone is allowed (no file given).
    nets: Vec<IpNet>,
}

impl AllowedSubnets {
    /// Everyone is allowed.
    pub fn any() -> Self {
        Self::default()
    }

    /// Reads a file of one CIDR per line. `#` starts a comment; blank lines
    /// are skipped; a bare address means that one host. Any other line
    /// fails the whole file, naming the line: a typo must never silently
    /// widen or narrow who may connect.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::ReadSubnets {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut nets = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let net = parse_net(line).ok_or_else(|| ConfigError::BadSubnet {
                path: path.to_owned(),
                line: index + 1,
                text: line.to_owned(),
            })?;
            nets.push(net);
        }
        if nets.is_empty() {
            return Err(ConfigError::NoSubnets {
                path: path.to_owned(),
            });
        }
        Ok(Self { nets })
    }

    /// Whether a peer may connect. IPv4-mapped IPv6 peers (a dual-stack
    /// listener) are matched as the IPv4 addresses they are.
    pub fn allows(&self, peer: IpAddr) -> bool {
        if self.nets.is_empty() {
            return true;
        }
        let peer = peer.to_canonical();
        self.nets.iter().any(|net| net.contains(&peer))
    }

    pub fn len(&self) -> usize {
        self.nets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AllowedSubnets, ConfigError> {
        AllowedSubnets::parse(Path::new("subnets.txt"), text)
    }

    #[test]
    fn comments_blank_lines_and_bare_hosts() {
        let s =
            parse("# balancers\n\n10.0.0.0/8   # internal\n  2001:db8::/32\n192.0.2.7\n").unwrap();
        assert_eq!(s.len(), 3);
        assert!(s.allows("10.1.2.3".parse().unwrap()));
        assert!(s.allows("::ffff:10.1.2.3".parse().unwrap()));
        assert!(s.allows("2001:db8::5".parse().unwrap()));
        assert!(s.allows("192.0.2.7".parse().unwrap()));
        assert!(!s.allows("192.0.2.8".parse().unwrap()));
        assert!(!s.allows("11.0.0.1".parse().unwrap()));
    }

    #[test]
    fn host_bits_are_ignored() {
        let s = parse("10.1.2.3/8\n").unwrap();
        assert!(s.allows("10.200.0.1".parse().unwrap()));
    }

    #[test]
    fn a_bad_line_fails_the_file_and_is_named() {
        let e = parse("10.0.0.0/8\n10.0.0.0/33\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "subnets.txt:2: '10.0.0.0/33' is not a subnet in CIDR notation (e.g. 192.0.2.0/24)"
        );
        assert!(matches!(
            parse("bogus"),
            Err(ConfigError::BadSubnet { line: 1, .. })
        ));
    }

    #[test]
    fn an_empty_file_fails_closed() {
        assert!(matches!(
            parse("# nothing\n\n"),
            Err(ConfigError::NoSubnets { .. })
        ));
    }

    #[test]
    fn upstream_window_clamp_is_in_bytes_and_0_turns_it_off() {
        use clap::Parser as _;
        let clamp = |args: &[&str]| {
            let cli = Cli::try_parse_from(std::iter::once("mmproxy").chain(args.iter().copied()))
                .unwrap();
            Config::from_cli(&cli)
                .unwrap()
                .upstream_options()
                .window_clamp
        };
        assert_eq!(clamp(&[]), Some(1 << 20));
        assert_eq!(clamp(&["--upstream-window-clamp-kib", "0"]), None);
        assert_eq!(clamp(&["--upstream-window-clamp-kib", "4"]), Some(4096));
        assert_eq!(
            clamp(&["--upstream-window-clamp-kib", "1048576"]),
            Some(1 << 30)
        );
    }

    #[test]
    fn no_file_allows_everyone() {
        assert!(AllowedSubnets::any().allows("203.0.113.1".parse().unwrap()));
    }
}
