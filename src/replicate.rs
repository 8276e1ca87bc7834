//! One replication step: open the batch that follows a slave's progress, adapt
//! its events, apply them with the new progress in one slave transaction.

use crate::adapt::Adapter;
use crate::apply::{Applied, Applier, Statements};
use crate::config::Config;
use crate::conflict::Resolver;
use crate::error::{Context, Error};
use crate::event::{Event, MasterTable, Origins, Snapshot};
use crate::hub::{Ask, Hub};
use crate::pgoutput::Lsn;
use crate::wal::{self, read};
use crate::{sequence, slave};
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

/// Applies the batch that follows the slave's progress (or `prev`, where the
/// slave has none yet), if anything committed since, with the slave's new
/// progress in the same transaction. The batch comes from `hub` in pieces,
/// shared with the other slaves at the same position. A batch of more than the
/// pipeline's limit is applied in steps, each starting after the last event of
/// the one before: a slave that was away for long catches up with bounded
/// transactions.
pub async fn step(
    hub: &Hub,
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
    let (mut target, mut last) = match partial {
        Some((target, upto)) => (Some(target), upto),
        None => (None, 0),
    };
    let resolver = pipeline.resolver.as_ref();
    let mut applier = Applier::new(&slave_tx, &mut pipeline.statements, exact, resolver);
    pipeline.adapter.begin();
    let own = pipeline.origins.slave.clone();
    let (mut events, mut bytes, mut cut) = (0, 0, false);
    let piece = loop {
        let ask = Ask {
            prev: prev.clone(),
            target: target.clone(),
            after: last,
            skip: cloning.iter().cloned().collect(),
            sequences: pipeline.origins.master.is_none(),
        };
        let piece = hub.read(ask).await?;
        if target.is_none() && piece.target.same_as(&prev) {
            return Ok(Step {
                at: prev,
                applied: Applied::default(),
                more: false,
            });
        }
        target = Some(piece.target.clone());
        let mut rest = piece.events.iter().peekable();
        while let Some((table, event)) = rest.next() {
            (events, bytes, last) = (events + 1, bytes + event.size(), event.id);
            // Changes that came from this slave's own node never go back.
            let returning = own.is_some() && event.origin == own;
            if !cloning.contains(&table.name.quoted()) && !returning {
                pipe(&mut pipeline.adapter, &mut applier, table, event.clone()).await?;
            }
            let full = events >= pipeline.limit.0 || bytes >= pipeline.limit.1;
            if full && (rest.peek().is_some() || !piece.done) {
                cut = true;
                break;
            }
        }
        if cut || piece.done {
            break piece;
        }
    };
    let applied = applier.finish().await?;
    let target = piece.target.clone();
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
            if let Some(sequences) = &piece.sequences
                && applied.events > 0
            {
                sequence::raise(&slave_tx, sequences).await?;
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

/// WAL that a slot may keep for an idle set before the slave records the
/// master's position (and the slot lets it go): one segment.
const IDLE_RELEASE: u64 = 16 << 20;

/// What one round from a slot did.
#[derive(Debug)]
pub struct WalStep {
    /// Where the slave now is in the master's WAL.
    pub at: Lsn,
    /// The master's snapshot when the round began, for the registry.
    pub snapshot: Snapshot,
    /// The master's WAL position the round read up to.
    pub seen: Lsn,
    /// What was applied.
    pub applied: Applied,
    /// The round stopped at its limit: more is waiting.
    pub more: bool,
}

/// Applies what slave `slave`'s slot holds past the slave's progress (`CAPTURE
/// = wal`): whole transactions in commit order, in slave transactions of up to
/// the pipeline's limit, each with the position its last transaction ends at;
/// then the slot lets go of the WAL up to there. A crash between a slave's
/// commit and the slot's advance loses nothing and applies nothing twice: the
/// transactions at or below the slave's position are skipped when read again.
pub async fn wal_step(
    master: &Client,
    set: &Config,
    slave: u32,
    slave_client: &mut Client,
    pipeline: &mut Pipeline,
    exact: bool,
) -> Result<WalStep, Error> {
    let head = read::head(master).await?;
    let confirmed = wal::confirmed(master, set, slave).await?;
    let progress = slave::read_progress(&*slave_client, &set.name).await?;
    let from = match progress {
        None => confirmed,
        Some(slave::Progress { lsn: Some(lsn), .. }) if lsn >= confirmed => lsn,
        Some(slave::Progress { lsn, .. }) => {
            let at = lsn.map_or("a position in the log of trigger capture".into(), |l| {
                l.to_string()
            });
            return Err(Error::Invalid {
                doing: "resuming the slave".into(),
                message: format!(
                    "its progress ({at}) is older than its replication slot on the master \
                     ({confirmed}): it was restored from a backup, lost its last commits, or \
                     replicated with CAPTURE = trigger, and the changes in between are not in \
                     the WAL any more. Nothing is applied; copy it again with pgreplica clone {} \
                     --slave {slave} --truncate",
                    set.path.display()
                ),
            });
        }
    };
    let mut step = WalStep {
        at: from,
        snapshot: head.snapshot,
        seen: head.flush,
        applied: Applied::default(),
        more: false,
    };
    if head.flush <= from {
        return Ok(step);
    }
    let sequences = match pipeline.origins.master.is_none() {
        true => Some(sequence::read(master).await?),
        false => None,
    };
    let slot = wal::slot_name(&set.name, slave);
    let mut changes = read::Changes::start(master, &slot, head.flush, pipeline.limit.0).await?;
    let mut ended = false;
    while !ended {
        let slave_tx = slave_client
            .transaction()
            .await
            .on_slave("starting the slave's transaction")?;
        slave::lock_set(&slave_tx, &set.name).await?;
        let resolver = pipeline.resolver.as_ref();
        let mut applier = Applier::new(&slave_tx, &mut pipeline.statements, exact, resolver);
        pipeline.adapter.begin();
        let (mut at, mut events, mut bytes) = (step.at, 0, 0);
        let mut skipping = false;
        loop {
            let Some(item) = changes.next().await? else {
                ended = true;
                break;
            };
            match item {
                // Applied before the slot was last advanced.
                read::Item::Begin { commit } => skipping = commit < step.at,
                read::Item::Change(..) if skipping => {}
                read::Item::Change(table, event) => {
                    (events, bytes) = (events + 1, bytes + event.size());
                    pipe(&mut pipeline.adapter, &mut applier, &table, event).await?;
                }
                read::Item::Commit { end } if !skipping => {
                    at = end;
                    if events >= pipeline.limit.0 || bytes >= pipeline.limit.1 {
                        break;
                    }
                }
                read::Item::Commit { .. } => {}
            }
        }
        let applied = applier.finish().await?;
        // Read up to the master's position: idle tables keep no WAL.
        if ended && !changes.limited() && (head.flush.0 - at.0 >= IDLE_RELEASE || at > step.at) {
            at = at.max(head.flush);
        }
        if at > step.at || applied.events > 0 {
            slave::write_wal_progress(&slave_tx, &set.name, &step.snapshot, at, applied.events)
                .await?;
            if let Some(sequences) = sequences.as_ref().filter(|_| applied.events > 0) {
                sequence::raise(&slave_tx, sequences).await?;
            }
        }
        slave_tx
            .commit()
            .await
            .on_slave("committing the batch on the slave")?;
        step.at = at;
        step.applied.events += applied.events;
        step.applied.conflicts += applied.conflicts;
        step.applied.notes.extend(applied.notes);
    }
    step.more = changes.limited();
    drop(changes);
    if step.at > confirmed {
        wal::advance(master, set, slave, step.at).await?;
    }
    Ok(step)
}
