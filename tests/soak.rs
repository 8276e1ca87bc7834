//! The soak: workloads nobody here wrote (pgbench's TPC-B, sysbench's
//! oltp_read_write) and one of ours (a partitioned table written through the
//! parent and its partitions, foreign keys with cascades, an audit trigger on
//! both sides, PostGIS geometries) run on the master while the daemon is killed
//! with -9 at random points, the slave and the master restart, the network to
//! the slave is cut, and a schema change goes through `execute`. At the end
//! `check` finds nothing, no conflict was reported, and the slave applied every
//! logged event exactly once.
//!
//! Short in `cargo test`; `SOAK_KILLS=500 cargo test --test soak -- --nocapture`
//! is the long run (and `SOAK_KILLS` any other count).

mod support;

use rand::Rng;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::{Setup, text};
use tokio_postgres::Client;

/// Our own part of the schema, on both sides: what real shops have.
const SHOP: &str = "
CREATE TABLE audit (id bigserial PRIMARY KEY, tbl text, op text, at timestamptz DEFAULT now());
CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO audit (tbl, op) VALUES (TG_TABLE_NAME, TG_OP); RETURN NULL; END $$;
CREATE TABLE parent (id int PRIMARY KEY, name text);
CREATE TABLE child (id int PRIMARY KEY,
                    parent int REFERENCES parent ON UPDATE CASCADE ON DELETE CASCADE,
                    note text);
CREATE TRIGGER child_audit AFTER INSERT OR UPDATE OR DELETE ON child
    FOR EACH ROW EXECUTE FUNCTION audit();
CREATE TABLE readings (id int, at date, v text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE readings_a PARTITION OF readings FOR VALUES FROM ('2026-01-01') TO ('2026-07-01');
CREATE TABLE readings_b PARTITION OF readings DEFAULT;
CREATE EXTENSION postgis;
CREATE TABLE sites (id int PRIMARY KEY, pos geometry(Point, 4326), zone geometry);";

/// The tables compared byte for byte at the end.
const TABLES: [&str; 9] = [
    "SELECT * FROM pgbench_accounts ORDER BY aid",
    "SELECT * FROM pgbench_tellers ORDER BY tid",
    "SELECT * FROM pgbench_branches ORDER BY bid",
    "SELECT * FROM sbtest1 ORDER BY id",
    "SELECT * FROM audit ORDER BY id",
    "SELECT * FROM parent ORDER BY id",
    "SELECT * FROM child ORDER BY id",
    "SELECT * FROM readings ORDER BY id, at",
    "SELECT * FROM sites ORDER BY id",
];

fn pg_program(name: &str) -> std::path::PathBuf {
    pgreplica::programs::bin_dir().unwrap().join(name)
}

/// sysbench with PostgreSQL's driver on `port`, database app.
fn sysbench(port: u16, args: &[&str]) -> Command {
    let mut c = Command::new("sysbench");
    c.args([
        "--db-driver=pgsql",
        "--pgsql-host=127.0.0.1",
        &format!("--pgsql-port={port}"),
        "--pgsql-user=postgres",
        "--pgsql-db=app",
        "--tables=1",
        "--table-size=2000",
        "oltp_read_write",
    ])
    .args(args)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

fn must(mut command: Command, what: &str) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} (is it installed? scripts/test installs it)"));
    assert!(out.status.success(), "{what} failed:\n{}", text(&out));
}

/// Our writer: random changes to the shop tables, through the parent and the
/// partitions, key changes that cascade, geometries; it reconnects when the
/// master restarts.
async fn shop_writer(dsn: String, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) {
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = client.as_ref().filter(|c| !c.is_closed()) else {
            client = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                .await
                .ok()
                .map(|(c, connection)| {
                    tokio::spawn(connection);
                    c
                });
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (n, m, day) = {
            let mut r = rand::thread_rng();
            (r.gen_range(1..200), r.gen_range(0..10), r.gen_range(0..360))
        };
        let sql = match m {
            0 => format!(
                "INSERT INTO parent VALUES ({n}, 'p{n}') ON CONFLICT (id) DO UPDATE SET name = 'again';
                 INSERT INTO child VALUES ({n}, {n}, 'c') ON CONFLICT (id) DO NOTHING"
            ),
            1 => format!("UPDATE parent SET id = id + 1000 WHERE id = {n}"),
            2 => format!("DELETE FROM parent WHERE id = {n} OR id = {n} + 1000"),
            3 => format!(
                "INSERT INTO readings VALUES ({n}, date '2026-01-01' + {day}, 'r') ON CONFLICT DO NOTHING"
            ),
            4 => format!("UPDATE readings SET at = at + 200 WHERE id = {n}"),
            5 => format!("UPDATE readings_a SET v = v || '.' WHERE id = {n}"),
            6 => format!("DELETE FROM readings_b WHERE id = {n}"),
            7 => format!(
                "INSERT INTO sites VALUES ({n}, ST_SetSRID(ST_MakePoint({day} / 7.0, {n} / 3.0), 4326),
                     ST_Buffer(ST_MakePoint({n}, {day}), 1.5))
                 ON CONFLICT (id) DO UPDATE
                     SET pos = ST_Translate(sites.pos, 0.25, -0.5), zone = ST_Union(sites.zone, EXCLUDED.zone)"
            ),
            8 => format!("DELETE FROM sites WHERE id = {n}"),
            _ => format!("UPDATE child SET note = note || '+' WHERE id = {n}"),
        };
        if c.batch_execute(&sql).await.is_ok() {
            done.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The external workloads, running until killed.
fn workloads(dsn: &str, port: u16) -> [Child; 2] {
    let pgbench = Command::new(pg_program("pgbench"))
        .args(["-n", "-c", "2", "-T", "100000", dsn])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let sysbench = sysbench(port, &["--threads=2", "--time=100000", "run"])
        .spawn()
        .unwrap();
    [pgbench, sysbench]
}

fn stop_all(children: &mut [Child]) {
    for child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replication_under_external_workloads_and_kill_points_stays_exact() {
    let kills: usize = std::env::var("SOAK_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(20);
    let s = Setup::new(1, SHOP).await;
    // The log is kept, to count what was logged against what was applied.
    s.configure("LOG_KEEP=86400\n");
    let port = s.master.port;
    let dsn = s.master.dsn("app");
    must(
        {
            let mut c = Command::new(pg_program("pgbench"));
            c.args(["-i", "-q", "-s", "1", &dsn]);
            c
        },
        "pgbench -i",
    );
    must(sysbench(port, &["prepare"]), "sysbench prepare");
    // The external workloads' tables reach the slave through clone.
    let conf = s.conf.to_str().unwrap().to_string();
    let out = support::pgreplica(&["install", &conf]);
    assert!(out.status.success(), "{}", text(&out));
    let out = support::pgreplica(&["clone", &conf]);
    assert!(out.status.success(), "{}", text(&out));

    // From here on the daemon reaches the slave through a proxy that cuts
    // the network now and then.
    let cut = Arc::new(AtomicBool::new(false));
    let slave_port = s.slaves[0].port;
    let proxied = support::proxy::proxy(slave_port, cut.clone(), true).await;
    let text_conf = std::fs::read_to_string(&s.conf).unwrap();
    let slave_dsn = s.slaves[0].dsn("app");
    std::fs::write(
        &s.conf,
        text_conf.replace(
            &slave_dsn,
            &slave_dsn.replace(&format!("port={slave_port}"), &format!("port={proxied}")),
        ),
    )
    .unwrap();

    let started = Instant::now();
    let mut external = workloads(&dsn, port);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(shop_writer(dsn.clone(), stop.clone(), done.clone()));

    for point in 0..kills {
        let mut daemon = s.spawn();
        let wait = rand::thread_rng().gen_range(100..900);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if point % 10 == 5 {
            // The network to the slave fails under the running daemon.
            cut.store(true, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            cut.store(false, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        daemon.kill9();
        if point == kills / 3 {
            s.slaves[0].stop("immediate").unwrap();
            s.slaves[0].restart().unwrap();
        }
        if point == kills * 2 / 3 {
            // The master crashes under its writers; they come back after it.
            stop_all(&mut external);
            s.master.stop("immediate").unwrap();
            s.master.restart().unwrap();
            external = workloads(&dsn, port);
        }
        if point == kills / 2 {
            let out = support::pgreplica(&[
                "execute",
                &conf,
                "ALTER TABLE parent ADD COLUMN region text DEFAULT 'north'",
            ]);
            assert!(out.status.success(), "{}", text(&out));
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    stop_all(&mut external);

    let out = support::pgreplica_within(&["run", "--once", &conf], Duration::from_secs(600))
        .expect("catching up after the soak");
    assert!(out.status.success(), "{}", text(&out));
    let log = s.daemon_log();
    assert!(
        !log.contains("conflict:"),
        "nothing wrote on the slave:\n{log}"
    );
    for query in TABLES {
        s.assert_same(0, query).await;
    }
    let out = support::pgreplica(&["check", &conf]);
    assert!(out.status.success(), "check:\n{}", text(&out));
    let logged = s.assert_applied_once(0).await;
    println!(
        "soak: {kills} kill points in {:.0} s, {logged} events (pgbench TPC-B, sysbench \
         oltp_read_write, {} shop transactions), {} network cuts, one master and one slave \
         crash, 0 lost, 0 applied twice",
        started.elapsed().as_secs_f64(),
        done.load(Ordering::Relaxed),
        (kills + 4) / 10
    );
}
