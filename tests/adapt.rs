//! Adaptation: what is captured of a table (operations, row filter, columns),
//! and how it lands on the slave (renames, transform scripts).

mod support;

use std::time::Duration;
use support::{Setup, pgreplica, text};

const SALES: &str =
    "CREATE TABLE sales (id int PRIMARY KEY, region text, amount numeric, notes text)";

fn install(s: &Setup) -> std::process::Output {
    pgreplica(&["install", s.conf.to_str().unwrap()])
}

async fn logged(s: &Setup) -> Vec<(String, Option<String>, Option<String>)> {
    s.master()
        .await
        .query(
            "SELECT ev_op::text, ev_old, ev_new FROM pgreplica.log
              WHERE ev_table = 'sales'::regclass ORDER BY ev_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn filtered_rows_excluded_columns_and_operations_never_enter_the_log() {
    if support::trigger_only("it reads what the trigger writes in the master's log") {
        return;
    }
    let s = Setup::with_schemas(
        1,
        SALES,
        "CREATE TABLE sales (id int PRIMARY KEY, region text, amount numeric)",
    )
    .await;
    s.configure(
        "[TABLE public.sales]\nOPERATIONS=insert, update\n\
         FILTER=new.region = 'north' OR old.region = 'north'\nEXCLUDE_COLUMNS=notes\n",
    );
    let out = install(&s);
    assert!(out.status.success(), "{}", text(&out));
    let m = s.master().await;
    m.batch_execute(
        "INSERT INTO sales VALUES (1, 'north', 10, 'secret'), (2, 'south', 20, 'secret');
         UPDATE sales SET notes = 'also secret';
         UPDATE sales SET amount = amount + 1;
         DELETE FROM sales WHERE id = 1;",
    )
    .await
    .unwrap();
    let log = logged(&s).await;
    assert_eq!(
        log,
        vec![
            ("I".into(), None, Some("(1,north,10)".into())),
            (
                "U".into(),
                Some("(1,north,10)".into()),
                Some("(1,north,11)".into())
            ),
        ],
        "only north rows, no notes, no delete"
    );
    s.sync();
    let rows = s.text(Some(0), "SELECT * FROM sales ORDER BY id").await;
    assert_eq!(String::from_utf8(rows).unwrap(), "1\tnorth\t11\n");

    // Back to everything: an empty section resets the options.
    std::fs::write(
        &s.conf,
        std::fs::read_to_string(&s.conf)
            .unwrap()
            .split("[TABLE")
            .next()
            .unwrap()
            .to_string()
            + "[TABLE public.sales]\n",
    )
    .unwrap();
    let out = install(&s);
    assert!(out.status.success(), "{}", text(&out));
    m.batch_execute("INSERT INTO sales VALUES (3, 'south', 30, 'x')")
        .await
        .unwrap();
    let log = logged(&s).await;
    assert_eq!(log.last().unwrap().2.as_deref(), Some("(3,south,30,x)"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_filter_that_does_not_compile_is_refused_at_install_and_at_reload() {
    let s = Setup::new(1, SALES).await;
    s.configure("[TABLE sales]\nFILTER=new.regio = 'north'\n");
    // The section's line, just before FILTER's (the [MAIN] lines before it
    // differ with the capture mode).
    let conf = std::fs::read_to_string(&s.conf).unwrap();
    let section_line = conf.lines().position(|l| l.starts_with("FILTER=")).unwrap();
    let out = install(&s);
    let said = text(&out);
    assert!(!out.status.success());
    assert!(
        said.contains(&format!("app.conf:{section_line}:"))
            && said.contains("sales")
            && said.contains("new.regio = 'north'")
            && said.contains("regio"),
        "{said}"
    );
    let conf = std::fs::read_to_string(&s.conf).unwrap();
    let good = conf.replace("new.regio", "new.region");
    std::fs::write(&s.conf, &good).unwrap();
    let mut daemon = s.spawn();
    s.arrives(
        "INSERT INTO sales VALUES (1, 'north', 1, '')",
        "SELECT * FROM sales ORDER BY id",
    )
    .await;
    std::fs::write(&s.conf, &conf).unwrap();
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGHUP) };
    let start = std::time::Instant::now();
    while !s.daemon_log().contains("reload refused") && start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = s.daemon_log();
    assert!(
        log.contains("reload refused") && log.contains("new.regio"),
        "{log}"
    );
    // The running set carries on with the filter it had.
    s.master()
        .await
        .batch_execute("INSERT INTO sales VALUES (2, 'south', 2, ''), (3, 'north', 3, '')")
        .await
        .unwrap();
    s.wait_same(
        0,
        "SELECT * FROM sales WHERE region = 'north' ORDER BY id",
        Duration::from_secs(20),
    )
    .await;
    daemon.terminate();
    let rows = s.text(Some(0), "SELECT id FROM sales ORDER BY id").await;
    assert_eq!(String::from_utf8(rows).unwrap(), "1\n3\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn renamed_table_schema_and_columns_land_on_the_slave() {
    let s = Setup::with_schemas(
        1,
        SALES,
        "CREATE SCHEMA warehouse;
         CREATE TABLE warehouse.sales_2026 (total numeric, id int PRIMARY KEY, area text, notes text)",
    )
    .await;
    s.configure(
        "[TABLE public.sales]\nSLAVE_TABLE=warehouse.sales_2026\nRENAME_COLUMNS=amount:total, region:area\n",
    );
    s.master()
        .await
        .batch_execute(
            "INSERT INTO sales SELECT g, 'r' || g, g * 1.5, NULL FROM generate_series(1, 100) g;
             UPDATE sales SET amount = amount * 2 WHERE id % 3 = 0;
             UPDATE sales SET region = 'moved', id = id + 1000 WHERE id % 7 = 0;
             DELETE FROM sales WHERE id % 5 = 0;",
        )
        .await
        .unwrap();
    s.sync();
    let master = s
        .text(None, "SELECT id, region, amount FROM sales ORDER BY id")
        .await;
    let slave = s
        .text(
            Some(0),
            "SELECT id, area, total FROM warehouse.sales_2026 ORDER BY id",
        )
        .await;
    assert_eq!(
        String::from_utf8(master).unwrap(),
        String::from_utf8(slave).unwrap()
    );
}

const ORDERS: &str = "CREATE TABLE orders (id int PRIMARY KEY, item text, qty int)";

/// Drops `ignore` rows, upper-cases items, and splits a `set` into its two parts.
const SCRIPT: &str = "-- order lines for the warehouse
function transform(op, row)
  if row.item == 'ignore' then return end
  if row.id == '13' and broken then error('cannot ship order 13') end
  if row.item == 'set' then
    return {id = row.id * 1000 + 1, item = 'PART-A', qty = row.qty},
           {id = row.id * 1000 + 2, item = 'PART-B', qty = row.qty}
  end
  row.item = string.upper(row.item)
  return row
end
";

/// What the slave must hold, computed from the master's rows.
const EXPECTED: &str = "
SELECT id, upper(item), qty FROM orders WHERE item NOT IN ('ignore', 'set')
UNION ALL SELECT id * 1000 + 1, 'PART-A', qty FROM orders WHERE item = 'set'
UNION ALL SELECT id * 1000 + 2, 'PART-B', qty FROM orders WHERE item = 'set'
ORDER BY 1";

/// `run --once`, which must fail; what it said.
fn run_fails(s: &Setup) -> String {
    let out = s.run_once();
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    said
}

/// The slave's orders are what the script makes of the master's.
async fn orders_as_expected(s: &Setup) {
    let expected = s.text(None, EXPECTED).await;
    let slave = s.text(Some(0), "SELECT * FROM orders ORDER BY id").await;
    assert_eq!(
        String::from_utf8_lossy(&expected),
        String::from_utf8_lossy(&slave)
    );
}

fn with_script(s: &Setup, script: &str) -> std::path::PathBuf {
    let path = s.conf.with_file_name("orders.lua");
    std::fs::write(&path, script).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transform_drops_changes_and_splits_rows() {
    let s = Setup::new(1, ORDERS).await;
    with_script(&s, SCRIPT);
    s.configure("[TABLE orders]\nTRANSFORM=orders.lua\n");
    let m = s.master().await;
    m.batch_execute(
        "INSERT INTO orders SELECT g, (ARRAY['pen', 'ignore', 'set'])[g % 3 + 1], g FROM generate_series(1, 300) g",
    )
    .await
    .unwrap();
    s.sync();
    orders_as_expected(&s).await;
    // Updates reach both parts of a set; a row turning into 'ignore' leaves the
    // slave, one turning from 'ignore' into 'pen' arrives; deletes follow.
    m.batch_execute(
        "UPDATE orders SET qty = qty + 1000 WHERE id % 2 = 0;
         UPDATE orders SET item = CASE item WHEN 'pen' THEN 'ignore' WHEN 'ignore' THEN 'pen' ELSE item END
          WHERE id % 5 = 0;
         DELETE FROM orders WHERE id % 7 = 0;",
    )
    .await
    .unwrap();
    s.sync();
    orders_as_expected(&s).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_script_error_stops_the_slave_naming_script_line_and_row_and_skips_nothing() {
    let s = Setup::new(1, ORDERS).await;
    let script = with_script(&s, &SCRIPT.replace("and broken", ""));
    s.configure("[TABLE orders]\nTRANSFORM=orders.lua\n");
    s.master()
        .await
        .batch_execute("INSERT INTO orders SELECT g, 'pen', g FROM generate_series(1, 20) g")
        .await
        .unwrap();
    let said = run_fails(&s);
    assert!(
        said.contains(&format!("{}:4: cannot ship order 13", script.display()))
            && said.contains("(id)=(13)")
            && said.contains("table \"public\".\"orders\""),
        "{said}"
    );
    let slave = s.slave(0).await;
    assert_eq!(
        support::count(&slave, "orders").await,
        0,
        "nothing of the batch applied"
    );
    with_script(&s, SCRIPT);
    s.sync();
    assert_eq!(support::count(&slave, "orders").await, 20);

    // A script that never ends is stopped at its time limit.
    with_script(&s, "function transform(op, row) while true do end end");
    let conf = std::fs::read_to_string(&s.conf).unwrap();
    std::fs::write(
        &s.conf,
        conf.replace("[MAIN]\nNAME", "[MAIN]\nTRANSFORM_TIME_LIMIT=0.2\nNAME"),
    )
    .unwrap();
    s.master()
        .await
        .batch_execute("INSERT INTO orders VALUES (100, 'pen', 1)")
        .await
        .unwrap();
    let said = run_fails(&s);
    assert!(
        said.contains("time limit (0.2 s)") && said.contains("(id)=(100)"),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn clone_and_check_follow_the_table_sections() {
    let s = Setup::with_schemas(
        1,
        &format!("{SALES}; {ORDERS}; CREATE TABLE regions (id int PRIMARY KEY, region text)"),
        &format!(
            "CREATE SCHEMA warehouse;
             CREATE TABLE warehouse.sales_2026 (id int PRIMARY KEY, area text, total numeric);
             {ORDERS}"
        ),
    )
    .await;
    with_script(&s, SCRIPT);
    s.configure(
        "[TABLE public.sales]\nSLAVE_TABLE=warehouse.sales_2026\n\
         RENAME_COLUMNS=amount:total, region:area\nEXCLUDE_COLUMNS=notes\n\
         [TABLE orders]\nTRANSFORM=orders.lua\n\
         [TABLE regions]\nFILTER=new.region = 'north'\n",
    );
    let m = s.master().await;
    m.batch_execute(
        "INSERT INTO sales SELECT g, 'r' || g, g, 'secret' FROM generate_series(1, 500) g;
         INSERT INTO orders SELECT g, (ARRAY['pen', 'ignore', 'set'])[g % 3 + 1], g FROM generate_series(1, 500) g;
         INSERT INTO regions SELECT g, (ARRAY['north', 'south'])[g % 2 + 1] FROM generate_series(1, 500) g;",
    )
    .await
    .unwrap();
    let out = pgreplica(&["clone", s.conf.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    m.batch_execute(
        "UPDATE sales SET amount = amount * 2 WHERE id % 3 = 0;
         UPDATE orders SET qty = qty + 1 WHERE id % 4 = 0;
         INSERT INTO regions VALUES (1001, 'north'), (1002, 'south');",
    )
    .await
    .unwrap();
    s.sync();
    let sales = s
        .text(
            Some(0),
            "SELECT id, area, total FROM warehouse.sales_2026 ORDER BY id",
        )
        .await;
    let master = s
        .text(None, "SELECT id, region, amount FROM sales ORDER BY id")
        .await;
    assert_eq!(
        String::from_utf8_lossy(&master),
        String::from_utf8_lossy(&sales)
    );
    orders_as_expected(&s).await;
    let regions = s.text(Some(0), "SELECT * FROM regions ORDER BY id").await;
    let north = s
        .text(
            None,
            "SELECT * FROM regions WHERE region = 'north' ORDER BY id",
        )
        .await;
    assert_eq!(
        String::from_utf8_lossy(&north),
        String::from_utf8_lossy(&regions)
    );

    let out = pgreplica(&["check", s.conf.to_str().unwrap()]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("\"public\".\"sales\": 500 rows, equal")
            && said.contains("\"public\".\"orders\": not compared: its rows are transformed")
            && said.contains("\"public\".\"regions\": not compared"),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_scripts_of_some_sets_do_not_hold_up_the_others() {
    // One server pair, four databases: two sets whose script takes its time
    // over every row (as many as the daemon's worker threads on this machine
    // and more), one plain set.
    let s = Setup::new(1, "").await;
    let script = s.conf.with_file_name("slow.lua");
    std::fs::write(
        &script,
        "function transform(op, row) local x = 0 for i = 1, 4e7 do x = x + i end return row end",
    )
    .unwrap();
    let names = ["slow1", "slow2", "slow3", "quick"];
    let mut confs = Vec::new();
    for name in names {
        for server in std::iter::once(&s.master).chain(&s.slaves) {
            let admin = support::connect(&server.dsn("postgres")).await;
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .unwrap();
            support::connect(&server.dsn(name))
                .await
                .batch_execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
                .await
                .unwrap();
        }
        let mut master = support::connect(&s.master.dsn(name)).await;
        pgreplica::capture::install(&mut master, &[], None)
            .await
            .unwrap();
        let mut text = format!(
            "[MAIN]\nNAME={name}\nDSN0={}\nDSN1={}\nTRANSFORM_TIME_LIMIT=30\n",
            s.master.dsn(name),
            s.slaves[0].dsn(name)
        );
        if name.starts_with("slow") {
            text.push_str(&format!("[TABLE items]\nTRANSFORM={}\n", script.display()));
        }
        let conf = s.conf.with_file_name(format!("{name}.conf"));
        std::fs::write(&conf, text).unwrap();
        confs.push(conf);
    }
    let _daemon = support::spawn_run(&confs, &s.dir.join("sets.log"));
    for name in &names[..3] {
        support::connect(&s.master.dsn(name))
            .await
            .batch_execute("INSERT INTO items SELECT g, 'x' FROM generate_series(1, 20) g")
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    support::connect(&s.master.dsn("quick"))
        .await
        .batch_execute("INSERT INTO items VALUES (1, 'quick')")
        .await
        .unwrap();
    let quick = support::connect(&s.slaves[0].dsn("quick")).await;
    let start = std::time::Instant::now();
    while support::count(&quick, "items").await == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{}",
            s.daemon_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The slow sets are still at their rows (each batch is one transaction).
    for name in &names[..3] {
        let slave = support::connect(&s.slaves[0].dsn(name)).await;
        assert_eq!(
            support::count(&slave, "items").await,
            0,
            "{name} finished before the quick set's row arrived: it was held up"
        );
    }
}
