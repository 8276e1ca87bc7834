//! What pgreplica keeps on a slave (`sql/slave.sql`): each set's progress, the
//! tables a clone is copying, the conflicts met, and the lock over them.

use crate::config::Config;
use crate::conflict::{Conflict, Winner};
use crate::db;
use crate::error::{Context, Error};
use crate::event::Snapshot;
use crate::pgoutput::Lsn;
use futures_util::future::try_join3;
use std::collections::HashSet;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, GenericClient, Transaction};

/// The slave's side, as shipped in `sql/slave.sql`.
pub const SETUP_SQL: &str = include_str!("../sql/slave.sql");

// The lock that serializes everything that moves a set's progress on a slave:
// the daemon's batches, the clone's handover, and check's reading.
const LOCK_KEY: &str = "hashtext('pgreplica'), hashtext($1)";

const PROGRESS_READ_SQL: &str =
    "SELECT snapshot, target, upto, lsn::text, master FROM pgreplica.progress WHERE set_name = $1";

const PROGRESS_WRITE_SQL: &str = "
INSERT INTO pgreplica.progress (set_name, snapshot, applied_at, events, target, upto, lsn, master)
VALUES ($1, $2, now(), $3, $4, $5, $6::text::pg_lsn, $7)
ON CONFLICT (set_name) DO UPDATE
   SET snapshot = EXCLUDED.snapshot, applied_at = now(), events = progress.events + EXCLUDED.events,
       target = EXCLUDED.target, upto = EXCLUDED.upto, lsn = EXCLUDED.lsn,
       master = EXCLUDED.master";

/// How far a slave has applied a set.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// The snapshot that ends the last batch applied whole.
    pub snapshot: Snapshot,
    /// The batch being applied in steps: the snapshot it ends at, and the last
    /// of its events applied.
    pub partial: Option<(Snapshot, i64)>,
    /// Under WAL capture, where the slave is in the master's WAL.
    pub wal: Option<WalProgress>,
    /// The master it is of (its `pgreplica.node()`; none: written before
    /// masters had one).
    pub master: Option<String>,
}

impl Progress {
    /// Refuses a progress of another master than `master`: read against this
    /// master's log it would skip or repeat changes.
    pub fn check_master(&self, set: &str, master: &str) -> Result<(), Error> {
        match &self.master {
            Some(of) if of != master => Err(Error::Invalid {
                doing: "resuming the slave".into(),
                message: format!(
                    "its progress in set {set} is of another master (node {of}) than the one \
                     the set's file names (node {master}): the set was switched over to \
                     another master, or the file points at the wrong server. Nothing is \
                     applied; reload the daemon with the set's current file, or copy the \
                     slave again with pgreplica clone --truncate"
                ),
            }),
            _ => Ok(()),
        }
    }
}

/// How far a slave has applied a set captured from the WAL.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WalProgress {
    /// Where the last transaction applied whole ends.
    pub at: Lsn,
    /// The transaction being applied in steps: where its commit record is,
    /// and how many of its changes are applied.
    pub partial: Option<(Lsn, i64)>,
}

const REFERENCED_SQL: &str = "
SELECT EXISTS (SELECT FROM pg_constraint
                WHERE contype = 'f' AND confrelid = to_regclass($1) AND conrelid <> confrelid)";

const CLONING_SQL: &str =
    "SELECT tbl, snapshot FROM pgreplica.cloning WHERE set_name = $1 ORDER BY tbl";

const MARK_SQL: &str = "
INSERT INTO pgreplica.cloning (set_name, tbl) VALUES ($1, $2) ON CONFLICT DO NOTHING";

const COPIED_SQL: &str = "
UPDATE pgreplica.cloning SET snapshot = $3, copied_at = now() WHERE set_name = $1 AND tbl = $2";

const DONE_SQL: &str = "DELETE FROM pgreplica.cloning WHERE set_name = $1 AND tbl = $2";

const CREATED_SQL: &str = "
UPDATE pgreplica.cloning SET after_rows = $3, deferred = $4 WHERE set_name = $1 AND tbl = $2";

const CREATED_READ_SQL: &str =
    "SELECT after_rows, deferred FROM pgreplica.cloning WHERE set_name = $1 AND tbl = $2";

const DEFER_SQL: &str =
    "UPDATE pgreplica.cloning SET deferred = $3 WHERE set_name = $1 AND tbl = $2";

const DEFERRED_SQL: &str =
    "SELECT deferred FROM pgreplica.cloning WHERE set_name = $1 AND tbl = $2";

// Records a conflict (once: a batch applied again finds it recorded).
const RECORD_SQL: &str = "
INSERT INTO pgreplica.conflicts
       (set_name, tbl, key, kind, event, origin, local_row, remote_row, resolution, resolved_by)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (set_name, event, tbl, key) DO NOTHING";

// The resolution the DBA gave a conflict that stopped the set.
const RESOLVED_SQL: &str = "
SELECT resolution FROM pgreplica.conflicts
 WHERE set_name = $1 AND event = $2 AND tbl = $3 AND key = $4 AND resolution IS NOT NULL";

const LIST_SQL: &str = "
SELECT id, to_char(at, 'YYYY-MM-DD HH24:MI:SS'), tbl, key, kind, event, coalesce(origin, '-'),
       coalesce(local_row, '(no row)'), coalesce(remote_row, '(no row)'),
       coalesce(resolution || ' (' || resolved_by || ')', 'WAITING: the slave is stopped on it')
  FROM pgreplica.conflicts WHERE set_name = $1 ORDER BY id";

const HAND_SQL: &str = "
UPDATE pgreplica.conflicts SET resolution = $3, resolved_by = 'hand'
 WHERE set_name = $1 AND id = $2 AND resolution IS NULL";

/// Sets up a session that writes on a slave: values read back compare with the
/// log's, and, as in PostgreSQL's own logical replication, the slave's ordinary
/// triggers, rules and foreign-key actions do not fire (pgreplica's capture,
/// `ENABLE ALWAYS`, still does where the slave captures too).
pub async fn session(client: &impl GenericClient) -> Result<(), Error> {
    client
        .batch_execute(db::SESSION_SQL)
        .await
        .on_slave("setting up the slave session")?;
    // A batch's commit is its progress: it must not be lost in a crash.
    // Its statements are planned once per session, not at every batch (a
    // custom plan of the catalog read alone cost more than a small batch's
    // apply): their parameters are arrays, whose length is all a custom
    // plan would learn.
    client
        .batch_execute("SET synchronous_commit = on; SET plan_cache_mode = force_generic_plan")
        .await
        .on_slave("setting up the slave session")?;
    match client
        .batch_execute("SET session_replication_role = replica")
        .await
    {
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
            let role: String = client
                .query_one("SELECT current_user::text", &[])
                .await
                .on_slave("reading the slave's role")?
                .get(0);
            Err(Error::Invalid {
                doing: "setting up the slave session".into(),
                message: format!(
                    "role {role} may not set session_replication_role, which keeps the \
                     slave's own triggers and foreign-key actions from firing while changes \
                     are applied: as a superuser on the slave run \
                     GRANT SET ON PARAMETER session_replication_role TO \"{role}\" \
                     (PostgreSQL 15 and later; before, the role must be a superuser)"
                ),
            })
        }
        other => other.on_slave("setting up the slave session"),
    }
}

/// On a node that captures from the WAL (multi-master), marks the changes of
/// the transaction with the origin set in `pgreplica.origin`: a row of
/// `pgreplica.log` that the WAL reader of the node's own set reads before
/// them, so that they never go back to where they came from. Nothing on a
/// node that captures with triggers (they stamp each change) or not at all.
/// The insert is planned only where the log exists.
const MARK_ORIGIN_SQL: &str = "DO $$ BEGIN
  IF pg_catalog.to_regclass('pgreplica.log') IS NOT NULL AND EXISTS (
         SELECT FROM pg_catalog.pg_publication WHERE pubname = 'pgreplica_log') THEN
    INSERT INTO pgreplica.log (ev_table, ev_op, ev_origin)
    SELECT 0, 'O', o FROM pgreplica.origin() o WHERE o IS NOT NULL;
  END IF;
END $$";

/// Marks the changes of `tx` with the origin its session set: a row of
/// `pgreplica.log` on a node that captures from the WAL, nothing elsewhere.
pub async fn mark_origin(tx: &impl GenericClient) -> Result<(), Error> {
    tx.batch_execute(MARK_ORIGIN_SQL)
        .await
        .on_slave("marking the changes' origin on the slave")
}

/// A session on slave `slave` that writes outside of batches (clone, repair).
/// On a node that captures too (multi-master), what it writes is logged with
/// the master's node as its origin, so that it never goes back there (on a
/// node that captures from the WAL, each transaction calls [`mark_origin`]).
pub async fn writer(set: &Config, slave: u32) -> Result<Client, Error> {
    let client = db::connect(&set.slaves[&slave], set.keepalive).await?;
    session(&client).await?;
    if let Some(origin) = set.origins(slave).master {
        client
            .execute(
                "SELECT set_config('pgreplica.origin', $1, false)",
                &[&origin],
            )
            .await
            .on_slave("setting up the slave session")?;
    }
    Ok(client)
}

/// Bounds every lock wait and every statement of the session: a row held by
/// someone else on the slave, or a statement held up there, makes the batch
/// fail and retry instead of hanging, holding the master's snapshot open.
pub async fn bound_waits(
    client: &Client,
    lock_timeout: std::time::Duration,
    statement_timeout: std::time::Duration,
) -> Result<(), Error> {
    // Numbers of milliseconds, never text from the config file. The
    // statement's bound is a second past the batch's, which the daemon keeps
    // and reports; this one stops the server's work when the daemon is gone.
    let sql = format!(
        "SET lock_timeout = {}; SET statement_timeout = {}",
        lock_timeout.as_millis().max(1),
        statement_timeout.as_millis() + 1000
    );
    client
        .batch_execute(&sql)
        .await
        .on_slave("setting up the slave session")
}

/// Prepares a slave connection: the session (see [`session`]) and pgreplica's
/// tables.
pub async fn prepare(client: &Client) -> Result<(), Error> {
    session(client).await?;
    client.batch_execute(SETUP_SQL).await.on_slave(
        "creating pgreplica's tables on the slave (the slave's role needs CREATE on the database)",
    )
}

/// Locks `set`'s progress on the slave for the rest of `tx` and reads it, with
/// the tables being cloned (quoted master names), whose events batches skip.
pub async fn lock_set(
    tx: &Transaction<'_>,
    set: &str,
) -> Result<(Option<Progress>, HashSet<String>), Error> {
    let sql = format!("SELECT pg_advisory_xact_lock({LOCK_KEY})");
    let lock = async {
        tx.execute_typed(&sql, &[(&set, Type::TEXT)])
            .await
            .on_slave("locking the set's progress on the slave")
    };
    // One round trip: each statement goes out whole when its future is first
    // polled, and try_join3 polls them in this order, so the server runs the
    // reads after the lock is taken, as if one waited for the other.
    let (_, progress, cloning) = try_join3(lock, read_progress(tx, set), cloning(tx, set)).await?;
    let cloning = cloning.into_iter().map(|(table, _)| table).collect();
    Ok((progress, cloning))
}

/// Takes (`hold`) or gives back the set's lock for the session, so that a
/// reader sees the slave between two batches.
pub async fn hold_set(client: &impl GenericClient, set: &str, hold: bool) -> Result<(), Error> {
    let call = if hold {
        "pg_advisory_lock"
    } else {
        "pg_advisory_unlock"
    };
    client
        .execute(&format!("SELECT {call}({LOCK_KEY})"), &[&set])
        .await
        .on_slave("locking the set's progress on the slave")
        .map(|_| ())
}

/// How far the slave has applied `set`, if it has started.
pub async fn read_progress(
    client: &impl GenericClient,
    set: &str,
) -> Result<Option<Progress>, Error> {
    let doing = "reading the slave's progress";
    let Some(row) = client
        .query_typed_opt(PROGRESS_READ_SQL, &[(&set, Type::TEXT)])
        .await
        .on_slave(doing)?
    else {
        return Ok(None);
    };
    let read = |text: String| {
        Snapshot::parse(&text).ok_or_else(|| Error::Invalid {
            doing: doing.into(),
            message: format!("pgreplica.progress holds an unreadable snapshot '{text}'"),
        })
    };
    let snapshot = read(row.get(0))?;
    let unreadable = |text: &str| Error::Invalid {
        doing: doing.into(),
        message: format!("pgreplica.progress holds an unreadable position '{text}'"),
    };
    let lsn = |text: String| Lsn::parse(&text).ok_or_else(|| unreadable(&text));
    let target = row.get::<_, Option<String>>(1);
    let upto = row.get::<_, Option<i64>>(2);
    let (partial, wal) = match row.get::<_, Option<String>>(3) {
        None => match (target, upto) {
            (Some(target), Some(upto)) => (Some((read(target)?, upto)), None),
            _ => (None, None),
        },
        Some(at) => {
            let partial = match (target, upto) {
                (Some(commit), Some(upto)) => Some((lsn(commit)?, upto)),
                _ => None,
            };
            let at = lsn(at)?;
            (None, Some(WalProgress { at, partial }))
        }
    };
    Ok(Some(Progress {
        snapshot,
        partial,
        wal,
        master: row.get(4),
    }))
}

/// Forgets the slave's progress in `set` (a clone of every table starts it
/// again).
pub async fn forget_progress(client: &impl GenericClient, set: &str) -> Result<(), Error> {
    client
        .execute(
            "DELETE FROM pgreplica.progress WHERE set_name = $1",
            &[&set],
        )
        .await
        .on_slave("forgetting the slave's progress")
        .map(|_| ())
}

/// Marks the progress in `set` of a slave that became a master as of
/// another master (`node`, itself): a daemon still running the set's old
/// file is refused there instead of applying to it.
pub async fn disown(client: &impl GenericClient, set: &str, node: &str) -> Result<(), Error> {
    client
        .execute(
            "UPDATE pgreplica.progress SET master = $2 WHERE set_name = $1",
            &[&set, &node],
        )
        .await
        .on_slave("marking the old slave's progress")
        .map(|_| ())
}

/// Records the slave's progress for `set`, with `events` more applied: the
/// batch up to `snapshot` applied whole, or (`partial`) in part, up to an event
/// of the batch that ends at another snapshot; `master` is the master's
/// node.
pub async fn write_progress(
    tx: &Transaction<'_>,
    (set, master): (&str, &str),
    snapshot: &Snapshot,
    partial: Option<(&Snapshot, i64)>,
    events: u64,
) -> Result<(), Error> {
    let (target, upto) = match partial {
        Some((target, upto)) => (Some(target.to_string()), Some(upto)),
        None => (None, None),
    };
    write(tx, (set, master), snapshot, (target, upto), None, events).await
}

/// Records the slave's progress for a set captured from the WAL, with
/// `events` more applied; `snapshot` is the master's when they were read,
/// which keeps the registry's place in the log.
pub async fn write_wal_progress(
    tx: &Transaction<'_>,
    (set, master): (&str, &str),
    snapshot: &Snapshot,
    progress: WalProgress,
    events: u64,
) -> Result<(), Error> {
    let (commit, upto) = match progress.partial {
        Some((commit, upto)) => (Some(commit.to_string()), Some(upto)),
        None => (None, None),
    };
    write(
        tx,
        (set, master),
        snapshot,
        (commit, upto),
        Some(progress.at),
        events,
    )
    .await
}

async fn write(
    tx: &Transaction<'_>,
    (set, master): (&str, &str),
    snapshot: &Snapshot,
    (target, upto): (Option<String>, Option<i64>),
    lsn: Option<Lsn>,
    events: u64,
) -> Result<(), Error> {
    let lsn = lsn.map(|l| l.to_string());
    let snapshot = snapshot.to_string();
    tx.execute_typed(
        PROGRESS_WRITE_SQL,
        &[
            (&set, Type::TEXT),
            (&snapshot, Type::TEXT),
            (&(events as i64), Type::INT8),
            (&target, Type::TEXT),
            (&upto, Type::INT8),
            (&lsn, Type::TEXT),
            (&master, Type::TEXT),
        ],
    )
    .await
    .on_slave("writing the slave's progress")
    .map(|_| ())
}

/// Empties a slave table for a fresh copy: TRUNCATE, or DELETE when other
/// tables' foreign keys reference it (TRUNCATE refuses those; in a replication
/// session the DELETE leaves the referencing rows alone, as the copy expects).
pub async fn empty(tx: &Transaction<'_>, table: &str) -> Result<(), Error> {
    let doing = format!("emptying {table} on the slave");
    let referenced: bool = tx
        .query_one(REFERENCED_SQL, &[&table])
        .await
        .on_slave(&doing)?
        .get(0);
    let verb = if referenced {
        "DELETE FROM"
    } else {
        "TRUNCATE"
    };
    tx.batch_execute(&format!("{verb} {table}"))
        .await
        .on_slave(&doing)
}

/// The tables a clone of `set` has marked (quoted master names), with the
/// master snapshot each copy reflects once copied.
pub async fn cloning(
    client: &impl GenericClient,
    set: &str,
) -> Result<Vec<(String, Option<String>)>, Error> {
    Ok(client
        .query_typed(CLONING_SQL, &[(&set, Type::TEXT)])
        .await
        .on_slave("reading the clone's state on the slave")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Marks a table as being cloned: batches skip its events from now on.
pub async fn mark_cloning(tx: &Transaction<'_>, set: &str, table: &str) -> Result<(), Error> {
    tx.execute(MARK_SQL, &[&set, &table])
        .await
        .on_slave("marking the tables to clone on the slave")
        .map(|_| ())
}

/// Records that a table's copy reflects the master at `snapshot`.
pub async fn mark_copied(
    tx: &Transaction<'_>,
    set: &str,
    table: &str,
    snapshot: &str,
) -> Result<(), Error> {
    tx.execute(COPIED_SQL, &[&set, &table, &snapshot])
        .await
        .on_slave("recording the copy on the slave")
        .map(|_| ())
}

/// Hands a cloned table over to the batches.
pub async fn mark_done(tx: &Transaction<'_>, set: &str, table: &str) -> Result<(), Error> {
    tx.execute(DONE_SQL, &[&set, &table])
        .await
        .on_slave("handing the copied tables over to replication")
        .map(|_| ())
}

/// Keeps what is left to build of a table the clone created: keys and indexes
/// (`after_rows`) and foreign keys (`deferred`).
pub async fn keep_definition(
    tx: &Transaction<'_>,
    set: &str,
    table: &str,
    after_rows: &str,
    deferred: &str,
) -> Result<(), Error> {
    tx.execute(CREATED_SQL, &[&set, &table, &after_rows, &deferred])
        .await
        .on_slave("recording the created table on the slave")
        .map(|_| ())
}

/// What an interrupted clone left to build of a table it created: keys and
/// indexes, and foreign keys.
pub async fn kept_definition(
    tx: &Transaction<'_>,
    set: &str,
    table: &str,
) -> Result<Option<(Option<String>, Option<String>)>, Error> {
    Ok(tx
        .query_opt(CREATED_READ_SQL, &[&set, &table])
        .await
        .on_slave("reading the slave's catalog")?
        .map(|r| (r.get(0), r.get(1))))
}

/// Keeps a created table's foreign keys for the handover, its keys being built.
pub async fn defer(
    tx: &Transaction<'_>,
    set: &str,
    table: &str,
    deferred: &str,
) -> Result<(), Error> {
    tx.execute(DEFER_SQL, &[&set, &table, &deferred])
        .await
        .on_slave("recording the copy on the slave")
        .map(|_| ())
}

/// The foreign keys kept for a table's handover.
pub async fn deferred(
    tx: &Transaction<'_>,
    set: &str,
    table: &str,
) -> Result<Option<String>, Error> {
    Ok(tx
        .query_one(DEFERRED_SQL, &[&set, &table])
        .await
        .on_slave("handing the copied tables over to replication")?
        .get(0))
}

/// Records a conflict with its resolution (`None` while it waits for the DBA)
/// and what resolved it.
pub async fn record_conflict(
    client: &impl GenericClient,
    conflict: &Conflict,
    resolution: Option<(Winner, &str)>,
) -> Result<(), Error> {
    let (winner, by) = match resolution {
        Some((winner, by)) => (Some(winner.name()), Some(by)),
        None => (None, None),
    };
    client
        .execute(
            RECORD_SQL,
            &[
                &conflict.set,
                &conflict.table.quoted(),
                &conflict.key,
                &conflict.kind.to_string(),
                &conflict.event,
                &conflict.origin,
                &conflict.local,
                &conflict.remote,
                &winner,
                &by,
            ],
        )
        .await
        .on_slave("recording a conflict in pgreplica.conflicts on the slave")
        .map(|_| ())
}

/// The DBA's resolution of a conflict that stopped the set, if given yet.
pub async fn resolution(
    tx: &Transaction<'_>,
    conflict: &Conflict,
) -> Result<Option<Winner>, Error> {
    let found = tx
        .query_opt(
            RESOLVED_SQL,
            &[
                &conflict.set,
                &conflict.event,
                &conflict.table.quoted(),
                &conflict.key,
            ],
        )
        .await
        .on_slave("reading the resolutions of conflicts on the slave")?;
    Ok(found.and_then(|r| Winner::parse(r.get(0))))
}

/// Records a conflict that stopped slave `slave` (policy `stop`), unresolved.
pub async fn record_stop(set: &Config, slave: u32, conflict: &Conflict) -> Result<(), Error> {
    let client = db::connect(&set.slaves[&slave], set.keepalive).await?;
    record_conflict(&client, conflict, None).await
}

/// The conflicts recorded on slave `slave`, one description each.
pub async fn conflicts(set: &Config, slave: u32) -> Result<Vec<String>, Error> {
    let client = db::connect(&set.slaves[&slave], None).await?;
    let doing = "reading pgreplica.conflicts on the slave";
    let exists: bool = client
        .query_one("SELECT to_regclass('pgreplica.conflicts') IS NOT NULL", &[])
        .await
        .on_slave(doing)?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client.query(LIST_SQL, &[&set.name]).await.on_slave(doing)?;
    Ok(rows
        .iter()
        .map(|r| {
            format!(
                "#{} {} {}, key {}: {} (event {} from {})\n    slave:  {}\n    master: {}\n    {}",
                r.get::<_, i64>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, String>(3),
                r.get::<_, String>(4),
                r.get::<_, i64>(5),
                r.get::<_, String>(6),
                r.get::<_, String>(7),
                r.get::<_, String>(8),
                r.get::<_, String>(9),
            )
        })
        .collect())
}

/// Resolves by hand conflict `id` that stopped slave `slave`; the slave applies
/// the batch again with this resolution at its next try. Returns false when no
/// such waiting conflict exists.
pub async fn resolve(set: &Config, slave: u32, id: i64, winner: Winner) -> Result<bool, Error> {
    let client = db::connect(&set.slaves[&slave], None).await?;
    let changed = client
        .execute(HAND_SQL, &[&set.name, &id, &winner.name()])
        .await
        .on_slave("resolving the conflict on the slave")?;
    Ok(changed == 1)
}
