//! Test support shared by the integration tests.
//!
//! Every privileged test makes its own network namespace ([`Netns`]) with
//! loopback up and the policy routing the daemon needs (table 123, IPv4
//! and IPv6); the root namespace's routes are never touched. The test body
//! runs on a thread that has entered the namespace ([`Netns::run`]), so its
//! backends and clients live there too; the daemon runs inside it through
//! `ip netns exec`. Namespaces, daemons and helper processes are removed
//! on drop, also when a test panics. Names carry the pid and a counter, so
//! tests run in parallel.
//!
//! Without root, [`netns_or_skip`] prints a loud SKIP and the test returns;
//! with `CI=true` it fails instead.

#![allow(dead_code, unreachable_pub)]

/// Declares `mod $module` with one test per name, each calling
/// `super::$name($mode)`: the building block of [`both_modes!`] and
/// [`each_data_path!`].
#[allow(unused_macros, reason = "used through the two macros below")]
macro_rules! tests_in_mode {
    ($module:ident => $mode:literal: $($name:ident),*) => {
        mod $module {
            $(#[test] fn $name() { super::$name($mode) })*
        }
    };
}

/// Declares each test function `$name(mode)` once per data path, as
/// `plain::$name` and `ebpf::$name`, so both are held to one contract.
#[allow(
    unused_macros,
    reason = "only the suites that run in both modes use it"
)]
macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {
        tests_in_mode!(plain => "plain": $($name),*);
        tests_in_mode!(ebpf => "ebpf": $($name),*);
    };
}

/// Declares each test function `$name(mode)` once per data path and
/// configuration: `plain::$name`; `ebpf::$name`, armed from the first
/// byte, so the kernel path itself is held to the contract; and
/// `ebpf_warm_up::$name`, ebpf mode's default, copied in userspace for
/// `--ebpf-arm-after-ms` and armed after (short tests end before it).
/// [`mode_args`] turns `mode` into flags.
#[allow(unused_macros, reason = "only the suites about the data path use it")]
macro_rules! each_data_path {
    ($($name:ident),* $(,)?) => {
        tests_in_mode!(plain => "plain": $($name),*);
        tests_in_mode!(ebpf => "ebpf": $($name),*);
        tests_in_mode!(ebpf_warm_up => "ebpf-warm-up": $($name),*);
    };
}

/// The daemon flags for a mode named by [`each_data_path!`].
pub fn mode_args(mode: &'static str) -> Vec<&'static str> {
    match mode {
        "ebpf" => vec!["--mode", "ebpf", "--ebpf-arm-after-ms", "0"],
        "ebpf-warm-up" => vec!["--mode", "ebpf"],
        other => vec!["--mode", other],
    }
}

/// Whether a mode named by [`each_data_path!`] is ebpf mode.
pub fn is_ebpf(mode: &str) -> bool {
    mode.starts_with("ebpf")
}

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpListener as StdTcpListener},
    os::fd::AsFd as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

static NEXT_NS: AtomicU32 = AtomicU32::new(0);

/// True when running as root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A fresh namespace, or `None` after printing why the test is skipped.
/// Under `CI=true` a skip is a failure.
pub fn netns_or_skip(test: &str) -> Option<Netns> {
    if is_root() {
        return Some(Netns::new());
    }
    let msg = format!(
        "\n!!!!! SKIPPED {test}: needs root (network namespaces, IP_TRANSPARENT, BPF) !!!!!\n"
    );
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{msg}CI=true: privileged tests must run, not skip"
    );
    eprintln!("{msg}");
    None
}

/// A network namespace with loopback up and the daemon's routing.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Self {
        let ns = Self::without_routing();
        ns.add_routing();
        ns
    }

    /// A namespace with loopback up and no policy routing (for the tests
    /// of `mmproxy check` and `--setup-routes`).
    pub fn without_routing() -> Self {
        let name = format!(
            "mmpt-{}-{}",
            std::process::id(),
            NEXT_NS.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Prohibits traffic to `dst` unless it carries `mark`. The `local`
    /// table's rule moves behind the mark rule, or it would match first.
    pub fn only_marked_reaches(&self, dst: &str, mark: &str) {
        self.ip(&[
            "rule", "add", "pref", "100", "fwmark", mark, "lookup", "local",
        ]);
        self.ip(&["rule", "add", "pref", "101", "to", dst, "prohibit"]);
        self.ip(&["rule", "add", "pref", "1000", "lookup", "local"]);
        self.ip(&["rule", "del", "pref", "0"]);
    }

    /// `ip -n <ns> args...`'s standard output.
    pub fn ip_output(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The routing of docs/configuration.md: replies to spoofed sources are delivered
    /// locally.
    pub fn add_routing(&self) {
        self.add_routing_v4();
        self.ip(&[
            "-6", "rule", "add", "from", "::1/128", "iif", "lo", "table", "123",
        ]);
        self.ip(&[
            "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "123",
        ]);
    }

    /// The IPv4 half of [`Netns::add_routing`].
    pub fn add_routing_v4(&self) {
        self.ip(&[
            "rule",
            "add",
            "from",
            "127.0.0.1/8",
            "iif",
            "lo",
            "table",
            "123",
        ]);
        self.ip(&[
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "123",
        ]);
    }

    /// Runs `ip -n <ns> args...`, panicking with its output on failure.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// The policy routing of the namespace, as text to compare.
    pub fn routing_listing(&self) -> String {
        [
            self.ip_output(&["rule", "show"]),
            self.ip_output(&["-6", "rule", "show"]),
            self.ip_output(&[
                "route", "show", "table", "all", "type", "local", "dev", "lo",
            ]),
            self.ip_output(&[
                "-6", "route", "show", "table", "all", "type", "local", "dev", "lo",
            ]),
        ]
        .join("")
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `body` on a thread inside the namespace, with its own tokio
    /// runtime, and returns its result (re-raising its panic).
    pub fn run<F, T>(&self, body: F) -> T
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let name = self.name.clone();
        thread::spawn(move || block_on_in(&name, body))
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Netns {
    /// Runs `fut` in the background on a thread inside the namespace until
    /// the returned guard is dropped.
    pub fn spawn<F>(&self, fut: F) -> Background
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let name = self.name.clone();
        let handle = thread::spawn(move || {
            block_on_in(&name, async move {
                let _ = ready_tx.send(());
                tokio::select! {
                    () = fut => {}
                    _ = stop_rx => {}
                }
            });
        });
        ready_rx.recv().expect("background task started");
        Background {
            stop: Some(stop_tx),
            handle: Some(handle),
        }
    }

    /// A second namespace playing the client's host, joined to this one by
    /// a veth pair: this side 192.0.2.1/24, the client 192.0.2.10/24
    /// (documentation addresses, local to the two namespaces). Spoofing a
    /// client that is not local to the proxy host is the real deployment.
    pub fn client_host(&self) -> Netns {
        let client = Netns::new();
        let (a, b) = (
            format!("va{}", &self.name[5..]),
            format!("vb{}", &self.name[5..]),
        );
        let (a, b) = (truncate_ifname(&a), truncate_ifname(&b));
        self.ip(&[
            "link",
            "add",
            &a,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &client.name,
        ]);
        self.ip(&["addr", "add", "192.0.2.1/24", "dev", &a]);
        self.ip(&["link", "set", &a, "up"]);
        client.ip(&["addr", "add", "192.0.2.10/24", "dev", &b]);
        client.ip(&["link", "set", &b, "up"]);
        client
    }
}

/// Moves the current thread into namespace `name` and runs `body` there on
/// a fresh runtime. The thread stays in the namespace: use a new thread.
fn block_on_in<F: Future>(name: &str, body: F) -> F::Output {
    let path = format!("/run/netns/{name}");
    let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    rustix::thread::move_into_link_name_space(
        ns.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .expect("setns into the test namespace");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("test runtime")
        .block_on(body)
}

fn truncate_ifname(name: &str) -> String {
    name.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(15)
        .collect()
}

/// A background task in a namespace; stopped on drop.
pub struct Background {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A minimal HTTP/1.0 GET: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr)
        .await
        .expect("connect to the metrics port");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .expect("send request");
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut response))
        .await
        .expect("response within 5 s")
        .expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of the first metric line starting with `prefix`, if any.
fn find_metric(body: &str, prefix: &str) -> Option<u64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The value of the first metric line starting with `prefix`.
pub fn metric(body: &str, prefix: &str) -> u64 {
    find_metric(body, prefix).unwrap_or_else(|| panic!("no metric {prefix:?} in:\n{body}"))
}

/// Scrapes `/metrics` until every `(prefix, value)` pair holds (counters
/// move when connections end), or panics after 5 s with the last body.
pub async fn wait_for_metrics(addr: SocketAddr, expected: &[(&str, u64)]) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200);
        let settled = expected
            .iter()
            .all(|(prefix, value)| find_metric(&body, prefix) == Some(*value));
        if settled {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "metrics did not reach {expected:?}:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free TCP port on loopback inside the current namespace.
pub fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// With only `CAP_NET_ADMIN`, or the ebpf set beside it.
pub const CAPS_PLAIN: &str = "-all,+net_admin";
pub const CAPS_EBPF: &str = "-all,+net_admin,+bpf,+perfmon";

/// The daemon's binary run in `ns` through `setpriv` with only the
/// capabilities `caps` (inheritable, ambient and bounding); arguments
/// follow.
pub fn daemon_with_capabilities(ns: &Netns, caps: &str) -> Command {
    let mut cmd = ns.command("setpriv");
    cmd.args([
        &format!("--inh-caps={caps}"),
        &format!("--ambient-caps={caps}"),
        &format!("--bounding-set={caps}"),
        "--",
    ])
    .arg(daemon_binary());
    cmd
}

/// The daemon binary under test.
pub fn daemon_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mmproxy"))
}

/// Sends `sig` to process `pid` (0 or gone: nothing happens).
pub fn signal_pid(pid: i32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// A running daemon inside a namespace. Stopped (SIGTERM, then SIGKILL)
/// on drop; its log is kept for assertions and printed on failure.
pub struct Daemon {
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
    lines: mpsc::Receiver<String>,
}

impl Daemon {
    /// Starts the daemon with `args` and waits for its "listening" line.
    pub fn start(ns: &Netns, args: &[&str]) -> Self {
        Self::start_with(ns.command(daemon_binary()), args)
    }

    /// Like [`Daemon::start`], for a prepared command (e.g. under prlimit).
    pub fn start_with(mut cmd: Command, args: &[&str]) -> Self {
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1");
        let mut child = cmd.spawn().expect("spawn mmproxy");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let daemon = Self {
            child: Some(child),
            log,
            lines,
        };
        daemon.wait_for_log("listening", Duration::from_secs(10));
        daemon
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        if let Some(line) = self.log().into_iter().find(|l| l.contains(needle)) {
            return line;
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout | mpsc::RecvTimeoutError::Disconnected) => {
                    panic!(
                        "no log line with {needle:?} within {timeout:?}; log:\n{}",
                        self.log().join("\n")
                    )
                }
            }
        }
    }

    /// Waits for the `n`th log line containing `needle` (1-based): for a
    /// line that a later process sharing this log (an upgraded daemon)
    /// writes again.
    pub fn wait_for_nth_log(&self, needle: &str, n: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let matching: Vec<String> = self
                .log()
                .into_iter()
                .filter(|l| l.contains(needle))
                .collect();
            if let Some(line) = matching.get(n - 1) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {n} log lines with {needle:?} within {timeout:?}; log:\n{}",
                self.log().join("\n")
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The daemon's resident memory now (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS")
    }

    /// The most memory the daemon has had resident (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM")
    }

    /// A KiB field of the daemon's `/proc/PID/status`.
    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read the daemon's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc status"))
    }

    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .map_or(0, |c| i32::try_from(c.id()).expect("pids fit i32"))
    }

    /// Sends a signal to the daemon (not to the `ip netns exec` wrapper,
    /// which execs it: the pid is the daemon's).
    pub fn signal(&self, sig: rustix::process::Signal) {
        signal_pid(self.pid(), sig);
    }

    /// Waits for the daemon to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Signal before taking the child: `signal` finds the pid there.
        self.signal(rustix::process::Signal::TERM);
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "---- mmproxy log ----\n{}\n---------------------",
                self.log().join("\n")
            );
        }
    }
}

/// A TCP backend that records each peer address it sees and echoes.
#[derive(Clone)]
pub struct Backend {
    pub addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    /// How each connection ended: `None` for EOF, else the read error.
    ends: Arc<Mutex<Vec<Option<std::io::ErrorKind>>>>,
    /// Bytes `Source` connections wrote and read, summed.
    progress: Arc<Progress>,
}

/// What `BackendKind::Source` connections have done so far.
#[derive(Debug, Default)]
pub struct Progress {
    pub written: std::sync::atomic::AtomicU64,
    pub read: std::sync::atomic::AtomicU64,
}

/// How a `BackendKind::Source` connection ends after its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceEnd {
    /// Reset the connection (SO_LINGER 0) as soon as the bytes are written.
    Reset,
    /// Half-close, then read what the client sends until its FIN.
    HalfClose,
}

/// What a backend does with each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// Echo everything; half-close when the client does.
    Echo,
    /// Send a greeting first (SSH, SMTP style), then echo.
    ServerFirst,
    /// Read nothing; reset the connection at once.
    Reset,
    /// Read to EOF, answer with the SHA-256 of what was read, close. For
    /// the first `slow_for` after accepting, read 16 KiB every 10 ms.
    Sink { slow_for: Duration },
    /// On the first byte, wait `delay`, send `bytes` of the stream seeded
    /// by the client's port, then close: a reply that races the arming.
    Burst { bytes: usize, delay: Duration },
    /// At once, send `mib` MiB of the 1 MiB pattern seeded by the client's
    /// port, repeated, then end as told.
    Source { mib: u32, end: SourceEnd },
}

pub const GREETING: &[u8] = b"220 backend ready\r\n";

impl Backend {
    pub async fn start(bind: &str, kind: BackendKind) -> Self {
        let listener = TcpListener::bind(bind).await.expect("bind backend");
        let addr = listener.local_addr().unwrap();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let ends = Arc::new(Mutex::new(Vec::new()));
        let progress = Arc::new(Progress::default());
        let (seen, ended, counted) = (peers.clone(), ends.clone(), progress.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    return;
                };
                seen.lock().unwrap().push(peer);
                let ended = ended.clone();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let end = match kind {
                        BackendKind::Source { mib, end } => {
                            source(stream, mib, end, &counted).await
                        }
                        _ => serve(stream, kind).await,
                    };
                    ended.lock().unwrap().push(end);
                });
            }
        });
        Self {
            addr,
            peers,
            ends,
            progress,
        }
    }

    /// Bytes written and read by `Source` connections so far.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// How the finished connections ended.
    pub fn ends(&self) -> Vec<Option<std::io::ErrorKind>> {
        self.ends.lock().unwrap().clone()
    }

    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }

    /// Waits until `n` connections have been accepted.
    /// Waits until `n` connections have ended at the backend.
    pub async fn wait_for_ends(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ends().len() < n {
            assert!(
                Instant::now() < deadline,
                "backend saw {} of {n} connections end",
                self.ends().len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn wait_for_peers(&self, n: usize) -> Vec<SocketAddr> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let peers = self.peers();
            if peers.len() >= n {
                return peers;
            }
            assert!(
                Instant::now() < deadline,
                "backend saw {} of {n} connections",
                peers.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn serve(mut stream: TcpStream, kind: BackendKind) -> Option<std::io::ErrorKind> {
    match kind {
        BackendKind::Reset => {
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            return None;
        }
        BackendKind::ServerFirst => {
            if let Err(e) = stream.write_all(GREETING).await {
                return Some(e.kind());
            }
        }
        BackendKind::Echo => {}
        BackendKind::Source { .. } => unreachable!("served by source()"),
        BackendKind::Sink { slow_for } => return sink(stream, slow_for).await,
        BackendKind::Burst { bytes, delay } => {
            let mut first = [0u8; 1];
            if let Err(e) = stream.read_exact(&mut first).await {
                return Some(e.kind());
            }
            tokio::time::sleep(delay).await;
            let port = stream.peer_addr().map_or(0, |a| a.port());
            if let Err(e) = stream.write_all(&pattern_chunk(port.into(), bytes)).await {
                return Some(e.kind());
            }
            let _ = stream.shutdown().await;
            return None;
        }
    }
    let (mut r, mut w) = stream.split();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => break,
            Err(e) => return Some(e.kind()),
            Ok(n) => {
                if let Err(e) = w.write_all(&buf[..n]).await {
                    return Some(e.kind());
                }
            }
        }
    }
    let _ = w.shutdown().await;
    None
}

pub mod udp;

/// The PROXY headers tests send.
pub mod header {
    use std::net::SocketAddr;

    use mmproxy::proxy_protocol::{Transport, V2Builder, encode_v1};

    pub fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        let mut out = Vec::new();
        encode_v1(Some((src, dst)), &mut out).unwrap();
        out
    }

    pub fn v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        V2Builder::proxy(Transport::Stream, src, dst)
            .build()
            .unwrap()
    }

    pub fn v2_local() -> Vec<u8> {
        V2Builder::local().build().unwrap()
    }

    /// A v2 header for a UDP flow.
    pub fn v2_dgram(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        V2Builder::proxy(Transport::Datagram, src, dst)
            .build()
            .unwrap()
    }

    /// A v2 LOCAL header declaring DGRAM (a balancer's own UDP check).
    pub fn v2_local_dgram() -> Vec<u8> {
        let mut h = V2Builder::local().build().unwrap();
        // Byte 13: family (high nibble, UNSPEC) and transport (low, DGRAM).
        h[13] = 0x02;
        h
    }
}

/// Connects to the proxy and sends `header`.
pub async fn connect_with_header(proxy: SocketAddr, header: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.expect("connect to mmproxy");
    s.write_all(header).await.expect("send header");
    s
}

/// Sends `msg` and reads back exactly as many bytes, with a timeout.
pub async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.expect("write");
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .expect("echo timed out")
        .expect("read echo");
    buf
}

/// Waits until the server closes (EOF or reset) and says which.
pub async fn wait_closed(s: &mut TcpStream, timeout: Duration) -> Result<(), std::io::Error> {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(timeout, s.read(&mut buf)).await {
            Err(tokio::time::error::Elapsed { .. }) => {
                panic!("connection still open after {timeout:?}")
            }
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

pub fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A seeded pseudo-random stream, so corruption cannot hide in a pattern.
pub fn pattern_chunk(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

/// How an echo transfer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EchoEnd {
    /// A clean end of stream.
    Eof,
    /// The proxy reset the connection: a loud failure.
    Reset,
    /// Nothing arrived for 30 s, or the transfer crawled past its
    /// deadline (30 s plus 10 MB/s of its size).
    Stalled,
    /// Another error.
    Error(std::io::ErrorKind),
}

/// What came back from an echo transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EchoOutcome {
    pub sent: [u8; 32],
    pub received: u64,
    pub received_sha256: [u8; 32],
    pub end: EchoEnd,
    /// The error the sending half got, if any. A reset reaches whichever
    /// half touches the socket first: when the sender takes the error
    /// (ECONNRESET), the reader then sees a plain end of stream.
    pub send_error: Option<std::io::ErrorKind>,
    /// Where the echo first differed from what was sent, and where in the
    /// sent 1 MiB pattern the bytes found there come from (None: nowhere),
    /// which tells a gap or a repeat from garbage.
    pub first_mismatch: Option<(u64, Option<u64>)>,
}

impl EchoOutcome {
    /// Everything came back, unaltered, with a clean end of stream.
    pub fn is_complete(&self, total: u64) -> bool {
        self.end == EchoEnd::Eof && self.received == total && self.received_sha256 == self.sent
    }

    /// A clean end of stream with missing or altered bytes, and no error on
    /// either half of the socket: the failure a proxy must never produce.
    pub fn is_silent_failure(&self, total: u64) -> bool {
        self.end == EchoEnd::Eof && self.send_error.is_none() && !self.is_complete(total)
    }
}

/// Sends `total` bytes of a seeded stream through the proxy to an echo
/// backend while reading the echo, half-closes, and reports what came
/// back and how the connection ended.
pub async fn echo_verified(proxy: SocketAddr, client: SocketAddr, total: u64) -> EchoOutcome {
    echo_verified_with_pauses(proxy, client, total, None).await
}

/// As [`echo_verified`]; with `pauses`, the sender and the reader each
/// stop for the given time after every given number of bytes, so that a
/// backlogged proxy drains and switches paths again and again.
pub async fn echo_verified_with_pauses(
    proxy: SocketAddr,
    client: SocketAddr,
    total: u64,
    pauses: Option<(u64, Duration)>,
) -> EchoOutcome {
    use sha2::{Digest as _, Sha256};
    let pause_after = move |before: u64, after: u64| {
        pauses.and_then(|(every, pause)| (before / every != after / every).then_some(pause))
    };
    let s = connect_with_header(proxy, &header::v2(client, proxy)).await;
    let (mut reader, mut writer) = s.into_split();
    let chunk = pattern_chunk(client.port().into(), 1 << 20);
    let reference = chunk.clone();
    let mut first_mismatch = None;
    let mut expected = Sha256::new();
    let mut left = total;
    while left > 0 {
        let n = usize::try_from(left.min(chunk.len() as u64)).unwrap();
        expected.update(&chunk[..n]);
        left -= n as u64;
    }
    let sender = tokio::spawn(async move {
        let mut sent = 0u64;
        while sent < total {
            let n = usize::try_from((total - sent).min(chunk.len() as u64)).unwrap();
            if let Err(e) = writer.write_all(&chunk[..n]).await {
                return Some(e.kind());
            }
            if let Some(pause) = pause_after(sent, sent + n as u64) {
                tokio::time::sleep(pause).await;
            }
            sent += n as u64;
        }
        // Half-close: the echo must still come back in full.
        writer.shutdown().await.err().map(|e| e.kind())
    });
    let mut h = Sha256::new();
    let mut received = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    // A connection that trickles a few bytes per window probe never
    // trips the 30 s idle limit; seen in a CI soak (docs/ebpf-findings.md).
    let deadline = Instant::now() + Duration::from_secs(30 + total / 10_000_000);
    let end = loop {
        if Instant::now() > deadline {
            break EchoEnd::Stalled;
        }
        match tokio::time::timeout(Duration::from_secs(30), reader.read(&mut buf)).await {
            Err(_) => break EchoEnd::Stalled,
            Ok(Ok(0)) => break EchoEnd::Eof,
            Ok(Ok(n)) => {
                h.update(&buf[..n]);
                if first_mismatch.is_none() {
                    first_mismatch = find_mismatch(&reference, received, &buf[..n]);
                }
                if let Some(pause) = pause_after(received, received + n as u64) {
                    tokio::time::sleep(pause).await;
                }
                received += n as u64;
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => break EchoEnd::Reset,
            Ok(Err(e)) => break EchoEnd::Error(e.kind()),
        }
    };
    // A sender still blocked after the reader's end counts as no error.
    let send_error = match tokio::time::timeout(Duration::from_secs(2), sender).await {
        Ok(Ok(error)) => error,
        _ => None,
    };
    EchoOutcome {
        sent: expected.finalize().into(),
        received,
        received_sha256: h.finalize().into(),
        end,
        send_error,
        first_mismatch,
    }
}

/// Compares `got`, found at stream offset `at`, with the repeating
/// `pattern`; on a difference returns its offset and where the next
/// 64 bytes received occur in the pattern.
fn find_mismatch(pattern: &[u8], at: u64, got: &[u8]) -> Option<(u64, Option<u64>)> {
    let len = pattern.len() as u64;
    let i = got
        .iter()
        .enumerate()
        .position(|(i, b)| pattern[usize::try_from((at + i as u64) % len).unwrap()] != *b)?;
    let probe = &got[i..got.len().min(i + 64)];
    let source = pattern
        .windows(probe.len())
        .position(|w| w == probe)
        .map(|p| p as u64);
    Some((at + i as u64, source))
}

async fn source(
    mut stream: TcpStream,
    mib: u32,
    end: SourceEnd,
    progress: &Progress,
) -> Option<std::io::ErrorKind> {
    let port = stream.peer_addr().map_or(0, |a| a.port());
    let chunk = pattern_chunk(port.into(), 1 << 20);
    for _ in 0..mib {
        if let Err(e) = stream.write_all(&chunk).await {
            return Some(e.kind());
        }
        progress
            .written
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    match end {
        SourceEnd::Reset => {
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            None
        }
        SourceEnd::HalfClose => {
            if let Err(e) = stream.shutdown().await {
                return Some(e.kind());
            }
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => return None,
                    Ok(n) => {
                        progress.read.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) => return Some(e.kind()),
                }
            }
        }
    }
}

/// Bytes every sink backend has read, for tests that watch progress.
pub static SINK_READ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

async fn sink(mut stream: TcpStream, slow_for: Duration) -> Option<std::io::ErrorKind> {
    use sha2::{Digest as _, Sha256};
    let slow_until = Instant::now() + slow_for;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let slow = Instant::now() < slow_until;
        let want = if slow { 16 * 1024 } else { buf.len() };
        match stream.read(&mut buf[..want]).await {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                SINK_READ.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => return Some(e.kind()),
        }
        if slow {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let digest: [u8; 32] = h.finalize().into();
    if let Err(e) = stream.write_all(&digest).await {
        return Some(e.kind());
    }
    let _ = stream.shutdown().await;
    None
}
