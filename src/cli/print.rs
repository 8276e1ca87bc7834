//! What `pgreplica status` prints.

use pgreplica::status;

/// `pgreplica status` as a table.
pub fn status(all: &[status::SlaveStatus]) {
    println!(
        "{:<16} {:>5} {:<12} {:>10} {:>9} {:>10} {:<32} LAST ERROR",
        "SET", "SLAVE", "STATE", "WAITING", "LAG(s)", "WAL(MB)", "LAST APPLY"
    );
    for s in all {
        // Under WAL capture: what its slot keeps on the master.
        let kept = s
            .wal_kept_bytes
            .map_or("-".into(), |b| format!("{:.1}", b as f64 / 1e6));
        println!(
            "{:<16} {:>5} {:<12} {:>10} {:>9.1} {:>10} {:<32} {}",
            s.set,
            s.slave,
            s.state,
            s.events_waiting,
            s.lag_seconds,
            kept,
            s.last_apply.as_deref().unwrap_or("-"),
            s.last_error.as_deref().unwrap_or("-")
        );
    }
}
