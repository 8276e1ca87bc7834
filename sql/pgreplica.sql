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
    ev_op     "char"      NOT NULL,   -- I insert, U update, D delete, T truncate, X execute
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

-- Tables attached to capture.
CREATE TABLE IF NOT EXISTS pgreplica.tables (
    reloid      oid PRIMARY KEY,
    attached_at timestamptz NOT NULL DEFAULT now()
);

-- The capture function's name for a table.
CREATE OR REPLACE FUNCTION pgreplica.capture_name(tbl regclass) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT 'capture_' || tbl::oid $$;

-- Why a table cannot be replicated, or NULL when it can.
CREATE OR REPLACE FUNCTION pgreplica.unsupported(tbl regclass) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN c.relkind = 'p' THEN 'partitioned table: attach its partitions'
        WHEN c.relkind <> 'r' THEN 'not an ordinary table'
        WHEN c.relpersistence <> 'p' THEN 'temporary or unlogged table'
        WHEN n.nspname = 'pgreplica' THEN 'pgreplica''s own table'
        WHEN NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
            THEN 'no primary key'
    END
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = tbl
$$;

-- Attaches capture to one table: generates its capture function (statement-level,
-- with transition tables) and its triggers. Idempotent; returns NULL on success or
-- the reason the table cannot be replicated.
--
-- An UPDATE statement's old and new rows are paired by primary key: a key present
-- on both sides is an update (logged only when the row's text changed), a key only
-- among the old rows a delete, a key only among the new rows an insert. That is
-- exactly the statement's net effect, also when it changes primary keys. Deletes
-- are logged first and inserts last, so that a slave never sees a transient
-- duplicate key.
CREATE OR REPLACE FUNCTION pgreplica.attach(tbl regclass) RETURNS text
LANGUAGE plpgsql SET client_min_messages = warning AS $attach$
DECLARE
    why  text := pgreplica.unsupported(tbl);
    fn   text := pgreplica.capture_name(tbl);
    keys text[];
    k1   text;
    body text;
BEGIN
    IF why IS NOT NULL THEN
        RETURN why;
    END IF;
    SELECT array_agg(quote_ident(a.attname) ORDER BY array_position(i.indkey::int2[], a.attnum))
      INTO keys
      FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
     WHERE i.indrelid = tbl AND i.indisprimary;
    k1 := keys[1];
    body := format($body$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pgreplica.log (ev_table, ev_op, ev_origin, ev_new)
        SELECT TG_RELID, 'I', current_setting('pgreplica.origin', true), (n.*)::text
          FROM pgreplica_new n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO pgreplica.log (ev_table, ev_op, ev_origin, ev_old)
        SELECT TG_RELID, 'D', current_setting('pgreplica.origin', true), (o.*)::text
          FROM pgreplica_old o;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO pgreplica.log (ev_table, ev_op, ev_origin, ev_old, ev_new)
        SELECT TG_RELID, CASE WHEN ot IS NULL THEN 'I' WHEN nt IS NULL THEN 'D' ELSE 'U' END,
               current_setting('pgreplica.origin', true), ot, nt
          FROM (SELECT CASE WHEN o.%1$s IS NOT NULL THEN (o.*)::text END AS ot,
                       CASE WHEN n.%1$s IS NOT NULL THEN (n.*)::text END AS nt
                  FROM pgreplica_old o FULL JOIN pgreplica_new n ON (%2$s) = (%3$s)) AS pair
         WHERE ot IS DISTINCT FROM nt
         ORDER BY CASE WHEN nt IS NULL THEN 0 WHEN ot IS NULL THEN 2 ELSE 1 END;
    ELSE
        INSERT INTO pgreplica.log (ev_table, ev_op, ev_origin)
        VALUES (TG_RELID, 'T', current_setting('pgreplica.origin', true));
    END IF;
    PERFORM pg_notify('pgreplica', '');
    RETURN NULL;
END
$body$, k1,
        (SELECT string_agg('o.' || k, ', ') FROM unnest(keys) k),
        (SELECT string_agg('n.' || k, ', ') FROM unnest(keys) k));
    -- SECURITY DEFINER: application roles write the log only through this function.
    -- The SET clauses make every value's text form independent of the writer's
    -- session: instants in UTC, ISO dates, floats with all their digits.
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION pgreplica.%I() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        SET timezone = 'UTC'
        SET datestyle = 'ISO, YMD'
        SET intervalstyle = 'postgres'
        SET extra_float_digits = 3
        SET bytea_output = 'hex'
        SET jit = off
        AS %L$f$, fn, body);
    EXECUTE format('REVOKE ALL ON FUNCTION pgreplica.%I() FROM PUBLIC', fn);
    EXECUTE format('DROP TRIGGER IF EXISTS pgreplica_insert ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS pgreplica_update ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS pgreplica_delete ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS pgreplica_truncate ON %s', tbl);
    EXECUTE format('CREATE TRIGGER pgreplica_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS pgreplica_new'
                   ' FOR EACH STATEMENT EXECUTE FUNCTION pgreplica.%I()', tbl, fn);
    EXECUTE format('CREATE TRIGGER pgreplica_update AFTER UPDATE ON %s REFERENCING OLD TABLE AS pgreplica_old'
                   ' NEW TABLE AS pgreplica_new FOR EACH STATEMENT EXECUTE FUNCTION pgreplica.%I()', tbl, fn);
    EXECUTE format('CREATE TRIGGER pgreplica_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS pgreplica_old'
                   ' FOR EACH STATEMENT EXECUTE FUNCTION pgreplica.%I()', tbl, fn);
    EXECUTE format('CREATE TRIGGER pgreplica_truncate AFTER TRUNCATE ON %s'
                   ' FOR EACH STATEMENT EXECUTE FUNCTION pgreplica.%I()', tbl, fn);
    INSERT INTO pgreplica.tables (reloid) VALUES (tbl) ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$attach$;

-- Removes capture from one table. Its events already in the log stay.
CREATE OR REPLACE FUNCTION pgreplica.detach(tbl regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS pgreplica_insert ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS pgreplica_update ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS pgreplica_delete ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS pgreplica_truncate ON %s', tbl);
    EXECUTE format('DROP FUNCTION IF EXISTS pgreplica.%I()', pgreplica.capture_name(tbl));
    DELETE FROM pgreplica.tables WHERE reloid = tbl;
END
$$;

-- The definitions of the attached tables, by oid: schema, name, columns in
-- order, primary key. An execute event keeps them from before its statement,
-- so that the events logged before it are read with the columns they had.
CREATE OR REPLACE FUNCTION pgreplica.layouts() RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_object_agg(c.oid::text, jsonb_build_object(
               'schema', n.nspname,
               'name', c.relname,
               'columns', ARRAY(SELECT a.attname::text FROM pg_attribute a
                                 WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                 ORDER BY a.attnum),
               'key', ARRAY(SELECT a.attname::text FROM pg_index i JOIN pg_attribute a
                                ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                             WHERE i.indrelid = c.oid AND i.indisprimary
                             ORDER BY array_position(i.indkey::int2[], a.attnum)))), '{}')
      FROM pgreplica.tables t JOIN pg_class c ON c.oid = t.reloid
      JOIN pg_namespace n ON n.oid = c.relnamespace
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
    VALUES (0, 'X', current_setting('pgreplica.origin', true), before::text, sql);
    PERFORM pg_notify('pgreplica', '');
END
$$;

-- Attaches every ordinary table outside the system schemas; one row per table
-- with NULL or the reason it was skipped.
CREATE OR REPLACE FUNCTION pgreplica.attach_all(OUT tbl regclass, OUT skipped text)
RETURNS SETOF record LANGUAGE plpgsql AS $$
BEGIN
    FOR tbl IN
        SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p')
           AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgreplica')
           AND n.nspname NOT LIKE 'pg\_%'
         ORDER BY n.nspname, c.relname
    LOOP
        skipped := pgreplica.attach(tbl);
        RETURN NEXT;
    END LOOP;
END
$$;

REVOKE ALL ON ALL TABLES IN SCHEMA pgreplica FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgreplica FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgreplica FROM PUBLIC;
