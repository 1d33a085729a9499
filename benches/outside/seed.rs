//! Seeding a stopped daemon's ledger with many connections, fast: one transaction, prepared
//! statements, tokens sealed with `tokend::ledger::seal` and the daemon's `ledger.key` (the
//! only piece of tokend's library the bench uses, as the integration tests do).
//!
//! The rows follow the schema of `src/ledger/mod.rs` (`MIGRATIONS`, columns of
//! `CONNECTION_COLUMNS`): times are Unix milliseconds, scopes space-separated, every token
//! column sealed with the connection id and the column name as associated data. The daemon
//! must have created the ledger (started once on an empty state dir) and be stopped.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rusqlite::params;
use tokend::ledger::seal::{KeySource, Keyring, aad};

use crate::fake::{self, FakeSite};

/// One connection to insert.
pub struct Row {
    pub id: String,
    pub label: String,
    pub account: String,
    pub refresh_token: String,
    /// The cached access token and its expiry (Unix ms), if any.
    pub access: Option<(String, i64)>,
    pub sites: Vec<FakeSite>,
    /// `refresh_token_rotated_at` and `refresh_token_used_at` (Unix ms).
    pub rotated_at_ms: i64,
}

/// The scopes of a row: what the fake grants for its sites, as the daemon stores them.
fn scopes_of(sites: &[FakeSite]) -> String {
    let mut scopes = vec!["offline_access".to_string(), "read:me".to_string()];
    for s in sites {
        for sc in &s.scopes {
            if !scopes.contains(sc) {
                scopes.push(sc.clone());
            }
        }
    }
    scopes.join(" ")
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Opens a ledger file with the daemon's pragmas (WAL, `synchronous=FULL`, foreign keys,
/// `secure_delete`).
pub fn open_like_daemon(path: &Path) -> Result<rusqlite::Connection> {
    let db =
        rusqlite::Connection::open(path).with_context(|| format!("open {}", path.display()))?;
    db.busy_timeout(Duration::from_secs(5))?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    db.pragma_update(None, "foreign_keys", "ON")?;
    db.pragma_update(None, "secure_delete", "ON")?;
    Ok(db)
}

/// The daemon's sealing key, from `<state_dir>/ledger.key`.
pub fn keyring(state_dir: &Path) -> Result<Keyring> {
    Keyring::load(&KeySource::default(), state_dir)
        .with_context(|| format!("load the ledger key of {}", state_dir.display()))
}

/// Inserts `rows` (and their sites) into the ledger of `state_dir` in one transaction;
/// returns the time it took.
pub fn seed(state_dir: &Path, rows: &[Row]) -> Result<Duration> {
    let started = Instant::now();
    let keys = keyring(state_dir)?;
    let mut db = open_like_daemon(&state_dir.join("ledger.db"))?;
    let tx = db.transaction()?;
    {
        let mut conn = tx
            .prepare(
                "INSERT INTO connections (id, label, provider, client_id, account_id, status, \
                 scopes, refresh_token, refresh_token_rotated_at, access_token, \
                 access_token_expires_at, consented_at, last_refresh_at, consecutive_failures, \
                 created_at, updated_at, chain_version, refresh_token_used_at) \
                 VALUES (?1, ?2, 'atlassian', ?3, ?4, 'active', ?5, ?6, ?7, ?8, ?9, ?7, ?7, 0, \
                 ?7, ?7, 0, ?7)",
            )
            .context(
                "prepare the connection insert (did the schema in src/ledger/mod.rs change?)",
            )?;
        let mut site = tx
            .prepare(
                "INSERT INTO sites (connection_id, cloud_id, url, name, scopes, first_seen_at, \
                 last_seen_at, removed_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, NULL)",
            )
            .context("prepare the site insert (did the schema in src/ledger/mod.rs change?)")?;
        for r in rows {
            let rt = keys.seal(&r.refresh_token, &aad(&r.id, "refresh_token"));
            let (at, at_exp) = match &r.access {
                Some((t, exp)) => (Some(keys.seal(t, &aad(&r.id, "access_token"))), Some(*exp)),
                None => (None, None),
            };
            conn.execute(params![
                r.id,
                r.label,
                fake::CLIENT_ID,
                r.account,
                scopes_of(&r.sites),
                rt,
                r.rotated_at_ms,
                at,
                at_exp,
            ])
            .with_context(|| format!("insert connection {}", r.label))?;
            for s in &r.sites {
                site.execute(params![
                    r.id,
                    s.cloud_id,
                    s.url,
                    s.name,
                    s.scopes.join(" "),
                    r.rotated_at_ms
                ])
                .with_context(|| format!("insert a site of {}", r.label))?;
            }
        }
    }
    tx.commit().context("commit the seed")?;
    db.close().map_err(|(_, e)| e).context("close the ledger")?;
    Ok(started.elapsed())
}

/// A connection id of the daemon's shape (32 hex digits) for row `i`.
pub fn id_of(i: usize) -> String {
    format!("{:032x}", 0xbe_0000_0000u64 + i as u64)
}
