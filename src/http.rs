//! The optional HTTP listener: `/metrics` (Prometheus text), `/status` (the same
//! JSON as `status --json`) and `/` (a small page that refreshes itself).

use crate::config::Config;
use crate::metrics::Metrics;
use crate::status;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Serves until the process ends; `sets` holds the sets running now.
pub async fn serve(
    addr: SocketAddr,
    sets: watch::Receiver<Vec<Config>>,
    metrics: Metrics,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(
        "HTTP on http://{}/ (/metrics, /status)",
        listener.local_addr()?
    );
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (sets, metrics) = (sets.clone(), metrics.clone());
            tokio::spawn(async move {
                if let Err(e) = answer(stream, sets, metrics).await {
                    tracing::debug!("HTTP: {e}");
                }
            });
        }
    });
    Ok(())
}

/// Reads one request (its head only) and answers it.
async fn answer(
    mut stream: TcpStream,
    sets: watch::Receiver<Vec<Config>>,
    metrics: Metrics,
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
    let (code, kind, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.prometheus(),
        ),
        ("GET", "/status") => {
            let sets = sets.borrow().clone();
            let mut all = Vec::new();
            for set in &sets {
                all.extend(status::status(set).await);
            }
            let json = serde_json::to_string_pretty(&all).unwrap_or_else(|_| "[]".into());
            ("200 OK", "application/json", json)
        }
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
    const slaves = await (await fetch('/status', {cache: 'no-store'})).json();
    const body = document.getElementById('slaves');
    body.replaceChildren();
    for (const s of slaves) {
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
