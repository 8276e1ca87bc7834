//! The shipped Prometheus rules (`contrib/prometheus/`), checked by promtool and
//! evaluated by a real Prometheus that scrapes a real daemon.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::smtp::free_port;
use support::{Setup, text};

const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/contrib/prometheus/pgreplica-rules.yml"
);

/// The body of GET `path` on loopback `port`, `None` while nothing answers.
fn get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response.split_once("\r\n\r\n")?.1.to_string())
}

/// A Prometheus that scrapes the daemon on `target` every second with the
/// shipped rules; killed when dropped.
struct Prometheus(Child, u16);

impl Prometheus {
    fn start(dir: &Path, target: u16) -> Prometheus {
        let port = free_port();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 rule_files: ['{RULES}']\n\
                 scrape_configs:\n  - job_name: pgreplica\n    static_configs: [{{targets: ['127.0.0.1:{target}']}}]\n"
            ),
        )
        .unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Prometheus is needed: apt-get install prometheus (scripts/test installs it)");
        Prometheus(child, port)
    }

    /// Whether the alert is firing now.
    fn firing(&self, alert: &str) -> bool {
        let Some(body) = get(self.1, "/api/v1/alerts") else {
            return false;
        };
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        json["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["labels"]["alertname"] == alert && a["state"] == "firing")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[test]
fn promtool_accepts_the_shipped_rules() {
    let out = Command::new("promtool")
        .args(["check", "rules", RULES])
        .output()
        .expect("promtool is needed: apt-get install prometheus (scripts/test installs it)");
    assert!(out.status.success(), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_slave_stopped_alert_fires_and_clears() {
    let s = Setup::new(1, "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    s.sync();
    let port = free_port();
    s.configure(&format!("HTTP=127.0.0.1:{port}\n"));
    let _daemon = support::spawn_run(std::slice::from_ref(&s.conf), &s.dir.join("daemon.log"));
    let prometheus = Prometheus::start(&s.dir, port);
    until(
        "Prometheus sees the slave running",
        Duration::from_secs(60),
        || {
            get(prometheus.1, "/api/v1/query?query=pgreplica_slave_running")
                .is_some_and(|b| b.contains("\"1\"]"))
        },
    )
    .await;
    assert!(!prometheus.firing("PgreplicaSlaveStopped"));
    // A row the slave already has stops it.
    s.slave(0)
        .await
        .batch_execute("INSERT INTO t VALUES (7, 'already here')")
        .await
        .unwrap();
    s.master()
        .await
        .batch_execute("INSERT INTO t VALUES (7, 'seven')")
        .await
        .unwrap();
    until("the alert fires", Duration::from_secs(90), || {
        prometheus.firing("PgreplicaSlaveStopped")
    })
    .await;
    s.slave(0)
        .await
        .batch_execute("DELETE FROM t WHERE id = 7")
        .await
        .unwrap();
    until("the alert clears", Duration::from_secs(120), || {
        !prometheus.firing("PgreplicaSlaveStopped")
    })
    .await;
    s.assert_same(0, "SELECT * FROM t ORDER BY id").await;
}
