//! `CAPTURE=`: where a set's changes are read on the master, and what capture
//! from the WAL does not do yet.

use super::{Config, Policy};
use std::collections::BTreeMap;

/// Where a set's changes are read on the master (`CAPTURE=`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Capture {
    /// Triggers write each change to `pgreplica.log` (any PostgreSQL, any host).
    #[default]
    Trigger,
    /// A logical replication slot per slave decodes the WAL (`wal_level =
    /// logical`): the master's writes cost next to nothing more.
    Wal,
}

/// What `CAPTURE = wal` does not do yet: the conflict policies `newest` and
/// `priority`, which read when and where a node's row last changed in the
/// node's own log (the WAL keeps no such record of a deleted row). A
/// `[TABLE]` section's `OPERATIONS`, `COLUMNS`, `EXCLUDE_COLUMNS` and
/// `FILTER` are applied to the changes as they are decoded; in multi-master
/// each apply marks its origin for the WAL reader.
pub(super) fn wal_limits(
    config: &Config,
    seen: &BTreeMap<(String, String), usize>,
) -> Result<(), (usize, String, String)> {
    let reason = "is not supported with CAPTURE = wal yet: remove it, or use CAPTURE = trigger";
    let reads_log = |p: Option<Policy>| matches!(p, Some(Policy::Newest | Policy::Priority));
    let policy = match config.tables.iter().find(|t| reads_log(t.conflict)) {
        Some(t) => Some((t.line, format!("[TABLE {}] CONFLICT", t.table))),
        None if reads_log(config.conflict) => seen
            .get(&("MAIN".to_string(), "CONFLICT".to_string()))
            .map(|&line| (line, "CONFLICT".to_string())),
        None => None,
    };
    if let Some((line, key)) = policy {
        let reason = format!(
            "{reason} (newest and priority read the node's own log of its changes; \
             stop, keep-local and apply-remote work with both)"
        );
        return Err((line, key, reason));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn wal_capture_refuses_what_only_the_trigger_does() {
        let base = "[MAIN]\nNAME=s\nDSN0=host=m\nDSN1=host=s\nCAPTURE=wal\n";
        let ok = Config::parse(Path::new("s.conf"), base).unwrap();
        assert_eq!(ok.capture, Capture::Wal);
        let filtered = format!("{base}[TABLE public.t]\nSLAVE_TABLE=public.u\nFILTER=new.a > 0\n");
        assert!(Config::parse(Path::new("s.conf"), &filtered).is_ok());
        let nodes = format!("{base}NODE0=a\nNODE1=b\n");
        assert!(Config::parse(Path::new("s.conf"), &nodes).is_ok());
        let newest = format!("{nodes}CONFLICT=newest\n");
        let e = Config::parse(Path::new("s.conf"), &newest).unwrap_err();
        assert!(e.to_string().contains("s.conf:8: CONFLICT"), "{e}");
        let bad = base.replace("wal", "logical");
        let e = Config::parse(Path::new("s.conf"), &bad).unwrap_err();
        assert!(e.to_string().contains("not trigger or wal"), "{e}");
    }
}
