//! `check --repair`: makes the slave's rows equal to the master's for the keys
//! found different, a chunk of keys at a time.
//!
//! Each chunk is one slave transaction that holds the set's lock, so no batch
//! of the daemon runs meanwhile, and reads the master at a snapshot taken then:
//! a key with no event between the slave's progress and that snapshot has, on
//! the master, the value the slave should have now. A key that has such events
//! is left to replication (and said so). Killed halfway, a repair leaves whole
//! chunks behind; run again, it finds what is left.

use super::{Compared, in_flight, refs};
use crate::apply::SLAVE_TABLE_SQL;
use crate::batch::current_snapshot;
use crate::config::Config;
use crate::db::{self, SESSION_SQL};
use crate::error::{Context, Error, Side};
use crate::ident::quote_ident;
use crate::record::{self, Fields};
use crate::slave;
use std::collections::HashMap;
use tokio_postgres::{Client, GenericClient};

/// Keys repaired in one slave transaction.
const CHUNK: usize = 500;

/// What one key needs on the slave.
enum Fix {
    Insert(Fields),
    Update(Fields),
    Delete,
}

/// Repairs `keys` of `table` on slave `n`; returns how many were repaired (or,
/// in a dry run, would be).
pub(super) async fn repair(
    set: &Config,
    n: u32,
    table: &Compared,
    key_types: [Vec<String>; 2],
    keys: Vec<Vec<String>>,
    dry_run: bool,
) -> Result<usize, Error> {
    let mut master = db::connect(&set.master, set.keepalive).await?;
    let mut slave = slave::writer(set, n).await?;
    master
        .batch_execute(SESSION_SQL)
        .await
        .on_master("setting up the session")?;
    let types = slave_types(&slave, table).await?;
    let name = &table.slave_name;
    let mut repaired = 0;
    let mut changing = 0;
    for chunk in keys.chunks(CHUNK) {
        let tx = slave.transaction().await.on_slave("starting a repair")?;
        slave::mark_origin(&tx).await?;
        let (progress, cloning) = slave::lock_set(&tx, &set.name).await?;
        if cloning.contains(&name.quoted()) {
            println!("{name}: being cloned now, not repaired");
            return Ok(repaired);
        }
        let Some(position) = progress.map(|p| p.snapshot) else {
            return Ok(repaired);
        };
        let master_tx = db::read_only(&mut master)
            .await
            .on_master("reading the master")?;
        let snapshot = current_snapshot(&master_tx).await?;
        let flying = in_flight(&master_tx, &position, &snapshot)
            .await?
            .remove(&table.oid)
            .unwrap_or_default();
        let on_master = rows(&master_tx, table, Side::Master, &key_types[0], chunk).await?;
        let on_slave = rows(&tx, table, Side::Slave, &key_types[1], chunk).await?;
        for key in chunk {
            let text = table.key_text(key);
            if flying.contains(&text) {
                changing += 1;
                continue;
            }
            // What the slave computes itself, and the key, are not written.
            let differs = |m: &Fields, s: &Fields| {
                (0..m.len()).any(|i| !types[i].1 && !table.key.contains(&i) && m[i] != s[i])
            };
            let fix = match (on_master.get(&text), on_slave.get(&text)) {
                (Some(m), None) => Fix::Insert(m.clone()),
                (Some(m), Some(s)) if differs(m, s) => Fix::Update(m.clone()),
                (None, Some(_)) => Fix::Delete,
                _ => continue,
            };
            let (sql, params) = statement(table, &types, &key_types[1], key, &fix);
            let done = match fix {
                Fix::Insert(_) => "inserted",
                Fix::Update(_) => "updated",
                Fix::Delete => "deleted",
            };
            if dry_run {
                let shown: Vec<String> = params
                    .iter()
                    .enumerate()
                    .map(|(i, p)| format!("${}={}", i + 1, p.as_deref().unwrap_or("NULL")))
                    .collect();
                println!("{name}: {text}: would run: {sql}; -- {}", shown.join(", "));
            } else {
                tx.execute(&sql, &refs_opt(&params))
                    .await
                    .on_slave(&format!("repairing {name} {text}"))?;
                println!("{name}: {text}: {done} on the slave");
            }
            repaired += 1;
        }
        master_tx.commit().await.on_master("reading the master")?;
        match dry_run {
            true => tx.rollback().await.on_slave("ending a dry run")?,
            false => tx.commit().await.on_slave("committing a repair")?,
        }
    }
    let verb = if dry_run { "would repair" } else { "repaired" };
    println!(
        "{name}: {verb} {repaired} row(s){}",
        match changing {
            0 => String::new(),
            c => format!("; {c} changing on the master are left to replication"),
        }
    );
    Ok(repaired)
}

/// The slave's type of each compared column (master order), and whether the
/// slave computes it.
async fn slave_types(slave: &Client, table: &Compared) -> Result<Vec<(String, bool)>, Error> {
    let rows = slave
        .query(SLAVE_TABLE_SQL, &[&table.slave_name.quoted()])
        .await
        .on_slave("reading the slave's catalog")?;
    let found: HashMap<String, (String, bool)> = rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    table
        .slave_columns
        .iter()
        .map(|c| {
            found.get(c).cloned().ok_or_else(|| Error::Schema {
                table: table.slave_name.clone(),
                message: format!("the slave lacks column {c}"),
            })
        })
        .collect()
}

/// The rows of these keys on one side, by key text, as fields in master
/// column order.
async fn rows(
    tx: &impl GenericClient,
    table: &Compared,
    side: Side,
    key_types: &[String],
    keys: &[Vec<String>],
) -> Result<HashMap<String, Fields>, Error> {
    let mut params: Vec<String> = Vec::new();
    let mut tuples = Vec::new();
    for key in keys {
        let casts: Vec<String> = key
            .iter()
            .zip(key_types)
            .map(|(value, kind)| {
                params.push(value.clone());
                format!("${}::text::{kind}", params.len())
            })
            .collect();
        tuples.push(format!("({})", casts.join(", ")));
    }
    let lock = if side == Side::Slave {
        " FOR UPDATE"
    } else {
        ""
    };
    let sql = format!(
        "SELECT {keys}, {row}::text FROM {t} WHERE ({list}) IN ({tuples}){lock}",
        keys = table.key_list(side, "", "::text"),
        row = table.row(side),
        t = table.name(side),
        list = table.key_list(side, "", ""),
        tuples = tuples.join(", "),
    );
    let found = tx
        .query(&sql, &refs(&params))
        .await
        .doing(&format!("reading {}", table.name(side)))?;
    let width = table.key.len();
    let mut out = HashMap::new();
    for r in found {
        let values: Vec<String> = (0..width).map(|i| r.get(i)).collect();
        let text: String = r.get(width);
        let fields = record::parse(&text).map_err(|e| Error::Invalid {
            doing: format!("reading {}", table.name(side)),
            message: e.to_string(),
        })?;
        out.insert(table.key_text(&values), fields);
    }
    Ok(out)
}

/// The statement that fixes one key on the slave, and its parameters.
fn statement(
    table: &Compared,
    types: &[(String, bool)],
    key_types: &[String],
    key: &[String],
    fix: &Fix,
) -> (String, Vec<Option<String>>) {
    let t = &table.slave_name;
    let mut params: Vec<Option<String>> = Vec::new();
    let mut cast = |value: Option<String>, kind: &str| {
        params.push(value);
        format!("${}::text::{kind}", params.len())
    };
    // `(k1, k2) = ($i, $j)`, the key's values as parameters.
    let matching = |cast: &mut dyn FnMut(Option<String>, &str) -> String| {
        let keys: Vec<String> = key
            .iter()
            .zip(key_types)
            .map(|(v, kind)| cast(Some(v.clone()), kind))
            .collect();
        format!(
            "({}) = ({})",
            table.key_list(Side::Slave, "", ""),
            keys.join(", ")
        )
    };
    let written: Vec<usize> = (0..types.len()).filter(|&i| !types[i].1).collect();
    let column = |i: usize| quote_ident(&table.slave_columns[i]);
    match fix {
        Fix::Insert(row) => {
            let values: Vec<String> = written
                .iter()
                .map(|&i| cast(row[i].clone(), &types[i].0))
                .collect();
            let names: Vec<String> = written.iter().map(|&i| column(i)).collect();
            let sql = format!(
                "INSERT INTO {t} ({}) VALUES ({})",
                names.join(", "),
                values.join(", ")
            );
            (sql, params)
        }
        Fix::Update(row) => {
            let sets: Vec<String> = written
                .iter()
                .filter(|i| !table.key.contains(i))
                .map(|&i| format!("{} = {}", column(i), cast(row[i].clone(), &types[i].0)))
                .collect();
            let sql = format!(
                "UPDATE {t} SET {} WHERE {}",
                sets.join(", "),
                matching(&mut cast)
            );
            (sql, params)
        }
        Fix::Delete => {
            let sql = format!("DELETE FROM {t} WHERE {}", matching(&mut cast));
            (sql, params)
        }
    }
}

fn refs_opt(params: &[Option<String>]) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect()
}
