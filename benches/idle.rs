//! The daemon's idle cost: 20 sets against one master, each with its own slave
//! database, nothing to replicate. Prints the CPU used over IDLE_SECONDS (default 60)
//! as a share of one core, and the resident memory, each against its target.
//!
//!     cargo bench --bench idle
//!     SETS=20 IDLE_SECONDS=60 cargo bench --bench idle

use pgreplica::throwaway::Server;
use pgreplica::{capture, db};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SCHEMA: &str = "CREATE TABLE t (id int PRIMARY KEY, v text)";

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn memory_mb(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

#[tokio::main]
async fn main() {
    let sets = env_number("SETS", 20);
    let seconds = env_number("IDLE_SECONDS", 60);
    let master = Server::start_with("UTC", "max_connections = 200").unwrap();
    let slave = Server::start_with("UTC", "max_connections = 200").unwrap();
    let admin = db::connect(&master.dsn("postgres"), None).await.unwrap();
    admin.batch_execute("CREATE DATABASE app").await.unwrap();
    let mut client = db::connect(&master.dsn("app"), None).await.unwrap();
    client.batch_execute(SCHEMA).await.unwrap();
    capture::install(&mut client, &[], None).await.unwrap();
    let dir = std::env::temp_dir().join(format!("pgreplica-bench-idle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let slave_admin = db::connect(&slave.dsn("postgres"), None).await.unwrap();
    for n in 0..sets {
        slave_admin
            .batch_execute(&format!("CREATE DATABASE s{n}"))
            .await
            .unwrap();
        let c = db::connect(&slave.dsn(&format!("s{n}")), None)
            .await
            .unwrap();
        c.batch_execute(SCHEMA).await.unwrap();
        std::fs::write(
            dir.join(format!("s{n}.conf")),
            format!(
                "[MAIN]\nNAME=s{n}\nDSN0={}\nDSN1={}\nDEBUG_LEVEL=0\n",
                master.dsn("app"),
                slave.dsn(&format!("s{n}"))
            ),
        )
        .unwrap();
    }
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_pgreplica"))
        .args(["run", "--config-dir", dir.to_str().unwrap()])
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = daemon.id();
    // Settle: connect, register, apply the empty first batches.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let share = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64();
    let (rss, peak) = (memory_mb(pid, "VmRSS:"), memory_mb(pid, "VmHWM:"));
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = std::fs::remove_dir_all(&dir);
    println!("\nIdle daemon, {sets} sets against one master, over {seconds} s\n");
    println!(
        "CPU: {:.4}% of a core   (target 0.1%: {:.2}x of it)",
        share * 100.0,
        share * 100.0 / 0.1
    );
    println!(
        "RSS: {rss:.1} MB now, {peak:.1} MB peak   (target 30 MB: {:.2}x of it)",
        peak / 30.0
    );
}
