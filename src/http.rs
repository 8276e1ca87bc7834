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
        ("GET", "/metrics" | "/status") => (
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
const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pgreplica</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; }
th, td { padding: .35em .8em; border-bottom: 1px solid #ddd; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.running { color: #176f2c; } .stopped, .unknown { color: #b3261e; font-weight: bold; }
.lagging { background: #fff4d6; }
tr.summary td { font-weight: bold; background: #f2f4f7; }
svg polyline { fill: none; stroke: #3467c2; stroke-width: 1.5; }
#error { color: #b3261e; }
</style></head>
<body>
<h1>pgreplica</h1>
<p id="updated">loading…</p><p id="error"></p>
<table><thead><tr><th>set</th><th>slave</th><th>state</th><th>waiting</th><th>lag (s)</th>
<th>lag, last 2 min</th><th>last apply</th><th>last error</th></tr></thead>
<tbody id="slaves"></tbody></table>
<script>
const history = {};
function sparkline(points) {
  const w = 120, h = 24, max = Math.max(1, ...points);
  const xy = points.map((v, i) => `${(i * w / 59).toFixed(1)},${(h - 2 - v * (h - 4) / max).toFixed(1)}`);
  return `<svg width="${w}" height="${h}" viewBox="0 0 ${w} ${h}"><polyline points="${xy.join(' ')}"/></svg>`;
}
function cell(text, cls) {
  const td = document.createElement('td');
  if (cls) td.className = cls;
  td.textContent = text;
  return td;
}
async function refresh() {
  try {
    const token = new URLSearchParams(location.hash.slice(1)).get('token');
    const headers = token ? {Authorization: 'Bearer ' + token} : {};
    const answer = await fetch('/status', {cache: 'no-store', headers});
    if (!answer.ok) throw new Error(answer.status + ' ' + (await answer.text()));
    const slaves = await answer.json();
    const body = document.getElementById('slaves');
    body.replaceChildren();
    // One summary line per set, then its slaves: stopped first, then lagging,
    // the most behind first, so that a set of hundreds shows its problems on top.
    const sets = new Map();
    for (const s of slaves) sets.set(s.set, (sets.get(s.set) || []).concat([s]));
    const rank = s => s.state !== 'running' ? 0 : s.lagging ? 1 : 2;
    for (const [name, list] of sets) {
      const stopped = list.filter(s => rank(s) === 0).length;
      const lagging = list.filter(s => rank(s) === 1).length;
      const most = Math.max(...list.map(s => s.lag_seconds));
      const summary = document.createElement('tr');
      summary.className = 'summary' + (stopped ? ' stopped' : lagging ? ' lagging' : '');
      const td = cell(`${name}: ${list.length} slave${list.length === 1 ? '' : 's'}, ` +
        `${list.length - stopped} running, ${stopped} stopped, ${lagging} lagging; ` +
        `most lag ${most.toFixed(1)} s`);
      td.colSpan = 8;
      summary.append(td);
      body.append(summary);
      list.sort((a, b) => rank(a) - rank(b) || b.lag_seconds - a.lag_seconds || a.slave - b.slave);
      for (const s of list) {
        const key = s.set + '/' + s.slave;
        const points = (history[key] = (history[key] || []).concat([s.lag_seconds]).slice(-60));
        const tr = document.createElement('tr');
        if (s.lagging) tr.className = 'lagging';
        tr.append(cell(s.set), cell(s.slave, 'n'), cell(s.state, s.state.replace(' ', '-')),
                  cell(s.events_waiting, 'n'), cell(s.lag_seconds.toFixed(1), 'n'));
        const spark = document.createElement('td');
        spark.innerHTML = sparkline(points);
        tr.append(spark, cell(s.last_apply || '-'), cell(s.last_error || '-'));
        body.append(tr);
      }
    }
    document.getElementById('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
    document.getElementById('error').textContent = '';
  } catch (e) {
    document.getElementById('error').textContent = 'cannot read /status: ' + e;
  }
}
refresh();
setInterval(refresh, 2000);
</script>
</body></html>
"#;
