//! How the daemon runs as a process: logging, signals, systemd, and the
//! `start` and `stop` commands around a background `run`.

use super::args::{SetFiles, sets_file};
use anyhow::{Context, Result, bail};
use pgreplica::Config;
use pgreplica::service::{self, LogFile};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

pub fn init_logging(level: u8) {
    init_logging_to(level, false, None);
}

/// Logs to standard error, or to `file`; as JSON lines with `json`.
pub fn init_logging_to(level: u8, json: bool, file: Option<LogFile>) {
    let default = match level {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("pgreplica={default},warn"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match (file, json) {
        (Some(file), true) => builder.json().with_writer(file).init(),
        (Some(file), false) => builder.with_writer(file).with_ansi(false).init(),
        (None, true) => builder.json().with_writer(std::io::stderr).init(),
        (None, false) => builder
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
    }
}

/// On SIGHUP: reopens the log file and sends the sets, read again, to the daemon.
pub fn reload_on_hangup(
    sets: SetFiles,
    log: Option<LogFile>,
    pidfile: Option<PathBuf>,
    running: watch::Sender<Vec<Config>>,
) -> mpsc::Receiver<Vec<Config>> {
    let (tx, rx) = mpsc::channel(4);
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hangup.recv().await.is_some() {
            if let Some(log) = &log
                && let Err(e) = log.reopen()
            {
                tracing::error!("cannot reopen the log file: {e}");
            }
            match sets.load() {
                Ok(new) => {
                    tracing::info!("SIGHUP: reloading {} set(s)", new.len());
                    if let Some(pidfile) = &pidfile {
                        write_sets_file(pidfile, &new);
                    }
                    let _ = running.send(new.clone());
                    let _ = tx.send(new).await;
                }
                Err(e) => tracing::error!("SIGHUP: reload refused, the sets carry on: {e:#}"),
            }
        }
    });
    #[cfg(not(unix))]
    let _ = (sets, log, pidfile, running, &tx);
    rx
}

pub fn write_sets_file(pidfile: &Path, sets: &[Config]) {
    let list: Vec<String> = sets
        .iter()
        .filter_map(|s| std::path::absolute(&s.path).ok())
        .map(|p| p.display().to_string())
        .collect();
    if let Err(e) = std::fs::write(sets_file(pidfile), list.join("\n")) {
        tracing::warn!("cannot write {}: {e}", sets_file(pidfile).display());
    }
}

/// Tells systemd we are ready, and keeps its watchdog fed while the runtime runs.
pub fn notify_systemd() {
    service::notify("READY=1");
    if let Some(every) = service::watchdog_interval() {
        tokio::spawn(async move {
            loop {
                service::notify("WATCHDOG=1");
                tokio::time::sleep(every).await;
            }
        });
    }
}

/// Turns true on SIGINT or SIGTERM.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down: finishing the batches in hand");
        let _ = tx.send(true);
    });
    rx
}

/// `start`: checks, then runs `pgreplica run --pidfile --logfile` detached.
pub fn start(
    pidfile: &Path,
    logfile: &Path,
    user: Option<&str>,
    http: Option<std::net::SocketAddr>,
    sets: &SetFiles,
) -> Result<bool> {
    match service::running(pidfile) {
        (Some(pid), _) => bail!(
            "pgreplica is already running (pid {pid}, pidfile {})",
            pidfile.display()
        ),
        (None, true) => println!(
            "stale pidfile {} (its process is gone): replacing it",
            pidfile.display()
        ),
        (None, false) => {}
    }
    sets.load()?;
    let log = LogFile::open(logfile)
        .with_context(|| format!("opening the log file {}", logfile.display()))?;
    let stderr = log.file_for_child().context("opening the log file")?;
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command
        .arg("run")
        .arg("--pidfile")
        .arg(std::path::absolute(pidfile)?)
        .arg("--logfile")
        .arg(std::path::absolute(logfile)?)
        .args(user.map(|u| ["--user", u]).into_iter().flatten())
        .args(
            http.map(|a| ["--http".to_string(), a.to_string()])
                .into_iter()
                .flatten(),
        )
        .args(sets.args()?)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid is async-signal-safe; it detaches the child from our
        // terminal and process group.
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
    }
    let mut child = command.spawn().context("starting the daemon")?;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the daemon ended at once ({status}): see {}",
                logfile.display()
            );
        }
        if service::running(pidfile).0 == Some(child.id()) {
            println!(
                "pgreplica started (pid {}), logging to {}, pidfile {}",
                child.id(),
                logfile.display(),
                pidfile.display()
            );
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "the daemon (pid {}) did not write its pidfile in time: see {}",
        child.id(),
        logfile.display()
    )
}

/// `stop`: SIGTERM, then waits for the daemon to finish its batches.
pub async fn stop(pidfile: &Path, timeout: Duration) -> Result<bool> {
    let pid = match service::running(pidfile) {
        (Some(pid), _) => pid,
        (None, stale) => {
            if stale {
                std::fs::remove_file(pidfile)?;
                println!(
                    "pgreplica is not running; removed the stale pidfile {}",
                    pidfile.display()
                );
            } else {
                println!(
                    "pgreplica is not running (no pidfile {})",
                    pidfile.display()
                );
            }
            return Ok(true);
        }
    };
    #[cfg(unix)]
    // SAFETY: kill sends a signal; `pid` is the daemon that holds the
    // pidfile's lock, which only a running daemon does.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let started = std::time::Instant::now();
    while service::running(pidfile).0 == Some(pid) {
        if started.elapsed() >= timeout {
            println!(
                "pgreplica (pid {pid}) is still running after {}s, finishing its batches; \
                 wait, or end it with kill -9 {pid} (nothing is lost: batches commit whole)",
                timeout.as_secs()
            );
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "pgreplica (pid {pid}) stopped after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(true)
}
