//! Which account and sites a chain reaches: `/me` and accessible-resources.
//!
//! Resolution never refreshes a chain by itself: it uses the cached access token when that
//! has at least [`RESOLVE_MIN_VALID`] left, and otherwise marks the chain `sites_wanted`, so
//! that the chain's next planned refresh resolves it with the token it gets. A transient
//! failure is retried with backoff until the account and sites are known. A chain whose
//! account turns out to be that of another connection is merged into it.

use super::{Engine, Slot, backoff};
use crate::model::{Event, EventKind, Status};
use crate::secret::Secret;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Resolution uses the cached access token only with at least this long left: enough for
/// two small GETs. (A token whose whole life is shorter is used with a third of it left.)
pub const RESOLVE_MIN_VALID: Duration = Duration::from_secs(10);

/// A `?site=` lookup that matches nothing re-resolves each connection at most this often.
pub const SITE_MISS_INTERVAL: Duration = Duration::from_secs(60);

/// How many connections a `?site=` miss re-resolves at once.
const SITE_MISS_CONCURRENCY: usize = 8;

/// A `?site=` miss starts a re-resolution sweep (a look at every connection) at most this
/// often, and only when none is running: a client asking for a site nobody reaches, as fast
/// as it can, costs one scan per this period, not one per request. A miss during a running
/// sweep waits for it instead; one within this period after a sweep only looks again.
pub const SITE_SWEEP_GAP: Duration = Duration::from_secs(5);

/// One peer uid's `?site=` re-resolution sweep: at most one at a time, at most one per
/// [`SITE_SWEEP_GAP`]. Kept per uid because a sweep covers only the connections its caller
/// may read: one uid's stream of misses must not stand in for another's.
#[derive(Default)]
pub(crate) struct SiteSweep {
    /// Closed (its sender dropped) when the running sweep's resolutions are done; `None`
    /// or closed when no sweep runs.
    running: Option<tokio::sync::watch::Receiver<()>>,
    /// When the last sweep started.
    last_started: Option<Instant>,
}

/// What a `?site=` miss does about the sweep.
enum SweepTurn {
    /// Start one, holding this until its resolutions are done.
    Start(tokio::sync::watch::Sender<()>),
    /// Wait for the running one.
    Join(tokio::sync::watch::Receiver<()>),
    /// Neither: one ran within [`SITE_SWEEP_GAP`].
    Skip,
}

/// What one resolution of a connection did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SiteOutcome {
    /// Account (if it was unknown) and sites were read and recorded.
    Resolved,
    /// No valid access token: resolved with the chain's next planned refresh instead.
    Deferred,
    /// A transient failure; retried with backoff.
    Failed,
    /// Nothing to do: no such connection, or it needs consent or waits for a commit.
    Skipped,
}

impl Engine {
    /// Re-reads a connection's account (if unknown) and sites (the site job). Never refreshes.
    /// The work runs on an engine task: a job cancelled half-way stops nothing half-done.
    pub async fn resolve_sites(self: &Arc<Self>, id: &str) -> SiteOutcome {
        let Some(slot) = self.find(id) else {
            return SiteOutcome::Skipped;
        };
        let access = match self.resolvable(&slot) {
            Ok(access) => access,
            Err(outcome) => return outcome,
        };
        let engine = self.clone();
        let task = self
            .tasks
            .run(async move { engine.resolve_with(&slot, access, false).await.1 });
        task.await.unwrap_or(SiteOutcome::Skipped)
    }

    /// Resolves a new connection's account and sites during onboarding (whose lock the
    /// caller holds). Returns the connection that holds the chain afterwards: another one
    /// when the account already had a connection.
    pub(crate) async fn resolve_now(self: &Arc<Self>, slot: &Arc<Slot>) -> Arc<Slot> {
        match self.resolvable(slot) {
            Ok(access) => self.resolve_with(slot, access, true).await.0,
            Err(_) => slot.clone(),
        }
    }

    /// Resolves a connection after `delay`, once (a retry after a failure, or right after a
    /// refresh brought the token a deferred resolution waited for).
    pub(crate) fn resolve_soon(self: &Arc<Self>, slot: &Arc<Slot>, delay: Duration) {
        {
            let mut st = slot.lock();
            if st.resolving || st.removed {
                return;
            }
            st.resolving = true;
        }
        let (engine, slot) = (self.clone(), slot.clone());
        // Refused only when the engine stopped: then nothing resolves any more.
        let _ = self.tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            slot.lock().resolving = false;
            if let Ok(access) = engine.resolvable(&slot) {
                engine.resolve_with(&slot, access, false).await;
            }
        });
    }

    /// A `?site=` lookup matched nothing: re-resolve each active connection not re-resolved
    /// by a miss within [`SITE_MISS_INTERVAL`], and return when they are done. The work runs
    /// on an engine task, so a caller that hangs up stops nothing half-way.
    ///
    /// Only connections `may_read` (id, label) accepts are re-resolved (the access rules of
    /// the caller, peer uid `uid`), and the caller waits at most `wait`; the resolutions go
    /// on regardless.
    ///
    /// The look over every connection (a sweep) is bounded per uid: one at a time, at most
    /// one per [`SITE_SWEEP_GAP`]; a miss while one runs waits for it, one just after
    /// returns at once (the caller looks again, and a site added meanwhile is found by the
    /// next sweep or the site job).
    pub async fn site_miss(
        self: &Arc<Self>,
        uid: u32,
        may_read: impl Fn(&str, &str) -> bool,
        wait: Duration,
    ) {
        use futures_util::StreamExt;
        let now = Instant::now();
        let turn = {
            let mut sweeps = self.site_sweep.lock();
            if !sweeps.contains_key(&uid) {
                // Only uids whose sweep runs or ran within the gap need remembering.
                sweeps.retain(|_, s| {
                    s.running.as_ref().is_some_and(|r| r.has_changed().is_ok())
                        || s.last_started.is_some_and(|t| now - t < SITE_SWEEP_GAP)
                });
            }
            let sweep = sweeps.entry(uid).or_default();
            match &sweep.running {
                Some(done) if done.has_changed().is_ok() => SweepTurn::Join(done.clone()),
                _ if sweep.last_started.is_some_and(|t| now - t < SITE_SWEEP_GAP) => {
                    SweepTurn::Skip
                }
                _ => {
                    let (tx, rx) = tokio::sync::watch::channel(());
                    sweep.running = Some(rx);
                    sweep.last_started = Some(now);
                    SweepTurn::Start(tx)
                }
            }
        };
        let done = match turn {
            SweepTurn::Start(done) => done,
            SweepTurn::Join(mut running) => {
                // Nothing is ever sent: `changed` returns when the sweep drops its sender.
                let _ = tokio::time::timeout(wait, running.changed()).await;
                return;
            }
            SweepTurn::Skip => return,
        };
        let due: Vec<(Arc<Slot>, Secret)> = self
            .slots()
            .into_iter()
            .filter_map(|slot| {
                {
                    let mut st = slot.lock();
                    if st.rec.status() != Status::Active
                        || !may_read(st.rec.id(), st.rec.label())
                        || st
                            .last_site_miss
                            .get(self.requests_base)
                            .is_some_and(|t| now - t < SITE_MISS_INTERVAL)
                    {
                        return None;
                    }
                    st.last_site_miss = super::SecondsSince::of(self.requests_base, Some(now));
                }
                let access = self.resolvable(&slot).ok()?;
                Some((slot, access))
            })
            .collect();
        if due.is_empty() {
            return;
        }
        let engine = self.clone();
        let task = self.tasks.run(async move {
            futures_util::stream::iter(due)
                .for_each_concurrent(SITE_MISS_CONCURRENCY, |(slot, access)| {
                    let engine = engine.clone();
                    async move {
                        engine.resolve_with(&slot, access, false).await;
                    }
                })
                .await;
            drop(done);
        });
        let _ = tokio::time::timeout(wait, task).await;
    }

    /// The access token to resolve with, or why not now (marking a deferred resolution).
    fn resolvable(&self, slot: &Slot) -> Result<Secret, SiteOutcome> {
        let mut st = slot.lock();
        if st.removed || st.held.is_some() || st.rec.status() != Status::Active {
            return Err(SiteOutcome::Skipped);
        }
        let now = self.now();
        let facts = st.rec.facts();
        let lifetime = facts
            .last_refresh_at
            .zip(facts.access_expires_at)
            .and_then(|(r, expires_at)| (expires_at - r).to_std().ok())
            .unwrap_or(RESOLVE_MIN_VALID);
        let min_valid = RESOLVE_MIN_VALID.min(lifetime / 3);
        match st.rec.access() {
            Some((token, expires_at)) if expires_at > now + super::chrono_dur(min_valid) => {
                Ok(Secret::new(token.to_owned()))
            }
            _ => {
                st.sites_wanted = true;
                Err(SiteOutcome::Deferred)
            }
        }
    }

    /// Reads the account (when unknown) and the sites with `access`, records them, and on a
    /// transient failure plans a retry. Returns the connection holding the chain afterwards.
    async fn resolve_with(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        access: Secret,
        onboarding_held: bool,
    ) -> (Arc<Slot>, SiteOutcome) {
        let mut target = slot.clone();
        let mut failed = false;
        let mut retry_after = None;
        let (id, unknown_account) = {
            let st = slot.lock();
            (
                st.rec.id().to_owned(),
                st.rec.account_id().is_none() && !st.account_hidden,
            )
        };
        if unknown_account {
            match self.provider.me(&access).await {
                Ok(Some(account)) => match self
                    .adopt_account(slot, &account.account_id, onboarding_held)
                    .await
                {
                    Ok(t) => target = t,
                    Err(()) => failed = true,
                },
                Ok(None) => slot.lock().account_hidden = true,
                Err(e) => {
                    tracing::warn!(connection = %id, error = %e, "cannot resolve the account; retrying later");
                    retry_after = e.retry_after();
                    failed = true;
                }
            }
        }
        let target_id = target.lock().rec.id().to_owned();
        let now = self.now();
        let resolved = self.provider.accessible_resources(&access, now).await;
        self.metrics.site_resolution(resolved.is_ok());
        match resolved {
            Ok(sites) => match self
                .store
                .sync_sites(target_id.clone(), sites.clone(), now)
                .await
            {
                Ok(events) => {
                    for e in &events {
                        tracing::info!(connection = %target_id, event = e.kind.as_str(), "{}", e.message);
                    }
                    self.set_sites(&mut target.lock(), sites);
                }
                Err(e) => {
                    tracing::error!(connection = %target_id, error = %e, "cannot record sites in the ledger");
                    failed = true;
                }
            },
            Err(e) => {
                tracing::warn!(connection = %target_id, error = %e, "cannot resolve accessible sites");
                retry_after = retry_after.max(e.retry_after());
                failed = true;
            }
        }
        let outcome = if failed {
            let failures = {
                let mut st = target.lock();
                st.resolve_failures = st.resolve_failures.saturating_add(1);
                u32::from(st.resolve_failures)
            };
            let s = self.settings();
            let delay = backoff::delay(failures, s.backoff_min, s.backoff_max, retry_after, false);
            self.resolve_soon(&target, delay);
            SiteOutcome::Failed
        } else {
            let mut st = target.lock();
            st.resolve_failures = 0;
            st.sites_wanted = false;
            SiteOutcome::Resolved
        };
        (target, outcome)
    }

    /// Records the account of `slot`, or merges `slot` into the connection that already has
    /// that account. Returns the connection holding the chain afterwards.
    async fn adopt_account(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        account_id: &str,
        onboarding_held: bool,
    ) -> Result<Arc<Slot>, ()> {
        let _onboarding = if onboarding_held {
            None
        } else {
            Some(self.onboarding.lock().await)
        };
        let (id, client_id) = {
            let st = slot.lock();
            (st.rec.id().to_owned(), st.rec.client_id())
        };
        let existing = self.slots().into_iter().find(|other| {
            let st = other.lock();
            st.rec.id() != id
                && !st.removed
                && st.rec.client_id() == client_id
                && st.rec.account_id() == Some(account_id)
        });
        if let Some(existing) = existing {
            return match self.merge(slot, &existing).await {
                Ok(()) => Ok(existing),
                Err(e) => {
                    tracing::warn!(connection = %id, error = %e, "cannot merge the chain into the account's connection; retrying later");
                    Err(())
                }
            };
        }
        let now = self.now();
        let event = Event::new(EventKind::AccountResolved, format!("account {account_id}"));
        match self
            .store
            .set_account(id.clone(), account_id.to_owned(), now, vec![event])
            .await
        {
            Ok(()) => {
                let mut st = slot.lock();
                st.update(|rec| {
                    rec.conn.account_id = Some(account_id.to_owned());
                    rec.conn.updated_at = now;
                });
                Ok(slot.clone())
            }
            Err(e) => {
                tracing::error!(connection = %id, error = %e, "cannot record the account in the ledger");
                Err(())
            }
        }
    }
}
