//! Concurrent writers on the master's `accounts` table, for tests under load.

use super::Setup;
use rand::Rng;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio_postgres::Client;

pub const ACCOUNTS: &str =
    "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance numeric, note text)";
pub const ALL: &str = "SELECT * FROM accounts ORDER BY id";

/// One writer's random mix: inserts, updates (of the key too), deletes,
/// rolled-back transactions and rolled-back savepoints.
pub async fn write_randomly(mut client: Client, writer: i32, stop: Arc<AtomicBool>) -> u64 {
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

pub async fn start_writers(
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

pub async fn stop_writers(
    stop: Arc<AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<u64>>,
) -> u64 {
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for h in handles {
        total += h.await.unwrap();
    }
    total
}
