//! A migration error names what failed: the directory or file that could not
//! be read, the set name refused, the file edited after it was applied, or
//! the file, line, column and statement Postgres rejected, with the server's
//! detail, hint and context.

use std::fmt::Write as _;
use std::path::PathBuf;

use tokio_postgres::error::ErrorPosition;

use crate::error::describe_db;

/// How many characters of a failing statement an error message shows.
const STATEMENT_DISPLAY_CHARS: usize = 200;

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
    /// A set name given to [`Migrator::with_named_dir`](crate::migrate::Migrator::with_named_dir) is empty, reserved or
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
        let _ = write!(s, "\n  statement: {}", one_line(stmt));
    }
    if let Some(d) = db.detail() {
        let _ = write!(s, "\n  detail: {d}");
    }
    if let Some(h) = db.hint() {
        let _ = write!(s, "\n  hint: {h}");
    }
    if let Some(ErrorPosition::Internal { position, query }) = db.position() {
        let _ = write!(
            s,
            "\n  internal query: {} (at character {position})",
            one_line(query)
        );
    }
    if let Some(w) = db.where_() {
        let _ = write!(s, "\n  where: {}", w.replace('\n', "\n    "));
    }
    s
}

/// Collapses whitespace runs to single spaces and keeps at most
/// [`STATEMENT_DISPLAY_CHARS`] characters, ending in `…` where it cut.
fn one_line(text: &str) -> String {
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match collapsed.char_indices().nth(STATEMENT_DISPLAY_CHARS) {
        Some((cut, _)) => format!("{}…", &collapsed[..cut]),
        None => collapsed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_statements_on_one_line_cut_with_an_ellipsis() {
        assert_eq!(one_line("SELECT\n   1,\t2"), "SELECT 1, 2");
        let exact = "x".repeat(STATEMENT_DISPLAY_CHARS);
        assert_eq!(one_line(&exact), exact);
        let longer = "x".repeat(STATEMENT_DISPLAY_CHARS + 1);
        assert_eq!(one_line(&longer), format!("{exact}…"));
    }
}
