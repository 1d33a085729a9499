//! Issue 14's takeover and chaos tests: three real daemons on one PostgreSQL ledger (the
//! tests' own cluster, `src/testpg.rs`), each behind a proxy that can cut it off
//! (`util/proxy.rs`), against the strict fake, while daemons are paused past their lease
//! (SIGSTOP), killed with SIGKILL and restarted, and cut off the ledger; and PostgreSQL
//! itself restarted (stopped past the lease, started again) under load.
//!
//! What "every rotation happened once" means here, as the fake can check it: a refresh
//! token is exchanged at the fake at most once, except that its parent is presented again
//! inside the reuse leeway when the answer to the first exchange was lost (a daemon killed,
//! paused or cut off while the request was in flight). So: 0 reuse violations (no token
//! ever presented outside those rules), at most one leeway reuse per disruption and chain
//! (a disruption loses at most the one answer in flight on each chain), and **none** while
//! nothing is disrupted (a calm phase at the end in which every chain rotates again). The
//! ledger's side of it: after the calm phase the chain every daemon serves is the fake's
//! current one (its access token accepted by `/me`), so no daemon holds a forked chain.

use crate::fake::{FakeAtlassian, FakeSite};
use crate::util::pg::{PgDaemon, SharedLedger};
use crate::util::{
    HttpResponse, TestDaemon, assert_no_secrets, build_request, eventually, import, metric,
    parse_response, toml_str,
};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Generous bound of every wait for an outcome: a condition that holds at all holds well
/// within it (the machine running the tests may be shared and slow).
const WAIT: Duration = Duration::from_secs(20);

/// `ledger.lease` of every daemon here: short, so that a paused daemon's claim lapses soon.
const LEASE: Duration = Duration::from_secs(3);

/// `refresh.request_timeout`: it must stay below the lease (a daemon sends a request only
/// while its claim has this long left).
const REQUEST_TIMEOUT: &str = "2s";

/// How long a pause or a cut lasts: past the lease, so that the others may take over.
const PAST_LEASE: Duration = Duration::from_millis(4500);

/// Rounds of the chaos test by default: about 5 s each (a kill round less), which keeps the
/// test, setup and settling included, within CI's minute.
const DEFAULT_ROUNDS: u64 = 8;

/// Connections rotating in the chaos test.
const CHAINS: usize = 3;

/// How long the fake holds every token answer in the chaos test: a refresh is in flight a
/// good part of the time, so that disruptions catch some mid-request (lost answers, takeovers,
/// fenced commits), well below `REQUEST_TIMEOUT`.
const CHAOS_TOKEN_DELAY: Duration = Duration::from_millis(400);

/// How long a client's request through a socket may take before it counts as failed (a
/// paused daemon answers nothing until it is continued).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Daemon `node` on `ledger`, with the short lease and request timeout above; `rotate` sets
/// `refresh.rotate_after` and the access token margin for chains that rotate all the time.
fn start(ledger: &SharedLedger, fake: &FakeAtlassian, node: &str, rotate: bool) -> PgDaemon {
    let (mut b, proxy) = ledger.builder(fake, node);
    b = b
        .set(
            "ledger",
            "lease",
            &toml_str(&format!("{}s", LEASE.as_secs())),
        )
        .set("refresh", "request_timeout", &toml_str(REQUEST_TIMEOUT));
    if rotate {
        b = b.set("refresh", "rotate_after", &toml_str("1s")).set(
            "refresh",
            "access_token_margin",
            &toml_str("1s"),
        );
    }
    PgDaemon {
        daemon: b.start(),
        proxy,
    }
}

/// The access token `d` serves for `label` (panics on any other answer).
fn token(d: &TestDaemon, label: &str) -> String {
    let (code, v) = d.get_json(&format!("/v1/connections/{label}/token"));
    assert_eq!(code, 200, "{v}");
    v["access_token"].as_str().unwrap().to_owned()
}

/// The access token `d` serves for `label`, or `None` on any other answer.
fn try_token(d: &TestDaemon, label: &str) -> Option<String> {
    let r = d
        .try_request("GET", &format!("/v1/connections/{label}/token"), &[], None)
        .ok()?;
    (r.status == 200).then(|| r.json()["access_token"].as_str().unwrap().to_owned())
}

/// `d`'s status of connection `label` ("" when it does not know it).
fn status(d: &TestDaemon, label: &str) -> String {
    let (code, v) = d.get_json(&format!("/v1/connections/{label}"));
    if code != 200 {
        return String::new();
    }
    v["status"].as_str().unwrap_or_default().to_owned()
}

/// Whether `d`'s access token of `label` has expired (or it has none).
fn access_token_expired(d: &TestDaemon, label: &str) -> bool {
    let (code, v) = d.get_json(&format!("/v1/connections/{label}"));
    assert_eq!(code, 200, "{v}");
    v["access_token_expires_at"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .is_none_or(|t| t + chrono::Duration::seconds(1) <= chrono::Utc::now())
}

/// The value of a metric series on `d`'s metrics listener.
fn metric_of(d: &TestDaemon, series: &str) -> f64 {
    metric(&d.metrics_get("/metrics").unwrap().text(), series)
}

/// `d`'s `/readyz` status (0 when the metrics listener does not answer).
fn readyz(d: &TestDaemon) -> u16 {
    d.metrics_get("/readyz").map_or(0, |r| r.status)
}

fn logs(daemons: &[PgDaemon]) -> String {
    daemons.iter().map(|d| d.daemon.logs()).collect()
}

/// One GET on the socket at `path` (a client thread's own connection, independent of the
/// [`TestDaemon`] that the chaos thread restarts), with a short timeout.
fn client_get(socket: &Path, path: &str) -> Option<HttpResponse> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).ok()?;
    s.set_write_timeout(Some(CLIENT_TIMEOUT)).ok()?;
    s.write_all(&build_request("GET", path, "localhost", &[], None))
        .ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return parse_response(&buf, true).ok().flatten(),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if let Ok(Some(r)) = parse_response(&buf, false) {
                    return Some(r);
                }
            }
            Err(_) => return None,
        }
    }
}

#[test]
fn a_daemon_paused_mid_refresh_past_its_lease_is_taken_over_and_its_late_commit_refused() {
    let Some(ledger) = SharedLedger::new() else {
        return;
    };
    let fake = FakeAtlassian::start();
    fake.set_access_lifetime(Some(Duration::from_secs(4)));
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let nodes: Vec<PgDaemon> = ["a", "b", "c"]
        .iter()
        .map(|n| start(&ledger, &fake, n, false))
        .collect();
    import(&nodes[0].daemon, "conf", &rt);
    for n in &nodes {
        assert!(
            eventually(WAIT, || status(&n.daemon, "conf") == "active"),
            "every daemon learns of the import"
        );
    }
    for n in &nodes {
        assert!(
            eventually(WAIT, || access_token_expired(&n.daemon, "conf")),
            "the access token never expired"
        );
    }
    // Tokens minted from now on do not expire: what the daemons serve stays put unless a
    // daemon refreshes, so "the newest token" is one token.
    fake.set_access_lifetime(None);
    let conflicts_before = metric_of(&nodes[0].daemon, "tokend_lease_conflicts_total");
    let refreshes = fake.refresh_calls();
    // The fake rotates the chain at once and holds its answer: A is mid-refresh, holding
    // the claim, when it is paused; the answer waits in its socket. The hold leaves ample
    // room for the pause to land first, and stays below A's request timeout.
    fake.set_token_delay(Duration::from_millis(1500));
    let (a_answer, b_token) = std::thread::scope(|s| {
        let a = &nodes[0].daemon;
        let a_thread = s.spawn(move || {
            a.try_request("GET", "/v1/connections/conf/token", &[], None)
                .map(|r| r.status)
        });
        assert!(
            eventually(WAIT, || fake.refresh_calls() > refreshes),
            "A sends its refresh"
        );
        a.signal("STOP");
        fake.set_token_delay(Duration::ZERO);
        let paused = Instant::now();
        // Token requests through B: refused as "another daemon is refreshing" (503, try
        // again) while A's claim holds, then B takes over and refreshes.
        let mut b_token = None;
        assert!(
            eventually(WAIT, || {
                b_token = try_token(&nodes[1].daemon, "conf");
                b_token.is_some()
            }),
            "B takes over the chain of the paused A"
        );
        let b_token = b_token.unwrap();
        // A stays paused past its lease in any case, then its late answer arrives.
        while paused.elapsed() < PAST_LEASE {
            std::thread::sleep(Duration::from_millis(100));
        }
        a.signal("CONT");
        (a_thread.join().unwrap(), b_token)
    });
    let all = logs(&nodes);
    assert_eq!(
        fake.refresh_calls() - refreshes,
        2,
        "A's refresh and B's takeover, nothing else\n{all}"
    );
    assert_eq!(fake.reuse_violations(), 0, "{all}");
    assert_eq!(
        fake.leeway_reuses(),
        1,
        "B presented the token whose answer A never committed, inside the leeway\n{all}"
    );
    assert!(fake.family_alive("acct-1"), "{all}");
    assert_eq!(
        fake.access_token_account(&b_token).as_deref(),
        Some("acct-1"),
        "B's token is valid at the fake"
    );
    // Continued, A finds its request's timeout passed and its answer waiting, whichever it
    // takes first: either way its write under the lapsed claim (the rotated chain, or the
    // record of an unknown outcome) is refused, and it serves B's token, not its own.
    assert!(
        metric_of(&nodes[0].daemon, "tokend_lease_conflicts_total") > conflicts_before,
        "A counts the refused write\n{all}"
    );
    eprintln!("A's caller was answered {a_answer:?}");
    for n in &nodes {
        assert!(
            eventually(WAIT, || try_token(&n.daemon, "conf").as_deref()
                == Some(b_token.as_str())),
            "{} serves the newest token\n{all}",
            n.daemon.dir().display()
        );
        assert_eq!(status(&n.daemon, "conf"), "active");
    }
    // The ledger holds the fake's current refresh token: one more refresh through C is a
    // plain rotation, no leeway reuse.
    let r = nodes[2]
        .daemon
        .request("POST", "/v1/connections/conf/refresh", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(fake.leeway_reuses(), 1, "the ledger held the current token");
    assert_eq!(fake.reuse_violations(), 0);
    let newest = token(&nodes[2].daemon, "conf");
    for n in &nodes {
        assert!(eventually(WAIT, || try_token(&n.daemon, "conf").as_deref()
            == Some(newest.as_str())));
    }
    assert!(fake.family_alive("acct-1"));
    assert_no_secrets(&logs(&nodes), &fake);
}

/// A small seeded generator (SplitMix64): the schedule repeats from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A number from the environment variable `name`, or `default`.
fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} is not a number: {v}"))
        })
        .unwrap_or(default)
}

#[test]
fn chaos_over_three_daemons_loses_no_chain_and_spends_every_token_once() {
    let Some(ledger) = SharedLedger::new() else {
        return;
    };
    let seed = env_u64(
        "TOKEND_CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let rounds = env_u64("TOKEND_CHAOS_ROUNDS", DEFAULT_ROUNDS);
    eprintln!("chaos: TOKEND_CHAOS_SEED={seed} TOKEND_CHAOS_ROUNDS={rounds}");
    let mut rng = Rng(seed);

    let fake = FakeAtlassian::start();
    fake.set_access_lifetime(Some(Duration::from_secs(3)));
    fake.set_token_delay(CHAOS_TOKEN_DELAY);
    let accounts: Vec<String> = (0..CHAINS).map(|i| format!("acct-{i}")).collect();
    let labels: Vec<String> = (0..CHAINS).map(|i| format!("conn-{i}")).collect();
    let mut nodes: Vec<PgDaemon> = ["a", "b", "c"]
        .iter()
        .map(|n| start(&ledger, &fake, n, true))
        .collect();
    for (account, label) in accounts.iter().zip(&labels) {
        let rt = fake.issue_grant(account, &[FakeSite::confluence(account)]);
        import(&nodes[0].daemon, label, &rt);
    }
    for n in &nodes {
        for label in &labels {
            assert!(
                eventually(WAIT, || status(&n.daemon, label) == "active"),
                "every daemon learns of every import"
            );
        }
    }

    // Clients: one thread per daemon, requesting every chain's token in turn. Failures are
    // expected while their daemon is down, paused or cut off; what they are served is
    // checked at the end, when it must be right.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let sockets: Vec<PathBuf> = nodes
        .iter()
        .map(|n| n.daemon.socket_path().to_owned())
        .collect();
    let clients: Vec<_> = sockets
        .into_iter()
        .map(|socket| {
            let (stop, served, labels) = (stop.clone(), served.clone(), labels.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let path = format!("/v1/connections/{}/token", labels[i % labels.len()]);
                    if client_get(&socket, &path).is_some_and(|r| r.status == 200) {
                        served.fetch_add(1, Ordering::SeqCst);
                    }
                    i += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        })
        .collect();

    let started = Instant::now();
    let mut disruptions = 0;
    for round in 0..rounds {
        let victim = rng.below(nodes.len() as u64) as usize;
        let action = rng.below(3);
        // Lets the chains rotate a little between disruptions, at a random phase.
        std::thread::sleep(Duration::from_millis(200 + rng.below(1000)));
        let n = &mut nodes[victim];
        let what = match action {
            0 => {
                n.daemon.kill9();
                n.daemon.restart();
                "kill -9 and restart"
            }
            1 => {
                n.daemon.signal("STOP");
                std::thread::sleep(PAST_LEASE);
                n.daemon.signal("CONT");
                "SIGSTOP past the lease, SIGCONT"
            }
            _ => {
                n.proxy.cut();
                std::thread::sleep(PAST_LEASE);
                n.proxy.heal();
                "cut off the ledger past the lease, healed"
            }
        };
        disruptions += 1;
        eprintln!(
            "chaos: round {round} at {:?}: daemon {victim}: {what}",
            started.elapsed()
        );
    }
    let chaos_leeway_reuses = fake.leeway_reuses();
    let all = || logs(&nodes);
    assert_eq!(fake.reuse_violations(), 0, "seed {seed}\n{}", all());
    assert!(
        chaos_leeway_reuses <= disruptions * CHAINS,
        "seed {seed}: {chaos_leeway_reuses} leeway reuses for {disruptions} disruptions of \
         {CHAINS} chains: a token was spent twice without a lost answer\n{}",
        all()
    );

    // Settle: every daemon ready again, every chain alive and active everywhere.
    for n in &nodes {
        assert!(
            eventually(WAIT, || n
                .daemon
                .metrics_get("/readyz")
                .is_ok_and(|r| r.status == 200)),
            "seed {seed}: {} is ready again\n{}",
            n.daemon.dir().display(),
            all()
        );
    }
    // Then every chain rotates once more: an answer lost in the last disruption is retried
    // (a leeway reuse) by the chain's next rotation at the latest.
    let settled_from: Vec<usize> = accounts.iter().map(|a| fake.rotations(a)).collect();
    for (account, from) in accounts.iter().zip(&settled_from) {
        assert!(
            eventually(WAIT, || fake.rotations(account) > *from),
            "seed {seed}: {account} rotates after the chaos\n{}",
            all()
        );
    }
    assert!(
        fake.leeway_reuses() <= disruptions * CHAINS,
        "seed {seed}: more leeway reuses than answers the disruptions can have lost"
    );
    // Calm: no disruption now; every chain rotates at least twice more at the fake, and not
    // one of those rotations may be a leeway reuse (a token spent twice).
    let calm_from: Vec<usize> = accounts.iter().map(|a| fake.rotations(a)).collect();
    let calm_reuses = fake.leeway_reuses();
    for (account, from) in accounts.iter().zip(&calm_from) {
        assert!(
            eventually(WAIT, || fake.rotations(account) >= from + 2),
            "seed {seed}: {account} keeps rotating after the chaos\n{}",
            all()
        );
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(
        fake.leeway_reuses(),
        calm_reuses,
        "seed {seed}: without disruptions every token is spent once\n{}",
        all()
    );
    assert_eq!(fake.reuse_violations(), 0, "seed {seed}\n{}", all());
    for (account, label) in accounts.iter().zip(&labels) {
        assert!(fake.family_alive(account), "seed {seed}: {account} lost");
        for n in &nodes {
            assert_eq!(
                status(&n.daemon, label),
                "active",
                "seed {seed}: {label} on {}",
                n.daemon.dir().display()
            );
            assert!(
                eventually(WAIT, || try_token(&n.daemon, label)
                    .is_some_and(
                        |t| fake.access_token_account(&t).as_deref() == Some(account.as_str())
                    )),
                "seed {seed}: {label} on {} serves a token the fake accepts\n{}",
                n.daemon.dir().display(),
                all()
            );
        }
    }
    assert!(served.load(Ordering::SeqCst) > 0, "the clients were served");
    eprintln!(
        "chaos: seed {seed}, {rounds} rounds, {CHAINS} chains: {} rotations, {} leeway \
         reuses (at most one per disruption and chain), 0 reuse violations, {} tokens served \
         in {:?}",
        fake.total_rotations(),
        fake.leeway_reuses(),
        served.load(Ordering::SeqCst),
        started.elapsed()
    );
    assert_no_secrets(&all(), &fake);
}

/// The access tokens' lifetime in the restart test: far beyond the outage, so that every
/// daemon can serve what it has in memory while PostgreSQL is down (the refresh tokens still
/// rotate every second, `rotate_after = 1s`).
const RESTART_ACCESS_LIFETIME: Duration = Duration::from_secs(60);

/// How long the fake holds every token answer in the restart test: with three chains
/// rotating every second, a refresh is often in flight when the server goes down.
const RESTART_TOKEN_DELAY: Duration = Duration::from_millis(200);

/// Every chain's version in the ledger, by label, read as a daemon would (the same key).
fn chain_versions(
    cluster: &crate::util::pg::testpg::Cluster,
    ledger: &SharedLedger,
) -> std::collections::BTreeMap<String, u64> {
    let keys = tokend::ledger::seal::KeySource {
        key_file: Some(ledger.key_file()),
        old_key_files: vec![],
    };
    let scratch = tempfile::tempdir().unwrap();
    let url = cluster.url(ledger.database());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let pg = tokend::ledger::PgLedger::connect(&url, &keys, scratch.path())
                .await
                .unwrap();
            pg.load_all().await.unwrap()
        })
        .into_iter()
        .map(|rec| (rec.conn.label.clone(), rec.chain.version))
        .collect()
}

#[test]
fn three_daemons_under_load_survive_a_postgresql_restart_lose_nothing_and_rotate_on() {
    let Some((cluster, ledger)) = SharedLedger::own_cluster() else {
        return;
    };
    let fake = FakeAtlassian::start();
    fake.set_access_lifetime(Some(RESTART_ACCESS_LIFETIME));
    fake.set_token_delay(RESTART_TOKEN_DELAY);
    let accounts: Vec<String> = (0..CHAINS).map(|i| format!("acct-{i}")).collect();
    let labels: Vec<String> = (0..CHAINS).map(|i| format!("conn-{i}")).collect();
    let mut nodes: Vec<PgDaemon> = ["a", "b", "c"]
        .iter()
        .map(|n| start(&ledger, &fake, n, true))
        .collect();
    for (account, label) in accounts.iter().zip(&labels) {
        let rt = fake.issue_grant(account, &[FakeSite::confluence(account)]);
        import(&nodes[0].daemon, label, &rt);
    }
    for n in &nodes {
        for label in &labels {
            assert!(
                eventually(WAIT, || status(&n.daemon, label) == "active"),
                "every daemon learns of every import"
            );
        }
    }

    // Clients: one thread per daemon asking for every chain's token in turn; what they are
    // served while the server is down is counted apart.
    let stop = Arc::new(AtomicBool::new(false));
    let down = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let served_down = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = nodes
        .iter()
        .map(|n| {
            let socket = n.daemon.socket_path().to_owned();
            let (stop, down, served, served_down, labels) = (
                stop.clone(),
                down.clone(),
                served.clone(),
                served_down.clone(),
                labels.clone(),
            );
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    // Read before the request: a request counted as "while down" began after
                    // the server had stopped.
                    let was_down = down.load(Ordering::SeqCst);
                    let path = format!("/v1/connections/{}/token", labels[i % labels.len()]);
                    if client_get(&socket, &path).is_some_and(|r| r.status == 200) {
                        served.fetch_add(1, Ordering::SeqCst);
                        if was_down && down.load(Ordering::SeqCst) {
                            served_down.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    i += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    let all = |nodes: &[PgDaemon]| format!("{}\n{}", logs(nodes), cluster.log());

    // Under load: every chain rotates a couple of times before the restart.
    let loaded_from: Vec<usize> = accounts.iter().map(|a| fake.rotations(a)).collect();
    for (account, from) in accounts.iter().zip(&loaded_from) {
        assert!(
            eventually(WAIT, || fake.rotations(account) >= from + 2),
            "{account} rotates under load\n{}",
            all(&nodes)
        );
    }
    let versions_before = chain_versions(&cluster, &ledger);
    assert_eq!(versions_before.len(), CHAINS);

    // Down: held until every daemon has said so and past the lease (a claim held when the
    // server stopped has lapsed when it is back), and until a client was served meanwhile.
    cluster.stop();
    down.store(true, Ordering::SeqCst);
    let stopped = Instant::now();
    let calls_at_stop = fake.refresh_calls();
    for n in &nodes {
        assert!(
            eventually(WAIT, || readyz(&n.daemon) == 503),
            "{}: without the server a daemon is not ready\n{}",
            n.daemon.dir().display(),
            all(&nodes)
        );
        assert!(
            eventually(WAIT, || metric_of(&n.daemon, "tokend_ledger_up") == 0.0),
            "{}: tokend_ledger_up says so",
            n.daemon.dir().display()
        );
    }
    assert!(
        eventually(WAIT, || served_down.load(Ordering::SeqCst) > 0),
        "cached tokens are served while the server is down\n{}",
        all(&nodes)
    );
    while stopped.elapsed() < PAST_LEASE {
        std::thread::sleep(Duration::from_millis(100));
    }
    // No refresh starts without the ledger (its marker cannot be written): at most the one
    // already cleared to go on each chain reaches the fake.
    let calls_down = fake.refresh_calls() - calls_at_stop;
    assert!(
        calls_down <= CHAINS,
        "{calls_down} refreshes sent while the server was down\n{}",
        all(&nodes)
    );
    for n in &mut nodes {
        assert!(
            n.daemon.is_running(),
            "{} died while the server was down\n{}",
            n.daemon.dir().display(),
            n.daemon.logs()
        );
    }
    let down_for = stopped.elapsed();
    down.store(false, Ordering::SeqCst);
    cluster.restart();
    for n in &nodes {
        assert!(
            eventually(WAIT, || readyz(&n.daemon) == 200),
            "{}: the server back, every daemon is ready again by itself\n{}",
            n.daemon.dir().display(),
            all(&nodes)
        );
        assert!(
            eventually(WAIT, || metric_of(&n.daemon, "tokend_ledger_up") == 1.0),
            "{}: tokend_ledger_up says so",
            n.daemon.dir().display()
        );
    }
    assert_eq!(fake.reuse_violations(), 0, "{}", all(&nodes));
    // Settle: every chain rotates once more, so that an answer the restart lost (a commit
    // whose outcome was unknown) has been retried, inside the leeway, by then.
    let settled_from: Vec<usize> = accounts.iter().map(|a| fake.rotations(a)).collect();
    for (account, from) in accounts.iter().zip(&settled_from) {
        assert!(
            eventually(WAIT, || fake.rotations(account) > *from),
            "{account} rotates after the restart\n{}",
            all(&nodes)
        );
    }
    // One disruption loses at most the one answer in flight on each chain.
    let restart_reuses = fake.leeway_reuses();
    assert!(
        restart_reuses <= CHAINS,
        "{restart_reuses} leeway reuses for one restart of {CHAINS} chains\n{}",
        all(&nodes)
    );

    // Calm: every chain rotates at least twice more, and not one of those rotations spends
    // a token twice.
    let calm_from: Vec<usize> = accounts.iter().map(|a| fake.rotations(a)).collect();
    for (account, from) in accounts.iter().zip(&calm_from) {
        assert!(
            eventually(WAIT, || fake.rotations(account) >= from + 2),
            "{account} keeps rotating after the restart\n{}",
            all(&nodes)
        );
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(
        fake.leeway_reuses(),
        restart_reuses,
        "without disruptions every token is spent once\n{}",
        all(&nodes)
    );
    assert_eq!(fake.reuse_violations(), 0, "{}", all(&nodes));
    let versions_after = chain_versions(&cluster, &ledger);
    for (label, before) in &versions_before {
        assert!(
            versions_after[label] > *before,
            "{label}'s chain version grew after the restart: {before} -> {}",
            versions_after[label]
        );
    }
    for (account, label) in accounts.iter().zip(&labels) {
        assert!(fake.family_alive(account), "{account} lost");
        for n in &nodes {
            assert_eq!(
                status(&n.daemon, label),
                "active",
                "{label} on {}",
                n.daemon.dir().display()
            );
            assert!(
                eventually(WAIT, || try_token(&n.daemon, label)
                    .is_some_and(
                        |t| fake.access_token_account(&t).as_deref() == Some(account.as_str())
                    )),
                "{label} on {} serves a token the fake accepts\n{}",
                n.daemon.dir().display(),
                all(&nodes)
            );
        }
    }
    for n in &mut nodes {
        assert!(n.daemon.is_running(), "{}", n.daemon.dir().display());
    }
    eprintln!(
        "restart: down {down_for:?} ({} refreshes sent meanwhile, {} tokens served), {} \
         rotations, {restart_reuses} leeway reuses, {} tokens served in all",
        calls_down,
        served_down.load(Ordering::SeqCst),
        fake.total_rotations(),
        served.load(Ordering::SeqCst)
    );
    assert_no_secrets(&logs(&nodes), &fake);
}
