-- session-lock task tables: the declaration, and the protocol generated
-- from it for every declared table. Re-applied on every run (a
-- *.alwaysup.sql file), and it re-generates every declared table's
-- functions at its end: upgrading session-lock and migrating upgrades the
-- protocol of every task table, with nothing for anyone to copy.
--
-- A user declares a table once (in a migration, or with
-- Migrator::task_table in Rust), as the table's owner:
--
--     SELECT session_lock.declare_task_table('public.email',
--         open_when   => 'sent_at IS NULL',
--         finish      => 'sent_at = now()',
--         finished_by => 'sent_by');
--
-- and session-lock adds what the protocol needs to the table (a BIGINT
-- session_id column if missing, one partial index over open tasks, a
-- NOTIFY trigger) and generates its functions, in this schema, where only
-- session-lock's owner can create (so nobody can plant, replace or
-- overload them, and a runtime role needs no access to the table's schema):
--
--   session_lock.<prefix>_get_work(session, token, finished[], running[], sweep, known[],
--                                  finished_array)                               entry point
--   session_lock.<prefix>_finish_tasks(session, token, ids[])                      entry point
--   session_lock.<prefix>_held()                                                   for status
--   session_lock.<prefix>_quiet(session, token)                                    entry point
--   session_lock.<prefix>_finish_ids, _free_of, _count_open, _sweep                internal
--
-- Each is static PL/pgSQL (it keeps its cached plans; no dynamic SQL on
-- the hot path), made by replacing the {{placeholders}} of the templates
-- below. The declaration's fragments (open_when, finish, order_by) are
-- checked first by a small lexer: no ';' or '$' (nothing can end a
-- statement or a function body), no comments, balanced parentheses outside
-- strings, no '{{' or '}}' (no placeholder inside a fragment); they are
-- substituted last, each on lines of its own.
--
-- What a declaration may say is what differs between tables: which rows
-- are open, how a row is marked finished (and which column records the
-- finishing session), the order of pickup, the primary key column, the
-- notify channel, and the lock timeout. Everything else, the protocol
-- itself, is the same for every table and lives only here. For a table
-- that needs more (moving a finished row elsewhere, say), the finish may
-- set a column that a trigger of the table's owner acts on.
--
-- The generated functions run with their owner's rights, and so does
-- whatever the protocol's statements fire on the table. So the declarer
-- must own the table, and every trigger function on it must belong to the
-- declarer and pin its own search_path (checked at every generation).
--
-- The protocol, per get_work call of session S (name N, capacity C, table T):
--   1. check S's row is live and S's (its token), and that S works T (a
--      session works one task table, bound by its first get_work); before
--      its first write (at once when it has finishes to commit) the call
--      locks that row FOR KEY SHARE until commit, so an idle call writes
--      and commits nothing;
--   2. finish the previous batch's completed tasks (those S still holds);
--   3. read the live sessions of N that work T (or have not ticked yet):
--      total capacity W, the capacity of those before S (by id), the
--      others' held counters, S's neighbour; and whether any session of N
--      is due to be reclaimed;
--   4. if so, reclaim the expired and ended sessions of N other than S
--      (stamp, free their tasks here, SKIP LOCKED);
--   5. once per tick (p_sweep), sweep S's stretch of session ids for
--      orphans: open tasks whose session_id names no live session of T;
--   6. move S to its share of the open tasks it may pick up (not
--      quarantined, not waiting out a retry backoff): a weighted fair share,
--      floor(open * (before + C) / W) - floor(open * before / W), at most
--      C; open is counted only as far as W (past it every session is at
--      its capacity), and not at all when a pickup of all S still lacks
--      can stand in for the count; S's own tasks are looked up by key
--      among the ids the caller names (p_known: its last answer's), or
--      read from S's stretch of the open index when it names none, or when
--      S was last served by another server (a failover, a restart); in
--      the default order (by key) the pickup starts at the table's cursor,
--      where the last pickup began, and from the head of the free range
--      only for what that stretch lacks, on the first call of the table
--      that sweeps once the head is due (a second after the last walk
--      from it began, and no sooner than nine times its length after it
--      ended), and on one that reclaimed (freeing a dead session's tasks
--      moves the cursor back to them);
--   7. check S's lease again (a call that outlived it commits nothing),
--      record S's held counter, whether S is waiting (holds less than C:
--      inserts notify while a session of T waits) and the server, and
--      return the finished ids and S's tasks.
-- Every pickup counts an attempt (sl_attempts) and draws a fencing token
-- (sl_fence, from session_lock.fence, one per call for the tasks it takes:
-- a task's token grows with every change of holder); a task picked up
-- max_attempts times without being finished is quarantined: no longer
-- picked up until an operator retries it. A task its runner failed is
-- given back (fail_tasks) with a backoff before it can be picked up again
-- (sl_retry_at).
-- Every statement on task rows locks them FOR NO KEY UPDATE SKIP LOCKED
-- (the lock an UPDATE that keeps the key takes: a foreign-key child's
-- FOR KEY SHARE does not conflict with it), so a row someone else has
-- locked delays only that row, never the call; the finish alone updates
-- its rows directly, waiting at most 100 ms for one before it too skips
-- what is locked. The call runs under the declaration's lock_timeout (1 s
-- by default), with deferred constraints checked at once, so nothing
-- waits at commit while S's row is written.
-- The generated entry points also pin the settings that change how a
-- fragment reads (standard_conforming_strings, DateStyle, IntervalStyle,
-- TimeZone = UTC), whatever the caller set; the internal functions they
-- call run under them.

-- New tasks wake runners with room at once (LISTEN <channel>) instead of
-- at their next tick: one notification per statement, however many rows
-- it inserts, and only while a live session of the table (or one that has
-- not ticked yet, which may be of any table) is waiting (holds less than
-- its capacity: session.waiting, written with its held counter, and by
-- quiet) or the statement cannot tell. A session whose lease ran out is
-- left out even before it is reclaimed: its runner cannot take the task.
-- A notifying commit takes PostgreSQL's one notify lock and holds it
-- through its WAL flush, serialising every notifying commit of the
-- cluster; while every runner is busy with a backlog there is nobody to
-- wake, and inserts commit in groups.
-- The channel is the trigger's argument.
--
-- What a skipped notification may cost, and why no more:
-- - A runner goes quiet (waits quiet_tick, not tick) only through quiet,
--   which first takes the table's insert lock exclusive with a try and
--   says no when it fails. This trigger takes the lock shared, with a try,
--   before it reads the flags, and holds it to commit: so a quiet decision
--   never overlaps an insert in flight that did not see its session
--   waiting, and an insert that meets a quiet decision under way (the try
--   fails) notifies. Key: (1936485993 = 'slni', the table's oid), in the
--   two-integer space of advisory locks.
-- - A REPEATABLE READ or SERIALIZABLE statement reads the flags as of its
--   transaction's snapshot, which may predate them: it always notifies.
-- - A session whose get_work commits its flag after this read, while this
--   insert commits after that get_work's snapshot, was not told: it sees
--   the tasks at its next tick (at most a tick late, as without LISTEN).
CREATE OR REPLACE FUNCTION session_lock.notify_task_inserted()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sl_locked boolean;
BEGIN
    -- The lock before the read (two statements: an OR may run its
    -- operands in either order).
    sl_locked := pg_catalog.pg_try_advisory_xact_lock_shared(1936485993, TG_RELID::oid::integer);
    IF NOT sl_locked
       OR pg_catalog.current_setting('transaction_isolation') <> 'read committed'
       OR EXISTS (SELECT 1
                    FROM session_lock.session s
                   WHERE (s.task_table = TG_RELID::regclass OR s.task_table IS NULL)
                     AND s.waiting
                     AND s.ended_at IS NULL
                     AND s.reclaimed_at IS NULL
                     AND s.expires_at > pg_catalog.clock_timestamp()) THEN
        PERFORM pg_catalog.pg_notify(TG_ARGV[0], '');
    END IF;
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
-- and variables (and PL/pgSQL's own FOUND): a column of a declared table
-- may not have one of them, or a fragment mentioning it would be
-- ambiguous.
CREATE OR REPLACE FUNCTION session_lock.generated_names()
RETURNS text[]
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN ARRAY['found', 'p_session', 'p_token', 'p_finished', 'p_running', 'p_sweep',
                 'p_ids', 'p_sessions', 'p_limit', 'p_name', 'p_held', 'p_bound', 'p_next',
                 'p_lowest', 'p_count', 'sl_finished', 'sl_task', 'sl_name', 'sl_capacity',
                 'sl_bound', 'sl_done', 'sl_more', 'sl_dead', 'sl_weight', 'sl_before',
                 'sl_others', 'sl_next', 'sl_lowest', 'sl_held', 'sl_want', 'sl_got',
                 'sl_open', 'sl_share', 'sl_fast', 'sl_pick', 'sl_left_open', 'sl_reopened',
                 'sl_from', 'sl_to', 'sl_i', 'sl_at', 'sl_orphan', 'sl_live', 'sl_freed',
                 'sl_n', 'sl_steps', 'sl_due', 'sl_round', 'sl_suspects', 'sl_suspect', 'sl_rr',
                 'sl_cursor', 'sl_moved', 'sl_text', 'sl_prev', 'sl_g', 'sl_id', 'p_want', 'sl_ids',
                 'sl_stop', 'sl_held_was', 'sl_leased', 'sl_elsewhere', 'p_known', 'sl_new',
                 'sl_look', 'sl_same_server', 'sl_free', 'sl_tids', 'sl_drawn', 'sl_named',
                 'p_finished_array', 'sl_finished_ids', 'sl_first', 'sl_ahead', 'sl_began',
                 'sl_low', 'sl_now_ms', 'sl_walked', 'sl_walking', 'sl_lo', 'sl_hi', 'sl_behind',
                 'sl_fences', 'sl_seen_at', 'sl_seen', 'sl_need', 'sl_enough'];
END;
$$;

-- Checks one fragment of a declaration (p_what names it) before it goes
-- into generated code: not empty, no ';' or '$', no comments, no '{{' or
-- '}}', and, outside string literals and quoted identifiers, balanced
-- parentheses, so that it cannot break out of the parentheses or the line
-- it is put in. (standard_conforming_strings is pinned on in the generated
-- functions, so only E'...' strings treat a backslash as an escape.)
CREATE OR REPLACE FUNCTION session_lock.check_fragment(p_table regclass, p_what text, p_fragment text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_i     integer := 1;
    v_n     integer;
    v_c     text;
    v_depth integer := 0;
    v_state text := 'code';
BEGIN
    IF p_fragment IS NULL OR pg_catalog.btrim(p_fragment) = '' THEN
        PERFORM session_lock.bad_declaration(p_table, p_what || ' must not be empty');
    END IF;
    IF pg_catalog.strpos(p_fragment, ';') > 0 OR pg_catalog.strpos(p_fragment, '$') > 0 THEN
        PERFORM session_lock.bad_declaration(p_table,
            pg_catalog.format('%s %L may not contain ; or $', p_what, p_fragment));
    END IF;
    IF pg_catalog.strpos(p_fragment, '{{') > 0 OR pg_catalog.strpos(p_fragment, '}}') > 0 THEN
        PERFORM session_lock.bad_declaration(p_table,
            pg_catalog.format('%s %L may not contain {{ or }}', p_what, p_fragment));
    END IF;
    v_n := pg_catalog.length(p_fragment);
    WHILE v_i <= v_n LOOP
        v_c := pg_catalog.substr(p_fragment, v_i, 1);
        IF v_state = 'code' THEN
            IF v_c = '''' THEN
                v_state := CASE
                    WHEN v_i > 1 AND pg_catalog.lower(pg_catalog.substr(p_fragment, v_i - 1, 1)) = 'e'
                         AND (v_i = 2 OR pg_catalog.substr(p_fragment, v_i - 2, 1) !~ '[[:alnum:]_]')
                    THEN 'escape string' ELSE 'string' END;
            ELSIF v_c = '"' THEN
                v_state := 'identifier';
            ELSIF v_c = '(' THEN
                v_depth := v_depth + 1;
            ELSIF v_c = ')' THEN
                v_depth := v_depth - 1;
                IF v_depth < 0 THEN
                    PERFORM session_lock.bad_declaration(p_table, pg_catalog.format(
                        '%s %L closes a parenthesis it did not open', p_what, p_fragment));
                END IF;
            ELSIF (v_c = '-' AND pg_catalog.substr(p_fragment, v_i + 1, 1) = '-')
               OR (v_c = '/' AND pg_catalog.substr(p_fragment, v_i + 1, 1) = '*') THEN
                PERFORM session_lock.bad_declaration(p_table,
                    pg_catalog.format('%s %L may not contain a comment', p_what, p_fragment));
            END IF;
        ELSIF v_state = 'escape string' AND v_c = '\' THEN
            v_i := v_i + 1;
        ELSIF v_state IN ('string', 'escape string') AND v_c = '''' THEN
            IF pg_catalog.substr(p_fragment, v_i + 1, 1) = '''' THEN
                v_i := v_i + 1;
            ELSE
                v_state := 'code';
            END IF;
        ELSIF v_state = 'identifier' AND v_c = '"' THEN
            IF pg_catalog.substr(p_fragment, v_i + 1, 1) = '"' THEN
                v_i := v_i + 1;
            ELSE
                v_state := 'code';
            END IF;
        END IF;
        v_i := v_i + 1;
    END LOOP;
    IF v_state <> 'code' THEN
        PERFORM session_lock.bad_declaration(p_table,
            pg_catalog.format('%s %L leaves a %s open', p_what, p_fragment, v_state));
    END IF;
    IF v_depth <> 0 THEN
        PERFORM session_lock.bad_declaration(p_table,
            pg_catalog.format('%s %L leaves a parenthesis open', p_what, p_fragment));
    END IF;
END;
$$;

-- What must hold of a declared table for the protocol to run on it with
-- its owner's rights: the declarer (the current user) owns it, and what its
-- statements fire on it is the owner's own code that cannot be steered by
-- the caller: trigger functions belong to the owner and pin their
-- search_path, no rules, no forced row security.
CREATE OR REPLACE FUNCTION session_lock.check_task_table(p_table regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_owner name;
    v_kind  "char";
    v_force boolean;
    v_bad   text;
BEGIN
    SELECT c.relowner::regrole::name, c.relkind, c.relforcerowsecurity
      INTO v_owner, v_kind, v_force
      FROM pg_catalog.pg_class c
     WHERE c.oid = p_table;
    IF v_kind IS NULL OR v_kind NOT IN ('r', 'p') THEN
        PERFORM session_lock.bad_declaration(p_table, 'it is not a table');
    END IF;
    IF v_owner <> CURRENT_USER THEN
        PERFORM session_lock.bad_declaration(p_table, pg_catalog.format(
            'it is owned by %I, and must be declared by its owner (not %I): the generated functions run with the declarer''s rights, and so does what fires on the table',
            v_owner, CURRENT_USER));
    END IF;
    SELECT pg_catalog.string_agg(pg_catalog.format('%I (function %s)', t.tgname, t.tgfoid::regprocedure), ', ')
      INTO v_bad
      FROM pg_catalog.pg_trigger t
      JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
     WHERE t.tgrelid = p_table
       AND NOT t.tgisinternal
       AND t.tgfoid <> 'session_lock.notify_task_inserted()'::regprocedure
       AND (p.proowner::regrole::name <> CURRENT_USER
            OR NOT EXISTS (SELECT 1 FROM pg_catalog.unnest(p.proconfig) AS c(setting)
                            WHERE c.setting LIKE 'search\_path=%'));
    IF v_bad IS NOT NULL THEN
        PERFORM session_lock.bad_declaration(p_table, pg_catalog.format(
            'its triggers %s run inside the protocol''s SECURITY DEFINER functions: each trigger function must belong to %I and pin its search_path (ALTER FUNCTION ... SET search_path = ...)',
            v_bad, CURRENT_USER));
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite r
                WHERE r.ev_class = p_table AND r.rulename <> '_RETURN') THEN
        PERFORM session_lock.bad_declaration(p_table, 'it has rules, which would run inside the protocol''s functions');
    END IF;
    IF v_force THEN
        PERFORM session_lock.bad_declaration(p_table, 'it forces row level security on its owner, whose policies would run inside the protocol''s functions');
    END IF;
END;
$$;

-- ---------------------------------------------------------------------------
-- The templates. One CREATE FUNCTION each; placeholders:
--   {{fn:NAME}}      the generated function session_lock.<prefix>_NAME
--   {{settings}}     the SET clauses every entry point pins
--   {{plans}}        the SET clauses of the functions on the hot path, which
--                    plan every statement once per connection (see
--                    generate_task_table)
--   {{internal}}     the SET clauses of the internal functions, which only
--                    the entry points call, and which take the rest of
--                    the entry point's settings: the search_path, and the
--                    lock_timeout (finish_ids pins its own)
--   {{lock_timeout}} the declaration's lock_timeout, a string literal
--   {{lease}}        get_work's session lock, taken before its first write
--                    (once: later ones see it held)
--   {{table}}        the table, schema-qualified and quoted
--   {{regclass}}     the table as a regclass constant
--   {{id}}           the primary key column, quoted
--   {{address}}      how get_work finds a row it has locked or updated: ctid,
--                    or for a partitioned table (whose partitions share
--                    addresses) the primary key column
--   {{address_type}} its type: tid or bigint
--   {{answer}}       get_work's row type, session_lock.<prefix>_answer
--   {{answer_row}}   the table's columns of a row h, as that type lists them
--   {{answer_nulls}} as many NULLs, each of its column's type
--   {{cursor}}       whether the pickup keeps a cursor (the order is the key's)
--   {{cursor_seq}}   the cursor, session_lock.<prefix>_cursor, as a regclass
--   {{head_at_seq}}  when a pickup may next start from the head instead,
--                    session_lock.<prefix>_head_at, as a regclass
--   {{free_seen_seq}}, {{free_seen_at_seq}}  the last count of free tasks
--                    left for later calls, and the fence drawn before it:
--                    session_lock.<prefix>_free_seen, _free_seen_at
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
-- and returns their ids. One plain UPDATE, in a subtransaction that waits
-- at most 100 ms for a row lock: a concurrent pickup that passed over a
-- row it found already taken keeps it locked until it commits
-- (milliseconds), while a foreign transaction may keep it for long. When
-- the wait runs out, the UPDATE is undone and done again over the rows
-- nobody else has locked (SKIP LOCKED, no wait): those still locked stay
-- held and unfinished, and the caller tries them again. Locking each row
-- before updating it, every time, would write each finished row twice.
-- The holder is compared with IS NOT DISTINCT FROM (p_session is never
-- NULL), which no index can serve: the rows are found by key, never by
-- reading the session's stretch of the open index, which the planner
-- prefers while the table is small and which keeps a dead entry for every
-- task the session held since a snapshot held elsewhere began.
-- A row the finish leaves open (reopened by the application, or a finish
-- that does not close it) is given back: it is not finished, and another
-- run will do it. Only the server that handed a task out finishes it
-- (sl_server, its postmaster's start time, kept at pickup): after a
-- failover to an asynchronous standby, the run's own writes may have been
-- lost with the old primary, so the task must run again, not be marked
-- finished on the new one (get_work gives such tasks back).
$tmpl$
CREATE OR REPLACE FUNCTION {{fn:finish_ids}}(p_session bigint, p_ids bigint[])
RETURNS bigint[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '100ms'
AS $sl_fn$
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
DECLARE
    sl_done     bigint[];
    sl_reopened bigint[];
BEGIN
    BEGIN
        WITH done AS (
            UPDATE {{table}} t
               SET
{{finish}}
             WHERE t.{{id}} = ANY (p_ids)
               AND t.session_id IS NOT DISTINCT FROM p_session
               AND (t.sl_server IS NULL OR t.sl_server = pg_catalog.pg_postmaster_start_time())
               AND (
{{open}}
                   )
            RETURNING t.{{id}} AS id, (
{{open}}
                                      ) AS left_open
        )
        SELECT coalesce(pg_catalog.array_agg(done.id) FILTER (WHERE NOT done.left_open), '{}'),
               coalesce(pg_catalog.array_agg(done.id) FILTER (WHERE done.left_open), '{}')
          INTO sl_done, sl_reopened
          FROM done;
    EXCEPTION WHEN lock_not_available THEN
        -- Without waits for rows, the declaration's lock_timeout again: a
        -- wait for the table itself (behind DDL) is bounded by it, as
        -- everywhere else.
        PERFORM pg_catalog.set_config('lock_timeout', {{lock_timeout}}, true);
        WITH done AS (
            UPDATE {{table}} t
               SET
{{finish}}
             WHERE t.{{id}} = ANY (ARRAY(
                       SELECT f.{{id}}
                         FROM {{table}} f
                        WHERE f.{{id}} = ANY (p_ids)
                          AND f.session_id IS NOT DISTINCT FROM p_session
                          AND (f.sl_server IS NULL
                               OR f.sl_server = pg_catalog.pg_postmaster_start_time())
                          AND (
{{open}}
                              )
                          FOR NO KEY UPDATE SKIP LOCKED))
            RETURNING t.{{id}} AS id, (
{{open}}
                                      ) AS left_open
        )
        SELECT coalesce(pg_catalog.array_agg(done.id) FILTER (WHERE NOT done.left_open), '{}'),
               coalesce(pg_catalog.array_agg(done.id) FILTER (WHERE done.left_open), '{}')
          INTO sl_done, sl_reopened
          FROM done;
    END;
    IF pg_catalog.cardinality(sl_reopened) > 0 THEN
        UPDATE {{table}} t
           SET session_id = NULL
         WHERE t.{{id}} = ANY (sl_reopened)
           AND t.session_id = p_session;
        RAISE WARNING 'session-lock: the finish of % left tasks % open; they were given back to run again (the declared finish must make open_when false)',
            {{name}}, sl_reopened;
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
{{internal}}
AS $sl_fn$
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
DECLARE
    sl_n   integer;
    sl_low bigint;
BEGIN
    WITH freed AS (
        UPDATE {{table}} t
           SET session_id = NULL
         WHERE t.{{id}} = ANY (ARRAY(
                   SELECT r.{{id}}
                     FROM {{table}} r
                    WHERE r.session_id = ANY (p_sessions)
                      AND (
{{open}}
                          )
                    LIMIT p_limit
                      FOR NO KEY UPDATE SKIP LOCKED))
        RETURNING t.{{id}} AS id
    )
    SELECT pg_catalog.count(*), pg_catalog.min(freed.id) INTO sl_n, sl_low FROM freed;
    -- Back to the lowest task freed, for every session's next pickup (the
    -- cursor is a hint: a pickup moving it on at the same time may undo
    -- this, and then a sweeping call finds them).
    IF {{cursor}} AND sl_low < pg_catalog.pg_sequence_last_value({{cursor_seq}}) THEN
        PERFORM pg_catalog.setval({{cursor_seq}}, sl_low);
    END IF;
    RETURN sl_n;
END;
$sl_fn$;
$tmpl$,
-- The open tasks of p_name's runners of this table, counted no further
-- than p_bound (free ones only if they can be picked up): p_held (the
-- caller's own), the other live sessions' held counters, and the free
-- tasks, in one statement and so one snapshot (a session moving tasks
-- between free and held commits both at once: the sum never counts a task
-- twice or misses one). The free tasks are counted from the pickup cursor
-- on, and behind it only for what that stretch lacks: the head of the
-- free range is where every task picked up left a dead entry, and a count
-- from there would read them all (the same number either way: the two
-- stretches, in turn, in one statement, bounded as get_work's pickup
-- bounds them, for the same reason).
-- A count goes on to three times the free tasks it needs and leaves what
-- it found for the calls after it: session_lock.<prefix>_free_seen, and in
-- <prefix>_free_seen_at the fence last drawn before it. A later call
-- takes that many, less the largest capacity of the table's live sessions
-- for every fence drawn since (one per pickup, of any table: no pickup
-- took more), as the free tasks there are at least, and counts only when
-- that is less than it needs: so in a deep backlog the sessions of a name
-- count once between them in a round of ticks, not once each. The free
-- tasks found so are a floor except for tasks another transaction
-- finished or deleted while free, which the next counts see. One call at a
-- time leaves a count (a try of an advisory lock held to commit, key
-- (1936483955 = 'slfs', the table's oid)), which it writes before its
-- fence, and a call reads the fence first: a count is never taken for
-- one made before the fence it is read with (one made after the fences
-- a call read is taken as it is). The sessions are read once, and the
-- count, which runs only when what was left falls short, in the same
-- statement.
$tmpl$
CREATE OR REPLACE FUNCTION {{fn:count_open}}(p_name text, p_session bigint, p_held integer, p_bound bigint)
RETURNS bigint
LANGUAGE plpgsql
{{internal}}
AS $sl_fn$
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
DECLARE
    sl_from    bigint := -9223372036854775808;
    sl_behind  bigint;
    sl_others  bigint;
    sl_fences  bigint;
    sl_seen_at bigint;
    sl_seen    bigint;
    sl_need    bigint;
    sl_enough  boolean;
    sl_n       bigint;
BEGIN
    -- (No fence drawn yet: none since.)
    sl_fences := coalesce(pg_catalog.pg_sequence_last_value('session_lock.fence'::pg_catalog.regclass), 0);
    sl_seen_at := pg_catalog.pg_sequence_last_value({{free_seen_at_seq}});
    sl_seen := pg_catalog.pg_sequence_last_value({{free_seen_seq}});
    IF {{cursor}} THEN
        sl_from := coalesce(pg_catalog.pg_sequence_last_value({{cursor_seq}}), sl_from);
    END IF;
    IF sl_from > -9223372036854775808 THEN
        sl_behind := sl_from;
    END IF;
    -- The sessions read once: the others' held counters and the largest
    -- capacity; the count (gated: not run when the count left by an
    -- earlier call is enough) in the same snapshot.
    SELECT o.held, o.need, o.floor >= o.need, coalesce(free.n, 0)
      INTO sl_others, sl_need, sl_enough, sl_n
      FROM (SELECT v.held, greatest(p_bound - p_held - v.held, 0) AS need,
                   coalesce(sl_seen - greatest(sl_fences - sl_seen_at, 0) * greatest(v.most, 1), -1) AS floor
              FROM (SELECT coalesce(pg_catalog.sum(s.held) FILTER (WHERE s.name = p_name
                                                                   AND s.id <> p_session), 0) AS held,
                           coalesce(pg_catalog.max(s.capacity), 0) AS most
                      FROM session_lock.session s
                     WHERE (s.task_table = {{regclass}} OR s.task_table IS NULL)
                       AND s.reclaimed_at IS NULL
                       AND s.ended_at IS NULL
                       AND s.expires_at > pg_catalog.clock_timestamp()) v) o
      LEFT JOIN LATERAL (
            SELECT pg_catalog.count(*) AS n
              FROM (SELECT 1
                      FROM (VALUES (sl_from, NULL::bigint),
                                   (CASE WHEN sl_behind IS NOT NULL THEN (-9223372036854775808)::bigint END,
                                    sl_behind)) r(lo, below)
                     CROSS JOIN LATERAL (
                            SELECT 1
                              FROM {{table}} c
                             WHERE o.floor < o.need
                               AND c.session_id IS NULL
                               AND c.{{id}} >= r.lo
                               AND (r.below IS NULL OR c.{{id}} < r.below)
                               AND (
{{open}}
                                   )
                               AND c.sl_attempts < {{max_attempts}}
                               AND (c.sl_retry_at IS NULL
                                    OR c.sl_retry_at <= pg_catalog.clock_timestamp())
                             ORDER BY c.session_id,
{{order}}
                             LIMIT 3 * o.need) t
                     LIMIT 3 * o.need) f
           ) free ON true;
    IF sl_enough THEN
        RETURN p_held + sl_others + sl_need;
    END IF;
    IF sl_n > sl_need
       AND pg_catalog.pg_try_advisory_xact_lock(1936483955, {{regclass}}::oid::integer) THEN
        PERFORM pg_catalog.setval({{free_seen_seq}}, sl_n);
        PERFORM pg_catalog.setval({{free_seen_at_seq}}, sl_fences);
    END IF;
    RETURN p_held + sl_others + least(sl_n, sl_need);
END;
$sl_fn$;
$tmpl$,
-- The sweep: frees the open tasks whose session_id names no live session
-- of this table, in the stretch of session ids that p_session looks after:
-- from its own id to the next live session of its name (p_next), and, for
-- the lowest (p_lowest), below its own id too. Every id is some live
-- session's to sweep, so an orphan (a task of a reaped session, of a
-- runner renamed away, reopened after its finisher was reaped, or left
-- behind by a reclaim that found it locked) is free within one tick. The
-- holder's row is locked FOR UPDATE, and stamped reclaimed, before its
-- tasks are freed: it can never be renewed afterwards.
$tmpl$
CREATE OR REPLACE FUNCTION {{fn:sweep}}(p_session bigint, p_next bigint, p_lowest boolean)
RETURNS integer
LANGUAGE plpgsql
{{internal}}
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
        -- A bounded number of holders per call (each an index probe): the
        -- rest wait a tick.
        WHILE sl_at <= sl_to[sl_i] AND sl_steps < 1000 LOOP
            sl_steps := sl_steps + 1;
            SELECT t.session_id INTO sl_orphan
              FROM {{table}} t
             WHERE t.session_id >= sl_at
               AND t.session_id <= sl_to[sl_i]
               AND (
{{open}}
                   )
             ORDER BY t.session_id
             LIMIT 1;
            EXIT WHEN NOT FOUND;
            SELECT s.ended_at IS NULL AND s.reclaimed_at IS NULL
                   AND s.expires_at > pg_catalog.clock_timestamp()
                   AND s.task_table = {{regclass}}
              INTO sl_live
              FROM session_lock.session s
             WHERE s.id = sl_orphan;
            IF NOT FOUND THEN
                sl_freed := sl_freed + {{fn:free_of}}(ARRAY[sl_orphan]::bigint[], 10000::integer);
            ELSIF NOT coalesce(sl_live, false) THEN
                -- Stamped under its row lock, re-checked there: a holder
                -- that is live after all (it renewed meanwhile) keeps its
                -- tasks, a row someone else has locked waits a tick. A live
                -- session of another table is not stamped (it is not dead),
                -- but holds nothing here.
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
                IF FOUND OR EXISTS (SELECT 1 FROM session_lock.session s
                                     WHERE s.id = sl_orphan
                                       AND s.task_table IS DISTINCT FROM {{regclass}}
                                       AND s.ended_at IS NULL AND s.reclaimed_at IS NULL
                                       AND s.expires_at > pg_catalog.clock_timestamp()) THEN
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
-- The round of a grouped table: up to p_want free tasks that can be
-- picked up, the first (in pickup order) of each group in turn, starting
-- after the group where p_session's last round stopped: the groups after
-- it, then the tasks without a group as one more group, then the groups
-- from the first up to it. Each group is one probe of the table's group
-- index that locks what it finds (SKIP LOCKED: a task another session or
-- transaction holds is passed over for the group's next one, with the
-- whole condition checked again on the locked row), so a round costs at
-- most p_want probes however many groups and tasks there are; a probe's
-- lower bound is always a typed value, never a NULL test, so that a
-- generic plan keeps it as an index condition. Returns the tasks it
-- locked, and whether the round took any (sl_moved) and the group it
-- stopped at (sl_stop; NULL for the tasks without a group, which puts the
-- next round at the first group). A cursor that no longer reads as the
-- group column's type (the column changed) starts at the first group. For
-- an ungrouped table, never called.
$tmpl$
CREATE OR REPLACE FUNCTION {{fn:round_robin}}(p_session bigint, p_want integer,
                                             OUT sl_ids bigint[], OUT sl_stop text,
                                             OUT sl_moved boolean)
LANGUAGE plpgsql
{{internal}}
AS $sl_fn$
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
DECLARE
    sl_text   text;
    sl_cursor {{group_type}};
    sl_prev   {{group_type}};
    sl_g      {{group_type}};
    sl_id     bigint;
BEGIN
    sl_ids := '{}';
    sl_moved := false;
    IF NOT {{grouped}} OR p_want <= 0 THEN
        RETURN;
    END IF;
    SELECT s.group_cursor INTO sl_text FROM session_lock.session s WHERE s.id = p_session;
    IF sl_text IS NOT NULL THEN
        BEGIN
            sl_cursor := sl_text::{{group_type}};
        EXCEPTION WHEN OTHERS THEN
            sl_cursor := NULL;
        END;
    END IF;

    -- The groups after the cursor (every group when there is none).
    sl_prev := sl_cursor;
    WHILE pg_catalog.cardinality(sl_ids) < p_want LOOP
        IF sl_prev IS NULL THEN
            SELECT f.{{group}}, f.{{id}} INTO sl_g, sl_id
              FROM {{table}} f
             WHERE f.session_id IS NULL
               AND (
{{open}}
                   )
               AND f.sl_attempts < LEAST({{suspect_from}}, {{max_attempts}})
               AND (f.sl_retry_at IS NULL OR f.sl_retry_at <= pg_catalog.clock_timestamp())
               AND f.{{group}} IS NOT NULL
             ORDER BY f.{{group}},
{{order}}
             LIMIT 1
               FOR NO KEY UPDATE SKIP LOCKED;
        ELSE
            SELECT f.{{group}}, f.{{id}} INTO sl_g, sl_id
              FROM {{table}} f
             WHERE f.session_id IS NULL
               AND (
{{open}}
                   )
               AND f.sl_attempts < LEAST({{suspect_from}}, {{max_attempts}})
               AND (f.sl_retry_at IS NULL OR f.sl_retry_at <= pg_catalog.clock_timestamp())
               AND f.{{group}} > sl_prev
             ORDER BY f.{{group}},
{{order}}
             LIMIT 1
               FOR NO KEY UPDATE SKIP LOCKED;
        END IF;
        EXIT WHEN NOT FOUND;
        sl_ids := sl_ids || sl_id;
        sl_prev := sl_g;
        sl_stop := sl_g::text;
        sl_moved := true;
    END LOOP;

    -- The tasks without a group, as one more group. When no round is
    -- under way (no cursor) and no named group has a task to give, they
    -- are the only group, and the in-order fill after the round takes
    -- them in the same order without this probe.
    IF pg_catalog.cardinality(sl_ids) < p_want
       AND (sl_cursor IS NOT NULL OR pg_catalog.cardinality(sl_ids) > 0) THEN
        SELECT f.{{group}}, f.{{id}} INTO sl_g, sl_id
          FROM {{table}} f
         WHERE f.session_id IS NULL
           AND (
{{open}}
               )
           AND f.sl_attempts < LEAST({{suspect_from}}, {{max_attempts}})
           AND (f.sl_retry_at IS NULL OR f.sl_retry_at <= pg_catalog.clock_timestamp())
           AND f.{{group}} IS NULL
         ORDER BY f.{{group}},
{{order}}
         LIMIT 1
           FOR NO KEY UPDATE SKIP LOCKED;
        IF FOUND THEN
            sl_ids := sl_ids || sl_id;
            sl_stop := NULL;
            sl_moved := true;
        END IF;
    END IF;

    -- Wrapped around: the groups from the first up to the cursor.
    IF sl_cursor IS NOT NULL THEN
        sl_prev := NULL;
        WHILE pg_catalog.cardinality(sl_ids) < p_want LOOP
            IF sl_prev IS NULL THEN
                SELECT f.{{group}}, f.{{id}} INTO sl_g, sl_id
                  FROM {{table}} f
                 WHERE f.session_id IS NULL
                   AND (
{{open}}
                       )
                   AND f.sl_attempts < LEAST({{suspect_from}}, {{max_attempts}})
                   AND (f.sl_retry_at IS NULL OR f.sl_retry_at <= pg_catalog.clock_timestamp())
                   AND f.{{group}} <= sl_cursor
                 ORDER BY f.{{group}},
{{order}}
                 LIMIT 1
                   FOR NO KEY UPDATE SKIP LOCKED;
            ELSE
                SELECT f.{{group}}, f.{{id}} INTO sl_g, sl_id
                  FROM {{table}} f
                 WHERE f.session_id IS NULL
                   AND (
{{open}}
                       )
                   AND f.sl_attempts < LEAST({{suspect_from}}, {{max_attempts}})
                   AND (f.sl_retry_at IS NULL OR f.sl_retry_at <= pg_catalog.clock_timestamp())
                   AND f.{{group}} > sl_prev AND f.{{group}} <= sl_cursor
                 ORDER BY f.{{group}},
{{order}}
                 LIMIT 1
                   FOR NO KEY UPDATE SKIP LOCKED;
            END IF;
            EXIT WHEN NOT FOUND;
            sl_ids := sl_ids || sl_id;
            sl_prev := sl_g;
            sl_stop := sl_g::text;
            sl_moved := true;
        END LOOP;
    END IF;
END;
$sl_fn$;
$tmpl$,
-- The entry point of every tick: see the protocol at the top of this file.
-- Returns the ids it finished, then one row per task the session holds
-- (sl_finished and sl_finished_ids NULL, then its columns), in pickup
-- order. The finished ids come in one row (sl_finished_ids, every other
-- column NULL; none when nothing was finished) when p_finished_array, as
-- a runner asks; otherwise a row each (sl_finished), as an older runner
-- reads them: a row per id cost a draining call at batch 100 a tenth of
-- its CPU, in PostgreSQL and in the runner that read them.
-- p_running: tasks still running in the caller's process, never released.
$tmpl$
CREATE OR REPLACE FUNCTION {{fn:get_work}}(
    p_session  bigint,
    p_token    uuid,
    p_finished bigint[] DEFAULT '{}',
    p_running  bigint[] DEFAULT '{}',
    p_sweep    boolean  DEFAULT true,
    p_known    bigint[] DEFAULT NULL,
    p_finished_array boolean DEFAULT false
)
RETURNS SETOF {{answer}}
LANGUAGE plpgsql
SECURITY DEFINER
{{settings}}
{{plans}}
AS $sl_fn$
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
DECLARE
    sl_name     text;
    sl_capacity integer;
    sl_bound    regclass;
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
    sl_suspect  bigint[] := '{}';
    sl_rr       bigint[] := '{}';
    sl_cursor   text;
    sl_moved    boolean := false;
    sl_share    bigint;
    sl_n        integer;
    sl_due      bigint;
    sl_round    text;
    sl_suspects bigint;
    sl_elsewhere bigint;
    sl_new      bigint[] := '{}';
    sl_free     {{address_type}}[] := '{}';
    sl_tids     {{address_type}}[] := '{}';
    sl_drawn    bigint;
    sl_named    boolean := false;
    sl_look     bigint[] := '{}';
    sl_same_server boolean;
    sl_held_was integer;
    sl_waiting_was boolean;
    sl_leased   boolean := false;
    sl_from     bigint;
    sl_first    integer;
    sl_ahead    {{address_type}}[] := '{}';
    sl_lo       bigint;
    sl_behind   bigint;
    sl_began    bigint;
    sl_now_ms   bigint;
    sl_walked   bigint;
    sl_walking  boolean := false;
BEGIN
    IF p_finished IS NULL OR p_running IS NULL OR p_sweep IS NULL OR p_finished_array IS NULL THEN
        RAISE EXCEPTION 'get_work of %: finished, running, sweep and finished_array must not be NULL', {{name}}
            USING ERRCODE = 'SL003';
    END IF;
    p_finished := pg_catalog.array_remove(p_finished, NULL);
    p_running := pg_catalog.array_remove(p_running, NULL);
    -- Deferred constraints now, not at commit, when this session's row is
    -- written and its heartbeat would wait for them.
    SET CONSTRAINTS ALL IMMEDIATE;

    -- 1. The lease: live and the caller's. Before its first write the call
    -- locks its session row FOR KEY SHARE (the lease placeholder: it
    -- conflicts with a reclaimer's FOR UPDATE but not with the heartbeat's
    -- UPDATE, so this call never delays its own session's renewal) and
    -- keeps it from reclaimers until commit. A call with finishes takes it
    -- here, in the read of its row; an idle one may never need it: it
    -- writes nothing, and commits nothing. (Two statements, one with the
    -- lock: a lock clause cannot depend on a value.)
    IF pg_catalog.cardinality(p_finished) > 0 THEN
        SELECT s.name, s.capacity, s.task_table, s.group_cursor, s.held, s.waiting,
               s.server IS NOT DISTINCT FROM pg_catalog.pg_postmaster_start_time()
          INTO sl_name, sl_capacity, sl_bound, sl_round, sl_held_was, sl_waiting_was, sl_same_server
          FROM session_lock.session s
         WHERE s.id = p_session
           AND s.token = p_token
           AND s.protocol = 2
           AND s.ended_at IS NULL
           AND s.reclaimed_at IS NULL
           AND s.expires_at > pg_catalog.clock_timestamp()
           FOR KEY SHARE;
        sl_leased := FOUND;
    ELSE
        SELECT s.name, s.capacity, s.task_table, s.group_cursor, s.held, s.waiting,
               s.server IS NOT DISTINCT FROM pg_catalog.pg_postmaster_start_time()
          INTO sl_name, sl_capacity, sl_bound, sl_round, sl_held_was, sl_waiting_was, sl_same_server
          FROM session_lock.session s
         WHERE s.id = p_session
           AND s.token = p_token
           AND s.protocol = 2
           AND s.ended_at IS NULL
           AND s.reclaimed_at IS NULL
           AND s.expires_at > pg_catalog.clock_timestamp();
    END IF;
    IF NOT FOUND THEN
        PERFORM session_lock.raise_not_live(p_session);
    END IF;
    IF sl_bound IS DISTINCT FROM {{regclass}} AND sl_bound IS NOT NULL THEN
        RAISE EXCEPTION 'session % works task table %, not %: a session works one task table', p_session, sl_bound, {{name}}
            USING ERRCODE = 'SL003';
    END IF;

    -- 2. The previous batch's completed tasks, fenced by the lease above.
    IF pg_catalog.cardinality(p_finished) > 0 THEN
        sl_done := {{fn:finish_ids}}(p_session, p_finished);
    END IF;

    -- 3. The live sessions of this name that work this table (or have not
    -- ticked yet, and will), read once; and how many sessions of the name
    -- are due to be reclaimed.
    SELECT pg_catalog.sum(s.capacity) FILTER (WHERE sl_live),
           coalesce(pg_catalog.sum(s.capacity) FILTER (WHERE sl_live AND s.id < p_session), 0),
           coalesce(pg_catalog.sum(s.held) FILTER (WHERE sl_live AND s.id <> p_session), 0),
           pg_catalog.min(s.id) FILTER (WHERE sl_live AND s.id > p_session),
           pg_catalog.min(s.id) FILTER (WHERE sl_live),
           pg_catalog.count(*) FILTER (WHERE NOT sl_live AND s.id <> p_session
                                         AND (s.ended_at IS NOT NULL
                                              OR s.expires_at <= pg_catalog.clock_timestamp()))
      INTO sl_weight, sl_before, sl_others, sl_next, sl_lowest, sl_due
      FROM session_lock.session s
     CROSS JOIN LATERAL (
           SELECT s.id = p_session
               OR ((s.task_table = {{regclass}} OR s.task_table IS NULL)
                   AND s.ended_at IS NULL
                   AND s.expires_at > pg_catalog.clock_timestamp()) AS sl_live) l
     WHERE s.name = sl_name
       AND s.reclaimed_at IS NULL;

    -- 4. The expired and ended sessions of this name, if any: stamped
    -- under their row lock (SKIP LOCKED: a row still locked is a session at
    -- work, or one another survivor is reclaiming), then their tasks freed
    -- here. Never this session itself, whatever its lease says by now
    -- (step 7 decides that).
    IF sl_due > 0 THEN
{{lease}}
        WITH dead AS (
            SELECT s.id
              FROM session_lock.session s
             WHERE s.name = sl_name
               AND s.id <> p_session
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
    END IF;

    -- 5. Orphans in this session's stretch of ids, once per tick. A
    -- stretch where nobody holds an open task (the usual case: most of it
    -- lies between sessions of this name) is seen empty by a probe or two
    -- here, without a call.
    -- (Two IFs: the probes' plans start only on a tick that sweeps.)
    IF p_sweep THEN
        IF EXISTS (SELECT 1
                     FROM {{table}} o
                    WHERE o.session_id > p_session
                      AND o.session_id <= coalesce(sl_next - 1, 9223372036854775807)
                      AND (
{{open}}
                          ))
           OR (sl_lowest = p_session
               AND EXISTS (SELECT 1
                             FROM {{table}} o
                            WHERE o.session_id < p_session
                              AND (
{{open}}
                                  ))) THEN
{{lease}}
            PERFORM {{fn:sweep}}(p_session, sl_next, (sl_lowest = p_session)::boolean);
        END IF;
    END IF;

    -- 6. The share. When this session's tasks and the others' held
    -- counters leave no more to find than it still lacks, a pickup of all
    -- it lacks stands in for the count: if it gets them all, the open
    -- tasks reach W and the share is the capacity (every draining call).
    -- The session's open tasks: among the ids its last answer named, when
    -- the caller passes them (p_known, which may leave out the ids it asks
    -- to finish: those this call did not finish are looked up too), else
    -- its whole range of the open index. Only this session's own get_work
    -- gives it tasks, so a caller that read every answer since knows them
    -- all; one that may have missed an answer (an error, a restart) passes
    -- NULL. Looked up by key, they cost the same however long a snapshot
    -- held elsewhere has kept the range's dead entries (one for every task
    -- the session held since); a draining call, which finished all it
    -- held, looks up nothing. Each id is one probe of the primary key,
    -- whatever the statistics said when the plan was made (the lateral
    -- subquery with OFFSET 0 leaves the planner no other path): a range
    -- read filtered by the ids looks cheaper to it while the open index is
    -- small, and reads every dead entry of the range once it is not.
    IF NOT sl_same_server THEN
        -- Another server than the one that gave the caller its answers (a
        -- failover, a restart): its rows may be older than those answers.
        p_known := NULL;
    END IF;
    IF p_known IS NULL THEN
        SELECT pg_catalog.count(*), pg_catalog.count(*) FILTER (WHERE h.sl_attempts > {{suspect_from}}),
               pg_catalog.count(*) FILTER (WHERE h.sl_server <> pg_catalog.pg_postmaster_start_time())
          INTO sl_held, sl_suspects, sl_elsewhere
          FROM {{table}} h
         WHERE h.session_id = p_session
           AND (
{{open}}
               );
    ELSE
        sl_look := CASE WHEN pg_catalog.cardinality(sl_done) < pg_catalog.cardinality(p_finished)
                        THEN p_known || p_finished
                        ELSE p_known
                   END;
        IF pg_catalog.cardinality(sl_look) = 0 THEN
            sl_held := 0;
            sl_suspects := 0;
            sl_elsewhere := 0;
        ELSE
            SELECT pg_catalog.count(*), pg_catalog.count(*) FILTER (WHERE h.sl_attempts > {{suspect_from}}),
                   pg_catalog.count(*) FILTER (WHERE h.sl_server <> pg_catalog.pg_postmaster_start_time())
              INTO sl_held, sl_suspects, sl_elsewhere
              FROM (SELECT DISTINCT u.sl_finished
                      FROM pg_catalog.unnest(sl_look) AS u(sl_finished)) AS k
             CROSS JOIN LATERAL (SELECT * FROM {{table}} t
                                  WHERE t.{{id}} = k.sl_finished OFFSET 0) AS h
             WHERE h.session_id = p_session
               AND (
{{open}}
                   );
        END IF;
    END IF;
    IF sl_elsewhere > 0 THEN
        -- Handed out by another server (a failover since: the session came
        -- over with the standby): their runs' writes may be lost with the
        -- old primary, and only the server that handed a task out finishes
        -- it. Given back to run again, except those still running here,
        -- which go back when they return; and this call picks up nothing,
        -- so that none comes straight back to the caller, which would
        -- take it for a completed task it still holds and finish it.
{{lease}}
        UPDATE {{table}} t
           SET session_id = NULL
         WHERE t.{{id}} = ANY (ARRAY(
                   SELECT r.{{id}}
                     FROM {{table}} r
                    WHERE r.session_id = p_session
                      AND (
{{open}}
                          )
                      AND r.sl_server <> pg_catalog.pg_postmaster_start_time()
                      AND NOT (r.{{id}} = ANY (p_running))
                      FOR NO KEY UPDATE SKIP LOCKED));
        GET DIAGNOSTICS sl_n = ROW_COUNT;
        sl_held := sl_held - sl_n;
        sl_elsewhere := sl_n;
    END IF;
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
    IF sl_pick > 0 AND sl_elsewhere = 0 THEN
{{lease}}
        -- A task whose holders died twice (sl_attempts >= 2) may be what
        -- kills them: a session takes at most one such task at a time, so
        -- that it cannot take the same other tasks down with it again
        -- (found through their own small index). Only where tasks are
        -- quarantined: that is what bystanders are kept out of.
        -- Grouped: one task of each group with free tasks in turn, from
        -- where this session's last round stopped; the rest in order. With
        -- no round under way and no free task in a named group, the round
        -- would take nothing: it is not called. (The suspect and whether a
        -- named group has a free task are asked in one statement.)
        IF sl_suspects = 0 OR ({{grouped}} AND sl_round IS NULL) THEN
            SELECT CASE WHEN sl_suspects = 0 THEN ARRAY(
                       SELECT f.{{id}}
                         FROM {{table}} f
                        WHERE f.session_id IS NULL
                          AND (
{{open}}
                              )
                          AND f.sl_attempts >= {{suspect_from}}
                          AND f.sl_attempts < {{max_attempts}}
                          AND (f.sl_retry_at IS NULL
                               OR f.sl_retry_at <= pg_catalog.clock_timestamp())
                        ORDER BY
{{order}}
                        LIMIT 1
                          FOR NO KEY UPDATE SKIP LOCKED)
                   ELSE '{}'::bigint[]
                   END,
                   {{grouped}} AND sl_round IS NULL
                   AND EXISTS (SELECT 1
                                 FROM {{table}} f
                                WHERE f.session_id IS NULL
                                  AND (
{{open}}
                                      )
                                  AND f.sl_attempts < LEAST({{suspect_from}}, {{max_attempts}})
                                  AND (f.sl_retry_at IS NULL
                                       OR f.sl_retry_at <= pg_catalog.clock_timestamp())
                                  AND f.{{group}} IS NOT NULL)
              INTO sl_suspect, sl_named;
        END IF;
        IF {{grouped}} AND sl_pick > pg_catalog.cardinality(sl_suspect)
           AND (sl_round IS NOT NULL OR sl_named) THEN
            SELECT r.sl_ids, r.sl_stop, r.sl_moved INTO sl_rr, sl_cursor, sl_moved
              FROM {{fn:round_robin}}(p_session, sl_pick - pg_catalog.cardinality(sl_suspect)) r;
        END IF;
        -- The rest in order, locked where they stand: by their row
        -- addresses the UPDATE below goes straight to them (no lookup by
        -- key), and they stay where they are while this call holds them.
        -- (A partitioned table's partitions share addresses: there the
        -- address is the key.) The suspect and the round's tasks, locked
        -- by key, are found by it once.
        IF pg_catalog.cardinality(sl_suspect) + pg_catalog.cardinality(sl_rr) > 0 THEN
            sl_free := ARRAY(SELECT t.{{address}}
                               FROM {{table}} t
                              WHERE t.{{id}} = ANY (sl_suspect || sl_rr));
        END IF;
        -- In key order, from the table's pickup cursor: where the last
        -- pickup began, so that this one steps over no more than the
        -- tasks taken since (each leaves a dead entry at the head of the
        -- free range, which a snapshot held elsewhere keeps, and a walk
        -- from the head would read them all, every call). From the head,
        -- for what the cursor's stretch lacks, on a call that reclaimed,
        -- and on the first call that sweeps once the head is due (of any
        -- session of the table): what is free behind the cursor (a task
        -- whose backoff ended, a row another transaction had locked while
        -- pickups passed it, a pickup rolled back, a task reopened by
        -- hand) is picked up there. The head is due a second after the
        -- last walk from it began, and no sooner than nine times that
        -- walk's length after it ended (at most 50 s), so that however
        -- many dead entries a snapshot keeps there, the walks take at
        -- most a tenth of the time; and at once when the clock went back
        -- more than a minute. Only for the default order (the key): with
        -- any other the whole pickup is from the head.
        IF {{cursor}} AND sl_dead IS NULL THEN
            IF p_sweep THEN
                sl_now_ms := (EXTRACT(EPOCH FROM pg_catalog.clock_timestamp()) * 1000)::bigint;
                sl_walked := pg_catalog.pg_sequence_last_value({{head_at_seq}});
                IF sl_walked IS NULL OR sl_now_ms >= sl_walked OR sl_walked - sl_now_ms > 60000 THEN
                    -- Due: walked by this call; not by another in this second.
                    PERFORM pg_catalog.setval({{head_at_seq}}, sl_now_ms + 1000);
                    sl_walking := true;
                END IF;
            END IF;
            IF NOT sl_walking THEN
                sl_from := pg_catalog.pg_sequence_last_value({{cursor_seq}});
            END IF;
        END IF;
        -- One statement for both stretches, from the cursor on (ids from
        -- sl_lo), then from the head (ids below sl_behind) for what is
        -- missing, so that they take tasks by the same rules. Each
        -- stretch is a row the scan is parameterized by, with one bound
        -- in the index and the upper one a filter: get_work's plans are
        -- generic (pinned: made once per connection), and a generic
        -- plan takes a range between two unknown values for a two hundredth
        -- of the table, and would sort that range out of the primary key
        -- instead of walking the open index in order. (The head's stretch
        -- is read only when the cursor's came up short, so past sl_behind it
        -- reads no more than that stretch had.)
        sl_first := sl_pick - pg_catalog.cardinality(sl_suspect) - pg_catalog.cardinality(sl_rr);
        sl_lo := coalesce(sl_from, -9223372036854775808);
        IF sl_lo > -9223372036854775808 THEN
            sl_behind := sl_lo;
        END IF;
        sl_ahead := ARRAY(
                   SELECT p.address
                     FROM (VALUES (sl_lo, NULL::bigint),
                                  (CASE WHEN sl_behind IS NOT NULL THEN (-9223372036854775808)::bigint END,
                                   sl_behind)) r(lo, below)
                    CROSS JOIN LATERAL (
                          SELECT f.{{address}} AS address
                            FROM {{table}} f
                           WHERE f.session_id IS NULL
                             AND f.{{id}} >= r.lo
                             AND (r.below IS NULL OR f.{{id}} < r.below)
                             AND (
{{open}}
                                 )
                             AND f.sl_attempts < LEAST({{suspect_from}}, {{max_attempts}})
                             AND (f.sl_retry_at IS NULL
                                  OR f.sl_retry_at <= pg_catalog.clock_timestamp())
                             AND NOT (f.{{id}} = ANY (sl_rr))
                           ORDER BY f.session_id,
{{order}}
                           LIMIT sl_first
                             FOR NO KEY UPDATE SKIP LOCKED) p
                    LIMIT sl_first);
        sl_free := sl_free || sl_ahead;
        -- Each pickup is an attempt, and gets a new fencing token: one per
        -- call, shared by the tasks it takes. The new rows' addresses are
        -- what the answer reads them by.
        sl_drawn := pg_catalog.nextval('session_lock.fence'::pg_catalog.regclass);
        WITH taken AS (
            UPDATE {{table}} t
               SET session_id = p_session,
                   sl_attempts = t.sl_attempts + 1,
                   sl_fence = sl_drawn,
                   sl_last_session = p_session,
                   sl_server = pg_catalog.pg_postmaster_start_time()
             WHERE t.{{address}} = ANY (sl_free)
               AND t.session_id IS NULL
            RETURNING t.{{address}} AS address, t.{{id}} AS id
        )
        SELECT coalesce(pg_catalog.array_agg(taken.address), '{}'),
               coalesce(pg_catalog.array_agg(taken.id), '{}'),
               coalesce(pg_catalog.min(taken.id) FILTER (WHERE taken.id >= sl_from
                                                             AND NOT (taken.id = ANY (sl_suspect || sl_rr))),
                        pg_catalog.min(taken.id) FILTER (WHERE NOT (taken.id = ANY (sl_suspect || sl_rr))))
          INTO sl_tids, sl_new, sl_began
          FROM taken;
        sl_got := pg_catalog.cardinality(sl_new);
        -- Where this pickup began (in key order, past the cursor when it
        -- took any there): the next one starts there. Not transactional,
        -- so a call rolled back after this leaves its tasks ahead of the
        -- cursor, not behind it.
        IF {{cursor}} AND sl_began IS NOT NULL THEN
            PERFORM pg_catalog.setval({{cursor_seq}}, sl_began);
        END IF;
        IF sl_walking THEN
            sl_walked := (EXTRACT(EPOCH FROM pg_catalog.clock_timestamp()) * 1000)::bigint;
            PERFORM pg_catalog.setval({{head_at_seq}}, greatest(
                sl_now_ms + 1000,
                sl_walked + least(9 * (sl_walked - sl_now_ms), 50000)));
        END IF;
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
        -- in the caller's process: a task not running here was not
        -- attempted (a failed run was given back already), so its pickup
        -- is not counted.
{{lease}}
        UPDATE {{table}} t
           SET session_id = NULL,
               sl_attempts = greatest(t.sl_attempts - 1, 0)
         WHERE t.{{id}} = ANY (ARRAY(
                   SELECT r.{{id}}
                     FROM {{table}} r
                    WHERE r.session_id = p_session
                      AND (
{{open}}
                          )
                      AND NOT (r.{{id}} = ANY (p_running))
                    ORDER BY r.{{id}} DESC
                    LIMIT sl_held - sl_share
                      FOR NO KEY UPDATE SKIP LOCKED));
        GET DIAGNOSTICS sl_n = ROW_COUNT;
        sl_held := sl_held - sl_n;
    END IF;

    -- 7. A call that outlived the lease commits nothing (its finishes
    -- neither); then the counter the others size their shares by, whether
    -- the session waits for new tasks (inserts notify while it does), the
    -- binding to this table, and the answer.
    PERFORM 1
       FROM session_lock.session s
      WHERE s.id = p_session
        AND s.expires_at > pg_catalog.clock_timestamp()
        AND s.ended_at IS NULL
        AND s.reclaimed_at IS NULL;
    IF NOT FOUND THEN
        PERFORM session_lock.raise_not_live(p_session);
    END IF;
    IF sl_held IS DISTINCT FROM sl_held_was OR sl_bound IS NULL OR NOT sl_same_server
       OR (sl_moved AND sl_cursor IS DISTINCT FROM sl_round)
       OR sl_waiting_was IS DISTINCT FROM (sl_held < sl_capacity) THEN
{{lease}}
        UPDATE session_lock.session s
           SET held = sl_held,
               waiting = sl_held < sl_capacity,
               server = pg_catalog.pg_postmaster_start_time(),
               task_table = {{regclass}},
               group_cursor = CASE WHEN sl_moved THEN sl_cursor ELSE s.group_cursor END
         WHERE s.id = p_session;
    END IF;
    BEGIN
    -- The finished ids first, then the tasks held.
    IF NOT p_finished_array THEN
        RETURN QUERY SELECT d.id, NULL::bigint[], {{answer_nulls}} FROM pg_catalog.unnest(sl_done) AS d(id);
    ELSIF pg_catalog.cardinality(sl_done) > 0 THEN
        RETURN QUERY SELECT NULL::bigint, sl_done, {{answer_nulls}};
    END IF;
    IF p_known IS NULL THEN
        RETURN QUERY
            (SELECT NULL::bigint, NULL::bigint[], {{answer_row}}
               FROM {{table}} h
              WHERE h.session_id = p_session
                AND (
{{open}}
                    )
              ORDER BY h.session_id,
{{order}}
            );
    ELSIF pg_catalog.cardinality(sl_look) = 0 THEN
        -- What it picked up now, as it stands (a draining call, which
        -- knew of nothing it still holds): read at the addresses its
        -- UPDATE gave the rows (one given back since is a dead version
        -- there, and not read). A plan of its own: without the lookup by
        -- key it has half the nodes to start.
        RETURN QUERY
            (SELECT NULL::bigint, NULL::bigint[], {{answer_row}}
               FROM (SELECT t.*
                       FROM {{table}} t
                      WHERE t.{{address}} = ANY (sl_tids)
                     OFFSET 0) AS h
              WHERE h.session_id = p_session
                AND (
{{open}}
                    )
              ORDER BY h.session_id,
{{order}}
            );
    ELSE
        -- What it knew (by key) and what it picked up now (by address, as
        -- above), as they stand. OFFSET 0 keeps the planner from taking
        -- the session's range of the open index instead.
        RETURN QUERY
            (SELECT NULL::bigint, NULL::bigint[], {{answer_row}}
               FROM ((SELECT t.*
                        FROM {{table}} t
                       WHERE t.{{address}} = ANY (sl_tids)
                      OFFSET 0)
                     UNION ALL
                     SELECT t.*
                       FROM (SELECT DISTINCT u.sl_finished
                               FROM pg_catalog.unnest(sl_look) AS u(sl_finished)
                              WHERE NOT (u.sl_finished = ANY (sl_new))) AS k
                      CROSS JOIN LATERAL (SELECT * FROM {{table}} t
                                           WHERE t.{{id}} = k.sl_finished OFFSET 0) AS t) AS h
              WHERE h.session_id = p_session
                AND (
{{open}}
                    )
              ORDER BY h.session_id,
{{order}}
            );
    END IF;
    EXCEPTION WHEN undefined_column OR datatype_mismatch THEN
        -- The answer names the columns the table had when this function
        -- was generated: one dropped or retyped since fails here, and the
        -- whole call with it.
        RAISE EXCEPTION 'get_work of %: its columns changed since its functions were generated (%)', {{name}}, SQLERRM
            USING ERRCODE = 'SL005',
                  HINT = 'Run the migrator, or SELECT session_lock.generate_task_tables(), after changing a task table''s columns.';
    END;
END;
$sl_fn$;
$tmpl$,
-- The fenced finish: raises SL001 when the session is not live or not the
-- caller's, otherwise finishes those of p_ids it still holds and returns
-- their ids.
$tmpl$
CREATE OR REPLACE FUNCTION {{fn:finish_tasks}}(p_session bigint, p_token uuid, p_ids bigint[])
RETURNS SETOF bigint
LANGUAGE plpgsql
SECURITY DEFINER
{{settings}}
{{plans}}
AS $sl_fn$
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
DECLARE
    sl_done  bigint[];
    sl_bound regclass;
BEGIN
    IF p_ids IS NULL THEN
        RAISE EXCEPTION 'finish_tasks of %: ids must not be NULL', {{name}}
            USING ERRCODE = 'SL003';
    END IF;
    SET CONSTRAINTS ALL IMMEDIATE;
    SELECT s.task_table INTO sl_bound
      FROM session_lock.session s
     WHERE s.id = p_session
       AND s.token = p_token
       AND s.protocol = 2
       AND s.ended_at IS NULL
       AND s.reclaimed_at IS NULL
       AND s.expires_at > pg_catalog.clock_timestamp()
       FOR KEY SHARE;
    IF NOT FOUND THEN
        PERFORM session_lock.raise_not_live(p_session);
    END IF;
    IF sl_bound IS DISTINCT FROM {{regclass}} AND sl_bound IS NOT NULL THEN
        RAISE EXCEPTION 'session % works task table %, not %: a session works one task table', p_session, sl_bound, {{name}}
            USING ERRCODE = 'SL003';
    END IF;
    sl_done := {{fn:finish_ids}}(p_session, pg_catalog.array_remove(p_ids, NULL));
    -- A call that outlived the lease commits nothing.
    PERFORM 1
       FROM session_lock.session s
      WHERE s.id = p_session
        AND s.expires_at > pg_catalog.clock_timestamp()
        AND s.ended_at IS NULL
        AND s.reclaimed_at IS NULL;
    IF NOT FOUND THEN
        PERFORM session_lock.raise_not_live(p_session);
    END IF;
    IF pg_catalog.cardinality(sl_done) > 0 THEN
        UPDATE session_lock.session s
           SET held = greatest(s.held - pg_catalog.cardinality(sl_done), 0),
               waiting = greatest(s.held - pg_catalog.cardinality(sl_done), 0) < s.capacity
         WHERE s.id = p_session;
    END IF;
    RETURN QUERY SELECT d.id FROM pg_catalog.unnest(sl_done) AS d(id);
END;
$sl_fn$;
$tmpl$,
-- The runner's failures: gives back those of p_ids the session holds
-- (and still open), each to wait out its backoff before it can be picked
-- up again: retry_backoff, doubled per attempt so far, at most
-- retry_backoff_max. Raises SL001 like finish_tasks; returns the ids given
-- back.
$tmpl$
CREATE OR REPLACE FUNCTION {{fn:fail_tasks}}(p_session bigint, p_token uuid, p_ids bigint[])
RETURNS SETOF bigint
LANGUAGE plpgsql
SECURITY DEFINER
{{settings}}
{{plans}}
AS $sl_fn$
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
DECLARE
    sl_done  bigint[];
    sl_bound regclass;
BEGIN
    IF p_ids IS NULL THEN
        RAISE EXCEPTION 'fail_tasks of %: ids must not be NULL', {{name}}
            USING ERRCODE = 'SL003';
    END IF;
    SET CONSTRAINTS ALL IMMEDIATE;
    SELECT s.task_table INTO sl_bound
      FROM session_lock.session s
     WHERE s.id = p_session
       AND s.token = p_token
       AND s.protocol = 2
       AND s.ended_at IS NULL
       AND s.reclaimed_at IS NULL
       AND s.expires_at > pg_catalog.clock_timestamp()
       FOR KEY SHARE;
    IF NOT FOUND THEN
        PERFORM session_lock.raise_not_live(p_session);
    END IF;
    IF sl_bound IS DISTINCT FROM {{regclass}} AND sl_bound IS NOT NULL THEN
        RAISE EXCEPTION 'session % works task table %, not %: a session works one task table', p_session, sl_bound, {{name}}
            USING ERRCODE = 'SL003';
    END IF;
    WITH failed AS (
        UPDATE {{table}} t
           SET session_id = NULL,
               sl_retry_at = pg_catalog.clock_timestamp() + least(
                   {{backoff}} * pg_catalog.power(2::double precision,
                       least(greatest(t.sl_attempts - 1, 0), 40)::double precision),
                   {{backoff_max}})
         WHERE t.{{id}} = ANY (ARRAY(
                   SELECT f.{{id}}
                     FROM {{table}} f
                    WHERE f.{{id}} = ANY (pg_catalog.array_remove(p_ids, NULL))
                      AND f.session_id = p_session
                      AND (
{{open}}
                          )
                      FOR NO KEY UPDATE SKIP LOCKED))
        RETURNING t.{{id}} AS id
    )
    SELECT coalesce(pg_catalog.array_agg(failed.id), '{}') INTO sl_done FROM failed;
    -- A call that outlived the lease commits nothing.
    PERFORM 1
       FROM session_lock.session s
      WHERE s.id = p_session
        AND s.expires_at > pg_catalog.clock_timestamp()
        AND s.ended_at IS NULL
        AND s.reclaimed_at IS NULL;
    IF NOT FOUND THEN
        PERFORM session_lock.raise_not_live(p_session);
    END IF;
    IF pg_catalog.cardinality(sl_done) > 0 THEN
        UPDATE session_lock.session s
           SET held = greatest(s.held - pg_catalog.cardinality(sl_done), 0),
               waiting = greatest(s.held - pg_catalog.cardinality(sl_done), 0) < s.capacity
         WHERE s.id = p_session;
    END IF;
    RETURN QUERY SELECT d.id FROM pg_catalog.unnest(sl_done) AS d(id);
END;
$sl_fn$;
$tmpl$,
-- The quarantined tasks (open, free, picked up max_attempts times), for
-- operators: `session-lock status` shows them.
$tmpl$
CREATE OR REPLACE FUNCTION {{fn:quarantined}}(p_limit integer)
RETURNS TABLE (task_id bigint, attempts integer, last_session bigint)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
{{settings}}
AS $sl_fn$
#variable_conflict use_column
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
BEGIN
    RETURN QUERY
        SELECT t.{{id}}, t.sl_attempts, t.sl_last_session
          FROM {{table}} t
         WHERE t.session_id IS NULL
           AND (
{{open}}
               )
           AND t.sl_attempts >= {{max_attempts}}
         ORDER BY t.{{id}}
         LIMIT p_limit;
END;
$sl_fn$;
$tmpl$,
-- Releases quarantined tasks (p_ids, or all when NULL) for pickup again,
-- their attempts counted from 0; returns their ids. For operators
-- (`session-lock retry`).
$tmpl$
CREATE OR REPLACE FUNCTION {{fn:retry}}(p_ids bigint[])
RETURNS SETOF bigint
LANGUAGE plpgsql
SECURITY DEFINER
{{settings}}
AS $sl_fn$
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
BEGIN
    RETURN QUERY
        UPDATE {{table}} t
           SET sl_attempts = 0,
               sl_retry_at = NULL
         WHERE (p_ids IS NULL OR t.{{id}} = ANY (p_ids))
           AND t.session_id IS NULL
           AND (
{{open}}
               )
           AND t.sl_attempts >= {{max_attempts}}
        RETURNING t.{{id}};
    -- Released tasks wake quiet runners, as an INSERT does.
    IF FOUND THEN
        {{notify}}
    END IF;
END;
$sl_fn$;
$tmpl$,
-- Open and held tasks per group of a grouped table, the groups with the
-- most open tasks first (at most p_limit), for operators: `session-lock
-- status` shows them. Nothing for an ungrouped table.
$tmpl$
CREATE OR REPLACE FUNCTION {{fn:groups}}(p_limit integer)
RETURNS TABLE (task_group text, open bigint, held bigint)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
{{settings}}
AS $sl_fn$
#variable_conflict use_column
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
BEGIN
    IF NOT {{grouped}} THEN
        RETURN;
    END IF;
    RETURN QUERY
        SELECT t.{{group}}::text, pg_catalog.count(*),
               pg_catalog.count(*) FILTER (WHERE t.session_id IS NOT NULL)
          FROM {{table}} t
         WHERE (
{{open}}
               )
         GROUP BY 1
         ORDER BY 2 DESC, 1
         LIMIT p_limit;
END;
$sl_fn$;
$tmpl$,
-- What a runner records as gauges every stats_interval, as (metric,
-- group, value) rows: 'held', the session's open tasks per group (the
-- p_groups groups holding most; group NULL for a NULL key), then
-- 'held_other', the rest of them in one row, both only for a grouped
-- table; then 'quarantined' and 'suspect', the table's free open tasks
-- picked up max_attempts times, and at least twice but fewer, without
-- finishing (both 0 when nothing is quarantined). The session's held tasks
-- are read through the open index, the others through the suspect index
-- (with max_attempts 1, through the open index's free part).
$tmpl$
CREATE OR REPLACE FUNCTION {{fn:stats}}(p_session bigint, p_groups integer)
RETURNS TABLE (metric text, task_group text, value bigint)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
{{settings}}
AS $sl_fn$
#variable_conflict use_column
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
BEGIN
    IF {{grouped}} THEN
        RETURN QUERY
            WITH held AS (
                SELECT t.{{group}}::text AS g, pg_catalog.count(*) AS n
                  FROM {{table}} t
                 WHERE t.session_id = p_session
                   AND (
{{open}}
                       )
                 GROUP BY 1
            ), ranked AS (
                SELECT h.g, h.n, pg_catalog.row_number() OVER (ORDER BY h.n DESC, h.g) AS r
                  FROM held h
            )
            SELECT 'held', r.g, r.n FROM ranked r WHERE r.r <= p_groups
            UNION ALL
            SELECT 'held_other', NULL, pg_catalog.sum(r.n)::bigint
              FROM ranked r WHERE r.r > p_groups
            HAVING pg_catalog.count(*) > 0;
    END IF;
    RETURN QUERY
        SELECT m.metric, NULL::text, m.value
          FROM (SELECT pg_catalog.count(*) FILTER (WHERE t.sl_attempts >= {{max_attempts}}) AS q,
                       pg_catalog.count(*) FILTER (WHERE t.sl_attempts < {{max_attempts}}) AS s
                  FROM {{table}} t
                 WHERE (
{{open}}
                       )
                   AND t.sl_attempts >= LEAST({{suspect_from}}, {{max_attempts}})
                   AND t.session_id IS NULL) c
         CROSS JOIN LATERAL (VALUES ('quarantined', c.q), ('suspect', c.s)) AS m(metric, value);
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
{{settings}}
AS $sl_fn$
#variable_conflict use_column
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
BEGIN
    RETURN QUERY
        SELECT t.session_id, pg_catalog.count(*)
          FROM {{table}} t
         WHERE (
{{open}}
               )
         GROUP BY t.session_id;
END;
$sl_fn$;
$tmpl$,
-- Whether the session's runner may wait for a notification instead of its
-- next tick: the lease is live, and no open task of the table could be
-- picked up without an INSERT first (none free, none held by any session,
-- none waiting out a retry backoff; quarantined ones come back through
-- retry, which notifies). Never while an INSERT is in flight (the table's
-- insert lock, taken exclusive with a try: see notify_task_inserted); and
-- the session is marked waiting before the answer, so every INSERT that
-- commits after it notifies: a runner that listened before it asked
-- misses nothing by waiting. Reads one index entry at most, and writes
-- the session's row only if get_work had not marked it.
$tmpl$
CREATE OR REPLACE FUNCTION {{fn:quiet}}(p_session bigint, p_token uuid)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
{{settings}}
{{plans}}
AS $sl_fn$
-- Generated by session-lock (protocol 2) for {{table}}: do not edit.
DECLARE
    sl_bound   regclass;
    sl_waiting boolean;
BEGIN
    IF NOT pg_catalog.pg_try_advisory_xact_lock(1936485993, {{regclass}}::oid::integer) THEN
        RETURN false;
    END IF;
    SELECT s.task_table, s.waiting INTO sl_bound, sl_waiting
      FROM session_lock.session s
     WHERE s.id = p_session
       AND s.token = p_token
       AND s.protocol = 2
       AND s.ended_at IS NULL
       AND s.reclaimed_at IS NULL
       AND s.expires_at > pg_catalog.clock_timestamp();
    IF NOT FOUND OR sl_bound IS DISTINCT FROM {{regclass}} AND sl_bound IS NOT NULL THEN
        RETURN false;
    END IF;
    IF sl_bound IS NULL OR NOT sl_waiting THEN
        -- Bound to this table as its first get_work would: the INSERT
        -- trigger looks for waiting sessions by table.
        UPDATE session_lock.session s
           SET waiting = true,
               task_table = {{regclass}}
         WHERE s.id = p_session;
    END IF;
    RETURN NOT EXISTS (
        SELECT 1
          FROM {{table}} o
         WHERE o.sl_attempts < {{max_attempts}}
           AND (
{{open}}
               ));
END;
$sl_fn$;
$tmpl$
    ];
END;
$templates$;

-- The functions generated for a table, by their names in session_lock
-- (with fn_prefix), and their argument lists.
CREATE OR REPLACE FUNCTION session_lock.generated_functions(p_prefix text)
RETURNS TABLE (name text, args text)
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p_prefix || '_' || f.suffix, f.args
      FROM (VALUES ('finish_ids', 'bigint, bigint[]'),
                   ('free_of', 'bigint[], integer'),
                   ('count_open', 'text, bigint, integer, bigint'),
                   ('sweep', 'bigint, bigint, boolean'),
                   ('round_robin', 'bigint, integer'),
                   ('get_work', 'bigint, uuid, bigint[], bigint[], boolean, bigint[], boolean'),
                   ('finish_tasks', 'bigint, uuid, bigint[]'),
                   ('fail_tasks', 'bigint, uuid, bigint[]'),
                   ('quarantined', 'integer'),
                   ('groups', 'integer'),
                   ('stats', 'bigint, integer'),
                   ('retry', 'bigint[]'),
                   ('held', ''),
                   ('quiet', 'bigint, uuid')) AS f(suffix, args)
$$;

-- Generates the protocol functions of one declared table from its
-- declaration and the templates above, and grants the entry points to
-- session_lock_runtime when that role exists. Refuses (SL005) to replace a
-- function of that name that another role owns.
CREATE OR REPLACE FUNCTION session_lock.generate_task_table(p_table regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d          session_lock.task_table%ROWTYPE;
    v_table    text;
    v_sql      text;
    v_finish   text;
    v_settings text;
    v_plans    text;
    v_internal text;
    v_lock_timeout text;
    v_lease    text;
    v_fn       record;
    v_foreign  text;
    v_col      record;
    v_type     text;
    v_group    name;
    v_gtype    text;
    v_answer   text;
    v_cursor   text;
    v_head_at  text;
    v_free_seen text;
    v_free_seen_at text;
    v_name     text;
    v_seq      regclass;
    v_columns  text;
    v_row      text;
    v_nulls    text;
    v_had      text;
    v_partitioned boolean;
    v_stamp    text;
    v_changed  boolean := false;
BEGIN
    SELECT * INTO d FROM session_lock.task_table t WHERE t.task_table = p_table;
    IF NOT FOUND THEN
        PERFORM session_lock.bad_declaration(p_table, 'it is not declared');
    END IF;
    PERFORM session_lock.check_task_table(p_table);
    SELECT pg_catalog.string_agg(p.oid::regprocedure::text, ', ')
      INTO v_foreign
      FROM pg_catalog.pg_proc p
     WHERE p.pronamespace = 'session_lock'::regnamespace
       AND p.proname IN (SELECT g.name FROM session_lock.generated_functions(d.fn_prefix) g)
       AND p.proowner::regrole::name <> CURRENT_USER;
    IF v_foreign IS NOT NULL THEN
        PERFORM session_lock.bad_declaration(p_table, pg_catalog.format(
            'functions %s have the names session-lock generates for it, but another role owns them: choose another fn_prefix, or drop them',
            v_foreign));
    END IF;
    SELECT pg_catalog.format('%I.%I', n.nspname, c.relname), c.relkind = 'p'
      INTO v_table, v_partitioned
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = p_table;

    -- The columns the protocol keeps on every task row, added when missing
    -- (no lock is taken when they are there).
    FOR v_col IN
        SELECT * FROM (VALUES
            ('sl_attempts',     'integer NOT NULL DEFAULT 0', 'integer'),
            ('sl_retry_at',     'timestamptz',                'timestamp with time zone'),
            ('sl_fence',        'bigint',                     'bigint'),
            ('sl_last_session', 'bigint',                     'bigint'),
            ('sl_server',       'timestamptz',                'timestamp with time zone')) AS c(name, decl, type)
    LOOP
        SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) INTO v_type
          FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = p_table AND a.attname = v_col.name AND NOT a.attisdropped;
        IF NOT FOUND THEN
            EXECUTE pg_catalog.format('ALTER TABLE %s ADD COLUMN %I %s', v_table, v_col.name, v_col.decl);
        ELSIF v_type <> v_col.type THEN
            PERFORM session_lock.bad_declaration(p_table, pg_catalog.format(
                'its column %I must be %s (it is %s): session-lock keeps it on every task row',
                v_col.name, v_col.type, v_type));
        END IF;
    END LOOP;

    -- A generated function of another release's signature would make calls
    -- ambiguous: it goes.
    FOR v_fn IN
        SELECT p.oid::regprocedure AS fn
          FROM pg_catalog.pg_proc p
          JOIN session_lock.generated_functions(d.fn_prefix) g ON g.name = p.proname
         WHERE p.pronamespace = 'session_lock'::regnamespace
           AND pg_catalog.oidvectortypes(p.proargtypes) <> g.args
    LOOP
        EXECUTE pg_catalog.format('DROP FUNCTION %s', v_fn.fn);
    END LOOP;

    -- get_work answers with the table's own columns, flat, after
    -- sl_finished and sl_finished_ids: the row type
    -- session_lock.<prefix>_answer, made again
    -- (and get_work with it) whenever the table's columns have changed.
    -- Flat, not one composite column: building and taking apart a
    -- composite per row was 6 % of a draining call's instructions.
    SELECT pg_catalog.string_agg(pg_catalog.format('%I %s', a.attname,
               pg_catalog.format_type(a.atttypid, NULL)), ', ' ORDER BY a.attnum),
           pg_catalog.string_agg(pg_catalog.format('h.%I', a.attname), ', ' ORDER BY a.attnum),
           pg_catalog.string_agg(pg_catalog.format('NULL::%s',
               pg_catalog.format_type(a.atttypid, NULL)), ', ' ORDER BY a.attnum)
      INTO v_columns, v_row, v_nulls
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = p_table AND a.attnum > 0 AND NOT a.attisdropped;
    v_columns := 'sl_finished bigint, sl_finished_ids bigint[], ' || v_columns;
    v_answer := pg_catalog.format('session_lock.%I', d.fn_prefix || '_answer');
    SELECT pg_catalog.string_agg(pg_catalog.format('%I %s', a.attname,
               pg_catalog.format_type(a.atttypid, NULL)), ', ' ORDER BY a.attnum)
      INTO v_had
      FROM pg_catalog.pg_type t
      JOIN pg_catalog.pg_attribute a ON a.attrelid = t.typrelid
     WHERE t.typnamespace = 'session_lock'::regnamespace
       AND t.typname = d.fn_prefix || '_answer'
       AND a.attnum > 0 AND NOT a.attisdropped;
    IF v_had IS DISTINCT FROM v_columns THEN
        FOR v_fn IN
            SELECT p.oid::regprocedure AS fn
              FROM pg_catalog.pg_proc p
             WHERE p.pronamespace = 'session_lock'::regnamespace
               AND p.proname = d.fn_prefix || '_get_work'
        LOOP
            EXECUTE pg_catalog.format('DROP FUNCTION %s', v_fn.fn);
        END LOOP;
        EXECUTE pg_catalog.format('DROP TYPE IF EXISTS %s', v_answer);
        EXECUTE pg_catalog.format('CREATE TYPE %s AS (%s)', v_answer, v_columns);
    END IF;

    -- get_work's pickup cursor: where the last pickup in key order began.
    -- A sequence, so that moving it on every call leaves no row version
    -- behind (a snapshot held elsewhere would keep every one).
    -- And when a pickup may next start from the head instead (ms since
    -- the epoch); and the last count of free tasks, left for later calls,
    -- with the fence drawn before it.
    v_cursor := pg_catalog.format('session_lock.%I', d.fn_prefix || '_cursor');
    v_head_at := pg_catalog.format('session_lock.%I', d.fn_prefix || '_head_at');
    v_free_seen := pg_catalog.format('session_lock.%I', d.fn_prefix || '_free_seen');
    v_free_seen_at := pg_catalog.format('session_lock.%I', d.fn_prefix || '_free_seen_at');
    FOREACH v_name IN ARRAY ARRAY[v_cursor, v_head_at, v_free_seen, v_free_seen_at] LOOP
        v_seq := pg_catalog.to_regclass(v_name);
        IF v_seq IS NULL THEN
            EXECUTE pg_catalog.format('CREATE SEQUENCE %s AS bigint MINVALUE -9223372036854775808', v_name);
        ELSIF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = v_seq AND c.relkind = 'S') THEN
            PERFORM session_lock.bad_declaration(p_table, pg_catalog.format(
                '%s, the name of one of its protocol sequences, is taken by another relation: choose another fn_prefix, or drop it',
                v_name));
        END IF;
    END LOOP;

    -- The group key, or for an ungrouped table the id column standing in
    -- (the grouped code is never run then, but must parse).
    v_group := coalesce(d.group_by, d.id_column);
    SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) INTO v_gtype
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = p_table AND a.attname = v_group AND NOT a.attisdropped;
    IF v_gtype IS NULL THEN
        PERFORM session_lock.bad_declaration(p_table, pg_catalog.format(
            'its group_by column %I does not exist', v_group));
    END IF;
    IF d.group_by IS NOT NULL AND NOT EXISTS (
           SELECT 1
             FROM pg_catalog.pg_attribute a
             JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
            WHERE a.attrelid = p_table AND a.attname = v_group
              AND (t.typnamespace = 'pg_catalog'::pg_catalog.regnamespace OR t.typtype = 'e')) THEN
        PERFORM session_lock.bad_declaration(p_table, pg_catalog.format(
            'its group_by column %I is of type %s: a group key must be of a built-in type (text, integer, uuid, ...) or an enum, whose ordering the generated code can name',
            v_group, v_gtype));
    END IF;

    v_finish := d.finish;
    IF d.finished_by IS NOT NULL THEN
        v_finish := v_finish || E'\n,' || pg_catalog.quote_ident(d.finished_by) || ' = p_session';
    END IF;
    v_lock_timeout := pg_catalog.quote_literal(
        pg_catalog.ceil(pg_catalog.extract('epoch', d.lock_timeout) * 1000)::bigint || 'ms');
    v_settings := 'SET search_path = pg_catalog, pg_temp' || E'\n'
        || pg_catalog.format('SET lock_timeout = %s', v_lock_timeout) || E'\n'
        || 'SET standard_conforming_strings = on' || E'\n'
        || 'SET DateStyle = ''ISO, MDY''' || E'\n'
        || 'SET IntervalStyle = postgres' || E'\n'
        || 'SET extra_float_digits = 1' || E'\n'
        || 'SET TimeZone = ''UTC''';
    -- The hot path plans each statement once per connection, not on every
    -- call: a custom plan per call was an eighth of a tick's server time,
    -- and a statement with a LIMIT of a variable (the pickup's) never gets
    -- a cached generic plan on its own. A generic plan estimates such a
    -- LIMIT at a tenth of the table, where a sequential scan and a sort
    -- can look cheaper than walking the open-task index: with neither
    -- offered, every statement takes the index the declaration made for
    -- it, whatever the statistics say.
    -- get_work's lease, at each place that writes: the first one locks
    -- the caller's session row (live, and its own) until commit.
    v_lease := pg_catalog.ltrim($lease$
    IF NOT sl_leased THEN
        PERFORM 1
           FROM session_lock.session s
          WHERE s.id = p_session
            AND s.token = p_token
            AND s.protocol = 2
            AND s.ended_at IS NULL
            AND s.reclaimed_at IS NULL
            AND s.expires_at > pg_catalog.clock_timestamp()
            FOR KEY SHARE;
        IF NOT FOUND THEN
            PERFORM session_lock.raise_not_live(p_session);
        END IF;
        sl_leased := true;
    END IF;$lease$, E'\n');
    -- Each SET clause costs every call a save and a restore: the internal
    -- functions, called only by the entry points, pin only what they must.
    v_internal := 'SET search_path = pg_catalog, pg_temp' || E'\n'
        || pg_catalog.format('SET lock_timeout = %s', v_lock_timeout);
    v_plans := 'SET plan_cache_mode = force_generic_plan' || E'\n'
        || 'SET enable_seqscan = off' || E'\n'
        || 'SET enable_bitmapscan = off';
    FOREACH v_sql IN ARRAY session_lock.task_table_templates() LOOP
        FOR v_fn IN SELECT * FROM session_lock.generated_functions(d.fn_prefix) LOOP
            v_sql := pg_catalog.replace(v_sql,
                '{{fn:' || pg_catalog.substr(v_fn.name, pg_catalog.length(d.fn_prefix) + 2) || '}}',
                pg_catalog.format('session_lock.%I', v_fn.name));
        END LOOP;
        v_sql := pg_catalog.replace(v_sql, '{{lease}}', v_lease);
        v_sql := pg_catalog.replace(v_sql, '{{settings}}', v_settings);
        v_sql := pg_catalog.replace(v_sql, '{{internal}}', v_internal);
        v_sql := pg_catalog.replace(v_sql, '{{lock_timeout}}', v_lock_timeout);
        v_sql := pg_catalog.replace(v_sql, '{{plans}}', v_plans);
        v_sql := pg_catalog.replace(v_sql, '{{table}}', v_table);
        v_sql := pg_catalog.replace(v_sql, '{{regclass}}',
            pg_catalog.quote_literal(v_table) || '::pg_catalog.regclass');
        v_sql := pg_catalog.replace(v_sql, '{{id}}', pg_catalog.quote_ident(d.id_column));
        v_sql := pg_catalog.replace(v_sql, '{{address_type}}',
            CASE WHEN v_partitioned THEN 'bigint' ELSE 'pg_catalog.tid' END);
        v_sql := pg_catalog.replace(v_sql, '{{address}}',
            CASE WHEN v_partitioned THEN pg_catalog.quote_ident(d.id_column) ELSE 'ctid' END);
        v_sql := pg_catalog.replace(v_sql, '{{answer_row}}', v_row);
        v_sql := pg_catalog.replace(v_sql, '{{answer_nulls}}', v_nulls);
        v_sql := pg_catalog.replace(v_sql, '{{answer}}', v_answer);
        v_sql := pg_catalog.replace(v_sql, '{{cursor}}',
            (d.order_by = pg_catalog.quote_ident(d.id_column))::text);
        v_sql := pg_catalog.replace(v_sql, '{{cursor_seq}}',
            pg_catalog.quote_literal(v_cursor) || '::pg_catalog.regclass');
        v_sql := pg_catalog.replace(v_sql, '{{head_at_seq}}',
            pg_catalog.quote_literal(v_head_at) || '::pg_catalog.regclass');
        v_sql := pg_catalog.replace(v_sql, '{{free_seen_seq}}',
            pg_catalog.quote_literal(v_free_seen) || '::pg_catalog.regclass');
        v_sql := pg_catalog.replace(v_sql, '{{free_seen_at_seq}}',
            pg_catalog.quote_literal(v_free_seen_at) || '::pg_catalog.regclass');
        v_sql := pg_catalog.replace(v_sql, '{{name}}', pg_catalog.quote_literal(v_table));
        v_sql := pg_catalog.replace(v_sql, '{{grouped}}', (d.group_by IS NOT NULL)::text);
        v_sql := pg_catalog.replace(v_sql, '{{group_type}}', v_gtype);
        v_sql := pg_catalog.replace(v_sql, '{{group}}', pg_catalog.quote_ident(v_group));
        v_sql := pg_catalog.replace(v_sql, '{{max_attempts}}',
            coalesce(d.max_attempts, 2147483647)::text);
        -- Without quarantine nobody is a suspect: isolating them is for
        -- keeping bystanders out of quarantine.
        v_sql := pg_catalog.replace(v_sql, '{{suspect_from}}',
            CASE WHEN d.max_attempts IS NULL THEN '2147483647' ELSE '2' END);
        v_sql := pg_catalog.replace(v_sql, '{{backoff}}', pg_catalog.format('%L::pg_catalog.interval',
            pg_catalog.ceil(pg_catalog.extract('epoch', d.retry_backoff) * 1000)::bigint || ' milliseconds'));
        v_sql := pg_catalog.replace(v_sql, '{{backoff_max}}', pg_catalog.format('%L::pg_catalog.interval',
            pg_catalog.ceil(pg_catalog.extract('epoch', d.retry_backoff_max) * 1000)::bigint || ' milliseconds'));
        -- The declaration's fragments last, each on lines of its own (the
        -- templates put them so), checked by session_lock.check_fragment.
        v_sql := pg_catalog.replace(v_sql, '{{open}}', d.open_when);
        v_sql := pg_catalog.replace(v_sql, '{{finish}}', v_finish);
        v_sql := pg_catalog.replace(v_sql, '{{order}}', d.order_by);
        -- The channel after the fragments: no placeholder is read in it.
        v_sql := pg_catalog.replace(v_sql, '{{notify}}', CASE
            WHEN d.notify IS NULL THEN 'NULL;'
            ELSE pg_catalog.format('PERFORM pg_catalog.pg_notify(%L, %L);', d.notify, '')
        END);
        -- Created only when no function of this schema was created from
        -- this very text, which its marker line carries a digest of: a
        -- function replaced, even by the same text, is compiled again and
        -- its plans made again by every connection that calls it, and the
        -- migrator runs this at every start of every instance of a fleet.
        v_stamp := pg_catalog.md5(v_sql);
        v_sql := pg_catalog.replace(v_sql, ': do not edit.', ': do not edit (' || v_stamp || ').');
        IF NOT EXISTS (SELECT 1
                         FROM pg_catalog.pg_proc p
                        WHERE p.pronamespace = 'session_lock'::regnamespace
                          AND p.proowner = (SELECT r.oid FROM pg_catalog.pg_roles r
                                             WHERE r.rolname = CURRENT_USER)
                          AND pg_catalog.strpos(p.prosrc, v_stamp) > 0) THEN
            EXECUTE v_sql;
            v_changed := true;
        END IF;
    END LOOP;

    PERFORM session_lock.revoke_from_public();
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'session_lock_runtime') THEN
        -- The entry points, with the signatures generated_functions gives.
        PERFORM session_lock.grant_execute('session_lock_runtime', ARRAY(
            SELECT pg_catalog.format('session_lock.%I(%s)', g.name, g.args)::regprocedure
              FROM session_lock.generated_functions(d.fn_prefix) g
             WHERE g.name IN (d.fn_prefix || '_get_work', d.fn_prefix || '_finish_tasks',
                              d.fn_prefix || '_fail_tasks', d.fn_prefix || '_held',
                              d.fn_prefix || '_stats', d.fn_prefix || '_quiet')));
    END IF;
    IF v_changed THEN
        UPDATE session_lock.task_table t
           SET generated_at = pg_catalog.clock_timestamp()
         WHERE t.task_table = p_table;
    END IF;
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
         ORDER BY t.fn_prefix
    LOOP
        PERFORM session_lock.generate_task_table(v_table);
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END;
$$;

-- Drops the generated functions of p_prefix, and get_work's row type.
CREATE OR REPLACE FUNCTION session_lock.drop_generated(p_prefix text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_fn record;
BEGIN
    FOR v_fn IN SELECT * FROM session_lock.generated_functions(p_prefix) LOOP
        EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS session_lock.%I(%s)', v_fn.name, v_fn.args);
    END LOOP;
    EXECUTE pg_catalog.format('DROP TYPE IF EXISTS session_lock.%I', p_prefix || '_answer');
    EXECUTE pg_catalog.format('DROP SEQUENCE IF EXISTS session_lock.%I, session_lock.%I, session_lock.%I, session_lock.%I',
        p_prefix || '_cursor', p_prefix || '_head_at', p_prefix || '_free_seen', p_prefix || '_free_seen_at');
END;
$$;

-- Declares task_table a task table (or changes its declaration) and
-- generates its protocol; must be called by the table's owner. An
-- unchanged declaration changes nothing but the functions' text: it takes
-- no lock on the table. See the top of this file and the README for each
-- argument.
-- The indexes the protocol reads, created when missing (no lock is taken
-- when they are there), rebuilt when p_rebuild (open_when or order_by
-- changed). A relation of one of their names that is not this table's
-- index is refused, not skipped.
--   <prefix>_open_idx: open tasks by holder, then in pickup order. Pickup
--     is a range scan of its (session_id IS NULL) part, a session's tasks
--     the (session_id = S) part, and the bounded count an index-only scan.
--     Partial, so it stays the size of the open backlog.
--   <prefix>_suspect_idx: free open tasks whose holders died twice, in
--     pickup order: each session takes at most one of them at a time, and
--     finds it here without walking the backlog. Usually empty.
--   <prefix>_group_idx (grouped tables only): free open tasks a round may
--     take (fewer attempts than make a suspect), by group, then in pickup
--     order: a round of pickup probes it once per group. Tasks waiting out
--     a retry backoff are in it, and a probe steps over them.
-- Each index's definition is kept as its comment, and an index is built
-- again only when its definition changes (p_rebuild: every one).
CREATE OR REPLACE FUNCTION session_lock.task_table_indexes(p_table regclass, p_rebuild boolean)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d        session_lock.task_table%ROWTYPE;
    v_schema name;
    v_table  text;
    v_index  record;
    v_found  regclass;
BEGIN
    SELECT * INTO d FROM session_lock.task_table t WHERE t.task_table = p_table;
    SELECT n.nspname, pg_catalog.format('%I.%I', n.nspname, c.relname) INTO v_schema, v_table
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = p_table;
    FOR v_index IN
        SELECT * FROM (VALUES
            (d.fn_prefix || '_open_idx',
             pg_catalog.format(E'(session_id,\n%s\n) WHERE (\n%s\n)', d.order_by, d.open_when)),
            (d.fn_prefix || '_suspect_idx',
             pg_catalog.format(E'(\n%s\n) WHERE (\n%s\n) AND sl_attempts >= 2 AND session_id IS NULL',
                 d.order_by, d.open_when)),
            (d.fn_prefix || '_group_idx',
             CASE WHEN d.group_by IS NOT NULL THEN
                 pg_catalog.format(E'(%I,\n%s\n) WHERE (\n%s\n) AND session_id IS NULL AND sl_attempts < %s',
                     d.group_by, d.order_by, d.open_when,
                     CASE WHEN d.max_attempts IS NULL THEN 2147483647
                          ELSE LEAST(2, d.max_attempts) END)
             END)) AS i(name, def)
    LOOP
        v_found := pg_catalog.to_regclass(pg_catalog.format('%I.%I', v_schema, v_index.name));
        IF v_found IS NOT NULL AND NOT EXISTS (
               SELECT 1 FROM pg_catalog.pg_index i
                WHERE i.indexrelid = v_found AND i.indrelid = p_table) THEN
            PERFORM session_lock.bad_declaration(p_table, pg_catalog.format(
                '%s, the name of one of its protocol indexes, is taken by another relation: choose another fn_prefix, or drop it',
                v_found));
        END IF;
        -- Each index carries its definition as its comment: only one whose
        -- definition changed is built again.
        IF v_found IS NOT NULL
           AND (p_rebuild OR v_index.def IS NULL
                OR pg_catalog.obj_description(v_found, 'pg_class') IS DISTINCT FROM v_index.def) THEN
            EXECUTE pg_catalog.format('DROP INDEX %s', v_found);
            v_found := NULL;
        END IF;
        IF v_found IS NULL AND v_index.def IS NOT NULL THEN
            EXECUTE pg_catalog.format('CREATE INDEX %I ON %s %s', v_index.name, v_table, v_index.def);
            EXECUTE pg_catalog.format('COMMENT ON INDEX %I.%I IS %L', v_schema, v_index.name, v_index.def);
        END IF;
    END LOOP;
END;
$$;

-- A declaration's arguments grow with the releases, and an older overload
-- would make every call with named arguments ambiguous: it goes.
DO $drop$
DECLARE
    v_fn regprocedure;
BEGIN
    FOR v_fn IN
        SELECT p.oid::regprocedure
          FROM pg_catalog.pg_proc p
         WHERE p.pronamespace = 'session_lock'::regnamespace
           AND p.proname = 'declare_task_table'
           AND p.pronargs <> 13
    LOOP
        EXECUTE pg_catalog.format('DROP FUNCTION %s', v_fn);
    END LOOP;
END;
$drop$;

CREATE OR REPLACE FUNCTION session_lock.declare_task_table(
    task_table   regclass,
    open_when    text     DEFAULT 'finished_at IS NULL',
    finish       text     DEFAULT 'finished_at = now()',
    finished_by  name     DEFAULT NULL,
    order_by     text     DEFAULT NULL,
    id_column    name     DEFAULT 'id',
    notify       text     DEFAULT '',
    fn_prefix    text     DEFAULT NULL,
    lock_timeout interval DEFAULT '1 second',
    max_attempts integer  DEFAULT 5,
    retry_backoff     interval DEFAULT '1 second',
    retry_backoff_max interval DEFAULT '10 minutes',
    group_by     name     DEFAULT NULL
)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_schema   name;
    v_relname  name;
    v_table    text;
    v_type     regtype;
    v_old      session_lock.task_table%ROWTYPE;
    v_clash    text[];
    v_channel  text;
BEGIN
    IF task_table IS NULL THEN
        RAISE EXCEPTION 'declare_task_table: the table is NULL' USING ERRCODE = 'SL005';
    END IF;
    PERFORM session_lock.check_task_table(task_table);
    SELECT n.nspname, c.relname INTO v_schema, v_relname
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = task_table;
    v_table := pg_catalog.format('%I.%I', v_schema, v_relname);
    order_by := coalesce(order_by, pg_catalog.quote_ident(id_column));
    fn_prefix := coalesce(fn_prefix, v_relname);
    v_channel := CASE WHEN notify = '' THEN 'session_lock_' || fn_prefix ELSE notify END;
    SELECT * INTO v_old FROM session_lock.task_table t
     WHERE t.task_table = declare_task_table.task_table;

    IF v_old.task_table IS NOT NULL
       AND v_old.fn_prefix = fn_prefix AND v_old.id_column = id_column
       AND v_old.open_when = open_when AND v_old.finish = finish
       AND v_old.finished_by IS NOT DISTINCT FROM finished_by
       AND v_old.order_by = order_by AND v_old.notify IS NOT DISTINCT FROM v_channel
       AND v_old.lock_timeout = lock_timeout
       AND v_old.max_attempts IS NOT DISTINCT FROM max_attempts
       AND v_old.retry_backoff = retry_backoff
       AND v_old.retry_backoff_max = retry_backoff_max
       AND v_old.group_by IS NOT DISTINCT FROM group_by THEN
        -- Unchanged: checked when it was declared; the protocol is
        -- generated again (the templates may be newer), and an index a
        -- newer release reads is added if missing.
        PERFORM session_lock.generate_task_table(task_table);
        PERFORM session_lock.task_table_indexes(task_table, false);
        RETURN;
    END IF;

    IF lock_timeout IS NULL OR lock_timeout < interval '1 millisecond' OR lock_timeout > interval '1 minute' THEN
        PERFORM session_lock.bad_declaration(task_table,
            pg_catalog.format('lock_timeout %s must be at least 1 ms and at most 1 minute', lock_timeout));
    END IF;
    IF max_attempts IS NOT NULL AND (max_attempts < 1 OR max_attempts > 1000000) THEN
        PERFORM session_lock.bad_declaration(task_table, pg_catalog.format(
            'max_attempts %s must be 1 to 1000000, or NULL (never quarantine)', max_attempts));
    END IF;
    IF retry_backoff IS NULL OR retry_backoff_max IS NULL
       OR pg_catalog.date_part('month', retry_backoff) <> 0 OR pg_catalog.date_part('year', retry_backoff) <> 0
       OR pg_catalog.date_part('month', retry_backoff_max) <> 0 OR pg_catalog.date_part('year', retry_backoff_max) <> 0
       OR retry_backoff < interval '0' OR retry_backoff > interval '1 day'
       OR retry_backoff_max < retry_backoff OR retry_backoff_max > interval '7 days' THEN
        PERFORM session_lock.bad_declaration(task_table, pg_catalog.format(
            'retry_backoff %s must be 0 to 1 day, and retry_backoff_max %s at least that and at most 7 days (no months)',
            retry_backoff, retry_backoff_max));
    END IF;
    IF fn_prefix = '' OR pg_catalog.octet_length(fn_prefix) > 48
       OR pg_catalog.strpos(fn_prefix, '{{') > 0 OR pg_catalog.strpos(fn_prefix, '}}') > 0 THEN
        PERFORM session_lock.bad_declaration(task_table,
            'fn_prefix must be 1 to 48 bytes, without {{ or }}, so that every generated name fits');
    END IF;
    IF EXISTS (SELECT 1 FROM session_lock.task_table t
                WHERE t.fn_prefix = declare_task_table.fn_prefix
                  AND t.task_table <> declare_task_table.task_table) THEN
        PERFORM session_lock.bad_declaration(task_table, pg_catalog.format(
            'fn_prefix %L is taken by task table %s: choose another', fn_prefix,
            (SELECT t.task_table FROM session_lock.task_table t
              WHERE t.fn_prefix = declare_task_table.fn_prefix)));
    END IF;
    IF v_channel IS NOT NULL AND (v_channel = '' OR pg_catalog.octet_length(v_channel) > 63) THEN
        PERFORM session_lock.bad_declaration(task_table,
            pg_catalog.format('notify channel %L must be 1 to 63 bytes', v_channel));
    END IF;
    PERFORM session_lock.check_fragment(task_table, 'open_when', open_when);
    PERFORM session_lock.check_fragment(task_table, 'finish', finish);
    PERFORM session_lock.check_fragment(task_table, 'order_by', order_by);

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
    IF group_by IS NOT NULL AND NOT EXISTS (
           SELECT 1 FROM pg_catalog.pg_attribute a
            WHERE a.attrelid = task_table AND a.attname = group_by
              AND a.attnum > 0 AND NOT a.attisdropped) THEN
        PERFORM session_lock.bad_declaration(task_table, pg_catalog.format(
            'its group_by column %I does not exist', group_by));
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

    -- The fragments, tried against the table under an alias as the
    -- templates use them: an unknown column, a type error or a reference to
    -- the table by name is reported here, naming the fragment, not at the
    -- first tick. The UPDATE changes nothing (WHERE false), whatever the
    -- fragment says.
    BEGIN
        EXECUTE pg_catalog.format(E'SELECT 1 FROM %s AS sl_t WHERE (\n%s\n) ORDER BY\n%s\nLIMIT 0',
            v_table, open_when, order_by);
    EXCEPTION WHEN OTHERS THEN
        PERFORM session_lock.bad_declaration(task_table, pg_catalog.format(
            'open_when %L or order_by %L does not work: %s', open_when, order_by, SQLERRM));
    END;
    BEGIN
        EXECUTE pg_catalog.format(E'UPDATE %s AS sl_t SET\n%s\nWHERE false', v_table, finish);
    EXCEPTION WHEN OTHERS THEN
        PERFORM session_lock.bad_declaration(task_table, pg_catalog.format(
            'finish %L does not work: %s', finish, SQLERRM));
    END;

    -- Another prefix before: its functions go.
    IF v_old.task_table IS NOT NULL AND v_old.fn_prefix <> fn_prefix THEN
        PERFORM session_lock.drop_generated(v_old.fn_prefix);
    END IF;
    INSERT INTO session_lock.task_table AS t
           (task_table, fn_prefix, id_column, open_when, finish, finished_by,
            order_by, notify, lock_timeout, max_attempts, retry_backoff,
            retry_backoff_max, group_by)
    VALUES (task_table, fn_prefix, id_column, open_when, finish, finished_by,
            order_by, v_channel, lock_timeout, max_attempts, retry_backoff,
            retry_backoff_max, group_by)
    ON CONFLICT ON CONSTRAINT task_table_pkey DO UPDATE
       SET fn_prefix = EXCLUDED.fn_prefix,
           id_column = EXCLUDED.id_column, open_when = EXCLUDED.open_when,
           finish = EXCLUDED.finish, finished_by = EXCLUDED.finished_by,
           order_by = EXCLUDED.order_by, notify = EXCLUDED.notify,
           lock_timeout = EXCLUDED.lock_timeout,
           max_attempts = EXCLUDED.max_attempts,
           retry_backoff = EXCLUDED.retry_backoff,
           retry_backoff_max = EXCLUDED.retry_backoff_max,
           group_by = EXCLUDED.group_by;

    IF v_channel IS NULL THEN
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS session_lock_notify ON %s', v_table);
    ELSE
        EXECUTE pg_catalog.format(
            'CREATE OR REPLACE TRIGGER session_lock_notify AFTER INSERT ON %s '
            'FOR EACH STATEMENT EXECUTE FUNCTION session_lock.notify_task_inserted(%L)',
            v_table, v_channel);
    END IF;

    PERFORM session_lock.generate_task_table(task_table);
    -- After the columns the generation adds, which the indexes use.
    PERFORM session_lock.task_table_indexes(task_table, false);
    -- A session's place in the round means nothing under another group key.
    IF v_old.task_table IS NOT NULL AND v_old.group_by IS DISTINCT FROM group_by THEN
        UPDATE session_lock.session s
           SET group_cursor = NULL
         WHERE s.task_table = declare_task_table.task_table AND s.group_cursor IS NOT NULL;
    END IF;
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
BEGIN
    SELECT * INTO d FROM session_lock.task_table t WHERE t.task_table = p_table;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM session_lock.drop_generated(d.fn_prefix);
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

-- The generated function `suffix` of a declared table, as a quoted
-- qualified name for the operator functions below; SL005 when the table
-- is not declared.
CREATE OR REPLACE FUNCTION session_lock.generated_function(p_table regclass, p_suffix text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_prefix text;
BEGIN
    SELECT t.fn_prefix INTO v_prefix FROM session_lock.task_table t WHERE t.task_table = p_table;
    IF NOT FOUND THEN
        PERFORM session_lock.bad_declaration(p_table, 'it is not declared');
    END IF;
    RETURN pg_catalog.format('session_lock.%I', v_prefix || '_' || p_suffix);
END;
$$;

-- For operators: the quarantined tasks of a declared table (at most
-- p_limit, lowest ids first), through its generated *_quarantined.
CREATE OR REPLACE FUNCTION session_lock.quarantined_tasks(p_table regclass, p_limit integer DEFAULT 100)
RETURNS TABLE (task_id bigint, attempts integer, last_session bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY EXECUTE pg_catalog.format('SELECT * FROM %s($1)',
            session_lock.generated_function(p_table, 'quarantined'))
        USING p_limit;
END;
$$;

-- For operators: a grouped table's open and held tasks per group, the
-- p_limit groups with the most open tasks first.
CREATE OR REPLACE FUNCTION session_lock.task_groups(p_table regclass, p_limit integer DEFAULT 10)
RETURNS TABLE (task_group text, open bigint, held bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY EXECUTE pg_catalog.format('SELECT * FROM %s($1)',
            session_lock.generated_function(p_table, 'groups'))
        USING p_limit;
END;
$$;

-- For operators (`session-lock retry`): releases quarantined tasks of a
-- declared table (p_ids, or all of them when NULL) for pickup again, their
-- attempts counted from 0; returns their ids.
CREATE OR REPLACE FUNCTION session_lock.retry_tasks(p_table regclass, p_ids bigint[] DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY EXECUTE pg_catalog.format('SELECT * FROM %s($1)',
            session_lock.generated_function(p_table, 'retry'))
        USING p_ids;
END;
$$;

SELECT session_lock.revoke_from_public();

SELECT session_lock.generate_task_tables();
