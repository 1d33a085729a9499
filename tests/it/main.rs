//! Integration tests of `tokend`: one test binary that runs the real daemon (see [`util`])
//! against a strict fake of Atlassian's OAuth endpoints (see [`fake`]).
//!
//! Run with `cargo test --test it`. Tests that switch users (`TestDaemon::cli_as`) or mount
//! a small tmpfs to fill the disk need root, as CI has.

// The tests measure real time around real processes; the std clock is the right one here.
#![allow(clippy::disallowed_types)]

mod api;
mod audit;
mod chain;
mod chaos;
mod crypt;
mod engine;
mod fake;
mod fake_selftest;
mod fuzz;
mod keeper;
mod migrate;
mod ops;
mod shared;
mod util;
