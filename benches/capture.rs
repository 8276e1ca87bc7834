//! Capture overhead: PyReplica's own benchmark and a bulk variant, with pgreplica's
//! capture against no trigger, on one throwaway server. Prints medians of RUNS runs
//! (default 5) as ratios to the no-trigger baseline measured in the same run.
//!
//!     cargo bench --bench capture

use pgreplica::cluster::Cluster;
use pgreplica::{capture, db};
use std::time::Instant;
use tokio_postgres::Client;

const SETUP: &str = "
DROP TABLE IF EXISTS test;
CREATE TABLE test (id serial PRIMARY KEY, t text, n float8, f timestamp, b bool);
CREATE OR REPLACE FUNCTION bench(n int) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..n LOOP
        INSERT INTO test (t, n, f, b) VALUES (random()::text, random(), now(), True);
    END LOOP;
END $$;";

/// Seconds taken by `work` on a fresh `test` table, with or without capture.
async fn timed(client: &mut Client, with_capture: bool, work: &[&str]) -> f64 {
    client.batch_execute(SETUP).await.unwrap();
    if with_capture {
        capture::install(client, &["test".to_string()], None)
            .await
            .unwrap();
        client
            .batch_execute("TRUNCATE pgreplica.log")
            .await
            .unwrap();
    }
    client.batch_execute("CHECKPOINT").await.unwrap();
    let start = Instant::now();
    for sql in work {
        client.batch_execute(sql).await.unwrap();
    }
    let took = start.elapsed().as_secs_f64();
    if with_capture {
        capture::uninstall(client).await.unwrap();
    }
    took
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let pg = Cluster::start("UTC").expect("a throwaway PostgreSQL server");
    let mut client = db::connect(&pg.dsn("postgres"), None).await.unwrap();
    let version: String = client
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);
    let cases: [(&str, &[&str]); 2] = [
        (
            "PyReplica: 100,000 single-row INSERTs in one function",
            &["SELECT bench(100000)"],
        ),
        (
            "bulk: INSERT ... SELECT 100,000 rows, then UPDATE all",
            &[
                "INSERT INTO test (t, n, f, b) SELECT random()::text, random(), now(), true FROM generate_series(1, 100000)",
                "UPDATE test SET n = n + 1",
            ],
        ),
    ];
    println!("PostgreSQL {version}, medians of {runs} runs, alternating baseline and capture\n");
    println!(
        "{:<58} {:>10} {:>10} {:>8}",
        "workload", "none (s)", "capture", "ratio"
    );
    for (name, work) in cases {
        let (mut base, mut with) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            base.push(timed(&mut client, false, work).await);
            with.push(timed(&mut client, true, work).await);
        }
        let (b, w) = (median(base), median(with));
        println!("{name:<58} {b:>10.3} {w:>10.3} {:>7.2}x", w / b);
    }
}
