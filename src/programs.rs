//! PostgreSQL's programs on this machine: where the installed server and client
//! binaries are.

use std::path::PathBuf;
use thiserror::Error;

/// No PostgreSQL installation was found.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct NotFound(String);

/// The newest installed PostgreSQL's `bin` folder (or `$PG_BIN`).
pub fn bin_dir() -> Result<PathBuf, NotFound> {
    if let Some(bin) = std::env::var_os("PG_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(|| {
        NotFound(
            "PostgreSQL's server programs (initdb, pg_ctl) were not found under /usr/lib/postgresql: \
             install them with `apt-get install -y postgresql` (or set PG_BIN to their folder)"
                .into(),
        )
    })
}

/// `$PG_DUMP`, or `pg_dump` of the newest installed PostgreSQL, or the one on
/// the `PATH`.
pub fn pg_dump() -> PathBuf {
    match std::env::var_os("PG_DUMP") {
        Some(path) => PathBuf::from(path),
        None => client("pg_dump"),
    }
}

/// PostgreSQL's client program `name` (`psql`, `pg_dump`) of the newest
/// installed PostgreSQL, or the one on the `PATH`.
pub fn client(name: &str) -> PathBuf {
    bin_dir()
        .map(|b| b.join(name))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| name.into())
}
