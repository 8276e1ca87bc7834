//! The command line's parts beside `main.rs`: its words, install, the role
//! changes, and how the daemon runs as a process.

pub mod args;
pub mod install;
pub mod print;
pub mod process;
pub mod roles;
