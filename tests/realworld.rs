//! Databases as shops have them: the slave's own triggers and foreign keys,
//! pgbench's tables with their `char(n)` columns, and `check` on them.

mod support;

use pgreplica::capture;
use std::time::Duration;
use support::{Setup, pgbench, text};

/// A schema with what real databases carry on both sides: an audit trigger, a
/// `BEFORE UPDATE` trigger that stamps rows, and foreign keys with cascades.
const SHOP: &str = "
CREATE TABLE audit (id bigserial PRIMARY KEY, tbl text, op text, at timestamptz DEFAULT now());
CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO audit (tbl, op) VALUES (TG_TABLE_NAME, TG_OP); RETURN NULL; END $$;
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.updated_at = clock_timestamp(); RETURN NEW; END $$;
CREATE TABLE orders (id int PRIMARY KEY, amount int, updated_at timestamptz);
CREATE TRIGGER orders_audit AFTER INSERT OR UPDATE OR DELETE ON orders
    FOR EACH ROW EXECUTE FUNCTION audit();
CREATE TRIGGER orders_touch BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION touch();
CREATE TABLE parent (id int PRIMARY KEY, name text);
CREATE TABLE child (id int PRIMARY KEY,
                    parent int REFERENCES parent ON UPDATE CASCADE ON DELETE CASCADE,
                    note text);";

const TABLES: [&str; 4] = [
    "SELECT * FROM audit ORDER BY id",
    "SELECT * FROM orders ORDER BY id",
    "SELECT * FROM parent ORDER BY id",
    "SELECT * FROM child ORDER BY id",
];

#[tokio::test(flavor = "multi_thread")]
async fn the_slaves_own_triggers_and_foreign_key_actions_do_not_fire_while_applying() {
    let s = Setup::new(1, SHOP).await;
    let master = s.master().await;
    master
        .batch_execute(
            "INSERT INTO orders SELECT g, g * 10 FROM generate_series(1, 50) g;
             INSERT INTO parent SELECT g, 'p' || g FROM generate_series(1, 3) g;
             INSERT INTO child SELECT g, 1 + g % 3, 'c' || g FROM generate_series(1, 9) g;",
        )
        .await
        .unwrap();
    let first = s.run_once();
    assert!(first.status.success(), "{}", text(&first));
    master
        .batch_execute(
            "UPDATE orders SET amount = amount + 1 WHERE id % 2 = 0;
             DELETE FROM orders WHERE id > 45;
             UPDATE parent SET id = 100 WHERE id = 1;
             DELETE FROM parent WHERE id = 2;",
        )
        .await
        .unwrap();
    let second = s.run_once();
    assert!(second.status.success(), "{}", text(&second));
    for query in TABLES {
        s.assert_same(0, query).await;
    }
    for out in [&first, &second] {
        assert!(!text(out).contains("conflict:"), "{}", text(out));
    }
}

/// A master and a slave that both hold `pgbench -i -s scale`'s tables (the
/// same rows: pgbench fills them the same way), with capture on the master.
async fn pgbench_pair(scale: &str) -> Setup {
    let s = Setup::new(1, "SELECT 1").await;
    pgbench(&s.master.dsn("app"), &["-i", "-q", "-s", scale]);
    pgbench(&s.slaves[0].dsn("app"), &["-i", "-q", "-s", scale]);
    let mut master = s.master().await;
    capture::install(&mut master, &[], None).await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn pgbench_char_columns_raise_no_conflict() {
    let s = pgbench_pair("1").await;
    pgbench(
        &s.master.dsn("app"),
        &["-n", "-t", "300", "-c", "2", "-M", "prepared"],
    );
    s.master()
        .await
        .batch_execute(
            "DELETE FROM pgbench_accounts WHERE aid % 1000 = 7;
             UPDATE pgbench_tellers SET filler = 'teller three' WHERE tid = 3;
             UPDATE pgbench_branches SET filler = NULL WHERE bid = 1;",
        )
        .await
        .unwrap();
    let out = s.run_once();
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("conflict:"), "{}", text(&out));
    for table in ["accounts", "tellers", "branches"] {
        let id = &table[..1];
        s.assert_same(0, &format!("SELECT * FROM pgbench_{table} ORDER BY {id}id"))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn check_names_three_differences_of_a_pgbench_database() {
    let s = pgbench_pair("5").await;
    s.sync();
    s.slave(0)
        .await
        .batch_execute(
            "UPDATE pgbench_accounts SET abalance = 99 WHERE aid = 180000;
             DELETE FROM pgbench_accounts WHERE aid = 1667;
             INSERT INTO pgbench_tellers VALUES (51, 1, 0, NULL);",
        )
        .await
        .unwrap();
    let conf = s.conf.to_str().unwrap().to_string();
    // A hang guard, not a speed limit: check finishes in seconds.
    let out = support::pgreplica_within(&["check", &conf], Duration::from_secs(300))
        .expect("check did not finish within 300 s");
    let printed = text(&out);
    assert_eq!(out.status.code(), Some(1), "{printed}");
    assert!(printed.contains("3 difference(s)"), "{printed}");
    assert!(
        printed.contains("different: (aid)=(180000): abalance: master 0, slave 99"),
        "{printed}"
    );
    assert!(
        printed.contains("missing on the slave: (aid)=(1667)"),
        "{printed}"
    );
    assert!(
        printed.contains("extra on the slave: (tid)=(51)"),
        "{printed}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn truncates_of_tables_linked_by_foreign_keys_apply_and_clone_empties_a_referenced_table() {
    let s = Setup::new(
        1,
        "CREATE TABLE parent (id int PRIMARY KEY);
         CREATE TABLE child (id int PRIMARY KEY, parent int REFERENCES parent);",
    )
    .await;
    let fill = "INSERT INTO parent SELECT generate_series(1, 5);
                INSERT INTO child SELECT g, 1 + g % 5 FROM generate_series(1, 20) g;";
    let master = s.master().await;
    master.batch_execute(fill).await.unwrap();
    s.sync();
    master
        .batch_execute("TRUNCATE parent, child")
        .await
        .unwrap();
    let out = s.run_once();
    assert!(out.status.success(), "{}", text(&out));
    master.batch_execute(fill).await.unwrap();
    s.sync();
    if support::trigger_only("the rest: clone under WAL capture is not built yet") {
        s.assert_same(0, "SELECT * FROM child ORDER BY id").await;
        return;
    }
    // The README's recovery command, on a table other tables reference.
    let conf = s.conf.to_str().unwrap();
    let out = support::pgreplica(&["clone", conf, "--table", "parent", "--truncate"]);
    assert!(out.status.success(), "{}", text(&out));
    for query in [
        "SELECT * FROM parent ORDER BY id",
        "SELECT * FROM child ORDER BY id",
    ] {
        s.assert_same(0, query).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unique_values_handed_from_row_to_row_apply_without_replaying_the_batch() {
    // Rows stored in descending order, so that a set-based statement on the
    // slave that met them as stored would take a place before it is left.
    let s = Setup::new(
        1,
        "CREATE TABLE places (id int PRIMARY KEY, pos int UNIQUE);
         INSERT INTO places SELECT g, g FROM generate_series(4000, 1, -1) g;
         ANALYZE places;",
    )
    .await;
    let master = s.master().await;
    // Each row takes the place the row before it has just left.
    let moves: String = (1..=4000)
        .map(|i| format!("UPDATE places SET pos = pos - 1 WHERE id = {i};"))
        .collect();
    master
        .batch_execute(&format!("BEGIN; {moves} COMMIT;"))
        .await
        .unwrap();
    // One statement that moves every row down by one more: the master meets
    // the rows in the order the moves above stored them, lowest place first.
    master
        .batch_execute("UPDATE places SET pos = pos - 1")
        .await
        .unwrap();
    let out = s.run_once();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !text(&out).contains("one event at a time"),
        "{}",
        text(&out)
    );
    s.assert_same(0, "SELECT * FROM places ORDER BY id").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_sharing_a_deferred_key_inside_a_transaction_are_refused_not_lost() {
    let s = Setup::new(
        1,
        "CREATE TABLE pairs (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, v text);
         INSERT INTO pairs VALUES (1, 'a'), (2, 'b');",
    )
    .await;
    let master = s.master().await;
    // A swap in two statements: between them two rows hold key 2, which the
    // deferred key allows and the slave cannot tell apart.
    let swap =
        "BEGIN; UPDATE pairs SET id = 2 WHERE v = 'a'; UPDATE pairs SET id = 1 WHERE v = 'b';
                COMMIT;";
    if support::wal_capture() {
        // The WAL holds each row's old and new version: the swap replicates.
        s.replicate(swap, "SELECT * FROM pairs ORDER BY id").await;
        return;
    }
    let swap = master.batch_execute(swap).await;
    let error = swap.expect_err("the swap must be refused");
    let message = error.as_db_error().map(|d| d.message()).unwrap_or("");
    assert!(
        message.contains("pairs") && message.contains("pgreplica"),
        "{error:?}"
    );
    master.batch_execute("ROLLBACK").await.unwrap();
    s.sync();
    s.assert_same(0, "SELECT * FROM pairs ORDER BY id").await;
    // A swap through a free key replicates.
    s.replicate(
        "BEGIN; UPDATE pairs SET id = 3 WHERE v = 'a'; UPDATE pairs SET id = 1 WHERE v = 'b';
         UPDATE pairs SET id = 2 WHERE v = 'a'; COMMIT;",
        "SELECT * FROM pairs ORDER BY id",
    )
    .await;
}

/// An application's pooled session that once updated many rows and then
/// updates one row at a time: the capture trigger's statements are never
/// JIT-compiled (the update's plan, kept for the session and costed for the
/// large update, was compiled again at every later update: 10 ms a row).
#[tokio::test(flavor = "multi_thread")]
async fn single_row_updates_after_a_large_one_are_not_compiled_again() {
    if support::trigger_only("it looks at the capture trigger's statements") {
        return;
    }
    let settings = "shared_preload_libraries = 'pg_stat_statements'\n\
                    pg_stat_statements.track = all";
    let pg = pgreplica::throwaway::Server::start_with("UTC", settings)
        .unwrap_or_else(|e| panic!("cannot start a test PostgreSQL server: {e}"));
    let mut client = support::connect(&pg.dsn("postgres")).await;
    let jit: bool = client
        .query_one("SELECT pg_jit_available()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        jit,
        "this test needs PostgreSQL's JIT: apt-get install postgresql-15 (Debian's has it)"
    );
    client
        .batch_execute(
            "CREATE EXTENSION pg_stat_statements;
             CREATE TABLE t (id int PRIMARY KEY, n int);
             INSERT INTO t SELECT g, 0 FROM generate_series(1, 100000) g",
        )
        .await
        .unwrap();
    capture::install(&mut client, &[], None).await.unwrap();
    client
        .batch_execute("SELECT pg_stat_statements_reset(); UPDATE t SET n = n + 1")
        .await
        .unwrap();
    for id in 1..=20 {
        client
            .execute("UPDATE t SET n = n + 1 WHERE id = $1", &[&id])
            .await
            .unwrap();
    }
    let (calls, compiled): (i64, i64) = {
        let row = client
            .query_one(
                "SELECT coalesce(sum(calls), 0)::int8, coalesce(sum(jit_functions), 0)::int8
                   FROM pg_stat_statements WHERE query LIKE 'INSERT INTO pgreplica.log%'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(calls, 21, "the capture's statement was not seen");
    assert_eq!(compiled, 0, "the capture's statement was JIT-compiled");
}
