//! `cargo xtask bench`: every subject under the same workloads, in one
//! run.
//!
//! Repeats go round the subjects (each subject's first repeat, then each
//! one's second, ...). Every repeat gets a fresh network namespace, a
//! fresh subject process (the proxy, or nothing for `direct`), then
//! `mmproxy-bench` (load generator and backend, `bench/`) inside the
//! namespace, with the whole machine's CPU time read from /proc/stat
//! around it and the subject's peak RSS from /proc/<pid>/status after it.
//! Ratios are taken between medians of the same run; nothing is compared
//! across runs.

mod cells;
mod report;
mod stats;
mod targets;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use self::cells::{Results, Sample, Subject, Workload};
use crate::{
    build_ebpf::{self, build_ebpf},
    exec::{cargo, exec, is_root, output, workspace_root},
};

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// A short smoke run (1 repeat of 1 s per cell) that checks the harness
    /// end to end; its numbers mean little.
    #[arg(long)]
    quick: bool,
    /// Repeats of each cell; the report gives the median and min-max.
    #[arg(long, default_value_t = 3)]
    repeats: u32,
    /// Seconds of load per repeat.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Install the peers when missing: go-mmproxy and `HAProxy` with apt
    /// (needs root), mmproxy-rs with `cargo install` into target/peers.
    #[arg(long)]
    peers: bool,
    /// Run only these workloads (repeatable; default all). A partial run
    /// needs its own `--out`: it must not replace the full report.
    #[arg(long = "workload", value_enum)]
    workloads: Vec<Workload>,
    /// Where the markdown report goes (the SVG chart goes beside it).
    #[arg(long, default_value = DEFAULT_REPORT)]
    out: PathBuf,
}

const DEFAULT_REPORT: &str = "docs/benchmarks.md";

impl Options {
    /// `--quick`, written to `out` (relative to the workspace root).
    pub(crate) fn smoke(out: &str) -> Self {
        Self {
            quick: true,
            repeats: 1,
            seconds: 1.0,
            peers: false,
            workloads: Vec::new(),
            out: PathBuf::from(out),
        }
    }
}

/// mmproxy-rs, pinned: the version the issue names, `--locked`.
const MMPROXY_RS_VERSION: &str = "0.2.2";
/// Where `--peers` installs it (`cargo install --root`), relative to the
/// workspace root; `bin/mmproxy` inside.
const MMPROXY_RS: &str = "target/peers/mmproxy-rs";

const NS_PREFIX: &str = "mmproxy-bench";
const PROXY: &str = "127.0.0.1:8443";
const BACKEND: &str = "127.0.0.1:9000";

pub(crate) fn bench(opts: &Options) -> Result<()> {
    ensure!(
        is_root(),
        "cargo xtask bench needs root (network namespace, IP_TRANSPARENT, BPF)"
    );
    let (repeats, seconds) = if opts.quick {
        (1, 1.0)
    } else {
        (opts.repeats.max(1), opts.seconds)
    };
    ensure!(
        opts.workloads.is_empty() || opts.out != Path::new(DEFAULT_REPORT),
        "a run of some workloads would replace the full report {DEFAULT_REPORT}: give --out"
    );
    if opts.peers {
        install_peers()?;
    }
    build_ebpf(&build_ebpf::Options::default())?;
    exec(cargo(None).current_dir(workspace_root()).args([
        "build",
        "--locked",
        "--release",
        "-p",
        "mmproxy",
        "-p",
        "mmproxy-bench",
    ]))?;
    let target = workspace_root().join("target/release");
    let binaries = Binaries {
        mmproxy: target.join("mmproxy"),
        load: target.join("mmproxy-bench"),
        go_mmproxy: which("go-mmproxy"),
        mmproxy_rs: Some(mmproxy_rs_binary()).filter(|p| p.is_file()),
        haproxy: which("haproxy"),
    };
    let mut subjects = vec![Subject::Direct, Subject::Plain, Subject::Ebpf];
    match &binaries.go_mmproxy {
        Some(_) => subjects.push(Subject::GoMmproxy),
        None => eprintln!("bench: go-mmproxy not installed; skipped (--peers installs it)"),
    }
    match &binaries.mmproxy_rs {
        Some(_) => subjects.push(Subject::MmproxyRs),
        None => eprintln!("bench: mmproxy-rs not installed; skipped (--peers installs it)"),
    }
    match &binaries.haproxy {
        Some(_) => subjects.extend([Subject::Haproxy, Subject::HaproxyClientPort]),
        None => eprintln!("bench: haproxy not installed; skipped (--peers installs it)"),
    }
    let mut results = Results::new();
    for group in Workload::GROUPS {
        // Round-robin: repeat 1 of every subject, then repeat 2, ... so a
        // slow minute of this shared VM lands on every subject alike (one
        // run had direct's own flood range 4,113-8,332 Mbit/s when each
        // subject's repeats ran back to back).
        for repeat in 0..repeats {
            let cells = group
                .iter()
                .filter(|w| opts.workloads.is_empty() || opts.workloads.contains(w))
                .flat_map(|w| subjects.iter().map(move |s| (*w, *s)));
            for (workload, subject) in cells {
                if !workload.runs_on(subject) {
                    continue;
                }
                // A fresh namespace per repeat: the connection rows leave
                // thousands of TIME_WAIT sockets behind, which slowed every
                // later connection row when one namespace served the run
                // (2026-12-02: plain 3,065 connections/s late in a shared
                // namespace, 4,137-9,988 in fresh ones).
                let ns = Namespace::create()?;
                let sample = run_cell(&ns, &binaries, subject, workload, seconds)
                    .with_context(|| format!("{} under {}", subject.name(), workload.name()))?;
                eprintln!(
                    "bench: {:<14} {:<36} #{} {} = {:.1}",
                    subject.name(),
                    workload.name(),
                    repeat + 1,
                    workload.headline().0,
                    sample
                        .metrics
                        .get(workload.headline().0)
                        .copied()
                        .unwrap_or(f64::NAN)
                );
                results.entry((workload, subject)).or_default().push(sample);
            }
        }
    }
    let command = if opts.quick {
        "cargo xtask bench --quick".to_owned()
    } else {
        format!(
            "cargo xtask bench --repeats {repeats} --seconds {seconds}{}",
            if opts.peers { " --peers" } else { "" }
        )
    };
    let out = workspace_root().join(&opts.out);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    report::write(&out, &results, &subjects, &command)?;
    eprintln!("bench: wrote {} and its chart", out.display());
    Ok(())
}

struct Binaries {
    mmproxy: PathBuf,
    load: PathBuf,
    go_mmproxy: Option<PathBuf>,
    mmproxy_rs: Option<PathBuf>,
    haproxy: Option<PathBuf>,
}

fn run_cell(
    ns: &Namespace,
    bin: &Binaries,
    subject: Subject,
    workload: Workload,
    seconds: f64,
) -> Result<Sample> {
    let protocol = if workload.is_udp() { "udp" } else { "tcp" };
    let proxy_args = [
        "-l",
        PROXY,
        "-4",
        BACKEND,
        "-6",
        "[::1]:9000",
        "-p",
        protocol,
    ];
    let mut proc = spawn_subject(ns, bin, subject, workload, &proxy_args)?;
    if let Some(p) = &mut proc {
        p.wait_ready(workload.is_udp(), ns)?;
    }
    let (target, header) = match subject {
        Subject::Direct => (BACKEND, "none"),
        _ if workload.is_udp() => (PROXY, "v2"),
        _ => (PROXY, "v1"),
    };
    let seconds_arg = format!("{seconds}");
    let mut args = vec![
        "--target",
        target,
        "--backend",
        BACKEND,
        "--header",
        header,
        "--seconds",
        &seconds_arg,
    ];
    args.extend(workload.args());
    if let Some(proc) = &proc {
        proc.reset_peak_rss();
    }
    let subject_cpu = || proc.as_ref().map(SubjectProcess::cpu_seconds);
    let (before, children_before, subject_before) =
        (busy_cpu_seconds()?, children_cpu_seconds()?, subject_cpu());
    let out = output(ns.command(&bin.load).args(&args))?;
    let cpu_seconds = busy_cpu_seconds()? - before;
    // The generator is the only child waited for during the load (`ip
    // netns exec` execs it, so its pid is the generator's).
    let generator_cpu = children_cpu_seconds()? - children_before;
    let own_cpu_seconds = match (subject_before, subject_cpu()) {
        (None, None) => Some(generator_cpu),
        (Some(Some(a)), Some(Some(b))) => Some(generator_cpu + b - a),
        _ => None,
    };
    let peak_rss_kib = proc.as_ref().and_then(SubjectProcess::peak_rss_kib);
    let mut metrics = out
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| Ok((k.to_owned(), v.parse::<f64>()?)))
        .collect::<Result<BTreeMap<_, _>>>()
        .with_context(|| format!("unreadable load generator output:\n{out}"))?;
    if subject == Subject::Ebpf {
        match kernel_path_counts(ns, workload.is_udp()) {
            Some(counts) => metrics.extend(counts),
            None => eprintln!("bench: cannot read the ebpf subject's metrics (is curl installed?)"),
        }
    }
    let missing: Vec<&str> = workload
        .expected_metrics()
        .into_iter()
        .filter(|k| !metrics.contains_key(*k))
        .collect();
    ensure!(
        missing.is_empty(),
        "no {} in the load generator output:\n{out}",
        missing.join(", ")
    );
    Ok(Sample {
        metrics,
        cpu_seconds,
        own_cpu_seconds,
        peak_rss_kib,
    })
}

/// Starts `subject` for `workload` in `ns` (`None` for direct: the load
/// goes to the backend itself).
fn spawn_subject(
    ns: &Namespace,
    bin: &Binaries,
    subject: Subject,
    workload: Workload,
    proxy_args: &[&str],
) -> Result<Option<SubjectProcess>> {
    Ok(match subject {
        Subject::Direct => None,
        Subject::Plain | Subject::Ebpf => {
            let mode = if subject == Subject::Plain {
                "plain"
            } else {
                "ebpf"
            };
            // Ready means READY=1 on NOTIFY_SOCKET, not a listening port:
            // the port opens before the BPF programs load, and the loader's
            // start-up peak would otherwise be counted as the load's.
            let notify = ReadyNotice::new()?;
            // ebpf mode serves metrics: the report says what the kernel
            // path carried (TCP connections armed, UDP datagrams).
            let metrics: &[&str] = if subject == Subject::Ebpf {
                &["--metrics-addr", EBPF_METRICS]
            } else {
                &[]
            };
            let mut proc = ns.spawn(
                &bin.mmproxy,
                &[
                    proxy_args,
                    &["--mode", mode],
                    metrics,
                    workload.mmproxy_args(),
                ]
                .concat(),
                &[("NOTIFY_SOCKET", notify.path()?)],
            )?;
            proc.ready_notice = Some(notify);
            Some(proc)
        }
        // mmproxy-rs takes go-mmproxy's flags for this job.
        Subject::GoMmproxy | Subject::MmproxyRs => {
            let peer = if subject == Subject::GoMmproxy {
                &bin.go_mmproxy
            } else {
                &bin.mmproxy_rs
            };
            let peer = peer
                .as_ref()
                .with_context(|| format!("{} missing", subject.name()))?;
            Some(ns.spawn(peer, proxy_args, &[])?)
        }
        Subject::Haproxy | Subject::HaproxyClientPort => {
            let haproxy = bin.haproxy.as_ref().context("haproxy missing")?;
            let config = workspace_root().join("bench/haproxy.cfg");
            let config = config.to_str().context("non-UTF-8 path")?;
            let usesrc = if subject == Subject::Haproxy {
                "clientip"
            } else {
                "client"
            };
            // -db: stay in the foreground, so the process is the proxy.
            Some(ns.spawn(haproxy, &["-db", "-f", config], &[("USESRC", usesrc)])?)
        }
    })
}

/// Where the ebpf subject serves its metrics.
const EBPF_METRICS: &str = "127.0.0.1:9100";

/// What the ebpf subject's kernel path carried, from its metrics, as
/// extra metrics of the sample; `None` when they cannot be read.
///
/// TCP: connections armed (`--ebpf-arm-after-ms` keeps short connections,
/// and saturated ones that never catch up, in userspace). UDP: datagrams
/// the TC program forwarded and replies it relayed (the program's own
/// counters, read live; the daemon's copies catch up once a second)
/// against the datagrams the daemon's sockets read, and the kernel's
/// share of the forwarding: near 1 when each flow's first datagram is
/// the only one userspace sees.
fn kernel_path_counts(ns: &Namespace, udp: bool) -> Option<Vec<(String, f64)>> {
    let out = ns
        .command(Path::new("curl"))
        .args(["-sf", &format!("http://{EBPF_METRICS}/metrics")])
        .output()
        .ok()?;
    let exposition = String::from_utf8(out.stdout).ok()?;
    let series: &[(&str, &str)] = if udp {
        &[
            (
                "kernel_forwarded",
                r#"mmproxy_udp_kernel_program_total{outcome="forwarded"}"#,
            ),
            (
                "kernel_replied",
                r#"mmproxy_udp_kernel_program_total{outcome="replied"}"#,
            ),
            ("userspace_received", "mmproxy_udp_userspace_received_total"),
        ]
    } else {
        &[("connections_armed", "mmproxy_ebpf_connections_armed_total")]
    };
    let mut counts = series
        .iter()
        .map(|&(name, series)| Some((name.to_owned(), series_value(&exposition, series)?)))
        .collect::<Option<Vec<_>>>()?;
    if udp {
        let (kernel, userspace) = (counts[0].1, counts[2].1);
        let share = kernel / (kernel + userspace);
        if share.is_nan() || share < 0.5 {
            eprintln!(
                "bench: the UDP kernel path forwarded {kernel} datagrams, the daemon read \
                 {userspace}: the kernel path was hardly used"
            );
        }
        counts.push(("kernel_share".to_owned(), share));
    }
    Some(counts)
}

/// The value of one series (name and labels, exactly as exposed) in a
/// Prometheus text exposition.
fn series_value(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Busy time of all CPUs so far, from the first line of /proc/stat:
/// everything but idle and iowait, softirq and kernel threads included
/// (in-kernel forwarding runs there, not in the daemon).
fn busy_cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    ensure!(fields.len() >= 8, "short /proc/stat line: {line}");
    // user nice system idle iowait irq softirq steal (guest is in user).
    let busy: u64 = fields[..8].iter().sum::<u64>() - fields[3] - fields[4];
    let ticks_per_second = 100.0; // USER_HZ on Linux
    #[allow(clippy::cast_precision_loss)] // ticks stay far below 2^52
    Ok(busy as f64 / ticks_per_second)
}

/// The fields of /proc/<pid>/stat after the command name (which may
/// hold spaces): field 3 (state) first.
fn proc_stat_fields(pid: &str) -> Result<Vec<u64>> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let (_, after_name) = stat
        .rsplit_once(") ")
        .with_context(|| format!("odd {path}: {stat}"))?;
    // The state is a letter; every later field is a number.
    Ok(after_name
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect())
}

/// Field `n` (numbered as in proc(5)) of [`proc_stat_fields`].
fn stat_field(fields: &[u64], n: usize) -> Option<u64> {
    fields.get(n.checked_sub(4)?).copied()
}

/// Seconds from clock ticks (`USER_HZ`).
#[allow(clippy::cast_precision_loss)] // ticks stay far below 2^52
fn ticks_to_seconds(ticks: u64) -> f64 {
    ticks as f64 / 100.0
}

/// CPU time (user and system) of this process's children that have been
/// waited for: `cutime` and `cstime`, fields 16 and 17 of /proc/self/stat.
fn children_cpu_seconds() -> Result<f64> {
    let fields = proc_stat_fields("self")?;
    let field = |n| stat_field(&fields, n).context("short /proc/self/stat");
    Ok(ticks_to_seconds(field(16)? + field(17)?))
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

fn install_peers() -> Result<()> {
    let missing: Vec<&str> = ["go-mmproxy", "haproxy"]
        .into_iter()
        .filter(|p| which(p).is_none())
        .collect();
    if !missing.is_empty() {
        eprintln!("bench: installing {} with apt", missing.join(", "));
        exec(Command::new("apt-get").arg("update").arg("-qq"))?;
        exec(
            Command::new("apt-get")
                .args(["install", "-y", "-qq"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    if !mmproxy_rs_binary().is_file() {
        eprintln!("bench: installing mmproxy-rs {MMPROXY_RS_VERSION} with cargo");
        exec(
            cargo(None)
                .args([
                    "install",
                    "mmproxy",
                    "--version",
                    MMPROXY_RS_VERSION,
                    "--locked",
                    "--root",
                ])
                .arg(workspace_root().join(MMPROXY_RS)),
        )?;
    }
    Ok(())
}

fn mmproxy_rs_binary() -> PathBuf {
    workspace_root().join(MMPROXY_RS).join("bin/mmproxy")
}

/// The benchmark's namespace: loopback and the policy routing of
/// docs/configuration.md.
/// Deleted on drop.
struct Namespace {
    name: String,
}

impl Namespace {
    fn create() -> Result<Self> {
        let ns = Self {
            name: format!("{NS_PREFIX}-{}", std::process::id()),
        };
        exec(Command::new("ip").args(["netns", "add", &ns.name]))?;
        for args in [
            &["link", "set", "lo", "up"][..],
            &[
                "rule",
                "add",
                "from",
                "127.0.0.1/8",
                "iif",
                "lo",
                "table",
                "123",
            ],
            &[
                "route",
                "add",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                "123",
            ],
            &[
                "-6", "rule", "add", "from", "::1/128", "iif", "lo", "table", "123",
            ],
            &[
                "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "123",
            ],
        ] {
            exec(Command::new("ip").args(["-n", &ns.name]).args(args))?;
        }
        Ok(ns)
    }

    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    fn spawn(&self, program: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<SubjectProcess> {
        let child = self
            .command(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        Ok(SubjectProcess {
            child,
            ready_notice: None,
        })
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A proxy under test; killed on drop.
struct SubjectProcess {
    child: Child,
    /// Where a subject that speaks `sd_notify` says it is ready.
    ready_notice: Option<ReadyNotice>,
}

/// A datagram socket standing in for systemd's `NOTIFY_SOCKET`; removed
/// on drop.
struct ReadyNotice {
    socket: std::os::unix::net::UnixDatagram,
    path: PathBuf,
}

impl ReadyNotice {
    fn new() -> Result<Self> {
        let path =
            std::env::temp_dir().join(format!("mmproxy-bench-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let socket = std::os::unix::net::UnixDatagram::bind(&path)
            .with_context(|| format!("cannot bind {}", path.display()))?;
        socket.set_nonblocking(true)?;
        Ok(Self { socket, path })
    }

    fn path(&self) -> Result<&str> {
        self.path.to_str().context("non-UTF-8 temporary directory")
    }

    /// Whether READY=1 has arrived.
    fn ready(&self) -> bool {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.socket.recv(&mut buf) {
            if buf[..n].split(|&b| b == b'\n').any(|l| l == b"READY=1") {
                return true;
            }
        }
        false
    }
}

impl Drop for ReadyNotice {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl SubjectProcess {
    /// Waits until the proxy says it is ready (`sd_notify`), or else until
    /// it accepts (TCP) or has bound (UDP).
    fn wait_ready(&mut self, udp: bool, ns: &Namespace) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the proxy exited at start ({status})");
            }
            let ready = if let Some(notice) = &self.ready_notice {
                notice.ready()
            } else if udp {
                udp_bound(ns)
            } else {
                tcp_listening(ns)
            };
            if ready {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the proxy did not start listening within 10 s"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Resets `VmHWM` to the current resident set (`clear_refs` 5, Linux
    /// 4.0+), so the peak read after the load is the peak under this load,
    /// not a start-up spike (ebpf mode's BPF loader parses the kernel's
    /// BTF once: about 20 MiB for a moment, docs/ebpf-datapath.md).
    fn reset_peak_rss(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5");
    }

    /// User and system CPU time of all its threads so far (`utime` and
    /// `stime`, fields 14 and 15 of /proc/<pid>/stat); `None` once gone.
    fn cpu_seconds(&self) -> Option<f64> {
        let fields = proc_stat_fields(&self.child.id().to_string()).ok()?;
        Some(ticks_to_seconds(
            stat_field(&fields, 14)? + stat_field(&fields, 15)?,
        ))
    }

    /// `VmHWM`: the most memory the process had resident since the reset.
    fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for SubjectProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tcp_listening(ns: &Namespace) -> bool {
    socket_listed(ns, "-ltnH")
}

fn udp_bound(ns: &Namespace) -> bool {
    socket_listed(ns, "-lunH")
}

/// Asks `ss` inside the namespace whether port 8443 is bound (a connect
/// from here would run in the root namespace).
fn socket_listed(ns: &Namespace, flags: &str) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", &ns.name, "ss", flags, "sport", "=", ":8443",
        ])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
}

#[cfg(test)]
mod tests {
    use super::series_value;

    #[test]
    fn series_are_read_by_exact_name_and_labels() {
        let exposition = "\
# TYPE mmproxy_udp_kernel_program counter
mmproxy_udp_kernel_program_total{outcome=\"forwarded\"} 1234
mmproxy_udp_kernel_program_total{outcome=\"forwarded_bytes\"} 99
mmproxy_udp_userspace_received_total 16
mmproxy_udp_userspace_received_total_other 7
";
        let forwarded = r#"mmproxy_udp_kernel_program_total{outcome="forwarded"}"#;
        assert_eq!(series_value(exposition, forwarded), Some(1234.0));
        assert_eq!(
            series_value(exposition, "mmproxy_udp_userspace_received_total"),
            Some(16.0)
        );
        assert_eq!(series_value(exposition, "mmproxy_udp_received_total"), None);
    }
}
