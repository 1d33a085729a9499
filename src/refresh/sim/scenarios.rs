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
use crate::refresh::{Held, Served};

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
    rec.chain.previous = Some((Secret::new(old_rt), now));
    rec.chain.refresh_token = Secret::new(new_rt);
    rec.chain.rotated_at = now;
    rec.chain.used_at = now;
    rec.chain.access = Some(AccessToken {
        token: Secret::new(access),
        expires_at: now + chrono::Duration::seconds(300),
    });
    rec.conn.last_refresh_at = Some(now);
    rec.chain.version += 1;
    rec.clone()
}

fn site(cloud_id: &str, name: &str, seen: Time) -> Site {
    Site {
        cloud_id: cloud_id.into(),
        url: format!("https://{name}.atlassian.net"),
        name: name.into(),
        scopes: vec!["read:page:confluence".into()],
        last_seen_at: seen,
    }
}

/// What memory holds of a connection: its chain version and refresh token.
fn memory(engine: &Engine, id: &str) -> (u64, String) {
    let slot = engine.find(id).expect("installed");
    let st = slot.read();
    (
        st.rec.chain.version,
        st.rec.chain.refresh_token.expose().to_owned(),
    )
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
            slot.read().rec.chain.access.is_none(),
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
        assert_eq!(slot.read().rec.chain.attempt_started_at, Some(old));
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
        assert!(
            engine.plan.next_of(&added).is_some(),
            "installed but not planned"
        );
        let another = lock(&s.world).add_chain(2, now);
        engine.reload(&another).await.expect("store up");
        assert!(
            engine.plan.next_of(&another).is_some(),
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
        assert!(engine.plan.next_of(&added).is_none(), "still planned");
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
        assert!(slot.read().rec.conn.account_id.is_none());
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
            assert_eq!(st.rec.conn.account_id.as_deref(), Some("acct-elsewhere"));
            assert_eq!(st.rec.chain.version, 0, "no chain version is involved");
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
            slot.read().rec.conn.sites[0].last_seen_at,
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
        let mut ours = slot.read().rec.clone();
        ours.chain.refresh_token = Secret::new("rt-held-here");
        ours.chain.version = 1;
        {
            let mut st = slot.lock();
            let held = Held {
                presented: Some(st.rec.chain.refresh_token.clone()),
                rec: ours,
                expect_version: 0,
                insert: false,
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
        assert_eq!(st.rec.chain.version, 0, "memory moved under a held change");
        assert_ne!(
            st.rec.chain.refresh_token.expose(),
            theirs.chain.refresh_token.expose()
        );
        let held = st.held.as_ref().expect("the held change was dropped");
        assert_eq!(held.rec.chain.refresh_token.expose(), "rt-held-here");
        assert!(st.rec.conn.account_id.is_none());
        drop(st);
        crash(s.inc);
    });
}
