//! `cargo xtask test`: the project's one test command (README, CI).
//!
//! Builds the BPF object, then checks formatting, runs clippy with warnings
//! denied and runs every test, the privileged ones included, then builds
//! the Debian package and tries it in a throwaway root, then a short
//! benchmark smoke. Tests that need root skip loudly without it, and fail
//! instead when `CI=true`.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result};

use crate::{
    build_ebpf::{self, build_ebpf},
    exec::{cargo, exec, is_root, workspace_root},
};

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Extra arguments passed to `cargo test` after `--` (e.g. a test name filter).
    #[arg(last = true)]
    args: Vec<String>,
}

/// What the integration tests run besides the daemon, and the Debian
/// package that provides each.
const TEST_TOOLS: &[(&str, &str)] = &[
    ("/usr/sbin/haproxy", "haproxy"),
    ("/usr/sbin/nginx", "nginx"),
    (
        "/usr/lib/nginx/modules/ngx_stream_module.so",
        "libnginx-mod-stream",
    ),
    ("/usr/bin/ss", "iproute2"),
    ("/usr/bin/prlimit", "util-linux"),
    ("/usr/sbin/sysctl", "procps"),
    // The UDP kernel path's veth tests turn checksum offload off, so a
    // wrong checksum is dropped by the receiver instead of excused.
    ("/usr/sbin/ethtool", "ethtool"),
    // The TPROXY recipe's test (examples/tproxy.md).
    ("/usr/sbin/nft", "nftables"),
    // The peer the benchmark smoke runs beside mmproxy.
    ("/usr/bin/go-mmproxy", "go-mmproxy"),
    // The Debian package and its install check (xtask/src/deb.rs).
    ("/usr/bin/dpkg-shlibdeps", "dpkg-dev"),
    ("/usr/bin/systemd-analyze", "systemd"),
    ("/usr/bin/systemd-nspawn", "systemd-container"),
    ("/usr/bin/python3", "python3"),
    ("/usr/bin/curl", "curl"),
];

pub(crate) fn test(opts: &Options) -> Result<()> {
    ensure_test_tools()?;
    build_ebpf(&build_ebpf::Options::default())?;
    let root = workspace_root();

    exec(
        cargo(None)
            .current_dir(&root)
            .args(["fmt", "--all", "--check"]),
    )
    .context("formatting differs; run `cargo fmt --all`")?;
    exec(
        cargo(Some(build_ebpf::NIGHTLY))
            .current_dir(root.join("mmproxy-ebpf"))
            .args(["fmt", "--check"]),
    )
    .context("BPF crate formatting differs; run `cargo +nightly fmt` in mmproxy-ebpf/")?;
    exec(cargo(None).current_dir(&root).args([
        "clippy",
        "--locked",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy found problems")?;

    if !is_root() {
        eprintln!(
            "\n*** xtask: not running as root: privileged tests (network namespaces, \
             IP_TRANSPARENT, BPF) will SKIP, and fail under CI=true ***\n"
        );
    }
    // Release builds: the soak and bulk-transfer tests move gigabytes.
    exec(
        cargo(None)
            .current_dir(&root)
            .args(["test", "--locked", "--workspace", "--release", "--"])
            .args(&opts.args),
    )
    .context("tests failed")?;
    if opts.args.is_empty() {
        package_check()?;
        bench_smoke()?;
    }
    Ok(())
}

/// `cargo xtask deb --check`: the package builds, installs into a
/// throwaway root, runs `mmproxy check` there, removes and purges.
fn package_check() -> Result<()> {
    if !is_root() {
        eprintln!("\n*** xtask: not root: the Debian package check SKIPPED ***\n");
        anyhow::ensure!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: the package check must run, not skip"
        );
        return Ok(());
    }
    let package = crate::deb::build()?;
    crate::deb::check(&package)
}

/// `cargo xtask bench --quick` into target/, so that the harness cannot
/// rot; its numbers are not kept.
fn bench_smoke() -> Result<()> {
    if !is_root() {
        eprintln!(
            "\n*** xtask: not root: the benchmark smoke (cargo xtask bench --quick) SKIPPED ***\n"
        );
        anyhow::ensure!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: the benchmark smoke must run, not skip"
        );
        return Ok(());
    }
    crate::bench::bench(&crate::bench::Options::smoke(
        "target/bench-smoke/benchmarks.md",
    ))
    .context("the benchmark smoke failed")
}

/// Installs the Debian packages of missing test tools (root only; without
/// root the tests that need them skip anyway).
fn ensure_test_tools() -> Result<()> {
    let missing: Vec<&str> = TEST_TOOLS
        .iter()
        .filter(|(path, _)| !Path::new(path).exists())
        .map(|&(_, package)| package)
        .collect();
    if missing.is_empty() || !is_root() {
        return Ok(());
    }
    eprintln!("xtask: installing test tools: {}", missing.join(" "));
    exec(Command::new("apt-get").args(["update", "-qq"])).context("apt-get update failed")?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("could not install {}", missing.join(" ")))
}
