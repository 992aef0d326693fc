//! What a benchmark run measures: the subjects traffic goes through, the
//! workloads, and the samples of each cell (workload, subject). Below the
//! run that fills them in and the report, statistics and targets that read
//! them.

use std::collections::BTreeMap;

/// Something traffic goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Subject {
    /// No proxy: the load generator talks to the backend. The limit.
    Direct,
    Plain,
    Ebpf,
    GoMmproxy,
    /// mmproxy-rs, the `mmproxy` crate 0.2.2 (its binary is also called
    /// `mmproxy`, so it lives in a directory of its own).
    MmproxyRs,
    /// `HAProxy` with `accept-proxy` and `usesrc clientip` (bench/haproxy.cfg).
    Haproxy,
    /// The same with `usesrc client`: the client's IP and port, as
    /// mmproxy's default.
    HaproxyClientPort,
}

impl Subject {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Subject::Direct => "direct",
            Subject::Plain => "mmproxy plain",
            Subject::Ebpf => "mmproxy ebpf",
            Subject::GoMmproxy => "go-mmproxy",
            Subject::MmproxyRs => "mmproxy-rs",
            Subject::Haproxy => "HAProxy usesrc",
            Subject::HaproxyClientPort => "HAProxy usesrc client",
        }
    }

    /// The other implementations, which "best peer" is chosen from.
    pub(crate) fn is_peer(self) -> bool {
        matches!(
            self,
            Subject::GoMmproxy | Subject::MmproxyRs | Subject::Haproxy | Subject::HaproxyClientPort
        )
    }
}

/// A load shape, as `mmproxy-bench` arguments, and the metric it is
/// judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub(crate) enum Workload {
    #[value(name = "flood")]
    Flood,
    #[value(name = "bulk")]
    Bulk,
    #[value(name = "rr")]
    RequestResponse,
    /// Interactive request/response beside full-duplex floods through the
    /// same subject to one backend: how long a small request waits behind
    /// bulk traffic.
    #[value(name = "mixed")]
    Mixed,
    #[value(name = "cps")]
    ConnectionsPerSecond,
    /// The same, with mmproxy's `--source-port ephemeral` (client IP, any
    /// port): the bind path of `usesrc clientip` in `HAProxy`.
    #[value(name = "cps-ephemeral")]
    ConnectionsEphemeralPort,
    #[value(name = "udp64")]
    Udp64,
    #[value(name = "udp1400")]
    Udp1400,
}

impl Workload {
    /// The order the run takes them in. Workloads in one group share a
    /// round-robin (repeat 1 of each, then repeat 2, ...), so a ratio
    /// between them is measured side by side: the ephemeral-port row is
    /// judged against the default connection row. Run apart, they were
    /// minutes apart and the ratio moved with the VM (the run of 2026-12-03,
    /// eedf310, said ephemeral 0.90x the default; six interleaved pairs by
    /// hand later, 0.99x).
    pub(super) const GROUPS: [&'static [Workload]; 7] = [
        &[Workload::Flood],
        &[Workload::Bulk],
        &[Workload::RequestResponse],
        &[Workload::Mixed],
        &[
            Workload::ConnectionsPerSecond,
            Workload::ConnectionsEphemeralPort,
        ],
        &[Workload::Udp64],
        &[Workload::Udp1400],
    ];

    /// Every workload, in run and report order.
    pub(crate) fn all() -> Vec<Workload> {
        Self::GROUPS.concat()
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Workload::Flood => "flood (50 conns, PING)",
            Workload::Bulk => "bulk (1 conn)",
            Workload::RequestResponse => "request/response (10 conns, 64 B)",
            Workload::Mixed => "mixed (8 interactive 64 B beside 8 floods)",
            Workload::ConnectionsPerSecond => "new connections (16 at a time)",
            Workload::ConnectionsEphemeralPort => "new connections, --source-port ephemeral",
            Workload::Udp64 => "UDP 64 B (16 flows)",
            Workload::Udp1400 => "UDP 1400 B (16 flows)",
        }
    }

    pub(super) fn args(self) -> Vec<&'static str> {
        match self {
            Workload::Flood => vec!["flood"],
            Workload::Bulk => vec!["bulk"],
            Workload::RequestResponse => vec!["rr"],
            Workload::Mixed => vec!["mixed"],
            Workload::ConnectionsPerSecond | Workload::ConnectionsEphemeralPort => vec!["cps"],
            Workload::Udp64 => vec!["udp", "--size", "64"],
            Workload::Udp1400 => vec!["udp", "--size", "1400"],
        }
    }

    /// The metrics the report and the targets read from this workload's
    /// samples: a run whose generator leaves one out fails (the smoke run
    /// of `cargo xtask test` checks every row's this way).
    pub(super) fn expected_metrics(self) -> Vec<&'static str> {
        let mut keys = vec!["seconds", "bytes", self.headline().0];
        if matches!(self, Workload::RequestResponse | Workload::Mixed) {
            keys.extend(["p50_us", "p99_us", "p999_us"]);
        }
        if self == Workload::Mixed {
            keys.extend(["flood_down_mbit_s", "flood_up_mbit_s"]);
        }
        keys
    }

    pub(crate) fn is_udp(self) -> bool {
        matches!(self, Workload::Udp64 | Workload::Udp1400)
    }

    /// The metric the chart and the ratios use, and its unit.
    pub(crate) fn headline(self) -> (&'static str, &'static str) {
        match self {
            Workload::Flood => ("down_mbit_s", "Mbit/s echoed"),
            Workload::Bulk => ("gbit_s", "Gbit/s"),
            Workload::RequestResponse => ("requests_s", "requests/s"),
            Workload::Mixed => ("requests_s", "interactive requests/s"),
            Workload::ConnectionsPerSecond | Workload::ConnectionsEphemeralPort => {
                ("connections_s", "connections/s")
            }
            Workload::Udp64 | Workload::Udp1400 => ("round_trips_s", "datagrams/s (round trips)"),
        }
    }

    /// Which subjects run it: `HAProxy` does not proxy UDP; the
    /// source-port row compares mmproxy with itself and direct. The mixed
    /// row's 16 connections are opened once and then carry data: the
    /// `usesrc client` variant differs from `usesrc clientip` only in the
    /// port it binds when connecting, so it would measure the same data
    /// path again at the cost of another cell per repeat.
    pub(super) fn runs_on(self, subject: Subject) -> bool {
        match self {
            Workload::ConnectionsEphemeralPort => {
                matches!(subject, Subject::Direct | Subject::Plain | Subject::Haproxy)
            }
            Workload::Mixed => subject != Subject::HaproxyClientPort,
            _ => {
                !(self.is_udp() && matches!(subject, Subject::Haproxy | Subject::HaproxyClientPort))
            }
        }
    }

    /// Daemon flags this workload adds to mmproxy's.
    pub(super) fn mmproxy_args(self) -> &'static [&'static str] {
        match self {
            Workload::ConnectionsEphemeralPort => &["--source-port", "ephemeral"],
            _ => &[],
        }
    }
}

/// One repeat of one cell.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sample {
    pub(crate) metrics: BTreeMap<String, f64>,
    /// Busy CPU seconds of the whole machine during the load.
    pub(crate) cpu_seconds: f64,
    /// CPU seconds of the run's own processes (the load generator with
    /// its backend, and the subject): what other work on a shared machine
    /// adds to `cpu_seconds` is not in it; softirq work is, when it runs
    /// in their context (as on loopback), not when `ksoftirqd` takes it.
    pub(crate) own_cpu_seconds: Option<f64>,
    /// The subject's peak resident set, KiB (none for direct).
    pub(crate) peak_rss_kib: Option<u64>,
}

impl Sample {
    pub(crate) fn cpu_per_gb(&self) -> f64 {
        let gb = self.metrics.get("bytes").copied().unwrap_or(0.0) / 1e9;
        if gb > 0.0 {
            self.cpu_seconds / gb
        } else {
            f64::NAN
        }
    }

    /// Machine CPU per round trip (one datagram each way through the
    /// subject), microseconds: the UDP rows' cost, where bytes say little.
    pub(crate) fn cpu_us_per_round_trip(&self) -> f64 {
        self.per_round_trip_us(self.cpu_seconds)
    }

    /// The same for the run's own processes only.
    pub(crate) fn own_cpu_us_per_round_trip(&self) -> f64 {
        self.own_cpu_seconds
            .map_or(f64::NAN, |cpu| self.per_round_trip_us(cpu))
    }

    fn per_round_trip_us(&self, cpu_seconds: f64) -> f64 {
        let metric = |k: &str| self.metrics.get(k).copied().unwrap_or(f64::NAN);
        let round_trips = metric("round_trips_s") * metric("seconds");
        if round_trips > 0.0 {
            cpu_seconds / round_trips * 1e6
        } else {
            f64::NAN
        }
    }
}

/// Everything measured, by cell.
pub(crate) type Results = BTreeMap<(Workload, Subject), Vec<Sample>>;
