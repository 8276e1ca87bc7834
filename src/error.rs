//! The library's errors, each saying what failed and where.

use crate::db::{ConnectError, pg_message};
use crate::ident::TableName;
use thiserror::Error;

/// Anything that stops a batch, a command or a slave.
#[derive(Debug, Error)]
pub enum Error {
    /// A server could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A statement failed outside of applying an event.
    #[error("{doing}: {message}")]
    Query {
        /// What pgreplica was doing.
        doing: String,
        /// PostgreSQL's message.
        message: String,
    },
    /// Applying one event on a slave failed.
    #[error("table {table}, key {key}, event {event}: {message}")]
    Apply {
        /// The slave's table.
        table: TableName,
        /// The row's primary key, as `(col)=(value)`.
        key: String,
        /// The event's id in the master's log.
        event: i64,
        /// PostgreSQL's message.
        message: String,
    },
    /// A set-based statement applying several events failed; which event it was
    /// is found by applying the batch again one event per statement.
    #[error("table {table}, one of {events} events from event {first}: {message}")]
    ApplyRun {
        /// The slave's table.
        table: TableName,
        /// Events in the statement.
        events: usize,
        /// The first event's id.
        first: i64,
        /// PostgreSQL's message.
        message: String,
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
    /// A conflict under policy `stop`: the set waits for the DBA.
    #[error(
        "{0}; the slave stops here (CONFLICT=stop): see pgreplica conflicts CONF, and resolve it \
         with --resolve ID keep-local|apply-remote"
    )]
    Conflict(Box<crate::conflict::Conflict>),
    /// A server connection ended while waiting for notifications.
    #[error("connection to the {0} was lost")]
    Lost(&'static str),
}

/// Adds what was being done to a PostgreSQL error.
pub trait Context<T> {
    /// Wraps the error as `Error::Query` with `doing` as its context.
    fn doing(self, doing: &str) -> Result<T, Error>;
}

impl<T> Context<T> for Result<T, tokio_postgres::Error> {
    fn doing(self, doing: &str) -> Result<T, Error> {
        self.map_err(|e| Error::Query {
            doing: doing.to_string(),
            message: pg_message(&e),
        })
    }
}
