//! Counters and gauges per set and slave, shown as Prometheus text on `/metrics`.

use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds (seconds) of the batch apply-time histogram's buckets.
const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

/// One slave's figures since the daemon started.
#[derive(Debug, Default, Clone)]
pub struct SlaveCounts {
    /// Events applied.
    pub events: u64,
    /// Batches committed.
    pub batches: u64,
    /// Conflicts detected.
    pub conflicts: u64,
    /// Errors that stopped the slave (each retry counts).
    pub errors: u64,
    /// Connections made again after the first.
    pub reconnects: u64,
    /// Events waiting, at the last lag check.
    pub lag_events: i64,
    /// Lag in seconds, at the last lag check.
    pub lag_seconds: f64,
    /// Under WAL capture, the WAL the slave's slot keeps on the master, in
    /// bytes, at the last lag check.
    pub wal_kept_bytes: i64,
    /// `running`, or `stopped` by the error below (retrying).
    pub state: &'static str,
    /// When the slave last applied events (RFC 3339, UTC).
    pub last_apply: Option<String>,
    /// The error that stopped it, with its time: whole, and without row values.
    pub last_error: Option<(String, String)>,
    /// Where the slave is: the master snapshot (or WAL position) its last
    /// batch ended at.
    pub position: Option<String>,
    /// The last hour, a sample at each lag check: the status page's charts.
    pub history: VecDeque<Sample>,
    /// Events applied per slave table.
    pub tables: BTreeMap<String, u64>,
    /// The latest conflicts, with their time: both rows' values.
    pub recent_conflicts: VecDeque<(String, String)>,
    /// The latest errors: the last time, whole, without row values, and how
    /// many times in a row (retries of one error are one entry).
    pub recent_errors: VecDeque<(String, String, String, u32)>,
    /// Batches per apply-time bucket (cumulative counts are made when shown).
    buckets: [u64; BUCKETS.len()],
    /// Sum of the batches' apply times.
    apply_seconds: f64,
}

/// One point of a slave's history.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    /// Seconds since the epoch.
    pub at: i64,
    /// Lag in seconds.
    pub lag_seconds: f64,
    /// Events waiting.
    pub lag_events: i64,
    /// Events applied since the daemon started.
    pub events: u64,
}

/// How far back a slave's history reaches, and its most samples (a lag
/// check every 10 s at most often fills an hour).
const HISTORY_SECONDS: i64 = 3600;
const HISTORY_SAMPLES: usize = 360;
/// Conflicts and errors kept per slave for the status page.
const RECENT: usize = 20;

fn keep<T>(list: &mut VecDeque<T>, item: T, most: usize) {
    list.push_back(item);
    while list.len() > most {
        list.pop_front();
    }
}

impl SlaveCounts {
    /// Records the error that stopped the slave: whole, and without row values.
    pub fn stopped(&mut self, whole: String, bare: String) {
        let at = now();
        self.errors += 1;
        self.state = "stopped";
        match self.recent_errors.back_mut() {
            Some(last) if last.1 == whole => {
                last.0 = at.clone();
                last.3 += 1;
            }
            _ => keep(
                &mut self.recent_errors,
                (at.clone(), whole.clone(), bare.clone(), 1),
                RECENT,
            ),
        }
        self.last_error = Some((format!("{at}: {whole}"), format!("{at}: {bare}")));
    }
}

/// The time now as RFC 3339 in UTC, to the second.
pub fn now() -> String {
    rfc3339(epoch())
}

/// Seconds since the epoch now.
pub fn epoch() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Seconds since the epoch as RFC 3339 in UTC.
fn rfc3339(secs: i64) -> String {
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// Every slave's figures, shared by the daemon's tasks and the HTTP listener;
/// cheap to clone.
#[derive(Clone, Default)]
pub struct Metrics(Arc<Mutex<BTreeMap<(String, u32), SlaveCounts>>>);

impl Metrics {
    /// Every slave's figures now.
    pub fn snapshot(&self) -> BTreeMap<(String, u32), SlaveCounts> {
        self.0.lock().map(|all| all.clone()).unwrap_or_default()
    }

    /// Changes one slave's figures.
    pub fn update(&self, set: &str, slave: u32, change: impl FnOnce(&mut SlaveCounts)) {
        if let Ok(mut all) = self.0.lock() {
            change(all.entry((set.to_string(), slave)).or_default());
        }
    }

    /// Records a committed batch.
    pub fn batch(&self, set: &str, slave: u32, events: u64, conflicts: u64, took: Duration) {
        self.update(set, slave, |s| {
            s.state = "running";
            s.last_error = None;
            s.last_apply = Some(now());
            s.batches += 1;
            s.events += events;
            s.conflicts += conflicts;
            let seconds = took.as_secs_f64();
            s.apply_seconds += seconds;
            if let Some(i) = BUCKETS.iter().position(|&b| seconds <= b) {
                s.buckets[i] += 1;
            }
        });
    }

    /// Records what a batch applied per slave table, and its conflicts.
    pub fn activity<'a>(
        &self,
        (set, slave): (&str, u32),
        tables: impl Iterator<Item = (&'a String, &'a u64)>,
        conflicts: &[String],
    ) {
        self.update(set, slave, |s| {
            for (table, events) in tables {
                *s.tables.entry(table.clone()).or_default() += events;
            }
            let at = now();
            for note in conflicts {
                keep(&mut s.recent_conflicts, (at.clone(), note.clone()), RECENT);
            }
        });
    }

    /// Records a lag check: the gauges, and a sample of the slave's history.
    pub fn sample(&self, set: &str, slave: u32, lag_events: i64, lag_seconds: f64) {
        self.update(set, slave, |s| {
            s.lag_events = lag_events;
            s.lag_seconds = lag_seconds;
            let at = epoch();
            let sample = Sample {
                at,
                lag_seconds,
                lag_events,
                events: s.events,
            };
            keep(&mut s.history, sample, HISTORY_SAMPLES);
            while s
                .history
                .front()
                .is_some_and(|f| f.at < at - HISTORY_SECONDS)
            {
                s.history.pop_front();
            }
        });
    }

    /// Everything in Prometheus' text format.
    pub fn prometheus(&self) -> String {
        let all = self.0.lock().map(|a| a.clone()).unwrap_or_default();
        prometheus(&all)
    }
}

/// A metric shown per slave: name, type, help, and how to read it.
type Series = (
    &'static str,
    &'static str,
    &'static str,
    fn(&SlaveCounts) -> f64,
);

fn prometheus(all: &BTreeMap<(String, u32), SlaveCounts>) -> String {
    let mut out = String::new();
    let series: [Series; 9] = [
        (
            "pgreplica_slave_running",
            "gauge",
            "1 while the slave applies batches, 0 while an error stops it (retrying).",
            |s| f64::from(u8::from(s.state != "stopped")),
        ),
        (
            "pgreplica_events_applied_total",
            "counter",
            "Events applied.",
            |s| s.events as f64,
        ),
        (
            "pgreplica_batches_total",
            "counter",
            "Batches committed.",
            |s| s.batches as f64,
        ),
        (
            "pgreplica_conflicts_total",
            "counter",
            "Conflicts detected.",
            |s| s.conflicts as f64,
        ),
        (
            "pgreplica_errors_total",
            "counter",
            "Errors that stopped the slave.",
            |s| s.errors as f64,
        ),
        (
            "pgreplica_reconnects_total",
            "counter",
            "Connections made again.",
            |s| s.reconnects as f64,
        ),
        (
            "pgreplica_lag_events",
            "gauge",
            "Events waiting for the slave.",
            |s| s.lag_events as f64,
        ),
        (
            "pgreplica_lag_seconds",
            "gauge",
            "Age of the oldest committed event not applied.",
            |s| s.lag_seconds,
        ),
        (
            "pgreplica_wal_kept_bytes",
            "gauge",
            "WAL the slave's replication slot keeps on the master (CAPTURE = wal; else 0).",
            |s| s.wal_kept_bytes as f64,
        ),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for ((set, slave), s) in all {
            let _ = writeln!(
                out,
                "{name}{{set=\"{}\",slave=\"{slave}\"}} {}",
                escape(set),
                value(s)
            );
        }
    }
    let name = "pgreplica_batch_apply_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time to apply and commit one batch on the slave.\n# TYPE {name} histogram"
    );
    for ((set, slave), s) in all {
        let labels = format!("set=\"{}\",slave=\"{slave}\"", escape(set));
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(s.buckets) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", s.batches);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", s.apply_seconds);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", s.batches);
    }
    out
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_is_bounded_and_a_retried_error_is_one_entry() {
        let metrics = Metrics::default();
        for _ in 0..1000 {
            metrics.sample("s", 1, 3, 0.5);
        }
        metrics.update("s", 1, |c| {
            c.stopped("e".into(), "e".into());
            c.stopped("e".into(), "e".into());
            c.stopped("f".into(), "f".into());
        });
        let all = metrics.snapshot();
        let counts = &all[&("s".to_string(), 1)];
        assert_eq!(counts.history.len(), HISTORY_SAMPLES);
        assert_eq!(counts.recent_errors.len(), 2);
        assert_eq!((counts.recent_errors[0].3, counts.errors), (2, 3));
    }

    #[test]
    fn batches_fill_counters_and_a_cumulative_histogram() {
        let metrics = Metrics::default();
        metrics.batch("m\"t", 1, 10, 1, Duration::from_millis(3));
        metrics.batch("m\"t", 1, 5, 0, Duration::from_millis(300));
        let text = metrics.prometheus();
        assert!(text.contains("pgreplica_events_applied_total{set=\"m\\\"t\",slave=\"1\"} 15"));
        assert!(text.contains("pgreplica_conflicts_total{set=\"m\\\"t\",slave=\"1\"} 1"));
        assert!(text.contains(
            "pgreplica_batch_apply_seconds_bucket{set=\"m\\\"t\",slave=\"1\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "pgreplica_batch_apply_seconds_bucket{set=\"m\\\"t\",slave=\"1\",le=\"0.5\"} 2"
        ));
        assert!(text.contains("pgreplica_batch_apply_seconds_count{set=\"m\\\"t\",slave=\"1\"} 2"));
    }
}
