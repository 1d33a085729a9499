//! tokend keeps Atlassian OAuth 2.0 (3LO) refresh-token chains alive and hands fresh access
//! tokens to local services over a Unix socket.
//!
//! The binary (`src/main.rs`) is a thin shell over this library: it parses the command line
//! (clap) and [`cli`] runs the command, `config` turns `daemon.toml` into a validated
//! `config::Config`, and `daemon` wires the ledger, the provider client, the refresh engine
//! and the socket API together. See `ARCHITECTURE.md` for the code map and the invariants.
//!
//! Visibility: the library's outside is the binary, the integration tests (`tests/it/`) and
//! the outside bench (`benches/outside*`); nothing else links it. Only the three modules they
//! reach are `pub`, each narrowed inside to what they use ([`cli`] for the binary; two
//! constants of [`api::server`], and [`ledger::seal`], [`ledger::MIGRATIONS`] and
//! [`ledger::PgLedger`] for the tests and the bench); every other module is `pub(crate)`, so
//! that the compiler reports dead code in it. (The records `PgLedger::load_all` answers are
//! public types of the `pub(crate)` module `model`: usable outside, not nameable.)

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

// Public for `tests/it/api.rs` only: the socket's per-uid share and body timeout
// (`api::server::{BODY_READ_TIMEOUT, MAX_CONNECTIONS_PER_UID}`); the rest is `pub(crate)`.
pub mod api;
pub(crate) mod audit;
// Public for the binary: `src/main.rs` parses the command line into a `cli::Action` and calls
// `cli::run` (also `cli::exit`, `cli::env_socket`, `cli::daemon_toml_page`).
pub mod cli;
pub(crate) mod client;
pub(crate) mod config;
pub(crate) mod daemon;
pub(crate) mod jobs;
#[cfg(test)]
mod layering;
// Public for the integration tests and the outside bench, which read and write a ledger
// beside the daemon: `ledger::seal` (the key file and the sealing of token columns),
// `ledger::MIGRATIONS` (the released SQLite schema) and `ledger::PgLedger` (a PostgreSQL
// ledger read back after `migrate-ledger`); the rest is `pub(crate)`.
pub mod ledger;
pub(crate) mod metrics;
pub(crate) mod model;
pub(crate) mod notify;
pub(crate) mod provider;
pub(crate) mod refresh;
pub(crate) mod secret;
pub(crate) mod serve;
pub(crate) mod systemd;
#[cfg(test)]
mod testpg;
pub(crate) mod wire;
