//! Meter of a long copy: on a terminal, a line per table redrawn in place
//! (rows, bytes, rate, ETA); otherwise a log line per table every 10 seconds
//! and when it is done.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Shared progress of several tables; cheap to clone.
#[derive(Clone)]
pub struct Meter(Arc<Mutex<State>>);

struct State {
    tables: BTreeMap<String, Table>,
    terminal: bool,
    /// Lines drawn last time on the terminal, to redraw over them.
    drawn: usize,
    stopped: bool,
}

struct Table {
    estimate: i64,
    rows: u64,
    bytes: u64,
    started: Option<Instant>,
    done: bool,
    logged: Instant,
}

impl Meter {
    /// Starts showing progress for these tables (name, estimated rows).
    pub fn start(tables: impl Iterator<Item = (String, i64)>) -> Meter {
        let now = Instant::now();
        let tables = tables
            .map(|(name, estimate)| {
                let t = Table {
                    estimate,
                    rows: 0,
                    bytes: 0,
                    started: None,
                    done: false,
                    logged: now,
                };
                (name, t)
            })
            .collect();
        let progress = Meter(Arc::new(Mutex::new(State {
            tables,
            terminal: std::io::stderr().is_terminal(),
            drawn: 0,
            stopped: false,
        })));
        let ticker = progress.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if !ticker.with(State::tick) {
                    return;
                }
            }
        });
        progress
    }

    /// Counts rows and bytes copied into `table`.
    pub fn add(&self, table: &str, rows: u64, bytes: u64) {
        self.with(|s| {
            if let Some(t) = s.tables.get_mut(table) {
                t.started.get_or_insert_with(Instant::now);
                t.rows += rows;
                t.bytes += bytes;
            }
            true
        });
    }

    /// Marks `table` as copied.
    pub fn done(&self, table: &str) {
        self.with(|s| {
            if let Some(t) = s.tables.get_mut(table) {
                t.started.get_or_insert_with(Instant::now);
                t.done = true;
                if !s.terminal {
                    tracing::info!("{}", line(table, t));
                }
            }
            true
        });
    }

    /// Draws the last state and stops.
    pub fn finish(&self) {
        self.with(|s| {
            s.tick();
            s.stopped = true;
            false
        });
    }

    fn with(&self, f: impl FnOnce(&mut State) -> bool) -> bool {
        match self.0.lock() {
            Ok(mut state) => f(&mut state),
            Err(_) => false,
        }
    }
}

impl State {
    /// Shows the current state; false once stopped.
    fn tick(&mut self) -> bool {
        if self.stopped {
            return false;
        }
        if self.terminal {
            let mut out = String::new();
            if self.drawn > 0 {
                out.push_str(&format!("\x1b[{}A", self.drawn));
            }
            let shown: Vec<(&String, &Table)> = self
                .tables
                .iter()
                .filter(|(_, t)| t.started.is_some())
                .collect();
            for (name, t) in &shown {
                out.push_str(&format!("\x1b[2K{}\n", line(name, t)));
            }
            self.drawn = shown.len();
            let _ = std::io::stderr().write_all(out.as_bytes());
        } else {
            for (name, t) in self.tables.iter_mut() {
                if t.started.is_some() && !t.done && t.logged.elapsed() >= Duration::from_secs(10) {
                    t.logged = Instant::now();
                    tracing::info!("{}", line(name, t));
                }
            }
        }
        true
    }
}

/// `table  [#####.....]  1234/5000 rows  12.3 MB  4567 rows/s  ETA 1s`
fn line(name: &str, t: &Table) -> String {
    let seconds = t
        .started
        .map_or(0.0, |s| s.elapsed().as_secs_f64())
        .max(0.001);
    let rate = t.rows as f64 / seconds;
    let total = (t.estimate.max(0) as u64).max(t.rows);
    let fraction = if t.done || total == 0 {
        1.0
    } else {
        t.rows as f64 / total as f64
    };
    let filled = (fraction * 20.0).round() as usize;
    let eta = if t.done {
        "done".to_string()
    } else if rate > 0.0 {
        format!("ETA {:.0}s", (total - t.rows) as f64 / rate)
    } else {
        "ETA ?".to_string()
    };
    format!(
        "{name:<32} [{}{}] {:>10}/{:<10} rows {:>9.1} MB {:>9.0} rows/s  {eta}",
        "#".repeat(filled),
        ".".repeat(20 - filled.min(20)),
        t.rows,
        total,
        t.bytes as f64 / 1e6,
        rate
    )
}
