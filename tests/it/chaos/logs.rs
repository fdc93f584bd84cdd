//! What the runners' logs say, read from the stderr file of every runner
//! process of every slot (the killed ones included) once they have all
//! stopped: counts for the summary, and when each session fenced itself
//! and when the fence lifted, against which the checks judge the runs a
//! fence cut short.

use super::slots::Slot;

/// The session actor's line when it fences its session.
const FENCING: &str = "fencing the session";
/// The session actor's line when a heartbeat lifts the fence.
const LIFTED: &str = "fence lifted";

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
                fences += text.matches(FENCING).count();
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

/// A session fenced itself, as its runner logged it; times in epoch
/// seconds on the host's clock, which is the database's `now()` too.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Fence {
    pub(super) session: i64,
    pub(super) at: f64,
    /// When a heartbeat lifted it, if one did before the runner ended.
    pub(super) lifted: Option<f64>,
}

/// Every fence of every runner, each with the first lift of the same
/// session that followed it in that runner's log.
pub(super) fn fences(slots: &[Slot]) -> Vec<Fence> {
    let mut all = Vec::new();
    for slot in slots {
        for runner in slot.runners() {
            all.extend(fences_in(&runner.log_text()));
        }
    }
    all
}

/// The fences in one runner's log. Panics on a fence or lift line it cannot
/// read: the checks must not judge from a log format they no longer know.
fn fences_in(log: &str) -> Vec<Fence> {
    let mut fences: Vec<Fence> = Vec::new();
    for line in log.lines() {
        let fenced = line.contains(FENCING);
        if !fenced && !line.contains(LIFTED) {
            continue;
        }
        let (at, session) = stamp_and_session(line)
            .unwrap_or_else(|| panic!("cannot read the time and session of: {line}"));
        if fenced {
            fences.push(Fence {
                session,
                at,
                lifted: None,
            });
        } else if let Some(open) = fences
            .iter_mut()
            .rev()
            .find(|f| f.session == session && f.lifted.is_none())
        {
            open.lifted = Some(at);
        }
    }
    fences
}

/// A log line's timestamp (RFC 3339, UTC, first on the line) in epoch
/// seconds, and its `session=` field.
fn stamp_and_session(line: &str) -> Option<(f64, i64)> {
    let mut words = line.split_whitespace();
    let at = epoch_seconds(words.next()?)?;
    let session = words
        .find_map(|w| w.strip_prefix("session="))?
        .parse()
        .ok()?;
    Some((at, session))
}

/// `2025-11-30T07:29:15.021345Z` in seconds since the epoch.
fn epoch_seconds(stamp: &str) -> Option<f64> {
    let (date, time) = stamp.strip_suffix('Z')?.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let mut hms = time.splitn(3, ':');
    let h: i64 = hms.next()?.parse().ok()?;
    let min: i64 = hms.next()?.parse().ok()?;
    let sec: f64 = hms.next()?.parse().ok()?;
    // Days since 1970-01-01 in the proleptic Gregorian calendar (Howard
    // Hinnant's days_from_civil): years start in March, so the leap day
    // ends one.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3_600 + min * 60) as f64 + sec)
}

#[test]
fn a_fence_and_its_lift_are_read_from_a_runner_log() {
    let log = "\
2025-11-30T07:29:14.500000Z  INFO session started session=40 database=x
2025-11-30T07:29:15.021345Z  WARN no successful heartbeat within ttl - safety margin: fencing the session session=40 runner=r1 since_renewal=2.4s
2025-11-30T07:29:16.000000Z  WARN heartbeat failed error=timeout retry_in=500ms
2025-11-30T07:29:18.470000Z  INFO lease renewed: fence lifted session=40 runner=r1
2000-02-29T23:59:59.999999Z  WARN no successful heartbeat within ttl - safety margin: fencing the session session=41 runner=r1 since_renewal=2.4s
";
    let fences = fences_in(log);
    assert_eq!(fences.len(), 2, "{fences:?}");
    assert_eq!(fences[0].session, 40);
    assert!(
        (fences[0].at - 1_764_487_755.021_345).abs() < 1e-6,
        "{fences:?}"
    );
    assert!((fences[0].lifted.unwrap() - 1_764_487_758.47).abs() < 1e-6);
    assert_eq!(fences[1].session, 41);
    assert!(
        (fences[1].at - 951_868_799.999_999).abs() < 1e-6,
        "{fences:?}"
    );
    assert_eq!(fences[1].lifted, None);
}
