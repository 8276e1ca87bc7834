//! `pgreplica switchover`, `failover` and `failback`: what they print and the
//! file they write.

use anyhow::{Context, Result};
use pgreplica::Config;
use pgreplica::switchover::{self, Options};
use std::path::Path;
use std::time::Duration;

/// Prints the set's new file, or (`write`) writes it over the old one, kept
/// beside it with `suffix`.
fn hand_out(path: &Path, text: &str, write: bool, suffix: &str) -> Result<()> {
    if !write {
        print!("{text}");
        eprintln!(
            "the set's new file is above: put it in place of {} and reload the daemon \
             (systemctl reload pgreplica, or kill -HUP its pid)",
            path.display()
        );
        return Ok(());
    }
    let mut kept = path.as_os_str().to_owned();
    kept.push(suffix);
    std::fs::copy(path, &kept).with_context(|| format!("keeping {}", path.display()))?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "wrote {} (the old one is {}): reload the daemon (systemctl reload pgreplica, or kill \
         -HUP its pid)",
        path.display(),
        Path::new(&kept).display()
    );
    Ok(())
}

pub async fn switchover(path: &Path, options: Options, write: bool) -> Result<bool> {
    let set = Config::load(path)?;
    let text = switchover::switchover(&set, &options).await?;
    hand_out(path, &text, write, ".before-switchover")?;
    Ok(true)
}

pub async fn failover(path: &Path, slave: u32, force: bool, write: bool) -> Result<bool> {
    let set = Config::load(path)?;
    let text = switchover::failover(&set, slave, force).await?;
    hand_out(path, &text, write, ".before-failover")?;
    Ok(true)
}

pub async fn failback(path: &Path, slave: u32) -> Result<bool> {
    let set = Config::load(path)?;
    let done = switchover::failback(&set, slave).await?;
    let lost = &done.lost;
    let total: i64 = lost.tables.iter().map(|t| t.1).sum();
    println!("the old master had {total} change(s) the new master never got");
    for (table, changes, first, last) in &lost.tables {
        println!("  {table}: {changes} change(s) from {first} to {last}");
    }
    if total > 0 {
        println!("read them on the old master with: {}", lost.read_with);
    }
    println!(
        "slave {slave} is a slave of the new master again; {} difference(s) left",
        done.left
    );
    Ok(done.left == 0)
}

/// The options of `switchover`.
pub fn options(slave: u32, timeout: u64, force: bool) -> Options {
    Options {
        slave,
        timeout: Duration::from_secs(timeout),
        force,
    }
}
