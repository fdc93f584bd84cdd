//! What the runners' logs say, read from the stderr file of every runner
//! process of every slot (the killed ones included) once they have all
//! stopped.

use super::slots::Slot;

/// What the runners' logs say, over every runner process of every slot.
pub(super) struct LogCounts {
    pub(super) fences: usize,
    pub(super) losses: usize,
    pub(super) refused: usize,
}

impl LogCounts {
    pub(super) fn of(slots: &[Slot]) -> LogCounts {
        let (mut fences, mut losses, mut refused) = (0, 0, 0);
        for slot in slots {
            for runner in slot.runners() {
                let text = runner.log_text();
                fences += text.matches("fencing the session").count();
                losses += text.matches("session lost").count();
                refused += text.matches("finish refused").count();
            }
        }
        LogCounts {
            fences,
            losses,
            refused,
        }
    }
}
