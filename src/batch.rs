//! Batches: the events whose transactions committed between two snapshots of a master.
//!
//! Event ids are not commit order: a transaction may take id 100 and commit after
//! one that took id 101. A batch is therefore cut by snapshots, not ids: it holds
//! the events of every transaction visible in the new snapshot and not in the
//! previous one, so each committed event falls in exactly one batch, and an open
//! transaction's events simply wait for a later one. Inside a batch events go in id
//! order, which row locks make consistent with commit order for any one row.

use crate::db::Prepared;
use crate::error::{Context, Error};
use crate::event::{Event, MasterTable, Op, Origins, Snapshot};
use crate::ident::TableName;
use crate::record::{self, Fields};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Portal, Statement, Transaction};

const SNAPSHOT_SQL: &str = "SELECT txid_current_snapshot()::text";

/// The types of the log query's parameters: the batch's range (the two
/// snapshots, the transactions running at the first, the two ends), its
/// filters (table, origin left out, local events only), the event it starts
/// after, and how many it reads.
const EVENTS_TYPES: [Type; 10] = [
    Type::TEXT,
    Type::TEXT,
    Type::INT8_ARRAY,
    Type::INT8,
    Type::INT8,
    Type::OID,
    Type::TEXT,
    Type::BOOL,
    Type::INT8,
    Type::INT8,
];

// Two index-friendly ranges: the transactions that were running at the previous
// snapshot, and those that started since. Visibility then keeps exactly the ones
// that committed in between. The first is not scanned at all when none were
// running (the server leaves it out of the plan).
const EVENTS_SQL: &str = "
SELECT ev_id, ev_table, ev_op, ev_old, ev_new, ev_origin, extract(epoch FROM ev_time)::float8 FROM (
    SELECT * FROM pgreplica.log WHERE cardinality($3::bigint[]) > 0 AND ev_txid = ANY ($3::bigint[])
    UNION ALL
    SELECT * FROM pgreplica.log WHERE ev_txid >= $4 AND ev_txid < $5
) AS l
WHERE txid_visible_in_snapshot(ev_txid, $2::text::txid_snapshot)
  AND NOT txid_visible_in_snapshot(ev_txid, $1::text::txid_snapshot)
  AND ($6::oid IS NULL OR ev_table = $6)
  AND ($7::text IS NULL OR ev_origin IS DISTINCT FROM $7)
  AND (NOT $8 OR ev_origin IS NULL)
  AND ev_id > $9
  AND ev_op <> 'O'
ORDER BY ev_id
LIMIT $10";

// Tables of the log: from the catalog, or, when one was dropped since, from
// the definition pgreplica kept when it was last attached.
// The name each had when it was attached comes along.
// Each table is looked up by its oid through the catalog's indexes, whatever
// the number of tables: the plan is kept for the reader's session.
const TABLES_SQL: &str = "
SELECT x.* FROM unnest($1::oid[]) AS q(oid), LATERAL (
  SELECT c.oid, n.nspname, c.relname, d.logged, d.key, false, t.layout->>'schema', t.layout->>'name'
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pgreplica.described d ON d.reloid = c.oid
    LEFT JOIN pgreplica.tables t ON t.reloid = c.oid
   WHERE c.oid = q.oid
  OFFSET 0) AS x
UNION ALL
SELECT t.reloid, t.layout->>'schema', t.layout->>'name',
       ARRAY(SELECT jsonb_array_elements_text(t.layout->'columns')),
       ARRAY(SELECT jsonb_array_elements_text(t.layout->'key')), true, NULL, NULL
  FROM pgreplica.tables t
 WHERE t.reloid = ANY ($1::oid[]) AND t.layout IS NOT NULL
   AND NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = t.reloid)";

/// Tables described before a batch's events are read, at most: those of
/// the batch before, which the next one likely holds too.
pub const DESCRIBED_AHEAD: usize = 64;

/// What the batch before says of the next: its master tables (oids), and
/// how many events its rows' size lets the first read take, from 16 to 256
/// (a batch read whole at first is not scanned again through a cursor).
#[derive(Debug, Clone)]
pub struct Ahead {
    tables: Vec<u32>,
    first: i32,
}

impl Default for Ahead {
    fn default() -> Ahead {
        Ahead {
            tables: Vec::new(),
            first: FETCH_FIRST,
        }
    }
}

/// The table definitions an execute event kept (see `pgreplica.layouts()`).
fn read_layouts(id: i64, text: &str) -> Result<HashMap<u32, Arc<MasterTable>>, Error> {
    #[derive(serde::Deserialize)]
    struct Layout {
        schema: String,
        name: String,
        columns: Vec<String>,
        key: Vec<String>,
    }
    let layouts: HashMap<String, Layout> =
        serde_json::from_str(text).map_err(|e| Error::Invalid {
            doing: format!("reading execute event {id}"),
            message: format!("unreadable table definitions: {e}"),
        })?;
    Ok(layouts
        .into_iter()
        .filter_map(|(oid, l)| {
            let key = l
                .key
                .iter()
                .filter_map(|k| l.columns.iter().position(|c| c == k))
                .collect();
            let table = MasterTable {
                name: TableName {
                    schema: l.schema,
                    name: l.name,
                },
                columns: l.columns,
                key,
                was: None,
            };
            Some((oid.parse().ok()?, Arc::new(table)))
        })
        .collect())
}

/// The master's current snapshot, read in `tx`.
pub async fn current_snapshot(tx: &Transaction<'_>) -> Result<Snapshot, Error> {
    let doing = "taking a snapshot of the master";
    let row = tx
        .query_typed_one(SNAPSHOT_SQL, &[])
        .await
        .on_master(doing)?;
    let text: String = row.get(0);
    Snapshot::parse(&text).ok_or_else(|| Error::Invalid {
        doing: doing.into(),
        message: format!("unreadable snapshot '{text}'"),
    })
}

// The execute events of the batch, with the definitions from before each.
const EXECUTES_SQL: &str = "
SELECT ev_id, ev_old FROM (
    SELECT * FROM pgreplica.log WHERE cardinality($3::bigint[]) > 0 AND ev_txid = ANY ($3::bigint[])
    UNION ALL
    SELECT * FROM pgreplica.log WHERE ev_txid >= $4 AND ev_txid < $5
) AS l
WHERE ev_op = 'X'
  AND txid_visible_in_snapshot(ev_txid, $2::text::txid_snapshot)
  AND NOT txid_visible_in_snapshot(ev_txid, $1::text::txid_snapshot)
ORDER BY ev_id";

/// Events fetched from the master at a time, at most and at first: the next
/// fetch is sized from the rows of the last one so that it holds about
/// FETCH_BYTES, so memory follows bytes, not row counts (a log of 1 MB rows is
/// read a few rows at a time).
const FETCH_MAX: i32 = 2000;
const FETCH_FIRST: i32 = 16;
const FIRST_MAX: i32 = 256;
const FETCH_BYTES: usize = 4 << 20;

/// What selects a batch's events: the log query's parameters but the last two.
struct Range {
    prev: String,
    snapshot: String,
    xip: Vec<i64>,
    from: i64,
    to: i64,
    table: Option<u32>,
    origin: Option<String>,
    local_only: bool,
}

impl Range {
    /// The log query's parameters, from the event after `after` on, `limit`
    /// of them (`None`: all).
    fn params<'a>(
        &'a self,
        after: &'a i64,
        limit: &'a Option<i64>,
    ) -> [&'a (dyn ToSql + Sync); 10] {
        [
            &self.prev,
            &self.snapshot,
            &self.xip,
            &self.from,
            &self.to,
            &self.table,
            &self.origin,
            &self.local_only,
            after,
            limit,
        ]
    }
}

/// An open batch: the new snapshot and its events, read a few at first, then,
/// past those, through a cursor.
pub struct Batch<'t> {
    tx: &'t Transaction<'t>,
    range: Range,
    /// The cursor over the events after the first ones, once opened.
    portal: Option<Portal>,
    /// The last event read.
    last: i64,
    events: Statement,
    tables_stmt: Statement,
    /// The catalog's rows of the tables described ahead, by oid.
    described: HashMap<u32, tokio_postgres::Row>,
    tables: HashMap<u32, Arc<MasterTable>>,
    /// Each execute event of the batch (id) with the definitions of the tables
    /// from before it: the events logged earlier are read with those.
    layouts: Vec<(i64, HashMap<u32, Arc<MasterTable>>)>,
    /// Stands for the table of execute events, which have none.
    no_table: Arc<MasterTable>,
    /// Tables (quoted names) whose events are passed on without their rows.
    skipped: HashSet<String>,
    /// The master's node name, origin of the events logged without one.
    master_node: Option<String>,
    buffered: std::vec::IntoIter<tokio_postgres::Row>,
    /// Events the next fetch asks for.
    fetch: i32,
    done: bool,
    /// The snapshot this batch ends at.
    pub snapshot: Snapshot,
}

impl<'t> Batch<'t> {
    /// Opens the events of transactions visible in `snapshot` and not in `prev`,
    /// from the one after event `after` on (0: all), only those of the master
    /// table `table` when one is given, and only those `origins` lets through.
    /// The batch's execute events, its first events and the tables of
    /// `ahead` (at most [`DESCRIBED_AHEAD`]) are read in one round trip: a
    /// small batch of tables described ahead needs no other.
    pub async fn between(
        tx: &'t Transaction<'t>,
        prepared: &mut Prepared,
        (prev, snapshot): (&Snapshot, Snapshot),
        after: i64,
        table: Option<u32>,
        origins: &Origins,
        ahead: &Ahead,
    ) -> Result<Batch<'t>, Error> {
        let doing = "reading the master's log";
        let tables_stmt = prepared.get(tx, TABLES_SQL, &[]).await.on_master(doing)?;
        let range = Range {
            prev: prev.to_string(),
            snapshot: snapshot.to_string(),
            xip: prev.xip.clone(),
            from: prev.xmax,
            to: snapshot.xmax,
            table,
            origin: origins.slave.clone(),
            local_only: origins.local_only,
        };
        // Both log queries go out at once. Whatever their range, they scan
        // the log's BRIN index over it: a plan kept for the session does
        // (see the reader's session), without planning each batch anew.
        let types = &EVENTS_TYPES;
        let events = prepared.get(tx, EVENTS_SQL, types).await.on_master(doing)?;
        let executes = prepared.get(tx, EXECUTES_SQL, &types[..5]).await;
        let executes = executes.on_master(doing)?;
        let first = Some(i64::from(ahead.first));
        let params = range.params(&after, &first);
        let ahead = &ahead.tables[..ahead.tables.len().min(DESCRIBED_AHEAD)];
        let described = async {
            match ahead.is_empty() {
                true => Ok(Vec::new()),
                false => tx.query(&tables_stmt, &[&ahead]).await,
            }
        };
        let (executes, rows, described) = tokio::try_join!(
            tx.query(&executes, &params[..5]),
            tx.query(&events, &params),
            described
        )
        .on_master(doing)?;
        let mut layouts = Vec::new();
        for row in executes {
            let id: i64 = row.get(0);
            let text: Option<String> = row.get(1);
            layouts.push((id, read_layouts(id, text.as_deref().unwrap_or("{}"))?));
        }
        let mut batch = Batch {
            tx,
            range,
            portal: None,
            last: after,
            events,
            tables_stmt,
            described: described.into_iter().map(|r| (r.get(0), r)).collect(),
            tables: HashMap::new(),
            layouts,
            no_table: Arc::new(MasterTable {
                name: TableName {
                    schema: "pgreplica".into(),
                    name: "execute".into(),
                },
                ..MasterTable::default()
            }),
            skipped: HashSet::new(),
            master_node: origins.master.clone(),
            buffered: Vec::new().into_iter(),
            fetch: first.map_or(FETCH_FIRST, |f| f as i32),
            done: false,
            snapshot,
        };
        batch.take(rows);
        Ok(batch)
    }

    /// Passes the events of these tables (quoted names) on without reading
    /// their rows: the caller skips them (tables being cloned), and rows logged
    /// with a definition that no longer holds must not stop it.
    pub fn skip(&mut self, tables: HashSet<String>) {
        self.skipped = tables;
    }

    /// The next event and its table, or `None` at the end of the batch.
    pub async fn next(&mut self) -> Result<Option<(Arc<MasterTable>, Event)>, Error> {
        let doing = "reading the master's log";
        let row = match self.buffered.next() {
            Some(row) => row,
            None if self.done => return Ok(None),
            None => {
                let portal = match self.portal.take() {
                    Some(portal) => portal,
                    None => {
                        let params = self.range.params(&self.last, &None);
                        let events = &self.events;
                        self.tx.bind(events, &params).await.on_master(doing)?
                    }
                };
                let rows = self
                    .tx
                    .query_portal(&portal, self.fetch)
                    .await
                    .on_master(doing)?;
                self.portal = Some(portal);
                self.take(rows);
                match self.buffered.next() {
                    Some(row) => row,
                    None => return Ok(None),
                }
            }
        };
        self.last = row.get(0);
        let id: i64 = row.get(0);
        let oid: u32 = row.get(1);
        let origin: Option<String> = row
            .get::<_, Option<String>>(5)
            .or_else(|| self.master_node.clone());
        let time: Option<f64> = row.get(6);
        let op = match row.get::<_, i8>(2) as u8 {
            b'I' => Op::Insert,
            b'U' => Op::Update,
            b'D' => Op::Delete,
            b'T' => Op::Truncate,
            b'X' => {
                let sql: Option<String> = row.get(4);
                let event = Event {
                    id,
                    table: 0,
                    op: Op::Execute,
                    old: None,
                    new: Some(vec![sql]),
                    origin,
                    time,
                };
                return Ok(Some((self.no_table.clone(), event)));
            }
            other => {
                return Err(Error::Invalid {
                    doing: doing.into(),
                    message: format!("event {id} has unknown operation '{}'", other as char),
                });
            }
        };
        let table = match self
            .layouts
            .iter()
            .find(|(x, tables)| *x > id && tables.contains_key(&oid))
        {
            Some((_, tables)) => tables[&oid].clone(),
            None => self.table(oid, id).await?,
        };
        if self.skipped.contains(&table.name.quoted()) {
            let event = Event {
                id,
                table: oid,
                op,
                old: None,
                new: None,
                origin,
                time,
            };
            return Ok(Some((table, event)));
        }
        let fields = |text: Option<String>| -> Result<Option<Fields>, Error> {
            let Some(text) = text else { return Ok(None) };
            let fields = record::parse(&text).map_err(|e| Error::Invalid {
                doing: format!("reading event {id}"),
                message: e.to_string(),
            })?;
            if fields.len() != table.columns.len() {
                return Err(Error::Schema {
                    table: table.name.clone(),
                    message: format!(
                        "event {id} has {} columns but the master's table now has {} ({}): its \
                         definition changed after the event was logged, without pgreplica \
                         execute. To recover: make the same change on the slave, then \
                         pgreplica clone CONF --table {} --truncate (its pending events are \
                         replaced by a fresh copy). Make schema changes with pgreplica execute.",
                        fields.len(),
                        table.columns.len(),
                        table.columns.join(", "),
                        table.name
                    ),
                });
            }
            Ok(Some(fields))
        };
        // A partition's truncate keeps its constraint where rows go.
        let old = match op {
            Op::Truncate => row.get::<_, Option<String>>(3).map(|c| vec![Some(c)]),
            _ => fields(row.get(3))?,
        };
        let event = Event {
            id,
            table: oid,
            op,
            old,
            new: fields(row.get(4))?,
            origin,
            time,
        };
        Ok(Some((table, event)))
    }

    /// Takes `rows`, the answer to a fetch of `self.fetch` events, and sizes
    /// the next fetch from their bytes.
    fn take(&mut self, rows: Vec<tokio_postgres::Row>) {
        self.done = rows.len() < self.fetch as usize;
        // No rows say nothing of their size.
        if !rows.is_empty() {
            let bytes: usize = rows
                .iter()
                .flat_map(|r| [r.get::<_, Option<&str>>(3), r.get::<_, Option<&str>>(4)])
                .map(|v| v.map_or(0, str::len))
                .sum();
            let per_row = (bytes / rows.len()).max(1);
            self.fetch = (FETCH_BYTES / per_row).clamp(1, FETCH_MAX as usize) as i32;
        }
        self.buffered = rows.into_iter();
    }

    async fn table(&mut self, oid: u32, event: i64) -> Result<Arc<MasterTable>, Error> {
        if let Some(t) = self.tables.get(&oid) {
            return Ok(t.clone());
        }
        let row = match self.described.remove(&oid) {
            Some(row) => Some(row),
            None => self
                .tx
                .query_opt(&self.tables_stmt, &[&[oid].as_slice()])
                .await
                .on_master("reading the master's catalog")?,
        };
        let row = row.ok_or_else(|| Error::Invalid {
            doing: format!("reading event {event}"),
            message: format!(
                "its table (oid {oid}) no longer exists on the master, and pgreplica kept \
                     no definition of it (it was attached by an older pgreplica): its events \
                     cannot be read. Run pgreplica clone CONF --slave N --truncate"
            ),
        })?;
        let columns: Vec<String> = row.get(3);
        let key_names: Vec<String> = row.get(4);
        let name = TableName {
            schema: row.get(1),
            name: row.get(2),
        };
        let key: Vec<usize> = key_names
            .iter()
            .filter_map(|k| columns.iter().position(|c| c == k))
            .collect();
        if key.is_empty() {
            return Err(Error::Schema {
                table: name,
                message: "the master's table no longer has a primary key".into(),
            });
        }
        if row.get::<_, bool>(5) {
            tracing::warn!(
                "table {name} was dropped on the master while its events waited: they are \
                 applied, and its copy on the slave is kept (drop it there when it is no \
                 longer wanted)"
            );
        }
        let kept: (Option<String>, Option<String>) = (row.get(6), row.get(7));
        let was = match kept {
            (Some(schema), Some(name)) => Some(TableName { schema, name }),
            _ => None,
        }
        .filter(|was| *was != name);
        let table = Arc::new(MasterTable {
            name,
            columns,
            key,
            was,
        });
        self.tables.insert(oid, table.clone());
        Ok(table)
    }

    /// What the batch says of the next one: the master tables whose events
    /// it held (none: the next keeps `before`'s), and its rows' size.
    pub fn ahead(&self, before: &Ahead) -> Ahead {
        let tables: Vec<u32> = self.tables.keys().copied().collect();
        Ahead {
            tables: match tables.is_empty() {
                true => before.tables.clone(),
                false => tables,
            },
            first: self.fetch.clamp(FETCH_FIRST, FIRST_MAX),
        }
    }
}
