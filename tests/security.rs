//! Security: an application role writes replicated tables but cannot touch the log.

mod support;

use support::{Setup, connect};
use tokio_postgres::Client;

/// A replicated table and an application role that may write it.
const SHOP: &str = "CREATE TABLE orders (id int PRIMARY KEY, item text);
                    CREATE ROLE app LOGIN;
                    GRANT SELECT, INSERT, UPDATE, DELETE ON orders TO app;";

/// A session of the application role on the master.
async fn application(s: &Setup) -> Client {
    connect(&format!(
        "host=127.0.0.1 port={} user=app dbname=app",
        s.master.port
    ))
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_application_role_cannot_forge_or_erase_log_rows() {
    let s = Setup::new(1, SHOP).await;
    let app = application(&s).await;
    app.batch_execute("INSERT INTO orders VALUES (1, 'book'), (2, 'pen'); UPDATE orders SET item = 'ink' WHERE id = 2; DELETE FROM orders WHERE id = 1")
        .await
        .expect("the application writes replicated tables through the capture trigger");

    let attempts = [
        "INSERT INTO pgreplica.log (ev_table, ev_op, ev_new) VALUES ('orders'::regclass, 'I', '(9,forged)')",
        "UPDATE pgreplica.log SET ev_new = '(2,forged)'",
        "DELETE FROM pgreplica.log",
        "TRUNCATE pgreplica.log",
        "SELECT * FROM pgreplica.log",
        "UPDATE pgreplica.slave SET snapshot = txid_current_snapshot()",
        "DELETE FROM pgreplica.tables",
        "SELECT pgreplica.attach('orders')",
        "CREATE OR REPLACE FUNCTION pgreplica.attach(tbl regclass) RETURNS text LANGUAGE sql AS 'SELECT NULL::text'",
        "CREATE TABLE pgreplica.extra (x int)",
    ];
    let capture_fn = s
        .master()
        .await
        .query_one("SELECT pgreplica.capture_name('orders')", &[])
        .await
        .unwrap()
        .get::<_, String>(0);
    let replace = format!(
        "CREATE OR REPLACE FUNCTION pgreplica.{capture_fn}() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'"
    );
    for sql in attempts.iter().copied().chain([replace.as_str()]) {
        let err = app.batch_execute(sql).await.expect_err(sql);
        let message = err
            .as_db_error()
            .map(|e| e.message().to_string())
            .unwrap_or_default();
        assert!(
            message.contains("permission denied") || message.contains("must be owner"),
            "{sql}: {message}"
        );
    }
    // A search_path pointing at the application's own objects changes nothing either.
    app.batch_execute("SET search_path = pg_temp, public; INSERT INTO orders VALUES (3, 'cup')")
        .await
        .unwrap();
    s.sync();
    s.assert_same(0, "SELECT * FROM orders ORDER BY id").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_application_session_cannot_mark_its_changes_as_another_nodes() {
    let s = Setup::new(1, SHOP).await;
    // Two named nodes: changes that came from the slave's node never go back to it.
    s.configure("NODE0=hq\nNODE1=shop\n");
    let app = application(&s).await;
    app.batch_execute(
        "SET pgreplica.origin = 'shop';
         INSERT INTO orders VALUES (1, 'forged origin');
         SELECT set_config('pgreplica.origin', 'shop', true);
         INSERT INTO orders VALUES (2, 'pooled session')",
    )
    .await
    .unwrap();
    let err = app
        .batch_execute("SET session_replication_role = replica")
        .await
        .expect_err("an application role may not pose as replication");
    let message = err.as_db_error().map(|e| e.message().to_string());
    assert!(
        message
            .as_deref()
            .unwrap_or("")
            .contains("permission denied"),
        "{message:?}"
    );
    s.sync();
    s.assert_same(0, "SELECT * FROM orders ORDER BY id").await;
}

/// Where a set's password may show, spelled as a DBA might write it.
const SPELLED: &str = "password = 'se cret\\'s'";

#[tokio::test(flavor = "multi_thread")]
async fn passwords_reach_no_command_line_log_or_status() {
    let s = Setup::with_schemas(
        1,
        "CREATE TABLE later (id int PRIMARY KEY, v text); INSERT INTO later VALUES (1, 'a');
         CREATE ROLE cloner LOGIN SUPERUSER PASSWORD 'se cret''s';",
        "CREATE ROLE cloner LOGIN SUPERUSER",
    )
    .await;
    // The master takes the set's role by password only.
    s.master
        .reconfigure(
            "",
            "local all all trust\nhost all cloner 127.0.0.1/32 scram-sha-256\n\
             host all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
    let conf = std::fs::read_to_string(&s.conf).unwrap();
    std::fs::write(
        &s.conf,
        conf.replace("user=postgres", &format!("user=cloner {SPELLED}")),
    )
    .unwrap();
    // The clone runs pg_dump for the table the slave lacks: its command line
    // is read while it runs.
    let conf = s.conf.to_str().unwrap().to_string();
    let cloning = {
        let conf = conf.clone();
        tokio::task::spawn_blocking(move || support::pgreplica(&["clone", &conf]))
    };
    let watching = tokio::task::spawn_blocking(|| {
        let start = std::time::Instant::now();
        while start.elapsed().as_secs() < 60 {
            let found = std::fs::read_dir("/proc").unwrap().find_map(|entry| {
                let dir = entry.ok()?.path();
                let name = std::fs::read_to_string(dir.join("comm")).ok()?;
                (name.trim() == "pg_dump").then(|| std::fs::read(dir.join("cmdline")).ok())?
            });
            if let Some(line) = found.filter(|l| !l.is_empty()) {
                return String::from_utf8_lossy(&line).replace('\0', " ");
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("pg_dump was never seen running");
    });
    let command_line = watching.await.unwrap();
    assert!(command_line.contains("user=cloner"), "{command_line}");
    assert!(!command_line.contains("cret"), "{command_line}");
    let out = cloning.await.unwrap();
    assert!(out.status.success(), "{}", support::text(&out));
    s.assert_same(0, "SELECT * FROM later ORDER BY id").await;
    // Nor in the log, the status, or the master's registry.
    let run = s.run_once();
    let status = support::pgreplica(&["status", &conf]);
    let registered: Vec<String> = s
        .master()
        .await
        .query("SELECT dsn FROM pgreplica.slave", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for shown in [
        support::text(&out),
        support::text(&run),
        support::text(&status),
        registered.join("\n"),
    ] {
        assert!(!shown.contains("cret"), "{shown}");
    }
    assert!(
        registered.join("").contains("password=***"),
        "{registered:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_search_path_runs_nothing_of_the_application_inside_capture() {
    let s = Setup::new(1, SHOP).await;
    let master = s.master().await;
    master
        .batch_execute(
            "INSERT INTO orders VALUES (1, 'book'); CREATE SCHEMA evil AUTHORIZATION app;
             GRANT INSERT ON orders TO app",
        )
        .await
        .unwrap();
    let app = application(&s).await;
    // Operators and functions that shadow pg_catalog's for whoever puts
    // their schema first, and note who ran them.
    app.batch_execute(
        "CREATE TABLE evil.ran (who text);
         CREATE FUNCTION evil.noted(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO evil.ran VALUES (current_user); RETURN a OPERATOR(pg_catalog.=) b; END $$;
         CREATE FUNCTION evil.noted(a int, b int) RETURNS boolean LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO evil.ran VALUES (current_user); RETURN a OPERATOR(pg_catalog.=) b; END $$;
         CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.noted);
         CREATE OPERATOR evil.= (LEFTARG = int, RIGHTARG = int, FUNCTION = evil.noted);
         CREATE FUNCTION evil.pg_notify(text, text) RETURNS void LANGUAGE sql
             AS $$ INSERT INTO evil.ran VALUES (current_user) $$;
         CREATE FUNCTION evil.current_setting(text) RETURNS text LANGUAGE sql
             AS $$ INSERT INTO evil.ran VALUES (current_user) RETURNING 'x' $$;
         GRANT ALL ON evil.ran TO PUBLIC;",
    )
    .await
    .unwrap();
    app.batch_execute(
        "SET search_path = evil, pg_catalog, public;
         INSERT INTO public.orders VALUES (2, 'pen');
         UPDATE public.orders SET item = 'ink' WHERE id OPERATOR(pg_catalog.=) 2;
         DELETE FROM public.orders WHERE id OPERATOR(pg_catalog.=) 1;",
    )
    .await
    .unwrap();
    let ran: Vec<String> = master
        .query("SELECT DISTINCT who FROM evil.ran", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(ran.iter().all(|who| who == "app"), "ran as {ran:?}");
    s.sync();
    s.assert_same(0, "SELECT * FROM orders ORDER BY id").await;
}
