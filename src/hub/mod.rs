//! One master, many slaves: the daemon's few sessions on a master, shared by
//! every slave of the set.
//!
//! - the listener: one LISTEN; each NOTIFY wakes every slave task;
//! - the reader: the master's log read once for all slaves at the same
//!   position, in pieces that they share (see `reader.rs`);
//! - the book: the registry (progress reports coalesced into one statement
//!   per round, errors, lag) and the log's cleanup (see [`book`]).
//!
//! Each slave still commits its own progress with its batch on its own server,
//! so exactly-once does not depend on any of this.

pub mod book;
mod reader;

use crate::config::Config;
use crate::db;
use crate::error::{Context, Error, Side};
use crate::event::{Event, MasterTable, Snapshot};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

pub use book::Book;

/// Longest wait between two attempts of the listener to reconnect.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long the listener gathers the NOTIFYs that follow one, at first.
const GATHER: Duration = Duration::from_millis(10);
/// How long at most, while they keep coming: under a stream of commits the
/// slaves apply a batch per hold.
const MAX_GATHER: Duration = Duration::from_millis(100);
/// How often an idle session checks its server when `KEEPALIVE` is off.
const IDLE_CHECK: Duration = Duration::from_secs(60);

/// What a slave task asks the reader: the next piece of the batch that
/// follows its position.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ask {
    /// The end of the last batch the slave applied whole.
    pub prev: Snapshot,
    /// The end of the batch it is in the middle of, if any; otherwise the
    /// reader chooses it.
    pub target: Option<Snapshot>,
    /// The last event of that batch the slave has seen (0: none yet).
    pub after: i64,
    /// Tables being cloned on the slave, whose rows are not read.
    pub skip: BTreeSet<String>,
    /// With the master's sequences at the end of the batch.
    pub sequences: bool,
}

/// A piece of a batch, shared by every slave that asks for it.
#[derive(Debug)]
pub struct Piece {
    /// The snapshot the batch ends at (`prev` itself: nothing new).
    pub target: Snapshot,
    /// The events, in order, with their tables.
    pub events: Vec<(Arc<MasterTable>, Event)>,
    /// The batch ends with this piece.
    pub done: bool,
    /// At the end of the batch, when asked: the master's owned sequences and
    /// their last values.
    pub sequences: Option<(Vec<String>, Vec<i64>)>,
    /// Row data held, in bytes.
    pub bytes: usize,
}

enum Request {
    /// A piece, for a task that has seen this many NOTIFYs: the batch it gets
    /// ends at a snapshot taken after the last of them.
    Read(Ask, u64, oneshot::Sender<Result<Arc<Piece>, Error>>),
    /// A check that the reader's session on the master answers.
    Ping(oneshot::Sender<Result<(), Error>>),
}

/// A handle on a set's shared master sessions.
#[derive(Clone)]
pub struct Hub {
    requests: mpsc::Sender<Request>,
    /// Counts NOTIFYs (and reconnections of the listener).
    pub wake: watch::Receiver<u64>,
    /// The listener is listening: while it is not, the slave tasks poll.
    listening: Arc<AtomicBool>,
    /// The registry and the log's cleanup.
    pub book: Arc<Book>,
}

impl Hub {
    /// Starts the reader of `set`'s master and, for a daemon (`listen`), the
    /// listener. They end when every handle is dropped.
    pub fn start(set: Arc<Config>, listen: bool) -> Hub {
        let (requests, asked) = mpsc::channel(1024);
        let (waker, wake) = watch::channel(0);
        let listening = Arc::new(AtomicBool::new(false));
        tokio::spawn(reader::serve(set.clone(), listen, asked, wake.clone()));
        if listen {
            tokio::spawn(listener(set.clone(), waker, listening.clone()));
        }
        Hub {
            requests,
            wake,
            listening,
            book: Arc::new(Book::new(set)),
        }
    }

    /// The next piece for a slave at `ask`'s position.
    pub async fn read(&self, ask: Ask) -> Result<Arc<Piece>, Error> {
        let (reply, answer) = oneshot::channel();
        let seen = *self.wake.borrow();
        self.send(Request::Read(ask, seen, reply)).await?;
        answer.await.unwrap_or_else(|_| Err(gone()))
    }

    /// Checks that the reader's session on the master answers.
    pub async fn ping(&self) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Ping(reply)).await?;
        answer.await.unwrap_or_else(|_| Err(gone()))
    }

    /// Whether NOTIFYs come: while they do not, the tasks look for work at
    /// each heartbeat.
    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }

    async fn send(&self, request: Request) -> Result<(), Error> {
        self.requests.send(request).await.map_err(|_| gone())
    }
}

fn gone() -> Error {
    Error::Lost {
        side: Side::Master,
        what: "was lost: the set's reader of the master stopped".into(),
    }
}

/// How often an idle session checks its server: every `KEEPALIVE`, or every
/// 60 s without it; a check must answer within twice that.
pub fn heartbeat(set: &Config) -> Duration {
    set.keepalive.unwrap_or(IDLE_CHECK)
}

/// Listens on the master, reconnecting with backoff (up to the heartbeat),
/// and counts each NOTIFY (and each new LISTEN, after which something may
/// have been missed) in `wake`.
async fn listener(set: Arc<Config>, wake: watch::Sender<u64>, listening: Arc<AtomicBool>) {
    let every = heartbeat(&set);
    let mut backoff = Duration::from_secs(1);
    loop {
        let error = match listen(&set).await {
            Ok((client, mut notes)) => {
                backoff = Duration::from_secs(1);
                listening.store(true, Ordering::Relaxed);
                wake.send_modify(|n| *n += 1);
                loop {
                    tokio::select! {
                        note = notes.recv() => match note {
                            Some(_) => {
                                wake.send_modify(|n| *n += 1);
                                if let Err(e) = gather(&client, &mut notes, &wake, every * 2).await {
                                    break e;
                                }
                            }
                            None => break Error::Lost { side: Side::Master, what: "was lost".into() },
                        },
                        _ = tokio::time::sleep(every) => {
                            if let Err(e) = alive(&client, Side::Master, every * 2).await {
                                break e;
                            }
                        }
                        _ = wake.closed() => return,
                    }
                }
            }
            Err(e) => e,
        };
        listening.store(false, Ordering::Relaxed);
        tracing::warn!(
            "listening on the master: {error}; again in {}s",
            backoff.as_secs()
        );
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = wake.closed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF).min(every);
    }
}

/// Holds the NOTIFYs that follow one, for as long as more keep coming: a
/// session takes its NOTIFYs only outside a transaction, and takes all that
/// wait in one pass, and each pass is a commit on the master. The listener
/// holds a transaction open for [`GATHER`], doubling up to [`MAX_GATHER`]
/// while NOTIFYs came meanwhile, and wakes the slave tasks every
/// [`GATHER`] during a hold (commits are streaming in: they read what
/// committed without waiting for its NOTIFY); between two holds the next one
/// is already sent, so the pass that takes them is the only moment the
/// session is idle.
/// Under a stream of commits the listener costs the master about two commits
/// per hold, not one per commit; the NOTIFY that wakes idle slaves is never
/// held.
async fn gather(
    client: &tokio_postgres::Client,
    notes: &mut mpsc::UnboundedReceiver<String>,
    wake: &watch::Sender<u64>,
    limit: Duration,
) -> Result<(), Error> {
    let send = |sql: &'static str| async move {
        let sent = async {
            client
                .batch_execute(sql)
                .await
                .on_master("listening on the master")
        };
        bounded(sent, Side::Master, limit).await
    };
    send("BEGIN").await?;
    let mut hold = GATHER;
    loop {
        // Commits keep coming while the NOTIFYs are held: the slave tasks
        // look every GATHER meanwhile, so a hold costs no lag.
        let until = tokio::time::Instant::now() + hold;
        loop {
            tokio::time::sleep_until(until.min(tokio::time::Instant::now() + GATHER)).await;
            if tokio::time::Instant::now() >= until {
                break;
            }
            wake.send_modify(|n| *n += 1);
        }
        // The NOTIFYs held reach the session between the two.
        let (ended, began) = tokio::join!(send("COMMIT"), send("BEGIN"));
        ended?;
        began?;
        let mut more = false;
        while notes.try_recv().is_ok() {
            more = true;
        }
        // Nothing came, or no slave task is left to wake.
        if !more || wake.is_closed() {
            return send("COMMIT").await;
        }
        wake.send_modify(|n| *n += 1);
        hold = (hold * 2).min(MAX_GATHER);
    }
}

async fn listen(
    set: &Config,
) -> Result<(tokio_postgres::Client, mpsc::UnboundedReceiver<String>), Error> {
    let listen = async {
        let (client, notes) = db::connect_listening(&set.master, set.keepalive).await?;
        client.batch_execute("LISTEN pgreplica").await.on_master(
            "listening on the master (is pgreplica installed there? run pgreplica install)",
        )?;
        Ok((client, notes))
    };
    bounded(listen, Side::Master, heartbeat(set) * 2).await
}

/// The heartbeat: the server answers a trivial query within `limit`.
pub async fn alive(
    client: &tokio_postgres::Client,
    side: Side,
    limit: Duration,
) -> Result<(), Error> {
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
pub async fn bounded<T>(
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
