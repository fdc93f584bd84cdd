//! Panics in user code (Tasker, DbFinder, ScanTask) become errors: a panic
//! inside an actor's future is not supervised by actix, it would just kill
//! the actor.

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;

use crate::error::{Error, Panic};

/// Runs `fut`, turning a panic (in user code such as a DbFinder) into an
/// error instead of killing the actor silently.
pub(crate) async fn caught<T>(fut: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(res) => res,
        Err(panic) => Err(Error::Panicked(Panic::from_payload(&*panic))),
    }
}

/// Runs `fut` for at most `limit`: an actor's call to user code or the
/// database must never wait forever (a DbFinder that hangs, a request lost
/// in a partition that a proxy acknowledges).
pub(crate) async fn bounded<T>(
    limit: std::time::Duration,
    fut: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(limit, fut).await {
        Ok(res) => res,
        Err(_) => Err(Error::Timeout(limit)),
    }
}
