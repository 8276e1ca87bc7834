//! Multi-master: nodes that are master and slave at once converge, and no
//! change ever comes back to its origin or arrives twice.

mod support;

use pgreplica::capture;
use pgreplica::cluster::Cluster;
use rand::Rng;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::{Daemon, cluster, connect, spawn_run};
use tokio_postgres::Client;

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, qty int, note text)";
const ALL: &str = "SELECT * FROM items ORDER BY id";

/// Databases named n0, n1, … each with capture installed, and the sets that link them.
struct Nodes {
    clusters: Vec<Cluster>,
    dir: PathBuf,
    confs: Vec<PathBuf>,
}

impl Nodes {
    async fn start(n: usize) -> Nodes {
        let clusters: Vec<Cluster> = (0..n).map(|_| cluster("UTC")).collect();
        for c in &clusters {
            let admin = connect(&c.dsn("postgres")).await;
            admin.batch_execute("CREATE DATABASE app").await.unwrap();
            let mut client = connect(&c.dsn("app")).await;
            client.batch_execute(ITEMS).await.unwrap();
            capture::install(&mut client, &[], None).await.unwrap();
        }
        let dir = std::env::temp_dir().join(format!(
            "pgreplica-mm-{}-{}",
            std::process::id(),
            clusters[0].port
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Nodes {
            clusters,
            dir,
            confs: Vec::new(),
        }
    }

    /// A set from node `from` to the nodes `to`, with extra [MAIN] lines.
    fn link(&mut self, from: usize, to: &[usize], extra: &str) {
        let name = format!(
            "n{from}-to-{}",
            to.iter()
                .map(|t| format!("n{t}"))
                .collect::<Vec<_>>()
                .join("-")
        );
        let mut text = format!(
            "[MAIN]\nNAME={name}\nKEEPALIVE=2\nDSN0={}\nNODE0=n{from}\n{extra}",
            self.clusters[from].dsn("app")
        );
        for (i, &t) in to.iter().enumerate() {
            text.push_str(&format!(
                "DSN{n}={}\nNODE{n}=n{t}\n",
                self.clusters[t].dsn("app"),
                n = i + 1
            ));
        }
        let path = self.dir.join(format!("{name}.conf"));
        std::fs::write(&path, text).unwrap();
        self.confs.push(path);
    }

    fn spawn(&self) -> Daemon {
        spawn_run(&self.confs, &self.dir.join("daemon.log"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    async fn client(&self, n: usize) -> Client {
        connect(&self.clusters[n].dsn("app")).await
    }

    async fn rows(&self, n: usize) -> Vec<u8> {
        pgreplica::demo::copy_out(&self.client(n).await, ALL)
            .await
            .unwrap()
    }

    /// Waits until every node holds the same rows.
    async fn converge(&self, limit: Duration) {
        let start = std::time::Instant::now();
        loop {
            let first = self.rows(0).await;
            let mut same = true;
            for n in 1..self.clusters.len() {
                same &= self.rows(n).await == first;
            }
            if same {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "the nodes did not converge in {limit:?}; daemon log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Events applied on the slaves of each set, from the masters' registries.
    async fn applied(&self, n: usize) -> i64 {
        self.client(n)
            .await
            .query_one(
                "SELECT coalesce(sum(events), 0)::int8 FROM pgreplica.slave",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Random inserts, updates and deletes of the ids `base..base + 500` until
/// `stop`; returns the rows they changed (one logged event each).
async fn write(client: Client, base: i32, stop: Arc<AtomicBool>) -> i64 {
    let mut changed = 0;
    while !stop.load(Ordering::Relaxed) {
        let (op, id) = {
            let mut r = rand::thread_rng();
            (r.gen_range(0..3), base + r.gen_range(0..500))
        };
        let sql = match op {
            0 => "INSERT INTO items VALUES ($1, 1, 'new') ON CONFLICT (id) DO NOTHING",
            1 => "UPDATE items SET qty = qty + 1, note = 'changed' WHERE id = $1",
            _ => "DELETE FROM items WHERE id = $1",
        };
        changed += client.execute(sql, &[&id]).await.unwrap() as i64;
    }
    changed
}

/// Writes on every node (disjoint ids) for `seconds`; returns each node's changes.
async fn write_everywhere(nodes: &Nodes, seconds: u64) -> Vec<i64> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for n in 0..nodes.clusters.len() {
        let client = nodes.client(n).await;
        writers.push(tokio::spawn(write(client, n as i32 * 1000, stop.clone())));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut changed = Vec::new();
    for w in writers {
        changed.push(w.await.unwrap());
    }
    changed
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_writing_for_30_seconds_converge_without_loops() {
    let mut nodes = Nodes::start(2).await;
    nodes.link(0, &[1], "");
    nodes.link(1, &[0], "");
    let mut daemon = nodes.spawn();
    let changed = write_everywhere(&nodes, 30).await;
    nodes.converge(Duration::from_secs(60)).await;
    // Each node's changes were applied once on the other, and none came back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(nodes.applied(0).await, changed[0], "{}", nodes.log());
    assert_eq!(nodes.applied(1).await, changed[1], "{}", nodes.log());
    daemon.terminate();
    assert!(changed.iter().all(|&c| c > 100), "{changed:?}");
    assert!(!nodes.log().contains("conflict:"), "{}", nodes.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_star_converges_through_its_hub() {
    let mut nodes = Nodes::start(3).await;
    // The hub passes every change on; the spokes send only their own.
    nodes.link(0, &[1, 2], "FORWARD=all\n");
    nodes.link(1, &[0], "FORWARD=local\n");
    nodes.link(2, &[0], "FORWARD=local\n");
    let mut daemon = nodes.spawn();
    let changed = write_everywhere(&nodes, 10).await;
    nodes.converge(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The hub's set carries every change to the spoke that did not make it.
    assert_eq!(
        nodes.applied(0).await,
        2 * changed[0] + changed[1] + changed[2],
        "{}",
        nodes.log()
    );
    assert_eq!(nodes.applied(1).await, changed[1]);
    assert_eq!(nodes.applied(2).await, changed[2]);
    daemon.terminate();
    assert!(!nodes.log().contains("conflict:"), "{}", nodes.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_mesh_converges_and_applies_each_change_once() {
    let mut nodes = Nodes::start(3).await;
    for (from, to) in [(0, [1, 2]), (1, [0, 2]), (2, [0, 1])] {
        nodes.link(from, &to, "FORWARD=local\n");
    }
    let mut daemon = nodes.spawn();
    let changed = write_everywhere(&nodes, 10).await;
    nodes.converge(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (n, &c) in changed.iter().enumerate() {
        assert_eq!(nodes.applied(n).await, 2 * c, "{}", nodes.log());
    }
    daemon.terminate();
    assert!(!nodes.log().contains("conflict:"), "{}", nodes.log());
}
