//! Replication as a DBA sees it: changes arrive once, in order, through errors and conflicts.

mod support;

use std::time::Duration;
use support::{Setup, count, text};

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, name text, qty int, data bytea)";
const ALL: &str = "SELECT * FROM items ORDER BY id";

#[tokio::test(flavor = "multi_thread")]
async fn inserts_updates_and_deletes_arrive() {
    let s = Setup::new(1, ITEMS).await;
    s.replicate(
        "INSERT INTO items VALUES (1, 'one', 1), (2, 'two', 2), (3, 'three', 3);
         UPDATE items SET qty = 20, name = 'TWO' WHERE id = 2;
         DELETE FROM items WHERE id = 3;",
        ALL,
    )
    .await;
    assert_eq!(count(&s.slave(0).await, "items").await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_set_reaches_its_servers_through_unix_sockets_whatever_the_sslmode() {
    let s = Setup::new(1, ITEMS).await;
    // As libpq does, a socket path for host connects without TLS: sslmode
    // is for TCP (prefer by default, require given here for the slave).
    let mut text = std::fs::read_to_string(&s.conf).unwrap();
    for (server, extra) in [(&s.master, ""), (&s.slaves[0], " sslmode=require")] {
        text = text.replace(
            &format!("host=127.0.0.1 port={}", server.port),
            &format!(
                "host={} port={}{extra}",
                server.socket_dir().display(),
                server.port
            ),
        );
    }
    std::fs::write(&s.conf, text).unwrap();
    s.replicate("INSERT INTO items VALUES (1, 'one', 1)", ALL)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn thousand_row_statements_arrive() {
    let s = Setup::new(1, ITEMS).await;
    let m = s.master().await;
    s.replicate(
        "INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, 1000) g",
        ALL,
    )
    .await;
    s.replicate("UPDATE items SET qty = qty * 2, name = name || '!'", ALL)
        .await;
    s.replicate("DELETE FROM items WHERE id % 3 = 0", ALL).await;
    m.batch_execute("DELETE FROM items").await.unwrap();
    s.sync();
    assert_eq!(count(&s.slave(0).await, "items").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bytea_with_every_byte_value_arrives_exactly() {
    let s = Setup::new(1, ITEMS).await;
    let m = s.master().await;
    let all: Vec<u8> = (0..=255).collect();
    m.execute("INSERT INTO items (id, data) VALUES (1, $1)", &[&all])
        .await
        .unwrap();
    let reversed: Vec<u8> = (0..=255).rev().collect();
    m.execute("INSERT INTO items (id, data) VALUES (2, $1)", &[&reversed])
        .await
        .unwrap();
    m.execute("UPDATE items SET data = $1 WHERE id = 2", &[&all])
        .await
        .unwrap();
    s.sync();
    s.assert_same(0, ALL).await;
    let row = s
        .slave(0)
        .await
        .query_one("SELECT data FROM items WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, Vec<u8>>(0), all);
}

#[tokio::test(flavor = "multi_thread")]
async fn long_transaction_committed_last_still_arrives() {
    let s = Setup::new(1, ITEMS).await;
    let mut long = s.master().await;
    let short = s.master().await;
    // The long transaction takes its log positions first…
    let tx = long.transaction().await.unwrap();
    tx.execute("INSERT INTO items VALUES (1, 'long', 1)", &[])
        .await
        .unwrap();
    // …a shorter one writes after it and commits first, and is applied meanwhile.
    short
        .execute("INSERT INTO items VALUES (2, 'short', 2)", &[])
        .await
        .unwrap();
    s.sync();
    let slave = s.slave(0).await;
    let ids: Vec<i32> = slave
        .query("SELECT id FROM items ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        ids,
        vec![2],
        "the short transaction is not held back by the open one"
    );
    tx.execute("UPDATE items SET qty = 10 WHERE id = 1", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    s.sync();
    s.sync();
    s.assert_same(0, ALL).await;
    let applied: i64 = slave
        .query_one("SELECT events FROM pgreplica.progress", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied, 3, "each event applied exactly once");
}

#[tokio::test(flavor = "multi_thread")]
async fn rolled_back_work_leaves_nothing() {
    let s = Setup::new(1, ITEMS).await;
    let mut m = s.master().await;
    let tx = m.transaction().await.unwrap();
    tx.execute("INSERT INTO items VALUES (1, 'gone', 1)", &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    s.replicate(
        "BEGIN; INSERT INTO items VALUES (2, 'kept', 2); SAVEPOINT a;
         INSERT INTO items VALUES (3, 'gone', 3); UPDATE items SET qty = 99 WHERE id = 2;
         ROLLBACK TO a; INSERT INTO items VALUES (4, 'kept', 4); COMMIT;",
        ALL,
    )
    .await;
    assert_eq!(count(&s.slave(0).await, "items").await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn truncate_replicates() {
    let s = Setup::new(1, ITEMS).await;
    let m = s.master().await;
    m.batch_execute("INSERT INTO items SELECT g FROM generate_series(1, 10) g")
        .await
        .unwrap();
    s.sync();
    s.replicate(
        "TRUNCATE items; INSERT INTO items VALUES (42, 'after')",
        ALL,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn insert_conflict_stops_the_slave_until_fixed() {
    let s = Setup::new(1, ITEMS).await;
    let m = s.master().await;
    let slave = s.slave(0).await;
    slave
        .batch_execute("INSERT INTO items VALUES (7, 'already here', 0)")
        .await
        .unwrap();
    m.batch_execute(
        "INSERT INTO items VALUES (6, 'six', 6); INSERT INTO items VALUES (7, 'seven', 7)",
    )
    .await
    .unwrap();
    m.batch_execute("INSERT INTO items VALUES (8, 'eight', 8)")
        .await
        .unwrap();
    let out = s.run_once();
    assert!(
        !out.status.success(),
        "a stopped slave makes run --once fail"
    );
    let log = text(&out);
    for part in [
        "set{name=app slave=1}",
        "items",
        "(id)=(7)",
        "event",
        "duplicate key",
    ] {
        assert!(log.contains(part), "the error names {part}:\n{log}");
    }
    assert_eq!(
        count(&slave, "items").await,
        1,
        "nothing of the failed batch is applied"
    );
    let status = text(&support::pgreplica(&[
        "status",
        "--json",
        s.conf.to_str().unwrap(),
    ]));
    assert!(
        status.contains("\"state\": \"stopped\"") && status.contains("duplicate key"),
        "{status}"
    );

    // The running daemon retries with backoff and resumes once the DBA fixes the slave.
    let _daemon = s.spawn();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(count(&slave, "items").await, 1);
    slave
        .batch_execute("DELETE FROM items WHERE id = 7")
        .await
        .unwrap();
    s.wait_same(0, ALL, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_inside_a_bulk_update_names_the_exact_row() {
    let s = Setup::with_schemas(
        1,
        ITEMS,
        &format!("{ITEMS}; ALTER TABLE items ADD CHECK (qty <> 700)"),
    )
    .await;
    let m = s.master().await;
    let slave = s.slave(0).await;
    s.replicate(
        "INSERT INTO items SELECT g, 'row ' || g, 0 FROM generate_series(1, 1000) g",
        ALL,
    )
    .await;
    m.batch_execute("UPDATE items SET qty = id").await.unwrap();
    let out = s.run_once();
    assert!(!out.status.success(), "the failed update stops the slave");
    let log = text(&out);
    for part in ["(id)=(700)", "event", "items_qty_check"] {
        assert!(log.contains(part), "the error names {part}:\n{log}");
    }
    let updated: i64 = slave
        .query_one("SELECT count(*) FROM items WHERE qty <> 0", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(updated, 0, "nothing of the failed batch is applied");
    slave
        .batch_execute("ALTER TABLE items DROP CONSTRAINT items_qty_check")
        .await
        .unwrap();
    s.sync();
    s.assert_same(0, ALL).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn update_or_delete_of_a_missing_or_changed_row_is_a_conflict_warning() {
    let s = Setup::new(1, ITEMS).await;
    let m = s.master().await;
    m.batch_execute("INSERT INTO items VALUES (1, 'a', 1), (2, 'b', 2), (3, 'c', 3)")
        .await
        .unwrap();
    s.sync();
    let slave = s.slave(0).await;
    slave
        .batch_execute("DELETE FROM items WHERE id = 1; UPDATE items SET qty = 200 WHERE id = 2")
        .await
        .unwrap();
    m.batch_execute("UPDATE items SET qty = 10 WHERE id = 1; UPDATE items SET qty = 20 WHERE id = 2; DELETE FROM items WHERE id = 3")
        .await
        .unwrap();
    let out = s.run_once();
    assert!(
        out.status.success(),
        "conflicts do not stop the slave:\n{}",
        text(&out)
    );
    let log = text(&out);
    assert!(
        log.contains("conflict: update of a row that is missing on the slave"),
        "{log}"
    );
    assert!(
        log.contains("conflict: update of a row that had changed on the slave"),
        "{log}"
    );
    assert!(
        log.contains("local=qty=200") && log.contains("remote_old=qty=2"),
        "{log}"
    );
    let rows: Vec<(i32, i32)> = slave
        .query("SELECT id, qty FROM items ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, vec![(2, 20)], "applied as far as it could be");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_sends_only_the_changed_columns() {
    let s = Setup::new(1, ITEMS).await;
    let m = s.master().await;
    m.batch_execute("INSERT INTO items VALUES (1, 'a', 1)")
        .await
        .unwrap();
    s.sync();
    // A slave-side value in a column the master does not touch survives the update.
    s.slave(0)
        .await
        .batch_execute("UPDATE items SET name = 'slave' WHERE id = 1")
        .await
        .unwrap();
    m.batch_execute("UPDATE items SET qty = 5 WHERE id = 1")
        .await
        .unwrap();
    s.sync();
    let row = s
        .slave(0)
        .await
        .query_one("SELECT name, qty FROM items", &[])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i32>(1)),
        ("slave".to_string(), 5)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_slaves_keep_their_own_positions_while_one_is_stopped() {
    if support::trigger_only("events waiting are counted in the log") {
        return;
    }
    let s = Setup::new(2, ITEMS).await;
    let m = s.master().await;
    m.batch_execute("INSERT INTO items VALUES (1, 'one', 1)")
        .await
        .unwrap();
    s.sync();
    s.slaves[1].stop("fast").unwrap();
    m.batch_execute(
        "INSERT INTO items VALUES (2, 'two', 2); UPDATE items SET qty = 11 WHERE id = 1",
    )
    .await
    .unwrap();
    let out = s.run_once();
    assert!(!out.status.success(), "slave 2 is down");
    s.assert_same(0, ALL).await;
    let out = support::pgreplica(&["status", "--json", s.conf.to_str().unwrap()]);
    let status = text(&out);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["events_waiting"], 0, "{status}");
    assert_eq!(json[1]["events_waiting"], 2, "{status}");
    assert_eq!(json[1]["state"], "stopped", "{status}");
    // The log is kept for the slave that is away…
    for _ in 0..2 {
        assert!(!s.run_once().status.success());
    }
    let kept = count(&m, "pgreplica.log").await;
    assert!(
        kept >= 2,
        "events slave 2 has not applied are kept ({kept})"
    );
    s.slaves[1].restart().unwrap();
    s.sync();
    s.assert_same(1, ALL).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slave_that_never_reached_the_master_is_not_cleaned_past() {
    if support::trigger_only(
        "the log's cleanup (under WAL capture each slave's slot keeps its WAL)",
    ) {
        return;
    }
    let s = Setup::new(2, ITEMS).await;
    // Slave 2 is down from the start: its task never registers on the master.
    s.slaves[1].stop("fast").unwrap();
    let m = s.master().await;
    m.batch_execute("INSERT INTO items SELECT g, 'row', g FROM generate_series(1, 50) g")
        .await
        .unwrap();
    for _ in 0..2 {
        assert!(!s.run_once().status.success(), "slave 2 is down");
    }
    s.assert_same(0, ALL).await;
    assert_eq!(
        count(&m, "pgreplica.log").await,
        50,
        "the log waits for slave 2"
    );
    s.slaves[1].restart().unwrap();
    s.sync();
    s.assert_same(1, ALL).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn applied_events_are_cleaned_from_the_master_log() {
    let s = Setup::new(1, ITEMS).await;
    let m = s.master().await;
    for round in 0..3 {
        m.execute(
            "INSERT INTO items SELECT g + $1 * 100 FROM generate_series(1, 100) g",
            &[&round],
        )
        .await
        .unwrap();
        s.sync();
    }
    // The last batch's own transactions are below the next snapshot's xmin only
    // after one more pass; cleanup then leaves nothing behind.
    s.sync();
    assert_eq!(count(&m, "pgreplica.log").await, 0);
    s.assert_same(0, ALL).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_daemon_applies_a_change_within_milliseconds() {
    let s = Setup::new(1, ITEMS).await;
    let _daemon = s.spawn();
    let m = s.master().await;
    m.batch_execute("INSERT INTO items VALUES (0, 'warm up')")
        .await
        .unwrap();
    s.wait_same(0, ALL, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    m.batch_execute("INSERT INTO items VALUES (1, 'notified')")
        .await
        .unwrap();
    let took = s.wait_same(0, ALL, Duration::from_secs(10)).await;
    // Not a timing assertion: the figure is printed for the record. It arrived
    // well before the 2 s heartbeat would have picked it up.
    println!("idle change arrived on the slave after {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_made_while_a_batch_is_applied_in_steps_still_arrives() {
    let s = Setup::new(1, "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    s.configure("BATCH_EVENTS=10\n");
    let _daemon = s.spawn();
    s.arrives(
        "INSERT INTO t VALUES (0, 'first')",
        "SELECT * FROM t ORDER BY id",
    )
    .await;
    let master = s.master().await;
    // 300 steps of 10 events; the last row commits (and notifies) meanwhile,
    // and nothing is written after it.
    master
        .batch_execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 3000) g")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.arrives(
        "INSERT INTO t VALUES (9999, 'last')",
        "SELECT * FROM t ORDER BY id",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_backlog_is_applied_in_bounded_steps() {
    let s = Setup::new(1, "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    s.configure("BATCH_EVENTS=1000\n");
    let master = s.master().await;
    for i in 0..10 {
        let (from, to) = (i * 500 + 1, i * 500 + 500);
        master
            .batch_execute(&format!(
                "INSERT INTO t SELECT g, 'x' FROM generate_series({from}, {to}) g"
            ))
            .await
            .unwrap();
    }
    // One transaction of 5,000 events is cut too.
    master.batch_execute("UPDATE t SET v = 'y'").await.unwrap();
    let out = s.run_once();
    assert!(out.status.success(), "{}", text(&out));
    s.assert_same(0, "SELECT * FROM t ORDER BY id").await;
    let steps = text(&out).matches("part of the batch after it").count();
    assert!(
        steps >= 9,
        "10,000 events in steps of 1,000: {steps} cut steps\n{}",
        text(&out)
    );
    let applied: i64 = s
        .slave(0)
        .await
        .query_one("SELECT events FROM pgreplica.progress", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied, 10_000, "every event applied once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slave_restored_from_an_older_backup_is_stopped_and_told_to_clone() {
    if support::trigger_only(
        "the log's cleanup (WAL: wal.rs, a_slave_older_than_its_slot_stops_and_says_to_clone_it)",
    ) {
        return;
    }
    let s = Setup::new(1, "CREATE TABLE t (id int PRIMARY KEY)").await;
    let master = s.master().await;
    master
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    s.sync();
    let slave = s.slave(0).await;
    let backup: String = slave
        .query_one("SELECT snapshot FROM pgreplica.progress", &[])
        .await
        .unwrap()
        .get(0);
    // Applied, then cleaned from the master's log.
    master
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap();
    s.sync();
    // The slave comes back from the backup taken before.
    slave
        .execute("UPDATE pgreplica.progress SET snapshot = $1", &[&backup])
        .await
        .unwrap();
    slave
        .batch_execute("DELETE FROM t WHERE id = 2")
        .await
        .unwrap();
    master
        .batch_execute("INSERT INTO t VALUES (3)")
        .await
        .unwrap();
    let out = s.run_once();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("older than what the master's log was cleaned to")
            && text(&out).contains("pgreplica clone"),
        "{}",
        text(&out)
    );
    assert_eq!(count(&slave, "t").await, 1, "nothing applied over the gap");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_locked_on_the_slave_fails_the_batch_instead_of_hanging() {
    let s = Setup::new(1, "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    s.configure("LOCK_TIMEOUT=1\n");
    let master = s.master().await;
    master
        .batch_execute("INSERT INTO t VALUES (1, 'a')")
        .await
        .unwrap();
    s.sync();
    let mut holder = s.slave(0).await;
    let lock = holder.transaction().await.unwrap();
    lock.batch_execute("SELECT * FROM t WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    master.batch_execute("UPDATE t SET v = 'b'").await.unwrap();
    let conf = s.conf.to_str().unwrap();
    let out = support::pgreplica_within(&["run", "--once", conf], Duration::from_secs(60))
        .expect("the batch waited for the lock without bound");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("lock timeout"), "{}", text(&out));
    lock.rollback().await.unwrap();
    s.sync();
    s.assert_same(0, "SELECT * FROM t ORDER BY id").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_held_up_on_the_slave_is_cancelled_and_listening_stays_outside_it() {
    let s = Setup::new(1, "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let slave = s.slave(0).await;
    // Something on the slave that holds every batch up without taking a lock.
    slave
        .batch_execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql
                 AS $$ BEGIN PERFORM pg_sleep(600); RETURN NULL; END $$;
             CREATE TRIGGER slow AFTER INSERT ON t FOR EACH STATEMENT EXECUTE FUNCTION slow();
             ALTER TABLE t ENABLE ALWAYS TRIGGER slow;",
        )
        .await
        .unwrap();
    s.configure("BATCH_TIMEOUT=3\n");
    let master = s.master().await;
    master
        .batch_execute("INSERT INTO t VALUES (1, 'a')")
        .await
        .unwrap();
    let mut daemon = s.spawn();
    let listening = "SELECT state FROM pg_stat_activity WHERE query = 'LISTEN pgreplica'";
    let start = std::time::Instant::now();
    let mut seen = 0;
    while !s.daemon_log().contains("BATCH_TIMEOUT") {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the batch was never cancelled:\n{}",
            s.daemon_log()
        );
        // The session that listens for changes is never the one that waits
        // inside the batch's transaction.
        for row in master.query(listening, &[]).await.unwrap() {
            assert_eq!(row.get::<_, String>(0), "idle");
            seen += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(seen > 0, "no session listened on the master");
    let status = support::pgreplica(&["status", s.conf.to_str().unwrap()]);
    assert!(text(&status).contains("BATCH_TIMEOUT"), "{}", text(&status));
    slave.batch_execute("DROP TRIGGER slow ON t").await.unwrap();
    s.wait_same(0, "SELECT * FROM t ORDER BY id", Duration::from_secs(60))
        .await;
    daemon.terminate();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_dropped_on_the_master_while_its_events_wait_stops_nothing() {
    if support::trigger_only(
        "the log keeps a dropped table's definition (the WAL is decoded with the catalog of its time)",
    ) {
        return;
    }
    let s = Setup::new(
        1,
        "CREATE TABLE staging (id int PRIMARY KEY, v text); CREATE TABLE kept (id int PRIMARY KEY)",
    )
    .await;
    s.master()
        .await
        .batch_execute(
            "INSERT INTO staging VALUES (1, 'a'), (2, 'b');
             INSERT INTO kept VALUES (1);
             DROP TABLE staging;
             INSERT INTO kept VALUES (2);",
        )
        .await
        .unwrap();
    let out = s.run_once();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("table \"public\".\"staging\" was dropped on the master"),
        "{}",
        text(&out)
    );
    s.assert_same(0, "SELECT * FROM kept ORDER BY id").await;
    let slave = s.slave(0).await;
    assert_eq!(
        count(&slave, "staging").await,
        2,
        "its waiting events applied"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_too_long_for_the_slaves_column_stops_instead_of_truncating() {
    let s = Setup::with_schemas(
        1,
        "CREATE TABLE t (id int PRIMARY KEY, code varchar(10))",
        "CREATE TABLE t (id int PRIMARY KEY, code varchar(5))",
    )
    .await;
    let master = s.master().await;
    master
        .batch_execute("INSERT INTO t VALUES (1, 'abc'), (2, 'def')")
        .await
        .unwrap();
    s.sync();
    master
        .batch_execute("UPDATE t SET code = 'abcdefgh'")
        .await
        .unwrap();
    let out = s.run_once();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("value too long for type character varying(5)"),
        "{}",
        text(&out)
    );
    let code: String = s
        .slave(0)
        .await
        .query_one("SELECT code FROM t WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(code, "abc", "nothing cut short on the slave");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_renamed_or_moved_on_the_master_without_execute_stops_nothing() {
    let s = Setup::new(
        1,
        "CREATE SCHEMA archive; CREATE TABLE orders (id int PRIMARY KEY, v text);
         CREATE TABLE kept (id int PRIMARY KEY)",
    )
    .await;
    let master = s.master().await;
    master
        .batch_execute(
            "INSERT INTO orders VALUES (1, 'a'), (2, 'b');
             ALTER TABLE orders RENAME TO sales;
             INSERT INTO sales VALUES (3, 'c');
             INSERT INTO kept VALUES (1);",
        )
        .await
        .unwrap();
    let out = s.run_once();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("\"public\".\"orders\" was renamed or moved on the master"),
        "{}",
        text(&out)
    );
    let slave = s.slave(0).await;
    assert_eq!(
        count(&slave, "orders").await,
        3,
        "applied to the slave's table as it is"
    );
    s.assert_same(0, "SELECT * FROM kept ORDER BY id").await;
    // The DBA follows on the slave and records the new name on the master, as
    // the warning says; then the table moves to another schema.
    slave
        .batch_execute("ALTER TABLE orders RENAME TO sales")
        .await
        .unwrap();
    let out = support::pgreplica(&["install", s.conf.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    master
        .batch_execute(
            "UPDATE sales SET v = 'changed' WHERE id = 1;
             ALTER TABLE sales SET SCHEMA archive;
             DELETE FROM archive.sales WHERE id = 2;",
        )
        .await
        .unwrap();
    let out = s.run_once();
    assert!(out.status.success(), "{}", text(&out));
    let rows = "SELECT * FROM sales ORDER BY id";
    let on_slave = s.text(Some(0), rows).await;
    let on_master = s
        .text(None, "SELECT * FROM archive.sales ORDER BY id")
        .await;
    assert_eq!(on_slave, on_master);
}

/// Inserts row `id` into `t` on the master and waits (`seconds` at most) for
/// `pgreplica.wait()` in the same session.
async fn insert_and_wait(s: &Setup, id: i32, seconds: u32) -> bool {
    let master = s.master().await;
    master
        .batch_execute(&format!("INSERT INTO t VALUES ({id}, 'x')"))
        .await
        .unwrap();
    master
        .query_one(&format!("SELECT pgreplica.wait('{seconds} seconds')"), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_n_makes_wait_count_n_slaves_of_the_set() {
    let s = Setup::new(2, "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    // Slave 2 cannot apply: it lacks the table.
    s.slave(1)
        .await
        .batch_execute("DROP TABLE t")
        .await
        .unwrap();
    let conf = std::fs::read_to_string(&s.conf).unwrap();
    // Without SYNC, wait() counts one slave.
    let mut daemon = s.spawn();
    assert!(insert_and_wait(&s, 1, 30).await, "one slave has it");
    daemon.terminate();
    // SYNC = 2: both must have it.
    s.configure("SYNC=2\n");
    let mut daemon = s.spawn();
    // The new SYNC counts once the daemon has registered the slaves with it.
    let master = s.master().await;
    let started = std::time::Instant::now();
    loop {
        let sync: Option<i32> = master
            .query_one("SELECT max(sync) FROM pgreplica.slave", &[])
            .await
            .unwrap()
            .get(0);
        if sync == Some(2) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "SYNC=2 never registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!insert_and_wait(&s, 2, 3).await, "only one slave has it");
    s.slave(1)
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    // The stopped slave is retried with backoff (8 s or more on a loaded
    // machine by now): wait() returns as soon as it has caught up.
    assert!(insert_and_wait(&s, 3, 120).await, "both slaves have it");
    assert_eq!(count(&s.slave(1).await, "t").await, 3);
    daemon.terminate();
    // More than the set's slaves is refused with the file, line and key.
    std::fs::write(&s.conf, format!("{conf}SYNC=3\n")).unwrap();
    let out = s.run_once();
    let said = text(&out);
    assert!(
        said.contains(": SYNC: 3 slaves, but the set has 2"),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_returns_once_the_slaves_have_the_sessions_last_write() {
    let s = Setup::new(
        2,
        "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE ROLE app LOGIN;
         GRANT SELECT, INSERT ON t TO app;",
    )
    .await;
    s.sync();
    let mut daemon = s.spawn();
    // The application's own role: it reads nothing of pgreplica's, and waits.
    let app = support::connect(&format!(
        "host=127.0.0.1 port={} user=app dbname=app",
        s.master.port
    ))
    .await;
    let waited = "SELECT pgreplica.wait('20 seconds', 2)";
    assert!(
        app.query_one(waited, &[]).await.unwrap().get::<_, bool>(0),
        "nothing written yet"
    );
    for i in 1..=20 {
        app.batch_execute(&format!("INSERT INTO t VALUES ({i}, 'x')"))
            .await
            .unwrap();
        assert!(app.query_one(waited, &[]).await.unwrap().get::<_, bool>(0));
        // Read-your-writes: the row is on both slaves when wait returns.
        for n in 0..2 {
            assert_eq!(
                count(&s.slave(n).await, "t").await,
                i as i64,
                "slave {n}, row {i}"
            );
        }
    }
    // Inside the writing transaction it cannot be waited for.
    let e = app
        .batch_execute("BEGIN; INSERT INTO t VALUES (100, 'y'); SELECT pgreplica.wait()")
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("after the transaction"), "{e:?}");
    app.batch_execute("ROLLBACK").await.unwrap();
    // With the daemon gone, it gives up at the timeout and says so.
    daemon.terminate();
    app.batch_execute("INSERT INTO t VALUES (101, 'z')")
        .await
        .unwrap();
    let late: bool = app
        .query_one("SELECT pgreplica.wait('300 milliseconds')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!late);
    // From a shell: everything committed so far, on every slave.
    let _daemon = s.spawn();
    let out = support::pgreplica(&["wait", s.conf.to_str().unwrap(), "--timeout", "30"]);
    assert!(out.status.success(), "{}", text(&out));
    for n in 0..2 {
        assert_eq!(count(&s.slave(n).await, "t").await, 21);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_reader_of_the_slaves_progress_does_not_hold_up_a_starting_daemon() {
    let s = Setup::new(1, "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    s.sync();
    // A long `check` reads the slave's progress in one transaction.
    let mut reader = s.slave(0).await;
    let reading = reader.transaction().await.unwrap();
    reading
        .batch_execute("SELECT * FROM pgreplica.progress")
        .await
        .unwrap();
    let _daemon = s.spawn();
    s.arrives(
        "INSERT INTO t VALUES (1, 'a')",
        "SELECT * FROM t ORDER BY id",
    )
    .await;
    reading.rollback().await.unwrap();
}
