//! PyReplica's `[SMTP]` section: where warning mails go, and how.

use super::parse_seconds;
use std::collections::BTreeMap;
use std::time::Duration;

/// PyReplica's `[SMTP]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct Smtp {
    /// `SERVER`: host or host:port.
    pub server: String,
    /// `USERNAME`, for login.
    pub username: Option<String>,
    /// `PASSWORD`, for login.
    pub password: Option<String>,
    /// `FROM_ADDR`.
    pub from: String,
    /// `TO_ADDRS`, split on `;`.
    pub to: Vec<String>,
    /// Subjects by kind: START, STOP, ERROR, WARNING.
    pub subjects: BTreeMap<String, String>,
    /// `TLS`: how the connection is secured.
    pub tls: SmtpTls,
    /// `DIGEST_INTERVAL` (seconds): after a mail of one kind, further ones
    /// within this time go out together as one digest at its end.
    pub digest: Duration,
    /// `RETRY_FOR` (seconds): how long a mail that failed for a passing
    /// reason (no connection, a 4xx answer) is tried again.
    pub retry_for: Duration,
}

/// How mail connections are secured (`[SMTP] TLS=`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SmtpTls {
    /// STARTTLS when the server offers it (the default); required when a
    /// login is given, so that a stripped STARTTLS never sends the password in
    /// clear.
    #[default]
    Opportunistic,
    /// STARTTLS, required.
    StartTls,
    /// TLS from the first byte (port 465).
    Tls,
    /// Plain text.
    Off,
}

/// Default `[SMTP] DIGEST_INTERVAL`.
pub const DEFAULT_DIGEST: Duration = Duration::from_secs(600);

/// Default `[SMTP] RETRY_FOR`.
pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(600);

impl Default for Smtp {
    fn default() -> Smtp {
        Smtp {
            server: String::new(),
            username: None,
            password: None,
            from: String::new(),
            to: Vec::new(),
            subjects: BTreeMap::new(),
            tls: SmtpTls::default(),
            digest: DEFAULT_DIGEST,
            retry_for: DEFAULT_RETRY_FOR,
        }
    }
}

pub(super) const SMTP_KEYS: &[&str] = &[
    "SERVER",
    "USERNAME",
    "PASSWORD",
    "START_SUBJECT",
    "STOP_SUBJECT",
    "ERROR_SUBJECT",
    "WARNING_SUBJECT",
    "FROM_ADDR",
    "TO_ADDRS",
    "TLS",
    "DIGEST_INTERVAL",
    "RETRY_FOR",
];

pub(super) fn smtp_key(smtp: &mut Smtp, key: &str, value: String) -> Result<(), String> {
    match key {
        "SERVER" => smtp.server = value,
        "USERNAME" => smtp.username = Some(value),
        "PASSWORD" => smtp.password = Some(value),
        "FROM_ADDR" => smtp.from = value,
        "TLS" => {
            smtp.tls = match value.to_ascii_lowercase().as_str() {
                "opportunistic" | "" => SmtpTls::Opportunistic,
                "starttls" => SmtpTls::StartTls,
                "tls" | "ssl" => SmtpTls::Tls,
                "off" | "none" | "false" => SmtpTls::Off,
                _ => {
                    return Err(format!(
                        "'{value}' is not one of opportunistic, starttls, tls, off"
                    ));
                }
            }
        }
        "DIGEST_INTERVAL" => smtp.digest = parse_seconds(&value)?,
        "RETRY_FOR" => smtp.retry_for = parse_seconds(&value)?,
        "TO_ADDRS" => {
            smtp.to = value
                .split(';')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(String::from)
                .collect()
        }
        _ if key.ends_with("_SUBJECT") && SMTP_KEYS.contains(&key) => {
            let kind = key.trim_end_matches("_SUBJECT").to_string();
            smtp.subjects.insert(kind, value);
        }
        _ => {
            return Err(format!(
                "unknown key; [SMTP] takes {}",
                SMTP_KEYS.join(", ")
            ));
        }
    }
    Ok(())
}
