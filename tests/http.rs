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

/// `serving`, once ten rows inserted on the master reached the slave.
async fn serving_ten_rows(s: &Setup) -> (Daemon, u16) {
    let served = serving(s);
    s.arrives(
        "INSERT INTO items SELECT g, 'x', g FROM generate_series(1, 10) g",
        ALL,
    )
    .await;
    served
}

/// GET `path`; the status line and the body.
fn get(port: u16, path: &str) -> (String, String) {
    get_with(port, path, "")
}

/// GET `path` with extra header lines.
fn get_with(port: u16, path: &str, headers: &str) -> (String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_status_and_page_are_served() {
    let s = Setup::new(1, ITEMS).await;
    let (_daemon, port) = serving_ten_rows(&s).await;

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
    assert!(page.contains("<title>pgreplica</title>") && page.contains("fetch('/status/page'"));
    let (status, body) = get(port, "/status/page");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["sets"][0]["capture"], "trigger");
    assert_eq!(json["sets"][0]["slaves"][0]["tables"][0][1], 10);
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
async fn the_status_page_draws_charts_tables_conflicts_and_the_graph_in_a_real_browser() {
    let s = Setup::new(2, ITEMS).await;
    // Slave 2 lacks the table: it stops on an error, and the page says so first.
    s.slave(1)
        .await
        .batch_execute("DROP TABLE items")
        .await
        .unwrap();
    // Conflicts are settled and remembered; the lag is sampled every second.
    s.configure("CONFLICT=apply-remote\nLAG_WARNING=2\n");
    let (_daemon, port) = serving(&s);
    s.arrives(
        "INSERT INTO items SELECT g, 'one', g FROM generate_series(1, 20) g",
        ALL,
    )
    .await;
    s.slave(0)
        .await
        .batch_execute("UPDATE items SET name = 'changed on the slave' WHERE id = 7")
        .await
        .unwrap();
    s.arrives(
        "UPDATE items SET name = 'changed on the master' WHERE id = 7",
        ALL,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let dir = std::env::temp_dir().join(format!("pgreplica-browser-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("http://127.0.0.1:{port}/");
    let browser = |size: &str, extra: &[&str]| {
        Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .arg("--virtual-time-budget=5000")
            .arg(format!("--window-size={size}"))
            .args(extra)
            .arg(&url)
            .output()
            .unwrap()
    };
    // The DOM after the page's script has read /status/page.
    let dom = browser("1200,900", &["--dump-dom"]);
    let dom = String::from_utf8_lossy(&dom.stdout);
    for part in [
        "app: 2 slaves, 1 running, 1 stopped, 0 lagging",
        "<td>app</td>",
        "class=\"running\">running</td>",
        "capture: trigger",
        // A chart per figure, with its unit and time axis.
        "class=\"chart\"",
        "lag (s)",
        "events waiting (events)",
        "applied (events/s)",
        // The last five minutes: the daemon has not run longer.
        "-5 min",
        ">now<",
        "class=\"line\"",
        // Per-table activity, the conflict (no row values without the token),
        // the stopped slave's error, and the graph of the nodes.
        "<td>\"public\".\"items\"</td><td class=\"n\">21</td>",
        "conflict: update of a row changed on both sides on table",
        "missing on the slave: create it there",
        "class=\"graph\"",
        "app@127.0.0.1",
        "marker-end",
        "updated ",
    ] {
        assert!(dom.contains(part), "the page shows {part}:\n{dom}");
    }
    assert!(
        !dom.contains("changed on the slave"),
        "row values without the token:\n{dom}"
    );
    let (stopped, running) = (dom.find(">stopped</td>"), dom.find(">running</td>"));
    assert!(
        stopped.is_some() && stopped < running,
        "the stopped slave comes first:\n{dom}"
    );
    // Screenshots at a normal and at a phone's width, kept for a look.
    for (name, size) in [
        ("status.png", "1200,1400"),
        ("status-narrow.png", "400,2400"),
    ] {
        let shot = dir.join(name);
        let out = browser(size, &[&format!("--screenshot={}", shot.display())]);
        let png = std::fs::read(&shot)
            .unwrap_or_else(|_| panic!("no screenshot:\n{}", String::from_utf8_lossy(&out.stderr)));
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 5000,
            "{} bytes",
            png.len()
        );
        println!("screenshot of the status page: {}", shot.display());
    }
}

const TOKEN: &str = "0123456789abcdef-test-token";

/// A free port, and the daemon listening on it on every address with `lines`
/// in its file; its log file.
fn serving_everywhere(s: &Setup, lines: &str) -> (Daemon, u16, std::path::PathBuf) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    s.configure(&format!("HTTP=0.0.0.0:{port}\n{lines}"));
    let log = s.dir.join("http-daemon.log");
    let daemon = support::spawn_run(std::slice::from_ref(&s.conf), &log);
    listening(port);
    (daemon, port, log)
}

/// Waits until the daemon listens on `port`.
fn listening(port: u16) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn off_loopback_a_token_is_required_and_row_values_need_it() {
    let s = Setup::new(1, ITEMS).await;
    // Without a token the daemon refuses to listen for other machines.
    s.configure("HTTP=0.0.0.0:1\n");
    let out =
        support::pgreplica_within(&["run", s.conf.to_str().unwrap()], Duration::from_secs(30))
            .expect("the daemon refuses to start");
    assert!(!out.status.success());
    assert!(
        support::text(&out).contains("set HTTP_TOKEN"),
        "{}",
        support::text(&out)
    );
    let text = std::fs::read_to_string(&s.conf)
        .unwrap()
        .replace("HTTP=0.0.0.0:1\n", "");
    std::fs::write(&s.conf, text).unwrap();

    let (mut daemon, port, log) =
        serving_everywhere(&s, &format!("HTTP_TOKEN={TOKEN}\nHTTP_METRICS_OPEN=true\n"));
    // A row the slave already has stops it: its error names the key.
    s.slave(0)
        .await
        .batch_execute("INSERT INTO items VALUES (7, 'already here', 0)")
        .await
        .unwrap();
    s.master()
        .await
        .batch_execute("INSERT INTO items VALUES (7, 'seven', 7)")
        .await
        .unwrap();
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let start = Instant::now();
    let whole = loop {
        let (status, body) = get_with(port, "/status", &auth);
        assert_eq!(status, "HTTP/1.1 200 OK");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        if json[0]["state"] == "stopped" {
            break json[0]["last_error"].as_str().unwrap().to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(whole.contains("(id)=(7)"), "{whole}");
    // Without the token: no status; metrics, as the file allows.
    let (status, _) = get(port, "/status");
    assert_eq!(status, "HTTP/1.1 401 Unauthorized");
    let (status, _) = get_with(
        port,
        "/status",
        "Authorization: Bearer wrong-token-wrong-token\r\n",
    );
    assert_eq!(status, "HTTP/1.1 401 Unauthorized");
    assert_eq!(get(port, "/metrics").0, "HTTP/1.1 200 OK");
    daemon.terminate();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!logged.contains(TOKEN), "the token is never logged");

    // On loopback without a token, the status hides the row's values.
    let text: String = std::fs::read_to_string(&s.conf)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("HTTP"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&s.conf, text).unwrap();
    let (_daemon, port) = serving(&s);
    listening(port);
    let start = Instant::now();
    loop {
        let (_, body) = get(port, "/status");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        if json[0]["state"] == "stopped" {
            let bare = json[0]["last_error"].as_str().unwrap();
            assert!(bare.contains("event") && !bare.contains("(7)"), "{bare}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_comes_from_the_daemon_and_idle_clients_cannot_block_it() {
    let s = Setup::new(1, ITEMS).await;
    let (_daemon, port) = serving_ten_rows(&s).await;
    // Hundreds of clients connect and never send a request.
    let idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    // Replication goes on, and the listener still answers.
    s.arrives(
        "INSERT INTO items SELECT g, 'y', g FROM generate_series(11, 20) g",
        ALL,
    )
    .await;
    assert_eq!(get(port, "/metrics").0, "HTTP/1.1 200 OK");
    // With the master gone, /status still answers from what the daemon knows.
    s.master.stop("immediate").unwrap();
    let (status, body) = get(port, "/status");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json[0]["events_applied"], 20, "{body}");
    assert_ne!(json[0]["state"], "unknown", "{body}");
    drop(idle);
}
