//! Checks across the set files one daemon runs: what one file may not give
//! differently from another, and sets that would loop.

use super::{Config, PROCESS_KEYS, TableConfig};

/// Two files reading the same master that give one table different capture
/// options (the master's log is shared, so they would undo each other): a
/// message naming both places, or `None`.
pub fn capture_clash(sets: &[Config]) -> Option<String> {
    let captured = |t: &TableConfig| {
        (
            t.operations.clone(),
            t.filter.clone(),
            t.columns.clone(),
            t.exclude.clone(),
        )
    };
    for (i, a) in sets.iter().enumerate() {
        for b in sets[i + 1..].iter().filter(|b| b.master == a.master) {
            for ta in &a.tables {
                if let Some(tb) = b
                    .section(&ta.table)
                    .filter(|tb| captured(tb) != captured(ta))
                {
                    return Some(format!(
                        "{}:{} and {}:{} give table {} different capture options (OPERATIONS, \
                         FILTER, COLUMNS, EXCLUDE_COLUMNS), but both sets read the same master \
                         and share its log: give them the same options",
                        a.path.display(),
                        ta.line,
                        b.path.display(),
                        tb.line,
                        ta.table
                    ));
                }
            }
        }
    }
    None
}

/// Two files of one daemon that give a per-process key ([`PROCESS_KEYS`])
/// different values: a message naming both places, or `None`. A file that
/// leaves a key out follows the others.
pub fn process_clash(sets: &[Config]) -> Option<String> {
    let value = |set: &Config, key: &str| match key {
        "USER" => format!("{:?}", set.user),
        "LOGFILE" => format!("{:?}", set.logfile),
        "HTTP" => format!("{:?}", set.http),
        "HTTP_TOKEN" => format!("{:?}", set.http_token),
        "HTTP_METRICS_OPEN" => format!("{:?}", set.http_metrics_open),
        "LOG_FORMAT" => format!("{:?}", set.json_logs),
        _ => format!("{:?}", set.debug_level),
    };
    for key in PROCESS_KEYS {
        let giving: Vec<(&Config, usize)> = sets
            .iter()
            .filter_map(|s| Some((s, *s.process_lines.get(key)?)))
            .collect();
        let Some((first, line)) = giving.first() else {
            continue;
        };
        if let Some((other, other_line)) = giving
            .iter()
            .find(|(s, _)| value(s, key) != value(first, key))
        {
            return Some(format!(
                "{}:{line} and {}:{other_line} give {key} different values, but one daemon \
                 runs both files and has one {key}: give the same value in both, or give it \
                 in one file only",
                first.path.display(),
                other.path.display(),
            ));
        }
    }
    None
}

/// Two files that replicate in opposite directions between the same two
/// databases (one's slave is the other's master and back) without node names
/// or `SKIP_USER` on both: every change would come back to where it was made,
/// until a key collides. A message naming both files and the fix, or `None`.
pub fn loop_clash(sets: &[Config]) -> Option<String> {
    // The same server and database, however the connection string spells it.
    let place = |dsn: &str| {
        let c = crate::db::parse_dsn(dsn).ok()?;
        Some(format!(
            "{:?} {:?} {:?}",
            c.get_hosts(),
            c.get_ports(),
            c.get_dbname()
        ))
    };
    let guarded = |s: &Config| s.skip_user.is_some() || s.nodes.contains_key(&0);
    for (i, a) in sets.iter().enumerate() {
        for b in &sets[i + 1..] {
            // Each direction must know what the other applied.
            if guarded(a) && guarded(b) {
                continue;
            }
            let (a_master, b_master) = (place(&a.master), place(&b.master));
            let feeds = |from: &Config, to: &Option<String>| {
                to.is_some() && from.slaves.values().any(|d| place(d) == *to)
            };
            if feeds(a, &b_master) && feeds(b, &a_master) {
                return Some(format!(
                    "{} and {} replicate in opposite directions between the same two databases \
                     without node names: every change would come back where it was made. Give \
                     both files NODE0 and NODE1 names (multi-master), or both SKIP_USER",
                    a.path.display(),
                    b.path.display()
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn two_files_may_not_capture_one_table_differently() {
        let file = |name: &str, filter: &str| {
            let text =
                format!("[MAIN]\nNAME={name}\nDSN0=host=m\nDSN1=host=s\n[TABLE t]\n{filter}");
            Config::parse(Path::new(&format!("{name}.conf")), &text).unwrap()
        };
        let same = [file("a", "FILTER=new.x\n"), file("b", "FILTER=new.x\n")];
        assert_eq!(capture_clash(&same), None);
        let clash = [file("a", "FILTER=new.x\n"), file("b", "")];
        let e = capture_clash(&clash).unwrap();
        assert!(e.starts_with("a.conf:5 and b.conf:5 give table"), "{e}");
    }

    #[test]
    fn files_of_one_daemon_must_agree_on_its_process_keys() {
        let file = |name: &str, extra: &str| {
            let text = format!("[MAIN]\nNAME={name}\nDSN0=host=m\nDSN1=host=s\n{extra}");
            Config::parse(Path::new(&format!("{name}.conf")), &text).unwrap()
        };
        let agree = [
            file("a", "LOGFILE=/var/log/p.log\n"),
            file("b", ""),
            file("c", "\nLOGFILE=/var/log/p.log\n"),
        ];
        assert_eq!(process_clash(&agree), None);
        let differ = [
            file("a", "HTTP=127.0.0.1:1\n"),
            file("b", "\nHTTP=127.0.0.1:2\n"),
        ];
        let e = process_clash(&differ).unwrap();
        assert!(
            e.starts_with("a.conf:5 and b.conf:6 give HTTP different values"),
            "{e}"
        );
    }

    #[test]
    fn opposite_sets_without_node_names_are_refused() {
        let file = |name: &str, from: &str, to: &str, extra: &str| {
            let text = format!("[MAIN]\nNAME={name}\nDSN0={from}\nDSN1={to}\n{extra}");
            Config::parse(Path::new(&format!("{name}.conf")), &text).unwrap()
        };
        let (hq, shop) = ("host=hq dbname=app", "dbname=app host=shop port=5432");
        let e = loop_clash(&[file("up", shop, hq, ""), file("down", hq, shop, "")]).unwrap();
        assert!(
            e.starts_with("up.conf and down.conf replicate in opposite"),
            "{e}"
        );
        let named = [
            file("up", shop, hq, "NODE0=shop\nNODE1=hq\n"),
            file("down", hq, shop, "NODE0=hq\nNODE1=shop\n"),
        ];
        assert_eq!(loop_clash(&named), None);
        let skip = [
            file("up", shop, hq, "SKIP_USER=r\n"),
            file("down", hq, shop, "SKIP_USER=r\n"),
        ];
        assert_eq!(loop_clash(&skip), None);
        let half = [
            file("up", shop, hq, "SKIP_USER=r\n"),
            file("down", hq, shop, ""),
        ];
        assert!(loop_clash(&half).is_some());
        let one_way = [file("a", shop, hq, ""), file("b", shop, "host=other", "")];
        assert_eq!(loop_clash(&one_way), None);
    }
}
