-- session-lock standard functions. Re-applied on every run (a *.alwaysup.sql
-- file): edit freely, every statement must be safe to repeat.
--
-- Error codes raised here (the Rust store turns them into typed errors):
--   SL001  the session is missing, expired, ended or reclaimed: stop using it
--          and its tasks, start a new session;
--   SL002  a task-template function still has its placeholder body;
--   SL003  an argument is out of range.
--
-- Privileges. The functions a runner calls directly (start, bump, end,
-- reap) are SECURITY DEFINER with a pinned search_path: a runtime role
-- needs only EXECUTE on them, never access to the tables. EXECUTE is revoked
-- from PUBLIC on every function here and granted, at the end of this file,
-- to the role session_lock_runtime when it exists (README: least privilege).
-- task_overview stays with the caller's rights: it calls the function it is
-- given, which must never run with the owner's.
--
-- Concurrency, in one paragraph. A task belongs to the session in its
-- session_id column, so it can never be held by two sessions at once; the
-- question is only whether a session may still *act* on what it holds. A
-- session may act while its row is live: not expired, not ended, not
-- reclaimed. Every function that acts for a session first locks that
-- session's row (bump: UPDATE; finish: FOR NO KEY UPDATE) and checks
-- it is live, and a survivor reclaims an expired session only by locking its
-- row (FOR UPDATE SKIP LOCKED) and stamping reclaimed_at in the same
-- transaction that releases its tasks. Whichever transaction locks the row
-- first wins; the loser re-checks the row as the winner left it, so a bump
-- or a finish can never interleave with a reclaim. Expiry is monotonic: an
-- expired session can never be bumped again, it can only be replaced.

CREATE OR REPLACE FUNCTION session_lock.check_ttl(p_ttl interval)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_ttl IS NULL OR p_ttl <= interval '0' OR p_ttl > interval '1 day' THEN
        RAISE EXCEPTION 'session ttl % is out of range: it must be more than 0 and at most 1 day', p_ttl
            USING ERRCODE = 'SL003';
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION session_lock.check_max_tasks(p_max integer)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_max IS NULL OR p_max < 1 OR p_max > 10000 THEN
        RAISE EXCEPTION 'max_tasks % is out of range: it must be between 1 and 10000', p_max
            USING ERRCODE = 'SL003';
    END IF;
END;
$$;

-- Starts a session for the runner called p_name and returns its id. host and
-- pid identify the process for operators; host defaults to the client's
-- address.
CREATE OR REPLACE FUNCTION session_lock.start_session(
    p_name text,
    p_ttl  interval,
    p_host text DEFAULT NULL,
    p_pid  integer DEFAULT NULL
)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
BEGIN
    IF p_name IS NULL OR p_name = '' OR length(p_name) > 200 THEN
        RAISE EXCEPTION 'session name % is invalid: it must be 1 to 200 characters', quote_nullable(p_name)
            USING ERRCODE = 'SL003';
    END IF;
    PERFORM session_lock.check_ttl(p_ttl);
    INSERT INTO session_lock.session (name, host, pid, expires_at)
    VALUES (p_name,
            coalesce(p_host, host(inet_client_addr()), 'local'),
            coalesce(p_pid, 0),
            now() + p_ttl)
    RETURNING id INTO v_id;
    RETURN v_id;
END;
$$;

-- Extends a live session's lease to now() + p_ttl and returns the new expiry.
-- Raises SL001 when the session is missing, expired, ended or reclaimed.
CREATE OR REPLACE FUNCTION session_lock.bump_session(p_session bigint, p_ttl interval)
RETURNS timestamptz
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_expires timestamptz;
BEGIN
    PERFORM session_lock.check_ttl(p_ttl);
    UPDATE session_lock.session
       SET bumped_at = now(), expires_at = now() + p_ttl
     WHERE id = p_session
       AND expires_at > now()
       AND ended_at IS NULL
       AND reclaimed_at IS NULL
    RETURNING expires_at INTO v_expires;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'session % is lost: missing, expired, ended or reclaimed', p_session
            USING ERRCODE = 'SL001';
    END IF;
    RETURN v_expires;
END;
$$;

-- Gives the lease back: the session expires at once, and its tasks are
-- reclaimed by the other sessions of its name on their next get_work.
-- Idempotent: returns false when the session was already over or missing.
CREATE OR REPLACE FUNCTION session_lock.end_session(p_session bigint)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE session_lock.session
       SET ended_at = now(), expires_at = least(expires_at, now())
     WHERE id = p_session
       AND ended_at IS NULL
       AND reclaimed_at IS NULL;
    RETURN FOUND;
END;
$$;

-- Locks a live session's row against reclaim for the rest of the transaction
-- and returns its name. Raises SL001 when the session is not live. A fenced
-- finish calls this before touching any task. FOR NO KEY UPDATE, the lock
-- an UPDATE of the row takes, because the finish ends by recording the
-- session's new held count: taking a weaker lock first and upgrading it
-- would let two finishes of one session deadlock.
CREATE OR REPLACE FUNCTION session_lock.lock_session(p_session bigint)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    v_name text;
BEGIN
    SELECT name INTO v_name
      FROM session_lock.session
     WHERE id = p_session
       AND expires_at > now()
       AND ended_at IS NULL
       AND reclaimed_at IS NULL
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'session % is lost: missing, expired, ended or reclaimed', p_session
            USING ERRCODE = 'SL001';
    END IF;
    RETURN v_name;
END;
$$;

-- The first half of every get_work, independent of the task table:
--   1. bumps the calling session (SL001 when it is not live);
--   2. reclaims the expired sessions of the same name that nobody else is
--      reclaiming right now, returning their ids: the caller must release
--      their tasks in the same transaction;
--   3. counts the live sessions of the name (the caller included), and
--      ranks the caller among them by id, for fair_share, and sums the
--      other live sessions' held counters from the same rows (others_held:
--      enough to decide whether a pickup can stand in for the count; the
--      count itself rereads them with session_lock.others_held, in its own
--      statement's snapshot).
-- Sessions of other names are never read or locked, so runners of different
-- names never wait on each other.
-- (Earlier versions had no live_rank, then no others_held; a function's
-- result type cannot be replaced, only dropped.)
DO $$
BEGIN
    IF EXISTS (SELECT 1
                 FROM pg_catalog.pg_proc p
                 JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
                WHERE n.nspname = 'session_lock' AND p.proname = 'work_begin'
                  AND NOT ('others_held' = ANY (p.proargnames))) THEN
        DROP FUNCTION session_lock.work_begin(bigint, integer, interval);
    END IF;
END;
$$;
CREATE OR REPLACE FUNCTION session_lock.work_begin(
    p_session   bigint,
    p_max_tasks integer,
    p_ttl       interval,
    OUT live_sessions integer,
    OUT live_rank integer,
    OUT reclaimed bigint[],
    OUT others_held bigint
)
LANGUAGE plpgsql
AS $$
DECLARE
    v_name text;
BEGIN
    PERFORM session_lock.check_max_tasks(p_max_tasks);
    PERFORM session_lock.check_ttl(p_ttl);

    UPDATE session_lock.session
       SET bumped_at = now(), expires_at = now() + p_ttl
     WHERE id = p_session
       AND expires_at > now()
       AND ended_at IS NULL
       AND reclaimed_at IS NULL
    RETURNING name INTO v_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'session % is lost: missing, expired, ended or reclaimed', p_session
            USING ERRCODE = 'SL001';
    END IF;

    -- SKIP LOCKED: a row locked by its own bump is live, one locked by
    -- another reclaimer is being handled; either way, not ours to wait for.
    WITH dead AS (
        SELECT id
          FROM session_lock.session
         WHERE name = v_name
           AND reclaimed_at IS NULL
           AND expires_at <= now()
         ORDER BY id
           FOR UPDATE SKIP LOCKED
    ), stamped AS (
        UPDATE session_lock.session s
           SET reclaimed_at = now(), held = 0
          FROM dead
         WHERE s.id = dead.id
        RETURNING s.id
    )
    SELECT coalesce(array_agg(id), '{}') INTO reclaimed FROM stamped;

    SELECT count(*), count(*) FILTER (WHERE id < p_session),
           coalesce(sum(held) FILTER (WHERE id <> p_session), 0)
      INTO live_sessions, live_rank, others_held
      FROM session_lock.session
     WHERE name = v_name
       AND reclaimed_at IS NULL
       AND expires_at > now();
END;
$$;

-- A session's fair share of p_open_tasks among p_live_sessions, capped at
-- max_tasks: floor(open / live), plus one for the p_open % p_live sessions
-- of lowest id (p_live_rank is the caller's rank among the live sessions by
-- id, from 0). The shares add up to the open tasks exactly, so no two
-- sessions differ by more than one and nothing is left unowned while
-- sessions are under their cap. (ceil(open / live) for everyone, as the
-- first version did, let early tickers take the ceiling and starve the
-- rest: 16 sessions and 115 tasks gave 14 x 8, 3 and 0.)
DROP FUNCTION IF EXISTS session_lock.ideal_share(bigint, integer, integer);
CREATE OR REPLACE FUNCTION session_lock.fair_share(
    p_open_tasks bigint,
    p_live_sessions integer,
    p_live_rank integer,
    p_max_tasks integer
)
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT least(
        p_open_tasks / greatest(p_live_sessions, 1)
            + CASE WHEN p_live_rank < p_open_tasks % greatest(p_live_sessions, 1) THEN 1 ELSE 0 END,
        p_max_tasks
    )::integer
$$;

-- Open tasks held by the live sessions of p_session's name other than
-- p_session itself, by their held counters (see the session table). STABLE,
-- so that called inside the statement that also counts the free tasks it
-- reads the same snapshot: a session moving tasks between "free" and "held"
-- commits both sides at once, and the sum never counts a task twice or
-- misses one because that commit fell between two reads.
CREATE OR REPLACE FUNCTION session_lock.others_held(p_session bigint)
RETURNS bigint
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN (SELECT coalesce(sum(o.held), 0)
              FROM session_lock.session me
              JOIN session_lock.session o ON o.name = me.name
             WHERE me.id = p_session
               AND o.id <> p_session
               AND o.reclaimed_at IS NULL
               AND o.expires_at > now());
END;
$$;

-- Records that p_session now holds p_held open tasks. The last step of
-- every get_work and finish_tasks, in their transaction, so that the
-- counter and the tasks it counts change together.
CREATE OR REPLACE FUNCTION session_lock.record_held(p_session bigint, p_held integer)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE session_lock.session
       SET held = p_held
     WHERE id = p_session
       AND held IS DISTINCT FROM p_held;
END;
$$;

-- Deletes sessions that were reclaimed more than p_older_than ago and returns
-- how many. Only reclaimed sessions go: their tasks were released, so no task
-- is left pointing at a deleted session.
CREATE OR REPLACE FUNCTION session_lock.reap_sessions(p_older_than interval)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count integer;
BEGIN
    IF p_older_than IS NULL OR p_older_than < interval '0' THEN
        RAISE EXCEPTION 'reap age % is out of range: it must be 0 or more', p_older_than
            USING ERRCODE = 'SL003';
    END IF;
    DELETE FROM session_lock.session
     WHERE reclaimed_at IS NOT NULL
       AND reclaimed_at < now() - p_older_than;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END;
$$;

-- The live sessions, for operators and tools. held is the session's own
-- counter (what the other sessions of its name count it as holding); a
-- task table's *_held function counts the tasks themselves.
CREATE OR REPLACE VIEW session_lock.live_session AS
SELECT id, name, host, pid, started_at, bumped_at, expires_at,
       now() - started_at AS age,
       expires_at - now() AS expires_in,
       held
  FROM session_lock.session
 WHERE reclaimed_at IS NULL
   AND ended_at IS NULL
   AND expires_at > now();

-- For operators: a task table's open tasks per holding session, with
-- whether that session is live. p_held names the table's *_held function
-- (from the task template); it is resolved by Postgres as a regproc, so
-- only an existing function can be called, and its name is quoted by the
-- regproc output when it is put into the query.
CREATE OR REPLACE FUNCTION session_lock.task_overview(p_held regproc)
RETURNS TABLE (session_id bigint, tasks bigint, live boolean)
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT h.session_id, h.tasks::bigint,
                (h.session_id IS NOT NULL AND EXISTS (
                    SELECT 1 FROM session_lock.live_session l WHERE l.id = h.session_id))
           FROM %s() h', p_held);
END;
$$;

-- Least privilege (README): nobody but the owner may call these unless
-- granted. The runtime role gets exactly the calls a runner makes.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA session_lock FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'session_lock_runtime') THEN
        GRANT USAGE ON SCHEMA session_lock TO session_lock_runtime;
        GRANT EXECUTE ON FUNCTION
            session_lock.start_session(text, interval, text, integer),
            session_lock.bump_session(bigint, interval),
            session_lock.end_session(bigint),
            session_lock.reap_sessions(interval)
        TO session_lock_runtime;
    END IF;
END;
$$;
