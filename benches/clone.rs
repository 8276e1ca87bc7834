//! Initial copy of a `pgbench -i -s SCALE` database (default 50) onto an empty
//! slave: `pgreplica clone --jobs 2` against `pg_dump | psql` and against
//! `pg_dump -Fd -j 2` + `pg_restore -j 2`, in the same run on the same two
//! servers. Prints medians of RUNS runs (default 5) and the ratios.
//!
//!     cargo bench --bench clone
//!     SCALE=10 RUNS=3 cargo bench --bench clone

use pgreplica::programs::bin_dir;
use pgreplica::throwaway::Server;
use pgreplica::{capture, db};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs a shell command line; panics with its output when it fails.
fn shell(line: &str) {
    let out = Command::new("sh").args(["-c", line]).output().unwrap();
    assert!(
        out.status.success(),
        "{line} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Drops and creates database `name`.
async fn fresh(pg: &Server, name: &str) {
    let admin = db::connect(&pg.dsn("postgres"), None).await.unwrap();
    for sql in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        admin.batch_execute(&sql).await.unwrap();
    }
}

fn timed(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let scale = env_number("SCALE", 50);
    let runs = env_number("RUNS", 5);
    let bin = bin_dir().unwrap();
    let tool = |name: &str| bin.join(name).display().to_string();
    let master = Server::start_with("UTC", "max_wal_size = 4GB").unwrap();
    let slave = Server::start_with("UTC", "max_wal_size = 4GB").unwrap();
    fresh(&master, "bench").await;
    let source = master.dsn("bench");
    eprintln!("pgbench -i -s {scale} ...");
    shell(&format!("{} -i -q -s {scale} '{source}'", tool("pgbench")));
    let mut client = db::connect(&source, None).await.unwrap();
    capture::install(&mut client, &[], None).await.unwrap();
    client.batch_execute("VACUUM ANALYZE").await.unwrap();
    let dir = std::env::temp_dir().join(format!("pgreplica-bench-clone-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("bench.conf");
    std::fs::write(
        &conf,
        format!(
            "[MAIN]\nNAME=bench\nDSN0={source}\nDSN1={}\nDEBUG_LEVEL=0\n",
            slave.dsn("copy")
        ),
    )
    .unwrap();
    let dump_dir = dir.join("dump");
    let target = slave.dsn("copy");
    let (mut plain, mut parallel, mut ours) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        fresh(&slave, "copy").await;
        plain.push(timed(|| {
            shell(&format!(
                "{} -N pgreplica '{source}' | {} -q -o /dev/null '{target}' 2>/dev/null",
                tool("pg_dump"),
                tool("psql")
            ))
        }));
        check_copied(&slave).await;
        fresh(&slave, "copy").await;
        let _ = std::fs::remove_dir_all(&dump_dir);
        parallel.push(timed(|| {
            shell(&format!(
                "{} -N pgreplica -Fd -j 2 -f '{}' '{source}' && {} -j 2 -d '{target}' '{}' 2>/dev/null || true",
                tool("pg_dump"),
                dump_dir.display(),
                tool("pg_restore"),
                dump_dir.display()
            ))
        }));
        check_copied(&slave).await;
        fresh(&slave, "copy").await;
        ours.push(timed(|| clone(&conf)));
        check_copied(&slave).await;
        eprintln!("run {} of {runs} done", run + 1);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (plain, parallel, ours) = (median(plain), median(parallel), median(ours));
    println!("\nInitial copy of pgbench -i -s {scale}, medians of {runs} runs\n");
    println!(
        "{:<44} {:>10} {:>22}",
        "method", "seconds", "pgreplica clone is"
    );
    println!(
        "{:<44} {plain:>10.2} {:>21.2}x faster",
        "pg_dump | psql",
        plain / ours
    );
    println!(
        "{:<44} {parallel:>10.2} {:>21.2}x faster",
        "pg_dump -Fd -j 2 + pg_restore -j 2",
        parallel / ours
    );
    println!("{:<44} {ours:>10.2}", "pgreplica clone --jobs 2");
}

fn clone(conf: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgreplica"))
        .args(["clone", conf.to_str().unwrap(), "--jobs", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "clone failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The copy holds the accounts, with their primary key (restoring pgreplica's
/// capture triggers fails on a slave without pgreplica, which is expected).
async fn check_copied(slave: &Server) {
    let client = db::connect(&slave.dsn("copy"), None).await.unwrap();
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pgbench_accounts),
                    (SELECT count(*) FROM pg_index WHERE indrelid = 'pgbench_accounts'::regclass AND indisprimary)",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, i64>(0) > 0 && row.get::<_, i64>(1) == 1);
}
