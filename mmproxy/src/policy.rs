//! Who a PROXY header may claim to be, and where it may send us.
//!
//! A header is an unauthenticated claim: whoever reaches the listener
//! chooses the source address the backend sees, and with
//! `--dynamic-destination` also where the daemon connects. [`Policy`]
//! turns a parsed header into a [`Route`] or a [`Refusal`], for TCP and
//! UDP alike, so both protocols refuse the same claims:
//!
//! - a source that is loopback, unspecified, multicast, broadcast,
//!   link-local or one of the backend addresses is refused: a backend that
//!   trusts "localhost" (admin pages, metrics) must not be reachable by
//!   writing `127.0.0.1` into a header. `--allow-source` and
//!   `--deny-source` override these built-in rules; the longest matching
//!   prefix wins, and on a tie deny wins;
//! - LOCAL (v2) and UNKNOWN (v1) headers connect unspoofed only with
//!   `--allow-local` (on by default, as go-mmproxy does);
//! - a dynamic destination must match `--allowed-destinations`; loopback
//!   and the daemon's own listening address need an entry that names
//!   them, and unspecified, multicast or broadcast destinations are never
//!   used.
//!
//! Pure functions over addresses: no I/O, tested here.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
    str::FromStr,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use ipnet::IpNet;

use crate::proxy_protocol::Action;

/// Where to connect, and as whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route {
    pub backend: SocketAddr,
    /// The source to spoof; `None`: the proxy's own address.
    pub source: Option<SocketAddr>,
}

/// Why a header's claim was refused. [`Refusal::label`] names it in
/// metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("source {0} is a loopback address")]
    LoopbackSource(IpAddr),
    #[error("source {0} is unspecified (0.0.0.0/8 or ::)")]
    UnspecifiedSource(IpAddr),
    #[error("source {0} is a multicast address")]
    MulticastSource(IpAddr),
    #[error("source {0} is the broadcast address")]
    BroadcastSource(IpAddr),
    #[error("source {0} is link-local (allow it with --allow-source)")]
    LinkLocalSource(IpAddr),
    #[error("source {0} is a backend's own address")]
    BackendSource(IpAddr),
    #[error("source {0} is in a --deny-source subnet")]
    DeniedSource(IpAddr),
    #[error("a LOCAL/UNKNOWN header, and --allow-local is false")]
    Local,
    #[error("destination {0} is not in --allowed-destinations")]
    DestinationNotAllowed(SocketAddr),
    #[error("destination {0} is loopback and no --allowed-destinations entry names it")]
    LoopbackDestination(SocketAddr),
    #[error("destination {0} is this daemon's own listening address")]
    SelfDestination(SocketAddr),
    #[error("destination {0} is unspecified, multicast or broadcast")]
    UnusableDestination(SocketAddr),
}

impl Refusal {
    /// A short name for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::LoopbackSource(_) => "loopback_source",
            Refusal::UnspecifiedSource(_) => "unspecified_source",
            Refusal::MulticastSource(_) => "multicast_source",
            Refusal::BroadcastSource(_) => "broadcast_source",
            Refusal::LinkLocalSource(_) => "link_local_source",
            Refusal::BackendSource(_) => "backend_source",
            Refusal::DeniedSource(_) => "denied_source",
            Refusal::Local => "local",
            Refusal::DestinationNotAllowed(_) => "destination_not_allowed",
            Refusal::LoopbackDestination(_) => "loopback_destination",
            Refusal::SelfDestination(_) => "self_destination",
            Refusal::UnusableDestination(_) => "unusable_destination",
        }
    }
}

/// Operator overrides of the built-in source rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceOverrides {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

impl SourceOverrides {
    /// `Some(true)`: allowed by the longest matching prefix; `Some(false)`:
    /// denied; `None`: no entry matches (the built-in rules decide).
    fn verdict(&self, ip: IpAddr) -> Option<bool> {
        let longest = |nets: &[IpNet]| {
            nets.iter()
                .filter(|n| n.contains(&ip))
                .map(IpNet::prefix_len)
                .max()
        };
        match (longest(&self.allow), longest(&self.deny)) {
            (None, None) => None,
            (Some(_), None) => Some(true),
            (None, Some(_)) => Some(false),
            (Some(allow), Some(deny)) => Some(allow > deny),
        }
    }
}

/// One `--allowed-destinations` entry: `CIDR[:PORTS]`, where PORTS is a
/// comma-separated list of ports and `first-last` ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationRule {
    net: IpNet,
    /// Empty: every port.
    ports: Vec<RangeInclusive<u16>>,
}

impl DestinationRule {
    fn matches(&self, dst: SocketAddr) -> bool {
        self.net.contains(&dst.ip())
            && (self.ports.is_empty() || self.ports.iter().any(|r| r.contains(&dst.port())))
    }

    /// The entry names only loopback addresses (`127.0.0.0/8` or `::1`).
    fn is_loopback_only(&self) -> bool {
        self.net.network().is_loopback()
            && self.net.broadcast().is_loopback()
            && self.net.prefix_len() > 0
    }

    /// The entry names exactly this host and port.
    fn names_exactly(&self, dst: SocketAddr) -> bool {
        self.net.prefix_len() == self.net.max_prefix_len()
            && self.net.addr() == dst.ip()
            && self.ports.iter().any(|r| r.contains(&dst.port()))
    }
}

impl fmt::Display for DestinationRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.net)?;
        for (i, r) in self.ports.iter().enumerate() {
            f.write_str(if i == 0 { ":" } else { "," })?;
            if r.start() == r.end() {
                write!(f, "{}", r.start())?;
            } else {
                write!(f, "{}-{}", r.start(), r.end())?;
            }
        }
        Ok(())
    }
}

impl FromStr for DestinationRule {
    type Err = String;

    /// `10.0.0.0/8`, `10.0.0.0/8:80,443,8000-8099`, `2001:db8::/32:443`,
    /// or a bare address (`192.0.2.1`, `192.0.2.1/32:443`).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (net_text, ports_text) = split_ports(s);
        let net = parse_net(net_text)
            .ok_or_else(|| format!("'{net_text}' is not a CIDR subnet (e.g. 10.0.0.0/8)"))?;
        let ports = match ports_text {
            None => Vec::new(),
            Some(text) => parse_ports(text)?,
        };
        Ok(Self { net, ports })
    }
}

/// A subnet in CIDR notation, or a bare address (that one host), with the
/// host bits cleared: how every subnet flag and file is read.
pub fn parse_net(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .ok()
        .map(|net| net.trunc())
}

/// Splits `CIDR:PORTS`. The ports follow the prefix length, so an IPv6
/// address's own colons never count; without a prefix length only an
/// IPv4 address can carry ports.
fn split_ports(s: &str) -> (&str, Option<&str>) {
    if let Some(slash) = s.find('/') {
        if let Some(colon) = s[slash..].find(':') {
            let colon = slash + colon;
            return (&s[..colon], Some(&s[colon + 1..]));
        }
        return (s, None);
    }
    match s.split_once(':') {
        Some((ip, ports)) if ip.parse::<Ipv4Addr>().is_ok() => (ip, Some(ports)),
        _ => (s, None),
    }
}

fn parse_ports(text: &str) -> Result<Vec<RangeInclusive<u16>>, String> {
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("'{p}' is not a port (1-65535)"))
    };
    text.split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (port(a)?, port(b)?);
                if a > b {
                    return Err(format!("port range '{part}' runs backwards"));
                }
                Ok(a..=b)
            }
            None => port(part).map(|p| p..=p),
        })
        .collect()
}

/// The whole policy, built once from the configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    pub target4: SocketAddr,
    pub target6: SocketAddr,
    /// `Some`: `--dynamic-destination`, with its allowed destinations.
    pub dynamic_destinations: Option<Vec<DestinationRule>>,
    pub sources: SourceOverrides,
    pub allow_local: bool,
    /// The daemon's own listening addresses: never a destination.
    pub listening: Vec<SocketAddr>,
}

impl Policy {
    /// The route for a header received from `peer`, or why not.
    pub fn route(&self, action: Action, peer: SocketAddr) -> Result<Route, Refusal> {
        match action {
            Action::Spoof {
                source,
                destination,
            } => {
                let backend = match &self.dynamic_destinations {
                    Some(rules) => self.check_destination(rules, destination)?,
                    None => self.target_for(source.ip()),
                };
                self.check_source(source.ip(), backend)?;
                Ok(Route {
                    backend,
                    source: Some(source),
                })
            }
            // LOCAL/UNKNOWN/UNSPEC: the balancer itself (health checks).
            Action::Direct if self.allow_local => Ok(Route {
                backend: self.target_for(peer.ip().to_canonical()),
                source: None,
            }),
            Action::Direct => Err(Refusal::Local),
        }
    }

    /// The backend for a client of this address family.
    pub fn target_for(&self, client: IpAddr) -> SocketAddr {
        if client.to_canonical().is_ipv4() {
            self.target4
        } else {
            self.target6
        }
    }

    fn check_source(&self, source: IpAddr, backend: SocketAddr) -> Result<(), Refusal> {
        let ip = source.to_canonical();
        match self.sources.verdict(ip) {
            Some(true) => return Ok(()),
            Some(false) => return Err(Refusal::DeniedSource(ip)),
            None => {}
        }
        if let Some(refusal) = builtin_source_refusal(ip) {
            return Err(refusal);
        }
        let is_backend = [self.target4.ip(), self.target6.ip(), backend.ip()]
            .iter()
            .any(|b| b.to_canonical() == ip);
        if is_backend {
            return Err(Refusal::BackendSource(ip));
        }
        Ok(())
    }

    fn check_destination(
        &self,
        rules: &[DestinationRule],
        destination: SocketAddr,
    ) -> Result<SocketAddr, Refusal> {
        let dst = SocketAddr::new(destination.ip().to_canonical(), destination.port());
        let ip = dst.ip();
        if ip.is_unspecified() || ip.is_multicast() || is_broadcast(ip) {
            return Err(Refusal::UnusableDestination(dst));
        }
        let matching: Vec<&DestinationRule> = rules.iter().filter(|r| r.matches(dst)).collect();
        if matching.is_empty() {
            return Err(Refusal::DestinationNotAllowed(dst));
        }
        if self.is_own_listener(dst) && !matching.iter().any(|r| r.names_exactly(dst)) {
            return Err(Refusal::SelfDestination(dst));
        }
        if ip.is_loopback() && !matching.iter().any(|r| r.is_loopback_only()) {
            return Err(Refusal::LoopbackDestination(dst));
        }
        Ok(dst)
    }

    /// Whether `dst` reaches one of our own listeners: same port, and the
    /// listen address itself, or any local-looking address when we
    /// listen on all.
    fn is_own_listener(&self, dst: SocketAddr) -> bool {
        self.listening.iter().any(|listen| {
            let ip = listen.ip().to_canonical();
            dst.port() == listen.port()
                && (dst.ip() == ip || (ip.is_unspecified() && dst.ip().is_loopback()))
        })
    }
}

/// The built-in refusals, before any override.
fn builtin_source_refusal(ip: IpAddr) -> Option<Refusal> {
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_loopback() {
                Some(Refusal::LoopbackSource(ip))
            } else if v4.octets()[0] == 0 {
                Some(Refusal::UnspecifiedSource(ip))
            } else if v4.is_multicast() {
                Some(Refusal::MulticastSource(ip))
            } else if v4.is_broadcast() {
                Some(Refusal::BroadcastSource(ip))
            } else if v4.is_link_local() {
                Some(Refusal::LinkLocalSource(ip))
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_loopback() {
                Some(Refusal::LoopbackSource(ip))
            } else if v6.is_unspecified() {
                Some(Refusal::UnspecifiedSource(ip))
            } else if v6.is_multicast() {
                Some(Refusal::MulticastSource(ip))
            } else if is_ipv6_link_local(v6) {
                Some(Refusal::LinkLocalSource(ip))
            } else {
                None
            }
        }
    }
}

fn is_ipv6_link_local(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

fn is_broadcast(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

/// How often a refused header may be logged (the rest are counted).
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// At most one log line per interval for a noisy event, with the number
/// of events it stands for: refusals are a hostile peer's lever, and a
/// flood of them must not become a flood of log lines.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    start: Instant,
    /// Milliseconds since `start` of the last line, plus one (0: never).
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: log now, standing for this event and `n` suppressed
    /// since the last line. `None`: stay quiet (counted).
    pub fn check(&self) -> Option<u64> {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX) + 1;
        let last = self.last_ms.load(Ordering::Relaxed);
        let interval = u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX);
        let due = last == 0 || now.saturating_sub(last) >= interval;
        if due
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn policy() -> Policy {
        Policy {
            target4: sa("127.0.0.1:443"),
            target6: sa("[::1]:443"),
            dynamic_destinations: None,
            sources: SourceOverrides::default(),
            allow_local: true,
            listening: vec![sa("0.0.0.0:8443")],
        }
    }

    fn spoof(source: &str, destination: &str) -> Action {
        Action::Spoof {
            source: sa(source),
            destination: sa(destination),
        }
    }

    fn refusal(p: &Policy, source: &str) -> Option<&'static str> {
        p.route(spoof(source, "192.0.2.1:443"), sa("10.0.0.1:1000"))
            .err()
            .map(|r| r.label())
    }

    #[test]
    fn an_ordinary_client_is_spoofed_to_its_family_backend() {
        let p = policy();
        let r = p
            .route(spoof("203.0.113.9:5000", "192.0.2.1:443"), sa("10.0.0.1:1"))
            .unwrap();
        assert_eq!(r.backend, sa("127.0.0.1:443"));
        assert_eq!(r.source, Some(sa("203.0.113.9:5000")));
        let r = p
            .route(
                spoof("[2001:db8::9]:5000", "[2001:db8::1]:443"),
                sa("10.0.0.1:1"),
            )
            .unwrap();
        assert_eq!(r.backend, sa("[::1]:443"));
    }

    #[test]
    fn builtin_source_refusals() {
        let p = policy();
        for (source, label) in [
            ("127.0.0.1:1", "loopback_source"),
            ("127.9.9.9:1", "loopback_source"),
            ("[::1]:1", "loopback_source"),
            ("[::ffff:127.0.0.1]:1", "loopback_source"),
            ("0.0.0.0:1", "unspecified_source"),
            ("0.1.2.3:1", "unspecified_source"),
            ("[::]:1", "unspecified_source"),
            ("224.0.0.1:1", "multicast_source"),
            ("[ff02::1]:1", "multicast_source"),
            ("255.255.255.255:1", "broadcast_source"),
            ("169.254.1.1:1", "link_local_source"),
            ("[fe80::1]:1", "link_local_source"),
        ] {
            assert_eq!(refusal(&p, source), Some(label), "{source}");
        }
    }

    #[test]
    fn a_backend_address_is_refused_as_source() {
        let mut p = policy();
        p.target4 = sa("10.9.9.9:443");
        assert_eq!(refusal(&p, "10.9.9.9:1234"), Some("backend_source"));
        assert_eq!(refusal(&p, "10.9.9.8:1234"), None);
    }

    #[test]
    fn overrides_take_the_longest_prefix_and_deny_wins_ties() {
        let mut p = policy();
        p.sources = SourceOverrides {
            allow: vec![
                "169.254.0.0/16".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap(),
            ],
            deny: vec![
                "10.0.0.0/8".parse().unwrap(),
                "10.1.2.0/24".parse().unwrap(),
                "203.0.113.0/24".parse().unwrap(),
                "192.0.2.0/24".parse().unwrap(),
            ],
        };
        p.sources.allow.push("192.0.2.0/24".parse().unwrap());
        assert_eq!(
            refusal(&p, "169.254.1.1:1"),
            None,
            "allow overrides link-local"
        );
        assert_eq!(refusal(&p, "10.2.0.1:1"), Some("denied_source"));
        assert_eq!(
            refusal(&p, "10.1.0.1:1"),
            None,
            "a longer allow beats a shorter deny"
        );
        assert_eq!(refusal(&p, "10.1.2.1:1"), Some("denied_source"));
        assert_eq!(refusal(&p, "203.0.113.5:1"), Some("denied_source"));
        assert_eq!(
            refusal(&p, "192.0.2.5:1"),
            Some("denied_source"),
            "a tie denies"
        );
        assert_eq!(refusal(&p, "127.0.0.1:1"), Some("loopback_source"));
    }

    #[test]
    fn local_headers_follow_allow_local() {
        let mut p = policy();
        let r = p
            .route(Action::Direct, sa("[::ffff:10.0.0.1]:1000"))
            .unwrap();
        assert_eq!(
            r,
            Route {
                backend: sa("127.0.0.1:443"),
                source: None
            }
        );
        p.allow_local = false;
        assert_eq!(
            p.route(Action::Direct, sa("10.0.0.1:1000")),
            Err(Refusal::Local)
        );
    }

    fn rules(list: &[&str]) -> Vec<DestinationRule> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn destination(p: &Policy, dst: &str) -> Result<SocketAddr, &'static str> {
        p.route(spoof("203.0.113.9:5000", dst), sa("10.0.0.1:1"))
            .map(|r| r.backend)
            .map_err(|r| r.label())
    }

    #[test]
    fn dynamic_destinations_must_be_listed() {
        let mut p = policy();
        p.dynamic_destinations = Some(rules(&[
            "192.0.2.0/24:80,443",
            "198.51.100.7",
            "2001:db8::/32:8000-8099",
        ]));
        assert_eq!(destination(&p, "192.0.2.1:443"), Ok(sa("192.0.2.1:443")));
        assert_eq!(
            destination(&p, "192.0.2.1:22"),
            Err("destination_not_allowed")
        );
        assert_eq!(
            destination(&p, "198.51.100.7:22"),
            Ok(sa("198.51.100.7:22"))
        );
        assert_eq!(
            destination(&p, "198.51.100.8:22"),
            Err("destination_not_allowed")
        );
        assert_eq!(
            destination(&p, "[2001:db8::1]:8050"),
            Ok(sa("[2001:db8::1]:8050"))
        );
        assert_eq!(
            destination(&p, "[2001:db8::1]:8100"),
            Err("destination_not_allowed")
        );
        assert_eq!(
            destination(&p, "[::ffff:192.0.2.1]:80"),
            Ok(sa("192.0.2.1:80"))
        );
    }

    #[test]
    fn loopback_and_self_destinations_need_an_entry_naming_them() {
        let mut p = policy();
        p.dynamic_destinations = Some(rules(&["0.0.0.0/0", "::/0"]));
        assert_eq!(
            destination(&p, "127.0.0.1:443"),
            Err("loopback_destination")
        );
        assert_eq!(destination(&p, "[::1]:443"), Err("loopback_destination"));
        assert_eq!(destination(&p, "127.0.0.1:8443"), Err("self_destination"));
        assert_eq!(destination(&p, "0.0.0.0:443"), Err("unusable_destination"));
        assert_eq!(
            destination(&p, "224.0.0.1:443"),
            Err("unusable_destination")
        );
        assert_eq!(
            destination(&p, "255.255.255.255:443"),
            Err("unusable_destination")
        );
        p.dynamic_destinations = Some(rules(&["0.0.0.0/0", "127.0.0.0/8:443,8443"]));
        assert_eq!(destination(&p, "127.0.0.1:443"), Ok(sa("127.0.0.1:443")));
        assert_eq!(destination(&p, "127.0.0.1:8443"), Err("self_destination"));
        p.dynamic_destinations = Some(rules(&["127.0.0.1/32:8443"]));
        assert_eq!(destination(&p, "127.0.0.1:8443"), Ok(sa("127.0.0.1:8443")));
        p.listening = vec![sa("192.0.2.1:8443")];
        p.dynamic_destinations = Some(rules(&["192.0.2.0/24"]));
        assert_eq!(destination(&p, "192.0.2.1:8443"), Err("self_destination"));
        assert_eq!(destination(&p, "192.0.2.2:8443"), Ok(sa("192.0.2.2:8443")));
    }

    #[test]
    fn the_dynamic_destination_is_not_a_source_either() {
        let mut p = policy();
        p.dynamic_destinations = Some(rules(&["203.0.113.0/24"]));
        assert_eq!(destination(&p, "203.0.113.9:443"), Err("backend_source"));
    }

    #[test]
    fn destination_rules_parse_and_print() {
        for (text, shown) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("10.1.2.3/8:80", "10.0.0.0/8:80"),
            ("10.0.0.0/8:80,443,8000-8099", "10.0.0.0/8:80,443,8000-8099"),
            ("192.0.2.1", "192.0.2.1/32"),
            ("192.0.2.1:443", "192.0.2.1/32:443"),
            ("2001:db8::/32:443", "2001:db8::/32:443"),
            ("2001:db8::1", "2001:db8::1/128"),
        ] {
            let rule: DestinationRule = text.parse().unwrap();
            assert_eq!(rule.to_string(), shown, "{text}");
        }
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.0/8:",
            "10.0.0.0/8:0",
            "10.0.0.0/8:99999",
            "10.0.0.0/8:90-80",
            "host.example",
            "10.0.0.0/8:a",
        ] {
            assert!(bad.parse::<DestinationRule>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_log_limiter_speaks_once_per_interval_and_counts_the_rest() {
        let limiter = LogLimiter::new(Duration::from_hours(1));
        assert_eq!(limiter.check(), Some(0));
        assert_eq!(limiter.check(), None);
        assert_eq!(limiter.check(), None);
        let limiter = LogLimiter::new(Duration::ZERO);
        assert_eq!(limiter.check(), Some(0));
        assert_eq!(limiter.check(), Some(0));
    }
}
