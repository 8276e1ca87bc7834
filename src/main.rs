//! pgreplica's command line: parses arguments, calls the library, prints, exits.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use pgreplica::metrics::Metrics;
use pgreplica::service::{self, LogFile};
use pgreplica::{
    Config, capture, check, clone, conflict, daemon, db, demo, http, sequence, status,
};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

#[derive(Parser)]
#[command(
    name = "pgreplica",
    version,
    about = "Trigger-based asynchronous replication for PostgreSQL"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install capture on a master and attach it to tables (safe to run again)
    Install {
        /// A set's config file: its master (DSN0), and the capture options of
        /// its [TABLE] sections
        config: Option<PathBuf>,
        /// The master's connection string (instead of a config file)
        #[arg(long, conflicts_with = "config", required_unless_present = "config")]
        dsn: Option<String>,
        /// Attach only this table (schema.name); repeatable. Default: every table with a primary key
        #[arg(long = "table")]
        tables: Vec<String>,
        /// Multi-master: this node is number K of N; its sequences hand out only
        /// the values K modulo N (INCREMENT BY N)
        #[arg(long, value_name = "K/N")]
        sequences: Option<String>,
    },
    /// Remove capture from a master: triggers, log and registry
    Uninstall {
        /// The master's connection string
        #[arg(long)]
        dsn: String,
    },
    /// Replicate the sets of these config files in the foreground until
    /// SIGINT/SIGTERM (SIGHUP reloads the files and reopens the log file)
    Run {
        /// Apply everything committed so far, then exit (non-zero if a slave failed)
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        service: Service,
        #[command(flatten)]
        sets: Sets,
    },
    /// Start the daemon in the background (pidfile, log file)
    Start {
        #[command(flatten)]
        service: Service,
        #[command(flatten)]
        sets: Sets,
    },
    /// Stop the background daemon gracefully (SIGTERM, then wait)
    Stop {
        /// The daemon's pidfile (default as for start)
        #[arg(long)]
        pidfile: Option<PathBuf>,
        /// Seconds to wait for it to finish its batches
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Show each slave's state, waiting events, lag and last error (no file:
    /// every set of the running daemon)
    Status {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
        /// The running daemon's pidfile, to find its sets (default as for start)
        #[arg(long)]
        pidfile: Option<PathBuf>,
        #[command(flatten)]
        sets: Sets,
    },
    /// Copy the replicated tables into the slaves while the master keeps taking
    /// writes, then hand them over to replication (safe to run again)
    Clone {
        /// The set's config file
        config: PathBuf,
        /// Only this slave (the n of DSNn)
        #[arg(long)]
        slave: Option<u32>,
        /// Tables copied at a time
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Tables of at least this many MB are copied in parts, one per job
        #[arg(long, default_value_t = 80)]
        split_mb: i64,
        /// Only this table (schema.name); repeatable. Default: every replicated table
        #[arg(long = "table")]
        tables: Vec<String>,
        /// Empty slave tables that already hold rows (default: refuse them)
        #[arg(long)]
        truncate: bool,
    },
    /// Compare the master and the slaves table by table at one point of the log;
    /// exits 1 when anything differs
    Check {
        /// The set's config file
        config: PathBuf,
        /// Only this table (schema.name); repeatable. Default: every replicated table
        #[arg(long = "table")]
        tables: Vec<String>,
    },
    /// List the conflicts recorded on the slaves, or resolve one that stopped a slave
    Conflicts {
        /// The set's config file
        config: PathBuf,
        /// Only this slave (DSN<n>); needed with --resolve when the set has several
        #[arg(long)]
        slave: Option<u32>,
        /// Resolve conflict ID: keep-local or apply-remote; the slave resumes
        #[arg(long, num_args = 2, value_names = ["ID", "RESOLUTION"])]
        resolve: Option<Vec<String>>,
    },
    /// Run a statement (DDL) on the master and queue it, so that every slave runs
    /// it at the same point between the data changes
    Execute {
        /// The set's config file
        config: PathBuf,
        /// The SQL to run, e.g. 'ALTER TABLE shop.orders ADD COLUMN note text'
        sql: String,
    },
    /// Start two throwaway local servers and replicate between them
    Demo,
}

/// How the daemon runs as a service.
#[derive(clap::Args)]
struct Service {
    /// Pidfile, refused while another daemon holds it (start's default:
    /// /run/pgreplica.pid as root, else ~/.pgreplica/pgreplica.pid; run: none)
    #[arg(long)]
    pidfile: Option<PathBuf>,
    /// Log file, reopened on SIGHUP (start's default: /var/log/pgreplica.log as
    /// root, else ~/.pgreplica/pgreplica.log; run: standard error)
    #[arg(long)]
    logfile: Option<PathBuf>,
    /// Started as root: run as this user once the files are open
    #[arg(long)]
    user: Option<String>,
    /// Serve /metrics, /status and a status page on this address (or HTTP= in [MAIN])
    #[arg(long)]
    http: Option<std::net::SocketAddr>,
}

#[derive(clap::Args, Clone)]
struct Sets {
    /// Read every *.conf file of this folder
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// Config files, one per replication set
    files: Vec<PathBuf>,
}

impl Sets {
    fn load(&self) -> Result<Vec<Config>> {
        let mut sets = match &self.config_dir {
            Some(dir) => Config::load_dir(dir)?,
            None => Vec::new(),
        };
        for file in &self.files {
            sets.push(Config::load(file)?);
        }
        if sets.is_empty() {
            bail!("no replication set: name config files, or a folder with --config-dir");
        }
        Ok(sets)
    }

    fn is_empty(&self) -> bool {
        self.config_dir.is_none() && self.files.is_empty()
    }

    /// The same sets as arguments, with absolute paths.
    fn args(&self) -> Result<Vec<std::ffi::OsString>> {
        let mut args = Vec::new();
        if let Some(dir) = &self.config_dir {
            args.push("--config-dir".into());
            args.push(std::path::absolute(dir)?.into_os_string());
        }
        for file in &self.files {
            args.push(std::path::absolute(file)?.into_os_string());
        }
        Ok(args)
    }
}

/// Where a running daemon lists its config files, for `status` without files.
fn sets_file(pidfile: &std::path::Path) -> PathBuf {
    let mut name = pidfile.as_os_str().to_owned();
    name.push(".sets");
    PathBuf::from(name)
}

fn init_logging(level: u8) {
    init_logging_to(level, false, None);
}

/// Logs to standard error, or to `file`; as JSON lines with `json`.
fn init_logging_to(level: u8, json: bool, file: Option<LogFile>) {
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
fn reload_on_hangup(
    sets: Sets,
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

fn write_sets_file(pidfile: &std::path::Path, sets: &[Config]) {
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
fn notify_systemd() {
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
fn shutdown_signal() -> watch::Receiver<bool> {
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

async fn main_inner(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Install {
            config,
            dsn,
            tables,
            sequences,
        } => {
            init_logging(1);
            let set = config.map(|path| Config::load(&path)).transpose()?;
            let dsn = set
                .as_ref()
                .map(|s| s.master.clone())
                .or(dsn)
                .unwrap_or_default();
            let mut client = db::connect(&dsn, None).await?;
            let reports = capture::install(&mut client, &tables, set.as_ref()).await?;
            for r in &reports {
                match &r.skipped {
                    None => println!("{}: replicated", r.table),
                    Some(why) => println!("{}: skipped: {why}", r.table),
                }
            }
            let replicated = reports.iter().filter(|r| r.skipped.is_none()).count();
            println!("{replicated} of {} tables replicated", reports.len());
            if let Some(spec) = sequences {
                let (node, nodes) = spec
                    .split_once('/')
                    .and_then(|(k, n)| Some((k.parse::<i64>().ok()?, n.parse::<i64>().ok()?)))
                    .filter(|&(k, n)| 1 <= k && k <= n)
                    .context("--sequences takes K/N: this node's number K, from 1 to N nodes")?;
                let changed = sequence::partition(&client, node, nodes).await?;
                for line in &changed {
                    println!("{line}");
                }
                println!("{} sequence(s) changed", changed.len());
            }
            Ok(true)
        }
        Command::Uninstall { dsn } => {
            init_logging(1);
            let client = db::connect(&dsn, None).await?;
            let discarded = capture::uninstall(&client).await?;
            println!(
                "pgreplica removed from {}; {discarded} logged events discarded",
                db::redact(&dsn)
            );
            Ok(true)
        }
        Command::Run {
            once,
            service,
            sets,
        } => {
            let Service {
                pidfile,
                logfile,
                user,
                http,
            } = service;
            let loaded = sets.load()?;
            let logfile = logfile.or_else(|| loaded.iter().find_map(|s| s.logfile.clone()));
            let log = logfile
                .as_deref()
                .map(LogFile::open)
                .transpose()
                .context("opening the log file")?;
            init_logging_to(
                loaded.iter().map(|s| s.debug_level).max().unwrap_or(1),
                loaded.iter().any(|s| s.json_logs),
                log.clone(),
            );
            let _pid = match &pidfile {
                Some(path) => {
                    let pid = service::PidFile::create(path).map_err(anyhow::Error::msg)?;
                    write_sets_file(path, &loaded);
                    Some(pid)
                }
                None => None,
            };
            let user = user.or_else(|| loaded.iter().find_map(|s| s.user.clone()));
            #[cfg(unix)]
            if let Some(user) = &user {
                service::become_user(user).map_err(anyhow::Error::msg)?;
                tracing::info!("running as user {user}");
            }
            let (running, watched) = watch::channel(loaded.clone());
            let metrics = Metrics::default();
            if let Some(addr) = http.or_else(|| loaded.iter().find_map(|s| s.http))
                && !once
            {
                http::serve(addr, watched, metrics.clone())
                    .await
                    .with_context(|| format!("listening for HTTP on {addr}"))?;
            }
            let reloads = reload_on_hangup(sets, log, pidfile.clone(), running);
            notify_systemd();
            let ok = daemon::run(loaded, once, shutdown_signal(), reloads, metrics).await;
            if let Some(path) = &pidfile {
                let _ = std::fs::remove_file(sets_file(path));
            }
            Ok(ok)
        }
        Command::Start {
            service: options,
            sets,
        } => {
            let pidfile = options.pidfile.unwrap_or_else(service::default_pidfile);
            let logfile = options.logfile.unwrap_or_else(service::default_logfile);
            start(
                &pidfile,
                &logfile,
                options.user.as_deref(),
                options.http,
                &sets,
            )
        }
        Command::Stop { pidfile, timeout } => {
            let pidfile = pidfile.unwrap_or_else(service::default_pidfile);
            stop(&pidfile, Duration::from_secs(timeout)).await
        }
        Command::Status {
            json,
            pidfile,
            sets,
        } => {
            let sets = if sets.is_empty() {
                let pidfile = pidfile.unwrap_or_else(service::default_pidfile);
                let list = std::fs::read_to_string(sets_file(&pidfile)).with_context(|| {
                    format!(
                        "no config file given and no running daemon found ({}); \
                         name the config files",
                        sets_file(&pidfile).display()
                    )
                })?;
                let files = list.lines().map(PathBuf::from).collect();
                Sets {
                    config_dir: None,
                    files,
                }
                .load()?
            } else {
                sets.load()?
            };
            init_logging(0);
            let mut all = Vec::new();
            for set in &sets {
                all.extend(status::status(set).await);
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&all).context("writing JSON")?
                );
            } else {
                print_status(&all);
            }
            Ok(all.iter().all(|s| s.state == "running"))
        }
        Command::Clone {
            config,
            slave,
            jobs,
            split_mb,
            tables,
            truncate,
        } => {
            let set = Config::load(&config)?;
            init_logging(set.debug_level.max(1));
            let options = clone::Options {
                slave,
                jobs,
                split_pages: split_mb * 128,
                tables,
                truncate,
            };
            clone::clone(&set, &options).await?;
            Ok(true)
        }
        Command::Check { config, tables } => {
            let set = Config::load(&config)?;
            init_logging(0);
            let differences = check::check(&set, &tables).await?;
            println!("{differences} difference(s)");
            Ok(differences == 0)
        }
        Command::Conflicts {
            config,
            slave,
            resolve,
        } => {
            let set = Config::load(&config)?;
            init_logging(0);
            let slaves: Vec<u32> = match slave {
                Some(n) if set.slaves.contains_key(&n) => vec![n],
                Some(n) => anyhow::bail!("{} has no DSN{n}", config.display()),
                None => set.slaves.keys().copied().collect(),
            };
            if let Some(args) = resolve {
                let [id, how] = &args[..] else {
                    anyhow::bail!("--resolve takes an ID and keep-local or apply-remote")
                };
                let id: i64 = id.parse().context("--resolve: the ID is a number")?;
                let winner = conflict::Winner::parse(how)
                    .context("--resolve: the resolution is keep-local or apply-remote")?;
                let [slave] = slaves[..] else {
                    anyhow::bail!("the set has several slaves: say which with --slave N");
                };
                if !conflict::resolve(&set, slave, id, winner).await? {
                    anyhow::bail!("slave {slave} has no conflict #{id} waiting for a resolution");
                }
                println!(
                    "conflict #{id} resolved ({how}): slave {slave} applies it at its next try"
                );
                return Ok(true);
            }
            for n in slaves {
                let lines = conflict::list(&set, n).await?;
                println!("set {}, slave {n}: {} conflict(s)", set.name, lines.len());
                for line in lines {
                    println!("{line}");
                }
            }
            Ok(true)
        }
        Command::Execute { config, sql } => {
            let set = Config::load(&config)?;
            init_logging(1);
            let client = db::connect(&set.master, None).await?;
            client
                .execute("SELECT pgreplica.execute($1)", &[&sql])
                .await
                .map_err(|e| anyhow::anyhow!("{}", db::pg_message(&e)))
                .context("running the statement on the master")?;
            println!(
                "done on the master and queued: every slave of {} runs it in order",
                set.name
            );
            Ok(true)
        }
        Command::Demo => {
            init_logging(1);
            Ok(demo::run().await?)
        }
    }
}

/// `start`: checks, then runs `pgreplica run --pidfile --logfile` detached.
fn start(
    pidfile: &std::path::Path,
    logfile: &std::path::Path,
    user: Option<&str>,
    http: Option<std::net::SocketAddr>,
    sets: &Sets,
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
async fn stop(pidfile: &std::path::Path, timeout: Duration) -> Result<bool> {
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
    // SAFETY: kill sends a signal; `pid` was read from our pidfile and checked
    // to be a pgreplica process.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let started = std::time::Instant::now();
    while service::alive(pid) {
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

fn print_status(all: &[status::SlaveStatus]) {
    println!(
        "{:<16} {:>5} {:<12} {:>10} {:>9} {:<32} LAST ERROR",
        "SET", "SLAVE", "STATE", "WAITING", "LAG(s)", "LAST APPLY"
    );
    for s in all {
        println!(
            "{:<16} {:>5} {:<12} {:>10} {:>9.1} {:<32} {}",
            s.set,
            s.slave,
            s.state,
            s.events_waiting,
            s.lag_seconds,
            s.last_apply.as_deref().unwrap_or("-"),
            s.last_error.as_deref().unwrap_or("-")
        );
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match main_inner(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("pgreplica: {e:#}");
            ExitCode::from(2)
        }
    }
}
