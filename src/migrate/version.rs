//! A rolling upgrade never downgrades the protocol: each of the crate's own
//! files records the session-lock release that applied it, and an older
//! release leaves alone an always-file that a newer one applied, so an old
//! instance restarting does not put back the old functions.

use super::Migration;

/// The version of session-lock recorded with each file it applies.
pub(super) const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The release recorded with `m` when this session-lock applies it: its
/// own, for the crate's own sets; none for a user's directory, which is
/// versioned by its user.
pub(super) fn recorded_release(m: &Migration) -> Option<&'static str> {
    m.is_embedded().then_some(VERSION)
}

/// Whether `m` is one of the crate's own files that a newer session-lock
/// than this one applied (`applied_by` is the release recorded with it).
pub(super) fn applied_by_newer(m: &Migration, applied_by: Option<&str>) -> bool {
    m.is_embedded() && applied_by.is_some_and(|v| newer_than(v, VERSION))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_compare_numerically() {
        assert!(newer_than("0.1.10", "0.1.9"));
        assert!(newer_than("1.0.0", "0.9.9"));
        assert!(!newer_than("0.1.0", "0.1.0"));
        assert!(!newer_than("0.1.0-rc.1", "0.1.0"));
    }
}
