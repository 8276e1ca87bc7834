//! Capture overhead: PyReplica's own benchmark, a bulk variant and single-row
//! updates in a session that made a bulk one, with pgreplica's
//! capture against no trigger, on one throwaway server. Prints medians of RUNS runs
//! (default 5) as ratios to the no-trigger baseline measured in the same run, and
//! the added cost of a row filter. WAL capture (`CAPTURE = wal`: a publication,
//! a slot, the tables' whole old rows in the WAL) is measured on a second server
//! with `wal_level = logical`, against that server without them: the master's
//! writes alone, the slot read by no one meanwhile.
//!
//!     cargo bench --bench capture
//!
//! `COUNT=instructions` counts the instructions of PostgreSQL's backend
//! instead (valgrind, the workloads at a tenth of their rows): the same
//! figure on every run, where times swing with the machine's other work.

use pgreplica::throwaway::Server;
use pgreplica::{Config, capture, db, wal};
use std::path::Path;
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
END $$;
CREATE OR REPLACE FUNCTION bench_update(rows int) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..rows LOOP
        UPDATE test SET n = n + 1 WHERE id = i;
    END LOOP;
END $$;";

/// 100,000 rows, and one statement that updates them all.
const BULK: [&str; 2] = [
    "INSERT INTO test (t, n, f, b) SELECT random()::text, random(), now(), true FROM generate_series(1, 100000)",
    "UPDATE test SET n = n + 1",
];

/// What the master does on writes to `test`.
#[derive(Clone, Copy, PartialEq)]
enum Capture {
    None,
    All,
    /// With a row filter that every row passes: its cost alone.
    Filtered(&'static str),
    /// From the WAL, for the set of this config file.
    Wal(&'static str),
}

/// Makes a fresh `test` table with `capture`, and runs `before` on it.
async fn prepare(client: &mut Client, capture: Capture, before: &[&str]) {
    client.batch_execute(SETUP).await.unwrap();
    if let Capture::Wal(conf) = capture {
        let set = Config::parse(Path::new("bench.conf"), conf).unwrap();
        capture::install(client, &["test".to_string()], Some(&set))
            .await
            .unwrap();
        wal::make_slots(client, &set).await.unwrap();
    } else if capture != Capture::None {
        capture::install(client, &["test".to_string()], None)
            .await
            .unwrap();
        if let Capture::Filtered(filter) = capture {
            client
                .execute(
                    "SELECT pgreplica.set_options('test', 'IUDT', $1, NULL, NULL)",
                    &[&filter],
                )
                .await
                .unwrap();
        }
        client
            .batch_execute("TRUNCATE pgreplica.log")
            .await
            .unwrap();
    }
    for sql in before {
        client.batch_execute(sql).await.unwrap();
    }
    client.batch_execute("CHECKPOINT").await.unwrap();
}

/// Seconds taken by `work` on a fresh `test` table, after `before` (not timed,
/// in the same session).
async fn timed(client: &mut Client, capture: Capture, (before, work): Case) -> f64 {
    prepare(client, capture, before).await;
    let start = Instant::now();
    for sql in work {
        client.batch_execute(sql).await.unwrap();
    }
    let took = start.elapsed().as_secs_f64();
    if capture != Capture::None {
        capture::uninstall(client).await.unwrap();
    }
    took
}

/// Instructions (valgrind's count) that `work` takes in a single-user backend
/// of the stopped server, after `before`, less those of a backend that runs
/// nothing: the same on every run, however busy the machine.
async fn counted(pg: &Server, capture: Capture, (before, work): Case) -> f64 {
    let mut client = db::connect(&pg.dsn("postgres"), None).await.unwrap();
    prepare(&mut client, capture, before).await;
    drop(client);
    pg.stop("fast").unwrap();
    let count = |sql: &str| {
        let wrapper = [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
        ];
        let said = pg.single_user(&wrapper, "postgres", sql).unwrap();
        let Some((_, tail)) = said.split_once("Collected : ") else {
            panic!("no count from valgrind (apt-get install valgrind): {said}");
        };
        let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<f64>().unwrap()
    };
    let took = count(&work.join("\n")) - count("SELECT 1");
    pg.restart().unwrap();
    if capture != Capture::None {
        let client = db::connect(&pg.dsn("postgres"), None).await.unwrap();
        capture::uninstall(&client).await.unwrap();
    }
    took
}

/// `COUNT=instructions`: the workloads at a tenth of their rows, counted;
/// WAL capture on `logical` (with the set of `conf`) against none there.
async fn count_instructions(
    pg: &Server,
    (logical, conf): (&Server, &'static str),
    cases: &[(&str, Case)],
) {
    println!("instructions of each workload at a tenth of its rows, single-user backend\n");
    println!(
        "{:<58} {:>14} {:>14} {:>7} {:>9}",
        "workload", "none", "capture", "ratio", "wal ratio"
    );
    for (name, (before, work)) in cases {
        let tenth = |sql: &&str| -> &'static str {
            let sql = sql.replace("100000", "10000").replace("5000)", "500)");
            Box::leak(sql.into_boxed_str())
        };
        let before: Vec<&'static str> = before.iter().map(tenth).collect();
        let work: Vec<&'static str> = work.iter().map(tenth).collect();
        let case: Case = (before.leak(), work.leak());
        let none = counted(pg, Capture::None, case).await;
        let all = counted(pg, Capture::All, case).await;
        let unlogged = counted(logical, Capture::None, case).await;
        let wal = counted(logical, Capture::Wal(conf), case).await;
        println!(
            "{name:<58} {none:>14.0} {all:>14.0} {:>6.2}x {:>8.2}x",
            all / none,
            wal / unlogged
        );
    }
}

/// A workload: statements run first, untimed, and the timed ones.
type Case = (&'static [&'static str], &'static [&'static str]);

/// Row filters measured: over the new row only, and over both rows.
const FILTERS: [&str; 2] = ["new.b", "new.b OR old.b"];

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
    let pg = Server::start("UTC").expect("a throwaway PostgreSQL server");
    let mut client = db::connect(&pg.dsn("postgres"), None).await.unwrap();
    let logical = Server::start_with("UTC", "wal_level = logical\nmax_replication_slots = 4")
        .expect("a throwaway PostgreSQL server");
    let mut wal_client = db::connect(&logical.dsn("postgres"), None).await.unwrap();
    let conf = format!(
        "[MAIN]\nNAME=bench\nDSN0={0}\nDSN1={0}\nCAPTURE=wal\n",
        logical.dsn("postgres")
    );
    let conf: &'static str = Box::leak(conf.into_boxed_str());
    let version: String = client
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);
    let cases: [(&str, Case); 3] = [
        (
            "PyReplica: 100,000 single-row INSERTs in one function",
            (&[], &["SELECT bench(100000)"]),
        ),
        (
            "bulk: INSERT ... SELECT 100,000 rows, then UPDATE all",
            (&[], &BULK),
        ),
        (
            "5,000 single-row UPDATEs after the bulk ones, one session",
            (&BULK, &["SELECT bench_update(5000)"]),
        ),
    ];
    if std::env::var("COUNT").as_deref() == Ok("instructions") {
        print!("PostgreSQL {version}, ");
        return count_instructions(&pg, (&logical, conf), &cases).await;
    }
    println!("PostgreSQL {version}, medians of {runs} runs, alternating baseline and capture\n");
    println!(
        "{:<58} {:>9} {:>8} {:>7} {:>13} {:>18} {:>13} {:>9}",
        "workload",
        "none (s)",
        "capture",
        "ratio",
        FILTERS[0],
        FILTERS[1],
        "logical (s)",
        "wal ratio"
    );
    for (name, work) in cases {
        let mut times = vec![Vec::new(); 6];
        for _ in 0..runs {
            times[0].push(timed(&mut client, Capture::None, work).await);
            times[1].push(timed(&mut client, Capture::All, work).await);
            for (i, filter) in FILTERS.iter().enumerate() {
                times[2 + i].push(timed(&mut client, Capture::Filtered(filter), work).await);
            }
            times[4].push(timed(&mut wal_client, Capture::None, work).await);
            times[5].push(timed(&mut wal_client, Capture::Wal(conf), work).await);
        }
        let t: Vec<f64> = times.into_iter().map(median).collect();
        println!(
            "{name:<58} {:>9.3} {:>8.3} {:>6.2}x {:>12.1}% {:>17.1}% {:>13.3} {:>8.2}x",
            t[0],
            t[1],
            t[1] / t[0],
            (t[2] / t[1] - 1.0) * 100.0,
            (t[3] / t[1] - 1.0) * 100.0,
            t[4],
            t[5] / t[4]
        );
    }
    println!(
        "\n(the filter columns: what a row filter that every row passes adds to capture;\n \
         one that names old.* also joins an all-NULL old row on inserts; logical: no\n \
         capture on the server with wal_level = logical; wal ratio: WAL capture against it)"
    );
}
