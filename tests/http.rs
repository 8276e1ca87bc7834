//! The HTTP listener: /metrics, /status and the status page.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{Daemon, Setup};

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, name text, qty int)";
const ALL: &str = "SELECT * FROM items ORDER BY id";

/// GET `path`; the status line and the body.
fn get(port: u16, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_status_and_page_are_served() {
    let s = Setup::new(1, ITEMS).await;
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_pgreplica"))
        .args(["run", "--http", &format!("127.0.0.1:{port}")])
        .arg(&s.conf)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _daemon = Daemon(child);
    s.arrives(
        "INSERT INTO items SELECT g, 'x', g FROM generate_series(1, 10) g",
        ALL,
    )
    .await;

    // The figures follow the batches; lag gauges follow the lag checks.
    let start = Instant::now();
    let metrics = loop {
        let (status, body) = get(port, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        if body.contains("pgreplica_events_applied_total{set=\"app\",slave=\"1\"} 10") {
            break body;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for line in [
        "# TYPE pgreplica_batches_total counter",
        "pgreplica_conflicts_total{set=\"app\",slave=\"1\"} 0",
        "# TYPE pgreplica_batch_apply_seconds histogram",
        "pgreplica_batch_apply_seconds_bucket{set=\"app\",slave=\"1\",le=\"+Inf\"}",
    ] {
        assert!(metrics.contains(line), "{line}:\n{metrics}");
    }

    let (status, body) = get(port, "/status");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json[0]["set"], "app");
    assert_eq!(json[0]["state"], "running");

    let (status, page) = get(port, "/");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(page.contains("<title>pgreplica</title>") && page.contains("fetch('/status'"));
    assert_eq!(get(port, "/nothing").0, "HTTP/1.1 404 Not Found");
}
