//! `CAPTURE=`: where a set's changes are read on the master.

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

#[cfg(test)]
mod tests {
    use super::super::{Config, Policy};
    use super::*;
    use std::path::Path;

    #[test]
    fn wal_capture_takes_every_option_the_trigger_does() {
        let base = "[MAIN]\nNAME=s\nDSN0=host=m\nDSN1=host=s\nCAPTURE=wal\n";
        let ok = Config::parse(Path::new("s.conf"), base).unwrap();
        assert_eq!(ok.capture, Capture::Wal);
        let filtered = format!("{base}[TABLE public.t]\nSLAVE_TABLE=public.u\nFILTER=new.a > 0\n");
        assert!(Config::parse(Path::new("s.conf"), &filtered).is_ok());
        let nodes = format!("{base}NODE0=a\nNODE1=b\n");
        assert!(Config::parse(Path::new("s.conf"), &nodes).is_ok());
        for policy in ["newest", "priority"] {
            let text = format!("{nodes}CONFLICT={policy}\nPRIORITY=a, b\n");
            let set = Config::parse(Path::new("s.conf"), &text).unwrap();
            assert!(set.policies().all(Policy::reads_history));
        }
        let bad = base.replace("wal", "logical");
        let e = Config::parse(Path::new("s.conf"), &bad).unwrap_err();
        assert!(e.to_string().contains("not trigger or wal"), "{e}");
    }
}
