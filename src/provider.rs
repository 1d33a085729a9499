//! The Atlassian client: the only module that knows Atlassian's endpoints and answers.
//!
//! It speaks to three endpoints: the token endpoint (`refresh_token` and
//! `authorization_code` grants, JSON bodies with the client id and secret in the body, as
//! Atlassian documents), `oauth/token/accessible-resources` (which sites a token reaches) and
//! `/me` (which account it belongs to). Every answer is turned into a typed outcome; every
//! failure is classified once, here, as [`ProviderError::Rejected`] (the chain is dead) or
//! [`ProviderError::Transient`] (try again later), so that no other module has to guess.
//!
//! The `oauth2` crate builds the authorize URL and its `state`; the token requests are made
//! with reqwest directly because the classification needs the HTTP status and `Retry-After`,
//! which `oauth2`'s error type drops, and because `oauth2` sends form bodies while Atlassian
//! documents JSON. `oauth2`'s errors are never formatted: their `Debug` prints raw bodies,
//! tokens included.
//!
//! **Architecture Invariant:** nothing this module returns or logs contains a token or the
//! client secret; provider texts are cut short and scrubbed of the token that was sent.

use crate::config::AtlassianConfig;
use crate::model::{Site, Time};
use crate::secret::Secret;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// What tokend assumes an access token lives when the provider does not send `expires_in`.
/// Atlassian documents one hour; assuming exactly that would hand out tokens that expire
/// the moment the assumption is slightly off, so take a little less.
pub const ASSUMED_ACCESS_LIFETIME: Duration = Duration::from_secs(50 * 60);

/// Atlassian's reuse leeway: a rotated refresh token may be presented again for this long
/// (to recover from a lost answer) before the provider treats it as a breach and revokes the
/// whole chain.
pub const REUSE_LEEWAY: Duration = Duration::from_secs(10 * 60);

/// How much of [`REUSE_LEEWAY`] tokend leaves unused as a safety margin for clock skew and
/// request latency: it never presents an old token later than `LEEWAY - this`.
pub const LEEWAY_SAFETY_MARGIN: Duration = Duration::from_secs(90);

/// Longest provider text kept in an error message: enough to be useful, short enough that a
/// provider echoing a body back cannot flood the ledger and logs.
const MAX_DESCRIPTION: usize = 200;

/// The largest `Retry-After` honoured. A provider asking for more is capped so that a bogus
/// header cannot park a chain past its inactivity expiry.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(6 * 3600);

/// How long a caller waits before trying again when another call is already probing an
/// endpoint whose `Retry-After` pause just ended: the probe's answer decides for everyone.
const PROBE_WAIT: Duration = Duration::from_secs(1);

/// A provider endpoint. Back-pressure (`Retry-After` on 429/503) applies per endpoint: one
/// such answer pauses every call to that endpoint, for every connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /oauth/token`.
    Token,
    /// `GET /oauth/token/accessible-resources`.
    Resources,
    /// `GET /me`.
    Me,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Token => "the token endpoint",
            Endpoint::Resources => "accessible-resources",
            Endpoint::Me => "/me",
        }
    }
}

/// Back-pressure state of one endpoint.
#[derive(Default)]
struct Gate {
    /// No call before this instant (the provider's `Retry-After`).
    paused_until: Option<Instant>,
    /// After a pause ends, one call probes; the others wait for its answer.
    probing: bool,
}

/// Admission to call an endpoint; a probe reopens the endpoint or pauses it again. Dropping
/// it (even by cancellation) releases the probe.
struct Admission {
    gates: Arc<Mutex<HashMap<Endpoint, Gate>>>,
    endpoint: Endpoint,
    probe: bool,
    settled: bool,
}

impl Admission {
    /// Records the answer: a 429/503 with `Retry-After` pauses the endpoint.
    fn settle(mut self, status: Option<StatusCode>, retry_after: Option<Duration>) {
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        let gate = gates.entry(self.endpoint).or_default();
        let pausing = matches!(
            status,
            Some(StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE)
        ) && retry_after.is_some();
        if let (true, Some(r)) = (pausing, retry_after) {
            let until = Instant::now() + r;
            if gate.paused_until.is_none_or(|p| p < until) {
                gate.paused_until = Some(until);
            }
            tracing::warn!(
                endpoint = self.endpoint.name(),
                retry_after_secs = r.as_secs(),
                "the provider asked to wait; pausing every call to this endpoint"
            );
        } else if self.probe {
            gate.paused_until = None;
        }
        if self.probe {
            gate.probing = false;
        }
        self.settled = true;
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.probe && !self.settled {
            let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
            gates.entry(self.endpoint).or_default().probing = false;
        }
    }
}

/// Tokens obtained from the token endpoint.
#[derive(Debug)]
pub struct Grant {
    /// The new access token.
    pub access_token: Secret,
    /// The new refresh token; `None` when the provider did not send one (keep the old one).
    pub refresh_token: Option<Secret>,
    /// The access token's lifetime, when the provider said.
    pub expires_in: Option<Duration>,
    /// Granted scopes, when the provider listed them.
    pub scopes: Option<Vec<String>>,
}

/// Why a transient failure happened: decides whether the request may have been processed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransientKind {
    /// The connection could not be made: the request never left.
    Connect,
    /// No answer within `refresh.request_timeout` (or the connection broke mid-way): the
    /// provider may have rotated the token.
    Timeout,
    /// 429: the provider asks us to slow down; the request was not processed.
    RateLimited,
    /// 5xx or 408: the provider failed; it may or may not have rotated the token.
    ServerError,
    /// A 2xx whose body could not be understood: the provider did rotate the token.
    Malformed,
    /// A 4xx that is not a definite rejection of the chain (e.g. `invalid_client`: a
    /// configuration problem, not the chain's fault).
    Refused,
}

/// A failed provider call.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider definitely refused the chain (`invalid_grant`, `unauthorized_client`
    /// with 400/401/403): a person has to consent again.
    #[error("{code}: {description}")]
    Rejected {
        /// The OAuth error code.
        code: String,
        /// The provider's description, scrubbed and shortened.
        description: String,
    },
    /// Anything else: try again later.
    #[error("{message}")]
    Transient {
        /// What kind of failure.
        kind: TransientKind,
        /// The provider's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
        /// A sentence for a human, without secrets.
        message: String,
    },
    /// A 2xx answer that is not a usable token response but carries a new refresh token:
    /// the provider rotated the chain, so the old token is spent and this one must be kept.
    #[error("{message}")]
    Partial {
        /// The new refresh token.
        refresh_token: Secret,
        /// What was wrong with the answer, without secrets.
        message: String,
    },
    /// tokend lacks what it needs to talk to the provider (client id or secret).
    #[error("{0}")]
    NotConfigured(String),
}

impl ProviderError {
    /// Whether the request may have reached the provider and rotated the refresh token, so
    /// that the outcome is unknown and the same token must be retried inside the leeway.
    pub fn maybe_processed(&self) -> bool {
        match self {
            ProviderError::Transient { kind, .. } => matches!(
                kind,
                TransientKind::Timeout | TransientKind::ServerError | TransientKind::Malformed
            ),
            _ => false,
        }
    }

    /// A stable code for `last_error` and metrics.
    pub fn code(&self) -> String {
        match self {
            ProviderError::Rejected { code, .. } => code.clone(),
            ProviderError::Transient { kind, .. } => match kind {
                TransientKind::Connect => "connect_error",
                TransientKind::Timeout => "timeout",
                TransientKind::RateLimited => "rate_limited",
                TransientKind::ServerError => "server_error",
                TransientKind::Malformed => "malformed_response",
                TransientKind::Refused => "refused",
            }
            .to_owned(),
            ProviderError::Partial { .. } => "malformed_response".to_owned(),
            ProviderError::NotConfigured(_) => "not_configured".to_owned(),
        }
    }

    /// The provider's `Retry-After`, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The account behind a token, from `/me`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The Atlassian account id.
    pub account_id: String,
}

/// A client for one Atlassian OAuth app.
#[derive(Clone)]
pub struct Atlassian {
    http: reqwest::Client,
    config: AtlassianConfig,
    gates: Arc<Mutex<HashMap<Endpoint, Gate>>>,
}

#[derive(Deserialize)]
struct TokenBody {
    access_token: Option<String>,
    refresh_token: Option<String>,
    expires_in: Option<serde_json::Value>,
    scope: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: Option<String>,
    error_description: Option<String>,
}

#[derive(Deserialize)]
struct ResourceBody {
    id: String,
    #[serde(default)]
    url: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    scopes: Vec<String>,
}

#[derive(Deserialize)]
struct MeBody {
    account_id: Option<String>,
}

impl Atlassian {
    /// Builds a client. `request_timeout` bounds every call, connect included; redirects are
    /// never followed (a redirected token request is a misconfiguration or an attack).
    pub fn new(config: AtlassianConfig, request_timeout: Duration) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(request_timeout)
            .connect_timeout(request_timeout)
            .user_agent(concat!("tokend/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Atlassian {
            http,
            config,
            gates: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// The app's client id (part of a chain's identity).
    pub fn client_id(&self) -> &str {
        &self.config.client_id
    }

    /// The configuration this client was built from.
    pub fn config(&self) -> &AtlassianConfig {
        &self.config
    }

    /// Lets a call through unless the endpoint is paused by a `Retry-After`.
    fn admit(&self, endpoint: Endpoint) -> Result<Admission, ProviderError> {
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        let gate = gates.entry(endpoint).or_default();
        let mut probe = false;
        if let Some(until) = gate.paused_until {
            let now = Instant::now();
            if now < until {
                return Err(ProviderError::Transient {
                    kind: TransientKind::RateLimited,
                    retry_after: Some(until - now),
                    message: format!(
                        "{} asked tokend to wait (Retry-After); not calling it until then",
                        endpoint.name()
                    ),
                });
            }
            if gate.probing {
                return Err(ProviderError::Transient {
                    kind: TransientKind::RateLimited,
                    retry_after: Some(PROBE_WAIT),
                    message: format!(
                        "{} is being probed after a Retry-After pause",
                        endpoint.name()
                    ),
                });
            }
            gate.probing = true;
            probe = true;
        }
        Ok(Admission {
            gates: self.gates.clone(),
            endpoint,
            probe,
            settled: false,
        })
    }

    /// How long `endpoint` is paused by the provider's `Retry-After`, if it is.
    pub fn paused_for(&self, endpoint: Endpoint) -> Option<Duration> {
        let gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        let until = gates.get(&endpoint)?.paused_until?;
        let now = Instant::now();
        (until > now).then(|| until - now)
    }

    /// The client secret, or why the app cannot be used (the config decides what is missing).
    fn credentials(&self) -> Result<&Secret, ProviderError> {
        if let Some(missing) = self.config.missing_credentials() {
            return Err(ProviderError::NotConfigured(missing));
        }
        self.config.client_secret.as_ref().ok_or_else(|| {
            ProviderError::NotConfigured("the Atlassian client secret is not loaded".to_owned())
        })
    }

    /// Why this client cannot talk to Atlassian, if it cannot.
    pub fn not_configured(&self) -> Option<String> {
        self.credentials().err().map(|e| e.to_string())
    }

    /// Exchanges a refresh token for a new access token (and, normally, a new refresh token).
    pub async fn refresh(&self, refresh_token: &Secret) -> Result<Grant, ProviderError> {
        let secret = self.credentials()?;
        let body = serde_json::json!({
            "grant_type": "refresh_token",
            "client_id": self.config.client_id,
            "client_secret": secret.expose(),
            "refresh_token": refresh_token.expose(),
        });
        self.token_request(body, &[refresh_token.expose(), secret.expose()])
            .await
    }

    /// Exchanges an authorization code from the consent screen.
    pub async fn exchange_code(&self, code: &Secret) -> Result<Grant, ProviderError> {
        let secret = self.credentials()?;
        let body = serde_json::json!({
            "grant_type": "authorization_code",
            "client_id": self.config.client_id,
            "client_secret": secret.expose(),
            "code": code.expose(),
            "redirect_uri": self.config.redirect_uri.as_str(),
        });
        self.token_request(body, &[code.expose(), secret.expose()])
            .await
    }

    async fn token_request(
        &self,
        body: serde_json::Value,
        sent_secrets: &[&str],
    ) -> Result<Grant, ProviderError> {
        let admission = self.admit(Endpoint::Token)?;
        let response = self
            .http
            .post(self.config.token_url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .json(&body)
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status();
        let retry_after = parse_retry_after(response.headers());
        admission.settle(Some(status), retry_after);
        let bytes = response.bytes().await.map_err(transport_error)?;
        if status.is_success() {
            return parse_grant(status, &bytes);
        }
        Err(classify_error(status, retry_after, &bytes, sent_secrets))
    }

    /// The sites an access token reaches.
    pub async fn accessible_resources(
        &self,
        access_token: &Secret,
        now: Time,
    ) -> Result<Vec<Site>, ProviderError> {
        let url = self.api_url("oauth/token/accessible-resources");
        let (status, retry_after, bytes) = self.get(Endpoint::Resources, url, access_token).await?;
        parse_resources(status, retry_after, &bytes, now)
    }

    /// The account behind an access token; `Ok(None)` when the provider will not say (401 or
    /// 403: the app lacks `read:me` / the User Identity API), which is not a failure.
    pub async fn me(&self, access_token: &Secret) -> Result<Option<Account>, ProviderError> {
        let url = self.api_url("me");
        let (status, retry_after, bytes) = self.get(Endpoint::Me, url, access_token).await?;
        parse_me(status, retry_after, &bytes)
    }

    /// The URL of the consent screen for a new connection, with the given `state`.
    pub fn authorize_url(&self, state: &str) -> String {
        let client =
            oauth2::basic::BasicClient::new(oauth2::ClientId::new(self.config.client_id.clone()))
                .set_auth_uri(oauth2::AuthUrl::from_url(self.config.authorize_url.clone()))
                .set_redirect_uri(oauth2::RedirectUrl::from_url(
                    self.config.redirect_uri.clone(),
                ));
        let state = state.to_owned();
        let (url, _) = client
            .authorize_url(move || oauth2::CsrfToken::new(state))
            .add_scopes(
                self.config
                    .scopes
                    .iter()
                    .map(|s| oauth2::Scope::new(s.clone())),
            )
            .add_extra_param("audience", "api.atlassian.com")
            .add_extra_param("prompt", "consent")
            .url();
        url.to_string()
    }

    /// The base URL of a product API for a site: `{api_url}/ex/{product}/{cloud_id}`.
    pub fn api_base_url(&self, product: &str, cloud_id: &str) -> String {
        format!(
            "{}/ex/{product}/{cloud_id}",
            self.config.api_url.as_str().trim_end_matches('/')
        )
    }

    fn api_url(&self, path: &str) -> String {
        format!(
            "{}/{path}",
            self.config.api_url.as_str().trim_end_matches('/')
        )
    }

    async fn get(
        &self,
        endpoint: Endpoint,
        url: String,
        access_token: &Secret,
    ) -> Result<(StatusCode, Option<Duration>, bytes::Bytes), ProviderError> {
        let admission = self.admit(endpoint)?;
        let response = self
            .http
            .get(url)
            .bearer_auth(access_token.expose())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status();
        let retry_after = parse_retry_after(response.headers());
        admission.settle(Some(status), retry_after);
        let bytes = response.bytes().await.map_err(transport_error)?;
        Ok((status, retry_after, bytes))
    }
}

/// Reads a 2xx answer of the token endpoint. A body that is not a full token response but
/// does carry a new `refresh_token` is [`ProviderError::Partial`]: the provider rotated, and
/// the new token is all that is left of the chain.
fn parse_grant(status: StatusCode, bytes: &[u8]) -> Result<Grant, ProviderError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ProviderError::Transient {
            kind: TransientKind::Malformed,
            retry_after: None,
            message: format!(
                "the token endpoint answered {status} with a body that is not a token response ({})",
                json_problem(&e)
            ),
        })?;
    let salvage = |why: String| {
        let rotated = value
            .get("refresh_token")
            .and_then(|v| v.as_str())
            .filter(|r| !r.is_empty());
        match rotated {
            Some(rt) => ProviderError::Partial {
                refresh_token: Secret::new(rt),
                message: format!("{why}; it did carry a new refresh token, which tokend keeps"),
            },
            None => ProviderError::Transient {
                kind: TransientKind::Malformed,
                retry_after: None,
                message: why,
            },
        }
    };
    // From a borrow: a copy of the tree would hold both tokens in plain, unwiped Strings.
    let parsed: TokenBody = match TokenBody::deserialize(&value) {
        Ok(p) => p,
        Err(e) => {
            return Err(salvage(format!(
                "the token endpoint answered {status} with a body that is not a token response ({})",
                json_problem(&e)
            )));
        }
    };
    let Some(access) = parsed.access_token.filter(|a| !a.is_empty()) else {
        return Err(salvage(format!(
            "the token endpoint answered {status} without an access_token"
        )));
    };
    Ok(Grant {
        access_token: Secret::new(access),
        refresh_token: parsed
            .refresh_token
            .filter(|r| !r.is_empty())
            .map(Secret::new),
        expires_in: parsed.expires_in.as_ref().and_then(parse_expires_in),
        scopes: parsed
            .scope
            .map(|s| s.split_whitespace().map(str::to_owned).collect()),
    })
}

/// Reads an answer of accessible-resources: the sites a token reaches, as of `now`.
fn parse_resources(
    status: StatusCode,
    retry_after: Option<Duration>,
    bytes: &[u8],
    now: Time,
) -> Result<Vec<Site>, ProviderError> {
    if !status.is_success() {
        return Err(api_error("accessible-resources", status, retry_after));
    }
    let list: Vec<ResourceBody> =
        serde_json::from_slice(bytes).map_err(|e| ProviderError::Transient {
            kind: TransientKind::Malformed,
            retry_after: None,
            message: format!(
                "accessible-resources answered a body that is not a list of sites ({})",
                json_problem(&e)
            ),
        })?;
    Ok(list
        .into_iter()
        .map(|r| Site {
            cloud_id: r.id,
            url: r.url,
            name: r.name,
            scopes: r.scopes,
            last_seen_at: now,
        })
        .collect())
}

/// Reads an answer of `/me`: `Ok(None)` for 401/403 (the provider will not say) and for a
/// profile without an account id.
fn parse_me(
    status: StatusCode,
    retry_after: Option<Duration>,
    bytes: &[u8],
) -> Result<Option<Account>, ProviderError> {
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Ok(None);
    }
    if !status.is_success() {
        return Err(api_error("/me", status, retry_after));
    }
    let me: MeBody = serde_json::from_slice(bytes).map_err(|e| ProviderError::Transient {
        kind: TransientKind::Malformed,
        retry_after: None,
        message: format!(
            "/me answered a body that is not a profile ({})",
            json_problem(&e)
        ),
    })?;
    Ok(me
        .account_id
        .filter(|a| !a.is_empty())
        .map(|account_id| Account { account_id }))
}

/// A new random, unguessable `state` for the consent flow.
pub fn new_state() -> String {
    oauth2::CsrfToken::new_random().secret().clone()
}

fn transport_error(e: reqwest::Error) -> ProviderError {
    // reqwest's Display includes the URL, which holds no secret (tokens travel in bodies
    // and headers); walk the source chain for the useful part.
    let kind = if e.is_connect() {
        TransientKind::Connect
    } else {
        TransientKind::Timeout
    };
    let mut causes = String::new();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        causes.push_str(": ");
        causes.push_str(&s.to_string());
        source = s.source();
    }
    let message = format!("{}{causes}", e.without_url());
    ProviderError::Transient {
        kind,
        retry_after: None,
        message: shorten(&message),
    }
}

/// Describes a JSON error without its Display, which can quote values from the body.
fn json_problem(e: &serde_json::Error) -> String {
    format!(
        "{:?} error at line {} column {}",
        e.classify(),
        e.line(),
        e.column()
    )
}

fn api_error(what: &str, status: StatusCode, retry_after: Option<Duration>) -> ProviderError {
    let kind = if status == StatusCode::TOO_MANY_REQUESTS {
        TransientKind::RateLimited
    } else if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
        TransientKind::ServerError
    } else {
        TransientKind::Refused
    };
    ProviderError::Transient {
        kind,
        retry_after,
        message: format!("{what} answered {status}"),
    }
}

/// Classifies a non-2xx answer of the token endpoint.
fn classify_error(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
    sent_secrets: &[&str],
) -> ProviderError {
    // An OAuth error response is a JSON object (RFC 6749 §5.2). serde would also read the
    // struct from an array (`["invalid_grant"]`), which is no error response and must not
    // condemn a chain.
    let parsed: Option<ErrorBody> = body
        .trim_ascii_start()
        .starts_with(b"{")
        .then(|| serde_json::from_slice(body).ok())
        .flatten();
    let code = parsed.as_ref().and_then(|b| b.error.clone());
    let description = parsed
        .as_ref()
        .and_then(|b| b.error_description.clone())
        .map(|d| scrub(&d, sent_secrets))
        .unwrap_or_default();
    let definite_status = matches!(status.as_u16(), 400 | 401 | 403);
    if let Some(code) = &code {
        // Only these two say "this chain is dead". `access_denied` with a 401 is what a wrong
        // client secret looks like: a configuration problem that must not condemn every
        // chain, so it stays transient (it shows in last_error and the logs).
        if definite_status && (code == "invalid_grant" || code == "unauthorized_client") {
            return ProviderError::Rejected {
                code: scrub(code, sent_secrets),
                description: if description.is_empty() {
                    "the provider rejected the refresh token".to_owned()
                } else {
                    description
                },
            };
        }
    }
    let kind = if status == StatusCode::TOO_MANY_REQUESTS {
        TransientKind::RateLimited
    } else if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
        TransientKind::ServerError
    } else {
        TransientKind::Refused
    };
    let mut message = format!("the token endpoint answered {status}");
    if let Some(code) = code {
        message.push_str(&format!(" ({}", scrub(&code, sent_secrets)));
        if !description.is_empty() {
            message.push_str(&format!(": {description}"));
        }
        message.push(')');
    }
    ProviderError::Transient {
        kind,
        retry_after,
        message,
    }
}

/// Parses `Retry-After` as delay-seconds or an HTTP date, capped at [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let delay = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = httpdate_parse(value)?;
        (at - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

fn httpdate_parse(value: &str) -> Option<Time> {
    chrono::DateTime::parse_from_rfc2822(value)
        .ok()
        .map(|d| d.with_timezone(&chrono::Utc))
}

fn parse_expires_in(v: &serde_json::Value) -> Option<Duration> {
    let secs = match v {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (secs.is_finite() && secs > 0.0).then(|| Duration::from_secs_f64(secs.min(1e9)))
}

/// Removes any secret that was sent from a provider text and shortens it. Should a secret
/// show up again in the result (one that is a piece of the marker, holds a space where the
/// text had a control character, or ends in the `…` of the cut), none of the text is kept.
fn scrub(text: &str, sent_secrets: &[&str]) -> String {
    let secrets: Vec<&str> = sent_secrets
        .iter()
        .copied()
        .filter(|s| s.len() >= 4)
        .collect();
    let mut out = text.to_owned();
    for s in &secrets {
        out = out.replace(s, "[redacted]");
    }
    let out = shorten(&out);
    if secrets.iter().any(|s| out.contains(s)) {
        return String::new();
    }
    out
}

fn shorten(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.chars().count() <= MAX_DESCRIPTION {
        clean
    } else {
        let mut s: String = clean.chars().take(MAX_DESCRIPTION).collect();
        s.push('…');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(status: u16, body: &str) -> ProviderError {
        classify_error(
            StatusCode::from_u16(status).unwrap(),
            None,
            body.as_bytes(),
            &["rt-secret-1234"],
        )
    }

    #[test]
    fn invalid_grant_and_unauthorized_client_are_rejections() {
        for (status, body) in [
            (
                403,
                r#"{"error":"invalid_grant","error_description":"Unknown or invalid refresh token."}"#,
            ),
            (
                403,
                r#"{"error":"unauthorized_client","error_description":"refresh_token is invalid"}"#,
            ),
            (400, r#"{"error":"invalid_grant"}"#),
            (401, r#"{"error":"unauthorized_client"}"#),
        ] {
            let e = classify(status, body);
            assert!(
                matches!(e, ProviderError::Rejected { .. }),
                "{status} {body}: {e:?}"
            );
            assert!(!e.maybe_processed());
        }
    }

    #[test]
    fn everything_else_is_transient() {
        for (status, body, kind) in [
            (500, "<html>oops</html>", TransientKind::ServerError),
            (
                503,
                r#"{"error":"invalid_grant"}"#,
                TransientKind::ServerError,
            ),
            (429, "", TransientKind::RateLimited),
            (408, "", TransientKind::ServerError),
            (
                401,
                r#"{"error":"access_denied","error_description":"Unauthorized"}"#,
                TransientKind::Refused,
            ),
            (
                400,
                r#"{"error":"invalid_request"}"#,
                TransientKind::Refused,
            ),
            (403, "not json", TransientKind::Refused),
        ] {
            match classify(status, body) {
                ProviderError::Transient { kind: k, .. } => assert_eq!(k, kind, "{status} {body}"),
                other => panic!("{status} {body}: {other:?}"),
            }
        }
    }

    #[test]
    fn provider_text_is_scrubbed_of_the_sent_token() {
        let e = classify(
            403,
            r#"{"error":"invalid_grant","error_description":"token rt-secret-1234 is unknown"}"#,
        );
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains("rt-secret-1234"), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
        let long = format!(
            r#"{{"error":"x","error_description":"{}"}}"#,
            "a".repeat(5000)
        );
        assert!(classify(400, &long).to_string().len() < 400);
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "5".parse().unwrap());
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(5)));
        h.insert(RETRY_AFTER, "999999999".parse().unwrap());
        assert_eq!(parse_retry_after(&h), Some(MAX_RETRY_AFTER));
        let later = (chrono::Utc::now() + chrono::Duration::seconds(120)).to_rfc2822();
        h.insert(RETRY_AFTER, later.parse().unwrap());
        let d = parse_retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(parse_retry_after(&h), None);
    }

    #[test]
    fn expires_in_forms() {
        assert_eq!(
            parse_expires_in(&serde_json::json!(3600)),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            parse_expires_in(&serde_json::json!("60")),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse_expires_in(&serde_json::json!(-1)), None);
        assert_eq!(parse_expires_in(&serde_json::json!(null)), None);
    }

    fn client() -> Atlassian {
        let config = crate::config::Config::parse(
            "",
            std::path::Path::new("/etc/tokend/daemon.toml"),
            &|_| None,
            &|_| Err(std::io::Error::other("no files here")),
        )
        .unwrap();
        Atlassian::new(config.providers.atlassian, Duration::from_secs(5)).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_pauses_the_endpoint_for_everyone_then_one_probe_reopens_it() {
        let c = client();
        c.admit(Endpoint::Token).unwrap().settle(
            Some(StatusCode::TOO_MANY_REQUESTS),
            Some(Duration::from_secs(5)),
        );
        let paused = c.admit(Endpoint::Token).err().expect("paused");
        assert!(!paused.maybe_processed());
        let r = paused.retry_after().unwrap();
        assert!(
            r > Duration::from_secs(4) && r <= Duration::from_secs(5),
            "{r:?}"
        );
        // Other endpoints are not paused.
        assert!(c.admit(Endpoint::Me).is_ok());
        tokio::time::advance(Duration::from_secs(5)).await;
        let probe = c.admit(Endpoint::Token).expect("one probe");
        let waiting = c
            .admit(Endpoint::Token)
            .err()
            .expect("others wait for the probe");
        assert_eq!(waiting.retry_after(), Some(PROBE_WAIT));
        probe.settle(Some(StatusCode::OK), None);
        assert!(c.admit(Endpoint::Token).is_ok());
        assert!(c.admit(Endpoint::Token).is_ok());
        // A dropped probe (a cancelled call) does not wedge the endpoint.
        c.admit(Endpoint::Token).unwrap().settle(
            Some(StatusCode::SERVICE_UNAVAILABLE),
            Some(Duration::from_secs(1)),
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        drop(c.admit(Endpoint::Token).unwrap());
        assert!(c.admit(Endpoint::Token).is_ok());
        // A 503 without Retry-After does not pause anyone.
        c.admit(Endpoint::Resources)
            .unwrap()
            .settle(Some(StatusCode::SERVICE_UNAVAILABLE), None);
        assert!(c.admit(Endpoint::Resources).is_ok());
    }

    #[test]
    fn ambiguity_follows_the_kind() {
        let t = |kind| ProviderError::Transient {
            kind,
            retry_after: None,
            message: String::new(),
        };
        assert!(!t(TransientKind::Connect).maybe_processed());
        assert!(!t(TransientKind::RateLimited).maybe_processed());
        assert!(t(TransientKind::Timeout).maybe_processed());
        assert!(t(TransientKind::ServerError).maybe_processed());
        assert!(t(TransientKind::Malformed).maybe_processed());
    }
}

/// Property tests of every parser of provider answers: arbitrary and structured bodies,
/// statuses and headers; no panic, and every failure is a typed [`ProviderError`].
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    /// Token-like strings (Atlassian tokens are base64url/JWT text).
    fn token() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._~-]{8,48}"
    }

    fn json_leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
                .map(Value::Number)),
            "\\PC{0,24}".prop_map(Value::from),
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        json_leaf().prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("\\PC{0,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A field that is absent, of the right shape, or of any shape.
    fn field(right: BoxedStrategy<Value>) -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            1 => Just(None),
            4 => right.prop_map(Some),
            2 => json_value().prop_map(Some),
        ]
    }

    fn string_or_null(s: impl Strategy<Value = String> + 'static) -> BoxedStrategy<Value> {
        prop_oneof![5 => s.prop_map(Value::from), 1 => Just(Value::Null)].boxed()
    }

    /// A JSON object with the given optional fields and random extra ones.
    fn object(
        fields: Vec<(&'static str, Option<Value>)>,
        extra: Vec<(String, Value)>,
    ) -> serde_json::Map<String, Value> {
        let mut m: serde_json::Map<String, Value> = extra
            .into_iter()
            .filter(|(k, _)| !fields.iter().any(|(f, _)| f == k))
            .collect();
        for (k, v) in fields {
            if let Some(v) = v {
                m.insert(k.to_owned(), v);
            }
        }
        m
    }

    fn extra_fields() -> impl Strategy<Value = Vec<(String, Value)>> {
        prop::collection::vec(("[a-z_]{1,12}", json_value()), 0..4)
    }

    /// Flips, inserts and deletes bytes.
    fn mutate(mut bytes: Vec<u8>, edits: &[(u8, usize, u8)]) -> Vec<u8> {
        for &(op, at, b) in edits {
            let at = if bytes.is_empty() {
                0
            } else {
                at % bytes.len()
            };
            match op % 3 {
                0 if !bytes.is_empty() => bytes[at] ^= b | 1,
                1 => bytes.insert(at, b),
                _ if !bytes.is_empty() => {
                    bytes.remove(at);
                }
                _ => {}
            }
        }
        bytes
    }

    fn edits() -> impl Strategy<Value = Vec<(u8, usize, u8)>> {
        prop::collection::vec(any::<(u8, usize, u8)>(), 1..6)
    }

    fn status() -> impl Strategy<Value = StatusCode> {
        prop_oneof![
            3 => prop::sample::select(vec![
                200u16, 201, 204, 301, 400, 401, 403, 404, 408, 409, 429, 500, 502, 503, 504,
            ]),
            1 => 100u16..1000,
        ]
        .prop_map(|s| StatusCode::from_u16(s).expect("100..1000 is a status"))
    }

    /// The kind every non-2xx answer that is not a rejection gets.
    fn kind_of(status: StatusCode) -> TransientKind {
        if status == StatusCode::TOO_MANY_REQUESTS {
            TransientKind::RateLimited
        } else if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
            TransientKind::ServerError
        } else {
            TransientKind::Refused
        }
    }

    fn shown(e: &ProviderError) -> String {
        format!("{e} {e:?}")
    }

    /// What `parse_grant` must make of an answer: a usable grant, a rotated refresh token
    /// to keep, or a malformed answer, never anything else.
    fn check_grant_invariants(status: StatusCode, bytes: &[u8]) -> Result<(), TestCaseError> {
        match parse_grant(status, bytes) {
            Ok(g) => {
                prop_assert!(!g.access_token.expose().is_empty());
                prop_assert!(
                    g.refresh_token
                        .as_ref()
                        .is_none_or(|r| !r.expose().is_empty())
                );
                prop_assert!(
                    g.expires_in
                        .is_none_or(|d| d <= Duration::from_secs(1_000_000_000))
                );
            }
            Err(ProviderError::Partial { refresh_token, .. }) => {
                prop_assert!(!refresh_token.expose().is_empty());
            }
            Err(ProviderError::Transient {
                kind: TransientKind::Malformed,
                retry_after: None,
                message,
            }) => prop_assert!(!message.is_empty()),
            Err(other) => prop_assert!(false, "untyped outcome {other:?}"),
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn grant_from_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            check_grant_invariants(StatusCode::OK, &bytes)?;
        }

        #[test]
        fn grant_from_mutated_answers(
            at in token(), rt in token(), edits in edits(),
        ) {
            let body = json!({
                "access_token": at, "refresh_token": rt, "expires_in": 3600,
                "scope": "offline_access read:me", "token_type": "Bearer",
            });
            let bytes = mutate(serde_json::to_vec(&body).unwrap(), &edits);
            check_grant_invariants(StatusCode::OK, &bytes)?;
            if let Err(e) = parse_grant(StatusCode::OK, &bytes) {
                let s = shown(&e);
                prop_assert!(!s.contains(&at) && !s.contains(&rt), "{s}");
            }
        }

        /// A JSON object with random fields of random types: the outcome follows from the
        /// fields alone, and no message quotes a token.
        #[test]
        fn grant_from_random_objects(
            access in field(string_or_null(token())),
            refresh in field(string_or_null(prop_oneof![token(), Just(String::new())])),
            expires in field(prop_oneof![
                any::<i32>().prop_map(Value::from),
                "[0-9. e+-]{0,8}".prop_map(Value::from),
            ].boxed()),
            scope in field(string_or_null("[a-z: ]{0,40}")),
            extra in extra_fields(),
        ) {
            let body = Value::Object(object(
                vec![
                    ("access_token", access.clone()),
                    ("refresh_token", refresh.clone()),
                    ("expires_in", expires.clone()),
                    ("scope", scope.clone()),
                ],
                extra,
            ));
            let bytes = serde_json::to_vec(&body).unwrap();
            check_grant_invariants(StatusCode::OK, &bytes)?;

            let string_like = |v: &Option<Value>| {
                matches!(v, None | Some(Value::Null) | Some(Value::String(_)))
            };
            let non_empty = |v: &Option<Value>| match v {
                Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
                _ => None,
            };
            let shapes_ok = string_like(&access) && string_like(&refresh) && string_like(&scope);
            let result = parse_grant(StatusCode::OK, &bytes);
            match (shapes_ok, non_empty(&access), non_empty(&refresh), result) {
                (true, Some(a), r, Ok(g)) => {
                    prop_assert_eq!(g.access_token.expose(), a.as_str());
                    prop_assert_eq!(g.refresh_token.as_ref().map(|s| s.expose().to_owned()), r);
                    let want = expires.as_ref().and_then(parse_expires_in);
                    prop_assert_eq!(g.expires_in, want);
                    let want_scopes = match &scope {
                        Some(Value::String(s)) => {
                            Some(s.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
                        }
                        _ => None,
                    };
                    prop_assert_eq!(g.scopes, want_scopes);
                }
                (false, _, Some(r), Err(ProviderError::Partial { refresh_token, message }))
                | (true, None, Some(r), Err(ProviderError::Partial { refresh_token, message })) => {
                    prop_assert_eq!(refresh_token.expose(), r.as_str());
                    prop_assert!(!message.contains(&r));
                }
                (
                    false,
                    _,
                    None,
                    Err(ProviderError::Transient { kind: TransientKind::Malformed, .. }),
                )
                | (
                    true,
                    None,
                    None,
                    Err(ProviderError::Transient { kind: TransientKind::Malformed, .. }),
                ) => {}
                (shapes_ok, a, r, result) => prop_assert!(
                    false,
                    "shapes_ok={shapes_ok} access={a:?} refresh={r:?}: {result:?}"
                ),
            }
            if let Err(e) = parse_grant(StatusCode::OK, &bytes) {
                let s = shown(&e);
                let tokens = [non_empty(&access), non_empty(&refresh)];
                for t in tokens.into_iter().flatten().filter(|t| t.len() >= 8) {
                    prop_assert!(!s.contains(&t), "{s}");
                }
            }
        }

        /// Only `invalid_grant` / `unauthorized_client` with 400/401/403 condemn a chain;
        /// everything else is transient with the kind its status says.
        #[test]
        fn classification_rule(
            status in status(),
            code in prop_oneof![
                4 => prop::sample::select(vec![
                    "invalid_grant", "unauthorized_client", "access_denied", "invalid_client",
                    "invalid_request", "server_error", "Invalid_Grant", "invalid_grant ",
                ]).prop_map(|s| Some(Value::from(s))),
                1 => Just(None),
                1 => json_value().prop_map(Some),
            ],
            description in field(string_or_null("\\PC{0,300}")),
            extra in extra_fields(),
            retry_after in prop::option::of((0u64..100_000).prop_map(Duration::from_secs)),
            rt in token(),
            secret in token(),
        ) {
            // The description quotes the sent tokens; the scrub must remove them.
            let description = description.map(|d| match d {
                Value::String(s) => Value::String(format!("{s} {rt} {secret}{s}")),
                other => other,
            });
            let body = Value::Object(object(
                vec![("error", code.clone()), ("error_description", description.clone())],
                extra,
            ));
            let bytes = serde_json::to_vec(&body).unwrap();
            let e = classify_error(status, retry_after, &bytes, &[&rt, &secret]);
            let definite = matches!(status.as_u16(), 400 | 401 | 403);
            let string_like = |v: &Option<Value>| {
                matches!(v, None | Some(Value::Null) | Some(Value::String(_)))
            };
            let condemning = matches!(
                &code,
                Some(Value::String(c)) if c == "invalid_grant" || c == "unauthorized_client"
            );
            let expect_rejected =
                definite && condemning && string_like(&code) && string_like(&description);
            match &e {
                ProviderError::Rejected { code: c, description: d } => {
                    prop_assert!(expect_rejected, "{status} {body}: {e:?}");
                    prop_assert!(c == "invalid_grant" || c == "unauthorized_client");
                    prop_assert!(!d.is_empty());
                    prop_assert!(!e.maybe_processed());
                }
                ProviderError::Transient { kind, retry_after: r, message } => {
                    prop_assert!(!expect_rejected, "{status} {body}: {e:?}");
                    prop_assert_eq!(*kind, kind_of(status));
                    prop_assert_eq!(*r, retry_after);
                    prop_assert!(message.chars().count() < 600, "{message}");
                }
                other => prop_assert!(false, "untyped outcome {other:?}"),
            }
            let s = shown(&e);
            prop_assert!(!s.contains(&rt) && !s.contains(&secret), "{s}");
        }

        /// Whatever the body, a rejection needs a definite status and a JSON object whose
        /// `error` is one of the two condemning codes.
        #[test]
        fn rejection_needs_an_oauth_error_object(
            status in status(),
            body in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..128),
                json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
                (prop::sample::select(vec!["invalid_grant", "unauthorized_client"]), edits())
                    .prop_map(|(c, edits)| mutate(
                        serde_json::to_vec(&json!({"error": c, "error_description": "x"}))
                            .unwrap(),
                        &edits,
                    )),
                prop::sample::select(vec!["invalid_grant", "unauthorized_client"]).prop_map(
                    |c| serde_json::to_vec(&json!([c, "looks like an error body"])).unwrap()
                ),
            ],
        ) {
            let e = classify_error(status, None, &body, &["rt-secret-1234"]);
            if let ProviderError::Rejected { .. } = e {
                prop_assert!(matches!(status.as_u16(), 400 | 401 | 403));
                // Not through `Value`: a lone surrogate in an ignored field is fine for the
                // classification but not for `Value`.
                #[derive(Deserialize)]
                struct Code {
                    error: Option<String>,
                }
                prop_assert!(body.trim_ascii_start().starts_with(b"{"), "not an object");
                let code = serde_json::from_slice::<Code>(&body).ok().and_then(|c| c.error);
                prop_assert!(
                    matches!(code.as_deref(), Some("invalid_grant" | "unauthorized_client")),
                    "{status} {:?}: {e:?}",
                    String::from_utf8_lossy(&body)
                );
            } else {
                prop_assert!(matches!(e, ProviderError::Transient { .. }), "{e:?}");
            }
        }

        #[test]
        fn retry_after_from_arbitrary_headers(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let Ok(value) = reqwest::header::HeaderValue::from_bytes(&bytes) else {
                return Ok(());
            };
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, value);
            prop_assert!(parse_retry_after(&h).is_none_or(|d| d <= MAX_RETRY_AFTER));
        }

        #[test]
        fn retry_after_seconds_are_capped(secs in any::<u64>(), pad in "[ \t]{0,2}") {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, format!("{pad}{secs}{pad}").parse().unwrap());
            prop_assert_eq!(
                parse_retry_after(&h),
                Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
            );
        }

        /// HTTP dates anywhere in years 0..=9999, at any whole-minute offset: never more
        /// than the cap, and a date in the past means now.
        #[test]
        fn retry_after_dates_are_capped(
            at in -62_167_219_200i64..=253_402_300_799,
            offset_minutes in -1439i32..=1439,
            imf in any::<bool>(),
        ) {
            let utc = chrono::DateTime::from_timestamp(at, 0).unwrap();
            let text = if imf {
                utc.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
            } else {
                utc.with_timezone(&chrono::FixedOffset::east_opt(offset_minutes * 60).unwrap()).to_rfc2822()
            };
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, text.parse().unwrap());
            let now = chrono::Utc::now().timestamp();
            let d = parse_retry_after(&h);
            prop_assert!(d.is_some(), "{text}");
            let d = d.unwrap_or_default();
            prop_assert!(d <= MAX_RETRY_AFTER, "{text}: {d:?}");
            if at < now - 1 {
                prop_assert_eq!(d, Duration::ZERO, "{}", text);
            }
            if at > now + 2 * MAX_RETRY_AFTER.as_secs() as i64 {
                prop_assert_eq!(d, MAX_RETRY_AFTER, "{}", text);
            }
        }

        #[test]
        fn expires_in_never_panics_and_is_bounded(v in json_value()) {
            prop_assert!(
                parse_expires_in(&v).is_none_or(|d| d <= Duration::from_secs(1_000_000_000))
            );
        }

        #[test]
        fn expires_in_numbers_and_numeric_strings(
            secs in prop_oneof![any::<f64>(), -10.0f64..1e10, 0.0f64..10.0],
            as_string in any::<bool>(),
        ) {
            let v = if as_string {
                Value::String(format!(" {secs} "))
            } else {
                match serde_json::Number::from_f64(secs) {
                    Some(n) => Value::Number(n),
                    None => return Ok(()),
                }
            };
            let want = (secs.is_finite() && secs > 0.0)
                .then(|| Duration::from_secs_f64(secs.min(1e9)));
            prop_assert_eq!(parse_expires_in(&v), want);
        }

        #[test]
        fn expires_in_integers(secs in any::<i64>()) {
            let want = (secs > 0).then(|| Duration::from_secs_f64((secs as f64).min(1e9)));
            prop_assert_eq!(parse_expires_in(&Value::from(secs)), want);
        }

        /// The sent secrets never survive a scrub, whatever the text around them: control
        /// characters, the marker itself, overlaps, the length cut.
        #[test]
        fn scrub_removes_the_sent_secrets(
            secret in prop_oneof![
                token(),
                "\\PC{4,16}",
                // Pieces of the marker, and secrets with spaces or brackets.
                (0usize..7, 4usize..=10).prop_map(|(a, n)| {
                    "[redacted]".chars().skip(a).take(n).collect::<String>()
                }).prop_filter("4 bytes", |s| s.len() >= 4),
                "[a-z\\[\\] ]{4,8}",
            ],
            other in token(),
            pieces in prop::collection::vec(
                prop_oneof![
                    Just(0u8), Just(1), Just(2), Just(3), Just(4), Just(5),
                ],
                0..24,
            ),
            filler in "\\PC{0,12}",
            pad in 150usize..260,
        ) {
            let mut text = String::new();
            for p in pieces {
                match p {
                    0 => text.push_str(&secret),
                    1 => text.push_str(&secret[..secret.char_indices().nth(1).map_or(0, |c| c.0)]),
                    2 => text.push_str("[redacted]"),
                    3 => text.push('\n'),
                    4 => text.push_str(&filler),
                    _ => text.push_str(&"x".repeat(pad % 40)),
                }
            }
            let padded = format!("{}{text}", "y".repeat(pad));
            for text in [&text, &padded] {
                let out = scrub(text, &[&secret, &other]);
                prop_assert!(!out.contains(&secret), "{secret:?} in {out:?} from {text:?}");
                prop_assert!(!out.contains(&other));
                prop_assert!(!out.chars().any(char::is_control), "{out:?}");
                prop_assert!(out.chars().count() <= MAX_DESCRIPTION + 1);
            }
        }

        #[test]
        fn scrub_of_arbitrary_text(text in "\\PC{0,400}|.{0,300}", secret in "\\PC{4,12}") {
            let out = scrub(&text, &[&secret]);
            prop_assert!(!out.contains(&secret));
            prop_assert!(out.chars().count() <= MAX_DESCRIPTION + 1);
        }

        #[test]
        fn resources_from_arbitrary_answers(
            status in status(),
            retry_after in prop::option::of((0u64..100_000).prop_map(Duration::from_secs)),
            bytes in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..256),
                json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
                edits().prop_map(|e| mutate(
                    br#"[{"id":"c1","url":"https://a.atlassian.net","name":"a","scopes":["x"]}]"#
                        .to_vec(),
                    &e,
                )),
            ],
        ) {
            let now = chrono::Utc::now();
            match parse_resources(status, retry_after, &bytes, now) {
                Ok(sites) => {
                    prop_assert!(status.is_success());
                    prop_assert!(sites.iter().all(|s| s.last_seen_at == now));
                }
                Err(ProviderError::Transient { kind, retry_after: r, message }) => {
                    if status.is_success() {
                        prop_assert_eq!(kind, TransientKind::Malformed);
                        prop_assert_eq!(r, None);
                    } else {
                        prop_assert_eq!(kind, kind_of(status));
                        prop_assert_eq!(r, retry_after);
                    }
                    prop_assert!(message.starts_with("accessible-resources answered"));
                    prop_assert!(message.len() < 200, "{message}");
                }
                Err(other) => prop_assert!(false, "untyped outcome {other:?}"),
            }
        }

        /// A list of site objects with random fields: accepted exactly when every entry has
        /// a string id and well-typed optional fields, in order.
        #[test]
        fn resources_from_random_site_lists(
            entries in prop::collection::vec(
                (
                    field(token().prop_map(Value::from).boxed()),
                    field("https://[a-z]{1,8}\\.atlassian\\.net".prop_map(Value::from).boxed()),
                    field("\\PC{0,12}".prop_map(Value::from).boxed()),
                    field(
                        prop::collection::vec("[a-z:]{1,12}".prop_map(Value::from), 0..3)
                            .prop_map(Value::Array)
                            .boxed(),
                    ),
                    extra_fields(),
                ),
                0..4,
            ),
        ) {
            let mut well_formed = true;
            let mut ids = Vec::new();
            let list: Vec<Value> = entries
                .into_iter()
                .map(|(id, url, name, scopes, extra)| {
                    match &id {
                        Some(Value::String(s)) => ids.push(s.clone()),
                        _ => well_formed = false,
                    }
                    let opt_string = |v: &Option<Value>| matches!(v, None | Some(Value::String(_)));
                    let opt_strings = match &scopes {
                        None => true,
                        Some(Value::Array(a)) => a.iter().all(Value::is_string),
                        _ => false,
                    };
                    well_formed &= opt_string(&url) && opt_string(&name) && opt_strings;
                    Value::Object(object(
                        vec![("id", id), ("url", url), ("name", name), ("scopes", scopes)],
                        extra,
                    ))
                })
                .collect();
            let bytes = serde_json::to_vec(&list).unwrap();
            let now = chrono::Utc::now();
            match parse_resources(StatusCode::OK, None, &bytes, now) {
                Ok(sites) => {
                    prop_assert!(well_formed, "{list:?}");
                    let got: Vec<String> = sites.into_iter().map(|s| s.cloud_id).collect();
                    prop_assert_eq!(got, ids);
                }
                Err(ProviderError::Transient { kind: TransientKind::Malformed, message, .. }) => {
                    prop_assert!(!well_formed, "{list:?}: {message}");
                    for id in ids.iter().filter(|id| id.len() >= 8) {
                        prop_assert!(!message.contains(id.as_str()));
                    }
                }
                Err(other) => prop_assert!(false, "untyped outcome {other:?}"),
            }
        }

        #[test]
        fn me_from_arbitrary_answers(
            status in status(),
            retry_after in prop::option::of((0u64..100_000).prop_map(Duration::from_secs)),
            bytes in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..256),
                json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
                (token(), edits()).prop_map(|(a, e)| mutate(
                    serde_json::to_vec(&json!({"account_id": a, "email": "a@b.c"})).unwrap(),
                    &e,
                )),
            ],
        ) {
            match parse_me(status, retry_after, &bytes) {
                Ok(account) => {
                    prop_assert!(status.is_success() || matches!(status.as_u16(), 401 | 403));
                    if !status.is_success() {
                        prop_assert_eq!(&account, &None);
                    }
                    prop_assert!(account.as_ref().is_none_or(|a| !a.account_id.is_empty()));
                }
                Err(ProviderError::Transient { kind, retry_after: r, message }) => {
                    prop_assert!(!matches!(status.as_u16(), 401 | 403));
                    if status.is_success() {
                        prop_assert_eq!(kind, TransientKind::Malformed);
                        prop_assert_eq!(r, None);
                    } else {
                        prop_assert_eq!(kind, kind_of(status));
                        prop_assert_eq!(r, retry_after);
                    }
                    prop_assert!(message.starts_with("/me answered"));
                    prop_assert!(message.len() < 200, "{message}");
                }
                Err(other) => prop_assert!(false, "untyped outcome {other:?}"),
            }
        }

        #[test]
        fn me_from_random_profiles(
            account in field(string_or_null(prop_oneof![token(), Just(String::new())])),
            extra in extra_fields(),
        ) {
            let body = Value::Object(object(vec![("account_id", account.clone())], extra));
            let bytes = serde_json::to_vec(&body).unwrap();
            let result = parse_me(StatusCode::OK, None, &bytes);
            match (&account, result) {
                (Some(Value::String(a)), Ok(Some(got))) if !a.is_empty() => {
                    prop_assert_eq!(&got.account_id, a);
                }
                (Some(Value::String(a)), Ok(None)) if a.is_empty() => {}
                (None | Some(Value::Null), Ok(None)) => {}
                (
                    Some(v),
                    Err(ProviderError::Transient { kind: TransientKind::Malformed, message, .. }),
                ) if !v.is_string() && !v.is_null() => {
                    prop_assert!(!message.is_empty());
                }
                (account, result) => prop_assert!(false, "{account:?}: {result:?}"),
            }
        }
    }

    /// What the properties found, pinned: a secret that is a piece of the marker, one with
    /// a space where the text had a control character, one completed by the length cut.
    #[test]
    fn scrub_regressions() {
        for (text, secret) in [
            ("acted", "acted"),
            ("token redacted", "edac"),
            ("ab\ncd", "ab cd"),
        ] {
            let out = scrub(text, &[secret]);
            assert!(!out.contains(secret), "{secret:?} in {out:?}");
        }
        let text = "a".repeat(250);
        let secret = "a…";
        assert!(!scrub(&text, &[secret]).contains(secret));
    }

    /// An array is not an OAuth error response, even if its first element reads like one.
    #[test]
    fn an_array_body_is_not_a_rejection() {
        let e = classify_error(
            StatusCode::BAD_REQUEST,
            None,
            br#"["invalid_grant", "no"]"#,
            &[],
        );
        assert!(matches!(e, ProviderError::Transient { .. }), "{e:?}");
    }
}
