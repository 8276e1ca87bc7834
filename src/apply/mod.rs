//! Applying a batch on a slave: statements from the slave's catalog, in flight
//! many at a time, with the slave's progress in the same transaction.
//!
//! Columns are matched by name. Runs of inserts into one table go through COPY.
//! Runs of updates (of the same columns) or deletes of one table go out as one
//! set-based statement over arrays of keys and values, as long as no key repeats
//! within the run; these statements are kept in flight many at a time
//! (pipelining), each sent in event order on the one connection, so the slave
//! executes them in exactly the log's order. The batch's events and the slave's
//! progress row commit in one transaction: a crash anywhere loses nothing and
//! applies nothing twice.

mod resolve;
mod sql;

use crate::conflict::Resolver;
use crate::db::Prepared;
use crate::error::{Context, Error};
use crate::event::{Event, MasterTable, Op};
use crate::ident::TableName;
use crate::slave;
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, TryStreamExt};
use sql::{copy_error_line, copy_escape, copy_statement, run_statement};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::task::Poll;
use tokio_postgres::types::Type;
use tokio_postgres::{CopyInSink, Row, Statement, Transaction};

// Types by their qualified internal name, which carries no modifier: values
// are cast to the bare type and the column's own length or precision applies
// as on an insert (a value too long for varchar(5) fails instead of being cut
// short by an explicit cast, and a key never matches another row through
// rounding). The SQL spellings would not do: `character` and `bit` without a
// length mean length 1.
/// A slave table's columns: name, qualified type without modifier (so that a
/// value too long fails instead of being cut), and whether the slave computes it.
pub const SLAVE_TABLE_SQL: &str = "
SELECT a.attname::text, format('%I.%I', n.nspname, t.typname), a.attgenerated <> ''
  FROM pg_attribute a
  JOIN pg_type t ON t.oid = a.atttypid
  JOIN pg_namespace n ON n.oid = t.typnamespace
 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped";

// Each table's columns are looked up by its oid, whatever the number of
// tables: the plan is made once per session (see `slave::session`).
/// [`SLAVE_TABLE_SQL`] for several tables (quoted names), each row led by
/// its table's name.
const SLAVE_TABLES_SQL: &str = "
SELECT q.name, a.attname::text,
       (SELECT format('%I.%I', n.nspname, t.typname)
          FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
         WHERE t.oid = a.atttypid),
       a.attgenerated <> ''
  FROM unnest($1::text[]) AS q(name),
       LATERAL (SELECT attname, atttypid, attgenerated FROM pg_attribute
                 WHERE attrelid = to_regclass(q.name) AND attnum > 0 AND NOT attisdropped
                OFFSET 0) AS a";

/// The slave tables a batch's statements likely go to (quoted names), whose
/// columns are read before the batch, at most.
pub const DESCRIBED_AHEAD: usize = 64;

/// A slave table's columns as [`SLAVE_TABLES_SQL`] gives them: name, type,
/// generated.
type Columns = Vec<(String, String, bool)>;

/// Slave tables' columns read ahead of a batch, by quoted name.
pub type Described = HashMap<String, Columns>;

/// Reads the columns of the slave tables `tables` (quoted names, at most
/// [`DESCRIBED_AHEAD`]), for [`Applier::described`]; the statement is
/// prepared on `tx`'s session first, so that the read can go out beside
/// other statements.
pub async fn describe_ahead<'a>(
    tx: &'a Transaction<'a>,
    statements: &mut Prepared,
    tables: &'a [String],
) -> Result<impl Future<Output = Result<Described, Error>> + 'a, Error> {
    let doing = "reading the slave's catalog";
    let statement = statements.get(tx, SLAVE_TABLES_SQL, &[]).await;
    let statement = statement.on_slave(doing)?;
    let tables = &tables[..tables.len().min(DESCRIBED_AHEAD)];
    Ok(async move {
        let mut described = Described::new();
        if tables.is_empty() {
            return Ok(described);
        }
        for row in tx.query(&statement, &[&tables]).await.on_slave(doing)? {
            let column = (row.get(1), row.get(2), row.get(3));
            described.entry(row.get(0)).or_default().push(column);
        }
        Ok(described)
    })
}

const CAPTURES_SQL: &str = "SELECT to_regprocedure('pgreplica.execute(text)') IS NOT NULL";

const ORIGIN_SQL: &str = "SELECT set_config('pgreplica.origin', $1, true)";

/// Slave tables already named in a warning that their master table was
/// renamed: one warning per daemon, not one per batch.
static RENAMED: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Default::default);

/// Statements, events in them and their bytes, kept in flight before the
/// oldest is awaited.
const WINDOW: usize = 256;
const WINDOW_EVENTS: usize = 4 * RUN_ROWS;
const WINDOW_BYTES: usize = 16 << 20;
/// Rows or bytes after which a run (COPY or set-based statement) is sent.
const RUN_ROWS: usize = 5000;
const RUN_BYTES: usize = 1 << 20;
/// Bytes of COPY data sent at a time while a COPY streams.
const COPY_CHUNK: usize = 64 << 10;

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
    /// Events applied per slave table.
    pub tables: BTreeMap<String, u64>,
}

/// Conflicts described in full per batch; the rest are counted.
const NOTES: usize = 20;

/// Applies one batch's events inside a slave transaction.
pub struct Applier<'t> {
    tx: &'t Transaction<'t>,
    statements: &'t mut Prepared,
    /// By master table definition (its address: each plan holds its definition alive).
    plans: HashMap<usize, Arc<Plan>>,
    /// Events applied per table definition (the key of `plans`).
    per_table: HashMap<usize, u64>,
    pending: VecDeque<Pending<'t>>,
    pending_events: usize,
    pending_bytes: usize,
    copy: Option<CopyRun>,
    /// Tables truncated by consecutive events, truncated together when the next
    /// other change comes: tables linked by foreign keys can only be truncated
    /// in one statement, as the master did.
    truncating: Vec<(Arc<Plan>, i64)>,
    run: Option<SetRun>,
    /// One event per statement and COPYs with their lines kept, so that an
    /// error names its event.
    exact: bool,
    counts: Applied,
    /// The origin the slave's capture now stamps on changes.
    origin: Option<String>,
    /// The set's conflict policies, when it has some.
    resolver: Option<&'t Resolver>,
    /// Columns of slave tables read ahead (quoted name).
    ahead: HashMap<String, Columns>,
}

impl<'t> Applier<'t> {
    /// Starts applying in `tx`, reusing the connection's prepared statements.
    /// With `exact`, updates and deletes go one per statement, so that an error
    /// names its event (see [`Error::ApplyRun`]).
    pub fn new(
        tx: &'t Transaction<'t>,
        statements: &'t mut Prepared,
        exact: bool,
        resolver: Option<&'t Resolver>,
    ) -> Applier<'t> {
        Applier {
            tx,
            statements,
            plans: HashMap::new(),
            per_table: HashMap::new(),
            pending: VecDeque::new(),
            pending_events: 0,
            pending_bytes: 0,
            copy: None,
            truncating: Vec::new(),
            run: None,
            exact,
            counts: Applied::default(),
            origin: None,
            resolver,
            ahead: HashMap::new(),
        }
    }

    /// Applies one event (or queues it: errors may surface on a later call).
    pub async fn apply(&mut self, table: &Arc<MasterTable>, event: Event) -> Result<(), Error> {
        let whole_truncate = event.op == Op::Truncate && event.old.is_none();
        if !whole_truncate {
            self.flush_truncates().await?;
        }
        if event.origin.is_some() && event.origin != self.origin {
            // The slave's own capture (multi-master) logs the change with its
            // origin, so that it never goes back there.
            self.flush().await?;
            self.tx
                .execute(ORIGIN_SQL, &[&event.origin])
                .await
                .on_slave("marking the changes' origin on the slave")?;
            slave::mark_origin(self.tx).await?;
            self.origin = event.origin.clone();
        }
        if event.op == Op::Execute {
            return self.execute(event).await;
        }
        let plan = self.plan(table).await?;
        self.counts.events += 1;
        *self
            .per_table
            .entry(Arc::as_ptr(table) as usize)
            .or_default() += 1;
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
                self.flush_rows().await?;
                let partition = event
                    .old
                    .as_ref()
                    .and_then(|o| o.first().cloned().flatten());
                let Some(condition) = partition else {
                    self.truncating.push((plan, event.id));
                    return Ok(());
                };
                let sql = format!("DELETE FROM {} WHERE {condition}", plan.slave);
                self.tx
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| apply_error(&plan, "(all rows)".into(), event.id, e))
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
            .on_slave("reading the slave's catalog")?
            .get(0);
        let ran = match captures {
            true => {
                self.tx
                    .execute("SELECT pgreplica.execute($1)", &[&sql])
                    .await
            }
            false => self.tx.batch_execute(&sql).await.map(|_| 0),
        };
        ran.on_slave(&format!("running event {} on the slave ({sql})", event.id))?;
        slave::session(self.tx).await?;
        self.count_tables();
        self.plans.clear();
        self.statements.clear();
        self.ahead.clear();
        Ok(())
    }

    /// The events applied so far, those still queued included.
    pub fn events(&self) -> u64 {
        self.counts.events
    }

    /// Sends what is queued, checks every result, and returns the counts.
    pub async fn finish(mut self) -> Result<Applied, Error> {
        self.flush().await?;
        self.count_tables();
        Ok(self.counts)
    }

    /// Moves the events counted per table definition to the counts by name.
    fn count_tables(&mut self) {
        for (key, events) in self.per_table.drain() {
            if let Some(plan) = self.plans.get(&key) {
                *self
                    .counts
                    .tables
                    .entry(plan.slave.to_string())
                    .or_default() += events;
            }
        }
    }

    /// Columns of slave tables read ahead of the batch (see
    /// [`describe_ahead`]): used instead of reading them again.
    pub fn described(&mut self, tables: Described) {
        self.ahead = tables;
    }

    /// The columns of slave table `table`: read ahead, or read now.
    async fn columns(&mut self, table: &TableName) -> Result<Columns, Error> {
        match self.ahead.remove(&table.quoted()) {
            Some(columns) => Ok(columns),
            None => slave_columns(self.tx, self.statements, table).await,
        }
    }

    /// How `table` (one definition of a master table) lands on the slave.
    async fn plan(&mut self, table: &Arc<MasterTable>) -> Result<Arc<Plan>, Error> {
        let key = Arc::as_ptr(table) as usize;
        if let Some(plan) = self.plans.get(&key) {
            return Ok(plan.clone());
        }
        // The catalog query cannot pass a COPY in progress on the connection.
        self.flush_rows().await?;
        let mut slave = table.name.clone();
        let mut rows = self.columns(&slave).await?;
        // Renamed or moved on the master without execute: the slave's copy
        // keeps its name until the DBA renames it there too.
        if let Some(was) = table.was.as_ref().filter(|_| rows.is_empty()) {
            rows = self.columns(was).await?;
            if !rows.is_empty() && RENAMED.lock().is_ok_and(|mut r| r.insert(was.quoted())) {
                tracing::warn!(
                    "table {was} was renamed or moved on the master (to {slave}) without \
                     pgreplica execute: its changes go to {was} on the slave until it is renamed \
                     there too (ALTER TABLE on the slave), then run pgreplica install on the \
                     master to record the new name"
                );
            }
            if !rows.is_empty() {
                slave = was.clone();
            }
        }
        if rows.is_empty() {
            return Err(Error::Schema {
                table: slave,
                message: "missing on the slave: create it there with the master's definition \
                          (pg_dump --schema-only --table=...) and replication resumes"
                    .into(),
            });
        }
        let columns: HashMap<String, (String, bool)> = rows
            .into_iter()
            .map(|(name, kind, generated)| (name, (kind, generated)))
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
                .map_err(|e| apply_error(&plan, plan.master.key_text(new), event.id, e))?;
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
                return Err(match run {
                    Some(run) => copy_error(&run, e),
                    None => Error::Lost {
                        side: crate::error::Side::Slave,
                        what: "was lost".into(),
                    },
                });
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
        run.bytes += event.size();
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
        self.pending_bytes += run.bytes;
        self.pending.push_back(Pending { future, ready, run });
        while self.pending.len() >= WINDOW
            || self.pending_events >= WINDOW_EVENTS
            || self.pending_bytes >= WINDOW_BYTES
        {
            self.check_oldest().await?;
        }
        Ok(())
    }

    async fn statement(&mut self, sql: &str, params: usize) -> Result<Statement, Error> {
        if let Some(s) = self.statements.cached(sql) {
            return Ok(s);
        }
        // Rare (once per statement shape): settle what is in flight first, so that
        // no earlier result waits unread behind this one.
        self.drain().await?;
        let types = vec![Type::TEXT_ARRAY; params];
        self.statements
            .get(self.tx, sql, &types)
            .await
            .on_slave(&format!("preparing a statement on the slave ({sql})"))
    }

    async fn check_oldest(&mut self) -> Result<(), Error> {
        let Some(p) = self.pending.pop_front() else {
            return Ok(());
        };
        self.pending_events -= p.run.events.len();
        self.pending_bytes -= p.run.bytes;
        let result = match p.ready {
            Some(result) => result,
            None => p.future.await,
        };
        let run = &p.run;
        let rows = result.map_err(|e| run_error(run, e))?;
        // Each returned row starts with the event's position in the run (1-based).
        let found: HashMap<i64, &Row> = rows.iter().map(|r| (r.get(0), r)).collect();
        for (n, event) in run.events.iter().enumerate() {
            let row = found.get(&(n as i64 + 1)).copied();
            if let Some(note) = resolve::check_conflict(run, event, row) {
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
        self.flush_truncates().await?;
        self.flush_rows().await
    }

    /// Sends the runs and COPY in hand and checks every result.
    async fn flush_rows(&mut self) -> Result<(), Error> {
        self.flush_run().await?;
        self.drain().await?;
        self.flush_copy().await
    }

    /// Truncates the tables of the truncates in hand, in one statement.
    async fn flush_truncates(&mut self) -> Result<(), Error> {
        let Some((plan, event)) = self.truncating.first().cloned() else {
            return Ok(());
        };
        let mut names: Vec<String> = self
            .truncating
            .drain(..)
            .map(|(p, _)| p.slave.quoted())
            .collect();
        names.sort_unstable();
        names.dedup();
        let sql = format!("TRUNCATE {}", names.join(", "));
        self.tx
            .batch_execute(&sql)
            .await
            .map_err(|e| apply_error(&plan, "(all rows)".into(), event, e))
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
        result.map(|_| ()).map_err(|e| copy_error(&run, e))
    }
}

/// The error of a failed COPY: exact when its lines were kept, else an
/// [`Error::ApplyRun`] that makes the daemon retry the batch in exact mode.
fn copy_error(run: &CopyRun, e: tokio_postgres::Error) -> Error {
    if run.lines.is_empty() {
        return Error::ApplyRun {
            table: run.plan.slave.clone(),
            events: run.rows,
            first: run.first,
            source: e,
        };
    }
    let line = copy_error_line(&e).unwrap_or(1);
    let (event, key) = run
        .lines
        .get(line - 1)
        .or(run.lines.first())
        .cloned()
        .unwrap_or_default();
    apply_error(&run.plan, key, event, e)
}

/// The error of a failed run: exact for a single event; for a longer run, an
/// [`Error::ApplyRun`] that makes the daemon retry the batch one event at a time.
fn run_error(run: &SetRun, e: tokio_postgres::Error) -> Error {
    let first = &run.events[0];
    if run.events.len() > 1 {
        return Error::ApplyRun {
            table: run.plan.slave.clone(),
            events: run.events.len(),
            first: first.id,
            source: e,
        };
    }
    let key = first
        .old
        .as_ref()
        .map(|old| run.plan.master.key_text(old))
        .unwrap_or_default();
    apply_error(&run.plan, key, first.id, e)
}

fn apply_error(plan: &Plan, key: String, event: i64, e: tokio_postgres::Error) -> Error {
    Error::Apply {
        table: plan.slave.clone(),
        key,
        event,
        source: e,
    }
}

/// The slave's columns of `table`: name, qualified type, generated.
async fn slave_columns(
    tx: &Transaction<'_>,
    statements: &mut Prepared,
    table: &TableName,
) -> Result<Columns, Error> {
    let doing = "reading the slave's catalog";
    let statement = statements
        .get(tx, SLAVE_TABLE_SQL, &[])
        .await
        .on_slave(doing)?;
    let rows = tx
        .query(&statement, &[&table.quoted()])
        .await
        .on_slave(doing)?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

fn malformed(event: &Event, what: &str) -> Error {
    Error::Invalid {
        doing: format!("reading event {}", event.id),
        message: format!("the log holds {what}"),
    }
}
