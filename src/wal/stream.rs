//! A slot's changes streamed over the replication protocol: one WAL sender on
//! the master decodes the WAL once, as it is written, and sends each change as
//! it commits, where reading the slot through SQL decodes it again from the
//! slot's restart point at every look.
//!
//! The session is the one a subscriber opens (`replication=database`,
//! `START_REPLICATION SLOT … LOGICAL`, `pgoutput`); the slot's position moves
//! only when pgreplica says the slave has committed up to there (a standby
//! status update), exactly as `pg_replication_slot_advance` moved it.

use crate::db::{self, ConnectError};
use crate::error::{Error, Side};
use crate::pgoutput::{Lsn, Relation};
use crate::tls::Tls;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::frontend;
use std::collections::HashMap;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::{ChannelBinding as BindingSetting, Config, Host};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Microseconds from the Unix epoch to PostgreSQL's, 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// What the WAL sender sends.
#[derive(Debug)]
pub enum Frame {
    /// One `pgoutput` message; `start` is the change's position (zero for a
    /// table's description).
    Data {
        /// Where the change is in the WAL.
        start: Lsn,
        /// The message.
        data: Bytes,
    },
    /// The WAL sender says how far it has decoded ([`Stream::sent`]).
    Keepalive,
}

/// An open replication session streaming one slot.
pub struct Stream {
    io: Box<dyn Io>,
    buf: BytesMut,
    /// The position last confirmed to the master: the slave has it.
    confirmed: Lsn,
    /// How far the sender has decoded, as its last keepalive said: every
    /// transaction committed before it has been sent.
    pub sent: Lsn,
    /// The tables described in this session, by oid: the sender describes a
    /// table once per session, not once per look.
    pub relations: HashMap<u32, Relation>,
}

impl Stream {
    /// Opens a replication session on the master `dsn` and streams slot
    /// `slot` from `start` (the slave's position), for the publications
    /// `publications`.
    pub async fn open(
        dsn: &str,
        slot: &str,
        start: Lsn,
        publications: &str,
    ) -> Result<Stream, ConnectError> {
        let (config, tls) = db::parse_with_tls(dsn)?;
        let failed = |message: String| ConnectError::Connect {
            dsn: db::redact(dsn),
            message,
        };
        let limit = config.get_connect_timeout().copied();
        let limit = limit.unwrap_or(Duration::from_secs(10));
        let opening = async {
            let (io, binding) = dial(&config, &tls).await?;
            let mut stream = Stream {
                io,
                buf: BytesMut::with_capacity(64 << 10),
                confirmed: start,
                sent: Lsn(0),
                relations: HashMap::new(),
            };
            stream.start_up(&config, binding).await?;
            let command = format!(
                "START_REPLICATION SLOT \"{slot}\" LOGICAL {start} (proto_version '1', \
                 publication_names '{publications}')"
            );
            stream.send(|buf| frontend::query(&command, buf)).await?;
            loop {
                let (tag, body) = stream.message().await?;
                match tag {
                    b'W' => return Ok(stream),
                    b'E' => return Err(server_error(&body)),
                    b'N' | b'S' => continue,
                    other => return Err(format!("unexpected message '{}'", other as char)),
                }
            }
        };
        match tokio::time::timeout(limit, opening).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(message)) => Err(failed(message)),
            Err(_) => Err(failed(format!("no answer within {}s", limit.as_secs_f64()))),
        }
    }

    /// Where the slave is, as last confirmed.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// Tells the master that the slave has committed up to `lsn`: the slot
    /// lets the WAL before it go. `reply` asks for a keepalive at once, which
    /// says how far the sender has decoded.
    pub async fn confirm(&mut self, lsn: Lsn, reply: bool) -> Result<(), Error> {
        self.confirmed = self.confirmed.max(lsn);
        let at = self.confirmed.0 as i64;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        let mut update = BytesMut::with_capacity(34);
        update.put_u8(b'r');
        for position in [at, at, at, now - PG_EPOCH_MICROS] {
            update.put_i64(position);
        }
        update.put_u8(reply as u8);
        let update = update.freeze();
        self.send(|buf| {
            buf.put_u8(b'd');
            buf.put_i32(4 + update.len() as i32);
            buf.put_slice(&update);
            Ok(())
        })
        .await
        .map_err(lost)
    }

    /// Waits until a change is here, answering the sender's keepalives
    /// meanwhile (cancel-safe: what was read stays for [`Stream::frame`]).
    pub async fn ready(&mut self) -> Result<(), Error> {
        loop {
            self.fill().await.map_err(lost)?;
            match (self.buf[0], self.buf.get(5)) {
                (b'd', Some(b'k')) => {
                    self.frame().await?;
                }
                // A notice alone: `frame` would go on to the message after it.
                (b'N', _) => {
                    self.message().await.map_err(lost)?;
                }
                _ => return Ok(()),
            }
        }
    }

    /// Waits up to `limit` for a whole message from the master; whether one
    /// is here (cancel-safe, like [`Stream::ready`]).
    pub async fn wait(&mut self, limit: Duration) -> Result<bool, Error> {
        match tokio::time::timeout(limit, self.fill()).await {
            Ok(filled) => filled.map(|_| true).map_err(lost),
            Err(_) => Ok(false),
        }
    }

    /// The next frame of the stream. A keepalive moves [`Stream::sent`], and
    /// one that asks for an answer gets it.
    pub async fn frame(&mut self) -> Result<Frame, Error> {
        loop {
            let (tag, mut body) = self.message().await.map_err(lost)?;
            match tag {
                b'd' if body.first() == Some(&b'w') && body.len() >= 25 => {
                    body.advance(1);
                    let start = Lsn(body.get_u64());
                    body.advance(16);
                    return Ok(Frame::Data { start, data: body });
                }
                b'd' if body.first() == Some(&b'k') && body.len() >= 18 => {
                    body.advance(1);
                    let end = Lsn(body.get_u64());
                    body.advance(8);
                    self.sent = self.sent.max(end);
                    if body.get_u8() == 1 {
                        self.confirm(self.confirmed, false).await?;
                    }
                    return Ok(Frame::Keepalive);
                }
                b'E' => return Err(lost(server_error(&body))),
                b'N' => continue,
                other => {
                    return Err(lost(format!(
                        "unexpected message '{}' in the replication stream",
                        other as char
                    )));
                }
            }
        }
    }

    async fn send(
        &mut self,
        write: impl FnOnce(&mut BytesMut) -> std::io::Result<()>,
    ) -> Result<(), String> {
        let mut out = BytesMut::new();
        write(&mut out).map_err(|e| e.to_string())?;
        self.io.write_all(&out).await.map_err(|e| e.to_string())?;
        self.io.flush().await.map_err(|e| e.to_string())
    }

    /// Reads until a whole message is buffered.
    async fn fill(&mut self) -> Result<(), String> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes")) as usize;
                if len < 4 {
                    return Err(format!("a message of length {len}"));
                }
                if self.buf.len() > len {
                    return Ok(());
                }
                self.buf.reserve(len + 1 - self.buf.len());
            }
            let read = self
                .io
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| e.to_string())?;
            if read == 0 {
                return Err("the master closed the connection".into());
            }
        }
    }

    /// The next message: its tag and body.
    async fn message(&mut self) -> Result<(u8, Bytes), String> {
        self.fill().await?;
        let tag = self.buf.get_u8();
        let len = self.buf.get_u32() as usize;
        Ok((tag, self.buf.split_to(len - 4).freeze()))
    }

    /// The startup message and the password exchange, up to the server's
    /// first `ReadyForQuery`; `binding` is the TLS channel binding, if any.
    async fn start_up(&mut self, config: &Config, binding: Option<Vec<u8>>) -> Result<(), String> {
        let user = config.get_user().unwrap_or_default().to_string();
        let database = config.get_dbname().unwrap_or(&user).to_string();
        let application = config.get_application_name().unwrap_or("pgreplica");
        // The values' text as the capture trigger writes it (db::SESSION_SQL).
        let parameters = [
            ("user", user.as_str()),
            ("database", database.as_str()),
            ("replication", "database"),
            ("application_name", application),
            ("client_encoding", "UTF8"),
            ("datestyle", "ISO, YMD"),
            ("intervalstyle", "postgres"),
            ("extra_float_digits", "3"),
            ("timezone", "UTC"),
            ("bytea_output", "hex"),
        ];
        self.send(|buf| frontend::startup_message(parameters, buf))
            .await?;
        let bound = config.get_channel_binding();
        let unbound = || match bound {
            BindingSetting::Require => Err("channel_binding=require, but the server asks for a \
                                            password without channel binding (SCRAM over TLS)"
                .to_string()),
            _ => Ok(()),
        };
        let password = || {
            config
                .get_password()
                .map(<[u8]>::to_vec)
                .ok_or_else(|| "the server asks for a password and none is given".to_string())
        };
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            let (tag, mut body) = self.message().await?;
            match tag {
                b'R' => match body.get_i32() {
                    0 => {}
                    3 => {
                        unbound()?;
                        let password = password()?;
                        self.send(|buf| frontend::password_message(&password, buf))
                            .await?;
                    }
                    5 => {
                        unbound()?;
                        let salt: [u8; 4] = body[..4].try_into().map_err(|_| "short salt")?;
                        let hash = md5_hash(user.as_bytes(), &password()?, salt);
                        self.send(|buf| frontend::password_message(hash.as_bytes(), buf))
                            .await?;
                    }
                    10 => {
                        let offered = String::from_utf8_lossy(&body).to_string();
                        let offers = |m: &str| offered.split('\0').any(|o| o == m);
                        let (mechanism, channel) = match &binding {
                            Some(end_point)
                                if bound != BindingSetting::Disable
                                    && offers(sasl::SCRAM_SHA_256_PLUS) =>
                            {
                                let channel =
                                    sasl::ChannelBinding::tls_server_end_point(end_point.clone());
                                (sasl::SCRAM_SHA_256_PLUS, channel)
                            }
                            _ if offers(sasl::SCRAM_SHA_256) => {
                                unbound()?;
                                let channel = match binding.is_some() {
                                    true => sasl::ChannelBinding::unrequested(),
                                    false => sasl::ChannelBinding::unsupported(),
                                };
                                (sasl::SCRAM_SHA_256, channel)
                            }
                            _ => return Err(format!("unsupported SASL mechanisms {offered:?}")),
                        };
                        let client = sasl::ScramSha256::new(&password()?, channel);
                        let first = client.message().to_vec();
                        scram = Some(client);
                        self.send(|buf| frontend::sasl_initial_response(mechanism, &first, buf))
                            .await?;
                    }
                    11 => {
                        let client = scram.as_mut().ok_or("SASL out of order")?;
                        client.update(&body).map_err(|e| e.to_string())?;
                        let next = client.message().to_vec();
                        self.send(|buf| frontend::sasl_response(&next, buf)).await?;
                    }
                    12 => {
                        let client = scram.as_mut().ok_or("SASL out of order")?;
                        client.finish(&body).map_err(|e| e.to_string())?;
                    }
                    other => return Err(format!("unsupported authentication method {other}")),
                },
                b'E' => return Err(server_error(&body)),
                b'Z' => return Ok(()),
                _ => {}
            }
        }
    }
}

/// A connection, and its TLS channel binding (none without TLS).
type Dialed = (Box<dyn Io>, Option<Vec<u8>>);

/// Connects to the first of the master's hosts that answers, over TLS when
/// the connection string asks for it.
async fn dial(config: &Config, tls: &Tls) -> Result<Dialed, String> {
    let ports = config.get_ports();
    let mut last = "no host".to_string();
    for (i, host) in config.get_hosts().iter().enumerate() {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let attempt = match host {
            Host::Tcp(name) => match TcpStream::connect((name.as_str(), port)).await {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    secure(tcp, name, config, tls).await
                }
                Err(e) => Err(format!("{name}:{port}: {e}")),
            },
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                match UnixStream::connect(&path).await {
                    Ok(socket) => Ok((Box::new(socket) as Box<dyn Io>, None)),
                    Err(e) => Err(format!("{}: {e}", path.display())),
                }
            }
        };
        match attempt {
            Ok(io) => return Ok(io),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// TLS over `tcp` as the connection string's `sslmode` says.
async fn secure(
    mut tcp: TcpStream,
    host: &str,
    config: &Config,
    tls: &Tls,
) -> Result<Dialed, String> {
    let Some(mut connector) = tls.connector()? else {
        return Ok((Box::new(tcp), None));
    };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await.map_err(|e| e.to_string())?;
    let answer = tcp.read_u8().await.map_err(|e| e.to_string())?;
    let required = config.get_ssl_mode() == tokio_postgres::config::SslMode::Require;
    match answer {
        b'S' => {
            let connect = MakeTlsConnect::<TcpStream>::make_tls_connect(&mut connector, host)
                .map_err(|e| e.to_string())?;
            let secured = connect.connect(tcp).await.map_err(|e| e.to_string())?;
            let binding = secured.end_point();
            Ok((Box::new(secured), binding))
        }
        _ if required => Err("the server does not accept TLS connections".into()),
        _ => Ok((Box::new(tcp), None)),
    }
}

/// The text of an `ErrorResponse`: its message and detail.
fn server_error(body: &[u8]) -> String {
    let mut message = String::new();
    let mut detail = String::new();
    for field in body.split(|&b| b == 0) {
        match field.split_first() {
            Some((b'M', text)) => message = String::from_utf8_lossy(text).into(),
            Some((b'D', text)) => detail = format!(" (DETAIL: {})", String::from_utf8_lossy(text)),
            _ => {}
        }
    }
    format!("{message}{detail}")
}

fn lost(message: String) -> Error {
    Error::Lost {
        side: Side::Master,
        what: format!("replication stream failed: {message}"),
    }
}
