//! Black-box fuzzing of the socket API: random bytes and mutated requests over many
//! short-lived connections, for a bounded time, against a daemon holding one connection.
//!
//! Every case is tolerated whatever the answer (or a closed connection); what must hold is
//! that the daemon keeps running and serving (a health check every few cases), never
//! answers 500, never panics, answers every error as the standard JSON error, and prints no
//! secret, although secrets ride along in bodies and headers of the fuzzed requests.
//!
//! `TOKEND_FUZZ_SECS` (default 5) bounds the time, `TOKEND_FUZZ_SEED` replays a run: the
//! seed and the last cases are printed when the test fails.

use crate::fake::{self, FakeAtlassian, FakeSite};
use crate::util::{HttpResponse, TestDaemon, assert_no_secrets, import, parse_response};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Idle time after which a read gives up on more bytes of an answer.
const READ_IDLE: Duration = Duration::from_millis(200);
/// The longest one case may read for.
const CASE_BUDGET: Duration = Duration::from_secs(2);
/// The most answer bytes kept from one case.
const READ_CAP: usize = 256 * 1024;
/// Connections left open (silent or half-sent) while other cases run.
const MAX_IDLE: usize = 4;
/// A well-formed health check every this many cases.
const CHECK_EVERY: usize = 25;

/// Prints the seed and the last cases if the test fails.
struct Replay {
    seed: u64,
    cases: usize,
    last: VecDeque<String>,
}

impl Replay {
    fn record(&mut self, what: String) {
        self.cases += 1;
        if self.last.len() == 8 {
            self.last.pop_front();
        }
        self.last.push_back(what);
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "===== tokend-it fuzz: seed {} (replay with TOKEND_FUZZ_SEED={}), {} cases; the last:\n{}",
                self.seed,
                self.seed,
                self.cases,
                Vec::from(self.last.clone()).join("\n")
            );
        }
    }
}

/// A request before serialization, so that mutations can target its parts.
#[derive(Clone)]
struct Request {
    method: Vec<u8>,
    target: Vec<u8>,
    version: Vec<u8>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<u8>,
}

impl Request {
    fn new(method: &str, target: &str, body: Option<&[u8]>, close: bool) -> Request {
        let mut headers = vec![(b"Host".to_vec(), b"localhost".to_vec())];
        if close {
            headers.push((b"Connection".to_vec(), b"close".to_vec()));
        }
        let body = body.map(<[u8]>::to_vec).unwrap_or_default();
        if !body.is_empty() || method == "POST" {
            headers.push((b"Content-Type".to_vec(), b"application/json".to_vec()));
            headers.push((
                b"Content-Length".to_vec(),
                body.len().to_string().into_bytes(),
            ));
        }
        Request {
            method: method.into(),
            target: target.into(),
            version: b"HTTP/1.1".to_vec(),
            headers,
            body,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.method);
        out.push(b' ');
        out.extend_from_slice(&self.target);
        out.push(b' ');
        out.extend_from_slice(&self.version);
        out.extend_from_slice(b"\r\n");
        for (k, v) in &self.headers {
            out.extend_from_slice(k);
            out.extend_from_slice(b": ");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }

    fn set_header(&mut self, name: &str, value: Vec<u8>) {
        self.headers
            .retain(|(k, _)| !k.eq_ignore_ascii_case(name.as_bytes()));
        self.headers.push((name.as_bytes().to_vec(), value));
    }
}

/// What the fuzzer knows of the daemon's world.
struct World {
    /// A refresh token the fake issued (to a second account): it rides in fuzzed bodies,
    /// so a daemon that logs or echoes a body is caught by the secret scan.
    spare_rt: String,
}

impl World {
    /// A well-formed request of the API (none that removes the connection under test).
    fn valid(&self, rng: &mut StdRng, close: bool) -> (String, Request) {
        let import = format!(
            r#"{{"provider":"atlassian","label":"fz-{}","refresh_token":"{}"}}"#,
            rng.random_range(0..4),
            self.spare_rt
        );
        let (what, method, target, body): (&str, &str, &str, Option<Vec<u8>>) =
            match rng.random_range(0..20) {
                0..=3 => ("health", "GET", "/v1/health", None),
                4..=5 => ("list", "GET", "/v1/connections", None),
                6..=7 => ("show", "GET", "/v1/connections/conf", None),
                8..=10 => (
                    "token",
                    "GET",
                    "/v1/connections/conf/token?min_valid=60",
                    None,
                ),
                11..=12 => (
                    "site token",
                    "GET",
                    "/v1/token?site=acme.atlassian.net",
                    None,
                ),
                13..=15 => (
                    "import",
                    "POST",
                    "/v1/connections",
                    Some(import.into_bytes()),
                ),
                16 => (
                    "authorize",
                    "POST",
                    "/v1/authorizations",
                    Some(br#"{"provider":"atlassian"}"#.to_vec()),
                ),
                17 => ("refresh", "POST", "/v1/connections/conf/refresh", None),
                18 => ("remove missing", "DELETE", "/v1/connections/nope", None),
                _ => ("not found", "GET", "/v1/connections/nope/token", None),
            };
        let mut req = Request::new(method, target, body.as_deref(), close);
        if rng.random_bool(0.2) {
            // Secrets in headers the daemon must neither log nor echo.
            req.headers.push((
                b"Authorization".to_vec(),
                format!("Bearer {}", fake::CLIENT_SECRET).into_bytes(),
            ));
            req.headers.push((
                b"X-Refresh-Token".to_vec(),
                self.spare_rt.clone().into_bytes(),
            ));
        }
        (what.to_owned(), req)
    }
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.random_range(0..=max);
    (0..n).map(|_| rng.random()).collect()
}

/// One structural mutation of a request; returns what it did.
fn mutate_request(rng: &mut StdRng, req: &mut Request) -> &'static str {
    match rng.random_range(0..18) {
        0 => {
            let v = [
                "99999999999999999999999",
                "18446744073709551615",
                "10737418240",
            ][rng.random_range(0..3)];
            req.set_header("Content-Length", v.into());
            "huge Content-Length"
        }
        1 => {
            req.set_header("Content-Length", b"-1".to_vec());
            "negative Content-Length"
        }
        2 => {
            let n = req.body.len();
            req.headers
                .push((b"Content-Length".to_vec(), (n + 7).to_string().into_bytes()));
            req.headers
                .push((b"Content-Length".to_vec(), n.to_string().into_bytes()));
            "duplicate Content-Length"
        }
        3 => {
            let n = req.body.len() + rng.random_range(1..100);
            req.set_header("Content-Length", n.to_string().into_bytes());
            "Content-Length beyond the body"
        }
        4 => {
            req.set_header("Transfer-Encoding", b"chunked".to_vec());
            req.body = match rng.random_range(0..4) {
                0 => b"zz\r\nhello\r\n0\r\n\r\n".to_vec(),
                1 => b"ffffffffffffffffffff\r\nx\r\n".to_vec(),
                2 => b"5\r\nabc\r\n0\r\n\r\n".to_vec(),
                _ => {
                    let mut b = b"3;ext=\xff\r\n{}\n\r\n".to_vec();
                    b.extend(random_bytes(rng, 64));
                    b
                }
            };
            "chunked garbage"
        }
        5 => {
            req.target.extend_from_slice(
                [&b"/\xff\xfe"[..], b"%FF%FE%00", b"/%C0%AF", b"\x80"][rng.random_range(0..4)],
            );
            "invalid UTF-8 in the path"
        }
        6 => {
            req.headers
                .push((b"X-Junk".to_vec(), vec![0xff, 0xc3, 0x28, b'a', 0x80]));
            "invalid UTF-8 in a header"
        }
        7 => {
            let n = [8 * 1024, 70 * 1024, 200 * 1024][rng.random_range(0..3)];
            req.headers.push((b"X-Long".to_vec(), vec![b'a'; n]));
            "very long header line"
        }
        8 => {
            for i in 0..rng.random_range(90..200) {
                req.headers
                    .push((format!("X-H{i}").into_bytes(), b"v".to_vec()));
            }
            "many headers"
        }
        9 => {
            let n = [4 * 1024, 80 * 1024][rng.random_range(0..2)];
            req.target = format!("/v1/connections/{}", "a".repeat(n)).into_bytes();
            "very long path"
        }
        10 => {
            req.method = [
                &b"PUT"[..],
                b"PATCH",
                b"OPTIONS",
                b"HEAD",
                b"TRACE",
                b"CONNECT",
                b"G\x00T",
                b"",
                b"FOOBARBAZ",
            ][rng.random_range(0..9)]
            .to_vec();
            "odd method"
        }
        11 => {
            req.version = [&b"HTTP/1.0"[..], b"HTTP/2.0", b"HTTP/9.9", b"", b"http/1.1"]
                [rng.random_range(0..5)]
            .to_vec();
            "odd version"
        }
        12 => {
            req.target = [
                &b"*"[..],
                b"http://localhost/v1/health",
                b"",
                b"v1/health",
                b"/v1/connections/..%2F..%2Fetc%2Fpasswd",
                b"/v1/connections/%00/token",
                b"/v1/connections/conf/token?min_valid=%FF",
                b"/v1/token?site=%zz&site=",
                b"/v1//connections///conf",
                b"/v1/connections/conf/token?min_valid=99999999999999999999999",
            ][rng.random_range(0..10)]
            .to_vec();
            "odd target"
        }
        13 => {
            req.set_header("Expect", b"100-continue".to_vec());
            "Expect: 100-continue"
        }
        14 => {
            req.headers
                .retain(|(k, _)| !k.eq_ignore_ascii_case(b"host"));
            "no Host"
        }
        15 => {
            req.headers.push((b" folded".to_vec(), b"line".to_vec()));
            req.headers.push((b"No colon here".to_vec(), Vec::new()));
            "malformed header lines"
        }
        16 => {
            req.set_header(
                "Content-Type",
                [&b"text/plain"[..], b"application/json; charset=\xff", b""]
                    [rng.random_range(0..3)]
                .to_vec(),
            );
            "odd Content-Type"
        }
        _ => {
            req.body = random_bytes(rng, 512);
            let n = req.body.len();
            req.set_header("Content-Length", n.to_string().into_bytes());
            "random body"
        }
    }
}

/// One byte-level mutation; returns what it did.
fn mutate_bytes(rng: &mut StdRng, bytes: &mut Vec<u8>) -> &'static str {
    if bytes.is_empty() {
        bytes.push(rng.random());
        return "insert";
    }
    let at = rng.random_range(0..bytes.len());
    match rng.random_range(0..5) {
        0 => {
            bytes[at] ^= 1 << rng.random_range(0..8);
            "flip"
        }
        1 => {
            let n = rng.random_range(1..8);
            for _ in 0..n {
                bytes.insert(at, rng.random());
            }
            "insert"
        }
        2 => {
            let end = (at + rng.random_range(1..16)).min(bytes.len());
            bytes.drain(at..end);
            "delete"
        }
        3 => {
            let end = (at + rng.random_range(1..32)).min(bytes.len());
            let piece = bytes[at..end].to_vec();
            bytes.splice(at..at, piece);
            "duplicate"
        }
        _ => {
            bytes.truncate(at);
            "truncate"
        }
    }
}

/// How a case ends its side of the connection.
#[derive(Clone, Copy, Debug)]
enum End {
    /// Read the answer with the write side open.
    Read,
    /// Shut down the write side, then read.
    HalfClose,
    /// Close without reading.
    Drop,
    /// Keep the connection open, unread, while other cases run.
    Idle,
}

struct Case {
    what: String,
    bytes: Vec<u8>,
    end: End,
}

fn next_case(rng: &mut StdRng, world: &World) -> Case {
    let end = match rng.random_range(0..20) {
        0..=11 => End::Read,
        12..=16 => End::HalfClose,
        17..=18 => End::Drop,
        _ => End::Idle,
    };
    let (what, bytes) = match rng.random_range(0..20) {
        0..=1 => ("random bytes".to_owned(), random_bytes(rng, 2048)),
        2 => {
            let mut b = random_bytes(rng, 256);
            b.extend_from_slice(b"\r\n\r\n");
            ("random head".to_owned(), b)
        }
        3 => (
            "HTTP/2 preface".to_owned(),
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00".to_vec(),
        ),
        4..=5 => {
            // Pipelined: keep-alive requests, valid or not, the last one closing.
            let n = rng.random_range(2..=5);
            let mut out = Vec::new();
            let mut names = Vec::new();
            for i in 0..n {
                let (what, mut req) = world.valid(rng, i == n - 1);
                if rng.random_bool(0.3) {
                    names.push(format!("{what}+{}", mutate_request(rng, &mut req)));
                } else {
                    names.push(what);
                }
                out.extend(req.bytes());
            }
            (format!("pipelined [{}]", names.join(", ")), out)
        }
        6..=8 => {
            let (what, req) = world.valid(rng, true);
            (format!("valid {what}"), req.bytes())
        }
        9..=14 => {
            let close = rng.random_bool(0.8);
            let (what, mut req) = world.valid(rng, close);
            let mut did = Vec::new();
            for _ in 0..rng.random_range(1..=3) {
                did.push(mutate_request(rng, &mut req));
            }
            (format!("{what} + {}", did.join(", ")), req.bytes())
        }
        _ => {
            let close = rng.random_bool(0.8);
            let (what, req) = world.valid(rng, close);
            let mut bytes = req.bytes();
            let mut did = Vec::new();
            for _ in 0..rng.random_range(1..=4) {
                did.push(mutate_bytes(rng, &mut bytes));
            }
            (format!("{what} + bytes {}", did.join(", ")), bytes)
        }
    };
    Case {
        what: format!("{what} ({} bytes, {end:?})", bytes.len()),
        bytes,
        end,
    }
}

/// Sends a case on a fresh connection; returns the first answer, if one could be parsed,
/// and the connection when the case keeps it idle.
fn run_case(d: &TestDaemon, case: &Case) -> (Option<HttpResponse>, Option<UnixStream>) {
    let Ok(mut s) = UnixStream::connect(d.socket_path()) else {
        return (None, None);
    };
    let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
    let _ = s.set_read_timeout(Some(READ_IDLE));
    // The daemon may answer and close before reading everything (413, 431): write errors
    // are part of the game.
    let _ = s.write_all(&case.bytes);
    match case.end {
        End::Drop => return (None, None),
        End::Idle => return (None, Some(s)),
        End::HalfClose => {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        End::Read => {}
    }
    let started = Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    while started.elapsed() < CASE_BUDGET && buf.len() < READ_CAP {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    (parse_response(&buf, true).ok().flatten(), None)
}

/// A fresh connection can still get a well-formed answer.
fn assert_serving(d: &TestDaemon) {
    let r = d.request("GET", "/v1/health", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "ok");
}

#[test]
fn random_and_mutated_http_never_stops_the_daemon_nor_leaks_a_secret() {
    let seed = std::env::var("TOKEND_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    let secs: f64 = std::env::var("TOKEND_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let fake = FakeAtlassian::start();
    let rt = fake.issue_grant("acct-1", &[FakeSite::confluence("acme")]);
    let spare_rt = fake.issue_grant("acct-fz", &[FakeSite::jira("beta")]);
    let mut d = TestDaemon::start(&fake);
    import(&d, "conf", &rt);
    let world = World { spare_rt };

    // Declared after the daemon: dropped first, so the seed is printed before its logs.
    let mut replay = Replay {
        seed,
        cases: 0,
        last: VecDeque::new(),
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut idle: Vec<UnixStream> = Vec::new();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut error_bodies = String::new();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < deadline {
        let case = next_case(&mut rng, &world);
        replay.record(case.what.clone());
        let (resp, kept) = run_case(&d, &case);
        if let Some(s) = kept {
            if idle.len() == MAX_IDLE {
                idle.remove(rng.random_range(0..MAX_IDLE));
            }
            idle.push(s);
        }
        if let Some(r) = resp {
            *statuses.entry(r.status).or_default() += 1;
            assert_ne!(r.status, 500, "{}: {}", case.what, r.text());
            if r.status >= 400 {
                if !r.body.is_empty() {
                    let code = r.error_code();
                    assert!(
                        code.is_some(),
                        "{}: {} is not the standard error: {:?}",
                        case.what,
                        r.status,
                        r.text()
                    );
                }
                error_bodies.push_str(&r.text());
                error_bodies.push('\n');
            }
        }
        if replay.cases.is_multiple_of(CHECK_EVERY) {
            assert!(d.is_running(), "the daemon died");
            assert_serving(&d);
        }
    }
    drop(idle);
    eprintln!(
        "fuzz: seed {seed}, {} cases in {secs} s, answers by status {statuses:?}",
        replay.cases
    );
    // A few cases a second at the very least, or the daemon is stuck on something.
    assert!(
        replay.cases as f64 >= secs * 4.0,
        "only {} cases ran",
        replay.cases
    );

    assert!(d.is_running(), "the daemon died");
    assert_serving(&d);
    let (code, tok) = d.get_json("/v1/connections/conf/token");
    assert_eq!(code, 200, "{tok}");
    assert!(tok["access_token"].as_str().is_some_and(|t| !t.is_empty()));
    let (code, conn) = d.get_json("/v1/connections/conf");
    assert_eq!((code, &conn["status"]), (200, &"active".into()), "{conn}");
    let logs = d.logs();
    assert!(!logs.contains("panicked"), "the daemon panicked:\n{logs}");
    assert_no_secrets(&error_bodies, &fake);
    assert_no_secrets(&logs, &fake);
}
