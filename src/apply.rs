//! Applying a batch on a slave: statements from the slave's catalog, conflicts, progress.
//!
//! Columns are matched by name. Runs of inserts into one table go through COPY.
//! Runs of updates (of the same columns) or deletes of one table go out as one
//! set-based statement over arrays of keys and values, as long as no key repeats
//! within the run; these statements are kept in flight many at a time
//! (pipelining), each sent in event order on the one connection, so the slave
//! executes them in exactly the log's order. The batch's events and the slave's
//! progress row commit in one transaction: a crash anywhere loses nothing and
//! applies nothing twice.

use crate::batch::{Event, MasterTable, Op, Snapshot};
use crate::conflict::{
    Conflict, Kind, Policy, RECORD_SQL, RESOLVED_SQL, Resolver, Version, Winner,
};
use crate::db::pg_message;
use crate::error::{Context, Error};
use crate::ident::{TableName, quote_ident};
use crate::record::{self, Fields};
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, TryStreamExt};
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use tokio_postgres::types::ToSql;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, CopyInSink, GenericClient, Row, Statement, Transaction};

/// Session settings under which a value's text form is the same as the capture
/// trigger's, so that texts read back from the slave compare equal.
pub const SESSION_SQL: &str = "SET datestyle = 'ISO, YMD'; SET intervalstyle = 'postgres';
SET extra_float_digits = 3; SET timezone = 'UTC'; SET bytea_output = 'hex'";

const PROGRESS_SETUP_SQL: &str = "CREATE SCHEMA IF NOT EXISTS pgreplica;
CREATE TABLE IF NOT EXISTS pgreplica.progress (
    set_name   text PRIMARY KEY,
    snapshot   text NOT NULL,
    applied_at timestamptz NOT NULL,
    events     bigint NOT NULL
)";

const PROGRESS_READ_SQL: &str = "SELECT snapshot FROM pgreplica.progress WHERE set_name = $1";

// Tables that `clone` is copying or has copied but not yet handed over: their
// events are the clone's business, not the batches'.
const CLONING_SETUP_SQL: &str = "
CREATE TABLE IF NOT EXISTS pgreplica.cloning (
    set_name  text NOT NULL,
    tbl       text NOT NULL,   -- the master's table, quoted schema.name
    snapshot  text,            -- master snapshot the copy reflects; NULL until copied
    copied_at timestamptz,
    deferred  text,            -- foreign keys of a created table, added at the handover
    PRIMARY KEY (set_name, tbl)
);
-- Keys and indexes of a created table, built once its rows are in (kept here
-- for a table copied in parts, in case the clone is interrupted).
ALTER TABLE pgreplica.cloning ADD COLUMN IF NOT EXISTS after_rows text";

const CLONING_READ_SQL: &str = "SELECT tbl FROM pgreplica.cloning WHERE set_name = $1";

// Serializes everything that moves a set's progress on a slave: the daemon's
// batches and the clone's handover.
const LOCK_SQL: &str = "SELECT pg_advisory_xact_lock(hashtext('pgreplica'), hashtext($1))";

const PROGRESS_WRITE_SQL: &str = "
INSERT INTO pgreplica.progress (set_name, snapshot, applied_at, events) VALUES ($1, $2, now(), $3)
ON CONFLICT (set_name) DO UPDATE
   SET snapshot = EXCLUDED.snapshot, applied_at = now(), events = progress.events + EXCLUDED.events";

const SLAVE_TABLE_SQL: &str = "
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attgenerated <> ''
  FROM pg_attribute a
 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped";

const CAPTURES_SQL: &str = "SELECT to_regprocedure('pgreplica.execute(text)') IS NOT NULL";

const LOGGED_COLUMNS_SQL: &str = "SELECT pgreplica.logged_columns($1::text::regclass)";

/// The slave's latest logged changes of a table, newest first, where a
/// conflict looks for its row's last change.
const RECENT: i64 = 10_000;
const RECENT_SQL: &str = "
SELECT extract(epoch FROM ev_time)::float8, ev_origin, coalesce(ev_new, ev_old)
  FROM pgreplica.log
 WHERE ev_table = $1::text::regclass::oid AND ev_op IN ('I', 'U', 'D')
 ORDER BY ev_id DESC LIMIT $2";

const ORIGIN_SQL: &str = "SELECT set_config('pgreplica.origin', $1, true)";

/// Statements, and events in them, kept in flight before the oldest is awaited.
const WINDOW: usize = 256;
const WINDOW_EVENTS: usize = 4 * RUN_ROWS;
/// Rows or bytes after which a run (COPY or set-based statement) is sent.
const RUN_ROWS: usize = 5000;
const RUN_BYTES: usize = 1 << 20;
/// Bytes of COPY data sent at a time while a COPY streams.
const COPY_CHUNK: usize = 64 << 10;

/// Prepares a slave connection: session settings and the progress table.
pub async fn prepare_slave(client: &Client) -> Result<(), Error> {
    client
        .batch_execute(SESSION_SQL)
        .await
        .doing("setting up the slave session")?;
    client
        .batch_execute(&format!(
            "{PROGRESS_SETUP_SQL}; {CLONING_SETUP_SQL}; {}",
            crate::conflict::SETUP_SQL
        ))
        .await
        .doing(
            "creating pgreplica.progress on the slave (the slave's role needs CREATE on the database)",
        )
}

/// Locks `set`'s progress on the slave for the rest of `tx` and reads it, with
/// the tables being cloned (quoted master names), whose events batches skip.
pub async fn lock_set(
    tx: &Transaction<'_>,
    set: &str,
) -> Result<(Option<Snapshot>, HashSet<String>), Error> {
    tx.execute(LOCK_SQL, &[&set])
        .await
        .doing("locking the set's progress on the slave")?;
    let progress = read_progress(tx, set).await?;
    let cloning = tx
        .query(CLONING_READ_SQL, &[&set])
        .await
        .doing("reading the tables being cloned")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok((progress, cloning))
}

/// The snapshot the slave has applied up to for `set`, if it has started.
pub async fn read_progress(
    client: &impl GenericClient,
    set: &str,
) -> Result<Option<Snapshot>, Error> {
    let doing = "reading the slave's progress";
    let row = client
        .query_opt(PROGRESS_READ_SQL, &[&set])
        .await
        .doing(doing)?;
    row.map(|r| {
        let text: String = r.get(0);
        Snapshot::parse(&text).ok_or_else(|| Error::Query {
            doing: doing.into(),
            message: format!("pgreplica.progress holds an unreadable snapshot '{text}'"),
        })
    })
    .transpose()
}

/// Prepared statements of one slave connection, by SQL text.
#[derive(Default)]
pub struct Statements(HashMap<String, Statement>);

/// How a master table lands on the slave: the slave's type for each master column.
struct Plan {
    master: Arc<MasterTable>,
    slave: TableName,
    /// Slave type of each master column, in master column order.
    types: Vec<String>,
    /// Master columns the slave computes itself (generated), never written.
    generated: Vec<bool>,
}

type RowsFuture<'t> =
    Pin<Box<dyn Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send + 't>>;

/// A set-based statement sent to the slave whose result is not read yet.
struct Pending<'t> {
    future: RowsFuture<'t>,
    ready: Option<Result<Vec<Row>, tokio_postgres::Error>>,
    run: SetRun,
}

/// Updates of the same columns, or deletes, of one table, waiting to go out as
/// one statement. No key appears twice, so the statement's effect is the
/// events' effect in log order.
struct SetRun {
    plan: Arc<Plan>,
    op: Op,
    /// Master columns the updates set, or all of them for deletes: the slave's
    /// values of these come back to be compared with the master's old row.
    compared: Vec<usize>,
    events: Vec<Event>,
    /// Keys (old and new) the run touches.
    keys: HashSet<String>,
    bytes: usize,
}

/// Inserts into one table, streaming to the slave through one COPY.
struct CopyRun {
    plan: Arc<Plan>,
    sink: Pin<Box<CopyInSink<Bytes>>>,
    /// Rows not sent yet.
    data: BytesMut,
    rows: usize,
    /// The first event's id.
    first: i64,
    /// In exact mode, event id and key of each line, to name the row of an error.
    lines: Vec<(i64, String)>,
}

/// Counts of one applied batch.
#[derive(Debug, Default, Clone)]
pub struct Applied {
    /// Events applied.
    pub events: u64,
    /// Conflicts detected (and logged).
    pub conflicts: u64,
    /// The first conflicts described, for the warning mail.
    pub notes: Vec<String>,
}

/// Conflicts described in full per batch; the rest are counted.
const NOTES: usize = 20;

/// Applies one batch's events inside a slave transaction.
pub struct Applier<'t> {
    tx: &'t Transaction<'t>,
    statements: &'t mut Statements,
    /// By master table definition (its address: each plan holds its definition alive).
    plans: HashMap<usize, Arc<Plan>>,
    pending: VecDeque<Pending<'t>>,
    pending_events: usize,
    copy: Option<CopyRun>,
    run: Option<SetRun>,
    /// One event per statement and COPYs with their lines kept, so that an
    /// error names its event.
    exact: bool,
    counts: Applied,
    /// The origin the slave's capture now stamps on changes.
    origin: Option<String>,
    /// The set's conflict policies, when it has some.
    resolver: Option<&'t Resolver>,
}

impl<'t> Applier<'t> {
    /// Starts applying in `tx`, reusing the connection's prepared statements.
    /// With `exact`, updates and deletes go one per statement, so that an error
    /// names its event (see [`Error::ApplyRun`]).
    pub fn new(
        tx: &'t Transaction<'t>,
        statements: &'t mut Statements,
        exact: bool,
        resolver: Option<&'t Resolver>,
    ) -> Applier<'t> {
        Applier {
            tx,
            statements,
            plans: HashMap::new(),
            pending: VecDeque::new(),
            pending_events: 0,
            copy: None,
            run: None,
            exact,
            counts: Applied::default(),
            origin: None,
            resolver,
        }
    }

    /// Applies one event (or queues it: errors may surface on a later call).
    pub async fn apply(&mut self, table: &Arc<MasterTable>, event: Event) -> Result<(), Error> {
        if event.origin.is_some() && event.origin != self.origin {
            // The slave's own capture (multi-master) logs the change with its
            // origin, so that it never goes back there.
            self.flush().await?;
            self.tx
                .execute(ORIGIN_SQL, &[&event.origin])
                .await
                .doing("marking the changes' origin on the slave")?;
            self.origin = event.origin.clone();
        }
        if event.op == Op::Execute {
            return self.execute(event).await;
        }
        let plan = self.plan(table).await?;
        self.counts.events += 1;
        let event = match (self.resolver, event.op) {
            (Some(resolver), Op::Insert | Op::Update | Op::Delete) => {
                match self.resolve(resolver, &plan, event).await? {
                    Some(event) => event,
                    None => return Ok(()),
                }
            }
            _ => event,
        };
        match event.op {
            Op::Insert => self.insert(plan, event).await,
            Op::Update | Op::Delete => self.change(plan, event).await,
            Op::Truncate => {
                self.flush().await?;
                let sql = format!("TRUNCATE ONLY {}", plan.slave);
                self.tx
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| apply_error(&plan, "(all rows)".into(), event.id, &e))
            }
            Op::Execute => Ok(()),
        }
    }

    /// Runs a statement queued with `pgreplica.execute` at its point in the
    /// batch; the slave's tables may have changed, so plans and prepared
    /// statements are made again.
    async fn execute(&mut self, event: Event) -> Result<(), Error> {
        self.flush().await?;
        self.counts.events += 1;
        let sql = event
            .new
            .as_ref()
            .and_then(|n| n.first().cloned().flatten())
            .ok_or_else(|| malformed(&event, "an execute event without its statement"))?;
        if sql.is_empty() {
            // Marks a change of what the master logs (pgreplica.set_options).
            return Ok(());
        }
        // A slave that captures too (multi-master, a cascade) queues the
        // statement in its own log, with its origin, for its own slaves.
        let captures: bool = self
            .tx
            .query_one(CAPTURES_SQL, &[])
            .await
            .doing("reading the slave's catalog")?
            .get(0);
        let ran = match captures {
            true => {
                self.tx
                    .execute("SELECT pgreplica.execute($1)", &[&sql])
                    .await
            }
            false => self.tx.batch_execute(&sql).await.map(|_| 0),
        };
        ran.map_err(|e| Error::Query {
            doing: format!("running event {} on the slave ({sql})", event.id),
            message: pg_message(&e),
        })?;
        self.tx
            .batch_execute(SESSION_SQL)
            .await
            .doing("setting up the slave session")?;
        self.plans.clear();
        self.statements.0.clear();
        Ok(())
    }

    /// Settles a change under the set's conflict policy before it is applied:
    /// reads (and locks) the slave's row, and returns the event to apply: the
    /// master's as it is, one rewritten so that the master's version wins over
    /// the slave's row, or none when the slave's row stays.
    async fn resolve(
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
        let local = Self::local_row(self.tx, plan, row).await?;
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
        let local_version = match policy {
            Policy::Newest | Policy::Priority => Self::local_version(self.tx, plan, row).await?,
            _ => Version {
                time: None,
                node: None,
            },
        };
        let remote_version = Version {
            time: event.time,
            node: event.origin.clone(),
        };
        let (winner, by) = match resolver.decide(policy, &local_version, &remote_version) {
            Some(winner) => (winner, format!("{policy:?}").to_lowercase()),
            None => (Self::by_hand(self.tx, &conflict).await?, "hand".to_string()),
        };
        self.tx
            .execute(
                RECORD_SQL,
                &[
                    &conflict.set,
                    &conflict.table.quoted(),
                    &conflict.key,
                    &kind.to_string(),
                    &conflict.event,
                    &conflict.origin,
                    &conflict.local,
                    &conflict.remote,
                    &winner.name(),
                    &by,
                ],
            )
            .await
            .doing("recording a conflict in pgreplica.conflicts on the slave")?;
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

    /// The slave's row with `row`'s key, locked, as text in the master's columns.
    async fn local_row(
        tx: &Transaction<'_>,
        plan: &Plan,
        row: &Fields,
    ) -> Result<Option<Fields>, Error> {
        let master = &plan.master;
        let list: Vec<String> = master
            .columns
            .iter()
            .map(|c| format!("{}::text", quote_ident(c)))
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
            "SELECT {} FROM ONLY {} WHERE ({}) = ({}) FOR UPDATE",
            list.join(", "),
            plan.slave,
            keys.join(", "),
            params.join(", ")
        );
        let values: Vec<Option<String>> = master.key.iter().map(|&k| row[k].clone()).collect();
        let found = tx.query_opt(&sql, &refs(&values)).await.doing(&format!(
            "reading the slave's row of a conflict in {}",
            plan.slave
        ))?;
        Ok(found.map(|r| (0..master.columns.len()).map(|i| r.get(i)).collect()))
    }

    /// When and on which node the slave's row last changed, from the slave's
    /// own log (multi-master): its latest event for the key among the table's
    /// last RECENT. Unknown when the log no longer holds one.
    async fn local_version(
        tx: &Transaction<'_>,
        plan: &Plan,
        row: &Fields,
    ) -> Result<Version, Error> {
        let doing = "reading the slave's log for a conflict";
        let unknown = Version {
            time: None,
            node: None,
        };
        let captures: bool = tx.query_one(CAPTURES_SQL, &[]).await.doing(doing)?.get(0);
        if !captures {
            return Ok(unknown);
        }
        let name = plan.slave.quoted();
        let logged: Vec<String> = tx
            .query_one(LOGGED_COLUMNS_SQL, &[&name])
            .await
            .doing(doing)?
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
            return Ok(unknown);
        };
        for r in tx.query(RECENT_SQL, &[&name, &RECENT]).await.doing(doing)? {
            let text: Option<String> = r.get(2);
            let Some(fields) = text.and_then(|t| record::parse(&t).ok()) else {
                continue;
            };
            if fields.len() == logged.len() && key.iter().all(|(at, v)| fields[*at] == **v) {
                return Ok(Version {
                    time: r.get(0),
                    node: r.get(1),
                });
            }
        }
        Ok(unknown)
    }

    /// The DBA's resolution of a conflict under policy `stop`, or the error
    /// that stops the slave until there is one.
    async fn by_hand(tx: &Transaction<'_>, conflict: &Conflict) -> Result<Winner, Error> {
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
            .doing("reading the resolutions of conflicts on the slave")?;
        found
            .and_then(|r| Winner::parse(r.get(0)))
            .ok_or_else(|| Error::Conflict(Box::new(conflict.clone())))
    }

    /// Sends what is queued, checks every result, and records `progress` (set,
    /// snapshot) as the slave's progress in the same transaction when given.
    pub async fn finish(mut self, progress: Option<(&str, &Snapshot)>) -> Result<Applied, Error> {
        self.flush().await?;
        if let Some((set, snapshot)) = progress {
            self.tx
                .execute(
                    PROGRESS_WRITE_SQL,
                    &[&set, &snapshot.to_string(), &(self.counts.events as i64)],
                )
                .await
                .doing("writing the slave's progress")?;
        }
        Ok(self.counts)
    }

    /// How `table` (one definition of a master table) lands on the slave.
    async fn plan(&mut self, table: &Arc<MasterTable>) -> Result<Arc<Plan>, Error> {
        let key = Arc::as_ptr(table) as usize;
        if let Some(plan) = self.plans.get(&key) {
            return Ok(plan.clone());
        }
        // The catalog query cannot pass a COPY in progress on the connection.
        self.flush().await?;
        let slave = table.name.clone();
        let rows = self
            .tx
            .query(SLAVE_TABLE_SQL, &[&slave.quoted()])
            .await
            .doing("reading the slave's catalog")?;
        if rows.is_empty() {
            return Err(Error::Schema {
                table: slave,
                message: "missing on the slave: create it there with the master's definition \
                          (pg_dump --schema-only --table=...) and replication resumes"
                    .into(),
            });
        }
        let columns: HashMap<String, (String, bool)> = rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        let missing: Vec<&str> = table
            .columns
            .iter()
            .filter(|c| !columns.contains_key(*c))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(Error::Schema {
                table: slave,
                message: format!(
                    "the slave lacks column(s) {} that the master has: add them on the slave \
                     and replication resumes",
                    missing.join(", ")
                ),
            });
        }
        let (types, generated) = table.columns.iter().map(|c| columns[c].clone()).unzip();
        let plan = Arc::new(Plan {
            master: table.clone(),
            slave,
            types,
            generated,
        });
        self.plans.insert(key, plan.clone());
        Ok(plan)
    }

    async fn insert(&mut self, plan: Arc<Plan>, event: Event) -> Result<(), Error> {
        let Some(new) = &event.new else {
            return Err(malformed(&event, "an insert without a row"));
        };
        self.flush_run().await?;
        if self
            .copy
            .as_ref()
            .is_some_and(|c| !Arc::ptr_eq(&c.plan, &plan))
        {
            self.flush_copy().await?;
        }
        if self.copy.is_none() {
            self.drain().await?;
            let sql = copy_statement(&plan);
            let statement = self.statement(&sql, 0).await?;
            let sink = self
                .tx
                .copy_in(&statement)
                .await
                .map_err(|e| apply_error(&plan, plan.master.key_text(new), event.id, &e))?;
            self.copy = Some(CopyRun {
                plan: plan.clone(),
                sink: Box::pin(sink),
                data: BytesMut::new(),
                rows: 0,
                first: event.id,
                lines: Vec::new(),
            });
        }
        let Some(run) = self.copy.as_mut() else {
            return Ok(());
        };
        let mut first = true;
        for (value, generated) in new.iter().zip(&plan.generated) {
            if *generated {
                continue;
            }
            if !first {
                run.data.extend_from_slice(b"\t");
            }
            first = false;
            copy_escape(&mut run.data, value.as_deref());
        }
        run.data.extend_from_slice(b"\n");
        run.rows += 1;
        if self.exact {
            run.lines.push((event.id, plan.master.key_text(new)));
            if run.rows >= RUN_ROWS || run.data.len() >= RUN_BYTES {
                self.flush_copy().await?;
            }
        } else if run.data.len() >= COPY_CHUNK {
            let chunk = run.data.split().freeze();
            if let Err(e) = run.sink.send(chunk).await {
                let run = self.copy.take();
                return Err(run.map_or_else(|| Error::Lost("slave"), |r| copy_error(&r, &e)));
            }
        }
        Ok(())
    }

    /// Adds an update or delete to the current set-based run, or starts a new one.
    async fn change(&mut self, plan: Arc<Plan>, event: Event) -> Result<(), Error> {
        let Some(old) = &event.old else {
            return Err(malformed(&event, "an update or delete without its old row"));
        };
        let (compared, new_key) = match (&event.op, &event.new) {
            (Op::Delete, _) => ((0..old.len()).collect(), None),
            (_, Some(new)) => {
                let changed: Vec<usize> = (0..new.len())
                    .filter(|&i| old[i] != new[i] && !plan.generated[i])
                    .collect();
                (changed, Some(plan.master.key_text(new)))
            }
            _ => return Err(malformed(&event, "an update without its new row")),
        };
        if compared.is_empty() {
            return Ok(());
        }
        let old_key = plan.master.key_text(old);
        let fits = self.run.as_ref().is_some_and(|run| {
            Arc::ptr_eq(&run.plan, &plan)
                && run.op == event.op
                && run.compared == compared
                && run.events.len() < if self.exact { 1 } else { RUN_ROWS }
                && run.bytes < RUN_BYTES
                && !run.keys.contains(&old_key)
                && new_key.as_ref().is_none_or(|k| !run.keys.contains(k))
        });
        if !fits {
            self.flush_copy().await?;
            self.flush_run().await?;
        }
        let run = self.run.get_or_insert_with(|| SetRun {
            plan,
            op: event.op,
            compared,
            events: Vec::new(),
            keys: HashSet::new(),
            bytes: 0,
        });
        run.bytes += [&event.old, &event.new]
            .iter()
            .flat_map(|row| row.iter().flatten())
            .map(|v| v.as_ref().map_or(0, String::len))
            .sum::<usize>();
        run.keys.insert(old_key);
        run.keys.extend(new_key);
        run.events.push(event);
        Ok(())
    }

    /// Sends the current set-based run, in order, and queues its result for checking.
    async fn flush_run(&mut self) -> Result<(), Error> {
        let Some(run) = self.run.take() else {
            return Ok(());
        };
        let (sql, params) = run_statement(&run);
        let statement = self.statement(&sql, params.len()).await?;
        let tx = self.tx;
        let mut future: RowsFuture<'t> = Box::pin(async move {
            let rows = tx.query_raw(&statement, params).await?;
            rows.try_collect().await
        });
        // The first poll puts the request on the connection's queue, so requests
        // leave in event order whatever order their results are read in.
        let ready = match futures_util::poll!(future.as_mut()) {
            Poll::Ready(result) => Some(result),
            Poll::Pending => None,
        };
        self.pending_events += run.events.len();
        self.pending.push_back(Pending { future, ready, run });
        while self.pending.len() >= WINDOW || self.pending_events >= WINDOW_EVENTS {
            self.check_oldest().await?;
        }
        Ok(())
    }

    async fn statement(&mut self, sql: &str, params: usize) -> Result<Statement, Error> {
        if let Some(s) = self.statements.0.get(sql) {
            return Ok(s.clone());
        }
        // Rare (once per statement shape): settle what is in flight first, so that
        // no earlier result waits unread behind this one.
        self.drain().await?;
        let types = vec![Type::TEXT_ARRAY; params];
        let statement = self
            .tx
            .prepare_typed(sql, &types)
            .await
            .doing(&format!("preparing a statement on the slave ({sql})"))?;
        self.statements.0.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    async fn check_oldest(&mut self) -> Result<(), Error> {
        let Some(p) = self.pending.pop_front() else {
            return Ok(());
        };
        self.pending_events -= p.run.events.len();
        let result = match p.ready {
            Some(result) => result,
            None => p.future.await,
        };
        let run = &p.run;
        let rows = result.map_err(|e| run_error(run, &e))?;
        // Each returned row starts with the event's position in the run (1-based).
        let found: HashMap<i64, &Row> = rows.iter().map(|r| (r.get(0), r)).collect();
        for (n, event) in run.events.iter().enumerate() {
            let row = found.get(&(n as i64 + 1)).copied();
            if let Some(note) = check_conflict(run, event, row) {
                self.counts.conflicts += 1;
                if self.counts.notes.len() < NOTES {
                    self.counts.notes.push(note);
                }
            }
        }
        Ok(())
    }

    async fn drain(&mut self) -> Result<(), Error> {
        while !self.pending.is_empty() {
            self.check_oldest().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Error> {
        self.flush_run().await?;
        self.drain().await?;
        self.flush_copy().await
    }

    /// Sends the rest of the current COPY and ends it.
    async fn flush_copy(&mut self) -> Result<(), Error> {
        let Some(mut run) = self.copy.take() else {
            return Ok(());
        };
        let chunk = run.data.split().freeze();
        let result = async {
            run.sink.send(chunk).await?;
            run.sink.as_mut().finish().await
        }
        .await;
        result.map(|_| ()).map_err(|e| copy_error(&run, &e))
    }
}

/// `COPY t (columns) FROM STDIN` for the master's columns the slave does not compute.
fn copy_statement(plan: &Plan) -> String {
    let columns: Vec<String> = plan
        .master
        .columns
        .iter()
        .zip(&plan.generated)
        .filter(|(_, g)| !**g)
        .map(|(c, _)| quote_ident(c))
        .collect();
    format!("COPY {} ({}) FROM STDIN", plan.slave, columns.join(", "))
}

/// The error of a failed COPY: exact when its lines were kept, else an
/// [`Error::ApplyRun`] that makes the daemon retry the batch in exact mode.
fn copy_error(run: &CopyRun, e: &tokio_postgres::Error) -> Error {
    if run.lines.is_empty() {
        return Error::ApplyRun {
            table: run.plan.slave.clone(),
            events: run.rows,
            first: run.first,
            message: pg_message(e),
        };
    }
    let line = copy_error_line(e).unwrap_or(1);
    let (event, key) = run
        .lines
        .get(line - 1)
        .or(run.lines.first())
        .cloned()
        .unwrap_or_default();
    apply_error(&run.plan, key, event, e)
}

/// The set-based statement of a run and its parameters (one text array per
/// key column, then one per set column). Every row it returns starts with the
/// event's position in the run, followed by the slave's values of the compared
/// columns before the change.
fn run_statement(run: &SetRun) -> (String, Vec<Vec<Option<String>>>) {
    let plan = &run.plan;
    let master = &plan.master;
    let column = |i: usize| quote_ident(&master.columns[i]);
    let mut params: Vec<Vec<Option<String>>> = Vec::new();
    let mut names = Vec::new();
    let mut matches = Vec::new();
    for (n, &k) in master.key.iter().enumerate() {
        params.push(run.events.iter().map(|e| field(&e.old, k)).collect());
        names.push(format!("pgreplica_k{n}"));
        matches.push(format!(
            "pgreplica_l.{} = s.pgreplica_k{n}::{}",
            column(k),
            plan.types[k]
        ));
    }
    let list = |f: &dyn Fn(usize, usize) -> String| -> String {
        let items: Vec<String> = run
            .compared
            .iter()
            .enumerate()
            .map(|(n, &i)| f(n, i))
            .collect();
        items.join(", ")
    };
    let sql = if run.op == Op::Update {
        for (n, &i) in run.compared.iter().enumerate() {
            params.push(run.events.iter().map(|e| field(&e.new, i)).collect());
            names.push(format!("pgreplica_n{n}"));
        }
        let arrays: Vec<String> = (1..=params.len())
            .map(|p| format!("${p}::text[]"))
            .collect();
        format!(
            "UPDATE ONLY {t} AS pgreplica_t SET {sets} \
             FROM (SELECT pgreplica_l.ctid AS pgreplica_ctid, s.*, {olds} \
                     FROM unnest({arrays}) WITH ORDINALITY AS s({names}, pgreplica_seq) \
                     JOIN ONLY {t} AS pgreplica_l ON {matches} \
                      FOR UPDATE OF pgreplica_l) AS pgreplica_o \
             WHERE pgreplica_t.ctid = pgreplica_o.pgreplica_ctid \
             RETURNING pgreplica_o.pgreplica_seq, {returned}",
            t = plan.slave,
            sets = list(&|n, i| format!(
                "{} = pgreplica_o.pgreplica_n{n}::{}",
                column(i),
                plan.types[i]
            )),
            olds = list(&|n, i| format!("pgreplica_l.{}::text AS pgreplica_o{n}", column(i))),
            arrays = arrays.join(", "),
            names = names.join(", "),
            matches = matches.join(" AND "),
            returned = list(&|n, _| format!("pgreplica_o.pgreplica_o{n}")),
        )
    } else {
        let arrays: Vec<String> = (1..=params.len())
            .map(|p| format!("${p}::text[]"))
            .collect();
        format!(
            "DELETE FROM ONLY {t} AS pgreplica_l \
             USING unnest({arrays}) WITH ORDINALITY AS s({names}, pgreplica_seq) \
             WHERE {matches} RETURNING s.pgreplica_seq, {returned}",
            t = plan.slave,
            arrays = arrays.join(", "),
            names = names.join(", "),
            matches = matches.join(" AND "),
            returned = list(&|_, i| format!("pgreplica_l.{}::text", column(i))),
        )
    };
    (sql, params)
}

fn refs(values: &[Option<String>]) -> Vec<&(dyn ToSql + Sync)> {
    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

fn field(row: &Option<Fields>, i: usize) -> Option<String> {
    row.as_ref().and_then(|r| r[i].clone())
}

/// Logs a conflict when the slave's row (`local`: position, then the compared
/// columns' values before the change) was missing or differed from the master's
/// old row. Returns its description.
fn check_conflict(run: &SetRun, event: &Event, local: Option<&Row>) -> Option<String> {
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

/// The error of a failed run: exact for a single event; for a longer run, an
/// [`Error::ApplyRun`] that makes the daemon retry the batch one event at a time.
fn run_error(run: &SetRun, e: &tokio_postgres::Error) -> Error {
    let first = &run.events[0];
    if run.events.len() > 1 {
        return Error::ApplyRun {
            table: run.plan.slave.clone(),
            events: run.events.len(),
            first: first.id,
            message: pg_message(e),
        };
    }
    let key = first
        .old
        .as_ref()
        .map(|old| run.plan.master.key_text(old))
        .unwrap_or_default();
    apply_error(&run.plan, key, first.id, e)
}

/// Writes a value in COPY's text format.
fn copy_escape(out: &mut BytesMut, value: Option<&str>) {
    let Some(value) = value else {
        out.extend_from_slice(b"\\N");
        return;
    };
    for b in value.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b => out.extend_from_slice(&[b]),
        }
    }
}

/// The line number in a COPY error's context (`COPY t, line 3: …`).
fn copy_error_line(e: &tokio_postgres::Error) -> Option<usize> {
    let place = e.as_db_error()?.where_()?;
    let rest = &place[place.find(", line ")? + 7..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
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

fn apply_error(plan: &Plan, key: String, event: i64, e: &tokio_postgres::Error) -> Error {
    Error::Apply {
        table: plan.slave.clone(),
        key,
        event,
        message: pg_message(e),
    }
}

fn malformed(event: &Event, what: &str) -> Error {
    Error::Query {
        doing: format!("reading event {}", event.id),
        message: format!("the log holds {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_control_characters_and_null() {
        let mut out = BytesMut::new();
        copy_escape(&mut out, Some("a\tb\\c\nd\re"));
        out.extend_from_slice(b"|");
        copy_escape(&mut out, None);
        out.extend_from_slice(b"|");
        copy_escape(&mut out, Some("\\N"));
        assert_eq!(&out[..], b"a\\tb\\\\c\\nd\\re|\\N|\\\\N");
    }
}
