//! The library's errors, each saying what failed, where, and why.

use crate::conflict::Conflict;
use crate::db::{ConnectError, pg_message};
use crate::ident::TableName;
use thiserror::Error;
use tokio_postgres::error::SqlState;

/// Which server a statement ran on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The master of a set.
    Master,
    /// A slave of a set.
    Slave,
}

/// Anything that stops a batch, a command or a slave.
#[derive(Debug, Error)]
pub enum Error {
    /// A config file, or what a command asked of it, cannot be used.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A server could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A statement failed on a server (outside of applying an event).
    #[error("{doing}: {}", pg_message(source))]
    Db {
        /// What pgreplica was doing.
        doing: String,
        /// The server, when known.
        side: Option<Side>,
        /// PostgreSQL's error, with its SQLSTATE.
        source: tokio_postgres::Error,
    },
    /// What a server or the log holds cannot be used as it is.
    #[error("{doing}: {message}")]
    Invalid {
        /// What pgreplica was doing.
        doing: String,
        /// What is wrong, and what to do.
        message: String,
    },
    /// Applying one event on a slave failed.
    #[error("table {table}, key {key}, event {event}: {}", pg_message(source))]
    Apply {
        /// The slave's table.
        table: TableName,
        /// The row's primary key, as `(col)=(value)`.
        key: String,
        /// The event's id in the master's log.
        event: i64,
        /// PostgreSQL's error.
        source: tokio_postgres::Error,
    },
    /// A set-based statement applying several events failed; which event it was
    /// is found by applying the batch again one event per statement.
    #[error(
        "table {table}, one of {events} events from event {first}: {}",
        pg_message(source)
    )]
    ApplyRun {
        /// The slave's table.
        table: TableName,
        /// Events in the statement.
        events: usize,
        /// The first event's id.
        first: i64,
        /// PostgreSQL's error.
        source: tokio_postgres::Error,
    },
    /// Master and slave disagree on a table's definition.
    #[error("table {table}: {message}")]
    Schema {
        /// The table.
        table: TableName,
        /// What differs and how to fix it.
        message: String,
    },
    /// A `[TABLE]` section's capture options were refused by the master.
    #[error("{path}:{line}: {message}")]
    Options {
        /// The config file.
        path: std::path::PathBuf,
        /// The section's line.
        line: usize,
        /// The master's reason, naming the table and the option.
        message: String,
    },
    /// A transform script failed or was stopped on a row; nothing of the batch
    /// is applied.
    #[error("table {table}, key {key}, event {event}: transform {message}")]
    Transform {
        /// The master table.
        table: TableName,
        /// The row's primary key, as `(col)=(value)`.
        key: String,
        /// The event's id in the master's log.
        event: i64,
        /// The script's file and line, and what went wrong.
        message: String,
    },
    /// A conflict the set waits for the DBA to resolve (policy `stop`, or
    /// one that policy `newest` could not judge), and why.
    #[error(
        "{0}; the slave stops here ({1}): see pgreplica conflicts CONF, and resolve it \
         with --resolve ID keep-local|apply-remote"
    )]
    Conflict(Box<Conflict>, &'static str),
    /// A batch took longer than `BATCH_TIMEOUT` (seconds) to apply.
    #[error(
        "applying a batch took longer than {0}s (BATCH_TIMEOUT): it was cancelled and is \
         retried; something on the slave holds it up (pg_stat_activity there shows what)"
    )]
    Slow(u64),
    /// A server did not answer in time, or its connection ended.
    #[error("connection to the {side} {what}")]
    Lost {
        /// The server.
        side: Side,
        /// What happened, e.g. "was lost".
        what: String,
    },
}

impl Error {
    /// The error without any row's values (keys, old and new rows, the
    /// server's detail): for places anyone who reaches them may read, such as
    /// `/status` without the token.
    pub fn without_values(&self) -> String {
        let code = |e: &tokio_postgres::Error| {
            e.code()
                .map(|c| format!("SQLSTATE {}", c.code()))
                .unwrap_or_else(|| "no SQLSTATE".into())
        };
        match self {
            Error::Db { doing, source, .. } => format!("{doing}: failed ({})", code(source)),
            Error::Apply {
                table,
                event,
                source,
                ..
            } => format!("table {table}, event {event}: failed ({})", code(source)),
            Error::ApplyRun {
                table,
                first,
                source,
                ..
            } => format!(
                "table {table}, events from {first}: failed ({})",
                code(source)
            ),
            Error::Transform { table, event, .. } => {
                format!("table {table}, event {event}: the transform script failed")
            }
            Error::Conflict(c, why) => format!(
                "conflict: {} on table {}, event {}; the slave stops here ({why})",
                c.kind, c.table, c.event
            ),
            other => other.to_string(),
        }
    }

    /// PostgreSQL's SQLSTATE of a failed statement, if that is what failed.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            Error::Db { source, .. }
            | Error::Apply { source, .. }
            | Error::ApplyRun { source, .. } => source.code(),
            _ => None,
        }
    }

    /// The server that failed, when known.
    pub fn side(&self) -> Option<Side> {
        match self {
            Error::Db { side, .. } => *side,
            Error::Apply { .. } | Error::ApplyRun { .. } | Error::Conflict(..) | Error::Slow(_) => {
                Some(Side::Slave)
            }
            Error::Lost { side, .. } => Some(*side),
            _ => None,
        }
    }
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Master => "master",
            Side::Slave => "slave",
        })
    }
}

/// Adds what was being done, and where, to a PostgreSQL error.
pub trait Context<T> {
    /// Wraps the error as [`Error::Db`] with `doing` as its context.
    fn doing(self, doing: &str) -> Result<T, Error>;
    /// Like `doing`, for a statement on the master.
    fn on_master(self, doing: &str) -> Result<T, Error>;
    /// Like `doing`, for a statement on a slave.
    fn on_slave(self, doing: &str) -> Result<T, Error>;
}

impl<T> Context<T> for Result<T, tokio_postgres::Error> {
    fn doing(self, doing: &str) -> Result<T, Error> {
        wrap(self, doing, None)
    }

    fn on_master(self, doing: &str) -> Result<T, Error> {
        wrap(self, doing, Some(Side::Master))
    }

    fn on_slave(self, doing: &str) -> Result<T, Error> {
        wrap(self, doing, Some(Side::Slave))
    }
}

fn wrap<T>(
    result: Result<T, tokio_postgres::Error>,
    doing: &str,
    side: Option<Side>,
) -> Result<T, Error> {
    result.map_err(|source| Error::Db {
        doing: doing.to_string(),
        side,
        source,
    })
}
