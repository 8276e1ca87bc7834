//! A head office with many shops: one master replicated to many slaves by one
//! daemon, under pgbench's TPC-B load, through a daemon crash, a slave away for
//! a while and a slave server restart. The daemon reads the master once for all
//! of them: its master connections stay few whatever the number of slaves.
//!
//! 20 slaves here; `PGREPLICA_FANOUT_SLAVES=200` (and `PGREPLICA_FANOUT_AWAY`
//! seconds, 60 for the full run) runs the head office at full size.

mod support;

use pgreplica::capture;
use pgreplica::throwaway::Server;
use std::time::{Duration, Instant};
use support::{connect, pgbench, spawn_run};
use tokio_postgres::Client;

const TABLES: [&str; 4] = support::PGBENCH_TABLES;

// pgbench's history has no key: one is added, everywhere the same.
const KEYED: &str = "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY";

// The rows pgbench -i -s 1 makes, written through SQL once capture is on.
const ROWS: &str = "
INSERT INTO pgbench_branches (bid, bbalance) VALUES (1, 0);
INSERT INTO pgbench_tellers (tid, bid, tbalance) SELECT t, 1, 0 FROM generate_series(1, 10) t;
INSERT INTO pgbench_accounts (aid, bid, abalance, filler)
SELECT a, 1, 0, '' FROM generate_series(1, 100000) a;";

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn start(settings: &str) -> Server {
    Server::start_with("UTC", settings).unwrap_or_else(|e| panic!("{e}"))
}

/// The daemon's sessions on a server's database: what each did last.
async fn sessions(client: &Client, db: &str) -> Vec<String> {
    client
        .query(
            "SELECT state || ': ' || query FROM pg_stat_activity
              WHERE application_name = 'pgreplica' AND datname = $1 AND pid <> pg_backend_pid()",
            &[&db],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn copy(dsn: &str, query: &str) -> Vec<u8> {
    let client = connect(dsn).await;
    pgreplica::demo::copy_out(&client, query).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn many_slaves_of_one_master_stay_exact_through_crash_absence_and_restart() {
    let count = env_number("PGREPLICA_FANOUT_SLAVES", 20) as usize;
    let away = Duration::from_secs(env_number("PGREPLICA_FANOUT_AWAY", 5));
    let master = start("max_connections = 100");
    let shops = start(&format!("max_connections = {}", count + 40));
    let restarted = start("");
    let dir = std::env::temp_dir().join(format!("pgreplica-fanout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // The slaves: shop1 … on one server, the last one on a server of its own.
    let mut dsns = Vec::new();
    for n in 1..=count {
        let server = if n == count { &restarted } else { &shops };
        let db = format!("shop{n}");
        let admin = connect(&server.dsn("postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        pgbench(&server.dsn(&db), &["-i", "-q", "-I", "dtp"]);
        connect(&server.dsn(&db))
            .await
            .batch_execute(KEYED)
            .await
            .unwrap();
        dsns.push(server.dsn(&db));
    }
    let admin = connect(&master.dsn("postgres")).await;
    admin.batch_execute("CREATE DATABASE app").await.unwrap();
    let app = master.dsn("app");
    pgbench(&app, &["-i", "-q", "-I", "dtp"]);
    let mut client = connect(&app).await;
    client.batch_execute(KEYED).await.unwrap();
    capture::install(&mut client, &[], None).await.unwrap();
    let conf = dir.join("office.conf");
    let mut lines =
        format!("[MAIN]\nNAME=office\nDSN0={app}\nKEEPALIVE=2\nLOG_KEEP=86400\nDEBUG_LEVEL=2\n");
    for (i, dsn) in dsns.iter().enumerate() {
        lines.push_str(&format!("DSN{}={dsn}\n", i + 1));
    }
    std::fs::write(&conf, lines).unwrap();
    let log = dir.join("daemon.log");
    let mut daemon = spawn_run(std::slice::from_ref(&conf), &log);
    client.batch_execute(ROWS).await.unwrap();

    // TPC-B from four clients while the daemon is killed and restarted, one
    // shop is away and the last shop's server restarts.
    let load = {
        let app = app.clone();
        tokio::task::spawn_blocking(move || {
            pgbench(&app, &["-n", "-c", "4", "-T", "20", "-R", "200"])
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let connections = sessions(&client, "app").await;
    daemon.kill9();
    daemon = spawn_run(std::slice::from_ref(&conf), &log);
    let shop = connect(&shops.dsn("postgres")).await;
    shop.batch_execute(
        "ALTER DATABASE shop1 WITH ALLOW_CONNECTIONS false;
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'shop1'",
    )
    .await
    .unwrap();
    restarted.stop("immediate").unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    restarted.restart().unwrap();
    tokio::time::sleep(away).await;
    shop.batch_execute("ALTER DATABASE shop1 WITH ALLOW_CONNECTIONS true")
        .await
        .unwrap();
    load.await.unwrap();
    let after = sessions(&client, "app").await;
    let busiest = match connections.len() > after.len() {
        true => connections,
        false => after,
    };

    // Every shop ends equal to the master, every event applied once.
    let started = Instant::now();
    for (n, dsn) in dsns.iter().enumerate() {
        for query in TABLES {
            loop {
                let (m, s) = (copy(&app, query).await, copy(dsn, query).await);
                if m == s {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(300),
                    "shop{} differs from the master for {query}:\n{}",
                    n + 1,
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    daemon.terminate();
    let logged: i64 = client
        .query_one("SELECT count(*) FROM pgreplica.log", &[])
        .await
        .unwrap()
        .get(0);
    for dsn in &dsns {
        let applied: i64 = connect(dsn)
            .await
            .query_one("SELECT sum(events)::int8 FROM pgreplica.progress", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(applied, logged, "events applied on {dsn} against logged");
    }
    let held = busiest.len();
    println!(
        "{count} slaves equal; {logged} events; the daemon held {held} master sessions:\n{}",
        busiest.join("\n")
    );
    assert!(
        held <= 4,
        "the daemon held {held} sessions on the master for {count} slaves (at most 4):\n{}",
        busiest.join("\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
}
