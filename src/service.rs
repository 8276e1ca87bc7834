//! Running as a service: pidfile, log file that can be reopened, and systemd's
//! readiness and watchdog notifications (`Type=notify`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The default pidfile: `/run/pgreplica/pgreplica.pid` for root, else in
/// `~/.pgreplica/`.
pub fn default_pidfile() -> PathBuf {
    home_or_system("/run/pgreplica/pgreplica.pid", "pgreplica.pid")
}

/// The default log file of `pgreplica start`.
pub fn default_logfile() -> PathBuf {
    home_or_system("/var/log/pgreplica/pgreplica.log", "pgreplica.log")
}

/// Creates `path`'s folder when missing; returns it when it was made now, to
/// be given to the user the daemon runs as.
fn make_folder(path: &Path) -> std::io::Result<Option<PathBuf>> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.exists() => {
            std::fs::create_dir_all(dir)?;
            Ok(Some(dir.to_path_buf()))
        }
        _ => Ok(None),
    }
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

/// The pid of the daemon that holds `pidfile` locked, and whether a stale
/// file (no daemon holds it) was found. Only a running daemon holds the lock,
/// so no other process that happens to have that pid is ever taken for it.
pub fn running(pidfile: &Path) -> (Option<u32>, bool) {
    let Ok(file) = File::open(pidfile) else {
        return (None, false);
    };
    if lock(&file, false) {
        return (None, true);
    }
    let pid = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok());
    (pid, false)
}

/// Takes `file`'s lock without waiting, shared or exclusive; whether it was free.
fn lock(file: &File, exclusive: bool) -> bool {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let how = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on a descriptor we own; the lock ends when it closes.
        unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) == 0 }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, exclusive);
        true
    }
}

/// The pidfile of a running daemon, locked while it runs and removed when
/// dropped.
pub struct PidFile {
    path: PathBuf,
    _file: File,
    made: Option<PathBuf>,
}

impl PidFile {
    /// Writes our pid under the file's lock, refusing when another daemon
    /// holds it.
    pub fn create(path: &Path) -> Result<PidFile, String> {
        let made = make_folder(path)
            .map_err(|e| format!("cannot create the pidfile's folder {}: {e}", path.display()))?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| format!("cannot write the pidfile {}: {e}", path.display()))?;
        if !lock(&file, true) {
            let pid = std::fs::read_to_string(path).unwrap_or_default();
            return Err(format!(
                "pgreplica is already running (pid {}, pidfile {})",
                pid.trim(),
                path.display()
            ));
        }
        file.set_len(0)
            .and_then(|_| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .map_err(|e| format!("cannot write the pidfile {}: {e}", path.display()))?;
        Ok(PidFile {
            path: path.to_path_buf(),
            _file: file,
            made,
        })
    }

    /// What the daemon's user must own: the file, and its folder if made now.
    pub fn owned(&self) -> Vec<PathBuf> {
        std::iter::once(self.path.clone())
            .chain(self.made.clone())
            .collect()
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A log file shared by every log line, reopened on SIGHUP (after logrotate
/// moved it away).
#[derive(Clone)]
pub struct LogFile {
    path: PathBuf,
    file: Arc<Mutex<File>>,
    made: Option<PathBuf>,
}

impl LogFile {
    /// Opens (appends to) `path`, creating its folder.
    pub fn open(path: &Path) -> std::io::Result<LogFile> {
        let made = make_folder(path)?;
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(LogFile {
            path: path.to_path_buf(),
            file: Arc::new(Mutex::new(file)),
            made,
        })
    }

    /// What the daemon's user must own to reopen the file after logrotate:
    /// the file, and its folder if made now.
    pub fn owned(&self) -> Vec<PathBuf> {
        std::iter::once(self.path.clone())
            .chain(self.made.clone())
            .collect()
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

/// Becomes `user` (its uid, gid and groups) when running as root, after
/// giving it `owned` (the pidfile, the log file, the folders made for them);
/// `HOME`, `USER` and `LOGNAME` become the user's, so that libpq's files
/// (`~/.pgpass`, `~/.postgresql/`) are its own.
#[cfg(unix)]
pub fn become_user(user: &str, owned: &[PathBuf]) -> Result<(), String> {
    if !is_root() {
        return Err(format!(
            "--user {user}: only root can change user; start as root or drop --user"
        ));
    }
    let name = std::ffi::CString::new(user).map_err(|_| format!("bad user name '{user}'"))?;
    // SAFETY: getpwnam returns a pointer to static storage or NULL; we read it at
    // once, before any other call that could overwrite it.
    let (uid, gid, home) = unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        if pw.is_null() {
            return Err(format!("--user {user}: no such user"));
        }
        let home = std::ffi::CStr::from_ptr((*pw).pw_dir)
            .to_string_lossy()
            .into_owned();
        ((*pw).pw_uid, (*pw).pw_gid, home)
    };
    for path in owned {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|e| format!("--user {user}: cannot give it {}: {e}", path.display()))?;
    }
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
    // SAFETY: called once at start-up, before the daemon's tasks run; nothing
    // reads the environment concurrently.
    unsafe {
        std::env::set_var("HOME", home);
        std::env::set_var("USER", user);
        std::env::set_var("LOGNAME", user);
    }
    Ok(())
}
