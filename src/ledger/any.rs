//! [`AnyLedger`]: the SQLite or the PostgreSQL ledger, for what the daemon does with its
//! ledger beyond the engine's `Store` seam (the audit trail, the events route, housekeeping,
//! and which daemon of a shared ledger runs which part of a cron job).
//! One `match` per operation, no SQL.

use super::{Ledger, LedgerError, Maintained, PgError, PgLedger, SiteRun};
use crate::model::{Event, StoredEvent, Time};
use std::time::Duration;

/// The daemon's ledger, whichever `ledger.url` chose. Cheap to clone.
#[derive(Clone)]
pub enum AnyLedger {
    /// `<state_dir>/ledger.db`, written by this daemon alone.
    Sqlite(Ledger),
    /// A PostgreSQL database shared by several daemons.
    Postgres(PgLedger),
}

/// An error of either ledger (neither carries a secret).
#[derive(Debug, thiserror::Error)]
pub enum AnyError {
    #[error(transparent)]
    Sqlite(#[from] LedgerError),
    #[error(transparent)]
    Postgres(#[from] PgError),
}

impl AnyLedger {
    /// Appends many events of many connections in one transaction.
    pub async fn append_batch(&self, events: Vec<(String, Time, Event)>) -> Result<(), AnyError> {
        match self {
            AnyLedger::Sqlite(l) => Ok(l.append_batch(events).await?),
            AnyLedger::Postgres(l) => Ok(l.append_batch(events).await?),
        }
    }

    /// The history of one connection, newest first.
    pub async fn events(
        &self,
        id: String,
        since: Option<Time>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, AnyError> {
        match self {
            AnyLedger::Sqlite(l) => Ok(l.events(id, since, limit).await?),
            AnyLedger::Postgres(l) => Ok(l.events(id, since, limit).await?),
        }
    }

    /// Housekeeping: deletes events older than `before` and each connection's beyond its
    /// newest `keep`, in small transactions; returns what it did.
    pub async fn maintain(&self, before: Time, keep: usize) -> Result<Maintained, AnyError> {
        match self {
            AnyLedger::Sqlite(l) => Ok(l.maintain(before, keep).await?),
            AnyLedger::Postgres(l) => Ok(l.maintain(before, keep).await?),
        }
    }

    /// Starts a run of the site job. `None` on SQLite (one daemon: it resolves every active
    /// connection itself, as it always did); on PostgreSQL the run whose connections are
    /// claimed with [`AnyLedger::claim_site_checks`].
    pub async fn begin_site_checks(&self) -> Result<Option<SiteRun>, AnyError> {
        match self {
            AnyLedger::Sqlite(_) => Ok(None),
            AnyLedger::Postgres(l) => Ok(Some(l.begin_site_checks().await?)),
        }
    }

    /// Claims up to `n` connections due in `run` for `lease` (a run only PostgreSQL starts).
    pub async fn claim_site_checks(
        &self,
        run: SiteRun,
        n: usize,
        lease: Duration,
    ) -> Result<Vec<String>, AnyError> {
        match self {
            AnyLedger::Sqlite(_) => Ok(Vec::new()),
            AnyLedger::Postgres(l) => Ok(l.claim_site_checks(run, n, lease).await?),
        }
    }

    /// Records the claimed connections `ids` of `run` as resolved, due again `again` after
    /// the run started.
    pub async fn finish_site_checks(
        &self,
        run: SiteRun,
        ids: Vec<String>,
        again: Duration,
    ) -> Result<(), AnyError> {
        match self {
            AnyLedger::Sqlite(_) => Ok(()),
            AnyLedger::Postgres(l) => Ok(l.finish_site_checks(run, ids, again).await?),
        }
    }

    /// Whether this daemon runs this period's `job`: always on SQLite (one daemon); on
    /// PostgreSQL only when no daemon ran it within `gap`.
    pub async fn claim_job(&self, job: &str, gap: Duration) -> Result<bool, AnyError> {
        match self {
            AnyLedger::Sqlite(_) => Ok(true),
            AnyLedger::Postgres(l) => Ok(l.claim_job(job, gap).await?),
        }
    }
}

impl From<Ledger> for AnyLedger {
    fn from(l: Ledger) -> AnyLedger {
        AnyLedger::Sqlite(l)
    }
}

impl From<PgLedger> for AnyLedger {
    fn from(l: PgLedger) -> AnyLedger {
        AnyLedger::Postgres(l)
    }
}
