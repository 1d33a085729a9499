//! `tokend migrate-ledger`: a real daemon builds a SQLite ledger against the fake (imports,
//! a refresh, sites added and removed, token reads), is stopped, and the real binary copies
//! the ledger into a throw-away PostgreSQL (`src/testpg.rs`); and the refusals.
//!
//! The daemon cannot run on PostgreSQL in this tree yet (`[ledger] url` is being added on
//! another branch), so the copy is checked the way such a daemon would read it: through
//! `tokend::ledger::PgLedger` with the same key file, every chain loaded, opened, and equal
//! to the fake's current refresh token of its family.

use crate::util::pg::testpg;

use crate::fake::{FakeAtlassian, FakeSite};
use crate::util::{
    CLI_TIMEOUT, TestDaemon, assert_no_secrets, assert_success, eventually, import, open_ledger,
    run_with_timeout, tokend_bin, toml_str,
};
use std::process::Output;
use std::time::Duration;
use tokend::ledger::PgLedger;
use tokend::ledger::seal::KeySource;

/// A password the test puts in the URL (the test cluster trusts every local connection, so
/// it is sent for nothing): it must appear in no output.
const PASSWORD: &str = "pw-migrate-7f3a9c21d4";

fn text(out: &Output) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn with_password(url: &str) -> String {
    url.replacen(
        &format!("{}@", testpg::SUPERUSER),
        &format!("{}:{PASSWORD}@", testpg::SUPERUSER),
        1,
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Rows in the target's tables (connections, sites, events), or `None` before its schema
/// exists.
fn target_counts(url: &str) -> Option<[i64; 3]> {
    runtime().block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let exists: bool = client
            .query_one("SELECT to_regclass('connections') IS NOT NULL", &[])
            .await
            .unwrap()
            .get(0);
        if !exists {
            return None;
        }
        let mut out = [0; 3];
        for (i, table) in ["connections", "sites", "events"].iter().enumerate() {
            out[i] = client
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .unwrap()
                .get(0);
        }
        Some(out)
    })
}

/// The names of the files in `dir`, sorted.
fn files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn stop(d: &mut TestDaemon) {
    d.sigterm();
    assert!(
        d.wait_exit(Duration::from_secs(15))
            .is_some_and(|s| s.success()),
        "the daemon did not stop cleanly\n{}",
        d.logs()
    );
}

#[test]
fn a_daemons_sqlite_ledger_moves_to_postgresql_and_every_chain_is_current_there() {
    let Some(url) = testpg::database() else {
        return;
    };
    let fake = FakeAtlassian::start();
    let rt1 = fake.issue_grant(
        "acct-1",
        &[FakeSite::confluence("acme"), FakeSite::jira("beta")],
    );
    let rt2 = fake.issue_grant("acct-2", &[FakeSite::confluence("gamma")]);
    let mut d = TestDaemon::builder(&fake)
        .set("jobs", "resolve_sites", &toml_str("* * * * * *"))
        .start();
    import(&d, "conf", &rt1);
    import(&d, "other", &rt2);
    assert_success("tokend refresh conf", &d.cli(&["refresh", "conf"], None));
    assert_success("tokend token other", &d.cli(&["token", "other"], None));
    fake.remove_site("acct-1", &FakeSite::cloud_id_for("beta"));
    assert!(
        eventually(Duration::from_secs(10), || {
            let sites = d.get_json("/v1/connections/conf").1["sites"].clone();
            sites.as_array().is_some_and(|s| s.len() == 1)
        }),
        "the removed site never went\n{}",
        d.logs()
    );
    stop(&mut d);

    let db = open_ledger(&d);
    let sqlite_events: i64 = db
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .unwrap();
    let sqlite_versions: Vec<(String, i64)> = db
        .prepare("SELECT label, chain_version FROM connections ORDER BY label")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    drop(db);
    let sqlite_file = std::fs::read(d.ledger_path()).unwrap();
    let state_files = files(&d.state_dir());

    let out = d.cli(&["migrate-ledger", "--to", &with_password(&url)], None);
    assert_success("tokend migrate-ledger", &out);
    let all = text(&out);
    assert!(!all.contains(PASSWORD), "the password was printed:\n{all}");
    assert_no_secrets(&all, &fake);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let shown = with_password(&url).replace(PASSWORD, "PASSWORD");
    assert!(
        stdout.contains(&format!("[ledger]\nurl = \"{shown}\"\n")),
        "{all}"
    );
    let key = d.state_dir().join("ledger.key");
    assert!(
        stdout.contains(&format!("[daemon]\nkey_file = \"{}\"", key.display())),
        "{all}"
    );
    assert!(
        stdout.contains("2 connections, 3 sites (1 no longer accessible, kept)"),
        "{all}"
    );
    assert!(stdout.contains("left untouched, as a backup"), "{all}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--to-file"),
        "a password on the command line draws a warning: {all}"
    );
    assert!(
        std::fs::read(d.ledger_path()).unwrap() == sqlite_file,
        "the SQLite ledger was changed"
    );
    // (The test's own read-only opens above left a -wal and -shm; the migration adds none.)
    let after = files(&d.state_dir());
    assert!(
        after.iter().all(|f| state_files.contains(f)),
        "the migration left files beside the ledger: {after:?}, before: {state_files:?}"
    );

    // Read as a daemon on the new ledger would: the same key file opens every chain, and
    // each is its family's current refresh token at the fake (nothing rolled back).
    let keys = KeySource {
        key_file: Some(key),
        old_key_files: vec![],
    };
    let scratch = tempfile::tempdir().unwrap();
    let records = runtime().block_on(async {
        let pg = PgLedger::connect(&url, &keys, scratch.path())
            .await
            .unwrap();
        pg.load_all().await.unwrap()
    });
    assert_eq!(records.len(), 2);
    let mut versions = Vec::new();
    for rec in &records {
        let account = rec
            .conn
            .account_id
            .clone()
            .expect("the account was resolved");
        assert_eq!(
            Some(rec.chain.refresh_token.expose().to_owned()),
            fake.current_refresh_token(&account),
            "connection {} does not hold its family's current refresh token",
            rec.conn.label
        );
        assert!(rec.chain.access.is_some(), "the access token came along");
        versions.push((rec.conn.label.clone(), rec.chain.version as i64));
        if rec.conn.label == "conf" {
            let urls: Vec<&str> = rec.conn.sites.iter().map(|s| &*s.url).collect();
            assert_eq!(urls, vec!["https://acme.atlassian.net"]);
        }
    }
    versions.sort();
    assert_eq!(versions, sqlite_versions);
    assert_eq!(target_counts(&url), Some([2, 3, sqlite_events]));
    assert_eq!(fake.reuse_violations(), 0);
    assert!(fake.family_alive("acct-1") && fake.family_alive("acct-2"));
}

#[test]
fn migrate_ledger_refuses_a_running_daemon_a_bad_url_and_a_non_empty_target() {
    let Some(url) = testpg::database() else {
        return;
    };
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let mut d = TestDaemon::start(&fake);
    import(&d, "conf", &rt);

    // The daemon runs: refused, nothing written, the reason named.
    let out = d.cli(&["migrate-ledger", "--to", &url], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("daemon is running"), "{stderr}");
    assert!(stderr.contains("stop it first"), "{stderr}");
    assert_eq!(target_counts(&url), None, "nothing was written");
    stop(&mut d);

    // Not a PostgreSQL URL: a usage error, the URL never echoed.
    let out = d.cli(
        &[
            "migrate-ledger",
            "--to",
            &format!("mysql://root:{PASSWORD}@db/x"),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(!text(&out).contains(PASSWORD), "{}", text(&out));
    // Neither --to nor --to-file: clap's usage error; a bad --config: 64.
    assert_eq!(d.cli(&["migrate-ledger"], None).status.code(), Some(2));
    let out = run_with_timeout(
        {
            let mut cmd = std::process::Command::new(tokend_bin());
            cmd.args([
                "--config",
                "/nonexistent/daemon.toml",
                "migrate-ledger",
                "--to",
                &url,
            ]);
            cmd
        },
        None,
        CLI_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));

    // --to-file: the URL (with a password) from a file; the lines name the file.
    let url_file = d.dir().join("ledger-url");
    std::fs::write(&url_file, format!("{}\n", with_password(&url))).unwrap();
    let out = d.cli(
        &["migrate-ledger", "--to-file", url_file.to_str().unwrap()],
        None,
    );
    assert_success("tokend migrate-ledger --to-file", &out);
    assert!(!text(&out).contains(PASSWORD), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!(
            "[ledger]\nurl_file = \"{}\"\n",
            url_file.display()
        )),
        "{}",
        text(&out)
    );
    let copied = target_counts(&url).expect("the copy landed");

    // Again: the target is not empty; refused, and it holds what it held.
    let out = d.cli(&["migrate-ledger", "--to", &url], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not empty"), "{stderr}");
    assert!(stderr.contains("wrote nothing"), "{stderr}");
    assert_eq!(target_counts(&url), Some(copied));
    assert_no_secrets(&d.logs(), &fake);
}
