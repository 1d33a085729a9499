//! Deterministic simulation of the engine (in the spirit of FoundationDB's and TigerBeetle's).
//!
//! The real engine runs in-process on a current-thread runtime with paused time, against an
//! in-memory provider as strict as Atlassian (rotation, the reuse leeway, reuse outside it
//! revokes the family, inactivity expiry) and an in-memory store that keeps only what was
//! committed. One seeded generator drives everything: which caller asks when and when it
//! hangs up, provider faults (delays, answers lost after the provider rotated, 5xx before and
//! after rotating, garbled and refresh-token-only 2xx, 429 with `Retry-After`, answers
//! without a refresh token), store failures, operator refreshes, the site job, and
//! crash-restarts (every engine task stops where it is; a new engine loads the store).
//!
//! After every step it checks: no chain lost, at most one provider call in flight per chain,
//! no reuse outside the leeway, no access token handed out before its refresh token was
//! committed, no `needs_reauth` without a definite rejection, every active chain planned or
//! in flight, and that no commit ever puts an older token of a chain over a newer one. A
//! failure prints its seed; `TOKEND_SIM_SEED=<seed>` replays exactly that one,
//! `TOKEND_SIM_SCHEDULES=<n>` runs more schedules than CI does.
//!
//! **Several daemons** ([`multi_schedule`]): two or three engines share one store that
//! implements claims with fencing on a lease clock (paused tokio time), like the PostgreSQL
//! ledger, with a daemon paused past its lease (before or right after reading an answer),
//! killed mid-attempt and restarted, and the store unavailable; the same checks hold across
//! all of them (the provider counts calls in flight per chain whichever daemon makes them).
//! `TOKEND_SIM_MULTI_SCHEDULES=<n>` runs more of them.

use super::Engine;
use super::store::{Store, StoreError, TokenEndpoint, TokioClock};
use crate::ledger::Fence;
use crate::model::{Event, Record, Site, Status, Time};
use crate::provider::{Account, Grant, ProviderError, REUSE_LEEWAY, TransientKind};
use crate::secret::Secret;
use chrono::TimeZone;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// Schedules CI runs (`TOKEND_SIM_SCHEDULES` overrides).
const CI_SCHEDULES: u64 = 2000;
/// Steps of one schedule.
const STEPS: usize = 120;
/// Chains in one schedule.
const CHAINS: usize = 3;
/// The provider's inactivity expiry in the simulation. Rotation is hourly: much longer than
/// the reuse leeway, as in production (7 days), so that a retry that is not planned inside
/// the leeway shows as a lost chain.
const INACTIVITY: Duration = Duration::from_secs(6 * 3600);
/// At most this many provider faults wait for the next calls: a provider that fails every
/// call for the whole leeway after rotating loses the chain by physics, whatever the daemon
/// does, so faults are not allowed to pile up while nothing calls.
const MAX_PENDING_FAULTS: usize = 2;
/// Access-token lifetime the simulated provider grants.
const ACCESS_LIFETIME: Duration = Duration::from_secs(300);

/// A fault armed for the next token call.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The connection fails: nothing reaches the provider.
    Connect,
    /// 429 with `Retry-After`, not processed.
    RateLimited(u64),
    /// 503 before processing.
    ServerErrorBefore,
    /// The provider rotates, then the answer is lost (a timeout).
    LostAfterRotate,
    /// The provider rotates, then answers 500.
    ServerErrorAfterRotate,
    /// The provider rotates, then answers a garbled 200.
    GarbledAfterRotate,
    /// The provider rotates, then answers 200 with only the new refresh token.
    PartialAfterRotate,
    /// The provider answers without a new refresh token (no rotation).
    NoRotation,
    /// The request takes this long (ms) before it is processed.
    Slow(u64),
}

struct Family {
    current: String,
    /// The token `current` replaced (or, after leeway reuses, the first one that stopped
    /// being current) and when it stopped: reusable inside the leeway.
    parent: Option<(String, Time)>,
    used_at: Time,
    alive: bool,
    /// Generation of every token of the family (0 = the first).
    generation: HashMap<String, u64>,
    in_flight: u32,
    /// Definite rejections sent for this chain.
    rejections: u32,
    /// The store held this chain at some point: from then on it must keep it.
    seen: bool,
    /// An operator asked to remove it: the store may drop it.
    removal: bool,
    /// The user revoked consent: the chain is dead legitimately.
    revoked: bool,
}

/// A daemon's claim on a chain's refresh in the shared store: the PostgreSQL ledger's
/// `claims` row, with the lease clock being tokio's (paused) time.
struct SimClaim {
    holder: String,
    version: u64,
    expires: tokio::time::Instant,
}

struct World {
    /// The claims of the shared store (multi-daemon schedules).
    claims: HashMap<String, SimClaim>,
    /// Daemons paused (SIGSTOP) until an instant: their store operations and provider
    /// answers wait for it.
    paused: HashMap<usize, tokio::time::Instant>,
    /// Daemons to pause for this long once they have read the provider's answer to their
    /// next refresh (stopped mid-refresh, holding the claim, the answer not committed).
    pause_at_answer: HashMap<usize, Duration>,
    rng: StdRng,
    clock: Arc<TokioClock>,
    families: HashMap<String, Family>,
    owner: HashMap<String, String>,
    /// Access token -> (chain, generation of the refresh token issued with it).
    access: HashMap<String, (String, u64)>,
    faults: VecDeque<Fault>,
    store: HashMap<String, Record>,
    store_failures: u32,
    /// Store writes that land but report a failure (an fsync error after the write).
    store_lies: u32,
    /// Chain writes and inserts the store refuses as data (PostgreSQL's SQLSTATE 22):
    /// nothing written, `StoreError::Refused`.
    store_refusals: u32,
    broken: Vec<String>,
    minted: u64,
    calls: u64,
    /// The chain of every token call, in order.
    order: Vec<String>,
    /// Consent codes not yet exchanged, and the family each starts.
    codes: HashMap<String, String>,
}

impl World {
    fn new(seed: u64, clock: Arc<TokioClock>) -> World {
        World {
            claims: HashMap::new(),
            paused: HashMap::new(),
            pause_at_answer: HashMap::new(),
            rng: StdRng::seed_from_u64(seed),
            clock,
            families: HashMap::new(),
            owner: HashMap::new(),
            access: HashMap::new(),
            faults: VecDeque::new(),
            store: HashMap::new(),
            store_failures: 0,
            store_lies: 0,
            store_refusals: 0,
            broken: Vec::new(),
            minted: 0,
            calls: 0,
            order: Vec::new(),
            codes: HashMap::new(),
        }
    }

    /// Adds a chain whose token was last used at `used_at`: in the provider and committed.
    fn add_chain(&mut self, i: usize, used_at: Time) -> String {
        let id = format!("c{i:012x}");
        let rt = self.new_family(&id, used_at);
        let mut rec = crate::model::sample_record(&id, &format!("l{i}"), &rt, used_at);
        rec.conn.account_id = None;
        self.store.insert(id.clone(), rec);
        id
    }

    /// A new family at the provider (a consent), keyed `family`; returns its first token.
    fn new_family(&mut self, family: &str, used_at: Time) -> String {
        let rt = self.mint("rt");
        let id = family.to_owned();
        self.owner.insert(rt.clone(), id.clone());
        self.families.insert(
            id.clone(),
            Family {
                current: rt.clone(),
                parent: None,
                used_at,
                alive: true,
                generation: HashMap::from([(rt.clone(), 0)]),
                in_flight: 0,
                rejections: 0,
                seen: false,
                removal: false,
                revoked: false,
            },
        );
        rt
    }

    /// The family a stored record's refresh token belongs to.
    fn family_of(&self, rec: &Record) -> Option<String> {
        self.owner.get(rec.chain.refresh_token.expose()).cloned()
    }

    /// The stored record holding a family's chain.
    fn record_of(&self, family: &str) -> Option<&Record> {
        self.store
            .values()
            .find(|r| self.family_of(r).as_deref() == Some(family))
    }

    fn now(&self) -> Time {
        use super::store::Clock;
        self.clock.now()
    }

    fn mint(&mut self, prefix: &str) -> String {
        self.minted += 1;
        format!("{prefix}-{}-{}", self.minted, self.rng.random::<u32>())
    }

    fn broke(&mut self, what: String) {
        self.broken.push(what);
    }

    /// A store operation fails when a failure is armed.
    fn store_fails(&mut self) -> bool {
        if self.store_failures > 0 {
            self.store_failures -= 1;
            return true;
        }
        false
    }
}

type Shared = Arc<Mutex<World>>;

fn lock(w: &Shared) -> parking_lot::MutexGuard<'_, World> {
    w.lock()
}

/// Waits while daemon `node` is paused: a stopped process sends and reads nothing.
async fn wait_unpaused(world: &Shared, node: usize) {
    loop {
        let until = lock(world).paused.get(&node).copied();
        match until {
            Some(u) if u > tokio::time::Instant::now() => tokio::time::sleep_until(u).await,
            _ => return,
        }
    }
}

/// Counts a provider call in flight for a chain while it lives.
struct InFlight {
    world: Shared,
    chain: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(f) = lock(&self.world).families.get_mut(&self.chain) {
            f.in_flight -= 1;
        }
    }
}

/// The provider as one daemon reaches it; `Some(node)` in a multi-daemon schedule (its
/// answers wait while the daemon is paused).
struct SimProvider(Shared, Option<usize>);

fn transient(kind: TransientKind, retry_after: Option<Duration>) -> ProviderError {
    ProviderError::Transient {
        kind,
        retry_after,
        message: format!("simulated {kind:?}"),
    }
}

fn rejected() -> ProviderError {
    ProviderError::Rejected {
        code: "invalid_grant".into(),
        description: "simulated rejection".into(),
    }
}

impl SimProvider {
    async fn refresh_inner(&self, rt: String) -> Result<Grant, ProviderError> {
        let (fault, chain) = {
            let mut w = lock(&self.0);
            w.calls += 1;
            let fault = w.faults.pop_front();
            let chain = w.owner.get(&rt).cloned();
            if let Some(c) = &chain {
                w.order.push(c.clone());
            }
            (fault, chain)
        };
        let Some(chain) = chain else {
            return Err(rejected());
        };
        {
            let mut w = lock(&self.0);
            let f = w.families.get_mut(&chain).expect("family");
            f.in_flight += 1;
            if f.in_flight > 1 {
                w.broke(format!("{chain}: two provider calls in flight at once"));
            }
        }
        let _in_flight = InFlight {
            world: self.0.clone(),
            chain: chain.clone(),
        };
        let pause = lock(&self.0).rng.random_range(0..40);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        match fault {
            Some(Fault::Connect) => return Err(transient(TransientKind::Connect, None)),
            Some(Fault::RateLimited(s)) => {
                return Err(transient(
                    TransientKind::RateLimited,
                    Some(Duration::from_secs(s)),
                ));
            }
            Some(Fault::ServerErrorBefore) => {
                return Err(transient(TransientKind::ServerError, None));
            }
            Some(Fault::Slow(ms)) => tokio::time::sleep(Duration::from_millis(ms)).await,
            _ => {}
        }
        // Process it, as strictly as Atlassian.
        let (new_rt, access) = {
            let mut w = lock(&self.0);
            let now = w.now();
            if std::env::var_os("TOKEND_SIM_TRACE").is_some() {
                let f = &w.families[&chain];
                tracing::info!(
                    "SIM provider: {chain} presents generation {:?} (current {}), fault {fault:?}",
                    f.generation.get(&rt),
                    f.generation.len() - 1
                );
            }
            let rotate = !matches!(fault, Some(Fault::NoRotation));
            let new_rt = w.mint("rt");
            let access = w.mint("at");
            let f = w.families.get_mut(&chain).expect("family");
            if !f.alive {
                f.rejections += 1;
                return Err(rejected());
            }
            if f.current == rt {
                if (now - f.used_at).to_std().unwrap_or_default() > INACTIVITY {
                    f.rejections += 1;
                    let msg = format!("{chain}: the refresh token expired unused");
                    w.broke(msg);
                    return Err(rejected());
                }
                f.used_at = now;
                if rotate {
                    f.parent = Some((rt.clone(), now));
                }
            } else if f.parent.as_ref().is_some_and(|(p, at)| {
                *p == rt && (now - *at).to_std().unwrap_or_default() < REUSE_LEEWAY
            }) {
                // A reuse inside the leeway: a fresh pair, the parent stays the parent.
                f.used_at = now;
            } else {
                f.alive = false;
                f.rejections += 1;
                let msg = format!("{chain}: reuse of a rotated token outside the leeway");
                w.broke(msg);
                return Err(rejected());
            }
            let rotate = rotate || f.current != rt;
            let next = if rotate { new_rt } else { rt.clone() };
            if rotate {
                let g = f.generation.len() as u64;
                f.generation.insert(next.clone(), g);
                f.current = next.clone();
            }
            let generation = f.generation[&next];
            w.owner.insert(next.clone(), chain.clone());
            w.access.insert(access.clone(), (chain.clone(), generation));
            (rotate.then_some(next), access)
        };
        match fault {
            Some(Fault::LostAfterRotate) => {
                let wait = lock(&self.0).rng.random_range(0..3000);
                tokio::time::sleep(Duration::from_millis(wait)).await;
                Err(transient(TransientKind::Timeout, None))
            }
            Some(Fault::ServerErrorAfterRotate) => Err(transient(TransientKind::ServerError, None)),
            Some(Fault::GarbledAfterRotate) => Err(transient(TransientKind::Malformed, None)),
            Some(Fault::PartialAfterRotate) if new_rt.is_some() => Err(ProviderError::Partial {
                refresh_token: Secret::new(new_rt.expect("checked")),
                message: "simulated refresh-token-only answer".into(),
            }),
            _ => Ok(Grant {
                access_token: Secret::new(access),
                refresh_token: new_rt.map(Secret::new),
                expires_in: Some(ACCESS_LIFETIME),
                scopes: None,
            }),
        }
    }
}

impl TokenEndpoint for SimProvider {
    fn refresh<'a>(
        &'a self,
        refresh_token: &'a Secret,
    ) -> BoxFuture<'a, Result<Grant, ProviderError>> {
        Box::pin(async move {
            let result = self.refresh_inner(refresh_token.expose().to_owned()).await;
            if let Some(node) = self.1 {
                // Processed by the provider; a paused daemon reads the answer only later (and
                // its own timeout may strike first). One armed to stop right after reading
                // its answer stops in its next store operation: the commit.
                {
                    let mut w = lock(&self.0);
                    if let Some(pause) = w.pause_at_answer.remove(&node) {
                        w.paused.insert(node, tokio::time::Instant::now() + pause);
                        return result;
                    }
                }
                wait_unpaused(&self.0, node).await;
            }
            result
        })
    }
    fn exchange_code<'a>(
        &'a self,
        code: &'a Secret,
    ) -> BoxFuture<'a, Result<Grant, ProviderError>> {
        Box::pin(async move {
            let pause = lock(&self.0).rng.random_range(0..40);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            let mut w = lock(&self.0);
            let fault = w.faults.pop_front();
            if let Some(Fault::Connect | Fault::RateLimited(_) | Fault::ServerErrorBefore) = fault {
                return Err(transient(TransientKind::ServerError, None));
            }
            // A code is single-use: from here it is spent, whatever the answer.
            let Some(family) = w.codes.remove(code.expose()) else {
                return Err(rejected());
            };
            let rt = w.families[&family].current.clone();
            let access = w.mint("at");
            w.access.insert(access.clone(), (family, 0));
            match fault {
                Some(
                    Fault::LostAfterRotate
                    | Fault::ServerErrorAfterRotate
                    | Fault::GarbledAfterRotate,
                ) => Err(transient(TransientKind::Timeout, None)),
                Some(Fault::PartialAfterRotate) => Err(ProviderError::Partial {
                    refresh_token: Secret::new(rt),
                    message: "simulated refresh-token-only answer".into(),
                }),
                _ => Ok(Grant {
                    access_token: Secret::new(access),
                    refresh_token: Some(Secret::new(rt)),
                    expires_in: Some(ACCESS_LIFETIME),
                    scopes: None,
                }),
            }
        })
    }

    fn accessible_resources<'a>(
        &'a self,
        _: &'a Secret,
        now: Time,
    ) -> BoxFuture<'a, Result<Vec<Site>, ProviderError>> {
        Box::pin(async move {
            let (fail, reach) = {
                let mut w = lock(&self.0);
                (w.rng.random_bool(0.2), w.rng.random_range(1..4u32))
            };
            if fail {
                return Err(transient(TransientKind::ServerError, None));
            }
            // Sites come and go (one, the other or both), so that the site index sees
            // changes as well as first resolutions.
            let site = |cloud_id: &str, name: &str| Site {
                cloud_id: cloud_id.into(),
                url: format!("https://{name}.atlassian.net").into(),
                name: name.into(),
                scopes: vec!["read:page:confluence".into()].into(),
                last_seen_at: now,
            };
            let mut sites = Vec::new();
            if reach & 1 != 0 {
                sites.push(site("cloud-1", "acme"));
            }
            if reach & 2 != 0 {
                sites.push(site("Cloud-2", "Beta"));
            }
            Ok(sites)
        })
    }
    fn me<'a>(&'a self, _: &'a Secret) -> BoxFuture<'a, Result<Option<Account>, ProviderError>> {
        Box::pin(async { Ok(None) })
    }
    fn not_configured(&self) -> Option<String> {
        None
    }
    fn client_id(&self) -> &str {
        "client"
    }
    fn scopes(&self) -> Vec<String> {
        vec!["offline_access".into()]
    }
    fn authorize_url(&self, state: &str) -> (String, String) {
        (
            format!("https://sim/authorize?state={state}"),
            "http://localhost/callback".into(),
        )
    }
    fn api_base_url(&self, product: &str, cloud_id: &str) -> String {
        format!("https://sim/ex/{product}/{cloud_id}")
    }
}

/// The store as one daemon reaches it; `Some(node)`: a store several daemons share, with
/// claims (a paused daemon's operations wait for it to resume).
struct SimStore(Shared, Option<usize>);

/// A chain write at `expect_version`, checking that a chain never goes back to an older
/// token of its family (a late commit over a newer chain).
fn save_in(w: &mut World, rec: Record, expect_version: u64) -> Result<(), StoreError> {
    refusal(w)?;
    let Some(stored) = w.store.get(&rec.conn.id) else {
        return Err(StoreError::Conflict(rec.conn.id));
    };
    if stored.chain.version != expect_version {
        return Err(StoreError::Conflict(rec.conn.id));
    }
    let (old, new) = (
        stored.chain.refresh_token.expose(),
        rec.chain.refresh_token.expose(),
    );
    let regress = match (w.owner.get(old), w.owner.get(new)) {
        // (After the user revoked consent, a failed try of the previous token keeps it as
        // the chain: legitimately older, and dead anyway.)
        (Some(fo), Some(fnew)) if fo == fnew && !w.families[fo].revoked => {
            let g = &w.families[fo].generation;
            g.get(new) < g.get(old)
        }
        _ => false,
    };
    if regress {
        let msg = format!(
            "{}: a commit replaced a newer refresh token by an older one",
            rec.conn.id
        );
        w.broke(msg);
    }
    if std::env::var_os("TOKEND_SIM_TRACE").is_some() {
        tracing::info!(
            "SIM store: {} committed version {}",
            rec.conn.id,
            rec.chain.version
        );
    }
    w.store
        .get_mut(&rec.conn.id)
        .expect("checked")
        .adopt_chain(&rec);
    Ok(())
}

/// A refusal of the written value as data, when one is armed.
fn refusal(w: &mut World) -> Result<(), StoreError> {
    if w.store_refusals > 0 {
        w.store_refusals -= 1;
        return Err(StoreError::Refused {
            what: "a connection row".into(),
            sqlstate: "22021".into(),
        });
    }
    Ok(())
}

impl SimStore {
    /// A store operation: a short pause (an await point where a crash can strike), then
    /// either an armed failure or the change, applied at once.
    fn op<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut World) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, StoreError>> {
        Box::pin(async move {
            let pause = lock(&self.0).rng.random_range(0..3);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            if let Some(node) = self.1 {
                wait_unpaused(&self.0, node).await;
            }
            let mut w = lock(&self.0);
            if w.store_fails() {
                return Err(StoreError::Unavailable("simulated full disk".into()));
            }
            let result = f(&mut w);
            if result.is_ok() && w.store_lies > 0 {
                w.store_lies -= 1;
                return Err(StoreError::Unavailable(
                    "simulated fsync failure after the write".into(),
                ));
            }
            result
        })
    }
}

impl Store for SimStore {
    fn load_all(&self) -> BoxFuture<'_, Result<Vec<Record>, StoreError>> {
        self.op(|w| Ok(w.store.values().cloned().collect()))
    }
    fn load(&self, id: String) -> BoxFuture<'_, Result<Option<Record>, StoreError>> {
        self.op(move |w| Ok(w.store.get(&id).cloned()))
    }
    fn insert(&self, rec: Record, _: Vec<Event>) -> BoxFuture<'_, Result<(), StoreError>> {
        self.op(move |w| {
            refusal(w)?;
            if w.store.values().any(|r| r.conn.label == rec.conn.label) {
                return Err(StoreError::LabelTaken(rec.conn.label));
            }
            w.store.insert(rec.conn.id.clone(), rec);
            Ok(())
        })
    }
    fn save_chain(
        &self,
        rec: Record,
        expect_version: u64,
        _: Vec<Event>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.op(move |w| save_in(w, rec, expect_version))
    }
    fn shared(&self) -> bool {
        self.1.is_some()
    }
    fn claim(
        &self,
        id: String,
        holder: String,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Option<Fence>, StoreError>> {
        if self.1.is_none() {
            // One daemon: the SQLite ledger's always-granted claim, without an await.
            return Box::pin(async move {
                Ok(Some(Fence {
                    holder,
                    version: 0,
                    valid_for: lease,
                }))
            });
        }
        self.op(move |w| {
            if !w.store.contains_key(&id) {
                return Err(StoreError::Conflict(id));
            }
            let now = tokio::time::Instant::now();
            let c = w.claims.entry(id).or_insert(SimClaim {
                holder: holder.clone(),
                version: 0,
                expires: now,
            });
            if c.holder != holder && c.expires > now {
                return Ok(None);
            }
            c.holder = holder.clone();
            c.version += 1;
            c.expires = now + lease;
            Ok(Some(Fence {
                holder,
                version: c.version,
                valid_for: lease,
            }))
        })
    }
    fn renew(
        &self,
        id: String,
        fence: Fence,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Option<Fence>, StoreError>> {
        if self.1.is_none() {
            return Box::pin(async move {
                Ok(Some(Fence {
                    valid_for: lease,
                    ..fence
                }))
            });
        }
        self.op(move |w| {
            let now = tokio::time::Instant::now();
            match w.claims.get_mut(&id) {
                Some(c) if c.holder == fence.holder && c.version == fence.version => {
                    c.expires = now + lease;
                    Ok(Some(Fence {
                        valid_for: lease,
                        ..fence
                    }))
                }
                _ => Ok(None),
            }
        })
    }
    fn release(&self, id: String, fence: Fence) -> BoxFuture<'_, Result<bool, StoreError>> {
        if self.1.is_none() {
            return Box::pin(async { Ok(true) });
        }
        self.op(move |w| {
            let now = tokio::time::Instant::now();
            match w.claims.get_mut(&id) {
                Some(c) if c.holder == fence.holder && c.version == fence.version => {
                    c.expires = c.expires.min(now);
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
    }
    fn save_chain_fenced(
        &self,
        rec: Record,
        expect_version: u64,
        fence: Fence,
        _: Vec<Event>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        if self.1.is_none() {
            return self.op(move |w| save_in(w, rec, expect_version));
        }
        self.op(move |w| {
            let now = tokio::time::Instant::now();
            let holds = w.claims.get(&rec.conn.id).is_some_and(|c| {
                c.holder == fence.holder && c.version == fence.version && c.expires > now
            });
            if !holds {
                return Err(StoreError::Conflict(rec.conn.id));
            }
            save_in(w, rec, expect_version)
        })
    }
    fn set_account(
        &self,
        id: String,
        account_id: String,
        _: Time,
        _: Vec<Event>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.op(move |w| match w.store.get_mut(&id) {
            Some(r) => {
                r.conn.account_id = Some(account_id);
                Ok(())
            }
            None => Err(StoreError::Conflict(id)),
        })
    }
    fn merge(
        &self,
        from: String,
        from_version: u64,
        merged: Record,
        expect_version: u64,
        _: Vec<Event>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.op(move |w| {
            if w.store
                .get(&from)
                .is_none_or(|r| r.chain.version != from_version)
            {
                return Err(StoreError::Conflict(from));
            }
            match w.store.get_mut(&merged.conn.id) {
                Some(r) if r.chain.version == expect_version => r.adopt_chain(&merged),
                _ => return Err(StoreError::Conflict(merged.conn.id)),
            }
            w.store.remove(&from);
            Ok(())
        })
    }
    fn sync_sites(
        &self,
        id: String,
        sites: Vec<Site>,
        _: Time,
    ) -> BoxFuture<'_, Result<Vec<Event>, StoreError>> {
        self.op(move |w| {
            if let Some(r) = w.store.get_mut(&id) {
                r.conn.sites = sites;
            }
            Ok(vec![])
        })
    }
    fn delete(&self, id: String, _: Time) -> BoxFuture<'_, Result<bool, StoreError>> {
        self.op(move |w| Ok(w.store.remove(&id).is_some()))
    }
    fn check_writable(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.op(|_| Ok(()))
    }
}

fn settings(max_concurrent: usize) -> crate::config::RefreshConfig {
    crate::config::Config::parse(
        &format!("[refresh]\nrotate_after = \"1h\"\naccess_token_margin = \"1m\"\nbackoff_min = \"30s\"\nbackoff_max = \"30m\"\nmax_concurrent = {max_concurrent}\n"),
        std::path::Path::new("/etc/tokend/daemon.toml"),
        &|_| None,
        &|_| Err(std::io::Error::other("none")),
    )
    .expect("simulation config")
    .refresh
}

/// One running engine and its scheduler.
struct Incarnation {
    engine: Arc<Engine>,
    scheduler: tokio::task::JoinHandle<()>,
}

async fn boot(
    world: &Shared,
    clock: &Arc<TokioClock>,
    max_concurrent: usize,
) -> Option<Incarnation> {
    boot_node(world, clock, max_concurrent, None).await
}

/// Boots an engine; `Some(node)`: daemon `node` of several sharing the store.
async fn boot_node(
    world: &Shared,
    clock: &Arc<TokioClock>,
    max_concurrent: usize,
    node: Option<usize>,
) -> Option<Incarnation> {
    let engine = Engine::load(
        Arc::new(SimStore(world.clone(), node)),
        Arc::new(SimProvider(world.clone(), node)),
        clock.clone(),
        settings(max_concurrent),
        crate::notify::Notifier::disabled(),
        Arc::new(crate::metrics::Metrics::new(false)),
    )
    .await
    .ok()?;
    if let Some(n) = node {
        engine.set_node_name(format!("node{n}"));
    }
    let scheduler = tokio::spawn(engine.clone().run_scheduler(std::future::pending()));
    Some(Incarnation { engine, scheduler })
}

fn crash(inc: Incarnation) {
    inc.scheduler.abort();
    inc.engine.abort();
}

/// Whether every chain can still be refreshed, and the other invariants; the first broken
/// one, if any.
fn check(world: &Shared, live: Option<&Engine>, step: &str) -> Result<(), String> {
    check_all(world, live.as_slice(), step)
}

/// [`check`] over every live daemon sharing the store.
fn check_all(world: &Shared, live: &[&Engine], step: &str) -> Result<(), String> {
    let mut w = lock(world);
    if let Some(b) = w.broken.first() {
        return Err(format!("{step}: {b}"));
    }
    let now = w.now();
    let mut per_family: HashMap<String, usize> = HashMap::new();
    for rec in w.store.values() {
        let Some(family) = w.family_of(rec) else {
            return Err(format!(
                "{step}: {}: the store holds a token the provider never issued",
                rec.conn.id
            ));
        };
        *per_family.entry(family).or_default() += 1;
    }
    if let Some((family, n)) = per_family.iter().find(|(_, n)| **n > 1) {
        return Err(format!("{step}: {family}: {n} connections share one chain"));
    }
    let families: Vec<String> = w.families.keys().cloned().collect();
    for family in families {
        let Some(rec) = w.record_of(&family).cloned() else {
            let f = &w.families[&family];
            if f.seen && !f.removal && !f.revoked {
                return Err(format!("{step}: {family}: the store lost the connection"));
            }
            continue;
        };
        let f = w.families.get_mut(&family).expect("family");
        f.seen = true;
        let id = &rec.conn.id;
        let forgotten = f.removal && !live.is_empty() && live.iter().all(|e| e.find(id).is_none());
        if f.revoked || forgotten {
            continue;
        }
        if rec.conn.status == Status::NeedsReauth && f.rejections == 0 {
            return Err(format!(
                "{step}: {id}: needs_reauth without a definite rejection"
            ));
        }
        let committed = rec.chain.refresh_token.expose();
        let held: Vec<String> = live
            .iter()
            .filter_map(|e| {
                let slot = e.find(id)?;
                let st = slot.lock();
                st.held
                    .as_ref()
                    .map(|h| h.rec.chain.refresh_token.expose().to_owned())
            })
            .collect();
        let refreshable = committed == f.current
            || f.parent.as_ref().is_some_and(|(p, at)| {
                p == committed && (now - *at).to_std().unwrap_or_default() < REUSE_LEEWAY
            })
            || held.contains(&f.current);
        if !refreshable || !f.alive {
            let engine_view = live.first().and_then(|e| {
                let slot = e.find(id)?;
                let st = slot.lock();
                Some(format!(
                    "flight {}, plan {:?}, not_before {:?}, stale {}, held {}, marker {:?}, permits in use {}",
                    st.flight.is_some(),
                    e.plan.next_of(st.handle).map(|p| (p.at.saturating_duration_since(tokio::time::Instant::now()), p.urgency)),
                    e.not_before(&st).map(|nb| nb.saturating_duration_since(tokio::time::Instant::now())),
                    st.stale,
                    st.held.is_some(),
                    st.rec.attempt_started_at(),
                    e.permits.in_use(),
                ))
            });
            return Err(format!(
                "{step}: {id}: chain lost (alive {}, committed token is generation {:?} of {}; engine: {engine_view:?})",
                f.alive,
                f.generation.get(committed),
                f.generation.len()
            ));
        }
    }
    for e in live {
        let held = e.slots().iter().filter(|s| s.lock().held.is_some()).count();
        if e.commit_pending() != held {
            return Err(format!(
                "{step}: commit_pending() says {} but {held} slots hold a change",
                e.commit_pending()
            ));
        }
        // The status counts health and `/metrics` read are kept as statuses change: they
        // must equal a recount over every connection.
        if e.status_counts() != e.recount_statuses() {
            return Err(format!(
                "{step}: status_counts() says {:?} but a recount gives {:?}",
                e.status_counts(),
                e.recount_statuses()
            ));
        }
        // The site index `?site=` reads is kept as sites and statuses change: it must equal
        // one built again over every connection.
        e.site_index_matches_recount()
            .map_err(|m| format!("{step}: {m}"))?;
        // So are the indexes by id and label and the label order listings page through.
        e.index_matches_recount()
            .map_err(|m| format!("{step}: {m}"))?;
        for slot in e.slots() {
            // What a cached token's answer shows of its connection is what the record says,
            // as a reader (sharing the lock with the token path) sees it.
            {
                let st = slot.read();
                if !st.face_current() {
                    return Err(format!(
                        "{step}: {}: the token answer's face {:?} is behind the record",
                        st.rec.id(),
                        st.answer.get().map(|a| &a.face)
                    ));
                }
                if !st.access_shared_current() {
                    return Err(format!(
                        "{step}: {}: the shared access token is not the record's",
                        st.rec.id()
                    ));
                }
            }
            let st = slot.lock();
            let id = st.rec.id();
            let unknown = st.rec.attempt_started_at().is_some();
            if st.flight.is_none() && st.claim.is_some() {
                return Err(format!(
                    "{step}: {id}: a claim is held with no attempt running"
                ));
            }
            if (st.rec.status() == Status::Active || unknown)
                && st.flight.is_none()
                && e.plan.next_of(st.handle).is_none()
            {
                return Err(format!(
                    "{step}: {id}: a chain to keep has no plan and no attempt"
                ));
            }
        }
    }
    Ok(())
}

/// Checks a token handed to a caller: its refresh token (or a later one) is committed.
fn check_handed_out(world: &Shared, token: &str) {
    let mut w = lock(world);
    let Some((chain, generation)) = w.access.get(token).cloned() else {
        w.broke("a caller got an access token the provider never issued".into());
        return;
    };
    if w.families[&chain].removal {
        // Removed meanwhile: nothing left to compare with.
        return;
    }
    let committed = w.record_of(&chain).and_then(|r| {
        w.families[&chain]
            .generation
            .get(r.chain.refresh_token.expose())
            .copied()
    });
    if committed.is_none_or(|c| c < generation) {
        let stored = w.record_of(&chain).map(|r| r.conn.id.clone());
        w.broke(format!(
            "{chain}: an access token of generation {generation} was handed out while the store holds generation {committed:?} (in {stored:?})"
        ));
    }
}

/// Runs one schedule; `Err` names the step and the broken invariant.
fn run_schedule(seed: u64) -> Result<(), String> {
    let rt = paused_runtime();
    if std::env::var_os("TOKEND_SIM_TRACE").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_test_writer()
            .try_init();
    }
    crate::model::seed_this_thread(Some(seed));
    let result = rt.block_on(schedule(seed));
    crate::model::seed_this_thread(None);
    result
}

async fn schedule(seed: u64) -> Result<(), String> {
    let start = sim_start(0);
    let clock = Arc::new(TokioClock::new(start));
    let world: Shared = Arc::new(Mutex::new(World::new(seed, clock.clone())));
    {
        let mut w = lock(&world);
        for i in 0..CHAINS {
            w.add_chain(i, start);
        }
    }
    let mut live = boot(&world, &clock, 2).await;
    let roll = |world: &Shared, n: u32| lock(world).rng.random_range(0..n);
    // A connection the store holds now, picked by the seed (ids are sorted for replay).
    let pick = |world: &Shared| -> Option<String> {
        let mut w = lock(world);
        let mut ids: Vec<String> = w.store.keys().cloned().collect();
        ids.sort();
        (!ids.is_empty()).then(|| {
            let i = w.rng.random_range(0..ids.len());
            ids.swap_remove(i)
        })
    };
    let mut imported = 0;
    for step in 0..STEPS {
        let what;
        match roll(&world, 100) {
            0..30 => {
                what = "caller";
                if let (Some(inc), Some(id)) = (&live, pick(&world)) {
                    let min_valid = Duration::from_secs(roll(&world, 400) as u64);
                    let hang_up = (roll(&world, 3) == 0)
                        .then(|| Duration::from_millis(roll(&world, 2000) as u64));
                    let (engine, world) = (inc.engine.clone(), world.clone());
                    tokio::spawn(async move {
                        let ask = engine.token(&id, min_valid);
                        let got = match hang_up {
                            Some(after) => tokio::time::timeout(after, ask).await.ok(),
                            None => Some(ask.await),
                        };
                        if let Some(Ok(grant)) = got {
                            check_handed_out(&world, grant.access_token.expose());
                        }
                    });
                }
            }
            30..48 => {
                what = "provider fault";
                let fault = match roll(&world, 9) {
                    0 => Fault::Connect,
                    1 => Fault::RateLimited(1 + roll(&world, 30) as u64),
                    2 => Fault::ServerErrorBefore,
                    3 => Fault::LostAfterRotate,
                    4 => Fault::ServerErrorAfterRotate,
                    5 => Fault::GarbledAfterRotate,
                    6 => Fault::PartialAfterRotate,
                    7 => Fault::NoRotation,
                    _ => Fault::Slow(roll(&world, 5000) as u64),
                };
                let mut w = lock(&world);
                if w.faults.len() < MAX_PENDING_FAULTS {
                    w.faults.push_back(fault);
                }
            }
            48..52 => {
                what = "store failures";
                let n = 1 + roll(&world, 6);
                lock(&world).store_failures += n;
            }
            52..54 => {
                what = "store writes that land but report a failure";
                lock(&world).store_lies += 1 + roll(&world, 2);
            }
            66..69 => {
                what = "import";
                if let Some(inc) = &live {
                    imported += 1;
                    let label = format!("imp{imported}");
                    let rt = {
                        let mut w = lock(&world);
                        let now = w.now();
                        w.new_family(&format!("f{imported}"), now)
                    };
                    let engine = inc.engine.clone();
                    let hang_up = Duration::from_millis(roll(&world, 3000) as u64);
                    tokio::spawn(async move {
                        let _ =
                            tokio::time::timeout(hang_up, engine.import(&label, Secret::new(rt)))
                                .await;
                    });
                }
            }
            72..74 => {
                what = "consent";
                if let Some(inc) = &live {
                    imported += 1;
                    let label = format!("con{imported}");
                    let code = {
                        let mut w = lock(&world);
                        let now = w.now();
                        let family = format!("f{imported}");
                        w.new_family(&family, now);
                        let code = w.mint("code");
                        w.codes.insert(code.clone(), family);
                        code
                    };
                    let engine = inc.engine.clone();
                    let hang_up = Duration::from_millis(roll(&world, 3000) as u64);
                    tokio::spawn(async move {
                        let Ok(auth) = engine.authorize() else { return };
                        let connect = engine.connect(&label, Secret::new(code), &auth.state);
                        let _ = tokio::time::timeout(hang_up, connect).await;
                    });
                }
            }
            69..71 => {
                what = "remove";
                if let (Some(inc), Some(id)) = (&live, pick(&world)) {
                    {
                        let mut w = lock(&world);
                        let family = w.store.get(&id).and_then(|r| w.family_of(r));
                        if let Some(f) = family.and_then(|f| w.families.get_mut(&f)) {
                            f.removal = true;
                        }
                    }
                    let engine = inc.engine.clone();
                    tokio::spawn(async move {
                        let _ = engine.remove(&id).await;
                    });
                }
            }
            71 => {
                what = "the user revokes consent";
                let mut w = lock(&world);
                let mut families: Vec<String> = w.families.keys().cloned().collect();
                families.sort();
                let f = families[w.rng.random_range(0..families.len())].clone();
                let f = w.families.get_mut(&f).expect("family");
                f.alive = false;
                f.revoked = true;
            }
            54..58 => {
                what = "crash-restart";
                if let Some(inc) = live.take() {
                    crash(inc);
                }
                tokio::time::sleep(Duration::from_millis(roll(&world, 60_000) as u64)).await;
                while live.is_none() {
                    live = boot(&world, &clock, 2).await;
                    if live.is_none() {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            58..62 => {
                what = "operator refresh";
                if let (Some(inc), Some(id)) = (&live, pick(&world)) {
                    let engine = inc.engine.clone();
                    let hang_up = Duration::from_millis(roll(&world, 3000) as u64);
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(hang_up, engine.refresh_now(&id)).await;
                    });
                }
            }
            62..66 => {
                what = "site job";
                if let (Some(inc), Some(id)) = (&live, pick(&world)) {
                    let engine = inc.engine.clone();
                    tokio::spawn(async move {
                        engine.resolve_sites(&id).await;
                    });
                }
            }
            _ => {
                what = "time passes";
                let ms = match roll(&world, 4) {
                    0 => roll(&world, 100) as u64,
                    1 => roll(&world, 5_000) as u64,
                    2 => roll(&world, 60_000) as u64,
                    _ => roll(&world, 180_000) as u64,
                };
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        check(
            &world,
            live.as_ref().map(|i| &*i.engine),
            &format!("step {step} ({what})"),
        )?;
    }
    // Heal everything; the engine must bring every chain back to a committed current token.
    {
        let mut w = lock(&world);
        w.faults.clear();
        w.store_failures = 0;
        w.store_lies = 0;
    }
    for minute in 0..80 {
        tokio::time::sleep(Duration::from_secs(60)).await;
        check(
            &world,
            live.as_ref().map(|i| &*i.engine),
            &format!("healed, minute {minute}"),
        )?;
    }
    let engine = live
        .as_ref()
        .map(|i| i.engine.clone())
        .ok_or("no engine after healing")?;
    let w = lock(&world);
    if std::env::var_os("TOKEND_SIM_VERBOSE").is_some() {
        let rotations: usize = w.families.values().map(|f| f.generation.len()).sum();
        eprintln!(
            "seed {seed}: {} provider calls, {rotations} refresh tokens issued, {} chains stored",
            w.calls,
            w.store.len()
        );
    }
    // A removal whose outcome the engine could not learn leaves the slot until an attempt
    // finds the row gone: the operator's chain, not a lost one.
    let mut in_engine: Vec<String> = engine
        .slots()
        .iter()
        .filter_map(|slot| {
            let st = slot.lock();
            let id = st.rec.id().to_owned();
            let removing = w
                .family_of(&st.rec.to_record())
                .is_some_and(|f| w.families[&f].removal);
            (!removing || w.store.contains_key(&id)).then_some(id)
        })
        .collect();
    // A removal whose outcome the engine could not learn may leave the row for the next
    // start: that is the operator's chain, not a lost one.
    let mut in_store: Vec<String> = w
        .store
        .values()
        .filter(|r| {
            w.family_of(r)
                .is_none_or(|f| !w.families[&f].removal || in_engine.contains(&r.conn.id))
        })
        .map(|r| r.conn.id.clone())
        .collect();
    in_engine.sort();
    in_store.sort();
    if in_engine != in_store {
        return Err(format!(
            "after healing the engine holds {in_engine:?} but the store {in_store:?}"
        ));
    }
    for rec in w.store.values() {
        let id = &rec.conn.id;
        let family = w.family_of(rec).expect("checked");
        let f = &w.families[&family];
        if f.revoked || (f.removal && engine.find(id).is_none()) {
            continue;
        }
        let slot = engine
            .find(id)
            .ok_or(format!("{id}: gone from the engine"))?;
        let st = slot.lock();
        if st.rec.status() != Status::Active || st.held.is_some() {
            return Err(format!("{id}: not active and committed after healing"));
        }
        let age = (w.now() - f.used_at).to_std().unwrap_or_default();
        if age > Duration::from_secs(70 * 60) {
            return Err(format!(
                "{id}: not rotated for {age:?} after healing (rotate_after is 1h)"
            ));
        }
    }
    if engine.permits.remembered() > 0 {
        return Err(format!(
            "{} permit tickets leaked",
            engine.permits.remembered()
        ));
    }
    Ok(())
}

/// Multi-daemon schedules CI runs (`TOKEND_SIM_MULTI_SCHEDULES` overrides).
const CI_MULTI_SCHEDULES: u64 = 150;
/// Steps of one multi-daemon schedule.
const MULTI_STEPS: usize = 100;
/// The longest pause of a daemon (SIGSTOP): several leases, well inside the reuse leeway
/// (another daemon learns of a marker the paused one left only when it next claims the
/// chain: without `LISTEN/NOTIFY` here, a pause as long as the leeway could lose a chain by
/// physics).
const MAX_PAUSE: Duration = Duration::from_secs(4 * 60);

/// The engines of the daemons running now.
fn engines(daemons: &[Option<Incarnation>]) -> Vec<&Engine> {
    daemons.iter().flatten().map(|i| &*i.engine).collect()
}

fn run_multi_schedule(seed: u64) -> Result<(), String> {
    let rt = paused_runtime();
    crate::model::seed_this_thread(Some(seed));
    let result = rt.block_on(multi_schedule(seed));
    crate::model::seed_this_thread(None);
    result
}

/// Two or three daemons ("engines") share one store with claims and fencing, each with its
/// own memory and no `LISTEN/NOTIFY` (a daemon learns of another's work when it next claims
/// the chain). Faults: callers and operator refreshes on any daemon, provider faults, store
/// failures and lying writes, a daemon paused past its lease (its store operations and
/// provider answers wait), a daemon killed mid-attempt and restarted. After every step the
/// checks of [`check_all`] over every daemon, the provider's (at most one refresh of a chain
/// in flight across all daemons, no reuse outside the leeway) and the store's (no commit
/// puts an older token of a chain over a newer one).
async fn multi_schedule(seed: u64) -> Result<(), String> {
    let start = sim_start(0);
    let clock = Arc::new(TokioClock::new(start));
    let world: Shared = Arc::new(Mutex::new(World::new(seed, clock.clone())));
    {
        let mut w = lock(&world);
        for i in 0..CHAINS {
            w.add_chain(i, start);
        }
    }
    let n = 2 + (seed % 2) as usize;
    let mut daemons: Vec<Option<Incarnation>> = Vec::new();
    for node in 0..n {
        daemons.push(boot_node(&world, &clock, 2, Some(node)).await);
    }
    let lease = settings(2).lease;
    let roll = |world: &Shared, n: u32| lock(world).rng.random_range(0..n);
    let pick = |world: &Shared| -> Option<String> {
        let mut w = lock(world);
        let mut ids: Vec<String> = w.store.keys().cloned().collect();
        ids.sort();
        (!ids.is_empty()).then(|| {
            let i = w.rng.random_range(0..ids.len());
            ids.swap_remove(i)
        })
    };
    for step in 0..MULTI_STEPS {
        let what;
        let node = roll(&world, n as u32) as usize;
        match roll(&world, 100) {
            0..35 => {
                what = "caller";
                if let (Some(inc), Some(id)) = (&daemons[node], pick(&world)) {
                    let min_valid = Duration::from_secs(roll(&world, 400) as u64);
                    let (engine, world) = (inc.engine.clone(), world.clone());
                    tokio::spawn(async move {
                        if let Ok(grant) = engine.token(&id, min_valid).await {
                            check_handed_out(&world, grant.access_token.expose());
                        }
                    });
                }
            }
            35..50 => {
                what = "provider fault";
                let fault = match roll(&world, 6) {
                    0 => Fault::Connect,
                    1 => Fault::ServerErrorBefore,
                    2 => Fault::LostAfterRotate,
                    3 => Fault::ServerErrorAfterRotate,
                    4 => Fault::NoRotation,
                    _ => Fault::Slow(roll(&world, 5000) as u64),
                };
                let mut w = lock(&world);
                if w.faults.len() < MAX_PENDING_FAULTS {
                    w.faults.push_back(fault);
                }
            }
            50..54 => {
                what = "store unavailable";
                let n = 1 + roll(&world, 6);
                lock(&world).store_failures += n;
            }
            54..56 => {
                what = "store writes that land but report a failure";
                lock(&world).store_lies += 1 + roll(&world, 2);
            }
            56..64 => {
                what = "a daemon paused";
                // Half of the pauses outlast the lease.
                let pause = if roll(&world, 2) == 0 {
                    Duration::from_millis(roll(&world, lease.as_millis() as u32) as u64)
                } else {
                    lease
                        + Duration::from_millis(
                            roll(&world, (MAX_PAUSE - lease).as_millis() as u32) as u64,
                        )
                };
                if roll(&world, 2) == 0 {
                    let until = tokio::time::Instant::now() + pause;
                    lock(&world).paused.insert(node, until);
                } else {
                    // Stopped mid-refresh: at its next provider answer.
                    lock(&world).pause_at_answer.insert(node, pause);
                }
            }
            64..69 => {
                what = "a daemon killed and restarted";
                if let Some(inc) = daemons[node].take() {
                    crash(inc);
                }
                lock(&world).paused.remove(&node);
                lock(&world).pause_at_answer.remove(&node);
                tokio::time::sleep(Duration::from_millis(roll(&world, 60_000) as u64)).await;
                while daemons[node].is_none() {
                    daemons[node] = boot_node(&world, &clock, 2, Some(node)).await;
                    if daemons[node].is_none() {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            69..77 => {
                what = "operator refresh";
                // Half of them on the chain last presented to the provider: the one a paused
                // daemon may be stuck on, so that another daemon takes it over.
                let last = lock(&world).order.last().cloned();
                let id = match last {
                    Some(id) if roll(&world, 2) == 0 => Some(id),
                    _ => pick(&world),
                };
                if let (Some(inc), Some(id)) = (&daemons[node], id) {
                    let engine = inc.engine.clone();
                    let hang_up = Duration::from_millis(roll(&world, 3000) as u64);
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(hang_up, engine.refresh_now(&id)).await;
                    });
                }
            }
            _ => {
                what = "time passes";
                let ms = match roll(&world, 3) {
                    0 => roll(&world, 5_000) as u64,
                    1 => roll(&world, 60_000) as u64,
                    _ => roll(&world, 180_000) as u64,
                };
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        check_all(
            &world,
            &engines(&daemons),
            &format!("step {step} ({what} at node{node})"),
        )?;
    }
    {
        let mut w = lock(&world);
        w.faults.clear();
        w.store_failures = 0;
        w.store_lies = 0;
        w.paused.clear();
        w.pause_at_answer.clear();
    }
    for minute in 0..80 {
        tokio::time::sleep(Duration::from_secs(60)).await;
        check_all(
            &world,
            &engines(&daemons),
            &format!("healed, minute {minute}"),
        )?;
    }
    let w = lock(&world);
    for (node, engine) in engines(&daemons).into_iter().enumerate() {
        for rec in w.store.values() {
            let id = &rec.conn.id;
            let slot = engine
                .find(id)
                .ok_or(format!("node{node}: {id}: gone from the engine"))?;
            let st = slot.lock();
            if st.rec.status() != Status::Active || st.held.is_some() {
                return Err(format!(
                    "node{node}: {id}: not active and committed after healing"
                ));
            }
            let f = &w.families[&w.family_of(rec).expect("checked")];
            let age = (w.now() - f.used_at).to_std().unwrap_or_default();
            if age > Duration::from_secs(70 * 60) {
                return Err(format!(
                    "{id}: not rotated for {age:?} after healing (rotate_after is 1h)"
                ));
            }
        }
        if engine.permits.remembered() > 0 {
            return Err(format!("node{node}: permit tickets leaked"));
        }
    }
    Ok(())
}

#[test]
fn several_daemons_share_a_store_with_fenced_claims() {
    let seeds: Vec<u64> = match env_u64("TOKEND_SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let base = env_u64("TOKEND_SIM_BASE").unwrap_or(0);
            let n = env_u64("TOKEND_SIM_MULTI_SCHEDULES").unwrap_or(CI_MULTI_SCHEDULES);
            (base..base + n).collect()
        }
    };
    let mut failed = Vec::new();
    for &seed in &seeds {
        if let Err(e) = run_multi_schedule(seed) {
            eprintln!(
                "multi-daemon simulation seed {seed} failed: {e}\n  replay: TOKEND_SIM_SEED={seed} cargo test --lib several_daemons"
            );
            failed.push(seed);
            if failed.len() >= 5 {
                break;
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} multi-daemon schedules broke an invariant; seeds {failed:?}",
        failed.len(),
        seeds.len()
    );
}

/// A current-thread runtime with paused time: task order and time are the seed's alone.
fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime")
}

/// Wall time at the start of a simulated run.
fn sim_start(hour: u32) -> Time {
    chrono::Utc
        .with_ymd_and_hms(2026, 1, 1, hour, 0, 0)
        .single()
        .expect("date")
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.trim().parse().ok()
}

#[test]
fn simulated_schedules_keep_every_chain() {
    let seeds: Vec<u64> = match env_u64("TOKEND_SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let base = env_u64("TOKEND_SIM_BASE").unwrap_or(0);
            (base..base + env_u64("TOKEND_SIM_SCHEDULES").unwrap_or(CI_SCHEDULES)).collect()
        }
    };
    assert!(
        !seeds.is_empty(),
        "no schedule to run: TOKEND_SIM_SCHEDULES=0"
    );
    let mut failed = Vec::new();
    for &seed in &seeds {
        if let Err(e) = run_schedule(seed) {
            eprintln!(
                "simulation seed {seed} failed: {e}\n  replay: TOKEND_SIM_SEED={seed} cargo test --lib simulated_schedules"
            );
            failed.push(seed);
            if failed.len() >= 5 {
                break;
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} schedules broke an invariant; seeds {failed:?}",
        failed.len(),
        seeds.len()
    );
}

#[test]
fn the_simulation_catches_a_lost_chain() {
    // The checker itself must be able to fail: a store that forgets a rotation is caught.
    let rt = paused_runtime();
    rt.block_on(async {
        let start = sim_start(0);
        let clock = Arc::new(TokioClock::new(start));
        let world: Shared = Arc::new(Mutex::new(World::new(1, clock)));
        let mut w = lock(&world);
        let rec = crate::model::sample_record("c1", "l1", "rt-old", start);
        w.store.insert("c1".into(), rec);
        w.families.insert(
            "c1".into(),
            Family {
                current: "rt-new".into(),
                parent: Some(("rt-old".into(), start - chrono::Duration::minutes(11))),
                used_at: start,
                alive: true,
                generation: HashMap::from([("rt-old".into(), 0), ("rt-new".into(), 1)]),
                in_flight: 0,
                rejections: 0,
                seen: false,
                removal: false,
                revoked: false,
            },
        );
        drop(w);
        assert!(
            check(&world, None, "probe").is_err(),
            "a chain past the leeway must count as lost"
        );
    });
}

#[test]
fn an_unknown_outcome_goes_before_every_bulk_rotation() {
    // After a downtime every chain is overdue; one has an attempt marker (its outcome is
    // unknown and must be retried inside the leeway). With one permit, it goes first, and
    // the bulk goes nearest inactivity deadline first, whatever order the timers fire in.
    let rt = paused_runtime();
    rt.block_on(async {
        let start = sim_start(12);
        let clock = Arc::new(TokioClock::new(start));
        let world: Shared = Arc::new(Mutex::new(World::new(7, clock.clone())));
        let (marked, mut bulk) = {
            let mut w = lock(&world);
            let mut bulk = Vec::new();
            for i in 0..8 {
                // Older chains first in id order is not what decides: used_at does.
                let used = start - chrono::Duration::minutes(90 + ((i * 37) % 8) as i64);
                bulk.push((used, w.add_chain(i, used)));
            }
            let marked = w.add_chain(99, start - chrono::Duration::minutes(61));
            w.store
                .get_mut(&marked)
                .expect("stored")
                .chain
                .attempt_started_at = Some(start - chrono::Duration::seconds(30));
            (marked, bulk)
        };
        bulk.sort();
        let inc = boot(&world, &clock, 1).await.expect("boot");
        tokio::time::sleep(Duration::from_secs(30)).await;
        let order = lock(&world).order.clone();
        assert_eq!(
            order.first(),
            Some(&marked),
            "the unknown outcome waits behind bulk rotations: {order:?}"
        );
        let expected: Vec<String> = bulk.into_iter().map(|(_, id)| id).collect();
        assert_eq!(
            &order[1..9],
            &expected[..],
            "bulk rotations go nearest inactivity deadline first"
        );
        crash(inc);
    });
}

#[test]
fn a_chain_claimed_by_another_daemon_is_left_to_it() {
    // Another daemon holds the claim: no request, no status change, a retry; once it
    // releases, the next attempt goes through.
    let rt = paused_runtime();
    rt.block_on(async {
        let start = sim_start(0);
        let clock = Arc::new(TokioClock::new(start));
        let world: Shared = Arc::new(Mutex::new(World::new(3, clock.clone())));
        let id = lock(&world).add_chain(0, start);
        let other = SimStore(world.clone(), Some(9));
        let fence = other
            .claim(id.clone(), "other".into(), Duration::from_secs(60))
            .await
            .expect("store up")
            .expect("granted");
        let inc = boot_node(&world, &clock, 2, Some(0)).await.expect("boot");
        let calls = lock(&world).calls;
        let got = inc.engine.refresh_now(&id).await;
        assert!(
            matches!(got, Err(super::Failure::Unavailable { .. })),
            "a claim held elsewhere is a retry: {got:?}"
        );
        assert_eq!(
            lock(&world).calls,
            calls,
            "a request went out under another's claim"
        );
        assert_eq!(lock(&world).store[&id].conn.status, Status::Active);
        let text = inc.engine.metrics.render();
        assert!(text.contains("tokend_lease_conflicts_total 1"), "{text}");
        // A caller who needs a token waits for what the other daemon commits.
        let engine = inc.engine.clone();
        let wanted = id.clone();
        let caller =
            tokio::spawn(async move { engine.token(&wanted, Duration::from_secs(60)).await });
        tokio::time::sleep(Duration::from_secs(2)).await;
        {
            let mut w = lock(&world);
            let now = w.now();
            let at = w.mint("at");
            w.access.insert(at.clone(), (id.clone(), 0));
            let rec = w.store.get_mut(&id).expect("stored");
            rec.chain.access = Some(crate::model::AccessToken {
                token: Secret::new(at.clone()),
                expires_at: now + chrono::Duration::seconds(300),
            });
            rec.conn.last_refresh_at = Some(now);
            rec.chain.version += 1;
        }
        let grant = caller.await.expect("joined").expect("served");
        let expected = lock(&world).store[&id].chain.access.clone().expect("set");
        assert_eq!(grant.access_token.expose(), expected.token.expose());
        assert_eq!(
            lock(&world).calls,
            calls,
            "the other daemon's token was refreshed again"
        );
        assert!(other.release(id.clone(), fence).await.expect("store up"));
        let info = inc.engine.refresh_now(&id).await.expect("refreshed");
        assert_eq!(info.conn.status, Status::Active);
        assert_eq!(lock(&world).calls, calls + 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let text = inc.engine.metrics.render();
        assert!(text.contains("tokend_leases_held 0"), "{text}");
        assert!(check_all(&world, &[&*inc.engine], "end").is_ok());
        crash(inc);
    });
}

/// Two engines ("daemons", each with its own pool) on one real PostgreSQL ledger, against the
/// strict simulated provider: concurrent callers on both cause exactly one refresh (the
/// ledger's claims, by its own clock), and every caller gets the access token it gave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_on_one_postgres_ledger_refresh_a_chain_once() {
    use std::os::unix::fs::PermissionsExt;
    let Some(url) = crate::testpg::database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("test.key");
    std::fs::write(&path, "5a".repeat(32)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key = crate::ledger::seal::KeySource {
        key_file: Some(path),
        old_key_files: vec![],
    };
    let start = chrono::Utc::now();
    let clock = Arc::new(TokioClock::new(start));
    let world: Shared = Arc::new(Mutex::new(World::new(5, clock.clone())));
    let id = "c000000000000".to_owned();
    let first = lock(&world).new_family(&id, start);
    let rec = crate::model::sample_record(&id, "l0", &first, start);
    let mut engines = Vec::new();
    for n in 0..2 {
        let ledger = crate::ledger::PgLedger::connect(&url, &key, dir.path())
            .await
            .unwrap();
        if n == 0 {
            ledger.insert(rec.clone(), vec![]).await.unwrap();
        }
        ledger.set_node(&format!("node{n}"));
        let engine = Engine::load(
            Arc::new(ledger),
            Arc::new(SimProvider(world.clone(), None)),
            clock.clone(),
            settings(2),
            crate::notify::Notifier::disabled(),
            Arc::new(crate::metrics::Metrics::new(false)),
        )
        .await
        .unwrap();
        engine.set_node_name(format!("node{n}"));
        engines.push(engine);
    }
    let callers: Vec<_> = (0..40)
        .map(|i| {
            let (engine, id) = (engines[i % 2].clone(), id.clone());
            tokio::spawn(async move { engine.token(&id, Duration::from_secs(60)).await })
        })
        .collect();
    let mut tokens = std::collections::HashSet::new();
    for caller in callers {
        let grant = caller.await.unwrap().expect("every caller is served");
        tokens.insert(grant.access_token.expose().to_owned());
    }
    let w = lock(&world);
    assert!(w.broken.is_empty(), "{:?}", w.broken);
    assert_eq!(w.calls, 1, "one refresh across both daemons");
    assert_eq!(tokens.len(), 1, "every caller gets the one new token");
}

/// Scripted scenarios of several daemons (and of `reload`).
mod scenarios;
