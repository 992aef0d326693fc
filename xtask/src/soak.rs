//! `cargo xtask soak`: the in-kernel data path's correctness soak, deeper
//! than what `cargo xtask test` runs (20 x 1 GiB, 40 flip runs), and
//! fully strict: any reset, stall or wrong byte fails it (CI tolerates one
//! reset or stall per 20 x 1 GiB batch: mmproxy/tests/soak.rs).

use anyhow::{Context as _, Result};

use crate::{
    build_ebpf::{self, build_ebpf},
    drop_trace::DropTrace,
    exec::{cargo, exec, workspace_root},
};

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Full-duplex 1 GiB echo runs.
    #[arg(long, default_value_t = 100)]
    runs: u32,
    /// Full-duplex 64 MiB runs with a 16 KiB backlog limit (each flips
    /// between REDIRECT and PASS several times).
    #[arg(long, default_value_t = 200)]
    flip_runs: u32,
    /// Record every skb the kernel drops (with its reason) and every TCP
    /// retransmission during the soak, into target/soak-drops.trace, and
    /// print the count per reason. Traces the whole machine.
    #[arg(long)]
    trace_drops: bool,
}

pub(crate) fn soak(opts: &Options) -> Result<()> {
    build_ebpf(&build_ebpf::Options::default())?;
    // Built first, so the trace holds the soak and not the compiler.
    exec(
        cargo(None)
            .current_dir(workspace_root())
            .args(SOAK_TEST)
            .arg("--no-run"),
    )?;
    let trace = if opts.trace_drops {
        let out = workspace_root().join("target/soak-drops.trace");
        eprintln!("soak: recording kernel drops into {}", out.display());
        Some(DropTrace::start(&out)?)
    } else {
        None
    };
    let result = run_soak(opts);
    let Some(trace) = trace else {
        return result;
    };
    // The summary matters most when the soak failed, and the soak's own
    // verdict comes first: a trace that cannot be read back fails the task
    // only after it.
    let summary = trace.finish();
    match (&summary, &result) {
        (Ok(summary), _) => eprintln!("soak: skbs dropped, by reason:\n{summary}"),
        // Otherwise lost behind the soak's error.
        (Err(e), Err(_)) => eprintln!("soak: the drop trace failed too: {e:#}"),
        (Err(_), Ok(())) => {}
    }
    result?;
    summary.map(drop)
}

/// `cargo test` for the soak's test binary, in release: it moves
/// gigabytes.
const SOAK_TEST: [&str; 7] = [
    "test",
    "--locked",
    "--release",
    "-p",
    "mmproxy",
    "--test",
    "soak",
];

fn run_soak(opts: &Options) -> Result<()> {
    exec(
        cargo(None)
            .current_dir(workspace_root())
            .args(SOAK_TEST)
            .arg("--")
            .args(["--include-ignored", "--nocapture", "--test-threads", "1"])
            .env("MMPROXY_SOAK_RUNS", opts.runs.to_string())
            .env("MMPROXY_SOAK_FLIP_RUNS", opts.flip_runs.to_string())
            .env("MMPROXY_SOAK_LOUD_ALLOWED", "0"),
    )
    .context("the soak found failures (see above)")
}
