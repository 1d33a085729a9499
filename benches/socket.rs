//! Benchmark: cached token requests over the real Unix-socket API, against a baseline in the
//! same run, and the memory a large ledger costs.
//!
//! `cargo bench --bench socket` (results go in BENCHMARKS.md). The daemon's router, engine
//! and ledger run in-process on a real socket; clients are plain threads speaking HTTP/1.1
//! with keep-alive. The baseline is a request for an unknown route, which crosses the same
//! socket, HTTP parser, access layer and JSON error path but no engine lookup, so the ratio
//! says what handing out a cached token adds. Memory is read from /proc/self/statm before
//! and after loading a ledger of many connections.

#![allow(clippy::disallowed_types)] // wall-clock measurements of real I/O

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokend::model::{AccessToken, Chain, Connection, Record, Status};
use tokend::secret::Secret;

const CLIENT_THREADS: usize = 4;
const REQUESTS_PER_THREAD: usize = 5_000;
const LEDGER_SIZES: [usize; 2] = [1_000, 10_000];

fn record(i: usize) -> Record {
    let now = chrono::Utc::now();
    Record {
        conn: Connection {
            id: format!("c{i:012x}"),
            label: format!("conn-{i}"),
            provider: "atlassian".into(),
            client_id: "bench".into(),
            account_id: Some(format!("acct-{i}")),
            status: Status::Active,
            scopes: vec!["offline_access".into(), "read:page:confluence".into()],
            sites: Vec::new(),
            consented_at: now,
            last_refresh_at: Some(now),
            last_error: None,
            consecutive_failures: 0,
            created_at: now,
            updated_at: now,
        },
        chain: Chain {
            refresh_token: Secret::new(format!("rt-bench-{i}")),
            rotated_at: now,
            used_at: now,
            version: 0,
            previous: None,
            attempt_started_at: None,
            access: Some(AccessToken {
                token: Secret::new(format!("at-bench-{i}")),
                expires_at: now + chrono::Duration::hours(1),
            }),
        },
    }
}

fn config(dir: &Path) -> tokend::config::Config {
    tokend::config::Config::parse(
        "[refresh]\nrotate_after = \"7d\"\n",
        &dir.join("daemon.toml"),
        &|_| None,
        &|_| Err(std::io::Error::other("none")),
    )
    .expect("config")
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

async fn start(dir: &Path, n: usize) -> (PathBuf, Arc<tokend::refresh::Engine>) {
    let ledger =
        tokend::ledger::Ledger::open(&dir.join("state"), &Default::default()).expect("ledger");
    for i in 0..n {
        ledger.insert(record(i), vec![]).await.expect("insert");
    }
    let config = config(dir);
    let provider = tokend::provider::Atlassian::new(
        config.providers.atlassian.clone(),
        Duration::from_secs(5),
    )
    .expect("provider");
    let metrics = Arc::new(tokend::metrics::Metrics::new(true));
    let engine = tokend::refresh::Engine::load(
        Arc::new(ledger.clone()),
        Arc::new(provider),
        Arc::new(tokend::refresh::SystemClock),
        config.refresh,
        tokend::notify::Notifier::disabled(),
        metrics.clone(),
    )
    .await
    .expect("engine");
    let socket = dir.join("bench.sock");
    let listener = tokend::api::server::bind(&socket, 0o600).expect("bind");
    let state = tokend::api::ApiState {
        engine: engine.clone(),
        metrics: metrics.clone(),
        jobs: Arc::new(tokend::jobs::JobMonitor::default()),
        access: Arc::new(parking_lot::RwLock::new(Arc::new(
            tokend::api::AccessPolicy {
                own_uid: 0,
                config: config.access.clone(),
            },
        ))),
        audit: tokend::audit::Audit::new(ledger.clone(), metrics.clone()),
    };
    tokio::spawn(tokend::api::server::serve(
        listener,
        tokend::api::router(state),
        metrics.clone(),
        std::future::pending(),
        Duration::from_secs(1),
    ));
    (socket, engine)
}

/// Sends `n` keep-alive GETs of `path`; returns each latency.
fn hammer(socket: &Path, path: &str, n: usize, expect: u16) -> Vec<Duration> {
    let stream = UnixStream::connect(socket).expect("connect");
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let mut out = Vec::with_capacity(n);
    let mut body = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        writer.write_all(req.as_bytes()).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains(&expect.to_string()), "{line}");
        let mut len = 0usize;
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        body.resize(len, 0);
        reader.read_exact(&mut body).unwrap();
        out.push(t.elapsed());
    }
    out
}

struct Run {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

fn run(socket: &Path, path: &str, expect: u16) -> Run {
    let started = Instant::now();
    let mut all: Vec<Duration> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..CLIENT_THREADS)
            .map(|_| s.spawn(|| hammer(socket, path, REQUESTS_PER_THREAD, expect)))
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let elapsed = started.elapsed();
    all.sort();
    Run {
        per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        p50: all[all.len() / 2],
        p99: all[all.len() * 99 / 100],
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "# tokend socket benchmark ({CLIENT_THREADS} client threads x {REQUESTS_PER_THREAD} keep-alive requests)"
    );
    let dir = tempfile::tempdir().unwrap();
    let (socket, _engine) = rt.block_on(start(dir.path(), 100));
    // Warm up.
    run(&socket, "/v1/connections/conn-1/token", 200);
    let base = run(&socket, "/v1/no-such-route", 404);
    let tok = run(&socket, "/v1/connections/conn-1/token", 200);
    let by_label = run(&socket, "/v1/connections/conn-99/token?min_valid=60", 200);
    for (name, r) in [
        ("baseline: unknown route (404)", &base),
        ("cached token by label", &tok),
        ("cached token, min_valid=60", &by_label),
    ] {
        println!(
            "{name:32} {:>9.0} req/s  p50 {:>7.1?}  p99 {:>7.1?}  throughput ratio vs baseline {:.2}",
            r.per_sec,
            r.p50,
            r.p99,
            r.per_sec / base.per_sec
        );
    }
    for n in LEDGER_SIZES {
        let dir = tempfile::tempdir().unwrap();
        let before = rss_bytes();
        let started = Instant::now();
        let (_socket, engine) = rt.block_on(start(dir.path(), n));
        let load = started.elapsed();
        let after = rss_bytes();
        println!(
            "ledger of {n:>6} connections: insert+load {load:>8.1?}, RSS +{:.1} MiB ({:.0} bytes/connection), {} in memory",
            (after.saturating_sub(before)) as f64 / (1024.0 * 1024.0),
            after.saturating_sub(before) as f64 / n as f64,
            engine.list().len()
        );
    }
}
