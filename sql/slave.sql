-- pgreplica on a slave: how far each set has applied, the tables a clone is
-- copying, and the conflicts met. The daemon and clone run this file on every
-- connection to a slave (it is idempotent); the slave's role needs CREATE on
-- the database the first time.

-- Sessions that run it at the same moment (a daemon and a clone starting
-- together on a new slave) take turns: CREATE … IF NOT EXISTS alone fails in
-- one of them when both create. Run in one transaction, as the daemon does,
-- the lock lasts to the end of the file.
SELECT pg_advisory_xact_lock(hashtext('pgreplica'), hashtext('sql/slave.sql'));

CREATE SCHEMA IF NOT EXISTS pgreplica;

-- A set's progress: the master snapshot its last applied batch ended at. It is
-- written in the batch's own transaction, so a crash loses nothing and applies
-- nothing twice.
CREATE TABLE IF NOT EXISTS pgreplica.progress (
    set_name   text PRIMARY KEY,
    snapshot   text NOT NULL,
    applied_at timestamptz NOT NULL,
    events     bigint NOT NULL
);
-- A batch too big for one transaction is applied in steps: its end, and the
-- last event applied of it (NULL when the last batch was applied whole).
-- Under WAL capture: where the last applied transaction's commit record ends
-- on the master (the slot is advanced to it once this commits).
-- The master the progress is of (its pgreplica.node()): a slave is never read
-- against another master's log (after a switchover, or a config pointed
-- elsewhere).
-- (Only when missing: ALTER TABLE takes the table's strongest lock, which a
-- long `check` reading the progress would hold up, and every batch behind it.
-- `master` is the newest column: a slave that has it has the others.)
DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'pgreplica.progress'::regclass
                      AND attname = 'master' AND NOT attisdropped) THEN
        ALTER TABLE pgreplica.progress
            ADD COLUMN IF NOT EXISTS target text,
            ADD COLUMN IF NOT EXISTS upto   bigint,
            ADD COLUMN IF NOT EXISTS lsn    pg_lsn,
            ADD COLUMN IF NOT EXISTS master text;
    END IF;
END $$;

-- Tables that `clone` is copying or has copied but not yet handed over: their
-- events are the clone's business, not the batches'.
CREATE TABLE IF NOT EXISTS pgreplica.cloning (
    set_name   text NOT NULL,
    tbl        text NOT NULL,   -- the master's table, quoted schema.name
    snapshot   text,            -- master snapshot the copy reflects; NULL until copied
    copied_at  timestamptz,
    deferred   text,            -- foreign keys of a created table, added at the handover
    after_rows text,            -- keys and indexes of a created table, built after its rows
    PRIMARY KEY (set_name, tbl)
);
-- Slaves set up before after_rows existed.
DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'pgreplica.cloning'::regclass
                      AND attname = 'after_rows' AND NOT attisdropped) THEN
        ALTER TABLE pgreplica.cloning ADD COLUMN IF NOT EXISTS after_rows text;
    END IF;
END $$;

-- Every conflict met while applying, and how it was resolved.
CREATE TABLE IF NOT EXISTS pgreplica.conflicts (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    set_name    text NOT NULL,
    tbl         text NOT NULL,     -- the slave's table, quoted schema.name
    key         text NOT NULL,     -- (k)=(v)
    kind        text NOT NULL,
    event       bigint NOT NULL,   -- in the master's log
    origin      text,              -- node the change came from
    local_row   text,
    remote_row  text,
    resolution  text,              -- keep-local or apply-remote; NULL: waiting for the DBA
    resolved_by text,              -- the policy, or 'hand'
    UNIQUE (set_name, event, tbl, key)
);
