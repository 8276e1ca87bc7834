//! Capture from the WAL (`CAPTURE = wal`): what a logical slot with pgoutput
//! hands out, read by pgreplica's decoder from a real server's changes, and
//! sets that replicate from their slots.

mod support;

use pgreplica::pgoutput::{self, Lsn, Message, Value};
use pgreplica::throwaway::Server;
use support::{Setup, connect, count, pgreplica, text as output};

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, name text, qty int, big text);
                     ALTER TABLE items ALTER big SET STORAGE EXTERNAL;";
const ALL: &str = "SELECT * FROM items ORDER BY id";
const SLOT: &str = "pgreplica_1_app";

const SETTINGS: &str = "wal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10";

/// Every message the slot holds, decoded, without consuming them.
/// Emitted messages come with `messages` (PostgreSQL 14+).
async fn peek(client: &tokio_postgres::Client, slot: &str, notes: bool) -> Vec<(Lsn, Message)> {
    let messages = if notes { ", 'messages', 'true'" } else { "" };
    let sql = format!(
        "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL,
             'proto_version', '1', 'publication_names', 'p'{messages})"
    );
    let rows = client.query(&sql, &[&slot]).await.unwrap();
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
    let notes = support::oldest_major() >= 14;
    let messages = peek(&client, "s", notes).await;
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
    match notes {
        true => assert_eq!(kinds, "BRICBUCBUCBMDCBRTC"),
        false => assert_eq!(kinds, "BRICBUCBUCBDCBRTC"),
    }
    // What follows the emitted message, where it is not sent.
    let after = |at: usize| if notes { at } else { at - 1 };
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
    if notes {
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
    }
    assert!(matches!(
        messages[after(12)].1,
        Message::Delete { key_only: true, .. }
    ));
    assert_eq!(
        messages[after(16)].1,
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

#[tokio::test(flavor = "multi_thread")]
async fn changes_arrive_from_the_slot_and_the_master_logs_none() {
    let s = Setup::wal(1, ITEMS).await;
    let m = s.master().await;
    // Several slave transactions: the batch is cut between the master's.
    s.configure("BATCH_EVENTS=300\n");
    let big = "b".repeat(20_000);
    m.execute(
        "INSERT INTO items SELECT g, 'item ' || g, g, $1 FROM generate_series(1, 1000) g",
        &[&big],
    )
    .await
    .unwrap();
    for i in 0..10 {
        let sql = format!("UPDATE items SET qty = qty + 1 WHERE id % 10 = {i}");
        m.batch_execute(&sql).await.unwrap();
    }
    // The out-of-line value is left alone by these: it is not in the WAL.
    s.replicate(
        "UPDATE items SET name = 'renamed' WHERE id <= 500;
         DELETE FROM items WHERE id > 900;
         BEGIN; INSERT INTO items VALUES (5000, 'x', 1, NULL); UPDATE items SET id = 5001 WHERE id = 5000; COMMIT;",
        ALL,
    )
    .await;
    let slave = s.slave(0).await;
    let kept: i64 = slave
        .query_one("SELECT count(*) FROM items WHERE big = $1", &[&big])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 900);
    // A statement queued with execute reaches the slave at its point.
    let out = pgreplica(&[
        "execute",
        s.conf.to_str().unwrap(),
        "ALTER TABLE items ADD COLUMN note text DEFAULT 'n'",
    ]);
    assert!(out.status.success(), "{}", output(&out));
    s.replicate(
        "UPDATE items SET note = 'after' WHERE id = 1; TRUNCATE items; INSERT INTO items VALUES (7, 'seven', 7, NULL, 'z')",
        ALL,
    )
    .await;
    // Nothing but the execute went through the master's log: the triggers stay off.
    let logged = number(&m, "SELECT count(*) FROM pgreplica.log WHERE ev_op <> 'X'").await;
    assert_eq!(logged, 0);
    // The slot lets the applied WAL go: it is at the slave's position.
    let row = m
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&SLOT],
        )
        .await
        .unwrap();
    let progress = slave
        .query_one("SELECT lsn::text FROM pgreplica.progress", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), progress.get::<_, String>(0));
}

/// Puts the slot back where it was when `saved` copied it: as after a crash
/// between the slave's commit and the slot's advance.
async fn rewind(master: &tokio_postgres::Client, saved: &str) {
    master
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot('{SLOT}');
             SELECT pg_copy_logical_replication_slot('{saved}', '{SLOT}');"
        ))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_not_advanced_after_the_slaves_commit_applies_nothing_twice() {
    let s = Setup::wal(1, ITEMS).await;
    let m = s.master().await;
    m.batch_execute(&format!(
        "SELECT pg_copy_logical_replication_slot('{SLOT}', 'saved')"
    ))
    .await
    .unwrap();
    m.batch_execute(
        "INSERT INTO items SELECT g, 'a', 0 FROM generate_series(1, 100) g;
         UPDATE items SET qty = qty + 1;
         DELETE FROM items WHERE id > 90;",
    )
    .await
    .unwrap();
    s.sync();
    rewind(&m, "saved").await;
    // Read again from the old position, the applied transactions are skipped:
    // the inserts would fail on their keys, the update would conflict.
    s.replicate("UPDATE items SET qty = qty + 1 WHERE id <= 10", ALL)
        .await;
    let slave = s.slave(0).await;
    let conflicts = number(&slave, "SELECT count(*) FROM pgreplica.conflicts").await;
    assert_eq!(conflicts, 0);
    assert_eq!(count(&slave, "items").await, 90);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slave_older_than_its_slot_stops_and_says_to_clone_it() {
    let s = Setup::wal(1, ITEMS).await;
    s.replicate("INSERT INTO items VALUES (1, 'one', 1)", ALL)
        .await;
    // As a slave restored from a backup taken before its last batches.
    let slave = s.slave(0).await;
    slave
        .batch_execute("UPDATE pgreplica.progress SET lsn = '0/1'")
        .await
        .unwrap();
    s.master()
        .await
        .batch_execute("INSERT INTO items VALUES (2, 'two', 2)")
        .await
        .unwrap();
    let out = s.run_once();
    assert!(!out.status.success());
    let said = output(&out);
    assert!(said.contains("older than its replication slot"), "{said}");
    assert!(said.contains("pgreplica clone"), "{said}");
    assert_eq!(count(&slave, "items").await, 1);
    // A file that says the master captures with triggers is told it does not.
    let wal_conf = std::fs::read_to_string(&s.conf).unwrap();
    std::fs::write(&s.conf, wal_conf.replace("CAPTURE=wal\n", "")).unwrap();
    let said = output(&s.run_once());
    assert!(
        said.contains("the master captures from the WAL, but"),
        "{said}"
    );
    std::fs::write(&s.conf, wal_conf).unwrap();
    // Clone copies it again from a new slot, and replication carries on.
    let conf = s.conf.to_str().unwrap();
    let out = pgreplica(&["clone", conf, "--table", "public.items"]);
    assert!(
        output(&out).contains("leave out --table"),
        "{}",
        output(&out)
    );
    let out = pgreplica(&["clone", conf, "--truncate"]);
    assert!(out.status.success(), "{}", output(&out));
    assert_eq!(count(&slave, "items").await, 2);
    s.replicate("INSERT INTO items VALUES (3, 'three', 3)", ALL)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slave_whose_snapshot_is_older_than_the_cleaned_log_resumes_from_its_wal_position() {
    let s = Setup::wal(1, ITEMS).await;
    let m = s.master().await;
    let txid: i64 = m
        .query_one(
            "WITH i AS (INSERT INTO items VALUES (1, 'one', 1)) SELECT txid_current()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    s.sync();
    // A look's snapshot can be taken after a transaction's commit record is
    // in the WAL but before the transaction is visible: the slave's progress
    // then names it as running. The master's log (origin marks of a node
    // that is a slave too, or another set's events) was cleaned past it.
    let slave = s.slave(0).await;
    slave
        .batch_execute(&format!(
            "UPDATE pgreplica.progress SET snapshot = '{txid}:{txid}:'"
        ))
        .await
        .unwrap();
    m.batch_execute(&format!(
        "INSERT INTO pgreplica.cleaned (below) VALUES ({})",
        txid + 1
    ))
    .await
    .unwrap();
    s.replicate("INSERT INTO items VALUES (2, 'two', 2)", ALL)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn install_names_what_the_master_lacks_and_uninstall_drops_the_slots() {
    let s = Setup::new(1, ITEMS).await;
    if support::wal_capture() {
        // Setup made a WAL master: this test needs one without.
        return;
    }
    let before = std::fs::read_to_string(&s.conf).unwrap();
    s.configure("CAPTURE=wal\n");
    let conf = s.conf.to_str().unwrap();
    let out = pgreplica(&["install", conf]);
    assert!(!out.status.success());
    let said = output(&out);
    assert!(
        said.contains("ALTER SYSTEM SET wal_level = logical"),
        "{said}"
    );
    std::fs::write(&s.conf, before).unwrap();
    // Nothing was changed: the master still captures with its triggers.
    s.replicate("INSERT INTO items VALUES (1, 'one', 1)", ALL)
        .await;

    let w = Setup::wal(2, ITEMS).await;
    let m = w.master().await;
    let listed = number(
        &m,
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgreplica%'",
    )
    .await;
    assert_eq!(listed, 2);
    let out = pgreplica(&["uninstall", "--dsn", &w.master.dsn("app")]);
    assert!(out.status.success(), "{}", output(&out));
    let listed = number(&m, "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgreplica%') + (SELECT count(*) FROM pg_publication)").await;
    assert_eq!(listed, 0);
}

/// Whether the master's trigger that logs deletes of `items` fires.
async fn deletes_logged(master: &tokio_postgres::Client) -> bool {
    let enabled = master
        .query_opt(
            "SELECT tgenabled::text FROM pg_trigger
              WHERE tgrelid = 'items'::regclass AND tgname = 'pgreplica_delete'",
            &[],
        )
        .await
        .unwrap()
        .map(|row| row.get::<_, String>(0));
    enabled.as_deref() == Some("A")
}

#[tokio::test(flavor = "multi_thread")]
async fn newest_and_priority_keep_the_nodes_deletes_and_newest_needs_commit_times() {
    let s = Setup::wal(1, ITEMS).await;
    let m = s.master().await;
    let conf = s.conf.to_str().unwrap();
    let before = std::fs::read_to_string(&s.conf).unwrap();
    s.configure("NODE0=a\nNODE1=b\nCONFLICT=priority\nPRIORITY=a, b\n");
    let out = pgreplica(&["install", conf]);
    assert!(out.status.success(), "{}", output(&out));
    assert!(deletes_logged(&m).await);
    // The delete is kept in the log, and reaches the slave once, from the WAL.
    s.replicate(
        "INSERT INTO items VALUES (1, 'one', 1), (2, 'two', 2); DELETE FROM items WHERE id = 1",
        ALL,
    )
    .await;
    let kept = number(&m, "SELECT count(*) FROM pgreplica.log WHERE ev_op = 'D'").await;
    assert_eq!(kept, 1);
    let events = number(&s.slave(0).await, "SELECT events FROM pgreplica.progress").await;
    assert_eq!(events, 3);
    // What is kept is cleaned once LOG_KEEP has passed.
    s.configure("LOG_KEEP=0\n");
    let daemon = s.spawn();
    let mut left = 1;
    for _ in 0..300 {
        left = number(&m, "SELECT count(*) FROM pgreplica.log WHERE ev_op = 'D'").await;
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    drop(daemon);
    assert_eq!(left, 0, "{}", s.daemon_log());
    // Another policy: deletes are no longer kept.
    std::fs::write(&s.conf, &before).unwrap();
    s.configure("CONFLICT=keep-local\n");
    let out = pgreplica(&["install", conf]);
    assert!(out.status.success(), "{}", output(&out));
    assert!(!deletes_logged(&m).await);
    // newest reads commit times: without them install says how to keep them.
    m.batch_execute("ALTER SYSTEM SET track_commit_timestamp = off")
        .await
        .unwrap();
    s.master.stop("fast").unwrap();
    s.master.restart().unwrap();
    std::fs::write(&s.conf, &before).unwrap();
    s.configure("NODE0=a\nNODE1=b\nCONFLICT=newest\n");
    let out = pgreplica(&["install", conf]);
    assert!(!out.status.success());
    assert!(
        output(&out).contains("ALTER SYSTEM SET track_commit_timestamp = on"),
        "{}",
        output(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_larger_than_a_batch_is_applied_in_steps_and_resumed_where_it_stopped() {
    let s = Setup::wal(1, ITEMS).await;
    s.configure("BATCH_EVENTS=20\n");
    let slave = s.slave(0).await;
    // The slave refuses row 50: the third step fails, the first two stay.
    slave
        .batch_execute("ALTER TABLE items ADD CONSTRAINT no50 CHECK (id <> 50)")
        .await
        .unwrap();
    s.master()
        .await
        .batch_execute("INSERT INTO items SELECT g, 'a', 0 FROM generate_series(1, 100) g")
        .await
        .unwrap();
    let out = s.run_once();
    assert!(!out.status.success(), "{}", output(&out));
    assert_eq!(count(&slave, "items").await, 40);
    let upto = number(&slave, "SELECT upto FROM pgreplica.progress").await;
    assert_eq!(upto, 40);
    // The transaction is read again from its start; the 40 are not applied twice.
    slave
        .batch_execute("ALTER TABLE items DROP CONSTRAINT no50")
        .await
        .unwrap();
    s.sync();
    s.assert_same(0, ALL).await;
    let events = number(&slave, "SELECT events FROM pgreplica.progress").await;
    assert_eq!(events, 100);
}

/// The one number `sql` returns.
async fn number(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// The master's WAL position now.
async fn wal_position(master: &tokio_postgres::Client) -> i64 {
    number(
        master,
        "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8",
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_master_stays_idle_and_a_stopped_slave_shows_its_lag() {
    let s = Setup::wal(1, ITEMS).await;
    let _daemon = s.spawn();
    s.arrives("INSERT INTO items VALUES (1, 'one', 1)", ALL)
        .await;
    // The daemon's own reports write on the master: they must not wake it
    // again and again.
    let m = s.master().await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let before = wal_position(&m).await;
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let written = wal_position(&m).await - before;
    assert!(
        written < 2000,
        "{written} bytes of WAL in 5 s on an idle master"
    );
    // A slave that stops lags by the time since it last caught up.
    s.slaves[0].stop("fast").unwrap();
    m.batch_execute("INSERT INTO items VALUES (2, 'two', 2)")
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let out = pgreplica(&["status", "--json", s.conf.to_str().unwrap()]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let lag = json[0]["lag_seconds"].as_f64().unwrap();
    assert!(lag >= 3.0, "{}", output(&out));
    // And what its slot keeps on the master meanwhile.
    let kept = json[0]["wal_kept_bytes"].as_i64().unwrap();
    assert!(kept > 0, "{}", output(&out));
    let out = pgreplica(&["status", s.conf.to_str().unwrap()]);
    assert!(output(&out).contains("WAL(MB)"), "{}", output(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clone_killed_halfway_runs_again_from_a_new_slot_under_writers() {
    use support::writers::{ACCOUNTS, ALL as ACCOUNTS_ALL, start_writers, stop_writers};
    let ledger = "CREATE TABLE ledger (id bigint PRIMARY KEY, amount numeric)";
    let s = Setup::wal(1, &format!("{ACCOUNTS}; {ledger}")).await;
    s.master()
        .await
        .batch_execute(
            "INSERT INTO accounts SELECT g, 'owner', g, 'note' FROM generate_series(0, 399) g;
             INSERT INTO ledger SELECT g, g / 7.0 FROM generate_series(1, 400000) g;",
        )
        .await
        .unwrap();
    let _daemon = s.spawn();
    let (stop, handles) = start_writers(&s, 2).await;
    let conf = s.conf.to_str().unwrap();
    let said = s.dir.join("clone.log");
    let mut clone = std::process::Command::new(env!("CARGO_BIN_EXE_pgreplica"))
        .args(["clone", conf, "--truncate"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&said).unwrap())
        .spawn()
        .unwrap();
    // Killed while it copies: once it has marked its tables (a loaded
    // machine takes longer to get there than an idle one).
    let slave = s.slave(0).await;
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(30) {
        let marked = slave
            .query_one("SELECT count(*) FROM pgreplica.cloning", &[])
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) > 0);
        if marked {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    clone.kill().unwrap();
    clone.wait().unwrap();
    let marked = count(&slave, "pgreplica.cloning").await;
    assert!(
        marked > 0,
        "the clone ended before it was killed: {}",
        std::fs::read_to_string(&said).unwrap_or_default()
    );
    let out = pgreplica(&["clone", conf, "--truncate"]);
    assert!(out.status.success(), "{}", output(&out));
    assert_eq!(count(&slave, "pgreplica.cloning").await, 0);
    let written = stop_writers(stop, handles).await;
    assert!(
        written > 50,
        "the writers wrote during the clones ({written})"
    );
    let limit = std::time::Duration::from_secs(60);
    s.wait_same(0, ACCOUNTS_ALL, limit).await;
    s.wait_same(0, "SELECT * FROM ledger ORDER BY id", limit)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn operations_and_columns_of_table_sections_apply_to_decoded_changes() {
    let sales = "CREATE TABLE sales (id int PRIMARY KEY, region text, amount numeric, notes text);
                 CREATE TABLE regions (id int PRIMARY KEY, name text, secret text)";
    let s = Setup::wal(1, sales).await;
    s.configure(
        "[TABLE public.sales]\nOPERATIONS=insert, update\nEXCLUDE_COLUMNS=notes\n\
         [TABLE public.regions]\nCOLUMNS=id, name\n",
    );
    let out = pgreplica(&["install", s.conf.to_str().unwrap()]);
    assert!(out.status.success(), "{}", output(&out));
    s.master()
        .await
        .batch_execute(
            "INSERT INTO sales VALUES (1, 'north', 10, 'secret'), (2, 'south', 20, 'secret');
             UPDATE sales SET amount = amount + 1;
             DELETE FROM sales WHERE id = 1;
             TRUNCATE regions;
             INSERT INTO regions VALUES (1, 'north', 'hidden');
             UPDATE regions SET secret = 'still hidden', name = 'North';",
        )
        .await
        .unwrap();
    s.sync();
    let sales =
        String::from_utf8(s.text(Some(0), "SELECT * FROM sales ORDER BY id").await).unwrap();
    // No delete, no notes.
    assert_eq!(sales, "1\tnorth\t11\t\\N\n2\tsouth\t21\t\\N\n");
    let regions = String::from_utf8(s.text(Some(0), "SELECT * FROM regions").await).unwrap();
    assert_eq!(regions, "1\tNorth\t\\N\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_invalidated_by_max_slot_wal_keep_size_stops_the_slave_and_says_to_clone() {
    let s = Setup::wal(1, ITEMS).await;
    s.replicate("INSERT INTO items VALUES (1, 'one', 1)", ALL)
        .await;
    let master = s.master().await;
    let each = |statements: &'static [&'static str]| {
        let master = &master;
        async move {
            for sql in statements {
                master.batch_execute(sql).await.unwrap();
            }
        }
    };
    each(&[
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
        "SELECT pg_reload_conf()",
        "INSERT INTO items VALUES (2, 'two', 2)",
    ])
    .await;
    // More WAL than the slot may keep, while no daemon reads it.
    for _ in 0..4 {
        each(&[
            "CREATE TABLE junk AS SELECT g, repeat('x', 500) AS pad FROM generate_series(1, 40000) g",
            "DROP TABLE junk",
            "SELECT pg_switch_wal()",
            "CHECKPOINT",
        ])
        .await;
    }
    let status: String = master
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&SLOT],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "lost");
    let out = s.run_once();
    let said = output(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("was invalidated"), "{said}");
    assert!(said.contains("pgreplica clone"), "{said}");
    // Clone makes a new slot and copies the rows the slot lost.
    each(&[
        "ALTER SYSTEM RESET max_slot_wal_keep_size",
        "SELECT pg_reload_conf()",
    ])
    .await;
    let out = pgreplica(&["clone", s.conf.to_str().unwrap(), "--truncate"]);
    assert!(out.status.success(), "{}", output(&out));
    s.replicate("INSERT INTO items VALUES (3, 'three', 3)", ALL)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wal_kept_past_wal_warning_is_reported() {
    let s = Setup::wal(1, ITEMS).await;
    s.configure("WAL_WARNING=1\nLAG_WARNING=2\n");
    // The slave cannot apply: its slot keeps the WAL from here on.
    s.slave(0)
        .await
        .batch_execute("DROP TABLE items")
        .await
        .unwrap();
    let _daemon = s.spawn();
    s.master()
        .await
        .batch_execute(
            "INSERT INTO items VALUES (1, 'one', 1);
             CREATE TABLE junk AS SELECT g, repeat('x', 500) AS pad FROM generate_series(1, 10000) g;",
        )
        .await
        .unwrap();
    let start = std::time::Instant::now();
    while !s.daemon_log().contains("WAL_WARNING") {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "no warning:\n{}",
            s.daemon_log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let log = s.daemon_log();
    assert!(log.contains("its replication slot keeps"), "{log}");
}

/// The README's way to switch a running set between the capture modes, both
/// ways, while applications write: the file's `CAPTURE` changed, `pgreplica
/// install` run again, `pgreplica clone --truncate`, the daemon restarted.
/// Nothing is lost or applied twice: the slave ends equal to the master.
#[tokio::test(flavor = "multi_thread")]
async fn a_set_switched_to_triggers_and_back_to_the_wal_under_writers_ends_equal() {
    use support::writers::{ACCOUNTS, ALL as ACCOUNTS_ALL, start_writers, stop_writers};
    let s = Setup::wal(1, ACCOUNTS).await;
    s.master()
        .await
        .batch_execute(
            "INSERT INTO accounts SELECT g, 'owner', g, 'note' FROM generate_series(0, 399) g",
        )
        .await
        .unwrap();
    let conf = s.conf.to_str().unwrap();
    let mut daemon = s.spawn();
    let (stop, handles) = start_writers(&s, 2).await;
    let master = s.master().await;
    for (from, to) in [("wal", "trigger"), ("trigger", "wal")] {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let text = std::fs::read_to_string(&s.conf).unwrap();
        let switched = text.replace(&format!("CAPTURE={from}"), &format!("CAPTURE={to}"));
        assert_ne!(text, switched);
        std::fs::write(&s.conf, switched).unwrap();
        daemon.terminate();
        for step in [vec!["install", conf], vec!["clone", conf, "--truncate"]] {
            let out = pgreplica(&step);
            assert!(out.status.success(), "{step:?} to {to}: {}", output(&out));
        }
        daemon = s.spawn();
        let slots = number(
            &master,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgreplica%'",
        )
        .await;
        assert_eq!(
            slots,
            i64::from(to == "wal"),
            "slots after switching to {to}"
        );
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let written = stop_writers(stop, handles).await;
    assert!(
        written > 50,
        "the writers wrote during the switches ({written})"
    );
    let limit = std::time::Duration::from_secs(60);
    s.wait_same(0, ACCOUNTS_ALL, limit).await;
    daemon.terminate();
}

/// A `[TABLE]` section's `FILTER` under WAL capture keeps exactly the changes
/// the capture trigger keeps: the same writes through a set of each mode end
/// in the same rows on their slaves (rows moving into and out of the filter,
/// keys moved, values an update leaves alone out of line).
#[tokio::test(flavor = "multi_thread")]
async fn a_filter_keeps_the_same_changes_from_the_wal_as_the_trigger_does() {
    let schema = format!("{ITEMS}; ALTER TABLE items ADD COLUMN region text");
    let section = "[TABLE public.items]\nFILTER=new.region = 'north' OR old.region = 'north'\n";
    let writes = "
        INSERT INTO items SELECT g, 'item', g, repeat('x', 9000),
               CASE WHEN g % 2 = 0 THEN 'north' ELSE 'south' END FROM generate_series(1, 20) g;
        UPDATE items SET qty = qty + 1;
        UPDATE items SET region = 'north' WHERE id IN (1, 3);
        UPDATE items SET region = 'south' WHERE id IN (2, 4);
        UPDATE items SET id = id + 100 WHERE id IN (6, 7);
        DELETE FROM items WHERE id IN (8, 9);";
    let rows = "SELECT id, name, qty, length(big), region FROM items ORDER BY id";
    let mut slaves = Vec::new();
    for s in [Setup::new(1, &schema).await, Setup::wal(1, &schema).await] {
        s.configure(section);
        let out = pgreplica(&["install", s.conf.to_str().unwrap()]);
        assert!(out.status.success(), "{}", output(&out));
        s.master().await.batch_execute(writes).await.unwrap();
        s.sync();
        slaves.push(String::from_utf8(s.text(Some(0), rows).await).unwrap());
    }
    assert_eq!(slaves[0], slaves[1], "trigger, then WAL");
    // Only north rows, and those that left north (their last update went).
    assert_eq!(
        slaves[1]
            .lines()
            .map(|l| l.split('\t').next().unwrap())
            .collect::<Vec<_>>(),
        ["2", "4", "10", "12", "14", "16", "18", "20", "106"],
        "{}",
        slaves[1]
    );
}

/// Whether a WAL sender streams the set's slot (read through SQL, the slot
/// is in use only while a statement reads it, by an ordinary session).
async fn streamed(master: &tokio_postgres::Client) -> bool {
    let sql = format!(
        "SELECT count(*) FROM pg_replication_slots s
           JOIN pg_stat_replication r ON r.pid = s.active_pid
          WHERE s.slot_name = '{SLOT}'"
    );
    number(master, &sql).await == 1
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_is_streamed_a_cut_stream_resumes_and_without_wal_senders_it_is_read_through_sql() {
    let s = Setup::wal(1, ITEMS).await;
    let m = s.master().await;
    let mut daemon = s.spawn();
    s.arrives(
        "INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, 100) g",
        ALL,
    )
    .await;
    assert!(streamed(&m).await, "{}", s.daemon_log());
    // The master ends the stream between writes: the daemon opens it again
    // where the slave is, and nothing is lost or applied twice.
    let cut = format!(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
          WHERE slot_name = '{SLOT}' AND active_pid IS NOT NULL"
    );
    for round in 0..5 {
        let update = format!("UPDATE items SET qty = qty + 1 WHERE id % 5 = {round}");
        m.batch_execute(&update).await.unwrap();
        m.batch_execute(&cut).await.unwrap();
        let insert = format!(
            "INSERT INTO items VALUES ({}, 'after a cut', 1)",
            1000 + round
        );
        m.batch_execute(&insert).await.unwrap();
    }
    s.wait_same(0, ALL, std::time::Duration::from_secs(30))
        .await;
    s.assert_applied_once(0).await;
    // A master without a free WAL sender: the slot is read through SQL.
    daemon.terminate();
    m.batch_execute("ALTER SYSTEM SET max_wal_senders = 0")
        .await
        .unwrap();
    s.master.stop("fast").unwrap();
    s.master.restart().unwrap();
    let m = s.master().await;
    let out = pgreplica(&["install", s.conf.to_str().unwrap()]);
    assert!(out.status.success(), "{}", output(&out));
    assert!(
        output(&out).contains("note: max_wal_senders is 0 and 0 are in use"),
        "{}",
        output(&out)
    );
    let _daemon = s.spawn();
    s.arrives("UPDATE items SET name = 'through SQL' WHERE id <= 50", ALL)
        .await;
    assert!(!streamed(&m).await);
    s.assert_applied_once(0).await;
    let log = s.daemon_log();
    assert!(
        log.contains(&format!("reading slot {SLOT} through SQL")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clone_while_the_daemon_streams_an_idle_master_gets_the_slot() {
    let s = Setup::wal(1, ITEMS).await;
    let m = s.master().await;
    let _daemon = s.spawn();
    s.arrives(
        "INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, 100) g",
        ALL,
    )
    .await;
    assert!(streamed(&m).await, "{}", s.daemon_log());
    // Nothing is written on the master from here: the daemon must let go of
    // the slot because the slave says it is being cloned.
    let out = pgreplica(&["clone", s.conf.to_str().unwrap(), "--truncate"]);
    assert!(out.status.success(), "{}", output(&out));
    s.arrives("UPDATE items SET qty = 0 WHERE id <= 10", ALL)
        .await;
    assert!(streamed(&m).await, "{}", s.daemon_log());
}
