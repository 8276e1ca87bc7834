//! Multi-master: nodes that are master and slave at once converge, and no
//! change ever comes back to its origin or arrives twice.

mod support;

use pgreplica::capture;
use pgreplica::throwaway::Server;
use rand::Rng;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::{Daemon, connect, spawn_run};
use tokio_postgres::Client;

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, qty int, note text);
                     CREATE TABLE tickets (id serial PRIMARY KEY, note text)";
const ALL: &str = "SELECT * FROM items ORDER BY id";

/// Databases named n0, n1, … each with capture installed, and the sets that link them.
struct Nodes {
    clusters: Vec<Server>,
    /// Each node's server (an index into `clusters`) and database.
    nodes: Vec<(usize, String)>,
    dir: PathBuf,
    confs: Vec<PathBuf>,
    /// Nodes the daemon reaches through a proxy, and the proxy's port.
    via: Vec<(usize, u16)>,
    /// Whether the sets name their nodes (NODE0, NODE1, …).
    named: bool,
    /// Whether the sets capture from the WAL (`PGREPLICA_CAPTURE=wal`).
    wal: bool,
}

impl Nodes {
    /// `n` nodes, each on a server of its own.
    async fn start(n: usize) -> Nodes {
        Nodes::on_servers(n, n).await
    }

    /// `n` nodes, as databases spread over `servers` servers.
    async fn on_servers(n: usize, servers: usize) -> Nodes {
        let wal = support::wal_capture();
        let settings = if wal { support::WAL_SETTINGS } else { "" };
        let clusters: Vec<Server> = (0..servers)
            .map(|_| Server::start_with("UTC", settings).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        let mut nodes = Vec::new();
        for k in 0..n {
            let (c, db) = (k % servers, format!("app{}", k / servers));
            let admin = connect(&clusters[c].dsn("postgres")).await;
            admin
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .await
                .unwrap();
            let mut client = connect(&clusters[c].dsn(&db)).await;
            client.batch_execute(ITEMS).await.unwrap();
            capture::install(&mut client, &[], None).await.unwrap();
            nodes.push((c, db));
        }
        let dir = std::env::temp_dir().join(format!(
            "pgreplica-mm-{}-{}",
            std::process::id(),
            clusters[0].port
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Nodes {
            clusters,
            nodes,
            dir,
            confs: Vec::new(),
            via: Vec::new(),
            named: true,
            wal,
        }
    }

    /// Node `n`'s connection string in the config files.
    fn dsn(&self, n: usize) -> String {
        let (c, db) = &self.nodes[n];
        let dsn = self.clusters[*c].dsn(db);
        match self.via.iter().find(|(v, _)| *v == n) {
            Some((_, port)) => dsn.replace(
                &format!("port={}", self.clusters[*c].port),
                &format!("port={port}"),
            ),
            None => dsn,
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
            "[MAIN]\nNAME={name}\nKEEPALIVE=2\nDSN0={}\n{extra}",
            self.dsn(from)
        );
        for (i, n) in std::iter::once(from).chain(to.iter().copied()).enumerate() {
            if i > 0 {
                text.push_str(&format!("DSN{i}={}\n", self.dsn(n)));
            }
            if self.named {
                text.push_str(&format!("NODE{i}=n{n}\n"));
            }
        }
        if self.wal {
            text.push_str("CAPTURE=wal\n");
        }
        let path = self.dir.join(format!("{name}.conf"));
        std::fs::write(&path, text).unwrap();
        if self.wal {
            // The publication of the node's tables, and a slot per slave.
            let out = support::pgreplica(&["install", path.to_str().unwrap()]);
            assert!(out.status.success(), "{}", support::text(&out));
        }
        self.confs.push(path);
    }

    fn spawn(&self) -> Daemon {
        spawn_run(&self.confs, &self.dir.join("daemon.log"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    async fn client(&self, n: usize) -> Client {
        let (c, db) = &self.nodes[n];
        connect(&self.clusters[*c].dsn(db)).await
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
            for n in 1..self.nodes.len() {
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

/// The nodes converge, and each master's registry says its slaves applied
/// exactly `expected[n]` events: no change came back or arrived twice. (The
/// hub of 20 spokes under WAL capture, each of its slaves decoding the hub's
/// WAL for itself, has taken two minutes under the full suite's load.)
async fn applied_exactly(nodes: &Nodes, expected: &[i64]) {
    nodes.converge(Duration::from_secs(300)).await;
    // The registries are written after each batch commits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (n, &e) in expected.iter().enumerate() {
        assert_eq!(nodes.applied(n).await, e, "node {n}\n{}", nodes.log());
    }
}

/// Writes on every node (disjoint ids) for `seconds`; returns each node's changes.
async fn write_everywhere(nodes: &Nodes, seconds: u64) -> Vec<i64> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for n in 0..nodes.nodes.len() {
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
    applied_exactly(&nodes, &changed).await;
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
    // The hub's set carries every change to the spoke that did not make it.
    let hub = 2 * changed[0] + changed[1] + changed[2];
    applied_exactly(&nodes, &[hub, changed[1], changed[2]]).await;
    daemon.terminate();
    assert!(!nodes.log().contains("conflict:"), "{}", nodes.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hub_with_twenty_spokes_converges_with_exact_event_counts() {
    let spokes = 20;
    let mut nodes = Nodes::on_servers(spokes + 1, 3).await;
    let all: Vec<usize> = (1..=spokes).collect();
    nodes.link(0, &all, "FORWARD=all\n");
    for spoke in 1..=spokes {
        nodes.link(spoke, &[0], "FORWARD=local\n");
    }
    let mut daemon = nodes.spawn();
    let changed = write_everywhere(&nodes, 10).await;
    // The hub's set carries its own changes to every spoke, and each spoke's
    // to the other spokes.
    let from_spokes: i64 = changed[1..].iter().sum();
    let mut expected = vec![spokes as i64 * changed[0] + (spokes as i64 - 1) * from_spokes];
    expected.extend(&changed[1..]);
    applied_exactly(&nodes, &expected).await;
    // On the hub: its own set's three sessions, and one per spoke's set
    // (the hub is their slave); under WAL capture each of the hub's slaves
    // also reads its slot in a session of its own, and its stream in a
    // replication session.
    let hub = nodes.client(0).await;
    let sessions: i64 = hub
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgreplica'
                AND datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    daemon.terminate();
    assert!(!nodes.log().contains("conflict:"), "{}", nodes.log());
    let slots = if nodes.wal { 2 * spokes as i64 } else { 0 };
    assert!(
        sessions <= 3 + spokes as i64 + slots,
        "{sessions} sessions on the hub"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_mesh_converges_and_applies_each_change_once() {
    let mut nodes = Nodes::start(3).await;
    for (from, to) in [(0, [1, 2]), (1, [0, 2]), (2, [0, 1])] {
        nodes.link(from, &to, "FORWARD=local\n");
    }
    let mut daemon = nodes.spawn();
    let changed = write_everywhere(&nodes, 10).await;
    let twice: Vec<i64> = changed.iter().map(|c| 2 * c).collect();
    applied_exactly(&nodes, &twice).await;
    daemon.terminate();
    assert!(!nodes.log().contains("conflict:"), "{}", nodes.log());
}

impl Nodes {
    /// `pgreplica run --once` of every set; its output, and whether it succeeded.
    fn once(&self) -> (bool, String) {
        let mut args = vec!["run".to_string(), "--once".to_string()];
        args.extend(self.confs.iter().map(|c| c.display().to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = support::pgreplica(&args);
        (out.status.success(), support::text(&out))
    }

    fn sync(&self) {
        let (ok, said) = self.once();
        assert!(ok, "{said}");
    }

    /// The conflicts recorded on node `n`: kind and resolution.
    async fn conflicts(&self, n: usize) -> Vec<(String, Option<String>)> {
        self.client(n)
            .await
            .query(
                "SELECT kind, resolution FROM pgreplica.conflicts ORDER BY kind",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }
}

/// Two synced nodes, then every kind of conflict: both update row 1, node 0
/// deletes row 2 that node 1 updates, both delete row 3, both insert key 100.
/// Node 1 writes last.
async fn conflicting(policies: [&str; 2]) -> Nodes {
    let mut nodes = Nodes::start(2).await;
    nodes.link(0, &[1], policies[0]);
    nodes.link(1, &[0], policies[1]);
    nodes
        .client(0)
        .await
        .batch_execute("INSERT INTO items VALUES (1, 0, 'x'), (2, 0, 'x'), (3, 0, 'x')")
        .await
        .unwrap();
    nodes.sync();
    nodes
        .client(0)
        .await
        .batch_execute(
            "UPDATE items SET qty = 10 WHERE id = 1; DELETE FROM items WHERE id IN (2, 3);
             INSERT INTO items VALUES (100, 1, 'node 0')",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    nodes
        .client(1)
        .await
        .batch_execute(
            "UPDATE items SET qty = 20 WHERE id IN (1, 2); DELETE FROM items WHERE id = 3;
             INSERT INTO items VALUES (100, 2, 'node 1')",
        )
        .await
        .unwrap();
    nodes
}

const KINDS: [&str; 5] = [
    "delete of a missing row",
    "delete of a row changed on the slave",
    "insert of an existing key",
    "update of a missing row",
    "update of a row changed on both sides",
];

/// Every kind of conflict was recorded on one node or the other, resolved.
async fn all_kinds_recorded(nodes: &Nodes) {
    let mut kinds: Vec<String> = Vec::new();
    for n in 0..2 {
        for (kind, resolution) in nodes.conflicts(n).await {
            assert!(resolution.is_some(), "{kind} unresolved");
            kinds.push(kind);
        }
    }
    for kind in KINDS {
        assert!(kinds.iter().any(|k| k == kind), "{kind} not in {kinds:?}");
    }
}

/// What node 0 holds when it wins every conflict.
const NODE_0_WINS: &str = "1\t10\tx\n100\t1\tnode 0\n";

/// The conflicts under `policies` (node 0's set, node 1's set) settle on both
/// nodes as `expected`, every kind recorded with its resolution.
async fn settles(policies: [&str; 2], expected: &str) {
    let nodes = conflicting(policies).await;
    nodes.sync();
    converged_as(&nodes, expected).await;
}

async fn converged_as(nodes: &Nodes, expected: &str) {
    nodes.converge(Duration::from_secs(1)).await;
    let rows = String::from_utf8(nodes.rows(0).await).unwrap();
    assert_eq!(rows, expected);
    all_kinds_recorded(nodes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_0_wins_with_apply_remote_one_way_and_keep_local_the_other() {
    settles(
        ["CONFLICT=apply-remote\n", "CONFLICT=keep-local\n"],
        NODE_0_WINS,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_0_wins_by_priority_on_both_sides() {
    let policy = "CONFLICT=priority\nPRIORITY=n0, n1\n";
    settles([policy, policy], NODE_0_WINS).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_newest_change_wins_on_both_sides() {
    let policy = "CONFLICT=newest\nPRIORITY=n0, n1\n";
    let nodes = conflicting([policy, policy]).await;
    // One direction after the other: node 1's changes reach node 0 (and are
    // applied everywhere) before node 0's reach node 1, which must still know
    // when its own rows changed.
    for n in [1, 0] {
        let conf = nodes.confs[n].display().to_string();
        let out = support::pgreplica(&["run", "--once", &conf]);
        assert!(out.status.success(), "{}", support::text(&out));
    }
    // Node 1 wrote last: its update of row 2 beats node 0's delete.
    converged_as(&nodes, "1\t20\tx\n2\t20\tx\n100\t2\tnode 1\n").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn newest_agrees_on_both_sides_when_a_nodes_own_change_is_far_back_in_its_log() {
    let policy = "CONFLICT=newest\nPRIORITY=n0, n1\n";
    let nodes = conflicting([policy, policy]).await;
    // Node 1 writes many rows after its conflicting changes, so that they lie
    // far back among the table's events in its own log.
    nodes
        .client(1)
        .await
        .batch_execute("INSERT INTO items SELECT g, 0, 'later' FROM generate_series(1000, 12000) g")
        .await
        .unwrap();
    for n in [1, 0] {
        let conf = nodes.confs[n].display().to_string();
        let out = support::pgreplica(&["run", "--once", &conf]);
        assert!(out.status.success(), "{}", support::text(&out));
    }
    nodes.converge(Duration::from_secs(1)).await;
    let node_0 = nodes.client(0).await;
    let first: Vec<(i32, i32)> = node_0
        .query("SELECT id, qty FROM items WHERE id < 1000 ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Node 1 wrote last, as in the_newest_change_wins_on_both_sides.
    assert_eq!(first, [(1, 20), (2, 20), (100, 2)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_waits_for_the_dba_and_resumes_with_the_resolution() {
    let nodes = conflicting(["CONFLICT=stop\n", "CONFLICT=stop\n"]).await;
    let conf = |n: usize| nodes.confs[n].display().to_string();
    // Each run stops at the next conflict; the DBA resolves each in node 0's favour.
    let mut rounds = 0;
    loop {
        let (ok, said) = nodes.once();
        if ok {
            break;
        }
        assert!(said.contains("CONFLICT=stop"), "{said}");
        rounds += 1;
        assert!(rounds < 20, "{said}");
        for (set, winner) in [(0, "apply-remote"), (1, "keep-local")] {
            let out = support::pgreplica(&["conflicts", &conf(set)]);
            let listed = support::text(&out);
            for line in listed.lines().filter(|l| l.starts_with('#')) {
                let id = line[1..].split(' ').next().unwrap().to_string();
                let waiting = listed
                    .split(&format!("#{id} "))
                    .nth(1)
                    .is_some_and(|rest| rest.split("\n#").next().unwrap().contains("WAITING"));
                if waiting {
                    let out =
                        support::pgreplica(&["conflicts", &conf(set), "--resolve", &id, winner]);
                    assert!(out.status.success(), "{}", support::text(&out));
                }
            }
        }
    }
    assert!(rounds >= 2, "each side stopped at least once");
    converged_as(&nodes, NODE_0_WINS).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_cut_off_while_both_sides_write_catches_up_when_it_returns() {
    let mut nodes = Nodes::start(2).await;
    let silent = Arc::new(AtomicBool::new(false));
    let port = support::proxy::proxy(nodes.clusters[1].port, silent.clone(), true).await;
    nodes.via.push((1, port));
    nodes.link(0, &[1], "");
    nodes.link(1, &[0], "");
    let mut daemon = nodes.spawn();
    for n in 0..2 {
        let sql = format!("INSERT INTO items VALUES ({}, 0, 'before')", 5000 + n);
        nodes.client(n).await.batch_execute(&sql).await.unwrap();
    }
    nodes.converge(Duration::from_secs(20)).await;
    // The registries are written after each batch commits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = [nodes.applied(0).await, nodes.applied(1).await];
    silent.store(true, Ordering::Relaxed);
    let changed = write_everywhere(&nodes, 10).await;
    // Node 0 keeps its changes for node 1, and says how many wait (under
    // WAL capture, how much WAL its slot keeps for it).
    let out = support::pgreplica(&["status", "--json", &nodes.confs[0].display().to_string()]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let waiting = match nodes.wal {
        true => status[0]["wal_kept_bytes"].as_i64().unwrap_or(0),
        false => status[0]["events_waiting"].as_i64().unwrap_or(0),
    };
    assert!(waiting > 0, "{status}");
    silent.store(false, Ordering::Relaxed);
    applied_exactly(&nodes, &[before[0] + changed[0], before[1] + changed[1]]).await;
    daemon.terminate();
}

#[tokio::test(flavor = "multi_thread")]
async fn pyreplica_skip_user_keeps_two_unnamed_nodes_from_looping() {
    let mut nodes = Nodes::start(2).await;
    nodes.named = false;
    nodes.link(0, &[1], "SKIP_USER=pyreplica\n");
    nodes.link(1, &[0], "SKIP_USER=pyreplica\n");
    let mut daemon = nodes.spawn();
    let changed = write_everywhere(&nodes, 5).await;
    applied_exactly(&nodes, &changed).await;
    daemon.terminate();
}

const TICKETS: &str = "SELECT * FROM tickets ORDER BY id";

#[tokio::test(flavor = "multi_thread")]
async fn a_promoted_slave_never_hands_out_an_id_the_master_used() {
    let mut nodes = Nodes::start(2).await;
    nodes.named = false;
    nodes.link(0, &[1], "");
    nodes
        .client(0)
        .await
        .batch_execute("INSERT INTO tickets (note) SELECT 'm' FROM generate_series(1, 50)")
        .await
        .unwrap();
    nodes.sync();
    // The master is lost; the slave takes the writes.
    let slave = nodes.client(1).await;
    let id: i32 = slave
        .query_one(
            "INSERT INTO tickets (note) VALUES ('after') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(id, 51);
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_with_disjoint_sequence_ranges_insert_concurrently_without_conflicts() {
    let mut nodes = Nodes::start(2).await;
    nodes.link(0, &[1], "CONFLICT=stop\n");
    nodes.link(1, &[0], "CONFLICT=stop\n");
    nodes
        .client(0)
        .await
        .batch_execute("INSERT INTO tickets (note) SELECT 'before' FROM generate_series(1, 10)")
        .await
        .unwrap();
    nodes.sync();
    for n in 0..2 {
        let conf = nodes.confs[n].display().to_string();
        let range = format!("{}/2", n + 1);
        let out = support::pgreplica(&["install", &conf, "--sequences", &range]);
        let said = support::text(&out);
        assert!(out.status.success(), "{said}");
        assert!(
            said.contains("tickets_id_seq") && said.contains(&format!("node {} of 2", n + 1)),
            "{said}"
        );
    }
    let mut daemon = nodes.spawn();
    let mut writers = Vec::new();
    for n in 0..2 {
        let client = nodes.client(n).await;
        writers.push(tokio::spawn(async move {
            for _ in 0..100 {
                client
                    .execute("INSERT INTO tickets (note) VALUES ('x')", &[])
                    .await
                    .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let start = std::time::Instant::now();
    loop {
        let a = pgreplica::demo::copy_out(&nodes.client(0).await, TICKETS)
            .await
            .unwrap();
        let b = pgreplica::demo::copy_out(&nodes.client(1).await, TICKETS)
            .await
            .unwrap();
        if a == b && a.iter().filter(|&&c| c == b'\n').count() == 210 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{}", nodes.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    daemon.terminate();
    assert!(!nodes.log().contains("conflict:"), "{}", nodes.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_change_through_execute_reaches_the_other_node_once() {
    let mut nodes = Nodes::start(2).await;
    nodes.link(0, &[1], "");
    nodes.link(1, &[0], "");
    for n in 0..2 {
        let sql = format!("INSERT INTO items VALUES ({n}, 1, 'before')");
        nodes.client(n).await.batch_execute(&sql).await.unwrap();
    }
    nodes.sync();
    let conf = nodes.confs[0].display().to_string();
    let out = support::pgreplica(&["execute", &conf, "ALTER TABLE items ADD COLUMN extra text"]);
    assert!(out.status.success(), "{}", support::text(&out));
    // Node 1 writes before and after it has the column from node 0.
    nodes
        .client(1)
        .await
        .batch_execute("UPDATE items SET qty = 2 WHERE id = 1")
        .await
        .unwrap();
    nodes.sync();
    for n in 0..2 {
        let sql = format!("INSERT INTO items VALUES ({}, 3, 'after', 'n{n}')", 10 + n);
        nodes.client(n).await.batch_execute(&sql).await.unwrap();
    }
    nodes.sync();
    nodes.sync();
    let everything = "SELECT * FROM items ORDER BY id";
    let a = pgreplica::demo::copy_out(&nodes.client(0).await, everything)
        .await
        .unwrap();
    let b = pgreplica::demo::copy_out(&nodes.client(1).await, everything)
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&a), String::from_utf8_lossy(&b));
    assert_eq!(
        String::from_utf8_lossy(&a),
        "0\t1\tbefore\t\\N\n1\t2\tbefore\t\\N\n10\t3\tafter\tn0\n11\t3\tafter\tn1\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cloning_a_node_sends_nothing_back_to_its_master() {
    let mut nodes = Nodes::start(2).await;
    nodes.link(0, &[1], "");
    nodes.link(1, &[0], "");
    nodes
        .client(0)
        .await
        .batch_execute(
            "INSERT INTO items SELECT g, g, 'from node 0' FROM generate_series(1, 100000) g",
        )
        .await
        .unwrap();
    // Node 1 captures too: its copy (in parts) and the emptying before it are
    // logged there with node 0 as their origin.
    let conf = nodes.confs[0].display().to_string();
    let out = support::pgreplica(&["clone", &conf, "--jobs", "2", "--split-mb", "1"]);
    assert!(out.status.success(), "{}", support::text(&out));
    nodes
        .client(1)
        .await
        .batch_execute("INSERT INTO items VALUES (500000, 1, 'from node 1')")
        .await
        .unwrap();
    nodes.sync();
    nodes.converge(Duration::from_secs(10)).await;
    assert_eq!(
        nodes.applied(1).await,
        1,
        "only node 1's own row went to node 0"
    );
}
