//! A throw-away measurement, not a benchmark target: how many chain commits per second a real
//! SQLite ledger (WAL, `synchronous=FULL`) takes from N tasks doing `save_chain` at once, and
//! how long a read (`load_one`) waits meanwhile.
//!
//! `cargo run --release --example ledger_commits -- [SECONDS] [WRITERS...]` (defaults: 3 s;
//! 1, 8 and 64 writers) on a ledger in a fresh directory under `$TMPDIR` (put it on the disk
//! the daemon would use: on a tmpfs an fsync costs nothing). Figures on a shared or busy
//! machine are noisy; the storm benchmark lives in `benches/`.

use chrono::Utc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokend::ledger::{Ledger, seal};
use tokend::model::{Chain, Connection, Event, EventKind, Record, Status};
use tokend::secret::Secret;
use tokio::time::Instant;

/// A plain active connection of its own account, as an import leaves it.
fn record(i: usize) -> Record {
    let now = Utc::now();
    Record {
        conn: Connection {
            id: format!("c{i}"),
            label: format!("conn-{i}"),
            provider: "atlassian".into(),
            client_id: "client".into(),
            account_id: Some(format!("acct-{i}")),
            status: Status::Active,
            scopes: vec!["offline_access".into(), "read:page:confluence".into()],
            sites: Vec::new(),
            consented_at: now,
            last_refresh_at: None,
            last_error: None,
            consecutive_failures: 0,
            created_at: now,
            updated_at: now,
        },
        chain: Chain {
            refresh_token: Secret::new(format!("rt-{i}-0")),
            rotated_at: now,
            used_at: now,
            version: 0,
            previous: None,
            attempt_started_at: None,
            access: None,
        },
    }
}

/// One run: `writers` tasks rotating their own chain for `secs`, one task reading meanwhile.
/// Returns (commits per second, read latencies sorted).
async fn run(writers: usize, secs: u64) -> (f64, Vec<Duration>) {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path(), &seal::KeySource::default()).unwrap();
    for i in 0..writers {
        ledger.insert(record(i), vec![]).await.unwrap();
    }
    let commits = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..writers {
        let (ledger, commits, stop) = (ledger.clone(), commits.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut rec = record(i);
            while !stop.load(Ordering::Relaxed) {
                let expect = rec.chain.version;
                let old = rec.chain.refresh_token.clone();
                rec.chain.previous = Some((old, rec.chain.rotated_at));
                rec.chain.version += 1;
                rec.chain.refresh_token = Secret::new(format!("rt-{i}-{}", rec.chain.version));
                rec.chain.rotated_at = Utc::now();
                ledger
                    .save_chain(
                        rec.clone(),
                        expect,
                        vec![Event::new(EventKind::Rotated, "refresh token rotated")],
                    )
                    .await
                    .unwrap();
                commits.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let reader = {
        let (ledger, stop) = (ledger.clone(), stop.clone());
        tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                ledger.load_one("c0".into()).await.unwrap();
                lat.push(t.elapsed());
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            lat
        })
    };
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut lat = reader.await.unwrap();
    lat.sort();
    (commits.load(Ordering::Relaxed) as f64 / elapsed, lat)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let secs: u64 = args.next().map_or(3, |s| s.parse().expect("SECONDS"));
    let mut counts: Vec<usize> = args.map(|s| s.parse().expect("WRITERS")).collect();
    if counts.is_empty() {
        counts = vec![1, 8, 64];
    }
    println!("writers  commits/s  read p50    read p99");
    for n in counts {
        let (rate, lat) = run(n, secs).await;
        let pct = |p: usize| lat.get(lat.len() * p / 100).copied().unwrap_or_default();
        println!("{n:>7}  {rate:>9.0}  {:>8.2?}  {:>8.2?}", pct(50), pct(99));
    }
}
