//! The chain keeper end to end: import, tokens, single-flight, crash recovery, failure
//! classification — the real binary against the strict fake.

use crate::fake::{ErrorShape, FakeAtlassian, FakeSite, Fault};
use crate::util::{
    SmallDisk, TestDaemon, assert_no_secrets, assert_success, authorize, consent_body, eventually,
    import, ledger_refresh_token,
};
use serde_json::Value;
use std::time::Duration;

fn token_of(d: &TestDaemon, label: &str) -> (u16, Value) {
    d.get_json(&format!("/v1/connections/{label}/token"))
}

/// Whether the daemon's access token of `label` has expired (its `access_token_expires_at`,
/// shown to the second, plus a second), or it has none.
fn access_token_expired(d: &TestDaemon, label: &str) -> bool {
    let (_, conn) = d.get_json(&format!("/v1/connections/{label}"));
    conn["access_token_expires_at"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .is_none_or(|t| t + chrono::Duration::seconds(1) <= chrono::Utc::now())
}

pub fn status_of(d: &TestDaemon, label: &str) -> String {
    let (code, v) = d.get_json(&format!("/v1/connections/{label}"));
    assert_eq!(code, 200, "{v}");
    v["status"].as_str().unwrap().to_owned()
}

#[test]
fn import_then_token_rotates_once_and_the_ledger_holds_the_new_token() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::start(&fake);

    let conn = import(&d, "confluence-prod", &rt);
    assert_eq!(conn["status"], "active");
    assert_eq!(conn["account_id"], "acct-1");
    assert_eq!(conn["provider"], "atlassian");
    let sites = conn["sites"].as_array().unwrap();
    assert!(
        sites
            .iter()
            .any(|s| s["url"] == "https://acme.atlassian.net"
                && s["api_base_urls"]["confluence"]
                    .as_str()
                    .unwrap()
                    .ends_with(s["cloud_id"].as_str().unwrap())),
        "{conn}"
    );
    assert_eq!(
        fake.rotations("acct-1"),
        1,
        "import proves the chain with one refresh"
    );
    assert!(fake.family_alive("acct-1"));
    let current = fake.current_refresh_token("acct-1").unwrap();
    assert_ne!(current, rt);
    assert_eq!(ledger_refresh_token(&d, "confluence-prod"), current);

    // `tokend token` prints the access token and nothing else, from cache.
    let out = d.cli(&["token", "confluence-prod"], None);
    assert_success("tokend token", &out);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.ends_with('\n') && stdout.lines().count() == 1,
        "{stdout:?}"
    );
    let access = stdout.trim_end();
    assert_eq!(fake.access_token_account(access).as_deref(), Some("acct-1"));
    assert_eq!(
        fake.rotations("acct-1"),
        1,
        "a cached token needs no refresh"
    );

    // By site host and by cloud id.
    let by_host = d.request("GET", "/v1/token?site=acme.atlassian.net", None);
    assert_eq!(by_host.status, 200, "{}", by_host.text());
    let tok = by_host.json();
    assert_eq!(tok["access_token"], access);
    assert_eq!(tok["token_type"], "Bearer");
    assert!(tok["expires_in"].as_i64().unwrap() > 3000);
    let cloud = FakeSite::cloud_id_for("acme");
    let by_cloud = d.get_json(&format!("/v1/token?site={cloud}"));
    assert_eq!(by_cloud.0, 200, "{}", by_cloud.1);
    assert_eq!(
        d.request("GET", "/v1/token?site=nowhere.atlassian.net", None)
            .error_code()
            .as_deref(),
        Some("not_found")
    );

    // The token survives a restart (served from the ledger, no refresh).
    let mut d = d;
    d.restart();
    let (code, again) = token_of(&d, "confluence-prod");
    assert_eq!(code, 200);
    assert_eq!(again["access_token"], access);
    assert_eq!(fake.rotations("acct-1"), 1);

    // Explicit rotation.
    let out = d.cli(&["refresh", "confluence-prod"], None);
    assert_success("tokend refresh", &out);
    assert_eq!(fake.rotations("acct-1"), 2);
    assert_eq!(
        ledger_refresh_token(&d, "confluence-prod"),
        fake.current_refresh_token("acct-1").unwrap()
    );
    assert_eq!(fake.reuse_violations(), 0);

    let list = d.cli(&["list"], None);
    assert_success("tokend list", &list);
    let show = d.cli(&["show", "confluence-prod", "--json"], None);
    assert_success("tokend show", &show);
    let all = format!(
        "{}{}{}{}",
        d.logs(),
        String::from_utf8_lossy(&list.stdout),
        String::from_utf8_lossy(&show.stdout),
        String::from_utf8_lossy(&show.stderr)
    );
    assert_no_secrets(&all, &fake);
}

#[test]
fn concurrent_callers_share_one_refresh() {
    let fake = FakeAtlassian::start();
    fake.set_access_lifetime(Some(Duration::from_secs(4)));
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::start(&fake);
    import(&d, "conf", &rt);
    // Let the access token expire, then make the provider slow.
    assert!(
        eventually(Duration::from_secs(10), || access_token_expired(&d, "conf")),
        "the access token never expired"
    );
    fake.set_token_delay(Duration::from_millis(1000));
    let before = fake.refresh_calls();
    let tokens: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..200)
            .map(|_| {
                s.spawn(|| {
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
    assert_eq!(
        fake.refresh_calls() - before,
        1,
        "200 concurrent callers must cause exactly one refresh"
    );
    let first = &tokens[0].1;
    for (status, t) in &tokens {
        assert_eq!(*status, 200, "{t}");
        assert_eq!(t, first, "every caller gets the same new token");
    }
    assert_eq!(fake.access_token_account(first).as_deref(), Some("acct-1"));
    assert_eq!(fake.reuse_violations(), 0);
    assert_eq!(fake.leeway_reuses(), 0, "the one refresh was never doubled");
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn kill_during_a_held_refresh_then_restart_keeps_the_chain() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let mut d = TestDaemon::start(&fake);
    import(&d, "conf", &rt);
    let before_kill = ledger_refresh_token(&d, "conf");

    // The fake rotates as soon as the request arrives, then holds the answer.
    fake.inject_token(Fault::Delay(Duration::from_secs(2)));
    let calls = fake.refresh_calls();
    std::thread::scope(|s| {
        s.spawn(|| {
            // The connection drops when the daemon dies; the result does not matter.
            let _ = d.try_request("POST", "/v1/connections/conf/refresh", &[], None);
        });
        assert!(
            eventually(Duration::from_secs(5), || fake.refresh_calls() > calls),
            "the refresh never reached the fake"
        );
        assert!(
            eventually(Duration::from_secs(5), || fake
                .current_refresh_token("acct-1")
                .is_some_and(|t| t != before_kill)),
            "the fake never rotated"
        );
        // SAFETY of the scenario: the fake has rotated; the daemon never sees the answer.
        let pid = d.pid().expect("running");
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    });
    d.kill9();
    assert_ne!(
        fake.current_refresh_token("acct-1").unwrap(),
        before_kill,
        "the fake rotated the token the daemon never received"
    );
    assert_eq!(ledger_refresh_token(&d, "conf"), before_kill);

    d.restart();
    // The daemon recovers by presenting the same token inside the leeway.
    assert!(
        eventually(Duration::from_secs(10), || ledger_refresh_token(&d, "conf")
            == fake.current_refresh_token("acct-1").unwrap_or_default()),
        "the daemon did not recover the chain\n{}",
        d.logs()
    );
    let (code, tok) = token_of(&d, "conf");
    assert_eq!(code, 200, "{tok}");
    assert_eq!(status_of(&d, "conf"), "active");
    assert!(fake.family_alive("acct-1"));
    assert_eq!(
        fake.leeway_reuses(),
        1,
        "recovery is one reuse inside the leeway"
    );
    assert_eq!(fake.reuse_violations(), 0);
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn ambiguous_outcomes_are_retried_inside_the_leeway() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::start(&fake);
    import(&d, "conf", &rt);

    // A timeout after the fake rotated (request_timeout is 3 s in tests), a garbled 200 after
    // it rotated, and a dropped connection after it rotated: each time the daemon must come
    // back with the same token inside the leeway, never lose the chain.
    for fault in [
        Fault::Delay(Duration::from_secs(5)),
        Fault::MalformedJson,
        Fault::Disconnect,
    ] {
        let reuses = fake.leeway_reuses();
        // Twice: the daemon's own retry of the previous failure may take a fault between the
        // injection and the operator's refresh (seen under load); one is always left for it.
        fake.inject_token(fault.clone());
        fake.inject_token(fault.clone());
        let r = d.request("POST", "/v1/connections/conf/refresh", None);
        assert_eq!(r.status, 503, "{fault:?}: {}", r.text());
        assert_eq!(r.error_code().as_deref(), Some("provider_unavailable"));
        assert!(r.header("retry-after").is_some());
        assert_eq!(status_of(&d, "conf"), "active");
        assert!(
            eventually(Duration::from_secs(15), || fake.leeway_reuses() > reuses
                && ledger_refresh_token(&d, "conf")
                    == fake.current_refresh_token("acct-1").unwrap_or_default()),
            "{fault:?}: no recovery inside the leeway\n{}",
            d.logs()
        );
    }
    assert!(fake.family_alive("acct-1"));
    assert_eq!(fake.reuse_violations(), 0);
    let (code, _) = token_of(&d, "conf");
    assert_eq!(code, 200);
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn definite_rejections_mark_needs_reauth_in_both_shapes() {
    for shape in [ErrorShape::InvalidGrant, ErrorShape::UnauthorizedClient] {
        let fake = FakeAtlassian::start();
        fake.set_error_shape(shape);
        let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
        let d = TestDaemon::start(&fake);
        import(&d, "conf", &rt);
        fake.revoke_family("acct-1");
        let r = d.request("POST", "/v1/connections/conf/refresh", None);
        assert_eq!(r.status, 409, "{shape:?}: {}", r.text());
        assert_eq!(r.error_code().as_deref(), Some("needs_reauth"));
        assert_eq!(status_of(&d, "conf"), "needs_reauth");
        let (_, conn) = d.get_json("/v1/connections/conf");
        let code = conn["last_error"]["code"].as_str().unwrap();
        assert!(
            code == "invalid_grant" || code == "unauthorized_client",
            "{conn}"
        );
        // The token route answers 409 even though an access token was cached.
        let t = d.request("GET", "/v1/connections/conf/token", None);
        assert_eq!(t.status, 409);
        assert_eq!(t.error_code().as_deref(), Some("needs_reauth"));
        let out = d.cli(&["token", "conf"], None);
        assert_eq!(out.status.code(), Some(1));
        assert!(out.stdout.is_empty());
        // Not retried on its own.
        let calls = fake.refresh_calls();
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(fake.refresh_calls(), calls);
        assert_no_secrets(&d.logs(), &fake);
    }
}

#[test]
fn transient_failures_keep_the_chain_active_and_serve_the_cache() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::start(&fake);
    import(&d, "conf", &rt);
    assert_eq!(token_of(&d, "conf").0, 200);

    for fault in [
        Fault::Status(500),
        Fault::Html(502),
        Fault::Status(503),
        Fault::RateLimited {
            retry_after_secs: 1,
        },
    ] {
        fake.inject_token(fault.clone());
        let r = d.request("POST", "/v1/connections/conf/refresh", None);
        assert_eq!(r.status, 503, "{fault:?}: {}", r.text());
        assert_eq!(r.error_code().as_deref(), Some("provider_unavailable"));
        assert!(r.header("retry-after").is_some(), "{fault:?}");
        assert_eq!(status_of(&d, "conf"), "active", "{fault:?}");
        // A valid cached token is still served, even asking for more than it has left.
        let t = d.request("GET", "/v1/connections/conf/token?min_valid=999999", None);
        assert_eq!(t.status, 200, "{fault:?}: {}", t.text());
        // The cached token, or a newer one if a retry of an ambiguous attempt succeeded
        // meanwhile: either way one the provider accepts.
        let served = t.json()["access_token"].as_str().unwrap().to_owned();
        assert_eq!(
            fake.access_token_account(&served).as_deref(),
            Some("acct-1")
        );
        std::thread::sleep(Duration::from_millis(1200));
    }
    let (_, conn) = d.get_json("/v1/connections/conf");
    assert!(
        conn["consecutive_failures"].as_u64().unwrap() >= 1,
        "{conn}"
    );
    assert!(fake.family_alive("acct-1"));
    assert_eq!(fake.reuse_violations(), 0);
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn retry_after_is_honoured_and_no_cached_token_means_503() {
    let fake = FakeAtlassian::start();
    fake.set_access_lifetime(Some(Duration::from_secs(2)));
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::start(&fake);
    import(&d, "conf", &rt);
    std::thread::sleep(Duration::from_millis(2200));
    fake.inject_token(Fault::Unavailable {
        retry_after_secs: 3,
    });
    let calls = fake.token_calls();
    let t = d.request("GET", "/v1/connections/conf/token", None);
    assert_eq!(t.status, 503, "{}", t.text());
    let retry: u64 = t.header("retry-after").unwrap().parse().unwrap();
    assert!(
        retry >= 3,
        "Retry-After {retry} must honour the provider's 3 s"
    );
    // Within the Retry-After, callers are answered without a provider call.
    let again = d.request("GET", "/v1/connections/conf/token", None);
    assert_eq!(again.status, 503);
    assert_eq!(
        fake.token_calls(),
        calls + 1,
        "no call before Retry-After elapsed"
    );
    assert_eq!(status_of(&d, "conf"), "active");
    // Afterwards it recovers.
    assert!(eventually(Duration::from_secs(10), || token_of(&d, "conf")
        .0
        == 200));
    let log = fake.token_requests();
    let n = log.len();
    assert!(
        log[n - 1].at.duration_since(log[n - 2].at) >= Duration::from_millis(2900),
        "the retry came before Retry-After"
    );
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn a_response_without_refresh_token_keeps_the_old_one() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::start(&fake);
    import(&d, "conf", &rt);
    let kept = ledger_refresh_token(&d, "conf");
    fake.inject_token(Fault::OmitRefreshToken);
    let r = d.request("POST", "/v1/connections/conf/refresh", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(ledger_refresh_token(&d, "conf"), kept);
    assert_eq!(fake.current_refresh_token("acct-1").unwrap(), kept);
    // And one without expires_in still works.
    fake.inject_token(Fault::OmitExpiresIn);
    let r = d.request("POST", "/v1/connections/conf/refresh", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let (code, tok) = token_of(&d, "conf");
    assert_eq!(code, 200);
    assert!(tok["expires_in"].as_i64().unwrap() > 60, "{tok}");
    // The chain still rotates normally afterwards.
    let r = d.request("POST", "/v1/connections/conf/refresh", None);
    assert_eq!(r.status, 200);
    assert_eq!(
        ledger_refresh_token(&d, "conf"),
        fake.current_refresh_token("acct-1").unwrap()
    );
    assert_eq!(fake.reuse_violations(), 0);
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn a_second_import_for_the_same_account_updates_the_connection() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::start(&fake);
    let first = import(&d, "conf", &rt);
    fake.revoke_family("acct-1");
    let r = d.request("POST", "/v1/connections/conf/refresh", None);
    assert_eq!(r.status, 409);
    // The person consents again; the new token is imported under another label.
    let rt2 = fake.issue_grant(
        "acct-1",
        &[FakeSite::confluence("acme"), FakeSite::jira("acme")],
    );
    let out = d.cli(&["import", "--label", "conf-again"], Some(&rt2));
    assert_success("second import", &out);
    let (_, list) = d.get_json("/v1/connections");
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "one account, one connection: {list:?}");
    assert_eq!(list[0]["id"], first["id"]);
    assert_eq!(list[0]["status"], "active");
    assert_eq!(
        ledger_refresh_token(&d, "conf"),
        fake.current_refresh_token("acct-1").unwrap()
    );
    let (code, _) = token_of(&d, "conf");
    assert_eq!(code, 200);
    // A dead token imported fresh is refused and leaves nothing behind.
    let r = d.post_json(
        "/v1/connections",
        &serde_json::json!({"provider":"atlassian","label":"dead","refresh_token":"rt-not-a-real-token-000000"}),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("needs_reauth"));
    assert_eq!(d.get_json("/v1/connections/dead").0, 404);
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn remove_forgets_the_connection() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::start(&fake);
    import(&d, "conf", &rt);
    let out = d.cli(&["remove", "conf"], None);
    assert_success("tokend remove", &out);
    assert_eq!(d.get_json("/v1/connections/conf").0, 404);
    assert_eq!(
        d.request("DELETE", "/v1/connections/conf", None)
            .error_code()
            .as_deref(),
        Some("not_found")
    );
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn a_full_disk_never_loses_the_chain() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let mut d = TestDaemon::builder(&fake).prepare();
    let disk = SmallDisk::mount(&d.state_dir(), "4m");
    d.restart();
    import(&d, "conf", &rt);

    // Full before a refresh: nothing is sent, a clear error, the daemon keeps serving.
    disk.fill();
    let calls = fake.refresh_calls();
    let r = d.request("POST", "/v1/connections/conf/refresh", None);
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("internal"));
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ledger")
    );
    assert_eq!(
        fake.refresh_calls(),
        calls,
        "no refresh without a durable attempt record"
    );
    let (code, health) = d.get_json("/v1/health");
    assert_eq!(code, 503, "{health}");
    assert_eq!(health["status"], "degraded");
    let (code, _) = d.get_json("/v1/connections/conf/token");
    assert_eq!(code, 200, "the cached token is still served");
    disk.free();

    // Full while the provider holds the answer: the rotated token cannot be committed, so it
    // is neither used nor rotated further; once space is back it is committed.
    fake.inject_token(Fault::Delay(Duration::from_millis(1500)));
    let calls = fake.refresh_calls();
    std::thread::scope(|s| {
        let h = s.spawn(|| d.request("POST", "/v1/connections/conf/refresh", None));
        assert!(eventually(Duration::from_secs(5), || fake.refresh_calls() > calls));
        disk.fill();
        let r = h.join().unwrap();
        assert_eq!(r.status, 500, "{}", r.text());
        assert_eq!(r.error_code().as_deref(), Some("internal"));
    });
    let t = d.request("GET", "/v1/connections/conf/token?min_valid=999999", None);
    assert!(t.status == 500 || t.status == 200, "{}", t.text());
    if t.status == 200 {
        // Only the old, committed token may be handed out while the new one is not durable.
        let served = t.json()["access_token"].as_str().unwrap().to_owned();
        assert_eq!(
            fake.access_token_account(&served).as_deref(),
            Some("acct-1")
        );
    }
    assert_eq!(status_of(&d, "conf"), "active");
    disk.free();
    assert!(
        eventually(Duration::from_secs(10), || ledger_refresh_token(&d, "conf")
            == fake.current_refresh_token("acct-1").unwrap_or_default()),
        "the rotated token was not committed once space was back\n{}",
        d.logs()
    );
    let (code, _) = d.get_json("/v1/connections/conf/token");
    assert_eq!(code, 200);
    assert_eq!(fake.reuse_violations(), 0);
    assert!(fake.family_alive("acct-1"));
    let logs = d.logs();
    assert!(
        logs.contains("cannot commit the rotated refresh token"),
        "the commit-failure path was not exercised\n{logs}"
    );
    d.kill9();
    drop(disk);
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn consent_flow_exchanges_a_code_once() {
    let fake = FakeAtlassian::start();
    let d = TestDaemon::start(&fake);
    let auth = authorize(&d);
    let (url, state, redirect) = (&auth.authorize_url, &auth.state, &auth.redirect_uri);
    for part in [
        "audience=api.atlassian.com",
        "prompt=consent",
        "response_type=code",
        "offline_access",
    ] {
        assert!(url.contains(part), "{part} missing from {url}");
    }
    assert!(url.contains(&format!("state={state}")), "{url}");
    let code = fake.issue_code("acct-9", &[FakeSite::jira("gamma")], redirect);
    let body = consent_body("jira", &code, state);
    let r = d.post_json("/v1/connections", &body);
    assert_eq!(r.status, 201, "{}", r.text());
    let conn = r.json();
    assert_eq!(conn["account_id"], "acct-9");
    assert_eq!(conn["sites"][0]["url"], "https://gamma.atlassian.net");
    assert!(
        conn["sites"][0]["api_base_urls"]["jira"].is_string(),
        "{conn}"
    );
    // The state is single-use.
    let r = d.post_json("/v1/connections", &body);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("bad_request"));
    // The stored chain works.
    let (code, tok) = d.get_json("/v1/token?site=gamma.atlassian.net");
    assert_eq!(code, 200, "{tok}");
    assert_eq!(
        ledger_refresh_token(&d, "jira"),
        fake.current_refresh_token("acct-9").unwrap()
    );
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn an_account_the_provider_hides_is_unknown_not_a_failure() {
    let fake = FakeAtlassian::start();
    fake.hide_account("acct-1");
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::start(&fake);
    let conn = import(&d, "conf", &rt);
    assert!(conn["account_id"].is_null(), "{conn}");
    assert_eq!(conn["status"], "active");
    assert_eq!(conn["sites"].as_array().unwrap().len(), 1);
    assert_eq!(token_of(&d, "conf").0, 200);
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn two_connections_reaching_one_site_conflict() {
    let fake = FakeAtlassian::start();
    let rt1 = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let rt2 = fake.issue_grant("acct-2", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::start(&fake);
    import(&d, "one", &rt1);
    import(&d, "two", &rt2);
    let r = d.request("GET", "/v1/token?site=acme.atlassian.net", None);
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("conflict"));
    assert_no_secrets(&d.logs(), &fake);
}

/// Runs `tokend connect`, plays the person at the browser, returns the CLI's output.
fn connect_flow(
    d: &TestDaemon,
    fake: &FakeAtlassian,
    account: &str,
    no_browser: bool,
) -> std::process::Output {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let mut args = vec!["--config", d.config_path().to_str().unwrap(), "connect"];
    args.extend(["--label", "jira"]);
    if no_browser {
        args.push("--no-browser");
    }
    let mut child = Command::new(crate::util::tokend_bin())
        .args(&args)
        .env("PATH", "/nonexistent") // no xdg-open: nobody opens a browser
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut url = None;
    let mut seen = String::new();
    while url.is_none() {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("connect printed no authorize URL: {seen}");
        }
        seen.push_str(&line);
        if let Some(at) = line.find("http") {
            let candidate = line[at..].trim();
            if candidate.contains("/authorize?") {
                url = Some(url::Url::parse(candidate).unwrap());
            }
        }
    }
    let url = url.unwrap();
    let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
    let redirect = q["redirect_uri"].clone();
    let code = fake.issue_code(account, &[FakeSite::jira("gamma")], &redirect);
    let back = format!("{redirect}?code={code}&state={}", q["state"]);
    if no_browser {
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{back}").unwrap();
    } else {
        // The browser comes back to the loopback listener.
        let u = url::Url::parse(&back).unwrap();
        let addr = format!("{}:{}", u.host_str().unwrap(), u.port().unwrap());
        let mut ok = false;
        for _ in 0..50 {
            if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
                write!(
                    s,
                    "GET {}?{} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n",
                    u.path(),
                    u.query().unwrap()
                )
                .unwrap();
                let mut page = String::new();
                let _ = std::io::Read::read_to_string(&mut s, &mut page);
                assert!(page.starts_with("HTTP/1.1 200"), "{page}");
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(ok, "the CLI never listened on {addr}");
    }
    let mut out = child.wait_with_output().unwrap();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
    out.stderr = (seen + &rest).into_bytes();
    out
}

#[test]
fn tokend_connect_by_paste_and_by_loopback_callback() {
    let fake = FakeAtlassian::start();
    let d = TestDaemon::start(&fake);
    let out = connect_flow(&d, &fake, "acct-7", true);
    assert_success("tokend connect --no-browser", &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("jira"), "{stdout}");
    let (code, conn) = d.get_json("/v1/connections/jira");
    assert_eq!(code, 200);
    assert_eq!(conn["account_id"], "acct-7");
    // Consent again through the loopback listener: the same account's connection takes it.
    let out = connect_flow(&d, &fake, "acct-7", false);
    assert_success("tokend connect", &out);
    let (_, list) = d.get_json("/v1/connections");
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(
        ledger_refresh_token(&d, "jira"),
        fake.current_refresh_token("acct-7").unwrap()
    );
    assert_eq!(d.get_json("/v1/token?site=gamma.atlassian.net").0, 200);
    assert_no_secrets(
        &format!(
            "{}{}{}",
            d.logs(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        &fake,
    );
}

/// A consent while the ledger cannot be written does not spend the one-time code: the answer
/// says so (500, "not used"), nothing is created and the fake saw no exchange; once space is
/// back, the same code and state complete the consent, the chain is committed (the ledger
/// holds the fake's current token), serves tokens and survives a restart.
#[test]
fn a_full_disk_during_a_consent_does_not_spend_the_code() {
    let fake = FakeAtlassian::start();
    let mut d = TestDaemon::builder(&fake).prepare();
    let disk = SmallDisk::mount(&d.state_dir(), "4m");
    d.restart();
    let auth = authorize(&d);
    let code = fake.issue_code(
        "acct-1",
        &[FakeSite::confluence("acme")],
        &auth.redirect_uri,
    );
    let body = consent_body("conf", &code, &auth.state);
    disk.fill();
    let exchanges = fake.token_calls();
    let r = d.post_json("/v1/connections", &body);
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(
        r.text().contains("was not used"),
        "the answer must say the code is still good: {}",
        r.text()
    );
    assert_eq!(fake.token_calls(), exchanges, "the code was spent");
    let (code, list) = d.get_json("/v1/connections");
    assert_eq!(code, 200);
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    disk.free();
    let r = d.post_json("/v1/connections", &body);
    assert_eq!(
        r.status,
        201,
        "the same code and state work once the ledger can be written: {}",
        r.text()
    );
    assert_eq!(
        ledger_refresh_token(&d, "conf"),
        fake.current_refresh_token("acct-1").unwrap()
    );
    let (code, _) = d.get_json("/v1/connections/conf/token");
    assert_eq!(code, 200);
    d.restart();
    let (code, _) = d.get_json("/v1/connections/conf/token");
    assert_eq!(code, 200, "the chain survives a restart");
    assert_eq!(fake.reuse_violations(), 0);
    assert!(fake.family_alive("acct-1"));
    d.kill9();
    drop(disk);
    assert_no_secrets(&d.logs(), &fake);
}
