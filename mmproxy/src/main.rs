//! The `mmproxy` binary: parses flags, sets up logging and limits, runs
//! the server until SIGTERM or SIGINT.

use std::process::ExitCode;

use anyhow::Context as _;
use mmproxy::{
    activation::{Inherited, Origin},
    cli::{Cli, Command, LogFormat},
    config::Config,
    server::{self, Startup},
    upgrade::{Launch, Predecessor},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let (command, cli) = Cli::parse_or_exit(std::env::args_os());
    if let Command::Generate(what) = command {
        return match mmproxy::cli::generate(what, &mut std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mmproxy: {e}");
                ExitCode::FAILURE
            }
        };
    }
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
            let startup = match take_startup() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("mmproxy: {e:#}");
                    return ExitCode::from(2);
                }
            };
            raise_nofile_limit();
            run(config, startup).map(|()| ExitCode::SUCCESS)
        }
        Command::Generate(_) => unreachable!("handled above"),
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

/// What this process was handed: a predecessor's sockets (SIGUSR2
/// upgrade) or systemd's. Runs before the runtime starts any thread,
/// because it removes the variables it read from the environment.
fn take_startup() -> anyhow::Result<Startup> {
    // SAFETY: single-threaded still; the runtime starts after this.
    let handover =
        unsafe { Predecessor::from_env() }.context("cannot take over from the old instance")?;
    let (inherited, predecessor) = match handover {
        Some((predecessor, fds)) => (
            Inherited::from_fds(fds, Origin::Predecessor)?,
            Some(predecessor),
        ),
        // SAFETY: as above.
        None => (unsafe { Inherited::from_systemd() }?, None),
    };
    let launch = match Launch::of_this_process() {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(error = %e, "cannot find this binary's path; SIGUSR2 upgrades are off");
            None
        }
    };
    Ok(Startup {
        inherited,
        predecessor,
        launch,
    })
}

fn run(config: Config, startup: Startup) -> anyhow::Result<()> {
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
                mmproxy::activation::notify(&[sd_notify::NotifyState::Stopping]);
                stage.cancel();
            }
        });
        server::run(config, startup, shutdown).await?;
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
