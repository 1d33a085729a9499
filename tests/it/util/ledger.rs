//! Reading the daemon's ledger beside it: read-only opens (the daemon stays the only
//! writer) and the unsealing of token columns with the daemon's default key.

use std::time::Duration;

use super::TestDaemon;

/// How long a read-only open waits for the daemon's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The daemon's ledger, opened read-only; panics when it cannot be opened.
pub fn open_ledger(d: &TestDaemon) -> rusqlite::Connection {
    try_open_ledger(&d.ledger_path()).expect("open the ledger read-only")
}

/// A ledger file opened read-only, with a busy timeout.
pub fn try_open_ledger(path: &std::path::Path) -> rusqlite::Result<rusqlite::Connection> {
    let db =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    db.busy_timeout(BUSY_TIMEOUT)?;
    Ok(db)
}

/// The refresh token the daemon's ledger holds for a label (read-only, beside the daemon),
/// unsealed with the daemon's default key (`state/ledger.key`).
pub fn ledger_refresh_token(d: &TestDaemon, label: &str) -> String {
    try_ledger_refresh_token(d, label).expect("connection row")
}

/// [`ledger_refresh_token`], or `None` while there is no such row.
pub fn try_ledger_refresh_token(d: &TestDaemon, label: &str) -> Option<String> {
    let db = try_open_ledger(&d.ledger_path()).ok()?;
    let (id, sealed): (String, String) = db
        .query_row(
            "SELECT id, refresh_token FROM connections WHERE label = ?1",
            [label],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .ok()?;
    Some(unseal(d, &id, "refresh_token", &sealed))
}

/// Opens a sealed token column with the daemon's default key.
pub fn unseal(d: &TestDaemon, id: &str, column: &str, sealed: &str) -> String {
    use tokend::ledger::seal::{KeySource, Keyring, aad};
    let keys = Keyring::load(&KeySource::default(), &d.state_dir()).expect("the ledger key");
    let opened = keys
        .open(sealed, &aad(id, column))
        .expect("a sealed token opens");
    opened.plaintext.as_str().to_owned()
}
