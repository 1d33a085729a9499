//! Changes other daemons made: on a shared (PostgreSQL) ledger, another daemon may refresh,
//! import or remove a connection. The daemon's wiring tells the engine which connection
//! moved ([`Engine::reload`], from a notification) or asks it to compare everything
//! ([`Engine::reload_all`], the periodic fallback and the catch-up after a partition), and
//! the engine takes the stored state into memory: a newer chain is adopted (so that its
//! access token is served without a second refresh), an unknown connection is installed, a
//! connection the ledger no longer has is forgotten; an account or sites resolved elsewhere
//! (written without a new chain version) are taken whatever the chain's version.
//!
//! Never writes, never calls the provider, never takes a chain lock: an attempt running
//! meanwhile finds out through its own compare-and-swap, as it always did.

use super::{Engine, Slot, StoreError};
use crate::model::{Record, Site, Status};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// A chain stored with another daemon's attempt marker is taken into memory only once that
/// attempt committed (its commit is announced too), or once the marker is older than this:
/// then its daemon died or lost the ledger mid-refresh, and resolving the unknown outcome
/// falls to whichever daemon claims the chain next. Far longer than any attempt
/// (`refresh.request_timeout`, seconds).
pub(super) const FOREIGN_ATTEMPT_GRACE: Duration = Duration::from_secs(120);

impl Engine {
    /// Takes connection `id` as the store holds it now, when that is newer than memory.
    pub async fn reload(&self, id: &str) -> Result<(), StoreError> {
        // Under the onboarding lock, like this daemon's own imports, consents, merges and
        // removals: a snapshot read before one of them committed must not be applied after
        // it (it would uninstall a connection just added, with its first rotated token, or
        // install a second slot beside the one the import is about to install).
        let _onboarding = self.onboarding.lock().await;
        let stored = self.store.load(id.to_owned()).await?;
        self.take_stored(id, stored);
        Ok(())
    }

    /// Compares every connection with the store, as [`Engine::reload`] does for one.
    /// Returns how many changed in memory.
    pub async fn reload_all(&self) -> Result<usize, StoreError> {
        // See `reload`: the snapshot and its application are one step w.r.t. onboarding.
        let _onboarding = self.onboarding.lock().await;
        let stored = self.store.load_all().await?;
        let mut seen = HashSet::with_capacity(stored.len());
        let mut changed = 0;
        for rec in stored {
            seen.insert(rec.conn.id.clone());
            let id = rec.conn.id.clone();
            changed += usize::from(self.take_stored(&id, Some(rec)));
        }
        for slot in self.slots() {
            let id = slot.lock().rec.id().to_owned();
            if !seen.contains(&id) {
                changed += usize::from(self.take_stored(&id, None));
            }
        }
        Ok(changed)
    }

    /// Applies what the store holds for `id` (`None`: no such connection); true when memory
    /// changed.
    fn take_stored(&self, id: &str, stored: Option<Record>) -> bool {
        if let Some(rec) = &stored
            && self.foreign_attempt_running(rec)
        {
            return false;
        }
        let slot = self.index_by_id(id);
        match (slot, stored) {
            (None, Some(rec)) => {
                tracing::info!(connection = %id, label = %rec.conn.label, "connection added through another daemon");
                let wanted = rec.conn.status == Status::Active
                    && (rec.conn.sites.is_empty() || rec.conn.account_id.is_none());
                let slot = self.install(rec, None);
                slot.lock().sites_wanted = wanted;
                self.replan(&slot);
                true
            }
            (Some(slot), Some(rec)) => self.take_newer(&slot, &rec),
            (Some(slot), None) => {
                {
                    let st = slot.lock();
                    // A connection whose insert waits for its commit is not in the store
                    // yet: that is not a removal.
                    if st.removed || st.held.as_ref().is_some_and(|h| h.insert) {
                        return false;
                    }
                }
                tracing::info!(connection = %id, "connection removed through another daemon");
                self.uninstall(id);
                true
            }
            (None, None) => false,
        }
    }

    /// Adopts `rec`'s chain into `slot` when it is newer and memory holds no change of its
    /// own waiting for a commit (that commit's compare-and-swap decides instead).
    fn take_newer(&self, slot: &Arc<Slot>, rec: &Record) -> bool {
        let mut st = slot.lock();
        if st.removed || st.held.is_some() {
            return false;
        }
        // The account is resolved after the insert, without a new chain version.
        let account = st.rec.account_id().is_none() && rec.conn.account_id.is_some();
        if account {
            st.update(|ours| ours.conn.account_id = rec.conn.account_id.clone());
        }
        // So are the sites (another daemon's site job): taken through `set_sites`, which
        // keeps the `?site=` index exact.
        let sites = !same_sites(&st.rec.to_record().conn.sites, &rec.conn.sites);
        if sites {
            self.set_sites(&mut st, rec.conn.sites.clone());
        }
        if rec.chain.version <= st.rec.version() {
            return account || sites;
        }
        tracing::debug!(
            connection = %rec.conn.id,
            version = rec.chain.version,
            "taking the chain another daemon committed"
        );
        self.adopt(&mut st, rec);
        // Memory is the store's again.
        st.stale = false;
        self.replan_locked(&st);
        true
    }

    /// Whether `rec` carries the marker of an attempt that is (or recently was) running
    /// elsewhere: memory that took it would plan to resolve that attempt's outcome at once,
    /// presenting the same refresh token while the other daemon's request is in flight.
    fn foreign_attempt_running(&self, rec: &Record) -> bool {
        rec.chain.attempt_started_at.is_some_and(|at| {
            (self.now() - at)
                .to_std()
                .is_ok_and(|age| age < FOREIGN_ATTEMPT_GRACE)
                || at > self.now()
        })
    }

    /// The slot of connection `id` (ids only, not labels).
    fn index_by_id(&self, id: &str) -> Option<Arc<Slot>> {
        let index = self.index.read();
        index.by_id(id).cloned()
    }
}

/// Whether two lists hold the same sites, in whatever order (the ledger's order need not
/// be the provider's), when last seen aside (every resolution moves it, on whichever
/// daemon ran it: taking that alone would rewrite every slot at each re-read).
fn same_sites(a: &[Site], b: &[Site]) -> bool {
    let same = |x: &Site, y: &Site| {
        x.cloud_id == y.cloud_id && x.url == y.url && x.name == y.name && x.scopes == y.scopes
    };
    a.len() == b.len() && a.iter().all(|x| b.iter().any(|y| same(x, y)))
}
