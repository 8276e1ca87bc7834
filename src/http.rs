//! The optional HTTP listener: `/metrics` (Prometheus text), `/status` (the
//! slaves as the daemon knows them, JSON) and `/` (a page that refreshes
//! itself). Everything it shows comes from the daemon's memory: a request
//! costs the servers nothing.
//!
//! Off loopback it needs `HTTP_TOKEN` (`Authorization: Bearer …`); every
//! connection has a time limit to send its request, and when too many are
//! open the oldest is closed, so idle clients cannot take the daemon's file
//! descriptors.

use crate::config::Config;
use crate::metrics::Metrics;
use crate::status;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// Connections open at once, at most; a new one closes the oldest.
const CONNECTIONS: usize = 64;
/// Time a client has to send its request, and to take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Who may read what.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// `HTTP_TOKEN`.
    pub token: Option<String>,
    /// `HTTP_METRICS_OPEN`: `/metrics` without the token.
    pub metrics_open: bool,
}

/// Serves until the process ends; `sets` holds the sets running now.
pub async fn serve(
    addr: SocketAddr,
    sets: watch::Receiver<Vec<Config>>,
    metrics: Metrics,
    access: Access,
) -> std::io::Result<()> {
    if !addr.ip().is_loopback() && access.token.is_none() {
        return Err(std::io::Error::other(format!(
            "{addr} can be reached from other machines: set HTTP_TOKEN (clients then send \
             Authorization: Bearer TOKEN), or listen on 127.0.0.1"
        )));
    }
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(
        "HTTP on http://{}/ (/metrics, /status){}",
        listener.local_addr()?,
        if access.token.is_some() {
            ", token required"
        } else {
            ""
        }
    );
    let access = Arc::new(access);
    let open: Arc<Mutex<VecDeque<(u64, AbortHandle)>>> = Arc::default();
    tokio::spawn(async move {
        let mut next = 0u64;
        while let Ok((stream, _)) = listener.accept().await {
            next += 1;
            let id = next;
            let (sets, metrics, access, done) =
                (sets.clone(), metrics.clone(), access.clone(), open.clone());
            let task = tokio::spawn(async move {
                let answered =
                    tokio::time::timeout(CLIENT_TIMEOUT, answer(stream, &sets, &metrics, &access));
                match answered.await {
                    Ok(Err(e)) => tracing::debug!("HTTP: {e}"),
                    Err(_) => tracing::debug!("HTTP: a client took too long"),
                    Ok(Ok(())) => {}
                }
                if let Ok(mut open) = done.lock() {
                    open.retain(|(i, _)| *i != id);
                }
            });
            if let Ok(mut open) = open.lock() {
                while open.len() >= CONNECTIONS {
                    if let Some((_, oldest)) = open.pop_front() {
                        oldest.abort();
                    }
                }
                open.push_back((id, task.abort_handle()));
            }
        }
    });
    Ok(())
}

/// Reads one request (its head only) and answers it.
async fn answer(
    mut stream: TcpStream,
    sets: &watch::Receiver<Vec<Config>>,
    metrics: &Metrics,
    access: &Access,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 << 10 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let request = String::from_utf8_lossy(&head);
    let mut words = request.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let shown = bearer(&request).is_some_and(|t| {
        access
            .token
            .as_deref()
            .is_some_and(|token| same(t.as_bytes(), token.as_bytes()))
    });
    let allowed = shown || access.token.is_none();
    let (code, kind, body) = match (method, path) {
        ("GET", "/metrics") if allowed || access.metrics_open => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.prometheus(),
        ),
        ("GET", "/status") if allowed => {
            let sets = sets.borrow().clone();
            let all = status::from_daemon(&sets, &metrics.snapshot(), shown);
            let json = serde_json::to_string_pretty(&all).unwrap_or_else(|_| "[]".into());
            ("200 OK", "application/json", json)
        }
        ("GET", "/status/page") if allowed => {
            let sets = sets.borrow().clone();
            let page = status::page(&sets, &metrics.snapshot(), shown);
            let json = serde_json::to_string(&page).unwrap_or_else(|_| "{}".into());
            ("200 OK", "application/json", json)
        }
        ("GET", "/metrics" | "/status" | "/status/page") => (
            "401 Unauthorized",
            "text/plain",
            "send the daemon's HTTP_TOKEN: Authorization: Bearer TOKEN\n".into(),
        ),
        ("GET", "/") => ("200 OK", "text/html; charset=utf-8", PAGE.to_string()),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "not found: try /, /status or /metrics\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
    };
    let response = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The token of an `Authorization: Bearer …` header.
fn bearer(request: &str) -> Option<&str> {
    request.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if !name.trim().eq_ignore_ascii_case("authorization") {
            return None;
        }
        let value = value.trim();
        value
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case("bearer "))
            .map(|_| value[7..].trim())
    })
}

/// Compares in a time that does not depend on where the texts differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The status page: a table of slaves with a lag sparkline, refreshed every 2 s.
/// The status page: it reads `/status/page` every few seconds.
const PAGE: &str = include_str!("status.html");
