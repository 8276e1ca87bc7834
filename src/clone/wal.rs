//! `clone` under WAL capture. The slave's slot is made again over the
//! replication protocol, which exports the snapshot the slot starts at; every
//! table of the set is copied at that snapshot, and the slave starts at the
//! slot's first position: nothing committed is missed or applied twice, and
//! the master keeps taking writes throughout.
//!
//! While the tables are marked as being cloned, the daemon leaves the slave
//! alone (it neither reads nor advances the slot). An interrupted clone is
//! run again from the start: the slot is made anew.

use super::{Options, chosen_tables, claim, copy, finish};
use crate::config::Config;
use crate::db::{self, redact};
use crate::dsn::Dsn;
use crate::error::{Context, Error};
use crate::event::Snapshot;
use crate::pgoutput::Lsn;
use crate::slave::{self, WalProgress};
use crate::{capture, programs, registry, wal};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};

/// A replication session that made a slot and holds its exported snapshot
/// (valid until the session ends or runs another command).
struct Exporting {
    child: Child,
    // Open while the snapshot is needed: psql ends when it closes.
    stdin: Option<ChildStdin>,
    /// Where the slot starts.
    at: Lsn,
    /// The exported snapshot's name.
    snapshot: String,
}

impl Exporting {
    /// Makes slot `slot` on the master of `set` over the replication protocol
    /// (psql with `replication=database`), exporting its snapshot.
    async fn start(set: &Config, slot: &str) -> Result<Exporting, Error> {
        let doing = format!("making replication slot {slot} with an exported snapshot");
        let invalid = |message: String| Error::Invalid {
            doing: doing.clone(),
            message,
        };
        let mut settings = Dsn::parse(&set.master)
            .map_err(|e| invalid(format!("the master's connection string: {e}")))?;
        let psql = programs::client("psql");
        let mut command = tokio::process::Command::new(&psql);
        // The password in psql's environment, not on its (public) command line.
        if let Some(password) = settings.take("password") {
            command.env("PGPASSWORD", password);
        }
        let conninfo = format!("{} replication=database", settings.render());
        let mut child = command
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &conninfo,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                invalid(format!(
                    "cannot run {}: {e} (apt-get install -y postgresql-client)",
                    psql.display()
                ))
            })?;
        let mut stdin = child.stdin.take().expect("piped");
        let command = format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput EXPORT_SNAPSHOT;\n");
        stdin
            .write_all(command.as_bytes())
            .await
            .map_err(|e| invalid(e.to_string()))?;
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let read = tokio::time::timeout(Duration::from_secs(300), stdout.read_line(&mut line));
        let read = read
            .await
            .map_err(|_| invalid("no answer in 300 s".into()))?;
        read.map_err(|e| invalid(e.to_string()))?;
        // slot_name|consistent_point|snapshot_name|output_plugin
        let fields: Vec<&str> = line.trim().split('|').collect();
        let answer = match fields[..] {
            [_, at, snapshot, _] => Lsn::parse(at).zip(
                snapshot
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == '-')
                    .then(|| snapshot.to_string()),
            ),
            _ => None,
        };
        let Some((at, snapshot)) = answer else {
            let mut error = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), stderr.read_to_string(&mut error))
                        .await;
            }
            return Err(invalid(format!(
                "{} (the master needs max_wal_senders > 0 and a free WAL sender, and its \
                 pg_hba.conf must let the role connect to the database)",
                match error.trim() {
                    "" => format!("unexpected answer '{}'", line.trim()),
                    error => error.to_string(),
                }
            )));
        };
        Ok(Exporting {
            child,
            stdin: Some(stdin),
            at,
            snapshot,
        })
    }

    /// Ends the session: the snapshot goes, the slot stays.
    async fn end(mut self) {
        drop(self.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// Clones every table of `set` into slave `slave` from a slot made at the
/// copy's snapshot.
pub(super) async fn clone_slave(set: &Config, slave: u32, options: &Options) -> Result<(), Error> {
    if !options.tables.is_empty() {
        return Err(Error::Invalid {
            doing: "cloning".into(),
            message: "under CAPTURE = wal, clone copies every table of the set (the slave \
                      starts again from a new slot): leave out --table"
                .into(),
        });
    }
    let dsn = &set.slaves[&slave];
    tracing::info!(
        "cloning {} into slave {slave} ({}) from the WAL",
        redact(&set.master),
        redact(dsn)
    );
    let master = db::connect(&set.master, set.keepalive).await?;
    capture::check_version(&master).await?;
    capture::check_mode(&master, set).await?;
    // The [TABLE] sections' options, which the copy follows as the slot does.
    capture::configure(&master, set).await?;
    let mut slave_client = db::connect(dsn, set.keepalive).await?;
    slave::prepare(&slave_client).await?;
    let (tables, _) = chosen_tables(&master, &[]).await?;
    // Tables an interrupted clone had marked are its own to copy again.
    let begun = slave::cloning(&slave_client, &set.name)
        .await?
        .into_iter()
        .map(|(table, _)| table)
        .collect();
    // From here the daemon leaves the slave alone.
    claim(set, &mut slave_client, &tables, &begun, options.truncate).await?;
    let slot = wal::slot_name(&set.name, slave);
    let mut alone = set.clone();
    alone.slaves.retain(|n, _| *n == slave);
    wal::drop_slots_when_free(&master, &alone).await?;
    let exporting = Exporting::start(set, &slot).await?;
    tracing::info!(
        "replication slot {slot} made at {}; copying at its snapshot",
        exporting.at
    );
    let copied = copy::copy_tables(
        set,
        slave,
        &master,
        tables,
        options,
        Some(&exporting.snapshot),
    )
    .await;
    let at = exporting.at;
    exporting.end().await;
    copied?;

    let doing = "handing the copied tables over to replication";
    let node = registry::node(&master).await?;
    let tx = slave_client.transaction().await.on_slave(doing)?;
    let (_, cloning) = slave::lock_set(&tx, &set.name).await?;
    let snapshot = slave::cloning(&tx, &set.name)
        .await?
        .into_iter()
        .find_map(|(_, s)| Snapshot::parse(&s?))
        .unwrap_or_else(Snapshot::start);
    let position = WalProgress { at, partial: None };
    let whose = (set.name.as_str(), node.as_str());
    slave::write_wal_progress(&tx, whose, &snapshot, position, 0).await?;
    let tables: Vec<&String> = cloning.iter().collect();
    finish(&tx, &set.name, &tables).await?;
    tx.commit().await.on_slave(doing)?;
    tracing::info!("{} tables handed over to replication at {at}", tables.len());
    Ok(())
}
