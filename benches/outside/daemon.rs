//! The real `tokend` under test: locating the binary `cargo bench` built, a temp
//! directory with a generated `daemon.toml` pointing at the fake provider, and a
//! [`Daemon`] guard that starts it, waits for its socket, stops it, and kills it on every
//! exit path (its `Drop`).

use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::client::Conn;
use crate::fake::{self, FakeAtlassian};

/// How long a start may take until `/v1/health` answers 200 (a 100k ledger loads first).
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a SIGTERM may take before the daemon is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often readiness is polled: start-up is measured to this resolution.
const READY_POLL: Duration = Duration::from_millis(5);
/// A cron schedule that never fires during a bench (midnight on January 1st): the site
/// job would otherwise ask the fake about chains it does not know (the scale ledgers).
const NEVER: &str = "0 0 0 1 1 *";

/// The `tokend` binary: `TOKEND_BENCH_BIN` if set (another build, to compare), else the one
/// `cargo bench` built beside this bench (`<target dir>/release/tokend`, cargo builds a
/// package's binaries for its benches, in the bench profile, which inherits every release
/// setting).
pub fn tokend_binary() -> Result<PathBuf> {
    let bin = match std::env::var_os("TOKEND_BENCH_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => PathBuf::from(env!("CARGO_BIN_EXE_tokend")),
    };
    if !bin.is_file() {
        bail!(
            "{} is missing: run the bench through `cargo bench --bench outside`, or set TOKEND_BENCH_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

/// What a [`Daemon`]'s `daemon.toml` says beyond the defaults.
pub struct Settings {
    /// `[daemon]` keys beyond the paths, as raw TOML values (`node_name`, `key_file` of
    /// daemons sharing a PostgreSQL ledger).
    pub daemon: Vec<(&'static str, String)>,
    /// `[ledger]` keys as raw TOML values (`url`, `lease`); none: SQLite in the state dir.
    pub ledger: Vec<(&'static str, String)>,
    /// `[refresh]` keys as raw TOML values (`("rotate_after", "\"1h\"")`).
    pub refresh: Vec<(&'static str, String)>,
    /// Serve `/metrics` on a free loopback port.
    pub metrics: bool,
}

impl Settings {
    /// A SQLite daemon with `/metrics` and nothing due for a week: what the scenarios that
    /// seed a large ledger and watch it (`scale`, `sites`, `maint`) run.
    pub fn nothing_due() -> Settings {
        Settings {
            daemon: vec![],
            ledger: vec![],
            refresh: vec![("rotate_after", "\"7d\"".into())],
            metrics: true,
        }
    }
}

/// One daemon on its own temp directory.
pub struct Daemon {
    bin: PathBuf,
    /// Holds the state dir, socket, config and logs; removed on drop (after the child).
    dir: tempfile::TempDir,
    config: PathBuf,
    socket: PathBuf,
    metrics: Option<SocketAddr>,
    child: Option<Child>,
}

impl Daemon {
    /// [`Daemon::new`], started once and stopped: its state dir then holds an empty ledger
    /// and its key, ready for `seed::seed`.
    pub async fn created(bin: &Path, fake: &FakeAtlassian, settings: &Settings) -> Result<Daemon> {
        let mut daemon = Daemon::new(bin, fake, settings)?;
        daemon
            .start()
            .await
            .context("first start (creates the ledger)")?;
        daemon.stop().await?;
        Ok(daemon)
    }

    /// Writes `daemon.toml` and the client secret file (0600) into a new temp directory.
    pub fn new(bin: &Path, fake: &FakeAtlassian, settings: &Settings) -> Result<Daemon> {
        let dir = tempfile::Builder::new()
            .prefix("tokend-bench.")
            .tempdir()
            .context("create a temp directory")?;
        let root = dir.path();
        let socket = root.join("run").join("tokend.sock");
        let metrics = if settings.metrics {
            Some(free_port()?)
        } else {
            None
        };
        let secret = root.join("client_secret");
        std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&secret)
            .and_then(|mut f| std::io::Write::write_all(&mut f, fake::CLIENT_SECRET.as_bytes()))
            .with_context(|| format!("write {}", secret.display()))?;
        let q = |s: &str| toml_str(s);
        let mut toml = String::new();
        toml += "[daemon]\n";
        toml += &format!("state_dir = {}\n", q(&root.join("state").to_string_lossy()));
        toml += &format!("socket_path = {}\n", q(&socket.to_string_lossy()));
        toml += &format!(
            "metrics_listen = {}\n",
            q(&metrics.map(|a| a.to_string()).unwrap_or_default())
        );
        for (k, v) in &settings.daemon {
            toml += &format!("{k} = {v}\n");
        }
        if !settings.ledger.is_empty() {
            toml += "[ledger]\n";
            for (k, v) in &settings.ledger {
                toml += &format!("{k} = {v}\n");
            }
        }
        toml += "[refresh]\n";
        for (k, v) in &settings.refresh {
            toml += &format!("{k} = {v}\n");
        }
        toml += "[jobs]\n";
        toml += &format!("resolve_sites = {}\nmaintenance = {}\n", q(NEVER), q(NEVER));
        toml += "[providers.atlassian]\n";
        toml += &format!("client_id = {}\n", q(fake::CLIENT_ID));
        toml += &format!("client_secret_file = {}\n", q(&secret.to_string_lossy()));
        toml += &format!("redirect_uri = {}\n", q("http://127.0.0.1:8976/callback"));
        toml += &format!("authorize_url = {}\n", q(&fake.authorize_url()));
        toml += &format!("token_url = {}\n", q(&fake.token_url()));
        toml += &format!("api_url = {}\n", q(&fake.base_url()));
        let config = root.join("daemon.toml");
        std::fs::write(&config, toml).with_context(|| format!("write {}", config.display()))?;
        Ok(Daemon {
            bin: bin.to_path_buf(),
            dir,
            config,
            socket,
            metrics,
            child: None,
        })
    }

    /// Gives the job `name` (`resolve_sites`, `maintenance`) a cron that fires once, at the
    /// first whole second at least `lead` from now (UTC, as the daemon reads it) instead of
    /// never, from the next start on; returns that second.
    pub fn fire_job_once(
        &self,
        name: &str,
        lead: Duration,
    ) -> Result<chrono::DateTime<chrono::Utc>> {
        let at = chrono::Utc::now() + chrono::Duration::from_std(lead + Duration::from_secs(1))?;
        let toml = std::fs::read_to_string(&self.config).context("read daemon.toml")?;
        let from = format!("{name} = {}\n", toml_str(NEVER));
        if !toml.contains(&from) {
            bail!("daemon.toml has no {from:?}");
        }
        let schedule = at.format("%S %M %H %d %m *").to_string();
        let toml = toml.replace(&from, &format!("{name} = {}\n", toml_str(&schedule)));
        std::fs::write(&self.config, toml).context("write daemon.toml")?;
        Ok(at)
    }

    /// Waits (scraping `/metrics` every `poll`, at most `give_up`) until the running daemon's
    /// `tokend_job_last_success_timestamp_seconds` of job `name` grows past what the first
    /// scrape shows (the daemon's start time until the job first succeeds); returns the
    /// scrape that showed it. Call it before the job can have run.
    pub async fn job_succeeded(
        &self,
        name: &str,
        poll: Duration,
        give_up: Duration,
    ) -> Result<String> {
        let addr = self.metrics_addr().context("metrics listener")?;
        let label = format!("cron_job=\"{name}\"");
        let last_success = |text: &str| -> f64 {
            text.lines()
                .filter(|l| {
                    l.starts_with("tokend_job_last_success_timestamp_seconds{")
                        && l.contains(&label)
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        let scrape = || async {
            let mut m = Conn::tcp(addr).await?;
            anyhow::Ok(m.get_ok("/metrics").await?.text())
        };
        let at_start = last_success(&scrape().await?);
        let started = Instant::now();
        loop {
            tokio::time::sleep(poll).await;
            let text = scrape().await?;
            if last_success(&text) > at_start {
                return Ok(text);
            }
            if started.elapsed() > give_up {
                bail!("the {name} job did not succeed within {give_up:?}");
            }
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn ledger_path(&self) -> PathBuf {
        self.state_dir().join("ledger.db")
    }

    /// A scratch path inside the daemon's temp directory.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(&self.config)
            .current_dir(self.dir.path())
            .env_remove("TOKEND_CONFIG")
            .env_remove("TOKEND_ATLASSIAN_CLIENT_SECRET")
            .env_remove("RUST_LOG");
        cmd
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// Everything the daemon printed so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last lines the daemon printed, for error messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Spawns `tokend run` and waits for the first 200 of `GET /v1/health`; returns the
    /// instant just before the spawn and the time from it to that answer.
    pub async fn start(&mut self) -> Result<(Instant, Duration)> {
        if self.child.is_some() {
            bail!("the daemon is already running");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("open the daemon's log")?;
        let mut cmd = self.command();
        cmd.arg("run")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let spawned = Instant::now();
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("spawn {}", self.bin.display()))?,
        );
        let deadline = spawned + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "tokend exited during start-up with {status}; its log ends:\n{}",
                    self.log_tail()
                );
            }
            if let Ok(mut c) = Conn::unix(&self.socket).await
                && let Ok(a) = c.request(hyper::Method::GET, "/v1/health", None).await
                && a.status == 200
            {
                return Ok((spawned, spawned.elapsed()));
            }
            if Instant::now() > deadline {
                bail!(
                    "tokend did not answer GET /v1/health 200 within {READY_TIMEOUT:?}; its log ends:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// SIGTERM and wait for the exit (SIGKILL after [`STOP_TIMEOUT`]).
    pub async fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = rustix::process::Pid::from_raw(child.id() as i32).context("child pid")?;
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!(
                        "tokend exited with {status} after SIGTERM; its log ends:\n{}",
                        self.log_tail()
                    );
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("tokend did not stop within {STOP_TIMEOUT:?} of SIGTERM (killed)");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs a CLI command against this daemon's config; returns its stdout and the wall time.
    pub fn cli(&self, args: &[&str]) -> Result<(Vec<u8>, Duration)> {
        let t = Instant::now();
        let out = self
            .command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run tokend {}", args.join(" ")))?;
        let took = t.elapsed();
        if !out.status.success() {
            bail!(
                "tokend {} exited with {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok((out.stdout, took))
    }

    /// Resident memory of the running daemon (`VmRSS` of `/proc/PID/status`), in bytes.
    pub fn rss(&self) -> Result<u64> {
        let pid = self.pid().context("the daemon is not running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .context("read /proc/PID/status")?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS in /proc/PID/status")?;
        Ok(kb * 1024)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A loopback address whose port was free a moment ago.
fn free_port() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(l.local_addr()?)
}

/// A TOML basic string.
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
