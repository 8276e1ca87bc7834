//! `check`: differences found and named, at one point of the log, in bounded memory.

mod support;

use std::process::{Command, Stdio};
use support::{Setup, pgreplica, text};

#[tokio::test(flavor = "multi_thread")]
async fn check_names_a_changed_a_missing_and_an_extra_row_of_a_million() {
    let s = Setup::new(1, "CREATE TABLE big (id int PRIMARY KEY, v text, n int)").await;
    s.master()
        .await
        .batch_execute(
            "INSERT INTO big SELECT g, md5(g::text), g % 1000 FROM generate_series(1, 1000000) g",
        )
        .await
        .unwrap();
    let conf = s.conf.to_str().unwrap().to_string();
    if support::wal_capture() {
        // The slot made at install holds the rows: replicated, not cloned.
        s.sync();
    } else {
        let out = pgreplica(&["clone", &conf]);
        assert!(out.status.success(), "clone failed:\n{}", text(&out));
    }

    let out = pgreplica(&["check", &conf]);
    assert!(
        out.status.success(),
        "equal after the clone:\n{}",
        text(&out)
    );
    assert!(
        text(&out).contains("\"public\".\"big\": 1000000 rows, equal"),
        "{}",
        text(&out)
    );

    s.slave(0)
        .await
        .batch_execute(
            "UPDATE big SET v = 'changed' WHERE id = 123456;
             DELETE FROM big WHERE id = 500000;
             INSERT INTO big VALUES (2000000, 'extra', 0)",
        )
        .await
        .unwrap();
    let (code, report, rss) = check_measured(&conf);
    assert_eq!(code, 1, "{report}");
    for line in [
        "different: (id)=(123456): v: master e10adc3949ba59abbe56e057f20f883e, slave changed",
        "missing on the slave: (id)=(500000)",
        "extra on the slave: (id)=(2000000)",
        "3 difference(s)",
    ] {
        assert!(report.contains(line), "check reports {line}:\n{report}");
    }
    println!("peak RSS of pgreplica check over 1,000,000 rows: {rss:.1} MB");
    // A table missing on the slave is a difference too, not a failure to check.
    s.slave(0)
        .await
        .batch_execute("DROP TABLE big")
        .await
        .unwrap();
    let (code, report, _) = check_measured(&conf);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains("\"public\".\"big\": the table is missing on the slave"),
        "{report}"
    );
    assert!(rss < 64.0, "check's memory stays bounded ({rss:.1} MB)");
}

/// Runs `pgreplica check` and returns its exit code, output and peak RSS in MB.
#[expect(
    clippy::zombie_processes,
    reason = "the child is reaped by wait4, which also gives its peak RSS"
)]
fn check_measured(conf: &str) -> (i32, String, f64) {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgreplica"))
        .args(["check", conf])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut report = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut report)
        .unwrap();
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    // SAFETY: wait4 reaps our own child and writes into the two locals.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    (code, report, usage.ru_maxrss as f64 / 1024.0)
}

const ITEMS: &str =
    "CREATE TABLE items (id int PRIMARY KEY, v text, n numeric(10, 2), at timestamptz)";

/// Items 1..=rows replicated, the daemon running, and a writer changing
/// items 5001..=6000 on the master until it is told to stop.
async fn items_under_writes(
    rows: i32,
) -> (
    Setup,
    support::Daemon,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<()>,
) {
    let s = Setup::new(1, ITEMS).await;
    s.master()
        .await
        .batch_execute(&format!(
            "INSERT INTO items SELECT g, 'v' || g, g / 100.0, now() FROM generate_series(1, {rows}) g"
        ))
        .await
        .unwrap();
    s.sync();
    let daemon = s.spawn();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (master, stop) = (s.master().await, stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let sql = format!(
                    "UPDATE items SET v = 'w{i}', at = now() WHERE id = {}",
                    5001 + i % 1000
                );
                master.batch_execute(&sql).await.unwrap();
            }
        })
    };
    (s, daemon, stop, writer)
}

/// Stops the writer and waits until the slave has caught up with it.
async fn writes_end(
    s: &Setup,
    stop: &std::sync::atomic::AtomicBool,
    writer: tokio::task::JoinHandle<()>,
) {
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    s.wait_same(
        0,
        "SELECT * FROM items ORDER BY id",
        std::time::Duration::from_secs(60),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn repair_makes_the_slave_equal_while_the_master_takes_writes() {
    let (s, mut daemon, stop, writer) = items_under_writes(10_000).await;
    s.slave(0)
        .await
        .batch_execute(
            "UPDATE items SET v = 'changed', n = 0 WHERE id IN (1, 2, 3);
             DELETE FROM items WHERE id IN (10, 11);
             INSERT INTO items VALUES (20001, 'extra', 1, now()), (20002, 'extra', 2, NULL)",
        )
        .await
        .unwrap();
    let conf = s.conf.to_str().unwrap().to_string();
    // A dry run says what it would do and does nothing.
    let out = pgreplica(&["check", &conf, "--repair", "--dry-run"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    for part in [
        "would run: UPDATE",
        "would run: INSERT",
        "would run: DELETE",
        "would repair 7 row(s)",
    ] {
        assert!(said.contains(part), "{part}:\n{said}");
    }
    let out = pgreplica(&["check", &conf, "--repair"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    for part in [
        "(id)=(1): updated on the slave",
        "(id)=(10): inserted on the slave",
        "(id)=(20002): deleted on the slave",
        "repaired 7 row(s)",
    ] {
        assert!(said.contains(part), "{part}:\n{said}");
    }
    writes_end(&s, &stop, writer).await;
    let out = pgreplica(&["check", &conf]);
    assert!(text(&out).contains("0 difference(s)"), "{}", text(&out));
    daemon.terminate();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repair_killed_halfway_leaves_the_slave_consistent_and_runs_again() {
    let (s, mut daemon, stop, writer) = items_under_writes(20_000).await;
    s.slave(0)
        .await
        .batch_execute("DELETE FROM items WHERE id % 2 = 0 AND id NOT BETWEEN 5001 AND 6000")
        .await
        .unwrap();
    let conf = s.conf.to_str().unwrap().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgreplica"))
        .args(["check", &conf, "--repair"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed once it has repaired a part: 10,500 rows are left, 9,500 come
    // back 500 at a time.
    let slave = s.slave(0).await;
    let start = std::time::Instant::now();
    while support::count(&slave, "items").await < 11_500 {
        assert!(
            start.elapsed().as_secs() < 120,
            "the repair never got going"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let at_kill = support::count(&slave, "items").await;
    assert!(
        at_kill < 20_000,
        "killed halfway, not after the end ({at_kill} rows)"
    );
    let out = pgreplica(&["check", &conf, "--repair"]);
    assert!(out.status.success(), "{}", text(&out));
    writes_end(&s, &stop, writer).await;
    daemon.terminate();
}
