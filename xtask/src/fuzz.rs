//! `cargo xtask fuzz`: runs the PROXY protocol parser fuzzer for a bounded time.
//!
//! The fuzz crate is its own workspace (`fuzz/`) because cargo-fuzz needs
//! nightly and sanitizer flags the daemon must not inherit. `cargo-fuzz` is
//! installed into the same cache as bpf-linker when missing.

use std::process::Command;

use anyhow::{Context as _, Result};

use crate::{
    build_ebpf::{self, NIGHTLY, build_ebpf},
    exec::{cargo, exec, output, workspace_root},
};

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// How long to fuzz, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

pub(crate) fn fuzz(opts: &Options) -> Result<()> {
    // The fuzz target links the daemon's library, which embeds the object.
    build_ebpf(&build_ebpf::Options::default())?;
    if output(Command::new("cargo").args(["fuzz", "--version"])).is_err() {
        eprintln!("xtask: installing cargo-fuzz");
        exec(cargo(None).args(["install", "cargo-fuzz", "--locked"]))
            .context("could not install cargo-fuzz from crates.io")?;
    }
    let root = workspace_root();
    let seeds = root.join("fuzz").join("seeds").join("parse");
    let corpus = root.join("fuzz").join("corpus").join("parse");
    std::fs::create_dir_all(&corpus)?;
    exec(
        cargo(Some(NIGHTLY))
            .current_dir(root.join("fuzz"))
            .args(["fuzz", "run", "parse"])
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={}", opts.seconds))
            .arg("-print_final_stats=1"),
    )
    .context("the fuzzer found a crash (see fuzz/artifacts/parse/)")
}
