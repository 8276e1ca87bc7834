//! A slot's changes, read as the log's events: whole transactions in commit
//! order, from the slot's replication stream ([`super::stream`]) or, where
//! the master refuses one, through SQL. Either way the master spills a large
//! transaction to disk and sends it as it is read, so a transaction of
//! millions of rows is never held in memory here.
//!
//! Rows come in their text form, as the capture trigger logs them. The tables
//! log their whole old row (`REPLICA IDENTITY FULL`, set by install): an
//! update's values left alone out of line (TOAST) are taken from it, never
//! written as NULL.

use super::filter::Filters;
use super::stream::{Frame, Stream};
use crate::db::Prepared;
use crate::error::{Context, Error};
use crate::event::{Event, MasterTable, Op, Snapshot};
use crate::ident::TableName;
use crate::pgoutput::{self, Lsn, Message, Relation, Value};
use crate::record::Fields;
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::types::{PgLsn, ToSql};
use tokio_postgres::{Client, GenericClient, RowStream, Statement};

// The snapshot is the statement's, taken before the WAL position is read: a
// transaction it shows committed is in the WAL up to that position.
const HEAD_SQL: &str = "SELECT pg_current_wal_flush_lsn(), txid_current_snapshot()::text";

// The attached tables' keys, by oid (under replica identity full every column
// is part of the identity the WAL describes), the names they were attached
// under, and what their [TABLE] sections capture of them (columns and
// operations, as the trigger would).
const KEYS_SQL: &str = "
SELECT t.reloid, d.key, t.layout->>'schema', t.layout->>'name', n.nspname::text,
       c.relname::text, d.logged, t.operations, t.filter
  FROM pgreplica.tables t JOIN pg_class c ON c.oid = t.reloid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pgreplica.described d ON d.reloid = t.reloid";

/// What the master's catalog says of an attached table.
pub struct Attached {
    key: Vec<String>,
    /// The columns captured (`COLUMNS`, `EXCLUDE_COLUMNS`).
    logged: Vec<String>,
    /// The operations captured, as letters of `IUDT` (`OPERATIONS`).
    operations: String,
    /// The SQL condition a change must meet (`FILTER`).
    filter: Option<String>,
    /// The name it was attached under.
    was: Option<TableName>,
    /// As the catalog has it now, for a change the WAL has not described
    /// the table for (a partition's truncate, logged by its trigger).
    now: Arc<MasterTable>,
}

const PEEK_SQL: &str = "
SELECT lsn, data FROM pg_logical_slot_peek_binary_changes($1, $2, $3,
       'proto_version', '1', 'publication_names', $4)";

/// Seconds from the Unix epoch to PostgreSQL's, 2000-01-01.
const PG_EPOCH: f64 = 946_684_800.0;

/// Where the master is when a round starts.
pub struct Head {
    /// The WAL written and flushed so far: a round reads up to it.
    pub flush: Lsn,
    /// The master's snapshot, for the registry.
    pub snapshot: Snapshot,
}

/// Sets up a session that reads slots: the values' text is written by the
/// session that decodes, in the same settings as the capture trigger's.
pub async fn session(master: &Client) -> Result<(), Error> {
    master
        .batch_execute(crate::db::SESSION_SQL)
        .await
        .on_master("setting up the master session")
}

/// Reads where the master is.
pub async fn head(master: &impl GenericClient) -> Result<Head, Error> {
    let doing = "reading the master's WAL position";
    let row = master
        .query_typed_one(HEAD_SQL, &[])
        .await
        .on_master(doing)?;
    let flush: PgLsn = row.get(0);
    let text: String = row.get(1);
    let snapshot = Snapshot::parse(&text).ok_or_else(|| Error::Invalid {
        doing: doing.into(),
        message: format!("unreadable snapshot '{text}'"),
    })?;
    Ok(Head {
        flush: Lsn(flush.into()),
        snapshot,
    })
}

/// One item of the stream.
#[derive(Debug)]
pub enum Item {
    /// A transaction starts; its commit record is at `commit`.
    Begin {
        /// Where its commit record starts.
        commit: Lsn,
    },
    /// A change of the transaction, as the log's event.
    Change(Arc<MasterTable>, Event),
    /// The transaction commits; its commit record ends at `end`.
    Commit {
        /// Where the record after it starts.
        end: Lsn,
    },
}

/// Where the changes come from.
enum Source {
    /// One read of the slot through SQL, decoded from its restart point.
    Peek(Pin<Box<RowStream>>),
    /// The slot's replication stream, read up to a position.
    Stream(Streaming),
}

/// A look into a slot's stream: up to `upto`, and on to the end of the
/// transaction being read there.
struct Streaming {
    stream: Stream,
    upto: Lsn,
    /// A transaction's changes are being read.
    open: bool,
    /// The keepalives asked for while the sender was behind `upto`: the
    /// look ends only once the sender has passed it, as a read through SQL
    /// reads up to its position.
    asked: u32,
}

/// A look asks a sender still behind its position, and silent for 2 ms, how
/// far it is this many times, then after 50 ms of silence (a sender decoding
/// a transaction of millions of rows sends nothing until it has read the
/// whole transaction).
const QUICK_ASKS: u32 = 50;

impl Streaming {
    async fn next(&mut self) -> Result<Option<(Lsn, Bytes)>, Error> {
        loop {
            if !self.open {
                if self.stream.sent >= self.upto {
                    return Ok(None);
                }
                // Behind the position and nothing sent for a while: the
                // sender is asked how far it has decoded.
                let pause = match self.asked < QUICK_ASKS {
                    true => Duration::from_millis(2),
                    false => Duration::from_millis(50),
                };
                if !self.stream.wait(pause).await? {
                    self.ask().await?;
                    continue;
                }
            }
            if let Frame::Data { start, data } = self.stream.frame().await? {
                match data.first() {
                    Some(b'B') => self.open = true,
                    Some(b'C') => {
                        self.open = false;
                        // 'C', flags, commit position, end position.
                        if let Some(end) = data.get(10..18) {
                            let end = u64::from_be_bytes(end.try_into().expect("8 bytes"));
                            self.stream.sent = self.stream.sent.max(Lsn(end));
                        }
                    }
                    _ => {}
                }
                return Ok(Some((start, data)));
            }
        }
    }

    /// Asks the sender how far it has decoded.
    async fn ask(&mut self) -> Result<(), Error> {
        self.asked += 1;
        let at = self.stream.confirmed();
        self.stream.confirm(at, true).await
    }
}

/// The changes of one slot, read once up to a position.
pub struct Changes {
    source: Source,
    /// The tables described so far in this read, by oid.
    tables: HashMap<u32, Arc<MasterTable>>,
    /// Of each table described, the places of its captured columns among
    /// the WAL's, when some are left out.
    kept: HashMap<u32, Vec<usize>>,
    /// Of each filtered table described, all its columns in the WAL.
    all_columns: HashMap<u32, Vec<String>>,
    /// The `FILTER`s of the tables, evaluated on the master.
    filters: Filters,
    /// The attached tables, by oid.
    attached: HashMap<u32, Attached>,
    /// The oid of `pgreplica.log`, once described.
    log: Option<u32>,
    /// The commit time of the transaction being read.
    time: f64,
    /// The master's node name: the origin of the changes made on it.
    node: Option<String>,
    /// The node the transaction being read applied changes from, as its
    /// marker in `pgreplica.log` says (multi-master; see `slave::mark_origin`).
    origin: Option<String>,
    /// Items decoded and not handed out yet (a truncate of many tables).
    queue: VecDeque<Item>,
    /// The inserts of a run of rows moved to new keys (see `moving`).
    moved: Vec<Item>,
    /// Rows read, and the most asked for.
    read: u64,
    limit: u64,
    /// Where the read ends.
    upto: Lsn,
}

impl Changes {
    /// Starts reading slot `slot` on `master` up to `upto`, for about `limit`
    /// changes (whole transactions: the last one may go past it).
    /// `node` is the master's node name, the origin of its own changes;
    /// `filters` a second master session for the tables' `FILTER`s (without
    /// it every change is kept).
    pub async fn start(
        (master, statements): (&Client, &mut Prepared),
        (slot, node, filters): (&str, Option<String>, Option<Arc<Client>>),
        upto: Lsn,
        limit: u64,
    ) -> Result<Changes, Error> {
        let attached = attached(master, statements).await?;
        // Not sent together with the keys: a query still waiting for its
        // answer behind the stream would never get it.
        let limit = limit.clamp(1, i32::MAX as u64);
        let params: [&(dyn ToSql + Sync); 4] = [
            &slot,
            &PgLsn::from(upto.0),
            &(limit as i32),
            &super::PUBLICATIONS,
        ];
        let rows = master
            .query_raw(PEEK_SQL, params)
            .await
            .on_master(&format!("reading replication slot {slot} on the master"))?;
        let source = Source::Peek(Box::pin(rows));
        Ok(Changes::new(source, attached, (node, filters), upto, limit))
    }

    /// Starts reading the slot's replication stream `stream` up to `upto`
    /// (and on to the end of the transaction there), as [`Changes::start`]
    /// reads it through SQL.
    /// `attached` is the master's [`catalog`], read at the look's start.
    pub async fn streaming(
        (stream, node, filters): (Stream, Option<String>, Option<Arc<Client>>),
        attached: Catalog,
        upto: Lsn,
    ) -> Result<Changes, Error> {
        let described: Vec<Relation> = stream.relations.values().cloned().collect();
        let mut streaming = Streaming {
            stream,
            upto,
            open: false,
            asked: 0,
        };
        if streaming.stream.sent < upto {
            streaming.ask().await?;
        }
        let source = Source::Stream(streaming);
        let mut changes = Changes::new(source, attached, (node, filters), upto, u64::MAX);
        // The sender described these tables earlier in the session.
        for relation in described {
            changes.describe(relation)?;
        }
        Ok(changes)
    }

    fn new(
        source: Source,
        attached: HashMap<u32, Attached>,
        (node, filters): (Option<String>, Option<Arc<Client>>),
        upto: Lsn,
        limit: u64,
    ) -> Changes {
        Changes {
            source,
            tables: HashMap::new(),
            kept: HashMap::new(),
            all_columns: HashMap::new(),
            filters: Filters::new(filters),
            attached,
            log: None,
            time: 0.0,
            node,
            origin: None,
            queue: VecDeque::new(),
            moved: Vec::new(),
            read: 0,
            limit,
            upto,
        }
    }

    /// The replication stream read, for the next look.
    pub fn into_stream(self) -> Option<Stream> {
        match self.source {
            Source::Stream(streaming) => Some(streaming.stream),
            Source::Peek(_) => None,
        }
    }

    /// Where the read ends: every transaction committed before it has been
    /// read (when the read was not [`Changes::limited`]).
    pub fn reached(&self) -> Lsn {
        match &self.source {
            Source::Stream(streaming) => streaming.stream.sent,
            Source::Peek(_) => self.upto,
        }
    }

    /// Whether the read stopped at its limit before the position asked for.
    pub fn limited(&self) -> bool {
        self.read >= self.limit
    }

    /// The next item, or `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Item>, Error> {
        loop {
            if let Some(item) = self.queue.pop_front() {
                return Ok(Some(item));
            }
            let (lsn, message) = match &mut self.source {
                Source::Peek(rows) => {
                    let Some(row) = rows.next().await else {
                        return Ok(None);
                    };
                    let row = row.on_master("reading the slot's changes on the master")?;
                    self.read += 1;
                    let lsn: PgLsn = row.get(0);
                    (Lsn(lsn.into()), decode(row.get(1))?)
                }
                Source::Stream(streaming) => match streaming.next().await? {
                    Some((lsn, data)) => (lsn, decode(&data)?),
                    None => return Ok(None),
                },
            };
            self.take(lsn.0 as i64, message).await?;
        }
    }

    /// Queues what one message says.
    async fn take(&mut self, id: i64, message: Message) -> Result<(), Error> {
        let time = self.time;
        let origin = self.origin.clone().or_else(|| self.node.clone());
        let change = |oid: u32, table: &Arc<MasterTable>, op, old, new| {
            let event = Event {
                id,
                table: oid,
                op,
                old,
                new,
                origin: origin.clone(),
                time: Some(time),
            };
            Item::Change(table.clone(), event)
        };
        let item = match message {
            Message::Begin {
                final_lsn, time, ..
            } => {
                self.time = time as f64 / 1e6 + PG_EPOCH;
                self.origin = None;
                Item::Begin { commit: final_lsn }
            }
            Message::Commit { end_lsn, .. } => Item::Commit { end: end_lsn },
            Message::Relation(relation) => {
                if let Source::Stream(streaming) = &mut self.source {
                    let relations = &mut streaming.stream.relations;
                    relations.insert(relation.oid, relation.clone());
                }
                self.describe(relation)?;
                return Ok(());
            }
            Message::Insert { table, new } if Some(table) == self.log => {
                return self.execute(id, new);
            }
            Message::Insert { table: oid, .. } if !self.captures(oid, 'I') => return Ok(()),
            Message::Insert { table: oid, new } => {
                let table = self.table(oid)?;
                if !self.passes(oid, Some(&new), None).await? {
                    return Ok(());
                }
                let new = fields(&table, self.keep(oid, new), None)?;
                change(oid, &table, Op::Insert, None, Some(new))
            }
            Message::Update { table: oid, .. } if !self.captures(oid, 'U') => return Ok(()),
            Message::Update {
                table: oid,
                old,
                key_only,
                new,
            } => {
                let table = self.table(oid)?;
                let raw_old = match (old, key_only) {
                    (Some(old), false) => old,
                    _ => return Err(no_old_row(&table)),
                };
                // The values the update left alone, from the old row.
                let raw_new: Vec<Value> = new
                    .into_iter()
                    .zip(&raw_old)
                    .map(|(n, o)| match n {
                        Value::Unchanged => o.clone(),
                        n => n,
                    })
                    .collect();
                // Whole rows are kept for a FILTER only.
                let rows = self
                    .filtered(oid)
                    .then(|| (raw_old.clone(), raw_new.clone()));
                let (raw_old, raw_new) = (self.keep(oid, raw_old), self.keep(oid, raw_new));
                let old = fields(&table, raw_old, None)?;
                let new = fields(&table, raw_new, Some(&old))?;
                let (raw_old, raw_new) = match &rows {
                    Some((o, n)) => (Some(o.as_slice()), Some(n.as_slice())),
                    None => (None, None),
                };
                let moved = table.key.iter().any(|&k| old.get(k) != new.get(k));
                if moved {
                    // As the trigger pairs rows by key: the old row and the
                    // new one are two changes, each filtered by itself.
                    let gone = self.passes(oid, None, raw_old).await?;
                    let came = self.passes(oid, raw_new, None).await?;
                    let delete =
                        gone.then(|| change(oid, &table, Op::Delete, Some(old.clone()), None));
                    let insert = came.then(|| change(oid, &table, Op::Insert, None, Some(new)));
                    self.moving(&table, old, delete, insert);
                    return Ok(());
                }
                if !self.passes(oid, raw_new, raw_old).await? {
                    return Ok(());
                }
                change(oid, &table, Op::Update, Some(old), Some(new))
            }
            Message::Delete { table: oid, .. } if !self.captures(oid, 'D') => return Ok(()),
            Message::Delete {
                table: oid,
                old,
                key_only,
            } => {
                let table = self.table(oid)?;
                if key_only {
                    return Err(no_old_row(&table));
                }
                if !self.passes(oid, None, Some(&old)).await? {
                    return Ok(());
                }
                let old = fields(&table, self.keep(oid, old), None)?;
                change(oid, &table, Op::Delete, Some(old), None)
            }
            Message::Truncate { tables, .. } => {
                self.settle();
                let tables: Vec<u32> = tables
                    .into_iter()
                    .filter(|&oid| self.captures(oid, 'T'))
                    .collect();
                for oid in tables {
                    let table = self.table(oid)?;
                    let truncate = change(oid, &table, Op::Truncate, None, None);
                    self.queue.push_back(truncate);
                }
                return Ok(());
            }
            Message::Origin { .. } | Message::Type { .. } | Message::Note { .. } => return Ok(()),
        };
        self.settle();
        self.queue.push_back(item);
        Ok(())
    }

    /// An update that changed the row's key, as the capture trigger logs it:
    /// a delete of the old row, and an insert of the new one held until the
    /// run of such updates of the table ends, so that rows moved over each
    /// other's keys by one statement (`SET id = id + 1`, under a deferrable
    /// key) never meet on the slave. A row moved again within the run moves
    /// its held insert.
    /// Under a `FILTER` either may be left out.
    fn moving(
        &mut self,
        table: &Arc<MasterTable>,
        old: Fields,
        delete: Option<Item>,
        insert: Option<Item>,
    ) {
        if self
            .moved
            .first()
            .is_some_and(|held| !same_table(held, table))
        {
            self.settle();
        }
        let again = self.moved.iter().position(|held| match held {
            Item::Change(_, e) => e.new.as_ref() == Some(&old),
            _ => false,
        });
        match (again, insert) {
            (Some(at), Some(insert)) => self.moved[at] = insert,
            (Some(at), None) => {
                self.moved.remove(at);
            }
            (None, insert) => {
                self.queue.extend(delete);
                self.moved.extend(insert);
            }
        }
    }

    /// Ends a run of moved rows: their inserts go out.
    fn settle(&mut self) {
        self.queue.extend(self.moved.drain(..));
    }

    /// Keeps a table's description: its columns, and its key from the
    /// master's catalog.
    fn describe(&mut self, relation: Relation) -> Result<(), Error> {
        let name = TableName {
            schema: relation.schema,
            name: relation.name,
        };
        let mut columns: Vec<String> = relation.columns.iter().map(|c| c.name.clone()).collect();
        if name.schema == "pgreplica" && name.name == "log" {
            self.log = Some(relation.oid);
        }
        let attached = self.attached.get(&relation.oid);
        if attached.is_some_and(|a| a.filter.is_some()) {
            self.all_columns.insert(relation.oid, columns.clone());
        }
        // The columns its [TABLE] section leaves out are dropped here.
        let kept: Vec<usize> = (0..columns.len())
            .filter(|&i| attached.is_none_or(|a| a.logged.contains(&columns[i])))
            .collect();
        if kept.len() < columns.len() {
            columns = kept.iter().map(|&i| columns[i].clone()).collect();
            self.kept.insert(relation.oid, kept);
        } else {
            self.kept.remove(&relation.oid);
        }
        let key = match attached {
            Some(Attached { key, .. }) => key
                .iter()
                .map(|k| columns.iter().position(|c| c == k))
                .collect::<Option<Vec<usize>>>(),
            // Not attached (pgreplica.log): the identity is its key.
            None => Some(
                (0..columns.len())
                    .filter(|&i| relation.columns[i].key)
                    .collect(),
            ),
        };
        let Some(key) = key else {
            return Err(Error::Schema {
                table: name,
                message: "its primary key's columns are not among the columns the WAL \
                          describes: run pgreplica install on the master"
                    .into(),
            });
        };
        // Renamed or moved since it was attached, without execute.
        let was = attached
            .and_then(|a| a.was.clone())
            .filter(|was| *was != name);
        let table = MasterTable {
            name,
            was,
            columns,
            key,
        };
        self.tables.insert(relation.oid, Arc::new(table));
        Ok(())
    }

    /// Whether table `oid` has a `FILTER`.
    fn filtered(&self, oid: u32) -> bool {
        self.attached.get(&oid).is_some_and(|a| a.filter.is_some())
    }

    /// Whether a change of table `oid` with these rows (all the WAL's
    /// columns) passes its `[TABLE]` section's `FILTER`, if it has one.
    async fn passes(
        &mut self,
        oid: u32,
        new: Option<&[Value]>,
        old: Option<&[Value]>,
    ) -> Result<bool, Error> {
        let Some(filter) = self.attached.get(&oid).and_then(|a| a.filter.as_deref()) else {
            return Ok(true);
        };
        let (Some(table), Some(columns)) = (self.tables.get(&oid), self.all_columns.get(&oid))
        else {
            return Ok(true);
        };
        self.filters
            .passes((oid, &table.name, filter), columns, new, old)
            .await
    }

    /// Whether operation `op` (a letter of `IUDT`) of table `oid` is
    /// captured (its `[TABLE]` section's `OPERATIONS`).
    fn captures(&self, oid: u32, op: char) -> bool {
        self.attached
            .get(&oid)
            .is_none_or(|a| a.operations.contains(op))
    }

    /// A row's values in the WAL, without the columns its table's `[TABLE]`
    /// section leaves out.
    fn keep(&self, oid: u32, values: Vec<Value>) -> Vec<Value> {
        match self.kept.get(&oid) {
            None => values,
            Some(kept) => values
                .into_iter()
                .enumerate()
                .filter(|(i, _)| kept.contains(i))
                .map(|(_, v)| v)
                .collect(),
        }
    }

    fn table(&self, oid: u32) -> Result<Arc<MasterTable>, Error> {
        self.tables
            .get(&oid)
            .cloned()
            .ok_or_else(|| Error::Invalid {
                doing: "decoding the slot's changes".into(),
                message: format!("a change of table {oid} came before its description"),
            })
    }

    /// A statement queued with `pgreplica.execute`: its row in the log.
    fn execute(&mut self, id: i64, row: Vec<Value>) -> Result<(), Error> {
        let Some(log) = self.log.and_then(|oid| self.tables.get(&oid)).cloned() else {
            return Ok(());
        };
        let row = fields(&log, row, None)?;
        let column = |name: &str| {
            let at = log.columns.iter().position(|c| c == name)?;
            row.get(at).cloned().flatten()
        };
        let mut event = Event {
            id,
            table: 0,
            op: Op::Execute,
            old: None,
            new: Some(vec![column("ev_new")]),
            origin: column("ev_origin")
                .or_else(|| self.origin.clone())
                .or_else(|| self.node.clone()),
            time: Some(self.time),
        };
        let table = match column("ev_op").as_deref() {
            Some("X") => log,
            // The transaction applies changes from another node (multi-master).
            Some("O") => {
                self.origin = column("ev_origin");
                return Ok(());
            }
            // A partition's truncate: its rows, by the partition's constraint.
            Some("T") => {
                let oid = column("ev_table").and_then(|t| t.parse().ok());
                let Some((oid, attached)) = oid.and_then(|o| Some((o, self.attached.get(&o)?)))
                else {
                    return Ok(());
                };
                (event.op, event.table) = (Op::Truncate, oid);
                (event.old, event.new) = (Some(vec![column("ev_old")]), None);
                self.tables.get(&oid).unwrap_or(&attached.now).clone()
            }
            _ => return Ok(()),
        };
        self.settle();
        self.queue.push_back(Item::Change(table, event));
        Ok(())
    }
}

/// The attached tables as the master's catalog has them, by oid.
pub type Catalog = HashMap<u32, Attached>;

/// The statement of [`catalog`], prepared on `master`'s session.
pub async fn catalog_statement(
    master: &Client,
    statements: &mut Prepared,
) -> Result<Statement, Error> {
    let doing = "reading the attached tables' keys on the master";
    statements.get(master, KEYS_SQL, &[]).await.on_master(doing)
}

async fn attached(master: &Client, statements: &mut Prepared) -> Result<Catalog, Error> {
    catalog(master, &catalog_statement(master, statements).await?).await
}

/// The attached tables as the master's catalog has them, through `keys`
/// (from [`catalog_statement`]): sent at once, beside other queries.
pub async fn catalog(master: &Client, keys: &Statement) -> Result<Catalog, Error> {
    let doing = "reading the attached tables' keys on the master";
    let rows = master.query(keys, &[]).await.on_master(doing)?;
    Ok(rows
        .iter()
        .map(|r| {
            let was = match (r.get(2), r.get(3)) {
                (Some(schema), Some(name)) => Some(TableName { schema, name }),
                _ => None,
            };
            let key: Vec<String> = r.get(1);
            let columns: Vec<String> = r.get(6);
            let now = MasterTable {
                name: TableName {
                    schema: r.get(4),
                    name: r.get(5),
                },
                was: None,
                key: key
                    .iter()
                    .filter_map(|k| columns.iter().position(|c| c == k))
                    .collect(),
                columns,
            };
            let logged = now.columns.clone();
            let now = Arc::new(now);
            let operations = r.get(7);
            let attached = Attached {
                key,
                logged,
                operations,
                filter: r.get(8),
                was,
                now,
            };
            (r.get::<_, u32>(0), attached)
        })
        .collect())
}

/// A message's bytes, decoded.
fn decode(data: &[u8]) -> Result<Message, Error> {
    pgoutput::decode(data).map_err(|e| Error::Invalid {
        doing: "decoding the slot's changes".into(),
        message: e.to_string(),
    })
}

/// A row's values as the log's fields; a value left alone by an update is
/// taken from the old row.
fn fields(table: &MasterTable, values: Vec<Value>, old: Option<&Fields>) -> Result<Fields, Error> {
    values
        .into_iter()
        .enumerate()
        .map(|(i, value)| match value {
            Value::Null => Ok(None),
            Value::Text(text) => Ok(Some(text)),
            Value::Unchanged => match old {
                Some(old) => Ok(old.get(i).cloned().flatten()),
                None => Err(no_old_row(table)),
            },
        })
        .collect()
}

fn same_table(item: &Item, table: &Arc<MasterTable>) -> bool {
    matches!(item, Item::Change(t, _) if Arc::ptr_eq(t, table))
}

fn no_old_row(table: &MasterTable) -> Error {
    Error::Schema {
        table: table.name.clone(),
        message: "its updates and deletes do not carry the whole old row in the master's WAL \
                  (REPLICA IDENTITY is not FULL, as for a partition made after install): run \
                  pgreplica install on the master, which sets it, then pgreplica clone for \
                  this table"
            .into(),
    }
}
