//! Integration tests of `tokend`: one test binary that runs the real daemon (see [`util`])
//! against a strict fake of Atlassian's OAuth endpoints (see [`fake`]).
//!
//! Run with `cargo test --test it`. The daemon tests need root for the tests that switch
//! users (`TestDaemon::cli_as`).

mod api;
mod chain;
mod fake;
mod fake_selftest;
mod util;
