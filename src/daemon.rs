//! The daemon: one task per slave of each set, woken by NOTIFY, reconnecting with backoff.

use crate::adapt::Adapter;
use crate::apply::Applied;
use crate::config::{Capture, Config};
use crate::db::{self, redact};
use crate::error::{Error, Side};
use crate::hub::{self, Book, Hub};
use crate::mail::{Mailer, Notice};
use crate::metrics::Metrics;
use crate::pgoutput::Lsn;
use crate::replicate::{self, Pipeline};
use crate::status::SlaveStatus;
use crate::wal::read;
use crate::{capture, slave};
use std::collections::HashSet;
use std::fmt::Display;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

/// Longest time between two lag checks.
const LAG_CHECK: Duration = Duration::from_secs(10);
/// Longest wait for the last progress reports at shutdown.
const REPORT_FLUSH: Duration = Duration::from_secs(10);
/// Longest wait for the last mails at shutdown.
const MAIL_FLUSH: Duration = Duration::from_secs(40);
/// How often an idle slave of a set captured from the WAL looks for work.
const WAL_POLL: Duration = Duration::from_millis(100);
/// How often it looks for a while after it last applied something: changes
/// tend to come in runs.
const WAL_POLL_BUSY: Duration = Duration::from_millis(5);
const WAL_BUSY_FOR: Duration = Duration::from_secs(1);
/// How often a slave of a set captured from the WAL that applied nothing
/// reports to the master that it is caught up.
const WAL_REPORT: Duration = Duration::from_secs(10);
/// Longest wait between two attempts after an error.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Runs every slave of every set until `shutdown` turns true, or, with `once`,
/// until each slave has applied everything committed when it started. Each
/// `reload` brings the sets to run from then on: sets added start, sets removed
/// stop, sets whose file changed restart, the others carry on untouched.
/// Returns false when a slave was stopped by an error (in `once` mode) or the
/// sets given at start are invalid.
pub async fn run(
    sets: Vec<Config>,
    once: bool,
    mut shutdown: watch::Receiver<bool>,
    mut reload: mpsc::Receiver<Vec<Config>>,
    metrics: Metrics,
) -> bool {
    if !valid(&sets) {
        return false;
    }
    let mut running: Vec<Running> = sets
        .into_iter()
        .map(|s| Running::start(s, once, &metrics))
        .collect();
    if once {
        let mut ok = true;
        for set in running {
            ok &= set.stop(false).await;
        }
        return ok;
    }
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(sets) = reload.recv() => {
                let changed = sets.iter().filter(|s| !running.iter().any(|r| *r.config == **s));
                if !valid(&sets) || !adaptable(changed).await {
                    tracing::error!("reload refused: the running sets carry on unchanged");
                    continue;
                }
                let mut kept = Vec::new();
                for set in running {
                    match sets.iter().find(|s| s.name == set.config.name) {
                        Some(new) if *new == *set.config => kept.push(set),
                        Some(_) => {
                            tracing::info!("set {}: its file changed, restarting it", set.config.name);
                            set.stop(true).await;
                        }
                        None => {
                            tracing::info!("set {}: its file is gone, stopping it", set.config.name);
                            set.stop(true).await;
                        }
                    }
                }
                for new in sets {
                    if !kept.iter().any(|k| k.config.name == new.name) {
                        tracing::info!("set {}: starting", new.name);
                        kept.push(Running::start(new, false, &metrics));
                    }
                }
                running = kept;
            }
        }
    }
    for set in running {
        set.stop(true).await;
    }
    true
}

/// Checks that the master accepts the capture options of these sets and that
/// their transform scripts load. A master that cannot be reached now is checked
/// when the set starts.
async fn adaptable(sets: impl Iterator<Item = &Config>) -> bool {
    for set in sets.filter(|s| !s.tables.is_empty()) {
        if let Err(e) = Adapter::new(set) {
            tracing::error!("{e}");
            return false;
        }
        match db::connect(&set.master, set.keepalive).await {
            Ok(mut master) => {
                if let Err(e) = capture::check_options(&mut master, set).await {
                    tracing::error!("{e}");
                    return false;
                }
            }
            Err(e) => tracing::warn!("set {}: capture options not checked: {e}", set.name),
        }
    }
    true
}

/// Checks that set names are unique, that files reading one master agree on
/// its capture options and files of one daemon on its process keys, and logs
/// the files' warnings.
fn valid(sets: &[Config]) -> bool {
    let clash = crate::config::capture_clash(sets)
        .or_else(|| crate::config::process_clash(sets))
        .or_else(|| crate::config::loop_clash(sets));
    if let Some(clash) = clash {
        tracing::error!("{clash}");
        return false;
    }
    let mut names = HashSet::new();
    for set in sets {
        if !names.insert(set.name.clone()) {
            tracing::error!(
                "{}: NAME={} is used by another file too; every set needs its own name",
                set.path.display(),
                set.name
            );
            return false;
        }
        for warning in &set.warnings {
            tracing::warn!("{}: {warning}", set.path.display());
        }
    }
    true
}

/// A running set: one task per slave, its mailer, and how to stop it.
struct Running {
    config: Arc<Config>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<bool>>,
    hub: Hub,
    mailer: Mailer,
    sender: Option<tokio::task::JoinHandle<()>>,
    once: bool,
}

impl Running {
    fn start(config: Config, once: bool, metrics: &Metrics) -> Running {
        let config = Arc::new(config);
        let (stop, stopped) = watch::channel(false);
        let (mailer, sender) = Mailer::start(&config.name, config.smtp.clone());
        if !once {
            mailer.send(
                Notice::Start,
                describe(&config, "pgreplica started replicating"),
            );
        }
        let hub = Hub::start(config.clone(), true);
        let mut tasks: Vec<_> = config
            .slaves
            .keys()
            .map(|&slave| {
                let span = tracing::info_span!("set", name = %config.name, slave);
                let state = SlaveTask {
                    set: config.clone(),
                    number: slave,
                    once,
                    mailer: mailer.clone(),
                    backoff: Duration::from_secs(1),
                    exact: false,
                    failing: None,
                    sessions: 0,
                    metrics: metrics.clone(),
                    hub: hub.clone(),
                };
                tokio::spawn(state.run(stopped.clone()).instrument(span))
            })
            .collect();
        if !once {
            let span = tracing::info_span!("set", name = %config.name);
            let book = hub.book.clone();
            let watch = watch_lag(
                config.clone(),
                book,
                mailer.clone(),
                metrics.clone(),
                stopped,
            )
            .instrument(span);
            tasks.push(tokio::spawn(async move {
                watch.await;
                true
            }));
        }
        Running {
            config,
            stop,
            tasks,
            hub,
            mailer,
            sender,
            once,
        }
    }

    /// Stops the slaves (each finishes its batch in hand, or, without `now`,
    /// catches up first: `once`), mails the stop and sends the last mails.
    /// Returns false when a slave ended on an error.
    async fn stop(self, now: bool) -> bool {
        if now {
            let _ = self.stop.send(true);
        }
        let mut ok = true;
        for task in self.tasks {
            ok &= task.await.unwrap_or(false);
        }
        self.hub.book.flush(REPORT_FLUSH).await;
        if !self.once {
            self.mailer.send(
                Notice::Stop,
                describe(&self.config, "pgreplica stopped replicating"),
            );
        }
        drop(self.mailer);
        if let Some(sender) = self.sender
            && tokio::time::timeout(MAIL_FLUSH, sender).await.is_err()
        {
            tracing::warn!("the mail server did not take the last mails in time");
        }
        ok
    }
}

/// `what` set NAME from the master to its slaves, DSNs without passwords.
fn describe(set: &Config, what: &str) -> String {
    let slaves: Vec<String> = set
        .slaves
        .iter()
        .map(|(n, dsn)| format!("  slave {n}: {}", redact(dsn)))
        .collect();
    format!(
        "{what} set {} ({}).\n  master: {}\n{}",
        set.name,
        set.path.display(),
        redact(&set.master),
        slaves.join("\n")
    )
}

/// Checks every slave's lag on the master at intervals; a slave passing the
/// set's `LAG_WARNING` or `LAG_WARNING_EVENTS` gets a warning (log and mail),
/// and another when it is back under.
async fn watch_lag(
    set: Arc<Config>,
    book: Arc<Book>,
    mailer: Mailer,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    let every = set.lag_warning.map_or(LAG_CHECK, |l| {
        (l / 2).clamp(Duration::from_secs(1), LAG_CHECK)
    });
    let mut lagging: HashSet<u32> = HashSet::new();
    let mut keeping: HashSet<u32> = HashSet::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let Ok((lags, kept)) = book.lags().await else {
            continue;
        };
        for (&slave, &(events, seconds)) in &lags {
            if !set.slaves.contains_key(&slave) {
                continue;
            }
            metrics.sample(&set.name, slave, events, seconds);
            let kept = kept.get(&slave).copied().unwrap_or(0);
            metrics.update(&set.name, slave, |m| m.wal_kept_bytes = kept);
            if let Some(text) = wal_warning(&set, slave, kept, &mut keeping) {
                tracing::warn!("{text}");
                mailer.send(Notice::Warning, text);
            }
            let lags = SlaveStatus::lags(&set, events, seconds);
            if lags && lagging.insert(slave) {
                let text = format!(
                    "Slave {slave} of set {} lags: {events} events wait, the oldest committed \
                     {seconds:.0}s ago (limits: LAG_WARNING={}, LAG_WARNING_EVENTS={}). \
                     Look at `pgreplica status {}` for an error or a slow slave.",
                    set.name,
                    set.lag_warning
                        .map_or("off".into(), |l| format!("{}s", l.as_secs_f64())),
                    set.lag_warning_events
                        .map_or("off".into(), |l| l.to_string()),
                    set.path.display()
                );
                tracing::warn!("{text}");
                mailer.send(Notice::Warning, text);
            } else if !lags && lagging.remove(&slave) {
                let text = format!(
                    "Slave {slave} of set {} is back under its lag limits: {events} events \
                     wait, {seconds:.0}s of lag.",
                    set.name
                );
                tracing::info!("{text}");
                mailer.send(Notice::Warning, text);
            }
        }
    }
}

/// Under WAL capture, the warning when slave `slave`'s slot passes the set's
/// `WAL_WARNING` (`kept` bytes), and when it is back under; `keeping` holds
/// the slaves over it.
fn wal_warning(set: &Config, slave: u32, kept: i64, keeping: &mut HashSet<u32>) -> Option<String> {
    let limit = set.wal_warning << 20;
    let over = set.capture == Capture::Wal && limit > 0 && kept as u64 > limit;
    let mb = kept as f64 / (1 << 20) as f64;
    if over && keeping.insert(slave) {
        Some(format!(
            "Slave {slave} of set {}: its replication slot keeps {mb:.0} MB of WAL on the master \
             (WAL_WARNING={} MB). The slot keeps what the slave has not applied, also while it \
             is away, until the master's disk fills: look at `pgreplica status {}`.",
            set.name,
            set.wal_warning,
            set.path.display()
        ))
    } else if !over && keeping.remove(&slave) {
        Some(format!(
            "Slave {slave} of set {}: its replication slot is back under WAL_WARNING ({mb:.0} MB).",
            set.name
        ))
    } else {
        None
    }
}

/// One slave of a set, and what its task keeps across sessions.
struct SlaveTask {
    set: Arc<Config>,
    number: u32,
    once: bool,
    mailer: Mailer,
    backoff: Duration,
    /// Apply the next batch one event per statement (to name a failing event).
    exact: bool,
    /// The error this slave is stopped on, once mailed.
    failing: Option<String>,
    /// Sessions begun (the ones after the first are reconnections).
    sessions: u64,
    metrics: Metrics,
    /// The set's shared sessions on the master.
    hub: Hub,
}

impl SlaveTask {
    /// Replicates until shutdown (or, `once`, until caught up), retrying with
    /// backoff after any error. Returns false when stopped by an error in `once` mode.
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> bool {
        tracing::info!(
            "starting: master {}, slave {}",
            redact(&self.set.master),
            redact(&self.set.slaves[&self.number])
        );
        loop {
            let error = match self.session(&mut shutdown).await {
                Ok(()) => {
                    tracing::info!("stopped");
                    return true;
                }
                Err(e @ Error::ApplyRun { .. }) if !self.exact => {
                    tracing::info!("{e}; applying the batch again one event at a time to find it");
                    self.exact = true;
                    continue;
                }
                Err(e) => e,
            };
            if self.once {
                tracing::error!("{error}");
            } else {
                tracing::error!("{error}; retrying in {}s", self.backoff.as_secs());
            }
            self.metrics.update(&self.set.name, self.number, |m| {
                m.stopped(error.to_string(), error.without_values())
            });
            if let Error::Conflict(conflict, _) = &error
                && let Err(e) = slave::record_stop(&self.set, self.number, conflict).await
            {
                tracing::warn!("could not record the conflict on the slave: {e}");
            }
            self.hub.book.error(self.number, error.to_string());
            self.mail_error(&error);
            if self.once {
                return false;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.backoff) => {}
                _ = shutdown.changed() => return true,
            }
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// A connected stretch of a set captured from the WAL: the slave's slot
    /// read on a master session of its own, when the master wrote since the
    /// last look (every [`WAL_POLL`], every [`WAL_POLL_BUSY`] for
    /// [`WAL_BUSY_FOR`] after it applied something).
    async fn wal_session(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        mut slave_client: tokio_postgres::Client,
        mut pipeline: Pipeline,
    ) -> Result<(), Error> {
        let set = self.set.clone();
        let slave = self.number;
        let heartbeat = hub::heartbeat(&set);
        let connect = async {
            let master = db::connect(&set.master, set.keepalive).await?;
            capture::check_version(&master).await?;
            capture::check_mode(&master, &set).await?;
            // The [TABLE] sections' options, as the trigger mode's reader sets them.
            if !set.tables.is_empty() {
                capture::configure(&master, &set).await?;
            }
            read::session(&master).await?;
            Ok(master)
        };
        let master = hub::bounded(connect, Side::Master, heartbeat * 2).await?;
        let filters = crate::wal::filter::session(&set.master, set.keepalive, &master);
        pipeline.filters = hub::bounded(filters, Side::Master, heartbeat * 2).await?;
        let mut checked = Instant::now();
        let mut unreported = (0, 0);
        let mut reported: Option<Instant> = None;
        let mut busy = Instant::now();
        let mut follow_up = false;
        loop {
            let exact = self.exact;
            let mut began = Instant::now();
            let mut committed = |applied: &Applied, at: Lsn, more: bool| {
                self.applied(applied, began.elapsed(), &at, more);
                began = Instant::now();
            };
            let step = replicate::wal_step(
                &master,
                (&set, slave),
                &mut slave_client,
                &mut pipeline,
                exact,
                &mut committed,
            );
            let step = tokio::time::timeout(set.batch_timeout, step)
                .await
                .map_err(|_| Error::Slow(set.batch_timeout.as_secs()))??;
            self.exact = false;
            self.backoff = Duration::from_secs(1);
            unreported.0 += step.applied.events;
            unreported.1 += step.applied.conflicts;
            if step.more {
                continue;
            }
            // Read up to the master's position: every transaction its
            // snapshot shows is applied (what `pgreplica.wait` looks at).
            // The report writes on the master, so that the next look sees
            // WAL written: an idle slave reports only every WAL_REPORT, and
            // once more in the look after one that applied something. That
            // look's snapshot is newer than a `pgreplica.wait()` called just
            // after the commit applied (a stream applies it before the call
            // may even have begun), and newer than the report before it.
            let follow = std::mem::take(&mut follow_up);
            if unreported.0 > 0 || follow || reported.is_none_or(|r| r.elapsed() >= WAL_REPORT) {
                let (events, conflicts) = std::mem::take(&mut unreported);
                let book = &self.hub.book;
                book.progress(slave, step.snapshot, events, conflicts);
                reported = Some(Instant::now());
            }
            if self.once {
                return Ok(());
            }
            if step.applied.events > 0 {
                busy = Instant::now();
                follow_up = true;
            }
            loop {
                // A SYNC set looks as often as a busy one.
                let poll = match set.sync > 0 || busy.elapsed() < WAL_BUSY_FOR {
                    true => WAL_POLL_BUSY,
                    false => WAL_POLL,
                };
                // A stream wakes the slave as soon as the master sends a change.
                let streamed = async {
                    match pipeline.stream.as_mut() {
                        Some(stream) => stream.ready().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    ready = streamed => {
                        if let Err(e) = ready {
                            tracing::debug!("{e}: opening the stream again");
                            pipeline.stream = None;
                        }
                        break;
                    }
                    _ = tokio::time::sleep(poll) => {
                        if follow_up {
                            break;
                        }
                    }
                    _ = shutdown.changed() => return Ok(()),
                }
                if checked.elapsed() >= heartbeat {
                    hub::alive(&slave_client, Side::Slave, heartbeat).await?;
                    checked = Instant::now();
                }
                // A clone makes the slot again: the stream lets go of it.
                if pipeline.stream.is_some() {
                    let cloning = slave::cloning(&slave_client, &set.name);
                    if !hub::bounded(cloning, Side::Slave, heartbeat)
                        .await?
                        .is_empty()
                    {
                        pipeline.stream = None;
                    }
                }
                let head = hub::bounded(read::head(&master), Side::Master, heartbeat * 2).await?;
                if head.flush > step.seen {
                    break;
                }
            }
        }
    }

    /// What follows a batch applied: metrics, the mail that the slave
    /// resumed, the log line, the conflicts' mail.
    fn applied(&mut self, applied: &Applied, took: Duration, at: &dyn Display, more: bool) {
        let (set, slave) = (&self.set, self.number);
        let metrics = &self.metrics;
        if applied.events > 0 {
            metrics.batch(&set.name, slave, applied.events, applied.conflicts, took);
            let tables = applied.tables.iter();
            metrics.activity((&set.name, slave), tables, &applied.notes);
        }
        metrics.update(&set.name, slave, |m| m.position = Some(at.to_string()));
        if let Some(error) = self.failing.take() {
            self.mailer.send(
                Notice::Start,
                format!(
                    "Slave {slave} of set {} resumed replication after this error:\n\n{error}",
                    set.name
                ),
            );
        }
        if applied.events > 0 {
            let part = if more {
                ", part of the batch after it"
            } else {
                ""
            };
            tracing::info!(
                "applied {} events ({} conflicts) up to {at}{part}",
                applied.events,
                applied.conflicts
            );
        }
        if applied.conflicts > 0 {
            self.mailer.send(
                Notice::Warning,
                format!(
                    "{} conflict(s) on slave {slave} of set {} in the batch up to {at}:\n\n{}",
                    applied.conflicts,
                    set.name,
                    applied.notes.join("\n")
                ),
            );
        }
    }

    /// Mails an error once; the retries of the same error only go to the log.
    fn mail_error(&mut self, error: &Error) {
        let text = error.to_string();
        if self.failing.as_ref() == Some(&text) {
            return;
        }
        self.mailer.send(
            Notice::Error,
            format!(
                "Slave {} ({}) of set {} is stopped by an error:\n\n{text}\n\n\
                 It keeps its place in the master's log (nothing is skipped) and retries \
                 with backoff up to every {}s: fix the cause (see the message; \
                 `pgreplica status {}` shows it too) and it resumes by itself.",
                self.number,
                redact(&self.set.slaves[&self.number]),
                self.set.name,
                MAX_BACKOFF.as_secs(),
                self.set.path.display()
            ),
        );
        self.failing = Some(text);
    }

    /// One connected stretch: connect to the slave, then apply batches as
    /// the master's NOTIFYs come.
    async fn session(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), Error> {
        let set = self.set.clone();
        let slave = self.number;
        self.sessions += 1;
        if self.sessions > 1 {
            self.metrics.update(&set.name, slave, |m| m.reconnects += 1);
        }
        let mut wake = self.hub.wake.clone();
        let mut slave_client = db::connect(&set.slaves[&slave], set.keepalive).await?;
        slave::prepare(&slave_client).await?;
        slave::bound_waits(&slave_client, set.lock_timeout, set.batch_timeout).await?;
        let heartbeat = hub::heartbeat(&set);
        let registered = self.hub.book.register(&slave_client, slave).await?;
        let mut pipeline = Pipeline::new(&set, slave, &registered.master)?;
        let mut prev = registered.at;
        if set.capture == Capture::Wal {
            return self.wal_session(shutdown, slave_client, pipeline).await;
        }
        let mut continuing = false;
        loop {
            // The NOTIFYs seen so far are answered by a batch that ends at a
            // new snapshot; the rest of a batch cut into steps ends where it
            // began, so those that came meanwhile still wake the task after it.
            if !continuing {
                wake.borrow_and_update();
            }
            let began = Instant::now();
            let replicate::Step {
                at: snapshot,
                applied,
                more,
            } = tokio::time::timeout(
                set.batch_timeout,
                replicate::step(
                    &self.hub,
                    &mut slave_client,
                    &mut pipeline,
                    &set.name,
                    &prev,
                    self.exact,
                ),
            )
            .await
            .map_err(|_| Error::Slow(set.batch_timeout.as_secs()))??;
            self.exact = false;
            self.backoff = Duration::from_secs(1);
            self.applied(&applied, began.elapsed(), &snapshot, more);
            prev = snapshot;
            // The registry on the master, written for all slaves at once.
            let book = &self.hub.book;
            book.progress(slave, prev.clone(), applied.events, applied.conflicts);
            continuing = more;
            if more {
                // The rest of a batch cut into steps: at once, no NOTIFY to wait for.
                continue;
            }
            if self.once {
                return Ok(());
            }
            // Idle until a NOTIFY; the heartbeat checks both servers meanwhile.
            loop {
                tokio::select! {
                    woken = wake.changed() => {
                        if woken.is_err() {
                            return Err(Error::Lost { side: Side::Master, what: "was lost".into() });
                        }
                        break;
                    }
                    _ = tokio::time::sleep(heartbeat) => {
                        hub::alive(&slave_client, Side::Slave, heartbeat).await?;
                        self.hub.ping().await?;
                        // No NOTIFY comes while the master is not listened to: poll.
                        if !self.hub.listening() {
                            break;
                        }
                    }
                    _ = shutdown.changed() => return Ok(()),
                }
            }
        }
    }
}
