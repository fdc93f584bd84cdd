//! Applies the session-lock SQL (and, optionally, your own SQL) to a database.
//!
//! # Sets and files
//!
//! Migrations come in *sets*, applied in this order:
//!
//! 1. `session_lock`: the crate's own schema and functions, embedded in the
//!    binary at compile time (always present);
//! 2. `example`: the worked example task table and functions, added by
//!    [`Migrator::with_example`];
//! 3. your directories, added by [`Migrator::with_dir`] (set names `app`,
//!    `app2`, `app3`… in call order) or [`Migrator::with_named_dir`] (a name
//!    you choose).
//!
//! Within a set, files run in file-name order, comparing a leading number
//! numerically (`2_x` before `10_x`; zero-padding like `0002_x` works too).
//! The suffix decides how often a file runs (the split comes from
//! go-session-lock):
//!
//! * `*.up.sql` ([`MigrationKind::Once`]) is applied exactly once per
//!   database. Once applied it must never change: the migrator refuses to run
//!   if its checksum differs from the recorded one. Add a new file instead.
//! * `*.alwaysup.sql` ([`MigrationKind::Always`]) is re-applied on every run.
//!   It holds `CREATE OR REPLACE FUNCTION`s and the like, so editing it is how
//!   you change a function.
//!
//! # Bookkeeping
//!
//! The migrator creates the schema `session_lock` and the table
//! `session_lock.schema_migration (set_name, file, kind, checksum, applied_at)`
//! itself. Every file applied gets a row there, with the hex SHA-256 of its
//! bytes; rows of always-files are refreshed on every run.
//!
//! # Transactions and concurrency
//!
//! Each file runs in its own transaction, together with its bookkeeping row,
//! as one simple-protocol query, so a file may hold several statements and
//! dollar-quoted function bodies. It therefore must not contain transaction
//! control (`BEGIN`, `COMMIT`) nor statements that cannot run inside a
//! transaction block (`CREATE INDEX CONCURRENTLY`, `VACUUM`).
//!
//! A whole run holds the session-level advisory lock [`MIGRATION_LOCK_KEY`],
//! so any number of instances may run the migrator at start-up at once: they
//! take turns, and each once-file is applied by exactly one of them. The lock
//! is session-level, so the connection must be a real session (not a
//! transaction-mode pooler such as PgBouncer in `transaction` mode).
//!
//! # Example
//!
//! ```no_run
//! # async fn demo(client: &mut tokio_postgres::Client) -> Result<(), session_lock::MigrateError> {
//! use session_lock::Migrator;
//!
//! let report = Migrator::new().with_dir("migrations")?.run(client).await?;
//! println!("applied {:?}, already there {:?}", report.applied, report.skipped);
//! # Ok(())
//! # }
//! ```

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::future::poll_fn;
use std::path::{Path, PathBuf};
use std::pin::pin;

use futures_core::Stream;
use sha2::{Digest, Sha256};
use tokio_postgres::error::ErrorPosition;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::error::describe_db;
use crate::store::Interval;
use crate::task_table::{DECLARE, TaskTable};

/// The key of the session-level advisory lock (`pg_advisory_lock`) held for
/// the whole of [`Migrator::run`]: the ASCII bytes of `"sesslock"`.
pub const MIGRATION_LOCK_KEY: i64 = 0x7365_7373_6c6f_636b;

/// The name of the crate's own migration set.
pub const CORE_SET: &str = "session_lock";

/// The name of the worked-example migration set added by
/// [`Migrator::with_example`].
pub const EXAMPLE_SET: &str = "example";

const CORE_FILES: &[(&str, MigrationKind, &str)] = &[
    (
        "0001_session_lock.up.sql",
        MigrationKind::Once,
        include_str!("../migrations/0001_session_lock.up.sql"),
    ),
    (
        "0001_session_lock_v2.up.sql",
        MigrationKind::Once,
        include_str!("../migrations/0001_session_lock_v2.up.sql"),
    ),
    (
        "0002_session_lock.alwaysup.sql",
        MigrationKind::Always,
        include_str!("../migrations/0002_session_lock.alwaysup.sql"),
    ),
    (
        "0003_task_table.alwaysup.sql",
        MigrationKind::Always,
        include_str!("../migrations/0003_task_table.alwaysup.sql"),
    ),
];

const EXAMPLE_FILES: &[(&str, MigrationKind, &str)] = &[
    (
        "0001_example_task.up.sql",
        MigrationKind::Once,
        include_str!("../migrations/example/0001_example_task.up.sql"),
    ),
    (
        "0002_example_task.alwaysup.sql",
        MigrationKind::Always,
        include_str!("../migrations/example/0002_example_task.alwaysup.sql"),
    ),
];

const BOOTSTRAP: &str = "\
CREATE SCHEMA IF NOT EXISTS session_lock;
CREATE TABLE IF NOT EXISTS session_lock.schema_migration (
    set_name   text        NOT NULL,
    file       text        NOT NULL,
    kind       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (set_name, file)
);
ALTER TABLE session_lock.schema_migration ADD COLUMN IF NOT EXISTS applied_by text;";

const RECORD_ONCE: &str = "INSERT INTO session_lock.schema_migration (set_name, file, kind, checksum, applied_by) \
     VALUES ($1, $2, $3, $4, $5)";

const RECORD_ALWAYS: &str = "INSERT INTO session_lock.schema_migration (set_name, file, kind, checksum, applied_by) \
     VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (set_name, file) DO UPDATE \
     SET kind = EXCLUDED.kind, checksum = EXCLUDED.checksum, applied_at = now(), \
         applied_by = EXCLUDED.applied_by";

/// The version of session-lock recorded with each file it applies.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How many characters of a failing statement an error message shows.
const STATEMENT_DISPLAY_CHARS: usize = 200;

/// Whether a migration file runs once or on every run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationKind {
    /// A `*.up.sql` file: applied exactly once per database, and never edited
    /// afterwards.
    Once,
    /// A `*.alwaysup.sql` file: re-applied on every run (`CREATE OR REPLACE
    /// FUNCTION`s and the like).
    Always,
}

impl MigrationKind {
    /// The value stored in the `kind` column of the bookkeeping table:
    /// `"once"` or `"always"`.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationKind::Once => "once",
            MigrationKind::Always => "always",
        }
    }

    /// The kind a file name's suffix stands for: `*.up.sql` is
    /// [`Once`](Self::Once), `*.alwaysup.sql` is [`Always`](Self::Always),
    /// anything else (including a bare `.up.sql`) is `None`.
    pub fn from_file_name(name: &str) -> Option<Self> {
        if name.len() > ".alwaysup.sql".len() && name.ends_with(".alwaysup.sql") {
            Some(MigrationKind::Always)
        } else if name.len() > ".up.sql".len() && name.ends_with(".up.sql") {
            Some(MigrationKind::Once)
        } else {
            None
        }
    }
}

impl fmt::Display for MigrationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One migration file.
#[derive(Debug, Clone)]
pub struct Migration {
    /// The set it belongs to (`session_lock`, `example`, `app`…).
    pub set: String,
    /// Its file name, e.g. `0001_session_lock.up.sql`.
    pub file: String,
    /// Whether it runs once or on every run.
    pub kind: MigrationKind,
    /// Its SQL.
    pub sql: Cow<'static, str>,
}

impl Migration {
    /// `set/file`, the name used in reports, logs and errors.
    pub fn name(&self) -> String {
        format!("{}/{}", self.set, self.file)
    }

    /// The hex SHA-256 of the file's bytes, as recorded in the bookkeeping
    /// table.
    pub fn checksum(&self) -> String {
        let digest = Sha256::digest(self.sql.as_bytes());
        let mut hex = String::with_capacity(64);
        for byte in digest {
            let _ = write!(hex, "{byte:02x}");
        }
        hex
    }

    fn embedded(set: &str, files: &[(&str, MigrationKind, &'static str)]) -> Vec<Migration> {
        files
            .iter()
            .map(|&(file, kind, sql)| Migration {
                set: set.to_owned(),
                file: file.to_owned(),
                kind,
                sql: Cow::Borrowed(sql),
            })
            .collect()
    }
}

/// What a [`Migrator::run`] did, each entry a `set/file` name in run order.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Once-files applied by this run.
    pub applied: Vec<String>,
    /// Once-files that were already applied (by an earlier run, or by a
    /// concurrent migrator that held the lock first).
    pub skipped: Vec<String>,
    /// Always-files, re-applied by this run.
    pub reapplied: Vec<String>,
    /// The crate's own always-files left alone because a newer release of
    /// session-lock applied them (during a rolling upgrade, an old instance
    /// restarting must not put back the old functions).
    pub newer_kept: Vec<String>,
    /// Task tables declared with [`Migrator::task_table`], in order.
    pub declared: Vec<String>,
}

/// Why loading or applying migrations failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// A migrations directory is missing or could not be listed.
    #[error("cannot read migrations directory {}: {source}", .path.display())]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A migration file could not be read (or is not UTF-8).
    #[error("cannot read migration file {}: {source}", .path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A migrations directory holds `.sql` files that are neither `*.up.sql`
    /// nor `*.alwaysup.sql`: most likely a typo, which would otherwise be
    /// silently skipped.
    #[error(
        "unexpected SQL file(s) in migrations directory {}: {}: migration files must end in `.up.sql` (applied once) or `.alwaysup.sql` (re-applied on every run)",
        .dir.display(),
        join_paths(.files)
    )]
    UnexpectedFiles {
        /// The directory.
        dir: PathBuf,
        /// The offending files.
        files: Vec<PathBuf>,
    },
    /// A file of yours would replace a function session-lock generates for
    /// a declared task table.
    #[error(
        "migration {set}/{file} defines {function}, which session-lock generates from the declaration of task table {table}: remove that definition"
    )]
    ReplacesGenerated {
        /// The set.
        set: String,
        /// The file.
        file: String,
        /// The generated function it defines.
        function: String,
        /// The declared task table.
        table: String,
    },
    /// A generated function of a declared task table did not survive the
    /// run: a migration of yours replaced it (session-lock generated it
    /// again; remove the definition).
    #[error(
        "a migration replaced {functions}, which session-lock generates for declared task tables: they were generated again, but remove the migration's definition of them"
    )]
    GeneratedReplaced {
        /// The functions found replaced.
        functions: String,
    },
    /// A set name given to [`Migrator::with_named_dir`] is empty, reserved or
    /// already used.
    #[error("invalid migration set name {name:?}: {reason}")]
    InvalidSetName {
        /// The name.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A once-file that was already applied has changed since.
    #[error(
        "migration {set}/{file} was edited after it was applied (checksum {recorded} recorded, {current} now): once-migrations must never change; add a new file instead"
    )]
    Edited {
        /// The set.
        set: String,
        /// The file.
        file: String,
        /// The checksum recorded when it was applied.
        recorded: String,
        /// The checksum of the file now.
        current: String,
    },
    /// Postgres rejected a migration file. Its transaction was rolled back,
    /// so nothing of the file was applied (earlier files stay applied).
    #[error("{}", describe_failure(.set, .file, *.line, *.column, .statement.as_deref(), .source))]
    Failed {
        /// The set.
        set: String,
        /// The file.
        file: String,
        /// The 1-based line of the error in the file when Postgres reported a
        /// position; otherwise the line where the failing statement starts,
        /// when it could be determined.
        line: Option<usize>,
        /// The 1-based column (in characters) of the error, when Postgres
        /// reported a position.
        column: Option<usize>,
        /// The failing statement, when it could be determined.
        statement: Option<String>,
        /// The server's error.
        source: tokio_postgres::Error,
    },
    /// A database error outside of a migration's own SQL: connecting, the
    /// lock, the bookkeeping table, or the connection dropping mid-file.
    #[error("database error{}: {}", describe_during(.migration.as_deref()), describe_db(.source))]
    Db {
        /// The `set/file` being applied, if any.
        migration: Option<String>,
        /// The error.
        source: tokio_postgres::Error,
    },
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(source: tokio_postgres::Error) -> Self {
        MigrateError::Db {
            migration: None,
            source,
        }
    }
}

fn join_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_during(migration: Option<&str>) -> String {
    match migration {
        Some(m) => format!(" while applying migration {m}"),
        None => " while running migrations".to_owned(),
    }
}

fn describe_failure(
    set: &str,
    file: &str,
    line: Option<usize>,
    column: Option<usize>,
    statement: Option<&str>,
    source: &tokio_postgres::Error,
) -> String {
    let mut s = format!("migration {set}/{file} failed");
    match (line, column) {
        (Some(l), Some(c)) => {
            let _ = write!(s, " at line {l}, column {c}");
        }
        (Some(l), None) => {
            let _ = write!(s, " in the statement at line {l}");
        }
        _ => {}
    }
    let Some(db) = source.as_db_error() else {
        let _ = write!(s, ": {}", describe_db(source));
        return s;
    };
    let _ = write!(s, ": {} (SQLSTATE {})", db.message(), db.code().code());
    if let Some(stmt) = statement {
        let (shown, truncated) = one_line(stmt, STATEMENT_DISPLAY_CHARS);
        let ellipsis = if truncated { "…" } else { "" };
        let _ = write!(s, "\n  statement: {shown}{ellipsis}");
    }
    if let Some(d) = db.detail() {
        let _ = write!(s, "\n  detail: {d}");
    }
    if let Some(h) = db.hint() {
        let _ = write!(s, "\n  hint: {h}");
    }
    if let Some(ErrorPosition::Internal { position, query }) = db.position() {
        let (shown, truncated) = one_line(query, STATEMENT_DISPLAY_CHARS);
        let ellipsis = if truncated { "…" } else { "" };
        let _ = write!(
            s,
            "\n  internal query: {shown}{ellipsis} (at character {position})"
        );
    }
    if let Some(w) = db.where_() {
        let _ = write!(s, "\n  where: {}", w.replace('\n', "\n    "));
    }
    s
}

/// Collapses whitespace runs to single spaces and keeps at most `max` chars;
/// also says whether it cut anything.
fn one_line(text: &str, max: usize) -> (String, bool) {
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match collapsed.char_indices().nth(max) {
        Some((cut, _)) => (collapsed[..cut].to_owned(), true),
        None => (collapsed, false),
    }
}

/// Loads and applies migration sets: see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Migrator {
    migrations: Vec<Migration>,
    /// Every set name in use, in order, including directories without files
    /// (so that the `app`, `app2`… numbering does not depend on contents).
    sets: Vec<String>,
    /// Task tables to declare after the sets, in order.
    task_tables: Vec<TaskTable>,
}

impl Default for Migrator {
    fn default() -> Self {
        Self::new()
    }
}

impl Migrator {
    /// A migrator for the crate's own set, `session_lock`, alone.
    pub fn new() -> Self {
        Migrator {
            migrations: Migration::embedded(CORE_SET, CORE_FILES),
            sets: vec![CORE_SET.to_owned()],
            task_tables: Vec::new(),
        }
    }

    /// Declares a task table at the end of every run, after every set (so a
    /// migration of yours may create the table in the same run): its
    /// protocol functions are generated from the declaration, by the
    /// session-lock that runs the migration. The same as calling
    /// `session_lock.declare_task_table` in a migration of your own.
    pub fn task_table(mut self, table: TaskTable) -> Self {
        self.task_tables.push(table);
        self
    }

    /// Adds the worked example set, `example` (an example task table and its
    /// functions). It always runs right after `session_lock`, before any
    /// directory, whatever the call order. Adding it twice is harmless.
    pub fn with_example(mut self) -> Self {
        if self.sets.iter().any(|s| s == EXAMPLE_SET) {
            return self;
        }
        let at = self
            .migrations
            .iter()
            .rposition(|m| m.set == CORE_SET)
            .map_or(0, |i| i + 1);
        self.migrations
            .splice(at..at, Migration::embedded(EXAMPLE_SET, EXAMPLE_FILES));
        let set_at = self
            .sets
            .iter()
            .position(|s| s == CORE_SET)
            .map_or(0, |i| i + 1);
        self.sets.insert(set_at, EXAMPLE_SET.to_owned());
        self
    }

    /// Adds the migrations of a directory as the next set, named `app` for
    /// the first directory added this way, then `app2`, `app3`… in call order.
    ///
    /// The set name is part of each file's identity in the bookkeeping table,
    /// so keep the calls in the same order between releases, or use
    /// [`with_named_dir`](Self::with_named_dir) when there are several
    /// directories. Moving or renaming a directory changes nothing.
    ///
    /// See [`with_named_dir`](Self::with_named_dir) for what is read and
    /// refused.
    pub fn with_dir(self, dir: impl AsRef<Path>) -> Result<Self, MigrateError> {
        let name = (1..)
            .map(|n| {
                if n == 1 {
                    "app".to_owned()
                } else {
                    format!("app{n}")
                }
            })
            .find(|name| !self.sets.contains(name))
            .unwrap_or_else(|| "app".to_owned());
        self.with_named_dir(name, dir)
    }

    /// Adds the migrations of a directory as a set with the given name.
    ///
    /// Reads the directory's `*.up.sql` and `*.alwaysup.sql` files
    /// (sub-directories, dot-files and non-`.sql` files are ignored). Refuses:
    ///
    /// * a missing or unreadable directory or file
    ///   ([`ReadDir`](MigrateError::ReadDir), [`ReadFile`](MigrateError::ReadFile));
    /// * any other `*.sql` file, e.g. `0003_x.sql`
    ///   ([`UnexpectedFiles`](MigrateError::UnexpectedFiles));
    /// * an empty set name, one containing `/`, `session_lock`, `example`, or
    ///   a name already used ([`InvalidSetName`](MigrateError::InvalidSetName)).
    pub fn with_named_dir(
        mut self,
        set: impl Into<String>,
        dir: impl AsRef<Path>,
    ) -> Result<Self, MigrateError> {
        let set = set.into();
        let reason = if set.trim().is_empty() {
            Some("it is empty")
        } else if set.contains('/') {
            Some("it contains `/`")
        } else if set == CORE_SET || set == EXAMPLE_SET {
            Some("it is reserved for the crate's own migrations")
        } else if self.sets.contains(&set) {
            Some("it is already used by another set")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(MigrateError::InvalidSetName { name: set, reason });
        }
        let migrations = read_dir_set(&set, dir.as_ref())?;
        if migrations.is_empty() {
            tracing::warn!(
                set = %set,
                dir = %dir.as_ref().display(),
                "migrations directory holds no *.up.sql or *.alwaysup.sql file"
            );
        }
        self.migrations.extend(migrations);
        self.sets.push(set);
        Ok(self)
    }

    /// Every migration, in run order.
    pub fn migrations(&self) -> &[Migration] {
        &self.migrations
    }

    /// Applies the migrations: each once-file not yet applied, and every
    /// always-file, in order, each in its own transaction.
    ///
    /// Holds the advisory lock [`MIGRATION_LOCK_KEY`] on `client`'s session
    /// for the whole run, waiting for any other migrator first, and releases
    /// it before returning, also on error. Before applying anything, checks
    /// that no applied once-file was edited ([`MigrateError::Edited`]).
    ///
    /// If the returned future is dropped mid-run, the lock stays held until
    /// `client`'s connection closes.
    pub async fn run(&self, client: &mut Client) -> Result<Report, MigrateError> {
        lock(client).await?;
        let result = self.run_locked(client).await;
        let unlocked = client
            .query_one("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
            .await
            .and_then(|row| row.try_get::<_, bool>(0));
        match (result, unlocked) {
            (Ok(report), Ok(true)) => Ok(report),
            (Ok(report), Ok(false)) => {
                tracing::warn!(
                    "the migration advisory lock was no longer held at the end of the run"
                );
                Ok(report)
            }
            (Ok(_), Err(e)) => Err(MigrateError::Db {
                migration: None,
                source: e,
            }),
            (Err(e), Ok(_)) => Err(e),
            (Err(e), Err(unlock)) => {
                tracing::warn!(error = %describe_db(&unlock), "could not release the migration advisory lock");
                Err(e)
            }
        }
    }

    /// Connects to `url` with [`connect_one`](crate::connect_one) (its
    /// `sslmode` honoured, the connect bounded) and runs the migrations on
    /// that connection, which is closed afterwards.
    pub async fn run_url(&self, url: &str) -> crate::Result<Report> {
        let mut client = crate::store::connect_one(url).await?;
        Ok(self.run(&mut client).await?)
    }

    async fn run_locked(&self, client: &mut Client) -> Result<Report, MigrateError> {
        client.batch_execute(BOOTSTRAP).await?;
        let rows = client
            .query(
                "SELECT set_name, file, checksum, applied_by FROM session_lock.schema_migration",
                &[],
            )
            .await?;
        // (set, file) -> (checksum, the session-lock release that applied it)
        let mut recorded: HashMap<(String, String), (String, Option<String>)> =
            HashMap::with_capacity(rows.len());
        for row in rows {
            recorded.insert(
                (row.try_get(0)?, row.try_get(1)?),
                (row.try_get(2)?, row.try_get(3)?),
            );
        }

        let checksums: Vec<String> = self.migrations.iter().map(Migration::checksum).collect();

        // Refuse edited once-files before applying anything.
        for (m, current) in self.migrations.iter().zip(&checksums) {
            if m.kind != MigrationKind::Once {
                continue;
            }
            if let Some((old, _)) = recorded.get(&(m.set.clone(), m.file.clone())) {
                if old != current {
                    return Err(MigrateError::Edited {
                        set: m.set.clone(),
                        file: m.file.clone(),
                        recorded: old.clone(),
                        current: current.clone(),
                    });
                }
            }
        }

        let known: HashSet<(&str, &str)> = self
            .migrations
            .iter()
            .map(|m| (m.set.as_str(), m.file.as_str()))
            .collect();
        for (set, file) in recorded.keys() {
            if self.sets.contains(set) && !known.contains(&(set.as_str(), file.as_str())) {
                tracing::warn!(
                    migration = %format!("{set}/{file}"),
                    "recorded as applied but no longer in its migration set"
                );
            }
        }

        self.refuse_replacing_generated(client).await?;

        let mut report = Report::default();
        for (m, checksum) in self.migrations.iter().zip(&checksums) {
            let name = m.name();
            match m.kind {
                MigrationKind::Once if recorded.contains_key(&(m.set.clone(), m.file.clone())) => {
                    tracing::info!(migration = %name, "migration already applied");
                    report.skipped.push(name);
                }
                MigrationKind::Once => {
                    apply(client, m, checksum).await?;
                    tracing::info!(migration = %name, "migration applied");
                    report.applied.push(name);
                }
                MigrationKind::Always
                    if is_embedded(&m.set)
                        && recorded
                            .get(&(m.set.clone(), m.file.clone()))
                            .and_then(|(_, by)| by.as_deref())
                            .is_some_and(|v| newer_than(v, VERSION)) =>
                {
                    tracing::warn!(
                        migration = %name,
                        "left as applied by a newer session-lock than {VERSION}; not downgrading its functions"
                    );
                    report.newer_kept.push(name);
                }
                MigrationKind::Always => {
                    apply(client, m, checksum).await?;
                    tracing::info!(migration = %name, "migration re-applied");
                    report.reapplied.push(name);
                }
            }
        }
        for table in &self.task_tables {
            declare(client, table).await?;
            tracing::info!(table = %table.table, "task table declared");
            report.declared.push(table.table.clone());
        }
        check_generated(client).await?;
        Ok(report)
    }

    /// Refuses, before anything is applied, a user always-file that defines
    /// a function session-lock generates for a declared table: applied on
    /// every run, it would replace the protocol with its own copy. A file
    /// that looks like a task template copied from session-lock 0.1 (its
    /// functions call protocol 1's, which now refuse) is only named in a
    /// warning: its functions live outside the schema `session_lock` and
    /// touch nothing of protocol 2.
    async fn refuse_replacing_generated(&self, client: &Client) -> Result<(), MigrateError> {
        for m in &self.migrations {
            if !is_embedded(&m.set)
                && m.kind == MigrationKind::Always
                && m.sql.contains("session_lock.work_begin(")
            {
                tracing::warn!(
                    migration = %m.name(),
                    "this looks like a task template copied from session-lock 0.1: its functions refuse with SL004 now; declare the table and delete the file (README: upgrading from the template)"
                );
            }
        }
        let rows = client
            .query(
                "SELECT t.task_table::text, t.fn_prefix FROM session_lock.task_table t",
                &[],
            )
            .await;
        // Before protocol 2 there is no such table: nothing is declared.
        let Ok(rows) = rows else {
            return Ok(());
        };
        for row in rows {
            let (table, prefix): (String, String) = (row.try_get(0)?, row.try_get(1)?);
            for m in &self.migrations {
                if is_embedded(&m.set) || m.kind != MigrationKind::Always {
                    continue;
                }
                let sql = m
                    .sql
                    .to_lowercase()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                for name in GENERATED_ENTRY_POINTS {
                    let function = format!("session_lock.{prefix}_{name}").to_lowercase();
                    if sql.contains(&format!("function {function}")) {
                        return Err(MigrateError::ReplacesGenerated {
                            set: m.set.clone(),
                            file: m.file.clone(),
                            function: format!("session_lock.{prefix}_{name}"),
                            table,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// The generated functions a runner and `status` call, which a copied task
/// template also defines.
const GENERATED_ENTRY_POINTS: [&str; 3] = ["get_work", "finish_tasks", "held"];

/// Applies one declaration, in a transaction of its own.
async fn declare(client: &mut Client, table: &TaskTable) -> Result<(), MigrateError> {
    let tx = client.transaction().await?;
    tx.execute(
        DECLARE,
        &[
            &table.table,
            &table.open_when,
            &table.finish,
            &table.finished_by,
            &table.order_by,
            &table.id_column,
            &table.notify,
            &table.fn_prefix,
            &Interval(table.lock_timeout),
        ],
    )
    .await
    .map_err(|source| MigrateError::Db {
        migration: Some(format!("declaration of {}", table.table)),
        source,
    })?;
    tx.commit().await?;
    Ok(())
}

/// Checks that no file of the run replaced a generated function (the
/// generated ones carry a marker line); generates them again if one did,
/// and reports which.
async fn check_generated(client: &Client) -> Result<(), MigrateError> {
    let replaced: Vec<String> = client
        .query(
            "SELECT p.oid::regprocedure::text
               FROM session_lock.task_table t
               JOIN pg_catalog.pg_proc p
                 ON p.pronamespace = 'session_lock'::regnamespace
                AND p.proname IN (t.fn_prefix || '_get_work', t.fn_prefix || '_finish_tasks',
                                  t.fn_prefix || '_held')
              WHERE p.prosrc NOT LIKE '%Generated by session-lock%'
              ORDER BY 1",
            &[],
        )
        .await
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .unwrap_or_default();
    if replaced.is_empty() {
        return Ok(());
    }
    client
        .batch_execute("SELECT session_lock.generate_task_tables()")
        .await?;
    Err(MigrateError::GeneratedReplaced {
        functions: replaced.join(", "),
    })
}

fn is_embedded(set: &str) -> bool {
    set == CORE_SET || set == EXAMPLE_SET
}

/// Whether release `a` is newer than `b` ("1.2.10" > "1.2.9"; a
/// pre-release suffix is ignored).
fn newer_than(a: &str, b: &str) -> bool {
    fn parts(v: &str) -> Vec<u64> {
        v.split(['-', '+'])
            .next()
            .unwrap_or("")
            .split('.')
            .map(|p| p.parse().unwrap_or(0))
            .collect()
    }
    parts(a) > parts(b)
}

async fn lock(client: &Client) -> Result<(), MigrateError> {
    let got: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?
        .try_get(0)?;
    if !got {
        tracing::info!("waiting for another migrator to finish");
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await?;
    }
    Ok(())
}

/// Runs one file and records it, in one transaction.
async fn apply(client: &mut Client, m: &Migration, checksum: &str) -> Result<(), MigrateError> {
    let db_err = |source| MigrateError::Db {
        migration: Some(m.name()),
        source,
    };
    let tx = client.transaction().await.map_err(db_err)?;
    if let Err((e, completed)) = execute_counting(tx.client(), &m.sql).await {
        rollback(tx, m).await;
        return Err(failure(m, e, Some(completed)));
    }
    let record = match m.kind {
        MigrationKind::Once => RECORD_ONCE,
        MigrationKind::Always => RECORD_ALWAYS,
    };
    // The crate's own sets record the release that applied them; a user's
    // directory is versioned by its user.
    let by = is_embedded(&m.set).then_some(VERSION);
    if let Err(e) = tx
        .execute(record, &[&m.set, &m.file, &m.kind.as_str(), &checksum, &by])
        .await
    {
        rollback(tx, m).await;
        return Err(db_err(e));
    }
    // A deferred constraint of the file may fail only here.
    tx.commit().await.map_err(|e| failure(m, e, None))
}

async fn rollback(tx: tokio_postgres::Transaction<'_>, m: &Migration) {
    if let Err(e) = tx.rollback().await {
        tracing::warn!(migration = %m.name(), error = %describe_db(&e), "rollback failed");
    }
}

/// Runs `sql` with the simple query protocol; on error also returns how many
/// statements had completed, which identifies the failing one.
async fn execute_counting(
    client: &Client,
    sql: &str,
) -> Result<(), (tokio_postgres::Error, usize)> {
    let stream = client.simple_query_raw(sql).await.map_err(|e| (e, 0))?;
    let mut stream = pin!(stream);
    let mut completed = 0;
    while let Some(msg) = poll_fn(|cx| stream.as_mut().poll_next(cx)).await {
        match msg {
            Ok(SimpleQueryMessage::CommandComplete(_)) => completed += 1,
            Ok(_) => {}
            Err(e) => return Err((e, completed)),
        }
    }
    Ok(())
}

/// Turns an error from running `m` into [`MigrateError::Failed`], locating the
/// failing statement by the server's position, or else by the number of
/// statements that completed before it.
fn failure(m: &Migration, e: tokio_postgres::Error, completed: Option<usize>) -> MigrateError {
    let Some(db) = e.as_db_error() else {
        return MigrateError::Db {
            migration: Some(m.name()),
            source: e,
        };
    };
    let sql: &str = &m.sql;
    let statements = split_statements(sql);
    let (line, column, statement) = match db.position() {
        Some(ErrorPosition::Original(position)) => {
            let at = char_to_byte(sql, *position as usize);
            let (line, column) = line_col(sql, at);
            let statement = statement_at(&statements, at).and_then(|s| sql.get(s.start..s.end));
            (Some(line), Some(column), statement)
        }
        _ => match completed.and_then(|n| statements.get(n)) {
            Some(s) => (
                Some(line_col(sql, s.start).0),
                None,
                sql.get(s.start..s.end),
            ),
            None => (None, None, None),
        },
    };
    MigrateError::Failed {
        set: m.set.clone(),
        file: m.file.clone(),
        line,
        column,
        statement: statement.map(str::to_owned),
        source: e,
    }
}

/// Reads one user directory as the set `set`.
fn read_dir_set(set: &str, dir: &Path) -> Result<Vec<Migration>, MigrateError> {
    let read_dir_err = |source| MigrateError::ReadDir {
        path: dir.to_owned(),
        source,
    };
    let mut found: Vec<(String, MigrationKind, PathBuf)> = Vec::new();
    let mut strays: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir_err)? {
        let entry = entry.map_err(read_dir_err)?;
        let path = entry.path();
        let os_name = entry.file_name();
        let lossy = os_name.to_string_lossy();
        if lossy.starts_with('.') {
            continue;
        }
        let is_sql = lossy.to_ascii_lowercase().ends_with(".sql");
        // Follows symlinks; a dangling one is an error naming it.
        let meta = std::fs::metadata(&path).map_err(|source| MigrateError::ReadFile {
            path: path.clone(),
            source,
        })?;
        if !meta.is_file() {
            continue;
        }
        match os_name
            .to_str()
            .and_then(|n| MigrationKind::from_file_name(n).map(|k| (n, k)))
        {
            Some((name, kind)) => found.push((name.to_owned(), kind, path)),
            None if is_sql => strays.push(path),
            None => {}
        }
    }
    if !strays.is_empty() {
        strays.sort();
        return Err(MigrateError::UnexpectedFiles {
            dir: dir.to_owned(),
            files: strays,
        });
    }
    found.sort_by(|a, b| order_key(&a.0).cmp(&order_key(&b.0)));

    let mut migrations = Vec::with_capacity(found.len());
    for (file, kind, path) in found {
        let sql = std::fs::read_to_string(&path).map_err(|source| MigrateError::ReadFile {
            path: path.clone(),
            source,
        })?;
        migrations.push(Migration {
            set: set.to_owned(),
            file,
            kind,
            sql: Cow::Owned(sql),
        });
    }
    Ok(migrations)
}

/// Sorts names by their leading number (numerically), then by name; names
/// without a leading number come last.
fn order_key(name: &str) -> (bool, usize, &str, &str) {
    let digits_end = name
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(name.len());
    let digits = name[..digits_end].trim_start_matches('0');
    (digits_end == 0, digits.len(), digits, name)
}

/// Byte offset of the 1-based character `position` (the text's end if past
/// it).
fn char_to_byte(sql: &str, position: usize) -> usize {
    match position.checked_sub(1) {
        None => 0,
        Some(index) => sql.char_indices().nth(index).map_or(sql.len(), |(b, _)| b),
    }
}

/// 1-based line and column (in characters) of byte offset `at`.
fn line_col(sql: &str, at: usize) -> (usize, usize) {
    let before = sql.get(..at).unwrap_or(sql);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// A statement's byte range, from its first token to the end of its last one
/// (comments and the `;` excluded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
}

/// The statement containing byte offset `at`, or else the last one before it.
fn statement_at(statements: &[Span], at: usize) -> Option<Span> {
    statements
        .iter()
        .rev()
        .find(|s| s.start <= at)
        .or_else(|| statements.first())
        .copied()
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_cont(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

/// Splits SQL into its non-empty top-level statements the way psql does:
/// `;` ends a statement outside quotes (`'…'`, `E'…'`, `"…"`, `$tag$…$tag$`),
/// comments (`--`, nested `/* */`), parentheses and `BEGIN … END` blocks of
/// `CREATE [OR REPLACE] FUNCTION|PROCEDURE` (SQL-standard bodies).
fn split_statements(sql: &str) -> Vec<Span> {
    let b = sql.as_bytes();
    let n = b.len();
    let mut out = Vec::new();
    let mut i = 0;
    let mut start: Option<usize> = None;
    let mut last_end = 0;
    let mut parens = 0u32;
    let mut begin_depth = 0u32;
    // First letters of leading CREATE / OR / REPLACE / FUNCTION / PROCEDURE.
    let mut leading = [0u8; 4];
    let mut words = 0usize;
    while i < n {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'-' && b.get(i + 1) == Some(&b'-') {
            while i < n && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 1;
            i += 2;
            while i < n && depth > 0 {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                } else {
                    i += 1;
                }
            }
            continue;
        }
        if c == b';' && parens == 0 && begin_depth == 0 {
            if let Some(s) = start.take() {
                out.push(Span {
                    start: s,
                    end: last_end,
                });
            }
            leading = [0; 4];
            words = 0;
            i += 1;
            continue;
        }
        if start.is_none() {
            start = Some(i);
        }
        match c {
            b'\'' => {
                let escapes = i >= 1
                    && matches!(b[i - 1], b'e' | b'E')
                    && (i < 2 || !is_ident_cont(b[i - 2]));
                i = skip_quoted(b, i, b'\'', escapes);
            }
            b'"' => i = skip_quoted(b, i, b'"', false),
            b'$' => i = dollar_quote_end(b, i).unwrap_or(i + 1),
            b'(' => {
                parens += 1;
                i += 1;
            }
            b')' => {
                parens = parens.saturating_sub(1);
                i += 1;
            }
            c if is_ident_start(c) => {
                let w = i;
                while i < n && is_ident_cont(b[i]) {
                    i += 1;
                }
                let word = &b[w..i];
                if words < leading.len() {
                    for key in [&b"create"[..], b"or", b"replace", b"function", b"procedure"] {
                        if word.eq_ignore_ascii_case(key) {
                            leading[words] = key[0];
                        }
                    }
                }
                words += 1;
                let in_routine = leading[0] == b'c'
                    && (leading[1] == b'f'
                        || leading[1] == b'p'
                        || (leading[1] == b'o'
                            && leading[2] == b'r'
                            && (leading[3] == b'f' || leading[3] == b'p')));
                if in_routine && parens == 0 {
                    if word.eq_ignore_ascii_case(b"begin") {
                        begin_depth += 1;
                    } else if word.eq_ignore_ascii_case(b"case") {
                        if begin_depth >= 1 {
                            begin_depth += 1;
                        }
                    } else if word.eq_ignore_ascii_case(b"end") {
                        begin_depth = begin_depth.saturating_sub(1);
                    }
                }
            }
            b'0'..=b'9' => {
                while i < n && (is_ident_cont(b[i]) || b[i] == b'.') && b[i] != b'$' {
                    i += 1;
                }
            }
            _ => i += 1,
        }
        last_end = i.min(n);
    }
    if let Some(s) = start {
        out.push(Span {
            start: s,
            end: last_end,
        });
    }
    out
}

/// End (exclusive) of the quoted token opened at `open`; `''` (or `""`) is an
/// escaped quote, and with `backslashes` (E-strings) so is `\'`.
fn skip_quoted(b: &[u8], open: usize, quote: u8, backslashes: bool) -> usize {
    let mut j = open + 1;
    while j < b.len() {
        if backslashes && b[j] == b'\\' {
            j += 2;
        } else if b[j] == quote {
            if b.get(j + 1) == Some(&quote) {
                j += 2;
            } else {
                return j + 1;
            }
        } else {
            j += 1;
        }
    }
    b.len()
}

/// If a dollar quote `$tag$` opens at `open`, the end (exclusive) of its
/// closing tag (or of the text, if unterminated).
fn dollar_quote_end(b: &[u8], open: usize) -> Option<usize> {
    if open > 0 && is_ident_cont(b[open - 1]) {
        return None;
    }
    let mut j = open + 1;
    if j < b.len() && (b[j].is_ascii_alphabetic() || b[j] == b'_' || b[j] >= 0x80) {
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] >= 0x80) {
            j += 1;
        }
    }
    if b.get(j) != Some(&b'$') {
        return None;
    }
    let tag = &b[open..=j];
    let body = j + 1;
    Some(
        b.get(body..)
            .and_then(|rest| rest.windows(tag.len()).position(|w| w == tag))
            .map_or(b.len(), |p| body + p + tag.len()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(sql: &str) -> Vec<&str> {
        split_statements(sql)
            .iter()
            .map(|s| &sql[s.start..s.end])
            .collect()
    }

    #[test]
    fn splits_top_level_semicolons_only() {
        let sql = "-- leading; comment\nCREATE TABLE a (x text DEFAULT ';');\n\n\
                   /* block ; /* nested ; */ still */ INSERT INTO \"we;ird\" VALUES (E'it\\'s;');\n\
                   CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$\nBEGIN\n  RETURN 1; -- x\nEND;\n$body$;\n\
                   ;;  SELECT $$a;b$$, $1  \n";
        assert_eq!(
            texts(sql),
            vec![
                "CREATE TABLE a (x text DEFAULT ';')",
                "INSERT INTO \"we;ird\" VALUES (E'it\\'s;')",
                "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$\nBEGIN\n  RETURN 1; -- x\nEND;\n$body$",
                "SELECT $$a;b$$, $1",
            ]
        );
    }

    #[test]
    fn keeps_begin_atomic_bodies_together() {
        let sql = "CREATE OR REPLACE FUNCTION g(x int) RETURNS int LANGUAGE sql\nBEGIN ATOMIC\n  SELECT CASE WHEN x > 0 THEN 1 ELSE 2 END;\n  SELECT 3;\nEND;\nBEGIN; SELECT 1; END;";
        assert_eq!(
            texts(sql),
            vec![
                "CREATE OR REPLACE FUNCTION g(x int) RETURNS int LANGUAGE sql\nBEGIN ATOMIC\n  SELECT CASE WHEN x > 0 THEN 1 ELSE 2 END;\n  SELECT 3;\nEND",
                "BEGIN",
                "SELECT 1",
                "END",
            ]
        );
    }

    #[test]
    fn empty_and_comment_only_text_has_no_statements() {
        assert!(split_statements("").is_empty());
        assert!(split_statements("  -- nothing\n/* here */ ;\n").is_empty());
    }

    #[test]
    fn maps_positions_to_lines_and_columns() {
        let sql = "SELECT 1;\nSELECT ü;\nCREATE TABLEE foo ();";
        // "TABLEE" starts at character 28 (1-based).
        let at = char_to_byte(sql, 28);
        assert_eq!(&sql[at..at + 6], "TABLEE");
        assert_eq!(line_col(sql, at), (3, 8));
        let s = statement_at(&split_statements(sql), at).map(|s| &sql[s.start..s.end]);
        assert_eq!(s, Some("CREATE TABLEE foo ()"));
        assert_eq!(char_to_byte(sql, 1000), sql.len());
    }

    #[test]
    fn orders_by_numeric_prefix() {
        let mut names = vec!["10_b.up.sql", "2_a.up.sql", "0003_c.up.sql", "x.up.sql"];
        names.sort_by(|a, b| order_key(a).cmp(&order_key(b)));
        assert_eq!(
            names,
            vec!["2_a.up.sql", "0003_c.up.sql", "10_b.up.sql", "x.up.sql"]
        );
    }

    #[test]
    fn kinds_from_names() {
        assert_eq!(
            MigrationKind::from_file_name("1_a.up.sql"),
            Some(MigrationKind::Once)
        );
        assert_eq!(
            MigrationKind::from_file_name("1_a.alwaysup.sql"),
            Some(MigrationKind::Always)
        );
        assert_eq!(MigrationKind::from_file_name("1_a.sql"), None);
        assert_eq!(MigrationKind::from_file_name(".up.sql"), None);
    }

    #[test]
    fn releases_compare_numerically() {
        assert!(newer_than("0.1.10", "0.1.9"));
        assert!(newer_than("1.0.0", "0.9.9"));
        assert!(!newer_than("0.1.0", "0.1.0"));
        assert!(!newer_than("0.1.0-rc.1", "0.1.0"));
    }

    #[test]
    fn checksum_is_hex_sha256() {
        let m = Migration {
            set: "s".into(),
            file: "f.up.sql".into(),
            kind: MigrationKind::Once,
            sql: Cow::Borrowed(""),
        };
        assert_eq!(
            m.checksum(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
