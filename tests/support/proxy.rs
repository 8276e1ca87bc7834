//! A TCP proxy that can go silent, as a dead network does, or cut its
//! connections, as an unplugged laptop's network does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Forwards loopback connections to `target`. While `silent`, it swallows
/// every byte both ways and forwards nothing, as a dead network would; with
/// `cut`, it closes its connections instead and refuses new ones.
pub async fn proxy(target: u16, silent: Arc<AtomicBool>, cut: bool) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            if cut && silent.load(Ordering::Relaxed) {
                continue;
            }
            let silent = silent.clone();
            tokio::spawn(async move {
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
                    return;
                };
                // As a network would: no Nagle delay on the proxy's own writes.
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::spawn(forward(ri, wo, silent.clone(), cut));
                forward(ro, wi, silent, cut).await;
            });
        }
    });
    port
}

async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    silent: Arc<AtomicBool>,
    cut: bool,
) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let read = tokio::time::timeout(Duration::from_millis(100), from.read(&mut buf));
        let n = match read.await {
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(n)) => n,
            Err(_) if cut && silent.load(Ordering::Relaxed) => return,
            Err(_) => continue,
        };
        if cut && silent.load(Ordering::Relaxed) {
            return;
        }
        if !silent.load(Ordering::Relaxed) && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
