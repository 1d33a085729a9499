//! The PostgreSQL ledger: the same connections, sites, events and sealed tokens as the
//! SQLite ledger, shared by several daemons, plus the claims that fence their refreshes.
//!
//! Every operation is one transaction on a connection of a pool (`deadpool-postgres`, sized
//! by the daemon: [`pool_size_for`]),
//! with the SQLite ledger's semantics: chain writes are compare-and-swaps on
//! `chain_version` (`Conflict`), a used label is `LabelTaken`, events are appended in the
//! write's own transaction, tokens are sealed by [`super::seal`] with the same key and
//! associated data (`tokend:<id>:<column>`), so one key file opens the rows of both ledgers.
//!
//! Nothing here holds a session across transactions: no session advisory lock, no `SET`
//! outside `SET LOCAL`, no statement prepared across transactions. So it works behind a
//! transaction-mode pooler (PgBouncer `pool_mode=transaction`). Migrations run once, inside
//! one transaction holding `pg_advisory_xact_lock`; a schema newer than this build is
//! refused.
//!
//! **Claims** (the `claims` table): a chain's refresh is leased to one holder (a daemon's
//! `node_name`) until an expiry computed by the database's clock, never a daemon's. Every
//! claim makes the row's `version` grow; that version is the [`Fence`]. A commit with a
//! fence ([`PgLedger::save_chain_fenced`]) lands only while the claim is still held with
//! that fence and unexpired, so a holder whose lease lapsed (paused, partitioned) can never
//! commit over the one that took over.
//!
//! **Architecture Invariant:** no error of this module carries a secret: a server error is
//! reported by its message and SQLSTATE only (its DETAIL can quote a row), and the URL is
//! never quoted.

mod listen;
mod tls;

use super::seal::{self, KeySource, Keyring};
use super::{
    CHAIN_COLUMNS, CONNECTION_COLUMNS, COUNT_CHECKS_PER_TX, MAINTENANCE_TX_BUDGET, Maintained,
    PRUNE_BATCH, join_scopes, ms,
};
use crate::model::{Event, EventKind, Record, Site, StoredEvent, Time};
use crate::secret::Secret;
use chrono::Utc;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::future::BoxFuture;
use parking_lot::RwLock;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::types::ToSql;

pub use listen::Change;
pub use tls::{PASSWORD_PLACEHOLDER, SslMode, with_password_placeholder};

/// Connections kept open to the server until the daemon sizes the pool
/// ([`PgLedger::size_pool`]): what a tool such as `migrate-ledger` or a test needs.
const POOL_SIZE: usize = 4;

/// The fewest pooled connections a daemon keeps ([`pool_size_for`]): the audit writer, a
/// job and a couple of refreshes never wait on each other.
const POOL_MIN: usize = 4;

/// The most pooled connections one daemon opens, whatever `refresh.max_concurrent` says.
/// A storm of refreshes is bound by the server's WAL flushes, and PostgreSQL flushes the
/// commits of every backend waiting when one flushes: more concurrent committers put more
/// commits into one flush (measured on the outside bench's storm: 4 connections 171
/// rotations/s, see BENCHMARKS.md). Capped because PostgreSQL's default `max_connections`
/// is 100 for every daemon on the ledger: three daemons at 16 plus their `LISTEN`
/// connections take 51, leaving room for a fourth daemon, `migrate-ledger` and an admin.
const POOL_MAX: usize = 16;

/// The pool a daemon with `max_concurrent` refresh permits needs: one connection per
/// refresh that may be committing at once (each holds one only for one transaction), plus
/// one for the audit writer and the jobs, within [`POOL_MIN`]..=[`POOL_MAX`].
pub(crate) fn pool_size_for(max_concurrent: usize) -> usize {
    max_concurrent.saturating_add(1).clamp(POOL_MIN, POOL_MAX)
}

/// How long an operation waits for a pooled connection, or to open one.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest one operation (its whole transaction) may take. Past it the outcome is
/// unknown and reported `Unavailable`, as a lost connection is: the engine reloads the chain
/// before its next write, so an unknown outcome is never guessed.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// How long opening a connection may take, when the URL does not say (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a transaction's commit waits for the server's WAL flush. A refresh storm is
/// bound by those flushes (BENCHMARKS.md, PostgreSQL), so only the writes that must survive
/// a server crash wait for one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flush {
    /// `synchronous_commit = on`: durable when the commit returns (every chain, connection,
    /// site and event write).
    Wait,
    /// `synchronous_commit = off`: visible to every other session at once, durable a moment
    /// later. Only for a claim's release, whose loss in a crash is harmless: the claim just
    /// lapses at its expiry. Not for a claim itself: a claim lost in a server crash leaves
    /// the row at the version before it, so the same holder's next claim is granted that
    /// very version again, and the lost claim's late release (its fence now matching) would
    /// free the new claim mid-request, letting another daemon present the same refresh token
    /// (two refreshes of one chain). Nor for a renewal: the request it covers goes out right
    /// after it.
    Lazy,
    /// Reads only: no commit record to flush.
    Read,
}

/// The server-side bounds of one operation's transaction (`SET LOCAL`, so they end with it
/// and never leak into a pooled session). The client's [`OPERATION_TIMEOUT`] alone cannot
/// free the server: a daemon stopped (SIGSTOP, a paused VM) inside a transaction would hold
/// its row locks, and block the chain on every daemon, for ever. These make the server end
/// such a transaction itself.
struct Limits {
    /// The client's bound on the whole operation; past it the outcome is unknown.
    whole: Duration,
    /// `lock_timeout`: a row another holder keeps locked is given up on well before the
    /// whole operation's bound, so the error is a definite "not done".
    lock: Duration,
    /// `statement_timeout`: no single statement outlives the operation.
    statement: Duration,
    /// `idle_in_transaction_session_timeout`: a client that stops talking mid-transaction
    /// (stopped, partitioned) has its transaction rolled back and its locks freed by the
    /// server once the operation could no longer succeed anyway.
    idle: Duration,
}

/// Every ordinary operation: locks 3 s, statements 8 s, idle 10 s, all within
/// [`OPERATION_TIMEOUT`].
const OPERATION_LIMITS: Limits = Limits {
    whole: OPERATION_TIMEOUT,
    lock: Duration::from_secs(OPERATION_TIMEOUT.as_secs() * 3 / 10),
    statement: Duration::from_secs(OPERATION_TIMEOUT.as_secs() * 8 / 10),
    idle: OPERATION_TIMEOUT,
};

/// The migration and key check (and re-seal of every row on a key rotation) at start: it may
/// wait for another daemon's migration (the advisory lock) and rewrite every row, so it gets
/// longer than one operation; a daemon that stops inside it is still cut off after
/// [`OPERATION_TIMEOUT`] of silence.
const MIGRATION_LIMITS: Limits = Limits {
    whole: Duration::from_secs(120),
    lock: Duration::from_secs(90),
    statement: Duration::from_secs(100),
    idle: OPERATION_TIMEOUT,
};

/// TCP keepalive idle time, when the URL does not say (`keepalives_idle`): a server that
/// vanished without a FIN (a partition, a dead host) is noticed on an idle pooled
/// connection in under a minute instead of the kernel's two hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// TCP keepalive probe interval, when the URL does not say (`keepalives_interval`).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Unacknowledged keepalive probes before the connection is dropped, when the URL does not
/// say (`keepalives_retries`).
const KEEPALIVE_RETRIES: u32 = 3;

/// `tcp_user_timeout`, when the URL does not say: sent data left unacknowledged this long
/// drops the connection, so a write into a partition fails rather than waiting for TCP's
/// retransmissions (minutes).
const TCP_USER_TIMEOUT: Duration = OPERATION_TIMEOUT;

/// The transaction-scoped advisory lock under which migrations and the key check run:
/// "tokend" in ASCII, so that it is recognisable in `pg_locks`.
const MIGRATION_LOCK: i64 = 0x746f_6b65_6e64;

/// The schema, one entry per version: entry `i` takes the database from version `i` to
/// `i + 1` (`tokend_schema.version`). Never edit a released entry: append a new one. Times
/// are milliseconds since the epoch, as in SQLite, except the claims' expiry, which only the
/// database's clock writes and compares.
#[doc(hidden)] // Public for tests that build databases of other versions.
pub const MIGRATIONS: &[&str] = &[
    // 1: the SQLite ledger's tables at its schema 4, and claims.
    r#"
    CREATE TABLE connections (
        id TEXT PRIMARY KEY,
        label TEXT NOT NULL,
        provider TEXT NOT NULL,
        client_id TEXT NOT NULL,
        account_id TEXT,
        status TEXT NOT NULL CHECK (status IN ('active', 'needs_reauth')),
        scopes TEXT NOT NULL,
        refresh_token TEXT NOT NULL,
        refresh_token_rotated_at BIGINT NOT NULL,
        previous_refresh_token TEXT,
        previous_rotated_at BIGINT,
        attempt_started_at BIGINT,
        access_token TEXT,
        access_token_expires_at BIGINT,
        consented_at BIGINT NOT NULL,
        last_refresh_at BIGINT,
        last_error_code TEXT,
        last_error_message TEXT,
        last_error_at BIGINT,
        consecutive_failures BIGINT NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        chain_version BIGINT NOT NULL DEFAULT 0,
        refresh_token_used_at BIGINT,
        CONSTRAINT connections_label_key UNIQUE (label)
    );
    CREATE UNIQUE INDEX connections_chain_identity
        ON connections (provider, client_id, account_id) WHERE account_id IS NOT NULL;
    CREATE TABLE sites (
        connection_id TEXT NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
        cloud_id TEXT NOT NULL,
        url TEXT NOT NULL,
        name TEXT NOT NULL,
        scopes TEXT NOT NULL,
        first_seen_at BIGINT NOT NULL,
        last_seen_at BIGINT NOT NULL,
        removed_at BIGINT,
        PRIMARY KEY (connection_id, cloud_id, url)
    );
    CREATE TABLE events (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at BIGINT NOT NULL,
        connection_id TEXT,
        kind TEXT NOT NULL,
        message TEXT NOT NULL,
        node TEXT,
        peer_uid BIGINT,
        peer_pid BIGINT,
        count BIGINT NOT NULL DEFAULT 1
    );
    CREATE INDEX events_by_connection ON events (connection_id, seq);
    CREATE INDEX events_by_connection_time ON events (connection_id, at);
    CREATE FUNCTION tokend_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'events are append-only';
    END
    $$;
    CREATE TRIGGER events_append_only BEFORE UPDATE ON events
        FOR EACH ROW EXECUTE FUNCTION tokend_events_append_only();
    CREATE TABLE keycheck (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        value TEXT NOT NULL
    );
    CREATE TABLE health (
        id INTEGER PRIMARY KEY,
        at BIGINT NOT NULL
    );
    CREATE TABLE claims (
        connection_id TEXT PRIMARY KEY REFERENCES connections (id) ON DELETE CASCADE,
        holder TEXT NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL,
        version BIGINT NOT NULL CHECK (version > 0)
    );
    "#,
    // 2: events by time alone, for maintenance's pruning in batches (oldest first).
    r#"
    CREATE INDEX events_by_time ON events (at, seq);
    "#,
    // 3: a connection's events newest first with their tie-breaker (the events route, and
    // housekeeping's count compaction), in the index itself; it replaces the (connection_id,
    // at) one, its prefix.
    r#"
    CREATE INDEX events_by_connection_time_seq ON events (connection_id, at, seq);
    DROP INDEX events_by_connection_time;
    "#,
    // 4: the site job's per-connection due time and lease, and the once-per-period claim of
    // the other jobs, so that several daemons split them instead of each doing all (both by
    // the database's clock only).
    r#"
    CREATE TABLE site_checks (
        connection_id TEXT PRIMARY KEY REFERENCES connections (id) ON DELETE CASCADE,
        next_at TIMESTAMPTZ NOT NULL,
        holder TEXT,
        lease_until TIMESTAMPTZ
    );
    CREATE INDEX site_checks_due ON site_checks (next_at);
    CREATE TABLE job_runs (
        job TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        last_run_at TIMESTAMPTZ NOT NULL
    );
    "#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// What can go wrong with the PostgreSQL ledger. No variant carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// `ledger.url` is not usable (never quoted: it may hold a password).
    #[error("ledger.url is not a usable PostgreSQL URL: {0}")]
    Url(String),
    /// The TLS setup (root certificates) failed.
    #[error("ledger.url TLS setup failed: {0}")]
    Tls(String),
    /// The database was migrated by a newer tokend.
    #[error(
        "the PostgreSQL ledger has schema version {found}, newer than this tokend understands ({supported}); run a newer tokend on every daemon"
    )]
    TooNew {
        /// `tokend_schema.version`.
        found: i32,
        /// [`SCHEMA_VERSION`].
        supported: i32,
    },
    /// The ledger's tokens were sealed with a key tokend was not given.
    #[error(
        "the PostgreSQL ledger was sealed with another key: {key_file} does not open it, nor does any of daemon.old_key_files; every daemon on one ledger needs the same key file (daemon.key_file)"
    )]
    WrongKey {
        /// The key that was tried.
        key_file: PathBuf,
    },
    /// A key file could not be read or created.
    #[error(transparent)]
    Key(#[from] seal::KeyError),
    /// A row could not be understood.
    #[error("ledger row is invalid: {0}")]
    Corrupt(String),
    /// A compare-and-swap failed: the chain (or its claim) moved, or the connection is gone.
    #[error("connection {0} changed concurrently; refusing to overwrite its chain")]
    Conflict(String),
    /// The label is already taken by another connection.
    #[error("the label {0:?} is already used by another connection")]
    LabelTaken(String),
    /// The server could not be reached or refused the statement.
    #[error("PostgreSQL ledger unavailable: {0}")]
    Unavailable(String),
    /// The server refused a value as data (SQLSTATE class 22, e.g. a NUL byte in a TEXT
    /// column): the same write fails the same way every time, so it is not "unavailable".
    /// Names what was refused and the SQLSTATE, never the value.
    #[error(
        "the PostgreSQL ledger refused {what} as malformed data (SQLSTATE {sqlstate}); retrying the same value cannot succeed"
    )]
    Refused {
        /// Which value (column or record kind), never the value itself.
        what: String,
        /// The server's SQLSTATE (class 22).
        sqlstate: String,
    },
}

/// `e` as a [`PgError`], a data exception (SQLSTATE class 22) as [`PgError::Refused`] naming
/// `what` (its message can quote the value, so it is not kept).
fn refused_as(what: &str) -> impl FnOnce(tokio_postgres::Error) -> PgError + '_ {
    move |e| match e.as_db_error() {
        Some(db) if db.code().code().starts_with("22") => PgError::Refused {
            what: what.to_owned(),
            sqlstate: db.code().code().to_owned(),
        },
        _ => e.into(),
    }
}

/// A server error as text without a secret: a server error by its severity, message and
/// SQLSTATE (never its DETAIL, which can quote a whole row), any other by its kind and cause.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> PgError {
        match e.as_db_error() {
            // A data exception's message can quote the value: only its code is kept.
            Some(db) if db.code().code().starts_with("22") => PgError::Refused {
                what: "a value".into(),
                sqlstate: db.code().code().to_owned(),
            },
            _ => PgError::Unavailable(describe(&e)),
        }
    }
}

impl From<deadpool_postgres::PoolError> for PgError {
    fn from(e: deadpool_postgres::PoolError) -> PgError {
        use deadpool_postgres::PoolError as P;
        PgError::Unavailable(match e {
            P::Backend(e) => describe(&e),
            P::Timeout(_) => "no connection to the server within the pool timeout".into(),
            other => other.to_string(),
        })
    }
}

/// A claim on a chain's refresh: who holds it, and the fencing version every write under it
/// carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The holder (a daemon's `node_name`).
    pub holder: String,
    /// The claim's version when it was granted: grows with every claim of the chain, so a
    /// write carrying an older one is refused.
    pub version: u64,
    /// How much of the lease was left when the database answered, by its own clock (a
    /// daemon subtracts it from its own monotonic clock, so clock skew does not matter).
    pub valid_for: Duration,
}

/// Who holds a chain's refresh claim right now, as `tokend show` reports it (read from the
/// `claims` table by [`PgLedger::claim_holder`]). Unlike a [`Fence`] it carries no version:
/// it is for people, never for a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimHolder {
    /// The holder's name (a daemon's `node_name` with its per-process suffix), so that an
    /// operator sees which daemon a refresh in flight is waiting on.
    pub holder: String,
    /// When the claim lapses unless its holder renews it (by the database's clock): past it
    /// another daemon may take the chain over.
    pub until: Time,
}

/// A cheap, cloneable handle on the PostgreSQL ledger.
///
/// Public outside the library, with [`PgLedger::connect`] and [`PgLedger::load_all`] only,
/// for `tests/it/migrate.rs`, which reads back what `migrate-ledger` wrote as a daemon would
/// (the records it answers are public for their fields, unnameable outside); every other
/// method is `pub(crate)`.
#[derive(Clone)]
pub struct PgLedger {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// Seals and opens every token column (the same keys as the SQLite ledger's).
    keys: Keyring,
    /// This daemon's name for the events it records (`daemon.node_name`), once set.
    node: RwLock<Option<String>>,
    /// Where [`PgLedger::listen`] opens its own connection (outside the pool).
    listen: listen::ListenTarget,
}

impl PgLedger {
    /// Connects to `url` (`sslmode` honoured, see `tls`), migrates the schema to
    /// `SCHEMA_VERSION` and checks (or, on a new database, records) the key. `keys` are
    /// the daemon's `daemon.key_file` / `old_key_files`; `state_dir` holds the default key
    /// file, created on first start as for SQLite (every daemon on one ledger needs the same
    /// key: a second one's own new key is refused as `PgError::WrongKey`).
    pub async fn connect(
        url: &str,
        keys: &KeySource,
        state_dir: &Path,
    ) -> Result<PgLedger, PgError> {
        let ledger = PgLedger::unmigrated(url, keys, state_dir)?;
        ledger.migrate_and_check_key().await?;
        Ok(ledger)
    }

    /// The pool and keys of [`PgLedger::connect`], without touching the database yet (no
    /// connection is opened until the first operation): `ledger::migrate` looks at the
    /// target before anything is written to it.
    pub(super) fn unmigrated(
        url: &str,
        keys: &KeySource,
        state_dir: &Path,
    ) -> Result<PgLedger, PgError> {
        let keys = Keyring::load(keys, state_dir)?;
        let mut target = tls::parse_url(url)?;
        if target.config.get_connect_timeout().is_none() {
            target.config.connect_timeout(CONNECT_TIMEOUT);
        }
        if target.config.get_application_name().is_none() {
            target.config.application_name("tokend");
        }
        if !target.gave("keepalives") {
            target.config.keepalives(true);
        }
        if !target.gave("keepalives_idle") {
            target.config.keepalives_idle(KEEPALIVE_IDLE);
        }
        if !target.gave("keepalives_interval") {
            target.config.keepalives_interval(KEEPALIVE_INTERVAL);
        }
        if !target.gave("keepalives_retries") {
            target.config.keepalives_retries(KEEPALIVE_RETRIES);
        }
        if !target.gave("tcp_user_timeout") {
            target.config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let (manager, tls) = if target.mode == SslMode::Disable {
            (
                Manager::from_config(target.config.clone(), tokio_postgres::NoTls, manager_config),
                None,
            )
        } else {
            let tls = tls::connector(&target)?;
            (
                Manager::from_config(target.config.clone(), tls.clone(), manager_config),
                Some(tls),
            )
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| PgError::Unavailable(e.to_string()))?;
        Ok(PgLedger {
            inner: Arc::new(Inner {
                pool,
                keys,
                node: RwLock::new(None),
                listen: listen::ListenTarget {
                    config: target.config.clone(),
                    tls,
                },
            }),
        })
    }

    /// A connection of the pool, for `ledger::migrate`'s own long transaction (a copy of a
    /// whole ledger is not bounded by [`OPERATION_TIMEOUT`]).
    pub(super) async fn pooled(&self) -> Result<deadpool_postgres::Object, PgError> {
        Ok(self.inner.pool.get().await?)
    }

    /// Sizes the pool to `size` connections (see [`pool_size_for`]); connections beyond it
    /// are closed as they come back.
    pub(crate) fn size_pool(&self, size: usize) {
        self.inner.pool.resize(size.max(1));
    }

    /// The keys this ledger seals and opens with.
    pub(super) fn keyring(&self) -> &Keyring {
        &self.inner.keys
    }

    /// Runs `f` in one transaction that writes (committed when it returns `Ok`), bounded by
    /// [`OPERATION_LIMITS`].
    async fn tx<R, F>(&self, f: F) -> Result<R, PgError>
    where
        F: TxFn<R>,
    {
        self.tx_within(&OPERATION_LIMITS, Flush::Wait, f).await
    }

    /// [`PgLedger::tx`] for a write whose loss in a server crash is harmless (a claim's
    /// release: see [`Flush::Lazy`]): its commit does not wait for the WAL flush.
    async fn lazy<R, F>(&self, f: F) -> Result<R, PgError>
    where
        F: TxFn<R>,
    {
        self.tx_within(&OPERATION_LIMITS, Flush::Lazy, f).await
    }

    /// [`PgLedger::tx`] for a transaction that only reads (the loads): its commit need not
    /// wait for the WAL flush.
    async fn read<R, F>(&self, f: F) -> Result<R, PgError>
    where
        F: TxFn<R>,
    {
        self.tx_within(&OPERATION_LIMITS, Flush::Read, f).await
    }

    /// [`PgLedger::tx`] under `limits`: the server-side timeouts first, then the commit's
    /// `synchronous_commit` as `flush` says (see [`DURABLE`]).
    /// A connection whose transaction was cut off by the client's bound is detached from the
    /// pool (closed), never recycled: it may still be inside the wedged transaction.
    async fn tx_within<R, F>(&self, limits: &Limits, flush: Flush, f: F) -> Result<R, PgError>
    where
        F: TxFn<R>,
    {
        let work = async {
            let mut held = Detach(Some(self.inner.pool.get().await?));
            let result = async {
                let client = held.0.as_mut().expect("held until the end");
                let tx = client.transaction().await?;
                // One round trip for every setting (the commit's flush too, see [`Flush`]).
                tx.batch_execute(&format!(
                    "SET LOCAL lock_timeout = '{}ms'; SET LOCAL statement_timeout = '{}ms'; \
                     SET LOCAL idle_in_transaction_session_timeout = '{}ms'{}",
                    limits.lock.as_millis(),
                    limits.statement.as_millis(),
                    limits.idle.as_millis(),
                    match flush {
                        Flush::Wait => DURABLE,
                        Flush::Lazy => "; SET LOCAL synchronous_commit = off",
                        Flush::Read => "",
                    }
                ))
                .await?;
                let out = f(&tx, &self.inner.keys).await?;
                tx.commit().await?;
                Ok(out)
            }
            .await;
            // Finished either way (the connection is in a known state): back to the pool.
            held.release();
            result
        };
        tokio::time::timeout(limits.whole, work)
            .await
            .unwrap_or_else(|_| {
                Err(PgError::Unavailable(format!(
                    "no answer within {}s; the outcome is unknown",
                    limits.whole.as_secs()
                )))
            })
    }

    /// Tests only: a connection's `refresh_token` column as stored (sealed), for the
    /// semantics tests that check sealing at rest.
    #[cfg(test)]
    pub(crate) async fn stored_refresh_token(&self, id: &str) -> String {
        let client = self.inner.pool.get().await.unwrap();
        client
            .query_one(
                "SELECT refresh_token FROM connections WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Tests only: overwrites a connection's stored `refresh_token` column.
    #[cfg(test)]
    pub(crate) async fn overwrite_stored_refresh_token(&self, id: &str, value: &str) {
        let client = self.inner.pool.get().await.unwrap();
        client
            .execute(
                "UPDATE connections SET refresh_token = $1 WHERE id = $2",
                &[&value, &id],
            )
            .await
            .unwrap();
    }

    pub(super) async fn migrate_and_check_key(&self) -> Result<(), PgError> {
        self.tx_within(&MIGRATION_LIMITS, Flush::Wait, |tx, keys| {
            Box::pin(async move {
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                    .await?;
                // Read before any DDL: a daemon whose schema is current needs only read and
                // write rights on the tables, never CREATE on the schema.
                let exists: bool = tx
                    .query_one("SELECT to_regclass('tokend_schema') IS NOT NULL", &[])
                    .await?
                    .try_get(0)?;
                let found: i32 = if exists {
                    tx.query_opt("SELECT version FROM tokend_schema WHERE id = 1", &[])
                        .await?
                        .map(|r| r.try_get(0))
                        .transpose()?
                        .unwrap_or(0)
                } else {
                    0
                };
                if found > SCHEMA_VERSION {
                    return Err(PgError::TooNew {
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                if found == SCHEMA_VERSION {
                    return check_key(tx, keys).await;
                }
                if !exists {
                    tx.batch_execute(
                        "CREATE TABLE tokend_schema (
                             id INTEGER PRIMARY KEY CHECK (id = 1),
                             version INTEGER NOT NULL
                         )",
                    )
                    .await?;
                }
                for (i, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
                    tx.batch_execute(sql).await?;
                    tracing::info!(version = i + 1, "PostgreSQL ledger migrated");
                }
                tx.execute(
                    "INSERT INTO tokend_schema (id, version) VALUES (1, $1) \
                     ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                    &[&SCHEMA_VERSION.max(found)],
                )
                .await?;
                check_key(tx, keys).await
            })
        })
        .await
    }

    /// Every connection with its chain and sites (removed sites excluded), from one snapshot,
    /// in label order.
    pub async fn load_all(&self) -> Result<Vec<Record>, PgError> {
        self.read(|tx, keys| {
            Box::pin(async move {
                // One snapshot for both statements: no site of a connection inserted between
                // them.
                tx.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    .await?;
                // In label order as Rust orders strings (bytes: the "C" collation, not
                // the database's), the engine's listing order, which it then builds by
                // appending each row, not by inserting it in place.
                let rows = tx
                    .query(
                        &format!(
                            "SELECT {CONNECTION_COLUMNS} FROM connections ORDER BY label COLLATE \"C\""
                        ),
                        &[],
                    )
                    .await?;
                // Opening the tokens is most of the cost: on several threads.
                let mut records = super::parallel::map(rows.iter().collect(), |r| {
                    row_to_record(r, keys)
                })?;
                let sites = tx
                    .query(
                        &format!("SELECT connection_id, {SITE_COLUMNS} FROM sites WHERE removed_at IS NULL ORDER BY connection_id, url, cloud_id"),
                        &[],
                    )
                    .await?;
                // By id through a map: a search of every record per site row was quadratic
                // (10^10 comparisons at 100,000 connections, at start and at every re-read).
                let at: std::collections::HashMap<String, usize> = records
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (r.conn.id.clone(), i))
                    .collect();
                for s in &sites {
                    let id: &str = s.try_get(0)?;
                    if let Some(&i) = at.get(id) {
                        // Room for exactly one more, as the SQLite load does: a pushed-to
                        // `Vec` shrunk afterwards leaves its tail as a hole in the heap.
                        let sites = &mut records[i].conn.sites;
                        sites.reserve_exact(1);
                        sites.push(row_to_site(s, 1)?);
                    }
                }
                Ok(records)
            })
        })
        .await
    }

    /// [`PgLedger::load_all`] as one batch, with the number of connections (the engine's
    /// `Store::load_batches`: the rows arrive from the server at once, so there is nothing
    /// to overlap).
    pub(crate) async fn load_batches(
        &self,
        sink: tokio::sync::mpsc::Sender<(usize, Vec<Record>)>,
    ) -> Result<(), PgError> {
        let all = self.load_all().await?;
        // A closed sink: nobody listens any more.
        let _ = sink.send((all.len(), all)).await;
        Ok(())
    }

    /// One connection with its chain and sites, or `None`.
    pub(crate) async fn load_one(&self, id: String) -> Result<Option<Record>, PgError> {
        self.read(move |tx, keys| {
            Box::pin(async move {
                tx.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    .await?;
                let Some(row) = tx
                    .query_opt(
                        &format!("SELECT {CONNECTION_COLUMNS} FROM connections WHERE id = $1"),
                        &[&id],
                    )
                    .await?
                else {
                    return Ok(None);
                };
                let mut rec = row_to_record(&row, keys)?;
                rec.conn.sites = load_sites(tx, &id).await?;
                Ok(Some(rec))
            })
        })
        .await
    }

    /// Inserts a new connection with its first events (`LabelTaken` when the label is used).
    pub(crate) async fn insert(&self, rec: Record, events: Vec<Event>) -> Result<(), PgError> {
        let node = self.node();
        self.tx(move |tx, keys| {
            Box::pin(async move {
                let taken = tx
                    .query_opt(
                        "SELECT id FROM connections WHERE label = $1",
                        &[&rec.conn.label],
                    )
                    .await?;
                if taken.is_some() {
                    return Err(PgError::LabelTaken(rec.conn.label.clone()));
                }
                let values = record_values(&rec, keys);
                let params: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| v.as_sql()).collect();
                let placeholders = (1..=values.len())
                    .map(|i| format!("${i}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                tx.execute(
                    &format!(
                        "INSERT INTO connections ({CONNECTION_COLUMNS}) VALUES ({placeholders})"
                    ),
                    &params,
                )
                .await
                .map_err(|e| {
                    // A concurrent insert of the same label, between our check and this row.
                    match e.as_db_error() {
                        Some(db) if db.constraint() == Some("connections_label_key") => {
                            PgError::LabelTaken(rec.conn.label.clone())
                        }
                        _ => refused_as("a connection row")(e),
                    }
                })?;
                write_sites(tx, &rec.conn.id, &rec.conn.sites, rec.conn.updated_at).await?;
                record_change(
                    tx,
                    &rec.conn.id,
                    rec.conn.updated_at,
                    &events,
                    node.as_deref(),
                )
                .await
            })
        })
        .await
    }

    /// Commits a change of a connection's chain and appends events, only while the stored
    /// chain is at `expect_version` (see the SQLite ledger's `save_chain`).
    pub(crate) async fn save_chain(
        &self,
        rec: Record,
        expect_version: u64,
        events: Vec<Event>,
    ) -> Result<(), PgError> {
        self.save_chain_under(rec, expect_version, None, events)
            .await
    }

    /// [`PgLedger::save_chain`], and only while `fence` still holds the chain's claim,
    /// unexpired by the database's clock; else `Conflict`.
    pub(crate) async fn save_chain_fenced(
        &self,
        rec: Record,
        expect_version: u64,
        fence: Fence,
        events: Vec<Event>,
    ) -> Result<(), PgError> {
        self.save_chain_under(rec, expect_version, Some(fence), events)
            .await
    }

    /// [`PgLedger::save_chain`], under `fence` if any.
    async fn save_chain_under(
        &self,
        rec: Record,
        expect_version: u64,
        fence: Option<Fence>,
        events: Vec<Event>,
    ) -> Result<(), PgError> {
        let node = self.node();
        // A chain written with an attempt marker is not announced: the other daemons do not
        // take a chain under another daemon's running attempt into memory anyway
        // (`refresh::shared`), so each would read it for nothing; its commit is announced.
        // A marker left behind (its daemon died) reaches them at the periodic re-read or
        // when they next claim the chain, which reloads it.
        let changed = rec
            .chain
            .attempt_started_at
            .is_none()
            .then(|| rec.conn.id.clone());
        self.tx(move |tx, keys| {
            Box::pin(async move {
                let id = rec.conn.id.clone();
                if let Some(fence) = &fence {
                    // The connection row first, then the claim, the order a delete takes them
                    // in (its cascade reaches the claim last): two such transactions never
                    // deadlock.
                    tx.execute("SELECT 1 FROM connections WHERE id = $1 FOR UPDATE", &[&id])
                        .await?;
                    // The claim row is locked until commit: no takeover can slip in between
                    // this check and the write.
                    let held = tx
                        .query_opt(
                            "SELECT 1 FROM claims WHERE connection_id = $1 AND holder = $2 \
                             AND version = $3 AND expires_at > clock_timestamp() FOR UPDATE",
                            &[&id, &fence.holder, &(fence.version as i64)],
                        )
                        .await?;
                    if held.is_none() {
                        return Err(PgError::Conflict(id));
                    }
                }
                if update_row(tx, keys, &rec, expect_version).await? == 0 {
                    return Err(PgError::Conflict(id));
                }
                // No `pg_notify` in here: see `announce_after`.
                append_events(tx, Some(&id), rec.conn.updated_at, &events, node.as_deref()).await
            })
        })
        .await?;
        if let Some(id) = changed {
            self.announce_after(id, self.node());
        }
        Ok(())
    }

    /// Tells the other daemons that chain `id` changed, once its write has committed, in a
    /// transaction of its own that does not wait for the WAL flush, on a task of its own.
    ///
    /// A chain write (a marker, a rotation: two per refresh) does not notify inside its own
    /// transaction, because PostgreSQL serialises the commits of notifying transactions (a
    /// database-wide lock from before the commit record until after its WAL flush): every
    /// durable chain write would wait for a flush of its own, one at a time, and a storm
    /// would run at the disk's `fdatasync` rate over two (BENCHMARKS.md, PostgreSQL). A lazy
    /// transaction holds that lock for no flush. What this gives up: a crash (or a lost
    /// connection) between the write and its notification loses the notification, as a
    /// listener that was not connected loses one; the periodic re-read makes it up. Other
    /// daemons never rely on a notification for safety (an attempt reloads the chain under
    /// its claim).
    fn announce_after(&self, id: String, node: Option<String>) {
        let ledger = self.clone();
        tokio::spawn(async move {
            let sent = ledger
                .lazy(move |tx, _keys| {
                    Box::pin(async move { announce(tx, &id, node.as_deref()).await })
                })
                .await;
            if let Err(e) = sent {
                tracing::debug!(error = %e, "cannot notify the other daemons of a chain write; their periodic re-read takes it");
            }
        });
    }

    /// Records the account behind a connection and appends events.
    pub(crate) async fn set_account(
        &self,
        id: String,
        account_id: String,
        now: Time,
        events: Vec<Event>,
    ) -> Result<(), PgError> {
        let node = self.node();
        self.tx(move |tx, _keys| {
            Box::pin(async move {
                let n = tx
                    .execute(
                        "UPDATE connections SET account_id = $1, updated_at = $2 WHERE id = $3",
                        &[&account_id, &ms(now), &id],
                    )
                    .await
                    .map_err(refused_as("account_id"))?;
                if n == 0 {
                    return Err(PgError::Conflict(id));
                }
                record_change(tx, &id, now, &events, node.as_deref()).await
            })
        })
        .await
    }

    /// Moves the chain of `from` into `merged` and deletes `from` (see the SQLite ledger's
    /// `merge`).
    pub(crate) async fn merge(
        &self,
        from: String,
        from_version: u64,
        merged: Record,
        expect_version: u64,
        events: Vec<Event>,
    ) -> Result<(), PgError> {
        let node = self.node();
        self.tx(move |tx, keys| {
            Box::pin(async move {
                let deleted = tx
                    .execute(
                        "DELETE FROM connections WHERE id = $1 AND chain_version = $2",
                        &[&from, &(from_version as i64)],
                    )
                    .await?;
                if deleted == 0 {
                    return Err(PgError::Conflict(from));
                }
                if update_row(tx, keys, &merged, expect_version).await? == 0 {
                    return Err(PgError::Conflict(merged.conn.id.clone()));
                }
                let at = merged.conn.updated_at;
                let node = node.as_deref();
                append_events(
                    tx,
                    Some(&from),
                    at,
                    &[Event::new(
                        EventKind::Merged,
                        format!("chain moved into connection {}", merged.conn.id),
                    )],
                    node,
                )
                .await?;
                append_events(tx, Some(&merged.conn.id), at, &events, node).await?;
                announce(tx, &from, node).await?;
                announce(tx, &merged.conn.id, node).await
            })
        })
        .await
    }

    /// Replaces the sites of a connection; returns the events describing the changes
    /// (already appended).
    pub(crate) async fn sync_sites(
        &self,
        id: String,
        sites: Vec<Site>,
        now: Time,
    ) -> Result<Vec<Event>, PgError> {
        let node = self.node();
        self.tx(move |tx, _keys| {
            Box::pin(async move {
                // Two daemons syncing one connection's sites take turns, so that each change
                // is told once.
                tx.execute("SELECT 1 FROM connections WHERE id = $1 FOR UPDATE", &[&id])
                    .await?;
                let before = load_sites(tx, &id).await?;
                let (events, removed) = super::site_changes(&before, &sites);
                for b in removed {
                    tx.execute(
                        "UPDATE sites SET removed_at = $3 WHERE connection_id = $1 AND cloud_id = $2 \
                         AND url = $4 AND removed_at IS NULL",
                        &[&id, &b.cloud_id, &ms(now), &b.url],
                    )
                    .await?;
                }
                write_sites(tx, &id, &sites, now).await?;
                if events.is_empty() {
                    // Only `last_seen_at` moved: nothing another daemon holds in memory.
                    return Ok(events);
                }
                // Every change of the sites is told by an event: the other daemons reload
                // the connection's sites (their `?site=` index) when this commits.
                record_change(tx, &id, now, &events, node.as_deref()).await?;
                Ok(events)
            })
        })
        .await
    }

    /// Deletes a connection (its sites and claim go with it); false when there was none.
    pub(crate) async fn delete(&self, id: String, now: Time) -> Result<bool, PgError> {
        let node = self.node();
        self.tx(move |tx, _keys| {
            Box::pin(async move {
                let n = tx
                    .execute("DELETE FROM connections WHERE id = $1", &[&id])
                    .await?;
                if n > 0 {
                    let removed = Event::new(EventKind::Removed, "connection removed");
                    record_change(tx, &id, now, &[removed], node.as_deref()).await?;
                }
                Ok(n > 0)
            })
        })
        .await
    }

    /// Appends events without changing any row (tests only, as `Ledger::append`).
    #[cfg(test)]
    pub(crate) async fn append(
        &self,
        connection_id: Option<String>,
        now: Time,
        events: Vec<Event>,
    ) -> Result<(), PgError> {
        self.append_rows(
            events
                .into_iter()
                .map(|e| (connection_id.clone(), now, e))
                .collect(),
        )
        .await
    }

    /// Appends many events of many connections in one transaction (the audit trail's flush).
    pub(crate) async fn append_batch(
        &self,
        events: Vec<(String, Time, Event)>,
    ) -> Result<(), PgError> {
        self.append_rows(
            events
                .into_iter()
                .map(|(id, at, e)| (Some(id), at, e))
                .collect(),
        )
        .await
    }

    /// Appends each `(connection, at, event)` in one transaction.
    async fn append_rows(&self, rows: Vec<(Option<String>, Time, Event)>) -> Result<(), PgError> {
        let node = self.node();
        self.tx(move |tx, _keys| {
            Box::pin(async move {
                for (id, at, e) in &rows {
                    append_events(
                        tx,
                        id.as_deref(),
                        *at,
                        std::slice::from_ref(e),
                        node.as_deref(),
                    )
                    .await?;
                }
                Ok(())
            })
        })
        .await
    }

    /// Names the daemon in every event it records from now on (`daemon.node_name`).
    pub(crate) fn set_node(&self, name: &str) {
        *self.inner.node.write() = Some(name.to_owned());
    }

    fn node(&self) -> Option<String> {
        self.inner.node.read().clone()
    }

    /// The history of one connection, newest first: at most `limit` events, none before
    /// `since`.
    pub(crate) async fn events(
        &self,
        id: String,
        since: Option<Time>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, PgError> {
        self.read(move |tx, _keys| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        "SELECT at, kind, message, node, peer_uid, peer_pid, count FROM events \
                         WHERE connection_id = $1 AND at >= $2 ORDER BY at DESC, seq DESC LIMIT $3",
                        &[
                            &id,
                            &since.map_or(i64::MIN, ms),
                            &(limit.min(i64::MAX as usize) as i64),
                        ],
                    )
                    .await?;
                rows.iter().map(|r| Ok(super::decode_event(r)?)).collect()
            })
        })
        .await
    }

    /// Housekeeping: deletes events older than `before`, then every connection's events
    /// beyond its newest `keep`, [`PRUNE_BATCH`] at a time (one short transaction each, as
    /// the SQLite ledger's `maintain`); returns what it did. (Its row locks are on events
    /// nobody else writes: the engine's transactions do not wait for them.)
    pub(crate) async fn maintain(&self, before: Time, keep: usize) -> Result<Maintained, PgError> {
        let mut done = Maintained::default();
        loop {
            let started = tokio::time::Instant::now();
            let n = self
                .tx(move |tx, _keys| {
                    Box::pin(async move {
                        let n = tx
                            .execute(
                                "DELETE FROM events WHERE seq IN \
                                 (SELECT seq FROM events WHERE at < $1 ORDER BY at, seq LIMIT $2)",
                                &[&ms(before), &(PRUNE_BATCH as i64)],
                            )
                            .await?;
                        Ok(n as usize)
                    })
                })
                .await?;
            done.transaction(n, started.elapsed());
            if n < PRUNE_BATCH {
                break;
            }
        }
        let keep = keep.clamp(1, i64::MAX as usize) as i64;
        let mut after = String::new();
        loop {
            let started = tokio::time::Instant::now();
            let (n, next) = self
                .tx(move |tx, _keys| Box::pin(compact_counts(tx, after, keep)))
                .await?;
            done.transaction(n, started.elapsed());
            match next {
                Some(next) => after = next,
                None => return Ok(done.finish()),
            }
        }
    }

    /// Proves the ledger takes a write now.
    pub(crate) async fn check_writable(&self) -> Result<(), PgError> {
        self.tx(|tx, _keys| {
            Box::pin(async move {
                tx.execute(
                    "INSERT INTO health (id, at) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                    &[&ms(Utc::now())],
                )
                .await?;
                Ok(())
            })
        })
        .await
    }

    /// Listens for the changes other daemons commit (see [`listen`]): on a dedicated
    /// connection outside the pool, reconnecting by itself, until the receiver is dropped.
    /// Changes this daemon's node (set with [`PgLedger::set_node`] before) wrote are left
    /// out.
    pub(crate) fn listen(&self) -> tokio::sync::mpsc::Receiver<Change> {
        listen::start(self.inner.listen.clone(), self.node())
    }

    /// Claims the refresh of chain `id` for `holder` for `lease` (by the database's clock):
    /// granted when nobody holds it, its lease expired, or `holder` holds it already; the
    /// claim's version grows each time. `None` when another holder's lease runs; `Conflict`
    /// when there is no such connection. Durable when granted (not [`Flush::Lazy`], which
    /// says why): a claim's version is never given out twice.
    pub(crate) async fn claim(
        &self,
        id: String,
        holder: String,
        lease: Duration,
    ) -> Result<Option<Fence>, PgError> {
        self.tx(move |tx, _keys| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        &format!(
                            "INSERT INTO claims (connection_id, holder, expires_at, version) \
                             SELECT id, $2, clock_timestamp() + make_interval(secs => $3), 1 \
                             FROM connections WHERE id = $1 \
                             ON CONFLICT (connection_id) DO UPDATE SET holder = excluded.holder, \
                               expires_at = excluded.expires_at, version = claims.version + 1 \
                             WHERE claims.holder = excluded.holder OR claims.expires_at < clock_timestamp() \
                             RETURNING version, {LEFT_MS}"
                        ),
                        &[&id, &holder, &lease.as_secs_f64()],
                    )
                    .await?;
                if let Some(row) = row {
                    return Ok(Some(fence_of(&row, holder)));
                }
                let exists = tx
                    .query_opt("SELECT 1 FROM connections WHERE id = $1", &[&id])
                    .await?;
                match exists {
                    Some(_) => Ok(None),
                    None => Err(PgError::Conflict(id)),
                }
            })
        })
        .await
    }

    /// Extends the claim `fence` to `lease` from now, while nobody else claimed the chain
    /// since (even past its expiry: an unchanged version proves no other holder wrote).
    /// `None` when the fence no longer holds.
    pub(crate) async fn renew(
        &self,
        id: String,
        fence: Fence,
        lease: Duration,
    ) -> Result<Option<Fence>, PgError> {
        self.tx(move |tx, _keys| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        &format!(
                            "UPDATE claims SET expires_at = clock_timestamp() + make_interval(secs => $4) \
                             WHERE connection_id = $1 AND holder = $2 AND version = $3 \
                             AND expires_at > '-infinity' \
                             RETURNING version, {LEFT_MS}"
                        ),
                        &[
                            &id,
                            &fence.holder,
                            &(fence.version as i64),
                            &lease.as_secs_f64(),
                        ],
                    )
                    .await?;
                Ok(row.map(|r| fence_of(&r, fence.holder)))
            })
        })
        .await
    }

    /// Who holds chain `id`'s claim now (its lease not yet run out, by the database's clock),
    /// or `None` when nobody does (no refresh in flight anywhere) or there is no such
    /// connection. Read only, for `tokend show`.
    pub(crate) async fn claim_holder(&self, id: String) -> Result<Option<ClaimHolder>, PgError> {
        self.read(move |tx, _keys| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        "SELECT holder, (extract(epoch FROM expires_at) * 1000)::bigint \
                         FROM claims WHERE connection_id = $1 AND expires_at > clock_timestamp()",
                        &[&id],
                    )
                    .await?;
                Ok(row.map(|r| ClaimHolder {
                    holder: r.get(0),
                    until: super::from_ms(r.get(1)),
                }))
            })
        })
        .await
    }

    /// Gives the claim `fence` up, so that another holder may claim at once; false when it
    /// no longer held. The row stays, so the next claim's version still grows. Lazy
    /// ([`Flush::Lazy`]): a release lost in a server crash just lapses.
    pub(crate) async fn release(&self, id: String, fence: Fence) -> Result<bool, PgError> {
        self.lazy(move |tx, _keys| {
            Box::pin(async move {
                let n = tx
                    .execute(
                        "UPDATE claims SET expires_at = '-infinity' \
                         WHERE connection_id = $1 AND holder = $2 AND version = $3",
                        &[&id, &fence.holder, &(fence.version as i64)],
                    )
                    .await?;
                Ok(n > 0)
            })
        })
        .await
    }
}

/// One run of the site job on a shared ledger ([`PgLedger::begin_site_checks`]): when it
/// started by the database's clock, so that it claims only connections due by then (never
/// one it resolved itself during the run) and sets the next due time from it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SiteRun {
    /// `clock_timestamp()` at the run's start, in milliseconds since the epoch.
    started_ms: i64,
}

impl PgLedger {
    /// Starts a run of the site job: every active connection without a due time gets one
    /// (due at once), and the database's clock is read. Each daemon's run at the same cron
    /// tick then claims connections from the same queue.
    pub(crate) async fn begin_site_checks(&self) -> Result<SiteRun, PgError> {
        self.tx(|tx, _keys| {
            Box::pin(async move {
                // Only the missing rows (none, once every connection has one), in id order:
                // daemons starting their runs together insert in one order, so one waits
                // for the other's rows instead of deadlocking with it.
                tx.execute(
                    "INSERT INTO site_checks (connection_id, next_at) \
                     SELECT c.id, '-infinity' FROM connections c \
                     WHERE c.status = 'active' AND NOT EXISTS \
                       (SELECT 1 FROM site_checks s WHERE s.connection_id = c.id) \
                     ORDER BY c.id \
                     ON CONFLICT (connection_id) DO NOTHING",
                    &[],
                )
                .await?;
                let row = tx
                    .query_one(
                        "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                        &[],
                    )
                    .await?;
                Ok(SiteRun {
                    started_ms: row.get(0),
                })
            })
        })
        .await
    }

    /// Claims up to `n` active connections whose site resolution was due when `run`
    /// started and that nobody holds (or whose holder's lease lapsed: a daemon that died
    /// mid-batch), for this daemon's node for `lease` (database clock). Rows another
    /// daemon's claim has locked are skipped, not waited for, so daemons claiming at once
    /// split the queue.
    pub(crate) async fn claim_site_checks(
        &self,
        run: SiteRun,
        n: usize,
        lease: Duration,
    ) -> Result<Vec<String>, PgError> {
        let holder = self.node().unwrap_or_default();
        self.tx(move |tx, _keys| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        "UPDATE site_checks SET holder = $1, \
                           lease_until = clock_timestamp() + make_interval(secs => $2) \
                         WHERE connection_id IN ( \
                           SELECT s.connection_id FROM site_checks s \
                           WHERE s.next_at <= to_timestamp($3::double precision / 1000) \
                             AND (s.lease_until IS NULL OR s.lease_until < clock_timestamp()) \
                             AND EXISTS (SELECT 1 FROM connections c \
                                         WHERE c.id = s.connection_id AND c.status = 'active') \
                           ORDER BY s.next_at LIMIT $4 FOR UPDATE OF s SKIP LOCKED) \
                         RETURNING connection_id",
                        &[
                            &holder,
                            &lease.as_secs_f64(),
                            &(run.started_ms as f64),
                            &(n.min(i64::MAX as usize) as i64),
                        ],
                    )
                    .await?;
                Ok(rows.iter().map(|r| r.get(0)).collect())
            })
        })
        .await
    }

    /// Marks the connections `ids` this daemon claimed in `run` as resolved: due again
    /// `again` after the run's start, lease given up. A row whose lease lapsed and that
    /// another daemon claimed meanwhile is left to it.
    pub(crate) async fn finish_site_checks(
        &self,
        run: SiteRun,
        ids: Vec<String>,
        again: Duration,
    ) -> Result<(), PgError> {
        let holder = self.node().unwrap_or_default();
        self.tx(move |tx, _keys| {
            Box::pin(async move {
                tx.execute(
                    "UPDATE site_checks SET \
                       next_at = to_timestamp($2::double precision / 1000) + make_interval(secs => $3), \
                       holder = NULL, lease_until = NULL \
                     WHERE connection_id = ANY($1) AND holder = $4",
                    &[&ids, &(run.started_ms as f64), &again.as_secs_f64(), &holder],
                )
                .await?;
                Ok(())
            })
        })
        .await
    }

    /// Claims this period's run of job `job` for this daemon's node: true when no daemon
    /// ran it within `gap` (database clock), and then it is recorded as this daemon's run.
    /// The first daemon to ask in a period runs the job; the others, asking within `gap`,
    /// are refused.
    pub(crate) async fn claim_job(&self, job: &str, gap: Duration) -> Result<bool, PgError> {
        let (job, holder) = (job.to_owned(), self.node().unwrap_or_default());
        self.tx(move |tx, _keys| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        "INSERT INTO job_runs (job, holder, last_run_at) \
                         VALUES ($1, $2, clock_timestamp()) \
                         ON CONFLICT (job) DO UPDATE SET holder = excluded.holder, \
                           last_run_at = excluded.last_run_at \
                         WHERE job_runs.last_run_at <= clock_timestamp() - make_interval(secs => $3) \
                         RETURNING 1",
                        &[&job, &holder, &gap.as_secs_f64()],
                    )
                    .await?;
                Ok(row.is_some())
            })
        })
        .await
    }
}

/// The body of one transaction: given the transaction and the keys, a future borrowing both.
/// (A boxed future, so that a closure can name its lifetime; `Send`, as every operation's
/// future must be.)
/// One transaction of housekeeping's count compaction, as the SQLite ledger's: the
/// connections with events after `after` in id order, each one's events beyond its newest
/// `keep` deleted, until [`PRUNE_BATCH`] rows, [`COUNT_CHECKS_PER_TX`] connections or
/// [`MAINTENANCE_TX_BUDGET`]. Returns the rows deleted and where to go on (`None`: done).
async fn compact_counts(
    tx: &deadpool_postgres::Transaction<'_>,
    after: String,
    keep: i64,
) -> Result<(usize, Option<String>), PgError> {
    let started = tokio::time::Instant::now();
    let mut cursor = after;
    let mut deleted = 0;
    for _ in 0..COUNT_CHECKS_PER_TX {
        let next: Option<String> = tx
            .query_one(
                "SELECT min(connection_id) FROM events WHERE connection_id > $1",
                &[&cursor],
            )
            .await?
            .get(0);
        let Some(id) = next else {
            return Ok((deleted, None));
        };
        // The oldest event kept: the `keep`-th newest.
        let oldest_kept = tx
            .query_opt(
                "SELECT at, seq FROM events WHERE connection_id = $1 \
                 ORDER BY at DESC, seq DESC LIMIT 1 OFFSET $2",
                &[&id, &(keep - 1)],
            )
            .await?;
        if let Some(row) = oldest_kept {
            let (at, seq): (i64, i64) = (row.get(0), row.get(1));
            let room = PRUNE_BATCH - deleted;
            let n = tx
                .execute(
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events \
                     WHERE connection_id = $1 AND (at, seq) < ($2, $3) \
                     ORDER BY at, seq LIMIT $4)",
                    &[&id, &at, &seq, &(room as i64)],
                )
                .await? as usize;
            deleted += n;
            if n == room {
                // Maybe more of this one: the next transaction looks at it again.
                return Ok((deleted, Some(cursor)));
            }
        }
        cursor = id;
        if started.elapsed() >= MAINTENANCE_TX_BUDGET {
            break;
        }
    }
    Ok((deleted, Some(cursor)))
}

trait TxFn<R>:
    for<'t> FnOnce(
        &'t deadpool_postgres::Transaction<'t>,
        &'t Keyring,
    ) -> BoxFuture<'t, Result<R, PgError>>
    + Send
{
}

impl<R, F> TxFn<R> for F where
    F: for<'t> FnOnce(
            &'t deadpool_postgres::Transaction<'t>,
            &'t Keyring,
        ) -> BoxFuture<'t, Result<R, PgError>>
        + Send
{
}

/// Checks the key against the stored check value (recording it on a new ledger) and
/// re-seals every row not sealed under the current key (a rotation), under the migration
/// lock.
async fn check_key(tx: &deadpool_postgres::Transaction<'_>, keys: &Keyring) -> Result<(), PgError> {
    let check: Option<String> = tx
        .query_opt("SELECT value FROM keycheck WHERE id = 1", &[])
        .await?
        .map(|r| r.get(0));
    if let Some(c) = check.as_deref()
        && keys.verify(c).is_none()
    {
        return Err(PgError::WrongKey {
            key_file: keys.key_file().to_path_buf(),
        });
    }
    if check.is_some() && !keys.has_old_keys() {
        return Ok(());
    }
    let rows = tx
        .query(
            "SELECT id, refresh_token, previous_refresh_token, access_token FROM connections FOR UPDATE",
            &[],
        )
        .await?;
    let mut resealed = 0;
    for row in rows {
        let id: String = row.get(0);
        let Some((rt, prev, access)) = super::reseal_tokens(
            keys,
            &id,
            &row.get::<_, String>(1),
            row.get::<_, Option<String>>(2).as_deref(),
            row.get::<_, Option<String>>(3).as_deref(),
        )
        .map_err(PgError::Corrupt)?
        else {
            continue;
        };
        tx.execute(
            "UPDATE connections SET refresh_token = $1, previous_refresh_token = $2, access_token = $3 WHERE id = $4",
            &[&rt, &prev, &access, &id],
        )
        .await?;
        resealed += 1;
    }
    tx.execute(
        "INSERT INTO keycheck (id, value) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET value = excluded.value",
        &[&keys.check_value()],
    )
    .await?;
    if resealed > 0 {
        tracing::info!(
            connections = resealed,
            key_file = %keys.key_file().display(),
            "re-sealed the PostgreSQL ledger under key_file; daemon.old_key_files can go once every daemon on this ledger runs with the new key_file (README: rotating the key)"
        );
    }
    Ok(())
}

/// `expires_at - clock_timestamp()` in milliseconds, as the claim statements return it.
const LEFT_MS: &str = "(extract(epoch FROM (expires_at - clock_timestamp())) * 1000)::bigint";

fn fence_of(row: &tokio_postgres::Row, holder: String) -> Fence {
    Fence {
        holder,
        version: row.get::<_, i64>(0).max(0) as u64,
        valid_for: Duration::from_millis(row.get::<_, i64>(1).max(0) as u64),
    }
}

/// Appends `events` to connection `id` and tells the other daemons it changed: the end of
/// every write of a connection's row.
async fn record_change(
    tx: &deadpool_postgres::Transaction<'_>,
    id: &str,
    at: Time,
    events: &[Event],
    node: Option<&str>,
) -> Result<(), PgError> {
    append_events(tx, Some(id), at, events, node).await?;
    announce(tx, id, node).await
}

/// Tells the other daemons, when this transaction commits, that connection `id` changed.
async fn announce(
    tx: &deadpool_postgres::Transaction<'_>,
    id: &str,
    node: Option<&str>,
) -> Result<(), PgError> {
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&listen::CHANNEL, &listen::payload(id, node)],
    )
    .await?;
    Ok(())
}

/// Makes a transaction's commit wait for the server's WAL flush whatever the server's
/// default: a rotated token is durable when the commit returns. (`SET LOCAL`: it ends with
/// the transaction, so nothing leaks into a pooled session.)
const DURABLE: &str = "; SET LOCAL synchronous_commit = on";

/// The pooled connection of one transaction: detached from the pool (closed) when dropped
/// without [`Detach::release`], as when the operation's timeout drops it mid-transaction.
struct Detach(Option<deadpool_postgres::Object>);

impl Detach {
    /// The transaction finished (committed, rolled back or failed): the connection may be
    /// reused.
    fn release(&mut self) {
        self.0.take();
    }
}

impl Drop for Detach {
    fn drop(&mut self) {
        if let Some(object) = self.0.take() {
            drop(deadpool_postgres::Object::take(object));
        }
    }
}

/// A column value of a connection row.
enum Value {
    Text(String),
    OptText(Option<String>),
    Int(i64),
    OptInt(Option<i64>),
}

impl Value {
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Value::Text(v) => v,
            Value::OptText(v) => v,
            Value::Int(v) => v,
            Value::OptInt(v) => v,
        }
    }
}

/// The row of a record in [`CONNECTION_COLUMNS`]' order, its tokens sealed.
fn record_values(rec: &Record, keys: &Keyring) -> Vec<Value> {
    let c = &rec.conn;
    let ch = &rec.chain;
    let sealed =
        |column: &str, token: &Secret| keys.seal(token.expose(), &seal::aad(&c.id, column));
    vec![
        Value::Text(c.id.clone()),
        Value::Text(c.label.clone()),
        Value::Text(c.provider.to_string()),
        Value::Text(c.client_id.to_string()),
        Value::OptText(c.account_id.clone()),
        Value::Text(c.status.as_str().to_owned()),
        Value::Text(join_scopes(&c.scopes)),
        Value::Text(sealed("refresh_token", &ch.refresh_token)),
        Value::Int(ms(ch.rotated_at)),
        Value::OptText(
            ch.previous
                .as_deref()
                .map(|(s, _)| sealed("previous_refresh_token", s)),
        ),
        Value::OptInt(ch.previous.as_deref().map(|(_, t)| ms(*t))),
        Value::OptInt(ch.attempt_started_at.map(ms)),
        Value::OptText(ch.access.as_ref().map(|a| sealed("access_token", &a.token))),
        Value::OptInt(ch.access.as_ref().map(|a| ms(a.expires_at))),
        Value::Int(ms(c.consented_at)),
        Value::OptInt(c.last_refresh_at.map(ms)),
        Value::OptText(c.last_error.as_ref().map(|e| e.code.clone())),
        Value::OptText(c.last_error.as_ref().map(|e| e.message.clone())),
        Value::OptInt(c.last_error.as_ref().map(|e| ms(e.at))),
        Value::Int(c.consecutive_failures as i64),
        Value::Int(ms(c.created_at)),
        Value::Int(ms(c.updated_at)),
        Value::Int(ch.version as i64),
        Value::Int(ms(ch.used_at)),
    ]
}

/// Overwrites the chain columns of `rec`'s row while its `chain_version` is
/// `expect_version`; returns the number of rows changed.
async fn update_row(
    tx: &deadpool_postgres::Transaction<'_>,
    keys: &Keyring,
    rec: &Record,
    expect_version: u64,
) -> Result<u64, PgError> {
    let values = record_values(rec, keys);
    let (sql, bound) = super::chain_update(CHAIN_COLUMNS, '$').map_err(PgError::Corrupt)?;
    let expect = expect_version as i64;
    let mut params: Vec<&(dyn ToSql + Sync)> = bound.iter().map(|&i| values[i].as_sql()).collect();
    params.push(&rec.conn.id);
    params.push(&expect);
    Ok(tx.execute(&sql, &params).await?)
}

fn row_to_record(r: &tokio_postgres::Row, keys: &Keyring) -> Result<Record, PgError> {
    super::decode_record(r, keys)?.map_err(PgError::Corrupt)
}

const SITE_COLUMNS: &str = "cloud_id, url, name, scopes, last_seen_at";

/// A site from [`SITE_COLUMNS`] starting at column `at` (a column of another type is an
/// error, not a panic).
fn row_to_site(r: &tokio_postgres::Row, at: usize) -> Result<Site, PgError> {
    Ok(super::decode_site(r, at)?)
}

async fn load_sites(
    tx: &deadpool_postgres::Transaction<'_>,
    id: &str,
) -> Result<Vec<Site>, PgError> {
    let rows = tx
        .query(
            &format!(
                "SELECT {SITE_COLUMNS} FROM sites WHERE connection_id = $1 AND removed_at IS NULL \
                 ORDER BY url, cloud_id"
            ),
            &[&id],
        )
        .await?;
    rows.iter().map(|r| row_to_site(r, 0)).collect()
}

async fn write_sites(
    tx: &deadpool_postgres::Transaction<'_>,
    id: &str,
    sites: &[Site],
    now: Time,
) -> Result<(), PgError> {
    for s in sites {
        tx.execute(
            "INSERT INTO sites (connection_id, cloud_id, url, name, scopes, first_seen_at, last_seen_at, removed_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, NULL) \
             ON CONFLICT (connection_id, cloud_id, url) DO UPDATE SET \
               name = excluded.name, scopes = excluded.scopes, \
               last_seen_at = excluded.last_seen_at, removed_at = NULL",
            &[
                &id,
                &s.cloud_id,
                &s.url,
                &s.name,
                &join_scopes(&s.scopes),
                &ms(now),
                &ms(s.last_seen_at),
            ],
        )
        .await
        .map_err(refused_as("a site (cloud_id, url, name or scopes)"))?;
    }
    Ok(())
}

async fn append_events(
    tx: &deadpool_postgres::Transaction<'_>,
    id: Option<&str>,
    now: Time,
    events: &[Event],
    node: Option<&str>,
) -> Result<(), PgError> {
    for e in events {
        let kind = e.kind.to_string();
        tx.execute(
            "INSERT INTO events (at, connection_id, kind, message, node, peer_uid, peer_pid, count) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &ms(now),
                &id,
                &kind,
                &e.message,
                &node,
                &e.peer.map(|p| i64::from(p.uid)),
                &e.peer.and_then(|p| p.pid).map(i64::from),
                &i64::from(e.count),
            ],
        )
        .await
        .map_err(refused_as("an event"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
