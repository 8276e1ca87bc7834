//! Test harness: a master and its slaves on throwaway servers, a config file, and
//! the pgreplica binary run the way a DBA runs it.
#![allow(dead_code)]

pub mod proxy;
pub mod smtp;
pub mod writers;

use pgreplica::demo::copy_out;
use pgreplica::throwaway::Server;
use pgreplica::{Config, capture, db, wal};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// A master with slaves, all holding database `app` with the same schema.
pub struct Setup {
    pub master: Server,
    pub slaves: Vec<Server>,
    pub conf: PathBuf,
    pub dir: PathBuf,
}

/// pgbench's tables in key order (its history gets a key: `id`).
pub const PGBENCH_TABLES: [&str; 4] = [
    "SELECT * FROM pgbench_branches ORDER BY bid",
    "SELECT * FROM pgbench_tellers ORDER BY tid",
    "SELECT * FROM pgbench_accounts ORDER BY aid",
    "SELECT * FROM pgbench_history ORDER BY id",
];

/// What a master needs for WAL capture.
pub const WAL_SETTINGS: &str = "wal_level = logical\nmax_replication_slots = 40\n\
     max_wal_senders = 20\ntrack_commit_timestamp = on";

/// Whether the tests' sets capture from the WAL: `PGREPLICA_CAPTURE=wal`
/// (else with triggers).
pub fn wal_capture() -> bool {
    std::env::var("PGREPLICA_CAPTURE").is_ok_and(|m| m == "wal")
}

/// True (and says why) when the tests capture from the WAL and this one is of
/// trigger capture's own workings (the log, its cleanup).
pub fn trigger_only(why: &str) -> bool {
    if wal_capture() {
        eprintln!("not run under PGREPLICA_CAPTURE=wal: {why}");
    }
    wal_capture()
}

pub fn server(timezone: &str) -> Server {
    Server::start(timezone).unwrap_or_else(|e| panic!("cannot start a test PostgreSQL server: {e}"))
}

/// The oldest PostgreSQL major the tests run (the master's `$PG_BIN`, the
/// slaves' `$PG_SLAVE_BIN`, or the newest installed): a type newer than it
/// cannot be tested.
pub fn oldest_major() -> u32 {
    let bins = [
        pgreplica::programs::bin_dir().ok(),
        std::env::var_os("PG_SLAVE_BIN").map(PathBuf::from),
    ];
    bins.into_iter()
        .flatten()
        .map(|bin| {
            let out = Command::new(bin.join("postgres"))
                .arg("--version")
                .output()
                .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
            // "postgres (PostgreSQL) 13.23"
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let version = text.split_whitespace().nth(2).unwrap_or_default();
            version
                .split('.')
                .next()
                .unwrap_or_default()
                .parse()
                .unwrap_or_else(|_| panic!("cannot read the version of {}: {text}", bin.display()))
        })
        .min()
        .unwrap_or(0)
}

/// A slave's server: from `$PG_SLAVE_BIN` when set (a master and slaves of
/// different PostgreSQL versions), else like [`server`]; with `settings`.
pub fn slave_server(timezone: &str, settings: &str) -> Server {
    match std::env::var_os("PG_SLAVE_BIN") {
        Some(bin) => Server::start_in(bin.into(), timezone, settings),
        None => Server::start_with(timezone, settings),
    }
    .unwrap_or_else(|e| panic!("cannot start a test PostgreSQL server: {e}"))
}

impl Setup {
    /// Starts the servers, creates `schema` everywhere, installs capture on the master.
    pub async fn new(slaves: usize, schema: &str) -> Setup {
        Setup::with_schemas(slaves, schema, schema).await
    }

    /// Like `new`, with a different schema script on the slaves.
    pub async fn with_schemas(slaves: usize, master_schema: &str, slave_schema: &str) -> Setup {
        Setup::with_capture(slaves, master_schema, slave_schema, wal_capture()).await
    }

    /// Like `new`, capturing from the WAL (`CAPTURE = wal`).
    pub async fn wal(slaves: usize, schema: &str) -> Setup {
        Setup::with_capture(slaves, schema, schema, true).await
    }

    async fn with_capture(
        slaves: usize,
        master_schema: &str,
        slave_schema: &str,
        wal: bool,
    ) -> Setup {
        let settings = match wal {
            true => WAL_SETTINGS,
            false => "",
        };
        let master = Server::start_with("Europe/Madrid", settings)
            .unwrap_or_else(|e| panic!("cannot start a test PostgreSQL server: {e}"));
        let slaves: Vec<Server> = (0..slaves)
            // Under WAL capture a slave can become the master (switchover).
            .map(|_| slave_server("Pacific/Auckland", settings))
            .collect();
        for (pg, schema) in std::iter::once((&master, master_schema))
            .chain(slaves.iter().map(|s| (s, slave_schema)))
        {
            let admin = connect(&pg.dsn("postgres")).await;
            admin.batch_execute("CREATE DATABASE app").await.unwrap();
            connect(&pg.dsn("app"))
                .await
                .batch_execute(schema)
                .await
                .unwrap();
        }
        let dir = std::env::temp_dir().join(format!(
            "pgreplica-test-{}-{}",
            std::process::id(),
            master.port
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("app.conf");
        let mut text = format!(
            "[MAIN]\nNAME=app\nDSN0={}\nKEEPALIVE=2\nDEBUG_LEVEL=2\n",
            master.dsn("app")
        );
        for (i, s) in slaves.iter().enumerate() {
            text.push_str(&format!("DSN{}={}\n", i + 1, s.dsn("app")));
        }
        if wal {
            text.push_str("CAPTURE=wal\n");
        }
        std::fs::write(&conf, text).unwrap();
        let mut client = connect(&master.dsn("app")).await;
        let set = (wal && !slaves.is_empty()).then(|| Config::load(&conf).unwrap());
        capture::install(&mut client, &[], set.as_ref())
            .await
            .unwrap();
        if let Some(set) = &set {
            wal::make_slots(&client, set).await.unwrap();
            client
                .batch_execute("SELECT pg_create_logical_replication_slot('audit', 'pgoutput')")
                .await
                .unwrap();
        }
        Setup {
            master,
            slaves,
            conf,
            dir,
        }
    }

    pub async fn master(&self) -> Client {
        connect(&self.master.dsn("app")).await
    }

    pub async fn slave(&self, n: usize) -> Client {
        connect(&self.slaves[n].dsn("app")).await
    }

    /// `pgreplica run --once` on this set; its output.
    pub fn run_once(&self) -> Output {
        pgreplica(&["run", "--once", self.conf.to_str().unwrap()])
    }

    /// `pgreplica run --once`, which must succeed.
    pub fn sync(&self) {
        let out = self.run_once();
        assert!(
            out.status.success(),
            "pgreplica run --once failed:\n{}",
            text(&out)
        );
    }

    /// `pgreplica run` in the background.
    pub fn spawn(&self) -> Daemon {
        spawn_run(
            std::slice::from_ref(&self.conf),
            &self.dir.join("daemon.log"),
        )
    }

    /// What the background daemons logged so far.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Appends lines to the set's config file.
    pub fn configure(&self, lines: &str) {
        let mut text = std::fs::read_to_string(&self.conf).unwrap();
        text.push_str(lines);
        std::fs::write(&self.conf, text).unwrap();
    }

    /// Runs `sql` on the master, applies it with `run --once`, and compares `query`
    /// on the master and the first slave.
    pub async fn replicate(&self, sql: &str, query: &str) {
        self.master().await.batch_execute(sql).await.unwrap();
        self.sync();
        self.assert_same(0, query).await;
    }

    /// Runs `sql` on the master and waits for a running daemon to bring slave 0
    /// level with it for `query`.
    pub async fn arrives(&self, sql: &str, query: &str) {
        self.master().await.batch_execute(sql).await.unwrap();
        self.wait_same(0, query, Duration::from_secs(20)).await;
    }

    /// Asserts that `query` gives the same bytes on the master and slave `n`.
    pub async fn assert_same(&self, n: usize, query: &str) {
        let (m, s) = (
            self.text(None, query).await,
            self.text(Some(n), query).await,
        );
        assert!(
            m == s,
            "master and slave {n} differ for {query}\nmaster:\n{}\nslave:\n{}",
            String::from_utf8_lossy(&m),
            String::from_utf8_lossy(&s)
        );
    }

    /// Waits (up to `limit`) until `query` gives the same bytes on master and slave `n`.
    pub async fn wait_same(&self, n: usize, query: &str, limit: Duration) -> Duration {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.text(None, query).await == self.text(Some(n), query).await {
                return start.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.assert_same(n, query).await;
        start.elapsed()
    }

    /// Asserts that slave `n` applied every event the master logged exactly once:
    /// a batch applied twice, or one skipped, shows here even where the rows end
    /// equal. Needs `LOG_KEEP` long enough that nothing was cleaned. Returns the
    /// number of events.
    pub async fn assert_applied_once(&self, n: usize) -> i64 {
        let wal = std::fs::read_to_string(&self.conf).is_ok_and(|c| c.contains("CAPTURE=wal"));
        let logged = match wal {
            true => self.wal_changes().await,
            false => self
                .master()
                .await
                .query_one("SELECT count(*) FROM pgreplica.log", &[])
                .await
                .unwrap()
                .get(0),
        };
        let applied: i64 = self
            .slave(n)
            .await
            .query_one(
                "SELECT coalesce(sum(events), 0)::int8 FROM pgreplica.progress",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            applied, logged,
            "events applied on slave {n} against logged"
        );
        logged
    }

    /// Under WAL capture, the changes the master's WAL holds since the set
    /// was installed (read from the slot `audit`, made then), counted as the
    /// log counts them: an update that moved a row to a new key is a delete
    /// and an insert.
    async fn wal_changes(&self) -> i64 {
        use pgreplica::pgoutput::{self, Message};
        let master = self.master().await;
        let rows = master
            .query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes('audit', NULL, NULL,
                     'proto_version', '1', 'publication_names', 'pgreplica')",
                &[],
            )
            .await
            .unwrap();
        let mut keys = std::collections::HashMap::new();
        let mut changes = 0;
        for row in rows {
            changes += match pgoutput::decode(row.get(0)).unwrap() {
                Message::Relation(r) => {
                    let key: Vec<String> = master
                        .query_one("SELECT pgreplica.key_columns($1::oid::regclass)", &[&r.oid])
                        .await
                        .unwrap()
                        .get(0);
                    let at = r.columns.iter().enumerate();
                    let at = at.filter(|(_, c)| key.contains(&c.name)).map(|(i, _)| i);
                    keys.insert(r.oid, at.collect::<Vec<usize>>());
                    0
                }
                Message::Update {
                    table,
                    old: Some(old),
                    new,
                    ..
                } if keys[&table].iter().any(|&k| old[k] != new[k]) => 2,
                Message::Insert { .. } | Message::Update { .. } | Message::Delete { .. } => 1,
                Message::Truncate { tables, .. } => tables.len() as i64,
                _ => 0,
            };
        }
        changes
    }

    /// `query`'s rows as COPY text, with the client in UTC.
    pub async fn text(&self, slave: Option<usize>, query: &str) -> Vec<u8> {
        let client = match slave {
            Some(n) => self.slave(n).await,
            None => self.master().await,
        };
        client.batch_execute("SET timezone = 'UTC'").await.unwrap();
        copy_out(&client, query).await.unwrap()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `pgreplica run` of these files in the background, logging to `log`.
pub fn spawn_run(confs: &[PathBuf], log: &std::path::Path) -> Daemon {
    let child = Command::new(env!("CARGO_BIN_EXE_pgreplica"))
        .arg("run")
        .args(confs)
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            // Appended: the logs of a daemon restarted many times stay whole.
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        ))
        .spawn()
        .unwrap();
    Daemon(child)
}

/// A background `pgreplica run`, killed when dropped.
pub struct Daemon(pub Child);

impl Daemon {
    /// SIGTERM, as an operator's stop; waits for the process to end.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill only sends a signal to our own child process.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        self.0.wait().unwrap()
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub async fn connect(dsn: &str) -> Client {
    db::connect(dsn, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

pub async fn count(client: &Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// Runs the pgreplica binary.
pub fn pgreplica(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgreplica"))
        .args(args)
        .output()
        .unwrap()
}

/// A command's stdout and stderr together.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs the pgreplica binary, killing it after `limit` (a hang guard, not a
/// speed limit); `None` when it had to be killed. Its output goes through a
/// file: a pipe nobody reads while it runs would fill and stop it.
pub fn pgreplica_within(args: &[&str], limit: Duration) -> Option<Output> {
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("pgreplica-run-{}-{n}.out", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgreplica"))
        .args(args)
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let printed = std::fs::read(&path).unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    status.map(|status| Output {
        status,
        stdout: printed,
        stderr: Vec::new(),
    })
}

/// The newest installed PostgreSQL's pgbench.
pub fn pgbench(dsn: &str, args: &[&str]) {
    let bin = pgreplica::programs::client("pgbench");
    let out = Command::new(&bin)
        .args(args)
        .arg(dsn)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    assert!(
        out.status.success(),
        "pgbench {args:?} failed:\n{}",
        text(&out)
    );
}
