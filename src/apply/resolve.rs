//! Conflicts while applying: a change checked against the slave's row and
//! settled by the set's policy, and the rows set-based runs found changed.

use super::sql::{as_text, refs};
use super::{Applier, CAPTURES_SQL, NOTES, Plan, SetRun, malformed};
use crate::config::Policy;
use crate::conflict::{Conflict, Kind, Resolver, Version, Winner};
use crate::error::{Context, Error};
use crate::event::{Event, MasterTable, Op};
use crate::ident::quote_ident;
use crate::record::{self, Fields};
use crate::slave;
use std::sync::Arc;
use tokio_postgres::{Row, Transaction};

const LOGGED_COLUMNS_SQL: &str = "SELECT pgreplica.logged_columns($1::text::regclass)";

/// The slave's logged changes of a table whose row text holds `$2`, newest
/// first, where a conflict looks for its row's last change.
const OWN_CHANGES_SQL: &str = "
SELECT extract(epoch FROM ev_time)::float8, ev_origin, coalesce(ev_new, ev_old)
  FROM pgreplica.log
 WHERE ev_table = $1::text::regclass::oid AND ev_op IN ('I', 'U', 'D')
   AND strpos(coalesce(ev_new, ev_old), $2) > 0
 ORDER BY ev_id DESC";

/// Rows of OWN_CHANGES_SQL read at a time.
const OWN_CHANGES_ROWS: i32 = 1_000;

/// For a table the slave logs: a time every change of it that its log no
/// longer holds precedes (the newest change cleaned from the log, or the
/// table's attachment to capture). Under WAL capture the log holds only the
/// deletes, since they are kept (infinity: they are not).
const FORGOTTEN_SQL: &str = "
SELECT extract(epoch FROM greatest((SELECT newest FROM pgreplica.cleaned),
           CASE WHEN NOT pgreplica.wal() THEN t.attached_at
                ELSE coalesce(t.deletes_kept_since, 'infinity') END))::float8
  FROM pgreplica.tables t WHERE t.reloid = $1::text::regclass";

const WAL_SQL: &str = "SELECT pgreplica.wal()";

/// Under WAL capture, when and on which node the slave's row with `xmin` $1
/// last changed: its transaction's commit time (`track_commit_timestamp`; the
/// start of this one when the batch wrote it), and the node that the
/// transaction's origin markers name, when they name one (none: this node).
/// Last, whether commit times are kept.
const ROW_VERSION_SQL: &str = "
WITH x AS (
    SELECT m.xmax - ((m.xmax - $1::text::bigint) % 4294967296 + 4294967296) % 4294967296 AS xid,
           txid_current_if_assigned() AS mine,
           current_setting('track_commit_timestamp')::bool AS timed
      FROM (SELECT txid_snapshot_xmax(txid_current_snapshot()) AS xmax) m
)
SELECT CASE WHEN x.xid = x.mine THEN extract(epoch FROM now())::float8
            WHEN x.timed THEN extract(epoch FROM pg_xact_commit_timestamp($1::text::xid))::float8
        END,
       CASE WHEN x.xid = x.mine THEN pgreplica.origin()
            ELSE (SELECT CASE WHEN count(DISTINCT l.ev_origin) = 1 THEN min(l.ev_origin) END
                    FROM pgreplica.log l WHERE l.ev_op = 'O' AND l.ev_txid = x.xid)
        END,
       x.timed
  FROM x";

/// Why `newest` could not judge, by what the slave lacked.
const OLDER_THAN_LOG: &str = "CONFLICT=newest cannot tell which change is the newer: the \
                              slave's own change of the row is older than its log";
const NO_COMMIT_TIMES: &str = "CONFLICT=newest cannot tell which change is the newer: the \
                               slave captures from the WAL and keeps no commit times \
                               (ALTER SYSTEM SET track_commit_timestamp = on; then restart it)";
const NO_DELETES: &str = "CONFLICT=newest cannot tell which change is the newer: the slave \
                          captures from the WAL and keeps no record of its deletes (give the \
                          set it is the master of CONFLICT=newest, and run pgreplica install \
                          with it)";

impl Applier<'_> {
    /// Settles a change under the set's conflict policy before it is applied:
    /// reads (and locks) the slave's row, and returns the event to apply: the
    /// master's as it is, one rewritten so that the master's version wins over
    /// the slave's row, or none when the slave's row stays.
    pub(super) async fn resolve(
        &mut self,
        resolver: &Resolver,
        plan: &Arc<Plan>,
        event: Event,
    ) -> Result<Option<Event>, Error> {
        let (Some(row), Some(remote)) = (
            if event.op == Op::Insert {
                &event.new
            } else {
                &event.old
            },
            if event.op == Op::Delete {
                &event.old
            } else {
                &event.new
            },
        ) else {
            return Err(malformed(&event, "a change without its rows"));
        };
        self.flush().await?;
        let master = &plan.master;
        let (local, xmin) = Self::local_row(self.tx, plan, row).await?.unzip();
        // An update is compared on the columns it changes, a delete on all.
        let compared: Vec<usize> = (0..row.len())
            .filter(|&i| !plan.generated[i] && (event.op == Op::Delete || row[i] != remote[i]))
            .collect();
        let differs = |l: &Fields| compared.iter().any(|&i| l[i] != row[i]);
        let kind = match (event.op, &local) {
            (Op::Insert, Some(_)) => Kind::InsertExisting,
            (Op::Update, None) => Kind::UpdateMissing,
            (Op::Delete, None) => Kind::DeleteMissing,
            (Op::Update, Some(l)) if differs(l) => Kind::UpdateChanged,
            (Op::Delete, Some(l)) if differs(l) => Kind::DeleteChanged,
            _ => return Ok(Some(event)),
        };
        let all: Vec<usize> = (0..master.columns.len()).collect();
        let conflict = Conflict {
            set: resolver.set.clone(),
            table: plan.slave.clone(),
            key: master.key_text(row),
            kind,
            event: event.id,
            origin: event.origin.clone(),
            local: local.as_ref().map(|l| columns_text(master, l, &all)),
            remote: Some(columns_text(master, remote, &all)),
        };
        let policy = resolver.policy(&master.name);
        let (local_version, unknown) = match policy.reads_history() {
            true => Self::local_version(self.tx, plan, row, xmin).await?,
            false => (Version::unknown(), OLDER_THAN_LOG),
        };
        let remote_version = Version {
            time: event.time,
            node: event.origin.clone(),
            before: None,
        };
        let (winner, by) = match resolver.decide(policy, &local_version, &remote_version) {
            Some(winner) => (winner, format!("{policy:?}").to_lowercase()),
            None => {
                let why = match policy {
                    Policy::Newest => unknown,
                    _ => "CONFLICT=stop",
                };
                (
                    Self::by_hand(self.tx, &conflict, why).await?,
                    "hand".to_string(),
                )
            }
        };
        slave::record_conflict(self.tx, &conflict, Some((winner, &by))).await?;
        let note = format!("{conflict}; resolved: {} ({by})", winner.name());
        tracing::warn!("{note}");
        self.counts.conflicts += 1;
        if self.counts.notes.len() < NOTES {
            self.counts.notes.push(note);
        }
        Ok(match (winner, kind) {
            (Winner::Local, _) | (_, Kind::DeleteMissing) => None,
            (Winner::Remote, Kind::UpdateMissing) => Some(Event {
                op: Op::Insert,
                old: None,
                ..event
            }),
            (Winner::Remote, Kind::InsertExisting) => Some(Event {
                op: Op::Update,
                old: local,
                ..event
            }),
            (Winner::Remote, _) => Some(Event {
                old: local,
                ..event
            }),
        })
    }

    /// The slave's row with `row`'s key, locked, as text in the master's
    /// columns, and its `xmin`.
    async fn local_row(
        tx: &Transaction<'_>,
        plan: &Plan,
        row: &Fields,
    ) -> Result<Option<(Fields, String)>, Error> {
        let master = &plan.master;
        let list: Vec<String> = master
            .columns
            .iter()
            .map(|c| as_text(&quote_ident(c)))
            .collect();
        let keys: Vec<String> = master
            .key
            .iter()
            .map(|&k| quote_ident(&master.columns[k]))
            .collect();
        let params: Vec<String> = master
            .key
            .iter()
            .enumerate()
            .map(|(n, &k)| format!("${}::text::{}", n + 1, plan.types[k]))
            .collect();
        let sql = format!(
            "SELECT {}, xmin::text FROM {} WHERE ({}) = ({}) FOR UPDATE",
            list.join(", "),
            plan.slave,
            keys.join(", "),
            params.join(", ")
        );
        let values: Vec<Option<String>> = master.key.iter().map(|&k| row[k].clone()).collect();
        let found = tx.query_opt(&sql, &refs(&values)).await.on_slave(&format!(
            "reading the slave's row of a conflict in {}",
            plan.slave
        ))?;
        let width = master.columns.len();
        Ok(found.map(|r| ((0..width).map(|i| r.get(i)).collect(), r.get(width))))
    }

    /// When and on which node the slave's row last changed (multi-master),
    /// and why `newest` cannot judge when that is not known well enough. From
    /// the slave's own log, its latest event for the key; when the log no
    /// longer holds one, a time the change precedes. Under WAL capture the
    /// slave's row (its `xmin`) tells; a row it no longer has, the deletes
    /// its log keeps.
    async fn local_version(
        tx: &Transaction<'_>,
        plan: &Plan,
        row: &Fields,
        xmin: Option<String>,
    ) -> Result<(Version, &'static str), Error> {
        let doing = "reading the slave's log for a conflict";
        let captures: bool = tx
            .query_one(CAPTURES_SQL, &[])
            .await
            .on_slave(doing)?
            .get(0);
        if !captures {
            return Ok((Version::unknown(), OLDER_THAN_LOG));
        }
        let wal: bool = tx.query_one(WAL_SQL, &[]).await.on_slave(doing)?.get(0);
        if let (true, Some(xmin)) = (wal, xmin) {
            let r = tx
                .query_one(ROW_VERSION_SQL, &[&xmin])
                .await
                .on_slave(doing)?;
            let timed: bool = r.get(2);
            let version = Version {
                time: r.get(0),
                node: r.get(1),
                before: (!timed).then_some(f64::INFINITY),
            };
            return Ok((version, NO_COMMIT_TIMES));
        }
        let name = plan.slave.quoted();
        let logged: Vec<String> = tx
            .query_one(LOGGED_COLUMNS_SQL, &[&name])
            .await
            .on_slave(doing)?
            .get(0);
        // The key's positions in the rows the slave logs, matched by name.
        let master = &plan.master;
        let Some(key): Option<Vec<(usize, &Option<String>)>> = master
            .key
            .iter()
            .map(|&k| {
                Some((
                    logged.iter().position(|c| *c == master.columns[k])?,
                    &row[k],
                ))
            })
            .collect()
        else {
            return Ok((Version::unknown(), OLDER_THAN_LOG));
        };
        // The server keeps only rows whose text holds a key value; a value
        // with a quote or backslash is escaped in row text, so it can't be used.
        let hint = key
            .iter()
            .filter_map(|(_, v)| v.as_deref())
            .filter(|v| !v.contains(['"', '\\']))
            .max_by_key(|v| v.len())
            .unwrap_or("");
        let statement = tx.prepare(OWN_CHANGES_SQL).await.on_slave(doing)?;
        let portal = tx.bind(&statement, &[&name, &hint]).await.on_slave(doing)?;
        loop {
            let rows = tx
                .query_portal(&portal, OWN_CHANGES_ROWS)
                .await
                .on_slave(doing)?;
            for r in &rows {
                let text: Option<String> = r.get(2);
                let Some(fields) = text.and_then(|t| record::parse(&t).ok()) else {
                    continue;
                };
                if fields.len() == logged.len() && key.iter().all(|(at, v)| fields[*at] == **v) {
                    let version = Version {
                        time: r.get(0),
                        node: r.get(1),
                        before: None,
                    };
                    return Ok((version, OLDER_THAN_LOG));
                }
            }
            if rows.len() < OWN_CHANGES_ROWS as usize {
                break;
            }
        }
        let before: Option<f64> = tx
            .query_opt(FORGOTTEN_SQL, &[&name])
            .await
            .on_slave(doing)?
            .and_then(|r| r.get(0));
        let why = match before {
            Some(b) if b.is_infinite() => NO_DELETES,
            _ => OLDER_THAN_LOG,
        };
        let version = Version {
            before,
            ..Version::unknown()
        };
        Ok((version, why))
    }

    /// The DBA's resolution of a conflict under policy `stop`, or the error
    /// that stops the slave until there is one.
    async fn by_hand(
        tx: &Transaction<'_>,
        conflict: &Conflict,
        why: &'static str,
    ) -> Result<Winner, Error> {
        slave::resolution(tx, conflict)
            .await?
            .ok_or_else(|| Error::Conflict(Box::new(conflict.clone()), why))
    }
}

/// Logs a conflict when the slave's row (`local`: position, then the compared
/// columns' values before the change) was missing or differed from the master's
/// old row. Returns its description.
pub(super) fn check_conflict(run: &SetRun, event: &Event, local: Option<&Row>) -> Option<String> {
    let master = &run.plan.master;
    let old = event.old.as_ref()?;
    let key = master.key_text(old);
    let what = if run.op == Op::Update {
        "update"
    } else {
        "delete"
    };
    let remote_old = columns_text(master, old, &run.compared);
    let remote_new = event
        .new
        .as_ref()
        .map(|n| columns_text(master, n, &run.compared))
        .unwrap_or_default();
    let table = &run.plan.slave;
    let Some(row) = local else {
        tracing::warn!(
            table = %table, key = %key, event = event.id, remote_old = %remote_old,
            remote_new = %remote_new,
            "conflict: {what} of a row that is missing on the slave; nothing to apply"
        );
        return Some(format!(
            "{what} of a row missing on the slave, nothing applied: table {table}, key {key}, \
             event {}, master before: {remote_old}, master after: {remote_new}",
            event.id
        ));
    };
    let local: Fields = (1..=run.compared.len()).map(|n| row.get(n)).collect();
    let expected: Fields = run.compared.iter().map(|&i| old[i].clone()).collect();
    if local == expected {
        return None;
    }
    let local_text = run
        .compared
        .iter()
        .zip(&local)
        .map(|(&i, v)| format!("{}={}", master.columns[i], v.as_deref().unwrap_or("NULL")))
        .collect::<Vec<_>>()
        .join(", ");
    tracing::warn!(
        table = %run.plan.slave, key = %key, event = event.id, local = %local_text,
        remote_old = %remote_old, remote_new = %remote_new,
        "conflict: {what} of a row that had changed on the slave; the master's change was applied"
    );
    Some(format!(
        "{what} of a row changed on the slave, the master's change applied: table {table}, \
         key {key}, event {}, slave had: {local_text}, master before: {remote_old}, \
         master after: {remote_new}",
        event.id
    ))
}

fn columns_text(master: &MasterTable, row: &Fields, columns: &[usize]) -> String {
    columns
        .iter()
        .map(|&i| {
            format!(
                "{}={}",
                master.columns[i],
                row[i].as_deref().unwrap_or("NULL")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
