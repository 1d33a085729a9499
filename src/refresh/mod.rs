//! The refresh engine: keeps every chain in memory, refreshes it one request at a time, and
//! decides when to refresh next.
//!
//! Callers ([`Engine::token`], [`Engine::refresh_now`], the scheduler) never talk to the
//! provider themselves: they go through [`Engine`], which
//!
//! - serves cached access tokens from memory, without touching SQLite;
//! - lets at most one refresh per connection be in flight (a per-connection async mutex),
//!   and lets every caller that waited on it share its outcome instead of starting another;
//! - bounds refreshes across connections with a semaphore of `refresh.max_concurrent`;
//! - commits the rotated refresh token to the ledger *before* publishing the new access
//!   token, and keeps the rotated token in memory (refusing to rotate further) if that commit
//!   fails, until it succeeds;
//! - marks an attempt in the ledger before sending it, so that a crash or an unknown outcome
//!   is recovered by presenting the same token again inside the provider's reuse leeway;
//! - classifies failures: only a definite rejection marks a chain `needs_reauth`; anything
//!   else backs off (exponential, jittered, never before `Retry-After`).
//!
//! **Architecture Invariant:** one refresh in flight per connection, across API callers,
//! schedules and retries: every provider call for a connection happens while holding that
//! connection's `flight` lock.

pub mod backoff;
mod plan;

use crate::config::RefreshConfig;
use crate::ledger::{Ledger, LedgerError};
use crate::metrics::{Metrics, RefreshOutcome};
use crate::model::{
    AccessToken, Chain, Connection, Event, LastError, PROVIDER_ATLASSIAN, Record, Status, Time,
    new_connection_id,
};
use crate::notify::{Kind, Notification};
use crate::provider::{
    ASSUMED_ACCESS_LIFETIME, Atlassian, Grant, LEEWAY_SAFETY_MARGIN, ProviderError, REUSE_LEEWAY,
    TransientKind,
};
use crate::secret::Secret;
use chrono::Utc;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// How long a `state` handed out by `POST /v1/authorizations` stays valid. The consent screen
/// plus Atlassian's 10-minute code lifetime fit inside it.
pub const AUTHORIZATION_TTL: Duration = Duration::from_secs(15 * 60);

/// The most pending authorizations kept; older ones are dropped first. Bounds memory if a
/// client keeps asking for consent URLs.
const MAX_PENDING_AUTHORIZATIONS: usize = 1024;

/// Site resolution uses the cached access token when it has at least this long left, and
/// otherwise asks for one valid this long: enough for two small GETs.
const RESOLVE_MIN_VALID: Duration = Duration::from_secs(10);

/// How far ahead of a connection's absolute (consent) expiry tokend starts warning daily.
pub const ABSOLUTE_WARNING_WINDOW: Duration = Duration::from_secs(14 * 86_400);

/// The scheduler loop wakes at least this often, even with nothing due, to prove it is
/// alive (health and the systemd watchdog look at its heartbeat).
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// After a failed commit of a rotated token, how soon the scheduler tries the commit again.
const COMMIT_RETRY: Duration = Duration::from_secs(2);

/// A token within `lifetime / FRESH_SLACK_DIVISOR` (at most [`FRESH_SLACK_MAX`]) of its
/// full lifetime counts as fresh: see `satisfies`.
const FRESH_SLACK_DIVISOR: u32 = 10;

/// See [`FRESH_SLACK_DIVISOR`]: one minute is far more than a refresh round trip.
const FRESH_SLACK_MAX: Duration = Duration::from_secs(60);

/// Labels longer than this are refused: they end up in table cells and log lines.
const MAX_LABEL_LEN: usize = 64;

/// Why a token could not be handed out or a refresh did not happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No such connection (by id or label).
    NotFound,
    /// The chain was rejected by the provider; a person must consent again.
    NeedsReauth(String),
    /// The provider could not be reached or asked us to wait; nothing about the chain
    /// changed. `retry_after` says when a new attempt is allowed.
    Unavailable {
        /// When to try again.
        retry_after: Duration,
        /// What happened.
        message: String,
    },
    /// The request itself is wrong (bad label, provider not configured, bad code/state).
    BadRequest(String),
    /// The request conflicts with the ledger (e.g. a label in use).
    Conflict(String),
    /// tokend failed internally (the ledger cannot be written).
    Internal(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NotFound => f.write_str("no such connection"),
            Failure::NeedsReauth(m)
            | Failure::BadRequest(m)
            | Failure::Conflict(m)
            | Failure::Internal(m) => f.write_str(m),
            Failure::Unavailable { message, .. } => f.write_str(message),
        }
    }
}

/// Where a handed-out token came from (for metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// From memory, no provider call.
    Cached,
    /// A refresh was needed (made by this caller or shared with another).
    Refreshed,
}

/// A connection as shown by the API: the record's public face plus derived deadlines.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    /// The public fields.
    pub conn: Connection,
    /// When the current access token expires.
    pub access_token_expires_at: Option<Time>,
    /// When the current refresh token was obtained.
    pub refresh_token_rotated_at: Time,
    /// When tokend plans to refresh next (None when it will not: `needs_reauth`).
    pub next_rotation_at: Option<Time>,
    /// When the refresh token dies if unused.
    pub inactivity_expires_at: Time,
    /// When consent runs out (None when unknown / disabled).
    pub absolute_expires_at: Option<Time>,
}

/// A token handed to a caller.
#[derive(Debug)]
pub struct TokenGrant {
    /// The connection it belongs to (its public face only: the token path skips the
    /// deadline computations of [`ConnectionInfo`]).
    pub conn: Connection,
    /// The bearer token.
    pub access_token: Secret,
    /// When it expires.
    pub expires_at: Time,
    /// Cached or refreshed.
    pub served: Served,
}

/// The result of adding a connection.
#[derive(Debug)]
pub struct Added {
    /// The connection now holding the chain.
    pub info: ConnectionInfo,
    /// True when a new connection was created; false when an existing connection of the
    /// same account took the chain.
    pub created: bool,
}

/// A pending consent flow.
struct PendingAuthorization {
    created: Instant,
}

/// Per-connection state. Lock order: `flight` (async) before `state` (sync, never held across
/// an `.await`).
struct Slot {
    /// The single-flight gate: held for the whole of a refresh, provider call included.
    flight: Arc<tokio::sync::Mutex<()>>,
    state: Mutex<SlotState>,
}

struct SlotState {
    rec: Record,
    /// Completed refresh attempts; a caller that waited on `flight` compares it with what it
    /// saw before waiting to know whether an attempt finished meanwhile.
    attempts: u64,
    /// The outcome of the last completed attempt, shared with those waiting callers.
    last_outcome: Result<(), Failure>,
    /// No provider call before this instant (backoff or `Retry-After`).
    not_before: Option<Instant>,
    /// The provider itself asked for this wait (`Retry-After`): even an explicit refresh
    /// honours it.
    provider_asked: bool,
    /// `rec.chain` holds a rotated token the ledger has not committed yet: never rotate
    /// further and never hand out its access token until the commit succeeds.
    uncommitted: bool,
    /// The last time a caller asked for a token (hot connections are renewed ahead).
    last_requested: Option<Instant>,
    /// Set when the connection is removed, so that holders of the `Arc` stop.
    removed: bool,
}

#[derive(Default)]
struct Index {
    by_id: HashMap<String, Arc<Slot>>,
    by_label: HashMap<String, String>,
}

/// The refresh engine. Cheap to share behind an `Arc`.
pub struct Engine {
    ledger: Ledger,
    provider: Atlassian,
    settings: RwLock<RefreshConfig>,
    index: RwLock<Index>,
    permits: Arc<Semaphore>,
    max_concurrent: Mutex<usize>,
    authorizations: Mutex<HashMap<String, PendingAuthorization>>,
    plan: plan::Planner,
    notifier: RwLock<crate::notify::Notifier>,
    metrics: Arc<Metrics>,
    last_heartbeat: Mutex<Instant>,
}

impl Engine {
    /// Loads every connection from the ledger into memory.
    pub async fn load(
        ledger: Ledger,
        provider: Atlassian,
        settings: RefreshConfig,
        notifier: crate::notify::Notifier,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Engine>, LedgerError> {
        let records = ledger.load_all().await?;
        let max = settings.max_concurrent.max(1);
        let engine = Arc::new(Engine {
            ledger,
            provider,
            settings: RwLock::new(settings),
            index: RwLock::new(Index::default()),
            permits: Arc::new(Semaphore::new(max)),
            max_concurrent: Mutex::new(max),
            authorizations: Mutex::new(HashMap::new()),
            plan: plan::Planner::new(),
            notifier: RwLock::new(notifier),
            metrics,
            last_heartbeat: Mutex::new(Instant::now()),
        });
        for rec in records {
            if rec.chain.attempt_started_at.is_some() {
                tracing::warn!(
                    connection = %rec.conn.id,
                    "a refresh was in flight when tokend stopped; retrying it with the same token inside the provider's reuse leeway"
                );
            }
            engine.install(rec);
        }
        for id in engine.ids() {
            engine.replan(&id);
        }
        Ok(engine)
    }

    /// The provider client.
    pub fn provider(&self) -> &Atlassian {
        &self.provider
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Applies new refresh settings (a reload) and re-plans every connection.
    pub fn set_settings(&self, new: RefreshConfig) {
        let new_max = new.max_concurrent.max(1);
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = new;
        let old_max = std::mem::replace(&mut *lock(&self.max_concurrent), new_max);
        if new_max > old_max {
            self.permits.add_permits(new_max - old_max);
        } else if new_max < old_max {
            let permits = self.permits.clone();
            let fewer = (old_max - new_max) as u32;
            tokio::spawn(async move {
                if let Ok(p) = permits.acquire_many(fewer).await {
                    p.forget();
                }
            });
        }
        for id in self.ids() {
            self.replan(&id);
        }
    }

    /// Replaces the notifier (a reload changed `[notify]`).
    pub fn set_notifier(&self, notifier: crate::notify::Notifier) {
        *self.notifier.write().unwrap_or_else(|p| p.into_inner()) = notifier;
    }

    /// The refresh settings in force.
    pub fn settings(&self) -> RefreshConfig {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn install(&self, rec: Record) {
        let id = rec.conn.id.clone();
        let label = rec.conn.label.clone();
        let slot = Arc::new(Slot {
            flight: Arc::new(tokio::sync::Mutex::new(())),
            state: Mutex::new(SlotState {
                rec,
                attempts: 0,
                last_outcome: Ok(()),
                not_before: None,
                provider_asked: false,
                uncommitted: false,
                last_requested: None,
                removed: false,
            }),
        });
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        index.by_label.insert(label, id.clone());
        index.by_id.insert(id, slot);
    }

    fn uninstall(&self, id: &str) {
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = index.by_id.remove(id) {
            let mut st = lock(&slot.state);
            st.removed = true;
            let label = st.rec.conn.label.clone();
            drop(st);
            if index.by_label.get(&label).map(String::as_str) == Some(id) {
                index.by_label.remove(&label);
            }
        }
        drop(index);
        self.plan.cancel(id);
    }

    fn ids(&self) -> Vec<String> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        index.by_id.keys().cloned().collect()
    }

    /// Finds a connection by id, or else by label.
    fn find(&self, id_or_label: &str) -> Option<(String, Arc<Slot>)> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = index.by_id.get(id_or_label) {
            return Some((id_or_label.to_owned(), slot.clone()));
        }
        let id = index.by_label.get(id_or_label)?;
        Some((id.clone(), index.by_id.get(id)?.clone()))
    }

    /// The id and label of a connection (by id or label), cheaply: for access checks on the
    /// token path.
    pub fn identity(&self, id_or_label: &str) -> Option<(String, String)> {
        let (id, slot) = self.find(id_or_label)?;
        let st = lock(&slot.state);
        (!st.removed).then(|| (id, st.rec.conn.label.clone()))
    }

    fn info_of(&self, st: &SlotState) -> ConnectionInfo {
        let settings = self.settings();
        let rec = &st.rec;
        ConnectionInfo {
            conn: rec.conn.clone(),
            access_token_expires_at: rec.chain.access.as_ref().map(|a| a.expires_at),
            refresh_token_rotated_at: rec.chain.rotated_at,
            next_rotation_at: self.plan.next_wall(&rec.conn.id),
            inactivity_expires_at: rec.chain.rotated_at + chrono_dur(settings.inactivity_expiry),
            absolute_expires_at: settings
                .absolute_expiry
                .map(|a| rec.conn.consented_at + chrono_dur(a)),
        }
    }

    /// Every connection, sorted by label.
    pub fn list(&self) -> Vec<ConnectionInfo> {
        let slots: Vec<Arc<Slot>> = {
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            index.by_id.values().cloned().collect()
        };
        let mut out: Vec<ConnectionInfo> = slots
            .iter()
            .map(|s| self.info_of(&lock(&s.state)))
            .collect();
        out.sort_by(|a, b| a.conn.label.cmp(&b.conn.label));
        out
    }

    /// One connection by id or label.
    pub fn get(&self, id_or_label: &str) -> Option<ConnectionInfo> {
        let (_, slot) = self.find(id_or_label)?;
        let st = lock(&slot.state);
        (!st.removed).then(|| self.info_of(&st))
    }

    /// The ids of active connections.
    pub fn active_ids(&self) -> Vec<String> {
        self.list()
            .into_iter()
            .filter(|c| c.conn.status == Status::Active)
            .map(|c| c.conn.id)
            .collect()
    }

    /// Counts of connections by status: `(active, needs_reauth)`.
    pub fn status_counts(&self) -> (usize, usize) {
        let list = self.list();
        let active = list
            .iter()
            .filter(|c| c.conn.status == Status::Active)
            .count();
        (active, list.len() - active)
    }

    /// The ids of active connections that reach a site (by host or cloud id).
    pub fn connections_for_site(&self, site: &str) -> Vec<String> {
        let wanted = site.trim().trim_end_matches('/').to_ascii_lowercase();
        let wanted_host = url::Url::parse(&wanted)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_else(|| wanted.clone());
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        index
            .by_id
            .iter()
            .filter(|(_, slot)| {
                let st = lock(&slot.state);
                !st.removed
                    && st.rec.conn.status == Status::Active
                    && st.rec.conn.sites.iter().any(|s| {
                        s.cloud_id.eq_ignore_ascii_case(&wanted)
                            || s.host().as_deref() == Some(wanted_host.as_str())
                    })
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A fresh access token valid for at least `min_valid` (or the freshest the provider
    /// gives, if its lifetime is shorter).
    pub async fn token(
        &self,
        id_or_label: &str,
        min_valid: Duration,
    ) -> Result<TokenGrant, Failure> {
        self.token_inner(id_or_label, min_valid, true).await
    }

    /// [`Engine::token`]; `caller` says whether a service asked (which makes the connection
    /// hot) or tokend itself needs the token (site resolution), which must not.
    async fn token_inner(
        &self,
        id_or_label: &str,
        min_valid: Duration,
        caller: bool,
    ) -> Result<TokenGrant, Failure> {
        let (id, slot) = self.find(id_or_label).ok_or(Failure::NotFound)?;
        let seen = {
            let mut st = lock(&slot.state);
            if st.removed {
                return Err(Failure::NotFound);
            }
            let was_hot = plan::is_hot(&st.rec, st.last_requested);
            if caller {
                st.last_requested = Some(Instant::now());
            }
            if caller && !was_hot {
                // Became hot: plan its access renewal ahead of expiry from now on.
                drop(st);
                self.replan(&id);
                st = lock(&slot.state);
            }
            if st.rec.conn.status == Status::NeedsReauth {
                return Err(needs_reauth_failure(&st.rec.conn));
            }
            if !st.uncommitted
                && satisfies(&st.rec, min_valid)
                && let Some(a) = &st.rec.chain.access
            {
                return Ok(Self::grant_of(&st, a.clone(), Served::Cached));
            }
            st.attempts
        };
        let outcome = self
            .refresh_shared(&id, &slot, seen, Need::Lifetime(min_valid))
            .await;
        let st = lock(&slot.state);
        if st.removed {
            return Err(Failure::NotFound);
        }
        match outcome {
            Ok(()) => match (&st.rec.chain.access, st.uncommitted) {
                (Some(a), false) => Ok(Self::grant_of(&st, a.clone(), Served::Refreshed)),
                _ => Err(Failure::Internal(
                    "the refreshed token is not committed to the ledger yet".into(),
                )),
            },
            Err(Failure::Unavailable {
                retry_after,
                message,
            }) => {
                // A transient failure: a cached token that is still valid beats a 503.
                if !st.uncommitted
                    && st.rec.conn.status == Status::Active
                    && let Some(a) = &st.rec.chain.access
                    && a.expires_at > Utc::now()
                {
                    return Ok(Self::grant_of(&st, a.clone(), Served::Cached));
                }
                Err(Failure::Unavailable {
                    retry_after,
                    message,
                })
            }
            Err(other) => Err(other),
        }
    }

    fn grant_of(st: &SlotState, a: AccessToken, served: Served) -> TokenGrant {
        TokenGrant {
            conn: st.rec.conn.clone(),
            access_token: a.token,
            expires_at: a.expires_at,
            served,
        }
    }

    /// Rotates a connection's chain now (an operator's request). Honours a provider's
    /// `Retry-After` but not tokend's own backoff; also tries a `needs_reauth` chain again.
    pub async fn refresh_now(&self, id_or_label: &str) -> Result<ConnectionInfo, Failure> {
        let (id, slot) = self.find(id_or_label).ok_or(Failure::NotFound)?;
        let seen = lock(&slot.state).attempts;
        self.refresh_shared(&id, &slot, seen, Need::Forced).await?;
        let st = lock(&slot.state);
        Ok(self.info_of(&st))
    }

    /// Runs one refresh attempt for the slot, unless one completed while this caller waited
    /// for the flight lock, in which case its outcome is shared.
    async fn refresh_shared(
        &self,
        id: &str,
        slot: &Arc<Slot>,
        seen: u64,
        need: Need,
    ) -> Result<(), Failure> {
        let flight = slot.flight.clone().lock_owned().await;
        if let Some(outcome) = shared_outcome(slot, seen, need) {
            return outcome;
        }
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Failure::Internal("refresh engine is shutting down".into()))?;
        self.attempt_locked(id, slot, need, flight, permit).await
    }

    /// Runs one attempt while holding the connection's flight lock and a permit, records its
    /// outcome for callers that waited, and re-plans.
    async fn attempt_locked(
        &self,
        id: &str,
        slot: &Arc<Slot>,
        need: Need,
        _flight: tokio::sync::OwnedMutexGuard<()>,
        _permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<(), Failure> {
        let outcome = self.attempt(id, slot, need).await;
        {
            let mut st = lock(&slot.state);
            st.attempts += 1;
            st.last_outcome = outcome.clone();
            // Whatever failed without setting its own backoff (the ledger refused the attempt
            // record, the provider is not configured) must not be retried in a tight loop.
            // (A backoff already running is left alone: callers during it must not push
            // it further out.)
            let now = Instant::now();
            if matches!(
                outcome,
                Err(Failure::Internal(_) | Failure::Unavailable { .. })
            ) && st.not_before.is_none_or(|nb| nb <= now)
            {
                st.not_before = Some(now + self.settings().backoff_min);
            }
        }
        self.replan(id);
        outcome
    }

    /// One attempt, holding the flight lock and a concurrency permit.
    async fn attempt(&self, id: &str, slot: &Slot, need: Need) -> Result<(), Failure> {
        let settings = self.settings();
        // 1. A rotated token that is not committed yet must be committed before anything.
        let pending = {
            let st = lock(&slot.state);
            st.uncommitted.then(|| st.rec.clone())
        };
        if let Some(rec) = pending {
            self.ledger
                .save(rec, None, vec![])
                .await
                .map_err(|e| commit_failure(id, &e))?;
            lock(&slot.state).uncommitted = false;
            tracing::info!(connection = %id, "rotated refresh token committed after an earlier failure");
        }
        let (rec, wait) = {
            let st = lock(&slot.state);
            let wait = st.not_before.and_then(|nb| {
                let honour = need != Need::Forced || st.provider_asked;
                (honour && nb > Instant::now()).then(|| nb - Instant::now())
            });
            (st.rec.clone(), wait)
        };
        if rec.conn.status == Status::NeedsReauth && need != Need::Forced {
            return Err(needs_reauth_failure(&rec.conn));
        }
        if let Some(wait) = wait {
            let message = rec
                .conn
                .last_error
                .as_ref()
                .map(|e| {
                    format!(
                        "the provider is unavailable ({}); retrying later",
                        e.message
                    )
                })
                .unwrap_or_else(|| "the provider is unavailable; retrying later".into());
            return Err(Failure::Unavailable {
                retry_after: wait,
                message,
            });
        }
        if let Some(reason) = self.provider.not_configured() {
            return Err(Failure::Unavailable {
                retry_after: settings.backoff_max,
                message: reason,
            });
        }

        // 2. Record the attempt durably before the token leaves the process.
        let mut rec = rec;
        if rec.chain.attempt_started_at.is_none() {
            let mut marked = rec.clone();
            marked.chain.attempt_started_at = Some(Utc::now());
            self.ledger
                .save(marked.clone(), Some(rec.chain.refresh_token.clone()), vec![])
                .await
                .map_err(|e| {
                    tracing::error!(connection = %id, error = %e, "cannot record a refresh attempt in the ledger; not refreshing");
                    Failure::Internal(format!("the ledger cannot be written: {e}"))
                })?;
            lock(&slot.state).rec = marked.clone();
            rec = marked;
        } else if let Some(started) = rec.chain.attempt_started_at {
            let age = (Utc::now() - started).to_std().unwrap_or_default();
            if age > REUSE_LEEWAY.saturating_sub(LEEWAY_SAFETY_MARGIN) {
                // The outcome of an earlier attempt is unknown and the leeway has passed. The
                // stored token is the only one tokend has: if the provider never saw that
                // attempt it is still valid; if it did, the chain is already lost to us and
                // presenting the token cannot make that worse.
                tracing::warn!(
                    connection = %id,
                    attempt_age_secs = age.as_secs(),
                    "the outcome of an earlier refresh is unknown and the reuse leeway has passed; presenting the stored token as the only way to keep the chain"
                );
            }
        }

        // 3. Ask the provider.
        tracing::debug!(connection = %id, "refreshing");
        let started = Instant::now();
        let result = self.provider.refresh(&rec.chain.refresh_token).await;
        let outcome = match &result {
            Ok(_) => RefreshOutcome::Success,
            Err(ProviderError::Rejected { .. }) => RefreshOutcome::Rejected,
            Err(_) => RefreshOutcome::TransientError,
        };
        self.metrics.refresh_outcome(outcome, started.elapsed());
        match result {
            Ok(grant) => self.commit_grant(id, slot, rec, grant).await,
            Err(ProviderError::Rejected { code, description }) => {
                if let Some(outcome) = self.try_previous(id, slot, &rec).await {
                    return outcome;
                }
                self.mark_needs_reauth(id, slot, rec, code, description)
                    .await
            }
            Err(e) => self.record_transient(id, slot, rec, e, &settings).await,
        }
    }

    /// After a rejection of the current token, the previous one may still be accepted inside
    /// the reuse leeway (the provider lost the rotation): one try, never outside the leeway.
    async fn try_previous(
        &self,
        id: &str,
        slot: &Slot,
        rec: &Record,
    ) -> Option<Result<(), Failure>> {
        let (prev, rotated_at) = rec.chain.previous.clone()?;
        let age = (Utc::now() - rotated_at).to_std().unwrap_or(Duration::MAX);
        if age > REUSE_LEEWAY.saturating_sub(LEEWAY_SAFETY_MARGIN) {
            return None;
        }
        tracing::warn!(connection = %id, "current refresh token rejected; trying the previous one inside the reuse leeway");
        match self.provider.refresh(&prev).await {
            Ok(grant) => {
                let mut base = rec.clone();
                base.chain.previous = None;
                let outcome = self.commit_grant(id, slot, base, grant).await;
                if outcome.is_ok() {
                    // The rejected token must never be presented again.
                    let mut st = lock(&slot.state);
                    st.rec.chain.previous = None;
                }
                Some(outcome)
            }
            Err(_) => None,
        }
    }

    async fn commit_grant(
        &self,
        id: &str,
        slot: &Slot,
        rec: Record,
        grant: Grant,
    ) -> Result<(), Failure> {
        let now = Utc::now();
        let old_rt = rec.chain.refresh_token.clone();
        let mut next = rec;
        let mut events = Vec::new();
        match grant.refresh_token {
            Some(new_rt) if new_rt.expose() != old_rt.expose() => {
                next.chain.previous = Some((old_rt.clone(), now));
                next.chain.refresh_token = new_rt;
                next.chain.rotated_at = now;
                events.push(Event::new("rotated", "refresh token rotated"));
            }
            _ => {
                events.push(Event::new(
                    "refreshed",
                    "access token renewed; the provider sent no new refresh token, the old one is kept",
                ));
            }
        }
        let lifetime = grant.expires_in.unwrap_or(ASSUMED_ACCESS_LIFETIME);
        next.chain.access = Some(AccessToken {
            token: grant.access_token,
            expires_at: now + chrono_dur(lifetime),
        });
        next.chain.attempt_started_at = None;
        if let Some(scopes) = grant.scopes {
            next.conn.scopes = scopes;
        }
        let recovered = next.conn.status == Status::NeedsReauth;
        if recovered {
            events.push(Event::new("recovered", "the chain works again"));
            next.conn.status = Status::Active;
        }
        next.conn.last_refresh_at = Some(now);
        next.conn.last_error = None;
        next.conn.consecutive_failures = 0;
        next.conn.updated_at = now;
        let saved = self.ledger.save(next.clone(), Some(old_rt), events).await;
        if recovered && saved.is_ok() {
            self.notify(Kind::Recovered, &next.conn, "the chain works again");
        }
        let mut st = lock(&slot.state);
        st.not_before = None;
        st.provider_asked = false;
        st.rec = next;
        match saved {
            Ok(()) => {
                st.uncommitted = false;
                tracing::info!(connection = %id, "refreshed");
                Ok(())
            }
            Err(e) => {
                // The provider rotated the chain but the ledger refused the new token. Keep
                // it in memory, refuse to use it or rotate further, retry the commit. If
                // tokend dies first, the ledger's attempt marker makes the next start present
                // the old token again inside the leeway.
                st.uncommitted = true;
                Err(commit_failure(id, &e))
            }
        }
    }

    async fn mark_needs_reauth(
        &self,
        id: &str,
        slot: &Slot,
        rec: Record,
        code: String,
        description: String,
    ) -> Result<(), Failure> {
        let now = Utc::now();
        let mut next = rec.clone();
        let message =
            format!("the provider rejected the chain ({code}: {description}); consent again");
        next.conn.status = Status::NeedsReauth;
        next.conn.last_error = Some(LastError {
            code: code.clone(),
            message: message.clone(),
            at: now,
        });
        next.conn.consecutive_failures = next.conn.consecutive_failures.saturating_add(1);
        next.conn.updated_at = now;
        next.chain.attempt_started_at = None;
        next.chain.access = None;
        let mut events = vec![Event::new("failed", message.clone())];
        if rec.conn.status != Status::NeedsReauth {
            events.push(Event::new("status_changed", "active -> needs_reauth"));
        }
        tracing::warn!(connection = %id, code = %code, "chain rejected by the provider; needs re-consent");
        if let Err(e) = self
            .ledger
            .save(next.clone(), Some(rec.chain.refresh_token.clone()), events)
            .await
        {
            tracing::error!(connection = %id, error = %e, "cannot record needs_reauth in the ledger");
        }
        if rec.conn.status != Status::NeedsReauth {
            self.notify(Kind::NeedsReauth, &next.conn, &message);
        }
        let mut st = lock(&slot.state);
        st.rec = next;
        Err(Failure::NeedsReauth(message))
    }

    async fn record_transient(
        &self,
        id: &str,
        slot: &Slot,
        rec: Record,
        e: ProviderError,
        settings: &RefreshConfig,
    ) -> Result<(), Failure> {
        let now = Utc::now();
        let ambiguous = e.maybe_processed();
        let failures = rec.conn.consecutive_failures.saturating_add(1);
        let delay = backoff::delay(
            failures,
            settings.backoff_min,
            settings.backoff_max,
            e.retry_after(),
            ambiguous,
        );
        let mut next = rec.clone();
        next.conn.consecutive_failures = failures;
        next.conn.last_error = Some(LastError {
            code: e.code(),
            message: e.to_string(),
            at: now,
        });
        next.conn.updated_at = now;
        if !ambiguous {
            // The provider did not process the request: the token is untouched.
            next.chain.attempt_started_at = None;
        }
        tracing::warn!(
            connection = %id,
            error = %e,
            retry_in_secs = delay.as_secs(),
            ambiguous,
            "refresh failed; will retry"
        );
        let saved = self
            .ledger
            .save(
                next.clone(),
                Some(rec.chain.refresh_token.clone()),
                vec![Event::new("failed", e.to_string())],
            )
            .await;
        if let Err(err) = saved {
            tracing::error!(connection = %id, error = %err, "cannot record a failed refresh in the ledger");
        }
        let mut st = lock(&slot.state);
        st.rec = next;
        st.not_before = Some(Instant::now() + delay);
        st.provider_asked = e.retry_after().is_some();
        let kind_msg = match &e {
            ProviderError::Transient {
                kind: TransientKind::RateLimited,
                ..
            } => "the provider is rate limiting token requests",
            _ => "the provider could not refresh the token",
        };
        Err(Failure::Unavailable {
            retry_after: delay,
            message: format!("{kind_msg}: {e}"),
        })
    }

    fn notify(&self, kind: Kind, conn: &Connection, message: &str) {
        let notifier = self
            .notifier
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        notifier.send(Notification {
            kind,
            connection: conn.id.clone(),
            label: conn.label.clone(),
            message: message.to_owned(),
        });
    }

    /// Warns about every active connection whose absolute (consent) expiry is within
    /// [`ABSOLUTE_WARNING_WINDOW`]: a log line and a notification each. Run daily.
    pub fn warn_absolute_expiry(&self) -> usize {
        let window = chrono_dur(ABSOLUTE_WARNING_WINDOW);
        let now = Utc::now();
        let mut warned = 0;
        for info in self.list() {
            let Some(deadline) = info.absolute_expires_at else {
                continue;
            };
            if info.conn.status != Status::Active || deadline - now > window {
                continue;
            }
            let days = (deadline - now).num_hours() as f64 / 24.0;
            let message = if deadline <= now {
                format!(
                    "consent for {} reached its absolute expiry on {}; a person must consent again (tokend connect)",
                    info.conn.label,
                    deadline.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                )
            } else {
                format!(
                    "consent for {} expires in {days:.1} days ({}); a person must consent again before then (tokend connect)",
                    info.conn.label,
                    deadline.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                )
            };
            tracing::warn!(connection = %info.conn.id, "{message}");
            self.notify(Kind::AbsoluteExpirySoon, &info.conn, &message);
            warned += 1;
        }
        warned
    }

    /// Removes a connection: from memory at once, and from the ledger.
    pub async fn remove(&self, id_or_label: &str) -> Result<(), Failure> {
        let (id, slot) = self.find(id_or_label).ok_or(Failure::NotFound)?;
        // Wait for an in-flight refresh to finish so its commit cannot resurrect the row.
        let _flight = slot.flight.lock().await;
        let deleted = self
            .ledger
            .delete(id.clone(), Utc::now())
            .await
            .map_err(|e| Failure::Internal(format!("the ledger cannot be written: {e}")))?;
        self.uninstall(&id);
        if deleted {
            tracing::info!(connection = %id, "connection removed");
            Ok(())
        } else {
            Err(Failure::NotFound)
        }
    }

    /// Starts a consent flow: a single-use `state` and the URL to open.
    pub fn authorize(&self) -> Result<(String, String, String), Failure> {
        if let Some(reason) = self.provider.not_configured() {
            return Err(Failure::BadRequest(reason));
        }
        let state = crate::provider::new_state();
        let url = self.provider.authorize_url(&state);
        let mut pending = lock(&self.authorizations);
        pending.retain(|_, p| p.created.elapsed() < AUTHORIZATION_TTL);
        if pending.len() >= MAX_PENDING_AUTHORIZATIONS
            && let Some(oldest) = pending
                .iter()
                .min_by_key(|(_, p)| p.created)
                .map(|(k, _)| k.clone())
        {
            pending.remove(&oldest);
        }
        pending.insert(
            state.clone(),
            PendingAuthorization {
                created: Instant::now(),
            },
        );
        Ok((url, state, self.provider.config().redirect_uri.to_string()))
    }

    /// Adds a connection from an existing refresh token. The token is refreshed at once (so
    /// the stored chain is proven alive); the account and sites are resolved; an existing
    /// connection of the same account takes the new chain instead of a second one being made.
    pub async fn import(&self, label: &str, refresh_token: Secret) -> Result<Added, Failure> {
        validate_label(label)?;
        if refresh_token.expose().trim().is_empty() {
            return Err(Failure::BadRequest("the refresh token is empty".into()));
        }
        if let Some(reason) = self.provider.not_configured() {
            return Err(Failure::BadRequest(format!(
                "cannot add a connection: {reason}"
            )));
        }
        let now = Utc::now();
        let rec = self.new_record(label, Secret::new(refresh_token.expose().trim()), None, now);
        let id = rec.conn.id.clone();
        self.ledger
            .insert(
                rec.clone(),
                vec![Event::new(
                    "imported",
                    format!("imported as {:?}", rec.conn.label),
                )],
            )
            .await
            .map_err(ledger_failure)?;
        self.install(rec);
        let (_, slot) = self.find(&id).ok_or(Failure::NotFound)?;
        let seen = lock(&slot.state).attempts;
        match self.refresh_shared(&id, &slot, seen, Need::Forced).await {
            Ok(()) => {}
            Err(Failure::NeedsReauth(message)) => {
                // The token was dead on arrival: nothing to keep.
                let _ = self.remove(&id).await;
                return Err(Failure::NeedsReauth(format!(
                    "the refresh token was not accepted: {message}"
                )));
            }
            Err(Failure::Unavailable {
                retry_after,
                message,
            }) => {
                return Err(Failure::Unavailable {
                    retry_after,
                    message: format!(
                        "stored as connection {id}, but its first refresh failed ({message}); tokend keeps retrying"
                    ),
                });
            }
            Err(other) => return Err(other),
        }
        self.settle_new_connection(&id, label).await
    }

    /// Completes a consent flow: checks `state`, exchanges the code, stores the chain.
    pub async fn connect(&self, label: &str, code: Secret, state: &str) -> Result<Added, Failure> {
        validate_label(label)?;
        let fresh = {
            let mut pending = lock(&self.authorizations);
            pending
                .remove(state)
                .is_some_and(|p| p.created.elapsed() < AUTHORIZATION_TTL)
        };
        if !fresh {
            return Err(Failure::BadRequest(
                "unknown or expired state: start again with POST /v1/authorizations".into(),
            ));
        }
        let grant = self
            .provider
            .exchange_code(&code)
            .await
            .map_err(|e| match e {
                ProviderError::Rejected { .. }
                | ProviderError::NotConfigured(_)
                | ProviderError::Transient {
                    kind: TransientKind::Refused,
                    ..
                } => Failure::BadRequest(format!("the authorization code was not accepted: {e}")),
                other => Failure::Unavailable {
                    retry_after: other.retry_after().unwrap_or(Duration::from_secs(5)),
                    message: format!("the code exchange failed: {other}"),
                },
            })?;
        let Some(rt) = grant.refresh_token else {
            return Err(Failure::BadRequest(
                "the provider sent no refresh token: is offline_access among providers.atlassian.scopes?".into(),
            ));
        };
        let now = Utc::now();
        let lifetime = grant.expires_in.unwrap_or(ASSUMED_ACCESS_LIFETIME);
        let mut rec = self.new_record(
            label,
            rt,
            Some(AccessToken {
                token: grant.access_token,
                expires_at: now + chrono_dur(lifetime),
            }),
            now,
        );
        rec.chain.attempt_started_at = None;
        rec.conn.last_refresh_at = Some(now);
        if let Some(scopes) = grant.scopes {
            rec.conn.scopes = scopes;
        }
        let id = rec.conn.id.clone();
        self.ledger
            .insert(
                rec.clone(),
                vec![Event::new("imported", "connected through consent")],
            )
            .await
            .map_err(ledger_failure)?;
        self.install(rec);
        self.replan(&id);
        self.settle_new_connection(&id, label).await
    }

    fn new_record(
        &self,
        label: &str,
        refresh_token: Secret,
        access: Option<AccessToken>,
        now: Time,
    ) -> Record {
        let id = new_connection_id();
        // A label in use may belong to the same account (then the chains merge below); if it
        // does not, the new connection gets a suffixed label rather than losing its chain.
        let taken = self.find(label).is_some();
        let label = if taken {
            format!("{label}-{}", &id[id.len() - 4..])
        } else {
            label.to_owned()
        };
        Record {
            conn: Connection {
                id,
                label,
                provider: PROVIDER_ATLASSIAN.to_owned(),
                client_id: self.provider.client_id().to_owned(),
                account_id: None,
                status: Status::Active,
                scopes: self.provider.config().scopes.clone(),
                sites: Vec::new(),
                consented_at: now,
                last_refresh_at: None,
                last_error: None,
                consecutive_failures: 0,
                created_at: now,
                updated_at: now,
            },
            chain: Chain {
                refresh_token,
                rotated_at: now,
                previous: None,
                attempt_started_at: None,
                access,
            },
        }
    }

    /// After a new chain is proven alive: resolve its account, merge it into an existing
    /// connection of the same account, resolve its sites.
    async fn settle_new_connection(
        &self,
        id: &str,
        requested_label: &str,
    ) -> Result<Added, Failure> {
        let (_, slot) = self.find(id).ok_or(Failure::NotFound)?;
        let access = lock(&slot.state).rec.chain.access.clone();
        let account = match &access {
            Some(a) => match self.provider.me(&a.token).await {
                Ok(acc) => acc.map(|a| a.account_id),
                Err(e) => {
                    tracing::warn!(connection = %id, error = %e, "cannot resolve the account of a new connection");
                    None
                }
            },
            None => None,
        };
        let mut target = id.to_owned();
        let mut created = true;
        if let Some(account_id) = &account {
            let existing = self.list().into_iter().find(|c| {
                c.conn.id != id
                    && c.conn.provider == PROVIDER_ATLASSIAN
                    && c.conn.client_id == self.provider.client_id()
                    && c.conn.account_id.as_deref() == Some(account_id.as_str())
            });
            match existing {
                Some(existing) => {
                    self.merge(id, &existing.conn.id).await?;
                    target = existing.conn.id;
                    created = false;
                }
                None => {
                    let mut rec = lock(&slot.state).rec.clone();
                    rec.conn.account_id = Some(account_id.clone());
                    rec.conn.updated_at = Utc::now();
                    self.ledger
                        .save(
                            rec.clone(),
                            Some(rec.chain.refresh_token.clone()),
                            vec![Event::new(
                                "account_resolved",
                                format!("account {account_id}"),
                            )],
                        )
                        .await
                        .map_err(ledger_failure)?;
                    lock(&slot.state).rec = rec;
                }
            }
        }
        if created {
            let label = lock(&slot.state).rec.conn.label.clone();
            if label != requested_label {
                tracing::warn!(connection = %id, requested = %requested_label, label = %label, "the requested label belongs to another account's connection; the new connection got a suffixed label");
            }
        }
        self.resolve_sites(&target).await;
        let info = self.get(&target).ok_or(Failure::NotFound)?;
        Ok(Added { info, created })
    }

    /// Moves the chain of the new connection `from` into the existing `into`.
    async fn merge(&self, from: &str, into: &str) -> Result<(), Failure> {
        let (_, from_slot) = self.find(from).ok_or(Failure::NotFound)?;
        let (_, into_slot) = self.find(into).ok_or(Failure::NotFound)?;
        let _from_flight = from_slot.flight.lock().await;
        let _into_flight = into_slot.flight.lock().await;
        let source = lock(&from_slot.state).rec.clone();
        let mut merged = lock(&into_slot.state).rec.clone();
        let now = Utc::now();
        let mut events = vec![Event::new(
            "merged",
            format!("took a new chain for the same account from {from}"),
        )];
        let revived = merged.conn.status == Status::NeedsReauth;
        if revived {
            events.push(Event::new(
                "recovered",
                "revived by a new chain for the same account",
            ));
        }
        merged.chain = source.chain.clone();
        merged.chain.previous = None;
        merged.conn.status = Status::Active;
        merged.conn.scopes = source.conn.scopes.clone();
        merged.conn.consented_at = source.conn.consented_at;
        merged.conn.last_refresh_at = source.conn.last_refresh_at;
        merged.conn.last_error = None;
        merged.conn.consecutive_failures = 0;
        merged.conn.updated_at = now;
        self.ledger
            .merge(from.to_owned(), merged.clone(), events)
            .await
            .map_err(ledger_failure)?;
        {
            let mut st = lock(&into_slot.state);
            st.rec = merged;
            st.not_before = None;
            st.provider_asked = false;
            st.uncommitted = false;
        }
        if revived {
            let conn = lock(&into_slot.state).rec.conn.clone();
            self.notify(
                Kind::Recovered,
                &conn,
                "revived by a new chain for the same account",
            );
        }
        drop(_from_flight);
        self.uninstall(from);
        self.replan(into);
        tracing::info!(connection = %into, from = %from, "existing connection took the new chain of the same account");
        Ok(())
    }

    /// Re-reads accessible-resources for a connection and records changes. Best effort:
    /// failures are logged and leave the known sites in place.
    pub async fn resolve_sites(&self, id: &str) -> bool {
        let Some((id, slot)) = self.find(id) else {
            return false;
        };
        let access = {
            let st = lock(&slot.state);
            if st.uncommitted {
                return false;
            }
            st.rec.chain.access.clone()
        };
        let access = match access {
            Some(a) if a.expires_at > Utc::now() + chrono_dur(RESOLVE_MIN_VALID) => a,
            _ => match self.token_inner(&id, RESOLVE_MIN_VALID, false).await {
                Ok(g) => AccessToken {
                    token: g.access_token,
                    expires_at: g.expires_at,
                },
                Err(e) => {
                    tracing::warn!(connection = %id, error = %e, "cannot get a token to resolve sites");
                    return false;
                }
            },
        };
        let now = Utc::now();
        let resolved = self.provider.accessible_resources(&access.token, now).await;
        self.metrics.site_resolution(resolved.is_ok());
        let sites = match resolved {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(connection = %id, error = %e, "cannot resolve accessible sites");
                return false;
            }
        };
        match self.ledger.sync_sites(id.clone(), sites.clone(), now).await {
            Ok(events) => {
                for e in &events {
                    tracing::info!(connection = %id, event = e.kind, "{}", e.message);
                }
                let mut st = lock(&slot.state);
                st.rec.conn.sites = sites;
                true
            }
            Err(e) => {
                tracing::error!(connection = %id, error = %e, "cannot record sites in the ledger");
                false
            }
        }
    }

    /// Re-plans a connection's next scheduled refresh.
    fn replan(&self, id: &str) {
        let Some((_, slot)) = self.find(id) else {
            self.plan.cancel(id);
            return;
        };
        let settings = self.settings();
        let st = lock(&slot.state);
        let when = plan::next_action(
            &st.rec,
            &settings,
            st.not_before,
            st.uncommitted,
            st.last_requested,
            COMMIT_RETRY,
        );
        drop(st);
        match when {
            Some(at) => self.plan.schedule(id, at),
            None => self.plan.cancel(id),
        }
    }

    /// Runs the scheduler until `shutdown` resolves: sleeps until the earliest planned
    /// action, then starts the due connections nearest inactivity deadline first (so a
    /// catch-up after downtime saves the most endangered chains first), each through the
    /// same flight lock and concurrency permits as every caller.
    pub async fn run_scheduler(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            self.heartbeat();
            let next = self.plan.next_due();
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.min(Instant::now() + HEARTBEAT)).await,
                    None => tokio::time::sleep(HEARTBEAT).await,
                }
            };
            tokio::select! {
                _ = &mut shutdown => break,
                _ = self.plan.changed() => continue,
                _ = sleep => {}
            }
            let mut due: Vec<(Time, String, Arc<Slot>)> = self
                .plan
                .take_due(Instant::now())
                .into_iter()
                .filter_map(|id| {
                    let (id, slot) = self.find(&id)?;
                    let rotated = lock(&slot.state).rec.chain.rotated_at;
                    Some((rotated, id, slot))
                })
                .collect();
            due.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
            for (_, id, slot) in due {
                // Someone else is refreshing it: they re-plan when done.
                let Ok(flight) = slot.flight.clone().try_lock_owned() else {
                    continue;
                };
                // A long catch-up waits here for permits: keep the heartbeat going, the loop
                // is busy, not stuck.
                let acquire = self.permits.clone().acquire_owned();
                tokio::pin!(acquire);
                let permit = loop {
                    tokio::select! {
                        _ = &mut shutdown => return,
                        p = &mut acquire => match p {
                            Ok(p) => break p,
                            Err(_) => return,
                        },
                        _ = tokio::time::sleep(HEARTBEAT) => self.heartbeat(),
                    }
                };
                let engine = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = engine
                        .attempt_locked(&id, &slot, Need::Scheduled, flight, permit)
                        .await
                    {
                        tracing::debug!(connection = %id, error = %e, "scheduled refresh did not succeed");
                    }
                });
            }
        }
    }

    /// Publishes connection counts and deadlines to the metrics.
    pub fn publish_metrics(&self) {
        let list = self.list();
        let active = list
            .iter()
            .filter(|c| c.conn.status == Status::Active)
            .count();
        self.metrics.set_connections(active, list.len() - active);
        let unix = |t: Time| t.timestamp_millis() as f64 / 1000.0;
        let snapshot: Vec<crate::metrics::ConnectionDeadline> = list
            .iter()
            .map(|c| {
                (
                    c.conn.id.clone(),
                    unix(c.inactivity_expires_at),
                    c.absolute_expires_at.map(unix),
                    c.conn.status == Status::Active,
                )
            })
            .collect();
        self.metrics
            .set_connection_deadlines(&snapshot, unix(Utc::now()));
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Records that the scheduler loop is alive (for health and the watchdog).
    fn heartbeat(&self) {
        *lock(&self.last_heartbeat) = Instant::now();
    }

    /// Whether the scheduler loop ran recently.
    pub fn scheduler_alive(&self) -> bool {
        lock(&self.last_heartbeat).elapsed() < HEARTBEAT * 3
    }

    /// Waits until no refresh is in flight (every permit is free), up to `grace`.
    pub async fn drain(&self, grace: Duration) -> bool {
        let max = *lock(&self.max_concurrent);
        tokio::time::timeout(grace, self.permits.acquire_many(max as u32))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false)
    }
}

/// Why a refresh is being made: decides whether a shared outcome or the cache is enough.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    /// A caller needs a token valid this long.
    Lifetime(Duration),
    /// The schedule says it is time.
    Scheduled,
    /// An operator (or a new import) asked for a refresh now.
    Forced,
}

/// The outcome a caller that waited for the flight lock can take instead of running its own
/// attempt: an attempt that finished meanwhile, or a cache that is now good enough.
fn shared_outcome(slot: &Slot, seen: u64, need: Need) -> Option<Result<(), Failure>> {
    let st = lock(&slot.state);
    if st.removed {
        return Some(Err(Failure::NotFound));
    }
    if st.attempts > seen && need != Need::Forced {
        return Some(st.last_outcome.clone());
    }
    if let Need::Lifetime(min_valid) = need
        && !st.uncommitted
        && satisfies(&st.rec, min_valid)
    {
        return Some(Ok(()));
    }
    None
}

/// Whether the cached access token is good enough for a caller asking for `min_valid`.
/// When the provider's lifetime is shorter than `min_valid`, a token about as fresh as a
/// new one would be is good enough: refreshing again could not do better, and every such
/// caller would otherwise cost a provider call.
fn satisfies(rec: &Record, min_valid: Duration) -> bool {
    let Some(a) = &rec.chain.access else {
        return false;
    };
    let now = Utc::now();
    let remaining = (a.expires_at - now).to_std().unwrap_or(Duration::ZERO);
    let lifetime = rec
        .conn
        .last_refresh_at
        .and_then(|r| (a.expires_at - r).to_std().ok())
        .unwrap_or(ASSUMED_ACCESS_LIFETIME);
    let fresh_enough =
        lifetime.saturating_sub((lifetime / FRESH_SLACK_DIVISOR).min(FRESH_SLACK_MAX));
    !remaining.is_zero() && remaining >= min_valid.min(fresh_enough)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn chrono_dur(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

fn needs_reauth_failure(conn: &Connection) -> Failure {
    Failure::NeedsReauth(
        conn.last_error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_else(|| "the chain was rejected by the provider; consent again".into()),
    )
}

fn commit_failure(id: &str, e: &LedgerError) -> Failure {
    tracing::error!(connection = %id, error = %e, "cannot commit the rotated refresh token; holding it in memory and retrying");
    Failure::Internal(format!(
        "the rotated refresh token could not be saved ({e}); tokend keeps it and retries the commit"
    ))
}

fn ledger_failure(e: LedgerError) -> Failure {
    match e {
        LedgerError::LabelTaken(l) => {
            Failure::Conflict(format!("the label {l:?} is already in use"))
        }
        other => Failure::Internal(format!("the ledger cannot be written: {other}")),
    }
}

fn validate_label(label: &str) -> Result<(), Failure> {
    let ok_chars = label
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if label.is_empty() || label.len() > MAX_LABEL_LEN || !ok_chars {
        return Err(Failure::BadRequest(format!(
            "a label is 1 to {MAX_LABEL_LEN} characters of letters, digits, '-', '_' or '.'"
        )));
    }
    if label.starts_with('.') {
        return Err(Failure::BadRequest("a label may not start with '.'".into()));
    }
    let looks_like_id = label.len() == 13
        && label.starts_with('c')
        && label[1..].chars().all(|c| c.is_ascii_hexdigit());
    if looks_like_id {
        return Err(Failure::BadRequest(
            "a label may not look like a connection id (c + 12 hex digits)".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn engine_with(n: usize, max_concurrent: usize) -> (Arc<Engine>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config::parse(
            &format!("[refresh]\nrotate_after = \"2s\"\nmax_concurrent = {max_concurrent}\n"),
            std::path::Path::new("/etc/tokend/daemon.toml"),
            &|_| None,
            &|_| Err(std::io::Error::other("none")),
        )
        .unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let old = Utc::now() - chrono::Duration::hours(1);
        for i in 0..n {
            let id = format!("c{i:012x}");
            let rec = crate::model::sample_record(&id, &format!("l{i}"), &format!("rt-{i}"), old);
            ledger.insert(rec, vec![]).await.unwrap();
        }
        let provider =
            Atlassian::new(config.providers.atlassian.clone(), Duration::from_secs(1)).unwrap();
        let engine = Engine::load(
            ledger,
            provider,
            config.refresh.clone(),
            crate::notify::Notifier::disabled(),
            Arc::new(Metrics::new(true)),
        )
        .await
        .unwrap();
        (engine, dir)
    }

    #[tokio::test]
    async fn a_scheduler_waiting_for_permits_still_beats() {
        let (engine, _dir) = engine_with(3, 1).await;
        // Every permit is taken (a long catch-up): the loop waits, but stays alive.
        let held = engine.permits.clone().acquire_owned().await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(engine.clone().run_scheduler(async move {
            let _ = rx.await;
        }));
        tokio::time::pause();
        for _ in 0..10 {
            tokio::time::advance(HEARTBEAT).await;
            tokio::task::yield_now().await;
        }
        assert!(
            engine.scheduler_alive(),
            "waiting for permits is not stalling"
        );
        drop(held);
        let _ = tx.send(());
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_failing_attempt_is_not_retried_in_a_tight_loop() {
        // The provider is not configured: every attempt fails at once, without a network
        // call. The scheduler must back off instead of spinning.
        let (engine, _dir) = engine_with(1, 1).await;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(engine.clone().run_scheduler(async move {
            let _ = rx.await;
        }));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (_, slot) = engine.find("c000000000000").unwrap();
        let attempts = lock(&slot.state).attempts;
        assert!(
            (1..=2).contains(&attempts),
            "{attempts} attempts in 0.5 s: the scheduler spins"
        );
        let _ = tx.send(());
        task.await.unwrap();
    }

    #[test]
    fn labels_are_checked() {
        assert!(validate_label("confluence-prod").is_ok());
        assert!(validate_label("a.b_c-1").is_ok());
        for bad in [
            "",
            "a b",
            "../x",
            ".hidden",
            "c0123456789ab",
            &"x".repeat(65),
            "é",
        ] {
            assert!(validate_label(bad).is_err(), "{bad:?}");
        }
    }
}
