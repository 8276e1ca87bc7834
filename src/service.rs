//! Running as a service: pidfile, log file that can be reopened, and systemd's
//! readiness and watchdog notifications (`Type=notify`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The default pidfile: `/run/pgreplica.pid` for root, else in `~/.pgreplica/`.
pub fn default_pidfile() -> PathBuf {
    home_or_system("/run/pgreplica.pid", "pgreplica.pid")
}

/// The default log file of `pgreplica start`.
pub fn default_logfile() -> PathBuf {
    home_or_system("/var/log/pgreplica.log", "pgreplica.log")
}

fn home_or_system(system: &str, name: &str) -> PathBuf {
    if is_root() {
        return PathBuf::from(system);
    }
    let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    home.join(".pgreplica").join(name)
}

fn is_root() -> bool {
    #[cfg(unix)]
    {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }
    #[cfg(not(unix))]
    false
}

/// The pid in `pidfile` when that process is alive, and whether a stale file
/// (its process gone) was found.
pub fn running(pidfile: &Path) -> (Option<u32>, bool) {
    let Ok(text) = std::fs::read_to_string(pidfile) else {
        return (None, false);
    };
    match text.trim().parse::<u32>() {
        Ok(pid) if alive(pid) => (Some(pid), false),
        _ => (None, true),
    }
}

/// Whether process `pid` exists and is a pgreplica.
pub fn alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("pgreplica"))
        .unwrap_or(false)
}

/// The pidfile of a running daemon, removed when dropped.
pub struct PidFile(PathBuf);

impl PidFile {
    /// Writes our pid, refusing when another live daemon holds the file.
    pub fn create(path: &Path) -> Result<PidFile, String> {
        if let (Some(pid), _) = running(path)
            && pid != std::process::id()
        {
            return Err(format!(
                "pgreplica is already running (pid {pid}, pidfile {})",
                path.display()
            ));
        }
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(path, format!("{}\n", std::process::id()))
            .map_err(|e| format!("cannot write the pidfile {}: {e}", path.display()))?;
        Ok(PidFile(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if running(&self.0).0 == Some(std::process::id()) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// A log file shared by every log line, reopened on SIGHUP (after logrotate
/// moved it away).
#[derive(Clone)]
pub struct LogFile {
    path: PathBuf,
    file: Arc<Mutex<File>>,
}

impl LogFile {
    /// Opens (appends to) `path`, creating its folder.
    pub fn open(path: &Path) -> std::io::Result<LogFile> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(LogFile {
            path: path.to_path_buf(),
            file: Arc::new(Mutex::new(file)),
        })
    }

    /// Another handle on the log file, for a child's standard error.
    pub fn file_for_child(&self) -> std::io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
    }

    /// Opens the path again; later lines go to the new file.
    pub fn reopen(&self) -> std::io::Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        if let Ok(mut current) = self.file.lock() {
            *current = file;
        }
        Ok(())
    }
}

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.file.lock() {
            Ok(mut f) => f.write(buf),
            Err(_) => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.file.lock() {
            Ok(mut f) => f.flush(),
            Err(_) => Ok(()),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogFile {
    type Writer = LogFile;

    fn make_writer(&'a self) -> LogFile {
        self.clone()
    }
}

/// Sends a state line to systemd when it started us with `Type=notify`.
pub fn notify(state: &str) {
    #[cfg(unix)]
    if let Some(socket) = std::env::var_os("NOTIFY_SOCKET") {
        use std::os::unix::net::UnixDatagram;
        let path = PathBuf::from(&socket);
        // Never blocks: a notify socket nobody reads must not stop a worker
        // thread of the daemon (the message is then dropped).
        let sent = UnixDatagram::unbound().and_then(|s| {
            s.set_nonblocking(true)?;
            if path.as_os_str().as_encoded_bytes().first() == Some(&b'@') {
                abstract_send(&s, &path, state)
            } else {
                s.send_to(state.as_bytes(), &path).map(|_| ())
            }
        });
        match sent {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tracing::debug!("systemd did not take a notification ({state})");
            }
            Err(e) => tracing::warn!("cannot notify systemd ({state}): {e}"),
            Ok(()) => {}
        }
    }
}

#[cfg(target_os = "linux")]
fn abstract_send(
    socket: &std::os::unix::net::UnixDatagram,
    path: &Path,
    state: &str,
) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let name = &path.as_os_str().as_encoded_bytes()[1..];
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(state.as_bytes(), &addr).map(|_| ())
}

#[cfg(all(unix, not(target_os = "linux")))]
fn abstract_send(_: &std::os::unix::net::UnixDatagram, _: &Path, _: &str) -> std::io::Result<()> {
    Err(std::io::Error::other("abstract sockets are Linux only"))
}

/// How often systemd wants to hear from us (`WATCHDOG_USEC`), halved.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    Some(Duration::from_micros(usec / 2))
}

/// Becomes `user` (its uid, gid and groups) when running as root.
#[cfg(unix)]
pub fn become_user(user: &str) -> Result<(), String> {
    if !is_root() {
        return Err(format!(
            "--user {user}: only root can change user; start as root or drop --user"
        ));
    }
    let name = std::ffi::CString::new(user).map_err(|_| format!("bad user name '{user}'"))?;
    // SAFETY: getpwnam returns a pointer to static storage or NULL; we read it at
    // once, before any other call that could overwrite it.
    let (uid, gid) = unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        if pw.is_null() {
            return Err(format!("--user {user}: no such user"));
        }
        ((*pw).pw_uid, (*pw).pw_gid)
    };
    // SAFETY: plain system calls on our own process; each result is checked.
    let failed = unsafe {
        libc::initgroups(name.as_ptr(), gid) != 0
            || libc::setgid(gid) != 0
            || libc::setuid(uid) != 0
    };
    if failed {
        return Err(format!(
            "--user {user}: cannot change user: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
