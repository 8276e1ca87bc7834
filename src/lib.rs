//! pgreplica: trigger-based asynchronous replication for PostgreSQL.
//!
//! The data flow reads from the modules, bottom to top:
//!
//! - `event` (what travels), `config` (the set files), `db` (connections);
//! - `capture` installs the log on a master, `batch` reads it in
//!   snapshot-consistent batches, `adapt` renames and transforms rows, `apply`
//!   applies them on a slave; `slave` and `registry` are what pgreplica keeps
//!   on each side;
//! - `replicate` is one step of all of it, which `daemon` runs for every slave,
//!   and `clone`'s handover and `check` build on;
//! - `status`, `http`, `mail` and `metrics` report.
#![warn(missing_docs)]

pub mod adapt;
pub mod apply;
pub mod batch;
pub mod capture;
pub mod check;
pub mod clone;
pub mod config;
pub mod conflict;
pub mod daemon;
pub mod db;
pub mod demo;
pub mod dsn;
pub mod error;
pub mod event;
pub mod http;
pub mod hub;
pub mod ident;
pub mod mail;
pub mod meter;
pub mod metrics;
pub mod pgoutput;
pub mod programs;
pub mod record;
pub mod registry;
pub mod replicate;
pub mod sequence;
pub mod service;
pub mod slave;
pub mod status;
pub mod switchover;
pub mod throwaway;
pub mod tls;
pub mod transform;
pub mod wal;

pub use config::Config;
pub use error::Error;
