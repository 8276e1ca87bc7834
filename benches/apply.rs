//! Apply throughput against PostgreSQL's built-in logical replication, the cost
//! of a transform script, and the daemon's memory while draining a backlog. Prints medians of RUNS runs (default
//! 5) as ratios to the built-in replication measured in the same run.
//!
//!     cargo bench --bench apply                       # ROWS=1000000 RUNS=5 BACKLOGS=1000000,5000000 BIG_ROWS=150 WAL_ROWS=2000000
//!     ROWS=200000 RUNS=3 BACKLOGS=1000000 cargo bench --bench apply
//!
//! Each phase is timed from the master's first commit until a marker row,
//! committed right after the workload, has arrived on the slave (the time the
//! master spends inside the workload's statements, capture included, is the
//! capture benchmark's business).

use pgreplica::throwaway::Server;
use pgreplica::{Config, capture, db, wal};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

const SCHEMA: &str = "CREATE TABLE t (id int PRIMARY KEY, payload text, n int);
                      CREATE TABLE marker (id int PRIMARY KEY);";

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn fresh(pg: &Server, name: &str) -> Client {
    let admin = db::connect(&pg.dsn("postgres"), None).await.unwrap();
    for sql in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        admin.batch_execute(&sql).await.unwrap();
    }
    let client = db::connect(&pg.dsn(name), None).await.unwrap();
    client.batch_execute(SCHEMA).await.unwrap();
    client
}

/// Runs `work` on the master, one transaction per statement, commits a marker,
/// and waits for it on the slave. Returns the seconds since the first commit
/// until the slave has the marker, and until the master had committed it.
async fn phase(master: &Client, slave: &Client, marker: i32, work: &[String]) -> (f64, f64) {
    let mut start = None;
    for sql in work {
        master
            .batch_execute(&format!("BEGIN; {sql}"))
            .await
            .unwrap();
        start.get_or_insert_with(Instant::now);
        master.batch_execute("COMMIT").await.unwrap();
    }
    let start = start.unwrap_or_else(Instant::now);
    master
        .execute("INSERT INTO marker VALUES ($1)", &[&marker])
        .await
        .unwrap();
    let committed = start.elapsed().as_secs_f64();
    let query = "SELECT count(*) FROM marker WHERE id = $1";
    while slave
        .query_one(query, &[&marker])
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 0
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (start.elapsed().as_secs_f64(), committed)
}

fn workloads(rows: usize) -> Vec<(&'static str, Vec<String>)> {
    let batches = 1000.min(rows);
    let per = rows / batches;
    vec![
        (
            "insert, 1 transaction",
            vec![format!(
                "INSERT INTO t SELECT g, md5(g::text), 0 FROM generate_series(1, {rows}) g"
            )],
        ),
        (
            "update, 1 transaction",
            vec!["UPDATE t SET n = n + 1".into()],
        ),
        ("delete, 1 transaction", vec!["DELETE FROM t".into()]),
        (
            "insert, 1,000 transactions",
            (0..batches)
                .map(|b| {
                    format!(
                        "INSERT INTO t SELECT g, md5(g::text), 0 FROM generate_series({}, {}) g",
                        b * per + 1,
                        (b + 1) * per
                    )
                })
                .collect(),
        ),
    ]
}

fn daemon(conf: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_pgreplica"))
        .args(["run", conf.to_str().unwrap()])
        .env("RUST_LOG", "pgreplica=warn")
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn peak_rss_mb(child: &Child) -> f64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

/// A simple transform: one column changed on every row.
const SCRIPT: &str = "function transform(op, row)
  row.payload = string.upper(row.payload)
  return row
end";

/// The set's config file; with `transform`, table t's rows go through SCRIPT.
fn write_conf(master: &Server, slave: &Server, db: &str, transform: bool) -> std::path::PathBuf {
    let dir = std::env::temp_dir();
    let path = dir.join(format!("pgreplica-bench-{}.conf", std::process::id()));
    let mut text = format!(
        "[MAIN]\nNAME=bench\nDSN0={}\nDSN1={}\n",
        master.dsn(db),
        slave.dsn(db)
    );
    if transform {
        let script = dir.join(format!("pgreplica-bench-{}.lua", std::process::id()));
        std::fs::write(&script, SCRIPT).unwrap();
        text.push_str(&format!("[TABLE t]\nTRANSFORM={}\n", script.display()));
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let rows = env_number("ROWS", 1_000_000);
    let runs = env_number("RUNS", 5);
    let backlogs: Vec<usize> = std::env::var("BACKLOGS")
        .unwrap_or_else(|_| "1000000,5000000".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let master = Server::start_with("UTC", "wal_level = logical\nmax_wal_size = 4GB").unwrap();
    let slave = Server::start_with("UTC", "max_wal_size = 4GB").unwrap();
    let phases = workloads(rows);
    let mut builtin = vec![Vec::new(); phases.len()];
    let mut ours = vec![Vec::new(); phases.len()];
    let mut master_side = vec![Vec::new(); phases.len()];
    let mut transformed = vec![Vec::new(); phases.len()];
    for run in 0..runs {
        // Built-in logical replication.
        let m = fresh(&master, "bi").await;
        let s = fresh(&slave, "bi").await;
        m.batch_execute("CREATE PUBLICATION p FOR TABLE t, marker")
            .await
            .unwrap();
        s.batch_execute(&format!(
            "CREATE SUBSCRIPTION s CONNECTION '{}' PUBLICATION p WITH (copy_data = false)",
            master.dsn("bi")
        ))
        .await
        .unwrap();
        phase(&m, &s, -1, &[]).await;
        for (i, (_, work)) in phases.iter().enumerate() {
            builtin[i].push(phase(&m, &s, i as i32, work).await.0);
        }
        s.batch_execute("DROP SUBSCRIPTION s").await.unwrap();
        drop(m);

        // pgreplica, then pgreplica with a transform.
        for transform in [false, true] {
            let mut m = fresh(&master, "pr").await;
            let s = fresh(&slave, "pr").await;
            capture::install(&mut m, &[], None).await.unwrap();
            let conf = write_conf(&master, &slave, "pr", transform);
            let mut child = daemon(&conf);
            phase(&m, &s, -1, &[]).await;
            for (i, (_, work)) in phases.iter().enumerate() {
                let (total, committed) = phase(&m, &s, i as i32, work).await;
                if transform {
                    transformed[i].push(total);
                } else {
                    ours[i].push(total);
                    master_side[i].push(committed);
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        eprintln!("run {} of {runs} done", run + 1);
    }
    println!(
        "\nApply throughput, {rows} rows, medians of {runs} runs (from the first commit on the master until the slave has it all)\n"
    );
    println!(
        "{:<28} {:>14} {:>14} {:>16} {:>10} {:>18}",
        "workload",
        "built-in (s)",
        "pgreplica (s)",
        "pgreplica rows/s",
        "ratio",
        "master, capture (s)"
    );
    for (i, (name, _)) in phases.iter().enumerate() {
        let (b, o) = (median(builtin[i].clone()), median(ours[i].clone()));
        println!(
            "{name:<28} {b:>14.2} {o:>14.2} {:>16.0} {:>9.2}x {:>18.2}",
            rows as f64 / o,
            b / o,
            median(master_side[i].clone())
        );
    }
    println!(
        "(ratio: pgreplica's throughput over the built-in one; above 1 is faster.\n \
         master, capture: seconds from the first commit until the master, capturing,\n \
         had committed the whole workload; the slave cannot finish before that)\n"
    );

    println!(
        "A transform (one column changed on every row) against none, same runs\n\n{:<28} {:>14} {:>16} {:>14}",
        "workload", "pgreplica (s)", "+ transform (s)", "throughput"
    );
    for (i, (name, _)) in phases.iter().enumerate() {
        let (o, t) = (median(ours[i].clone()), median(transformed[i].clone()));
        println!("{name:<28} {o:>14.2} {t:>16.2} {:>13.0}%", o / t * 100.0);
    }
    println!("(throughput: with the transform, as a share of pgreplica's without)\n");

    for backlog in backlogs {
        let mut m = fresh(&master, "mem").await;
        let s = fresh(&slave, "mem").await;
        capture::install(&mut m, &[], None).await.unwrap();
        let conf = write_conf(&master, &slave, "mem", false);
        let mut chunk = 0;
        while chunk < backlog {
            let end = (chunk + 500_000).min(backlog);
            m.batch_execute(&format!(
                "INSERT INTO t SELECT g, md5(g::text), 0 FROM generate_series({}, {end}) g",
                chunk + 1
            ))
            .await
            .unwrap();
            chunk = end;
        }
        let mut child = daemon(&conf);
        let (took, _) = phase(&m, &s, 1, &[]).await;
        println!(
            "daemon peak RSS draining a backlog of {backlog} events: {:.1} MB ({took:.1} s)",
            peak_rss_mb(&child)
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    // Big rows: BIG_ROWS rows of 500 kB inserted, then all updated in one
    // transaction (old and new rows logged: about BIG_ROWS MB), then applied.
    let big = env_number("BIG_ROWS", 150);
    let mut m = fresh(&master, "big").await;
    let s = fresh(&slave, "big").await;
    capture::install(&mut m, &[], None).await.unwrap();
    let conf = write_conf(&master, &slave, "big", false);
    m.batch_execute(&format!(
        "INSERT INTO t SELECT g, repeat(md5(g::text), 16000), 0 FROM generate_series(1, {big}) g;
         UPDATE t SET payload = upper(payload), n = 1;"
    ))
    .await
    .unwrap();
    let logged: i64 = m
        .query_one(
            "SELECT sum(coalesce(length(ev_old), 0) + coalesce(length(ev_new), 0))::int8 FROM pgreplica.log",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mut child = daemon(&conf);
    let (took, _) = phase(&m, &s, 1, &[]).await;
    println!(
        "daemon peak RSS applying {big} rows of 500 kB inserted then updated ({:.0} MB of logged \
         row text): {:.1} MB ({took:.1} s)",
        logged as f64 / 1e6,
        peak_rss_mb(&child)
    );
    let _ = child.kill();
    let _ = child.wait();

    // Capture from the WAL: one master transaction of WAL_ROWS rows, streamed
    // from the slot and applied in steps of BATCH_EVENTS.
    let wal_rows = env_number("WAL_ROWS", 2_000_000);
    let mut m = fresh(&master, "wal").await;
    let s = fresh(&slave, "wal").await;
    let conf = write_conf(&master, &slave, "wal", false);
    let text = std::fs::read_to_string(&conf).unwrap() + "CAPTURE=wal\n";
    std::fs::write(&conf, text).unwrap();
    let set = Config::load(&conf).unwrap();
    capture::install(&mut m, &[], Some(&set)).await.unwrap();
    wal::make_slots(&m, &set).await.unwrap();
    m.batch_execute(&format!(
        "INSERT INTO t SELECT g, md5(g::text), 0 FROM generate_series(1, {wal_rows}) g"
    ))
    .await
    .unwrap();
    let mut child = daemon(&conf);
    let (took, _) = phase(&m, &s, 1, &[]).await;
    println!(
        "CAPTURE=wal: daemon peak RSS applying one transaction of {wal_rows} rows: {:.1} MB \
         ({took:.1} s)",
        peak_rss_mb(&child)
    );
    let _ = child.kill();
    let _ = child.wait();
}
