//! Read-only views of the engine's connections: listings, lookups, counts, deadlines for
//! the metrics (read at each scrape through [`ConnectionSource`]), and the daily
//! absolute-expiry warnings. Nothing here changes a chain.

use super::{
    ABSOLUTE_WARNING_WINDOW, ConnectionInfo, Engine, Identity, Slot, SlotState, chrono_dur,
};
use crate::ledger::ClaimHolder;
use crate::metrics::{ConnectionDeadline, ConnectionSource};
use crate::model::{Status, Time};
use crate::notify::Kind;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// One page of a listing ([`Engine::list_page`]).
#[derive(Debug)]
pub struct Page {
    /// The connections, in label order.
    pub items: Vec<ConnectionInfo>,
    /// The label to continue after, when more connections follow.
    pub next: Option<String>,
}

/// How long `GET /v1/connections/{id}` waits for the store to say who holds the chain's
/// claim: the rest of the answer is memory, so a ledger that does not answer (down, cut off)
/// must not hold it long; past it the answer goes out without the claim.
const CLAIM_LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);

impl Engine {
    /// Who holds the refresh claim of connection `id` (an id, not a label) on a shared store
    /// while a refresh is in flight, for `tokend show`; `None` when nobody does, on a store
    /// only this daemon writes, and when the store does not answer within
    /// [`CLAIM_LOOKUP_TIMEOUT`] (the claim is then unknown, and said to be nobody's rather
    /// than holding the answer).
    pub async fn claim_holder(&self, id: &str) -> Option<ClaimHolder> {
        if !self.store.shared() {
            return None;
        }
        match tokio::time::timeout(CLAIM_LOOKUP_TIMEOUT, self.store.claim_holder(id.to_owned()))
            .await
        {
            Ok(Ok(holder)) => holder,
            Ok(Err(e)) => {
                tracing::debug!(connection = %id, error = %e, "cannot read the claim's holder");
                None
            }
            Err(_) => {
                tracing::debug!(connection = %id, "the claim's holder did not come in time");
                None
            }
        }
    }

    /// Whether some chain holds a rotated token its commit is still waiting for.
    pub fn commit_pending(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The id and label of a connection (by id or label), cheaply: for access checks on the
    /// token path.
    pub fn identity(&self, id_or_label: &str) -> Option<Identity> {
        let slot = self.find(id_or_label)?;
        let st = slot.read();
        (!st.removed).then(|| Identity {
            id: st.rec.id().to_owned(),
            label: st.rec.label().to_owned(),
        })
    }

    pub(crate) fn info_of(&self, st: &SlotState) -> ConnectionInfo {
        let settings = self.settings();
        let rec = st.rec.to_record();
        let next_rotation_at = self.plan.next_of(st.handle).map(|planned| {
            let at = planned.at;
            let now = Instant::now();
            let delta = if at > now { at - now } else { Duration::ZERO };
            self.now() + chrono_dur(delta)
        });
        ConnectionInfo {
            access_token_expires_at: rec.chain.access.as_ref().map(|a| a.expires_at),
            refresh_token_rotated_at: rec.chain.rotated_at,
            next_rotation_at,
            inactivity_expires_at: rec.chain.used_at + chrono_dur(settings.inactivity_expiry),
            absolute_expires_at: settings
                .absolute_expiry
                .map(|a| rec.conn.consented_at + chrono_dur(a)),
            conn: rec.conn,
        }
    }

    /// Connections in label order with labels after `after` (exclusive; all when `None`),
    /// at most `limit` of them (all when `None`). Reads the label-ordered index: a page costs
    /// O(log n + limit), never a sort of every connection.
    pub fn list_page(&self, after: Option<&str>, limit: Option<usize>) -> Page {
        let limit = limit.unwrap_or(usize::MAX);
        let (slots, next) = {
            let index = self.index.read();
            let mut range = index.after(after).cloned();
            let slots: Vec<Arc<Slot>> = range.by_ref().take(limit).collect();
            let more = range.next().is_some();
            // Read under the index lock: a filed label changes only under its write lock.
            let next = more
                .then(|| {
                    slots
                        .last()
                        .map(|slot| super::slot_label(&slot.read()).to_owned())
                })
                .flatten();
            (slots, next)
        };
        let items = slots
            .iter()
            .filter_map(|slot| {
                let st = slot.read();
                (!st.removed).then(|| self.info_of(&st))
            })
            .collect();
        Page { items, next }
    }

    /// One connection by id or label.
    pub fn get(&self, id_or_label: &str) -> Option<ConnectionInfo> {
        let slot = self.find(id_or_label)?;
        let st = slot.read();
        (!st.removed).then(|| self.info_of(&st))
    }

    /// The ids of active connections.
    pub fn active_ids(&self) -> Vec<String> {
        self.slots()
            .iter()
            .filter_map(|s| {
                let st = s.read();
                (st.rec.status() == Status::Active).then(|| st.rec.id().to_owned())
            })
            .collect()
    }

    /// Counts of connections by status: `(active, needs_reauth)`. O(1): the active count is
    /// kept as statuses change ([`Engine::adopt`], install, uninstall), since any socket peer
    /// may ask for `/v1/health` as often as it likes.
    pub fn status_counts(&self) -> (usize, usize) {
        let total = self.index.read().len();
        let active = self
            .active
            .load(std::sync::atomic::Ordering::Relaxed)
            .min(total);
        (active, total - active)
    }

    /// Counts of connections by status, counted over every connection: what
    /// [`Engine::status_counts`] must always equal (the simulation checks it).
    #[cfg(test)]
    pub(crate) fn recount_statuses(&self) -> (usize, usize) {
        let slots = self.slots();
        let active = slots
            .iter()
            .filter(|s| s.read().rec.status() == Status::Active)
            .count();
        (active, slots.len() - active)
    }

    /// The ids of active connections that reach a site (by host or cloud id), sorted: what
    /// [`Engine::token_for_site`] finds, for the tests to check.
    #[cfg(test)]
    pub fn connections_for_site(&self, site: &str) -> Vec<String> {
        sorted_ids(&self.site_slots(site))
    }

    /// The slots of the active connections that reach a site (by host or cloud id), each
    /// once, in no particular order. O(matches): the query is normalised before any lock,
    /// then looked up in the [`super::SiteIndex`].
    pub(crate) fn site_slots(&self, site: &str) -> Vec<Arc<Slot>> {
        let (cloud_id, host) = site_query(site);
        let candidates = self.sites.read().candidates(&cloud_id, &host);
        if candidates.is_empty() {
            return Vec::new();
        }
        // Each candidate checked against its own sites: a key is a hash, and a handle may
        // have been freed and given to another slot since the index was read. Candidates
        // are distinct handles, so each slot comes once.
        let slots: Vec<Arc<Slot>> = {
            let index = self.index.read();
            candidates
                .iter()
                .filter_map(|&h| index.by_handle(h).cloned())
                .collect()
        };
        slots
            .into_iter()
            .filter(|slot| {
                let st = slot.read();
                st.filed() && super::site_matches(&st.rec, &cloud_id, &host)
            })
            .collect()
    }

    /// The site index built again over every connection: what the kept one must equal
    /// (unit tests and the simulation check it).
    #[cfg(test)]
    pub(crate) fn site_index_matches_recount(&self) -> Result<(), String> {
        let recount = super::SiteIndex::recount(&self.slots());
        let kept = self.sites.read();
        if *kept == recount {
            Ok(())
        } else {
            Err(format!(
                "the site index is {kept:?} but a recount gives {recount:?}"
            ))
        }
    }

    /// Whether the id and label indexes are exactly what the installed slots say
    /// ([`super::index::Index::check`]): unit tests and the simulation check it.
    #[cfg(test)]
    pub(crate) fn index_matches_recount(&self) -> Result<(), String> {
        self.index.read().check()
    }

    /// Warns about every active connection whose absolute (consent) expiry is within
    /// [`ABSOLUTE_WARNING_WINDOW`]: a log line and a notification each. Run daily.
    pub fn warn_absolute_expiry(&self) -> usize {
        let window = chrono_dur(ABSOLUTE_WARNING_WINDOW);
        let now = self.now();
        let Some(absolute) = self.settings().absolute_expiry.map(chrono_dur) else {
            return 0;
        };
        let mut warned = 0;
        // Decided under each slot's lock; only a connection warned about is copied (this
        // runs at start and daily: a copy of every connection would be its whole cost).
        let mut due: Vec<_> = self
            .slots()
            .into_iter()
            .filter_map(|slot| {
                let st = slot.read();
                let deadline = st.rec.consented_at() + absolute;
                (!st.removed && st.rec.status() == Status::Active && deadline - now <= window)
                    .then(|| (st.rec.to_record().conn, deadline))
            })
            .collect();
        // In label order, as the listing shows them.
        due.sort_by(|a, b| a.0.label.cmp(&b.0.label));
        for (conn, deadline) in due {
            let days = (deadline - now).num_hours() as f64 / 24.0;
            let at = deadline.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let message = if deadline <= now {
                format!(
                    "consent for {} reached its absolute expiry on {at}; a person must consent again (tokend connect)",
                    conn.label
                )
            } else {
                format!(
                    "consent for {} expires in {days:.1} days ({at}); a person must consent again before then (tokend connect)",
                    conn.label
                )
            };
            tracing::warn!(connection = %conn.id, "{message}");
            self.notify(Kind::AbsoluteExpirySoon, &conn, &message);
            warned += 1;
        }
        warned
    }
}

/// A `?site=` query's keys: `(cloud id, host)`, lowercased; the host is the URL's when the
/// query is a URL, else the query itself (a bare host or a cloud id).
fn site_query(site: &str) -> (String, String) {
    let wanted = site.trim().trim_end_matches('/').to_ascii_lowercase();
    // A bare host or cloud id (the usual query) is no URL: not parsed as one.
    if !wanted.contains([':', '/']) {
        return (wanted.clone(), wanted);
    }
    let host = url::Url::parse(&wanted)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| wanted.clone());
    (wanted, host)
}

/// The ids of `slots` (distinct slots, so distinct ids), sorted: how a site look-up names
/// the connections it found.
pub(super) fn sorted_ids(slots: &[Arc<Slot>]) -> Vec<String> {
    let mut ids: Vec<String> = slots.iter().map(|s| s.read().rec.id().to_owned()).collect();
    ids.sort_unstable();
    ids
}

/// What `/metrics` shows of the connections, read when it is scraped.
impl ConnectionSource for Engine {
    fn status_counts(&self) -> (usize, usize) {
        Engine::status_counts(self)
    }

    /// Each slot under its read lock, one at a time (the index lock only to list them).
    fn deadlines(&self, each: &mut dyn FnMut(ConnectionDeadline<'_>)) -> f64 {
        let settings = self.settings();
        let unix = |t: Time| t.timestamp_millis() as f64 / 1000.0;
        for s in self.slots() {
            let st = s.read();
            if !st.removed {
                let (id, used_at, consented_at) = st.rec.id_used_consented();
                each(ConnectionDeadline {
                    id,
                    inactivity_unix: unix(used_at + chrono_dur(settings.inactivity_expiry)),
                    absolute_unix: settings
                        .absolute_expiry
                        .map(|a| unix(consented_at + chrono_dur(a))),
                    active: st.rec.status() == Status::Active,
                });
            }
        }
        unix(self.now())
    }
}
