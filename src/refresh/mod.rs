//! The refresh engine: keeps every chain in memory, refreshes it one request at a time, and
//! decides when to refresh next.
//!
//! Callers ([`Engine::token`], [`Engine::refresh_now`], import, connect, the site job, the
//! scheduler) never refresh a chain themselves. They ask the engine, which runs the attempt
//! on a task it owns ([`flight`]) and lets them await its shared result: a caller may vanish
//! at any await without effect on the attempt. The engine
//!
//! - serves cached access tokens from memory, without touching the store;
//! - lets at most one attempt per chain run (a per-chain lock held by the attempt's task),
//!   and lets every caller that arrives meanwhile share its result;
//! - bounds attempts across chains by `refresh.max_concurrent` permits, handed out by
//!   urgency ([`permits`], [`plan::Urgency`]);
//! - changes a chain in exactly one place ([`attempt`]), whose outcome enum decides the
//!   events, metrics, notifications and the next plan;
//! - reaches the ledger and the provider only through the [`store::Store`] and
//!   [`store::TokenEndpoint`] seams, so that the deterministic simulation can run it.
//!
//! **Architecture Invariant:** one refresh in flight per connection, across API callers,
//! schedules and retries: every provider call that presents a chain's refresh token happens
//! on an engine task holding that chain's lock.

mod attempt;
pub(crate) mod backoff;
mod chain_lock;
mod flight;
mod index;
mod keymap;
mod onboard;
mod packed;
pub(crate) mod permits;
pub(crate) mod plan;
mod shared;
mod sites;
pub(crate) mod store;
mod view;

#[cfg(test)]
mod semantics;
#[cfg(test)]
mod sim;

use crate::config::RefreshConfig;
use crate::metrics::{ConnectionSource, Metrics};
use crate::model::{Connection, Record, Site, Status, Time};
use crate::notify::{Kind, Notification};
use crate::provider::ASSUMED_ACCESS_LIFETIME;
use crate::secret::Secret;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::time::Instant;

use flight::Joined;
use index::{Index, slot_id, slot_label};
use keymap::{KeyMap, key_hash};
use packed::Packed;

pub use sites::SiteOutcome;
pub use store::{Clock, Store, StoreError, SystemClock, TokenEndpoint};

/// How long a `state` handed out by `POST /v1/authorizations` stays valid. The consent screen
/// plus Atlassian's 10-minute code lifetime fit inside it.
pub const AUTHORIZATION_TTL: Duration = Duration::from_secs(15 * 60);

/// How far ahead of a connection's absolute (consent) expiry tokend starts warning daily.
pub const ABSOLUTE_WARNING_WINDOW: Duration = Duration::from_secs(14 * 86_400);

/// The scheduler loop wakes at least this often, even with nothing due, to prove it is
/// alive (health and the systemd watchdog look at its heartbeat).
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// After a failed commit of a rotated token, how soon it is tried again: short, because the
/// token's predecessor is inside the reuse leeway only for minutes.
pub const COMMIT_RETRY: Duration = Duration::from_secs(2);

/// A token within `lifetime / FRESH_SLACK_DIVISOR` (at most [`FRESH_SLACK_MAX`]) of its
/// full lifetime counts as fresh: see `satisfies`.
const FRESH_SLACK_DIVISOR: u32 = 10;

/// See [`FRESH_SLACK_DIVISOR`]: one minute is far more than a refresh round trip.
const FRESH_SLACK_MAX: Duration = Duration::from_secs(60);

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
    /// A refresh was needed (made for this caller or shared with another).
    Refreshed,
}

/// Who a connection is: what an access check needs ([`Engine::identity`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The connection id.
    pub id: String,
    /// Its label.
    pub label: String,
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

/// What the answer to a token request says about its connection: shared by every answer
/// (one reference count each, no copy of the connection), and replaced only when one of its
/// fields changes (see [`SlotState::set_rec`]).
#[derive(Debug)]
pub struct Face {
    /// The connection id.
    pub id: String,
    /// The connection's scopes (the connection's shared list).
    pub scopes: crate::model::Scopes,
    /// The connection's sites.
    pub sites: Vec<crate::model::Site>,
    /// What the API made of the fields above, once, for every answer that shares this face
    /// (its wire form of them): opaque to the engine, which never reads it. A change of the
    /// fields makes a new face, so this never describes fields other than its own.
    pub rendered: std::sync::OnceLock<Box<[u8]>>,
}

impl Face {
    fn of(conn: Connection) -> Face {
        Face {
            id: conn.id,
            scopes: conn.scopes,
            sites: conn.sites,
            rendered: std::sync::OnceLock::new(),
        }
    }

    /// Whether this face still shows `conn`.
    fn shows(&self, conn: &Connection) -> bool {
        self.id == conn.id && self.scopes == conn.scopes && self.sites == conn.sites
    }
}

/// What [`Engine::token_for_site`] found.
#[derive(Debug)]
pub enum ForSite {
    /// Exactly one active connection reaches the site: its token, or why it was not handed
    /// out (as for [`Engine::token_for`]; `NotFound` when it was removed meanwhile).
    Handed(Result<TokenGrant, NotHanded>),
    /// None or several reach it: their ids, sorted (empty for none).
    NotOne(Vec<String>),
}

/// Why [`Engine::token_for`] handed out no token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotHanded {
    /// The caller's check refused this connection (who it is, for the refusal's message and
    /// audit record).
    Refused(Identity),
    /// As for [`Engine::token`].
    Failed(Failure),
}

impl From<Failure> for NotHanded {
    fn from(f: Failure) -> Self {
        NotHanded::Failed(f)
    }
}

/// A token handed to a caller.
#[derive(Debug)]
pub struct TokenGrant {
    /// What the answer says about the connection it belongs to (its public face only).
    pub face: Arc<Face>,
    /// The bearer token: shared with the slot and every other answer of the same token (one
    /// reference count per answer: no copy of it to allocate and wipe per request).
    pub access_token: Arc<Secret>,
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

/// A consent flow started by `POST /v1/authorizations`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorization {
    /// The consent screen to open.
    pub authorize_url: String,
    /// The single-use `state`.
    pub state: String,
    /// Where the provider sends the browser back.
    pub redirect_uri: String,
}

/// Why a refresh is being made: decides which gates it honours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Need {
    /// A caller needs a token valid this long.
    Lifetime(Duration),
    /// The plan says it is time, at this urgency.
    Scheduled(plan::Urgency),
    /// An operator (or a new import) asked for a refresh now: tokend's own backoff and a
    /// `needs_reauth` status do not stop it; the provider's `Retry-After` does.
    Forced,
}

impl Need {
    fn urgency(self) -> plan::Urgency {
        match self {
            Need::Lifetime(_) | Need::Forced => plan::Urgency::Renew,
            Need::Scheduled(u) => u,
        }
    }
}

/// A chain change the store has not committed yet. Until it is, nothing of it is used: no
/// token is handed out and the chain is not refreshed further.
#[derive(Clone, Debug)]
pub(crate) struct Held {
    /// The record to commit.
    rec: Record,
    /// The version the store holds now (the compare-and-swap key).
    expect_version: u64,
    /// The connection is not in the store at all yet (a consent whose insert failed).
    insert: bool,
    /// The refresh token the store holds while this change waits (the one presented to the
    /// provider); `None` for an insert. A conflicting store that still holds it is behind
    /// only by a write of this chain's own that landed, and may be written over.
    presented: Option<Secret>,
    /// The store refused a value of this change as data (`StoreError::Refused`): said once,
    /// as an error, when it first happened; the commit retries that follow (every
    /// `COMMIT_RETRY`, exactly as for any held change, since the chain must not be lost)
    /// do not say it again.
    refused: bool,
}

/// Per-connection state, behind the slot's mutex (never held across an `.await`).
pub(crate) struct SlotState {
    /// What the store has committed (plus the in-memory-only failure counters), packed in
    /// one allocation ([`packed`]: its string bytes and about 80 more, where a `Record` was
    /// about 850 bytes with its allocations). Read with its accessors, or whole with
    /// [`Packed::to_record`]; changed only by [`SlotState::set_rec`] (or
    /// [`SlotState::update`]), which keeps `answer` right. Only [`attempt`] and
    /// [`onboard`] replace its chain, and only after a commit returned.
    rec: Packed,
    /// A committed-elsewhere-pending change: see [`Held`]. Boxed: rare, and a whole record
    /// inline would double every connection's resident size.
    held: Option<Box<Held>>,
    /// No provider call before this instant (backoff or `Retry-After`): read and set through
    /// [`Engine::not_before`] and [`Engine::set_not_before`] (an offset from the engine's
    /// base, 8 bytes, not an `Option<Instant>`'s 16).
    not_before: Since,
    /// The provider itself asked for this wait (`Retry-After`): even a forced refresh
    /// honours it.
    provider_asked: bool,
    /// The wait is only for another daemon's claim on the chain (`Skip::ClaimedElsewhere`):
    /// it spaces the scheduler's looks, but a caller who needs a token may still look (and
    /// wait for what that daemon commits).
    claim_wait: bool,
    /// The last time a caller asked for a token (hot connections are renewed ahead): an
    /// atomic, so that a cached answer, which takes the state's lock for reading only, can
    /// record it.
    last_requested: LastRequested,
    /// What token answers share ([`Answer`]), made by the first token answer after a change
    /// (under the read lock, which no change can interleave with) and kept right by
    /// [`SlotState::set_rec`]. Lazy: most connections of a large ledger are never read
    /// between two changes, and a face copies the id, scopes and sites (about 0.9 KB a
    /// connection at the scale bench's 100,000). One cell for both halves, boxed: 16 bytes
    /// in every slot instead of 32, for one allocation more in a hot connection's.
    answer: OnceLock<Box<Answer>>,
    /// The attempt running now, if any: callers join it instead of starting another.
    /// Boxed: a chain's attempt runs for a moment now and then, and 32 bytes inline would be
    /// in every slot.
    flight: Option<Box<flight::Flight>>,
    /// Set when the connection is removed, so that holders of the `Arc` stop.
    removed: bool,
    /// The slot's number in [`Index::handles`], what the [`SiteIndex`] files it as: given
    /// at install, freed at removal (only then may another slot get it).
    handle: Handle,
    /// Sites (and an unknown account) are to be resolved with the next access token the
    /// chain gets, instead of refreshing for them.
    sites_wanted: bool,
    /// `/me` answered that the account is hidden: do not ask again in this process.
    account_hidden: bool,
    /// Consecutive failed resolutions of sites or account (drives their retry backoff),
    /// saturating: a byte, since the backoff reaches `backoff_max` after a few dozen, and
    /// with `last_site_miss`'s 4 bytes the slot's small fields fit in 16 bytes (the slot
    /// in a smaller malloc chunk: see `a_slot_fits_its_chunk`).
    resolve_failures: u8,
    /// A site resolution is running or planned for this connection.
    resolving: bool,
    /// The last re-resolution triggered by a `?site=` lookup that matched nothing (whole
    /// seconds from the engine's base, rounded up: it only spaces such re-resolutions
    /// [`sites::SITE_MISS_INTERVAL`] apart, which a second more never harms).
    last_site_miss: SecondsSince,
    /// Memory may be behind the store (an attempt ended without settling, or a write
    /// conflicted): the next attempt reloads the chain from the store first.
    stale: bool,
    /// The claim on this chain's refresh the running attempt holds (`attempt` takes and
    /// renews it; the end of the attempt, `FlightGuard`, releases it). Boxed: held only
    /// while an attempt runs on a shared ledger, and 48 bytes inline in every slot.
    claim: Option<Box<attempt::Claim>>,
}

/// When a caller last asked for a connection's token, as an atomic (nanoseconds after the
/// engine's [`Engine::requests_base`], 0 for never): readers of the slot's state update it
/// under a shared lock. The base is the engine's, not the slot's own: 16 bytes less in every
/// slot.
pub(crate) struct LastRequested {
    /// Nanoseconds from the base to the last request, plus one; 0 when never asked.
    nanos: std::sync::atomic::AtomicU64,
}

impl LastRequested {
    fn new() -> LastRequested {
        LastRequested {
            nanos: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The last request, if any (`base`: the engine's [`Engine::requests_base`]).
    pub(crate) fn get(&self, base: Instant) -> Option<Instant> {
        match self.nanos.load(Ordering::Relaxed) {
            0 => None,
            n => Some(base + Duration::from_nanos(n - 1)),
        }
    }

    /// Records a request at `at`; returns the one before. Never moves back (two callers
    /// racing keep the later instant).
    fn set(&self, base: Instant, at: Instant) -> Option<Instant> {
        let since = at.saturating_duration_since(base).as_nanos();
        let n = u64::try_from(since).unwrap_or(u64::MAX - 1) + 1;
        match self.nanos.fetch_max(n, Ordering::Relaxed) {
            0 => None,
            old => Some(base + Duration::from_nanos(old - 1)),
        }
    }
}

/// An optional instant, as whole seconds after the engine's [`Engine::requests_base`],
/// rounded up, plus one (0 for none): 4 bytes, for an instant that only spaces events
/// seconds apart. Saturates after 136 years.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SecondsSince(u32);

impl SecondsSince {
    /// `at` counted from `base`, rounded up to a whole second.
    fn of(base: Instant, at: Option<Instant>) -> SecondsSince {
        SecondsSince(at.map_or(0, |at| {
            let since = at.saturating_duration_since(base);
            let secs = since.as_secs() + u64::from(since.subsec_nanos() > 0);
            u32::try_from(secs).unwrap_or(u32::MAX - 1) + 1
        }))
    }

    /// The instant (rounded up), counted from `base`.
    fn get(self, base: Instant) -> Option<Instant> {
        match self.0 {
            0 => None,
            n => Some(base + Duration::from_secs(u64::from(n - 1))),
        }
    }
}

/// An optional instant, as nanoseconds after the engine's [`Engine::requests_base`] plus
/// one (0 for none): 8 bytes in every slot where an `Option<Instant>` is 16. An instant
/// before the base (none is: the slot's instants are all taken after the engine was made)
/// would read as the base.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Since(u64);

impl Since {
    /// `at` counted from `base`.
    fn of(base: Instant, at: Option<Instant>) -> Since {
        Since(at.map_or(0, |at| {
            let since = at.saturating_duration_since(base).as_nanos();
            u64::try_from(since).unwrap_or(u64::MAX - 1) + 1
        }))
    }

    /// The instant, counted from `base`.
    fn get(self, base: Instant) -> Option<Instant> {
        match self.0 {
            0 => None,
            n => Some(base + Duration::from_nanos(n - 1)),
        }
    }
}

/// The slot's state locked for writing (a change of the record goes through
/// [`SlotState::set_rec`], which keeps the face and the shared token of token answers).
pub(crate) struct SlotGuard<'a>(parking_lot::RwLockWriteGuard<'a, SlotState>);

impl std::ops::Deref for SlotGuard<'_> {
    type Target = SlotState;
    fn deref(&self) -> &SlotState {
        &self.0
    }
}

impl std::ops::DerefMut for SlotGuard<'_> {
    fn deref_mut(&mut self) -> &mut SlotState {
        &mut self.0
    }
}

/// What every token answer of one record shares with the others (one reference count each,
/// no copy): the connection's face and the access token.
#[derive(Debug)]
pub(crate) struct Answer {
    /// What the answers show of the connection.
    face: Arc<Face>,
    /// The record's access token.
    access: Arc<Secret>,
}

impl SlotState {
    /// Replaces the record (packing `rec`; the old packing is wiped as it is dropped), and
    /// keeps [`SlotState::answer`] right: dropped when a field the face shows changed, its
    /// token replaced (the face kept) when only the access token changed. Every change of
    /// the record comes here, so the answer is never behind what a reader of the state sees.
    fn set_rec(&mut self, rec: &Record) {
        if let Some(answer) = self.answer.get() {
            let token = rec.chain.access.as_ref().map(|a| &a.token);
            if !answer.face.shows(&rec.conn) {
                self.answer = OnceLock::new();
            } else if token.map(Secret::expose) != Some(answer.access.expose()) {
                let face = answer.face.clone();
                self.answer = OnceLock::new();
                if let Some(token) = token {
                    let access = Arc::new(token.clone());
                    let _ = self.answer.set(Box::new(Answer { face, access }));
                }
            }
        }
        self.rec = Packed::from(rec);
    }

    /// Changes the record: decodes it, lets `change` change it, and packs it again
    /// ([`SlotState::set_rec`]).
    fn update<R>(&mut self, change: impl FnOnce(&mut Record) -> R) -> R {
        let mut rec = self.rec.to_record();
        let out = change(&mut rec);
        self.set_rec(&rec);
        out
    }

    /// Whether [`SlotState::answer`]'s face, if made, shows the record's connection.
    #[cfg(test)]
    pub(crate) fn face_current(&self) -> bool {
        self.answer
            .get()
            .is_none_or(|a| a.face.shows(&self.rec.to_record().conn))
    }

    /// What the token answers of the record share, made now (for `token`, the record's
    /// access token) if no answer since the last change made it: a reader holding only the
    /// read lock may make it, since the record cannot change under that lock.
    fn answer(&self, token: &str) -> &Answer {
        self.answer.get_or_init(|| {
            Box::new(Answer {
                face: Arc::new(Face::of(self.rec.to_record().conn)),
                access: Arc::new(Secret::new(token.to_owned())),
            })
        })
    }

    /// Whether [`SlotState::answer`]'s token, if made, is the record's access token.
    #[cfg(test)]
    pub(crate) fn access_shared_current(&self) -> bool {
        self.answer
            .get()
            .is_none_or(|a| self.rec.access().map(|a| a.0) == Some(a.access.expose()))
    }
}

/// One connection in memory.
pub(crate) struct Slot {
    /// The chain lock: held by the engine task that runs an attempt, a merge or a removal,
    /// for its whole duration, provider call included. Inline, not in an `Arc` of its own:
    /// the attempt's task holds the slot's `Arc` and borrows the lock from it (a separate
    /// allocation was 64 bytes a connection, 32 more than inline); one byte, its waiters
    /// parked outside the slot only while contended (a `tokio::sync::Mutex` was 40 bytes).
    chain: chain_lock::ChainLock,
    /// Everything else about the connection, behind a lock held only for short,
    /// non-awaiting reads and writes: a token served from cache needs only this, never the
    /// chain lock, so a slow provider call does not delay cached answers; and only for
    /// reading, so that the readers of a hot connection never wait for each other.
    state: RwLock<SlotState>,
}

impl Slot {
    /// A new slot for `rec`, numbered `handle`, holding `held` (boxed: see
    /// [`SlotState::held`]).
    fn new(rec: Packed, held: Option<Held>, handle: Handle) -> Slot {
        Slot {
            chain: chain_lock::ChainLock::new(),
            state: RwLock::new(SlotState {
                answer: OnceLock::new(),
                rec,
                held: held.map(Box::new),
                not_before: Since::default(),
                provider_asked: false,
                claim_wait: false,
                last_requested: LastRequested::new(),
                flight: None,
                removed: false,
                handle,
                sites_wanted: false,
                account_hidden: false,
                resolve_failures: 0,
                resolving: false,
                last_site_miss: SecondsSince::default(),
                stale: false,
                claim: None,
            }),
        }
    }

    /// The state, for writing (or for a read that must not interleave with a write).
    fn lock(&self) -> SlotGuard<'_> {
        SlotGuard(self.state.write())
    }

    /// The state, for reading only: shared with other readers.
    fn read(&self) -> parking_lot::RwLockReadGuard<'_, SlotState> {
        self.state.read()
    }
}

impl SlotState {
    /// Whether this connection belongs in the [`SiteIndex`]: installed and active.
    fn filed(&self) -> bool {
        !self.removed && self.rec.status() == Status::Active
    }
}

/// Which active connections reach each site, so that `/v1/token?site=` costs O(matches),
/// not a scan of every connection.
///
/// Kept exact: a connection is filed under the keys of its sites exactly while it is
/// installed, not removed and `Active` ([`Engine::install`], [`Engine::uninstall`],
/// [`Engine::adopt`] for status, [`Engine::set_sites`] for sites: the only writers of a
/// slot's status and sites). The simulation checks it against [`SiteIndex::recount`] after
/// every step. Cloud ids and hosts are kept apart, as the lookup always compared them.
///
/// Small: a key is a 32-bit hash of the normalised cloud id or host ([`key_hash`]), not a
/// copy of it, and a connection is filed as its slot's [`Handle`], not a copy of its id (at
/// the scale bench's 100,000 connections the copies were about 450 bytes a connection, the
/// largest item after the records themselves; now an entry is 8 bytes). Two keys with the
/// same hash share an entry; a lookup checks every candidate against its own sites
/// ([`site_matches`]), so a collision costs a check, never a wrong answer.
#[derive(Default, Debug, PartialEq, Eq)]
pub(crate) struct SiteIndex {
    /// Hash of the lowercased cloud id to the active connections listing it.
    by_cloud_id: KeyMap,
    /// Hash of the lowercased site host (`acme.atlassian.net`) to the same.
    by_host: KeyMap,
}

/// A slot's number in [`Index::handles`]: given at install, free again at uninstall (and
/// then given to a later slot). What the [`SiteIndex`] files a connection as: 4 bytes
/// instead of a copy of its id.
pub(crate) type Handle = u32;

/// Whether one of `sites` is cloud id `cloud_id` or on host `host` (both normalised as the
/// [`SiteIndex`] files them): the check of a lookup's candidates.
fn site_matches(rec: &Packed, cloud_id: &str, host: &str) -> bool {
    rec.sites().any(|s| {
        s.cloud_id.eq_ignore_ascii_case(cloud_id) || crate::model::url_host_is(s.url, host)
    })
}

/// The keys one connection's sites are filed under in the [`SiteIndex`]; computed (URL
/// parses, hashes) before the index's lock is taken.
pub(crate) struct SiteKeys {
    /// Every site's cloud id, lowercased, hashed.
    cloud_ids: Vec<u32>,
    /// Every site's host, lowercased, hashed (sites whose URL has none are not reachable by
    /// host).
    hosts: Vec<u32>,
}

impl SiteKeys {
    /// The keys of `sites`.
    pub(crate) fn of(sites: &[Site]) -> SiteKeys {
        SiteKeys::of_urls(sites.iter().map(|s| (&*s.cloud_id, &*s.url)))
    }

    /// The keys of a packed record's sites.
    fn of_packed(rec: &Packed) -> SiteKeys {
        SiteKeys::of_urls(rec.sites().map(|s| (s.cloud_id.to_string(), s.url)))
    }

    /// The keys of sites given as (cloud id, URL).
    fn of_urls<'a, C: AsRef<str>>(sites: impl Iterator<Item = (C, &'a str)> + Clone) -> SiteKeys {
        SiteKeys {
            cloud_ids: sites
                .clone()
                .map(|(cloud_id, _)| key_hash(&cloud_id.as_ref().to_ascii_lowercase()))
                .collect(),
            hosts: sites
                .filter_map(|(_, url)| crate::model::url_host(url))
                .map(|h| key_hash(&h))
                .collect(),
        }
    }
}

impl SiteIndex {
    /// Room for `n` more connections of one site each (a load's).
    fn reserve(&mut self, n: usize) {
        self.by_cloud_id.reserve(n);
        self.by_host.reserve(n);
    }

    /// Files connection `handle` under `keys` (a key listed twice is filed once).
    fn file(&mut self, handle: Handle, keys: &SiteKeys) {
        for &key in &keys.cloud_ids {
            self.by_cloud_id.file(key, handle);
        }
        for &key in &keys.hosts {
            self.by_host.file(key, handle);
        }
    }

    /// Takes connection `handle` out from under `keys`, dropping keys nobody reaches any
    /// more.
    fn unfile(&mut self, handle: Handle, keys: &SiteKeys) {
        for &key in &keys.cloud_ids {
            self.by_cloud_id.unfile(key, handle);
        }
        for &key in &keys.hosts {
            self.by_host.unfile(key, handle);
        }
    }

    /// The handles filed under cloud id `cloud_id` or host `host` (both already
    /// normalised): candidates, to be checked against their slots' sites (a hash may
    /// collide), sorted, each once.
    pub(crate) fn candidates(&self, cloud_id: &str, host: &str) -> Vec<Handle> {
        let mut out: Vec<Handle> = self
            .by_cloud_id
            .get(key_hash(cloud_id))
            .chain(self.by_host.get(key_hash(host)))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The index built from scratch over `slots`: what the kept one must always equal.
    #[cfg(test)]
    pub(crate) fn recount(slots: &[Arc<Slot>]) -> SiteIndex {
        let mut index = SiteIndex::default();
        for slot in slots {
            let st = slot.lock();
            if st.filed() {
                index.file(st.handle, &SiteKeys::of_packed(&st.rec));
            }
        }
        index
    }
}

/// The refresh engine. Shared behind an `Arc`.
pub struct Engine {
    /// The ledger (or the simulation's store), reached only through this seam so that the
    /// engine never knows SQL and the simulation can inject faults and crashes.
    store: Arc<dyn Store>,
    /// Atlassian's token endpoint (or the simulation's strict provider), through a seam for
    /// the same reasons: the engine never knows HTTP.
    provider: Arc<dyn TokenEndpoint>,
    /// Wall time: the engine never reads the system clock itself, so tests and the
    /// simulation decide what time it is (deadlines use tokio's `Instant`, which they pause).
    clock: Arc<dyn Clock>,
    /// `[refresh]` in force; a reload replaces it (then every chain is re-planned), so it is
    /// read fresh, cloned, at each decision.
    settings: RwLock<RefreshConfig>,
    /// Every connection in memory, by handle, id and label and in label order: the token
    /// path reads it on every request, so a read lock; only install, uninstall and relabel
    /// write. Taken before a slot's lock, never while holding one (see [`Index`]).
    index: RwLock<Index>,
    /// Which active connections reach each site (`/v1/token?site=`). Its own lock, taken
    /// last (after `index` and a slot's): a status changes under the slot's lock alone.
    /// Read-write: every `?site=` request reads it, so lookups must not wait for each other.
    sites: RwLock<SiteIndex>,
    /// `refresh.max_concurrent` as a priority gate: bounds provider calls across chains, and
    /// lets the most urgent attempt go first.
    permits: permits::Permits,
    /// When each chain needs its next action: the scheduler loop sleeps until its earliest.
    plan: plan::Planner,
    /// `[notify] command`; a reload swaps it, so behind a lock (cloned to send).
    notifier: RwLock<crate::notify::Notifier>,
    /// Where the engine records what it decides (refresh outcomes and durations, site
    /// resolutions). The connection gauges are not pushed: `/metrics` reads them through
    /// [`crate::metrics::ConnectionSource`] when it is scraped.
    metrics: Arc<Metrics>,
    /// When the scheduler loop last woke: health, readiness and the watchdog call the engine
    /// stalled when it is older than three heartbeats.
    last_heartbeat: Mutex<Instant>,
    /// Onboarding (import, consent, merges) runs one at a time: label and account checks and
    /// the exchange that spends a grant happen under it.
    onboarding: tokio::sync::Mutex<()>,
    /// The `state` of every consent flow started and not yet finished, with when it was
    /// handed out: single use, valid for [`AUTHORIZATION_TTL`], bounded in number, so a
    /// callback with an unknown or replayed `state` is refused before the code is spent.
    authorizations: Mutex<HashMap<String, Instant>>,
    /// Every task the engine started (attempts, onboarding, resolutions).
    tasks: flight::Tasks,
    /// The `?site=` miss re-resolution sweeps, by peer uid: one at a time each, rate-limited
    /// ([`sites::SITE_SWEEP_GAP`]), so a stream of misses never costs a scan each.
    site_sweep: Mutex<HashMap<u32, sites::SiteSweep>>,
    /// How many slots hold a change the store has not committed: health and readiness read
    /// it on every probe, so it is kept, not counted over every connection.
    held: AtomicUsize,
    /// How many installed slots are `Active` (the rest of the index is `needs_reauth`):
    /// `/v1/health` and `/metrics` read it on every call, so it is kept as statuses change
    /// ([`Engine::adopt`], `install`, `uninstall`), not counted over every connection.
    active: AtomicUsize,
    /// Who this engine is when it claims a chain's refresh (`daemon.node_name`, set by
    /// [`Engine::set_node_name`]): the claim's holder. Until set, a name unique to this
    /// process and engine, so that two engines never share a holder by accident (the store
    /// grants a holder's own claim again).
    holder: RwLock<String>,
    /// An instant no token request of this engine precedes (its creation): what every
    /// slot's [`LastRequested`] counts from.
    requests_base: Instant,
}

/// Batches of a load the store may hand on before the engine installed them: the store's
/// threads read and open ahead while the engine installs, without holding the whole ledger
/// twice in memory.
const LOAD_BATCHES_QUEUED: usize = 4;

/// Engines made in this process so far: the default holder names stay unique.
static ENGINES: AtomicUsize = AtomicUsize::new(0);

impl Engine {
    /// Loads every connection from the store into memory and plans each one.
    pub async fn load(
        store: Arc<dyn Store>,
        provider: Arc<dyn TokenEndpoint>,
        clock: Arc<dyn Clock>,
        settings: RefreshConfig,
        notifier: crate::notify::Notifier,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Engine>, StoreError> {
        let engine = Arc::new(Engine {
            store,
            provider,
            clock,
            permits: permits::Permits::new(settings.max_concurrent),
            settings: RwLock::new(settings),
            index: RwLock::new(Index::default()),
            sites: RwLock::new(SiteIndex::default()),
            plan: plan::Planner::new(),
            notifier: RwLock::new(notifier),
            metrics,
            last_heartbeat: Mutex::new(Instant::now()),
            onboarding: tokio::sync::Mutex::new(()),
            authorizations: Mutex::new(HashMap::new()),
            tasks: flight::Tasks::default(),
            site_sweep: Mutex::new(HashMap::new()),
            held: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            requests_base: Instant::now(),
            holder: RwLock::new(format!(
                "tokend-{}-{}",
                std::process::id(),
                ENGINES.fetch_add(1, Ordering::Relaxed)
            )),
        });
        engine
            .metrics
            .watch_connections(Arc::downgrade(&engine) as std::sync::Weak<dyn ConnectionSource>);
        // Installed batch by batch as the store reads and opens the rest (on its threads):
        // at 100,000 connections, installing took a third of start-up after the load.
        let (sink, mut loaded) = tokio::sync::mpsc::channel(LOAD_BATCHES_QUEUED);
        let installing = async {
            engine.index.write().begin_load();
            let mut reserved = false;
            while let Some((total, batch)) = loaded.recv().await {
                if !reserved {
                    engine.reserve(total);
                    reserved = true;
                }
                for rec in &batch {
                    engine.install_loaded(rec);
                }
                // The records (their slots hold packed copies) are freed on a thread of
                // their own: about ten allocations a record, made on the store's threads,
                // whose freeing was on the installing task's path.
                tokio::task::spawn_blocking(move || drop(batch));
            }
            engine.index.write().end_load();
        };
        let (done, ()) = tokio::join!(engine.store.load_batches(sink), installing);
        done?;
        Ok(engine)
    }

    /// Room for `n` connections at once (a load's): growing the maps one by one rehashed
    /// every key about twice over, a tenth of a large ledger's start-up.
    fn reserve(&self, n: usize) {
        let mut index = self.index.write();
        index.reserve(n);
        self.sites.write().reserve(n);
        self.plan.reserve(n);
    }

    /// Installs and plans a connection the load read.
    fn install_loaded(&self, rec: &Record) {
        if rec.chain.attempt_started_at.is_some() {
            tracing::warn!(
                connection = %rec.conn.id,
                "a refresh was in flight when tokend stopped; retrying it with the same token inside the provider's reuse leeway"
            );
        }
        let wanted = rec.conn.status == Status::Active
            && (rec.conn.sites.is_empty() || rec.conn.account_id.is_none());
        // Planned as installed (a plan depends on its own chain alone), from the record at
        // hand rather than from its packing: what `replan_locked` would decide of a slot
        // just installed (no backoff, nothing held, never requested).
        let input = plan::PlanInput {
            facts: plan::ChainFacts::of(rec),
            not_before: None,
            held: false,
            last_requested: None,
        };
        let planned = plan::next_action(&input, &self.settings(), self.now(), COMMIT_RETRY);
        let slot = self.install_from(rec, None);
        let mut st = slot.lock();
        st.sites_wanted = wanted;
        match planned {
            Some(planned) => self.plan.schedule(st.handle, planned.at, planned.urgency),
            None => self.plan.cancel(st.handle),
        }
    }

    /// Applies new refresh settings (a reload) and re-plans every connection.
    pub fn set_settings(&self, new: RefreshConfig) {
        self.permits.set_limit(new.max_concurrent);
        *self.settings.write() = new;
        for slot in self.slots() {
            self.replan(&slot);
        }
    }

    /// Names this daemon as the holder of its claims on chains (`daemon.node_name`, or the
    /// host name). Every daemon sharing a ledger needs its own name: the store grants a
    /// holder's claim to the same holder again.
    pub fn set_node_name(&self, name: String) {
        *self.holder.write() = name;
    }

    /// The holder name of this engine's claims.
    fn holder(&self) -> String {
        self.holder.read().clone()
    }

    /// Replaces the notifier (a reload changed `[notify]`).
    pub fn set_notifier(&self, notifier: crate::notify::Notifier) {
        *self.notifier.write() = notifier;
    }

    /// The refresh settings in force.
    pub fn settings(&self) -> RefreshConfig {
        *self.settings.read()
    }

    /// Why the provider cannot be used, if it cannot.
    pub fn provider_not_configured(&self) -> Option<String> {
        self.provider.not_configured()
    }

    /// The base URL of a product API on a site.
    pub fn api_base_url(&self, product: &str, cloud_id: &str) -> String {
        self.provider.api_base_url(product, cloud_id)
    }

    /// Proves the store can take a write now (health and readiness).
    pub async fn store_writable(&self) -> Result<(), StoreError> {
        self.store.check_writable().await
    }

    fn now(&self) -> Time {
        self.clock.now()
    }

    /// Installs a connection: a new slot, filed in the index (by handle, id and label) and,
    /// when active, in the site index. An id installed already (never: ids are new, or were
    /// uninstalled first) replaces the old slot, which is removed with its counts kept right.
    fn install(&self, rec: Record, held: Option<Held>) -> Arc<Slot> {
        self.install_from(&rec, held)
    }

    /// [`Engine::install`] of a record the caller keeps (and drops): the slot holds a
    /// packed copy, nothing of `rec` itself (the load's records were made on the store's
    /// threads, in glibc arenas of their own, which empty, and are given back, once no chunk
    /// of them is kept).
    fn install_from(&self, rec: &Record, held: Option<Held>) -> Arc<Slot> {
        if held.is_some() {
            self.held.fetch_add(1, Ordering::Relaxed);
        }
        let packed = Packed::from(rec);
        let active = rec.conn.status == Status::Active;
        let keys = active.then(|| SiteKeys::of(&rec.conn.sites));
        let mut index = self.index.write();
        let old_slot = index.by_id(packed.id()).cloned();
        let handle = index.give_handle();
        let slot = Arc::new(Slot::new(packed, held, handle));
        if let Some(old_slot) = old_slot {
            let (old_handle, old_id, old_label) = {
                let old = old_slot.read();
                let (id, label) = (slot_id(&old).to_owned(), slot_label(&old).to_owned());
                (old.handle, id, label)
            };
            index.remove(old_handle, &old_id, &old_label);
            let mut old = old_slot.lock();
            if old.filed() {
                self.one_fewer_active();
                self.unfile_sites(&old);
            }
            old.removed = true;
            drop(old);
            self.plan.cancel(old_handle);
            index.free_handle(old_handle);
        }
        {
            // Read, not copied: nobody else has the new slot yet, and filing it reads the
            // other slots' labels only.
            let st = slot.read();
            index.insert(handle, slot.clone(), slot_id(&st), slot_label(&st));
        }
        if active {
            self.active.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(keys) = keys {
            self.sites.write().file(handle, &keys);
        }
        slot
    }

    fn uninstall(&self, id: &str) {
        let mut index = self.index.write();
        let Some(slot) = index.by_id(id).cloned() else {
            return;
        };
        let (handle, label) = {
            let st = slot.read();
            (st.handle, slot_label(&st).to_owned())
        };
        index.remove(handle, id, &label);
        let mut st = slot.lock();
        if st.filed() {
            self.one_fewer_active();
            self.unfile_sites(&st);
        }
        st.removed = true;
        self.set_held(&mut st, None);
        drop(st);
        // The plan goes before the handle is free: no other slot can have it yet.
        self.plan.cancel(handle);
        index.free_handle(handle);
    }

    /// The active count goes down by one. It never wraps: a decrement below zero would be a
    /// bookkeeping bug, reported once in debug builds and logged in release builds, while
    /// health keeps reporting a count that is at worst too low rather than "all active".
    fn one_fewer_active(&self) {
        if self
            .active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_err()
        {
            debug_assert!(false, "the active count went below zero");
            tracing::error!(
                "the active-connection count went below zero: health counts may be off"
            );
        }
    }

    /// A slot's `not_before`: no provider call before it.
    pub(crate) fn not_before(&self, st: &SlotState) -> Option<Instant> {
        st.not_before.get(self.requests_base)
    }

    /// Sets a slot's `not_before`.
    pub(crate) fn set_not_before(&self, st: &mut SlotState, at: Option<Instant>) {
        st.not_before = Since::of(self.requests_base, at);
    }

    /// Takes `from`'s chain and status into a slot (`Record::adopt_chain`), keeping
    /// [`Engine::status_counts`]'s count and the [`SiteIndex`]: the only way a slot's status
    /// changes.
    pub(crate) fn adopt(&self, st: &mut SlotState, from: &Record) {
        let was = st.rec.status() == Status::Active;
        st.update(|rec| rec.adopt_chain(from));
        let is = st.rec.status() == Status::Active;
        if st.removed || was == is {
            return;
        }
        let keys = SiteKeys::of_packed(&st.rec);
        if is {
            self.active.fetch_add(1, Ordering::Relaxed);
            self.sites.write().file(st.handle, &keys);
        } else {
            self.one_fewer_active();
            self.sites.write().unfile(st.handle, &keys);
        }
    }

    /// Replaces a slot's sites, keeping the [`SiteIndex`]: the only way a slot's sites
    /// change after it is installed.
    pub(crate) fn set_sites(&self, st: &mut SlotState, sites: Vec<Site>) {
        if !st.filed() {
            st.update(|rec| rec.conn.sites = sites);
            return;
        }
        let (old, new) = (SiteKeys::of_packed(&st.rec), SiteKeys::of(&sites));
        st.update(|rec| rec.conn.sites = sites);
        let mut index = self.sites.write();
        index.unfile(st.handle, &old);
        index.file(st.handle, &new);
    }

    /// Takes a slot that is leaving the [`SiteIndex`] out of it.
    fn unfile_sites(&self, st: &SlotState) {
        let keys = SiteKeys::of_packed(&st.rec);
        self.sites.write().unfile(st.handle, &keys);
    }

    /// Replaces a slot's held change, keeping [`Engine::commit_pending`]'s count.
    fn set_held(&self, st: &mut SlotState, held: Option<Held>) -> Option<Held> {
        match (st.held.is_some(), held.is_some()) {
            (false, true) => {
                self.held.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                self.held.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        std::mem::replace(&mut st.held, held.map(Box::new)).map(|b| *b)
    }

    /// A connection's label changes to `new` (a held insert committed under a generated
    /// label): the one change of a slot's label, made under the index's write lock, between
    /// taking the slot out of the label order and filing it again, so that no holder of the
    /// index lock ever sees a filed label out of its place.
    fn relabel(&self, slot: &Arc<Slot>, new: String) {
        let mut index = self.index.write();
        let (handle, old, removed) = {
            let st = slot.read();
            (st.handle, slot_label(&st).to_owned(), st.removed)
        };
        if removed {
            // Out of the index already.
            index::set_slot_label(&mut slot.lock(), new);
            return;
        }
        index.unfile_label(handle, &old);
        index::set_slot_label(&mut slot.lock(), new.clone());
        index.file_label(handle, &new);
    }

    fn slots(&self) -> Vec<Arc<Slot>> {
        let index = self.index.read();
        index.slots().cloned().collect()
    }

    /// Finds a connection by id, or else by label.
    fn find(&self, id_or_label: &str) -> Option<Arc<Slot>> {
        let index = self.index.read();
        index
            .by_id(id_or_label)
            .or_else(|| index.by_label(id_or_label))
            .cloned()
    }

    /// A fresh access token valid for at least `min_valid` (or the freshest the provider
    /// gives, if its lifetime is shorter). The caller may stop waiting at any point: the
    /// refresh it started (or joined) goes on without it.
    pub async fn token(
        self: &Arc<Self>,
        id_or_label: &str,
        min_valid: Duration,
    ) -> Result<TokenGrant, Failure> {
        let slot = self.find(id_or_label).ok_or(Failure::NotFound)?;
        self.token_of(&slot, min_valid).await
    }

    /// [`Engine::token`] for a caller that may read only some connections: `may_read` is
    /// asked with the connection's id and label (by the one look-up that finds its token),
    /// and a refusal hands out nothing, asks for nothing and records no request.
    pub async fn token_for(
        self: &Arc<Self>,
        id_or_label: &str,
        min_valid: Duration,
        may_read: impl FnOnce(&str, &str) -> bool,
    ) -> Result<TokenGrant, NotHanded> {
        let slot = self.find(id_or_label).ok_or(Failure::NotFound)?;
        self.token_checked(&slot, min_valid, may_read).await
    }

    /// [`Engine::token_for`] of the one active connection that reaches `site` (a host or a
    /// cloud id, as `?site=` takes it), found once: no id to copy
    /// and look up again. When not exactly one reaches it, the ids of those that do
    /// ([`ForSite::NotOne`], sorted; empty when none does).
    pub async fn token_for_site(
        self: &Arc<Self>,
        site: &str,
        min_valid: Duration,
        may_read: impl FnOnce(&str, &str) -> bool,
    ) -> ForSite {
        let mut slots = self.site_slots(site);
        if slots.len() != 1 {
            return ForSite::NotOne(view::sorted_ids(&slots));
        }
        let slot = slots.pop().expect("one slot");
        ForSite::Handed(self.token_checked(&slot, min_valid, may_read).await)
    }

    /// `slot`'s token, if `may_read` lets the caller read it (see [`Engine::token_for`]).
    async fn token_checked(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        min_valid: Duration,
        may_read: impl FnOnce(&str, &str) -> bool,
    ) -> Result<TokenGrant, NotHanded> {
        // The check and the cached answer under one shared lock: a hot connection's lock is
        // the cache line its readers share, and each taking of it one more transfer of it.
        {
            let st = slot.read();
            if st.removed {
                return Err(Failure::NotFound.into());
            }
            let (id, label) = (st.rec.id(), st.rec.label());
            if !may_read(id, label) {
                return Err(NotHanded::Refused(Identity {
                    id: id.to_owned(),
                    label: label.to_owned(),
                }));
            }
            if let Some(answer) = self.cached_read(&st, min_valid) {
                return Ok(answer?);
            }
        }
        Ok(self.token_uncached(slot, min_valid).await?)
    }

    async fn token_of(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        min_valid: Duration,
    ) -> Result<TokenGrant, Failure> {
        // The cached answer, under a shared lock: readers of a hot connection never wait
        // for each other, only (briefly) for a change of the state.
        {
            let st = slot.read();
            if st.removed {
                return Err(Failure::NotFound);
            }
            if let Some(answer) = self.cached_read(&st, min_valid) {
                return answer;
            }
        }
        self.token_uncached(slot, min_valid).await
    }

    /// The cached answer for a reader of the state (recording the request), if the cached
    /// token will do.
    fn cached_read(
        &self,
        st: &SlotState,
        min_valid: Duration,
    ) -> Option<Result<TokenGrant, Failure>> {
        // One read of the packed record for both.
        let access = st.rec.access_and_refresh();
        self.requested(st, access);
        self.cached_with(st, access, min_valid)
    }

    /// [`Engine::token_of`] once the cached token would not do: decided again under the
    /// write lock, then an attempt joined or started and its outcome awaited.
    async fn token_uncached(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        min_valid: Duration,
    ) -> Result<TokenGrant, Failure> {
        let flight = {
            let mut st = slot.lock();
            // The state may have changed since it was read: decide again, under the write
            // lock, so that two callers cannot both start an attempt.
            if st.removed {
                return Err(Failure::NotFound);
            }
            if let Some(answer) = self.cached(&st, min_valid) {
                return answer;
            }
            self.join_or_start(slot, &mut st, Need::Lifetime(min_valid))
        };
        let outcome = flight.result().await;
        let st = slot.read();
        if st.removed {
            return Err(Failure::NotFound);
        }
        let now = self.now();
        match outcome {
            Ok(()) => match (st.rec.access(), &st.held) {
                (Some(a), None) if a.1 > now => Ok(grant_of(&st, a, Served::Refreshed)),
                (_, Some(_)) => Err(Failure::Internal(
                    "the refreshed token is not committed to the ledger yet".into(),
                )),
                _ => Err(Failure::Unavailable {
                    retry_after: COMMIT_RETRY,
                    message: "the provider answered without an access token; retrying".into(),
                }),
            },
            Err(Failure::Unavailable {
                retry_after,
                message,
            }) => {
                // A transient failure: a cached token that is still valid beats a 503.
                if st.held.is_none()
                    && st.rec.status() == Status::Active
                    && let Some(a) = st.rec.access()
                    && a.1 > now
                {
                    return Ok(grant_of(&st, a, Served::Cached));
                }
                Err(Failure::Unavailable {
                    retry_after,
                    message,
                })
            }
            Err(other) => Err(other),
        }
    }

    /// Records a caller's request for a token; a connection that becomes hot by it is
    /// re-planned (its access renewal ahead of expiry). Needs only a shared lock.
    /// `access`: the record's [`Packed::access_and_refresh`].
    fn requested(&self, st: &SlotState, access: (Option<(&str, Time)>, Option<Time>)) {
        let before = st.last_requested.set(self.requests_base, Instant::now());
        let (access, refreshed) = access;
        let expires = access.map(|a| a.1);
        if !plan::is_hot(expires, refreshed, before)
            && plan::is_hot(
                expires,
                refreshed,
                st.last_requested.get(self.requests_base),
            )
        {
            self.replan_locked(st);
        }
    }

    /// The answer from memory, if memory decides it: `needs_reauth`, or a cached token
    /// that satisfies `min_valid` while no change is held uncommitted. `None`: a refresh is
    /// needed.
    fn cached(&self, st: &SlotState, min_valid: Duration) -> Option<Result<TokenGrant, Failure>> {
        self.cached_with(st, st.rec.access_and_refresh(), min_valid)
    }

    /// [`Engine::cached`], given the record's [`Packed::access_and_refresh`].
    fn cached_with(
        &self,
        st: &SlotState,
        access: (Option<(&str, Time)>, Option<Time>),
        min_valid: Duration,
    ) -> Option<Result<TokenGrant, Failure>> {
        if st.rec.status() == Status::NeedsReauth {
            return Some(Err(needs_reauth_failure(&st.rec.to_record().conn)));
        }
        let (access, refreshed) = access;
        if st.held.is_none()
            && let Some(a) = access
            && satisfies_access(Some(a.1), refreshed, min_valid, self.now())
        {
            return Some(Ok(grant_of(st, a, Served::Cached)));
        }
        None
    }

    /// Rotates a connection's chain now (an operator's request). Honours a provider's
    /// `Retry-After` but not tokend's own backoff; also tries a `needs_reauth` chain again.
    pub async fn refresh_now(
        self: &Arc<Self>,
        id_or_label: &str,
    ) -> Result<ConnectionInfo, Failure> {
        let slot = self.find(id_or_label).ok_or(Failure::NotFound)?;
        loop {
            // An attempt already running for another reason may stop at tokend's own
            // backoff: wait for it to end, then make the operator's own attempt.
            let (flight, own) = {
                let mut st = slot.lock();
                if st.removed {
                    return Err(Failure::NotFound);
                }
                match &st.flight {
                    Some(f) if !f.forced() => (f.join(), false),
                    _ => (self.join_or_start(&slot, &mut st, Need::Forced), true),
                }
            };
            let result = flight.result().await;
            if own {
                result?;
                break;
            }
        }
        let st = slot.lock();
        if st.removed {
            return Err(Failure::NotFound);
        }
        Ok(self.info_of(&st))
    }

    fn notify(&self, kind: Kind, conn: &Connection, message: &str) {
        let notifier = self.notifier.read().clone();
        notifier.send(Notification {
            kind,
            connection: conn.id.clone(),
            label: conn.label.clone(),
            message: message.to_owned(),
        });
    }

    /// Re-plans a connection's next action.
    fn replan(&self, slot: &Slot) {
        let st = slot.lock();
        self.replan_locked(&st);
    }

    fn replan_locked(&self, st: &SlotState) {
        if st.removed {
            // Its plan was cancelled when it was removed (under the index lock, before its
            // handle was freed); the handle may be another slot's by now.
            return;
        }
        let input = plan::PlanInput {
            facts: st.rec.facts(),
            not_before: self.not_before(st),
            held: st.held.is_some(),
            last_requested: st.last_requested.get(self.requests_base),
        };
        match plan::next_action(&input, &self.settings(), self.now(), COMMIT_RETRY) {
            Some(planned) => self.plan.schedule(st.handle, planned.at, planned.urgency),
            None => self.plan.cancel(st.handle),
        }
    }

    /// Runs the scheduler until `shutdown` resolves: sleeps until the earliest planned
    /// action, then starts an attempt for every due chain that has none running. It never
    /// waits for permits itself: the attempts queue for them by urgency.
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
            // The handles are read under the index lock, which a removal holds while it
            // cancels a plan and frees its handle: each due handle is the slot that planned it.
            let due: Vec<(Arc<Slot>, plan::Urgency)> = {
                let index = self.index.read();
                self.plan
                    .take_due(Instant::now())
                    .into_iter()
                    .filter_map(|d| Some((index.by_handle(d.handle)?.clone(), d.urgency)))
                    .collect()
            };
            for (slot, urgency) in due {
                let mut st = slot.lock();
                // One running already re-plans the chain when it ends.
                if st.removed || st.flight.is_some() {
                    tracing::trace!(connection = %st.rec.id(), "due, but an attempt is running");
                    continue;
                }
                let _ = self.join_or_start(&slot, &mut st, Need::Scheduled(urgency));
            }
            self.permits.dispatch();
        }
    }

    /// Records that the scheduler loop is alive (for health and the watchdog).
    fn heartbeat(&self) {
        *self.last_heartbeat.lock() = Instant::now();
    }

    /// Whether the scheduler loop ran recently.
    pub fn scheduler_alive(&self) -> bool {
        self.last_heartbeat.lock().elapsed() < HEARTBEAT * 3
    }

    /// Stops starting attempts and waits, up to `grace`, for those holding a permit (the
    /// ones that may be talking to the provider) or committing what it answered
    /// (`Permit::committing`) to commit; then tries once more to commit
    /// every chain change still held. Returns whether nothing is left uncommitted.
    pub async fn drain(self: &Arc<Self>, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        self.permits.close();
        let idle = tokio::time::timeout_at(deadline, self.permits.idle())
            .await
            .is_ok();
        let held: Vec<Joined> = self
            .slots()
            .into_iter()
            .filter_map(|slot| {
                let mut st = slot.lock();
                (st.held.is_some() && !st.removed).then(|| {
                    self.join_or_start(&slot, &mut st, Need::Scheduled(plan::Urgency::Recover))
                })
            })
            .collect();
        for joined in held {
            let _ = tokio::time::timeout_at(deadline, joined.result()).await;
        }
        let left = self.commit_pending();
        if left > 0 {
            tracing::error!(
                held = left,
                "stopping with chain changes the ledger could not take; a refresh one is retried at the next start inside the reuse leeway, a new consent's chain is lost"
            );
        }
        idle && left == 0
    }

    /// Stops every task of the engine at once, wherever it is: what a crash does. For the
    /// simulation; the daemon drains instead.
    #[cfg(test)]
    pub(crate) fn abort(&self) {
        self.permits.close();
        self.tasks.abort_all();
    }
}

/// The answer handing out `access`, the record's access token and its expiry.
fn grant_of(st: &SlotState, access: (&str, Time), served: Served) -> TokenGrant {
    let (token, expires_at) = access;
    // The answer's token is the record's (`set_rec` keeps it so), made by the first answer
    // that hands it out; a copy only if it is not (never: a safety net).
    let answer = st.answer(token);
    let access_token = if answer.access.expose() == token {
        answer.access.clone()
    } else {
        Arc::new(Secret::new(token.to_owned()))
    };
    TokenGrant {
        face: answer.face.clone(),
        access_token,
        expires_at,
        served,
    }
}

/// Whether the cached access token is good enough for a caller asking for `min_valid`.
/// When the provider's lifetime is shorter than `min_valid`, a token about as fresh as a
/// new one would be is good enough: refreshing again could not do better, and every such
/// caller would otherwise cost a provider call.
fn satisfies(rec: &Record, min_valid: Duration, now: Time) -> bool {
    satisfies_access(
        rec.chain.access.as_ref().map(|a| a.expires_at),
        rec.conn.last_refresh_at,
        min_valid,
        now,
    )
}

/// [`satisfies`] for an access token's expiry and the last refresh (what the packed
/// record's [`Packed::access_and_refresh`] reads).
fn satisfies_access(
    access_expires_at: Option<Time>,
    last_refresh_at: Option<Time>,
    min_valid: Duration,
    now: Time,
) -> bool {
    let Some(expires_at) = access_expires_at else {
        return false;
    };
    let remaining = (expires_at - now).to_std().unwrap_or(Duration::ZERO);
    let lifetime = last_refresh_at
        .and_then(|r| (expires_at - r).to_std().ok())
        .unwrap_or(ASSUMED_ACCESS_LIFETIME);
    let fresh_enough =
        lifetime.saturating_sub((lifetime / FRESH_SLACK_DIVISOR).min(FRESH_SLACK_MAX));
    !remaining.is_zero() && remaining >= min_valid.min(fresh_enough)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A slot with its `Arc`'s two counts stays within a 128-byte malloc chunk (120 bytes
    /// of request plus glibc's 8-byte header): at 100,000 connections, each 16 bytes more
    /// is 1.6 MB of the RSS goal.
    #[test]
    fn a_slot_fits_its_chunk() {
        assert!(
            std::mem::size_of::<Slot>() + 16 <= 120,
            "Slot is {} bytes",
            std::mem::size_of::<Slot>()
        );
    }

    /// `SecondsSince` rounds up to whole seconds and keeps "none".
    #[test]
    fn seconds_since_rounds_up() {
        let base = Instant::now();
        assert_eq!(SecondsSince::of(base, None).get(base), None);
        assert_eq!(SecondsSince::of(base, Some(base)).get(base), Some(base));
        let at = base + Duration::from_millis(1_500);
        assert_eq!(
            SecondsSince::of(base, Some(at)).get(base),
            Some(base + Duration::from_secs(2))
        );
        let whole = base + Duration::from_secs(7);
        assert_eq!(SecondsSince::of(base, Some(whole)).get(base), Some(whole));
    }
    use crate::ledger::Ledger;
    use crate::model::AccessToken;
    use crate::model::Site;
    use crate::provider::{Atlassian, ProviderError};

    async fn engine_with(n: usize, max_concurrent: usize) -> (Arc<Engine>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config::parse(
            &format!("[refresh]\nrotate_after = \"2s\"\nmax_concurrent = {max_concurrent}\n"),
            std::path::Path::new("/etc/tokend/daemon.toml"),
            &|_| None,
            &|_| Err(std::io::Error::other("none")),
        )
        .unwrap();
        let ledger = Ledger::open(dir.path(), &Default::default()).unwrap();
        let old = chrono::Utc::now() - chrono::Duration::hours(1);
        for i in 0..n {
            let id = format!("c{i:012x}");
            let rec = crate::model::sample_record(&id, &format!("l{i}"), &format!("rt-{i}"), old);
            ledger.insert(rec, vec![]).await.unwrap();
        }
        let provider =
            Atlassian::new(config.providers.atlassian.clone(), Duration::from_secs(1)).unwrap();
        let engine = Engine::load(
            Arc::new(ledger),
            Arc::new(provider),
            Arc::new(SystemClock),
            config.refresh,
            crate::notify::Notifier::disabled(),
            Arc::new(Metrics::new(true)),
        )
        .await
        .unwrap();
        (engine, dir)
    }

    /// A cached token is served under the shared lock with the connection's face as the
    /// record says it now (shared between answers, replaced when a field it shows
    /// changes); a refusing check hands out nothing and records no request; a
    /// `needs_reauth` or removed connection serves nothing from cache.
    #[tokio::test]
    async fn a_cached_token_shows_the_connection_as_it_is_now() {
        let (engine, _dir) = engine_with(1, 1).await;
        let id = "c000000000000";
        let slot = engine.find(id).unwrap();
        let now = chrono::Utc::now();
        {
            let mut st = slot.lock();
            st.update(|rec| {
                rec.conn.last_refresh_at = Some(now);
                rec.chain.access = Some(AccessToken {
                    token: Secret::new("at-cached"),
                    expires_at: now + chrono::Duration::hours(1),
                });
            });
        }
        let min_valid = Duration::from_secs(60);
        let first = engine.token("l0", min_valid).await.unwrap();
        assert_eq!(first.served, Served::Cached);
        assert_eq!(first.access_token.expose(), "at-cached");
        assert_eq!(first.face.id, id);
        assert_eq!(first.face.scopes, slot.read().rec.to_record().conn.scopes);
        assert!(first.face.sites.is_empty());
        let again = engine.token(id, min_valid).await.unwrap();
        assert!(
            Arc::ptr_eq(&first.face, &again.face),
            "answers share the face"
        );
        assert!(
            Arc::ptr_eq(&first.access_token, &again.access_token),
            "answers share the token"
        );
        assert!(
            slot.read()
                .last_requested
                .get(engine.requests_base)
                .is_some()
        );

        let site = Site {
            cloud_id: "1111".into(),
            url: "https://acme.atlassian.net".into(),
            name: "Acme".into(),
            scopes: vec!["read:page:confluence".into()].into(),
            last_seen_at: now,
        };
        slot.lock()
            .update(|rec| rec.conn.sites = vec![site.clone()]);
        let third = engine.token(id, min_valid).await.unwrap();
        assert!(!Arc::ptr_eq(&first.face, &third.face), "a stale face");
        assert_eq!(third.face.sites, [site]);
        assert!(third.face.rendered.get().is_none());

        let before = slot.read().last_requested.get(engine.requests_base);
        let refused = engine
            .token_for(id, min_valid, |i, l| {
                assert_eq!((i, l), (id, "l0"));
                false
            })
            .await;
        assert_eq!(
            refused.unwrap_err(),
            NotHanded::Refused(Identity {
                id: id.into(),
                label: "l0".into()
            })
        );
        assert_eq!(slot.read().last_requested.get(engine.requests_base), before);
        let allowed = engine.token_for("l0", min_valid, |_, _| true).await;
        assert_eq!(allowed.unwrap().face.id, id);

        let rec = slot.read().rec.to_record();
        let held = Held {
            rec,
            expect_version: 0,
            insert: false,
            presented: None,
            refused: false,
        };
        engine.set_held(&mut slot.lock(), Some(held));
        // A change held uncommitted is never served from cache: the caller's attempt commits
        // it first, then serves what was committed.
        let committed = engine.token(id, min_valid).await.unwrap();
        assert_eq!(committed.served, Served::Refreshed);
        assert!(slot.read().held.is_none());
        assert_eq!(engine.commit_pending(), 0);

        slot.lock()
            .update(|rec| rec.conn.status = Status::NeedsReauth);
        assert!(matches!(
            engine.token(id, min_valid).await,
            Err(Failure::NeedsReauth(_))
        ));
        slot.lock().update(|rec| rec.conn.status = Status::Active);
        slot.lock().removed = true;
        assert_eq!(
            engine.token(id, min_valid).await.unwrap_err(),
            Failure::NotFound
        );
        assert_eq!(
            engine
                .token_for(id, min_valid, |_, _| true)
                .await
                .unwrap_err(),
            NotHanded::Failed(Failure::NotFound)
        );
    }

    /// A provider whose refresh panics, after letting the test lock the chain's slot from
    /// another thread, so that the attempt's clean-up runs while the slot is held.
    struct PanicsWhileLocked {
        about_to_panic: std::sync::mpsc::Sender<()>,
        locked: parking_lot::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl TokenEndpoint for PanicsWhileLocked {
        fn refresh<'a>(
            &'a self,
            _: &'a Secret,
        ) -> futures_util::future::BoxFuture<'a, Result<crate::provider::Grant, ProviderError>>
        {
            Box::pin(async move {
                self.about_to_panic.send(()).unwrap();
                self.locked.lock().recv().unwrap();
                panic!("the provider client panicked (test)");
            })
        }
        fn exchange_code<'a>(
            &'a self,
            _: &'a Secret,
        ) -> futures_util::future::BoxFuture<'a, Result<crate::provider::Grant, ProviderError>>
        {
            unreachable!("no consent in this test")
        }
        fn accessible_resources<'a>(
            &'a self,
            _: &'a Secret,
            _: Time,
        ) -> futures_util::future::BoxFuture<'a, Result<Vec<Site>, ProviderError>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn me<'a>(
            &'a self,
            _: &'a Secret,
        ) -> futures_util::future::BoxFuture<
            'a,
            Result<Option<crate::provider::Account>, ProviderError>,
        > {
            Box::pin(async { Ok(None) })
        }
        fn not_configured(&self) -> Option<String> {
            None
        }
        fn client_id(&self) -> &str {
            "test-client"
        }
        fn scopes(&self) -> Vec<String> {
            vec!["offline_access".into()]
        }
        fn authorize_url(&self, state: &str) -> (String, String) {
            (
                format!("https://auth.invalid/?state={state}"),
                String::new(),
            )
        }
        fn api_base_url(&self, product: &str, cloud_id: &str) -> String {
            format!("https://api.invalid/{product}/{cloud_id}")
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_attempt_ends_its_flight_even_while_another_thread_holds_the_slot() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), &Default::default()).unwrap();
        let old = chrono::Utc::now() - chrono::Duration::hours(1);
        let rec = crate::model::sample_record("c000000000000", "l0", "rt-0", old);
        ledger.insert(rec, vec![]).await.unwrap();
        let (about_tx, about_rx) = std::sync::mpsc::channel();
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let provider = PanicsWhileLocked {
            about_to_panic: about_tx,
            locked: parking_lot::Mutex::new(locked_rx),
        };
        let config = crate::config::Config::parse(
            "",
            std::path::Path::new("/etc/tokend/daemon.toml"),
            &|_| None,
            &|_| Err(std::io::Error::other("none")),
        )
        .unwrap();
        let engine = Engine::load(
            Arc::new(ledger),
            Arc::new(provider),
            Arc::new(SystemClock),
            config.refresh,
            crate::notify::Notifier::disabled(),
            Arc::new(Metrics::new(true)),
        )
        .await
        .unwrap();
        let slot = engine.find("c000000000000").unwrap();
        // A second thread takes the slot's lock just before the provider panics, and holds it
        // while the attempt's clean-up runs (as a scrape or a token request may).
        let holder = std::thread::spawn(move || {
            about_rx.recv().unwrap();
            let st = slot.lock();
            locked_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            let had_flight = st.flight.is_some();
            drop(st);
            had_flight
        });
        let first = engine.refresh_now("c000000000000").await;
        assert!(
            matches!(first, Err(Failure::Internal(_))),
            "a panicked attempt answers internal: {first:?}"
        );
        assert!(
            holder.join().unwrap(),
            "the flight ran while the slot was held"
        );
        let slot = engine.find("c000000000000").unwrap();
        let st = slot.lock();
        assert!(
            st.flight.is_none(),
            "the panicked attempt left a dead flight"
        );
        assert!(
            st.stale,
            "memory may be behind the store: reload before the next attempt"
        );
    }

    fn site(cloud_id: &str, url: &str) -> Site {
        Site {
            cloud_id: cloud_id.into(),
            url: url.into(),
            name: "site".into(),
            scopes: vec!["read:page:confluence".into()].into(),
            last_seen_at: chrono::Utc::now(),
        }
    }

    /// The site index answers what a scan over every connection would, after each kind of
    /// change: install, site change, status change both ways, removal.
    #[tokio::test]
    async fn the_site_index_follows_installs_sites_statuses_and_removals() {
        let (engine, _dir) = engine_with(2, 1).await;
        let check = |what: &str| {
            engine
                .site_index_matches_recount()
                .unwrap_or_else(|m| panic!("after {what}: {m}"));
        };
        check("load");
        assert!(engine.connections_for_site("acme.atlassian.net").is_empty());

        let now = chrono::Utc::now();
        let mut rec = crate::model::sample_record("c-new", "new", "rt-new", now);
        rec.conn.sites = vec![
            site("Cloud-A", "https://Acme.atlassian.net"),
            site("cloud-b", "https://beta.atlassian.net/"),
        ];
        engine.install(rec, None);
        check("install");
        for query in [
            "acme.atlassian.net",
            "ACME.atlassian.net",
            "https://acme.atlassian.net/",
            "cloud-a",
            " CLOUD-A ",
        ] {
            assert_eq!(engine.connections_for_site(query), ["c-new"], "{query}");
        }

        let slot = engine.find("c-new").unwrap();
        engine.set_sites(
            &mut slot.lock(),
            vec![site("cloud-b", "https://beta.atlassian.net")],
        );
        check("a site change");
        assert!(engine.connections_for_site("acme.atlassian.net").is_empty());
        assert!(engine.connections_for_site("cloud-a").is_empty());
        assert_eq!(engine.connections_for_site("beta.atlassian.net"), ["c-new"]);

        // A second connection reaching the same site: both are found, sorted.
        let other = engine.find("c000000000000").unwrap();
        engine.set_sites(
            &mut other.lock(),
            vec![site("cloud-b", "https://beta.atlassian.net")],
        );
        check("a second connection's sites");
        assert_eq!(
            engine.connections_for_site("cloud-b"),
            ["c-new", "c000000000000"]
        );

        let mut rejected = slot.lock().rec.to_record();
        rejected.conn.status = Status::NeedsReauth;
        engine.adopt(&mut slot.lock(), &rejected);
        check("a status change to needs_reauth");
        assert_eq!(engine.connections_for_site("cloud-b"), ["c000000000000"]);
        // Sites change while not active: filed again, with them, when active again.
        engine.set_sites(
            &mut slot.lock(),
            vec![site("cloud-c", "https://gamma.atlassian.net")],
        );
        check("a site change while needs_reauth");
        assert!(engine.connections_for_site("cloud-c").is_empty());
        let mut revived = slot.lock().rec.to_record();
        revived.conn.status = Status::Active;
        engine.adopt(&mut slot.lock(), &revived);
        check("a status change back to active");
        assert_eq!(
            engine.connections_for_site("gamma.atlassian.net"),
            ["c-new"]
        );

        engine.uninstall("c-new");
        check("a removal");
        assert!(engine.connections_for_site("cloud-c").is_empty());
        engine.uninstall("c000000000000");
        check("the last removal");
        assert_eq!(
            *engine.sites.write(),
            SiteIndex::default(),
            "no key left behind"
        );
    }

    /// A key is a hash: a connection filed under a key its sites do not have (what a hash
    /// collision looks like) is a candidate that the lookup's check turns away, never an
    /// answer; a handle freed by a removal and given to a new slot leads to that slot.
    #[tokio::test]
    async fn a_site_lookup_checks_its_candidates_against_their_sites() {
        let (engine, _dir) = engine_with(2, 1).await;
        let slot = engine.find("c000000000000").unwrap();
        let handle = slot.read().handle;
        let collided = SiteKeys {
            cloud_ids: vec![key_hash("cloud-x")],
            hosts: vec![key_hash("x.atlassian.net")],
        };
        engine.sites.write().file(handle, &collided);
        assert_eq!(
            engine.sites.read().candidates("cloud-x", "x.atlassian.net"),
            [handle]
        );
        assert!(engine.connections_for_site("cloud-x").is_empty());
        assert!(engine.connections_for_site("x.atlassian.net").is_empty());
        engine.sites.write().unfile(handle, &collided);
        engine.site_index_matches_recount().unwrap();

        engine.uninstall("c000000000000");
        let now = chrono::Utc::now();
        let mut rec = crate::model::sample_record("c-next", "next", "rt-next", now);
        rec.conn.sites = vec![site("cloud-n", "https://next.atlassian.net")];
        let next = engine.install(rec, None);
        assert_eq!(next.read().handle, handle, "a freed handle is given again");
        engine.site_index_matches_recount().unwrap();
        assert_eq!(
            engine.connections_for_site("next.atlassian.net"),
            ["c-next"]
        );
    }

    /// Pages of the listing walk every connection once, in label order, across installs,
    /// a relabel (a held insert committed under a generated label) and removals; lookups by
    /// id and label follow; an id installed twice leaves one connection, the new one.
    #[tokio::test]
    async fn listings_page_in_label_order_across_relabels_and_removals() {
        let (engine, _dir) = engine_with(5, 1).await;
        let all = |engine: &Engine| {
            let (mut labels, mut after) = (Vec::new(), None::<String>);
            loop {
                let page = engine.list_page(after.as_deref(), Some(2));
                labels.extend(page.items.iter().map(|i| i.conn.label.clone()));
                match page.next {
                    Some(next) => after = Some(next),
                    None => return labels,
                }
            }
        };
        engine.index_matches_recount().unwrap();
        assert_eq!(all(&engine), ["l0", "l1", "l2", "l3", "l4"]);

        let now = chrono::Utc::now();
        for (id, label) in [("c-b", "l2b"), ("c-a", "a0")] {
            engine.install(crate::model::sample_record(id, label, id, now), None);
        }
        engine.index_matches_recount().unwrap();
        assert_eq!(all(&engine), ["a0", "l0", "l1", "l2", "l2b", "l3", "l4"]);

        let slot = engine.find("l1").unwrap();
        engine.relabel(&slot, "z-generated".into());
        engine.index_matches_recount().unwrap();
        assert_eq!(
            all(&engine),
            ["a0", "l0", "l2", "l2b", "l3", "l4", "z-generated"]
        );
        assert!(engine.find("l1").is_none(), "the old label names nobody");
        assert!(Arc::ptr_eq(&engine.find("z-generated").unwrap(), &slot));
        assert_eq!(
            engine.get("c000000000001").unwrap().conn.label,
            "z-generated"
        );

        engine.uninstall("c000000000003");
        engine.uninstall("c-a");
        engine.index_matches_recount().unwrap();
        assert_eq!(all(&engine), ["l0", "l2", "l2b", "l4", "z-generated"]);
        let page = engine.list_page(Some("l2"), Some(2));
        let labels: Vec<_> = page.items.iter().map(|i| i.conn.label.as_str()).collect();
        assert_eq!(labels, ["l2b", "l4"]);
        assert_eq!(page.next.as_deref(), Some("l4"));
        assert!(engine.find("l3").is_none());

        let before = engine.status_counts();
        let again = crate::model::sample_record("c-b", "l2c", "c-b", now);
        let next = engine.install(again, None);
        engine.index_matches_recount().unwrap();
        assert_eq!(engine.status_counts(), before, "one connection, not two");
        assert!(Arc::ptr_eq(&engine.find("c-b").unwrap(), &next));
        assert!(
            engine.find("l2b").is_none(),
            "the replaced slot's label is free"
        );
        assert_eq!(all(&engine), ["l0", "l2", "l2c", "l4", "z-generated"]);
        engine.site_index_matches_recount().unwrap();
    }

    /// A stream of `?site=` misses costs one look over the connections per
    /// `SITE_SWEEP_GAP`, not one per miss: the access check each look asks of every
    /// connection is asked once for the first miss, not at all for the next ones within the
    /// gap, and again after it.
    #[tokio::test(start_paused = true)]
    async fn site_misses_sweep_the_connections_at_most_once_per_gap() {
        let (engine, _dir) = engine_with(3, 1).await;
        let asked = AtomicUsize::new(0);
        let may_read = |_: &str, _: &str| {
            asked.fetch_add(1, Ordering::Relaxed);
            true
        };
        let wait = Duration::from_secs(1);
        engine.site_miss(1000, may_read, wait).await;
        assert_eq!(
            asked.load(Ordering::Relaxed),
            3,
            "the first miss looks at each"
        );
        for _ in 0..10 {
            engine.site_miss(1000, may_read, wait).await;
        }
        assert_eq!(
            asked.load(Ordering::Relaxed),
            3,
            "misses within the gap do not"
        );
        tokio::time::advance(sites::SITE_SWEEP_GAP).await;
        engine.site_miss(1000, may_read, wait).await;
        assert_eq!(
            asked.load(Ordering::Relaxed),
            6,
            "one after the gap looks again"
        );
        // Another uid's misses are its own: uid 1000's sweep just ran, uid 1001's has not.
        engine.site_miss(1001, may_read, wait).await;
        assert_eq!(
            asked.load(Ordering::Relaxed),
            9,
            "another uid's first miss looks at each"
        );
    }

    #[tokio::test]
    async fn the_scheduler_beats_while_every_permit_is_taken() {
        let (engine, _dir) = engine_with(3, 1).await;
        // Every permit is taken (a long catch-up): the loop never waits for permits itself.
        let held = engine
            .permits
            .acquire(engine.permits.ticket(), (plan::Urgency::Recover, 0))
            .await
            .unwrap();
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
    async fn an_attempt_that_cannot_start_is_not_retried_in_a_tight_loop() {
        // The provider is not configured: every attempt fails at once, without a network
        // call. The chain must be planned after a backoff, not due again at once.
        let (engine, _dir) = engine_with(1, 1).await;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(engine.clone().run_scheduler(async move {
            let _ = rx.await;
        }));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let handle = engine.find("c000000000000").unwrap().read().handle;
        let at = engine.plan.next_of(handle).expect("planned").at;
        assert!(
            at > Instant::now() + Duration::from_secs(10),
            "an attempt that cannot start is planned again at once: the scheduler spins"
        );
        let _ = tx.send(());
        task.await.unwrap();
    }
}
