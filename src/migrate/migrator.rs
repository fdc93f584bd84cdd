//! The migrator applies its sets in order, under the migration lock: it
//! refuses an edited once-file before applying anything, applies each
//! once-file not yet applied, re-applies every always-file (but the crate's
//! own that a newer release applied), then declares its task tables.

use std::collections::HashSet;
use std::path::Path;

use tokio_postgres::Client;

use super::bookkeeping::{apply, recorded};
use super::generated::{check_generated, declare, refuse_replacing_generated};
use super::lock::{lock, unlock};
use super::migration::read_dir_set;
use super::version::{VERSION, applied_by_newer};
use super::{CORE_SET, EXAMPLE_SET, MigrateError, Migration, MigrationKind};
use crate::task_table::TaskTable;

/// Loads and applies migration sets: see the [module docs](crate::migrate).
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
            migrations: Migration::core_set(),
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
        self.migrations.splice(at..at, Migration::example_set());
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
    /// Holds the advisory lock [`MIGRATION_LOCK_KEY`](super::MIGRATION_LOCK_KEY) on `client`'s session
    /// for the whole run, waiting for any other migrator first, and releases
    /// it before returning, also on error. Before applying anything, checks
    /// that no applied once-file was edited ([`MigrateError::Edited`]).
    ///
    /// If the returned future is dropped mid-run, the lock stays held until
    /// `client`'s connection closes.
    pub async fn run(&self, client: &mut Client) -> Result<Report, MigrateError> {
        lock(client).await?;
        let result = self.run_locked(client).await;
        unlock(client, result).await
    }

    /// Connects to `url` with [`connect_one`](crate::connect_one) (its
    /// `sslmode` honoured, the connect bounded) and runs the migrations on
    /// that connection, which is closed afterwards.
    pub async fn run_url(&self, url: &str) -> crate::Result<Report> {
        let mut client = crate::store::connect_one(url).await?;
        Ok(self.run(&mut client).await?)
    }

    async fn run_locked(&self, client: &mut Client) -> Result<Report, MigrateError> {
        let recorded = recorded(client).await?;

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

        refuse_replacing_generated(client, &self.migrations).await?;

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
                    if applied_by_newer(
                        m,
                        recorded
                            .get(&(m.set.clone(), m.file.clone()))
                            .and_then(|(_, by)| by.as_deref()),
                    ) =>
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
