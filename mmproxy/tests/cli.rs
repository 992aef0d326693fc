//! The command line as an operator meets it: exit codes, one-line errors,
//! go-mmproxy's single-dash spelling, `--help`. No privileges needed.

mod support;

use std::{
    process::{Command, Output, Stdio},
    time::Duration,
};

use support::{Daemon, daemon_binary};

fn run(args: &[&str]) -> Output {
    Command::new(daemon_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run mmproxy")
}

/// Asserts exit status 2 and exactly one stderr line containing `needle`.
fn assert_one_line_error(args: &[&str], needle: &str) {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{args:?}: one line expected, got:\n{stderr}"
    );
    assert!(
        stderr.contains(needle),
        "{args:?}: {stderr:?} lacks {needle:?}"
    );
    assert!(stderr.starts_with("mmproxy: "), "{stderr}");
}

#[test]
fn bad_values_exit_2_with_one_line() {
    assert_one_line_error(&["--mark", "abc"], "--mark");
    assert_one_line_error(&["-mark", "-1"], "-1");
    assert_one_line_error(&["-4", "[::1]:443"], "-4 needs an IPv4 address");
    assert_one_line_error(&["-6", "127.0.0.1:443"], "-6 needs an IPv6 address");
    assert_one_line_error(&["-l", "nonsense"], "nonsense");
    assert_one_line_error(&["-p", "sctp"], "'sctp' is not tcp or udp");
    assert_one_line_error(&["-v", "3"], "3");
    assert_one_line_error(&["--listeners", "0"], "0");
    assert_one_line_error(&["--mode", "fast"], "fast");
    assert_one_line_error(&["--ebpf-max-backlog-kib", "8"], "8");
    assert_one_line_error(&["--ebpf-max-backlog-kib", "2000000"], "2000000");
    assert_one_line_error(&["--ebpf-arm-after-ms", "60001"], "60001");
    assert_one_line_error(&["--ebpf-arm-after-ms", "-1"], "-1");
    assert_one_line_error(&["--ebpf-arm-after-ms", "1s"], "1s");
    assert_one_line_error(&["--ebpf-bulk-mbit", "1000001"], "1000001");
    assert_one_line_error(&["--ebpf-bulk-mbit", "-1"], "-1");
    assert_one_line_error(&["--ebpf-bulk-mbit", "fast"], "fast");
    assert_one_line_error(
        &["--upstream-window-clamp-kib", "3"],
        "use 0 (no clamp) or 4",
    );
    assert_one_line_error(&["--upstream-window-clamp-kib", "1048577"], "1048577");
    assert_one_line_error(
        &["--upstream-window-clamp-kib", "big"],
        "not a number of KiB",
    );
    assert_one_line_error(&["--source-port", "random"], "random");
    assert_one_line_error(&["--header-timeout", "0"], "0");
    assert_one_line_error(&["--no-such-flag"], "--no-such-flag");
    assert_one_line_error(&["--udp-header", "sometimes"], "sometimes");
    assert_one_line_error(&["--max-udp-sessions", "0"], "0");
    assert_one_line_error(&["--close-after", "0"], "0");
    assert_one_line_error(&["--route-table", "0"], "0");
    assert_one_line_error(&["--metrics-addr", "nowhere"], "nowhere");
    assert_one_line_error(&["--log-format", "xml"], "xml");
    assert_one_line_error(&["-log-format", "xml"], "xml");
    assert_one_line_error(&["--allow-source", "10.0.0.0/33"], "not a CIDR subnet");
    assert_one_line_error(&["--deny-source", "everyone"], "not a CIDR subnet");
    assert_one_line_error(&["--allow-local", "maybe"], "maybe");
    assert_one_line_error(&["--max-pending-headers", "0"], "0");
    assert_one_line_error(&["--max-conns-per-source", "-1"], "-1");
    assert_one_line_error(&["--idle-timeout", "soon"], "soon");
    assert_one_line_error(&["--max-udp-sessions-per-client", "many"], "many");
    assert_one_line_error(
        &[
            "--dynamic-destination",
            "--allowed-destinations",
            "10.0.0.0/8:90-80",
        ],
        "runs backwards",
    );
}

#[test]
fn dynamic_destination_without_allowed_destinations_is_refused() {
    assert_one_line_error(
        &["--dynamic-destination"],
        "--dynamic-destination needs --allowed-destinations",
    );
    assert_one_line_error(
        &["-dynamic-destination", "-l", "127.0.0.1:0"],
        "any client could make the proxy connect anywhere",
    );
    assert_one_line_error(
        &["--allowed-destinations", "10.0.0.0/8"],
        "only with --dynamic-destination",
    );
}

#[test]
fn metrics_address_in_use_stops_startup_naming_the_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(&["-l", "127.0.0.1:0", "--metrics-addr", &addr, "-q"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("--metrics-addr {addr}: cannot listen")),
        "{stderr}"
    );
}

#[test]
fn bad_allowed_subnets_files_stop_startup() {
    let dir = std::env::temp_dir().join(format!("mmproxy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.txt");
    std::fs::write(&bad, "10.0.0.0/8\n# fine\nnot-a-subnet\n").unwrap();
    assert_one_line_error(
        &["--allowed-subnets", bad.to_str().unwrap()],
        "bad.txt:3: 'not-a-subnet' is not a subnet",
    );
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "# nobody\n\n").unwrap();
    assert_one_line_error(
        &["-allowed-subnets", empty.to_str().unwrap()],
        "lists no subnets",
    );
    assert_one_line_error(
        &["--allowed-subnets", "/nonexistent/subnets"],
        "cannot read",
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn help_documents_every_flag() {
    let out = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--target4",
        "--target6",
        "--protocol",
        "--verbose",
        "--allowed-subnets",
        "--mark",
        "--listeners",
        "--close-after",
        "--dynamic-destination",
        "--allowed-destinations",
        "--allow-source",
        "--deny-source",
        "--allow-local",
        "--max-pending-headers",
        "--max-conns-per-source",
        "--idle-timeout",
        "--max-udp-sessions-per-client",
        "--listen-transparent",
        "--mode",
        "--header-timeout",
        "--connect-timeout",
        "--max-connections",
        "--source-port",
        "--drain-timeout",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    // go-mmproxy's spelling of help works too.
    assert_eq!(run(&["-help"]).status.code(), Some(0));
}

#[test]
fn go_mmproxy_single_dash_flags_start_the_daemon() {
    let mut cmd = Command::new(daemon_binary());
    cmd.env("MMPROXY_TEST", "1");
    let mut d = Daemon::start_with(
        cmd,
        &[
            "-l",
            "127.0.0.1:0",
            "-4",
            "127.0.0.1:1",
            "-6",
            "[::1]:1",
            "-mark",
            "0",
            "-listeners",
            "2",
            "-close-after",
            "30",
            "-v",
            "1",
            "--mode",
            "plain",
        ],
    );
    let line = d.wait_for_log("listening", Duration::from_secs(5));
    assert!(line.contains("listeners=2"), "{line}");
    d.signal(rustix::process::Signal::TERM);
    assert_eq!(d.wait_exit(Duration::from_secs(5)), Some(0));
}

#[test]
fn check_subcommand_takes_the_daemon_flags_and_refuses_bad_ones() {
    let out = std::process::Command::new(support::daemon_binary())
        .args(["check", "--route-table", "0"])
        .output()
        .expect("run mmproxy check");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--route-table"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
