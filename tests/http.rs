//! The HTTP listener: /metrics, /status and the status page.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{Daemon, Setup};

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, name text, qty int)";
const ALL: &str = "SELECT * FROM items ORDER BY id";

/// `pgreplica run --http` on a free loopback port.
fn serving(s: &Setup) -> (Daemon, u16) {
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
    (Daemon(child), port)
}

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
    let (_daemon, port) = serving(&s);
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

/// Debian's Chromium, which the browser test needs.
fn chromium() -> std::path::PathBuf {
    let path = std::path::PathBuf::from("/usr/bin/chromium");
    assert!(
        path.exists(),
        "the status page test needs Chromium: apt-get install -y chromium"
    );
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_renders_the_slaves_in_a_real_browser() {
    let s = Setup::new(1, ITEMS).await;
    let (_daemon, port) = serving(&s);
    s.arrives("INSERT INTO items VALUES (1, 'one', 1)", ALL)
        .await;
    let dir = std::env::temp_dir().join(format!("pgreplica-browser-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let shot = dir.join("status.png");
    let url = format!("http://127.0.0.1:{port}/");
    let browser = |extra: &[&str]| {
        Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ])
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .args(["--virtual-time-budget=5000", "--window-size=1200,400"])
            .args(extra)
            .arg(&url)
            .output()
            .unwrap()
    };
    // The DOM after the page's script has read /status.
    let dom = browser(&["--dump-dom"]);
    let dom = String::from_utf8_lossy(&dom.stdout);
    for part in [
        "<td>app</td>",
        "class=\"running\">running</td>",
        "<svg",
        "updated ",
    ] {
        assert!(dom.contains(part), "the page shows {part}:\n{dom}");
    }
    // And a screenshot of it, kept for a look.
    let out = browser(&[&format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot)
        .unwrap_or_else(|_| panic!("no screenshot:\n{}", String::from_utf8_lossy(&out.stderr)));
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5000,
        "{} bytes",
        png.len()
    );
    println!("screenshot of the status page: {}", shot.display());
}
