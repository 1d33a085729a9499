//! Scenario `storm` (issue 15, goal 2): many chains all due at once, the fake answering the
//! token endpoint in 20 ms, `refresh.max_concurrent = 64`.
//!
//! The daemon is started once on an empty state dir (it creates the ledger and its key) and
//! stopped; the bench registers every chain with the fake (`issue_grants`) and inserts the
//! rows in one transaction, rotated two hours ago with `rotate_after = "1h"` (the ±10 %
//! jitter keeps every one due). The daemon is started again and the ledger polled read-only
//! until every row's `refresh_token_rotated_at` is newer than the seed: the rotation rate is
//! chains / (last commit seen - first refresh request the fake saw), against the provider
//! bound (`max_concurrent / delay`). The second baseline is the commit rate alone: the bench
//! doing durable single-row `UPDATE` transactions on a copy of the seeded ledger with the
//! daemon's pragmas (an attempt commits twice: its marker, then the new chain). Last, no
//! chain may be lost: no reuse at the fake, every family alive, and every row's refresh
//! token (unsealed) the fake's current one.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rusqlite::params;
use tokend::ledger::seal::aad;

use crate::daemon::{Daemon, Settings};
use crate::fake::{FakeAtlassian, FakeSite};
use crate::seed::{self, Row};
use crate::{Config, fmt_rate};

/// The fake's answer time of the token endpoint.
const TOKEN_DELAY: Duration = Duration::from_millis(20);
/// `refresh.max_concurrent`.
const MAX_CONCURRENT: usize = 64;
/// How often the ledger is polled for progress.
const POLL: Duration = Duration::from_millis(20);
/// A storm that makes no progress for this long fails the bench.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the commit-rate baseline runs, after [`COMMIT_WARMUP`].
const COMMIT_RUN: Duration = Duration::from_secs(3);
/// Commits before the measured run, for at least [`COMMIT_WARMUP`]: the copy starts with an
/// empty WAL, and until it wraps around (the 1,000-page auto-checkpoint; one page per
/// commit here) every commit also extends the file, which is slower; the daemon's WAL has
/// long wrapped around by the middle of a storm.
const COMMIT_WARMUP_COMMITS: usize = 1_500;
/// The shortest warm-up of the commit-rate baseline.
const COMMIT_WARMUP: Duration = Duration::from_secs(1);
/// The longest: a disk this slow is reported as it is.
const COMMIT_WARMUP_MAX: Duration = Duration::from_secs(15);
/// Seeded rows were rotated this long ago (twice `rotate_after`).
const ROTATED_AGO_MS: i64 = 2 * 3600 * 1000;

pub async fn run(cfg: &Config) -> Result<()> {
    let n = cfg.storm_chains;
    eprintln!(
        "bench storm: {n} chains, token endpoint {TOKEN_DELAY:?}, max_concurrent {MAX_CONCURRENT}"
    );
    let fake = FakeAtlassian::start();
    let mut daemon = Daemon::new(
        &cfg.bin,
        &fake,
        &Settings {
            refresh: vec![
                ("rotate_after", "\"1h\"".into()),
                ("max_concurrent", MAX_CONCURRENT.to_string()),
                ("request_timeout", "\"30s\"".into()),
            ],
            metrics: false,
        },
    )?;
    daemon
        .start()
        .await
        .context("first start (creates the ledger)")?;
    daemon.stop().await?;

    let grants: Vec<(String, Vec<FakeSite>)> = (0..n)
        .map(|i| {
            (
                format!("storm-account-{i}"),
                vec![FakeSite::confluence(&format!("storm{i}"))],
            )
        })
        .collect();
    let tokens = fake.issue_grants(&grants);
    let rotated_at_ms = seed::now_ms() - ROTATED_AGO_MS;
    let rows: Vec<Row> = grants
        .iter()
        .zip(tokens)
        .enumerate()
        .map(|(i, ((account, sites), rt))| Row {
            id: seed::id_of(i),
            label: format!("storm-{i}"),
            account: account.clone(),
            refresh_token: rt,
            access: None,
            sites: sites.clone(),
            rotated_at_ms,
        })
        .collect();
    let seeded = seed::seed(&daemon.state_dir(), &rows)?;
    eprintln!("bench storm: seeded {n} rows in {seeded:.2?}");
    let copy = daemon.scratch("commit-baseline.db");
    std::fs::copy(daemon.ledger_path(), &copy).context("copy the seeded ledger")?;
    let wal = daemon.ledger_path().with_extension("db-wal");
    if wal.exists() {
        std::fs::copy(&wal, copy.with_extension("db-wal")).context("copy the seeded WAL")?;
    }

    fake.set_token_delay(TOKEN_DELAY);
    let (spawned, ready) = daemon.start().await?;
    let ro = rusqlite::Connection::open_with_flags(
        daemon.ledger_path(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    ro.busy_timeout(Duration::from_secs(5))?;
    let mut last_progress = (0usize, Instant::now());
    let done_at = loop {
        let rotated: i64 = ro.query_row(
            "SELECT count(*) FROM connections WHERE refresh_token_rotated_at > ?1",
            [rotated_at_ms],
            |r| r.get(0),
        )?;
        let rotated = rotated as usize;
        let now = Instant::now();
        if rotated >= n {
            break now;
        }
        if rotated > last_progress.0 {
            last_progress = (rotated, now);
        } else if now - last_progress.1 > STALL_TIMEOUT {
            bail!("storm stalled at {rotated}/{n} rotated for {STALL_TIMEOUT:?}");
        }
        tokio::time::sleep(POLL).await;
    };
    let log = fake.token_requests();
    let first = log
        .iter()
        .map(|r| r.at)
        .min()
        .context("no refresh request")?;
    let last = log
        .iter()
        .map(|r| r.at)
        .max()
        .context("no refresh request")?;
    let wall = done_at - first;
    let rate = n as f64 / wall.as_secs_f64();
    let provider_rate = if last > first {
        log.len() as f64 / (last - first).as_secs_f64()
    } else {
        f64::NAN
    };
    let bound = MAX_CONCURRENT as f64 / TOKEN_DELAY.as_secs_f64();

    // No chain lost: the fake saw no reuse, every family lives, the ledger holds each
    // family's current token.
    let keys = seed::keyring(&daemon.state_dir())?;
    let mut stmt = ro.prepare("SELECT id, refresh_token, status FROM connections")?;
    let stored: Vec<(String, String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut current = 0usize;
    let mut active = 0usize;
    let by_id: std::collections::HashMap<String, &str> = rows
        .iter()
        .map(|r| (r.id.clone(), r.account.as_str()))
        .collect();
    for (id, sealed, status) in &stored {
        active += usize::from(status == "active");
        let opened = keys
            .open(sealed, &aad(id, "refresh_token"))
            .map_err(|e| anyhow::anyhow!("cannot open the refresh token of {id}: {e}"))?;
        if let Some(account) = by_id.get(id)
            && fake.current_refresh_token(account).as_deref() == Some(opened.plaintext.as_str())
        {
            current += 1;
        }
    }
    drop(stmt);
    drop(ro);
    let alive = grants.iter().filter(|(a, _)| fake.family_alive(a)).count();
    let violations = fake.reuse_violations();
    let rotations = fake.total_rotations();
    daemon.stop().await?;

    let commits = commit_rate(&copy, &rows, &keys)?;

    println!();
    println!(
        "## storm: {n} chains due at once (token endpoint {} ms, max_concurrent {MAX_CONCURRENT})",
        TOKEN_DELAY.as_millis()
    );
    println!();
    println!("| measure | value |");
    println!("|---|---:|");
    println!(
        "| seed ({n} rows, one transaction) | {:.2} s |",
        seeded.as_secs_f64()
    );
    println!("| spawn → socket ready | {:.3} s |", ready.as_secs_f64());
    println!(
        "| spawn → first refresh request | {:.3} s |",
        (first.max(spawned) - spawned).as_secs_f64()
    );
    println!(
        "| first refresh request → all {n} committed | {:.2} s |",
        wall.as_secs_f64()
    );
    println!("| **rotations/s (committed)** | **{}** |", fmt_rate(rate));
    println!(
        "| refresh requests/s at the fake ({} requests) | {} |",
        log.len(),
        fmt_rate(provider_rate)
    );
    println!(
        "| provider bound ({MAX_CONCURRENT} / {} ms) | {} |",
        TOKEN_DELAY.as_millis(),
        fmt_rate(bound)
    );
    println!("| rotations/s ÷ provider bound | {:.2} |", rate / bound);
    println!(
        "| durable single-row UPDATE commits/s (bench, {} s) | {} |",
        COMMIT_RUN.as_secs(),
        fmt_rate(commits)
    );
    println!(
        "| rotations/s ÷ (commits/s ÷ 2) (marker + result per rotation) | {:.2} |",
        rate / (commits / 2.0)
    );
    println!("| rotations at the fake (one per chain expected) | {rotations} |");
    println!("| reuse violations at the fake | {violations} |");
    println!("| families alive | {alive}/{n} |");
    println!("| rows active, holding the fake's current token | {active}/{n}, {current}/{n} |");
    if violations > 0 || alive < n || current < n || active < n {
        bail!(
            "chains were lost: {violations} reuse violations, {alive}/{n} families alive, {current}/{n} rows current, {active}/{n} active"
        );
    }
    Ok(())
}

/// Durable single-row `UPDATE` transactions per second on a copy of the seeded ledger,
/// with the daemon's pragmas, for [`COMMIT_RUN`] after a warm-up: each writes a row's refresh token
/// (freshly sealed), its times and a new chain version, as a chain commit does.
fn commit_rate(
    path: &std::path::Path,
    rows: &[Row],
    keys: &tokend::ledger::seal::Keyring,
) -> Result<f64> {
    eprintln!("bench storm: commit-rate baseline on a copy of the ledger");
    let mut db = seed::open_like_daemon(path)?;
    let mut started = Instant::now();
    let mut commits = 0usize;
    let mut warm = false;
    loop {
        if !warm
            && started.elapsed() >= COMMIT_WARMUP
            && (commits >= COMMIT_WARMUP_COMMITS || started.elapsed() >= COMMIT_WARMUP_MAX)
        {
            warm = true;
            started = Instant::now();
            commits = 0;
        }
        if warm && started.elapsed() >= COMMIT_RUN {
            break;
        }
        let r = &rows[(commits * 7919) % rows.len()];
        let now = seed::now_ms();
        let sealed = keys.seal(
            &format!("rt-commit-{commits:026}"),
            &aad(&r.id, "refresh_token"),
        );
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE connections SET refresh_token = ?1, refresh_token_rotated_at = ?2, \
             refresh_token_used_at = ?2, updated_at = ?2, chain_version = chain_version + 1 \
             WHERE id = ?3",
            params![sealed, now, r.id],
        )?;
        tx.commit()?;
        commits += 1;
    }
    Ok(commits as f64 / started.elapsed().as_secs_f64())
}
