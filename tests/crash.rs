//! Concurrency and crashes: writers, kill -9 of the daemon, server restarts.

mod support;

use rand::Rng;
use std::time::{Duration, Instant};
use support::Setup;
use support::writers::{ACCOUNTS, ALL, start_writers, stop_writers};

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
    // The log is kept, to count what was logged against what was applied.
    s.configure("LOG_KEEP=86400\n");
    let (stop, handles) = start_writers(&s, 4).await;
    for _ in 0..20 {
        let mut daemon = s.spawn();
        let wait = rand::thread_rng().gen_range(50..700);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        daemon.kill9();
    }
    stop_writers(stop, handles).await;
    let mut daemon = s.spawn();
    s.wait_same(0, ALL, Duration::from_secs(120)).await;
    daemon.terminate();
    s.sync();
    s.assert_applied_once(0).await;
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
