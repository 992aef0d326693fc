//! The policy routing that brings the backend's replies back to spoofed
//! sockets, read and written through netlink.
//!
//! A reply from the backend is addressed to the real client, so without
//! help the host would route it out of the machine. Two pieces per IP
//! family fix that: a rule sending the backend's replies (from loopback,
//! or carrying `--mark`) to a table, and in that table a `local` default
//! route that delivers everything to local sockets, where the spoofed
//! upstream socket picks it up.
//!
//! What `--setup-routes` adds carries a protocol number of its own
//! ([`MMPROXY_PROTOCOL`], shown by `ip rule` / `ip route` as `proto 109`),
//! so a restart after a crash or SIGKILL recognises its own leftovers and
//! takes them over (and removes them at exit) instead of adding a second
//! copy or mistaking them for the operator's. The instance that manages
//! them holds an exclusive lock per network namespace and table
//! ([`OwnerLock`]); a second instance in the same namespace leaves them
//! alone.

use std::{
    fs::{self, File},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
};

use futures_util::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::{
    AddressFamily,
    route::{RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

/// The `rtm_protocol` / `FRA_PROTOCOL` value on everything
/// `--setup-routes` adds (unassigned in iproute2's `rt_protos`).
pub const MMPROXY_PROTOCOL: u8 = 109;

/// Where the per-namespace owner locks live without systemd's
/// `RuntimeDirectory=` (which sets `$RUNTIME_DIRECTORY`, writable by a
/// `DynamicUser`).
const LOCK_DIR: &str = "/run/mmproxy";

fn lock_dir() -> PathBuf {
    std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|dirs| {
            // systemd separates several directories with ':'.
            let first = dirs.to_str()?.split(':').next()?.to_owned();
            (!first.is_empty()).then(|| PathBuf::from(first))
        })
        .unwrap_or_else(|| PathBuf::from(LOCK_DIR))
}

/// An exclusive `flock` on `routes-<netns inode>-<table>.lock` in
/// `$RUNTIME_DIRECTORY` or `/run/mmproxy`:
/// whoever holds it manages the tagged routing of that namespace and
/// table. The kernel drops it when its holder dies, however it dies.
#[derive(Debug)]
pub struct OwnerLock {
    file: File,
    path: PathBuf,
}

impl OwnerLock {
    /// The lock, or `None` when a live instance holds it.
    fn try_take(table: u32) -> Result<Option<Self>, RoutingError> {
        let netns = fs::metadata("/proc/self/ns/net")
            .map_err(|e| RoutingError::Lock(PathBuf::from("/proc/self/ns/net"), e))?
            .ino();
        let dir = lock_dir();
        fs::create_dir_all(&dir).map_err(|e| RoutingError::Lock(dir.clone(), e))?;
        let path = dir.join(format!("routes-{netns}-{table}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| RoutingError::Lock(path.clone(), e))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(Self { file, path })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(RoutingError::Lock(path, e.into())),
        }
    }

    /// Deletes the lock file, then releases the lock: after a clean exit
    /// nothing is left in /run. A newcomer that opened the old file before
    /// the unlink fails its lock and does not take over.
    fn release(self) {
        let _ = fs::remove_file(&self.path);
        drop(self.file);
    }
}

/// Which rules and routes the proxy needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingSpec {
    /// `--route-table`.
    pub table: u32,
    /// `--mark`: 0 selects the loopback rule, otherwise the fwmark rule.
    pub mark: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    fn ip_flag(self) -> &'static str {
        match self {
            Family::V4 => "",
            Family::V6 => " -6",
        }
    }

    fn address_family(self) -> AddressFamily {
        match self {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        }
    }

    fn version(self) -> IpVersion {
        match self {
            Family::V4 => IpVersion::V4,
            Family::V6 => IpVersion::V6,
        }
    }

    fn loopback(self) -> (IpAddr, u8) {
        match self {
            Family::V4 => (IpAddr::V4(Ipv4Addr::LOCALHOST), 8),
            Family::V6 => (IpAddr::V6(Ipv6Addr::LOCALHOST), 128),
        }
    }
}

/// One rule or route the proxy needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    Rule(Family),
    LocalRoute(Family),
}

impl Piece {
    pub const ALL: [Piece; 4] = [
        Piece::Rule(Family::V4),
        Piece::LocalRoute(Family::V4),
        Piece::Rule(Family::V6),
        Piece::LocalRoute(Family::V6),
    ];

    /// What it is, as `ip rule`/`ip route` would show it.
    pub fn describe(self, spec: RoutingSpec) -> String {
        match self {
            Piece::Rule(f) => format!("{} rule {}", f.name(), rule_selector(f, spec)),
            Piece::LocalRoute(f) => format!(
                "{} route local {} dev lo table {}",
                f.name(),
                default_prefix(f),
                spec.table
            ),
        }
    }

    /// The command that adds it.
    pub fn fix(self, spec: RoutingSpec) -> String {
        match self {
            Piece::Rule(f) => format!("ip{} rule add {}", f.ip_flag(), rule_selector(f, spec)),
            Piece::LocalRoute(f) => format!(
                "ip{} route add local {} dev lo table {}",
                f.ip_flag(),
                default_prefix(f),
                spec.table
            ),
        }
    }
}

fn rule_selector(f: Family, spec: RoutingSpec) -> String {
    if spec.mark == 0 {
        let (addr, len) = f.loopback();
        let addr = if f == Family::V4 {
            "127.0.0.1".to_owned()
        } else {
            addr.to_string()
        };
        format!("from {addr}/{len} iif lo lookup {}", spec.table)
    } else {
        format!("fwmark {} lookup {}", spec.mark, spec.table)
    }
}

fn default_prefix(f: Family) -> &'static str {
    match f {
        Family::V4 => "0.0.0.0/0",
        Family::V6 => "::/0",
    }
}

/// Why the routing could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("netlink: {what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("the loopback interface 'lo' was not found")]
    NoLoopback,
    #[error("cannot take the routing owner lock {0}")]
    Lock(PathBuf, #[source] std::io::Error),
    #[error(
        "another mmproxy in this network namespace manages the --setup-routes routing (it holds the lock in $RUNTIME_DIRECTORY or /run/mmproxy), yet this is missing: {0}"
    )]
    NotOwner(String),
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RoutingError {
    let what = what.into();
    move |source| RoutingError::Netlink { what, source }
}

/// A netlink connection to the current network namespace.
#[derive(Debug, Clone)]
pub struct Routing {
    handle: Handle,
    lo_index: u32,
}

/// Pieces `--setup-routes` added (or took over from an earlier run), to
/// be removed on exit, and the lock that makes them ours.
#[derive(Debug, Default)]
pub struct Installed {
    rules: Vec<RuleMessage>,
    routes: Vec<RouteMessage>,
    /// Leftovers of an earlier run, taken over.
    pub adopted: usize,
    lock: Option<OwnerLock>,
}

/// For the log: what is ours, in a few words (the netlink messages
/// themselves are long).
impl std::fmt::Display for Installed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rules and {} local routes, tagged proto {MMPROXY_PROTOCOL}",
            self.rules.len(),
            self.routes.len()
        )
    }
}

impl Installed {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.routes.is_empty()
    }

    /// Leaves the routing in place and lets go of the lock (the file
    /// stays), so that a successor that takes the lock adopts it all.
    pub fn hand_over(self) {
        drop(self.lock);
    }
}

impl Routing {
    /// Connects; must run inside a tokio runtime.
    pub async fn connect() -> Result<Self, RoutingError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(RoutingError::Socket)?;
        tokio::spawn(conn);
        let link = handle
            .link()
            .get()
            .match_name("lo".to_owned())
            .execute()
            .try_next()
            .await
            .map_err(netlink("looking up lo"))?
            .ok_or(RoutingError::NoLoopback)?;
        Ok(Self {
            handle,
            lo_index: link.header.index,
        })
    }

    /// Whether `piece` is in place.
    pub async fn has(&self, piece: Piece, spec: RoutingSpec) -> Result<bool, RoutingError> {
        Ok(match piece {
            Piece::Rule(f) => self.find_rule(f, spec).await?.is_some(),
            Piece::LocalRoute(f) => self.find_route(f, spec).await?.is_some(),
        })
    }

    /// Adds what is missing; returns exactly what was added. On an error,
    /// removes what it had added before failing.
    pub async fn install_missing(&self, spec: RoutingSpec) -> Result<Installed, RoutingError> {
        let mut installed = Installed::default();
        match self.install_into(spec, &mut installed).await {
            Ok(()) => Ok(installed),
            Err(e) => {
                let _ = self.remove(installed).await;
                Err(e)
            }
        }
    }

    async fn install_into(
        &self,
        spec: RoutingSpec,
        installed: &mut Installed,
    ) -> Result<(), RoutingError> {
        installed.lock = OwnerLock::try_take(spec.table)?;
        let owner = installed.lock.is_some();
        for piece in Piece::ALL {
            match piece {
                Piece::Rule(f) => self.install_rule(f, spec, owner, installed).await?,
                Piece::LocalRoute(f) => self.install_route(f, spec, owner, installed).await?,
            }
        }
        Ok(())
    }

    /// The rule for `f`: taken over if it is an earlier run's and we hold
    /// the lock, left alone if it is someone else's, added if missing.
    async fn install_rule(
        &self,
        f: Family,
        spec: RoutingSpec,
        owner: bool,
        installed: &mut Installed,
    ) -> Result<(), RoutingError> {
        if let Some(rule) = self.find_rule(f, spec).await? {
            if owner && rule_is_ours(&rule) {
                installed.rules.push(rule);
                installed.adopted += 1;
            }
            return Ok(());
        }
        require_owner(owner, Piece::Rule(f), spec)?;
        self.add_rule(f, spec).await?;
        if let Some(rule) = self.find_rule(f, spec).await? {
            installed.rules.push(rule);
        }
        Ok(())
    }

    /// The `local` route for `f`, on the same terms as [`Self::install_rule`].
    async fn install_route(
        &self,
        f: Family,
        spec: RoutingSpec,
        owner: bool,
        installed: &mut Installed,
    ) -> Result<(), RoutingError> {
        if let Some(route) = self.find_route(f, spec).await? {
            if owner && route_is_ours(&route) {
                installed.routes.push(route);
                installed.adopted += 1;
            }
            return Ok(());
        }
        let piece = Piece::LocalRoute(f);
        require_owner(owner, piece, spec)?;
        let route = self.local_route(f, spec);
        self.handle
            .route()
            .add(route.clone())
            .execute()
            .await
            .map_err(netlink(format!("adding {}", piece.describe(spec))))?;
        installed.routes.push(route);
        Ok(())
    }

    /// Removes what [`Routing::install_missing`] added, and nothing else.
    pub async fn remove(&self, installed: Installed) -> Result<(), RoutingError> {
        let Installed {
            rules,
            routes,
            lock,
            ..
        } = installed;
        for rule in rules {
            self.handle
                .rule()
                .del(rule)
                .execute()
                .await
                .map_err(netlink("removing a rule added at start"))?;
        }
        for route in routes {
            self.handle
                .route()
                .del(route)
                .execute()
                .await
                .map_err(netlink("removing a route added at start"))?;
        }
        if let Some(lock) = lock {
            lock.release();
        }
        Ok(())
    }

    async fn find_rule(
        &self,
        f: Family,
        spec: RoutingSpec,
    ) -> Result<Option<RuleMessage>, RoutingError> {
        let rules: Vec<RuleMessage> = self
            .handle
            .rule()
            .get(f.version())
            .execute()
            .try_collect()
            .await
            .map_err(netlink(format!("listing {} rules", f.name())))?;
        Ok(rules.into_iter().find(|r| rule_matches(r, f, spec)))
    }

    async fn add_rule(&self, f: Family, spec: RoutingSpec) -> Result<(), RoutingError> {
        let what = format!("adding {}", Piece::Rule(f).describe(spec));
        let mut add = self
            .handle
            .rule()
            .add()
            .table_id(spec.table)
            .action(RuleAction::ToTable);
        // The tag that lets a restart recognise its own leftovers.
        add.message_mut()
            .attributes
            .push(RuleAttribute::Protocol(RouteProtocol::Other(
                MMPROXY_PROTOCOL,
            )));
        let result = match (f, spec.mark) {
            (Family::V4, 0) => {
                add.v4()
                    .source_prefix(Ipv4Addr::LOCALHOST, 8)
                    .input_interface("lo")
                    .execute()
                    .await
            }
            (Family::V6, 0) => {
                add.v6()
                    .source_prefix(Ipv6Addr::LOCALHOST, 128)
                    .input_interface("lo")
                    .execute()
                    .await
            }
            (Family::V4, mark) => add.v4().fw_mark(mark).execute().await,
            (Family::V6, mark) => add.v6().fw_mark(mark).execute().await,
        };
        result.map_err(netlink(what))
    }

    async fn find_route(
        &self,
        f: Family,
        spec: RoutingSpec,
    ) -> Result<Option<RouteMessage>, RoutingError> {
        let mut query = RouteMessageBuilder::<IpAddr>::new().build();
        query.header.address_family = f.address_family();
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(netlink(format!("listing {} routes", f.name())))?;
        Ok(routes
            .into_iter()
            .find(|r| route_matches(r, f, spec, self.lo_index)))
    }

    fn local_route(&self, f: Family, spec: RoutingSpec) -> RouteMessage {
        let mut route = match f {
            Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .output_interface(self.lo_index)
                .table_id(spec.table)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .protocol(RouteProtocol::Other(MMPROXY_PROTOCOL))
                .build(),
            Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                .output_interface(self.lo_index)
                .table_id(spec.table)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .protocol(RouteProtocol::Other(MMPROXY_PROTOCOL))
                .build(),
        };
        route.header.address_family = f.address_family();
        route
    }
}

/// A missing piece is ours to add only as the lock's holder: another live
/// instance manages this namespace's routing and will remove it, so
/// adding ours would race its exit.
fn require_owner(owner: bool, piece: Piece, spec: RoutingSpec) -> Result<(), RoutingError> {
    if owner {
        Ok(())
    } else {
        Err(RoutingError::NotOwner(piece.describe(spec)))
    }
}

/// Added by `--setup-routes` (tagged with [`MMPROXY_PROTOCOL`]).
fn rule_is_ours(r: &RuleMessage) -> bool {
    r.attributes
        .contains(&RuleAttribute::Protocol(RouteProtocol::Other(
            MMPROXY_PROTOCOL,
        )))
}

fn route_is_ours(r: &RouteMessage) -> bool {
    r.header.protocol == RouteProtocol::Other(MMPROXY_PROTOCOL)
}

fn rule_table(r: &RuleMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

fn rule_matches(r: &RuleMessage, f: Family, spec: RoutingSpec) -> bool {
    if r.header.family != f.address_family()
        || r.header.action != RuleAction::ToTable
        || rule_table(r) != spec.table
    {
        return false;
    }
    let has = |want: &RuleAttribute| r.attributes.iter().any(|a| a == want);
    if spec.mark != 0 {
        return has(&RuleAttribute::FwMark(spec.mark));
    }
    // `ip rule add from 127.0.0.1/8` keeps the address as typed: compare
    // the networks, not the addresses.
    let (addr, len) = f.loopback();
    let wanted = IpNet::new(addr, len).map(|n| n.trunc()).ok();
    let source = r.attributes.iter().find_map(|a| match a {
        RuleAttribute::Source(ip) => IpNet::new(*ip, r.header.src_len).map(|n| n.trunc()).ok(),
        _ => None,
    });
    source.is_some() && source == wanted && has(&RuleAttribute::Iifname("lo".to_owned()))
}

fn route_matches(r: &RouteMessage, f: Family, spec: RoutingSpec, lo_index: u32) -> bool {
    let table = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table));
    r.header.address_family == f.address_family()
        && r.header.kind == RouteType::Local
        && r.header.destination_prefix_length == 0
        && table == spec.table
        && r.attributes.contains(&RouteAttribute::Oif(lo_index))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: RoutingSpec = RoutingSpec {
        table: 123,
        mark: 0,
    };

    fn rule(
        family: Family,
        source: &str,
        src_len: u8,
        table: u32,
        extra: &[RuleAttribute],
    ) -> RuleMessage {
        let mut r = RuleMessage::default();
        r.header.family = family.address_family();
        r.header.src_len = src_len;
        r.header.action = RuleAction::ToTable;
        r.attributes.push(RuleAttribute::Table(table));
        r.attributes
            .push(RuleAttribute::Source(source.parse().unwrap()));
        r.attributes.extend_from_slice(extra);
        r
    }

    fn lo() -> RuleAttribute {
        RuleAttribute::Iifname("lo".to_owned())
    }

    #[test]
    fn the_loopback_rule_matches_however_the_address_was_typed() {
        for source in ["127.0.0.1", "127.0.0.0", "127.9.9.9"] {
            assert!(
                rule_matches(&rule(Family::V4, source, 8, 123, &[lo()]), Family::V4, SPEC),
                "{source}"
            );
        }
        assert!(rule_matches(
            &rule(Family::V6, "::1", 128, 123, &[lo()]),
            Family::V6,
            SPEC
        ));
    }

    #[test]
    fn near_misses_do_not_match() {
        let wrong_table = rule(Family::V4, "127.0.0.1", 8, 124, &[lo()]);
        let no_iif = rule(Family::V4, "127.0.0.1", 8, 123, &[]);
        let narrower = rule(Family::V4, "127.0.0.1", 32, 123, &[lo()]);
        let other_net = rule(Family::V4, "10.0.0.1", 8, 123, &[lo()]);
        let other_family = rule(Family::V4, "127.0.0.1", 8, 123, &[lo()]);
        for (name, r, f) in [
            ("wrong table", wrong_table, Family::V4),
            ("no iif lo", no_iif, Family::V4),
            ("/32", narrower, Family::V4),
            ("10/8", other_net, Family::V4),
            ("v4 rule for v6", other_family, Family::V6),
        ] {
            assert!(!rule_matches(&r, f, SPEC), "{name}");
        }
    }

    #[test]
    fn with_a_mark_the_fwmark_rule_is_the_one() {
        let spec = RoutingSpec { table: 77, mark: 7 };
        let mut marked = RuleMessage::default();
        marked.header.family = AddressFamily::Inet;
        marked.header.action = RuleAction::ToTable;
        marked.attributes = vec![RuleAttribute::Table(77), RuleAttribute::FwMark(7)];
        assert!(rule_matches(&marked, Family::V4, spec));
        marked.attributes[1] = RuleAttribute::FwMark(8);
        assert!(!rule_matches(&marked, Family::V4, spec));
        assert!(!rule_matches(
            &rule(Family::V4, "127.0.0.1", 8, 77, &[lo()]),
            Family::V4,
            spec
        ));
    }

    #[test]
    fn fixes_are_the_readme_commands() {
        assert_eq!(
            Piece::Rule(Family::V4).fix(SPEC),
            "ip rule add from 127.0.0.1/8 iif lo lookup 123"
        );
        assert_eq!(
            Piece::LocalRoute(Family::V6).fix(SPEC),
            "ip -6 route add local ::/0 dev lo table 123"
        );
    }
}
