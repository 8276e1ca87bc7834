//! The statements that apply runs of events: COPY for inserts, set-based
//! UPDATE and DELETE over arrays for the others.

use super::{Plan, SetRun};
use crate::event::Op;
use crate::ident::quote_ident;
use crate::record::Fields;
use bytes::BytesMut;
use tokio_postgres::types::ToSql;

/// `COPY t (columns) FROM STDIN` for the master's columns the slave does not compute.
pub(super) fn copy_statement(plan: &Plan) -> String {
    let columns: Vec<String> = plan
        .master
        .columns
        .iter()
        .zip(&plan.generated)
        .filter(|(_, g)| !**g)
        .map(|(c, _)| quote_ident(c))
        .collect();
    format!("COPY {} ({}) FROM STDIN", plan.slave, columns.join(", "))
}

/// The set-based statement of a run and its parameters (one text array per
/// key column, then one per set column). Every row it returns starts with the
/// event's position in the run, followed by the slave's values of the compared
/// columns before the change.
pub(super) fn run_statement(run: &SetRun) -> (String, Vec<Vec<Option<String>>>) {
    let plan = &run.plan;
    let master = &plan.master;
    let column = |i: usize| quote_ident(&master.columns[i]);
    let mut params: Vec<Vec<Option<String>>> = Vec::new();
    let mut names = Vec::new();
    let mut matches = Vec::new();
    for (n, &k) in master.key.iter().enumerate() {
        params.push(run.events.iter().map(|e| field(&e.old, k)).collect());
        names.push(format!("pgreplica_k{n}"));
        matches.push(format!(
            "pgreplica_l.{} = s.pgreplica_k{n}::{}",
            column(k),
            plan.types[k]
        ));
    }
    let list = |f: &dyn Fn(usize, usize) -> String| -> String {
        let items: Vec<String> = run
            .compared
            .iter()
            .enumerate()
            .map(|(n, &i)| f(n, i))
            .collect();
        items.join(", ")
    };
    let sql = if run.op == Op::Update {
        for (n, &i) in run.compared.iter().enumerate() {
            params.push(run.events.iter().map(|e| field(&e.new, i)).collect());
            names.push(format!("pgreplica_n{n}"));
        }
        let arrays: Vec<String> = (1..=params.len())
            .map(|p| format!("${p}::text[]"))
            .collect();
        format!(
            "UPDATE {t} AS pgreplica_t SET {sets} \
             FROM (SELECT pgreplica_l.tableoid AS pgreplica_rel, pgreplica_l.ctid AS pgreplica_ctid, \
                          s.*, {olds} \
                     FROM unnest({arrays}) WITH ORDINALITY AS s({names}, pgreplica_seq) \
                     JOIN {t} AS pgreplica_l ON {matches} \
                      FOR UPDATE OF pgreplica_l) AS pgreplica_o \
             WHERE pgreplica_t.tableoid = pgreplica_o.pgreplica_rel \
               AND pgreplica_t.ctid = pgreplica_o.pgreplica_ctid \
             RETURNING pgreplica_o.pgreplica_seq, {returned}",
            t = plan.slave,
            sets = list(&|n, i| format!(
                "{} = pgreplica_o.pgreplica_n{n}::{}",
                column(i),
                plan.types[i]
            )),
            olds = list(&|n, i| format!(
                "{} AS pgreplica_o{n}",
                as_text(&format!("pgreplica_l.{}", column(i)))
            )),
            arrays = arrays.join(", "),
            names = names.join(", "),
            matches = matches.join(" AND "),
            returned = list(&|n, _| format!("pgreplica_o.pgreplica_o{n}")),
        )
    } else {
        let arrays: Vec<String> = (1..=params.len())
            .map(|p| format!("${p}::text[]"))
            .collect();
        format!(
            "DELETE FROM {t} AS pgreplica_l \
             USING unnest({arrays}) WITH ORDINALITY AS s({names}, pgreplica_seq) \
             WHERE {matches} RETURNING s.pgreplica_seq, {returned}",
            t = plan.slave,
            arrays = arrays.join(", "),
            names = names.join(", "),
            matches = matches.join(" AND "),
            returned = list(&|_, i| as_text(&format!("pgreplica_l.{}", column(i)))),
        )
    };
    (sql, params)
}

/// A value's text as the log holds it: its type's output function, which
/// `format('%s')` calls. A cast to text is not the same for every type:
/// `char(n)` loses its trailing blanks there, and the slave's row would then
/// differ from the master's old row although nothing changed it. `IS NOT
/// NULL` is false for a composite with a NULL field, hence `IS DISTINCT FROM`.
pub(super) fn as_text(expression: &str) -> String {
    format!("CASE WHEN {expression} IS DISTINCT FROM NULL THEN format('%s', {expression}) END")
}

pub(super) fn refs(values: &[Option<String>]) -> Vec<&(dyn ToSql + Sync)> {
    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

fn field(row: &Option<Fields>, i: usize) -> Option<String> {
    row.as_ref().and_then(|r| r[i].clone())
}

/// Writes a value in COPY's text format.
pub(super) fn copy_escape(out: &mut BytesMut, value: Option<&str>) {
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
pub(super) fn copy_error_line(e: &tokio_postgres::Error) -> Option<usize> {
    let place = e.as_db_error()?.where_()?;
    let rest = &place[place.find(", line ")? + 7..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
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
