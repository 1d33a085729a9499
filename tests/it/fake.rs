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

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use rand::Rng;
use serde_json::{Value, json};

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

const MAX_BODY: usize = 1024 * 1024;

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

#[derive(Debug)]
struct RefreshEntry {
    account: String,
    epoch: u64,
    /// The token this one was issued in exchange for.
    parent: Option<String>,
    issued_at: Instant,
    /// When this token stopped being current (rotated or superseded by a leeway reuse).
    rotated_at: Option<Instant>,
}

#[derive(Debug)]
struct AccessEntry {
    account: String,
    epoch: u64,
    companion: String,
    expires_at: Option<Instant>,
}

#[derive(Debug)]
struct CodeEntry {
    account: String,
    sites: Vec<FakeSite>,
    redirect_uri: String,
    issued_at: Instant,
    used: bool,
}

#[derive(Debug)]
struct Family {
    epoch: u64,
    alive: bool,
    current: String,
    sites: Vec<FakeSite>,
}

#[derive(Debug, Default, Clone, Copy)]
struct AccountStats {
    successful_refreshes: usize,
    rotations: usize,
}

#[derive(Debug)]
struct Inner {
    skew: Duration,
    leeway: Duration,
    inactivity_expiry: Duration,
    access_lifetime: Option<Duration>,
    token_delay: Duration,
    error_shape: ErrorShape,
    next_epoch: u64,
    families: HashMap<String, Family>,
    refresh_tokens: HashMap<String, RefreshEntry>,
    access_tokens: HashMap<String, AccessEntry>,
    codes: HashMap<String, CodeEntry>,
    faults: HashMap<Endpoint, VecDeque<Fault>>,
    /// A fault answered to every request of an endpoint until cleared (an outage).
    outages: HashMap<Endpoint, Fault>,
    hidden: HashSet<String>,
    stats: HashMap<String, AccountStats>,
    leeway_reuses: usize,
    reuse_violations: usize,
    log: Vec<LoggedRequest>,
    secrets: Vec<IssuedSecret>,
}

impl Inner {
    fn new() -> Inner {
        Inner {
            skew: Duration::ZERO,
            leeway: DEFAULT_LEEWAY,
            inactivity_expiry: DEFAULT_INACTIVITY_EXPIRY,
            access_lifetime: Some(DEFAULT_ACCESS_LIFETIME),
            token_delay: Duration::ZERO,
            error_shape: ErrorShape::InvalidGrant,
            next_epoch: 1,
            families: HashMap::new(),
            refresh_tokens: HashMap::new(),
            access_tokens: HashMap::new(),
            codes: HashMap::new(),
            faults: HashMap::new(),
            outages: HashMap::new(),
            hidden: HashSet::new(),
            stats: HashMap::new(),
            leeway_reuses: 0,
            reuse_violations: 0,
            log: Vec::new(),
            secrets: vec![IssuedSecret {
                kind: SecretKind::ClientSecret,
                account: None,
                ordinal: 1,
                value: CLIENT_SECRET.to_string(),
            }],
        }
    }

    fn now(&self) -> Instant {
        Instant::now() + self.skew
    }

    fn remember(&mut self, kind: SecretKind, account: &str, value: &str) {
        let ordinal = 1 + self
            .secrets
            .iter()
            .filter(|s| s.kind == kind && s.account.as_deref() == Some(account))
            .count();
        self.secrets.push(IssuedSecret {
            kind,
            account: Some(account.to_string()),
            ordinal,
            value: value.to_string(),
        });
    }

    fn mint_refresh(&mut self, account: &str, epoch: u64, parent: Option<String>) -> String {
        let rt = random_token("rt-");
        let issued_at = self.now();
        self.refresh_tokens.insert(
            rt.clone(),
            RefreshEntry {
                account: account.to_string(),
                epoch,
                parent,
                issued_at,
                rotated_at: None,
            },
        );
        self.remember(SecretKind::RefreshToken, account, &rt);
        rt
    }

    fn mint_access(&mut self, account: &str, epoch: u64, companion: &str) -> String {
        let at = random_token("at-");
        let expires_at = self.access_lifetime.map(|d| self.now() + d);
        self.access_tokens.insert(
            at.clone(),
            AccessEntry {
                account: account.to_string(),
                epoch,
                companion: companion.to_string(),
                expires_at,
            },
        );
        self.remember(SecretKind::AccessToken, account, &at);
        at
    }

    /// Replace (or create) the family of `account` with a new one whose first refresh token
    /// is returned.
    fn new_family(&mut self, account: &str, sites: Vec<FakeSite>) -> String {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let rt = self.mint_refresh(account, epoch, None);
        self.families.insert(
            account.to_string(),
            Family {
                epoch,
                alive: true,
                current: rt.clone(),
                sites,
            },
        );
        rt
    }

    fn scope_of(&self, account: &str) -> String {
        let mut scopes: Vec<String> = vec!["offline_access".to_string()];
        if !self.hidden.contains(account) {
            scopes.push("read:me".to_string());
        }
        if let Some(f) = self.families.get(account) {
            for site in &f.sites {
                for s in &site.scopes {
                    if !scopes.contains(s) {
                        scopes.push(s.clone());
                    }
                }
            }
        }
        scopes.join(" ")
    }

    /// The account of a valid access token.
    fn check_access(&self, token: &str) -> Option<String> {
        let entry = self.access_tokens.get(token)?;
        let family = self.families.get(&entry.account)?;
        if !family.alive || family.epoch != entry.epoch {
            return None;
        }
        let now = self.now();
        if entry.expires_at.is_some_and(|e| now >= e) {
            return None;
        }
        let companion = self.refresh_tokens.get(&entry.companion)?;
        if companion.rotated_at.is_some_and(|r| now >= r + self.leeway) {
            return None;
        }
        Some(entry.account.clone())
    }

    fn pop_fault(&mut self, endpoint: Endpoint) -> Option<Fault> {
        self.faults
            .get_mut(&endpoint)
            .and_then(|q| q.pop_front())
            .or_else(|| self.outages.get(&endpoint).cloned())
    }
}

/// Shared state of the fake, for the handlers.
type Shared = Arc<Mutex<Inner>>;

fn lock(state: &Shared) -> MutexGuard<'_, Inner> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn random_token(prefix: &str) -> String {
    let rest: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    format!("{prefix}{rest}")
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
        let app = Router::new().fallback(handle).with_state(state.clone());
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
        self.inner().new_family(account_id, sites.to_vec())
    }

    /// Mints a single-use authorization code (valid [`CODE_LIFETIME`]) for `redirect_uri`.
    /// Exchanging it creates (or replaces) the family of `account_id` and returns its first
    /// pair.
    pub fn issue_code(&self, account_id: &str, sites: &[FakeSite], redirect_uri: &str) -> String {
        let mut g = self.inner();
        let code = random_token("code-");
        let issued_at = g.now();
        g.codes.insert(
            code.clone(),
            CodeEntry {
                account: account_id.to_string(),
                sites: sites.to_vec(),
                redirect_uri: redirect_uri.to_string(),
                issued_at,
                used: false,
            },
        );
        g.remember(SecretKind::AuthorizationCode, account_id, &code);
        code
    }

    /// Revokes the whole family (every refresh and access token of it), like a user
    /// revoking consent.
    pub fn revoke_family(&self, account_id: &str) {
        if let Some(f) = self.inner().families.get_mut(account_id) {
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
        self.inner().leeway = leeway;
    }

    pub fn set_inactivity_expiry(&self, expiry: Duration) {
        self.inner().inactivity_expiry = expiry;
    }

    /// Lifetime of access tokens issued from now on; `None` = no `expires_in` in responses
    /// and tokens that never expire by time.
    pub fn set_access_lifetime(&self, lifetime: Option<Duration>) {
        self.inner().access_lifetime = lifetime;
    }

    /// The error body for tokens of a revoked family.
    pub fn set_error_shape(&self, shape: ErrorShape) {
        self.inner().error_shape = shape;
    }

    /// Moves the fake's clock forward (affects leeway, inactivity, token and code lifetimes;
    /// not [`LoggedRequest::at`]).
    pub fn advance(&self, by: Duration) {
        self.inner().skew += by;
    }

    /// Adds a site to the family's accessible resources.
    pub fn add_site(&self, account_id: &str, site: FakeSite) {
        if let Some(f) = self.inner().families.get_mut(account_id) {
            f.sites.push(site);
        }
    }

    /// Removes every container with this cloud id from the family's accessible resources.
    pub fn remove_site(&self, account_id: &str, cloud_id: &str) {
        if let Some(f) = self.inner().families.get_mut(account_id) {
            f.sites.retain(|s| s.cloud_id != cloud_id);
        }
    }

    /// Makes `/me` answer 403 for this account (the app lacks `read:me`).
    pub fn hide_account(&self, account_id: &str) {
        self.inner().hidden.insert(account_id.to_string());
    }

    pub fn unhide_account(&self, account_id: &str) {
        self.inner().hidden.remove(account_id);
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
            .stats
            .get(account_id)
            .map_or(0, |s| s.successful_refreshes)
    }

    /// Refresh tokens of this account replaced by a new one through the refresh grant
    /// (rotations plus leeway reuses), across all its families.
    pub fn rotations(&self, account_id: &str) -> usize {
        self.inner()
            .stats
            .get(account_id)
            .map_or(0, |s| s.rotations)
    }

    pub fn leeway_reuses(&self) -> usize {
        self.inner().leeway_reuses
    }

    pub fn reuse_violations(&self) -> usize {
        self.inner().reuse_violations
    }

    /// Whether the account has a family that is not revoked.
    pub fn family_alive(&self, account_id: &str) -> bool {
        self.inner()
            .families
            .get(account_id)
            .is_some_and(|f| f.alive)
    }

    /// The family's current refresh token (None if no family or revoked).
    pub fn current_refresh_token(&self, account_id: &str) -> Option<String> {
        self.inner()
            .families
            .get(account_id)
            .filter(|f| f.alive)
            .map(|f| f.current.clone())
    }

    /// The account whose valid access token this is (None if unknown, expired or revoked).
    pub fn access_token_account(&self, access_token: &str) -> Option<String> {
        self.inner().check_access(access_token)
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
            .secrets
            .iter()
            .map(|s| s.value.clone())
            .collect()
    }

    /// Like [`FakeAtlassian::issued_secrets`], with what each one is.
    pub fn issued_secrets_detailed(&self) -> Vec<IssuedSecret> {
        self.inner().secrets.clone()
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

// ----------------------------------------------------------------------------------------
// HTTP handling
// ----------------------------------------------------------------------------------------

/// A response computed under the lock, sent after it is released.
struct Planned {
    status: u16,
    headers: Vec<(&'static str, String)>,
    content_type: &'static str,
    body: Vec<u8>,
    delay: Duration,
    disconnect: bool,
}

impl Planned {
    fn json(status: u16, body: Value) -> Planned {
        Planned {
            status,
            headers: Vec::new(),
            content_type: "application/json",
            body: body.to_string().into_bytes(),
            delay: Duration::ZERO,
            disconnect: false,
        }
    }

    fn oauth_error(status: u16, error: &str, description: &str) -> Planned {
        Planned::json(
            status,
            json!({"error": error, "error_description": description}),
        )
    }

    fn html(status: u16, body: &str) -> Planned {
        Planned {
            content_type: "text/html; charset=utf-8",
            body: body.as_bytes().to_vec(),
            ..Planned::json(status, Value::Null)
        }
    }

    /// Applies a before-processing fault, if `fault` is one.
    fn pre_fault(fault: &Fault) -> Option<Planned> {
        match fault {
            Fault::Status(s) => Some(Planned::json(
                *s,
                json!({"error": "server_error", "error_description": format!("injected status {s}")}),
            )),
            Fault::Html(s) => Some(Planned::html(
                *s,
                &format!(
                    "<html><head><title>{s}</title></head><body><h1>{s} Bad Gateway</h1></body></html>"
                ),
            )),
            Fault::RateLimited { retry_after_secs } => {
                let mut p = Planned::json(
                    429,
                    json!({"error": "too_many_requests", "error_description": "Rate limit exceeded"}),
                );
                p.headers
                    .push(("retry-after", retry_after_secs.to_string()));
                Some(p)
            }
            Fault::Unavailable { retry_after_secs } => {
                let mut p = Planned::json(
                    503,
                    json!({"error": "temporarily_unavailable", "error_description": "Service Unavailable"}),
                );
                p.headers
                    .push(("retry-after", retry_after_secs.to_string()));
                Some(p)
            }
            _ => None,
        }
    }

    /// Applies an after-processing fault.
    fn post_fault(&mut self, fault: &Fault) {
        match fault {
            Fault::MalformedJson => {
                let cut = (self.body.len() / 2).max(1).min(self.body.len());
                self.body.truncate(cut);
            }
            Fault::Delay(d) => self.delay += *d,
            Fault::Disconnect => self.disconnect = true,
            _ => {}
        }
    }

    fn into_response(self) -> Response {
        let body = if self.disconnect {
            let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(Bytes::from(self.body[..self.body.len() / 2].to_vec())),
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "fake: injected disconnect",
                )),
            ];
            Body::from_stream(futures_util::stream::iter(chunks))
        } else {
            Body::from(self.body)
        };
        let mut resp = Response::new(body);
        *resp.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(name, v);
            }
        }
        resp
    }
}

async fn handle(State(state): State<Shared>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY).await;
    let path = parts.uri.path().to_string();
    let arrived = Instant::now();
    let planned = {
        let mut g = lock(&state);
        let mut entry = LoggedRequest {
            at: arrived,
            method: parts.method.to_string(),
            path: path.clone(),
            grant_type: None,
            account: None,
            status: 0,
            outcome: Outcome::NotFound,
            fault: None,
        };
        let planned = match (&parts.method, path.as_str()) {
            (&Method::POST, "/oauth/token") => {
                token_endpoint(&mut g, &parts.headers, body.ok(), &mut entry)
            }
            (&Method::GET, "/oauth/token/accessible-resources") => {
                bearer_endpoint(&mut g, &parts.headers, Endpoint::Resources, &mut entry)
            }
            (&Method::GET, "/me") => {
                bearer_endpoint(&mut g, &parts.headers, Endpoint::Me, &mut entry)
            }
            (&Method::GET, "/authorize") => {
                entry.outcome = Outcome::AuthorizePage;
                Planned::html(
                    200,
                    "<html><body>fake consent page: tests mint codes directly</body></html>",
                )
            }
            _ => Planned::json(404, json!({"error": "not_found"})),
        };
        entry.status = planned.status;
        g.log.push(entry);
        planned
    };
    if !planned.delay.is_zero() {
        tokio::time::sleep(planned.delay).await;
    }
    planned.into_response()
}

fn is_json_content_type(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

fn invalid_grant() -> Planned {
    Planned::oauth_error(403, "invalid_grant", "Unknown or invalid refresh token.")
}

fn token_endpoint(
    g: &mut Inner,
    headers: &axum::http::HeaderMap,
    body: Option<Bytes>,
    entry: &mut LoggedRequest,
) -> Planned {
    let parsed: Option<serde_json::Map<String, Value>> = body
        .as_ref()
        .and_then(|b| serde_json::from_slice::<Value>(b).ok())
        .and_then(|v| match v {
            Value::Object(m) => Some(m),
            _ => None,
        });
    entry.grant_type = parsed
        .as_ref()
        .and_then(|m| m.get("grant_type"))
        .and_then(|v| v.as_str())
        .map(str::to_string);

    let fault = g.pop_fault(Endpoint::Token);
    entry.fault = fault.clone();
    if let Some(f) = &fault
        && let Some(p) = Planned::pre_fault(f)
    {
        entry.outcome = Outcome::Injected(f.clone());
        return p;
    }
    let token_delay = g.token_delay;
    let mut planned = token_logic(g, headers, parsed.as_ref(), fault.as_ref(), entry);
    planned.delay += token_delay;
    if let Some(f) = &fault {
        planned.post_fault(f);
    }
    planned
}

fn token_logic(
    g: &mut Inner,
    headers: &axum::http::HeaderMap,
    body: Option<&serde_json::Map<String, Value>>,
    fault: Option<&Fault>,
    entry: &mut LoggedRequest,
) -> Planned {
    if !is_json_content_type(headers) {
        entry.outcome = Outcome::BadRequest;
        return Planned::oauth_error(
            400,
            "invalid_request",
            "Content-Type must be application/json",
        );
    }
    let Some(body) = body else {
        entry.outcome = Outcome::BadRequest;
        return Planned::oauth_error(400, "invalid_request", "Invalid JSON body");
    };
    let s = |name: &str| body.get(name).and_then(|v| v.as_str());
    if s("client_id") != Some(CLIENT_ID) || s("client_secret") != Some(CLIENT_SECRET) {
        entry.outcome = Outcome::BadClient;
        return Planned::oauth_error(401, "access_denied", "Unauthorized");
    }
    match s("grant_type") {
        Some("refresh_token") => {
            let Some(rt) = s("refresh_token") else {
                entry.outcome = Outcome::BadRequest;
                return Planned::oauth_error(
                    400,
                    "invalid_request",
                    "Missing required parameter: refresh_token",
                );
            };
            refresh_grant(g, rt, fault, entry)
        }
        Some("authorization_code") => {
            let (Some(code), Some(redirect_uri)) = (s("code"), s("redirect_uri")) else {
                entry.outcome = Outcome::BadCode;
                return Planned::oauth_error(
                    400,
                    "invalid_request",
                    "authorization_code is invalid",
                );
            };
            code_grant(g, code, redirect_uri, fault, entry)
        }
        Some(_) => {
            entry.outcome = Outcome::UnsupportedGrant;
            Planned::oauth_error(400, "unsupported_grant_type", "Unsupported grant type")
        }
        None => {
            entry.outcome = Outcome::BadRequest;
            Planned::oauth_error(
                400,
                "invalid_request",
                "Missing required parameter: grant_type",
            )
        }
    }
}

fn token_success(
    g: &Inner,
    account: &str,
    access_token: &str,
    refresh_token: Option<&str>,
    fault: Option<&Fault>,
) -> Planned {
    let mut body = serde_json::Map::new();
    if fault == Some(&Fault::RefreshTokenOnly) {
        if let Some(rt) = refresh_token {
            body.insert("refresh_token".into(), json!(rt));
        }
        return Planned::json(200, Value::Object(body));
    }
    body.insert("access_token".into(), json!(access_token));
    if let Some(rt) = refresh_token {
        body.insert("refresh_token".into(), json!(rt));
    }
    if let Some(life) = g.access_lifetime
        && fault != Some(&Fault::OmitExpiresIn)
    {
        body.insert("expires_in".into(), json!(life.as_secs()));
    }
    body.insert("scope".into(), json!(g.scope_of(account)));
    body.insert("token_type".into(), json!("Bearer"));
    Planned::json(200, Value::Object(body))
}

fn refresh_grant(
    g: &mut Inner,
    rt: &str,
    fault: Option<&Fault>,
    entry: &mut LoggedRequest,
) -> Planned {
    let now = g.now();
    let Some(tok) = g.refresh_tokens.get(rt) else {
        entry.outcome = Outcome::UnknownToken;
        return invalid_grant();
    };
    let account = tok.account.clone();
    let epoch = tok.epoch;
    let issued_at = tok.issued_at;
    let rotated_at = tok.rotated_at;
    entry.account = Some(account.clone());
    let Some(family) = g.families.get(&account) else {
        entry.outcome = Outcome::UnknownToken;
        return invalid_grant();
    };
    if family.epoch != epoch {
        entry.outcome = Outcome::Superseded;
        return invalid_grant();
    }
    if !family.alive {
        entry.outcome = Outcome::FamilyRevoked;
        return match g.error_shape {
            ErrorShape::InvalidGrant => invalid_grant(),
            ErrorShape::UnauthorizedClient => {
                Planned::oauth_error(403, "unauthorized_client", "refresh_token is invalid")
            }
        };
    }
    let current = family.current.clone();
    if current == rt {
        if now.duration_since(issued_at) > g.inactivity_expiry {
            entry.outcome = Outcome::Expired;
            return invalid_grant();
        }
        g.stats
            .entry(account.clone())
            .or_default()
            .successful_refreshes += 1;
        entry.outcome = Outcome::Refreshed;
        if fault == Some(&Fault::OmitRefreshToken) {
            let at = g.mint_access(&account, epoch, rt);
            return token_success(g, &account, &at, None, fault);
        }
        // Rotate.
        if let Some(t) = g.refresh_tokens.get_mut(rt) {
            t.rotated_at = Some(now);
        }
        let new_rt = g.mint_refresh(&account, epoch, Some(rt.to_string()));
        let at = g.mint_access(&account, epoch, &new_rt);
        if let Some(f) = g.families.get_mut(&account) {
            f.current = new_rt.clone();
        }
        g.stats.entry(account.clone()).or_default().rotations += 1;
        return token_success(g, &account, &at, Some(&new_rt), fault);
    }
    let parent_of_current = g
        .refresh_tokens
        .get(&current)
        .and_then(|c| c.parent.clone());
    let within_leeway = rotated_at.is_some_and(|r| now < r + g.leeway);
    if parent_of_current.as_deref() == Some(rt) && within_leeway {
        g.leeway_reuses += 1;
        g.stats
            .entry(account.clone())
            .or_default()
            .successful_refreshes += 1;
        entry.outcome = Outcome::LeewayReuse;
        if fault == Some(&Fault::OmitRefreshToken) {
            // The fresh access token is tied to the token now current.
            let at = g.mint_access(&account, epoch, &current);
            return token_success(g, &account, &at, None, fault);
        }
        if let Some(c) = g.refresh_tokens.get_mut(&current) {
            c.rotated_at = Some(now);
        }
        let new_rt = g.mint_refresh(&account, epoch, Some(rt.to_string()));
        let at = g.mint_access(&account, epoch, &new_rt);
        if let Some(f) = g.families.get_mut(&account) {
            f.current = new_rt.clone();
        }
        g.stats.entry(account.clone()).or_default().rotations += 1;
        return token_success(g, &account, &at, Some(&new_rt), fault);
    }
    // Reuse outside the leeway, or of an older token: breach detection.
    if let Some(f) = g.families.get_mut(&account) {
        f.alive = false;
    }
    g.reuse_violations += 1;
    entry.outcome = Outcome::ReuseViolation;
    invalid_grant()
}

fn code_grant(
    g: &mut Inner,
    code: &str,
    redirect_uri: &str,
    fault: Option<&Fault>,
    entry: &mut LoggedRequest,
) -> Planned {
    let now = g.now();
    let bad = || Planned::oauth_error(400, "invalid_request", "authorization_code is invalid");
    let Some(c) = g.codes.get_mut(code) else {
        entry.outcome = Outcome::BadCode;
        return bad();
    };
    entry.account = Some(c.account.clone());
    if c.used || c.redirect_uri != redirect_uri || now.duration_since(c.issued_at) >= CODE_LIFETIME
    {
        entry.outcome = Outcome::BadCode;
        return bad();
    }
    c.used = true;
    let account = c.account.clone();
    let sites = c.sites.clone();
    let rt = g.new_family(&account, sites);
    let epoch = g.families.get(&account).map_or(0, |f| f.epoch);
    let at = g.mint_access(&account, epoch, &rt);
    entry.outcome = Outcome::CodeExchanged;
    token_success(g, &account, &at, Some(&rt), fault)
}

fn bearer_endpoint(
    g: &mut Inner,
    headers: &axum::http::HeaderMap,
    endpoint: Endpoint,
    entry: &mut LoggedRequest,
) -> Planned {
    let fault = g.pop_fault(endpoint);
    entry.fault = fault.clone();
    if let Some(f) = &fault
        && let Some(p) = Planned::pre_fault(f)
    {
        entry.outcome = Outcome::Injected(f.clone());
        return p;
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    let account = token.and_then(|t| g.check_access(t));
    let mut planned = match account {
        None => {
            entry.outcome = Outcome::Unauthorized;
            let mut p = Planned::json(401, json!({"code": 401, "message": "Unauthorized"}));
            p.headers.push((
                "www-authenticate",
                "Bearer realm=\"api.atlassian.com\"".into(),
            ));
            p
        }
        Some(account) => {
            entry.account = Some(account.clone());
            match endpoint {
                Endpoint::Me if g.hidden.contains(&account) => {
                    entry.outcome = Outcome::Hidden;
                    Planned::json(
                        403,
                        json!({"code": 403, "message": "The app is not authorized to access this resource (read:me)"}),
                    )
                }
                Endpoint::Me => {
                    entry.outcome = Outcome::Served;
                    Planned::json(
                        200,
                        json!({
                            "account_type": "atlassian",
                            "account_id": account,
                            "email": format!("{account}@example.test"),
                            "name": format!("Test User {account}"),
                            "picture": "https://avatar-management.example.test/default.png",
                            "account_status": "active",
                            "nickname": account,
                            "zoneinfo": "UTC",
                            "locale": "en-US",
                        }),
                    )
                }
                _ => {
                    entry.outcome = Outcome::Served;
                    let sites: Vec<Value> = g
                        .families
                        .get(&account)
                        .map(|f| f.sites.iter().map(FakeSite::to_json).collect())
                        .unwrap_or_default();
                    Planned::json(200, Value::Array(sites))
                }
            }
        }
    };
    if let Some(f) = &fault {
        planned.post_fault(f);
    }
    planned
}
