//! tokend keeps Atlassian OAuth 2.0 (3LO) refresh-token chains alive and hands fresh access
//! tokens to local services over a Unix socket.
//!
//! The binary (`src/main.rs`) is a thin shell over this library: it parses the command line
//! (clap) and [`cli`] runs the command, [`config`] turns `daemon.toml` into a validated
//! [`config::Config`], and `daemon` wires the ledger, the provider client, the refresh engine and the socket API
//! together. See `ARCHITECTURE.md` for the code map and the invariants.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod api;
pub mod audit;
pub mod cli;
pub(crate) mod client;
pub mod config;
pub(crate) mod daemon;
pub mod jobs;
#[cfg(test)]
mod layering;
pub mod ledger;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod provider;
pub mod refresh;
pub mod secret;
pub(crate) mod serve;
pub(crate) mod systemd;
#[cfg(test)]
mod testpg;
pub(crate) mod wire;
