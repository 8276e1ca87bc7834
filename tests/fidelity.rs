//! Fidelity: after replication, every type and every awkward name is byte-equal,
//! and no update or delete of any type is taken for a conflict.

mod support;

use support::Setup;

/// Column name (already quoted) and type; the slave gets them in reverse order.
const COLUMNS: &[(&str, &str)] = &[
    ("id", "int"),
    ("i2", "smallint"),
    ("i4", "int"),
    ("i8", "bigint"),
    ("f4", "real"),
    ("f8", "double precision"),
    ("num", "numeric"),
    ("nump", "numeric(60,20)"),
    ("t", "text"),
    ("c", "char(5)"),
    ("vc", "varchar(10)"),
    ("b", "bytea"),
    ("bo", "bool"),
    ("d", "date"),
    ("tm", "time"),
    ("ttz", "timetz"),
    ("ts", "timestamp"),
    ("tstz", "timestamptz"),
    ("iv", "interval"),
    ("u", "uuid"),
    ("j", "json"),
    ("jb", "jsonb"),
    ("arr", "int[]"),
    ("arr2", "text[]"),
    ("r", "int4range"),
    ("tr", "tstzrange"),
    ("mr", "int4multirange"),
    ("e", "\"Odd Schema\".\"mood \"\"q\"\"\""),
    ("dom", "\"Odd Schema\".posint"),
    ("comp", "\"Odd Schema\".pair"),
    ("ip", "inet"),
    ("cid", "cidr"),
    ("mac", "macaddr"),
    ("mac8", "macaddr8"),
    ("bits", "bit(4)"),
    ("vbits", "varbit"),
    ("m", "money"),
    ("tsv", "tsvector"),
    ("x", "xml"),
    ("pt", "point"),
    ("ln", "line"),
    ("ls", "lseg"),
    ("bx", "box"),
    ("pa", "path"),
    ("pg", "polygon"),
    ("ci", "circle"),
    ("\"select\"", "text"),
    ("\"Mixed Case\"", "text"),
    ("\"with space\"", "text"),
    ("\"quo\"\"te\"", "text"),
    ("\"ñandú\"", "text"),
];

const TYPES: &str = r#"
CREATE SCHEMA "Odd Schema";
CREATE TYPE "Odd Schema"."mood ""q""" AS ENUM ('ok', 'it''s "fine"', 'sad');
CREATE DOMAIN "Odd Schema".posint AS int CHECK (VALUE > 0);
CREATE TYPE "Odd Schema".pair AS (a int, b text);
CREATE TABLE "Odd Schema"."Composite" (a int, "B" text, v text, PRIMARY KEY (a, "B"));
"#;

const TABLE: &str = "\"Odd Schema\".\"Types Table\"";

fn schema(reverse: bool) -> String {
    // Multiranges came with PostgreSQL 14: the column holds their text before.
    let old = support::oldest_major() < 14;
    let mut columns: Vec<String> = COLUMNS
        .iter()
        .map(|&(n, t)| match t {
            "int4multirange" if old => format!("{n} text"),
            _ => format!("{n} {t}"),
        })
        .collect();
    if reverse {
        columns.reverse();
        format!(
            "{TYPES}CREATE TABLE {TABLE} ({}, PRIMARY KEY (id));",
            columns.join(", ")
        )
    } else {
        // The master's table has a dropped column in the middle, and a deferrable
        // key so that one statement can move rows over each other's keys.
        columns.insert(3, "junk text".into());
        format!(
            "{TYPES}CREATE TABLE {TABLE} ({}, PRIMARY KEY (id) DEFERRABLE); ALTER TABLE {TABLE} DROP COLUMN junk;",
            columns.join(", ")
        )
    }
}

const ROWS: &str = r#"
INSERT INTO "Odd Schema"."Types Table" (id) VALUES (1);
INSERT INTO "Odd Schema"."Types Table" VALUES (2,
  -32768, 2147483647, -9223372036854775808, 'NaN', '-0', 'NaN', '-12345678901234567890123456789012345678.12345678901234567890',
  E'quote '' dq " backslash \\ tab \t nl \n cr \r ñ 日本 🎉', 'ab', 'xy z', '\x00ff', true,
  '4713-01-01 BC', '23:59:59.999999', '12:00:00+05:30', '0001-01-01 00:00:00 BC', '-infinity',
  '1 year -2 mons 3 days -04:05:06.789', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '{"a": 1,   "a": 2 }', '{"b": [1, 2.50, null], "a": "x"}', '{{1,2},{3,NULL}}', '{"a,b","c\"d",NULL,"NULL",""}',
  '[1,5)', '[2020-01-01 00:00+00,infinity)', '{[1,3),[5,7)}', 'it''s "fine"', 5, '(1,"x, y")',
  '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05', B'1010', B'1',
  '-$0.01', 'a:1 fat:2 cat:3', 'abc<b x="1">t &amp; u</b>', '(1.5,-2)', '{1,2,3}', '[(0,0),(1,1)]',
  '((1,1),(0,0))', '[(0,0),(1,1),(2,0)]', '((0,0),(1,1),(1,0))', '<(0,0),1.5>',
  'reserved', 'Mixed', 'space d', 'quo"te', 'ñandú');
INSERT INTO "Odd Schema"."Types Table" VALUES (3,
  32767, -2147483648, 9223372036854775807, 'Infinity', '-Infinity', '0.000000000000000000000000000000000000000001', 'NaN',
  '', '', '', '', false,
  'infinity', '00:00', '00:00:00-12', 'infinity', '1900-01-01 00:00:00+00:09:21',
  '-178000000 years', '00000000-0000-0000-0000-000000000000',
  '[]', '{}', '{}', '{}', 'empty', '(,)', '{}', 'ok', 1, '(,)',
  '::1', '::/0', 'ff:ff:ff:ff:ff:ff', '00:00:00:00:00:00:00:00', B'0000', B'',
  '$92,233,720,368,547,758.07', '', '<?xml version="1.0"?><doc/>', '(0,0)', '{0,-1,0}', '[(0,0),(0,0)]',
  '((0,0),(0,0))', '((0,0))', '((0,0))', '<(0,0),0>',
  '', '', '', '', '');
INSERT INTO "Odd Schema"."Types Table" (id, f4, f8, num, tstz, ts) VALUES
  (4, 1.1, 1.2345678901234567e-300, 0.1, '2024-03-31 02:30:00 Europe/Madrid', '2024-02-29 12:34:56.789012'),
  (5, -1.17549435e-38, 2.2250738585072014e-308, 1e-40, 'epoch', 'epoch');
INSERT INTO "Odd Schema"."Composite" VALUES (1, 'x y', 'a'), (1, 'Z', 'b'), (2, 'x y', 'c');
"#;

/// `run --once`, which must succeed without reporting a conflict: nothing
/// writes on the slave, so the slave's rows always equal the master's old rows
/// (compared by each type's own text form, whatever the sessions' settings).
fn in_step(s: &Setup) {
    let out = s.run_once();
    let said = support::text(&out);
    assert!(out.status.success(), "{said}");
    assert!(!said.contains("conflict:"), "{said}");
}

fn ordered(table: &str, columns: &str, key: &str) -> String {
    format!("SELECT {columns} FROM {table} ORDER BY {key}")
}

#[tokio::test(flavor = "multi_thread")]
async fn every_type_and_awkward_name_replicates_byte_equal() {
    let s = Setup::with_schemas(1, &schema(false), &schema(true)).await;
    let columns: Vec<&str> = COLUMNS.iter().map(|(n, _)| *n).collect();
    let all = ordered(TABLE, &columns.join(", "), "id");
    let composite = ordered("\"Odd Schema\".\"Composite\"", "a, \"B\", v", "a, \"B\"");
    let m = s.master().await;
    // Written from a session in yet another time zone and date style.
    m.batch_execute("SET timezone = 'Asia/Kolkata'; SET datestyle = 'SQL, DMY'; SET intervalstyle = 'sql_standard'; SET extra_float_digits = 0")
        .await
        .unwrap();
    m.batch_execute(ROWS).await.unwrap();
    in_step(&s);
    s.assert_same(0, &all).await;
    s.assert_same(0, &composite).await;

    // Every column of row 2 takes row 3's values and the reverse: updates of all types.
    let sets: Vec<String> = columns[1..]
        .iter()
        .map(|c| format!("{c} = o.{c}"))
        .collect();
    m.batch_execute(&format!(
        "UPDATE {TABLE} AS t SET {} FROM {TABLE} AS o WHERE (t.id, o.id) IN ((2, 3), (3, 2), (1, 4), (4, 1))",
        sets.join(", ")
    ))
    .await
    .unwrap();
    in_step(&s);
    s.assert_same(0, &all).await;

    // Updates of the primary key itself, with rows moving over each other's keys.
    m.batch_execute(&format!(
        "UPDATE {TABLE} SET id = id + 1;
         UPDATE \"Odd Schema\".\"Composite\" SET \"B\" = \"B\" || '!' WHERE a = 1;
         UPDATE \"Odd Schema\".\"Composite\" SET a = 3 WHERE a = 2;"
    ))
    .await
    .unwrap();
    in_step(&s);
    s.assert_same(0, &all).await;
    s.assert_same(0, &composite).await;

    m.batch_execute(&format!("DELETE FROM {TABLE} WHERE id IN (2, 4); DELETE FROM \"Odd Schema\".\"Composite\" WHERE v = 'a'"))
        .await
        .unwrap();
    in_step(&s);
    s.assert_same(0, &all).await;
    s.assert_same(0, &composite).await;
}
