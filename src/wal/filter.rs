//! A `[TABLE]` section's `FILTER` under WAL capture: the SQL condition the
//! capture trigger evaluates over `new` and `old`, evaluated on the master for
//! each decoded change of the table, over a session of its own (the slot's
//! session is busy streaming). The row's values come as the WAL has them,
//! every column of the table, before its `[TABLE]` section leaves any out;
//! a condition that is NULL leaves the change out, as the trigger does.

use crate::error::{Context, Error};
use crate::ident::TableName;
use crate::pgoutput::Value;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use tokio_postgres::{Client, Statement};

/// Whether the master has tables whose changes a filter thins out.
const ANY_SQL: &str = "SELECT EXISTS (SELECT FROM pgreplica.tables WHERE filter IS NOT NULL)";

/// A second session on the master for the filters, when the master has any.
pub async fn session(
    master_dsn: &str,
    keepalive: Option<std::time::Duration>,
    master: &Client,
) -> Result<Option<Arc<Client>>, Error> {
    let any: bool = master
        .query_one(ANY_SQL, &[])
        .await
        .on_master("reading the tables' filters on the master")?
        .get(0);
    if !any {
        return Ok(None);
    }
    let client = crate::db::connect(master_dsn, keepalive).await?;
    super::read::session(&client).await?;
    Ok(Some(Arc::new(client)))
}

/// The filters met in one read, prepared on the filters' session.
pub struct Filters {
    client: Option<Arc<Client>>,
    prepared: HashMap<u32, Statement>,
}

impl Filters {
    /// Filters evaluated over `client`; with none, every change is kept
    /// (`check` only gathers the keys changes touch).
    pub fn new(client: Option<Arc<Client>>) -> Filters {
        Filters {
            client,
            prepared: HashMap::new(),
        }
    }

    /// Whether a change of table `oid` (`table`, whose WAL columns are
    /// `columns`) passes `filter`, given its new and old row.
    pub async fn passes(
        &mut self,
        (oid, table, filter): (u32, &TableName, &str),
        columns: &[String],
        new: Option<&[Value]>,
        old: Option<&[Value]>,
    ) -> Result<bool, Error> {
        let Some(client) = &self.client else {
            return Ok(true);
        };
        let doing = format!("evaluating the FILTER of {table} on the master ({filter})");
        let statement = match self.prepared.entry(oid) {
            Entry::Occupied(prepared) => prepared.into_mut(),
            Entry::Vacant(place) => {
                let quoted = table.quoted();
                let sql = format!(
                    "SELECT ({filter}) IS TRUE \
                       FROM json_populate_record(NULL::{quoted}, $1::text::json) AS new, \
                            json_populate_record(NULL::{quoted}, $2::text::json) AS old"
                );
                place.insert(client.prepare(&sql).await.on_master(&doing)?)
            }
        };
        let row = |values: Option<&[Value]>| values.map(|v| as_json(columns, v, old));
        let (new, old) = (row(new), row(old));
        let passes: bool = client
            .query_one(statement, &[&new, &old])
            .await
            .on_master(&doing)?
            .get(0);
        Ok(passes)
    }
}

/// A row's values as a JSON object by column name; a value an update left
/// alone (TOAST) is taken from the old row.
fn as_json(columns: &[String], values: &[Value], old: Option<&[Value]>) -> String {
    let mut object = serde_json::Map::new();
    for (i, (name, value)) in columns.iter().zip(values).enumerate() {
        let value = match value {
            Value::Unchanged => old.and_then(|o| o.get(i)).unwrap_or(&Value::Null),
            other => other,
        };
        let json = match value {
            Value::Text(text) => serde_json::Value::String(text.clone()),
            _ => serde_json::Value::Null,
        };
        object.insert(name.clone(), json);
    }
    serde_json::Value::Object(object).to_string()
}
