//! Handing a set's master to a slave: switchover under pgbench's TPC-B load
//! (and back) with every committed transaction on both sides, a switchover
//! the slaves cannot finish giving the master its writes back, failover with
//! the master killed and failback, and a slave refused when its progress is
//! of another master.

mod support;

use pgreplica::capture;
use std::process::{Command, Output};
use std::time::Duration;
use support::{Setup, connect, count, pgbench, pgreplica, text};
use tokio_postgres::Client;

const TABLES: [&str; 4] = support::PGBENCH_TABLES;

const SCHEMA: &str = "CREATE TABLE item (id int PRIMARY KEY, note text)";

/// A master and a slave with pgbench's tables (the same rows: `pgbench -i`
/// fills them the same way; its history gets a key), capture on the master.
async fn pgbench_pair() -> Setup {
    let s = Setup::new(1, "SELECT 1").await;
    for dsn in [s.master.dsn("app"), s.slaves[0].dsn("app")] {
        pgbench(&dsn, &["-i", "-q", "-s", "1"]);
        connect(&dsn)
            .await
            .batch_execute("ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY")
            .await
            .unwrap();
    }
    let mut master = s.master().await;
    let set = support::wal_capture().then(|| pgreplica::Config::load(&s.conf).unwrap());
    capture::install(&mut master, &[], set.as_ref())
        .await
        .unwrap();
    s
}

/// TPC-B on `dsn` for `seconds` in the background, from 4 clients; the
/// transactions pgbench counts as done (its clients may be ended by a
/// switchover).
fn tpcb(dsn: String, seconds: u64) -> tokio::task::JoinHandle<i64> {
    tokio::task::spawn_blocking(move || {
        let bin = pgreplica::programs::client("pgbench");
        let out = Command::new(bin)
            .args(["-n", "-c", "4", "-T", &seconds.to_string(), "-R", "150"])
            .arg(&dsn)
            .output()
            .unwrap();
        processed(&out)
    })
}

/// "number of transactions actually processed: 1234" of pgbench's output.
fn processed(out: &Output) -> i64 {
    let printed = text(out);
    printed
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split('/').next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in pgbench's output:\n{printed}"))
}

fn switchover(s: &Setup, extra: &[&str]) -> Output {
    let conf = s.conf.to_str().unwrap();
    let mut args = vec![
        "switchover",
        conf,
        "--slave",
        "1",
        "--write",
        "--timeout",
        "30",
    ];
    args.extend_from_slice(extra);
    pgreplica(&args)
}

fn hang_up(daemon: &support::Daemon) {
    let pid = daemon.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
}

/// A session as an application opens it (pgreplica's own sessions write
/// whatever the database's default, and are never ended by a switchover).
async fn app(dsn: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// Whether a new session of `dsn` may write.
async fn writable(dsn: &str) -> bool {
    let client = app(dsn).await;
    let row = client
        .query_one("SELECT current_setting('transaction_read_only')", &[])
        .await
        .unwrap();
    row.get::<_, String>(0) == "off"
}

async fn same_everywhere(s: &Setup) {
    for query in TABLES {
        s.wait_same(0, query, Duration::from_secs(60)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn switchover_and_back_under_pgbench_keeps_every_transaction() {
    let s = pgbench_pair().await;
    let (first, second) = (s.master.dsn("app"), s.slaves[0].dsn("app"));
    let daemon = s.spawn();
    let load = tpcb(first.clone(), 6);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let out = switchover(&s, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let done_before = load.await.unwrap();
    assert!(done_before > 100, "pgbench did {done_before} transactions");
    // Nothing committed on the old master is missing on the new one.
    for query in TABLES {
        s.assert_same(0, query).await;
    }
    assert!(!writable(&first).await, "the old master still takes writes");
    assert!(writable(&second).await, "the new master refuses writes");
    let conf = std::fs::read_to_string(&s.conf).unwrap();
    assert!(conf.contains(&format!("DSN0={second}")), "{conf}");
    assert!(conf.contains(&format!("DSN1={first}")), "{conf}");

    hang_up(&daemon);
    let done_after = tpcb(second.clone(), 3).await.unwrap();
    same_everywhere(&s).await;

    // And back, under load again.
    let load = tpcb(second.clone(), 6);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = switchover(&s, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let done_back = load.await.unwrap();
    hang_up(&daemon);
    let done_last = tpcb(first.clone(), 3).await.unwrap();
    same_everywhere(&s).await;
    assert!(writable(&first).await && !writable(&second).await);

    // pgbench's own count: one history row per transaction it saw commit.
    let done = done_before + done_after + done_back + done_last;
    println!(
        "pgbench: {done} transactions ({done_before} before the switchover, {done_after} on the \
         new master, {done_back} before switching back, {done_last} after)"
    );
    for dsn in [&first, &second] {
        let rows = count(&connect(dsn).await, "pgbench_history").await;
        assert_eq!(rows, done, "history rows on {dsn}");
    }
    // Between a switchover and the reload, the daemon still running the old
    // file meets slaves of the new master, and leaves them alone.
    let log = s.daemon_log();
    let errors = log.lines().filter(|l| l.contains("ERROR"));
    for line in errors {
        assert!(line.contains("is of another master"), "{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_switchover_the_slaves_cannot_finish_gives_the_master_its_writes_back() {
    let s = Setup::new(1, SCHEMA).await;
    s.master()
        .await
        .batch_execute("INSERT INTO item VALUES (1, 'not replicated yet')")
        .await
        .unwrap();
    let before = std::fs::read_to_string(&s.conf).unwrap();
    // No daemon runs: the slave never catches up.
    let conf = s.conf.to_str().unwrap();
    let out = pgreplica(&["switchover", conf, "--slave", "1", "--timeout", "2"]);
    let printed = text(&out);
    assert!(!out.status.success(), "{printed}");
    assert!(printed.contains("is `pgreplica run` running"), "{printed}");
    assert!(printed.contains("writes allowed again"), "{printed}");
    assert!(writable(&s.master.dsn("app")).await);
    assert_eq!(std::fs::read_to_string(&s.conf).unwrap(), before);
    // A session left open before the switchover is waited for, then named.
    let mut open = app(&s.master.dsn("app")).await;
    let tx = open.transaction().await.unwrap();
    tx.batch_execute("INSERT INTO item VALUES (2, 'open')")
        .await
        .unwrap();
    let out = pgreplica(&["switchover", conf, "--slave", "1", "--timeout", "1"]);
    let printed = text(&out);
    assert!(printed.contains("still inside a transaction"), "{printed}");
    tx.commit().await.unwrap();
    assert!(writable(&s.master.dsn("app")).await);
    // A set whose slaves are not copies is refused before anything is done.
    s.configure("[TABLE public.item]\nSLAVE_TABLE=public.item_copy\n");
    let out = pgreplica(&["switchover", conf, "--slave", "1"]);
    assert!(
        text(&out).contains("captures or lands rows in part"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_with_the_master_killed_then_failback_reports_what_was_lost() {
    let s = Setup::new(1, SCHEMA).await;
    let (first, second) = (s.master.dsn("app"), s.slaves[0].dsn("app"));
    s.replicate(
        "INSERT INTO item SELECT g, 'replicated' FROM generate_series(1, 50) g",
        "SELECT * FROM item ORDER BY id",
    )
    .await;
    // Committed on the master, never applied: lost at the failover.
    s.master()
        .await
        .batch_execute(
            "INSERT INTO item SELECT g, 'lost' FROM generate_series(51, 53) g;
             UPDATE item SET note = 'lost update' WHERE id = 7;",
        )
        .await
        .unwrap();
    let conf = s.conf.to_str().unwrap();
    let out = pgreplica(&["failover", conf, "--slave", "1", "--write"]);
    assert!(text(&out).contains("the master answers"), "{}", text(&out));
    s.master.kill9().unwrap();
    let out = pgreplica(&["failover", conf, "--slave", "1", "--write"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(writable(&second).await);
    let new_master = connect(&second).await;
    new_master
        .batch_execute("INSERT INTO item VALUES (60, 'after the failover'); UPDATE item SET note = 'new' WHERE id = 8")
        .await
        .unwrap();

    // The old master is back: the daemon leaves it alone until failback.
    s.master.restart().unwrap();
    let out = s.run_once();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("pgreplica failback"), "{}", text(&out));

    let out = pgreplica(&["failback", conf, "--slave", "1"]);
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    assert!(
        printed.contains("the old master had 4 change(s)"),
        "{printed}"
    );
    assert!(printed.contains("0 difference(s) left"), "{printed}");
    assert!(
        !writable(&first).await,
        "the old master takes writes as a slave"
    );
    new_master
        .batch_execute("INSERT INTO item VALUES (61, 'after the failback')")
        .await
        .unwrap();
    s.sync();
    s.assert_same(0, "SELECT * FROM item ORDER BY id").await;
    let old: Client = connect(&first).await;
    assert_eq!(count(&old, "item").await, 52);
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_under_pgbench_then_failback_counts_every_lost_transaction() {
    let s = pgbench_pair().await;
    let (first, second) = (s.master.dsn("app"), s.slaves[0].dsn("app"));
    let mut daemon = s.spawn();
    let load = tpcb(first.clone(), 5);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The daemon dies first: what the master commits from then on is lost
    // to the slave when the master crashes under the load.
    daemon.kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.master.kill9().unwrap();
    load.await.unwrap();
    let conf = s.conf.to_str().unwrap();
    let out = pgreplica(&["failover", conf, "--slave", "1", "--write"]);
    assert!(out.status.success(), "{}", text(&out));
    let kept = count(&connect(&second).await, "pgbench_history").await;
    let after = tpcb(second.clone(), 2).await.unwrap();

    s.master.restart().unwrap();
    let had = count(&connect(&first).await, "pgbench_history").await;
    assert!(had > kept, "nothing was lost: {had} rows, {kept} kept");
    let out = pgreplica(&["failback", conf, "--slave", "1"]);
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    // TPC-B: three updates and one insert per transaction.
    let lost = 4 * (had - kept);
    println!(
        "failover: {had} transactions on the old master, {kept} on the new one: {lost} changes lost"
    );
    assert!(
        printed.contains(&format!("the old master had {lost} change(s)")),
        "{printed}"
    );
    s.sync();
    for query in TABLES {
        s.assert_same(0, query).await;
    }
    let rows = count(&connect(&first).await, "pgbench_history").await;
    assert_eq!(rows, kept + after);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slave_whose_progress_is_of_another_master_is_refused() {
    let s = Setup::new(1, SCHEMA).await;
    s.replicate(
        "INSERT INTO item VALUES (1, 'from the first master')",
        "SELECT * FROM item ORDER BY id",
    )
    .await;
    // Another master with the same tables and the same set name: its log is
    // not the one the slave's progress is a position in.
    let other = support::server("UTC");
    connect(&other.dsn("postgres"))
        .await
        .batch_execute("CREATE DATABASE app")
        .await
        .unwrap();
    let mut client = connect(&other.dsn("app")).await;
    client.batch_execute(SCHEMA).await.unwrap();
    capture::install(&mut client, &[], None).await.unwrap();
    client
        .batch_execute("INSERT INTO item VALUES (2, 'from the other master')")
        .await
        .unwrap();
    let conf = s.dir.join("other.conf");
    std::fs::write(
        &conf,
        format!(
            "[MAIN]\nNAME=app\nDSN0={}\nDSN1={}\n",
            other.dsn("app"),
            s.slaves[0].dsn("app")
        ),
    )
    .unwrap();
    let out = pgreplica(&["run", "--once", conf.to_str().unwrap()]);
    let printed = text(&out);
    assert!(!out.status.success(), "{printed}");
    assert!(printed.contains("is of another master"), "{printed}");
    assert_eq!(count(&s.slave(0).await, "item").await, 1);
    let out = pgreplica(&["check", conf.to_str().unwrap()]);
    assert!(
        text(&out).contains("is of another master"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn switchover_and_back_under_wal_capture() {
    let s = Setup::wal(1, SCHEMA).await;
    let (first, second) = (s.master.dsn("app"), s.slaves[0].dsn("app"));
    let daemon = s.spawn();
    let query = "SELECT * FROM item ORDER BY id";
    s.arrives(
        "INSERT INTO item SELECT g, 'before' FROM generate_series(1, 100) g",
        query,
    )
    .await;
    let out = switchover(&s, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("old master: replication slot pgreplica_1_app dropped"),
        "{}",
        text(&out)
    );
    hang_up(&daemon);
    app(&second)
        .await
        .batch_execute("UPDATE item SET note = 'on the new master' WHERE id <= 10")
        .await
        .unwrap();
    s.wait_same(0, query, Duration::from_secs(30)).await;
    let out = switchover(&s, &[]);
    assert!(out.status.success(), "{}", text(&out));
    hang_up(&daemon);
    app(&first)
        .await
        .batch_execute("DELETE FROM item WHERE id > 90")
        .await
        .unwrap();
    s.wait_same(0, query, Duration::from_secs(30)).await;
    assert_eq!(count(&connect(&second).await, "item").await, 90);
    // Each master keeps a slot for its slave only while it is the master.
    let slots = "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgreplica%'";
    for (dsn, slots_there) in [(&first, 1), (&second, 0)] {
        let n: i64 = connect(dsn)
            .await
            .query_one(slots, &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, slots_there, "slots on {dsn}");
    }
}
