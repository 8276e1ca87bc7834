//! The command line's words: commands, their options, and the set files they read.

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use pgreplica::Config;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "pgreplica",
    version,
    about = "Asynchronous replication for PostgreSQL, captured by triggers or from the WAL"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
        sets: SetFiles,
    },
    /// Start the daemon in the background (pidfile, log file)
    Start {
        #[command(flatten)]
        service: Service,
        #[command(flatten)]
        sets: SetFiles,
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
    /// Wait until every slave of the set has applied what had committed on the
    /// master when it was called (deploy scripts)
    Wait {
        /// The set's config file
        config: PathBuf,
        /// Seconds to wait at most
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
        sets: SetFiles,
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
        /// Give up an interrupted clone instead: drop its hold on the master's log
        #[arg(long, conflicts_with_all = ["tables", "truncate"])]
        abandon: bool,
    },
    /// Compare the master and the slaves table by table at one point of the log;
    /// exits 1 when anything differs
    Check {
        /// The set's config file
        config: PathBuf,
        /// Only this table (schema.name); repeatable. Default: every replicated table
        #[arg(long = "table")]
        tables: Vec<String>,
        /// Make the slave equal to the master for the rows found different
        #[arg(long)]
        repair: bool,
        /// With --repair: print the statements instead of running them
        #[arg(long, requires = "repair")]
        dry_run: bool,
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
    /// Hand the master's role to a slave with nothing lost: the master stops
    /// taking writes, every slave applies what it had, the roles swap
    Switchover {
        /// The set's config file
        config: PathBuf,
        /// The slave that becomes the master (the n of DSNn)
        #[arg(long)]
        slave: u32,
        /// Seconds to wait for the master's open transactions, then for the slaves
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// End the master's transactions still open at the timeout
        #[arg(long)]
        force: bool,
        /// Write the new file over CONFIG (the old one kept beside it, ending in
        /// .before-switchover) instead of printing it
        #[arg(long)]
        write: bool,
    },
    /// The master is gone: make a slave the master; the old master waits for
    /// failback
    Failover {
        /// The set's config file
        config: PathBuf,
        /// The slave that becomes the master (the n of DSNn)
        #[arg(long)]
        slave: u32,
        /// Fail over even though the master answers
        #[arg(long)]
        force: bool,
        /// Write the new file over CONFIG (the old one kept beside it, ending in
        /// .before-failover) instead of printing it
        #[arg(long)]
        write: bool,
    },
    /// Make the old master of a failover a slave of the new master again: report
    /// what it had that the new master never got, then repair it to a copy
    Failback {
        /// The set's config file as failover wrote it (the new master is DSN0)
        config: PathBuf,
        /// The old master's number (the n of DSNn)
        #[arg(long)]
        slave: u32,
    },
    /// Start two throwaway local servers and replicate between them
    Demo,
    /// Write the manual pages (pgreplica.1 and one per command), made from
    /// these commands' definitions, into a folder
    Man {
        /// The folder
        dir: PathBuf,
    },
    /// Print the shell completions for bash, zsh, fish, elvish or powershell
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
}

/// How the daemon runs as a service.
#[derive(clap::Args)]
pub struct Service {
    /// Pidfile, refused while another daemon holds it (start's default:
    /// /run/pgreplica.pid as root, else ~/.pgreplica/pgreplica.pid; run: none)
    #[arg(long)]
    pub pidfile: Option<PathBuf>,
    /// Log file, reopened on SIGHUP (start's default: /var/log/pgreplica.log as
    /// root, else ~/.pgreplica/pgreplica.log; run: standard error)
    #[arg(long)]
    pub logfile: Option<PathBuf>,
    /// Started as root: run as this user once the files are open
    #[arg(long)]
    pub user: Option<String>,
    /// Serve /metrics, /status and a status page on this address (or HTTP= in [MAIN])
    #[arg(long)]
    pub http: Option<std::net::SocketAddr>,
}

#[derive(clap::Args, Clone)]
pub struct SetFiles {
    /// Read every *.conf file of this folder
    #[arg(long)]
    pub config_dir: Option<PathBuf>,
    /// Config files, one per replication set
    pub files: Vec<PathBuf>,
}

impl SetFiles {
    pub fn load(&self) -> Result<Vec<Config>> {
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
        if let Some(clash) = pgreplica::config::process_clash(&sets) {
            bail!("{clash}");
        }
        Ok(sets)
    }

    pub fn is_empty(&self) -> bool {
        self.config_dir.is_none() && self.files.is_empty()
    }

    /// The same sets as arguments, with absolute paths.
    pub fn args(&self) -> Result<Vec<std::ffi::OsString>> {
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
pub fn sets_file(pidfile: &std::path::Path) -> PathBuf {
    let mut name = pidfile.as_os_str().to_owned();
    name.push(".sets");
    PathBuf::from(name)
}
