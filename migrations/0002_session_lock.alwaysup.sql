-- session-lock sessions: start, renew, end and reap the leases, protocol 2.
-- Re-applied on every run (a *.alwaysup.sql file): every statement must be
-- safe to repeat, and a run with nothing to change must leave alone the
-- catalog rows the running fleet's cached plans hang on (the privileges at
-- the end; the generated functions in 0003). The task-table half of the protocol is generated per
-- declared table by 0003_task_table.alwaysup.sql.
--
-- Error codes raised (the Rust store turns them into typed errors):
--   SL001  the session is missing, expired, ended or reclaimed: stop using
--          it and its tasks, start a new session;
--   SL003  an argument is out of range;
--   SL004  the caller speaks another version of the protocol (a runner of
--          an older session-lock against a newer database): upgrade it;
--   SL005  a task table declaration cannot work.
--
-- What holds, in one paragraph. A task belongs to the session in its
-- session_id column, so it is never held by two sessions at once; the
-- question is only whether a session may still act on what it holds. It
-- may while its row is live (not expired, not ended, not reclaimed), and
-- only the process that started it may: every call for a session presents
-- the token start_session returned, a secret nobody else has. Every
-- call that acts for a session locks that row and checks it is live;
-- whoever frees the tasks of a session that is not live first locks its
-- row FOR UPDATE and stamps reclaimed_at, in the transaction that releases
-- the tasks. A reclaimed session is never live again, whatever the clock
-- does later: a renewal must find reclaimed_at empty. Leases are measured
-- with clock_timestamp(), the database clock at the moment of the check,
-- never a transaction's start, so a statement that waited (behind DDL, a
-- lock, a busy server) neither judges nor renews with a stale time; and a
-- renewal never moves a lease backwards.
--
-- Locks. A renewal is an UPDATE of the session row (FOR NO KEY UPDATE).
-- get_work and finish_tasks hold the row FOR KEY SHARE while they work:
-- that keeps reclaimers (FOR UPDATE) away but never delays the heartbeat,
-- and they write the row only at their end. Every function sets
-- lock_timeout, so none of them waits long on a lock someone else holds.
--
-- Names. Every function pins search_path = pg_catalog, pg_temp and
-- qualifies every table, type and function it uses: a SECURITY DEFINER
-- function then resolves every name (operators too: they are looked up in
-- pg_catalog and never in pg_temp) in schemas only a superuser can write,
-- whatever the caller put on its own search_path. No function here is an
-- inlinable SQL function, whose body would be parsed with its caller's
-- search_path.
--
-- Privileges. The functions a runner calls are SECURITY DEFINER, so a
-- runtime role needs only EXECUTE on them, never access to the tables.
-- EXECUTE is revoked from PUBLIC on every function here and granted, at the
-- end of this file, to the role session_lock_runtime when it exists.

-- ---------------------------------------------------------------------------
-- The first release's functions. Their runners cannot act on protocol 2's
-- rows: every one of them now refuses with SL004 (their heartbeats too,
-- through the protocol column), so their sessions expire and their tasks
-- move to the runners of this release. Defaults are dropped with them, so
-- that calls with fewer arguments reach protocol 2's functions.
-- ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION session_lock.refuse_protocol_1(p_what text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION '% belongs to session-lock protocol 1, and this database runs protocol 2', p_what
        USING ERRCODE = 'SL004',
              HINT = 'Upgrade session-lock in this service, and replace a copied task template by a declaration (README: upgrading from the template).';
END;
$$;

DROP FUNCTION IF EXISTS session_lock.work_begin(bigint, integer, interval);
DROP FUNCTION IF EXISTS session_lock.lock_session(bigint);
DROP FUNCTION IF EXISTS session_lock.others_held(bigint);
DROP FUNCTION IF EXISTS session_lock.record_held(bigint, integer);
DROP FUNCTION IF EXISTS session_lock.fair_share(bigint, integer, integer, integer);
DROP FUNCTION IF EXISTS session_lock.check_ttl(interval);
DROP FUNCTION IF EXISTS session_lock.check_max_tasks(integer);
DROP FUNCTION IF EXISTS session_lock.start_session(text, interval, text, integer);
DROP FUNCTION IF EXISTS session_lock.bump_session(bigint, interval);

CREATE FUNCTION session_lock.work_begin(p_session bigint, p_max_tasks integer, p_ttl interval)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$ BEGIN PERFORM session_lock.refuse_protocol_1('work_begin'); END; $$;
CREATE FUNCTION session_lock.lock_session(p_session bigint)
RETURNS text LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$ BEGIN PERFORM session_lock.refuse_protocol_1('lock_session'); RETURN NULL; END; $$;
CREATE FUNCTION session_lock.others_held(p_session bigint)
RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$ BEGIN PERFORM session_lock.refuse_protocol_1('others_held'); RETURN NULL; END; $$;
CREATE FUNCTION session_lock.record_held(p_session bigint, p_held integer)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$ BEGIN PERFORM session_lock.refuse_protocol_1('record_held'); END; $$;
CREATE FUNCTION session_lock.fair_share(
    p_open_tasks bigint, p_live_sessions integer, p_live_rank integer, p_max_tasks integer)
RETURNS integer LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$ BEGIN PERFORM session_lock.refuse_protocol_1('fair_share'); RETURN NULL; END; $$;
CREATE FUNCTION session_lock.start_session(p_name text, p_ttl interval, p_host text, p_pid integer)
RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$ BEGIN PERFORM session_lock.refuse_protocol_1('start_session without a capacity'); RETURN NULL; END; $$;
CREATE FUNCTION session_lock.bump_session(p_session bigint, p_ttl interval)
RETURNS timestamptz LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$ BEGIN PERFORM session_lock.refuse_protocol_1('bump_session without a token'); RETURN NULL; END; $$;

-- ---------------------------------------------------------------------------
-- Arguments.
-- ---------------------------------------------------------------------------

-- A TTL as a length of time: days count 24 hours (a lease must not stretch
-- or shrink with a daylight-saving change), months are refused (they have
-- no fixed length: '1 mon -29 days' is a day in February and two in
-- March), and the result must be more than 0 and at most 1 day.
CREATE OR REPLACE FUNCTION session_lock.lease_length(p_ttl interval)
RETURNS interval
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_seconds numeric;
BEGIN
    IF p_ttl IS NULL THEN
        RAISE EXCEPTION 'session ttl is NULL: give a length of time, at most 1 day'
            USING ERRCODE = 'SL003';
    END IF;
    IF pg_catalog.date_part('month', p_ttl) <> 0 OR pg_catalog.date_part('year', p_ttl) <> 0 THEN
        RAISE EXCEPTION 'session ttl % has a month part, which has no fixed length: give it in days, hours, minutes or seconds', p_ttl
            USING ERRCODE = 'SL003';
    END IF;
    v_seconds := pg_catalog.extract('epoch', p_ttl);
    IF v_seconds <= 0 OR v_seconds > 86400 THEN
        RAISE EXCEPTION 'session ttl % is out of range: it must be more than 0 and at most 1 day', p_ttl
            USING ERRCODE = 'SL003';
    END IF;
    RETURN pg_catalog.make_interval(secs => v_seconds);
END;
$$;

CREATE OR REPLACE FUNCTION session_lock.check_capacity(p_capacity integer)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_capacity IS NULL OR p_capacity < 1 OR p_capacity > 10000 THEN
        RAISE EXCEPTION 'capacity (max_tasks) % is out of range: it must be between 1 and 10000', p_capacity
            USING ERRCODE = 'SL003';
    END IF;
END;
$$;

-- Raises SL004 if p_session exists and speaks another protocol, SL001
-- otherwise: the error of a call that found its session not live, or not
-- its own (the token does not match: said the same way, on purpose).
CREATE OR REPLACE FUNCTION session_lock.raise_not_live(p_session bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_protocol smallint;
BEGIN
    SELECT s.protocol INTO v_protocol FROM session_lock.session s WHERE s.id = p_session;
    IF FOUND AND v_protocol <> 2 THEN
        PERFORM session_lock.refuse_protocol_1('session ' || p_session);
    END IF;
    RAISE EXCEPTION 'session % is lost: missing, expired, ended or reclaimed, or not the caller''s', p_session
        USING ERRCODE = 'SL001';
END;
$$;

-- ---------------------------------------------------------------------------
-- Sessions.
-- ---------------------------------------------------------------------------

-- Starts a session of the runner called p_name with a lease of p_ttl and
-- room for p_capacity tasks, and returns its id and its token: the secret
-- every later call for the session must present. host and pid identify the
-- process for operators; host defaults to the client's address.
CREATE OR REPLACE FUNCTION session_lock.start_session(
    p_name     text,
    p_ttl      interval,
    p_capacity integer DEFAULT 10,
    p_host     text DEFAULT NULL,
    p_pid      integer DEFAULT NULL,
    OUT session_id bigint,
    OUT session_token uuid
)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '1s'
AS $$
DECLARE
    v_ttl interval;
BEGIN
    IF p_name IS NULL OR p_name = '' OR pg_catalog.length(p_name) > 200 THEN
        RAISE EXCEPTION 'session name % is invalid: it must be 1 to 200 characters', pg_catalog.quote_nullable(p_name)
            USING ERRCODE = 'SL003';
    END IF;
    v_ttl := session_lock.lease_length(p_ttl);
    PERFORM session_lock.check_capacity(p_capacity);
    INSERT INTO session_lock.session AS s
           (name, host, pid, capacity, protocol, token, started_at, bumped_at, expires_at)
    VALUES (p_name,
            coalesce(p_host, pg_catalog.host(pg_catalog.inet_client_addr()), 'local'),
            coalesce(p_pid, 0),
            p_capacity,
            2,
            pg_catalog.gen_random_uuid(),
            pg_catalog.clock_timestamp(),
            pg_catalog.clock_timestamp(),
            pg_catalog.clock_timestamp() + v_ttl)
    RETURNING s.id, s.token INTO session_id, session_token;
END;
$$;

-- The heartbeat: extends a live session's lease to p_ttl from now (never
-- shortening it) and returns the new expiry. Raises SL001 when the session
-- is missing, expired, ended or reclaimed, or the token is not its own.
CREATE OR REPLACE FUNCTION session_lock.bump_session(p_session bigint, p_token uuid, p_ttl interval)
RETURNS timestamptz
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '1s'
AS $$
DECLARE
    v_ttl     interval;
    v_expires timestamptz;
BEGIN
    v_ttl := session_lock.lease_length(p_ttl);
    UPDATE session_lock.session s
       SET bumped_at = pg_catalog.clock_timestamp(),
           expires_at = greatest(s.expires_at, pg_catalog.clock_timestamp() + v_ttl)
     WHERE s.id = p_session
       AND s.token = p_token
       AND s.protocol = 2
       AND s.ended_at IS NULL
       AND s.reclaimed_at IS NULL
       AND s.expires_at > pg_catalog.clock_timestamp()
    RETURNING s.expires_at INTO v_expires;
    IF NOT FOUND THEN
        PERFORM session_lock.raise_not_live(p_session);
    END IF;
    RETURN v_expires;
END;
$$;

-- Gives the lease back: the session is over at once, and the other
-- sessions of its name free its tasks on their next get_work. Idempotent:
-- returns false when the session was already over, missing, or not the
-- caller's.
CREATE OR REPLACE FUNCTION session_lock.end_session(p_session bigint, p_token uuid)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '1s'
AS $$
BEGIN
    UPDATE session_lock.session s
       SET ended_at = pg_catalog.clock_timestamp(),
           expires_at = least(s.expires_at, pg_catalog.clock_timestamp())
     WHERE s.id = p_session
       AND s.token = p_token
       AND s.ended_at IS NULL
       AND s.reclaimed_at IS NULL;
    RETURN FOUND;
END;
$$;

-- For operators (not granted to the runtime role): ends any session by id,
-- as end_session does for its owner.
CREATE OR REPLACE FUNCTION session_lock.end_session(p_session bigint)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '1s'
AS $$
BEGIN
    RETURN session_lock.end_session(p_session,
        (SELECT s.token FROM session_lock.session s WHERE s.id = p_session));
END;
$$;

-- Deletes sessions reclaimed more than p_older_than ago and returns how
-- many. A task left pointing at a deleted session is an orphan, which the
-- sessions of its table free (0003: the sweep).
CREATE OR REPLACE FUNCTION session_lock.reap_sessions(p_older_than interval)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '1s'
AS $$
DECLARE
    v_count integer;
BEGIN
    IF p_older_than IS NULL OR p_older_than < interval '0' THEN
        RAISE EXCEPTION 'reap age % is out of range: it must be 0 or more', p_older_than
            USING ERRCODE = 'SL003';
    END IF;
    DELETE FROM session_lock.session s
     WHERE s.reclaimed_at IS NOT NULL
       AND s.reclaimed_at < pg_catalog.clock_timestamp() - p_older_than;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END;
$$;

-- The identity of this database, which a runner compares before it acts on
-- a session: a DbFinder that moves to another database must never reuse
-- session or task ids from the old one (they are numbered from 1 in
-- every database). The cluster's system identifier (shared by a primary
-- and its streaming standbys) and the database's own oid.
CREATE OR REPLACE FUNCTION session_lock.database_identity()
RETURNS text
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN (SELECT c.system_identifier::text FROM pg_catalog.pg_control_system() c)
        || '/' || (SELECT d.oid::text FROM pg_catalog.pg_database d
                    WHERE d.datname = pg_catalog.current_database());
END;
$$;

-- The live sessions, for operators and tools. held is the session's own
-- counter (what the other sessions of its name count it as holding); a task
-- table's *_held function counts the tasks themselves.
DROP VIEW IF EXISTS session_lock.live_session;
CREATE VIEW session_lock.live_session AS
SELECT s.id, s.name, s.host, s.pid, s.started_at, s.bumped_at, s.expires_at,
       pg_catalog.clock_timestamp() - s.started_at AS age,
       s.expires_at - pg_catalog.clock_timestamp() AS expires_in,
       s.held, s.capacity, s.protocol, s.task_table
  FROM session_lock.session s
 WHERE s.reclaimed_at IS NULL
   AND s.ended_at IS NULL
   AND s.expires_at > pg_catalog.clock_timestamp();

-- Least privilege (README): nobody but the owner may call these unless
-- granted. The runtime role gets exactly the calls a runner makes; the
-- generated task-table functions are granted by 0003. Each grant and
-- revoke only where it is missing: a GRANT writes its object's catalog row
-- even when it changes nothing, and that costs every connection of the
-- running fleet its cached plans (a schema's row: every plan; a function's:
-- its compiled body), at every migrator run.

-- Revokes EXECUTE from PUBLIC on each function in session_lock that still
-- has it (a new one has it by default); returns how many.
CREATE OR REPLACE FUNCTION session_lock.revoke_from_public()
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_fn regprocedure;
    v_n  integer := 0;
BEGIN
    FOR v_fn IN
        SELECT p.oid::regprocedure
          FROM pg_catalog.pg_proc p
         WHERE p.pronamespace = 'session_lock'::regnamespace
           AND pg_catalog.has_function_privilege('public', p.oid, 'EXECUTE')
    LOOP
        EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', v_fn);
        v_n := v_n + 1;
    END LOOP;
    RETURN v_n;
END;
$$;

-- Grants EXECUTE on p_functions to p_role where it lacks it; returns how
-- many it granted.
CREATE OR REPLACE FUNCTION session_lock.grant_execute(p_role name, p_functions regprocedure[])
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_fn regprocedure;
    v_n  integer := 0;
BEGIN
    FOREACH v_fn IN ARRAY p_functions LOOP
        IF NOT pg_catalog.has_function_privilege(p_role, v_fn, 'EXECUTE') THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', v_fn, p_role);
            v_n := v_n + 1;
        END IF;
    END LOOP;
    RETURN v_n;
END;
$$;

SELECT session_lock.revoke_from_public();
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'session_lock_runtime') THEN
        IF NOT pg_catalog.has_schema_privilege('session_lock_runtime', 'session_lock', 'USAGE') THEN
            GRANT USAGE ON SCHEMA session_lock TO session_lock_runtime;
        END IF;
        PERFORM session_lock.grant_execute('session_lock_runtime', ARRAY[
            'session_lock.start_session(text, interval, integer, text, integer)',
            'session_lock.bump_session(bigint, uuid, interval)',
            'session_lock.end_session(bigint, uuid)',
            'session_lock.reap_sessions(interval)',
            'session_lock.database_identity()']::regprocedure[]);
        -- The first release granted this one; it is for operators only now.
        IF pg_catalog.has_function_privilege('session_lock_runtime',
               'session_lock.end_session(bigint)'::regprocedure, 'EXECUTE') THEN
            REVOKE EXECUTE ON FUNCTION session_lock.end_session(bigint)
                FROM session_lock_runtime;
        END IF;
    END IF;
END;
$$;
