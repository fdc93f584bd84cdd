-- The worked example's task functions: migrations/template/0002_tasks.alwaysup.sql
-- filled in for public.example_task. Re-applied on every run.
--
-- The entry points (get_work, finish_tasks, held) are SECURITY DEFINER with a
-- pinned search_path, so a runtime role needs only EXECUTE on them; every
-- name inside is schema-qualified. EXECUTE on the rest is revoked from
-- PUBLIC: a runtime role cannot call pickup or release directly.

-- New tasks wake idle runners at once (LISTEN session_lock_example_task)
-- instead of waiting for their next tick. One notification per statement,
-- however many rows it inserts.
CREATE OR REPLACE FUNCTION public.example_task_notify()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('session_lock_example_task', '');
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER example_task_notify
    AFTER INSERT ON public.example_task
    FOR EACH STATEMENT EXECUTE FUNCTION public.example_task_notify();

-- ---------------------------------------------------------------------------
-- Filled-in template functions.
-- ---------------------------------------------------------------------------

-- Free tasks (open, held by no session), counting no further than p_limit.
-- ORDER BY the index's own order pins the plan to an index-only scan of the
-- (session_id IS NULL) range of example_task_open_idx: without it the
-- planner may pick a sequential scan when its statistics still say most
-- rows are open, and walk every finished row at the head of the table.
-- (Before the held counters, get_work counted all open tasks with
-- example_task_count.)
DROP FUNCTION IF EXISTS public.example_task_count(bigint);
CREATE OR REPLACE FUNCTION public.example_task_count_free(p_limit bigint)
RETURNS bigint
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN (SELECT count(*) FROM (
        SELECT 1 FROM public.example_task
         WHERE session_id IS NULL AND finished_at IS NULL
         ORDER BY session_id, id
         LIMIT p_limit) free_tasks);
END;
$$;

-- Open tasks held by one session.
CREATE OR REPLACE FUNCTION public.example_task_count_for_session(p_session bigint)
RETURNS integer
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN (SELECT count(*) FROM public.example_task
             WHERE session_id = p_session AND finished_at IS NULL);
END;
$$;

-- Assigns up to p_count open, unowned tasks to p_session, oldest first, and
-- returns how many. SKIP LOCKED: concurrent pickups take disjoint tasks
-- without waiting for each other. `id = ANY (ARRAY(...))` rather than a join
-- with the subquery: PL/pgSQL may switch to a generic plan after a few
-- calls, and the generic plan of the join scans the whole table (210 ms at
-- 1M rows), while this one stays a primary-key lookup. Ordering by (session_id, id), which within
-- session_id IS NULL is id order, makes the (session_id IS NULL) range of
-- example_task_open_idx the cheapest plan; ORDER BY id alone lets the planner
-- walk the primary key and filter, through every finished task.
CREATE OR REPLACE FUNCTION public.example_task_pickup(p_session bigint, p_count integer)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    v_count integer;
BEGIN
    UPDATE public.example_task
       SET session_id = p_session
     WHERE id = ANY (ARRAY(
               SELECT id FROM public.example_task
                WHERE session_id IS NULL AND finished_at IS NULL
                ORDER BY session_id, id
                LIMIT p_count
                  FOR UPDATE SKIP LOCKED))
       AND session_id IS NULL;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END;
$$;

-- Releases open tasks held by the given sessions: up to p_count of them
-- (newest first, so a session keeps the work it has had longest), or all of
-- them when p_count is NULL. Returns how many.
CREATE OR REPLACE FUNCTION public.example_task_release(p_sessions bigint[], p_count integer)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    v_count integer;
BEGIN
    UPDATE public.example_task
       SET session_id = NULL
     WHERE id = ANY (ARRAY(
               SELECT id FROM public.example_task
                WHERE session_id = ANY (p_sessions) AND finished_at IS NULL
                ORDER BY id DESC
                LIMIT p_count
                  FOR UPDATE));
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END;
$$;

-- The open tasks a session holds, as rows for the runner to scan.
CREATE OR REPLACE FUNCTION public.example_task_get_for_session(p_session bigint)
RETURNS SETOF public.example_task
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN QUERY
        SELECT * FROM public.example_task
         WHERE session_id = p_session AND finished_at IS NULL
         ORDER BY id;
END;
$$;

-- Marks finished those of p_ids that p_session still holds and returns their
-- ids. Tasks held by anyone else, or already finished, are left alone.
CREATE OR REPLACE FUNCTION public.example_task_finish(p_session bigint, p_ids bigint[])
RETURNS SETOF bigint
LANGUAGE plpgsql
AS $$
BEGIN
    RETURN QUERY
        UPDATE public.example_task
           SET finished_at = now(), finished_by = p_session
         WHERE id = ANY (p_ids)
           AND session_id = p_session
           AND finished_at IS NULL
        RETURNING id;
END;
$$;

-- Open tasks per holding session (NULL: unowned), for operators:
-- `session-lock status` reads it through session_lock.task_overview.
CREATE OR REPLACE FUNCTION public.example_task_held()
RETURNS TABLE (session_id bigint, tasks bigint)
LANGUAGE plpgsql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY
        SELECT t.session_id, count(*)
          FROM public.example_task t
         WHERE t.finished_at IS NULL
         GROUP BY t.session_id;
END;
$$;

-- ---------------------------------------------------------------------------
-- Entry points the runner calls. Same body as in the template: only the
-- names differ.
-- ---------------------------------------------------------------------------

-- Bumps the session (SL001 when it is lost), finishes p_finished (the
-- previous batch's completed tasks, so that a busy runner needs one call
-- per tick), reclaims the tasks of expired sessions of its name, moves the
-- session towards its fair share (picking up unowned tasks, or releasing
-- its surplus) and returns the tasks it holds.
-- (Before p_finished existed the function had three arguments; an old
-- three-argument version would make calls ambiguous.)
DROP FUNCTION IF EXISTS public.example_task_get_work(bigint, integer, interval);
CREATE OR REPLACE FUNCTION public.example_task_get_work(
    p_session bigint,
    p_max_tasks integer,
    p_ttl interval,
    p_finished bigint[] DEFAULT NULL
)
RETURNS SETOF public.example_task
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_begin record;
    v_bound bigint;
    v_open  bigint;
    v_ideal integer;
    v_held  integer;
    v_want  integer;
    v_got   integer;
BEGIN
    v_begin := session_lock.work_begin(p_session, p_max_tasks, p_ttl);
    -- The previous batch's completed tasks, finished in the same call and
    -- transaction: work_begin has just checked and locked the lease, so
    -- this finish is fenced like finish_tasks.
    IF cardinality(p_finished) > 0 THEN
        PERFORM public.example_task_finish(p_session, p_finished);
    END IF;
    IF cardinality(v_begin.reclaimed) > 0 THEN
        PERFORM public.example_task_release(v_begin.reclaimed, NULL);
    END IF;
    v_held := public.example_task_count_for_session(p_session);
    v_bound := v_begin.live_sessions::bigint * p_max_tasks;
    v_want := p_max_tasks - v_held;
    -- The share needs the open tasks up to v_bound (live sessions x
    -- max_tasks). When this session's tasks and the other live sessions'
    -- held counters leave at most v_want to find, the pickup is the count:
    -- if it gets all v_want, the open tasks reach the bound, the share is
    -- max_tasks, and the free tasks need no counting (during a drain, when
    -- the others hold their batches, this is every call).
    IF v_want > 0
       AND v_bound - v_held - v_begin.others_held <= v_want THEN
        v_got := public.example_task_pickup(p_session, v_want);
        v_held := v_held + v_got;
    END IF;
    -- Otherwise, or if that pickup came up short, count: this session's
    -- tasks, the other live sessions' by their held counters, and the free
    -- ones, only up to what is still missing. One statement, so the counters
    -- and the count share one snapshot (this session's own tasks only it
    -- can change). Then move to the share: release the surplus (also what a
    -- short pickup took beyond it) or pick up what is missing.
    IF v_got IS NULL OR v_got < v_want THEN
        SELECT v_held + o.held
               + CASE WHEN v_held + o.held < v_bound
                      THEN public.example_task_count_free(v_bound - v_held - o.held)
                      ELSE 0 END
          INTO v_open
          FROM session_lock.others_held(p_session) AS o(held);
        v_ideal := session_lock.fair_share(
            v_open, v_begin.live_sessions, v_begin.live_rank, p_max_tasks);
        IF v_held > v_ideal THEN
            v_held := v_held - public.example_task_release(ARRAY[p_session], v_held - v_ideal);
        ELSIF v_held < v_ideal THEN
            v_held := v_held + public.example_task_pickup(p_session, v_ideal - v_held);
        END IF;
    END IF;
    PERFORM session_lock.record_held(p_session, v_held);
    RETURN QUERY SELECT * FROM public.example_task_get_for_session(p_session);
END;
$$;

-- The fenced finish: raises SL001 when the session is lost, otherwise marks
-- finished those of p_ids the session still holds and returns their ids.
CREATE OR REPLACE FUNCTION public.example_task_finish_tasks(p_session bigint, p_ids bigint[])
RETURNS SETOF bigint
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM session_lock.lock_session(p_session);
    RETURN QUERY SELECT * FROM public.example_task_finish(p_session, p_ids);
    PERFORM session_lock.record_held(p_session, public.example_task_count_for_session(p_session));
END;
$$;

-- Least privilege (README): the runtime role may call the entry points only.
REVOKE EXECUTE ON FUNCTION
    public.example_task_notify(),
    public.example_task_count_free(bigint),
    public.example_task_count_for_session(bigint),
    public.example_task_pickup(bigint, integer),
    public.example_task_release(bigint[], integer),
    public.example_task_get_for_session(bigint),
    public.example_task_finish(bigint, bigint[]),
    public.example_task_held(),
    public.example_task_get_work(bigint, integer, interval, bigint[]),
    public.example_task_finish_tasks(bigint, bigint[])
FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'session_lock_runtime') THEN
        GRANT EXECUTE ON FUNCTION
            public.example_task_get_work(bigint, integer, interval, bigint[]),
            public.example_task_finish_tasks(bigint, bigint[]),
            public.example_task_held()
        TO session_lock_runtime;
    END IF;
END;
$$;
