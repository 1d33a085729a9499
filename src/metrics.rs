//! Prometheus metrics and the TCP probe endpoint (`daemon.metrics_listen`).
//!
//! This module owns every metric tokend exports (the names, types and labels of INTERFACE.md
//! "Metrics and probes", plus a few extras an SRE wants), their registry, and the small HTTP
//! server that serves `GET /metrics` (Prometheus text format 0.0.4), `GET /healthz`
//! (liveness) and `GET /readyz` (readiness, decided by a closure the daemon hands in).
//!
//! [`Metrics`] is created once at start and shared as `Arc<Metrics>`; it keeps its own
//! [`prometheus::Registry`] (not the crate's global default), so tests and several daemons in
//! one process never see each other's series. Every labelled counter is pre-initialised for
//! every value of its label (the API's `route` values once `api` declares its route table,
//! when the socket API is built), so `rate()` and `increase()` have a series from the first
//! scrape.
//!
//! **Architecture Invariant:** label values are connection ids, route templates, job names and
//! enum names, never tokens, labels chosen by users, or raw request paths: the set of series
//! is bounded by the number of connections (and that part can be switched off).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::future::BoxFuture;
use parking_lot::{Mutex, RwLock};
use prometheus::proto::MetricFamily;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder, register_gauge_vec_with_registry,
    register_histogram_vec_with_registry, register_histogram_with_registry,
    register_int_counter_vec_with_registry, register_int_counter_with_registry,
    register_int_gauge_with_registry,
};
use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;

pub use crate::serve::TimeoutPhase;

/// Buckets (seconds) for `tokend_api_request_duration_seconds`. A socket API request is
/// normally served from memory (a cached token) in tens of microseconds, so the buckets start
/// at 25 µs; requests that wait on a refresh or the ledger land in the millisecond buckets,
/// and the 1 s / 5 s / 30 s buckets catch requests that waited on a provider round trip (up to
/// `refresh.request_timeout`, 30 s by default). Prometheus' default buckets start at 5 ms and
/// would put every cached answer in the first bucket.
pub const API_LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 1.0, 5.0, 30.0,
];

/// Buckets (seconds) for provider round trips (`tokend_refresh_duration_seconds`). A refresh
/// is an HTTPS request to Atlassian plus a ledger commit: tens to hundreds of milliseconds when
/// healthy, seconds when the provider is slow, and bounded by `refresh.request_timeout` (30 s
/// by default; timed-out attempts fall into `+Inf`).
pub const PROVIDER_LATENCY_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// The `route` label of a socket API request that matched no route (404s, typos). The other
/// values are the API's route templates, which `api` declares
/// ([`Metrics::declare_api_routes`]) from its route table: a raw path would put connection
/// ids and whatever a client typed into label values.
pub const OTHER_ROUTE: &str = "other";

/// `status` label values of `tokend_api_requests_total` that exist from the start, so that
/// an error-ratio alert has both series before the first error.
const PREINITIALISED_STATUS_CLASSES: &[&str] = &["2xx", "4xx", "5xx"];

/// The `reason` of `tokend_api_connections_refused_total` when the peer's uid already held
/// `serve::MAX_CONNECTIONS_PER_UID` connections.
const REFUSED_UID_LIMIT: &str = "uid_limit";

/// The job name of the site re-resolution job (`[jobs] resolve_sites`).
pub const JOB_RESOLVE_SITES: &str = crate::model::JobKind::ResolveSites.name();

/// The job name of the maintenance job (`[jobs] maintenance`).
pub const JOB_MAINTENANCE: &str = crate::model::JobKind::Maintenance.name();

/// Jobs whose `tokend_job_last_success_timestamp_seconds` series exist from the start.
pub const KNOWN_JOBS: &[&str] = &[JOB_RESOLVE_SITES, JOB_MAINTENANCE];

/// The content type of `/metrics`: the Prometheus text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The content type of the probe answers.
const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

/// How long `/readyz` waits for the readiness check before answering 503. Probes (systemd
/// helpers, load balancers, Kubernetes) typically give up after 1–5 s; a check that hangs (a
/// locked ledger) must turn into "not ready", not into a hung probe.
pub const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

/// Open connections to the metrics port at once; more wait in the listen backlog. A scraper
/// and a probe or two need a handful; the bound keeps a flood from costing file descriptors.
pub const MAX_CONNECTIONS: usize = 64;

/// After `shutdown`, how long requests in progress on the metrics port may take to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How a refresh attempt ended (`tokend_refreshes_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefreshOutcome {
    /// The provider returned a new token set and it was committed.
    Success,
    /// The provider could not be reached, timed out, or asked to wait; the chain is unchanged
    /// and will be retried.
    TransientError,
    /// The provider definitely rejected the refresh token: the chain needs consent again.
    Rejected,
}

impl RefreshOutcome {
    /// Every outcome, for pre-initialisation.
    pub const ALL: [RefreshOutcome; 3] = [
        RefreshOutcome::Success,
        RefreshOutcome::TransientError,
        RefreshOutcome::Rejected,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshOutcome::Success => "success",
            RefreshOutcome::TransientError => "transient_error",
            RefreshOutcome::Rejected => "rejected",
        }
    }
}

/// How a token request on the socket API ended (`tokend_token_requests_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenOutcome {
    /// Served from the in-memory cache.
    Cached,
    /// Served after a refresh (the cached token was too old or a fresh one was asked for).
    Refreshed,
    /// No such connection or site.
    NotFound,
    /// The chain needs consent again.
    NeedsReauth,
    /// The provider could not be reached; the caller should retry later.
    Unavailable,
    /// The caller may not read this connection's tokens.
    Forbidden,
}

impl TokenOutcome {
    /// Every outcome, for pre-initialisation.
    pub const ALL: [TokenOutcome; 6] = [
        TokenOutcome::Cached,
        TokenOutcome::Refreshed,
        TokenOutcome::NotFound,
        TokenOutcome::NeedsReauth,
        TokenOutcome::Unavailable,
        TokenOutcome::Forbidden,
    ];

    /// Where the outcome sits in [`TokenOutcome::ALL`] (its declaration order).
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenOutcome::Cached => "cached",
            TokenOutcome::Refreshed => "refreshed",
            TokenOutcome::NotFound => "not_found",
            TokenOutcome::NeedsReauth => "needs_reauth",
            TokenOutcome::Unavailable => "unavailable",
            TokenOutcome::Forbidden => "forbidden",
        }
    }
}

/// One connection as the scrape-time gauges see it (from [`ConnectionSource::deadlines`]).
///
/// It borrows the id from the source (the engine's slot, under its read lock): a scrape of
/// 100,000 connections copies each id once, into the scrape's reused buffer, and allocates
/// nothing per connection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConnectionDeadline<'a> {
    /// The connection id (the `connection` label; never a user-chosen label).
    pub id: &'a str,
    /// When its refresh token expires if unused (Unix seconds).
    pub inactivity_unix: f64,
    /// When its consent runs out regardless of use (Unix seconds); `None` when unknown or
    /// disabled.
    pub absolute_unix: Option<f64>,
    /// False for a chain in `needs_reauth`: it has no deadline left to watch.
    pub active: bool,
}

/// What the connection gauges are computed from when `/metrics` is scraped: the engine
/// implements it (metrics sits below the engine and never names it), so a scrape always
/// sees the connections as they are, never a copy made seconds ago.
pub trait ConnectionSource: Send + Sync {
    /// Connections by status, `(active, needs_reauth)`: kept as statuses change, O(1).
    fn status_counts(&self) -> (usize, usize);
    /// Hands every connection's deadlines to `each`, one at a time (holding no lock over all
    /// of them), and returns now (Unix seconds) to measure the headroom from.
    fn deadlines(&self, each: &mut dyn FnMut(ConnectionDeadline<'_>)) -> f64;
}

/// `tokend_connection_absolute_deadline_timestamp_seconds{connection}`.
const ABSOLUTE_NAME: &str = "tokend_connection_absolute_deadline_timestamp_seconds";
const ABSOLUTE_HELP: &str = "When an active connection's consent runs out regardless of use (Unix \
                             time); absent when unknown.";
/// `tokend_connection_inactivity_deadline_timestamp_seconds{connection}`.
const INACTIVITY_NAME: &str = "tokend_connection_inactivity_deadline_timestamp_seconds";
const INACTIVITY_HELP: &str = "When an active connection's refresh token expires if unused (Unix \
                               time).";
/// The per-connection family that sorts first: the encoder writes families sorted by name,
/// and [`Metrics::render`] writes the per-connection ones where they sort (just before
/// `tokend_connections`).
const PER_CONNECTION_FIRST: &str = ABSOLUTE_NAME;
/// Room reserved for a sample value when a scrape sizes its answer: a deadline in Unix seconds
/// with milliseconds is at most 18 characters as `Display` writes it; a longer one only costs
/// the answer a reallocation.
const VALUE_ROOM: usize = 24;

/// One active connection of a scrape: where its id is in [`Scratch::ids`], and its deadlines.
struct Series {
    /// `Scratch::ids[start..end]` is the id: the ids share one buffer instead of a `String`
    /// each.
    start: usize,
    end: usize,
    inactivity_unix: f64,
    /// `None` when unknown, disabled or not finite: no series then.
    absolute_unix: Option<f64>,
}

/// The buffers a scrape collects the per-connection series in, kept between scrapes: at
/// 100,000 connections they are a few MiB, which every scrape would otherwise allocate and
/// grow afresh.
#[derive(Default)]
struct Scratch {
    ids: String,
    series: Vec<Series>,
}

/// `tokend_connections{status}`, `tokend_inactivity_headroom_seconds` and the
/// per-connection deadline series, computed from the [`ConnectionSource`] at each scrape.
///
/// The two aggregate gauges are registered in the registry and set by [`Self::scrape`] just
/// before it is gathered; the per-connection series are never `prometheus` objects: the
/// scrape collects them in [`Scratch`] and writes their text itself ([`Scrape::write_series`],
/// held byte for byte to the crate's encoder by a test).
///
/// Before a source is attached (or after it is gone) the counts are 0 and the headroom +Inf,
/// as for an empty ledger.
struct ConnectionGauges {
    /// Weak: the engine holds the metrics, and must not be kept alive by them.
    source: RwLock<Option<Weak<dyn ConnectionSource>>>,
    /// False with `daemon.metrics_per_connection = false`: no `{connection}` series.
    per_connection: bool,
    connections: IntGaugeVec,
    headroom: Gauge,
    /// One scrape at a time uses the buffers (and sets the aggregate gauges): another waits
    /// for it, so that each scrape shows the gauges it computed.
    scratch: Mutex<Scratch>,
}

impl ConnectionGauges {
    /// The gauges, their aggregate families registered in `r` with the names, help texts and
    /// labels of INTERFACE.md.
    fn new(per_connection: bool, r: &Registry) -> ConnectionGauges {
        let connections = IntGaugeVec::new(
            Opts::new(
                "tokend_connections",
                "Connections in the ledger, by status (active, needs_reauth).",
            ),
            &["status"],
        )
        .expect(VALID);
        let headroom = Gauge::with_opts(Opts::new(
            "tokend_inactivity_headroom_seconds",
            "Smallest time left before an active connection's refresh token expires from \
             inactivity; +Inf when there is no active connection.",
        ))
        .expect(VALID);
        r.register(Box::new(connections.clone())).expect(VALID);
        r.register(Box::new(headroom.clone())).expect(VALID);
        ConnectionGauges {
            source: RwLock::new(None),
            per_connection,
            connections,
            headroom,
            scratch: Mutex::new(Scratch::default()),
        }
    }

    /// Reads the source once: sets the aggregate gauges and collects the per-connection
    /// series, sorted by id (as the registry sorts a family's series by label value).
    ///
    /// Only active connections get per-connection series: a chain in `needs_reauth` is
    /// already dead, has no deadline left to watch, and is counted by
    /// `tokend_connections{status="needs_reauth"}`. The headroom is the smallest
    /// `inactivity - now` over the active connections (+Inf when there is none, so a `< 7d`
    /// alert cannot fire on an empty ledger; negative when one is overdue). Non-finite times
    /// are ignored.
    fn scrape(&self) -> Scrape<'_> {
        let mut scratch = self.scratch.lock();
        let source = self.source.read().as_ref().and_then(Weak::upgrade);
        let (active, needs_reauth) = source.as_ref().map_or((0, 0), |s| s.status_counts());
        let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.connections
            .with_label_values(&["active"])
            .set(as_i64(active));
        self.connections
            .with_label_values(&["needs_reauth"])
            .set(as_i64(needs_reauth));
        let Scratch { ids, series } = &mut *scratch;
        ids.clear();
        series.clear();
        let mut soonest = f64::INFINITY;
        let per_connection = self.per_connection;
        let now_unix = source.map_or(0.0, |s| {
            s.deadlines(&mut |d| {
                if !d.active || !d.inactivity_unix.is_finite() {
                    return;
                }
                soonest = soonest.min(d.inactivity_unix);
                if per_connection {
                    let start = ids.len();
                    ids.push_str(d.id);
                    series.push(Series {
                        start,
                        end: ids.len(),
                        inactivity_unix: d.inactivity_unix,
                        absolute_unix: d.absolute_unix.filter(|a| a.is_finite()),
                    });
                }
            })
        });
        // Rounding is monotonic: the smallest difference is the difference of the smallest.
        self.headroom.set(if soonest.is_finite() {
            soonest - now_unix
        } else {
            f64::INFINITY
        });
        series.sort_unstable_by(|a, b| ids[a.start..a.end].cmp(&ids[b.start..b.end]));
        Scrape { scratch }
    }
}

/// One scrape's per-connection series (holding the scratch buffers until it is written).
struct Scrape<'a> {
    scratch: parking_lot::MutexGuard<'a, Scratch>,
}

impl Scrape<'_> {
    fn ids(&self, s: &Series) -> &str {
        &self.scratch.ids[s.start..s.end]
    }

    /// An upper bound (but for unusually long values or escaped ids) of what
    /// [`Self::write_series`] writes.
    fn text_len(&self) -> usize {
        let series = &self.scratch.series;
        let headers = |name: &str, help: &str| 2 * name.len() + help.len() + 24;
        let line = |name: &str| name.len() + "{connection=\"\"} \n".len() + VALUE_ROOM;
        let absolute = series.iter().filter(|s| s.absolute_unix.is_some()).count();
        self.scratch.ids.len() * 2
            + headers(ABSOLUTE_NAME, ABSOLUTE_HELP)
            + headers(INACTIVITY_NAME, INACTIVITY_HELP)
            + absolute * line(ABSOLUTE_NAME)
            + series.len() * line(INACTIVITY_NAME)
    }

    /// Appends the per-connection families as the crate's `TextEncoder` writes them (a
    /// family without a series is left out, as the registry leaves it out).
    fn write_series(&self, out: &mut String) {
        let series = &self.scratch.series;
        write_gauge_family(
            out,
            ABSOLUTE_NAME,
            ABSOLUTE_HELP,
            series
                .iter()
                .filter_map(|s| s.absolute_unix.map(|a| (self.ids(s), a))),
        );
        write_gauge_family(
            out,
            INACTIVITY_NAME,
            INACTIVITY_HELP,
            series.iter().map(|s| (self.ids(s), s.inactivity_unix)),
        );
    }
}

/// A gauge family with one `connection` label, in the text format as `prometheus`'
/// `TextEncoder` writes it: `# HELP` and `# TYPE` lines, then `name{connection="id"} value`
/// with the value as `f64`'s `Display` writes it; nothing at all without a series.
fn write_gauge_family<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    mut samples: impl Iterator<Item = (&'a str, f64)>,
) {
    use std::fmt::Write as _;
    let Some(first) = samples.next() else {
        return;
    };
    out.push_str("# HELP ");
    out.push_str(name);
    out.push(' ');
    push_escaped(out, help, false);
    out.push_str("\n# TYPE ");
    out.push_str(name);
    out.push_str(" gauge\n");
    for (id, value) in std::iter::once(first).chain(samples) {
        out.push_str(name);
        out.push_str("{connection=\"");
        push_escaped(out, id, true);
        // Writing to a `String` cannot fail.
        let _ = writeln!(out, "\"}} {value}");
    }
}

/// `text` escaped as the encoder escapes it: `\` and newline always, `"` in label values.
fn push_escaped(out: &mut String, text: &str, label_value: bool) {
    let special = |c: char| c == '\\' || c == '\n' || (label_value && c == '"');
    if !text.contains(special) {
        out.push_str(text);
        return;
    }
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if label_value => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// Every metric tokend exports, in its own registry. Create once, share as `Arc<Metrics>`.
pub struct Metrics {
    registry: Registry,
    /// The connection gauges, computed from the engine at each scrape.
    connections: ConnectionGauges,
    refreshes: IntCounterVec,
    refresh_duration: Histogram,
    /// `tokend_token_requests_total` by outcome, each child resolved once (indexed by
    /// [`TokenOutcome::index`]): the token path counts every request, and a
    /// `with_label_values` look-up hashes the label values each time.
    token_requests: [IntCounter; TokenOutcome::ALL.len()],
    api_duration: HistogramVec,
    api_requests: IntCounterVec,
    api_connections_open: IntGauge,
    api_connections_refused: IntCounterVec,
    api_timeouts: IntCounterVec,
    site_resolutions: IntCounterVec,
    audit_writes: IntCounterVec,
    job_last_success: GaugeVec,
    job_period: GaugeVec,
    /// `tokend_ledger_up`: exported only with a shared (PostgreSQL) ledger, so it is
    /// registered on its first [`Metrics::set_ledger_up`].
    ledger_up: std::sync::OnceLock<IntGauge>,
    /// Claims on chains' refreshes this daemon holds now (a shared ledger; with SQLite every
    /// attempt holds the always-granted claim for its duration).
    leases_held: IntGauge,
    /// Claims or fenced commits refused because another daemon holds or moved the chain.
    lease_conflicts: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("per_connection", &self.connections.per_connection)
            .finish_non_exhaustive()
    }
}

/// Why every registration below may `expect`: names, help texts and labels are constants of
/// this file, so a failure is a programming error that the unit tests catch.
const VALID: &str = "metric definitions in metrics.rs are valid and unique";

/// Sets every series of `vec` named by `labels` to 0, so that `rate()` and `increase()`
/// have a series from the first scrape.
fn preinit(vec: &IntCounterVec, labels: impl IntoIterator<Item = &'static str>) {
    for l in labels {
        vec.with_label_values(&[l]).reset();
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Creates the `route` series of `templates` (duration, and each preinitialised status class).
fn preinit_routes(duration: &HistogramVec, requests: &IntCounterVec, templates: &[&str]) {
    for route in templates {
        duration.with_label_values(&[route]);
        for class in PREINITIALISED_STATUS_CLASSES {
            requests.with_label_values(&[route, class]).reset();
        }
    }
}

/// The `status` label values of `tokend_api_requests_total`, by [`status_class_index`].
const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "unknown"];

/// Where a status falls in [`STATUS_CLASSES`].
fn status_class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        500..=599 => 4,
        _ => 5,
    }
}

/// The `status` label of `tokend_api_requests_total`: the status class.
#[cfg(test)]
fn status_class(status: u16) -> &'static str {
    STATUS_CLASSES[status_class_index(status)]
}

/// The series of one `route` label value ([`Metrics::api_route`]).
struct RouteSeries {
    /// `tokend_api_request_duration_seconds{route}`, resolved when the handle was made.
    duration: Histogram,
    /// `tokend_api_requests_total`, to resolve a status class's child at its first request:
    /// resolving all of them up front would export series (`1xx`, `3xx`, `unknown`) that
    /// never had a request, which the exported text does not show today.
    requests: IntCounterVec,
    /// `tokend_api_requests_total{route, status}` by [`STATUS_CLASSES`], once resolved.
    by_class: [std::sync::OnceLock<IntCounter>; STATUS_CLASSES.len()],
    /// The label value.
    route: &'static str,
}

/// Counts and times the requests of one socket API route without a label look-up: made once
/// per route by [`Metrics::api_route`], cheap to clone (one reference count).
#[derive(Clone)]
pub struct ApiRoute(Arc<RouteSeries>);

impl ApiRoute {
    /// Counts and times one request: as [`Metrics::api_request`] for this route.
    pub fn record(&self, status: u16, duration: Duration) {
        let s = &self.0;
        s.duration.observe(duration.as_secs_f64());
        let class = status_class_index(status);
        s.by_class[class]
            .get_or_init(|| {
                s.requests
                    .with_label_values(&[s.route, STATUS_CLASSES[class]])
            })
            .inc();
    }
}

/// The encoder writes sample values with Rust's `Display`, which spells infinity `inf`. Go's
/// `ParseFloat` (Prometheus, promtool) accepts that, but the exposition format documents
/// `+Inf` / `-Inf`, and stricter parsers may want exactly those: rewrite the sample values
/// (always the last field of a line; `#` lines are left alone).
fn canonical_infinities(text: String) -> String {
    if !text.contains("inf\n") {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for line in text.split_inclusive('\n') {
        let body = line.strip_suffix('\n').unwrap_or(line);
        let fixed = if body.starts_with('#') {
            None
        } else if let Some(head) = body.strip_suffix(" inf") {
            Some((head, " +Inf"))
        } else {
            body.strip_suffix(" -inf").map(|head| (head, " -Inf"))
        };
        match fixed {
            Some((head, value)) => {
                out.push_str(head);
                out.push_str(value);
                out.push_str(&line[body.len()..]);
            }
            None => out.push_str(line),
        }
    }
    out
}

impl Metrics {
    /// Creates every metric in a fresh registry, with every enum label pre-initialised to 0.
    ///
    /// `per_connection = false` turns off the `{connection}` series entirely (for ledgers so
    /// large that one series per connection is too many); the aggregate gauges stay.
    pub fn new(per_connection: bool) -> Metrics {
        let r = Registry::new();

        let connections = ConnectionGauges::new(per_connection, &r);

        let refreshes = register_int_counter_vec_with_registry!(
            "tokend_refreshes_total",
            "Refresh attempts against the provider, by outcome.",
            &["outcome"],
            r
        )
        .expect(VALID);
        preinit(&refreshes, RefreshOutcome::ALL.map(RefreshOutcome::as_str));

        let refresh_duration = register_histogram_with_registry!(
            "tokend_refresh_duration_seconds",
            "Duration of refresh attempts (provider round trip and ledger commit), any outcome.",
            PROVIDER_LATENCY_BUCKETS.to_vec(),
            r
        )
        .expect(VALID);

        let token_requests = register_int_counter_vec_with_registry!(
            "tokend_token_requests_total",
            "Access-token requests on the socket API, by outcome.",
            &["outcome"],
            r
        )
        .expect(VALID);
        preinit(&token_requests, TokenOutcome::ALL.map(TokenOutcome::as_str));
        let token_requests =
            TokenOutcome::ALL.map(|o| token_requests.with_label_values(&[o.as_str()]));

        let api_duration = register_histogram_vec_with_registry!(
            "tokend_api_request_duration_seconds",
            "Duration of socket API requests, by route template.",
            &["route"],
            API_LATENCY_BUCKETS.to_vec(),
            r
        )
        .expect(VALID);
        let api_requests = register_int_counter_vec_with_registry!(
            "tokend_api_requests_total",
            "Socket API requests, by route template and status class.",
            &["route", "status"],
            r
        )
        .expect(VALID);
        preinit_routes(&api_duration, &api_requests, &[OTHER_ROUTE]);

        let audit_writes = register_int_counter_vec_with_registry!(
            "tokend_audit_writes_total",
            "Background writes of folded token-read events to the ledger, by outcome: one per \
             flush, however many reads it folds.",
            &["outcome"],
            r
        )
        .expect(VALID);
        preinit(&audit_writes, ["success", "failure"]);
        let api_connections_open = register_int_gauge_with_registry!(
            "tokend_api_connections_open",
            "Connections open on the socket API.",
            r
        )
        .expect(VALID);
        let api_connections_refused = register_int_counter_vec_with_registry!(
            "tokend_api_connections_refused_total",
            "Socket API connections closed at once (answered 503), by reason; uid_limit: the \
             peer's uid already held its share of connections.",
            &["reason"],
            r
        )
        .expect(VALID);
        preinit(&api_connections_refused, [REFUSED_UID_LIMIT]);
        let api_timeouts = register_int_counter_vec_with_registry!(
            "tokend_api_timeouts_total",
            "Socket API connections closed because the peer was too slow, by phase (headers, \
             body, write).",
            &["phase"],
            r
        )
        .expect(VALID);
        preinit(&api_timeouts, TimeoutPhase::ALL.map(TimeoutPhase::as_str));

        let site_resolutions = register_int_counter_vec_with_registry!(
            "tokend_site_resolutions_total",
            "Lookups of the sites a connection reaches (accessible-resources), by outcome.",
            &["outcome"],
            r
        )
        .expect(VALID);
        preinit(&site_resolutions, ["success", "failure"]);

        let job_last_success = register_gauge_vec_with_registry!(
            "tokend_job_last_success_timestamp_seconds",
            "When a periodic job last succeeded (Unix time); the daemon's start time until its \
             first success.",
            &["cron_job"],
            r
        )
        .expect(VALID);
        let started = unix_now();
        for job in KNOWN_JOBS {
            job_last_success.with_label_values(&[job]).set(started);
        }
        let job_period = register_gauge_vec_with_registry!(
            "tokend_jobs_period_seconds",
            "The nominal interval between runs of a periodic job.",
            &["cron_job"],
            r
        )
        .expect(VALID);

        let leases_held = register_int_gauge_with_registry!(
            "tokend_leases_held",
            "Claims on a chain's refresh this daemon holds now (one per refresh in flight).",
            r
        )
        .expect(VALID);
        let lease_conflicts = register_int_counter_with_registry!(
            "tokend_lease_conflicts_total",
            "Claims or commits refused because another daemon holds or moved the chain.",
            r
        )
        .expect(VALID);

        register_int_gauge_with_registry!(
            Opts::new(
                "tokend_build_info",
                "Always 1; the version label says which tokend is running.",
            )
            .const_label("version", env!("CARGO_PKG_VERSION")),
            r
        )
        .expect(VALID)
        .set(1);

        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("the process collector registers once");

        Metrics {
            registry: r,
            connections,
            refreshes,
            refresh_duration,
            token_requests,
            api_duration,
            api_requests,
            api_connections_open,
            api_connections_refused,
            api_timeouts,
            site_resolutions,
            audit_writes,
            job_last_success,
            job_period,
            ledger_up: std::sync::OnceLock::new(),
            leases_held,
            lease_conflicts,
        }
    }

    /// Whether this daemon can write its shared ledger now (`tokend_ledger_up`, exported
    /// from the first call on; a SQLite daemon never calls it).
    pub fn set_ledger_up(&self, up: bool) {
        let gauge = self.ledger_up.get_or_init(|| {
            register_int_gauge_with_registry!(
                "tokend_ledger_up",
                "1 when this daemon can write the shared (PostgreSQL) ledger, else 0.",
                self.registry
            )
            .expect(VALID)
        });
        gauge.set(i64::from(up));
    }

    /// Computes the connection gauges from `source` at every scrape from now on (the engine
    /// attaches itself when it loads). Held weakly: a source that is gone reads as an empty
    /// ledger.
    pub fn watch_connections(&self, source: Weak<dyn ConnectionSource>) {
        *self.connections.source.write() = Some(source);
    }

    /// Counts a refresh attempt and observes its duration.
    pub fn refresh_outcome(&self, outcome: RefreshOutcome, duration: Duration) {
        self.refreshes.with_label_values(&[outcome.as_str()]).inc();
        self.refresh_duration.observe(duration.as_secs_f64());
    }

    /// One more (`+1`) or one fewer (`-1`) claim held on a chain's refresh.
    pub fn lease_held(&self, delta: i64) {
        self.leases_held.add(delta);
    }

    /// Counts a claim or fenced commit refused because another daemon holds or moved the
    /// chain.
    pub fn lease_conflict(&self) {
        self.lease_conflicts.inc();
    }

    /// Counts a token request on the socket API.
    pub fn token_request(&self, outcome: TokenOutcome) {
        self.token_requests[outcome.index()].inc();
    }

    /// The series of one `route` label value, resolved once: what the socket API keeps per
    /// route so that counting a request costs no label look-up. `route` is bounded as for
    /// [`Metrics::api_request`] (a template of `api`'s route table, or [`OTHER_ROUTE`]).
    pub fn api_route(&self, route: &'static str) -> ApiRoute {
        ApiRoute(Arc::new(RouteSeries {
            duration: self.api_duration.with_label_values(&[route]),
            requests: self.api_requests.clone(),
            by_class: Default::default(),
            route,
        }))
    }

    /// Creates the series of every route template of the socket API (from `api`'s route
    /// table), so that rates and error ratios exist before the first request.
    pub fn declare_api_routes(&self, templates: &[&'static str]) {
        preinit_routes(&self.api_duration, &self.api_requests, templates);
    }

    /// Counts and times a socket API request. `route` is a template of `api`'s route table or
    /// [`OTHER_ROUTE`]: `api::route_label` bounds it (never a raw path), so this hot path
    /// takes no lock of its own to check it again. Tests only: the socket API counts through
    /// the handles of [`Metrics::api_route`], the same series.
    #[cfg(test)]
    pub fn api_request(&self, route: &'static str, status: u16, duration: Duration) {
        self.api_duration
            .with_label_values(&[route])
            .observe(duration.as_secs_f64());
        self.api_requests
            .with_label_values(&[route, status_class(status)])
            .inc();
    }

    /// Counts one background write of the audit trail.
    pub fn audit_write(&self, ok: bool) {
        let outcome = if ok { "success" } else { "failure" };
        self.audit_writes.with_label_values(&[outcome]).inc();
    }

    /// One more (`+1`) or one fewer (`-1`) open socket API connection.
    pub fn api_connection_open(&self, delta: i64) {
        self.api_connections_open.add(delta);
    }

    /// Counts a socket API connection refused at once because its uid held its share.
    pub fn api_connection_refused(&self) {
        self.api_connections_refused
            .with_label_values(&[REFUSED_UID_LIMIT])
            .inc();
    }

    /// Counts a socket API connection closed because the peer was too slow.
    pub fn api_timeout(&self, phase: TimeoutPhase) {
        self.api_timeouts.with_label_values(&[phase.as_str()]).inc();
    }

    /// Counts a site lookup for a connection.
    pub fn site_resolution(&self, ok: bool) {
        let outcome = if ok { "success" } else { "failure" };
        self.site_resolutions.with_label_values(&[outcome]).inc();
    }

    /// Records that periodic job `job` succeeded at `unix` (Unix seconds). `job` is a job
    /// name from the code ([`KNOWN_JOBS`]), never user input.
    pub fn job_success(&self, job: &str, unix: f64) {
        self.job_last_success.with_label_values(&[job]).set(unix);
    }

    /// Records the nominal interval of periodic job `job`, so that an alert can compare
    /// `time() - tokend_job_last_success_timestamp_seconds` against it.
    pub fn set_job_period(&self, job: &str, secs: f64) {
        self.job_period.with_label_values(&[job]).set(secs);
    }

    /// Every metric in the Prometheus text exposition format 0.0.4 ([`CONTENT_TYPE`]).
    ///
    /// Byte for byte what the crate's `TextEncoder` writes when the per-connection series are
    /// gauge families of the registry (families sorted by name, series by label value; a test
    /// holds it to that), but those series, one or two per connection, are written as text
    /// straight from the scrape's buffers ([`ConnectionGauges::scrape`]) instead of being
    /// built as `MetricFamily` objects first: at 100,000 connections those objects were most
    /// of the scrape's time and memory. The answer is sized once, so the text is never
    /// copied whole.
    pub fn render(&self) -> String {
        let scrape = self.connections.scrape();
        let families = self.registry.gather();
        let split = families.partition_point(|f| f.name() < PER_CONNECTION_FIRST);
        let encode = |families: &[MetricFamily]| {
            let mut text = String::new();
            if let Err(e) = TextEncoder::new().encode_utf8(families, &mut text) {
                tracing::error!(error = %e, "cannot encode the metrics");
            }
            canonical_infinities(text)
        };
        let head = encode(&families[..split]);
        let tail = encode(&families[split..]);
        let mut out = String::with_capacity(head.len() + scrape.text_len() + tail.len());
        out.push_str(&head);
        scrape.write_series(&mut out);
        out.push_str(&tail);
        out
    }
}

/// The socket API's accept loop reports its connections here.
impl crate::serve::Observer for Metrics {
    fn opened(&self) {
        self.api_connection_open(1);
    }

    fn closed(&self) {
        self.api_connection_open(-1);
    }

    fn refused(&self) {
        self.api_connection_refused();
    }

    fn timed_out(&self, phase: TimeoutPhase) {
        self.api_timeout(phase);
    }
}

/// The readiness check behind `/readyz`: `Ok(())` when ready, else the reason.
pub type Readiness = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

#[derive(Clone)]
struct ProbeState {
    metrics: Arc<Metrics>,
    readiness: Readiness,
}

/// The router of the metrics port: `GET /metrics`, `GET /healthz`, `GET /readyz`; any other
/// path is 404 (a known path with another method is 405).
pub fn router(metrics: Arc<Metrics>, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .with_state(ProbeState { metrics, readiness })
}

fn text(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, TEXT_PLAIN)], body).into_response()
}

async fn metrics_handler(State(s): State<ProbeState>) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], s.metrics.render()).into_response()
}

async fn healthz() -> Response {
    text(StatusCode::OK, "ok".to_owned())
}

async fn readyz(State(s): State<ProbeState>) -> Response {
    match tokio::time::timeout(READINESS_TIMEOUT, (s.readiness)()).await {
        Ok(Ok(())) => text(StatusCode::OK, "ready".to_owned()),
        Ok(Err(reason)) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}"),
        ),
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: the readiness check took longer than {}s",
                READINESS_TIMEOUT.as_secs()
            ),
        ),
    }
}

async fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "not found".to_owned())
}

/// Serves [`router`] on `listener` until `shutdown` resolves, then stops accepting, lets
/// requests in progress finish for up to [`SHUTDOWN_GRACE`], and returns. Connections get
/// the socket API's header, body and write timeouts; at most [`MAX_CONNECTIONS`] are open.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    shutdown: impl Future<Output = ()>,
) {
    crate::serve::serve_http(
        listener,
        router(metrics, readiness),
        shutdown,
        crate::serve::Limits {
            max_connections: MAX_CONNECTIONS,
            // Scrapers and probes have no uid (TCP); the total is the only share.
            max_connections_per_uid: MAX_CONNECTIONS,
            ..crate::serve::Limits::standard(SHUTDOWN_GRACE, crate::serve::plain_refusal)
        },
        None,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use parking_lot::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::ServiceExt;

    /// The metric names of INTERFACE.md "Metrics and probes".
    const INTERFACE_METRICS: &[&str] = &[
        "tokend_connections",
        "tokend_refreshes_total",
        "tokend_refresh_duration_seconds",
        "tokend_inactivity_headroom_seconds",
        "tokend_connection_inactivity_deadline_timestamp_seconds",
        "tokend_token_requests_total",
        "tokend_api_request_duration_seconds",
        "tokend_site_resolutions_total",
        "tokend_job_last_success_timestamp_seconds",
        "tokend_build_info",
        "tokend_leases_held",
        "tokend_lease_conflicts_total",
    ];

    /// The value of the sample line `series` (name plus labels, exactly as rendered).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(series)?.strip_prefix(' ')?;
            match rest.trim() {
                "+Inf" => Some(f64::INFINITY),
                "-Inf" => Some(f64::NEG_INFINITY),
                v => v.parse().ok(),
            }
        })
    }

    fn has_type(text: &str, name: &str, kind: &str) -> bool {
        text.lines().any(|l| l == format!("# TYPE {name} {kind}"))
    }

    /// A [`ConnectionDeadline`] that owns its id, as a test's source keeps it.
    #[derive(Clone, Debug)]
    struct Owned {
        id: String,
        inactivity_unix: f64,
        absolute_unix: Option<f64>,
        active: bool,
    }

    fn deadline(id: &str, inactivity: f64, absolute: Option<f64>, active: bool) -> Owned {
        Owned {
            id: id.to_owned(),
            inactivity_unix: inactivity,
            absolute_unix: absolute,
            active,
        }
    }

    /// A connection source whose answers the test sets, as the engine's would be.
    #[derive(Default)]
    struct Fixed {
        counts: Mutex<(usize, usize)>,
        deadlines: Mutex<(Vec<Owned>, f64)>,
    }

    impl ConnectionSource for Fixed {
        fn status_counts(&self) -> (usize, usize) {
            *self.counts.lock()
        }

        fn deadlines(&self, each: &mut dyn FnMut(ConnectionDeadline<'_>)) -> f64 {
            let (deadlines, now_unix) = &*self.deadlines.lock();
            for d in deadlines {
                each(ConnectionDeadline {
                    id: &d.id,
                    inactivity_unix: d.inactivity_unix,
                    absolute_unix: d.absolute_unix,
                    active: d.active,
                });
            }
            *now_unix
        }
    }

    impl Fixed {
        fn set_connections(&self, active: usize, needs_reauth: usize) {
            *self.counts.lock() = (active, needs_reauth);
        }

        fn set_connection_deadlines(&self, snapshot: &[Owned], now_unix: f64) {
            *self.deadlines.lock() = (snapshot.to_vec(), now_unix);
        }
    }

    /// A source `m` computes its connection gauges from at each scrape (keep it alive).
    fn watched(m: &Metrics) -> Arc<Fixed> {
        let source = Arc::new(Fixed::default());
        m.watch_connections(Arc::downgrade(&source) as Weak<dyn ConnectionSource>);
        source
    }

    #[test]
    fn socket_defence_series_exist_from_the_start_and_count() {
        let m = Metrics::new(false);
        let t = m.render();
        assert!(has_type(&t, "tokend_api_connections_open", "gauge"));
        assert!(has_type(
            &t,
            "tokend_api_connections_refused_total",
            "counter"
        ));
        assert!(has_type(&t, "tokend_api_timeouts_total", "counter"));
        let refused = "tokend_api_connections_refused_total{reason=\"uid_limit\"}";
        assert_eq!(value(&t, refused), Some(0.0));
        for p in TimeoutPhase::ALL {
            let series = format!("tokend_api_timeouts_total{{phase=\"{}\"}}", p.as_str());
            assert_eq!(value(&t, &series), Some(0.0), "{series}");
        }
        m.api_connection_open(1);
        m.api_connection_open(1);
        m.api_connection_open(-1);
        m.api_connection_refused();
        m.api_timeout(TimeoutPhase::Body);
        let t = m.render();
        assert_eq!(value(&t, "tokend_api_connections_open"), Some(1.0));
        assert_eq!(value(&t, refused), Some(1.0));
        assert_eq!(
            value(&t, "tokend_api_timeouts_total{phase=\"body\"}"),
            Some(1.0)
        );
    }

    /// Route templates as `api` declares them (its table is tested in `api`).
    const DECLARED_ROUTES: &[&str] = &["/v1/health", "/v1/connections/{id}/token"];

    #[test]
    fn interface_metrics_exist_from_the_start() {
        let m = Metrics::new(true);
        m.declare_api_routes(DECLARED_ROUTES);
        let t = m.render();
        for name in INTERFACE_METRICS {
            // Per-connection series exist only once there are connections.
            if *name == "tokend_connection_inactivity_deadline_timestamp_seconds" {
                continue;
            }
            assert!(
                t.contains(&format!("# TYPE {name} ")),
                "{name} missing:\n{t}"
            );
        }
        assert!(has_type(&t, "tokend_connections", "gauge"));
        assert!(has_type(&t, "tokend_refreshes_total", "counter"));
        assert!(has_type(&t, "tokend_refresh_duration_seconds", "histogram"));
        assert!(has_type(&t, "tokend_inactivity_headroom_seconds", "gauge"));
        assert!(has_type(&t, "tokend_token_requests_total", "counter"));
        assert!(has_type(
            &t,
            "tokend_api_request_duration_seconds",
            "histogram"
        ));
        assert!(has_type(&t, "tokend_site_resolutions_total", "counter"));
        assert!(has_type(
            &t,
            "tokend_job_last_success_timestamp_seconds",
            "gauge"
        ));
        assert!(has_type(&t, "tokend_build_info", "gauge"));
        assert!(has_type(&t, "tokend_leases_held", "gauge"));
        assert!(has_type(&t, "tokend_lease_conflicts_total", "counter"));

        for s in ["active", "needs_reauth"] {
            assert_eq!(
                value(&t, &format!("tokend_connections{{status=\"{s}\"}}")),
                Some(0.0)
            );
        }
        for o in RefreshOutcome::ALL {
            let series = format!("tokend_refreshes_total{{outcome=\"{}\"}}", o.as_str());
            assert_eq!(value(&t, &series), Some(0.0), "{series}");
        }
        for o in TokenOutcome::ALL {
            let series = format!("tokend_token_requests_total{{outcome=\"{}\"}}", o.as_str());
            assert_eq!(value(&t, &series), Some(0.0), "{series}");
        }
        for o in ["success", "failure"] {
            let series = format!("tokend_site_resolutions_total{{outcome=\"{o}\"}}");
            assert_eq!(value(&t, &series), Some(0.0), "{series}");
        }
        assert_eq!(
            value(&t, "tokend_refresh_duration_seconds_count"),
            Some(0.0)
        );
        assert_eq!(
            value(&t, "tokend_inactivity_headroom_seconds"),
            Some(f64::INFINITY)
        );
        for route in DECLARED_ROUTES.iter().chain([&OTHER_ROUTE]) {
            let series = format!("tokend_api_request_duration_seconds_count{{route=\"{route}\"}}");
            assert_eq!(value(&t, &series), Some(0.0), "{series}");
        }
        for job in KNOWN_JOBS {
            let series = format!("tokend_job_last_success_timestamp_seconds{{cron_job=\"{job}\"}}");
            let v = value(&t, &series).unwrap();
            assert!((v - unix_now()).abs() < 60.0, "{series} = {v}");
        }
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            value(&t, &format!("tokend_build_info{{version=\"{version}\"}}")),
            Some(1.0)
        );
        #[cfg(target_os = "linux")]
        assert!(t.contains("process_resident_memory_bytes "), "{t}");
    }

    #[test]
    fn resolved_children_count_as_the_label_look_ups_do() {
        for (i, o) in TokenOutcome::ALL.into_iter().enumerate() {
            assert_eq!(o.index(), i, "{o:?}");
        }
        let requests: &[(&'static str, u16)] = &[
            ("/v1/connections/{id}/token", 200),
            ("/v1/connections/{id}/token", 200),
            ("/v1/connections/{id}/token", 503),
            ("/v1/connections/{id}/token", 302),
            (OTHER_ROUTE, 404),
            (OTHER_ROUTE, 99),
        ];
        let api_lines = |m: &Metrics| -> Vec<String> {
            m.render()
                .lines()
                .filter(|l| {
                    l.starts_with("tokend_api_request") || l.starts_with("tokend_token_requests")
                })
                .filter(|l| !l.contains("_sum"))
                .map(str::to_owned)
                .collect()
        };
        let by_label = Metrics::new(false);
        by_label.declare_api_routes(DECLARED_ROUTES);
        let by_handle = Metrics::new(false);
        by_handle.declare_api_routes(DECLARED_ROUTES);
        for (route, status) in requests {
            by_label.api_request(route, *status, Duration::from_micros(40));
            by_handle
                .api_route(route)
                .record(*status, Duration::from_micros(40));
        }
        for o in TokenOutcome::ALL {
            by_label.token_request(o);
            by_handle.token_request(o);
        }
        let t = api_lines(&by_handle);
        assert_eq!(api_lines(&by_label), t);
        assert!(
            t.iter().any(|l| l
                == "tokend_api_requests_total{route=\"/v1/connections/{id}/token\",status=\"2xx\"} 2"),
            "{t:#?}"
        );
        assert!(
            t.iter()
                .any(|l| l == "tokend_token_requests_total{outcome=\"forbidden\"} 1"),
            "{t:#?}"
        );
    }

    #[test]
    fn updates_show_up_with_the_right_values() {
        let m = Metrics::new(true);
        m.declare_api_routes(DECLARED_ROUTES);
        let src = watched(&m);
        src.set_connections(3, 1);
        m.refresh_outcome(RefreshOutcome::Success, Duration::from_millis(120));
        m.refresh_outcome(RefreshOutcome::Success, Duration::from_millis(80));
        m.refresh_outcome(RefreshOutcome::Rejected, Duration::from_secs(2));
        m.token_request(TokenOutcome::Cached);
        m.token_request(TokenOutcome::Cached);
        m.token_request(TokenOutcome::Forbidden);
        m.api_request("/v1/connections/{id}/token", 200, Duration::from_micros(40));
        m.api_request("/v1/connections/{id}/token", 503, Duration::from_millis(3));
        // An unmatched request: `api::route_label` gives it OTHER_ROUTE, never its raw path.
        m.api_request(OTHER_ROUTE, 404, Duration::from_micros(30));
        m.site_resolution(true);
        m.site_resolution(false);
        m.site_resolution(false);
        m.job_success(JOB_MAINTENANCE, 1_700_000_000.0);
        m.set_job_period(JOB_MAINTENANCE, 86_400.0);
        src.set_connection_deadlines(
            &[deadline("c1", 1_700_100_000.0, Some(1_730_000_000.0), true)],
            1_700_000_000.0,
        );
        let t = m.render();
        for name in INTERFACE_METRICS {
            assert!(
                t.contains(&format!("# TYPE {name} ")),
                "{name} missing:\n{t}"
            );
        }
        let v = |s: &str| value(&t, s).unwrap_or_else(|| panic!("no {s} in\n{t}"));
        assert_eq!(v("tokend_connections{status=\"active\"}"), 3.0);
        assert_eq!(v("tokend_connections{status=\"needs_reauth\"}"), 1.0);
        assert_eq!(v("tokend_refreshes_total{outcome=\"success\"}"), 2.0);
        assert_eq!(v("tokend_refreshes_total{outcome=\"rejected\"}"), 1.0);
        assert_eq!(
            v("tokend_refreshes_total{outcome=\"transient_error\"}"),
            0.0
        );
        assert_eq!(v("tokend_refresh_duration_seconds_count"), 3.0);
        assert!((v("tokend_refresh_duration_seconds_sum") - 2.2).abs() < 1e-9);
        assert_eq!(v("tokend_refresh_duration_seconds_bucket{le=\"0.1\"}"), 1.0);
        assert_eq!(
            v("tokend_refresh_duration_seconds_bucket{le=\"0.25\"}"),
            2.0
        );
        assert_eq!(v("tokend_token_requests_total{outcome=\"cached\"}"), 2.0);
        assert_eq!(v("tokend_token_requests_total{outcome=\"forbidden\"}"), 1.0);
        assert_eq!(v("tokend_token_requests_total{outcome=\"refreshed\"}"), 0.0);
        let token_route = "route=\"/v1/connections/{id}/token\"";
        assert_eq!(
            v(&format!(
                "tokend_api_request_duration_seconds_count{{{token_route}}}"
            )),
            2.0
        );
        assert_eq!(
            v(&format!(
                "tokend_api_request_duration_seconds_bucket{{{token_route},le=\"0.00005\"}}"
            )),
            1.0
        );
        assert_eq!(
            v(&format!(
                "tokend_api_requests_total{{{token_route},status=\"2xx\"}}"
            )),
            1.0
        );
        assert_eq!(
            v(&format!(
                "tokend_api_requests_total{{{token_route},status=\"5xx\"}}"
            )),
            1.0
        );
        assert_eq!(
            v("tokend_api_requests_total{route=\"other\",status=\"4xx\"}"),
            1.0
        );
        assert_eq!(v("tokend_site_resolutions_total{outcome=\"success\"}"), 1.0);
        assert_eq!(v("tokend_site_resolutions_total{outcome=\"failure\"}"), 2.0);
        assert_eq!(
            v("tokend_job_last_success_timestamp_seconds{cron_job=\"maintenance\"}"),
            1_700_000_000.0
        );
        assert_eq!(
            v("tokend_jobs_period_seconds{cron_job=\"maintenance\"}"),
            86_400.0
        );
        assert_eq!(v("tokend_inactivity_headroom_seconds"), 100_000.0);
        assert_eq!(
            v("tokend_connection_inactivity_deadline_timestamp_seconds{connection=\"c1\"}"),
            1_700_100_000.0
        );
        assert_eq!(
            v("tokend_connection_absolute_deadline_timestamp_seconds{connection=\"c1\"}"),
            1_730_000_000.0
        );
    }

    #[test]
    fn infinities_are_spelled_as_the_format_says() {
        let m = Metrics::new(false);
        let t = m.render();
        assert!(
            t.contains("\ntokend_inactivity_headroom_seconds +Inf\n"),
            "{t}"
        );
        assert!(!t.contains(" inf\n"), "{t}");
        assert_eq!(
            canonical_infinities("# HELP x inf\nx inf\ny -inf\nz 1\nw{a=\" inf\"} 2".to_owned()),
            "# HELP x inf\nx +Inf\ny -Inf\nz 1\nw{a=\" inf\"} 2"
        );
    }

    #[test]
    fn the_status_label_is_bounded() {
        assert_eq!(status_class(204), "2xx");
        assert_eq!(status_class(429), "4xx");
        assert_eq!(status_class(42), "unknown");
    }

    #[test]
    fn per_connection_series_follow_the_snapshot() {
        let m = Metrics::new(true);
        let src = watched(&m);
        let now = 1_000_000.0;
        src.set_connection_deadlines(
            &[
                deadline("a", now + 500.0, Some(now + 9_000.0), true),
                deadline("b", now + 200.0, None, true),
                // needs_reauth: no series, and it does not count for the headroom.
                deadline("c", now + 50.0, Some(now + 60.0), false),
            ],
            now,
        );
        let t = m.render();
        let inact = |id: &str| {
            format!(
                "tokend_connection_inactivity_deadline_timestamp_seconds{{connection=\"{id}\"}}"
            )
        };
        let abs = |id: &str| {
            format!("tokend_connection_absolute_deadline_timestamp_seconds{{connection=\"{id}\"}}")
        };
        assert_eq!(value(&t, &inact("a")), Some(now + 500.0));
        assert_eq!(value(&t, &abs("a")), Some(now + 9_000.0));
        assert_eq!(value(&t, &inact("b")), Some(now + 200.0));
        assert_eq!(value(&t, &abs("b")), None);
        assert_eq!(value(&t, &inact("c")), None);
        assert_eq!(value(&t, &abs("c")), None);
        assert_eq!(value(&t, "tokend_inactivity_headroom_seconds"), Some(200.0));

        // A new snapshot: a is gone, b lost its absolute deadline... and gained one, d is new.
        src.set_connection_deadlines(
            &[
                deadline("b", now + 300.0, Some(now + 400.0), true),
                deadline("d", now + 1_000.0, None, true),
            ],
            now + 10.0,
        );
        let t = m.render();
        assert_eq!(value(&t, &inact("a")), None, "{t}");
        assert_eq!(value(&t, &abs("a")), None, "{t}");
        assert_eq!(value(&t, &inact("b")), Some(now + 300.0));
        assert_eq!(value(&t, &abs("b")), Some(now + 400.0));
        assert_eq!(value(&t, &inact("d")), Some(now + 1_000.0));
        assert_eq!(value(&t, "tokend_inactivity_headroom_seconds"), Some(290.0));

        // b goes to needs_reauth: its series go, d is the only active one.
        src.set_connection_deadlines(
            &[
                deadline("b", now + 300.0, Some(now + 400.0), false),
                deadline("d", now + 1_000.0, None, true),
            ],
            now,
        );
        let t = m.render();
        assert_eq!(value(&t, &inact("b")), None, "{t}");
        assert_eq!(value(&t, &abs("b")), None, "{t}");
        assert_eq!(
            value(&t, "tokend_inactivity_headroom_seconds"),
            Some(1_000.0)
        );

        // Nothing active: no series, and the headroom is +Inf (a `< 7d` alert stays quiet).
        src.set_connection_deadlines(&[deadline("e", now - 5.0, None, false)], now);
        let t = m.render();
        assert!(!t.contains("connection=\""), "{t}");
        assert_eq!(
            value(&t, "tokend_inactivity_headroom_seconds"),
            Some(f64::INFINITY)
        );

        // An overdue active connection shows as negative headroom.
        src.set_connection_deadlines(&[deadline("f", now - 5.0, None, true)], now);
        assert_eq!(
            value(&m.render(), "tokend_inactivity_headroom_seconds"),
            Some(-5.0)
        );
    }

    /// The per-connection series written as text are what the crate's own encoder writes for
    /// them as registered gauge families, byte for byte (escaping, value formatting, series
    /// order), in the place the registry's name order gives them.
    #[test]
    fn per_connection_text_is_the_encoders() {
        let m = Metrics::new(true);
        let src = watched(&m);
        let now = 1_700_000_000.5;
        let snapshot = [
            deadline("zeta", now + 0.125, Some(now + 1e9), true),
            deadline("quote\"d", now - 3.0, None, true),
            deadline("back\\slash\nnew line", 1.0, Some(-0.0), true),
            deadline("ümlaut-ü", 1_776_000_000.0, Some(1_800_000_000.001), true),
            deadline("a", now + 86_400.0 * 90.0, Some(f64::INFINITY), true),
            deadline("dead", now, Some(now), false),
            deadline("nan", f64::NAN, Some(now), true),
            deadline("A-upper", 0.1 + 0.2, Some(1e-7), true),
        ];
        src.set_connection_deadlines(&snapshot, now);
        let reference = Registry::new();
        let gauge_vec = |name: &str, help: &str| {
            register_gauge_vec_with_registry!(name, help, &["connection"], reference).unwrap()
        };
        let inactivity = gauge_vec(INACTIVITY_NAME, INACTIVITY_HELP);
        let absolute = gauge_vec(ABSOLUTE_NAME, ABSOLUTE_HELP);
        for d in snapshot
            .iter()
            .filter(|d| d.active && d.inactivity_unix.is_finite())
        {
            inactivity
                .with_label_values(&[d.id.as_str()])
                .set(d.inactivity_unix);
            if let Some(a) = d.absolute_unix.filter(|a| a.is_finite()) {
                absolute.with_label_values(&[d.id.as_str()]).set(a);
            }
        }
        let expected = TextEncoder::new()
            .encode_to_string(&reference.gather())
            .unwrap();
        let t = m.render();
        assert!(expected.contains("quote\\\"d"), "{expected}");
        assert!(
            t.contains(&format!("{expected}# HELP tokend_connections ")),
            "expected\n{expected}\nin\n{t}"
        );
        assert_eq!(t.matches("connection=\"").count(), 10, "{t}");

        // No absolute deadline at all: no such family, as the registry leaves it out.
        src.set_connection_deadlines(&[deadline("b", now + 1.0, None, true)], now);
        let t = m.render();
        assert!(!t.contains(ABSOLUTE_NAME), "{t}");
        assert!(
            t.contains(&format!(
                "# HELP {INACTIVITY_NAME} {INACTIVITY_HELP}\n# TYPE {INACTIVITY_NAME} gauge\n\
                 {INACTIVITY_NAME}{{connection=\"b\"}} 1700000001.5\n# HELP tokend_connections "
            )),
            "{t}"
        );
    }

    #[test]
    fn per_connection_series_can_be_turned_off() {
        let m = Metrics::new(false);
        let src = watched(&m);
        let now = 1_000_000.0;
        src.set_connection_deadlines(
            &[
                deadline("a", now + 500.0, Some(now + 900.0), true),
                deadline("b", now + 200.0, None, true),
            ],
            now,
        );
        let t = m.render();
        assert!(!t.contains("tokend_connection_inactivity_deadline"), "{t}");
        assert!(!t.contains("tokend_connection_absolute_deadline"), "{t}");
        assert!(!t.contains("connection=\""), "{t}");
        assert_eq!(value(&t, "tokend_inactivity_headroom_seconds"), Some(200.0));
    }

    /// A rendered sample (and the empty-ledger case, with its +Inf headroom) passes
    /// `promtool check metrics`: when promtool is installed, and always in CI, where
    /// `TOKEND_REQUIRE_PROMTOOL` is set.
    #[test]
    fn sample_for_promtool() {
        let m = Metrics::new(true);
        let src = watched(&m);
        src.set_connections(2, 1);
        m.refresh_outcome(RefreshOutcome::Success, Duration::from_millis(150));
        m.refresh_outcome(RefreshOutcome::TransientError, Duration::from_secs(31));
        m.token_request(TokenOutcome::Refreshed);
        m.api_request("/v1/token", 200, Duration::from_micros(60));
        m.site_resolution(true);
        m.job_success(JOB_RESOLVE_SITES, unix_now());
        m.set_job_period(JOB_RESOLVE_SITES, 3_600.0);
        m.set_job_period(JOB_MAINTENANCE, 86_400.0);
        let now = unix_now();
        src.set_connection_deadlines(
            &[
                deadline(
                    "conn-1",
                    now + 80.0 * 86_400.0,
                    Some(now + 300.0 * 86_400.0),
                    true,
                ),
                deadline("conn-2", now + 89.0 * 86_400.0, None, true),
                deadline("conn-3", now - 86_400.0, None, false),
            ],
            now,
        );
        let t = m.render();
        assert!(t.ends_with('\n'));
        for text in [t, Metrics::new(true).render()] {
            promtool_check(&text);
        }
    }

    /// Runs `promtool check metrics` on `text` if promtool is installed; required (a missing
    /// promtool fails) when `TOKEND_REQUIRE_PROMTOOL` is set, as `.ci/run` does.
    pub(crate) fn promtool_check(text: &str) {
        use std::io::Write;
        let spawned = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    std::env::var_os("TOKEND_REQUIRE_PROMTOOL").is_none(),
                    "promtool is required here but cannot run: {e}"
                );
                return;
            }
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A minimal HTTP/1.1 client: one GET, `Connection: close`, returns (status, headers,
    /// body).
    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    #[tokio::test]
    async fn serve_answers_the_probes() {
        let metrics = Arc::new(Metrics::new(true));
        let src = watched(&metrics);
        src.set_connections(1, 0);
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let readiness: Readiness = {
            let ready = ready.clone();
            Arc::new(move || {
                let ok = ready.load(std::sync::atomic::Ordering::SeqCst);
                Box::pin(async move {
                    if ok {
                        Ok(())
                    } else {
                        Err("ledger not writable".to_owned())
                    }
                })
            })
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, metrics, readiness, async move {
            let _ = stop_rx.await;
        }));

        let (status, head, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        assert_eq!(
            value(&body, "tokend_connections{status=\"active\"}"),
            Some(1.0)
        );

        let (status, _, body) = get(addr, "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok"));

        let (status, _, body) = get(addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (200, "ready"));

        ready.store(false, std::sync::atomic::Ordering::SeqCst);
        let (status, _, body) = get(addr, "/readyz").await;
        assert_eq!(status, 503);
        assert!(body.contains("ledger not writable"), "{body}");

        let (status, _, _) = get(addr, "/nope").await;
        assert_eq!(status, 404);
        let (status, _, _) = get(addr, "/metrics/extra").await;
        assert_eq!(status, 404);

        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("serve stops on shutdown")
            .unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_readiness_check_is_not_ready() {
        let readiness: Readiness = Arc::new(|| Box::pin(std::future::pending()));
        let app = router(Arc::new(Metrics::new(false)), readiness);
        let resp = app
            .oneshot(
                axum::http::Request::get("/readyz")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(resp.into_body(), 1024).await.unwrap();
        assert!(String::from_utf8_lossy(&body).contains("took longer"));
    }

    /// The Grafana dashboard shipped in `contrib/grafana/` (and in the Debian package).
    const DASHBOARD: &str = include_str!("../contrib/grafana/tokend.json");

    /// PromQL functions and aggregations the dashboard may call.
    const PROMQL_FUNCTIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "bottomk",
        "topk",
        "rate",
        "irate",
        "increase",
        "histogram_quantile",
        "time",
        "clamp_min",
        "max_over_time",
        "min_over_time",
        "absent",
        "vector",
        "scalar",
    ];
    /// Keywords followed by a parenthesised list of label names, not metrics.
    const PROMQL_LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    /// Other keywords.
    const PROMQL_KEYWORDS: &[&str] = &["bool", "offset", "and", "or", "unless"];

    /// The index after the `close` matching the opener at `i` (quotes inside skipped).
    fn skip_group(c: &[char], mut i: usize, open: char, close: char) -> usize {
        let mut depth = 0;
        while i < c.len() {
            match c[i] {
                '"' | '\'' | '`' => i = skip_string(c, i) - 1,
                x if x == open => depth += 1,
                x if x == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        panic!(
            "unbalanced {open}{close} in {}",
            c.iter().collect::<String>()
        )
    }

    /// The index after the string literal starting at `i`.
    fn skip_string(c: &[char], i: usize) -> usize {
        let quote = c[i];
        let mut j = i + 1;
        while j < c.len() && c[j] != quote {
            j += if c[j] == '\\' { 2 } else { 1 };
        }
        j + 1
    }

    /// The metric names a PromQL expression selects: every identifier outside strings,
    /// label matchers, ranges and grouping lists that is not a function or keyword. An
    /// unknown function is an error, so a metric name cannot hide as one.
    fn promql_metrics(expr: &str) -> Vec<String> {
        let c: Vec<char> = expr.chars().collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < c.len() {
            match c[i] {
                '"' | '\'' | '`' => i = skip_string(&c, i),
                '{' => i = skip_group(&c, i, '{', '}'),
                '[' => i = skip_group(&c, i, '[', ']'),
                d if d.is_ascii_digit() || d == '.' => {
                    while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                        i += 1;
                    }
                }
                a if a.is_ascii_alphabetic() || a == '_' || a == ':' => {
                    let start = i;
                    while i < c.len()
                        && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':')
                    {
                        i += 1;
                    }
                    let ident: String = c[start..i].iter().collect();
                    let mut next = i;
                    while next < c.len() && c[next].is_whitespace() {
                        next += 1;
                    }
                    let call = c.get(next) == Some(&'(');
                    if PROMQL_LABEL_LISTS.contains(&ident.as_str()) {
                        if call {
                            i = skip_group(&c, next, '(', ')');
                        }
                    } else if PROMQL_FUNCTIONS.contains(&ident.as_str())
                        || PROMQL_KEYWORDS.contains(&ident.as_str())
                    {
                    } else if call {
                        panic!("unknown PromQL function {ident} in {expr}");
                    } else {
                        out.push(ident);
                    }
                }
                _ => i += 1,
            }
        }
        out
    }

    /// Every queried expression of the dashboard: panel targets and the metric of each
    /// `label_values(METRIC..., label)` variable.
    fn dashboard_queries() -> Vec<String> {
        let d: serde_json::Value = serde_json::from_str(DASHBOARD).expect("valid JSON");
        let mut out = Vec::new();
        for panel in d["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().expect("every target has an expr");
                out.push(expr.to_owned());
            }
        }
        for var in d["templating"]["list"].as_array().expect("templating") {
            if let Some(q) = var["definition"].as_str() {
                let inner = q
                    .strip_prefix("label_values(")
                    .unwrap_or_else(|| panic!("unexpected variable query {q}"));
                let metric = inner.split(['{', ',', ')']).next().unwrap().trim();
                out.push(metric.to_owned());
            }
        }
        out
    }

    /// Every sample name `/metrics` can carry: each family, with `_bucket`, `_sum` and
    /// `_count` for histograms, rendered with every series populated.
    fn exported_names() -> Vec<String> {
        let m = Metrics::new(true);
        m.declare_api_routes(DECLARED_ROUTES);
        let source = watched(&m);
        source.set_connections(1, 1);
        source.set_connection_deadlines(&[deadline("c1", 2e9, Some(3e9), true)], 1e9);
        m.refresh_outcome(RefreshOutcome::Success, Duration::from_millis(5));
        m.token_request(TokenOutcome::Cached);
        m.api_request(DECLARED_ROUTES[0], 200, Duration::from_millis(1));
        m.site_resolution(true);
        m.audit_write(true);
        m.job_success(KNOWN_JOBS[0], 1e9);
        m.set_job_period(KNOWN_JOBS[0], 3600.0);
        // Exported only with a shared ledger, from its first report.
        m.set_ledger_up(true);
        let mut out = Vec::new();
        for line in m.render().lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let (name, kind) = rest.split_once(' ').unwrap();
            out.push(name.to_owned());
            if kind == "histogram" || kind == "summary" {
                out.extend(["_sum", "_count"].map(|s| format!("{name}{s}")));
            }
            if kind == "histogram" {
                out.push(format!("{name}_bucket"));
            }
        }
        out
    }

    #[test]
    fn promql_metric_extraction() {
        assert_eq!(
            promql_metrics(
                "histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{x=~\"$i\",y=\"}\"}[$__rate_interval])))"
            ),
            ["a_bucket"]
        );
        assert_eq!(
            promql_metrics("time() - max by (cron_job) (b{i=\"1\"}) / on (x) c"),
            ["b", "c"]
        );
        assert!(std::panic::catch_unwind(|| promql_metrics("tokend_nope(x)")).is_err());
    }

    #[test]
    fn the_dashboard_queries_only_metrics_tokend_exports() {
        let exported = exported_names();
        let queries = dashboard_queries();
        assert!(queries.len() > 15, "{queries:?}");
        let mut used = Vec::new();
        for q in &queries {
            let names = promql_metrics(q);
            assert!(!names.is_empty(), "a query that reads no metric: {q}");
            for name in names {
                assert!(
                    exported.contains(&name),
                    "contrib/grafana/tokend.json queries {name}, which tokend does not export: {q}"
                );
                used.push(name);
            }
        }
        // And it shows every metric of INTERFACE.md.
        for name in INTERFACE_METRICS {
            assert!(
                used.iter()
                    .any(|u| u.strip_suffix("_bucket").unwrap_or(u) == *name),
                "the dashboard does not show {name}"
            );
        }
    }
}
