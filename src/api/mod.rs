//! The socket API: routes, access checks, and the JSON answers built from the shapes of
//! `crate::wire` (which the CLI's client reads too); no other module writes JSON.
//!
//! Every response body is JSON; every error is `{"error":{"code","message"}}` with the codes
//! of INTERFACE.md. Handlers never use extractors whose rejections could echo request
//! bytes (a request body may hold a refresh token): bodies and queries are parsed here, and a
//! last layer turns any other non-JSON error response into the standard shape.
//!
//! **Architecture Invariant:** no error body carries a token or secret; the only response
//! with a token is the `Token` answer to a caller allowed to read it.
//!
//! Outside the library only two constants of [`server`] are public (for `tests/it/api.rs`);
//! everything else here is `pub(crate)`.

pub mod server;

use crate::audit::ReadOutcome;
use crate::config::AccessConfig;
use crate::metrics::{Metrics, TokenOutcome};
use crate::model::Site;
use crate::refresh::{
    ConnectionInfo, Engine, Failure, ForSite, Identity, NotHanded, Served, TokenGrant,
};
use crate::wire::{self, ErrorCode};
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Extension, FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};
use chrono::Utc;
use parking_lot::RwLock;
use serde::Deserialize;
use serde::Serialize;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// The largest request body accepted. Real bodies are a label and a token (a few KiB at
/// most); anything larger is refused with 413: at once if its `Content-Length` says so, else
/// as soon as that much has arrived.
pub(crate) const MAX_BODY: usize = 64 * 1024;

/// How long `/v1/health` waits for the ledger write probe before calling it degraded.
const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) use crate::serve::Peer;

/// Who may do what, from `[access]`.
#[derive(Clone, Debug)]
pub(crate) struct AccessPolicy {
    /// The daemon's own uid: always admin.
    pub own_uid: u32,
    /// The `[access]` section.
    pub config: AccessConfig,
}

impl AccessPolicy {
    /// Admin routes need root, the daemon's own uid, or a listed uid or gid.
    pub fn is_admin(&self, peer: Peer) -> bool {
        peer.uid == 0
            || peer.uid == self.own_uid
            || self.config.admin_uids.contains(&peer.uid)
            || self.config.admin_gids.contains(&peer.gid)
    }

    /// Whether a peer may read the tokens of a connection.
    pub fn may_read(&self, peer: Peer, conn_id: &str, label: &str) -> bool {
        if self.config.clients.is_empty() || self.is_admin(peer) {
            return true;
        }
        self.config
            .clients
            .iter()
            .filter(|c| c.uid == Some(peer.uid) || c.gid == Some(peer.gid))
            .any(|c| c.connections.iter().any(|x| x == conn_id || x == label))
    }
}

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct ApiState {
    /// The refresh engine.
    pub engine: Arc<Engine>,
    /// Where request, token-request and latency counts go (the handlers record what they
    /// decide; the engine is not asked for its registry).
    pub metrics: Arc<Metrics>,
    /// Which periodic jobs are late: a stalled job makes `/v1/health` degraded. A view,
    /// not the job monitor itself, so that `api` does not depend on `jobs`.
    pub jobs: Arc<dyn JobsView>,
    /// Access rules; behind a lock so that a reload can replace them, and shared (`Arc`) so
    /// that a request takes a snapshot by one reference count, not a copy of every rule.
    pub access: Arc<RwLock<Arc<AccessPolicy>>>,
    /// Records who read which token.
    pub audit: crate::audit::Audit,
}

/// What `/v1/health` needs to know about the periodic jobs (implemented over
/// `jobs::JobMonitor` by the daemon's wiring).
pub(crate) trait JobsView: Send + Sync {
    /// The names of the jobs that have not succeeded within their allowed time, sorted.
    fn stalled(&self) -> Vec<&'static str>;
}

/// The state the router hands each handler: the [`ApiState`] behind one `Arc`, so that a
/// request takes it by one reference count instead of cloning (and later dropping) each of
/// its handles.
type Shared = Arc<ApiState>;

impl ApiState {
    fn policy(&self) -> Arc<AccessPolicy> {
        self.access.read().clone()
    }
}

/// An API error: one of INTERFACE.md's codes (which decides the status), a message, and for
/// `provider_unavailable` a `Retry-After`.
#[derive(Debug)]
pub(crate) struct ApiError {
    code: ErrorCode,
    message: String,
    retry_after: Option<Duration>,
}

impl ApiError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

impl From<Failure> for ApiError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::NotFound => ApiError::not_found("no such connection"),
            Failure::NeedsReauth(m) => ApiError::new(ErrorCode::NeedsReauth, m),
            Failure::Conflict(m) => ApiError::new(ErrorCode::Conflict, m),
            Failure::BadRequest(m) => ApiError::bad_request(m),
            Failure::Internal(m) => ApiError::internal(m),
            Failure::Unavailable {
                retry_after,
                message,
            } => ApiError {
                code: ErrorCode::ProviderUnavailable,
                message,
                retry_after: Some(retry_after),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = wire::ErrorBody {
            error: wire::ErrorDetail {
                code: self.code,
                message: self.message,
            },
        };
        let mut resp = (self.code.status(), axum::Json(body)).into_response();
        if let Some(r) = self.retry_after.filter(|_| self.code.retry_after()) {
            let secs = r.as_secs() + u64::from(r.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

type ApiResult = Result<Response, ApiError>;

/// The handlers of the socket API, each named once in [`ROUTES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `GET /v1/health`.
    Health,
    /// `GET /v1/connections`.
    ListConnections,
    /// `POST /v1/connections` (admin).
    AddConnection,
    /// `GET /v1/connections/{id}`.
    ShowConnection,
    /// `DELETE /v1/connections/{id}` (admin).
    RemoveConnection,
    /// `POST /v1/connections/{id}/refresh` (admin).
    RefreshConnection,
    /// `GET /v1/connections/{id}/token`.
    ConnectionToken,
    /// `GET /v1/connections/{id}/events` (admin).
    ConnectionEvents,
    /// `GET /v1/token?site=`.
    SiteToken,
    /// `POST /v1/authorizations` (admin).
    Authorize,
}

impl Endpoint {
    /// The handler's name, in the audit trail (`through connection_token`) and logs.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Health => "health",
            Endpoint::ListConnections => "list_connections",
            Endpoint::AddConnection => "add_connection",
            Endpoint::ShowConnection => "show_connection",
            Endpoint::RemoveConnection => "remove_connection",
            Endpoint::RefreshConnection => "refresh_connection",
            Endpoint::ConnectionToken => "connection_token",
            Endpoint::ConnectionEvents => "connection_events",
            Endpoint::SiteToken => "site_token",
            Endpoint::Authorize => "authorize",
        }
    }

    /// The handler, answering `method` only.
    fn handler(self, method: &Method) -> MethodRouter<Shared> {
        let filter = MethodFilter::try_from(method.clone())
            .unwrap_or_else(|_| panic!("{method} is not a routable method"));
        match self {
            Endpoint::Health => on(filter, health),
            Endpoint::ListConnections => on(filter, list),
            Endpoint::AddConnection => on(filter, add),
            Endpoint::ShowConnection => on(filter, show),
            Endpoint::RemoveConnection => on(filter, remove),
            Endpoint::RefreshConnection => on(filter, refresh),
            Endpoint::ConnectionToken => on(filter, connection_token),
            Endpoint::ConnectionEvents => on(filter, events),
            Endpoint::SiteToken => on(filter, site_token),
            Endpoint::Authorize => on(filter, authorize),
        }
    }
}

/// One route of the socket API.
#[derive(Clone, Debug)]
pub(crate) struct Route {
    /// The HTTP method.
    pub method: Method,
    /// The path template, as axum matches it; also the `route` label of the API metrics
    /// (a template, never a raw path, so label values stay bounded).
    pub template: &'static str,
    /// What answers it.
    pub endpoint: Endpoint,
}

/// Every route of the socket API: the router is built from this table, and the metrics'
/// `route` label values are its templates (plus [`crate::metrics::OTHER_ROUTE`]).
pub(crate) const ROUTES: &[Route] = &[
    Route {
        method: Method::GET,
        template: "/v1/health",
        endpoint: Endpoint::Health,
    },
    Route {
        method: Method::GET,
        template: "/v1/connections",
        endpoint: Endpoint::ListConnections,
    },
    Route {
        method: Method::POST,
        template: "/v1/connections",
        endpoint: Endpoint::AddConnection,
    },
    Route {
        method: Method::GET,
        template: "/v1/connections/{id}",
        endpoint: Endpoint::ShowConnection,
    },
    Route {
        method: Method::DELETE,
        template: "/v1/connections/{id}",
        endpoint: Endpoint::RemoveConnection,
    },
    Route {
        method: Method::POST,
        template: "/v1/connections/{id}/refresh",
        endpoint: Endpoint::RefreshConnection,
    },
    Route {
        method: Method::GET,
        template: "/v1/connections/{id}/token",
        endpoint: Endpoint::ConnectionToken,
    },
    Route {
        method: Method::GET,
        template: "/v1/connections/{id}/events",
        endpoint: Endpoint::ConnectionEvents,
    },
    Route {
        method: Method::GET,
        template: "/v1/token",
        endpoint: Endpoint::SiteToken,
    },
    Route {
        method: Method::POST,
        template: "/v1/authorizations",
        endpoint: Endpoint::Authorize,
    },
];

/// The distinct templates of [`ROUTES`], in table order: the `route` label values.
pub(crate) fn route_templates() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for r in ROUTES {
        if !out.contains(&r.template) {
            out.push(r.template);
        }
    }
    out
}

/// The `route` label of a matched template: the table's own `&'static str`, else
/// [`crate::metrics::OTHER_ROUTE`].
fn route_label(matched: Option<&str>) -> &'static str {
    ROUTES
        .iter()
        .find(|r| Some(r.template) == matched)
        .map_or(crate::metrics::OTHER_ROUTE, |r| r.template)
}

/// The socket API as the accept loop serves it ([`crate::serve::App`]): the two token
/// routes answered at once, everything else by the [`router`].
///
/// A cached token is the request services make most, and on it axum's routing was most of
/// what tokend adds over a bare HTTP server: a route match, a boxed clone of the route's
/// service, the matched template and the path parameters in request extensions (a small
/// map allocated per request), extractors that copy the id and the query. So
/// `GET /v1/connections/{id}/token` and `GET /v1/token` are recognised here by their
/// paths and go straight to the same handler code the router runs
/// ([`connection_token_of`], [`site_token_of`]), counted and timed under the same route
/// series. Whatever this does not recognise exactly (another method, an id with a `%`
/// escape or a `/`, a path without a peer) goes to the router, which answers it as
/// before: the answers are the same either way (tested).
#[derive(Clone)]
pub(crate) struct Api {
    /// Shared by every connection: one reference count per request.
    inner: Arc<ApiInner>,
}

/// What [`Api`] holds.
struct ApiInner {
    /// Every route but the two token routes' usual requests.
    router: Router,
    /// The handlers' state, as the router hands it to them.
    state: Shared,
    /// `GET /v1/connections/{id}/token`'s series.
    connection_token: crate::metrics::ApiRoute,
    /// `GET /v1/token`'s series.
    site_token: crate::metrics::ApiRoute,
}

/// A request [`Api`] answers without the router.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direct<'a> {
    /// `GET /v1/connections/{id}/token` with an id that needs no decoding.
    ConnectionToken(&'a str),
    /// `GET /v1/token`.
    SiteToken,
}

impl<'a> Direct<'a> {
    /// The direct route of a request, if it has one: only `GET`, only the exact paths, and
    /// only an id the router would hand its handler unchanged (no percent escape to decode,
    /// not empty, one path segment).
    fn of(method: &Method, path: &'a str) -> Option<Direct<'a>> {
        if method != Method::GET {
            return None;
        }
        if path == "/v1/token" {
            return Some(Direct::SiteToken);
        }
        let id = path
            .strip_prefix("/v1/connections/")?
            .strip_suffix("/token")?;
        (!id.is_empty() && !id.contains(['/', '%'])).then_some(Direct::ConnectionToken(id))
    }
}

/// The socket API: the [`router`] behind the direct token routes (see [`Api`]).
pub(crate) fn app(state: ApiState) -> Api {
    let state = Arc::new(state);
    let (router, routes) = router_of(state.clone());
    // The router's own series of the two templates, resolved here once.
    let connection_token = routes
        .of(Some(template_of(Endpoint::ConnectionToken)))
        .clone();
    let site_token = routes.of(Some(template_of(Endpoint::SiteToken))).clone();
    Api {
        inner: Arc::new(ApiInner {
            router,
            state,
            connection_token,
            site_token,
        }),
    }
}

/// The template of `endpoint`'s route in [`ROUTES`].
fn template_of(endpoint: Endpoint) -> &'static str {
    ROUTES
        .iter()
        .find(|r| r.endpoint == endpoint)
        .map(|r| r.template)
        .expect("every endpoint has a route")
}

impl crate::serve::App for Api {
    fn answer(
        &self,
        req: axum::extract::Request,
        peer: Option<Peer>,
    ) -> impl std::future::Future<Output = Response> + Send + 'static + use<> {
        let inner = self.inner.clone();
        async move {
            let direct = peer.and_then(|peer| {
                Direct::of(req.method(), req.uri().path()).map(|route| (peer, route))
            });
            let Some((peer, route)) = direct else {
                return crate::serve::App::answer(&inner.router, req, peer).await;
            };
            let started = tokio::time::Instant::now();
            let query = req.uri().query();
            let (result, series) = match route {
                Direct::ConnectionToken(id) => (
                    connection_token_of(&inner.state, peer, id, query).await,
                    &inner.connection_token,
                ),
                Direct::SiteToken => (
                    site_token_of(&inner.state, peer, query).await,
                    &inner.site_token,
                ),
            };
            let resp = standard_errors(result.into_response());
            series.record(resp.status().as_u16(), started.elapsed());
            resp
        }
    }
}

/// The router, built from [`ROUTES`]. Requests must carry a [`Peer`] extension (the server
/// inserts it). The daemon serves it behind [`app`]'s direct routes; the tests drive it
/// alone too, to hold the two to the same answers.
#[cfg(test)]
pub(crate) fn router(state: ApiState) -> Router {
    router_of(Arc::new(state)).0
}

/// [`router`] over state already shared, with the series it counts each route under.
fn router_of(state: Shared) -> (Router, Arc<RouteSeries>) {
    let templates = route_templates();
    state.metrics.declare_api_routes(&templates);
    let routes = Arc::new(RouteSeries {
        by_template: templates
            .iter()
            .map(|t| (*t, state.metrics.api_route(t)))
            .collect(),
        other: state.metrics.api_route(crate::metrics::OTHER_ROUTE),
    });
    let finish = Finish {
        routes: routes.clone(),
    };
    let mut router = Router::new();
    for r in ROUTES {
        router = router.route(r.template, r.endpoint.handler(&r.method));
    }
    let router = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(finish)
        .with_state(state);
    (router, routes)
}

/// The metrics series of every route label, resolved once when the router is built.
struct RouteSeries {
    /// Each template of [`ROUTES`] with its series.
    by_template: Vec<(&'static str, crate::metrics::ApiRoute)>,
    /// [`crate::metrics::OTHER_ROUTE`]'s series: a request no template matched.
    other: crate::metrics::ApiRoute,
}

impl RouteSeries {
    /// The series of the label [`route_label`] gives a matched template: a scan of the few
    /// templates, no hashing, no lock.
    fn of(&self, matched: Option<&str>) -> &crate::metrics::ApiRoute {
        let label = route_label(matched);
        self.by_template
            .iter()
            .find(|(t, _)| *t == label)
            .map_or(&self.other, |(_, series)| series)
    }
}

/// The last step of every route: one layer doing what two middleware functions did, without
/// a copy of the state or a boxed clone of the rest of the stack per request. It turns an
/// error response that is not already ours into the standard shape ([`standard_errors`]),
/// then counts and times the request under its route template (bounded label values).
#[derive(Clone)]
struct Finish {
    /// Every route's series.
    routes: Arc<RouteSeries>,
}

impl<S> tower::Layer<S> for Finish {
    type Service = FinishService<S>;

    fn layer(&self, inner: S) -> FinishService<S> {
        FinishService {
            inner,
            routes: self.routes.clone(),
        }
    }
}

/// [`Finish`] around one route.
#[derive(Clone)]
struct FinishService<S> {
    /// The route (or fallback) it finishes.
    inner: S,
    /// Every route's series (shared by all routes).
    routes: Arc<RouteSeries>,
}

impl<S> tower::Service<axum::extract::Request> for FinishService<S>
where
    S: tower::Service<axum::extract::Request, Response = Response, Error = Infallible>,
    S::Future: Unpin,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Finishing<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: axum::extract::Request) -> Self::Future {
        let matched = req.extensions().get::<axum::extract::MatchedPath>();
        let series = self.routes.of(matched.map(|m| m.as_str())).clone();
        Finishing {
            started: tokio::time::Instant::now(),
            answer: self.inner.call(req),
            series,
        }
    }
}

/// A request [`FinishService`] is finishing: the route's answer, then the error shaping and
/// the metrics. A plain struct (the route's future is `Unpin`), so that finishing a request
/// costs no allocation of its own.
struct Finishing<F> {
    /// When the request reached the route.
    started: tokio::time::Instant,
    /// The route's answer.
    answer: F,
    /// The route's metrics series.
    series: crate::metrics::ApiRoute,
}

impl<F> std::future::Future for Finishing<F>
where
    F: std::future::Future<Output = Result<Response, Infallible>> + Unpin,
{
    type Output = Result<Response, Infallible>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let resp = match std::pin::Pin::new(&mut self.answer).poll(cx) {
            std::task::Poll::Ready(Ok(resp)) => standard_errors(resp),
            std::task::Poll::Pending => return std::task::Poll::Pending,
        };
        self.series
            .record(resp.status().as_u16(), self.started.elapsed());
        std::task::Poll::Ready(Ok(resp))
    }
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::bad_request(format!("{method} is not allowed on {}", uri.path()))
}

/// Turns an error response that is not already ours (an extractor rejection, a body-limit
/// hit) into the standard shape, without its original text (which could echo input).
fn standard_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return resp;
    }
    let err = match status {
        StatusCode::PAYLOAD_TOO_LARGE => payload_too_large(),
        StatusCode::NOT_FOUND => ApiError::not_found("not found"),
        s if s.is_server_error() => ApiError::internal("internal error"),
        _ => ApiError::bad_request("malformed request"),
    };
    err.into_response()
}

fn payload_too_large() -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("request bodies are limited to {MAX_BODY} bytes"),
    )
}

/// An admin peer: the extractor of every admin route. It is a request-*parts* extractor, and
/// axum runs those before the body extractor, so a peer that is not an admin is answered
/// 403 at once and its body never read: it cannot hold a connection by sending one slowly.
pub(crate) struct Admin;

impl FromRequestParts<Shared> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<Peer>()
            .copied()
            .ok_or_else(|| ApiError::internal("the peer's credentials are unknown"))?;
        require_admin(state, peer)?;
        Ok(Admin)
    }
}

fn require_admin(state: &Shared, peer: Peer) -> Result<(), ApiError> {
    if state.policy().is_admin(peer) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "uid {} is not an admin of this tokend (see access.admin_uids / admin_gids)",
            peer.uid
        )))
    }
}

fn site_wire(engine: &Engine, s: &Site) -> wire::Site {
    wire::Site {
        cloud_id: s.cloud_id.to_string(),
        url: s.url.to_string(),
        name: s.name.to_string(),
        scopes: s.scopes.to_vec(),
        api_base_urls: s
            .products()
            .into_iter()
            .map(|p| (p.to_owned(), engine.api_base_url(p, &s.cloud_id)))
            .collect(),
        last_seen_at: s.last_seen_at,
    }
}

fn sites_wire(engine: &Engine, sites: &[Site]) -> Vec<wire::Site> {
    sites.iter().map(|s| site_wire(engine, s)).collect()
}

fn connection_wire(engine: &Engine, info: &ConnectionInfo) -> wire::Connection {
    let c = &info.conn;
    wire::Connection {
        id: c.id.clone(),
        label: c.label.clone(),
        provider: c.provider.to_string(),
        account_id: c.account_id.clone(),
        status: c.status,
        scopes: c.scopes.to_vec(),
        sites: sites_wire(engine, &c.sites),
        access_token_expires_at: info.access_token_expires_at,
        refresh_token_rotated_at: info.refresh_token_rotated_at,
        next_rotation_at: info.next_rotation_at,
        inactivity_expires_at: info.inactivity_expires_at,
        absolute_expires_at: info.absolute_expires_at,
        last_refresh_at: c.last_refresh_at,
        last_error: c.last_error.as_ref().map(|e| wire::LastError {
            code: e.code.clone(),
            message: e.message.clone(),
            at: e.at,
        }),
        consecutive_failures: c.consecutive_failures,
        created_at: c.created_at,
        updated_at: c.updated_at,
        claim: None,
    }
}

/// The seconds a token has left at `now` (`expires_in`).
fn expires_in(g: &TokenGrant, now: chrono::DateTime<Utc>) -> i64 {
    (g.expires_at - now).num_seconds().max(0)
}

/// The `Token` answer as a [`wire::Token`]: what [`token_body`] must write (the tests hold
/// it to that).
#[cfg(test)]
fn token_wire(engine: &Engine, g: &TokenGrant, now: chrono::DateTime<Utc>) -> wire::Token {
    wire::Token {
        connection_id: g.face.id.clone(),
        access_token: crate::secret::Secret::clone(&g.access_token),
        token_type: wire::BEARER.to_owned(),
        expires_at: g.expires_at,
        expires_in: expires_in(g, now),
        scopes: g.face.scopes.to_vec(),
        sites: sites_wire(engine, &g.face.sites),
    }
}

/// The `Token` answer's body, written without building a [`wire::Token`]: the
/// connection's scopes and sites (with their API base URLs) are rendered once per change of
/// the connection ([`crate::refresh::Face`]) and shared by every answer after it; only the
/// token and its times are written per request. (The base URLs come from the engine's
/// provider, which an engine keeps for its lifetime, so a rendering never goes stale.)
fn token_body(engine: &Engine, g: &TokenGrant, now: chrono::DateTime<Utc>) -> Vec<u8> {
    let face = &g.face;
    let tail = face
        .rendered
        .get_or_init(|| wire::token_tail(&face.scopes, &sites_wire(engine, &face.sites)));
    wire::token_json(
        &face.id,
        &g.access_token,
        &g.expires_at,
        expires_in(g, now),
        tail,
    )
}

fn ok_json(status: StatusCode, v: impl Serialize) -> Response {
    (status, axum::Json(v)).into_response()
}

async fn health(State(state): State<Shared>) -> Response {
    let ledger = tokio::time::timeout(HEALTH_PROBE_TIMEOUT, state.engine.store_writable()).await;
    let (active, needs_reauth) = state.engine.status_counts();
    let (mut status, ledger_state) = match ledger {
        Ok(Ok(())) => (wire::HealthStatus::Ok, "writable".to_owned()),
        Ok(Err(e)) => (wire::HealthStatus::Degraded, format!("not writable: {e}")),
        Err(_) => (
            wire::HealthStatus::Degraded,
            "not writable: the write probe timed out".to_owned(),
        ),
    };
    let scheduler_alive = state.engine.scheduler_alive();
    let stalled = state.jobs.stalled();
    let pending = state.engine.commit_pending();
    if !scheduler_alive || !stalled.is_empty() || pending > 0 {
        status = wire::HealthStatus::Degraded;
    }
    let body = wire::Health {
        status,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ledger: ledger_state,
        scheduler: if scheduler_alive {
            wire::SchedulerState::Alive
        } else {
            wire::SchedulerState::Stalled
        },
        stalled_jobs: stalled.iter().map(|j| j.to_string()).collect(),
        connections: wire::ConnectionCounts {
            active,
            needs_reauth,
        },
        provider_configured: state.engine.provider_not_configured().is_none(),
        commits_pending: pending,
    };
    let code = if status == wire::HealthStatus::Ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    ok_json(code, body)
}

/// The most connections one page of `GET /v1/connections?limit=` may ask for.
pub(crate) const CONNECTIONS_MAX_LIMIT: usize = 1000;

/// An unpaged `GET /v1/connections` is serialized and sent this many connections at a time,
/// so that the daemon never holds the whole JSON (100 MB at 100,000 connections).
const LIST_CHUNK: usize = 256;

/// `GET /v1/connections[?limit=N][&after=LABEL]`: every connection in label order, as
/// always, or one page of at most `limit` after the label `after` (exclusive). A page with
/// more behind it carries `Link: </v1/connections?limit=N&after=LAST>; rel="next"`: the body
/// stays the `[Connection]` array INTERFACE.md fixes.
async fn list(State(state): State<Shared>, RawQuery(query): RawQuery) -> ApiResult {
    let (mut limit, mut after) = (None, None);
    for_each_param(query.as_deref(), |k, v| {
        match k {
            "limit" => {
                limit = Some(
                    v.trim()
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=CONNECTIONS_MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            ApiError::bad_request(format!("limit is 1 to {CONNECTIONS_MAX_LIMIT}"))
                        })?,
                );
            }
            "after" => {
                if v.is_empty() {
                    return Err(ApiError::bad_request(
                        "after is the label of the last connection of the previous page",
                    ));
                }
                after = Some(v.into_owned());
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    let engine = state.engine.clone();
    let Some(limit) = limit else {
        return Ok(list_streamed(engine, after));
    };
    let page = engine.list_page(after.as_deref(), Some(limit));
    let body: Vec<wire::Connection> = page
        .items
        .iter()
        .map(|c| connection_wire(&engine, c))
        .collect();
    let mut resp = ok_json(StatusCode::OK, body);
    if let Some(last) = page.next {
        let after: String = url::form_urlencoded::byte_serialize(last.as_bytes()).collect();
        let link = format!("</v1/connections?limit={limit}&after={after}>; rel=\"next\"");
        // Percent-encoded: always a valid header value.
        if let Ok(value) = HeaderValue::from_str(&link) {
            resp.headers_mut().insert(header::LINK, value);
        }
    }
    Ok(resp)
}

/// Every connection after `after` as one JSON array, serialized [`LIST_CHUNK`] connections
/// at a time as the body is sent. Each chunk is read from the label-ordered index where the
/// last one ended: a connection added, removed or relabelled meanwhile may or may not be
/// in the answer, as with pages.
fn list_streamed(engine: Arc<Engine>, after: Option<String>) -> Response {
    /// Where the answer is: the label to continue after, whether the array was opened and
    /// whether an element was written.
    struct At {
        after: Option<String>,
        opened: bool,
        wrote: bool,
    }
    let start = At {
        after,
        opened: false,
        wrote: false,
    };
    let chunks = futures_util::stream::unfold(Some(start), move |at| {
        let engine = engine.clone();
        async move {
            let At {
                after,
                opened,
                mut wrote,
            } = at?;
            let page = engine.list_page(after.as_deref(), Some(LIST_CHUNK));
            let mut buf = Vec::with_capacity(page.items.len() * 1024 + 2);
            if !opened {
                buf.push(b'[');
            }
            for info in &page.items {
                if wrote {
                    buf.push(b',');
                }
                if let Err(e) = serde_json::to_writer(&mut buf, &connection_wire(&engine, info)) {
                    return Some((Err(std::io::Error::other(e)), None));
                }
                wrote = true;
            }
            let rest = match page.next {
                Some(next) => Some(At {
                    after: Some(next),
                    opened: true,
                    wrote,
                }),
                None => {
                    buf.push(b']');
                    None
                }
            };
            Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), rest))
        }
    });
    let mut resp = Response::new(Body::from_stream(chunks));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

async fn show(State(state): State<Shared>, Path(id): Path<String>) -> ApiResult {
    let info = state
        .engine
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("no connection {id:?}")))?;
    let mut body = connection_wire(&state.engine, &info);
    body.claim = state
        .engine
        .claim_holder(&info.conn.id)
        .await
        .map(|c| wire::Claim {
            node: c.holder,
            until: c.until,
        });
    Ok(ok_json(StatusCode::OK, body))
}

/// Reads and parses a JSON body, with messages that never quote it. The content type and a
/// declared length over [`MAX_BODY`] are checked before anything is read; the read itself
/// ends at [`MAX_BODY`] bytes and at the server's body deadline
/// ([`server::BODY_READ_TIMEOUT`]).
async fn read_json<T: for<'de> Deserialize<'de>>(
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::bad_request(
            "the body must be JSON with Content-Type: application/json",
        ));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(payload_too_large());
    }
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|e| body_error(&e))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(format!(
            "the body is not valid JSON for this route ({:?} error at line {} column {}; expected fields are documented in INTERFACE.md)",
            e.classify(),
            e.line(),
            e.column()
        ))
    })
}

/// The answer to a body that could not be read: too slow, too long, or cut off.
fn body_error(e: &(dyn std::error::Error + 'static)) -> ApiError {
    if let Some(t) = find_cause::<server::BodyTimedOut>(e) {
        return ApiError::bad_request(t.to_string());
    }
    if find_cause::<http_body_util::LengthLimitError>(e).is_some() {
        return payload_too_large();
    }
    ApiError::bad_request("the request body could not be read")
}

/// The first error of type `E` in `e`'s chain of sources.
fn find_cause<'a, E: std::error::Error + 'static>(
    mut e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    loop {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        e = e.source()?;
    }
}

/// Only Atlassian is known today.
fn known_provider(provider: &str) -> Result<(), ApiError> {
    if provider == crate::model::PROVIDER_ATLASSIAN {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "unknown provider: only \"atlassian\" is supported",
        ))
    }
}

async fn add(State(state): State<Shared>, _: Admin, headers: HeaderMap, body: Body) -> ApiResult {
    let req: wire::NewConnection = read_json(&headers, body).await?;
    known_provider(&req.provider)?;
    let added = match (req.refresh_token, req.code, req.state) {
        (Some(rt), None, None) => state.engine.import(&req.label, rt).await?,
        (None, Some(code), Some(st)) => state.engine.connect(&req.label, code, &st).await?,
        _ => {
            return Err(ApiError::bad_request(
                "give either refresh_token, or code and state",
            ));
        }
    };
    let status = if added.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(ok_json(status, connection_wire(&state.engine, &added.info)))
}

async fn remove(State(state): State<Shared>, _: Admin, Path(id): Path<String>) -> ApiResult {
    state.engine.remove(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn refresh(State(state): State<Shared>, _: Admin, Path(id): Path<String>) -> ApiResult {
    let info = state.engine.refresh_now(&id).await?;
    Ok(ok_json(
        StatusCode::OK,
        connection_wire(&state.engine, &info),
    ))
}

async fn authorize(
    State(state): State<Shared>,
    _: Admin,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let req: wire::NewAuthorization = read_json(&headers, body).await?;
    known_provider(&req.provider)?;
    let a = state.engine.authorize()?;
    Ok(ok_json(
        StatusCode::OK,
        wire::Authorization {
            authorize_url: a.authorize_url,
            state: a.state,
            redirect_uri: a.redirect_uri,
        },
    ))
}

/// Walks a query string's parameters: `take` returns `Ok(false)` for a name it does not
/// know, which is refused with the name (shortened), never its value.
fn for_each_param(
    raw: Option<&str>,
    mut take: impl FnMut(&str, std::borrow::Cow<'_, str>) -> Result<bool, ApiError>,
) -> Result<(), ApiError> {
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        if !take(k.as_ref(), v)? {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {:?}",
                k.chars().take(40).collect::<String>()
            )));
        }
    }
    Ok(())
}

/// Parses the query string: `min_valid` (seconds) and optionally `site`.
fn parse_query(
    raw: Option<&str>,
    default_min_valid: Duration,
) -> Result<(Duration, Option<String>), ApiError> {
    let mut min_valid = default_min_valid;
    let mut site = None;
    for_each_param(raw, |k, v| {
        match k {
            "min_valid" => {
                let secs: u64 = v.trim().parse().map_err(|_| {
                    ApiError::bad_request("min_valid must be a whole number of seconds")
                })?;
                min_valid = Duration::from_secs(secs.min(366 * 86_400));
            }
            "site" => site = Some(v.into_owned()),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok((min_valid, site))
}

/// Events returned when `limit` is not given, and the most one request may ask for.
const EVENTS_DEFAULT_LIMIT: usize = 100;
const EVENTS_MAX_LIMIT: usize = 1000;

async fn events(
    State(state): State<Shared>,
    _: Admin,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult {
    let Some(Identity { id: conn_id, .. }) = state.engine.identity(&id) else {
        return Err(ApiError::not_found(format!("no connection {id:?}")));
    };
    let (mut since, mut limit) = (None, EVENTS_DEFAULT_LIMIT);
    for_each_param(query.as_deref(), |k, v| {
        match k {
            "since" => {
                let t = chrono::DateTime::parse_from_rfc3339(v.trim()).map_err(|_| {
                    ApiError::bad_request("since is an RFC 3339 time, e.g. 2026-01-02T03:04:05Z")
                })?;
                since = Some(t.with_timezone(&Utc));
            }
            "limit" => {
                limit = v
                    .trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=EVENTS_MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("limit is 1 to {EVENTS_MAX_LIMIT}"))
                    })?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    let list = state
        .audit
        .events(&conn_id, since, limit)
        .await
        .map_err(|e| ApiError::internal(format!("the ledger cannot be read: {e}")))?;
    let body: Vec<wire::Event> = list
        .into_iter()
        .map(|e| wire::Event {
            at: e.at,
            kind: e.kind,
            message: e.message,
            node: e.node,
            peer: e.peer.map(|p| wire::EventPeer {
                uid: p.uid,
                pid: p.pid,
            }),
            count: e.count,
        })
        .collect();
    Ok(ok_json(StatusCode::OK, body))
}

async fn connection_token(
    State(state): State<Shared>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult {
    connection_token_of(&state, peer, &id, query.as_deref()).await
}

/// `GET /v1/connections/{id}/token` for the connection `id` (already percent-decoded):
/// what the router's handler and [`Api`]'s own dispatch both answer with.
async fn connection_token_of(
    state: &Shared,
    peer: Peer,
    id: &str,
    query: Option<&str>,
) -> ApiResult {
    let (min_valid, site) = parse_query(query, state.engine.settings().access_token_margin)?;
    if site.is_some() {
        return Err(ApiError::bad_request("site is a parameter of /v1/token"));
    }
    let policy = state.policy();
    // One look-up finds the connection, checks the peer against it and reads its token.
    let result = state
        .engine
        .token_for(id, min_valid, |conn_id, label| {
            policy.may_read(peer, conn_id, label)
        })
        .await;
    answer_handed(
        state,
        peer,
        Endpoint::ConnectionToken,
        result,
        || format!("no connection {id:?}"),
        |who| format!("uid {} may not read the tokens of {}", peer.uid, who.label),
    )
}

/// The answer to a [`Engine::token_for`] look-up: a missing connection is a 404 with
/// `not_found`'s message, a refused peer an audited 403 with `forbidden`'s, anything else
/// what [`answer_token`] makes of it.
fn answer_handed(
    state: &Shared,
    peer: Peer,
    endpoint: Endpoint,
    result: Result<TokenGrant, NotHanded>,
    not_found: impl FnOnce() -> String,
    forbidden: impl FnOnce(&Identity) -> String,
) -> ApiResult {
    match result {
        Ok(grant) => answer_token(state, peer, endpoint, Ok(grant)),
        Err(NotHanded::Failed(Failure::NotFound)) => {
            state.metrics.token_request(TokenOutcome::NotFound);
            Err(ApiError::not_found(not_found()))
        }
        Err(NotHanded::Failed(f)) => answer_token(state, peer, endpoint, Err(f)),
        Err(NotHanded::Refused(who)) => {
            state.audit.record(
                &who.id,
                peer.uid,
                peer.pid,
                endpoint.name(),
                ReadOutcome::Refused,
            );
            state.metrics.token_request(TokenOutcome::Forbidden);
            Err(ApiError::forbidden(forbidden(&who)))
        }
    }
}

async fn site_token(
    State(state): State<Shared>,
    Extension(peer): Extension<Peer>,
    RawQuery(query): RawQuery,
) -> ApiResult {
    site_token_of(&state, peer, query.as_deref()).await
}

/// `GET /v1/token?site=`: what the router's handler and [`Api`]'s own dispatch both answer
/// with.
async fn site_token_of(state: &Shared, peer: Peer, query: Option<&str>) -> ApiResult {
    let (min_valid, site) = parse_query(query, state.engine.settings().access_token_margin)?;
    let site = site
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| ApiError::bad_request("give ?site=HOST_OR_CLOUD_ID"))?;
    let policy = state.policy();
    // The usual case, one connection reaches the site: one look-up finds it, checks the
    // peer against it and reads its token, as for a request by id.
    let may_read = |conn_id: &str, label: &str| policy.may_read(peer, conn_id, label);
    let mut found = state
        .engine
        .token_for_site(&site, min_valid, may_read)
        .await;
    if matches!(&found, ForSite::NotOne(none) if none.is_empty()) {
        // Maybe a site added since the last resolution: re-resolve (at most once per
        // connection per minute) and look again.
        // Only connections this peer may read are re-resolved, and it waits at most one
        // request timeout.
        let wait = state.engine.settings().request_timeout;
        state.engine.site_miss(peer.uid, may_read, wait).await;
        found = state
            .engine
            .token_for_site(&site, min_valid, may_read)
            .await;
    }
    let candidates = match found {
        ForSite::NotOne(candidates) => candidates,
        ForSite::Handed(result) => {
            // A 404 when it was removed since it was found.
            return answer_handed(
                state,
                peer,
                Endpoint::SiteToken,
                result,
                || format!("no active connection reaches {site:?}"),
                |_| {
                    format!(
                        "uid {} may not read the tokens of the connection reaching {site:?}",
                        peer.uid
                    )
                },
            );
        }
    };
    let readable: Vec<String> = candidates
        .iter()
        .filter(|id| {
            state
                .engine
                .identity(id)
                .is_some_and(|who| policy.may_read(peer, &who.id, &who.label))
        })
        .cloned()
        .collect();
    let metrics = &state.metrics;
    match (candidates.len(), readable.as_slice()) {
        (0, _) => {
            metrics.token_request(TokenOutcome::NotFound);
            Err(ApiError::not_found(format!(
                "no active connection reaches {site:?}"
            )))
        }
        (_, []) => {
            for id in &candidates {
                state.audit.record(
                    id,
                    peer.uid,
                    peer.pid,
                    Endpoint::SiteToken.name(),
                    ReadOutcome::Refused,
                );
            }
            metrics.token_request(TokenOutcome::Forbidden);
            Err(ApiError::forbidden(format!(
                "uid {} may not read the tokens of the connection reaching {site:?}",
                peer.uid
            )))
        }
        (_, [one]) => hand_out(state, peer, Endpoint::SiteToken, one, min_valid).await,
        (_, many) => Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "several connections reach {site:?} ({}); ask for one by id",
                many.join(", ")
            ),
        )),
    }
}

async fn hand_out(
    state: &Shared,
    peer: Peer,
    endpoint: Endpoint,
    id: &str,
    min_valid: Duration,
) -> ApiResult {
    let result = state.engine.token(id, min_valid).await;
    answer_token(state, peer, endpoint, result)
}

/// The answer to a token request the engine has decided: audited (a served read), counted
/// by outcome, and the token (`Cache-Control: no-store`) or the error.
fn answer_token(
    state: &Shared,
    peer: Peer,
    endpoint: Endpoint,
    result: Result<TokenGrant, Failure>,
) -> ApiResult {
    if let Ok(grant) = &result {
        state.audit.record(
            &grant.face.id,
            peer.uid,
            peer.pid,
            endpoint.name(),
            ReadOutcome::Served,
        );
    }
    let outcome = match &result {
        Ok(g) if g.served == Served::Cached => TokenOutcome::Cached,
        Ok(_) => TokenOutcome::Refreshed,
        Err(Failure::NotFound) => TokenOutcome::NotFound,
        Err(Failure::NeedsReauth(_)) => TokenOutcome::NeedsReauth,
        Err(_) => TokenOutcome::Unavailable,
    };
    state.metrics.token_request(outcome);
    let grant = result?;
    let body = token_body(&state.engine, &grant, Utc::now());
    let mut resp = Response::new(Body::from(body));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClientAccess;

    fn policy(clients: Vec<ClientAccess>) -> AccessPolicy {
        AccessPolicy {
            own_uid: 500,
            config: AccessConfig {
                admin_uids: vec![700],
                admin_gids: vec![800],
                clients,
            },
        }
    }

    #[test]
    fn admins_are_root_self_and_listed() {
        let p = policy(vec![]);
        for (uid, gid, admin) in [
            (0, 1, true),
            (500, 1, true),
            (700, 1, true),
            (1, 800, true),
            (1001, 1001, false),
        ] {
            assert_eq!(
                p.is_admin(Peer {
                    uid,
                    gid,
                    pid: None
                }),
                admin,
                "{uid}/{gid}"
            );
        }
    }

    #[test]
    fn client_lists_restrict_token_reads() {
        let open = policy(vec![]);
        assert!(open.may_read(
            Peer {
                uid: 1001,
                gid: 1001,
                pid: None
            },
            "c1",
            "conf"
        ));
        let p = policy(vec![ClientAccess {
            uid: Some(1001),
            gid: None,
            connections: vec!["conf".into()],
        }]);
        assert!(p.may_read(
            Peer {
                uid: 1001,
                gid: 5,
                pid: None
            },
            "c1",
            "conf"
        ));
        assert!(!p.may_read(
            Peer {
                uid: 1001,
                gid: 5,
                pid: None
            },
            "c2",
            "jira"
        ));
        assert!(!p.may_read(
            Peer {
                uid: 1002,
                gid: 5,
                pid: None
            },
            "c1",
            "conf"
        ));
        assert!(p.may_read(
            Peer {
                uid: 0,
                gid: 0,
                pid: None
            },
            "c2",
            "jira"
        ));
    }

    struct NoneStalled;
    impl JobsView for NoneStalled {
        fn stalled(&self) -> Vec<&'static str> {
            Vec::new()
        }
    }

    /// The API's state over `ledger` (loaded as it is), the default config, and `access`.
    async fn test_state(
        ledger: crate::ledger::Ledger,
        access: impl FnOnce(&crate::config::Config) -> AccessPolicy,
    ) -> ApiState {
        let config = crate::config::Config::parse(
            "",
            std::path::Path::new("/etc/tokend/daemon.toml"),
            &|_| None,
            &|_| Err(std::io::Error::other("none")),
        )
        .unwrap();
        let metrics = Arc::new(Metrics::new(true));
        let provider = crate::provider::Atlassian::new(
            config.providers.atlassian.clone(),
            Duration::from_secs(1),
        )
        .unwrap();
        let engine = Engine::load(
            Arc::new(ledger.clone()),
            Arc::new(provider),
            Arc::new(crate::refresh::SystemClock),
            config.refresh,
            crate::notify::Notifier::disabled(),
            metrics.clone(),
        )
        .await
        .unwrap();
        ApiState {
            engine,
            metrics: metrics.clone(),
            jobs: Arc::new(NoneStalled),
            access: Arc::new(RwLock::new(Arc::new(access(&config)))),
            audit: crate::audit::Audit::new(ledger, metrics),
        }
    }

    /// The API's state over an empty ledger in a temp dir, with the default configuration
    /// and access policy (owner uid 0).
    async fn empty_state() -> (ApiState, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let ledger = crate::ledger::Ledger::open(dir.path(), &Default::default()).unwrap();
        let state = test_state(ledger, |c| AccessPolicy {
            own_uid: 0,
            config: c.access.clone(),
        })
        .await;
        (state, dir)
    }

    /// An engine on an empty ledger in a temp dir, with the default configuration.
    async fn test_engine() -> (Arc<Engine>, tempfile::TempDir) {
        let (state, dir) = empty_state().await;
        (state.engine, dir)
    }

    /// Every (method, template) of [`ROUTES`] reaches its handler through the real router
    /// (neither the router's 404 nor its 405), and is counted under its own template, whose
    /// series exist from the start.
    #[tokio::test]
    async fn every_route_of_the_table_is_routed_and_counted_under_its_template() {
        use tower::ServiceExt;
        let (state, _dir) = empty_state().await;
        let metrics = state.metrics.clone();
        let app = router(state);
        let before = metrics.render();
        for r in ROUTES {
            let series = format!(
                "tokend_api_requests_total{{route=\"{}\",status=\"2xx\"}} 0",
                r.template
            );
            assert!(
                before.contains(&series),
                "no series before any request: {series}"
            );
        }
        for r in ROUTES {
            let path = r.template.replace("{id}", "unknown-connection");
            let req = axum::http::Request::builder()
                .method(r.method.clone())
                .uri(&path)
                .header("content-type", "application/json")
                .extension(Peer {
                    uid: 0,
                    gid: 0,
                    pid: None,
                })
                .body(Body::from("{}"))
                .unwrap();
            let resp = app.clone().oneshot(req).await.unwrap();
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            let text = String::from_utf8_lossy(&body);
            assert!(
                !text.contains("no route") && !text.contains("is not allowed on"),
                "{} {path} did not reach its handler: {status} {text}",
                r.method
            );
        }
        let after = metrics.render();
        for r in ROUTES {
            let count: f64 = after
                .lines()
                .filter(|l| {
                    l.starts_with("tokend_api_requests_total{")
                        && l.contains(&format!("route=\"{}\"", r.template))
                })
                .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
                .sum();
            let routes_here = ROUTES.iter().filter(|o| o.template == r.template).count();
            assert_eq!(
                count, routes_here as f64,
                "requests counted under {}",
                r.template
            );
        }
        assert!(
            !after.contains("unknown-connection"),
            "a raw path became a label"
        );
    }

    #[test]
    fn only_the_plain_token_requests_take_the_direct_route() {
        let get = Method::GET;
        for (method, path, want) in [
            (&get, "/v1/token", Some(Direct::SiteToken)),
            (
                &get,
                "/v1/connections/conf/token",
                Some(Direct::ConnectionToken("conf")),
            ),
            (
                &get,
                "/v1/connections/c0123456789ab/token",
                Some(Direct::ConnectionToken("c0123456789ab")),
            ),
            (&get, "/v1/connections/co%6Ef/token", None),
            (&get, "/v1/connections//token", None),
            (&get, "/v1/connections/a/b/token", None),
            (&get, "/v1/connections/conf/token/", None),
            (&get, "/v1/token/", None),
            (&get, "/v1/connections/conf", None),
            (&get, "/v1/connections/token", None),
            (&Method::HEAD, "/v1/token", None),
            (&Method::POST, "/v1/connections/conf/token", None),
        ] {
            assert_eq!(Direct::of(method, path), want, "{method} {path}");
        }
    }

    /// [`app`]'s direct token routes answer every request exactly as the router does (status,
    /// headers that matter, body but for `expires_in`, which may tick between the two), and
    /// count them under the same route series.
    #[tokio::test]
    async fn the_direct_token_routes_answer_as_the_router_does() {
        use crate::serve::App;
        let dir = tempfile::tempdir().unwrap();
        let ledger = crate::ledger::Ledger::open(dir.path(), &Default::default()).unwrap();
        // The ledger keeps milliseconds.
        let now = chrono::DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap();
        for (id, label, host) in [("c1", "conf", "acme"), ("c2", "jira", "other")] {
            let mut rec = crate::model::sample_record(id, label, &format!("rt-{id}"), now);
            rec.conn.sites.push(crate::model::Site {
                cloud_id: format!("cloud-{host}").into(),
                url: format!("https://{host}.atlassian.net").into(),
                name: host.into(),
                scopes: vec!["read:page:confluence".into()].into(),
                last_seen_at: now,
            });
            rec.chain.access = Some(crate::model::AccessToken {
                token: crate::secret::Secret::new(format!("at-{id}")),
                expires_at: now + chrono::Duration::hours(1),
            });
            ledger.insert(rec, Vec::new()).await.unwrap();
        }
        let state = test_state(ledger, |_| {
            policy(vec![ClientAccess {
                uid: Some(1001),
                gid: None,
                connections: vec!["conf".into()],
            }])
        })
        .await;
        let metrics = state.metrics.clone();
        let direct = app(state.clone());
        let routed = router(state);
        let client = Peer {
            uid: 1001,
            gid: 1001,
            pid: Some(4242),
        };
        let requests = [
            (Method::GET, "/v1/connections/conf/token", 200),
            (Method::GET, "/v1/connections/c1/token?min_valid=60", 200),
            (Method::GET, "/v1/connections/co%6Ef/token", 200),
            (Method::GET, "/v1/connections/jira/token", 403),
            (Method::GET, "/v1/connections/nope/token", 404),
            (Method::GET, "/v1/connections/conf/token?min_valid=abc", 400),
            (Method::GET, "/v1/connections/conf/token?site=acme", 400),
            (Method::GET, "/v1/connections/conf/token?bogus=1", 400),
            (Method::GET, "/v1/token?site=acme.atlassian.net", 200),
            (Method::GET, "/v1/token?site=cloud-acme&min_valid=5", 200),
            (Method::GET, "/v1/token?site=other.atlassian.net", 403),
            (Method::GET, "/v1/token", 400),
            (Method::GET, "/v1/token?site=%20", 400),
            (Method::HEAD, "/v1/connections/conf/token", 200),
        ];
        for (method, path, status) in &requests {
            let mut answers = Vec::new();
            for via_router in [false, true] {
                let req = axum::http::Request::builder()
                    .method(method.clone())
                    .uri(*path)
                    .body(Body::empty())
                    .unwrap();
                let resp = if via_router {
                    routed.answer(req, Some(client)).await
                } else {
                    direct.answer(req, Some(client)).await
                };
                let head = (
                    resp.status().as_u16(),
                    [
                        header::CONTENT_TYPE,
                        header::CACHE_CONTROL,
                        header::RETRY_AFTER,
                    ]
                    .map(|h| resp.headers().get(&h).cloned()),
                );
                let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                    .await
                    .unwrap();
                let mut json: serde_json::Value = if body.is_empty() {
                    serde_json::Value::Null
                } else {
                    serde_json::from_slice(&body).unwrap()
                };
                if let Some(o) = json.as_object_mut() {
                    o.remove("expires_in");
                }
                answers.push((head, json));
            }
            assert_eq!(answers[0], answers[1], "{method} {path}");
            assert_eq!(answers[0].0.0, *status, "{method} {path}: {:?}", answers[0]);
        }
        let text = metrics.render();
        for (template, answered) in [("/v1/connections/{id}/token", 2 * 9), ("/v1/token", 2 * 5)] {
            let count: f64 = text
                .lines()
                .filter(|l| {
                    l.starts_with("tokend_api_requests_total{")
                        && l.contains(&format!("route=\"{template}\""))
                })
                .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
                .sum();
            assert_eq!(count, answered as f64, "{template}");
        }
    }

    /// The token answer written without a `wire::Token` parses as one, equals the one built
    /// field by field, and is byte for byte its serde form; a second answer sharing the
    /// rendered connection fields says the same of a new token.
    #[tokio::test]
    async fn the_written_token_answer_is_the_wire_token() {
        let (engine, _dir) = test_engine().await;
        let now = Utc::now();
        let site = |cloud_id: &str, scopes: &[&str]| crate::model::Site {
            cloud_id: cloud_id.into(),
            url: format!("https://{cloud_id}.atlassian.net").into(),
            name: format!("Site \"{cloud_id}\"").into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            last_seen_at: now - chrono::Duration::days(1),
        };
        let face = Arc::new(crate::refresh::Face {
            id: "c0123456789ab".into(),
            scopes: vec!["offline_access".into(), "read:jira-work".into()].into(),
            sites: vec![
                site("acme", &["read:page:confluence"]),
                site("both", &["read:jira-work", "read:page:confluence"]),
                site("none", &[]),
            ],
            rendered: Default::default(),
        });
        for (token, expires_at) in [
            ("at-first", now + chrono::Duration::seconds(3599)),
            ("at-second\"\\", now - chrono::Duration::seconds(5)),
        ] {
            let grant = TokenGrant {
                face: face.clone(),
                access_token: Arc::new(crate::secret::Secret::new(token)),
                expires_at,
                served: Served::Cached,
            };
            let body = token_body(&engine, &grant, now);
            // The slow answer as the CLI reads it (the wire keeps times to the second).
            let slow = serde_json::to_string(&token_wire(&engine, &grant, now)).unwrap();
            let want: wire::Token = serde_json::from_str(&slow).unwrap();
            let got: wire::Token = serde_json::from_slice(&body).unwrap();
            assert_eq!(got.connection_id, want.connection_id);
            assert_eq!(got.access_token.expose(), want.access_token.expose());
            assert_eq!(got.token_type, want.token_type);
            assert_eq!(got.expires_at, want.expires_at);
            assert_eq!(got.expires_in, want.expires_in);
            assert_eq!(got.scopes, want.scopes);
            assert_eq!(got.sites, want.sites);
            assert_eq!(got.sites.len(), 3);
            assert_eq!(got.sites[1].api_base_urls.len(), 2, "{:?}", got.sites[1]);
            assert_eq!(String::from_utf8(body).unwrap(), slow);
        }
        assert!(
            face.rendered.get().is_some(),
            "the sites were rendered once"
        );
    }

    #[test]
    fn the_route_table_is_the_router_and_the_metric_labels() {
        assert_eq!(
            route_templates(),
            [
                "/v1/health",
                "/v1/connections",
                "/v1/connections/{id}",
                "/v1/connections/{id}/refresh",
                "/v1/connections/{id}/token",
                "/v1/connections/{id}/events",
                "/v1/token",
                "/v1/authorizations",
            ]
        );
        for r in ROUTES {
            assert_eq!(route_label(Some(r.template)), r.template);
            // Every (method, template) once.
            let same = ROUTES
                .iter()
                .filter(|o| o.method == r.method && o.template == r.template)
                .count();
            assert_eq!(same, 1, "{} {}", r.method, r.template);
        }
        assert_eq!(
            route_label(Some("/v1/connections/x")),
            crate::metrics::OTHER_ROUTE
        );
        assert_eq!(route_label(None), crate::metrics::OTHER_ROUTE);
    }

    #[test]
    fn query_parsing() {
        let d = Duration::from_secs(900);
        assert_eq!(parse_query(None, d).unwrap(), (d, None));
        assert_eq!(
            parse_query(Some("min_valid=60&site=acme.atlassian.net"), d).unwrap(),
            (Duration::from_secs(60), Some("acme.atlassian.net".into()))
        );
        assert!(parse_query(Some("min_valid=-1"), d).is_err());
        assert!(parse_query(Some("min_valid=abc"), d).is_err());
        assert!(parse_query(Some("bogus=1"), d).is_err());
    }
}

/// Property tests of the query parser: any query string is parsed or refused with a typed
/// `bad_request`, never a panic, and a refusal never quotes a value.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    const DEFAULT: Duration = Duration::from_secs(900);
    const MAX_MIN_VALID: Duration = Duration::from_secs(366 * 86_400);

    fn check(
        raw: Option<String>,
    ) -> Result<Result<(Duration, Option<String>), ApiError>, TestCaseError> {
        let result = parse_query(raw.as_deref(), DEFAULT);
        match &result {
            Ok((min_valid, _)) => prop_assert!(*min_valid <= MAX_MIN_VALID.max(DEFAULT)),
            Err(e) => {
                prop_assert_eq!(e.code.status(), StatusCode::BAD_REQUEST);
                prop_assert_eq!(e.code, ErrorCode::BadRequest);
                prop_assert!(
                    !e.message.is_empty() && e.message.len() < 300,
                    "{}",
                    e.message
                );
                prop_assert_eq!(e.retry_after, None);
            }
        }
        Ok(result)
    }

    fn encode(s: &str) -> String {
        url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
    }

    proptest! {
        #[test]
        fn arbitrary_query_strings(raw in prop::option::of("\\PC{0,200}")) {
            let _ = check(raw)?;
        }

        #[test]
        fn percent_escapes_and_separators(raw in "([a-z_]{0,10}|%[0-9A-Fa-f]{2}|%|[=&+;#?]){0,30}") {
            let _ = check(Some(raw))?;
        }

        /// Pairs of known and unknown keys: the first unknown key or bad `min_valid` is
        /// refused; otherwise the last `min_valid` (capped at 366 days) and `site` win.
        #[test]
        fn pairs_follow_the_rules(
            pairs in prop::collection::vec(
                (
                    prop_oneof![
                        3 => Just("min_valid".to_owned()),
                        3 => Just("site".to_owned()),
                        1 => "[a-zA-Z_]{1,50}",
                        1 => "\\PC{0,10}",
                    ],
                    prop_oneof![
                        any::<u64>().prop_map(|n| n.to_string()),
                        (0u64..100_000).prop_map(|n| format!(" {n} ")),
                        Just("-1".to_owned()),
                        Just(String::new()),
                        "rt-[A-Za-z0-9]{16}",
                        "\\PC{0,20}",
                    ],
                ),
                0..6,
            ),
        ) {
            let raw: Vec<String> = pairs
                .iter()
                .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
                .collect();
            let raw = raw.join("&");
            let result = check(Some(raw.clone()))?;

            let mut want_min = DEFAULT;
            let mut want_site = None;
            let mut want_err = false;
            for (k, v) in &pairs {
                match k.as_str() {
                    "min_valid" => match v.trim().parse::<u64>() {
                        Ok(n) => want_min = Duration::from_secs(n).min(MAX_MIN_VALID),
                        Err(_) => {
                            want_err = true;
                            break;
                        }
                    },
                    "site" => want_site = Some(v.clone()),
                    _ => {
                        want_err = true;
                        break;
                    }
                }
            }
            match result {
                Ok(got) => {
                    prop_assert!(!want_err, "{raw:?} accepted as {got:?}");
                    prop_assert_eq!(got, (want_min, want_site));
                }
                Err(e) => {
                    prop_assert!(want_err, "{raw:?}: {e:?}");
                    for (_, v) in &pairs {
                        if v.len() >= 8 {
                            prop_assert!(!e.message.contains(v.as_str()), "{} quotes {v:?}", e.message);
                        }
                    }
                }
            }
        }
    }
}
