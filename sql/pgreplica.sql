-- pgreplica capture schema: the log, the slave registry and the install helpers.
--
-- Run it as the role that owns the replicated tables (or a role that may create
-- triggers on them); that role owns the log. It is idempotent: running it again
-- upgrades the functions and keeps the log.
--
--   psql -d shop -f sql/pgreplica.sql
--   psql -d shop -c "SELECT * FROM pgreplica.attach_all()"

CREATE SCHEMA IF NOT EXISTS pgreplica;
REVOKE ALL ON SCHEMA pgreplica FROM PUBLIC;

-- One row per changed row of a replicated table, in capture order.
--
-- ev_txid is the writing transaction (txid_current(), the same number as
-- pg_current_xact_id()); a batch is the set of events whose transaction became
-- visible between two snapshots of the master, so commit order is respected even
-- when a transaction that took its ids early commits late.
-- ev_new and ev_old are the row's text form (record_out), exact for every type;
-- column names come from the catalog, so the slave matches columns by name.
CREATE TABLE IF NOT EXISTS pgreplica.log (
    ev_id     bigserial   NOT NULL,
    ev_txid   bigint      NOT NULL DEFAULT txid_current(),
    ev_time   timestamptz NOT NULL DEFAULT now(),
    ev_table  oid         NOT NULL,
    ev_op     "char"      NOT NULL,   -- I insert, U update, D delete, T truncate, X execute,
                                      -- O origin of the transaction's changes (WAL capture)
    ev_origin text,                   -- node the change came from (NULL: this one)
    ev_old    text,                   -- row before the change (U, D)
    ev_new    text                    -- row after the change (I, U)
);
-- BRIN: nearly free to maintain on the hot path, and the log is appended in
-- roughly txid order, which is all a batch's range scan needs.
CREATE INDEX IF NOT EXISTS log_txid ON pgreplica.log USING brin (ev_txid);

-- Every slave of every set reading this master, and how far it has applied.
-- The log is cleaned up to the oldest position in this table.
CREATE TABLE IF NOT EXISTS pgreplica.slave (
    set_name   text        NOT NULL,
    slave      integer     NOT NULL,
    dsn        text        NOT NULL,          -- password removed
    snapshot   txid_snapshot NOT NULL,        -- last snapshot applied on the slave
    applied_at timestamptz,
    events     bigint      NOT NULL DEFAULT 0, -- applied since registration
    conflicts  bigint      NOT NULL DEFAULT 0, -- detected since registration
    state      text        NOT NULL DEFAULT 'running', -- running, or stopped by an error
    last_error text,
    error_at   timestamptz,
    seen_at    timestamptz,                    -- the daemon's last word on this slave
    PRIMARY KEY (set_name, slave)
);

-- When a slave's position last moved (its lag under WAL capture).
ALTER TABLE pgreplica.slave ADD COLUMN IF NOT EXISTS moved_at timestamptz;
-- The set's SYNC: how many of its slaves pgreplica.wait() waits for by default.
ALTER TABLE pgreplica.slave ADD COLUMN IF NOT EXISTS sync integer;

-- How far the log was cleaned: the events of every transaction below `below`
-- that had any are gone. A slave whose progress is older (restored from a
-- backup, or one that lost its last commits) cannot catch up from the log.
CREATE TABLE IF NOT EXISTS pgreplica.cleaned (
    one   boolean PRIMARY KEY DEFAULT true CHECK (one),
    below bigint  NOT NULL
);
-- The newest change time among the removed events: a change this node no
-- longer finds in its log was made before it (conflict policy `newest`).
ALTER TABLE pgreplica.cleaned ADD COLUMN IF NOT EXISTS newest timestamptz;

-- Tables attached to capture, and what is captured of each (set with
-- pgreplica.set_options, from the [TABLE] sections of a set's config).
CREATE TABLE IF NOT EXISTS pgreplica.tables (
    reloid      oid PRIMARY KEY,
    attached_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE pgreplica.tables
    ADD COLUMN IF NOT EXISTS operations text NOT NULL DEFAULT 'IUDT', -- logged: I U D T
    ADD COLUMN IF NOT EXISTS filter     text,   -- SQL boolean over new.* and old.*
    ADD COLUMN IF NOT EXISTS columns    text[], -- only these columns are logged
    ADD COLUMN IF NOT EXISTS exclude    text[], -- these columns are not logged
    -- Its definition when last attached (pgreplica.layout), to read the events
    -- that wait in the log after the table was dropped.
    ADD COLUMN IF NOT EXISTS layout     jsonb,
    -- Under WAL capture: since when the table's deletes are logged (its delete
    -- trigger enabled), for conflict policies newest and priority, which look
    -- up when and where a row this node no longer has was deleted. NULL: not.
    ADD COLUMN IF NOT EXISTS deletes_kept_since timestamptz;

-- Each table's columns that are logged, in row order (all of them, or those
-- its options keep; the key is always among them, set_options makes sure),
-- and its primary key's columns in the key's order (a key declared (b, a)
-- gives {b,a}; empty when it has none). Every path that needs them reads them
-- here: a view, which the daemon's prepared statements plan once, where a
-- function's body would be planned again at every call.
CREATE OR REPLACE VIEW pgreplica.described AS
SELECT c.oid AS reloid,
       ARRAY(SELECT a.attname::text FROM pg_attribute a
              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                AND (t.columns IS NULL OR a.attname = ANY (t.columns))
                AND (t.exclude IS NULL OR a.attname <> ALL (t.exclude))
              ORDER BY a.attnum) AS logged,
       ARRAY(SELECT a.attname::text FROM pg_index i
              CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              WHERE i.indrelid = c.oid AND i.indisprimary
              ORDER BY k.n) AS key
  FROM pg_class c LEFT JOIN pgreplica.tables t ON t.reloid = c.oid;

CREATE OR REPLACE FUNCTION pgreplica.logged_columns(tbl regclass) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT logged FROM pgreplica.described WHERE reloid = tbl), '{}')
$$;

CREATE OR REPLACE FUNCTION pgreplica.key_columns(tbl regclass) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT key FROM pgreplica.described WHERE reloid = tbl), '{}')
$$;

-- The version of this file's functions and tables; the daemon refuses a master
-- whose version is not its own and says to run `pgreplica install` again.
CREATE OR REPLACE FUNCTION pgreplica.version() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 6 $$;

-- This master's identity, made once at install. Each slave's progress names
-- the master it follows: a slave whose set was switched over to another
-- master, or a config pointed at the wrong one, is refused instead of read
-- against a log it has nothing to do with.
CREATE TABLE IF NOT EXISTS pgreplica.node (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    id  uuid    NOT NULL DEFAULT gen_random_uuid()
);
INSERT INTO pgreplica.node DEFAULT VALUES ON CONFLICT DO NOTHING;

CREATE OR REPLACE FUNCTION pgreplica.node() RETURNS text
LANGUAGE sql STABLE AS $$ SELECT id::text FROM pgreplica.node $$;

-- Failovers to this node: the set's slave that was its master, and how far
-- this node (then its slave) had applied that master. The daemon leaves that
-- slave alone until `pgreplica failback` has made it a copy of this master;
-- failback reports from the position what the old master had and this node
-- never got.
CREATE TABLE IF NOT EXISTS pgreplica.failover (
    set_name   text        NOT NULL,
    slave      integer     NOT NULL,
    old_node   text,
    snapshot   text        NOT NULL,
    lsn        pg_lsn,
    applied_at timestamptz,
    at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (set_name, slave)
);

-- The node a change being logged came from: what pgreplica's apply marks in
-- pgreplica.origin, in a session that applies changes from another node
-- (session_replication_role = replica, which an application role may not
-- set). NULL, this node, in every other session: a forged or inherited
-- pgreplica.origin cannot keep a change from reaching a node.
-- Written fully qualified: capture calls it under the writer's search_path.
CREATE OR REPLACE FUNCTION pgreplica.origin() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN pg_catalog.current_setting('session_replication_role')
                     OPERATOR(pg_catalog.=) 'replica'
                 AND pg_catalog.current_setting('pgreplica.origin', true)
                     OPERATOR(pg_catalog.<>) ''
                THEN pg_catalog.current_setting('pgreplica.origin', true) END
$$;

-- The session settings the text form of a table's logged columns depends on,
-- through domains, arrays, ranges and composites; all of them for a base type
-- that is not PostgreSQL's own (an extension's output may use any).
CREATE OR REPLACE FUNCTION pgreplica.settings_for(tbl regclass) RETURNS text[]
LANGUAGE sql STABLE AS $$
WITH RECURSIVE types(t) AS (
    SELECT a.atttypid FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attname::text = ANY (pgreplica.logged_columns(tbl))
  UNION
    SELECT held.t FROM types JOIN pg_type ty ON ty.oid = types.t
     CROSS JOIN LATERAL (
        SELECT ty.typbasetype WHERE ty.typtype = 'd'
        UNION ALL SELECT ty.typelem WHERE ty.typcategory = 'A' AND ty.typelem <> 0
        -- Multiranges (PostgreSQL 14+) name their range in rngmultitypid.
        UNION ALL SELECT r.rngsubtype FROM pg_range r
                   WHERE r.rngtypid = ty.oid
                      OR (to_jsonb(r) ->> 'rngmultitypid')::oid = ty.oid
        UNION ALL SELECT a.atttypid FROM pg_attribute a
                   WHERE ty.typtype = 'c' AND a.attrelid = ty.typrelid
                     AND a.attnum > 0 AND NOT a.attisdropped
     ) AS held(t)
)
SELECT coalesce(array_agg(DISTINCT s ORDER BY s), '{}')
  FROM types JOIN pg_type ty ON ty.oid = types.t
 CROSS JOIN LATERAL unnest(CASE
    WHEN ty.typtype IN ('d', 'c', 'r', 'm', 'e', 'p') OR ty.typcategory = 'A' THEN '{}'::text[]
    WHEN ty.oid IN ('timestamptz'::regtype, 'timetz'::regtype) THEN '{TimeZone,DateStyle}'
    WHEN ty.oid IN ('date'::regtype, 'timestamp'::regtype, 'time'::regtype) THEN '{DateStyle}'
    WHEN ty.oid = 'interval'::regtype THEN '{IntervalStyle}'
    WHEN ty.oid IN ('float4'::regtype, 'float8'::regtype, 'point'::regtype, 'line'::regtype,
                    'lseg'::regtype, 'box'::regtype, 'path'::regtype, 'polygon'::regtype,
                    'circle'::regtype) THEN '{extra_float_digits}'
    WHEN ty.oid = 'bytea'::regtype THEN '{bytea_output}'
    WHEN ty.oid < 16384 THEN '{}'
    ELSE '{DateStyle,IntervalStyle,TimeZone,bytea_output,extra_float_digits}'
 END) AS s
$$;

-- The capture function's name for a table.
CREATE OR REPLACE FUNCTION pgreplica.capture_name(tbl regclass) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT 'capture_' || tbl::oid $$;

-- The table whose changes a table's are logged as: the top of its partition
-- tree (a statement on a partition or on the partitioned table is logged as a
-- change of the partitioned table, whatever the slave's partitioning), or itself.
CREATE OR REPLACE FUNCTION pgreplica.root(tbl regclass) RETURNS regclass
LANGUAGE sql STABLE AS $$ SELECT coalesce(pg_partition_root(tbl), tbl) $$;

-- Why a table cannot be replicated, or NULL when it can.
CREATE OR REPLACE FUNCTION pgreplica.unsupported(tbl regclass) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN c.relkind NOT IN ('r', 'p') THEN 'not an ordinary table'
        WHEN c.relpersistence <> 'p' THEN 'temporary or unlogged table'
        WHEN n.nspname = 'pgreplica' THEN 'pgreplica''s own table'
        WHEN NOT c.relispartition AND EXISTS (SELECT FROM pg_inherits i WHERE i.inhrelid = c.oid)
            THEN 'inherits from ' || (SELECT string_agg(i.inhparent::regclass::text, ', ')
                                        FROM pg_inherits i WHERE i.inhrelid = c.oid)
                 || ': an UPDATE or DELETE through its parent changes its rows without its '
                 || 'triggers knowing; make it a partition of a partitioned table'
        WHEN c.relkind = 'r' AND EXISTS (SELECT FROM pg_inherits i WHERE i.inhparent = c.oid)
            THEN 'has inheritance children ('
                 || (SELECT string_agg(i.inhrelid::regclass::text, ', ')
                       FROM pg_inherits i WHERE i.inhparent = c.oid)
                 || '): an UPDATE or DELETE through it changes their rows without their '
                 || 'triggers knowing; make it a partitioned table'
        WHEN cardinality(pgreplica.key_columns(pgreplica.root(c.oid))) = 0 THEN
            CASE WHEN c.relispartition
                 THEN 'its partitioned table ' || pgreplica.root(c.oid)::text || ' has no primary key'
                 ELSE 'no primary key' END
    END
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = tbl
$$;

-- Attaches capture to a table, following its options in pgreplica.tables, and
-- to every partition of a partitioned table (a partition attaches its whole
-- tree). Idempotent; returns NULL on success or the reason the table cannot be
-- replicated.
CREATE OR REPLACE FUNCTION pgreplica.attach(tbl regclass) RETURNS text
LANGUAGE plpgsql SET client_min_messages = warning AS $$
DECLARE
    why    text := pgreplica.unsupported(tbl);
    root   regclass := pgreplica.root(tbl);
    member regclass;
BEGIN
    IF why IS NOT NULL THEN
        RETURN why;
    END IF;
    IF root <> tbl THEN
        RETURN pgreplica.attach(root);
    END IF;
    PERFORM pgreplica.capture(tbl, tbl);
    FOR member IN SELECT relid FROM pg_partition_tree(tbl) WHERE relid <> tbl LOOP
        PERFORM pgreplica.capture(member, tbl);
    END LOOP;
    INSERT INTO pgreplica.tables AS t (reloid, layout) VALUES (tbl, pgreplica.layout(tbl))
    ON CONFLICT (reloid) DO UPDATE SET layout = excluded.layout;
    IF pgreplica.wal() AND NOT pgreplica.published(tbl) THEN
        EXECUTE format('ALTER PUBLICATION pgreplica ADD TABLE %s', tbl);
    END IF;
    RETURN NULL;
END
$$;

-- Whether changes are read from the WAL (`CAPTURE = wal`): the publication
-- `pgreplica` lists the attached tables, and `pgreplica_log` the statements
-- queued with `pgreplica.execute`.
CREATE OR REPLACE FUNCTION pgreplica.wal() RETURNS boolean
LANGUAGE sql STABLE AS $$ SELECT EXISTS (SELECT FROM pg_publication WHERE pubname = 'pgreplica') $$;

-- Whether a table is in the publication `pgreplica`.
CREATE OR REPLACE FUNCTION pgreplica.published(tbl regclass) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                    WHERE p.pubname = 'pgreplica' AND r.prrelid = tbl)
$$;

-- Switches the master between trigger capture and WAL capture: the
-- publications made or dropped, each table's triggers made again for the mode. The
-- slots, one per slave, are pgreplica install's (they cannot be made in a
-- transaction that wrote). Tables keep REPLICA IDENTITY FULL when switched back.
CREATE OR REPLACE FUNCTION pgreplica.use_wal(wal boolean) RETURNS void
LANGUAGE plpgsql SET client_min_messages = warning AS $$
DECLARE
    tbl regclass;
BEGIN
    IF wal = pgreplica.wal() THEN
        RETURN;
    ELSIF wal THEN
        -- A partition's changes come as its partitioned table's, as with triggers.
        CREATE PUBLICATION pgreplica WITH (publish_via_partition_root = true);
        CREATE PUBLICATION pgreplica_log FOR TABLE pgreplica.log WITH (publish = 'insert');
    ELSE
        DROP PUBLICATION pgreplica;
        DROP PUBLICATION IF EXISTS pgreplica_log;
    END IF;
    FOR tbl IN SELECT reloid FROM pgreplica.tables LOOP
        PERFORM pgreplica.attach(tbl);
    END LOOP;
END
$$;

-- Attaches the partitions made since their partitioned table was attached
-- (pg_partman makes them ahead of time); returns how many. Writes through the
-- partitioned table are captured without this; writes straight into a new
-- partition need it.
CREATE OR REPLACE FUNCTION pgreplica.attach_partitions() RETURNS integer
LANGUAGE plpgsql SET client_min_messages = warning AS $$
DECLARE
    tbl    regclass;
    member regclass;
    n      integer := 0;
BEGIN
    FOR tbl, member IN
        SELECT t.reloid, p.relid FROM pgreplica.tables t, pg_partition_tree(t.reloid) p
         WHERE p.relid <> t.reloid
           AND pg_catalog.to_regproc('pgreplica.' || pgreplica.capture_name(p.relid)) IS NULL
    LOOP
        PERFORM pgreplica.capture(member, tbl);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

-- Generates the capture function (statement-level, with transition tables) and
-- the triggers of one table, which logs its changes as changes of `root`: the
-- table itself, or the partitioned table it is a partition of.
--
-- An UPDATE statement's old and new rows are paired by primary key: a key present
-- on both sides is an update (logged only when the logged columns' text changed),
-- a key only among the old rows a delete, a key only among the new rows an
-- insert. That is exactly the statement's net effect, also when it changes
-- primary keys or moves rows between partitions. Deletes are logged first and
-- inserts last, so that a slave never sees a transient duplicate key.
--
-- The row filter sees the row as `new` and `old`; the one a change lacks (old for
-- an insert, new for a delete or for the insert half of a key change) is all NULL.
--
-- A partition's rows are logged by column name in its partitioned table's
-- order. TRUNCATE of a partition is logged before it happens as a truncate of
-- the partitioned table with the partition's constraint, which the slave
-- applies as a DELETE of those rows, whether it has the same partitions or not.
CREATE OR REPLACE FUNCTION pgreplica.capture(tbl regclass, root regclass) RETURNS void
LANGUAGE plpgsql SET client_min_messages = warning AS $attach$
DECLARE
    fn   text := pgreplica.capture_name(tbl);
    opts record;
    keys text[];
    cols text[];
    k1   text;
    body text;
    trig name;
    -- How a row is logged: its text form, or that of the logged columns only.
    old_text text := '(old.*)::text';
    new_text text := '(new.*)::text';
    -- Where a filter needs the row a change lacks.
    no_old text := '';
    no_new text := '';
    cond   text := 'true';
    -- What a TRUNCATE logs: the whole table, or a partition's rows.
    truncated text := 'NULL';
    -- For a deferrable key: the check that no two rows share a key.
    unique_key text := '';
    -- Old and new rows paired by key, with pg_catalog's operators.
    pairing text;
    -- The session settings the logged text depends on: set for the statement
    -- where the writer's session differs, then set back.
    setting text;
    declared text := '';
    pins text := '';
    unpins text := '';
    -- Whether the function must pin its search_path (a filter, a deferrable
    -- key: SQL not written here, or not written fully qualified).
    pinned boolean := false;
    qualified text;
    wal boolean;
BEGIN
    SELECT coalesce(t.operations, 'IUDT') AS operations, t.filter, t.columns, t.exclude,
           t.deletes_kept_since IS NOT NULL AS keeps_deletes
      INTO opts
      FROM (SELECT 1) AS one LEFT JOIN pgreplica.tables t ON t.reloid = root;
    SELECT array_agg(quote_ident(k.c) ORDER BY k.n) INTO keys
      FROM unnest(pgreplica.key_columns(root)) WITH ORDINALITY AS k(c, n);
    k1 := keys[1];
    SELECT format('%I.%I', n.nspname, c.relname) INTO qualified
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl;
    IF opts.columns IS NOT NULL OR opts.exclude IS NOT NULL OR tbl <> root THEN
        SELECT array_agg(quote_ident(c)) INTO cols FROM unnest(pgreplica.logged_columns(root)) c;
        old_text := format('ROW(%s)::pg_catalog.text', (SELECT string_agg('old.' || c, ', ') FROM unnest(cols) c));
        new_text := format('ROW(%s)::pg_catalog.text', (SELECT string_agg('new.' || c, ', ') FROM unnest(cols) c));
    ELSE
        old_text := '(old.*)::pg_catalog.text';
        new_text := '(new.*)::pg_catalog.text';
    END IF;
    IF tbl <> root THEN
        truncated := format('pg_catalog.pg_get_partition_constraintdef(%s)', tbl::oid);
    END IF;
    -- A key column whose type has its equality in pg_catalog is compared with
    -- it; any other by its text form (equal keys print alike).
    SELECT string_agg(CASE WHEN EXISTS (
                SELECT FROM pg_operator o
                 WHERE o.oprname = '=' AND o.oprleft = a.atttypid AND o.oprright = a.atttypid
                   AND o.oprnamespace = 'pg_catalog'::regnamespace)
             THEN format('old.%1$s OPERATOR(pg_catalog.=) new.%1$s', quote_ident(k.c))
             ELSE format('old.%1$s::pg_catalog.text OPERATOR(pg_catalog.=) new.%1$s::pg_catalog.text',
                         quote_ident(k.c)) END, ' AND ' ORDER BY k.n)
      INTO pairing
      FROM unnest(pgreplica.key_columns(root)) WITH ORDINALITY AS k(c, n)
      JOIN pg_attribute a ON a.attrelid = root AND a.attname = k.c;
    FOR setting IN SELECT unnest(pgreplica.settings_for(root)) LOOP
        declared := declared || format(E'\n    saved_%s text;', lower(setting));
        pins := pins || format($pin$
    IF %s THEN
        saved_%s := pg_catalog.current_setting(%L);
        setting := pg_catalog.set_config(%L, %L, true);
    END IF;$pin$,
            CASE setting
                WHEN 'TimeZone' THEN
                    $c$pg_catalog.current_setting('TimeZone') OPERATOR(pg_catalog.<>) 'UTC'$c$
                WHEN 'DateStyle' THEN
                    $c$pg_catalog.left(pg_catalog.current_setting('DateStyle'), 3) OPERATOR(pg_catalog.<>) 'ISO'$c$
                WHEN 'IntervalStyle' THEN
                    $c$pg_catalog.current_setting('IntervalStyle') OPERATOR(pg_catalog.<>) 'postgres'$c$
                WHEN 'extra_float_digits' THEN
                    $c$pg_catalog.current_setting('extra_float_digits')::pg_catalog.int4 OPERATOR(pg_catalog.<) 1$c$
                ELSE
                    $c$pg_catalog.current_setting('bytea_output') OPERATOR(pg_catalog.<>) 'hex'$c$
            END,
            lower(setting), setting, setting,
            CASE setting WHEN 'TimeZone' THEN 'UTC' WHEN 'DateStyle' THEN 'ISO, YMD'
                         WHEN 'IntervalStyle' THEN 'postgres' WHEN 'extra_float_digits' THEN '3'
                         ELSE 'hex' END);
        unpins := unpins || format($unpin$
    IF saved_%1$s IS NOT NULL THEN
        setting := pg_catalog.set_config(%2$L, saved_%1$s, true);
    END IF;$unpin$, lower(setting), setting);
    END LOOP;
    -- A deferrable key lets rows share a key until commit, and a slave finds
    -- rows by key: such a state is refused where it is made, not replicated
    -- wrongly.
    IF EXISTS (SELECT FROM pg_constraint c
                WHERE c.conrelid = root AND c.contype = 'p' AND c.condeferrable) THEN
        pinned := true;
        unique_key := format($check$
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        IF EXISTS (SELECT FROM pgreplica_new new
                    WHERE (SELECT count(*) FROM %1$s t WHERE (%2$s) = (%3$s)) > 1) THEN
            RAISE EXCEPTION 'pgreplica: two rows of table %4$s share a primary key, which its deferrable key allows until commit but replication cannot follow'
                  USING ERRCODE = 'unique_violation',
                        HINT = 'Change keys through a key no row holds (or make the primary key NOT DEFERRABLE).';
        END IF;
    END IF;$check$,
            (SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = root),
            (SELECT string_agg('t.' || k, ', ') FROM unnest(keys) k),
            (SELECT string_agg('new.' || k, ', ') FROM unnest(keys) k),
            replace(root::text, '''', ''''''));
    END IF;
    IF opts.filter IS NOT NULL THEN
        pinned := true;
        cond := '(' || opts.filter || ')';
        -- The all-NULL row only where the filter names it: the join costs time
        -- on every statement.
        IF opts.filter ~* '\mold\M' THEN
            no_old := format(' LEFT JOIN ONLY %s AS old ON false', qualified);
        END IF;
        IF opts.filter ~* '\mnew\M' THEN
            no_new := format(' LEFT JOIN ONLY %s AS new ON false', qualified);
        END IF;
    END IF;
    -- Every name below is qualified, so that the function (SECURITY DEFINER)
    -- is safe under the writer's search_path without pinning it, which would
    -- cost a setting saved and restored on every call.
    body := format($body$
#variable_conflict use_column
<<capture>>
DECLARE
    jit_off pg_catalog.bool := false;
    -- Read once, outside the statement: the statement starts faster.
    origin pg_catalog.text := pgreplica.origin();
    -- What set_config returns: assigned, a call runs as a plain expression
    -- (PERFORM would start a query).
    setting pg_catalog.text;%12$s
BEGIN%11$s%13$s
    IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
        INSERT INTO pgreplica.log (ev_table, ev_op, ev_origin, ev_new)
        SELECT %9$s, 'I', capture.origin, %4$s
          FROM pgreplica_new new%6$s
         WHERE %8$s;
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
        INSERT INTO pgreplica.log (ev_table, ev_op, ev_origin, ev_old)
        SELECT %9$s, 'D', capture.origin, %5$s
          FROM pgreplica_old old%7$s
         WHERE %8$s;
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
        -- The pairing's plan is kept for the session, costed for the first
        -- update's rows, and far above what it takes: after a large first
        -- update PostgreSQL would compile it (JIT) at every update, a few ms
        -- even for one row. It runs without.
        IF pg_catalog.current_setting('jit') OPERATOR(pg_catalog.=) 'on' THEN
            setting := pg_catalog.set_config('jit', 'off', true);
            jit_off := true;
        END IF;
        INSERT INTO pgreplica.log (ev_table, ev_op, ev_origin, ev_old, ev_new)
        SELECT %9$s, CASE WHEN ot IS NULL THEN 'I' WHEN nt IS NULL THEN 'D' ELSE 'U' END,
               capture.origin, ot, nt
          FROM (SELECT CASE WHEN old.%1$s IS NOT NULL THEN %5$s END AS ot,
                       CASE WHEN new.%1$s IS NOT NULL THEN %4$s END AS nt
                  FROM pgreplica_old old FULL JOIN pgreplica_new new ON %2$s
                 WHERE %8$s
                -- Kept apart: pulled up, each row's text would be made
                -- again wherever ot and nt are named (eight times a row).
                OFFSET 0) AS pair
         WHERE (ot OPERATOR(pg_catalog.=) nt) IS NOT TRUE
         ORDER BY CASE WHEN nt IS NULL THEN 0 WHEN ot IS NULL THEN 2 ELSE 1 END;
        IF jit_off THEN
            setting := pg_catalog.set_config('jit', 'on', true);
        END IF;
    ELSE
        INSERT INTO pgreplica.log (ev_table, ev_op, ev_origin, ev_old)
        VALUES (%9$s, 'T', capture.origin, %10$s);
    END IF;%14$s
    -- One NOTIFY per transaction is all the daemon needs; PostgreSQL would
    -- fold the others into it, but each call still costs.
    IF (pg_catalog.current_setting('pgreplica.notified', true) OPERATOR(pg_catalog.=) '1')
       IS NOT TRUE THEN
        setting := pg_catalog.set_config('pgreplica.notified', '1', true);
        PERFORM pg_catalog.pg_notify('pgreplica', '');
        -- What pgreplica.wait() waits for (kept only if this commits).
        setting := pg_catalog.set_config('pgreplica.last_txid',
                                         pg_catalog.txid_current()::pg_catalog.text, false);
    END IF;
    RETURN NULL;
END
$body$, k1, pairing, NULL,
        new_text, old_text, no_old, no_new, cond, root::oid, truncated, unique_key,
        declared, pins, unpins);
    -- SECURITY DEFINER: application roles write the log only through this function.
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION pgreplica.%I() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER%s
        AS %L$f$, fn,
        CASE WHEN pinned THEN E'\n        SET search_path = pg_catalog, pg_temp' END, body);
    EXECUTE format('REVOKE ALL ON FUNCTION pgreplica.%I() FROM PUBLIC', fn);
    PERFORM pgreplica.drop_triggers(tbl);
    -- Under WAL capture a table has only the triggers that fire (a disabled
    -- trigger with a transition table still has every row it writes copied).
    wal := pgreplica.wal();
    IF strpos(opts.operations, 'I') > 0 AND NOT wal THEN
        EXECUTE format('CREATE TRIGGER pgreplica_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS pgreplica_new'
                       ' FOR EACH STATEMENT EXECUTE FUNCTION pgreplica.%I()', tbl, fn);
    END IF;
    IF strpos(opts.operations, 'U') > 0 AND NOT wal THEN
        EXECUTE format('CREATE TRIGGER pgreplica_update AFTER UPDATE ON %s REFERENCING OLD TABLE AS pgreplica_old'
                       ' NEW TABLE AS pgreplica_new FOR EACH STATEMENT EXECUTE FUNCTION pgreplica.%I()', tbl, fn);
    END IF;
    IF strpos(opts.operations, 'D') > 0 AND (NOT wal OR opts.keeps_deletes) THEN
        EXECUTE format('CREATE TRIGGER pgreplica_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS pgreplica_old'
                       ' FOR EACH STATEMENT EXECUTE FUNCTION pgreplica.%I()', tbl, fn);
    END IF;
    IF strpos(opts.operations, 'T') > 0 THEN
        -- A partition's before: its constraint is read while it still holds.
        EXECUTE format('CREATE TRIGGER pgreplica_truncate %s TRUNCATE ON %s'
                       ' FOR EACH STATEMENT EXECUTE FUNCTION pgreplica.%I()',
                       CASE WHEN tbl = root THEN 'AFTER' ELSE 'BEFORE' END, tbl, fn);
    END IF;
    -- ALWAYS: capture also fires in sessions that apply changes from another node
    -- (session_replication_role = replica), where a node captures too. Under
    -- WAL capture the table logs its whole old row in the WAL, which conflicts
    -- and the values an update leaves alone need; a partition's TRUNCATE,
    -- which the WAL does not give as its partitioned table's, is still logged,
    -- and so are deletes where the table's deletes are kept (the WAL reader
    -- passes over them: the delete itself comes from the WAL). The root's
    -- TRUNCATE trigger stays, disabled (it copies no rows).
    FOR trig IN SELECT t.tgname FROM pg_trigger t
                 WHERE t.tgrelid = tbl AND t.tgname LIKE 'pgreplica\_%' LOOP
        EXECUTE format('ALTER TABLE %s %s TRIGGER %I', tbl,
                       CASE WHEN wal AND tbl = root AND trig = 'pgreplica_truncate'
                            THEN 'DISABLE' ELSE 'ENABLE ALWAYS' END, trig);
    END LOOP;
    IF wal THEN
        EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', tbl);
    END IF;
END
$attach$;

-- Drops a table's capture triggers.
CREATE OR REPLACE FUNCTION pgreplica.drop_triggers(tbl regclass) RETURNS void
LANGUAGE plpgsql SET client_min_messages = warning AS $$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS pgreplica_insert ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS pgreplica_update ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS pgreplica_delete ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS pgreplica_truncate ON %s', tbl);
END
$$;

-- Sets what is captured of a table and attaches it: the operations logged
-- (letters of 'IUDT'), a row filter (a boolean SQL expression over new.* and
-- old.*, evaluated with search_path pg_catalog: qualify your own functions), and
-- the columns logged (only `columns`, or all but `exclude`; NULL for all).
-- Refuses, naming the table, an option that cannot work. When the logged
-- columns change, an execute event without a statement marks the point, so that
-- the events logged before it are read with the columns they had. Returns
-- whether anything changed.
CREATE OR REPLACE FUNCTION pgreplica.set_options(
    tbl regclass, operations text, filter text, columns text[], exclude text[])
RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    why    text := pgreplica.unsupported(tbl);
    before jsonb := pgreplica.layouts();
    known  text[];
    wrong  text;
BEGIN
    IF why IS NOT NULL THEN
        RAISE EXCEPTION 'table %: cannot be replicated: %', tbl, why;
    END IF;
    IF pgreplica.root(tbl) <> tbl THEN
        RAISE EXCEPTION 'table %: is a partition of %, whose options it follows: give the [TABLE] section to %',
            tbl, pgreplica.root(tbl), pgreplica.root(tbl);
    END IF;
    IF operations !~ '^[IUDT]+$' THEN
        RAISE EXCEPTION 'table %: operations ''%'' are not letters of IUDT', tbl, operations;
    END IF;
    SELECT array_agg(a.attname::text) INTO known FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped;
    SELECT string_agg(c, ', ') INTO wrong
      FROM unnest(coalesce(columns, '{}') || coalesce(exclude, '{}')) c WHERE c <> ALL (known);
    IF wrong IS NOT NULL THEN
        RAISE EXCEPTION 'table %: no such column: %', tbl, wrong;
    END IF;
    SELECT string_agg(k, ', ') INTO wrong
      FROM unnest(pgreplica.key_columns(tbl)) k
     WHERE k <> ALL (coalesce(columns, known)) OR k = ANY (coalesce(exclude, '{}'));
    IF wrong IS NOT NULL THEN
        RAISE EXCEPTION 'table %: the primary key column % must be replicated', tbl, wrong;
    END IF;
    IF filter IS NOT NULL THEN
        IF strpos(filter, ';') > 0 THEN
            RAISE EXCEPTION 'table %: filter "%" is more than one expression (it has a ";")', tbl, filter;
        END IF;
        BEGIN
            EXECUTE format('SELECT 1 FROM ONLY %s AS new, ONLY %s AS old WHERE false AND (%s)',
                           tbl, tbl, filter);
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'table %: filter "%" does not compile: %', tbl, filter, SQLERRM;
        END;
    END IF;
    IF EXISTS (SELECT 1 FROM pgreplica.tables t WHERE t.reloid = tbl
                  AND t.operations = set_options.operations
                  AND t.filter IS NOT DISTINCT FROM set_options.filter
                  AND t.columns IS NOT DISTINCT FROM set_options.columns
                  AND t.exclude IS NOT DISTINCT FROM set_options.exclude)
       AND pg_catalog.to_regproc('pgreplica.' || pgreplica.capture_name(tbl)) IS NOT NULL THEN
        RETURN false;
    END IF;
    INSERT INTO pgreplica.tables AS t (reloid, operations, filter, columns, exclude)
    VALUES (tbl, operations, filter, columns, exclude)
    ON CONFLICT (reloid) DO UPDATE
       SET operations = excluded.operations, filter = excluded.filter,
           columns = excluded.columns, exclude = excluded.exclude;
    PERFORM pgreplica.attach(tbl);
    IF before -> tbl::oid::text IS DISTINCT FROM pgreplica.layouts() -> tbl::oid::text THEN
        INSERT INTO pgreplica.log (ev_table, ev_op, ev_origin, ev_old, ev_new)
        VALUES (0, 'X', pgreplica.origin(), before::text, '');
    END IF;
    RETURN true;
END
$$;

-- Under WAL capture, keeps a table's deletes in the log or stops keeping them
-- (see pgreplica.tables.deletes_kept_since); what is kept stays until cleaned.
CREATE OR REPLACE FUNCTION pgreplica.keep_deletes(tbl regclass, keep boolean) RETURNS void
LANGUAGE plpgsql SET client_min_messages = warning AS $$
BEGIN
    IF EXISTS (SELECT FROM pgreplica.tables t WHERE t.reloid = tbl
                  AND (t.deletes_kept_since IS NOT NULL) <> keep) THEN
        UPDATE pgreplica.tables SET deletes_kept_since = CASE WHEN keep THEN now() END
         WHERE reloid = tbl;
        PERFORM pgreplica.attach(tbl);
    END IF;
END
$$;

-- Removes capture from one table. Its events already in the log stay.
CREATE OR REPLACE FUNCTION pgreplica.detach(tbl regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    member regclass;
BEGIN
    FOR member IN SELECT tbl UNION ALL SELECT relid FROM pg_partition_tree(tbl) WHERE relid <> tbl LOOP
        PERFORM pgreplica.drop_triggers(member);
        EXECUTE format('DROP FUNCTION IF EXISTS pgreplica.%I()', pgreplica.capture_name(member));
    END LOOP;
    DELETE FROM pgreplica.tables WHERE reloid = tbl;
    IF pgreplica.published(tbl) THEN
        EXECUTE format('ALTER PUBLICATION pgreplica DROP TABLE %s', tbl);
    END IF;
END
$$;

-- A table's definition: schema, name, logged columns in order, primary key.
CREATE OR REPLACE FUNCTION pgreplica.layout(tbl regclass) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('schema', n.nspname, 'name', c.relname,
                              'columns', pgreplica.logged_columns(c.oid),
                              'key', pgreplica.key_columns(c.oid))
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = tbl
$$;

-- The definitions of the attached tables, by oid. An execute event keeps them
-- from before its statement, so that the events logged before it are read
-- with the columns they had.
CREATE OR REPLACE FUNCTION pgreplica.layouts() RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_object_agg(t.reloid::text, pgreplica.layout(t.reloid)), '{}')
      FROM pgreplica.tables t JOIN pg_class c ON c.oid = t.reloid
$$;

-- Runs a statement (typically DDL) on the master and queues it in the log, so
-- that every slave runs it at the same point between the data changes. Capture
-- is attached again to the tables whose definition changed (a new primary key).
-- Call it inside a migration's transaction, or through `pgreplica execute`.
CREATE OR REPLACE FUNCTION pgreplica.execute(sql text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    before jsonb := pgreplica.layouts();
    tbl    oid;
BEGIN
    EXECUTE sql;
    FOR tbl IN SELECT after.key::oid FROM jsonb_each(pgreplica.layouts()) AS after
                WHERE before -> after.key IS DISTINCT FROM after.value LOOP
        PERFORM pgreplica.attach(tbl);
    END LOOP;
    INSERT INTO pgreplica.log (ev_table, ev_op, ev_origin, ev_old, ev_new)
    VALUES (0, 'X', pgreplica.origin(), before::text, sql);
    PERFORM pg_notify('pgreplica', '');
END
$$;

-- Attaches every ordinary or partitioned table outside the system schemas that
-- is not an extension's; one row per table with NULL or the reason it was skipped.
CREATE OR REPLACE FUNCTION pgreplica.attach_all(OUT tbl regclass, OUT skipped text)
RETURNS SETOF record LANGUAGE plpgsql AS $$
BEGIN
    FOR tbl IN
        SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
           AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgreplica')
           AND n.nspname NOT LIKE 'pg\_%'
         ORDER BY n.nspname, c.relname
    LOOP
        -- An extension's tables (PostGIS's spatial_ref_sys, pg_partman's
        -- part_config) are filled by the extension on each server.
        SELECT 'belongs to extension ' || e.extname || ', which fills its own copy on the '
               || 'slave: name it with --table to replicate it anyway'
          INTO skipped
          FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
         WHERE d.classid = 'pg_class'::regclass AND d.objid = tbl
           AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e';
        IF skipped IS NULL THEN
            skipped := pgreplica.attach(tbl);
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Read-your-writes, for the application: returns true once the calling
-- session's last committed transaction that wrote a replicated table has been
-- applied on at least `slaves` slaves (all of them, where a set has fewer) of
-- every set of this master; false at the timeout, with a warning naming the
-- sets that lack it. Call it after the commit, outside a REPEATABLE READ
-- transaction (it must see the registry move). Under WAL capture, where no
-- trigger notes the session's writes, it waits for every transaction
-- committed before the call.
CREATE OR REPLACE FUNCTION pgreplica.wait(timeout interval DEFAULT '5 seconds',
                                          slaves integer DEFAULT NULL)
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    target bigint := nullif(current_setting('pgreplica.last_txid', true), '')::bigint;
    wal boolean := pgreplica.wal();
    now txid_snapshot := txid_current_snapshot();
    deadline timestamptz := clock_timestamp() + timeout;
    pause float8 := 0.001;
    missing text;
BEGIN
    IF target IS NULL AND NOT wal THEN
        RETURN true;
    END IF;
    IF target = txid_current_if_assigned() OR (wal AND txid_current_if_assigned() IS NOT NULL) THEN
        RAISE EXCEPTION 'pgreplica.wait() waits for committed changes: call it after the transaction that wrote them commits';
    END IF;
    LOOP
        SELECT string_agg(format('set %s (%s of %s slave(s) have it)', s.set_name, s.have, s.total), ', ')
          INTO missing
          FROM (SELECT r.set_name,
                       count(*) FILTER (WHERE CASE WHEN wal
                           -- Every transaction committed at the call.
                           THEN txid_snapshot_xmax(r.snapshot) >= txid_snapshot_xmax(now)
                                AND NOT EXISTS (SELECT FROM txid_snapshot_xip(r.snapshot) x
                                                 WHERE txid_visible_in_snapshot(x, now))
                           ELSE txid_visible_in_snapshot(target, r.snapshot) END) AS have,
                       count(*) AS total,
                       -- The set's SYNC, or one slave.
                       coalesce(nullif(max(r.sync), 0), 1) AS sync
                  FROM pgreplica.slave r WHERE r.slave > 0 GROUP BY r.set_name) s
         WHERE s.have < least(coalesce(wait.slaves, s.sync), s.total);
        IF missing IS NULL THEN
            RETURN true;
        END IF;
        IF clock_timestamp() >= deadline THEN
            RAISE WARNING 'pgreplica.wait: not applied within %: %', timeout, missing;
            RETURN false;
        END IF;
        -- The registry moves when a daemon reports a batch: look often at
        -- first, then every 10 ms.
        PERFORM pg_sleep(pause);
        pause := least(pause * 2, 0.01);
    END LOOP;
END
$$;

REVOKE ALL ON ALL TABLES IN SCHEMA pgreplica FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgreplica FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgreplica FROM PUBLIC;
-- Any role may wait for its own writes, and nothing else.
GRANT USAGE ON SCHEMA pgreplica TO PUBLIC;
GRANT EXECUTE ON FUNCTION pgreplica.wait(interval, integer) TO PUBLIC;
