//! Connections: libpq connection strings with libpq's defaults, redaction and LISTEN.

use futures_util::future::poll_fn;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_postgres::config::Host;
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// Session settings under which a value's text form is the same as the capture
/// trigger's, so that texts read back from a slave compare equal.
pub const SESSION_SQL: &str = "SET datestyle = 'ISO, YMD'; SET intervalstyle = 'postgres';
SET extra_float_digits = 3; SET timezone = 'UTC'; SET bytea_output = 'hex'";

/// A connection that could not be made.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// The connection string does not parse.
    #[error("bad connection string '{dsn}': {message}")]
    Dsn {
        /// The string, password removed.
        dsn: String,
        /// What is wrong.
        message: String,
    },
    /// The server could not be reached or refused us.
    #[error("cannot connect to '{dsn}': {message}")]
    Connect {
        /// The string, password removed.
        dsn: String,
        /// PostgreSQL's or the network's message.
        message: String,
    },
}

/// Reads a connection string (`key=value …` or a `postgresql://` URI) and fills in
/// what libpq would: `PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGPASSWORD`, the
/// password file (`PGPASSFILE` or `~/.pgpass`) and the local socket directory.
pub fn parse_dsn(dsn: &str) -> Result<tokio_postgres::Config, ConnectError> {
    let mut config = tokio_postgres::Config::from_str(dsn).map_err(|e| ConnectError::Dsn {
        dsn: redact(dsn),
        message: e.to_string(),
    })?;
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if config.get_hosts().is_empty() {
        match env("PGHOST") {
            Some(host) => {
                config.host(&host);
            }
            None => {
                let dir = ["/var/run/postgresql", "/tmp"]
                    .into_iter()
                    .find(|d| Path::new(d).is_dir())
                    .unwrap_or("/tmp");
                config.host_path(dir);
            }
        }
    }
    if config.get_ports().is_empty() {
        let port = env("PGPORT").and_then(|p| p.parse().ok()).unwrap_or(5432);
        config.port(port);
    }
    if config.get_user().is_none()
        && let Some(user) = env("PGUSER")
            .or_else(|| env("USER"))
            .or_else(|| env("LOGNAME"))
    {
        config.user(&user);
    }
    if config.get_dbname().is_none()
        && let Some(db) = env("PGDATABASE")
    {
        config.dbname(&db);
    }
    if config.get_password().is_none()
        && let Some(password) = env("PGPASSWORD").or_else(|| pgpass_lookup(&config))
    {
        config.password(password);
    }
    if config.get_application_name().is_none() {
        config.application_name("pgreplica");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    Ok(config)
}

fn pgpass_lookup(config: &tokio_postgres::Config) -> Option<String> {
    let path = std::env::var_os("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pgpass")))?;
    let text = std::fs::read_to_string(path).ok()?;
    let host = match config.get_hosts().first()? {
        Host::Tcp(h) => h.clone(),
        #[cfg(unix)]
        Host::Unix(_) => "localhost".to_string(),
    };
    let port = config.get_ports().first()?.to_string();
    let user = config.get_user()?.to_string();
    let db = config
        .get_dbname()
        .map(str::to_string)
        .unwrap_or_else(|| user.clone());
    let wanted = [host, port, db, user];
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let fields = split_pgpass(line);
            if fields.len() != 5 {
                return None;
            }
            let matches = fields[..4]
                .iter()
                .zip(&wanted)
                .all(|(f, w)| f == "*" || f == w);
            matches.then(|| fields[4].clone())
        })
}

/// Splits a `.pgpass` line on unescaped colons, undoing `\:` and `\\`.
fn split_pgpass(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut().unwrap().extend(chars.next()),
            ':' => fields.push(String::new()),
            c => fields.last_mut().unwrap().push(c),
        }
    }
    fields
}

/// The connection string with its password replaced by `***`, for logs and status.
pub fn redact(dsn: &str) -> String {
    if let Some(rest) = dsn
        .strip_prefix("postgresql://")
        .or_else(|| dsn.strip_prefix("postgres://"))
    {
        let scheme = &dsn[..dsn.len() - rest.len()];
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let redacted = match authority.rfind('@') {
            Some(at) => match authority[..at].find(':') {
                Some(colon) => format!("{}:***{}", &authority[..colon], &authority[at..]),
                None => authority.to_string(),
            },
            None => authority.to_string(),
        };
        let tail = redact_query_password(tail);
        return format!("{scheme}{redacted}{tail}");
    }
    let mut out = Vec::new();
    let mut words = dsn.split_whitespace();
    while let Some(word) = words.next() {
        match word.split_once('=') {
            Some((key, value)) if key.trim() == "password" => {
                // A quoted password may contain spaces: skip to its closing quote.
                if value.starts_with('\'') && !(value.len() > 1 && value.ends_with('\'')) {
                    for next in words.by_ref() {
                        if next.ends_with('\'') && !next.ends_with("\\'") {
                            break;
                        }
                    }
                }
                out.push("password=***".to_string());
            }
            _ => out.push(word.to_string()),
        }
    }
    out.join(" ")
}

fn redact_query_password(tail: &str) -> String {
    match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some(("password", _)) => "password=***".to_string(),
                    _ => p.to_string(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_string(),
    }
}

/// How long a connection attempt may take without `KEEPALIVE`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects, with TCP keepalives when a heartbeat interval is given; the connection
/// is driven by a spawned task.
pub async fn connect(dsn: &str, keepalive: Option<Duration>) -> Result<Client, ConnectError> {
    let (client, _notifications) = connect_listening(dsn, keepalive).await?;
    Ok(client)
}

/// Connects like `connect`, and hands over the server's NOTIFY messages. The
/// receiver closes when the connection ends.
pub async fn connect_listening(
    dsn: &str,
    keepalive: Option<Duration>,
) -> Result<(Client, mpsc::UnboundedReceiver<String>), ConnectError> {
    let mut config = parse_dsn(dsn)?;
    // A server that stops answering (packets dropped, not refused) is given up
    // on in about twice the interval, and a connection attempt in one.
    if let Some(interval) = keepalive {
        config.keepalives(true);
        config.keepalives_idle(interval);
        config.keepalives_interval((interval / 3).max(Duration::from_secs(1)));
        config.keepalives_retries(3);
        // Data unacknowledged this long (a dead peer mid-query) ends the connection.
        config.tcp_user_timeout(interval * 2);
        config.connect_timeout(interval.max(Duration::from_secs(5)));
    } else {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    // The whole handshake is bounded, not only the TCP connection.
    let limit = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(CONNECT_TIMEOUT);
    let connected = tokio::time::timeout(limit, config.connect(NoTls))
        .await
        .map_err(|_| format!("no answer within {}s", limit.as_secs_f64()))
        .and_then(|r| r.map_err(|e| pg_message(&e)));
    let (client, mut connection) = connected.map_err(|message| ConnectError::Connect {
        dsn: redact(dsn),
        message,
    })?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n.channel().to_string());
                }
                Ok(AsyncMessage::Notice(notice)) => {
                    tracing::debug!("server notice: {}", notice.message());
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("connection closed: {e}");
                    break;
                }
            }
        }
    });
    Ok((client, rx))
}

/// PostgreSQL's whole message for an error: text, detail, hint and context.
pub fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = db.message().to_string();
            if let Some(detail) = db.detail() {
                text.push_str(&format!(" (DETAIL: {detail})"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!(" (HINT: {hint})"));
            }
            if let Some(place) = db.where_() {
                text.push_str(&format!(" (CONTEXT: {place})"));
            }
            text
        }
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        }
    }
}

/// Starts a read-only REPEATABLE READ transaction: every read in it sees one
/// snapshot.
pub async fn read_only(
    client: &mut Client,
) -> Result<tokio_postgres::Transaction<'_>, tokio_postgres::Error> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("dbname=a user=u password=secret host=h"),
            "dbname=a user=u password=*** host=h"
        );
        assert_eq!(
            redact("dbname=a password='s e c' host=h"),
            "dbname=a password=*** host=h"
        );
        assert_eq!(
            redact("postgresql://u:secret@h:5432/db?sslmode=disable"),
            "postgresql://u:***@h:5432/db?sslmode=disable"
        );
        assert_eq!(
            redact("postgres://h/db?user=u&password=secret"),
            "postgres://h/db?user=u&password=***"
        );
    }

    #[test]
    fn pgpass_lines_split_on_unescaped_colons() {
        assert_eq!(
            split_pgpass(r"h:5432:*:u:p\:w\\d"),
            vec!["h", "5432", "*", "u", r"p:w\d"]
        );
    }

    #[test]
    fn bad_connection_string_is_named_without_password() {
        let e = parse_dsn("host=h password=secret bogus").unwrap_err();
        assert!(e.to_string().contains("password=***"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}
