//! Schema changes: `pgreplica execute` queues DDL between the data changes; a
//! plain ALTER is detected and recovered from with `clone`.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::{Setup, pgreplica, text};
use tokio_postgres::Client;

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, name text, qty int)";
const ALL: &str = "SELECT * FROM items ORDER BY id";
const COLUMNS: &str = "SELECT column_name, data_type FROM information_schema.columns
                        WHERE table_name = 'items' ORDER BY ordinal_position";

/// Writes `id` and `qty` only, so it keeps working across the changes.
async fn write(client: Client, stop: Arc<AtomicBool>, base: i32) -> u32 {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let id = base + (n % 50) as i32;
        client
            .execute(
                "INSERT INTO items (id, qty) VALUES ($1, 1)
                 ON CONFLICT (id) DO UPDATE SET qty = items.qty + 1",
                &[&id],
            )
            .await
            .unwrap();
        n += 1;
    }
    n
}

async fn writers(s: &Setup) -> (Arc<AtomicBool>, Vec<tokio::task::JoinHandle<u32>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for base in [0, 1000] {
        handles.push(tokio::spawn(write(s.master().await, stop.clone(), base)));
    }
    (stop, handles)
}

async fn stop(stop: Arc<AtomicBool>, handles: Vec<tokio::task::JoinHandle<u32>>) -> u32 {
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for h in handles {
        total += h.await.unwrap();
    }
    total
}

fn execute(s: &Setup, sql: &str) {
    let out = pgreplica(&["execute", s.conf.to_str().unwrap(), sql]);
    assert!(out.status.success(), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn add_rename_and_drop_column_through_execute_converge_under_writes() {
    let s = Setup::new(1, ITEMS).await;
    // Everything in one batch: rows logged before, between and after the changes.
    let (flag, handles) = writers(&s).await;
    for sql in [
        "ALTER TABLE items ADD COLUMN note text DEFAULT 'n'",
        "ALTER TABLE items RENAME COLUMN name TO title",
        "ALTER TABLE items DROP COLUMN note",
    ] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        execute(&s, sql);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(stop(flag, handles).await > 100);
    s.sync();
    s.assert_same(0, COLUMNS).await;
    s.assert_same(0, ALL).await;

    // And with the daemon applying as the changes come.
    let _daemon = s.spawn();
    let (flag, handles) = writers(&s).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    execute(&s, "ALTER TABLE items ADD COLUMN extra int DEFAULT 1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop(flag, handles).await;
    s.wait_same(0, COLUMNS, Duration::from_secs(30)).await;
    s.wait_same(0, ALL, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_alter_is_detected_and_clone_recovers_the_table() {
    if support::trigger_only(
        "clone under WAL capture is not built yet (the WAL's own error names the column the slave lacks)",
    ) {
        return;
    }
    let s = Setup::new(1, ITEMS).await;
    s.replicate("INSERT INTO items VALUES (1, 'one', 1)", ALL)
        .await;
    let m = s.master().await;
    m.batch_execute(
        "INSERT INTO items VALUES (2, 'two', 2); ALTER TABLE items ADD COLUMN note text;
         INSERT INTO items VALUES (3, 'three', 3, 'n')",
    )
    .await
    .unwrap();
    let out = s.run_once();
    assert!(!out.status.success());
    let log = text(&out);
    for part in [
        "definition changed",
        "pgreplica execute",
        "--table \"public\".\"items\" --truncate",
    ] {
        assert!(log.contains(part), "the error says {part}:\n{log}");
    }
    assert_eq!(
        support::count(&s.slave(0).await, "items").await,
        1,
        "nothing applied"
    );

    s.slave(0)
        .await
        .batch_execute("ALTER TABLE items ADD COLUMN note text")
        .await
        .unwrap();
    let out = pgreplica(&[
        "clone",
        s.conf.to_str().unwrap(),
        "--table",
        "public.items",
        "--truncate",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    m.batch_execute("UPDATE items SET note = 'after' WHERE id = 1")
        .await
        .unwrap();
    s.sync();
    s.assert_same(0, ALL).await;
}
