//! A scripted, in-memory [`Database`] for unit tests of the runtime's
//! timing (the way bb8 tests its pool against fake managers): the
//! protocol's bookkeeping in a few maps, faults a test queues for a call
//! (fail, hang, answer late), rows "someone else" has locked, a log of
//! every call, and a notification channel the test fires.
//!
//! What it keeps true, so the runtime can be checked against it: a session
//! is live until it is ended or expired by the test; a call for a session
//! that is not live fails with `SessionLost`; a finish counts only tasks the
//! session holds and nobody has locked. Shares are not modelled: get_work
//! tops a session up to its capacity.

use std::any::Any;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::store::{
    Database, DatabaseId, DbFinder, GetWork, Listener, Session, SessionId, SessionStart,
    SessionToken, Work,
};
use crate::task::{ScanTask, Task, TaskId, TaskQueries};

/// The only task type the scripted database returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TestTask {
    pub(crate) id: TaskId,
}

impl Task for TestTask {
    fn id(&self) -> TaskId {
        if self.id == POISONED {
            panic!("task {} cannot say its id", self.id);
        }
        self.id
    }
}

/// A task whose `Task::id` panics.
pub(crate) const POISONED: TaskId = 666;

impl ScanTask for TestTask {
    const QUERIES: TaskQueries = crate::task_queries!("scripted_task");

    fn scan(_: &tokio_postgres::Row) -> std::result::Result<Self, crate::error::ScanError> {
        unreachable!("the scripted database never returns rows")
    }
}

/// The calls of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Identity,
    Start,
    Bump,
    End,
    GetWork,
    Finish,
    Fail,
    Reap,
}

/// What a queued fault does to the next call of its method.
pub(crate) enum Fault {
    /// Fails with the error made by the closure.
    Fail(Box<dyn Fn() -> Error + Send>),
    /// Answers after the delay (then as usual).
    Delay(Duration),
}

impl Fault {
    /// A transient failure (as a dropped connection would be).
    pub(crate) fn transient() -> Fault {
        Fault::Fail(Box::new(|| Error::Timeout(Duration::from_millis(1))))
    }
}

/// One call, as the database saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Call {
    pub(crate) method: Method,
    pub(crate) session: Option<SessionId>,
    pub(crate) ids: Vec<TaskId>,
}

#[derive(Debug, Clone)]
pub(crate) struct Sess {
    pub(crate) token: SessionToken,
    pub(crate) capacity: u32,
    pub(crate) live: bool,
    pub(crate) ended: bool,
}

#[derive(Default)]
pub(crate) struct State {
    next_session: SessionId,
    pub(crate) sessions: BTreeMap<SessionId, Sess>,
    /// Open tasks and their holders.
    pub(crate) tasks: BTreeMap<TaskId, Option<SessionId>>,
    /// Finished tasks and who finished them.
    pub(crate) finished: Vec<(TaskId, SessionId)>,
    /// Tasks given back as failed, and by whom.
    pub(crate) given_back: Vec<(TaskId, SessionId)>,
    /// Rows someone else holds a lock on: a finish leaves them be.
    pub(crate) locked: HashSet<TaskId>,
    pub(crate) calls: Vec<Call>,
    /// What each get_work named as known (`GetWork::known`), in order.
    pub(crate) known: Vec<Option<Vec<TaskId>>>,
    faults: Vec<(Method, VecDeque<Fault>)>,
    /// Every later call of these methods fails (transiently).
    pub(crate) failing: HashSet<MethodKey>,
    notify: Option<tokio::sync::mpsc::Sender<()>>,
}

/// [`Method`] as a set key.
pub(crate) type MethodKey = u8;

fn key(m: Method) -> MethodKey {
    m as u8
}

/// The scripted database. Cheap to clone; clones share the state.
#[derive(Clone)]
pub(crate) struct ScriptedDb {
    identity: DatabaseId,
    state: Arc<Mutex<State>>,
}

impl ScriptedDb {
    /// An empty database called `identity` with `tasks` open tasks (ids 1..).
    pub(crate) fn new(identity: &str, tasks: usize) -> Self {
        let mut state = State {
            next_session: 1,
            ..State::default()
        };
        for id in 1..=tasks as TaskId {
            state.tasks.insert(id, None);
        }
        ScriptedDb {
            identity: DatabaseId(identity.to_owned()),
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// Reads or changes the state.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Queues `fault` for the next call of `method`.
    pub(crate) fn fault(&self, method: Method, fault: Fault) {
        self.with(|s| match s.faults.iter_mut().find(|(m, _)| *m == method) {
            Some((_, q)) => q.push_back(fault),
            None => s.faults.push((method, VecDeque::from([fault]))),
        });
    }

    /// Makes every later call of `method` fail transiently (or not).
    pub(crate) fn failing(&self, method: Method, on: bool) {
        self.with(|s| {
            if on {
                s.failing.insert(key(method));
            } else {
                s.failing.remove(&key(method));
            }
        });
    }

    /// Fires a notification on the LISTEN channel, if anyone listens.
    pub(crate) fn notify(&self) {
        if let Some(tx) = self.with(|s| s.notify.clone()) {
            let _ = tx.try_send(());
        }
    }

    /// The calls of `method` so far.
    pub(crate) fn calls(&self, method: Method) -> Vec<Call> {
        self.with(|s| {
            s.calls
                .iter()
                .filter(|c| c.method == method)
                .cloned()
                .collect()
        })
    }

    /// Records the call, then applies its fault, if one is queued.
    async fn enter(
        &self,
        method: Method,
        session: Option<SessionId>,
        ids: &[TaskId],
    ) -> Result<()> {
        let fault = self.with(|s| {
            s.calls.push(Call {
                method,
                session,
                ids: ids.to_vec(),
            });
            if s.failing.contains(&key(method)) {
                return Some(Fault::transient());
            }
            s.faults
                .iter_mut()
                .find(|(m, _)| *m == method)
                .and_then(|(_, q)| q.pop_front())
        });
        match fault {
            None => Ok(()),
            Some(Fault::Fail(make)) => Err(make()),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
        }
    }

    fn live(s: &State, session: &Session) -> Result<()> {
        match s.sessions.get(&session.id) {
            Some(sess) if sess.live && sess.token == session.token => Ok(()),
            _ => Err(Error::SessionLost {
                session: session.id,
            }),
        }
    }

    /// Finishes those of `ids` the session holds and nobody has locked.
    fn finish(s: &mut State, session: SessionId, ids: &[TaskId]) -> Vec<TaskId> {
        let mut done = Vec::new();
        for id in ids {
            if s.tasks.get(id) == Some(&Some(session)) && !s.locked.contains(id) {
                s.tasks.remove(id);
                s.finished.push((*id, session));
                done.push(*id);
            }
        }
        done
    }
}

fn downcast<T: ScanTask>(task: TestTask) -> T {
    *(Box::new(task) as Box<dyn Any>)
        .downcast::<T>()
        .unwrap_or_else(|_| panic!("the scripted database serves TestTask only"))
}

impl Database for ScriptedDb {
    async fn database_identity(&self) -> Result<DatabaseId> {
        self.enter(Method::Identity, None, &[]).await?;
        Ok(self.identity.clone())
    }

    async fn start_session(&self, params: &SessionStart) -> Result<Session> {
        self.enter(Method::Start, None, &[]).await?;
        Ok(self.with(|s| {
            let id = s.next_session;
            s.next_session += 1;
            let token = SessionToken(fastrand::u128(..).to_le_bytes());
            s.sessions.insert(
                id,
                Sess {
                    token,
                    capacity: params.capacity,
                    live: true,
                    ended: false,
                },
            );
            Session { id, token }
        }))
    }

    async fn bump_session(&self, session: &Session, _ttl: Duration) -> Result<()> {
        self.enter(Method::Bump, Some(session.id), &[]).await?;
        self.with(|s| Self::live(s, session))
    }

    async fn end_session(&self, session: &Session) -> Result<bool> {
        self.enter(Method::End, Some(session.id), &[]).await?;
        Ok(self.with(|s| {
            if Self::live(s, session).is_err() {
                return false;
            }
            if let Some(sess) = s.sessions.get_mut(&session.id) {
                sess.live = false;
                sess.ended = true;
            }
            for holder in s.tasks.values_mut() {
                if *holder == Some(session.id) {
                    *holder = None;
                }
            }
            true
        }))
    }

    async fn get_work<T: ScanTask>(&self, params: GetWork<'_>) -> Result<Work<T>> {
        let session = params.session.id;
        self.with(|s| s.known.push(params.known.map(<[TaskId]>::to_vec)));
        self.enter(Method::GetWork, Some(session), params.finished)
            .await?;
        let (finished, held) = self.with(|s| {
            Self::live(s, params.session)?;
            let finished = Self::finish(s, session, params.finished);
            let capacity = s.sessions[&session].capacity as usize;
            let mut held: Vec<TaskId> = s
                .tasks
                .iter()
                .filter(|(_, h)| **h == Some(session))
                .map(|(id, _)| *id)
                .collect();
            for (id, holder) in s.tasks.iter_mut() {
                if held.len() >= capacity {
                    break;
                }
                if holder.is_none() {
                    *holder = Some(session);
                    held.push(*id);
                }
            }
            held.sort_unstable();
            Ok::<_, Error>((finished, held))
        })?;
        Ok(Work {
            finished,
            tasks: held
                .into_iter()
                .map(|id| downcast(TestTask { id }))
                .collect(),
            unreadable: Vec::new(),
        })
    }

    async fn finish_tasks<T: ScanTask>(
        &self,
        session: &Session,
        ids: &[TaskId],
    ) -> Result<Vec<TaskId>> {
        self.enter(Method::Finish, Some(session.id), ids).await?;
        self.with(|s| {
            Self::live(s, session)?;
            Ok(Self::finish(s, session.id, ids))
        })
    }

    async fn fail_tasks<T: ScanTask>(
        &self,
        session: &Session,
        ids: &[TaskId],
    ) -> Result<Vec<TaskId>> {
        self.enter(Method::Fail, Some(session.id), ids).await?;
        self.with(|s| {
            Self::live(s, session)?;
            let mut given = Vec::new();
            for id in ids {
                if s.tasks.get(id) == Some(&Some(session.id)) && !s.locked.contains(id) {
                    s.tasks.insert(*id, None);
                    s.given_back.push((*id, session.id));
                    given.push(*id);
                }
            }
            Ok(given)
        })
    }

    async fn reap_sessions(&self, _older_than: Duration) -> Result<u64> {
        self.enter(Method::Reap, None, &[]).await?;
        Ok(0)
    }

    async fn listen(&self, _channel: &'static str) -> Result<Option<Listener>> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        self.with(|s| s.notify = Some(tx));
        Ok(Some(Listener::new(None, rx)))
    }
}

/// A DbFinder whose database the test can swap, as a real one might move.
#[derive(Clone)]
pub(crate) struct ScriptedFinder(Arc<Mutex<ScriptedDb>>);

impl ScriptedFinder {
    pub(crate) fn new(db: ScriptedDb) -> Self {
        ScriptedFinder(Arc::new(Mutex::new(db)))
    }

    /// From now on, `find` returns `db`.
    pub(crate) fn move_to(&self, db: ScriptedDb) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = db;
    }
}

impl DbFinder for ScriptedFinder {
    type Db = ScriptedDb;

    fn find(&self) -> impl Future<Output = Result<ScriptedDb>> + Send {
        let db = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        async move { Ok(db) }
    }
}
