//! Deterministic scenarios on the simulation's shared store (tests only): each scripts
//! another daemon's work, a store or provider fault at the exact step it matters, instead of
//! hoping that a seeded schedule hits it.
//!
//! - [`Engine::reload`] / [`Engine::reload_all`] (`refresh::shared`): what another daemon
//!   wrote is taken into memory, or not, case by case;
//! - mends of `refresh::attempt` that only a precise interleaving of two daemons reaches.

use super::*;
use crate::model::AccessToken;
use crate::refresh::shared::FOREIGN_ATTEMPT_GRACE;
use crate::refresh::{Failure, Held, Served};

/// One daemon (`node0`) on a shared store holding one chain.
struct Scene {
    world: Shared,
    inc: Incarnation,
    id: String,
}

async fn scene(seed: u64) -> Scene {
    let start = sim_start(0);
    let clock = Arc::new(TokioClock::new(start));
    let world: Shared = Arc::new(Mutex::new(World::new(seed, clock.clone())));
    let id = lock(&world).add_chain(0, start);
    let inc = boot_node(&world, &clock, 2, Some(0)).await.expect("boot");
    Scene { world, inc, id }
}

/// Another daemon rotates chain `id` at the provider and commits the answer: the stored
/// record at the next version, with the new refresh and access tokens. Returns it.
fn rotate_elsewhere(world: &Shared, id: &str) -> Record {
    let mut w = lock(world);
    let now = w.now();
    let family = w.family_of(&w.store[id]).expect("issued");
    let (new_rt, access) = (w.mint("rt"), w.mint("at"));
    let f = w.families.get_mut(&family).expect("family");
    let old_rt = std::mem::replace(&mut f.current, new_rt.clone());
    f.parent = Some((old_rt.clone(), now));
    f.used_at = now;
    let generation = f.generation.len() as u64;
    f.generation.insert(new_rt.clone(), generation);
    w.owner.insert(new_rt.clone(), family.clone());
    w.access.insert(access.clone(), (family, generation));
    let rec = w.store.get_mut(id).expect("stored");
    rec.chain.previous = Some(Box::new((Secret::new(old_rt), now)));
    rec.chain.refresh_token = Secret::new(new_rt);
    rec.chain.rotated_at = now;
    rec.chain.used_at = now;
    rec.chain.access = Some(AccessToken {
        token: Secret::new(access),
        expires_at: now + chrono::Duration::seconds(300),
    });
    rec.conn.last_refresh_at = Some(now);
    // Its commit clears the marker (its own, or one it found and resolved).
    rec.chain.attempt_started_at = None;
    rec.chain.version += 1;
    rec.clone()
}

/// A change another daemon makes to the shared world at a scripted instant.
type Hook = Box<dyn FnOnce(&Shared) + Send>;

/// What the provider does with one refresh call of a [`Scripted`] provider.
enum Answer {
    /// Processes it as the simulated provider does.
    Process,
    /// Answers `invalid_grant` without processing it.
    Reject,
}

/// One refresh call of a [`Scripted`] provider: `before` runs when the request arrives,
/// then `delay` passes, then the `answer`, then `after` (once the provider has processed
/// it, before the daemon reads the answer).
struct Step {
    before: Option<Hook>,
    delay: Duration,
    answer: Answer,
    after: Option<Hook>,
}

impl Step {
    fn answer(answer: Answer) -> Step {
        Step {
            before: None,
            delay: Duration::ZERO,
            answer,
            after: None,
        }
    }
}

/// The simulated provider, its refresh calls following a script (one [`Step`] per call, in
/// order; calls past the script are processed); everything else as [`SimProvider`].
struct Scripted {
    inner: SimProvider,
    script: Mutex<VecDeque<Step>>,
    /// What `/me` answers (the simulated provider will not say).
    account: Option<String>,
}

impl TokenEndpoint for Scripted {
    fn refresh<'a>(
        &'a self,
        refresh_token: &'a Secret,
    ) -> BoxFuture<'a, Result<Grant, ProviderError>> {
        Box::pin(async move {
            let step = self.script.lock().pop_front();
            let Some(step) = step else {
                return self.inner.refresh(refresh_token).await;
            };
            if let Some(hook) = step.before {
                hook(&self.inner.0);
            }
            tokio::time::sleep(step.delay).await;
            let result = match step.answer {
                Answer::Process => self.inner.refresh(refresh_token).await,
                Answer::Reject => {
                    lock(&self.inner.0).calls += 1;
                    Err(rejected())
                }
            };
            if let Some(hook) = step.after {
                hook(&self.inner.0);
            }
            result
        })
    }
    fn exchange_code<'a>(
        &'a self,
        code: &'a Secret,
    ) -> BoxFuture<'a, Result<Grant, ProviderError>> {
        self.inner.exchange_code(code)
    }
    fn accessible_resources<'a>(
        &'a self,
        access_token: &'a Secret,
        now: Time,
    ) -> BoxFuture<'a, Result<Vec<Site>, ProviderError>> {
        self.inner.accessible_resources(access_token, now)
    }
    fn me<'a>(
        &'a self,
        access_token: &'a Secret,
    ) -> BoxFuture<'a, Result<Option<Account>, ProviderError>> {
        match &self.account {
            Some(account_id) => {
                let account = Account {
                    account_id: account_id.clone(),
                };
                Box::pin(async move { Ok(Some(account)) })
            }
            None => self.inner.me(access_token),
        }
    }
    fn not_configured(&self) -> Option<String> {
        self.inner.not_configured()
    }
    fn client_id(&self) -> &str {
        self.inner.client_id()
    }
    fn scopes(&self) -> Vec<String> {
        self.inner.scopes()
    }
    fn authorize_url(&self, state: &str) -> (String, String) {
        self.inner.authorize_url(state)
    }
    fn api_base_url(&self, product: &str, cloud_id: &str) -> String {
        self.inner.api_base_url(product, cloud_id)
    }
}

/// Daemon `node0` on the shared store, its provider following `script`.
async fn boot_scripted(world: &Shared, script: Vec<Step>) -> Incarnation {
    boot_scripted_node(world, 0, script, None).await
}

/// Daemon `node{node}` on the shared store, its provider following `script` and answering
/// `/me` with `account`.
async fn boot_scripted_node(
    world: &Shared,
    node: usize,
    script: Vec<Step>,
    account: Option<&str>,
) -> Incarnation {
    let clock = lock(world).clock.clone();
    let engine = Engine::load(
        Arc::new(SimStore(world.clone(), Some(node))),
        Arc::new(Scripted {
            inner: SimProvider(world.clone(), None),
            script: Mutex::new(script.into()),
            account: account.map(str::to_owned),
        }),
        clock,
        settings(2),
        crate::notify::Notifier::disabled(),
        Arc::new(crate::metrics::Metrics::new(false)),
    )
    .await
    .expect("boot");
    engine.set_node_name(format!("node{node}"));
    let scheduler = tokio::spawn(engine.clone().run_scheduler(std::future::pending()));
    Incarnation { engine, scheduler }
}

/// Another daemon (`node9`) holds chain `id`'s claim from now, for `lease` (zero: it
/// claimed and released it again, or its claim lapsed). It supersedes this daemon's claim,
/// as a claim taken over after a lapsed lease does.
fn claimed_by_another(world: &Shared, id: &str, lease: Duration) {
    let mut w = lock(world);
    let version = w.claims.get(id).map_or(0, |c| c.version) + 1;
    w.claims.insert(
        id.to_owned(),
        SimClaim {
            holder: "node9".into(),
            version,
            expires: tokio::time::Instant::now() + lease,
        },
    );
}

fn site(cloud_id: &str, name: &str, seen: Time) -> Site {
    Site {
        cloud_id: cloud_id.into(),
        url: format!("https://{name}.atlassian.net").into(),
        name: name.into(),
        scopes: vec!["read:page:confluence".into()].into(),
        last_seen_at: seen,
    }
}

/// What memory holds of a connection: its chain version and refresh token.
fn memory(engine: &Engine, id: &str) -> (u64, String) {
    let slot = engine.find(id).expect("installed");
    let st = slot.read();
    (st.rec.version(), st.rec.refresh_token().to_owned())
}

#[test]
fn a_newer_chain_is_adopted_and_its_token_served_without_a_provider_call() {
    paused_runtime().block_on(async {
        let s = scene(21).await;
        let theirs = rotate_elsewhere(&s.world, &s.id);
        let calls = lock(&s.world).calls;
        s.inc.engine.reload(&s.id).await.expect("store up");
        assert_eq!(
            memory(&s.inc.engine, &s.id),
            (
                theirs.chain.version,
                theirs.chain.refresh_token.expose().to_owned()
            )
        );
        let grant = s
            .inc
            .engine
            .token(&s.id, Duration::from_secs(60))
            .await
            .expect("served");
        assert_eq!(grant.served, Served::Cached);
        let access = theirs.chain.access.expect("set");
        assert_eq!(grant.access_token.expose(), access.token.expose());
        check_handed_out(&s.world, grant.access_token.expose());
        assert_eq!(lock(&s.world).calls, calls, "the chain was refreshed again");
        check_all(&s.world, &[&*s.inc.engine], "end").expect("invariants");
        crash(s.inc);
    });
}

#[test]
fn an_older_or_equal_chain_version_is_ignored() {
    paused_runtime().block_on(async {
        let s = scene(22).await;
        let engine = &s.inc.engine;
        let original = lock(&s.world).store[&s.id].clone();
        // Equal version, other content: not a newer chain (the store's versions only grow,
        // so an equal one is what memory already has).
        {
            let mut w = lock(&s.world);
            let now = w.now();
            w.store.get_mut(&s.id).expect("stored").chain.access = Some(AccessToken {
                token: Secret::new("at-equal"),
                expires_at: now + chrono::Duration::seconds(300),
            });
        }
        assert_eq!(engine.reload_all().await.expect("store up"), 0);
        engine.reload(&s.id).await.expect("store up");
        let slot = engine.find(&s.id).expect("installed");
        assert!(
            slot.read().rec.access().is_none(),
            "an equal version was taken"
        );
        // Memory moves to a newer chain; an older record read afterwards does not undo it.
        let theirs = rotate_elsewhere(&s.world, &s.id);
        engine.reload(&s.id).await.expect("store up");
        assert_eq!(memory(engine, &s.id).0, theirs.chain.version);
        lock(&s.world).store.insert(s.id.clone(), original);
        engine.reload(&s.id).await.expect("store up");
        assert_eq!(engine.reload_all().await.expect("store up"), 0);
        assert_eq!(
            memory(engine, &s.id),
            (
                theirs.chain.version,
                theirs.chain.refresh_token.expose().to_owned()
            ),
            "an older chain replaced a newer one"
        );
        crash(s.inc);
    });
}

#[test]
fn a_chain_another_daemon_is_still_marking_is_taken_only_once_its_marker_is_old() {
    paused_runtime().block_on(async {
        let s = scene(23).await;
        let engine = &s.inc.engine;
        let theirs = rotate_elsewhere(&s.world, &s.id);
        let fresh = lock(&s.world).now() - chrono::Duration::seconds(10);
        lock(&s.world)
            .store
            .get_mut(&s.id)
            .expect("stored")
            .chain
            .attempt_started_at = Some(fresh);
        engine.reload(&s.id).await.expect("store up");
        assert_eq!(engine.reload_all().await.expect("store up"), 0);
        assert_eq!(
            memory(engine, &s.id).0,
            0,
            "a fresh foreign marker was taken"
        );
        // Past the grace, that daemon is taken to be gone: its chain (and the unknown
        // outcome it leaves, to resolve at once) is this daemon's.
        let old = lock(&s.world).now()
            - chrono::Duration::from_std(FOREIGN_ATTEMPT_GRACE).expect("short")
            - chrono::Duration::seconds(1);
        lock(&s.world)
            .store
            .get_mut(&s.id)
            .expect("stored")
            .chain
            .attempt_started_at = Some(old);
        assert_eq!(engine.reload_all().await.expect("store up"), 1);
        assert_eq!(memory(engine, &s.id).0, theirs.chain.version);
        let slot = engine.find(&s.id).expect("installed");
        assert_eq!(slot.read().rec.attempt_started_at(), Some(old));
        crash(s.inc);
    });
}

#[test]
fn connections_added_and_removed_elsewhere_are_installed_and_uninstalled() {
    paused_runtime().block_on(async {
        let s = scene(24).await;
        let engine = &s.inc.engine;
        let now = lock(&s.world).now();
        let added = lock(&s.world).add_chain(1, now);
        assert!(engine.find(&added).is_none());
        assert_eq!(engine.reload_all().await.expect("store up"), 1);
        assert!(engine.find(&added).is_some(), "not installed");
        let added_handle = engine.find(&added).expect("installed").read().handle;
        assert!(
            engine.plan.next_of(added_handle).is_some(),
            "installed but not planned"
        );
        let another = lock(&s.world).add_chain(2, now);
        engine.reload(&another).await.expect("store up");
        let another_handle = engine.find(&another).expect("installed").read().handle;
        assert!(
            engine.plan.next_of(another_handle).is_some(),
            "installed but not planned"
        );
        assert_eq!(engine.status_counts(), engine.recount_statuses());
        check_all(&s.world, &[&**engine], "added").expect("invariants");
        // Removed elsewhere: one through a notification, one by the re-read.
        {
            let mut w = lock(&s.world);
            for id in [&added, &another] {
                w.store.remove(id);
                w.families.get_mut(id).expect("family").removal = true;
            }
        }
        engine.reload(&added).await.expect("store up");
        assert!(engine.find(&added).is_none(), "not uninstalled");
        assert!(engine.plan.next_of(added_handle).is_none(), "still planned");
        assert_eq!(engine.reload_all().await.expect("store up"), 1);
        assert!(engine.find(&another).is_none(), "not uninstalled");
        assert_eq!(engine.status_counts(), engine.recount_statuses());
        // A connection whose insert is held (a consent the store refused) is not in the
        // store yet: that is no removal.
        let rec = crate::model::sample_record("c-held", "held", "rt-held", now);
        let held = Held {
            rec: rec.clone(),
            expect_version: 0,
            insert: true,
            presented: None,
            refused: false,
        };
        engine.install(rec, Some(held));
        engine.reload("c-held").await.expect("store up");
        assert_eq!(engine.reload_all().await.expect("store up"), 0);
        let slot = engine
            .find("c-held")
            .expect("a held insert was uninstalled");
        assert!(slot.read().held.is_some());
        assert_eq!(engine.commit_pending(), 1);
        crash(s.inc);
    });
}

#[test]
fn an_account_and_sites_resolved_elsewhere_are_taken_and_unchanged_sites_are_not() {
    paused_runtime().block_on(async {
        let s = scene(25).await;
        let engine = &s.inc.engine;
        let slot = engine.find(&s.id).expect("installed");
        assert!(slot.read().rec.account_id().is_none());
        let seen = lock(&s.world).now();
        {
            let mut w = lock(&s.world);
            let rec = w.store.get_mut(&s.id).expect("stored");
            rec.conn.account_id = Some("acct-elsewhere".into());
            rec.conn.sites = vec![site("cloud-1", "acme", seen)];
        }
        engine.reload(&s.id).await.expect("store up");
        {
            let st = slot.read();
            assert_eq!(st.rec.account_id(), Some("acct-elsewhere"));
            assert_eq!(st.rec.version(), 0, "no chain version is involved");
        }
        assert_eq!(
            engine.connections_for_site("acme.atlassian.net"),
            std::slice::from_ref(&s.id)
        );
        assert_eq!(
            engine.connections_for_site("cloud-1"),
            std::slice::from_ref(&s.id)
        );
        engine.site_index_matches_recount().expect("index exact");
        // Another site job moved the sites: the index follows.
        lock(&s.world)
            .store
            .get_mut(&s.id)
            .expect("stored")
            .conn
            .sites = vec![site("Cloud-2", "beta", seen)];
        assert_eq!(engine.reload_all().await.expect("store up"), 1);
        assert!(engine.connections_for_site("acme.atlassian.net").is_empty());
        assert_eq!(
            engine.connections_for_site("beta.atlassian.net"),
            std::slice::from_ref(&s.id)
        );
        engine.site_index_matches_recount().expect("index exact");
        // The same sites seen again later (every resolution moves `last_seen_at`): no change,
        // no write of the slot.
        let later = seen + chrono::Duration::minutes(5);
        lock(&s.world)
            .store
            .get_mut(&s.id)
            .expect("stored")
            .conn
            .sites = vec![site("Cloud-2", "beta", later)];
        assert_eq!(engine.reload_all().await.expect("store up"), 0);
        engine.reload(&s.id).await.expect("store up");
        assert_eq!(
            slot.read().rec.to_record().conn.sites[0].last_seen_at,
            seen,
            "rewritten"
        );
        crash(s.inc);
    });
}

#[test]
fn a_change_held_for_its_commit_is_never_overwritten_by_a_reload() {
    paused_runtime().block_on(async {
        let s = scene(26).await;
        let engine = &s.inc.engine;
        let slot = engine.find(&s.id).expect("installed");
        let mut ours = slot.read().rec.to_record();
        ours.chain.refresh_token = Secret::new("rt-held-here");
        ours.chain.version = 1;
        {
            let mut st = slot.lock();
            let held = Held {
                presented: Some(Secret::new(st.rec.refresh_token().to_owned())),
                rec: ours,
                expect_version: 0,
                insert: false,
                refused: false,
            };
            engine.set_held(&mut st, Some(held));
        }
        let theirs = rotate_elsewhere(&s.world, &s.id);
        lock(&s.world)
            .store
            .get_mut(&s.id)
            .expect("stored")
            .conn
            .account_id = Some("acct-elsewhere".into());
        engine.reload(&s.id).await.expect("store up");
        assert_eq!(engine.reload_all().await.expect("store up"), 0);
        let st = slot.read();
        assert_eq!(st.rec.version(), 0, "memory moved under a held change");
        assert_ne!(st.rec.refresh_token(), theirs.chain.refresh_token.expose());
        let held = st.held.as_ref().expect("the held change was dropped");
        assert_eq!(held.rec.chain.refresh_token.expose(), "rt-held-here");
        assert!(st.rec.account_id().is_none());
        drop(st);
        crash(s.inc);
    });
}

/// `attempt::try_previous`'s conflict path. The current token is rejected (the provider
/// lost its rotation), the previous one, inside its leeway, is accepted and rotated; then
/// the commit conflicts: another daemon claimed the chain while this one was stopped past
/// its lease, and released it without writing. The store still holds the token this attempt
/// began with (the rejected current one) at its marker's version, so the new token is the
/// provider's current one and is committed under a fresh claim. Judged against the token
/// presented instead (the previous one), the conflict looked like a chain moved elsewhere:
/// memory took the store's rejected token and the chain was lost.
#[test]
fn a_retry_with_the_previous_token_judges_a_conflict_against_the_stored_token() {
    paused_runtime().block_on(async {
        let start = sim_start(0);
        let clock = Arc::new(TokioClock::new(start));
        let world: Shared = Arc::new(Mutex::new(World::new(31, clock)));
        let id = lock(&world).add_chain(0, start);
        // The chain as this daemon loads it: current token C, previous P rotated just now.
        let loaded = rotate_elsewhere(&world, &id);
        assert!(loaded.chain.previous.is_some());
        let after: Hook = {
            let id = id.clone();
            Box::new(move |world| claimed_by_another(world, &id, Duration::ZERO))
        };
        let inc = boot_scripted(
            &world,
            vec![
                Step::answer(Answer::Reject),
                Step {
                    after: Some(after),
                    ..Step::answer(Answer::Process)
                },
            ],
        )
        .await;
        let calls = lock(&world).calls;
        let got = inc.engine.refresh_now(&id).await;
        check_all(&world, &[&*inc.engine], "after the refresh").expect("invariants");
        let info = got.expect("refreshed");
        assert_eq!(info.conn.status, Status::Active);
        assert_eq!(
            lock(&world).calls,
            calls + 2,
            "the current, then the previous"
        );
        let (stored, current) = {
            let w = lock(&world);
            let rec = w.store[&id].clone();
            let family = w.family_of(&rec).expect("issued");
            (rec, w.families[&family].current.clone())
        };
        assert_eq!(
            stored.chain.refresh_token.expose(),
            current,
            "the rotated token was not committed"
        );
        assert_eq!(memory(&inc.engine, &id).1, current);
        check_all(&world, &[&*inc.engine], "end").expect("invariants");
        crash(inc);
    });
}

/// A rejection whose `needs_reauth` write failed while a reload took a newer chain: this
/// daemon presented the chain's token; while its request ran, another daemon took the
/// claim over (this one's lease lapsed) and rotated and committed the chain, and a
/// notification's reload took that newer chain into memory. Then the provider rejected this
/// daemon's (older) token, and the `needs_reauth` write conflicted. Memory keeps the newer
/// chain, active, and the caller gets a retryable error; before the mend, memory marked the
/// newer chain `needs_reauth` and the caller was told to consent again.
#[test]
fn a_rejection_not_recorded_keeps_the_newer_chain_a_reload_took() {
    paused_runtime().block_on(async {
        let start = sim_start(0);
        let clock = Arc::new(TokioClock::new(start));
        let world: Shared = Arc::new(Mutex::new(World::new(32, clock)));
        let id = lock(&world).add_chain(0, start);
        let lease = settings(2).lease;
        let before: Hook = {
            let id = id.clone();
            Box::new(move |world| {
                claimed_by_another(world, &id, lease);
                rotate_elsewhere(world, &id);
            })
        };
        let inc = boot_scripted(
            &world,
            vec![Step {
                before: Some(before),
                delay: Duration::from_secs(2),
                ..Step::answer(Answer::Reject)
            }],
        )
        .await;
        let engine = inc.engine.clone();
        let wanted = id.clone();
        let caller = tokio::spawn(async move { engine.refresh_now(&wanted).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let theirs = lock(&world).store[&id].clone();
        inc.engine.reload(&id).await.expect("store up");
        assert_eq!(
            memory(&inc.engine, &id).0,
            theirs.chain.version,
            "not reloaded"
        );
        let got = caller.await.expect("joined");
        check_all(&world, &[&*inc.engine], "after the rejection").expect("invariants");
        assert!(
            matches!(got, Err(Failure::Unavailable { .. })),
            "a rejection of an older token is a retry: {got:?}"
        );
        assert_eq!(
            memory(&inc.engine, &id),
            (
                theirs.chain.version,
                theirs.chain.refresh_token.expose().to_owned()
            ),
            "memory left the newer chain"
        );
        let slot = inc.engine.find(&id).expect("installed");
        assert_eq!(slot.read().rec.status(), Status::Active);
        assert_eq!(lock(&world).store[&id].conn.status, Status::Active);
        assert_eq!(inc.engine.status_counts(), inc.engine.recount_statuses());
        crash(inc);
    });
}

/// `attempt::settle` never moves memory to an older chain version: a record an attempt
/// read (a held change's commit, a conflict's reload, another daemon's claim) may be older
/// than one a reload took meanwhile. A newer one is still taken.
#[test]
fn settling_never_moves_memory_to_an_older_chain() {
    use crate::refresh::attempt::{Outcome, Skip, settle};
    paused_runtime().block_on(async {
        let s = scene(41).await;
        let engine = &s.inc.engine;
        let older = lock(&s.world).store[&s.id].clone();
        let theirs = rotate_elsewhere(&s.world, &s.id);
        engine.reload(&s.id).await.expect("store up");
        let newer = (
            theirs.chain.version,
            theirs.chain.refresh_token.expose().to_owned(),
        );
        assert_eq!(memory(engine, &s.id), newer);
        let slot = engine.find(&s.id).expect("installed");
        let outcomes = [
            Outcome::Committed {
                next: older.clone(),
            },
            Outcome::Superseded {
                current: Some(older.clone()),
            },
            Outcome::Skipped(Skip::ClaimedElsewhere {
                current: Some(Box::new(older.clone())),
                wait: Duration::from_secs(61),
            }),
        ];
        let mut moved = Vec::new();
        for outcome in outcomes {
            let what: String = format!("{outcome:?}").chars().take(24).collect();
            let _ = settle(engine, &mut slot.lock(), outcome);
            if memory(engine, &s.id) != newer {
                moved.push(what);
                engine.reload_all().await.expect("store up");
            }
        }
        assert!(
            moved.is_empty(),
            "moved memory to an older chain: {moved:?}"
        );
        assert_eq!(engine.status_counts(), engine.recount_statuses());
        // A newer record than memory's is taken.
        let newest = rotate_elsewhere(&s.world, &s.id);
        let _ = settle(
            engine,
            &mut slot.lock(),
            Outcome::Superseded {
                current: Some(newest.clone()),
            },
        );
        assert_eq!(memory(engine, &s.id).0, newest.chain.version);
        crash(s.inc);
    });
}

/// Log lines written while a test runs (the engine's tracing, as plain text).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Runs `test` on a paused runtime with its logs captured.
    fn capture(&self, test: impl std::future::Future<Output = ()>) {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || logs.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || paused_runtime().block_on(test));
    }

    /// The lines at `level` that contain `text`.
    fn count(&self, level: &str, text: &str) -> usize {
        let bytes = self.0.lock().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|l| l.contains(level) && l.contains(text))
            .count()
    }
}

/// An import whose insert the store refuses as data stores nothing and spends nothing:
/// the caller is told what was refused as a bad request, not that the ledger is down.
#[test]
fn an_import_the_store_refuses_is_a_bad_request() {
    paused_runtime().block_on(async {
        let s = scene(51).await;
        lock(&s.world).store_refusals = 1;
        let calls = lock(&s.world).calls;
        let got = s.inc.engine.import("new", Secret::new("rt-import")).await;
        match got {
            Err(Failure::BadRequest(m)) => {
                assert!(
                    m.contains("malformed") && m.contains("connection row"),
                    "{m}"
                )
            }
            other => panic!("answered as {other:?}"),
        }
        assert!(s.inc.engine.find("new").is_none(), "installed anyway");
        assert_eq!(s.inc.engine.commit_pending(), 0);
        assert_eq!(lock(&s.world).calls, calls, "the token was presented");
        crash(s.inc);
    });
}

/// A rotated chain whose commit the store refuses as data is held in memory and its commit
/// retried exactly as for a store that is down (never lose a chain), but the refusal is
/// logged once, as an error, and not as the ledger being unavailable.
#[test]
fn a_chain_commit_the_store_refuses_is_held_and_logged_once() {
    let logs = Logs::default();
    logs.capture(async {
        let start = sim_start(0);
        let clock = Arc::new(TokioClock::new(start));
        let world: Shared = Arc::new(Mutex::new(World::new(52, clock)));
        let id = lock(&world).add_chain(0, start);
        // Armed once the provider has rotated: the commit and two of its retries.
        let after: Hook = Box::new(|world| lock(world).store_refusals = 3);
        let inc = boot_scripted(
            &world,
            vec![Step {
                after: Some(after),
                ..Step::answer(Answer::Process)
            }],
        )
        .await;
        let got = inc.engine.refresh_now(&id).await;
        match &got {
            Err(Failure::Internal(m)) => assert!(m.contains("malformed"), "{m}"),
            other => panic!("answered as {other:?}"),
        }
        assert_eq!(
            inc.engine.commit_pending(),
            1,
            "the rotated token is not held"
        );
        check_all(&world, &[&*inc.engine], "held").expect("invariants");
        tokio::time::sleep(Duration::from_secs(20)).await;
        check_all(&world, &[&*inc.engine], "committed").expect("invariants");
        assert_eq!(inc.engine.commit_pending(), 0, "never committed");
        let (stored, current) = {
            let w = lock(&world);
            let family = w.family_of(&w.store[&id]).expect("issued");
            (
                w.store[&id].chain.refresh_token.expose().to_owned(),
                w.families[&family].current.clone(),
            )
        };
        assert_eq!(stored, current);
        crash(inc);
    });
    assert_eq!(logs.count("ERROR", "refuses to store"), 1, "not said once");
    assert_eq!(
        logs.count("ERROR", "cannot commit the rotated refresh token"),
        0,
        "told as a store that is down"
    );
    assert_eq!(logs.count("INFO", "held chain committed"), 1);
}

/// A merge (a second consent for an account that already has a connection) landing while
/// another daemon's attempt on that connection's chain is in flight. The merge takes no
/// claim: its compare-and-swap on both chain versions is the fence (see
/// `Engine::merge`). Here daemon A's memory already holds B's marker (A looked while B held
/// the claim), so the merge lands over it; B's answer then conflicts, and since the store
/// holds a third token (the merged chain), B takes the store's chain: the merged chain is
/// kept, nobody presents a token outside its leeway, and the old chain the merge replaced
/// (by design) is the only one dropped.
#[test]
fn a_merge_landing_during_another_daemons_refresh_keeps_the_merged_chain() {
    paused_runtime().block_on(async {
        let start = sim_start(0);
        let clock = Arc::new(TokioClock::new(start));
        let world: Shared = Arc::new(Mutex::new(World::new(61, clock)));
        let existing = lock(&world).add_chain(0, start);
        lock(&world)
            .store
            .get_mut(&existing)
            .expect("stored")
            .conn
            .account_id = Some("acct-1".into());
        // B's refresh of the existing chain takes 5 s at the provider.
        let b = boot_scripted_node(
            &world,
            1,
            vec![Step {
                delay: Duration::from_secs(5),
                ..Step::answer(Answer::Process)
            }],
            Some("acct-1"),
        )
        .await;
        let a = boot_scripted_node(&world, 0, vec![], Some("acct-1")).await;
        let engine = b.engine.clone();
        let wanted = existing.clone();
        let refresh_b = tokio::spawn(async move { engine.refresh_now(&wanted).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let marked = lock(&world).store[&existing].clone();
        assert!(
            marked.chain.attempt_started_at.is_some(),
            "B is not in flight"
        );
        // A looks while B holds the claim: its memory takes B's marked record.
        let looked = a.engine.refresh_now(&existing).await;
        assert!(
            matches!(looked, Err(Failure::Unavailable { .. })),
            "{looked:?}"
        );
        assert_eq!(memory(&a.engine, &existing).0, marked.chain.version);
        // A second consent for the same account, on A: imported, refreshed, merged.
        let (old_family, new_rt) = {
            let mut w = lock(&world);
            let old = w.family_of(&marked).expect("issued");
            (old, w.new_family("f-new", start))
        };
        let added = a
            .engine
            .import("second", Secret::new(new_rt))
            .await
            .expect("imported");
        assert!(!added.created, "not merged into the existing connection");
        assert_eq!(added.info.conn.id, existing);
        let merged = lock(&world).store[&existing].clone();
        assert_eq!(
            lock(&world).family_of(&merged).as_deref(),
            Some("f-new"),
            "the merge did not land while B was in flight"
        );
        assert!(!refresh_b.is_finished(), "B answered before the merge");
        // The merge replaces the old chain by design: it is no longer the store's to keep.
        lock(&world)
            .families
            .get_mut(&old_family)
            .expect("family")
            .removal = true;
        let got = refresh_b.await.expect("joined");
        assert!(got.is_err(), "B committed over the merged chain: {got:?}");
        let live = [&*a.engine, &*b.engine];
        check_all(&world, &live, "after B's answer").expect("invariants");
        let stored = lock(&world).store[&existing].clone();
        assert_eq!(lock(&world).family_of(&stored).as_deref(), Some("f-new"));
        for engine in live {
            let (_, token) = memory(engine, &existing);
            assert_eq!(
                token,
                stored.chain.refresh_token.expose(),
                "memory left the merged chain"
            );
        }
        // Both daemons keep the merged chain from here on.
        for minute in 0..150 {
            tokio::time::sleep(Duration::from_secs(60)).await;
            check_all(&world, &live, &format!("minute {minute}")).expect("invariants");
        }
        let w = lock(&world);
        assert!(w.broken.is_empty(), "{:?}", w.broken);
        let f = &w.families["f-new"];
        assert!(
            f.alive && f.generation.len() > 2,
            "the merged chain was not kept rotating"
        );
        drop(w);
        crash(a);
        crash(b);
    });
}

/// The other order of the same race: daemon A's memory is behind B's marker when the
/// merge is tried, so its compare-and-swap conflicts and nothing changes (the new
/// connection keeps its chain); B commits its refresh; A's resolution retries the merge
/// later, and it lands over B's committed chain. No chain is lost on the way.
#[test]
fn a_merge_behind_another_daemons_marker_conflicts_and_lands_later() {
    paused_runtime().block_on(async {
        let start = sim_start(0);
        let clock = Arc::new(TokioClock::new(start));
        let world: Shared = Arc::new(Mutex::new(World::new(62, clock)));
        let existing = lock(&world).add_chain(0, start);
        lock(&world)
            .store
            .get_mut(&existing)
            .expect("stored")
            .conn
            .account_id = Some("acct-1".into());
        let b = boot_scripted_node(
            &world,
            1,
            vec![Step {
                delay: Duration::from_secs(5),
                ..Step::answer(Answer::Process)
            }],
            Some("acct-1"),
        )
        .await;
        let a = boot_scripted_node(&world, 0, vec![], Some("acct-1")).await;
        let engine = b.engine.clone();
        let wanted = existing.clone();
        let refresh_b = tokio::spawn(async move { engine.refresh_now(&wanted).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let marked = lock(&world).store[&existing].clone();
        assert!(
            marked.chain.attempt_started_at.is_some(),
            "B is not in flight"
        );
        assert!(memory(&a.engine, &existing).0 < marked.chain.version);
        let (old_family, new_rt) = {
            let mut w = lock(&world);
            let old = w.family_of(&marked).expect("issued");
            (old, w.new_family("f-new", start))
        };
        let added = a
            .engine
            .import("second", Secret::new(new_rt))
            .await
            .expect("imported");
        assert!(added.created, "merged over a chain in flight elsewhere");
        let new_id = added.info.conn.id.clone();
        {
            let w = lock(&world);
            assert_eq!(
                w.family_of(&w.store[&new_id]).as_deref(),
                Some("f-new"),
                "the new connection does not hold its chain"
            );
        }
        assert!(!refresh_b.is_finished(), "B answered before the merge");
        refresh_b
            .await
            .expect("joined")
            .expect("B's refresh commits");
        let live = [&*a.engine, &*b.engine];
        check_all(&world, &live, "after B's answer").expect("invariants");
        let mut merged_at = None;
        for minute in 0..150 {
            tokio::time::sleep(Duration::from_secs(60)).await;
            {
                let mut w = lock(&world);
                if merged_at.is_none() && !w.store.contains_key(&new_id) {
                    // The merge replaces the old chain by design.
                    merged_at = Some(minute);
                    w.families.get_mut(&old_family).expect("family").removal = true;
                }
            }
            check_all(&world, &live, &format!("minute {minute}")).expect("invariants");
        }
        assert!(merged_at.is_some(), "the merge was never retried");
        let w = lock(&world);
        assert!(w.broken.is_empty(), "{:?}", w.broken);
        assert_eq!(w.family_of(&w.store[&existing]).as_deref(), Some("f-new"));
        drop(w);
        assert!(
            a.engine.find(&new_id).is_none(),
            "the merged connection is still in A"
        );
        crash(a);
        crash(b);
    });
}

/// On a shared store, chains an hour or less from their inactivity deadline get permits by
/// deadline, before every chain whose order is spread by a per-daemon hash: a hash order
/// within one window could put a chain about to expire behind thousands of others.
#[test]
fn chains_near_their_deadline_are_not_spread_and_go_first() {
    paused_runtime().block_on(async {
        let s = scene(31).await;
        let engine = &s.inc.engine;
        assert!(engine.store.shared(), "the scene's store is shared");
        let now = engine.now().timestamp_millis();
        let minute = 60_000;
        // Near: 1..=59 minutes away, ids in an order unrelated to their deadlines.
        let near: Vec<(String, i64)> = (1..60)
            .map(|m| (format!("c{:012x}", (m * 7919) % 1000), now + m * minute))
            .collect();
        let mut by_order = near.clone();
        by_order.sort_by_key(|(id, d)| crate::refresh::attempt::permit_order(engine, id, *d));
        let mut by_deadline = near.clone();
        by_deadline.sort_by_key(|(_, d)| *d);
        assert_eq!(by_order, by_deadline, "near chains go by deadline");
        // Far: in 2 to 3 hours; each comes after every near one, whatever its hash.
        let last_near = near
            .iter()
            .map(|(id, d)| crate::refresh::attempt::permit_order(engine, id, *d))
            .max()
            .expect("near chains");
        for m in 0..60 {
            let id = format!("c{m:012x}");
            let far = crate::refresh::attempt::permit_order(engine, &id, now + (120 + m) * minute);
            assert!(
                far > last_near,
                "{id} in {} min jumps a near chain",
                120 + m
            );
        }
    });
}
