//! Encryption at rest: every token in the ledger (refresh, previous refresh, access token) is
//! sealed with the daemon's key, so that nothing the provider issued can be read from the
//! ledger files; a wrong or missing key is refused at start; keys rotate through
//! `daemon.old_key_files`; a plaintext ledger left by the previous version is sealed in place.
//!
//! The scans read every regular file under `state_dir` byte for byte (the database, its WAL
//! and shm files, the key, the lock) and a `.dump` of the database, and look for any 16
//! consecutive characters of anything the fake ever issued (as [`assert_no_secrets`] does),
//! so a token left in a freed page or an old WAL frame counts as a leak.

use crate::fake::{self, FakeAtlassian, FakeSite, IssuedSecret};
use crate::util::{
    SECRET_WINDOW, TestDaemon, assert_no_secrets, build_request, import, last_extra_output,
    ledger::try_open_ledger, parse_response, start_output, toml_str,
};
use rand::Rng;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// ----------------------------------------------------------------------------------------
// Helpers
// ----------------------------------------------------------------------------------------

/// Something that must not appear: what it is (never its value) and its bytes.
struct Needle {
    what: String,
    value: Vec<u8>,
}

fn fake_needles(fake: &FakeAtlassian) -> Vec<Needle> {
    fake.issued_secrets_detailed()
        .iter()
        .map(|s: &IssuedSecret| Needle {
            what: s.describe(),
            value: s.value.as_bytes().to_vec(),
        })
        .collect()
}

/// A 32-byte key as the daemon reads it: 64 hex digits.
fn random_key_hex() -> String {
    let key: [u8; 32] = rand::rng().random();
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
        .collect()
}

/// The key in both the forms it could leak in: its hex text and its raw bytes.
fn key_needles(name: &str, hex: &str) -> Vec<Needle> {
    vec![
        Needle {
            what: format!("{name} (hex)"),
            value: hex.as_bytes().to_vec(),
        },
        Needle {
            what: format!("{name} (raw bytes)"),
            value: hex_decode(hex),
        },
    ]
}

/// What of `needles` occurs in `haystack`: any [`SECRET_WINDOW`] consecutive bytes of a
/// needle (the whole needle if shorter).
fn found(haystack: &[u8], needles: &[Needle]) -> Vec<String> {
    let mut windows: HashMap<&[u8], usize> = HashMap::new();
    for (i, n) in needles.iter().enumerate() {
        if n.value.len() <= SECRET_WINDOW {
            windows.insert(&n.value, i);
        } else {
            for w in n.value.windows(SECRET_WINDOW) {
                windows.insert(w, i);
            }
        }
    }
    let mut lens: Vec<usize> = windows.keys().map(|k| k.len()).collect();
    lens.sort_unstable();
    lens.dedup();
    let mut hits: Vec<usize> = Vec::new();
    for len in lens {
        for w in haystack.windows(len) {
            if let Some(&i) = windows.get(w)
                && !hits.contains(&i)
            {
                hits.push(i);
            }
        }
    }
    hits.sort_unstable();
    hits.into_iter().map(|i| needles[i].what.clone()).collect()
}

/// Every regular file directly under `state_dir`, with its bytes, sorted by name.
fn state_files(d: &TestDaemon) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(d.state_dir()).expect("read state_dir") {
        let entry = entry.expect("state_dir entry");
        let path = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        // A file may vanish between the listing and the read (the WAL at a checkpoint).
        if let Ok(bytes) = std::fs::read(&path) {
            files.push((entry.file_name().to_string_lossy().into_owned(), bytes));
        }
    }
    files.sort();
    files
}

/// `sqlite3 LEDGER .dump`; without the `sqlite3` binary (or if it cannot read the file), every
/// row of every table read with rusqlite, each column formatted as text.
fn dump_ledger(db: &Path) -> String {
    match Command::new("sqlite3")
        .arg("-cmd")
        .arg(".timeout 5000")
        .arg(db)
        .arg(".dump")
        .output()
    {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        Ok(out) => {
            eprintln!(
                "sqlite3 .dump failed ({}): {}; dumping with rusqlite",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            dump_with_rusqlite(db)
        }
        Err(_) => dump_with_rusqlite(db),
    }
}

fn dump_with_rusqlite(db: &Path) -> String {
    use rusqlite::types::ValueRef;
    let conn = try_open_ledger(db).expect("open ledger read-only");
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut out = String::new();
    for table in tables {
        let mut stmt = conn.prepare(&format!("SELECT * FROM \"{table}\"")).unwrap();
        let n = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            let cells: Vec<String> = (0..n)
                .map(|i| match row.get_ref(i).unwrap() {
                    ValueRef::Null => "NULL".to_string(),
                    ValueRef::Integer(v) => v.to_string(),
                    ValueRef::Real(v) => v.to_string(),
                    ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                    ValueRef::Blob(b) => String::from_utf8_lossy(b).into_owned(),
                })
                .collect();
            out.push_str(&format!("{table}: {}\n", cells.join(" | ")));
        }
    }
    out
}

/// Panics (naming the file and the kind of secret, never its value) if any file under
/// `state_dir` or the dump of the ledger holds anything the fake issued or `extra`. Every
/// string of `expect_in_dump` (labels, say) must be in the dump: it really is the ledger,
/// with those rows.
fn assert_ledger_sealed(
    d: &TestDaemon,
    fake: &FakeAtlassian,
    extra: &[Needle],
    expect_in_dump: &[&str],
    when: &str,
) {
    let mut needles = fake_needles(fake);
    needles.extend(extra.iter().map(|n| Needle {
        what: n.what.clone(),
        value: n.value.clone(),
    }));
    let files = state_files(d);
    assert!(
        files.iter().any(|(name, _)| name == "ledger.db"),
        "{when}: no state/ledger.db among {:?}",
        files.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    let mut leaks: Vec<String> = Vec::new();
    for (name, bytes) in &files {
        // The key file holds the key, of course; it must hold no token.
        let hits: Vec<String> = found(bytes, &needles)
            .into_iter()
            .filter(|w| !(name == "ledger.key" && w.starts_with("the ledger key")))
            .collect();
        if !hits.is_empty() {
            leaks.push(format!("state/{name}: {}", hits.join(", ")));
        }
    }
    // Raw files first: the dump may checkpoint the WAL into the database when it closes.
    let dump = dump_ledger(&d.ledger_path());
    for s in expect_in_dump {
        assert!(
            dump.contains(s),
            "{when}: the dump of the ledger does not show {s:?}; is it the right file?\n{dump}"
        );
    }
    let hits = found(dump.as_bytes(), &needles);
    if !hits.is_empty() {
        leaks.push(format!("dump of state/ledger.db: {}", hits.join(", ")));
    }
    assert!(
        leaks.is_empty(),
        "{when}: the ledger holds tokens in the clear (encryption at rest):\n  {}",
        leaks.join("\n  ")
    );
}

/// Checks `path` is a key as tokend writes it (mode 0600, 64 hex digits and an optional
/// newline) and returns the hex.
fn assert_key_file(path: &Path) -> String {
    let meta =
        std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: no key file ({e})", path.display()));
    assert!(meta.is_file(), "{} is not a regular file", path.display());
    let mode = meta.permissions().mode() & 0o777;
    assert_eq!(
        mode,
        0o600,
        "{} has mode {mode:o}, not 0600",
        path.display()
    );
    let text = std::fs::read_to_string(path).expect("key file is text");
    let hex = text.strip_suffix('\n').unwrap_or(&text);
    assert!(
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "{} does not hold 64 hex digits (and an optional newline): {} bytes",
        path.display(),
        text.len()
    );
    hex.to_string()
}

/// Writes a key file (0600).
fn write_key(path: &Path, hex: &str, newline: bool) {
    let text = if newline {
        format!("{hex}\n")
    } else {
        hex.to_string()
    };
    std::fs::write(path, text).expect("write key file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
}

/// Rewrites `daemon.key_file` and `daemon.old_key_files` in the daemon's config (`None` /
/// empty: the key is left out).
fn set_keys(d: &TestDaemon, key_file: Option<&str>, old_key_files: &[&str]) {
    let cfg = std::fs::read_to_string(d.config_path()).expect("read daemon.toml");
    let mut out = String::new();
    for line in cfg.lines() {
        if line.starts_with("key_file =") || line.starts_with("old_key_files =") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if line == "[daemon]" {
            if let Some(k) = key_file {
                out.push_str(&format!("key_file = {}\n", toml_str(k)));
            }
            if !old_key_files.is_empty() {
                let list: Vec<String> = old_key_files.iter().map(|p| toml_str(p)).collect();
                out.push_str(&format!("old_key_files = [{}]\n", list.join(", ")));
            }
        }
    }
    std::fs::write(d.config_path(), out).expect("write daemon.toml");
}

/// SIGTERM and a clean exit.
fn stop(d: &mut TestDaemon) {
    d.sigterm();
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("tokend exits on SIGTERM");
    assert!(status.success(), "{status:?}\n{}", d.logs());
}

fn wait_child(c: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `tokend run` on the daemon's config and expects it to refuse to start: a non-zero
/// exit within a few seconds. Returns what it printed.
fn refused_start(d: &TestDaemon, why: &str) -> String {
    let mut child = d.spawn_raw();
    let Some(status) = wait_child(&mut child, Duration::from_secs(10)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{why}: tokend did not refuse to start within 10 s\n{}",
            d.logs()
        );
    };
    let out = last_extra_output(d);
    assert!(
        !status.success(),
        "{why}: tokend exited 0; it must refuse to start\n{out}"
    );
    out
}

/// `GET /v1/connections/{id}/token`: 200, the access token.
fn token(d: &TestDaemon, id: &str) -> String {
    let r = d.request("GET", &format!("/v1/connections/{id}/token"), None);
    assert_eq!(r.status, 200, "token of {id}: {}", r.text());
    r.json()["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

fn force_refresh(d: &TestDaemon, id: &str) {
    let r = d.request("POST", &format!("/v1/connections/{id}/refresh"), None);
    assert_eq!(r.status, 200, "refresh of {id}: {}", r.text());
}

fn id_of(conn: &Value) -> String {
    conn["id"].as_str().expect("connection id").to_string()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

// ----------------------------------------------------------------------------------------
// Tests
// ----------------------------------------------------------------------------------------

/// With no `key_file`, tokend creates `state/ledger.key` (0600, 64 hex digits) and seals every
/// token: neither the database, its WAL, any other file of the state directory nor a `.dump`
/// holds a refresh token, a previous refresh token, an access token (or the client secret),
/// while the daemon runs and after it stopped; the key is in no log and not in the ledger;
/// the next start opens the ledger with the same key.
#[test]
fn nothing_the_fake_issued_is_in_the_ledger_files() {
    let fake = FakeAtlassian::start();
    let rt_a = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let rt_b = fake.issue_grant("acct-2", &[FakeSite::jira("beta")]);
    let mut d = TestDaemon::start(&fake);
    let a = id_of(&import(&d, "conf-a", &rt_a));
    let b = id_of(&import(&d, "jira-b", &rt_b));
    token(&d, &a);
    token(&d, &b);
    // A second rotation, so that every connection has a previous refresh token too.
    force_refresh(&d, &a);
    force_refresh(&d, &b);
    let served_a = token(&d, &a);
    token(&d, &b);
    assert_eq!(fake.rotations("acct-1"), 2);
    assert_eq!(fake.rotations("acct-2"), 2);
    assert_eq!(fake.reuse_violations(), 0);
    // Sanity: what the scan looks for includes the client secret and every token.
    assert!(
        fake.issued_secrets().len() >= 9,
        "{}",
        fake.issued_secrets().len()
    );

    let labels = ["conf-a", "jira-b"];
    assert_ledger_sealed(&d, &fake, &[], &labels, "while the daemon runs");
    stop(&mut d);
    assert_ledger_sealed(&d, &fake, &[], &labels, "after SIGTERM");

    let key_path = d.state_dir().join("ledger.key");
    let key = assert_key_file(&key_path);
    let keys = key_needles("the ledger key", &key);
    // The key opens the ledger; it is not stored in it (nor in the WAL), nor logged.
    assert_ledger_sealed(&d, &fake, &keys, &labels, "looking for the key itself");
    let logged = found(d.logs().as_bytes(), &keys);
    assert!(logged.is_empty(), "the logs show {logged:?}");

    // The next start keeps the key and opens the ledger with it.
    d.restart();
    assert_eq!(
        token(&d, &a),
        served_a,
        "the cached token survives a restart"
    );
    assert_eq!(fake.rotations("acct-1"), 2, "served from the ledger");
    assert_eq!(assert_key_file(&key_path), key, "ledger.key was rewritten");
    d.kill9();
    assert_no_secrets(&d.logs(), &fake);
    let logged = found(d.logs().as_bytes(), &keys);
    assert!(logged.is_empty(), "the logs show {logged:?}");
}

/// A ledger sealed with key A does not start with key B (nor with no key file at all): the
/// daemon exits non-zero within seconds, names the key file and says the ledger was sealed
/// with another key, calls no provider and changes nothing; with A back, it starts and serves
/// the cached token.
#[test]
fn a_ledger_opened_with_another_key_is_refused() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    // Relative: resolved against the config file's directory (the daemon's cwd is elsewhere).
    let key_rel = "keys/ledger-current.key";
    let mut d = TestDaemon::builder(&fake)
        .set("daemon", "key_file", &toml_str(key_rel))
        .prepare();
    let key_path = d.dir().join(key_rel);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(key_path.parent().unwrap())
        .unwrap();
    let key_a = random_key_hex();
    let key_b = random_key_hex();
    write_key(&key_path, &key_a, true);
    d.restart();
    let id = id_of(&import(&d, "conf", &rt));
    let served = token(&d, &id);
    stop(&mut d);
    let calls = fake.token_calls();

    // Another key.
    write_key(&key_path, &key_b, true);
    let out = refused_start(&d, "a key that did not seal the ledger");
    assert!(
        out.contains(key_rel),
        "the refusal must name the key file {key_rel}:\n{out}"
    );
    let lower = out.to_lowercase();
    assert!(
        [
            "another key",
            "different key",
            "wrong key",
            "other key",
            "sealed with",
            "does not open",
            "doesn't open",
            "does not match",
            "doesn't match",
        ]
        .iter()
        .any(|p| lower.contains(p)),
        "the refusal must say the ledger was sealed with another key:\n{out}"
    );

    // No key file at all.
    std::fs::remove_file(&key_path).unwrap();
    let out = refused_start(&d, "a missing key file");
    assert!(
        out.contains(key_rel),
        "the refusal must name the key file {key_rel}:\n{out}"
    );
    assert_eq!(
        fake.token_calls(),
        calls,
        "a daemon that cannot open the ledger calls no provider"
    );

    // The original key back: everything is there, untouched.
    write_key(&key_path, &key_a, true);
    d.restart();
    assert_eq!(token(&d, &id), served, "the cached token, from the ledger");
    assert_eq!(fake.rotations("acct-1"), 1, "no refresh was needed");
    force_refresh(&d, &id);
    assert_eq!(fake.reuse_violations(), 0);
    assert!(fake.family_alive("acct-1"));
    d.kill9();
    let mut keys = key_needles("the ledger key A", &key_a);
    keys.extend(key_needles("the ledger key B", &key_b));
    let logged = found(d.logs().as_bytes(), &keys);
    assert!(logged.is_empty(), "the logs show {logged:?}");
    assert_ledger_sealed(&d, &fake, &keys, &["conf"], "after the refusals");
    assert_no_secrets(&d.logs(), &fake);
}

/// Rotation: rows sealed under A open with `key_file = B, old_key_files = [A]`; that start
/// re-seals them under B and says (mentioning `old_key_files`) that no row needs the old key
/// any more; the next start with B alone (A deleted) serves the cached tokens and refreshes
/// both chains, so no token was left under A.
#[test]
fn key_rotation_through_old_key_files_reseals_every_row() {
    let fake = FakeAtlassian::start();
    let rt_1 = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let rt_2 = fake.issue_grant("acct-2", &[FakeSite::jira("beta")]);
    let mut d = TestDaemon::builder(&fake)
        .set("daemon", "key_file", &toml_str("key-a.hex"))
        .prepare();
    let path_a = d.dir().join("key-a.hex");
    let path_b = d.dir().join("key-b.hex");
    let key_a = random_key_hex();
    let key_b = random_key_hex();
    write_key(&path_a, &key_a, true);
    write_key(&path_b, &key_b, false);
    d.restart();
    let c1 = id_of(&import(&d, "conf", &rt_1));
    let c2 = id_of(&import(&d, "jira", &rt_2));
    let served_1 = token(&d, &c1);
    let served_2 = token(&d, &c2);
    stop(&mut d);

    // B is the key now; A (given by its absolute path) still opens rows.
    set_keys(&d, Some("key-b.hex"), &[path_a.to_str().unwrap()]);
    d.restart();
    assert_eq!(token(&d, &c1), served_1, "a row sealed under A opens");
    assert_eq!(token(&d, &c2), served_2, "a row sealed under A opens");
    assert_eq!(fake.rotations("acct-1"), 1);
    assert_eq!(fake.rotations("acct-2"), 1);
    let second = start_output(&d, 2);
    assert!(
        second.lines().any(|l| l.contains("old_key_files")),
        "the start with old_key_files must say (in a line naming old_key_files) that no row \
         needs the old key any more:\n{second}"
    );
    stop(&mut d);

    // B alone, and A gone: every row was re-sealed under B.
    set_keys(&d, Some("key-b.hex"), &[]);
    std::fs::remove_file(&path_a).unwrap();
    d.restart();
    assert_eq!(token(&d, &c1), served_1);
    assert_eq!(token(&d, &c2), served_2);
    // The refresh tokens open too (not only the access tokens).
    force_refresh(&d, &c1);
    force_refresh(&d, &c2);
    assert_eq!(fake.rotations("acct-1"), 2);
    assert_eq!(fake.rotations("acct-2"), 2);
    assert_eq!(fake.reuse_violations(), 0);
    assert!(fake.family_alive("acct-1") && fake.family_alive("acct-2"));
    d.kill9();
    let mut keys = key_needles("the ledger key A", &key_a);
    keys.extend(key_needles("the ledger key B", &key_b));
    let logged = found(d.logs().as_bytes(), &keys);
    assert!(logged.is_empty(), "the logs show {logged:?}");
    assert_ledger_sealed(&d, &fake, &keys, &["conf", "jira"], "after the rotation");
    assert_no_secrets(&d.logs(), &fake);
}

/// The schema the previous tokend wrote: migrations 1 and 2, before encryption at rest
/// (released migrations are never edited, so the library's own entries are that schema).
const PLAINTEXT_SCHEMA: &[&str] = {
    let (before_sealing, _) = tokend::ledger::MIGRATIONS.split_at(2);
    before_sealing
};

/// A refresh-token grant straight at the fake (as the previous tokend made it).
fn refresh_at_the_fake(fake: &FakeAtlassian, refresh_token: &str) -> Value {
    let body = json!({
        "grant_type": "refresh_token",
        "client_id": fake::CLIENT_ID,
        "client_secret": fake::CLIENT_SECRET,
        "refresh_token": refresh_token,
    })
    .to_string();
    let req = build_request(
        "POST",
        "/oauth/token",
        &fake.addr().to_string(),
        &[],
        Some(("application/json", body.as_bytes())),
    );
    let mut s = std::net::TcpStream::connect(fake.addr()).expect("connect to the fake");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&req).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let resp = loop {
        if let Some(r) = parse_response(&buf, false).unwrap() {
            break r;
        }
        match s.read(&mut chunk).expect("read from the fake") {
            0 => break parse_response(&buf, true).unwrap().expect("a response"),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    };
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json()
}

/// The message of the `imported` event in the hand-made plaintext ledger.
const LEGACY_EVENT: &str = "imported by the previous tokend (plaintext ledger)";

/// Writes `state/ledger.db` as the previous tokend left it: schema version 2, WAL mode, mode
/// 0600, one active connection with every token column in the clear, its site and its
/// `imported` event.
#[allow(clippy::too_many_arguments)]
fn write_plaintext_ledger(
    state_dir: &Path,
    id: &str,
    label: &str,
    scopes: &str,
    site: &FakeSite,
    refresh_token: &str,
    previous_refresh_token: &str,
    access_token: &str,
) -> PathBuf {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(state_dir)
        .unwrap();
    let path = state_dir.join("ledger.db");
    let mut db = rusqlite::Connection::open(&path).unwrap();
    db.pragma_update(None, "journal_mode", "WAL").unwrap();
    for (i, sql) in PLAINTEXT_SCHEMA.iter().enumerate() {
        let tx = db.transaction().unwrap();
        tx.execute_batch(sql).unwrap();
        tx.pragma_update(None, "user_version", (i + 1) as i64)
            .unwrap();
        tx.commit().unwrap();
    }
    let now = now_ms();
    let hour = 3_600_000;
    db.execute(
        "INSERT INTO connections (id, label, provider, client_id, account_id, status, scopes, \
         refresh_token, refresh_token_rotated_at, previous_refresh_token, previous_rotated_at, \
         attempt_started_at, access_token, access_token_expires_at, consented_at, \
         last_refresh_at, last_error_code, last_error_message, last_error_at, \
         consecutive_failures, created_at, updated_at, chain_version, refresh_token_used_at) \
         VALUES (?1, ?2, 'atlassian', ?3, 'acct-1', 'active', ?4, ?5, ?6, ?7, ?6, NULL, ?8, ?9, \
         ?10, ?6, NULL, NULL, NULL, 0, ?10, ?6, 2, ?6)",
        rusqlite::params![
            id,
            label,
            fake::CLIENT_ID,
            scopes,
            refresh_token,
            now - 60_000,
            previous_refresh_token,
            access_token,
            // Expired, as far as the ledger knows: the first token request refreshes.
            now - 30_000,
            now - 24 * hour,
        ],
    )
    .unwrap();
    db.execute(
        "INSERT INTO sites (connection_id, cloud_id, url, name, scopes, first_seen_at, \
         last_seen_at, removed_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, NULL)",
        rusqlite::params![
            id,
            site.cloud_id,
            site.url,
            site.name,
            site.scopes.join(" "),
            now - 24 * hour
        ],
    )
    .unwrap();
    db.execute(
        "INSERT INTO events (at, connection_id, kind, message) VALUES (?1, ?2, 'imported', ?3)",
        rusqlite::params![now - 24 * hour, id, LEGACY_EVENT],
    )
    .unwrap();
    drop(db);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A ledger written by the previous version (every token in the clear) is sealed on the first
/// start, before the socket answers: afterwards no file of the state directory (nor a dump)
/// holds any of its tokens, not even in freed pages or WAL frames; nothing is lost (the
/// account and sites are served, the history is in the ledger), the chain refreshes through the fake without a
/// reuse violation, and the next start opens it again.
#[test]
fn a_plaintext_ledger_from_the_previous_version_upgrades_in_place() {
    let fake = FakeAtlassian::start();
    let site = FakeSite::confluence("acme");
    let rt_0 = fake.issue_grant("acct-1", std::slice::from_ref(&site));
    // The previous tokend had imported rt_0 (one rotation): rt_1 is current, rt_0 its
    // previous token, at_1 the cached access token.
    let grant = refresh_at_the_fake(&fake, &rt_0);
    let rt_1 = grant["refresh_token"].as_str().unwrap().to_string();
    let at_1 = grant["access_token"].as_str().unwrap().to_string();
    let scopes = grant["scope"].as_str().unwrap().to_string();
    let mut d = TestDaemon::builder(&fake).prepare();
    let id = "c0123456789ab";
    let ledger = write_plaintext_ledger(
        &d.state_dir(),
        id,
        "legacy",
        &scopes,
        &site,
        &rt_1,
        &rt_0,
        &at_1,
    );
    // Sanity: the scan sees the tokens of a plaintext ledger.
    let before = found(&std::fs::read(&ledger).unwrap(), &fake_needles(&fake));
    assert_eq!(
        before.len(),
        3,
        "the hand-made ledger holds rt_0, rt_1 and at_1 in the clear: {before:?}"
    );

    d.restart();
    assert_ledger_sealed(
        &d,
        &fake,
        &[],
        &["legacy"],
        "right after the first start on a plaintext ledger",
    );
    let served = token(&d, "legacy");
    assert_ne!(served, at_1, "the ledger said at_1 had expired");
    assert_eq!(
        fake.access_token_account(&served).as_deref(),
        Some("acct-1")
    );
    assert!(fake.rotations("acct-1") >= 2, "the daemon refreshed rt_1");
    assert_ne!(
        fake.current_refresh_token("acct-1").as_deref(),
        Some(&*rt_1)
    );
    assert_eq!(fake.reuse_violations(), 0);
    assert!(fake.family_alive("acct-1"));
    // Nothing lost: the account, the site and the history came along.
    let (code, conn) = d.get_json("/v1/connections/legacy");
    assert_eq!(code, 200, "{conn}");
    assert_eq!(conn["id"], id);
    assert_eq!(conn["account_id"], "acct-1");
    assert_eq!(conn["status"], "active");
    assert!(
        conn["sites"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["cloud_id"] == site.cloud_id.as_str()),
        "{conn}"
    );
    // The history too (`events` rows are never sealed: they hold no secret).
    let kept = ["legacy", LEGACY_EVENT];
    assert_ledger_sealed(&d, &fake, &[], &kept, "after the refresh");
    stop(&mut d);
    assert_ledger_sealed(&d, &fake, &[], &kept, "after SIGTERM");
    let key = assert_key_file(&d.state_dir().join("ledger.key"));

    d.restart();
    assert_eq!(token(&d, "legacy"), served, "the sealed ledger opens again");
    d.kill9();
    let keys = key_needles("the ledger key", &key);
    let logged = found(d.logs().as_bytes(), &keys);
    assert!(logged.is_empty(), "the logs show {logged:?}");
    assert_no_secrets(&d.logs(), &fake);
}
