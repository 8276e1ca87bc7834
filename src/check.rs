//! `check`: compares master and slave.
