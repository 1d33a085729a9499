//! Tests of what only the PostgreSQL ledger has (migrations under a lock, claims and fences,
//! TLS modes, errors without secrets), against a real server (`crate::testpg`). What both
//! ledgers share is tested on both in `refresh::semantics`.

use super::*;
use crate::ledger::from_ms;
use crate::model::AccessToken;
use crate::testpg;
use std::path::PathBuf;

fn record(id: &str, label: &str, rt: &str) -> Record {
    let now = from_ms(Utc::now().timestamp_millis());
    crate::model::sample_record(id, label, rt, now)
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

/// A fresh database and a key for it, or `None` when no server is installed (see testpg).
struct Db {
    url: String,
    dir: tempfile::TempDir,
    key: PathBuf,
}

impl Db {
    fn new() -> Option<Db> {
        let url = testpg::database()?;
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path(), "ledger.key", 0x42);
        Some(Db { url, dir, key })
    }
    async fn ledger(&self) -> PgLedger {
        PgLedger::connect(&self.url, &only(&self.key), self.dir.path())
            .await
            .unwrap()
    }
    async fn raw(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_once_under_a_lock_and_a_newer_schema_is_refused() {
    let Some(db) = Db::new() else { return };
    // Daemons starting together on an empty database: one migrates, the others wait for
    // its transaction and find the schema done.
    let mut starts = Vec::new();
    for _ in 0..4 {
        let (url, key, dir) = (db.url.clone(), db.key.clone(), db.dir.path().to_path_buf());
        starts.push(tokio::spawn(async move {
            PgLedger::connect(&url, &only(&key), &dir).await.map(|_| ())
        }));
    }
    for s in starts {
        s.await.unwrap().unwrap();
    }
    let raw = db.raw().await;
    let v: i32 = raw
        .query_one("SELECT version FROM tokend_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, SCHEMA_VERSION);
    let rows: i64 = raw
        .query_one("SELECT count(*) FROM tokend_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
    // Reconnecting changes nothing.
    let ledger = db.ledger().await;
    ledger
        .insert(record("c1", "conf", "rt-1"), vec![])
        .await
        .unwrap();
    drop(ledger);
    assert_eq!(db.ledger().await.load_all().await.unwrap().len(), 1);

    raw.execute(
        "UPDATE tokend_schema SET version = $1",
        &[&(SCHEMA_VERSION + 1)],
    )
    .await
    .unwrap();
    let err = PgLedger::connect(&db.url, &only(&db.key), db.dir.path())
        .await
        .err()
        .expect("a newer schema must be refused");
    assert!(matches!(err, PgError::TooNew { .. }), "{err}");
    assert!(err.to_string().contains("newer"), "{err}");
}

#[tokio::test]
async fn another_key_is_refused_and_rotation_reseals_every_row() {
    let Some(db) = Db::new() else { return };
    let ledger = db.ledger().await;
    ledger
        .insert(record("c1", "conf", "rt-1"), vec![])
        .await
        .unwrap();
    drop(ledger);
    let other = key_file(db.dir.path(), "other.key", 0x43);
    let err = PgLedger::connect(&db.url, &only(&other), db.dir.path())
        .await
        .err()
        .expect("another key must be refused");
    assert!(matches!(err, PgError::WrongKey { .. }), "{err}");
    assert!(err.to_string().contains("other.key"), "{err}");
    // A daemon without a key_file creates its own key, and is refused the same way.
    let fresh = tempfile::tempdir().unwrap();
    let err = PgLedger::connect(&db.url, &KeySource::default(), fresh.path())
        .await
        .err()
        .expect("a new default key must be refused");
    assert!(matches!(err, PgError::WrongKey { .. }), "{err}");

    let rotate = KeySource {
        key_file: Some(other.clone()),
        old_key_files: vec![db.key.clone()],
    };
    let ledger = PgLedger::connect(&db.url, &rotate, db.dir.path())
        .await
        .unwrap();
    assert_eq!(
        ledger.load_all().await.unwrap()[0]
            .chain
            .refresh_token
            .expose(),
        "rt-1"
    );
    drop(ledger);
    let ledger = PgLedger::connect(&db.url, &only(&other), db.dir.path())
        .await
        .expect("no row is left under the old key");
    assert_eq!(
        ledger.load_all().await.unwrap()[0]
            .chain
            .refresh_token
            .expose(),
        "rt-1"
    );
}

#[tokio::test]
async fn the_sqlite_ledgers_key_opens_its_sealed_rows_here() {
    let Some(db) = Db::new() else { return };
    let state = db.dir.path().join("sqlite");
    let sqlite = crate::ledger::Ledger::open(&state, &only(&db.key)).unwrap();
    let mut rec = record("c1", "conf", "rt-shared");
    rec.chain.access = Some(AccessToken {
        token: Secret::new("at-shared"),
        expires_at: rec.chain.rotated_at,
    });
    sqlite.insert(rec.clone(), vec![]).await.unwrap();
    let (rt, at): (String, String) = sqlite
        .call(|c| {
            Ok(c.query_row(
                "SELECT refresh_token, access_token FROM connections WHERE id = 'c1'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?)
        })
        .await
        .unwrap();
    drop(sqlite);
    let ledger = db.ledger().await;
    let mut other = rec.clone();
    other.chain.refresh_token = Secret::new("placeholder");
    ledger.insert(other, vec![]).await.unwrap();
    // The SQLite ledger's sealed values, copied as they are (what migrate-ledger does).
    db.raw()
        .await
        .execute(
            "UPDATE connections SET refresh_token = $1, access_token = $2 WHERE id = 'c1'",
            &[&rt, &at],
        )
        .await
        .unwrap();
    let got = ledger.load_one("c1".into()).await.unwrap().unwrap();
    assert_eq!(got.chain.refresh_token.expose(), "rt-shared");
    assert_eq!(got.chain.access.unwrap().token.expose(), "at-shared");
}

#[tokio::test]
async fn a_lapsed_claim_is_taken_over_and_its_late_commit_refused() {
    let Some(db) = Db::new() else { return };
    let ledger = db.ledger().await;
    let rec = record("c1", "conf", "rt-1");
    ledger.insert(rec.clone(), vec![]).await.unwrap();
    let lease = Duration::from_secs(60);

    let a = ledger
        .claim("c1".into(), "node-a".into(), lease)
        .await
        .unwrap()
        .expect("nobody holds it");
    assert_eq!(a.holder, "node-a");
    assert!(
        a.valid_for <= lease && a.valid_for > Duration::ZERO,
        "{a:?}"
    );
    assert_eq!(
        ledger
            .claim("c1".into(), "node-b".into(), lease)
            .await
            .unwrap(),
        None,
        "node-a's lease runs"
    );
    let renewed = ledger
        .renew("c1".into(), a.clone(), lease)
        .await
        .unwrap()
        .expect("node-a still holds it");
    assert_eq!(renewed.version, a.version, "a renewal is the same claim");
    // A claim that lapses at once (a zero lease): by the database's clock it has expired
    // by the next statement.
    let a = ledger
        .claim("c1".into(), "node-a".into(), Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert!(a.version > renewed.version, "every claim grows the version");
    let b = ledger
        .claim("c1".into(), "node-b".into(), lease)
        .await
        .unwrap()
        .expect("a lapsed claim is taken over");
    assert!(b.version > a.version);

    // node-a wakes up with its answer: its commit under the old fence is refused, even
    // though the chain version still matches.
    let mut late = rec.clone();
    late.chain.refresh_token = Secret::new("rt-from-a");
    late.chain.version = 1;
    let err = ledger
        .save_chain_fenced(late, 0, a.clone(), vec![])
        .await
        .unwrap_err();
    assert!(matches!(err, PgError::Conflict(_)), "{err}");
    assert_eq!(
        ledger.renew("c1".into(), a.clone(), lease).await.unwrap(),
        None
    );
    assert!(!ledger.release("c1".into(), a).await.unwrap());
    let stored = ledger.load_one("c1".into()).await.unwrap().unwrap();
    assert_eq!(stored.chain.refresh_token.expose(), "rt-1");
    assert_eq!(stored.chain.version, 0);

    // node-b commits under its fence, then releases; the next claim still grows.
    let mut next = rec.clone();
    next.chain.refresh_token = Secret::new("rt-from-b");
    next.chain.version = 1;
    ledger
        .save_chain_fenced(
            next,
            0,
            b.clone(),
            vec![Event::new(EventKind::Rotated, "ok")],
        )
        .await
        .unwrap();
    assert!(ledger.release("c1".into(), b.clone()).await.unwrap());
    let a2 = ledger
        .claim("c1".into(), "node-a".into(), lease)
        .await
        .unwrap()
        .expect("a released claim is free");
    assert!(a2.version > b.version);
    // The chain's compare-and-swap still holds under a valid fence.
    let mut stale = rec.clone();
    stale.chain.version = 1;
    let err = ledger
        .save_chain_fenced(stale, 0, a2, vec![])
        .await
        .unwrap_err();
    assert!(matches!(err, PgError::Conflict(_)), "{err}");
    let stored = ledger.load_one("c1".into()).await.unwrap().unwrap();
    assert_eq!(stored.chain.refresh_token.expose(), "rt-from-b");

    // No claim of a connection that is gone; deleting one drops its claim.
    let err = ledger
        .claim("nope".into(), "node-a".into(), lease)
        .await
        .unwrap_err();
    assert!(matches!(err, PgError::Conflict(_)), "{err}");
    assert!(ledger.delete("c1".into(), Utc::now()).await.unwrap());
    let left: i64 = db
        .raw()
        .await
        .query_one("SELECT count(*) FROM claims", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

#[tokio::test]
async fn an_expired_fence_commits_nothing_even_before_a_takeover() {
    let Some(db) = Db::new() else { return };
    let ledger = db.ledger().await;
    let rec = record("c1", "conf", "rt-1");
    ledger.insert(rec.clone(), vec![]).await.unwrap();
    let a = ledger
        .claim("c1".into(), "node-a".into(), Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    let mut next = rec.clone();
    next.chain.version = 1;
    let err = ledger
        .save_chain_fenced(next.clone(), 0, a.clone(), vec![])
        .await
        .unwrap_err();
    assert!(matches!(err, PgError::Conflict(_)), "{err}");
    // Renewed (nobody claimed meanwhile, so the fence still proves sole ownership), the
    // commit lands.
    let a = ledger
        .renew("c1".into(), a, Duration::from_secs(60))
        .await
        .unwrap()
        .expect("no other holder claimed");
    ledger.save_chain_fenced(next, 0, a, vec![]).await.unwrap();
}

#[tokio::test]
async fn errors_carry_no_secret() {
    let Some(db) = Db::new() else { return };
    let ledger = db.ledger().await;
    ledger
        .insert(record("c1", "conf", "rt-1"), vec![])
        .await
        .unwrap();
    // A unique violation's DETAIL quotes the row's key; the error must not.
    let mut twin = record("c2", "other", "rt-2");
    twin.conn.account_id = Some("acct-c1".into());
    let err = ledger.insert(twin, vec![]).await.unwrap_err().to_string();
    assert!(err.contains("SQLSTATE 23505"), "{err}");
    assert!(!err.contains("acct-c1"), "{err}");
    // A failed password login (the server answers, and refuses): neither the password
    // given nor the right one is in the message.
    let raw = db.raw().await;
    // Roles are cluster-wide: whichever test process made it first set the password.
    let _ = raw
        .batch_execute(&format!(
            "CREATE ROLE {} LOGIN PASSWORD 'right-hunter2-secret'",
            testpg::PASSWORD_ROLE
        ))
        .await;
    let url = db.url.replacen(
        "postgres@",
        &format!("{}:wrong-hunter2-secret@", testpg::PASSWORD_ROLE),
        1,
    );
    assert_ne!(url, db.url);
    let err = PgLedger::connect(&url, &only(&db.key), db.dir.path())
        .await
        .err()
        .expect("a wrong password is refused");
    assert!(matches!(err, PgError::Unavailable(_)), "{err}");
    let text = format!("{err} {err:?}");
    assert!(
        text.contains("28P01") || text.contains("password"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
}

#[tokio::test]
async fn a_released_claim_cannot_be_renewed() {
    let Some(db) = Db::new() else { return };
    let ledger = db.ledger().await;
    ledger
        .insert(record("c1", "conf", "rt-1"), vec![])
        .await
        .unwrap();
    let a = ledger
        .claim("c1".into(), "node-a".into(), Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    assert!(ledger.release("c1".into(), a.clone()).await.unwrap());
    let renewed = ledger
        .renew("c1".into(), a.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(renewed, None, "a released claim stays released");
    let mut next = record("c1", "conf", "rt-2");
    next.chain.version = 1;
    let err = ledger
        .save_chain_fenced(next, 0, a, vec![])
        .await
        .unwrap_err();
    assert!(matches!(err, PgError::Conflict(_)), "{err}");
}

#[tokio::test]
async fn a_value_the_server_refuses_is_not_unavailable() {
    let Some(db) = Db::new() else { return };
    let ledger = db.ledger().await;
    let mut rec = record("c1", "conf", "rt-1");
    rec.conn.sites = vec![Site {
        cloud_id: "cloud-1".into(),
        url: "https://a.atlassian.net".into(),
        name: "bad\0name".into(),
        scopes: Default::default(),
        last_seen_at: rec.conn.updated_at,
    }];
    let err = ledger.insert(rec, vec![]).await.unwrap_err();
    assert!(
        matches!(&err, PgError::Refused { what, sqlstate } if what.contains("site") && sqlstate.starts_with("22")),
        "{err:?}"
    );
    assert!(!err.to_string().contains("unavailable"), "{err}");
    assert!(!err.to_string().contains("bad"), "{err}");
    ledger
        .insert(record("c2", "other", "rt-2"), vec![])
        .await
        .unwrap();
    let err = ledger
        .set_account("c2".into(), "acc\0x".into(), Utc::now(), vec![])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PgError::Refused { what, .. } if what == "account_id"),
        "{err:?}"
    );
    assert!(!err.to_string().contains("unavailable"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_lock_holder_blocks_nobody_for_long() {
    let Some(db) = Db::new() else { return };
    let ledger = db.ledger().await;
    // Every transaction is bounded by the server, and every write is durable.
    let settings = ledger
        .tx(|tx, _keys| {
            Box::pin(async move {
                let mut out = Vec::new();
                for name in [
                    "lock_timeout",
                    "statement_timeout",
                    "idle_in_transaction_session_timeout",
                    "synchronous_commit",
                ] {
                    out.push(
                        tx.query_one(&format!("SHOW {name}"), &[])
                            .await?
                            .try_get::<_, String>(0)?,
                    );
                }
                Ok(out)
            })
        })
        .await
        .unwrap();
    assert_eq!(settings, ["3s", "8s", "10s", "on"]);
    let rec = record("c1", "conf", "rt-1");
    ledger.insert(rec.clone(), vec![]).await.unwrap();
    // Another daemon's transaction, stopped while it holds the row (it never commits nor
    // talks again), with the bounds tx() gives every transaction.
    let raw = db.raw().await;
    raw.batch_execute(&format!(
        "BEGIN; SET LOCAL idle_in_transaction_session_timeout = '{}ms'; \
         SELECT 1 FROM connections WHERE id = 'c1' FOR UPDATE",
        OPERATION_LIMITS.idle.as_millis()
    ))
    .await
    .unwrap();
    let mut next = rec.clone();
    next.chain.version = 1;
    next.chain.refresh_token = Secret::new("rt-2");
    // The write gives up at the lock timeout: a definite failure, not a hang.
    let err = ledger
        .save_chain(next.clone(), 0, vec![])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PgError::Unavailable(m) if m.contains("55P03")),
        "{err}"
    );
    // Once the server ends the stopped holder's transaction, the write lands.
    let mut tries = 0;
    loop {
        match ledger.save_chain(next.clone(), 0, vec![]).await {
            Ok(()) => break,
            Err(PgError::Unavailable(m)) if m.contains("55P03") && tries < 20 => tries += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        ledger
            .load_one("c1".into())
            .await
            .unwrap()
            .unwrap()
            .chain
            .refresh_token
            .expose(),
        "rt-2"
    );
    assert!(raw.is_closed() || raw.simple_query("SELECT 1").await.is_err());
}

#[tokio::test]
async fn a_role_without_create_starts_on_a_current_schema() {
    let Some(db) = Db::new() else { return };
    let ledger = db.ledger().await;
    ledger
        .insert(record("c1", "conf", "rt-1"), vec![])
        .await
        .unwrap();
    drop(ledger);
    let raw = db.raw().await;
    let dbname: String = raw
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    let role = format!("rw_{dbname}");
    raw.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN; \
         REVOKE CREATE ON SCHEMA public FROM PUBLIC; \
         GRANT USAGE ON SCHEMA public TO {role}; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}; \
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}"
    ))
    .await
    .unwrap();
    let url = db.url.replacen("postgres@", &format!("{role}@"), 1);
    // The role really cannot create.
    let (as_role, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    assert!(
        as_role
            .batch_execute("CREATE TABLE x (i int)")
            .await
            .is_err()
    );
    let ledger = PgLedger::connect(&url, &only(&db.key), db.dir.path())
        .await
        .expect("a current schema needs no CREATE");
    assert_eq!(ledger.load_all().await.unwrap().len(), 1);
    ledger
        .insert(
            record("c2", "other", "rt-2"),
            vec![Event::new(EventKind::parse("x"), "y")],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn maintenance_compacts_by_age_and_by_count() {
    let Some(db) = Db::new() else { return };
    crate::ledger::tests::check_compaction(db.ledger().await.into()).await;
}

#[tokio::test]
async fn maintenance_prunes_a_backlog_in_batches() {
    let Some(db) = Db::new() else { return };
    let ledger = db.ledger().await;
    let old = ms(Utc::now() - chrono::Duration::days(400));
    let total = (2 * PRUNE_BATCH + 7) as i64;
    db.raw()
        .await
        .execute(
            "INSERT INTO events (at, kind, message) SELECT $1, 'old', 'x' FROM generate_series(1::bigint, $2::bigint)",
            &[&old, &total],
        )
        .await
        .unwrap();
    ledger
        .append(
            None,
            Utc::now(),
            vec![Event::new(EventKind::parse("new"), "y")],
        )
        .await
        .unwrap();
    let n = ledger
        .maintain(Utc::now() - chrono::Duration::days(365), 10_000)
        .await
        .unwrap();
    assert_eq!(n.pruned as i64, total);
    assert!(n.transactions > 2, "PRUNE_BATCH a transaction: {n:?}");
    let left: i64 = db
        .raw()
        .await
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 1);
}

#[tokio::test]
async fn sslmode_require_refuses_a_server_without_tls_and_prefer_falls_back() {
    let Some(db) = Db::new() else { return };
    let require = db.url.replace("sslmode=disable", "sslmode=require");
    let err = PgLedger::connect(&require, &only(&db.key), db.dir.path())
        .await
        .err()
        .expect("the test server has no TLS");
    assert!(matches!(err, PgError::Unavailable(_)), "{err}");
    let prefer = db.url.replace("sslmode=disable", "sslmode=prefer");
    let ledger = PgLedger::connect(&prefer, &only(&db.key), db.dir.path())
        .await
        .expect("prefer connects without TLS");
    ledger.check_writable().await.unwrap();
}

#[tokio::test]
async fn events_are_append_only_and_maintenance_prunes_old_ones() {
    let Some(db) = Db::new() else { return };
    let ledger = db.ledger().await;
    let old = Utc::now() - chrono::Duration::days(400);
    ledger
        .append(None, old, vec![Event::new(EventKind::parse("old"), "x")])
        .await
        .unwrap();
    ledger
        .append(
            None,
            Utc::now(),
            vec![Event::new(EventKind::parse("new"), "y")],
        )
        .await
        .unwrap();
    let err = db
        .raw()
        .await
        .execute("UPDATE events SET message = 'z'", &[])
        .await
        .unwrap_err();
    assert!(describe(&err).contains("append-only"), "{}", describe(&err));
    let n = ledger
        .maintain(Utc::now() - chrono::Duration::days(365), 10_000)
        .await
        .unwrap();
    assert_eq!(n.pruned, 1);
    let left: i64 = db
        .raw()
        .await
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 1);
}

#[tokio::test]
async fn a_server_restart_is_survived() {
    // Its own cluster: crashing the shared one would fail the other tests.
    let Some(cluster) = testpg::Cluster::start() else {
        return;
    };
    let url = cluster.url(&cluster.create_database());
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "k", 1);
    let ledger = PgLedger::connect(&url, &only(&key), dir.path())
        .await
        .unwrap();
    ledger
        .insert(record("c1", "conf", "rt-1"), vec![])
        .await
        .unwrap();
    cluster.crash();
    let err = ledger.load_all().await.unwrap_err();
    assert!(matches!(err, PgError::Unavailable(_)), "{err}");
    cluster.restart();
    // The pooled connections died with the server: each is found closed and replaced. A
    // connection's death is noticed by its first use, so allow one failure per pooled one.
    let mut loaded = None;
    for _ in 0..=POOL_SIZE {
        if let Ok(all) = ledger.load_all().await {
            loaded = Some(all);
            break;
        }
    }
    let all = loaded.expect("the ledger reconnects by itself");
    assert_eq!(all[0].chain.refresh_token.expose(), "rt-1");
}

#[tokio::test]
async fn sslmodes_check_the_servers_certificate_as_libpq_does() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        (params, key, cert)
    };
    let (ca_params, ca_key, ca_cert) = ca("tokend test CA");
    let (_, _, other_cert) = ca("another CA");
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &Issuer::from_params(&ca_params, &ca_key))
        .unwrap();
    let Some(cluster) = testpg::Cluster::start_tls(&server_cert.pem(), &server_key.serialize_pem())
    else {
        return;
    };
    let name = cluster.create_database();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "k", 7);
    let trusted = dir.path().join("ca.pem");
    std::fs::write(&trusted, ca_cert.pem()).unwrap();
    let untrusted = dir.path().join("other.pem");
    std::fs::write(&untrusted, other_cert.pem()).unwrap();
    let cases: &[(&str, &str, Option<&Path>, bool)] = &[
        ("localhost", "verify-full", Some(&trusted), true),
        ("127.0.0.1", "verify-full", Some(&trusted), false), // the name is not in the cert
        ("127.0.0.1", "verify-ca", Some(&trusted), true),
        ("localhost", "verify-full", Some(&untrusted), false),
        ("localhost", "verify-ca", Some(&untrusted), false),
        ("localhost", "verify-full", None, false), // not a public root
        ("127.0.0.1", "require", None, true),      // encrypted, unchecked
        ("127.0.0.1", "require", Some(&untrusted), false), // a root file: as verify-ca
        ("127.0.0.1", "prefer", None, true),
        ("127.0.0.1", "disable", None, false), // the server takes TLS only
    ];
    for (host, mode, root, ok) in cases {
        let root = root
            .map(|p| format!("&sslrootcert={}", p.display()))
            .unwrap_or_default();
        let url = format!(
            "postgres://postgres@{host}:{}/{name}?sslmode={mode}{root}",
            cluster.port()
        );
        let got = PgLedger::connect(&url, &only(&key), dir.path()).await;
        match (got, ok) {
            (Ok(ledger), true) => ledger.check_writable().await.unwrap(),
            (Err(e), false) => assert!(matches!(e, PgError::Unavailable(_)), "{url}: {e}"),
            (Ok(_), false) => panic!("{url} must be refused"),
            (Err(e), true) => panic!("{url} must connect: {e}\n{}", cluster.log()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_racing_on_one_chain_win_once() {
    let Some(db) = Db::new() else { return };
    let daemons = [db.ledger().await, db.ledger().await, db.ledger().await];
    let rec = record("c1", "conf", "rt-0");
    daemons[0].insert(rec.clone(), vec![]).await.unwrap();
    // Every daemon claims at once: one holder.
    let mut claims = Vec::new();
    for (i, d) in daemons.iter().enumerate() {
        let d = d.clone();
        claims.push(tokio::spawn(async move {
            d.claim("c1".into(), format!("node-{i}"), Duration::from_secs(60))
                .await
                .unwrap()
        }));
    }
    let mut granted = Vec::new();
    for c in claims {
        granted.extend(c.await.unwrap());
    }
    assert_eq!(granted.len(), 1, "{granted:?}");
    // Every daemon commits its own next chain over version 0 at once: one lands.
    let mut commits = Vec::new();
    for (i, d) in daemons.iter().enumerate() {
        let d = d.clone();
        let mut next = rec.clone();
        next.chain.refresh_token = Secret::new(format!("rt-from-{i}"));
        next.chain.version = 1;
        commits.push(tokio::spawn(async move {
            d.save_chain(
                next,
                0,
                vec![Event::new(EventKind::Rotated, format!("by {i}"))],
            )
            .await
        }));
    }
    let mut won = Vec::new();
    for (i, c) in commits.into_iter().enumerate() {
        match c.await.unwrap() {
            Ok(()) => won.push(i),
            Err(PgError::Conflict(id)) => assert_eq!(id, "c1"),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(won.len(), 1, "{won:?}");
    let stored = daemons[1].load_one("c1".into()).await.unwrap().unwrap();
    assert_eq!(
        stored.chain.refresh_token.expose(),
        format!("rt-from-{}", won[0])
    );
    let events = daemons[2].events("c1".into(), None, 10).await.unwrap();
    assert_eq!(events.len(), 1, "only the winner's event was appended");
    assert_eq!(events[0].message, format!("by {}", won[0]));
}

/// Ten connections (`c0`..`c9`, `c9` needing consent) on one database, and two daemons'
/// ledgers on it named `node-a` and `node-b`.
async fn site_check_setup(db: &Db) -> (PgLedger, PgLedger) {
    let (a, b) = (db.ledger().await, db.ledger().await);
    a.set_node("node-a");
    b.set_node("node-b");
    for i in 0..10 {
        let mut rec = record(&format!("c{i}"), &format!("conf-{i}"), &format!("rt-{i}"));
        if i == 9 {
            rec.conn.status = crate::model::Status::NeedsReauth;
        }
        a.insert(rec, vec![]).await.unwrap();
    }
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_split_the_site_checks_and_each_is_due_once_per_period() {
    let Some(db) = Db::new() else { return };
    let (a, b) = site_check_setup(&db).await;
    let lease = Duration::from_secs(60);
    let again = Duration::from_secs(60);
    let (run_a, run_b) = (
        a.begin_site_checks().await.unwrap(),
        b.begin_site_checks().await.unwrap(),
    );
    // A row another daemon's claim has locked is skipped, not waited for.
    let mut raw = db.raw().await;
    let locker = raw.transaction().await.unwrap();
    locker
        .execute(
            "SELECT 1 FROM site_checks WHERE connection_id = 'c0' FOR UPDATE",
            &[],
        )
        .await
        .unwrap();
    let mut claimed = std::collections::BTreeMap::new();
    for (ledger, run, node) in [(&a, run_a, "a"), (&b, run_b, "b"), (&a, run_a, "a")] {
        let ids = ledger.claim_site_checks(run, 4, lease).await.unwrap();
        assert!(ids.len() <= 4, "{ids:?}");
        for id in ids {
            assert!(claimed.insert(id, node).is_none(), "claimed twice");
        }
    }
    assert!(!claimed.contains_key("c0"), "a locked row is skipped");
    locker.rollback().await.unwrap();
    let last = b.claim_site_checks(run_b, 4, lease).await.unwrap();
    assert_eq!(
        last,
        vec!["c0".to_owned()],
        "the row is claimable once unlocked"
    );
    claimed.insert("c0".into(), "b");
    let ids: Vec<&str> = claimed.keys().map(String::as_str).collect();
    assert_eq!(
        ids,
        ["c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8"],
        "every active connection once, the one needing consent never"
    );
    assert!(claimed.values().any(|n| *n == "a") && claimed.values().any(|n| *n == "b"));
    assert!(
        b.claim_site_checks(run_b, 4, lease)
            .await
            .unwrap()
            .is_empty()
    );

    // Resolved in this run, due again only `again` after its start: not in this run, nor in
    // another daemon's run at the same tick.
    let of = |node: &str| -> Vec<String> {
        claimed
            .iter()
            .filter(|(_, n)| **n == node)
            .map(|(id, _)| id.clone())
            .collect()
    };
    a.finish_site_checks(run_a, of("a"), again).await.unwrap();
    assert!(
        a.claim_site_checks(run_a, 10, lease)
            .await
            .unwrap()
            .is_empty()
    );
    let run_c = b.begin_site_checks().await.unwrap();
    assert!(
        b.claim_site_checks(run_c, 10, lease)
            .await
            .unwrap()
            .is_empty(),
        "b's rows are still leased, a's resolved"
    );
    // The next period (a minute on): a's rows are due again, b's still leased.
    let raw = db.raw().await;
    raw.execute(
        "UPDATE site_checks SET next_at = next_at - interval '61 seconds' WHERE holder IS NULL",
        &[],
    )
    .await
    .unwrap();
    let run_d = b.begin_site_checks().await.unwrap();
    let mut again_a = b.claim_site_checks(run_d, 10, lease).await.unwrap();
    again_a.sort();
    assert_eq!(again_a, of("a"));

    // A daemon that died mid-batch: its rows lapse with the lease and go to the next run.
    raw.execute(
        "UPDATE site_checks SET lease_until = clock_timestamp() - interval '1 second' \
         WHERE connection_id = ANY($1)",
        &[&of("b")],
    )
    .await
    .unwrap();
    let run_f = a.begin_site_checks().await.unwrap();
    let mut taken = a.claim_site_checks(run_f, 10, lease).await.unwrap();
    taken.sort();
    assert_eq!(taken, of("b"), "a takes over b's lapsed rows");
    // b's late finish does not clear a's claim of them.
    b.finish_site_checks(run_b, of("b"), Duration::ZERO)
        .await
        .unwrap();
    let holders: Vec<String> = raw
        .query(
            "SELECT holder FROM site_checks WHERE connection_id = ANY($1)",
            &[&of("b")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(holders.iter().all(|h| h == "node-a"), "{holders:?}");

    // A removed connection's row goes with it.
    assert!(a.delete("c1".into(), Utc::now()).await.unwrap());
    let n: i64 = raw
        .query_one(
            "SELECT count(*) FROM site_checks WHERE connection_id = 'c1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn a_job_runs_once_per_period_across_daemons() {
    let Some(db) = Db::new() else { return };
    let (a, b) = (db.ledger().await, db.ledger().await);
    a.set_node("node-a");
    b.set_node("node-b");
    let gap = Duration::from_secs(60);
    assert!(
        a.claim_job("maintenance", gap).await.unwrap(),
        "the first runs it"
    );
    assert!(
        !b.claim_job("maintenance", gap).await.unwrap(),
        "the others skip"
    );
    assert!(!a.claim_job("maintenance", gap).await.unwrap());
    assert!(
        b.claim_job("other", gap).await.unwrap(),
        "each job has its own period"
    );
    // The next period (no gap left): whoever asks first runs it.
    assert!(b.claim_job("maintenance", Duration::ZERO).await.unwrap());
    assert!(!a.claim_job("maintenance", gap).await.unwrap());
    let raw = db.raw().await;
    let holder: String = raw
        .query_one("SELECT holder FROM job_runs WHERE job = 'maintenance'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(holder, "node-b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_sites_is_announced_and_an_unchanged_list_is_not() {
    let Some(db) = Db::new() else { return };
    let (a, b) = (db.ledger().await, db.ledger().await);
    a.set_node("node-a");
    b.set_node("node-b");
    a.insert(record("c1", "conf", "rt-1"), vec![])
        .await
        .unwrap();
    a.insert(record("c2", "jira", "rt-2"), vec![])
        .await
        .unwrap();
    let mut changes = b.listen();
    assert_eq!(changes.recv().await, Some(Change::Resync));
    let now = from_ms(Utc::now().timestamp_millis());
    let site = Site {
        cloud_id: "cloud-9".into(),
        url: "https://acme.atlassian.net".into(),
        name: "acme".into(),
        scopes: vec!["read:page:confluence".into()].into(),
        last_seen_at: now,
    };
    let events = a
        .sync_sites("c1".into(), vec![site.clone()], now)
        .await
        .unwrap();
    assert!(!events.is_empty());
    assert_eq!(changes.recv().await, Some(Change::Connection("c1".into())));
    // The same list again moves only `last_seen_at`: nothing to announce. (Notifications
    // arrive in commit order, so the next one is c2's.)
    let events = a.sync_sites("c1".into(), vec![site], now).await.unwrap();
    assert!(events.is_empty(), "{events:?}");
    a.set_account("c2".into(), "acct-2".into(), now, vec![])
        .await
        .unwrap();
    assert_eq!(changes.recv().await, Some(Change::Connection("c2".into())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_claiming_at_once_resolve_each_connection_once() {
    let Some(db) = Db::new() else { return };
    let first = db.ledger().await;
    for i in 0..30 {
        first
            .insert(
                record(&format!("c{i:02}"), &format!("l{i:02}"), &format!("rt-{i}")),
                vec![],
            )
            .await
            .unwrap();
    }
    let mut runs = Vec::new();
    for n in 0..3 {
        let ledger = db.ledger().await;
        ledger.set_node(&format!("node-{n}"));
        runs.push(tokio::spawn(async move {
            // Each daemon starts its run (filling the queue) and claims until it is empty.
            let run = ledger.begin_site_checks().await.unwrap();
            let mut mine = Vec::new();
            loop {
                let ids = ledger
                    .claim_site_checks(run, 4, Duration::from_secs(60))
                    .await
                    .unwrap();
                if ids.is_empty() {
                    return mine;
                }
                ledger
                    .finish_site_checks(run, ids.clone(), Duration::from_secs(60))
                    .await
                    .unwrap();
                mine.extend(ids);
            }
        }));
    }
    let mut all = Vec::new();
    for r in runs {
        all.extend(r.await.unwrap());
    }
    all.sort();
    let expected: Vec<String> = (0..30).map(|i| format!("c{i:02}")).collect();
    assert_eq!(all, expected, "each connection once over the three daemons");
}

#[tokio::test]
async fn the_claim_holder_is_named_while_the_claim_runs_and_not_after_its_release() {
    let Some(db) = Db::new() else { return };
    let ledger = db.ledger().await;
    ledger
        .insert(record("c1", "conf", "rt-1"), vec![])
        .await
        .unwrap();
    assert_eq!(ledger.claim_holder("c1".into()).await.unwrap(), None);
    let before = Utc::now();
    let a = ledger
        .claim("c1".into(), "node-a".into(), Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let held = ledger
        .claim_holder("c1".into())
        .await
        .unwrap()
        .expect("a running claim has a holder");
    assert_eq!(held.holder, "node-a");
    // By the database's clock, which is this machine's: about a minute from now.
    assert!(
        held.until > before + chrono::Duration::seconds(50)
            && held.until < Utc::now() + chrono::Duration::seconds(70),
        "{held:?}"
    );
    assert!(ledger.release("c1".into(), a).await.unwrap());
    assert_eq!(
        ledger.claim_holder("c1".into()).await.unwrap(),
        None,
        "a released claim has no holder"
    );
    // A lapsed claim has none either, nor a connection that does not exist.
    ledger
        .claim("c1".into(), "node-b".into(), Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ledger.claim_holder("c1".into()).await.unwrap(), None);
    assert_eq!(ledger.claim_holder("nope".into()).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_write_is_announced_after_its_commit_and_a_refused_one_is_not() {
    let Some(db) = Db::new() else { return };
    let (a, b) = (db.ledger().await, db.ledger().await);
    a.set_node("node-a");
    b.set_node("node-b");
    let rec = record("c1", "conf", "rt-1");
    a.insert(rec.clone(), vec![]).await.unwrap();
    a.insert(record("c2", "jira", "rt-2"), vec![])
        .await
        .unwrap();
    let mut changes = b.listen();
    assert_eq!(changes.recv().await, Some(Change::Resync));
    let lease = Duration::from_secs(60);
    let fence = a
        .claim("c1".into(), "node-a".into(), lease)
        .await
        .unwrap()
        .unwrap();
    // The claim (committed without waiting for a flush) holds for everybody at once.
    assert_eq!(
        b.claim("c1".into(), "node-b".into(), lease).await.unwrap(),
        None
    );
    // A refused chain write (wrong version) announces nothing, nor does a marker (the
    // other daemons leave a chain under a running attempt alone): the next notification is
    // c2's account (announced in its own transaction).
    let mut next = rec.clone();
    next.chain.refresh_token = Secret::new("rt-next");
    next.chain.version = 8;
    let err = a
        .save_chain_fenced(next.clone(), 7, fence.clone(), vec![])
        .await
        .unwrap_err();
    assert!(matches!(err, PgError::Conflict(_)), "{err}");
    let now = from_ms(Utc::now().timestamp_millis());
    let mut marked = rec.clone();
    marked.chain.attempt_started_at = Some(now);
    marked.chain.version = 1;
    a.save_chain_fenced(marked, 0, fence.clone(), vec![])
        .await
        .unwrap();
    a.set_account("c2".into(), "acct-2".into(), now, vec![])
        .await
        .unwrap();
    assert_eq!(changes.recv().await, Some(Change::Connection("c2".into())));
    // A committed rotation is announced, and is in the ledger when the notification arrives.
    next.chain.version = 2;
    a.save_chain_fenced(next, 1, fence.clone(), vec![])
        .await
        .unwrap();
    assert_eq!(changes.recv().await, Some(Change::Connection("c1".into())));
    let stored = b.load_one("c1".into()).await.unwrap().unwrap();
    assert_eq!(stored.chain.refresh_token.expose(), "rt-next");
    // The release (lazy too) frees the chain for the other daemon at once.
    assert!(a.release("c1".into(), fence).await.unwrap());
    assert!(
        b.claim("c1".into(), "node-b".into(), lease)
            .await
            .unwrap()
            .is_some()
    );
}
