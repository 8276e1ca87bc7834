//! `pgreplica install`: capture on a master, the set's capture mode and, under
//! WAL capture, its slots; the node's share of the sequences.

use anyhow::{Context, Result};
use pgreplica::config::Capture;
use pgreplica::{Config, capture, db, sequence, wal};
use std::path::PathBuf;

/// Installs on the master of the set `config` (or `dsn`); prints what it did.
pub async fn run(
    config: Option<PathBuf>,
    dsn: Option<String>,
    tables: &[String],
    sequences: Option<String>,
) -> Result<bool> {
    let set = config.map(|path| Config::load(&path)).transpose()?;
    let dsn = set
        .as_ref()
        .map(|s| s.master.clone())
        .or(dsn)
        .unwrap_or_default();
    let mut client = db::connect(&dsn, None).await?;
    if let Some(set) = set.as_ref().filter(|s| s.capture == Capture::Wal) {
        for note in wal::check_ready(&client, set).await? {
            println!("note: {note}");
        }
    }
    let reports = capture::install(&mut client, tables, set.as_ref()).await?;
    for r in &reports {
        match &r.skipped {
            None => println!("{}: replicated", r.table),
            Some(why) => println!("{}: skipped: {why}", r.table),
        }
    }
    let replicated = reports.iter().filter(|r| r.skipped.is_none()).count();
    println!("{replicated} of {} tables replicated", reports.len());
    if let Some(set) = &set {
        let (slots, done) = match set.capture {
            Capture::Wal => (wal::make_slots(&client, set).await?, "made"),
            Capture::Trigger => (wal::drop_slots(&client, set).await?, "dropped"),
        };
        for slot in slots {
            println!("replication slot {slot} {done}");
        }
    }
    if let Some(spec) = sequences {
        let (node, nodes) = sequence::parse_share(&spec)
            .context("--sequences takes K/N: this node's number K, from 1 to N nodes")?;
        let changed = sequence::partition(&client, node, nodes).await?;
        for line in &changed {
            println!("{line}");
        }
        println!("{} sequence(s) changed", changed.len());
    }
    Ok(true)
}
