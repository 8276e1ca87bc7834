//! Connections: libpq connection strings with libpq's defaults, redaction and LISTEN.

use crate::dsn::Dsn;
pub use crate::dsn::redact;
use crate::tls::{self, Tls};
use futures_util::future::poll_fn;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client, Connection, GenericClient, NoTls, Socket, Statement};

/// Session settings under which a value's text form is the same as the capture
/// trigger's, so that texts read back from a slave compare equal.
pub const SESSION_SQL: &str = "SET datestyle = 'ISO, YMD'; SET intervalstyle = 'postgres';
SET extra_float_digits = 3; SET timezone = 'UTC'; SET bytea_output = 'hex'";

/// Statements prepared on one session, by their SQL text: each later use is
/// one round trip, planned once. Kept as long as the session, and forgotten
/// when its schema changes under them.
#[derive(Default)]
pub struct Prepared(HashMap<String, Statement>);

impl Prepared {
    /// `sql`, if it was prepared.
    pub fn cached(&self, sql: &str) -> Option<Statement> {
        self.0.get(sql).cloned()
    }

    /// `sql` prepared on `client`'s session with `types` for its first
    /// parameters (the server infers the rest), from the cache or now.
    pub async fn get(
        &mut self,
        client: &impl GenericClient,
        sql: &str,
        types: &[Type],
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.cached(sql) {
            return Ok(statement);
        }
        let statement = client.prepare_typed(sql, types).await?;
        self.0.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    /// Forgets every statement.
    pub fn clear(&mut self) {
        self.0.clear();
    }
}

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
    parse_with_tls(dsn).map(|(config, _)| config)
}

/// What is wrong with `dsn`, if it does not read as a connection string.
pub fn check_dsn(dsn: &str) -> Result<(), String> {
    match parse_with_tls(dsn) {
        Err(ConnectError::Dsn { message, .. }) => {
            let message = message.trim_start_matches("invalid connection string: ");
            Err(format!("bad connection string: {message}"))
        }
        Err(other) => Err(other.to_string()),
        Ok(_) => Ok(()),
    }
}

/// Like [`parse_dsn`], with the TLS settings the driver does not read itself.
pub(crate) fn parse_with_tls(dsn: &str) -> Result<(tokio_postgres::Config, Tls), ConnectError> {
    let bad = |message: String| ConnectError::Dsn {
        dsn: redact(dsn),
        message,
    };
    let mut settings = Dsn::parse(dsn).map_err(|e| bad(e.to_string()))?;
    let tls = Tls::take(&mut settings).map_err(bad)?;
    // The driver's error names the setting in its cause.
    let mut config = tokio_postgres::Config::from_str(&settings.render()).map_err(|e| {
        bad(match std::error::Error::source(&e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        })
    })?;
    config.ssl_mode(tls.ssl_mode());
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
    Ok((config, tls))
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
    let (mut config, tls) = parse_with_tls(dsn)?;
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
    let failed = |message: String| ConnectError::Connect {
        dsn: redact(dsn),
        message,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    // As libpq: TLS is for TCP, and sslmode says nothing of Unix-domain sockets.
    let sockets = config
        .get_hosts()
        .iter()
        .all(|h| !matches!(h, Host::Tcp(_)));
    let connector = match sockets {
        true => {
            config.ssl_mode(SslMode::Disable);
            None
        }
        false => tls.connector().map_err(failed)?,
    };
    let client = match connector {
        Some(connector) => handshake(&config, connector, tx).await,
        None => handshake(&config, NoTls, tx).await,
    }
    .map_err(failed)?;
    // A master being switched over refuses writes to new sessions, and a
    // slave may refuse them to applications (default_transaction_read_only):
    // pgreplica's own sessions write its tables and apply the batches.
    client
        .batch_execute("SET default_transaction_read_only = off")
        .await
        .map_err(|e| failed(e.to_string()))?;
    Ok((client, rx))
}

/// Connects over `tls` within the connect timeout (the whole handshake, not
/// only the TCP connection), and drives the connection in a spawned task that
/// hands NOTIFY messages to `notes`.
async fn handshake<T>(
    config: &tokio_postgres::Config,
    tls: T,
    notes: mpsc::UnboundedSender<String>,
) -> Result<Client, String>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let limit = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(CONNECT_TIMEOUT);
    let (client, connection) = tokio::time::timeout(limit, config.connect(tls))
        .await
        .map_err(|_| format!("no answer within {}s", limit.as_secs_f64()))?
        .map_err(|e| {
            let message = pg_message(&e);
            match tls::explain(&message) {
                Some(why) => format!("{message}: {why}"),
                None => message,
            }
        })?;
    tokio::spawn(drive(connection, notes));
    Ok(client)
}

async fn drive<T>(mut connection: Connection<Socket, T>, notes: mpsc::UnboundedSender<String>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(message) = poll_fn(|cx| connection.poll_message(cx)).await {
        match message {
            Ok(AsyncMessage::Notification(n)) => {
                let _ = notes.send(n.channel().to_string());
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
    fn pgpass_lines_split_on_unescaped_colons() {
        assert_eq!(
            split_pgpass(r"h:5432:*:u:p\:w\\d"),
            vec!["h", "5432", "*", "u", r"p:w\d"]
        );
    }

    #[test]
    fn bad_connection_string_is_named_without_password() {
        let e = parse_dsn("host=h password=secret bogus").unwrap_err();
        assert!(e.to_string().contains("not shown"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
        let e = parse_dsn("host=h password=secret sslmode=sometimes").unwrap_err();
        assert!(e.to_string().contains("password=***"), "{e}");
        assert!(e.to_string().contains("sslmode \"sometimes\""), "{e}");
    }
}
