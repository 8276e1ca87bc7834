//! Lag: a probe changes one row on the master every 50 ms (`EVERY`) and times until the
//! slave shows it (a trigger on the slave announces each change with a NOTIFY
//! at its commit), for pgreplica and, on the same servers and in the same run,
//! for PostgreSQL's built-in logical replication; then how long
//! `pgreplica.wait()` takes. Prints p50, p90, p99 and max of each, and
//! pgreplica's p50 and p99 as ratios to the built-in's.
//!
//!     cargo bench --bench lag                 # SAMPLES=200, an idle master
//!     CAPTURE=wal cargo bench --bench lag     # pgreplica capturing from the WAL
//!     LOAD=pgbench cargo bench --bench lag    # under pgbench's TPC-B, 4 clients at
//!                                             # 300 transactions/s, which both
//!                                             # pgreplica and the built-in replicate
//!     SYNC=1 cargo bench --bench lag          # the set with SYNC = 1
//!     EVERY=500 cargo bench --bench lag       # changes 500 ms apart: the daemon's
//!                                             # read on the master has ended between

use pgreplica::throwaway::Server;
use pgreplica::{Config, capture, db, wal};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_postgres::Client;

const SCHEMA: &str = "CREATE TABLE ours (id int PRIMARY KEY, v int);
                      CREATE TABLE builtin (id int PRIMARY KEY, v int);
                      INSERT INTO ours VALUES (1, 0); INSERT INTO builtin VALUES (1, 0);";

/// On the slave, each change that reaches a probed table is announced by a
/// NOTIFY at its commit: a trigger that fires whoever writes (`ENABLE
/// ALWAYS`, as appliers run as replicas). The probe waits for it instead of
/// polling, which would keep one of the machine's cores busy.
const ANNOUNCE: &str = "
CREATE FUNCTION announce() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify(TG_TABLE_NAME, ''); RETURN NULL; END $$;
CREATE TRIGGER announce AFTER UPDATE ON ours FOR EACH ROW EXECUTE FUNCTION announce();
CREATE TRIGGER announce AFTER UPDATE ON builtin FOR EACH ROW EXECUTE FUNCTION announce();
ALTER TABLE ours ENABLE ALWAYS TRIGGER announce;
ALTER TABLE builtin ENABLE ALWAYS TRIGGER announce;
LISTEN ours; LISTEN builtin;";

/// Waits for the slave's announcement that `table` changed: the change made
/// last, as the probe waits for each before it makes the next.
async fn shown(announced: &mut UnboundedReceiver<String>, table: &str) {
    let wait = async {
        while let Some(note) = announced.recv().await {
            if note == table {
                return;
            }
        }
        panic!("the slave's session was lost");
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .unwrap_or_else(|_| panic!("{table} stalled"));
}

/// Milliseconds from the master's commit until the slave shows each change.
async fn probe(
    (master, slave): (&Client, &Client),
    announced: &mut UnboundedReceiver<String>,
    table: &str,
    samples: i32,
) -> Vec<f64> {
    let mut times = Vec::new();
    for i in 1..=samples {
        while announced.try_recv().is_ok() {}
        master
            .execute(&format!("UPDATE {table} SET v = $1 WHERE id = 1"), &[&i])
            .await
            .unwrap();
        let committed = Instant::now();
        shown(announced, table).await;
        times.push(committed.elapsed().as_secs_f64() * 1000.0);
        let read = format!("SELECT v FROM {table} WHERE id = 1");
        let v: i32 = slave.query_one(&read, &[]).await.unwrap().get(0);
        assert_eq!(v, i, "{table} announced a change the slave does not show");
        tokio::time::sleep(every()).await;
    }
    times.sort_by(f64::total_cmp);
    times
}

/// Milliseconds from the master's commit until `pgreplica.wait()` returns, in
/// the writing session; the slave must show the change by then.
async fn probe_wait(master: &Client, slave: &Client, samples: i32) -> Vec<f64> {
    let mut times = Vec::new();
    for i in 1..=samples {
        master
            .execute("UPDATE ours SET v = $1 WHERE id = 1", &[&-i])
            .await
            .unwrap();
        let committed = Instant::now();
        let applied: bool = master
            .query_one("SELECT pgreplica.wait('30 seconds')", &[])
            .await
            .unwrap()
            .get(0);
        times.push(committed.elapsed().as_secs_f64() * 1000.0);
        let v: i32 = slave
            .query_one("SELECT v FROM ours WHERE id = 1", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            applied && v == -i,
            "wait returned {applied} before the slave had it: {v} for {}",
            -i
        );
        tokio::time::sleep(every()).await;
    }
    times.sort_by(f64::total_cmp);
    times
}

/// The time between two changes of the probe: `EVERY` milliseconds, 50 unless set.
fn every() -> Duration {
    let ms = std::env::var("EVERY").ok().and_then(|v| v.parse().ok());
    Duration::from_millis(ms.unwrap_or(50))
}

/// A process stopped when dropped, also when a measurement panics.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn at(sorted: &[f64], share: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * share).round() as usize]
}

#[tokio::main]
async fn main() {
    let samples: i32 = std::env::var("SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let master = Server::start_with("UTC", "wal_level = logical").unwrap();
    let slave = Server::start("UTC").unwrap();
    // The built-in replication applies to a database of its own on the
    // slave, `mirror`, and under load it replicates pgbench's tables too.
    let databases = [(&master, "app"), (&slave, "app"), (&slave, "mirror")];
    for (pg, name) in databases {
        let admin = db::connect(&pg.dsn("postgres"), None).await.unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let c = db::connect(&pg.dsn(name), None).await.unwrap();
        c.batch_execute(SCHEMA).await.unwrap();
    }
    let mut m = db::connect(&master.dsn("app"), None).await.unwrap();
    let conf =
        std::env::temp_dir().join(format!("pgreplica-bench-lag-{}.conf", std::process::id()));
    let capture = std::env::var("CAPTURE").unwrap_or_else(|_| "trigger".into());
    let sync = std::env::var("SYNC").unwrap_or_else(|_| "0".into());
    std::fs::write(
        &conf,
        format!(
            "[MAIN]\nNAME=lag\nDSN0={}\nDSN1={}\nDEBUG_LEVEL=0\nCAPTURE={capture}\nSYNC={sync}\n",
            master.dsn("app"),
            slave.dsn("app")
        ),
    )
    .unwrap();
    let set = Config::load(&conf).unwrap();
    // Under load pgbench's tables are replicated too, by both: the daemon and the
    // built-in's apply worker are busy.
    let load = std::env::var("LOAD").is_ok_and(|l| l == "pgbench");
    let pgbench = pgreplica::programs::client("pgbench");
    let mut tables = vec!["public.ours".to_string()];
    if load {
        for (pg, name) in databases {
            let out = Command::new(&pgbench)
                .args(["-i", "-q", "-s", "1", &pg.dsn(name)])
                .output()
                .unwrap();
            assert!(out.status.success(), "pgbench -i failed");
            let c = db::connect(&pg.dsn(name), None).await.unwrap();
            c.batch_execute("ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY")
                .await
                .unwrap();
        }
        for t in ["accounts", "branches", "tellers", "history"] {
            tables.push(format!("public.pgbench_{t}"));
        }
    }
    capture::install(&mut m, &tables, Some(&set)).await.unwrap();
    if capture == "wal" {
        wal::make_slots(&m, &set).await.unwrap();
    }
    let published = tables[1..]
        .iter()
        .fold("builtin".to_string(), |l, t| l + ", " + t);
    m.batch_execute(&format!("CREATE PUBLICATION p FOR TABLE {published}"))
        .await
        .unwrap();
    let s = db::connect(&slave.dsn("app"), None).await.unwrap();
    let mirror = db::connect(&slave.dsn("mirror"), None).await.unwrap();
    mirror
        .batch_execute(&format!(
            "CREATE SUBSCRIPTION sub CONNECTION '{}' PUBLICATION p WITH (copy_data = false)",
            master.dsn("app")
        ))
        .await
        .unwrap();
    let _daemon = Stopped(
        Command::new(env!("CARGO_BIN_EXE_pgreplica"))
            .args(["run", conf.to_str().unwrap()])
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut bench = load.then(|| {
        Command::new(&pgbench)
            .args(["-n", "-c", "4", "-j", "2", "-R", "300", "-T", "3600"])
            .arg(master.dsn("app"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    });
    let (listener, mut announced) = db::connect_listening(&slave.dsn("app"), None)
        .await
        .unwrap();
    listener.batch_execute(ANNOUNCE).await.unwrap();
    let (mirror_listener, mut mirrored) = db::connect_listening(&slave.dsn("mirror"), None)
        .await
        .unwrap();
    mirror_listener.batch_execute(ANNOUNCE).await.unwrap();
    // Both paths warmed up (and the load running) before measuring.
    probe((&m, &s), &mut announced, "ours", 5).await;
    probe((&m, &mirror), &mut mirrored, "builtin", 5).await;
    let ours = probe((&m, &s), &mut announced, "ours", samples).await;
    let builtin = probe((&m, &mirror), &mut mirrored, "builtin", samples).await;
    let waited = probe_wait(&m, &s, samples).await;
    if let Some(bench) = bench.as_mut() {
        let _ = bench.kill();
        let _ = bench.wait();
    }
    let under = match load {
        true => "under pgbench TPC-B at 300 transactions/s from 4 clients, replicated by both",
        false => "idle",
    };
    println!(
        "lag {under}, {samples} changes {} ms apart (ms), pgreplica with CAPTURE={capture} SYNC={sync}\n",
        every().as_millis()
    );
    println!(
        "{:<28} {:>8} {:>8} {:>8} {:>8}",
        "", "p50", "p90", "p99", "max"
    );
    for (name, t) in [
        ("pgreplica", &ours),
        ("built-in logical", &builtin),
        ("pgreplica.wait() returns", &waited),
    ] {
        println!(
            "{name:<28} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            at(t, 0.5),
            at(t, 0.9),
            at(t, 0.99),
            at(t, 1.0)
        );
    }
    println!(
        "pgreplica / built-in: p50 {:.1}x, p99 {:.1}x",
        at(&ours, 0.5) / at(&builtin, 0.5),
        at(&ours, 0.99) / at(&builtin, 0.99)
    );
    println!(
        "pgreplica.wait() returns {:.1} ms (p50) after pgreplica's slave shows the change",
        at(&waited, 0.5) - at(&ours, 0.5)
    );
    let _ = std::fs::remove_file(conf);
}
