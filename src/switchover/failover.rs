//! `failover`: the master is gone and a slave takes over; `failback`: the old
//! master, back, becomes a slave of the new one again, with a report of what
//! it had that the new master never got.

use super::{
    Options, drain, install_on, let_go, position, read_only, refuse_asymmetric, reread,
    start_slaves,
};
use crate::config::{Capture, Config, roles};
use crate::error::{Context, Error};
use crate::{check, db, slave, wal};
use std::time::Duration;
use tokio_postgres::Client;

/// How long failover tries the master before it counts it gone.
const MASTER_GONE: Duration = Duration::from_secs(5);

const RECORD_SQL: &str = "
INSERT INTO pgreplica.failover (set_name, slave, old_node, snapshot, lsn, applied_at)
VALUES ($1, $2, $3, $4, $5::text::pg_lsn,
        (SELECT applied_at FROM pgreplica.progress WHERE set_name = $1))
ON CONFLICT (set_name, slave) DO UPDATE
   SET old_node = EXCLUDED.old_node, snapshot = EXCLUDED.snapshot, lsn = EXCLUDED.lsn,
       applied_at = EXCLUDED.applied_at, at = now()";

const RECORDED_SQL: &str = "
SELECT snapshot, lsn::text, coalesce(applied_at::text, 'never'), at::text
  FROM pgreplica.failover WHERE set_name = $1 AND slave = $2";

// The old master's log past the position the new master had applied
// (trigger capture): what it never got, per table.
const LOST_LOG_SQL: &str = "
SELECT coalesce(to_regclass(ev_table::oid::text)::text, 'table ' || ev_table), count(*),
       min(ev_time)::text, max(ev_time)::text
  FROM pgreplica.log
 WHERE ev_txid >= txid_snapshot_xmin($1::text::txid_snapshot)
   AND NOT txid_visible_in_snapshot(ev_txid, $1::text::txid_snapshot)
 GROUP BY 1 ORDER BY 1";

// The same from the old master's slot of the new master (WAL capture): the
// changes (D, I, T, U messages) of the transactions that commit at or past
// the position, with their commit times; a change belongs to the B message
// before it.
const LOST_WAL_SQL: &str = "
WITH m AS (SELECT n, data, sum((get_byte(data, 0) = 66)::int) OVER (ORDER BY n) AS txn
             FROM pg_logical_slot_peek_binary_changes(
                    $1, NULL, NULL, 'proto_version', '1', 'publication_names', 'pgreplica')
                  WITH ORDINALITY AS c(lsn, xid, data, n)),
     b AS (SELECT txn, ('x' || encode(substr(data, 2, 8), 'hex'))::bit(64)::bigint AS commit_lsn,
                  timestamptz '2000-01-01 UTC'
                    + ('x' || encode(substr(data, 10, 8), 'hex'))::bit(64)::bigint
                      * interval '1 microsecond' AS at
             FROM m WHERE get_byte(data, 0) = 66)
SELECT 'all tables', count(*), min(b.at)::text, max(b.at)::text
  FROM m JOIN b USING (txn)
 WHERE get_byte(m.data, 0) IN (68, 73, 84, 85)
   AND b.commit_lsn >= $2::text::pg_lsn - '0/0'::pg_lsn
HAVING count(*) > 0";

/// What the old master had that the new master never got: changes per table
/// (all tables in one line under WAL capture), with their time range.
#[derive(Debug, Default)]
pub struct Lost {
    /// Table, changes, first and last change time.
    pub tables: Vec<(String, i64, String, String)>,
    /// The query that lists them on the old master.
    pub read_with: String,
}

/// What failback did.
#[derive(Debug)]
pub struct Failback {
    /// What the old master had that the new one never got.
    pub lost: Lost,
    /// Differences left after the repair (0: the old master is a copy).
    pub left: usize,
}

/// The set `set` with slave `slave` only.
fn only(set: &Config, slave: u32) -> Config {
    let mut only = set.clone();
    only.slaves.retain(|n, _| *n == slave);
    only
}

/// Makes slave `slave` the master of `set` when the master is gone (refused
/// while it answers, unless `force`): installs capture there, records how far
/// it had applied the old master, starts the other slaves at its position,
/// and allows writes. The old master stays in the returned file as slave
/// `slave`, which the daemon leaves alone until `failback`. Returns the
/// set's file with the roles swapped.
pub async fn failover(set: &Config, slave: u32, force: bool) -> Result<String, Error> {
    let doing = "failing over";
    refuse_asymmetric(set, doing)?;
    set.chosen_slaves(Some(slave))?;
    let (text, reversed) = reread(set, doing, |t| roles::swap_master(t, slave))?;
    let answers = tokio::time::timeout(MASTER_GONE, db::connect(&set.master, set.keepalive)).await;
    if matches!(answers, Ok(Ok(_))) && !force {
        return Err(Error::Invalid {
            doing: doing.into(),
            message: "the master answers: pgreplica switchover hands it over with nothing lost \
                      (--force fails over all the same: keep the old master from taking writes \
                      first)"
                .into(),
        });
    }
    let mut new_master = db::connect(&set.slaves[&slave], set.keepalive).await?;
    if set.capture == Capture::Wal {
        wal::check_ready(&new_master, &reversed).await?;
    }
    let had = slave::read_progress(&new_master, &set.name)
        .await?
        .ok_or_else(|| Error::Invalid {
            doing: doing.into(),
            message: format!("slave {slave} has applied nothing of set {}", set.name),
        })?;
    let others = only_others(&reversed, slave);
    let position = install_on(&mut new_master, &others, &[], had.master.as_deref()).await?;
    let lsn = had.wal.map(|w| w.at.to_string());
    new_master
        .execute(
            RECORD_SQL,
            &[
                &set.name,
                &(slave as i32),
                &had.master,
                &had.snapshot.to_string(),
                &lsn,
            ],
        )
        .await
        .on_master("recording the failover on the new master")?;
    tracing::info!(
        "new master: had applied the old master up to {}; slave {slave} (the old master) waits \
         for pgreplica failback",
        had.snapshot
    );
    let mut unreached = Vec::new();
    for &n in others.slaves.keys() {
        if let Err(e) = start_slaves(&new_master, &only(&others, n), &position, None).await {
            tracing::warn!("slave {n}: {e}");
            unreached.push(n);
        }
    }
    slave::disown(&new_master, &set.name, &position.node).await?;
    read_only(&new_master, false).await?;
    tracing::info!("new master: writes allowed");
    if !others.slaves.is_empty() {
        tracing::warn!(
            "the other slaves followed the old master on their own and may differ from the new \
             one by the changes in flight: run pgreplica check {} --repair once the file is in \
             place{}",
            set.path.display(),
            match unreached.is_empty() {
                true => String::new(),
                false => format!("; slave(s) {unreached:?} could not be reached: clone them"),
            }
        );
    }
    Ok(text)
}

/// `set` without slave `slave`.
fn only_others(set: &Config, slave: u32) -> Config {
    let mut others = set.clone();
    others.slaves.remove(&slave);
    others
}

/// Rejoins slave `slave` of `set`, the master before a failover to `set`'s
/// master, as its slave: reports what it had that the new master never got,
/// keeps applications from writing there, drops its hold on its own log,
/// starts it at the new master's position and repairs the rows that differ
/// (`check --repair`). The daemon takes it up once this returns.
pub async fn failback(set: &Config, slave: u32) -> Result<Failback, Error> {
    let doing = "failing back";
    set.chosen_slaves(Some(slave))?;
    let mut master = db::connect(&set.master, set.keepalive).await?;
    let record = master
        .query_opt(RECORDED_SQL, &[&set.name, &(slave as i32)])
        .await
        .on_master(doing)?
        .ok_or_else(|| Error::Invalid {
            doing: doing.into(),
            message: format!(
                "the master records no failover from slave {slave} of set {}",
                set.name
            ),
        })?;
    let (snapshot, lsn): (String, Option<String>) = (record.get(0), record.get(1));
    tracing::info!(
        "failover of {}: the new master had applied the old one up to {snapshot} (its last \
         batch at {})",
        record.get::<_, String>(3),
        record.get::<_, String>(2)
    );
    let old = db::connect(&set.slaves[&slave], set.keepalive).await?;
    let lost = lost(&old, set, slave, &snapshot, lsn.as_deref()).await?;
    read_only(&old, true).await?;
    let end_all = Options {
        slave,
        timeout: Duration::ZERO,
        force: true,
    };
    drain(&old, &end_all).await?;
    tracing::info!("old master: read-only for applications, their sessions ended");
    let_go(&old, set).await?;
    let alone = only(set, slave);
    if set.capture == Capture::Wal {
        wal::make_slots(&master, &alone).await?;
    }
    let at = position(&mut master).await?;
    start_slaves(&master, &alone, &at, None).await?;
    if set.capture == Capture::Wal {
        wal::advance(&master, set, slave, at.lsn).await?;
    }
    let left = check::check(&alone, &[], check::Mode::Repair).await?;
    master
        .execute(
            "DELETE FROM pgreplica.failover WHERE set_name = $1 AND slave = $2",
            &[&set.name, &(slave as i32)],
        )
        .await
        .on_master(doing)?;
    Ok(Failback { lost, left })
}

/// What the old master `old` had past the position the new master had
/// applied.
async fn lost(
    old: &Client,
    set: &Config,
    slave: u32,
    snapshot: &str,
    lsn: Option<&str>,
) -> Result<Lost, Error> {
    let doing = "reading what the old master had that the new one never got";
    let (rows, read_with) = match (set.capture, lsn) {
        (Capture::Wal, Some(lsn)) => {
            let slot = wal::slot_name(&set.name, slave);
            let rows = old
                .query(LOST_WAL_SQL, &[&slot, &lsn])
                .await
                .on_slave(doing)?;
            let read_with = format!(
                "SELECT * FROM pg_logical_slot_peek_binary_changes('{slot}', NULL, NULL, \
                 'proto_version', '1', 'publication_names', 'pgreplica') -- commits from {lsn} on"
            );
            (rows, read_with)
        }
        _ => {
            let rows = old
                .query(LOST_LOG_SQL, &[&snapshot])
                .await
                .on_slave(doing)?;
            let read_with = format!(
                "SELECT * FROM pgreplica.log WHERE ev_txid >= txid_snapshot_xmin('{snapshot}') \
                 AND NOT txid_visible_in_snapshot(ev_txid, '{snapshot}') ORDER BY ev_id"
            );
            (rows, read_with)
        }
    };
    let tables = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    Ok(Lost { tables, read_with })
}
