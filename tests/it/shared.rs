//! Several daemons on one PostgreSQL ledger (INTERFACE.md, "Several daemons on one
//! ledger"): the real binaries, a real PostgreSQL (`src/testpg.rs`), the strict fake, and a
//! proxy per daemon that cuts it off the ledger.

use crate::fake::{FakeAtlassian, FakeSite};
use crate::util::pg::{PgDaemon, SharedLedger};
use crate::util::{TestDaemon, assert_no_secrets, eventually, import};
use serde_json::Value;
use std::time::Duration;

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
