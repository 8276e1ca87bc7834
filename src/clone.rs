//! `clone`: brings a slave's tables online from one consistent copy of the master
//! while the master keeps taking writes.
//!
//! 1. The tables to copy are marked on the slave (`pgreplica.cloning`), under the
//!    set's lock: from then on the daemon's batches skip their events.
//! 2. One snapshot of the master is exported; `jobs` connections import it and copy
//!    one table per slave transaction (creating it first when the slave lacks it).
//!    The transaction also records the snapshot the copy reflects, so an
//!    interrupted clone, started again, skips the tables already copied.
//! 3. Handover, under the set's lock: each copied table gets the events logged
//!    between its copy's snapshot and the set's progress, and from then on the
//!    daemon's batches carry it. A slave without progress starts at the copy.
//!
//! A hold in the master's registry keeps the log from being cleaned past the
//! copy until the handover.

use crate::adapt::Adapter;
use crate::apply::{self, Applier, Statements};
use crate::batch::{Batch, Event, MasterTable, Op, Snapshot};
use crate::capture;
use crate::config::Config;
use crate::daemon;
use crate::db::{self, pg_message, redact};
use crate::error::{Context, Error};
use crate::ident::{TableName, quote_ident};
use crate::progress::Progress;
use crate::record;
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio_postgres::Client;

/// What to clone.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Only this slave (`DSN<n>`); default every slave of the set.
    pub slave: Option<u32>,
    /// Tables copied at a time.
    pub jobs: usize,
    /// Tables of at least this many pages are copied in parts, one per job.
    pub split_pages: i64,
    /// Only these tables (`schema.name`); default every replicated table.
    pub tables: Vec<String>,
    /// Empty slave tables that hold rows instead of refusing them.
    pub truncate: bool,
}

/// Bytes of COPY data sent to the slave at a time.
const COPY_PIECE: usize = 256 << 10;

/// A replicated table of the master.
#[derive(Debug, Clone)]
struct Table {
    oid: u32,
    name: TableName,
    /// Estimated rows, for progress.
    estimate: i64,
    /// Its size in pages, to split big tables between jobs.
    pages: i64,
}

const TABLES_SQL: &str = "
SELECT c.oid, n.nspname, c.relname, greatest(c.reltuples, 0)::int8,
       pg_relation_size(c.oid) / current_setting('block_size')::int8
  FROM pgreplica.tables t JOIN pg_class c ON c.oid = t.reloid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 ORDER BY pg_relation_size(c.oid) DESC, n.nspname, c.relname";

const TABLE_SQL: &str = "
SELECT c.oid, n.nspname, c.relname, greatest(c.reltuples, 0)::int8,
       pg_relation_size(c.oid) / current_setting('block_size')::int8
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = to_regclass($1)";

const HOLD_SQL: &str = "
INSERT INTO pgreplica.slave (set_name, slave, dsn, snapshot, state)
VALUES ($1, $2, 'clone in progress', txid_current_snapshot(), 'cloning')
ON CONFLICT (set_name, slave) DO NOTHING";

const UNHOLD_SQL: &str = "DELETE FROM pgreplica.slave WHERE set_name = $1 AND slave = $2";

const COLUMNS_SQL: &str = "
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attgenerated <> ''
  FROM pg_attribute a
 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum";

const MARK_SQL: &str = "
INSERT INTO pgreplica.cloning (set_name, tbl) VALUES ($1, $2) ON CONFLICT DO NOTHING";

const COPIED_SQL: &str = "
UPDATE pgreplica.cloning SET snapshot = $3, copied_at = now() WHERE set_name = $1 AND tbl = $2";

const CLONING_SQL: &str =
    "SELECT tbl, snapshot FROM pgreplica.cloning WHERE set_name = $1 ORDER BY tbl";

const DONE_SQL: &str = "DELETE FROM pgreplica.cloning WHERE set_name = $1 AND tbl = $2";

const CREATED_SQL: &str = "
UPDATE pgreplica.cloning SET after_rows = $3, deferred = $4 WHERE set_name = $1 AND tbl = $2";

const CREATED_READ_SQL: &str =
    "SELECT after_rows, deferred FROM pgreplica.cloning WHERE set_name = $1 AND tbl = $2";

const DEFER_SQL: &str =
    "UPDATE pgreplica.cloning SET deferred = $3 WHERE set_name = $1 AND tbl = $2";

const DEFERRED_SQL: &str =
    "SELECT deferred FROM pgreplica.cloning WHERE set_name = $1 AND tbl = $2";

/// Clones every slave of `set` (or the one in `options`).
pub async fn clone(set: &Config, options: &Options) -> Result<(), Error> {
    let slaves: Vec<u32> = match options.slave {
        Some(n) if set.slaves.contains_key(&n) => vec![n],
        Some(n) => {
            return Err(Error::Query {
                doing: format!("cloning slave {n}"),
                message: format!("{} has no DSN{n}", set.path.display()),
            });
        }
        None => set.slaves.keys().copied().collect(),
    };
    for slave in slaves {
        clone_slave(set, slave, options).await?;
    }
    Ok(())
}

async fn clone_slave(set: &Config, slave: u32, options: &Options) -> Result<(), Error> {
    let dsn = &set.slaves[&slave];
    tracing::info!(
        "cloning {} into slave {slave} ({})",
        redact(&set.master),
        redact(dsn)
    );
    let mut master = db::connect(&set.master, set.keepalive).await?;
    let mut slave_client = db::connect(dsn, set.keepalive).await?;
    apply::prepare_slave(&slave_client).await?;
    let (tables, to_attach) = chosen_tables(&master, &options.tables).await?;

    // Tables copied by an earlier, interrupted clone are not copied again; the
    // ones it had begun are its own to empty.
    let (done, begun): (Vec<_>, Vec<_>) = slave_client
        .query(CLONING_SQL, &[&set.name])
        .await
        .doing("reading the clone's state on the slave")?
        .into_iter()
        .partition(|r| r.get::<_, Option<String>>(1).is_some());
    let done: HashSet<String> = done.iter().map(|r| r.get(0)).collect();
    let begun: HashSet<String> = begun.iter().map(|r| r.get(0)).collect();
    let todo: Vec<Table> = tables
        .into_iter()
        .filter(|t| !done.contains(&t.name.quoted()))
        .collect();
    if !done.is_empty() {
        tracing::info!("{} tables were copied by an earlier run", done.len());
    }
    let fresh: Vec<Table> = todo
        .iter()
        .filter(|t| !begun.contains(&t.name.quoted()))
        .cloned()
        .collect();
    refuse_non_empty(set, &slave_client, &fresh, options.truncate).await?;
    mark(&mut slave_client, &set.name, &todo).await?;
    // Attached only now: the daemon already skips these tables' events.
    if !to_attach.is_empty() {
        for report in capture::install(&mut master, &to_attach, None).await? {
            if let Some(why) = report.skipped {
                return Err(Error::Query {
                    doing: format!("attaching capture to {}", report.table),
                    message: why,
                });
            }
            tracing::info!("{}: replicated from now on", report.table);
        }
    }
    capture::configure(&master, set).await?;
    master
        .execute(HOLD_SQL, &[&set.name, &-(slave as i32)])
        .await
        .doing("keeping the master's log for the clone")?;
    if !todo.is_empty() {
        copy_tables(set, slave, &master, todo, options).await?;
    }
    handover(set, slave, master, slave_client).await?;
    Ok(())
}

/// The tables to clone: every replicated table, or those named; the named ones
/// not replicated yet are returned apart, to be attached once marked.
async fn chosen_tables(
    master: &Client,
    names: &[String],
) -> Result<(Vec<Table>, Vec<String>), Error> {
    let read = |r: &tokio_postgres::Row| Table {
        oid: r.get(0),
        name: TableName {
            schema: r.get(1),
            name: r.get(2),
        },
        estimate: r.get(3),
        pages: r.get(4),
    };
    let installed: bool = master
        .query_one("SELECT to_regclass('pgreplica.tables') IS NOT NULL", &[])
        .await
        .doing("reading the master's catalog")?
        .get(0);
    let all: Vec<Table> = if installed {
        master
            .query(TABLES_SQL, &[])
            .await
            .doing("listing the replicated tables")?
            .iter()
            .map(read)
            .collect()
    } else {
        Vec::new()
    };
    if names.is_empty() {
        if all.is_empty() {
            return Err(Error::Query {
                doing: "cloning".into(),
                message: "the master replicates no table: run pgreplica install first".into(),
            });
        }
        return Ok((all, Vec::new()));
    }
    let (mut chosen, mut to_attach) = (Vec::new(), Vec::new());
    for name in names {
        let row = master
            .query_opt(TABLE_SQL, &[name])
            .await
            .doing(&format!("looking up table {name} on the master"))?
            .ok_or_else(|| Error::Query {
                doing: format!("cloning table {name}"),
                message: "no such table on the master".into(),
            })?;
        let table = read(&row);
        if !all.iter().any(|t| t.oid == table.oid) {
            to_attach.push(table.name.quoted());
        }
        chosen.push(table);
    }
    Ok((chosen, to_attach))
}

async fn refuse_non_empty(
    set: &Config,
    slave: &Client,
    tables: &[Table],
    truncate: bool,
) -> Result<(), Error> {
    if truncate {
        return Ok(());
    }
    let mut full = Vec::new();
    for t in tables {
        let name = set.slave_name(&t.name).quoted();
        let exists: bool = slave
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
            .await
            .doing("reading the slave's catalog")?
            .get(0);
        let sql = format!("SELECT EXISTS (SELECT FROM ONLY {name})");
        if exists
            && slave
                .query_one(&sql, &[])
                .await
                .doing("looking at the slave's tables")?
                .get::<_, bool>(0)
        {
            full.push(name);
        }
    }
    if full.is_empty() {
        return Ok(());
    }
    Err(Error::Query {
        doing: "cloning".into(),
        message: format!(
            "the slave's table(s) {} already hold rows: empty them, or give --truncate \
             to have clone empty them",
            full.join(", ")
        ),
    })
}

/// Marks the tables as being cloned, under the set's lock, so that no batch in
/// flight applies to them once the copy starts.
async fn mark(slave: &mut Client, set: &str, tables: &[Table]) -> Result<(), Error> {
    let doing = "marking the tables to clone on the slave";
    let tx = slave.transaction().await.doing(doing)?;
    apply::lock_set(&tx, set).await?;
    for t in tables {
        tx.execute(MARK_SQL, &[&set, &t.name.quoted()])
            .await
            .doing(doing)?;
    }
    tx.commit().await.doing(doing)
}

/// Copies `tables` over `jobs` connection pairs that share one exported snapshot.
async fn copy_tables(
    set: &Config,
    slave: u32,
    master: &Client,
    tables: Vec<Table>,
    options: &Options,
) -> Result<(), Error> {
    let jobs = options.jobs.max(1);
    let doing = "exporting a snapshot of the master";
    master
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .doing(doing)?;
    let row = master
        .query_one(
            "SELECT txid_current_snapshot()::text, pg_export_snapshot()",
            &[],
        )
        .await
        .doing(doing)?;
    let (snapshot, exported): (String, String) = (row.get(0), row.get(1));
    tracing::info!(
        "copying {} tables at master snapshot {snapshot}, {jobs} at a time",
        tables.len()
    );
    let progress = Progress::start(tables.iter().map(|t| (t.name.quoted(), t.estimate)));
    let units = work(set, slave, tables, jobs, options.split_pages).await?;
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
            Err(Error::Query {
                doing: "copying".into(),
                message: e.to_string(),
            })
        });
        if result.is_ok() {
            result = outcome;
        }
    }
    progress.finish();
    master.batch_execute("COMMIT").await.doing(doing)?;
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
            None => client.insert(slave_session(set, slave).await?),
        };
        let tx = client
            .transaction()
            .await
            .doing("preparing a table on the slave")?;
        let ddl = prepare(&tx, set, &t.name).await?;
        tx.commit().await.doing("preparing a table on the slave")?;
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

/// A connection to the slave for copying. On a node that captures too
/// (multi-master), what the copy writes is logged with the master's node as
/// its origin, so that it never goes back there (nor does the emptying of a
/// table).
async fn slave_session(set: &Config, slave: u32) -> Result<Client, Error> {
    let client = db::connect(&set.slaves[&slave], None).await?;
    let doing = "setting up the slave session";
    client
        .batch_execute(apply::SESSION_SQL)
        .await
        .doing(doing)?;
    if let Some(origin) = set.origins(slave).master {
        client
            .execute(
                "SELECT set_config('pgreplica.origin', $1, false)",
                &[&origin],
            )
            .await
            .doing(doing)?;
    }
    Ok(client)
}

/// Empties the slave's table, or creates it without its keys and indexes;
/// returns what is left of the definition of a table the clone created (now,
/// or in an interrupted run), to be built after the rows.
async fn prepare(
    tx: &tokio_postgres::Transaction<'_>,
    set: &Config,
    table: &TableName,
) -> Result<Option<Ddl>, Error> {
    let name = table.quoted();
    let doing = "reading the slave's catalog";
    let exists: bool = tx
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .await
        .doing(doing)?
        .get(0);
    if exists {
        tx.batch_execute(&format!("TRUNCATE ONLY {name}"))
            .await
            .doing(&format!("emptying {name} on the slave"))?;
        let row = tx
            .query_opt(CREATED_READ_SQL, &[&set.name, &name])
            .await
            .doing(doing)?;
        return Ok(row.and_then(|r| {
            Some(Ddl {
                before: String::new(),
                after: r.get::<_, Option<String>>(0)?,
                deferred: r.get::<_, Option<String>>(1).unwrap_or_default(),
            })
        }));
    }
    let ddl = table_ddl(&set.master, table)?;
    create(tx, table, &ddl.before).await?;
    tx.execute(CREATED_SQL, &[&set.name, &name, &ddl.after, &ddl.deferred])
        .await
        .doing("recording the created table on the slave")?;
    Ok(Some(ddl))
}

/// Runs part of a table's definition from the master on the slave.
async fn create(
    tx: &tokio_postgres::Transaction<'_>,
    table: &TableName,
    sql: &str,
) -> Result<(), Error> {
    tx.batch_execute(sql).await.map_err(|e| Error::Schema {
        table: table.clone(),
        message: format!(
            "creating it on the slave from the master's definition failed: {} \
             (create the types and schemas it needs on the slave first)",
            pg_message(&e)
        ),
    })?;
    tx.batch_execute(apply::SESSION_SQL)
        .await
        .doing("setting up the slave session")
}

/// One copying connection pair.
struct Job {
    config: Config,
    slave: u32,
    snapshot: String,
    exported: String,
    queue: Arc<Mutex<VecDeque<Work>>>,
    progress: Progress,
}

impl Job {
    async fn run(self) -> Result<(), Error> {
        let master = db::connect(&self.config.master, None).await?;
        let mut adapter = Adapter::new(&self.config, self.slave)?;
        let mut slave = slave_session(&self.config, self.slave).await?;
        // SET TRANSACTION SNAPSHOT takes no parameter; the id comes from the
        // master's pg_export_snapshot(), never from input.
        let doing = "importing the exported snapshot on the master";
        master
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'; {}",
                self.exported,
                apply::SESSION_SQL
            ))
            .await
            .doing(doing)?;
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
                    self.copy_adapted(&master, &mut slave, &table, &mut adapter)
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
            .doing("starting the slave's transaction")?;
        let ddl = prepare(&tx, &self.config, &t.name).await?;
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
        let tx = slave.transaction().await.doing(&doing)?;
        self.stream(master, &tx, t, Some(pages)).await?;
        tx.commit().await.doing(&doing)?;
        if split.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
            let tx = slave.transaction().await.doing(&doing)?;
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
            None => format!("SELECT {list} FROM ONLY {name} WHERE true"),
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
            .doing(&format!("reading {name} on the master"))?;
        let sink = tx
            .copy_in(&format!(
                "COPY {name} ({list}) FROM STDIN (FORMAT {format})"
            ))
            .await
            .doing(&format!("writing {name} on the slave"))?;
        futures_util::pin_mut!(out);
        futures_util::pin_mut!(sink);
        // The master sends a message per row: they go on in pieces of COPY_PIECE.
        let mut rows = RowCounter::new(binary);
        let mut piece = BytesMut::with_capacity(COPY_PIECE);
        let mut ended = false;
        while !ended {
            match out.next().await {
                Some(chunk) => {
                    let chunk = chunk.doing(&format!("reading {name} on the master"))?;
                    piece.extend_from_slice(&chunk);
                }
                None => ended = true,
            }
            if piece.len() >= COPY_PIECE || (ended && !piece.is_empty()) {
                self.progress
                    .add(&name, rows.count(&piece), piece.len() as u64);
                sink.send(piece.split().freeze())
                    .await
                    .doing(&format!("writing {name} on the slave"))?;
            }
        }
        sink.as_mut()
            .finish()
            .await
            .doing(&format!("writing {name} on the slave"))?;
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
            tx.execute(DEFER_SQL, &[&self.config.name, &name, &ddl.deferred])
                .await
                .doing("recording the copy on the slave")?;
        }
        self.copied(tx, &name).await
    }

    /// Records a table's copy in its slave transaction and commits it.
    async fn copied(&self, tx: tokio_postgres::Transaction<'_>, name: &str) -> Result<(), Error> {
        tx.execute(COPIED_SQL, &[&self.config.name, &name, &self.snapshot])
            .await
            .doing("recording the copy on the slave")?;
        tx.commit()
            .await
            .doing(&format!("committing the copy of {name}"))?;
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
        adapter: &mut Adapter,
    ) -> Result<(), Error> {
        let name = t.name.quoted();
        let target = self.config.slave_name(&t.name);
        let row = master
            .query_one(LOGGED_SQL, &[&t.oid])
            .await
            .doing("reading the master's catalog")?;
        let (columns, keys): (Vec<String>, Vec<String>) = (row.get(0), row.get(1));
        let table = Arc::new(MasterTable {
            name: t.name.clone(),
            key: keys
                .iter()
                .filter_map(|k| columns.iter().position(|c| c == k))
                .collect(),
            columns,
        });
        let tx = slave
            .transaction()
            .await
            .doing("starting the slave's transaction")?;
        let exists: bool = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&target.quoted()])
            .await
            .doing("reading the slave's catalog")?
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
        tx.batch_execute(&format!("TRUNCATE ONLY {target}"))
            .await
            .doing(&format!("emptying {target} on the slave"))?;
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
            .doing(&format!("reading {name} on the master"))?;
        futures_util::pin_mut!(rows);
        let mut statements = Statements::default();
        // A copy meets no conflicts: the slave's table was emptied.
        let mut applier = Applier::new(&tx, &mut statements, false, None);
        let mut adapted = Vec::new();
        adapter.begin();
        while let Some(row) = rows.next().await {
            let text: String = row.doing(&format!("reading {name} on the master"))?.get(0);
            self.progress.add(&name, 1, text.len() as u64);
            let fields = record::parse(&text).map_err(|e| Error::Query {
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
            adapter.adapt(&table, event, &mut adapted)?;
            for (table, event) in adapted.drain(..) {
                applier.apply(&table, event).await?;
            }
        }
        applier.finish(None).await?;
        self.copied(tx, &name).await
    }
}

/// The logged columns of a master table and its key.
const LOGGED_SQL: &str = "
SELECT pgreplica.logged_columns($1::oid),
       ARRAY(SELECT a.attname::text FROM pg_index i JOIN pg_attribute a
                 ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
              WHERE i.indrelid = $1::oid AND i.indisprimary
              ORDER BY array_position(i.indkey::int2[], a.attnum))";

/// `FROM` a master table whose rows pass its `FILTER`, seen as `new` as the
/// capture trigger sees an inserted row (`old` all NULL).
fn filtered(table: &str, filter: Option<&str>) -> String {
    format!(
        "FROM ONLY {table} AS new LEFT JOIN ONLY {table} AS old ON false WHERE {}",
        filter.map_or("true".to_string(), |f| format!("({f})"))
    )
}

/// The columns to copy (the master's, minus those the slave computes) and
/// whether both sides have the same type for each, so binary COPY is safe.
async fn copy_columns(
    master: &Client,
    slave: &tokio_postgres::Transaction<'_>,
    table: &TableName,
) -> Result<(Vec<String>, bool), Error> {
    let name = table.quoted();
    let read = |rows: Vec<tokio_postgres::Row>| -> Vec<(String, String, bool)> {
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    };
    let on_master = read(
        master
            .query(COLUMNS_SQL, &[&name])
            .await
            .doing("reading the master's catalog")?,
    );
    let on_slave: HashMap<String, (String, bool)> = read(
        slave
            .query(COLUMNS_SQL, &[&name])
            .await
            .doing("reading the slave's catalog")?,
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
    let copied: Vec<&(String, String, bool)> = on_master
        .iter()
        .filter(|(c, _, _)| !on_slave[c].1)
        .collect();
    let binary = copied.iter().all(|(c, t, _)| on_slave[c].0 == *t);
    Ok((
        copied.iter().map(|(c, _, _)| quote_ident(c)).collect(),
        binary,
    ))
}

/// A table's definition from `pg_dump --schema-only`, split as `pg_restore`
/// does: the table before its rows, its keys and indexes after them (building an
/// index once is faster than maintaining it row by row), and its foreign keys
/// at the handover, when the tables they reference are there.
struct Ddl {
    before: String,
    after: String,
    deferred: String,
}

fn table_ddl(master_dsn: &str, table: &TableName) -> Result<Ddl, Error> {
    let doing = format!("reading {table}'s definition with pg_dump");
    let pg_dump = crate::cluster::find_bin()
        .map(|b| b.join("pg_dump"))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| "pg_dump".into());
    let out = std::process::Command::new(&pg_dump)
        .args(["--schema-only", "--no-owner", "--no-privileges", "--table"])
        .arg(table.quoted())
        .arg("--dbname")
        .arg(master_dsn)
        .output()
        .map_err(|e| Error::Query {
            doing: doing.clone(),
            message: format!(
                "cannot run {}: {e}. The slave lacks this table; install PostgreSQL's client \
                 programs (apt-get install -y postgresql-client) or create the table on the slave",
                pg_dump.display()
            ),
        })?;
    if !out.status.success() {
        return Err(Error::Query {
            doing,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(split_dump(
        &table.schema,
        &String::from_utf8_lossy(&out.stdout),
    ))
}

/// Splits `pg_dump` output at its `-- Name: …; Type: …;` headers: drops
/// pgreplica's own capture triggers and psql meta-commands.
fn split_dump(schema: &str, dump: &str) -> Ddl {
    let mut ddl = Ddl {
        before: format!("CREATE SCHEMA IF NOT EXISTS {};\n", quote_ident(schema)),
        after: String::new(),
        deferred: String::new(),
    };
    let mut target = &mut ddl.before;
    let mut skip = false;
    for line in dump.lines() {
        if let Some(header) = line.strip_prefix("-- Name: ") {
            let kind = header
                .split("; Type: ")
                .nth(1)
                .and_then(|rest| rest.split(';').next())
                .unwrap_or("");
            let object = header.split(';').next().unwrap_or("");
            skip = kind == "TRIGGER"
                && object
                    .split_whitespace()
                    .any(|w| w.starts_with("pgreplica_"));
            target = match kind {
                "FK CONSTRAINT" => &mut ddl.deferred,
                "CONSTRAINT" | "INDEX" | "TRIGGER" | "RULE" => &mut ddl.after,
                _ => &mut ddl.before,
            };
            continue;
        }
        if skip || line.starts_with('\\') || line.starts_with("--") {
            continue;
        }
        target.push_str(line);
        target.push('\n');
    }
    ddl
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

/// Hands the copied tables over to the batches: each gets the events logged
/// between its copy and the set's progress, under the set's lock.
async fn handover(
    set: &Config,
    slave: u32,
    mut master: Client,
    mut slave_client: Client,
) -> Result<(), Error> {
    let doing = "handing the copied tables over to replication";
    let mut statements = Statements::default();
    let mut adapter = Adapter::new(set, slave)?;
    let mut adapted = Vec::new();
    loop {
        let tx = slave_client.transaction().await.doing(doing)?;
        let (progress, _) = apply::lock_set(&tx, &set.name).await?;
        let copied: Vec<(String, Snapshot)> = tx
            .query(CLONING_SQL, &[&set.name])
            .await
            .doing(doing)?
            .iter()
            .filter_map(|r| {
                let snapshot: Option<String> = r.get(1);
                Some((r.get(0), Snapshot::parse(&snapshot?)?))
            })
            .collect();
        // A slave that has no progress yet starts at the latest copy.
        let fresh = progress.is_none();
        let target = match progress {
            Some(p) => p,
            None => match copied
                .iter()
                .find(|(_, s)| copied.iter().all(|(_, o)| s.includes(o)))
            {
                Some((_, s)) => s.clone(),
                None => {
                    // Nothing copied and nothing to hand over.
                    drop(tx);
                    return release_hold(&master, set, slave).await;
                }
            },
        };
        if let Some((table, _)) = copied.iter().find(|(_, s)| !target.includes(s)) {
            // The set's progress is older than a copy: bring the other tables up first.
            drop(tx);
            tracing::info!("waiting for the set to pass the copy of {table}");
            daemon::apply_batch(
                &mut master,
                &mut slave_client,
                &mut statements,
                &mut adapter,
                &set.name,
                &target,
                false,
            )
            .await?;
            continue;
        }
        let master_tx = db::read_snapshot(&mut master, "reading the master's log").await?;
        let resolver = adapter.resolver.clone();
        let mut applier = Applier::new(&tx, &mut statements, false, resolver.as_ref());
        for (table, since) in &copied {
            let oid: Option<u32> = master_tx
                .query_one("SELECT to_regclass($1)::oid", &[table])
                .await
                .doing(doing)?
                .get(0);
            let mut events =
                Batch::between(&master_tx, since, target.clone(), oid, &adapter.origins).await?;
            adapter.begin();
            while let Some((t, event)) = events.next().await? {
                adapter.adapt(&t, event, &mut adapted)?;
                for (t, event) in adapted.drain(..) {
                    applier.apply(&t, event).await?;
                }
            }
        }
        let applied = applier
            .finish(fresh.then_some((set.name.as_str(), &target)))
            .await?;
        drop(master_tx);
        for (table, _) in &copied {
            let deferred: Option<String> = tx
                .query_one(DEFERRED_SQL, &[&set.name, table])
                .await
                .doing(doing)?
                .get(0);
            if let Some(sql) = deferred.filter(|s| !s.trim().is_empty()) {
                tx.batch_execute(&sql)
                    .await
                    .doing(&format!("adding the foreign keys of {table} on the slave"))?;
            }
            tx.execute(DONE_SQL, &[&set.name, table])
                .await
                .doing(doing)?;
        }
        tx.commit().await.doing(doing)?;
        // The registry now protects the log for this slave from its progress on.
        daemon::register(&master, &slave_client, set, slave).await?;
        release_hold(&master, set, slave).await?;
        tracing::info!(
            "{} tables handed over to replication at {target} ({} events caught up)",
            copied.len(),
            applied.events
        );
        return Ok(());
    }
}

async fn release_hold(master: &Client, set: &Config, slave: u32) -> Result<(), Error> {
    master
        .execute(UNHOLD_SQL, &[&set.name, &-(slave as i32)])
        .await
        .doing("releasing the clone's hold on the master's log")
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_keeps_the_table_drops_capture_triggers_and_defers_foreign_keys() {
        let dump = "\\restrict abc\nSET x = 1;\n\
            -- Name: t; Type: TABLE; Schema: s; Owner: -\n\nCREATE TABLE s.t (id int);\n\
            -- Name: t t_pkey; Type: CONSTRAINT; Schema: s; Owner: -\n\nALTER TABLE ONLY s.t ADD CONSTRAINT t_pkey PRIMARY KEY (id);\n\
            -- Name: t pgreplica_insert; Type: TRIGGER; Schema: s; Owner: -\n\nCREATE TRIGGER pgreplica_insert AFTER INSERT ON s.t;\n\
            -- Name: t t_fk; Type: FK CONSTRAINT; Schema: s; Owner: -\n\nALTER TABLE ONLY s.t ADD CONSTRAINT t_fk FOREIGN KEY (id) REFERENCES s.u(id);\n\
            \\unrestrict abc\n";
        let ddl = split_dump("s", dump);
        assert!(ddl.before.contains("CREATE SCHEMA IF NOT EXISTS \"s\";"));
        assert!(ddl.before.contains("CREATE TABLE s.t (id int);"));
        assert!(!ddl.before.contains("PRIMARY KEY"));
        assert!(ddl.after.contains("PRIMARY KEY (id)"));
        let all = format!("{}{}", ddl.before, ddl.after);
        assert!(!all.contains("pgreplica_insert"));
        assert!(!all.contains("restrict"));
        assert!(!all.contains("FOREIGN KEY"));
        assert!(ddl.deferred.contains("FOREIGN KEY"));
    }

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
