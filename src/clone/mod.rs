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

mod copy;
mod ddl;
mod wal;

use crate::apply::Applier;
use crate::batch::{Ahead, Batch};
use crate::capture;
use crate::config::{Capture, Config};
use crate::db::{self, Prepared, redact};
use crate::error::{Context, Error};
use crate::event::Snapshot;
use crate::hub::Hub;
use crate::ident::TableName;
use crate::replicate::{self, Pipeline};
use crate::{registry, slave};
use std::collections::HashSet;
use tokio_postgres::{Client, Transaction};

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

/// Gives up an interrupted clone of slave `slave`: its hold on the master's
/// log is dropped. Returns the tables still marked as being cloned on the
/// slave, which batches leave alone until a clone copies them again.
pub async fn abandon(set: &Config, slave: u32) -> Result<Vec<String>, Error> {
    let master = db::connect(&set.master, set.keepalive).await?;
    registry::hold(&master, &set.name, slave, false).await?;
    let client = db::connect(&set.slaves[&slave], set.keepalive).await?;
    slave::prepare(&client).await?;
    Ok(slave::cloning(&client, &set.name)
        .await?
        .into_iter()
        .map(|(table, _)| table)
        .collect())
}

/// Clones every slave of `set` (or the one in `options`).
pub async fn clone(set: &Config, options: &Options) -> Result<(), Error> {
    for slave in set.chosen_slaves(options.slave)? {
        match set.capture {
            Capture::Trigger => clone_slave(set, slave, options).await?,
            Capture::Wal => wal::clone_slave(set, slave, options).await?,
        }
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
    slave::prepare(&slave_client).await?;
    let (tables, to_attach) = chosen_tables(&master, &options.tables).await?;
    forget_other_master(set, &master, &slave_client, options).await?;

    // Tables copied by an earlier, interrupted clone are not copied again; the
    // ones it had begun are its own to empty.
    let (done, begun): (Vec<_>, Vec<_>) = slave::cloning(&slave_client, &set.name)
        .await?
        .into_iter()
        .partition(|(_, snapshot)| snapshot.is_some());
    let done: HashSet<String> = done.into_iter().map(|(table, _)| table).collect();
    let begun: HashSet<String> = begun.into_iter().map(|(table, _)| table).collect();
    let todo: Vec<Table> = tables
        .into_iter()
        .filter(|t| !done.contains(&t.name.quoted()))
        .collect();
    if !done.is_empty() {
        tracing::info!("{} tables were copied by an earlier run", done.len());
    }
    claim(set, &mut slave_client, &todo, &begun, options.truncate).await?;
    // Attached only now: the daemon already skips these tables' events.
    if !to_attach.is_empty() {
        for report in capture::install(&mut master, &to_attach, None).await? {
            if let Some(why) = report.skipped {
                return Err(Error::Invalid {
                    doing: format!("attaching capture to {}", report.table),
                    message: why,
                });
            }
            tracing::info!("{}: replicated from now on", report.table);
        }
    }
    capture::configure(&master, set).await?;
    registry::hold(&master, &set.name, slave, true).await?;
    if !todo.is_empty() {
        copy::copy_tables(set, slave, &master, todo, options, None).await?;
    }
    handover(set, slave, master, slave_client).await?;
    Ok(())
}

/// Refuses the `tables` that no earlier clone had `begun` and that hold rows
/// on the slave (unless `truncate`), then marks them all as being cloned:
/// from then on the daemon leaves their events to the clone.
async fn claim(
    set: &Config,
    slave_client: &mut Client,
    tables: &[Table],
    begun: &HashSet<String>,
    truncate: bool,
) -> Result<(), Error> {
    let fresh: Vec<Table> = tables
        .iter()
        .filter(|t| !begun.contains(&t.name.quoted()))
        .cloned()
        .collect();
    refuse_non_empty(set, slave_client, &fresh, truncate).await?;
    mark(slave_client, &set.name, tables).await
}

/// A slave whose progress is of another master (the set was switched over)
/// starts again from the copy of every table; a copy of some tables only
/// would leave the others at a position of another master's log.
async fn forget_other_master(
    set: &Config,
    master: &Client,
    slave_client: &Client,
    options: &Options,
) -> Result<(), Error> {
    let node = registry::node(master).await?;
    let Some(progress) = slave::read_progress(slave_client, &set.name).await? else {
        return Ok(());
    };
    if progress.check_master(&set.name, &node).is_ok() {
        return Ok(());
    }
    if !options.tables.is_empty() {
        return Err(Error::Invalid {
            doing: "cloning the slave".into(),
            message: "its progress is of another master than the set's: clone every table \
                      (without --table, with --truncate)"
                .into(),
        });
    }
    tracing::info!("the slave followed another master: it starts again from this copy");
    slave::forget_progress(slave_client, &set.name).await
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
        .on_master("reading the master's catalog")?
        .get(0);
    let all: Vec<Table> = if installed {
        master
            .query(TABLES_SQL, &[])
            .await
            .on_master("listing the replicated tables")?
            .iter()
            .map(read)
            .collect()
    } else {
        Vec::new()
    };
    if names.is_empty() {
        if all.is_empty() {
            return Err(Error::Invalid {
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
            .on_master(&format!("looking up table {name} on the master"))?
            .ok_or_else(|| Error::Invalid {
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
            .on_slave("reading the slave's catalog")?
            .get(0);
        let sql = format!("SELECT EXISTS (SELECT FROM {name})");
        if exists
            && slave
                .query_one(&sql, &[])
                .await
                .on_slave("looking at the slave's tables")?
                .get::<_, bool>(0)
        {
            full.push(name);
        }
    }
    if full.is_empty() {
        return Ok(());
    }
    Err(Error::Invalid {
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
    let tx = slave.transaction().await.on_slave(doing)?;
    slave::lock_set(&tx, set).await?;
    for t in tables {
        slave::mark_cloning(&tx, set, &t.name.quoted()).await?;
    }
    tx.commit().await.on_slave(doing)
}

/// Adds the foreign keys of the copied `tables` and hands them over to the
/// batches, in the slave's transaction `tx`.
async fn finish(tx: &Transaction<'_>, set: &str, tables: &[&String]) -> Result<(), Error> {
    for table in tables {
        let deferred = slave::deferred(tx, set, table).await?;
        if let Some(sql) = deferred.filter(|s| !s.trim().is_empty()) {
            tx.batch_execute(&sql)
                .await
                .on_slave(&format!("adding the foreign keys of {table} on the slave"))?;
        }
        slave::mark_done(tx, set, table).await?;
    }
    Ok(())
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
    let node = registry::node(&master).await?;
    let mut pipeline = Pipeline::new(set, slave, &node)?;
    // Batches to finish first come through a reader of their own.
    let hub = Hub::start(std::sync::Arc::new(set.clone()), false);
    loop {
        let tx = slave_client.transaction().await.on_slave(doing)?;
        let (progress, _) = slave::lock_set(&tx, &set.name).await?;
        let copied: Vec<(String, Snapshot)> = slave::cloning(&tx, &set.name)
            .await?
            .into_iter()
            .filter_map(|(table, snapshot)| Some((table, Snapshot::parse(&snapshot?)?)))
            .collect();
        // A slave that has no progress yet starts at the latest copy.
        let fresh = progress.is_none();
        let target = match progress {
            // A batch applied in part is finished first.
            Some(p) if p.partial.is_some() => {
                drop(tx);
                replicate::step(
                    &hub,
                    &mut slave_client,
                    &mut pipeline,
                    &set.name,
                    &p.snapshot,
                    false,
                )
                .await?;
                continue;
            }
            Some(p) => p.snapshot,
            None => match copied
                .iter()
                .find(|(_, s)| copied.iter().all(|(_, o)| s.includes(o)))
            {
                Some((_, s)) => s.clone(),
                None => {
                    // Nothing copied and nothing to hand over.
                    drop(tx);
                    return registry::hold(&master, &set.name, slave, false).await;
                }
            },
        };
        if let Some((table, _)) = copied.iter().find(|(_, s)| !target.includes(s)) {
            // The set's progress is older than a copy: bring the other tables up first.
            drop(tx);
            tracing::info!("waiting for the set to pass the copy of {table}");
            replicate::step(
                &hub,
                &mut slave_client,
                &mut pipeline,
                &set.name,
                &target,
                false,
            )
            .await?;
            continue;
        }
        let master_tx = db::read_only(&mut master)
            .await
            .on_master("reading the master's log")?;
        let Pipeline {
            origins,
            resolver,
            adapter,
            statements,
            ..
        } = &mut pipeline;
        let mut applier = Applier::new(&tx, statements, false, resolver.as_ref());
        for (table, since) in &copied {
            let oid: Option<u32> = master_tx
                .query_one("SELECT to_regclass($1)::oid", &[table])
                .await
                .on_master(doing)?
                .get(0);
            let mut prepared = Prepared::default();
            let (tx, to) = (&master_tx, target.clone());
            let mut events = Batch::between(
                tx,
                &mut prepared,
                (since, to),
                0,
                oid,
                origins,
                &Ahead::default(),
            )
            .await?;
            adapter.begin();
            while let Some((t, event)) = events.next().await? {
                replicate::pipe(adapter, &mut applier, &t, event).await?;
            }
        }
        let applied = applier.finish().await?;
        if fresh {
            let whose = (set.name.as_str(), node.as_str());
            slave::write_progress(&tx, whose, &target, None, applied.events).await?;
        }
        drop(master_tx);
        let tables: Vec<&String> = copied.iter().map(|(table, _)| table).collect();
        finish(&tx, &set.name, &tables).await?;
        tx.commit().await.on_slave(doing)?;
        // The registry now protects the log for this slave from its progress on.
        registry::register(&master, &slave_client, set, slave).await?;
        registry::hold(&master, &set.name, slave, false).await?;
        tracing::info!(
            "{} tables handed over to replication at {target} ({} events caught up)",
            copied.len(),
            applied.events
        );
        return Ok(());
    }
}
