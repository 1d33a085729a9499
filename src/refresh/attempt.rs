//! The one place that changes a chain.
//!
//! [`run`] is one attempt, on an engine task holding the chain's lock, in the commit order of
//! ARCHITECTURE.md:
//!
//! 1. a chain change held uncommitted (the store failed earlier) is committed first, or
//!    nothing else happens;
//! 2. the gates: `needs_reauth`, backoff / `Retry-After`, a provider that is not configured;
//! 3. a `max_concurrent` permit, by urgency, then the chain's **claim** (`Store::claim`,
//!    holder = `daemon.node_name`, for `lease`): at most one refresh per chain in flight
//!    across daemons sharing a ledger. A claim another daemon holds ends the attempt as a
//!    retry (`Skip::ClaimedElsewhere`: the store's chain is reloaded, the chain looked at
//!    again after that claim's lease), never as a failure of the chain. On a shared store
//!    the chain is reloaded under the claim, and an attempt whose work another daemon did
//!    meanwhile ends there;
//! 4. the attempt marker is committed before the token leaves the process (no marker, no
//!    request); on a shared store it is written even when already set, so that every
//!    presentation of a token is preceded by a new chain version;
//! 5. the request goes out only while the claim has at least `request_timeout` left (it is
//!    renewed first unless it has; else `Skip::LeaseShort`, a retry); then the provider
//!    call, and the commit of what it answered (compare-and-swap on the chain version,
//!    fenced by the claim: `Store::save_chain_fenced`, after renewing it once more unless
//!    it still has `request_timeout` left) before anything
//!    may use the new access token. A fenced commit refused after the provider answered is
//!    resolved by `after_conflict` (its docs give the reasoning). The claim is released at
//!    the end of the attempt (`FlightGuard`, also when the attempt panics or is aborted; a
//!    release that is lost just lapses).
//!
//! With SQLite (one daemon per ledger) every claim is granted, and none of the shared-store
//! steps (reload, marker rewrite, lease checks, the call's own timeout) happen.
//!
//! Its result is an [`Outcome`]; [`settle`] derives from it, in one `match`, the in-memory
//! state, the logs, the notifications and whether sites are to be resolved; the caller
//! ([`super::flight`]) then re-plans the chain.

use super::backoff;
use super::permits::{Committing, Permit, Ticket, Waiting};
use super::plan::Urgency;
use super::{
    Engine, Failure, Held, Need, Slot, SlotState, StoreError, needs_reauth_failure, satisfies,
};
use crate::ledger::Fence;
use crate::metrics::RefreshOutcome;
use crate::model::{AccessToken, Event, EventKind, LastError, Record, Status};
use crate::notify::Kind;
use crate::provider::{
    ASSUMED_ACCESS_LIFETIME, Grant, LEEWAY_SAFETY_MARGIN, ProviderError, REUSE_LEEWAY,
    TransientKind,
};
use crate::secret::Secret;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The shortest wait before retrying an unknown outcome: room for the provider to recover.
const AMBIGUOUS_RETRY_MIN: Duration = Duration::from_secs(1);

/// After a claim refused because another daemon holds it, look again this long after the
/// other claim ends at the latest (`lease` from now): room for its release or expiry to
/// reach the store.
const CLAIM_RECHECK_SLACK: Duration = Duration::from_secs(1);

/// How often a caller waiting for another daemon's refresh of a chain reads the store.
const CLAIM_POLL: Duration = Duration::from_millis(250);

/// The claim an attempt holds on its chain's refresh (`SlotState::claim`).
#[derive(Clone, Debug)]
pub(crate) struct Claim {
    /// What the store granted: every write under the claim carries it.
    fence: Fence,
    /// By when it has lapsed at the latest (the store's `valid_for` from when the claim or
    /// renewal was sent): while at least `request_timeout` of it is left, no renewal is
    /// needed before a request or a commit, which saves the storm one durable transaction
    /// each (BENCHMARKS.md, PostgreSQL).
    until: Instant,
}

/// What one attempt did. Each variant says when it happens.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The provider rotated the chain and the store committed the new refresh token.
    Rotated {
        /// The committed record.
        next: Record,
        /// The chain was `needs_reauth` before (a forced refresh brought it back).
        recovered: bool,
    },
    /// The provider renewed the access token without sending a new refresh token; the old
    /// one is kept, and the use counts: the next rotation is planned from it.
    RenewedWithoutRotation {
        /// The committed record.
        next: Record,
        /// As for `Rotated`.
        recovered: bool,
    },
    /// An existing connection took the chain of a new connection of the same account (the
    /// new one is gone from the store).
    Adopted {
        /// The committed record of the existing connection.
        next: Record,
        /// The existing connection was `needs_reauth` before.
        revived: bool,
    },
    /// A change held uncommitted since an earlier store failure is committed at last.
    Committed {
        /// The committed record.
        next: Record,
    },
    /// The provider rotated (or a held change waited), and the store refused the write: the
    /// new chain is held in memory, never used or rotated further, and its commit retried.
    CommitPending {
        /// What to commit.
        held: Held,
        /// Why the store refused.
        error: StoreError,
    },
    /// The provider definitely rejected the chain: it needs a person's consent.
    Rejected {
        /// The record with status `needs_reauth`.
        next: Record,
        /// Whether the store committed `next` (if not, the next start asks again and is
        /// rejected again).
        committed: bool,
        /// For the caller and the log.
        message: String,
        /// The chain was active before.
        newly: bool,
    },
    /// A transient failure: back off, status untouched.
    RetryLater {
        /// The record with the failure noted.
        next: Record,
        /// Whether the store committed `next`.
        committed: bool,
        /// How long to wait.
        delay: Duration,
        /// The provider may have rotated the token (or an earlier attempt's outcome is still
        /// unknown): the marker stays and the retry lands inside the leeway.
        ambiguous: bool,
        /// The provider itself asked for the wait (`Retry-After`).
        provider_asked: bool,
        /// For the caller and the log.
        message: String,
    },
    /// The store holds another chain than memory (it moved under us): memory takes the
    /// store's, and a held token that cannot be committed any more is logged as lost.
    Superseded {
        /// The store's record, or `None` when the connection is gone.
        current: Option<Record>,
    },
    /// No request was made.
    Skipped(Skip),
}

/// Why an attempt made no request.
#[derive(Debug)]
pub(crate) enum Skip {
    /// The connection was removed meanwhile.
    Removed,
    /// The chain needs consent and nobody forced a try.
    NeedsReauth(String),
    /// Backoff or `Retry-After` still runs.
    Backoff {
        /// Until when.
        wait: Duration,
        /// The last failure.
        message: String,
    },
    /// A caller's need was met meanwhile.
    AlreadyFresh,
    /// The provider lacks credentials.
    NotConfigured(String),
    /// The store refused the attempt marker: no marker, no request.
    StoreDown(String),
    /// The engine stops: no new request.
    ShuttingDown,
    /// A merge could not be stored; both connections stay as they were.
    MergeFailed(String),
    /// Another daemon holds the chain's claim: it is refreshing the chain, and what it
    /// commits is what this daemon serves. Not a failure of the chain.
    ClaimedElsewhere {
        /// The store's record, reloaded (`None` when it could not be read).
        current: Option<Box<Record>>,
        /// When to look again: shortly after the other claim ends at the latest.
        wait: Duration,
    },
    /// The claim has less than `request_timeout` left: no request now, a retry soon.
    LeaseShort(Duration),
}

/// What an attempt holds of the provider gate ([`super::permits`]): [`run`] leaves it with its
/// caller, which lets it go only after the outcome is settled into the slot
/// ([`super::flight`]). Shutdown's drain waits for the gate to go idle and then counts the
/// changes held in slots: a permit let go before a failed commit's change was held would let
/// it count none and stop with the rotated token only in memory.
pub(crate) enum GateHold {
    /// A permit: the attempt may call the provider.
    Permit(Permit),
    /// The provider answered; the attempt commits (the next attempt has the permit).
    Committing(
        #[expect(dead_code, reason = "held for its Drop, which ends the commit's count")]
        Committing,
    ),
}

impl GateHold {
    /// The permit handed on to the next attempt, keeping a count of this commit.
    fn committing(hold: &mut Option<GateHold>) {
        if let Some(GateHold::Permit(p)) = hold.take() {
            *hold = Some(GateHold::Committing(p.committing()));
        }
    }
}

/// One attempt. Runs on an engine task; see the module docs for the order. What it holds of
/// the provider gate is left in `hold`, for the caller to drop after settling the outcome.
pub(crate) async fn run(
    engine: &Arc<Engine>,
    slot: &Arc<Slot>,
    need: Need,
    ticket: Ticket,
    reserved: Option<Waiting>,
    hold: &mut Option<GateHold>,
) -> Outcome {
    // The caller ([`super::flight`]) holds the chain lock.
    let (stale, id) = {
        let st = slot.lock();
        if st.removed {
            return Outcome::Skipped(Skip::Removed);
        }
        (st.stale, st.rec.id().to_owned())
    };
    if stale {
        // Memory may be behind the store: take the store's chain first.
        match engine.store.load(id.clone()).await {
            Ok(Some(current)) => {
                let mut st = slot.lock();
                engine.adopt(&mut st, &current);
                st.stale = false;
            }
            Ok(None) => return Outcome::Superseded { current: None },
            Err(e) => return Outcome::Skipped(Skip::StoreDown(e.to_string())),
        }
    }
    let (mut rec, held, not_before, provider_asked, claim_wait) = {
        let st = slot.lock();
        (
            st.rec.to_record(),
            st.held.clone(),
            engine.not_before(&st),
            st.provider_asked,
            st.claim_wait,
        )
    };
    // 1. A held change first.
    if let Some(held) = held {
        return commit_held(engine, slot, *held).await;
    }
    // 2. Gates.
    // A `needs_reauth` chain is not tried again unless forced, or unless an earlier forced
    // attempt's outcome is unknown (its marker must be resolved inside the leeway).
    if rec.conn.status == Status::NeedsReauth
        && need != Need::Forced
        && rec.chain.attempt_started_at.is_none()
    {
        return Outcome::Skipped(Skip::NeedsReauth(match needs_reauth_failure(&rec.conn) {
            Failure::NeedsReauth(m) => m,
            other => other.to_string(),
        }));
    }
    if let Some(nb) = not_before
        && nb > Instant::now()
        && (need != Need::Forced || provider_asked)
        && !(claim_wait && matches!(need, Need::Lifetime(_)))
    {
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
        return Outcome::Skipped(Skip::Backoff {
            wait: nb - Instant::now(),
            message,
        });
    }
    if let Need::Lifetime(min) = need
        && satisfies(&rec, min, engine.now())
    {
        return Outcome::Skipped(Skip::AlreadyFresh);
    }
    if let Some(reason) = engine.provider.not_configured() {
        return Outcome::Skipped(Skip::NotConfigured(reason));
    }
    // 3. A permit, by urgency then nearest inactivity deadline.
    let urgency = if rec.chain.attempt_started_at.is_some() {
        Urgency::Recover
    } else {
        need.urgency()
    };
    let deadline = rec.chain.used_at + super::chrono_dur(engine.settings().inactivity_expiry);
    let order = permit_order(engine, &id, deadline.timestamp_millis());
    let permit = match reserved {
        Some(place) => place.wait().await,
        None => engine.permits.acquire(ticket, (urgency, order)).await,
    };
    let Ok(permit) = permit else {
        return Outcome::Skipped(Skip::ShuttingDown);
    };
    *hold = Some(GateHold::Permit(permit));
    // 3b. The claim: at most one refresh of the chain in flight across daemons.
    let shared = engine.store.shared();
    let budget = engine.settings().request_timeout;
    if shared && let Some(skip) = done_meanwhile(engine, &slot.lock(), need) {
        // Another daemon's commit reached memory (its notification) while this attempt
        // waited for its permit: no claim, no reload, no request.
        return Outcome::Skipped(skip);
    }
    match take_claim(engine, slot, &id).await {
        Ok(Some(until)) if shared && left(until) < budget => {
            return Outcome::Skipped(Skip::LeaseShort(left(until)));
        }
        Ok(Some(_)) => {}
        Ok(None) => {
            // Waiting for another daemon's commit takes no permit from this one's chains.
            *hold = None;
            return claimed_elsewhere(engine, &id, need).await;
        }
        Err(e) => return Outcome::Skipped(Skip::StoreDown(e.to_string())),
    }
    if shared {
        // Another daemon may have moved the chain (or done this very work) meanwhile.
        match engine.store.load(id.clone()).await {
            Ok(Some(current)) => {
                let mut st = slot.lock();
                engine.adopt(&mut st, &current);
                st.stale = false;
                rec = st.rec.to_record();
                if let Some(skip) = done_meanwhile(engine, &st, need) {
                    return Outcome::Skipped(skip);
                }
            }
            Ok(None) => return Outcome::Superseded { current: None },
            Err(e) => return Outcome::Skipped(Skip::StoreDown(e.to_string())),
        }
    }
    // 4. The marker, durably, before the token leaves the process. On a shared store a
    // marker already set is written again (same instant, next version), so that whoever
    // wrote the chain after this attempt is seen by its commit (see `after_conflict`).
    let marked_before = rec.chain.attempt_started_at.is_some();
    let base = if marked_before && !shared {
        let age = age_of(engine, rec.chain.attempt_started_at);
        if age > REUSE_LEEWAY.saturating_sub(LEEWAY_SAFETY_MARGIN) {
            // The stored token is the only one tokend has: if the provider never saw the
            // earlier attempt it is still valid; if it did, presenting it cannot make that
            // worse.
            tracing::warn!(
                connection = %rec.conn.id,
                attempt_age_secs = age.as_secs(),
                "the outcome of an earlier refresh is unknown and the reuse leeway has passed; presenting the stored token as the only way to keep the chain"
            );
        }
        rec
    } else {
        let mut marked = rec.clone();
        if !marked_before {
            marked.chain.attempt_started_at = Some(engine.now());
        }
        marked.chain.version += 1;
        if let Err(e) = save(engine, slot, marked.clone(), rec.chain.version, vec![]).await {
            return match e {
                StoreError::Conflict(_) => superseded(engine, &rec.conn.id).await,
                e => Outcome::Skipped(Skip::StoreDown(e.to_string())),
            };
        }
        engine.adopt(&mut slot.lock(), &marked);
        marked
    };
    if shared && let Some(skip) = lease_for_request(engine, slot, &id).await {
        return skip;
    }
    // 5. The provider, then the commit.
    tracing::debug!(connection = %base.conn.id, "refreshing");
    let started = Instant::now();
    let result = present(engine, &base.chain.refresh_token).await;
    engine.metrics.refresh_outcome(
        match &result {
            Ok(_) | Err(ProviderError::Partial { .. }) => RefreshOutcome::Success,
            Err(ProviderError::Rejected { .. }) => RefreshOutcome::Rejected,
            Err(_) => RefreshOutcome::TransientError,
        },
        started.elapsed(),
    );
    match result {
        Ok(grant) => {
            // The commit needs no request: the next attempt may have the permit meanwhile.
            GateHold::committing(hold);
            let stored = base.chain.refresh_token.clone();
            commit_grant(engine, slot, base, grant.into(), true, stored).await
        }
        Err(ProviderError::Partial {
            refresh_token,
            message,
        }) => {
            GateHold::committing(hold);
            tracing::warn!(connection = %base.conn.id, "{message}");
            let answer = Answer {
                refresh_token: Some(refresh_token),
                access_token: None,
                expires_in: None,
                scopes: None,
            };
            let stored = base.chain.refresh_token.clone();
            commit_grant(engine, slot, base, answer, true, stored).await
        }
        Err(ProviderError::Rejected { code, description }) => {
            if let Some(outcome) = try_previous(engine, slot, &base).await {
                return outcome;
            }
            reject(engine, slot, base, code, description).await
        }
        Err(e) => retry_later(engine, slot, base, e, marked_before).await,
    }
}

/// On a shared store, chains whose inactivity deadlines fall into the same window this long
/// are given permits in an order of this daemon's own (a hash of its holder name and the
/// id) rather than by deadline and arrival: daemons sharing a ledger, which plan the same
/// due chains at the same instants, then start on different chains instead of meeting on
/// every claim (a refused claim costs a claim and a reload, and the chain waits for the
/// other daemon). Ten minutes is nothing beside the inactivity expiry (days), and a storm
/// of due chains is over well within it.
const SPREAD_WINDOW_MS: i64 = 10 * 60 * 1000;

/// A chain whose inactivity deadline is nearer than this is never spread: it goes by its
/// deadline, before every spread chain. Within one window a hash order could put a chain
/// a minute from expiry behind thousands with nine minutes left, and a long enough queue
/// (after an outage) would let it expire. An hour is far more than any storm's queue takes
/// to drain at the provider's rate, and nothing beside the inactivity expiry (days).
const SPREAD_NEAR_MS: i64 = 60 * 60 * 1000;

/// The permit order of a chain whose inactivity deadline is `deadline_ms` (after urgency):
/// the deadline itself on a store only this daemon writes (SQLite: unchanged); on a shared
/// one, a deadline nearer than [`SPREAD_NEAR_MS`] first, by deadline, then the others by
/// their [`SPREAD_WINDOW_MS`] window, then this daemon's hash of the chain.
pub(super) fn permit_order(engine: &Engine, id: &str, deadline_ms: i64) -> i64 {
    use std::hash::{Hash, Hasher};
    if !engine.store.shared() {
        return deadline_ms;
    }
    if deadline_ms
        < engine
            .now()
            .timestamp_millis()
            .saturating_add(SPREAD_NEAR_MS)
    {
        // Below every spread order (those are at least 0 for deadlines after 1970).
        return i64::MIN / 2 + deadline_ms;
    }
    let mut h = std::hash::DefaultHasher::new();
    engine.holder().hash(&mut h);
    id.hash(&mut h);
    // Windows since the epoch fit in 31 bits for millions of years, the hash in 32.
    (deadline_ms.div_euclid(SPREAD_WINDOW_MS) << 32) | i64::from(h.finish() as u32)
}

/// How long is left until `until`.
fn left(until: Instant) -> Duration {
    until.saturating_duration_since(Instant::now())
}

/// Claims the chain's refresh for this engine (or re-claims it: the store grants a holder's
/// own claim again, with a new fence) and keeps the claim in the slot. Returns the instant
/// by which the claim has lapsed at the latest: the store's `valid_for` counted from when the
/// request was sent, so never later than the store's own expiry. `Ok(None)`: another daemon
/// holds it.
async fn take_claim(engine: &Engine, slot: &Slot, id: &str) -> Result<Option<Instant>, StoreError> {
    let sent = Instant::now();
    let lease = engine.settings().lease;
    match engine
        .store
        .claim(id.to_owned(), engine.holder(), lease)
        .await?
    {
        Some(fence) => {
            let until = sent + fence.valid_for;
            let mut st = slot.lock();
            if st.claim.is_none() {
                engine.metrics.lease_held(1);
            }
            st.claim = Some(Box::new(Claim { fence, until }));
            Ok(Some(until))
        }
        None => {
            engine.metrics.lease_conflict();
            Ok(None)
        }
    }
}

/// Extends the attempt's claim to a full lease from now. `Ok(None)`: another daemon claimed
/// the chain meanwhile (the claim is gone from the slot).
async fn renew_claim(
    engine: &Engine,
    slot: &Slot,
    id: &str,
) -> Result<Option<Instant>, StoreError> {
    let Some(fence) = fence_of(slot) else {
        return take_claim(engine, slot, id).await;
    };
    let sent = Instant::now();
    let lease = engine.settings().lease;
    match engine.store.renew(id.to_owned(), fence, lease).await? {
        Some(fence) => {
            let until = sent + fence.valid_for;
            slot.lock().claim = Some(Box::new(Claim { fence, until }));
            Ok(Some(until))
        }
        None => {
            drop_claim(engine, &mut slot.lock());
            engine.metrics.lease_conflict();
            Ok(None)
        }
    }
}

/// Whether the attempt holds a claim with at least `request_timeout` left (by its own
/// conservative deadline): then a renewal before the request or the commit would only
/// extend a claim that holds long enough anyway.
fn claim_lasts(engine: &Engine, slot: &Slot) -> bool {
    let budget = engine.settings().request_timeout;
    slot.lock()
        .claim
        .as_ref()
        .is_some_and(|c| left(c.until) >= budget)
}

fn fence_of(slot: &Slot) -> Option<Fence> {
    slot.lock().claim.as_ref().map(|c| c.fence.clone())
}

fn drop_claim(engine: &Engine, st: &mut SlotState) -> Option<Fence> {
    let claim = st.claim.take()?;
    engine.metrics.lease_held(-1);
    Some(claim.fence)
}

/// Gives up the claim the attempt held, if any (the end of every attempt, `FlightGuard`),
/// on an engine task: a release that never happens (a crash, a store that is down) just
/// lapses at the claim's expiry.
pub(crate) fn release_claim(engine: &Engine, st: &mut SlotState) {
    let Some(fence) = drop_claim(engine, st) else {
        return;
    };
    let id = st.rec.id().to_owned();
    let store = engine.store.clone();
    // Refused only when the engine stopped: the claim then lapses at its expiry.
    let _ = engine.tasks.spawn(async move {
        if let Err(e) = store.release(id.clone(), fence).await {
            tracing::debug!(connection = %id, error = %e, "cannot release the claim; it lapses");
        }
    });
}

/// Renews the claim just before a request, which goes out only while the claim has at
/// least `request_timeout` left; else the `Outcome` that ends the attempt instead. A claim
/// that has that much left (just granted, the marker written quickly) is not renewed.
async fn lease_for_request(engine: &Engine, slot: &Slot, id: &str) -> Option<Outcome> {
    let budget = engine.settings().request_timeout;
    if claim_lasts(engine, slot) {
        return None;
    }
    match renew_claim(engine, slot, id).await {
        Ok(Some(until)) if left(until) >= budget => None,
        Ok(Some(until)) => Some(Outcome::Skipped(Skip::LeaseShort(left(until)))),
        Ok(None) => Some(claimed_elsewhere(engine, id, Need::Forced).await),
        Err(e) => Some(Outcome::Skipped(Skip::StoreDown(e.to_string()))),
    }
}

/// Presents a refresh token. On a shared store the call is bounded by `request_timeout`
/// here too (the HTTP client's own timeout is the same), so that it never outlives the claim
/// it was sent under, whatever hangs around the HTTP request.
async fn present(engine: &Engine, token: &Secret) -> Result<Grant, ProviderError> {
    if !engine.store.shared() {
        return engine.provider.refresh(token).await;
    }
    let budget = engine.settings().request_timeout;
    match tokio::time::timeout(budget, engine.provider.refresh(token)).await {
        Ok(result) => result,
        Err(_) => Err(ProviderError::Transient {
            kind: TransientKind::Timeout,
            retry_after: None,
            message: format!("no answer within {}s", budget.as_secs()),
        }),
    }
}

/// Another daemon holds the claim: take the store's chain (it is the one to serve) and look
/// again once its claim has ended. A caller waiting for a token (`need` a lifetime) waits,
/// up to `request_timeout`, for what that daemon commits: the store is read every
/// [`CLAIM_POLL`] until it holds an access token good enough (or a chain without a marker:
/// that daemon's attempt is over).
async fn claimed_elsewhere(engine: &Engine, id: &str, need: Need) -> Outcome {
    let settings = engine.settings();
    let wait = settings.lease + CLAIM_RECHECK_SLACK;
    let deadline = Instant::now() + settings.request_timeout;
    if matches!(need, Need::Scheduled(_)) {
        // Nobody waits for this chain: the other daemon's commit reaches memory through its
        // notification (or the periodic re-read); a read now would mostly find its marker,
        // which memory does not take anyway.
        return Outcome::Skipped(Skip::ClaimedElsewhere {
            current: None,
            wait,
        });
    }
    loop {
        let current = match engine.store.load(id.to_owned()).await {
            Ok(None) => return Outcome::Superseded { current: None },
            Ok(Some(current)) => current,
            Err(_) => {
                return Outcome::Skipped(Skip::ClaimedElsewhere {
                    current: None,
                    wait,
                });
            }
        };
        let Need::Lifetime(min) = need else {
            return Outcome::Skipped(Skip::ClaimedElsewhere {
                current: Some(Box::new(current)),
                wait,
            });
        };
        if satisfies(&current, min, engine.now()) {
            return Outcome::Committed { next: current };
        }
        if Instant::now() + CLAIM_POLL > deadline {
            return Outcome::Skipped(Skip::ClaimedElsewhere {
                current: Some(Box::new(current)),
                wait,
            });
        }
        tokio::time::sleep(CLAIM_POLL).await;
    }
}

/// After the reload under a fresh claim: whether another daemon already did what this
/// attempt is for (or found the chain rejected), so that no request is needed.
fn done_meanwhile(engine: &Engine, st: &SlotState, need: Need) -> Option<Skip> {
    let facts = st.rec.facts();
    let marked = facts.marked;
    if facts.status == Status::NeedsReauth && need != Need::Forced && !marked {
        return Some(Skip::NeedsReauth(
            match needs_reauth_failure(&st.rec.to_record().conn) {
                Failure::NeedsReauth(m) => m,
                other => other.to_string(),
            },
        ));
    }
    match need {
        Need::Lifetime(min)
            if super::satisfies_access(
                facts.access_expires_at,
                facts.last_refresh_at,
                min,
                engine.now(),
            ) =>
        {
            Some(Skip::AlreadyFresh)
        }
        Need::Scheduled(_) if !marked => {
            let input = super::plan::PlanInput {
                facts,
                not_before: None,
                held: false,
                last_requested: st.last_requested.get(engine.requests_base),
            };
            let planned = super::plan::next_action(
                &input,
                &engine.settings(),
                engine.now(),
                super::COMMIT_RETRY,
            );
            planned
                .is_none_or(|p| p.at > Instant::now())
                .then_some(Skip::AlreadyFresh)
        }
        _ => None,
    }
}

/// A chain write of the attempt, fenced by its claim: on a shared store, an attempt whose
/// claim was taken over writes nothing (`Conflict`).
async fn save(
    engine: &Engine,
    slot: &Slot,
    rec: Record,
    expect_version: u64,
    events: Vec<Event>,
) -> Result<(), StoreError> {
    let result = match fence_of(slot) {
        Some(fence) => {
            engine
                .store
                .save_chain_fenced(rec, expect_version, fence, events)
                .await
        }
        None if engine.store.shared() => Err(StoreError::Conflict(rec.conn.id)),
        None => engine.store.save_chain(rec, expect_version, events).await,
    };
    if engine.store.shared() && matches!(result, Err(StoreError::Conflict(_))) {
        engine.metrics.lease_conflict();
    }
    result
}

fn age_of(engine: &Engine, at: Option<crate::model::Time>) -> Duration {
    at.map(|t| (engine.now() - t).to_std().unwrap_or_default())
        .unwrap_or_default()
}

async fn commit_held(engine: &Engine, slot: &Slot, mut held: Held) -> Outcome {
    if !held.insert {
        // A chain write: under the chain's claim, like any other.
        let refused = match take_claim(engine, slot, &held.rec.conn.id).await {
            Ok(Some(_)) => None,
            Ok(None) => Some(StoreError::Unavailable(ANOTHER_HOLDS.to_owned())),
            Err(e) => Some(e),
        };
        if let Some(error) = refused {
            return Outcome::CommitPending { held, error };
        }
    }
    let result = if held.insert {
        // An earlier insert may have landed although it reported a failure.
        if let Ok(Some(stored)) = engine.store.load(held.rec.conn.id.clone()).await
            && stored.chain.refresh_token.expose() == held.rec.chain.refresh_token.expose()
        {
            return Outcome::Committed { next: stored };
        }
        let events = vec![Event::new(EventKind::Imported, "connected through consent")];
        match engine.store.insert(held.rec.clone(), events.clone()).await {
            Err(StoreError::LabelTaken(label)) => {
                held.rec.conn.label = super::onboard::generated_label(&label, &held.rec.conn.id);
                engine.store.insert(held.rec.clone(), events).await
            }
            other => other,
        }
    } else {
        let mut saved = save(engine, slot, held.rec.clone(), held.expect_version, vec![]).await;
        if let Err(StoreError::Conflict(_)) = &saved {
            match after_conflict(
                engine,
                slot,
                &held.rec,
                held.presented.as_ref(),
                held.expect_version,
            )
            .await
            {
                Behind::Retry(version) => {
                    held.expect_version = version;
                    held.rec.chain.version = version + 1;
                    saved = save(engine, slot, held.rec.clone(), held.expect_version, vec![]).await;
                }
                Behind::Done(current) => return Outcome::Committed { next: current },
                Behind::Moved(current) => return Outcome::Superseded { current },
                Behind::Claimed => saved = Err(StoreError::Unavailable(ANOTHER_HOLDS.into())),
                Behind::Unknown(e) => saved = Err(e),
            }
        }
        saved
    };
    match result {
        Ok(()) => {
            tracing::info!(connection = %held.rec.conn.id, "held chain committed after an earlier failure");
            Outcome::Committed { next: held.rec }
        }
        Err(StoreError::Conflict(_)) => superseded(engine, &held.rec.conn.id).await,
        Err(e) => Outcome::CommitPending { held, error: e },
    }
}

/// What a compare-and-swap conflict on a chain write turned out to be.
enum Behind {
    /// The store still holds the token presented: memory was behind only a write of this
    /// chain's own that landed after reporting a failure. Write again over this version.
    Retry(u64),
    /// The store already holds the change (an earlier write of it landed).
    Done(Record),
    /// The store holds another chain (another writer moved it), or none.
    Moved(Option<Record>),
    /// The store still holds the chain this attempt presented, but another daemon holds
    /// its claim now: hold the new chain and commit it once that claim has ended.
    Claimed,
    /// The store could not be read.
    Unknown(StoreError),
}

/// Why a rotated token waits in memory while another daemon holds the chain's claim.
const ANOTHER_HOLDS: &str =
    "another tokend daemon holds this chain's claim; the rotated token is held until it ends";

/// Reads the store after a conflict on writing `ours`, which replaces `presented`; the
/// write expected the store at `expected`.
///
/// **Several daemons (a shared store).** A fenced commit refused after the provider
/// answered means this daemon's claim lapsed (it was paused or cut off longer than the
/// lease), or the chain moved. Invariant 1 (no chain lost) asks which token to keep:
///
/// - Every daemon writes the attempt marker (a new chain version) before it presents a
///   token, retries included. So if the store is still at `expected`, the version this
///   attempt's own marker left, nobody presented the old token after this attempt did, and
///   the new token this attempt holds is the provider's current one: it is recorded, under
///   a fresh claim. Should another daemon hold the claim now, it has not written yet (or the
///   version would have moved); the new token is held in memory (`Claimed`, then
///   `CommitPending`) and committed once that claim ends, unless the chain moves first.
/// - If the version moved while the store still holds the presented token, another daemon
///   has written the chain since, typically its own marker before presenting the same old
///   token again (inside the provider's 10-minute leeway, which makes that reuse legal).
///   Its answer, not this one, is then the provider's current token, and the refresh it
///   issued may even have superseded this attempt's: writing this one over it could keep a
///   dead token and lose a live one. So the store's chain wins (`Moved`): either that daemon
///   commits its rotation, or its marker stays and whoever next claims the chain presents
///   the old token again inside the leeway of this attempt's marker, which it kept.
/// - A store holding a third token was rotated by another daemon: it is the newest chain and
///   is never overwritten (`Moved`).
///
/// A store only this daemon writes (SQLite) keeps the single-daemon rule: a store that still
/// holds the presented token is behind only by this chain's own write that landed after
/// reporting a failure, and is written over at its version.
async fn after_conflict(
    engine: &Engine,
    slot: &Slot,
    ours: &Record,
    presented: Option<&Secret>,
    expected: u64,
) -> Behind {
    match engine.store.load(ours.conn.id.clone()).await {
        Ok(Some(current)) => {
            let stored = current.chain.refresh_token.expose();
            if stored == ours.chain.refresh_token.expose() {
                Behind::Done(current)
            } else if presented.is_some_and(|p| p.expose() == stored) {
                if !engine.store.shared() {
                    tracing::warn!(connection = %ours.conn.id, "the ledger was ahead of memory; committing the new chain over its version");
                    return Behind::Retry(current.chain.version);
                }
                if current.chain.version != expected {
                    tracing::warn!(connection = %ours.conn.id, "another daemon wrote the chain after this refresh presented its token; the ledger's chain wins");
                    return Behind::Moved(Some(current));
                }
                match take_claim(engine, slot, &ours.conn.id).await {
                    Ok(Some(_)) => {
                        tracing::warn!(connection = %ours.conn.id, "the claim lapsed before the commit, and nobody wrote the chain since; committing the new chain under a new claim");
                        Behind::Retry(current.chain.version)
                    }
                    Ok(None) => Behind::Claimed,
                    Err(e) => Behind::Unknown(e),
                }
            } else {
                Behind::Moved(Some(current))
            }
        }
        Ok(None) => Behind::Moved(None),
        Err(e) => Behind::Unknown(e),
    }
}

async fn superseded(engine: &Engine, id: &str) -> Outcome {
    match engine.store.load(id.to_owned()).await {
        Ok(current) => Outcome::Superseded { current },
        Err(e) => Outcome::Skipped(Skip::StoreDown(e.to_string())),
    }
}

/// After a rejection of the current token, the previous one may still be accepted inside
/// the reuse leeway (the provider lost the rotation): one try, never outside the leeway.
async fn try_previous(engine: &Engine, slot: &Slot, base: &Record) -> Option<Outcome> {
    let (prev, rotated_at) = *base.chain.previous.clone()?;
    let age = (engine.now() - rotated_at)
        .to_std()
        .unwrap_or(Duration::MAX);
    if age > REUSE_LEEWAY.saturating_sub(LEEWAY_SAFETY_MARGIN) {
        return None;
    }
    tracing::warn!(connection = %base.conn.id, "current refresh token rejected; trying the previous one inside the reuse leeway");
    // From here the previous token is the chain: the rejected one is never presented again.
    let mut from = base.clone();
    from.chain.previous = None;
    from.chain.refresh_token = prev;
    // The access token came with the rejected token: not served any more.
    from.chain.access = None;
    if engine.store.shared()
        && let Some(skip) = lease_for_request(engine, slot, &base.conn.id).await
    {
        return Some(skip);
    }
    match present(engine, &from.chain.refresh_token).await {
        // Its leeway counts from its rotation, not from now: never keep it as `previous`.
        // A conflict is judged against what the store holds: the rejected current token.
        Ok(grant) => Some(
            commit_grant(
                engine,
                slot,
                from,
                grant.into(),
                false,
                base.chain.refresh_token.clone(),
            )
            .await,
        ),
        Err(ProviderError::Rejected { .. }) => None,
        Err(e) => {
            // The provider may have rotated it: keep it with a marker dated from its
            // rotation, so that retries stay inside its leeway.
            let marked = from
                .chain
                .attempt_started_at
                .map_or(rotated_at, |m| m.min(rotated_at));
            from.chain.attempt_started_at = Some(marked);
            Some(retry_later(engine, slot, from, e, true).await)
        }
    }
}

/// What a successful answer gave: a [`Grant`], or only a new refresh token (a partial 2xx).
struct Answer {
    refresh_token: Option<Secret>,
    access_token: Option<Secret>,
    expires_in: Option<Duration>,
    scopes: Option<Vec<String>>,
}

impl From<Grant> for Answer {
    fn from(g: Grant) -> Answer {
        Answer {
            refresh_token: g.refresh_token,
            access_token: Some(g.access_token),
            expires_in: g.expires_in,
            scopes: g.scopes,
        }
    }
}

/// Commits a successful answer. `previous_ok` says whether the token presented may be kept
/// as `previous` (for a later reuse inside the leeway): not when it was itself a previous.
/// `stored` is the refresh token the store held when the attempt began: the one a conflict
/// is judged against (for a retry of the previous token it is the rejected current one, not
/// the token presented).
async fn commit_grant(
    engine: &Engine,
    slot: &Slot,
    base: Record,
    grant: Answer,
    previous_ok: bool,
    stored: Secret,
) -> Outcome {
    let now = engine.now();
    let old_rt = base.chain.refresh_token.clone();
    let mut next = base.clone();
    let mut events = Vec::new();
    let rotated = match grant.refresh_token {
        Some(new_rt) if new_rt.expose() != old_rt.expose() => {
            next.chain.previous = previous_ok.then(|| Box::new((old_rt, now)));
            next.chain.refresh_token = new_rt;
            next.chain.rotated_at = now;
            events.push(Event::new(EventKind::Rotated, "refresh token rotated"));
            true
        }
        _ => {
            events.push(Event::new(
                EventKind::Refreshed,
                "access token renewed; the provider sent no new refresh token, the old one is kept",
            ));
            false
        }
    };
    next.chain.used_at = now;
    match grant.access_token {
        Some(token) => {
            let lifetime = grant.expires_in.unwrap_or(ASSUMED_ACCESS_LIFETIME);
            next.chain.access = Some(AccessToken {
                token,
                expires_at: now + super::chrono_dur(lifetime),
            });
            next.conn.last_refresh_at = Some(now);
        }
        None => next.chain.access = None,
    }
    next.chain.attempt_started_at = None;
    next.chain.version = base.chain.version + 1;
    if let Some(scopes) = grant.scopes {
        next.conn.scopes = scopes.into();
    }
    let recovered = next.conn.status == Status::NeedsReauth;
    if recovered {
        events.push(Event::new(EventKind::Recovered, "the chain works again"));
        next.conn.status = Status::Active;
    }
    next.conn.last_error = None;
    next.conn.consecutive_failures = 0;
    next.conn.updated_at = now;
    let mut expect = base.chain.version;
    if engine.store.shared() && !claim_lasts(engine, slot) {
        // The request took long: renew, so that a claim nobody took over is not lost to its
        // expiry (a renewal fails once another daemon has claimed). A claim with at least
        // `request_timeout` left outlasts the commit without one.
        let _ = renew_claim(engine, slot, &base.conn.id).await;
    }
    let mut saved = save(engine, slot, next.clone(), expect, events.clone()).await;
    if let Err(StoreError::Conflict(_)) = &saved {
        match after_conflict(engine, slot, &next, Some(&stored), expect).await {
            Behind::Retry(version) => {
                expect = version;
                next.chain.version = expect + 1;
                saved = save(engine, slot, next.clone(), expect, events).await;
            }
            Behind::Done(current) => return Outcome::Committed { next: current },
            Behind::Moved(current) => return Outcome::Superseded { current },
            Behind::Claimed => saved = Err(StoreError::Unavailable(ANOTHER_HOLDS.into())),
            Behind::Unknown(e) => saved = Err(e),
        }
    }
    match saved {
        Ok(()) if rotated => Outcome::Rotated { next, recovered },
        Ok(()) => Outcome::RenewedWithoutRotation { next, recovered },
        Err(e) => Outcome::CommitPending {
            held: Held {
                rec: next,
                expect_version: expect,
                insert: false,
                presented: Some(stored),
                refused: false,
            },
            error: e,
        },
    }
}

async fn reject(
    engine: &Engine,
    slot: &Slot,
    base: Record,
    code: String,
    description: String,
) -> Outcome {
    let now = engine.now();
    let message = format!("the provider rejected the chain ({code}: {description}); consent again");
    let newly = base.conn.status != Status::NeedsReauth;
    let mut next = base.clone();
    next.conn.status = Status::NeedsReauth;
    next.conn.last_error = Some(Box::new(LastError {
        code,
        message: message.clone(),
        at: now,
    }));
    next.conn.consecutive_failures = next.conn.consecutive_failures.saturating_add(1);
    next.conn.updated_at = now;
    next.chain.attempt_started_at = None;
    next.chain.access = None;
    next.chain.version = base.chain.version + 1;
    let mut events = vec![Event::new(EventKind::Failed, message.clone())];
    if newly {
        events.push(Event::new(
            EventKind::StatusChanged,
            "active -> needs_reauth",
        ));
    }
    let committed = save(engine, slot, next.clone(), base.chain.version, events)
        .await
        .inspect_err(|e| tracing::error!(connection = %base.conn.id, error = %e, "cannot record needs_reauth in the ledger"))
        .is_ok();
    Outcome::Rejected {
        next,
        committed,
        message,
        newly,
    }
}

async fn retry_later(
    engine: &Engine,
    slot: &Slot,
    base: Record,
    e: ProviderError,
    marked_before: bool,
) -> Outcome {
    let settings = engine.settings();
    let now = engine.now();
    // An unknown outcome stays unknown until a definite answer: a later plain failure (a
    // connect error, the local Retry-After gate) does not make it known.
    let ambiguous = e.maybe_processed() || marked_before;
    let failures = base.conn.consecutive_failures.saturating_add(1);
    let mut delay = backoff::delay(
        failures,
        settings.backoff_min,
        settings.backoff_max,
        e.retry_after(),
        ambiguous,
    );
    if ambiguous && e.retry_after().is_none() {
        // Land well inside the leeway: at most a third of what is left of it.
        let marked_at = base.chain.attempt_started_at.unwrap_or(now);
        let left = REUSE_LEEWAY
            .saturating_sub(LEEWAY_SAFETY_MARGIN)
            .saturating_sub((now - marked_at).to_std().unwrap_or_default());
        if !left.is_zero() {
            delay = delay.min(left / 3).max(AMBIGUOUS_RETRY_MIN);
        }
    }
    let mut next = base.clone();
    next.conn.consecutive_failures = failures;
    next.conn.last_error = Some(Box::new(LastError {
        code: e.code(),
        message: e.to_string(),
        at: now,
    }));
    next.conn.updated_at = now;
    if !ambiguous {
        // This attempt set the marker, and the provider did not process the request.
        next.chain.attempt_started_at = None;
    }
    next.chain.version = base.chain.version + 1;
    let committed = save(engine, slot, next.clone(), base.chain.version, vec![Event::new(EventKind::Failed, e.to_string())])
        .await
        .inspect_err(|err| tracing::error!(connection = %base.conn.id, error = %err, "cannot record a failed refresh in the ledger"))
        .is_ok();
    let kind = match &e {
        ProviderError::Transient {
            kind: TransientKind::RateLimited,
            ..
        } => "the provider is rate limiting token requests",
        _ => "the provider could not refresh the token",
    };
    Outcome::RetryLater {
        next,
        committed,
        delay,
        ambiguous,
        provider_asked: e.retry_after().is_some(),
        message: format!("{kind}: {e}"),
    }
}

/// Moves the chain of `source` (a connection just added) into `base` (the existing connection
/// of the same account) and deletes `source`, in one store transaction. Called with both
/// chain locks held.
pub(crate) async fn adopt(engine: &Engine, source: &Record, base: Record) -> Outcome {
    let now = engine.now();
    let from_id = &source.conn.id;
    let mut next = base.clone();
    let revived = next.conn.status == Status::NeedsReauth;
    let mut events = vec![Event::new(
        EventKind::Merged,
        format!("took a new chain for the same account from {from_id}"),
    )];
    if revived {
        events.push(Event::new(
            EventKind::Recovered,
            "revived by a new chain for the same account",
        ));
    }
    next.chain = source.chain.clone();
    next.chain.previous = None;
    next.chain.version = base.chain.version + 1;
    next.conn.status = Status::Active;
    next.conn.scopes = source.conn.scopes.clone();
    next.conn.consented_at = source.conn.consented_at;
    next.conn.last_refresh_at = source.conn.last_refresh_at;
    next.conn.last_error = None;
    next.conn.consecutive_failures = 0;
    next.conn.updated_at = now;
    match engine
        .store
        .merge(
            from_id.clone(),
            source.chain.version,
            next.clone(),
            base.chain.version,
            events,
        )
        .await
    {
        Ok(()) => Outcome::Adopted { next, revived },
        Err(StoreError::Conflict(_)) => superseded(engine, &base.conn.id).await,
        Err(e) => Outcome::Skipped(Skip::MergeFailed(e.to_string())),
    }
}

/// What has to happen after the slot's lock is released.
#[derive(Default)]
pub(crate) struct Effects {
    notify: Option<(Kind, crate::model::Connection, String)>,
    resolve_sites: bool,
    /// The connection's label is to change to this one (a held insert committed under a
    /// generated label): made by [`Engine::relabel`] under the index's lock, which the
    /// slot's holder may not take.
    relabel: Option<String>,
    /// The store no longer has the connection.
    uninstall: bool,
}

impl Effects {
    pub(crate) fn apply(self, engine: &Arc<Engine>, slot: &Arc<Slot>) {
        let id = slot.lock().rec.id().to_owned();
        if let Some(new) = self.relabel {
            engine.relabel(slot, new);
        }
        if self.uninstall {
            engine.uninstall(&id);
        }
        if let Some((kind, conn, message)) = self.notify {
            engine.notify(kind, &conn, &message);
        }
        if self.resolve_sites {
            engine.resolve_soon(slot, Duration::ZERO);
        }
    }
}

/// Applies an outcome to the chain's memory and says what the caller learns. Called with
/// the slot locked, once per attempt, by [`super::flight`], which then re-plans. A record
/// read from the store (not one this attempt committed) is taken only when it is not older
/// than memory's chain ([`adopt_unless_older`]).
pub(crate) fn settle(
    engine: &Engine,
    st: &mut SlotState,
    outcome: Outcome,
) -> (Result<(), Failure>, Effects) {
    let mut effects = Effects::default();
    let id = st.rec.id().to_owned();
    let backoff_min = engine.settings().backoff_min;
    let result = match outcome {
        Outcome::Rotated { next, recovered }
        | Outcome::RenewedWithoutRotation { next, recovered } => {
            tracing::info!(connection = %id, "refreshed");
            engine.adopt(st, &next);
            engine.set_held(st, None);
            engine.set_not_before(st, None);
            st.provider_asked = false;
            if recovered {
                effects.notify = Some((
                    Kind::Recovered,
                    st.rec.to_record().conn,
                    "the chain works again".into(),
                ));
            }
            effects.resolve_sites = st.sites_wanted;
            Ok(())
        }
        Outcome::Adopted { next, revived } => {
            engine.adopt(st, &next);
            engine.set_not_before(st, None);
            st.provider_asked = false;
            if revived {
                effects.notify = Some((
                    Kind::Recovered,
                    st.rec.to_record().conn,
                    "revived by a new chain for the same account".into(),
                ));
            }
            Ok(())
        }
        Outcome::Committed { next } => {
            if next.conn.label != st.rec.label() {
                tracing::warn!(connection = %id, label = %next.conn.label, "the held connection was committed under a generated label");
                effects.relabel = Some(next.conn.label.clone());
            }
            adopt_unless_older(engine, st, &next);
            engine.set_held(st, None);
            effects.resolve_sites = st.sites_wanted;
            Ok(())
        }

        Outcome::CommitPending { mut held, error } => {
            held.refused = matches!(error, StoreError::Refused { .. });
            let told = st.held.as_ref().is_some_and(|h| h.refused);
            if !held.refused {
                tracing::error!(connection = %id, error = %error, "cannot commit the rotated refresh token; holding it in memory and retrying");
            } else if !told {
                // Not "unavailable": the ledger answers, and refuses this chain's values.
                // The chain is kept (and its commit retried) all the same; said once.
                tracing::error!(connection = %id, error = %error, "the ledger refuses to store this chain's values; holding the rotated refresh token in memory and retrying its commit, which fails the same way until the value is dealt with");
            } else {
                tracing::debug!(connection = %id, error = %error, "the ledger still refuses the held chain");
            }
            engine.set_held(st, Some(held));
            Err(Failure::Internal(format!(
                "the rotated refresh token could not be saved ({error}); tokend keeps it and retries the commit"
            )))
        }
        Outcome::Rejected {
            next,
            committed,
            message,
            newly,
        } => {
            if !committed && st.rec.version() >= next.chain.version {
                // Memory moved past the chain this attempt presented while it ran (a reload
                // took another daemon's newer chain) and the rejection was not recorded: it
                // was of an older token. Keep the newer chain; the caller tries again.
                tracing::warn!(connection = %id, "a rejected token was already superseded by a newer chain; keeping the newer one");
                st.stale = true;
                return (
                    Err(Failure::Unavailable {
                        retry_after: backoff_min,
                        message: "the chain changed while this refresh ran; try again".into(),
                    }),
                    effects,
                );
            }
            tracing::warn!(connection = %id, "chain rejected by the provider; needs re-consent");
            let version = st.rec.version();
            engine.adopt(st, &next);
            if !committed {
                // Dead either way; keep the store's version as the compare-and-swap key, and
                // reload before the next attempt (the write may have landed after all).
                st.update(|rec| rec.chain.version = version);
                st.stale = true;
            }
            if newly {
                effects.notify =
                    Some((Kind::NeedsReauth, st.rec.to_record().conn, message.clone()));
            }
            Err(Failure::NeedsReauth(message))
        }
        Outcome::RetryLater {
            next,
            committed,
            delay,
            ambiguous,
            provider_asked,
            message,
        } => {
            tracing::warn!(
                connection = %id,
                error = %message,
                retry_in_secs = delay.as_secs(),
                ambiguous,
                "refresh failed; will retry"
            );
            if committed {
                engine.adopt(st, &next);
            } else {
                // Memory may lead the store on failure counters, never on the chain; the
                // write may have landed after all, so reload before the next attempt.
                st.update(|rec| {
                    rec.conn.consecutive_failures = next.conn.consecutive_failures;
                    rec.conn.last_error = next.conn.last_error.clone();
                    if next.chain.access.is_none() {
                        // An access token that came with a rejected refresh token is not
                        // served, committed or not.
                        rec.chain.access = None;
                    }
                });
                st.stale = true;
            }
            engine.set_not_before(st, Some(Instant::now() + delay));
            st.claim_wait = false;
            st.provider_asked = provider_asked;
            Err(Failure::Unavailable {
                retry_after: delay,
                message,
            })
        }
        Outcome::Superseded { current } => {
            if let Some(held) = engine.set_held(st, None) {
                tracing::error!(connection = %id, version = held.expect_version, "the ledger holds another chain than the one waiting for its commit; the ledger's chain wins");
            }
            match current {
                Some(rec) => {
                    tracing::warn!(connection = %id, "the chain changed in the ledger; reloaded");
                    adopt_unless_older(engine, st, &rec);
                    Err(Failure::Conflict(
                        "the chain changed concurrently; try again".into(),
                    ))
                }
                None => {
                    effects.uninstall = true;
                    Err(Failure::NotFound)
                }
            }
        }
        Outcome::Skipped(skip) => match skip {
            Skip::Removed => Err(Failure::NotFound),
            Skip::NeedsReauth(m) => Err(Failure::NeedsReauth(m)),
            Skip::Backoff { wait, message } => Err(Failure::Unavailable {
                retry_after: wait,
                message,
            }),
            Skip::AlreadyFresh => Ok(()),
            Skip::NotConfigured(reason) => {
                let wait = engine.settings().backoff_max;
                hold_off(engine, st, wait);
                Err(Failure::Unavailable {
                    retry_after: wait,
                    message: reason,
                })
            }
            Skip::StoreDown(e) => {
                st.stale = true;
                tracing::error!(connection = %id, error = %e, "cannot record a refresh attempt in the ledger; not refreshing");
                hold_off(engine, st, backoff_min);
                Err(Failure::Internal(format!(
                    "the ledger cannot be written: {e}"
                )))
            }
            Skip::ShuttingDown => Err(Failure::Internal("the refresh engine is stopping".into())),
            Skip::MergeFailed(e) => Err(Failure::Internal(format!(
                "the new chain could not be merged into the account's connection ({e}); both stay as they are"
            ))),
            Skip::ClaimedElsewhere { current, wait } => {
                tracing::info!(connection = %id, "another tokend daemon is refreshing this chain; serving what it commits");
                match current {
                    Some(rec) => {
                        // Memory is at least as new as this read either way.
                        adopt_unless_older(engine, st, &rec);
                        st.stale = false;
                    }
                    None => st.stale = true,
                }
                if hold_off(engine, st, wait) {
                    st.claim_wait = true;
                }
                Err(Failure::Unavailable {
                    retry_after: wait,
                    message: "another tokend daemon is refreshing this chain; try again shortly"
                        .into(),
                })
            }
            Skip::LeaseShort(left) => {
                tracing::warn!(connection = %id, left_ms = left.as_millis() as u64, "the claim on this chain has less than request_timeout left; not refreshing now");
                hold_off(engine, st, super::COMMIT_RETRY);
                Err(Failure::Unavailable {
                    retry_after: super::COMMIT_RETRY,
                    message: "the claim on this chain's refresh ran short; retrying".into(),
                })
            }
        },
    };
    (result, effects)
}

/// Takes a record the store held into memory, unless memory already holds a newer chain
/// version: on a shared store a reload (`refresh::shared`) may have taken another daemon's
/// later commit between the attempt's read of the store and its settling, and memory never
/// goes back to an older chain (it would serve, or present, what that daemon replaced).
/// An equal version is the same chain (versions only grow, one per write). Whether memory
/// took it.
fn adopt_unless_older(engine: &Engine, st: &mut SlotState, rec: &Record) -> bool {
    if rec.chain.version < st.rec.version() {
        tracing::debug!(
            connection = %st.rec.id(),
            read = rec.chain.version,
            memory = st.rec.version(),
            "memory already holds a newer chain than the one read; keeping it"
        );
        return false;
    }
    engine.adopt(st, rec);
    true
}

/// Whatever failed without a backoff of its own must not be retried in a tight loop; a
/// backoff already running is left alone (callers during it must not push it out). Whether
/// it set a new wait.
fn hold_off(engine: &Engine, st: &mut SlotState, wait: Duration) -> bool {
    let now = Instant::now();
    if engine.not_before(st).is_none_or(|nb| nb <= now) {
        engine.set_not_before(st, Some(now + wait));
        st.claim_wait = false;
        return true;
    }
    false
}
