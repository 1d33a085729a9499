//! Periodic jobs on cron schedules (`[jobs]`, tokio-cron-scheduler): `resolve_sites` and
//! `maintenance`, and the watch that notices a job that stopped firing.
//!
//! Per-connection refresh deadlines are *not* here: they are tokio timers in
//! `refresh::plan`. The cron crate has a known bug where repeated jobs can stop firing
//! (tokio-cron-scheduler#113), so every job records its last success, a watch task
//! compares it with the job's period, reports a job that has not succeeded within twice its
//! period (health turns degraded) and re-arms it by replacing the job in the scheduler.
//!
//! On a shared (PostgreSQL) ledger every daemon fires both jobs, but they run once across
//! the daemons: `resolve_sites` claims due connections in small batches from the ledger's
//! queue (`FOR UPDATE SKIP LOCKED`, leased for `ledger.lease`), so the daemons at one tick
//! split them and each connection is resolved once per period; `maintenance` is claimed
//! for the period by the first daemon to ask, and the others skip it (a skipped run counts
//! as a success: the job did not stall).

use crate::config::{CronExpr, JobsConfig};
use crate::ledger::AnyLedger;
use crate::model::Time;
use crate::refresh::{Engine, SiteOutcome};
use chrono::Utc;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tokio_cron_scheduler::{Job, JobScheduler};

/// History is kept this long; `maintenance` deletes older events. A little over the
/// 365-day consent lifetime, so a chain's whole life stays explainable.
pub const EVENT_RETENTION: Duration = Duration::from_secs(400 * 86_400);

/// `maintenance` keeps at most this many events per connection, the newest: ten times the
/// events route's largest page. Years of a quiet connection's lifecycle, about a week of one
/// client reading a hot connection every minute (reads fold per uid and minute); what
/// bounds the table at `EVENTS_PER_CONNECTION` rows per connection whatever the read rate.
pub const EVENTS_PER_CONNECTION: usize = 10_000;

/// How many connections the site job resolves at once. One at a time, a resolution (two
/// small GETs) of 100,000 connections took longer than the job's hourly period; a small,
/// fixed number keeps it inside it without a burst at the provider, whose `Retry-After`
/// pauses every resolution alike (`provider::gate`).
pub const SITE_JOB_CONCURRENCY: usize = 16;

/// How often the watch compares each job's last success with its period.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// A job is stalled when it has not succeeded for this many periods.
pub const STALL_PERIODS: u32 = 2;

/// Slack added to the stall limit: the cron crate polls every 500 ms and a run takes time.
const STALL_GRACE: Duration = Duration::from_secs(3);

pub use crate::model::JobKind;

/// A job's state for the metrics ([`JobMonitor::snapshot`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobSnapshot {
    /// Which job.
    pub kind: JobKind,
    /// When it last succeeded (wall time); `None` before its first success.
    pub last_success: Option<Time>,
    /// The time between two runs of its schedule.
    pub period: Duration,
}

struct JobState {
    schedule: CronExpr,
    period: Duration,
    /// When the job last succeeded (or when the watch started, before its first run).
    last_success: Instant,
    last_success_wall: Option<Time>,
    stalled: bool,
    running: Arc<AtomicBool>,
    /// The cron crate's id of the armed job, to replace it when re-arming.
    job_id: Option<uuid::Uuid>,
}

/// What the rest of the daemon can ask about the jobs.
#[derive(Default)]
pub struct JobMonitor {
    jobs: Mutex<HashMap<JobKind, JobState>>,
    /// Jobs whose schedule changed (a reload) and must be re-armed by the watch task.
    rearm: Mutex<Vec<JobKind>>,
    rearm_notify: tokio::sync::Notify,
}

impl JobMonitor {
    fn lock(&self) -> parking_lot::MutexGuard<'_, HashMap<JobKind, JobState>> {
        self.jobs.lock()
    }

    /// Jobs that have not succeeded within [`STALL_PERIODS`] of their period.
    pub fn stalled(&self) -> Vec<&'static str> {
        let jobs = self.lock();
        let mut out: Vec<&'static str> = jobs
            .iter()
            .filter(|(_, s)| s.last_success.elapsed() > stall_limit(s.period))
            .map(|(k, _)| k.name())
            .collect();
        out.sort_unstable();
        out
    }

    /// Every armed job's last success and period, for metrics.
    pub fn snapshot(&self) -> Vec<JobSnapshot> {
        let jobs = self.lock();
        JobKind::ALL
            .iter()
            .filter_map(|&kind| {
                jobs.get(&kind).map(|s| JobSnapshot {
                    kind,
                    last_success: s.last_success_wall,
                    period: s.period,
                })
            })
            .collect()
    }

    /// Applies new schedules (a reload): a changed job is re-armed by the watch task.
    pub fn reschedule(&self, config: &JobsConfig) {
        let mut changed = Vec::new();
        {
            let mut jobs = self.lock();
            for kind in JobKind::ALL {
                let schedule = config.schedule(kind);
                if let Some(s) = jobs.get_mut(&kind)
                    && s.schedule.as_str() != schedule.as_str()
                {
                    s.schedule = schedule.clone();
                    s.period = period_of(schedule);
                    s.last_success = Instant::now();
                    changed.push(kind);
                }
            }
        }
        if !changed.is_empty() {
            self.rearm.lock().extend(changed);
            self.rearm_notify.notify_one();
        }
    }

    fn succeeded(&self, kind: JobKind) {
        let mut jobs = self.lock();
        if let Some(s) = jobs.get_mut(&kind) {
            s.last_success = Instant::now();
            s.last_success_wall = Some(Utc::now());
            if s.stalled {
                tracing::info!(job = kind.name(), "job runs again");
                s.stalled = false;
            }
        }
    }
}

fn stall_limit(period: Duration) -> Duration {
    period * STALL_PERIODS + STALL_GRACE
}

/// The time between two consecutive occurrences of a schedule (the shortest of the next few,
/// so a schedule like "every hour on weekdays" is judged by its busy period).
pub fn period_of(schedule: &CronExpr) -> Duration {
    let mut times = Vec::new();
    let mut t = Utc::now();
    for _ in 0..4 {
        match schedule.cron().find_next_occurrence(&t, false) {
            Ok(next) => {
                times.push(next);
                t = next;
            }
            Err(_) => break,
        }
    }
    times
        .windows(2)
        .filter_map(|w| (w[1] - w[0]).to_std().ok())
        .min()
        .unwrap_or(Duration::from_secs(86_400))
}

/// The running jobs.
pub struct Jobs {
    scheduler: JobScheduler,
    monitor: Arc<JobMonitor>,
    engine: Arc<Engine>,
    /// Housekeeping (`maintenance`) is the ledger's own business, not the engine's.
    ledger: AnyLedger,
}

impl Jobs {
    /// Creates and starts the cron scheduler with both jobs.
    pub async fn start(
        engine: Arc<Engine>,
        ledger: AnyLedger,
        config: &JobsConfig,
        monitor: Arc<JobMonitor>,
    ) -> anyhow::Result<Jobs> {
        let scheduler = JobScheduler::new().await?;
        {
            let mut jobs = monitor.lock();
            for kind in JobKind::ALL {
                let schedule = config.schedule(kind).clone();
                jobs.insert(
                    kind,
                    JobState {
                        period: period_of(&schedule),
                        schedule,
                        last_success: Instant::now(),
                        last_success_wall: None,
                        stalled: false,
                        running: Arc::new(AtomicBool::new(false)),
                        job_id: None,
                    },
                );
            }
        }
        let jobs = Jobs {
            scheduler,
            monitor,
            engine,
            ledger,
        };
        for kind in JobKind::ALL {
            jobs.arm(kind).await?;
        }
        jobs.scheduler.start().await?;
        Ok(jobs)
    }

    /// Adds (or replaces) a job in the cron scheduler.
    async fn arm(&self, kind: JobKind) -> anyhow::Result<()> {
        let (schedule, period, running, old) = {
            let mut jobs = self.monitor.lock();
            let s = jobs.get_mut(&kind).expect("job state exists");
            (
                s.schedule.clone(),
                s.period,
                s.running.clone(),
                s.job_id.take(),
            )
        };
        if let Some(old) = old {
            let _ = self.scheduler.remove(&old).await;
        }
        let engine = self.engine.clone();
        let ledger = self.ledger.clone();
        let monitor = self.monitor.clone();
        let job = Job::new_async(schedule.as_str(), move |_, _| {
            let engine = engine.clone();
            let ledger = ledger.clone();
            let monitor = monitor.clone();
            let running = running.clone();
            Box::pin(async move {
                // Runs never overlap: a run still going when the next is due skips it.
                if running.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        job = kind.name(),
                        "previous run still going; skipping this one"
                    );
                    return;
                }
                let ok = run_job(kind, &engine, &ledger, period).await;
                running.store(false, Ordering::Release);
                if ok {
                    monitor.succeeded(kind);
                }
            })
        })?;
        let id = self.scheduler.add(job).await?;
        self.monitor
            .lock()
            .get_mut(&kind)
            .expect("job state exists")
            .job_id = Some(id);
        Ok(())
    }

    /// Watches for stalled jobs until `shutdown`, re-arming them; then stops the scheduler.
    pub async fn watch(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                _ = self.monitor.rearm_notify.notified() => {
                    let kinds: Vec<JobKind> = std::mem::take(
                        &mut *self.monitor.rearm.lock(),
                    );
                    for kind in kinds {
                        tracing::info!(job = kind.name(), "schedule changed; re-arming");
                        if let Err(e) = self.arm(kind).await {
                            tracing::error!(job = kind.name(), error = %e, "cannot re-arm the job");
                        }
                    }
                    continue;
                }
            }
            let stalled: Vec<JobKind> = {
                let mut jobs = self.monitor.lock();
                jobs.iter_mut()
                    .filter(|(_, s)| {
                        s.last_success.elapsed() > stall_limit(s.period)
                            && !s.running.load(Ordering::Acquire)
                    })
                    .map(|(k, s)| {
                        s.stalled = true;
                        *k
                    })
                    .collect()
            };
            for kind in stalled {
                tracing::warn!(
                    job = kind.name(),
                    "job has not succeeded within {STALL_PERIODS} periods; re-arming it"
                );
                if let Err(e) = self.arm(kind).await {
                    tracing::error!(job = kind.name(), error = %e, "cannot re-arm the job");
                }
            }
        }
        let _ = self.scheduler.shutdown().await;
    }
}

/// One run of a job of period `period`; true when it completed (a run another daemon of a
/// shared ledger did in this daemon's stead counts: the job did not stall).
pub async fn run_job(
    kind: JobKind,
    engine: &Arc<Engine>,
    ledger: &AnyLedger,
    period: Duration,
) -> bool {
    match kind {
        JobKind::ResolveSites => resolve_sites(engine, ledger, period).await,
        JobKind::Maintenance => {
            match ledger.claim_job(kind.name(), once_gap(period)).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!("maintenance skipped: another daemon ran it this period");
                    return true;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot claim this period's maintenance");
                    return false;
                }
            }
            let before = Utc::now()
                - chrono::Duration::from_std(EVENT_RETENTION).unwrap_or(chrono::Duration::MAX);
            match ledger.maintain(before, EVENTS_PER_CONNECTION).await {
                Ok(done) => {
                    tracing::info!(
                        pruned_events = done.pruned,
                        transactions = done.transactions,
                        p99_hold_ms = ms(done.p99_hold),
                        longest_hold_ms = ms(done.longest_hold),
                        checkpoint_ms = ms(done.checkpoint),
                        checkpoint_tries = done.checkpoint_tries,
                        wal_truncated = done.truncated,
                        "maintenance ran"
                    );
                    true
                }
                Err(e) => {
                    tracing::error!(error = %e, "maintenance failed");
                    false
                }
            }
        }
    }
}

/// A duration in milliseconds, to a hundredth, for a log field.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 100_000.0).round() / 100.0
}

/// How long after one daemon's run of a job (or its claim of a connection's site
/// resolution) the others of a shared ledger leave it alone: half the job's period. The
/// daemons' runs at one cron tick start within a fraction of a second of each other (the
/// cron crate polls every 500 ms, plus their clocks' skew), so they all fall inside it,
/// and the next tick, a whole period later, falls outside.
fn once_gap(period: Duration) -> Duration {
    period / 2
}

/// The site job: on SQLite every active connection; on a shared ledger the connections due
/// that no other daemon claimed, in batches, so that the daemons running it at the same
/// tick split the connections and each is resolved once per period.
async fn resolve_sites(engine: &Arc<Engine>, ledger: &AnyLedger, period: Duration) -> bool {
    let run = match ledger.begin_site_checks().await {
        Ok(Some(run)) => run,
        Ok(None) => {
            let ids = engine.active_ids();
            let connections = ids.len();
            let tally = resolve_each(engine, ids, SITE_JOB_CONCURRENCY).await;
            tracing::debug!(
                connections,
                failed = tally.failed,
                deferred = tally.deferred,
                "resolve_sites ran"
            );
            return true;
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot start the site job on the shared ledger");
            return false;
        }
    };
    let lease = engine.settings().lease;
    let again = once_gap(period);
    // `SITE_JOB_CONCURRENCY / SITE_CHECK_BATCH` claimers, each resolving one small batch at
    // a time: at most `SITE_JOB_CONCURRENCY` resolutions in flight, and a slow connection
    // holds back only its own batch.
    let claimer = || async {
        let mut tally = Tally::default();
        loop {
            let ids = match ledger.claim_site_checks(run, SITE_CHECK_BATCH, lease).await {
                Ok(ids) if ids.is_empty() => return (tally, true),
                Ok(ids) => ids,
                Err(e) => {
                    tracing::error!(error = %e, "cannot claim connections for the site job");
                    return (tally, false);
                }
            };
            tally.add(resolve_each(engine, ids.clone(), SITE_CHECK_BATCH).await);
            if let Err(e) = ledger.finish_site_checks(run, ids, again).await {
                // Their claims lapse after the lease; a later run resolves them again.
                tracing::warn!(error = %e, "cannot record the site job's resolutions");
            }
        }
    };
    let claimers = (SITE_JOB_CONCURRENCY / SITE_CHECK_BATCH).max(1);
    let ends = futures_util::future::join_all((0..claimers).map(|_| claimer())).await;
    let mut tally = Tally::default();
    let mut ok = true;
    for (t, done) in ends {
        tally.add(t);
        ok &= done;
    }
    tracing::debug!(
        connections = tally.connections,
        failed = tally.failed,
        deferred = tally.deferred,
        "resolve_sites ran (shared ledger)"
    );
    ok
}

/// How many connections a claim of the site job takes at once on a shared ledger: small,
/// so that daemons running the job together split even a few connections, and one that
/// dies mid-batch leaves few behind (they lapse after `ledger.lease`).
pub const SITE_CHECK_BATCH: usize = 4;

/// What a site job's resolutions came to.
#[derive(Default)]
struct Tally {
    connections: usize,
    failed: usize,
    deferred: usize,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.connections += other.connections;
        self.failed += other.failed;
        self.deferred += other.deferred;
    }
}

/// Resolves the sites of `ids`, at most `concurrency` at once. Never refreshes: a
/// connection without a valid access token is resolved with its next planned refresh
/// (deferred).
async fn resolve_each(engine: &Arc<Engine>, ids: Vec<String>, concurrency: usize) -> Tally {
    use futures_util::StreamExt;
    let mut tally = Tally {
        connections: ids.len(),
        ..Tally::default()
    };
    let mut outcomes = futures_util::stream::iter(ids)
        .map(|id| {
            let engine = engine.clone();
            async move { engine.resolve_sites(&id).await }
        })
        .buffer_unordered(concurrency);
    while let Some(outcome) = outcomes.next().await {
        match outcome {
            SiteOutcome::Failed => tally.failed += 1,
            SiteOutcome::Deferred => tally.deferred += 1,
            SiteOutcome::Resolved | SiteOutcome::Skipped => {}
        }
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cron(text: &str) -> CronExpr {
        let toml = format!("[jobs]\nresolve_sites = \"{text}\"\n");
        crate::config::Config::parse(
            &toml,
            std::path::Path::new("/etc/tokend/daemon.toml"),
            &|_| None,
            &|_| Err(std::io::Error::other("none")),
        )
        .unwrap()
        .jobs
        .resolve_sites
    }

    #[test]
    fn periods_of_common_schedules() {
        assert_eq!(period_of(&cron("0 0 * * * *")), Duration::from_secs(3600));
        assert_eq!(period_of(&cron("* * * * * *")), Duration::from_secs(1));
        assert_eq!(
            period_of(&cron("0 30 3 * * *")),
            Duration::from_secs(86_400)
        );
        assert_eq!(period_of(&cron("*/10 * * * * *")), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_without_success_for_two_periods_is_stalled() {
        let m = JobMonitor::default();
        m.lock().insert(
            JobKind::Maintenance,
            JobState {
                schedule: cron("*/10 * * * * *"),
                period: Duration::from_secs(10),
                last_success: Instant::now(),
                last_success_wall: None,
                stalled: false,
                running: Arc::new(AtomicBool::new(false)),
                job_id: None,
            },
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(m.stalled().is_empty(), "grace not yet used up");
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(m.stalled(), vec!["maintenance"]);
        m.succeeded(JobKind::Maintenance);
        assert!(m.stalled().is_empty());
        assert!(m.snapshot()[0].last_success.is_some());
    }
}
