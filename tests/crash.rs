//! Concurrency and crashes: writers, kill -9 of the daemon, server restarts.

mod support;

use rand::Rng;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::Setup;
use tokio_postgres::Client;

const ACCOUNTS: &str =
    "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance numeric, note text)";
const ALL: &str = "SELECT * FROM accounts ORDER BY id";

/// One writer's random mix: inserts, updates (of the key too), deletes,
/// rolled-back transactions and rolled-back savepoints.
async fn write_randomly(mut client: Client, writer: i32, stop: Arc<AtomicBool>) -> u64 {
    let mut done = 0;
    while !stop.load(Ordering::Relaxed) {
        let (op, id, other, roll, save) = {
            let mut r = rand::thread_rng();
            (
                r.gen_range(0..5),
                r.gen_range(0..400),
                r.gen_range(0..400),
                r.gen_bool(0.1),
                r.gen_bool(0.2),
            )
        };
        let Ok(tx) = client.transaction().await else {
            break;
        };
        let sql = match op {
            0 | 1 => format!(
                "INSERT INTO accounts VALUES ({id}, 'w{writer}', {id}.5, E'n\\t{id}') ON CONFLICT (id) DO UPDATE SET balance = accounts.balance + 1"
            ),
            2 => format!(
                "UPDATE accounts SET balance = balance * 2, note = 'w{writer}' WHERE id = {id}"
            ),
            3 => format!(
                "UPDATE accounts SET id = {other} + 1000 WHERE id = {id} AND NOT EXISTS (SELECT 1 FROM accounts WHERE id = {other} + 1000)"
            ),
            _ => format!("DELETE FROM accounts WHERE id IN ({id}, {other} + 1000)"),
        };
        // Conflicting writers may deadlock or collide: such a transaction just fails.
        if tx.batch_execute(&sql).await.is_err() {
            continue;
        }
        if save {
            let _ = tx.batch_execute(&format!(
                "SAVEPOINT s; UPDATE accounts SET owner = 'never' WHERE id = {other}; ROLLBACK TO s"
            )).await;
        }
        let _ = if roll {
            tx.rollback().await
        } else {
            tx.commit().await
        };
        done += 1;
    }
    done
}

async fn start_writers(
    s: &Setup,
    writers: i32,
) -> (Arc<AtomicBool>, Vec<tokio::task::JoinHandle<u64>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for w in 0..writers {
        let client = s.master().await;
        handles.push(tokio::spawn(write_randomly(client, w, stop.clone())));
    }
    (stop, handles)
}

async fn stop_writers(stop: Arc<AtomicBool>, handles: Vec<tokio::task::JoinHandle<u64>>) -> u64 {
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for h in handles {
        total += h.await.unwrap();
    }
    total
}

#[tokio::test(flavor = "multi_thread")]
async fn eight_concurrent_writers_for_twenty_seconds_end_byte_equal() {
    let s = Setup::new(1, ACCOUNTS).await;
    let _daemon = s.spawn();
    let (stop, handles) = start_writers(&s, 8).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let transactions = stop_writers(stop, handles).await;
    println!("{transactions} transactions written");
    assert!(
        transactions > 1000,
        "the writers did write ({transactions})"
    );
    s.wait_same(0, ALL, Duration::from_secs(120)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_the_daemon_at_random_points_loses_and_repeats_nothing() {
    let s = Setup::new(1, ACCOUNTS).await;
    let (stop, handles) = start_writers(&s, 4).await;
    for _ in 0..20 {
        let mut daemon = s.spawn();
        let wait = rand::thread_rng().gen_range(50..700);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        daemon.kill9();
    }
    stop_writers(stop, handles).await;
    let _daemon = s.spawn();
    s.wait_same(0, ALL, Duration::from_secs(120)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slave_and_master_restarts_and_killed_connections_are_survived() {
    let s = Setup::new(1, ACCOUNTS).await;
    let _daemon = s.spawn();
    let started = Instant::now();
    let (stop, handles) = start_writers(&s, 4).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.slaves[0].stop("immediate").unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.slaves[0].restart().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The daemon's own connections are cut on both sides.
    for client in [s.master().await, s.slave(0).await] {
        client
            .batch_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pgreplica' AND pid <> pg_backend_pid()")
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_writers(stop, handles).await;
    // The master crashes with the daemon mid-stream; writes resume after it.
    s.master.stop("immediate").unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.master.restart().unwrap();
    let (stop, handles) = start_writers(&s, 4).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_writers(stop, handles).await;
    s.wait_same(0, ALL, Duration::from_secs(120)).await;
    let log = s.daemon_log();
    assert!(
        log.contains("retrying in"),
        "the daemon reported the outages:\n{log}"
    );
    println!("survived in {:?}", started.elapsed());
}
