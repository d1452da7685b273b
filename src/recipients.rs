//! Sets of recipients, shared by the engines' bulk sends.

use roaring::RoaringTreemap;

use crate::UserId;

/// Sends to more users than this store one shared bulk record; smaller ones
/// write a two-byte record per recipient (see `engine/sled`). Below it, the
/// per-recipient records cost less than one more record for every drain to
/// check.
pub(crate) const THRESHOLD: usize = 256;

/// A set of users, compact for integer ids.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Recipients {
    pub(crate) ints: RoaringTreemap,
    /// Sorted, without duplicates.
    pub(crate) strs: Vec<String>,
}

impl Recipients {
    pub(crate) fn contains(&self, user: &UserId) -> bool {
        match user {
            UserId::Int(id) => self.ints.contains(*id),
            UserId::Str(name) => self.strs.binary_search_by(|s| s.as_str().cmp(name)).is_ok(),
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.ints.len() + self.strs.len() as u64
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a user; `strs` must be sorted afterwards with [`Recipients::seal`].
    pub(crate) fn push(&mut self, user: UserId) {
        match user {
            UserId::Int(id) => {
                self.ints.insert(id);
            }
            UserId::Str(name) => self.strs.push(name),
        }
    }

    /// Sorts and de-duplicates the string ids.
    pub(crate) fn seal(&mut self) {
        self.strs.sort_unstable();
        self.strs.dedup();
    }

    pub(crate) fn insert(&mut self, user: &UserId) {
        match user {
            UserId::Int(id) => {
                self.ints.insert(*id);
            }
            UserId::Str(name) => {
                if let Err(at) = self.strs.binary_search(name) {
                    self.strs.insert(at, name.clone());
                }
            }
        }
    }

    /// The users in `self` but not in `other`.
    pub(crate) fn without(&self, other: &Recipients) -> Recipients {
        Recipients {
            ints: &self.ints - &other.ints,
            strs: self
                .strs
                .iter()
                .filter(|s| other.strs.binary_search(s).is_err())
                .cloned()
                .collect(),
        }
    }

    /// Every user, integer ids first.
    pub(crate) fn users(&self) -> impl Iterator<Item = UserId> + '_ {
        self.ints
            .iter()
            .map(UserId::Int)
            .chain(self.strs.iter().map(|s| UserId::Str(s.clone())))
    }
}
