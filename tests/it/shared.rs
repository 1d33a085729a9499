//! Several daemons on one PostgreSQL ledger (INTERFACE.md, "Several daemons on one
//! ledger"): the real binaries, a real PostgreSQL (`src/testpg.rs`), the strict fake, and a
//! proxy per daemon that cuts it off the ledger.

use crate::fake::{Endpoint, FakeAtlassian, FakeSite, Fault};
use crate::util::pg::{PgDaemon, SharedLedger};
use crate::util::{TestDaemon, assert_no_secrets, eventually, import, metric, toml_str};
use serde_json::Value;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Generous bound of every wait: a condition that holds at all holds well within it.
const WAIT: Duration = Duration::from_secs(15);

/// The access token `d` serves for `label` (panics on any other answer).
fn token(d: &TestDaemon, label: &str) -> String {
    let (code, v) = d.get_json(&format!("/v1/connections/{label}/token"));
    assert_eq!(code, 200, "{v}");
    v["access_token"].as_str().unwrap().to_owned()
}

/// Whether `d` knows connection `label`.
fn knows(d: &TestDaemon, label: &str) -> bool {
    d.request("GET", &format!("/v1/connections/{label}"), None)
        .status
        == 200
}

/// `d`'s view of connection `label`.
fn connection(d: &TestDaemon, label: &str) -> Value {
    let (code, v) = d.get_json(&format!("/v1/connections/{label}"));
    assert_eq!(code, 200, "{v}");
    v
}

/// Whether `d`'s access token of `label` has expired (or it has none).
fn access_token_expired(d: &TestDaemon, label: &str) -> bool {
    connection(d, label)["access_token_expires_at"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .is_none_or(|t| t + chrono::Duration::seconds(1) <= chrono::Utc::now())
}

fn readyz(d: &TestDaemon) -> u16 {
    d.metrics_get("/readyz").map_or(0, |r| r.status)
}

fn logs(daemons: &[&PgDaemon]) -> String {
    daemons.iter().map(|d| d.daemon.logs()).collect()
}

#[test]
fn many_requests_over_three_daemons_cause_one_refresh_and_get_one_token() {
    let Some(ledger) = SharedLedger::new() else {
        return;
    };
    let fake = FakeAtlassian::start();
    fake.set_access_lifetime(Some(Duration::from_secs(4)));
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let nodes: Vec<PgDaemon> = ["a", "b", "c"]
        .iter()
        .map(|n| ledger.start(&fake, n))
        .collect();
    import(&nodes[0].daemon, "conf", &rt);
    for n in &nodes {
        assert!(
            eventually(WAIT, || knows(&n.daemon, "conf")),
            "every daemon learns of the import"
        );
    }
    for n in &nodes {
        assert!(
            eventually(WAIT, || access_token_expired(&n.daemon, "conf")),
            "the access token never expired"
        );
    }
    fake.set_token_delay(Duration::from_millis(1000));
    let before = fake.refresh_calls();
    let tokens: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..300)
            .map(|i| {
                let d = &nodes[i % nodes.len()].daemon;
                s.spawn(move || {
                    let r = d.request("GET", "/v1/connections/conf/token", None);
                    let t = if r.status == 200 {
                        r.json()["access_token"].as_str().unwrap().to_owned()
                    } else {
                        r.text()
                    };
                    (r.status, t)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all = logs(&nodes.iter().collect::<Vec<_>>());
    assert_eq!(
        fake.refresh_calls() - before,
        1,
        "300 callers over three daemons cause exactly one refresh\n{all}"
    );
    let first = &tokens[0].1;
    for (status, t) in &tokens {
        assert_eq!(*status, 200, "{t}");
        assert_eq!(t, first, "every caller on every daemon gets the same token");
    }
    assert_eq!(fake.access_token_account(first).as_deref(), Some("acct-1"));
    assert_eq!(fake.reuse_violations(), 0);
    assert_eq!(fake.leeway_reuses(), 0, "the one refresh was never doubled");
    assert!(fake.family_alive("acct-1"));
    assert_no_secrets(&all, &fake);
}

#[test]
fn a_token_refreshed_through_one_daemon_is_served_by_another_without_a_refresh() {
    let Some(ledger) = SharedLedger::new() else {
        return;
    };
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let a = ledger.start(&fake, "a");
    let b = ledger.start(&fake, "b");
    import(&a.daemon, "conf", &rt);
    assert!(eventually(WAIT, || knows(&b.daemon, "conf")));
    let calls = fake.refresh_calls();
    let first = token(&a.daemon, "conf");
    assert_eq!(
        token(&b.daemon, "conf"),
        first,
        "the import's token, cached"
    );

    let r = a
        .daemon
        .request("POST", "/v1/connections/conf/refresh", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(fake.refresh_calls(), calls + 1);
    let second = token(&a.daemon, "conf");
    assert_ne!(second, first);
    assert!(
        eventually(WAIT, || token(&b.daemon, "conf") == second),
        "the other daemon serves the new token"
    );
    assert_eq!(
        fake.refresh_calls(),
        calls + 1,
        "and did not refresh for it"
    );
    assert_eq!(
        b.daemon.cli(&["token", "conf"], None).stdout,
        format!("{second}\n").into_bytes()
    );
    assert_eq!(fake.reuse_violations(), 0);
    let text = b.daemon.metrics_get("/metrics").unwrap().text();
    assert!(text.contains("\ntokend_ledger_up 1\n"), "{text}");
    assert_no_secrets(&logs(&[&a, &b]), &fake);
}

#[test]
fn an_import_and_a_removal_through_one_daemon_show_on_the_other() {
    let Some(ledger) = SharedLedger::new() else {
        return;
    };
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let a = ledger.start(&fake, "a");
    let b = ledger.start(&fake, "b");
    // Both have read the (empty) ledger; what follows arrives by notification.
    assert!(!knows(&b.daemon, "conf"));
    import(&a.daemon, "conf", &rt);
    // Well inside the periodic re-read's interval (10 s): the notification brought it.
    assert!(
        eventually(Duration::from_secs(5), || knows(&b.daemon, "conf")),
        "the import shows on the other daemon"
    );
    // The import's account may be recorded in a write of its own after the row: b can see
    // the connection before its account, and must then see the account too.
    assert!(
        eventually(Duration::from_secs(5), || {
            connection(&b.daemon, "conf")["account_id"] == "acct-1"
        }),
        "the account shows on the other daemon: {}",
        connection(&b.daemon, "conf")
    );
    let on_b = connection(&b.daemon, "conf");
    assert_eq!(on_b["status"], "active");
    assert!(
        b.daemon
            .logs()
            .contains("connection added through another daemon")
    );

    let r = b.daemon.request("DELETE", "/v1/connections/conf", None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(
        eventually(Duration::from_secs(5), || !knows(&a.daemon, "conf")),
        "the removal shows on the other daemon"
    );
    assert_no_secrets(&logs(&[&a, &b]), &fake);
}

#[test]
fn a_daemon_cut_off_the_ledger_serves_its_cache_refreshes_nothing_and_catches_up() {
    let Some(ledger) = SharedLedger::new() else {
        return;
    };
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let a = ledger.start(&fake, "a");
    let b = ledger.start(&fake, "b");
    import(&a.daemon, "conf", &rt);
    assert!(eventually(WAIT, || knows(&b.daemon, "conf")));
    let cached = token(&b.daemon, "conf");
    assert_eq!(readyz(&b.daemon), 200);

    b.proxy.cut();
    assert!(
        eventually(WAIT, || readyz(&b.daemon) == 503),
        "a daemon that cannot write the ledger is not ready"
    );
    let (code, health) = b.daemon.get_json("/v1/health");
    assert_eq!(code, 503, "{health}");
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(
        eventually(WAIT, || b
            .daemon
            .metrics_get("/metrics")
            .is_ok_and(|r| r.text().contains("\ntokend_ledger_up 0\n"))),
        "tokend_ledger_up says so"
    );
    // The cached token is still served.
    assert_eq!(token(&b.daemon, "conf"), cached);
    // A refresh through it is not even tried: it cannot record the attempt.
    let calls = fake.refresh_calls();
    let r = b
        .daemon
        .request("POST", "/v1/connections/conf/refresh", None);
    assert_ne!(r.status, 200, "{}", r.text());
    assert_eq!(
        fake.refresh_calls(),
        calls,
        "a cut-off daemon refreshes nothing"
    );
    assert_eq!(connection(&b.daemon, "conf")["status"], "active");
    // The other daemon carries on.
    let r = a
        .daemon
        .request("POST", "/v1/connections/conf/refresh", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let newer = token(&a.daemon, "conf");
    assert_ne!(newer, cached);
    assert_eq!(fake.refresh_calls(), calls + 1);

    b.proxy.heal();
    assert!(
        eventually(WAIT, || readyz(&b.daemon) == 200),
        "healed, it is ready again"
    );
    assert!(
        eventually(WAIT, || token(&b.daemon, "conf") == newer),
        "and catches up with the chain the other daemon moved"
    );
    assert_eq!(
        fake.refresh_calls(),
        calls + 1,
        "without a refresh of its own"
    );
    assert_eq!(connection(&b.daemon, "conf")["status"], "active");
    assert_eq!(fake.reuse_violations(), 0);
    assert!(fake.family_alive("acct-1"));
    assert_no_secrets(&logs(&[&a, &b]), &fake);
}

#[test]
fn the_daemons_survive_a_postgresql_restart_and_reconnect_by_themselves() {
    let Some((cluster, ledger)) = SharedLedger::own_cluster() else {
        return;
    };
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let a = ledger.start(&fake, "a");
    let b = ledger.start(&fake, "b");
    import(&a.daemon, "conf", &rt);
    assert!(eventually(WAIT, || knows(&b.daemon, "conf")));
    let cached = token(&b.daemon, "conf");

    cluster.crash();
    for d in [&a, &b] {
        assert!(
            eventually(WAIT, || readyz(&d.daemon) == 503),
            "without the server, no daemon is ready"
        );
        assert_eq!(token(&d.daemon, "conf"), cached, "but both serve the cache");
    }
    let calls = fake.refresh_calls();
    cluster.restart();
    for d in [&a, &b] {
        assert!(
            eventually(WAIT, || readyz(&d.daemon) == 200),
            "the server back, every daemon is ready again"
        );
    }
    let r = a
        .daemon
        .request("POST", "/v1/connections/conf/refresh", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let newer = token(&a.daemon, "conf");
    assert!(
        eventually(WAIT, || token(&b.daemon, "conf") == newer),
        "the reconnected daemon takes the other daemon's commit"
    );
    assert_eq!(
        fake.refresh_calls(),
        calls + 1,
        "nothing was lost or doubled"
    );
    assert_eq!(fake.reuse_violations(), 0);
    assert!(fake.family_alive("acct-1"));
    assert_no_secrets(&logs(&[&a, &b]), &fake);
}

/// The site job's schedule in the tests of its spread: every 2 s.
const SITE_JOB_EVERY: &str = "*/2 * * * * *";

/// The seconds between two runs of [`SITE_JOB_EVERY`].
const SITE_JOB_PERIOD: f64 = 2.0;

/// Daemon `node` on `ledger` with the site job on [`SITE_JOB_EVERY`].
fn site_job_daemon(ledger: &SharedLedger, fake: &FakeAtlassian, node: &str) -> PgDaemon {
    let (b, proxy) = ledger.builder(fake, node);
    PgDaemon {
        daemon: b
            .set("jobs", "resolve_sites", &toml_str(SITE_JOB_EVERY))
            .start(),
        proxy,
    }
}

/// accessible-resources requests per account among the fake's requests after the first
/// `from`.
fn resource_calls(fake: &FakeAtlassian, from: usize) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for r in fake.requests().into_iter().skip(from) {
        if r.path == "/oauth/token/accessible-resources"
            && let Some(account) = r.account
        {
            *out.entry(account).or_default() += 1;
        }
    }
    out
}

/// How many site resolutions daemon `d` did itself (`tokend_site_resolutions_total`).
fn site_resolutions(d: &TestDaemon) -> f64 {
    let text = d.metrics_get("/metrics").unwrap().text();
    metric(&text, "tokend_site_resolutions_total{outcome=\"success\"}")
        + metric(&text, "tokend_site_resolutions_total{outcome=\"failure\"}")
}

/// The site URLs `d` shows for connection `label`.
fn site_urls(d: &TestDaemon, label: &str) -> Vec<String> {
    connection(d, label)["sites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["url"].as_str().unwrap().to_owned())
        .collect()
}

/// `count` accounts `acct-<i>`, each with a Confluence site `site-<i>`, imported through
/// `through` as `conn-<i>`, and known to every daemon of `all`.
fn import_many(fake: &FakeAtlassian, through: &TestDaemon, all: &[&PgDaemon], count: usize) {
    for i in 0..count {
        let rt = fake.issue_grant(
            &format!("acct-{i}"),
            &[FakeSite::confluence(&format!("site-{i}"))],
        );
        import(through, &format!("conn-{i}"), &rt);
    }
    for d in all {
        assert!(
            eventually(WAIT, || (0..count)
                .all(|i| knows(&d.daemon, &format!("conn-{i}")))),
            "every daemon learns of every import"
        );
    }
}

#[test]
fn the_site_job_resolves_each_connection_once_per_period_over_three_daemons() {
    let Some(ledger) = SharedLedger::new() else {
        return;
    };
    let fake = FakeAtlassian::start();
    let nodes: Vec<PgDaemon> = ["a", "b", "c"]
        .iter()
        .map(|n| site_job_daemon(&ledger, &fake, n))
        .collect();
    let all: Vec<&PgDaemon> = nodes.iter().collect();
    // More connections than one daemon resolves at once (16), each answer held longer than
    // the daemons' cron polls (every 500 ms) can be apart: the daemons firing at the same
    // tick must share the work.
    let count = 24;
    import_many(&fake, &nodes[0].daemon, &all, count);
    fake.set_outage(
        Endpoint::Resources,
        Some(Fault::Delay(Duration::from_millis(1500))),
    );
    let before: Vec<f64> = nodes.iter().map(|n| site_resolutions(&n.daemon)).collect();
    let from = fake.requests().len();
    let started = Instant::now();
    let min_calls = 4;
    assert!(
        eventually(Duration::from_secs(60), || {
            let calls = resource_calls(&fake, from);
            (0..count).all(|i| calls.get(&format!("acct-{i}")).copied().unwrap_or(0) >= min_calls)
        }),
        "every connection is resolved again and again: {:?}\n{}",
        resource_calls(&fake, from),
        logs(&all)
    );
    let calls = resource_calls(&fake, from);
    // The job's ticks in that time: a connection resolved once per tick was resolved at
    // most this often (one run per daemon per tick would be three times as often).
    let ticks = started.elapsed().as_secs_f64() / SITE_JOB_PERIOD + 1.0;
    for (account, n) in &calls {
        assert!(
            (*n as f64) <= ticks + 1.0,
            "{account} was resolved {n} times in {ticks:.1} ticks: {calls:?}"
        );
    }
    let did: Vec<f64> = nodes
        .iter()
        .zip(&before)
        .map(|(n, b)| site_resolutions(&n.daemon) - b)
        .collect();
    assert!(
        did.iter().filter(|n| **n > 0.0).count() >= 2,
        "the resolutions are spread over the daemons: {did:?}"
    );
    let total: usize = calls.values().sum();
    assert!(
        did.iter().sum::<f64>() >= total as f64 - count as f64,
        "each daemon's metric counts its own resolutions: {did:?}, {total} calls"
    );

    // A site added at the provider reaches every daemon: the one resolving it announces it
    // (well inside the periodic re-read's 10 s).
    fake.set_outage(Endpoint::Resources, None);
    let soon = Duration::from_secs(5);
    fake.add_site("acct-0", FakeSite::jira("newco"));
    for n in &nodes {
        assert!(
            eventually(soon, || site_urls(&n.daemon, "conn-0")
                .contains(&"https://newco.atlassian.net".to_owned())),
            "the added site shows on every daemon: {:?}\n{}",
            site_urls(&n.daemon, "conn-0"),
            logs(&all)
        );
    }
    for n in &nodes {
        let (code, v) = n.daemon.get_json("/v1/token?site=newco.atlassian.net");
        assert_eq!(code, 200, "{v}");
        assert_eq!(
            fake.access_token_account(v["access_token"].as_str().unwrap())
                .as_deref(),
            Some("acct-0")
        );
        let listed = n.daemon.get_json("/v1/connections").1;
        assert!(
            listed.to_string().contains("https://newco.atlassian.net"),
            "{listed}"
        );
    }
    // And a removed one leaves every daemon.
    fake.remove_site("acct-0", &FakeSite::cloud_id_for("site-0"));
    for n in &nodes {
        assert!(
            eventually(soon, || !site_urls(&n.daemon, "conn-0")
                .contains(&"https://site-0.atlassian.net".to_owned())),
            "the removed site leaves every daemon: {:?}",
            site_urls(&n.daemon, "conn-0")
        );
    }
    assert_eq!(fake.reuse_violations(), 0);
    assert_no_secrets(&logs(&all), &fake);
}

#[test]
fn a_daemon_killed_mid_site_job_leaves_its_connections_to_the_others_after_the_lease() {
    let Some(ledger) = SharedLedger::new() else {
        return;
    };
    let fake = FakeAtlassian::start();
    let mut a = site_job_daemon(&ledger, &fake, "a");
    let count = 6;
    import_many(&fake, &a.daemon, &[&a], count);
    // a alone runs the job: it claims every connection and waits on the held answers.
    fake.set_outage(
        Endpoint::Resources,
        Some(Fault::Delay(Duration::from_secs(60))),
    );
    let from = fake.requests().len();
    assert!(
        eventually(WAIT, || resource_calls(&fake, from).len() == count),
        "a asks for every connection's sites: {:?}",
        resource_calls(&fake, from)
    );
    let held = ledger.query_i64(
        "SELECT count(*) FROM site_checks WHERE holder LIKE 'a#%' AND lease_until > now()",
    );
    assert!(held > 0, "a holds claims when it dies");
    a.daemon.kill9();
    fake.set_outage(Endpoint::Resources, None);

    let others = [
        site_job_daemon(&ledger, &fake, "b"),
        site_job_daemon(&ledger, &fake, "c"),
    ];
    let from = fake.requests().len();
    assert!(
        eventually(Duration::from_secs(40), || {
            let calls = resource_calls(&fake, from);
            (0..count).all(|i| calls.contains_key(&format!("acct-{i}")))
        }),
        "the others resolve every connection, a's claims included once they lapse: {:?}\n{}",
        resource_calls(&fake, from),
        logs(&others.iter().collect::<Vec<_>>())
    );
    assert_eq!(
        ledger.query_i64("SELECT count(*) FROM site_checks WHERE holder LIKE 'a#%'"),
        0,
        "nothing is left to the dead daemon"
    );
    assert_no_secrets(&logs(&others.iter().collect::<Vec<_>>()), &fake);
}

#[test]
fn maintenance_runs_once_per_period_across_daemons_and_nobody_stalls() {
    let Some(ledger) = SharedLedger::new() else {
        return;
    };
    let fake = FakeAtlassian::start();
    let nodes: Vec<PgDaemon> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            let (b, proxy) = ledger.builder(&fake, n);
            PgDaemon {
                daemon: b
                    .set("jobs", "maintenance", &toml_str(SITE_JOB_EVERY))
                    .start(),
                proxy,
            }
        })
        .collect();
    let all: Vec<&PgDaemon> = nodes.iter().collect();
    let count_in = |text: &str, what: &str| text.matches(what).count();
    let ran = || count_in(&logs(&all), "maintenance ran");
    let started = Instant::now();
    let runs = 4;
    assert!(
        eventually(Duration::from_secs(40), || ran() >= runs),
        "maintenance runs\n{}",
        logs(&all)
    );
    let (ran, text) = (ran(), logs(&all));
    let ticks = started.elapsed().as_secs_f64() / SITE_JOB_PERIOD + 1.0;
    assert!(
        (ran as f64) <= ticks + 1.0,
        "one run per period across the daemons: {ran} runs in {ticks:.1} ticks\n{text}"
    );
    assert!(
        count_in(
            &text,
            "maintenance skipped: another daemon ran it this period"
        ) >= ran,
        "the others skip it\n{text}"
    );
    for n in &nodes {
        let (code, health) = n.daemon.get_json("/v1/health");
        assert_eq!(code, 200, "a skipped run is not a stall: {health}");
        assert_eq!(health["stalled_jobs"], serde_json::json!([]), "{health}");
    }
}

#[test]
fn show_through_another_daemon_names_the_daemon_holding_a_refresh_in_flight() {
    let Some(ledger) = SharedLedger::new() else {
        return;
    };
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let a = ledger.start(&fake, "a");
    let b = ledger.start(&fake, "b");
    import(&a.daemon, "conf", &rt);
    assert!(eventually(WAIT, || knows(&b.daemon, "conf")));
    assert!(
        connection(&b.daemon, "conf").get("claim").is_none(),
        "no refresh in flight, no claim: {}",
        connection(&b.daemon, "conf")
    );
    let shown = b.daemon.cli(&["show", "conf"], None);
    assert!(shown.status.success(), "{shown:?}");
    assert!(!String::from_utf8_lossy(&shown.stdout).contains("refresh claimed by"));

    // The fake holds its answer: A's refresh is in flight, A holding the claim, for as long
    // as the checks through B take (below A's request timeout, 3 s).
    fake.set_token_delay(Duration::from_millis(2000));
    let calls = fake.refresh_calls();
    std::thread::scope(|s| {
        let refresh = s.spawn(|| {
            a.daemon
                .request("POST", "/v1/connections/conf/refresh", None)
        });
        assert!(
            eventually(WAIT, || fake.refresh_calls() > calls),
            "A sends its refresh"
        );
        let v = connection(&b.daemon, "conf");
        let node = v["claim"]["node"].as_str().unwrap_or_default().to_owned();
        assert!(node.starts_with("a#"), "B names A as the holder: {v}");
        let until = chrono::DateTime::parse_from_rfc3339(v["claim"]["until"].as_str().unwrap())
            .expect("until is RFC 3339");
        assert!(until > chrono::Utc::now(), "the claim runs: {v}");
        let shown = b.daemon.cli(&["show", "conf"], None);
        assert!(shown.status.success(), "{shown:?}");
        let text = String::from_utf8_lossy(&shown.stdout).into_owned();
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("refresh claimed by: {node} (until "))),
            "{text}"
        );
        // The list route does not carry it.
        let (code, list) = b.daemon.get_json("/v1/connections");
        assert_eq!(code, 200);
        assert!(list[0].get("claim").is_none(), "{list}");
        let r = refresh.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    });
    fake.set_token_delay(Duration::ZERO);
    assert!(
        eventually(WAIT, || connection(&b.daemon, "conf")
            .get("claim")
            .is_none()),
        "the refresh over, its claim is gone: {}",
        connection(&b.daemon, "conf")
    );
    let shown = b.daemon.cli(&["show", "conf"], None);
    assert!(!String::from_utf8_lossy(&shown.stdout).contains("refresh claimed by"));
    assert_eq!(fake.refresh_calls(), calls + 1);
    assert_eq!(fake.reuse_violations(), 0);
    assert_no_secrets(&logs(&[&a, &b]), &fake);
}
