//! Status: per slave, what waits, the lag, the last apply and the last error.

use crate::config::{Capture, Config};
use crate::db::{self, redact};
use crate::metrics::{Sample, SlaveCounts};
use crate::{registry, wal};
use serde::Serialize;
use std::collections::BTreeMap;

/// One slave's state as the master sees it.
#[derive(Debug, Clone, Serialize)]
pub struct SlaveStatus {
    /// The set's name.
    pub set: String,
    /// The slave's number (`DSN<n>`).
    pub slave: u32,
    /// The slave's connection string, password removed.
    pub dsn: String,
    /// `running`, `stopped` (by an error, retrying), `not started` or `unknown`.
    pub state: String,
    /// Events in the master's log that this slave has not applied yet.
    pub events_waiting: i64,
    /// Age in seconds of the oldest committed event not applied yet (0 when none).
    pub lag_seconds: f64,
    /// Under WAL capture, the WAL the slave's slot keeps on the master, in bytes.
    pub wal_kept_bytes: Option<i64>,
    /// When the slave last applied events.
    pub last_apply: Option<String>,
    /// When the daemon last reported on this slave.
    pub last_seen: Option<String>,
    /// Events applied since the slave was registered.
    pub events_applied: i64,
    /// Conflicts detected since the slave was registered.
    pub conflicts: i64,
    /// The error that stopped the slave, with its time.
    pub last_error: Option<String>,
    /// Lag past the set's `LAG_WARNING` or `LAG_WARNING_EVENTS`.
    pub lagging: bool,
}

impl SlaveStatus {
    /// Whether `events` waiting and `seconds` of lag pass the set's limits.
    pub fn lags(set: &Config, events: i64, seconds: f64) -> bool {
        set.lag_warning.is_some_and(|l| seconds > l.as_secs_f64())
            || set.lag_warning_events.is_some_and(|l| events > l)
    }
}

/// Every slave's status as the running daemon knows it, without asking any
/// server: what `/status` shows. `values` keeps the row values of errors.
pub fn from_daemon(
    sets: &[Config],
    figures: &BTreeMap<(String, u32), SlaveCounts>,
    values: bool,
) -> Vec<SlaveStatus> {
    let mut out = Vec::new();
    for set in sets {
        for (&slave, dsn) in &set.slaves {
            let f = figures
                .get(&(set.name.clone(), slave))
                .cloned()
                .unwrap_or_default();
            out.push(SlaveStatus {
                set: set.name.clone(),
                slave,
                dsn: redact(dsn),
                state: match f.state {
                    "" => "starting".into(),
                    state => state.into(),
                },
                events_waiting: f.lag_events,
                lag_seconds: f.lag_seconds,
                wal_kept_bytes: (set.capture == Capture::Wal).then_some(f.wal_kept_bytes),
                last_apply: f.last_apply.clone(),
                last_seen: None,
                events_applied: f.events as i64,
                conflicts: f.conflicts as i64,
                last_error: f
                    .last_error
                    .map(|(whole, bare)| if values { whole } else { bare }),
                lagging: SlaveStatus::lags(set, f.lag_events, f.lag_seconds),
            });
        }
    }
    out
}

/// One slave as the status page draws it: its status, where it is, and what
/// the daemon remembers of it.
#[derive(Debug, Clone, Serialize)]
pub struct SlavePage {
    /// What `/status` shows of it.
    #[serde(flatten)]
    pub status: SlaveStatus,
    /// Its name in the graph: its `NODEn`, or its database and host.
    pub node: String,
    /// The master snapshot (or WAL position) its last batch ended at.
    pub position: Option<String>,
    /// The last hour, a sample at each lag check.
    pub history: Vec<Sample>,
    /// Events applied per table since the daemon started, the busiest first.
    pub tables: Vec<(String, u64)>,
    /// The latest conflicts: time and description (row values only with
    /// `values`).
    pub conflicts: Vec<(String, String)>,
    /// The latest errors: time and message.
    pub errors: Vec<(String, String)>,
}

/// One set as the status page draws it.
#[derive(Debug, Clone, Serialize)]
pub struct SetPage {
    /// The set's name.
    pub name: String,
    /// `trigger` or `wal`.
    pub capture: &'static str,
    /// The master's name in the graph.
    pub master: String,
    /// Its slaves.
    pub slaves: Vec<SlavePage>,
}

/// Everything the status page shows (`/status/page`).
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// Seconds since the epoch, for the charts' time axes.
    pub now: i64,
    /// The sets.
    pub sets: Vec<SetPage>,
}

/// A server's name for the graph: `NODEn` of `set`, else `dbname@host` of
/// its connection string.
fn node_name(set: &Config, number: u32, dsn: &str) -> String {
    if let Some(node) = set.nodes.get(&number) {
        return node.clone();
    }
    let parsed = crate::dsn::Dsn::parse(dsn).ok();
    let get = |key: &str| parsed.as_ref().and_then(|d| d.get(key).map(str::to_string));
    let port = get("port").map_or(String::new(), |p| format!(":{p}"));
    match (get("dbname"), get("host")) {
        (Some(db), Some(host)) => format!("{db}@{host}{port}"),
        (Some(db), None) => format!("{db}{port}"),
        _ => format!("DSN{number} of {}", set.name),
    }
}

/// The status page's data from the running daemon's memory. `values` keeps
/// the row values of errors and conflicts.
pub fn page(sets: &[Config], figures: &BTreeMap<(String, u32), SlaveCounts>, values: bool) -> Page {
    let statuses = from_daemon(sets, figures, values);
    let mut out = Vec::new();
    for set in sets {
        let mut slaves = Vec::new();
        for status in statuses.iter().filter(|s| s.set == set.name) {
            let f = figures
                .get(&(set.name.clone(), status.slave))
                .cloned()
                .unwrap_or_default();
            let mut tables: Vec<(String, u64)> = f.tables.into_iter().collect();
            tables.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let conflicts = f.recent_conflicts.into_iter().rev().map(|(at, note)| {
                let note = match values {
                    true => note,
                    false => note.split(", key ").next().unwrap_or_default().to_string(),
                };
                (at, note)
            });
            let errors = f
                .recent_errors
                .into_iter()
                .rev()
                .map(|(at, whole, bare, n)| {
                    let text = if values { whole } else { bare };
                    match n {
                        1 => (at, text),
                        n => (at, format!("{text} ({n} times, the last shown)")),
                    }
                });
            slaves.push(SlavePage {
                node: node_name(set, status.slave, &set.slaves[&status.slave]),
                status: status.clone(),
                position: f.position,
                history: f.history.into_iter().collect(),
                tables,
                conflicts: conflicts.collect(),
                errors: errors.collect(),
            });
        }
        out.push(SetPage {
            name: set.name.clone(),
            capture: match set.capture {
                Capture::Trigger => "trigger",
                Capture::Wal => "wal",
            },
            master: node_name(set, 0, &set.master),
            slaves,
        });
    }
    Page {
        now: crate::metrics::epoch(),
        sets: out,
    }
}

/// Reads every slave's status of a set from its master. A slave the daemon has
/// never started shows as `not started`; an unreachable master as `unknown`.
pub async fn status(set: &Config) -> Vec<SlaveStatus> {
    let master = db::connect(&set.master, None).await;
    let lags = match &master {
        Ok(client) => registry::lags(client, &set.name)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let kept = match (&master, set.capture) {
        (Ok(client), Capture::Wal) => wal::kept(client, set).await.ok(),
        _ => None,
    };
    let mut out = Vec::new();
    for (&slave, dsn) in &set.slaves {
        let mut s = SlaveStatus {
            set: set.name.clone(),
            slave,
            dsn: redact(dsn),
            state: "unknown".into(),
            events_waiting: 0,
            lag_seconds: 0.0,
            wal_kept_bytes: kept.as_ref().and_then(|k| k.get(&slave).copied()),
            last_apply: None,
            last_seen: None,
            events_applied: 0,
            conflicts: 0,
            last_error: None,
            lagging: false,
        };
        let row = match &master {
            Ok(client) => registry::entry(client, &set.name, slave)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match row {
            Ok(Some(r)) => {
                s.state = r.get(0);
                s.last_apply = r.get(1);
                s.last_seen = r.get(2);
                s.events_applied = r.get(3);
                s.conflicts = r.get(4);
                s.last_error = r.get(5);
                match &lags {
                    Ok(lags) => {
                        let (events, seconds) = lags.get(&slave).copied().unwrap_or_default();
                        s.events_waiting = events;
                        s.lag_seconds = seconds;
                        s.lagging = SlaveStatus::lags(set, events, seconds);
                    }
                    Err(e) => s.last_error = Some(e.clone()),
                }
            }
            Ok(None) => s.state = "not started".into(),
            Err(e) => s.last_error = Some(e),
        }
        out.push(s);
    }
    // A clone killed and never run again keeps the log from being cleaned.
    if let Ok(client) = &master {
        for (slave, since) in registry::holds(client, &set.name).await.unwrap_or_default() {
            out.push(SlaveStatus {
                set: set.name.clone(),
                slave,
                dsn: "clone in progress".into(),
                state: "clone hold".into(),
                events_waiting: 0,
                lag_seconds: 0.0,
                wal_kept_bytes: None,
                last_apply: None,
                last_seen: since.clone(),
                events_applied: 0,
                conflicts: 0,
                last_error: Some(format!(
                    "a clone of slave {slave} keeps the master's log since {}: run it again \
                     (pgreplica clone {} --slave {slave}), or let the log go with \
                     pgreplica clone {} --slave {slave} --abandon",
                    since.as_deref().unwrap_or("its start"),
                    set.path.display(),
                    set.path.display()
                )),
                lagging: false,
            });
        }
    }
    out
}

/// Wakes the daemons and waits (up to `timeout`) until every slave of `set`
/// has applied what had committed on the master at the call; returns the
/// slaves that had not.
pub async fn wait(set: &Config, timeout: std::time::Duration) -> Result<Vec<i32>, crate::Error> {
    use crate::error::Context;
    let master = db::connect(&set.master, set.keepalive).await?;
    let snapshot: String = master
        .query_one(
            "SELECT txid_current_snapshot()::text FROM pg_notify('pgreplica', '')",
            &[],
        )
        .await
        .on_master("reading the master's snapshot")?
        .get(0);
    let slaves: Vec<i32> = set.slaves.keys().map(|&n| n as i32).collect();
    let started = std::time::Instant::now();
    loop {
        let behind = registry::behind(&master, &set.name, &snapshot, &slaves).await?;
        if behind.is_empty() || started.elapsed() >= timeout {
            return Ok(behind);
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
