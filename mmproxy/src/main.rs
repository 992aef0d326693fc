//! The `mmproxy` binary: parses flags, sets up logging and limits, runs
//! the server until SIGTERM or SIGINT.

use std::process::ExitCode;

use anyhow::Context as _;
use mmproxy::{
    cli::{Cli, Command, LogFormat},
    config::Config,
    server,
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let (command, cli) = Cli::parse_or_exit(std::env::args_os());
    init_logging(cli.verbose, cli.log_format);
    let config = match Config::from_cli(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mmproxy: {}", mmproxy::error::error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let result = match command {
        Command::Check => check(&config),
        Command::Run => {
            raise_nofile_limit();
            run(config).map(|()| ExitCode::SUCCESS)
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("mmproxy: {e:#}");
        ExitCode::FAILURE
    })
}

/// `mmproxy check`: prints one line per check; 0 only if all pass.
fn check(config: &Config) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let lines = runtime.block_on(mmproxy::check::all(config));
    for line in &lines {
        println!("{line}");
    }
    Ok(if mmproxy::check::all_passed(&lines) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = server::Shutdown::default();
        // Registered before the listeners open, so a SIGTERM that arrives
        // right after start-up drains instead of killing the process.
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            // The first signal drains; a second one (an impatient
            // operator, or systemd's final SIGTERM) resets what is left.
            for stage in [&on_signal.drain, &on_signal.now] {
                tokio::select! {
                    _ = term.recv() => info!("SIGTERM received"),
                    _ = int.recv() => info!("SIGINT received"),
                }
                stage.cancel();
            }
        });
        server::run(config, shutdown).await?;
        info!("exiting");
        Ok(())
    })
}

/// `-v 0`: start-up, shutdown and problems of the daemon itself; `-v 1`:
/// also per-connection errors (debug); `-v 2`: every connection's state
/// changes (trace). `MMPROXY_LOG` (an `EnvFilter`) overrides.
fn init_logging(verbose: u8, format: LogFormat) {
    let level = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = std::env::var("MMPROXY_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(format!("warn,mmproxy={level}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Each connection takes two sockets and up to four pipe ends; the soft
/// limit of 1024 would cap us near 200 connections.
fn raise_nofile_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            warn!(error = %e, "cannot raise the open-files limit");
        }
    }
}
