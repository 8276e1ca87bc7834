//! E-mail alerts against a real SMTP server on loopback.

mod support;

use std::net::TcpListener;
use std::time::Duration;
use support::smtp::SmtpSink;
use support::{Setup, count};

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, name text, qty int)";
const ALL: &str = "SELECT * FROM items ORDER BY id";
const WAIT: Duration = Duration::from_secs(20);

/// The test sink speaks no TLS: the login is sent in clear only because the
/// section says TLS=off.
fn smtp_section(port: u16, digest: u32) -> String {
    format!(
        "[SMTP]\nSERVER=127.0.0.1:{port}\nTLS=off\nUSERNAME=mailer\nPASSWORD=secret\n\
         FROM_ADDR=pgreplica@example.org\nTO_ADDRS=dba@example.org; oncall@example.org\n\
         START_SUBJECT=[Replica] Starting app\nSTOP_SUBJECT=[Replica] Stopping app\n\
         ERROR_SUBJECT=[Replica] ERROR app\nDIGEST_INTERVAL={digest}\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn start_error_warning_and_stop_mails_reach_every_recipient() {
    let sink = SmtpSink::start();
    let s = Setup::new(1, ITEMS).await;
    s.configure(&smtp_section(sink.port, 600));
    // A password in a DSN (the test servers trust loopback and ignore it) never
    // shows in mails or status.
    let conf = std::fs::read_to_string(&s.conf).unwrap();
    std::fs::write(
        &s.conf,
        conf.replace("user=postgres", "user=postgres password=hunter2"),
    )
    .unwrap();
    let m = s.master().await;
    let slave = s.slave(0).await;
    let mut daemon = s.spawn();

    let start = sink.wait_for("[Replica] Starting app", WAIT);
    assert_eq!(start.to, ["dba@example.org", "oncall@example.org"]);
    assert_eq!(start.login.as_deref(), Some("mailer"));
    assert!(
        start.data.contains("master: host=127.0.0.1"),
        "{}",
        start.data
    );

    // An INSERT conflict stops the slave: one mail, however often it retries.
    slave
        .batch_execute("INSERT INTO items VALUES (7, 'already here', 0)")
        .await
        .unwrap();
    m.batch_execute("INSERT INTO items VALUES (7, 'seven', 7)")
        .await
        .unwrap();
    let error = sink.wait_for("[Replica] ERROR app", WAIT);
    for part in ["(id)=(7)", "duplicate key", "retries", "pgreplica status"] {
        assert!(
            error.data.contains(part),
            "the error mail says {part}:\n{}",
            error.data
        );
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let errors = sink
        .mails()
        .iter()
        .filter(|m| m.subject.contains("ERROR"))
        .count();
    assert_eq!(errors, 1, "retries of the same error are not mailed again");
    slave
        .batch_execute("DELETE FROM items WHERE id = 7")
        .await
        .unwrap();
    s.wait_same(0, ALL, Duration::from_secs(60)).await;

    // An update of a row changed on the slave: a warning naming both versions.
    slave
        .batch_execute("UPDATE items SET qty = 700 WHERE id = 7")
        .await
        .unwrap();
    m.batch_execute("UPDATE items SET qty = 8 WHERE id = 7")
        .await
        .unwrap();
    let warning = sink.wait_for("[pgreplica] app: warning", WAIT);
    for part in [
        "1 conflict(s)",
        "(id)=(7)",
        "slave had: qty=700",
        "master before: qty=7",
    ] {
        assert!(
            warning.data.contains(part),
            "the warning says {part}:\n{}",
            warning.data
        );
    }

    let status = support::pgreplica(&["status", "--json", s.conf.to_str().unwrap()]);
    assert!(!support::text(&status).contains("hunter2"));
    assert!(daemon.terminate().success());
    assert!(!s.daemon_log().contains("hunter2"));
    let stop = sink.wait_for("[Replica] Stopping app", WAIT);
    assert_eq!(stop.to.len(), 2);
    assert!(sink.mails().iter().all(|m| !m.data.contains("hunter2")));
    assert!(stop.data.contains("password=***"), "{}", stop.data);
    // The resumption came within the digest interval of the start mail: it was
    // held back, and went out when the daemon stopped.
    let resumed = sink
        .mails()
        .into_iter()
        .filter(|m| m.subject.contains("Starting app"))
        .collect::<Vec<_>>();
    assert_eq!(resumed.len(), 2, "{resumed:#?}");
    assert!(
        resumed[1]
            .data
            .contains("resumed replication after this error")
    );
    assert!(resumed[1].data.contains("duplicate key"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_storm_of_warnings_becomes_one_digest() {
    let sink = SmtpSink::start();
    let s = Setup::new(1, ITEMS).await;
    s.configure(&smtp_section(sink.port, 3));
    let m = s.master().await;
    let slave = s.slave(0).await;
    let _daemon = s.spawn();
    sink.wait_for("Starting", WAIT);
    // Five deletes of rows the slave never had, each its own batch.
    for id in 1..=5 {
        m.batch_execute(&format!("INSERT INTO items VALUES ({id}, 'x', 1)"))
            .await
            .unwrap();
    }
    s.wait_same(0, ALL, Duration::from_secs(30)).await;
    slave.batch_execute("DELETE FROM items").await.unwrap();
    for id in 1..=5 {
        m.batch_execute(&format!("DELETE FROM items WHERE id = {id}"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let digest = sink.wait_for("warning (4 events)", WAIT);
    assert!(digest.data.contains("4 warning events"), "{}", digest.data);
    let warnings: Vec<_> = sink
        .mails()
        .into_iter()
        .filter(|m| m.subject.contains("warning"))
        .collect();
    assert_eq!(
        warnings.len(),
        2,
        "the first warning at once, the other four in one digest: {warnings:#?}"
    );
    assert_eq!(count(&slave, "items").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mail_server_that_never_answers_does_not_hold_replication() {
    // Accepts connections and never says a word.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let s = Setup::new(1, ITEMS).await;
    s.configure(&smtp_section(port, 600));
    let _daemon = s.spawn();
    s.master()
        .await
        .batch_execute("INSERT INTO items VALUES (1, 'one', 1)")
        .await
        .unwrap();
    // A mail held by the silent server takes 30 s to give up on: replication
    // does not wait for it.
    s.wait_same(0, ALL, Duration::from_secs(20)).await;
    drop(silent);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slave_held_up_past_its_lag_limit_is_flagged_and_mailed() {
    let sink = SmtpSink::start();
    let s = Setup::new(1, ITEMS).await;
    s.configure(&format!(
        "{}[MAIN]\nLAG_WARNING=2\n",
        smtp_section(sink.port, 1)
    ));
    let _daemon = s.spawn();
    sink.wait_for("Starting", WAIT);
    // A slave-side transaction holds the table: the batch waits behind it.
    let mut blocker = s.slave(0).await;
    let held = blocker.transaction().await.unwrap();
    held.batch_execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    s.master()
        .await
        .batch_execute("INSERT INTO items VALUES (1, 'late', 1)")
        .await
        .unwrap();
    let warning = sink.wait_for("warning", WAIT);
    assert!(
        warning
            .data
            .contains("Slave 1 of set app lags: 1 events wait"),
        "{}",
        warning.data
    );
    let status = support::pgreplica(&["status", "--json", s.conf.to_str().unwrap()]);
    assert!(
        support::text(&status).contains("\"lagging\": true"),
        "{}",
        support::text(&status)
    );
    held.commit().await.unwrap();
    s.wait_same(0, ALL, Duration::from_secs(20)).await;
    let start = std::time::Instant::now();
    while !sink.mails().iter().any(|m| m.data.contains("back under")) {
        assert!(
            start.elapsed() < WAIT,
            "no recovery mail: {:#?}",
            sink.mails()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_login_is_never_sent_over_a_connection_without_tls() {
    let sink = SmtpSink::start();
    let s = Setup::new(1, ITEMS).await;
    s.configure(&smtp_section(sink.port, 600).replace("TLS=off\n", ""));
    let mut daemon = s.spawn();
    let start = std::time::Instant::now();
    while !s.daemon_log().contains("must offer STARTTLS") {
        assert!(start.elapsed() < WAIT, "{}", s.daemon_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.terminate();
    assert!(sink.mails().is_empty(), "{:?}", sink.mails());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_start_mail_waits_for_a_mail_server_that_comes_up_late() {
    let port = support::smtp::free_port();
    let s = Setup::new(1, ITEMS).await;
    s.configure(&smtp_section(port, 600));
    let mut daemon = s.spawn();
    let start = std::time::Instant::now();
    while !s.daemon_log().contains("not sent yet") {
        assert!(start.elapsed() < WAIT, "{}", s.daemon_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sink = SmtpSink::start_on(port);
    sink.wait_for("[Replica] Starting app", Duration::from_secs(90));
    daemon.terminate();
}
