//! Partitioned tables: written through the parent or a partition, rows moving
//! between partitions, truncates; the slave partitioned the same way or plain.

mod support;

use support::{Setup, text};

const PARTITIONED: &str = "
CREATE TABLE readings (id int, at date, v text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE readings_jan PARTITION OF readings FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
CREATE TABLE readings_feb (v text, at date NOT NULL, id int NOT NULL);
ALTER TABLE readings ATTACH PARTITION readings_feb FOR VALUES FROM ('2026-02-01') TO ('2026-03-01');
CREATE TABLE readings_rest PARTITION OF readings DEFAULT;";

const PLAIN: &str = "CREATE TABLE readings (id int, at date, v text, PRIMARY KEY (id, at))";

const ALL: &str = "SELECT * FROM readings ORDER BY id, at";

/// Writes through the parent and straight into partitions, and checks that the
/// slave follows after each round.
async fn writes_arrive(s: &Setup) {
    let rounds = [
        // Through the parent.
        "INSERT INTO readings SELECT g, date '2026-01-01' + g, 'r' || g FROM generate_series(1, 60) g",
        "UPDATE readings SET v = v || '!' WHERE id % 3 = 0",
        // Rows moving to another partition.
        "UPDATE readings SET at = at + 20 WHERE id BETWEEN 20 AND 25",
        "DELETE FROM readings WHERE id % 10 = 1",
        // Straight into partitions, one with its columns in another order.
        "INSERT INTO readings_feb (id, at, v) VALUES (100, '2026-02-10', 'direct')",
        "UPDATE readings_feb SET v = 'direct update' WHERE id = 40",
        "DELETE FROM readings_jan WHERE id = 2",
        "INSERT INTO readings_rest VALUES (200, '2027-01-01', 'later')",
        // Truncating a partition, then the whole table.
        "TRUNCATE readings_rest",
        "INSERT INTO readings VALUES (300, '2026-01-05', 'after')",
    ];
    let master = s.master().await;
    for sql in rounds {
        master.batch_execute(sql).await.unwrap();
        let out = s.run_once();
        assert!(out.status.success(), "after {sql}:\n{}", text(&out));
        for n in 0..s.slaves.len() {
            s.assert_same(n, ALL).await;
        }
    }
    master.batch_execute("TRUNCATE readings").await.unwrap();
    s.sync();
    for n in 0..s.slaves.len() {
        s.assert_same(n, ALL).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_table_replicates_to_the_same_partitions() {
    let s = Setup::new(1, PARTITIONED).await;
    writes_arrive(&s).await;
    s.assert_same(
        0,
        "SELECT tableoid::regclass, * FROM readings ORDER BY id, at",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_table_replicates_to_a_plain_table() {
    let s = Setup::with_schemas(1, PARTITIONED, PLAIN).await;
    writes_arrive(&s).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn install_refuses_inheritance_and_says_why() {
    let s = Setup::new(
        0,
        "CREATE TABLE base (id int PRIMARY KEY, v text);
         CREATE TABLE derived (extra text) INHERITS (base);
         ALTER TABLE derived ADD PRIMARY KEY (id);",
    )
    .await;
    let out = support::pgreplica(&["install", "--dsn", &s.master.dsn("app")]);
    let printed = text(&out);
    assert!(
        printed.contains("base: skipped: has inheritance children (derived)"),
        "{printed}"
    );
    assert!(
        printed.contains("derived: skipped: inherits from base"),
        "{printed}"
    );
}

/// Time-series partitions as pg_partman keeps them (Debian package
/// postgresql-15-partman, which scripts/test installs).
const PARTMAN: &str = "
CREATE SCHEMA partman;
CREATE EXTENSION pg_partman SCHEMA partman;
CREATE TABLE events (id bigint, at timestamptz NOT NULL, v text, PRIMARY KEY (id, at))
    PARTITION BY RANGE (at);
SELECT partman.create_parent('public.events', 'at', 'native', 'daily',
                             p_start_partition := '2026-11-20', p_premake := 3);";

#[tokio::test(flavor = "multi_thread")]
async fn pg_partman_partitions_replicate_also_those_made_later() {
    let s = Setup::with_schemas(
        1,
        PARTMAN,
        "CREATE TABLE events (id bigint, at timestamptz NOT NULL, v text, PRIMARY KEY (id, at))",
    )
    .await;
    // pg_partman's own tables are the extension's on each server.
    let out = support::pgreplica(&["install", "--dsn", &s.master.dsn("app")]);
    assert!(
        text(&out).contains("partman.part_config: skipped: belongs to extension pg_partman"),
        "{}",
        text(&out)
    );
    let master = s.master().await;
    master
        .batch_execute(
            "INSERT INTO events SELECT g, timestamptz '2026-11-20' + g * interval '1 hour', 'e' || g
               FROM generate_series(1, 100) g;
             UPDATE events SET v = v || '!' WHERE id % 7 = 0;",
        )
        .await
        .unwrap();
    s.sync();
    s.assert_same(0, "SELECT * FROM events ORDER BY id").await;
    // A partition made after install, then written straight into.
    master
        .batch_execute(
            "SELECT partman.create_partition_time('public.events', ARRAY[timestamptz '2026-12-15'])",
        )
        .await
        .unwrap();
    s.sync();
    master
        .batch_execute(
            "INSERT INTO events_p2026_12_15 VALUES (500, '2026-12-15 10:00', 'straight in');
             INSERT INTO events VALUES (501, '2026-12-15 11:00', 'through the parent');
             DELETE FROM events WHERE id < 10;",
        )
        .await
        .unwrap();
    s.sync();
    s.assert_same(0, "SELECT * FROM events ORDER BY id").await;
}
