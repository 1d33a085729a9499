//! Operating tokend: systemd notifications and watchdog, socket activation, signals, reload,
//! and the Prometheus exposition after a scripted scenario.

use crate::fake::{FakeAtlassian, FakeSite, Fault};
use crate::util::{
    NotifySocket, SmallDisk, TestDaemon, assert_no_secrets, eventually, import, last_run_stderr,
    metric, open_ledger, tokend_bin, toml_str, unseal,
};
use std::process::{Command, Stdio};
use std::time::Duration;

/// READY=1 at start, WATCHDOG=1 every `WATCHDOG_USEC / 2`, RELOADING=1 (with
/// MONOTONIC_USEC) and READY=1 again on SIGHUP, STOPPING=1 on SIGTERM. (A full ledger does
/// not stop the pings: a daemon holding an uncommitted rotated token must not be killed by
/// systemd; see `engine::a_full_ledger_keeps_the_watchdog_fed_and_commits_the_held_token_later`.)
#[test]
fn sd_notify_ready_watchdog_reload_and_stopping() {
    let fake = FakeAtlassian::start();
    let notify = NotifySocket::new();
    let mut d = TestDaemon::builder(&fake)
        .env("NOTIFY_SOCKET", notify.path.to_str().unwrap())
        .env("WATCHDOG_USEC", "1000000")
        .start();
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(5)),
        "no READY=1"
    );
    let msgs = notify.collect(Duration::from_secs(2));
    assert!(
        msgs.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2,
        "watchdog pings every WATCHDOG_USEC/2: {msgs:?}"
    );
    d.signal("HUP");
    assert!(notify.wait_for("RELOADING=1\nMONOTONIC_USEC=", Duration::from_secs(5)));
    assert!(notify.wait_for("READY=1", Duration::from_secs(5)));
    assert!(
        notify.wait_for("WATCHDOG=1", Duration::from_secs(5)),
        "pings go on after a reload"
    );
    d.sigterm();
    assert!(notify.wait_for("STOPPING=1", Duration::from_secs(5)));
    assert!(
        d.wait_exit(Duration::from_secs(15))
            .is_some_and(|s| s.success())
    );
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn socket_activation_uses_the_passed_socket_and_leaves_it_in_place() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::builder(&fake).prepare();
    std::fs::create_dir_all(d.socket_path().parent().unwrap()).unwrap();
    let log = std::fs::File::create(d.dir().join("activated.log")).unwrap();
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(d.socket_path())
        .arg(tokend_bin())
        .arg("--config")
        .arg(d.config_path())
        .arg("run")
        .env("RUST_LOG", "info")
        .env_remove("TOKEND_ATLASSIAN_CLIENT_SECRET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("systemd-socket-activate (Debian package systemd) must be installed");
    // The socket exists before the daemon runs; the first connection starts it.
    assert!(eventually(Duration::from_secs(5), || d
        .socket_path()
        .exists()));
    assert!(
        eventually(Duration::from_secs(15), || d
            .try_request("GET", "/v1/health", &[], None)
            .is_ok_and(|r| r.status == 200)),
        "no answer through the activated socket"
    );
    import(&d, "conf", &rt);
    let (code, _) = d.get_json("/v1/connections/conf/token");
    assert_eq!(code, 200);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let logs = std::fs::read_to_string(d.dir().join("activated.log")).unwrap();
    assert!(logs.contains("socket passed by systemd"), "{logs}");
    assert!(
        d.socket_path().exists(),
        "a passed socket belongs to systemd and is not removed"
    );
    assert_no_secrets(&logs, &fake);
}

#[test]
fn sigterm_during_a_slow_refresh_commits_it_and_exits_cleanly() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let mut d = TestDaemon::start(&fake);
    import(&d, "conf", &rt);
    fake.inject_token(Fault::Delay(Duration::from_secs(2)));
    let calls = fake.refresh_calls();
    let resp = std::thread::scope(|s| {
        let h = s.spawn(|| d.try_request("POST", "/v1/connections/conf/refresh", &[], None));
        assert!(eventually(Duration::from_secs(5), || fake.refresh_calls() > calls));
        d.sigterm();
        h.join().unwrap()
    });
    let status = d.wait_exit(Duration::from_secs(20)).expect("exits");
    assert!(status.success(), "{status:?}\n{}", d.logs());
    assert!(!d.socket_path().exists(), "socket removed");
    if let Ok(r) = resp {
        assert_eq!(
            r.status,
            200,
            "the in-flight refresh finished: {}",
            r.text()
        );
    }
    let db = open_ledger(&d);
    let (id, stored, marker): (String, String, Option<i64>) = db
        .query_row(
            "SELECT id, refresh_token, attempt_started_at FROM connections WHERE label = 'conf'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    let stored = unseal(&d, &id, "refresh_token", &stored);
    assert_eq!(
        stored,
        fake.current_refresh_token("acct-1").unwrap(),
        "the rotated token was committed before exit"
    );
    assert!(marker.is_none(), "no attempt left pending");
    assert_eq!(fake.leeway_reuses(), 0);
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn sighup_applies_a_valid_config_and_keeps_the_running_one_on_error() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let mut d = TestDaemon::builder(&fake)
        .set("daemon", "socket_mode", &toml_str("0666"))
        .start();
    import(&d, "conf", &rt);
    let out = d.cli_as(65534, 65534, &["token", "conf"], None);
    assert!(out.status.success(), "open before the reload");
    let original = std::fs::read_to_string(d.config_path()).unwrap();

    // Valid: restrict token reads to another connection for uid 65534.
    std::fs::write(
        d.config_path(),
        format!("{original}\n[[access.clients]]\nuid = 65534\nconnections = [\"other\"]\n"),
    )
    .unwrap();
    let pid = d.pid();
    d.signal("HUP");
    assert!(
        eventually(Duration::from_secs(5), || d
            .logs()
            .contains("configuration reloaded")),
        "{}",
        d.logs()
    );
    let out = d.cli_as(65534, 65534, &["token", "conf"], None);
    assert_eq!(out.status.code(), Some(1), "the new access list applies");
    assert!(String::from_utf8_lossy(&out.stderr).contains("forbidden"));
    assert_eq!(d.pid(), pid, "same process, socket never dropped");

    // Invalid: logged, the running config (with the access list) stays.
    std::fs::write(d.config_path(), "[refresh]\nrotate_after = \"soon\"\n").unwrap();
    d.signal("HUP");
    assert!(
        eventually(Duration::from_secs(5), || d
            .logs()
            .contains("reload failed")),
        "{}",
        d.logs()
    );
    assert!(d.logs().contains("rotate_after"), "the error names the key");
    assert!(d.is_running());
    let (code, v) = d.get_json("/v1/health");
    assert_eq!(code, 200, "{v}");
    // (The client cannot read the broken file either: point it at the socket directly.)
    let out = {
        use std::os::unix::process::CommandExt;
        Command::new(tokend_bin())
            .args(["token", "conf"])
            .env("TOKEND_SOCKET", d.socket_path())
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    assert_eq!(
        out.status.code(),
        Some(1),
        "still the reloaded access list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("forbidden"));
    let (code, _) = d.get_json("/v1/connections/conf/token");
    assert_eq!(code, 200);
    assert_no_secrets(&d.logs(), &fake);
}

/// The connection gauges are computed when `/metrics` is scraped, not copied every few
/// seconds: a connection imported through the API shows in the very next scrape (and in
/// `/v1/health`'s counts), with no wait.
#[test]
fn an_imported_connection_shows_in_metrics_at_once() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::builder(&fake).metrics().start();
    let text = d.metrics_get("/metrics").unwrap().text();
    assert_eq!(metric(&text, "tokend_connections{status=\"active\"}"), 0.0);
    let conn = import(&d, "fresh", &rt);
    let id = conn["id"].as_str().unwrap();
    // One scrape, straight after the import answered: no `eventually`.
    let text = d.metrics_get("/metrics").unwrap().text();
    assert_eq!(metric(&text, "tokend_connections{status=\"active\"}"), 1.0);
    assert_eq!(
        metric(&text, "tokend_connections{status=\"needs_reauth\"}"),
        0.0
    );
    let deadline = metric(
        &text,
        &format!("tokend_connection_inactivity_deadline_timestamp_seconds{{connection=\"{id}\"}}"),
    );
    let headroom = metric(&text, "tokend_inactivity_headroom_seconds");
    assert!(
        headroom.is_finite() && headroom > 89.0 * 86_400.0,
        "{headroom}"
    );
    assert!(deadline > 1.0e9, "{deadline}");
    let (code, health) = d.get_json("/v1/health");
    assert_eq!(code, 200, "{health}");
    assert_eq!(health["connections"]["active"], 1);
    assert_eq!(health["connections"]["needs_reauth"], 0);
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn metrics_after_a_scripted_scenario() {
    let fake = FakeAtlassian::start();
    let rt1 = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let rt2 = fake.issue_grant("acct-2", &[FakeSite::jira("beta")]);
    let d = TestDaemon::builder(&fake).metrics().start();
    let ok = import(&d, "ok", &rt1);
    import(&d, "dead", &rt2);
    for _ in 0..3 {
        assert_eq!(d.get_json("/v1/connections/ok/token").0, 200);
    }
    assert_eq!(d.get_json("/v1/connections/nope/token").0, 404);
    // A rejection.
    fake.revoke_family("acct-2");
    assert_eq!(
        d.request("POST", "/v1/connections/dead/refresh", None)
            .status,
        409
    );
    assert_eq!(d.get_json("/v1/connections/dead/token").0, 409);
    // A transient failure.
    fake.inject_token(Fault::Status(502));
    assert_eq!(
        d.request("POST", "/v1/connections/ok/refresh", None).status,
        503
    );
    // The connection gauges are computed at the scrape, so the first try already sees the
    // rejection.
    let mut text = String::new();
    assert!(eventually(Duration::from_secs(8), || {
        text = d.metrics_get("/metrics").unwrap().text();
        text.contains("tokend_connections{status=\"needs_reauth\"} 1")
    }));
    let m = |s: &str| metric(&text, s);
    assert_eq!(m("tokend_connections{status=\"active\"}"), 1.0);
    assert_eq!(m("tokend_connections{status=\"needs_reauth\"}"), 1.0);
    // Two imports, plus the retry of the ambiguous 502 inside the leeway.
    let success = m("tokend_refreshes_total{outcome=\"success\"}");
    assert!((2.0..=3.0).contains(&success), "{success}");
    assert_eq!(m("tokend_refreshes_total{outcome=\"rejected\"}"), 1.0);
    assert_eq!(
        m("tokend_refreshes_total{outcome=\"transient_error\"}"),
        1.0
    );
    assert_eq!(m("tokend_refresh_duration_seconds_count"), success + 2.0);
    assert_eq!(m("tokend_token_requests_total{outcome=\"cached\"}"), 3.0);
    assert_eq!(m("tokend_token_requests_total{outcome=\"not_found\"}"), 1.0);
    assert_eq!(
        m("tokend_token_requests_total{outcome=\"needs_reauth\"}"),
        1.0
    );
    assert!(m("tokend_site_resolutions_total{outcome=\"success\"}") >= 2.0);
    let id = ok["id"].as_str().unwrap();
    let deadline = m(&format!(
        "tokend_connection_inactivity_deadline_timestamp_seconds{{connection=\"{id}\"}}"
    ));
    let headroom = m("tokend_inactivity_headroom_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (deadline - now - headroom).abs() < 30.0,
        "{deadline} {headroom}"
    );
    assert!(headroom > 89.0 * 86_400.0, "{headroom}");
    assert!(
        text.contains(&format!(
            "tokend_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    assert!(text.contains(
        "tokend_api_request_duration_seconds_bucket{route=\"/v1/connections/{id}/token\""
    ));
    assert!(text.contains("tokend_job_last_success_timestamp_seconds{cron_job=\"resolve_sites\"}"));
    assert!(text.contains("process_resident_memory_bytes"));
    // Probes.
    assert_eq!(d.metrics_get("/healthz").unwrap().status, 200);
    assert_eq!(d.metrics_get("/readyz").unwrap().status, 200);
    // promtool, when installed; required in CI (.ci/ops-checks installs it before the tests
    // and .ci/run sets TOKEND_REQUIRE_PROMTOOL).
    let spawned = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    if let Err(e) = &spawned {
        assert!(
            std::env::var_os("TOKEND_REQUIRE_PROMTOOL").is_none(),
            "promtool is required here but cannot run: {e}"
        );
    }
    if let Ok(mut p) = spawned {
        use std::io::Write;
        p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = p.wait_with_output().unwrap();
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_no_secrets(&(d.logs() + &text), &fake);
}

#[test]
fn logs_are_json_lines_with_connection_ids_and_journald_gets_no_timestamps() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::builder(&fake)
        .set("daemon", "log_format", &toml_str("json"))
        .env("RUST_LOG", "")
        .start();
    let conn = import(&d, "conf", &rt);
    let id = conn["id"].as_str().unwrap();
    let text = last_run_stderr(&d);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| l["timestamp"].is_string() && l["level"].is_string())
    );
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "refreshed" && l["connection"] == id),
        "{text}"
    );
    assert!(
        !lines.iter().any(|l| l["level"] == "DEBUG"),
        "default level is info"
    );
    assert_no_secrets(&text, &fake);

    let quiet = TestDaemon::builder(&fake)
        .set("daemon", "log_level", &toml_str("warn"))
        .env("RUST_LOG", "")
        .start();
    assert!(
        !last_run_stderr(&quiet).contains("INFO"),
        "log_level = warn hides info lines"
    );

    let journald = TestDaemon::builder(&fake)
        .env("JOURNAL_STREAM", "8:12345")
        .env("RUST_LOG", "")
        .start();
    let text = last_run_stderr(&journald);
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap();
    assert!(
        first.trim_start().starts_with("INFO"),
        "journald adds its own timestamps: {first}"
    );
}

#[test]
fn a_job_that_keeps_failing_is_reported_and_recovers() {
    let fake = FakeAtlassian::start();
    let mut d = TestDaemon::builder(&fake)
        .set("jobs", "maintenance", &toml_str("* * * * * *"))
        .metrics()
        .prepare();
    let disk = SmallDisk::mount(&d.state_dir(), "4m");
    d.restart();
    assert_eq!(d.get_json("/v1/health").0, 200);
    disk.fill();
    assert!(
        eventually(Duration::from_secs(15), || {
            d.get_json("/v1/health").1["stalled_jobs"]
                .as_array()
                .is_some_and(|a| a.iter().any(|j| j == "maintenance"))
        }),
        "{}",
        d.logs()
    );
    let ready = d.metrics_get("/readyz").unwrap();
    assert_eq!(ready.status, 503);
    assert!(ready.text().contains("ledger"), "{}", ready.text());
    assert!(d.logs().contains("re-arming"), "{}", d.logs());
    disk.free();
    assert!(
        eventually(Duration::from_secs(15), || d.get_json("/v1/health").0
            == 200),
        "{}",
        d.get_json("/v1/health").1
    );
    assert_eq!(d.metrics_get("/readyz").unwrap().status, 200);
    d.kill9();
    drop(disk);
}
