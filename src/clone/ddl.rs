//! The slave's copy of a master table's definition: created from `pg_dump`
//! before its rows, its keys and indexes after them, its foreign keys at the
//! handover.

use crate::config::Config;
use crate::dsn::Dsn;
use crate::error::{Context, Error};
use crate::ident::{TableName, quote_ident};
use crate::{programs, slave};

/// Empties the slave's table, or creates it without its keys and indexes, as
/// the master's snapshot `exported` has it; returns what is left of the
/// definition of a table the clone created (now, or in an interrupted run), to
/// be built after the rows.
pub(super) async fn prepare(
    tx: &tokio_postgres::Transaction<'_>,
    set: &Config,
    table: &TableName,
    exported: &str,
) -> Result<Option<Ddl>, Error> {
    let name = table.quoted();
    let doing = "reading the slave's catalog";
    let exists: bool = tx
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .await
        .on_slave(doing)?
        .get(0);
    if exists {
        slave::empty(tx, &name).await?;
        let kept = slave::kept_definition(tx, &set.name, &name).await?;
        return Ok(kept.and_then(|(after, deferred)| {
            Some(Ddl {
                before: String::new(),
                after: after?,
                deferred: deferred.unwrap_or_default(),
            })
        }));
    }
    let ddl = table_ddl(&set.master, table, exported)?;
    create(tx, table, &ddl.before).await?;
    slave::keep_definition(tx, &set.name, &name, &ddl.after, &ddl.deferred).await?;
    Ok(Some(ddl))
}

/// Runs part of a table's definition from the master on the slave.
pub(super) async fn create(
    tx: &tokio_postgres::Transaction<'_>,
    table: &TableName,
    sql: &str,
) -> Result<(), Error> {
    tx.batch_execute(sql).await.map_err(|e| Error::Schema {
        table: table.clone(),
        message: format!(
            "creating it on the slave from the master's definition failed: {} \
             (create the types and schemas it needs on the slave first)",
            crate::db::pg_message(&e)
        ),
    })?;
    slave::session(tx).await
}

/// A table's definition from `pg_dump --schema-only`, split as `pg_restore`
/// does: the table before its rows, its keys and indexes after them (building an
/// index once is faster than maintaining it row by row), and its foreign keys
/// at the handover, when the tables they reference are there.
pub(super) struct Ddl {
    pub(super) before: String,
    pub(super) after: String,
    pub(super) deferred: String,
}

/// The definition at the copy's snapshot: a schema change committed after it
/// reaches the slave from the log, and must not be in the definition too.
fn table_ddl(master_dsn: &str, table: &TableName, exported: &str) -> Result<Ddl, Error> {
    let doing = format!("reading {table}'s definition with pg_dump");
    let pg_dump = programs::pg_dump();
    // Another process's command line is public (ps, /proc): the password goes
    // in pg_dump's environment, which only its user can read.
    let mut settings = Dsn::parse(master_dsn).map_err(|e| Error::Invalid {
        doing: doing.clone(),
        message: format!("the master's connection string: {e}"),
    })?;
    let mut command = std::process::Command::new(&pg_dump);
    if let Some(password) = settings.take("password") {
        command.env("PGPASSWORD", password);
    }
    let out = command
        .args(["--schema-only", "--no-owner", "--no-privileges", "--table"])
        .arg(table.quoted())
        .arg("--snapshot")
        .arg(exported)
        .arg("--dbname")
        .arg(settings.render())
        .output()
        .map_err(|e| Error::Invalid {
            doing: doing.clone(),
            message: format!(
                "cannot run {}: {e}. The slave lacks this table; install PostgreSQL's client \
                 programs (apt-get install -y postgresql-client) or create the table on the slave",
                pg_dump.display()
            ),
        })?;
    if !out.status.success() {
        let mut message = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if message.contains("server version mismatch") {
            message.push_str(&format!(
                ". {} is older than the master's PostgreSQL: set PG_DUMP to the pg_dump of \
                 the master's version or newer, or create the table on the slave",
                pg_dump.display()
            ));
        }
        return Err(Error::Invalid { doing, message });
    }
    let dump = String::from_utf8_lossy(&out.stdout);
    if dump.contains("\nPARTITION BY ") {
        return Err(Error::Schema {
            table: table.clone(),
            message: "a partitioned table, missing on the slave: create it there first, with \
                      its partitions or as a plain table, and run clone again"
                .into(),
        });
    }
    Ok(split_dump(&table.schema, &dump))
}

/// Splits `pg_dump` output at its `-- Name: …; Type: …;` headers: drops
/// pgreplica's own capture triggers and psql meta-commands.
fn split_dump(schema: &str, dump: &str) -> Ddl {
    let mut ddl = Ddl {
        before: format!("CREATE SCHEMA IF NOT EXISTS {};\n", quote_ident(schema)),
        after: String::new(),
        deferred: String::new(),
    };
    let mut target = &mut ddl.before;
    let mut skip = false;
    for line in dump.lines() {
        if let Some(header) = line.strip_prefix("-- Name: ") {
            let kind = header
                .split("; Type: ")
                .nth(1)
                .and_then(|rest| rest.split(';').next())
                .unwrap_or("");
            let object = header.split(';').next().unwrap_or("");
            skip = kind == "TRIGGER"
                && object
                    .split_whitespace()
                    .any(|w| w.starts_with("pgreplica_"));
            target = match kind {
                "FK CONSTRAINT" => &mut ddl.deferred,
                "CONSTRAINT" | "INDEX" | "TRIGGER" | "RULE" => &mut ddl.after,
                _ => &mut ddl.before,
            };
            continue;
        }
        if skip || line.starts_with('\\') || line.starts_with("--") {
            continue;
        }
        target.push_str(line);
        target.push('\n');
    }
    ddl
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_keeps_the_table_drops_capture_triggers_and_defers_foreign_keys() {
        let dump = "\\restrict abc\nSET x = 1;\n\
            -- Name: t; Type: TABLE; Schema: s; Owner: -\n\nCREATE TABLE s.t (id int);\n\
            -- Name: t t_pkey; Type: CONSTRAINT; Schema: s; Owner: -\n\nALTER TABLE ONLY s.t ADD CONSTRAINT t_pkey PRIMARY KEY (id);\n\
            -- Name: t pgreplica_insert; Type: TRIGGER; Schema: s; Owner: -\n\nCREATE TRIGGER pgreplica_insert AFTER INSERT ON s.t;\n\
            -- Name: t t_fk; Type: FK CONSTRAINT; Schema: s; Owner: -\n\nALTER TABLE ONLY s.t ADD CONSTRAINT t_fk FOREIGN KEY (id) REFERENCES s.u(id);\n\
            \\unrestrict abc\n";
        let ddl = split_dump("s", dump);
        assert!(ddl.before.contains("CREATE SCHEMA IF NOT EXISTS \"s\";"));
        assert!(ddl.before.contains("CREATE TABLE s.t (id int);"));
        assert!(!ddl.before.contains("PRIMARY KEY"));
        assert!(ddl.after.contains("PRIMARY KEY (id)"));
        let all = format!("{}{}", ddl.before, ddl.after);
        assert!(!all.contains("pgreplica_insert"));
        assert!(!all.contains("restrict"));
        assert!(!all.contains("FOREIGN KEY"));
        assert!(ddl.deferred.contains("FOREIGN KEY"));
    }
}
