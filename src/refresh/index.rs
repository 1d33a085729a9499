//! How connections are found: [`Index`], every installed slot by its [`Handle`], by id, by
//! label, and in label order, without a copy of any id or label.
//!
//! The id and label maps are [`KeyMap`]s: a 32-bit keyed hash of the string to the
//! handles filed under it, each lookup checking the candidate slot's own id or label under
//! its read lock (a collision costs a check, never a wrong answer). The label order is a
//! `Vec<Handle>` sorted by the slots' labels, searched by comparing them. At the scale
//! bench's 100,000 connections the maps of copied keys (`HashMap<Box<str>, Arc<Slot>>` by id,
//! `BTreeMap<Box<str>, Arc<Slot>>` by label) were about 113 bytes of heap a connection
//! (plus the allocator's overhead on two small chunks); these are about 28.
//!
//! A slot's id never changes once installed; its label changes only under the index's
//! write lock ([`super::Engine::relabel`]), so whoever holds the index lock sees every
//! filed label where the order puts it. The reads of a slot's id and label are
//! [`slot_id`] and [`slot_label`], the one write of a label [`set_slot_label`]: the only
//! places that know where in the slot they are kept.

use super::keymap::{KeyMap, key_hash};
use super::{Handle, Slot, SlotState};
use std::cmp::Ordering;
use std::sync::Arc;

/// A slot's connection id.
pub(super) fn slot_id(st: &SlotState) -> &str {
    st.rec.id()
}

/// A slot's label.
pub(super) fn slot_label(st: &SlotState) -> &str {
    st.rec.label()
}

/// Replaces a slot's label: only [`super::Engine::relabel`] calls it, under the index's
/// write lock, between taking the slot out of the label order and filing it again.
pub(super) fn set_slot_label(st: &mut SlotState, label: String) {
    st.update(|rec| rec.conn.label = label);
}

/// Every installed connection, by handle, id and label, and in label order.
///
/// Exact: a slot is in `handles` and `by_id` from [`Index::insert`] until
/// [`Index::remove`] (install and uninstall, under the engine's write lock of the index),
/// so `by_id` holds each installed id once. Labels are unique in the ledger, but memory may
/// briefly hold two slots with one label (a held insert and a connection another daemon
/// added under the same label, until the held one commits under a generated label): as the
/// `BTreeMap` did, the slot filed last under a label is the one `by_label` and the label
/// order name, and the other is found by id only. The simulation checks all of it after
/// every step ([`Index::check`]).
///
/// Lock order: the index, then a slot's state (lookups read candidates' ids and labels
/// under their read locks while holding the index lock, and install, uninstall and relabel
/// lock a slot while holding it for writing), then the site index. Never take the index
/// lock while holding a slot's lock: a holder of the index lock waiting for that slot
/// would wait forever.
#[derive(Default)]
pub(super) struct Index {
    /// Hash of each installed connection's id to its handle. Its count is the number of
    /// connections, read in O(1) by [`super::Engine::status_counts`] through [`Index::len`].
    by_id: KeyMap,
    /// Hash of each filed label to its handle: labels are unique in the ledger, and the
    /// API accepts a label wherever it accepts an id. Hashed, not searched in the label
    /// order: a token request by label is one hash and one check, not a search of 17
    /// slots' labels at 100,000 connections.
    by_label: KeyMap,
    /// The handles of `by_label`, sorted by their slots' labels (no two equal): listings
    /// come in label order without sorting every connection each call, and a page
    /// (`?after=LABEL`) starts with a binary search. 4 bytes a connection. While a load
    /// installs (`loading`), out of order when the store's rows were.
    in_label_order: Vec<Handle>,
    /// Every installed slot by its [`Handle`] (`None`: a free number): where the
    /// [`super::SiteIndex`]'s and these maps' handles lead.
    handles: Vec<Option<Arc<Slot>>>,
    /// The free numbers of `handles`, given out again before `handles` grows.
    free: Vec<Handle>,
    /// A load is installing: a label that sorts before the last one is appended anyway
    /// (and `unsorted` set) instead of inserted in place, and [`Index::end_load`] sorts
    /// once. A load in label order (the ledgers read their rows so) appends every label:
    /// O(n); one in another order costs one sort, O(n log n), never a shift of the whole
    /// order per row.
    loading: bool,
    /// A load appended a label out of order: `in_label_order` is to be sorted at its end.
    unsorted: bool,
    /// Tests only: every string hashes to the same key, so that every lookup meets every
    /// other slot as a colliding candidate.
    #[cfg(test)]
    collide: bool,
}

impl Index {
    /// The key of `s` in `by_id` and `by_label`.
    fn key(&self, s: &str) -> u32 {
        #[cfg(test)]
        if self.collide {
            return 0;
        }
        key_hash(s)
    }

    /// Room for `n` more connections (a load's): growing the maps one by one rehashed every
    /// key about twice over, and a grown `Vec` has room for up to twice what it holds.
    pub(super) fn reserve(&mut self, n: usize) {
        self.by_id.reserve(n);
        self.by_label.reserve(n);
        self.in_label_order.reserve(n);
        self.handles.reserve(n);
    }

    /// The number of installed connections. O(1).
    pub(super) fn len(&self) -> usize {
        self.handles.len() - self.free.len()
    }

    /// A number for a new slot.
    pub(super) fn give_handle(&mut self) -> Handle {
        if let Some(h) = self.free.pop() {
            return h;
        }
        self.handles.push(None);
        Handle::try_from(self.handles.len() - 1).expect("fewer than 2^32 connections")
    }

    /// Frees a slot's number (after [`Index::remove`] and the planner's cancel: no map may
    /// still name it).
    pub(super) fn free_handle(&mut self, h: Handle) {
        if let Some(place) = self.handles.get_mut(h as usize)
            && place.take().is_some()
        {
            self.free.push(h);
        }
    }

    /// The slot of a number, if one holds it now.
    pub(super) fn by_handle(&self, h: Handle) -> Option<&Arc<Slot>> {
        self.handles.get(h as usize).and_then(Option::as_ref)
    }

    /// Every installed slot, in handle order.
    pub(super) fn slots(&self) -> impl Iterator<Item = &Arc<Slot>> {
        self.handles.iter().flatten()
    }

    /// The installed connection `id`.
    pub(super) fn by_id(&self, id: &str) -> Option<&Arc<Slot>> {
        self.by_id
            .get(self.key(id))
            .filter_map(|h| self.by_handle(h))
            .find(|slot| slot_id(&slot.read()) == id)
    }

    /// The connection labelled `label`.
    pub(super) fn by_label(&self, label: &str) -> Option<&Arc<Slot>> {
        self.label_handle(label).and_then(|h| self.by_handle(h))
    }

    /// The handle filed under `label`.
    fn label_handle(&self, label: &str) -> Option<Handle> {
        self.by_label.get(self.key(label)).find(|&h| {
            self.by_handle(h)
                .is_some_and(|slot| slot_label(&slot.read()) == label)
        })
    }

    /// The filed slots whose labels sort after `after` (all when `None`), in label order.
    pub(super) fn after(&self, after: Option<&str>) -> impl Iterator<Item = &Arc<Slot>> {
        let start = after.map_or(0, |label| match self.label_position(label) {
            Ok(at) => at + 1,
            Err(at) => at,
        });
        self.in_label_order[start..]
            .iter()
            .filter_map(|&h| self.by_handle(h))
    }

    /// Files slot `slot`, just given `handle`, as connection `id` labelled `label` (its
    /// record's). No slot may hold `id` now (an old one is [`Index::remove`]d first); a
    /// slot filed under `label` is displaced by this one (found by id only from then on).
    pub(super) fn insert(&mut self, handle: Handle, slot: Arc<Slot>, id: &str, label: &str) {
        self.handles[handle as usize] = Some(slot);
        self.by_id.file(self.key(id), handle);
        self.file_label(handle, label);
    }

    /// Takes slot `handle`, connection `id` labelled `label`, out of the id and label maps
    /// (its number stays taken until [`Index::free_handle`]).
    pub(super) fn remove(&mut self, handle: Handle, id: &str, label: &str) {
        self.by_id.unfile(self.key(id), handle);
        self.unfile_label(handle, label);
    }

    /// Files `handle` under `label` and in the label order, displacing a slot filed under
    /// the same label.
    pub(super) fn file_label(&mut self, handle: Handle, label: &str) {
        let key = self.key(label);
        if let Some(other) = self.label_handle(label) {
            // The same label: `other` leaves both, `handle` takes its place in the order.
            self.by_label.unfile(key, other);
            if let Some(at) = self.order_place(other, label) {
                self.in_label_order[at] = handle;
            }
            self.by_label.file(key, handle);
            return;
        }
        self.by_label.file(key, handle);
        // The common case, and every row of a load in label order: after the last.
        let after_last = self
            .in_label_order
            .last()
            .is_none_or(|&last| self.compare(last, label) == Ordering::Less);
        if after_last || self.loading {
            self.unsorted |= !after_last;
            self.in_label_order.push(handle);
            return;
        }
        let at = self.label_position(label).unwrap_or_else(|at| at);
        self.in_label_order.insert(at, handle);
    }

    /// Takes `handle` out from under `label` and out of the label order, if it is filed
    /// there (a slot displaced by another of the same label is not).
    pub(super) fn unfile_label(&mut self, handle: Handle, label: &str) {
        if self.label_handle(label) != Some(handle) {
            return;
        }
        self.by_label.unfile(self.key(label), handle);
        if let Some(at) = self.order_place(handle, label) {
            self.in_label_order.remove(at);
        }
    }

    /// Where filed slot `handle`, labelled `label`, is in the label order: a binary search,
    /// or a scan while a load's appends are out of order.
    fn order_place(&self, handle: Handle, label: &str) -> Option<usize> {
        if self.unsorted {
            return self.in_label_order.iter().position(|&h| h == handle);
        }
        self.label_position(label)
            .ok()
            .filter(|&at| self.in_label_order[at] == handle)
    }

    /// Where `label` is (`Ok`) or would go (`Err`) in the label order.
    fn label_position(&self, label: &str) -> Result<usize, usize> {
        self.in_label_order
            .binary_search_by(|&h| self.compare(h, label))
    }

    /// How slot `h`'s label sorts against `label`. A filed handle always has its slot
    /// (removal takes it out of the order before its number is freed).
    fn compare(&self, h: Handle, label: &str) -> Ordering {
        self.by_handle(h)
            .map_or(Ordering::Less, |slot| slot_label(&slot.read()).cmp(label))
    }

    /// A load starts installing: see `loading`.
    pub(super) fn begin_load(&mut self) {
        self.loading = true;
    }

    /// A load has installed everything: the label order is sorted if it was appended out
    /// of order (one sort of the handles, comparing their slots' labels in place: no copy
    /// of every label to free again, which would leave holes between the slots).
    pub(super) fn end_load(&mut self) {
        self.loading = false;
        if !std::mem::take(&mut self.unsorted) {
            return;
        }
        let mut order = std::mem::take(&mut self.in_label_order);
        order.sort_unstable_by(|&a, &b| {
            if a == b {
                return Ordering::Equal;
            }
            match (self.by_handle(a), self.by_handle(b)) {
                (Some(a), Some(b)) => slot_label(&a.read()).cmp(slot_label(&b.read())),
                (a, b) => a.is_some().cmp(&b.is_some()),
            }
        });
        self.in_label_order = order;
    }

    /// Whether the maps are exactly what the installed slots say (the simulation and the
    /// unit tests check it after every change): `by_id` holds every installed slot once,
    /// under its id; the label order holds the filed slots, strictly sorted by label;
    /// `by_label` holds the same handles, each under its label; every label an installed
    /// slot has is filed (by one of the slots that have it); the count is right. Takes
    /// every slot's read lock: the caller holds none.
    #[cfg(test)]
    pub(super) fn check(&self) -> Result<(), String> {
        use std::collections::{BTreeSet, HashSet};
        let installed: Vec<(Handle, String, String, bool)> = self
            .handles
            .iter()
            .enumerate()
            .filter_map(|(h, slot)| {
                let st = slot.as_ref()?.read();
                let h = Handle::try_from(h).ok()?;
                Some((
                    h,
                    slot_id(&st).to_owned(),
                    slot_label(&st).to_owned(),
                    st.removed,
                ))
            })
            .collect();
        if installed.len() != self.len() {
            return Err(format!(
                "the index counts {} connections but holds {}",
                self.len(),
                installed.len()
            ));
        }
        if let Some((h, id, ..)) = installed.iter().find(|(.., removed)| *removed) {
            return Err(format!("removed slot {h} ({id}) is still installed"));
        }
        let mut ids: Vec<(u32, Handle)> = installed
            .iter()
            .map(|(h, id, ..)| (self.key(id), *h))
            .collect();
        let mut filed_ids = self.by_id.entries();
        ids.sort_unstable();
        filed_ids.sort_unstable();
        if ids != filed_ids {
            return Err(format!(
                "by id holds {filed_ids:?} but the slots give {ids:?}"
            ));
        }
        let label_of = |h: Handle| installed.iter().find(|(x, ..)| *x == h).map(|s| &s.2);
        let order: Vec<&String> = self
            .in_label_order
            .iter()
            .map(|&h| label_of(h).ok_or(format!("the label order names free handle {h}")))
            .collect::<Result<_, _>>()?;
        if self.loading || self.unsorted {
            return Err("the index is still loading".into());
        }
        if let Some(w) = order.windows(2).find(|w| w[0] >= w[1]) {
            return Err(format!("the label order has {:?} before {:?}", w[0], w[1]));
        }
        let mut labels: Vec<(u32, Handle)> = self
            .in_label_order
            .iter()
            .zip(&order)
            .map(|(&h, label)| (self.key(label), h))
            .collect();
        let mut filed_labels = self.by_label.entries();
        labels.sort_unstable();
        filed_labels.sort_unstable();
        if labels != filed_labels {
            return Err(format!(
                "by label holds {filed_labels:?} but the label order gives {labels:?}"
            ));
        }
        let every: BTreeSet<&String> = installed.iter().map(|s| &s.2).collect();
        let filed: BTreeSet<&String> = order.iter().copied().collect();
        if every != filed {
            return Err(format!(
                "the slots have labels {every:?} but {filed:?} are filed"
            ));
        }
        let distinct: HashSet<&String> = installed.iter().map(|s| &s.1).collect();
        if distinct.len() != installed.len() {
            return Err("two installed slots have one id".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slot for connection `id` labelled `label`, not yet filed.
    fn slot(index: &mut Index, id: &str, label: &str) -> (Handle, Arc<Slot>) {
        let rec = crate::model::sample_record(id, label, "rt", chrono::Utc::now());
        let handle = index.give_handle();
        (
            handle,
            Arc::new(Slot::new(
                crate::refresh::packed::Packed::from(&rec),
                None,
                handle,
            )),
        )
    }

    fn install(index: &mut Index, id: &str, label: &str) -> Handle {
        let (handle, slot) = slot(index, id, label);
        index.insert(handle, slot, id, label);
        handle
    }

    fn uninstall(index: &mut Index, id: &str) {
        let slot = index.by_id(id).cloned().expect("installed");
        let (handle, label) = {
            let st = slot.read();
            (st.handle, slot_label(&st).to_owned())
        };
        index.remove(handle, id, &label);
        index.free_handle(handle);
    }

    /// What [`super::super::Engine::relabel`] does to the index.
    fn relabel(index: &mut Index, id: &str, new: &str) {
        let slot = index.by_id(id).cloned().expect("installed");
        let (handle, old) = {
            let st = slot.read();
            (st.handle, slot_label(&st).to_owned())
        };
        index.unfile_label(handle, &old);
        set_slot_label(&mut slot.lock(), new.to_owned());
        index.file_label(handle, new);
    }

    fn labels(index: &Index, after: Option<&str>) -> Vec<String> {
        index
            .after(after)
            .map(|s| slot_label(&s.read()).to_owned())
            .collect()
    }

    fn id_of(slot: Option<&Arc<Slot>>) -> Option<String> {
        slot.map(|s| slot_id(&s.read()).to_owned())
    }

    fn indexes() -> [Index; 2] {
        let collide = Index {
            collide: true,
            ..Index::default()
        };
        [Index::default(), collide]
    }

    /// Every lookup finds the slot whose own id or label it names, also when every string
    /// hashes alike (every other slot a colliding candidate): a collision costs a check,
    /// never a wrong answer; a miss is a miss.
    #[test]
    fn lookups_check_their_candidates_against_the_slots() {
        for mut index in indexes() {
            for i in [3, 0, 7, 1, 9, 4, 2, 8, 6, 5] {
                install(&mut index, &format!("id{i}"), &format!("label{i}"));
            }
            index.check().unwrap();
            assert_eq!(index.len(), 10);
            for i in 0..10 {
                let (id, label) = (format!("id{i}"), format!("label{i}"));
                assert_eq!(id_of(index.by_id(&id)), Some(id.clone()));
                assert_eq!(id_of(index.by_label(&label)), Some(id.clone()));
                assert!(index.by_id(&label).is_none(), "a label is not an id");
                assert!(index.by_label(&id).is_none(), "an id is not a label");
            }
            assert!(index.by_id("id10").is_none());
            assert!(index.by_label("label").is_none());

            uninstall(&mut index, "id4");
            index.check().unwrap();
            assert!(index.by_id("id4").is_none());
            assert!(index.by_label("label4").is_none());
            assert_eq!(id_of(index.by_id("id5")), Some("id5".into()));
            assert_eq!(index.len(), 9);
            // Its number goes to the next slot, which the lookups then name.
            let h = install(&mut index, "id10", "label10");
            assert_eq!(id_of(index.by_handle(h)), Some("id10".into()));
            assert_eq!(id_of(index.by_label("label10")), Some("id10".into()));
            index.check().unwrap();
        }
    }

    /// Listings come in label order whatever the order of installs, and a page starts
    /// after its label, present or not; a relabel moves the slot to its new place and a
    /// removal takes it out.
    #[test]
    fn the_label_order_follows_installs_relabels_and_removals() {
        for mut index in indexes() {
            for (id, label) in [("a", "m"), ("b", "c"), ("c", "x"), ("d", "a"), ("e", "p")] {
                install(&mut index, id, label);
                index.check().unwrap();
            }
            assert_eq!(labels(&index, None), ["a", "c", "m", "p", "x"]);
            assert_eq!(labels(&index, Some("c")), ["m", "p", "x"]);
            assert_eq!(
                labels(&index, Some("d")),
                ["m", "p", "x"],
                "an absent label"
            );
            assert_eq!(labels(&index, Some("")), ["a", "c", "m", "p", "x"]);
            assert!(labels(&index, Some("x")).is_empty());
            assert!(labels(&index, Some("zz")).is_empty());

            relabel(&mut index, "a", "z");
            index.check().unwrap();
            assert_eq!(labels(&index, None), ["a", "c", "p", "x", "z"]);
            assert!(index.by_label("m").is_none(), "the old label is free");
            assert_eq!(id_of(index.by_label("z")), Some("a".into()));
            relabel(&mut index, "c", "b");
            index.check().unwrap();
            assert_eq!(labels(&index, None), ["a", "b", "c", "p", "z"]);
            assert_eq!(labels(&index, Some("b")), ["c", "p", "z"]);

            uninstall(&mut index, "e");
            uninstall(&mut index, "d");
            index.check().unwrap();
            assert_eq!(labels(&index, None), ["b", "c", "z"]);
            assert_eq!(labels(&index, Some("a")), ["b", "c", "z"]);
            for id in ["a", "b", "c"] {
                uninstall(&mut index, id);
            }
            index.check().unwrap();
            assert!(labels(&index, None).is_empty());
            assert_eq!(index.len(), 0);
        }
    }

    /// A load appends in whatever order its rows come and sorts once at its end; one in
    /// label order never sorts (every label appended after the last).
    #[test]
    fn a_load_out_of_label_order_is_sorted_once_at_its_end() {
        for mut index in indexes() {
            index.begin_load();
            for i in (0..50).rev() {
                install(&mut index, &format!("id{i}"), &format!("label{i:02}"));
            }
            assert!(index.unsorted);
            index.end_load();
            index.check().unwrap();
            let expected: Vec<String> = (0..50).map(|i| format!("label{i:02}")).collect();
            assert_eq!(labels(&index, None), expected);
            // Filed in place after the load.
            install(&mut index, "id-mid", "label25a");
            index.check().unwrap();
            assert_eq!(labels(&index, Some("label25")).first().unwrap(), "label25a");
        }
        let mut index = Index::default();
        index.begin_load();
        for i in 0..50 {
            install(&mut index, &format!("id{i}"), &format!("label{i:02}"));
        }
        assert!(!index.unsorted, "a load in label order only appends");
        index.end_load();
        index.check().unwrap();
    }

    /// Two slots with one label (a held insert and a connection another daemon added under
    /// that label): the one filed last is the label's, as the `BTreeMap` had it; the other
    /// is found by id, and its removal leaves the label's slot filed.
    #[test]
    fn a_label_filed_twice_names_the_slot_filed_last() {
        for mut index in indexes() {
            install(&mut index, "held", "same");
            install(&mut index, "other", "x");
            install(&mut index, "elsewhere", "same");
            index.check().unwrap();
            assert_eq!(id_of(index.by_label("same")), Some("elsewhere".into()));
            assert_eq!(id_of(index.by_id("held")), Some("held".into()));
            assert_eq!(labels(&index, None), ["same", "x"]);

            // The held one commits under a generated label: filed again, under it.
            relabel(&mut index, "held", "same-1");
            index.check().unwrap();
            assert_eq!(labels(&index, None), ["same", "same-1", "x"]);
            assert_eq!(id_of(index.by_label("same")), Some("elsewhere".into()));

            install(&mut index, "third", "x");
            uninstall(&mut index, "other");
            index.check().unwrap();
            assert_eq!(id_of(index.by_label("x")), Some("third".into()));
            assert_eq!(labels(&index, None), ["same", "same-1", "x"]);
        }
    }
}
