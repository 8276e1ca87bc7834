//! pgreplica's command line: parses arguments, calls the library, prints, exits.

mod cli;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use cli::args::{Cli, Command, Service, SetFiles, sets_file};
use cli::process::{
    init_logging, init_logging_to, notify_systemd, reload_on_hangup, shutdown_signal, start, stop,
    write_sets_file,
};
use pgreplica::metrics::Metrics;
use pgreplica::service::{self, LogFile};
use pgreplica::{Config, capture, check, clone, conflict, daemon, db, demo, http, slave, status};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::sync::watch;

async fn main_inner(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Install {
            config,
            dsn,
            tables,
            sequences,
        } => {
            init_logging(1);
            cli::install::run(config, dsn, &tables, sequences).await
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
                let owned: Vec<_> = log
                    .iter()
                    .flat_map(LogFile::owned)
                    .chain(_pid.iter().flat_map(service::PidFile::owned))
                    .collect();
                service::become_user(user, &owned).map_err(anyhow::Error::msg)?;
                tracing::info!(
                    "running as user {} (HOME {})",
                    std::env::var("USER").unwrap_or_default(),
                    std::env::var("HOME").unwrap_or_default()
                );
            }
            let (running, watched) = watch::channel(loaded.clone());
            let metrics = Metrics::default();
            if let Some(addr) = http.or_else(|| loaded.iter().find_map(|s| s.http))
                && !once
            {
                let access = http::Access {
                    token: loaded.iter().find_map(|s| s.http_token.clone()),
                    metrics_open: loaded.iter().any(|s| s.http_metrics_open),
                };
                http::serve(addr, watched, metrics.clone(), access)
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
            // LOGFILE in a set file counts as --logfile.
            let logfile = options
                .logfile
                .or_else(|| sets.load().ok()?.iter().find_map(|s| s.logfile.clone()))
                .unwrap_or_else(service::default_logfile);
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
        Command::Wait { config, timeout } => {
            let set = Config::load(&config)?;
            init_logging(0);
            let behind = status::wait(&set, Duration::from_secs(timeout)).await?;
            match behind.is_empty() {
                true => println!("every slave of set {} is up to date", set.name),
                false => println!("not applied within {timeout}s on slave(s) {behind:?}"),
            }
            Ok(behind.is_empty())
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
                SetFiles {
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
                cli::print::status(&all);
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
            abandon,
        } => {
            let set = Config::load(&config)?;
            init_logging(set.debug_level.max(1));
            if abandon {
                for n in set.chosen_slaves(slave)? {
                    let marked = clone::abandon(&set, n).await?;
                    println!("slave {n}: the clone's hold on the master's log is dropped");
                    if !marked.is_empty() {
                        println!(
                            "slave {n}: still marked as being cloned, not replicated until a \
                             clone copies them: {}",
                            marked.join(", ")
                        );
                    }
                }
                return Ok(true);
            }
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
        Command::Check {
            config,
            tables,
            repair,
            dry_run,
        } => {
            let set = Config::load(&config)?;
            init_logging(0);
            let mode = match (repair, dry_run) {
                (false, _) => check::Mode::Compare,
                (true, false) => check::Mode::Repair,
                (true, true) => check::Mode::DryRun,
            };
            let differences = check::check(&set, &tables, mode).await?;
            match mode {
                check::Mode::Repair => println!("{differences} difference(s) left"),
                _ => println!("{differences} difference(s)"),
            }
            Ok(differences == 0)
        }
        Command::Conflicts {
            config,
            slave,
            resolve,
        } => {
            let set = Config::load(&config)?;
            init_logging(0);
            let slaves = set.chosen_slaves(slave)?;
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
                if !slave::resolve(&set, slave, id, winner).await? {
                    anyhow::bail!("slave {slave} has no conflict #{id} waiting for a resolution");
                }
                println!(
                    "conflict #{id} resolved ({how}): slave {slave} applies it at its next try"
                );
                return Ok(true);
            }
            for n in slaves {
                let lines = slave::conflicts(&set, n).await?;
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
            capture::execute(&client, &sql).await?;
            println!(
                "done on the master and queued: every slave of {} runs it in order",
                set.name
            );
            Ok(true)
        }
        Command::Switchover {
            config,
            slave,
            timeout,
            force,
            write,
        } => {
            init_logging(1);
            let options = cli::roles::options(slave, timeout, force);
            cli::roles::switchover(&config, options, write).await
        }
        Command::Failover {
            config,
            slave,
            force,
            write,
        } => {
            init_logging(1);
            cli::roles::failover(&config, slave, force, write).await
        }
        Command::Failback { config, slave } => {
            init_logging(1);
            cli::roles::failback(&config, slave).await
        }
        Command::Man { dir } => {
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("writing the manual pages into {}", dir.display()))?;
            Ok(true)
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "pgreplica",
                &mut std::io::stdout(),
            );
            Ok(true)
        }
        Command::Demo => {
            // The daemon's log would flood the screen: it goes to a file.
            let path =
                std::env::temp_dir().join(format!("pgreplica-demo-{}.log", std::process::id()));
            let log = LogFile::open(&path).context("opening the demo's log file")?;
            init_logging_to(1, false, Some(log));
            Ok(demo::run(&path).await?)
        }
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
