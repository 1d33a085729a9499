//! A strict, stateful fake of Atlassian's OAuth 2.0 (3LO) endpoints for the integration tests.
//!
//! [`FakeAtlassian::start`] binds a real HTTP/1.1 server on `127.0.0.1:0` and runs it on its
//! own thread with its own tokio runtime, so it serves no matter which runtime (if any) the
//! calling test uses. Its whole state sits behind one `Arc<Mutex<..>>` that the test reads
//! and steers directly through the methods of [`FakeAtlassian`].
//!
//! Routes (configure the daemon with `token_url = base/oauth/token`,
//! `authorize_url = base/authorize`, `api_url = base`):
//!
//! - `POST /oauth/token`: the token endpoint, strict like the real one (JSON body only,
//!   client credentials in the body, `refresh_token` and `authorization_code` grants).
//!   Rotating refresh tokens follow the Auth0 rules Atlassian documents: every exchange of
//!   the family's current token rotates it; the token it replaced (its *parent*) may be
//!   exchanged again within the leeway, which issues a fresh pair that becomes current;
//!   using any other non-current token of the family (or the parent after the leeway)
//!   revokes the whole family. A current token unused for longer than the inactivity
//!   expiry is refused without revoking the family.
//! - `GET /oauth/token/accessible-resources` and `GET /me`: bearer-authenticated.
//! - `GET /authorize`: 200 with a small HTML page (nothing is consented there; tests mint
//!   codes with [`FakeAtlassian::issue_code`]).
//! - anything else: 404.
//!
//! Access tokens die with their family, when they expire, and `leeway` after their
//! companion refresh token was rotated (Atlassian's "grace period").
//!
//! Faults ([`Fault`]) are queued per [`Endpoint`] and each is consumed, in FIFO order, by the
//! next request to that endpoint, whatever that request contains.
//!
//! The fake has its own clock: real time plus an offset that [`FakeAtlassian::advance`]
//! moves forward, so inactivity expiry, the leeway, access-token lifetimes and code lifetimes
//! can be crossed without waiting. [`LoggedRequest::at`] is always real time.
//!
//! The fake never panics on bad input: it is fed by the daemon under test.
//!
//! Files: `rules` (the token-chain state machine, pure: rotation, leeway, revocation,
//! inactivity, codes) and `http` (the HTTP shell: routes, strictness of requests, faults,
//! the shapes of answers); this file holds the public types and the steering API.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::Router;
use serde_json::{Value, json};

mod http;
mod rules;

use rules::Chains;

/// The OAuth client id the fake accepts.
pub const CLIENT_ID: &str = "tokend-it-client-0001";
/// The OAuth client secret the fake accepts (long and unique so a leak check can find it).
pub const CLIENT_SECRET: &str = "cs-tokend-it-8f3Kq2LmZx7Rv9WbTy4Hn6Pd";

/// Default leeway (reuse interval) of a rotated refresh token.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(10 * 60);
/// Default inactivity expiry of a refresh token.
pub const DEFAULT_INACTIVITY_EXPIRY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Default access-token lifetime (`expires_in`).
pub const DEFAULT_ACCESS_LIFETIME: Duration = Duration::from_secs(3600);
/// Lifetime of an authorization code.
pub const CODE_LIFETIME: Duration = Duration::from_secs(10 * 60);

/// One site (container) of a grant, as listed by accessible-resources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeSite {
    /// The cloud id (`id` in accessible-resources). Not unique across containers: the
    /// Jira and the Confluence container of one site share it.
    pub cloud_id: String,
    /// `https://NAME.atlassian.net`.
    pub url: String,
    pub name: String,
    pub scopes: Vec<String>,
}

impl FakeSite {
    pub fn new(cloud_id: &str, url: &str, name: &str, scopes: &[&str]) -> FakeSite {
        FakeSite {
            cloud_id: cloud_id.to_string(),
            url: url.to_string(),
            name: name.to_string(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The Confluence container of site `name` (`https://name.atlassian.net`), with a cloud id
    /// derived from the name only (see [`FakeSite::cloud_id_for`]).
    pub fn confluence(name: &str) -> FakeSite {
        FakeSite::new(
            &Self::cloud_id_for(name),
            &format!("https://{name}.atlassian.net"),
            name,
            &["read:page:confluence", "read:space:confluence"],
        )
    }

    /// The Jira container of site `name`; same cloud id as [`FakeSite::confluence`] of the
    /// same name, as on the real service.
    pub fn jira(name: &str) -> FakeSite {
        FakeSite::new(
            &Self::cloud_id_for(name),
            &format!("https://{name}.atlassian.net"),
            name,
            &["read:jira-work", "read:jira-user"],
        )
    }

    /// The host of the site URL (`name.atlassian.net`).
    pub fn host(&self) -> &str {
        self.url
            .strip_prefix("https://")
            .or_else(|| self.url.strip_prefix("http://"))
            .unwrap_or(&self.url)
            .trim_end_matches('/')
    }

    /// A stable UUID-shaped cloud id for a site name.
    pub fn cloud_id_for(name: &str) -> String {
        let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
        for b in name.bytes() {
            h ^= u128::from(b);
            h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
        }
        let s = format!("{h:032x}");
        format!(
            "{}-{}-{}-{}-{}",
            &s[0..8],
            &s[8..12],
            &s[12..16],
            &s[16..20],
            &s[20..32]
        )
    }

    fn to_json(&self) -> Value {
        json!({
            "id": self.cloud_id,
            "url": self.url,
            "name": self.name,
            "scopes": self.scopes,
            "avatarUrl": "https://site-admin-avatar-cdn.prod.public.atl-paas.net/avatars/240/flag.png",
        })
    }
}

/// Which endpoint a [`Fault`] is queued for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /oauth/token`
    Token,
    /// `GET /oauth/token/accessible-resources`
    Resources,
    /// `GET /me`
    Me,
}

/// A misbehaviour injected into one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status with a JSON error body, without processing the request.
    Status(u16),
    /// Answer this status with an HTML body (a gateway error page), without processing.
    Html(u16),
    /// 429 with `Retry-After`, without processing.
    RateLimited { retry_after_secs: u64 },
    /// 503 with `Retry-After`, without processing.
    Unavailable { retry_after_secs: u64 },
    /// Process normally (a refresh rotates!), then answer the same status with the body
    /// truncated in the middle.
    MalformedJson,
    /// Token endpoint only: a successful refresh answers a new access token but no
    /// `refresh_token`; the presented token stays current and is NOT rotated.
    OmitRefreshToken,
    /// Token endpoint only: a successful answer has no `expires_in` (the access token still
    /// expires after the configured lifetime).
    OmitExpiresIn,
    /// Token endpoint only: process normally (a refresh rotates, a code is exchanged), then
    /// answer 200 with only `{"refresh_token": NEW}`: no `access_token`, `expires_in`,
    /// `scope` or `token_type`. The new refresh token is current; the access token minted
    /// with it is never handed out. (A malformed 2xx that still carries the new chain.)
    RefreshTokenOnly,
    /// Process normally (a rotation is committed when the request arrives), then hold the
    /// response this long.
    Delay(Duration),
    /// Process normally (a refresh rotates), then break the connection instead of
    /// answering (the body stream fails, so the client sees a truncated/reset response).
    Disconnect,
}

/// The error body answered for tokens of a revoked family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorShape {
    /// 403 `{"error":"invalid_grant","error_description":"Unknown or invalid refresh token."}`
    InvalidGrant,
    /// 403 `{"error":"unauthorized_client","error_description":"refresh_token is invalid"}`
    UnauthorizedClient,
}

/// What the fake made of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A refresh of the current token: rotated (or, with [`Fault::OmitRefreshToken`],
    /// answered without rotating).
    Refreshed,
    /// The parent of the current token, reused within the leeway: a fresh pair was issued.
    LeewayReuse,
    /// An authorization code was exchanged.
    CodeExchanged,
    /// A refresh token the fake never issued.
    UnknownToken,
    /// A refresh token of a family that a later consent replaced.
    Superseded,
    /// A token of a revoked family.
    FamilyRevoked,
    /// Reuse of a rotated token outside the leeway or of an older one: family revoked now.
    ReuseViolation,
    /// The current token outlived the inactivity expiry.
    Expired,
    /// Unknown, used, expired or mismatched authorization code.
    BadCode,
    /// Wrong or missing client credentials.
    BadClient,
    /// Not JSON, malformed JSON, missing or mistyped parameters.
    BadRequest,
    /// A `grant_type` the fake does not support.
    UnsupportedGrant,
    /// A fault answered before processing (Status, Html, RateLimited, Unavailable).
    Injected(Fault),
    /// accessible-resources or /me answered 200.
    Served,
    /// Missing, unknown, expired or revoked bearer token.
    Unauthorized,
    /// /me for a hidden account (403).
    Hidden,
    /// The authorize page.
    AuthorizePage,
    /// No such route.
    NotFound,
}

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct LoggedRequest {
    /// Real (not fake-clock) arrival time.
    pub at: Instant,
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// `grant_type` of a token request whose body parsed as JSON.
    pub grant_type: Option<String>,
    /// The account the request concerned, when known.
    pub account: Option<String>,
    /// Status answered (for [`Fault::Disconnect`], the status that was not delivered).
    pub status: u16,
    pub outcome: Outcome,
    /// The fault consumed by this request, if any.
    pub fault: Option<Fault>,
}

/// What kind of secret the fake handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SecretKind {
    ClientSecret,
    RefreshToken,
    AccessToken,
    AuthorizationCode,
}

/// One secret the fake handed out (or accepts, for the client secret).
#[derive(Clone, Debug)]
pub struct IssuedSecret {
    pub kind: SecretKind,
    /// The account it belongs to (None for the client secret).
    pub account: Option<String>,
    /// 1-based order among the secrets of that kind and account.
    pub ordinal: usize,
    pub value: String,
}

impl IssuedSecret {
    /// A description that does not reveal the value.
    pub fn describe(&self) -> String {
        match &self.account {
            Some(a) => format!("{:?} #{} of account {a}", self.kind, self.ordinal),
            None => format!("{:?}", self.kind),
        }
    }
}

/// The whole state of the fake: the rules' chains and what the HTTP shell adds (faults,
/// the answers' shapes and delays, the request log).
#[derive(Debug)]
struct Inner {
    /// Tokens, codes, families and the clock.
    rules: Chains,
    /// Added to every token response's delay.
    token_delay: Duration,
    /// The error body for tokens of a revoked family.
    error_shape: ErrorShape,
    faults: HashMap<Endpoint, VecDeque<Fault>>,
    /// A fault answered to every request of an endpoint until cleared (an outage).
    outages: HashMap<Endpoint, Fault>,
    log: Vec<LoggedRequest>,
}

impl Inner {
    fn new() -> Inner {
        Inner {
            rules: Chains::new(),
            token_delay: Duration::ZERO,
            error_shape: ErrorShape::InvalidGrant,
            faults: HashMap::new(),
            outages: HashMap::new(),
            log: Vec::new(),
        }
    }

    fn pop_fault(&mut self, endpoint: Endpoint) -> Option<Fault> {
        self.faults
            .get_mut(&endpoint)
            .and_then(|q| q.pop_front())
            .or_else(|| self.outages.get(&endpoint).cloned())
    }
}

type Shared = Arc<Mutex<Inner>>;

fn lock(state: &Shared) -> MutexGuard<'_, Inner> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// The fake server. Dropping it stops the server.
pub struct FakeAtlassian {
    state: Shared,
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeAtlassian {
    /// Binds `127.0.0.1:0` and serves on a dedicated thread.
    pub fn start() -> FakeAtlassian {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("fake: bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("fake: set_nonblocking");
        let addr = listener.local_addr().expect("fake: local_addr");
        let state: Shared = Arc::new(Mutex::new(Inner::new()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = Router::new()
            .fallback(http::handle)
            .with_state(state.clone());
        let thread = std::thread::Builder::new()
            .name("fake-atlassian".to_string())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("fake: tokio runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("fake: tokio listener");
                    tokio::select! {
                        r = axum::serve(listener, app) => {
                            if let Err(e) = r {
                                eprintln!("fake atlassian: server error: {e}");
                            }
                        }
                        _ = rx => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .expect("fake: spawn thread");
        FakeAtlassian {
            state,
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.state)
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `base/oauth/token`.
    pub fn token_url(&self) -> String {
        format!("{}/oauth/token", self.base_url())
    }

    /// `base/authorize`.
    pub fn authorize_url(&self) -> String {
        format!("{}/authorize", self.base_url())
    }

    // ----- grants -----

    /// Creates the token family of `account_id` (or replaces it, like a new consent: the
    /// old family's tokens are then refused as superseded) and returns its first refresh
    /// token.
    pub fn issue_grant(&self, account_id: &str, sites: &[FakeSite]) -> String {
        self.inner().rules.new_family(account_id, sites.to_vec())
    }

    /// [`FakeAtlassian::issue_grant`] for many accounts under one lock (a benchmark seeds
    /// thousands of chains); returns the first refresh tokens in the order given.
    pub fn issue_grants(&self, grants: &[(String, Vec<FakeSite>)]) -> Vec<String> {
        let mut inner = self.inner();
        grants
            .iter()
            .map(|(account, sites)| inner.rules.new_family(account, sites.clone()))
            .collect()
    }

    /// [`FakeAtlassian::issue_grants`] with an access token for each family too, as the
    /// answer to its first grant would carry: a benchmark seeds connections whose cached
    /// tokens the resource endpoints accept without a refresh. Returns (refresh token,
    /// access token) pairs in the order given.
    pub fn issue_grants_with_access(
        &self,
        grants: &[(String, Vec<FakeSite>)],
    ) -> Vec<(String, String)> {
        let mut inner = self.inner();
        grants
            .iter()
            .map(|(account, sites)| {
                let rt = inner.rules.new_family(account, sites.clone());
                let epoch = inner.rules.families[account].epoch;
                let at = inner.rules.mint_access(account, epoch, &rt);
                (rt, at)
            })
            .collect()
    }

    /// Mints a single-use authorization code (valid [`CODE_LIFETIME`]) for `redirect_uri`.
    /// Exchanging it creates (or replaces) the family of `account_id` and returns its first
    /// pair.
    pub fn issue_code(&self, account_id: &str, sites: &[FakeSite], redirect_uri: &str) -> String {
        self.inner()
            .rules
            .issue_code(account_id, sites, redirect_uri)
    }

    /// Revokes the whole family (every refresh and access token of it), like a user
    /// revoking consent.
    pub fn revoke_family(&self, account_id: &str) {
        if let Some(f) = self.inner().rules.families.get_mut(account_id) {
            f.alive = false;
        }
    }

    // ----- steering -----

    /// Queues a fault for the next request to `endpoint`.
    pub fn inject(&self, endpoint: Endpoint, fault: Fault) {
        self.inner()
            .faults
            .entry(endpoint)
            .or_default()
            .push_back(fault);
    }

    /// Queues a fault for the next token request.
    pub fn inject_token(&self, fault: Fault) {
        self.inject(Endpoint::Token, fault);
    }

    /// Queues a fault for the next accessible-resources request.
    pub fn inject_resources(&self, fault: Fault) {
        self.inject(Endpoint::Resources, fault);
    }

    /// Queues a fault for the next /me request.
    pub fn inject_me(&self, fault: Fault) {
        self.inject(Endpoint::Me, fault);
    }

    /// Faults still queued for `endpoint`.
    pub fn pending_faults(&self, endpoint: Endpoint) -> usize {
        self.inner().faults.get(&endpoint).map_or(0, |q| q.len())
    }

    /// Drops every queued fault.
    /// Answers every request of `endpoint` with `fault` until called again with `None`
    /// (queued one-shot faults still come first).
    pub fn set_outage(&self, endpoint: Endpoint, fault: Option<Fault>) {
        let mut inner = self.inner();
        match fault {
            Some(f) => {
                inner.outages.insert(endpoint, f);
            }
            None => {
                inner.outages.remove(&endpoint);
            }
        }
    }

    pub fn clear_faults(&self) {
        self.inner().faults.clear();
    }

    /// Holds every token response this long (on top of any [`Fault::Delay`]).
    pub fn set_token_delay(&self, delay: Duration) {
        self.inner().token_delay = delay;
    }

    pub fn set_leeway(&self, leeway: Duration) {
        self.inner().rules.leeway = leeway;
    }

    pub fn set_inactivity_expiry(&self, expiry: Duration) {
        self.inner().rules.inactivity_expiry = expiry;
    }

    /// Lifetime of access tokens issued from now on; `None` = no `expires_in` in responses
    /// and tokens that never expire by time.
    pub fn set_access_lifetime(&self, lifetime: Option<Duration>) {
        self.inner().rules.access_lifetime = lifetime;
    }

    /// The error body for tokens of a revoked family.
    pub fn set_error_shape(&self, shape: ErrorShape) {
        self.inner().error_shape = shape;
    }

    /// Moves the fake's clock forward (affects leeway, inactivity, token and code lifetimes;
    /// not [`LoggedRequest::at`]).
    pub fn advance(&self, by: Duration) {
        self.inner().rules.skew += by;
    }

    /// Adds a site to the family's accessible resources.
    pub fn add_site(&self, account_id: &str, site: FakeSite) {
        if let Some(f) = self.inner().rules.families.get_mut(account_id) {
            f.sites.push(site);
        }
    }

    /// Removes every container with this cloud id from the family's accessible resources.
    pub fn remove_site(&self, account_id: &str, cloud_id: &str) {
        if let Some(f) = self.inner().rules.families.get_mut(account_id) {
            f.sites.retain(|s| s.cloud_id != cloud_id);
        }
    }

    /// Makes `/me` answer 403 for this account (the app lacks `read:me`).
    pub fn hide_account(&self, account_id: &str) {
        self.inner().rules.hidden.insert(account_id.to_string());
    }

    pub fn unhide_account(&self, account_id: &str) {
        self.inner().rules.hidden.remove(account_id);
    }

    // ----- observations -----

    /// Requests with `grant_type=refresh_token` (including failed and faulted ones).
    pub fn refresh_calls(&self) -> usize {
        self.inner()
            .log
            .iter()
            .filter(|r| {
                r.path == "/oauth/token" && r.grant_type.as_deref() == Some("refresh_token")
            })
            .count()
    }

    /// Every request to `/oauth/token`.
    pub fn token_calls(&self) -> usize {
        self.inner()
            .log
            .iter()
            .filter(|r| r.path == "/oauth/token")
            .count()
    }

    /// Refresh grants of this account that succeeded at the fake (whether or not the client
    /// got the answer).
    pub fn successful_refreshes(&self, account_id: &str) -> usize {
        self.inner()
            .rules
            .stats
            .get(account_id)
            .map_or(0, |s| s.successful_refreshes)
    }

    /// Refresh tokens of this account replaced by a new one through the refresh grant
    /// (rotations plus leeway reuses), across all its families.
    pub fn rotations(&self, account_id: &str) -> usize {
        self.inner()
            .rules
            .stats
            .get(account_id)
            .map_or(0, |s| s.rotations)
    }

    /// Refresh tokens replaced through the refresh grant, over every account (the sum of
    /// [`FakeAtlassian::rotations`]).
    pub fn total_rotations(&self) -> usize {
        self.inner().rules.stats.values().map(|s| s.rotations).sum()
    }

    pub fn leeway_reuses(&self) -> usize {
        self.inner().rules.leeway_reuses
    }

    pub fn reuse_violations(&self) -> usize {
        self.inner().rules.reuse_violations
    }

    /// Whether the account has a family that is not revoked.
    pub fn family_alive(&self, account_id: &str) -> bool {
        self.inner()
            .rules
            .families
            .get(account_id)
            .is_some_and(|f| f.alive)
    }

    /// The family's current refresh token (None if no family or revoked).
    pub fn current_refresh_token(&self, account_id: &str) -> Option<String> {
        self.inner()
            .rules
            .families
            .get(account_id)
            .filter(|f| f.alive)
            .map(|f| f.current.clone())
    }

    /// The account whose valid access token this is (None if unknown, expired or revoked).
    pub fn access_token_account(&self, access_token: &str) -> Option<String> {
        self.inner().rules.check_access(access_token)
    }

    /// Every request seen so far.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.inner().log.clone()
    }

    /// Every request to `/oauth/token` seen so far.
    pub fn token_requests(&self) -> Vec<LoggedRequest> {
        self.inner()
            .log
            .iter()
            .filter(|r| r.path == "/oauth/token")
            .cloned()
            .collect()
    }

    /// Every access token, refresh token and code handed out, and the client secret.
    pub fn issued_secrets(&self) -> Vec<String> {
        self.inner()
            .rules
            .secrets
            .iter()
            .map(|s| s.value.clone())
            .collect()
    }

    /// Like [`FakeAtlassian::issued_secrets`], with what each one is.
    pub fn issued_secrets_detailed(&self) -> Vec<IssuedSecret> {
        self.inner().rules.secrets.clone()
    }
}

impl Drop for FakeAtlassian {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
