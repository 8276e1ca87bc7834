//! What travels between the stages: snapshots of a master, events, the tables
//! they belong to, and which origins a slave takes.

use crate::ident::TableName;
use crate::record::Fields;

/// A master snapshot (`txid_snapshot`): transactions below `xmin` are finished,
/// those from `xmax` on are not, and `xip` lists those in between still running.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Snapshot {
    /// Oldest transaction still running.
    pub xmin: i64,
    /// First transaction not yet started.
    pub xmax: i64,
    /// Transactions between xmin and xmax still running.
    pub xip: Vec<i64>,
}

impl Snapshot {
    /// The position before every event: a new slave starts here.
    pub fn start() -> Snapshot {
        Snapshot {
            xmin: 1,
            xmax: 1,
            xip: Vec::new(),
        }
    }

    /// Reads `xmin:xmax:xip,xip,…`.
    pub fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<_>>()?,
        };
        Some(Snapshot { xmin, xmax, xip })
    }

    /// True when every transaction visible in `earlier` is visible in `self`,
    /// that is, when `self` was taken after `earlier`.
    pub fn includes(&self, earlier: &Snapshot) -> bool {
        self.xmax >= earlier.xmax
            && self
                .xip
                .iter()
                .all(|x| *x >= earlier.xmax || earlier.xip.contains(x))
    }

    /// True when no transaction committed between `self` and the later `next`.
    pub fn same_as(&self, next: &Snapshot) -> bool {
        self.xmax == next.xmax && self.xip == next.xip
    }
}

impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let xip: Vec<String> = self.xip.iter().map(i64::to_string).collect();
        write!(f, "{}:{}:{}", self.xmin, self.xmax, xip.join(","))
    }
}

/// What an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A row was inserted.
    Insert,
    /// A row was updated.
    Update,
    /// A row was deleted.
    Delete,
    /// The table was truncated; a partition of it when `old` holds one field:
    /// the partition's constraint, a condition on the table's columns.
    Truncate,
    /// A statement queued with `pgreplica.execute`, in `new`'s only field.
    Execute,
}

/// One change of the master's log, its rows split into fields.
#[derive(Debug, Clone)]
pub struct Event {
    /// Position in the log.
    pub id: i64,
    /// The master table's oid.
    pub table: u32,
    /// What was done.
    pub op: Op,
    /// The row before the change (update, delete).
    pub old: Option<Fields>,
    /// The row after the change (insert, update).
    pub new: Option<Fields>,
    /// The node where the change was made, when nodes are named (multi-master).
    pub origin: Option<String>,
    /// When the master logged it, in seconds since the epoch.
    pub time: Option<f64>,
}

impl Event {
    /// The bytes of its rows' text, old and new.
    pub fn size(&self) -> usize {
        [&self.old, &self.new]
            .into_iter()
            .flatten()
            .flatten()
            .map(|v| v.as_ref().map_or(0, String::len))
            .sum()
    }
}

/// Which events of a master a slave takes, by the node they came from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Origins {
    /// The master's node name: the origin of its own changes.
    pub master: Option<String>,
    /// The slave's node name: changes that came from it never go back.
    pub slave: Option<String>,
    /// Only the master's own changes, none it applied from other nodes (a mesh,
    /// or the spokes of a star).
    pub local_only: bool,
}

impl Origins {
    /// Whether the slave takes `event`: never a change that came from its own
    /// node, and with `local_only` only the master's own changes. (Trigger
    /// capture asks the same of the log in SQL.)
    pub fn takes(&self, event: &Event) -> bool {
        let returning = self.slave.is_some() && event.origin == self.slave;
        !returning && (!self.local_only || event.origin == self.master)
    }
}

/// A master table as the log describes it: its name, columns in row order, and key.
#[derive(Debug, Default)]
pub struct MasterTable {
    /// Qualified name on the master.
    pub name: TableName,
    /// The name it had when it was attached to capture, when it was renamed or
    /// moved to another schema since without `execute`: the slave's copy may
    /// still have that name.
    pub was: Option<TableName>,
    /// Column names in the order of the row text's fields.
    pub columns: Vec<String>,
    /// Positions of the primary key's columns in `columns`.
    pub key: Vec<usize>,
}

impl MasterTable {
    /// The key of a row, as PostgreSQL shows it: `(a, b)=(1, x)`.
    pub fn key_text(&self, row: &Fields) -> String {
        let names: Vec<&str> = self.key.iter().map(|&k| self.columns[k].as_str()).collect();
        let values: Vec<&str> = self
            .key
            .iter()
            .map(|&k| row.get(k).and_then(|v| v.as_deref()).unwrap_or("NULL"))
            .collect();
        format!("({})=({})", names.join(", "), values.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn snapshots_round_trip() {
        let s = Snapshot::parse("10:20:12,15").unwrap();
        assert_eq!(s.xip, vec![12, 15]);
        assert_eq!(s.to_string(), "10:20:12,15");
        assert_eq!(Snapshot::parse("5:5:").unwrap().to_string(), "5:5:");
        assert!(Snapshot::parse("x:1:").is_none());
        assert!(Snapshot::start().same_as(&Snapshot::parse("1:1:").unwrap()));
        assert!(!s.same_as(&Snapshot::parse("12:20:15").unwrap()));
    }

    #[test]
    fn a_later_snapshot_includes_an_earlier_one() {
        let earlier = Snapshot::parse("10:20:12,15").unwrap();
        let later = Snapshot::parse("15:30:15,25").unwrap();
        assert!(later.includes(&earlier));
        assert!(earlier.includes(&earlier));
        // 12 committed after `earlier` was taken, and 18 was visible in it.
        assert!(!earlier.includes(&later));
        assert!(!Snapshot::parse("10:30:18").unwrap().includes(&earlier));
        assert!(!Snapshot::parse("10:19:").unwrap().includes(&earlier));
    }
}
