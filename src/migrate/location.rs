//! A failed migration says where it failed: at the line and column of the
//! position Postgres reported, or else at the statement that was running,
//! found by counting the statements that had completed before it.

use tokio_postgres::error::ErrorPosition;

use super::statements::{Span, split_statements};
use super::{MigrateError, Migration};

/// Turns an error from running `m` into [`MigrateError::Failed`], locating the
/// failing statement by the server's position, or else by the number of
/// statements that completed before it.
pub(super) fn failure(
    m: &Migration,
    e: tokio_postgres::Error,
    completed: Option<usize>,
) -> MigrateError {
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

/// The statement containing byte offset `at`, or else the last one before it.
fn statement_at(statements: &[Span], at: usize) -> Option<Span> {
    statements
        .iter()
        .rev()
        .find(|s| s.start <= at)
        .or_else(|| statements.first())
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
