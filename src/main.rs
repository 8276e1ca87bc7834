//! pgreplica's command line: parses arguments, calls the library, prints, exits.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use pgreplica::{Config, capture, check, clone, daemon, db, demo, status};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::sync::watch;

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
        /// The master's connection string
        #[arg(long)]
        dsn: String,
        /// Attach only this table (schema.name); repeatable. Default: every table with a primary key
        #[arg(long = "table")]
        tables: Vec<String>,
    },
    /// Remove capture from a master: triggers, log and registry
    Uninstall {
        /// The master's connection string
        #[arg(long)]
        dsn: String,
    },
    /// Replicate the sets of these config files until SIGINT/SIGTERM
    Run {
        /// Apply everything committed so far, then exit (non-zero if a slave failed)
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        sets: Sets,
    },
    /// Show each slave's state, waiting events, lag and last error
    Status {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
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
    /// Start two throwaway local servers and replicate between them
    Demo,
}

#[derive(clap::Args)]
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
}

fn init_logging(level: u8) {
    let default = match level {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("pgreplica={default},warn"))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
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
        Command::Install { dsn, tables } => {
            init_logging(1);
            let mut client = db::connect(&dsn, None).await?;
            let reports = capture::install(&mut client, &tables).await?;
            for r in &reports {
                match &r.skipped {
                    None => println!("{}: replicated", r.table),
                    Some(why) => println!("{}: skipped: {why}", r.table),
                }
            }
            let replicated = reports.iter().filter(|r| r.skipped.is_none()).count();
            println!("{replicated} of {} tables replicated", reports.len());
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
        Command::Run { once, sets } => {
            let sets = sets.load()?;
            init_logging(sets.iter().map(|s| s.debug_level).max().unwrap_or(1));
            Ok(daemon::run(sets, once, shutdown_signal()).await)
        }
        Command::Status { json, sets } => {
            let sets = sets.load()?;
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
            tables,
            truncate,
        } => {
            let set = Config::load(&config)?;
            init_logging(set.debug_level.max(1));
            let options = clone::Options {
                slave,
                jobs,
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
        Command::Demo => {
            init_logging(1);
            Ok(demo::run().await?)
        }
    }
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
