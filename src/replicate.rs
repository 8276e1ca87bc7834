//! One replication step: open the batch that follows a slave's progress, adapt
//! its events, apply them with the new progress in one slave transaction.

use crate::adapt::Adapter;
use crate::apply::{Applied, Applier, Statements};
use crate::batch::{Batch, current_snapshot};
use crate::config::Config;
use crate::conflict::Resolver;
use crate::db;
use crate::error::{Context, Error};
use crate::event::{Event, MasterTable, Origins, Snapshot};
use crate::{registry, sequence, slave};
use std::sync::Arc;
use tokio_postgres::Client;

/// One slave's way from its master's log: the origins it takes, how rows are
/// adapted, how conflicts are settled, and its prepared statements.
pub struct Pipeline {
    /// The events the slave takes, by origin.
    pub origins: Origins,
    /// How the slave settles conflicts, when the set says.
    pub resolver: Option<Resolver>,
    /// Renames and transforms of the set's `[TABLE]` sections.
    pub adapter: Adapter,
    /// Statements prepared on the slave connection.
    pub statements: Statements,
    /// Events and bytes of row data after which a batch is cut into steps.
    pub limit: (u64, usize),
}

/// What one step did.
#[derive(Debug)]
pub struct Step {
    /// Where the slave now is: the end of the last batch applied whole.
    pub at: Snapshot,
    /// What was applied.
    pub applied: Applied,
    /// The batch was cut here: more of it is waiting.
    pub more: bool,
}

impl Pipeline {
    /// The pipeline of slave `slave` of `set`; loads its transform scripts.
    pub fn new(set: &Config, slave: u32) -> Result<Pipeline, Error> {
        Ok(Pipeline {
            origins: set.origins(slave),
            resolver: Resolver::new(set, slave),
            adapter: Adapter::new(set)?,
            statements: Statements::default(),
            limit: (set.batch_events, set.batch_bytes),
        })
    }
}

/// Adapts one event and applies what it becomes on the slave.
pub async fn pipe(
    adapter: &mut Adapter,
    applier: &mut Applier<'_>,
    table: &Arc<MasterTable>,
    event: Event,
) -> Result<(), Error> {
    // A transform script runs off the async workers: a slow one must not
    // stall the other sets' tasks.
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    let adapted = match adapter.runs_scripts() && multi_thread {
        true => tokio::task::block_in_place(|| adapter.adapt(table, event))?,
        false => adapter.adapt(table, event)?,
    };
    for (table, event) in adapted {
        applier.apply(&table, event).await?;
    }
    Ok(())
}

/// Registers the slave on the master and returns where it resumes. The slave's
/// own progress row is the truth; the master's copy only protects the log from
/// being cleaned past this slave.
pub async fn register(
    master: &Client,
    slave_client: &Client,
    set: &Config,
    slave: u32,
) -> Result<Snapshot, Error> {
    let progress = slave::read_progress(slave_client, &set.name)
        .await?
        .map(|p| p.snapshot);
    let start = progress.clone().unwrap_or_else(Snapshot::start);
    let dsn = &set.slaves[&slave];
    let registered = registry::enter(master, &set.name, slave, dsn, &start).await?;
    match progress {
        Some(progress) => {
            if let Some(below) = registry::cleaned_below(master).await?
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
            registry::sync(master, &set.name, slave, &progress).await?;
            Ok(progress)
        }
        None => Ok(registered),
    }
}

/// Applies the batch that follows the slave's progress (or `prev`, where the
/// slave has none yet), if anything committed since, with the slave's new
/// progress in the same transaction. A batch of more than the pipeline's limit
/// is applied in steps, each starting after the last event of the one before:
/// a slave that was away for long catches up with bounded transactions.
pub async fn step(
    master: &mut Client,
    slave_client: &mut Client,
    pipeline: &mut Pipeline,
    set: &str,
    prev: &Snapshot,
    exact: bool,
) -> Result<Step, Error> {
    let slave_tx = slave_client
        .transaction()
        .await
        .on_slave("starting the slave's transaction")?;
    let (progress, cloning) = slave::lock_set(&slave_tx, set).await?;
    let (prev, partial) = match progress {
        Some(p) => (p.snapshot, p.partial),
        None => (prev.clone(), None),
    };
    let master_tx = db::read_only(master)
        .await
        .on_master("starting a read on the master")?;
    let (target, after) = match partial {
        Some((target, upto)) => (target, upto),
        None => {
            let now = current_snapshot(&master_tx).await?;
            if prev.same_as(&now) {
                let applied = Applied::default();
                return Ok(Step {
                    at: prev,
                    applied,
                    more: false,
                });
            }
            (now, 0)
        }
    };
    let origins = &pipeline.origins;
    let mut batch = Batch::between(&master_tx, &prev, target.clone(), after, None, origins).await?;
    batch.skip(cloning.clone());
    let resolver = pipeline.resolver.as_ref();
    let mut applier = Applier::new(&slave_tx, &mut pipeline.statements, exact, resolver);
    pipeline.adapter.begin();
    let (mut events, mut bytes, mut last, mut cut) = (0, 0, after, false);
    while let Some((table, event)) = batch.next().await? {
        (events, bytes, last) = (events + 1, bytes + event.size(), event.id);
        if !cloning.contains(&table.name.quoted()) {
            pipe(&mut pipeline.adapter, &mut applier, &table, event).await?;
        }
        if events >= pipeline.limit.0 || bytes >= pipeline.limit.1 {
            cut = true;
            break;
        }
    }
    drop(batch);
    let applied = applier.finish().await?;
    let step = match cut {
        true => {
            let partial = Some((&target, last));
            slave::write_progress(&slave_tx, set, &prev, partial, applied.events).await?;
            Step {
                at: prev,
                applied,
                more: true,
            }
        }
        false => {
            slave::write_progress(&slave_tx, set, &target, None, applied.events).await?;
            // Multi-master nodes keep disjoint ranges instead.
            if pipeline.origins.master.is_none() && applied.events > 0 {
                sequence::carry(&master_tx, &slave_tx).await?;
            }
            Step {
                at: target,
                applied,
                more: false,
            }
        }
    };
    slave_tx
        .commit()
        .await
        .on_slave("committing the batch on the slave")?;
    Ok(step)
}
