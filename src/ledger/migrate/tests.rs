//! Tests of `ledger::migrate` against a real throw-away PostgreSQL (`crate::testpg`): a
//! SQLite ledger with connections, sites (one removed), events of every shape and a held
//! attempt marker is copied, and read back through `PgLedger` as a daemon reads it; and
//! every refusal writes nothing.

use super::*;
use crate::ledger::Ledger;
use crate::model::{AccessToken, Event, EventKind, EventPeer, Record, Site, Time};
use crate::secret::Secret;
use crate::testpg;
use chrono::{TimeZone, Utc};
use std::time::Duration;

fn now() -> Time {
    Utc.timestamp_millis_opt(Utc::now().timestamp_millis())
        .unwrap()
}

fn site(cloud_id: &str, name: &str, at: Time) -> Site {
    Site {
        cloud_id: cloud_id.into(),
        url: format!("https://{name}.atlassian.net").into(),
        name: name.into(),
        scopes: vec!["read:page:confluence".into()].into(),
        last_seen_at: at,
    }
}

fn key_file(dir: &Path, name: &str, byte: u8) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    let hex: String = std::iter::repeat_n(format!("{byte:02x}"), 32).collect();
    std::fs::write(&path, hex).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn only(key: &Path) -> KeySource {
    KeySource {
        key_file: Some(key.to_path_buf()),
        old_key_files: vec![],
    }
}

/// The names of the files in `dir`, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Everything a daemon reads of a record, tokens included, as one comparable text.
fn view(rec: &Record) -> String {
    let c = &rec.conn;
    let ch = &rec.chain;
    format!(
        "{} {} {} {} {:?} {:?} {:?} {:?} {:?} {:?} {} {} {} | rt={} at={:?} used={:?} v={} prev={:?} marker={:?} access={:?}",
        c.id,
        c.label,
        c.provider,
        c.client_id,
        c.account_id,
        c.status,
        c.scopes,
        c.sites,
        c.last_refresh_at,
        c.last_error,
        c.consecutive_failures,
        c.created_at,
        c.updated_at,
        ch.refresh_token.expose(),
        ch.rotated_at,
        ch.used_at,
        ch.version,
        ch.previous
            .as_deref()
            .map(|(t, at)| (t.expose().to_owned(), *at)),
        ch.attempt_started_at,
        ch.access
            .as_ref()
            .map(|a| (a.token.expose().to_owned(), a.expires_at)),
    )
}

/// A SQLite ledger under `keys` in `state`: two connections with sites, one site removed,
/// a rotation with a held attempt marker, token reads with a peer and a count, a removed
/// connection's history and an event of no connection. The ledger is closed when it returns.
async fn build_sqlite(state: &Path, keys: &KeySource) {
    let ledger = Ledger::open(state, keys).unwrap();
    ledger.set_node("node-a").unwrap();
    let t = now();
    let mut c1 = crate::model::sample_record("c1", "conf", "rt-c1-0", t);
    c1.conn.sites = vec![site("cloud-1", "acme", t), site("cloud-2", "beta", t)];
    c1.chain.access = Some(AccessToken {
        token: Secret::new("at-c1-0"),
        expires_at: t + chrono::Duration::hours(1),
    });
    ledger
        .insert(
            c1.clone(),
            vec![Event::new(EventKind::Imported, "imported")],
        )
        .await
        .unwrap();
    let mut c2 = crate::model::sample_record("c2", "jira", "rt-c2-0", t);
    c2.conn.sites = vec![site("cloud-3", "gamma", t)];
    ledger.insert(c2, vec![]).await.unwrap();
    // A rotation, then an attempt whose outcome is unknown: its marker is held.
    let mut next = c1.clone();
    next.chain.previous = Some(Box::new((Secret::new("rt-c1-0"), t)));
    next.chain.refresh_token = Secret::new("rt-c1-1");
    next.chain.version = 1;
    ledger
        .save_chain(
            next.clone(),
            0,
            vec![Event::new(EventKind::Rotated, "rotated")],
        )
        .await
        .unwrap();
    next.chain.attempt_started_at = Some(t + chrono::Duration::seconds(5));
    next.chain.version = 2;
    ledger.save_chain(next, 1, vec![]).await.unwrap();
    // beta is no longer accessible: kept, with its removed_at.
    ledger
        .sync_sites(
            "c1".into(),
            vec![site("cloud-1", "acme", t)],
            t + chrono::Duration::seconds(9),
        )
        .await
        .unwrap();
    let mut read = Event::new(EventKind::TokenRead, "3 token reads");
    read.peer = Some(EventPeer {
        uid: 1001,
        pid: Some(42),
    });
    read.count = 3;
    ledger
        .append_batch(vec![("c2".into(), t, read)])
        .await
        .unwrap();
    let mut c3 = crate::model::sample_record("c3", "gone", "rt-c3-0", t);
    c3.conn.account_id = Some("acct-gone".into());
    ledger.insert(c3, vec![]).await.unwrap();
    assert!(ledger.delete("c3".into(), t).await.unwrap());
    ledger
        .append(
            None,
            t,
            vec![Event::new(EventKind::Other("maintenance".into()), "ran")],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn every_row_is_copied_as_it_is_and_reads_back_as_a_daemon_reads_it() {
    let Some(url) = testpg::database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // The default key: <state_dir>/ledger.key, created by the first open.
    let keys = KeySource::default();
    build_sqlite(&state, &keys).await;
    let sqlite_file = std::fs::read(state.join("ledger.db")).unwrap();
    let files_before = files(&state);

    let copied = copy_to_postgres(&state, &keys, &url).await.unwrap();
    assert_eq!(
        copied,
        Copied {
            source: state.join("ledger.db"),
            key_file: state.join("ledger.key"),
            connections: 2,
            markers: 1,
            sites: 3,
            removed_sites: 1,
            // imported, rotated, site_removed, token_read, c3's removed, maintenance
            events: 6,
        }
    );
    assert!(
        std::fs::read(state.join("ledger.db")).unwrap() == sqlite_file,
        "the SQLite file is left as it was"
    );
    assert_eq!(
        files(&state),
        files_before,
        "no -wal or -shm file is left behind"
    );

    let sqlite = Ledger::open(&state, &keys).unwrap();
    let pg = PgLedger::connect(&url, &keys, &state).await.unwrap();
    let mut want = sqlite.load_all().await.unwrap();
    let mut got = pg.load_all().await.unwrap();
    want.sort_by(|a, b| a.conn.id.cmp(&b.conn.id));
    got.sort_by(|a, b| a.conn.id.cmp(&b.conn.id));
    let want: Vec<String> = want.iter().map(view).collect();
    let got: Vec<String> = got.iter().map(view).collect();
    assert_eq!(got, want, "every chain, with its marker and sites");
    assert!(got[0].contains("rt=rt-c1-1") && got[0].contains("v=2"));
    assert!(
        got[0].contains("marker=Some("),
        "the held marker: {}",
        got[0]
    );
    for id in ["c1", "c2", "c3"] {
        assert_eq!(
            pg.events(id.into(), None, 100).await.unwrap(),
            sqlite.events(id.into(), None, 100).await.unwrap(),
            "the history of {id}, with node, peer and count"
        );
    }
    let c2 = pg.events("c2".into(), None, 100).await.unwrap();
    assert_eq!(c2[0].count, 3);
    assert_eq!(c2[0].node.as_deref(), Some("node-a"));

    // The removed site is there, with its times.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let removed: Vec<(String, i64, i64)> = client
        .query(
            "SELECT cloud_id, first_seen_at, removed_at FROM sites WHERE removed_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let db = rusqlite::Connection::open(state.join("ledger.db")).unwrap();
    let want_removed: (String, i64, i64) = db
        .query_row(
            "SELECT cloud_id, first_seen_at, removed_at FROM sites WHERE removed_at IS NOT NULL",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(removed, vec![want_removed]);
    // The sealed columns are the SQLite ones, byte for byte (not sealed again).
    let sealed: String = client
        .query_one("SELECT refresh_token FROM connections WHERE id = 'c1'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sealed, sqlite.stored_refresh_token("c1").await);

    // The ledger goes on: a new event comes after the copied history, a chain can be
    // claimed and committed under its fence.
    pg.append(
        Some("c1".into()),
        Utc::now() - chrono::Duration::days(1),
        vec![Event::new(EventKind::Other("after".into()), "x")],
    )
    .await
    .unwrap();
    let seqs: Vec<i64> = client
        .query("SELECT seq FROM events ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(seqs.len(), 7);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    let fence = pg
        .claim("c1".into(), "node-b".into(), Duration::from_secs(60))
        .await
        .unwrap()
        .expect("the chain can be claimed");
    let mut rec = pg.load_one("c1".into()).await.unwrap().unwrap();
    rec.chain.attempt_started_at = None;
    rec.chain.version = 3;
    pg.save_chain_fenced(rec, 2, fence, vec![]).await.unwrap();
}

/// Row counts in the target, or `None` when it has no `connections` table.
async fn target_counts(url: &str) -> Option<[i64; 4]> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let exists: bool = client
        .query_one("SELECT to_regclass('connections') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    if exists {
        Some(counts(&client).await.unwrap())
    } else {
        None
    }
}

#[tokio::test]
async fn a_running_daemon_a_non_empty_target_and_a_bad_url_are_refused_writing_nothing() {
    let Some(url) = testpg::database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let key = key_file(dir.path(), "a.key", 0xa1);
    build_sqlite(&state, &only(&key)).await;

    // Nothing to migrate.
    let err = copy_to_postgres(&dir.path().join("nowhere"), &only(&key), &url)
        .await
        .unwrap_err();
    assert!(matches!(err, MigrateError::NoLedger(_)), "{err}");

    // A daemon holds the state directory.
    let running = Ledger::open(&state, &only(&key)).unwrap();
    let err = copy_to_postgres(&state, &only(&key), &url)
        .await
        .unwrap_err();
    assert!(matches!(err, MigrateError::DaemonRunning(_)), "{err}");
    assert!(err.to_string().contains("stop it first"), "{err}");
    assert!(!err.is_usage());
    assert_eq!(target_counts(&url).await, None, "nothing was written");
    drop(running);

    // Not a PostgreSQL URL: a usage error, the URL never quoted.
    let err = copy_to_postgres(&state, &only(&key), "mysql://root:hunter2@db/x")
        .await
        .unwrap_err();
    assert!(err.is_usage(), "{err}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
    // A server that is not there: a runtime failure, the password never quoted.
    let err = copy_to_postgres(
        &state,
        &only(&key),
        "postgres://tokend:hunter2@127.0.0.1:1/tokend?sslmode=disable",
    )
    .await
    .unwrap_err();
    assert!(matches!(err, MigrateError::Target(_)), "{err}");
    assert!(!err.to_string().contains("hunter2"), "{err}");

    // The wrong key for the SQLite ledger; rows still under an old key.
    let other = key_file(dir.path(), "b.key", 0xb2);
    let err = copy_to_postgres(&state, &only(&other), &url)
        .await
        .unwrap_err();
    assert!(matches!(err, MigrateError::WrongKey { .. }), "{err}");
    let rotating = KeySource {
        key_file: Some(other.clone()),
        old_key_files: vec![key.clone()],
    };
    let err = copy_to_postgres(&state, &rotating, &url).await.unwrap_err();
    assert!(matches!(err, MigrateError::NotResealed { .. }), "{err}");
    assert_eq!(target_counts(&url).await, None, "nothing was written");

    // The first copy lands; a second finds the target not empty and writes nothing.
    copy_to_postgres(&state, &only(&key), &url).await.unwrap();
    let before = target_counts(&url).await.unwrap();
    assert_eq!(before, [2, 3, 6, 0]);
    let err = copy_to_postgres(&state, &only(&key), &url)
        .await
        .unwrap_err();
    assert!(matches!(err, MigrateError::TargetNotEmpty { .. }), "{err}");
    assert!(err.to_string().contains("wrote nothing"), "{err}");
    assert_eq!(target_counts(&url).await.unwrap(), before);

    // A target with no rows but another daemon's key.
    let Some(url_b) = testpg::database() else {
        return;
    };
    PgLedger::connect(&url_b, &only(&other), dir.path())
        .await
        .unwrap();
    let err = copy_to_postgres(&state, &only(&key), &url_b)
        .await
        .unwrap_err();
    assert!(matches!(err, MigrateError::TargetOtherKey { .. }), "{err}");
    assert_eq!(target_counts(&url_b).await.unwrap(), [0, 0, 0, 0]);
}

#[tokio::test]
async fn a_missing_key_is_refused_and_the_default_one_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    build_sqlite(&state, &KeySource::default()).await;
    std::fs::remove_file(state.join("ledger.key")).unwrap();
    let err = copy_to_postgres(
        &state,
        &KeySource::default(),
        "postgres://u@127.0.0.1:1/x?sslmode=disable",
    )
    .await
    .unwrap_err();
    assert!(matches!(err, MigrateError::NoKey(_)), "{err}");
    assert!(!state.join("ledger.key").exists());
    let credential = dir.path().join("credentials/ledger_key");
    let err = copy_to_postgres(&state, &only(&credential), "postgres://u@h/x")
        .await
        .unwrap_err();
    assert!(matches!(err, MigrateError::KeyFileMissing(_)), "{err}");
    assert!(
        err.to_string().contains("only while its service runs"),
        "{err}"
    );
}

#[tokio::test]
async fn a_history_longer_than_one_insert_is_copied_whole_and_in_order() {
    let Some(url) = testpg::database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let keys = KeySource::default();
    let n = 2 * ROWS_PER_INSERT + 345;
    {
        let ledger = Ledger::open(&state, &keys).unwrap();
        let t = now();
        ledger
            .insert(crate::model::sample_record("c1", "conf", "rt", t), vec![])
            .await
            .unwrap();
        let events = (0..n)
            .map(|i| {
                let at = t + chrono::Duration::milliseconds((i / 3) as i64);
                (
                    "c1".to_owned(),
                    at,
                    Event::new(EventKind::TokenRead, format!("read {i}")),
                )
            })
            .collect();
        ledger.append_batch(events).await.unwrap();
    }
    let copied = copy_to_postgres(&state, &keys, &url).await.unwrap();
    assert_eq!(copied.events, n);
    let sqlite = Ledger::open(&state, &keys).unwrap();
    let pg = PgLedger::connect(&url, &keys, &state).await.unwrap();
    assert_eq!(
        pg.events("c1".into(), None, n + 1).await.unwrap(),
        sqlite.events("c1".into(), None, n + 1).await.unwrap(),
        "the same history in the same order (equal times ordered by seq)"
    );
}
