//! `cargo xtask test`: the project's one test command (README, CI).
//!
//! Builds the BPF object, then checks formatting, runs clippy with warnings
//! denied and runs every test, the privileged ones included. Tests that need
//! root skip loudly without it, and fail instead when `CI=true`.

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

pub(crate) fn test(opts: &Options) -> Result<()> {
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
    .context("tests failed")
}
