//! A [`Duration`] sent as a PostgreSQL `interval`, so that the statements
//! the store sends call the protocol's functions with their own argument
//! types and no arithmetic of their own (which would resolve operators on
//! the caller's search_path).

use std::error::Error;
use std::time::Duration;

use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

/// A length of time as an `interval` with only a time part (no days or
/// months, which have no fixed length), in microseconds, saturating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Interval(pub(crate) Duration);

impl ToSql for Interval {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        use bytes::BufMut;
        // The binary format: microseconds (i64), days (i32), months (i32).
        let micros = i64::try_from(self.0.as_micros()).unwrap_or(i64::MAX);
        out.put_i64(micros);
        out.put_i32(0);
        out.put_i32(0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::INTERVAL
    }

    to_sql_checked!();
}
