//! E-mail alerts (PyReplica's `[SMTP]` section): start, stop, error and warning
//! mails, sent by a background task so that a slow or failing mail server never
//! holds replication up. No storms: the first mail of a kind goes out at once;
//! further ones within `DIGEST_INTERVAL` are gathered into one digest sent at
//! the end of the interval.

use crate::config::{Smtp, SmtpTls};
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What a mail is about; each notice has its subject and its own digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Notice {
    /// Replication started (or resumed after an error).
    Start,
    /// Replication stopped.
    Stop,
    /// A slave stopped on an error.
    Error,
    /// Conflicts, lag.
    Warning,
}

impl Notice {
    fn key(self) -> &'static str {
        match self {
            Notice::Start => "START",
            Notice::Stop => "STOP",
            Notice::Error => "ERROR",
            Notice::Warning => "WARNING",
        }
    }
}

/// Mails waiting for the sender task, at most; beyond, they are logged and dropped.
const QUEUE: usize = 1000;
/// Longest time one mail may take to send.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends a set's alerts; cheap to clone. Without `[SMTP]` it does nothing.
#[derive(Clone)]
pub struct Mailer {
    tx: Option<mpsc::Sender<(Notice, String)>>,
}

impl Mailer {
    /// Starts the sender task for `set` when `smtp` is configured.
    pub fn start(set: &str, smtp: Option<Smtp>) -> (Mailer, Option<tokio::task::JoinHandle<()>>) {
        let Some(smtp) = smtp else {
            return (Mailer { tx: None }, None);
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(sender(set.to_string(), smtp, rx));
        (Mailer { tx: Some(tx) }, Some(task))
    }

    /// Queues a mail; never waits.
    pub fn send(&self, kind: Notice, text: impl Into<String>) {
        if let Some(tx) = &self.tx
            && tx.try_send((kind, text.into())).is_err()
        {
            tracing::warn!("mail queue full or closed: a {kind:?} mail was not sent");
        }
    }
}

/// Per kind: when the last mail went out, and what waits for the digest.
#[derive(Default)]
struct Pending {
    last: Option<Instant>,
    waiting: Vec<String>,
}

/// A mail that failed for a passing reason, to be tried again.
struct Retry {
    message: Message,
    subject: String,
    next: Instant,
    wait: Duration,
    until: Instant,
}

/// Mails waiting to be tried again, at most; beyond, the oldest is dropped.
const RETRIES: usize = 100;
/// The first wait before a retry; doubled each time, up to a minute.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// The sender task: sends at once or gathers for the digest, tries again what
/// failed for a passing reason; on close, sends what waits and ends.
async fn sender(set: String, smtp: Smtp, mut rx: mpsc::Receiver<(Notice, String)>) {
    let transport = match transport(&smtp) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("[SMTP] cannot be used, no mail will be sent: {e}");
            while rx.recv().await.is_some() {}
            return;
        }
    };
    let mut kinds: BTreeMap<Notice, Pending> = BTreeMap::new();
    let mut retries: VecDeque<Retry> = VecDeque::new();
    loop {
        let digest_due = kinds
            .iter()
            .filter(|(_, p)| !p.waiting.is_empty())
            .filter_map(|(_, p)| p.last.map(|l| l + smtp.digest));
        let due = digest_due.chain(retries.iter().map(|r| r.next)).min();
        let received = match due {
            Some(due) => tokio::select! {
                m = rx.recv() => Some(m),
                _ = tokio::time::sleep_until(due) => None,
            },
            None => Some(rx.recv().await),
        };
        let mut outgoing: Vec<(Notice, Vec<String>)> = Vec::new();
        match received {
            Some(Some((kind, text))) => {
                let pending = kinds.entry(kind).or_default();
                if pending.last.is_some_and(|l| l.elapsed() < smtp.digest) {
                    pending.waiting.push(text);
                    continue;
                }
                pending.last = Some(Instant::now());
                outgoing.push((kind, vec![text]));
            }
            Some(None) => {
                for (kind, pending) in &mut kinds {
                    let texts = std::mem::take(&mut pending.waiting);
                    if !texts.is_empty() {
                        let Some(message) = compose(&smtp, &set, *kind, &texts) else {
                            continue;
                        };
                        let _ = deliver(&transport, message).await;
                    }
                }
                return;
            }
            None => {
                let now = Instant::now();
                for (kind, pending) in &mut kinds {
                    if !pending.waiting.is_empty()
                        && pending.last.is_some_and(|l| now >= l + smtp.digest)
                    {
                        pending.last = Some(now);
                        outgoing.push((*kind, std::mem::take(&mut pending.waiting)));
                    }
                }
                for mut retry in std::mem::take(&mut retries) {
                    if retry.next > now {
                        retries.push_back(retry);
                        continue;
                    }
                    match deliver(&transport, retry.message.clone()).await {
                        Ok(()) => tracing::info!("mail '{}' sent on a retry", retry.subject),
                        Err(e) if e.transient && now + retry.wait < retry.until => {
                            retry.wait = (retry.wait * 2).min(Duration::from_secs(60));
                            retry.next = now + retry.wait;
                            retries.push_back(retry);
                        }
                        Err(e) => tracing::warn!(
                            "mail '{}' not sent, given up after {}s: {}",
                            retry.subject,
                            smtp.retry_for.as_secs(),
                            e.message
                        ),
                    }
                }
            }
        }
        for (kind, texts) in outgoing {
            let Some(message) = compose(&smtp, &set, kind, &texts) else {
                continue;
            };
            let subject = subject_of(&message);
            match deliver(&transport, message.clone()).await {
                Ok(()) => tracing::debug!("mail sent: {subject}"),
                Err(e) if e.transient && !smtp.retry_for.is_zero() => {
                    tracing::warn!(
                        "mail '{subject}' not sent yet: {}; trying again for up to {}s",
                        e.message,
                        smtp.retry_for.as_secs()
                    );
                    if retries.len() >= RETRIES
                        && let Some(dropped) = retries.pop_front()
                    {
                        tracing::warn!("mail '{}' dropped: too many mails wait", dropped.subject);
                    }
                    let now = Instant::now();
                    retries.push_back(Retry {
                        message,
                        subject,
                        next: now + FIRST_RETRY,
                        wait: FIRST_RETRY,
                        until: now + smtp.retry_for,
                    });
                }
                Err(e) => tracing::warn!("mail '{subject}' not sent: {}", e.message),
            }
        }
    }
}

type Transport = AsyncSmtpTransport<Tokio1Executor>;

fn transport(smtp: &Smtp) -> Result<Transport, String> {
    let (host, port) = match smtp.server.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_string(), p.parse().ok()),
        _ => (smtp.server.clone(), None),
    };
    let params = || TlsParameters::new(host.clone()).map_err(|e| e.to_string());
    let login = smtp.username.is_some();
    let (tls, default_port) = match smtp.tls {
        // With a login, STARTTLS must succeed: a server (or someone between)
        // that does not offer it never gets the password in clear.
        SmtpTls::Opportunistic if login => (Tls::Required(params()?), 25),
        SmtpTls::Opportunistic => (Tls::Opportunistic(params()?), 25),
        SmtpTls::StartTls => (Tls::Required(params()?), 587),
        SmtpTls::Tls => (Tls::Wrapper(params()?), 465),
        SmtpTls::Off => (Tls::None, 25),
    };
    let mut builder = Transport::builder_dangerous(&host)
        .port(port.unwrap_or(default_port))
        .tls(tls)
        .timeout(Some(SEND_TIMEOUT));
    if let Some(user) = &smtp.username {
        let password = smtp.password.clone().unwrap_or_default();
        builder = builder.credentials(Credentials::new(user.clone(), password));
    }
    Ok(builder.build())
}

/// Why a mail was not sent, and whether trying again may help.
struct Failure {
    message: String,
    transient: bool,
}

/// One mail (one text) or a digest (several) to every recipient.
fn compose(smtp: &Smtp, set: &str, kind: Notice, texts: &[String]) -> Option<Message> {
    let subject = smtp
        .subjects
        .get(kind.key())
        .cloned()
        .unwrap_or_else(|| format!("[pgreplica] {set}: {}", kind.key().to_lowercase()));
    let (subject, body) = match texts {
        [one] => (subject, format!("{one}\n")),
        many => (
            format!("{subject} ({} events)", many.len()),
            format!(
                "{} {} events of replication set {set} since the last mail:\n\n{}\n",
                many.len(),
                kind.key().to_lowercase(),
                many.iter()
                    .map(|t| format!("- {}", t.replace('\n', "\n  ")))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        ),
    };
    build(smtp, &subject, body)
        .map_err(|e| tracing::error!("[SMTP]: cannot write the mail: {e}"))
        .ok()
}

fn subject_of(message: &Message) -> String {
    message
        .headers()
        .get_raw("Subject")
        .unwrap_or_default()
        .to_string()
}

/// Sends one mail. A refused connection, a timeout or a 4xx answer are
/// passing; a 5xx answer or a TLS failure are not.
async fn deliver(transport: &Transport, message: Message) -> Result<(), Failure> {
    match tokio::time::timeout(SEND_TIMEOUT, transport.send(message)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            let tls = e.is_tls() || e.to_string().contains("STARTTLS");
            Err(Failure {
                transient: !(e.is_permanent() || e.is_client() || e.is_response() || tls),
                message: if tls {
                    format!(
                        "{e} (a login goes only over TLS: the server must offer STARTTLS, \
                         or set [SMTP] TLS=off to send the password in clear)"
                    )
                } else {
                    e.to_string()
                },
            })
        }
        Err(_) => Err(Failure {
            message: "the mail server did not answer in time".into(),
            transient: true,
        }),
    }
}

fn build(smtp: &Smtp, subject: &str, body: String) -> Result<Message, String> {
    let mailbox = |a: &str| {
        a.parse::<Mailbox>()
            .map_err(|e| format!("address '{a}': {e}"))
    };
    let mut message = Message::builder()
        .from(mailbox(&smtp.from)?)
        .subject(subject);
    for to in &smtp.to {
        message = message.to(mailbox(to)?);
    }
    message.body(body).map_err(|e| e.to_string())
}
