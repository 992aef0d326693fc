//! `cargo xtask <task>`: the workspace's entry points.
//!
//! One module per task, each with its own `Options`. Every external command
//! goes through [`exec`], so a failure names the command that failed.

mod bench;
mod build_ebpf;
mod cycles;
mod deb;
mod drop_trace;
mod exec;
mod fuzz;
mod run;
mod soak;
mod test;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "mmproxy workspace tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Build the BPF object (installs rust-src and bpf-linker when missing).
    BuildEbpf(build_ebpf::Options),
    /// Build everything and run the daemon with the given flags.
    Run(run::Options),
    /// Format check, clippy with warnings denied, and every test.
    Test(test::Options),
    /// Fail on an import loop among the modules of any crate: at every
    /// module, between its own items and its children.
    Cycles,
    /// Run the PROXY protocol parser fuzzer for a bounded time.
    Fuzz(fuzz::Options),
    /// The ebpf data path's soak, deeper than `test`, known defects included.
    Soak(soak::Options),
    /// Build the Debian package (target/deb/); `--check` also installs it
    /// into a throwaway root and tries it (root).
    Deb(deb::Options),
    /// Every subject (direct, plain, ebpf, go-mmproxy) under the same
    /// workloads; writes docs/benchmarks.md and its chart. Needs root.
    Bench(bench::Options),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::BuildEbpf(opts) => build_ebpf::build_ebpf(&opts).map(|_| ()),
        Task::Run(opts) => run::run(&opts),
        Task::Test(opts) => test::test(&opts),
        Task::Cycles => cycles::cycles(),
        Task::Fuzz(opts) => fuzz::fuzz(&opts),
        Task::Soak(opts) => soak::soak(&opts),
        Task::Bench(opts) => bench::bench(&opts),
        Task::Deb(opts) => deb::deb(&opts),
    };
    if let Err(err) = result {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}
