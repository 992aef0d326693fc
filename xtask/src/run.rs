//! `cargo xtask run -- <daemon flags>`: builds everything and runs the daemon.

use anyhow::{Context as _, Result, bail};

use crate::{
    build_ebpf::{self, build_ebpf},
    exec::{cargo, exec, is_root, workspace_root},
};

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Build the daemon in debug profile.
    #[arg(long)]
    debug: bool,
    /// Flags for the daemon, after `--` (see `mmproxy --help`).
    #[arg(last = true)]
    args: Vec<String>,
}

pub(crate) fn run(opts: &Options) -> Result<()> {
    build_ebpf(&build_ebpf::Options::default())?;
    let mut build = cargo(None);
    build.current_dir(workspace_root()).args([
        "build",
        "--locked",
        "--package",
        "mmproxy",
        "--bin",
        "mmproxy",
    ]);
    if !opts.debug {
        build.arg("--release");
    }
    exec(&mut build).context("building the daemon")?;

    let help_only = opts
        .args
        .iter()
        .any(|a| matches!(a.as_str(), "-h" | "--help" | "-V" | "--version"));
    if !help_only && !is_root() {
        bail!(
            "the daemon needs root, or CAP_NET_ADMIN (IP_TRANSPARENT, SO_MARK) and CAP_BPF \
             (ebpf mode); run `cargo xtask run` as root or grant the capabilities to \
             target/release/mmproxy with `setcap cap_net_admin,cap_bpf+ep`"
        );
    }
    let profile = if opts.debug { "debug" } else { "release" };
    let binary = workspace_root()
        .join("target")
        .join(profile)
        .join("mmproxy");
    exec(std::process::Command::new(binary).args(&opts.args))
}
