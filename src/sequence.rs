//! Sequences: the master's values carried to its slaves, and disjoint ranges
//! for the nodes of a multi-master group.
//!
//! The sequences concerned are those owned by replicated tables (serial and
//! identity columns).

use crate::db::Prepared;
use crate::error::{Context, Error};
use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Statement};

// The owned sequences of replicated tables, with their table and column.
// Each table's are looked up through the catalog's indexes: the plan is kept
// for the reader's session, whatever the number of tables.
const OWNED_SQL: &str = "
SELECT o.seq::regclass::text, t.reloid::regclass::text, quote_ident(o.attname),
       pg_sequence_last_value(o.seq)
  FROM pgreplica.tables t,
       LATERAL (SELECT s.oid AS seq, a.attname
                  FROM pg_depend d
                  JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
                  JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                 WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = t.reloid
                   AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
                   AND CASE WHEN s.relkind = 'S' THEN has_sequence_privilege(s.oid, 'SELECT') END
                OFFSET 0) AS o
 ORDER BY 1";

// Raises the slave's sequences to the master's values, never lowers them; a
// sequence the daemon's role may not read or set is left alone.
const RAISE_SQL: &str = "
SELECT count(setval(to_regclass(name), value))
  FROM unnest($1::text[], $2::int8[]) AS m(name, value)
 WHERE to_regclass(name) IS NOT NULL
   AND has_sequence_privilege(to_regclass(name), 'SELECT, UPDATE')
   AND coalesce(pg_sequence_last_value(to_regclass(name)), value - 1) < value";

/// The master's owned sequences and their last values.
pub async fn read(
    master: &impl GenericClient,
    prepared: &mut Prepared,
) -> Result<(Vec<String>, Vec<i64>), Error> {
    let owned = prepare(master, prepared).await?;
    read_with(master, &owned).await
}

/// The statement of [`read_with`], prepared on `master`'s session.
pub async fn prepare(
    master: &impl GenericClient,
    prepared: &mut Prepared,
) -> Result<Statement, Error> {
    prepared
        .get(master, OWNED_SQL, &[])
        .await
        .on_master("reading the master's sequences")
}

/// [`read`] through its statement, `owned` (from [`prepare`]): sent at once,
/// it goes out beside the other queries in flight on the session.
pub async fn read_with(
    master: &impl GenericClient,
    owned: &Statement,
) -> Result<(Vec<String>, Vec<i64>), Error> {
    let rows = master
        .query(owned, &[])
        .await
        .on_master("reading the master's sequences")?;
    Ok(rows
        .iter()
        .filter_map(|r| Some((r.get(0), r.get::<_, Option<i64>>(3)?)))
        .unzip())
}

/// Raises the slave's sequences to the master's last values (from [`read`]),
/// so that a slave promoted to master never hands out an id the master already
/// used. Returns how many it raised.
pub async fn raise(
    slave: &impl GenericClient,
    (names, values): &(Vec<String>, Vec<i64>),
) -> Result<i64, Error> {
    if names.is_empty() {
        return Ok(0);
    }
    // Typed, it goes out whole, in one round trip: a batch's last statements
    // wait for it.
    Ok(slave
        .query_typed_one(
            RAISE_SQL,
            &[(names, Type::TEXT_ARRAY), (values, Type::INT8_ARRAY)],
        )
        .await
        .on_slave("raising the slave's sequences to the master's")?
        .get(0))
}

/// Gives this node the values `node` modulo `nodes` (1-based) of every owned
/// sequence: INCREMENT BY `nodes`, next value above both the sequence and the
/// column's highest value. Returns one line per sequence changed.
pub async fn partition(
    client: &impl GenericClient,
    node: i64,
    nodes: i64,
) -> Result<Vec<String>, Error> {
    let mut changed = Vec::new();
    for row in client
        .query(OWNED_SQL, &[])
        .await
        .doing("reading the sequences")?
    {
        let (sequence, table, column): (String, String, String) =
            (row.get(0), row.get(1), row.get(2));
        let last: Option<i64> = row.get(3);
        let doing = format!("giving {sequence} its range");
        let highest: Option<i64> = client
            .query_one(&format!("SELECT max({column})::int8 FROM {table}"), &[])
            .await
            .doing(&doing)?
            .get(0);
        let next = next_in_range(last.max(highest).unwrap_or(0), node, nodes);
        // Names come from regclass::text and quote_ident: already quoted.
        client
            .batch_execute(&format!(
                "ALTER SEQUENCE {sequence} INCREMENT BY {nodes} RESTART WITH {next}"
            ))
            .await
            .doing(&doing)?;
        changed.push(format!(
            "{sequence} ({table}.{column}): INCREMENT BY {nodes}, next value {next} \
             (node {node} of {nodes})"
        ));
    }
    Ok(changed)
}

/// Reads `K/N` (this node's number K of N nodes, 1 ≤ K ≤ N).
pub fn parse_share(spec: &str) -> Option<(i64, i64)> {
    let (k, n) = spec.split_once('/')?;
    let (k, n) = (k.trim().parse().ok()?, n.trim().parse().ok()?);
    (1 <= k && k <= n).then_some((k, n))
}

/// The first value above `highest` that is `node` modulo `nodes`.
fn next_in_range(highest: i64, node: i64, nodes: i64) -> i64 {
    let from = highest + 1;
    from + (node - from).rem_euclid(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_read_k_of_n() {
        assert_eq!(parse_share("2/3"), Some((2, 3)));
        assert_eq!(parse_share("4/3"), None);
        assert_eq!(parse_share("0/3"), None);
        assert_eq!(parse_share("x"), None);
    }

    #[test]
    fn each_node_gets_its_own_residue_above_the_highest_value() {
        assert_eq!(next_in_range(0, 1, 3), 1);
        assert_eq!(next_in_range(0, 3, 3), 3);
        assert_eq!(next_in_range(10, 1, 3), 13);
        assert_eq!(next_in_range(10, 2, 3), 11);
        assert_eq!(next_in_range(10, 3, 3), 12);
        assert_eq!(next_in_range(12, 3, 3), 15);
    }
}
