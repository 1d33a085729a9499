//! The engine's two seams: the [`Store`] that keeps chains durably and the [`TokenEndpoint`]
//! that refreshes them, plus the [`Clock`] that tells wall time.
//!
//! The engine knows only these traits. `ledger::Ledger` (SQLite) and `provider::Atlassian`
//! implement them for the daemon; the deterministic simulation (`refresh::sim`, tests only)
//! implements them in memory with injected faults. A PostgreSQL store goes behind the same
//! trait: every chain write is a compare-and-swap on the chain's version, and no SQL lives
//! outside a store.

use crate::ledger::{ClaimHolder, Fence, Ledger, LedgerError, PgError, PgLedger};

use crate::model::{Event, Record, Site, Time};
use crate::provider::{Account, Atlassian, Grant, ProviderError};
use crate::secret::Secret;
use futures_util::future::BoxFuture;
use std::time::Duration;

/// Why a store operation failed, as the engine needs to tell it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The compare-and-swap failed: the chain is not at the expected version (someone else
    /// changed it), or the connection is gone.
    #[error("connection {0} changed concurrently; refusing to overwrite its chain")]
    Conflict(String),
    /// The label is taken by another connection.
    #[error("the label {0:?} is already used by another connection")]
    LabelTaken(String),
    /// The outcome is unknown (full disk, I/O error, lost connection, a timeout): the write
    /// may have committed or not. The engine treats it as unknown: it reloads the chain
    /// before its next write and retries later, never assuming either way.
    #[error("{0}")]
    Unavailable(String),
    /// The store refused a value as data (PostgreSQL's SQLSTATE class 22, e.g. a NUL byte in
    /// a TEXT column): nothing was written, and the same write fails the same way every
    /// time, so it is neither "unavailable" nor worth retrying unchanged. Each caller decides
    /// what that means for it: onboarding answers the request with it, a chain commit keeps
    /// the rotated token held in memory (and says so once). Names what was refused and the
    /// SQLSTATE, never the value.
    #[error("the ledger refused {what} as malformed data (SQLSTATE {sqlstate})")]
    Refused {
        /// Which value (column or record kind), never the value itself.
        what: String,
        /// The server's SQLSTATE.
        sqlstate: String,
    },
}

impl From<LedgerError> for StoreError {
    fn from(e: LedgerError) -> StoreError {
        match e {
            LedgerError::Conflict(id) => StoreError::Conflict(id),
            LedgerError::LabelTaken(l) => StoreError::LabelTaken(l),
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

impl From<PgError> for StoreError {
    fn from(e: PgError) -> StoreError {
        match e {
            PgError::Conflict(id) => StoreError::Conflict(id),
            PgError::LabelTaken(l) => StoreError::LabelTaken(l),
            PgError::Refused { what, sqlstate } => StoreError::Refused { what, sqlstate },
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

/// Where [`Store::load_batches`] hands its batches: each the number of connections in all
/// and some of their records.
pub type LoadSink = tokio::sync::mpsc::Sender<(usize, Vec<Record>)>;

/// Durable storage of connections. Every method is one transaction; a method that returned
/// `Ok` has committed durably.
pub trait Store: Send + Sync + 'static {
    /// Every connection with its chain and current sites.
    fn load_all(&self) -> BoxFuture<'_, Result<Vec<Record>, StoreError>>;
    /// [`Store::load_all`] handed to `sink` in batches, in the same order, each with the
    /// number of connections in all, so that the engine installs a large ledger while the
    /// store still reads (and opens) the rest. After an error, what was sent is to be thrown
    /// away. By default one batch, `load_all`'s.
    fn load_batches(&self, sink: LoadSink) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let all = self.load_all().await?;
            // A closed sink: nobody listens any more.
            let _ = sink.send((all.len(), all)).await;
            Ok(())
        })
    }
    /// One connection, or `None` when there is none.
    fn load(&self, id: String) -> BoxFuture<'_, Result<Option<Record>, StoreError>>;
    /// A new connection (refused with `LabelTaken` when the label is in use).
    fn insert(&self, rec: Record, events: Vec<Event>) -> BoxFuture<'_, Result<(), StoreError>>;
    /// A change of a chain (tokens, status, failures; not identity, account or sites), only
    /// while the stored chain is at `expect_version`; `rec.chain.version` is stored.
    fn save_chain(
        &self,
        rec: Record,
        expect_version: u64,
        events: Vec<Event>,
    ) -> BoxFuture<'_, Result<(), StoreError>>;
    /// The account behind a connection.
    fn set_account(
        &self,
        id: String,
        account_id: String,
        now: Time,
        events: Vec<Event>,
    ) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Moves the chain of the new connection `from` (at `from_version`) into `merged` (at
    /// `expect_version`) and deletes `from`; `Conflict` if either moved.
    fn merge(
        &self,
        from: String,
        from_version: u64,
        merged: Record,
        expect_version: u64,
        events: Vec<Event>,
    ) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Replaces a connection's sites; returns the events describing the changes.
    fn sync_sites(
        &self,
        id: String,
        sites: Vec<Site>,
        now: Time,
    ) -> BoxFuture<'_, Result<Vec<Event>, StoreError>>;
    /// Deletes a connection; false when there was none.
    fn delete(&self, id: String, now: Time) -> BoxFuture<'_, Result<bool, StoreError>>;
    /// Proves the store can take a write now.
    fn check_writable(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Whether other daemons write this store too (PostgreSQL): then memory may be behind
    /// it at any time, so an attempt reloads the chain once it holds the claim, and writes a
    /// marker before every request (even a retry of an unknown outcome), so that a writer
    /// after it is always seen. A store only this daemon writes (SQLite) says `false`.
    fn shared(&self) -> bool {
        false
    }

    /// Claims the refresh of chain `id` for `holder` for `lease`: `None` while another
    /// holder's claim runs. A store only one daemon writes (SQLite, behind its state-dir
    /// lock) grants every claim.
    fn claim(
        &self,
        id: String,
        holder: String,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Option<Fence>, StoreError>> {
        let _ = id;
        Box::pin(async move {
            Ok(Some(Fence {
                holder,
                version: 0,
                valid_for: lease,
            }))
        })
    }
    /// Extends a claim to `lease` from now: `None` when another holder claimed meanwhile.
    fn renew(
        &self,
        id: String,
        fence: Fence,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Option<Fence>, StoreError>> {
        let _ = id;
        Box::pin(async move {
            Ok(Some(Fence {
                valid_for: lease,
                ..fence
            }))
        })
    }
    /// Gives a claim up; false when it no longer held.
    fn release(&self, id: String, fence: Fence) -> BoxFuture<'_, Result<bool, StoreError>> {
        let _ = (id, fence);
        Box::pin(async { Ok(true) })
    }
    /// [`Store::save_chain`], only while `fence` still holds the chain's claim (else
    /// `Conflict`): a holder whose claim lapsed never commits over the one that took over.
    fn save_chain_fenced(
        &self,
        rec: Record,
        expect_version: u64,
        fence: Fence,
        events: Vec<Event>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let _ = fence;
        self.save_chain(rec, expect_version, events)
    }
    /// Who holds chain `id`'s claim now (`tokend show`), `None` when nobody does. A store
    /// only one daemon writes has no claims another daemon could hold: always `None`.
    fn claim_holder(&self, id: String) -> BoxFuture<'_, Result<Option<ClaimHolder>, StoreError>> {
        let _ = id;
        Box::pin(async { Ok(None) })
    }
}

/// Writes `impl Store for $ty`, every method delegated to the method of the same name of
/// `$via` (`load` to `$load`) on `$target`, an expression of `$this` (the `&self`), its error
/// converted into a [`StoreError`]. With `shared`, the claims too (and [`Store::shared`]);
/// without, their defaults (one daemon per ledger).
macro_rules! delegate_store {
    ($ty:ty => |$this:ident| $target:expr, via $via:ident, load: $load:ident $(, $shared:ident)?) => {
        // `?` converts the target's error (none to convert when `$via` is `Store`).
        #[allow(clippy::needless_question_mark)]
        impl Store for $ty {
            $crate::refresh::store::delegate_store!(@$($shared)? |$this| $target, $via);
            fn load_all(&self) -> BoxFuture<'_, Result<Vec<Record>, StoreError>> {
                let $this = self;
                Box::pin(async move { Ok($via::load_all($target).await?) })
            }
            fn load_batches(
                &self,
                sink: $crate::refresh::store::LoadSink,
            ) -> BoxFuture<'_, Result<(), StoreError>> {
                let $this = self;
                Box::pin(async move { Ok($via::load_batches($target, sink).await?) })
            }
            fn load(&self, id: String) -> BoxFuture<'_, Result<Option<Record>, StoreError>> {
                let $this = self;
                Box::pin(async move { Ok($via::$load($target, id).await?) })
            }
            fn insert(
                &self,
                rec: Record,
                events: Vec<Event>,
            ) -> BoxFuture<'_, Result<(), StoreError>> {
                let $this = self;
                Box::pin(async move { Ok($via::insert($target, rec, events).await?) })
            }
            fn save_chain(
                &self,
                rec: Record,
                expect_version: u64,
                events: Vec<Event>,
            ) -> BoxFuture<'_, Result<(), StoreError>> {
                let $this = self;
                Box::pin(async move {
                    Ok($via::save_chain($target, rec, expect_version, events).await?)
                })
            }
            fn set_account(
                &self,
                id: String,
                account_id: String,
                now: Time,
                events: Vec<Event>,
            ) -> BoxFuture<'_, Result<(), StoreError>> {
                let $this = self;
                Box::pin(async move {
                    Ok($via::set_account($target, id, account_id, now, events).await?)
                })
            }
            fn merge(
                &self,
                from: String,
                from_version: u64,
                merged: Record,
                expect_version: u64,
                events: Vec<Event>,
            ) -> BoxFuture<'_, Result<(), StoreError>> {
                let $this = self;
                Box::pin(async move {
                    Ok($via::merge($target, from, from_version, merged, expect_version, events)
                        .await?)
                })
            }
            fn sync_sites(
                &self,
                id: String,
                sites: Vec<Site>,
                now: Time,
            ) -> BoxFuture<'_, Result<Vec<Event>, StoreError>> {
                let $this = self;
                Box::pin(async move { Ok($via::sync_sites($target, id, sites, now).await?) })
            }
            fn delete(&self, id: String, now: Time) -> BoxFuture<'_, Result<bool, StoreError>> {
                let $this = self;
                Box::pin(async move { Ok($via::delete($target, id, now).await?) })
            }
            fn check_writable(&self) -> BoxFuture<'_, Result<(), StoreError>> {
                let $this = self;
                Box::pin(async move { Ok($via::check_writable($target).await?) })
            }
        }
    };
    (@ |$this:ident| $target:expr, $via:ident) => {};
    (@shared |$this:ident| $target:expr, $via:ident) => {
        fn shared(&self) -> bool {
            true
        }
        fn claim(
            &self,
            id: String,
            holder: String,
            lease: Duration,
        ) -> BoxFuture<'_, Result<Option<Fence>, StoreError>> {
            let $this = self;
            Box::pin(async move { Ok($via::claim($target, id, holder, lease).await?) })
        }
        fn renew(
            &self,
            id: String,
            fence: Fence,
            lease: Duration,
        ) -> BoxFuture<'_, Result<Option<Fence>, StoreError>> {
            let $this = self;
            Box::pin(async move { Ok($via::renew($target, id, fence, lease).await?) })
        }
        fn release(&self, id: String, fence: Fence) -> BoxFuture<'_, Result<bool, StoreError>> {
            let $this = self;
            Box::pin(async move { Ok($via::release($target, id, fence).await?) })
        }
        fn save_chain_fenced(
            &self,
            rec: Record,
            expect_version: u64,
            fence: Fence,
            events: Vec<Event>,
        ) -> BoxFuture<'_, Result<(), StoreError>> {
            let $this = self;
            Box::pin(async move {
                Ok($via::save_chain_fenced($target, rec, expect_version, fence, events).await?)
            })
        }
        fn claim_holder(
            &self,
            id: String,
        ) -> BoxFuture<'_, Result<Option<ClaimHolder>, StoreError>> {
            let $this = self;
            Box::pin(async move { Ok($via::claim_holder($target, id).await?) })
        }
    };
}
pub(crate) use delegate_store;

delegate_store!(Ledger => |ledger| ledger, via Ledger, load: load_one);
delegate_store!(PgLedger => |ledger| ledger, via PgLedger, load: load_one, shared);

/// The provider, as the engine uses it. Every failure arrives classified
/// ([`ProviderError`]): the engine never looks at HTTP.
pub trait TokenEndpoint: Send + Sync + 'static {
    /// Presents a refresh token.
    fn refresh<'a>(
        &'a self,
        refresh_token: &'a Secret,
    ) -> BoxFuture<'a, Result<Grant, ProviderError>>;
    /// Exchanges a consent code.
    fn exchange_code<'a>(&'a self, code: &'a Secret)
    -> BoxFuture<'a, Result<Grant, ProviderError>>;
    /// The sites an access token reaches.
    fn accessible_resources<'a>(
        &'a self,
        access_token: &'a Secret,
        now: Time,
    ) -> BoxFuture<'a, Result<Vec<Site>, ProviderError>>;
    /// The account behind an access token; `Ok(None)` when the provider will not say.
    fn me<'a>(
        &'a self,
        access_token: &'a Secret,
    ) -> BoxFuture<'a, Result<Option<Account>, ProviderError>>;
    /// Why no call can be made (missing credentials), if so.
    fn not_configured(&self) -> Option<String>;
    /// The app's client id: with the account, a chain's identity.
    fn client_id(&self) -> &str;
    /// The scopes a new connection asks for.
    fn scopes(&self) -> Vec<String>;
    /// The consent URL for a `state`, and the redirect URI it returns to.
    fn authorize_url(&self, state: &str) -> (String, String);
    /// The base URL of a product API on a site.
    fn api_base_url(&self, product: &str, cloud_id: &str) -> String;
}

impl TokenEndpoint for Atlassian {
    fn refresh<'a>(
        &'a self,
        refresh_token: &'a Secret,
    ) -> BoxFuture<'a, Result<Grant, ProviderError>> {
        Box::pin(Atlassian::refresh(self, refresh_token))
    }
    fn exchange_code<'a>(
        &'a self,
        code: &'a Secret,
    ) -> BoxFuture<'a, Result<Grant, ProviderError>> {
        Box::pin(Atlassian::exchange_code(self, code))
    }
    fn accessible_resources<'a>(
        &'a self,
        access_token: &'a Secret,
        now: Time,
    ) -> BoxFuture<'a, Result<Vec<Site>, ProviderError>> {
        Box::pin(Atlassian::accessible_resources(self, access_token, now))
    }
    fn me<'a>(
        &'a self,
        access_token: &'a Secret,
    ) -> BoxFuture<'a, Result<Option<Account>, ProviderError>> {
        Box::pin(Atlassian::me(self, access_token))
    }
    fn not_configured(&self) -> Option<String> {
        Atlassian::not_configured(self)
    }
    fn client_id(&self) -> &str {
        Atlassian::client_id(self)
    }
    fn scopes(&self) -> Vec<String> {
        self.config().scopes.clone()
    }
    fn authorize_url(&self, state: &str) -> (String, String) {
        (
            Atlassian::authorize_url(self, state),
            self.config().redirect_uri.to_string(),
        )
    }
    fn api_base_url(&self, product: &str, cloud_id: &str) -> String {
        Atlassian::api_base_url(self, product, cloud_id)
    }
}

/// Wall-clock time. Deadlines inside the process use `tokio::time::Instant`; wall time is
/// what the ledger stores and the provider's rules (leeway, inactivity) are stated in.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> Time;
}

/// The system's clock: the daemon's.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Time {
        chrono::Utc::now()
    }
}

/// Wall time that moves with tokio's clock, so that paused time (unit tests, the
/// simulation) moves it too: `start` plus the tokio time elapsed since it was made. Tests
/// only (the daemon runs on [`SystemClock`]).
#[cfg(test)]
pub struct TokioClock {
    start: Time,
    origin: tokio::time::Instant,
}

#[cfg(test)]
impl TokioClock {
    /// A clock reading `start` now.
    pub fn new(start: Time) -> TokioClock {
        TokioClock {
            start,
            origin: tokio::time::Instant::now(),
        }
    }
}

#[cfg(test)]
impl Clock for TokioClock {
    fn now(&self) -> Time {
        self.start + chrono::Duration::from_std(self.origin.elapsed()).unwrap_or_default()
    }
}
