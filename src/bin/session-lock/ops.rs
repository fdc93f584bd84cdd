//! Operator commands: `migrate` and `status`.
//!
//! Every failure is one line on stderr and a non-zero exit: an unreachable
//! database, a bad URL, missing migrations. Never a panic or a backtrace.

use std::path::PathBuf;

use clap::Args;
use session_lock::Migrator;

#[derive(Debug, Args)]
pub(crate) struct MigrateArgs {
    /// The database, as a URL or key=value string.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// A directory of your own *.up.sql / *.alwaysup.sql files, applied
    /// after the crate's (repeatable; sets app, app2, ...).
    #[arg(long)]
    dir: Vec<PathBuf>,
    /// Also apply the worked example (public.example_task).
    #[arg(long)]
    example: bool,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The database, as a URL or key=value string.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// The task table's `*_held` function (from the task template), whose
    /// open tasks per session are shown.
    #[arg(long, default_value = "public.example_task_held")]
    held: String,
}

pub(crate) fn migrate(args: MigrateArgs) -> Result<(), String> {
    let mut migrator = Migrator::new();
    if args.example {
        migrator = migrator.with_example();
    }
    for dir in &args.dir {
        migrator = migrator.with_dir(dir).map_err(|e| e.to_string())?;
    }
    runtime()?.block_on(async move {
        let mut client = connect(&args.database_url).await?;
        let report = migrator.run(&mut client).await.map_err(|e| e.to_string())?;
        for name in &report.applied {
            println!("applied    {name}");
        }
        for name in &report.reapplied {
            println!("reapplied  {name}");
        }
        for name in &report.skipped {
            println!("unchanged  {name}");
        }
        for name in &report.newer_kept {
            println!("kept       {name} (applied by a newer session-lock)");
        }
        println!(
            "migrations: {} applied, {} re-applied, {} already applied",
            report.applied.len(),
            report.reapplied.len(),
            report.skipped.len()
        );
        Ok(())
    })
}

pub(crate) fn status(args: StatusArgs) -> Result<(), String> {
    runtime()?.block_on(async move {
        let client = connect(&args.database_url).await?;
        let held = client
            .query(
                "SELECT session_id, tasks, live FROM session_lock.task_overview($1::text::regproc)",
                &[&args.held],
            )
            .await
            .map_err(|e| query_error(&e, &args.held))?;
        let mut held_by = std::collections::HashMap::new();
        let (mut open, mut unowned, mut orphaned) = (0i64, 0i64, 0i64);
        for row in &held {
            let session: Option<i64> = row.get(0);
            let tasks: i64 = row.get(1);
            let live: bool = row.get(2);
            open += tasks;
            match session {
                None => unowned += tasks,
                Some(_) if !live => orphaned += tasks,
                Some(id) => {
                    held_by.insert(id, tasks);
                }
            }
        }
        let sessions = client
            .query(
                "SELECT id, name, host, pid,
                        extract(epoch FROM age)::float8,
                        extract(epoch FROM expires_in)::float8,
                        held
                   FROM session_lock.live_session
                  ORDER BY name, id",
                &[],
            )
            .await
            .map_err(|e| query_error(&e, &args.held))?;

        println!("live sessions: {}", sessions.len());
        if !sessions.is_empty() {
            let mut table = vec![[
                "ID".to_owned(),
                "NAME".to_owned(),
                "HOST".to_owned(),
                "PID".to_owned(),
                "AGE".to_owned(),
                "EXPIRES IN".to_owned(),
                "TASKS HELD".to_owned(),
                "COUNTER".to_owned(),
            ]];
            let mut drifted = 0;
            for row in &sessions {
                let id: i64 = row.get(0);
                let held = held_by.get(&id).copied().unwrap_or(0);
                let counter = i64::from(row.get::<_, i32>(6));
                if counter != held {
                    drifted += 1;
                }
                table.push([
                    id.to_string(),
                    row.get::<_, String>(1),
                    row.get::<_, String>(2),
                    row.get::<_, i32>(3).to_string(),
                    human(row.get(4)),
                    human(row.get(5)),
                    held.to_string(),
                    counter.to_string(),
                ]);
            }
            print_table(&table);
            if drifted > 0 {
                println!(
                    "{drifted} session(s) hold a different number of tasks than their counter says (the counter is what the other sessions count them as holding): tasks changed outside session-lock, or a get_work in flight; each session corrects its counter on its next get_work"
                );
            }
        }
        println!(
            "tasks ({}): {open} open, {} assigned to live sessions, {unowned} unowned, {orphaned} orphaned (held by sessions that are no longer live, freed on the next tick of a live session of the same name)",
            args.held,
            open - unowned - orphaned,
        );
        Ok(())
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// One connection with the library's timeouts and the URL's sslmode, so an
/// unreachable database fails in seconds.
async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    session_lock::connect_one(url).await.map_err(|e| match e {
        session_lock::Error::InvalidArgument(msg) => msg,
        other => format!("cannot connect to the database: {other}"),
    })
}

fn query_error(e: &tokio_postgres::Error, held: &str) -> String {
    match e.as_db_error() {
        Some(db)
            if db.code().code() == "42883"
                && db
                    .message()
                    .contains(held.rsplit('.').next().unwrap_or(held)) =>
        {
            format!(
                "task function {held} does not exist: pass the *_held function of your task table with --held, or run `session-lock migrate --example` for the worked example"
            )
        }
        Some(db) if matches!(db.code().code(), "42883" | "42P01" | "3F000") => format!(
            "the session-lock migrations are not applied to this database ({}): run `session-lock migrate --database-url URL`",
            db.message()
        ),
        Some(db) => format!(
            "query failed: {} (SQLSTATE {})",
            db.message(),
            db.code().code()
        ),
        None => format!("query failed: {}", chain(e)),
    }
}

/// An error with its sources: "error connecting to server: Connection refused".
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

fn human(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{:.0}m{:02.0}s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{:.0}h{:02.0}m", (s / 3600.0).floor(), (s % 3600.0) / 60.0)
    }
}

fn print_table<const N: usize>(rows: &[[String; N]]) {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("  {}", line.join("  ").trim_end());
    }
}
