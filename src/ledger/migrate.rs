//! `tokend migrate-ledger`: copies a SQLite ledger into an empty PostgreSQL ledger, checks
//! the copy, and leaves the SQLite file as it was (a backup).
//!
//! [`copy_to_postgres`] holds the state directory's lock for the whole run (so no daemon
//! starts on it meanwhile, and a running one is refused), reads the SQLite file in one
//! snapshot (a connection that may only read), and writes everything into PostgreSQL in **one** transaction: every
//! connection row (its chain version, its attempt marker, its failure record), every site
//! (removed ones too, with their times), every event (its node, peer and count, and its
//! `seq`, so that the history keeps its order). Before the commit, the same transaction
//! reads the rows back and compares them, column by column, with the SQLite ones, and opens
//! every sealed token with the key; after the commit, [`PgLedger::load_all`] reads the
//! ledger as a daemon would.
//!
//! **Sealed tokens are copied as they are**, never opened and sealed again: the associated
//! data of a sealed value is `tokend:<connection id>:<column>` and the format (`s1:`) is the
//! same in both ledgers, so the key file that opens the SQLite rows opens the copies. The
//! SQLite ledger must therefore be sealed under `daemon.key_file` alone (a row under an old
//! key or in clear text is refused: starting the daemon once re-seals it). The PostgreSQL
//! ledger's key check value is written by its own migration, under the same key.
//!
//! A target is empty when it has no connection, site, event or claim row: the schema may be
//! there already (a previous attempt that failed before its commit leaves exactly that).
//! An emptiness check runs before anything is written, and again under table locks inside
//! the copy's transaction.

use super::pg::{PgError, PgLedger};
use super::seal::{self, KeySource, Keyring};
use super::{BUSY_TIMEOUT, CONNECTION_COLUMNS, SCHEMA_VERSION, lock_state_dir};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokio_postgres::types::ToSql;

/// Rows inserted per statement: at most 24 parameters each (a connection row), so at most
/// 24 000 per statement, below PostgreSQL's 65 535, and few round trips for a long history.
const ROWS_PER_INSERT: usize = 1000;

/// The token columns of a connection row: sealed, copied as they are.
const SEALED_COLUMNS: [&str; 3] = ["refresh_token", "previous_refresh_token", "access_token"];

/// One table as copied: its columns (the same names and meanings in both ledgers), which of
/// them are text (the others are integers: times in milliseconds, counters, versions), and
/// how an insert must be phrased.
struct Table {
    name: &'static str,
    columns: &'static str,
    text: &'static [&'static str],
    /// `events.seq` is an identity column in PostgreSQL: its values are copied, not drawn.
    overriding: bool,
}

const CONNECTIONS: Table = Table {
    name: "connections",
    columns: CONNECTION_COLUMNS,
    text: &[
        "id",
        "label",
        "provider",
        "client_id",
        "account_id",
        "status",
        "scopes",
        "refresh_token",
        "previous_refresh_token",
        "access_token",
        "last_error_code",
        "last_error_message",
    ],
    overriding: false,
};

const SITES: Table = Table {
    name: "sites",
    columns: "connection_id, cloud_id, url, name, scopes, first_seen_at, last_seen_at, removed_at",
    text: &["connection_id", "cloud_id", "url", "name", "scopes"],
    overriding: false,
};

const EVENTS: Table = Table {
    name: "events",
    columns: "seq, at, connection_id, kind, message, node, peer_uid, peer_pid, count",
    text: &["connection_id", "kind", "message", "node"],
    overriding: true,
};

impl Table {
    fn column_names(&self) -> Vec<&'static str> {
        self.columns.split(", ").map(str::trim).collect()
    }

    fn index(&self, column: &str) -> usize {
        self.column_names()
            .iter()
            .position(|c| *c == column)
            .unwrap_or_else(|| panic!("{column} is a column of {}", self.name))
    }
}

/// One column value. No `Debug`: a connection row holds sealed tokens, which are nobody's
/// business even sealed.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Cell {
    Text(Option<String>),
    Int(Option<i64>),
}

impl Cell {
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Cell::Text(v) => v,
            Cell::Int(v) => v,
        }
    }

    fn text(&self) -> Option<&str> {
        match self {
            Cell::Text(v) => v.as_deref(),
            Cell::Int(_) => None,
        }
    }

    fn int(&self) -> Option<i64> {
        match self {
            Cell::Int(v) => *v,
            Cell::Text(_) => None,
        }
    }
}

type Row = Vec<Cell>;

/// The SQLite ledger as read, in one snapshot.
struct Snapshot {
    connections: Vec<Row>,
    sites: Vec<Row>,
    events: Vec<Row>,
}

/// What a migration copied (and checked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Copied {
    /// The SQLite file, left as it was.
    pub source: PathBuf,
    /// The key file that opens every sealed token of both ledgers.
    pub key_file: PathBuf,
    /// Connection rows.
    pub connections: usize,
    /// Connections whose refresh attempt had not ended (attempt marker set): the first
    /// daemon on the new ledger retries them inside the reuse leeway.
    pub markers: usize,
    /// Site rows, removed ones included.
    pub sites: usize,
    /// Of those, sites no longer accessible (kept with their `removed_at`).
    pub removed_sites: usize,
    /// Event rows.
    pub events: usize,
}

/// Why a migration did not happen. No variant carries a secret: the URL is never quoted,
/// nor is a token or a row.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// `<state_dir>/ledger.db` does not exist.
    #[error(
        "there is no SQLite ledger at {0}: nothing to migrate (is --config the daemon's configuration, and daemon.state_dir its state directory?)"
    )]
    NoLedger(PathBuf),
    /// A daemon holds the state directory's lock.
    #[error(
        "a tokend daemon is running on the state directory {0} (it holds tokend.lock): stop it first (e.g. systemctl stop tokend), then migrate; the copy must see a ledger nobody writes"
    )]
    DaemonRunning(PathBuf),
    /// The default key file is missing (it would otherwise be created, opening nothing).
    #[error(
        "the ledger key {0} does not exist: migrate-ledger needs the key the SQLite ledger is sealed with (set daemon.key_file to it)"
    )]
    NoKey(PathBuf),
    /// `daemon.key_file` does not exist.
    #[error(
        "the ledger key {0} does not exist; a systemd credential (/run/credentials/...) exists only while its service runs: give migrate-ledger a copy of the configuration whose daemon.key_file names the key file itself (e.g. /etc/tokend/ledger_key)"
    )]
    KeyFileMissing(PathBuf),
    /// A key file could not be read.
    #[error(transparent)]
    Key(#[from] seal::KeyError),
    /// The SQLite ledger is not at this build's schema.
    #[error(
        "the SQLite ledger {path} has schema version {found}, and this tokend copies version {supported}: {advice}"
    )]
    Schema {
        /// The SQLite file.
        path: PathBuf,
        /// Its `user_version`.
        found: i64,
        /// [`SCHEMA_VERSION`].
        supported: i64,
        /// What to do about it.
        advice: &'static str,
    },
    /// The configured key does not open the SQLite ledger.
    #[error(
        "the SQLite ledger {path} is sealed with another key: {key_file} does not open it; set daemon.key_file to the key it was sealed with"
    )]
    WrongKey {
        /// The SQLite file.
        path: PathBuf,
        /// The key that was tried.
        key_file: PathBuf,
    },
    /// Some rows are not sealed under `daemon.key_file` (an old key, or clear text).
    #[error(
        "the SQLite ledger {path} still has tokens not sealed under {key_file} ({what}); start the daemon once with this configuration (it re-seals every row under daemon.key_file), stop it, then migrate"
    )]
    NotResealed {
        /// The SQLite file.
        path: PathBuf,
        /// `daemon.key_file`.
        key_file: PathBuf,
        /// Which row and column, or the key check value.
        what: String,
    },
    /// The SQLite file could not be read.
    #[error("cannot read the SQLite ledger {path}: {reason}")]
    Source {
        /// The SQLite file.
        path: PathBuf,
        /// What went wrong (never a value).
        reason: String,
    },
    /// The URL is not a usable PostgreSQL URL (a usage error: exit 2).
    #[error("the target is not a usable PostgreSQL URL: {0}")]
    Url(String),
    /// The target already holds rows: nothing was written.
    #[error(
        "the target database is not empty ({connections} connections, {sites} sites, {events} events, {claims} claims): migrate-ledger copies only into an empty ledger, and wrote nothing; use a new database (createdb), or, after a failed attempt, drop this one and create it again"
    )]
    TargetNotEmpty {
        /// Connection rows found.
        connections: i64,
        /// Site rows found.
        sites: i64,
        /// Event rows found.
        events: i64,
        /// Claim rows found.
        claims: i64,
    },
    /// The target's key check value is another key's: nothing was written.
    #[error(
        "the target database already holds a tokend ledger sealed with another key ({key_file} does not open it): migrate-ledger wrote nothing; use a new, empty database"
    )]
    TargetOtherKey {
        /// `daemon.key_file`.
        key_file: PathBuf,
    },
    /// PostgreSQL failed or could not be reached.
    #[error("{0}")]
    Target(PgError),
    /// The copy, read back inside its transaction, differs from the SQLite ledger: it was
    /// rolled back.
    #[error(
        "the copy does not match the SQLite ledger ({0}); it was rolled back, the target is still empty"
    )]
    Mismatch(String),
    /// The committed copy does not read back as a daemon would need it.
    #[error(
        "the committed copy does not read back as the SQLite ledger ({0}); do not start a daemon on it: drop the database, create it again and retry (the SQLite ledger is untouched)"
    )]
    ReadBack(String),
}

impl MigrateError {
    /// Whether the command line was wrong (the URL), rather than the world.
    pub fn is_usage(&self) -> bool {
        matches!(self, MigrateError::Url(_))
    }
}

impl From<PgError> for MigrateError {
    fn from(e: PgError) -> MigrateError {
        match e {
            // PgError::Url's own text speaks of `ledger.url`; here the URL is an argument.
            PgError::Url(reason) => MigrateError::Url(reason),
            PgError::WrongKey { key_file } => MigrateError::TargetOtherKey { key_file },
            e => MigrateError::Target(e),
        }
    }
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(e: tokio_postgres::Error) -> MigrateError {
        MigrateError::Target(e.into())
    }
}

/// Copies the SQLite ledger of `state_dir` (sealed with `keys`) into the empty PostgreSQL
/// ledger at `url`, checks the copy, and reports what it copied. The SQLite file is only
/// read; on any error before the commit, the target holds no row.
pub async fn copy_to_postgres(
    state_dir: &Path,
    keys: &KeySource,
    url: &str,
) -> Result<Copied, MigrateError> {
    let path = state_dir.join("ledger.db");
    if !path.is_file() {
        return Err(MigrateError::NoLedger(path));
    }
    // Held until the copy is checked: no daemon starts on this state directory meanwhile.
    let _lock = lock_state_dir(state_dir).map_err(|e| match e {
        super::LedgerError::Locked(dir) => MigrateError::DaemonRunning(dir),
        e => MigrateError::Source {
            path: path.clone(),
            reason: e.to_string(),
        },
    })?;
    match &keys.key_file {
        Some(key) if !key.exists() => return Err(MigrateError::KeyFileMissing(key.clone())),
        Some(_) => {}
        None => {
            // Never let `Keyring::load` create a new key: it would open nothing.
            let default = state_dir.join(seal::DEFAULT_KEY_FILE);
            if !default.is_file() {
                return Err(MigrateError::NoKey(default));
            }
        }
    }
    // Checks the URL before reading anything; opens no connection yet.
    let target = PgLedger::unmigrated(url, keys, state_dir)?;
    let keyring = target.keyring();
    let snapshot = {
        let (file, keys) = (path.clone(), keys.clone());
        let state_dir = state_dir.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let keyring = Keyring::load(&keys, &state_dir)?;
            read_sqlite(&file, &keyring)
        })
        .await
        .map_err(|e| MigrateError::Source {
            path: path.clone(),
            reason: format!("the reading task failed: {e}"),
        })??
    };
    refuse_non_empty(&target).await?;
    target.migrate_and_check_key().await?;
    copy(&target, &snapshot).await?;
    read_back(&target, &snapshot).await?;
    let removed_at = SITES.index("removed_at");
    let marker = CONNECTIONS.index("attempt_started_at");
    Ok(Copied {
        source: path,
        key_file: keyring.key_file().to_path_buf(),
        connections: snapshot.connections.len(),
        markers: snapshot
            .connections
            .iter()
            .filter(|r| r[marker].int().is_some())
            .count(),
        sites: snapshot.sites.len(),
        removed_sites: snapshot
            .sites
            .iter()
            .filter(|r| r[removed_at].int().is_some())
            .count(),
        events: snapshot.events.len(),
    })
}

/// Reads the whole SQLite ledger in one read transaction and checks that every token is
/// sealed under the current key.
///
/// The connection may read only (`query_only`), but is opened read-write: a read-only one
/// would create the `-wal` and `-shm` files of a WAL database and leave them behind (only a
/// writer removes them when it closes). So the state directory is left as a stopped daemon
/// left it; a WAL left by a daemon that crashed is folded into the file at the close, as the
/// daemon's own next start would.
fn read_sqlite(path: &Path, keys: &Keyring) -> Result<Snapshot, MigrateError> {
    let source = |e: rusqlite::Error| MigrateError::Source {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut db = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(source)?;
    db.pragma_update(None, "query_only", true).map_err(source)?;
    db.busy_timeout(BUSY_TIMEOUT).map_err(source)?;
    let tx = db.transaction().map_err(source)?;
    let found: i64 = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(source)?;
    if found != SCHEMA_VERSION {
        return Err(MigrateError::Schema {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
            advice: if found < SCHEMA_VERSION {
                "start this tokend once on it (tokend run; it upgrades the ledger), stop it, then migrate"
            } else {
                "it was written by a newer tokend; migrate with that one"
            },
        });
    }
    let check: Option<String> = tx
        .query_row("SELECT value FROM keycheck WHERE id = 1", [], |r| r.get(0))
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })
        .map_err(source)?;
    match check.as_deref().map(|c| keys.verify(c)) {
        Some(Some(false)) => {}
        Some(None) => {
            return Err(MigrateError::WrongKey {
                path: path.to_path_buf(),
                key_file: keys.key_file().to_path_buf(),
            });
        }
        Some(Some(true)) | None => {
            return Err(MigrateError::NotResealed {
                path: path.to_path_buf(),
                key_file: keys.key_file().to_path_buf(),
                what: "the key check value".into(),
            });
        }
    }
    let snapshot = Snapshot {
        connections: read_table(&tx, &CONNECTIONS).map_err(source)?,
        sites: read_table(&tx, &SITES).map_err(source)?,
        events: read_table(&tx, &EVENTS).map_err(source)?,
    };
    // Read-only: nothing to commit; ending the transaction releases the snapshot.
    drop(tx);
    if let Err(what) = check_sealed(&snapshot.connections, keys) {
        return Err(MigrateError::NotResealed {
            path: path.to_path_buf(),
            key_file: keys.key_file().to_path_buf(),
            what,
        });
    }
    Ok(snapshot)
}

/// Every row of `table`, sorted (so that both ledgers' rows compare in one order).
fn read_table(tx: &rusqlite::Transaction<'_>, table: &Table) -> rusqlite::Result<Vec<Row>> {
    let names = table.column_names();
    let mut stmt = tx.prepare(&format!("SELECT {} FROM {}", table.columns, table.name))?;
    let mut rows = stmt
        .query_map([], |r| {
            names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    Ok(if table.text.contains(name) {
                        Cell::Text(r.get(i)?)
                    } else {
                        Cell::Int(r.get(i)?)
                    })
                })
                .collect::<rusqlite::Result<Row>>()
        })?
        .collect::<rusqlite::Result<Vec<Row>>>()?;
    rows.sort();
    Ok(rows)
}

/// Every sealed token of `connections` opens under the current key (not an old one, not
/// clear text); else which row and column does not.
fn check_sealed(connections: &[Row], keys: &Keyring) -> Result<(), String> {
    let id = CONNECTIONS.index("id");
    for row in connections {
        let id = row[id].text().unwrap_or_default();
        for column in SEALED_COLUMNS {
            let Some(value) = row[CONNECTIONS.index(column)].text() else {
                continue;
            };
            match keys.open(value, &seal::aad(id, column)) {
                Ok(opened) if !opened.stale => {}
                Ok(_) => return Err(format!("{column} of connection {id}")),
                Err(e) => return Err(format!("{column} of connection {id}: {e}")),
            }
        }
    }
    Ok(())
}

/// Row counts of the tables a copy fills, or zeros where a table does not exist yet.
async fn counts(client: &impl tokio_postgres::GenericClient) -> Result<[i64; 4], MigrateError> {
    let mut out = [0; 4];
    for (i, table) in ["connections", "sites", "events", "claims"]
        .into_iter()
        .enumerate()
    {
        let exists: bool = client
            .query_one("SELECT to_regclass($1::text) IS NOT NULL", &[&table])
            .await?
            .get(0);
        if exists {
            out[i] = client
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await?
                .get(0);
        }
    }
    Ok(out)
}

fn not_empty([connections, sites, events, claims]: [i64; 4]) -> Option<MigrateError> {
    (connections + sites + events + claims > 0).then_some(MigrateError::TargetNotEmpty {
        connections,
        sites,
        events,
        claims,
    })
}

/// Refuses a target with rows before anything (the schema included) is written to it.
async fn refuse_non_empty(target: &PgLedger) -> Result<(), MigrateError> {
    let client = target.pooled().await?;
    match not_empty(counts(&**client).await?) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn insert_sql(table: &Table, rows: usize) -> String {
    let n = table.column_names().len();
    let values = (0..rows)
        .map(|r| {
            let row = (1..=n)
                .map(|c| format!("${}", r * n + c))
                .collect::<Vec<_>>()
                .join(", ");
            format!("({row})")
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO {} ({}){} VALUES {values}",
        table.name,
        table.columns,
        if table.overriding {
            " OVERRIDING SYSTEM VALUE"
        } else {
            ""
        }
    )
}

async fn insert_rows(
    tx: &deadpool_postgres::Transaction<'_>,
    table: &Table,
    rows: &[Row],
) -> Result<(), MigrateError> {
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let params: Vec<&(dyn ToSql + Sync)> = chunk
            .iter()
            .flat_map(|row| row.iter().map(Cell::as_sql))
            .collect();
        tx.execute(&insert_sql(table, chunk.len()), &params).await?;
    }
    Ok(())
}

/// Every row of `table` in the target, sorted as [`read_table`] sorts.
async fn target_rows(
    tx: &deadpool_postgres::Transaction<'_>,
    table: &Table,
) -> Result<Vec<Row>, MigrateError> {
    let names = table.column_names();
    let rows = tx
        .query(
            &format!("SELECT {} FROM {}", table.columns, table.name),
            &[],
        )
        .await?;
    let mut out = rows
        .iter()
        .map(|r| {
            names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    Ok(if table.text.contains(name) {
                        Cell::Text(r.try_get(i)?)
                    } else {
                        Cell::Int(r.try_get(i)?)
                    })
                })
                .collect::<Result<Row, tokio_postgres::Error>>()
        })
        .collect::<Result<Vec<Row>, _>>()?;
    out.sort();
    Ok(out)
}

/// The copy, in one transaction that checks itself before it commits.
async fn copy(target: &PgLedger, snapshot: &Snapshot) -> Result<(), MigrateError> {
    let mut client = target.pooled().await?;
    let tx = client.transaction().await?;
    // Durable when the commit returns, whatever the server's default; and no daemon started
    // on the target meanwhile writes a row between the check and the copy.
    tx.batch_execute(
        "SET LOCAL synchronous_commit = on; \
         LOCK TABLE connections, sites, events, claims IN EXCLUSIVE MODE",
    )
    .await?;
    if let Some(e) = not_empty(counts(&*tx).await?) {
        return Err(e);
    }
    for (table, rows) in [
        (&CONNECTIONS, &snapshot.connections),
        (&SITES, &snapshot.sites),
        (&EVENTS, &snapshot.events),
    ] {
        insert_rows(&tx, table, rows).await?;
    }
    let seq = EVENTS.index("seq");
    if let Some(last) = snapshot.events.iter().filter_map(|r| r[seq].int()).max() {
        // The next event a daemon appends comes after the copied history.
        tx.execute(
            "SELECT setval(pg_get_serial_sequence('events', 'seq')::regclass, $1)",
            &[&last],
        )
        .await?;
    }
    for (table, rows) in [
        (&CONNECTIONS, &snapshot.connections),
        (&SITES, &snapshot.sites),
        (&EVENTS, &snapshot.events),
    ] {
        let copied = target_rows(&tx, table).await?;
        if copied.len() != rows.len() {
            return Err(MigrateError::Mismatch(format!(
                "{} {} rows in the copy, {} in the SQLite ledger",
                copied.len(),
                table.name,
                rows.len()
            )));
        }
        if let Some(i) = copied.iter().zip(rows.iter()).position(|(a, b)| a != b) {
            return Err(MigrateError::Mismatch(format!(
                "{} row {} differs",
                table.name,
                i + 1
            )));
        }
    }
    if let Err(what) = check_sealed(&target_rows(&tx, &CONNECTIONS).await?, target.keyring()) {
        return Err(MigrateError::Mismatch(format!(
            "{what} does not open with the key"
        )));
    }
    tx.commit().await?;
    Ok(())
}

/// Reads the committed ledger as a daemon does ([`PgLedger::load_all`] opens every token)
/// and checks every chain's version and active sites against the snapshot.
async fn read_back(target: &PgLedger, snapshot: &Snapshot) -> Result<(), MigrateError> {
    let records = target
        .load_all()
        .await
        .map_err(|e| MigrateError::ReadBack(e.to_string()))?;
    if records.len() != snapshot.connections.len() {
        return Err(MigrateError::ReadBack(format!(
            "{} connections, {} in the SQLite ledger",
            records.len(),
            snapshot.connections.len()
        )));
    }
    let (id, version) = (CONNECTIONS.index("id"), CONNECTIONS.index("chain_version"));
    let versions: HashMap<&str, i64> = snapshot
        .connections
        .iter()
        .map(|r| {
            (
                r[id].text().unwrap_or_default(),
                r[version].int().unwrap_or(-1),
            )
        })
        .collect();
    let (site_conn, removed_at) = (SITES.index("connection_id"), SITES.index("removed_at"));
    for rec in &records {
        let id = rec.conn.id.as_str();
        if versions.get(id).copied() != Some(rec.chain.version as i64) {
            return Err(MigrateError::ReadBack(format!(
                "connection {id}: chain version {} differs",
                rec.chain.version
            )));
        }
        let active = snapshot
            .sites
            .iter()
            .filter(|s| s[site_conn].text() == Some(id) && s[removed_at].int().is_none())
            .count();
        if rec.conn.sites.len() != active {
            return Err(MigrateError::ReadBack(format!(
                "connection {id}: {} sites, {active} in the SQLite ledger",
                rec.conn.sites.len()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
