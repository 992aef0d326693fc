//! `cargo xtask soak`: the in-kernel data path's correctness soak, deeper
//! than the 20 runs `cargo xtask test` does and strict: resets and stalls
//! fail it too, and the known-defect tests (`#[ignore]`d in CI) run.

use anyhow::{Context as _, Result};

use crate::{
    build_ebpf::{self, build_ebpf},
    exec::{cargo, exec, workspace_root},
};

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Full-duplex 1 GiB echo runs.
    #[arg(long, default_value_t = 100)]
    runs: u32,
}

pub(crate) fn soak(opts: &Options) -> Result<()> {
    build_ebpf(&build_ebpf::Options::default())?;
    exec(
        cargo(None)
            .current_dir(workspace_root())
            .args([
                "test",
                "--locked",
                "--release",
                "-p",
                "mmproxy",
                "--test",
                "soak",
                "--",
            ])
            .args(["--include-ignored", "--nocapture", "--test-threads", "1"])
            .env("MMPROXY_SOAK_RUNS", opts.runs.to_string())
            .env("MMPROXY_SOAK_STRICT", "1"),
    )
    .context("the soak found failures (see above)")
}
