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
use std::collections::BTreeMap;
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

/// The sender task: sends at once or gathers for the digest; on close, sends
/// what waits and ends.
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
    loop {
        let due = kinds
            .iter()
            .filter(|(_, p)| !p.waiting.is_empty())
            .filter_map(|(_, p)| p.last.map(|l| l + smtp.digest))
            .min();
        let received = match due {
            Some(due) => tokio::select! {
                m = rx.recv() => Some(m),
                _ = tokio::time::sleep_until(due) => None,
            },
            None => Some(rx.recv().await),
        };
        match received {
            Some(Some((kind, text))) => {
                let pending = kinds.entry(kind).or_default();
                if pending.last.is_some_and(|l| l.elapsed() < smtp.digest) {
                    pending.waiting.push(text);
                    continue;
                }
                pending.last = Some(Instant::now());
                deliver(&transport, &smtp, &set, kind, &[text]).await;
            }
            Some(None) => {
                for (kind, pending) in &mut kinds {
                    let texts = std::mem::take(&mut pending.waiting);
                    if !texts.is_empty() {
                        deliver(&transport, &smtp, &set, *kind, &texts).await;
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
                        let texts = std::mem::take(&mut pending.waiting);
                        pending.last = Some(now);
                        deliver(&transport, &smtp, &set, *kind, &texts).await;
                    }
                }
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
    let (tls, default_port) = match smtp.tls {
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

/// Sends one mail (one text) or a digest (several) to every recipient; failures
/// are logged.
async fn deliver(transport: &Transport, smtp: &Smtp, set: &str, kind: Notice, texts: &[String]) {
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
    let message = match build(smtp, &subject, body) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("[SMTP]: cannot write the mail: {e}");
            return;
        }
    };
    match tokio::time::timeout(SEND_TIMEOUT, transport.send(message)).await {
        Ok(Ok(_)) => tracing::debug!("mail sent: {subject}"),
        Ok(Err(e)) => tracing::warn!("mail '{subject}' not sent: {e}"),
        Err(_) => {
            tracing::warn!("mail '{subject}' not sent: the mail server did not answer in time")
        }
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
