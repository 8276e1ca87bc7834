//! The daemon: one task per slave of each set, woken by NOTIFY, reconnecting with backoff.

use crate::adapt::Adapter;
use crate::config::Config;
use crate::db::{self, redact};
use crate::error::{Context, Error, Side};
use crate::mail::{Mailer, Notice};
use crate::metrics::Metrics;
use crate::replicate::{self, Pipeline};
use crate::status::SlaveStatus;
use crate::{capture, registry, slave};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;
use tracing::Instrument;

/// How often an idle slave task checks its servers when `KEEPALIVE` is off.
const IDLE_CHECK: Duration = Duration::from_secs(60);
/// Minimum time between two cleanups of the master's log by one task.
const CLEANUP_EVERY: Duration = Duration::from_secs(10);
/// Longest time recording an error on the master may take.
const RECORD_TIMEOUT: Duration = Duration::from_secs(10);
/// Least time one round of cleanup of the master's log may take.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time between two lag checks.
const LAG_CHECK: Duration = Duration::from_secs(10);
/// Longest wait for the last mails at shutdown.
const MAIL_FLUSH: Duration = Duration::from_secs(40);
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
                };
                tokio::spawn(state.run(stopped.clone()).instrument(span))
            })
            .collect();
        if !once {
            let span = tracing::info_span!("set", name = %config.name);
            let watch = watch_lag(config.clone(), mailer.clone(), metrics.clone(), stopped)
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
    mailer: Mailer,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    let every = set.lag_warning.map_or(LAG_CHECK, |l| {
        (l / 2).clamp(Duration::from_secs(1), LAG_CHECK)
    });
    let mut lagging: HashSet<u32> = HashSet::new();
    let mut master: Option<Client> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        if master.as_ref().is_none_or(Client::is_closed) {
            master = db::connect(&set.master, set.keepalive).await.ok();
        }
        let Some(client) = &master else { continue };
        for &slave in set.slaves.keys() {
            let Ok((events, seconds)) = registry::lag(client, &set.name, slave).await else {
                continue;
            };
            metrics.update(&set.name, slave, |m| {
                m.lag_events = events;
                m.lag_seconds = seconds;
            });
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
                let at = crate::metrics::now();
                m.errors += 1;
                m.state = "stopped";
                m.last_error = Some((
                    format!("{at}: {error}"),
                    format!("{at}: {}", error.without_values()),
                ));
            });
            if let Error::Conflict(conflict, _) = &error
                && let Err(e) = slave::record_stop(&self.set, self.number, conflict).await
            {
                tracing::warn!("could not record the conflict on the slave: {e}");
            }
            record_error(&self.set, self.number, &error).await;
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

    /// One connected stretch: connect both sides, then apply batches as NOTIFYs come.
    async fn session(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), Error> {
        let set = self.set.clone();
        let slave = self.number;
        self.sessions += 1;
        if self.sessions > 1 {
            self.metrics.update(&set.name, slave, |m| m.reconnects += 1);
        }
        let slave_dsn = &set.slaves[&slave];
        // Listening has a session of its own, never inside a batch's
        // transaction: a listener in a long transaction holds back the
        // server's NOTIFY queue for every session.
        let (listener, mut notifications) =
            db::connect_listening(&set.master, set.keepalive).await?;
        capture::check_version(&listener).await?;
        listener.batch_execute("LISTEN pgreplica").await.on_master(
            "listening on the master (is pgreplica installed there? run pgreplica install)",
        )?;
        let mut master = db::connect(&set.master, set.keepalive).await?;
        let mut slave_client = db::connect(slave_dsn, set.keepalive).await?;
        slave::prepare(&slave_client).await?;
        slave::bound_waits(&slave_client, set.lock_timeout, set.batch_timeout).await?;
        let mut prev = replicate::register(&master, &slave_client, &set, slave).await?;
        if !set.tables.is_empty() {
            capture::configure(&master, &set).await?;
        }
        let mut pipeline = Pipeline::new(&set, slave)?;
        let mut last_cleanup: Option<Instant> = None;
        let mut partitions_warned = false;
        let heartbeat = set.keepalive.unwrap_or(IDLE_CHECK);
        loop {
            while notifications.try_recv().is_ok() {}
            let began = Instant::now();
            let replicate::Step {
                at: snapshot,
                applied,
                more,
            } = tokio::time::timeout(
                set.batch_timeout,
                replicate::step(
                    &mut master,
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
            if applied.events > 0 {
                let took = began.elapsed();
                let metrics = &self.metrics;
                metrics.batch(&set.name, slave, applied.events, applied.conflicts, took);
            }
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
                    "applied {} events ({} conflicts) up to {snapshot}{part}",
                    applied.events,
                    applied.conflicts
                );
            }
            if applied.conflicts > 0 {
                self.mailer.send(
                    Notice::Warning,
                    format!(
                        "{} conflict(s) on slave {slave} of set {} in the batch up to {snapshot}:\n\n{}",
                        applied.conflicts,
                        set.name,
                        applied.notes.join("\n")
                    ),
                );
            }
            prev = snapshot;
            // Bookkeeping on the master, bounded in time: a master gone silent
            // right now is noticed here too.
            let report = registry::report(
                &master,
                &set.name,
                slave,
                &prev,
                applied.events,
                applied.conflicts,
            );
            bounded(report, Side::Master, heartbeat * 2).await?;
            if last_cleanup.is_none_or(|t| t.elapsed() >= CLEANUP_EVERY) {
                let slaves: Vec<i32> = set.slaves.keys().map(|&n| n as i32).collect();
                let keep = set.log_keep.as_secs_f64();
                let cleanup = registry::clean(&master, &set.name, &slaves, keep);
                let removed =
                    bounded(cleanup, Side::Master, CLEANUP_TIMEOUT.max(heartbeat * 2)).await?;
                // Partitions made ahead (pg_partman) get capture for the writes
                // made straight into them; the daemon's role may lack the right.
                let limit = CLEANUP_TIMEOUT.max(heartbeat * 2);
                match bounded(capture::attach_partitions(&master), Side::Master, limit).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!("capture attached to {n} new partition(s)"),
                    Err(e @ Error::Lost { .. }) => return Err(e),
                    Err(e) if !partitions_warned => {
                        partitions_warned = true;
                        tracing::warn!(
                            "{e}: run pgreplica install to capture writes made straight into new partitions"
                        );
                    }
                    Err(_) => {}
                }
                if removed > 0 {
                    tracing::debug!("removed {removed} applied events from the master's log");
                }
                // A full round means more to remove: again after the next batch.
                last_cleanup = (removed < registry::CLEANUP_ROWS).then(Instant::now);
            }
            if more {
                // The rest of a batch cut into steps: at once, no NOTIFY to wait for.
                continue;
            }
            if self.once {
                return Ok(());
            }
            // Idle until a NOTIFY (or at once while the log has more to clean);
            // the heartbeat checks both servers meanwhile.
            let cleaning = last_cleanup.is_none();
            loop {
                tokio::select! {
                    note = notifications.recv() => {
                        if note.is_none() {
                            return Err(Error::Lost { side: Side::Master, what: "was lost".into() });
                        }
                        break;
                    }
                    _ = tokio::time::sleep(heartbeat), if !cleaning => {
                        alive(&listener, Side::Master, heartbeat).await?;
                        alive(&master, Side::Master, heartbeat).await?;
                        alive(&slave_client, Side::Slave, heartbeat).await?;
                    }
                    _ = std::future::ready(()), if cleaning => break,
                    _ = shutdown.changed() => return Ok(()),
                }
            }
        }
    }
}

/// The heartbeat: the server answers a trivial query within `limit`.
async fn alive(client: &Client, side: Side, limit: Duration) -> Result<(), Error> {
    let check = async {
        client
            .simple_query("SELECT 1")
            .await
            .map(|_| ())
            .doing(&format!("checking the {side}"))
    };
    bounded(check, side, limit).await
}

/// Runs `work` against one server, giving up after `limit`.
async fn bounded<T>(
    work: impl std::future::Future<Output = Result<T, Error>>,
    side: Side,
    limit: Duration,
) -> Result<T, Error> {
    tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
        Err(Error::Lost {
            side,
            what: format!(
                "gave no answer within {}s while checking the {side}: reconnecting",
                limit.as_secs_f64()
            ),
        })
    })
}

/// Records a slave's error on the master for `status`, if the master answers.
async fn record_error(set: &Config, slave: u32, error: &Error) {
    let result = async {
        let master = db::connect(&set.master, set.keepalive).await?;
        let text = error.to_string();
        let record = registry::record_error(&master, &set.name, slave, &text);
        bounded(record, Side::Master, RECORD_TIMEOUT).await
    }
    .await;
    if let Err(e) = result {
        tracing::debug!("could not record the error on the master: {e}");
    }
}
