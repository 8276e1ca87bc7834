//! A head office and its shops: one master, N slave databases on one slave
//! server, one daemon. For each N, 2,000 single-row transactions are written on
//! the master while the daemon replicates them to every slave. Prints, per N
//! (medians of RUNS runs): the master's time to write them and its ratio to
//! the time with 1 slave and with no daemon at all, the commits on the master
//! database against the application's 2,000, the daemon's sessions on the
//! master, the time until every slave is equal, and the daemon's peak RSS.
//!
//!     cargo bench --bench fanout
//!     FANOUT_SLAVES=1,10,50,200 RUNS=3 cargo bench --bench fanout
//!
//! `FANOUT_SLAVE_NICE=19` runs the slave server at that CPU priority, a stand-in
//! for shops on machines of their own: on one machine the slave databases'
//! applying competes with the master for the same cores.

use pgreplica::throwaway::Server;
use pgreplica::{capture, db};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

const SCHEMA: &str = "CREATE TABLE t (id int PRIMARY KEY, v text)";
const WRITES: i32 = 2000;

fn env_text(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

async fn one(client: &Client, sql: &str, db: &str) -> i64 {
    client.query_one(sql, &[&db]).await.unwrap().get(0)
}

/// Commits counted on a database so far. A session's counts reach the view
/// when it ends, or after it has been idle for 10 s: read after `pause`.
async fn commits(admin: &Client, db: &str, pause: Duration) -> i64 {
    tokio::time::sleep(pause).await;
    let sql = "SELECT xact_commit FROM pg_stat_database WHERE datname = $1";
    one(admin, sql, db).await
}

/// The master's time to write the transactions, in seconds: one session
/// sends them all at once (pipelined), each its own transaction.
async fn write(client: &Client) -> f64 {
    let insert = client
        .prepare("INSERT INTO t VALUES ($1, 'shop')")
        .await
        .unwrap();
    let began = Instant::now();
    let ids: Vec<i32> = (1..=WRITES).collect();
    let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 1]> =
        ids.iter().map(|id| [id as _]).collect();
    let writes = params.iter().map(|p| client.execute(&insert, p));
    for written in futures_util::future::join_all(writes).await {
        written.unwrap();
    }
    began.elapsed().as_secs_f64()
}

struct Figures {
    write: f64,
    commits: i64,
    sessions: i64,
    equal: f64,
    rss: f64,
}

/// One run with `slaves` slaves (0: no daemon).
async fn run(master: &Server, slave: &Server, slaves: usize, run: usize) -> Figures {
    let db = format!("app_{slaves}_{run}");
    let admin = db::connect(&master.dsn("postgres"), None).await.unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let mut client = db::connect(&master.dsn(&db), None).await.unwrap();
    client.batch_execute(SCHEMA).await.unwrap();
    capture::install(&mut client, &[], None).await.unwrap();
    let shops: Vec<Client> = futures_util::future::join_all(
        (1..=slaves).map(|n| async move { db::connect(&slave.dsn(&format!("s{n}")), None).await }),
    )
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    for shop in &shops {
        shop.batch_execute("TRUNCATE t").await.unwrap();
    }
    let dir = std::env::temp_dir().join(format!("pgreplica-bench-fanout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join(format!("{db}.conf"));
    let mut text = format!(
        "[MAIN]\nNAME={db}\nDSN0={}\nDEBUG_LEVEL=0\n",
        master.dsn(&db)
    );
    for n in 1..=slaves {
        text.push_str(&format!("DSN{n}={}\n", slave.dsn(&format!("s{n}"))));
    }
    std::fs::write(&conf, text).unwrap();
    let mut daemon: Option<Child> = None;
    if slaves > 0 {
        daemon = Some(
            Command::new(env!("CARGO_BIN_EXE_pgreplica"))
                .args(["run", conf.to_str().unwrap()])
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let registered = "SELECT count(*) FROM pgreplica.slave WHERE set_name = $1";
        while one(&client, registered, &db).await < slaves as i64 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let before = commits(&admin, &db, Duration::from_secs(11)).await;
    let began = Instant::now();
    let write = write(&client).await;
    // The daemon's sessions: the writer's own is left out.
    let writer: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let sessions = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
              WHERE application_name = 'pgreplica' AND datname = $1 AND pid <> $2",
            &[&db, &writer],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    for shop in &shops {
        let count = || async { shop.query_one("SELECT count(*) FROM t", &[]).await };
        while count().await.unwrap().get::<_, i64>(0) < WRITES as i64 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let equal = began.elapsed().as_secs_f64();
    drop(client);
    let rss = match &mut daemon {
        Some(child) => {
            let rss = peak_rss_mb(child.id());
            // SAFETY: kill only sends a signal to our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
            rss
        }
        None => 0.0,
    };
    // Every session has ended: the counts are all in.
    let commits = commits(&admin, &db, Duration::from_millis(500)).await - before;
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
    Figures {
        write,
        commits,
        sessions,
        equal,
        rss,
    }
}

/// Lowers the CPU priority of the server on `port` and of every process it
/// starts: a stand-in for shops on machines of their own, to tell the master's
/// cost of the daemon from the CPU the slave databases take on shared cores.
fn renice(port: u16, nice: &str) {
    let found = Command::new("pgrep")
        .args(["-f", &format!("postgres -D .* -p {port}$")])
        .output()
        .unwrap();
    let pids = String::from_utf8_lossy(&found.stdout).to_string();
    for pid in pids.split_whitespace() {
        let children = Command::new("pgrep").args(["-P", pid]).output().unwrap();
        let children = String::from_utf8_lossy(&children.stdout).to_string();
        for p in std::iter::once(pid).chain(children.split_whitespace()) {
            let status = Command::new("renice")
                .args(["-n", nice, "-p", p])
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "renice {nice} {p} failed");
        }
    }
    assert!(!pids.is_empty(), "no server found on port {port}");
}

#[tokio::main]
async fn main() {
    let counts: Vec<usize> = env_text("FANOUT_SLAVES", "1,10,50,200")
        .split(',')
        .map(|n| n.trim().parse().unwrap())
        .collect();
    let runs: usize = env_text("RUNS", "3").parse().unwrap();
    let most = counts.iter().copied().max().unwrap_or(1);
    let master = Server::start_with("UTC", "max_connections = 50").unwrap();
    let slave = Server::start_with("UTC", &format!("max_connections = {}", 2 * most + 20)).unwrap();
    if let Ok(nice) = std::env::var("FANOUT_SLAVE_NICE") {
        renice(slave.port, &nice);
    }
    let admin = db::connect(&slave.dsn("postgres"), None).await.unwrap();
    for n in 1..=most {
        admin
            .batch_execute(&format!("CREATE DATABASE s{n}"))
            .await
            .unwrap();
        let shop = db::connect(&slave.dsn(&format!("s{n}")), None)
            .await
            .unwrap();
        shop.batch_execute(SCHEMA).await.unwrap();
    }
    let mut table = Vec::new();
    for &slaves in std::iter::once(&0).chain(&counts) {
        let mut figures = Vec::new();
        for r in 0..runs {
            figures.push(run(&master, &slave, slaves, r).await);
        }
        let pick = |f: fn(&Figures) -> f64| median(figures.iter().map(f).collect());
        table.push((
            slaves,
            pick(|f| f.write),
            pick(|f| f.commits as f64),
            pick(|f| f.sessions as f64),
            pick(|f| f.equal),
            pick(|f| f.rss),
        ));
        eprintln!("{slaves} slaves measured");
    }
    let alone = table[0].1;
    let one_slave = table
        .iter()
        .find(|row| row.0 == 1)
        .map_or(alone, |row| row.1);
    println!(
        "{WRITES} single-row transactions on the master, medians of {runs} runs:\n\
         slaves | master's write time | vs 1 slave | vs no daemon | commits on the master (vs the application's) | daemon sessions on the master | all slaves equal after | daemon peak RSS"
    );
    for (slaves, write, commits, sessions, equal, rss) in table {
        println!(
            "{slaves:>6} | {:>8.0} ms | {:>5.2}x | {:>5.2}x | {commits:>7.0} ({:.2}x) | {sessions:>3.0} | {:>7.0} ms | {rss:>5.1} MB",
            write * 1000.0,
            write / one_slave,
            write / alone,
            commits / WRITES as f64,
            equal * 1000.0,
        );
    }
    println!(
        "targets at 200 slaves: write time <= 3x that with 1 slave, commits <= 1.2x, sessions <= 4, RSS <= 64 MB"
    );
}
