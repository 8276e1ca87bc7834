//! The reader: one session on the master that reads the log for every slave
//! of a set.
//!
//! Slaves that are at the same position ask for the same piece; it is read
//! once and handed to each from a small cache. A slave asking for the batch
//! after its position is given the newest end the reader has handed out (the
//! head) when that end is past its position and was taken after the last
//! NOTIFY the slave has seen, so a slave that was behind catches up to where
//! the others are and shares their pieces from then on. A
//! slave too slow for the cache simply reads its own pieces: it never holds
//! the others back, and memory stays bounded.
//!
//! The requests that come within [`LINGER`] of each other are served in one
//! read-only transaction (at most 5 s long; one commit on the master, whatever
//! the number of slaves). A batch too large for one piece is read through a
//! cursor kept open while its slaves come back for the next piece.

use super::{Ask, Piece, Request, alive, bounded, heartbeat};
use crate::batch::{Ahead, Batch, current_snapshot};
use crate::config::Config;
use crate::db::Prepared;
use crate::error::{Context, Error, Side};
use crate::event::{Origins, Snapshot};
use crate::{capture, db, sequence};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_postgres::{Client, Transaction};

/// A piece ends after this many events, or this much row data.
const PIECE_EVENTS: usize = 1000;
const PIECE_BYTES: usize = 1 << 20;
/// The cache keeps the newest pieces up to this many bytes, or pieces.
const CACHE_BYTES: usize = 16 << 20;
const CACHE_PIECES: usize = 256;
/// Cursors kept open over batches being read in pieces.
const MAX_STREAMS: usize = 4;
/// How long a round waits for the next request before it ends: slaves
/// coming back for the next piece or batch share the round's transaction.
const LINGER: Duration = Duration::from_millis(200);
/// Least time between two snapshots of the master: under a stream of
/// commits, each snapshot takes what committed meanwhile, whatever the number
/// of slaves; an idle master's first commit is read at once.
const ROUND_EVERY: Duration = Duration::from_millis(10);
/// Longest time one read-only transaction stays open on the master.
const MAX_OPEN: Duration = Duration::from_secs(5);

/// A batch being read in pieces: what was asked, and its cursor.
struct Stream<'t> {
    key: Ask,
    /// The last event handed out.
    delivered: i64,
    batch: Batch<'t>,
    /// The master's sequences, when asked, for the batch's last piece.
    sequences: Option<(Vec<String>, Vec<i64>)>,
}

/// The pieces read lately, newest last.
#[derive(Default)]
struct Cache {
    pieces: VecDeque<(Ask, Arc<Piece>)>,
    bytes: usize,
}

impl Cache {
    /// The piece for `ask`; with no end given, any batch from its position.
    fn get(&self, ask: &Ask) -> Option<Arc<Piece>> {
        self.pieces
            .iter()
            .rev()
            .find(|(key, _)| match &ask.target {
                Some(_) => key == ask,
                None => {
                    Ask {
                        target: None,
                        ..key.clone()
                    } == *ask
                }
            })
            .map(|(_, piece)| piece.clone())
    }

    fn put(&mut self, key: Ask, piece: Arc<Piece>) {
        self.bytes += piece.bytes;
        self.pieces.push_back((key, piece));
        while self.bytes > CACHE_BYTES || self.pieces.len() > CACHE_PIECES {
            match self.pieces.pop_front() {
                Some((_, old)) => self.bytes -= old.bytes,
                None => break,
            }
        }
    }
}

/// What the reader keeps between rounds.
struct Reader {
    set: Arc<Config>,
    /// Whether the reader serves a daemon, which sets capture up on the master.
    daemon: bool,
    /// The events every slave of the set may take (each slave leaves out
    /// those that came from itself).
    origins: Origins,
    client: Option<Client>,
    /// The statements prepared on `client`'s session.
    prepared: Prepared,
    /// The newest end of a batch handed out, the NOTIFYs seen before it was
    /// taken, and when.
    head: Option<(Snapshot, u64, Instant)>,
    /// Counts the NOTIFYs.
    wake: watch::Receiver<u64>,
    cache: Cache,
    /// What the last batch read whole says of the next.
    ahead: Ahead,
}

/// Serves the requests of a set's slave tasks until every handle is gone.
pub(super) async fn serve(
    set: Arc<Config>,
    daemon: bool,
    mut asked: mpsc::Receiver<Request>,
    wake: watch::Receiver<u64>,
) {
    let every = heartbeat(&set);
    let origins = Origins {
        slave: None,
        ..set.origins(0)
    };
    let mut reader = Reader {
        set,
        daemon,
        origins,
        client: None,
        prepared: Prepared::default(),
        head: None,
        wake,
        cache: Cache::default(),
        ahead: Ahead::default(),
    };
    loop {
        let first = tokio::select! {
            request = asked.recv() => match request {
                Some(request) => request,
                None => return,
            },
            _ = tokio::time::sleep(every), if reader.client.is_some() => {
                // Idle: a session gone silent is replaced before it is needed.
                if let Some(client) = &reader.client
                    && let Err(e) = alive(client, Side::Master, every * 2).await
                {
                    tracing::debug!("the reader's session on the master: {e}");
                    reader.client = None;
                }
                continue;
            }
        };
        // Slaves that follow another one to the same piece cost the master nothing.
        let Some(first) = reader.serve_cached(first) else {
            continue;
        };
        if let Err(e) = reader.round(first, &mut asked).await {
            tracing::debug!("the reader's session on the master: {e}");
            reader.client = None;
        }
    }
}

impl Reader {
    /// Answers a request for a piece that is in the cache; hands back the
    /// others.
    fn serve_cached(&self, request: Request) -> Option<Request> {
        let Request::Read(ask, seen, reply) = request else {
            return Some(request);
        };
        let target = match (&ask.target, &self.head) {
            (Some(target), _) => target,
            (None, Some((newest, after, _))) if fresh(newest, *after, &ask, seen) => newest,
            _ => return Some(Request::Read(ask, seen, reply)),
        };
        let key = Ask {
            target: Some(target.clone()),
            ..ask.clone()
        };
        match self.cache.get(&key) {
            Some(piece) => {
                let _ = reply.send(Ok(piece));
                None
            }
            None => Some(Request::Read(ask, seen, reply)),
        }
    }

    /// Serves `first` and the requests that follow it in one transaction.
    /// An error ends the round and the session; it went to the request.
    async fn round(
        &mut self,
        first: Request,
        asked: &mut mpsc::Receiver<Request>,
    ) -> Result<(), Error> {
        let limit = self.set.batch_timeout;
        let every = heartbeat(&self.set);
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            // A server that takes the connection and never answers is given
            // up on like a silent session.
            match bounded(self.connect(), Side::Master, every * 2).await {
                Ok(client) => {
                    self.client = Some(client);
                    self.prepared.clear();
                }
                Err(e) => return Err(refuse(first, e)),
            }
        }
        let Some(client) = self.client.as_mut() else {
            return Ok(());
        };
        let begin = client.build_transaction().read_only(true).start();
        let tx = match bounded(
            async { begin.await.on_master("starting a read on the master") },
            Side::Master,
            every * 2,
        )
        .await
        {
            Ok(tx) => tx,
            Err(e) => return Err(refuse(first, e)),
        };
        let (head, cache, origins) = (&mut self.head, &mut self.cache, &self.origins);
        let ahead = &mut self.ahead;
        let prepared = &mut self.prepared;
        let wake = &self.wake;
        let mut streams: Vec<Stream<'_>> = Vec::new();
        let began = Instant::now();
        let mut next = Some(first);
        let mut failed = None;
        while let Some(request) = next.take() {
            match request {
                Request::Ping(reply) => {
                    let ping = async {
                        tx.simple_query("SELECT 1")
                            .await
                            .map(|_| ())
                            .on_master("checking the master")
                    };
                    let result = bounded(ping, Side::Master, every * 2).await;
                    failed = result.as_ref().err().map(ToString::to_string);
                    let _ = reply.send(result);
                }
                Request::Read(ask, seen, reply) => {
                    let read = async {
                        // A snapshot is a trivial query: a master that does
                        // not answer it within the heartbeat has gone silent.
                        let target = target(&tx, head, wake, &ask, seen);
                        let target = bounded(target, Side::Master, every * 2).await?;
                        let at = (target, ask);
                        let with = (origins, &mut *ahead);
                        read(&tx, prepared, &mut streams, at, cache, with).await
                    };
                    let result = bounded(read, Side::Master, limit).await;
                    failed = result.as_ref().err().map(ToString::to_string);
                    let _ = reply.send(result);
                }
            }
            if failed.is_some() {
                break;
            }
            // Busy slaves come back soon: the transaction stays open for
            // them (between statements a read-only transaction holds no
            // snapshot on the master, only its share lock on the log).
            next = match asked.try_recv() {
                Ok(request) => Some(request),
                Err(_) if began.elapsed() > MAX_OPEN => None,
                Err(_) => tokio::time::timeout(LINGER, asked.recv())
                    .await
                    .ok()
                    .flatten(),
            };
        }
        drop(streams);
        if let Some(what) = failed {
            return Err(Error::Lost {
                side: Side::Master,
                what,
            });
        }
        let commit = async { tx.commit().await.on_master("ending a read on the master") };
        bounded(commit, Side::Master, every * 2).await
    }

    /// A new session: pgreplica's version checked and, for a daemon, the
    /// set's capture options set on the master.
    async fn connect(&self) -> Result<Client, Error> {
        let client = db::connect(&self.set.master, self.set.keepalive).await?;
        // Its statements are planned once: the log's queries scan the BRIN
        // index over any range, and planning them anew cost more than the
        // rest of a small batch's reading.
        client
            .batch_execute("SET plan_cache_mode = force_generic_plan")
            .await
            .on_master("setting up the reader's session")?;
        capture::check_version(&client).await?;
        capture::check_mode(&client, &self.set).await?;
        if self.daemon && !self.set.tables.is_empty() {
            capture::configure(&client, &self.set).await?;
        }
        Ok(client)
    }
}

/// Hands `e` to the request, and keeps its text for the log.
fn refuse(request: Request, e: Error) -> Error {
    let what = e.to_string();
    match request {
        Request::Read(_, _, reply) => {
            let _ = reply.send(Err(e));
        }
        Request::Ping(reply) => {
            let _ = reply.send(Err(e));
        }
    }
    Error::Lost {
        side: Side::Master,
        what,
    }
}

/// Where the batch `ask` wants ends: where the slave is in the middle of
/// one, the newest end handed out when it is past the slave's position and
/// newer than the last NOTIFY the slave has `seen`, or else the master's
/// snapshot now.
async fn target(
    tx: &Transaction<'_>,
    head: &mut Option<(Snapshot, u64, Instant)>,
    wake: &watch::Receiver<u64>,
    ask: &Ask,
    seen: u64,
) -> Result<Snapshot, Error> {
    if let Some(target) = &ask.target {
        return Ok(target.clone());
    }
    if let Some((newest, after, _)) = &*head
        && fresh(newest, *after, ask, seen)
    {
        return Ok(newest.clone());
    }
    if let Some((_, _, taken)) = &*head {
        tokio::time::sleep_until((*taken + ROUND_EVERY).into()).await;
    }
    let count = *wake.borrow();
    let now = current_snapshot(tx).await?;
    if head.as_ref().is_none_or(|(h, _, _)| now.includes(h)) {
        *head = Some((now.clone(), count, Instant::now()));
    }
    Ok(now)
}

/// Whether the newest end handed out, taken `after` that many NOTIFYs, can end
/// the batch of a slave at `ask` that has `seen` that many.
fn fresh(newest: &Snapshot, after: u64, ask: &Ask, seen: u64) -> bool {
    after >= seen && newest.includes(&ask.prev) && !newest.same_as(&ask.prev)
}

/// The piece of the batch from `ask`'s position to `target`, from the cache,
/// an open cursor or a new one.
async fn read<'t>(
    tx: &'t Transaction<'t>,
    prepared: &mut Prepared,
    streams: &mut Vec<Stream<'t>>,
    (target, ask): (Snapshot, Ask),
    cache: &mut Cache,
    (origins, ahead): (&Origins, &mut Ahead),
) -> Result<Arc<Piece>, Error> {
    if target.same_as(&ask.prev) {
        return Ok(Arc::new(Piece {
            target,
            events: Vec::new(),
            done: true,
            sequences: None,
            bytes: 0,
        }));
    }
    let key = Ask {
        target: Some(target.clone()),
        ..ask
    };
    if let Some(piece) = cache.get(&key) {
        return Ok(piece);
    }
    let open = streams.iter().position(|s| {
        s.delivered == key.after
            && Ask {
                after: key.after,
                ..s.key.clone()
            } == key
    });
    let mut stream = match open {
        Some(at) => streams.remove(at),
        None => {
            // The sequences go out with the batch's first queries: read after
            // its snapshot, they are at least where its transactions left them.
            let owned = match key.sequences {
                true => Some(sequence::prepare(tx, prepared).await?),
                false => None,
            };
            let sequences = async {
                match &owned {
                    Some(owned) => sequence::read_with(tx, owned).await.map(Some),
                    None => Ok(None),
                }
            };
            let range = (&key.prev, target.clone());
            let between = Batch::between(tx, prepared, range, key.after, None, origins, ahead);
            let (mut batch, sequences) = tokio::try_join!(between, sequences)?;
            batch.skip(key.skip.iter().cloned().collect());
            Stream {
                key: key.clone(),
                delivered: key.after,
                batch,
                sequences,
            }
        }
    };
    let mut piece = Piece {
        target,
        events: Vec::new(),
        done: false,
        sequences: None,
        bytes: 0,
    };
    while piece.events.len() < PIECE_EVENTS && piece.bytes < PIECE_BYTES {
        match stream.batch.next().await? {
            Some((table, event)) => {
                piece.bytes += event.size();
                stream.delivered = event.id;
                piece.events.push((table, event));
            }
            None => {
                piece.done = true;
                break;
            }
        }
    }
    if piece.done {
        piece.sequences = stream.sequences.take();
        *ahead = stream.batch.ahead(ahead);
    }
    if !piece.done {
        streams.push(stream);
        if streams.len() > MAX_STREAMS {
            streams.remove(0);
        }
    }
    let piece = Arc::new(piece);
    cache.put(key, piece.clone());
    Ok(piece)
}
