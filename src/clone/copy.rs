//! The copy: jobs that share one exported snapshot of the master, each
//! streaming a table (or part of a big one) into the slave in one transaction.

use super::ddl::{Ddl, create, prepare};
use super::{Options, Table};
use crate::apply::Applier;
use crate::config::Config;
use crate::db::{self, SESSION_SQL};
use crate::error::{Context, Error};
use crate::event::{Event, MasterTable, Op};
use crate::ident::{TableName, quote_ident};
use crate::meter::Meter;
use crate::replicate::{self, Pipeline};
use crate::slave;
use crate::{record, registry};
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio_postgres::Client;

/// Bytes of COPY data sent to the slave at a time.
const COPY_PIECE: usize = 256 << 10;

// A column's type only when it is built in: binary COPY carries the type oids of
// array elements and composite fields, which differ between servers for types
// made by CREATE TYPE or an extension.
const COLUMNS_SQL: &str = "
SELECT a.attname::text,
       CASE WHEN a.atttypid < 16384 THEN format_type(a.atttypid, a.atttypmod) END,
       a.attgenerated <> ''
  FROM pg_attribute a
 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum";

/// Copies `tables` over `jobs` connection pairs that share one exported
/// snapshot: `exported`, or one exported now.
pub(super) async fn copy_tables(
    set: &Config,
    slave: u32,
    master: &Client,
    tables: Vec<Table>,
    options: &Options,
    exported: Option<&str>,
) -> Result<(), Error> {
    let jobs = options.jobs.max(1);
    let doing = "exporting a snapshot of the master";
    master
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .on_master(doing)?;
    let row = match exported {
        // A slot's exported snapshot: its name comes from the server, never
        // from input (SET TRANSACTION SNAPSHOT takes no parameter).
        Some(name) => {
            master
                .batch_execute(&format!("SET TRANSACTION SNAPSHOT '{name}'"))
                .await
                .on_master("importing the slot's snapshot on the master")?;
            let sql = "SELECT txid_current_snapshot()::text, $1::text";
            master.query_one(sql, &[&name]).await
        }
        None => {
            let sql = "SELECT txid_current_snapshot()::text, pg_export_snapshot()";
            master.query_one(sql, &[]).await
        }
    }
    .on_master(doing)?;
    let (snapshot, exported): (String, String) = (row.get(0), row.get(1));
    tracing::info!(
        "copying {} tables at master snapshot {snapshot}, {jobs} at a time",
        tables.len()
    );
    let progress = Meter::start(tables.iter().map(|t| (t.name.quoted(), t.estimate)));
    let units = work(set, slave, tables, jobs, options.split_pages, &exported).await?;
    let queue = Arc::new(Mutex::new(units));
    let mut workers = Vec::new();
    for _ in 0..jobs {
        let job = Job {
            config: set.clone(),
            slave,
            snapshot: snapshot.clone(),
            exported: exported.clone(),
            queue: queue.clone(),
            progress: progress.clone(),
        };
        workers.push(tokio::spawn(job.run()));
    }
    let mut result = Ok(());
    for w in workers {
        let outcome = w.await.unwrap_or_else(|e| {
            Err(Error::Invalid {
                doing: "copying".into(),
                message: e.to_string(),
            })
        });
        if result.is_ok() {
            result = outcome;
        }
    }
    progress.finish();
    master.batch_execute("COMMIT").await.on_master(doing)?;
    result
}

/// What one job copies at a time.
enum Work {
    /// A whole table, in one slave transaction.
    Table(Table),
    /// Pages `from..to` (`to` open for the last part) of a big table, in one
    /// slave transaction; the table was created or emptied beforehand.
    Part {
        table: Table,
        from: i64,
        to: Option<i64>,
        split: Arc<Split>,
    },
}

/// A table copied in parts: the definition left to create after its rows, and
/// the parts still running. The job that finishes the last part builds the
/// keys and records the copy.
struct Split {
    ddl: Option<Ddl>,
    remaining: AtomicUsize,
}

/// The work units: tables of `split_pages` or more in one part per job
/// (created or emptied on the slave now), the others whole.
async fn work(
    set: &Config,
    slave: u32,
    tables: Vec<Table>,
    jobs: usize,
    split_pages: i64,
    exported: &str,
) -> Result<VecDeque<Work>, Error> {
    let mut queue = VecDeque::new();
    let mut client = None;
    for t in tables {
        let reshaped = set.section(&t.name).is_some_and(|s| s.reshapes());
        if jobs < 2 || t.pages < split_pages || reshaped {
            queue.push_back(Work::Table(t));
            continue;
        }
        let client = match &mut client {
            Some(client) => client,
            None => client.insert(slave::writer(set, slave).await?),
        };
        let tx = client
            .transaction()
            .await
            .on_slave("preparing a table on the slave")?;
        slave::mark_origin(&tx).await?;
        let ddl = prepare(&tx, set, &t.name, exported).await?;
        tx.commit()
            .await
            .on_slave("preparing a table on the slave")?;
        let split = Arc::new(Split {
            ddl,
            remaining: AtomicUsize::new(jobs),
        });
        let step = (t.pages + jobs as i64 - 1) / jobs as i64;
        for i in 0..jobs as i64 {
            queue.push_back(Work::Part {
                table: t.clone(),
                from: i * step,
                to: (i + 1 < jobs as i64).then_some((i + 1) * step),
                split: split.clone(),
            });
        }
    }
    Ok(queue)
}

/// One copying connection pair.
struct Job {
    config: Config,
    slave: u32,
    snapshot: String,
    exported: String,
    queue: Arc<Mutex<VecDeque<Work>>>,
    progress: Meter,
}

impl Job {
    async fn run(self) -> Result<(), Error> {
        let master = db::connect(&self.config.master, self.config.keepalive).await?;
        let node = registry::node(&master).await?;
        let mut pipeline = Pipeline::new(&self.config, self.slave, &node)?;
        let mut slave = slave::writer(&self.config, self.slave).await?;
        // SET TRANSACTION SNAPSHOT takes no parameter; the id comes from the
        // master's pg_export_snapshot(), never from input.
        let doing = "importing the exported snapshot on the master";
        master
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'; {}",
                self.exported,
                SESSION_SQL
            ))
            .await
            .on_master(doing)?;
        loop {
            let next = self.queue.lock().map(|mut q| q.pop_front()).unwrap_or(None);
            let table = match next {
                None => return Ok(()),
                Some(Work::Part {
                    table,
                    from,
                    to,
                    split,
                }) => {
                    self.copy_part(&master, &mut slave, &table, (from, to), &split)
                        .await?;
                    continue;
                }
                Some(Work::Table(table)) => table,
            };
            match self.config.section(&table.name) {
                Some(section) if section.reshapes() => {
                    self.copy_adapted(&master, &mut slave, &table, &mut pipeline)
                        .await?
                }
                _ => self.copy(&master, &mut slave, &table).await?,
            }
        }
    }

    /// Copies one table in one slave transaction that also records the snapshot.
    async fn copy(&self, master: &Client, slave: &mut Client, t: &Table) -> Result<(), Error> {
        let tx = slave
            .transaction()
            .await
            .on_slave("starting the slave's transaction")?;
        slave::mark_origin(&tx).await?;
        let ddl = prepare(&tx, &self.config, &t.name, &self.exported).await?;
        self.stream(master, &tx, t, None).await?;
        self.finish(tx, t, ddl.as_ref()).await
    }

    /// Copies one part of a big table in its own slave transaction; the last
    /// part to end builds the keys and records the copy.
    async fn copy_part(
        &self,
        master: &Client,
        slave: &mut Client,
        t: &Table,
        pages: (i64, Option<i64>),
        split: &Split,
    ) -> Result<(), Error> {
        let doing = format!("copying part of {} on the slave", t.name);
        let tx = slave.transaction().await.on_slave(&doing)?;
        slave::mark_origin(&tx).await?;
        self.stream(master, &tx, t, Some(pages)).await?;
        tx.commit().await.on_slave(&doing)?;
        if split.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
            let tx = slave.transaction().await.on_slave(&doing)?;
            self.finish(tx, t, split.ddl.as_ref()).await?;
        }
        Ok(())
    }

    /// Streams a table's rows (those of pages `from..to` when given) from the
    /// master into the slave's table, in `tx`.
    async fn stream(
        &self,
        master: &Client,
        tx: &tokio_postgres::Transaction<'_>,
        t: &Table,
        pages: Option<(i64, Option<i64>)>,
    ) -> Result<(), Error> {
        let name = t.name.quoted();
        let (columns, binary) = copy_columns(master, tx, &t.name).await?;
        let list = columns.join(", ");
        let format = if binary { "binary" } else { "text" };
        let filter = self
            .config
            .section(&t.name)
            .and_then(|s| s.filter.as_deref());
        let mut source = match filter {
            None => format!("SELECT {list} FROM {name} WHERE true"),
            Some(_) => {
                let list: Vec<String> = columns.iter().map(|c| format!("new.{c}")).collect();
                format!("SELECT {} {}", list.join(", "), filtered(&name, filter))
            }
        };
        if let Some((from, to)) = pages {
            // A TID range scan reads only these pages.
            let ctid = if filter.is_some() { "new.ctid" } else { "ctid" };
            source.push_str(&format!(" AND {ctid} >= '({from},0)'::tid"));
            if let Some(to) = to {
                source.push_str(&format!(" AND {ctid} < '({to},0)'::tid"));
            }
        }
        let out = master
            .copy_out(&format!("COPY ({source}) TO STDOUT (FORMAT {format})"))
            .await
            .on_master(&format!("reading {name} on the master"))?;
        let sink = tx
            .copy_in(&format!(
                "COPY {name} ({list}) FROM STDIN (FORMAT {format})"
            ))
            .await
            .on_slave(&format!("writing {name} on the slave"))?;
        futures_util::pin_mut!(out);
        futures_util::pin_mut!(sink);
        // The master sends a message per row: they go on in pieces of COPY_PIECE.
        let mut rows = RowCounter::new(binary);
        let mut piece = BytesMut::with_capacity(COPY_PIECE);
        let mut ended = false;
        while !ended {
            match out.next().await {
                Some(chunk) => {
                    let chunk = chunk.on_master(&format!("reading {name} on the master"))?;
                    piece.extend_from_slice(&chunk);
                }
                None => ended = true,
            }
            if piece.len() >= COPY_PIECE || (ended && !piece.is_empty()) {
                self.progress
                    .add(&name, rows.count(&piece), piece.len() as u64);
                sink.send(piece.split().freeze())
                    .await
                    .on_slave(&format!("writing {name} on the slave"))?;
            }
        }
        sink.as_mut()
            .finish()
            .await
            .on_slave(&format!("writing {name} on the slave"))?;
        Ok(())
    }

    /// Builds what was left of a created table's definition (keys, indexes),
    /// then records the copy and commits.
    async fn finish(
        &self,
        tx: tokio_postgres::Transaction<'_>,
        t: &Table,
        ddl: Option<&Ddl>,
    ) -> Result<(), Error> {
        let name = t.name.quoted();
        if let Some(ddl) = ddl {
            create(&tx, &t.name, &ddl.after).await?;
            slave::defer(&tx, &self.config.name, &name, &ddl.deferred).await?;
        }
        self.copied(tx, &name).await
    }

    /// Records a table's copy in its slave transaction and commits it.
    async fn copied(&self, tx: tokio_postgres::Transaction<'_>, name: &str) -> Result<(), Error> {
        slave::mark_copied(&tx, &self.config.name, name, &self.snapshot).await?;
        tx.commit()
            .await
            .on_slave(&format!("committing the copy of {name}"))?;
        self.progress.done(name);
        Ok(())
    }

    /// Copies a table whose `[TABLE]` section reshapes its rows: each row of the
    /// snapshot goes the way a logged insert goes (column list, renames,
    /// transform) into the slave's existing table, in one slave transaction.
    async fn copy_adapted(
        &self,
        master: &Client,
        slave: &mut Client,
        t: &Table,
        pipeline: &mut Pipeline,
    ) -> Result<(), Error> {
        let name = t.name.quoted();
        let target = self.config.slave_name(&t.name);
        let row = master
            .query_one(LOGGED_SQL, &[&t.oid])
            .await
            .on_master("reading the master's catalog")?;
        let (columns, keys): (Vec<String>, Vec<String>) = (row.get(0), row.get(1));
        let table = Arc::new(MasterTable {
            name: t.name.clone(),
            key: keys
                .iter()
                .filter_map(|k| columns.iter().position(|c| c == k))
                .collect(),
            columns,
            was: None,
        });
        let tx = slave
            .transaction()
            .await
            .on_slave("starting the slave's transaction")?;
        slave::mark_origin(&tx).await?;
        let exists: bool = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&target.quoted()])
            .await
            .on_slave("reading the slave's catalog")?
            .get(0);
        if !exists {
            return Err(Error::Schema {
                table: target,
                message: format!(
                    "missing on the slave: create it there first (its [TABLE {name}] section \
                     reshapes the rows, so clone does not create it from the master's definition)"
                ),
            });
        }
        slave::empty(&tx, &target.quoted()).await?;
        let list: Vec<String> = table
            .columns
            .iter()
            .map(|c| format!("new.{}", quote_ident(c)))
            .collect();
        let filter = self
            .config
            .section(&t.name)
            .and_then(|s| s.filter.as_deref());
        let sql = format!(
            "SELECT ROW({})::text {}",
            list.join(", "),
            filtered(&name, filter)
        );
        let no_params: [&str; 0] = [];
        let rows = master
            .query_raw(&sql, no_params)
            .await
            .on_master(&format!("reading {name} on the master"))?;
        futures_util::pin_mut!(rows);
        // A copy meets no conflicts: the slave's table was emptied.
        let mut applier = Applier::new(&tx, &mut pipeline.statements, false, None);
        pipeline.adapter.begin();
        while let Some(row) = rows.next().await {
            let text: String = row
                .on_master(&format!("reading {name} on the master"))?
                .get(0);
            self.progress.add(&name, 1, text.len() as u64);
            let fields = record::parse(&text).map_err(|e| Error::Invalid {
                doing: format!("reading {name} on the master"),
                message: e.to_string(),
            })?;
            let event = Event {
                id: 0,
                table: t.oid,
                op: Op::Insert,
                old: None,
                new: Some(fields),
                origin: self.config.origins(self.slave).master,
                time: None,
            };
            replicate::pipe(&mut pipeline.adapter, &mut applier, &table, event).await?;
        }
        applier.finish().await?;
        self.copied(tx, &name).await
    }
}

/// The logged columns of a master table and its key.
const LOGGED_SQL: &str = "
SELECT pgreplica.logged_columns($1::oid), pgreplica.key_columns($1::oid)";

/// `FROM` a master table whose rows pass its `FILTER`, seen as `new` as the
/// capture trigger sees an inserted row (`old` all NULL).
fn filtered(table: &str, filter: Option<&str>) -> String {
    format!(
        "FROM {table} AS new LEFT JOIN {table} AS old ON false WHERE {}",
        filter.map_or("true".to_string(), |f| format!("({f})"))
    )
}

/// The columns to copy (the master's, minus those the slave computes) and
/// whether both sides have the same built-in type for each, so binary COPY is
/// safe.
async fn copy_columns(
    master: &Client,
    slave: &tokio_postgres::Transaction<'_>,
    table: &TableName,
) -> Result<(Vec<String>, bool), Error> {
    let name = table.quoted();
    type Column = (String, Option<String>, bool);
    let read = |rows: Vec<tokio_postgres::Row>| -> Vec<Column> {
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    };
    let on_master = read(
        master
            .query(COLUMNS_SQL, &[&name])
            .await
            .on_master("reading the master's catalog")?,
    );
    let on_slave: HashMap<String, (Option<String>, bool)> = read(
        slave
            .query(COLUMNS_SQL, &[&name])
            .await
            .on_slave("reading the slave's catalog")?,
    )
    .into_iter()
    .map(|(c, t, g)| (c, (t, g)))
    .collect();
    let missing: Vec<&str> = on_master
        .iter()
        .filter(|(c, _, _)| !on_slave.contains_key(c))
        .map(|(c, _, _)| c.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(Error::Schema {
            table: table.clone(),
            message: format!(
                "the slave lacks column(s) {} that the master has",
                missing.join(", ")
            ),
        });
    }
    let copied: Vec<&Column> = on_master
        .iter()
        .filter(|(c, _, _)| !on_slave[c].1)
        .collect();
    let binary = copied
        .iter()
        .all(|(c, t, _)| t.is_some() && on_slave[c].0 == *t);
    Ok((
        copied.iter().map(|(c, _, _)| quote_ident(c)).collect(),
        binary,
    ))
}

/// Counts rows in a COPY stream, text (lines) or binary (tuples).
struct RowCounter {
    binary: bool,
    /// Binary: bytes to skip before the next field or tuple header.
    skip: usize,
    /// Binary: fields left in the current tuple.
    fields: i64,
    /// Binary: partial length word carried over between chunks.
    carry: Vec<u8>,
    header: bool,
}

/// Binary COPY's header: signature, flags, extension length.
const BINARY_HEADER: usize = 11 + 4 + 4;

impl RowCounter {
    fn new(binary: bool) -> RowCounter {
        RowCounter {
            binary,
            skip: 0,
            fields: 0,
            carry: Vec::new(),
            header: binary,
        }
    }

    fn count(&mut self, chunk: &[u8]) -> u64 {
        if !self.binary {
            return chunk.iter().filter(|&&b| b == b'\n').count() as u64;
        }
        let mut rows = 0;
        let mut at = 0;
        if self.header {
            self.skip = BINARY_HEADER;
            self.header = false;
        }
        loop {
            let step = self.skip.min(chunk.len() - at);
            at += step;
            self.skip -= step;
            if self.skip > 0 || at == chunk.len() {
                return rows;
            }
            // A tuple header (int16 field count) or a field length (int32).
            let want = if self.fields == 0 { 2 } else { 4 };
            while self.carry.len() < want && at < chunk.len() {
                self.carry.push(chunk[at]);
                at += 1;
            }
            if self.carry.len() < want {
                return rows;
            }
            if self.fields == 0 {
                let n = i16::from_be_bytes([self.carry[0], self.carry[1]]);
                if n > 0 {
                    rows += 1;
                    self.fields = i64::from(n);
                }
            } else {
                let len = i32::from_be_bytes([
                    self.carry[0],
                    self.carry[1],
                    self.carry[2],
                    self.carry[3],
                ]);
                self.skip = len.max(0) as usize;
                self.fields -= 1;
            }
            self.carry.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_rows_are_counted_across_chunk_boundaries() {
        let mut stream = b"PGCOPY\n\xff\r\n\0".to_vec();
        stream.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        for value in [&b"abc"[..], b"", b"hello world"] {
            stream.extend_from_slice(&2i16.to_be_bytes());
            stream.extend_from_slice(&(value.len() as i32).to_be_bytes());
            stream.extend_from_slice(value);
            stream.extend_from_slice(&(-1i32).to_be_bytes());
        }
        stream.extend_from_slice(&(-1i16).to_be_bytes());
        for size in [1, 2, 3, 7, 1000] {
            let mut counter = RowCounter::new(true);
            let rows: u64 = stream.chunks(size).map(|c| counter.count(c)).sum();
            assert_eq!(rows, 3, "chunks of {size}");
        }
        assert_eq!(RowCounter::new(false).count(b"a\tb\nc\td\n"), 2);
    }
}
