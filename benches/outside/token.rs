//! Scenario `token` (issue 15, goal 1): cached-token round trips through the real daemon
//! against a bare hyper server answering the same number of bytes, alternating in one run.
//!
//! One connection is imported through the socket API (`POST /v1/connections` with a grant
//! of the fake), then for each client count the bench runs `rounds` rounds of: the bare
//! server, `GET /v1/connections/bench/token`, `GET /v1/token?site=HOST`. Each target's
//! median round (by throughput) is reported, with the ratios tokend / bare.

use anyhow::{Result, bail};
use serde_json::json;

use crate::bare::BareServer;
use crate::client::{Conn, Load, Stats, closed_loop, median};
use crate::daemon::{Daemon, Settings};
use crate::fake::{FakeAtlassian, FakeSite};
use crate::{Config, fmt_rate, fmt_us};

/// The label of the imported connection.
const LABEL: &str = "bench";
/// The fake account and site name of the imported connection.
const ACCOUNT: &str = "bench-account";
const SITE: &str = "bench";
/// The client counts of the table.
const CLIENTS: [usize; 3] = [1, 16, 64];

pub async fn run(cfg: &Config) -> Result<()> {
    eprintln!("bench token: starting the fake provider and tokend");
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant(ACCOUNT, &[FakeSite::confluence(SITE)]);
    let mut daemon = Daemon::new(
        &cfg.bin,
        &fake,
        &Settings {
            daemon: vec![],
            ledger: vec![],
            refresh: vec![],
            metrics: false,
        },
    )?;
    daemon.start().await?;
    let mut c = Conn::unix(daemon.socket()).await?;
    let body = json!({"provider": "atlassian", "label": LABEL, "refresh_token": rt});
    let a = c
        .request(
            hyper::Method::POST,
            "/v1/connections",
            Some(body.to_string()),
        )
        .await?;
    if a.status != 201 {
        bail!("import answered {}: {}", a.status, a.text());
    }
    let host = FakeSite::confluence(SITE).host().to_string();
    let by_label = format!("/v1/connections/{LABEL}/token");
    let by_site = format!("/v1/token?site={host}");
    let label_answer = c.get_ok(&by_label).await?;
    let site_answer = c.get_ok(&by_site).await?;
    let size = label_answer.body.len();
    let mut header_names: Vec<&str> = label_answer.headers.keys().map(|k| k.as_str()).collect();
    header_names.sort_unstable();
    eprintln!(
        "bench token: tokend's token answer is {size} bytes (by site {} bytes), headers: {}",
        site_answer.body.len(),
        header_names.join(", ")
    );
    drop(c);
    let bare_socket = daemon.scratch("bare.sock");
    let bare = BareServer::start(&bare_socket, size).await?;
    let calls_before = fake.token_calls();

    let mut rows = Vec::new();
    for clients in CLIENTS {
        let load = Load {
            clients,
            warmup: cfg.warmup,
            measure: cfg.measure,
        };
        let (mut b, mut l, mut s) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..cfg.rounds {
            eprintln!(
                "bench token: {clients} clients, round {}/{}",
                round + 1,
                cfg.rounds
            );
            b.push(closed_loop(&bare.socket, &["/".to_string()], load).await?);
            l.push(closed_loop(daemon.socket(), std::slice::from_ref(&by_label), load).await?);
            s.push(closed_loop(daemon.socket(), std::slice::from_ref(&by_site), load).await?);
        }
        let (b, l, s) = (median(b), median(l), median(s));
        rows.push((clients, "by label", l, b));
        rows.push((clients, "by site", s, b));
    }
    let refreshes = fake.token_calls() - calls_before;
    drop(bare);
    daemon.stop().await?;

    println!();
    println!(
        "## token: cached token vs bare hyper ({size}-byte body; {} s after {} s warm-up, median of {} round(s))",
        cfg.measure.as_secs_f64(),
        cfg.warmup.as_secs_f64(),
        cfg.rounds
    );
    println!();
    println!(
        "| route | clients | tokend req/s | tokend p50 | tokend p99 | bare req/s | bare p50 | bare p99 | throughput ratio | p99 ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (clients, route, t, b) in &rows {
        println!("{}", table_row(route, *clients, t, b));
    }
    println!();
    println!("Provider calls while measuring: {refreshes} (every token came from the cache).");
    Ok(())
}

fn table_row(route: &str, clients: usize, t: &Stats, b: &Stats) -> String {
    format!(
        "| {route} | {clients} | {} | {} | {} | {} | {} | {} | {:.2} | {} |",
        fmt_rate(t.per_sec),
        fmt_us(t.p50_us),
        fmt_us(t.p99_us),
        fmt_rate(b.per_sec),
        fmt_us(b.p50_us),
        fmt_us(b.p99_us),
        t.per_sec / b.per_sec,
        match (t.p99_us, b.p99_us) {
            (Some(t), Some(b)) => format!("{:.2}", f64::from(t) / f64::from(b.max(1))),
            _ => "n/a".into(),
        },
    )
}
