//! Shared by the benchmarks: a durable throwaway PostgreSQL, the migrated
//! `bench` database, seeding, percentiles, tables and machine facts.
//!
//! Each bench binary includes this module (`mod common;`); not every binary
//! uses every item.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use session_lock::Migrator;
use session_lock_testkit::embedded::{EmbeddedOptions, EmbeddedPostgres};
use tokio_postgres::{Client, NoTls};

/// The database every benchmark uses.
pub const DB: &str = "bench";

/// Starts a durable server (fsync, synchronous_commit and full_page_writes
/// on: PostgreSQL's defaults) with room for many runners, and
/// pg_stat_statements loaded (tracking turned off by [`create_bench_db`]
/// until a benchmark turns it on: set with ALTER SYSTEM, as a command-line
/// setting could not be changed at run time).
pub fn start_server() -> EmbeddedPostgres {
    let mut extra = vec![
        // Shared memory for 1M-row tables without evictions.
        ("shared_buffers".to_owned(), "256MB".to_owned()),
        ("log_min_messages".to_owned(), "warning".to_owned()),
    ];
    if pg_stat_statements_installed() {
        extra.push((
            "shared_preload_libraries".to_owned(),
            "pg_stat_statements".to_owned(),
        ));
    }
    // SESSION_LOCK_BENCH_PG_SETTINGS="name=value;name=value": settings of
    // the server that replace these or add to them (plan_cache_mode, a
    // preloaded auto_explain and its log_min_duration, ...).
    if let Ok(settings) = std::env::var("SESSION_LOCK_BENCH_PG_SETTINGS") {
        for setting in settings.split(';').filter(|s| !s.trim().is_empty()) {
            let (name, value) = setting.split_once('=').unwrap_or_else(|| {
                panic!("SESSION_LOCK_BENCH_PG_SETTINGS: {setting:?} is not name=value")
            });
            let name = name.trim().to_owned();
            extra.retain(|(n, _)| *n != name);
            extra.push((name, value.trim().to_owned()));
        }
    }
    let opts = EmbeddedOptions {
        durable: true,
        // 200 idle runners with LISTEN hold 600 connections (benchmark 6).
        max_connections: 1000,
        extra_settings: extra,
        ..EmbeddedOptions::default()
    };
    let pg = EmbeddedPostgres::start_with(opts).unwrap_or_else(|e| {
        panic!("cannot start PostgreSQL for the benchmarks (apt-get install postgresql): {e}")
    });
    eprintln!(
        "bench: PostgreSQL on port {} (data {})",
        pg.port(),
        pg.data_dir().display()
    );
    pg
}

/// Whether the pg_stat_statements extension files are installed.
pub fn pg_stat_statements_installed() -> bool {
    std::fs::read_dir("/usr/share/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .any(|v| {
            v.path()
                .join("extension/pg_stat_statements.control")
                .exists()
        })
}

/// A connection, driven by a task on the current Tokio runtime.
pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Creates the `bench` database with the crate's migrations and the worked
/// example, and returns its URL.
pub async fn create_bench_db(pg: &EmbeddedPostgres) -> String {
    create_db(pg, DB).await
}

/// Creates database `name` (dropping it first) with the crate's migrations,
/// the worked example and a one-row table `bench_floor` for floor
/// measurements, and returns its URL.
pub async fn create_db(pg: &EmbeddedPostgres, name: &str) -> String {
    let admin = connect(&pg.url("postgres")).await;
    for sql in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        admin
            .batch_execute(&sql)
            .await
            .expect("create the bench database");
    }
    let url = pg.url(name);
    let mut client = connect(&url).await;
    Migrator::new()
        .with_example()
        .run(&mut client)
        .await
        .expect("migrate the bench database");
    client
        .batch_execute(
            "CREATE TABLE bench_floor (k int PRIMARY KEY, v bigint);
             INSERT INTO bench_floor VALUES (1, 0);",
        )
        .await
        .expect("floor table");
    if pg_stat_statements_installed() {
        client
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await
            .expect("create pg_stat_statements");
        track_statements(&client, "none").await;
    }
    url
}

/// Empties the task tables and the sessions, inserts `n` open tasks, and
/// vacuums and analyzes, so every run starts from the same state.
pub async fn seed(client: &Client, n: u64) {
    seed_tenants(client, n, "NULL").await;
}

/// Inserts `n` more no-op tasks (as a producer keeping a backlog steady).
pub async fn insert_tasks(client: &Client, n: u64) {
    client
        .execute(
            "INSERT INTO public.example_task (payload) SELECT 'noop' FROM generate_series(1, $1::bigint)",
            &[&(n as i64)],
        )
        .await
        .expect("insert tasks");
}

/// [`seed`], each task's `tenant` given by the SQL expression `tenant`
/// over `g`, the task's number from 1 (`'NULL'`: no tenant).
pub async fn seed_tenants(client: &Client, n: u64, tenant: &str) {
    client
        .batch_execute(
            "TRUNCATE public.example_task, public.example_task_run RESTART IDENTITY;
             DELETE FROM session_lock.session;",
        )
        .await
        .expect("truncate");
    // In chunks, so that 1M rows do not make one huge transaction.
    let chunk = 250_000u64;
    let mut done = 0;
    while done < n {
        let k = chunk.min(n - done);
        client
            .execute(
                &format!(
                    "INSERT INTO public.example_task (payload, tenant) SELECT 'noop', {tenant} FROM generate_series($1::bigint, $2::bigint) g"
                ),
                &[&((done + 1) as i64), &((done + k) as i64)],
            )
            .await
            .expect("seed tasks");
        done += k;
    }
    for sql in [
        "VACUUM ANALYZE public.example_task",
        "VACUUM ANALYZE session_lock.session",
    ] {
        client.batch_execute(sql).await.expect("vacuum");
    }
}

/// Finishes `ids` for `session` through the fenced finish and inserts as
/// many new tasks, so that the backlog stays where it is.
pub async fn finish_and_replace(client: &Client, session: &session_lock::Session, ids: &[i64]) {
    if ids.is_empty() {
        return;
    }
    client
        .execute(
            "WITH f AS (SELECT * FROM session_lock.example_task_finish_tasks($1, $2, $3))
             INSERT INTO public.example_task (payload) SELECT 'noop' FROM f",
            &[&session.id, &session.token, &ids],
        )
        .await
        .expect("finish and replace");
}

/// Sets `synchronous_commit` server-wide: open connections take it at
/// their next statement.
pub async fn set_synchronous_commit(client: &Client, on: bool) {
    alter_system(client, "synchronous_commit", if on { "on" } else { "off" }).await;
}

/// `ALTER SYSTEM SET setting = value` and a reload.
async fn alter_system(client: &Client, setting: &str, value: &str) {
    for sql in [
        format!("ALTER SYSTEM SET {setting} = {value}"),
        "SELECT pg_reload_conf()".to_owned(),
    ] {
        client
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("set {setting}: {e}"));
    }
    // pg_reload_conf signals the postmaster; give the backends a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Turns pg_stat_statements tracking to `track` (none, top, all) and resets it.
pub async fn track_statements(client: &Client, track: &str) -> bool {
    if !pg_stat_statements_installed() {
        return false;
    }
    alter_system(client, "pg_stat_statements.track", &format!("'{track}'")).await;
    client
        .batch_execute("SELECT pg_stat_statements_reset()")
        .await
        .is_ok()
}

/// The `q`-quantile (0..=1) of `xs` by nearest rank; 0 when empty.
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// The median of `xs`; 0 when empty.
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A markdown table: printed to stdout and appended to the results file.
#[derive(Debug)]
pub struct Table {
    title: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: impl Into<String>, header: &[&str]) -> Self {
        Table {
            title: title.into(),
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(c.len());
                }
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::from("|");
            for (i, w) in widths.iter().enumerate() {
                let c = cells.get(i).map(String::as_str).unwrap_or("");
                let _ = write!(s, " {c:<w$} |");
            }
            s
        };
        let mut out = format!("\n### {}\n\n", self.title);
        out.push_str(&line(&self.header));
        out.push('\n');
        out.push('|');
        for w in &widths {
            out.push_str(&format!("{}|", "-".repeat(w + 2)));
        }
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        out
    }

    /// Prints the table and appends it to `target/bench-results/<file>.md`.
    pub fn emit(&self, file: &str) {
        let text = self.render();
        println!("{text}");
        let dir = results_dir();
        let _ = std::fs::create_dir_all(&dir);
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{file}.md")))
        {
            let _ = f.write_all(text.as_bytes());
        }
    }
}

/// Where the tables are collected: `target/bench-results/`.
pub fn results_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("bench-results")
}

/// Starts a results file afresh with the machine facts.
pub fn start_results(file: &str, what: &str) {
    let dir = results_dir();
    let _ = std::fs::create_dir_all(&dir);
    let text = format!("# {what}\n\n{}\n", machine());
    println!("{text}");
    let _ = std::fs::write(dir.join(format!("{file}.md")), text);
}

/// nproc, CPU model, memory, PostgreSQL version, load: one line each.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("?")
        .to_owned();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "?".into());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "- machine: {cpus} vCPU, {model}, {mem} RAM\n- PostgreSQL: {}, same box, loopback TCP; fsync=on, synchronous_commit=on (unless a row says off), full_page_writes=on, shared_buffers=256MB\n- code: {}\n- load average at start: {}",
        pg_version(),
        code_version(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// The commit measured, and the source files changed on top of it.
fn code_version() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim_end().to_owned())
    };
    let head = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "?".into());
    let dirty: Vec<String> = git(&["status", "--porcelain", "--", "src", "migrations"])
        .map(|s| {
            s.lines()
                .map(|l| l.get(3..).unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default();
    if dirty.is_empty() {
        format!("commit {head}")
    } else {
        format!(
            "commit {head} with uncommitted changes to {}",
            dirty.join(", ")
        )
    }
}

fn pg_version() -> String {
    let bin = session_lock_bin_dir();
    std::process::Command::new(bin.join("postgres"))
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".into())
}

/// The PostgreSQL binaries' directory (for pgbench): `SESSION_LOCK_PG_BIN`,
/// else the highest `/usr/lib/postgresql/<v>/bin`.
pub fn session_lock_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SESSION_LOCK_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, p)| p)
        .unwrap_or_else(|| PathBuf::from("/usr/bin"))
}

/// CPU seconds (user + system) a process has used, from /proc/<pid>/stat;
/// with `children`, plus the reaped children's (cutime + cstime).
pub fn proc_cpu_secs(pid: u32, children: bool) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): utime is field 14, so rest[11].
    let get = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let ticks = clock_ticks();
    let mut t = get(11) + get(12);
    if children {
        t += get(13) + get(14);
    }
    t / ticks
}

/// The parent pid of a process.
fn proc_ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// CPU seconds of the whole PostgreSQL server: the postmaster (with its
/// reaped children) and every live child process.
pub fn postgres_cpu_secs(postmaster: u32) -> f64 {
    let mut total = proc_cpu_secs(postmaster, true);
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if proc_ppid(pid) == Some(postmaster) {
            total += proc_cpu_secs(pid, false);
        }
    }
    total
}

/// Peak resident set size (VmHWM) of a process, in MiB.
pub fn proc_peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// CPU seconds this process has used.
pub fn self_cpu_secs() -> f64 {
    proc_cpu_secs(std::process::id(), false)
}

/// Formats a number of milliseconds.
pub fn ms(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// "met" or "MISSED".
pub fn verdict(ok: bool) -> String {
    if ok { "met".into() } else { "MISSED".into() }
}
