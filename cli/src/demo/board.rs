//! The live board: what the demo shows while it runs, and where its words
//! go. Narration and progress go to stdout, or to stderr with `--json`, so
//! that stdout carries the summary alone. On a terminal an overall bar and a
//! bar per session, redrawn from each snapshot of the database, with the
//! narration printed above them; elsewhere a plain line a second. The bars
//! stay on screen when the demo ends.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{self, IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use session_lock_testkit::Fleet;

use super::db::Snapshot;
use super::{Fresh, Kill, REFRESH, secs};

/// How often a plain progress line is printed when output is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(1);
/// Width of the progress bars.
const BAR_WIDTH: usize = 26;

/// Where narration and progress go: stdout, or stderr with `--json`; bars
/// when that stream is a terminal, plain lines otherwise.
#[derive(Clone)]
pub(super) struct Out {
    to_stderr: bool,
    pub(super) multi: Option<MultiProgress>,
}

impl Out {
    pub(super) fn new(json: bool) -> Out {
        let term = if json {
            io::stderr().is_terminal()
        } else {
            io::stdout().is_terminal()
        } && std::env::var("TERM").map_or(true, |t| t != "dumb");
        let multi = term.then(|| {
            MultiProgress::with_draw_target(if json {
                ProgressDrawTarget::stderr_with_hz(10)
            } else {
                ProgressDrawTarget::stdout_with_hz(10)
            })
        });
        Out {
            to_stderr: json,
            multi,
        }
    }

    /// The same stream, without bars.
    pub(super) fn plain(&self) -> Out {
        Out {
            to_stderr: self.to_stderr,
            multi: None,
        }
    }

    /// A line of narration, above the bars if there are any.
    pub(super) fn say(&self, msg: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(msg);
            }
            None => self.line(msg),
        }
    }

    /// A line straight to the stream.
    pub(super) fn line(&self, msg: &str) {
        if self.to_stderr {
            let _ = writeln!(io::stderr().lock(), "{msg}");
        } else {
            let _ = writeln!(io::stdout().lock(), "{msg}");
        }
    }
}

/// The live view: an overall bar and one bar per session, or a plain line
/// per second.
pub(super) struct Board {
    pub(super) out: Out,
    total: u64,
    overall: Option<ProgressBar>,
    bars: BTreeMap<i64, ProgressBar>,
    seeded: Option<Instant>,
    last_plain: Option<Instant>,
}

impl Board {
    pub(super) fn new(out: &Out, total: u32) -> Board {
        Board {
            out: out.clone(),
            total: u64::from(total),
            overall: None,
            bars: BTreeMap::new(),
            seeded: None,
            last_plain: None,
        }
    }

    pub(super) fn start(&mut self, seeded: Instant) {
        self.seeded = Some(seeded);
        if let Some(multi) = &self.out.multi {
            let style = ProgressStyle::with_template(&format!(
                "{{prefix:<10}} [{{bar:{BAR_WIDTH}.green}}] {{pos:>6}}/{{len}} {{percent:>3}}%  {{wide_msg}}"
            ))
            .expect("a valid template")
            .progress_chars("█▉▊▋▌▍▎▏ ");
            let bar = ProgressBar::new(self.total)
                .with_style(style)
                .with_prefix("all tasks");
            // Above the session bars, whenever they were added.
            self.overall = Some(multi.insert(0, bar));
        }
    }

    pub(super) fn add_session(&mut self, session: i64, pid: u32, fresh: bool) {
        let Some(multi) = &self.out.multi else {
            return;
        };
        let style = ProgressStyle::with_template(&format!(
            "{{prefix:<10}} [{{bar:{BAR_WIDTH}.cyan/blue}}] {{pos:>6}} done  {{wide_msg}}"
        ))
        .expect("a valid template")
        .progress_chars("█▉▊▋▌▍▎▏ ");
        let bar = multi.add(
            ProgressBar::new(self.total)
                .with_style(style)
                .with_prefix(format!("session {session}"))
                .with_message(format!("pid {pid}{}", if fresh { ", joined" } else { "" })),
        );
        bar.tick();
        self.bars.insert(session, bar);
    }

    pub(super) fn update(
        &mut self,
        snap: &Snapshot,
        fleet: &Fleet,
        kill: Option<&Kill>,
        fresh: Option<&Fresh>,
        stage: Stage,
    ) {
        let Some(seeded) = self.seeded else {
            return;
        };
        let last = stage != Stage::Running;
        let elapsed = seeded.elapsed();
        let rate = snap.finished as f64 / elapsed.as_secs_f64().max(0.001);
        let status = |session: i64| -> String {
            let runner = fleet.announced_by(session);
            let pid = runner.map_or("pid ?".into(), |p| format!("pid {}", p.pid()));
            if let Some(k) = kill.filter(|k| k.session == session) {
                return match k.failover {
                    None => format!("KILLED {pid}, holds {}", snap.held(session)),
                    Some(f) => format!("KILLED; failover {}", secs(f)),
                };
            }
            match runner {
                Some(p) if p.sessions().last() != Some(&session) => {
                    format!("{pid} lost this session")
                }
                Some(_) if stage == Stage::Terminated => format!("{pid} ended (SIGTERM)"),
                Some(p) if last || !p.is_alive() => format!("{pid} stopped"),
                Some(p) if fresh.is_some_and(|f| f.pid == p.pid()) => {
                    format!("{pid} holds {:>2} (fresh)", snap.held(session))
                }
                _ => format!("{pid} holds {:>2}", snap.held(session)),
            }
        };
        if self.out.multi.is_some() {
            if let Some(bar) = &self.overall {
                bar.set_position(snap.finished);
                bar.set_message(format!("{rate:.0} tasks/s, {} open", snap.open));
            }
            for (&session, bar) in &self.bars {
                bar.set_position(snap.done_by(session));
                bar.set_message(status(session));
            }
            return;
        }
        let due = self
            .last_plain
            .is_none_or(|t| t.elapsed() >= PLAIN_EVERY - REFRESH / 2);
        if !(due || last) {
            return;
        }
        self.last_plain = Some(Instant::now());
        let mut line = format!(
            "{:>6.1}s  finished {}/{} ({:.0}%), {rate:.0} tasks/s; per session, done (held):",
            elapsed.as_secs_f64(),
            snap.finished,
            self.total,
            100.0 * snap.finished as f64 / self.total.max(1) as f64,
        );
        let mut sessions: BTreeSet<i64> = fleet.sessions().collect();
        sessions.extend(snap.held.keys());
        for s in sessions {
            let mark = if kill.is_some_and(|k| k.session == s) {
                " KILLED"
            } else {
                ""
            };
            let _ = write!(line, "  s{s} {} ({}){mark}", snap.done_by(s), snap.held(s));
        }
        self.out.line(&line);
    }

    /// Leaves the bars on screen as last drawn, never to be redrawn.
    pub(super) fn freeze(&mut self) {
        if let Some(multi) = &self.out.multi {
            multi.set_draw_target(ProgressDrawTarget::hidden());
        }
    }

    /// Leaves the bars on screen, finished.
    pub(super) fn finish(&mut self) {
        if let Some(bar) = &self.overall {
            bar.abandon();
        }
        for bar in self.bars.values() {
            bar.abandon();
        }
    }
}

/// Where the demo is, for what the board says of a runner no longer
/// running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// The runners run: a live update.
    Running,
    /// The last update, the runners killed (the demo failed before it could
    /// stop them).
    Killed,
    /// The last update, the runners stopped with SIGTERM.
    Terminated,
}
