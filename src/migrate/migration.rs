//! A migration is one file of a set, and its name says how often it runs.
//!
//! The crate's own sets are embedded at compile time; a user's set is read
//! from a directory, ordered by the files' leading numbers, and a `.sql` file
//! whose suffix is neither `.up.sql` nor `.alwaysup.sql` is refused rather
//! than silently skipped.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::MigrateError;

/// The name of the crate's own migration set.
pub const CORE_SET: &str = "session_lock";

/// The name of the worked-example migration set added by
/// [`Migrator::with_example`](crate::migrate::Migrator::with_example).
pub const EXAMPLE_SET: &str = "example";

const CORE_FILES: &[(&str, MigrationKind, &str)] = &[
    (
        "0001_session_lock.up.sql",
        MigrationKind::Once,
        include_str!("../../migrations/0001_session_lock.up.sql"),
    ),
    (
        "0001_session_lock_v2.up.sql",
        MigrationKind::Once,
        include_str!("../../migrations/0001_session_lock_v2.up.sql"),
    ),
    (
        "0001_session_lock_v2_retries.up.sql",
        MigrationKind::Once,
        include_str!("../../migrations/0001_session_lock_v2_retries.up.sql"),
    ),
    (
        "0001_session_lock_v2_task_groups.up.sql",
        MigrationKind::Once,
        include_str!("../../migrations/0001_session_lock_v2_task_groups.up.sql"),
    ),
    (
        "0001_session_lock_v2_known.up.sql",
        MigrationKind::Once,
        include_str!("../../migrations/0001_session_lock_v2_known.up.sql"),
    ),
    (
        "0001_session_lock_v2_waiting.up.sql",
        MigrationKind::Once,
        include_str!("../../migrations/0001_session_lock_v2_waiting.up.sql"),
    ),
    (
        "0002_session_lock.alwaysup.sql",
        MigrationKind::Always,
        include_str!("../../migrations/0002_session_lock.alwaysup.sql"),
    ),
    (
        "0003_task_table.alwaysup.sql",
        MigrationKind::Always,
        include_str!("../../migrations/0003_task_table.alwaysup.sql"),
    ),
];

const EXAMPLE_FILES: &[(&str, MigrationKind, &str)] = &[
    (
        "0001_example_task.up.sql",
        MigrationKind::Once,
        include_str!("../../migrations/example/0001_example_task.up.sql"),
    ),
    (
        "0001_example_task_tenant.up.sql",
        MigrationKind::Once,
        include_str!("../../migrations/example/0001_example_task_tenant.up.sql"),
    ),
    (
        "0002_example_task.alwaysup.sql",
        MigrationKind::Always,
        include_str!("../../migrations/example/0002_example_task.alwaysup.sql"),
    ),
];

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

    /// Whether it belongs to one of the crate's own sets.
    pub(super) fn is_embedded(&self) -> bool {
        self.set == CORE_SET || self.set == EXAMPLE_SET
    }

    /// The crate's own set, [`CORE_SET`].
    pub(super) fn core_set() -> Vec<Migration> {
        Self::embedded(CORE_SET, CORE_FILES)
    }

    /// The worked example's set, [`EXAMPLE_SET`].
    pub(super) fn example_set() -> Vec<Migration> {
        Self::embedded(EXAMPLE_SET, EXAMPLE_FILES)
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

/// Reads one user directory as the set `set`.
pub(super) fn read_dir_set(set: &str, dir: &Path) -> Result<Vec<Migration>, MigrateError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
