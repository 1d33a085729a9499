//! The ledger: tokend's SQLite database of connections, sites and their history.
//!
//! This is the only module that knows SQL. It owns the schema and its migrations, opens the
//! database with WAL and `synchronous=FULL` (a committed rotation survives power loss), holds
//! an exclusive lock file so that only one daemon writes a state directory, and exposes a
//! handful of operations that each run in one transaction. Writes are group-committed
//! (`group`): one writer commits whatever queued meanwhile in one transaction, each write in
//! its own savepoint, and answers each caller after that commit. Reads have a connection of
//! their own, so that they do not wait behind a commit (WAL: a reader sees the last commit).
//!
//! **Architecture Invariant:** a rotated refresh token is committed here, and the commit has
//! returned, before any caller is handed the access token that came with it.
//!
//! **Architecture Invariant:** the `events` table is append-only (a trigger refuses updates)
//! and never holds a secret; only housekeeping deletes its oldest rows.

mod any;
mod group;
pub(crate) mod migrate;
mod parallel;
pub(crate) mod pg;
pub mod seal;

pub(crate) use any::{AnyError, AnyLedger};
/// Public for `tests/it/migrate.rs`, which reads a migrated PostgreSQL ledger back.
pub use pg::PgLedger;
pub(crate) use pg::{ClaimHolder, Fence, PgError, SiteRun};

use crate::model::{
    AccessToken, Chain, Connection, Event, EventKind, EventPeer, LastError, Record, Scopes,
    SharedStr, Site, Status, StoredEvent, Time,
};
use crate::secret::Secret;
use chrono::{TimeZone, Utc};
use parking_lot::Mutex;
use rusqlite::{OptionalExtension, TransactionBehavior, params};
use seal::Keyring;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a statement waits for a lock held by another connection (a backup tool, say)
/// before failing. Long enough to ride out `sqlite3 .backup`, short enough to surface a
/// stuck disk.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The WAL file is cut back to this size whenever the writer starts it over (after a
/// checkpoint that copied all of it): SQLite keeps a WAL file at its largest otherwise, and
/// one grown large (a migration's `VACUUM`, a bulk import) cost housekeeping's final
/// truncation 50 ms of holding the writer for 120 MB at 100k connections. Twice the WAL's
/// usual peak (SQLite checkpoints it at 1,000 pages of 4 KiB), so that a normal WAL is not
/// cut and grown again.
const JOURNAL_SIZE_LIMIT: i64 = 8 * 1024 * 1024;

/// Events deleted per transaction by housekeeping (both ledgers' `maintain`): a backlog of
/// millions is pruned in many short transactions, so that the ledger is never held for
/// longer than one small batch and the engine's commits get in between.
pub(crate) const PRUNE_BATCH: usize = 500;

/// Events one housekeeping statement deletes, at most: a transaction checks its
/// [`MAINTENANCE_TX_BUDGET`] between statements, so one statement is what it can overrun by
/// (with `secure_delete` and three indexes, some 10 µs a row on a shared 2-core machine).
pub(crate) const PRUNE_CHUNK: usize = 25;

/// How many connections' event counts one housekeeping transaction checks, at most.
pub(crate) const COUNT_CHECKS_PER_TX: usize = 64;

/// One housekeeping transaction stops once its statements have run this long (and commits
/// what it deleted): the engine's commits that queue meanwhile wait for it, so this (plus
/// one statement and the commit) is about what housekeeping holds the ledger for. At 2 ms
/// (and 50-row statements) the `maint` bench saw holds of 5–6.5 ms at p99 and up to 14 ms
/// on a shared 2-core machine, at 1 ms (and 25) 3.7–4.3 ms and up to 8 ms, in twice the
/// transactions and the same time overall.
pub(crate) const MAINTENANCE_TX_BUDGET: Duration = Duration::from_millis(1);

/// How many times housekeeping tries to truncate the WAL when a reader is in the way, and
/// how long it pauses (without holding the ledger) between tries: readers are one short
/// statement each, so a few tries over a second find a moment with none. A WAL left
/// untruncated is no fault (it is checkpointed, and reused from its start).
const TRUNCATE_TRIES: usize = 20;
const TRUNCATE_RETRY: Duration = Duration::from_millis(50);

/// What one run of housekeeping did: its log line, and what the `maint` bench reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Maintained {
    /// Events deleted.
    pub pruned: usize,
    /// Transactions it took.
    pub transactions: usize,
    /// The longest one of them held the ledger: on SQLite from its `BEGIN` to its
    /// `COMMIT`'s return (with whatever else the group writer's batch held, and the sync),
    /// on PostgreSQL its call, from taking a pooled connection to the `COMMIT`'s return.
    pub longest_hold: Duration,
    /// The 99th percentile of those holds.
    pub p99_hold: Duration,
    /// How long the final checkpoint held the SQLite ledger's writer, its longest try (zero
    /// on PostgreSQL, which checkpoints on its own).
    pub checkpoint: Duration,
    /// The final checkpoint's tries (SQLite).
    pub checkpoint_tries: usize,
    /// One of them truncated the WAL (SQLite; false when a reader was in the way of all).
    pub truncated: bool,
    /// Every transaction's hold, for the percentile.
    holds: Vec<Duration>,
}

impl Maintained {
    /// Counts one transaction that deleted `n` events and held the ledger for `held`.
    fn transaction(&mut self, n: usize, held: Duration) {
        self.pruned += n;
        self.transactions += 1;
        self.longest_hold = self.longest_hold.max(held);
        self.holds.push(held);
    }

    /// Done: the percentile from the holds.
    fn finish(mut self) -> Maintained {
        self.holds.sort_unstable();
        if let Some(last) = self.holds.len().checked_sub(1) {
            self.p99_hold = self.holds[last * 99 / 100];
        }
        self.holds = Vec::new();
        self
    }
}

/// The schema, one entry per version. Entry `i` takes a ledger from `user_version = i` to
/// `i + 1`. Never edit a released entry: append a new one.
#[doc(hidden)] // Public for the integration tests, which build ledgers of older versions.
pub const MIGRATIONS: &[&str] = &[
    // 1: connections, sites, events.
    r#"
    CREATE TABLE connections (
        id TEXT PRIMARY KEY,
        label TEXT NOT NULL UNIQUE,
        provider TEXT NOT NULL,
        client_id TEXT NOT NULL,
        account_id TEXT,
        status TEXT NOT NULL CHECK (status IN ('active', 'needs_reauth')),
        scopes TEXT NOT NULL,
        refresh_token TEXT NOT NULL,
        refresh_token_rotated_at INTEGER NOT NULL,
        previous_refresh_token TEXT,
        previous_rotated_at INTEGER,
        attempt_started_at INTEGER,
        access_token TEXT,
        access_token_expires_at INTEGER,
        consented_at INTEGER NOT NULL,
        last_refresh_at INTEGER,
        last_error_code TEXT,
        last_error_message TEXT,
        last_error_at INTEGER,
        consecutive_failures INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    ) STRICT;
    CREATE UNIQUE INDEX connections_chain_identity
        ON connections (provider, client_id, account_id) WHERE account_id IS NOT NULL;
    CREATE TABLE sites (
        connection_id TEXT NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
        cloud_id TEXT NOT NULL,
        url TEXT NOT NULL,
        name TEXT NOT NULL,
        scopes TEXT NOT NULL,
        first_seen_at INTEGER NOT NULL,
        last_seen_at INTEGER NOT NULL,
        removed_at INTEGER,
        PRIMARY KEY (connection_id, cloud_id, url)
    ) STRICT;
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        connection_id TEXT,
        kind TEXT NOT NULL,
        message TEXT NOT NULL
    ) STRICT;
    CREATE INDEX events_by_connection ON events (connection_id, seq);
    CREATE TRIGGER events_append_only BEFORE UPDATE ON events
    BEGIN
        SELECT RAISE(ABORT, 'events are append-only');
    END;
    "#,
    // 2: a chain version for compare-and-swap, and when the refresh token was last used.
    r#"
    ALTER TABLE connections ADD COLUMN chain_version INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE connections ADD COLUMN refresh_token_used_at INTEGER;
    UPDATE connections SET refresh_token_used_at = refresh_token_rotated_at;
    "#,
    // 3: the key check value of the sealed token columns (see `seal`).
    r#"
    CREATE TABLE keycheck (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        value TEXT NOT NULL
    ) STRICT;
    "#,
    // 4: who caused an event (token reads), how many it folds, which daemon recorded it.
    r#"
    ALTER TABLE events ADD COLUMN node TEXT;
    ALTER TABLE events ADD COLUMN peer_uid INTEGER;
    ALTER TABLE events ADD COLUMN peer_pid INTEGER;
    ALTER TABLE events ADD COLUMN count INTEGER NOT NULL DEFAULT 1;
    CREATE INDEX events_by_connection_time ON events (connection_id, at);
    "#,
    // 5: events by time alone (with the rowid, `seq`), for housekeeping's pruning by age in
    // small batches, oldest first.
    r#"
    CREATE INDEX events_by_time ON events (at);
    "#,
];

/// The schema version this build writes.
pub(crate) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// What can go wrong with the ledger.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LedgerError {
    /// The state directory or database file could not be created or opened.
    #[error("cannot open ledger {path}: {source}")]
    Open {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another process holds the state directory's lock.
    #[error(
        "another tokend is already using the state directory {0} (lock file held); only one daemon may write a ledger"
    )]
    Locked(PathBuf),
    /// The ledger was written by a newer tokend.
    #[error(
        "ledger {path} has schema version {found}, newer than this tokend understands ({supported}); run a newer tokend or restore a backup"
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its `user_version`.
        found: i64,
        /// [`SCHEMA_VERSION`].
        supported: i64,
    },
    /// The ledger's tokens were sealed with a key tokend was not given.
    #[error(
        "the ledger {path} was sealed with another key: {key_file} does not open it, nor does any of daemon.old_key_files; configure the key it was sealed with (daemon.key_file), or list that key in daemon.old_key_files to rotate to a new one"
    )]
    WrongKey {
        /// The database file.
        path: PathBuf,
        /// The key that was tried.
        key_file: PathBuf,
    },
    /// A key file could not be read or created.
    #[error(transparent)]
    Key(#[from] seal::KeyError),
    /// A row could not be understood (a corrupt or hand-edited ledger).
    #[error("ledger row is invalid: {0}")]
    Corrupt(String),
    /// A compare-and-swap on the refresh token failed: someone changed the chain under us.
    #[error("connection {0} changed concurrently; refusing to overwrite its chain")]
    Conflict(String),
    /// The label is already taken by another connection.
    #[error("the label {0:?} is already used by another connection")]
    LabelTaken(String),
    /// SQLite failed (full disk, I/O error, ...).
    #[error("ledger write failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The blocking task running the statement died.
    #[error("ledger task failed: {0}")]
    Task(String),
}

/// A cheap, cloneable handle on the ledger. Statements run on tokio's blocking pool.
#[derive(Clone)]
pub(crate) struct Ledger {
    inner: Arc<Inner>,
}

struct Inner {
    /// The connection that writes: the group-commit writer's (`group`), and maintenance's.
    /// It holds the `temp.node` table that names this daemon in the events it writes.
    db: Mutex<rusqlite::Connection>,
    /// The connection that reads (`query_only`). Its own, so that a read never waits behind
    /// a batch's statements and fsync: under a refresh storm the writer holds `db` almost
    /// all the time, and a read (a stale chain's reload, `events`) waited up to a whole
    /// batch for it. A reader sees the last commit, which every write's caller has seen
    /// return before it reads.
    reader: Mutex<rusqlite::Connection>,
    /// Writes waiting for the writer (`group`).
    queue: group::Queue,
    /// Tests only: transactions the writer ran, to tell a batch from one-by-one commits.
    #[cfg(test)]
    transactions: std::sync::atomic::AtomicU64,
    /// Seals and opens every token column.
    keys: Keyring,
    path: PathBuf,
    /// Held for the life of the daemon: an exclusive `flock` on `<state_dir>/tokend.lock`.
    _lock: File,
}

impl Ledger {
    /// Opens (creating if needed) `<state_dir>/ledger.db`, takes the state directory's lock,
    /// and migrates the schema to [`SCHEMA_VERSION`].
    pub fn open(state_dir: &Path, keys: &seal::KeySource) -> Result<Ledger, LedgerError> {
        let open_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LedgerError::Open { path, source }
        };
        if !state_dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(state_dir)
                .map_err(open_err(state_dir))?;
        }
        let lock = lock_state_dir(state_dir)?;
        // Under the lock: two daemons must not both create a first key.
        let keys = Keyring::load(keys, state_dir)?;
        let path = state_dir.join("ledger.db");
        // Create the file ourselves so it is 0600 from the first byte; SQLite gives the WAL
        // and shm files the same mode.
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(open_err(&path))?;
        let mut db = rusqlite::Connection::open(&path)?;
        let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o600));
        db.busy_timeout(BUSY_TIMEOUT)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.pragma_update(None, "foreign_keys", "ON")?;
        // Freed pages are zeroed: a rotated-away (or, before sealing, clear-text) token does
        // not linger in the file.
        db.pragma_update(None, "secure_delete", "ON")?;
        db.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)?;
        migrate(&mut db, &path)?;
        seal_at_rest(&mut db, &keys, &path)?;
        // This daemon's name for the events it records (see `set_node`).
        db.execute_batch("CREATE TEMP TABLE node (name TEXT NOT NULL);")?;
        let reader = rusqlite::Connection::open(&path)?;
        reader.busy_timeout(BUSY_TIMEOUT)?;
        reader.pragma_update(None, "query_only", "ON")?;
        reader.pragma_update(None, "cache_size", -READER_CACHE_KIB)?;
        Ok(Ledger {
            inner: Arc::new(Inner {
                db: Mutex::new(db),
                reader: Mutex::new(reader),
                queue: group::Queue::default(),
                #[cfg(test)]
                transactions: std::sync::atomic::AtomicU64::new(0),
                keys,
                path,
                _lock: lock,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Tests only: a connection's `refresh_token` column as stored (sealed), for the
    /// semantics tests that check sealing at rest.
    #[cfg(test)]
    pub async fn stored_refresh_token(&self, id: &str) -> String {
        let id = id.to_owned();
        self.call(move |db| {
            Ok(db.query_row(
                "SELECT refresh_token FROM connections WHERE id = ?1",
                [&id],
                |r| r.get(0),
            )?)
        })
        .await
        .unwrap()
    }

    /// Tests only: overwrites a connection's stored `refresh_token` column.
    #[cfg(test)]
    pub async fn overwrite_stored_refresh_token(&self, id: &str, value: &str) {
        let (id, value) = (id.to_owned(), value.to_owned());
        self.call(move |db| {
            Ok(db.execute(
                "UPDATE connections SET refresh_token = ?1 WHERE id = ?2",
                [&value, &id],
            )?)
        })
        .await
        .unwrap();
    }

    /// Runs `f` with the writing connection on the blocking pool, outside the writer's
    /// batches (maintenance, tests).
    async fn call<R, F>(&self, f: F) -> Result<R, LedgerError>
    where
        R: Send + 'static,
        F: FnOnce(&mut rusqlite::Connection) -> Result<R, LedgerError> + Send + 'static,
    {
        self.call_keys(move |db, _| f(db)).await
    }

    /// Runs `f` with the writing connection and the keys on the blocking pool.
    async fn call_keys<R, F>(&self, f: F) -> Result<R, LedgerError>
    where
        R: Send + 'static,
        F: FnOnce(&mut rusqlite::Connection, &Keyring) -> Result<R, LedgerError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut db = inner.db.lock();
            f(&mut db, &inner.keys)
        })
        .await
        .map_err(|e| LedgerError::Task(e.to_string()))?
    }

    /// Runs `f` with the reading connection and the keys on the blocking pool.
    async fn read<R, F>(&self, f: F) -> Result<R, LedgerError>
    where
        R: Send + 'static,
        F: FnOnce(&rusqlite::Connection, &Keyring) -> Result<R, LedgerError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let db = inner.reader.lock();
            f(&db, &inner.keys)
        })
        .await
        .map_err(|e| LedgerError::Task(e.to_string()))?
    }

    /// Runs `f` as one write: inside a savepoint of the writer's next transaction
    /// (`IMMEDIATE`), rolled back to it when `f` fails; returns once that transaction's
    /// `COMMIT` has (`group`).
    async fn write<R, F>(&self, f: F) -> Result<R, LedgerError>
    where
        R: Send + 'static,
        F: FnOnce(&rusqlite::Connection, &Keyring) -> Result<R, LedgerError> + Send + 'static,
    {
        group::write(&self.inner, f).await
    }

    /// Every connection with its chain and sites (removed sites excluded), from one snapshot
    /// ([`load_each`]).
    pub async fn load_all(&self) -> Result<Vec<Record>, LedgerError> {
        self.read(|db, keys| {
            let mut all = Vec::new();
            load_each(db, keys, &mut |total, batch| {
                if all.is_empty() {
                    all.reserve_exact(total);
                }
                all.extend(batch);
                true
            })?;
            Ok(all)
        })
        .await
    }

    /// [`Ledger::load_all`] handed to `sink` in batches as they are opened, in the same
    /// order, each with the number of connections in all: the engine installs a large ledger
    /// while the rest is still being read and opened. After an error, what was sent is to be
    /// thrown away; a closed `sink` ends the load early.
    pub async fn load_batches(
        &self,
        sink: tokio::sync::mpsc::Sender<(usize, Vec<Record>)>,
    ) -> Result<(), LedgerError> {
        self.read(move |db, keys| {
            load_each(db, keys, &mut |total, batch| {
                sink.blocking_send((total, batch)).is_ok()
            })
        })
        .await
    }

    /// One connection with its chain and sites, or `None`.
    pub async fn load_one(&self, id: String) -> Result<Option<Record>, LedgerError> {
        self.read(move |db, keys| {
            let rec = db
                .query_row(
                    &format!("SELECT {CONNECTION_COLUMNS} FROM connections WHERE id = ?1"),
                    [&id],
                    |r| row_to_record(r, keys),
                )
                .optional()?
                .transpose()?;
            match rec {
                Some(mut rec) => {
                    rec.conn.sites = load_sites(db, &rec.conn.id)?;
                    Ok(Some(rec))
                }
                None => Ok(None),
            }
        })
        .await
    }

    /// Inserts a new connection with its first events.
    pub async fn insert(&self, rec: Record, events: Vec<Event>) -> Result<(), LedgerError> {
        self.write(move |tx, keys| {
            let taken: Option<String> = tx
                .query_row(
                    "SELECT id FROM connections WHERE label = ?1",
                    [&rec.conn.label],
                    |r| r.get(0),
                )
                .optional()?;
            if taken.is_some() {
                return Err(LedgerError::LabelTaken(rec.conn.label.clone()));
            }
            tx.execute(
                &format!(
                    "INSERT INTO connections ({CONNECTION_COLUMNS}) VALUES ({})",
                    placeholders(CONNECTION_COLUMN_COUNT)
                ),
                rusqlite::params_from_iter(record_values(&rec, keys)),
            )?;
            write_sites(tx, &rec.conn.id, &rec.conn.sites, rec.conn.updated_at)?;
            append_events(tx, Some(&rec.conn.id), rec.conn.updated_at, &events)?;
            Ok(())
        })
        .await
    }

    /// Commits a change of a connection's chain (its tokens, status and failure record, not
    /// its identity, account or sites) and appends events, in one durable transaction, but
    /// only if the stored chain is still at `expect_version` (compare-and-swap): a stale
    /// writer can never replace a newer chain. `rec.chain.version` is what gets stored.
    pub async fn save_chain(
        &self,
        rec: Record,
        expect_version: u64,
        events: Vec<Event>,
    ) -> Result<(), LedgerError> {
        self.write(move |tx, keys| {
            if update_row(tx, keys, &rec, expect_version)? == 0 {
                return Err(LedgerError::Conflict(rec.conn.id.clone()));
            }
            append_events(tx, Some(&rec.conn.id), rec.conn.updated_at, &events)?;
            Ok(())
        })
        .await
    }

    /// Records the account behind a connection (only that column) and appends events.
    pub async fn set_account(
        &self,
        connection_id: String,
        account_id: String,
        now: Time,
        events: Vec<Event>,
    ) -> Result<(), LedgerError> {
        self.write(move |tx, _| {
            let n = tx.execute(
                "UPDATE connections SET account_id = ?1, updated_at = ?2 WHERE id = ?3",
                params![account_id, ms(now), connection_id],
            )?;
            if n == 0 {
                return Err(LedgerError::Conflict(connection_id));
            }
            append_events(tx, Some(&connection_id), now, &events)?;
            Ok(())
        })
        .await
    }

    /// Moves the chain of `from` (a connection just created by an import or a consent) into
    /// `into` (the existing connection of the same account) and deletes `from`, in one
    /// transaction, while `into`'s chain is still at `expect_version`. `merged` is the
    /// resulting record of `into`.
    pub async fn merge(
        &self,
        from: String,
        from_version: u64,
        merged: Record,
        expect_version: u64,
        events: Vec<Event>,
    ) -> Result<(), LedgerError> {
        self.write(move |tx, keys| {
            let deleted = tx.execute(
                "DELETE FROM connections WHERE id = ?1 AND chain_version = ?2",
                params![from, from_version as i64],
            )?;
            if deleted == 0 {
                return Err(LedgerError::Conflict(from));
            }
            if update_row(tx, keys, &merged, expect_version)? == 0 {
                return Err(LedgerError::Conflict(merged.conn.id.clone()));
            }
            append_events(
                tx,
                Some(&from),
                merged.conn.updated_at,
                &[Event::new(
                    EventKind::Merged,
                    format!("chain moved into connection {}", merged.conn.id),
                )],
            )?;
            append_events(tx, Some(&merged.conn.id), merged.conn.updated_at, &events)?;
            Ok(())
        })
        .await
    }

    /// Replaces the sites of a connection with what accessible-resources listed. A site no
    /// longer listed is kept with a `removed_at`; one listed again is revived. Returns the
    /// events describing the changes (already appended).
    pub async fn sync_sites(
        &self,
        connection_id: String,
        sites: Vec<Site>,
        now: Time,
    ) -> Result<Vec<Event>, LedgerError> {
        self.write(move |tx, _| {
            let before = load_sites(tx, &connection_id)?;
            let (events, removed) = site_changes(&before, &sites);
            for b in removed {
                tx.execute(
                    "UPDATE sites SET removed_at = ?3 WHERE connection_id = ?1 AND cloud_id = ?2 AND url = ?4 AND removed_at IS NULL",
                    params![connection_id, b.cloud_id, ms(now), b.url],
                )?;
            }
            write_sites(tx, &connection_id, &sites, now)?;
            append_events(tx, Some(&connection_id), now, &events)?;
            Ok(events)
        })
        .await
    }

    /// Deletes a connection (its sites go with it); the history keeps a `removed` event.
    /// Returns false when there was no such connection.
    pub async fn delete(&self, connection_id: String, now: Time) -> Result<bool, LedgerError> {
        self.write(move |tx, _| {
            let n = tx.execute("DELETE FROM connections WHERE id = ?1", [&connection_id])?;
            if n > 0 {
                append_events(
                    tx,
                    Some(&connection_id),
                    now,
                    &[Event::new(EventKind::Removed, "connection removed")],
                )?;
            }
            Ok(n > 0)
        })
        .await
    }

    /// Appends events without changing any row (tests only: the daemon's events come with
    /// the writes that caused them, or in the audit trail's `append_batch`).
    #[cfg(test)]
    pub async fn append(
        &self,
        connection_id: Option<String>,
        now: Time,
        events: Vec<Event>,
    ) -> Result<(), LedgerError> {
        self.write(move |tx, _| {
            append_events(tx, connection_id.as_deref(), now, &events)?;
            Ok(())
        })
        .await
    }

    /// Names the daemon in every event it records from now on (`daemon.node_name`).
    pub fn set_node(&self, name: &str) -> Result<(), LedgerError> {
        let db = self.inner.db.lock();
        db.execute("DELETE FROM temp.node", [])?;
        db.execute("INSERT INTO temp.node (name) VALUES (?1)", [name])?;
        Ok(())
    }

    /// Appends many events of many connections in one durable transaction (the audit trail's
    /// background flush): `(connection id, at, event)`.
    pub async fn append_batch(
        &self,
        events: Vec<(String, Time, Event)>,
    ) -> Result<(), LedgerError> {
        self.write(move |tx, _| {
            for (id, at, e) in &events {
                append_events(tx, Some(id), *at, std::slice::from_ref(e))?;
            }
            Ok(())
        })
        .await
    }

    /// The history of one connection, newest first: at most `limit` events, none before
    /// `since`.
    pub async fn events(
        &self,
        connection_id: String,
        since: Option<Time>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, LedgerError> {
        self.read(move |db, _| {
            let mut stmt = db.prepare(
                "SELECT at, kind, message, node, peer_uid, peer_pid, count FROM events \
                 WHERE connection_id = ?1 AND at >= ?2 ORDER BY at DESC, seq DESC LIMIT ?3",
            )?;
            let rows = stmt
                .query_map(
                    params![connection_id, since.map_or(i64::MIN, ms), limit as i64],
                    |r| decode_event(r),
                )?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    /// Housekeeping (the only deletion the history ever sees): deletes events older than
    /// `before`, then every connection's events beyond its newest `keep`, in transactions of
    /// at most [`PRUNE_BATCH`] rows and [`MAINTENANCE_TX_BUDGET`] of statements (oldest
    /// first, through `events_by_time` and `events_by_connection_time`), and checkpoints the
    /// WAL back into the database file.
    ///
    /// Its transactions go through the group writer like any write, so the engine's commits
    /// get in between. After each that deleted events a passive checkpoint on a connection of its own copies
    /// what it appended into the database file without holding the writer; so the WAL stays
    /// short, the writer's own checkpoint (SQLite's after a commit that leaves the WAL over
    /// 1,000 pages) does not fall on an engine's commit, and the final `TRUNCATE` (which
    /// holds the writer) has next to nothing left to copy.
    pub async fn maintain(&self, before: Time, keep: usize) -> Result<Maintained, LedgerError> {
        let mut done = Maintained::default();
        let checkpointer = self.checkpointer().await?;
        while self
            .housekeeping_tx(&mut done, &checkpointer, move |tx| {
                prune_old(tx, ms(before), MAINTENANCE_TX_BUDGET)
            })
            .await?
        {}
        let mut after = String::new();
        while let Some(next) = self
            .housekeeping_tx(&mut done, &checkpointer, move |tx| {
                compact_counts(tx, after, keep, MAINTENANCE_TX_BUDGET)
            })
            .await?
        {
            after = next;
        }
        // What is left in the WAL goes into the file without holding the writer; then the
        // WAL is truncated, which needs the writer and no reader in the WAL. A reader (a
        // chain's reload) is waited for by a retry after a pause, not by the busy handler
        // while holding the writer (its sleeps of 1, 2, 5, 10 ... ms held the writer for
        // 50 ms at 100k connections).
        checkpointer.passive().await?;
        for _ in 0..TRUNCATE_TRIES {
            done.checkpoint_tries += 1;
            let (busy, held) = self.call(truncate_wal).await?;
            done.checkpoint = done.checkpoint.max(held);
            if !busy {
                done.truncated = true;
                break;
            }
            tokio::time::sleep(TRUNCATE_RETRY).await;
        }
        Ok(done.finish())
    }

    /// One housekeeping transaction `f` (the events it deleted, and where to go on),
    /// counted in `done`, and the WAL it appended copied into the file by `checkpointer`.
    async fn housekeeping_tx<R, F>(
        &self,
        done: &mut Maintained,
        checkpointer: &Checkpointer,
        f: F,
    ) -> Result<R, LedgerError>
    where
        R: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> Result<(usize, R), LedgerError> + Send + 'static,
    {
        let (out, held) = group::write_held(&self.inner, move |tx, _| f(tx)).await;
        let (n, next) = out?;
        done.transaction(n, held);
        if n > 0 {
            checkpointer.passive().await?;
        }
        Ok(next)
    }

    /// A connection of housekeeping's own for its passive checkpoints.
    async fn checkpointer(&self) -> Result<Checkpointer, LedgerError> {
        let path = self.inner.path.clone();
        let db = tokio::task::spawn_blocking(move || {
            let db = rusqlite::Connection::open(&path)?;
            db.busy_timeout(BUSY_TIMEOUT)?;
            Ok::<_, LedgerError>(db)
        })
        .await
        .map_err(|e| LedgerError::Task(e.to_string()))??;
        Ok(Checkpointer(Arc::new(Mutex::new(db))))
    }

    /// Proves the ledger is writable: a write transaction that touches the database file.
    pub async fn check_writable(&self) -> Result<(), LedgerError> {
        self.write(|tx, _| {
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS health (id INTEGER PRIMARY KEY, at INTEGER NOT NULL) STRICT;",
            )?;
            tx.execute(
                "INSERT INTO health (id, at) VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                [ms(Utc::now())],
            )?;
            Ok(())
        })
        .await
    }
}

/// One transaction of housekeeping's age pruning: the oldest events before `before`
/// (`ms`), [`PRUNE_CHUNK`] a statement, until [`PRUNE_BATCH`] rows or `budget`
/// ([`MAINTENANCE_TX_BUDGET`]) of statements. Returns the rows deleted and whether there
/// may be more.
fn prune_old(
    tx: &rusqlite::Connection,
    before: i64,
    budget: Duration,
) -> Result<(usize, bool), LedgerError> {
    let started = Instant::now();
    let mut deleted = 0;
    while deleted < PRUNE_BATCH {
        let room = PRUNE_CHUNK.min(PRUNE_BATCH - deleted);
        let n = tx.execute(
            "DELETE FROM events WHERE seq IN \
             (SELECT seq FROM events WHERE at < ?1 ORDER BY at, seq LIMIT ?2)",
            params![before, room as i64],
        )?;
        deleted += n;
        if n < room {
            return Ok((deleted, false));
        }
        if started.elapsed() >= budget {
            break;
        }
    }
    Ok((deleted, true))
}

/// One transaction of housekeeping's count compaction: goes through the connections with
/// events after `after` (in id order, each found in O(log n) by the index), deleting each
/// one's events beyond its newest `keep` ([`PRUNE_CHUNK`] a statement), until
/// [`PRUNE_BATCH`] rows, [`COUNT_CHECKS_PER_TX`] connections or `budget`
/// ([`MAINTENANCE_TX_BUDGET`]). Returns the rows deleted and where to go on (`None`: done);
/// a connection with more to delete is visited again.
fn compact_counts(
    tx: &rusqlite::Connection,
    after: String,
    keep: usize,
    budget: Duration,
) -> Result<(usize, Option<String>), LedgerError> {
    let started = Instant::now();
    let keep = keep.clamp(1, i64::MAX as usize);
    let mut cursor = after;
    let mut deleted = 0;
    for _ in 0..COUNT_CHECKS_PER_TX {
        let next: Option<String> = tx.query_row(
            "SELECT min(connection_id) FROM events WHERE connection_id > ?1",
            [&cursor],
            |r| r.get(0),
        )?;
        let Some(id) = next else {
            return Ok((deleted, None));
        };
        // The oldest event kept: the `keep`-th newest.
        let oldest_kept: Option<(i64, i64)> = tx
            .query_row(
                "SELECT at, seq FROM events WHERE connection_id = ?1 \
                 ORDER BY at DESC, seq DESC LIMIT 1 OFFSET ?2",
                params![id, (keep - 1) as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((at, seq)) = oldest_kept {
            loop {
                let room = PRUNE_CHUNK.min(PRUNE_BATCH - deleted);
                let n = tx.execute(
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events \
                     WHERE connection_id = ?1 AND (at < ?2 OR (at = ?2 AND seq < ?3)) \
                     ORDER BY at, seq LIMIT ?4)",
                    params![id, at, seq, room as i64],
                )?;
                deleted += n;
                if n < room {
                    break;
                }
                if deleted == PRUNE_BATCH || started.elapsed() >= budget {
                    // Maybe more of this one: the next transaction looks at it again.
                    return Ok((deleted, Some(cursor)));
                }
            }
        }
        cursor = id;
        if started.elapsed() >= budget {
            break;
        }
    }
    Ok((deleted, Some(cursor)))
}

/// Checkpoints the whole WAL into the database file and truncates it, unless a reader or
/// another checkpoint is in the way (then it copies what it can and says busy): it does not
/// wait for them. Returns busy and how long it held the writing connection `db`.
fn truncate_wal(db: &mut rusqlite::Connection) -> Result<(bool, Duration), LedgerError> {
    db.busy_timeout(Duration::ZERO)?;
    let started = Instant::now();
    let busy = db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        r.get::<_, i64>(0)
    });
    let held = started.elapsed();
    db.busy_timeout(BUSY_TIMEOUT)?;
    Ok((busy? != 0, held))
}

/// Housekeeping's own connection, for passive checkpoints: they copy the WAL into the
/// database file while the writer goes on (a passive checkpoint takes no writer lock and
/// waits for nobody; a busy one just copies less).
struct Checkpointer(Arc<Mutex<rusqlite::Connection>>);

impl Checkpointer {
    async fn passive(&self) -> Result<(), LedgerError> {
        let db = self.0.clone();
        tokio::task::spawn_blocking(move || {
            db.lock()
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
            Ok(())
        })
        .await
        .map_err(|e| LedgerError::Task(e.to_string()))?
    }
}

/// Takes the state directory's lock: an exclusive `flock` on `<state_dir>/tokend.lock`
/// (created 0600 if missing), held while the returned file is open. `Locked` when another
/// process (a running daemon) holds it.
fn lock_state_dir(state_dir: &Path) -> Result<File, LedgerError> {
    let lock_path = state_dir.join("tokend.lock");
    let open_err = |source| LedgerError::Open {
        path: lock_path.clone(),
        source,
    };
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(open_err)?;
    match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(lock),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
            Err(LedgerError::Locked(state_dir.to_path_buf()))
        }
        Err(e) => Err(open_err(e.into())),
    }
}

/// What replacing a connection's sites `before` by `after` changes: the events describing it
/// (additions and scope changes in `after`'s order, then removals), and the sites removed.
/// Both ledgers use it, so that they tell the same history.
fn site_changes<'a>(before: &'a [Site], after: &[Site]) -> (Vec<Event>, Vec<&'a Site>) {
    let mut events = Vec::new();
    for site in after {
        match before
            .iter()
            .find(|b| b.cloud_id == site.cloud_id && b.url == site.url)
        {
            None => events.push(Event::new(
                EventKind::SiteAdded,
                format!("{} ({}) added", site.url, site.cloud_id),
            )),
            Some(b) if b.scopes != site.scopes => events.push(Event::new(
                EventKind::SiteScopesChanged,
                format!(
                    "{} scopes changed from [{}] to [{}]",
                    site.url,
                    b.scopes.join(" "),
                    site.scopes.join(" ")
                ),
            )),
            Some(_) => {}
        }
    }
    let removed: Vec<&Site> = before
        .iter()
        .filter(|b| {
            !after
                .iter()
                .any(|s| s.cloud_id == b.cloud_id && s.url == b.url)
        })
        .collect();
    for b in &removed {
        events.push(Event::new(
            EventKind::SiteRemoved,
            format!("{} ({}) no longer accessible", b.url, b.cloud_id),
        ));
    }
    (events, removed)
}

/// Makes every token column sealed under the current key: checks the key against the
/// stored check value, seals a plaintext ledger of an older tokend, re-seals rows under an
/// old key (rotation), all in one transaction, and records the check value.
fn seal_at_rest(
    db: &mut rusqlite::Connection,
    keys: &Keyring,
    path: &Path,
) -> Result<(), LedgerError> {
    let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let check: Option<String> = tx
        .query_row("SELECT value FROM keycheck WHERE id = 1", [], |r| r.get(0))
        .optional()?;
    let rotating = match check.as_deref().map(|c| keys.verify(c)) {
        None => false,
        Some(Some(old)) => old,
        Some(None) => {
            return Err(LedgerError::WrongKey {
                path: path.to_path_buf(),
                key_file: keys.key_file().to_path_buf(),
            });
        }
    };
    // (Rotating implies old keys.)
    if check.is_some() && !keys.has_old_keys() {
        return Ok(());
    }
    // Re-seal every token that is not sealed under the current key.
    let rows: Vec<(String, String, Option<String>, Option<String>)> = {
        let mut stmt = tx.prepare(
            "SELECT id, refresh_token, previous_refresh_token, access_token FROM connections",
        )?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<_, _>>()?
    };
    let mut resealed = 0;
    for (id, rt, prev, access) in rows {
        let Some((rt, prev, access)) =
            reseal_tokens(keys, &id, &rt, prev.as_deref(), access.as_deref())
                .map_err(LedgerError::Corrupt)?
        else {
            continue;
        };
        tx.execute(
            "UPDATE connections SET refresh_token = ?1, previous_refresh_token = ?2, access_token = ?3 WHERE id = ?4",
            params![rt, prev, access, id],
        )?;
        resealed += 1;
    }
    tx.execute(
        "INSERT INTO keycheck (id, value) VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET value = excluded.value",
        [keys.check_value()],
    )?;
    tx.commit()?;
    if resealed > 0 {
        // The clear-text (or old-key) values must not survive in freed pages or WAL frames.
        db.execute_batch("VACUUM;")?;
        db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    }
    match (check.is_some(), rotating) {
        (false, _) if resealed > 0 => tracing::info!(
            connections = resealed,
            "sealed the tokens of a plaintext ledger under the ledger key"
        ),
        (true, true) => tracing::info!(
            connections = resealed,
            key_file = %keys.key_file().display(),
            "re-sealed the ledger under key_file; no row needs daemon.old_key_files any more, they can be removed"
        ),
        (true, false) if keys.has_old_keys() => tracing::info!(
            connections = resealed,
            "every row is sealed under key_file; daemon.old_key_files are no longer needed and can be removed"
        ),
        _ => {}
    }
    Ok(())
}

fn migrate(db: &mut rusqlite::Connection, path: &Path) -> Result<(), LedgerError> {
    let version: i64 = db.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(LedgerError::TooNew {
            path: path.to_path_buf(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "ledger migrated");
    }
    Ok(())
}

const CONNECTION_COLUMNS: &str = "id, label, provider, client_id, account_id, status, scopes, \
    refresh_token, refresh_token_rotated_at, previous_refresh_token, previous_rotated_at, \
    attempt_started_at, access_token, access_token_expires_at, consented_at, last_refresh_at, \
    last_error_code, last_error_message, last_error_at, consecutive_failures, created_at, updated_at, \
    chain_version, refresh_token_used_at";
const CONNECTION_COLUMN_COUNT: usize = 24;

/// The columns a chain commit writes: everything the refresh engine changes by refreshing.
/// Identity (`label`, `provider`, `client_id`, `created_at`) and `account_id` are left alone,
/// so that a refresh can never roll back an account resolved meanwhile.
const CHAIN_COLUMNS: &[&str] = &[
    "status",
    "scopes",
    "refresh_token",
    "refresh_token_rotated_at",
    "previous_refresh_token",
    "previous_rotated_at",
    "attempt_started_at",
    "access_token",
    "access_token_expires_at",
    "consented_at",
    "last_refresh_at",
    "last_error_code",
    "last_error_message",
    "last_error_at",
    "consecutive_failures",
    "updated_at",
    "chain_version",
    "refresh_token_used_at",
];

/// Overwrites the [`CHAIN_COLUMNS`] of the row `rec.conn.id`, but only while its stored
/// `chain_version` is `expect_version` (compare-and-swap); returns the number of rows changed.
/// The statement is built once and stays prepared on the connection: under a refresh storm
/// every write of a batch is one of these, and preparing it each time was a good part of
/// what a write cost the writer.
fn update_row(
    tx: &rusqlite::Connection,
    keys: &Keyring,
    rec: &Record,
    expect_version: u64,
) -> Result<usize, LedgerError> {
    static STATEMENT: std::sync::OnceLock<Result<(String, Vec<usize>), String>> =
        std::sync::OnceLock::new();
    let (sql, bound) = STATEMENT
        .get_or_init(|| chain_update(CHAIN_COLUMNS, '?'))
        .as_ref()
        .map_err(|e| LedgerError::Corrupt(e.clone()))?;
    let mut values = record_values(rec, keys);
    let mut params: Vec<_> = bound
        .iter()
        .map(|&i| std::mem::replace(&mut values[i], rusqlite::types::Value::Null))
        .collect();
    params.push(rusqlite::types::Value::Text(rec.conn.id.clone()));
    params.push(rusqlite::types::Value::Integer(expect_version as i64));
    Ok(tx
        .prepare_cached(sql)?
        .execute(rusqlite::params_from_iter(params))?)
}

/// Both ledgers' compare-and-swap of `columns` of one connection row, `p` marking each
/// parameter number (`?` for SQLite, `$` for PostgreSQL): the statement, and the index in
/// [`CONNECTION_COLUMNS`] (that is, in the record's values) of each value to bind, in order,
/// before the row's id and the expected `chain_version`. The error (for `Corrupt`) names an
/// unknown column.
fn chain_update(columns: &[&str], p: char) -> Result<(String, Vec<usize>), String> {
    let all: Vec<&str> = CONNECTION_COLUMNS.split(", ").map(str::trim).collect();
    let mut bound = Vec::with_capacity(columns.len());
    let mut assignments = Vec::with_capacity(columns.len());
    for c in columns {
        let i = all
            .iter()
            .position(|a| a == c)
            .ok_or_else(|| format!("unknown column {c}"))?;
        bound.push(i);
        assignments.push(format!("{c} = {p}{}", bound.len()));
    }
    let sql = format!(
        "UPDATE connections SET {} WHERE id = {p}{} AND chain_version = {p}{}",
        assignments.join(", "),
        bound.len() + 1,
        bound.len() + 2
    );
    Ok((sql, bound))
}

fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ms(t: Time) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> Time {
    Utc.timestamp_millis_opt(v).single().unwrap_or_default()
}

fn join_scopes(scopes: &[String]) -> String {
    scopes.join(" ")
}

fn split_scopes(s: &str) -> Scopes {
    // The shared list of these scopes: a row's own copy only until it is found shared.
    s.split_whitespace().map(str::to_owned).collect()
}

/// The row of a record, its tokens sealed.
fn record_values(rec: &Record, keys: &Keyring) -> Vec<rusqlite::types::Value> {
    use rusqlite::types::Value as V;
    let c = &rec.conn;
    let ch = &rec.chain;
    let text = |s: &str| V::Text(s.to_owned());
    let opt_text = |s: Option<&str>| s.map(|s| V::Text(s.to_owned())).unwrap_or(V::Null);
    let time = |t: Time| V::Integer(ms(t));
    let opt_time = |t: Option<Time>| t.map(|t| V::Integer(ms(t))).unwrap_or(V::Null);
    vec![
        text(&c.id),
        text(&c.label),
        text(&c.provider),
        text(&c.client_id),
        opt_text(c.account_id.as_deref()),
        text(c.status.as_str()),
        text(&join_scopes(&c.scopes)),
        text(&sealed(keys, &c.id, "refresh_token", &ch.refresh_token)),
        time(ch.rotated_at),
        opt_text(
            ch.previous
                .as_deref()
                .map(|(s, _)| sealed(keys, &c.id, "previous_refresh_token", s))
                .as_deref(),
        ),
        opt_time(ch.previous.as_deref().map(|(_, t)| *t)),
        opt_time(ch.attempt_started_at),
        opt_text(
            ch.access
                .as_ref()
                .map(|a| sealed(keys, &c.id, "access_token", &a.token))
                .as_deref(),
        ),
        opt_time(ch.access.as_ref().map(|a| a.expires_at)),
        time(c.consented_at),
        opt_time(c.last_refresh_at),
        opt_text(c.last_error.as_ref().map(|e| e.code.as_str())),
        opt_text(c.last_error.as_ref().map(|e| e.message.as_str())),
        opt_time(c.last_error.as_ref().map(|e| e.at)),
        V::Integer(c.consecutive_failures as i64),
        time(c.created_at),
        time(c.updated_at),
        V::Integer(ch.version as i64),
        time(ch.used_at),
    ]
}

fn sealed(keys: &Keyring, id: &str, column: &str, token: &Secret) -> String {
    keys.seal(token.expose(), &seal::aad(id, column))
}

/// The token columns of connection `id` (`refresh_token`, `previous_refresh_token`,
/// `access_token`) sealed under the current key, or `None` when every one already was; the
/// error (for `Corrupt`) names the column that does not open. The key check and re-seal of
/// both ledgers.
#[allow(clippy::type_complexity)]
fn reseal_tokens(
    keys: &Keyring,
    id: &str,
    refresh: &str,
    previous: Option<&str>,
    access: Option<&str>,
) -> Result<Option<(String, Option<String>, Option<String>)>, String> {
    let mut stale = false;
    let mut reseal = |column: &str, value: &str| -> Result<String, String> {
        let aad = seal::aad(id, column);
        let o = keys
            .open(value, &aad)
            .map_err(|e| format!("cannot open {column} of connection {id}: {e}"))?;
        stale |= o.stale;
        Ok(keys.seal(&o.plaintext, &aad))
    };
    let rt = reseal("refresh_token", refresh)?;
    let prev = previous
        .map(|p| reseal("previous_refresh_token", p))
        .transpose()?;
    let access = access.map(|a| reseal("access_token", a)).transpose()?;
    Ok(stale.then_some((rt, prev, access)))
}

/// A row as either ledger's driver reads it: each getter fails with the driver's error on a
/// column of another type.
trait Columns {
    type Error;
    /// `f` of column `i`'s text, borrowed from the row (no `String` made for it).
    fn with_str<T>(&self, i: usize, f: impl FnOnce(&str) -> T) -> Result<T, Self::Error>;
    fn text(&self, i: usize) -> Result<String, Self::Error>;
    fn opt_text(&self, i: usize) -> Result<Option<String>, Self::Error>;
    fn int(&self, i: usize) -> Result<i64, Self::Error>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>, Self::Error>;
}

impl Columns for rusqlite::Row<'_> {
    type Error = rusqlite::Error;
    fn with_str<T>(&self, i: usize, f: impl FnOnce(&str) -> T) -> rusqlite::Result<T> {
        let value = self.get_ref(i)?;
        let s = value.as_str().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(i, value.data_type(), Box::new(e))
        })?;
        Ok(f(s))
    }
    fn text(&self, i: usize) -> rusqlite::Result<String> {
        self.get(i)
    }
    fn opt_text(&self, i: usize) -> rusqlite::Result<Option<String>> {
        self.get(i)
    }
    fn int(&self, i: usize) -> rusqlite::Result<i64> {
        self.get(i)
    }
    fn opt_int(&self, i: usize) -> rusqlite::Result<Option<i64>> {
        self.get(i)
    }
}

impl Columns for tokio_postgres::Row {
    type Error = tokio_postgres::Error;
    fn with_str<T>(&self, i: usize, f: impl FnOnce(&str) -> T) -> Result<T, tokio_postgres::Error> {
        Ok(f(self.try_get::<_, &str>(i)?))
    }
    fn text(&self, i: usize) -> Result<String, tokio_postgres::Error> {
        self.try_get(i)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, tokio_postgres::Error> {
        self.try_get(i)
    }
    fn int(&self, i: usize) -> Result<i64, tokio_postgres::Error> {
        self.try_get(i)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, tokio_postgres::Error> {
        self.try_get(i)
    }
}

/// The record in a row of [`CONNECTION_COLUMNS`] (its sites left empty), its tokens opened:
/// the outer error is the driver's, the inner one (for `Corrupt`) a row that cannot be
/// understood.
fn decode_record<R: Columns>(r: &R, keys: &Keyring) -> Result<Result<Record, String>, R::Error> {
    Ok(decode_sealed(r, &mut Interned::default())?
        .and_then(|sealed| sealed.open(&mut keys.opener())))
}

/// A row of [`CONNECTION_COLUMNS`] decoded but for its tokens, still sealed. Opening them is
/// most of a load's cost and needs only the keys: a load reads its rows on one thread and
/// opens them on several ([`parallel::map`]).
struct SealedRecord {
    /// The connection, complete but for its sites.
    conn: Connection,
    /// The chain's fields, as in [`Chain`], with the tokens as stored.
    refresh_token: String,
    rotated_at: Time,
    used_at: Time,
    version: u64,
    previous: Option<(String, Time)>,
    attempt_started_at: Option<Time>,
    access: Option<(String, Time)>,
}

impl SealedRecord {
    /// The record, its tokens opened: the previous refresh token, the access token, then
    /// the refresh token; the error (for `Corrupt`) names the first that does not open.
    fn open(self, opener: &mut seal::Opener<'_>) -> Result<Record, String> {
        let id = self.conn.id.as_str();
        let mut open = |column: &str, value: &str| {
            opener
                .open(value, id, column)
                .map(|(secret, _stale)| secret)
                .map_err(|e| format!("cannot open {column} of connection {id}: {e}"))
        };
        let previous = match &self.previous {
            Some((t, at)) => Some((open("previous_refresh_token", t)?, *at)),
            None => None,
        };
        let access = match &self.access {
            Some((t, at)) => Some(AccessToken {
                token: open("access_token", t)?,
                expires_at: *at,
            }),
            None => None,
        };
        let refresh_token = open("refresh_token", &self.refresh_token)?;
        Ok(Record {
            conn: self.conn,
            chain: Chain {
                refresh_token,
                rotated_at: self.rotated_at,
                used_at: self.used_at,
                version: self.version,
                previous: previous.map(Box::new),
                attempt_started_at: self.attempt_started_at,
                access,
            },
        })
    }
}

/// The values a load's rows share, as the last row had them: a row with the same provider,
/// client id or scopes takes the shared value from here, without a `String` made and a
/// process-wide table locked for it (every connection of a ledger has one provider and
/// client id, and nearly all the same scopes).
#[derive(Default)]
struct Interned {
    provider: Option<SharedStr>,
    client_id: Option<SharedStr>,
    /// The scopes' text as stored, and the list it made.
    scopes: Option<(String, Scopes)>,
}

impl Interned {
    fn shared(slot: &mut Option<SharedStr>, s: &str) -> SharedStr {
        match slot {
            Some(have) if &**have == s => have.clone(),
            _ => slot.insert(SharedStr::new(s)).clone(),
        }
    }

    fn scopes(&mut self, s: &str) -> Scopes {
        match &self.scopes {
            Some((text, have)) if text == s => have.clone(),
            _ => {
                let made = split_scopes(s);
                self.scopes = Some((s.to_owned(), made.clone()));
                made
            }
        }
    }
}

/// The [`SealedRecord`] in a row of [`CONNECTION_COLUMNS`]: the outer error is the driver's,
/// the inner one (for `Corrupt`) a row that cannot be understood.
fn decode_sealed<R: Columns>(
    r: &R,
    interned: &mut Interned,
) -> Result<Result<SealedRecord, String>, R::Error> {
    let Some(status) = r.with_str(5, Status::parse)? else {
        let status = r.text(5)?;
        return Ok(Err(format!("unknown status {status:?}")));
    };
    let opt_time = |i: usize| -> Result<Option<Time>, R::Error> { Ok(r.opt_int(i)?.map(from_ms)) };
    let previous = match (r.opt_text(9)?, opt_time(10)?) {
        (Some(t), Some(at)) => Some((t, at)),
        _ => None,
    };
    let access = match (r.opt_text(12)?, opt_time(13)?) {
        (Some(t), Some(at)) => Some((t, at)),
        _ => None,
    };
    let last_error = match (r.opt_text(16)?, r.opt_text(17)?, opt_time(18)?) {
        (Some(code), Some(message), Some(at)) => Some(LastError { code, message, at }),
        _ => None,
    };
    let rotated_at = from_ms(r.int(8)?);
    Ok(Ok(SealedRecord {
        conn: Connection {
            label: r.text(1)?,
            provider: r.with_str(2, |s| Interned::shared(&mut interned.provider, s))?,
            client_id: r.with_str(3, |s| Interned::shared(&mut interned.client_id, s))?,
            account_id: r.opt_text(4)?,
            status,
            scopes: r.with_str(6, |s| interned.scopes(s))?,
            sites: Vec::new(),
            consented_at: from_ms(r.int(14)?),
            last_refresh_at: opt_time(15)?,
            last_error: last_error.map(Box::new),
            consecutive_failures: r.int(19)?.clamp(0, u32::MAX as i64) as u32,
            created_at: from_ms(r.int(20)?),
            updated_at: from_ms(r.int(21)?),
            id: r.text(0)?,
        },
        refresh_token: r.text(7)?,
        rotated_at,
        used_at: opt_time(23)?.unwrap_or(rotated_at),
        version: r.int(22)?.max(0) as u64,
        previous,
        attempt_started_at: opt_time(11)?,
        access,
    }))
}

/// A site from `cloud_id, url, name, scopes, last_seen_at` starting at column `at`.
fn decode_site<R: Columns>(r: &R, at: usize) -> Result<Site, R::Error> {
    Ok(Site {
        cloud_id: r.text(at)?.into(),
        url: r.text(at + 1)?.into(),
        name: r.text(at + 2)?.into(),
        scopes: split_scopes(&r.text(at + 3)?),
        last_seen_at: from_ms(r.int(at + 4)?),
    })
}

/// An event from `at, kind, message, node, peer_uid, peer_pid, count`.
fn decode_event<R: Columns>(r: &R) -> Result<StoredEvent, R::Error> {
    let uid = r.opt_int(4)?;
    let pid = r.opt_int(5)?;
    Ok(StoredEvent {
        at: from_ms(r.int(0)?),
        kind: EventKind::parse(&r.text(1)?),
        message: r.text(2)?,
        node: r.opt_text(3)?,
        peer: uid.map(|u| EventPeer {
            uid: u as u32,
            pid: pid.map(|p| p as u32),
        }),
        count: r.int(6)?.clamp(0, u32::MAX as i64) as u32,
    })
}

fn row_to_record(
    r: &rusqlite::Row<'_>,
    keys: &Keyring,
) -> rusqlite::Result<Result<Record, LedgerError>> {
    Ok(decode_record(r, keys)?.map_err(LedgerError::Corrupt))
}

/// The reading connection's page cache, in KiB (SQLite's default is 2,000 KiB, which the
/// writer keeps). The reader's largest use is the start-up load, one scan of each table,
/// which reads every page once: a cache of its size only kept the ledger's last 2 MB in
/// memory for nothing, 2 MB of RSS from 20,000 connections on. Its other queries (one
/// connection, a page of events or audit) touch a few pages each, which a miss reads again
/// from the OS's cache.
const READER_CACHE_KIB: i64 = 64;

/// Rows a load hands on at a time, from the thread that reads them to the one that opens
/// their tokens, and from that one to its caller: large enough that a hand-over costs
/// nothing beside the rows, small enough that the caller starts early and that the batches
/// in flight stay small: their buffers are freed on other threads than the ones that made
/// them, into glibc arenas nothing else reuses (2048-row batches cost 14 MB of RSS at
/// 100,000 connections).
const LOAD_BATCH: usize = 256;

/// Batches read but not yet opened a load holds at most: the reading thread waits for the
/// opening one rather than holding the ledger twice over in memory.
const LOAD_QUEUE: usize = 4;

/// Every connection with its chain and sites (removed sites excluded), from one read
/// transaction, handed to `emit` in batches of at most [`LOAD_BATCH`] in label order with
/// the number of connections in all; `emit` answering false ends the load early. Two scans,
/// not one site query per connection (at 100,000 connections, start-up's largest cost was
/// preparing and running that query 100,000 times): the sites first, then the rows, read on
/// this thread, their tokens sealed, and opened on another (three a row, most of the cost),
/// which hands them to `emit`. The error is the first row's in order that cannot be read or
/// opened.
fn load_each(
    db: &rusqlite::Connection,
    keys: &Keyring,
    emit: &mut (dyn FnMut(usize, Vec<Record>) -> bool + Send),
) -> Result<(), LedgerError> {
    // One read transaction: no site of a connection written between the scans.
    let tx = db.unchecked_transaction()?;
    let total: i64 = tx.query_row("SELECT count(*) FROM connections", [], |r| r.get(0))?;
    let total = usize::try_from(total).unwrap_or(0);
    let sites = all_sites(&tx, total)?;
    // In label order (the label's unique index, no sort; Rust's order of strings is
    // SQLite's `BINARY` collation): the engine's listing order, which it then builds by
    // appending each row, not by inserting it in place.
    let mut stmt = tx.prepare(&format!(
        "SELECT {CONNECTION_COLUMNS} FROM connections ORDER BY label"
    ))?;
    let mut rows = stmt.query([])?;
    type Sealed = Vec<Result<SealedRecord, String>>;
    let (to_open, queued) = std::sync::mpsc::sync_channel::<Sealed>(LOAD_QUEUE);
    std::thread::scope(|s| {
        let opener = s.spawn(move || -> Result<(), LedgerError> {
            let mut opener = keys.opener();
            for batch in queued {
                let records = batch
                    .into_iter()
                    .map(|row| row.and_then(|row| row.open(&mut opener)))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(LedgerError::Corrupt)?;
                if !emit(total, records) {
                    break;
                }
            }
            Ok(())
        });
        let read = (|| -> Result<(), LedgerError> {
            let mut batch = Vec::with_capacity(LOAD_BATCH);
            let mut interned = Interned::default();
            while let Some(row) = rows.next()? {
                let mut sealed = decode_sealed(row, &mut interned)?;
                if let Ok(rec) = &mut sealed {
                    rec.conn.sites = sites.of(&rec.conn.id);
                }
                batch.push(sealed);
                if batch.len() == LOAD_BATCH {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(LOAD_BATCH));
                    if to_open.send(full).is_err() {
                        // The opener stopped (a row that does not open, or nobody listens):
                        // its result says why.
                        return Ok(());
                    }
                }
            }
            if !batch.is_empty() {
                let _ = to_open.send(batch);
            }
            Ok(())
        })();
        drop(to_open);
        let opened = opener
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // The opener's error first: it is on a row before any the reader failed on.
        opened.and(read)
    })
}

/// Every connection's sites (removed ones excluded), as a load reads them before the rows:
/// their text in one buffer and a row each, sorted by connection id, then url and cloud id
/// as [`load_sites`] orders them (Rust's order of strings is SQLite's `BINARY` collation;
/// SQLite's sort of every site was a third of the scan). Two large allocations, not a map of
/// small ones: a row's sites are made as it is read ([`SiteTable::of`]) and the table goes
/// back to the system at the load's end, where a map of every connection's `Vec<Site>`,
/// read first on the load's thread, left about 40 MB of that thread's glibc arena unused at
/// 100,000 connections once the engine had kept the sites its own way.
struct SiteTable {
    /// Every site's connection id, cloud id, url and name, one after the other.
    text: String,
    /// Every site, sorted (see the type's doc).
    rows: Vec<SiteRow>,
}

/// One site of a [`SiteTable`]: its strings one after the other in the table's text.
struct SiteRow {
    /// Where its strings begin in the table's text.
    start: usize,
    /// The lengths of its connection id, cloud id, url and name, in that order (SQLite's
    /// strings are at most a billion bytes).
    lens: [u32; 4],
    /// See [`Site::scopes`].
    scopes: Scopes,
    /// See [`Site::last_seen_at`].
    last_seen_at: Time,
}

impl SiteRow {
    /// Its `i`th string (0 connection id, 1 cloud id, 2 url, 3 name).
    fn part<'t>(&self, text: &'t str, i: usize) -> &'t str {
        let at = self.start + self.lens[..i].iter().map(|&l| l as usize).sum::<usize>();
        &text[at..at + self.lens[i] as usize]
    }

    /// Its connection's id.
    fn connection<'t>(&self, text: &'t str) -> &'t str {
        &text[self.start..self.start + self.lens[0] as usize]
    }
}

impl SiteTable {
    /// The sites of connection `id`, in order.
    fn of(&self, id: &str) -> Vec<Site> {
        let text = self.text.as_str();
        let first = self.rows.partition_point(|row| row.connection(text) < id);
        let n = self.rows[first..]
            .iter()
            .take_while(|row| row.connection(text) == id)
            .count();
        self.rows[first..first + n]
            .iter()
            .map(|row| Site {
                cloud_id: row.part(text, 1).into(),
                url: row.part(text, 2).into(),
                name: row.part(text, 3).into(),
                scopes: row.scopes.clone(),
                last_seen_at: row.last_seen_at,
            })
            .collect()
    }
}

/// Every connection's sites (see [`SiteTable`]); room made for `connections` of them.
fn all_sites(db: &rusqlite::Connection, connections: usize) -> Result<SiteTable, LedgerError> {
    let mut stmt = db.prepare(
        "SELECT connection_id, cloud_id, url, name, scopes, last_seen_at FROM sites \
         WHERE removed_at IS NULL",
    )?;
    let mut rows = stmt.query([])?;
    let mut table = SiteTable {
        text: String::new(),
        rows: Vec::with_capacity(connections),
    };
    while let Some(row) = rows.next()? {
        let start = table.text.len();
        let mut lens = [0u32; 4];
        for (i, len) in lens.iter_mut().enumerate() {
            // Borrowed from the row, not copied into a `String` of its own first.
            let n = row.with_str(i, |s| {
                table.text.push_str(s);
                s.len()
            })?;
            *len = u32::try_from(n)
                .map_err(|_| LedgerError::Corrupt("a site's text is too long".into()))?;
        }
        table.rows.push(SiteRow {
            start,
            lens,
            scopes: row.with_str(4, split_scopes)?,
            last_seen_at: from_ms(row.int(5)?),
        });
    }
    let text = table.text.as_str();
    table.rows.sort_unstable_by(|a, b| {
        a.connection(text)
            .cmp(b.connection(text))
            .then_with(|| a.part(text, 2).cmp(b.part(text, 2)))
            .then_with(|| a.part(text, 1).cmp(b.part(text, 1)))
    });
    Ok(table)
}

fn load_sites(db: &rusqlite::Connection, connection_id: &str) -> Result<Vec<Site>, LedgerError> {
    let mut stmt = db.prepare_cached(
        "SELECT cloud_id, url, name, scopes, last_seen_at FROM sites \
         WHERE connection_id = ?1 AND removed_at IS NULL ORDER BY url, cloud_id",
    )?;
    let sites = stmt
        .query_map([connection_id], |r| decode_site(r, 0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(sites)
}

fn write_sites(
    tx: &rusqlite::Connection,
    connection_id: &str,
    sites: &[Site],
    now: Time,
) -> Result<(), LedgerError> {
    for s in sites {
        tx.execute(
            "INSERT INTO sites (connection_id, cloud_id, url, name, scopes, first_seen_at, last_seen_at, removed_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL) \
             ON CONFLICT (connection_id, cloud_id, url) DO UPDATE SET \
               name = excluded.name, scopes = excluded.scopes, \
               last_seen_at = excluded.last_seen_at, removed_at = NULL",
            params![
                connection_id,
                s.cloud_id,
                s.url,
                s.name,
                join_scopes(&s.scopes),
                ms(now),
                ms(s.last_seen_at)
            ],
        )?;
    }
    Ok(())
}

fn append_events(
    tx: &rusqlite::Connection,
    connection_id: Option<&str>,
    now: Time,
    events: &[Event],
) -> Result<(), LedgerError> {
    if events.is_empty() {
        return Ok(());
    }
    let mut insert = tx.prepare_cached(
        "INSERT INTO events (at, connection_id, kind, message, node, peer_uid, peer_pid, count) \
         VALUES (?1, ?2, ?3, ?4, (SELECT name FROM temp.node), ?5, ?6, ?7)",
    )?;
    for e in events {
        insert.execute(params![
            ms(now),
            connection_id,
            e.kind.as_str(),
            e.message,
            e.peer.map(|p| p.uid),
            e.peer.and_then(|p| p.pid),
            e.count
        ])?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn record(id: &str, label: &str, rt: &str) -> Record {
        let now = from_ms(Utc::now().timestamp_millis());
        let mut rec = crate::model::sample_record(id, label, rt, now);
        rec.conn.sites.push(Site {
            cloud_id: "cloud-1".into(),
            url: "https://acme.atlassian.net".into(),
            name: "acme".into(),
            scopes: vec!["read:page:confluence".into()].into(),
            last_seen_at: now,
        });
        rec
    }

    /// A load shares the provider, client id and scopes of consecutive rows (`Interned`):
    /// rows that differ, in any order, each load as stored.
    #[tokio::test]
    async fn a_load_gives_each_row_its_own_client_and_scopes() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), &seal::KeySource::default()).unwrap();
        let kinds = [
            ("app-1", "a b"),
            ("app-1", "a b"),
            ("app-2", "a b"),
            ("app-2", "c"),
            ("app-1", "a b"),
            ("app-1", ""),
        ];
        for (i, (client, scopes)) in kinds.iter().enumerate() {
            let mut rec = crate::model::sample_record(
                &format!("c{i}"),
                &format!("conn-{i}"),
                "rt",
                Utc::now(),
            );
            rec.conn.client_id = (*client).into();
            rec.conn.scopes = split_scopes(scopes);
            ledger.insert(rec, vec![]).await.unwrap();
        }
        let all = ledger.load_all().await.unwrap();
        assert_eq!(all.len(), kinds.len());
        for rec in &all {
            let i: usize = rec.conn.label["conn-".len()..].parse().unwrap();
            assert_eq!(&*rec.conn.client_id, kinds[i].0, "{}", rec.conn.label);
            assert_eq!(
                rec.conn.scopes,
                split_scopes(kinds[i].1),
                "{}",
                rec.conn.label
            );
        }
    }

    #[tokio::test]
    async fn insert_save_reload_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), &seal::KeySource::default()).unwrap();
        let rec = record("c1", "conf", "rt-1");
        ledger
            .insert(rec.clone(), vec![Event::new(EventKind::Imported, "x")])
            .await
            .unwrap();
        let mut next = rec.clone();
        next.chain.previous = Some(Box::new((Secret::new("rt-1"), next.chain.rotated_at)));
        next.chain.refresh_token = Secret::new("rt-2");
        next.chain.attempt_started_at = None;
        next.chain.version = 1;
        next.conn.last_error = Some(Box::new(LastError {
            code: "x".into(),
            message: "y".into(),
            at: next.conn.created_at,
        }));
        ledger
            .save_chain(next, 0, vec![Event::new(EventKind::Rotated, "ok")])
            .await
            .unwrap();
        drop(ledger);
        let ledger = Ledger::open(dir.path(), &seal::KeySource::default()).unwrap();
        let all = ledger.load_all().await.unwrap();
        assert_eq!(all.len(), 1);
        let got = &all[0];
        assert_eq!(got.chain.refresh_token.expose(), "rt-2");
        assert_eq!(got.chain.version, 1);
        assert_eq!(got.chain.previous.as_ref().unwrap().0.expose(), "rt-1");
        assert_eq!(got.conn.sites.len(), 1);
        assert_eq!(got.conn.last_error.as_ref().unwrap().code, "x");
        assert_eq!(got.conn.scopes, rec.conn.scopes);
        ledger.set_node("node-a").unwrap();
        let mut read = Event::new(EventKind::TokenRead, "3 token reads");
        read.peer = Some(EventPeer {
            uid: 1001,
            pid: Some(42),
        });
        read.count = 3;
        ledger
            .append_batch(vec![("c1".into(), Utc::now(), read)])
            .await
            .unwrap();
        let events = ledger.events("c1".into(), None, 100).await.unwrap();
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            vec!["token_read", "rotated", "imported"],
            "newest first"
        );
        assert_eq!(events[0].count, 3);
        assert_eq!(
            events[0].peer,
            Some(EventPeer {
                uid: 1001,
                pid: Some(42)
            })
        );
        assert_eq!(events[0].node.as_deref(), Some("node-a"));
        assert_eq!(events[1].node, None, "recorded before the node was named");
        let limited = ledger.events("c1".into(), None, 1).await.unwrap();
        assert_eq!(limited.len(), 1);
        let later = ledger
            .events(
                "c1".into(),
                Some(Utc::now() + chrono::Duration::hours(1)),
                10,
            )
            .await
            .unwrap();
        assert!(later.is_empty());
    }

    /// Inserts `n` connections (`c00000`, `c00001`, ...; one site each) in one transaction.
    async fn insert_many(ledger: &Ledger, n: usize) {
        ledger
            .call_keys(move |db, keys| {
                let tx = db.transaction()?;
                for i in 0..n {
                    let mut rec = record(&format!("c{i:05}"), &format!("l{i}"), &format!("rt-{i}"));
                    rec.conn.account_id = Some(format!("account-{i}"));
                    tx.execute(
                        &format!(
                            "INSERT INTO connections ({CONNECTION_COLUMNS}) VALUES ({})",
                            placeholders(CONNECTION_COLUMN_COUNT)
                        ),
                        rusqlite::params_from_iter(record_values(&rec, keys)),
                    )?;
                    write_sites(&tx, &rec.conn.id, &rec.conn.sites, rec.conn.created_at)?;
                }
                tx.commit()?;
                Ok(())
            })
            .await
            .unwrap();
    }

    /// The load's sites (read before the rows, all at once) are each connection's own, in
    /// the order a connection's own read gives them (url, then cloud id): ids out of order,
    /// one a prefix of another, a connection without sites, sites inserted in no order.
    #[tokio::test]
    async fn a_load_gives_each_connection_its_own_sites_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), &seal::KeySource::default()).unwrap();
        let site = |cloud_id: &str, url: &str| Site {
            cloud_id: cloud_id.into(),
            url: url.into(),
            name: format!("{cloud_id} at {url}").into(),
            scopes: vec!["read:page:confluence".to_owned()].into(),
            last_seen_at: from_ms(1_780_000_000_000),
        };
        let rows = [
            (
                "c2",
                vec![
                    ("k", "https://b.example"),
                    ("j", "https://a.example"),
                    ("i", "https://c.example"),
                ],
            ),
            ("c10", vec![]),
            ("c1", vec![("z", "https://z.example")]),
            (
                "c",
                vec![("y", "https://a.example"), ("x", "https://a.example")],
            ),
        ];
        for (n, (id, sites)) in rows.iter().enumerate() {
            let mut rec = record(id, &format!("l{n}"), &format!("rt-{n}"));
            rec.conn.sites = sites.iter().map(|(c, u)| site(c, u)).collect();
            ledger.insert(rec, vec![]).await.unwrap();
        }
        let all = ledger.load_all().await.unwrap();
        assert_eq!(all.len(), rows.len());
        for rec in &all {
            let one = ledger.load_one(rec.conn.id.clone()).await.unwrap().unwrap();
            assert_eq!(rec.conn.sites, one.conn.sites, "{}", rec.conn.id);
        }
        let c = all.iter().find(|r| r.conn.id == "c").unwrap();
        let order: Vec<&str> = c.conn.sites.iter().map(|s| &*s.cloud_id).collect();
        assert_eq!(order, ["x", "y"], "same url: by cloud id");
        let c2 = all.iter().find(|r| r.conn.id == "c2").unwrap();
        let order: Vec<&str> = c2.conn.sites.iter().map(|s| &*s.cloud_id).collect();
        assert_eq!(order, ["j", "k", "i"], "by url");
        assert!(
            all.iter()
                .any(|r| r.conn.id == "c10" && r.conn.sites.is_empty())
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_load_comes_in_order_in_batches_and_its_first_bad_row_fails_it() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), &seal::KeySource::default()).unwrap();
        let n = 2 * LOAD_BATCH + 7;
        insert_many(&ledger, n).await;

        // One batch queued at a time: the reading and opening threads wait for the caller.
        let (sink, mut batches) = tokio::sync::mpsc::channel(1);
        let loading = tokio::spawn({
            let ledger = ledger.clone();
            async move { ledger.load_batches(sink).await }
        });
        let mut got = Vec::new();
        while let Some((total, batch)) = batches.recv().await {
            assert_eq!(total, n, "every batch says how many there are in all");
            assert!(
                !batch.is_empty() && batch.len() <= LOAD_BATCH,
                "{}",
                batch.len()
            );
            got.extend(batch);
        }
        loading.await.unwrap().unwrap();
        // Row i is labelled `l{i}`, so label order is not table order (`l10` before `l2`).
        let mut rows: Vec<usize> = (0..n).collect();
        rows.sort_by_key(|i| format!("l{i}"));
        let want: Vec<String> = rows.iter().map(|i| format!("c{i:05}")).collect();
        let ids: Vec<&str> = got.iter().map(|r| r.conn.id.as_str()).collect();
        assert_eq!(ids, want, "in label order, each once");
        for (rec, &i) in got.iter().zip(&rows) {
            assert_eq!(rec.chain.refresh_token.expose(), format!("rt-{i}"));
            assert_eq!(rec.conn.label, format!("l{i}"));
            assert_eq!(rec.conn.sites.len(), 1, "{}", rec.conn.id);
            assert_eq!(&*rec.conn.sites[0].url, "https://acme.atlassian.net");
        }
        let all = ledger.load_all().await.unwrap();
        assert_eq!(
            all.iter().map(|r| r.conn.id.as_str()).collect::<Vec<_>>(),
            want,
            "load_all is the batches end to end"
        );

        // A value moved from another row, in the second batch and in the last one: the load
        // fails on the first, by name (the rows at those places of the load's order).
        let moved = ledger.stored_refresh_token("c00000").await;
        let first_bad = want[LOAD_BATCH + 3].clone();
        ledger
            .overwrite_stored_refresh_token(&first_bad, &moved)
            .await;
        ledger
            .overwrite_stored_refresh_token(&want[n - 2], &moved)
            .await;
        let err = ledger.load_all().await.unwrap_err().to_string();
        assert!(
            err.contains(&format!("refresh_token of connection {first_bad}")),
            "{err}"
        );
        let (sink, mut batches) = tokio::sync::mpsc::channel(1);
        let loading = tokio::spawn({
            let ledger = ledger.clone();
            async move { ledger.load_batches(sink).await }
        });
        while batches.recv().await.is_some() {}
        let err = loading.await.unwrap().unwrap_err().to_string();
        assert!(err.contains(&first_bad), "{err}");
    }

    #[tokio::test]
    async fn compare_and_swap_refuses_a_stale_chain() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), &seal::KeySource::default()).unwrap();
        let rec = record("c1", "conf", "rt-1");
        ledger.insert(rec.clone(), vec![]).await.unwrap();
        let mut next = rec.clone();
        next.chain.refresh_token = Secret::new("rt-2");
        next.chain.version = 1;
        ledger.save_chain(next, 0, vec![]).await.unwrap();
        let mut stale = rec.clone();
        stale.chain.refresh_token = Secret::new("rt-9");
        stale.chain.version = 1;
        let err = ledger.save_chain(stale, 0, vec![]).await.unwrap_err();
        assert!(matches!(err, LedgerError::Conflict(_)), "{err}");
        let all = ledger.load_all().await.unwrap();
        assert_eq!(all[0].chain.refresh_token.expose(), "rt-2");
        // A chain commit never touches the account resolved meanwhile.
        ledger
            .set_account("c1".into(), "acct-new".into(), Utc::now(), vec![])
            .await
            .unwrap();
        let mut later = all[0].clone();
        later.conn.account_id = None;
        later.chain.version = 2;
        ledger.save_chain(later, 1, vec![]).await.unwrap();
        let all = ledger.load_all().await.unwrap();
        assert_eq!(all[0].conn.account_id.as_deref(), Some("acct-new"));
    }

    #[tokio::test]
    async fn labels_and_accounts_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), &seal::KeySource::default()).unwrap();
        ledger
            .insert(record("c1", "conf", "a"), vec![])
            .await
            .unwrap();
        let err = ledger
            .insert(record("c2", "conf", "b"), vec![])
            .await
            .unwrap_err();
        assert!(matches!(err, LedgerError::LabelTaken(_)));
        let mut same_account = record("c3", "other", "c");
        same_account.conn.account_id = Some("acct-c1".into());
        assert!(ledger.insert(same_account, vec![]).await.is_err());
    }

    #[tokio::test]
    async fn second_open_of_the_same_state_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Ledger::open(dir.path(), &seal::KeySource::default()).unwrap();
        let err = Ledger::open(dir.path(), &seal::KeySource::default())
            .err()
            .expect("second open must fail");
        assert!(matches!(err, LedgerError::Locked(_)), "{err}");
    }

    #[tokio::test]
    async fn newer_schema_is_refused_and_older_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = rusqlite::Connection::open(dir.path().join("ledger.db")).unwrap();
            db.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .unwrap();
        }
        let err = Ledger::open(dir.path(), &seal::KeySource::default())
            .err()
            .expect("must refuse");
        assert!(err.to_string().contains("newer"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        {
            // An empty file at version 0 is what a first start or an older layout looks like.
            rusqlite::Connection::open(dir.path().join("ledger.db")).unwrap();
        }
        let ledger = Ledger::open(dir.path(), &seal::KeySource::default()).unwrap();
        let v: i64 = ledger
            .call(|db| Ok(db.pragma_query_value(None, "user_version", |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let mode: String = ledger
            .call(|db| Ok(db.pragma_query_value(None, "journal_mode", |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = ledger
            .call(|db| Ok(db.pragma_query_value(None, "synchronous", |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(sync, 2, "synchronous must be FULL");
    }

    /// Housekeeping on either ledger: events older than the retention go, and each
    /// connection keeps only its newest `keep` (ties in time broken by insertion order), in
    /// batches that revisit a connection with more to delete; nothing else goes, and a second
    /// run finds nothing to do.
    pub(crate) async fn check_compaction(ledger: AnyLedger) {
        let now = Utc::now();
        let day_ago = now - chrono::Duration::days(1);
        let long_ago = now - chrono::Duration::days(500);
        let hot = 2 * PRUNE_BATCH + 203;
        let keep = 100;
        let mut batch = Vec::new();
        for i in 0..hot {
            // Two events per second: the tie-break by insertion order matters.
            let at = day_ago + chrono::Duration::seconds((i / 2) as i64);
            batch.push((
                "c-hot".to_owned(),
                at,
                Event::new(EventKind::Other("read".into()), format!("e{i}")),
            ));
        }
        for i in 0..3 {
            batch.push((
                "c-quiet".to_owned(),
                day_ago,
                Event::new(EventKind::Other("x".into()), format!("q{i}")),
            ));
        }
        for i in 0..2 {
            batch.push((
                "c-old".to_owned(),
                long_ago,
                Event::new(EventKind::Other("x".into()), format!("o{i}")),
            ));
        }
        ledger.append_batch(batch).await.unwrap();
        let before = now - chrono::Duration::days(400);
        let done = ledger.maintain(before, keep).await.unwrap();
        assert_eq!(
            done.pruned,
            hot - keep + 2,
            "the old ones and the hot one's oldest"
        );
        assert!(
            done.transactions > done.pruned.div_ceil(PRUNE_BATCH),
            "at most PRUNE_BATCH events a transaction, the age pruning apart: {done:?}"
        );
        let left = ledger.events("c-hot".into(), None, 1000).await.unwrap();
        let messages: Vec<String> = left.iter().map(|e| e.message.clone()).collect();
        let newest: Vec<String> = (hot - keep..hot).rev().map(|i| format!("e{i}")).collect();
        assert_eq!(messages, newest, "the newest {keep} are kept");
        assert_eq!(
            ledger
                .events("c-quiet".into(), None, 1000)
                .await
                .unwrap()
                .len(),
            3
        );
        assert!(
            ledger
                .events("c-old".into(), None, 1000)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(ledger.maintain(before, keep).await.unwrap().pruned, 0);
    }

    #[tokio::test]
    async fn maintenance_compacts_by_age_and_by_count() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), &seal::KeySource::default()).unwrap();
        check_compaction(ledger.into()).await;
    }

    #[tokio::test]
    async fn maintenance_prunes_old_events_only() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), &seal::KeySource::default()).unwrap();
        let old = Utc::now() - chrono::Duration::days(400);
        ledger
            .append(
                None,
                old,
                vec![Event::new(EventKind::Other("old".into()), "x")],
            )
            .await
            .unwrap();
        ledger
            .append(
                None,
                Utc::now(),
                vec![Event::new(EventKind::Other("new".into()), "y")],
            )
            .await
            .unwrap();
        let n = ledger
            .maintain(Utc::now() - chrono::Duration::days(365), 10_000)
            .await
            .unwrap();
        assert_eq!(n.pruned, 1);
        let left: i64 = ledger
            .call(|db| Ok(db.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(left, 1);
    }

    /// Old events `0..n`, one a second, of connection `c0`.
    async fn old_events(ledger: &Ledger, n: usize) {
        let long_ago = Utc::now() - chrono::Duration::days(500);
        let batch = (0..n)
            .map(|i| {
                (
                    "c0".to_owned(),
                    long_ago + chrono::Duration::seconds(i as i64),
                    Event::new(EventKind::Other("old".into()), format!("o{i}")),
                )
            })
            .collect();
        ledger.append_batch(batch).await.unwrap();
    }

    #[tokio::test]
    async fn a_housekeeping_transaction_stops_at_its_budget_after_one_statement() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), &seal::KeySource::default()).unwrap();
        old_events(&ledger, 3 * PRUNE_CHUNK).await;
        let before = ms(Utc::now() - chrono::Duration::days(400));
        let spent = ledger
            .write(move |tx, _| prune_old(tx, before, Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(spent, (PRUNE_CHUNK, true), "one chunk, then the budget");
        let ample = ledger
            .write(move |tx, _| prune_old(tx, before, Duration::from_secs(60)))
            .await
            .unwrap();
        assert_eq!(
            ample,
            (2 * PRUNE_CHUNK, false),
            "the rest, and no more left"
        );
        // The count compaction: a connection over its bound is cut one chunk at a time
        // and visited again.
        old_events(&ledger, 3 * PRUNE_CHUNK).await;
        let first = ledger
            .write(|tx, _| compact_counts(tx, String::new(), 1, Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(
            first,
            (PRUNE_CHUNK, Some(String::new())),
            "c0 again next time"
        );
        let rest = ledger
            .write(|tx, _| compact_counts(tx, String::new(), 1, Duration::from_secs(60)))
            .await
            .unwrap();
        assert_eq!(rest.0, 2 * PRUNE_CHUNK - 1, "all but the newest");
    }

    #[tokio::test]
    async fn housekeeping_leaves_the_wal_empty() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), &seal::KeySource::default()).unwrap();
        old_events(&ledger, 2 * PRUNE_BATCH + 1).await;
        let done = ledger
            .maintain(Utc::now() - chrono::Duration::days(400), 10_000)
            .await
            .unwrap();
        assert_eq!(done.pruned, 2 * PRUNE_BATCH + 1);
        assert!(done.longest_hold > Duration::ZERO, "{done:?}");
        assert!(done.p99_hold <= done.longest_hold, "{done:?}");
        assert!(done.truncated, "{done:?}");
        let wal = std::fs::metadata(dir.path().join("ledger.db-wal")).unwrap();
        assert_eq!(wal.len(), 0, "the final checkpoint truncates the WAL");
    }

    #[tokio::test]
    async fn a_wal_grown_large_is_cut_back_when_the_writer_starts_it_over() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), &seal::KeySource::default()).unwrap();
        let wal = || {
            std::fs::metadata(dir.path().join("ledger.db-wal"))
                .unwrap()
                .len()
        };
        // One transaction far over the limit (a bulk import, say).
        let big = "x".repeat(1000);
        let batch = (0..3 * JOURNAL_SIZE_LIMIT as usize / 1000)
            .map(|i| {
                let e = Event::new(EventKind::Other("bulk".into()), big.clone());
                (format!("c{}", i % 7), Utc::now(), e)
            })
            .collect();
        ledger.append_batch(batch).await.unwrap();
        assert!(wal() > JOURNAL_SIZE_LIMIT as u64, "{}", wal());
        // Its commit checkpointed it (more than 1,000 pages); the next write starts it over.
        old_events(&ledger, 1).await;
        assert!(wal() <= JOURNAL_SIZE_LIMIT as u64, "{}", wal());
    }

    #[tokio::test]
    async fn housekeeping_does_not_wait_for_a_reader_while_it_holds_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), &seal::KeySource::default()).unwrap();
        old_events(&ledger, 10).await;
        // A reader in the middle of a read transaction, for the whole of housekeeping.
        let reader = rusqlite::Connection::open(dir.path().join("ledger.db")).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let seen: i64 = reader
            .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(seen, 10);
        let before = Utc::now() - chrono::Duration::days(400);
        let done = ledger.maintain(before, 10_000).await.unwrap();
        assert_eq!(done.pruned, 10);
        assert!(!done.truncated, "the reader was in the way: {done:?}");
        assert_eq!(done.checkpoint_tries, TRUNCATE_TRIES, "{done:?}");
        // Meanwhile the ledger took writes, and a later run truncates.
        old_events(&ledger, 1).await;
        reader.execute_batch("COMMIT").unwrap();
        let done = ledger.maintain(before, 10_000).await.unwrap();
        assert_eq!((done.pruned, done.truncated), (1, true), "{done:?}");
    }

    #[tokio::test]
    async fn events_are_append_only() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), &seal::KeySource::default()).unwrap();
        ledger
            .append(
                None,
                Utc::now(),
                vec![Event::new(EventKind::Other("x".into()), "y")],
            )
            .await
            .unwrap();
        let err = ledger
            .call(|db| Ok(db.execute("UPDATE events SET message = 'z'", [])?))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("append-only"), "{err}");
    }

    #[tokio::test]
    async fn sites_removed_are_kept_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), &seal::KeySource::default()).unwrap();
        let rec = record("c1", "conf", "a");
        ledger.insert(rec.clone(), vec![]).await.unwrap();
        let now = Utc::now();
        let jira = Site {
            cloud_id: "cloud-2".into(),
            url: "https://jira.atlassian.net".into(),
            name: "jira".into(),
            scopes: vec!["read:jira-work".into()].into(),
            last_seen_at: now,
        };
        let events = ledger
            .sync_sites("c1".into(), vec![jira.clone()], now)
            .await
            .unwrap();
        let kinds: Vec<_> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, vec!["site_added", "site_removed"]);
        let all = ledger.load_all().await.unwrap();
        assert_eq!(all[0].conn.sites.len(), 1);
        assert_eq!(&*all[0].conn.sites[0].cloud_id, "cloud-2");
        let kept: i64 = ledger
            .call(|db| {
                Ok(db.query_row(
                    "SELECT count(*) FROM sites WHERE removed_at IS NOT NULL",
                    [],
                    |r| r.get(0),
                )?)
            })
            .await
            .unwrap();
        assert_eq!(kept, 1);
    }

    fn key_file(dir: &Path, name: &str, byte: u8) -> PathBuf {
        let path = dir.join(name);
        let hex: String = std::iter::repeat_n(format!("{byte:02x}"), 32).collect();
        std::fs::write(&path, hex).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    fn raw_bytes(dir: &Path) -> Vec<u8> {
        let mut all = Vec::new();
        for f in ["ledger.db", "ledger.db-wal"] {
            if let Ok(b) = std::fs::read(dir.join(f)) {
                all.extend(b);
            }
        }
        all
    }

    fn contains(hay: &[u8], needle: &str) -> bool {
        hay.windows(needle.len()).any(|w| w == needle.as_bytes())
    }

    #[tokio::test]
    async fn tokens_are_sealed_at_rest_and_a_wrong_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let keys_a = seal::KeySource {
            key_file: Some(key_file(dir.path(), "a.key", 0xaa)),
            old_key_files: vec![],
        };
        let state = dir.path().join("state");
        let ledger = Ledger::open(&state, &keys_a).unwrap();
        let mut rec = record("c1", "conf", "rt-very-secret-1");
        rec.chain.previous = Some(Box::new((
            Secret::new("rt-very-secret-0"),
            rec.chain.rotated_at,
        )));
        rec.chain.access = Some(AccessToken {
            token: Secret::new("at-very-secret-1"),
            expires_at: rec.chain.rotated_at,
        });
        ledger.insert(rec, vec![]).await.unwrap();
        drop(ledger);
        let bytes = raw_bytes(&state);
        for secret in ["rt-very-secret-1", "rt-very-secret-0", "at-very-secret-1"] {
            assert!(
                !contains(&bytes, secret),
                "{secret} is in the ledger file in clear text"
            );
        }
        // A row copied onto another connection does not open.
        {
            let db = rusqlite::Connection::open(state.join("ledger.db")).unwrap();
            let mut other = record("c2", "other", "x");
            other.conn.account_id = Some("acct-c2".into());
            let ledger = Ledger::open(&state, &keys_a).unwrap();
            ledger.insert(other, vec![]).await.unwrap();
            drop(ledger);
            db.execute(
                "UPDATE connections SET refresh_token = (SELECT refresh_token FROM connections WHERE id = 'c1') WHERE id = 'c2'",
                [],
            )
            .unwrap();
        }
        let ledger = Ledger::open(&state, &keys_a).unwrap();
        let err = ledger
            .load_all()
            .await
            .expect_err("a swapped row must not open");
        assert!(err.to_string().contains("c2"), "{err}");
        drop(ledger);
        let keys_b = seal::KeySource {
            key_file: Some(key_file(dir.path(), "b.key", 0xbb)),
            old_key_files: vec![],
        };
        let err = Ledger::open(&state, &keys_b)
            .err()
            .expect("another key must be refused");
        assert!(matches!(err, LedgerError::WrongKey { .. }), "{err}");
        assert!(err.to_string().contains("b.key"), "{err}");
    }

    #[tokio::test]
    async fn rotation_reseals_every_row_and_a_plaintext_ledger_is_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let a = key_file(dir.path(), "a.key", 1);
        let b = key_file(dir.path(), "b.key", 2);
        let only = |k: &PathBuf| seal::KeySource {
            key_file: Some(k.clone()),
            old_key_files: vec![],
        };
        let ledger = Ledger::open(&state, &only(&a)).unwrap();
        ledger
            .insert(record("c1", "conf", "rt-1"), vec![])
            .await
            .unwrap();
        drop(ledger);
        let rotate = seal::KeySource {
            key_file: Some(b.clone()),
            old_key_files: vec![a.clone()],
        };
        let ledger = Ledger::open(&state, &rotate).unwrap();
        assert_eq!(
            ledger.load_all().await.unwrap()[0]
                .chain
                .refresh_token
                .expose(),
            "rt-1"
        );
        drop(ledger);
        let ledger = Ledger::open(&state, &only(&b)).expect("no row is left under the old key");
        assert_eq!(
            ledger.load_all().await.unwrap()[0]
                .chain
                .refresh_token
                .expose(),
            "rt-1"
        );
        drop(ledger);

        // A ledger of the previous version: schema 2, tokens in clear, no check value.
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        {
            let mut db = rusqlite::Connection::open(state.join("ledger.db")).unwrap();
            for sql in &MIGRATIONS[..2] {
                db.execute_batch(sql).unwrap();
            }
            db.pragma_update(None, "user_version", 2).unwrap();
            let tx = db.transaction().unwrap();
            let rec = record("c1", "conf", "rt-plain-legacy");
            let mut values = record_values(&rec, &Keyring::from_bytes([0; 32]));
            values[7] = rusqlite::types::Value::Text("rt-plain-legacy".into());
            tx.execute(
                &format!(
                    "INSERT INTO connections ({CONNECTION_COLUMNS}) VALUES ({})",
                    placeholders(CONNECTION_COLUMN_COUNT)
                ),
                rusqlite::params_from_iter(values),
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let ledger = Ledger::open(&state, &seal::KeySource::default()).unwrap();
        assert_eq!(
            ledger.load_all().await.unwrap()[0]
                .chain
                .refresh_token
                .expose(),
            "rt-plain-legacy"
        );
        ledger
            .maintain(Utc::now() - chrono::Duration::days(1), 10_000)
            .await
            .unwrap();
        drop(ledger);
        assert!(
            !contains(&raw_bytes(&state), "rt-plain-legacy"),
            "the plaintext ledger was not sealed"
        );
    }
}
