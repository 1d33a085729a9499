//! [`AnyLedger`]: the SQLite or the PostgreSQL ledger, for what the daemon does with its
//! ledger beyond the engine's `Store` seam (the audit trail, the events route, housekeeping).
//! One `match` per operation, no SQL.

use super::{Ledger, LedgerError, PgError, PgLedger};
use crate::model::{Event, StoredEvent, Time};

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
    /// newest `keep`, in small transactions; returns how many.
    pub async fn maintain(&self, before: Time, keep: usize) -> Result<usize, AnyError> {
        match self {
            AnyLedger::Sqlite(l) => Ok(l.maintain(before, keep).await?),
            AnyLedger::Postgres(l) => Ok(l.maintain(before, keep).await?),
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
