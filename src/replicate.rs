//! One replication step: open the batch that follows a slave's progress, adapt
//! its events, apply them with the new progress in one slave transaction.

use crate::adapt::Adapter;
use crate::apply::{self, Applied, Applier, Described};
use crate::config::Config;
use crate::conflict::Resolver;
use crate::db::Prepared;
use crate::error::{Context, Error};
use crate::event::{Event, MasterTable, Origins, Snapshot};
use crate::hub::{Ask, Hub};
use crate::pgoutput::Lsn;
use crate::slave::{Progress, WalProgress};
use crate::wal::stream::Stream;
use crate::wal::{self, read};
use crate::{sequence, slave};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::{Client, Transaction};

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
    pub statements: Prepared,
    /// Under WAL capture, statements prepared on the slave's master session
    /// (which lasts as long as the pipeline).
    pub master_statements: Prepared,
    /// Events and bytes of row data after which a batch is cut into steps.
    pub limit: (u64, usize),
    /// The master's node (`pgreplica.node()`), which the slave's progress
    /// names.
    pub master: String,
    /// Under WAL capture, a second master session that evaluates the tables'
    /// `FILTER`s, when the master has any (see [`crate::wal::filter`]).
    pub filters: Option<std::sync::Arc<tokio_postgres::Client>>,
    /// Under WAL capture, the slot's replication stream, kept open from one
    /// look to the next (see [`crate::wal::stream`]); `None` before the first
    /// look, after an error, or while the master refuses one (the slot is
    /// then read through SQL).
    pub stream: Option<Stream>,
    /// When the master last refused a replication stream.
    pub refused: Option<Instant>,
    /// The slave tables the last batch went to (quoted names), described
    /// ahead of the next.
    pub ahead: Vec<String>,
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
    /// The pipeline of slave `slave` of `set`, from the master whose node is
    /// `master`; loads its transform scripts.
    pub fn new(set: &Config, slave: u32, master: &str) -> Result<Pipeline, Error> {
        Ok(Pipeline {
            origins: set.origins(slave),
            resolver: Resolver::new(set, slave),
            adapter: Adapter::new(set)?,
            statements: Prepared::default(),
            master_statements: Prepared::default(),
            limit: (set.batch_events, set.batch_bytes),
            master: master.to_string(),
            filters: None,
            stream: None,
            refused: None,
            ahead: Vec::new(),
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
    // The batch after `prev` is asked for while the slave's transaction
    // begins: it is the one wanted unless the slave's progress moved
    // meanwhile (a clone, a batch left in steps), when it is asked again.
    let guess = Ask {
        prev: prev.clone(),
        target: None,
        after: 0,
        skip: Default::default(),
        sequences: pipeline.origins.master.is_none(),
    };
    let on_slave = (&mut pipeline.statements, pipeline.ahead.as_slice());
    let begin = begin(slave_client, on_slave, (set, &pipeline.master));
    let (begun, guessed) = tokio::join!(begin, hub.read(guess.clone()));
    let Begun {
        tx: slave_tx,
        progress,
        cloning,
        described,
    } = begun?;
    let mut guessed = Some((guess, guessed));
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
    applier.described(described);
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
        let piece = match guessed.take() {
            Some((guess, piece)) if guess == ask => piece?,
            _ => hub.read(ask).await?,
        };
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
    // The new progress (and the sequences) go out right behind the batch's
    // last statements: one round trip for all of them.
    let target = piece.target.clone();
    let events = applier.events();
    let (at, partial) = match cut {
        true => (&prev, Some((&target, last))),
        false => (&target, None),
    };
    let raise = piece.sequences.as_ref().filter(|_| !cut && events > 0);
    let whose = (set, pipeline.master.as_str());
    let tail = async {
        let written = slave::write_progress(&slave_tx, whose, at, partial, events);
        // Multi-master nodes keep disjoint ranges instead.
        let raised = async {
            match raise {
                Some(sequences) => sequence::raise(&slave_tx, sequences).await.map(drop),
                None => Ok(()),
            }
        };
        tokio::try_join!(written, raised).map(drop)
    };
    let applied = finish(applier, tail, &mut pipeline.ahead).await?;
    let step = Step {
        at: at.clone(),
        applied,
        more: cut,
    };
    slave_tx
        .commit()
        .await
        .on_slave("committing the batch on the slave")?;
    Ok(step)
}

/// A slave transaction begun for a batch.
struct Begun<'c> {
    tx: Transaction<'c>,
    /// The set's progress, read under its lock.
    progress: Option<Progress>,
    /// The set's tables being cloned (quoted names).
    cloning: HashSet<String>,
    /// The slave tables of the batch before, described.
    described: Described,
}

/// Begins the slave's transaction for set `set` of master `master`: the set
/// locked, its progress and the tables being cloned read, and the slave
/// tables `ahead` described with statements of `prepared`, all in one round
/// trip after the BEGIN. A progress of another master is refused.
async fn begin<'c>(
    client: &'c mut Client,
    (prepared, ahead): (&mut Prepared, &[String]),
    (set, master): (&str, &str),
) -> Result<Begun<'c>, Error> {
    let tx = client
        .transaction()
        .await
        .on_slave("starting the slave's transaction")?;
    let described = apply::describe_ahead(&tx, prepared, ahead).await?;
    let (locked, described) = tokio::join!(slave::lock_set(&tx, set), described);
    let ((progress, cloning), described) = (locked?, described?);
    if let Some(progress) = &progress {
        progress.check_master(set, master)?;
    }
    Ok(Begun {
        tx,
        progress,
        cloning,
        described,
    })
}

/// Sends what `applier` still holds, then `tail` (the new progress) right
/// behind it, and checks both: one round trip for the batch's end. Keeps the
/// slave tables the batch went to in `ahead`, for the next to describe.
async fn finish(
    applier: Applier<'_>,
    tail: impl Future<Output = Result<(), Error>>,
    ahead: &mut Vec<String>,
) -> Result<Applied, Error> {
    let (applied, written) = tokio::join!(applier.finish(), tail);
    // A failed statement fails what follows it: its own error comes first.
    let applied = applied?;
    written?;
    if !applied.tables.is_empty() {
        *ahead = applied.tables.keys().cloned().collect();
    }
    Ok(applied)
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
/// = wal`): transactions in commit order, in slave transactions of up to the
/// pipeline's limit, each with the position it reached (a transaction larger
/// than the limit is applied in steps); then the slot lets go of the WAL up to
/// there. A crash between a slave's commit and the slot's advance loses
/// nothing and applies nothing twice: what the slave's position covers is
/// skipped when read again. `committed` hears of each slave transaction:
/// what it applied, where it reached, and whether the transaction it ended in
/// goes on in the next.
pub async fn wal_step(
    master: &Client,
    (set, slave): (&Config, u32),
    slave_client: &mut Client,
    pipeline: &mut Pipeline,
    exact: bool,
    committed: &mut (dyn FnMut(&Applied, Lsn, bool) + Send),
) -> Result<WalStep, Error> {
    // Put back only at the end of a look that went well: a look that ends
    // early, or fails, closes the stream.
    let stream = pipeline.stream.take();
    // A stream moves the slot itself: where it is is what it was told.
    let told = stream.as_ref().map(Stream::confirmed);
    let confirmed = async {
        match told {
            Some(told) => Ok(told),
            None => wal::confirmed(master, set, slave).await,
        }
    };
    // The master's first questions go out while the slave's transaction
    // begins: its progress and the tables being cloned are read under the
    // set's lock.
    let keys = read::catalog_statement(master, &mut pipeline.master_statements).await?;
    let whose = (set.name.as_str(), pipeline.master.as_str());
    let on_slave = (&mut pipeline.statements, pipeline.ahead.as_slice());
    let (begun, head, confirmed, catalog) = tokio::join!(
        begin(slave_client, on_slave, whose),
        read::head(master),
        confirmed,
        read::catalog(master, &keys)
    );
    // A slave switched over to another master says so before anything else.
    let Begun {
        tx: mut slave_tx,
        progress,
        cloning,
        mut described,
    } = begun?;
    let head = head?;
    // A clone is copying the slave's tables and makes its slot anew: the
    // slave waits, where it was, without reading the slot.
    if !cloning.is_empty() {
        // The clone makes the slot again: it must not be in use.
        drop(stream);
        return Ok(WalStep {
            at: progress
                .as_ref()
                .and_then(|p| p.wal)
                .map_or(head.flush, |w| w.at),
            snapshot: progress.map_or(head.snapshot, |p| p.snapshot),
            seen: head.flush,
            applied: Applied::default(),
            more: false,
        });
    }
    let confirmed = confirmed?;
    let mut position = match progress.map(|p| p.wal) {
        None => WalProgress {
            at: confirmed,
            partial: None,
        },
        Some(Some(wal)) if wal.at >= confirmed => wal,
        Some(wal) => return Err(older_than_slot(set, slave, wal, confirmed)),
    };
    let mut step = WalStep {
        at: position.at,
        snapshot: head.snapshot,
        seen: head.flush,
        applied: Applied::default(),
        more: false,
    };
    let slot = wal::slot_name(&set.name, slave);
    let stream = match stream {
        Some(stream) => Some(stream),
        None => open_stream(set, &slot, position.at, &mut pipeline.refused).await,
    };
    // A stream is read even with nothing new: what it sent must be taken.
    if head.flush <= position.at && stream.is_none() {
        return Ok(step);
    }
    let (node, filters) = (pipeline.origins.master.clone(), pipeline.filters.clone());
    let on_master = (master, &mut pipeline.master_statements);
    let mut changes = match stream {
        Some(stream) => {
            read::Changes::streaming((stream, node, filters), catalog?, head.flush).await?
        }
        None => {
            let limit = pipeline.limit.0;
            read::Changes::start(on_master, (&slot, node, filters), head.flush, limit).await?
        }
    };
    // The transaction being read: its commit, its changes seen, and those of
    // them applied before.
    let mut txn: Option<(Lsn, i64, i64)> = None;
    let mut ended = false;
    loop {
        let resolver = pipeline.resolver.as_ref();
        let mut applier = Applier::new(&slave_tx, &mut pipeline.statements, exact, resolver);
        applier.described(std::mem::take(&mut described));
        pipeline.adapter.begin();
        let before = position;
        let (mut events, mut bytes) = (0, 0);
        loop {
            let Some(item) = changes.next().await? else {
                ended = true;
                break;
            };
            match item {
                read::Item::Begin { commit } => {
                    let done = match position.partial {
                        Some((partial, upto)) if partial == commit => upto,
                        _ => 0,
                    };
                    // Applied whole before the slot was last advanced.
                    txn = (commit >= position.at).then_some((commit, 0, done));
                }
                read::Item::Change(table, event) => {
                    let Some((commit, seen, done)) = txn.as_mut() else {
                        continue;
                    };
                    *seen += 1;
                    if *seen <= *done || !pipeline.origins.takes(&event) {
                        continue;
                    }
                    (events, bytes) = (events + 1, bytes + event.size());
                    pipe(&mut pipeline.adapter, &mut applier, &table, event).await?;
                    if events >= pipeline.limit.0 || bytes >= pipeline.limit.1 {
                        position.partial = Some((*commit, *seen));
                        break;
                    }
                }
                read::Item::Commit { end } => {
                    if txn.take().is_some() {
                        position = WalProgress {
                            at: end,
                            partial: None,
                        };
                    }
                }
            }
        }
        // Read up to the master's position: idle tables keep no WAL.
        let reached = changes.reached();
        let idle = reached.0.saturating_sub(position.at.0) >= IDLE_RELEASE;
        if ended && !changes.limited() && (idle || position != before) {
            position.at = position.at.max(reached);
        }
        // Read once the stream ended, the master's sequences are at least
        // where the transactions applied left them (multi-master nodes keep
        // disjoint ranges instead).
        let events = applier.events();
        let applied_any = events > 0 || step.applied.events > 0;
        let owned = match ended && applied_any && pipeline.origins.master.is_none() {
            true => Some(sequence::prepare(master, &mut pipeline.master_statements).await?),
            false => None,
        };
        // The master's sequences are read while the slave applies; the new
        // position and the sequences go out right behind the last change.
        let tail = async {
            let written = async {
                match position != before || events > 0 {
                    true => {
                        let at = &step.snapshot;
                        slave::write_wal_progress(&slave_tx, whose, at, position, events).await
                    }
                    false => Ok(()),
                }
            };
            let raised = async {
                if let Some(owned) = &owned {
                    let values = sequence::read_with(master, owned).await?;
                    sequence::raise(&slave_tx, &values).await?;
                }
                Ok(())
            };
            tokio::try_join!(written, raised).map(drop)
        };
        let applied = finish(applier, tail, &mut pipeline.ahead).await?;
        slave_tx
            .commit()
            .await
            .on_slave("committing the batch on the slave")?;
        committed(&applied, position.at, position.partial.is_some());
        step.applied.events += applied.events;
        step.applied.conflicts += applied.conflicts;
        if ended {
            break;
        }
        let on_slave = (&mut pipeline.statements, pipeline.ahead.as_slice());
        let begun = begin(slave_client, on_slave, whose).await?;
        (slave_tx, described) = (begun.tx, begun.described);
    }
    step.at = position.at;
    step.more = changes.limited() || position.partial.is_some();
    pipeline.stream = changes.into_stream();
    match pipeline.stream.as_mut() {
        Some(stream) if step.at > stream.confirmed() => stream.confirm(step.at, false).await?,
        Some(_) => {}
        None if step.at > confirmed => wal::advance(master, set, slave, step.at).await?,
        None => {}
    }
    Ok(step)
}

/// How long a slot is read through SQL after the master refused a
/// replication stream, before one is asked for again.
const STREAM_RETRY: Duration = Duration::from_secs(60);

/// Opens slot `slot`'s replication stream from `at`, unless the master
/// refused one less than [`STREAM_RETRY`] ago; `None` when refused (said once
/// as a warning, then in the debug log).
async fn open_stream(
    set: &Config,
    slot: &str,
    at: Lsn,
    refused: &mut Option<Instant>,
) -> Option<Stream> {
    if refused.is_some_and(|when| when.elapsed() < STREAM_RETRY) {
        return None;
    }
    match Stream::open(&set.master, slot, at, wal::PUBLICATIONS).await {
        Ok(stream) => {
            *refused = None;
            Some(stream)
        }
        Err(e) => {
            let why = format!(
                "set {}: reading slot {slot} through SQL, which decodes the master's WAL again \
                 at each look, because a replication stream was refused: {e} (a stream needs a \
                 free WAL sender on the master, max_wal_senders)",
                set.name
            );
            match refused.replace(Instant::now()) {
                None => tracing::warn!("{why}"),
                Some(_) => tracing::debug!("{why}"),
            }
            None
        }
    }
}

/// A slave whose position is older than its slot's: the WAL between is gone.
fn older_than_slot(set: &Config, slave: u32, wal: Option<WalProgress>, slot: Lsn) -> Error {
    let at = wal.map_or("a position in the log of trigger capture".into(), |w| {
        w.at.to_string()
    });
    Error::Invalid {
        doing: "resuming the slave".into(),
        message: format!(
            "its progress ({at}) is older than its replication slot on the master ({slot}): it \
             was restored from a backup, lost its last commits, or replicated with CAPTURE = \
             trigger, and the changes in between are not in the WAL any more. Nothing is \
             applied; copy it again with pgreplica clone {} --slave {slave} --truncate",
            set.path.display()
        ),
    }
}
