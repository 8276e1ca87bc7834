//! Security: an application role writes replicated tables but cannot touch the log.

mod support;

use support::{Setup, connect};
use tokio_postgres::Client;

/// A replicated table and an application role that may write it.
const SHOP: &str = "CREATE TABLE orders (id int PRIMARY KEY, item text);
                    CREATE ROLE app LOGIN;
                    GRANT SELECT, INSERT, UPDATE, DELETE ON orders TO app;";

/// A session of the application role on the master.
async fn application(s: &Setup) -> Client {
    connect(&format!(
        "host=127.0.0.1 port={} user=app dbname=app",
        s.master.port
    ))
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_application_role_cannot_forge_or_erase_log_rows() {
    let s = Setup::new(1, SHOP).await;
    let app = application(&s).await;
    app.batch_execute("INSERT INTO orders VALUES (1, 'book'), (2, 'pen'); UPDATE orders SET item = 'ink' WHERE id = 2; DELETE FROM orders WHERE id = 1")
        .await
        .expect("the application writes replicated tables through the capture trigger");

    let attempts = [
        "INSERT INTO pgreplica.log (ev_table, ev_op, ev_new) VALUES ('orders'::regclass, 'I', '(9,forged)')",
        "UPDATE pgreplica.log SET ev_new = '(2,forged)'",
        "DELETE FROM pgreplica.log",
        "TRUNCATE pgreplica.log",
        "SELECT * FROM pgreplica.log",
        "UPDATE pgreplica.slave SET snapshot = txid_current_snapshot()",
        "DELETE FROM pgreplica.tables",
        "SELECT pgreplica.attach('orders')",
        "CREATE OR REPLACE FUNCTION pgreplica.attach(tbl regclass) RETURNS text LANGUAGE sql AS 'SELECT NULL::text'",
        "CREATE TABLE pgreplica.extra (x int)",
    ];
    let capture_fn = s
        .master()
        .await
        .query_one("SELECT pgreplica.capture_name('orders')", &[])
        .await
        .unwrap()
        .get::<_, String>(0);
    let replace = format!(
        "CREATE OR REPLACE FUNCTION pgreplica.{capture_fn}() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'"
    );
    for sql in attempts.iter().copied().chain([replace.as_str()]) {
        let err = app.batch_execute(sql).await.expect_err(sql);
        let message = err
            .as_db_error()
            .map(|e| e.message().to_string())
            .unwrap_or_default();
        assert!(
            message.contains("permission denied") || message.contains("must be owner"),
            "{sql}: {message}"
        );
    }
    // A search_path pointing at the application's own objects changes nothing either.
    app.batch_execute("SET search_path = pg_temp, public; INSERT INTO orders VALUES (3, 'cup')")
        .await
        .unwrap();
    s.sync();
    s.assert_same(0, "SELECT * FROM orders ORDER BY id").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_application_session_cannot_mark_its_changes_as_another_nodes() {
    let s = Setup::new(1, SHOP).await;
    // Two named nodes: changes that came from the slave's node never go back to it.
    s.configure("NODE0=hq\nNODE1=shop\n");
    let app = application(&s).await;
    app.batch_execute(
        "SET pgreplica.origin = 'shop';
         INSERT INTO orders VALUES (1, 'forged origin');
         SELECT set_config('pgreplica.origin', 'shop', true);
         INSERT INTO orders VALUES (2, 'pooled session')",
    )
    .await
    .unwrap();
    let err = app
        .batch_execute("SET session_replication_role = replica")
        .await
        .expect_err("an application role may not pose as replication");
    let message = err.as_db_error().map(|e| e.message().to_string());
    assert!(
        message
            .as_deref()
            .unwrap_or("")
            .contains("permission denied"),
        "{message:?}"
    );
    s.sync();
    s.assert_same(0, "SELECT * FROM orders ORDER BY id").await;
}
