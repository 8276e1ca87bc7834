//! Conflicts: what a change from another node found on the slave, and which
//! side a set's policy lets win.

use crate::config::{Config, Policy};
use crate::ident::TableName;
use std::collections::HashMap;
use std::fmt;

/// What a change found on the slave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An insert whose key the slave already has.
    InsertExisting,
    /// An update of a row the slave does not have (deleted there).
    UpdateMissing,
    /// An update of a row whose changed columns no longer hold the values they
    /// had on the master (both sides changed it).
    UpdateChanged,
    /// A delete of a row the slave does not have.
    DeleteMissing,
    /// A delete of a row the slave changed.
    DeleteChanged,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::InsertExisting => "insert of an existing key",
            Kind::UpdateMissing => "update of a missing row",
            Kind::UpdateChanged => "update of a row changed on both sides",
            Kind::DeleteMissing => "delete of a missing row",
            Kind::DeleteChanged => "delete of a row changed on the slave",
        })
    }
}

/// Which side a conflict's resolution keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Winner {
    /// The slave's row.
    Local,
    /// The master's change.
    Remote,
}

impl Winner {
    /// The name `pgreplica conflicts` shows and `--resolve` takes.
    pub fn name(self) -> &'static str {
        match self {
            Winner::Local => "keep-local",
            Winner::Remote => "apply-remote",
        }
    }

    /// Reads `keep-local` or `apply-remote`.
    pub fn parse(text: &str) -> Option<Winner> {
        match text {
            "keep-local" => Some(Winner::Local),
            "apply-remote" => Some(Winner::Remote),
            _ => None,
        }
    }
}

/// One side of a conflict: when and where its version of the row was made.
#[derive(Debug, Clone, PartialEq)]
pub struct Version {
    /// Seconds since the epoch; `None` when unknown.
    pub time: Option<f64>,
    /// The node it was made on.
    pub node: Option<String>,
    /// When `time` is unknown: a time the change is known to precede (its
    /// node's log no longer holds it, and held nothing older than this).
    /// `None` when the node keeps no log of the table, so that no other node
    /// ever learns of its changes.
    pub before: Option<f64>,
}

impl Version {
    /// A version nothing is known of.
    pub fn unknown() -> Version {
        Version {
            time: None,
            node: None,
            before: None,
        }
    }
}

/// A conflict as recorded in `pgreplica.conflicts`.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// The set.
    pub set: String,
    /// The slave's table.
    pub table: TableName,
    /// The row's key, `(k)=(v)`.
    pub key: String,
    /// What happened.
    pub kind: Kind,
    /// The event in the master's log.
    pub event: i64,
    /// The node the change came from.
    pub origin: Option<String>,
    /// The slave's row, as `(col=value, …)`, if any.
    pub local: Option<String>,
    /// The master's row after the change (or before, for a delete).
    pub remote: Option<String>,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "conflict: {} on table {}, key {}, event {} from {}: slave {}, master {}",
            self.kind,
            self.table,
            self.key,
            self.event,
            self.origin.as_deref().unwrap_or("the master"),
            self.local.as_deref().unwrap_or("(no row)"),
            self.remote.as_deref().unwrap_or("(no row)"),
        )
    }
}

/// A set's conflict policies, for one slave.
#[derive(Debug, Clone)]
pub struct Resolver {
    /// The set.
    pub set: String,
    /// The slave's node name.
    pub node: Option<String>,
    policy: Policy,
    tables: HashMap<TableName, Policy>,
    priority: Vec<String>,
}

impl Resolver {
    /// The set's policies, or `None` when neither the set nor a table has one
    /// (changes are then applied as far as possible and conflicts only logged).
    pub fn new(set: &Config, slave: u32) -> Option<Resolver> {
        let tables: HashMap<TableName, Policy> = set
            .tables
            .iter()
            .filter_map(|t| Some((t.table.clone(), t.conflict?)))
            .collect();
        if set.conflict.is_none() && tables.is_empty() {
            return None;
        }
        Some(Resolver {
            set: set.name.clone(),
            node: set.nodes.get(&slave).cloned(),
            policy: set.conflict.unwrap_or(Policy::Stop),
            tables,
            priority: set.priority.clone(),
        })
    }

    /// The policy of a master table.
    pub fn policy(&self, table: &TableName) -> Policy {
        self.tables.get(table).copied().unwrap_or(self.policy)
    }

    /// Which side wins under `policy`; `None` for `Stop`, and for `Newest`
    /// when the slave cannot tell which change is the newer.
    pub fn decide(&self, policy: Policy, local: &Version, remote: &Version) -> Option<Winner> {
        let rank = |v: &Version| {
            let node = v.node.as_ref().or(self.node.as_ref());
            node.and_then(|n| self.priority.iter().position(|p| p == n))
                .unwrap_or(usize::MAX)
        };
        let by_priority = || {
            if rank(remote) < rank(local) {
                Winner::Remote
            } else {
                Winner::Local
            }
        };
        Some(match policy {
            Policy::Stop => return None,
            Policy::KeepLocal => Winner::Local,
            Policy::ApplyRemote => Winner::Remote,
            Policy::Priority => by_priority(),
            // Each side must reach the same winner. A node that no longer
            // knows when its own row changed knows only that it was before
            // `before`, while the other node may still know both times: a
            // remote change after that is the newer on both; one before it
            // cannot be judged here, and waits for the DBA.
            Policy::Newest => match (local.time, remote.time) {
                (Some(l), Some(r)) if r > l => Winner::Remote,
                (Some(l), Some(r)) if r < l => Winner::Local,
                (None, Some(r)) => match local.before {
                    Some(before) if r <= before => return None,
                    _ => Winner::Remote,
                },
                _ => by_priority(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver(priority: &[&str]) -> Resolver {
        Resolver {
            set: "s".into(),
            node: Some("b".into()),
            policy: Policy::Newest,
            tables: HashMap::new(),
            priority: priority.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn version(time: Option<f64>, node: &str) -> Version {
        Version {
            time,
            node: Some(node.into()),
            before: None,
        }
    }

    #[test]
    fn a_table_section_overrides_the_set_policy() {
        let path = std::path::Path::new("shop.conf");
        let text = "[MAIN]\nNAME=s\nDSN0=host=a\nDSN1=host=b\nNODE1=hq\nCONFLICT=newest\n\
                    [TABLE stock]\nCONFLICT=keep-local\n";
        let set = Config::parse(path, text).unwrap();
        let r = Resolver::new(&set, 1).unwrap();
        assert_eq!(r.node.as_deref(), Some("hq"));
        assert_eq!(
            r.policy(&TableName::parse("stock").unwrap()),
            Policy::KeepLocal
        );
        assert_eq!(
            r.policy(&TableName::parse("orders").unwrap()),
            Policy::Newest
        );
        let plain = Config::parse(path, "[MAIN]\nNAME=s\nDSN0=host=a\nDSN1=host=b\n").unwrap();
        assert!(Resolver::new(&plain, 1).is_none());
        // newest reads the nodes' own logs: they are kept a week unless told.
        assert_eq!(set.log_keep, crate::config::DEFAULT_LOG_KEEP);
        assert_eq!(plain.log_keep, std::time::Duration::ZERO);
        let told = Config::parse(path, &text.replace("NAME=s\n", "NAME=s\nLOG_KEEP=60\n")).unwrap();
        assert_eq!(told.log_keep, std::time::Duration::from_secs(60));
    }

    #[test]
    fn both_sides_of_a_conflict_pick_the_same_winner() {
        let r = resolver(&["a", "b"]);
        let (a, b) = (version(Some(10.0), "a"), version(Some(20.0), "b"));
        // On node b the change from a is remote, and the other way round.
        assert_eq!(r.decide(Policy::Newest, &b, &a), Some(Winner::Local));
        assert_eq!(r.decide(Policy::Newest, &a, &b), Some(Winner::Remote));
        assert_eq!(r.decide(Policy::Priority, &b, &a), Some(Winner::Remote));
        assert_eq!(r.decide(Policy::Priority, &a, &b), Some(Winner::Local));
        let tie = version(Some(10.0), "b");
        assert_eq!(r.decide(Policy::Newest, &tie, &a), Some(Winner::Remote));
        assert_eq!(r.decide(Policy::Stop, &a, &b), None);
        // Node b no longer finds its own change (time 20) in its log, cleaned
        // of changes up to time 25; node a still knows both times.
        let forgotten = |before| Version {
            time: None,
            before: Some(before),
            ..version(None, "b")
        };
        // a's change at 30 is newer than anything b forgot: a on both sides.
        let late = version(Some(30.0), "a");
        assert_eq!(r.decide(Policy::Newest, &b, &late), Some(Winner::Remote));
        assert_eq!(r.decide(Policy::Newest, &late, &b), Some(Winner::Local));
        assert_eq!(
            r.decide(Policy::Newest, &forgotten(25.0), &late),
            Some(Winner::Remote)
        );
        // a's change at 10 may be older or newer than what b forgot: b cannot
        // tell, and waits for the DBA rather than guess against node a.
        assert_eq!(r.decide(Policy::Newest, &forgotten(25.0), &a), None);
        // A node that logs nothing of the table: nobody else knows its change.
        assert_eq!(
            r.decide(Policy::Newest, &version(None, "b"), &a),
            Some(Winner::Remote)
        );
        assert_eq!(Policy::parse("Keep-Local"), Ok(Policy::KeepLocal));
        assert!(Policy::parse("maybe").is_err());
    }
}
