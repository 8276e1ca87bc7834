//! Applying a batch on a slave: statements from the slave's catalog, conflicts, progress.
//!
//! Columns are matched by name. Runs of inserts into one table go through COPY;
//! updates and deletes are prepared statements kept in flight many at a time
//! (pipelining), each sent in event order on the one connection, so the slave
//! executes them in exactly the log's order. The batch's events and the slave's
//! progress row commit in one transaction: a crash anywhere loses nothing and
//! applies nothing twice.

use crate::batch::{Event, MasterTable, Op, Snapshot};
use crate::db::pg_message;
use crate::error::{Context, Error};
use crate::ident::{TableName, quote_ident};
use crate::record::Fields;
use bytes::BytesMut;
use futures_util::{SinkExt, TryStreamExt};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Row, Statement, Transaction};

/// Session settings under which a value's text form is the same as the capture
/// trigger's, so that texts read back from the slave compare equal.
pub const SESSION_SQL: &str = "SET datestyle = 'ISO, YMD'; SET intervalstyle = 'postgres';
SET extra_float_digits = 3; SET timezone = 'UTC'; SET bytea_output = 'hex'";

const PROGRESS_SETUP_SQL: &str = "CREATE SCHEMA IF NOT EXISTS pgreplica;
CREATE TABLE IF NOT EXISTS pgreplica.progress (
    set_name   text PRIMARY KEY,
    snapshot   text NOT NULL,
    applied_at timestamptz NOT NULL,
    events     bigint NOT NULL
)";

const PROGRESS_READ_SQL: &str = "SELECT snapshot FROM pgreplica.progress WHERE set_name = $1";

const PROGRESS_WRITE_SQL: &str = "
INSERT INTO pgreplica.progress (set_name, snapshot, applied_at, events) VALUES ($1, $2, now(), $3)
ON CONFLICT (set_name) DO UPDATE
   SET snapshot = EXCLUDED.snapshot, applied_at = now(), events = progress.events + EXCLUDED.events";

const SLAVE_TABLE_SQL: &str = "
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attgenerated <> ''
  FROM pg_attribute a
 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped";

/// Updates and deletes kept in flight before the oldest is awaited.
const WINDOW: usize = 256;
/// Rows or bytes after which a COPY run is sent.
const COPY_ROWS: usize = 5000;
const COPY_BYTES: usize = 1 << 20;

/// Prepares a slave connection: session settings and the progress table.
pub async fn prepare_slave(client: &Client) -> Result<(), Error> {
    client
        .batch_execute(SESSION_SQL)
        .await
        .doing("setting up the slave session")?;
    client.batch_execute(PROGRESS_SETUP_SQL).await.doing(
        "creating pgreplica.progress on the slave (the slave's role needs CREATE on the database)",
    )
}

/// The snapshot the slave has applied up to for `set`, if it has started.
pub async fn read_progress(client: &Client, set: &str) -> Result<Option<Snapshot>, Error> {
    let doing = "reading the slave's progress";
    let row = client
        .query_opt(PROGRESS_READ_SQL, &[&set])
        .await
        .doing(doing)?;
    row.map(|r| {
        let text: String = r.get(0);
        Snapshot::parse(&text).ok_or_else(|| Error::Query {
            doing: doing.into(),
            message: format!("pgreplica.progress holds an unreadable snapshot '{text}'"),
        })
    })
    .transpose()
}

/// Prepared statements of one slave connection, by SQL text.
#[derive(Default)]
pub struct Statements(HashMap<String, Statement>);

/// How a master table lands on the slave: the slave's type for each master column.
struct Plan {
    master: Arc<MasterTable>,
    slave: TableName,
    /// Slave type of each master column, in master column order.
    types: Vec<String>,
    /// Master columns the slave computes itself (generated), never written.
    generated: Vec<bool>,
}

type RowsFuture<'t> =
    Pin<Box<dyn Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send + 't>>;

/// A statement sent to the slave whose result is not read yet.
struct Pending<'t> {
    future: RowsFuture<'t>,
    ready: Option<Result<Vec<Row>, tokio_postgres::Error>>,
    plan: Arc<Plan>,
    event: Event,
    /// Master columns whose slave values came back, to compare with the old row.
    compared: Vec<usize>,
}

/// Inserts waiting to go out as one COPY.
struct CopyRun {
    plan: Arc<Plan>,
    data: BytesMut,
    /// Event id and key of each line, to name the row of a COPY error.
    lines: Vec<(i64, String)>,
}

/// Counts of one applied batch.
#[derive(Debug, Default, Clone, Copy)]
pub struct Applied {
    /// Events applied.
    pub events: u64,
    /// Conflicts detected (and logged).
    pub conflicts: u64,
}

/// Applies one batch's events inside a slave transaction.
pub struct Applier<'t> {
    tx: &'t Transaction<'t>,
    statements: &'t mut Statements,
    plans: HashMap<u32, Arc<Plan>>,
    pending: VecDeque<Pending<'t>>,
    copy: Option<CopyRun>,
    counts: Applied,
}

impl<'t> Applier<'t> {
    /// Starts applying in `tx`, reusing the connection's prepared statements.
    pub fn new(tx: &'t Transaction<'t>, statements: &'t mut Statements) -> Applier<'t> {
        Applier {
            tx,
            statements,
            plans: HashMap::new(),
            pending: VecDeque::new(),
            copy: None,
            counts: Applied::default(),
        }
    }

    /// Applies one event (or queues it: errors may surface on a later call).
    pub async fn apply(&mut self, table: &Arc<MasterTable>, event: Event) -> Result<(), Error> {
        let plan = self.plan(event.table, table).await?;
        self.counts.events += 1;
        match event.op {
            Op::Insert => self.insert(plan, event).await,
            Op::Update => self.update(plan, event).await,
            Op::Delete => self.delete(plan, event).await,
            Op::Truncate => {
                self.flush().await?;
                let sql = format!("TRUNCATE ONLY {}", plan.slave);
                self.tx
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| apply_error(&plan, "(all rows)".into(), event.id, &e))
            }
        }
    }

    /// Sends what is queued, checks every result, and records `snapshot` as the
    /// slave's progress for `set` in the same transaction.
    pub async fn finish(mut self, set: &str, snapshot: &Snapshot) -> Result<Applied, Error> {
        self.flush().await?;
        self.tx
            .execute(
                PROGRESS_WRITE_SQL,
                &[&set, &snapshot.to_string(), &(self.counts.events as i64)],
            )
            .await
            .doing("writing the slave's progress")?;
        Ok(self.counts)
    }

    async fn plan(&mut self, oid: u32, table: &Arc<MasterTable>) -> Result<Arc<Plan>, Error> {
        if let Some(plan) = self.plans.get(&oid) {
            return Ok(plan.clone());
        }
        let slave = table.name.clone();
        let rows = self
            .tx
            .query(SLAVE_TABLE_SQL, &[&slave.quoted()])
            .await
            .doing("reading the slave's catalog")?;
        if rows.is_empty() {
            return Err(Error::Schema {
                table: slave,
                message: "missing on the slave: create it there with the master's definition \
                          (pg_dump --schema-only --table=...) and replication resumes"
                    .into(),
            });
        }
        let columns: HashMap<String, (String, bool)> = rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        let missing: Vec<&str> = table
            .columns
            .iter()
            .filter(|c| !columns.contains_key(*c))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(Error::Schema {
                table: slave,
                message: format!(
                    "the slave lacks column(s) {} that the master has: add them on the slave \
                     and replication resumes",
                    missing.join(", ")
                ),
            });
        }
        let (types, generated) = table.columns.iter().map(|c| columns[c].clone()).unzip();
        let plan = Arc::new(Plan {
            master: table.clone(),
            slave,
            types,
            generated,
        });
        self.plans.insert(oid, plan.clone());
        Ok(plan)
    }

    async fn insert(&mut self, plan: Arc<Plan>, event: Event) -> Result<(), Error> {
        let Some(new) = &event.new else {
            return Err(malformed(&event, "an insert without a row"));
        };
        if self
            .copy
            .as_ref()
            .is_some_and(|c| !Arc::ptr_eq(&c.plan, &plan))
        {
            self.flush().await?;
        }
        let run = self.copy.get_or_insert_with(|| CopyRun {
            plan: plan.clone(),
            data: BytesMut::new(),
            lines: Vec::new(),
        });
        let mut first = true;
        for (value, generated) in new.iter().zip(&plan.generated) {
            if *generated {
                continue;
            }
            if !first {
                run.data.extend_from_slice(b"\t");
            }
            first = false;
            copy_escape(&mut run.data, value.as_deref());
        }
        run.data.extend_from_slice(b"\n");
        run.lines.push((event.id, plan.master.key_text(new)));
        if run.lines.len() >= COPY_ROWS || run.data.len() >= COPY_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn update(&mut self, plan: Arc<Plan>, event: Event) -> Result<(), Error> {
        let (Some(old), Some(new)) = (&event.old, &event.new) else {
            return Err(malformed(&event, "an update without both rows"));
        };
        let changed: Vec<usize> = (0..new.len())
            .filter(|&i| old[i] != new[i] && !plan.generated[i])
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        let master = &plan.master;
        let mut sets = Vec::new();
        let mut olds = Vec::new();
        for (n, &i) in changed.iter().enumerate() {
            let column = quote_ident(&master.columns[i]);
            sets.push(format!("{column} = ${}::{}", n + 1, plan.types[i]));
            olds.push(format!("{column}::text AS o{n}"));
        }
        let returned: Vec<String> = (0..changed.len())
            .map(|n| format!("pgreplica_o.o{n}"))
            .collect();
        let sql = format!(
            "UPDATE ONLY {t} AS pgreplica_t SET {sets} FROM (SELECT ctid AS pgreplica_ctid, {olds} \
             FROM ONLY {t} WHERE {key} FOR UPDATE) AS pgreplica_o \
             WHERE pgreplica_t.ctid = pgreplica_o.pgreplica_ctid RETURNING {returned}",
            t = plan.slave,
            sets = sets.join(", "),
            olds = olds.join(", "),
            key = key_condition(&plan, changed.len()),
            returned = returned.join(", "),
        );
        let mut params: Vec<Option<String>> = changed.iter().map(|&i| new[i].clone()).collect();
        params.extend(master.key.iter().map(|&k| old[k].clone()));
        self.send(sql, params, plan, event, changed).await
    }

    async fn delete(&mut self, plan: Arc<Plan>, event: Event) -> Result<(), Error> {
        let Some(old) = &event.old else {
            return Err(malformed(&event, "a delete without a row"));
        };
        let master = &plan.master;
        let returned: Vec<String> = master
            .columns
            .iter()
            .map(|c| format!("{}::text", quote_ident(c)))
            .collect();
        let sql = format!(
            "DELETE FROM ONLY {} WHERE {} RETURNING {}",
            plan.slave,
            key_condition(&plan, 0),
            returned.join(", ")
        );
        let params: Vec<Option<String>> = master.key.iter().map(|&k| old[k].clone()).collect();
        let compared = (0..master.columns.len()).collect();
        self.send(sql, params, plan, event, compared).await
    }

    /// Sends one statement now, in order, and queues its result for checking.
    async fn send(
        &mut self,
        sql: String,
        params: Vec<Option<String>>,
        plan: Arc<Plan>,
        event: Event,
        compared: Vec<usize>,
    ) -> Result<(), Error> {
        self.flush_copy().await?;
        let statement = self.statement(&sql, params.len()).await?;
        let tx = self.tx;
        let mut future: RowsFuture<'t> = Box::pin(async move {
            let rows = tx.query_raw(&statement, params).await?;
            rows.try_collect().await
        });
        // The first poll puts the request on the connection's queue, so requests
        // leave in event order whatever order their results are read in.
        let ready = match futures_util::poll!(future.as_mut()) {
            Poll::Ready(result) => Some(result),
            Poll::Pending => None,
        };
        self.pending.push_back(Pending {
            future,
            ready,
            plan,
            event,
            compared,
        });
        if self.pending.len() >= WINDOW {
            self.check_oldest().await?;
        }
        Ok(())
    }

    async fn statement(&mut self, sql: &str, params: usize) -> Result<Statement, Error> {
        if let Some(s) = self.statements.0.get(sql) {
            return Ok(s.clone());
        }
        // Rare (once per statement shape): settle what is in flight first, so that
        // no earlier result waits unread behind this one.
        self.drain().await?;
        let types = vec![Type::TEXT; params];
        let statement = self
            .tx
            .prepare_typed(sql, &types)
            .await
            .doing(&format!("preparing a statement on the slave ({sql})"))?;
        self.statements.0.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    async fn check_oldest(&mut self) -> Result<(), Error> {
        let Some(p) = self.pending.pop_front() else {
            return Ok(());
        };
        let result = match p.ready {
            Some(result) => result,
            None => p.future.await,
        };
        let master = &p.plan.master;
        let Some(old) = &p.event.old else {
            return Err(malformed(&p.event, "a change without its old row"));
        };
        let key = master.key_text(old);
        let rows = result.map_err(|e| apply_error(&p.plan, key.clone(), p.event.id, &e))?;
        let what = if p.event.op == Op::Update {
            "update"
        } else {
            "delete"
        };
        let Some(row) = rows.first() else {
            self.counts.conflicts += 1;
            tracing::warn!(
                table = %p.plan.slave, key = %key, event = p.event.id,
                remote_old = %columns_text(master, old, &p.compared),
                remote_new = %p.event.new.as_ref().map(|n| columns_text(master, n, &p.compared)).unwrap_or_default(),
                "conflict: {what} of a row that is missing on the slave; nothing to apply"
            );
            return Ok(());
        };
        let local: Fields = (0..p.compared.len()).map(|n| row.get(n)).collect();
        let expected: Fields = p.compared.iter().map(|&i| old[i].clone()).collect();
        if local != expected {
            self.counts.conflicts += 1;
            let local_text = p
                .compared
                .iter()
                .zip(&local)
                .map(|(&i, v)| format!("{}={}", master.columns[i], v.as_deref().unwrap_or("NULL")))
                .collect::<Vec<_>>()
                .join(", ");
            tracing::warn!(
                table = %p.plan.slave, key = %key, event = p.event.id,
                local = %local_text,
                remote_old = %columns_text(master, old, &p.compared),
                remote_new = %p.event.new.as_ref().map(|n| columns_text(master, n, &p.compared)).unwrap_or_default(),
                "conflict: {what} of a row that had changed on the slave; the master's change was applied"
            );
        }
        Ok(())
    }

    async fn drain(&mut self) -> Result<(), Error> {
        while !self.pending.is_empty() {
            self.check_oldest().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Error> {
        self.drain().await?;
        self.flush_copy().await
    }

    async fn flush_copy(&mut self) -> Result<(), Error> {
        let Some(run) = self.copy.take() else {
            return Ok(());
        };
        self.drain().await?;
        let plan = &run.plan;
        let columns: Vec<String> = plan
            .master
            .columns
            .iter()
            .zip(&plan.generated)
            .filter(|(_, g)| !**g)
            .map(|(c, _)| quote_ident(c))
            .collect();
        let sql = format!("COPY {} ({}) FROM STDIN", plan.slave, columns.join(", "));
        let statement = self.statement(&sql, 0).await?;
        let result = async {
            let sink = self.tx.copy_in(&statement).await?;
            futures_util::pin_mut!(sink);
            sink.send(run.data.freeze()).await?;
            sink.finish().await
        }
        .await;
        result.map(|_| ()).map_err(|e| {
            let line = copy_error_line(&e).unwrap_or(1);
            let (event, key) = run
                .lines
                .get(line - 1)
                .or(run.lines.first())
                .cloned()
                .unwrap_or_default();
            apply_error(plan, key, event, &e)
        })
    }
}

/// `k1 = $n::type AND …` for the key columns, numbering parameters after `offset`.
fn key_condition(plan: &Plan, offset: usize) -> String {
    plan.master
        .key
        .iter()
        .enumerate()
        .map(|(n, &k)| {
            format!(
                "{} = ${}::{}",
                quote_ident(&plan.master.columns[k]),
                offset + n + 1,
                plan.types[k]
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Writes a value in COPY's text format.
fn copy_escape(out: &mut BytesMut, value: Option<&str>) {
    let Some(value) = value else {
        out.extend_from_slice(b"\\N");
        return;
    };
    for b in value.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b => out.extend_from_slice(&[b]),
        }
    }
}

/// The line number in a COPY error's context (`COPY t, line 3: …`).
fn copy_error_line(e: &tokio_postgres::Error) -> Option<usize> {
    let place = e.as_db_error()?.where_()?;
    let rest = &place[place.find(", line ")? + 7..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn columns_text(master: &MasterTable, row: &Fields, columns: &[usize]) -> String {
    columns
        .iter()
        .map(|&i| {
            format!(
                "{}={}",
                master.columns[i],
                row[i].as_deref().unwrap_or("NULL")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn apply_error(plan: &Plan, key: String, event: i64, e: &tokio_postgres::Error) -> Error {
    Error::Apply {
        table: plan.slave.clone(),
        key,
        event,
        message: pg_message(e),
    }
}

fn malformed(event: &Event, what: &str) -> Error {
    Error::Query {
        doing: format!("reading event {}", event.id),
        message: format!("the log holds {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_control_characters_and_null() {
        let mut out = BytesMut::new();
        copy_escape(&mut out, Some("a\tb\\c\nd\re"));
        out.extend_from_slice(b"|");
        copy_escape(&mut out, None);
        out.extend_from_slice(b"|");
        copy_escape(&mut out, Some("\\N"));
        assert_eq!(&out[..], b"a\\tb\\\\c\\nd\\re|\\N|\\\\N");
    }
}
