//! `check`: compares master and slave, table by table, at one point of the log.
//!
//! The slave is read in one transaction at its progress P (taken under the set's
//! lock, so no batch is half seen); the master in one transaction at a later
//! snapshot S. Rows whose key changed between P and S (the events in flight) are
//! left out and counted. Each table is compared by row counts and checksums
//! over primary-key ranges of the master's key order, narrowed down by halves
//! until a range is small enough to compare row by row, so memory stays bounded
//! whatever the table's size.
//!
//! With `--repair` (`repair.rs`) the rows found different are then made equal
//! on the slave.

mod repair;

use crate::batch::{Ahead, Batch, current_snapshot};
use crate::config::Config;
use crate::db::{self, Prepared, SESSION_SQL, redact};
use crate::error::{Context, Error, Side};
use crate::event::{Op, Origins, Snapshot};
use crate::ident::{TableName, quote_ident};
use crate::pgoutput::Lsn;
use crate::slave::{self, WalProgress};
use crate::wal::{self, read};
use crate::{record, registry};
use std::collections::{HashMap, HashSet};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Transaction};

/// Rows per range whose checksums are compared first.
const CHUNK: i64 = 10_000;
/// Ranges at most this big (on both sides) are compared row by row.
const LEAF: i64 = 1_000;

/// What `check` does with the differences it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Prints them.
    Compare,
    /// Prints them and makes the slave's rows equal to the master's.
    Repair,
    /// Prints them and the statements a repair would run.
    DryRun,
}

/// Differing keys kept for a repair, per table, at most; beyond, the table is
/// better cloned again.
const REPAIR_MAX: usize = 100_000;

/// One difference between master and slave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// A master row the slave lacks.
    Missing(String),
    /// A slave row the master lacks.
    Extra(String),
    /// A row whose values differ: its key and `column: master …, slave …` parts.
    Changed(String, Vec<String>),
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Difference::Missing(key) => write!(f, "missing on the slave: {key}"),
            Difference::Extra(key) => write!(f, "extra on the slave: {key}"),
            Difference::Changed(key, columns) => {
                write!(f, "different: {key}: {}", columns.join("; "))
            }
        }
    }
}

const TABLES_SQL: &str = "
SELECT c.oid, n.nspname, c.relname, pgreplica.logged_columns(c.oid),
       pgreplica.key_columns(c.oid)
  FROM pgreplica.tables t JOIN pg_class c ON c.oid = t.reloid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE cardinality(pgreplica.key_columns(c.oid)) > 0
 ORDER BY n.nspname, c.relname";

const KEY_TYPES_SQL: &str = "
SELECT format_type(a.atttypid, a.atttypmod)
  FROM unnest($2::text[]) WITH ORDINALITY AS k(name, n)
  JOIN pg_attribute a ON a.attrelid = to_regclass($1) AND a.attname = k.name
 ORDER BY k.n";

/// A replicated table as compared: names on the master and on the slave (its
/// `[TABLE]` section may rename it and its columns), key positions.
struct Compared {
    oid: u32,
    name: TableName,
    columns: Vec<String>,
    key: Vec<usize>,
    slave_name: TableName,
    slave_columns: Vec<String>,
}

impl Compared {
    fn name(&self, side: Side) -> &TableName {
        match side {
            Side::Master => &self.name,
            Side::Slave => &self.slave_name,
        }
    }

    fn columns(&self, side: Side) -> &[String] {
        match side {
            Side::Master => &self.columns,
            Side::Slave => &self.slave_columns,
        }
    }

    /// `(k1, k2)=(v1, v2)`, as the log's events name keys.
    pub(super) fn key_text(&self, values: &[String]) -> String {
        let names: Vec<&str> = self.key.iter().map(|&k| self.columns[k].as_str()).collect();
        format!("({})=({})", names.join(", "), values.join(", "))
    }

    /// The row of the master's columns, in the master's order.
    pub(super) fn row(&self, side: Side) -> String {
        let columns: Vec<String> = self.columns(side).iter().map(|c| quote_ident(c)).collect();
        format!("ROW({})", columns.join(", "))
    }

    /// The key columns on one side, each as `{prefix}column{suffix}`.
    pub(super) fn key_list(&self, side: Side, prefix: &str, suffix: &str) -> String {
        let columns = self.columns(side);
        let keys: Vec<String> = self
            .key
            .iter()
            .map(|&k| format!("{prefix}{}{suffix}", quote_ident(&columns[k])))
            .collect();
        keys.join(", ")
    }

    /// Follows the set's `[TABLE]` section; `Err` says why the table cannot be
    /// compared row for row.
    fn adapt(&mut self, set: &Config) -> Result<(), &'static str> {
        let Some(section) = set.section(&self.name) else {
            return Ok(());
        };
        if section.transform.is_some() {
            return Err("its rows are transformed (TRANSFORM)");
        }
        if section.filter.is_some() || section.operations != "IUDT" {
            return Err("the slave holds only part of its changes (FILTER or OPERATIONS)");
        }
        if let Some(slave) = &section.slave_table {
            self.slave_name = slave.clone();
        }
        for (from, to) in &section.renames {
            for c in self.slave_columns.iter_mut().filter(|c| *c == from) {
                *c = to.clone();
            }
        }
        Ok(())
    }
}

/// Checks every slave of `set`; prints what it finds and returns the number of
/// differences left (after a repair, those it could not settle; an `Err` when a
/// side cannot be read).
pub async fn check(set: &Config, tables: &[String], mode: Mode) -> Result<usize, Error> {
    let mut total = 0;
    for (&n, dsn) in &set.slaves {
        println!("set {}, slave {n} ({})", set.name, redact(dsn));
        total += check_slave(set, n, tables, mode).await?;
    }
    Ok(total)
}

async fn check_slave(set: &Config, n: u32, only: &[String], mode: Mode) -> Result<usize, Error> {
    let dsn = &set.slaves[&n];
    let mut master = db::connect(&set.master, None).await?;
    let mut slave = db::connect(dsn, None).await?;
    for client in [&master, &slave] {
        client
            .batch_execute(&format!(
                "{SESSION_SQL}; SET standard_conforming_strings = on"
            ))
            .await
            .doing("setting up the session")?;
    }
    slave::prepare(&slave).await?;

    // The slave at its progress, with no batch half applied.
    slave::hold_set(&slave, &set.name, true).await?;
    let slave_tx = db::read_only(&mut slave)
        .await
        .on_slave("reading the slave")?;
    let progress = slave::read_progress(&slave_tx, &set.name).await?;
    if let Some(progress) = &progress {
        progress.check_master(&set.name, &registry::node(&master).await?)?;
    }
    let wal = progress.as_ref().and_then(|p| p.wal);
    let cloning: HashSet<String> = slave::cloning(&slave_tx, &set.name)
        .await?
        .into_iter()
        .map(|(table, _)| table)
        .collect();
    // Under WAL capture the slot is copied while the slave cannot move: the
    // copy starts at or before the slave's position, never past it.
    let copy = match wal {
        Some(_) => Some(copy_slot(set, n).await?),
        None => None,
    };
    slave::hold_set(&slave_tx, &set.name, false).await?;
    let Some(position) = progress.map(|p| p.snapshot) else {
        return Err(Error::Invalid {
            doing: "checking".into(),
            message: "the slave has not replicated this set yet (run pgreplica clone or run)"
                .into(),
        });
    };

    let master_tx = db::read_only(&mut master)
        .await
        .on_master("reading the master")?;
    let snapshot = current_snapshot(&master_tx).await?;
    let mut tables = replicated(&master_tx, only).await?;
    let mut in_flight = match (wal, copy) {
        (Some(wal), Some(copy)) => {
            let flushed = read::head(&master_tx).await?.flush;
            let position = format!("{}", wal.at);
            println!("under WAL capture: the slave is at {position} of the master's WAL");
            wal_in_flight(copy, wal, flushed).await?
        }
        _ => in_flight(&master_tx, &position, &snapshot).await?,
    };
    let flying: usize = in_flight.values().map(HashSet::len).sum();
    println!(
        "compared at the slave's position {position} and master snapshot {snapshot}; \
         {flying} row(s) changing in between are left out"
    );
    let mut total = 0;
    let mut repairs = Vec::new();
    for (index, table) in tables.iter_mut().enumerate() {
        let name = table.name.quoted();
        if cloning.contains(&name) {
            println!("{name}: being cloned, not compared");
            continue;
        }
        if let Err(why) = table.adapt(set) {
            println!("{name}: not compared: {why}");
            continue;
        }
        let table = &*table;
        let on_slave: bool = slave_tx
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL",
                &[&table.slave_name.quoted()],
            )
            .await
            .on_slave("reading the slave's catalog")?
            .get(0);
        if !on_slave {
            println!(
                "{name}: the table is missing on the slave (pgreplica clone creates and copies it)"
            );
            total += 1;
            continue;
        }
        let skip = in_flight.remove(&table.oid).unwrap_or_default();
        let key_types = [
            key_types(&master_tx, table, Side::Master).await?,
            key_types(&slave_tx, table, Side::Slave).await?,
        ];
        let mut compare = Compare {
            master: &master_tx,
            slave: &slave_tx,
            table,
            key_types,
            skip: &skip,
            differences: 0,
            found: (mode != Mode::Compare).then(Vec::new),
        };
        let rows = compare.table().await?;
        total += compare.differences;
        match compare.differences {
            0 => println!("{name}: {rows} rows, equal"),
            n => println!("{name}: {rows} rows on the master, {n} difference(s)"),
        }
        let Some(found) = compare.found.take().filter(|f| !f.is_empty()) else {
            continue;
        };
        if compare.differences > REPAIR_MAX {
            println!(
                "{name}: more than {REPAIR_MAX} differences, not repaired row by row: \
                 pgreplica clone {} --slave {n} --table {name} --truncate copies it again",
                set.path.display()
            );
            continue;
        }
        repairs.push((index, compare.key_types.clone(), found));
    }
    // The comparison's transactions end before any repair: a repair waits for
    // the set's lock, which a daemon starting meanwhile may wait behind them.
    slave_tx.commit().await.on_slave("reading the slave")?;
    master_tx.commit().await.on_master("reading the master")?;
    for (index, key_types, found) in repairs {
        let dry_run = mode == Mode::DryRun;
        let repaired = repair::repair(set, n, &tables[index], key_types, found, dry_run).await?;
        if !dry_run {
            total -= repaired;
        }
    }
    Ok(total)
}

/// The replicated tables with their columns and keys: all, or those named.
async fn replicated(master: &Transaction<'_>, only: &[String]) -> Result<Vec<Compared>, Error> {
    let mut wanted = HashSet::new();
    for name in only {
        let oid: Option<u32> = master
            .query_one("SELECT to_regclass($1)::oid", &[name])
            .await
            .on_master("reading the master's catalog")?
            .get(0);
        wanted.insert(oid.ok_or_else(|| Error::Invalid {
            doing: format!("checking table {name}"),
            message: "no such table on the master".into(),
        })?);
    }
    let rows = master
        .query(TABLES_SQL, &[])
        .await
        .on_master("listing the replicated tables (is pgreplica installed on the master?)")?;
    let mut tables = Vec::new();
    for r in rows {
        let oid: u32 = r.get(0);
        if !wanted.is_empty() && !wanted.contains(&oid) {
            continue;
        }
        let columns: Vec<String> = r.get(3);
        let keys: Vec<String> = r.get(4);
        let key = keys
            .iter()
            .filter_map(|k| columns.iter().position(|c| c == k))
            .collect();
        let name = TableName {
            schema: r.get(1),
            name: r.get(2),
        };
        tables.push(Compared {
            oid,
            slave_name: name.clone(),
            name,
            slave_columns: columns.clone(),
            columns,
            key,
        });
    }
    Ok(tables)
}

/// Keys (as `(k)=(v)`) of the rows changed between the two positions, by table.
async fn in_flight(
    master: &Transaction<'_>,
    position: &Snapshot,
    snapshot: &Snapshot,
) -> Result<HashMap<u32, HashSet<String>>, Error> {
    let mut keys: HashMap<u32, HashSet<String>> = HashMap::new();
    // Every origin: a row in flight is left out whichever node changed it.
    let all = Origins::default();
    let mut prepared = Prepared::default();
    let to = snapshot.clone();
    let mut events = Batch::between(
        master,
        &mut prepared,
        (position, to),
        0,
        None,
        &all,
        &Ahead::default(),
    )
    .await?;
    while let Some((table, event)) = events.next().await? {
        if event.op == Op::Execute {
            continue;
        }
        let entry = keys.entry(event.table).or_default();
        for row in [&event.old, &event.new].into_iter().flatten() {
            entry.insert(table.key_text(row));
        }
    }
    Ok(keys)
}

/// A temporary copy of slave `slave`'s slot, on a session of its own (the
/// copy goes with it), which the daemon may be reading meanwhile.
async fn copy_slot(set: &Config, slave: u32) -> Result<(Client, String), Error> {
    let master = db::connect(&set.master, None).await?;
    read::session(&master).await?;
    let copy = format!("pgreplica_check_{}_{slave}", std::process::id());
    master
        .execute(
            "SELECT pg_copy_logical_replication_slot($1, $2, true)",
            &[&wal::slot_name(&set.name, slave), &copy],
        )
        .await
        .on_master("copying the slave's replication slot to read what it has not applied")?;
    Ok((master, copy))
}

/// Under WAL capture, the keys of the rows changed by the transactions the
/// slave has not applied, up to `upto` (read after the master's snapshot),
/// from the copy of its slot.
async fn wal_in_flight(
    (master, copy): (Client, String),
    from: WalProgress,
    upto: Lsn,
) -> Result<HashMap<u32, HashSet<String>>, Error> {
    let on_master = (&master, &mut crate::db::Prepared::default());
    let mut changes = read::Changes::start(on_master, (&copy, None, None), upto, u64::MAX).await?;
    let mut keys: HashMap<u32, HashSet<String>> = HashMap::new();
    let mut unapplied = false;
    while let Some(item) = changes.next().await? {
        match item {
            read::Item::Begin { commit } => unapplied = commit >= from.at,
            read::Item::Change(table, event) if unapplied && event.op != Op::Execute => {
                let entry = keys.entry(event.table).or_default();
                for row in [&event.old, &event.new].into_iter().flatten() {
                    entry.insert(table.key_text(row));
                }
            }
            _ => {}
        }
    }
    Ok(keys)
}

/// A key range `(lo, hi]` in the master's key order; `None` is unbounded.
#[derive(Clone)]
struct Range {
    lo: Option<Vec<String>>,
    hi: Option<Vec<String>>,
}

struct Compare<'a> {
    master: &'a Transaction<'a>,
    slave: &'a Transaction<'a>,
    table: &'a Compared,
    /// The key columns' types on the master and on the slave.
    key_types: [Vec<String>; 2],
    skip: &'a HashSet<String>,
    differences: usize,
    /// For a repair: the key values of the rows found different.
    found: Option<Vec<Vec<String>>>,
}

impl Compare<'_> {
    /// Compares the whole table, a chunk of master rows at a time; returns the
    /// master's row count.
    async fn table(&mut self) -> Result<i64, Error> {
        let mut lo = None;
        let mut rows = 0;
        loop {
            let hi = self.boundary(Side::Master, &lo, CHUNK).await?;
            let range = Range {
                lo: lo.clone(),
                hi: hi.clone(),
            };
            rows += self.range(range).await?;
            match hi {
                Some(hi) => lo = Some(hi),
                None => return Ok(rows),
            }
        }
    }

    /// Compares one range, narrowing it where the checksums differ; returns the
    /// master's row count in it.
    async fn range(&mut self, range: Range) -> Result<i64, Error> {
        let mut stack = vec![range];
        let mut master_rows = None;
        while let Some(range) = stack.pop() {
            let (m_count, m_sum) = self.checksum(Side::Master, &range).await?;
            let (s_count, s_sum) = self.checksum(Side::Slave, &range).await?;
            master_rows.get_or_insert(m_count);
            if (m_count, &m_sum) == (s_count, &s_sum) {
                continue;
            }
            if m_count.max(s_count) <= LEAF {
                self.rows(&range).await?;
                continue;
            }
            // Split at the middle key of the side with more rows.
            let (side, count) = if m_count >= s_count {
                (Side::Master, m_count)
            } else {
                (Side::Slave, s_count)
            };
            let Some(mid) = self.boundary(side, &range.lo, count / 2).await? else {
                self.rows(&range).await?;
                continue;
            };
            stack.push(Range {
                lo: Some(mid.clone()),
                hi: range.hi.clone(),
            });
            stack.push(Range {
                lo: range.lo,
                hi: Some(mid),
            });
        }
        Ok(master_rows.unwrap_or(0))
    }

    /// The key `n` rows after `lo` on one side (the last key of a chunk of `n`),
    /// or `None` when fewer rows follow.
    async fn boundary(
        &self,
        side: Side,
        lo: &Option<Vec<String>>,
        n: i64,
    ) -> Result<Option<Vec<String>>, Error> {
        let range = Range {
            lo: lo.clone(),
            hi: None,
        };
        let (condition, params) = self.condition(side, &range);
        let keys = self.table.key_list(side, "", "::text");
        let sql = format!(
            "SELECT {keys} FROM {t} AS pgreplica_t WHERE {condition} \
             ORDER BY {order} OFFSET {offset} LIMIT 1",
            t = self.table.name(side),
            // Qualified: the bare names would sort the text columns of the
            // select list, in another order than the ranges' conditions.
            order = self.table.key_list(side, "pgreplica_t.", ""),
            offset = (n - 1).max(0),
        );
        let row = self
            .tx(side)
            .query_opt(&sql, &refs(&params))
            .await
            .doing(&format!("reading {}'s keys", self.table.name))?;
        Ok(row.map(|r| (0..self.table.key.len()).map(|i| r.get(i)).collect()))
    }

    /// Row count and checksum of a range on one side.
    async fn checksum(&self, side: Side, range: &Range) -> Result<(i64, String), Error> {
        let (condition, params) = self.condition(side, range);
        let sql = format!(
            "SELECT count(*), coalesce(sum(hashtextextended({row}::text, 0)), 0)::text \
             FROM {t} WHERE {condition}",
            row = self.table.row(side),
            t = self.table.name(side),
        );
        let r = self
            .tx(side)
            .query_one(&sql, &refs(&params))
            .await
            .doing(&format!("checksumming {}", self.table.name))?;
        Ok((r.get(0), r.get(1)))
    }

    /// Compares a small range row by row and prints the differences.
    async fn rows(&mut self, range: &Range) -> Result<(), Error> {
        let master = self.fetch(Side::Master, range).await?;
        let slave = self.fetch(Side::Slave, range).await?;
        let mut found = Vec::new();
        for (key, (values, m)) in &master {
            match slave.get(key) {
                None => found.push((values, Difference::Missing(key.clone()))),
                Some((_, s)) if s != m => {
                    found.push((values, Difference::Changed(key.clone(), self.columns(m, s))))
                }
                Some(_) => {}
            }
        }
        for (key, (values, _)) in slave.iter().filter(|(k, _)| !master.contains_key(*k)) {
            found.push((values, Difference::Extra(key.clone())));
        }
        for (values, difference) in found {
            let key = match &difference {
                Difference::Missing(k) | Difference::Extra(k) | Difference::Changed(k, _) => k,
            };
            if self.skip.contains(key) {
                continue;
            }
            self.differences += 1;
            println!("{}: {difference}", self.table.name);
            if let Some(keys) = self.found.as_mut().filter(|k| k.len() <= REPAIR_MAX) {
                keys.push(values.clone());
            }
        }
        Ok(())
    }

    /// A range's rows on one side: key text → key values and row text.
    async fn fetch(
        &self,
        side: Side,
        range: &Range,
    ) -> Result<HashMap<String, (Vec<String>, String)>, Error> {
        let (condition, params) = self.condition(side, range);
        let sql = format!(
            "SELECT {keys}, {row}::text FROM {t} WHERE {condition}",
            keys = self.table.key_list(side, "", "::text"),
            row = self.table.row(side),
            t = self.table.name(side),
        );
        let rows = self
            .tx(side)
            .query(&sql, &refs(&params))
            .await
            .doing(&format!("reading {}", self.table.name))?;
        let width = self.table.key.len();
        Ok(rows
            .iter()
            .map(|r| {
                let values: Vec<String> = (0..width).map(|i| r.get(i)).collect();
                (self.table.key_text(&values), (values, r.get(width)))
            })
            .collect())
    }

    /// `col: master …, slave …` for each column that differs.
    fn columns(&self, master: &str, slave: &str) -> Vec<String> {
        let (Ok(m), Ok(s)) = (record::parse(master), record::parse(slave)) else {
            return vec![format!("master {master}, slave {slave}")];
        };
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "NULL".into());
        self.table
            .columns
            .iter()
            .zip(m.iter().zip(&s))
            .filter(|(_, (a, b))| a != b)
            .map(|(c, (a, b))| format!("{c}: master {}, slave {}", show(a), show(b)))
            .collect()
    }

    fn tx(&self, side: Side) -> &Transaction<'_> {
        match side {
            Side::Master => self.master,
            Side::Slave => self.slave,
        }
    }

    /// `(k) > (lo) AND (k) <= (hi)`, the bounds as text parameters cast to the
    /// key columns' types on that side.
    fn condition(&self, side: Side, range: &Range) -> (String, Vec<String>) {
        let key = format!("({})", self.table.key_list(side, "", ""));
        let types = &self.key_types[usize::from(side == Side::Slave)];
        let mut parts = vec!["true".to_string()];
        let mut params = Vec::new();
        for (bound, op) in [(&range.lo, ">"), (&range.hi, "<=")] {
            let Some(values) = bound else { continue };
            let mut casts = Vec::new();
            for (value, kind) in values.iter().zip(types) {
                params.push(value.clone());
                casts.push(format!("${}::text::{kind}", params.len()));
            }
            parts.push(format!("{key} {op} ({})", casts.join(", ")));
        }
        (parts.join(" AND "), params)
    }
}

fn refs(params: &[String]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

/// The types of a table's key columns, in key order, on one server.
async fn key_types(
    tx: &Transaction<'_>,
    table: &Compared,
    side: Side,
) -> Result<Vec<String>, Error> {
    let columns = table.columns(side);
    let names: Vec<&str> = table.key.iter().map(|&k| columns[k].as_str()).collect();
    let name = table.name(side);
    let rows = tx
        .query(KEY_TYPES_SQL, &[&name.quoted(), &names])
        .await
        .doing(&format!("reading {name}'s key types"))?;
    if rows.len() != names.len() {
        return Err(Error::Schema {
            table: name.clone(),
            message: format!(
                "a key column ({}) is missing on one side: make both definitions the same",
                names.join(", ")
            ),
        });
    }
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
