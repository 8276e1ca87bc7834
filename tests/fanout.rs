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

// The first batch after the daemon starts: 5,000 rows, read in pieces that
// every slave shares.
const FIRST: &str = "UPDATE pgbench_accounts SET filler = 'from the head office' WHERE aid <= 5000";

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

    // The shops start as copies of the head office (as after pgreplica
    // clone): pgbench's tables and rows everywhere, made once per server and
    // copied as a template.
    let mut templates = Vec::new();
    for server in [&shops, &restarted] {
        let admin = connect(&server.dsn("postgres")).await;
        admin.batch_execute("CREATE DATABASE shop").await.unwrap();
        pgbench(&server.dsn("shop"), &["-i", "-q"]);
        connect(&server.dsn("shop"))
            .await
            .batch_execute(KEYED)
            .await
            .unwrap();
        templates.push(admin);
    }
    let mut dsns = Vec::new();
    for n in 1..=count {
        let (server, admin) = match n == count {
            true => (&restarted, &templates[1]),
            false => (&shops, &templates[0]),
        };
        let db = format!("shop{n}");
        admin
            .batch_execute(&format!("CREATE DATABASE {db} TEMPLATE shop"))
            .await
            .unwrap();
        dsns.push(server.dsn(&db));
    }
    drop(templates);
    let admin = connect(&master.dsn("postgres")).await;
    admin.batch_execute("CREATE DATABASE app").await.unwrap();
    let app = master.dsn("app");
    pgbench(&app, &["-i", "-q"]);
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
    client.batch_execute(FIRST).await.unwrap();

    // TPC-B from four clients while the daemon is killed and restarted, one
    // shop is away and the last shop's server restarts.
    // Every slave applies every change on the one slave server: the rate
    // shrinks with the number of shops (200 tps for 20, 20 tps for 200), so
    // that the full-size run asks of this machine's slave server what the
    // CI slice does, not ten times more.
    let rate = (4000 / count as u64).clamp(10, 200).to_string();
    let load = {
        let app = app.clone();
        tokio::task::spawn_blocking(move || {
            pgbench(&app, &["-n", "-c", "4", "-T", "20", "-R", &rate])
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
