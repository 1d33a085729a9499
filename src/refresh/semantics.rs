//! Tests only: the semantics of the engine's [`Store`] seam, run against both ledgers
//! (SQLite and PostgreSQL). It lives here, beside the trait, so that `ledger` never imports
//! `refresh` (the code map's layering).
//!
//! Each test is written once, over the engine's [`Store`] trait plus the few ledger calls
//! the daemon makes beyond it ([`Harness`]), and `both_stores!` instantiates it as
//! `semantics::sqlite::<name>` and `semantics::postgres::<name>`. The PostgreSQL ones run on
//! the test process's throw-away cluster (`crate::testpg`; skipped with a notice where no
//! server is installed, a failure under `TOKEND_REQUIRE_POSTGRES`).

use super::store::{Store, StoreError, delegate_store};
use crate::ledger::seal::KeySource;
use crate::ledger::{Ledger, PgLedger};
use crate::model::{
    AccessToken, Event, EventKind, EventPeer, LastError, Record, Site, StoredEvent, Time,
};
use crate::secret::Secret;
use chrono::{TimeZone, Utc};
use futures_util::future::BoxFuture;

fn from_ms(v: i64) -> Time {
    Utc.timestamp_millis_opt(v).single().unwrap_or_default()
}
use std::path::{Path, PathBuf};

/// What the tests need of a ledger beyond the [`Store`] trait.
trait Harness: Store {
    /// Whether this is the PostgreSQL ledger (where the two differ on purpose).
    const POSTGRES: bool;
    /// [`Ledger::events`].
    async fn events_of(&self, id: &str, since: Option<Time>, limit: usize) -> Vec<StoredEvent>;
    /// [`Ledger::append_batch`].
    async fn batch(&self, events: Vec<(String, Time, Event)>);
    /// [`Ledger::set_node`].
    fn node(&self, name: &str);
    /// The stored (sealed) `refresh_token` column of a connection.
    async fn raw_refresh_token(&self, id: &str) -> String;
    /// Overwrites the stored `refresh_token` column of a connection.
    async fn put_raw_refresh_token(&self, id: &str, value: &str);
}

/// A SQLite ledger in a temp dir.
struct Sqlite {
    ledger: Ledger,
    _dir: tempfile::TempDir,
}

impl Sqlite {
    fn new() -> Sqlite {
        let dir = tempfile::tempdir().unwrap();
        let key = test_key(dir.path());
        Sqlite {
            ledger: Ledger::open(&dir.path().join("state"), &key).unwrap(),
            _dir: dir,
        }
    }
}

/// A PostgreSQL ledger on a fresh database of the shared test cluster.
struct Postgres {
    ledger: PgLedger,
    _dir: tempfile::TempDir,
}

impl Postgres {
    async fn new() -> Option<Postgres> {
        let url = crate::testpg::database()?;
        let dir = tempfile::tempdir().unwrap();
        let key = test_key(dir.path());
        let ledger = PgLedger::connect(&url, &key, dir.path()).await.unwrap();
        Some(Postgres { ledger, _dir: dir })
    }
}

/// The same key file for both stores.
fn test_key(dir: &Path) -> KeySource {
    use std::os::unix::fs::PermissionsExt;
    let path: PathBuf = dir.join("test.key");
    std::fs::write(&path, "5a".repeat(32)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    KeySource {
        key_file: Some(path),
        old_key_files: vec![],
    }
}

delegate_store!(Sqlite => |harness| &harness.ledger, via Store, load: load);

impl Harness for Sqlite {
    const POSTGRES: bool = false;
    async fn events_of(&self, id: &str, since: Option<Time>, limit: usize) -> Vec<StoredEvent> {
        self.ledger.events(id.into(), since, limit).await.unwrap()
    }
    async fn batch(&self, events: Vec<(String, Time, Event)>) {
        self.ledger.append_batch(events).await.unwrap()
    }
    fn node(&self, name: &str) {
        self.ledger.set_node(name).unwrap()
    }
    async fn raw_refresh_token(&self, id: &str) -> String {
        self.ledger.stored_refresh_token(id).await
    }
    async fn put_raw_refresh_token(&self, id: &str, value: &str) {
        self.ledger.overwrite_stored_refresh_token(id, value).await
    }
}

delegate_store!(Postgres => |harness| &harness.ledger, via Store, load: load);

impl Harness for Postgres {
    const POSTGRES: bool = true;
    async fn events_of(&self, id: &str, since: Option<Time>, limit: usize) -> Vec<StoredEvent> {
        self.ledger.events(id.into(), since, limit).await.unwrap()
    }
    async fn batch(&self, events: Vec<(String, Time, Event)>) {
        self.ledger.append_batch(events).await.unwrap()
    }
    fn node(&self, name: &str) {
        self.ledger.set_node(name)
    }
    async fn raw_refresh_token(&self, id: &str) -> String {
        self.ledger.stored_refresh_token(id).await
    }
    async fn put_raw_refresh_token(&self, id: &str, value: &str) {
        self.ledger.overwrite_stored_refresh_token(id, value).await
    }
}

/// Instantiates each named test for both stores.
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(&super::Sqlite::new()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(store) = super::Postgres::new().await else { return };
                    super::$name(&store).await;
                }
            )*
        }
    };
}

both_stores!(
    insert_save_reload_round_trip,
    compare_and_swap_refuses_a_stale_chain,
    labels_and_accounts_are_unique,
    merge_moves_a_chain_only_at_both_versions,
    sync_sites_tells_each_change_once,
    delete_removes_a_connection_and_tells_it,
    events_come_newest_first_with_who_and_where,
    tokens_are_sealed_and_a_moved_value_does_not_open,
    control_characters_from_the_provider_never_stop_a_write,
    a_value_the_store_refuses_is_a_bad_request_not_unavailable,
    a_load_comes_in_label_order,
);

fn record(id: &str, label: &str, rt: &str) -> Record {
    let now = from_ms(Utc::now().timestamp_millis());
    let mut rec = crate::model::sample_record(id, label, rt, now);
    rec.conn
        .sites
        .push(site("cloud-1", "https://acme.atlassian.net", now));
    rec
}

fn site(cloud_id: &str, url: &str, at: Time) -> Site {
    Site {
        cloud_id: cloud_id.into(),
        url: url.into(),
        name: cloud_id.into(),
        scopes: vec!["read:page:confluence".into()].into(),
        last_seen_at: at,
    }
}

fn kinds(events: &[StoredEvent]) -> Vec<&str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

async fn insert_save_reload_round_trip(s: &impl Harness) {
    let rec = record("c1", "conf", "rt-1");
    s.insert(rec.clone(), vec![Event::new(EventKind::Imported, "x")])
        .await
        .unwrap();
    let mut next = rec.clone();
    next.chain.previous = Some(Box::new((Secret::new("rt-1"), next.chain.rotated_at)));
    next.chain.refresh_token = Secret::new("rt-2");
    next.chain.attempt_started_at = Some(next.conn.created_at);
    next.chain.access = Some(AccessToken {
        token: Secret::new("at-2"),
        expires_at: next.conn.created_at + chrono::Duration::hours(1),
    });
    next.chain.version = 1;
    next.conn.last_error = Some(Box::new(LastError {
        code: "x".into(),
        message: "y".into(),
        at: next.conn.created_at,
    }));
    next.conn.consecutive_failures = 3;
    s.save_chain(next.clone(), 0, vec![Event::new(EventKind::Rotated, "ok")])
        .await
        .unwrap();
    let all = s.load_all().await.unwrap();
    assert_eq!(all.len(), 1);
    let got = &all[0];
    assert_eq!(got.chain.refresh_token.expose(), "rt-2");
    assert_eq!(got.chain.version, 1);
    assert_eq!(got.chain.previous.as_ref().unwrap().0.expose(), "rt-1");
    assert_eq!(got.chain.previous.as_ref().unwrap().1, rec.chain.rotated_at);
    assert_eq!(got.chain.access.as_ref().unwrap().token.expose(), "at-2");
    assert_eq!(
        got.chain.access.as_ref().unwrap().expires_at,
        next.chain.access.as_ref().unwrap().expires_at
    );
    assert_eq!(got.chain.attempt_started_at, next.chain.attempt_started_at);
    assert_eq!(got.chain.used_at, rec.chain.used_at);
    assert_eq!(got.conn.sites, rec.conn.sites);
    assert_eq!(got.conn.last_error, next.conn.last_error);
    assert_eq!(got.conn.consecutive_failures, 3);
    assert_eq!(got.conn.scopes, rec.conn.scopes);
    assert_eq!(got.conn.account_id, rec.conn.account_id);
    assert_eq!(got.conn.created_at, rec.conn.created_at);
    let one = s.load("c1".into()).await.unwrap().unwrap();
    assert_eq!(one.chain.refresh_token.expose(), "rt-2");
    assert_eq!(one.conn.sites, got.conn.sites);
    assert!(s.load("c9".into()).await.unwrap().is_none());
    s.check_writable().await.unwrap();
}

async fn compare_and_swap_refuses_a_stale_chain(s: &impl Harness) {
    let rec = record("c1", "conf", "rt-1");
    s.insert(rec.clone(), vec![]).await.unwrap();
    let mut next = rec.clone();
    next.chain.refresh_token = Secret::new("rt-2");
    next.chain.version = 1;
    s.save_chain(next, 0, vec![]).await.unwrap();
    let mut stale = rec.clone();
    stale.chain.refresh_token = Secret::new("rt-9");
    stale.chain.version = 1;
    let err = s
        .save_chain(stale, 0, vec![Event::new(EventKind::Rotated, "lost")])
        .await
        .unwrap_err();
    assert_eq!(err, StoreError::Conflict("c1".into()));
    let all = s.load_all().await.unwrap();
    assert_eq!(all[0].chain.refresh_token.expose(), "rt-2");
    assert!(
        s.events_of("c1", None, 10).await.is_empty(),
        "a refused write appends no event"
    );
    // A chain commit never touches the account resolved meanwhile.
    s.set_account("c1".into(), "acct-new".into(), Utc::now(), vec![])
        .await
        .unwrap();
    let mut later = all[0].clone();
    later.conn.account_id = None;
    later.chain.version = 2;
    s.save_chain(later, 1, vec![]).await.unwrap();
    let all = s.load_all().await.unwrap();
    assert_eq!(all[0].conn.account_id.as_deref(), Some("acct-new"));
    // A connection that is gone is a conflict too.
    let err = s
        .save_chain(record("c9", "gone", "x"), 0, vec![])
        .await
        .unwrap_err();
    assert_eq!(err, StoreError::Conflict("c9".into()));
    let err = s
        .set_account("c9".into(), "a".into(), Utc::now(), vec![])
        .await
        .unwrap_err();
    assert_eq!(err, StoreError::Conflict("c9".into()));
}

async fn labels_and_accounts_are_unique(s: &impl Harness) {
    s.insert(record("c1", "conf", "a"), vec![]).await.unwrap();
    let err = s
        .insert(record("c2", "conf", "b"), vec![])
        .await
        .unwrap_err();
    assert_eq!(err, StoreError::LabelTaken("conf".into()));
    let mut same_account = record("c3", "other", "c");
    same_account.conn.account_id = Some("acct-c1".into());
    let err = s.insert(same_account, vec![]).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert_eq!(
        s.load_all().await.unwrap().len(),
        1,
        "nothing half-inserted"
    );
}

/// The load hands the connections over in label order as Rust orders strings (bytes, not
/// the database's collation): the engine builds its label order by appending each one.
async fn a_load_comes_in_label_order(s: &impl Harness) {
    for (id, label) in [
        ("c1", "b-label"),
        ("c2", "\u{e4}x"),
        ("c3", "a"),
        ("c4", "B"),
    ] {
        s.insert(record(id, label, id), vec![]).await.unwrap();
    }
    let labels: Vec<String> = s
        .load_all()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.conn.label)
        .collect();
    let mut sorted = labels.clone();
    sorted.sort_unstable();
    assert_eq!(labels, sorted);
    assert_eq!(labels, ["B", "a", "b-label", "\u{e4}x"]);
}

async fn merge_moves_a_chain_only_at_both_versions(s: &impl Harness) {
    let old = record("c1", "conf", "rt-old");
    s.insert(old.clone(), vec![]).await.unwrap();
    let mut new = record("c2", "new", "rt-new");
    new.conn.account_id = None;
    s.insert(new.clone(), vec![]).await.unwrap();
    let mut merged = old.clone();
    merged.chain = new.chain.clone();
    merged.chain.version = old.chain.version + 1;
    // `into` moved: nothing happens, `from` stays.
    let err = s
        .merge("c2".into(), 0, merged.clone(), 5, vec![])
        .await
        .unwrap_err();
    assert_eq!(err, StoreError::Conflict("c1".into()));
    assert!(s.load("c2".into()).await.unwrap().is_some(), "rolled back");
    // `from` moved.
    let err = s
        .merge("c2".into(), 3, merged.clone(), 0, vec![])
        .await
        .unwrap_err();
    assert_eq!(err, StoreError::Conflict("c2".into()));
    s.merge(
        "c2".into(),
        0,
        merged,
        0,
        vec![Event::new(EventKind::Merged, "chain of c2")],
    )
    .await
    .unwrap();
    assert!(s.load("c2".into()).await.unwrap().is_none());
    let got = s.load("c1".into()).await.unwrap().unwrap();
    assert_eq!(got.chain.refresh_token.expose(), "rt-new");
    assert_eq!(got.chain.version, 1);
    assert_eq!(got.conn.label, "conf");
    assert_eq!(kinds(&s.events_of("c2", None, 10).await), vec!["merged"]);
    let into = s.events_of("c1", None, 10).await;
    assert_eq!(kinds(&into), vec!["merged"]);
    assert_eq!(into[0].message, "chain of c2");
}

async fn sync_sites_tells_each_change_once(s: &impl Harness) {
    s.insert(record("c1", "conf", "a"), vec![]).await.unwrap();
    let now = from_ms(Utc::now().timestamp_millis());
    let jira = site("cloud-2", "https://jira.atlassian.net", now);
    let events = s
        .sync_sites("c1".into(), vec![jira.clone()], now)
        .await
        .unwrap();
    let told: Vec<_> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(told, vec!["site_added", "site_removed"]);
    let all = s.load_all().await.unwrap();
    assert_eq!(all[0].conn.sites, vec![jira.clone()]);
    // The same list again changes nothing; new scopes are told; a removed site comes back.
    assert!(
        s.sync_sites("c1".into(), vec![jira.clone()], now)
            .await
            .unwrap()
            .is_empty()
    );
    let mut wider = jira.clone();
    wider.scopes = [&wider.scopes[..], &["write:jira-work".to_owned()]]
        .concat()
        .into();
    let acme = site("cloud-1", "https://acme.atlassian.net", now);
    let events = s
        .sync_sites("c1".into(), vec![wider.clone(), acme.clone()], now)
        .await
        .unwrap();
    let told: Vec<_> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(told, vec!["site_scopes_changed", "site_added"]);
    let stored = s.events_of("c1", None, 10).await;
    assert_eq!(
        kinds(&stored),
        vec![
            "site_added",
            "site_scopes_changed",
            "site_removed",
            "site_added"
        ],
        "what was told is what was appended, newest first"
    );
    let got = s.load("c1".into()).await.unwrap().unwrap();
    assert_eq!(got.conn.sites, vec![acme, wider], "ordered by url");
}

async fn delete_removes_a_connection_and_tells_it(s: &impl Harness) {
    s.insert(record("c1", "conf", "a"), vec![]).await.unwrap();
    assert!(s.delete("c1".into(), Utc::now()).await.unwrap());
    assert!(s.load("c1".into()).await.unwrap().is_none());
    assert!(s.load_all().await.unwrap().is_empty());
    assert!(!s.delete("c1".into(), Utc::now()).await.unwrap());
    assert_eq!(kinds(&s.events_of("c1", None, 10).await), vec!["removed"]);
    // Its label and sites are free again.
    s.insert(record("c2", "conf", "b"), vec![]).await.unwrap();
    assert_eq!(
        s.load("c2".into()).await.unwrap().unwrap().conn.sites.len(),
        1
    );
}

async fn events_come_newest_first_with_who_and_where(s: &impl Harness) {
    let rec = record("c1", "conf", "rt-1");
    s.insert(
        rec.clone(),
        vec![
            Event::new(EventKind::Imported, "1"),
            Event::new(EventKind::AccountResolved, "2"),
        ],
    )
    .await
    .unwrap();
    s.node("node-a");
    let mut read = Event::new(EventKind::TokenRead, "3 token reads");
    read.peer = Some(EventPeer {
        uid: 1001,
        pid: Some(42),
    });
    read.count = 3;
    let later = rec.conn.updated_at + chrono::Duration::seconds(1);
    s.batch(vec![
        ("c1".into(), later, read),
        (
            "c2".into(),
            later,
            Event::new(EventKind::TokenRead, "elsewhere"),
        ),
    ])
    .await;
    let events = s.events_of("c1", None, 100).await;
    assert_eq!(
        kinds(&events),
        vec!["token_read", "account_resolved", "imported"],
        "newest first; one instant in the order appended, reversed"
    );
    assert_eq!(events[0].count, 3);
    assert_eq!(
        events[0].peer,
        Some(EventPeer {
            uid: 1001,
            pid: Some(42)
        })
    );
    assert_eq!(events[0].at, later);
    assert_eq!(events[0].node.as_deref(), Some("node-a"));
    assert_eq!(events[1].node, None, "recorded before the node was named");
    assert_eq!(events[1].peer, None);
    assert_eq!(events[1].count, 1);
    assert_eq!(s.events_of("c1", None, 1).await.len(), 1);
    assert_eq!(
        kinds(&s.events_of("c1", Some(later), 10).await),
        vec!["token_read"]
    );
    assert!(
        s.events_of("c1", Some(later + chrono::Duration::hours(1)), 10)
            .await
            .is_empty()
    );
}

async fn tokens_are_sealed_and_a_moved_value_does_not_open(s: &impl Harness) {
    let mut rec = record("c1", "conf", "rt-very-secret-1");
    rec.chain.previous = Some(Box::new((
        Secret::new("rt-very-secret-0"),
        rec.chain.rotated_at,
    )));
    s.insert(rec, vec![]).await.unwrap();
    let raw = s.raw_refresh_token("c1").await;
    assert!(raw.starts_with("s1:"), "sealed");
    assert!(!raw.contains("rt-very-secret-1"));
    let loaded = s.load("c1".into()).await.unwrap().unwrap();
    assert_eq!(loaded.chain.refresh_token.expose(), "rt-very-secret-1");
    let mut other = record("c2", "other", "x");
    other.conn.account_id = Some("acct-c2".into());
    s.insert(other, vec![]).await.unwrap();
    s.put_raw_refresh_token("c2", &raw).await;
    let err = s.load_all().await.expect_err("a moved value must not open");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("c2"), "{err}");
    assert!(!err.to_string().contains("rt-very-secret"), "{err}");
    assert!(
        s.load("c1".into()).await.unwrap().is_some(),
        "c1 still opens"
    );
}

/// A NUL (PostgreSQL's TEXT refuses it) in a granted scope or a site, through the provider's
/// parsers: what they let through is stored by both stores, and the grant's tokens are kept.
async fn control_characters_from_the_provider_never_stop_a_write(s: &impl Harness) {
    let grant = crate::provider::parse_token_answer(
        br#"{"access_token":"at-1","refresh_token":"rt-2","expires_in":3600,"scope":"read:jira-work bad\u0000scope"}"#,
    )
    .unwrap();
    let mut rec = record("c1", "conf", "a");
    rec.conn.scopes = grant.scopes.unwrap().into();
    rec.chain.refresh_token = grant.refresh_token.expect("the rotated token is kept");
    s.insert(rec, vec![]).await.unwrap();
    let now = from_ms(Utc::now().timestamp_millis());
    let sites = crate::provider::parse_sites_answer(
        br#"[{"id":"cloud-1","url":"https://acme.atlassian.net","name":"ac\u0000me","scopes":["read:page:confluence","x\u0000"]},
             {"id":"cloud-\u00002","url":"https://b.atlassian.net","name":"b","scopes":[]}]"#,
        now,
    )
    .unwrap();
    s.sync_sites("c1".into(), sites, now).await.unwrap();
    let got = s.load("c1".into()).await.unwrap().unwrap();
    assert_eq!(got.conn.scopes, vec!["read:jira-work".to_owned()]);
    assert_eq!(got.chain.refresh_token.expose(), "rt-2");
    assert_eq!(got.conn.sites.len(), 1);
    assert_eq!(&*got.conn.sites[0].name, "acme");
    assert_eq!(
        got.conn.sites[0].scopes,
        vec!["read:page:confluence".to_owned()]
    );
}

/// A value that did not come through the provider's parsers (an API input) with a NUL in
/// it: PostgreSQL refuses it as data (`StoreError::Refused`, naming what, never the value),
/// and onboarding answers that as a bad request, not as the ledger being down; SQLite
/// stores it as it is.
async fn a_value_the_store_refuses_is_a_bad_request_not_unavailable<H: Harness>(s: &H) {
    let mut rec = record("c1", "conf", "rt-1");
    rec.conn.sites[0].name = "bad\0name".into();
    let inserted = s.insert(rec, vec![]).await;
    if !H::POSTGRES {
        inserted.expect("SQLite stores a NUL");
        return;
    }
    let err = inserted.expect_err("PostgreSQL refuses a NUL in TEXT");
    assert!(
        matches!(&err, StoreError::Refused { what, sqlstate } if what.contains("site") && sqlstate.starts_with("22")),
        "{err:?}"
    );
    assert!(!err.to_string().contains("unavailable"), "{err}");
    assert!(!err.to_string().contains("bad"), "{err}");
    match super::onboard::store_failure(err) {
        super::Failure::BadRequest(m) => {
            assert!(m.contains("site") && m.contains("malformed"), "{m}");
            assert!(!m.contains("bad"), "{m}");
        }
        other => panic!("answered as {other:?}"),
    }
    assert!(
        s.load("c1".into()).await.unwrap().is_none(),
        "nothing stored"
    );
    s.insert(record("c2", "other", "rt-2"), vec![])
        .await
        .unwrap();
    let err = s
        .set_account("c2".into(), "acc\0x".into(), Utc::now(), vec![])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Refused { what, .. } if what == "account_id"),
        "{err:?}"
    );
}
