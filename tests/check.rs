//! `check`: differences found and named, at one point of the log, in bounded memory.

mod support;

use std::process::{Command, Stdio};
use support::{Setup, pgreplica, text};

#[tokio::test(flavor = "multi_thread")]
async fn check_names_a_changed_a_missing_and_an_extra_row_of_a_million() {
    let s = Setup::new(1, "CREATE TABLE big (id int PRIMARY KEY, v text, n int)").await;
    s.master()
        .await
        .batch_execute(
            "INSERT INTO big SELECT g, md5(g::text), g % 1000 FROM generate_series(1, 1000000) g",
        )
        .await
        .unwrap();
    let conf = s.conf.to_str().unwrap().to_string();
    let out = pgreplica(&["clone", &conf]);
    assert!(out.status.success(), "clone failed:\n{}", text(&out));

    let out = pgreplica(&["check", &conf]);
    assert!(
        out.status.success(),
        "equal after the clone:\n{}",
        text(&out)
    );
    assert!(
        text(&out).contains("\"public\".\"big\": 1000000 rows, equal"),
        "{}",
        text(&out)
    );

    s.slave(0)
        .await
        .batch_execute(
            "UPDATE big SET v = 'changed' WHERE id = 123456;
             DELETE FROM big WHERE id = 500000;
             INSERT INTO big VALUES (2000000, 'extra', 0)",
        )
        .await
        .unwrap();
    let (code, report, rss) = check_measured(&conf);
    assert_eq!(code, 1, "{report}");
    for line in [
        "different: (id)=(123456): v: master e10adc3949ba59abbe56e057f20f883e, slave changed",
        "missing on the slave: (id)=(500000)",
        "extra on the slave: (id)=(2000000)",
        "3 difference(s)",
    ] {
        assert!(report.contains(line), "check reports {line}:\n{report}");
    }
    println!("peak RSS of pgreplica check over 1,000,000 rows: {rss:.1} MB");
    // A table missing on the slave is a difference too, not a failure to check.
    s.slave(0)
        .await
        .batch_execute("DROP TABLE big")
        .await
        .unwrap();
    let (code, report, _) = check_measured(&conf);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains("\"public\".\"big\": the table is missing on the slave"),
        "{report}"
    );
    assert!(rss < 64.0, "check's memory stays bounded ({rss:.1} MB)");
}

/// Runs `pgreplica check` and returns its exit code, output and peak RSS in MB.
#[expect(
    clippy::zombie_processes,
    reason = "the child is reaped by wait4, which also gives its peak RSS"
)]
fn check_measured(conf: &str) -> (i32, String, f64) {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgreplica"))
        .args(["check", conf])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut report = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut report)
        .unwrap();
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    // SAFETY: wait4 reaps our own child and writes into the two locals.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    (code, report, usage.ru_maxrss as f64 / 1024.0)
}
