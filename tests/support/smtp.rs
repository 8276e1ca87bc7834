//! A real SMTP server on loopback (Python's aiosmtpd), and the mails it received.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port nothing listens on.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running SMTP sink; killed when dropped.
pub struct SmtpSink {
    child: Child,
    file: PathBuf,
    pub port: u16,
}

/// One received mail.
#[derive(Debug, Clone)]
pub struct Mail {
    pub to: Vec<String>,
    pub login: Option<String>,
    pub subject: String,
    /// The decoded body.
    pub data: String,
}

impl SmtpSink {
    pub fn start() -> SmtpSink {
        SmtpSink::start_on(free_port())
    }

    /// A sink on `port`.
    pub fn start_on(port: u16) -> SmtpSink {
        let file =
            std::env::temp_dir().join(format!("pgreplica-mail-{}-{port}", std::process::id()));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/smtp_sink.py");
        let mut child = Command::new("python3")
            .args([script, &port.to_string(), file.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 is needed for the SMTP tests");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.trim() != "ready" {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
            panic!(
                "the test SMTP server did not start: {err}\n\
                 it needs Python's aiosmtpd: python3 -m pip install aiosmtpd"
            );
        }
        SmtpSink { child, file, port }
    }

    /// Every mail received so far.
    pub fn mails(&self) -> Vec<Mail> {
        let text = std::fs::read_to_string(&self.file).unwrap_or_default();
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let text = |k: &str| v[k].as_str().unwrap_or("").replace("\r\n", "\n");
                Mail {
                    to: v["to"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|t| t.as_str().unwrap().to_string())
                        .collect(),
                    login: v["login"].as_str().map(String::from),
                    subject: text("subject"),
                    data: text("body"),
                }
            })
            .collect()
    }

    /// Waits (up to `limit`) until some mail's subject contains `part`.
    pub fn wait_for(&self, part: &str, limit: Duration) -> Mail {
        let start = Instant::now();
        loop {
            if let Some(m) = self.mails().into_iter().find(|m| m.subject.contains(part)) {
                return m;
            }
            assert!(
                start.elapsed() < limit,
                "no mail with '{part}' in its subject; received: {:#?}",
                self.mails()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
    }
}
