//! `clone`: an online initial copy under writers, restart after kill -9, tables
//! added to a running set.

mod support;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::writers::{ACCOUNTS, ALL, start_writers, stop_writers};
use support::{Setup, count, text};

const LEDGER: &str = "CREATE TABLE ledger (id bigint PRIMARY KEY, account int, amount numeric(12,2), at timestamptz DEFAULT now())";
const LEDGER_ALL: &str = "SELECT * FROM ledger ORDER BY id";

/// `pgreplica clone` with these arguments, off the async runtime.
async fn clone(s: &Setup, args: &[&str]) -> Output {
    let mut all = vec!["clone".to_string(), s.conf.to_str().unwrap().to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        support::pgreplica(&args)
    })
    .await
    .unwrap()
}

/// `pgreplica clone` of the set in the background, to be killed.
fn spawn_clone(s: &Setup, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_pgreplica"))
        .args(["clone", s.conf.to_str().unwrap()])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn master_with_rows(s: &Setup, ledger_rows: i64) {
    s.master()
        .await
        .batch_execute(&format!(
            "INSERT INTO accounts SELECT g, 'owner ' || g, g * 1.5, 'note' FROM generate_series(0, 399) g;
             INSERT INTO ledger SELECT g, g % 400, g / 100.0 FROM generate_series(1, {ledger_rows}) g;"
        ))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn clone_under_four_writers_then_replication_carries_on() {
    let s = Setup::with_schemas(1, &format!("{ACCOUNTS}; {LEDGER}"), "").await;
    master_with_rows(&s, 100_000).await;
    let (stop, handles) = start_writers(&s, 4).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The ledger (about 6 MB) is copied in two parts, one per job.
    let out = clone(&s, &["--jobs", "2", "--split-mb", "1"]).await;
    assert!(out.status.success(), "clone failed:\n{}", text(&out));
    let log = text(&out);
    assert!(log.contains("handed over"), "{log}");
    let _daemon = s.spawn();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // While the writers write and the daemon applies, check sees equal sides.
    let conf = s.conf.to_str().unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || support::pgreplica(&["check", &conf]))
        .await
        .unwrap();
    assert!(out.status.success(), "check under load:\n{}", text(&out));
    assert!(text(&out).contains("0 difference(s)"), "{}", text(&out));
    let written = stop_writers(stop, handles).await;
    assert!(
        written > 100,
        "the writers wrote during the clone ({written})"
    );
    s.wait_same(0, ALL, Duration::from_secs(60)).await;
    s.wait_same(0, LEDGER_ALL, Duration::from_secs(60)).await;
    // The slave's tables were created with the master's definition.
    let slave = s.slave(0).await;
    let keys: i64 = slave
        .query_one(
            "SELECT count(*) FROM pg_index WHERE indisprimary AND indrelid IN ('accounts'::regclass, 'ledger'::regclass)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(keys, 2, "both tables have their primary key on the slave");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clone_killed_halfway_starts_again_without_recopying() {
    if support::trigger_only("a WAL clone starts again from a new slot, copying every table again")
    {
        return;
    }
    let s = Setup::with_schemas(1, &format!("{ACCOUNTS}; {LEDGER}"), "").await;
    master_with_rows(&s, 1_000_000).await;
    let (stop, handles) = start_writers(&s, 2).await;
    // One table at a time, biggest first: kill -9 once the ledger is copied.
    let mut child = spawn_clone(&s, &["--jobs", "1"]);
    let slave = s.slave(0).await;
    let started = Instant::now();
    loop {
        let copied = slave
            .query_opt(
                "SELECT 1 FROM pgreplica.cloning WHERE snapshot IS NOT NULL",
                &[],
            )
            .await
            .map(|r| r.is_some())
            .unwrap_or(false);
        if copied {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the ledger was never copied"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "clone ended before it could be killed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        count(&slave, "ledger").await,
        1_000_000,
        "the ledger's copy committed"
    );

    let out = clone(&s, &[]).await;
    assert!(out.status.success(), "clone failed:\n{}", text(&out));
    let log = text(&out);
    assert!(
        log.contains("1 tables were copied by an earlier run") && log.contains("copying 1 tables"),
        "only the rest is copied:\n{log}"
    );
    stop_writers(stop, handles).await;
    s.sync();
    s.assert_same(0, ALL).await;
    s.assert_same(0, LEDGER_ALL).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clone_killed_between_the_parts_of_a_table_copies_it_again() {
    let s = Setup::with_schemas(1, &format!("{ACCOUNTS}; {LEDGER}"), "").await;
    master_with_rows(&s, 1_000_000).await;
    let mut child = spawn_clone(&s, &["--jobs", "4", "--split-mb", "1"]);
    let slave = s.slave(0).await;
    let started = Instant::now();
    // Killed once a part of the ledger has committed, before the whole table has.
    loop {
        let rows = slave
            .query_one("SELECT count(*) FROM ledger", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0);
        if rows > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no part was copied"
        );
        assert!(child.try_wait().unwrap().is_none(), "clone ended too soon");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = count(&slave, "ledger").await;
    assert!(
        partial < 1_000_000,
        "killed before the last part ({partial} rows)"
    );
    // Its own half-copied table is no reason to refuse: no --truncate needed.
    let out = clone(&s, &["--jobs", "2", "--split-mb", "1"]).await;
    assert!(out.status.success(), "clone failed:\n{}", text(&out));
    let keys: i64 = slave
        .query_one(
            "SELECT count(*) FROM pg_index WHERE indisprimary AND indrelid = 'ledger'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(keys, 1, "the key left to build after the rows was built");
    s.sync();
    s.assert_same(0, ALL).await;
    s.assert_same(0, LEDGER_ALL).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_added_to_a_running_set_joins_without_stopping_the_others() {
    if support::trigger_only("under WAL capture clone copies every table of the set") {
        return;
    }
    let s = Setup::new(1, ACCOUNTS).await;
    let _daemon = s.spawn();
    let (stop, handles) = start_writers(&s, 2).await;
    let m = s.master().await;
    m.batch_execute(&format!(
        "{LEDGER}; INSERT INTO ledger SELECT g, g % 400, g FROM generate_series(1, 20000) g"
    ))
    .await
    .unwrap();
    // The master keeps writing the new table during the clone.
    let writer = tokio::spawn(async move {
        for i in 0..200 {
            m.batch_execute(&format!(
                "UPDATE ledger SET amount = amount + 1 WHERE id = {}; INSERT INTO ledger VALUES ({}, 1, 1)",
                i * 7 + 1,
                100_000 + i
            ))
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let out = clone(&s, &["--table", "public.ledger"]).await;
    assert!(out.status.success(), "clone failed:\n{}", text(&out));
    writer.await.unwrap();
    stop_writers(stop, handles).await;
    s.wait_same(0, ALL, Duration::from_secs(60)).await;
    s.wait_same(0, LEDGER_ALL, Duration::from_secs(60)).await;
    let log = s.daemon_log();
    assert!(
        !log.contains("ERROR"),
        "the running set was never stopped:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn clone_refuses_a_slave_table_with_rows_unless_truncate() {
    let s = Setup::new(1, ACCOUNTS).await;
    master_with_rows_accounts_only(&s).await;
    s.slave(0)
        .await
        .batch_execute("INSERT INTO accounts VALUES (-1, 'stale', 0, '')")
        .await
        .unwrap();
    let out = clone(&s, &[]).await;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("already hold rows") && text(&out).contains("--truncate"),
        "{}",
        text(&out)
    );
    let out = clone(&s, &["--truncate"]).await;
    assert!(out.status.success(), "clone failed:\n{}", text(&out));
    s.assert_same(0, ALL).await;
}

async fn master_with_rows_accounts_only(s: &Setup) {
    s.master()
        .await
        .batch_execute("INSERT INTO accounts SELECT g, 'o', g, 'n' FROM generate_series(1, 500) g")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn arrays_and_composites_of_user_types_are_cloned() {
    let types = "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
                 CREATE TYPE spot AS (x int, feeling mood);";
    let table = "CREATE TABLE diary (id int PRIMARY KEY, moods mood[], at spot, spots spot[])";
    // Other types made first on the slave: the same types get other oids there.
    let s = Setup::with_schemas(
        1,
        &format!("{types} {table}"),
        &format!("CREATE TYPE other AS ENUM ('x'); CREATE TYPE more AS (y int); {types}"),
    )
    .await;
    s.master()
        .await
        .batch_execute(
            "INSERT INTO diary SELECT g, ARRAY['sad', 'happy']::mood[], ROW(g, 'ok')::spot,
                                ARRAY[ROW(g, 'sad')::spot]
               FROM generate_series(1, 100) g",
        )
        .await
        .unwrap();
    let out = clone(&s, &[]).await;
    assert!(out.status.success(), "{}", text(&out));
    s.assert_same(0, "SELECT * FROM diary ORDER BY id").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clone_killed_and_never_run_again_shows_in_status_and_can_be_abandoned() {
    if support::trigger_only(
        "an interrupted WAL clone holds its slave until clone runs again (the registry's hold is the log's)",
    ) {
        return;
    }
    let s = Setup::with_schemas(1, &format!("{ACCOUNTS}; {LEDGER}"), "").await;
    master_with_rows(&s, 1_000_000).await;
    let mut child = spawn_clone(&s, &[]);
    let master = s.master().await;
    let started = Instant::now();
    // Killed once its hold is in the master's registry.
    loop {
        let held: i64 = master
            .query_one("SELECT count(*) FROM pgreplica.slave WHERE slave < 0", &[])
            .await
            .unwrap()
            .get(0);
        if held > 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no hold");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let conf = s.conf.to_str().unwrap();
    let out = support::pgreplica(&["status", conf]);
    assert!(
        text(&out).contains("clone hold") && text(&out).contains("--abandon"),
        "{}",
        text(&out)
    );
    let out = support::pgreplica(&["clone", conf, "--slave", "1", "--abandon"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = support::pgreplica(&["status", conf]);
    assert!(!text(&out).contains("clone hold"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_change_made_while_cloning_reaches_a_table_the_clone_creates_once() {
    let s = Setup::with_schemas(
        1,
        "CREATE TABLE big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, 5000) g;
         CREATE TABLE small (id int PRIMARY KEY, v text);
         INSERT INTO small VALUES (1, 'one');",
        "CREATE TABLE big (id int PRIMARY KEY, v text)",
    )
    .await;
    // The slave's copy of the big table (copied first) is held, so the clone
    // waits after taking its snapshot and before it reads the small table's
    // definition, which the master then changes.
    let mut holder = s.slave(0).await;
    let hold = holder.transaction().await.unwrap();
    hold.batch_execute("LOCK TABLE big IN SHARE MODE")
        .await
        .unwrap();
    let cloning = {
        let conf = s.conf.to_str().unwrap().to_string();
        tokio::task::spawn_blocking(move || support::pgreplica(&["clone", &conf, "--jobs", "1"]))
    };
    let waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'big'::regclass";
    let start = Instant::now();
    while hold.query_one(waiting, &[]).await.unwrap().get::<_, i64>(0) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the clone never reached the big table"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let conf = s.conf.to_str().unwrap();
    let out = support::pgreplica(&[
        "execute",
        conf,
        "ALTER TABLE small ADD COLUMN note text DEFAULT 'added'",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    hold.commit().await.unwrap();
    let out = cloning.await.unwrap();
    assert!(out.status.success(), "clone failed:\n{}", text(&out));
    s.sync();
    s.assert_same(0, "SELECT * FROM small ORDER BY id").await;
    s.assert_same(0, "SELECT * FROM big ORDER BY id").await;
}

/// A daemon and a clone starting together on a new slave both create
/// pgreplica's tables there; neither may fail because the other did it at the
/// same moment (`CREATE … IF NOT EXISTS` alone is not safe against that).
#[tokio::test(flavor = "multi_thread")]
async fn sessions_setting_up_a_new_slave_at_once_all_succeed() {
    let pg = support::server("UTC");
    let admin = support::connect(&pg.dsn("postgres")).await;
    for round in 0..5 {
        let db = format!("fresh{round}");
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        let mut sessions = Vec::new();
        for _ in 0..6 {
            sessions.push(support::connect(&pg.dsn(&db)).await);
        }
        let setups = sessions.iter().map(pgreplica::slave::prepare);
        for result in futures_util::future::join_all(setups).await {
            if let Err(e) = result {
                panic!("round {round}: {e}");
            }
        }
    }
}
