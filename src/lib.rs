//! pgreplica: trigger-based asynchronous replication for PostgreSQL.
//!
//! The data flow reads from the modules: `capture` installs the log on a master,
//! `batch` cuts it into snapshot-consistent batches, `apply` applies a batch on a
//! slave together with its progress, `daemon` runs it all; `config` and `db` read
//! the files and connection strings, `status` reports.

pub mod adapt;
pub mod apply;
pub mod batch;
pub mod capture;
pub mod check;
pub mod clone;
pub mod cluster;
pub mod config;
pub mod conflict;
pub mod daemon;
pub mod db;
pub mod demo;
pub mod error;
pub mod http;
pub mod ident;
pub mod mail;
pub mod metrics;
pub mod progress;
pub mod record;
pub mod sequence;
pub mod service;
pub mod status;
pub mod transform;

pub use config::Config;
pub use error::Error;
