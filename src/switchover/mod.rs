//! A set's master handed to one of its slaves. `switchover`, both up: the
//! master stops taking writes, every slave applies what it had, and the roles
//! swap with nothing lost. `failover`, the master gone: a slave takes over.
//! `failback`: the old master, back, becomes a slave again.
//!
//! A slave's progress names the master it follows (`pgreplica.node()`), so a
//! daemon still running the set's old file stops at the first batch after the
//! hand-over instead of reading the new master's slaves against the old log.

mod failover;

pub use failover::{Failback, failback, failover};

use crate::config::{Capture, Config, roles};
use crate::db::Prepared;
use crate::error::{Context, Error};
use crate::event::Snapshot;
use crate::ident::quote_ident;
use crate::pgoutput::Lsn;
use crate::slave::WalProgress;
use crate::{capture, db, registry, sequence, slave, status, wal};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// What a switchover is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The slave that becomes the master (the n of `DSNn`).
    pub slave: u32,
    /// How long the master's open transactions, and then the slaves, are
    /// waited for.
    pub timeout: Duration,
    /// End the transactions still open at the timeout instead of giving up.
    pub force: bool,
}

/// The client sessions of the master's database opened before `$1` (when
/// writes were refused to new ones), other than pgreplica's own: their pid,
/// whether they are inside a transaction, and who they are.
const SESSIONS_SQL: &str = "
SELECT pid, xact_start IS NOT NULL,
       format('pid %s (%s@%s, %s)', pid, usename, coalesce(client_addr::text, 'local'),
              coalesce(nullif(application_name, ''), 'no name'))
  FROM pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid()
   AND backend_type = 'client backend' AND backend_start < $1
   AND application_name NOT LIKE 'pgreplica%'";

/// Refuses a set whose slaves are not copies of the master: the reversed set
/// would not give back what the master had.
fn refuse_asymmetric(set: &Config, doing: &str) -> Result<(), Error> {
    let why = if !set.nodes.is_empty() {
        Some("it is multi-master (NODEn): every node takes writes already".to_string())
    } else {
        set.tables.iter().find_map(|t| {
            let partial = t.operations != "IUDT" || t.filter.is_some() || t.reshapes();
            partial.then(|| {
                format!(
                    "[TABLE {}] (line {}) captures or lands rows in part or in another shape, \
                     so the slaves are not copies of the master",
                    t.table, t.line
                )
            })
        })
    };
    match why {
        Some(why) => Err(Error::Invalid {
            doing: doing.into(),
            message: format!("set {}: {why}", set.name),
        }),
        None => Ok(()),
    }
}

/// The set's file read again, and the set it becomes with `rewrite` (the
/// roles changed).
fn reread(
    set: &Config,
    doing: &str,
    rewrite: impl Fn(&str) -> Option<String>,
) -> Result<(String, Config), Error> {
    let invalid = |message: String| Error::Invalid {
        doing: doing.into(),
        message,
    };
    let text = std::fs::read_to_string(&set.path)
        .map_err(|e| invalid(format!("reading {}: {e}", set.path.display())))?;
    let changed = rewrite(&text).ok_or_else(|| {
        invalid(format!(
            "{} has no DSN0 or no such DSNn line in [MAIN]",
            set.path.display()
        ))
    })?;
    let reversed = Config::parse(&set.path, &changed)?;
    Ok((changed, reversed))
}

/// Refuses (`on`) or allows again writes in new sessions of `client`'s
/// database. Existing sessions keep their setting.
async fn read_only(client: &Client, on: bool) -> Result<(), Error> {
    let database: String = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .on_master("reading the database's name")?
        .get(0);
    let change = match on {
        true => "SET default_transaction_read_only = on",
        false => "RESET default_transaction_read_only",
    };
    let sql = format!("ALTER DATABASE {} {change}", quote_ident(&database));
    client.batch_execute(&sql).await.on_master(&format!(
        "{sql} (the role needs to own the database, or be superuser)"
    ))
}

/// Ends the sessions that could still write on the master, once new ones
/// may not: those between transactions at once (they hold nothing), those
/// inside one once it ends; at the timeout the rest with `force`, else an
/// error naming them. Sessions are told apart by the server's own clock.
async fn drain(master: &Client, options: &Options) -> Result<(), Error> {
    let doing = "ending the master's sessions opened before writes were refused";
    let since: std::time::SystemTime = master
        .query_one("SELECT clock_timestamp()", &[])
        .await
        .on_master(doing)?
        .get(0);
    let started = Instant::now();
    loop {
        let rows = master
            .query(SESSIONS_SQL, &[&since])
            .await
            .on_master(doing)?;
        let (busy, idle): (Vec<_>, Vec<_>) = rows.iter().partition(|r| r.get::<_, bool>(1));
        let over = started.elapsed() >= options.timeout;
        let ending: Vec<_> = match over && options.force {
            true => rows.iter().collect(),
            false => idle,
        };
        for row in &ending {
            let pid: i32 = row.get(0);
            master
                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .on_master(doing)?;
            tracing::info!("master: ended session {}", row.get::<_, String>(2));
        }
        if busy.is_empty() || (over && options.force) {
            return Ok(());
        }
        if over {
            let names: Vec<String> = busy.iter().map(|r| r.get(2)).collect();
            return Err(Error::Invalid {
                doing: doing.into(),
                message: format!(
                    "{} session(s) still inside a transaction after {} s: {}; wait longer \
                     (--timeout) or end them (--force)",
                    names.len(),
                    options.timeout.as_secs(),
                    names.join(", ")
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The statement that marks the end of the master's writes under WAL
/// capture: queued like `pgreplica execute`, it reaches each slave after
/// every transaction that committed before it.
const MARKER: &str = "SELECT 'pgreplica switchover: the master stopped taking writes here'";

/// Waits until every slave of `set` has applied what the master committed.
/// Under trigger capture the registry says so; under WAL capture a marker
/// is queued and each slave's own position must pass it.
async fn catch_up(set: &Config, master: &Client, timeout: Duration) -> Result<(), Error> {
    let behind = match set.capture {
        Capture::Trigger => status::wait(set, timeout).await?,
        Capture::Wal => past_marker(set, master, timeout).await?,
    };
    if behind.is_empty() {
        tracing::info!("every slave has applied everything the master committed");
        return Ok(());
    }
    Err(Error::Invalid {
        doing: "waiting for the slaves to apply everything".into(),
        message: format!(
            "slave(s) {behind:?} had not within {} s: is `pgreplica run` running this set?",
            timeout.as_secs()
        ),
    })
}

/// Queues the marker and waits for the slaves' positions to pass it; returns
/// those that had not at the timeout.
async fn past_marker(set: &Config, master: &Client, timeout: Duration) -> Result<Vec<i32>, Error> {
    let doing = "queueing the switchover's marker";
    let before: String = master
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .on_master(doing)?
        .get(0);
    let before = Lsn::parse(&before).ok_or_else(|| Error::Invalid {
        doing: doing.into(),
        message: format!("unreadable WAL position {before}"),
    })?;
    master
        .execute("SELECT pgreplica.execute($1)", &[&MARKER])
        .await
        .on_master(doing)?;
    let mut slaves = Vec::new();
    for (&n, dsn) in &set.slaves {
        let client = db::connect(dsn, set.keepalive).await?;
        slave::prepare(&client).await?;
        slaves.push((n as i32, client));
    }
    let started = Instant::now();
    loop {
        let mut behind = Vec::new();
        for (n, client) in &slaves {
            let at = slave::read_progress(client, &set.name)
                .await?
                .and_then(|p| p.wal)
                .map(|w| w.at);
            if at.is_none_or(|at| at <= before) {
                behind.push(*n);
            }
        }
        if behind.is_empty() || started.elapsed() >= timeout {
            return Ok(behind);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Where a new master stands when it takes over: its node, snapshot and WAL
/// position.
struct Position {
    node: String,
    snapshot: Snapshot,
    lsn: Lsn,
}

/// Makes `new_master` the master of `reversed`, with the tables `tables`
/// attached (none: every table with a key) and, under WAL capture, a slot
/// per slave; returns its position. It must take no writes meanwhile.
async fn install_on(
    new_master: &mut Client,
    reversed: &Config,
    tables: &[String],
    old_node: Option<&str>,
) -> Result<Position, Error> {
    for report in capture::install(new_master, tables, Some(reversed)).await? {
        if let Some(why) = report.skipped.filter(|_| !tables.is_empty()) {
            return Err(Error::Invalid {
                doing: format!("installing capture on the new master for {}", report.table),
                message: why,
            });
        }
    }
    // A copy of the old master's database brought its identity along.
    if let Some(old) = old_node {
        new_master
            .execute(
                "UPDATE pgreplica.node SET id = gen_random_uuid() WHERE id::text = $1",
                &[&old],
            )
            .await
            .on_master("giving the new master an identity of its own")?;
    }
    if reversed.capture == Capture::Wal {
        for slot in wal::make_slots(new_master, reversed).await? {
            tracing::info!("new master: replication slot {slot} made");
        }
    }
    tracing::info!("new master: capture installed");
    position(new_master).await
}

/// Where `master` stands now: its node, snapshot and WAL position.
async fn position(master: &mut Client) -> Result<Position, Error> {
    let node = registry::node(&*master).await?;
    let row = master
        .query_one(
            "SELECT txid_current_snapshot()::text, pg_current_wal_lsn()::text",
            &[],
        )
        .await
        .on_master("reading the new master's position")?;
    let invalid = |what: &str| Error::Invalid {
        doing: "reading the new master's position".into(),
        message: format!("unreadable {what}"),
    };
    let snapshot = Snapshot::parse(row.get(0)).ok_or_else(|| invalid("snapshot"))?;
    let lsn = Lsn::parse(row.get(1)).ok_or_else(|| invalid("WAL position"))?;
    Ok(Position {
        node,
        snapshot,
        lsn,
    })
}

/// Starts every slave of `set` but `skip` at `position` of its new master:
/// its progress and the master's registry say it has applied everything
/// before.
async fn start_slaves(
    new_master: &Client,
    set: &Config,
    position: &Position,
    skip: Option<u32>,
) -> Result<(), Error> {
    for &number in set.slaves.keys().filter(|n| Some(**n) != skip) {
        let at = &position.snapshot;
        start_at(set, number, &position.node, at, position.lsn).await?;
        registry::enter(new_master, set, number, at).await?;
        registry::sync(new_master, &set.name, number, at).await?;
        tracing::info!("slave {number} follows the new master from {at}");
    }
    Ok(())
}

/// Records on slave `number` of `set` that it has applied everything of the
/// master `node` up to `snapshot` (`lsn` under WAL capture).
async fn start_at(
    set: &Config,
    number: u32,
    node: &str,
    snapshot: &Snapshot,
    lsn: Lsn,
) -> Result<(), Error> {
    let mut client = db::connect(&set.slaves[&number], set.keepalive).await?;
    slave::prepare(&client).await?;
    let tx = client
        .transaction()
        .await
        .on_slave("starting the slave's transaction")?;
    slave::lock_set(&tx, &set.name).await?;
    let whose = (set.name.as_str(), node);
    match set.capture {
        Capture::Trigger => slave::write_progress(&tx, whose, snapshot, None, 0).await?,
        Capture::Wal => {
            let at = WalProgress {
                at: lsn,
                partial: None,
            };
            slave::write_wal_progress(&tx, whose, snapshot, at, 0).await?
        }
    }
    tx.commit()
        .await
        .on_slave("recording the slave's new master")
}

/// Drops the old master's hold on its log and WAL for `set`: its registry
/// entries and, under WAL capture, the slots (a slot left behind keeps WAL
/// forever). A slot the old daemon is reading is tried again for a while
/// ([`wal::drop_slots_when_free`]).
async fn let_go(old_master: &Client, set: &Config) -> Result<(), Error> {
    old_master
        .execute(
            "DELETE FROM pgreplica.slave WHERE set_name = $1",
            &[&set.name],
        )
        .await
        .on_master("removing the set's slaves from the old master's registry")?;
    if set.capture == Capture::Trigger {
        return Ok(());
    }
    for slot in wal::drop_slots_when_free(old_master, set).await? {
        tracing::info!("old master: replication slot {slot} dropped");
    }
    Ok(())
}

/// Hands the master of `set` to slave `options.slave` with nothing lost:
/// refuses writes on the master, waits for its open transactions and for
/// every slave to apply everything, carries the sequences, installs capture
/// on the new master and starts every other server (the old master among
/// them) as its slave, then allows writes there. Any failure before the new
/// master is set up gives the master its writes back. Returns the set's file
/// with the roles swapped.
pub async fn switchover(set: &Config, options: &Options) -> Result<String, Error> {
    let doing = "switching over";
    refuse_asymmetric(set, doing)?;
    set.chosen_slaves(Some(options.slave))?;
    let (text, reversed) = reread(set, doing, |t| roles::swap_master(t, options.slave))?;
    let master = db::connect(&set.master, set.keepalive).await?;
    capture::check_version(&master).await?;
    capture::check_mode(&master, set).await?;
    let mut new_master = db::connect(&set.slaves[&options.slave], set.keepalive).await?;
    if set.capture == Capture::Wal {
        wal::check_ready(&new_master, &reversed).await?;
    }
    read_only(&master, true).await?;
    tracing::info!("master: new sessions are read-only (default_transaction_read_only = on)");
    let ready = async {
        drain(&master, options).await?;
        catch_up(set, &master, options.timeout).await?;
        let values = sequence::read(&master, &mut Prepared::default()).await?;
        let raised = sequence::raise(&new_master, &values).await?;
        tracing::info!("new master: {raised} sequence(s) raised to the master's values");
        master
            .query(
                "SELECT reloid::regclass::text FROM pgreplica.tables ORDER BY 1",
                &[],
            )
            .await
            .on_master("reading the master's replicated tables")
    }
    .await;
    let tables: Vec<String> = match ready {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(e) => {
            read_only(&master, false).await?;
            tracing::info!("master: writes allowed again; nothing was changed");
            return Err(e);
        }
    };
    let old_node = registry::node(&master).await?;
    let position = match install_on(&mut new_master, &reversed, &tables, Some(&old_node)).await {
        Ok(position) => position,
        Err(e) => {
            read_only(&master, false).await?;
            tracing::info!("master: writes allowed again; capture stays installed on the slave");
            return Err(e);
        }
    };
    start_slaves(&new_master, &reversed, &position, None).await?;
    slave::disown(&new_master, &reversed.name, &position.node).await?;
    let_go(&master, set).await?;
    read_only(&new_master, false).await?;
    tracing::info!(
        "new master: writes allowed; the old master stays read-only for applications, as a \
         slave"
    );
    Ok(text)
}
