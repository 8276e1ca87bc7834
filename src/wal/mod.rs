//! Capture from the WAL (`CAPTURE = wal`): what the master needs for it, the
//! slot of each slave, and its changes read as the log's events (see
//! [`read`]).
//!
//! PostgreSQL writes every change to its WAL anyway; a logical replication
//! slot per slave keeps the WAL that slave has not applied, and decodes it
//! with the `pgoutput` plugin for the tables of the publication `pgreplica`
//! (the attached tables; `pgreplica.use_wal` makes it). The statements queued
//! with `pgreplica.execute` come as the inserts into `pgreplica.log` of the
//! publication `pgreplica_log`, at their point in the stream.

pub mod filter;
pub mod read;
pub mod stream;

use crate::config::{Config, Policy};
use crate::error::{Context, Error};
use crate::pgoutput::Lsn;
use std::collections::BTreeMap;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

/// The publications a slot is read for: the attached tables, and
/// `pgreplica.log` for the statements queued with `pgreplica.execute`.
pub const PUBLICATIONS: &str = "pgreplica,pgreplica_log";

/// What install looks at on the master: the settings WAL capture needs, the
/// slots in use, and the role's right to make slots.
const READY_SQL: &str = "
SELECT current_setting('wal_level'), current_setting('max_replication_slots')::int,
       (SELECT count(*)::int FROM pg_replication_slots),
       (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
       current_user::text, current_setting('track_commit_timestamp')::bool,
       current_setting('max_wal_senders')::int,
       (SELECT count(*)::int FROM pg_stat_replication)";

const SLOT_SQL: &str = "
SELECT database, plugin, confirmed_flush_lsn::text, wal_status
  FROM pg_replication_slots WHERE slot_name = $1";

const CREATE_SQL: &str = "SELECT pg_create_logical_replication_slot($1, 'pgoutput')";

const DROP_SQL: &str = "
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
 WHERE slot_name = $1 AND database = current_database()";

/// The slot of slave `slave` of `set`: `pgreplica_<slave>_<set>`, in the
/// letters a slot name may have.
pub fn slot_name(set: &str, slave: u32) -> String {
    let set: String = set
        .chars()
        .map(|c| match c.is_ascii_alphanumeric() {
            true => c.to_ascii_lowercase(),
            false => '_',
        })
        .collect();
    let mut name = format!("pgreplica_{slave}_{set}");
    name.truncate(63);
    name
}

/// Checks that the master can capture from the WAL for `set`'s slaves, naming
/// everything missing with the command that fixes it; returns what works but
/// slower (too few WAL senders to stream every slave's slot).
pub async fn check_ready(master: &Client, set: &Config) -> Result<Vec<String>, Error> {
    let doing = "checking the master for CAPTURE = wal";
    let row = master.query_one(READY_SQL, &[]).await.on_master(doing)?;
    let (level, max_slots, slots): (String, i32, i32) = (row.get(0), row.get(1), row.get(2));
    let (may_replicate, role): (Option<bool>, String) = (row.get(3), row.get(4));
    let mut ours = 0;
    for slave in set.slaves.keys() {
        if slot(master, &slot_name(&set.name, *slave)).await?.is_some() {
            ours += 1;
        }
    }
    let needed = slots - ours + set.slaves.len() as i32;
    let mut missing = Vec::new();
    if level != "logical" {
        missing.push(format!(
            "wal_level is {level}; WAL capture needs logical: ALTER SYSTEM SET wal_level = \
             logical; then restart PostgreSQL (on a managed service, its logical replication \
             parameter)"
        ));
    }
    if needed > max_slots {
        missing.push(format!(
            "max_replication_slots is {max_slots}, {slots} are in use and this set needs one \
             per slave: ALTER SYSTEM SET max_replication_slots = {}; then restart PostgreSQL",
            needed + 2
        ));
    }
    if set.policies().any(|p| p == Policy::Newest) && !row.get::<_, bool>(5) {
        missing.push(
            "track_commit_timestamp is off; CONFLICT=newest reads when this node's rows last \
             changed from their commit times: ALTER SYSTEM SET track_commit_timestamp = on; \
             then restart PostgreSQL"
                .to_string(),
        );
    }
    if may_replicate != Some(true) {
        missing.push(format!(
            "role {role} may not make replication slots: ALTER ROLE \"{role}\" REPLICATION \
             (as a superuser; on a managed service, grant its replication role)"
        ));
    }
    let (senders, streaming): (i32, i32) = (row.get(6), row.get(7));
    let mut slower = Vec::new();
    if streaming + set.slaves.len() as i32 > senders {
        slower.push(format!(
            "max_wal_senders is {senders} and {streaming} are in use: each slave streams its \
             slot through a WAL sender of its own, and a slave without one reads its slot \
             through SQL, which decodes the WAL again at every look (ALTER SYSTEM SET \
             max_wal_senders = {}; then restart PostgreSQL)",
            streaming + set.slaves.len() as i32 + 2
        ));
    }
    match missing.is_empty() {
        true => Ok(slower),
        false => Err(Error::Invalid {
            doing: doing.into(),
            message: missing.join("; "),
        }),
    }
}

/// Where slot `name` stands: its database and its confirmed position, if it
/// exists.
async fn slot(master: &Client, name: &str) -> Result<Option<(String, Lsn)>, Error> {
    let doing = format!("reading replication slot {name} on the master");
    let Some(row) = master
        .query_typed_opt(SLOT_SQL, &[(&name, Type::TEXT)])
        .await
        .on_master(&doing)?
    else {
        return Ok(None);
    };
    let (database, plugin, at): (Option<String>, Option<String>, Option<String>) =
        (row.get(0), row.get(1), row.get(2));
    // The server let go of WAL the slot still needed (max_slot_wal_keep_size).
    if row.get::<_, Option<String>>(3).as_deref() == Some("lost") {
        return Err(Error::Invalid {
            doing,
            message: format!(
                "the slot was invalidated: the master removed WAL it still kept                  (max_slot_wal_keep_size), and the changes in it are gone. Nothing is applied;                  copy the slave again with pgreplica clone CONF --slave N --truncate, which                  makes a new slot (SELECT pg_drop_replication_slot('{name}') first when the                  clone cannot drop it)"
            ),
        });
    }
    match (
        database,
        plugin.as_deref(),
        at.as_deref().and_then(Lsn::parse),
    ) {
        (Some(database), Some("pgoutput"), Some(at)) => Ok(Some((database, at))),
        _ => Err(Error::Invalid {
            doing,
            message: format!(
                "a slot named {name} exists that pgreplica did not make (not a pgoutput slot \
                 of a database): drop it (SELECT pg_drop_replication_slot('{name}')) or rename \
                 the set"
            ),
        }),
    }
}

/// Makes the slot of each slave of `set` that has none; returns the slots
/// made. Each starts at the master's position now: a slave's tables must hold
/// what was committed before (a copy, or empty tables on both sides).
pub async fn make_slots(master: &Client, set: &Config) -> Result<Vec<String>, Error> {
    let database: String = master
        .query_one("SELECT current_database()::text", &[])
        .await
        .on_master("reading the master's database")?
        .get(0);
    let mut made = Vec::new();
    for slave in set.slaves.keys() {
        let name = slot_name(&set.name, *slave);
        match slot(master, &name).await? {
            Some((db, _)) if db == database => continue,
            Some((db, _)) => {
                return Err(Error::Invalid {
                    doing: format!("making replication slot {name}"),
                    message: format!(
                        "the slot exists for database {db}, not {database}: another set of the \
                         same name reads it; rename one of the sets"
                    ),
                });
            }
            None => {}
        }
        master
            .execute(CREATE_SQL, &[&name])
            .await
            .on_master(&format!("making replication slot {name} on the master"))?;
        made.push(name);
    }
    Ok(made)
}

/// Drops the slots of `set`'s slaves; returns those dropped.
pub async fn drop_slots(master: &Client, set: &Config) -> Result<Vec<String>, Error> {
    let mut dropped = Vec::new();
    for slave in set.slaves.keys() {
        let name = slot_name(&set.name, *slave);
        let gone = master
            .execute(DROP_SQL, &[&name])
            .await
            .on_master(&format!(
                "dropping replication slot {name} (is the daemon still reading it? stop it first)"
            ))?;
        if gone > 0 {
            dropped.push(name);
        }
    }
    Ok(dropped)
}

/// Drops the slots of `set`'s slaves like [`drop_slots`], trying again for up
/// to 10 s while a round of a daemon still reads one (a slot in use cannot
/// be dropped).
pub async fn drop_slots_when_free(master: &Client, set: &Config) -> Result<Vec<String>, Error> {
    let mut tries = 0;
    loop {
        match drop_slots(master, set).await {
            Err(e) if tries < 100 => {
                tries += 1;
                tracing::debug!("{e}: trying again");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            done => return done,
        }
    }
}

/// The confirmed position of slave `slave`'s slot: the WAL before it is
/// released. An error when the slot is missing.
pub async fn confirmed(master: &Client, set: &Config, slave: u32) -> Result<Lsn, Error> {
    let name = slot_name(&set.name, slave);
    match slot(master, &name).await? {
        Some((_, at)) => Ok(at),
        None => Err(Error::Invalid {
            doing: format!("reading replication slot {name} on the master"),
            message: format!(
                "the slot is missing: run pgreplica install {} on the master, then copy the \
                 slave with pgreplica clone (the changes made without a slot are not in the WAL \
                 any more)",
                set.path.display()
            ),
        }),
    }
}

/// The WAL each slave's slot keeps on the master, in bytes, by slave.
pub async fn kept(master: &Client, set: &Config) -> Result<BTreeMap<u32, i64>, Error> {
    let slots: Vec<String> = set
        .slaves
        .keys()
        .map(|n| slot_name(&set.name, *n))
        .collect();
    let rows = master
        .query(
            "SELECT slot_name::text, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8
               FROM pg_replication_slots WHERE slot_name = ANY($1)",
            &[&slots],
        )
        .await
        .on_master("reading the WAL the slaves' slots keep")?;
    let by_name: BTreeMap<String, i64> = rows
        .iter()
        .map(|r| (r.get(0), r.get::<_, Option<i64>>(1).unwrap_or(0)))
        .collect();
    Ok(set
        .slaves
        .keys()
        .filter_map(|n| Some((*n, *by_name.get(&slot_name(&set.name, *n))?)))
        .collect())
}

/// Releases the WAL of slave `slave`'s slot up to `lsn`, where the slave's
/// progress now is.
pub async fn advance(master: &Client, set: &Config, slave: u32, lsn: Lsn) -> Result<(), Error> {
    let name = slot_name(&set.name, slave);
    master
        .execute(
            "SELECT pg_replication_slot_advance(slot_name, $2::text::pg_lsn)
               FROM pg_replication_slots
              WHERE slot_name = $1 AND confirmed_flush_lsn < $2::text::pg_lsn",
            &[&name, &lsn.to_string()],
        )
        .await
        .on_master(&format!("advancing replication slot {name} on the master"))
        .map(|_| ())
}
