//! Daemon wiring: logging, the runtime, the ledger, the engine, the socket, and shutdown.
//!
//! [`run`] takes an already-bound listener and a shutdown [`CancellationToken`] (so tests
//! and socket activation can hand in their own, as tokio-rs/mini-redis does); [`main`] binds
//! the configured socket (or takes the one systemd passed), turns SIGTERM/SIGINT into a
//! cancellation and calls it. This is the only module that knows every other: it builds
//! each part and hands it what it needs (the metrics to whoever records, a view of the jobs
//! to the API), so no lower module reaches back up. Shutdown order: stop accepting, let requests in progress
//! finish (bounded), let in-flight refreshes commit (bounded), remove the socket.

use crate::api::{self, AccessPolicy, ApiState, JobsView};
use crate::config::{Config, LogFormat};
use crate::jobs::{JobMonitor, Jobs};
use crate::ledger::pg::Change;
use crate::ledger::{AnyLedger, Ledger, PgLedger};
use crate::metrics::Metrics;
use crate::provider::Atlassian;
use crate::refresh::Engine;
use crate::systemd::SdNotify;
use anyhow::Context;
use parking_lot::RwLock;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

/// How long requests in progress may take to finish after a stop signal.
pub const REQUEST_GRACE: Duration = Duration::from_secs(10);

/// How long in-flight refreshes may take to commit after a stop signal. A refresh is bounded
/// by `refresh.request_timeout`; this adds room for the commit. One that does not finish is
/// not lost: its attempt marker makes the next start retry it inside the reuse leeway.
pub const REFRESH_GRACE_EXTRA: Duration = Duration::from_secs(5);

/// How often the job metrics are published. (Connection counts and deadlines are read from
/// the engine when `/metrics` is scraped, not published.)
pub const METRICS_PUBLISH_INTERVAL: Duration = Duration::from_secs(5);

/// How often the absolute-expiry warnings run (at start, then daily, as promised to
/// operators: "a warning is logged daily within 14 days of the deadline").
pub const ABSOLUTE_WARNING_INTERVAL: Duration = Duration::from_secs(86_400);

/// How often a daemon on a shared ledger compares every connection with the ledger, in
/// case a notification was lost (they are not durable): the fallback behind `LISTEN`.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(10);

/// How often a daemon on a shared ledger proves it can write it (`tokend_ledger_up`); a
/// return of the ledger after a partition is also noticed this way, and caught up on.
pub const LEDGER_PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// The API's view of the jobs: which are late.
impl JobsView for JobMonitor {
    fn stalled(&self) -> Vec<&'static str> {
        JobMonitor::stalled(self)
    }
}

/// Readiness: the ledger is writable, the scheduler is alive, every job ran on time.
fn readiness(engine: Arc<Engine>, monitor: Arc<JobMonitor>) -> crate::metrics::Readiness {
    Arc::new(move || {
        let engine = engine.clone();
        let monitor = monitor.clone();
        Box::pin(async move {
            engine
                .store_writable()
                .await
                .map_err(|e| format!("ledger not writable: {e}"))?;
            let pending = engine.commit_pending();
            if pending > 0 {
                return Err(format!(
                    "{pending} rotated refresh token(s) wait for their commit to the ledger"
                ));
            }
            if !engine.scheduler_alive() {
                return Err("the refresh scheduler is stalled".to_owned());
            }
            let stalled = monitor.stalled();
            if !stalled.is_empty() {
                return Err(format!("jobs not on time: {}", stalled.join(", ")));
            }
            Ok(())
        })
    })
}

/// Pings systemd's watchdog while the engine is alive (its scheduler beats). An unwritable
/// ledger does not stop the pings: the daemon may be holding a rotated token it could not
/// commit yet, and a restart by systemd would lose it. Readiness and `/v1/health` report the
/// ledger instead.
async fn watchdog(
    engine: Arc<Engine>,
    sd: Arc<SdNotify>,
    every: Duration,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        if engine.scheduler_alive() {
            sd.watchdog();
        } else {
            tracing::warn!("the refresh scheduler is stalled: not pinging the watchdog");
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// On SIGHUP, reloads `daemon.toml`: a valid file's schedules, limits, access lists and
/// notify command apply at once without dropping the socket; an invalid one is logged and the
/// running configuration kept. Settings that need a restart are named in a warning.
async fn reload_on_sighup(
    mut running: Config,
    engine: Arc<Engine>,
    shared: Option<PgLedger>,
    access: Arc<RwLock<Arc<AccessPolicy>>>,
    monitor: Arc<JobMonitor>,
    sd: Arc<SdNotify>,
    shutdown: impl Future<Output = ()>,
) {
    use futures_util::StreamExt;
    let mut hup = match signal_hook_tokio::Signals::new([signal_hook::consts::SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; reload disabled");
            return;
        }
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            s = hup.next() => if s.is_none() { break },
        }
        sd.reloading();
        let path = running.path.clone();
        match tokio::task::spawn_blocking(move || Config::load(&path)).await {
            Ok(Ok(new)) => {
                let restart_needed = needs_restart(&running, &new);
                engine.set_settings(new.refresh);
                // The pool follows `refresh.max_concurrent` (see `pool_size_for`), as at start.
                if let Some(pg) = &shared {
                    pg.size_pool(crate::ledger::pg::pool_size_for(new.refresh.max_concurrent));
                }
                *access.write() = Arc::new(AccessPolicy {
                    own_uid: rustix::process::geteuid().as_raw(),
                    config: new.access.clone(),
                });
                engine.set_notifier(crate::notify::Notifier::start(
                    new.notify.command.clone(),
                    new.notify.timeout,
                ));
                monitor.reschedule(&new.jobs);
                reload_log_level(&new.daemon.log_level);
                if restart_needed.is_empty() {
                    tracing::info!("configuration reloaded");
                } else {
                    tracing::warn!(
                        "configuration reloaded; these changes need a restart to apply: {}",
                        restart_needed.join(", ")
                    );
                }
                running = new;
            }
            Ok(Err(e)) => {
                tracing::error!("reload failed, keeping the running configuration: {e}");
            }
            Err(e) => tracing::error!(error = %e, "reload failed"),
        }
        sd.ready();
    }
}

/// The keys whose change a reload cannot apply.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let (a, b) = (&old.daemon, &new.daemon);
    if a.state_dir != b.state_dir {
        out.push("daemon.state_dir");
    }
    if a.socket_path != b.socket_path || a.socket_mode != b.socket_mode {
        out.push("daemon.socket_path/socket_mode");
    }
    if a.metrics_listen != b.metrics_listen {
        out.push("daemon.metrics_listen");
    }
    if a.log_format != b.log_format {
        out.push("daemon.log_format");
    }
    if a.metrics_per_connection != b.metrics_per_connection {
        out.push("daemon.metrics_per_connection");
    }
    if a.keys != b.keys {
        out.push("daemon.key_file/old_key_files");
    }
    if a.node_name != b.node_name {
        out.push("daemon.node_name");
    }
    if old.ledger.postgres_url().map(|u| u.expose())
        != new.ledger.postgres_url().map(|u| u.expose())
        || old.ledger.is_shared() != new.ledger.is_shared()
    {
        out.push("ledger.url");
    }

    if old.refresh.request_timeout != new.refresh.request_timeout {
        out.push("refresh.request_timeout");
    }
    let (p, q) = (&old.providers.atlassian, &new.providers.atlassian);
    if p.client_id != q.client_id
        || p.client_secret.as_ref().map(|s| s.expose().to_owned())
            != q.client_secret.as_ref().map(|s| s.expose().to_owned())
        || p.token_url != q.token_url
        || p.api_url != q.api_url
        || p.authorize_url != q.authorize_url
        || p.redirect_uri != q.redirect_uri
        || p.scopes != q.scopes
    {
        out.push("providers.atlassian");
    }
    out
}

/// Keeps memory in step with a shared ledger: a change another daemon announced is
/// reloaded at once; everything is compared when the listener (re)connects, every
/// [`RESYNC_INTERVAL`], and when the ledger comes back after being unwritable; the
/// `tokend_ledger_up` gauge is probed every [`LEDGER_PROBE_INTERVAL`].
async fn follow_shared_ledger(
    pg: PgLedger,
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut changes = pg.listen();
    let mut resync = tokio::time::interval(RESYNC_INTERVAL);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probe = tokio::time::interval(LEDGER_PROBE_INTERVAL);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut up = true;
    metrics.set_ledger_up(true);
    let reload_all = |why: &'static str| {
        let engine = engine.clone();
        async move {
            match engine.reload_all().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    changed = n,
                    "took {n} connection change(s) from the shared ledger ({why})"
                ),
                Err(e) => tracing::warn!(error = %e, "cannot re-read the shared ledger ({why})"),
            }
        }
    };
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            change = changes.recv() => match change {
                Some(Change::Connection(id)) => {
                    if let Err(e) = engine.reload(&id).await {
                        tracing::warn!(connection = %id, error = %e, "cannot read a change another daemon made; the next re-read takes it");
                    }
                }
                Some(Change::Resync) => {
                    tracing::info!("listening for changes on the shared ledger");
                    reload_all("listener connected").await;
                }
                Some(Change::Lost(e)) => {
                    tracing::warn!(error = %e, "lost the connection listening for changes on the shared ledger; reconnecting");
                }
                None => break,
            },
            // While the ledger is unwritable the re-read would fail too; its return triggers one.
            _ = resync.tick(), if up => reload_all("periodic").await,
            _ = probe.tick() => {
                let now_up = pg.check_writable().await.is_ok();
                metrics.set_ledger_up(now_up);
                if now_up && !up {
                    tracing::info!("the shared ledger is writable again; catching up");
                    reload_all("ledger back").await;
                } else if !now_up && up {
                    tracing::warn!("the shared ledger cannot be written: serving cached tokens, refreshing nothing until it is back");
                }
                up = now_up;
            }
        }
    }
}

/// Opens the ledger `[ledger]` names: SQLite in the state directory, or the PostgreSQL
/// server of `ledger.url`. Returns it as the engine's store and as the daemon's ledger.
async fn open_ledger(
    config: &Config,
    node: &str,
) -> anyhow::Result<(Arc<dyn crate::refresh::Store>, AnyLedger)> {
    match config.ledger.postgres_url() {
        None if config.ledger.is_shared() => {
            anyhow::bail!("the PostgreSQL ledger URL was not read")
        }
        None => {
            let ledger = Ledger::open(&config.daemon.state_dir, &config.daemon.keys)?;
            ledger.set_node(node)?;
            tracing::info!(ledger = %ledger.path().display(), node = %node, "ledger open");
            Ok((Arc::new(ledger.clone()), AnyLedger::Sqlite(ledger)))
        }
        Some(url) => {
            let pg = PgLedger::connect(url.expose(), &config.daemon.keys, &config.daemon.state_dir)
                .await?;
            pg.set_node(node);
            pg.size_pool(crate::ledger::pg::pool_size_for(
                config.refresh.max_concurrent,
            ));
            tracing::info!(
                ledger = %crate::config::masked_url(url.expose()),
                node = %node,
                "shared PostgreSQL ledger open"
            );
            Ok((Arc::new(pg.clone()), AnyLedger::Postgres(pg)))
        }
    }
}

/// Publishes the job metrics periodically and runs the daily absolute-expiry warnings.
async fn housekeeping(
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    monitor: Arc<JobMonitor>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut publish = tokio::time::interval(METRICS_PUBLISH_INTERVAL);
    let mut warn = tokio::time::interval(ABSOLUTE_WARNING_INTERVAL);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = publish.tick() => {
                for job in monitor.snapshot() {
                    let name = job.kind.name();
                    metrics.set_job_period(name, job.period.as_secs_f64());
                    if let Some(t) = job.last_success {
                        metrics.job_success(name, t.timestamp_millis() as f64 / 1000.0);
                    }
                }
            }
            _ = warn.tick() => {
                engine.warn_absolute_expiry();
            }
        }
    }
}

/// Replaces the log filter on reload (set once by [`init_logging`]; `None` when `RUST_LOG`
/// decides the level, which a reload must not override).
static LOG_FILTER: std::sync::OnceLock<
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
> = std::sync::OnceLock::new();

/// Sets up logging: text on stderr (no timestamps when journald adds its own), or JSON
/// lines. The level is `RUST_LOG` when set, else `daemon.log_level`.
pub fn init_logging(format: LogFormat, level: &str) {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, fmt, reload};
    let from_env = std::env::var("RUST_LOG").is_ok_and(|v| !v.trim().is_empty());
    let filter = if from_env {
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
    } else {
        EnvFilter::try_new(with_quiet_deps(level))
            .unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
    };
    let (filter, handle) = reload::Layer::new(filter);
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    // One layer, three dresses: JSON lines; text without timestamps (journald adds its
    // own); text with timestamps, coloured on a terminal.
    let base = fmt::layer().with_target(false).with_writer(std::io::stderr);
    let layer = match format {
        LogFormat::Json => base.json().flatten_event(true).boxed(),
        LogFormat::Text if under_journald => base.without_time().with_ansi(false).boxed(),
        LogFormat::Text => base
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
    };
    let result = tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init();
    if result.is_ok() && !from_env {
        let _ = LOG_FILTER.set(handle);
    }
}

/// The filter used when the configured one cannot be parsed (never, after validation).
const DEFAULT_FILTER: &str = "info,tokio_cron_scheduler=warn";

/// The cron crate logs every tick at INFO; keep it at warnings unless asked for by name.
fn with_quiet_deps(level: &str) -> String {
    if level.contains("tokio_cron_scheduler") {
        level.to_owned()
    } else {
        format!("{level},tokio_cron_scheduler=warn")
    }
}

/// Applies a new `daemon.log_level` (unless `RUST_LOG` decides).
fn reload_log_level(level: &str) {
    if let Some(handle) = LOG_FILTER.get()
        && let Ok(filter) = tracing_subscriber::EnvFilter::try_new(with_quiet_deps(level))
        && let Err(e) = handle.reload(filter)
    {
        tracing::warn!(error = %e, "cannot change the log level");
    }
}

/// Runs the daemon in the foreground until SIGTERM or SIGINT. `activated` is a socket
/// systemd passed (`LISTEN_FDS`, adopted by `main.rs`): it is served instead of binding
/// `daemon.socket_path`, and left in place on exit (systemd owns it).
pub fn main(
    config: Config,
    activated: Option<std::os::unix::net::UnixListener>,
) -> anyhow::Result<()> {
    init_logging(config.daemon.log_format, &config.daemon.log_level);
    crate::secret::forbid_core_dumps();
    let open_files = api::server::raise_open_file_limit();
    if let Some(n) = open_files
        && n < api::server::OPEN_FILES_WANTED
    {
        tracing::warn!(
            limit = n,
            wanted = api::server::OPEN_FILES_WANTED,
            "the open file limit is low: under a flood of connections, accepts fail (and are \
             retried) before the socket's connection limits apply; raise LimitNOFILE="
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let (listener, owned) = match activated {
            Some(l) => {
                l.set_nonblocking(true)
                    .context("cannot use the socket passed by systemd")?;
                tracing::info!("using the socket passed by systemd (socket activation)");
                (
                    UnixListener::from_std(l).context("cannot use the socket passed by systemd")?,
                    false,
                )
            }
            None => (
                api::server::bind(&config.daemon.socket_path, config.daemon.socket_mode)?,
                true,
            ),
        };
        let socket_path = config.daemon.socket_path.clone();
        let shutdown = CancellationToken::new();
        let on_signal = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                shutdown_signal().await;
                shutdown.cancel();
            }
        });
        let result = run(config, listener, shutdown).await;
        on_signal.abort();
        if owned {
            let _ = std::fs::remove_file(&socket_path);
        }
        result
    })
}

/// Resolves on SIGTERM or SIGINT (signal-hook).
async fn shutdown_signal() {
    use futures_util::StreamExt;
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook_tokio::Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT");
            return std::future::pending().await;
        }
    };
    match signals.next().await {
        Some(SIGTERM) => tracing::info!("SIGTERM: stopping"),
        Some(_) => tracing::info!("SIGINT: stopping"),
        None => std::future::pending().await,
    }
    signals.handle().close();
}

/// This daemon's name on the ledger: its node name, and on a shared ledger a suffix unique to
/// this process (`node#1a2b3c4d`). The name is the holder of its claims and the origin its
/// notifications carry, and the store grants a holder its own claim again: two daemons with
/// one `node_name` (the same host, the default name) must never hold one name, or both would
/// refresh one chain at once.
fn daemon_instance(node: String, shared: bool) -> String {
    if !shared {
        return node;
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{node}#{}", &id[..8])
}

/// The host's name, for `daemon.node_name = ""`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Runs the daemon on an already-bound socket until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    listener: UnixListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let node = daemon_instance(
        config.daemon.node_name.clone().unwrap_or_else(host_name),
        config.ledger.is_shared(),
    );
    let (store, ledger) = open_ledger(&config, &node).await?;
    let provider = Atlassian::new(
        config.providers.atlassian.clone(),
        config.refresh.request_timeout,
    )
    .map_err(anyhow::Error::msg)?;
    if let Some(reason) = provider.not_configured() {
        tracing::warn!(
            "{}; tokend serves, but cannot add or refresh connections until then",
            reason.trim_end_matches('.')
        );
    }
    let notifier =
        crate::notify::Notifier::start(config.notify.command.clone(), config.notify.timeout);
    let metrics = Arc::new(Metrics::new(config.daemon.metrics_per_connection));
    let engine = Engine::load(
        store,
        Arc::new(provider),
        Arc::new(crate::refresh::SystemClock),
        config.refresh,
        notifier,
        metrics.clone(),
    )
    .await
    .context("cannot load the ledger")?;
    // The holder of this daemon's claims on a shared ledger.
    engine.set_node_name(node.clone());
    let (active, needs_reauth) = engine.status_counts();
    let monitor = Arc::new(JobMonitor::default());
    let jobs = Jobs::start(
        engine.clone(),
        ledger.clone(),
        &config.jobs,
        monitor.clone(),
    )
    .await
    .context("cannot start the job scheduler")?;
    // Cancelled once the socket has stopped serving: everything else stops after it.
    let stop = CancellationToken::new();
    let stopped = || stop.clone().cancelled_owned();
    let metrics_server = match config.daemon.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?;
            tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
            let readiness = readiness(engine.clone(), monitor.clone());
            Some(tokio::spawn(crate::metrics::serve(
                listener,
                metrics.clone(),
                readiness,
                stopped(),
            )))
        }
        None => None,
    };
    let audit = crate::audit::Audit::new(ledger.clone(), metrics.clone());
    let state = ApiState {
        engine: engine.clone(),
        metrics: metrics.clone(),
        jobs: monitor.clone(),
        access: Arc::new(RwLock::new(Arc::new(AccessPolicy {
            own_uid: rustix::process::geteuid().as_raw(),
            config: config.access.clone(),
        }))),
        audit: audit.clone(),
    };
    // Stops after the socket: the last reads are folded in, then written.
    let audit_writer = tokio::spawn(audit.run(stopped()));
    let scheduler = tokio::spawn(engine.clone().run_scheduler(stopped()));
    let follower = match &ledger {
        AnyLedger::Postgres(pg) => Some(tokio::spawn(follow_shared_ledger(
            pg.clone(),
            engine.clone(),
            metrics.clone(),
            stopped(),
        ))),
        AnyLedger::Sqlite(_) => None,
    };
    let watch = tokio::spawn(jobs.watch(stopped()));
    let housekeeping = tokio::spawn(housekeeping(
        engine.clone(),
        metrics.clone(),
        monitor.clone(),
        stopped(),
    ));
    tracing::info!(
        active,
        needs_reauth,
        socket = %config.daemon.socket_path.display(),
        "tokend serving"
    );
    let sd = Arc::new(SdNotify::from_env());
    let watchdog = crate::systemd::watchdog_interval()
        .map(|every| tokio::spawn(watchdog(engine.clone(), sd.clone(), every, stopped())));
    let reloader = tokio::spawn(reload_on_sighup(
        config.clone(),
        engine.clone(),
        match &ledger {
            AnyLedger::Postgres(pg) => Some(pg.clone()),
            AnyLedger::Sqlite(_) => None,
        },
        state.access.clone(),
        monitor.clone(),
        sd.clone(),
        stopped(),
    ));
    sd.ready();
    let stopping = {
        let sd = sd.clone();
        async move {
            shutdown.cancelled().await;
            sd.stopping();
        }
    };
    api::server::serve(
        listener,
        api::app(state),
        metrics.clone(),
        stopping,
        REQUEST_GRACE,
    )
    .await;
    stop.cancel();
    if let Some(w) = watchdog {
        let _ = w.await;
    }
    let _ = reloader.await;
    let _ = scheduler.await;
    if let Some(f) = follower {
        let _ = f.await;
    }
    if !engine
        .drain(config.refresh.request_timeout + REFRESH_GRACE_EXTRA)
        .await
    {
        tracing::warn!("stopping with a refresh still in flight; it is retried at the next start");
    }
    let _ = watch.await;
    let _ = housekeeping.await;
    let _ = audit_writer.await;
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    tracing::info!("tokend stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemons_on_a_shared_ledger_never_share_a_name() {
        assert_eq!(daemon_instance("host-a".into(), false), "host-a");
        let one = daemon_instance("host-a".into(), true);
        let two = daemon_instance("host-a".into(), true);
        assert!(
            one.starts_with("host-a#") && one.len() == "host-a#".len() + 8,
            "{one}"
        );
        assert_ne!(
            one, two,
            "two processes with one node_name got one claim holder"
        );
    }
}
