//! Scenario `pg` (issue 14): the PostgreSQL ledger against the SQLite one, in one run, on a
//! throw-away cluster of the bench's own (`src/testpg.rs`, `#[path]`-included: `initdb` +
//! `pg_ctl` in a temp dir, on a Unix socket only, as the `postgres` user when run as root;
//! unlike the tests' clusters with `fsync=on`, so that its commits are durable ones, as
//! SQLite's `synchronous=FULL` are).
//!
//! - **cached**: `GET /v1/connections/bench/token` at 1, 16 and 64 clients on a
//!   PostgreSQL-backed daemon and on a SQLite-backed one, alternating round by round (the
//!   order swapped every round); the median round of each and their ratio. A cached token is
//!   served from memory whichever the ledger, so the ratio should be about 1.
//! - **storm**: `storm.rs`'s storm (N chains due at once, the fake answering in 20 ms,
//!   `max_concurrent = 64`) on SQLite, on PostgreSQL with one daemon, and on PostgreSQL with
//!   three daemons sharing the ledger. Each run seeds a SQLite ledger of its own (a new fake,
//!   new grants: runs never share a chain) exactly as `storm` does; the PostgreSQL runs copy
//!   it into a new database with the real `tokend migrate-ledger` and start their daemons on
//!   it (`ledger.url`, the seeding daemon's key file as every daemon's `key_file`), all at
//!   once. Rotations/s (chains / (last commit seen - first refresh request at the fake)) are
//!   set against the provider bound, `max_concurrent` × daemons / 20 ms (the fake answers
//!   every request after the delay without a bound of its own; on a small machine the CPU
//!   shared by the fake, the daemons and the server is the limit first), and against the
//!   SQLite run. Then no chain may be lost: no reuse at the fake, every family alive, every
//!   row active with its family's current refresh token (opened with the key); else the
//!   bench fails.
//!
//! Without a PostgreSQL server installed the scenario says so and is skipped (with
//! `TOKEND_REQUIRE_POSTGRES` set, `testpg` panics instead).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::json;
use tokend::ledger::seal::aad;

use crate::client::{Conn, Load, Stats, closed_loop, median};
use crate::daemon::{Daemon, Settings, toml_str};
use crate::fake::{FakeAtlassian, FakeSite};
use crate::seed;
use crate::testpg::{self, Cluster};
use crate::{Config, fmt_rate, fmt_us};

/// The client counts of the cached-token table.
const CLIENTS: [usize; 3] = [1, 16, 64];
/// The label of the connection each daemon of the cached-token part serves.
const LABEL: &str = "bench";
/// The fake's answer time of the token endpoint in the storms (as `storm`).
const TOKEN_DELAY: Duration = Duration::from_millis(20);
/// `refresh.max_concurrent` of every storm daemon (as `storm`).
const MAX_CONCURRENT: usize = 64;
/// Daemons sharing the ledger in the second PostgreSQL storm.
const SHARED_DAEMONS: usize = 3;
/// `ledger.lease`: the default; above the storms' `request_timeout`, as it must be.
const LEASE: &str = "60s";
/// How long the bench waits, after a storm's daemons stopped, before it reads the server's
/// statistics: each server process flushes its counts as it exits, just after its client
/// went.
const STATS_SETTLE: Duration = Duration::from_secs(1);
/// The key of the cached-token part's PostgreSQL daemon (64 hex digits; a bench-only key).
const KEY_HEX: &str = "5b0e2f3a4c1d6e7f8091a2b3c4d5e6f70718293a4b5c6d7e8f90a1b2c3d4e5f6";

pub async fn run(cfg: &Config) -> Result<()> {
    if testpg::bindir().is_none() && std::env::var_os(testpg::REQUIRE_ENV).is_none() {
        eprintln!("bench pg: skipped: no PostgreSQL server is installed");
        println!();
        println!(
            "## pg: skipped: no PostgreSQL server is installed (no initdb under `pg_config --bindir` or /usr/lib/postgresql/*/bin; install the postgresql package)"
        );
        return Ok(());
    }
    eprintln!("bench pg: starting a PostgreSQL cluster (fsync=on)");
    let cluster = Cluster::start_durable().context("no PostgreSQL server is installed")?;
    cached(cfg, &cluster).await?;
    storms(cfg, &cluster).await
}

/// The `[daemon]` and `[ledger]` settings of a daemon named `node` on database URL `url`,
/// sealing with `key`.
fn on_postgres(
    url: &str,
    key: &std::path::Path,
    node: &str,
    refresh: Vec<(&'static str, String)>,
    metrics: bool,
) -> Settings {
    Settings {
        daemon: vec![
            ("node_name", toml_str(node)),
            ("key_file", toml_str(&key.to_string_lossy())),
        ],
        ledger: vec![("url", toml_str(url)), ("lease", toml_str(LEASE))],
        refresh,
        metrics,
    }
}

/// Imports a new grant of `fake` through `daemon`'s socket as connection [`LABEL`].
async fn import(daemon: &Daemon, fake: &FakeAtlassian, account: &str) -> Result<()> {
    let rt = fake.issue_grant(account, &[FakeSite::confluence(account)]);
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
    Ok(())
}

/// The cached-token part: a SQLite-backed and a PostgreSQL-backed daemon, one connection
/// each, the same load alternating between them.
async fn cached(cfg: &Config, cluster: &Cluster) -> Result<()> {
    eprintln!("bench pg: cached token, SQLite-backed vs PostgreSQL-backed daemon");
    let fake = FakeAtlassian::start();
    let keys = tempfile::tempdir().context("a temp dir for the key file")?;
    let key = keys.path().join("ledger.key");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&key)
            .and_then(|mut f| f.write_all(format!("{KEY_HEX}\n").as_bytes()))
            .context("write the key file")?;
    }
    let url = cluster.url(&cluster.create_database());
    let mut sqlite = Daemon::new(
        &cfg.bin,
        &fake,
        &Settings {
            daemon: vec![],
            ledger: vec![],
            refresh: vec![],
            metrics: false,
        },
    )?;
    let mut pg = Daemon::new(
        &cfg.bin,
        &fake,
        &on_postgres(&url, &key, "bench-pg", vec![], false),
    )?;
    sqlite.start().await?;
    pg.start()
        .await
        .context("start the PostgreSQL-backed daemon")?;
    import(&sqlite, &fake, "sqlite-account").await?;
    import(&pg, &fake, "pg-account").await?;
    let path = format!("/v1/connections/{LABEL}/token");
    for d in [&sqlite, &pg] {
        Conn::unix(d.socket()).await?.get_ok(&path).await?;
    }
    let calls_before = fake.token_calls();
    let mut rows: Vec<(usize, Stats, Stats)> = Vec::new();
    for clients in CLIENTS {
        let load = Load {
            clients,
            warmup: cfg.warmup,
            measure: cfg.measure,
        };
        let (mut s, mut p) = (Vec::new(), Vec::new());
        for round in 0..cfg.rounds {
            eprintln!(
                "bench pg: cached token, {clients} clients, round {}/{}",
                round + 1,
                cfg.rounds
            );
            // Each goes first every other round: a drift of the machine during a round pair
            // favours neither.
            let one = std::slice::from_ref(&path);
            if round % 2 == 0 {
                s.push(closed_loop(sqlite.socket(), one, load).await?);
                p.push(closed_loop(pg.socket(), one, load).await?);
            } else {
                p.push(closed_loop(pg.socket(), one, load).await?);
                s.push(closed_loop(sqlite.socket(), one, load).await?);
            }
        }
        rows.push((clients, median(s), median(p)));
    }
    let refreshes = fake.token_calls() - calls_before;
    sqlite.stop().await?;
    pg.stop().await?;

    println!();
    println!(
        "## pg: cached token by label, PostgreSQL-backed vs SQLite-backed daemon ({} s after {} s warm-up, median of {} round(s), alternating)",
        cfg.measure.as_secs_f64(),
        cfg.warmup.as_secs_f64(),
        cfg.rounds
    );
    println!();
    println!(
        "| clients | SQLite req/s | SQLite p50 | SQLite p99 | PostgreSQL req/s | PostgreSQL p50 | PostgreSQL p99 | throughput PG ÷ SQLite | p99 PG ÷ SQLite |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (clients, s, p) in &rows {
        println!(
            "| {clients} | {} | {} | {} | {} | {} | {} | {:.2} | {} |",
            fmt_rate(s.per_sec),
            fmt_us(s.p50_us),
            fmt_us(s.p99_us),
            fmt_rate(p.per_sec),
            fmt_us(p.p50_us),
            fmt_us(p.p99_us),
            p.per_sec / s.per_sec,
            match (p.p99_us, s.p99_us) {
                (Some(p), Some(s)) => format!("{:.2}", f64::from(p) / f64::from(s.max(1))),
                _ => "n/a".into(),
            }
        );
    }
    println!();
    println!("Provider calls while measuring: {refreshes} (every token came from the cache).");
    Ok(())
}

/// Where a storm's chains live.
#[derive(Clone, Copy)]
enum Ledger<'a> {
    Sqlite,
    Postgres {
        cluster: &'a Cluster,
        daemons: usize,
    },
}

/// What one storm measured.
struct Storm {
    ledger: &'static str,
    daemons: usize,
    /// `tokend migrate-ledger`'s run (PostgreSQL only).
    migrated_in: Option<Duration>,
    /// First refresh request at the fake → every row rotated.
    wall: Duration,
    rate: f64,
    requests: usize,
    bound: f64,
    /// `tokend_lease_conflicts_total` summed over the daemons (PostgreSQL only).
    conflicts: Option<f64>,
    /// The server's counts over the storm (PostgreSQL only).
    server: Option<ServerCounts>,
    rotations: usize,
    violations: usize,
    alive: usize,
    active: usize,
    current: usize,
}

/// What the server did during a PostgreSQL storm: where its rotation rate comes from.
#[derive(Clone, Copy)]
struct ServerCounts {
    /// Transactions the daemons committed in the storm's database (the bench's own probe
    /// queries left out), per rotation.
    commits_per_rotation: f64,
    /// WAL flushes to disk (`pg_stat_wal.wal_sync`, the whole cluster), when the server
    /// reports them (PostgreSQL 14 to 17).
    wal_syncs: Option<i64>,
}

/// A storm's view of its ledger while it runs.
enum Probe {
    Sqlite(rusqlite::Connection),
    /// The client, and how many transactions it committed itself (left out of the
    /// daemons' count).
    Postgres(tokio_postgres::Client, std::cell::Cell<i64>),
}

impl Probe {
    /// Rows rotated after `since_ms`.
    async fn rotated(&self, since_ms: i64) -> Result<usize> {
        const Q: &str = "SELECT count(*) FROM connections WHERE refresh_token_rotated_at > ";
        Ok(match self {
            Probe::Sqlite(db) => {
                db.query_row(&format!("{Q}?1"), [since_ms], |r| r.get::<_, i64>(0))? as usize
            }
            Probe::Postgres(db, own) => {
                own.set(own.get() + 1);
                db.query_one(&format!("{Q}$1"), &[&since_ms])
                    .await?
                    .get::<_, i64>(0) as usize
            }
        })
    }

    /// Every row's id, sealed refresh token and status.
    async fn rows(&self) -> Result<Vec<(String, String, String)>> {
        const Q: &str = "SELECT id, refresh_token, status FROM connections";
        Ok(match self {
            Probe::Sqlite(db) => {
                let mut stmt = db.prepare(Q)?;
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<Result<_, _>>()?
            }
            Probe::Postgres(db, own) => {
                own.set(own.get() + 1);
                db.query(Q, &[])
                    .await?
                    .iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2)))
                    .collect()
            }
        })
    }

    /// Transactions committed in this database so far (the probe's own left out), and the
    /// cluster's WAL flushes when it reports them; `None` on SQLite.
    async fn server_counts(&self) -> Result<Option<(i64, Option<i64>)>> {
        let Probe::Postgres(db, own) = self else {
            return Ok(None);
        };
        let commits: i64 = db
            .query_one(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
                &[],
            )
            .await?
            .get(0);
        let syncs = db
            .query_one("SELECT wal_sync FROM pg_stat_wal", &[])
            .await
            .ok()
            .map(|r| r.get::<_, i64>(0));
        let counted = commits - own.get();
        own.set(own.get() + 2);
        Ok(Some((counted, syncs)))
    }
}

/// The value of an unlabelled series in a `/metrics` text (0 when absent).
fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// One storm of `n` chains on `ledger`.
async fn storm(cfg: &Config, ledger: Ledger<'_>) -> Result<Storm> {
    let n = cfg.storm_chains;
    let (name, daemons) = match ledger {
        Ledger::Sqlite => ("SQLite", 1),
        Ledger::Postgres { daemons, .. } => ("PostgreSQL", daemons),
    };
    eprintln!("bench pg: storm of {n} chains on {name} with {daemons} daemon(s)");
    let refresh = vec![
        ("rotate_after", "\"1h\"".to_string()),
        ("max_concurrent", MAX_CONCURRENT.to_string()),
        ("request_timeout", "\"30s\"".to_string()),
    ];
    let fake = FakeAtlassian::start();
    let mut seeder = Daemon::created(
        &cfg.bin,
        &fake,
        &Settings {
            daemon: vec![],
            ledger: vec![],
            refresh: refresh.clone(),
            metrics: false,
        },
    )
    .await?;
    let (grants, rows, rotated_at_ms) = crate::storm::due_chains(&fake, n);
    seed::seed(&seeder.state_dir(), &rows)?;
    let keys = seed::keyring(&seeder.state_dir())?;

    let mut migrated_in = None;
    let mut running: Vec<Daemon> = Vec::new();
    let probe = match ledger {
        Ledger::Sqlite => {
            let ro = rusqlite::Connection::open_with_flags(
                seeder.ledger_path(),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )?;
            ro.busy_timeout(Duration::from_secs(5))?;
            Probe::Sqlite(ro)
        }
        Ledger::Postgres { cluster, daemons } => {
            let url = cluster.url(&cluster.create_database());
            let (_, took) = seeder
                .cli(&["migrate-ledger", "--to", &url])
                .context("migrate-ledger into the storm's database")?;
            migrated_in = Some(took);
            let key = seeder.state_dir().join("ledger.key");
            for i in 0..daemons {
                running.push(Daemon::new(
                    &cfg.bin,
                    &fake,
                    &on_postgres(&url, &key, &format!("storm-{i}"), refresh.clone(), true),
                )?);
            }
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .context("connect the bench's probe to the storm's database")?;
            tokio::spawn(conn);
            Probe::Postgres(client, std::cell::Cell::new(0))
        }
    };
    let counts_before = probe.server_counts().await?;

    fake.set_token_delay(TOKEN_DELAY);
    if running.is_empty() {
        seeder.start().await?;
    } else {
        // All at once: none gets a head start on the storm.
        futures_util::future::try_join_all(running.iter_mut().map(|d| d.start())).await?;
    }
    let what = format!("storm on {name}");
    let done_at = crate::storm::until_rotated(&what, n, || probe.rotated(rotated_at_ms)).await?;
    let log = fake.token_requests();
    let first = log
        .iter()
        .map(|r| r.at)
        .min()
        .context("no refresh request")?;
    let wall = done_at - first;

    let mut conflicts = None;
    for d in &running {
        let addr = d.metrics_addr().context("storm daemons serve /metrics")?;
        let text = Conn::tcp(addr).await?.get_ok("/metrics").await?.text();
        *conflicts.get_or_insert(0.0) += series(&text, "tokend_lease_conflicts_total");
    }
    let by_id: std::collections::HashMap<&str, &str> = rows
        .iter()
        .map(|r| (r.id.as_str(), r.account.as_str()))
        .collect();
    let (mut active, mut current) = (0, 0);
    for (id, sealed, status) in probe.rows().await? {
        active += usize::from(status == "active");
        let opened = keys
            .open(&sealed, &aad(&id, "refresh_token"))
            .map_err(|e| anyhow::anyhow!("cannot open the refresh token of {id}: {e}"))?;
        if let Some(account) = by_id.get(id.as_str())
            && fake.current_refresh_token(account).as_deref() == Some(opened.plaintext.as_str())
        {
            current += 1;
        }
    }
    for d in &mut running {
        d.stop().await?;
    }
    seeder.stop().await?;
    if counts_before.is_some() {
        tokio::time::sleep(STATS_SETTLE).await;
    }
    let server = match (counts_before, probe.server_counts().await?) {
        (Some((c0, w0)), Some((c1, w1))) => Some(ServerCounts {
            commits_per_rotation: (c1 - c0) as f64 / n as f64,
            wal_syncs: w0.zip(w1).map(|(a, b)| b - a),
        }),
        _ => None,
    };
    drop(probe);
    let storm = Storm {
        ledger: name,
        daemons,
        migrated_in,
        wall,
        rate: n as f64 / wall.as_secs_f64(),
        requests: log.len(),
        bound: (MAX_CONCURRENT * daemons) as f64 / TOKEN_DELAY.as_secs_f64(),
        conflicts,
        server,
        rotations: fake.total_rotations(),
        violations: fake.reuse_violations(),
        alive: grants.iter().filter(|(a, _)| fake.family_alive(a)).count(),
        active,
        current,
    };
    if storm.violations > 0 || storm.alive < n || storm.current < n || storm.active < n {
        bail!(
            "chains were lost on {name} with {daemons} daemon(s): {} reuse violations, {}/{n} families alive, {}/{n} rows current, {}/{n} active",
            storm.violations,
            storm.alive,
            storm.current,
            storm.active
        );
    }
    Ok(storm)
}

/// The storms: SQLite, PostgreSQL with one daemon, PostgreSQL with [`SHARED_DAEMONS`].
async fn storms(cfg: &Config, cluster: &Cluster) -> Result<()> {
    let n = cfg.storm_chains;
    let runs = [
        storm(cfg, Ledger::Sqlite).await?,
        storm(
            cfg,
            Ledger::Postgres {
                cluster,
                daemons: 1,
            },
        )
        .await?,
        storm(
            cfg,
            Ledger::Postgres {
                cluster,
                daemons: SHARED_DAEMONS,
            },
        )
        .await?,
    ];
    let sqlite_rate = runs[0].rate;
    println!();
    println!(
        "## pg: storm, {n} chains due at once (token endpoint {} ms, max_concurrent {MAX_CONCURRENT} per daemon)",
        TOKEN_DELAY.as_millis()
    );
    println!();
    println!(
        "| ledger | daemons | migrate-ledger | first refresh request → all {n} committed | **rotations/s** | provider bound ({MAX_CONCURRENT} × daemons / {} ms) | ÷ bound | ÷ SQLite |",
        TOKEN_DELAY.as_millis()
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &runs {
        println!(
            "| {} | {} | {} | {:.2} s | **{}** | {} | {:.2} | {:.2} |",
            r.ledger,
            r.daemons,
            r.migrated_in
                .map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64())),
            r.wall.as_secs_f64(),
            fmt_rate(r.rate),
            fmt_rate(r.bound),
            r.rate / r.bound,
            r.rate / sqlite_rate,
        );
    }
    println!();
    println!(
        "| ledger | daemons | lease conflicts | server commits per rotation | WAL flushes/s (per rotation) | refresh requests at the fake | rotations at the fake | reuse violations | families alive | rows active, current |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &runs {
        let (commits, flushes) = match r.server {
            Some(c) => (
                format!("{:.1}", c.commits_per_rotation),
                c.wal_syncs.map_or("n/a".into(), |w| {
                    format!(
                        "{} ({:.2})",
                        fmt_rate(w as f64 / r.wall.as_secs_f64()),
                        w as f64 / n as f64
                    )
                }),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {} | {} | {commits} | {flushes} | {} | {} | {} | {}/{n} | {}/{n}, {}/{n} |",
            r.ledger,
            r.daemons,
            r.conflicts.map_or("-".into(), |c| format!("{c}")),
            r.requests,
            r.rotations,
            r.violations,
            r.alive,
            r.active,
            r.current
        );
    }
    println!();
    println!(
        "The fake answers every request after {} ms with no bound of its own: the bound is {MAX_CONCURRENT} in flight per daemon; the fake, the daemons and the server share this machine's {} cores.",
        TOKEN_DELAY.as_millis(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    Ok(())
}
