//! Scenario `scale` (issue 15, goals 3 and 4): what a large ledger costs, from outside.
//!
//! For each size the daemon is started once on an empty state dir and stopped, the ledger
//! seeded (one transaction) with connections that each hold an access token valid for an
//! hour, ~40-byte tokens, one site (odd rows two, on distinct hosts, so that `?site=` has
//! something to index) and a chain rotated a minute ago (`rotate_after = "7d"`: nothing is
//! due, the fake is never called). Then: spawn → first 200 of `/v1/health` (the median of
//! [`STARTS`] starts: one start is too noisy a figure); RSS (`VmRSS`)
//! after start and again after the daemon was left idle (`Config::idle`, a minute;
//! `TOKEND_BENCH_IDLE` seconds); `tokend list --json` wall time and bytes; a `/metrics` scrape (median of
//! three) and its bytes; RSS after both; `/v1/health` latency (median of sequential
//! requests on one connection); and `GET /v1/token?site=` against
//! `GET /v1/connections/<label>/token` at 16 clients (each client its own connection,
//! spread over the ledger), alternating, median round.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::client::{Conn, Load, closed_loop, median};
use crate::daemon::{Daemon, Settings};
use crate::fake::{FakeAtlassian, FakeSite};
use crate::seed::{self, Row};
use crate::{Config, fmt_bytes, fmt_rate, fmt_us};

/// Clients of the token-route comparison.
const CLIENTS: usize = 16;
/// Sequential `/v1/health` requests whose median is reported.
const HEALTH_SAMPLES: usize = 200;
/// `/metrics` scrapes whose median is reported.
const SCRAPES: usize = 3;
/// Starts of each seeded ledger whose median start-up is reported.
const STARTS: usize = 3;
/// Goal 3's allowance besides the tokens' own bytes: "RSS at most 64 MB plus the bytes of
/// the tokens themselves" (MB as 10^6 bytes, the stricter reading).
const RSS_ALLOWANCE: u64 = 64_000_000;

/// What one ledger size measured.
struct Measured {
    size: usize,
    seed: Duration,
    startup: Duration,
    rss_start: u64,
    rss_idle: u64,
    rss_after: u64,
    token_bytes: u64,
    list: Duration,
    list_bytes: usize,
    scrape: Duration,
    scrape_bytes: usize,
    health_us: u32,
    by_label: f64,
    by_site: f64,
    provider_requests: usize,
}

fn site_name(i: usize, second: bool) -> String {
    if second {
        format!("scale{i}x")
    } else {
        format!("scale{i}")
    }
}

fn rows(n: usize) -> Vec<Row> {
    let now = seed::now_ms();
    (0..n)
        .map(|i| {
            let mut sites = vec![FakeSite::confluence(&site_name(i, false))];
            if i % 2 == 1 {
                sites.push(FakeSite::confluence(&site_name(i, true)));
            }
            Row {
                id: seed::id_of(i),
                label: format!("scale-{i}"),
                account: format!("scale-account-{i}"),
                // ~40 bytes, like the fake's tokens, distinct per row.
                refresh_token: format!("rt-bench-{i:031x}"),
                access: Some((format!("at-bench-{i:031x}"), now + 3600 * 1000)),
                sites,
                rotated_at_ms: now - 60 * 1000,
            }
        })
        .collect()
}

async fn measure(cfg: &Config, n: usize) -> Result<Measured> {
    eprintln!("bench scale: {n} connections");
    let fake = FakeAtlassian::start();
    let mut daemon = Daemon::created(&cfg.bin, &fake, &Settings::nothing_due()).await?;
    let rows = rows(n);
    let token_bytes: u64 = rows
        .iter()
        .map(|r| (r.refresh_token.len() + r.access.as_ref().map_or(0, |(t, _)| t.len())) as u64)
        .sum();
    let seeded = seed::seed(&daemon.state_dir(), &rows)?;
    drop(rows);
    let mut starts = Vec::with_capacity(STARTS);
    for k in 0..STARTS {
        if k > 0 {
            daemon.stop().await?;
        }
        starts.push(daemon.start().await?.1);
    }
    starts.sort();
    let startup = starts[STARTS / 2];
    let rss_start = daemon.rss()?;
    tokio::time::sleep(cfg.idle).await;
    let rss_idle = daemon.rss()?;

    let (out, list) = daemon.cli(&["list", "--json"])?;
    let listed: serde_json::Value =
        serde_json::from_slice(&out).context("list --json printed no JSON")?;
    let count = listed.as_array().map_or(0, Vec::len);
    if count != n {
        bail!("list --json printed {count} connections, not {n}");
    }

    let addr = daemon.metrics_addr().context("metrics listener")?;
    let mut scrapes = Vec::new();
    let mut scrape_bytes = 0;
    for _ in 0..SCRAPES {
        let mut m = Conn::tcp(addr).await?;
        let t = Instant::now();
        let a = m.get_ok("/metrics").await?;
        scrapes.push(t.elapsed());
        scrape_bytes = a.body.len();
    }
    scrapes.sort();
    let scrape = scrapes[scrapes.len() / 2];
    let rss_after = daemon.rss()?;

    let mut c = Conn::unix(daemon.socket()).await?;
    let mut health = Vec::with_capacity(HEALTH_SAMPLES);
    for _ in 0..HEALTH_SAMPLES {
        let t = Instant::now();
        c.get_ok("/v1/health").await?;
        health.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
    }
    health.sort_unstable();
    drop(c);

    let picks: Vec<usize> = (0..CLIENTS).map(|k| (k * n / CLIENTS + k) % n).collect();
    let by_label: Vec<String> = picks
        .iter()
        .map(|i| format!("/v1/connections/scale-{i}/token"))
        .collect();
    let by_site: Vec<String> = picks
        .iter()
        .map(|&i| {
            let site = FakeSite::confluence(&site_name(i, i % 2 == 1));
            format!("/v1/token?site={}", site.host())
        })
        .collect();
    let load = Load {
        clients: CLIENTS,
        warmup: cfg.warmup,
        measure: cfg.measure,
    };
    let (mut l, mut s) = (Vec::new(), Vec::new());
    for _ in 0..cfg.rounds {
        l.push(closed_loop(daemon.socket(), &by_label, load).await?);
        s.push(closed_loop(daemon.socket(), &by_site, load).await?);
    }
    daemon.stop().await?;
    Ok(Measured {
        size: n,
        seed: seeded,
        startup,
        rss_start,
        rss_idle,
        rss_after,
        token_bytes,
        list,
        list_bytes: out.len(),
        scrape,
        scrape_bytes,
        health_us: health[health.len() / 2],
        by_label: median(l).per_sec,
        by_site: median(s).per_sec,
        provider_requests: fake.requests().len(),
    })
}

pub async fn run(cfg: &Config) -> Result<()> {
    let mut results = Vec::new();
    for &n in &cfg.scale_sizes {
        results.push(measure(cfg, n).await?);
    }
    println!();
    println!(
        "## scale: ledgers by size (start-up the median of {STARTS} starts; token routes at {CLIENTS} clients, {} s after {} s warm-up, median of {} round(s))",
        cfg.measure.as_secs_f64(),
        cfg.warmup.as_secs_f64(),
        cfg.rounds
    );
    println!();
    println!(
        "| connections | seed | start-up | RSS at start | RSS after {:.0} s idle | RSS after list + scrape | list --json | list bytes | /metrics | /metrics bytes | /v1/health p50 | by label req/s | by site req/s | label ÷ site |",
        cfg.idle.as_secs_f64()
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for m in &results {
        println!(
            "| {} | {:.2} s | {:.3} s | {} | {} | {} | {:.3} s | {} | {:.3} s | {} | {} | {} | {} | {:.2} |",
            m.size,
            m.seed.as_secs_f64(),
            m.startup.as_secs_f64(),
            fmt_bytes(m.rss_start),
            fmt_bytes(m.rss_idle),
            fmt_bytes(m.rss_after),
            m.list.as_secs_f64(),
            fmt_bytes(m.list_bytes as u64),
            m.scrape.as_secs_f64(),
            fmt_bytes(m.scrape_bytes as u64),
            fmt_us(Some(m.health_us)),
            fmt_rate(m.by_label),
            fmt_rate(m.by_site),
            m.by_label / m.by_site,
        );
    }
    if let (Some(small), Some(large)) = (results.first(), results.last())
        && large.size > small.size
    {
        let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / (large.size - small.size) as f64;
        println!();
        println!(
            "RSS per connection ({} → {} connections): {:.0} bytes at start, {:.0} bytes after list + scrape.",
            small.size,
            large.size,
            per(large.rss_start, small.rss_start),
            per(large.rss_after, small.rss_after)
        );
    }
    println!();
    for m in &results {
        let goal = RSS_ALLOWANCE + m.token_bytes;
        let worst = m.rss_start.max(m.rss_idle);
        println!(
            "Goal 3 at {}: RSS at most 64 MB + the tokens' {} = {}; at start and idle at most {}: {}.",
            m.size,
            fmt_bytes(m.token_bytes),
            fmt_bytes(goal),
            fmt_bytes(worst),
            if worst <= goal { "met" } else { "not met" }
        );
    }
    let called: usize = results.iter().map(|m| m.provider_requests).sum();
    println!();
    println!("Provider requests during the scale runs: {called} (0 expected: nothing was due).");
    if called > 0 {
        bail!("the daemon called the provider {called} times although nothing was due");
    }
    Ok(())
}
