//! Operator commands: `migrate`, `status` and `retry`.
//!
//! Every failure is one line on stderr and a non-zero exit: an unreachable
//! database, a bad URL, missing migrations. Never a panic or a backtrace.

use std::path::PathBuf;

use clap::Args;
use session_lock::{Error, ErrorChain, Migrator};

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
    /// Show only the task table whose `*_held` function this is (e.g.
    /// `session_lock.example_task_held`). By default every table declared with
    /// `session_lock.declare_task_table` (its task table declaration) is
    /// shown.
    #[arg(long)]
    held: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct RetryArgs {
    /// The database, as a URL or key=value string.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// The declared task table (e.g. `public.example_task`).
    #[arg(long)]
    table: String,
    /// A quarantined task to release (repeatable).
    #[arg(long = "id", required_unless_present = "all")]
    ids: Vec<i64>,
    /// Release every quarantined task of the table.
    #[arg(long, conflicts_with = "ids")]
    all: bool,
}

/// How many quarantined tasks `status` lists per table.
const QUARANTINED_SHOWN: i64 = 10;
/// How many groups `status` lists per grouped table.
const GROUPS_SHOWN: i32 = 10;

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

/// Every declared task table whose table still exists, by its generated
/// functions' prefix: its name, and its open tasks per holding
/// session through `session_lock.task_overview` (a table without open tasks
/// gives one row of NULLs). The `*_held` function's name is built and
/// quoted here, in SQL.
const DECLARED_OVERVIEW: &str = "
SELECT pg_catalog.format('%I.%I', n.nspname, c.relname), o.session_id, o.tasks, o.live
  FROM session_lock.task_table t
  JOIN pg_catalog.pg_class c ON c.oid = t.task_table
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN LATERAL session_lock.task_overview(
           pg_catalog.format('session_lock.%I', t.fn_prefix || '_held')::regproc) o ON true
 ORDER BY t.fn_prefix, o.session_id";

/// The same for the one table whose `*_held` function is `$1`: named by
/// its declaration when it has one, else by the function.
const HELD_OVERVIEW: &str = "
SELECT coalesce(
           (SELECT pg_catalog.format('%I.%I', n.nspname, c.relname)
              FROM session_lock.task_table t
              JOIN pg_catalog.pg_class c ON c.oid = t.task_table
              JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE pg_catalog.to_regproc(
                       pg_catalog.format('session_lock.%I', t.fn_prefix || '_held')) = h.held),
           h.held::text),
       o.session_id, o.tasks, o.live
  FROM (SELECT $1::text::regproc AS held) h
  LEFT JOIN LATERAL session_lock.task_overview(h.held) o ON true
 ORDER BY o.session_id";

/// One task table's open tasks.
#[derive(Debug, Default)]
struct TableCounts {
    name: String,
    open: i64,
    /// Held by live sessions.
    held: i64,
    /// Held by no session.
    free: i64,
    /// Held by sessions that are not live.
    orphaned: i64,
}

pub(crate) fn status(args: StatusArgs) -> Result<(), String> {
    runtime()?.block_on(async move {
        let client = connect(&args.database_url).await?;
        let held_fn = args.held.as_deref();
        let rows = match held_fn {
            Some(held) => client.query(HELD_OVERVIEW, &[&held]).await,
            None => client.query(DECLARED_OVERVIEW, &[]).await,
        }
        .map_err(|e| query_error(&e, held_fn))?;
        // Per table, in the query's order; per live session, its open tasks
        // over every table shown.
        let mut tables: Vec<TableCounts> = Vec::new();
        let mut held_by = std::collections::HashMap::new();
        for row in &rows {
            let name: String = row.get(0);
            if tables.last().is_none_or(|t| t.name != name) {
                tables.push(TableCounts {
                    name,
                    ..TableCounts::default()
                });
            }
            let Some(table) = tables.last_mut() else {
                continue;
            };
            let session: Option<i64> = row.get(1);
            let Some(tasks) = row.get::<_, Option<i64>>(2) else {
                continue; // no open tasks
            };
            let live = row.get::<_, Option<bool>>(3).unwrap_or(false);
            table.open += tasks;
            match session {
                None => table.free += tasks,
                Some(_) if !live => table.orphaned += tasks,
                Some(id) => {
                    table.held += tasks;
                    *held_by.entry(id).or_insert(0i64) += tasks;
                }
            }
        }
        let sessions = client
            .query(
                "SELECT id, name, host, pid,
                        extract(epoch FROM age)::float8,
                        extract(epoch FROM expires_in)::float8,
                        capacity,
                        held
                   FROM session_lock.live_session
                  ORDER BY name, id",
                &[],
            )
            .await
            .map_err(|e| query_error(&e, held_fn))?;

        println!("live sessions: {}", sessions.len());
        if !sessions.is_empty() {
            let mut table = vec![[
                "ID".to_owned(),
                "NAME".to_owned(),
                "HOST".to_owned(),
                "PID".to_owned(),
                "AGE".to_owned(),
                "EXPIRES IN".to_owned(),
                "CAPACITY".to_owned(),
                "TASKS HELD".to_owned(),
                "COUNTER".to_owned(),
            ]];
            let mut drifted = 0;
            for row in &sessions {
                let id: i64 = row.get(0);
                let held = held_by.get(&id).copied().unwrap_or(0);
                let counter = i64::from(row.get::<_, i32>(7));
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
                    row.get::<_, i32>(6).to_string(),
                    held.to_string(),
                    counter.to_string(),
                ]);
            }
            print_table(&table);
            if drifted > 0 {
                let scope = if held_fn.is_some() {
                    " (only the tasks of the table shown are counted)"
                } else {
                    ""
                };
                println!(
                    "{drifted} session(s) hold a different number of tasks than their counter says (the counter is what the other sessions count them as holding){scope}: tasks changed outside session-lock, or a get_work in flight; each session corrects its counter on its next get_work"
                );
            }
        }
        if tables.is_empty() {
            println!(
                "task tables: none declared (declare one with session_lock.declare_task_table, or run `session-lock migrate --example` for the worked example)"
            );
        }
        for t in &tables {
            println!(
                "tasks ({}): {} open, {} assigned to live sessions, {} unowned, {} orphaned{}",
                t.name,
                t.open,
                t.held,
                t.free,
                t.orphaned,
                if t.orphaned > 0 {
                    " (held by sessions that are not live: freed by the next sweep of a live session of the table, within a tick)"
                } else {
                    ""
                },
            );
            if held_fn.is_none() {
                print_groups(&client, &t.name).await?;
                print_quarantined(&client, &t.name).await?;
            }
        }
        Ok(())
    })
}

/// A grouped table's groups with the most open tasks, and how many of
/// those are held: nothing for an ungrouped table.
async fn print_groups(client: &tokio_postgres::Client, table: &str) -> Result<(), String> {
    let rows = client
        .query(
            "SELECT task_group, open, held FROM session_lock.task_groups($1::text::regclass, $2)",
            &[&table, &GROUPS_SHOWN],
        )
        .await
        .map_err(|e| query_error(&e, None))?;
    if rows.is_empty() {
        return Ok(());
    }
    println!("  groups ({table}), most open tasks first:");
    let mut shown = vec![["GROUP".to_owned(), "OPEN".to_owned(), "HELD".to_owned()]];
    for row in &rows {
        shown.push([
            row.get::<_, Option<String>>(0)
                .unwrap_or_else(|| "(none)".to_owned()),
            row.get::<_, i64>(1).to_string(),
            row.get::<_, i64>(2).to_string(),
        ]);
    }
    print_table(&shown);
    Ok(())
}

/// The table's quarantined tasks: how many, and the first few with their
/// attempts and last holder.
async fn print_quarantined(client: &tokio_postgres::Client, table: &str) -> Result<(), String> {
    let rows = client
        .query(
            "SELECT task_id, attempts, last_session
               FROM session_lock.quarantined_tasks($1::text::regclass, 1000000)",
            &[&table],
        )
        .await
        .map_err(|e| query_error(&e, None))?;
    if rows.is_empty() {
        return Ok(());
    }
    println!(
        "  quarantined ({}): {} task(s) picked up max_attempts times without finishing; release with `session-lock retry --table {table} --id ID` or `--all`",
        table,
        rows.len()
    );
    let mut shown = vec![[
        "TASK".to_owned(),
        "ATTEMPTS".to_owned(),
        "LAST SESSION".to_owned(),
    ]];
    for row in rows.iter().take(QUARANTINED_SHOWN as usize) {
        shown.push([
            row.get::<_, i64>(0).to_string(),
            row.get::<_, i32>(1).to_string(),
            row.get::<_, Option<i64>>(2)
                .map_or_else(|| "-".to_owned(), |s| s.to_string()),
        ]);
    }
    print_table(&shown);
    if rows.len() > QUARANTINED_SHOWN as usize {
        println!("  ... and {} more", rows.len() - QUARANTINED_SHOWN as usize);
    }
    Ok(())
}

pub(crate) fn retry(args: RetryArgs) -> Result<(), String> {
    runtime()?.block_on(async move {
        let client = connect(&args.database_url).await?;
        let ids: Option<Vec<i64>> = (!args.all).then_some(args.ids.clone());
        let rows = client
            .query(
                "SELECT * FROM session_lock.retry_tasks($1::text::regclass, $2)",
                &[&args.table, &ids],
            )
            .await
            .map_err(|e| match e.as_db_error() {
                Some(db) if db.code().code() == "42P01" => format!(
                    "table {} does not exist: pass a declared task table, e.g. public.example_task",
                    args.table
                ),
                _ => query_error(&e, None),
            })?;
        let released: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        println!(
            "released {} quarantined task(s) of {} for pickup again: {:?}",
            released.len(),
            args.table,
            released
        );
        let missed: Vec<i64> = args
            .ids
            .iter()
            .copied()
            .filter(|id| !released.contains(id))
            .collect();
        if !missed.is_empty() {
            return Err(format!(
                "tasks {missed:?} of {} are not quarantined (not open, held by a session, or below max_attempts): nothing done for them",
                args.table
            ));
        }
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
        // These say what is wrong with the URL, or that the connect failed.
        Error::BadUrl(_) | Error::Tls { .. } | Error::Connect(_) => ErrorChain(&e).to_string(),
        other => format!("cannot connect to the database: {}", ErrorChain(&other)),
    })
}

fn query_error(e: &tokio_postgres::Error, held: Option<&str>) -> String {
    match (e.as_db_error(), held) {
        (Some(db), Some(held))
            if db.code().code() == "42883"
                && db
                    .message()
                    .contains(held.rsplit('.').next().unwrap_or(held)) =>
        {
            format!(
                "task function {held} does not exist: pass the *_held function of a declared task table with --held, or leave --held out to show every declared table"
            )
        }
        (Some(db), _) if db.code().code() == "42883" && db.message().contains("_held") => format!(
            "a declared task table has no *_held function ({}): run `session-lock migrate --database-url URL` to generate its functions again",
            db.message()
        ),
        (Some(db), _) if matches!(db.code().code(), "42883" | "42P01" | "42703" | "3F000") => {
            format!(
                "the session-lock migrations of this release are not applied to this database ({}): run `session-lock migrate --database-url URL`",
                db.message()
            )
        }
        (Some(db), _) => format!(
            "query failed: {} (SQLSTATE {})",
            db.message(),
            db.code().code()
        ),
        (None, _) => format!("query failed: {}", ErrorChain(e)),
    }
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
