//! `maint`: maintenance over a large ledger with a long history (issue 15, goal 3: "the
//! events table bounded ... so that maintenance never holds the ledger for more than a few
//! milliseconds").
//!
//! The largest `TOKEND_BENCH_SCALE` size of connections (100,000 by default), nothing due,
//! and an events table seeded with [`OLD_EVENTS`] events older than the retention (spread
//! over the connections) and [`HOT`] connections of [`HOT_EVENTS`] recent events each,
//! over the per-connection bound. The daemon starts with `maintenance` set to fire once, a
//! few seconds later. Meanwhile the bench asks the daemon to refresh one connection (a chain
//! the fake knows), one request after another (`POST /v1/connections/maint-0/refresh`): each
//! is a provider call and two commits (the attempt's marker and its result) through the
//! ledger's one writer, which maintenance's transactions share, so a request waits for
//! whatever maintenance transaction holds the ledger when it commits. Its latencies while
//! maintenance runs are reported beside its latencies before it started (the baseline: the
//! same requests on an idle daemon); the difference is what maintenance held the ledger for.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Config;
use crate::client::Conn;
use crate::daemon::{Daemon, Settings};
use crate::fake::FakeAtlassian;
use crate::seed::{self, Row};

/// Events older than the retention (400 days), spread over the connections.
const OLD_EVENTS: usize = 500_000;
/// Connections with more recent events than the per-connection bound (10,000).
const HOT: usize = 10;
/// Recent events of each hot connection: 2,000 over the bound.
const HOT_EVENTS: usize = 12_000;
/// The connection the probe refreshes (row 0, its chain registered with the fake).
const PROBE: &str = "/v1/connections/maint-0/refresh";
/// How long the probe runs before maintenance fires: the baseline.
const BASELINE: Duration = Duration::from_secs(3);
/// From the daemon's creation to the baseline's start: its start-up (about a second at
/// 100k) and what follows it (the first requests' allocations, the planner's first pass),
/// which a baseline should not include.
const SETTLE: Duration = Duration::from_secs(5);
/// How long maintenance may take before the bench gives up.
const GIVE_UP: Duration = Duration::from_secs(600);
const DAY_MS: i64 = 86_400 * 1000;
/// Durable single-row commits of the baseline: what one transaction of the ledger holds it
/// for at the least on this disk (its `COMMIT`'s sync), timed one after another on the
/// round's own ledger once the daemon has stopped.
const FLOOR_COMMITS: usize = 500;

fn rows(n: usize, probe_rt: &str) -> Vec<Row> {
    let now = seed::now_ms();
    (0..n)
        .map(|i| Row {
            id: seed::id_of(i),
            label: format!("maint-{i}"),
            account: format!("maint-account-{i}"),
            refresh_token: if i == 0 {
                probe_rt.to_owned()
            } else {
                format!("rt-maint-{i:031x}")
            },
            access: None,
            sites: Vec::new(),
            rotated_at_ms: now - 60 * 1000,
        })
        .collect()
}

/// Inserts the old and the hot events in one transaction.
fn seed_events(db: &mut rusqlite::Connection, n: usize) -> Result<usize> {
    let now = seed::now_ms();
    let tx = db.transaction()?;
    {
        let mut ins = tx
            .prepare(
                "INSERT INTO events (at, connection_id, kind, message, node, peer_uid, \
                 peer_pid, count) VALUES (?1, ?2, 'token_read', '', 'bench', 1000, NULL, 1)",
            )
            .context("prepare the event insert (did the schema in src/ledger/mod.rs change?)")?;
        for k in 0..OLD_EVENTS {
            let at = now - 500 * DAY_MS + (k as i64) * 1000;
            ins.execute(rusqlite::params![at, seed::id_of(k % n)])?;
        }
        for h in 0..HOT {
            let id = seed::id_of(h * (n / HOT));
            for k in 0..HOT_EVENTS {
                let at = now - DAY_MS + (k as i64) * 1000;
                ins.execute(rusqlite::params![at, id])?;
            }
        }
    }
    tx.commit()?;
    // The seeding's one large transaction leaves a WAL file of 120 MB, which a ledger the
    // daemon wrote would not have (it cuts its WAL back to 8 MiB): start from a ledger as
    // the daemon leaves it.
    db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(OLD_EVENTS + HOT * HOT_EVENTS)
}

fn count_events(db: &rusqlite::Connection) -> Result<i64> {
    Ok(db.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?)
}

/// [`FLOOR_COMMITS`] durable single-row commits one after another, each timed, sorted.
fn commit_floor(
    db: &mut rusqlite::Connection,
    state_dir: &std::path::Path,
) -> Result<Vec<Duration>> {
    let keys = seed::keyring(state_dir)?;
    let mut times = Vec::with_capacity(FLOOR_COMMITS);
    for k in 0..FLOOR_COMMITS {
        let t = Instant::now();
        crate::storm::commit_one(db, &keys, &seed::id_of(1 + k), k)?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times)
}

/// A percentile of sorted waits.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// What one round measured.
struct Round {
    base: Vec<Duration>,
    during: Vec<Duration>,
    events_before: i64,
    pruned: i64,
    took: Duration,
    /// The daemon's own account (its `maintenance ran` log line): transactions, the longest
    /// any of them held the ledger, and the final checkpoint's hold, in ms.
    transactions: String,
    p99_hold_ms: String,
    longest_hold_ms: String,
    checkpoint_ms: String,
    checkpoint_tries: String,
    /// The baseline: lone durable commits on the same ledger, sorted.
    floor: Vec<Duration>,
}

/// A `key=value` field of the daemon's `maintenance ran` line ("n/a" from a binary that
/// does not log it, for comparisons with older ones).
fn logged(log: &str, key: &str) -> String {
    logged_field(log, key).unwrap_or_else(|_| "n/a".into())
}

fn logged_field(log: &str, key: &str) -> Result<String> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("maintenance ran"))
        .context("the daemon logged no `maintenance ran`")?;
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .map(str::to_owned)
        .with_context(|| format!("`maintenance ran` has no {key}: {line}"))
}

pub async fn run(cfg: &Config) -> Result<()> {
    let n = *cfg.scale_sizes.iter().max().context("no scale size")?;
    let mut rounds = Vec::new();
    for r in 0..cfg.rounds {
        eprintln!(
            "bench maint: round {} of {}, {n} connections",
            r + 1,
            cfg.rounds
        );
        rounds.push(round(cfg, n).await?);
    }
    let events = rounds.first().map_or(0, |r| r.events_before);
    println!(
        "\n## maint: maintenance over {n} connections and {events} events (the probe: `POST {PROBE}`, one after another)\n"
    );
    println!(
        "| round | probe p50 before / during | p99 before / during | longest before / during | daemon: transactions | p99 hold | longest hold | final checkpoint (tries) | baseline: lone commit p50 / p99 / longest | p99 hold ÷ commit p99 | pruned | took |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, r) in rounds.iter().enumerate() {
        let (b, d) = (&r.base, &r.during);
        println!(
            "| {} | {} / {} | {} / {} | {} / {} | {} | {} ms | {} ms | {} ms ({}) | {} / {} / {} | {} | {} | {:.2} s |",
            i + 1,
            ms(pct(b, 0.5)),
            ms(pct(d, 0.5)),
            ms(pct(b, 0.99)),
            ms(pct(d, 0.99)),
            ms(b.last().copied().unwrap_or_default()),
            ms(d.last().copied().unwrap_or_default()),
            r.transactions,
            r.p99_hold_ms,
            r.longest_hold_ms,
            r.checkpoint_ms,
            r.checkpoint_tries,
            ms(pct(&r.floor, 0.5)),
            ms(pct(&r.floor, 0.99)),
            ms(r.floor.last().copied().unwrap_or_default()),
            r.p99_hold_ms
                .parse::<f64>()
                .map_or("n/a".into(), |h| format!(
                    "{:.2}",
                    h / (pct(&r.floor, 0.99).as_secs_f64() * 1000.0)
                )),
            r.pruned,
            r.took.as_secs_f64(),
        );
    }
    println!(
        "\nProbe: {} refreshes before and {} during, over all rounds. Took: from the cron second to the scrape that saw maintenance done.",
        rounds.iter().map(|r| r.base.len()).sum::<usize>(),
        rounds.iter().map(|r| r.during.len()).sum::<usize>(),
    );
    Ok(())
}

/// One daemon, seeded, its maintenance run once under the probe.
async fn round(cfg: &Config, n: usize) -> Result<Round> {
    let fake = FakeAtlassian::start();
    let mut daemon = Daemon::created(&cfg.bin, &fake, &Settings::nothing_due()).await?;
    let probe_rt = fake.issue_grant("maint-account-0", &[]);
    seed::seed(&daemon.state_dir(), &rows(n, &probe_rt))?;
    let path = daemon.ledger_path();
    let mut db = seed::open_like_daemon(&path)?;
    let seeded = seed_events(&mut db, n)?;
    let before = count_events(&db)?;
    eprintln!("bench maint: {seeded} events seeded");
    let at = daemon.fire_job_once("maintenance", SETTLE + BASELINE)?;
    daemon.start().await?;
    let fire = Instant::now()
        + (at - chrono::Utc::now())
            .to_std()
            .context("maintenance fires in the past: start-up took too long")?;

    // The probe: refreshes of one connection, one after another, until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let stop = stop.clone();
        let socket = daemon.socket().to_path_buf();
        tokio::spawn(async move {
            let mut c = Conn::unix(&socket).await?;
            let mut waits = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let a = c.request(hyper::Method::POST, PROBE, None).await?;
                if a.status != 200 {
                    bail!("POST {PROBE} answered {}: {}", a.status, a.text());
                }
                waits.push((t, t.elapsed()));
            }
            anyhow::Ok(waits)
        })
    };
    daemon
        .job_succeeded("maintenance", Duration::from_millis(100), GIVE_UP)
        .await?;
    let done = Instant::now();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let waits = probe.await.context("the probe panicked")??;
    daemon.stop().await?;
    let after = count_events(&db)?;
    let floor = commit_floor(&mut db, &daemon.state_dir())?;
    // Maintenance ran from the cron's second (the scheduler polls every 500 ms) to the scrape
    // that saw its success.
    let split = |from: Instant, to: Instant| {
        let mut w: Vec<Duration> = waits
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, d)| *d)
            .collect();
        w.sort();
        w
    };
    let base = split(fire - BASELINE, fire);
    let during = split(fire, done);
    let log = daemon.log_text();
    for line in log.lines().filter(|l| l.contains("maintenance ran")) {
        eprintln!("bench maint: the daemon logged: {line}");
    }
    // What maintenance must have done: no event older than the retention is left, and every
    // hot connection but the probe's (which gains events from the refreshes) keeps exactly
    // its bound. (`after` includes the events the probe's refreshes added.)
    let old: i64 = db.query_row(
        "SELECT count(*) FROM events WHERE at < ?1",
        [seed::now_ms() - 400 * DAY_MS],
        |r| r.get(0),
    )?;
    if old != 0 {
        bail!("{old} events older than the retention are left");
    }
    for h in 1..HOT {
        let kept: i64 = db.query_row(
            "SELECT count(*) FROM events WHERE connection_id = ?1",
            [seed::id_of(h * (n / HOT))],
            |r| r.get(0),
        )?;
        if kept != 10_000 {
            bail!("a hot connection kept {kept} events, not 10000");
        }
    }
    Ok(Round {
        base,
        during,
        events_before: before,
        pruned: before - after,
        took: done - fire,
        transactions: logged(&log, "transactions"),
        p99_hold_ms: logged(&log, "p99_hold_ms"),
        longest_hold_ms: logged(&log, "longest_hold_ms"),
        checkpoint_ms: logged(&log, "checkpoint_ms"),
        checkpoint_tries: logged(&log, "checkpoint_tries"),
        floor,
    })
}
