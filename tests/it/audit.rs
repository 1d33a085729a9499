//! The audit trail of token reads: who read which token, folded per uid and minute, written
//! in the background, read by an admin through the events route and `tokend events`.

use crate::fake::{FakeAtlassian, FakeSite};
use crate::util::{
    TestDaemon, assert_no_secrets, assert_success, import, metric, open_ledger, toml_str,
};
use serde_json::Value;

fn events(d: &TestDaemon, label: &str) -> Vec<Value> {
    let out = d.cli(&["events", label, "--json"], None);
    assert_success("tokend events --json", &out);
    let v: Value = serde_json::from_slice(&out.stdout).expect("events JSON");
    v.as_array().cloned().unwrap_or_default()
}

fn reads_by(events: &[Value], kind: &str, uid: u64) -> u64 {
    events
        .iter()
        .filter(|e| e["kind"] == kind && e["peer"]["uid"].as_u64() == Some(uid))
        .map(|e| e["count"].as_u64().unwrap_or(0))
        .sum()
}

/// Token reads of uid 65534 and of root, and a refused read, are recorded with the uid, a
/// pid and a count; 10,000 reads are folded into a handful of ledger writes; the events
/// survive a restart; no event carries a token.
#[test]
fn token_reads_are_audited_per_uid_and_minute_with_few_writes() {
    let fake = FakeAtlassian::start();
    let rt1 = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let rt2 = fake.issue_grant("acct-2", &[FakeSite::jira("beta")]);
    let mut d = TestDaemon::builder(&fake)
        .set("daemon", "socket_mode", &toml_str("0666"))
        .set("daemon", "node_name", &toml_str("node-it"))
        .extra("[[access.clients]]\nuid = 65534\nconnections = [\"conf\"]")
        .metrics()
        .start();
    import(&d, "conf", &rt1);
    import(&d, "jira", &rt2);
    for _ in 0..3 {
        let out = d.cli_as(65534, 65534, &["token", "conf"], None);
        assert_success("a listed connection", &out);
    }
    let out = d.cli_as(65534, 65534, &["token", "jira"], None);
    assert_eq!(out.status.code(), Some(1), "refused");
    let writes_before = {
        let m = d.metrics_get("/metrics").unwrap().text();
        metric(&m, "tokend_audit_writes_total{outcome=\"success\"}")
    };
    for _ in 0..10_000 {
        let r = d.request("GET", "/v1/connections/conf/token", None);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Shown at once, from memory, before any write.
    let now = events(&d, "conf");
    assert_eq!(reads_by(&now, "token_read", 65534), 3, "{now:?}");
    assert_eq!(reads_by(&now, "token_read", 0), 10_000);
    let refused = events(&d, "jira");
    assert_eq!(reads_by(&refused, "token_refused", 65534), 1, "{refused:?}");
    let read = now
        .iter()
        .find(|e| e["kind"] == "token_read" && e["peer"]["uid"] == 65534)
        .unwrap();
    assert!(
        read["peer"]["pid"].as_u64().is_some_and(|p| p > 0),
        "{read}"
    );
    let m = d.metrics_get("/metrics").unwrap().text();
    let writes = metric(&m, "tokend_audit_writes_total{outcome=\"success\"}") - writes_before;
    assert!(writes <= 3.0, "10,000 reads cost {writes} audit writes");

    // Written at the latest at shutdown, read back from the ledger after a restart.
    d.sigterm();
    assert!(
        d.wait_exit(std::time::Duration::from_secs(15))
            .is_some_and(|s| s.success())
    );
    d.restart();
    let after = events(&d, "conf");
    assert_eq!(reads_by(&after, "token_read", 65534), 3, "{after:?}");
    assert_eq!(reads_by(&after, "token_read", 0), 10_000);
    let stored = after
        .iter()
        .find(|e| e["kind"] == "token_read" && e["peer"]["uid"] == 0)
        .unwrap();
    assert_eq!(stored["node"], "node-it", "{stored}");
    let rows: i64 = {
        let db = open_ledger(&d);
        db.query_row(
            "SELECT count(*) FROM events WHERE kind IN ('token_read', 'token_refused')",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert!(rows <= 6, "{rows} audit rows for 10,004 reads");
    // Only admins read the trail.
    let out = d.cli_as(65534, 65534, &["events", "conf"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("forbidden"));
    // Human output and limits.
    let out = d.cli(&["events", "conf"], None);
    assert_success("tokend events", &out);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("token_read") && text.contains("uid 65534"),
        "{text}"
    );
    let (code, v) = d.get_json("/v1/connections/conf/events?limit=1");
    assert_eq!(code, 200);
    assert_eq!(v.as_array().map(Vec::len), Some(1));
    let (code, _) = d.get_json("/v1/connections/conf/events?limit=5000");
    assert_eq!(code, 400);
    let (code, v) = d.get_json("/v1/connections/conf/events?since=2999-01-01T00:00:00Z");
    assert_eq!((code, v.as_array().map(Vec::len)), (200, Some(0)));
    assert_no_secrets(&format!("{after:?}{text}{}", d.logs()), &fake);
}
