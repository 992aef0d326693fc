//! `mmproxy check`: is this host ready to proxy? One line per check, a
//! fix-it command for each failure. The daemon runs the routing and BPF
//! checks at start too (not the backend probes: a connection to the
//! backend at every start would show up there as a phantom client).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use crate::{
    bpf::Datapath,
    config::Config,
    error::error_chain,
    options::{Mode, SourcePortPolicy},
    routing::{Piece, Routing},
    upstream::{self, UpstreamOptions},
};

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    pub passed: bool,
    /// Counts for the exit status (`--mode ebpf` makes BPF count, say).
    pub required: bool,
    pub what: String,
    /// Why it failed.
    pub why: Option<String>,
    /// The command (or action) that fixes it.
    pub fix: Option<String>,
}

impl fmt::Display for CheckLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match (self.passed, self.required) {
            (true, _) => "PASS",
            (false, true) => "FAIL",
            (false, false) => "INFO",
        };
        write!(f, "{verdict}  {}", self.what)?;
        if let Some(why) = &self.why {
            write!(f, ": {why}")?;
        }
        if let Some(fix) = &self.fix {
            write!(f, "\n      fix: {fix}")?;
        }
        Ok(())
    }
}

/// The documentation addresses a spoofed probe comes from.
const PROBE_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
const PROBE_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The routing pieces, each present or not.
pub async fn routing(config: &Config) -> Vec<CheckLine> {
    let spec = config.routing_spec();
    let routing = match Routing::connect().await {
        Ok(r) => r,
        Err(e) => {
            return vec![CheckLine {
                passed: false,
                required: true,
                what: "policy routing".to_owned(),
                why: Some(error_chain(&e)),
                fix: Some("run as root or with CAP_NET_ADMIN".to_owned()),
            }];
        }
    };
    let mut lines = Vec::new();
    for piece in Piece::ALL {
        let line = match routing.has(piece, spec).await {
            Ok(true) => CheckLine {
                passed: true,
                required: true,
                what: piece.describe(spec),
                why: None,
                fix: None,
            },
            // Not a failure: the daemon with these flags adds it at start.
            Ok(false) if config.setup_routes => CheckLine {
                passed: false,
                required: false,
                what: piece.describe(spec),
                why: Some(ADDED_AT_START.to_owned()),
                fix: None,
            },
            found => CheckLine {
                passed: false,
                required: true,
                what: piece.describe(spec),
                why: Some(found.map_or_else(|e| error_chain(&e), |_| "missing".to_owned())),
                fix: Some(format!(
                    "{}   (or start mmproxy with --setup-routes)",
                    piece.fix(spec)
                )),
            },
        };
        lines.push(line);
    }
    lines
}

/// Why a missing piece of routing is no failure with `--setup-routes`.
const ADDED_AT_START: &str = "missing; --setup-routes adds it at start";

/// Whether the BPF programs load; required only with `--mode ebpf`.
/// `loads`: the outcome of loading them once (`Datapath::load`), shared
/// with [`auto_tcp_path`].
pub fn bpf(config: &Config, loads: &Result<(), String>) -> CheckLine {
    let required = config.mode == Mode::Ebpf;
    match loads {
        Ok(()) => CheckLine {
            passed: true,
            required,
            what: "BPF programs load (--mode ebpf is available)".to_owned(),
            why: None,
            fix: None,
        },
        Err(e) => CheckLine {
            passed: false,
            required,
            what: "BPF programs load (--mode ebpf)".to_owned(),
            why: Some(e.clone()),
            fix: Some(
                "run with CAP_BPF and CAP_NET_ADMIN on Linux 6.6+ with /sys/kernel/btf/vmlinux, \
                 or use --mode plain"
                    .to_owned(),
            ),
        },
    }
}

/// Which TCP data path `--mode auto` takes here, and why not ebpf when it
/// cannot (`loads`: as for [`bpf`]). Never required.
pub fn auto_tcp_path(config: &Config, loads: &Result<(), String>) -> Option<CheckLine> {
    if config.mode != Mode::Auto || !config.protocols.tcp {
        return None;
    }
    let obstacle = crate::forward::auto_ebpf_obstacle().or_else(|| loads.clone().err());
    Some(match obstacle {
        None => CheckLine {
            passed: true,
            required: false,
            what: "mode auto carries TCP in ebpf mode".to_owned(),
            why: None,
            fix: None,
        },
        Some(reason) => CheckLine {
            passed: false,
            required: false,
            what: "mode auto carries TCP in plain mode".to_owned(),
            why: Some(reason),
            fix: None,
        },
    })
}

/// ebpf mode's UDP kernel path from remote balancers over IPv4 needs `lo`
/// to take 127/8 redirected from other devices (docs/udp-datapath.md);
/// without it those datagrams take the userspace path. Never required.
pub fn udp_kernel_path(config: &Config) -> Option<CheckLine> {
    let applies =
        config.protocols.udp && config.mode != Mode::Plain && config.target4.ip().is_loopback();
    if !applies {
        return None;
    }
    let passed = crate::bpf::udp::lo_localnet();
    Some(CheckLine {
        passed,
        required: false,
        what: "lo takes 127/8 from other devices (UDP kernel path for remote IPv4 balancers)"
            .to_owned(),
        why: (!passed).then(|| {
            "net.ipv4.conf.lo.route_localnet and accept_local are not both 1: those datagrams \
             take the userspace path"
                .to_owned()
        }),
        fix: (!passed).then(|| crate::bpf::udp::LO_LOCALNET_FIX.to_owned()),
    })
}

/// Each TCP target, reached once normally and once from a spoofed
/// documentation address (which needs the routing to get its SYN-ACK).
/// `routing_pending`: the routing is missing and `--setup-routes` will add
/// it, so the spoofed probe cannot pass yet and does not count.
pub async fn backends(config: &Config, routing_pending: bool) -> Vec<CheckLine> {
    if !config.protocols.tcp {
        return vec![CheckLine {
            passed: true,
            required: false,
            what: "backend probes skipped: they use TCP and -p has no tcp".to_owned(),
            why: None,
            fix: None,
        }];
    }
    let opts = UpstreamOptions {
        source_port: SourcePortPolicy::Ephemeral,
        connect_timeout: PROBE_TIMEOUT,
        ..config.upstream_options()
    };
    let mut lines = Vec::new();
    for (target, probe, flag) in [
        (config.target4, PROBE_V4, "-4"),
        (config.target6, PROBE_V6, "-6"),
    ] {
        let probe = SocketAddr::new(probe, 0);
        let plain = upstream::connect(target, None, &opts).await;
        let reachable = plain.is_ok();
        lines.push(CheckLine {
            passed: reachable,
            required: true,
            what: format!("backend {target} ({flag}) accepts a connection"),
            why: plain.err().map(|e| error_chain(&e)),
            fix: (!reachable)
                .then(|| format!("start the backend on {target}, or point {flag} at it")),
        });
        if !reachable {
            continue;
        }
        let spoofed = upstream::connect(target, Some(probe), &opts).await;
        let ok = spoofed.is_ok();
        let what = format!("backend {target} answers a connection from {}", probe.ip());
        lines.push(if !ok && routing_pending {
            CheckLine {
                passed: false,
                required: false,
                what,
                why: Some("needs the routing, which --setup-routes adds at start".to_owned()),
                fix: Some("check again while mmproxy runs".to_owned()),
            }
        } else {
            CheckLine {
                passed: ok,
                required: true,
                what,
                why: spoofed.err().map(|e| error_chain(&e)),
                fix: (!ok).then(|| {
                    "fix the routing above; the backend must be bound to a loopback address \
                     (or use --mark with fwmark routing)"
                        .to_owned()
                }),
            }
        });
    }
    lines
}

/// Every check `mmproxy check` runs.
pub async fn all(config: &Config) -> Vec<CheckLine> {
    let mut lines = routing(config).await;
    let routing_pending = lines
        .iter()
        .any(|l| l.why.as_deref() == Some(ADDED_AT_START));
    lines.extend(backends(config, routing_pending).await);
    // Loaded once for both lines (then detached): a load is tens of ms.
    let loads = Datapath::load().map(drop).map_err(|e| error_chain(&e));
    lines.push(bpf(config, &loads));
    lines.extend(auto_tcp_path(config, &loads));
    lines.extend(udp_kernel_path(config));
    lines
}

/// Exit status 0 only when every required check passed.
pub fn all_passed(lines: &[CheckLine]) -> bool {
    lines.iter().all(|l| l.passed || !l.required)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(passed: bool, required: bool) -> CheckLine {
        CheckLine {
            passed,
            required,
            what: "thing".to_owned(),
            why: (!passed).then(|| "broken".to_owned()),
            fix: (!passed).then(|| "mend it".to_owned()),
        }
    }

    #[test]
    fn lines_read_pass_fail_or_info_with_the_fix_below() {
        assert_eq!(line(true, true).to_string(), "PASS  thing");
        assert_eq!(
            line(false, true).to_string(),
            "FAIL  thing: broken\n      fix: mend it"
        );
        assert_eq!(
            line(false, false).to_string(),
            "INFO  thing: broken\n      fix: mend it"
        );
    }

    #[test]
    fn only_required_failures_fail_the_run() {
        assert!(all_passed(&[line(true, true), line(false, false)]));
        assert!(!all_passed(&[line(true, true), line(false, true)]));
    }
}
