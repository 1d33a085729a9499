//! The socket API under bad input, access control, and the daemon's start-up rules.

use crate::fake::{FakeAtlassian, FakeSite};
use crate::util::{
    TestDaemon, assert_no_secrets, assert_success, eventually, import, metric, toml_str,
};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

fn assert_error(r: &crate::util::HttpResponse, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

fn healthy(d: &TestDaemon) {
    let (code, v) = d.get_json("/v1/health");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["status"], "ok");
}

#[test]
fn bad_requests_get_documented_errors_and_the_daemon_keeps_serving() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::start(&fake);
    import(&d, "conf", &rt);

    let json = "application/json";
    assert_error(
        &d.request("POST", "/v1/connections", Some((json, b"{not json"))),
        400,
        "bad_request",
    );
    assert_error(
        &d.request(
            "POST",
            "/v1/connections",
            Some((
                "text/plain",
                br#"{"provider":"atlassian","label":"x","refresh_token":"y"}"#,
            )),
        ),
        400,
        "bad_request",
    );
    // A body that echoes a secret-looking value must not be quoted back.
    let r = d.request(
        "POST",
        "/v1/connections",
        Some((
            json,
            br#"{"provider":"atlassian","label":5,"refresh_token":"rt-echo-me-please-0123456789"}"#,
        )),
    );
    assert_error(&r, 400, "bad_request");
    assert!(!r.text().contains("rt-echo-me"), "{}", r.text());
    assert_error(
        &d.request(
            "POST",
            "/v1/connections",
            Some((
                json,
                br#"{"provider":"github","label":"x","refresh_token":"y"}"#,
            )),
        ),
        400,
        "bad_request",
    );
    assert_error(
        &d.request(
            "POST",
            "/v1/connections",
            Some((
                json,
                br#"{"provider":"atlassian","label":"../etc","refresh_token":"y"}"#,
            )),
        ),
        400,
        "bad_request",
    );
    let big = vec![b'a'; 10 * 1024 * 1024];
    assert_error(
        &d.request("POST", "/v1/connections", Some((json, &big))),
        413,
        "payload_too_large",
    );
    assert_error(
        &d.request("GET", "/v1/connections/nope", None),
        404,
        "not_found",
    );
    assert_error(
        &d.request("GET", "/v1/connections/nope/token", None),
        404,
        "not_found",
    );
    assert_error(
        &d.request("GET", "/v1/connections/..%2F..%2Fetc%2Fpasswd", None),
        404,
        "not_found",
    );
    assert_error(
        &d.request("GET", "/v1/connections/conf/../../x", None),
        404,
        "not_found",
    );
    assert_error(&d.request("GET", "/etc/passwd", None), 404, "not_found");
    assert_error(&d.request("GET", "/v1/token", None), 400, "bad_request");
    assert_error(
        &d.request("GET", "/v1/connections/conf/token?min_valid=soon", None),
        400,
        "bad_request",
    );
    assert_error(
        &d.request("PUT", "/v1/connections/conf", None),
        400,
        "bad_request",
    );
    // Garbage that is not HTTP at all.
    let r = d.raw(b"\x00\x01\x02 hello\r\n\r\n");
    if let Ok(r) = r {
        assert_eq!(r.status, 400);
    }
    // A client that connects and says nothing does not block others.
    let _silent = std::os::unix::net::UnixStream::connect(d.socket_path()).unwrap();
    healthy(&d);
    let (code, tok) = d.get_json("/v1/connections/conf/token");
    assert_eq!(code, 200, "{tok}");
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn admin_routes_refuse_other_users_but_tokens_are_readable() {
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::builder(&fake)
        .set("daemon", "socket_mode", &toml_str("0666"))
        .start();
    import(&d, "conf", &rt);
    let nobody = 65534;
    for args in [vec!["refresh", "conf"], vec!["remove", "conf"]] {
        let out = d.cli_as(nobody, nobody, &args, None);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("forbidden"), "{args:?}: {err}");
    }
    let rt2 = fake.issue_grant("acct-2", &[FakeSite::jira("beta")]);
    let out = d.cli_as(nobody, nobody, &["import", "--label", "x"], Some(&rt2));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("forbidden"));
    assert_eq!(
        fake.rotations("acct-2"),
        0,
        "a refused import never touches the token"
    );
    // Reading is open when access.clients is empty.
    let out = d.cli_as(nobody, nobody, &["token", "conf"], None);
    assert_success("token as nobody", &out);
    let out = d.cli_as(nobody, nobody, &["list"], None);
    assert_success("list as nobody", &out);
    assert_eq!(d.get_json("/v1/connections/conf").1["status"], "active");
    healthy(&d);
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn client_lists_limit_who_reads_which_token() {
    let fake = FakeAtlassian::start();
    let rt1 = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let rt2 = fake.issue_grant("acct-2", &[FakeSite::jira("beta")]);
    let d = TestDaemon::builder(&fake)
        .set("daemon", "socket_mode", &toml_str("0666"))
        .extra("[[access.clients]]\nuid = 65534\nconnections = [\"conf\"]")
        .start();
    import(&d, "conf", &rt1);
    import(&d, "jira", &rt2);
    let out = d.cli_as(65534, 65534, &["token", "conf"], None);
    assert_success("listed connection", &out);
    let out = d.cli_as(65534, 65534, &["token", "jira"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("forbidden"));
    let out = d.cli_as(65533, 65533, &["token", "conf"], None);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a peer matching no entry reads nothing"
    );
    let out = d.cli_as(
        65534,
        65534,
        &["token", "--site", "beta.atlassian.net"],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("forbidden"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.cli_as(
        65534,
        65534,
        &["token", "--site", "acme.atlassian.net"],
        None,
    );
    assert_success("the listed connection, by its site", &out);
    let out = d.cli_as(
        65533,
        65533,
        &["token", "--site", "acme.atlassian.net"],
        None,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "a peer matching no entry reads nothing by site either"
    );
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn a_second_daemon_on_the_same_socket_refuses_and_a_stale_socket_is_replaced() {
    let fake = FakeAtlassian::start();
    let mut d = TestDaemon::start(&fake);
    let mut second = d.spawn_raw();
    let status = wait_child(&mut second, Duration::from_secs(10)).expect("second daemon exits");
    assert!(!status.success());
    let logs = d.logs();
    healthy(&d);
    // A crash leaves the socket file behind; the next start replaces it.
    d.kill9();
    assert!(d.socket_path().exists());
    d.restart();
    healthy(&d);
    assert!(logs.contains("already"), "{logs}");
}

fn wait_child(c: &mut std::process::Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    None
}

#[test]
fn the_socket_gets_its_mode_and_the_state_dir_is_private() {
    let fake = FakeAtlassian::start();
    let d = TestDaemon::builder(&fake)
        .set("daemon", "socket_mode", &toml_str("0600"))
        .start();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(d.socket_path()), 0o600);
    assert_eq!(mode(&d.state_dir()), 0o700);
    assert_eq!(mode(&d.ledger_path()), 0o600);
}

#[test]
fn sigterm_stops_cleanly_and_removes_the_socket() {
    let fake = FakeAtlassian::start();
    let mut d = TestDaemon::start(&fake);
    d.sigterm();
    let status = d.wait_exit(Duration::from_secs(15)).expect("exits");
    assert!(status.success(), "{status:?}\n{}", d.logs());
    assert!(!d.socket_path().exists());
}

#[test]
fn unconfigured_provider_starts_and_explains() {
    let fake = FakeAtlassian::start();
    let d = TestDaemon::builder(&fake)
        .set("providers.atlassian", "client_id", &toml_str(""))
        .unset("providers.atlassian", "client_secret_file")
        .client_secret(None)
        .start();
    healthy(&d);
    let out = d.cli(&["import", "--label", "x"], Some("rt-whatever"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("client_id"), "{err}");
}

#[test]
fn bad_config_is_refused_with_exit_64_naming_key_and_line() {
    let fake = FakeAtlassian::start();
    let mut d = TestDaemon::builder(&fake)
        .set("refresh", "rotate_after", &toml_str("7 dayz"))
        .prepare();
    let out = d.cli(&["check-config"], None);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rotate_after") && err.contains("daemon.toml:"),
        "{err}"
    );
    let mut run = d.spawn_raw();
    let status = wait_child(&mut run, Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(64));
    let _ = &mut d;
    let good = TestDaemon::builder(&fake).prepare();
    let out = good.cli(&["check-config"], None);
    assert_success("check-config", &out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains(crate::fake::CLIENT_SECRET), "{text}");
}

#[test]
fn a_client_that_never_finishes_its_headers_is_dropped() {
    use std::io::{Read, Write};
    let fake = FakeAtlassian::start();
    let d = TestDaemon::start(&fake);
    let mut slow = std::os::unix::net::UnixStream::connect(d.socket_path()).unwrap();
    slow.write_all(b"GET /v1/health HTTP/1.1\r\nHost: local")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(8) && waited < Duration::from_secs(15),
        "dropped after {waited:?} (header read timeout is 10 s)"
    );
    healthy(&d);
}

/// Reads every stream until the daemon closes it (EOF or a reset) or `timeout` passes,
/// polling them all without blocking; returns, per stream, what arrived and when it closed.
fn read_until_closed(
    streams: &mut [std::os::unix::net::UnixStream],
    timeout: Duration,
) -> Vec<(Vec<u8>, Option<std::time::Instant>)> {
    use std::io::Read;
    let mut out: Vec<(Vec<u8>, Option<std::time::Instant>)> =
        streams.iter().map(|_| (Vec::new(), None)).collect();
    for s in streams.iter() {
        s.set_nonblocking(true).unwrap();
    }
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while out.iter().any(|(_, closed)| closed.is_none()) && std::time::Instant::now() < deadline {
        for (s, (got, closed)) in streams.iter_mut().zip(out.iter_mut()) {
            while closed.is_none() {
                match s.read(&mut buf) {
                    Ok(0) => *closed = Some(std::time::Instant::now()),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => *closed = Some(std::time::Instant::now()),
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    out
}

fn parse_answer(bytes: &[u8]) -> crate::util::HttpResponse {
    crate::util::parse_response(bytes, true)
        .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(bytes)))
        .unwrap_or_else(|| panic!("incomplete answer {:?}", String::from_utf8_lossy(bytes)))
}

/// Issue "Defend the chains", item 4: 1,100 connections from one uid send the headers of a
/// 65,000-byte `POST /v1/connections` and never the body. That uid gets its share of the
/// socket's connections (the rest are answered 503 at once), a token request from another
/// uid is answered within 1 s meanwhile, and the stalled connections are closed after the
/// body timeout.
#[test]
fn stalled_bodies_from_one_uid_do_not_starve_another() {
    use std::io::Write;
    use tokend::api::server::{BODY_READ_TIMEOUT, MAX_CONNECTIONS_PER_UID};
    const FLOOD: usize = 1_100;
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let d = TestDaemon::builder(&fake)
        .set("daemon", "socket_mode", &toml_str("0666"))
        .metrics()
        .start();
    import(&d, "conf", &rt);
    crate::util::raise_open_files(FLOOD as u64 + 512);
    let head = b"POST /v1/connections HTTP/1.1\r\nHost: localhost\r\n\
                 Content-Type: application/json\r\nContent-Length: 65000\r\n\r\n";
    let mut flood = Vec::with_capacity(FLOOD);
    let mut opened = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        let mut s = std::os::unix::net::UnixStream::connect(d.socket_path()).unwrap();
        opened.push(std::time::Instant::now());
        // A connection over the share may be answered and closed before this write.
        let _ = s.write_all(head);
        flood.push(s);
    }
    let metrics = || d.metrics_get("/metrics").unwrap().text();
    let refused = "tokend_api_connections_refused_total{reason=\"uid_limit\"}";
    let open = "tokend_api_connections_open";
    assert!(
        eventually(Duration::from_secs(10), || {
            let m = metrics();
            metric(&m, refused) == (FLOOD - MAX_CONNECTIONS_PER_UID) as f64
                && metric(&m, open) == MAX_CONNECTIONS_PER_UID as f64
        }),
        "root holds its whole share and no more:\n{}",
        metrics()
    );

    // Root holds every connection it may; another uid is answered at once.
    let started = std::time::Instant::now();
    let out = d.cli_as(65534, 65534, &["token", "conf"], None);
    let took = started.elapsed();
    assert_success("token as nobody during the flood", &out);
    eprintln!("a token request from uid 65534 during the flood took {took:?}");
    assert!(
        took < Duration::from_secs(1),
        "a token request from another uid took {took:?} during the flood"
    );
    assert!(String::from_utf8_lossy(&out.stdout).trim().len() > 10);

    let closed = read_until_closed(&mut flood, BODY_READ_TIMEOUT + Duration::from_secs(20));
    let (mut timed_out, mut turned_away) = (0, 0);
    for (i, (bytes, at)) in closed.iter().enumerate() {
        let at = at.unwrap_or_else(|| panic!("connection {i} is still open"));
        let lived = at - opened[i];
        let r = parse_answer(bytes);
        match r.status {
            503 => {
                assert_error(&r, 503, "provider_unavailable");
                assert_eq!(r.header("retry-after"), Some("1"));
                turned_away += 1;
            }
            400 => {
                assert_error(&r, 400, "bad_request");
                assert!(r.text().contains("did not arrive"), "{}", r.text());
                assert!(
                    lived >= BODY_READ_TIMEOUT - Duration::from_secs(1)
                        && lived < BODY_READ_TIMEOUT + Duration::from_secs(15),
                    "a stalled body was closed after {lived:?} (the body timeout is {BODY_READ_TIMEOUT:?})"
                );
                timed_out += 1;
            }
            s => panic!("connection {i}: unexpected status {s}: {}", r.text()),
        }
    }
    assert_eq!(timed_out, MAX_CONNECTIONS_PER_UID);
    assert_eq!(turned_away, FLOOD - MAX_CONNECTIONS_PER_UID);
    let m = metrics();
    assert_eq!(
        metric(&m, "tokend_api_timeouts_total{phase=\"body\"}"),
        MAX_CONNECTIONS_PER_UID as f64
    );
    assert!(eventually(Duration::from_secs(5), || metric(
        &metrics(),
        open
    ) == 0.0));
    // Root has its share back.
    healthy(&d);
    let (code, tok) = d.get_json("/v1/connections/conf/token");
    assert_eq!(code, 200, "{tok}");
    assert_no_secrets(&d.logs(), &fake);
}

#[test]
fn a_non_admin_with_a_slow_body_is_refused_without_waiting_for_it() {
    use std::io::Write;
    let fake = FakeAtlassian::start();
    let d = TestDaemon::builder(&fake)
        .set("daemon", "socket_mode", &toml_str("0666"))
        .start();
    let mut s = crate::util::connect_as(d.socket_path(), 65534, 65534).unwrap();
    s.write_all(
        b"POST /v1/connections HTTP/1.1\r\nHost: localhost\r\n\
          Content-Type: application/json\r\nContent-Length: 65000\r\n\r\n{\"provider\":",
    )
    .unwrap();
    let started = std::time::Instant::now();
    let closed = read_until_closed(std::slice::from_mut(&mut s), Duration::from_secs(20));
    let waited = started.elapsed();
    let r = parse_answer(&closed[0].0);
    assert_error(&r, 403, "forbidden");
    assert!(
        closed[0].1.is_some(),
        "the connection is closed after the 403"
    );
    assert!(
        waited < Duration::from_secs(5),
        "the 403 came after {waited:?}: the daemon waited for the body"
    );
    healthy(&d);
}

#[test]
fn one_uid_gets_its_share_of_connections_and_another_still_connects() {
    use std::io::Write;
    use tokend::api::server::MAX_CONNECTIONS_PER_UID;
    let fake = FakeAtlassian::start();
    let d = TestDaemon::builder(&fake)
        .set("daemon", "socket_mode", &toml_str("0666"))
        .start();
    crate::util::raise_open_files(MAX_CONNECTIONS_PER_UID as u64 + 512);
    // Root (this test) opens its whole share and says nothing...
    let held: Vec<_> = (0..MAX_CONNECTIONS_PER_UID)
        .map(|_| std::os::unix::net::UnixStream::connect(d.socket_path()).unwrap())
        .collect();
    // ...so its next connection is answered 503 at once, before the daemon reads it...
    let started = std::time::Instant::now();
    let r = d
        .try_request("GET", "/v1/health", &[], None)
        .expect("an answer");
    assert_error(&r, 503, "provider_unavailable");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("uid 0 already holds {MAX_CONNECTIONS_PER_UID}")),
        "{}",
        r.text()
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // ...while another uid connects and is served, raw and through the CLI.
    let mut other = crate::util::connect_as(d.socket_path(), 65534, 65534).unwrap();
    other
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let closed = read_until_closed(std::slice::from_mut(&mut other), Duration::from_secs(20));
    let r = parse_answer(&closed[0].0);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "ok");
    assert_success("list as nobody", &d.cli_as(65534, 65534, &["list"], None));
    // Closing connections gives the share back.
    drop(held);
    assert!(eventually(Duration::from_secs(5), || d
        .try_request("GET", "/v1/health", &[], None)
        .is_ok_and(|r| r.status == 200)));
}

/// Six connections, labels given out of order. `GET /v1/connections`
/// pages with `?limit=2`, following `Link: <...>; rel="next"` until a page has none; bad
/// `limit` and `after` values are refused.
///
/// Correct: the pages together list every connection exactly once, in the label order of
/// the unpaged answer (which is unchanged: the whole array, sorted by label); the last page
/// has no link; `tokend list --json` (which pages internally) prints the same connections;
/// `limit` outside 1..=1000, a non-number, an empty `after` and an unknown parameter answer
/// 400 `bad_request`, and the daemon keeps serving.
#[test]
fn connections_page_in_label_order_with_a_next_link() {
    let fake = FakeAtlassian::start();
    let d = TestDaemon::start(&fake);
    let labels = ["echo", "alpha", "delta", "bravo.2", "foxtrot", "charlie"];
    for (i, label) in labels.iter().enumerate() {
        let rt = fake.issue_grant(&format!("acct-{i}"), &[FakeSite::confluence("acme")]);
        import(&d, label, &rt);
    }
    let labels_of = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap_or_else(|| panic!("not an array: {v}"))
            .iter()
            .map(|c| c["label"].as_str().unwrap().to_owned())
            .collect()
    };
    let (code, all) = d.get_json("/v1/connections");
    assert_eq!(code, 200, "{all}");
    let mut sorted: Vec<String> = labels.iter().map(|l| (*l).to_owned()).collect();
    sorted.sort();
    assert_eq!(
        labels_of(&all),
        sorted,
        "the unpaged answer is every connection by label"
    );

    let mut paged = Vec::new();
    let mut path = "/v1/connections?limit=2".to_owned();
    let mut pages = 0;
    loop {
        let r = d.request("GET", &path, None);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let page = labels_of(&r.json());
        assert!(page.len() <= 2, "{path}: {page:?}");
        paged.extend(page);
        pages += 1;
        assert!(pages <= labels.len(), "the pages never end: {paged:?}");
        let Some(link) = r.header("link") else { break };
        let target = link
            .strip_prefix('<')
            .and_then(|l| l.split_once(">; rel=\"next\""))
            .map(|(t, _)| t.to_owned())
            .unwrap_or_else(|| panic!("not a next link: {link}"));
        path = target;
    }
    assert_eq!(
        paged, sorted,
        "the pages cover every connection once, in order"
    );
    assert_eq!(
        pages, 3,
        "six connections in pages of two; the last has no link"
    );

    let (code, after) = d.get_json("/v1/connections?limit=10&after=charlie");
    assert_eq!(code, 200, "{after}");
    assert_eq!(labels_of(&after), sorted[3..], "after is exclusive");
    let (code, none) = d.get_json("/v1/connections?limit=10&after=zulu");
    assert_eq!((code, labels_of(&none)), (200, Vec::new()));

    let out = d.cli(&["list", "--json"], None);
    assert_success("tokend list --json", &out);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        labels_of(&listed),
        sorted,
        "tokend list --json pages through them all"
    );

    for bad in [
        "limit=0",
        "limit=1001",
        "limit=two",
        "limit=-1",
        "after=",
        "limit=2&after=",
        "bogus=1",
    ] {
        assert_error(
            &d.request("GET", &format!("/v1/connections?{bad}"), None),
            400,
            "bad_request",
        );
    }
    healthy(&d);
    assert_no_secrets(&d.logs(), &fake);
}
