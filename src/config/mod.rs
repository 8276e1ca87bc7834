//! Configuration files: PyReplica's INI format read into a typed, validated `Config`.

use crate::event::Origins;
use crate::ident::TableName;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

mod clash;
pub mod roles;
mod smtp;
mod table;
mod wal;

pub use clash::{capture_clash, loop_clash, process_clash};
use smtp::smtp_key;
pub use smtp::{DEFAULT_DIGEST, Smtp, SmtpTls};
pub use table::TableConfig;
use table::table_section;
pub use wal::Capture;

/// Default `LAG_WARNING`.
pub const DEFAULT_LAG_WARNING: Duration = Duration::from_secs(300);

/// Heartbeat interval used when `KEEPALIVE=true`.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(30);

/// One replication set: a master and its slaves, read from one file.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// The set's name (`NAME`), shown on every log line.
    pub name: String,
    /// The master's connection string (`DSN0`).
    pub master: String,
    /// The slaves by number (`DSN1`, `DSN2`, …); the number is the slave's identity.
    pub slaves: BTreeMap<u32, String>,
    /// `CAPTURE`: where the master's changes are read from.
    pub capture: Capture,
    /// `NODE0`, `NODE1`, …: node names of the master and slaves (multi-master).
    pub nodes: BTreeMap<u32, String>,
    /// `FORWARD=local`: slaves take only the master's own changes, not those it
    /// applied from other nodes (a mesh, or a star's spokes).
    pub local_only: bool,
    /// `CONFLICT`: how the set settles conflicts; `None` logs them and applies
    /// what it can.
    pub conflict: Option<Policy>,
    /// `PRIORITY`: node names, the first winning (policy `priority`, and ties of `newest`).
    pub priority: Vec<String>,
    /// `LOG_KEEP` (seconds): applied events stay in the master's log this long.
    /// `newest` and `priority` read a node's own log to learn when and where
    /// its row last changed, so with them it defaults to DEFAULT_LOG_KEEP.
    pub log_keep: Duration,
    /// `SKIP_USER`: PyReplica's way to keep two sets in opposite directions
    /// from looping; it implies `FORWARD=local` (see [`Config::origins`]).
    pub skip_user: Option<String>,
    /// Heartbeat interval (`KEEPALIVE`); `None` when off.
    pub keepalive: Option<Duration>,
    /// `DEBUG_LEVEL`, 0 to 3.
    pub debug_level: u8,
    /// `LAG_WARNING` (seconds; 0 off): a slave whose oldest unapplied committed
    /// change is older than this is lagging.
    pub lag_warning: Option<Duration>,
    /// `LAG_WARNING_EVENTS` (0 off): a slave with more unapplied events is lagging.
    pub lag_warning_events: Option<i64>,
    /// `LOG_FORMAT=json`: one JSON object per log line.
    pub json_logs: bool,
    /// `USER`: started as root, the daemon runs as this user.
    pub user: Option<String>,
    /// `LOGFILE`: the daemon logs here instead of standard error.
    pub logfile: Option<PathBuf>,
    /// `HTTP`: address of the status and metrics listener.
    pub http: Option<std::net::SocketAddr>,
    /// `HTTP_TOKEN`: what HTTP clients must send (`Authorization: Bearer …`)
    /// to read `/status` and `/metrics`; required off loopback.
    pub http_token: Option<String>,
    /// `HTTP_METRICS_OPEN`: `/metrics` without the token (as Prometheus
    /// exporters usually are).
    pub http_metrics_open: bool,
    /// The `[SMTP]` section, when present.
    pub smtp: Option<Smtp>,
    /// The `[TABLE schema.name]` sections.
    pub tables: Vec<TableConfig>,
    /// `LOCK_TIMEOUT`: the longest a statement applying a batch waits for a
    /// lock on the slave before the batch is given up and retried.
    pub lock_timeout: Duration,
    /// `BATCH_TIMEOUT`: the longest one batch (or step of one) may take to
    /// apply; past it the batch is cancelled, reported and retried.
    pub batch_timeout: Duration,
    /// `BATCH_EVENTS`: a batch with more events is applied in steps of this many
    /// events (one slave transaction each).
    pub batch_events: u64,
    /// `BATCH_MB` (in bytes here): a batch with more row data is applied in
    /// steps of about this much.
    pub batch_bytes: usize,
    /// `SYNC`: the slaves `pgreplica.wait()` waits for by default (0: one);
    /// this set's progress is reported at once, and its slots looked at often.
    pub sync: u32,
    /// `WAL_WARNING` (MB): under WAL capture, a slot keeping more WAL on the
    /// master is warned of (0: never).
    pub wal_warning: u64,
    /// `TRANSFORM_TIME_LIMIT`: the longest one call of a transform may run.
    pub transform_time: Duration,
    /// `TRANSFORM_MEMORY_LIMIT` (MB): the memory all of a set's transforms may use.
    pub transform_memory: usize,
    /// Accepted but noteworthy lines, to be logged by the caller.
    pub warnings: Vec<String>,
    /// The lines of the per-process keys this file gives (see [`PROCESS_KEYS`]).
    pub process_lines: BTreeMap<&'static str, usize>,
}

/// Keys that set how the daemon process runs, not one set: the files of one
/// daemon that give them must agree (see [`process_clash`]).
pub const PROCESS_KEYS: [&str; 7] = [
    "USER",
    "LOGFILE",
    "HTTP",
    "HTTP_TOKEN",
    "HTTP_METRICS_OPEN",
    "LOG_FORMAT",
    "DEBUG_LEVEL",
];

/// How a set (or one table) settles a conflict (`CONFLICT=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The slave stops until the DBA resolves the conflict by hand.
    Stop,
    /// The slave's row stays as it is.
    KeepLocal,
    /// The master's change is applied over the slave's row.
    ApplyRemote,
    /// The later change wins; a tie goes to node priority.
    Newest,
    /// The change from the node earlier in `PRIORITY` wins.
    Priority,
}

impl Policy {
    /// Whether the policy reads when and on which node the slave's row last
    /// changed (`newest`, `priority`).
    pub fn reads_history(self) -> bool {
        matches!(self, Policy::Newest | Policy::Priority)
    }

    /// Reads a policy's name as the config file writes it.
    pub fn parse(text: &str) -> Result<Policy, String> {
        Ok(match text.trim().to_ascii_lowercase().as_str() {
            "stop" => Policy::Stop,
            "keep-local" => Policy::KeepLocal,
            "apply-remote" => Policy::ApplyRemote,
            "newest" => Policy::Newest,
            "priority" => Policy::Priority,
            _ => {
                return Err(format!(
                    "'{text}' is not one of stop, keep-local, apply-remote, newest, priority"
                ));
            }
        })
    }
}

/// Default `LOG_KEEP` of sets whose conflicts are settled by `newest` or
/// `priority`: a week.
pub const DEFAULT_LOG_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// Default `LOCK_TIMEOUT`.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(60);

/// Default `BATCH_TIMEOUT`.
pub const DEFAULT_BATCH_TIMEOUT: Duration = Duration::from_secs(600);

/// Default `BATCH_EVENTS`.
pub const DEFAULT_BATCH_EVENTS: u64 = 100_000;

/// Default `BATCH_MB`.
pub const DEFAULT_BATCH_MB: usize = 64;

/// Default `TRANSFORM_TIME_LIMIT`.
pub const DEFAULT_TRANSFORM_TIME: Duration = Duration::from_secs(1);

/// Default `TRANSFORM_MEMORY_LIMIT`, in MB.
pub const DEFAULT_TRANSFORM_MEMORY: usize = 64;

/// A configuration file that cannot be used, with the place that is wrong.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line or key is wrong.
    #[error("{path}:{line}: {key}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The key (or section) concerned.
        key: String,
        /// What is wrong and what is expected.
        message: String,
    },
    /// A slave number the file does not give.
    #[error("{path} has no DSN{number}")]
    NoSlave {
        /// The file.
        path: PathBuf,
        /// The slave asked for.
        number: u32,
    },
    /// A required key is absent.
    #[error("{path}: [MAIN] {key} is missing: {message}")]
    Missing {
        /// The file.
        path: PathBuf,
        /// The missing key.
        key: String,
        /// What it is for.
        message: String,
    },
}

impl Config {
    /// The `[TABLE]` section of a master table, if any.
    pub fn section(&self, table: &TableName) -> Option<&TableConfig> {
        self.tables.iter().find(|t| t.table == *table)
    }

    /// The conflict policy of a master table: its section's, or the set's.
    pub fn policy(&self, table: &TableName) -> Option<Policy> {
        self.section(table)
            .and_then(|t| t.conflict)
            .or(self.conflict)
    }

    /// The conflict policies the set names, in `[MAIN]` and its sections.
    pub fn policies(&self) -> impl Iterator<Item = Policy> + '_ {
        self.conflict
            .into_iter()
            .chain(self.tables.iter().filter_map(|t| t.conflict))
    }

    /// Which of the master's events slave `slave` takes, by origin. PyReplica's
    /// `SKIP_USER` (two sets in opposite directions, no node names) means what
    /// it meant there: changes applied by replication are not replicated again.
    pub fn origins(&self, slave: u32) -> Origins {
        let pyreplica = self.skip_user.is_some();
        Origins {
            master: self
                .nodes
                .get(&0)
                .cloned()
                .or_else(|| pyreplica.then(|| format!("set {}", self.name))),
            slave: self.nodes.get(&slave).cloned(),
            local_only: self.local_only || pyreplica,
        }
    }

    /// The slaves a command works on: `only` (checked to exist), or all.
    pub fn chosen_slaves(&self, only: Option<u32>) -> Result<Vec<u32>, ConfigError> {
        match only {
            Some(n) if self.slaves.contains_key(&n) => Ok(vec![n]),
            Some(number) => Err(ConfigError::NoSlave {
                path: self.path.clone(),
                number,
            }),
            None => Ok(self.slaves.keys().copied().collect()),
        }
    }

    /// A master table's name on the slaves.
    pub fn slave_name(&self, table: &TableName) -> TableName {
        self.section(table)
            .and_then(|t| t.slave_table.clone())
            .unwrap_or_else(|| table.clone())
    }

    /// Reads and validates one file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Reads every `*.conf` file of a directory, in name order.
    pub fn load_dir(dir: &Path) -> Result<Vec<Config>, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: dir.to_path_buf(),
            source,
        };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(read_err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "conf"))
            .collect();
        paths.sort();
        paths.iter().map(|p| Config::load(p)).collect()
    }

    /// Parses a file's text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let line_err = |line: usize, key: &str, message: String| ConfigError::Line {
            path: path.to_path_buf(),
            line,
            key: key.to_string(),
            message,
        };
        let mut section: Option<String> = None;
        let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
        let mut config = Config {
            path: path.to_path_buf(),
            name: String::new(),
            master: String::new(),
            slaves: BTreeMap::new(),
            capture: Capture::Trigger,
            nodes: BTreeMap::new(),
            local_only: false,
            conflict: None,
            priority: Vec::new(),
            log_keep: Duration::ZERO,
            skip_user: None,
            keepalive: None,
            debug_level: 1,
            lag_warning: Some(DEFAULT_LAG_WARNING),
            lag_warning_events: None,
            json_logs: false,
            http: None,
            http_token: None,
            http_metrics_open: false,
            logfile: None,
            user: None,
            smtp: None,
            tables: Vec::new(),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            batch_timeout: DEFAULT_BATCH_TIMEOUT,
            batch_events: DEFAULT_BATCH_EVENTS,
            batch_bytes: DEFAULT_BATCH_MB << 20,
            sync: 0,
            wal_warning: 1024,
            transform_time: DEFAULT_TRANSFORM_TIME,
            transform_memory: DEFAULT_TRANSFORM_MEMORY,
            warnings: Vec::new(),
            process_lines: BTreeMap::new(),
        };
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
                continue;
            }
            if let Some(rest) = trimmed.strip_prefix('[') {
                let name = rest.strip_suffix(']').ok_or_else(|| {
                    line_err(line, trimmed, "a section header ends with ']'".into())
                })?;
                let name = name.trim();
                if let Some(table) = table_section(name) {
                    let table = TableName::parse(table)
                        .map_err(|m| line_err(line, &format!("[{name}]"), m))?;
                    if let Some(first) = config.tables.iter().find(|t| t.table == table) {
                        return Err(line_err(
                            line,
                            &format!("[{name}]"),
                            format!("given twice (first on line {})", first.line),
                        ));
                    }
                    config.tables.push(TableConfig::new(table, line));
                    section = Some(format!("TABLE {line}"));
                    continue;
                }
                let name = name.to_ascii_uppercase();
                if name != "MAIN" && name != "SMTP" {
                    return Err(line_err(
                        line,
                        &format!("[{name}]"),
                        "unknown section; expected [MAIN], [SMTP] or [TABLE schema.name]".into(),
                    ));
                }
                if name == "SMTP" && config.smtp.is_none() {
                    config.smtp = Some(Smtp::default());
                }
                section = Some(name);
                continue;
            }
            let split = trimmed
                .find(['=', ':'])
                .ok_or_else(|| line_err(line, trimmed, "expected KEY=value".into()))?;
            let key = trimmed[..split].trim().to_ascii_uppercase();
            let value = trimmed[split + 1..].trim().to_string();
            let Some(section) = section.as_deref() else {
                return Err(line_err(
                    line,
                    &key,
                    "key outside a section; put it under [MAIN]".into(),
                ));
            };
            if let Some(first) = seen.insert((section.to_string(), key.clone()), line) {
                return Err(line_err(
                    line,
                    &key,
                    format!("given twice (first on line {first})"),
                ));
            }
            if section == "SMTP" {
                let smtp = config.smtp.get_or_insert_with(Smtp::default);
                smtp_key(smtp, &key, value).map_err(|m| line_err(line, &key, m))?;
            } else if section.starts_with("TABLE") {
                let dir = path.parent().unwrap_or(Path::new("."));
                if let Some(table) = config.tables.last_mut() {
                    table
                        .key(&key, value, dir)
                        .map_err(|m| line_err(line, &key, m))?;
                }
            } else {
                main_key(&mut config, &key, value, line).map_err(|m| line_err(line, &key, m))?;
                if let Some(k) = PROCESS_KEYS.iter().find(|k| **k == key) {
                    config.process_lines.insert(k, line);
                }
            }
        }
        let missing = |key: &str, message: &str| ConfigError::Missing {
            path: path.to_path_buf(),
            key: key.to_string(),
            message: message.to_string(),
        };
        if config.name.is_empty() {
            return Err(missing("NAME", "the set's name, shown on every log line"));
        }
        if config.master.is_empty() {
            return Err(missing("DSN0", "the master's connection string"));
        }
        if config.slaves.is_empty() {
            return Err(missing("DSN1", "at least one slave's connection string"));
        }
        if !seen.contains_key(&("MAIN".to_string(), "LOG_KEEP".to_string()))
            && config.policies().any(Policy::reads_history)
        {
            config.log_keep = DEFAULT_LOG_KEEP;
        }
        for t in &config.tables {
            if t.columns.is_some() && t.exclude.is_some() {
                return Err(line_err(
                    t.line,
                    &format!("[TABLE {}]", t.table),
                    "COLUMNS and EXCLUDE_COLUMNS exclude each other; give one".into(),
                ));
            }
        }
        if let Some(&line) = seen.get(&("MAIN".to_string(), "SYNC".to_string()))
            && config.sync as usize > config.slaves.len()
        {
            let message = format!(
                "{} slaves, but the set has {}",
                config.sync,
                config.slaves.len()
            );
            return Err(line_err(line, "SYNC", message));
        }
        if let Some(smtp) = &config.smtp
            && (smtp.server.is_empty() || smtp.from.is_empty() || smtp.to.is_empty())
        {
            return Err(ConfigError::Missing {
                path: path.to_path_buf(),
                key: "[SMTP] SERVER, FROM_ADDR or TO_ADDRS".into(),
                message: "e-mail needs a server, a sender and recipients".into(),
            });
        }
        Ok(config)
    }
}

fn main_key(config: &mut Config, key: &str, value: String, line: usize) -> Result<(), String> {
    match key {
        "NAME" => {
            if value.is_empty() {
                return Err("must not be empty".into());
            }
            config.name = value;
        }
        "SKIP_USER" => config.skip_user = Some(value),
        "CAPTURE" => {
            config.capture = match value.to_ascii_lowercase().as_str() {
                "trigger" => Capture::Trigger,
                "wal" => Capture::Wal,
                _ => return Err(format!("'{value}' is not trigger or wal")),
            }
        }
        "CONFLICT" => config.conflict = Some(Policy::parse(&value)?),
        "LOG_KEEP" => config.log_keep = parse_seconds(&value)?,
        "PRIORITY" => {
            config.priority = value
                .split(',')
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect()
        }
        "FORWARD" => {
            config.local_only = match value.to_ascii_lowercase().as_str() {
                "all" => false,
                "local" => true,
                _ => return Err(format!("'{value}' is not all or local")),
            }
        }
        "KEEPALIVE" => config.keepalive = parse_keepalive(&value)?,
        "DEBUG_LEVEL" => {
            config.debug_level = match value.parse::<u8>() {
                Ok(n) if n <= 3 => n,
                _ => return Err(format!("'{value}' is not a level from 0 to 3")),
            }
        }
        "LAG_WARNING" => {
            let seconds = parse_seconds(&value)?;
            config.lag_warning = (!seconds.is_zero()).then_some(seconds);
        }
        "LAG_WARNING_EVENTS" => {
            let events: i64 = value
                .parse()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| format!("'{value}' is not a number of events"))?;
            config.lag_warning_events = (events > 0).then_some(events);
        }
        "LOGFILE" => config.logfile = Some(PathBuf::from(value)),
        "LOCK_TIMEOUT" => config.lock_timeout = parse_positive_seconds(&value)?,
        "BATCH_TIMEOUT" => config.batch_timeout = parse_positive_seconds(&value)?,
        "WAL_WARNING" => {
            config.wal_warning = value
                .parse()
                .map_err(|_| format!("'{value}' is not a number of MB (0: off)"))?
        }
        "SYNC" => {
            config.sync = value
                .parse()
                .map_err(|_| format!("'{value}' is not a number of slaves"))?
        }
        "BATCH_EVENTS" => {
            config.batch_events = value
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("'{value}' is not a number of events (1 or more)"))?
        }
        "BATCH_MB" => {
            let mb: usize = value
                .parse()
                .ok()
                .filter(|mb| *mb > 0)
                .ok_or_else(|| format!("'{value}' is not a number of megabytes (1 or more)"))?;
            config.batch_bytes = mb << 20;
        }
        "TRANSFORM_TIME_LIMIT" => config.transform_time = parse_seconds(&value)?,
        "TRANSFORM_MEMORY_LIMIT" => {
            config.transform_memory = value
                .parse()
                .ok()
                .filter(|mb| *mb > 0)
                .ok_or_else(|| format!("'{value}' is not a number of megabytes"))?
        }
        "USER" => config.user = Some(value),
        "HTTP" => {
            config.http = Some(value.parse().map_err(|_| {
                format!("'{value}' is not an address and port such as 127.0.0.1:9187")
            })?)
        }
        "HTTP_TOKEN" => {
            if value.len() < 16 {
                return Err("give a token of 16 characters or more (e.g. openssl rand -hex 24)".into());
            }
            config.http_token = Some(value)
        }
        "HTTP_METRICS_OPEN" => config.http_metrics_open = parse_bool(&value)?,
        "LOG_FORMAT" => {
            config.json_logs = match value.to_ascii_lowercase().as_str() {
                "json" => true,
                "text" => false,
                _ => return Err(format!("'{value}' is not text or json")),
            }
        }
        "SLAVE_FIELD" => config.warnings.push(format!(
            "line {line}: SLAVE_FIELD is not needed: pgreplica keeps each slave's progress on the slave itself; the key is ignored"
        )),
        _ if key.starts_with("NODE") => {
            let number = key[4..]
                .parse::<u32>()
                .map_err(|_| "expected NODE0 (the master), NODE1, … (the slaves)".to_string())?;
            if value.is_empty() || value.contains(char::is_whitespace) {
                return Err(format!("'{value}' is not a node name (one word)"));
            }
            config.nodes.insert(number, value);
        }
        _ => {
            let number = key
                .strip_prefix("DSN")
                .and_then(|n| n.parse::<u32>().ok())
                .ok_or_else(|| {
                    "unknown key; [MAIN] takes NAME, DSN0 (master), DSN1, DSN2, … (slaves), CAPTURE, SKIP_USER, KEEPALIVE, DEBUG_LEVEL, LAG_WARNING, LAG_WARNING_EVENTS, LOCK_TIMEOUT, BATCH_EVENTS, BATCH_MB, SYNC, WAL_WARNING, LOG_FORMAT, LOGFILE, USER, HTTP, TRANSFORM_TIME_LIMIT, TRANSFORM_MEMORY_LIMIT, NODE0, NODE1, …, FORWARD, CONFLICT, PRIORITY, LOG_KEEP".to_string()
                })?;
            if value.is_empty() {
                return Err("empty connection string".into());
            }
            crate::db::check_dsn(&value)?;
            if number == 0 {
                config.master = value;
            } else {
                config.slaves.insert(number, value);
            }
        }
    }
    Ok(())
}

/// A duration in (possibly fractional) seconds, 0 or more.
pub(super) fn parse_seconds(value: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("'{value}' is not a number of seconds"))
}

fn parse_bool(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(format!("'{value}' is neither true nor false")),
    }
}

fn parse_positive_seconds(value: &str) -> Result<Duration, String> {
    parse_seconds(value)
        .ok()
        .filter(|d| *d >= Duration::from_millis(1))
        .ok_or_else(|| format!("'{value}' is not a number of seconds above 0"))
}

fn parse_keepalive(value: &str) -> Result<Option<Duration>, String> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" => Ok(Some(DEFAULT_KEEPALIVE)),
        "false" | "no" | "off" | "0" => Ok(None),
        v => match v.parse::<u64>() {
            Ok(secs) => Ok(Some(Duration::from_secs(secs))),
            Err(_) => Err(format!(
                "'{value}' is neither true/false nor a number of seconds"
            )),
        },
    }
}

#[cfg(test)]
mod tests;
