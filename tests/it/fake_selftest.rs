//! Tests of the fake Atlassian server itself ([`crate::fake`]), driven with reqwest, so that
//! the daemon tests can trust what it answers and counts.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fake::{
    CLIENT_ID, CLIENT_SECRET, Endpoint, ErrorShape, FakeAtlassian, FakeSite, Fault, Outcome,
    SecretKind,
};

const ACCOUNT: &str = "acc-1";

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// POSTs a JSON body to the token endpoint; returns status and the body as JSON (or as a
/// JSON string holding the raw text when it is not JSON).
async fn post_token(fake: &FakeAtlassian, body: Value) -> (u16, Value) {
    let r = client()
        .post(fake.token_url())
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("token request");
    let status = r.status().as_u16();
    let text = r.text().await.expect("token body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn refresh(fake: &FakeAtlassian, rt: &str) -> (u16, Value) {
    post_token(
        fake,
        json!({
            "grant_type": "refresh_token",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "refresh_token": rt,
        }),
    )
    .await
}

/// Refreshes and expects success; returns (access token, refresh token).
async fn refresh_ok(fake: &FakeAtlassian, rt: &str) -> (String, String) {
    let (status, body) = refresh(fake, rt).await;
    assert_eq!(status, 200, "refresh failed: {body}");
    (
        body["access_token"].as_str().expect("access_token").into(),
        body["refresh_token"]
            .as_str()
            .expect("refresh_token")
            .into(),
    )
}

fn assert_invalid_grant(status: u16, body: &Value) {
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body,
        &json!({"error": "invalid_grant", "error_description": "Unknown or invalid refresh token."})
    );
}

async fn get_bearer(fake: &FakeAtlassian, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = client().get(format!("{}{path}", fake.base_url()));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("bearer request");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn sites() -> Vec<FakeSite> {
    vec![FakeSite::confluence("acme"), FakeSite::jira("acme")]
}

fn last_outcome(fake: &FakeAtlassian) -> Outcome {
    fake.requests().last().expect("a request").outcome.clone()
}

#[tokio::test]
async fn refresh_rotates_and_reports_a_full_response() {
    let fake = FakeAtlassian::start();
    let rt0 = fake.issue_grant(ACCOUNT, &sites());
    assert_eq!(fake.current_refresh_token(ACCOUNT).as_deref(), Some(&*rt0));

    let (status, body) = refresh(&fake, &rt0).await;
    assert_eq!(status, 200, "{body}");
    let rt1 = body["refresh_token"].as_str().unwrap();
    let at1 = body["access_token"].as_str().unwrap();
    assert!(
        rt1.starts_with("rt-") && rt1.len() == 35 && rt1 != rt0,
        "{rt1}"
    );
    assert!(at1.starts_with("at-") && at1.len() == 35, "{at1}");
    assert_eq!(body["expires_in"], json!(3600));
    assert_eq!(body["token_type"], json!("Bearer"));
    let scope = body["scope"].as_str().unwrap();
    for s in ["offline_access", "read:page:confluence", "read:jira-work"] {
        assert!(scope.split(' ').any(|x| x == s), "{scope} lacks {s}");
    }
    assert_eq!(fake.current_refresh_token(ACCOUNT).as_deref(), Some(rt1));
    assert_eq!(fake.rotations(ACCOUNT), 1);
    assert_eq!(fake.successful_refreshes(ACCOUNT), 1);
    assert_eq!(fake.refresh_calls(), 1);
    assert_eq!(
        fake.access_token_account(at1).as_deref(),
        Some(ACCOUNT),
        "new access token valid"
    );
    let log = fake.token_requests();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].grant_type.as_deref(), Some("refresh_token"));
    assert_eq!(log[0].outcome, Outcome::Refreshed);
    assert_eq!(log[0].status, 200);
    assert_eq!(log[0].account.as_deref(), Some(ACCOUNT));

    // The new token rotates in turn.
    let (_, rt2) = refresh_ok(&fake, rt1).await;
    assert_ne!(rt2, rt1);
    assert_eq!(fake.rotations(ACCOUNT), 2);
    assert_eq!(fake.leeway_reuses(), 0);
    assert_eq!(fake.reuse_violations(), 0);
}

#[tokio::test]
async fn reuse_of_the_previous_token_within_the_leeway_issues_a_fresh_pair() {
    let fake = FakeAtlassian::start();
    fake.set_leeway(Duration::from_secs(1));
    let rt0 = fake.issue_grant(ACCOUNT, &sites());
    let (at1, rt1) = refresh_ok(&fake, &rt0).await;

    // The response "was lost": the client retries with rt0.
    let (_, rt2) = refresh_ok(&fake, &rt0).await;
    assert_ne!(rt2, rt1);
    assert_ne!(rt2, rt0);
    assert_eq!(fake.leeway_reuses(), 1);
    assert_eq!(fake.reuse_violations(), 0);
    assert_eq!(last_outcome(&fake), Outcome::LeewayReuse);
    assert_eq!(fake.current_refresh_token(ACCOUNT).as_deref(), Some(&*rt2));
    assert_eq!(fake.rotations(ACCOUNT), 2);
    assert_eq!(fake.successful_refreshes(ACCOUNT), 2);
    // rt0 may be retried again, still within its leeway.
    let (_, rt3) = refresh_ok(&fake, &rt0).await;
    assert_eq!(fake.leeway_reuses(), 2);
    // The chain goes on from the newest token.
    let (_, rt4) = refresh_ok(&fake, &rt3).await;
    assert_eq!(fake.current_refresh_token(ACCOUNT).as_deref(), Some(&*rt4));
    assert!(fake.family_alive(ACCOUNT));
    // The superseded rt1's companion access token is valid until the leeway ends.
    assert_eq!(fake.access_token_account(&at1).as_deref(), Some(ACCOUNT));
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(fake.access_token_account(&at1), None);
}

#[tokio::test]
async fn reuse_outside_the_leeway_revokes_the_family() {
    let fake = FakeAtlassian::start();
    fake.set_leeway(Duration::from_secs(1));
    let rt0 = fake.issue_grant(ACCOUNT, &sites());
    let (at1, rt1) = refresh_ok(&fake, &rt0).await;
    std::thread::sleep(Duration::from_millis(1200));

    let (status, body) = refresh(&fake, &rt0).await;
    assert_invalid_grant(status, &body);
    assert_eq!(last_outcome(&fake), Outcome::ReuseViolation);
    assert_eq!(fake.reuse_violations(), 1);
    assert!(!fake.family_alive(ACCOUNT));
    assert_eq!(fake.current_refresh_token(ACCOUNT), None);

    // Every token of the family is dead now, the current one included.
    let (status, body) = refresh(&fake, &rt1).await;
    assert_invalid_grant(status, &body);
    assert_eq!(last_outcome(&fake), Outcome::FamilyRevoked);
    assert_eq!(fake.reuse_violations(), 1, "not counted twice");
    let (status, _) = get_bearer(&fake, "/oauth/token/accessible-resources", Some(&at1)).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn reuse_of_an_older_token_within_the_leeway_revokes_the_family() {
    let fake = FakeAtlassian::start();
    let rt0 = fake.issue_grant(ACCOUNT, &sites());
    let (_, rt1) = refresh_ok(&fake, &rt0).await;
    let (_, rt2) = refresh_ok(&fake, &rt1).await;
    // rt1 (the immediate predecessor) would be fine; rt0 is one step older.
    let (status, body) = refresh(&fake, &rt0).await;
    assert_invalid_grant(status, &body);
    assert_eq!(fake.reuse_violations(), 1);
    assert!(!fake.family_alive(ACCOUNT));
    let (status, _) = refresh(&fake, &rt2).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn the_fake_clock_crosses_the_default_leeway() {
    let fake = FakeAtlassian::start();
    let rt0 = fake.issue_grant(ACCOUNT, &sites());
    let (_, _rt1) = refresh_ok(&fake, &rt0).await;
    fake.advance(Duration::from_secs(9 * 60));
    refresh_ok(&fake, &rt0).await;
    assert_eq!(fake.leeway_reuses(), 1);
    fake.advance(Duration::from_secs(2 * 60));
    let (status, _) = refresh(&fake, &rt0).await;
    assert_eq!(status, 403);
    assert_eq!(fake.reuse_violations(), 1);
}

#[tokio::test]
async fn revoked_family_answers_the_chosen_error_shape() {
    let fake = FakeAtlassian::start();
    let rt0 = fake.issue_grant(ACCOUNT, &sites());
    let (at1, rt1) = refresh_ok(&fake, &rt0).await;
    fake.revoke_family(ACCOUNT);
    assert!(!fake.family_alive(ACCOUNT));
    let (status, body) = refresh(&fake, &rt1).await;
    assert_invalid_grant(status, &body);
    fake.set_error_shape(ErrorShape::UnauthorizedClient);
    let (status, body) = refresh(&fake, &rt1).await;
    assert_eq!(status, 403);
    assert_eq!(
        body,
        json!({"error": "unauthorized_client", "error_description": "refresh_token is invalid"})
    );
    assert_eq!(fake.reuse_violations(), 0);
    let (status, _) = get_bearer(&fake, "/me", Some(&at1)).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn a_new_grant_supersedes_the_old_family() {
    let fake = FakeAtlassian::start();
    let old = fake.issue_grant(ACCOUNT, &sites());
    let new = fake.issue_grant(ACCOUNT, &sites());
    let (status, body) = refresh(&fake, &old).await;
    assert_invalid_grant(status, &body);
    assert_eq!(last_outcome(&fake), Outcome::Superseded);
    assert_eq!(fake.reuse_violations(), 0);
    assert!(fake.family_alive(ACCOUNT));
    refresh_ok(&fake, &new).await;
}

#[tokio::test]
async fn inactivity_expiry_kills_an_unused_token_but_not_the_family() {
    let fake = FakeAtlassian::start();
    let rt0 = fake.issue_grant(ACCOUNT, &sites());
    // Used in time, each rotation restarts the 90 days.
    fake.advance(Duration::from_secs(89 * 24 * 3600));
    let (_, rt1) = refresh_ok(&fake, &rt0).await;
    fake.advance(Duration::from_secs(89 * 24 * 3600));
    let (_, rt2) = refresh_ok(&fake, &rt1).await;
    fake.advance(Duration::from_secs(91 * 24 * 3600));
    let (status, body) = refresh(&fake, &rt2).await;
    assert_invalid_grant(status, &body);
    assert_eq!(last_outcome(&fake), Outcome::Expired);
    assert!(fake.family_alive(ACCOUNT));
    assert_eq!(fake.reuse_violations(), 0);

    // Configurable, in real time.
    let fake = FakeAtlassian::start();
    fake.set_inactivity_expiry(Duration::from_millis(300));
    let rt0 = fake.issue_grant(ACCOUNT, &sites());
    std::thread::sleep(Duration::from_millis(400));
    let (status, _) = refresh(&fake, &rt0).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn client_credentials_are_checked() {
    let fake = FakeAtlassian::start();
    let rt0 = fake.issue_grant(ACCOUNT, &sites());
    let unauthorized = json!({"error": "access_denied", "error_description": "Unauthorized"});
    for body in [
        json!({"grant_type": "refresh_token", "client_id": CLIENT_ID, "client_secret": "nope", "refresh_token": rt0}),
        json!({"grant_type": "refresh_token", "client_id": "other", "client_secret": CLIENT_SECRET, "refresh_token": rt0}),
        json!({"grant_type": "refresh_token", "client_id": CLIENT_ID, "refresh_token": rt0}),
        json!({"grant_type": "refresh_token", "refresh_token": rt0}),
    ] {
        let (status, got) = post_token(&fake, body).await;
        assert_eq!((status, &got), (401, &unauthorized));
    }
    assert_eq!(last_outcome(&fake), Outcome::BadClient);
    assert_eq!(fake.refresh_calls(), 4, "failed calls count too");
    assert_eq!(fake.current_refresh_token(ACCOUNT).as_deref(), Some(&*rt0));
    // Unknown refresh token.
    let (status, body) = refresh(&fake, "rt-made-up").await;
    assert_invalid_grant(status, &body);
    assert_eq!(last_outcome(&fake), Outcome::UnknownToken);
}

#[tokio::test]
async fn only_json_bodies_are_accepted() {
    let fake = FakeAtlassian::start();
    let rt0 = fake.issue_grant(ACCOUNT, &sites());
    let form = format!(
        "grant_type=refresh_token&client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}&refresh_token={rt0}"
    );
    let r = client()
        .post(fake.token_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], json!("invalid_request"));
    assert_eq!(fake.current_refresh_token(ACCOUNT).as_deref(), Some(&*rt0));

    // JSON without the content type.
    let json_body = json!({"grant_type": "refresh_token", "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET, "refresh_token": rt0})
    .to_string();
    let r = client()
        .post(fake.token_url())
        .body(json_body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);

    // Malformed JSON and wrong shapes.
    for bad in [
        "{\"grant_type\": \"refresh_token\",",
        "[1,2,3]",
        "\"x\"",
        "",
    ] {
        let r = client()
            .post(fake.token_url())
            .header("content-type", "application/json; charset=utf-8")
            .body(bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{bad:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], json!("invalid_request"), "{bad:?}");
    }
    // Mistyped fields never panic the fake.
    let (status, _) = post_token(
        &fake,
        json!({"grant_type": 5, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}),
    )
    .await;
    assert_eq!(status, 400);
    let (status, body) = post_token(
        &fake,
        json!({"grant_type": "refresh_token", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "refresh_token": 7}),
    )
    .await;
    assert_eq!((status, &body["error"]), (400, &json!("invalid_request")));
    let (status, body) = post_token(
        &fake,
        json!({"grant_type": "password", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}),
    )
    .await;
    assert_eq!(
        (status, &body["error"]),
        (400, &json!("unsupported_grant_type"))
    );
    // charset parameter is fine, and the token was never rotated by the bad requests.
    let r = client()
        .post(fake.token_url())
        .header("content-type", "application/json; charset=utf-8")
        .body(json_body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn pre_processing_faults_answer_without_rotating_in_fifo_order() {
    let fake = FakeAtlassian::start();
    let rt0 = fake.issue_grant(ACCOUNT, &sites());
    fake.inject_token(Fault::Status(500));
    fake.inject_token(Fault::Html(502));
    fake.inject_token(Fault::RateLimited {
        retry_after_secs: 7,
    });
    fake.inject_token(Fault::Unavailable {
        retry_after_secs: 3,
    });
    assert_eq!(fake.pending_faults(Endpoint::Token), 4);

    let send = || {
        client()
            .post(fake.token_url())
            .header("content-type", "application/json")
            .body(
                json!({"grant_type": "refresh_token", "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET, "refresh_token": rt0})
                .to_string(),
            )
            .send()
    };
    let r = send().await.unwrap();
    assert_eq!(r.status().as_u16(), 500);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], json!("server_error"));

    let r = send().await.unwrap();
    assert_eq!(r.status().as_u16(), 502);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(r.text().await.unwrap().contains("<html>"));

    let r = send().await.unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(r.headers()["retry-after"], "7");

    let r = send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "3");

    assert_eq!(fake.pending_faults(Endpoint::Token), 0);
    assert_eq!(fake.current_refresh_token(ACCOUNT).as_deref(), Some(&*rt0));
    assert_eq!(fake.rotations(ACCOUNT), 0);
    assert_eq!(fake.successful_refreshes(ACCOUNT), 0);
    let outcomes: Vec<Outcome> = fake.requests().into_iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            Outcome::Injected(Fault::Status(500)),
            Outcome::Injected(Fault::Html(502)),
            Outcome::Injected(Fault::RateLimited {
                retry_after_secs: 7
            }),
            Outcome::Injected(Fault::Unavailable {
                retry_after_secs: 3
            }),
        ]
    );
    assert_eq!(fake.refresh_calls(), 4);

    // Queue drained: the next call works, with the same token.
    let (_, rt1) = refresh_ok(&fake, &rt0).await;
    assert_ne!(rt1, rt0);

    // clear_faults drops what is queued.
    fake.inject_token(Fault::Status(500));
    fake.clear_faults();
    refresh_ok(&fake, &rt1).await;
}

#[tokio::test]
async fn malformed_json_rotates_and_the_leeway_lets_the_client_recover() {
    let fake = FakeAtlassian::start();
    let rt0 = fake.issue_grant(ACCOUNT, &sites());
    fake.inject_token(Fault::MalformedJson);
    let (status, body) = refresh(&fake, &rt0).await;
    assert_eq!(status, 200);
    let text = body.as_str().expect("not JSON, so kept as text");
    assert!(text.starts_with('{') && !text.ends_with('}'), "{text}");
    assert!(serde_json::from_str::<Value>(text).is_err());
    let rotated = fake.current_refresh_token(ACCOUNT).unwrap();
    assert_ne!(rotated, rt0, "the fake rotated before answering garbage");
    assert_eq!(fake.rotations(ACCOUNT), 1);

    let (_, rt2) = refresh_ok(&fake, &rt0).await;
    assert_eq!(fake.leeway_reuses(), 1);
    assert_eq!(fake.current_refresh_token(ACCOUNT).as_deref(), Some(&*rt2));
    assert_eq!(fake.reuse_violations(), 0);
}

#[tokio::test]
async fn omit_refresh_token_keeps_the_old_token_current() {
    let fake = FakeAtlassian::start();
    let rt0 = fake.issue_grant(ACCOUNT, &sites());
    fake.inject_token(Fault::OmitRefreshToken);
    let (status, body) = refresh(&fake, &rt0).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("refresh_token").is_none(), "{body}");
    let at = body["access_token"].as_str().unwrap();
    assert_eq!(body["expires_in"], json!(3600));
    assert_eq!(fake.access_token_account(at).as_deref(), Some(ACCOUNT));
    assert_eq!(fake.current_refresh_token(ACCOUNT).as_deref(), Some(&*rt0));
    assert_eq!(fake.rotations(ACCOUNT), 0);
    assert_eq!(fake.successful_refreshes(ACCOUNT), 1);
    // The old token keeps working, as current (no leeway reuse).
    refresh_ok(&fake, &rt0).await;
    assert_eq!(fake.leeway_reuses(), 0);
    assert_eq!(fake.rotations(ACCOUNT), 1);
}

#[tokio::test]
async fn refresh_token_only_rotates_and_answers_nothing_else() {
    let fake = FakeAtlassian::start();
    let rt0 = fake.issue_grant(ACCOUNT, &sites());
    fake.inject_token(Fault::RefreshTokenOnly);
    let (status, body) = refresh(&fake, &rt0).await;
    assert_eq!(status, 200, "{body}");
    let obj = body.as_object().expect("a JSON object");
    assert_eq!(obj.len(), 1, "only the refresh token: {body}");
    let rt1 = body["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(rt1, rt0);
    assert_eq!(fake.current_refresh_token(ACCOUNT).as_deref(), Some(&*rt1));
    assert_eq!(fake.rotations(ACCOUNT), 1);
    assert_eq!(last_outcome(&fake), Outcome::Refreshed);
    // The new token is the chain: it rotates normally, with a full answer again.
    let (_, rt2) = refresh_ok(&fake, &rt1).await;
    assert_eq!(fake.current_refresh_token(ACCOUNT).as_deref(), Some(&*rt2));
    assert_eq!(fake.leeway_reuses(), 0);
    assert_eq!(fake.reuse_violations(), 0);

    // A code exchange with the fault: the new family's first token only.
    let redirect = "http://127.0.0.1:8976/callback";
    let code = fake.issue_code("acc-2", &sites(), redirect);
    fake.inject_token(Fault::RefreshTokenOnly);
    let (status, body) = post_token(
        &fake,
        json!({"grant_type": "authorization_code", "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET, "code": code, "redirect_uri": redirect}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    assert_eq!(
        fake.current_refresh_token("acc-2").as_deref(),
        body["refresh_token"].as_str()
    );
}

#[tokio::test]
async fn expires_in_can_be_omitted_or_unconfigured_and_lifetimes_apply() {
    let fake = FakeAtlassian::start();
    let rt0 = fake.issue_grant(ACCOUNT, &sites());
    fake.inject_token(Fault::OmitExpiresIn);
    let (status, body) = refresh(&fake, &rt0).await;
    assert_eq!(status, 200);
    assert!(body.get("expires_in").is_none(), "{body}");
    assert!(body.get("refresh_token").is_some());

    fake.set_access_lifetime(None);
    let rt1 = fake.current_refresh_token(ACCOUNT).unwrap();
    let (status, body) = refresh(&fake, &rt1).await;
    assert_eq!(status, 200);
    assert!(body.get("expires_in").is_none(), "{body}");

    fake.set_access_lifetime(Some(Duration::from_secs(120)));
    let rt2 = fake.current_refresh_token(ACCOUNT).unwrap();
    let (status, body) = refresh(&fake, &rt2).await;
    assert_eq!(status, 200);
    assert_eq!(body["expires_in"], json!(120));
    let at = body["access_token"].as_str().unwrap();
    assert!(fake.access_token_account(at).is_some());
    fake.advance(Duration::from_secs(121));
    assert_eq!(fake.access_token_account(at), None, "expired");
    let (status, _) = get_bearer(&fake, "/me", Some(at)).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn delay_commits_the_rotation_when_the_request_arrives() {
    let fake = FakeAtlassian::start();
    let rt0 = fake.issue_grant(ACCOUNT, &sites());
    fake.inject_token(Fault::Delay(Duration::from_millis(1500)));
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = impatient
        .post(fake.token_url())
        .header("content-type", "application/json")
        .body(
            json!({"grant_type": "refresh_token", "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET, "refresh_token": rt0})
            .to_string(),
        )
        .send()
        .await
        .expect_err("the client gives up first");
    assert!(err.is_timeout(), "{err}");
    assert_ne!(
        fake.current_refresh_token(ACCOUNT).as_deref(),
        Some(&*rt0),
        "rotated although the client never saw the answer"
    );
    let log = fake.token_requests();
    assert_eq!(
        log[0].fault,
        Some(Fault::Delay(Duration::from_millis(1500)))
    );
    assert_eq!(log[0].outcome, Outcome::Refreshed);

    // A patient client gets the answer after the delay.
    fake.inject_token(Fault::Delay(Duration::from_millis(400)));
    let started = Instant::now();
    refresh_ok(&fake, &rt0).await;
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(fake.leeway_reuses(), 1);

    // The persistent delay applies to every token response.
    fake.set_token_delay(Duration::from_millis(300));
    let rt = fake.current_refresh_token(ACCOUNT).unwrap();
    let started = Instant::now();
    refresh_ok(&fake, &rt).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    fake.set_token_delay(Duration::ZERO);
    let rt = fake.current_refresh_token(ACCOUNT).unwrap();
    let started = Instant::now();
    refresh_ok(&fake, &rt).await;
    assert!(started.elapsed() < Duration::from_millis(300));
}

#[tokio::test]
async fn disconnect_rotates_and_breaks_the_response() {
    let fake = FakeAtlassian::start();
    let rt0 = fake.issue_grant(ACCOUNT, &sites());
    fake.inject_token(Fault::Disconnect);
    let result = async {
        let r = client()
            .post(fake.token_url())
            .header("content-type", "application/json")
            .body(
                json!({"grant_type": "refresh_token", "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET, "refresh_token": rt0})
                .to_string(),
            )
            .send()
            .await?;
        r.bytes().await
    }
    .await;
    assert!(result.is_err(), "got a complete response: {result:?}");
    assert_ne!(fake.current_refresh_token(ACCOUNT).as_deref(), Some(&*rt0));
    // The fake still serves.
    refresh_ok(&fake, &rt0).await;
}

#[tokio::test]
async fn authorization_code_grant() {
    let fake = FakeAtlassian::start();
    let redirect = "http://127.0.0.1:8976/callback";
    let code = fake.issue_code(ACCOUNT, &sites(), redirect);
    assert!(!fake.family_alive(ACCOUNT), "no family before the exchange");
    let exchange = |code: String, redirect: &'static str| {
        let fake = &fake;
        async move {
            post_token(
                fake,
                json!({"grant_type": "authorization_code", "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET, "code": code, "redirect_uri": redirect}),
            )
            .await
        }
    };
    let invalid =
        json!({"error": "invalid_request", "error_description": "authorization_code is invalid"});

    let (status, body) = exchange(code.clone(), "http://127.0.0.1:1/other").await;
    assert_eq!((status, &body), (400, &invalid));
    let (status, body) = exchange("code-unknown".into(), redirect).await;
    assert_eq!((status, &body), (400, &invalid));

    let (status, body) = exchange(code.clone(), redirect).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(last_outcome(&fake), Outcome::CodeExchanged);
    let rt = body["refresh_token"].as_str().unwrap();
    let at = body["access_token"].as_str().unwrap();
    assert_eq!(body["token_type"], json!("Bearer"));
    assert_eq!(fake.current_refresh_token(ACCOUNT).as_deref(), Some(rt));
    let (status, resources) =
        get_bearer(&fake, "/oauth/token/accessible-resources", Some(at)).await;
    assert_eq!(status, 200);
    assert_eq!(resources.as_array().unwrap().len(), 2);

    // Single use.
    let (status, body) = exchange(code, redirect).await;
    assert_eq!((status, &body), (400, &invalid));
    assert_eq!(fake.refresh_calls(), 0);
    refresh_ok(&fake, rt).await;

    // Ten minutes of life.
    let code = fake.issue_code(ACCOUNT, &sites(), redirect);
    fake.advance(Duration::from_secs(601));
    let (status, body) = exchange(code, redirect).await;
    assert_eq!((status, &body), (400, &invalid));
    assert_eq!(last_outcome(&fake), Outcome::BadCode);
}

#[tokio::test]
async fn accessible_resources_follow_the_family() {
    let fake = FakeAtlassian::start();
    let rt0 = fake.issue_grant(ACCOUNT, &[FakeSite::confluence("acme")]);
    let (at1, rt1) = refresh_ok(&fake, &rt0).await;
    let path = "/oauth/token/accessible-resources";

    let (status, body) = get_bearer(&fake, path, Some(&at1)).await;
    assert_eq!(status, 200);
    let site = FakeSite::confluence("acme");
    assert_eq!(
        body,
        json!([{
            "id": site.cloud_id, "url": "https://acme.atlassian.net", "name": "acme",
            "scopes": ["read:page:confluence", "read:space:confluence"],
            "avatarUrl": "https://site-admin-avatar-cdn.prod.public.atl-paas.net/avatars/240/flag.png",
        }])
    );
    assert_eq!(site.host(), "acme.atlassian.net");
    assert_eq!(site.cloud_id, FakeSite::jira("acme").cloud_id);
    assert_ne!(site.cloud_id, FakeSite::confluence("other").cloud_id);

    fake.add_site(ACCOUNT, FakeSite::jira("beta"));
    let (_, body) = get_bearer(&fake, path, Some(&at1)).await;
    assert_eq!(body.as_array().unwrap().len(), 2);
    fake.remove_site(ACCOUNT, &site.cloud_id);
    let (_, body) = get_bearer(&fake, path, Some(&at1)).await;
    assert_eq!(body[0]["name"], json!("beta"));
    assert_eq!(body.as_array().unwrap().len(), 1);

    for bad in [None, Some("at-unknown"), Some(rt1.as_str())] {
        let (status, _) = get_bearer(&fake, path, bad).await;
        assert_eq!(status, 401, "{bad:?}");
    }
    assert_eq!(last_outcome(&fake), Outcome::Unauthorized);

    // The old access token survives its companion's rotation for the leeway only.
    let (at2, _) = refresh_ok(&fake, &rt1).await;
    assert_eq!(get_bearer(&fake, path, Some(&at1)).await.0, 200);
    fake.advance(Duration::from_secs(601));
    assert_eq!(get_bearer(&fake, path, Some(&at1)).await.0, 401);
    assert_eq!(get_bearer(&fake, path, Some(&at2)).await.0, 200);

    // Faults.
    fake.inject_resources(Fault::Status(500));
    fake.inject_resources(Fault::Delay(Duration::from_millis(300)));
    assert_eq!(get_bearer(&fake, path, Some(&at2)).await.0, 500);
    let started = Instant::now();
    assert_eq!(get_bearer(&fake, path, Some(&at2)).await.0, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    fake.revoke_family(ACCOUNT);
    assert_eq!(get_bearer(&fake, path, Some(&at2)).await.0, 401);
}

#[tokio::test]
async fn me_answers_the_profile_unless_hidden() {
    let fake = FakeAtlassian::start();
    let rt0 = fake.issue_grant(ACCOUNT, &sites());
    let (at, _) = refresh_ok(&fake, &rt0).await;
    let (status, body) = get_bearer(&fake, "/me", Some(&at)).await;
    assert_eq!(status, 200);
    assert_eq!(body["account_id"], json!(ACCOUNT));
    assert_eq!(body["account_type"], json!("atlassian"));
    assert_eq!(body["account_status"], json!("active"));
    assert!(body["email"].as_str().unwrap().contains('@'));
    assert!(body["name"].is_string());

    assert_eq!(get_bearer(&fake, "/me", Some("at-nope")).await.0, 401);
    fake.hide_account(ACCOUNT);
    assert_eq!(get_bearer(&fake, "/me", Some(&at)).await.0, 403);
    assert_eq!(last_outcome(&fake), Outcome::Hidden);
    fake.unhide_account(ACCOUNT);
    assert_eq!(get_bearer(&fake, "/me", Some(&at)).await.0, 200);
    fake.inject_me(Fault::Status(503));
    assert_eq!(get_bearer(&fake, "/me", Some(&at)).await.0, 503);
}

#[tokio::test]
async fn unknown_paths_404_and_everything_is_logged() {
    let fake = FakeAtlassian::start();
    let started = Instant::now();
    assert!(fake.addr().ip().is_loopback());
    assert_eq!(fake.base_url(), format!("http://{}", fake.addr()));
    let (status, _) = get_bearer(&fake, "/nope", None).await;
    assert_eq!(status, 404);
    let r = client().get(fake.token_url()).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404, "GET on the token endpoint");
    let r = client().get(fake.authorize_url()).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let log = fake.requests();
    assert_eq!(log.len(), 3);
    assert_eq!(log[0].path, "/nope");
    assert_eq!(log[0].outcome, Outcome::NotFound);
    assert_eq!(log[1].method, "GET");
    assert!(log.iter().all(|r| r.at >= started));
    assert!(log.windows(2).all(|w| w[0].at <= w[1].at));
    assert_eq!(fake.token_calls(), 1);
    assert_eq!(fake.refresh_calls(), 0);
}

#[tokio::test]
async fn issued_secrets_list_everything_handed_out() {
    let fake = FakeAtlassian::start();
    let rt0 = fake.issue_grant(ACCOUNT, &sites());
    let (at1, rt1) = refresh_ok(&fake, &rt0).await;
    let code = fake.issue_code("acc-2", &sites(), "http://127.0.0.1:1/cb");
    let secrets = fake.issued_secrets();
    for s in [CLIENT_SECRET, &rt0, &rt1, &at1, &code] {
        assert!(secrets.iter().any(|x| x == s), "missing a secret");
    }
    assert_eq!(secrets.len(), 5);
    let detailed = fake.issued_secrets_detailed();
    let kinds: Vec<SecretKind> = detailed.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        vec![
            SecretKind::ClientSecret,
            SecretKind::RefreshToken,
            SecretKind::RefreshToken,
            SecretKind::AccessToken,
            SecretKind::AuthorizationCode,
        ]
    );
    assert_eq!(detailed[2].ordinal, 2);
    let described = detailed[2].describe();
    assert!(
        !described.contains(&rt1) && described.contains(ACCOUNT),
        "{described}"
    );
}

#[test]
fn the_fake_serves_plain_tests_and_unguessable_tokens() {
    // No runtime in this test: the fake brings its own.
    let fake = FakeAtlassian::start();
    let a = fake.issue_grant("a", &[]);
    let b = fake.issue_grant("b", &[]);
    assert_ne!(a, b);
    assert!(a[3..].chars().all(|c| c.is_ascii_alphanumeric()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, body) = rt.block_on(refresh(&fake, &a));
    assert_eq!(status, 200, "{body}");
    // A stopped fake refuses connections.
    let url = fake.token_url();
    drop(fake);
    let res = rt.block_on(client().post(url).send());
    assert!(res.is_err());
}

#[tokio::test]
async fn issue_grants_registers_many_chains_at_once() {
    let fake = FakeAtlassian::start();
    let grants: Vec<(String, Vec<FakeSite>)> = (0..3)
        .map(|i| {
            (
                format!("acc-bulk-{i}"),
                vec![FakeSite::confluence(&format!("bulk{i}"))],
            )
        })
        .collect();
    let tokens = fake.issue_grants(&grants);
    assert_eq!(tokens.len(), 3);
    for ((account, _), rt) in grants.iter().zip(&tokens) {
        assert_eq!(fake.current_refresh_token(account).as_deref(), Some(&**rt));
    }
    assert_eq!(fake.total_rotations(), 0);
    let (_, rt1) = refresh_ok(&fake, &tokens[1]).await;
    refresh_ok(&fake, &rt1).await;
    refresh_ok(&fake, &tokens[2]).await;
    assert_eq!(fake.total_rotations(), 3);
    assert_eq!(fake.rotations("acc-bulk-1"), 2);
    // Ordinals still count per kind and account.
    let detailed = fake.issued_secrets_detailed();
    let bulk1: Vec<usize> = detailed
        .iter()
        .filter(|s| {
            s.kind == SecretKind::RefreshToken && s.account.as_deref() == Some("acc-bulk-1")
        })
        .map(|s| s.ordinal)
        .collect();
    assert_eq!(bulk1, vec![1, 2, 3]);
}

#[tokio::test]
async fn issue_grants_with_access_hands_out_tokens_the_resource_endpoints_accept() {
    let fake = FakeAtlassian::start();
    let grants: Vec<(String, Vec<FakeSite>)> = (0..2)
        .map(|i| {
            (
                format!("acc-bulk-at-{i}"),
                vec![FakeSite::confluence(&format!("bulkat{i}"))],
            )
        })
        .collect();
    let pairs = fake.issue_grants_with_access(&grants);
    assert_eq!(pairs.len(), 2);
    for ((account, sites), (rt, at)) in grants.iter().zip(&pairs) {
        assert_eq!(fake.current_refresh_token(account).as_deref(), Some(&**rt));
        assert_eq!(fake.access_token_account(at).as_deref(), Some(&**account));
        let (status, body) = get_bearer(&fake, "/oauth/token/accessible-resources", Some(at)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body[0]["id"], sites[0].cloud_id.as_str(), "{body}");
    }
    assert_eq!(fake.total_rotations(), 0, "no refresh was needed");
    // The refresh token is still the family's first: it rotates as usual.
    refresh_ok(&fake, &pairs[0].0).await;
    assert_eq!(fake.rotations("acc-bulk-at-0"), 1);
}
