//! The command line as a DBA uses it: install, uninstall, status and config errors.

mod support;

use support::{Setup, connect, pgreplica, server, text};

#[tokio::test(flavor = "multi_thread")]
async fn install_reports_each_table_is_idempotent_and_uninstall_removes_everything() {
    let pg = server("UTC");
    connect(&pg.dsn("postgres"))
        .await
        .batch_execute("CREATE DATABASE shop")
        .await
        .unwrap();
    let shop = connect(&pg.dsn("shop")).await;
    shop.batch_execute(
        "CREATE SCHEMA sales; CREATE TABLE sales.orders (id int PRIMARY KEY);
         CREATE TABLE notes (body text); CREATE VIEW v AS SELECT 1;",
    )
    .await
    .unwrap();
    let dsn = pg.dsn("shop");
    let out = pgreplica(&["install", "--dsn", &dsn]);
    assert!(out.status.success(), "{}", text(&out));
    let report = text(&out);
    assert!(report.contains("sales.orders: replicated"), "{report}");
    assert!(
        report.contains("notes: skipped: no primary key"),
        "{report}"
    );

    // Again, after a new table appears: safe, and the new table is picked up.
    shop.batch_execute(
        "INSERT INTO sales.orders VALUES (1); CREATE TABLE later (id int PRIMARY KEY)",
    )
    .await
    .unwrap();
    let out = pgreplica(&["install", "--dsn", &dsn]);
    assert!(text(&out).contains("later: replicated"), "{}", text(&out));
    let logged: i64 = shop
        .query_one("SELECT count(*) FROM pgreplica.log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 1, "the log survives a second install");

    let out = pgreplica(&["install", "--dsn", &dsn, "--table", "no_such_table"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no_such_table"), "{}", text(&out));

    let out = pgreplica(&["uninstall", "--dsn", &dsn]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("1 logged events discarded"),
        "{}",
        text(&out)
    );
    let left: i64 = shop
        .query_one(
            "SELECT (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgreplica%')
                  + (SELECT count(*) FROM pg_namespace WHERE nspname = 'pgreplica')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    shop.batch_execute("INSERT INTO sales.orders VALUES (2)")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn install_with_named_tables_attaches_only_those() {
    let pg = server("UTC");
    let client = connect(&pg.dsn("postgres")).await;
    client
        .batch_execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
        .await
        .unwrap();
    let out = pgreplica(&[
        "install",
        "--dsn",
        &pg.dsn("postgres"),
        "--table",
        "public.a",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "a: replicated\n1 of 1 tables replicated\n"
    );
}

#[test]
fn a_bad_config_names_file_line_and_key() {
    let dir = std::env::temp_dir().join(format!("pgreplica-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.conf");
    std::fs::write(
        &path,
        "[MAIN]\nNAME=x\nDSN0=host=a\nDSN1=host=b\nKEEPALIVE=maybe\n",
    )
    .unwrap();
    let out = pgreplica(&["run", "--once", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let message = text(&out);
    assert!(
        message.contains(
            "bad.conf:5: KEEPALIVE: 'maybe' is neither true/false nor a number of seconds"
        ),
        "{message}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_waiting_events_then_caught_up() {
    let s = Setup::new(1, "CREATE TABLE t (id int PRIMARY KEY)").await;
    let conf = s.conf.to_str().unwrap();
    let out = pgreplica(&["status", conf]);
    assert!(text(&out).contains("not started"), "{}", text(&out));
    s.master()
        .await
        .batch_execute("INSERT INTO t SELECT generate_series(1, 5)")
        .await
        .unwrap();
    s.sync();
    s.master()
        .await
        .batch_execute("INSERT INTO t VALUES (6)")
        .await
        .unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&pgreplica(&["status", "--json", conf]).stdout).unwrap();
    assert_eq!(json[0]["state"], "running");
    assert_eq!(json[0]["events_waiting"], 1);
    assert_eq!(json[0]["events_applied"], 5);
    assert!(json[0]["dsn"].as_str().unwrap().contains("dbname=app"));
    s.sync();
    let out = pgreplica(&["status", conf]);
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value =
        serde_json::from_slice(&pgreplica(&["status", "--json", conf]).stdout).unwrap();
    assert_eq!(json[0]["events_waiting"], 0);
    assert_eq!(json[0]["lag_seconds"], 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn log_format_json_writes_one_json_object_per_line() {
    let s = support::Setup::new(1, "CREATE TABLE t (id int PRIMARY KEY)").await;
    s.configure("LOG_FORMAT=json\n");
    s.master()
        .await
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let out = s.run_once();
    assert!(out.status.success(), "{}", support::text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(!lines.is_empty());
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
    assert!(stderr.contains("applied 1 events"), "{stderr}");
}
