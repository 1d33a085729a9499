//! Maps from a 32-bit keyed hash of a string to the slot handles filed under it: what the
//! site index ([`super::SiteIndex`]) and the id and label indexes ([`super::index::Index`])
//! are made of, so that no index holds a copy of the strings it is keyed by.
//!
//! A key is a hash, not the string: two strings with the same hash share an entry, and
//! every lookup checks each candidate against the slot's own value (its sites, id or
//! label), so a collision costs a check, never a wrong answer. The hash is keyed at random
//! per process, so nobody can choose ids, labels or site names that collide.

use super::Handle;
use std::collections::HashMap;
use std::sync::LazyLock;

/// A map of keys to handles: a key is in `one` while one handle is filed under it, in
/// `many` (sorted, no duplicates) while two or more are, never in both (canonical, so that
/// two maps holding the same handles compare equal). Apart, so that the common entry is
/// two `u32`s (8 bytes and hashbrown's control byte, instead of a copied key and its
/// allocation).
#[derive(Default, Debug, PartialEq, Eq)]
pub(super) struct KeyMap {
    /// Keys with one handle.
    one: HashMap<u32, Handle>,
    /// Keys with two or more (rare: a site several connections reach, or a collision).
    many: HashMap<u32, Vec<Handle>>,
}

impl KeyMap {
    /// Room for `n` more keys of one handle each (a load's).
    pub(super) fn reserve(&mut self, n: usize) {
        self.one.reserve(n);
    }

    /// The handles filed under `key`.
    pub(super) fn get(&self, key: u32) -> impl Iterator<Item = Handle> + '_ {
        let one = self.one.get(&key).copied();
        let many = self.many.get(&key).into_iter().flatten().copied();
        one.into_iter().chain(many)
    }

    /// Files `handle` under `key` (once).
    pub(super) fn file(&mut self, key: u32, handle: Handle) {
        if let Some(list) = self.many.get_mut(&key) {
            if let Err(at) = list.binary_search(&handle) {
                list.insert(at, handle);
            }
            return;
        }
        match self.one.get(&key) {
            None => {
                self.one.insert(key, handle);
            }
            Some(&have) if have == handle => {}
            Some(&have) => {
                self.one.remove(&key);
                let mut both = vec![have, handle];
                both.sort_unstable();
                self.many.insert(key, both);
            }
        }
    }

    /// Takes `handle` out from under `key`, dropping the key when nobody is left.
    pub(super) fn unfile(&mut self, key: u32, handle: Handle) {
        if self.one.get(&key) == Some(&handle) {
            self.one.remove(&key);
            return;
        }
        let Some(list) = self.many.get_mut(&key) else {
            return;
        };
        if let Ok(at) = list.binary_search(&handle) {
            list.remove(at);
        }
        if let [only] = list[..] {
            self.many.remove(&key);
            self.one.insert(key, only);
        }
    }

    /// Every filed `(key, handle)` pair, in no particular order (checks of the indexes).
    #[cfg(test)]
    pub(super) fn entries(&self) -> Vec<(u32, Handle)> {
        let one = self.one.iter().map(|(&k, &h)| (k, h));
        let many = self
            .many
            .iter()
            .flat_map(|(&k, list)| list.iter().map(move |&h| (k, h)));
        one.chain(many).collect()
    }
}

/// The keys of every [`KeyMap`]'s hash: random per process (so that nobody can choose
/// site names, ids or labels that collide), the same for every index of the process (the
/// kept one and a recount).
static KEY_HASHER: LazyLock<std::hash::RandomState> = LazyLock::new(Default::default);

/// The [`KeyMap`] key of a string (a normalised cloud id or host, an id, a label): 32 bits
/// of a keyed SipHash.
pub(super) fn key_hash(key: &str) -> u32 {
    use std::hash::BuildHasher;
    let h = KEY_HASHER.hash_one(key);
    (h ^ (h >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(map: &KeyMap, key: u32) -> Vec<Handle> {
        let mut v: Vec<Handle> = map.get(key).collect();
        v.sort_unstable();
        v
    }

    /// Several handles under one key (what a collision is): each is found, each leaves
    /// alone, and the map returns to its canonical form (`one` again for the last, nothing
    /// for none), equal to one built with only what is left.
    #[test]
    fn handles_sharing_a_key_are_filed_and_unfiled_one_by_one() {
        let mut map = KeyMap::default();
        map.file(7, 3);
        map.file(7, 1);
        map.file(7, 3);
        map.file(7, 2);
        map.file(8, 5);
        assert_eq!(sorted(&map, 7), [1, 2, 3], "each once");
        assert_eq!(sorted(&map, 8), [5]);
        assert!(map.get(9).next().is_none());

        map.unfile(7, 2);
        map.unfile(7, 4);
        map.unfile(9, 1);
        assert_eq!(sorted(&map, 7), [1, 3]);
        map.unfile(7, 1);
        assert_eq!(sorted(&map, 7), [3]);
        let mut alone = KeyMap::default();
        alone.file(7, 3);
        alone.file(8, 5);
        assert_eq!(map, alone, "canonical: back in `one`");

        map.unfile(7, 3);
        map.unfile(8, 5);
        assert_eq!(map, KeyMap::default(), "no key left behind");
        assert!(map.entries().is_empty());
    }

    /// The hash is a function of the string alone within a process (the kept index and a
    /// recount agree), and tells different strings apart as a rule.
    #[test]
    fn the_key_is_the_same_for_the_same_string() {
        assert_eq!(key_hash("scale-1"), key_hash("scale-1"));
        let distinct: std::collections::HashSet<u32> =
            (0..1000).map(|i| key_hash(&format!("scale-{i}"))).collect();
        assert!(
            distinct.len() > 990,
            "{} distinct keys of 1000",
            distinct.len()
        );
    }
}
