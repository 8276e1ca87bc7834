//! KEEPALIVE: a master that goes silent (its packets dropped, not refused) is
//! detected and reconnected to, through a TCP proxy that starts black-holing.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::Setup;
use support::proxy::proxy;

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, name text, qty int)";
const ALL: &str = "SELECT * FROM items ORDER BY id";

#[tokio::test(flavor = "multi_thread")]
async fn a_master_gone_silent_is_detected_and_reconnected() {
    let s = Setup::new(1, ITEMS).await;
    let silent = Arc::new(AtomicBool::new(false));
    let port = proxy(s.master.port, silent.clone(), false).await;
    let conf = std::fs::read_to_string(&s.conf).unwrap();
    let direct = format!("DSN0={}", s.master.dsn("app"));
    let proxied = direct.replace(&format!("port={}", s.master.port), &format!("port={port}"));
    assert!(conf.contains("KEEPALIVE=2"));
    std::fs::write(&s.conf, conf.replace(&direct, &proxied)).unwrap();
    let _daemon = s.spawn();
    s.arrives("INSERT INTO items VALUES (1, 'one', 1)", ALL)
        .await;

    silent.store(true, Ordering::Relaxed);
    let cut = Instant::now();
    let before = s.daemon_log().len();
    while !s.daemon_log()[before..].contains("retrying in") {
        assert!(
            cut.elapsed() < Duration::from_secs(60),
            "the silent master was never detected:\n{}",
            s.daemon_log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let detected = cut.elapsed();
    println!("silent master detected after {detected:?} with KEEPALIVE=2");
    assert!(
        s.daemon_log()[before..].contains("checking the master"),
        "{}",
        &s.daemon_log()[before..]
    );

    // The network comes back: the daemon reconnects by itself and catches up.
    silent.store(false, Ordering::Relaxed);
    s.arrives("INSERT INTO items VALUES (2, 'two', 2)", ALL)
        .await;
}
