//! `[TABLE schema.name]` sections: what is captured of one master table, and
//! how it lands on the slaves.

use super::Policy;
use crate::ident::{TableName, parse_ident};
use std::path::{Path, PathBuf};

/// A `[TABLE schema.name]` section: what is captured of one master table (applied
/// on the master by install and by the daemon) and how it lands on the slaves.
#[derive(Debug, Clone, PartialEq)]
pub struct TableConfig {
    /// The master table.
    pub table: TableName,
    /// The section's line, for messages.
    pub line: usize,
    /// `OPERATIONS`: the operations captured, as letters of `IUDT`.
    pub operations: String,
    /// `FILTER`: only changes for which this SQL boolean over `new.*` and `old.*`
    /// holds are captured.
    pub filter: Option<String>,
    /// `COLUMNS`: only these columns are captured.
    pub columns: Option<Vec<String>>,
    /// `EXCLUDE_COLUMNS`: these columns are not captured.
    pub exclude: Option<Vec<String>>,
    /// `SLAVE_TABLE`: the table's name on the slaves.
    pub slave_table: Option<TableName>,
    /// `RENAME_COLUMNS`: master column → slave column.
    pub renames: Vec<(String, String)>,
    /// `TRANSFORM`: a Lua script that reshapes each row on its way to the slaves.
    pub transform: Option<PathBuf>,
    /// `CONFLICT`: this table's conflict policy, over the set's.
    pub conflict: Option<Policy>,
}

/// The table of a `[TABLE schema.name]` header.
pub(super) fn table_section(header: &str) -> Option<&str> {
    let (word, rest) = header.split_once(char::is_whitespace)?;
    word.eq_ignore_ascii_case("TABLE").then(|| rest.trim())
}

impl TableConfig {
    /// Whether rows land on the slave in another shape or place than the
    /// master's table (columns, renames, transform).
    pub fn reshapes(&self) -> bool {
        self.columns.is_some()
            || self.exclude.is_some()
            || self.slave_table.is_some()
            || !self.renames.is_empty()
            || self.transform.is_some()
    }

    pub(super) fn new(table: TableName, line: usize) -> TableConfig {
        TableConfig {
            table,
            line,
            operations: "IUDT".into(),
            filter: None,
            columns: None,
            exclude: None,
            slave_table: None,
            renames: Vec::new(),
            transform: None,
            conflict: None,
        }
    }

    pub(super) fn key(&mut self, key: &str, value: String, dir: &Path) -> Result<(), String> {
        let names = |value: &str| -> Result<Vec<String>, String> {
            value.split(',').map(parse_ident).collect()
        };
        match key {
            "OPERATIONS" => {
                let mut letters = String::new();
                for op in value.split(',').map(|o| o.trim().to_ascii_lowercase()) {
                    let letter = match op.as_str() {
                        "insert" => 'I',
                        "update" => 'U',
                        "delete" => 'D',
                        "truncate" => 'T',
                        _ => {
                            return Err(format!(
                                "'{op}' is not one of insert, update, delete, truncate"
                            ));
                        }
                    };
                    if !letters.contains(letter) {
                        letters.push(letter);
                    }
                }
                self.operations = letters;
            }
            "FILTER" if value.is_empty() => return Err("empty filter".into()),
            "FILTER" => self.filter = Some(value),
            "COLUMNS" => self.columns = Some(names(&value)?),
            "EXCLUDE_COLUMNS" => self.exclude = Some(names(&value)?),
            "SLAVE_TABLE" => self.slave_table = Some(TableName::parse(&value)?),
            "RENAME_COLUMNS" => {
                for pair in value.split(',') {
                    let (from, to) = pair.split_once(':').ok_or_else(|| {
                        format!("'{}' is not master_column:slave_column", pair.trim())
                    })?;
                    self.renames.push((parse_ident(from)?, parse_ident(to)?));
                }
            }
            "CONFLICT" => self.conflict = Some(Policy::parse(&value)?),
            "TRANSFORM" if value.is_empty() => return Err("empty script path".into()),
            "TRANSFORM" => self.transform = Some(dir.join(value)),
            _ => {
                return Err("unknown key; [TABLE] takes OPERATIONS, FILTER, COLUMNS, EXCLUDE_COLUMNS, SLAVE_TABLE, RENAME_COLUMNS, TRANSFORM, CONFLICT".into());
            }
        }
        Ok(())
    }
}
