//! The demo: two throwaway servers, a write load, and the slave catching up.

use crate::config::Config;
use crate::error::{Context, Error};
use crate::throwaway::Server;
use crate::{capture, daemon, db};
use futures_util::TryStreamExt;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_postgres::Client;

const SCHEMA_SQL: &str = "CREATE TABLE orders (
    id       serial PRIMARY KEY,
    customer text NOT NULL,
    amount   numeric(12,2),
    placed   timestamptz NOT NULL DEFAULT now(),
    note     text
)";

/// A query's rows in COPY text form: byte-equal output means equal data.
pub async fn copy_out(client: &Client, query: &str) -> Result<Vec<u8>, Error> {
    let doing = format!("copying out ({query})");
    let stream = client
        .copy_out(&format!("COPY ({query}) TO STDOUT"))
        .await
        .doing(&doing)?;
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.doing(&doing)?;
    Ok(chunks.concat())
}

fn setup_error(e: impl std::fmt::Display) -> Error {
    Error::Invalid {
        doing: "setting up the demo".into(),
        message: e.to_string(),
    }
}

/// Runs the demo, printing what happens (the daemon logs to `log`); returns
/// whether master and slave ended equal.
pub async fn run(log: &std::path::Path) -> Result<bool, Error> {
    println!(
        "Starting two throwaway PostgreSQL servers (master in Europe/Madrid, slave in America/New_York)…"
    );
    let master_pg = Server::start("Europe/Madrid").map_err(setup_error)?;
    let slave_pg = Server::start("America/New_York").map_err(setup_error)?;
    for pg in [&master_pg, &slave_pg] {
        let admin = db::connect(&pg.dsn("postgres"), None).await?;
        admin
            .batch_execute("CREATE DATABASE shop")
            .await
            .doing("creating database shop")?;
        let shop = db::connect(&pg.dsn("shop"), None).await?;
        shop.batch_execute(SCHEMA_SQL)
            .await
            .doing("creating table orders")?;
    }
    println!(
        "master: {}\nslave:  {}",
        master_pg.dsn("shop"),
        slave_pg.dsn("shop")
    );

    let mut master = db::connect(&master_pg.dsn("shop"), None).await?;
    println!("\n$ pgreplica install --dsn '{}'", master_pg.dsn("shop"));
    for report in capture::install(&mut master, &[], None).await? {
        match report.skipped {
            None => println!("  {}: replicated", report.table),
            Some(why) => println!("  {}: skipped ({why})", report.table),
        }
    }

    let dir = std::env::temp_dir().join(format!("pgreplica-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(setup_error)?;
    let path = dir.join("shop.conf");
    let text = format!(
        "[MAIN]\nNAME=shop\nDSN0={}\nDSN1={}\nKEEPALIVE=true\nDEBUG_LEVEL=1\n",
        master_pg.dsn("shop"),
        slave_pg.dsn("shop")
    );
    std::fs::write(&path, &text).map_err(setup_error)?;
    println!("\n{}:\n{text}", path.display());
    let config = Config::load(&path).map_err(setup_error)?;

    println!(
        "$ pgreplica run {}   (in the background, while 4 seconds of orders are written;\n  \
         its log goes to {})",
        path.display(),
        log.display()
    );
    let (stop, shutdown) = watch::channel(false);
    let (_reload, reloads) = tokio::sync::mpsc::channel(1);
    let metrics = crate::metrics::Metrics::default();
    let daemon = tokio::spawn(daemon::run(vec![config], false, shutdown, reloads, metrics));
    let slave = db::connect(&slave_pg.dsn("shop"), None).await?;
    let started = Instant::now();
    let mut next_report = Duration::ZERO;
    let mut round = 0u64;
    while started.elapsed() < Duration::from_secs(4) {
        round += 1;
        let tx = master.transaction().await.doing("writing orders")?;
        tx.execute(
            "INSERT INTO orders (customer, amount, note) SELECT 'customer ' || g, (random() * 1000)::numeric(12,2), \
             CASE WHEN g % 3 = 0 THEN E'gift\\twrap, \"fragile\"' END FROM generate_series(1, 20) g",
            &[],
        )
        .await
        .doing("writing orders")?;
        tx.execute(
            "UPDATE orders SET amount = amount + 1 WHERE id % 7 = $1",
            &[&((round % 7) as i32)],
        )
        .await
        .doing("writing orders")?;
        tx.execute(
            "DELETE FROM orders WHERE id % 50 = $1",
            &[&((round % 50) as i32)],
        )
        .await
        .doing("writing orders")?;
        tx.commit().await.doing("writing orders")?;
        if started.elapsed() >= next_report {
            println!(
                "  {:>4.1}s  master {:>6} rows   slave {:>6} rows",
                started.elapsed().as_secs_f64(),
                count(&master).await?,
                count(&slave).await?
            );
            next_report += Duration::from_secs(1);
        }
    }
    println!("Writes stopped; waiting for the slave to catch up…");
    // Both sides print instants in the same zone, so equal data is equal text.
    for client in [&master, &slave] {
        client
            .batch_execute("SET timezone = 'UTC'")
            .await
            .doing("setting the time zone")?;
    }
    let query = "SELECT * FROM orders ORDER BY id";
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut equal = false;
    while Instant::now() < deadline {
        if copy_out(&master, query).await? == copy_out(&slave, query).await? {
            equal = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = count(&master).await?;
    if equal {
        println!(
            "  slave caught up in {:.2}s after the last write: {rows} rows, byte-equal to the master",
            started.elapsed().as_secs_f64() - 4.0
        );
    } else {
        println!(
            "  the slave did NOT catch up within 30s: see the daemon's log, {}",
            log.display()
        );
    }
    let _ = stop.send(true);
    let _ = daemon.await;
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "Stopping and removing the throwaway servers. The daemon's log stays in {}.",
        log.display()
    );
    Ok(equal)
}

async fn count(client: &Client) -> Result<i64, Error> {
    Ok(client
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .doing("counting orders")?
        .get(0))
}
