//! How a master's rows land on a slave: the table and column renames and the
//! transform scripts of a set's `[TABLE]` sections, between reading a batch and
//! applying it.

use crate::config::Config;
use crate::error::Error;
use crate::event::{Event, MasterTable, Op};
use crate::ident::TableName;
use crate::record::Fields;
use crate::transform::Scripts;
use std::collections::HashMap;
use std::sync::Arc;

/// A master table's way to the slave.
struct Route {
    slave: Option<TableName>,
    renames: HashMap<String, String>,
    script: Option<usize>,
}

/// Adapts the events of one set's batches for one slave; tables without a
/// section pass unchanged.
pub struct Adapter {
    routes: HashMap<TableName, Route>,
    scripts: Scripts,
    /// The adapted definitions of the current batch, by master definition
    /// (its address) and the columns a transform added.
    tables: HashMap<usize, Renamed>,
    /// What the current event became.
    out: Adapted,
}

/// Events ready for the applier, with the definitions they are read with.
type Adapted = Vec<(Arc<MasterTable>, Event)>;

/// A master definition (kept alive, so that its address stays its own) and
/// its definitions on the slave, by the columns a transform added.
type Renamed = (Arc<MasterTable>, Vec<(Vec<String>, Arc<MasterTable>)>);

impl Adapter {
    /// Whether the set has transform scripts (which run off the async workers).
    pub fn runs_scripts(&self) -> bool {
        self.scripts.loaded() > 0
    }

    /// Reads the set's `[TABLE]` sections and loads their transform scripts.
    pub fn new(set: &Config) -> Result<Adapter, Error> {
        let mut scripts =
            Scripts::new(set.transform_memory << 20, set.transform_time).map_err(|message| {
                Error::Options {
                    path: set.path.clone(),
                    line: 0,
                    message,
                }
            })?;
        let mut routes = HashMap::new();
        for t in &set.tables {
            let script = match &t.transform {
                Some(path) => Some(scripts.load(path).map_err(|m| Error::Options {
                    path: set.path.clone(),
                    line: t.line,
                    message: format!("[TABLE {}] TRANSFORM {}: {m}", t.table, path.display()),
                })?),
                None => None,
            };
            if t.slave_table.is_some() || !t.renames.is_empty() || script.is_some() {
                let route = Route {
                    slave: t.slave_table.clone(),
                    renames: t.renames.iter().cloned().collect(),
                    script,
                };
                routes.insert(t.table.clone(), route);
            }
        }
        Ok(Adapter {
            routes,
            scripts,
            tables: HashMap::new(),
            out: Vec::new(),
        })
    }

    /// Forgets the definitions of the previous batch.
    pub fn begin(&mut self) {
        self.tables.clear();
    }

    /// What `event` of `table` becomes on the slave: itself, renamed, or the
    /// rows its transform gives back.
    pub fn adapt(
        &mut self,
        table: &Arc<MasterTable>,
        event: Event,
    ) -> Result<std::vec::Drain<'_, (Arc<MasterTable>, Event)>, Error> {
        let mut out = std::mem::take(&mut self.out);
        let result = self.reshape(table, event, &mut out);
        if result.is_err() {
            out.clear();
        }
        self.out = out;
        result?;
        Ok(self.out.drain(..))
    }

    fn reshape(
        &mut self,
        table: &Arc<MasterTable>,
        event: Event,
        out: &mut Adapted,
    ) -> Result<(), Error> {
        let route = match self.routes.is_empty() {
            true => None,
            false => self.routes.get(&table.name),
        };
        let Some(route) = route else {
            out.push((table.clone(), event));
            return Ok(());
        };
        let script = route.script;
        let renamed = self.renamed(table, &[])?;
        let Some(script) =
            script.filter(|_| matches!(event.op, Op::Insert | Op::Update | Op::Delete))
        else {
            out.push((renamed, event));
            return Ok(());
        };
        let id = event.id;
        let mut run = |op: &str, row: Option<Fields>| match row {
            Some(row) => self.run(script, op, table, &renamed, id, row),
            None => Ok(Vec::new()),
        };
        let (old, new) = (event.old.clone(), event.new.clone());
        match event.op {
            Op::Insert => {
                for (t, row) in run("insert", new)? {
                    out.push((t, change(&event, Op::Insert, None, Some(row))));
                }
            }
            Op::Delete => {
                for (t, row) in run("delete", old)? {
                    out.push((t, change(&event, Op::Delete, Some(row), None)));
                }
            }
            _ => {
                let olds = run("update", old)?;
                let mut news = run("update", new)?;
                pair(&event, olds, &mut news, out);
            }
        }
        Ok(())
    }

    /// The definition `table`'s rows have on the slave, with `extra` columns
    /// added by a transform.
    fn renamed(
        &mut self,
        table: &Arc<MasterTable>,
        extra: &[String],
    ) -> Result<Arc<MasterTable>, Error> {
        let id = Arc::as_ptr(table) as usize;
        let known = self.tables.get(&id).map(|(_, v)| v);
        if let Some((_, t)) = known.and_then(|v| v.iter().find(|(e, _)| e == extra)) {
            return Ok(t.clone());
        }
        let route = &self.routes[&table.name];
        if let Some((missing, _)) = route
            .renames
            .iter()
            .find(|(from, _)| !table.columns.contains(from))
        {
            return Err(Error::Schema {
                table: table.name.clone(),
                message: format!(
                    "RENAME_COLUMNS names column {missing}, which the master does not log (it logs {})",
                    table.columns.join(", ")
                ),
            });
        }
        let mut columns: Vec<String> = table
            .columns
            .iter()
            .map(|c| route.renames.get(c).unwrap_or(c).clone())
            .collect();
        columns.extend(extra.iter().cloned());
        let adapted = Arc::new(MasterTable {
            name: route.slave.clone().unwrap_or_else(|| table.name.clone()),
            columns,
            key: table.key.clone(),
            was: route.slave.is_none().then(|| table.was.clone()).flatten(),
        });
        self.tables
            .entry(id)
            .or_insert_with(|| (table.clone(), Vec::new()))
            .1
            .push((extra.to_vec(), adapted.clone()));
        Ok(adapted)
    }

    /// Runs the script on one row (its text fields, named as on the slave).
    fn run(
        &mut self,
        script: usize,
        op: &str,
        table: &Arc<MasterTable>,
        renamed: &MasterTable,
        event: i64,
        row: Fields,
    ) -> Result<Vec<(Arc<MasterTable>, Fields)>, Error> {
        let failed = |message: String, row: &Fields| Error::Transform {
            message: match self.scripts.name(script) {
                name if message.starts_with(name) => message,
                name => format!("{name}: {message}"),
            },
            table: table.name.clone(),
            key: table.key_text(row),
            event,
        };
        let results = self
            .scripts
            .call(script, op, &renamed.columns, &row)
            .map_err(|m| failed(m, &row))?;
        let mut rows = Vec::with_capacity(results.len());
        for mut result in results {
            result.added.sort();
            let names: Vec<String> = result.added.iter().map(|(n, _)| n.clone()).collect();
            result
                .fields
                .extend(result.added.into_iter().map(|(_, v)| v));
            rows.push((self.renamed(table, &names)?, result.fields));
        }
        Ok(rows)
    }
}

/// An event of `op` made from a transformed row.
fn change(from: &Event, op: Op, old: Option<Fields>, new: Option<Fields>) -> Event {
    Event {
        id: from.id,
        table: from.table,
        op,
        old,
        new,
        origin: from.origin.clone(),
        time: from.time,
    }
}

/// An update's transformed rows, paired by table and key as the capture trigger
/// pairs an UPDATE statement's rows: both sides an update, old only a delete
/// (sent first), new only an insert (sent last).
fn pair(
    event: &Event,
    olds: Vec<(Arc<MasterTable>, Fields)>,
    news: &mut Vec<(Arc<MasterTable>, Fields)>,
    out: &mut Adapted,
) {
    let mut updates = Vec::new();
    for (t, old) in olds {
        let key = t.key_text(&old);
        let found = news
            .iter()
            .position(|(n, new)| Arc::ptr_eq(n, &t) && n.key_text(new) == key);
        match found {
            Some(i) => {
                let (_, new) = news.remove(i);
                updates.push((t, change(event, Op::Update, Some(old), Some(new))));
            }
            None => out.push((t, change(event, Op::Delete, Some(old), None))),
        }
    }
    out.extend(updates);
    for (t, new) in news.drain(..) {
        out.push((t, change(event, Op::Insert, None, Some(new))));
    }
}
