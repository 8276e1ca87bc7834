//! Running as a service: start/stop with a pidfile, status of the running
//! daemon, SIGHUP reload and log reopening, systemd notifications.

mod support;

use pgreplica::capture;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{Daemon, Setup, connect, count, pgreplica, text};

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, name text, qty int)";
const ALL: &str = "SELECT * FROM items ORDER BY id";

fn folder(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pgreplica-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn start_refuses_a_second_daemon_status_finds_it_and_stop_ends_it() {
    let s = Setup::new(1, ITEMS).await;
    let dir = folder("service");
    let pidfile = dir.join("pgreplica.pid");
    let logfile = dir.join("pgreplica.log");
    let (pid_arg, log_arg) = (pidfile.to_str().unwrap(), logfile.to_str().unwrap());
    let conf = s.conf.to_str().unwrap();
    // A pidfile left by a crash (its process is gone) is detected and replaced.
    std::fs::write(&pidfile, "999999\n").unwrap();

    let out = pgreplica(&["start", "--pidfile", pid_arg, "--logfile", log_arg, conf]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("stale pidfile"), "{}", text(&out));
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(text(&out).contains(&format!("started (pid {pid})")));

    let again = pgreplica(&["start", "--pidfile", pid_arg, "--logfile", log_arg, conf]);
    assert!(!again.status.success());
    assert!(
        text(&again).contains(&format!("already running (pid {pid}")),
        "{}",
        text(&again)
    );

    s.arrives("INSERT INTO items VALUES (1, 'one', 1)", ALL)
        .await;

    let status = pgreplica(&["status", "--json", "--pidfile", pid_arg]);
    assert!(status.status.success(), "{}", text(&status));
    assert!(
        text(&status).contains("\"set\": \"app\"") && text(&status).contains("\"running\""),
        "{}",
        text(&status)
    );

    let out = pgreplica(&["stop", "--pidfile", pid_arg]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("pgreplica (pid {pid}) stopped")),
        "{}",
        text(&out)
    );
    assert!(!pidfile.exists(), "the daemon removed its pidfile");
    // Gone (or a zombie until its new parent reaps it: no command line left).
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(cmdline.is_empty(), "the daemon's process ended");
    let log = std::fs::read_to_string(&logfile).unwrap();
    assert!(
        log.contains("starting: master") && log.contains("stopped"),
        "{log}"
    );
    let out = pgreplica(&["stop", "--pidfile", pid_arg]);
    assert!(text(&out).contains("not running"), "{}", text(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_starts_added_sets_stops_removed_ones_and_reopens_the_log() {
    let s = Setup::new(1, ITEMS).await;
    let dir = folder("reload");
    let conf_dir = dir.join("conf.d");
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::copy(&s.conf, conf_dir.join("app.conf")).unwrap();
    let logfile = dir.join("pgreplica.log");
    let notify = UnixDatagram::bind(dir.join("notify.sock")).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();

    let child = Command::new(env!("CARGO_BIN_EXE_pgreplica"))
        .args(["run", "--config-dir", conf_dir.to_str().unwrap()])
        .args(["--logfile", logfile.to_str().unwrap()])
        .env("NOTIFY_SOCKET", dir.join("notify.sock"))
        .env("WATCHDOG_USEC", "200000")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut daemon = Daemon(child);
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !(seen.iter().any(|m| m == "READY=1") && seen.iter().any(|m| m == "WATCHDOG=1")) {
        let n = notify.recv(&mut buf).expect("systemd notifications");
        seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }

    // A second set (database app2 on both servers) appears in the folder.
    for pg in std::iter::once(&s.master).chain(&s.slaves) {
        let admin = connect(&pg.dsn("postgres")).await;
        admin.batch_execute("CREATE DATABASE app2").await.unwrap();
        connect(&pg.dsn("app2"))
            .await
            .batch_execute(ITEMS)
            .await
            .unwrap();
    }
    let mut m2 = connect(&s.master.dsn("app2")).await;
    capture::install(&mut m2, &[], None).await.unwrap();
    std::fs::write(
        conf_dir.join("app2.conf"),
        format!(
            "[MAIN]\nNAME=app2\nDSN0={}\nDSN1={}\n",
            s.master.dsn("app2"),
            s.slaves[0].dsn("app2")
        ),
    )
    .unwrap();
    // logrotate moves the log away, then signals.
    std::fs::rename(&logfile, dir.join("pgreplica.log.1")).unwrap();
    hangup(&daemon);

    m2.batch_execute("INSERT INTO items VALUES (1, 'two', 2)")
        .await
        .unwrap();
    let s2 = connect(&s.slaves[0].dsn("app2")).await;
    wait_until(|| async { count(&s2, "items").await == 1 }).await;
    let log = std::fs::read_to_string(&logfile).unwrap_or_default();
    assert!(
        log.contains("SIGHUP: reloading 2 set(s)"),
        "the log was reopened:\n{log}"
    );

    // Set app leaves the folder: it stops, app2 carries on.
    std::fs::remove_file(conf_dir.join("app.conf")).unwrap();
    hangup(&daemon);
    wait_until(|| async {
        std::fs::read_to_string(&logfile)
            .unwrap_or_default()
            .contains("set app: its file is gone, stopping it")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.master()
        .await
        .batch_execute("INSERT INTO items VALUES (5, 'not replicated now', 5)")
        .await
        .unwrap();
    m2.batch_execute("INSERT INTO items VALUES (2, 'two', 2)")
        .await
        .unwrap();
    wait_until(|| async { count(&s2, "items").await == 2 }).await;
    assert_eq!(count(&s.slave(0).await, "items").await, 0);
    assert!(daemon.terminate().success());
    let _ = std::fs::remove_dir_all(&dir);
}

fn hangup(daemon: &Daemon) {
    // SAFETY: kill only sends a signal to our own child process.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGHUP) };
}

async fn wait_until<F, Fut>(condition: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !condition().await {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn started_as_root_it_runs_as_the_given_user() {
    let s = Setup::new(1, ITEMS).await;
    let conf = s.conf.to_str().unwrap();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let out = pgreplica(&["run", "--once", "--user", "postgres", conf]);
        assert!(
            text(&out).contains("only root can change user"),
            "{}",
            text(&out)
        );
        return;
    }
    // USER= in the file, as the flag --user would; the pidfile and the log in
    // folders that do not exist yet and that root alone could write.
    s.configure("USER=postgres\n");
    let dir = folder("as-user");
    let pidfile = dir.join("run").join("pgreplica.pid");
    let logfile = dir.join("log").join("pgreplica.log");
    let child = Command::new(env!("CARGO_BIN_EXE_pgreplica"))
        .args(["run", "--pidfile", pidfile.to_str().unwrap()])
        .args(["--logfile", logfile.to_str().unwrap(), conf])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut daemon = Daemon(child);
    s.arrives("INSERT INTO items VALUES (1, 'one', 1)", ALL)
        .await;
    let proc = format!("/proc/{}", daemon.0.id());
    let status = std::fs::read_to_string(format!("{proc}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let postgres = Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .unwrap();
    let postgres = String::from_utf8_lossy(&postgres.stdout).trim().to_string();
    assert!(
        uid.split_whitespace().skip(1).all(|u| u == postgres),
        "runs as postgres ({postgres}): {uid}"
    );
    // Its environment is the user's: libpq's ~/.pgpass and ~/.postgresql/ are
    // its own (as the daemon's environment says in its log).
    let home = Command::new("sh")
        .args(["-c", "getent passwd postgres | cut -d: -f6"])
        .output()
        .unwrap();
    let home = String::from_utf8_lossy(&home.stdout).trim().to_string();
    let log = std::fs::read_to_string(&logfile).unwrap();
    assert!(
        log.contains(&format!("running as user postgres (HOME {home})")),
        "{log}"
    );
    // The log belongs to the user: after logrotate moved it away, SIGHUP
    // makes a new one.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&logfile).unwrap().uid().to_string(),
        postgres
    );
    std::fs::rename(&logfile, dir.join("log").join("pgreplica.log.1")).unwrap();
    hangup(&daemon);
    wait_until(|| async { logfile.exists() }).await;
    assert!(daemon.terminate().success());
    assert!(!pidfile.exists(), "the daemon removed its pidfile at exit");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_signals_only_the_daemon_that_holds_the_pidfile() {
    let dir = folder("not-ours");
    let pidfile = dir.join("pgreplica.pid");
    // A process whose command line names pgreplica (an editor on a config file,
    // say), with its pid in a pidfile that no daemon holds.
    let mut other = Command::new("sh")
        .args(["-c", "sleep 60", "pgreplica.conf"])
        .spawn()
        .unwrap();
    std::fs::write(&pidfile, format!("{}\n", other.id())).unwrap();
    let out = pgreplica(&["stop", "--pidfile", pidfile.to_str().unwrap()]);
    assert!(text(&out).contains("not running"), "{}", text(&out));
    assert!(
        other.try_wait().unwrap().is_none(),
        "the other process was left alone"
    );
    let _ = other.kill();
    let _ = other.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
