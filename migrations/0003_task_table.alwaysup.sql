-- session-lock task tables: the declaration, and the protocol generated
-- from it for every declared table. Re-applied on every run (a
-- *.alwaysup.sql file), and it re-generates every declared table's
-- functions at its end: upgrading session-lock and migrating upgrades the
-- protocol of every task table, with nothing for anyone to copy.
--
-- A user declares a table once (in a migration, or with
-- Migrator::task_table in Rust):
--
--     SELECT session_lock.declare_task_table('public.email',
--         open_when   => 'sent_at IS NULL',
--         finish      => 'sent_at = now()',
--         finished_by => 'sent_by');
--
-- and session-lock adds what the protocol needs to the table (a BIGINT
-- session_id column if missing, one partial index over open tasks, a
-- NOTIFY trigger) and generates its functions, in the table's schema:
--
--   <prefix>_get_work(session, finished[], running[], sweep)   entry point
--   <prefix>_finish_tasks(session, ids[])                       entry point
--   <prefix>_held()                                             for status
--   <prefix>_finish_ids, _free_of, _count_open, _sweep          internal
--
-- Each is static PL/pgSQL (it keeps its cached plans; no dynamic SQL on
-- the hot path), made by replacing the {{placeholders}} of the templates
-- below. The crate's placeholders are replaced first and the declaration's
-- fragments (open_when, finish, order_by) last, so that nothing inside a
-- fragment is ever taken for a placeholder; fragments may not contain ';'
-- or '$', so that none can end a statement or a function body.
--
-- What a declaration may say is what differs between tables: which rows
-- are open, how a row is marked finished (and which column records the
-- finishing session), the order of pickup, the primary key column, the
-- notify channel, and the lock timeout. Everything else, the protocol
-- itself, is the same for every table and lives only here. For a table
-- that needs more (moving a finished row elsewhere, say), the finish may
-- set a column that a trigger of the user's acts on.
--
-- The protocol, per get_work call of session S (name N, capacity C):
--   1. lock S's row FOR KEY SHARE and check it is live (SL001 if not);
--   2. finish the previous batch's completed tasks (those S still holds);
--   3. reclaim the expired and ended sessions of N (stamp, free their
--      tasks here, SKIP LOCKED);
--   4. read the live sessions of N: total capacity W, the capacity of
--      those before S (by id), the others' held counters, S's neighbour;
--   5. once per tick (p_sweep), sweep S's stretch of session ids for
--      orphans: open tasks whose session_id names no live session;
--   6. move S to its share of the open tasks: a weighted fair share,
--      floor(open * (before + C) / W) - floor(open * before / W), at most
--      C; open is counted only as far as W (past it every session is at
--      its capacity), and not at all when a pickup of all S still lacks
--      can stand in for the count;
--   7. record S's held counter and return the finished ids and S's tasks.
-- Every statement on task rows locks them FOR NO KEY UPDATE SKIP LOCKED
-- (the lock an UPDATE that keeps the key takes: a foreign-key child's
-- FOR KEY SHARE does not conflict with it), so a row someone else has
-- locked delays only that row, never the call; the call itself runs under
-- the declaration's lock_timeout (1 s by default).

-- New tasks wake idle runners at once (LISTEN <channel>) instead of
-- waiting for their next tick: one notification per statement, however
-- many rows it inserts. The channel is the trigger's argument.
CREATE OR REPLACE FUNCTION session_lock.notify_task_inserted()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_catalog.pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END;
$$;

-- Raises SL005 naming the declaration of p_table and what is wrong.
CREATE OR REPLACE FUNCTION session_lock.bad_declaration(p_table regclass, p_problem text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'task table declaration of %: %', p_table, p_problem
        USING ERRCODE = 'SL005',
              HINT = 'README: declaring a task table.';
END;
$$;

-- The names the generated functions use for their own parameters, results
-- and variables: a column of a declared table may not have one of them, or
-- a fragment mentioning it would be ambiguous.
CREATE OR REPLACE FUNCTION session_lock.generated_names()
RETURNS text[]
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN ARRAY['p_session', 'p_finished', 'p_running', 'p_sweep', 'p_ids', 'p_sessions',
                 'p_limit', 'p_name', 'p_held', 'p_bound', 'p_next', 'p_lowest', 'p_count',
                 'sl_finished', 'sl_task', 'sl_name', 'sl_capacity', 'sl_done', 'sl_dead',
                 'sl_weight', 'sl_before', 'sl_others', 'sl_next', 'sl_lowest', 'sl_held',
                 'sl_want', 'sl_got', 'sl_open', 'sl_share', 'sl_fast', 'sl_pick',
                 'sl_left_open', 'sl_from', 'sl_to', 'sl_i', 'sl_at', 'sl_orphan',
                 'sl_live', 'sl_freed', 'sl_n', 'sl_steps'];
END;
$$;

-- ---------------------------------------------------------------------------
-- The templates. One CREATE FUNCTION each; placeholders:
--   {{table}}        the table, schema-qualified and quoted
--   {{fn:NAME}}      the generated function <prefix>_NAME, qualified, quoted
--   {{id}}           the primary key column, quoted
--   {{lock_timeout}} the declaration's lock timeout, as a literal
--   {{name}}         the table's name as a string literal, for messages
--   {{open}}         the open_when fragment
--   {{finish}}       the finish fragment (plus the finished_by column)
--   {{order}}        the order_by fragment
-- ---------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION session_lock.task_table_templates()
RETURNS text[]
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $templates$
BEGIN
    RETURN ARRAY[
-- Finishes those of p_ids that p_session holds and that are still open,
-- and returns their ids. Rows locked by someone else are first skipped,
-- then waited for, briefly: a concurrent pickup that passed over a row it
-- found already taken keeps it locked until it commits (milliseconds),
-- while a foreign transaction may keep it for long. Those still locked
-- after 100 ms stay held and unfinished; the caller tries them again.
$tmpl$
CREATE OR REPLACE FUNCTION {{fn:finish_ids}}(p_session bigint, p_ids bigint[])
RETURNS bigint[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET lock_timeout = {{lock_timeout}}
AS $sl_fn$
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
DECLARE
    sl_done      bigint[];
    sl_more      bigint[];
    sl_left_open boolean;
BEGIN
    WITH done AS (
        UPDATE {{table}} t
           SET {{finish}}
         WHERE t.{{id}} = ANY (ARRAY(
                   SELECT f.{{id}}
                     FROM {{table}} f
                    WHERE f.{{id}} = ANY (p_ids)
                      AND f.session_id = p_session
                      AND ({{open}}
                          )
                      FOR NO KEY UPDATE SKIP LOCKED))
        RETURNING t.{{id}} AS id, ({{open}}
                                  ) AS left_open
    )
    SELECT coalesce(pg_catalog.array_agg(done.id), '{}'), coalesce(pg_catalog.bool_or(done.left_open), false)
      INTO sl_done, sl_left_open
      FROM done;
    IF pg_catalog.cardinality(sl_done) < pg_catalog.cardinality(p_ids) THEN
        BEGIN
            PERFORM pg_catalog.set_config('lock_timeout', '100ms', true);
            WITH done AS (
                UPDATE {{table}} t
                   SET {{finish}}
                 WHERE t.{{id}} = ANY (p_ids)
                   AND NOT (t.{{id}} = ANY (sl_done))
                   AND t.session_id = p_session
                   AND ({{open}}
                       )
                RETURNING t.{{id}} AS id, ({{open}}
                                          ) AS left_open
            )
            SELECT coalesce(pg_catalog.array_agg(done.id), '{}'),
                   sl_left_open OR coalesce(pg_catalog.bool_or(done.left_open), false)
              INTO sl_more, sl_left_open
              FROM done;
            sl_done := sl_done || sl_more;
        EXCEPTION WHEN lock_not_available THEN
            NULL;
        END;
    END IF;
    IF sl_left_open THEN
        PERFORM session_lock.bad_declaration({{name}}::regclass,
            'its finish leaves a finished task open: the finish must make open_when false'::text);
    END IF;
    RETURN sl_done;
END;
$sl_fn$;
$tmpl$,
-- Frees (session_id := NULL) up to p_limit open tasks held by p_sessions,
-- which must not be live; returns how many. SKIP LOCKED: a task locked
-- by someone else stays with its dead holder, an orphan that the sweep
-- frees once the lock is gone.
$tmpl$
CREATE OR REPLACE FUNCTION {{fn:free_of}}(p_sessions bigint[], p_limit integer)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET lock_timeout = {{lock_timeout}}
AS $sl_fn$
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
DECLARE
    sl_n integer;
BEGIN
    UPDATE {{table}} t
       SET session_id = NULL
     WHERE t.{{id}} = ANY (ARRAY(
               SELECT r.{{id}}
                 FROM {{table}} r
                WHERE r.session_id = ANY (p_sessions)
                  AND ({{open}}
                      )
                LIMIT p_limit
                  FOR NO KEY UPDATE SKIP LOCKED));
    GET DIAGNOSTICS sl_n = ROW_COUNT;
    RETURN sl_n;
END;
$sl_fn$;
$tmpl$,
-- The open tasks of p_name's runners, counted no further than p_bound:
-- p_held (the caller's own), the other live sessions' held counters, and
-- the free tasks, in one statement and so one snapshot (a session moving
-- tasks between free and held commits both at once: the sum never counts
-- a task twice or misses one).
$tmpl$
CREATE OR REPLACE FUNCTION {{fn:count_open}}(p_name text, p_session bigint, p_held integer, p_bound bigint)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET lock_timeout = {{lock_timeout}}
AS $sl_fn$
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
BEGIN
    RETURN (
        SELECT p_held + o.held + coalesce(free.n, 0)
          FROM (SELECT coalesce(pg_catalog.sum(s.held), 0) AS held
                  FROM session_lock.session s
                 WHERE s.name = p_name
                   AND s.id <> p_session
                   AND s.reclaimed_at IS NULL
                   AND s.ended_at IS NULL
                   AND s.expires_at > pg_catalog.clock_timestamp()) o
          LEFT JOIN LATERAL (
                SELECT pg_catalog.count(*) AS n
                  FROM (SELECT 1
                          FROM {{table}} c
                         WHERE c.session_id IS NULL
                           AND ({{open}}
                               )
                         ORDER BY c.session_id, {{order}}
                         LIMIT greatest(p_bound - p_held - o.held, 0)) f
               ) free ON true);
END;
$sl_fn$;
$tmpl$,
-- The sweep: frees the open tasks whose session_id names no live session
-- (any name's), in the stretch of session ids that p_session looks after:
-- from its own id to the next live session of its name (p_next), and, for
-- the lowest (p_lowest), below its own id too. Every id is some live
-- session's to sweep, so an orphan (a task of a reaped session, of a
-- runner renamed away, reopened after its finisher was reaped, or left
-- behind by a reclaim that found it locked) is free within one tick.
-- The holder's row is locked FOR UPDATE, and stamped reclaimed, before
-- its tasks are freed: it can never be renewed afterwards.
$tmpl$
CREATE OR REPLACE FUNCTION {{fn:sweep}}(p_session bigint, p_next bigint, p_lowest boolean)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET lock_timeout = {{lock_timeout}}
AS $sl_fn$
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
DECLARE
    sl_from   bigint[];
    sl_to     bigint[];
    sl_i      integer;
    sl_at     bigint;
    sl_orphan bigint;
    sl_live   boolean;
    sl_freed  integer := 0;
    sl_steps  integer := 0;
BEGIN
    sl_from := ARRAY[p_session + 1];
    sl_to := ARRAY[coalesce(p_next - 1, 9223372036854775807)];
    IF p_lowest THEN
        sl_from := sl_from || (-9223372036854775807 - 1);
        sl_to := sl_to || (p_session - 1);
    END IF;
    FOR sl_i IN 1 .. pg_catalog.cardinality(sl_from) LOOP
        sl_at := sl_from[sl_i];
        -- A bounded number of holders per call: the rest wait a tick.
        WHILE sl_at <= sl_to[sl_i] AND sl_steps < 100 LOOP
            sl_steps := sl_steps + 1;
            SELECT t.session_id INTO sl_orphan
              FROM {{table}} t
             WHERE t.session_id >= sl_at
               AND t.session_id <= sl_to[sl_i]
               AND ({{open}}
                   )
             ORDER BY t.session_id
             LIMIT 1;
            EXIT WHEN NOT FOUND;
            SELECT s.ended_at IS NULL AND s.reclaimed_at IS NULL
                   AND s.expires_at > pg_catalog.clock_timestamp()
              INTO sl_live
              FROM session_lock.session s
             WHERE s.id = sl_orphan;
            IF NOT FOUND THEN
                sl_freed := sl_freed + {{fn:free_of}}(ARRAY[sl_orphan]::bigint[], 10000::integer);
            ELSIF NOT sl_live THEN
                -- Re-checked under the lock; a row someone else has locked
                -- (its owner renewing, another sweeper) waits a tick.
                UPDATE session_lock.session s
                   SET reclaimed_at = coalesce(s.reclaimed_at,
                           greatest(pg_catalog.clock_timestamp(), s.expires_at)),
                       held = 0
                 WHERE s.id = (SELECT l.id FROM session_lock.session l
                                WHERE l.id = sl_orphan
                                  AND (l.reclaimed_at IS NOT NULL
                                       OR l.ended_at IS NOT NULL
                                       OR l.expires_at <= pg_catalog.clock_timestamp())
                                  FOR UPDATE SKIP LOCKED);
                IF FOUND THEN
                    sl_freed := sl_freed + {{fn:free_of}}(ARRAY[sl_orphan]::bigint[], 10000::integer);
                END IF;
            END IF;
            EXIT WHEN sl_orphan = 9223372036854775807;
            sl_at := sl_orphan + 1;
        END LOOP;
    END LOOP;
    RETURN sl_freed;
END;
$sl_fn$;
$tmpl$,
-- The entry point of every tick: see the protocol at the top of this file.
-- Returns one row per task finished (sl_finished set, sl_task NULL), then
-- one per task the session holds (sl_finished NULL), in pickup order.
-- p_running: tasks still running in the caller's process, never released.
$tmpl$
CREATE OR REPLACE FUNCTION {{fn:get_work}}(
    p_session  bigint,
    p_finished bigint[] DEFAULT '{}',
    p_running  bigint[] DEFAULT '{}',
    p_sweep    boolean  DEFAULT true
)
RETURNS TABLE (sl_finished bigint, sl_task {{table}})
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = {{lock_timeout}}
AS $sl_fn$
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
DECLARE
    sl_name     text;
    sl_capacity integer;
    sl_done     bigint[] := '{}';
    sl_dead     bigint[];
    sl_weight   bigint;
    sl_before   bigint;
    sl_others   bigint;
    sl_next     bigint;
    sl_lowest   bigint;
    sl_held     integer;
    sl_want     integer;
    sl_fast     boolean;
    sl_pick     integer := 0;
    sl_got      integer := 0;
    sl_share    bigint;
    sl_n        integer;
BEGIN
    IF p_finished IS NULL OR p_running IS NULL OR p_sweep IS NULL THEN
        RAISE EXCEPTION 'get_work of %: finished, running and sweep must not be NULL', {{name}}
            USING ERRCODE = 'SL003';
    END IF;

    -- 1. The lease: live, and kept from reclaimers until commit. FOR KEY
    -- SHARE conflicts with their FOR UPDATE but not with the heartbeat's
    -- UPDATE: this call never delays its own session's renewal.
    SELECT s.name, s.capacity INTO sl_name, sl_capacity
      FROM session_lock.session s
     WHERE s.id = p_session
       AND s.protocol = 2
       AND s.ended_at IS NULL
       AND s.reclaimed_at IS NULL
       AND s.expires_at > pg_catalog.clock_timestamp()
       FOR KEY SHARE;
    IF NOT FOUND THEN
        PERFORM session_lock.raise_not_live(p_session);
    END IF;

    -- 2. The previous batch's completed tasks, fenced by the lease above.
    IF pg_catalog.cardinality(p_finished) > 0 THEN
        sl_done := {{fn:finish_ids}}(p_session, p_finished);
    END IF;

    -- 3. The expired and ended sessions of this name: stamped under their
    -- row lock (SKIP LOCKED: a row still locked is a session at work, or
    -- one another survivor is reclaiming), then their tasks freed here.
    WITH dead AS (
        SELECT s.id
          FROM session_lock.session s
         WHERE s.name = sl_name
           AND s.reclaimed_at IS NULL
           AND (s.ended_at IS NOT NULL OR s.expires_at <= pg_catalog.clock_timestamp())
         ORDER BY s.id
           FOR UPDATE SKIP LOCKED
    ), stamped AS (
        UPDATE session_lock.session s
           SET reclaimed_at = greatest(pg_catalog.clock_timestamp(), s.expires_at),
               held = 0
          FROM dead
         WHERE s.id = dead.id
        RETURNING s.id
    )
    SELECT pg_catalog.array_agg(stamped.id) INTO sl_dead FROM stamped;
    IF sl_dead IS NOT NULL THEN
        PERFORM {{fn:free_of}}(sl_dead, 10000::integer);
    END IF;

    -- 4. The live sessions of this name, read once.
    SELECT pg_catalog.sum(s.capacity),
           coalesce(pg_catalog.sum(s.capacity) FILTER (WHERE s.id < p_session), 0),
           coalesce(pg_catalog.sum(s.held) FILTER (WHERE s.id <> p_session), 0),
           pg_catalog.min(s.id) FILTER (WHERE s.id > p_session),
           pg_catalog.min(s.id)
      INTO sl_weight, sl_before, sl_others, sl_next, sl_lowest
      FROM session_lock.session s
     WHERE s.name = sl_name
       AND s.reclaimed_at IS NULL
       AND (s.id = p_session
            OR (s.ended_at IS NULL AND s.expires_at > pg_catalog.clock_timestamp()));

    -- 5. Orphans in this session's stretch of ids, once per tick.
    IF p_sweep THEN
        PERFORM {{fn:sweep}}(p_session, sl_next, (sl_lowest = p_session)::boolean);
    END IF;

    -- 6. The share. When this session's tasks and the others' held
    -- counters leave no more to find than it still lacks, a pickup of all
    -- it lacks stands in for the count: if it gets them all, the open
    -- tasks reach W and the share is the capacity (every draining call).
    SELECT pg_catalog.count(*) INTO sl_held
      FROM {{table}} h
     WHERE h.session_id = p_session
       AND ({{open}}
           );
    sl_want := sl_capacity - sl_held;
    sl_fast := sl_want > 0 AND sl_weight - sl_held - sl_others <= sl_want;
    IF sl_fast THEN
        sl_pick := sl_want;
    ELSE
        sl_share := {{fn:count_open}}(sl_name, p_session, sl_held, sl_weight);
        sl_share := least(
            sl_share * (sl_before + sl_capacity) / sl_weight - sl_share * sl_before / sl_weight,
            sl_capacity);
        sl_pick := greatest(sl_share - sl_held, 0);
    END IF;
    IF sl_pick > 0 THEN
        UPDATE {{table}} t
           SET session_id = p_session
         WHERE t.{{id}} = ANY (ARRAY(
                   SELECT f.{{id}}
                     FROM {{table}} f
                    WHERE f.session_id IS NULL
                      AND ({{open}}
                          )
                    ORDER BY f.session_id, {{order}}
                    LIMIT sl_pick
                      FOR NO KEY UPDATE SKIP LOCKED))
           AND t.session_id IS NULL;
        GET DIAGNOSTICS sl_got = ROW_COUNT;
        sl_held := sl_held + sl_got;
    END IF;
    IF sl_fast AND sl_got < sl_want THEN
        -- Short: count after all, and give back what went beyond the share.
        sl_share := {{fn:count_open}}(sl_name, p_session, sl_held, sl_weight);
        sl_share := least(
            sl_share * (sl_before + sl_capacity) / sl_weight - sl_share * sl_before / sl_weight,
            sl_capacity);
    END IF;
    IF sl_held > sl_share THEN
        -- The surplus goes back newest first, never a task still running
        -- in the caller's process.
        UPDATE {{table}} t
           SET session_id = NULL
         WHERE t.{{id}} = ANY (ARRAY(
                   SELECT r.{{id}}
                     FROM {{table}} r
                    WHERE r.session_id = p_session
                      AND ({{open}}
                          )
                      AND r.{{id}} <> ALL (p_running)
                    ORDER BY r.{{id}} DESC
                    LIMIT sl_held - sl_share
                      FOR NO KEY UPDATE SKIP LOCKED));
        GET DIAGNOSTICS sl_n = ROW_COUNT;
        sl_held := sl_held - sl_n;
    END IF;

    -- 7. The counter the others size their shares by, and the answer.
    UPDATE session_lock.session s
       SET held = sl_held
     WHERE s.id = p_session
       AND s.held IS DISTINCT FROM sl_held;
    RETURN QUERY
        SELECT d.id, NULL::{{table}}
          FROM pg_catalog.unnest(sl_done) AS d(id);
    RETURN QUERY
        SELECT NULL::bigint, h
          FROM {{table}} h
         WHERE h.session_id = p_session
           AND ({{open}}
               )
         ORDER BY h.session_id, {{order}};
END;
$sl_fn$;
$tmpl$,
-- The fenced finish: raises SL001 when the session is not live, otherwise
-- finishes those of p_ids it still holds and returns their ids.
$tmpl$
CREATE OR REPLACE FUNCTION {{fn:finish_tasks}}(p_session bigint, p_ids bigint[])
RETURNS SETOF bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = {{lock_timeout}}
AS $sl_fn$
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
DECLARE
    sl_done bigint[];
BEGIN
    IF p_ids IS NULL THEN
        RAISE EXCEPTION 'finish_tasks of %: ids must not be NULL', {{name}}
            USING ERRCODE = 'SL003';
    END IF;
    PERFORM 1
       FROM session_lock.session s
      WHERE s.id = p_session
        AND s.protocol = 2
        AND s.ended_at IS NULL
        AND s.reclaimed_at IS NULL
        AND s.expires_at > pg_catalog.clock_timestamp()
        FOR KEY SHARE;
    IF NOT FOUND THEN
        PERFORM session_lock.raise_not_live(p_session);
    END IF;
    sl_done := {{fn:finish_ids}}(p_session, p_ids);
    IF pg_catalog.cardinality(sl_done) > 0 THEN
        UPDATE session_lock.session s
           SET held = greatest(s.held - pg_catalog.cardinality(sl_done), 0)
         WHERE s.id = p_session;
    END IF;
    RETURN QUERY SELECT d.id FROM pg_catalog.unnest(sl_done) AS d(id);
END;
$sl_fn$;
$tmpl$,
-- Open tasks per holding session (NULL: free), for operators:
-- `session-lock status` reads it through session_lock.task_overview.
$tmpl$
CREATE OR REPLACE FUNCTION {{fn:held}}()
RETURNS TABLE (session_id bigint, tasks bigint)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $sl_fn$
#variable_conflict use_column
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
BEGIN
    RETURN QUERY
        SELECT t.session_id, pg_catalog.count(*)
          FROM {{table}} t
         WHERE ({{open}}
               )
         GROUP BY t.session_id;
END;
$sl_fn$;
$tmpl$,
-- The first release's entry point, for its runners: refused clearly.
$tmpl$
CREATE OR REPLACE FUNCTION {{fn:get_work}}(
    p_session bigint, p_max_tasks integer, p_ttl interval, p_finished bigint[] DEFAULT NULL)
RETURNS SETOF {{table}}
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $sl_fn$
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
BEGIN
    PERFORM session_lock.refuse_protocol_1(('get_work(session, max_tasks, ttl, finished) of ' || {{name}})::text);
END;
$sl_fn$;
$tmpl$
    ];
END;
$templates$;

-- Generates the protocol functions of one declared table from its
-- declaration and the templates above, and grants the entry points to
-- session_lock_runtime when that role exists.
CREATE OR REPLACE FUNCTION session_lock.generate_task_table(p_table regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d          session_lock.task_table%ROWTYPE;
    v_table    text;
    v_sql      text;
    v_fn       text;
    v_finish   text;
    v_names    text[] := ARRAY['finish_ids', 'free_of', 'count_open', 'sweep', 'get_work',
                               'finish_tasks', 'held'];
BEGIN
    SELECT * INTO d FROM session_lock.task_table t WHERE t.task_table = p_table;
    IF NOT FOUND THEN
        PERFORM session_lock.bad_declaration(p_table, 'it is not declared');
    END IF;
    SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) INTO v_table
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = p_table;
    v_finish := d.finish;
    IF d.finished_by IS NOT NULL THEN
        v_finish := v_finish || ', ' || pg_catalog.quote_ident(d.finished_by) || ' = p_session';
    END IF;
    FOREACH v_sql IN ARRAY session_lock.task_table_templates() LOOP
        FOREACH v_fn IN ARRAY v_names LOOP
            v_sql := pg_catalog.replace(v_sql, '{{fn:' || v_fn || '}}',
                pg_catalog.format('%I.%I', d.fn_schema, d.fn_prefix || '_' || v_fn));
        END LOOP;
        v_sql := pg_catalog.replace(v_sql, '{{table}}', v_table);
        v_sql := pg_catalog.replace(v_sql, '{{id}}', pg_catalog.quote_ident(d.id_column));
        v_sql := pg_catalog.replace(v_sql, '{{lock_timeout}}', pg_catalog.quote_literal(
            (pg_catalog.extract('epoch', d.lock_timeout) * 1000)::bigint || 'ms'));
        v_sql := pg_catalog.replace(v_sql, '{{name}}', pg_catalog.quote_literal(v_table));
        -- The declaration's fragments last (see the top of this file).
        v_sql := pg_catalog.replace(v_sql, '{{open}}', d.open_when);
        v_sql := pg_catalog.replace(v_sql, '{{finish}}', v_finish);
        v_sql := pg_catalog.replace(v_sql, '{{order}}', d.order_by);
        EXECUTE v_sql;
    END LOOP;

    FOREACH v_sql IN ARRAY ARRAY[
        'REVOKE EXECUTE ON FUNCTION %1$I.%2$I(bigint, bigint[]) FROM PUBLIC',
        'REVOKE EXECUTE ON FUNCTION %1$I.%3$I(bigint[], integer) FROM PUBLIC',
        'REVOKE EXECUTE ON FUNCTION %1$I.%4$I(text, bigint, integer, bigint) FROM PUBLIC',
        'REVOKE EXECUTE ON FUNCTION %1$I.%5$I(bigint, bigint, boolean) FROM PUBLIC',
        'REVOKE EXECUTE ON FUNCTION %1$I.%6$I(bigint, bigint[], bigint[], boolean) FROM PUBLIC',
        'REVOKE EXECUTE ON FUNCTION %1$I.%7$I(bigint, bigint[]) FROM PUBLIC',
        'REVOKE EXECUTE ON FUNCTION %1$I.%8$I() FROM PUBLIC',
        'REVOKE EXECUTE ON FUNCTION %1$I.%6$I(bigint, integer, interval, bigint[]) FROM PUBLIC']
    LOOP
        EXECUTE pg_catalog.format(v_sql, d.fn_schema,
            d.fn_prefix || '_finish_ids', d.fn_prefix || '_free_of',
            d.fn_prefix || '_count_open', d.fn_prefix || '_sweep',
            d.fn_prefix || '_get_work', d.fn_prefix || '_finish_tasks',
            d.fn_prefix || '_held');
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'session_lock_runtime') THEN
        EXECUTE pg_catalog.format(
            'GRANT USAGE ON SCHEMA %1$I TO session_lock_runtime; '
            'GRANT EXECUTE ON FUNCTION %1$I.%2$I(bigint, bigint[], bigint[], boolean), '
            '%1$I.%3$I(bigint, bigint[]), %1$I.%4$I() TO session_lock_runtime',
            d.fn_schema, d.fn_prefix || '_get_work', d.fn_prefix || '_finish_tasks',
            d.fn_prefix || '_held');
    END IF;
    UPDATE session_lock.task_table t
       SET generated_at = pg_catalog.clock_timestamp()
     WHERE t.task_table = p_table;
END;
$$;

-- Re-generates every declared table whose table still exists; returns
-- how many. Run at the end of this file, so every migration brings every
-- table the protocol of the session-lock that ran it.
CREATE OR REPLACE FUNCTION session_lock.generate_task_tables()
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_table regclass;
    v_count integer := 0;
BEGIN
    FOR v_table IN
        SELECT t.task_table
          FROM session_lock.task_table t
          JOIN pg_catalog.pg_class c ON c.oid = t.task_table
         ORDER BY t.fn_schema, t.fn_prefix
    LOOP
        PERFORM session_lock.generate_task_table(v_table);
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END;
$$;

-- Declares p_table a task table (or changes its declaration) and
-- generates its protocol. Idempotent: declaring again with the same
-- arguments changes nothing but the functions' text. See the top of this
-- file and the README for each argument.
CREATE OR REPLACE FUNCTION session_lock.declare_task_table(
    task_table   regclass,
    open_when    text     DEFAULT 'finished_at IS NULL',
    finish       text     DEFAULT 'finished_at = now()',
    finished_by  name     DEFAULT NULL,
    order_by     text     DEFAULT NULL,
    id_column    name     DEFAULT 'id',
    notify       text     DEFAULT '',
    fn_prefix    text     DEFAULT NULL,
    lock_timeout interval DEFAULT '1 second'
)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_schema   name;
    v_relname  name;
    v_kind     "char";
    v_table    text;
    v_type     regtype;
    v_old      session_lock.task_table%ROWTYPE;
    v_index    text;
    v_fragment text;
    v_clash    text[];
BEGIN
    IF task_table IS NULL THEN
        RAISE EXCEPTION 'declare_task_table: the table is NULL' USING ERRCODE = 'SL005';
    END IF;
    SELECT n.nspname, c.relname, c.relkind INTO v_schema, v_relname, v_kind
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = task_table;
    IF v_kind NOT IN ('r', 'p') THEN
        PERFORM session_lock.bad_declaration(task_table, 'it is not a table');
    END IF;
    v_table := pg_catalog.format('%I.%I', v_schema, v_relname);
    order_by := coalesce(order_by, pg_catalog.quote_ident(id_column));
    fn_prefix := coalesce(fn_prefix, v_relname);
    IF lock_timeout IS NULL OR lock_timeout <= interval '0' OR lock_timeout > interval '1 minute' THEN
        PERFORM session_lock.bad_declaration(task_table,
            pg_catalog.format('lock_timeout %s must be more than 0 and at most 1 minute', lock_timeout));
    END IF;
    IF fn_prefix = '' OR pg_catalog.length(fn_prefix) > 48 THEN
        PERFORM session_lock.bad_declaration(task_table,
            'fn_prefix must be 1 to 48 characters, so that every generated name fits');
    END IF;
    FOREACH v_fragment IN ARRAY ARRAY[open_when, finish, order_by] LOOP
        IF v_fragment IS NULL OR pg_catalog.btrim(v_fragment) = '' THEN
            PERFORM session_lock.bad_declaration(task_table,
                'open_when, finish and order_by must not be empty');
        END IF;
        IF pg_catalog.strpos(v_fragment, ';') > 0 OR pg_catalog.strpos(v_fragment, '$') > 0 THEN
            PERFORM session_lock.bad_declaration(task_table,
                pg_catalog.format('%L may not contain ; or $', v_fragment));
        END IF;
    END LOOP;

    -- Columns: a BIGINT primary key, BIGINT session_id and finished_by, and
    -- none named like the generated functions' own variables.
    SELECT a.atttypid::regtype INTO v_type
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = task_table AND a.attname = id_column AND NOT a.attisdropped;
    IF v_type IS DISTINCT FROM 'bigint'::regtype THEN
        PERFORM session_lock.bad_declaration(task_table, pg_catalog.format(
            'its id column %I must be a BIGINT column (it is %s)', id_column,
            coalesce(v_type::text, 'missing')));
    END IF;
    IF finished_by IS NOT NULL THEN
        SELECT a.atttypid::regtype INTO v_type
          FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = task_table AND a.attname = finished_by AND NOT a.attisdropped;
        IF v_type IS DISTINCT FROM 'bigint'::regtype THEN
            PERFORM session_lock.bad_declaration(task_table, pg_catalog.format(
                'finished_by %I must be a BIGINT column (it is %s)', finished_by,
                coalesce(v_type::text, 'missing')));
        END IF;
    END IF;
    SELECT pg_catalog.array_agg(a.attname::text ORDER BY a.attnum) INTO v_clash
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = task_table AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attname::text = ANY (session_lock.generated_names());
    IF v_clash IS NOT NULL THEN
        PERFORM session_lock.bad_declaration(task_table, pg_catalog.format(
            'its columns %s have names the generated functions use for their own variables: rename them',
            pg_catalog.array_to_string(v_clash, ', ')));
    END IF;
    SELECT a.atttypid::regtype INTO v_type
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = task_table AND a.attname = 'session_id' AND NOT a.attisdropped;
    IF NOT FOUND THEN
        EXECUTE pg_catalog.format('ALTER TABLE %s ADD COLUMN session_id bigint', v_table);
    ELSIF v_type <> 'bigint'::regtype THEN
        PERFORM session_lock.bad_declaration(task_table, pg_catalog.format(
            'its session_id column must be BIGINT (it is %s)', v_type));
    END IF;

    -- The fragments, tried against the table: an unknown column or a type
    -- error is reported here, naming the fragment, not at the first tick.
    BEGIN
        EXECUTE pg_catalog.format('SELECT 1 FROM %s WHERE (%s) ORDER BY %s LIMIT 0',
            v_table, open_when, order_by);
    EXCEPTION WHEN OTHERS THEN
        PERFORM session_lock.bad_declaration(task_table, pg_catalog.format(
            'open_when %L or order_by %L does not work: %s', open_when, order_by, SQLERRM));
    END;
    BEGIN
        EXECUTE pg_catalog.format('UPDATE %s SET %s WHERE false', v_table, finish);
    EXCEPTION WHEN OTHERS THEN
        PERFORM session_lock.bad_declaration(task_table, pg_catalog.format(
            'finish %L does not work: %s', finish, SQLERRM));
    END;

    SELECT * INTO v_old FROM session_lock.task_table t WHERE t.task_table = declare_task_table.task_table;
    INSERT INTO session_lock.task_table AS t
           (task_table, fn_schema, fn_prefix, id_column, open_when, finish, finished_by,
            order_by, notify, lock_timeout)
    VALUES (task_table, v_schema, fn_prefix, id_column, open_when, finish, finished_by,
            order_by, CASE WHEN notify = '' THEN 'session_lock_' || v_relname ELSE notify END,
            lock_timeout)
    ON CONFLICT ON CONSTRAINT task_table_pkey DO UPDATE
       SET fn_schema = EXCLUDED.fn_schema, fn_prefix = EXCLUDED.fn_prefix,
           id_column = EXCLUDED.id_column, open_when = EXCLUDED.open_when,
           finish = EXCLUDED.finish, finished_by = EXCLUDED.finished_by,
           order_by = EXCLUDED.order_by, notify = EXCLUDED.notify,
           lock_timeout = EXCLUDED.lock_timeout;

    -- The one index the protocol reads: open tasks by holder, then in
    -- pickup order. Pickup is a range scan of its (session_id IS NULL)
    -- part, a session's tasks the (session_id = S) part, and the bounded
    -- count an index-only scan. Partial, so it stays the size of the open
    -- backlog. Rebuilt when the declaration's open_when or order_by change.
    v_index := fn_prefix || '_open_idx';
    IF v_old.task_table IS NOT NULL
       AND (v_old.open_when <> open_when OR v_old.order_by <> order_by) THEN
        EXECUTE pg_catalog.format('DROP INDEX IF EXISTS %I.%I', v_schema, v_index);
    END IF;
    EXECUTE pg_catalog.format('CREATE INDEX IF NOT EXISTS %I ON %s (session_id, %s) WHERE (%s)',
        v_index, v_table, order_by, open_when);

    IF notify IS NULL THEN
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS session_lock_notify ON %s', v_table);
    ELSE
        EXECUTE pg_catalog.format(
            'CREATE OR REPLACE TRIGGER session_lock_notify AFTER INSERT ON %s '
            'FOR EACH STATEMENT EXECUTE FUNCTION session_lock.notify_task_inserted(%L)',
            v_table, CASE WHEN notify = '' THEN 'session_lock_' || v_relname ELSE notify END);
    END IF;

    -- The task template's functions, which the generated ones replace.
    PERFORM session_lock.drop_template_functions(v_schema, fn_prefix);

    PERFORM session_lock.generate_task_table(task_table);
END;
$$;

-- Drops the functions a task template of the first release defined for
-- p_prefix (the generated functions replace them).
CREATE OR REPLACE FUNCTION session_lock.drop_template_functions(p_schema name, p_prefix text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_signature text;
    v_function  text;
BEGIN
    FOREACH v_signature IN ARRAY ARRAY[
        'count_free(bigint)', 'count(bigint)', 'count_for_session(bigint)',
        'pickup(bigint, integer)', 'release(bigint[], integer)',
        'get_for_session(bigint)', 'finish(bigint, bigint[])',
        'get_work(bigint, integer, interval)']
    LOOP
        v_function := pg_catalog.format('%I.%I%s', p_schema,
            p_prefix || '_' || pg_catalog.split_part(v_signature, '(', 1),
            '(' || pg_catalog.split_part(v_signature, '(', 2));
        -- Only those that exist: DROP ... IF EXISTS would say, for each
        -- one missing, that it skipped it.
        IF pg_catalog.to_regprocedure(v_function) IS NOT NULL THEN
            EXECUTE 'DROP FUNCTION ' || v_function;
        END IF;
    END LOOP;
END;
$$;

-- Undoes a declaration: drops the generated functions, the notify
-- trigger and the registry row. The table, its session_id column and its
-- index stay (the index is the user's to drop).
CREATE OR REPLACE FUNCTION session_lock.forget_task_table(p_table regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d session_lock.task_table%ROWTYPE;
    v_signature text;
BEGIN
    SELECT * INTO d FROM session_lock.task_table t WHERE t.task_table = p_table;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    FOREACH v_signature IN ARRAY ARRAY[
        'finish_ids(bigint, bigint[])', 'free_of(bigint[], integer)',
        'count_open(text, bigint, integer, bigint)', 'sweep(bigint, bigint, boolean)',
        'get_work(bigint, bigint[], bigint[], boolean)',
        'get_work(bigint, integer, interval, bigint[])',
        'finish_tasks(bigint, bigint[])', 'held()']
    LOOP
        EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS %I.%I%s', d.fn_schema,
            d.fn_prefix || '_' || pg_catalog.split_part(v_signature, '(', 1),
            '(' || pg_catalog.split_part(v_signature, '(', 2));
    END LOOP;
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS session_lock_notify ON %s', p_table);
    DELETE FROM session_lock.task_table t WHERE t.task_table = p_table;
END;
$$;

-- For operators: a task table's open tasks per holding session, with
-- whether that session is live. p_held names the table's *_held function;
-- it is resolved by Postgres as a regproc, so only an existing function
-- can be called, and its name is quoted by the regproc output.
CREATE OR REPLACE FUNCTION session_lock.task_overview(p_held regproc)
RETURNS TABLE (session_id bigint, tasks bigint, live boolean)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY EXECUTE pg_catalog.format(
        'SELECT h.session_id, h.tasks::bigint,
                (h.session_id IS NOT NULL AND EXISTS (
                    SELECT 1 FROM session_lock.live_session l WHERE l.id = h.session_id))
           FROM %s() h', p_held);
END;
$$;

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA session_lock FROM PUBLIC;

SELECT session_lock.generate_task_tables();
