//! Outside-in benchmarks of issue 15: the real release `tokend` binary, a real Unix socket,
//! a load generator in this process, and a baseline measured in the same run (a ratio).
//!
//! ```sh
//! cargo bench --bench outside            # every scenario
//! cargo bench --bench outside -- token   # or storm, scale, pg (several may be named)
//! TOKEND_BENCH_QUICK=1 cargo bench --bench outside   # a smoke run: short and small
//! ```
//!
//! `cargo bench` builds the package's binary beside the bench, in the bench profile (which
//! inherits every setting of the release profile: opt-level "s", fat LTO, one codegen
//! unit), and the bench runs that `<target dir>/release/tokend` (`CARGO_BIN_EXE_tokend`);
//! `TOKEND_BENCH_BIN=PATH` runs another binary instead (a copy of an older build, to
//! compare two builds in one sitting).
//! Results are markdown tables on stdout (progress on stderr); BENCHMARKS.md records them.
//!
//! - `token` (goal 1, [`token`]): cached-token round trips of `GET
//!   /v1/connections/<label>/token` and `GET /v1/token?site=` at 1, 16 and 64 clients,
//!   alternating round by round with a bare hyper server ([`bare`], a child process: this
//!   binary re-executed with a hidden argument) answering a body of the same size.
//! - `storm` (goal 2, [`storm`]): 10,000 chains due at once, the fake answering in 20 ms,
//!   `max_concurrent = 64`: rotations per second against the provider bound and against the
//!   ledger's durable commit rate, and no chain lost.
//! - `scale` (goals 3, 4, [`scale`]): ledgers of 1k, 10k and 100k connections: start-up, RSS,
//!   `list --json`, `/metrics`, `/v1/health`, and `?site=` against by-label throughput.
//! - `pg` (issue 14, [`pg`]): on a throw-away PostgreSQL cluster (`src/testpg.rs`), the
//!   cached token on a PostgreSQL-backed daemon against a SQLite-backed one, and the storm on
//!   SQLite, on PostgreSQL with one daemon and with three sharing the ledger; skipped (said
//!   so) without a PostgreSQL server.
//!
//! Environment: `TOKEND_BENCH_QUICK=1` (1 s windows after 0.5 s warm-up, one round, 2,000
//! storm chains, ledgers of 1k and 10k), `TOKEND_BENCH_SECS` (measured window, default 5),
//! `TOKEND_BENCH_ROUNDS` (default 3), `TOKEND_BENCH_SCALE` (the scale scenario's ledger
//! sizes, comma-separated, e.g. `10000,100000`: one point alone, or two for a per-connection
//! figure).
//!
//! The provider is the strict fake of the integration tests (`tests/it/fake/`), on
//! loopback; nothing reaches the internet. Of tokend's library only `tokend::ledger::seal`
//! is used (sealing seeded tokens, as the integration tests do). Every child process is
//! killed on every exit path (guards with `Drop`); every file lives in temp directories.

// Wall-clock measurements of real processes: the std clock is the right one here.
#![allow(clippy::disallowed_types)]

#[path = "../tests/it/fake/mod.rs"]
#[allow(dead_code)]
mod fake;

#[path = "outside/bare.rs"]
mod bare;
#[path = "outside/client.rs"]
mod client;
#[path = "outside/daemon.rs"]
mod daemon;
#[path = "outside/maint.rs"]
mod maint;
#[path = "outside/pg.rs"]
mod pg;
#[path = "outside/scale.rs"]
mod scale;
#[path = "outside/seed.rs"]
mod seed;
#[path = "outside/sites.rs"]
mod sites;
#[path = "outside/storm.rs"]
mod storm;
#[path = "outside/token.rs"]
mod token;
// The throw-away PostgreSQL cluster of the tests, for the `pg` scenario.
#[path = "../src/testpg.rs"]
mod testpg;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Every scenario, in the order a run without arguments takes them.
const SCENARIOS: [&str; 6] = ["token", "storm", "scale", "sites", "maint", "pg"];

/// Default measured window of one load run.
const MEASURE: Duration = Duration::from_secs(5);
/// Default warm-up before it (connections open, caches and allocators warm).
const WARMUP: Duration = Duration::from_secs(1);
/// Default rounds per target; the median round is reported.
const ROUNDS: usize = 3;
/// Chains of the storm scenario (issue 15).
const STORM_CHAINS: usize = 10_000;
/// Ledger sizes of the scale scenario (issue 15).
const SCALE_SIZES: [usize; 3] = [1_000, 10_000, 100_000];
/// How long the scale scenario leaves a started daemon idle before it reads the RSS again:
/// the issue's report saw the RSS grow by half in the first minute after start.
const IDLE: Duration = Duration::from_secs(60);

/// What every scenario needs: the binary and the run's sizes and durations.
pub struct Config {
    pub bin: PathBuf,
    pub warmup: Duration,
    pub measure: Duration,
    pub rounds: usize,
    pub storm_chains: usize,
    pub scale_sizes: Vec<usize>,
    pub idle: Duration,
}

impl Config {
    fn from_env(bin: PathBuf) -> Result<Config> {
        let quick = std::env::var("TOKEND_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let mut cfg = if quick {
            Config {
                bin,
                warmup: Duration::from_millis(500),
                measure: Duration::from_secs(1),
                rounds: 1,
                storm_chains: 2_000,
                scale_sizes: vec![1_000, 10_000],
                idle: Duration::from_secs(5),
            }
        } else {
            Config {
                bin,
                warmup: WARMUP,
                measure: MEASURE,
                rounds: ROUNDS,
                storm_chains: STORM_CHAINS,
                scale_sizes: SCALE_SIZES.to_vec(),
                idle: IDLE,
            }
        };
        if let Ok(v) = std::env::var("TOKEND_BENCH_SECS") {
            let secs: f64 = v.parse().context("TOKEND_BENCH_SECS must be a number")?;
            if !(secs > 0.0 && secs < 3600.0) {
                bail!("TOKEND_BENCH_SECS must be between 0 and 3600");
            }
            cfg.measure = Duration::from_secs_f64(secs);
        }
        if let Ok(v) = std::env::var("TOKEND_BENCH_SCALE") {
            cfg.scale_sizes = v
                .split(',')
                .map(|n| n.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .context("TOKEND_BENCH_SCALE must be sizes separated by commas")?;
            if cfg.scale_sizes.is_empty() || cfg.scale_sizes.contains(&0) {
                bail!("TOKEND_BENCH_SCALE must name sizes of at least 1");
            }
        }
        if let Ok(v) = std::env::var("TOKEND_BENCH_IDLE") {
            let secs: f64 = v.parse().context("TOKEND_BENCH_IDLE must be a number")?;
            if !(0.0..3600.0).contains(&secs) {
                bail!("TOKEND_BENCH_IDLE must be between 0 and 3600");
            }
            cfg.idle = Duration::from_secs_f64(secs);
        }
        if let Ok(v) = std::env::var("TOKEND_BENCH_ROUNDS") {
            cfg.rounds = v.parse().context("TOKEND_BENCH_ROUNDS must be a number")?;
            if cfg.rounds == 0 {
                bail!("TOKEND_BENCH_ROUNDS must be at least 1");
            }
        }
        Ok(cfg)
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(bare::CHILD_ARG) {
        return bare::child_main(&args[1..]);
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The scenarios named on the command line (cargo's own `--bench` flag and any other
/// option are ignored), or all of them.
fn selected(args: &[String]) -> Result<Vec<&'static str>> {
    let mut chosen = Vec::new();
    for a in args.iter().filter(|a| !a.starts_with('-')) {
        let Some(s) = SCENARIOS.iter().find(|s| **s == a.as_str()) else {
            bail!(
                "unknown scenario {a:?}; choose among {}",
                SCENARIOS.join(", ")
            );
        };
        if !chosen.contains(s) {
            chosen.push(*s);
        }
    }
    if chosen.is_empty() {
        chosen = SCENARIOS.to_vec();
    }
    Ok(chosen)
}

fn run(args: &[String]) -> Result<()> {
    let scenarios = selected(args)?;
    let bin = daemon::tokend_binary()?;
    let cfg = Config::from_env(bin)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the bench's tokio runtime")?;
    println!(
        "# tokend outside-in benchmark ({}; {} cores; binary {})",
        scenarios.join(", "),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cfg.bin.display()
    );
    for s in scenarios {
        rt.block_on(async {
            match s {
                "token" => token::run(&cfg).await,
                "storm" => storm::run(&cfg).await,
                "scale" => scale::run(&cfg).await,
                "sites" => sites::run(&cfg).await,
                "maint" => maint::run(&cfg).await,
                "pg" => pg::run(&cfg).await,
                _ => unreachable!("selected() only returns known scenarios"),
            }
        })
        .with_context(|| format!("scenario {s}"))?;
    }
    Ok(())
}

/// Requests (or rotations) per second, rounded to a whole number with thousands separators.
pub fn fmt_rate(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Microseconds, as µs below 10 ms and as ms above; `None` as "n/a".
pub fn fmt_us(us: Option<u32>) -> String {
    let Some(us) = us else {
        return "n/a".into();
    };
    if us < 10_000 {
        format!("{us} µs")
    } else {
        format!("{:.1} ms", f64::from(us) / 1000.0)
    }
}

/// Bytes as KiB or MiB.
pub fn fmt_bytes(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20))
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}
