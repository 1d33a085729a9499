//! Adding and removing connections: import of a refresh token, completion of a consent,
//! merging a new chain into the existing connection of the same account, removal.
//!
//! Each runs on an engine task (a caller that hangs up changes nothing) and, but for
//! removal, under the engine's onboarding lock: the label check, the exchange that spends a
//! one-time code, the account check and the insert happen one onboarding at a time. A chain
//! obtained from the provider is never dropped: an insert that fails is retried under a
//! generated label, and a store that cannot take it at all leaves it held in memory (and
//! committed as soon as it can be) with an answer that says so.

use super::{
    AUTHORIZATION_TTL, Added, Authorization, Engine, Failure, Held, Need, Slot, StoreError, attempt,
};
use crate::model::{
    AccessToken, Chain, Connection, Event, EventKind, PROVIDER_ATLASSIAN, Record, Status, Time,
    new_connection_id,
};
use crate::provider::{ASSUMED_ACCESS_LIFETIME, ProviderError, TransientKind};
use crate::secret::Secret;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The most pending authorizations kept; older ones are dropped first. Bounds memory if a
/// client keeps asking for consent URLs.
const MAX_PENDING_AUTHORIZATIONS: usize = 1024;

/// Labels longer than this are refused: they end up in table cells and log lines.
const MAX_LABEL_LEN: usize = 64;

/// A label for a connection whose requested label is taken by another account's connection:
/// the label plus the last four hex digits of the new id.
pub(crate) fn generated_label(label: &str, id: &str) -> String {
    let base: String = label.chars().take(MAX_LABEL_LEN - 5).collect();
    format!("{base}-{}", &id[id.len().saturating_sub(4)..])
}

impl Engine {
    /// Starts a consent flow: a single-use `state` and the URL to open.
    pub fn authorize(&self) -> Result<Authorization, Failure> {
        if let Some(reason) = self.provider.not_configured() {
            return Err(Failure::BadRequest(reason));
        }
        let state = crate::provider::new_state();
        let (authorize_url, redirect_uri) = self.provider.authorize_url(&state);
        let mut pending = self.authorizations.lock();
        pending.retain(|_, created| created.elapsed() < AUTHORIZATION_TTL);
        if pending.len() >= MAX_PENDING_AUTHORIZATIONS
            && let Some(oldest) = pending
                .iter()
                .min_by_key(|(_, created)| **created)
                .map(|(k, _)| k.clone())
        {
            pending.remove(&oldest);
        }
        pending.insert(state.clone(), Instant::now());
        Ok(Authorization {
            authorize_url,
            state,
            redirect_uri,
        })
    }

    /// Adds a connection from an existing refresh token. The token is refreshed at once (so
    /// the stored chain is proven alive); the account and sites are resolved; an existing
    /// connection of the same account takes the new chain instead of a second one being made.
    pub async fn import(
        self: &Arc<Self>,
        label: &str,
        refresh_token: Secret,
    ) -> Result<Added, Failure> {
        validate_label(label)?;
        if refresh_token.expose().trim().is_empty() {
            return Err(Failure::BadRequest("the refresh token is empty".into()));
        }
        if let Some(reason) = self.provider.not_configured() {
            return Err(Failure::BadRequest(format!(
                "cannot add a connection: {reason}"
            )));
        }
        let engine = self.clone();
        let label = label.to_owned();
        let task = self.tasks.run(async move {
            let _onboarding = engine.onboarding.lock().await;
            engine.import_locked(&label, refresh_token).await
        });
        task.await
            .unwrap_or_else(|_| Err(Failure::Internal("the refresh engine is stopping".into())))
    }

    async fn import_locked(
        self: &Arc<Self>,
        label: &str,
        refresh_token: Secret,
    ) -> Result<Added, Failure> {
        let refresh_token = Secret::new(refresh_token.expose().trim());
        // Two connections on one token would rotate each other's tokens away until the
        // provider revokes the chain.
        let known = self.slots().into_iter().find_map(|slot| {
            let st = slot.lock();
            let same = st.rec.refresh_token() == refresh_token.expose()
                || st.rec.previous_token() == Some(refresh_token.expose());
            same.then(|| st.rec.label().to_owned())
        });
        if let Some(label) = known {
            return Err(Failure::Conflict(format!(
                "this refresh token already belongs to connection {label:?}"
            )));
        }
        let now = self.now();
        let rec = self.new_record(label, refresh_token, None, now);
        let id = rec.conn.id.clone();
        let event = Event::new(
            EventKind::Imported,
            format!("imported as {:?}", rec.conn.label),
        );
        // Nothing is spent yet: a failed insert loses nothing. (One that reports a failure
        // but landed must not leave a row nobody refreshes.)
        if let Err(e) = self.store.insert(rec.clone(), vec![event]).await {
            match self.store.load(id.clone()).await {
                Ok(Some(_)) => {}
                Ok(None) => return Err(store_failure(e)),
                Err(_) => {
                    // Unknown whether the row landed: hold the connection until the store
                    // says (the held insert first checks for the row), so that no row is
                    // left that nobody refreshes.
                    let label = rec.conn.label.clone();
                    self.hold_insert(rec, false);
                    return Err(Failure::Internal(format!(
                        "the ledger failed while storing the connection ({e}); tokend holds it as connection {id} ({label}), stores it as soon as the ledger can be written, and refreshes it then"
                    )));
                }
            }
        }
        let slot = self.install(rec, None);
        let first = {
            let mut st = slot.lock();
            self.join_or_start(&slot, &mut st, Need::Forced)
        };
        match first.result().await {
            Ok(()) => {}
            Err(Failure::NeedsReauth(message)) => {
                // The token was dead on arrival: nothing to keep.
                let _ = self.remove_now(&slot).await;
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
        self.settle_new(&slot, label).await
    }

    /// Completes a consent flow: checks `state`, exchanges the code, stores the chain.
    pub async fn connect(
        self: &Arc<Self>,
        label: &str,
        code: Secret,
        state: &str,
    ) -> Result<Added, Failure> {
        validate_label(label)?;
        let engine = self.clone();
        let (label, state) = (label.to_owned(), state.to_owned());
        let task = self.tasks.run(async move {
            let _onboarding = engine.onboarding.lock().await;
            engine.connect_locked(&label, code, &state).await
        });
        task.await
            .unwrap_or_else(|_| Err(Failure::Internal("the refresh engine is stopping".into())))
    }

    async fn connect_locked(
        self: &Arc<Self>,
        label: &str,
        code: Secret,
        state: &str,
    ) -> Result<Added, Failure> {
        // The code is single-use: spend it only when the store can take the chain now.
        if let Err(e) = self.store.check_writable().await {
            return Err(Failure::Internal(format!(
                "the ledger cannot be written ({e}); the authorization code was not used, send it again once it can"
            )));
        }
        let fresh = {
            let mut pending = self.authorizations.lock();
            pending
                .remove(state)
                .is_some_and(|created| created.elapsed() < AUTHORIZATION_TTL)
        };
        if !fresh {
            return Err(Failure::BadRequest(
                "unknown or expired state: start again with POST /v1/authorizations".into(),
            ));
        }
        let exchanged = match self.provider.exchange_code(&code).await {
            // A 2xx that carried only a refresh token: the code is spent and this is the
            // chain; keep it and get its access token with a first refresh.
            Err(ProviderError::Partial {
                refresh_token,
                message,
            }) => {
                tracing::warn!("{message}");
                Ok(crate::provider::Grant {
                    access_token: Secret::new(String::new()),
                    refresh_token: Some(refresh_token),
                    expires_in: None,
                    scopes: None,
                })
            }
            other => other,
        };
        let grant = exchanged.map_err(|e| match e {
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
        // From here on the chain exists only in this process: keep it whatever happens.
        let now = self.now();
        let lifetime = grant.expires_in.unwrap_or(ASSUMED_ACCESS_LIFETIME);
        let access = (!grant.access_token.expose().is_empty()).then(|| AccessToken {
            token: grant.access_token,
            expires_at: now + super::chrono_dur(lifetime),
        });
        let needs_first_refresh = access.is_none();
        let mut rec = self.new_record(label, rt, access, now);
        if !needs_first_refresh {
            rec.conn.last_refresh_at = Some(now);
        }
        if let Some(scopes) = grant.scopes {
            rec.conn.scopes = scopes.into();
        }
        let events = || vec![Event::new(EventKind::Imported, "connected through consent")];
        let mut inserted = self.store.insert(rec.clone(), events()).await;
        if let Err(StoreError::LabelTaken(_)) = &inserted {
            rec.conn.label = generated_label(label, &rec.conn.id);
            inserted = self.store.insert(rec.clone(), events()).await;
        }
        if let Err(e) = inserted {
            let (id, label) = (rec.conn.id.clone(), rec.conn.label.clone());
            // The code is spent: the chain exists only here, so it is held (and its insert
            // retried) even when the store refused a value of it, which the operator must
            // look into; the held change's retries do not log that again.
            let refused = matches!(e, StoreError::Refused { .. });
            tracing::error!(connection = %id, error = %e, "cannot store the new chain; holding it in memory and retrying");
            self.hold_insert(rec, refused);
            return Err(Failure::Internal(if refused {
                format!(
                    "the new chain could not be stored ({e}); tokend holds it in memory as connection {id} ({label}) and retries, but the same value is refused every time: see tokend's log"
                )
            } else {
                format!(
                    "the new chain could not be stored ({e}); tokend holds it as connection {id} ({label}) and stores it as soon as the ledger can be written"
                )
            }));
        }
        let slot = self.install(rec, None);
        self.replan(&slot);
        if needs_first_refresh {
            let first = {
                let mut st = slot.lock();
                self.join_or_start(&slot, &mut st, Need::Forced)
            };
            if let Err(e) = first.result().await {
                tracing::warn!(connection = %slot.lock().rec.id(), error = %e, "the first refresh of a new chain failed; tokend keeps retrying");
            }
        }
        self.settle_new(&slot, label).await
    }

    /// Installs a new connection the store did not (or may not have) taken: held, so that
    /// its insert is retried before anything else, and its sites resolved once it is in.
    /// `refused`: the store refused a value of it as data (already logged).
    fn hold_insert(&self, rec: Record, refused: bool) {
        let held = Held {
            rec: rec.clone(),
            expect_version: 0,
            insert: true,
            presented: None,
            refused,
        };
        let slot = self.install(rec, Some(held));
        slot.lock().sites_wanted = true;
        self.replan(&slot);
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
        // does not, the new connection keeps a generated label rather than losing its chain.
        let label = if self.find(label).is_some() {
            generated_label(label, &id)
        } else {
            label.to_owned()
        };
        Record {
            conn: Connection {
                id,
                label,
                provider: PROVIDER_ATLASSIAN.into(),
                client_id: self.provider.client_id().into(),
                account_id: None,
                status: Status::Active,
                scopes: self.provider.scopes().into(),
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
                used_at: now,
                version: 0,
                previous: None,
                attempt_started_at: None,
                access,
            },
        }
    }

    /// After a new chain is stored and proven alive: resolve its account (merging it into an
    /// existing connection of the same account) and its sites. Holds the onboarding lock.
    async fn settle_new(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        requested_label: &str,
    ) -> Result<Added, Failure> {
        let target = self.resolve_now(slot).await;
        let created = Arc::ptr_eq(&target, slot);
        if created {
            let label = slot.lock().rec.label().to_owned();
            if label != requested_label {
                tracing::warn!(requested = %requested_label, label = %label, "the requested label belongs to another account's connection; the new connection got a generated label");
            }
        }
        let info = {
            let st = target.lock();
            if st.removed {
                return Err(Failure::NotFound);
            }
            self.info_of(&st)
        };
        Ok(Added { info, created })
    }

    /// Moves the chain of the new connection `from` into the existing `into` (same account).
    /// Holds the onboarding lock; takes both chain locks, `from`'s first. Merges are
    /// serialised by the onboarding lock, and nothing else holds two chain locks, so two
    /// merges can never take them in opposite orders.
    ///
    /// **Against another daemon refreshing either chain meanwhile** (a shared ledger). The
    /// merge takes no claim: the chain locks exclude this daemon's own attempts, and the
    /// store's `merge` is a compare-and-swap on both chain versions, which is the fence
    /// against the others, because every daemon writes its attempt marker (a new chain
    /// version) before it presents a token (`attempt`, step 4):
    ///
    /// - another daemon's marker written before the merge, on either chain, while this
    ///   daemon's memory is behind it: the merge conflicts and changes nothing (both
    ///   connections stay, `into` takes the store's record, the merge is retried with the
    ///   account's next resolution);
    /// - a marker written after the merge: on `from` it conflicts (the row is gone) and
    ///   that daemon forgets the connection; on `into` it is at the merged version, so that
    ///   daemon presents the merged chain under its claim, as any refresh;
    /// - memory already holding another daemon's marker on `into` (taken when its claim
    ///   was seen, or after `FOREIGN_ATTEMPT_GRACE`) while its request is in flight: the
    ///   merge lands. That daemon's commit then conflicts, and `attempt::after_conflict`
    ///   finds a third token in the store (neither the one it presented nor its answer), so
    ///   the store's, the merged chain, wins and is taken into its memory. What it drops is
    ///   the rotation of the chain the merge replaced, which the merge gives up by design;
    ///   the token it presented is never presented again, so no reuse can fall outside the
    ///   leeway.
    ///
    /// So no merged chain is lost and no claim is needed (test:
    /// `sim::scenarios::a_merge_landing_during_another_daemons_refresh_keeps_the_merged_chain`).
    /// The import or consent insert before it is a new row no other daemon knows yet.
    pub(crate) async fn merge(
        self: &Arc<Self>,
        from: &Arc<Slot>,
        into: &Arc<Slot>,
    ) -> Result<(), Failure> {
        let _from_chain = from.chain.lock().await;
        let _into_chain = into.chain.lock().await;
        let (source, base) = {
            let (f, i) = (from.lock(), into.lock());
            if f.removed || i.removed {
                return Err(Failure::NotFound);
            }
            if f.held.is_some() || i.held.is_some() {
                return Err(Failure::Internal(
                    "a chain waits for its commit; merging later".into(),
                ));
            }
            (f.rec.to_record(), i.rec.to_record())
        };
        let (from_id, into_id) = (source.conn.id.clone(), base.conn.id.clone());
        let outcome = attempt::adopt(self, &source, base).await;
        let (result, effects) = {
            let mut st = into.lock();
            let settled = attempt::settle(self, &mut st, outcome);
            self.replan_locked(&st);
            settled
        };
        effects.apply(self, into);
        result?;
        self.uninstall(&from_id);
        tracing::info!(connection = %into_id, from = %from_id, "existing connection took the new chain of the same account");
        Ok(())
    }

    /// Removes a connection: from the ledger, then from memory. An attempt running for it
    /// finishes first, so its commit cannot resurrect the row.
    pub async fn remove(self: &Arc<Self>, id_or_label: &str) -> Result<(), Failure> {
        let slot = self.find(id_or_label).ok_or(Failure::NotFound)?;
        let engine = self.clone();
        let task = self
            .tasks
            .run(async move { engine.remove_now(&slot).await });
        task.await
            .unwrap_or_else(|_| Err(Failure::Internal("the refresh engine is stopping".into())))
    }

    async fn remove_now(&self, slot: &Arc<Slot>) -> Result<(), Failure> {
        let _chain = slot.chain.lock().await;
        let (id, stored) = {
            let st = slot.lock();
            if st.removed {
                return Err(Failure::NotFound);
            }
            (
                st.rec.id().to_owned(),
                !st.held.as_ref().is_some_and(|h| h.insert),
            )
        };
        let deleted = if stored {
            match self.store.delete(id.clone(), self.now()).await {
                Ok(deleted) => deleted,
                // A delete that reports a failure may have landed.
                Err(e) => match self.store.load(id.clone()).await {
                    Ok(None) => true,
                    Ok(Some(_)) => {
                        return Err(Failure::Internal(format!(
                            "the ledger cannot be written: {e}"
                        )));
                    }
                    Err(_) => {
                        // Unknown: keep it (memory must not drop a chain the store may
                        // still hold); the next attempt reloads it and forgets it if the
                        // row is gone.
                        slot.lock().stale = true;
                        return Err(Failure::Internal(format!(
                            "the ledger failed while removing the connection ({e}); it may or may not be removed: try again"
                        )));
                    }
                },
            }
        } else {
            true
        };
        self.uninstall(&id);
        if deleted {
            tracing::info!(connection = %id, "connection removed");
            Ok(())
        } else {
            Err(Failure::NotFound)
        }
    }
}

/// What the caller of an onboarding step learns of a store failure.
///
/// A value the store refuses as data (`StoreError::Refused`) is answered `bad_request`
/// (400), the closest of INTERFACE.md's codes: nothing was stored, and the same request can
/// never be stored however often it is retried (which `internal`, 500, would invite), and
/// provider strings are filtered before they reach the store (`provider::classify`), so
/// what is left is the request's own input. The message names what was refused, never the
/// value.
pub(super) fn store_failure(e: StoreError) -> Failure {
    match e {
        StoreError::LabelTaken(l) => {
            Failure::Conflict(format!("the label {l:?} is already in use"))
        }
        StoreError::Conflict(id) => {
            Failure::Conflict(format!("connection {id} changed concurrently; try again"))
        }
        StoreError::Unavailable(m) => {
            Failure::Internal(format!("the ledger cannot be written: {m}"))
        }
        StoreError::Refused { what, sqlstate } => Failure::BadRequest(format!(
            "the ledger refuses {what} of this connection as malformed data (SQLSTATE {sqlstate}); it cannot be stored as sent"
        )),
    }
}

pub(crate) fn validate_label(label: &str) -> Result<(), Failure> {
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
        let long = "x".repeat(64);
        let g = generated_label(&long, "c0123456789ab");
        assert!(validate_label(&g).is_ok(), "{g}");
        assert!(g.ends_with("-89ab"));
    }
}
