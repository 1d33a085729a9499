//! Keeping chains alive unattended: deadline scheduling, catch-up, back-pressure, site
//! re-resolution, rejections and notifications — with short durations against the fake.

use crate::fake::{Endpoint, FakeAtlassian, FakeSite, Fault};
use crate::util::{
    TestDaemon, assert_no_secrets, eventually, import, metric, open_ledger, toml_str,
};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn add(d: &TestDaemon, label: &str, rt: &str) -> Value {
    let r = d.post_json(
        "/v1/connections",
        &json!({"provider": "atlassian", "label": label, "refresh_token": rt}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()
}

fn statuses(d: &TestDaemon) -> Vec<(String, String)> {
    let (code, v) = d.get_json("/v1/connections");
    assert_eq!(code, 200);
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["label"].as_str().unwrap().to_owned(),
                c["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn unused_chains_survive_many_rotations() {
    let fake = FakeAtlassian::start();
    fake.set_inactivity_expiry(Duration::from_secs(6));
    let d = TestDaemon::builder(&fake)
        .set("refresh", "rotate_after", &toml_str("2s"))
        .set("refresh", "inactivity_expiry", &toml_str("6s"))
        .start();
    let accounts: Vec<String> = (0..50).map(|i| format!("acct-{i:02}")).collect();
    for (i, a) in accounts.iter().enumerate() {
        let rt = fake.issue_grant(a, &[FakeSite::confluence(&format!("site{i}"))]);
        add(&d, &format!("c{i:02}x"), &rt);
    }
    // Nobody asks for a token for 30 s.
    std::thread::sleep(Duration::from_secs(30));
    for a in &accounts {
        assert!(fake.family_alive(a), "{a} lost its chain\n{}", d.logs());
        assert!(
            fake.rotations(a) >= 6,
            "{a} rotated only {} times (import included)",
            fake.rotations(a)
        );
    }
    assert_eq!(fake.reuse_violations(), 0);
    assert_eq!(
        fake.leeway_reuses(),
        0,
        "no two refreshes of one chain overlapped"
    );
    for (label, status) in statuses(&d) {
        assert_eq!(status, "active", "{label}");
    }
    // Every chain is still usable.
    let (code, tok) = d.get_json("/v1/connections/c00x/token");
    assert_eq!(code, 200, "{tok}");
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn a_hot_connection_never_waits_for_the_provider() {
    let fake = FakeAtlassian::start();
    fake.set_access_lifetime(Some(Duration::from_secs(3)));
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::builder(&fake)
        .set("refresh", "access_token_margin", &toml_str("1s"))
        .metrics()
        .start();
    import(&d, "hot", &rt);
    fake.set_token_delay(Duration::from_millis(300));
    let started = Instant::now();
    let mut served = 0;
    let mut tokens = std::collections::HashSet::new();
    while started.elapsed() < Duration::from_secs(20) {
        let r = d.request("GET", "/v1/connections/hot/token", None);
        assert_eq!(r.status, 200, "{}", r.text());
        tokens.insert(r.json()["access_token"].as_str().unwrap().to_owned());
        served += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = d.metrics_get("/metrics").unwrap().text();
    assert_eq!(
        metric(&text, "tokend_token_requests_total{outcome=\"refreshed\"}"),
        0.0,
        "a caller waited for a refresh"
    );
    assert_eq!(
        metric(&text, "tokend_token_requests_total{outcome=\"cached\"}"),
        served as f64
    );
    assert!(
        tokens.len() >= 6,
        "the token was renewed ahead: {} tokens",
        tokens.len()
    );
    // Invariant 2: scheduled renewals and callers never overlapped on this chain (a second
    // request with the same token while one is in flight would show as a leeway reuse).
    assert_eq!(
        fake.leeway_reuses(),
        0,
        "two refreshes of one chain overlapped"
    );
    assert!(fake.family_alive("acct-1"));
    assert_no_secrets(&(d.logs() + &text), &fake);
}

#[test]
fn an_outage_with_retry_after_pauses_every_call_and_leaves_chains_active() {
    let fake = FakeAtlassian::start();
    let d = TestDaemon::builder(&fake)
        .set("refresh", "rotate_after", &toml_str("2s"))
        .start();
    let accounts: Vec<String> = (0..5).map(|i| format!("acct-{i}")).collect();
    for (i, a) in accounts.iter().enumerate() {
        let rt = fake.issue_grant(a, &[FakeSite::confluence(&format!("s{i}"))]);
        add(&d, &format!("c{i}"), &rt);
    }
    let outage_start = Instant::now();
    let before = fake.token_requests().len();
    fake.set_outage(
        Endpoint::Token,
        Some(Fault::Unavailable {
            retry_after_secs: 5,
        }),
    );
    let mut half = false;
    while outage_start.elapsed() < Duration::from_secs(60) {
        if !half && outage_start.elapsed() > Duration::from_secs(30) {
            fake.set_outage(
                Endpoint::Token,
                Some(Fault::RateLimited {
                    retry_after_secs: 5,
                }),
            );
            half = true;
        }
        for (label, status) in statuses(&d) {
            assert_eq!(status, "active", "{label} left active during the outage");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let during: Vec<Instant> = fake.token_requests()[before..]
        .iter()
        .map(|r| r.at)
        .collect();
    fake.set_outage(Endpoint::Token, None);
    assert!(
        !during.is_empty(),
        "the daemon never tried during the outage"
    );
    // The first burst may hold calls already in flight when the first 503 arrived; after
    // that, each call waits out the Retry-After.
    let burst_end = during
        .iter()
        .position(|t| t.duration_since(during[0]) > Duration::from_millis(500))
        .unwrap_or(during.len());
    for w in during[burst_end.saturating_sub(1)..].windows(2) {
        let gap = w[1].duration_since(w[0]);
        assert!(
            gap >= Duration::from_millis(4900),
            "a token call came {gap:?} after the previous one, inside its Retry-After: 5"
        );
    }
    assert!(during.len() <= 5 + 13, "{} calls in 60 s", during.len());
    // All recover afterwards.
    let rotations: Vec<usize> = accounts.iter().map(|a| fake.rotations(a)).collect();
    assert!(
        eventually(Duration::from_secs(30), || accounts
            .iter()
            .zip(&rotations)
            .all(|(a, r)| fake.rotations(a) > *r)),
        "not every chain recovered after the outage\n{}",
        d.logs()
    );
    assert_eq!(fake.reuse_violations(), 0);
    for a in &accounts {
        assert!(fake.family_alive(a));
    }
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn catch_up_after_downtime_rotates_nearest_deadline_first() {
    let fake = FakeAtlassian::start();
    let mut d = TestDaemon::builder(&fake)
        .set("refresh", "rotate_after", &toml_str("8s"))
        .set("refresh", "max_concurrent", "1")
        .start();
    let accounts: Vec<String> = (0..20).map(|i| format!("acct-{i:02}")).collect();
    for (i, a) in accounts.iter().enumerate() {
        let rt = fake.issue_grant(a, &[FakeSite::confluence(&format!("s{i}"))]);
        add(&d, &format!("c{i:02}"), &rt);
        std::thread::sleep(Duration::from_millis(20));
    }
    d.sigterm();
    assert!(
        d.wait_exit(Duration::from_secs(15))
            .is_some_and(|s| s.success())
    );
    // Down for longer than rotate_after (+10% jitter).
    std::thread::sleep(Duration::from_secs(10));
    let before = fake.token_requests().len();
    d.restart();
    assert!(
        eventually(Duration::from_secs(15), || accounts
            .iter()
            .all(|a| fake.rotations(a) >= 2)),
        "not all overdue chains were rotated\n{}",
        d.logs()
    );
    let order: Vec<String> = fake.token_requests()[before..]
        .iter()
        .filter_map(|r| r.account.clone())
        .take(20)
        .collect();
    assert_eq!(
        order, accounts,
        "catch-up must go nearest inactivity deadline (oldest rotation) first"
    );
    for a in &accounts {
        assert_eq!(
            fake.rotations(a),
            2,
            "{a}: one rotation in the catch-up pass"
        );
    }
    assert_eq!(fake.reuse_violations(), 0);
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn resolve_sites_follows_added_and_removed_sites() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::builder(&fake)
        .set("jobs", "resolve_sites", &toml_str("* * * * * *"))
        .start();
    import(&d, "conf", &rt);
    fake.add_site("acct-1", FakeSite::jira("newco"));
    assert!(
        eventually(Duration::from_secs(10), || {
            d.get_json("/v1/connections/conf").1["sites"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["url"] == "https://newco.atlassian.net")
        }),
        "the added site never showed\n{}",
        d.logs()
    );
    let (code, _) = d.get_json("/v1/token?site=newco.atlassian.net");
    assert_eq!(code, 200);
    fake.remove_site("acct-1", &FakeSite::cloud_id_for("acme"));
    assert!(
        eventually(Duration::from_secs(10), || {
            !d.get_json("/v1/connections/conf").1["sites"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["url"] == "https://acme.atlassian.net")
        }),
        "the removed site never went"
    );
    assert_eq!(d.get_json("/v1/token?site=acme.atlassian.net").0, 404);
    assert_eq!(d.get_json("/v1/token?site=newco.atlassian.net").0, 200);
    // The history keeps both changes.
    let db = open_ledger(&d);
    let kinds: Vec<String> = db
        .prepare("SELECT kind FROM events ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(kinds.iter().any(|k| k == "site_added"), "{kinds:?}");
    assert!(kinds.iter().any(|k| k == "site_removed"), "{kinds:?}");
    let removed: i64 = db
        .query_row(
            "SELECT count(*) FROM sites WHERE removed_at IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(removed >= 1, "removed sites are kept with removed_at");
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn a_revoked_grant_needs_reauth_notifies_once_and_spares_the_others() {
    let fake = FakeAtlassian::start();
    let notes = tempfile::NamedTempFile::new().unwrap();
    let cmd = format!(
        "echo \"$TOKEND_EVENT|$TOKEND_CONNECTION|$TOKEND_MESSAGE|$TOKEND_ATLASSIAN_CLIENT_SECRET|$CREDENTIALS_DIRECTORY|$PATH\" >> {}",
        notes.path().display()
    );
    let mut d = TestDaemon::builder(&fake)
        .set("refresh", "rotate_after", &toml_str("2s"))
        .set("notify", "command", &toml_str(&cmd))
        .env(
            "TOKEND_ATLASSIAN_CLIENT_SECRET",
            "cs-from-env-must-not-leak-123456",
        )
        .env("CREDENTIALS_DIRECTORY", "/run/credentials/tokend.service")
        .start();
    let mut ids = Vec::new();
    for i in 0..3 {
        let a = format!("acct-{i}");
        let rt = fake.issue_grant(&a, &[FakeSite::confluence(&format!("s{i}"))]);
        ids.push(
            add(&d, &format!("c{i}"), &rt)["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    fake.revoke_family("acct-1");
    assert!(
        eventually(Duration::from_secs(10), || statuses(&d)
            .iter()
            .any(|(l, s)| l == "c1" && s == "needs_reauth")),
        "{}",
        d.logs()
    );
    std::thread::sleep(Duration::from_secs(4));
    let text = std::fs::read_to_string(notes.path()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one notification: {lines:?}");
    let parts: Vec<&str> = lines[0].split('|').collect();
    assert_eq!(parts[0], "needs_reauth");
    assert_eq!(parts[1], ids[1]);
    assert!(!parts[2].is_empty());
    assert_eq!(
        parts[3], "",
        "the client secret must not reach the notify command"
    );
    assert_eq!(
        parts[4], "",
        "the credentials directory must not reach the notify command (it holds the secret)"
    );
    assert!(
        !parts[5].is_empty(),
        "PATH is passed on, so that scripts run"
    );
    for (label, status) in statuses(&d) {
        if label != "c1" {
            assert_eq!(status, "active", "{label}");
        }
    }
    assert!(fake.family_alive("acct-0") && fake.family_alive("acct-2"));

    // Re-consent for the same account revives it, and says so.
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("s1")]);
    let out = d.cli(&["import", "--label", "c1-again"], Some(&rt));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(eventually(Duration::from_secs(5), || {
        std::fs::read_to_string(notes.path())
            .unwrap()
            .contains(&format!("recovered|{}", ids[1]))
    }));
    assert_eq!(statuses(&d).len(), 3);

    // Consent nearing its absolute expiry is warned about at start (and daily).
    d.sigterm();
    assert!(d.wait_exit(Duration::from_secs(15)).is_some());
    let cfg = std::fs::read_to_string(d.config_path()).unwrap();
    std::fs::write(
        d.config_path(),
        cfg.replace("[refresh]\n", "[refresh]\nabsolute_expiry = \"7d\"\n"),
    )
    .unwrap();
    d.restart();
    assert!(eventually(Duration::from_secs(5), || {
        std::fs::read_to_string(notes.path())
            .unwrap()
            .matches("absolute_expiry_soon|")
            .count()
            == 3
    }));
    assert!(d.logs().contains("expires in"));
    assert_no_secrets(
        &(d.logs() + &std::fs::read_to_string(notes.path()).unwrap()),
        &fake,
    );
}
