//! The configuration file's reading: what it takes, and what it refuses.

use super::*;

const SAMPLE: &str = "[MAIN]
# name of replica set (first field of log file entries)
NAME=mydb
# master database connection string:
DSN0=dbname=somedb user=someuser password=secret host=remote
# slave database connection string:
DSN1=dbname=somedb user=someuser password=secret 
# in multimaster setup, set the replication postgres user
SKIP_USER=pyreplica
# send a trivial query to keep alive the connection (optional)
KEEPALIVE=true
# optional debug level (0: none, 1: normal, 2: verbose, 3: very verbose)
DEBUG_LEVEL=1

# email notification config (optional):
[SMTP]
SERVER=somehost.somewhere.com
# login is optional:
USERNAME=no-reply@somewhere.com
PASSWORD=secret
START_SUBJECT=[PyReplica] Starting mydb replication
STOP_SUBJECT=[PyReplica] Stopping mydb replication
ERROR_SUBJECT=[PyReplica] Starting mydb replication (ERROR)
FROM_ADDR=no-reply@somewhere.com
TO_ADDRS=hostmaster@somewhere.com;dbadmin@somewhere.com";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("shop.conf"), text)
}

#[test]
fn pyreplica_sample_conf_is_accepted_unchanged() {
    let c = parse(SAMPLE).unwrap();
    assert_eq!(c.name, "mydb");
    assert_eq!(
        c.master,
        "dbname=somedb user=someuser password=secret host=remote"
    );
    assert_eq!(c.slaves[&1], "dbname=somedb user=someuser password=secret");
    assert_eq!(c.keepalive, Some(DEFAULT_KEEPALIVE));
    assert_eq!(c.skip_user.as_deref(), Some("pyreplica"));
    let smtp = c.smtp.unwrap();
    assert_eq!(
        smtp.to,
        vec!["hostmaster@somewhere.com", "dbadmin@somewhere.com"]
    );
    assert_eq!(
        smtp.subjects["STOP"],
        "[PyReplica] Stopping mydb replication"
    );
}

#[test]
fn keys_in_any_case_and_several_slaves() {
    let c = parse("[main]\nname=x\ndsn0=host=a\nDsn2=host=c\ndsn1=host=b\nkeepalive=5\n").unwrap();
    assert_eq!(c.slaves.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(c.keepalive, Some(Duration::from_secs(5)));
}

#[test]
fn errors_name_file_line_and_key() {
    let e = parse("[MAIN]\nNAME=x\nDSN0=host=a\nDSN1=host=b\nDEBUG_LEVEL=9\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "shop.conf:5: DEBUG_LEVEL: '9' is not a level from 0 to 3"
    );
    let e = parse("[MAIN]\nNAME=x\nDSNX=a\n").unwrap_err();
    assert!(
        e.to_string().starts_with("shop.conf:3: DSNX: unknown key"),
        "{e}"
    );
    let e = parse("[MAIN]\nNAME=x\nDSN1=host=b\n").unwrap_err();
    assert!(e.to_string().contains("DSN0 is missing"), "{e}");
    let e = parse("NAME=x\n").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("shop.conf:1: NAME: key outside a section"),
        "{e}"
    );
    let e = parse("[MAIN]\nNAME=x\nNAME=y\n").unwrap_err();
    assert!(
        e.to_string().contains("given twice (first on line 2)"),
        "{e}"
    );
}

#[test]
fn table_sections_say_what_is_captured_and_where_it_lands() {
    let c = parse(
        "[MAIN]\nNAME=x\nDSN0=host=a\nDSN1=host=b\n[table public.sales]\nOPERATIONS=insert, update\n\
         FILTER=new.region = 'north'\nEXCLUDE_COLUMNS=notes, \"Secret\"\n\
         SLAVE_TABLE=warehouse.sales_2026\nRENAME_COLUMNS=amount:total, region:area\n\
         TRANSFORM=sales.lua\n[TABLE Other]\n",
    )
    .unwrap();
    let t = &c.tables[0];
    assert_eq!(t.table.to_string(), "\"public\".\"sales\"");
    assert_eq!(t.operations, "IU");
    assert_eq!(t.filter.as_deref(), Some("new.region = 'north'"));
    assert_eq!(t.exclude, Some(vec!["notes".into(), "Secret".into()]));
    assert_eq!(t.slave_table.as_ref().unwrap().name, "sales_2026");
    assert_eq!(t.renames[1], ("region".into(), "area".into()));
    assert_eq!(t.transform.as_deref(), Some(Path::new("sales.lua")));
    assert_eq!(c.tables[1].table.name, "other");
    assert_eq!(c.tables[1].operations, "IUDT");
    let e =
        parse("[MAIN]\nNAME=x\nDSN0=host=a\nDSN1=host=b\n[TABLE t]\nOPERATIONS=insert,upsert\n")
            .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("shop.conf:6: OPERATIONS: 'upsert'"),
        "{e}"
    );
    let e = parse(
        "[MAIN]\nNAME=x\nDSN0=host=a\nDSN1=host=b\n[TABLE t]\nCOLUMNS=a\nEXCLUDE_COLUMNS=b\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("exclude each other"), "{e}");
    let e = parse("[MAIN]\nNAME=x\nDSN0=host=a\nDSN1=host=b\n[TABLE t]\n[TABLE public.t]\n")
        .unwrap_err();
    assert!(
        e.to_string().contains("given twice (first on line 5)"),
        "{e}"
    );
}

#[test]
fn slave_field_is_accepted_with_a_warning() {
    let c = parse("[MAIN]\nNAME=x\nDSN0=host=a\nDSN1=host=b\nSLAVE_FIELD=replicated\n").unwrap();
    assert_eq!(c.warnings.len(), 1);
    assert!(c.warnings[0].contains("SLAVE_FIELD is not needed"));
}

#[test]
fn a_bad_connection_string_names_its_file_line_and_key() {
    let e = parse("[MAIN]\nNAME=x\nDSN0=dbname=a\nDSN1=dbname=b channel_binding=bogus\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("shop.conf:4: DSN1: "), "{e}");
    assert!(e.contains("channel_binding"), "{e}");
    let e = parse("[MAIN]\nNAME=x\nDSN0=dbname='a\nDSN1=dbname=b\n").unwrap_err();
    assert!(e.to_string().starts_with("shop.conf:3: DSN0: "), "{e}");
}
