//! The book: one session on the master for a set's registry entries. Slave
//! tasks hand in their progress and errors; a reporter writes all that came in
//! meanwhile in one statement (one commit on the master per round, whatever
//! the number of slaves), then cleans the log at intervals.

use super::{bounded, heartbeat};
use crate::config::{Capture, Config};
use crate::error::{Error, Side};
use crate::event::Snapshot;
use crate::registry::{self, Registered, Report};
use crate::{capture, db, wal};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, MutexGuard, mpsc, oneshot};
use tokio_postgres::Client;

/// Minimum time between two cleanups of the master's log.
const CLEANUP_EVERY: Duration = Duration::from_secs(10);
/// Least time one round of cleanup of the master's log may take.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Least time between two writes of the reports: what comes in meanwhile is
/// written together.
const REPORT_EVERY: Duration = Duration::from_millis(20);
/// Longest wait between two attempts to write the reports.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A set's session for its registry, shared by its tasks.
pub struct Book {
    session: Arc<Session>,
    reports: mpsc::UnboundedSender<Note>,
}

/// The session itself, connected when first needed and again after a loss.
struct Session {
    set: Arc<Config>,
    client: Mutex<Option<Client>>,
}

enum Note {
    Progress(u32, Snapshot, u64, u64),
    Error(u32, String),
    Flush(oneshot::Sender<()>),
}

impl Book {
    pub(super) fn new(set: Arc<Config>) -> Book {
        let session = Arc::new(Session {
            set,
            client: Mutex::new(None),
        });
        let (reports, notes) = mpsc::unbounded_channel();
        tokio::spawn(reporter(session.clone(), notes));
        Book { session, reports }
    }

    /// Registers slave `slave` of the set (see [`registry::register`]) and
    /// returns where it resumes.
    pub async fn register(&self, slave_client: &Client, slave: u32) -> Result<Registered, Error> {
        let set = &self.session.set;
        let mut guard = self.session.client().await?;
        let result = match guard.as_ref() {
            Some(master) => {
                let register = registry::register(master, slave_client, set, slave);
                bounded(register, Side::Master, heartbeat(set) * 2).await
            }
            None => Err(lost()),
        };
        forget_lost(&mut guard, &result);
        result
    }

    /// Every registered slave's lag, read on the master (see
    /// [`registry::lags`]), and under WAL capture the WAL each slave's slot
    /// keeps (see [`wal::kept`]).
    pub async fn lags(&self) -> Result<(BTreeMap<u32, (i64, f64)>, BTreeMap<u32, i64>), Error> {
        let set = &self.session.set;
        let mut guard = self.session.client().await?;
        let result = match guard.as_ref() {
            Some(master) => {
                let lags = async {
                    let lags = registry::lags(master, &set.name).await?;
                    let kept = match set.capture {
                        Capture::Wal => wal::kept(master, set).await?,
                        Capture::Trigger => BTreeMap::new(),
                    };
                    Ok((lags, kept))
                };
                bounded(lags, Side::Master, heartbeat(set) * 2).await
            }
            None => Err(lost()),
        };
        forget_lost(&mut guard, &result);
        result
    }

    /// Hands in a slave's progress: its position, and the events and conflicts
    /// of the batch that brought it there; the slave is running.
    pub fn progress(&self, slave: u32, at: Snapshot, events: u64, conflicts: u64) {
        let _ = self
            .reports
            .send(Note::Progress(slave, at, events, conflicts));
    }

    /// Hands in the error a slave is stopped on.
    pub fn error(&self, slave: u32, error: String) {
        let _ = self.reports.send(Note::Error(slave, error));
    }

    /// Waits (up to `limit`) until what was handed in is written.
    pub async fn flush(&self, limit: Duration) {
        let (done, written) = oneshot::channel();
        if self.reports.send(Note::Flush(done)).is_ok()
            && tokio::time::timeout(limit, written).await.is_err()
        {
            tracing::warn!("the slaves' last progress could not be reported to the master");
        }
    }
}

impl Session {
    async fn client(&self) -> Result<MutexGuard<'_, Option<Client>>, Error> {
        let mut client = self.client.lock().await;
        if client.as_ref().is_none_or(Client::is_closed) {
            *client = None;
            let connect = async { Ok(db::connect(&self.set.master, self.set.keepalive).await?) };
            *client = Some(bounded(connect, Side::Master, heartbeat(&self.set) * 2).await?);
        }
        Ok(client)
    }

    /// Writes `reports`, bounded in time.
    async fn write(&self, reports: &BTreeMap<u32, Report>) -> Result<(), Error> {
        let limit = heartbeat(&self.set) * 2;
        let mut guard = self.client().await?;
        let result = match guard.as_ref() {
            Some(client) => {
                let report = registry::report_all(client, &self.set.name, reports);
                bounded(report, Side::Master, limit).await
            }
            None => Err(lost()),
        };
        forget_lost(&mut guard, &result);
        result
    }

    /// Removes what every slave has applied from the log and attaches capture
    /// to new partitions. Returns how many events it removed.
    async fn clean(&self, partitions_warned: &mut bool) -> Result<u64, Error> {
        let set = &self.set;
        let limit = CLEANUP_TIMEOUT.max(heartbeat(set) * 2);
        let mut guard = self.client().await?;
        let Some(client) = guard.as_ref() else {
            return Ok(0);
        };
        let slaves: Vec<i32> = set.slaves.keys().map(|&n| n as i32).collect();
        let keep = set.log_keep.as_secs_f64();
        let cleanup = registry::clean(client, &set.name, &slaves, keep);
        let removed = bounded(cleanup, Side::Master, limit).await;
        forget_lost(&mut guard, &removed);
        let removed = removed?;
        let Some(client) = guard.as_ref() else {
            return Ok(removed);
        };
        // Partitions made ahead (pg_partman) get capture for the writes made
        // straight into them; the daemon's role may lack the right.
        match bounded(capture::attach_partitions(client), Side::Master, limit).await {
            Ok(0) => {}
            Ok(n) => tracing::info!("capture attached to {n} new partition(s)"),
            Err(e @ Error::Lost { .. }) => {
                *guard = None;
                return Err(e);
            }
            Err(e) if !*partitions_warned => {
                *partitions_warned = true;
                tracing::warn!(
                    "{e}: run pgreplica install to capture writes made straight into new partitions"
                );
            }
            Err(_) => {}
        }
        if removed > 0 {
            tracing::debug!("removed {removed} applied events from the master's log");
        }
        Ok(removed)
    }
}

fn lost() -> Error {
    Error::Lost {
        side: Side::Master,
        what: "was lost".into(),
    }
}

/// Drops a session that gave no answer: the next use connects again.
fn forget_lost<T>(session: &mut Option<Client>, result: &Result<T, Error>) {
    if let Err(Error::Lost { .. }) = result {
        *session = None;
    }
}

/// Writes what the tasks hand in, all that came in meanwhile at once, and
/// cleans the log at intervals; retries with backoff while the master is away.
async fn reporter(session: Arc<Session>, mut notes: mpsc::UnboundedReceiver<Note>) {
    let mut reports: BTreeMap<u32, Report> = BTreeMap::new();
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    let mut last_cleanup: Option<Instant> = None;
    let mut partitions_warned = false;
    let mut backoff = Duration::from_secs(1);
    let mut open = true;
    loop {
        if reports.is_empty() && waiting.is_empty() {
            match notes.recv().await {
                Some(note) => take(note, &mut reports, &mut waiting),
                None => return,
            }
        }
        loop {
            match notes.try_recv() {
                Ok(note) => take(note, &mut reports, &mut waiting),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let written = match reports.is_empty() {
            true => Ok(()),
            false => {
                let written = session.write(&reports).await;
                // A SYNC set's waiters hear of each batch at once.
                if session.set.sync == 0 {
                    tokio::time::sleep(REPORT_EVERY).await;
                }
                written
            }
        };
        match written {
            Ok(()) => {
                reports.clear();
                backoff = Duration::from_secs(1);
            }
            Err(e) => {
                tracing::warn!(
                    "reporting progress to the master: {e}; again in {}s",
                    backoff.as_secs()
                );
                if !open {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        }
        if open && last_cleanup.is_none_or(|t| t.elapsed() >= CLEANUP_EVERY) {
            // A full round means more to remove: again at once.
            loop {
                match session.clean(&mut partitions_warned).await {
                    Ok(registry::CLEANUP_ROWS..) => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::debug!("cleaning the master's log: {e}");
                        break;
                    }
                }
            }
            last_cleanup = Some(Instant::now());
        }
        // A flush (a daemon stopping, or `run --once` ending) waits for the
        // cleanup too: what was applied leaves the log before the process does.
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
        if !open {
            return;
        }
    }
}

/// Adds a note to what waits to be written: the last word on each slave wins,
/// its counts add up.
fn take(note: Note, reports: &mut BTreeMap<u32, Report>, waiting: &mut Vec<oneshot::Sender<()>>) {
    match note {
        Note::Progress(slave, at, events, conflicts) => {
            let report = reports.entry(slave).or_default();
            report.at = Some(at);
            report.events += events;
            report.conflicts += conflicts;
            report.error = None;
        }
        Note::Error(slave, error) => reports.entry(slave).or_default().error = Some(error),
        Note::Flush(done) => waiting.push(done),
    }
}
