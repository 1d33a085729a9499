//! The harness that runs the real `tokend` binary against the fake provider.
//!
//! - [`TestDaemon`] owns a temporary directory with a generated `daemon.toml` (see
//!   [`DaemonBuilder`] for the defaults and how to override them), runs
//!   `tokend --config DIR/daemon.toml run` with `RUST_LOG=debug`, appends everything it prints
//!   (over every start) to `DIR/daemon.stdout` and `DIR/daemon.stderr`, and waits until
//!   `GET /v1/health` answers on the socket.
//! - [`TestDaemon::request`] / [`TestDaemon::raw`] speak HTTP/1.1 over the Unix socket with a
//!   hand-written client (so tests can also send malformed bytes).
//! - [`TestDaemon::cli`] / [`TestDaemon::cli_as`] run the CLI against the same config.
//! - [`assert_no_secrets`] checks some output for anything the fake ever issued.
//!
//! Nothing here needs a tokio runtime: tests can be plain `#[test]` functions.
//!
//! Beside the daemon: [`http`] (the socket client), [`consent`] (the consent flow over the
//! API), [`ledger`] (read-only opens of the daemon's ledger, unsealing), [`notify`] (a fake
//! `$NOTIFY_SOCKET`), [`disk`] (a small tmpfs to fill), [`output`] (the markers between the
//! daemon's starts in its output, and the sections between them), [`pg`] (daemons on one
//! PostgreSQL ledger) and [`proxy`] (a TCP proxy a test can cut, between a daemon and it).

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fake::{self, FakeAtlassian};

pub mod consent;
pub mod disk;
pub mod http;
pub mod ledger;
pub mod notify;
pub mod output;
pub mod pg;
pub mod proxy;

pub use consent::{authorize, consent_body};
pub use disk::SmallDisk;
pub use http::{HttpResponse, build_request, connect_as, parse_response};
pub use ledger::{ledger_refresh_token, open_ledger, unseal};
pub use notify::NotifySocket;
pub use output::{EXTRA_MARKER, last_extra_output, last_run_stderr, start_marker, start_output};

use http::exchange;

/// How long [`TestDaemon::start`] waits for the socket to answer.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a CLI invocation may take before it is killed and the test fails.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// Read/write timeout of one socket request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The binary under test.
pub fn tokend_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tokend")
}

// ----------------------------------------------------------------------------------------
// Configuration
// ----------------------------------------------------------------------------------------

/// Builds the `daemon.toml` of a [`TestDaemon`].
///
/// Defaults (values are raw TOML):
///
/// ```toml
/// [daemon]
/// state_dir = "state"
/// socket_path = "run/tokend.sock"
/// metrics_listen = ""          # or "127.0.0.1:PORT" with .metrics()
/// [refresh]
/// rotate_after = "1h"
/// request_timeout = "3s"
/// backoff_min = "1s"
/// backoff_max = "5s"
/// [providers.atlassian]
/// client_id = CLIENT_ID
/// client_secret_file = "client_secret"   # written 0600 next to daemon.toml
/// redirect_uri = "http://127.0.0.1:PORT/callback"   # a free port
/// authorize_url = FAKE/authorize
/// token_url = FAKE/oauth/token
/// api_url = FAKE
/// ```
pub struct DaemonBuilder {
    sections: Vec<(String, Vec<(String, String)>)>,
    extra: Vec<String>,
    metrics: bool,
    env: Vec<(String, String)>,
    client_secret: Option<String>,
    program: Option<(PathBuf, Vec<String>)>,
}

impl DaemonBuilder {
    fn new(fake: &FakeAtlassian) -> DaemonBuilder {
        let q = |s: &str| toml_str(s);
        let redirect_port = free_port();
        let mut b = DaemonBuilder {
            sections: Vec::new(),
            extra: Vec::new(),
            metrics: false,
            env: Vec::new(),
            client_secret: Some(fake::CLIENT_SECRET.to_string()),
            program: None,
        };
        b = b
            .set("daemon", "state_dir", &q("state"))
            .set("daemon", "socket_path", &q("run/tokend.sock"))
            .set("daemon", "metrics_listen", &q(""))
            .set("refresh", "rotate_after", &q("1h"))
            .set("refresh", "request_timeout", &q("3s"))
            .set("refresh", "backoff_min", &q("1s"))
            .set("refresh", "backoff_max", &q("5s"))
            .set("providers.atlassian", "client_id", &q(fake::CLIENT_ID))
            .set(
                "providers.atlassian",
                "client_secret_file",
                &q("client_secret"),
            )
            .set(
                "providers.atlassian",
                "redirect_uri",
                &q(&format!("http://127.0.0.1:{redirect_port}/callback")),
            )
            .set(
                "providers.atlassian",
                "authorize_url",
                &q(&fake.authorize_url()),
            )
            .set("providers.atlassian", "token_url", &q(&fake.token_url()))
            .set("providers.atlassian", "api_url", &q(&fake.base_url()));
        b
    }

    /// Sets (or adds) `key = raw_value` in `[section]` (the section is added if missing).
    /// `raw_value` is TOML, e.g. `"\"2s\""` or `"[1000]"`.
    pub fn set(mut self, section: &str, key: &str, raw_value: &str) -> Self {
        let idx = match self.sections.iter().position(|(s, _)| s == section) {
            Some(i) => i,
            None => {
                self.sections.push((section.to_string(), Vec::new()));
                self.sections.len() - 1
            }
        };
        let keys = &mut self.sections[idx].1;
        match keys.iter_mut().find(|(k, _)| k == key) {
            Some(kv) => kv.1 = raw_value.to_string(),
            None => keys.push((key.to_string(), raw_value.to_string())),
        }
        self
    }

    /// Removes `key` from `[section]` (a no-op if absent).
    pub fn unset(mut self, section: &str, key: &str) -> Self {
        if let Some((_, keys)) = self.sections.iter_mut().find(|(s, _)| s == section) {
            keys.retain(|(k, _)| k != key);
        }
        self
    }

    /// Appends raw TOML after all sections (e.g. `[[access.clients]]` tables).
    pub fn extra(mut self, raw_toml: &str) -> Self {
        self.extra.push(raw_toml.to_string());
        self
    }

    /// Serves metrics on `127.0.0.1:PORT` (a port that was free a moment ago).
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// Sets an environment variable for the daemon and the CLI.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// The content of the `client_secret` file; `None` writes no file at all.
    pub fn client_secret(mut self, secret: Option<&str>) -> Self {
        self.client_secret = secret.map(str::to_string);
        self
    }

    /// Runs `program PRE_ARGS... --config DIR/daemon.toml ...` instead of the real binary
    /// (for the harness's own tests).
    pub fn program(mut self, program: &str, pre_args: &[&str]) -> Self {
        self.program = Some((
            PathBuf::from(program),
            pre_args.iter().map(|a| a.to_string()).collect(),
        ));
        self
    }

    /// Writes the directory and the config but does not start the daemon (for
    /// `check-config` and bad-config tests); [`TestDaemon::restart`] starts it.
    pub fn prepare(mut self) -> TestDaemon {
        let dir = tempfile::Builder::new()
            .prefix("tokend-it-")
            .tempdir()
            .expect("create temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod temp dir 0755");
        let metrics_addr = if self.metrics {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            self = self.set("daemon", "metrics_listen", &toml_str(&addr.to_string()));
            Some(addr)
        } else {
            None
        };
        if let Some(secret) = &self.client_secret {
            let path = dir.path().join("client_secret");
            std::fs::write(&path, secret).expect("write client_secret");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod client_secret");
        }
        let cwd = dir.path().join("cwd");
        std::fs::create_dir(&cwd).expect("create cwd");
        std::fs::set_permissions(&cwd, std::fs::Permissions::from_mode(0o755)).expect("chmod cwd");
        let config = self.render();
        let config_path = dir.path().join("daemon.toml");
        std::fs::write(&config_path, &config).expect("write daemon.toml");
        std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o644))
            .expect("chmod daemon.toml");
        TestDaemon {
            socket_path: dir.path().join("run/tokend.sock"),
            config_path,
            dir,
            child: None,
            starts: 0,
            metrics_addr,
            env: self.env,
            program: self.program,
        }
    }

    /// Writes everything and starts the daemon; panics (with its output) if it does not
    /// answer on the socket within [`STARTUP_TIMEOUT`].
    pub fn start(self) -> TestDaemon {
        let mut d = self.prepare();
        d.restart();
        d
    }

    /// The `daemon.toml` this builder writes.
    pub fn render(&self) -> String {
        let mut out = String::from("# generated by tests/it/util.rs\n");
        for (section, keys) in &self.sections {
            out.push_str(&format!("\n[{section}]\n"));
            for (k, v) in keys {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        for e in &self.extra {
            out.push('\n');
            out.push_str(e);
            out.push('\n');
        }
        out
    }
}

/// A TOML basic string literal.
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A TCP port on 127.0.0.1 that was free when asked.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port")
}

// ----------------------------------------------------------------------------------------
// The daemon
// ----------------------------------------------------------------------------------------

/// A `tokend run` process on its own temporary directory. Dropping it SIGKILLs the process
/// (and, if the test is panicking, prints the daemon's output first).
pub struct TestDaemon {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    socket_path: PathBuf,
    child: Option<Child>,
    starts: usize,
    metrics_addr: Option<SocketAddr>,
    env: Vec<(String, String)>,
    program: Option<(PathBuf, Vec<String>)>,
}

impl TestDaemon {
    /// A builder with the defaults pointing at `fake`.
    pub fn builder(fake: &FakeAtlassian) -> DaemonBuilder {
        DaemonBuilder::new(fake)
    }

    /// Starts a daemon with the default config.
    pub fn start(fake: &FakeAtlassian) -> TestDaemon {
        DaemonBuilder::new(fake).start()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The working directory of the daemon and the CLI: `DIR/cwd`, an empty directory, so
    /// that a path resolved against the working directory instead of the config file's
    /// directory ends up in the wrong place (and the test notices).
    pub fn cwd(&self) -> PathBuf {
        self.dir.path().join("cwd")
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `DIR/state/ledger.db`.
    pub fn ledger_path(&self) -> PathBuf {
        self.state_dir().join("ledger.db")
    }

    pub fn stdout_path(&self) -> PathBuf {
        self.dir.path().join("daemon.stdout")
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("daemon.stderr")
    }

    /// `127.0.0.1:PORT` when built with [`DaemonBuilder::metrics`].
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The pid of the running process, if one was started.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// How many times the daemon was started.
    pub fn starts(&self) -> usize {
        self.starts
    }

    fn command(&self) -> Command {
        let mut cmd = match &self.program {
            Some((program, pre_args)) => {
                let mut c = Command::new(program);
                c.args(pre_args);
                c
            }
            None => Command::new(tokend_bin()),
        };
        cmd.arg("--config")
            .arg(&self.config_path)
            .current_dir(self.cwd())
            .env_remove("TOKEND_CONFIG")
            .env_remove("TOKEND_ATLASSIAN_CLIENT_SECRET")
            .env_remove("RUST_LOG");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    fn open_log(&self, path: &Path, marker: &str) -> File {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open daemon log");
        let _ = writeln!(f, "{marker}");
        f
    }

    /// Starts another `tokend run` on the same config without waiting for anything and
    /// without tracking it (e.g. to check that a second instance refuses to start). Its
    /// output goes to the same log files.
    pub fn spawn_raw(&self) -> Child {
        let out = self.open_log(&self.stdout_path(), EXTRA_MARKER);
        let err = self.open_log(&self.stderr_path(), EXTRA_MARKER);
        self.command()
            .arg("run")
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn tokend")
    }

    /// Starts the daemon again on the same directory and config (SIGKILLs a still-running
    /// previous process first) and waits until the socket answers `GET /v1/health`.
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.starts += 1;
        let marker = start_marker(self.starts);
        let out = self.open_log(&self.stdout_path(), &marker);
        let err = self.open_log(&self.stderr_path(), &marker);
        let mut cmd = self.command();
        if !self.env.iter().any(|(k, _)| k == "RUST_LOG") {
            // Everything the daemon can say, for the secret scan; a test may choose otherwise.
            cmd.env("RUST_LOG", "debug");
        }
        let child = cmd
            .arg("run")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn tokend");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                panic!(
                    "tokend exited during startup with {status}\n{}",
                    self.logs()
                );
            }
            if self.socket_path.exists()
                && let Ok(_resp) = self.try_request("GET", "/v1/health", &[], None)
            {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "tokend did not answer GET /v1/health within {STARTUP_TIMEOUT:?}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the started process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM (through the `kill` command) without waiting.
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends a signal by name (`TERM`, `HUP`, `INT`, ...) through the `kill` command.
    pub fn signal(&self, name: &str) {
        if let Some(c) = self.child.as_ref() {
            let status = Command::new("kill")
                .arg(format!("-{name}"))
                .arg(c.id().to_string())
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -{name} {} failed", c.id());
        }
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running (or was
    /// never started).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return None,
            }
        }
    }

    /// What the daemon wrote to stdout, over all starts.
    pub fn stdout_log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.stdout_path()).unwrap_or_default()).into_owned()
    }

    /// What the daemon wrote to stderr, over all starts.
    pub fn stderr_log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.stderr_path()).unwrap_or_default()).into_owned()
    }

    /// Everything the daemon printed across starts (stdout, then stderr).
    pub fn logs(&self) -> String {
        format!(
            "----- daemon stdout -----\n{}\n----- daemon stderr -----\n{}",
            self.stdout_log(),
            self.stderr_log()
        )
    }

    // ----- CLI -----

    /// Runs `tokend --config DIR/daemon.toml ARGS` (cwd = [`TestDaemon::cwd`]), feeding `stdin` if given;
    /// killed after [`CLI_TIMEOUT`].
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = self.command();
        cmd.args(args);
        run_with_timeout(cmd, stdin, CLI_TIMEOUT)
    }

    /// Like [`TestDaemon::cli`], as another user (supplementary groups are dropped).
    pub fn cli_as(&self, uid: u32, gid: u32, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = self.command();
        cmd.args(args).uid(uid).gid(gid);
        run_with_timeout(cmd, stdin, CLI_TIMEOUT)
    }

    /// Like [`TestDaemon::cli`] with extra environment variables.
    pub fn cli_env(&self, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Output {
        let mut cmd = self.command();
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run_with_timeout(cmd, stdin, CLI_TIMEOUT)
    }

    // ----- socket API -----

    /// One HTTP/1.1 request on the socket (`Connection: close`); panics on I/O errors.
    pub fn request(&self, method: &str, path: &str, body: Option<(&str, &[u8])>) -> HttpResponse {
        self.request_with(method, path, &[], body)
    }

    /// Like [`TestDaemon::request`] with extra request headers.
    pub fn request_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, &[u8])>,
    ) -> HttpResponse {
        self.try_request(method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path} on the socket failed: {e}"))
    }

    /// Like [`TestDaemon::request_with`], returning I/O and parse errors.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, &[u8])>,
    ) -> io::Result<HttpResponse> {
        self.raw(&build_request(method, path, "localhost", headers, body))
    }

    /// GET and parse the JSON body.
    pub fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self.request("GET", path, None);
        let v = r.json();
        (r.status, v)
    }

    /// POST a JSON value.
    pub fn post_json(&self, path: &str, body: &Value) -> HttpResponse {
        let bytes = body.to_string().into_bytes();
        self.request("POST", path, Some(("application/json", &bytes)))
    }

    /// Sends `bytes` as they are on a new socket connection and reads the response (until it
    /// is complete or the daemon closes the connection). The write side stays open: hyper
    /// drops a connection whose client half-closes before the answer.
    pub fn raw(&self, bytes: &[u8]) -> io::Result<HttpResponse> {
        let stream = UnixStream::connect(&self.socket_path)?;
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        exchange(stream, bytes, |_| Ok(()))
    }

    /// Like [`TestDaemon::raw`], then shuts down the write side (for truncated requests
    /// whose end must be visible to the daemon as EOF).
    pub fn raw_half_close(&self, bytes: &[u8]) -> io::Result<HttpResponse> {
        let stream = UnixStream::connect(&self.socket_path)?;
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        exchange(stream, bytes, |s| s.shutdown(std::net::Shutdown::Write))
    }

    /// GET on the metrics listener (needs [`DaemonBuilder::metrics`]).
    pub fn metrics_get(&self, path: &str) -> io::Result<HttpResponse> {
        let addr = self
            .metrics_addr
            .ok_or_else(|| io::Error::other("metrics not enabled for this daemon"))?;
        let stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?;
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        let req = build_request("GET", path, &addr.to_string(), &[], None);
        exchange(stream, &req, |_| Ok(()))
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "===== tokend-it: daemon dir {} =====\n{}",
                self.dir.path().display(),
                self.logs()
            );
        }
    }
}

/// Runs a command with optional stdin, capturing stdout and stderr; kills it and panics
/// after `timeout`.
pub fn run_with_timeout(mut cmd: Command, stdin: Option<&str>, timeout: Duration) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn tokend CLI");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        let input = input.to_string();
        // A writer thread, so a CLI that never reads stdin cannot block us.
        std::thread::spawn(move || {
            let _ = pipe.write_all(input.as_bytes());
        });
    }
    let mut out_pipe = child.stdout.take().expect("stdout pipe");
    let mut err_pipe = child.stderr.take().expect("stderr pipe");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().expect("wait for tokend CLI") {
            Some(s) => break s,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tokend CLI {cmd:?} did not finish within {timeout:?}");
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// Panics with the command's output unless it exited 0.
pub fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `tokend import --label LABEL` with the token on stdin; returns
/// `GET /v1/connections/LABEL`.
pub fn import(daemon: &TestDaemon, label: &str, refresh_token: &str) -> Value {
    let out = daemon.cli(
        &["import", "--label", label],
        Some(&format!("{refresh_token}\n")),
    );
    assert_success(&format!("tokend import --label {label}"), &out);
    let r = daemon.request("GET", &format!("/v1/connections/{label}"), None);
    assert_eq!(
        r.status,
        200,
        "GET /v1/connections/{label} after import: {}",
        r.text()
    );
    r.json()
}

// ----------------------------------------------------------------------------------------
// Secret scanning
// ----------------------------------------------------------------------------------------

/// Length of the windows [`assert_no_secrets`] looks for: a secret counts as leaked if any
/// 16 consecutive characters of it appear (a short prefix such as `rt-abc` does not).
pub const SECRET_WINDOW: usize = 16;

/// Panics if `output` contains any secret the fake issued (the client secret, refresh and
/// access tokens, codes), naming only what kind of secret it was, never the value.
pub fn assert_no_secrets(output: &str, fake: &FakeAtlassian) {
    let secrets = fake.issued_secrets_detailed();
    let mut windows: HashMap<&[u8], usize> = HashMap::new();
    for (i, s) in secrets.iter().enumerate() {
        let b = s.value.as_bytes();
        if b.len() < SECRET_WINDOW {
            windows.insert(b, i);
        } else {
            for w in b.windows(SECRET_WINDOW) {
                windows.insert(w, i);
            }
        }
    }
    let mut leaked: Vec<usize> = Vec::new();
    let out = output.as_bytes();
    let mut lens: Vec<usize> = windows.keys().map(|k| k.len()).collect();
    lens.sort_unstable();
    lens.dedup();
    for len in lens {
        for w in out.windows(len) {
            if let Some(&i) = windows.get(w)
                && !leaked.contains(&i)
            {
                leaked.push(i);
            }
        }
    }
    if !leaked.is_empty() {
        leaked.sort_unstable();
        let kinds: Vec<String> = leaked.iter().map(|&i| secrets[i].describe()).collect();
        panic!(
            "output leaks {} issued secret(s): {}",
            kinds.len(),
            kinds.join(", ")
        );
    }
}

/// Raises this process's soft open-file limit to at least `n` (up to the hard limit), for
/// tests that hold many sockets at once.
pub fn raise_open_files(n: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current.is_none_or(|soft| soft >= n) {
        return;
    }
    let want = now.maximum.map_or(n, |hard| hard.min(n));
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(want),
            maximum: now.maximum,
        },
    );
}

/// Polls `f` every 100 ms until it holds or `timeout` passes; returns whether it held.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

/// The value of `series` (a metric name with its labels, exactly as exposed) in a
/// Prometheus text exposition; panics with the text when it is missing.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("{series} not in metrics:\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panic_message(e: Box<dyn std::any::Any + Send>) -> String {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    }

    /// Answers every connection on `path` with a health response, forever.
    fn serve_health(path: &Path) {
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                let mut buf = Vec::new();
                let mut b = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                }
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}",
                );
            }
        });
    }

    #[test]
    fn prepare_writes_the_directory_and_config() {
        let fake = FakeAtlassian::start();
        let d = TestDaemon::builder(&fake)
            .set("refresh", "rotate_after", "\"2s\"")
            .set("access", "admin_uids", "[1000]")
            .unset("refresh", "backoff_max")
            .extra("[[access.clients]]\nuid = 65534\nconnections = [\"x\"]")
            .metrics()
            .prepare();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(d.dir()), 0o755);
        assert_eq!(mode(&d.dir().join("client_secret")), 0o600);
        assert_eq!(
            std::fs::read_to_string(d.dir().join("client_secret")).unwrap(),
            fake::CLIENT_SECRET
        );
        let text = std::fs::read_to_string(d.config_path()).unwrap();
        let t: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(t["daemon"]["socket_path"].as_str(), Some("run/tokend.sock"));
        assert_eq!(t["daemon"]["state_dir"].as_str(), Some("state"));
        let metrics = t["daemon"]["metrics_listen"].as_str().unwrap();
        assert_eq!(Some(metrics.parse().unwrap()), d.metrics_addr());
        assert_eq!(t["refresh"]["rotate_after"].as_str(), Some("2s"));
        assert_eq!(t["refresh"]["request_timeout"].as_str(), Some("3s"));
        assert!(t["refresh"].get("backoff_max").is_none());
        assert_eq!(t["access"]["admin_uids"][0].as_integer(), Some(1000));
        assert_eq!(t["access"]["clients"][0]["uid"].as_integer(), Some(65534));
        let p = &t["providers"]["atlassian"];
        assert_eq!(p["client_id"].as_str(), Some(fake::CLIENT_ID));
        assert_eq!(p["client_secret_file"].as_str(), Some("client_secret"));
        assert_eq!(p["token_url"].as_str(), Some(&*fake.token_url()));
        assert_eq!(p["authorize_url"].as_str(), Some(&*fake.authorize_url()));
        assert_eq!(p["api_url"].as_str(), Some(&*fake.base_url()));
        assert!(!text.contains(fake::CLIENT_SECRET));
        assert_eq!(d.ledger_path(), d.dir().join("state/ledger.db"));
        assert_eq!(d.socket_path(), d.dir().join("run/tokend.sock"));
    }

    #[test]
    fn lifecycle_with_a_stand_in_daemon() {
        let fake = FakeAtlassian::start();
        let script =
            "echo \"argv: $0 $1 $2 RUST_LOG=$RUST_LOG\"; echo to-stderr >&2; exec sleep 30";
        let mut d = TestDaemon::builder(&fake)
            .program("sh", &["-c", script])
            .prepare();
        std::fs::create_dir_all(d.dir().join("run")).unwrap();
        serve_health(d.socket_path());
        d.restart();
        assert!(d.is_running());
        let deadline = Instant::now() + Duration::from_secs(5);
        while d.stderr_log().matches("to-stderr").count() < 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let r = d.request("GET", "/v1/health", None);
        assert_eq!(
            (r.status, r.json()),
            (200, serde_json::json!({"status": "ok"}))
        );
        d.sigterm();
        let status = d
            .wait_exit(Duration::from_secs(5))
            .expect("exits on SIGTERM");
        assert!(!status.success());
        d.restart();
        assert_eq!(d.starts(), 2);
        assert_eq!(
            d.wait_exit(Duration::from_millis(100)),
            None,
            "still running"
        );
        // Wait until the second start's output is on disk (before killing it: under load the
        // script may not have run yet).
        let deadline = Instant::now() + Duration::from_secs(5);
        while d.stderr_log().matches("to-stderr").count() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        d.kill9();
        assert!(!d.is_running());
        let logs = d.logs();
        let argv = format!(
            "argv: --config {} run RUST_LOG=debug",
            d.config_path().display()
        );
        assert_eq!(d.stdout_log().matches(&argv).count(), 2, "{logs}");
        assert_eq!(d.stderr_log().matches("to-stderr").count(), 2, "{logs}");
        assert!(
            logs.contains("start #1") && logs.contains("start #2"),
            "{logs}"
        );

        let cat = TestDaemon::builder(&fake)
            .program("sh", &["-c", "cat; echo \" $2\""])
            .prepare();
        let out = cat.cli(&["import", "--label", "L"], Some("secret-in\n"));
        assert_success("cat", &out);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "secret-in\n import\n");
        let out = cat.cli_as(65534, 65534, &["id"], None);
        assert_success("cat as nobody", &out);
    }

    #[test]
    fn startup_failure_panics_with_the_daemon_output() {
        let fake = FakeAtlassian::start();
        let mut d = TestDaemon::builder(&fake)
            .program("sh", &["-c", "echo config is broken >&2; exit 64"])
            .prepare();
        let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d.restart()))
            .expect_err("startup must fail");
        let msg = panic_message(err);
        assert!(msg.contains("exited during startup"), "{msg}");
        assert!(msg.contains("config is broken"), "{msg}");
    }

    #[test]
    fn secret_scan_names_kinds_not_values() {
        let fake = FakeAtlassian::start();
        let rt = fake.issue_grant("acc-9", &[]);
        assert_no_secrets("nothing here; rt- prefix only", &fake);
        assert_no_secrets(&format!("short prefix {}", &rt[..12]), &fake);
        for leak in [
            format!("log line refresh_token={rt} end"),
            format!("partial {}", &rt[10..30]),
        ] {
            let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                assert_no_secrets(&leak, &fake)
            }))
            .expect_err("leak must be found");
            let msg = panic_message(err);
            assert!(msg.contains("RefreshToken #1 of account acc-9"), "{msg}");
            assert!(
                !msg.contains(&rt[3..]),
                "the message must not carry the value"
            );
        }
        let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert_no_secrets(&format!("secret={}", fake::CLIENT_SECRET), &fake)
        }))
        .expect_err("client secret leak");
        assert!(panic_message(err).contains("ClientSecret"));
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_str("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
