//! "The engine owns every refresh": scenarios where something other than the engine (a caller
//! that hangs up, the site job, a half-answer of the provider, a full disk, two consents at
//! once) must not decide the fate of a chain, and the gates around it (`?site=` misses,
//! backoff against operators and `Retry-After`, markers across a crash). Each test states,
//! in its doc comment, what a correct daemon shows from the outside.

use crate::chain::status_of;
use crate::fake::{Endpoint, FakeAtlassian, FakeSite, Fault};
use crate::util::{
    HttpResponse, NotifySocket, SmallDisk, TestDaemon, assert_no_secrets, authorize, build_request,
    consent_body, eventually, import, ledger_refresh_token, toml_str,
};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn add(d: &TestDaemon, label: &str, rt: &str) -> HttpResponse {
    d.post_json(
        "/v1/connections",
        &json!({"provider": "atlassian", "label": label, "refresh_token": rt}),
    )
}

fn connections(d: &TestDaemon) -> Vec<Value> {
    let (code, v) = d.get_json("/v1/connections");
    assert_eq!(code, 200, "{v}");
    v.as_array().unwrap().clone()
}

fn has_site(d: &TestDaemon, label: &str, url: &str) -> bool {
    let (code, v) = d.get_json(&format!("/v1/connections/{label}"));
    code == 200
        && v["sites"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["url"] == url))
}

/// A service asks for a token, the provider is slow, and the service gives up after 1 s and
/// closes its socket while the refresh is in flight (the fake has already rotated the
/// token: it rotates when the request arrives and holds the answer for 3 s).
///
/// Correct: the refresh belongs to the engine, not to the caller. The daemon finishes the
/// attempt itself and commits the rotated token, so a later caller, after the fake's reuse
/// leeway (4 s here) has passed, gets 200 with a token the provider accepts; the fake saw no
/// reuse violation, the family is alive, the ledger holds the fake's current refresh token
/// and the connection stays `active`.
#[test]
fn a_caller_that_hangs_up_mid_refresh_does_not_kill_the_chain() {
    let fake = FakeAtlassian::start();
    // 10 s access tokens: after 1.5 s the cached one is no longer "as fresh as a new one", so
    // a caller asking for 10 s of validity needs a refresh.
    fake.set_access_lifetime(Some(Duration::from_secs(10)));
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::builder(&fake)
        .set("refresh", "request_timeout", &toml_str("10s"))
        .set("refresh", "access_token_margin", &toml_str("1s"))
        .start();
    import(&d, "conf", &rt);
    fake.set_leeway(Duration::from_secs(4));
    std::thread::sleep(Duration::from_millis(1500));
    fake.set_token_delay(Duration::from_secs(3));
    let calls = fake.token_requests().len();

    let mut stream = UnixStream::connect(d.socket_path()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    stream
        .write_all(&build_request(
            "GET",
            "/v1/connections/conf/token?min_valid=10",
            "localhost",
            &[],
            None,
        ))
        .unwrap();
    let mut buf = [0u8; 4096];
    let early = stream.read(&mut buf);
    assert!(
        early.is_err(),
        "the daemon answered within 1 s although the provider holds its answer for 3 s: {:?}",
        early.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    );
    assert!(
        eventually(Duration::from_secs(5), || fake.token_requests().len()
            > calls),
        "the refresh never reached the fake\n{}",
        d.logs()
    );
    // The caller hangs up mid-refresh.
    drop(stream);
    let rotated_at = fake.token_requests()[calls].at;
    fake.set_token_delay(Duration::ZERO);

    // Past the fake's leeway: presenting the pre-rotation token now would revoke the family.
    let after_leeway = rotated_at + Duration::from_millis(5500);
    std::thread::sleep(after_leeway.saturating_duration_since(Instant::now()));
    let r = d.request("GET", "/v1/connections/conf/token?min_valid=10", None);
    assert_eq!(
        r.status,
        200,
        "a later caller must get a token after the first one hung up: {}\nfake: {} reuse violation(s), family alive: {}",
        r.text(),
        fake.reuse_violations(),
        fake.family_alive("acct-1")
    );
    let served = r.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        fake.access_token_account(&served).as_deref(),
        Some("acct-1"),
        "the token handed out is one the provider accepts"
    );
    assert_eq!(fake.reuse_violations(), 0);
    assert!(fake.family_alive("acct-1"));
    assert_eq!(status_of(&d, "conf"), "active");
    assert!(
        eventually(Duration::from_secs(5), || ledger_refresh_token(&d, "conf")
            == fake.current_refresh_token("acct-1").unwrap_or_default()),
        "the ledger does not hold the chain's current token"
    );
    assert_no_secrets(&d.logs(), &fake);
}

/// The provider answers every refresh with a new access token but without a new
/// `refresh_token` (a success without rotation), for 12 s, with `rotate_after = "2s"` and no
/// callers.
///
/// Correct: an answer without a new refresh token is a use of the old one: the next attempt
/// is planned `rotate_after` later (±10 % jitter), not at once, so the fake sees a handful of
/// token calls (≤ 10 here), not hundreds. The old refresh token stays what the ledger works
/// with (it is the fake's current one), and once the provider rotates again, the next normal
/// refresh succeeds, with no reuse violation.
#[test]
fn a_token_answer_without_a_new_refresh_token_does_not_start_a_call_loop() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::builder(&fake)
        .set("refresh", "rotate_after", &toml_str("2s"))
        .start();
    import(&d, "conf", &rt);
    let kept = ledger_refresh_token(&d, "conf");
    assert_eq!(
        fake.current_refresh_token("acct-1").as_deref(),
        Some(&*kept)
    );

    fake.set_outage(Endpoint::Token, Some(Fault::OmitRefreshToken));
    let before = fake.token_calls();
    std::thread::sleep(Duration::from_secs(12));
    let during = fake.token_calls() - before;
    fake.set_outage(Endpoint::Token, None);
    assert!(
        during <= 10,
        "{during} token calls in 12 s with rotate_after = 2s and no callers: an answer without a new refresh_token must count as a use, not start a call loop"
    );
    assert!(
        during >= 1,
        "the daemon never refreshed in 12 s with rotate_after = 2s"
    );
    assert_eq!(
        ledger_refresh_token(&d, "conf"),
        kept,
        "the ledger must keep working with the old refresh token"
    );
    assert_eq!(
        fake.current_refresh_token("acct-1").as_deref(),
        Some(&*kept)
    );
    assert_eq!(status_of(&d, "conf"), "active");

    // The provider rotates again: the next normal refresh succeeds with the kept token.
    let r = d.request("POST", "/v1/connections/conf/refresh", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let now = fake.current_refresh_token("acct-1").unwrap();
    assert_ne!(now, kept, "the refresh rotated");
    assert!(
        eventually(Duration::from_secs(5), || ledger_refresh_token(&d, "conf")
            == fake.current_refresh_token("acct-1").unwrap_or_default()),
        "the ledger does not hold the rotated token"
    );
    assert_eq!(fake.reuse_violations(), 0);
    assert!(fake.family_alive("acct-1"));
    assert_no_secrets(&d.logs(), &fake);
}

/// `jobs.resolve_sites` runs every 2 s, access tokens live 4 s, `rotate_after = "30s"`, and
/// nobody asks for a token for 25 s.
///
/// Correct: re-reading accessible sites is no reason to rotate a refresh token. A site added
/// at the fake while the cached access token is still valid shows on the connection (the job
/// uses a valid access token where there is one); after that, with the access token expired
/// and no caller, the chain is rotated at most once in the 25 s (rotations counted at the
/// fake after the import: 0 or 1), not once per job run. The connection stays `active`.
#[test]
fn the_site_job_does_not_rotate_idle_chains() {
    let fake = FakeAtlassian::start();
    fake.set_access_lifetime(Some(Duration::from_secs(4)));
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::builder(&fake)
        .set("jobs", "resolve_sites", &toml_str("*/2 * * * * *"))
        .set("refresh", "rotate_after", &toml_str("30s"))
        .start();
    import(&d, "conf", &rt);
    let imported = Instant::now();
    let after_import = fake.rotations("acct-1");
    fake.add_site("acct-1", FakeSite::jira("newco"));
    assert!(
        eventually(Duration::from_secs(6), || has_site(
            &d,
            "conf",
            "https://newco.atlassian.net"
        )),
        "a site added while the access token was valid was not picked up by the job\n{}",
        d.logs()
    );
    std::thread::sleep(
        (imported + Duration::from_secs(25)).saturating_duration_since(Instant::now()),
    );
    let rotated = fake.rotations("acct-1") - after_import;
    assert!(
        rotated <= 1,
        "the idle chain was rotated {rotated} times in 25 s by the site job (every 2 s); rotate_after is 30s"
    );
    assert_eq!(status_of(&d, "conf"), "active");
    assert_eq!(fake.reuse_violations(), 0);
    assert!(fake.family_alive("acct-1"));
    assert_no_secrets(&d.logs(), &fake);
}

/// `/me` is down (503, a transient failure) while a refresh token is imported, so the
/// daemon cannot tell the account; then `/me` answers again.
///
/// Correct: the unknown account is a transient gap, not a fact: the daemon keeps trying (with
/// backoff, `backoff_min = 1s` here) and the connection's `account_id` becomes the account
/// within ~15 s without any operator action. A second import of a token of the same account
/// then merges into that connection: POST answers 200 (not 201), only one connection exists,
/// and it holds the new chain.
#[test]
fn an_account_me_could_not_tell_at_import_is_resolved_later() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::start(&fake);
    fake.set_outage(Endpoint::Me, Some(Fault::Status(503)));
    let r = add(&d, "conf", &rt);
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(
        r.json()["account_id"].is_null(),
        "the account cannot be known during the /me outage: {}",
        r.text()
    );
    fake.set_outage(Endpoint::Me, None);
    assert!(
        eventually(Duration::from_secs(15), || d
            .get_json("/v1/connections/conf")
            .1["account_id"]
            == "acct-1"),
        "the account was not resolved after /me came back: {}",
        d.get_json("/v1/connections/conf").1
    );

    // The same person consents again; the token is imported under another label.
    let rt2 = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let r = add(&d, "conf-again", &rt2);
    assert_eq!(
        r.status,
        200,
        "an import for an account that already has a connection merges into it: {}",
        r.text()
    );
    let list = connections(&d);
    assert_eq!(list.len(), 1, "one account, one connection: {list:?}");
    assert_eq!(list[0]["label"], "conf");
    assert_eq!(list[0]["account_id"], "acct-1");
    assert_eq!(
        ledger_refresh_token(&d, "conf"),
        fake.current_refresh_token("acct-1").unwrap()
    );
    assert_eq!(d.get_json("/v1/connections/conf/token").0, 200);
    assert_eq!(fake.reuse_violations(), 0);
    assert_no_secrets(&d.logs(), &fake);
}

/// Under systemd's watchdog (`WATCHDOG_USEC` = 1 s), the disk fills while the provider
/// holds the answer of a refresh, so the rotated token cannot be committed.
///
/// Correct: the daemon holding an uncommitted rotated token is alive and must not be
/// killed (that would lose the token): it keeps sending WATCHDOG=1, `/v1/health` reports
/// `degraded` (503), and it never rotates further while the ledger is full (the fake's
/// rotation count stays put, a caller included). Once space is back the held token is
/// committed (the ledger's refresh token is the fake's current one) and tokens are served
/// again, with no reuse violation.
#[test]
fn a_full_ledger_keeps_the_watchdog_fed_and_commits_the_held_token_later() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let notify = NotifySocket::new();
    let mut d = TestDaemon::builder(&fake)
        .env("NOTIFY_SOCKET", notify.path.to_str().unwrap())
        .env("WATCHDOG_USEC", "1000000")
        .prepare();
    let disk = SmallDisk::mount(&d.state_dir(), "4m");
    d.restart();
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(5)),
        "no READY=1"
    );
    import(&d, "conf", &rt);

    fake.inject_token(Fault::Delay(Duration::from_millis(1500)));
    let calls = fake.refresh_calls();
    std::thread::scope(|s| {
        let h = s.spawn(|| d.request("POST", "/v1/connections/conf/refresh", None));
        assert!(eventually(Duration::from_secs(5), || fake.refresh_calls() > calls));
        disk.fill();
        let r = h.join().unwrap();
        assert_eq!(r.status, 500, "{}", r.text());
    });
    let rotations = fake.rotations("acct-1");
    assert_ne!(
        ledger_refresh_token(&d, "conf"),
        fake.current_refresh_token("acct-1").unwrap(),
        "the rotated token is held uncommitted"
    );

    // While full: alive, pinging, degraded, not rotating.
    let _ = notify.collect(Duration::from_millis(300));
    let msgs = notify.collect(Duration::from_secs(3));
    let pings = msgs.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(
        pings >= 2,
        "the daemon holds an uncommitted rotated token and must keep pinging the watchdog while the ledger is full ({pings} pings in 3 s): {msgs:?}"
    );
    assert!(d.is_running());
    let (code, health) = d.get_json("/v1/health");
    assert_eq!(code, 503, "{health}");
    assert_eq!(health["status"], "degraded");
    // A held token is never handed out: the caller is told it is not committed yet.
    let t = d.request("GET", "/v1/connections/conf/token?min_valid=999999", None);
    assert_eq!(t.status, 500, "{}", t.text());
    assert_eq!(t.error_code().as_deref(), Some("internal"), "{}", t.text());
    assert!(t.json().get("access_token").is_none(), "{}", t.text());
    assert_eq!(
        fake.rotations("acct-1"),
        rotations,
        "rotated further while the ledger was full"
    );

    disk.free();
    assert!(
        eventually(Duration::from_secs(10), || ledger_refresh_token(&d, "conf")
            == fake.current_refresh_token("acct-1").unwrap_or_default()),
        "the held token was not committed once space was back\n{}",
        d.logs()
    );
    let (code, tok) = d.get_json("/v1/connections/conf/token");
    assert_eq!(code, 200, "{tok}");
    assert_eq!(
        fake.access_token_account(tok["access_token"].as_str().unwrap())
            .as_deref(),
        Some("acct-1")
    );
    assert!(notify.wait_for("WATCHDOG=1", Duration::from_secs(5)));
    assert_eq!(fake.reuse_violations(), 0);
    assert!(fake.family_alive("acct-1"));
    d.kill9();
    drop(disk);
    assert_no_secrets(&d.logs(), &fake);
}

/// Two people complete consent at the same moment (two `POST /v1/connections` with code and
/// state, two different accounts, the same label), while the provider takes 1 s to exchange
/// each code.
///
/// Correct: a spent authorization code is a chain that exists only in the daemon's hands, so
/// neither may be thrown away over a label: both requests succeed (201), two connections
/// exist (one keeps the label, the other gets a generated/suffixed one), one per account, and
/// both chains are refreshable and held in the ledger.
#[test]
fn two_concurrent_consents_with_one_label_both_keep_their_chains() {
    let fake = FakeAtlassian::start();
    let d = TestDaemon::start(&fake);
    let (first, second) = (authorize(&d), authorize(&d));
    let (state1, state2, redirect) = (first.state, second.state, first.redirect_uri);
    let code1 = fake.issue_code("acct-1", &[FakeSite::jira("alpha")], &redirect);
    let code2 = fake.issue_code("acct-2", &[FakeSite::jira("beta")], &redirect);
    fake.set_token_delay(Duration::from_secs(1));
    let barrier = std::sync::Barrier::new(2);
    let results: Vec<HttpResponse> = std::thread::scope(|s| {
        let hs: Vec<_> = [(code1, state1), (code2, state2)]
            .into_iter()
            .map(|(code, state)| {
                let (d, barrier) = (&d, &barrier);
                s.spawn(move || {
                    let body = consent_body("jira", &code, &state);
                    barrier.wait();
                    d.post_json("/v1/connections", &body)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    fake.set_token_delay(Duration::ZERO);
    for r in &results {
        assert_eq!(
            r.status,
            201,
            "both consents must keep their chains: {}",
            r.text()
        );
    }
    let list = connections(&d);
    assert_eq!(list.len(), 2, "{list:?}");
    let mut accounts: Vec<&str> = list
        .iter()
        .map(|c| c["account_id"].as_str().unwrap_or_default())
        .collect();
    accounts.sort_unstable();
    assert_eq!(accounts, ["acct-1", "acct-2"], "{list:?}");
    let labels: Vec<&str> = list.iter().map(|c| c["label"].as_str().unwrap()).collect();
    assert!(labels.contains(&"jira"), "{labels:?}");
    assert_ne!(labels[0], labels[1], "{labels:?}");
    for c in &list {
        let id = c["id"].as_str().unwrap();
        let label = c["label"].as_str().unwrap();
        let account = c["account_id"].as_str().unwrap();
        let r = d.request("POST", &format!("/v1/connections/{id}/refresh"), None);
        assert_eq!(r.status, 200, "{label}: {}", r.text());
        assert_eq!(
            ledger_refresh_token(&d, label),
            fake.current_refresh_token(account).unwrap(),
            "{label}"
        );
    }
    assert_eq!(fake.reuse_violations(), 0);
    assert_no_secrets(&d.logs(), &fake);
}

/// The token endpoint answers 200 with a new `refresh_token` and nothing else (no
/// `access_token`): once for the first refresh of an imported token, once for a consent's
/// code exchange. The fake has rotated; the new refresh token exists only in that answer.
/// The fake's reuse leeway is 1 s.
///
/// Correct: a 2xx that carries a refresh token hands over the chain, however malformed the
/// rest: the daemon keeps that token (it never presents the replaced one again, so the fake
/// counts neither a leeway reuse nor a violation, even after the leeway has passed). Both
/// connections exist, stay `active`, refresh successfully later and hand out tokens the
/// provider accepts, and the ledger holds each family's current refresh token.
#[test]
fn a_2xx_answer_with_only_a_refresh_token_keeps_that_token() {
    let fake = FakeAtlassian::start();
    fake.set_leeway(Duration::from_secs(1));
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::start(&fake);

    // Onboarding by refresh token.
    fake.inject_token(Fault::RefreshTokenOnly);
    let r = add(&d, "conf", &rt);
    assert_eq!(
        r.status,
        201,
        "a malformed 200 that rotated is a stored chain: {}",
        r.text()
    );
    assert_eq!(r.json()["status"], "active", "{}", r.text());
    // Past the leeway of the imported token, on the fake's clock (which decides reuse).
    fake.advance(Duration::from_secs(2));
    let (code, conn) = d.get_json("/v1/connections/conf");
    assert_eq!(code, 200, "the connection must exist: {conn}");
    let r = d.request("POST", "/v1/connections/conf/refresh", None);
    assert_eq!(
        r.status,
        200,
        "the chain handed over in the refresh-token-only answer must live on: {}\nfake: {} leeway reuse(s), {} violation(s)",
        r.text(),
        fake.leeway_reuses(),
        fake.reuse_violations()
    );
    let (code, tok) = d.get_json("/v1/connections/conf/token");
    assert_eq!(code, 200, "{tok}");
    assert_eq!(
        fake.access_token_account(tok["access_token"].as_str().unwrap())
            .as_deref(),
        Some("acct-1")
    );
    assert_eq!(
        fake.leeway_reuses(),
        0,
        "the replaced token was presented again: the new one was thrown away"
    );
    assert_eq!(fake.reuse_violations(), 0);
    assert_eq!(status_of(&d, "conf"), "active");
    assert_eq!(
        ledger_refresh_token(&d, "conf"),
        fake.current_refresh_token("acct-1").unwrap()
    );

    // Onboarding by consent.
    let auth = authorize(&d);
    let code = fake.issue_code("acct-2", &[FakeSite::jira("beta")], &auth.redirect_uri);
    fake.inject_token(Fault::RefreshTokenOnly);
    let r = d.post_json("/v1/connections", &consent_body("jira", &code, &auth.state));
    assert_eq!(
        r.status,
        201,
        "the chain of a spent code was thrown away: {}",
        r.text()
    );
    let conn = r.json();
    assert_eq!(conn["account_id"], "acct-2", "{conn}");
    assert_eq!(conn["status"], "active", "{conn}");
    assert_eq!(d.get_json("/v1/connections/jira").0, 200);
    // Past the leeway of the code's first refresh token, on the fake's clock.
    fake.advance(Duration::from_secs(2));
    let r = d.request("POST", "/v1/connections/jira/refresh", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(status_of(&d, "jira"), "active");
    assert_eq!(
        ledger_refresh_token(&d, "jira"),
        fake.current_refresh_token("acct-2").unwrap()
    );
    assert_eq!(fake.leeway_reuses(), 0);
    assert_eq!(fake.reuse_violations(), 0);
    assert!(fake.family_alive("acct-1") && fake.family_alive("acct-2"));
    assert_no_secrets(&d.logs(), &fake);
}

/// Accessible-resources requests the fake answered for `account` so far.
fn resource_requests(fake: &FakeAtlassian, account: &str) -> usize {
    fake.requests()
        .iter()
        .filter(|r| {
            r.path == "/oauth/token/accessible-resources" && r.account.as_deref() == Some(account)
        })
        .count()
}

/// A connection reaches site `acme`; site `beta` is added at the fake afterwards, and the site
/// job is set to fire once a year (so it cannot be what notices). Then a service asks
/// `GET /v1/token?site=beta.atlassian.net`, and twice for `gamma.atlassian.net`, a site
/// nobody reaches.
///
/// Correct: a `?site=` lookup that matches nothing re-resolves the connections' sites before
/// answering, so the lookup for `beta` answers 200 with a token of that connection (one the
/// provider accepts for its account), and the connection lists `beta` afterwards. A miss
/// re-resolves a connection at most once a minute: the two lookups for `gamma` both answer
/// 404 and cost the fake at most one accessible-resources request for that account between
/// them. Resolution never rotates a chain: none of the three lookups reaches the token
/// endpoint.
#[test]
fn a_site_lookup_that_matches_nothing_re_resolves_once_a_minute() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::builder(&fake)
        // Once a year (1 January, midnight): the default hourly job could fire mid-test.
        .set("jobs", "resolve_sites", &toml_str("0 0 0 1 1 *"))
        .start();
    let conn = import(&d, "conf", &rt);
    let id = conn["id"].as_str().unwrap().to_owned();
    assert!(has_site(&d, "conf", "https://acme.atlassian.net"), "{conn}");
    assert!(
        !has_site(&d, "conf", "https://beta.atlassian.net"),
        "{conn}"
    );
    fake.add_site("acct-1", FakeSite::jira("beta"));
    let token_calls = fake.token_calls();

    let (code, tok) = d.get_json("/v1/token?site=beta.atlassian.net");
    assert_eq!(
        code,
        200,
        "a site added since the last resolution must be found by re-resolving on the miss: {tok}\n{}",
        d.logs()
    );
    assert_eq!(tok["connection_id"], id.as_str(), "{tok}");
    assert_eq!(
        fake.access_token_account(tok["access_token"].as_str().unwrap())
            .as_deref(),
        Some("acct-1"),
        "the token handed out is one the provider accepts for the connection's account"
    );
    assert!(
        has_site(&d, "conf", "https://beta.atlassian.net"),
        "the connection does not list the re-resolved site: {}",
        d.get_json("/v1/connections/conf").1
    );

    let resolutions = resource_requests(&fake, "acct-1");
    for n in 1..=2 {
        let r = d.request("GET", "/v1/token?site=gamma.atlassian.net", None);
        assert_eq!(
            r.status,
            404,
            "lookup #{n} for a site nobody reaches: {}",
            r.text()
        );
        assert_eq!(r.error_code().as_deref(), Some("not_found"), "{}", r.text());
    }
    let during_misses = resource_requests(&fake, "acct-1") - resolutions;
    assert!(
        during_misses <= 1,
        "two misses within a minute re-resolved the connection {during_misses} times; at most once a minute"
    );
    assert_eq!(
        fake.token_calls(),
        token_calls,
        "a ?site= lookup (hit or miss) called the token endpoint: a miss never rotates a chain"
    );
    assert_eq!(status_of(&d, "conf"), "active");
    assert_eq!(fake.reuse_violations(), 0);
    assert_no_secrets(&d.logs(), &fake);
}

/// `backoff_min = "20s"`. The provider answers a refresh with a 500 (it did not process it),
/// so the connection is in tokend's own backoff for ~20 s. An operator then runs
/// `POST /v1/connections/{id}/refresh`. Later the provider answers a refresh with 429 and
/// `Retry-After: 30`, and the operator asks again within those 30 s, twice.
///
/// Correct: tokend's own backoff is for its scheduler, not for an operator: the refresh
/// during the backoff answers 200 and rotates the chain (one token call, one rotation at the
/// fake, the ledger holds the new token, the failure count is back to 0). The provider's
/// `Retry-After` binds everyone, operators included: the refreshes within the 30 s answer
/// 503 `provider_unavailable` with a `Retry-After`, and make no token call at all.
#[test]
fn an_operator_refresh_during_backoff_still_refreshes() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::builder(&fake)
        .set("refresh", "backoff_min", &toml_str("20s"))
        .set("refresh", "backoff_max", &toml_str("60s"))
        .start();
    import(&d, "conf", &rt);

    // A transient failure puts the connection into tokend's own backoff.
    fake.inject_token(Fault::Status(500));
    let calls = fake.token_calls();
    let r = d.request("POST", "/v1/connections/conf/refresh", None);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("provider_unavailable"));
    assert_eq!(fake.token_calls(), calls + 1);
    let backoff: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After on the 503: {:?}", r.headers));
    assert!(
        backoff >= 10,
        "backoff_min is 20s (±20 %), yet the daemon retries in {backoff} s"
    );
    let (_, conn) = d.get_json("/v1/connections/conf");
    assert_eq!(conn["consecutive_failures"], 1, "{conn}");
    assert_eq!(conn["last_error"]["code"], "server_error", "{conn}");

    // The operator's refresh inside that backoff goes to the provider and rotates.
    let rotations = fake.rotations("acct-1");
    let calls = fake.token_calls();
    let r = d.request("POST", "/v1/connections/conf/refresh", None);
    assert_eq!(
        r.status,
        200,
        "an operator's refresh must ignore tokend's own backoff: {}",
        r.text()
    );
    assert_eq!(fake.token_calls(), calls + 1, "one token call");
    assert_eq!(fake.rotations("acct-1"), rotations + 1, "one rotation");
    assert_eq!(r.json()["consecutive_failures"], 0, "{}", r.text());
    assert_eq!(
        ledger_refresh_token(&d, "conf"),
        fake.current_refresh_token("acct-1").unwrap(),
        "the ledger holds the rotated token"
    );

    // The provider's Retry-After binds operators too.
    fake.inject_token(Fault::RateLimited {
        retry_after_secs: 30,
    });
    let r = d.request("POST", "/v1/connections/conf/refresh", None);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("provider_unavailable"));
    let limited_at = Instant::now();
    let rotations = fake.rotations("acct-1");
    let calls = fake.token_calls();
    for pause in [Duration::ZERO, Duration::from_secs(2)] {
        std::thread::sleep(pause);
        let r = d.request("POST", "/v1/connections/conf/refresh", None);
        assert!(
            limited_at.elapsed() < Duration::from_secs(25),
            "the test itself was too slow to stay inside the provider's 30 s"
        );
        assert_eq!(
            r.status,
            503,
            "an operator's refresh within the provider's Retry-After: {}",
            r.text()
        );
        assert_eq!(r.error_code().as_deref(), Some("provider_unavailable"));
        let wait: u64 = r
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no Retry-After on the 503: {:?}", r.headers));
        assert!((1..=31).contains(&wait), "Retry-After {wait}");
        assert_eq!(
            fake.token_calls(),
            calls,
            "an operator's refresh reached the token endpoint inside the provider's Retry-After"
        );
    }
    assert_eq!(fake.rotations("acct-1"), rotations);
    assert_eq!(status_of(&d, "conf"), "active");
    assert_eq!(fake.leeway_reuses(), 0);
    assert_eq!(fake.reuse_violations(), 0);
    assert!(fake.family_alive("acct-1"));
    assert_no_secrets(&d.logs(), &fake);
}

/// A refresh reaches the provider, which rotates and then drops the connection (the outcome
/// is unknown to tokend). tokend's own retry of it, presenting the same token, is answered
/// 429 with `Retry-After: 60` without being processed (a plain failure). Once that failure
/// is recorded, the daemon is SIGKILLed and started again.
///
/// Correct: the plain failure says nothing about the earlier attempt, whose rotation may
/// have happened (it did), so its marker survives in the ledger. At the next start the
/// chain is due at once as a recovery: without any caller, within a few seconds, the daemon
/// presents the stored token again, inside the leeway (the fake counts a leeway reuse, no
/// violation), and the ledger ends up with the fake's current refresh token; the connection
/// is `active` and hands out tokens the provider accepts.
#[test]
fn restart_after_an_unknown_outcome_retries_at_once_inside_the_leeway() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let mut d = TestDaemon::start(&fake);
    import(&d, "conf", &rt);
    let stored = ledger_refresh_token(&d, "conf");

    fake.inject_token(Fault::Disconnect);
    fake.inject_token(Fault::RateLimited {
        retry_after_secs: 60,
    });
    let calls = fake.token_requests().len();
    let r = d.request("POST", "/v1/connections/conf/refresh", None);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("provider_unavailable"));
    // tokend's own retry of the unknown outcome meets the 429, and records the failure.
    assert!(
        eventually(Duration::from_secs(10), || {
            let (_, conn) = d.get_json("/v1/connections/conf");
            conn["consecutive_failures"] == 2 && conn["last_error"]["code"] == "rate_limited"
        }),
        "the retry of the unknown outcome did not meet the 429: {}\n{}",
        d.get_json("/v1/connections/conf").1,
        d.logs()
    );
    let seen: Vec<_> = fake.token_requests()[calls..]
        .iter()
        .map(|r| r.fault.clone())
        .collect();
    assert_eq!(
        seen,
        [
            Some(Fault::Disconnect),
            Some(Fault::RateLimited {
                retry_after_secs: 60
            })
        ],
        "the two faulted token calls and nothing else"
    );
    assert_ne!(
        fake.current_refresh_token("acct-1").unwrap(),
        stored,
        "the fake rotated in the dropped answer"
    );
    assert_eq!(ledger_refresh_token(&d, "conf"), stored);

    d.kill9();
    let reuses = fake.leeway_reuses();
    let calls = fake.token_requests().len();
    d.restart();
    // No caller: only the daemon itself may act.
    assert!(
        eventually(Duration::from_secs(10), || fake.leeway_reuses() > reuses
            && ledger_refresh_token(&d, "conf")
                == fake.current_refresh_token("acct-1").unwrap_or_default()),
        "after the restart the daemon did not retry the unknown outcome inside the leeway (a later plain failure erased its marker?)\nfake token calls since the restart: {:?}\n{}",
        fake.token_requests()[calls..]
            .iter()
            .map(|r| (&r.outcome, r.status))
            .collect::<Vec<_>>(),
        d.logs()
    );
    assert_eq!(
        fake.token_requests()[calls].outcome,
        crate::fake::Outcome::LeewayReuse,
        "the first call after the restart presents the stored token again"
    );
    assert_eq!(fake.leeway_reuses(), reuses + 1);
    assert_eq!(fake.reuse_violations(), 0);
    assert!(fake.family_alive("acct-1"));
    assert_eq!(status_of(&d, "conf"), "active");
    let (code, tok) = d.get_json("/v1/connections/conf/token");
    assert_eq!(code, 200, "{tok}");
    assert_eq!(
        fake.access_token_account(tok["access_token"].as_str().unwrap())
            .as_deref(),
        Some("acct-1")
    );
    assert_no_secrets(&d.logs(), &fake);
}
