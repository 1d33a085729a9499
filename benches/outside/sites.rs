//! `sites`: the site job over a large ledger (issue 15, goal 3: "the site job at that size
//! finishing inside its period with bounded concurrency").
//!
//! The largest `TOKEND_BENCH_SCALE` size (100,000 by default) of connections, each with one
//! site (odd rows two) and a cached access token the fake accepts (`issue_grants_with_access`),
//! nothing due for rotation. The daemon is started with `resolve_sites` set to fire once, a
//! few seconds later (a cron of that second, UTC, as the daemon reads it); the fake logs every
//! `accessible-resources` request. Reported: the job's time at the provider (first to last
//! request), resolutions per second, `tokend_site_resolutions_total` by outcome, refreshes
//! sent (must be 0: site resolution never rotates), and the time the same job would take at
//! a real provider's latency with the daemon's fixed concurrency (`SITE_JOB_CONCURRENCY`,
//! 16): the provider's bound, `n × latency ÷ 16`, which with tokend's own time beside it must
//! stay under the job's default period (an hour).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Config;
use crate::daemon::{Daemon, Settings};
use crate::fake::{FakeAtlassian, FakeSite};
use crate::seed::{self, Row};

/// The site job's concurrency in the daemon (`jobs::SITE_JOB_CONCURRENCY`), for the bound.
const SITE_JOB_CONCURRENCY: f64 = 16.0;
/// A real provider's time for one resolution (one `accessible-resources` GET from a data
/// centre to Atlassian): what the bound assumes.
const PROVIDER_LATENCY: Duration = Duration::from_millis(250);
/// The job's default period (`resolve_sites = "0 0 * * * *"`).
const PERIOD: Duration = Duration::from_secs(3600);
/// How long after the daemon is ready the job is set to fire, at least.
const LEAD: Duration = Duration::from_secs(6);
/// How long the job may take before the bench gives up.
const GIVE_UP: Duration = Duration::from_secs(900);
const RESOURCES: &str = "/oauth/token/accessible-resources";

fn rows(fake: &FakeAtlassian, n: usize) -> Vec<Row> {
    let now = seed::now_ms();
    let grants: Vec<(String, Vec<FakeSite>)> = (0..n)
        .map(|i| {
            let mut sites = vec![FakeSite::confluence(&format!("sitejob{i}"))];
            if i % 2 == 1 {
                sites.push(FakeSite::jira(&format!("sitejob{i}b")));
            }
            (format!("sitejob-account-{i}"), sites)
        })
        .collect();
    let tokens = fake.issue_grants_with_access(&grants);
    grants
        .into_iter()
        .zip(tokens)
        .enumerate()
        .map(|(i, ((account, sites), (rt, at)))| Row {
            id: seed::id_of(i),
            label: format!("sitejob-{i}"),
            account,
            refresh_token: rt,
            access: Some((at, now + 3600 * 1000)),
            sites,
            rotated_at_ms: now - 60 * 1000,
        })
        .collect()
}

pub async fn run(cfg: &Config) -> Result<()> {
    let n = *cfg.scale_sizes.iter().max().context("no scale size")?;
    eprintln!("bench sites: {n} connections");
    let fake = FakeAtlassian::start();
    let mut daemon = Daemon::created(&cfg.bin, &fake, &Settings::nothing_due()).await?;
    let rows = rows(&fake, n);
    seed::seed(&daemon.state_dir(), &rows)?;
    drop(rows);
    // A start-up's time on top of LEAD.
    daemon.fire_job_once("resolve_sites", LEAD + Duration::from_secs(1))?;
    daemon.start().await?;
    let before = fake.requests().len();
    let text = daemon
        .job_succeeded("resolve_sites", Duration::from_millis(500), GIVE_UP)
        .await?;
    daemon.stop().await?;
    let log = fake.requests();
    let asked: Vec<Instant> = log[before..]
        .iter()
        .filter(|r| r.path == RESOURCES)
        .map(|r| r.at)
        .collect();
    let refreshes = log[before..]
        .iter()
        .filter(|r| r.grant_type.is_some())
        .count();
    let (Some(first), Some(last)) = (asked.iter().min(), asked.iter().max()) else {
        bail!("the site job asked the provider nothing");
    };
    let took = *last - *first;
    let outcomes: Vec<(String, f64)> = text
        .lines()
        .filter(|l| l.starts_with("tokend_site_resolutions_total{"))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            Some((series.to_owned(), v.parse().ok()?))
        })
        .filter(|(_, v)| *v > 0.0)
        .collect();
    let bound = PROVIDER_LATENCY.as_secs_f64() * n as f64 / SITE_JOB_CONCURRENCY;
    println!(
        "\n## sites: the site job over {n} connections (the fake answering at once; concurrency {SITE_JOB_CONCURRENCY})\n"
    );
    println!("| measure | value |\n|---|---:|");
    println!("| accessible-resources requests | {} |", asked.len());
    println!("| first → last request | {:.2} s |", took.as_secs_f64());
    println!(
        "| resolutions/s | {} |",
        crate::fmt_rate(asked.len() as f64 / took.as_secs_f64().max(1e-9))
    );
    println!("| refresh requests sent | {refreshes} |");
    for (series, v) in &outcomes {
        println!("| `{series}` | {v} |");
    }
    println!(
        "| the provider's bound at {} ms a resolution ({n} × {:.2} s ÷ {SITE_JOB_CONCURRENCY}) | {bound:.0} s |",
        PROVIDER_LATENCY.as_millis(),
        PROVIDER_LATENCY.as_secs_f64()
    );
    println!(
        "| bound + tokend's own time, against the hourly period | {:.0} s of {} s |",
        bound + took.as_secs_f64(),
        PERIOD.as_secs()
    );
    if asked.len() < n {
        bail!(
            "the site job asked about {} of {n} connections",
            asked.len()
        );
    }
    if refreshes > 0 {
        bail!("the site job sent {refreshes} refreshes; site resolution never rotates");
    }
    let verdict = bound + took.as_secs_f64() <= PERIOD.as_secs_f64();
    println!(
        "\nGoal 3's site job at {n}: {}",
        if verdict {
            "inside its period"
        } else {
            "NOT inside its period"
        }
    );
    Ok(())
}
