//! What pgreplica keeps on a master about its slaves (`pgreplica.slave`): where
//! each has applied to, its counts and last error, and the log cleanup it allows.

use crate::config::{Capture, Config};
use crate::db::redact;
use crate::error::{Context, Error};
use crate::event::Snapshot;
use crate::slave;
use std::collections::BTreeMap;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, GenericClient, Row};

const ENTER_SQL: &str = "
INSERT INTO pgreplica.slave (set_name, slave, dsn, snapshot, seen_at, sync)
VALUES ($1, $2, $3, $4::text::txid_snapshot, now(), $5)
ON CONFLICT (set_name, slave) DO UPDATE SET dsn = EXCLUDED.dsn, seen_at = now(), sync = $5
RETURNING snapshot::text";

const SYNC_SQL: &str = "UPDATE pgreplica.slave SET snapshot = $3::text::txid_snapshot
 WHERE set_name = $1 AND slave = $2";

// The reports of many slaves at once: each slave's new position (if any), the
// events and conflicts since its last report, and its error (none: running).
const REPORTS_SQL: &str = "
UPDATE pgreplica.slave s
   SET snapshot = coalesce(r.snapshot::txid_snapshot, s.snapshot),
       events = s.events + r.events, conflicts = s.conflicts + r.conflicts,
       applied_at = CASE WHEN r.events > 0 OR (s.applied_at IS NULL AND r.error IS NULL)
                         THEN now() ELSE s.applied_at END,
       moved_at = CASE WHEN r.snapshot IS NULL THEN s.moved_at ELSE now() END,
       state = CASE WHEN r.error IS NULL THEN 'running' ELSE 'stopped' END,
       last_error = r.error,
       error_at = CASE WHEN r.error IS NULL THEN NULL ELSE now() END,
       seen_at = now()
  FROM unnest($2::int[], $3::text[], $4::int8[], $5::int8[], $6::text[])
       AS r(slave, snapshot, events, conflicts, error)
 WHERE s.set_name = $1 AND s.slave = r.slave";

/// What a slave reports: its new position, if it moved, the events and
/// conflicts applied since its last report, and the error it is stopped on.
#[derive(Debug, Default)]
pub struct Report {
    /// The end of the last batch it applied whole.
    pub at: Option<Snapshot>,
    /// Events applied since the last report.
    pub events: u64,
    /// Conflicts met since the last report.
    pub conflicts: u64,
    /// The error it is stopped on (none: running).
    pub error: Option<String>,
}

// Every slave of every set reading this master is registered: the log is kept
// until the one furthest behind has applied it.
// At most CLEANUP_ROWS at a time, so that one cleanup stays short; and only
// once every slave of the set ($2) is registered, so that a slave whose task
// has not reached the master yet is never cleaned past. What was removed is
// remembered in pgreplica.cleaned.
const CLEANUP_SQL: &str = "
WITH gone AS (
    DELETE FROM pgreplica.log WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM pgreplica.log
         WHERE ev_txid < (SELECT min(txid_snapshot_xmin(snapshot)) FROM pgreplica.slave)
           AND ev_time < now() - make_interval(secs => $3)
           AND NOT EXISTS (SELECT FROM unnest($2::int[]) AS n(slave)
                            WHERE NOT EXISTS (SELECT FROM pgreplica.slave s
                                               WHERE s.set_name = $1 AND s.slave = n.slave))
         LIMIT 100000))
    RETURNING ev_txid, ev_time
), forget AS (
    -- Dropped tables whose last events are gone: their definitions too.
    DELETE FROM pgreplica.tables t
     WHERE NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = t.reloid)
       AND NOT EXISTS (SELECT FROM pgreplica.log l WHERE l.ev_table = t.reloid)
), mark AS (
    INSERT INTO pgreplica.cleaned (below, newest)
    SELECT max(ev_txid) + 1, max(ev_time) FROM gone HAVING count(*) > 0
    ON CONFLICT (one) DO UPDATE SET below = greatest(cleaned.below, EXCLUDED.below),
                                    newest = greatest(cleaned.newest, EXCLUDED.newest)
)
SELECT count(*) FROM gone";

const CLEANED_SQL: &str = "SELECT below FROM pgreplica.cleaned";

/// Events removed from the log by one cleanup at most.
pub const CLEANUP_ROWS: u64 = 100_000;

// A clone's hold: an entry of its own (the slave's number, negated) that keeps
// the log from being cleaned past the copy until the handover.
const HOLD_SQL: &str = "
INSERT INTO pgreplica.slave (set_name, slave, dsn, snapshot, state, seen_at)
VALUES ($1, $2, 'clone in progress', txid_current_snapshot(), 'cloning', now())
ON CONFLICT (set_name, slave) DO NOTHING";

const HOLDS_SQL: &str = "
SELECT -slave, seen_at::text FROM pgreplica.slave WHERE set_name = $1 AND slave < 0 ORDER BY 1";

const UNHOLD_SQL: &str = "DELETE FROM pgreplica.slave WHERE set_name = $1 AND slave = $2";

const STATUS_SQL: &str = "
SELECT s.state, s.applied_at::text, s.seen_at::text, s.events, s.conflicts,
       CASE WHEN s.last_error IS NOT NULL THEN s.error_at::text || ': ' || s.last_error END
  FROM pgreplica.slave s WHERE s.set_name = $1 AND s.slave = $2";

// Per slave of a set: the events it has not applied, and the age of the
// oldest committed one. Slaves at the same position are measured once. Under
// WAL capture the log holds no events: a slave that has not caught up with
// every transaction committed on the master lags by the time since it last
// moved (at least every 10 s while it runs), a bound of its lag.
const LAG_SQL: &str = "
WITH at AS (SELECT DISTINCT snapshot::text AS at FROM pgreplica.slave
             WHERE set_name = $1 AND slave > 0 AND NOT pgreplica.wal()),
     lag AS (
  SELECT at.at,
         (SELECT count(*) FROM pgreplica.log l
           WHERE l.ev_txid >= txid_snapshot_xmin(at.at::txid_snapshot)
             AND NOT txid_visible_in_snapshot(l.ev_txid, at.at::txid_snapshot)) AS events,
         coalesce((SELECT extract(epoch FROM now() - min(l.ev_time))::float8
                     FROM pgreplica.log l
                    WHERE l.ev_txid >= txid_snapshot_xmin(at.at::txid_snapshot)
                      AND NOT txid_visible_in_snapshot(l.ev_txid, at.at::txid_snapshot)
                      AND txid_visible_in_snapshot(l.ev_txid, txid_current_snapshot())), 0)
           AS seconds
    FROM at)
SELECT s.slave, lag.events, lag.seconds
  FROM pgreplica.slave s JOIN lag ON lag.at = s.snapshot::text
 WHERE s.set_name = $1 AND s.slave > 0
UNION ALL
SELECT s.slave, 0::int8,
       CASE WHEN txid_snapshot_xmax(s.snapshot) >= txid_snapshot_xmax(c.now)
             AND NOT EXISTS (SELECT FROM txid_snapshot_xip(s.snapshot) x
                              WHERE txid_visible_in_snapshot(x, c.now))
            THEN 0 ELSE coalesce(extract(epoch FROM now() - s.moved_at), 0) END::float8
  FROM pgreplica.slave s, txid_current_snapshot() AS c(now)
 WHERE s.set_name = $1 AND s.slave > 0 AND pgreplica.wal()";

/// Enters a slave in the registry at `start` if it is not there yet, and
/// returns the position the registry holds for it.
pub async fn enter(
    master: &Client,
    set: &Config,
    slave: u32,
    start: &Snapshot,
) -> Result<Snapshot, Error> {
    let doing = "registering the slave on the master";
    let dsn = redact(&set.slaves[&slave]);
    let sync = set.sync as i32;
    let row = master
        .query_one(
            ENTER_SQL,
            &[&set.name, &(slave as i32), &dsn, &start.to_string(), &sync],
        )
        .await
        .on_master(doing)?;
    let registered: String = row.get(0);
    Snapshot::parse(&registered).ok_or_else(|| Error::Invalid {
        doing: doing.into(),
        message: format!("pgreplica.slave holds an unreadable snapshot '{registered}'"),
    })
}

/// Sets the registry's position of a slave to the slave's own progress.
pub async fn sync(master: &Client, set: &str, slave: u32, at: &Snapshot) -> Result<(), Error> {
    master
        .execute(SYNC_SQL, &[&set, &(slave as i32), &at.to_string()])
        .await
        .on_master("registering the slave on the master")
        .map(|_| ())
}

/// Writes the reports of slaves of `set` (by number) in one statement.
pub async fn report_all(
    master: &Client,
    set: &str,
    reports: &BTreeMap<u32, Report>,
) -> Result<(), Error> {
    let slaves: Vec<i32> = reports.keys().map(|&n| n as i32).collect();
    let at: Vec<Option<String>> = reports
        .values()
        .map(|r| r.at.as_ref().map(Snapshot::to_string))
        .collect();
    let events: Vec<i64> = reports.values().map(|r| r.events as i64).collect();
    let conflicts: Vec<i64> = reports.values().map(|r| r.conflicts as i64).collect();
    let errors: Vec<Option<&str>> = reports.values().map(|r| r.error.as_deref()).collect();
    // Typed: one round trip, where a statement prepared first takes two.
    master
        .execute_typed(
            REPORTS_SQL,
            &[
                (&set, Type::TEXT),
                (&slaves, Type::INT4_ARRAY),
                (&at, Type::TEXT_ARRAY),
                (&events, Type::INT8_ARRAY),
                (&conflicts, Type::INT8_ARRAY),
                (&errors, Type::TEXT_ARRAY),
            ],
        )
        .await
        .on_master("reporting progress to the master")
        .map(|_| ())
}

/// Removes up to [`CLEANUP_ROWS`] events that every registered slave has
/// applied and that are older than `keep` seconds, once every slave of the set
/// (`slaves`) is registered. Returns how many it removed.
pub async fn clean(master: &Client, set: &str, slaves: &[i32], keep: f64) -> Result<u64, Error> {
    let removed: i64 = master
        .query_one(CLEANUP_SQL, &[&set, &slaves, &keep])
        .await
        .on_master("cleaning the master's log")?
        .get(0);
    Ok(removed as u64)
}

/// The transaction below which the log was cleaned, if it ever was.
pub async fn cleaned_below(master: &Client) -> Result<Option<i64>, Error> {
    Ok(master
        .query_opt(CLEANED_SQL, &[])
        .await
        .on_master("reading how far the master's log was cleaned")?
        .map(|r| r.get(0)))
}

/// Keeps the log from being cleaned past this moment for a clone of `slave`
/// (`hold`), or lets it go.
pub async fn hold(master: &Client, set: &str, slave: u32, hold: bool) -> Result<(), Error> {
    let entry = -(slave as i32);
    let result = match hold {
        true => master.execute(HOLD_SQL, &[&set, &entry]).await,
        false => master.execute(UNHOLD_SQL, &[&set, &entry]).await,
    };
    result
        .on_master("holding the master's log for the clone")
        .map(|_| ())
}

/// The clones of `set` that hold the log (slave number, since when).
pub async fn holds(master: &Client, set: &str) -> Result<Vec<(u32, Option<String>)>, Error> {
    Ok(master
        .query(HOLDS_SQL, &[&set])
        .await
        .on_master("reading the clones' holds on the master")?
        .iter()
        .map(|r| (r.get::<_, i32>(0) as u32, r.get(1)))
        .collect())
}

/// A slave's entry: state, last apply, last word, events, conflicts, last error.
pub async fn entry(master: &Client, set: &str, slave: u32) -> Result<Option<Row>, Error> {
    master
        .query_opt(STATUS_SQL, &[&set, &(slave as i32)])
        .await
        .on_master("reading status on the master")
}

// The slaves of a set whose last applied snapshot does not cover `$2` (some
// transaction finished at `$2` is not applied there yet).
const BEHIND_SQL: &str = "
SELECT n.slave FROM unnest($3::int[]) AS n(slave)
  LEFT JOIN pgreplica.slave r ON r.set_name = $1 AND r.slave = n.slave
 WHERE r.snapshot IS NULL
    OR txid_snapshot_xmax(r.snapshot) < txid_snapshot_xmax($2::text::txid_snapshot)
    OR EXISTS (SELECT FROM txid_snapshot_xip(r.snapshot) x
                WHERE x < txid_snapshot_xmax($2::text::txid_snapshot)
                  AND x NOT IN (SELECT txid_snapshot_xip($2::text::txid_snapshot)))
 ORDER BY 1";

/// The slaves (of those numbered) that have not applied everything that had
/// committed at `snapshot`.
pub async fn behind(
    master: &Client,
    set: &str,
    snapshot: &str,
    slaves: &[i32],
) -> Result<Vec<i32>, Error> {
    let rows = master
        .query(BEHIND_SQL, &[&set, &snapshot, &slaves])
        .await
        .on_master("reading the slaves' progress on the master")?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Per registered slave of `set`: the events it has not applied and the age
/// in seconds of the oldest committed one, read on the master in one
/// statement.
pub async fn lags(master: &Client, set: &str) -> Result<BTreeMap<u32, (i64, f64)>, Error> {
    let rows = master
        .query(LAG_SQL, &[&set])
        .await
        .on_master("measuring the slaves' lag on the master")?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, i32>(0) as u32, (r.get(1), r.get(2))))
        .collect())
}

// A slave that was the master before a failover (see pgreplica.failover).
const FAILED_OVER_SQL: &str =
    "SELECT at::text FROM pgreplica.failover WHERE set_name = $1 AND slave = $2";

/// The master's identity (`pgreplica.node()`), which each slave's progress
/// names.
pub async fn node(master: &impl GenericClient) -> Result<String, Error> {
    let doing = "reading the master's identity (pgreplica.node())";
    match master.query_one("SELECT pgreplica.node()", &[]).await {
        Ok(row) => Ok(row.get(0)),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_FUNCTION) => {
            Err(Error::Invalid {
                doing: doing.into(),
                message: "pgreplica on the master is older than this binary: run pgreplica \
                          install on the master (it upgrades in place and keeps the log)"
                    .into(),
            })
        }
        Err(e) => Err(e).on_master(doing),
    }
}

/// Where a registered slave resumes, and the master's identity.
#[derive(Debug, Clone)]
pub struct Registered {
    /// The end of the last batch it applied whole (or where it starts).
    pub at: Snapshot,
    /// The master's node, which its progress must name.
    pub master: String,
}

/// Registers the slave on the master and returns where it resumes. The slave's
/// own progress row is the truth; the master's copy only protects the log from
/// being cleaned past this slave. A slave whose progress is of another master
/// is refused.
pub async fn register(
    master: &Client,
    slave_client: &Client,
    set: &Config,
    slave: u32,
) -> Result<Registered, Error> {
    let node = node(master).await?;
    let failed_over = master
        .query_opt(FAILED_OVER_SQL, &[&set.name, &(slave as i32)])
        .await
        .on_master("reading the master's failovers")?;
    if let Some(row) = failed_over {
        return Err(Error::Invalid {
            doing: "resuming the slave".into(),
            message: format!(
                "it was the master until the failover of {}: it may hold changes this master \
                 never got, and nothing is applied to it until pgreplica failback {} --slave \
                 {slave} has made it a copy of this master",
                row.get::<_, String>(0),
                set.path.display()
            ),
        });
    }
    let progress = slave::read_progress(slave_client, &set.name).await?;
    if let Some(progress) = &progress {
        progress.check_master(&set.name, &node)?;
    }
    let progress = progress.map(|p| p.snapshot);
    let start = progress.clone().unwrap_or_else(Snapshot::start);
    let registered = enter(master, set, slave, &start).await?;
    // A slave of a set captured from the WAL resumes from its WAL position,
    // which its slot guards: its snapshot only keeps the registry's place, and
    // may name as running a transaction that its position covers.
    let trigger = set.capture == Capture::Trigger;
    let at = match progress {
        Some(progress) => {
            if trigger
                && let Some(below) = cleaned_below(master).await?
                && progress.xmin < below
            {
                return Err(Error::Invalid {
                    doing: "resuming the slave".into(),
                    message: format!(
                        "its progress ({progress}) is older than what the master's log was \
                         cleaned to (transaction {below}): it was restored from a backup, or lost \
                         its last commits, and the changes in between are gone. Nothing is \
                         applied; copy it again with pgreplica clone {} --slave {slave} --truncate",
                        set.path.display()
                    ),
                });
            }
            sync(master, &set.name, slave, &progress).await?;
            progress
        }
        None => registered,
    };
    Ok(Registered { at, master: node })
}
