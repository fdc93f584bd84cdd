//! Waiting on a runner's status instead of sleeping: every wait has a
//! deadline, and says what it waited for when it runs out.

use std::time::Duration;

use session_lock::RunnerStatus;
use tokio::sync::watch;

/// Waits until `pred` holds for the runner's status, or `timeout` passes;
/// returns the status that satisfied it. A watch channel shows only the
/// latest status, so wait on counters (`ticks`, `finished`), which never go
/// back, rather than on a value that may come and go between two looks.
pub async fn wait_for_status(
    rx: &mut watch::Receiver<RunnerStatus>,
    timeout: Duration,
    pred: impl FnMut(&RunnerStatus) -> bool,
) -> Option<RunnerStatus> {
    match tokio::time::timeout(timeout, rx.wait_for(pred)).await {
        Ok(Ok(status)) => Some(status.clone()),
        _ => None,
    }
}
