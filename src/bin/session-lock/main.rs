//! `session-lock`: the example worker, the demo and the operator commands.

mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Share tasks stored in PostgreSQL across every instance of a service.
#[derive(Debug, Parser)]
#[command(name = "session-lock", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one runner over the worked example's table (public.example_task).
    Worker(worker::WorkerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Worker(args) => worker::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("session-lock: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr; `SESSION_LOCK_LOG` sets the filter (default `info`),
/// e.g. `session_lock=debug,warn`.
fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter: tracing_subscriber::filter::Targets = std::env::var("SESSION_LOCK_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| "info".parse().expect("a valid default filter"));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false),
        )
        .with(filter)
        .init();
}
