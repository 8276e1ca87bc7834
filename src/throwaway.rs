//! Throwaway local PostgreSQL servers, for the demo and the tests.
//!
//! Each server lives in its own temporary folder on a free loopback port, made
//! with the system's `initdb` and `pg_ctl`. PostgreSQL refuses to run as root, so
//! when we are root the server runs as the `postgres` OS user.

use crate::programs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use thiserror::Error;

/// A server that could not be set up.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct ServerError(String);

/// A running throwaway server; stopped and removed when dropped.
pub struct Server {
    dir: PathBuf,
    bin: PathBuf,
    /// The loopback port it listens on.
    pub port: u16,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn running_as_root() -> bool {
    #[cfg(unix)]
    {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }
    #[cfg(not(unix))]
    false
}

/// A command that runs `program` as the `postgres` OS user when the tests
/// run as root (PostgreSQL refuses to run as root).
fn as_server_user(program: &std::ffi::OsStr) -> Command {
    match running_as_root() {
        true => {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        }
        false => Command::new(program),
    }
}

fn free_port() -> Result<u16, ServerError> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| ServerError(format!("no free port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| ServerError(format!("no free port: {e}")))
}

impl Server {
    /// Creates and starts a server whose `timezone` setting is `timezone`.
    pub fn start(timezone: &str) -> Result<Server, ServerError> {
        Server::start_with(timezone, "")
    }

    /// Like `start`, with extra `postgresql.conf` lines.
    pub fn start_with(timezone: &str, settings: &str) -> Result<Server, ServerError> {
        let bin = programs::bin_dir().map_err(|e| ServerError(e.to_string()))?;
        Server::start_in(bin, timezone, settings)
    }

    /// Like `start_with`, with the server programs of folder `bin`.
    pub fn start_in(bin: PathBuf, timezone: &str, settings: &str) -> Result<Server, ServerError> {
        let dir = std::env::temp_dir().join(format!(
            "pgreplica-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ServerError(format!("{}: {e}", dir.display())))?;
        let mut server = Server { dir, bin, port: 0 };
        if running_as_root() {
            server.run(
                "chown",
                &["-R", "postgres:", server.dir.to_str().unwrap_or_default()],
                false,
            )?;
        }
        let data = server.data();
        server.run(
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
            server.dir.display()
        );
        append(&Path::new(&data).join("postgresql.conf"), &conf)?;
        for _ in 0..5 {
            server.port = free_port()?;
            if server.pg_ctl_start().is_ok() {
                return Ok(server);
            }
        }
        Err(ServerError(format!(
            "the server did not start; see {}",
            server.dir.join("log").display()
        )))
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str], pg: bool) -> Result<(), ServerError> {
        let path = if pg {
            self.bin.join(program)
        } else {
            PathBuf::from(program)
        };
        let mut command = match pg {
            true => as_server_user(path.as_os_str()),
            false => Command::new(&path),
        };
        let output = command
            .args(args)
            .output()
            .map_err(|e| ServerError(format!("cannot run {}: {e}", path.display())))?;
        if !output.status.success() {
            return Err(ServerError(format!(
                "{} {} failed: {}{}",
                path.display(),
                args.join(" "),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(())
    }

    fn pg_ctl_start(&self) -> Result<(), ServerError> {
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

    /// The directory of its Unix-domain socket (`host=` of a connection
    /// string that does not go through TCP).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// A connection string to `dbname` as the superuser.
    pub fn dsn(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname}",
            self.port
        )
    }

    /// Stops the server (`fast` mode waits for nothing; `immediate` is a crash).
    pub fn stop(&self, mode: &str) -> Result<(), ServerError> {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", mode, "-w", "stop"],
            true,
        )
    }

    /// Runs `sql` (one statement a line) in a single-user backend of the
    /// stopped server's database `dbname`, started through `wrapper` (such as
    /// valgrind); returns what it wrote to stderr.
    pub fn single_user(
        &self,
        wrapper: &[&str],
        dbname: &str,
        sql: &str,
    ) -> Result<String, ServerError> {
        let postgres = self.bin.join("postgres").display().to_string();
        let data = self.data();
        let mut argv: Vec<&str> = wrapper.to_vec();
        argv.extend([postgres.as_str(), "--single", "-D", &data, dbname]);
        let mut child = as_server_user(argv[0].as_ref())
            .args(&argv[1..])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| ServerError(format!("cannot run {}: {e}", argv.join(" "))))?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            stdin
                .write_all(sql.as_bytes())
                .map_err(|e| ServerError(format!("{postgres} --single: {e}")))?;
        }
        let output = child
            .wait_with_output()
            .map_err(|e| ServerError(format!("{postgres} --single: {e}")))?;
        Ok(String::from_utf8_lossy(&output.stderr).into_owned())
    }

    /// Starts the server again on the same port; after [`Server::kill9`],
    /// once its last processes are gone.
    pub fn restart(&self) -> Result<(), ServerError> {
        let mut tries = 0;
        loop {
            match self.pg_ctl_start() {
                Err(e) if tries < 20 => {
                    tries += 1;
                    tracing::debug!("starting the server again: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
                done => return done,
            }
        }
    }

    /// Kills the server's postmaster with SIGKILL: a crash with no warning
    /// to anyone (its backends end when they notice it gone).
    pub fn kill9(&self) -> Result<(), ServerError> {
        let path = PathBuf::from(self.data()).join("postmaster.pid");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ServerError(format!("{}: {e}", path.display())))?;
        let pid = text.lines().next().unwrap_or_default().trim().to_string();
        self.run("kill", &["-9", &pid], false)
    }

    /// Writes `files` (name and contents) into the server's data folder,
    /// readable by the server alone (as PostgreSQL wants of a key file), and
    /// returns the folder.
    pub fn put_files(&self, files: &[(&str, &str)]) -> Result<PathBuf, ServerError> {
        let data = PathBuf::from(self.data());
        for (name, contents) in files {
            let path = data.join(name);
            std::fs::write(&path, contents)
                .map_err(|e| ServerError(format!("{}: {e}", path.display())))?;
            let path = path.display().to_string();
            self.run("chmod", &["600", &path], false)?;
            if running_as_root() {
                self.run("chown", &["postgres:", &path], false)?;
            }
        }
        Ok(data)
    }

    /// Appends `settings` to `postgresql.conf`, replaces `pg_hba.conf` with
    /// `hba`, and restarts the server.
    pub fn reconfigure(&self, settings: &str, hba: &str) -> Result<(), ServerError> {
        let data = PathBuf::from(self.data());
        append(&data.join("postgresql.conf"), &format!("\n{settings}\n"))?;
        let path = data.join("pg_hba.conf");
        std::fs::write(&path, hba).map_err(|e| ServerError(format!("{}: {e}", path.display())))?;
        self.stop("fast")?;
        self.restart()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop("immediate");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn append(path: &Path, text: &str) -> Result<(), ServerError> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| ServerError(format!("{}: {e}", path.display())))?;
    file.write_all(text.as_bytes())
        .map_err(|e| ServerError(format!("{}: {e}", path.display())))
}
