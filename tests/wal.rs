//! Capture from the WAL: what a logical slot with pgoutput hands out, read by
//! pgreplica's decoder from a real server's changes.

mod support;

use pgreplica::pgoutput::{self, Lsn, Message, Value};
use pgreplica::throwaway::Server;
use support::connect;

const SETTINGS: &str = "wal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10";

/// Every message the slot holds, decoded, without consuming them.
async fn peek(client: &tokio_postgres::Client, slot: &str) -> Vec<(Lsn, Message)> {
    let rows = client
        .query(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL,
                 'proto_version', '1', 'publication_names', 'p', 'messages', 'true')",
            &[&slot],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            let lsn = Lsn::parse(r.get(0)).unwrap();
            (lsn, pgoutput::decode(r.get(1)).unwrap())
        })
        .collect()
}

fn text(value: &str) -> Value {
    Value::Text(value.to_string())
}

#[tokio::test]
async fn the_decoder_reads_every_change_a_slot_hands_out() {
    let server = Server::start_with("UTC", SETTINGS).unwrap();
    let client = connect(&server.dsn("postgres")).await;
    client
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text, big text, n numeric, at timestamptz);
             ALTER TABLE t ALTER big SET STORAGE EXTERNAL;
             CREATE PUBLICATION p FOR TABLE t WITH (publish_via_partition_root = true);",
        )
        .await
        .unwrap();
    client
        .batch_execute("SELECT pg_create_logical_replication_slot('s', 'pgoutput')")
        .await
        .unwrap();
    // A value over 8 kB is stored out of line; an update that leaves it alone
    // does not send it.
    let big = "x".repeat(20_000);
    client
        .execute(
            "INSERT INTO t VALUES (1, 'a \"quoted\" value', $1, 'NaN', '2026-11-27 10:00:00.123456+00')",
            &[&big],
        )
        .await
        .unwrap();
    for sql in [
        "UPDATE t SET v = NULL WHERE id = 1",
        "UPDATE t SET id = 2 WHERE id = 1",
        "BEGIN;
         SELECT pg_logical_emit_message(true, 'pgreplica', 'ALTER TABLE t ADD c int');
         DELETE FROM t WHERE id = 2;
         COMMIT",
        "TRUNCATE t",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    let messages = peek(&client, "s").await;
    let kinds: String = messages
        .iter()
        .map(|(_, m)| match m {
            Message::Begin { .. } => 'B',
            Message::Commit { .. } => 'C',
            Message::Relation(_) => 'R',
            Message::Insert { .. } => 'I',
            Message::Update { .. } => 'U',
            Message::Delete { .. } => 'D',
            Message::Truncate { .. } => 'T',
            Message::Note { .. } => 'M',
            Message::Origin { .. } => 'O',
            Message::Type { .. } => 'Y',
        })
        .collect();
    // A truncate gives the table a new file: its description comes again.
    assert_eq!(kinds, "BRICBUCBUCBMDCBRTC");
    let Message::Relation(table) = &messages[1].1 else {
        panic!("{messages:?}")
    };
    assert_eq!(
        (table.schema.as_str(), table.name.as_str()),
        ("public", "t")
    );
    let columns: Vec<(&str, bool)> = table
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.key))
        .collect();
    assert_eq!(
        columns,
        [
            ("id", true),
            ("v", false),
            ("big", false),
            ("n", false),
            ("at", false)
        ]
    );
    assert_eq!(
        messages[2].1,
        Message::Insert {
            table: table.oid,
            new: vec![
                text("1"),
                text("a \"quoted\" value"),
                text(&big),
                text("NaN"),
                text("2026-11-27 10:00:00.123456+00"),
            ],
        }
    );
    // The untouched out-of-line value comes as "unchanged", never as NULL.
    let Message::Update {
        old: None,
        new: ref first_update,
        ..
    } = messages[5].1
    else {
        panic!("{:?}", messages[5])
    };
    assert_eq!(first_update[1], Value::Null);
    assert_eq!(first_update[2], Value::Unchanged);
    // A changed key sends the old key.
    let Message::Update {
        old: Some(ref old),
        key_only: true,
        ref new,
        ..
    } = messages[8].1
    else {
        panic!("{:?}", messages[8])
    };
    assert_eq!((&old[0], &new[0]), (&text("1"), &text("2")));
    let Message::Note {
        transactional: true,
        ref prefix,
        ref content,
        ..
    } = messages[11].1
    else {
        panic!("{:?}", messages[11])
    };
    assert_eq!(
        (prefix.as_str(), content.as_slice()),
        ("pgreplica", &b"ALTER TABLE t ADD c int"[..])
    );
    assert!(matches!(
        messages[12].1,
        Message::Delete { key_only: true, .. }
    ));
    assert_eq!(
        messages[16].1,
        Message::Truncate {
            tables: vec![table.oid],
            cascade: false,
            restart_identity: false
        }
    );
    // Commits come in order, each after the changes it holds.
    let commits: Vec<Lsn> = messages
        .iter()
        .filter_map(|(_, m)| match m {
            Message::Commit { lsn, .. } => Some(*lsn),
            _ => None,
        })
        .collect();
    assert!(commits.windows(2).all(|w| w[0] < w[1]), "{commits:?}");
}
