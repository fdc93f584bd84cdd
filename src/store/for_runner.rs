//! A runner's finder: what the runner's [`DbFinder`] finds, each database
//! through its [`Database::for_runner`] handle, made on the thread the
//! runner's actors run on and kept while the finder keeps finding the same
//! database.
//!
//! What it keeps true: every call of the runner's actors goes through a
//! handle made on their own thread (a [`PgStore`](crate::PgStore) drives
//! the connections of such a handle there, so a call does not cross
//! threads to reach its connection, and the connections close with the
//! runner); a database the finder no longer finds is let go, handle and
//! all; a finder's error is passed on as it is.

use std::sync::{Arc, Mutex, PoisonError};

use super::{Database, DbFinder};
use crate::error::Result;

pub(crate) struct ForRunner<F: DbFinder> {
    finder: Arc<F>,
    /// The database found last, and the runner's handle on it.
    latest: Mutex<Option<(F::Db, F::Db)>>,
}

impl<F: DbFinder> ForRunner<F> {
    pub(crate) fn new(finder: Arc<F>) -> Self {
        ForRunner {
            finder,
            latest: Mutex::new(None),
        }
    }
}

impl<F: DbFinder> DbFinder for ForRunner<F> {
    type Db = F::Db;

    async fn find(&self) -> Result<F::Db> {
        let found = self.finder.find().await?;
        let mut latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((was, handle)) = latest.as_ref()
            && was.same_handle(&found)
            && let Some(again) = handle.for_runner()
        {
            return Ok(again);
        }
        let Some(handle) = found.for_runner() else {
            *latest = None;
            return Ok(found);
        };
        match handle.for_runner() {
            Some(again) => {
                *latest = Some((found, handle));
                Ok(again)
            }
            // A handle that gives no other: used this once.
            None => {
                *latest = None;
                Ok(handle)
            }
        }
    }
}
