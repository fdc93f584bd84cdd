//! `session-lock`: a runner over the worked example, the demo and the
//! operator commands.

mod demo;
mod ops;
mod run;

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
    #[command(alias = "worker")]
    Run(run::RunArgs),
    /// Watch tasks spread over runner processes, one killed, nothing lost
    /// (starts a throwaway PostgreSQL unless DATABASE_URL is set).
    Demo(demo::DemoArgs),
    /// Apply the session-lock migrations, and a directory of your own.
    Migrate(ops::MigrateArgs),
    /// Show the live sessions and the open tasks of every declared task table.
    Status(ops::StatusArgs),
    /// Release quarantined tasks for pickup again.
    Retry(ops::RetryArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Operator commands print their own report; long-running ones narrate.
    init_logging(match cli.command {
        Command::Migrate(_) | Command::Status(_) | Command::Retry(_) => "warn",
        _ => "info",
    });
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Migrate(args) => ops::migrate(args),
        Command::Status(args) => ops::status(args),
        Command::Retry(args) => ops::retry(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("session-lock: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr; `SESSION_LOCK_LOG` sets the filter (default: `default`),
/// e.g. `session_lock=debug,warn`. Spans (a runner's ticks, its calls) are
/// logged as each line's context only when `SESSION_LOCK_LOG` is set:
/// formatting a tick's span fields took a tenth of a draining runner's CPU,
/// for lines that name their runner and session anyway.
fn init_logging(default: &str) {
    use tracing_subscriber::prelude::*;
    let asked = std::env::var("SESSION_LOCK_LOG").ok();
    let spans = asked.is_some();
    let filter: tracing_subscriber::filter::Targets = asked
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| default.parse().unwrap_or_default());
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false)
                .with_filter(tracing_subscriber::filter::filter_fn(move |m| {
                    spans || !m.is_span()
                })),
        )
        .with(filter)
        .init();
}
