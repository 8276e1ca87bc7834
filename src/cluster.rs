//! Throwaway local PostgreSQL servers, for the demo and the tests.
//!
//! Each server lives in its own temporary folder on a free loopback port, made
//! with the system's `initdb` and `pg_ctl`. PostgreSQL refuses to run as root, so
//! when we are root the server runs as the `postgres` OS user.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use thiserror::Error;

/// A server that could not be set up.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct ClusterError(String);

/// A running throwaway server; stopped and removed when dropped.
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    /// The loopback port it listens on.
    pub port: u16,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The newest installed PostgreSQL's `bin` folder (or `$PG_BIN`).
pub fn find_bin() -> Result<PathBuf, ClusterError> {
    if let Some(bin) = std::env::var_os("PG_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(|| {
        ClusterError(
            "PostgreSQL's server programs (initdb, pg_ctl) were not found under /usr/lib/postgresql: \
             install them with `apt-get install -y postgresql` (or set PG_BIN to their folder)"
                .into(),
        )
    })
}

fn running_as_root() -> bool {
    #[cfg(unix)]
    {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }
    #[cfg(not(unix))]
    false
}

fn free_port() -> Result<u16, ClusterError> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| ClusterError(format!("no free port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| ClusterError(format!("no free port: {e}")))
}

impl Cluster {
    /// Creates and starts a server whose `timezone` setting is `timezone`.
    pub fn start(timezone: &str) -> Result<Cluster, ClusterError> {
        Cluster::start_with(timezone, "")
    }

    /// Like `start`, with extra `postgresql.conf` lines.
    pub fn start_with(timezone: &str, settings: &str) -> Result<Cluster, ClusterError> {
        let bin = find_bin()?;
        let dir = std::env::temp_dir().join(format!(
            "pgreplica-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ClusterError(format!("{}: {e}", dir.display())))?;
        let mut cluster = Cluster { dir, bin, port: 0 };
        if running_as_root() {
            cluster.run(
                "chown",
                &["-R", "postgres:", cluster.dir.to_str().unwrap_or_default()],
                false,
            )?;
        }
        let data = cluster.data();
        cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            true,
        )?;
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\n\
             full_page_writes = off\ntimezone = '{timezone}'\nmax_connections = 200\nshared_buffers = 64MB\n{settings}\n",
            cluster.dir.display()
        );
        append(&Path::new(&data).join("postgresql.conf"), &conf)?;
        for _ in 0..5 {
            cluster.port = free_port()?;
            if cluster.pg_ctl_start().is_ok() {
                return Ok(cluster);
            }
        }
        Err(ClusterError(format!(
            "the server did not start; see {}",
            cluster.dir.join("log").display()
        )))
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str], pg: bool) -> Result<(), ClusterError> {
        let path = if pg {
            self.bin.join(program)
        } else {
            PathBuf::from(program)
        };
        let mut command = if pg && running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let output = command
            .args(args)
            .output()
            .map_err(|e| ClusterError(format!("cannot run {}: {e}", path.display())))?;
        if !output.status.success() {
            return Err(ClusterError(format!(
                "{} {} failed: {}{}",
                path.display(),
                args.join(" "),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(())
    }

    fn pg_ctl_start(&self) -> Result<(), ClusterError> {
        let log = self.dir.join("log").display().to_string();
        let port = format!("-p {}", self.port);
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &port,
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "start",
            ],
            true,
        )
    }

    /// A connection string to `dbname` as the superuser.
    pub fn dsn(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname}",
            self.port
        )
    }

    /// Stops the server (`fast` mode waits for nothing; `immediate` is a crash).
    pub fn stop(&self, mode: &str) -> Result<(), ClusterError> {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", mode, "-w", "stop"],
            true,
        )
    }

    /// Starts the server again on the same port.
    pub fn restart(&self) -> Result<(), ClusterError> {
        self.pg_ctl_start()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop("immediate");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn append(path: &Path, text: &str) -> Result<(), ClusterError> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| ClusterError(format!("{}: {e}", path.display())))?;
    file.write_all(text.as_bytes())
        .map_err(|e| ClusterError(format!("{}: {e}", path.display())))
}
