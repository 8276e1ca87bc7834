//! Capture on a master: installs the log and attaches triggers (runs the `sql/` files).

use crate::config::{Capture, Config, Policy};
use crate::error::{Context, Error};
use crate::ident::TableName;
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, GenericClient, Transaction};

/// The capture schema, as shipped in `sql/pgreplica.sql`.
pub const INSTALL_SQL: &str = include_str!("../sql/pgreplica.sql");
/// Removal of everything installed, as shipped in `sql/uninstall.sql`.
pub const UNINSTALL_SQL: &str = include_str!("../sql/uninstall.sql");

/// The version of `sql/pgreplica.sql` this binary ships (`pgreplica.version()`).
pub const VERSION: i32 = 6;

/// What install did with one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableReport {
    /// The table's name as PostgreSQL prints it.
    pub table: String,
    /// Why it is not replicated, or `None` when it is.
    pub skipped: Option<String>,
}

/// Installs (or upgrades) capture and attaches every table with a primary key, or
/// only `tables` when some are named, then sets the capture options of `set`'s
/// `[TABLE]` sections and its capture mode (`CAPTURE`: the master's mode, for
/// every set reading it). Safe to run again. One transaction: a deadlock
/// with a daemon applying to the same tables meanwhile (a switchover's new
/// master is still a slave) undoes it all, and it is tried again.
pub async fn install(
    client: &mut Client,
    tables: &[String],
    set: Option<&Config>,
) -> Result<Vec<TableReport>, Error> {
    let mut tries = 0;
    loop {
        match install_once(client, tables, set).await {
            Err(e) if e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) && tries < 5 => {
                tries += 1;
                tracing::info!("installing capture: {e}; trying again");
                tokio::time::sleep(Duration::from_millis(200 * tries)).await;
            }
            done => return done,
        }
    }
}

async fn install_once(
    client: &mut Client,
    tables: &[String],
    set: Option<&Config>,
) -> Result<Vec<TableReport>, Error> {
    let tx = client.transaction().await.on_master("installing capture")?;
    tx.batch_execute(INSTALL_SQL)
        .await
        .on_master("installing capture (sql/pgreplica.sql)")?;
    let mut reports = Vec::new();
    if tables.is_empty() {
        for row in tx
            .query("SELECT tbl::text, skipped FROM pgreplica.attach_all()", &[])
            .await
            .on_master("attaching capture to the tables")?
        {
            reports.push(TableReport {
                table: row.get(0),
                skipped: row.get(1),
            });
        }
    } else {
        for table in tables {
            let row = tx
                .query_one(
                    "SELECT $1::text::regclass::text, pgreplica.attach($1::text::regclass)",
                    &[table],
                )
                .await
                .on_master(&format!("attaching capture to table {table}"))?;
            reports.push(TableReport {
                table: row.get(0),
                skipped: row.get(1),
            });
        }
    }
    if let Some(set) = set {
        configure(&tx, set).await?;
        tx.execute(
            "SELECT pgreplica.use_wal($1)",
            &[&(set.capture == Capture::Wal)],
        )
        .await
        .on_master("setting up the capture mode (CAPTURE)")?;
        keep_deletes(&tx, set).await?;
    }
    tx.commit().await.on_master("installing capture")?;
    Ok(reports)
}

const ATTACHED_SQL: &str = "
SELECT n.nspname::text, c.relname::text, t.reloid
  FROM pgreplica.tables t JOIN pg_class c ON c.oid = t.reloid
  JOIN pg_namespace n ON n.oid = c.relnamespace";

/// Under WAL capture, keeps in the log the deletes of the tables whose
/// conflicts `set` settles by `newest` or `priority`: where this node, as the
/// slave of the set in the other direction, finds when and where a row it no
/// longer has was deleted. Other tables' deletes stop being kept.
async fn keep_deletes(tx: &Transaction<'_>, set: &Config) -> Result<(), Error> {
    let doing = "keeping deletes for the conflict policy (CONFLICT)";
    for row in tx.query(ATTACHED_SQL, &[]).await.on_master(doing)? {
        let table = TableName {
            schema: row.get(0),
            name: row.get(1),
        };
        let keep =
            set.capture == Capture::Wal && set.policy(&table).is_some_and(Policy::reads_history);
        let oid: u32 = row.get(2);
        tx.execute(
            "SELECT pgreplica.keep_deletes($1::oid::regclass, $2)",
            &[&oid, &keep],
        )
        .await
        .on_master(doing)?;
    }
    Ok(())
}

/// Checks that the master runs this binary's version of the capture schema.
pub async fn check_version(master: &Client) -> Result<(), Error> {
    let doing = "checking pgreplica's version on the master";
    let exists: bool = master
        .query_one(
            "SELECT to_regprocedure('pgreplica.version()') IS NOT NULL",
            &[],
        )
        .await
        .on_master(doing)?
        .get(0);
    let version: Option<i32> = match exists {
        true => Some(
            master
                .query_one("SELECT pgreplica.version()", &[])
                .await
                .on_master(doing)?
                .get(0),
        ),
        false => None,
    };
    match version {
        Some(VERSION) => Ok(()),
        Some(other) => Err(Error::Invalid {
            doing: doing.into(),
            message: format!(
                "the master's capture schema is version {other}, this pgreplica's is {VERSION}: \
                 run `pgreplica install` with this binary (it upgrades in place and keeps the log)"
            ),
        }),
        None => Err(Error::Invalid {
            doing: doing.into(),
            message: "pgreplica is not installed on the master, or installed by an older \
                      version: run `pgreplica install` (it upgrades in place and keeps the log)"
                .into(),
        }),
    }
}

/// Checks that the master captures as `set` says (`CAPTURE`): a set whose
/// triggers another set's install disabled would otherwise wait for changes
/// that never come.
pub async fn check_mode(master: &Client, set: &Config) -> Result<(), Error> {
    let doing = "checking the master's capture mode";
    let wal: bool = master
        .query_one("SELECT pgreplica.wal()", &[])
        .await
        .on_master(doing)?
        .get(0);
    let (said, found) = match set.capture {
        Capture::Trigger if wal => ("trigger", "from the WAL"),
        Capture::Wal if !wal => ("wal", "with triggers"),
        _ => return Ok(()),
    };
    Err(Error::Invalid {
        doing: doing.into(),
        message: format!(
            "the master captures {found}, but {} says CAPTURE = {said}: all sets of one master \
             database capture the same way; make the files agree and run pgreplica install \
             with one of them",
            set.path.display()
        ),
    })
}

/// Runs `sql` on the master and queues it in the log (`pgreplica.execute`), so
/// that every slave runs it at the same point between the data changes.
pub async fn execute(master: &Client, sql: &str) -> Result<(), Error> {
    master
        .execute("SELECT pgreplica.execute($1)", &[&sql])
        .await
        .on_master("running the statement on the master")
        .map(|_| ())
}

/// Attaches capture to the partitions made since their partitioned table was
/// attached (`pgreplica.attach_partitions()`); returns how many.
pub async fn attach_partitions(master: &Client) -> Result<i32, Error> {
    Ok(master
        .query_one("SELECT pgreplica.attach_partitions()", &[])
        .await
        .on_master("attaching capture to new partitions on the master")?
        .get(0))
}

/// Removes capture and returns how many logged events were discarded with it.
pub async fn uninstall(client: &Client) -> Result<i64, Error> {
    let doing = "uninstalling capture";
    let installed = client
        .query_one("SELECT to_regclass('pgreplica.log') IS NOT NULL", &[])
        .await
        .on_master(doing)?
        .get::<_, bool>(0);
    let pending = if installed {
        client
            .query_one("SELECT count(*) FROM pgreplica.log", &[])
            .await
            .on_master(doing)?
            .get(0)
    } else {
        0
    };
    client.batch_execute(UNINSTALL_SQL).await.on_master(doing)?;
    Ok(pending)
}

const OPTIONS_SQL: &str =
    "SELECT pgreplica.set_options($1::text::regclass, $2, $3, $4::text[], $5::text[])";

/// Sets what the master captures of the tables of `set`'s `[TABLE]` sections
/// (`pgreplica.set_options`); returns the tables whose options changed. A table
/// without a section keeps its options.
pub async fn configure(client: &impl GenericClient, set: &Config) -> Result<Vec<TableName>, Error> {
    let mut changed = Vec::new();
    for t in &set.tables {
        let row = client
            .query_one(
                OPTIONS_SQL,
                &[
                    &t.table.quoted(),
                    &t.operations,
                    &t.filter,
                    &t.columns,
                    &t.exclude,
                ],
            )
            .await
            .map_err(|e| Error::Options {
                path: set.path.clone(),
                line: t.line,
                message: crate::db::pg_message(&e),
            })?;
        if row.get::<_, bool>(0) {
            changed.push(t.table.clone());
        }
    }
    Ok(changed)
}

/// Checks that the master accepts `set`'s capture options, changing nothing.
pub async fn check_options(client: &mut Client, set: &Config) -> Result<(), Error> {
    let tx = client
        .transaction()
        .await
        .on_master("checking the capture options")?;
    configure(&tx, set).await?;
    tx.rollback()
        .await
        .on_master("checking the capture options")
}
