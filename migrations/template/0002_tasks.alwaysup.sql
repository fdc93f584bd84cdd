-- session-lock task template, part 2 of 2: re-applied on every run.
--
-- Copy this file next to part 1 and follow the TODOs: each function below has
-- a placeholder body that raises SQLSTATE SL002 naming itself, and a complete
-- example body in the comment above it, written for a table
--     my_task(id BIGINT PRIMARY KEY, session_id BIGINT, finished_at TIMESTAMPTZ, ...)
-- whose open tasks are those with finished_at IS NULL. Replace my_task with
-- your table's name everywhere, in the function names too. Keep the
-- signatures: the entry points at the end call these functions by them.
--
-- The rules every body must keep (the protocol's guarantees rest on them):
--   * only open tasks are counted, picked up, released or returned;
--   * pickup takes only tasks with session_id IS NULL, with FOR UPDATE SKIP
--     LOCKED, so concurrent sessions take disjoint tasks without waiting;
--   * finish touches only tasks whose session_id is the calling session.
-- PL/pgSQL is used throughout because it caches the plans of its queries.
--
-- Privileges: the entry points (get_work, finish_tasks, held) are SECURITY
-- DEFINER, so the role that runs your service needs only EXECUTE on them
-- (README: least privilege). Their search_path is pinned to
-- `pg_catalog, public, pg_temp`: if your table lives in another schema, put
-- that schema where `public` is (or schema-qualify every name).

-- TODO(session-lock): fill in my_task_count_free.
-- The number of free tasks (open, held by no session), counting no further
-- than p_limit. get_work asks only for as many as its share could still
-- need, so a bounded count stays cheap at any backlog.
-- Example body:
--     RETURN (SELECT count(*) FROM (
--         SELECT 1 FROM my_task
--          WHERE session_id IS NULL AND finished_at IS NULL
--          ORDER BY session_id, id LIMIT p_limit) free_tasks);
CREATE OR REPLACE FUNCTION my_task_count_free(p_limit bigint)
RETURNS bigint
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RAISE EXCEPTION 'task template function my_task_count_free is not filled in'
        USING ERRCODE = 'SL002', HINT = 'Follow the TODO(session-lock) above it in the task template.';
END;
$$;

-- TODO(session-lock): fill in my_task_count_for_session.
-- The number of open tasks held by p_session.
-- Example body:
--     RETURN (SELECT count(*) FROM my_task
--              WHERE session_id = p_session AND finished_at IS NULL);
CREATE OR REPLACE FUNCTION my_task_count_for_session(p_session bigint)
RETURNS integer
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RAISE EXCEPTION 'task template function my_task_count_for_session is not filled in'
        USING ERRCODE = 'SL002', HINT = 'Follow the TODO(session-lock) above it in the task template.';
END;
$$;

-- TODO(session-lock): fill in my_task_pickup.
-- Assigns up to p_count open, unowned tasks to p_session and returns how many.
-- Example body (oldest first):
--     UPDATE my_task
--        SET session_id = p_session
--      WHERE id = ANY (ARRAY(
--                SELECT id FROM my_task
--                 WHERE session_id IS NULL AND finished_at IS NULL
--                 ORDER BY session_id, id
--                 LIMIT p_count
--                   FOR UPDATE SKIP LOCKED))
--        AND session_id IS NULL;
--   (Keep the `id = ANY (ARRAY(...))` shape: a join with the subquery gets a
--   generic plan that scans the whole table.)
--     GET DIAGNOSTICS v_count = ROW_COUNT;
--     RETURN v_count;
CREATE OR REPLACE FUNCTION my_task_pickup(p_session bigint, p_count integer)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    v_count integer;
BEGIN
    RAISE EXCEPTION 'task template function my_task_pickup is not filled in'
        USING ERRCODE = 'SL002', HINT = 'Follow the TODO(session-lock) above it in the task template.';
END;
$$;

-- TODO(session-lock): fill in my_task_release.
-- Releases (sets session_id to NULL) open tasks held by any of p_sessions: up
-- to p_count of them, or all when p_count is NULL. Returns how many. Used to
-- give back a session's surplus when others join, and to free the tasks of
-- sessions that expired.
-- Example body (newest first, so a session keeps what it has had longest):
--     UPDATE my_task
--        SET session_id = NULL
--      WHERE id = ANY (ARRAY(
--                SELECT id FROM my_task
--                 WHERE session_id = ANY (p_sessions) AND finished_at IS NULL
--                 ORDER BY id DESC
--                 LIMIT p_count
--                   FOR UPDATE));
--     GET DIAGNOSTICS v_count = ROW_COUNT;
--     RETURN v_count;
CREATE OR REPLACE FUNCTION my_task_release(p_sessions bigint[], p_count integer)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    v_count integer;
BEGIN
    RAISE EXCEPTION 'task template function my_task_release is not filled in'
        USING ERRCODE = 'SL002', HINT = 'Follow the TODO(session-lock) above it in the task template.';
END;
$$;

-- TODO(session-lock): fill in my_task_get_for_session.
-- The open tasks p_session holds: these rows are what your ScanTask reads.
-- Example body:
--     RETURN QUERY
--         SELECT * FROM my_task
--          WHERE session_id = p_session AND finished_at IS NULL
--          ORDER BY id;
CREATE OR REPLACE FUNCTION my_task_get_for_session(p_session bigint)
RETURNS SETOF my_task
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RAISE EXCEPTION 'task template function my_task_get_for_session is not filled in'
        USING ERRCODE = 'SL002', HINT = 'Follow the TODO(session-lock) above it in the task template.';
END;
$$;

-- TODO(session-lock): fill in my_task_finish.
-- Marks finished those of p_ids that p_session still holds, and returns their
-- ids. Never touch a task held by another session.
-- Example body:
--     RETURN QUERY
--         UPDATE my_task
--            SET finished_at = now()
--          WHERE id = ANY (p_ids)
--            AND session_id = p_session
--            AND finished_at IS NULL
--         RETURNING id;
CREATE OR REPLACE FUNCTION my_task_finish(p_session bigint, p_ids bigint[])
RETURNS SETOF bigint
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'task template function my_task_finish is not filled in'
        USING ERRCODE = 'SL002', HINT = 'Follow the TODO(session-lock) above it in the task template.';
END;
$$;

-- TODO(session-lock): fill in my_task_held.
-- Open tasks per holding session (NULL: unowned), for operators:
-- `session-lock status --held my_task_held` reads it through
-- session_lock.task_overview.
-- Example body:
--     RETURN QUERY
--         SELECT t.session_id, count(*)
--           FROM my_task t
--          WHERE t.finished_at IS NULL
--          GROUP BY t.session_id;
CREATE OR REPLACE FUNCTION my_task_held()
RETURNS TABLE (session_id bigint, tasks bigint)
LANGUAGE plpgsql STABLE
SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'task template function my_task_held is not filled in'
        USING ERRCODE = 'SL002', HINT = 'Follow the TODO(session-lock) above it in the task template.';
END;
$$;

-- ---------------------------------------------------------------------------
-- Entry points the runner calls. Do not change their bodies: they are the
-- protocol. Only rename my_task.
-- ---------------------------------------------------------------------------

-- TODO(session-lock): rename my_task in the two entry points below.
-- Bumps the session (SL001 when it is lost), finishes p_finished (the
-- previous batch's completed tasks, so that a busy runner needs one call
-- per tick), reclaims the tasks of expired sessions of its name, moves the
-- session towards its fair share (picking up
-- unowned tasks, or releasing its surplus) and returns the tasks it holds.
-- (Before p_finished existed the function had three arguments; an old
-- three-argument version would make calls ambiguous.)
DROP FUNCTION IF EXISTS my_task_get_work(bigint, integer, interval);
CREATE OR REPLACE FUNCTION my_task_get_work(
    p_session bigint,
    p_max_tasks integer,
    p_ttl interval,
    p_finished bigint[] DEFAULT NULL
)
RETURNS SETOF my_task
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
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
        PERFORM my_task_finish(p_session, p_finished);
    END IF;
    IF cardinality(v_begin.reclaimed) > 0 THEN
        PERFORM my_task_release(v_begin.reclaimed, NULL);
    END IF;
    v_held := my_task_count_for_session(p_session);
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
        v_got := my_task_pickup(p_session, v_want);
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
                      THEN my_task_count_free(v_bound - v_held - o.held)
                      ELSE 0 END
          INTO v_open
          FROM session_lock.others_held(p_session) AS o(held);
        v_ideal := session_lock.fair_share(
            v_open, v_begin.live_sessions, v_begin.live_rank, p_max_tasks);
        IF v_held > v_ideal THEN
            v_held := v_held - my_task_release(ARRAY[p_session], v_held - v_ideal);
        ELSIF v_held < v_ideal THEN
            v_held := v_held + my_task_pickup(p_session, v_ideal - v_held);
        END IF;
    END IF;
    PERFORM session_lock.record_held(p_session, v_held);
    RETURN QUERY SELECT * FROM my_task_get_for_session(p_session);
END;
$$;

-- The fenced finish: raises SL001 when the session is lost, otherwise marks
-- finished those of p_ids the session still holds and returns their ids.
CREATE OR REPLACE FUNCTION my_task_finish_tasks(p_session bigint, p_ids bigint[])
RETURNS SETOF bigint
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    PERFORM session_lock.lock_session(p_session);
    RETURN QUERY SELECT * FROM my_task_finish(p_session, p_ids);
    PERFORM session_lock.record_held(p_session, my_task_count_for_session(p_session));
END;
$$;

-- TODO(session-lock): rename my_task in the privileges below.
-- Least privilege (README): nobody may call these but the owner, except the
-- entry points, granted to session_lock_runtime when that role exists.
REVOKE EXECUTE ON FUNCTION
    my_task_count_free(bigint),
    my_task_count_for_session(bigint),
    my_task_pickup(bigint, integer),
    my_task_release(bigint[], integer),
    my_task_get_for_session(bigint),
    my_task_finish(bigint, bigint[]),
    my_task_held(),
    my_task_get_work(bigint, integer, interval, bigint[]),
    my_task_finish_tasks(bigint, bigint[])
FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'session_lock_runtime') THEN
        GRANT EXECUTE ON FUNCTION
            my_task_get_work(bigint, integer, interval, bigint[]),
            my_task_finish_tasks(bigint, bigint[]),
            my_task_held()
        TO session_lock_runtime;
    END IF;
END;
$$;
